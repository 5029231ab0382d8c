//! What happens when a call ends: store a good result, serve a stale one,
//! or degrade to a structured error.

use std::borrow::Cow;
use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::time::Instant;
use toolwarden_core::jsonrpc::{ErrorObject, Id};
use toolwarden_core::{
    BoxError, CallKind, Classify, Event, FailureClass, FailureReport, Fingerprint, LoopDetected,
    McpRequest, McpResponse, Outcome, OutcomeKind, RetryBudgetExhausted,
};

use crate::rank::{floor_char_boundary, push_argument_text, FailedCall, MAX_ARGUMENT_TEXT};
use crate::service::Shared;

/// The `_meta` member that marks a result served from the cache after a
/// failure: `{"stale": true, "ageSeconds": 42, "reason": "..."}`.
pub const STALE_META_KEY: &str = "toolwarden/stale";

/// The `_meta` member added to a tool's own `isError` result when other
/// tools are suggested: `{"tool": ..., "class": ..., "alternatives": [...]}`.
pub const DEGRADED_META_KEY: &str = "toolwarden/degraded";

/// The longest failure reason quoted in a stale mark, in bytes.
const MAX_REASON: usize = 200;

/// What a call's future keeps of its request: the tool name and, when
/// alternatives are ranked, the argument text. A request that shares its
/// params ([`McpRequest::shared_params`]) is kept as that pointer, and the
/// text is made only when a failure asks for it; otherwise both are copied
/// in one allocation.
pub(crate) enum CallFacts {
    /// The request's shared params (`{"name": ..., "arguments": ...}`).
    Shared { params: Arc<Value>, rank: bool },
    /// A copy: the tool name, then (when ranked) a newline and the text.
    Owned { text: String, tool_len: usize },
}

impl CallFacts {
    pub(crate) fn of<R: McpRequest>(request: &R, tool: &str, rank: bool) -> Self {
        match request.shared_params() {
            Some(params) => CallFacts::Shared { params, rank },
            None => CallFacts::new(tool, request.arguments(), rank),
        }
    }

    pub(crate) fn new(tool: &str, arguments: Option<&Map<String, Value>>, rank: bool) -> Self {
        if !rank {
            return CallFacts::Owned {
                text: tool.to_owned(),
                tool_len: tool.len(),
            };
        }
        let mut text = String::with_capacity(tool.len() + 1 + MAX_ARGUMENT_TEXT);
        text.push_str(tool);
        text.push('\n');
        if let Some(arguments) = arguments {
            push_argument_text(&mut text, arguments, MAX_ARGUMENT_TEXT);
        }
        CallFacts::Owned {
            text,
            tool_len: tool.len(),
        }
    }

    pub(crate) fn tool(&self) -> &str {
        match self {
            CallFacts::Shared { params, .. } => {
                params.get("name").and_then(Value::as_str).unwrap_or("")
            }
            CallFacts::Owned { text, tool_len } => &text[..*tool_len],
        }
    }

    fn argument_text(&self) -> Cow<'_, str> {
        match self {
            CallFacts::Shared { params, rank } => {
                let mut text = String::new();
                if let (true, Some(arguments)) =
                    (*rank, params.get("arguments").and_then(Value::as_object))
                {
                    push_argument_text(&mut text, arguments, MAX_ARGUMENT_TEXT);
                }
                Cow::Owned(text)
            }
            CallFacts::Owned { text, tool_len } => {
                Cow::Borrowed(text.get(tool_len + 1..).unwrap_or(""))
            }
        }
    }
}

/// Everything needed to finish one `tools/call` once the inner service answers.
pub(crate) struct CallContext<C> {
    pub(crate) shared: Arc<Shared>,
    pub(crate) classifier: C,
    pub(crate) facts: CallFacts,
    pub(crate) id: Option<Id>,
    /// What the result is stored and looked up under: the call's
    /// fingerprint (scoped to its session with `per_session`). Set only for
    /// calls that may be stored and served: cacheable tool, not a
    /// continuation.
    pub(crate) fingerprint: Option<Fingerprint>,
    /// The call's session, kept only when the circuits are per session
    /// (see [`toolwarden_core::Circuits::keys_by_session`]).
    pub(crate) session: Option<Box<str>>,
}

impl<C> fmt::Debug for CallContext<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallContext")
            .field("tool", &self.facts.tool())
            .field("id", &self.id)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl<C> CallContext<C> {
    pub(crate) fn complete<T>(self, result: Result<T, BoxError>) -> Result<T, BoxError>
    where
        T: McpResponse + Clone + Send + Sync + 'static,
        C: Classify<T>,
    {
        match result {
            Ok(response) => self.on_response(response),
            Err(error) => self.on_error(error),
        }
    }

    fn on_response<T>(self, mut response: T) -> Result<T, BoxError>
    where
        T: McpResponse + Clone + Send + Sync + 'static,
        C: Classify<T>,
    {
        let outcome = self
            .classifier
            .classify_owned(CallKind::ToolCall, &mut response);
        if outcome.is_success() {
            // The classifier is replaceable: the hard rules are checked again here.
            // (A success marked by the standard classifier is neither an
            // error, input required nor a task.) A task is its creator's:
            // served stale to another caller, it would hand them its id.
            let storable = response.rpc_error().is_none()
                && (response.marked_tool_call_success()
                    || (!response.is_tool_error()
                        && !response.is_input_required()
                        && !response.is_task()));
            if let (Some(fingerprint), true) = (self.fingerprint, storable) {
                self.shared
                    .cache
                    .store(fingerprint, response.clone(), Instant::now());
            }
            return Ok(response);
        }
        if serves_stale(&outcome, None) {
            if let Some(stale) = self.stale(|| response_reason(&response)) {
                return Ok(stale);
            }
        }
        if !self.shared.config.degrade {
            return Ok(response);
        }
        if let Some(rpc) = response.rpc_error() {
            let error = ErrorObject {
                code: rpc.code,
                message: rpc.message.to_owned(),
                data: rpc.data.cloned(),
            };
            return Ok(self.degrade(&error, outcome));
        }
        // The tool's own isError result already speaks to the model: keep
        // it, and add the alternatives.
        if response.is_tool_error() {
            let alternatives = self.alternatives(&outcome);
            if !alternatives.is_empty() {
                let tool = self.facts.tool();
                response.push_text(format!(
                    "[{tool} is failing; other tools that may help: {}]",
                    alternatives.join(", ")
                ));
                response.insert_result_meta(
                    DEGRADED_META_KEY,
                    json!({
                        "tool": tool,
                        "kind": outcome.kind.as_str(),
                        "class": outcome.class.map(FailureClass::as_str),
                        "alternatives": alternatives,
                    }),
                );
                self.shared
                    .config
                    .events
                    .emit(&Event::Degraded { key: tool });
            }
        }
        Ok(response)
    }

    fn on_error<T>(self, error: BoxError) -> Result<T, BoxError>
    where
        T: McpResponse + Clone + Send + Sync + 'static,
        C: Classify<T>,
    {
        let outcome = self.classifier.classify_error(error.as_ref());
        if serves_stale(&outcome, Some(error.as_ref())) {
            if let Some(stale) = self.stale(|| truncate(error.to_string())) {
                return Ok(stale);
            }
        }
        if !self.shared.config.degrade {
            return Err(error);
        }
        Ok(self.degrade(error.as_ref(), outcome))
    }

    /// The stored result for this call, re-addressed and marked stale, if
    /// one younger than `max_staleness` exists.
    fn stale<T>(&self, reason: impl FnOnce() -> String) -> Option<T>
    where
        T: McpResponse + Clone + 'static,
    {
        let fingerprint = self.fingerprint?;
        let config = &self.shared.config;
        let (mut response, age) =
            self.shared
                .cache
                .lookup::<T>(&fingerprint, config.max_staleness, Instant::now())?;
        if let Some(id) = &self.id {
            response.set_request_id(id);
        }
        let tool = self.facts.tool();
        let reason = reason();
        if config.stale_note {
            response.push_text(format!(
                "[stale: result from {} ago; {tool} is failing: {reason}]",
                age_text(age)
            ));
        }
        response.insert_result_meta(
            STALE_META_KEY,
            json!({"stale": true, "ageSeconds": age.as_secs(), "reason": reason}),
        );
        config.events.emit(&Event::StaleServed { key: tool, age });
        Some(response)
    }

    /// A structured `isError` result for `error`.
    fn degrade<T: McpResponse>(&self, error: &(dyn StdError + 'static), outcome: Outcome) -> T {
        let tool = self.facts.tool();
        let mut report = FailureReport::from_error(tool, error).outcome(outcome);
        if let Some(exhausted) = find_in_chain::<RetryBudgetExhausted>(error) {
            report = report.attempts(exhausted.attempts());
        }
        let report = report.alternatives(self.alternatives(&outcome));
        self.shared
            .config
            .events
            .emit(&Event::Degraded { key: tool });
        let output_schema = self.shared.config.catalog.has_output_schema(tool);
        T::from_tool_result(self.id.as_ref(), report.to_tool_result_for(output_schema))
    }

    /// Other tools to suggest: none for a client error (the arguments are
    /// wrong, not the tool), else the ranker's best above the relevance
    /// floor, leaving out tools whose circuit is open, tools the
    /// availability check calls unavailable and, unless the failed tool is
    /// destructive itself, tools the catalog treats as destructive (a
    /// failed read must not send the model to `delete_file`). Other
    /// upstreams' tools come first; on an upstream failure
    /// ([`is_upstream_failure`]) the failed tool's upstream offers none.
    fn alternatives(&self, outcome: &Outcome) -> Vec<String> {
        let config = &self.shared.config;
        if config.alternatives == 0 || outcome.class == Some(FailureClass::Client) {
            return Vec::new();
        }
        let tool = self.facts.tool();
        let catalog = &config.catalog;
        let failed_is_destructive = catalog.is_destructive(tool);
        let argument_text = self.facts.argument_text();
        let failed = FailedCall::new(tool)
            .argument_text(&argument_text)
            .upstream_failed(is_upstream_failure(outcome));
        self.shared
            .ranker()
            .ranker
            .suggest(&failed, config.alternatives, |candidate| {
                config
                    .circuits
                    .is_open_for(candidate, self.session.as_deref())
                    || !config.availability.is_available(candidate)
                    || (!failed_is_destructive && catalog.is_destructive(candidate))
            })
    }
}

/// Whether a failure is the upstream's own rather than the tool's: the
/// call's outcome is a transport failure (connection refused or closed, an
/// I/O error, an HTTP error status, an error the classifier does not know)
/// or a timeout, and its class is not `Client`. The server never answered
/// for this tool, so its other tools are not expected to answer either.
/// A JSON-RPC error or an `isError` result is the server answering: the
/// tool failed, not the upstream. A refusal by a toolwarden layer
/// (`CircuitOpen`, `RateLimited`, ...) is neither: whether the upstream is
/// down is for the availability check to say.
fn is_upstream_failure(outcome: &Outcome) -> bool {
    matches!(outcome.kind, OutcomeKind::Transport | OutcomeKind::Timeout)
        && outcome.class != Some(FailureClass::Client)
}

/// Whether a failure may be answered with a stale result: a counted failure
/// (`Transient` or `Server`: the tool is failing) or a rejection by a layer
/// below (`CircuitOpen`, `RateLimited`, `RetryBudgetExhausted`), except
/// `LoopDetected`, since a stale answer would hide the loop from the agent.
/// Never a `Client` failure: bad arguments must reach the model as they are.
fn serves_stale(outcome: &Outcome, error: Option<&(dyn StdError + 'static)>) -> bool {
    if outcome.is_rejection() {
        return error.is_none_or(|e| find_in_chain::<LoopDetected>(e).is_none());
    }
    outcome.is_counted_failure()
}

fn find_in_chain<'a, E: StdError + 'static>(error: &'a (dyn StdError + 'static)) -> Option<&'a E> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

fn response_reason<T: McpResponse>(response: &T) -> String {
    if let Some(rpc) = response.rpc_error() {
        return truncate(format!("JSON-RPC error {}: {}", rpc.code, rpc.message));
    }
    if response.is_tool_error() {
        return match response.first_text() {
            Some(text) => truncate(text.into_owned()),
            None => "the tool returned an error".to_owned(),
        };
    }
    if response.is_empty_tool_result() {
        return "the tool returned an empty result".to_owned();
    }
    "the result was classified as a failure".to_owned()
}

fn truncate(mut text: String) -> String {
    if text.len() > MAX_REASON {
        text.truncate(floor_char_boundary(&text, MAX_REASON));
        text.push('…');
    }
    text
}

fn age_text(age: Duration) -> String {
    match age.as_secs() {
        0 => "less than 1 s".to_owned(),
        s => format!("{s} s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use toolwarden_core::jsonrpc::Response;
    use toolwarden_core::{CircuitOpen, LoopPattern, McpClassifier, RateLimited};

    fn classify(error: &BoxError) -> Outcome {
        <McpClassifier as Classify<Response>>::classify_error(&McpClassifier::new(), error.as_ref())
    }

    #[test]
    fn which_failures_serve_stale() {
        let secs = Duration::from_secs(1);
        let serves = |e: BoxError| serves_stale(&classify(&e), Some(e.as_ref()));
        assert!(serves(Box::new(CircuitOpen::new("t", secs))));
        assert!(serves(Box::new(RateLimited::new("t", secs))));
        assert!(serves(Box::new(RetryBudgetExhausted::new("t", 3))));
        assert!(!serves(Box::new(LoopDetected::new(
            "t",
            5,
            LoopPattern::Repeated
        ))));
        assert!(serves(Box::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset
        ))));
        assert!(serves(Box::new(ErrorObject::new(-32603, "internal"))));
        assert!(!serves(Box::new(ErrorObject::new(-32602, "bad params"))));
    }

    #[test]
    fn upstream_failures_are_transport_failures_and_timeouts() {
        use toolwarden_core::classify::{CallTimedOut, TransportError, TransportErrorKind};
        let upstream = |e: BoxError| is_upstream_failure(&classify(&e));
        for kind in [
            TransportErrorKind::ConnectFailed,
            TransportErrorKind::Closed,
            TransportErrorKind::Io,
        ] {
            assert!(
                upstream(Box::new(TransportError::new(kind, "x"))),
                "{kind:?}"
            );
        }
        assert!(upstream(Box::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused
        ))));
        assert!(upstream(Box::new(std::io::Error::from(
            std::io::ErrorKind::TimedOut
        ))));
        assert!(upstream(Box::new(CallTimedOut {
            after: Duration::from_secs(5)
        })));
        // The server answered: the tool failed, not the upstream.
        assert!(!upstream(Box::new(ErrorObject::new(-32603, "internal"))));
        assert!(!upstream(Box::new(ErrorObject::new(
            -32001,
            "request timeout"
        ))));
        // A refusal by a layer says nothing about the upstream.
        assert!(!upstream(Box::new(CircuitOpen::new(
            "t",
            Duration::from_secs(1)
        ))));
        assert!(!upstream(Box::new(RetryBudgetExhausted::new("t", 3))));
        // A tool error result is the server answering.
        let tool_error = Outcome::failure(OutcomeKind::ToolError, FailureClass::Transient);
        assert!(!is_upstream_failure(&tool_error));
        let client = Outcome::failure(OutcomeKind::Transport, FailureClass::Client);
        assert!(!is_upstream_failure(&client));
    }

    #[test]
    fn reasons_are_bounded() {
        let long = truncate("é".repeat(300));
        assert!(long.len() <= MAX_REASON + '…'.len_utf8());
        assert!(long.ends_with('…'));
        assert_eq!(truncate("short".into()), "short");
        assert_eq!(age_text(Duration::from_millis(300)), "less than 1 s");
        assert_eq!(age_text(Duration::from_secs(42)), "42 s");
    }

    #[test]
    fn call_facts_keep_the_tool_and_the_argument_text() {
        let args = json!({"query": "tokio timeout"});
        let facts = CallFacts::new("search_docs", args.as_object(), true);
        assert_eq!(facts.tool(), "search_docs");
        assert_eq!(facts.argument_text(), "query tokio timeout");
        let facts = CallFacts::new("search_docs", args.as_object(), false);
        assert_eq!((facts.tool(), &*facts.argument_text()), ("search_docs", ""));
        // A request sharing its params is kept as the pointer; the text is
        // the same, made when asked for.
        let request = toolwarden_core::jsonrpc::Request::tool_call(1, "search_docs", args.clone());
        let facts = CallFacts::of(&request, "search_docs", true);
        assert!(matches!(facts, CallFacts::Shared { .. }));
        assert_eq!(facts.tool(), "search_docs");
        assert_eq!(facts.argument_text(), "query tokio timeout");
        let facts = CallFacts::of(&request, "search_docs", false);
        assert_eq!((facts.tool(), &*facts.argument_text()), ("search_docs", ""));
    }
}
