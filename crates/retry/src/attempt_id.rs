//! A fresh JSON-RPC request id for each retry of a raw JSON-RPC request.
//!
//! MCP forbids reusing a request id within a session, so a retry of a
//! [`jsonrpc::Request`](Request) cannot go out under the caller's id again.
//! Attempt `n` (2 for the first retry) carries the string id
//! `"<original>#tw-retry-<n>"`, `<original>` being the caller's id as
//! [`Id`]'s `Display` writes it: a number as digits (`7#tw-retry-2`), a
//! string quoted and escaped (`"req-7"#tw-retry-2`), `null` as `null`. The
//! id of a retry is thus unique within the session as long as the caller's
//! ids are, numbers and strings never meet (`7` and `"7"` give different
//! ids), and it is deterministic, so a log shows which call it retries.
//! String ids ending in `#tw-retry-<n>` are reserved for the layer: a client
//! must not send one of its own.
//!
//! Each attempt's response is re-addressed to the caller's id before it
//! leaves the layer ([`McpResponse::set_request_id`]).
//!
//! Request types without an id ([`McpRequest::request_id`] is `None`) are
//! left as they are: rmcp's `ClientRequest` carries none (the rmcp peer
//! numbers every request it sends, each attempt included).

use toolwarden_core::jsonrpc::Id;
use toolwarden_core::{McpRequest, McpResponse};

/// What follows the caller's id in a retry's id, before the attempt number.
const MARKER: &str = "#tw-retry-";

/// The id attempt `attempt` of a request with id `original` carries.
pub(crate) fn retry_id(original: &Id, attempt: u32) -> Id {
    Id::String(format!("{original}{MARKER}{attempt}"))
}

/// Gives `request`, a copy of the caller's request about to be sent as
/// attempt `attempt` (2 or more), its own id, if it carries one.
pub(crate) fn reidentify<R: McpRequest>(request: &mut R, attempt: u32) {
    if let Some(id) = request.request_id() {
        let id = retry_id(id, attempt);
        request.set_request_id(id);
    }
}

/// Re-addresses the response to a retry to the caller's request `original`
/// (as received), if it carries an id.
pub(crate) fn restore<R: McpRequest, Resp: McpResponse>(response: &mut Resp, original: &R) {
    if let Some(id) = original.request_id() {
        response.set_request_id(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use toolwarden_core::jsonrpc::{Request, Response};

    #[test]
    fn retry_ids_are_distinct_from_each_other_and_from_the_callers() {
        let ids = [
            Id::Number(7),
            Id::String("7".into()),
            // Not of the reserved form `…#tw-retry-<n>`.
            Id::String("7#tw-retry-".into()),
            Id::String("\"7\"#tw-retry-x".into()),
            Id::Null,
            Id::String("null".into()),
        ];
        let mut seen = std::collections::HashSet::new();
        for id in &ids {
            assert!(seen.insert(id.clone()));
        }
        for id in &ids {
            for attempt in 2..=4 {
                assert!(seen.insert(retry_id(id, attempt)), "{id} {attempt}");
            }
        }
        assert_eq!(
            retry_id(&Id::Number(7), 2),
            Id::String("7#tw-retry-2".into())
        );
        assert_eq!(
            retry_id(&Id::String("7".into()), 3),
            Id::String("\"7\"#tw-retry-3".into())
        );
    }

    #[test]
    fn a_retry_carries_its_own_id_and_its_answer_the_callers() {
        let mut request = Request::tool_call(7, "search", json!({}));
        reidentify(&mut request, 2);
        assert_eq!(request.id, Id::String("7#tw-retry-2".into()));
        let mut response = Response::result(request.id.clone(), json!({}));
        restore(&mut response, &Request::tool_call(7, "search", json!({})));
        assert_eq!(response.id, Id::Number(7));
    }
}
