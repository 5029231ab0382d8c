//! The call model for rmcp's types (feature `rmcp`).
//!
//! [`McpRequest`] for rmcp's `ClientRequest` and [`McpResponse`] for its
//! `ServerResult`, so every toolwarden layer runs over an rmcp client
//! unchanged. They live here rather than in `toolwarden-rmcp` because Rust's
//! orphan rule only lets a trait be implemented for a foreign type in the
//! trait's own crate; `toolwarden-rmcp` builds the client `Service` on them.
//!
//! rmcp delivers JSON-RPC errors as `Err(ServiceError::McpError)`, never
//! inside a `ServerResult`, so [`McpResponse::rpc_error`] is always `None`
//! here; `toolwarden-rmcp` maps rmcp's errors to the core's error types.

use std::borrow::Cow;

use rmcp::model::{
    CallToolResult, ClientRequest, ContentBlock, GetExtensions, JsonObject, MetaObject, ResultType,
    ServerResult,
};
use serde_json::Value;

use crate::jsonrpc::Id;
use crate::request::RpcErrorRef;
use crate::{tool_result, McpRequest, McpResponse, SessionKey};

impl McpRequest for ClientRequest {
    fn method(&self) -> &str {
        ClientRequest::method(self)
    }

    fn tool_name(&self) -> Option<&str> {
        match self {
            ClientRequest::CallToolRequest(r) => Some(&r.params.name),
            _ => None,
        }
    }

    fn arguments(&self) -> Option<&JsonObject> {
        match self {
            ClientRequest::CallToolRequest(r) => r.params.arguments.as_ref(),
            _ => None,
        }
    }

    fn is_continuation(&self) -> bool {
        match self {
            ClientRequest::CallToolRequest(r) => {
                r.params.input_responses.is_some() || r.params.request_state.is_some()
            }
            _ => false,
        }
    }

    fn session_key(&self) -> Option<&str> {
        self.extensions()
            .get::<SessionKey>()
            .map(SessionKey::as_str)
    }

    fn extension<T: Send + Sync + 'static>(&self) -> Option<&T> {
        self.extensions().get::<T>()
    }

    fn insert_extension<T: Clone + Send + Sync + 'static>(&mut self, value: T) {
        self.extensions_mut().insert(value);
    }
}

fn call_result(r: &ServerResult) -> Option<&CallToolResult> {
    match r {
        ServerResult::CallToolResult(c) => Some(c),
        _ => None,
    }
}

fn is_blank(text: &str) -> bool {
    matches!(text.trim(), "" | "null" | "{}" | "[]")
}

fn is_blank_value(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(o) => o.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::String(s) => is_blank(s),
        _ => false,
    }
}

impl McpResponse for ServerResult {
    fn rpc_error(&self) -> Option<RpcErrorRef<'_>> {
        None
    }

    fn is_tool_error(&self) -> bool {
        call_result(self).is_some_and(|c| c.is_error == Some(true))
    }

    /// Also true of a result of another kind (rmcp reads `{}` and `null`
    /// as an `EmptyResult`, any other object as a `CustomResult`): as the
    /// answer to a `tools/call` it carries no tool result, and was taken
    /// for one with data (a success for every layer, stored by the fallback
    /// cache, then answered `-32603` to the client). A task and a request
    /// for input are not empty.
    fn is_empty_tool_result(&self) -> bool {
        let c = match self {
            ServerResult::CallToolResult(c) => c,
            ServerResult::CreateTaskResult(_) | ServerResult::InputRequiredResult(_) => {
                return false
            }
            _ => return true,
        };
        if c.structured_content
            .as_ref()
            .is_some_and(|s| !is_blank_value(s))
        {
            return false;
        }
        c.content.iter().all(|block| match block {
            ContentBlock::Text(t) => is_blank(&t.text),
            _ => false,
        })
    }

    fn is_input_required(&self) -> bool {
        match self {
            ServerResult::InputRequiredResult(_) => true,
            ServerResult::CallToolResult(c) => c
                .result_type
                .as_ref()
                .is_some_and(|t| *t != ResultType::COMPLETE),
            _ => false,
        }
    }

    fn is_task(&self) -> bool {
        matches!(self, ServerResult::CreateTaskResult(_))
    }

    fn first_text(&self) -> Option<Cow<'_, str>> {
        call_result(self)?
            .content
            .iter()
            .find_map(|b| b.as_text().map(|t| Cow::Borrowed(t.text.as_str())))
    }

    fn result_meta(&self, key: &str) -> Option<&Value> {
        call_result(self)?.meta.as_ref()?.0.get(key)
    }

    fn from_tool_result(_id: Option<&Id>, result: Value) -> Self {
        match serde_json::from_value::<CallToolResult>(result.clone()) {
            Ok(r) => ServerResult::CallToolResult(r),
            // The core renderer always builds a valid result; keep the text if not.
            Err(_) => {
                ServerResult::CallToolResult(CallToolResult::error(vec![ContentBlock::text(
                    tool_result::first_text(&result)
                        .unwrap_or("toolwarden: failure")
                        .to_owned(),
                )]))
            }
        }
    }

    fn insert_result_meta(&mut self, key: &str, value: Value) {
        if let ServerResult::CallToolResult(c) = self {
            let meta = c.meta.get_or_insert_with(|| MetaObject(Default::default()));
            meta.0.insert(key.to_owned(), value);
        }
    }

    fn remove_result_meta(&mut self, key: &str) {
        if let ServerResult::CallToolResult(c) = self {
            if let Some(meta) = &mut c.meta {
                if meta.0.remove(key).is_some() && meta.0.is_empty() {
                    c.meta = None;
                }
            }
        }
    }

    fn push_text(&mut self, text: String) {
        if let ServerResult::CallToolResult(c) = self {
            c.content.push(ContentBlock::text(text));
        }
    }

    fn size_hint(&self) -> usize {
        serde_json::to_value(self)
            .map(|v| tool_result::approximate_size(&v))
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CallKind, Classify, FailureClass, McpClassifier, OutcomeKind};
    use rmcp::model::{CallToolRequest, CallToolRequestParams, ListToolsRequest};
    use serde_json::json;

    fn call(name: &'static str, args: serde_json::Value) -> ClientRequest {
        let mut params = CallToolRequestParams::new(name);
        params.arguments = args.as_object().cloned();
        ClientRequest::CallToolRequest(CallToolRequest::new(params))
    }

    #[test]
    fn reads_a_tool_call() {
        let mut req = call(
            "echo",
            json!({"message": "hi", "_meta": {"progressToken": 1}}),
        );
        assert_eq!(McpRequest::method(&req), "tools/call");
        assert_eq!(req.tool_name(), Some("echo"));
        assert_eq!(req.arguments().unwrap()["message"], "hi");
        assert!(!req.is_continuation());
        assert_eq!(req.session_key(), None);
        req.insert_extension(SessionKey::from("s-1"));
        assert_eq!(req.session_key(), Some("s-1"));
        // The same fingerprint as the core's own request type.
        let mut raw = crate::jsonrpc::Request::tool_call(1, "echo", json!({"message": "hi"}));
        assert_eq!(
            crate::call_fingerprint(&mut req),
            crate::call_fingerprint(&mut raw)
        );
    }

    #[test]
    fn other_requests_have_no_tool() {
        let req = ClientRequest::ListToolsRequest(ListToolsRequest::default());
        assert_eq!(McpRequest::method(&req), "tools/list");
        assert_eq!(req.tool_name(), None);
        assert_eq!(req.target(), "tools/list");
    }

    #[test]
    fn continuations_are_recognised() {
        let mut params = CallToolRequestParams::new("book");
        params.request_state = Some("opaque".into());
        let req = ClientRequest::CallToolRequest(CallToolRequest::new(params));
        assert!(req.is_continuation());
    }

    fn result(v: Value) -> ServerResult {
        ServerResult::CallToolResult(serde_json::from_value(v).unwrap())
    }

    fn classify(r: &ServerResult) -> crate::Outcome {
        McpClassifier::new().classify_response(CallKind::ToolCall, r)
    }

    #[test]
    fn classifies_rmcp_results_like_raw_ones() {
        let ok = result(json!({"content": [{"type": "text", "text": "Echo: hi"}]}));
        assert!(classify(&ok).is_success());
        let unknown = result(
            json!({"content": [{"type": "text", "text": "MCP error -32602: Tool nope not found"}], "isError": true}),
        );
        let o = classify(&unknown);
        assert_eq!(
            (o.kind, o.class),
            (OutcomeKind::ToolError, Some(FailureClass::Client))
        );
        let empty = result(json!({"content": [{"type": "text", "text": " "}]}));
        assert_eq!(classify(&empty).class, Some(FailureClass::Server));
        let structured = result(json!({"content": [], "structuredContent": {"t": 1}}));
        assert!(classify(&structured).is_success());
        // A result of another kind answering a tools/call carries no tool
        // result: empty, a Server failure, as its raw form would be
        // (regression: rmcp reads `{}` as `EmptyResult` and `{"foo": 1}` as
        // a `CustomResult`, both were successes, and the fallback cache kept
        // them as the tool's last good result).
        for other in [json!({}), json!({"foo": 1}), json!({"content": "x"})] {
            let read: ServerResult = serde_json::from_value(other.clone()).unwrap();
            assert!(
                !matches!(read, ServerResult::CallToolResult(_)),
                "{other}: {read:?}"
            );
            assert_eq!(classify(&read).class, Some(FailureClass::Server), "{other}");
            // The answer to another method is that method's business.
            assert!(McpClassifier::new()
                .classify_response(CallKind::Other, &read)
                .is_success());
        }
        // A task is the server accepting the call: a success, never kept
        // as the tool's last good result (not marked).
        let stamp = "2026-12-06T00:00:00Z";
        let task = rmcp::model::Task::new("t-1", rmcp::model::TaskStatus::Working, stamp, stamp);
        let mut task = ServerResult::CreateTaskResult(rmcp::model::CreateTaskResult::new(task));
        assert_eq!(task.tool_result_status(), crate::ToolResultStatus::Task);
        let sharing = McpClassifier::new().share_outcomes(true);
        assert!(sharing
            .classify_owned(CallKind::ToolCall, &mut task)
            .is_success());
        assert!(!task.marked_tool_call_success());
    }

    #[test]
    fn builds_and_marks_tool_results() {
        let report = crate::FailureReport::new("echo", "echo is failing").to_tool_result();
        let mut r = ServerResult::from_tool_result(None, report);
        assert!(r.is_tool_error());
        r.insert_result_meta("toolwarden/stale", json!({"ageSeconds": 4}));
        r.push_text("note".into());
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["_meta"]["toolwarden/stale"]["ageSeconds"], 4);
        assert_eq!(v["content"][1]["text"], "note");
        assert!(r.size_hint() > 20);
    }
}
