//! JSON-RPC 2.0 message types for raw transports and the proxy.
//!
//! These are deliberately thin: `params`, `result` and `error.data` stay
//! [`serde_json::Value`]s, and every request carries an [`Extensions`] map so
//! layers can store per-call facts (see [`McpRequest::extension`](crate::McpRequest::extension)).
//!
//! A [`Request`] is cheap to clone, as the retry layer does for each
//! attempt: its params are shared ([`Arc`]), its method is usually a
//! `&'static str`, and the facts the layers themselves store on every call
//! (the [`Fingerprint`], the [`Attempt`], the [`SessionKey`]) live in slots
//! of the request, not in the extensions map, which stays empty (and
//! unallocated) on the standard stack's happy path.

use std::any::{Any, TypeId};
use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use crate::{Attempt, Fingerprint, SessionKey};

use http::Extensions;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use smol_str::SmolStr;

/// The JSON-RPC protocol version string every message carries.
pub const JSONRPC_VERSION: &str = "2.0";

/// JSON-RPC error codes used by MCP (see the table in the crate docs).
pub mod code {
    /// Invalid JSON was received.
    pub const PARSE_ERROR: i64 = -32700;
    /// The JSON sent is not a valid request object.
    pub const INVALID_REQUEST: i64 = -32600;
    /// The method does not exist or is not available.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// Invalid method parameters (MCP servers also use it for an unknown tool).
    pub const INVALID_PARAMS: i64 = -32602;
    /// Internal JSON-RPC error.
    pub const INTERNAL_ERROR: i64 = -32603;
    /// Start of the implementation-defined server error range.
    pub const SERVER_ERROR_START: i64 = -32019;
    /// End of the implementation-defined server error range (the TypeScript SDK's "connection closed").
    pub const SERVER_ERROR_END: i64 = -32000;
    /// The TypeScript SDK's own request timeout.
    pub const REQUEST_TIMEOUT: i64 = -32001;
    /// Resource not found.
    pub const RESOURCE_NOT_FOUND: i64 = -32002;
    /// Header mismatch (2026-07-28).
    pub const HEADER_MISMATCH: i64 = -32020;
    /// Missing client capability (2026-07-28).
    pub const MISSING_CLIENT_CAPABILITY: i64 = -32021;
    /// Unsupported protocol version (2026-07-28).
    pub const UNSUPPORTED_PROTOCOL_VERSION: i64 = -32022;
    /// Rate limited (proposed); `data` may carry a retry-after hint.
    pub const RATE_LIMITED: i64 = -32023;
    /// URL elicitation required.
    pub const URL_ELICITATION_REQUIRED: i64 = -32042;
}

/// A JSON-RPC request id: a number or a string (or `null` on error responses
/// to messages whose id could not be read).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(untagged)]
pub enum Id {
    /// A numeric id.
    Number(i64),
    /// A string id.
    String(String),
    /// No id could be determined.
    #[default]
    Null,
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Id::Number(n) => write!(f, "{n}"),
            Id::String(s) => write!(f, "{s:?}"),
            Id::Null => f.write_str("null"),
        }
    }
}

impl From<i64> for Id {
    fn from(n: i64) -> Self {
        Id::Number(n)
    }
}

impl From<&str> for Id {
    fn from(s: &str) -> Self {
        Id::String(s.to_owned())
    }
}

/// A JSON-RPC request: a method call that expects exactly one response.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// The request id, echoed by the response.
    pub id: Id,
    /// The method name, e.g. `tools/call`.
    pub method: Cow<'static, str>,
    /// The parameters, usually an object; shared, so that a clone of the
    /// request (a retry's, a cache's) copies a pointer, not the tree. Edit
    /// them with [`Arc::make_mut`].
    pub params: Option<Arc<Value>>,
    /// Per-call data shared between layers; never serialised.
    pub extensions: Extensions,
    /// The per-call facts of the layers' own types, kept inline (see the
    /// [module docs](self)); read and written through
    /// [`McpRequest::extension`](crate::McpRequest::extension) and
    /// [`McpRequest::insert_extension`](crate::McpRequest::insert_extension).
    facts: InlineFacts,
}

/// The slots of [`Request`] for the facts every call of the standard stack
/// stores: no allocation, and copied with the request for free.
#[derive(Debug, Clone, Default)]
struct InlineFacts {
    fingerprint: Option<Fingerprint>,
    attempt: Option<Attempt>,
    session: Option<SessionKey>,
    /// What the params say of the call, read when the request is made
    /// (see [`ParamFacts`]); behind a pointer, because requests are moved
    /// and copied into every layer's future.
    params: Option<Arc<ParamFacts>>,
}

/// What a request's params say, found in one pass over their members when
/// the request is made (six layers ask for the tool name of every call).
///
/// The facts keep a clone of the params' `Arc`. That keeps them right
/// without watching the public `params` field: while the clone lives, the
/// params cannot be edited in place (`Arc::make_mut` copies them, and
/// `Arc::get_mut` refuses), and params replaced or copied that way are
/// another allocation, so a pointer comparison tells whether the facts are
/// still the params'. When they are not, the request reads its params
/// again on every ask.
struct ParamFacts {
    params: Arc<Value>,
    tool: Option<SmolStr>,
    continuation: bool,
}

impl fmt::Debug for ParamFacts {
    /// The facts, not the params a second time.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParamFacts")
            .field("tool", &self.tool)
            .field("continuation", &self.continuation)
            .finish_non_exhaustive()
    }
}

impl ParamFacts {
    fn read(params: &Arc<Value>) -> Self {
        let (tool, continuation) = read_params(params);
        ParamFacts {
            params: Arc::clone(params),
            tool: tool.map(SmolStr::new),
            continuation,
        }
    }
}

/// The tool name and whether the params carry a continuation (an MRTR
/// retry's `inputResponses` or `requestState`): one walk over the members.
fn read_params(params: &Value) -> (Option<&str>, bool) {
    let Some(obj) = params.as_object() else {
        return (None, false);
    };
    let (mut tool, mut continuation) = (None, false);
    for (key, value) in obj {
        match key.as_str() {
            "name" => tool = value.as_str(),
            "inputResponses" | "requestState" => continuation = true,
            _ => {}
        }
    }
    (tool, continuation)
}

impl Request {
    /// A request with the given id, method and params.
    pub fn new(
        id: impl Into<Id>,
        method: impl Into<Cow<'static, str>>,
        params: Option<Value>,
    ) -> Self {
        let params = params.map(Arc::new);
        Request {
            id: id.into(),
            method: method.into(),
            extensions: Extensions::new(),
            facts: InlineFacts {
                params: params.as_ref().map(|p| Arc::new(ParamFacts::read(p))),
                ..InlineFacts::default()
            },
            params,
        }
    }

    /// The inline slot for facts of type `T`, if `T` has one.
    pub(crate) fn slot<T: 'static>(&self) -> Option<&Option<T>> {
        let slot: &dyn Any = if TypeId::of::<T>() == TypeId::of::<Fingerprint>() {
            &self.facts.fingerprint
        } else if TypeId::of::<T>() == TypeId::of::<Attempt>() {
            &self.facts.attempt
        } else if TypeId::of::<T>() == TypeId::of::<SessionKey>() {
            &self.facts.session
        } else {
            return None;
        };
        slot.downcast_ref::<Option<T>>()
    }

    /// The inline slot for facts of type `T`, if `T` has one, to write.
    pub(crate) fn slot_mut<T: 'static>(&mut self) -> Option<&mut Option<T>> {
        let slot: &mut dyn Any = if TypeId::of::<T>() == TypeId::of::<Fingerprint>() {
            &mut self.facts.fingerprint
        } else if TypeId::of::<T>() == TypeId::of::<Attempt>() {
            &mut self.facts.attempt
        } else if TypeId::of::<T>() == TypeId::of::<SessionKey>() {
            &mut self.facts.session
        } else {
            return None;
        };
        slot.downcast_mut::<Option<T>>()
    }

    /// A `tools/call` request for `tool` with `arguments`.
    ///
    /// ```
    /// use toolwarden_core::{jsonrpc::Request, McpRequest};
    /// let req = Request::tool_call(1, "search", serde_json::json!({"q": "tower"}));
    /// assert_eq!(req.tool_name(), Some("search"));
    /// ```
    pub fn tool_call(id: impl Into<Id>, tool: &str, arguments: Value) -> Self {
        let mut params = Map::new();
        params.insert("name".into(), Value::String(tool.to_owned()));
        params.insert("arguments".into(), arguments);
        Request::new(id, crate::TOOLS_CALL, Some(Value::Object(params)))
    }

    /// The params as an object, if they are one.
    pub fn params_object(&self) -> Option<&Map<String, Value>> {
        self.params.as_deref().and_then(Value::as_object)
    }

    /// The `name` member of the params and whether they carry a
    /// continuation: read when the request was made, and read again on
    /// every ask once its params were replaced or edited (see
    /// [`ParamFacts`]).
    #[inline]
    pub(crate) fn param_facts(&self) -> (Option<&str>, bool) {
        let Some(params) = &self.params else {
            return (None, false);
        };
        match &self.facts.params {
            Some(facts) if Arc::ptr_eq(&facts.params, params) => {
                (facts.tool.as_deref(), facts.continuation)
            }
            _ => read_params(params),
        }
    }

    /// Serialises the request to its wire form.
    #[must_use]
    pub fn to_value(&self) -> Value {
        let mut obj = Map::new();
        obj.insert("jsonrpc".into(), Value::from(JSONRPC_VERSION));
        obj.insert("id".into(), id_value(&self.id));
        obj.insert("method".into(), Value::from(self.method.as_ref()));
        if let Some(params) = &self.params {
            obj.insert("params".into(), Value::clone(params));
        }
        Value::Object(obj)
    }
}

/// A JSON-RPC notification: a message without an id that gets no response.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    /// The method name, e.g. `notifications/cancelled`.
    pub method: String,
    /// The parameters.
    pub params: Option<Value>,
}

impl Notification {
    /// Serialises the notification to its wire form.
    #[must_use]
    pub fn to_value(&self) -> Value {
        let mut obj = Map::new();
        obj.insert("jsonrpc".into(), Value::from(JSONRPC_VERSION));
        obj.insert("method".into(), Value::from(self.method.as_str()));
        if let Some(params) = &self.params {
            obj.insert("params".into(), params.clone());
        }
        Value::Object(obj)
    }
}

/// The error object of a JSON-RPC error response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorObject {
    /// The error code (see [`code`]).
    pub code: i64,
    /// A short description.
    pub message: String,
    /// Additional data, e.g. a retry-after hint for [`code::RATE_LIMITED`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl ErrorObject {
    /// An error object without data.
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        ErrorObject {
            code,
            message: message.into(),
            data: None,
        }
    }
}

impl fmt::Display for ErrorObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JSON-RPC error {}: {}", self.code, self.message)
    }
}

impl std::error::Error for ErrorObject {}

/// A JSON-RPC response: a result or an error for one request id.
#[derive(Debug, Clone)]
pub struct Response {
    /// The id of the request this answers.
    pub id: Id,
    /// The result, or the error.
    pub payload: Result<Value, ErrorObject>,
    /// The mark a sharing classifier left on this response when it found
    /// it a success (see
    /// [`McpClassifier::share_outcomes`](crate::classify::McpClassifier::share_outcomes)),
    /// so that the layers above it do not classify it again. Removed by
    /// every edit made through [`McpResponse`](crate::McpResponse); never
    /// serialised, never compared.
    success: Option<crate::classify::SuccessKey>,
}

impl PartialEq for Response {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id && self.payload == other.payload
    }
}

impl Response {
    /// A successful response.
    #[must_use]
    pub fn result(id: Id, result: Value) -> Self {
        Response {
            id,
            payload: Ok(result),
            success: None,
        }
    }

    /// An error response.
    #[must_use]
    pub fn error(id: Id, error: ErrorObject) -> Self {
        Response {
            id,
            payload: Err(error),
            success: None,
        }
    }

    /// The mark a sharing classifier left on this response, if it found it
    /// a success.
    #[must_use]
    pub fn success_key(&self) -> Option<crate::classify::SuccessKey> {
        self.success
    }

    /// Leaves (or, with `None`, removes) that mark. Only classifiers should
    /// leave one; whoever edits the payload must remove it.
    pub fn set_success_key(&mut self, key: Option<crate::classify::SuccessKey>) {
        self.success = key;
    }

    /// Serialises the response to its wire form.
    #[must_use]
    pub fn to_value(&self) -> Value {
        let mut obj = Map::new();
        obj.insert("jsonrpc".into(), Value::from(JSONRPC_VERSION));
        obj.insert("id".into(), id_value(&self.id));
        match &self.payload {
            Ok(result) => obj.insert("result".into(), result.clone()),
            Err(error) => obj.insert(
                "error".into(),
                serde_json::to_value(error).unwrap_or(Value::Null),
            ),
        };
        Value::Object(obj)
    }
}

fn id_value(id: &Id) -> Value {
    match id {
        Id::Number(n) => Value::from(*n),
        Id::String(s) => Value::from(s.as_str()),
        Id::Null => Value::Null,
    }
}

/// Any JSON-RPC message.
#[derive(Debug, Clone)]
pub enum Message {
    /// A request.
    Request(Request),
    /// A notification.
    Notification(Notification),
    /// A response.
    Response(Response),
}

/// Why a message could not be read; carries the error response to send back.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageError {
    /// The id of the offending request, when it could be read.
    pub id: Id,
    /// The error to answer with: [`code::PARSE_ERROR`] or [`code::INVALID_REQUEST`].
    pub error: ErrorObject,
}

impl MessageError {
    fn parse(detail: impl fmt::Display) -> Self {
        MessageError {
            id: Id::Null,
            error: ErrorObject::new(code::PARSE_ERROR, format!("Parse error: {detail}")),
        }
    }

    fn invalid(id: Id, detail: &str) -> Self {
        MessageError {
            id,
            error: ErrorObject::new(code::INVALID_REQUEST, format!("Invalid Request: {detail}")),
        }
    }

    /// The error response to send back.
    #[must_use]
    pub fn to_response(&self) -> Response {
        Response::error(self.id.clone(), self.error.clone())
    }
}

impl fmt::Display for MessageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for MessageError {}

impl Message {
    /// Reads one message from its wire bytes.
    ///
    /// Invalid JSON yields a [`code::PARSE_ERROR`]; valid JSON that is not a
    /// JSON-RPC 2.0 message yields [`code::INVALID_REQUEST`] with the id when
    /// one could be read. Never panics.
    ///
    /// ```
    /// use toolwarden_core::jsonrpc::{code, Message};
    /// let err = Message::parse(b"{not json").unwrap_err();
    /// assert_eq!(err.error.code, code::PARSE_ERROR);
    /// let err = Message::parse(br#"{"jsonrpc":"2.0","id":7}"#).unwrap_err();
    /// assert_eq!(err.error.code, code::INVALID_REQUEST);
    /// ```
    pub fn parse(bytes: &[u8]) -> Result<Message, MessageError> {
        let value: Value = serde_json::from_slice(bytes).map_err(MessageError::parse)?;
        Message::from_value(value)
    }

    /// Reads one message from a parsed JSON value (see [`Message::parse`]).
    pub fn from_value(value: Value) -> Result<Message, MessageError> {
        let Value::Object(mut obj) = value else {
            return Err(MessageError::invalid(Id::Null, "not an object"));
        };
        let id = match obj.remove("id") {
            None => None,
            Some(Value::Number(n)) => match n.as_i64() {
                Some(n) => Some(Id::Number(n)),
                None => return Err(MessageError::invalid(Id::Null, "id is not an integer")),
            },
            Some(Value::String(s)) => Some(Id::String(s)),
            Some(Value::Null) => Some(Id::Null),
            Some(_) => {
                return Err(MessageError::invalid(
                    Id::Null,
                    "id is not a string or number",
                ))
            }
        };
        let err_id = id.clone().unwrap_or(Id::Null);
        if obj.get("jsonrpc").and_then(Value::as_str) != Some(JSONRPC_VERSION) {
            return Err(MessageError::invalid(err_id, "jsonrpc must be \"2.0\""));
        }
        let params = obj.remove("params");
        if let Some(p) = &params {
            if !(p.is_object() || p.is_array()) {
                return Err(MessageError::invalid(
                    err_id,
                    "params must be an object or array",
                ));
            }
        }
        match obj.remove("method") {
            Some(Value::String(method)) => Ok(match id {
                Some(id) => Message::Request(Request::new(id, method, params)),
                None => Message::Notification(Notification { method, params }),
            }),
            Some(_) => Err(MessageError::invalid(err_id, "method is not a string")),
            None => {
                let Some(id) = id else {
                    return Err(MessageError::invalid(Id::Null, "no method and no id"));
                };
                match (obj.remove("result"), obj.remove("error")) {
                    (Some(result), None) => Ok(Message::Response(Response::result(id, result))),
                    (None, Some(error)) => match serde_json::from_value::<ErrorObject>(error) {
                        Ok(error) => Ok(Message::Response(Response::error(id, error))),
                        Err(_) => Err(MessageError::invalid(id, "malformed error object")),
                    },
                    _ => Err(MessageError::invalid(
                        id,
                        "a response needs exactly one of result and error",
                    )),
                }
            }
        }
    }

    /// Serialises the message to its wire form.
    #[must_use]
    pub fn to_value(&self) -> Value {
        match self {
            Message::Request(r) => r.to_value(),
            Message::Notification(n) => n.to_value(),
            Message::Response(r) => r.to_value(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_every_kind() {
        let m = Message::parse(br#"{"jsonrpc":"2.0","id":"a","method":"tools/list"}"#).unwrap();
        assert!(
            matches!(m, Message::Request(ref r) if r.id == Id::from("a") && r.method == "tools/list")
        );
        let m = Message::parse(
            br#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":1}}"#,
        )
        .unwrap();
        assert!(matches!(m, Message::Notification(ref n) if n.method == "notifications/cancelled"));
        let m = Message::parse(br#"{"jsonrpc":"2.0","id":1,"result":{}}"#).unwrap();
        assert!(matches!(m, Message::Response(ref r) if r.payload == Ok(json!({}))));
        let m =
            Message::parse(br#"{"jsonrpc":"2.0","id":1,"error":{"code":-32602,"message":"x"}}"#)
                .unwrap();
        assert!(
            matches!(m, Message::Response(ref r) if r.payload.as_ref().unwrap_err().code == -32602)
        );
    }

    #[test]
    fn malformed_messages_get_the_right_code_and_id() {
        for (bytes, code, id) in [
            (&b""[..], code::PARSE_ERROR, Id::Null),
            (b"[1,2", code::PARSE_ERROR, Id::Null),
            (b"42", code::INVALID_REQUEST, Id::Null),
            (
                br#"{"id":3,"method":"x"}"#,
                code::INVALID_REQUEST,
                Id::Number(3),
            ),
            (
                br#"{"jsonrpc":"1.0","id":3,"method":"x"}"#,
                code::INVALID_REQUEST,
                Id::Number(3),
            ),
            (
                br#"{"jsonrpc":"2.0","id":3,"method":7}"#,
                code::INVALID_REQUEST,
                Id::Number(3),
            ),
            (
                br#"{"jsonrpc":"2.0","id":{},"method":"x"}"#,
                code::INVALID_REQUEST,
                Id::Null,
            ),
            (
                br#"{"jsonrpc":"2.0","id":3,"method":"x","params":5}"#,
                code::INVALID_REQUEST,
                Id::Number(3),
            ),
            (
                br#"{"jsonrpc":"2.0","id":3,"result":1,"error":{"code":1,"message":""}}"#,
                code::INVALID_REQUEST,
                Id::Number(3),
            ),
            (br#"{"jsonrpc":"2.0"}"#, code::INVALID_REQUEST, Id::Null),
        ] {
            let err = Message::parse(bytes).unwrap_err();
            assert_eq!(err.error.code, code, "{}", String::from_utf8_lossy(bytes));
            assert_eq!(err.id, id, "{}", String::from_utf8_lossy(bytes));
        }
    }

    #[test]
    fn round_trips_through_the_wire_form() {
        let req = Request::tool_call(5, "echo", json!({"message": "hi"}));
        let back = Message::from_value(req.to_value()).unwrap();
        let Message::Request(back) = back else {
            panic!("not a request")
        };
        assert_eq!(back.id, Id::Number(5));
        assert_eq!(back.params, req.params);
        let resp = Response::error(Id::from("x"), ErrorObject::new(-32603, "boom"));
        let Message::Response(back) = Message::from_value(resp.to_value()).unwrap() else {
            panic!()
        };
        assert_eq!(back, resp);
    }
}
