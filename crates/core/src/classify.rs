//! Outcome classification: one judgement of a call's result that every layer
//! shares.
//!
//! A [`Classify`] implementation turns a call's `Result<Response, Error>` into
//! an [`Outcome`]: what happened ([`OutcomeKind`]), how to treat it as a
//! failure ([`FailureClass`]) and any retry-after hint. [`McpClassifier`] is
//! the default and follows this table:
//!
//! | outcome | kind | class |
//! |---|---|---|
//! | result, not `isError`, not empty | `Success` | — |
//! | `resultType: "input_required"` | `Success` | — |
//! | `isError: true` | `ToolError` | by its text (below) |
//! | empty `tools/call` result | `ToolError` | `Server` (configurable) |
//! | JSON-RPC error | `ProtocolError` | by code (below) |
//! | transport closed, io error | `Transport` | `Transient` |
//! | timeout | `Timeout` | `Transient` |
//! | HTTP 429, 502, 503, 504 | `Transport` | `Transient`, reads `Retry-After` |
//! | HTTP 500 / other 5xx / other 4xx | `Transport` | `Server` / `Server` / `Client` |
//! | a toolwarden rejection | `Rejected` | `Transient`; never counted against the tool |
//! | any other error | `Transport` | `Server` |
//!
//! JSON-RPC codes: -32700, -32600, -32601, -32602, -32002, -32042 and
//! -32020..=-32022 are `Client`; -32603 is `Server`; -32019..=-32000 and
//! -32023 (rate limited, `data` may carry the hint) are `Transient`; any other
//! code is `Server`.
//!
//! `isError` texts: an `MCP error -NNNNN` prefix classifies by code; else text
//! naming a rate limit, timeout, temporary unavailability or connection reset
//! is `Transient`; text saying not found, unknown tool, invalid, validation,
//! missing required or schema is `Client`; anything else is `Server`.

use std::error::Error as StdError;
use std::time::Duration;

use serde_json::Value;

use crate::jsonrpc::{code, ErrorObject};
use crate::rejection::as_rejection;
use crate::request::McpResponse;

/// How a failure should be treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum FailureClass {
    /// May succeed if tried again later: rate limits, timeouts, dropped connections.
    Transient,
    /// The server failed; counts against it and may be retried if safe.
    Server,
    /// The request was wrong; trying again cannot help and the server is not to blame.
    Client,
}

impl FailureClass {
    /// A short lower-case label.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::Transient => "transient",
            FailureClass::Server => "server",
            FailureClass::Client => "client",
        }
    }
}

/// What happened to a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum OutcomeKind {
    /// A result that is not an error.
    Success,
    /// A tool result with `isError: true`, or an empty tool result.
    ToolError,
    /// A JSON-RPC error response.
    ProtocolError,
    /// The transport failed (closed, io error, HTTP error status, unknown error).
    Transport,
    /// The call timed out.
    Timeout,
    /// A toolwarden layer refused the call.
    Rejected,
}

impl OutcomeKind {
    /// A short lower-case label, used as the `outcome` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeKind::Success => "success",
            OutcomeKind::ToolError => "tool_error",
            OutcomeKind::ProtocolError => "protocol_error",
            OutcomeKind::Transport => "transport",
            OutcomeKind::Timeout => "timeout",
            OutcomeKind::Rejected => "rejected",
        }
    }
}

/// The classified outcome of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// What happened.
    pub kind: OutcomeKind,
    /// How to treat it as a failure; `None` on success.
    pub class: Option<FailureClass>,
    /// A retry-after hint found in the result or error.
    pub retry_after: Option<Duration>,
    /// The JSON-RPC error code, when there was one (also from `MCP error -N` texts).
    pub code: Option<i64>,
    /// Whether the failure is known to have happened before the request
    /// left (connection refused): then retrying is safe for any tool.
    pub before_sent: bool,
}

impl Outcome {
    /// A success.
    pub const SUCCESS: Outcome = Outcome {
        kind: OutcomeKind::Success,
        class: None,
        retry_after: None,
        code: None,
        before_sent: false,
    };

    /// A failure of `kind` and `class`.
    pub fn failure(kind: OutcomeKind, class: FailureClass) -> Self {
        Outcome {
            kind,
            class: Some(class),
            retry_after: None,
            code: None,
            before_sent: false,
        }
    }

    fn with_retry_after(mut self, retry_after: Option<Duration>) -> Self {
        self.retry_after = retry_after;
        self
    }

    fn with_code(mut self, code: i64) -> Self {
        self.code = Some(code);
        self
    }

    /// Whether the call succeeded.
    pub fn is_success(&self) -> bool {
        self.kind == OutcomeKind::Success
    }

    /// Whether the tool (or server) is to blame: a `Transient` or `Server`
    /// failure that no toolwarden layer produced. Circuit breakers count only these.
    pub fn is_counted_failure(&self) -> bool {
        self.kind != OutcomeKind::Rejected
            && matches!(
                self.class,
                Some(FailureClass::Transient | FailureClass::Server)
            )
    }

    /// Whether a toolwarden layer refused the call.
    pub fn is_rejection(&self) -> bool {
        self.kind == OutcomeKind::Rejected
    }

    /// The OpenTelemetry `error.type` of the outcome: `None` on success.
    pub fn error_type(&self) -> Option<&'static str> {
        (!self.is_success()).then(|| self.kind.as_str())
    }
}

/// Whether a call is a `tools/call` (whose empty results are failures) or
/// any other request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    /// A `tools/call`.
    ToolCall,
    /// Any other request.
    Other,
}

/// Turns a call's result into an [`Outcome`]. Implement it to replace the
/// default MCP table; every layer of a stack should share one classifier.
pub trait Classify<Resp>: Clone + Send + Sync + 'static {
    /// Classifies a response.
    fn classify_response(&self, kind: CallKind, response: &Resp) -> Outcome;

    /// Classifies an error returned by the inner service.
    fn classify_error(&self, error: &(dyn StdError + 'static)) -> Outcome;

    /// Classifies a whole result.
    fn classify<E>(&self, kind: CallKind, result: Result<&Resp, &E>) -> Outcome
    where
        E: AsRef<dyn StdError + Send + Sync + 'static>,
    {
        match result {
            Ok(response) => self.classify_response(kind, response),
            Err(error) => self.classify_error(error.as_ref()),
        }
    }
}

/// The default classifier: the MCP table in the [module docs](self).
#[derive(Debug, Clone, Copy)]
pub struct McpClassifier {
    empty_result: Option<FailureClass>,
}

impl Default for McpClassifier {
    fn default() -> Self {
        McpClassifier {
            empty_result: Some(FailureClass::Server),
        }
    }
}

impl McpClassifier {
    /// The default classifier.
    pub fn new() -> Self {
        Self::default()
    }

    /// How to classify an empty `tools/call` result: a failure of `class`,
    /// or a success with `None`. Default: `Some(FailureClass::Server)`.
    pub fn empty_result(mut self, class: Option<FailureClass>) -> Self {
        self.empty_result = class;
        self
    }
}

impl<Resp: McpResponse> Classify<Resp> for McpClassifier {
    fn classify_response(&self, kind: CallKind, response: &Resp) -> Outcome {
        if let Some(err) = response.rpc_error() {
            return classify_rpc_error(err.code, err.data);
        }
        if kind != CallKind::ToolCall || response.is_input_required() {
            return Outcome::SUCCESS;
        }
        if response.is_tool_error() {
            let text = response.first_text();
            return classify_error_text(text.as_deref().unwrap_or(""));
        }
        if response.is_empty_tool_result() {
            if let Some(class) = self.empty_result {
                return Outcome::failure(OutcomeKind::ToolError, class);
            }
        }
        Outcome::SUCCESS
    }

    fn classify_error(&self, error: &(dyn StdError + 'static)) -> Outcome {
        classify_error_chain(error)
    }
}

/// Classifies a JSON-RPC error code (with its `data`, for a retry-after hint).
pub fn classify_rpc_error(code: i64, data: Option<&Value>) -> Outcome {
    let class = class_of_code(code);
    let retry_after = if code == code::RATE_LIMITED {
        data.and_then(retry_after_from_data)
    } else {
        None
    };
    Outcome::failure(OutcomeKind::ProtocolError, class)
        .with_code(code)
        .with_retry_after(retry_after)
}

/// The failure class of a JSON-RPC error code.
pub fn class_of_code(c: i64) -> FailureClass {
    match c {
        code::PARSE_ERROR
        | code::INVALID_REQUEST
        | code::METHOD_NOT_FOUND
        | code::INVALID_PARAMS
        | code::RESOURCE_NOT_FOUND
        | code::URL_ELICITATION_REQUIRED
        | code::UNSUPPORTED_PROTOCOL_VERSION..=code::HEADER_MISMATCH => FailureClass::Client,
        code::RATE_LIMITED => FailureClass::Transient,
        code::SERVER_ERROR_START..=code::SERVER_ERROR_END => FailureClass::Transient,
        _ => FailureClass::Server,
    }
}

/// Reads a retry-after hint from JSON-RPC error data: `retryAfter` or
/// `retry_after` in seconds, or `retryAfterMs` in milliseconds; a bare number
/// is seconds.
pub fn retry_after_from_data(data: &Value) -> Option<Duration> {
    let secs = |v: &Value| v.as_f64().filter(|s| s.is_finite() && *s >= 0.0);
    if let Some(s) = secs(data) {
        return Some(Duration::from_secs_f64(s));
    }
    let obj = data.as_object()?;
    if let Some(ms) = obj.get("retryAfterMs").and_then(secs) {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    obj.get("retryAfter")
        .or_else(|| obj.get("retry_after"))
        .and_then(secs)
        .map(Duration::from_secs_f64)
}

const TRANSIENT_TEXT: &[&str] = &[
    "rate limit",
    "rate-limit",
    "ratelimit",
    "too many requests",
    "timeout",
    "timed out",
    "temporarily unavailable",
    "service unavailable",
    "connection reset",
    "connection closed",
    "try again",
];

const CLIENT_TEXT: &[&str] = &[
    "not found",
    "unknown tool",
    "invalid",
    "validation",
    "missing required",
    "schema",
    "bad request",
];

/// Classifies the text of an `isError` tool result.
///
/// ```
/// use toolwarden_core::classify::{classify_error_text, FailureClass};
/// assert_eq!(classify_error_text("MCP error -32602: Tool nope not found").class, Some(FailureClass::Client));
/// assert_eq!(classify_error_text("Upstream rate limit exceeded").class, Some(FailureClass::Transient));
/// assert_eq!(classify_error_text("Error executing tool x: boom").class, Some(FailureClass::Server));
/// ```
pub fn classify_error_text(text: &str) -> Outcome {
    if let Some(code) = mcp_error_code(text) {
        let mut outcome = classify_rpc_error(code, None);
        outcome.kind = OutcomeKind::ToolError;
        return outcome;
    }
    let class = if TRANSIENT_TEXT.iter().any(|p| contains_ignore_case(text, p)) {
        FailureClass::Transient
    } else if CLIENT_TEXT.iter().any(|p| contains_ignore_case(text, p)) {
        FailureClass::Client
    } else {
        FailureClass::Server
    };
    Outcome::failure(OutcomeKind::ToolError, class)
}

/// Reads the code of an `MCP error -NNNNN` text (the TypeScript SDK's form).
fn mcp_error_code(text: &str) -> Option<i64> {
    let start = find_ignore_case(text, "mcp error ")? + "mcp error ".len();
    let rest = &text[start..];
    let end = rest
        .char_indices()
        .find(|&(i, c)| !(c.is_ascii_digit() || (i == 0 && c == '-')))
        .map_or(rest.len(), |(i, _)| i);
    rest[..end].parse().ok()
}

fn find_ignore_case(haystack: &str, needle: &str) -> Option<usize> {
    let (h, n) = (haystack.as_bytes(), needle.as_bytes());
    if n.len() > h.len() {
        return None;
    }
    (0..=h.len() - n.len()).find(|&i| h[i..i + n.len()].eq_ignore_ascii_case(n))
}

fn contains_ignore_case(haystack: &str, needle: &str) -> bool {
    find_ignore_case(haystack, needle).is_some()
}

/// A transport failure, for services that speak MCP over some connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportError {
    /// What went wrong.
    pub kind: TransportErrorKind,
    /// Details for humans.
    pub message: String,
}

/// The kinds of [`TransportError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportErrorKind {
    /// The connection could not be made: the request never left, so
    /// retrying is safe for any tool.
    ConnectFailed,
    /// The connection closed before the response arrived.
    Closed,
    /// Some other I/O failure.
    Io,
}

impl TransportError {
    /// A transport error of `kind`.
    pub fn new(kind: TransportErrorKind, message: impl Into<String>) -> Self {
        TransportError {
            kind,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for TransportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.kind {
            TransportErrorKind::ConnectFailed => "could not connect",
            TransportErrorKind::Closed => "connection closed",
            TransportErrorKind::Io => "transport error",
        };
        write!(f, "{what}: {}", self.message)
    }
}

impl StdError for TransportError {}

/// A timeout of the call, for services that enforce their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallTimedOut {
    /// How long the call waited.
    pub after: Duration,
}

impl std::fmt::Display for CallTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "call timed out after {:?}", self.after)
    }
}

impl StdError for CallTimedOut {}

/// An HTTP error status seen by an HTTP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpStatusError {
    /// The status code.
    pub status: u16,
    /// The `Retry-After` header, when present.
    pub retry_after: Option<Duration>,
}

impl std::fmt::Display for HttpStatusError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTP status {}", self.status)
    }
}

impl StdError for HttpStatusError {}

/// Classifies an error by walking its source chain for a type it knows.
pub fn classify_error_chain(error: &(dyn StdError + 'static)) -> Outcome {
    let mut current = Some(error);
    while let Some(err) = current {
        if let Some(outcome) = classify_known_error(err) {
            return outcome;
        }
        current = err.source();
    }
    Outcome::failure(OutcomeKind::Transport, FailureClass::Server)
}

fn classify_known_error(err: &(dyn StdError + 'static)) -> Option<Outcome> {
    if let Some(rejection) = as_rejection(err) {
        return Some(
            Outcome::failure(OutcomeKind::Rejected, FailureClass::Transient)
                .with_retry_after(rejection.retry_after()),
        );
    }
    if let Some(e) = err.downcast_ref::<ErrorObject>() {
        return Some(classify_rpc_error(e.code, e.data.as_ref()));
    }
    if let Some(e) = err.downcast_ref::<TransportError>() {
        let mut outcome = Outcome::failure(OutcomeKind::Transport, FailureClass::Transient);
        outcome.before_sent = e.kind == TransportErrorKind::ConnectFailed;
        return Some(outcome);
    }
    if let Some(e) = err.downcast_ref::<std::io::Error>() {
        use std::io::ErrorKind::*;
        let mut outcome = Outcome::failure(OutcomeKind::Transport, FailureClass::Transient);
        outcome.before_sent = matches!(e.kind(), ConnectionRefused | AddrNotAvailable);
        if e.kind() == TimedOut {
            outcome.kind = OutcomeKind::Timeout;
        }
        return Some(outcome);
    }
    if err.is::<CallTimedOut>()
        || err.is::<tokio::time::error::Elapsed>()
        || err.is::<tower::timeout::error::Elapsed>()
    {
        return Some(Outcome::failure(
            OutcomeKind::Timeout,
            FailureClass::Transient,
        ));
    }
    if let Some(e) = err.downcast_ref::<HttpStatusError>() {
        let class = match e.status {
            429 | 502 | 503 | 504 => FailureClass::Transient,
            400..=499 => FailureClass::Client,
            _ => FailureClass::Server,
        };
        return Some(
            Outcome::failure(OutcomeKind::Transport, class).with_retry_after(e.retry_after),
        );
    }
    None
}
