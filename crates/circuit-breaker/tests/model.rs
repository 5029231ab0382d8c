//! Property test: random sequences of calls (started, answered, dropped),
//! time steps, manual changes and remote transitions, driven through the
//! layer on a paused clock and through a plain reference model of the state
//! machine; after every step both must agree on what was refused (and the
//! `retry_after`), on the state, the counts and the events.
//!
//! The model keeps the obvious data: the count window is a `VecDeque` of the
//! last N outcomes, the time window a log of every call with its bucket.

#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test] fns: a panic fails the test

mod support;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use toolwarden_circuit_breaker::{
    CircuitBreakerLayer, CircuitSnapshot, CircuitState, RemoteTransition, TimeWindow,
};
use toolwarden_core::{Bounds, Events};
use tower::{Layer, Service, ServiceExt};

use support::{refusal, req, Held, Reply, Upstream};

const NS: u64 = 1_000_000; // per ms

#[derive(Debug, Clone)]
struct Cfg {
    failure_threshold: Option<u32>,
    failure_rate: Option<f64>,
    count_window: Option<u32>,
    time_window: Option<(u64, u32)>, // (ms, buckets)
    slow_ms: Option<u64>,
    slow_rate: f64,
    minimum_calls: u32,
    reset_ms: u64,
    multiplier: f64,
    max_reset_ms: u64,
    half_open_max: u32,
    success_threshold: u32,
}

/// The policy mix of a configuration, drawn evenly so that each gets exercised.
#[derive(Debug, Clone, Copy)]
enum Mix {
    ConsecutiveOnly,
    CountWindowOnly,
    TimeWindowOnly,
    Anything,
}

fn cfg() -> impl Strategy<Value = Cfg> {
    let mix = prop_oneof![
        Just(Mix::ConsecutiveOnly),
        Just(Mix::CountWindowOnly),
        Just(Mix::TimeWindowOnly),
        Just(Mix::Anything),
    ];
    (
        mix,
        (
            proptest::option::weighted(0.7, 1u32..6),
            proptest::option::weighted(
                0.7,
                prop_oneof![Just(0.25), Just(0.5), Just(0.6), Just(1.0)],
            ),
            proptest::option::weighted(0.7, 1u32..12),
            proptest::option::weighted(0.4, (50u64..1000, 1u32..6)),
            proptest::option::weighted(0.4, 5u64..200),
            prop_oneof![Just(0.5), Just(1.0)],
        ),
        (
            1u32..6,
            20u64..500,
            prop_oneof![Just(1.0), Just(1.5), Just(2.0), Just(3.0)],
            1u64..5,
            1u32..4,
            1u32..4,
        ),
    )
        .prop_map(
            |(mix, (ft, fr, cw, tw, slow, slow_rate), (min, reset, mult, max_factor, hom, st))| {
                let (ft, fr, cw, tw, slow) = match mix {
                    Mix::ConsecutiveOnly => (Some(ft.unwrap_or(3)), None, None, None, None),
                    Mix::CountWindowOnly => {
                        (None, fr.or(Some(0.5)), Some(cw.unwrap_or(5)), None, slow)
                    }
                    Mix::TimeWindowOnly => (
                        None,
                        fr.or(Some(0.5)),
                        None,
                        Some(tw.unwrap_or((300, 3))),
                        slow,
                    ),
                    Mix::Anything => (ft, fr, cw, tw, slow),
                };
                Cfg {
                    failure_threshold: ft,
                    failure_rate: fr,
                    count_window: cw,
                    time_window: tw,
                    slow_ms: slow,
                    slow_rate,
                    minimum_calls: min,
                    reset_ms: reset,
                    multiplier: mult,
                    max_reset_ms: reset * max_factor,
                    half_open_max: hom,
                    success_threshold: st,
                }
            },
        )
}

impl Cfg {
    fn layer(&self, events: Events) -> Option<CircuitBreakerLayer> {
        let mut b = CircuitBreakerLayer::builder()
            .failure_threshold(self.failure_threshold)
            .failure_rate_threshold(self.failure_rate)
            .count_window(self.count_window)
            .time_window(
                self.time_window
                    .map(|(ms, n)| TimeWindow::new(Duration::from_millis(ms), n)),
            )
            .slow_call_duration(self.slow_ms.map(Duration::from_millis))
            .slow_call_rate_threshold(self.slow_rate)
            .minimum_calls(self.minimum_calls)
            .reset_timeout(Duration::from_millis(self.reset_ms))
            .reset_multiplier(self.multiplier)
            .max_reset_timeout(Duration::from_millis(self.max_reset_ms))
            .jitter(0.0)
            .half_open_max_calls(self.half_open_max)
            .success_threshold(self.success_threshold)
            .bounds(Bounds::max_keys(10).idle_timeout(None))
            .events(events);
        b = b.name("model");
        b.build().ok() // configurations the builder refuses are skipped
    }

    fn reset(&self) -> Duration {
        Duration::from_millis(self.reset_ms)
    }

    /// The open period after `reopens` re-opens: reset × multiplier^reopens, capped.
    fn period(&self, reopens: u32) -> Duration {
        let max = Duration::from_millis(self.max_reset_ms);
        let secs = self.reset().as_secs_f64() * self.multiplier.powi(reopens as i32);
        if secs >= max.as_secs_f64() {
            max
        } else {
            Duration::from_secs_f64(secs)
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Start,
    Answer(usize, Reply),
    Drop(usize),
    Advance(u64),
    ForceOpen,
    ForceClose,
    Disable,
    MetricsOnly,
    RemoteOpen(u64),
    RemoteClose,
}

fn reply() -> impl Strategy<Value = Reply> {
    prop_oneof![
        4 => Just(Reply::Ok),
        3 => Just(Reply::ServerError),
        1 => Just(Reply::Transient),
        1 => Just(Reply::Client),
        1 => Just(Reply::Rejected),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        30 => Just(Op::Start),
        30 => (any::<usize>(), reply()).prop_map(|(i, r)| Op::Answer(i, r)),
        3 => any::<usize>().prop_map(Op::Drop),
        20 => prop_oneof![0u64..50, 0u64..1500].prop_map(Op::Advance),
        1 => Just(Op::ForceOpen),
        1 => Just(Op::ForceClose),
        1 => Just(Op::Disable),
        1 => Just(Op::MetricsOnly),
        1 => (0u64..800).prop_map(Op::RemoteOpen),
        1 => Just(Op::RemoteClose),
    ]
}

// ---------------------------------------------------------------- the model

#[derive(Debug, Clone, Copy, PartialEq)]
enum MState {
    Closed,
    Open,
    HalfOpen,
    Disabled,
    ForcedOpen,
    MetricsOnly,
}

impl MState {
    fn records(self) -> bool {
        matches!(self, MState::Closed | MState::MetricsOnly)
    }
    fn refusing(self) -> bool {
        matches!(self, MState::Open | MState::HalfOpen | MState::ForcedOpen)
    }
    fn manual(self) -> bool {
        matches!(
            self,
            MState::Disabled | MState::ForcedOpen | MState::MetricsOnly
        )
    }
    fn real(self) -> CircuitState {
        match self {
            MState::Closed => CircuitState::Closed,
            MState::Open => CircuitState::Open,
            MState::HalfOpen => CircuitState::HalfOpen,
            MState::Disabled => CircuitState::Disabled,
            MState::ForcedOpen => CircuitState::ForcedOpen,
            MState::MetricsOnly => CircuitState::MetricsOnly,
        }
    }
}

/// What the model remembers of an admitted call.
#[derive(Debug, Clone, Copy)]
struct MTicket {
    tracked: bool,
    epoch: u64,
    probe: bool,
    start: u64,
}

/// (calls, counted failures, slow calls) in a window.
type Counts = (usize, usize, usize);

struct Model {
    cfg: Cfg,
    state: MState,
    epoch: u64,
    open_until: u64,
    reopens: u32,
    probes: u32,
    probe_successes: u32,
    consecutive: u32,
    since_close: u64,
    last_n: VecDeque<(bool, bool)>,
    log: Vec<(u64, bool, bool)>, // (bucket, failure, slow)
    events: Vec<String>,
}

impl Model {
    fn new(cfg: Cfg) -> Self {
        Model {
            cfg,
            state: MState::Closed,
            epoch: 0,
            open_until: 0,
            reopens: 0,
            probes: 0,
            probe_successes: 0,
            consecutive: 0,
            since_close: 0,
            last_n: VecDeque::new(),
            log: Vec::new(),
            events: Vec::new(),
        }
    }

    fn enter(&mut self, state: MState) {
        self.state = state;
        self.epoch += 1;
    }

    fn bucket_of(&self, now: u64) -> Option<u64> {
        self.cfg
            .time_window
            .map(|(ms, n)| now / (Duration::from_millis(ms) / n).as_nanos() as u64)
    }

    fn admit(&mut self, now: u64) -> Result<MTicket, Duration> {
        let ticket = |epoch, probe| MTicket {
            tracked: true,
            epoch,
            probe,
            start: now,
        };
        match self.state {
            MState::Closed | MState::MetricsOnly => Ok(ticket(self.epoch, false)),
            MState::Disabled => Ok(MTicket {
                tracked: false,
                ..ticket(self.epoch, false)
            }),
            MState::ForcedOpen => Err(self.cfg.reset()),
            MState::Open if now < self.open_until => {
                Err(Duration::from_nanos(self.open_until - now))
            }
            MState::Open => {
                self.enter(MState::HalfOpen);
                self.probes = 1;
                self.probe_successes = 0;
                self.events.push("circuit_half_opened".into());
                Ok(ticket(self.epoch, true))
            }
            MState::HalfOpen if self.probes < self.cfg.half_open_max => {
                self.probes += 1;
                Ok(ticket(self.epoch, true))
            }
            MState::HalfOpen => Err(self.cfg.reset()),
        }
    }

    fn open(&mut self, now: u64, period: Duration) {
        self.open_until = now + period.as_nanos() as u64;
        self.probes = 0;
        self.probe_successes = 0;
        self.enter(MState::Open);
        self.events.push("circuit_opened".into());
    }

    fn trip(&mut self, now: u64) {
        let period = self.cfg.period(self.reopens);
        self.open(now, period);
        self.reopens += 1;
    }

    fn close_to(&mut self, state: MState) {
        self.last_n.clear();
        self.log.clear();
        self.consecutive = 0;
        self.since_close = 0;
        self.reopens = 0;
        self.probes = 0;
        self.probe_successes = 0;
        self.enter(state);
    }

    fn reaches(part: usize, calls: usize, threshold: f64) -> bool {
        calls > 0 && part as f64 >= threshold * calls as f64
    }

    fn window_counts(&self, now: u64) -> (Option<Counts>, Option<Counts>) {
        let count = self.cfg.count_window.map(|_| {
            let f = self.last_n.iter().filter(|c| c.0).count();
            let s = self.last_n.iter().filter(|c| c.1).count();
            (self.last_n.len(), f, s)
        });
        let time = self.cfg.time_window.map(|(_, n)| {
            let head = self.bucket_of(now).unwrap();
            let live: Vec<_> = self
                .log
                .iter()
                .filter(|c| c.0 + u64::from(n) > head)
                .collect();
            let f = live.iter().filter(|c| c.1).count();
            let s = live.iter().filter(|c| c.2).count();
            (live.len(), f, s)
        });
        (count, time)
    }

    fn should_trip(&self, now: u64) -> bool {
        let min = self.cfg.minimum_calls as usize;
        if let Some(t) = self.cfg.failure_threshold {
            if self.since_close >= min as u64 && self.consecutive >= t {
                return true;
            }
        }
        let (count, time) = self.window_counts(now);
        [count, time].into_iter().flatten().any(|(calls, f, s)| {
            calls >= min
                && (self
                    .cfg
                    .failure_rate
                    .is_some_and(|t| Self::reaches(f, calls, t))
                    || (self.cfg.slow_ms.is_some() && Self::reaches(s, calls, self.cfg.slow_rate)))
        })
    }

    fn answer(&mut self, t: MTicket, reply: Reply, now: u64) {
        if !t.tracked || t.epoch != self.epoch {
            return;
        }
        let slow = self.cfg.slow_ms.is_some_and(|ms| now - t.start >= ms * NS);
        let success = reply == Reply::Ok;
        let failure = reply.is_counted_failure();
        if t.probe {
            if self.state == MState::HalfOpen {
                self.probes -= 1;
                if failure || slow {
                    self.trip(now);
                } else if success {
                    self.probe_successes += 1;
                    if self.probe_successes >= self.cfg.success_threshold {
                        self.close_to(MState::Closed);
                        self.events.push("circuit_closed".into());
                    }
                }
            }
        } else if self.state.records() && (success || failure) {
            if let Some(n) = self.cfg.count_window {
                self.last_n.push_back((failure, slow));
                if self.last_n.len() > n as usize {
                    self.last_n.pop_front();
                }
            }
            if let Some(bucket) = self.bucket_of(now) {
                self.log.push((bucket, failure, slow));
            }
            self.since_close += 1;
            self.consecutive = if failure { self.consecutive + 1 } else { 0 };
            if self.state == MState::Closed && self.should_trip(now) {
                self.trip(now);
            }
        }
    }

    fn dropped(&mut self, t: MTicket) {
        if t.probe && t.epoch == self.epoch && self.state == MState::HalfOpen {
            self.probes -= 1;
        }
    }

    fn set_mode(&mut self, mode: MState) {
        let from = self.state;
        if from == mode {
            return;
        }
        if mode == MState::ForcedOpen {
            self.enter(mode);
            self.probes = 0;
            if !from.refusing() {
                self.events.push("circuit_opened".into());
            }
            return;
        }
        if from.records() && mode.records() {
            self.enter(mode);
        } else {
            self.close_to(mode);
        }
        if from.refusing() {
            self.events.push("circuit_closed".into());
        }
    }

    fn remote_open(&mut self, now: u64, retry_after: Duration) {
        if self.state.manual() {
            return;
        }
        let until = now + retry_after.as_nanos() as u64;
        if self.state == MState::Open {
            self.open_until = self.open_until.max(until);
        } else {
            self.open(now, retry_after);
        }
    }

    fn remote_close(&mut self) {
        if self.state.manual() || self.state == MState::Closed {
            return;
        }
        self.close_to(MState::Closed);
        self.events.push("circuit_closed".into());
    }

    fn retry_after(&self, now: u64) -> Option<Duration> {
        match self.state {
            MState::ForcedOpen => Some(self.cfg.reset()),
            MState::Open => Some(Duration::from_nanos(self.open_until.saturating_sub(now))),
            MState::HalfOpen if self.probes >= self.cfg.half_open_max => Some(self.cfg.reset()),
            _ => None,
        }
    }

    fn check(&self, snap: &CircuitSnapshot, now: u64) -> Result<(), TestCaseError> {
        prop_assert_eq!(snap.state, self.state.real());
        prop_assert_eq!(
            snap.retry_after_seconds,
            self.retry_after(now).map(|d| d.as_secs_f64())
        );
        prop_assert_eq!(snap.consecutive_failures, self.consecutive);
        prop_assert_eq!(snap.half_open_in_flight, self.probes);
        prop_assert_eq!(snap.half_open_successes, self.probe_successes);
        prop_assert_eq!(snap.reopens, self.reopens);
        let (count, time) = self.window_counts(now);
        let as_tuple = |w: &toolwarden_circuit_breaker::WindowStats| {
            (w.calls as usize, w.failures as usize, w.slow_calls as usize)
        };
        prop_assert_eq!(snap.count_window.as_ref().map(as_tuple), count);
        prop_assert_eq!(snap.time_window.as_ref().map(as_tuple), time);
        Ok(())
    }
}

// ---------------------------------------------------------------- the run

type Pending = (
    toolwarden_circuit_breaker::ResponseFuture<
        std::pin::Pin<
            Box<
                dyn std::future::Future<
                        Output = Result<
                            toolwarden_core::jsonrpc::Response,
                            toolwarden_core::BoxError,
                        >,
                    > + Send,
            >,
        >,
        toolwarden_core::McpClassifier,
    >,
    Option<Held>,
    MTicket,
);

fn run(cfg: Cfg, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let seen = Arc::new(Mutex::new(Vec::<String>::new()));
        let sink = Arc::clone(&seen);
        let events = Events::new().with(move |e: &toolwarden_core::Event<'_>| {
            sink.lock().unwrap().push(e.name().to_owned());
        });
        let Some(layer) = cfg.layer(events) else {
            return Ok(());
        };
        let registry = layer.registry().clone();
        let upstream = Upstream::new();
        let mut svc = layer.layer(upstream.clone());
        let mut model = Model::new(cfg.clone());
        let mut now: u64 = 0; // ns since the registry was made
        let mut pending: Vec<Pending> = Vec::new();

        for (step, op) in ops.into_iter().enumerate() {
            match op {
                Op::Start => {
                    let expected = model.admit(now);
                    let before = upstream.calls();
                    let mut fut = svc.ready().await.unwrap().call(req("t"));
                    let reached = upstream.calls() > before;
                    match expected {
                        Ok(ticket) => {
                            prop_assert!(
                                reached,
                                "step {}: the model admits, the layer refused",
                                step
                            );
                            pending.push((fut, upstream.pop(), ticket));
                        }
                        Err(retry_after) => {
                            prop_assert!(
                                !reached,
                                "step {}: the model refuses, the layer admitted",
                                step
                            );
                            let err = (&mut fut).await.unwrap_err();
                            let open = refusal(&err).expect("a CircuitOpen");
                            prop_assert_eq!(open.key(), "t");
                            prop_assert_eq!(
                                toolwarden_core::Rejection::retry_after(open),
                                Some(retry_after),
                                "step {}",
                                step
                            );
                        }
                    }
                }
                Op::Answer(i, reply) if !pending.is_empty() => {
                    let (fut, held, ticket) = pending.remove(i % pending.len());
                    held.unwrap().answer(reply);
                    let _ = fut.await;
                    model.answer(ticket, reply, now);
                }
                Op::Drop(i) if !pending.is_empty() => {
                    let (fut, _held, ticket) = pending.remove(i % pending.len());
                    drop(fut);
                    model.dropped(ticket);
                }
                Op::Answer(..) | Op::Drop(_) => {}
                Op::Advance(ms) => {
                    tokio::time::advance(Duration::from_millis(ms)).await;
                    now += ms * NS;
                }
                Op::ForceOpen => {
                    registry.force_open("t");
                    model.set_mode(MState::ForcedOpen);
                }
                Op::ForceClose => {
                    registry.force_close("t");
                    model.set_mode(MState::Closed);
                }
                Op::Disable => {
                    registry.disable("t");
                    model.set_mode(MState::Disabled);
                }
                Op::MetricsOnly => {
                    registry.metrics_only("t");
                    model.set_mode(MState::MetricsOnly);
                }
                Op::RemoteOpen(ms) => {
                    registry.apply_remote(
                        "t",
                        &RemoteTransition::open(Duration::from_millis(ms), "r2"),
                    );
                    model.remote_open(now, Duration::from_millis(ms));
                }
                Op::RemoteClose => {
                    registry.apply_remote("t", &RemoteTransition::closed("r2"));
                    model.remote_close();
                }
            }
            if let Some(snap) = registry.circuit("t") {
                model.check(&snap, now).map_err(|e| {
                    TestCaseError::fail(format!("step {step}: {e}\nsnapshot: {snap:#?}"))
                })?;
            }
            prop_assert_eq!(
                &*seen.lock().unwrap(),
                &model.events,
                "step {}: events",
                step
            );
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn layer_agrees_with_the_reference_model(cfg in cfg(), ops in proptest::collection::vec(op(), 1..300)) {
        run(cfg, ops)?;
    }
}
