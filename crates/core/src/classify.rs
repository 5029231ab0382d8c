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
//! | a task the server created (`resultType: "task"`, or a 2025-11-25 `CreateTaskResult`) | `Success` | — |
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
//! `isError` texts: an `MCP error -NNNNN` prefix classifies by code; else the
//! earliest phrase in the text decides: one naming a rate limit, timeout,
//! temporary unavailability or connection reset is `Transient`, one saying
//! not found, unknown tool, invalid, validation, missing required or schema
//! is `Client`; with neither, `Server`. The earliest phrase wins because
//! the head of an error says what went wrong and the tail quotes the data:
//! "Invalid input: timeout must be between 1 and 60" and "File not found:
//! /var/log/timeout.log" are `Client`.
//!
//! An `isError` result that a toolwarden layer rendered from a failure (the
//! fallback cache's degraded answer), carrying the sealed
//! [`OUTCOME_META_KEY`] mark, is classified as the failure itself was: a
//! refusal stays `Rejected` and an upstream that is down stays `Transport`
//! or `Timeout` for every layer above the one that rendered it.
//!
//! # Retry-after hints
//!
//! Hints come from servers, so they are untrusted input. They are read from
//! JSON-RPC error `data` (`retryAfter` / `retry_after` seconds,
//! `retryAfterMs`, or a bare number of seconds), from the text of `isError`
//! results ("retry after 30 s", "Retry-After: 2", "try again in 5 minutes"),
//! and from HTTP `Retry-After` headers (seconds or an HTTP-date:
//! [`retry_after_from_header`]). Negative, NaN, infinite and unparsable hints
//! are ignored; every hint is clamped to at most
//! [`DEFAULT_MAX_RETRY_AFTER`] (1 hour; [`McpClassifier::max_retry_after`]
//! sets another bound). No hint can overflow a `Duration` or an `Instant`
//! downstream.

use std::error::Error as StdError;
use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::jsonrpc::{code, ErrorObject};
use crate::rejection::as_rejection;
use crate::request::{McpResponse, ToolResultStatus};

/// The longest retry-after hint any classification reports, unless
/// [`McpClassifier::max_retry_after`] says otherwise: 1 hour. A server
/// asking for more is read as asking for this.
pub const DEFAULT_MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// The `_meta` member that marks an `isError` result a toolwarden layer
/// rendered from a failure (the fallback cache's degraded answer, the edge's
/// [`RenderErrorsLayer`]): the failure's outcome, `{"kind": "rejected",
/// "class": "transient", "retryAfter": 2.5, "code": -32023, "beforeSent":
/// false, "seal": "..."}`, so every layer above reads the failure as what it
/// was (a refusal stays a refusal, an upstream that is down stays down)
/// rather than as a tool error. The seal is a random value drawn once per
/// process ([`outcome_seal`]); only a mark carrying it is believed, so a
/// server cannot pass its own failures off as our refusals (which would
/// stop the breaker counting them and let the retry layer repeat an unsafe
/// tool).
///
/// [`RenderErrorsLayer`]: https://docs.rs/toolwarden/latest/toolwarden/struct.RenderErrorsLayer.html
pub const OUTCOME_META_KEY: &str = "toolwarden/outcome";

/// This process's seal of rendered outcomes (see [`OUTCOME_META_KEY`]): 16
/// hex digits, random, drawn once. Servers never see the answers the
/// layers render, so they cannot learn it.
pub fn outcome_seal() -> &'static str {
    static SEAL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SEAL.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        // RandomState is seeded from the OS's randomness once per process.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        format!("{:016x}", hasher.finish())
    })
}

/// The sealed [`OUTCOME_META_KEY`] mark of `outcome`.
#[must_use]
pub fn outcome_mark(outcome: &Outcome) -> Value {
    let mut mark = serde_json::Map::new();
    mark.insert("kind".into(), Value::from(outcome.kind.as_str()));
    if let Some(class) = outcome.class {
        mark.insert("class".into(), Value::from(class.as_str()));
    }
    if let Some(retry_after) = outcome.retry_after {
        mark.insert(
            "retryAfter".into(),
            serde_json::json!(retry_after.as_secs_f64()),
        );
    }
    if let Some(code) = outcome.code {
        mark.insert("code".into(), Value::from(code));
    }
    if outcome.before_sent {
        mark.insert("beforeSent".into(), Value::from(true));
    }
    mark.insert("seal".into(), Value::from(outcome_seal()));
    Value::Object(mark)
}

/// The outcome a sealed [`OUTCOME_META_KEY`] mark records; `None` for a
/// mark without this process's seal or with an unknown kind. Its hint is
/// clamped to `max`.
pub fn outcome_from_mark(mark: &Value, max: Duration) -> Option<Outcome> {
    if mark.get("seal").and_then(Value::as_str) != Some(outcome_seal()) {
        return None;
    }
    let kind = OutcomeKind::parse(mark.get("kind")?.as_str()?)?;
    let class = mark
        .get("class")
        .and_then(Value::as_str)
        .and_then(FailureClass::parse);
    if (kind == OutcomeKind::Success) != class.is_none() {
        return None;
    }
    Some(Outcome {
        kind,
        class,
        retry_after: retry_after_within(mark, max),
        code: mark.get("code").and_then(Value::as_i64),
        before_sent: mark.get("beforeSent").and_then(Value::as_bool) == Some(true),
    })
}

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
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::Transient => "transient",
            FailureClass::Server => "server",
            FailureClass::Client => "client",
        }
    }

    /// The class a label of [`as_str`](Self::as_str) names.
    #[must_use]
    pub fn parse(label: &str) -> Option<Self> {
        [
            FailureClass::Transient,
            FailureClass::Server,
            FailureClass::Client,
        ]
        .into_iter()
        .find(|c| c.as_str() == label)
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
    /// Every kind, in declaration order.
    pub const ALL: [OutcomeKind; 6] = [
        OutcomeKind::Success,
        OutcomeKind::ToolError,
        OutcomeKind::ProtocolError,
        OutcomeKind::Transport,
        OutcomeKind::Timeout,
        OutcomeKind::Rejected,
    ];

    /// A short lower-case label, used as the `outcome` metric label.
    #[must_use]
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

    /// The kind a label of [`as_str`](Self::as_str) names.
    #[must_use]
    pub fn parse(label: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == label)
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
    #[must_use]
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
    #[must_use]
    pub fn is_success(&self) -> bool {
        self.kind == OutcomeKind::Success
    }

    /// Whether the tool (or server) is to blame: a `Transient` or `Server`
    /// failure that no toolwarden layer produced. Circuit breakers count only these.
    #[must_use]
    pub fn is_counted_failure(&self) -> bool {
        self.kind != OutcomeKind::Rejected
            && matches!(
                self.class,
                Some(FailureClass::Transient | FailureClass::Server)
            )
    }

    /// Whether a toolwarden layer refused the call.
    #[must_use]
    pub fn is_rejection(&self) -> bool {
        self.kind == OutcomeKind::Rejected
    }

    /// The OpenTelemetry `error.type` of the outcome: `None` on success.
    #[must_use]
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

    /// Classifies a response the caller owns and passes on. The default
    /// is [`classify_response`](Self::classify_response); a classifier may
    /// keep its outcome with the response for the layers above to read
    /// instead of classifying again ([`McpClassifier::share_outcomes`]).
    fn classify_owned(&self, kind: CallKind, response: &mut Resp) -> Outcome {
        self.classify_response(kind, response)
    }

    /// [`classify_owned`](Self::classify_owned) of a whole result.
    fn classify_result<E>(&self, kind: CallKind, result: &mut Result<Resp, E>) -> Outcome
    where
        E: AsRef<dyn StdError + Send + Sync + 'static>,
    {
        match result {
            Ok(response) => self.classify_owned(kind, response),
            Err(error) => self.classify_error(error.as_ref()),
        }
    }

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

/// `duration` in nanoseconds, saturating.
fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// The default classifier: the MCP table in the [module docs](self).
#[derive(Debug, Clone, Copy)]
pub struct McpClassifier {
    empty_result: Option<FailureClass>,
    /// [`max_retry_after`](Self::max_retry_after) in nanoseconds (saturating
    /// at about 584 years): 8 bytes instead of a `Duration`'s 16, as a copy
    /// of the classifier is kept in the response future of most layers,
    /// and those futures are moved at every level of a stack.
    max_retry_after_nanos: u64,
    /// Whether [`Classify::classify_owned`] leaves a [`SuccessKey`] on the
    /// responses it finds a success, and reads one left there (see
    /// [`share_outcomes`](Self::share_outcomes)).
    share: bool,
    /// The key of a shared `tools/call` success under these settings,
    /// packed once (`None` when not sharing, or the settings do not pack).
    tool_call_key: Option<SuccessKey>,
}

/// What a sharing classifier leaves on a response it found a success
/// ([`McpClassifier::share_outcomes`]): the call kind and the settings it
/// classified under, packed in 8 bytes so that it costs the response (moved
/// through every layer) next to nothing. A classifier with other settings
/// finds no key of its own there and classifies again. Failures leave none:
/// they are rare, and classified by each layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SuccessKey(std::num::NonZeroU64);

impl SuccessKey {
    /// The key of a classifier with these settings for a call of `kind`;
    /// `None` when the settings do not pack (a `max_retry_after` that is
    /// not a whole number of milliseconds, or beyond 2^58 ms): such a
    /// classifier does not share.
    fn new(
        kind: CallKind,
        empty_result: Option<FailureClass>,
        max_retry_after: Duration,
    ) -> Option<Self> {
        let millis = u64::try_from(max_retry_after.as_millis()).ok()?;
        if Duration::from_millis(millis) != max_retry_after || millis >= 1 << 58 {
            return None;
        }
        let class = match empty_result {
            None => 1,
            Some(FailureClass::Transient) => 2,
            Some(FailureClass::Server) => 3,
            Some(FailureClass::Client) => 4,
        };
        let kind = match kind {
            CallKind::ToolCall => 0,
            CallKind::Other => 1,
        };
        // Never zero: `class` is at least 1.
        std::num::NonZeroU64::new((millis << 6) | (kind << 5) | class).map(SuccessKey)
    }

    /// Whether the key is of a `tools/call`: the response it marks is then
    /// neither a JSON-RPC error nor an `isError` result (the
    /// [`McpClassifier`] finds those failures under any settings).
    #[must_use]
    pub fn is_tool_call(self) -> bool {
        (self.0.get() >> 5) & 1 == 0
    }
}
impl Default for McpClassifier {
    fn default() -> Self {
        McpClassifier {
            empty_result: Some(FailureClass::Server),
            max_retry_after_nanos: nanos(DEFAULT_MAX_RETRY_AFTER),
            share: false,
            tool_call_key: None,
        }
    }
}

impl McpClassifier {
    /// The default classifier.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// How to classify an empty `tools/call` result: a failure of `class`,
    /// or a success with `None`. Default: `Some(FailureClass::Server)`.
    #[must_use]
    pub fn empty_result(mut self, class: Option<FailureClass>) -> Self {
        self.empty_result = class;
        self.repack()
    }

    /// The longest retry-after hint reported; longer hints are clamped to
    /// it. Default [`DEFAULT_MAX_RETRY_AFTER`] (1 hour).
    #[must_use]
    pub fn max_retry_after(mut self, max: Duration) -> Self {
        self.max_retry_after_nanos = nanos(max);
        self.repack()
    }

    /// The longest retry-after hint reported.
    #[inline]
    fn max_hint(&self) -> Duration {
        Duration::from_nanos(self.max_retry_after_nanos)
    }

    /// Leaves a mark ([`SuccessKey`]) on each response
    /// [`classify_owned`](Classify::classify_owned) finds a success
    /// ([`McpResponse::set_success_key`]), and takes a response carrying
    /// the mark of a classifier of the same settings for a success without
    /// classifying it again: a response is then classified once on its way
    /// up a stack, not once per layer. An input-required `tools/call`
    /// result and a task, successes too, are left unmarked (and classified
    /// by each layer): a marked `tools/call` success is then never one
    /// ([`McpResponse::marked_tool_call_success`]).
    ///
    /// Only where nothing between the layers edits a response except
    /// through [`McpResponse`]'s methods (which remove the mark): the
    /// standard stack turns it on for its layers, which it puts together
    /// itself. Off by default.
    #[must_use]
    pub fn share_outcomes(mut self, share: bool) -> Self {
        self.share = share;
        self.repack()
    }

    /// The key for a call of `kind`: the settings were packed when they
    /// were set (`tool_call_key`), the kind is one bit.
    #[inline]
    fn success_key(&self, kind: CallKind) -> Option<SuccessKey> {
        let key = self.tool_call_key?;
        Some(match kind {
            CallKind::ToolCall => key,
            CallKind::Other => SuccessKey(key.0 | 1 << 5),
        })
    }

    /// Packs the settings again after a change ([`SuccessKey::new`]).
    fn repack(mut self) -> Self {
        self.tool_call_key = self
            .share
            .then(|| SuccessKey::new(CallKind::ToolCall, self.empty_result, self.max_hint()))
            .flatten();
        self
    }
}

impl McpClassifier {
    /// The outcome of `response`, and whether a success may be marked: not
    /// an input-required result nor a task, so that a marked `tools/call`
    /// success is a result (with data, or empty and judged a success),
    /// never an `isError`, an input-required one or a task
    /// ([`McpResponse::marked_tool_call_success`]).
    #[inline]
    fn judge<Resp: McpResponse>(&self, kind: CallKind, response: &Resp) -> (Outcome, bool) {
        let max = self.max_hint();
        if let Some(err) = response.rpc_error() {
            return (rpc_error_outcome(err.code, err.data, max), false);
        }
        if kind != CallKind::ToolCall {
            return (Outcome::SUCCESS, true);
        }
        let status = response.tool_result_status();
        let outcome = match status {
            ToolResultStatus::Rendered => response
                .result_meta(OUTCOME_META_KEY)
                .and_then(|mark| outcome_from_mark(mark, max))
                .unwrap_or_else(|| {
                    let text = response.first_text();
                    error_text_outcome(text.as_deref().unwrap_or(""), max)
                }),
            ToolResultStatus::Error => {
                let text = response.first_text();
                error_text_outcome(text.as_deref().unwrap_or(""), max)
            }
            ToolResultStatus::Empty => match self.empty_result {
                Some(class) => Outcome::failure(OutcomeKind::ToolError, class),
                None => Outcome::SUCCESS,
            },
            ToolResultStatus::InputRequired | ToolResultStatus::Task | ToolResultStatus::Data => {
                Outcome::SUCCESS
            }
        };
        (
            outcome,
            !matches!(
                status,
                ToolResultStatus::InputRequired | ToolResultStatus::Task
            ),
        )
    }
}

impl<Resp: McpResponse> Classify<Resp> for McpClassifier {
    #[inline]
    fn classify_response(&self, kind: CallKind, response: &Resp) -> Outcome {
        self.judge(kind, response).0
    }

    fn classify_owned(&self, kind: CallKind, response: &mut Resp) -> Outcome {
        let Some(key) = self.success_key(kind) else {
            return self.classify_response(kind, response);
        };
        if response.success_key() == Some(key) {
            return Outcome::SUCCESS;
        }
        let (outcome, markable) = self.judge(kind, response);
        if outcome == Outcome::SUCCESS && markable {
            response.set_success_key(Some(key));
        }
        outcome
    }

    fn classify_error(&self, error: &(dyn StdError + 'static)) -> Outcome {
        error_chain_outcome(error, self.max_hint())
    }
}

/// Classifies a JSON-RPC error code (with its `data`, for a retry-after hint,
/// clamped to [`DEFAULT_MAX_RETRY_AFTER`]).
#[must_use]
pub fn classify_rpc_error(code: i64, data: Option<&Value>) -> Outcome {
    rpc_error_outcome(code, data, DEFAULT_MAX_RETRY_AFTER)
}

fn rpc_error_outcome(code: i64, data: Option<&Value>, max: Duration) -> Outcome {
    let class = class_of_code(code);
    let retry_after = if code == code::RATE_LIMITED {
        data.and_then(|data| retry_after_within(data, max))
    } else {
        None
    };
    Outcome::failure(OutcomeKind::ProtocolError, class)
        .with_code(code)
        .with_retry_after(retry_after)
}

/// The failure class of a JSON-RPC error code.
#[must_use]
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
/// is seconds. Negative and non-numeric hints are ignored; the hint is
/// clamped to [`DEFAULT_MAX_RETRY_AFTER`].
///
/// ```
/// use std::time::Duration;
/// use toolwarden_core::classify::{retry_after_from_data, DEFAULT_MAX_RETRY_AFTER};
/// assert_eq!(retry_after_from_data(&serde_json::json!({"retryAfterMs": 1500})), Some(Duration::from_millis(1500)));
/// assert_eq!(retry_after_from_data(&serde_json::json!({"retryAfter": 1e20})), Some(DEFAULT_MAX_RETRY_AFTER));
/// assert_eq!(retry_after_from_data(&serde_json::json!({"retryAfter": -3})), None);
/// ```
#[must_use]
pub fn retry_after_from_data(data: &Value) -> Option<Duration> {
    retry_after_within(data, DEFAULT_MAX_RETRY_AFTER)
}

fn retry_after_within(data: &Value, max: Duration) -> Option<Duration> {
    if let Some(secs) = data.as_f64() {
        return clamped_secs(secs, max);
    }
    let obj = data.as_object()?;
    if let Some(ms) = obj.get("retryAfterMs").and_then(Value::as_f64) {
        return clamped_secs(ms / 1000.0, max);
    }
    obj.get("retryAfter")
        .or_else(|| obj.get("retry_after"))
        .and_then(Value::as_f64)
        .and_then(|secs| clamped_secs(secs, max))
}

/// `secs` seconds as a `Duration` no longer than `max`; `None` for a
/// negative or NaN value. Never panics: `Duration::from_secs_f64` would, on
/// a value past `u64::MAX` seconds.
#[must_use]
pub fn clamped_secs(secs: f64, max: Duration) -> Option<Duration> {
    if secs.is_nan() || secs < 0.0 {
        return None;
    }
    Some(Duration::try_from_secs_f64(secs).map_or(max, |d| d.min(max)))
}

/// Reads an HTTP `Retry-After` header value: delay seconds (`"120"`) or an
/// HTTP-date (`"Wed, 21 Oct 2026 07:28:00 GMT"`, measured from `now`; a date
/// in the past is no wait). Clamped to [`DEFAULT_MAX_RETRY_AFTER`];
/// anything else is `None`.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use toolwarden_core::classify::retry_after_from_header;
/// let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
/// assert_eq!(retry_after_from_header("30", now), Some(Duration::from_secs(30)));
/// assert_eq!(retry_after_from_header("Tue, 14 Nov 2023 22:13:40 GMT", now), Some(Duration::from_secs(20)));
/// assert_eq!(retry_after_from_header("99999999999999999999", now), Some(Duration::from_secs(3600)));
/// assert_eq!(retry_after_from_header("soon", now), None);
/// ```
#[must_use]
pub fn retry_after_from_header(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // All digits: a number of seconds, however many digits.
        let secs = value.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs).min(DEFAULT_MAX_RETRY_AFTER));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(now)
            .unwrap_or(Duration::ZERO)
            .min(DEFAULT_MAX_RETRY_AFTER),
    )
}

/// Phrases that introduce a retry-after hint in the text of a tool error.
const HINT_PHRASES: &[&str] = &["retry after", "retry-after", "try again in", "retry in"];

/// Reads a retry-after hint from the text of an `isError` result: "retry
/// after 30 s", "Retry-After: 2", "try again in 5 minutes", "retry in
/// 250 ms". Units: ms, s (the default), min, h, in their usual spellings.
/// Clamped to `max`.
fn retry_after_from_text(text: &str, max: Duration) -> Option<Duration> {
    let start = HINT_PHRASES
        .iter()
        .filter_map(|phrase| find_ignore_case(text, phrase).map(|at| at + phrase.len()))
        .min()?;
    let rest =
        text[start..].trim_start_matches(|c: char| c == ':' || c == '=' || c.is_whitespace());
    let number_len = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let number: f64 = rest[..number_len].parse().ok()?;
    let unit = rest[number_len..].trim_start();
    let word_len = unit
        .find(|c: char| !c.is_ascii_alphabetic())
        .unwrap_or(unit.len());
    let scale = match unit[..word_len].to_ascii_lowercase().as_str() {
        "ms" | "msec" | "millisecond" | "milliseconds" => 0.001,
        "m" | "min" | "mins" | "minute" | "minutes" => 60.0,
        "h" | "hr" | "hrs" | "hour" | "hours" => 3600.0,
        _ => 1.0,
    };
    clamped_secs(number * scale, max)
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
/// assert_eq!(classify_error_text("Invalid input: timeout must be between 1 and 60").class, Some(FailureClass::Client));
/// assert_eq!(
///     classify_error_text("quota exceeded, retry after 30 s").retry_after,
///     Some(std::time::Duration::from_secs(30)),
/// );
/// ```
#[must_use]
pub fn classify_error_text(text: &str) -> Outcome {
    error_text_outcome(text, DEFAULT_MAX_RETRY_AFTER)
}

fn error_text_outcome(text: &str, max: Duration) -> Outcome {
    let hint = retry_after_from_text(text, max);
    if let Some(code) = mcp_error_code(text) {
        let mut outcome = rpc_error_outcome(code, None, max);
        outcome.kind = OutcomeKind::ToolError;
        outcome.retry_after = outcome.retry_after.or(hint);
        return outcome;
    }
    let earliest = |phrases: &[&str]| {
        phrases
            .iter()
            .filter_map(|p| find_ignore_case(text, p))
            .min()
    };
    let class = match (earliest(TRANSIENT_TEXT), earliest(CLIENT_TEXT)) {
        (Some(transient), Some(client)) if client < transient => FailureClass::Client,
        (Some(_), _) => FailureClass::Transient,
        (None, Some(_)) => FailureClass::Client,
        (None, None) => FailureClass::Server,
    };
    Outcome::failure(OutcomeKind::ToolError, class).with_retry_after(hint)
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
/// Retry-after hints are clamped to [`DEFAULT_MAX_RETRY_AFTER`].
pub fn classify_error_chain(error: &(dyn StdError + 'static)) -> Outcome {
    error_chain_outcome(error, DEFAULT_MAX_RETRY_AFTER)
}

fn error_chain_outcome(error: &(dyn StdError + 'static), max: Duration) -> Outcome {
    let mut current = Some(error);
    while let Some(err) = current {
        if let Some(mut outcome) = classify_known_error(err, max) {
            outcome.retry_after = outcome.retry_after.map(|d| d.min(max));
            return outcome;
        }
        current = err.source();
    }
    Outcome::failure(OutcomeKind::Transport, FailureClass::Server)
}

fn classify_known_error(err: &(dyn StdError + 'static), max: Duration) -> Option<Outcome> {
    if let Some(rejection) = as_rejection(err) {
        return Some(
            Outcome::failure(OutcomeKind::Rejected, FailureClass::Transient)
                .with_retry_after(rejection.retry_after()),
        );
    }
    if let Some(e) = err.downcast_ref::<ErrorObject>() {
        return Some(rpc_error_outcome(e.code, e.data.as_ref(), max));
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

#[cfg(test)]
mod share_tests {
    use serde_json::json;

    use super::*;
    use crate::jsonrpc::{Id, Response};

    fn ok(result: serde_json::Value) -> Response {
        Response::result(Id::Number(1), result)
    }

    #[test]
    fn a_sharing_classifier_marks_successes_and_trusts_its_own_marks_only() {
        let sharing = McpClassifier::new().share_outcomes(true);
        let mut response = ok(json!({"content": [{"type": "text", "text": "3 results"}]}));
        assert_eq!(
            sharing.classify_owned(CallKind::ToolCall, &mut response),
            Outcome::SUCCESS
        );
        let mark = response.success_key().expect("a success is marked");

        // The mark is what the next sharing classifier reads: on a
        // response that says otherwise, it is believed (so it must be
        // removed by every edit, below).
        let mut forged = ok(json!({"content": [], "isError": true}));
        forged.set_success_key(Some(mark));
        assert_eq!(
            sharing.classify_owned(CallKind::ToolCall, &mut forged),
            Outcome::SUCCESS
        );
        // Not by a classifier that does not share, nor by one of other
        // settings, nor for another call kind's mark.
        let plain = McpClassifier::new();
        assert!(!plain
            .classify_owned(CallKind::ToolCall, &mut forged.clone())
            .is_success());
        let other = McpClassifier::new()
            .max_retry_after(Duration::from_secs(5))
            .share_outcomes(true);
        assert!(!other
            .classify_owned(CallKind::ToolCall, &mut forged.clone())
            .is_success());
        let mut other_kind = ok(json!({"content": []}));
        sharing.classify_owned(CallKind::Other, &mut other_kind);
        assert!(!sharing
            .classify_owned(CallKind::ToolCall, &mut other_kind)
            .is_success());
    }

    #[test]
    fn a_marked_tool_call_success_is_never_an_error_result_under_any_settings() {
        let results = [
            json!({"content": [{"type": "text", "text": "x"}]}),
            json!({"content": [{"type": "text", "text": "boom"}], "isError": true}),
            json!({"content": []}),
            json!({"content": [], "isError": true}),
            json!({"resultType": "input_required", "inputRequests": {}}),
            json!({"resultType": "task", "task": {"taskId": "t-1", "status": "working"}}),
            json!({"task": {"taskId": "t-1", "status": "working"}}),
        ];
        for empty in [
            None,
            Some(FailureClass::Transient),
            Some(FailureClass::Server),
            Some(FailureClass::Client),
        ] {
            for max in [Duration::from_secs(1), DEFAULT_MAX_RETRY_AFTER] {
                let sharing = McpClassifier::new()
                    .empty_result(empty)
                    .max_retry_after(max)
                    .share_outcomes(true);
                for result in &results {
                    let mut response = ok(result.clone());
                    sharing.classify_owned(CallKind::ToolCall, &mut response);
                    if response.marked_tool_call_success() {
                        assert!(!response.is_tool_error(), "{result} under {empty:?}");
                        assert!(!response.is_input_required(), "{result} under {empty:?}");
                        assert!(!response.is_task(), "{result} under {empty:?}");
                    }
                    // Another kind's mark says nothing of tool errors.
                    let mut other = ok(result.clone());
                    sharing.classify_owned(CallKind::Other, &mut other);
                    assert!(!other.marked_tool_call_success());
                }
            }
        }
        // An input-required result is a success, left unmarked.
        let sharing = McpClassifier::new().share_outcomes(true);
        let mut asking = ok(results[4].clone());
        assert!(sharing
            .classify_owned(CallKind::ToolCall, &mut asking)
            .is_success());
        assert_eq!(asking.success_key(), None);
        // So is a task, however an empty result is judged: the server
        // accepted the call (regression: a task has no content, and was
        // judged an empty result, a failure of class Server, so retried,
        // counted by the breaker and the loop guard).
        for task in &results[5..] {
            for empty in [None, Some(FailureClass::Server)] {
                let mut task = ok(task.clone());
                let sharing = McpClassifier::new()
                    .empty_result(empty)
                    .share_outcomes(true);
                assert!(sharing
                    .classify_owned(CallKind::ToolCall, &mut task)
                    .is_success());
                assert_eq!(task.success_key(), None);
            }
        }
        // The plain answer is marked, and says so.
        let mut response = ok(results[0].clone());
        McpClassifier::new()
            .share_outcomes(true)
            .classify_owned(CallKind::ToolCall, &mut response);
        assert!(response.marked_tool_call_success());
    }

    #[test]
    fn edits_remove_the_mark_and_failures_leave_none() {
        let sharing = McpClassifier::new().share_outcomes(true);
        let mut response = ok(json!({"content": [{"type": "text", "text": "x"}]}));
        sharing.classify_owned(CallKind::ToolCall, &mut response);
        assert!(response.success_key().is_some());
        McpResponse::insert_result_meta(&mut response, "k", json!(1));
        assert_eq!(response.success_key(), None);
        sharing.classify_owned(CallKind::ToolCall, &mut response);
        McpResponse::push_text(&mut response, "more".into());
        assert_eq!(response.success_key(), None);
        sharing.classify_owned(CallKind::ToolCall, &mut response);
        McpResponse::remove_result_meta(&mut response, "k");
        assert_eq!(response.success_key(), None);
        // A re-addressed response is the same answer: the mark stays.
        sharing.classify_owned(CallKind::ToolCall, &mut response);
        McpResponse::set_request_id(&mut response, &Id::Number(2));
        assert!(response.success_key().is_some());

        let mut failed =
            ok(json!({"content": [{"type": "text", "text": "boom"}], "isError": true}));
        assert!(!sharing
            .classify_owned(CallKind::ToolCall, &mut failed)
            .is_success());
        assert_eq!(failed.success_key(), None);
        // Settings that do not pack share nothing.
        let odd = McpClassifier::new()
            .max_retry_after(Duration::from_micros(1500))
            .share_outcomes(true);
        let mut response = ok(json!({"content": [{"type": "text", "text": "x"}]}));
        odd.classify_owned(CallKind::ToolCall, &mut response);
        assert_eq!(response.success_key(), None);
    }

    /// A copy of the classifier rides in most layers' response futures:
    /// it stays at 24 bytes. Its bound on retry-after hints keeps its
    /// meaning at every size, `Duration::MAX` (stored saturated, about 584
    /// years) included.
    #[test]
    fn the_classifier_is_small_and_its_hint_bound_holds_at_every_size() {
        assert!(std::mem::size_of::<McpClassifier>() <= 24);
        let limited = |ms: u64| {
            let response = Response::error(
                Id::Number(1),
                crate::jsonrpc::ErrorObject {
                    code: code::RATE_LIMITED,
                    message: "slow down".into(),
                    data: Some(json!({ "retryAfterMs": ms })),
                },
            );
            move |classifier: McpClassifier| {
                classifier
                    .classify_owned(CallKind::ToolCall, &mut response.clone())
                    .retry_after
            }
        };
        let ten_days = 10 * 24 * 3_600 * 1_000;
        let hint = limited(ten_days);
        assert_eq!(
            hint(McpClassifier::new().max_retry_after(Duration::MAX)),
            Some(Duration::from_millis(ten_days))
        );
        assert_eq!(
            hint(McpClassifier::new().max_retry_after(Duration::from_secs(5))),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            hint(McpClassifier::new().max_retry_after(Duration::from_micros(1_500))),
            Some(Duration::from_micros(1_500))
        );
    }
}
