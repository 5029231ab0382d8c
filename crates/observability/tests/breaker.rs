//! The layer and the health check fed by the real circuit breaker
//! (`toolwarden-circuit-breaker`), stacked as in the standard order: the
//! observability layer outermost, the breaker closest to the server.

mod support;

use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use toolwarden_circuit_breaker::{CircuitBreakerLayer, CircuitState};
use toolwarden_core::testing::{MockMcp, ReadyChecked, Step};
use toolwarden_observability::{
    circuit_check, CircuitState as ReportedState, HealthRegistry, HealthStatus, ObservabilityLayer,
};
use tower::Layer;

use support::{call, parse_prometheus, tool_call, value};

#[tokio::test(start_paused = true)]
async fn a_real_breaker_feeds_the_gauge_the_event_counters_and_the_health_check() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let prometheus = recorder.handle();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let observability = ObservabilityLayer::new();
    let breaker = CircuitBreakerLayer::builder()
        .failure_threshold(3)
        .minimum_calls(3)
        .reset_timeout(Duration::from_secs(30))
        .jitter(0.0)
        .events(observability.events())
        .build()
        .unwrap();
    let registry = breaker.registry().clone();
    let health = HealthRegistry::new();
    health.register(circuit_check(registry.circuits())).unwrap();

    let mock = MockMcp::new()
        .script(
            "search",
            [
                Step::tool_error("Error executing tool search: index offline"),
                Step::tool_error("Error executing tool search: index offline"),
                Step::tool_error("Error executing tool search: index offline"),
            ],
        )
        .default_step("search", Step::ok("hit"));
    let mut svc = observability.layer(breaker.layer(ReadyChecked::new(mock.clone())));

    for id in 0..3 {
        call(&mut svc, tool_call(id, "search")).await.unwrap();
    }
    assert_eq!(registry.state("search"), Some(CircuitState::Open));
    // Refused by the breaker: counted as rejected, never reaching the server.
    for id in 3..5 {
        assert!(call(&mut svc, tool_call(id, "search")).await.is_err());
    }
    assert_eq!(mock.calls("search"), 3);
    // Another tool's circuit stays closed and gets no gauge.
    call(&mut svc, tool_call(5, "fetch")).await.unwrap();

    let samples = parse_prometheus(&prometheus.render());
    let gauge = |key: &str| value(&samples, "toolwarden_circuit_state", &[("key", key)]);
    assert_eq!(gauge("search"), Some(2.0), "open");
    assert_eq!(gauge("fetch"), None);
    assert_eq!(
        value(
            &samples,
            "toolwarden_events",
            &[("event", "circuit_opened"), ("key", "search")]
        ),
        Some(1.0)
    );
    let calls = |outcome: &str| {
        value(
            &samples,
            "toolwarden_calls",
            &[
                ("mcp_method_name", "tools/call"),
                ("gen_ai_tool_name", "search"),
                ("outcome", outcome),
            ],
        )
    };
    assert_eq!(calls("tool_error"), Some(3.0));
    assert_eq!(calls("rejected"), Some(2.0));

    let report = health.report().await;
    assert_eq!(report.status, HealthStatus::Degraded);
    let check = report.check("circuits").unwrap();
    assert_eq!(check.message.as_deref(), Some("open circuits: search"));
    assert_eq!(
        observability.stats().snapshot().circuits["search"],
        ReportedState::Open
    );

    // After the reset timeout a probe goes through and succeeds: the
    // circuit closes, and the gauge, the counters and the check follow.
    tokio::time::advance(Duration::from_secs(30)).await;
    call(&mut svc, tool_call(6, "search")).await.unwrap();
    assert_eq!(registry.state("search"), Some(CircuitState::Closed));
    let samples = parse_prometheus(&prometheus.render());
    assert_eq!(
        value(&samples, "toolwarden_circuit_state", &[("key", "search")]),
        Some(0.0),
        "closed"
    );
    for event in ["circuit_half_opened", "circuit_closed"] {
        assert_eq!(
            value(
                &samples,
                "toolwarden_events",
                &[("event", event), ("key", "search")]
            ),
            Some(1.0),
            "{event}"
        );
    }
    assert_eq!(health.report().await.status, HealthStatus::Healthy);
}
