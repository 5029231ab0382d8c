//! Extreme configuration values never panic: `build` accepts or refuses
//! them (naming the field), and a layer it accepts trips, refuses, waits
//! through open periods and probes without panicking.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use proptest::prelude::*;
use toolwarden_circuit_breaker::{
    CircuitBreakerBuilder, CircuitBreakerLayer, RemoteTransition, TimeWindow,
};
use toolwarden_core::{Bounds, CircuitView, Rejection};
use tower::Layer;

use support::{call, refusal, secs, Reply, Scripted};

fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        Just(Duration::MAX),
        Just(Duration::from_nanos(1)),
        Just(Duration::from_secs(u64::MAX)),
        any::<u64>().prop_map(Duration::from_nanos),
        any::<u64>().prop_map(Duration::from_millis),
        (any::<u64>(), 0..1_000_000_000u32).prop_map(|(s, n)| Duration::new(s, n)),
        (1..100_000u64).prop_map(Duration::from_millis),
    ]
}

fn float() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(-1.0),
        Just(0.0),
        Just(-0.0),
        Just(f64::MAX),
        Just(f64::MIN_POSITIVE),
        Just(1.0),
        Just(1.0 - f64::EPSILON),
        any::<f64>(),
        0.0..1.0,
        1.0..1e6,
    ]
}

#[derive(Debug, Clone)]
struct Knobs {
    failure_rate_threshold: Option<f64>,
    time_window: Option<(Duration, u32)>,
    slow_call_duration: Option<Duration>,
    slow_call_rate_threshold: f64,
    reset_timeout: Duration,
    reset_multiplier: f64,
    max_reset_timeout: Duration,
    jitter: f64,
    probe_timeout: Duration,
    idle_timeout: Option<Duration>,
    on_tool: bool,
}

/// Valid values, but for one or two knobs set to arbitrary extremes (most
/// fully arbitrary sets are refused at the first bad float).
fn one_extreme() -> impl Strategy<Value = Knobs> {
    let knob = || (0..11usize, duration(), float(), any::<bool>());
    (
        knob(),
        knob(),
        proptest::option::of(duration()),
        any::<bool>(),
    )
        .prop_map(|(a, b, idle_timeout, on_tool)| {
            let mut k = Knobs {
                idle_timeout,
                on_tool,
                ..valid()
            };
            for (i, d, f, some) in [a, b] {
                match i {
                    0 => k.failure_rate_threshold = some.then_some(f),
                    1 => k.time_window = some.then_some((d, 10)),
                    2 => k.slow_call_duration = some.then_some(d),
                    3 => k.slow_call_rate_threshold = f,
                    4 => k.reset_timeout = d,
                    5 => k.reset_multiplier = f,
                    6 => k.max_reset_timeout = d,
                    7 => k.jitter = f,
                    8 => k.probe_timeout = d,
                    9 => k.idle_timeout = some.then_some(d),
                    _ => k.time_window = some.then_some((d, 1)),
                }
            }
            k
        })
}

fn valid() -> Knobs {
    Knobs {
        failure_rate_threshold: Some(0.5),
        time_window: None,
        slow_call_duration: None,
        slow_call_rate_threshold: 1.0,
        reset_timeout: secs(30),
        reset_multiplier: 2.0,
        max_reset_timeout: secs(300),
        jitter: 0.1,
        probe_timeout: secs(30),
        idle_timeout: None,
        on_tool: false,
    }
}

fn knobs() -> impl Strategy<Value = Knobs> {
    prop_oneof![1 => all_arbitrary(), 3 => one_extreme()]
}

fn all_arbitrary() -> impl Strategy<Value = Knobs> {
    (
        (
            proptest::option::of(float()),
            proptest::option::of((
                duration(),
                prop_oneof![Just(0), Just(1), Just(u32::MAX), 1..20u32],
            )),
            proptest::option::of(duration()),
            float(),
            duration(),
            float(),
        ),
        (
            duration(),
            float(),
            duration(),
            proptest::option::of(duration()),
            any::<bool>(),
        ),
    )
        .prop_map(
            |(
                (
                    failure_rate_threshold,
                    time_window,
                    slow_call_duration,
                    slow_call_rate_threshold,
                    reset_timeout,
                    reset_multiplier,
                ),
                (max_reset_timeout, jitter, probe_timeout, idle_timeout, on_tool),
            )| Knobs {
                failure_rate_threshold,
                time_window,
                slow_call_duration,
                slow_call_rate_threshold,
                reset_timeout,
                reset_multiplier,
                max_reset_timeout,
                jitter,
                probe_timeout,
                idle_timeout,
                on_tool,
            },
        )
}

fn apply(b: CircuitBreakerBuilder, k: &Knobs) -> CircuitBreakerBuilder {
    b.failure_threshold(2)
        .minimum_calls(1)
        .failure_rate_threshold(k.failure_rate_threshold)
        .time_window(k.time_window.map(|(d, n)| TimeWindow::new(d, n)))
        .slow_call_duration(k.slow_call_duration)
        .slow_call_rate_threshold(k.slow_call_rate_threshold)
        .reset_timeout(k.reset_timeout)
        .reset_multiplier(k.reset_multiplier)
        .max_reset_timeout(k.max_reset_timeout)
        .jitter(k.jitter)
        .probe_timeout(k.probe_timeout)
}

/// Builds the layer and drives it; returns whether `build` accepted it.
fn drive(k: Knobs) -> bool {
    let builder =
        CircuitBreakerLayer::builder().bounds(Bounds::max_keys(8).idle_timeout(k.idle_timeout));
    let builder = if k.on_tool {
        let tool = k.clone();
        builder.tool("t", move |b| apply(b, &tool))
    } else {
        apply(builder, &k)
    };
    let layer = match builder.build() {
        Ok(layer) => layer,
        Err(err) => {
            assert!(!err.field().is_empty());
            return false;
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let up = Scripted::new();
        let mut svc = layer.layer(up.clone());
        let registry = layer.registry().clone();
        for round in 0..6 {
            up.set(
                "t",
                if round == 5 {
                    Reply::Ok
                } else {
                    Reply::ServerError
                },
            );
            for _ in 0..4 {
                if let Err(err) = call(&mut svc, "t").await {
                    let open = refusal(&err).expect("only refusals fail");
                    // Wait through the open period (at most a year at a time).
                    let wait = open
                        .retry_after()
                        .unwrap_or_default()
                        .min(secs(365 * 24 * 3600));
                    tokio::time::advance(wait + Duration::from_millis(1)).await;
                }
            }
            let _ = registry.snapshot();
            let _ = registry.is_open("t");
        }
        registry.apply_remote("t", &RemoteTransition::open(Duration::MAX, "other"));
        let _ = call(&mut svc, "t").await;
        let _ = serde_json::to_string(&registry.snapshot()).unwrap();
        registry.force_open("t");
        let _ = call(&mut svc, "t").await;
        registry.reset_all();
    });
    true
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn extreme_values_never_panic(knobs in knobs()) {
        let _built = drive(knobs);
    }
}

#[test]
fn the_extremes_themselves_never_panic() {
    let base = valid();
    let mut built = 0;
    for on_tool in [false, true] {
        for max in [Duration::MAX, Duration::from_secs(u64::MAX)] {
            // The longest open period, with jitter and a huge multiplier.
            built += usize::from(drive(Knobs {
                max_reset_timeout: max,
                reset_multiplier: 1e300,
                jitter: 0.99,
                on_tool,
                ..base.clone()
            }));
            built += usize::from(drive(Knobs {
                reset_timeout: max,
                max_reset_timeout: max,
                probe_timeout: max,
                slow_call_duration: Some(max),
                time_window: Some((max, 1)),
                on_tool,
                ..base.clone()
            }));
            // The default idle timeout is shorter than such an open period: refused.
            assert!(!drive(Knobs {
                max_reset_timeout: max,
                idle_timeout: Some(secs(600)),
                on_tool,
                ..base.clone()
            }));
            built += usize::from(drive(Knobs {
                idle_timeout: Some(max),
                on_tool,
                ..base.clone()
            }));
        }
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -1.0, f64::MAX] {
            assert!(!drive(Knobs {
                jitter: bad,
                on_tool,
                ..base.clone()
            }));
            assert!(!drive(Knobs {
                reset_multiplier: bad.min(0.5),
                on_tool,
                ..base.clone()
            }));
            assert!(!drive(Knobs {
                failure_rate_threshold: Some(bad),
                on_tool,
                ..base.clone()
            }));
            assert!(!drive(Knobs {
                slow_call_rate_threshold: bad,
                on_tool,
                ..base.clone()
            }));
        }
    }
    assert_eq!(built, 12);
}
