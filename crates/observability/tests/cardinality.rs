//! The label cap holds under 100 000 distinct tool names, methods and
//! event keys: metrics, statistics and events stay bounded.

mod support;

use std::collections::BTreeSet;
use std::future::ready;

use metrics_exporter_prometheus::PrometheusBuilder;
use serde_json::json;
use toolwarden_core::jsonrpc::{Id, Request, Response};
use toolwarden_core::{BoxError, Event};
use toolwarden_observability::ObservabilityLayer;
use tower::Layer;

use support::{call, parse_prometheus, value};

const DISTINCT: usize = 100_000;

fn ok_upstream(
) -> impl tower::Service<Request, Response = Response, Error = BoxError, Future = impl Send> + Clone
{
    tower::service_fn(|req: Request| {
        ready(Ok::<_, BoxError>(Response::result(
            req.id.clone(),
            json!({"content": [{"type": "text", "text": "ok"}]}),
        )))
    })
}

#[tokio::test]
async fn the_cap_holds_under_100_000_distinct_names() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let prometheus = recorder.handle();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let layer = ObservabilityLayer::builder()
        .max_tools(100)
        .max_methods(8)
        .build()
        .unwrap();
    let events = layer.events();
    let mut svc = layer.layer(ok_upstream());
    for i in 0..DISTINCT {
        let tool = format!("tool_{i:06}");
        call(&mut svc, Request::tool_call(i as i64, &tool, json!({})))
            .await
            .unwrap();
        events.emit(&Event::LoopWarned {
            key: &tool,
            repeats: 3,
        });
        events.emit(&Event::CircuitOpened {
            key: &tool,
            retry_after: std::time::Duration::from_secs(1),
        });
    }
    for i in 0..1_000 {
        call(
            &mut svc,
            Request::new(Id::Number(i), format!("custom/method_{i}"), None),
        )
        .await
        .unwrap();
    }

    let samples = parse_prometheus(&prometheus.render());
    let distinct = |metric: &str, label: &str| -> BTreeSet<String> {
        samples
            .iter()
            .filter(|s| s.name == metric)
            .filter_map(|s| s.labels.get(label).cloned())
            .collect()
    };
    // 100 admitted names plus `other`.
    let tools = distinct("toolwarden_calls", "gen_ai_tool_name");
    assert_eq!(tools.len(), 101);
    assert!(
        tools.contains("tool_000000") && tools.contains("tool_000099") && tools.contains("other")
    );
    assert!(!tools.contains("tool_000100"));
    let other = [
        ("mcp_method_name", "tools/call"),
        ("gen_ai_tool_name", "other"),
        ("outcome", "success"),
    ];
    assert_eq!(
        value(&samples, "toolwarden_calls", &other),
        Some((DISTINCT - 100) as f64)
    );
    assert_eq!(
        distinct("mcp_client_operation_duration_count", "gen_ai_tool_name").len(),
        101
    );
    // Methods: 8 admitted plus `other`.
    let methods = distinct("toolwarden_calls", "mcp_method_name");
    assert_eq!(methods.len(), 8 + 1 + 1, "{methods:?}"); // + tools/call
                                                         // Event keys share the cap; the circuit gauge exists for admitted keys only.
    assert_eq!(distinct("toolwarden_events", "key").len(), 101);
    assert_eq!(distinct("toolwarden_circuit_state", "key").len(), 100);
    let all_series = samples.len();
    assert!(all_series < 2_000, "{all_series} series");

    let snapshot = layer.stats().snapshot();
    assert_eq!(snapshot.tools.len(), 101);
    assert_eq!(
        snapshot.tool("other").unwrap().calls,
        (DISTINCT - 100) as u64
    );
    assert_eq!(snapshot.methods.len(), 9);
    assert_eq!(snapshot.circuits.len(), 100);
    assert_eq!(snapshot.events["loop_warned"], DISTINCT as u64);
    let total: u64 = snapshot.tools.iter().map(|t| t.calls).sum();
    assert_eq!(total, DISTINCT as u64);
}
