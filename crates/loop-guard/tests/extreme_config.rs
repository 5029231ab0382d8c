//! Extreme configuration never panics: every knob of `LoopGuardBuilder` at
//! its edges (zero, one, the bounds, `usize::MAX`, `Duration::MAX`) either
//! builds, and then calls on a paused clock never panic, or is refused
//! with a `ConfigError` that names the field.

mod support;

use std::time::Duration;

use proptest::prelude::*;
use serde_json::json;
use toolwarden_core::testing::{MockMcp, ReadyChecked, Step};
use toolwarden_core::Bounds;
use toolwarden_loop_guard::{LoopGuardBuilder, LoopGuardLayer, ToolLimits};
use tower::Layer;

use support::*;

/// The fields `build()` may name, alone or as "a, b, c".
const FIELDS: [&str; 11] = [
    "window_calls",
    "window_time",
    "bounds.max_keys",
    "bounds.idle_timeout",
    "refusal_cooldown",
    "max_cycle_period",
    "max_cycle_repeats",
    "limits.max_failing_repeats",
    "limits.max_repeats",
    "tools.\"poll\".limits.max_failing_repeats",
    "tools.\"poll\".limits.max_repeats",
];

/// Any duration, the edges first.
fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        Just(Duration::from_nanos(1)),
        Just(Duration::from_millis(1)),
        Just(Duration::from_secs(1)),
        Just(Duration::from_secs(30)),
        Just(Duration::from_millis(30_001)),
        Just(Duration::from_secs(300)),
        Just(Duration::from_secs(u64::MAX / 1000)),
        Just(Duration::from_millis(u64::MAX)),
        Just(Duration::MAX),
        any::<u64>().prop_map(Duration::from_nanos),
        any::<u64>().prop_map(Duration::from_millis),
        (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
    ]
}

/// Mostly values `build()` accepts (so that calls are made), sometimes any.
fn mostly<T: std::fmt::Debug + Clone>(
    valid: impl Strategy<Value = T> + 'static,
    any: impl Strategy<Value = T> + 'static,
) -> BoxedStrategy<T> {
    prop_oneof![9 => valid, 1 => any].boxed()
}

fn count() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(0),
        Just(1),
        Just(2),
        Just(1024),
        Just(1025),
        Just(usize::MAX),
        any::<usize>(),
    ]
}

fn limit() -> BoxedStrategy<Option<u32>> {
    mostly(
        prop::option::of(1u32..=8),
        prop_oneof![
            Just(Some(0)),
            Just(Some(u32::MAX)),
            any::<u32>().prop_map(Some)
        ],
    )
}

#[derive(Debug, Clone)]
struct Knobs {
    window_calls: usize,
    window_time: Duration,
    max_sessions: usize,
    session_idle_timeout: Option<Duration>,
    refusal_cooldown: Duration,
    max_cycle_period: usize,
    max_cycle_repeats: u32,
    limits: (Option<u32>, Option<u32>),
    tool_limits: (Option<u32>, Option<u32>),
}

/// How the idle timeout relates to the window: it must not be shorter.
#[derive(Debug, Clone)]
enum Idle {
    None,
    SameAsWindow,
    Max,
    Any(Duration),
}

fn knobs() -> impl Strategy<Value = Knobs> {
    let window_time = mostly(
        prop_oneof![
            Just(Duration::from_millis(1)),
            Just(Duration::from_secs(1)),
            Just(Duration::from_secs(300)),
            Just(Duration::from_millis(u64::MAX)),
            Just(Duration::MAX),
            (1u64..10_000_000).prop_map(Duration::from_millis),
        ],
        duration(),
    );
    let idle = prop_oneof![
        Just(Idle::None),
        Just(Idle::SameAsWindow),
        Just(Idle::Max),
        duration().prop_map(Idle::Any),
    ];
    (
        (
            mostly(prop_oneof![Just(16usize), Just(1024), 8usize..64], count()),
            window_time,
            mostly(prop_oneof![1usize..4, Just(usize::MAX)], Just(0)),
            idle,
        ),
        (
            mostly(
                prop_oneof![
                    Just(Duration::from_nanos(1)),
                    Just(Duration::from_secs(30)),
                    (1u64..=30_000).prop_map(Duration::from_millis),
                ],
                duration(),
            ),
            mostly(2usize..=8, count()),
            mostly(
                2u32..=4,
                prop_oneof![Just(0u32), Just(1), Just(u32::MAX), any::<u32>()],
            ),
        ),
        ((limit(), limit()), (limit(), limit())),
    )
        .prop_map(
            |(
                (window_calls, window_time, max_sessions, idle),
                (refusal_cooldown, max_cycle_period, max_cycle_repeats),
                (limits, tool_limits),
            )| Knobs {
                window_calls,
                window_time,
                max_sessions,
                session_idle_timeout: match idle {
                    Idle::None => None,
                    Idle::SameAsWindow => Some(window_time),
                    Idle::Max => Some(Duration::MAX),
                    Idle::Any(d) => Some(d),
                },
                refusal_cooldown,
                max_cycle_period,
                max_cycle_repeats,
                limits,
                tool_limits,
            },
        )
}

fn builder(k: &Knobs) -> LoopGuardBuilder {
    let limits = |(failing, repeats): (Option<u32>, Option<u32>)| ToolLimits {
        max_failing_repeats: failing,
        max_repeats: repeats,
        cycles: true,
    };
    let tool_limits = limits(k.tool_limits);
    LoopGuardLayer::builder()
        .window_calls(k.window_calls)
        .window_time(k.window_time)
        .bounds(Bounds::max_keys(k.max_sessions).idle_timeout(k.session_idle_timeout))
        .refusal_cooldown(k.refusal_cooldown)
        .max_cycle_period(k.max_cycle_period)
        .max_cycle_repeats(k.max_cycle_repeats)
        .limits(limits(k.limits))
        .tool("poll", move |b| b.limits(tool_limits))
}

/// A few calls of every kind, with the clock moved by `steps`.
async fn exercise(layer: toolwarden_loop_guard::LoopGuardLayer, steps: &[Duration]) {
    let mock = MockMcp::new()
        .default_step("search", Step::tool_error("boom"))
        .default_step("poll", Step::closed());
    let mut svc = layer.layer(ReadyChecked::new(mock.clone()));
    let mut other = layer.layer(ReadyChecked::new(mock));
    for (i, step) in steps.iter().enumerate() {
        let session = format!("s{}", i % 3);
        let _ = send(&mut svc, tool_call("search", json!({"q": 1}))).await;
        let _ = send(
            &mut other,
            in_session(&session, tool_call("poll", json!({}))),
        )
        .await;
        let _ = send(&mut svc, tool_call("ok", json!({"n": i % 2}))).await;
        let _ = send(
            &mut other,
            in_session(&session, tool_call("search", json!({"q": 1}))),
        )
        .await;
        tokio::time::advance(*step).await;
    }
}

fn step() -> impl Strategy<Value = Duration> {
    // What a paused clock can be moved by without tokio itself overflowing.
    prop_oneof![
        Just(Duration::ZERO),
        Just(Duration::from_millis(1)),
        Just(Duration::from_secs(30)),
        Just(Duration::from_secs(601)),
        Just(Duration::from_secs(365 * 24 * 3600)),
        (0u64..100_000).prop_map(Duration::from_millis),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_configuration_builds_or_names_the_bad_field_and_never_panics(
        k in knobs(),
        steps in prop::collection::vec(step(), 1..12),
    ) {
        match builder(&k).build() {
            Err(error) => {
                let field = error.field();
                prop_assert!(
                    field.split(", ").all(|f| FIELDS.contains(&f)),
                    "unknown field {field:?} in {error}"
                );
            }
            Ok(layer) => {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .start_paused(true)
                    .build()
                    .unwrap();
                runtime.block_on(exercise(layer, &steps));
            }
        }
    }
}

#[test]
fn the_extremes_that_are_valid_build_and_serve() {
    let k = Knobs {
        window_calls: 1024,
        window_time: Duration::MAX,
        max_sessions: usize::MAX,
        session_idle_timeout: Some(Duration::MAX),
        refusal_cooldown: Duration::from_nanos(1),
        max_cycle_period: 8,
        max_cycle_repeats: 128,
        limits: (Some(1), Some(1024)),
        tool_limits: (None, None),
    };
    let layer = builder(&k).build().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    runtime.block_on(exercise(
        layer,
        &[
            Duration::ZERO,
            Duration::from_secs(1),
            Duration::from_secs(3600),
        ],
    ));
}
