//! Reading newline-delimited JSON-RPC from the downstream client.
//!
//! rmcp's own stdio codec drops lines that are not JSON (no `-32700`) and
//! answers other malformed messages with `id: null`, which leaves a client
//! waiting forever for the answer to its request. So the proxy reads stdin
//! itself:
//!
//! - [`LineReader`] splits the byte stream into lines, never holding more than
//!   `max_line_bytes` of one: a longer line is dropped (up to its newline)
//!   and reported as [`RawLine::TooLong`], with its first bytes kept so that
//!   the request id can still be found.
//! - [`classify_line`] turns one line into a [`Frame`]: a message for rmcp,
//!   an error response to write back at once (`-32700` parse error, `-32600`
//!   invalid request, `-32602` invalid params, with the request's id whenever
//!   it can be read), or nothing (blank lines, malformed notifications and
//!   responses, which JSON-RPC never answers).
//!
//! Every non-blank line that is not a valid message gets exactly one answer,
//! unless it is recognisably a notification or a response (JSON-RPC forbids
//! answering those). Nothing here panics on any input: a property test feeds
//! arbitrary and mutated byte strings, and `fuzz/` has a cargo-fuzz target.
//!
//! ```
//! use toolwarden_proxy::downstream::framer::{classify_line, Frame};
//! let Frame::Reply(line) = classify_line(b"{not json") else { panic!() };
//! let reply: serde_json::Value = serde_json::from_str(&line).unwrap();
//! assert_eq!(reply["error"]["code"], -32700);
//! assert_eq!(reply["id"], serde_json::Value::Null);
//!
//! let Frame::Reply(line) = classify_line(br#"{"jsonrpc":"1.0","id":7,"method":"ping"}"#) else { panic!() };
//! let reply: serde_json::Value = serde_json::from_str(&line).unwrap();
//! assert_eq!((reply["error"]["code"].as_i64(), reply["id"].as_i64()), (Some(-32600), Some(7)));
//!
//! assert!(matches!(classify_line(br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#), Frame::Message(_)));
//! ```

use std::future::Future as _;

use rmcp::model::{ClientJsonRpcMessage, ClientNotification, ClientRequest};
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt};
use toolwarden_core::jsonrpc::{code, ErrorObject, Id, Message, Response, JSONRPC_VERSION};

/// How many leading bytes of an over-long line are kept to find its id.
pub const TOO_LONG_PREFIX: usize = 64 * 1024;

/// The default bound on one line: 4 MiB.
pub const DEFAULT_MAX_LINE_BYTES: usize = 4 * 1024 * 1024;

/// One line read by [`LineReader`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawLine {
    /// A complete line, without its `\n`.
    Line(Vec<u8>),
    /// A line longer than the bound, dropped; `prefix` holds its first
    /// [`TOO_LONG_PREFIX`] bytes.
    TooLong {
        /// The first bytes of the line.
        prefix: Vec<u8>,
    },
}

/// Splits a byte stream into lines of at most `max_line_bytes`, holding no
/// more than that (plus the reader's buffer) in memory whatever the input.
#[derive(Debug)]
pub struct LineReader<R> {
    reader: R,
    max_line_bytes: usize,
    line: Vec<u8>,
    discarding: bool,
}

impl<R: AsyncBufRead + Unpin> LineReader<R> {
    /// A reader with the given bound on one line (at least 1).
    pub fn new(reader: R, max_line_bytes: usize) -> Self {
        LineReader {
            reader,
            max_line_bytes: max_line_bytes.max(1),
            line: Vec::new(),
            discarding: false,
        }
    }

    /// The next line; `None` at the end of the stream. A last line without a
    /// newline is still a line.
    ///
    /// Cancel-safe: bytes are consumed from the reader only together with
    /// their copy into the pending line.
    pub async fn next_line(&mut self) -> std::io::Result<Option<RawLine>> {
        loop {
            let available = self.reader.fill_buf().await?;
            if available.is_empty() {
                // End of stream: whatever is pending is the last line.
                if self.discarding {
                    self.discarding = false;
                    return Ok(Some(self.take_too_long()));
                }
                if self.line.is_empty() {
                    return Ok(None);
                }
                return Ok(Some(RawLine::Line(std::mem::take(&mut self.line))));
            }
            let newline = available.iter().position(|&b| b == b'\n');
            let take = newline.unwrap_or(available.len());
            if self.discarding {
                let keep = TOO_LONG_PREFIX.saturating_sub(self.line.len()).min(take);
                self.line.extend_from_slice(&available[..keep]);
            } else if self.line.len() + take > self.max_line_bytes {
                let keep = TOO_LONG_PREFIX.saturating_sub(self.line.len()).min(take);
                self.line.truncate(TOO_LONG_PREFIX);
                self.line.extend_from_slice(&available[..keep]);
                self.discarding = true;
            } else {
                self.line.extend_from_slice(&available[..take]);
            }
            let consumed = newline.map_or(take, |i| i + 1);
            self.reader.consume(consumed);
            if newline.is_some() {
                if self.discarding {
                    self.discarding = false;
                    return Ok(Some(self.take_too_long()));
                }
                return Ok(Some(RawLine::Line(std::mem::take(&mut self.line))));
            }
        }
    }

    fn take_too_long(&mut self) -> RawLine {
        let mut prefix = std::mem::take(&mut self.line);
        prefix.truncate(TOO_LONG_PREFIX);
        RawLine::TooLong { prefix }
    }

    /// The bound on one line.
    pub fn max_line_bytes(&self) -> usize {
        self.max_line_bytes
    }
}

/// What to do with one line.
#[derive(Debug)]
pub enum Frame {
    /// A valid message, for rmcp.
    Message(Box<ClientJsonRpcMessage>),
    /// An error response to write back (one JSON line, without its `\n`).
    Reply(String),
    /// Nothing: a blank line, or a malformed notification or response.
    Ignore(&'static str),
}

/// Serialises an error response as one line.
#[must_use]
pub fn error_line(id: &Id, error: ErrorObject) -> String {
    Response::error(id.clone(), error).to_value().to_string()
}

/// `line` without a trailing `\r` and a leading UTF-8 byte-order mark, as
/// every message is read (a line over stdio, a body over HTTP).
pub(crate) fn trim_line(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line)
}

/// Classifies one line (see the [module docs](self)).
pub fn classify_line(line: &[u8]) -> Frame {
    let line = trim_line(line);
    if line.iter().all(u8::is_ascii_whitespace) {
        return Frame::Ignore("blank line");
    }
    let message = match Message::parse(line) {
        Ok(message) => message,
        Err(e) => return Frame::Reply(error_line(&e.id, e.error)),
    };
    // The core parser accepts `"id": null` on a request; JSON-RPC does not.
    if let Message::Request(request) = &message {
        if request.id == Id::Null {
            return Frame::Reply(error_line(
                &Id::Null,
                ErrorObject::new(
                    code::INVALID_REQUEST,
                    "Invalid Request: id must be a string or an integer",
                ),
            ));
        }
    }
    match serde_json::from_slice::<ClientJsonRpcMessage>(line) {
        // rmcp reads a known method whose params do not fit as a custom one.
        Ok(ClientJsonRpcMessage::Request(request)) if matches!(&request.request, ClientRequest::CustomRequest(c) if is_mcp_method(&c.method)) => {
            unfit_request(&request_id(&request.id), request.request.method(), None)
        }
        Ok(ClientJsonRpcMessage::Notification(notification)) if matches!(&notification.notification, ClientNotification::CustomNotification(c) if is_mcp_method(&c.method)) => {
            Frame::Ignore("malformed notification")
        }
        Ok(decoded) => Frame::Message(Box::new(decoded)),
        Err(e) => match message {
            // The method is known but the params do not fit it.
            Message::Request(request) => unfit_request(&request.id, &request.method, Some(&e)),
            Message::Notification(_) => Frame::Ignore("malformed notification"),
            Message::Response(_) => Frame::Ignore("malformed response"),
        },
    }
}

/// The answer to a request naming one of MCP's methods that rmcp could
/// not read: `-32602` for its params (`why`, when known), or `-32600` when
/// the method is a notification's (a notification has no id).
fn unfit_request(id: &Id, method: &str, why: Option<&dyn std::fmt::Display>) -> Frame {
    let error = if method.starts_with("notifications/") {
        ErrorObject::new(
            code::INVALID_REQUEST,
            format!("Invalid Request: {method} is a notification: send it without an id"),
        )
    } else {
        let message = match why {
            Some(why) => format!("Invalid params for {method}: {why}"),
            None => format!("Invalid params for {method}"),
        };
        ErrorObject::new(code::INVALID_PARAMS, message)
    };
    Frame::Reply(error_line(id, error))
}

/// What the HTTP guard needs to know of a message it hands to rmcp (which
/// reads the body itself): whether it is a request, with which id, and
/// whether it opens a session.
#[derive(Debug, Clone, PartialEq)]
pub enum Checked {
    /// A request: its id, and whether it is an `initialize`.
    Request {
        /// The request's id.
        id: Id,
        /// Whether the method is `initialize`.
        initialize: bool,
    },
    /// A notification or a response.
    Other,
}

/// Why [`check_message`] keeps a message from rmcp: as [`Frame::Reply`]
/// and [`Frame::Ignore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unfit {
    /// Answer with this error response.
    Reply(String),
    /// Answer nothing (a blank line, a malformed notification or response).
    Ignore(&'static str),
}

/// Checks one message as [`classify_line`] does, for the HTTP guard: `Ok`
/// for a message to hand to rmcp, `Err` with what to answer otherwise.
///
/// [`classify_line`] reads every message twice, with the core's parser and
/// with rmcp's models, and over HTTP rmcp then reads it a third time: rmcp's
/// reading of a `tools/call` took about 2.2 µs of the 3.2 µs, a few percent
/// of the proxy's CPU per call. A `tools/call` of the plain shape is known
/// well-formed from one pass over its JSON: top-level members only
/// `jsonrpc` ("2.0"), `id` (a string or an integer), `method` and `params`;
/// params with only `name` (a string), `arguments` (an object, or absent)
/// and `_meta` (an object, or absent), each member at most once, which
/// rmcp always reads as a tool call. Anything else takes [`classify_line`]'s path, so the answers are
/// the same either way (a property test holds the two to it).
///
/// ```
/// use toolwarden_core::jsonrpc::Id;
/// use toolwarden_proxy::downstream::framer::{check_message, Checked};
/// let call = br#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"echo","arguments":{}}}"#;
/// assert_eq!(
///     check_message(call).ok(),
///     Some(Checked::Request { id: Id::Number(3), initialize: false })
/// );
/// assert!(check_message(br#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":7}}"#).is_err());
/// ```
pub fn check_message(line: &[u8]) -> Result<Checked, Unfit> {
    if let Some(id) = plain_tool_call(trim_line(line)) {
        return Ok(Checked::Request {
            id,
            initialize: false,
        });
    }
    check_message_by_framer(line)
}

/// [`check_message`] without its fast path: [`classify_line`]'s verdict,
/// for every message. The reference [`check_message`] is held to (its
/// property test and the `check` fuzz target compare the two).
pub fn check_message_by_framer(line: &[u8]) -> Result<Checked, Unfit> {
    match classify_line(line) {
        Frame::Message(message) => Ok(match *message {
            ClientJsonRpcMessage::Request(request) => Checked::Request {
                initialize: matches!(request.request, ClientRequest::InitializeRequest(_)),
                id: request_id(&request.id),
            },
            _ => Checked::Other,
        }),
        Frame::Reply(line) => Err(Unfit::Reply(line)),
        Frame::Ignore(why) => Err(Unfit::Ignore(why)),
    }
}

/// The id of `line` when it is a `tools/call` of the plain shape (see
/// [`check_message`]); `None` for anything else, however valid.
///
/// Read into [`PlainCall`], whose derived reader refuses a member
/// missing, unknown or given twice, as [`classify_line`] does: a
/// [`Value`] keeps the last of two members, and let such a call through
/// over HTTP that stdio refuses. The objects in `arguments` and `_meta`
/// are read whole, so that their strings are checked as rmcp checks them
/// (a lone surrogate is refused; skipping them would not see it).
fn plain_tool_call(line: &[u8]) -> Option<Id> {
    // serde reads a struct from an array too (by position): a message or
    // params that are an array are no plain call.
    if line.trim_ascii_start().first() != Some(&b'{') {
        return None;
    }
    let call: PlainCall<'_> = serde_json::from_slice(line).ok()?;
    (call.jsonrpc == JSONRPC_VERSION && call.method == "tools/call").then_some(call.id.0)
}

/// A `tools/call` of the plain shape (see [`check_message`]).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PlainCall<'a> {
    #[serde(borrow)]
    jsonrpc: std::borrow::Cow<'a, str>,
    id: PlainId,
    #[serde(borrow)]
    method: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    #[allow(dead_code)] // read for its shape: the reader checks every member
    params: ObjectOnly<PlainParams<'a>>,
}

/// `T` read from a JSON object only: a derived `Deserialize` takes an
/// array too, by position (`"params": ["echo"]` read as the name `echo`),
/// which rmcp then refused with a bare 415.
struct ObjectOnly<T>(#[allow(dead_code)] T);

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for ObjectOnly<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<T>(std::marker::PhantomData<T>);
        impl<'de, T: serde::Deserialize<'de>> serde::de::Visitor<'de> for Visitor<T> {
            type Value = ObjectOnly<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(ObjectOnly)
            }
        }
        deserializer.deserialize_map(Visitor(std::marker::PhantomData))
    }
}

/// The params of a [`PlainCall`]: `name`, and `arguments` and `_meta`
/// when they are objects (`null` is left to [`classify_line`]).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // read for its shape: the reader checks every member
struct PlainParams<'a> {
    #[serde(borrow)]
    name: std::borrow::Cow<'a, str>,
    #[serde(default)]
    arguments: serde_json::Map<String, Value>,
    #[serde(rename = "_meta", default)]
    meta: serde_json::Map<String, Value>,
}

/// A request id that is a string or an integer in `i64`'s range;
/// anything else (a float, `-0`, a larger integer) is left to
/// [`classify_line`].
struct PlainId(Id);

impl<'de> serde::Deserialize<'de> for PlainId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = PlainId;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string or an integer")
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<PlainId, E> {
                Ok(PlainId(Id::Number(n)))
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<PlainId, E> {
                i64::try_from(n)
                    .map(|n| PlainId(Id::Number(n)))
                    .map_err(|_| E::custom("an integer past i64"))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<PlainId, E> {
                Ok(PlainId(Id::String(s.to_owned())))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// The methods of MCP's client-to-server messages (rmcp 3.9), whose params
/// rmcp must be able to read: a message that names one and that rmcp reads
/// as a custom message has params that do not fit.
const MCP_METHODS: &[&str] = &[
    "initialize",
    "ping",
    "server/discover",
    "completion/complete",
    "logging/setLevel",
    "prompts/get",
    "prompts/list",
    "resources/list",
    "resources/templates/list",
    "resources/read",
    "resources/subscribe",
    "resources/unsubscribe",
    "resources/directory/read",
    "subscriptions/listen",
    "tools/call",
    "tools/list",
    "tasks/get",
    "tasks/update",
    "tasks/cancel",
    "skills/list",
    "skills/get",
    "notifications/cancelled",
    "notifications/progress",
    "notifications/initialized",
    "notifications/roots/list_changed",
];

fn is_mcp_method(method: &str) -> bool {
    MCP_METHODS.contains(&method)
}

/// `method` as a metric label: itself when it is one of MCP's methods,
/// `other` for the rest (custom methods, whose names are the client's: a
/// label per name would grow without bound).
#[must_use]
pub fn method_label(method: &str) -> &'static str {
    MCP_METHODS
        .iter()
        .find(|known| **known == method)
        .copied()
        .unwrap_or("other")
}

fn request_id(id: &rmcp::model::RequestId) -> Id {
    match id {
        rmcp::model::NumberOrString::Number(n) => Id::Number(*n),
        rmcp::model::NumberOrString::String(s) => Id::String(s.to_string()),
    }
}

/// The answer to a line longer than the bound: `-32600` with the request's
/// id when it could be read from the line's first bytes.
#[must_use]
pub fn too_long_reply(prefix: &[u8], max_line_bytes: usize) -> String {
    let id = id_in_prefix(prefix).unwrap_or(Id::Null);
    error_line(
        &id,
        ErrorObject::new(
            code::INVALID_REQUEST,
            format!("Invalid Request: message too large (more than {max_line_bytes} bytes)"),
        ),
    )
}

/// Finds the top-level `"id"` of a JSON object from its first bytes, when
/// the id (an integer or a string) is complete within them. Best effort and
/// conservative: anything unexpected gives `None`.
#[must_use]
pub fn id_in_prefix(prefix: &[u8]) -> Option<Id> {
    let mut scanner = Scanner {
        bytes: prefix,
        at: 0,
    };
    scanner.skip_ws();
    if scanner.next()? != b'{' {
        return None;
    }
    loop {
        scanner.skip_ws();
        if scanner.peek()? != b'"' {
            return None;
        }
        let key = scanner.string()?;
        scanner.skip_ws();
        if scanner.next()? != b':' {
            return None;
        }
        scanner.skip_ws();
        if key == "id" {
            return scanner.id_value();
        }
        scanner.skip_value(0)?;
        scanner.skip_ws();
        if scanner.next()? != b',' {
            return None;
        }
    }
}

struct Scanner<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Scanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.at += 1;
        Some(b)
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_whitespace()) {
            self.at += 1;
        }
    }

    /// A JSON string at the cursor, decoded (serde does the escapes).
    fn string(&mut self) -> Option<String> {
        let start = self.at;
        if self.next()? != b'"' {
            return None;
        }
        loop {
            match self.next()? {
                b'\\' => {
                    self.next()?;
                }
                b'"' => break,
                _ => {}
            }
        }
        serde_json::from_slice(&self.bytes[start..self.at]).ok()
    }

    fn id_value(&mut self) -> Option<Id> {
        match self.peek()? {
            b'"' => self.string().map(Id::String),
            b'-' | b'0'..=b'9' => {
                let start = self.at;
                while self.peek().is_some_and(|b| b == b'-' || b.is_ascii_digit()) {
                    self.at += 1;
                }
                // The number must end inside the prefix.
                match self.peek()? {
                    b',' | b'}' => {}
                    b if b.is_ascii_whitespace() => {}
                    _ => return None,
                }
                std::str::from_utf8(&self.bytes[start..self.at])
                    .ok()?
                    .parse()
                    .ok()
                    .map(Id::Number)
            }
            _ => None,
        }
    }

    /// Skips one JSON value; depth-bounded so hostile nesting cannot recurse deeply.
    fn skip_value(&mut self, depth: usize) -> Option<()> {
        if depth > 64 {
            return None;
        }
        match self.peek()? {
            b'"' => {
                self.string()?;
            }
            open @ (b'{' | b'[') => {
                let close = if open == b'{' { b'}' } else { b']' };
                self.at += 1;
                loop {
                    self.skip_ws();
                    match self.peek()? {
                        b if b == close => {
                            self.at += 1;
                            break;
                        }
                        b',' | b':' => self.at += 1,
                        _ => self.skip_value(depth + 1)?,
                    }
                }
            }
            _ => {
                // A number, true, false or null.
                let start = self.at;
                while self
                    .peek()
                    .is_some_and(|b| !matches!(b, b',' | b'}' | b']') && !b.is_ascii_whitespace())
                {
                    self.at += 1;
                }
                if self.at == start {
                    return None;
                }
            }
        }
        Some(())
    }
}

/// Reads lines from `reader` and classifies them: the framer's whole job,
/// as one synchronous function over an in-memory input (what the property
/// test and the fuzz target drive). Returns the frames in order.
#[must_use]
pub fn frames_of(input: &[u8], max_line_bytes: usize) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut reader = LineReader::new(input, max_line_bytes);
    // An in-memory reader never waits, so polling once per line is enough.
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        let mut next = std::pin::pin!(reader.next_line());
        match next.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(Ok(Some(RawLine::Line(line)))) => {
                frames.push(classify_line(&line))
            }
            std::task::Poll::Ready(Ok(Some(RawLine::TooLong { prefix }))) => {
                frames.push(Frame::Reply(too_long_reply(&prefix, max_line_bytes)))
            }
            std::task::Poll::Ready(Ok(None) | Err(_)) | std::task::Poll::Pending => break,
        }
    }
    frames
}

#[cfg(test)]
mod tests;
