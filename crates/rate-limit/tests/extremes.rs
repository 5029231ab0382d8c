//! Extreme configuration values never panic: `build` accepts or refuses
//! them, and a layer it accepts serves calls (refusing, waiting, or
//! admitting) without panicking.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use proptest::prelude::*;
use toolwarden_core::testing::{MockMcp, ReadyChecked};
use toolwarden_core::Bounds;
use toolwarden_rate_limit::{Mode, Rate, RateLimitLayer};
use tower::Layer;

use support::*;

fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        Just(Duration::MAX),
        Just(Duration::from_nanos(1)),
        Just(Duration::from_secs(u64::MAX)),
        any::<u64>().prop_map(Duration::from_nanos),
        any::<u64>().prop_map(Duration::from_millis),
        (any::<u64>(), 0..1_000_000_000u32).prop_map(|(s, n)| Duration::new(s, n)),
        (0..10_000u64).prop_map(Duration::from_millis),
    ]
}

fn count() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0), Just(1), Just(u32::MAX), any::<u32>(), 1..20u32]
}

fn rate() -> impl Strategy<Value = Option<(Rate, u32)>> {
    proptest::option::of(
        (count(), duration(), count()).prop_map(|(n, per, burst)| (Rate::new(n, per), burst)),
    )
}

#[derive(Debug, Clone)]
struct Knobs {
    global: Option<(Rate, u32)>,
    per_tool: Option<(Rate, u32)>,
    tool: Option<(Rate, u32)>,
    max_wait: Option<Duration>,
    idle_timeout: Option<Duration>,
}

/// Valid quotas, but for one knob at an arbitrary extreme (most fully
/// arbitrary sets are refused at the first bad quota).
fn one_extreme() -> impl Strategy<Value = Knobs> {
    (0..5usize, rate(), proptest::option::of(duration())).prop_map(|(i, rate, duration)| {
        let mut k = Knobs {
            global: Some((Rate::per_second(5), 5)),
            per_tool: Some((Rate::per_second(1), 2)),
            tool: Some((Rate::per_minute(1), 1)),
            max_wait: Some(secs(2)),
            idle_timeout: Some(secs(60)),
        };
        match i {
            0 => k.global = rate,
            1 => k.per_tool = rate,
            2 => k.tool = rate,
            3 => k.max_wait = duration,
            _ => k.idle_timeout = duration,
        }
        k
    })
}

fn knobs() -> impl Strategy<Value = Knobs> {
    prop_oneof![1 => all_arbitrary(), 3 => one_extreme()]
}

fn all_arbitrary() -> impl Strategy<Value = Knobs> {
    (
        rate(),
        rate(),
        rate(),
        proptest::option::of(duration()),
        proptest::option::of(duration()),
    )
        .prop_map(|(global, per_tool, tool, max_wait, idle_timeout)| Knobs {
            global,
            per_tool,
            tool,
            max_wait,
            idle_timeout,
        })
}

/// Builds the layer and drives a few calls; returns whether `build` accepted it.
fn drive(knobs: Knobs) -> bool {
    let mut builder =
        RateLimitLayer::builder().bounds(Bounds::max_keys(4).idle_timeout(knobs.idle_timeout));
    if let Some((rate, burst)) = knobs.global {
        builder = builder.global(rate, burst);
    }
    if let Some((rate, burst)) = knobs.per_tool {
        builder = builder.per_tool(rate, burst);
    }
    if let Some((rate, burst)) = knobs.tool {
        builder = builder.tool("special", move |b| b.per_tool(rate, burst));
    }
    if let Some(max_wait) = knobs.max_wait {
        builder = builder.mode(Mode::Wait { max_wait });
    }
    let Ok(layer) = builder.build() else {
        return false; // refused, naming a field: fine
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let mock = MockMcp::new();
        let mut svc = layer.layer(ReadyChecked::new(mock.clone()));
        let mut other = layer.clone().layer(ReadyChecked::new(mock));
        for round in 0..4u64 {
            for tool in ["search", "special", "search", "fetch", "special"] {
                let svc = if round % 2 == 0 { &mut svc } else { &mut other };
                // A wait past an hour is cut short (dropping the waiting call).
                let _ = tokio::time::timeout(secs(3600), call(svc, tool_call(tool))).await;
            }
            tokio::time::advance(ms(1500 * round)).await;
        }
        let _ = layer.limits().check(&tool_call("search"));
    });
    true
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn extreme_values_never_panic(knobs in knobs()) {
        let _built = drive(knobs);
    }
}

#[test]
fn the_extremes_themselves_never_panic() {
    let mut built = 0;
    for per in [
        Duration::ZERO,
        Duration::MAX,
        Duration::from_nanos(1),
        secs(1),
    ] {
        for max_wait in [None, Some(Duration::ZERO), Some(Duration::MAX)] {
            for idle_timeout in [None, Some(Duration::ZERO), Some(Duration::MAX)] {
                built += usize::from(drive(Knobs {
                    global: Some((Rate::per_second(2), 2)),
                    per_tool: Some((Rate::new(1, per), 1)),
                    tool: Some((Rate::per_second(1), 1)),
                    max_wait,
                    idle_timeout,
                }));
            }
        }
    }
    // 1 ns and 1 s periods, with any max_wait but zero, any idle timeout but zero.
    assert_eq!(built, 2 * 2 * 2);
}
