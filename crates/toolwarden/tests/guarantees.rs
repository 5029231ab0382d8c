//! The standard stack's guarantees (the `toolwarden` crate docs,
//! "Guarantees"), proved on the whole stack: one property test that drives
//! it with random agents against an adversarial upstream and checks every
//! guarantee after every call against a simple reference, a second whose
//! calls overlap (checking the guarantees that do not depend on the order
//! of the calls once all are answered), and a named regression test for
//! each scenario of issue 15 that broke one.
//!
//! Time is paused: waits, backoffs, hangs and timeouts take no real time.

#![cfg(feature = "stack")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

use proptest::prelude::*;
use serde_json::{json, Value};
use toolwarden::rate_limit::Rate;
use toolwarden::stack::{StandardService, StandardStack, StandardStackLayer};
use toolwarden_core::classify::{TransportErrorKind, OUTCOME_META_KEY};
use toolwarden_core::jsonrpc::{ErrorObject, Id, Request, Response};
use toolwarden_core::testing::{MockMcp, ReadyChecked, Step};
use toolwarden_core::{
    fingerprint, BoxError, Classify, McpClassifier, McpRequest, McpResponse, OutcomeKind,
    ToolAnnotations, ToolCatalog, ToolInfo,
};
use tower::util::MapResponse;
use tower::{Layer, Service, ServiceExt};

// ---------------------------------------------------------------------------
// The world: four tools, an adversarial upstream, a stack over it.
// ---------------------------------------------------------------------------

/// The tools the agents call: read-only, idempotent, destructive, and one
/// without annotations. Only the first two are safe to repeat, and only
/// when the catalog is trusted.
const TOOLS: [&str; 4] = ["search_docs", "get_status", "delete_record", "plain"];

fn catalog(trusted: bool) -> ToolCatalog {
    let catalog = ToolCatalog::new();
    let hints = |read_only, idempotent, destructive| ToolAnnotations {
        read_only_hint: Some(read_only),
        idempotent_hint: Some(idempotent),
        destructive_hint: Some(destructive),
        ..Default::default()
    };
    catalog.insert(
        ToolInfo::new("search_docs", "Search the documentation")
            .annotations(hints(true, true, false)),
    );
    catalog.insert(
        ToolInfo::new("get_status", "Read a job's status").annotations(hints(false, true, false)),
    );
    catalog.insert(
        ToolInfo::new("delete_record", "Delete a record").annotations(hints(false, false, true)),
    );
    catalog.insert(ToolInfo::new("plain", "A tool without annotations"));
    catalog.set_trusted(trusted);
    catalog
}

/// Whether the catalog lets the stack repeat `tool`.
fn safe_to_repeat(tool: &str, trusted: bool) -> bool {
    trusted && matches!(tool, "search_docs" | "get_status")
}

/// What the upstream does with one arrival.
#[derive(Debug, Clone)]
enum Answer {
    /// A result with text.
    Ok(String),
    /// An `isError` result with text.
    ToolError(String),
    /// An empty result.
    Empty,
    /// Any JSON as the result.
    Json(Value),
    /// A JSON-RPC error.
    Rpc(i64, Option<Value>),
    /// The connection could not be made: the request never left.
    BeforeSent,
    /// The same, found only after 700 ms (a connect timing out): a hedge
    /// (sent after 500 ms) may have left meanwhile.
    SlowBeforeSent,
    /// A result with text, answered under another request's id.
    WrongId(String),
    /// The connection closed after the request left.
    AfterSent,
    /// No answer, ever (the attempt timeout ends it).
    Hang,
}

impl Answer {
    fn step(&self) -> Step {
        match self {
            Answer::Ok(text) => Step::ok(text),
            Answer::ToolError(text) => Step::tool_error(text),
            Answer::Empty => Step::Result(json!({"content": []})),
            Answer::Json(value) => Step::Result(value.clone()),
            Answer::Rpc(code, data) => {
                let mut error = ErrorObject::new(*code, "upstream says no");
                error.data = data.clone();
                Step::RpcError(error)
            }
            Answer::BeforeSent => Step::Transport(TransportErrorKind::ConnectFailed),
            Answer::SlowBeforeSent => {
                Step::Transport(TransportErrorKind::ConnectFailed).after(Duration::from_millis(700))
            }
            Answer::WrongId(text) => Step::Result(
                json!({"content": [{"type": "text", "text": text}], "readdressed": true}),
            ),
            Answer::AfterSent => Step::closed(),
            Answer::Hang => Step::Hang,
        }
    }

    /// Whether the request reached the server.
    fn sent(&self) -> bool {
        !matches!(self, Answer::BeforeSent | Answer::SlowBeforeSent)
    }
}

/// Retry hints as a hostile or careless server writes them.
fn hint() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(1e20)),
        Just(json!(1.7e308)),
        Just(json!(-1)),
        Just(json!("NaN")),
        Just(json!("12")),
        Just(json!(null)),
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        (0u32..4).prop_map(|s| json!(s)),
        any::<f64>().prop_map(|f| json!(f)),
    ]
}

fn rpc_data() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        Just(None),
        hint().prop_map(|h| Some(json!({ "retryAfter": h }))),
        hint().prop_map(|h| Some(json!({ "retryAfterMs": h }))),
        hint().prop_map(|h| Some(json!({ "retry_after": h }))),
        hint().prop_map(Some),
        Just(Some(json!([1, 2, 3]))),
    ]
}

fn error_text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("Rate limit exceeded, retry after 1e30 hours".to_owned()),
        Just("service unavailable, try again in 99999999999999999999 minutes".to_owned()),
        Just("Invalid input: timeout must be between 1 and 60".to_owned()),
        Just("MCP error -32602: Tool nope not found".to_owned()),
        Just("MCP error -32023: slow down, retry after 2 s".to_owned()),
        Just("Error executing tool: boom".to_owned()),
        Just("timed out".to_owned()),
        "\\PC{0,40}",
    ]
}

/// Results that are not what a well-behaved server sends.
fn odd_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        "\\PC{0,12}".prop_map(Value::from),
    ];
    let arbitrary = leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-zA-Z_]{1,12}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    prop_oneof![
        arbitrary,
        Just(json!({"isError": "yes"})),
        Just(json!({"isError": true})),
        Just(json!({"content": "not an array"})),
        Just(json!({"content": [{"type": "text", "text": 5}], "isError": true})),
        Just(json!({"resultType": "input_required"})),
        hint().prop_map(|h| json!({"isError": true, "content": [{"type": "text", "text": "rate limited"}], "_meta": {"retryAfter": h}})),
        // A server copying our refusal mark, without this process's seal.
        hint().prop_map(|h| json!({
            "isError": true,
            "content": [{"type": "text", "text": "refused"}],
            "_meta": {OUTCOME_META_KEY: {"kind": "rejected", "class": "transient", "retryAfter": h, "seal": "0123456789abcdef"}},
        })),
    ]
}

fn answer() -> impl Strategy<Value = Answer> {
    prop_oneof![
        4 => "[a-z ]{1,16}".prop_map(Answer::Ok),
        3 => error_text().prop_map(Answer::ToolError),
        1 => Just(Answer::Empty),
        2 => odd_json().prop_map(Answer::Json),
        2 => (prop_oneof![Just(-32023i64), Just(-32602), Just(-32603), Just(-32000), Just(-32700), any::<i64>()], rpc_data())
            .prop_map(|(code, data)| Answer::Rpc(code, data)),
        2 => Just(Answer::BeforeSent),
        1 => Just(Answer::SlowBeforeSent),
        1 => "[a-z ]{1,16}".prop_map(Answer::WrongId),
        2 => Just(Answer::AfterSent),
        1 => Just(Answer::Hang),
    ]
}

/// One call an agent makes.
#[derive(Debug, Clone)]
struct Call {
    /// Which of the two services (two client connections) it goes through.
    connection: usize,
    tool: usize,
    /// Which of two argument objects it carries.
    variant: u8,
    /// How long the agent thinks before it.
    wait: Duration,
    /// Drops the call's future after this long, if it has not answered.
    drop_after: Option<Duration>,
}

fn call() -> impl Strategy<Value = Call> {
    (
        0..2usize,
        0..TOOLS.len(),
        0..2u8,
        prop_oneof![Just(0u64), 0..500u64, 0..20_000u64],
        prop::option::weighted(0.1, 0..3_000u64),
    )
        .prop_map(|(connection, tool, variant, wait, drop_after)| Call {
            connection,
            tool,
            variant,
            wait: Duration::from_millis(wait),
            drop_after: drop_after.map(Duration::from_millis),
        })
}

/// The stack's configuration in one case.
#[derive(Debug, Clone)]
struct Setup {
    trusted: bool,
    /// Errors come up as errors (no rendering, no degraded answers), so the
    /// test can read them as the layers below produced them.
    raw_errors: bool,
    /// The optional layers too, with this bulkhead cap: coalescing,
    /// hedging (after 500 ms, for the tools the catalog calls safe to send
    /// twice) and a bulkhead of 1 attempt in flight per tool (a hedge is
    /// refused by it) or 2 (a hedge reaches the server).
    optional: Option<u32>,
    /// With the optional layers: hedging decided per tool against the
    /// catalog, `get_status` (only idempotent: the catalog never hedges
    /// it) configured safe to hedge after its own p95, `search_docs`
    /// (read-only and idempotent) configured unsafe.
    hedge_overrides: bool,
}

impl Setup {
    /// Whether the stack may send a hedge of `tool`.
    fn hedges(&self, tool: &str) -> bool {
        match (self.optional, self.hedge_overrides) {
            (None, _) => false,
            (Some(_), true) => tool == "get_status",
            (Some(_), false) => self.trusted && tool == "search_docs",
        }
    }
}

/// The per-tool quota: 20 calls a minute, burst 4.
const PER_MINUTE: u64 = 20;
const BURST: u64 = 4;
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
const RETRY_DEADLINE: Duration = Duration::from_secs(8);
/// No call may take longer than this (the deadline plus the longest
/// backoff and rate-limit wait): past it, a call has no answer.
const ANSWER_BOUND: Duration = Duration::from_secs(120);

fn stack(setup: &Setup) -> StandardStackLayer {
    let degrade = !setup.raw_errors;
    let mut builder = StandardStack::builder();
    if let Some(cap) = setup.optional {
        let overrides = setup.hedge_overrides;
        builder = builder
            .coalesce(|b| b)
            .hedge(move |b| {
                let b = b.delay(Duration::from_millis(500));
                if !overrides {
                    return b;
                }
                b.tool("get_status", |t| {
                    t.safe_to_hedge(true).percentile(Some(0.95)).min_samples(1)
                })
                .tool("search_docs", |t| t.safe_to_hedge(false))
            })
            .bulkhead(move |b| b.max_concurrent(cap));
    }
    builder
        .catalog(catalog(setup.trusted))
        .attempt_timeout(ATTEMPT_TIMEOUT)
        .retry_deadline(RETRY_DEADLINE)
        .render_errors(!setup.raw_errors)
        .circuit_breaker(|b| b.failure_threshold(3))
        .rate_limit(|b| b.per_tool(Rate::per_minute(PER_MINUTE as u32), BURST as u32))
        .retry(|b| b.max_attempts(3))
        .fallback_cache(move |b| b.degrade(degrade))
        .build()
        .unwrap()
}

/// The upstream as the stack sees it: the scripted server, behind a
/// transport that answers a result carrying `"readdressed": true` under
/// another request's id ([`Answer::WrongId`]).
type Upstream = MapResponse<ReadyChecked<MockMcp>, fn(Response) -> Response>;

fn upstream_service(upstream: MockMcp) -> Upstream {
    fn readdress(mut response: Response) -> Response {
        if let Ok(result) = &response.payload {
            if result.get("readdressed").is_some() {
                response.id = Id::String("someone else's".into());
            }
        }
        response
    }
    ReadyChecked::new(upstream).map_response(readdress as fn(Response) -> Response)
}

type Service_ = StandardService<Upstream>;

fn request(number: u64, call: &Call) -> Request {
    let tool = TOOLS[call.tool];
    let arguments = if call.variant == 0 {
        json!({"query": "tower timeout", "limit": 5})
    } else {
        json!({"query": "governor quota"})
    };
    Request::new(
        Id::Number(number as i64),
        "tools/call",
        Some(json!({
            "name": tool,
            "arguments": arguments,
            // The call's number, for the reference; `_meta` never enters a
            // fingerprint, so it does not make calls different.
            "_meta": {"callNumber": number},
        })),
    )
}

fn call_number(request: &Request) -> Option<u64> {
    request
        .params
        .as_ref()?
        .pointer("/_meta/callNumber")?
        .as_u64()
}

// ---------------------------------------------------------------------------
// The reference: what the answers and the upstream's log must satisfy.
// ---------------------------------------------------------------------------

/// What the agent got for one call, as the reference reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// A refusal by one of our layers (rendered, or a rejection error).
    Refused { by_loop_guard: bool, cycle: bool },
    /// The upstream was down: transport failure or timeout.
    Down,
    /// Anything else: the tool's own answer (good or bad), or stale.
    Answered,
    /// The agent dropped the call.
    Dropped,
}

fn seen_in_result(result: &Value) -> Seen {
    // Our renderer's facts; the upstream in this test never writes them.
    let Some(facts) = result.pointer("/structuredContent/toolwarden") else {
        return Seen::Answered;
    };
    if let Some(layer) = facts.get("layer").and_then(Value::as_str) {
        let error = facts.get("error").and_then(Value::as_str).unwrap_or("");
        return Seen::Refused {
            by_loop_guard: layer == "loop_guard",
            cycle: error.contains("cycle"),
        };
    }
    match facts.get("kind").and_then(Value::as_str) {
        Some("transport" | "timeout") => Seen::Down,
        _ => Seen::Answered,
    }
}

fn seen_in_error(error: &BoxError) -> Seen {
    let outcome = <McpClassifier as Classify<Response>>::classify_error(
        &McpClassifier::new(),
        error.as_ref(),
    );
    match outcome.kind {
        OutcomeKind::Rejected => Seen::Refused {
            by_loop_guard: error.is::<toolwarden_core::LoopDetected>(),
            cycle: error
                .downcast_ref::<toolwarden_core::LoopDetected>()
                .is_some_and(|l| matches!(l.pattern(), toolwarden_core::LoopPattern::Cycle { .. })),
        },
        OutcomeKind::Transport | OutcomeKind::Timeout => Seen::Down,
        _ => Seen::Answered,
    }
}

/// The world of one case, and its checks.
struct World {
    setup: Setup,
    upstream: MockMcp,
    layer: StandardStackLayer,
    services: [Service_; 2],
    /// Per tool, the answers pushed to the upstream, in arrival order.
    answers: HashMap<&'static str, Vec<Answer>>,
    /// What each call got, in order: (fingerprint, what).
    history: Vec<(u128, Seen)>,
    /// Per tool, the refusals the agents saw.
    refusals: HashMap<&'static str, u64>,
    start: tokio::time::Instant,
}

impl World {
    fn new(setup: Setup, answers: &[Answer]) -> Self {
        let upstream = MockMcp::new();
        let mut per_tool = HashMap::new();
        // Each tool gets the whole list of answers, each starting at a
        // different place, so the tools do not fail in lockstep.
        for (i, tool) in TOOLS.iter().enumerate() {
            let mut list: Vec<Answer> = answers.to_vec();
            list.rotate_left(i * answers.len() / TOOLS.len());
            // Past the script, the upstream answers well.
            upstream.push(tool, list.iter().map(Answer::step));
            per_tool.insert(*tool, list);
        }
        let layer = stack(&setup);
        let services = [
            layer.layer(upstream_service(upstream.clone())),
            layer.clone().layer(upstream_service(upstream.clone())),
        ];
        World {
            setup,
            upstream,
            layer,
            services,
            answers: per_tool,
            history: Vec::new(),
            refusals: HashMap::new(),
            start: tokio::time::Instant::now(),
        }
    }

    /// Makes call `number` and checks every guarantee.
    async fn step(&mut self, number: u64, call: &Call) -> Result<(), TestCaseError> {
        tokio::time::sleep(call.wait).await;
        let tool = TOOLS[call.tool];
        let req = request(number, call);
        let fp = fingerprint(tool, req.arguments()).0;
        let svc = &mut self.services[call.connection];
        let answer = async {
            let svc = svc.ready().await?;
            svc.call(req).await
        };
        let bound = call.drop_after.unwrap_or(ANSWER_BOUND);
        let answer = tokio::time::timeout(bound, answer).await;
        let seen = self.judge(number, call, answer)?;
        if let Seen::Refused { .. } = seen {
            *self.refusals.entry(tool).or_default() += 1;
        }
        self.history.push((fp, seen));
        if checked("at_most_once") {
            self.check_at_most_once(tool, number)?;
        }
        if checked("quota") {
            self.check_quota(tool)?;
        }
        if checked("loop") {
            self.check_loop_refusal(fp, seen, number, tool)?;
        }
        if checked("rejected") {
            self.check_rejections_counted(tool)?;
        }
        if checked("hedge") {
            self.check_hedges_only_safe()?;
        }
        Ok(())
    }

    /// Guarantee: a hedge (a second copy, its id marked `#tw-hedge`) is
    /// sent only for a tool the trusted catalog calls read-only and
    /// idempotent, never for one only idempotent or without hints; with
    /// per-tool overrides, only for the tool configured safe (and never
    /// for the one configured unsafe, whatever the catalog says).
    fn check_hedges_only_safe(&self) -> Result<(), TestCaseError> {
        for request in self.upstream.requests() {
            let hedge = matches!(&request.id, Id::String(id) if id.contains("#tw-hedge"));
            if !hedge {
                continue;
            }
            let tool = request.tool_name().unwrap_or("");
            prop_assert!(
                self.setup.hedges(tool),
                "a hedge of {tool} reached the server ({:?}, catalog trusted: {}, overrides: {})",
                request.id,
                self.setup.trusted,
                self.setup.hedge_overrides
            );
        }
        Ok(())
    }

    /// What the agent saw of call `number`, given its answer (or that
    /// none came within its bound), checking the guarantees of one answer:
    /// an answer within the bound unless the agent dropped the call, the
    /// caller's id back, no error through the rendering stack, and an
    /// error's "never sent" true.
    fn judge(
        &self,
        number: u64,
        call: &Call,
        answer: Result<Result<Response, BoxError>, tokio::time::error::Elapsed>,
    ) -> Result<Seen, TestCaseError> {
        let tool = TOOLS[call.tool];
        Ok(match answer {
            Err(_) if call.drop_after.is_some() => Seen::Dropped,
            Err(_) => {
                return Err(TestCaseError::fail(format!(
                    "call {number} to {tool}: no answer within {ANSWER_BOUND:?}"
                )))
            }
            Ok(Ok(response)) => {
                prop_assert_eq!(
                    &response.id,
                    &Id::Number(number as i64),
                    "call {} to {}: the caller's id comes back",
                    number,
                    tool
                );
                match &response.payload {
                    Ok(result) => seen_in_result(result),
                    Err(_) => Seen::Answered,
                }
            }
            Ok(Err(error)) => {
                prop_assert!(
                    self.setup.raw_errors,
                    "call {number} to {tool}: an error reached the agent through the rendering stack: {error}"
                );
                // Guarantee: an error that says the request never left is true.
                let outcome = <McpClassifier as Classify<Response>>::classify_error(
                    &McpClassifier::new(),
                    error.as_ref(),
                );
                if outcome.before_sent && checked("before_sent") {
                    let sent = self.sent_attempts(tool, number);
                    prop_assert_eq!(
                        sent, 0,
                        "call {} to {}: reported as never sent ({}), but {} attempt(s) reached the server",
                        number, tool, error, sent
                    );
                }
                seen_in_error(&error)
            }
        })
    }

    /// The arrivals of call `number` at the upstream, with the answer each got.
    fn arrivals(&self, tool: &str, number: u64) -> Vec<&Answer> {
        let answers = &self.answers[tool];
        self.upstream
            .requests()
            .iter()
            .filter(|r| r.tool_name() == Some(tool))
            .enumerate()
            .filter(|(_, r)| call_number(r) == Some(number))
            .filter_map(|(i, _)| answers.get(i))
            .collect()
    }

    fn sent_attempts(&self, tool: &str, number: u64) -> usize {
        self.arrivals(tool, number)
            .iter()
            .filter(|a| a.sent())
            .count()
    }

    /// Guarantee: a tool that is not safe to repeat reaches the server at
    /// most once per call, unless the failure came before sending; one
    /// configured safe to hedge (but not to repeat) at most twice, its
    /// attempt and its hedge, never retried.
    fn check_at_most_once(&self, tool: &str, number: u64) -> Result<(), TestCaseError> {
        if safe_to_repeat(tool, self.setup.trusted) {
            return Ok(());
        }
        let sent = self.sent_attempts(tool, number);
        let most = 1 + usize::from(self.setup.hedges(tool));
        prop_assert!(
            sent <= most,
            "call {number} to {tool} (not safe to repeat) reached the server {sent} times"
        );
        Ok(())
    }

    /// Guarantee: services built from one stack share its quotas. Every
    /// attempt takes a token, so the upstream never sees more arrivals of a
    /// tool than the burst plus what the rate refilled.
    fn check_quota(&self, tool: &str) -> Result<(), TestCaseError> {
        let arrivals = self.upstream.calls(tool) as u64;
        let elapsed = self.start.elapsed().as_millis() as u64;
        let allowed = BURST + elapsed * PER_MINUTE / 60_000 + 1;
        prop_assert!(
            arrivals <= allowed,
            "{tool}: {arrivals} arrivals in {elapsed} ms, the shared quota allows {allowed}"
        );
        Ok(())
    }

    /// Guarantee: refusals by our own layers and an upstream that is down
    /// build no loop. A loop-guard refusal (other than a cycle) needs at
    /// least three earlier identical calls that the tool itself answered.
    fn check_loop_refusal(
        &self,
        fp: u128,
        seen: Seen,
        number: u64,
        tool: &str,
    ) -> Result<(), TestCaseError> {
        let Seen::Refused {
            by_loop_guard: true,
            cycle: false,
        } = seen
        else {
            return Ok(());
        };
        let earlier = &self.history[..self.history.len() - 1];
        let answered = earlier
            .iter()
            .filter(|(f, s)| *f == fp && *s == Seen::Answered)
            .count();
        prop_assert!(
            answered >= 3,
            "call {number} to {tool} refused as a loop after only {answered} identical calls the tool answered \
             (the rest were our own refusals, or the upstream down): {:?}",
            earlier.iter().filter(|(f, _)| *f == fp).map(|(_, s)| s).collect::<Vec<_>>()
        );
        Ok(())
    }

    /// Guarantee: observability counts every refusal as `rejected`, and a
    /// refusal is never counted as a failure of the tool.
    fn check_rejections_counted(&self, tool: &str) -> Result<(), TestCaseError> {
        let snapshot = self.layer.stats().snapshot();
        let rejected = snapshot.tool(tool).map_or(0, |s| s.outcomes.rejected);
        let refusals = self.refusals.get(tool).copied().unwrap_or(0);
        prop_assert_eq!(
            rejected,
            refusals,
            "{}: observability counted {} rejections, the agents saw {} refusals",
            tool,
            rejected,
            refusals
        );
        Ok(())
    }
}

/// Whether the check `name` runs: all of them, unless
/// `TOOLWARDEN_GUARANTEE` names one (to see, on older code, which guarantee
/// a case breaks first). One answer per call and no panic are always
/// checked.
fn checked(name: &str) -> bool {
    std::env::var("TOOLWARDEN_GUARANTEE").map_or(true, |only| only == name)
}

/// A current-thread runtime on a paused clock: waits take no real time.
fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}

fn run_case(setup: Setup, answers: Vec<Answer>, calls: Vec<Call>) -> Result<(), TestCaseError> {
    paused_runtime().block_on(async move {
        let mut world = World::new(setup, &answers);
        for (i, call) in calls.iter().enumerate() {
            world.step(i as u64 + 1, call).await?;
        }
        Ok(())
    })
}

/// The agents' calls side by side: call `n` starts `wait` after the case
/// began (not after the call before it) on a clone of its connection's
/// service, so calls overlap, identical ones are coalesced, and a
/// connection's calls race each other through one stack. The checks that
/// do not depend on the order of the calls run once every call is
/// answered (or dropped): one answer per call with the caller's id, an
/// error's "never sent" is true, at most one arrival per call of a tool
/// not safe to repeat, the shared quota, hedges only of the safe tool, and
/// observability's `rejected` equal to the refusals the agents saw.
fn run_concurrent_case(
    setup: Setup,
    answers: Vec<Answer>,
    calls: Vec<Call>,
) -> Result<(), TestCaseError> {
    paused_runtime().block_on(async move {
        let mut world = World::new(setup, &answers);
        let tasks: Vec<_> = calls
            .iter()
            .enumerate()
            .map(|(i, call)| {
                let number = i as u64 + 1;
                let mut svc = world.services[call.connection].clone();
                let req = request(number, call);
                let (wait, drop_after) = (call.wait, call.drop_after);
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    let answer = async {
                        let svc = svc.ready().await?;
                        svc.call(req).await
                    };
                    tokio::time::timeout(drop_after.unwrap_or(ANSWER_BOUND), answer).await
                })
            })
            .collect();
        for (i, task) in tasks.into_iter().enumerate() {
            let number = i as u64 + 1;
            let call = &calls[i];
            let tool = TOOLS[call.tool];
            let answer = task
                .await
                .map_err(|e| TestCaseError::fail(format!("call {number}: {e}")))?;
            let seen = world.judge(number, call, answer)?;
            if let Seen::Refused { .. } = seen {
                *world.refusals.entry(tool).or_default() += 1;
            }
            world.check_at_most_once(tool, number)?;
        }
        for tool in TOOLS {
            world.check_quota(tool)?;
            world.check_rejections_counted(tool)?;
        }
        world.check_hedges_only_safe()
    })
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    /// Every guarantee, after every call, for random agents against an
    /// adversarial upstream.
    #[test]
    fn the_stack_keeps_its_guarantees_against_any_upstream(
        trusted in any::<bool>(),
        raw_errors in any::<bool>(),
        optional in prop::option::of(1..=2u32),
        hedge_overrides in any::<bool>(),
        answers in prop::collection::vec(answer(), 1..24),
        calls in prop::collection::vec(call(), 1..40),
    ) {
        run_case(Setup { trusted, raw_errors, optional, hedge_overrides }, answers, calls)?;
    }

    /// The guarantees that do not depend on the order of the calls, for
    /// random agents whose calls overlap (see [`run_concurrent_case`]).
    #[test]
    fn the_stack_keeps_its_guarantees_when_calls_overlap(
        trusted in any::<bool>(),
        raw_errors in any::<bool>(),
        optional in prop::option::of(1..=2u32),
        hedge_overrides in any::<bool>(),
        answers in prop::collection::vec(answer(), 1..24),
        calls in prop::collection::vec(call(), 1..40),
    ) {
        run_concurrent_case(Setup { trusted, raw_errors, optional, hedge_overrides }, answers, calls)?;
    }
}

// ---------------------------------------------------------------------------
// Regression tests: the scenarios of issue 15, through the whole stack.
// ---------------------------------------------------------------------------

async fn send(
    svc: &mut Service_,
    id: i64,
    tool: &str,
    arguments: Value,
) -> Result<Response, BoxError> {
    svc.ready()
        .await?
        .call(Request::tool_call(id, tool, arguments))
        .await
}

/// Scenario 1: a `-32023` whose `data` asks for 1e20 s (or 1e23 ms)
/// panicked every layer's response future.
#[tokio::test(start_paused = true)]
async fn regression_15_1_a_huge_retry_hint_answers_instead_of_panicking() {
    for data in [
        json!({"retryAfter": 1e20}),
        json!({"retryAfterMs": 1e23}),
        json!(1.7e308),
    ] {
        let mut error = ErrorObject::new(-32023, "rate limited");
        error.data = Some(data);
        let upstream = MockMcp::new().default_step("lookup", Step::RpcError(error));
        let layer = stack(&Setup {
            trusted: true,
            raw_errors: false,
            optional: None,
            hedge_overrides: false,
        });
        let mut svc = layer.layer(upstream_service(upstream));
        let answer = send(&mut svc, 1, "lookup", json!({"q": 1})).await.unwrap();
        assert_eq!(answer.id, Id::Number(1));
    }
}

/// Scenario 2: with a quota of one call a minute, three identical calls
/// refused by the rate limit made the loop guard refuse the fifth, and
/// still refuse it after the quota refilled.
#[tokio::test(start_paused = true)]
async fn regression_15_2_rate_limit_refusals_build_no_loop() {
    let upstream = MockMcp::new().default_step("lookup", Step::ok("found it"));
    let layer = StandardStack::builder()
        .rate_limit(|b| b.per_tool(Rate::per_minute(1), 1))
        .build()
        .unwrap();
    let mut svc = layer.layer(upstream_service(upstream.clone()));
    let args = json!({"key": "a"});
    let first = send(&mut svc, 1, "lookup", args.clone()).await.unwrap();
    assert_eq!(
        seen_in_result(first.payload.as_ref().unwrap()),
        Seen::Answered
    );
    for id in 2..=4 {
        let refused = send(&mut svc, id, "lookup", args.clone()).await.unwrap();
        let result = refused.payload.as_ref().unwrap();
        assert_eq!(
            result["structuredContent"]["toolwarden"]["layer"], "rate_limit",
            "{result}"
        );
    }
    let fifth = send(&mut svc, 5, "lookup", args.clone()).await.unwrap();
    let result = fifth.payload.as_ref().unwrap();
    assert_eq!(
        result["structuredContent"]["toolwarden"]["layer"], "rate_limit",
        "still the rate limit, not the loop guard: {result}"
    );
    tokio::time::sleep(Duration::from_secs(61)).await;
    let later = send(&mut svc, 6, "lookup", args).await.unwrap();
    assert_eq!(
        seen_in_result(later.payload.as_ref().unwrap()),
        Seen::Answered,
        "served once the quota refilled"
    );
    assert_eq!(upstream.calls("lookup"), 2);
    // And observability counted the four refusals as rejections.
    let stats = layer.stats().snapshot();
    let lookup = stats.tool("lookup").unwrap();
    assert_eq!(lookup.outcomes.rejected, 4);
    assert_eq!(lookup.outcomes.success, 2);
}

/// Scenario 4: the retry deadline cut an attempt that had reached the
/// server and reported the previous attempt's "could not connect": a
/// caller trusting it would run a destructive tool twice.
#[tokio::test(start_paused = true)]
async fn regression_15_4_a_deadline_cut_never_reports_a_sent_call_as_unsent() {
    let upstream = MockMcp::new().script(
        "delete_record",
        [
            Step::Transport(TransportErrorKind::ConnectFailed),
            Step::Hang,
        ],
    );
    let layer = StandardStack::builder()
        .catalog(catalog(true))
        .attempt_timeout(Duration::from_secs(10))
        .retry_deadline(Duration::from_secs(10))
        .render_errors(false)
        .fallback_cache(|b| b.degrade(false))
        .build()
        .unwrap();
    let mut svc = layer.layer(upstream_service(upstream.clone()));
    let error = send(&mut svc, 1, "delete_record", json!({"id": 7}))
        .await
        .unwrap_err();
    assert_eq!(
        upstream.calls("delete_record"),
        2,
        "the retry after the refused connection was sent"
    );
    let outcome = <McpClassifier as Classify<Response>>::classify_error(
        &McpClassifier::new(),
        error.as_ref(),
    );
    assert!(
        !outcome.before_sent,
        "the second attempt reached the server, yet: {error}"
    );
}

/// Scenario 5: `StandardStackLayer` promised that services built from it
/// share quotas, budgets, caches and loop histories; the rate limit, the
/// fallback cache and the loop guard each made fresh state per `layer()`.
#[tokio::test(start_paused = true)]
async fn regression_15_5_services_from_one_stack_share_quotas_caches_and_loop_histories() {
    let upstream = MockMcp::new();
    let layer = StandardStack::builder()
        .catalog(catalog(true))
        .rate_limit(|b| b.tool("get_status", |b| b.per_tool(Rate::per_minute(1), 2)))
        .build()
        .unwrap();
    // One service per client connection, as a server would build them.
    let mut connections = [
        layer.layer(upstream_service(upstream.clone())),
        layer.clone().layer(upstream_service(upstream.clone())),
    ];

    // Quota: two calls in all, whichever connection makes them.
    for i in 0..4 {
        send(
            &mut connections[i % 2],
            i as i64,
            "get_status",
            json!({"job": i}),
        )
        .await
        .unwrap();
    }
    assert_eq!(
        upstream.calls("get_status"),
        2,
        "one quota for both connections"
    );

    // Cache: a result stored through one connection is served stale through the other.
    upstream.push("search_docs", [Step::ok("the docs")]);
    send(&mut connections[0], 10, "search_docs", json!({"q": "x"}))
        .await
        .unwrap();
    layer.registry().force_open("search_docs");
    let stale = send(&mut connections[1], 11, "search_docs", json!({"q": "x"}))
        .await
        .unwrap();
    assert_eq!(
        stale.payload.as_ref().unwrap()["_meta"]["toolwarden/stale"]["stale"],
        true
    );

    // Loop history: failing calls through either connection add up.
    upstream.set_default("plain", Step::tool_error("Error executing tool: boom"));
    for i in 0..3 {
        let answer = send(
            &mut connections[i % 2],
            20 + i as i64,
            "plain",
            json!({"x": 1}),
        )
        .await
        .unwrap();
        assert_eq!(
            seen_in_result(answer.payload.as_ref().unwrap()),
            Seen::Answered
        );
    }
    let fourth = send(&mut connections[1], 30, "plain", json!({"x": 1}))
        .await
        .unwrap();
    assert_eq!(
        fourth.payload.as_ref().unwrap()["structuredContent"]["toolwarden"]["layer"],
        "loop_guard",
        "the fourth identical failing call is a loop, whichever connection made the others"
    );
}

/// Regression (found by running the composed stack): a task the server
/// created for a call (2026-07-28 `resultType: "task"`, or a 2025-11-25
/// `CreateTaskResult`) has no content, and every layer took it for an
/// empty result, a failure of class Server: a read-only tool's call was
/// sent three times (three tasks, two orphaned), five accepted calls of
/// another opened its circuit, the fourth identical one was refused as a
/// failing loop. A task is the server accepting the call: a success for
/// every layer, and not a result the fallback cache keeps (the task is its
/// creator's; served stale, it would hand another caller its id).
#[tokio::test(start_paused = true)]
async fn a_task_is_a_success_for_every_layer_and_never_served_stale() {
    for task in [
        json!({"resultType": "task", "task": {"taskId": "t-1", "status": "working"}}),
        json!({"task": {"taskId": "t-1", "status": "working", "ttl": 60000}}),
    ] {
        let upstream = MockMcp::new();
        let layer = StandardStack::builder()
            .catalog(catalog(true))
            .circuit_breaker(|b| b.failure_threshold(3))
            .build()
            .unwrap();
        let mut svc = layer.layer(upstream_service(upstream.clone()));

        // A tool safe to repeat: one call, one task.
        upstream.push("search_docs", [Step::Result(task.clone())]);
        let answer = send(&mut svc, 1, "search_docs", json!({"q": "x"}))
            .await
            .unwrap();
        assert!(answer.is_task(), "{answer:?}");
        assert_eq!(upstream.calls("search_docs"), 1, "the task was retried");

        // A tool not safe to repeat, the same call six times: never
        // refused, by the breaker or the loop guard.
        upstream.set_default("delete_record", Step::Result(task.clone()));
        for i in 0..6 {
            let answer = send(&mut svc, 10 + i, "delete_record", json!({"id": 42}))
                .await
                .unwrap();
            assert!(answer.is_task(), "call {i}: {answer:?}");
        }
        assert_eq!(upstream.calls("delete_record"), 6);
        let stats = layer.stats().snapshot();
        let delete = stats.tool("delete_record").unwrap();
        assert_eq!(delete.outcomes.success, 6, "{delete:?}");

        // The server fails the call it answered with a task before: the
        // caller gets the failure, not the other caller's task.
        upstream.push("search_docs", [Step::Result(task.clone())]);
        send(&mut svc, 20, "search_docs", json!({"q": "y"}))
            .await
            .unwrap();
        upstream.push(
            "search_docs",
            [Step::closed(), Step::closed(), Step::closed()],
        );
        let failed = send(&mut svc, 21, "search_docs", json!({"q": "y"}))
            .await
            .unwrap();
        assert!(!failed.is_task(), "a task served stale: {failed:?}");
        assert!(failed.is_tool_error(), "{failed:?}");
    }
}

/// The reference reads the renderer's facts as the layers wrote them.
#[test]
fn the_reference_reads_rendered_answers() {
    let refused =
        json!({"structuredContent": {"toolwarden": {"layer": "loop_guard", "error": "x"}}});
    assert_eq!(
        seen_in_result(&refused),
        Seen::Refused {
            by_loop_guard: true,
            cycle: false
        }
    );
    let down = json!({"structuredContent": {"toolwarden": {"kind": "timeout"}}});
    assert_eq!(seen_in_result(&down), Seen::Down);
    assert_eq!(seen_in_result(&json!({"content": []})), Seen::Answered);
}

/// Regression (found with the TypeScript SDK as the client): a failure the
/// stack rendered for a tool that declares an `outputSchema` carried our
/// facts as `structuredContent`, which the SDK validates against the
/// tool's schema, an `isError` result's too: it threw, and the host never
/// saw the failure. For such a tool the facts are in `_meta`
/// (`toolwarden/failure`) and there is no `structuredContent`; other
/// tools keep theirs.
#[tokio::test(start_paused = true)]
async fn a_failure_of_a_tool_with_an_output_schema_carries_no_structured_content() {
    let catalog = catalog(true);
    catalog.fill_from_tools_list(&json!({"tools": [
        {"name": "weather", "inputSchema": {"type": "object"},
         "outputSchema": {"type": "object", "properties": {"temperature": {"type": "number"}},
                          "required": ["temperature"]}},
        {"name": "plain", "inputSchema": {"type": "object"}},
    ]}));
    assert!(catalog.has_output_schema("weather"));
    assert!(!catalog.has_output_schema("plain"));
    // Rendered by the fallback cache (a degraded answer), and by the edge.
    for degrade in [true, false] {
        let upstream = MockMcp::new();
        let layer = StandardStack::builder()
            .catalog(catalog.clone())
            .rate_limit(|b| b.per_tool(Rate::per_minute(1), 1))
            .fallback_cache(move |b| b.degrade(degrade))
            .build()
            .unwrap();
        let mut svc = layer.layer(upstream_service(upstream.clone()));
        for tool in ["weather", "plain"] {
            send(&mut svc, 1, tool, json!({})).await.unwrap();
            let refused = send(&mut svc, 2, tool, json!({})).await.unwrap();
            assert!(refused.is_tool_error(), "{refused:?}");
            let result = refused.payload.as_ref().unwrap();
            let facts = if tool == "weather" {
                assert!(result.get("structuredContent").is_none(), "{result}");
                &result["_meta"][toolwarden_core::FAILURE_META_KEY]
            } else {
                &result["structuredContent"]["toolwarden"]
            };
            assert_eq!(facts["layer"], "rate_limit", "{tool}: {result}");
            assert_eq!(facts["tool"], tool, "{result}");
            // The seal of our own mark never leaves the stack.
            assert!(result["_meta"].get(OUTCOME_META_KEY).is_none(), "{result}");
        }
    }
}
