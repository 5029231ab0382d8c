//! The layer's metrics as Prometheus scrapes them: names, labels, values.

mod support;

use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use toolwarden_core::jsonrpc::Request;
use toolwarden_core::testing::{MockMcp, ReadyChecked, Step};
use toolwarden_core::{Event, OutcomeKind};
use toolwarden_observability::{describe_metrics, ClockSource, ObservabilityLayer};
use tower::Layer;

use support::{call, parse_prometheus, tool_call, upstream, value};

const CALLS: &str = "toolwarden_calls";
const DURATION_COUNT: &str = "mcp_client_operation_duration_count";
const DURATION_SUM: &str = "mcp_client_operation_duration_sum";
const METHOD: &str = "mcp_method_name";
const TOOL: &str = "gen_ai_tool_name";

fn flaky_search() -> MockMcp {
    let ok = || Step::ok("found").after(Duration::from_millis(200));
    MockMcp::new().script(
        "search",
        [
            ok(),
            ok(),
            ok(),
            Step::tool_error("upstream API rate limit exceeded").after(Duration::from_millis(50)),
            Step::rpc_error(-32603, "internal error"),
            Step::closed(),
            Step::Hang,
        ],
    )
}

#[tokio::test(start_paused = true)]
async fn a_failing_tool_is_scraped_with_names_labels_and_values() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let prometheus = recorder.handle();
    let _guard = metrics::set_default_local_recorder(&recorder);
    describe_metrics();

    // Durations from tokio's paused clock, so they are exact.
    let layer = ObservabilityLayer::builder()
        .clock(ClockSource::Tokio)
        .build()
        .unwrap();
    let mut svc = layer.layer(ReadyChecked::new(upstream(flaky_search())).pending_first());
    let mut outcomes = Vec::new();
    for id in 0..7 {
        outcomes.push(call(&mut svc, tool_call(id, "search")).await.is_ok());
    }
    // The transport failure and the timeout are errors; the rest are responses.
    assert_eq!(outcomes, [true, true, true, true, true, false, false]);
    for id in 7..9 {
        assert!(call(&mut svc, tool_call(id, "blocked")).await.is_err());
    }
    call(&mut svc, Request::new(9, "tools/list", None))
        .await
        .unwrap();

    let text = prometheus.render();
    let samples = parse_prometheus(&text);
    let calls = |tool: &str, outcome: &str| {
        value(
            &samples,
            CALLS,
            &[(METHOD, "tools/call"), (TOOL, tool), ("outcome", outcome)],
        )
    };
    assert_eq!(calls("search", "success"), Some(3.0));
    assert_eq!(calls("search", "tool_error"), Some(1.0));
    assert_eq!(calls("search", "protocol_error"), Some(1.0));
    assert_eq!(calls("search", "transport"), Some(1.0));
    assert_eq!(calls("search", "timeout"), Some(1.0));
    assert_eq!(calls("search", "rejected"), None);
    assert_eq!(calls("blocked", "rejected"), Some(2.0));
    // Requests that are not tool calls carry no tool label.
    assert_eq!(
        value(
            &samples,
            CALLS,
            &[(METHOD, "tools/list"), ("outcome", "success")]
        ),
        Some(1.0)
    );

    // Durations in seconds, from the (paused) tokio clock: exact.
    let search = [(METHOD, "tools/call"), (TOOL, "search")];
    let with_error = |error: &'static str| {
        let mut l = search.to_vec();
        l.push(("error_type", error));
        l
    };
    // Success has no error.type label (OpenTelemetry).
    assert_eq!(value(&samples, DURATION_COUNT, &search), Some(3.0));
    assert!((value(&samples, DURATION_SUM, &search).unwrap() - 0.6).abs() < 1e-9);
    assert_eq!(
        value(&samples, DURATION_COUNT, &with_error("tool_error")),
        Some(1.0)
    );
    assert!(
        (value(&samples, DURATION_SUM, &with_error("tool_error")).unwrap() - 0.05).abs() < 1e-9
    );
    assert_eq!(
        value(&samples, DURATION_COUNT, &with_error("timeout")),
        Some(1.0)
    );
    assert!((value(&samples, DURATION_SUM, &with_error("timeout")).unwrap() - 1.0).abs() < 1e-9);
    for error in ["protocol_error", "transport"] {
        assert_eq!(
            value(&samples, DURATION_COUNT, &with_error(error)),
            Some(1.0),
            "{error}"
        );
    }
    assert_eq!(
        value(
            &samples,
            DURATION_COUNT,
            &[
                (METHOD, "tools/call"),
                (TOOL, "blocked"),
                ("error_type", "rejected")
            ]
        ),
        Some(2.0)
    );

    // Descriptions reach the recorder; arguments never do.
    assert!(text.contains("# HELP toolwarden_calls"), "{text}");
    assert!(
        text.contains("# HELP mcp_client_operation_duration"),
        "{text}"
    );
    assert!(!text.contains("secret-argument-value"));

    // The stats snapshot agrees with the scrape.
    let stats = layer.stats().snapshot();
    let s = stats.tool("search").unwrap();
    assert_eq!(s.calls, 7);
    assert_eq!(s.errors, 4);
    assert_eq!(s.outcomes.get(OutcomeKind::Success), 3);
    assert!(
        (s.total_duration_ms - 1650.0).abs() < 1e-6,
        "{}",
        s.total_duration_ms
    );
}

#[tokio::test]
async fn events_become_counters_and_a_circuit_gauge() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let prometheus = recorder.handle();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let layer = ObservabilityLayer::new();
    let events = layer.events();
    let secs = Duration::from_secs;
    events.emit(&Event::CircuitOpened {
        key: "search",
        retry_after: secs(30),
    });
    let samples = parse_prometheus(&prometheus.render());
    assert_eq!(
        value(&samples, "toolwarden_circuit_state", &[("key", "search")]),
        Some(2.0)
    );

    events.emit(&Event::CircuitHalfOpened { key: "search" });
    let samples = parse_prometheus(&prometheus.render());
    assert_eq!(
        value(&samples, "toolwarden_circuit_state", &[("key", "search")]),
        Some(1.0)
    );

    events.emit(&Event::CircuitClosed { key: "search" });
    events.emit(&Event::RateLimited {
        key: "fetch",
        retry_after: secs(1),
    });
    events.emit(&Event::Retried {
        key: "fetch",
        attempt: 2,
        delay: secs(1),
    });
    events.emit(&Event::Retried {
        key: "fetch",
        attempt: 3,
        delay: secs(2),
    });
    events.emit(&Event::RetryBudgetExhausted { key: "fetch" });
    events.emit(&Event::LoopWarned {
        key: "fetch",
        repeats: 4,
    });
    events.emit(&Event::LoopDetected {
        key: "fetch",
        repeats: 5,
    });
    events.emit(&Event::StaleServed {
        key: "fetch",
        age: secs(60),
    });
    events.emit(&Event::Degraded { key: "fetch" });
    events.emit(&Event::BulkheadFull {
        key: "fetch",
        max_concurrent: 4,
        retry_after: secs(1),
    });
    events.emit(&Event::BulkheadLimitChanged {
        key: "fetch",
        from: 4,
        to: 2,
    });
    events.emit(&Event::Coalesced { key: "fetch" });
    events.emit(&Event::Hedged {
        key: "fetch",
        delay: secs(1),
    });
    events.emit(&Event::SyncFailed {
        detail: "redis unreachable",
    });

    let samples = parse_prometheus(&prometheus.render());
    let ev = |event: &str, key: &str| {
        value(
            &samples,
            "toolwarden_events",
            &[("event", event), ("key", key)],
        )
    };
    assert_eq!(
        value(&samples, "toolwarden_circuit_state", &[("key", "search")]),
        Some(0.0)
    );
    for event in ["circuit_opened", "circuit_half_opened", "circuit_closed"] {
        assert_eq!(ev(event, "search"), Some(1.0), "{event}");
    }
    assert_eq!(ev("retried", "fetch"), Some(2.0));
    for event in [
        "rate_limited",
        "retry_budget_exhausted",
        "loop_warned",
        "loop_detected",
        "stale_served",
        "degraded",
        "bulkhead_full",
        "bulkhead_limit_changed",
        "coalesced",
        "hedged",
    ] {
        assert_eq!(ev(event, "fetch"), Some(1.0), "{event}");
    }
    // An event about no key has no key label; its detail is not a label.
    assert_eq!(
        value(&samples, "toolwarden_events", &[("event", "sync_failed")]),
        Some(1.0)
    );
    assert!(!prometheus.render().contains("redis unreachable"));
    // Only circuit events touch the gauge.
    assert_eq!(
        value(&samples, "toolwarden_circuit_state", &[("key", "fetch")]),
        None
    );

    let snapshot = layer.stats().snapshot();
    assert_eq!(snapshot.events["retried"], 2);
    assert_eq!(snapshot.events["sync_failed"], 1);
    assert_eq!(snapshot.events["bulkhead_full"], 1);
    assert_eq!(snapshot.events["hedged"], 1);
    assert_eq!(snapshot.events["bulkhead_limit_changed"], 1);
    assert_eq!(snapshot.events.len(), 15);
}

#[tokio::test]
async fn a_layer_used_before_the_recorder_reports_to_it_once_installed() {
    let layer = ObservabilityLayer::new();
    let mut svc = layer.layer(MockMcp::new());
    call(&mut svc, tool_call(1, "search")).await.unwrap();

    let recorder = PrometheusBuilder::new().build_recorder();
    let prometheus = recorder.handle();
    let _guard = metrics::set_default_local_recorder(&recorder);
    call(&mut svc, tool_call(2, "search")).await.unwrap();
    call(&mut svc, tool_call(3, "search")).await.unwrap();

    let samples = parse_prometheus(&prometheus.render());
    let labels = [
        (METHOD, "tools/call"),
        (TOOL, "search"),
        ("outcome", "success"),
    ];
    assert_eq!(value(&samples, CALLS, &labels), Some(2.0));
    // The statistics saw all three.
    assert_eq!(layer.stats().snapshot().tool("search").unwrap().calls, 3);
}
