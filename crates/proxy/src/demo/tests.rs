//! Unit tests of the demo.

use super::*;

#[test]
fn the_demo_config_is_valid_and_builds_the_stack() {
    let config = demo_config();
    config.validate().unwrap();
    let shared = SharedState::new(Events::new(), MetricsEndpoints::new());
    crate::stack::standard_stack(&config, &shared).unwrap();
}

#[test]
fn the_counter_counts_per_tool_and_event() {
    let counter = EventCounter::default();
    counter.on_event(&Event::Retried {
        key: "a",
        attempt: 2,
        delay: Duration::from_millis(1),
    });
    counter.on_event(&Event::Retried {
        key: "a",
        attempt: 3,
        delay: Duration::from_millis(1),
    });
    counter.on_event(&Event::LoopDetected {
        key: "b",
        repeats: 4,
    });
    assert_eq!(counter.count("a", "retried"), 2);
    assert_eq!(counter.count("b", "loop_detected"), 1);
    assert_eq!(counter.count("b", "retried"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_scene_hides_the_dead_upstream_and_suggests_the_other() {
    let report = gateway::run(Instant::now()).await.unwrap();
    for tool in ["weather__get_forecast", "backup__city_forecast"] {
        assert!(report.before.iter().any(|t| t == tool), "{report:?}");
    }
    assert!(
        !report.after.iter().any(|t| t.starts_with("weather__")),
        "the weather tools are hidden once its circuit is open: {report:?}"
    );
    assert!(
        report.after.iter().any(|t| t == "backup__city_forecast"),
        "{report:?}"
    );
    assert!(report.list_changes >= 1, "{report:?}");
    assert!(
        report.refused_answer.contains("backup__city_forecast"),
        "the backup's forecast is the alternative: {report:?}"
    );
    assert!(
        !report.refused_answer.contains("geocode"),
        "an unrelated tool is not suggested: {report:?}"
    );
    assert_eq!(report.reached_while_open, 0, "{report:?}");
}
