//! Rejections by toolwarden layers, and the renderer that turns any failure
//! into a tool result a model can act on.
//!
//! Each layer that refuses a call returns one of these small structs inside a
//! `tower::BoxError`; callers downcast, as with tower's `Elapsed`:
//!
//! ```
//! use std::time::Duration;
//! use toolwarden_core::rejection::{CircuitOpen, Rejection};
//! let err: Box<dyn std::error::Error + Send + Sync> =
//!     Box::new(CircuitOpen::new("search", Duration::from_secs(12)));
//! let open = err.downcast_ref::<CircuitOpen>().unwrap();
//! assert_eq!(open.retry_after(), Some(Duration::from_secs(12)));
//! ```

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::classify::{FailureClass, Outcome, OutcomeKind};

/// The `_meta` key of a rendered failure's facts for a tool that declares
/// an `outputSchema` ([`FailureReport::to_tool_result_for`]); other tools'
/// are in `structuredContent.toolwarden`.
pub const FAILURE_META_KEY: &str = "toolwarden/failure";

/// What every toolwarden rejection offers.
pub trait Rejection: StdError + Send + Sync + 'static {
    /// When the call may succeed if tried again, where known.
    fn retry_after(&self) -> Option<Duration>;

    /// The layer that refused, e.g. `circuit_breaker`.
    fn layer(&self) -> &'static str;

    /// What the model should do, as one short sentence.
    fn advice(&self) -> String;
}

/// Finds a toolwarden rejection in an error (not its sources).
pub fn as_rejection<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a dyn Rejection> {
    if let Some(e) = err.downcast_ref::<CircuitOpen>() {
        return Some(e);
    }
    if let Some(e) = err.downcast_ref::<RateLimited>() {
        return Some(e);
    }
    if let Some(e) = err.downcast_ref::<LoopDetected>() {
        return Some(e);
    }
    if let Some(e) = err.downcast_ref::<RetryBudgetExhausted>() {
        return Some(e);
    }
    if let Some(e) = err.downcast_ref::<BulkheadFull>() {
        return Some(e);
    }
    None
}

/// Finds a toolwarden rejection anywhere in an error's source chain.
pub fn find_rejection<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a dyn Rejection> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(r) = as_rejection(e) {
            return Some(r);
        }
        current = e.source();
    }
    None
}

fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("{} ms", d.as_millis().max(1))
    } else {
        format!("{} s", s.ceil() as u64)
    }
}

/// The circuit for a key is open: the call was refused without reaching the tool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CircuitOpen {
    key: Arc<str>,
    retry_after: Duration,
}

impl CircuitOpen {
    /// A refusal for `key`, which allows a probe after `retry_after`.
    pub fn new(key: impl Into<Arc<str>>, retry_after: Duration) -> Self {
        CircuitOpen {
            key: key.into(),
            retry_after,
        }
    }

    /// The breaker key (the tool name with the default key function).
    #[must_use]
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl fmt::Display for CircuitOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "circuit open for {}; retry after {}",
            self.key,
            secs(self.retry_after)
        )
    }
}

impl StdError for CircuitOpen {}

impl Rejection for CircuitOpen {
    fn retry_after(&self) -> Option<Duration> {
        Some(self.retry_after)
    }
    fn layer(&self) -> &'static str {
        "circuit_breaker"
    }
    fn advice(&self) -> String {
        format!(
            "{} is failing and was not called; retry after {}",
            self.key,
            secs(self.retry_after)
        )
    }
}

/// The rate limit for a key is spent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimited {
    key: Arc<str>,
    retry_after: Duration,
}

impl RateLimited {
    /// A refusal for `key`; a token is available after `retry_after`.
    pub fn new(key: impl Into<Arc<str>>, retry_after: Duration) -> Self {
        RateLimited {
            key: key.into(),
            retry_after,
        }
    }

    /// The limiter key (`global`, or the tool name by default).
    #[must_use]
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl fmt::Display for RateLimited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rate limited on {}; retry after {}",
            self.key,
            secs(self.retry_after)
        )
    }
}

impl StdError for RateLimited {}

impl Rejection for RateLimited {
    fn retry_after(&self) -> Option<Duration> {
        Some(self.retry_after)
    }
    fn layer(&self) -> &'static str {
        "rate_limit"
    }
    fn advice(&self) -> String {
        format!(
            "too many calls to {}; retry after {}",
            self.key,
            secs(self.retry_after)
        )
    }
}

/// Every place of a bulkhead (the concurrency cap of a key) is taken: the
/// call was refused without reaching the tool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BulkheadFull {
    key: Arc<str>,
    /// What the advice calls the key ([`KeyRef::subject`](crate::KeyRef::subject)).
    subject: Arc<str>,
    max_concurrent: u32,
    retry_after: Duration,
}

impl BulkheadFull {
    /// A refusal for `key`, whose `max_concurrent` places are all taken; one
    /// is expected to come free after `retry_after` (an estimate from the
    /// key's recent call durations).
    pub fn new(key: impl Into<Arc<str>>, max_concurrent: u32, retry_after: Duration) -> Self {
        let key = key.into();
        BulkheadFull {
            subject: Arc::clone(&key),
            key,
            max_concurrent,
            retry_after,
        }
    }

    /// The refusal, its advice naming the key as `subject` (`search in this
    /// session` for the key `session-1/search`); by default the key itself.
    #[must_use]
    pub fn with_subject(mut self, subject: impl Into<Arc<str>>) -> Self {
        self.subject = subject.into();
        self
    }

    /// The bulkhead key (the tool name with the default key function).
    #[must_use]
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The cap that was reached.
    #[must_use]
    pub fn max_concurrent(&self) -> u32 {
        self.max_concurrent
    }
}

impl fmt::Display for BulkheadFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "bulkhead full for {} ({} calls in flight); retry after {}",
            self.key,
            self.max_concurrent,
            secs(self.retry_after)
        )
    }
}

impl StdError for BulkheadFull {}

impl Rejection for BulkheadFull {
    fn retry_after(&self) -> Option<Duration> {
        Some(self.retry_after)
    }
    fn layer(&self) -> &'static str {
        "bulkhead"
    }
    fn advice(&self) -> String {
        format!(
            "{} is busy ({} calls already in flight) and was not called; retry after {}",
            self.subject,
            self.max_concurrent,
            secs(self.retry_after)
        )
    }
}

/// The pattern a [`LoopDetected`] refusal saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopPattern {
    /// The same call kept failing.
    RepeatedFailure,
    /// The same call was made too often, failing or not.
    Repeated,
    /// A short cycle of calls (A, B, A, B, ...) with this period.
    Cycle {
        /// The number of distinct calls in the cycle.
        period: u8,
    },
}

/// The agent repeated a call (or a short cycle of calls) too often.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDetected {
    tool: Arc<str>,
    repeats: u32,
    pattern: LoopPattern,
}

impl LoopDetected {
    /// A refusal of `tool` after `repeats` repetitions of `pattern`.
    pub fn new(tool: impl Into<Arc<str>>, repeats: u32, pattern: LoopPattern) -> Self {
        LoopDetected {
            tool: tool.into(),
            repeats,
            pattern,
        }
    }

    /// The tool whose call was refused.
    #[must_use]
    pub fn tool(&self) -> &str {
        &self.tool
    }

    /// How many times the call (or cycle) was seen, this one included.
    #[must_use]
    pub fn repeats(&self) -> u32 {
        self.repeats
    }

    /// What was repeated.
    #[must_use]
    pub fn pattern(&self) -> LoopPattern {
        self.pattern
    }
}

impl fmt::Display for LoopDetected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pattern {
            LoopPattern::RepeatedFailure => write!(
                f,
                "loop detected: {} called {} times with the same arguments, failing each time",
                self.tool, self.repeats
            ),
            LoopPattern::Repeated => write!(
                f,
                "loop detected: {} called {} times with the same arguments",
                self.tool, self.repeats
            ),
            LoopPattern::Cycle { period } => write!(
                f,
                "loop detected: a cycle of {period} calls ending in {} repeated {} times",
                self.tool, self.repeats
            ),
        }
    }
}

impl StdError for LoopDetected {}

impl Rejection for LoopDetected {
    fn retry_after(&self) -> Option<Duration> {
        None
    }
    fn layer(&self) -> &'static str {
        "loop_guard"
    }
    fn advice(&self) -> String {
        format!(
            "{self}. Repeating it will not help: change approach, use different arguments or another tool"
        )
    }
}

/// The retry budget is spent: the call failed and was not retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryBudgetExhausted {
    key: Arc<str>,
    attempts: u32,
}

impl RetryBudgetExhausted {
    /// A refusal to retry `key` after `attempts` attempts.
    pub fn new(key: impl Into<Arc<str>>, attempts: u32) -> Self {
        RetryBudgetExhausted {
            key: key.into(),
            attempts,
        }
    }

    /// The budget key.
    #[must_use]
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The attempts made before the budget ran out.
    #[must_use]
    pub fn attempts(&self) -> u32 {
        self.attempts
    }
}

impl fmt::Display for RetryBudgetExhausted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "retry budget exhausted for {} after {} attempt(s)",
            self.key, self.attempts
        )
    }
}

impl StdError for RetryBudgetExhausted {}

impl Rejection for RetryBudgetExhausted {
    fn retry_after(&self) -> Option<Duration> {
        None
    }
    fn layer(&self) -> &'static str {
        "retry"
    }
    fn advice(&self) -> String {
        format!(
            "{} is failing and retries are spent; try later or another tool",
            self.key
        )
    }
}

/// A failure as the model will see it: rendered by [`FailureReport::to_tool_result`]
/// into a `tools/call` result with `isError: true`.
///
/// ```
/// use std::time::Duration;
/// use toolwarden_core::rejection::{CircuitOpen, FailureReport};
/// let err = CircuitOpen::new("search_docs", Duration::from_secs(12));
/// let result = FailureReport::from_error("search_docs", &err)
///     .alternatives(["web_search"])
///     .to_tool_result();
/// assert_eq!(result["isError"], true);
/// let text = result["content"][0]["text"].as_str().unwrap();
/// assert!(text.contains("retry after 12 s"), "{text}");
/// assert!(text.contains("try: web_search"), "{text}");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct FailureReport {
    tool: String,
    message: String,
    outcome: Option<Outcome>,
    retry_after: Option<Duration>,
    attempts: Option<u32>,
    alternatives: Vec<String>,
    layer: Option<&'static str>,
}

impl FailureReport {
    /// A report of `error`, which happened when calling `tool`. Rejections
    /// are found anywhere in the source chain and explained in their own words.
    pub fn from_error(tool: &str, error: &(dyn StdError + 'static)) -> Self {
        let outcome = crate::classify::classify_error_chain(error);
        let (message, retry_after, layer) = match find_rejection(error) {
            Some(r) => (r.advice(), r.retry_after(), Some(r.layer())),
            None => (format!("{tool} failed: {error}"), outcome.retry_after, None),
        };
        FailureReport {
            tool: tool.to_owned(),
            message,
            outcome: Some(outcome),
            retry_after,
            attempts: None,
            alternatives: Vec::new(),
            layer,
        }
    }

    /// A report with a free-form message.
    pub fn new(tool: &str, message: impl Into<String>) -> Self {
        FailureReport {
            tool: tool.to_owned(),
            message: message.into(),
            outcome: None,
            retry_after: None,
            attempts: None,
            alternatives: Vec::new(),
            layer: None,
        }
    }

    /// Records the classified outcome.
    #[must_use]
    pub fn outcome(mut self, outcome: Outcome) -> Self {
        if self.retry_after.is_none() {
            self.retry_after = outcome.retry_after;
        }
        self.outcome = Some(outcome);
        self
    }

    /// Records how many attempts were made.
    #[must_use]
    pub fn attempts(mut self, attempts: u32) -> Self {
        self.attempts = Some(attempts);
        self
    }

    /// Suggests other tools, best first.
    #[must_use]
    pub fn alternatives<I, S>(mut self, tools: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.alternatives = tools.into_iter().map(Into::into).collect();
        self
    }

    /// The sentence the model reads: the failure, then what to do about it
    /// (the retry-after hint, else by class: a client failure is the
    /// arguments' fault, except an HTTP 4xx of the transport, a refusal
    /// that neither a retry nor other arguments change; a transient one
    /// may pass; a server one is the tool's), the attempts, the
    /// alternatives.
    #[must_use]
    pub fn message(&self) -> String {
        let mut text = self.message.clone();
        if self.layer.is_none() {
            if let Some(retry_after) = self.retry_after {
                text.push_str(&format!("; retry after {}", secs(retry_after)));
            } else if let Some(outcome) = self.outcome {
                text.push_str(match (outcome.class, outcome.kind) {
                    // An HTTP 4xx of the transport (credentials refused, a
                    // request the HTTP server would not take): nothing the
                    // model's arguments or a retry change.
                    (Some(FailureClass::Client), OutcomeKind::Transport) => {
                        "; the server refused the request: retrying or other arguments will not help"
                    }
                    (Some(FailureClass::Client), _) => {
                        "; the request itself is wrong: change the arguments"
                    }
                    (Some(FailureClass::Transient), _) => "; this may be temporary: retry later",
                    (Some(FailureClass::Server), _) => "; the tool is failing on its side",
                    (None, _) => "",
                });
            }
        }
        if let Some(attempts) = self.attempts.filter(|&a| a > 1) {
            text.push_str(&format!(" ({attempts} attempts)"));
        }
        if !self.alternatives.is_empty() {
            text.push_str("; try: ");
            text.push_str(&self.alternatives.join(", "));
        }
        text
    }

    /// The `tools/call` result: `isError: true`, the message as text, and the
    /// facts as `structuredContent` (`tool`, `error`, `class`, `layer`,
    /// `retryAfterSeconds`, `attempts`, `alternatives`). A report of a
    /// classified failure ([`from_error`](Self::from_error),
    /// [`outcome`](Self::outcome)) also carries the sealed
    /// [`OUTCOME_META_KEY`](crate::classify::OUTCOME_META_KEY) mark in
    /// `_meta`, so the classifier reads the result as the failure it was.
    #[must_use]
    pub fn to_tool_result(&self) -> Value {
        self.to_tool_result_for(false)
    }

    /// [`to_tool_result`](Self::to_tool_result) for a tool that declares an
    /// `outputSchema` when `output_schema`: the facts then go in `_meta`
    /// under [`FAILURE_META_KEY`], not in `structuredContent`, which a
    /// client validates against the tool's schema, an `isError` result's
    /// too (the TypeScript SDK threw on our facts, and the host never saw
    /// the failure's text).
    #[must_use]
    pub fn to_tool_result_for(&self, output_schema: bool) -> Value {
        let mut facts = Map::new();
        facts.insert("tool".into(), Value::from(self.tool.as_str()));
        facts.insert("error".into(), Value::from(self.message.as_str()));
        if let Some(outcome) = self.outcome {
            facts.insert("kind".into(), Value::from(outcome.kind.as_str()));
            if let Some(class) = outcome.class {
                facts.insert("class".into(), Value::from(class.as_str()));
            }
        }
        if let Some(layer) = self.layer {
            facts.insert("layer".into(), Value::from(layer));
        }
        if let Some(retry_after) = self.retry_after {
            facts.insert("retryAfterSeconds".into(), json!(retry_after.as_secs_f64()));
        }
        if let Some(attempts) = self.attempts {
            facts.insert("attempts".into(), Value::from(attempts));
        }
        facts.insert("alternatives".into(), json!(self.alternatives));
        let mut result = if output_schema {
            json!({
                "content": [{"type": "text", "text": self.message()}],
                "isError": true,
                "_meta": {FAILURE_META_KEY: facts},
            })
        } else {
            json!({
                "content": [{"type": "text", "text": self.message()}],
                "structuredContent": {"toolwarden": facts},
                "isError": true,
            })
        };
        if let (Some(outcome), Value::Object(result)) = (self.outcome, &mut result) {
            // The sealed mark that keeps a rendered failure what it was for
            // every layer above (see `classify::OUTCOME_META_KEY`).
            let mut outcome = outcome;
            outcome.retry_after = self.retry_after;
            crate::request::tool_result::insert_meta(
                result,
                crate::classify::OUTCOME_META_KEY,
                crate::classify::outcome_mark(&outcome),
            );
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rejection_is_found_and_explained() {
        let errors: Vec<Box<dyn StdError + Send + Sync>> = vec![
            Box::new(CircuitOpen::new("a", Duration::from_secs(3))),
            Box::new(RateLimited::new("a", Duration::from_millis(250))),
            Box::new(LoopDetected::new("a", 4, LoopPattern::RepeatedFailure)),
            Box::new(RetryBudgetExhausted::new("a", 2)),
            Box::new(BulkheadFull::new("a", 4, Duration::from_millis(30))),
        ];
        let layers: Vec<_> = errors
            .iter()
            .map(|e| as_rejection(e.as_ref()).unwrap().layer())
            .collect();
        assert_eq!(
            layers,
            [
                "circuit_breaker",
                "rate_limit",
                "loop_guard",
                "retry",
                "bulkhead"
            ]
        );
        let report = FailureReport::from_error("a", errors[4].as_ref()).to_tool_result();
        let text = report["content"][0]["text"].as_str().unwrap();
        assert!(
            text.contains("a is busy (4 calls already in flight)"),
            "{text}"
        );
        assert!(text.contains("retry after 30 ms"), "{text}");
        assert_eq!(
            report["structuredContent"]["toolwarden"]["layer"],
            "bulkhead"
        );
        let report = FailureReport::from_error("a", errors[1].as_ref()).to_tool_result();
        assert_eq!(
            report["structuredContent"]["toolwarden"]["retryAfterSeconds"],
            0.25
        );
        assert!(report["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("250 ms"));
        let report = FailureReport::from_error("a", errors[2].as_ref()).to_tool_result();
        assert!(report["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("change approach"));
    }

    #[test]
    fn rejections_are_found_in_the_source_chain() {
        #[derive(Debug)]
        struct Wrapper(RateLimited);
        impl fmt::Display for Wrapper {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("wrapped")
            }
        }
        impl StdError for Wrapper {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                Some(&self.0)
            }
        }
        let err = Wrapper(RateLimited::new("x", Duration::from_secs(1)));
        assert!(as_rejection(&err).is_none());
        assert_eq!(find_rejection(&err).unwrap().layer(), "rate_limit");
    }

    #[test]
    fn plain_failures_say_what_class_they_are() {
        let err = crate::jsonrpc::ErrorObject::new(-32602, "Unknown tool: nope");
        let report = FailureReport::from_error("nope", &err).attempts(1);
        let text = report.message();
        assert!(text.contains("nope failed"), "{text}");
        assert!(text.contains("change the arguments"), "{text}");
        let result = report.to_tool_result();
        assert_eq!(result["structuredContent"]["toolwarden"]["class"], "client");
    }

    #[test]
    fn a_refusal_of_the_http_transport_is_not_blamed_on_the_arguments() {
        let err = crate::classify::HttpStatusError {
            status: 401,
            retry_after: None,
        };
        let text = FailureReport::from_error("search", &err).message();
        assert!(text.contains("HTTP status 401"), "{text}");
        assert!(text.contains("will not help"), "{text}");
        assert!(!text.contains("change the arguments"), "{text}");
    }
}
