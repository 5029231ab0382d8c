//! The request and response views every layer reads through.

use std::borrow::Cow;

use serde_json::{Map, Value};

use crate::fingerprint::{fingerprint, Fingerprint};
use crate::jsonrpc::{self, Id};

/// The `tools/call` method name.
pub const TOOLS_CALL: &str = "tools/call";

/// A read-only view of an MCP request, plus access to its per-call extensions.
///
/// Implemented for [`jsonrpc::Request`] here and for rmcp's `ClientRequest` in
/// `toolwarden-rmcp`. Layers never parse JSON themselves: they read a request
/// through this trait.
pub trait McpRequest {
    /// The JSON-RPC method, e.g. `tools/call` or `tools/list`.
    fn method(&self) -> &str;

    /// The tool name of a `tools/call`; `None` for every other method.
    fn tool_name(&self) -> Option<&str>;

    /// The arguments object of a `tools/call`, when present.
    fn arguments(&self) -> Option<&Map<String, Value>>;

    /// Whether this `tools/call` continues an earlier one (2026-07-28
    /// `inputResponses` or `requestState` in its params). Continuations are
    /// never served from a cache.
    fn is_continuation(&self) -> bool;

    /// The JSON-RPC id, where the request type carries one.
    fn request_id(&self) -> Option<&Id> {
        None
    }

    /// The params, shared, where the request type keeps them so (the
    /// JSON-RPC [`Request`](jsonrpc::Request) does): a layer that needs the
    /// tool name or arguments after the call has gone on keeps this pointer
    /// instead of a copy, and reads them back from its `name` and
    /// `arguments` members. A type must return params of that shape, the
    /// ones [`tool_name`](Self::tool_name) and
    /// [`arguments`](Self::arguments) read, or `None` (then the layer copies
    /// what it needs).
    fn shared_params(&self) -> Option<std::sync::Arc<Value>> {
        None
    }

    /// Gives the request another JSON-RPC id (the retry layer gives each
    /// attempt its own: MCP forbids reusing an id within a session). Types
    /// without ids, whose transport numbers requests itself (rmcp's
    /// `ClientRequest`), ignore it.
    fn set_request_id(&mut self, _id: Id) {}

    /// The session or principal this request belongs to; usually the
    /// [`SessionKey`] extension a transport or the proxy inserted.
    fn session_key(&self) -> Option<&str>;

    /// Whether this is a `tools/call`.
    fn is_tool_call(&self) -> bool {
        self.method() == TOOLS_CALL
    }

    /// The name layers key and label this request by: the tool name of a
    /// `tools/call`, else the method.
    fn target(&self) -> &str {
        self.tool_name().unwrap_or_else(|| self.method())
    }

    /// Reads a per-call fact stored by an earlier layer.
    fn extension<T: Send + Sync + 'static>(&self) -> Option<&T>
    where
        Self: Sized;

    /// Stores a per-call fact for later layers.
    fn insert_extension<T: Clone + Send + Sync + 'static>(&mut self, value: T)
    where
        Self: Sized;
}

/// A session or principal key, stored in a request's extensions by whoever
/// knows it (the proxy puts the MCP session id here).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionKey(pub std::sync::Arc<str>);

impl SessionKey {
    /// The key as a string.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for SessionKey {
    fn from(s: &str) -> Self {
        SessionKey(s.into())
    }
}

/// The attempt number of the current call (1 for the first try), stored by
/// the retry layer so that observability can label each attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt(pub u32);

/// Returns the request's argument fingerprint, computing it at most once per
/// call: the first layer that needs it stores it in the request's extensions
/// and every later layer reads it from there. `None` for non-tool requests.
///
/// ```
/// use toolwarden_core::{call_fingerprint, jsonrpc::Request};
/// let mut req = Request::tool_call(1, "search", serde_json::json!({"q": "x"}));
/// let a = call_fingerprint(&mut req).unwrap();
/// assert_eq!(call_fingerprint(&mut req), Some(a)); // read back, not recomputed
/// ```
pub fn call_fingerprint<R: McpRequest>(request: &mut R) -> Option<Fingerprint> {
    if let Some(fp) = request.extension::<Fingerprint>() {
        return Some(*fp);
    }
    let tool = request.tool_name()?;
    let fp = fingerprint(tool, request.arguments());
    request.insert_extension(fp);
    Some(fp)
}

/// Whether `method` is `tools/call`: ten bytes compared as one array
/// (inlined), every layer asks it of every request.
#[inline]
fn is_tools_call(method: &str) -> bool {
    <[u8; 10]>::try_from(method.as_bytes()).is_ok_and(|m| &m == b"tools/call")
}

/// `map[key]`. The objects of a call (its params, a content item) have a
/// handful of members: a walk comparing lengths first beats the tree's
/// ordered search, which compares bytes at every step.
#[inline]
pub(crate) fn member<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    if map.len() <= 8 {
        map.iter().find_map(|(k, v)| (k == key).then_some(v))
    } else {
        map.get(key)
    }
}

impl McpRequest for jsonrpc::Request {
    fn method(&self) -> &str {
        &self.method
    }

    fn tool_name(&self) -> Option<&str> {
        if !is_tools_call(&self.method) {
            return None;
        }
        self.param_facts().0
    }

    fn arguments(&self) -> Option<&Map<String, Value>> {
        if !is_tools_call(&self.method) {
            return None;
        }
        member(self.params_object()?, "arguments")?.as_object()
    }

    fn is_continuation(&self) -> bool {
        self.param_facts().1
    }

    fn request_id(&self) -> Option<&Id> {
        Some(&self.id)
    }

    fn shared_params(&self) -> Option<std::sync::Arc<Value>> {
        self.params.clone()
    }

    fn set_request_id(&mut self, id: Id) {
        self.id = id;
    }

    fn session_key(&self) -> Option<&str> {
        self.extension::<SessionKey>().map(SessionKey::as_str)
    }

    /// The layers' own facts ([`Fingerprint`], [`Attempt`], [`SessionKey`])
    /// from their inline slots, else from [`extensions`](jsonrpc::Request::extensions)
    /// (where a caller may have put them directly).
    fn extension<T: Send + Sync + 'static>(&self) -> Option<&T> {
        match self.slot::<T>() {
            Some(Some(value)) => Some(value),
            _ => self.extensions.get::<T>(),
        }
    }

    /// The layers' own facts go to their inline slots (no allocation),
    /// anything else to [`extensions`](jsonrpc::Request::extensions).
    fn insert_extension<T: Clone + Send + Sync + 'static>(&mut self, value: T) {
        match self.slot_mut::<T>() {
            Some(slot) => *slot = Some(value),
            None => {
                self.extensions.insert(value);
            }
        }
    }
}

/// A JSON-RPC error as seen through [`McpResponse::rpc_error`].
#[derive(Debug, Clone, Copy)]
pub struct RpcErrorRef<'a> {
    /// The error code.
    pub code: i64,
    /// The error message.
    pub message: &'a str,
    /// The error data.
    pub data: Option<&'a Value>,
}

/// What a `tools/call` result says of itself ([`McpResponse::tool_result_status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolResultStatus {
    /// `resultType: "input_required"` (2026-07-28): the server asks for more
    /// input; not a failure.
    InputRequired,
    /// A task the server created for the call ([`McpResponse::is_task`]):
    /// the call was accepted, its result comes later. Not a failure, and
    /// not a result to keep for anyone else (the task is its creator's).
    Task,
    /// `isError: true` with an
    /// [`OUTCOME_META_KEY`](crate::classify::OUTCOME_META_KEY) mark: a
    /// failure a toolwarden layer below rendered as a result, whose
    /// outcome the mark records (the classifier checks its seal).
    Rendered,
    /// `isError: true`.
    Error,
    /// No content, or content that is only `null`, `{}`, `[]` or whitespace,
    /// and no structured content ([`McpResponse::is_empty_tool_result`]).
    Empty,
    /// Anything else.
    Data,
}

/// A read view of an MCP response, plus the few edits the layers make
/// (building a tool result from a rejection, marking a cached result stale).
pub trait McpResponse {
    /// The JSON-RPC error, if the response is one.
    fn rpc_error(&self) -> Option<RpcErrorRef<'_>>;

    /// Whether the result is a tool result with `isError: true`.
    fn is_tool_error(&self) -> bool;

    /// Whether the result is an empty tool result: no content, or content
    /// that is only `null`, `{}`, `[]` or whitespace, and no structured content.
    fn is_empty_tool_result(&self) -> bool;

    /// Whether the result asks for more input (2026-07-28
    /// `resultType: "input_required"`); that is not a failure.
    fn is_input_required(&self) -> bool;

    /// Whether the result is a task the server created for the call
    /// (`resultType: "task"`, or a 2025-11-25 `CreateTaskResult`): its id is
    /// its creator's, so the answer is not one to hand to another caller.
    /// The default: never.
    fn is_task(&self) -> bool {
        false
    }

    /// A member of the result's `_meta` object. The default has none: a
    /// type that cannot carry `_meta` cannot carry a rendered outcome
    /// either, so its rendered failures are classified by their text.
    fn result_meta(&self, _key: &str) -> Option<&Value> {
        None
    }

    /// The questions above in one answer, in the order the classifier
    /// asks them: input required, else a tool error (a rendered failure
    /// when it carries an
    /// [`OUTCOME_META_KEY`](crate::classify::OUTCOME_META_KEY) mark), else
    /// empty, else a result with data ([`ToolResultStatus::Data`], also for
    /// a JSON-RPC error). The default asks the methods one by one; a type
    /// that can answer in one pass over the result overrides it (the
    /// JSON-RPC response does: one walk over the result's members instead
    /// of several map lookups).
    fn tool_result_status(&self) -> ToolResultStatus {
        if self.is_input_required() {
            ToolResultStatus::InputRequired
        } else if self.is_task() {
            ToolResultStatus::Task
        } else if self.is_tool_error() {
            match self.result_meta(crate::classify::OUTCOME_META_KEY) {
                Some(_) => ToolResultStatus::Rendered,
                None => ToolResultStatus::Error,
            }
        } else if self.is_empty_tool_result() {
            ToolResultStatus::Empty
        } else {
            ToolResultStatus::Data
        }
    }

    /// The text of the first text content item, used to classify tool errors.
    fn first_text(&self) -> Option<Cow<'_, str>>;

    /// Builds a response carrying a `tools/call` result (a JSON object with
    /// `content`, `isError`, ...), answering the request with `id`.
    fn from_tool_result(id: Option<&Id>, result: Value) -> Self
    where
        Self: Sized;

    /// Re-addresses a response to another request (a cached answer served
    /// to a new call). Types without ids ignore it.
    fn set_request_id(&mut self, _id: &Id) {}

    /// The mark a sharing classifier left on this response when it found it
    /// a success ([`McpClassifier::share_outcomes`](crate::McpClassifier::share_outcomes)).
    /// The default keeps none.
    fn success_key(&self) -> Option<crate::classify::SuccessKey> {
        None
    }

    /// Whether a sharing classifier marked this response a `tools/call`
    /// success ([`SuccessKey::is_tool_call`](crate::classify::SuccessKey::is_tool_call)):
    /// then it is neither an `isError` result, an input-required one nor a
    /// task (the standard classifier judges those two a success but leaves
    /// no mark on them), and the layers that would look for either
    /// need not read the result again.
    fn marked_tool_call_success(&self) -> bool {
        self.success_key()
            .is_some_and(crate::classify::SuccessKey::is_tool_call)
    }

    /// Leaves (or removes) that mark; see [`success_key`](Self::success_key).
    /// A type that keeps one must remove it on every edit below. The default
    /// does nothing.
    fn set_success_key(&mut self, _key: Option<crate::classify::SuccessKey>) {}

    /// Inserts `key: value` into the result's `_meta` object.
    fn insert_result_meta(&mut self, key: &str, value: Value);

    /// Removes `key` from the result's `_meta` object (and `_meta` when it
    /// is left empty). The edge removes the sealed outcome mark this way, so
    /// the seal never leaves the process. The default does nothing.
    fn remove_result_meta(&mut self, _key: &str) {}

    /// Appends a text content item to a tool result.
    fn push_text(&mut self, text: String);

    /// An estimate of the response's size in bytes, for bounding caches.
    fn size_hint(&self) -> usize;
}

impl McpResponse for jsonrpc::Response {
    fn rpc_error(&self) -> Option<RpcErrorRef<'_>> {
        self.payload.as_ref().err().map(|e| RpcErrorRef {
            code: e.code,
            message: &e.message,
            data: e.data.as_ref(),
        })
    }

    fn is_tool_error(&self) -> bool {
        tool_result::is_error(self.payload.as_ref().ok())
    }

    fn is_empty_tool_result(&self) -> bool {
        self.payload.as_ref().is_ok_and(tool_result::is_empty)
    }

    fn is_input_required(&self) -> bool {
        self.payload
            .as_ref()
            .is_ok_and(|r| r.get("resultType").and_then(Value::as_str) == Some("input_required"))
    }

    fn is_task(&self) -> bool {
        self.payload.as_ref().is_ok_and(|r| {
            r.get("resultType").and_then(Value::as_str) == Some("task")
                || r.get("task").and_then(|t| t.get("taskId")).is_some()
        })
    }

    fn tool_result_status(&self) -> ToolResultStatus {
        self.payload
            .as_ref()
            .map_or(ToolResultStatus::Data, tool_result::status)
    }

    fn first_text(&self) -> Option<Cow<'_, str>> {
        tool_result::first_text(self.payload.as_ref().ok()?).map(Cow::Borrowed)
    }

    fn result_meta(&self, key: &str) -> Option<&Value> {
        self.payload.as_ref().ok()?.get("_meta")?.get(key)
    }

    fn from_tool_result(id: Option<&Id>, result: Value) -> Self {
        jsonrpc::Response::result(id.cloned().unwrap_or_default(), result)
    }

    fn set_request_id(&mut self, id: &Id) {
        // Most answers carry the id already: no copy of a string id then.
        if self.id != *id {
            self.id = id.clone();
        }
    }

    fn success_key(&self) -> Option<crate::classify::SuccessKey> {
        jsonrpc::Response::success_key(self)
    }

    fn set_success_key(&mut self, key: Option<crate::classify::SuccessKey>) {
        jsonrpc::Response::set_success_key(self, key);
    }

    fn insert_result_meta(&mut self, key: &str, value: Value) {
        jsonrpc::Response::set_success_key(self, None);
        if let Ok(Value::Object(result)) = &mut self.payload {
            tool_result::insert_meta(result, key, value);
        }
    }

    fn remove_result_meta(&mut self, key: &str) {
        jsonrpc::Response::set_success_key(self, None);
        if let Ok(Value::Object(result)) = &mut self.payload {
            tool_result::remove_meta(result, key);
        }
    }

    fn push_text(&mut self, text: String) {
        jsonrpc::Response::set_success_key(self, None);
        if let Ok(Value::Object(result)) = &mut self.payload {
            tool_result::push_text(result, text);
        }
    }

    fn size_hint(&self) -> usize {
        match &self.payload {
            Ok(v) => tool_result::approximate_size(v),
            Err(e) => e.message.len() + e.data.as_ref().map_or(0, tool_result::approximate_size),
        }
    }
}

/// Helpers over a `tools/call` result held as JSON (`CallToolResult` shape).
pub mod tool_result {
    use serde_json::{json, Map, Value};

    use super::ToolResultStatus;

    /// Whether `result` has `isError: true`.
    pub fn is_error(result: Option<&Value>) -> bool {
        result
            .and_then(|r| r.get("isError"))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    /// Whether `result` is empty: no content (or only `null`, `{}`, `[]` and
    /// whitespace texts) and no structured content.
    #[must_use]
    pub fn is_empty(result: &Value) -> bool {
        let Some(obj) = result.as_object() else {
            return is_blank_value(result);
        };
        is_empty_parts(obj.get("content"), obj.get("structuredContent"))
    }

    /// [`McpResponse::tool_result_status`](super::McpResponse::tool_result_status)
    /// of a result held as JSON, in one walk over its members.
    #[must_use]
    pub fn status(result: &Value) -> ToolResultStatus {
        let Some(obj) = result.as_object() else {
            return if is_blank_value(result) {
                ToolResultStatus::Empty
            } else {
                ToolResultStatus::Data
            };
        };
        let (mut error, mut content, mut structured, mut meta) = (false, None, None, None);
        let mut task = false;
        for (key, value) in obj {
            match key.as_str() {
                "resultType" if value.as_str() == Some("input_required") => {
                    return ToolResultStatus::InputRequired;
                }
                "resultType" if value.as_str() == Some("task") => task = true,
                // A 2025-11-25 `CreateTaskResult`.
                "task" => task |= value.get("taskId").is_some(),
                "isError" => error = value.as_bool() == Some(true),
                "content" => content = Some(value),
                "structuredContent" => structured = Some(value),
                "_meta" => meta = Some(value),
                _ => {}
            }
        }
        if task {
            ToolResultStatus::Task
        } else if error {
            match meta.and_then(|m| m.get(crate::classify::OUTCOME_META_KEY)) {
                Some(_) => ToolResultStatus::Rendered,
                None => ToolResultStatus::Error,
            }
        } else if is_empty_parts(content, structured) {
            ToolResultStatus::Empty
        } else {
            ToolResultStatus::Data
        }
    }

    /// Whether a result with these `content` and `structuredContent` members
    /// is empty (see [`is_empty`]).
    fn is_empty_parts(content: Option<&Value>, structured: Option<&Value>) -> bool {
        if structured.is_some_and(|s| !is_blank_value(s)) {
            return false;
        }
        match content {
            None => true,
            Some(Value::Array(items)) => {
                items
                    .iter()
                    .all(|item| match field(item, "type").and_then(Value::as_str) {
                        Some("text") => field(item, "text")
                            .and_then(Value::as_str)
                            .is_none_or(is_blank_text),
                        // images, audio, resources and links carry data
                        Some(_) => false,
                        None => is_blank_value(item),
                    })
            }
            Some(other) => is_blank_value(other),
        }
    }

    /// `value[key]` of an object value (see [`member`](super::member)).
    fn field<'a>(value: &'a Value, key: &str) -> Option<&'a Value> {
        super::member(value.as_object()?, key)
    }

    pub(crate) fn is_blank_text(text: &str) -> bool {
        // Most texts are answers: longer than the longest blank form and
        // with a printable ASCII character at each end, which no trim can
        // change. Only the others are trimmed (Unicode whitespace).
        let bytes = text.as_bytes();
        if let (true, Some(first), Some(last)) = (bytes.len() > 4, bytes.first(), bytes.last()) {
            if first.is_ascii_graphic() && last.is_ascii_graphic() {
                return false;
            }
        }
        matches!(text.trim(), "" | "null" | "{}" | "[]")
    }

    fn is_blank_value(value: &Value) -> bool {
        match value {
            Value::Null => true,
            Value::Object(o) => o.is_empty(),
            Value::Array(a) => a.is_empty(),
            Value::String(s) => is_blank_text(s),
            _ => false,
        }
    }

    /// The first text content item of `result`.
    #[must_use]
    pub fn first_text(result: &Value) -> Option<&str> {
        result
            .get("content")?
            .as_array()?
            .iter()
            .find_map(|item| field(item, "text").and_then(Value::as_str))
    }

    /// Inserts `key: value` into `result._meta`, creating it when needed.
    pub fn insert_meta(result: &mut Map<String, Value>, key: &str, value: Value) {
        let meta = result
            .entry("_meta")
            .or_insert_with(|| Value::Object(Map::new()));
        if !meta.is_object() {
            *meta = Value::Object(Map::new());
        }
        if let Value::Object(meta) = meta {
            meta.insert(key.to_owned(), value);
        }
    }

    /// Removes `key` from `result._meta`, and `_meta` when it is left empty.
    pub fn remove_meta(result: &mut Map<String, Value>, key: &str) {
        let Some(Value::Object(meta)) = result.get_mut("_meta") else {
            return;
        };
        if meta.remove(key).is_some() && meta.is_empty() {
            result.remove("_meta");
        }
    }

    /// Appends a text content item.
    pub fn push_text(result: &mut Map<String, Value>, text: String) {
        let content = result
            .entry("content")
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(items) = content {
            items.push(json!({"type": "text", "text": text}));
        }
    }

    /// A cheap estimate of the serialised size of `value` in bytes.
    pub fn approximate_size(value: &Value) -> usize {
        match value {
            Value::Null | Value::Bool(_) => 5,
            Value::Number(_) => 12,
            Value::String(s) => s.len() + 2,
            Value::Array(a) => 2 + a.iter().map(approximate_size).sum::<usize>() + a.len(),
            Value::Object(o) => {
                2 + o
                    .iter()
                    .map(|(k, v)| k.len() + 4 + approximate_size(v))
                    .sum::<usize>()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Map};

    proptest! {
        /// The fast path of `is_blank_text` answers as the trim would, for
        /// any text: ASCII or not, whitespace of any kind at either end.
        #[test]
        fn a_blank_text_is_what_its_trim_says(
            text in "[ \t\n\u{3000}\u{a0}]{0,2}(null|\\{\\}|\\[\\]|[a-z{}\\[\\] é]{0,6})[ \t\n\u{3000}\u{a0}]{0,2}"
        ) {
            let trimmed = matches!(text.trim(), "" | "null" | "{}" | "[]");
            prop_assert_eq!(tool_result::is_blank_text(&text), trimmed, "{:?}", text);
        }
    }

    #[test]
    fn reads_a_tool_call() {
        let mut req = jsonrpc::Request::tool_call(1, "search", json!({"q": "tower"}));
        assert_eq!(req.method(), "tools/call");
        assert_eq!(req.tool_name(), Some("search"));
        assert_eq!(req.target(), "search");
        assert_eq!(req.arguments().unwrap()["q"], "tower");
        assert!(!req.is_continuation());
        assert_eq!(req.session_key(), None);
        req.insert_extension(SessionKey::from("s1"));
        assert_eq!(req.session_key(), Some("s1"));
    }

    #[test]
    fn other_methods_have_no_tool() {
        let req = jsonrpc::Request::new(1, "tools/list", Some(json!({"name": "x"})));
        assert_eq!(req.tool_name(), None);
        assert_eq!(req.target(), "tools/list");
        assert!(req.arguments().is_none());
    }

    #[test]
    fn continuations_are_recognised() {
        let req = jsonrpc::Request::new(
            1,
            TOOLS_CALL,
            Some(json!({"name": "x", "arguments": {}, "requestState": "abc"})),
        );
        assert!(req.is_continuation());
    }

    #[test]
    fn the_tool_name_follows_edited_params() {
        let mut req = jsonrpc::Request::tool_call(1, "search", json!({"q": "x"}));
        assert_eq!(req.tool_name(), Some("search"));
        assert!(!req.is_continuation());
        // Edited in place: the facts read before hold the params' Arc, so
        // this copies them, and the name is read from the copy.
        let params = req.params.as_mut().unwrap();
        std::sync::Arc::make_mut(params)["name"] = json!("fetch");
        std::sync::Arc::make_mut(params)["requestState"] = json!("s");
        assert_eq!(req.tool_name(), Some("fetch"));
        assert!(req.is_continuation());
        // Replaced.
        req.params = Some(std::sync::Arc::new(json!({"name": "list"})));
        assert_eq!(req.tool_name(), Some("list"));
        assert!(!req.is_continuation());
        // A clone reads the same facts.
        assert_eq!(req.clone().tool_name(), Some("list"));
        req.params = None;
        assert_eq!(req.tool_name(), None);
    }

    #[test]
    fn fingerprint_is_cached_in_extensions() {
        let mut req = jsonrpc::Request::tool_call(1, "search", json!({"q": "x"}));
        let fp = call_fingerprint(&mut req).unwrap();
        // Changing the arguments afterwards proves the second read is the stored fact.
        req.params = Some(std::sync::Arc::new(
            json!({"name": "search", "arguments": {"q": "y"}}),
        ));
        assert_eq!(call_fingerprint(&mut req), Some(fp));
    }

    #[test]
    fn empty_results() {
        for empty in [
            json!({}),
            json!({"content": []}),
            json!({"content": [{"type": "text", "text": "  "}]}),
            json!({"content": [{"type": "text", "text": "null"}, {"type": "text", "text": "{}"}]}),
            json!({"content": [{"type": "text", "text": "[]"}], "structuredContent": {}}),
        ] {
            assert!(tool_result::is_empty(&empty), "{empty}");
        }
        for full in [
            json!({"content": [{"type": "text", "text": "0"}]}),
            json!({"content": [], "structuredContent": {"a": 1}}),
            json!({"content": [{"type": "image", "data": "", "mimeType": "image/png"}]}),
        ] {
            assert!(!tool_result::is_empty(&full), "{full}");
        }
    }

    /// Tool-result-like JSON: the members the status reads, with values of
    /// every shape that matters (blank and non-blank texts, other item
    /// types, non-boolean `isError`), extra members, and non-objects.
    fn result_like() -> impl Strategy<Value = Value> {
        let text = prop_oneof![
            Just(""),
            Just("  "),
            Just("null"),
            Just("{}"),
            Just("[]"),
            Just("0"),
            Just("3 results"),
        ];
        let item = prop_oneof![
            text.clone()
                .prop_map(|t| json!({"type": "text", "text": t})),
            Just(json!({"type": "text"})),
            Just(json!({"type": "text", "text": 5})),
            Just(json!({"type": "image", "data": "", "mimeType": "image/png"})),
            Just(json!({"text": "x"})),
            Just(json!({})),
            Just(json!(null)),
            Just(json!([])),
            text.clone().prop_map(|t| json!(t)),
        ];
        let blankish = prop_oneof![
            Just(json!(null)),
            Just(json!({})),
            Just(json!([])),
            Just(json!("")),
            Just(json!({"a": 1})),
            Just(json!([0])),
            Just(json!(7)),
            Just(json!(" x ")),
        ];
        let content = prop_oneof![
            proptest::collection::vec(item, 0..4).prop_map(Value::Array),
            blankish.clone(),
        ];
        let result_type = prop_oneof![
            Just(json!("input_required")),
            Just(json!("complete")),
            Just(json!("task")),
            Just(json!(1)),
        ];
        let task = prop_oneof![
            Just(json!({"taskId": "t-1", "status": "working"})),
            Just(json!({"taskId": null})),
            Just(json!({"status": "working"})),
            Just(json!("t-1")),
        ];
        let is_error = prop_oneof![
            Just(json!(true)),
            Just(json!(false)),
            Just(json!("true")),
            Just(json!(null)),
        ];
        let object = (
            proptest::option::of(content),
            proptest::option::of(blankish.clone()),
            proptest::option::of(result_type),
            proptest::option::of(is_error),
            proptest::option::of(blankish.clone()),
            proptest::option::of(task),
        )
            .prop_map(
                |(content, structured, result_type, is_error, extra, task)| {
                    let mut m = Map::new();
                    for (k, v) in [
                        ("content", content),
                        ("structuredContent", structured),
                        ("resultType", result_type),
                        ("isError", is_error),
                        ("_meta", extra),
                        ("task", task),
                    ] {
                        if let Some(v) = v {
                            m.insert(k.to_owned(), v);
                        }
                    }
                    Value::Object(m)
                },
            );
        prop_oneof![4 => object, 1 => blankish]
    }

    proptest! {
        /// The one-pass status of a JSON-RPC response gives the answer of
        /// the three per-question methods it replaces in the classifier.
        #[test]
        fn the_one_pass_status_agrees_with_the_three_questions(result in result_like()) {
            let response = jsonrpc::Response::result(Id::Number(1), result.clone());
            let asked = if response.is_input_required() {
                ToolResultStatus::InputRequired
            } else if response.is_task() {
                ToolResultStatus::Task
            } else if response.is_tool_error() {
                ToolResultStatus::Error
            } else if response.is_empty_tool_result() {
                ToolResultStatus::Empty
            } else {
                ToolResultStatus::Data
            };
            prop_assert_eq!(response.tool_result_status(), asked, "{}", result);
        }
    }

    #[test]
    fn status_of_typical_results() {
        let status = |v: Value| jsonrpc::Response::result(Id::Number(1), v).tool_result_status();
        assert_eq!(
            status(json!({"content": [{"type": "text", "text": "ok"}], "isError": false})),
            ToolResultStatus::Data
        );
        assert_eq!(
            status(json!({"content": [{"type": "text", "text": "no"}], "isError": true})),
            ToolResultStatus::Error
        );
        assert_eq!(status(json!({"content": []})), ToolResultStatus::Empty);
        assert_eq!(
            status(json!({"resultType": "input_required", "isError": true})),
            ToolResultStatus::InputRequired
        );
        let error =
            jsonrpc::Response::error(Id::Number(1), jsonrpc::ErrorObject::new(-32603, "internal"));
        assert_eq!(error.tool_result_status(), ToolResultStatus::Data);
        // A task, 2026-07-28 and 2025-11-25: no content, yet not empty.
        assert_eq!(
            status(json!({"resultType": "task", "task": {"taskId": "t-1"}})),
            ToolResultStatus::Task
        );
        assert_eq!(
            status(json!({"task": {"taskId": "t-1", "status": "working"}})),
            ToolResultStatus::Task
        );
    }

    #[test]
    fn marks_and_readdresses_a_result() {
        let mut resp = jsonrpc::Response::result(Id::Number(1), json!({"content": []}));
        resp.insert_result_meta("toolwarden/stale", json!({"ageSeconds": 3}));
        resp.push_text("note".into());
        resp.set_request_id(&Id::Number(9));
        assert_eq!(resp.id, Id::Number(9));
        let v = resp.payload.unwrap();
        assert_eq!(v["_meta"]["toolwarden/stale"]["ageSeconds"], 3);
        assert_eq!(v["content"][0]["text"], "note");
    }
}
