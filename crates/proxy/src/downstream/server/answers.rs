//! Results and errors as the downstream client gets them (see "Errors" in
//! the [module docs](super)): a JSON-RPC error for each failure that reaches
//! the server, a result of the kind the client asked for.

use std::error::Error as StdError;
use std::future::Future;
use std::time::Duration;

use rmcp::model::{ErrorCode, ErrorData, RequestOptionalParam, ServerResult};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use toolwarden_core::classify::{CallTimedOut, TransportError};
use toolwarden_core::jsonrpc::ErrorObject;
use toolwarden_core::rejection::{as_rejection, Rejection};
use toolwarden_core::BoxError;

/// The JSON-RPC error a downstream client gets for a failed forwarded request.
pub fn error_data(error: &(dyn StdError + 'static)) -> ErrorData {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(obj) = e.downcast_ref::<ErrorObject>() {
            return ErrorData::new(
                ErrorCode(i32::try_from(obj.code).unwrap_or(-32603)),
                obj.message.clone(),
                obj.data.clone(),
            );
        }
        if e.is::<TransportError>() {
            return ErrorData::new(
                ErrorCode(-32000),
                format!("upstream unavailable: {e}"),
                None,
            );
        }
        if e.is::<CallTimedOut>() {
            return ErrorData::new(
                ErrorCode(-32001),
                format!("upstream request timed out: {e}"),
                None,
            );
        }
        if let Some(refused) = as_rejection(e) {
            return refusal(e, refused);
        }
        current = e.source();
    }
    ErrorData::internal_error(format!("toolwarden proxy: {error}"), None)
}

/// A layer's refusal of a request that is not a tool call (a gateway
/// upstream's breaker refusing `resources/read`, say): `-32000`, with the
/// layer and the retry-after in `data` as `retryAfter` seconds, the hint
/// the layers read from a server's error. It was `-32603`, an internal
/// error, with the retry-after in its text only.
fn refusal(error: &(dyn StdError + 'static), refused: &dyn Rejection) -> ErrorData {
    let mut data = serde_json::Map::new();
    data.insert("layer".into(), refused.layer().into());
    if let Some(after) = refused.retry_after() {
        data.insert("retryAfter".into(), after.as_secs_f64().into());
    }
    ErrorData::new(
        ErrorCode(-32000),
        format!("{error}: {}", refused.advice()),
        Some(serde_json::Value::Object(data)),
    )
}

/// The answer to a forwarded request other than `tools/call`: its result,
/// or its failure as a JSON-RPC error (`None`: the client cancelled it).
pub(super) fn forwarded(
    outcome: Option<Result<Result<ServerResult, BoxError>, RequestTimedOut>>,
) -> Result<ServerResult, ErrorData> {
    match outcome {
        Some(Err(RequestTimedOut(limit))) => Err(ErrorData::new(
            ErrorCode(-32001),
            format!("upstream request timed out after {limit:?} (limits.request_timeout)"),
            None,
        )),
        Some(Ok(result)) => tool_call(Some(result)),
        None => Err(cancelled()),
    }
}

/// The answer to a `tools/call`: the stack's result (a failure the stack
/// rendered is an `isError` result already), or what the stack still
/// returned as an error, as the JSON-RPC error it is (`None`: the client
/// cancelled the call).
pub(super) fn tool_call(
    outcome: Option<Result<ServerResult, BoxError>>,
) -> Result<ServerResult, ErrorData> {
    match outcome {
        Some(Ok(result)) => Ok(complete(result)),
        Some(Err(e)) => Err(error_data(e.as_ref())),
        None => Err(cancelled()),
    }
}

/// `result` with `resultType: "complete"` where the server gave none: a
/// server of an older version sends none, and a 2026-07-28 client requires
/// it (the Python SDK's refuses a `tools/list` without it). rmcp takes it
/// off again for a client of an older version.
fn complete(mut result: ServerResult) -> ServerResult {
    use rmcp::model::ResultType;
    let result_type = match &mut result {
        ServerResult::CompleteResult(r) => &mut r.result_type,
        ServerResult::GetPromptResult(r) => &mut r.result_type,
        ServerResult::ListPromptsResult(r) => &mut r.result_type,
        ServerResult::ListResourcesResult(r) => &mut r.result_type,
        ServerResult::ListResourceTemplatesResult(r) => &mut r.result_type,
        ServerResult::ReadResourceResult(r) => &mut r.result_type,
        ServerResult::ListToolsResult(r) => &mut r.result_type,
        ServerResult::CallToolResult(r) => &mut r.result_type,
        _ => return result,
    };
    result_type.get_or_insert(ResultType::COMPLETE);
    result
}

/// The answer to a request that found no upstream connection (`why`: what
/// happened, for a client; see [`Upstream::wait_connected`](crate::upstream::Upstream::wait_connected)).
pub(super) fn unavailable(why: &str) -> ErrorData {
    ErrorData::new(
        ErrorCode(-32000),
        format!("upstream unavailable: {why}"),
        None,
    )
}

/// A result of another kind than expected, read as the expected kind: rmcp
/// reads results as an untagged union, so a result may have matched an
/// earlier variant and still be the same JSON.
pub(super) fn reinterpret<T: DeserializeOwned>(other: &ServerResult) -> Result<T, ErrorData> {
    serde_json::to_value(other)
        .ok()
        .and_then(|v| serde_json::from_value(v).ok())
        .ok_or_else(|| {
            ErrorData::internal_error(
                "the upstream server answered with a result of another kind",
                None,
            )
        })
}

/// The `$variant` result, or the same JSON read as it.
macro_rules! expect_result {
    ($result:expr, $variant:ident) => {
        match $result {
            ServerResult::$variant(v) => Ok(v),
            other => $crate::downstream::server::answers::reinterpret(&other),
        }
    };
}
pub(super) use expect_result;

/// A request other than `tools/call` outlived `limits.request_timeout`.
pub(super) struct RequestTimedOut(pub(super) Duration);

/// rmcp cancels a request's token when the client cancels it and when the
/// session shuts down (SIGTERM, the end of input): the answer says both.
fn cancelled() -> ErrorData {
    ErrorData::new(
        ErrorCode(-32800),
        "request cancelled (by the client, or as the proxy shut down)",
        None,
    )
}

pub(super) async fn unless_cancelled<F: Future>(ct: &CancellationToken, f: F) -> Option<F::Output> {
    tokio::select! {
        output = f => Some(output),
        () = ct.cancelled() => None,
    }
}

pub(super) fn optional<M: Default, P>(params: Option<P>) -> RequestOptionalParam<M, P> {
    RequestOptionalParam {
        method: M::default(),
        params,
        extensions: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use toolwarden_core::{CircuitOpen, RateLimited};

    /// A refusal of a request that is not a tool call (a gateway
    /// upstream's breaker, a quota on every method) tells the client when
    /// to come back, in `data` where clients and the layers read it.
    #[test]
    fn a_refusal_is_a_server_error_with_its_retry_after_in_data() {
        let open: BoxError = Box::new(CircuitOpen::new("docs", Duration::from_secs(30)));
        let answer = error_data(open.as_ref());
        assert_eq!(answer.code, ErrorCode(-32000));
        let data = answer.data.unwrap();
        assert_eq!(data["layer"], "circuit_breaker");
        assert_eq!(data["retryAfter"], 30.0);
        assert_eq!(
            toolwarden_core::classify::retry_after_from_data(&data),
            Some(Duration::from_secs(30))
        );
        let limited: BoxError = Box::new(RateLimited::new("x", Duration::from_millis(1500)));
        let answer = error_data(limited.as_ref());
        assert_eq!(answer.code, ErrorCode(-32000));
        assert_eq!(answer.data.unwrap()["retryAfter"], 1.5);
        assert!(answer.message.contains("x"), "{}", answer.message);
    }
}
