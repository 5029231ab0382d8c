//! `toolwarden demo`: every layer at work, with nothing installed.
//!
//! An in-process MCP server with deliberately unreliable tools
//! (`flaky_search` has an outage then recovers, `slow_report` is slow and
//! reports progress, `quota_api` enforces its own quota, `delete_record` is
//! destructive and keeps failing) sits behind the real proxy — the same
//! [`Proxy`], framer, `ProxyServer`, tool stack ([`build_stack`](crate::stack::build_stack))
//! and upstream supervisor as `toolwarden run`, over in-memory pipes instead of
//! stdio. A scripted agent calls the tools in phases (warm-up, outage, slow
//! report, burst, a stuck loop, recovery), printing each outcome as it goes,
//! then a per-tool table of what happened.
//!
//! The table's numbers are counted, not claimed: the layers' events
//! (`toolwarden_core::Events`: circuit opened/closed, retries, stale results
//! served, loops blocked, rate limits, degraded answers) through a counting
//! sink; the outcomes the agent saw; and the calls that really reached the
//! server. It runs in real time (about 10 s).

mod gateway;
mod server;
mod wiring;

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ClientConfig,
    ProgressNotificationParam,
};
use rmcp::service::{NotificationContext, RoleClient, RunningService, ServiceError};
use rmcp::{ClientHandler, ServiceExt as _};
use serde_json::{json, Value};
use tokio::time::Instant;
use toolwarden_core::events::{Event, EventSink};
use toolwarden_core::Events;

use toolwarden::loop_guard::LimitsSettings;
use toolwarden::rate_limit::{Mode, QuotaSettings, Rate};

use crate::config::{
    Config, LoopGuardToolSettings, RateLimitToolSettings, RetryToolSettings, ToolConfig,
};
use crate::endpoints::MetricsEndpoints;
use crate::stack::SharedState;
use crate::table::{render, Column};
use crate::Proxy;

use server::FlakyServer;

/// The tools, in the table's order.
const TOOLS: [&str; 4] = ["flaky_search", "slow_report", "quota_api", "delete_record"];

/// Counts the layers' events per (tool, event name).
#[derive(Debug, Default)]
pub struct EventCounter {
    counts: Mutex<BTreeMap<(String, &'static str), u64>>,
}

impl EventCounter {
    /// How many `event`s were reported about `tool`.
    pub fn count(&self, tool: &str, event: &str) -> u64 {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|((t, e), _)| t == tool && *e == event)
            .map(|(_, n)| *n)
            .sum()
    }
}

impl EventCounter {
    /// Every event counted.
    pub fn total(&self) -> u64 {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .sum()
    }
}

impl EventSink for EventCounter {
    fn on_event(&self, event: &Event<'_>) {
        let subject = event.subject().unwrap_or("(none)").to_owned();
        *self
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry((subject, event.name()))
            .or_default() += 1;
    }
}

/// The demo's configuration: tight thresholds so each layer acts within seconds.
#[must_use]
pub fn demo_config() -> Config {
    let mut config = Config::default();
    config.catalog.trust_annotations = true;
    // The slow report takes about 1 s: it fits; a hung call would not.
    config.upstream.attempt_timeout = Duration::from_secs(3);
    config.circuit_breaker.failure_threshold = Some(Some(3));
    config.circuit_breaker.count_window = Some(Some(20));
    config.circuit_breaker.reset_timeout = Some(Duration::from_millis(800));
    config.circuit_breaker.max_reset_timeout = Some(Duration::from_secs(2));
    config.retry.max_attempts = Some(3);
    config.retry.base_delay = Some(Duration::from_millis(50));
    config.retry.max_delay = Some(Duration::from_millis(200));
    config.retry.deadline = Some(Duration::from_secs(5));
    config.rate_limit.mode = Some(Mode::Reject);
    config.loop_guard.limits = Some(LimitsSettings {
        max_failing_repeats: Some(Some(3)),
        ..LimitsSettings::default()
    });
    config.fallback_cache.max_staleness = Some(Duration::from_secs(60));
    config.fallback_cache.degrade = Some(true);
    config.tools.insert(
        "flaky_search".into(),
        ToolConfig {
            safe_to_repeat: Some(true),
            cacheable: Some(true),
            // An agent re-runs the same search on purpose: not a loop while
            // it succeeds (failing repeats are still stopped).
            loop_guard: Some(LoopGuardToolSettings {
                limits: Some(LimitsSettings {
                    max_repeats: Some(None),
                    cycles: Some(false),
                    ..LimitsSettings::default()
                }),
                ..LoopGuardToolSettings::default()
            }),
            // Give up retrying quickly: while the circuit is open the
            // cached result is the better answer than a wait for the probe.
            retry: Some(RetryToolSettings {
                deadline: Some(Duration::from_millis(600)),
                ..RetryToolSettings::default()
            }),
            ..ToolConfig::default()
        },
    );
    config.tools.insert(
        "quota_api".into(),
        ToolConfig {
            rate_limit: Some(RateLimitToolSettings {
                per_tool: Some(QuotaSettings {
                    rate: Rate::per_second(2),
                    burst: Some(2),
                }),
            }),
            ..ToolConfig::default()
        },
    );
    config.tools.insert(
        "delete_record".into(),
        ToolConfig {
            safe_to_repeat: Some(false),
            cacheable: Some(false),
            ..ToolConfig::default()
        },
    );
    config
}

/// What the agent saw for one call.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Ok,
    Stale,
    ToolError,
    Refused(String),
    RpcError(i32),
    Failed(String),
}

impl Seen {
    fn of(result: &Result<CallToolResponse, ServiceError>) -> Seen {
        match result {
            Ok(CallToolResponse::Complete(r)) => Seen::of_result(r),
            Ok(_) => Seen::Ok,
            Err(ServiceError::McpError(e)) => Seen::RpcError(e.code.0),
            Err(e) => Seen::Failed(e.to_string()),
        }
    }

    fn of_result(result: &CallToolResult) -> Seen {
        if result.is_error == Some(true) {
            let layer = result
                .structured_content
                .as_ref()
                .and_then(|s| s.pointer("/toolwarden/layer"))
                .and_then(Value::as_str);
            return match layer {
                Some(layer) => Seen::Refused(layer.to_owned()),
                None => Seen::ToolError,
            };
        }
        let stale = result
            .meta
            .as_ref()
            .is_some_and(|m| m.0.keys().any(|k| k.contains("stale")));
        if stale {
            Seen::Stale
        } else {
            Seen::Ok
        }
    }
}

/// The agent's client: prints progress as it arrives.
#[derive(Clone)]
struct Agent {
    started: Instant,
}

impl ClientHandler for Agent {
    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        let total = params.total.map(|t| format!("/{t}")).unwrap_or_default();
        println!(
            "{}                 ↳ progress {}{total} {}",
            stamp(self.started),
            params.progress,
            params.message.unwrap_or_default()
        );
    }

    fn get_info(&self) -> ClientConfig {
        ClientConfig::new(
            Default::default(),
            rmcp::model::Implementation::new("toolwarden-demo-agent", env!("CARGO_PKG_VERSION")),
        )
    }
}

fn stamp(started: Instant) -> String {
    format!("[{:>5.1}s]", started.elapsed().as_secs_f64())
}

/// Everything the agent saw, per tool.
#[derive(Default)]
struct Tally {
    seen: Mutex<BTreeMap<String, Vec<Seen>>>,
}

impl Tally {
    fn record(&self, tool: &str, seen: Seen) {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(tool.to_owned())
            .or_default()
            .push(seen);
    }

    fn of(&self, tool: &str) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(tool)
            .cloned()
            .unwrap_or_default()
    }
}

struct Script {
    client: RunningService<RoleClient, Agent>,
    started: Instant,
    tally: Tally,
}

fn summary(result: &Result<CallToolResponse, ServiceError>) -> String {
    let text = match result {
        Ok(CallToolResponse::Complete(r)) => r
            .content
            .iter()
            .find_map(|c| c.as_text().map(|t| t.text.clone()))
            .unwrap_or_default(),
        Ok(other) => format!("{other:?}"),
        Err(e) => e.to_string(),
    };
    let text = text.replace('\n', " ");
    if text.chars().count() > 90 {
        format!("{}…", text.chars().take(89).collect::<String>())
    } else {
        text
    }
}

impl Script {
    async fn call(&self, phase: &str, tool: &str, args: Value) -> Seen {
        let mut params = CallToolRequestParams::new(tool.to_owned());
        params.arguments = args.as_object().cloned();
        let shown = format!("{tool} {args}");
        let result = self.client.peer().call_tool_once(params).await;
        let seen = Seen::of(&result);
        let label = match &seen {
            Seen::Ok => "ok".to_owned(),
            Seen::Stale => "ok (stale, from cache)".to_owned(),
            Seen::ToolError => "tool error".to_owned(),
            Seen::Refused(layer) => format!("refused by {layer}"),
            Seen::RpcError(code) => format!("JSON-RPC error {code}"),
            Seen::Failed(_) => "failed".to_owned(),
        };
        println!(
            "{} {phase:<9} {shown:<40} → {label}: {}",
            stamp(self.started),
            summary(&result)
        );
        self.tally.record(tool, seen.clone());
        seen
    }

    fn phase(&self, title: &str) {
        println!("{} ── {title}", stamp(self.started));
    }

    async fn run(&self) {
        self.phase("warm-up: the search works; its results are cached");
        for query in ["rust tower", "rust tower"] {
            self.call("warm-up", "flaky_search", json!({"query": query}))
                .await;
        }

        self.phase("outage: the search backend goes down for 2.5 s");
        for _ in 0..8 {
            self.call("outage", "flaky_search", json!({"query": "rust tower"}))
                .await;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }

        self.phase("slow: a report that takes a while, with progress");
        self.call("slow", "slow_report", json!({"topic": "q3 incidents"}))
            .await;

        self.phase("burst: 8 quota_api calls at once (quota: 2 per second)");
        let burst =
            (0..8).map(|i| self.call("burst", "quota_api", json!({"item": format!("sku-{i}")})));
        futures::future::join_all(burst).await;

        self.phase("stuck agent: the same failing delete, again and again");
        for _ in 0..6 {
            self.call("loop", "delete_record", json!({"id": "42"}))
                .await;
        }

        self.phase("recovery: the backend is back; the breaker closes again");
        tokio::time::sleep(Duration::from_millis(1200)).await;
        for _ in 0..3 {
            self.call("recovery", "flaky_search", json!({"query": "rust tower"}))
                .await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        self.call("recovery", "quota_api", json!({"item": "sku-final"}))
            .await;
    }
}

/// The final table, as text (the renderer `toolwarden top` shares,
/// [`crate::table`]).
fn table(tally: &Tally, events: &EventCounter, reached: &BTreeMap<String, u64>) -> String {
    const COLUMNS: [Column; 13] = [
        Column::new("tool", 14),
        Column::new("calls", 5),
        Column::new("ok", 4),
        Column::new("stale", 5),
        Column::new("failed", 6),
        Column::new("refused", 7),
        Column::new("reached", 7),
        Column::new("retries", 7),
        Column::new("breaker", 12),
        Column::new("stale srv", 9),
        Column::new("loops", 5),
        Column::new("limited", 7),
        Column::new("degraded", 8),
    ];
    let rows: Vec<Vec<String>> = TOOLS
        .iter()
        .map(|&tool| {
            let seen = tally.of(tool);
            let count = |f: &dyn Fn(&Seen) -> bool| seen.iter().filter(|s| f(s)).count();
            let opened = events.count(tool, "circuit_opened");
            let closed = events.count(tool, "circuit_closed");
            vec![
                tool.to_owned(),
                seen.len().to_string(),
                count(&|s| *s == Seen::Ok).to_string(),
                count(&|s| *s == Seen::Stale).to_string(),
                count(&|s| matches!(s, Seen::ToolError | Seen::RpcError(_) | Seen::Failed(_)))
                    .to_string(),
                count(&|s| matches!(s, Seen::Refused(_))).to_string(),
                reached.get(tool).copied().unwrap_or(0).to_string(),
                events.count(tool, "retried").to_string(),
                format!("{opened} open/{closed} cl"),
                events.count(tool, "stale_served").to_string(),
                events.count(tool, "loop_detected").to_string(),
                events.count(tool, "rate_limited").to_string(),
                events.count(tool, "degraded").to_string(),
            ]
        })
        .collect();
    render(&COLUMNS, &rows)
}

const LEGEND: &str = "\
calls: made by the agent · ok/stale/failed/refused: what it got back (refused = an isError
result written by a toolwarden layer) · reached: calls that got to the server (retries
included, refusals not) · retries, breaker, stale srv, loops, limited, degraded: events the
layers reported (retried, circuit_opened/closed, stale_served, loop_detected, rate_limited, degraded).";

/// Runs the demo; returns the process's exit status.
pub async fn run() -> ExitCode {
    match tokio::time::timeout(Duration::from_secs(55), run_demo()).await {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("toolwarden demo: {e}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("toolwarden demo: did not finish within 55 s");
            ExitCode::FAILURE
        }
    }
}

async fn run_demo() -> Result<(), String> {
    let started = Instant::now();
    println!(
        "toolwarden demo — an agent calls four unreliable tools through the toolwarden proxy\n"
    );
    let events = Arc::new(EventCounter::default());
    let shared = SharedState::new(
        Events::new().with_arc(Arc::clone(&events) as Arc<dyn EventSink>),
        MetricsEndpoints::new(),
    );
    let server = FlakyServer::default();
    let target = wiring::in_process("the demo's flaky server", server.clone());
    let proxy = Proxy::new(demo_config(), target, shared).map_err(|e| e.to_string())?;

    let (agent_side, shutdown, serving) = wiring::serve_over_pipe(&proxy);
    let client = Agent { started }
        .serve(agent_side)
        .await
        .map_err(|e| format!("the agent could not connect: {e}"))?;
    let script = Script {
        client,
        started,
        tally: Tally::default(),
    };
    script.run().await;

    let Script { client, tally, .. } = script;
    let _ = client.cancel().await;
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), serving).await;
    proxy.shutdown().await;

    println!(
        "\nwhat happened, per tool ({:.1} s):\n",
        started.elapsed().as_secs_f64()
    );
    print!("{}", table(&tally, &events, &server.calls()));
    println!("\n{LEGEND}");
    if events.total() == 0 {
        println!(
            "\nNo layer reported anything: the tool stack of this build (toolwarden_proxy::stack::build_stack) \
             let every call straight through to the server."
        );
    }
    println!();
    gateway::run(started).await.map(|_| ())
}

#[cfg(test)]
mod tests;
