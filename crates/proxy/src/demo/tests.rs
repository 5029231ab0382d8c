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
