//! One key's breaker: the state machine, its admission fast path and its
//! outcome recording.
//!
//! # Concurrency
//!
//! The state lives in one atomic word, `epoch << 3 | state`, and the open
//! deadline in another, so admitting a call in the closed state is one
//! atomic load. Every transition happens under the breaker's own short lock
//! and bumps the epoch; an admitted call carries the epoch it was admitted
//! in, and its outcome is recorded only if the epoch is still the same (a
//! call admitted before the circuit opened does not count after it). The
//! lock is also what records an outcome: the window cell and its running
//! totals, the consecutive count and the trip decision change together,
//! which a lock-free ring cannot do without either miscounting under races
//! or spinning (a lock in disguise). It is per key, held for a few dozen
//! nanoseconds and uncontended unless many tasks call one tool at once.
//!
//! The common case takes no lock at all: while a breaker is *clean* (its
//! count window full of successes, no time window, no failure streak, the
//! minimum number of calls reached), recording one more plain success would
//! change nothing but the ring's position, so a `CLEAN` bit in the state word,
//! kept under the lock, lets such a success end with one atomic load.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::time::Instant;
use toolwarden_core::{CircuitState, Event, FailureClass, Key, Outcome, OutcomeKind};

use crate::config::Config;
use crate::registry::Shared;
use crate::sync::{LocalTransition, ProbePermit, ProbeRequest, RemoteState, RemoteTransition};
use crate::window::{reaches, CountWindow, Mark, TimeBuckets, WindowStats};

/// What the state word needs of a [`CircuitState`] (the type lives in the
/// core, so that every crate reports one state type).
trait StateBits: Copy {
    fn code(self) -> u64;
    fn from_code(code: u64) -> Self;
    /// Whether outcomes are recorded into the windows in this state.
    fn records(self) -> bool;
    /// Whether the state refuses (some) calls.
    fn refusing(self) -> bool;
}

impl StateBits for CircuitState {
    fn code(self) -> u64 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::Open => 1,
            CircuitState::HalfOpen => 2,
            CircuitState::Disabled => 3,
            CircuitState::ForcedOpen => 4,
            CircuitState::MetricsOnly => 5,
        }
    }

    fn from_code(code: u64) -> Self {
        match code & STATE_MASK {
            0 => CircuitState::Closed,
            1 => CircuitState::Open,
            2 => CircuitState::HalfOpen,
            3 => CircuitState::Disabled,
            4 => CircuitState::ForcedOpen,
            _ => CircuitState::MetricsOnly,
        }
    }

    fn records(self) -> bool {
        matches!(self, CircuitState::Closed | CircuitState::MetricsOnly)
    }

    fn refusing(self) -> bool {
        matches!(
            self,
            CircuitState::Open | CircuitState::HalfOpen | CircuitState::ForcedOpen
        )
    }
}

const STATE_BITS: u32 = 3;
const STATE_MASK: u64 = (1 << STATE_BITS) - 1;
/// Set while a plain success would change nothing (see the module docs).
const CLEAN: u64 = 1 << STATE_BITS;
const EPOCH_SHIFT: u32 = STATE_BITS + 1;
/// The shortest wait a denied probe permit asks of the caller, so that a
/// refusal always carries a `retry_after`.
const MIN_DENIAL: Duration = Duration::from_millis(1);

#[inline]
fn state_of(word: u64) -> CircuitState {
    CircuitState::from_code(word)
}

#[inline]
fn epoch_of(word: u64) -> u64 {
    word >> EPOCH_SHIFT
}

/// The word of the next epoch, in `state` (and not clean).
fn next_word(word: u64, state: CircuitState) -> u64 {
    ((epoch_of(word) + 1) << EPOCH_SHIFT) | state.code()
}

/// What an admitted call carries to its completion.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticket {
    epoch: u64,
    probe: bool,
    started: Option<Instant>,
    /// For a probe, when it was admitted (nanoseconds since the registry's
    /// epoch): its entry in `Record::probe_starts`.
    probe_start: u64,
}

impl Ticket {
    pub(crate) fn is_probe(&self) -> bool {
        self.probe
    }
}

/// The decision on one call.
#[derive(Debug)]
pub(crate) enum Admission {
    /// Forward it and record its outcome.
    Tracked(Ticket),
    /// Forward it and record nothing (disabled).
    Untracked,
    /// Refuse it; a probe may pass after this long.
    Refused(Duration),
}

/// A transition to announce once the lock is released.
#[derive(Debug, Clone, Copy)]
enum Change {
    /// Opened (or forced open) for this long.
    Opened(Duration, CircuitState),
    HalfOpen,
    /// Entered a state that admits calls.
    Closed(CircuitState),
}

/// The few most recent error kinds, with how often each was seen since
/// the breaker was created or reset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecentError {
    /// The outcome kind (`tool_error`, `protocol_error`, `transport`,
    /// `timeout`, `rejected`): the OpenTelemetry `error.type`.
    pub kind: &'static str,
    /// The failure class (`transient`, `server`, `client`).
    pub class: Option<&'static str>,
    /// The JSON-RPC error code, when there was one.
    pub code: Option<i64>,
    /// Whether it counted against the circuit.
    pub counted: bool,
    /// How many times it was seen.
    pub count: u64,
    /// When it was last seen, in Unix milliseconds (wall clock).
    pub last_seen_unix_ms: u64,
}

/// The wall clock in Unix milliseconds (0 before 1970).
fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// How many distinct error kinds a breaker remembers.
pub const RECENT_ERRORS: usize = 8;

#[derive(Default)]
struct RecentErrors {
    // Most recent first; at most RECENT_ERRORS entries.
    entries: Vec<RecentError>,
}

impl RecentErrors {
    fn push(&mut self, outcome: &Outcome) {
        let kind = outcome.kind.as_str();
        let class = outcome.class.map(|c| c.as_str());
        let pos = self
            .entries
            .iter()
            .position(|e| e.kind == kind && e.class == class && e.code == outcome.code);
        let mut entry = match pos {
            Some(i) => self.entries.remove(i),
            None => {
                self.entries.truncate(RECENT_ERRORS - 1);
                RecentError {
                    kind,
                    class,
                    code: outcome.code,
                    counted: counts_against_the_tool(outcome),
                    count: 0,
                    last_seen_unix_ms: 0,
                }
            }
        };
        entry.count += 1;
        entry.last_seen_unix_ms = unix_ms_now();
        self.entries.insert(0, entry);
    }
}

/// Failures and refusals seen by a breaker since it was created or reset
/// (successes are in the windows; counting each one here would cost the
/// lock-free success path its lock).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CallTotals {
    /// Counted failures (`Transient` or `Server`).
    pub failed: u64,
    /// Failures that do not count (`Client` failures, other layers' rejections).
    pub ignored: u64,
    /// Slow calls (successful or not).
    pub slow: u64,
    /// Calls refused by this breaker.
    pub not_permitted: u64,
}

/// The mutable part of a breaker, under its lock.
struct Record {
    count: Option<CountWindow>,
    time: Option<TimeBuckets>,
    consecutive_failures: u32,
    calls_since_close: u64,
    probes_in_flight: u32,
    /// When each probe in flight was admitted (nanoseconds since the
    /// registry's epoch), for `probe_timeout`; one entry per probe in
    /// flight, so at most `half_open_max_calls`.
    probe_starts: Vec<u64>,
    probe_successes: u32,
    reopens: u32,
    open_for: Duration,
    totals: CallTotals,
    recent: RecentErrors,
    remote_origin: Option<Arc<str>>,
}

impl Record {
    fn new(config: &Config) -> Self {
        Record {
            count: config.count_window.map(CountWindow::new),
            time: config.time_window.map(TimeBuckets::new),
            consecutive_failures: 0,
            calls_since_close: 0,
            probes_in_flight: 0,
            probe_starts: Vec::new(),
            probe_successes: 0,
            reopens: 0,
            open_for: Duration::ZERO,
            totals: CallTotals::default(),
            recent: RecentErrors::default(),
            remote_origin: None,
        }
    }

    /// Forgets the probes in flight (the circuit left the half-open state).
    fn clear_probes(&mut self) {
        self.probes_in_flight = 0;
        self.probe_starts.clear();
    }

    /// A probe admitted at `start` ended (or was dropped).
    fn end_probe(&mut self, start: u64) {
        self.probes_in_flight = self.probes_in_flight.saturating_sub(1);
        if let Some(i) = self.probe_starts.iter().position(|&s| s == start) {
            self.probe_starts.swap_remove(i);
        }
    }

    /// The deadline of the oldest probe in flight (nanoseconds since the
    /// registry's epoch), if any.
    fn probe_deadline(&self, config: &Config) -> Option<u64> {
        let timeout = u64::try_from(config.probe_timeout.as_nanos()).unwrap_or(u64::MAX);
        self.probe_starts
            .iter()
            .min()
            .map(|start| start.saturating_add(timeout))
    }

    fn clear_windows(&mut self) {
        if let Some(w) = &mut self.count {
            w.clear();
        }
        if let Some(w) = &mut self.time {
            w.clear();
        }
        self.consecutive_failures = 0;
        self.calls_since_close = 0;
    }

    fn should_trip(&self, config: &Config) -> bool {
        let min = config.minimum_calls;
        if let Some(threshold) = config.failure_threshold {
            if self.calls_since_close >= u64::from(min) && self.consecutive_failures >= threshold {
                return true;
            }
        }
        let rate_trips = |(calls, failures, slow): (u32, u32, u32)| {
            calls >= min
                && (config
                    .failure_rate_threshold
                    .is_some_and(|t| reaches(failures, calls, t))
                    || (config.slow_call_duration.is_some()
                        && reaches(slow, calls, config.slow_call_rate_threshold)))
        };
        self.count.as_ref().is_some_and(|w| rate_trips(w.totals()))
            || self.time.as_ref().is_some_and(|w| rate_trips(w.totals()))
    }

    /// Whether one more plain success would change nothing that decides.
    fn is_clean(&self, config: &Config) -> bool {
        self.time.is_none()
            && self.consecutive_failures == 0
            && self.calls_since_close >= u64::from(config.minimum_calls)
            && self.count.as_ref().is_none_or(CountWindow::is_clean)
    }
}

/// A lazily read clock: most closed-state calls never need the time.
struct LazyNow(Option<Instant>);

impl LazyNow {
    fn get(&mut self) -> Instant {
        *self.0.get_or_insert_with(toolwarden_core::time::now)
    }
}

/// One key's circuit breaker. Aligned to two cache lines so that two keys'
/// breakers, each written on every call, never share one.
#[repr(align(128))]
pub(crate) struct Breaker {
    word: AtomicU64,
    /// End of the open period, in nanoseconds since the registry's epoch.
    open_until: AtomicU64,
    not_permitted: AtomicU64,
    record: Mutex<Record>,
    key: Key,
    /// The trip, reset and half-open policy of this breaker: its tool's
    /// override or the registry's, chosen when the breaker is created and
    /// replaced (under the record's lock) when the registry is
    /// [reconfigured](crate::CircuitRegistry::reconfigure).
    policy: ArcSwap<Config>,
    /// `policy.tracks_slow_calls()`, read by the closed-state admission
    /// without loading the policy.
    tracks_slow: AtomicBool,
    /// The registry's policy generation this breaker follows (see
    /// [`Breaker::follow_policies`]).
    generation: AtomicU64,
    shared: Arc<Shared>,
}

impl Breaker {
    pub(crate) fn new(
        key: Key,
        shared: Arc<Shared>,
        policy: Arc<Config>,
        generation: u64,
        initial: CircuitState,
    ) -> Self {
        Breaker {
            word: AtomicU64::new(initial.code()),
            open_until: AtomicU64::new(0),
            not_permitted: AtomicU64::new(0),
            record: Mutex::new(Record::new(&policy)),
            key,
            tracks_slow: AtomicBool::new(policy.tracks_slow_calls()),
            policy: ArcSwap::new(policy),
            generation: AtomicU64::new(generation),
            shared,
        }
    }

    /// Takes the registry's current policy for this key if the registry
    /// was reconfigured since this breaker last looked: two relaxed loads
    /// on every call, the policy swap itself only after a reconfiguration.
    /// (The registry also updates every breaker it holds when it is
    /// reconfigured; this catches a breaker created during that update.)
    #[inline]
    pub(crate) fn follow_policies(&self) {
        let current = self.shared.generation.load(Ordering::Acquire);
        if self.generation.load(Ordering::Relaxed) != current {
            self.adopt_policy();
        }
    }

    /// Replaces this breaker's policy with the registry's current one for
    /// its key, keeping its state: the circuit stays where it is (an open
    /// period already started keeps its end; the next one follows the new
    /// policy), the windows keep their calls (a count window of another
    /// size keeps the most recent ones; a time window of another shape
    /// starts empty), and the new thresholds decide from the next outcome.
    #[cold]
    pub(crate) fn adopt_policy(&self) {
        let mut rec = self.record.lock();
        // The generation first: the policies read after it are at least as new.
        let generation = self.shared.generation.load(Ordering::Acquire);
        let policy = self.shared.policy_for(&self.key);
        let old = self.policy.load_full();
        if old.count_window != policy.count_window {
            rec.count = match (&rec.count, policy.count_window) {
                (Some(window), Some(size)) => Some(window.resized(size)),
                (None, Some(size)) => Some(CountWindow::new(size)),
                (_, None) => None,
            };
        }
        if old.time_window != policy.time_window {
            rec.time = policy.time_window.map(TimeBuckets::new);
        }
        self.tracks_slow
            .store(policy.tracks_slow_calls(), Ordering::Relaxed);
        let word = self.word.load(Ordering::Acquire);
        if rec.is_clean(&policy) != (word & CLEAN != 0) {
            self.word.store(word ^ CLEAN, Ordering::Release);
        }
        self.policy.store(policy);
        self.generation.store(generation, Ordering::Relaxed);
    }

    fn ns_since_epoch(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.shared.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The current state.
    pub(crate) fn state(&self) -> CircuitState {
        state_of(self.word.load(Ordering::Acquire))
    }

    /// Decides on one call. The closed state costs one atomic load (and a
    /// clock read when slow calls are tracked).
    #[inline]
    pub(crate) fn admit(&self) -> Admission {
        let word = self.word.load(Ordering::Acquire);
        match state_of(word) {
            CircuitState::Closed | CircuitState::MetricsOnly => Admission::Tracked(Ticket {
                epoch: epoch_of(word),
                probe: false,
                started: self.start_time(),
                probe_start: 0,
            }),
            CircuitState::Disabled => Admission::Untracked,
            _ => self.admit_slow(),
        }
    }

    #[inline]
    fn start_time(&self) -> Option<Instant> {
        self.tracks_slow
            .load(Ordering::Relaxed)
            .then(toolwarden_core::time::now)
    }

    #[cold]
    fn admit_slow(&self) -> Admission {
        let now = toolwarden_core::time::now();
        let now_ns = self.ns_since_epoch(now);
        let word = self.word.load(Ordering::Acquire);
        match state_of(word) {
            CircuitState::ForcedOpen => return self.refuse(self.policy.load().reset_timeout),
            CircuitState::Open => {
                // Refusals in the open period take no lock.
                let until = self.open_until.load(Ordering::Acquire);
                if now_ns < until {
                    return self.refuse(Duration::from_nanos(until - now_ns));
                }
            }
            _ => {}
        }
        let mut changes = [None, None];
        let admission = {
            let mut rec = self.record.lock();
            let mut word = self.word.load(Ordering::Acquire);
            if state_of(word) == CircuitState::HalfOpen {
                if let Some(change) = self.time_out_probes(&mut rec, word, now_ns) {
                    changes[0] = Some(change);
                    word = self.word.load(Ordering::Acquire);
                }
            }
            match state_of(word) {
                CircuitState::Closed | CircuitState::MetricsOnly => Admission::Tracked(Ticket {
                    epoch: epoch_of(word),
                    probe: false,
                    started: self.start_time(),
                    probe_start: 0,
                }),
                CircuitState::Disabled => Admission::Untracked,
                CircuitState::ForcedOpen => Admission::Refused(self.policy.load().reset_timeout),
                CircuitState::Open => {
                    let until = self.open_until.load(Ordering::Acquire);
                    if now_ns < until {
                        Admission::Refused(Duration::from_nanos(until - now_ns))
                    } else if let ProbePermit::Denied { retry_after } = self.probe_permit() {
                        // Another replica probes: stay open until it is
                        // worth asking again, refusing without the lock.
                        let retry_after = retry_after.max(MIN_DENIAL);
                        let nanos = u64::try_from(retry_after.as_nanos()).unwrap_or(u64::MAX);
                        self.open_until
                            .store(now_ns.saturating_add(nanos), Ordering::Release);
                        Admission::Refused(retry_after)
                    } else {
                        let word = self.set_state(word, CircuitState::HalfOpen);
                        rec.probe_successes = 0;
                        rec.clear_probes();
                        rec.probes_in_flight = 1;
                        rec.probe_starts.push(now_ns);
                        changes[1] = Some(Change::HalfOpen);
                        self.probe_ticket(word, now, now_ns)
                    }
                }
                CircuitState::HalfOpen => {
                    if rec.probes_in_flight >= self.policy.load().half_open_max_calls {
                        Admission::Refused(self.half_open_retry_after(&rec, now_ns))
                    } else if let ProbePermit::Denied { retry_after } = self.probe_permit() {
                        Admission::Refused(retry_after.max(MIN_DENIAL))
                    } else {
                        rec.probes_in_flight += 1;
                        rec.probe_starts.push(now_ns);
                        self.probe_ticket(word, now, now_ns)
                    }
                }
            }
        };
        for change in changes.into_iter().flatten() {
            self.announce(change, true);
        }
        if let Admission::Refused(_) = admission {
            self.not_permitted.fetch_add(1, Ordering::Relaxed);
        }
        admission
    }

    /// Under the lock, in the half-open state: if a probe in flight has
    /// outlived `probe_timeout`, it counts as a failed probe (a timeout)
    /// and the circuit reopens as of the probe's deadline, releasing every
    /// probe's place (their outcomes, if they ever come, count for nothing).
    fn time_out_probes(&self, rec: &mut Record, word: u64, now_ns: u64) -> Option<Change> {
        let deadline = rec.probe_deadline(&self.policy.load())?;
        if now_ns < deadline {
            return None;
        }
        rec.totals.failed += 1;
        rec.recent.push(&Outcome::failure(
            OutcomeKind::Timeout,
            FailureClass::Transient,
        ));
        Some(self.open_at(rec, word, deadline))
    }

    /// Times out an expired probe (see [`Self::time_out_probes`]) when the
    /// circuit is half-open; reading the state or the time until a call may
    /// pass does this first, so that an expired probe is seen without any
    /// call arriving.
    fn expire_probes(&self, now: Instant) {
        if self.state() != CircuitState::HalfOpen {
            return;
        }
        let change = {
            let mut rec = self.record.lock();
            let word = self.word.load(Ordering::Acquire);
            if state_of(word) != CircuitState::HalfOpen {
                return;
            }
            self.time_out_probes(&mut rec, word, self.ns_since_epoch(now))
        };
        if let Some(change) = change {
            self.announce(change, true);
        }
    }

    /// The current state, after timing out an expired probe.
    pub(crate) fn current_state(&self, now: Instant) -> CircuitState {
        self.expire_probes(now);
        self.state()
    }

    /// Asks the sync whether this replica may probe now (under the lock,
    /// about to admit a probe). The overflow breaker never asks: on each
    /// replica it covers other keys.
    fn probe_permit(&self) -> ProbePermit {
        match &self.shared.sync {
            Some(sync) if !matches!(self.key, Key::Overflow) => sync.probe_permit(&ProbeRequest {
                key: &self.key,
                name: &self.key_name(),
                probe_timeout: self.policy.load().probe_timeout,
            }),
            _ => ProbePermit::Granted,
        }
    }

    fn probe_ticket(&self, word: u64, now: Instant, now_ns: u64) -> Admission {
        Admission::Tracked(Ticket {
            epoch: epoch_of(word),
            probe: true,
            started: self.tracks_slow.load(Ordering::Relaxed).then_some(now),
            probe_start: now_ns,
        })
    }

    fn refuse(&self, retry_after: Duration) -> Admission {
        self.not_permitted.fetch_add(1, Ordering::Relaxed);
        Admission::Refused(retry_after)
    }

    /// While every probe is in flight the next one is allowed when one of
    /// them ends, which is unknown: the hint is the base reset timeout, or
    /// the oldest probe's timeout if that comes first.
    fn half_open_retry_after(&self, rec: &Record, now_ns: u64) -> Duration {
        let until_timeout = rec
            .probe_deadline(&self.policy.load())
            .map_or(Duration::MAX, |deadline| {
                Duration::from_nanos(deadline.saturating_sub(now_ns))
            });
        self.policy.load().reset_timeout.min(until_timeout)
    }

    /// Records the outcome of a call admitted with `ticket`.
    ///
    /// See [`counts_against_the_tool`] for the failures that trip it.
    pub(crate) fn complete(&self, ticket: Ticket, outcome: &Outcome) {
        let policy = self.policy.load();
        let config = &**policy;
        let mut now = LazyNow(None);
        let slow = match (ticket.started, config.slow_call_duration) {
            (Some(started), Some(limit)) => now.get().saturating_duration_since(started) >= limit,
            _ => false,
        };
        let success = outcome.is_success();
        let counted_failure = counts_against_the_tool(outcome);
        let tick = match &config.time_window {
            Some(_) if success || counted_failure => Some(self.ns_since_epoch(now.get())),
            _ => None,
        };
        if success && !slow && !ticket.probe {
            let word = self.word.load(Ordering::Acquire);
            if word & CLEAN != 0 && epoch_of(word) == ticket.epoch {
                return; // the fast path: nothing would change
            }
        }
        // A probe past its `probe_timeout` was counted as one failed probe
        // when it timed out (or is, just below): its own outcome is not
        // counted again, in the totals either.
        let timed_out_probe = ticket.probe && {
            let timeout = u64::try_from(config.probe_timeout.as_nanos()).unwrap_or(u64::MAX);
            self.ns_since_epoch(now.get()) >= ticket.probe_start.saturating_add(timeout)
        };
        let mut change = None;
        {
            let mut rec = self.record.lock();
            if !timed_out_probe {
                if counted_failure {
                    rec.totals.failed += 1;
                } else if !success {
                    rec.totals.ignored += 1;
                }
                if slow {
                    rec.totals.slow += 1;
                }
                if !success {
                    rec.recent.push(outcome);
                }
            }
            let word = self.word.load(Ordering::Acquire);
            if epoch_of(word) != ticket.epoch {
                return; // admitted in an earlier state: it counts for nothing now
            }
            let state = state_of(word);
            if ticket.probe && state == CircuitState::HalfOpen {
                // A probe that ends past its timeout has already failed.
                let now_ns = self.ns_since_epoch(now.get());
                change = self.time_out_probes(&mut rec, word, now_ns);
            }
            if change.is_some() {
                // Reopened by a timed-out probe: this outcome counts for nothing.
            } else if ticket.probe {
                if state == CircuitState::HalfOpen {
                    rec.end_probe(ticket.probe_start);
                    if counted_failure || slow {
                        change = Some(self.open(&mut rec, word, now.get()));
                    } else if success {
                        rec.probe_successes += 1;
                        if rec.probe_successes >= config.success_threshold {
                            change = Some(self.close(&mut rec, word, CircuitState::Closed));
                        }
                    }
                }
            } else if state.records() && (success || counted_failure) {
                let mark = Mark {
                    failure: counted_failure,
                    slow,
                };
                if let Some(w) = &mut rec.count {
                    w.record(mark);
                }
                if let (Some(w), Some(ns)) = (&mut rec.time, tick) {
                    let t = w.tick_of(ns);
                    w.record(t, mark);
                }
                rec.calls_since_close += 1;
                if counted_failure {
                    rec.consecutive_failures += 1;
                } else {
                    rec.consecutive_failures = 0;
                }
                if state == CircuitState::Closed && rec.should_trip(config) {
                    change = Some(self.open(&mut rec, word, now.get()));
                } else if rec.is_clean(config) != (word & CLEAN != 0) {
                    self.word.store(word ^ CLEAN, Ordering::Release);
                }
            }
        }
        if let Some(change) = change {
            self.announce(change, true);
        }
    }

    /// A call admitted with `ticket` was dropped before it ended: it counts
    /// as nothing, but a probe gives its place back.
    pub(crate) fn release(&self, ticket: Ticket) {
        if !ticket.probe {
            return;
        }
        let mut rec = self.record.lock();
        let word = self.word.load(Ordering::Acquire);
        if epoch_of(word) == ticket.epoch && state_of(word) == CircuitState::HalfOpen {
            rec.end_probe(ticket.probe_start);
        }
    }

    fn set_state(&self, word: u64, state: CircuitState) -> u64 {
        let next = next_word(word, state);
        self.word.store(next, Ordering::Release);
        next
    }

    /// The open period after `reopens` consecutive re-opens.
    fn open_period(&self, reopens: u32) -> Duration {
        let policy = self.policy.load();
        let config = &**policy;
        let growth = config.reset_multiplier.powi(reopens.min(1024) as i32);
        let base = if growth.is_finite() {
            config.reset_timeout.as_secs_f64() * growth
        } else {
            f64::MAX
        };
        let max = config.max_reset_timeout.as_secs_f64();
        let mut secs = base.min(max);
        if config.jitter > 0.0 {
            secs *= 1.0 + config.jitter * (2.0 * fastrand::f64() - 1.0);
            secs = secs.min(max);
        }
        if secs >= max {
            config.max_reset_timeout
        } else {
            // `secs` is finite and below a valid `Duration`; saturate anyway.
            Duration::try_from_secs_f64(secs).unwrap_or(config.max_reset_timeout)
        }
    }

    fn open(&self, rec: &mut Record, word: u64, now: Instant) -> Change {
        self.open_at(rec, word, self.ns_since_epoch(now))
    }

    /// Opens for the next open period, counted from `at_ns` (nanoseconds
    /// since the registry's epoch).
    fn open_at(&self, rec: &mut Record, word: u64, at_ns: u64) -> Change {
        let period = self.open_period(rec.reopens);
        self.open_for_ns(rec, word, at_ns, period);
        rec.reopens = rec.reopens.saturating_add(1);
        Change::Opened(period, CircuitState::Open)
    }

    fn open_for(&self, rec: &mut Record, word: u64, now: Instant, period: Duration) {
        self.open_for_ns(rec, word, self.ns_since_epoch(now), period);
    }

    fn open_for_ns(&self, rec: &mut Record, word: u64, at_ns: u64, period: Duration) {
        let until = at_ns.saturating_add(u64::try_from(period.as_nanos()).unwrap_or(u64::MAX));
        rec.open_for = period;
        rec.clear_probes();
        rec.probe_successes = 0;
        self.open_until.store(until, Ordering::Release);
        self.set_state(word, CircuitState::Open);
    }

    /// Enters a state that admits calls, with fresh windows and the base
    /// open period.
    fn close(&self, rec: &mut Record, word: u64, to: CircuitState) -> Change {
        rec.clear_windows();
        rec.reopens = 0;
        rec.clear_probes();
        rec.probe_successes = 0;
        self.set_state(word, to);
        Change::Closed(to)
    }

    /// Moves to a manual state, or back to closed (`Closed` = force close).
    /// `fresh` also forgets the totals and recent errors (a reset).
    pub(crate) fn set_mode(&self, mode: CircuitState, fresh: bool) {
        debug_assert!(mode.is_manual() || mode == CircuitState::Closed);
        let change = {
            let mut rec = self.record.lock();
            if fresh {
                rec.totals = CallTotals::default();
                rec.recent = RecentErrors::default();
                rec.remote_origin = None;
                self.not_permitted.store(0, Ordering::Relaxed);
            }
            let word = self.word.load(Ordering::Acquire);
            let from = state_of(word);
            if from == mode && !fresh {
                return;
            }
            match mode {
                CircuitState::ForcedOpen => {
                    self.set_state(word, mode);
                    rec.clear_probes();
                    (!from.refusing())
                        .then_some(Change::Opened(self.policy.load().reset_timeout, mode))
                }
                _ => {
                    let keeps_windows = from.records() && mode.records() && !fresh;
                    if keeps_windows {
                        self.set_state(word, mode);
                    } else {
                        self.close(&mut rec, word, mode);
                    }
                    from.refusing().then_some(Change::Closed(mode))
                }
            }
        };
        if let Some(change) = change {
            self.announce(change, true);
        }
    }

    /// Applies a transition that happened on another replica. Manual
    /// states win over remote ones. Returns whether anything changed.
    pub(crate) fn apply_remote(&self, transition: &RemoteTransition) -> bool {
        let now = Instant::now();
        let change = {
            let mut rec = self.record.lock();
            let word = self.word.load(Ordering::Acquire);
            let from = state_of(word);
            if from.is_manual() {
                return false;
            }
            let change = match transition.state {
                RemoteState::Open { retry_after } => {
                    let until = self
                        .ns_since_epoch(now)
                        .saturating_add(u64::try_from(retry_after.as_nanos()).unwrap_or(u64::MAX));
                    if from == CircuitState::Open {
                        if until <= self.open_until.load(Ordering::Acquire) {
                            return false;
                        }
                        // Already open: wait for the later of the two deadlines.
                        self.open_until.store(until, Ordering::Release);
                        rec.open_for = retry_after;
                        None
                    } else {
                        self.open_for(&mut rec, word, now, retry_after);
                        Some(Change::Opened(retry_after, CircuitState::Open))
                    }
                }
                RemoteState::Closed => {
                    if from == CircuitState::Closed {
                        return false;
                    }
                    Some(self.close(&mut rec, word, CircuitState::Closed))
                }
            };
            rec.remote_origin = Some(Arc::clone(&transition.origin));
            change
        };
        if let Some(change) = change {
            self.announce(change, false);
        }
        true
    }

    fn key_name(&self) -> Cow<'_, str> {
        match &self.key {
            Key::Tool(name) | Key::Custom(name) => Cow::Borrowed(name),
            other => Cow::Owned(other.to_string()),
        }
    }

    /// Reports a transition through the event hook and, when it happened
    /// here, to the replica sync.
    fn announce(&self, change: Change, local: bool) {
        let name = self.key_name();
        let key = name.as_ref();
        let (event, state, retry_after) = match change {
            Change::Opened(retry_after, state) => (
                Event::CircuitOpened { key, retry_after },
                state,
                Some(retry_after),
            ),
            Change::HalfOpen => (
                Event::CircuitHalfOpened { key },
                CircuitState::HalfOpen,
                None,
            ),
            Change::Closed(state) => (Event::CircuitClosed { key }, state, None),
        };
        self.shared.events.emit(&event);
        if local {
            if let Some(sync) = &self.shared.sync {
                sync.publish(&LocalTransition {
                    key: &self.key,
                    name: key,
                    state,
                    retry_after,
                });
            }
        }
    }

    /// How long until a call may pass, if one may not now.
    pub(crate) fn retry_after(&self, now: Instant) -> Option<Duration> {
        self.expire_probes(now);
        match self.state() {
            CircuitState::ForcedOpen => Some(self.policy.load().reset_timeout),
            CircuitState::Open => {
                let until = self.open_until.load(Ordering::Acquire);
                Some(Duration::from_nanos(
                    until.saturating_sub(self.ns_since_epoch(now)),
                ))
            }
            CircuitState::HalfOpen => {
                let rec = self.record.lock();
                (rec.probes_in_flight >= self.policy.load().half_open_max_calls)
                    .then(|| self.half_open_retry_after(&rec, self.ns_since_epoch(now)))
            }
            _ => None,
        }
    }

    /// Whether the next call would be refused.
    pub(crate) fn refuses_now(&self, now: Instant) -> bool {
        self.retry_after(now).is_some_and(|d| !d.is_zero())
    }

    /// [`refuses_now`](Self::refuses_now), read without changing the
    /// breaker: an expired half-open probe is not timed out here (so no
    /// event is emitted and nothing is published to the state sync) but
    /// read as what timing it out makes of the circuit, open. For views
    /// asked under another layer's lock (the loop guard's), which must run
    /// no user code. (After a probe expired longer ago than the open period
    /// that follows it, this still reads open until a call or a read of the
    /// registry times the probe out.)
    pub(crate) fn refuses_now_quietly(&self, now: Instant) -> bool {
        match self.state() {
            CircuitState::ForcedOpen => !self.policy.load().reset_timeout.is_zero(),
            CircuitState::Open => {
                self.open_until.load(Ordering::Acquire) > self.ns_since_epoch(now)
            }
            CircuitState::HalfOpen => {
                let policy = self.policy.load();
                let rec = self.record.lock();
                let now_ns = self.ns_since_epoch(now);
                if rec
                    .probe_deadline(&policy)
                    .is_some_and(|deadline| now_ns >= deadline)
                {
                    return true;
                }
                rec.probes_in_flight >= policy.half_open_max_calls
                    && !self.half_open_retry_after(&rec, now_ns).is_zero()
            }
            _ => false,
        }
    }

    /// Whether the breaker never saw a call nor left the closed state.
    pub(crate) fn is_pristine(&self) -> bool {
        if self.state() != CircuitState::Closed || self.not_permitted.load(Ordering::Relaxed) > 0 {
            return false;
        }
        let rec = self.record.lock();
        rec.totals == CallTotals::default()
            && rec.calls_since_close == 0
            && rec.count.as_ref().is_none_or(|w| w.totals().0 == 0)
            && rec.time.as_ref().is_none_or(|w| w.totals().0 == 0)
    }

    pub(crate) fn snapshot(&self, now: Instant) -> CircuitSnapshot {
        let retry_after = self.retry_after(now);
        let mut rec = self.record.lock();
        let state = self.state();
        let now_ns = self.ns_since_epoch(now);
        if let Some(w) = &mut rec.time {
            let tick = w.tick_of(now_ns);
            w.advance(tick);
        }
        let mut totals = rec.totals;
        totals.not_permitted = self.not_permitted.load(Ordering::Relaxed);
        CircuitSnapshot {
            key: self.key.to_string(),
            state,
            retry_after_seconds: retry_after.map(|d| d.as_secs_f64()),
            count_window: rec.count.as_ref().map(CountWindow::stats),
            time_window: rec.time.as_ref().map(TimeBuckets::stats),
            consecutive_failures: rec.consecutive_failures,
            half_open_in_flight: rec.probes_in_flight,
            half_open_successes: rec.probe_successes,
            reopens: rec.reopens,
            open_period_seconds: (rec.open_for > Duration::ZERO)
                .then(|| rec.open_for.as_secs_f64()),
            totals,
            recent_errors: rec.recent.entries.clone(),
            remote_origin: rec.remote_origin.as_deref().map(str::to_owned),
        }
    }
}

/// One circuit, as a snapshot reports it. Serialises with serde.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CircuitSnapshot {
    /// The key (`search` for a tool; `*` per server; `session/tool`; `(overflow)`).
    pub key: String,
    /// The state.
    pub state: CircuitState,
    /// Seconds until the next call (a probe) may pass, when calls are refused now.
    pub retry_after_seconds: Option<f64>,
    /// The count window, when enabled.
    pub count_window: Option<WindowStats>,
    /// The time window, when enabled.
    pub time_window: Option<WindowStats>,
    /// Counted failures in a row.
    pub consecutive_failures: u32,
    /// Probes in flight (half-open).
    pub half_open_in_flight: u32,
    /// Successful probes so far (half-open).
    pub half_open_successes: u32,
    /// Consecutive opens without a clean close in between (the open period grows with them).
    pub reopens: u32,
    /// The length of the last open period, in seconds.
    pub open_period_seconds: Option<f64>,
    /// Calls since the breaker was created or reset.
    pub totals: CallTotals,
    /// The most recent error kinds, newest first, at most [`RECENT_ERRORS`].
    pub recent_errors: Vec<RecentError>,
    /// The replica whose transition was applied last, if any.
    pub remote_origin: Option<String>,
}

impl CircuitSnapshot {
    /// The failure rate of the count window, else of the time window.
    #[must_use]
    pub fn failure_rate(&self) -> Option<f64> {
        self.count_window
            .or(self.time_window)
            .and_then(|w| w.failure_rate)
    }

    /// The slow-call rate of the count window, else of the time window.
    #[must_use]
    pub fn slow_call_rate(&self) -> Option<f64> {
        self.count_window
            .or(self.time_window)
            .and_then(|w| w.slow_call_rate)
    }
}

/// Whether `outcome` trips the breaker: a failure the classifier counts
/// ([`Outcome::is_counted_failure`]: `Transient` or `Server`, not a
/// rejection by another layer) that may have reached the tool. A failure
/// known to have happened before the request was sent (connection refused,
/// an upstream that is not connected) is not counted: it says nothing of
/// the tool and put no load on it, and counting it kept an agent out for a
/// whole open period after an upstream restart (the transport's reconnect,
/// or the proxy's supervisor, deals with an upstream that is down).
fn counts_against_the_tool(outcome: &Outcome) -> bool {
    outcome.is_counted_failure() && !outcome.before_sent
}
