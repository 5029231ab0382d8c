//! [`Proxy::reload`] and [`reload_file`]: new policies for new calls, the
//! circuits and the unchanged layers' state kept, a bad file refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use toolwarden::circuit_breaker::CircuitState;
use toolwarden::stack::StackLayer;
use toolwarden_core::jsonrpc::{Request, Response};
use toolwarden_core::testing::{ready_call, MockMcp, Step};
use toolwarden_core::Events;
use tower::Layer;

use super::{reload_file, ReloadError};
use crate::config::Config;
use crate::downstream::Cores;
use crate::endpoints::MetricsEndpoints;
use crate::stack::SharedState;
use crate::{Proxy, UpstreamTarget};

fn config(toml: &str) -> Config {
    Config::from_toml_str(toml, std::iter::empty()).unwrap()
}

/// A proxy whose upstream is never started: the tests drive its layers
/// over a scripted server (`MockMcp`), which shares their state.
fn proxy(config: Config) -> Proxy {
    let target = UpstreamTarget::Command {
        program: "true".into(),
        args: Vec::new(),
    };
    let shared = SharedState::new(Events::new(), MetricsEndpoints::new());
    Proxy::new(config, target, shared).unwrap()
}

/// One `tools/call` through the proxy's current layers, over `mock`.
async fn call(proxy: &Proxy, mock: &MockMcp, tool: &str) -> Response {
    let mut svc = proxy
        .tool_stack_layer()
        .standard()
        .clone()
        .layer(mock.clone());
    ready_call(&mut svc, Request::tool_call(1, tool, json!({})))
        .await
        .unwrap()
}

/// The layer that refused a call, from the `isError` result it wrote.
fn refused_by(resp: &Response) -> Option<String> {
    let payload: &Value = resp.payload.as_ref().ok()?;
    payload["structuredContent"]["toolwarden"]["layer"]
        .as_str()
        .map(str::to_owned)
}

const QUIET: &str = r#"
[retry]
enabled = false
[loop_guard]
enabled = false
[fallback_cache]
degrade = false
"#;

fn breaker(threshold: u32, reset: &str) -> String {
    format!(
        "{QUIET}\n[circuit_breaker]\nfailure_threshold = {threshold}\nfailure_rate_threshold = false\n\
         minimum_calls = 1\nreset_timeout = \"{reset}\"\njitter = 0.0\n"
    )
}

#[tokio::test(start_paused = true)]
async fn an_open_circuit_stays_open_and_new_calls_follow_the_new_policy() {
    let proxy = proxy(config(&breaker(3, "60s")));
    let down = Step::rpc_error(-32603, "down");
    let mock = MockMcp::new()
        .default_step("search", down.clone())
        .default_step("fetch", down);
    for _ in 0..3 {
        call(&proxy, &mock, "search").await;
    }
    call(&proxy, &mock, "fetch").await;
    let registry = proxy.tool_stack_layer().standard().registry().clone();
    assert_eq!(registry.state("search"), Some(CircuitState::Open));
    assert_eq!(registry.state("fetch"), Some(CircuitState::Closed));

    let report = proxy.reload(config(&breaker(2, "5s"))).unwrap();
    assert!(report.restart_required.is_empty(), "{report:?}");
    assert_eq!(
        report.kept,
        [
            StackLayer::RateLimit,
            StackLayer::Retry,
            StackLayer::LoopGuard,
            StackLayer::FallbackCache
        ]
    );
    assert!(report.renewed.is_empty());

    // The same circuits: `search` is still open (for the 60 s it opened
    // for), and refuses without reaching the server.
    let layer = proxy.tool_stack_layer();
    assert_eq!(
        layer.standard().registry().state("search"),
        Some(CircuitState::Open)
    );
    let refused = call(&proxy, &mock, "search").await;
    assert_eq!(refused_by(&refused).as_deref(), Some("circuit_breaker"));
    tokio::time::advance(Duration::from_secs(10)).await;
    let refused = call(&proxy, &mock, "search").await;
    assert_eq!(refused_by(&refused).as_deref(), Some("circuit_breaker"));
    assert_eq!(mock.calls("search"), 3);

    // `fetch` kept its one failure: a second one trips the new threshold
    // of 2 (the old one was 3).
    call(&proxy, &mock, "fetch").await;
    assert_eq!(registry.state("fetch"), Some(CircuitState::Open));
    assert_eq!(
        proxy.config().circuit_breaker.failure_threshold,
        Some(Some(2))
    );
}

fn quota(rate: &str, burst: u32, extra: &str) -> String {
    format!(
        "{QUIET}\n[tools.\"search\".rate_limit]\nper_tool = {{ rate = \"{rate}\", burst = {burst} }}\n{extra}"
    )
}

#[tokio::test(start_paused = true)]
async fn an_unchanged_quota_keeps_its_tokens_and_a_changed_one_starts_afresh() {
    let proxy = proxy(config(&quota("1/m", 1, "")));
    let mock = MockMcp::new().default_step("search", Step::ok("found"));
    assert_eq!(refused_by(&call(&proxy, &mock, "search").await), None);
    let refused = call(&proxy, &mock, "search").await;
    assert_eq!(refused_by(&refused).as_deref(), Some("rate_limit"));

    // Another section changes: the quota is the same one, still spent.
    let report = proxy
        .reload(config(&quota(
            "1/m",
            1,
            "[tools.\"other\".retry]\nmax_attempts = 2\n",
        )))
        .unwrap();
    assert!(report.kept.contains(&StackLayer::RateLimit), "{report:?}");
    assert_eq!(report.renewed, [StackLayer::Retry]);
    let refused = call(&proxy, &mock, "search").await;
    assert_eq!(refused_by(&refused).as_deref(), Some("rate_limit"));

    // The quota changes: a new one, full.
    let report = proxy.reload(config(&quota("2/m", 2, ""))).unwrap();
    assert!(
        report.renewed.contains(&StackLayer::RateLimit),
        "{report:?}"
    );
    assert_eq!(refused_by(&call(&proxy, &mock, "search").await), None);
    assert_eq!(refused_by(&call(&proxy, &mock, "search").await), None);
    let refused = call(&proxy, &mock, "search").await;
    assert_eq!(refused_by(&refused).as_deref(), Some("rate_limit"));
    assert_eq!(mock.calls("search"), 3);
}

fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("toolwarden-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(start_paused = true)]
async fn a_bad_file_is_refused_naming_the_key_and_the_running_configuration_stays() {
    let path = temp_file("bad.toml", &quota("1/m", 1, ""));
    let proxy = proxy(Config::load(Some(&path), std::iter::empty()).unwrap());
    let mock = MockMcp::new().default_step("search", Step::ok("found"));
    call(&proxy, &mock, "search").await;
    let running = proxy.config();

    std::fs::write(
        &path,
        quota("100/s", 100, "[tools.\"search\".retry]\nmax_attempts = 0\n"),
    )
    .unwrap();
    let err = reload_file(&proxy, Some(&path)).unwrap_err();
    assert!(matches!(err, ReloadError::Config(_)), "{err:?}");
    assert_eq!(err.key(), Some(r#"tools."search".retry.max_attempts"#));
    std::fs::write(&path, "[rate_limit\n").unwrap();
    let err = reload_file(&proxy, Some(&path)).unwrap_err();
    assert!(err.to_string().contains("not valid TOML"), "{err}");
    // An empty file, as a writer that truncates first leaves it for a
    // moment (regression: it was applied, every limit at its default).
    for empty in ["", "\n  \n"] {
        std::fs::write(&path, empty).unwrap();
        let err = reload_file(&proxy, Some(&path)).unwrap_err();
        assert!(err.to_string().contains("is empty"), "{err}");
    }
    std::fs::remove_file(&path).unwrap();
    assert!(reload_file(&proxy, Some(&path)).is_err());

    // The old policy, and its spent quota, are still in force.
    assert_eq!(*proxy.config(), *running);
    let refused = call(&proxy, &mock, "search").await;
    assert_eq!(refused_by(&refused).as_deref(), Some("rate_limit"));
}

#[tokio::test]
async fn restart_only_keys_keep_their_running_values_and_are_reported() {
    let proxy = proxy(config(""));
    let report = proxy
        .reload(config(
            r#"
            [upstream]
            attempt_timeout = "5s"
            connect_timeout = "3s"
            [downstream]
            max_line_bytes = 1000
            [circuit_breaker]
            bounds = { max_keys = 50 }
            failure_threshold = 2
            [redis]
            url = "redis://127.0.0.1:1/0"
            "#,
        ))
        .unwrap();
    assert_eq!(
        report.restart_required,
        ["upstream", "downstream", "redis", "circuit_breaker.bounds"]
    );
    assert_eq!(proxy.config().redis, None, "[redis] needs a restart");
    let now = proxy.config();
    assert_eq!(now.upstream.attempt_timeout, Duration::from_secs(5));
    assert_eq!(
        now.upstream.connect_timeout,
        Config::default().upstream.connect_timeout
    );
    assert_eq!(
        now.downstream.max_line_bytes,
        Config::default().downstream.max_line_bytes
    );
    assert_eq!(now.circuit_breaker.bounds, None);
    assert_eq!(now.circuit_breaker.failure_threshold, Some(Some(2)));
    let layer = proxy.tool_stack_layer();
    assert_eq!(layer.standard().attempt_timeout(), Duration::from_secs(5));
    assert_eq!(layer.standard().registry().snapshot().max_keys, 10_000);
}

#[tokio::test]
async fn every_session_gets_the_new_stack_in_per_session_mode() {
    let proxy = proxy(config("[upstream]\nsession_mode = \"per_session\"\n"));
    let Cores::PerSession(sessions) = proxy.cores() else {
        panic!("per-session cores");
    };
    let (one, two) = (sessions.open(), sessions.open());
    let report = proxy
        .reload(config(
            "[upstream]\nsession_mode = \"per_session\"\n[retry]\nmax_attempts = 2\n",
        ))
        .unwrap();
    assert_eq!(report.sessions, 2);
    assert_eq!(report.renewed, [StackLayer::Retry]);
    drop(one);
    let report = proxy
        .reload(config("[upstream]\nsession_mode = \"per_session\"\n"))
        .unwrap();
    assert_eq!(report.sessions, 1);
    drop(two);
}

#[tokio::test]
async fn a_gateway_reloads_its_upstreams_tool_tables() {
    let file = r#"
        [upstreams.time]
        command = "true"
        [upstreams.time.tools."now".retry]
        max_attempts = 2
    "#;
    let shared = SharedState::new(Events::new(), MetricsEndpoints::new());
    let proxy = Proxy::gateway(config(file), shared).unwrap();
    let report = proxy
        .reload(config(
            &file.replace("max_attempts = 2", "max_attempts = 3"),
        ))
        .unwrap();
    assert!(report.restart_required.is_empty(), "{report:?}");
    assert_eq!(report.renewed, [StackLayer::Retry]);
    let retry = proxy.config().tools["now"].retry.clone().unwrap();
    assert_eq!(retry.max_attempts, Some(3));

    // A new upstream needs a restart: the running ones are kept, and so
    // are the names they expose (two upstreams would prefix them, `time__`),
    // under which the rest of the file applies.
    let more = format!(
        "{}\n[upstreams.docs]\ncommand = \"true\"\n",
        file.replace("max_attempts = 2", "max_attempts = 4")
    );
    let report = proxy.reload(config(&more)).unwrap();
    assert_eq!(report.restart_required, ["upstreams"]);
    let running = proxy.config();
    assert_eq!(running.upstreams.keys().collect::<Vec<_>>(), ["time"]);
    assert_eq!(running.tools.keys().collect::<Vec<_>>(), ["now"]);
    assert_eq!(
        running.tools["now"].retry.as_ref().unwrap().max_attempts,
        Some(4)
    );
    proxy.shutdown().await;
}

fn retries(attempts: u32) -> String {
    format!(
        "[loop_guard]\nenabled = false\n[fallback_cache]\ndegrade = false\n\
         [tools.\"flaky\"]\nsafe_to_repeat = true\n\
         [tools.\"flaky\".retry]\nmax_attempts = {attempts}\nbase_delay = \"10ms\"\n"
    )
}

#[tokio::test(start_paused = true)]
async fn a_call_in_flight_finishes_under_the_policy_it_started_with() {
    let proxy = proxy(config(&retries(3)));
    let down = Step::rpc_error(-32603, "down");
    let mock = MockMcp::new().script(
        "flaky",
        [
            down.clone().after(Duration::from_secs(2)),
            Step::ok("fine"),
            down,
            Step::ok("fine"),
        ],
    );
    let in_flight = tokio::spawn({
        let mut svc = proxy
            .tool_stack_layer()
            .standard()
            .clone()
            .layer(mock.clone());
        async move { ready_call(&mut svc, Request::tool_call(1, "flaky", json!({}))).await }
    });
    while mock.in_flight() == 0 {
        tokio::task::yield_now().await;
    }

    // No more retries from now on; the call already made keeps its three.
    let report = proxy.reload(config(&retries(1))).unwrap();
    assert_eq!(report.renewed, [StackLayer::Retry]);
    let answer = in_flight.await.unwrap().unwrap();
    assert_eq!(refused_by(&answer), None);
    assert_eq!(answer.payload.unwrap()["isError"], false);
    assert_eq!(mock.calls("flaky"), 2, "retried under the old policy");

    // A new call: one attempt, its failure answered as it is.
    let answer = call(&proxy, &mock, "flaky").await;
    assert_eq!(mock.calls("flaky"), 3, "not retried under the new policy");
    assert!(answer.payload.is_err(), "{answer:?}");
}

#[tokio::test]
async fn the_optional_layers_are_kept_when_on_and_unchanged_and_never_reported_while_off() {
    let optional = [
        StackLayer::Bulkhead,
        StackLayer::Coalesce,
        StackLayer::Hedge,
    ];
    // Off: neither kept nor renewed, however often the file is reloaded.
    let off = proxy(config(QUIET));
    let report = off.reload(config(QUIET)).unwrap();
    for layer in optional {
        assert!(
            !report.kept.contains(&layer),
            "{layer} off, yet kept: {report:?}"
        );
        assert!(
            !report.renewed.contains(&layer),
            "{layer} off, yet renewed: {report:?}"
        );
    }

    // Present but `enabled = false`: off, so neither kept nor renewed.
    let disabled = format!(
        "{QUIET}\n[bulkhead]\nenabled = false\n\n[coalesce]\nenabled = false\n\n[hedge]\nenabled = false\n"
    );
    let off = proxy(config(&disabled));
    let report = off.reload(config(&disabled)).unwrap();
    for layer in optional {
        assert!(
            !report.kept.contains(&layer),
            "{layer} disabled, yet kept: {report:?}"
        );
        assert!(
            !report.renewed.contains(&layer),
            "{layer} disabled, yet renewed: {report:?}"
        );
    }

    // On and unchanged: kept whole.
    let on = |cap: u32, delay: &str| {
        format!(
            "{QUIET}\n[bulkhead]\nmax_concurrent = {cap}\n\n[coalesce]\n\n[hedge]\nenabled = true\ndelay = \"{delay}\"\n"
        )
    };
    let on_proxy = proxy(config(&on(4, "100ms")));
    let report = on_proxy.reload(config(&on(4, "100ms"))).unwrap();
    for layer in optional {
        assert!(
            report.kept.contains(&layer),
            "{layer} unchanged, not kept: {report:?}"
        );
    }
    // Changed: renewed (the coalescing section did not change: kept).
    let report = on_proxy.reload(config(&on(5, "150ms"))).unwrap();
    assert!(report.renewed.contains(&StackLayer::Bulkhead), "{report:?}");
    assert!(report.renewed.contains(&StackLayer::Hedge), "{report:?}");
    assert!(report.kept.contains(&StackLayer::Coalesce), "{report:?}");
}

/// Regression (found by running the binary): `--watch` reloaded at the
/// first look that saw a change, so a file being written was read
/// halfway (a prefix ending on a line is valid TOML, the rest at its
/// defaults), then again when done, the layers renewed twice. A change is
/// applied once it has held for one more look, and a file still changing
/// is not read.
#[tokio::test(start_paused = true)]
async fn watch_reloads_a_change_once_it_holds_and_not_while_it_is_written() {
    let path = temp_file("watched.toml", &quota("1/m", 1, ""));
    let proxy = Arc::new(proxy(
        Config::load(Some(&path), std::iter::empty()).unwrap(),
    ));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let interval = Duration::from_secs(1);
    tokio::spawn(super::watch(
        Arc::clone(&proxy),
        path.clone(),
        interval,
        shutdown.child_token(),
    ));
    let running = proxy.config();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Written in three steps, each a look apart: never read midway.
    let whole = quota("100/s", 100, "# written slowly\n");
    let (head, _) = whole.split_at(whole.find("[tools").unwrap_or(whole.len() / 2));
    for step in [head.to_owned(), format!("{head}\n"), whole.clone()] {
        std::fs::write(&path, step).unwrap();
        tokio::time::sleep(interval).await;
        assert_eq!(*proxy.config(), *running, "reloaded while being written");
    }
    // Held for one more look: applied.
    tokio::time::sleep(interval * 2).await;
    let applied = Config::load(Some(&path), std::iter::empty()).unwrap();
    assert_eq!(*proxy.config(), applied);
    assert_ne!(*proxy.config(), *running);
    shutdown.cancel();
}
