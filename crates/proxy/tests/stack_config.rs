//! The configuration file mapped onto the standard stack: each section and
//! per-tool table changes what the layers do, checked over a scripted MCP
//! server (`MockMcp`) with a paused clock.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::{json, Value};
use toolwarden::circuit_breaker::CircuitState;
use toolwarden::stack::{StackLayer, StandardStackLayer};
use toolwarden_core::jsonrpc::{Request, Response};
use toolwarden_core::testing::{ready_call, MockMcp, Step};
use toolwarden_core::{BoxError, Events, McpResponse};
use toolwarden_proxy::config::Config;
use toolwarden_proxy::endpoints::MetricsEndpoints;
use toolwarden_proxy::stack::{configure_catalog, standard_stack, SharedState};
use tower::{Layer, Service};

fn config(toml: &str) -> Config {
    Config::from_toml_str(toml, std::iter::empty()).unwrap()
}

fn stack(config: &Config) -> (StandardStackLayer, SharedState) {
    let shared = SharedState::new(Events::new(), MetricsEndpoints::new());
    configure_catalog(config, &shared.catalog);
    (standard_stack(config, &shared).unwrap(), shared)
}

async fn call<S>(svc: &mut S, id: i64, tool: &str, args: Value) -> Response
where
    S: Service<Request, Response = Response>,
    S::Error: Into<BoxError>,
{
    ready_call(svc, Request::tool_call(id, tool, args))
        .await
        .unwrap()
}

/// The layer that refused a call, from the `isError` result it wrote.
fn refused_by(resp: &Response) -> Option<String> {
    let payload = resp.payload.as_ref().ok()?;
    payload["structuredContent"]["toolwarden"]["layer"]
        .as_str()
        .map(str::to_owned)
}

#[tokio::test(start_paused = true)]
async fn breaker_section_and_a_tools_own_policy() {
    let config = config(
        r#"
        [circuit_breaker]
        failure_threshold = 4
        minimum_calls = 4
        failure_rate_threshold = 1.0
        reset_timeout = "1m"
        [retry]
        enabled = false
        [loop_guard]
        enabled = false
        [fallback_cache]
        degrade = false
        [tools."fragile".circuit_breaker]
        failure_threshold = 2
        minimum_calls = 2
        reset_timeout = "5s"
        [tools."ignored".circuit_breaker]
        enabled = false
        "#,
    );
    let (layer, _) = stack(&config);
    let down = Step::rpc_error(-32603, "down");
    let mock = MockMcp::new()
        .default_step("fragile", down.clone())
        .default_step("sturdy", down.clone())
        .default_step("ignored", down);
    let mut svc = layer.layer(mock.clone());
    for id in 0..3 {
        call(&mut svc, id, "fragile", json!({"n": id})).await;
        call(&mut svc, 10 + id, "sturdy", json!({"n": id})).await;
    }
    for id in 0..6 {
        call(&mut svc, 20 + id, "ignored", json!({"n": id})).await;
    }
    // fragile opens after its own 2 failures; sturdy needs the section's 4.
    assert_eq!(mock.calls("fragile"), 2);
    assert_eq!(mock.calls("sturdy"), 3);
    assert_eq!(mock.calls("ignored"), 6, "a disabled circuit never refuses");
    let registry = layer.registry();
    assert_eq!(registry.state("fragile"), Some(CircuitState::Open));
    assert_eq!(registry.state("sturdy"), Some(CircuitState::Closed));
    assert_eq!(registry.state("ignored"), Some(CircuitState::Disabled));
    // The refusal says when to come back: the tool's own 5 s, not 1 min.
    let resp = call(&mut svc, 30, "fragile", json!({"n": 30})).await;
    assert_eq!(refused_by(&resp).as_deref(), Some("circuit_breaker"));
    let retry_after = registry
        .circuit("fragile")
        .unwrap()
        .retry_after_seconds
        .unwrap();
    assert!(retry_after <= 6.0, "{retry_after}");
}

#[tokio::test(start_paused = true)]
async fn rate_limits_global_per_tool_and_a_tools_own_quota() {
    let config = config(
        r#"
        [rate_limit]
        per_tool = { rate = "3/s" }
        # Retry would wait out a refusal whose retry_after fits its deadline.
        [retry]
        enabled = false
        [loop_guard]
        enabled = false
        [tools."scarce".rate_limit]
        per_tool = { rate = "1/min" }
        "#,
    );
    let (layer, _) = stack(&config);
    let mock = MockMcp::new();
    let mut svc = layer.layer(mock.clone());
    let mut refused = [0, 0];
    for id in 0..5 {
        for (i, tool) in ["plain", "scarce"].into_iter().enumerate() {
            let resp = call(&mut svc, id, tool, json!({"n": id})).await;
            if refused_by(&resp).as_deref() == Some("rate_limit") {
                refused[i] += 1;
            }
        }
    }
    // Burst = the rate's count when unset: 3 of plain, 1 of scarce.
    assert_eq!(refused, [2, 4]);
    assert_eq!((mock.calls("plain"), mock.calls("scarce")), (3, 1));
}

#[tokio::test(start_paused = true)]
async fn retry_section_and_a_tool_that_is_never_retried() {
    let config = config(
        r#"
        [catalog]
        trust_annotations = false
        [retry]
        max_attempts = 3
        base_delay = "10ms"
        jitter = "none"
        [circuit_breaker]
        enabled = false
        [loop_guard]
        enabled = false
        [tools."search"]
        safe_to_repeat = true
        [tools."once"]
        safe_to_repeat = true
        retry = { max_attempts = 1 }
        "#,
    );
    let (layer, _) = stack(&config);
    assert!(!layer.includes(StackLayer::CircuitBreaker));
    let down = Step::rpc_error(-32603, "down");
    let mock = MockMcp::new()
        .default_step("search", down.clone())
        .default_step("once", down);
    let mut svc = layer.layer(mock.clone());
    let resp = call(&mut svc, 1, "search", json!({})).await;
    assert!(resp.is_tool_error() || resp.rpc_error().is_some());
    call(&mut svc, 2, "once", json!({})).await;
    assert_eq!(mock.calls("search"), 3);
    assert_eq!(mock.calls("once"), 1);
}

#[tokio::test(start_paused = true)]
async fn loop_guard_limits_exemptions_and_polling_tools() {
    let config = config(
        r#"
        [loop_guard]
        limits = { max_failing_repeats = 2 }
        [tools."job_status".loop_guard]
        limits = { max_repeats = false, cycles = false }
        [tools."retry_me".loop_guard]
        exempt = true
        [circuit_breaker]
        enabled = false
        [retry]
        enabled = false
        "#,
    );
    let (layer, _) = stack(&config);
    let mock = MockMcp::new()
        .default_step("broken", Step::tool_error("bad input"))
        .default_step("retry_me", Step::tool_error("bad input"));
    let mut svc = layer.layer(mock.clone());
    for id in 0..20 {
        call(&mut svc, id, "job_status", json!({"job": 1})).await;
        call(&mut svc, 100 + id, "retry_me", json!({"same": true})).await;
    }
    for id in 0..4 {
        call(&mut svc, 200 + id, "broken", json!({"same": true})).await;
    }
    assert_eq!(
        mock.calls("job_status"),
        20,
        "a polling tool is never blocked"
    );
    assert_eq!(
        mock.calls("retry_me"),
        20,
        "an exempt tool is never blocked"
    );
    assert_eq!(
        mock.calls("broken"),
        2,
        "the 3rd identical failing call is blocked"
    );
}

#[tokio::test(start_paused = true)]
async fn fallback_cache_serves_stale_from_the_configured_window() {
    let config = config(
        r#"
        [fallback_cache]
        max_staleness = "1m"
        [tools."weather"]
        cacheable = true
        [retry]
        enabled = false
        [loop_guard]
        enabled = false
        "#,
    );
    let (layer, _) = stack(&config);
    let mock = MockMcp::new()
        .script("weather", [Step::ok("sunny")])
        .default_step("weather", Step::rpc_error(-32603, "down"));
    let mut svc = layer.layer(mock.clone());
    let args = json!({"city": "Oslo"});
    call(&mut svc, 1, "weather", args.clone()).await;
    let stale = call(&mut svc, 2, "weather", args.clone()).await;
    assert_eq!(stale.first_text().as_deref(), Some("sunny"));
    assert!(stale.payload.as_ref().unwrap()["_meta"]["toolwarden/stale"].is_object());
    tokio::time::advance(Duration::from_secs(61)).await;
    let too_old = call(&mut svc, 3, "weather", args).await;
    assert!(too_old.is_tool_error(), "past max_staleness: {too_old:?}");
}

#[tokio::test(start_paused = true)]
async fn every_layer_can_be_left_out() {
    let sections = [
        "circuit_breaker",
        "rate_limit",
        "retry",
        "loop_guard",
        "fallback_cache",
        "observability",
    ];
    let text: String = sections
        .iter()
        .map(|s| format!("[{s}]\nenabled = false\n"))
        .collect();
    let (layer, _) = stack(&config(&text));
    assert_eq!(layer.left_out().len(), StackLayer::ALL.len());
    let mock = MockMcp::new().default_step("t", Step::rpc_error(-32603, "down"));
    let mut svc = layer.layer(mock.clone());
    for id in 0..12 {
        call(&mut svc, id, "t", json!({})).await;
    }
    assert_eq!(mock.calls("t"), 12, "nothing refused, nothing retried");
}

#[test]
fn cross_field_rules_name_the_proxys_keys() {
    let cases = [
        (
            "[upstream]\nattempt_timeout = \"40s\"\n[retry]\ndeadline = \"30s\"\n",
            "upstream.attempt_timeout, retry.deadline",
        ),
        (
            "[circuit_breaker]\nslow_call_duration = \"10s\"\n",
            "circuit_breaker.slow_call_duration, upstream.attempt_timeout",
        ),
        ("[retry]\nretry_on = [\"client\"]\n", "retry.retry_on"),
        (
            "[circuit_breaker]\nminimum_calls = 30\n",
            "circuit_breaker.minimum_calls, circuit_breaker.count_window",
        ),
        (
            "[tools.\"a.b\"]\nretry = { base_delay = \"20s\" }\n",
            "tools.\"a.b\".retry.max_delay",
        ),
        (
            "[tools.\"x\".circuit_breaker]\nminimum_calls = 50\n",
            "tools.\"x\".circuit_breaker.minimum_calls, tools.\"x\".circuit_breaker.count_window",
        ),
        (
            "[loop_guard]\nbounds = { idle_timeout = \"1m\" }\n",
            "loop_guard.bounds.idle_timeout, loop_guard.window_time",
        ),
        (
            "[loop_guard]\nwindow_calls = 10\n[tools.\"poll\".loop_guard]\nlimits = { max_repeats = 12 }\n",
            "tools.\"poll\".loop_guard.limits.max_repeats",
        ),
        (
            "[circuit_breaker]\nreset_timeout = \"1s\"\nmax_reset_timeout = \"10s\"\nbounds = { idle_timeout = \"1m\" }\n[tools.\"x\".circuit_breaker]\nmax_reset_timeout = \"5m\"\n",
            "circuit_breaker.bounds.idle_timeout, tools.\"x\".circuit_breaker.max_reset_timeout",
        ),
    ];
    // Loading the file builds the stack, so its errors come from there.
    for (text, field) in cases {
        let err = Config::from_toml_str(text, std::iter::empty()).unwrap_err();
        assert_eq!(err.key(), Some(field), "{text}");
    }
    // The shipped example builds.
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/toolwarden.example.toml"
    ))
    .unwrap();
    let shared = SharedState::new(Events::new(), MetricsEndpoints::new());
    standard_stack(&config(&example), &shared).unwrap();
}

#[tokio::test(start_paused = true)]
async fn circuits_and_health_are_served_from_the_stack() {
    let config = config(
        r#"
        [circuit_breaker]
        failure_threshold = 1
        minimum_calls = 1
        [retry]
        enabled = false
        "#,
    );
    let shared = SharedState::new(Events::new(), MetricsEndpoints::new());
    let layer = standard_stack(&config, &shared).unwrap();
    toolwarden_proxy::stack::install_endpoints(&layer, &shared.endpoints, None);
    let mock = MockMcp::new().default_step("search", Step::rpc_error(-32603, "down"));
    let mut svc = layer.layer(mock);
    call(&mut svc, 1, "search", json!({})).await;
    let circuits = shared.endpoints.circuits().await;
    assert_eq!(circuits["circuits"][0]["key"], "search", "{circuits}");
    assert_eq!(circuits["circuits"][0]["state"], "open", "{circuits}");
    let health = shared.endpoints.health_report().await.unwrap();
    assert_eq!(health["status"], "degraded", "{health}");
    assert!(
        health.to_string().contains("open circuits: search"),
        "{health}"
    );
}

#[tokio::test(start_paused = true)]
async fn hedging_is_off_by_default_and_follows_the_hedge_section_when_present() {
    let slow = || Step::ok("slow").after(Duration::from_secs(5));
    // Off by default, even for a tool configured safe to repeat.
    let quiet = config("[tools.lookup]\nsafe_to_repeat = true\n");
    let (layer, _) = stack(&quiet);
    assert!(!layer.includes(StackLayer::Hedge));
    // Off with `enabled = false`, its keys kept for later.
    let off =
        config("[hedge]\nenabled = false\n[tools.lookup]\nhedge = { safe_to_hedge = true }\n");
    let (layer, _) = stack(&off);
    assert!(!layer.includes(StackLayer::Hedge));
    let mock = MockMcp::new().script("lookup", [slow()]);
    let mut svc = layer.layer(mock.clone());
    call(&mut svc, 1, "lookup", json!({})).await;
    assert_eq!(mock.calls("lookup"), 1);

    let on = config(
        r#"
        [hedge]
        delay = "1s"
        [tools.lookup]
        hedge = { safe_to_hedge = true, delay = "50ms" }
        [tools.send]
        safe_to_repeat = false
        "#,
    );
    let (layer, _) = stack(&on);
    assert!(layer.includes(StackLayer::Hedge));
    let mock = MockMcp::new()
        .script("lookup", [slow()])
        .script("send", [slow()]);
    let mut svc = layer.layer(mock.clone());
    let resp = call(&mut svc, 1, "lookup", json!({})).await;
    assert_eq!(resp.first_text().as_deref(), Some("lookup ok"));
    assert_eq!(mock.calls("lookup"), 2, "hedged after the tool's 50 ms");
    assert_eq!(mock.in_flight(), 0);
    let resp = call(&mut svc, 2, "send", json!({})).await;
    assert_eq!(resp.first_text().as_deref(), Some("slow"));
    assert_eq!(mock.calls("send"), 1, "not safe: never hedged");
}
