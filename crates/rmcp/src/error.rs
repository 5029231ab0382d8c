//! rmcp's `ServiceError` mapped to the core's error types.

use rmcp::ServiceError;
use toolwarden_core::classify::{CallTimedOut, TransportError, TransportErrorKind};
use toolwarden_core::jsonrpc::ErrorObject;
use toolwarden_core::BoxError;

/// Maps an rmcp error to the core error type the default classifier reads:
///
/// | rmcp | core | class |
/// |---|---|---|
/// | `McpError(ErrorData)` | [`ErrorObject`] (same code, message, data) | by code |
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
        ServiceError::TransportSend(e) => Box::new(TransportError::new(
            TransportErrorKind::Closed,
            e.to_string(),
        )),
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
}
