//! rmcp's `ServiceError` mapped to the core's error types.

use rmcp::ServiceError;
#[cfg(feature = "reqwest")]
use toolwarden_core::classify::retry_after_from_header;
use toolwarden_core::classify::{
    CallTimedOut, HttpStatusError, TransportError, TransportErrorKind,
};
use toolwarden_core::jsonrpc::ErrorObject;
use toolwarden_core::BoxError;

/// Maps an rmcp error to the core error type the default classifier reads:
///
/// | rmcp | core | class |
/// |---|---|---|
/// | `McpError(ErrorData)` | [`ErrorObject`] (same code, message, data) | by code |
/// | `TransportSend` of an HTTP 429 or 5xx, of a 401 / 403 with a `WWW-Authenticate` challenge, or of another 4xx but 400 and 404 (feature `reqwest`: rmcp's Streamable HTTP client over reqwest) | [`HttpStatusError`] (status, `Retry-After`) | 429, 502–504 `Transient` with the hint; other 5xx `Server`; other 4xx `Client` |
/// | `TransportSend`, `TransportClosed`, `Cancelled` | [`TransportError`] `Closed` | `Transient` |
/// | `Timeout { timeout }` | [`CallTimedOut`] | `Transient` |
/// | anything else | the `ServiceError` itself | `Server` |
#[must_use]
pub fn map_service_error(error: ServiceError) -> BoxError {
    match error {
        ServiceError::McpError(e) => Box::new(ErrorObject {
            code: i64::from(e.code.0),
            message: e.message.into_owned(),
            data: e.data,
        }),
        ServiceError::TransportClosed => Box::new(TransportError::new(
            TransportErrorKind::Closed,
            "the MCP connection closed",
        )),
        ServiceError::TransportSend(e) => match http_status(e.error.as_ref()) {
            Some(status) => Box::new(status),
            None => Box::new(TransportError::new(
                TransportErrorKind::Closed,
                e.to_string(),
            )),
        },
        ServiceError::Cancelled { reason } => Box::new(TransportError::new(
            TransportErrorKind::Closed,
            format!(
                "request cancelled: {}",
                reason.as_deref().unwrap_or("no reason")
            ),
        )),
        ServiceError::Timeout { timeout } => Box::new(CallTimedOut { after: timeout }),
        other => Box::new(other),
    }
}

/// The HTTP status (and its `Retry-After`) of a failed POST of rmcp's
/// Streamable HTTP client over reqwest, if `error` is one. rmcp reports a
/// 429 or 5xx answer as an error of the send, its body unread (a 5xx whose
/// body is a JSON-RPC error comes as that error instead), and a 401 or 403
/// with a `WWW-Authenticate` challenge as an authorization error: the
/// credentials are refused, which no retry changes.
#[cfg(feature = "reqwest")]
fn http_status(error: &(dyn std::error::Error + 'static)) -> Option<HttpStatusError> {
    use rmcp::transport::streamable_http_client::StreamableHttpError;
    match error.downcast_ref::<StreamableHttpError<reqwest::Error>>()? {
        StreamableHttpError::HttpStatus(status) => Some(HttpStatusError {
            status: status.status,
            retry_after: status
                .retry_after
                .as_deref()
                .and_then(|value| retry_after_from_header(value, std::time::SystemTime::now())),
        }),
        StreamableHttpError::AuthRequired(_) => Some(HttpStatusError {
            status: 401,
            retry_after: None,
        }),
        StreamableHttpError::InsufficientScope(_) => Some(HttpStatusError {
            status: 403,
            retry_after: None,
        }),
        StreamableHttpError::UnexpectedServerResponse(message) => {
            unexpected_status(message).map(|status| HttpStatusError {
                status,
                retry_after: None,
            })
        }
        _ => None,
    }
}

/// The status of a 4xx answer rmcp reports only in its message (`HTTP 422
/// Unprocessable Entity: <body>`): any but 429 (a status error already),
/// 400 and 404, which a Streamable HTTP server answers for a session it
/// lost (the proxy reconnects; the call stays transient). Without it a
/// 409, 413 or 422, the server refusing the request itself, was a closed
/// connection: retried, counted by the breaker, read as temporary.
#[cfg(feature = "reqwest")]
fn unexpected_status(message: &str) -> Option<u16> {
    let digits = message.strip_prefix("HTTP ")?.get(..3)?;
    let status: u16 = digits.parse().ok()?;
    ((400..500).contains(&status) && !matches!(status, 400 | 404 | 429)).then_some(status)
}

#[cfg(not(feature = "reqwest"))]
fn http_status(_error: &(dyn std::error::Error + 'static)) -> Option<HttpStatusError> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmcp::model::{ErrorCode, ErrorData};
    use std::time::Duration;
    use toolwarden_core::{Classify, FailureClass, McpClassifier, OutcomeKind};

    fn classify(e: ServiceError) -> toolwarden_core::Outcome {
        let e = map_service_error(e);
        <McpClassifier as Classify<rmcp::model::ServerResult>>::classify_error(
            &McpClassifier::new(),
            e.as_ref(),
        )
    }

    #[test]
    fn maps_every_error_to_its_class() {
        let o = classify(ServiceError::McpError(ErrorData::new(
            ErrorCode(-32602),
            "Unknown tool: nope",
            None,
        )));
        assert_eq!(
            (o.kind, o.class, o.code),
            (
                OutcomeKind::ProtocolError,
                Some(FailureClass::Client),
                Some(-32602)
            )
        );
        let o = classify(ServiceError::McpError(ErrorData::new(
            ErrorCode(-32603),
            "boom",
            None,
        )));
        assert_eq!(o.class, Some(FailureClass::Server));
        let o = classify(ServiceError::TransportClosed);
        assert_eq!(
            (o.kind, o.class),
            (OutcomeKind::Transport, Some(FailureClass::Transient))
        );
        let o = classify(ServiceError::Timeout {
            timeout: Duration::from_secs(1),
        });
        assert_eq!(
            (o.kind, o.class),
            (OutcomeKind::Timeout, Some(FailureClass::Transient))
        );
        let o = classify(ServiceError::UnexpectedResponse);
        assert_eq!(o.class, Some(FailureClass::Server));
    }

    /// A failed send of rmcp's Streamable HTTP client over reqwest.
    #[cfg(feature = "reqwest")]
    fn failed_send(
        error: rmcp::transport::streamable_http_client::StreamableHttpError<reqwest::Error>,
    ) -> ServiceError {
        ServiceError::TransportSend(rmcp::transport::DynamicTransportError::from_parts(
            "streamable-http",
            std::any::TypeId::of::<()>(),
            Box::new(error),
        ))
    }

    /// A failed send with this HTTP status and `Retry-After`.
    #[cfg(feature = "reqwest")]
    fn http_status(status: u16, retry_after: Option<&str>) -> ServiceError {
        use rmcp::transport::streamable_http_client::{HttpStatusError, StreamableHttpError};
        failed_send(StreamableHttpError::HttpStatus(HttpStatusError::new(
            status,
            retry_after.map(str::to_owned),
        )))
    }

    #[cfg(feature = "reqwest")]
    #[test]
    fn http_statuses_are_classified_as_statuses_with_their_hint() {
        let o = classify(http_status(429, Some("7")));
        assert_eq!(
            (o.kind, o.class, o.retry_after),
            (
                OutcomeKind::Transport,
                Some(FailureClass::Transient),
                Some(Duration::from_secs(7))
            )
        );
        let o = classify(http_status(503, None));
        assert_eq!(
            (o.class, o.retry_after),
            (Some(FailureClass::Transient), None)
        );
        let o = classify(http_status(500, Some("5")));
        assert_eq!(o.class, Some(FailureClass::Server));
        // A hint past the bound is clamped; one that is not a delay is ignored.
        let o = classify(http_status(429, Some("99999999999999999999")));
        assert_eq!(o.retry_after, Some(Duration::from_secs(3600)));
        let o = classify(http_status(429, Some("soon")));
        assert_eq!(
            (o.class, o.retry_after),
            (Some(FailureClass::Transient), None)
        );
    }

    /// A 4xx that rmcp reports only as an unexpected response: a client
    /// failure (not retried, not counted by a breaker), as MCP.md says;
    /// 400 and 404 (a lost session) and anything unreadable stay a
    /// transport failure.
    #[cfg(feature = "reqwest")]
    #[test]
    fn other_4xx_statuses_are_client_failures() {
        use rmcp::transport::streamable_http_client::StreamableHttpError;
        let unexpected = |message: &'static str| {
            classify(failed_send(StreamableHttpError::UnexpectedServerResponse(
                message.into(),
            )))
        };
        for message in [
            "HTTP 409 Conflict: busy editing",
            "HTTP 413 Payload Too Large: ",
            "HTTP 422 Unprocessable Entity: {\"detail\": \"bad\"}",
        ] {
            let o = unexpected(message);
            assert_eq!(
                (o.kind, o.class),
                (OutcomeKind::Transport, Some(FailureClass::Client)),
                "{message}"
            );
        }
        for message in [
            "HTTP 404 Not Found: no such session",
            "HTTP 400 Bad Request: ",
            "HTTP 4",
            "expected a JSON-RPC message, got {",
        ] {
            let o = unexpected(message);
            assert_eq!(o.class, Some(FailureClass::Transient), "{message}");
        }
    }

    #[cfg(feature = "reqwest")]
    #[test]
    fn refused_credentials_are_a_client_failure() {
        use rmcp::transport::streamable_http_client::{
            AuthRequiredError, InsufficientScopeError, StreamableHttpError,
        };
        let o = classify(failed_send(StreamableHttpError::AuthRequired(
            AuthRequiredError::new("Bearer".into()),
        )));
        assert_eq!(
            (o.kind, o.class),
            (OutcomeKind::Transport, Some(FailureClass::Client))
        );
        let o = classify(failed_send(StreamableHttpError::InsufficientScope(
            InsufficientScopeError::new("Bearer scope=\"x\"".into(), Some("x".into())),
        )));
        assert_eq!(o.class, Some(FailureClass::Client));
    }
}
