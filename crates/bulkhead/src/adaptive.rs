//! [`AdaptiveLimit`]: the knobs of the optional adaptive cap, and the cap
//! itself (additive increase, multiplicative decrease, per key).

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Semaphore;
use toolwarden_core::{ConfigError, Event, Events, Outcome};

/// The default floor of an adaptive cap: 1 call in flight.
pub const DEFAULT_MIN_CONCURRENT: u32 = 1;

/// The default factor an adaptive cap is multiplied by when it is cut: 0.5
/// (halved, as TCP's congestion window).
pub const DEFAULT_DECREASE_FACTOR: f64 = 0.5;

/// The knobs of an adaptive cap (AIMD), turned on with
/// [`BulkheadBuilder::adaptive`](crate::BulkheadBuilder::adaptive); the
/// algorithm and its bounds are in the [crate docs](crate#adaptive-cap).
/// [`build`](crate::BulkheadBuilder::build) checks the values, naming
/// `adaptive.<knob>` (or `tools."<tool>".adaptive.<knob>`).
///
/// ```
/// use std::time::Duration;
/// use toolwarden_bulkhead::BulkheadLayer;
/// use toolwarden_core::KeyRef;
///
/// let layer = BulkheadLayer::builder()
///     .max_concurrent(16) // the ceiling
///     .adaptive(|a| a.latency_threshold(Duration::from_millis(500)).min_concurrent(2).initial_concurrent(4))
///     .build()
///     .unwrap();
/// assert_eq!(layer.current_limit(KeyRef::Tool("search")), 4);
///
/// let err = BulkheadLayer::builder().adaptive(|a| a.min_concurrent(2)).build().unwrap_err();
/// assert_eq!(err.field(), "adaptive.latency_threshold"); // it has no default
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveLimit {
    min_concurrent: u32,
    initial_concurrent: Option<u32>,
    latency_threshold: Option<Duration>,
    decrease_factor: f64,
}

impl Default for AdaptiveLimit {
    fn default() -> Self {
        AdaptiveLimit {
            min_concurrent: DEFAULT_MIN_CONCURRENT,
            initial_concurrent: None,
            latency_threshold: None,
            decrease_factor: DEFAULT_DECREASE_FACTOR,
        }
    }
}

impl AdaptiveLimit {
    /// The knobs' defaults (no `latency_threshold`: it must be set).
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The floor: the cap is never cut below it. At least 1 and at most the
    /// key's [`max_concurrent`](crate::BulkheadBuilder::max_concurrent),
    /// which is the ceiling. Default [`DEFAULT_MIN_CONCURRENT`] (1).
    #[must_use]
    pub fn min_concurrent(mut self, min_concurrent: u32) -> Self {
        self.min_concurrent = min_concurrent;
        self
    }

    /// The cap a key starts with (and starts again with after it was
    /// evicted as idle). Between `min_concurrent` and `max_concurrent`.
    /// Default: `max_concurrent`.
    #[must_use]
    pub fn initial_concurrent(mut self, initial_concurrent: u32) -> Self {
        self.initial_concurrent = Some(initial_concurrent);
        self
    }

    /// A call that takes longer than this is a sign of overload and cuts
    /// the cap, whatever its outcome; a success within it grows the cap.
    /// Positive. No default: the duration a tool should take is a number
    /// only its operator knows (`build` names `adaptive.latency_threshold`
    /// while it is unset). Below a stack's attempt timeout, or only
    /// timeouts cut.
    #[must_use]
    pub fn latency_threshold(mut self, latency_threshold: Duration) -> Self {
        self.latency_threshold = Some(latency_threshold);
        self
    }

    /// What a cut multiplies the cap by (rounded down, never below
    /// `min_concurrent`). Strictly between 0 and 1. Default
    /// [`DEFAULT_DECREASE_FACTOR`] (0.5).
    #[must_use]
    pub fn decrease_factor(mut self, decrease_factor: f64) -> Self {
        self.decrease_factor = decrease_factor;
        self
    }

    /// Checks the knobs against the key's ceiling; field names are the
    /// knobs' (the caller puts them in the `adaptive` section).
    pub(crate) fn validate(&self, max_concurrent: u32) -> Result<Aimd, ConfigError> {
        if self.min_concurrent == 0 || self.min_concurrent > max_concurrent {
            return Err(ConfigError::new(
                "min_concurrent",
                format!("must be between 1 and max_concurrent ({max_concurrent})"),
            ));
        }
        let initial = self.initial_concurrent.unwrap_or(max_concurrent);
        if initial < self.min_concurrent || initial > max_concurrent {
            return Err(ConfigError::new(
                "initial_concurrent",
                format!(
                    "must be between min_concurrent ({}) and max_concurrent ({max_concurrent})",
                    self.min_concurrent
                ),
            ));
        }
        let latency_threshold = match self.latency_threshold {
            Some(threshold) if !threshold.is_zero() => threshold,
            Some(_) => return Err(ConfigError::new("latency_threshold", "must be positive")),
            None => {
                return Err(ConfigError::new(
                    "latency_threshold",
                    "must be set: the duration above which a call is a sign of overload",
                ))
            }
        };
        // `!(0 < f < 1)` also refuses NaN.
        if !(self.decrease_factor > 0.0 && self.decrease_factor < 1.0) {
            return Err(ConfigError::new(
                "decrease_factor",
                "must be strictly between 0 and 1",
            ));
        }
        Ok(Aimd {
            min: self.min_concurrent,
            max: max_concurrent,
            initial,
            latency_threshold,
            decrease_factor: self.decrease_factor,
        })
    }
}

/// Validated adaptive bounds of one key.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Aimd {
    pub(crate) min: u32,
    pub(crate) max: u32,
    pub(crate) initial: u32,
    pub(crate) latency_threshold: Duration,
    pub(crate) decrease_factor: f64,
}

impl Aimd {
    /// What the end of a call says about the key's load. `outcome` is
    /// `None` for a call dropped before it ended.
    pub(crate) fn signal(&self, outcome: Option<&Outcome>, elapsed: Duration) -> Signal {
        if outcome.is_some_and(Outcome::is_rejection) {
            // Refused by a layer below (an open circuit): says nothing of
            // the tool's load.
            return Signal::None;
        }
        if elapsed > self.latency_threshold {
            return Signal::Cut;
        }
        match outcome {
            Some(outcome) if outcome.is_success() => Signal::Grow,
            // Timeouts, transport failures, overload and server errors.
            Some(outcome) if outcome.is_counted_failure() => Signal::Cut,
            // A client error, or a fast cancellation: no sign either way.
            _ => Signal::None,
        }
    }

    /// The cap after a cut of `cap`: `⌊cap × factor⌋`, at least `min`.
    pub(crate) fn cut(&self, cap: u32) -> u32 {
        // `cap × factor < cap` for a factor below 1, so a cut above the
        // floor always lowers the cap by at least one.
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let cut = (f64::from(cap) * self.decrease_factor).floor() as u32;
        cut.clamp(self.min, self.max)
    }
}

/// What one call's end does to the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signal {
    /// A fast success: `+1/cap`.
    Grow,
    /// A slow call or a failure of the server: `× decrease_factor`.
    Cut,
    /// Nothing.
    None,
}

/// A key's adaptive cap: the target number of places, and how the
/// semaphore is brought to it.
///
/// The semaphore's permits are the places: free ones are available, taken
/// ones are held by calls (forgotten at admission, given back at the end).
/// Growing adds permits; shrinking forgets free ones at once and, for the
/// rest, runs up a `debt` that calls ending later pay by not giving their
/// permit back. So `available + in flight − debt = cap` at all times, no
/// call in flight is cancelled, and no call is admitted while the calls in
/// flight are at or above the cap.
pub(crate) struct AdaptiveCap {
    pub(crate) bounds: Aimd,
    /// The key, named in [`Event::BulkheadLimitChanged`].
    key: Arc<str>,
    events: Events,
    /// The cap, readable without the lock (refusals, inspection).
    cap: AtomicU32,
    /// Bumped by every cut. A call carries the epoch it was admitted in,
    /// and only a call admitted since the last cut can cut again: the
    /// calls in flight at a cut were admitted under the old cap, and their
    /// failures are the same overload the cut answered (the cool-down; TCP
    /// cuts once per window for the same reason).
    epoch: AtomicU64,
    /// Changes of the cap and the permits, made together. Only calls of an
    /// adaptive key take it, once, when they end.
    state: Mutex<CapState>,
}

#[derive(Debug)]
struct CapState {
    cap: u32,
    /// Fast successes since the cap last changed; `cap` of them grow it by 1.
    successes: u32,
    /// Permits still to forget as calls end (see [`AdaptiveCap`]).
    debt: u32,
}

impl fmt::Debug for AdaptiveCap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdaptiveCap")
            .field("bounds", &self.bounds)
            .field("cap", &self.cap())
            .finish_non_exhaustive()
    }
}

impl AdaptiveCap {
    pub(crate) fn new(bounds: Aimd, key: Arc<str>, events: Events) -> Self {
        AdaptiveCap {
            bounds,
            key,
            events,
            cap: AtomicU32::new(bounds.initial),
            epoch: AtomicU64::new(0),
            state: Mutex::new(CapState {
                cap: bounds.initial,
                successes: 0,
                debt: 0,
            }),
        }
    }

    /// The cap now.
    #[inline]
    pub(crate) fn cap(&self) -> u32 {
        self.cap.load(Ordering::Relaxed)
    }

    /// The epoch a call admitted now carries.
    #[inline]
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

    /// Calls in flight: `cap + debt − available`.
    pub(crate) fn in_flight(&self, semaphore: &Semaphore) -> u32 {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let available = u32::try_from(semaphore.available_permits()).unwrap_or(u32::MAX);
        (state.cap + state.debt).saturating_sub(available)
    }

    /// A waiting call was handed a permit (already forgotten): whether it
    /// may enter. Not while the cap owes permits: a permit handed over
    /// before a cut would let the call in over the new cap, so it pays a
    /// permit of the debt instead, and the call waits again.
    pub(crate) fn may_enter_with_handed_permit(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.debt > 0 {
            state.debt -= 1;
            false
        } else {
            true
        }
    }

    /// A call admitted in `epoch` ended with `signal`: adapt the cap, then
    /// give the call's place back (or pay a permit of debt with it).
    pub(crate) fn leave(&self, semaphore: &Semaphore, signal: Signal, epoch: u64) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let before = state.cap;
        match signal {
            Signal::Grow => {
                // Only a cap in use grows: with fewer than half its places
                // taken (this call included), successes say nothing about
                // what a full cap would do to the server.
                let available = u32::try_from(semaphore.available_permits()).unwrap_or(u32::MAX);
                let in_flight = (state.cap + state.debt).saturating_sub(available);
                if in_flight.saturating_mul(2) >= state.cap && state.cap < self.bounds.max {
                    state.successes += 1;
                    if state.successes >= state.cap {
                        state.successes = 0;
                        state.cap += 1;
                        if state.debt > 0 {
                            state.debt -= 1;
                        } else {
                            semaphore.add_permits(1);
                        }
                    }
                }
            }
            Signal::Cut if epoch == self.epoch.load(Ordering::Relaxed) => {
                let cut = self.bounds.cut(state.cap);
                let excess = state.cap - cut;
                let forgotten = u32::try_from(semaphore.forget_permits(excess as usize))
                    .unwrap_or(excess)
                    .min(excess);
                state.debt += excess - forgotten;
                state.cap = cut;
                state.successes = 0;
                self.epoch.fetch_add(1, Ordering::Relaxed);
            }
            Signal::Cut | Signal::None => {}
        }
        self.cap.store(state.cap, Ordering::Relaxed);
        if state.debt > 0 {
            state.debt -= 1;
        } else {
            semaphore.add_permits(1);
        }
        let after = state.cap;
        drop(state);
        if after != before {
            // Told once the lock is released: a sink may take its time.
            self.events.emit(&Event::BulkheadLimitChanged {
                key: &self.key,
                from: before,
                to: after,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use toolwarden_core::{FailureClass, OutcomeKind};

    fn bounds(min: u32, max: u32, initial: u32) -> Aimd {
        AdaptiveLimit::new()
            .min_concurrent(min)
            .initial_concurrent(initial)
            .latency_threshold(Duration::from_millis(100))
            .validate(max)
            .unwrap()
    }

    /// Takes `n` places as admission does (the permit forgotten).
    fn admit(semaphore: &Semaphore, n: u32) {
        for _ in 0..n {
            semaphore.try_acquire().unwrap().forget();
        }
    }

    #[test]
    fn signals() {
        let aimd = bounds(1, 10, 10);
        let fast = Duration::from_millis(100);
        let slow = Duration::from_millis(101);
        let timeout = Outcome::failure(OutcomeKind::Timeout, FailureClass::Transient);
        let client = Outcome::failure(OutcomeKind::ProtocolError, FailureClass::Client);
        let refused = Outcome::failure(OutcomeKind::Rejected, FailureClass::Transient);
        assert_eq!(aimd.signal(Some(&Outcome::SUCCESS), fast), Signal::Grow);
        assert_eq!(aimd.signal(Some(&Outcome::SUCCESS), slow), Signal::Cut);
        assert_eq!(aimd.signal(Some(&timeout), fast), Signal::Cut);
        assert_eq!(aimd.signal(Some(&client), fast), Signal::None);
        assert_eq!(aimd.signal(Some(&client), slow), Signal::Cut);
        assert_eq!(aimd.signal(Some(&refused), slow), Signal::None);
        assert_eq!(aimd.signal(None, fast), Signal::None);
        assert_eq!(aimd.signal(None, slow), Signal::Cut);
    }

    #[test]
    fn cuts_round_down_and_stop_at_the_floor() {
        let aimd = bounds(2, 10, 10);
        assert_eq!(aimd.cut(10), 5);
        assert_eq!(aimd.cut(5), 2);
        assert_eq!(aimd.cut(3), 2);
        assert_eq!(aimd.cut(2), 2);
        let gentle = AdaptiveLimit::new()
            .latency_threshold(Duration::from_secs(1))
            .decrease_factor(0.9)
            .validate(10)
            .unwrap();
        assert_eq!(gentle.cut(10), 9);
        assert_eq!(gentle.cut(1), 1);
    }

    #[test]
    fn a_shrink_forgets_free_permits_and_runs_up_debt_for_taken_ones() {
        let cap = AdaptiveCap::new(bounds(1, 8, 8), Arc::from("t"), Events::new());
        let semaphore = Semaphore::new(8);
        admit(&semaphore, 6);
        assert_eq!(cap.in_flight(&semaphore), 6);
        // One of the six fails: 8 → 4; the two free permits are forgotten,
        // two more are owed; the failed call pays one of them.
        cap.leave(&semaphore, Signal::Cut, 0);
        assert_eq!(cap.cap(), 4);
        assert_eq!(semaphore.available_permits(), 0);
        assert_eq!(cap.in_flight(&semaphore), 5);
        // The next call to end pays the rest; the one after frees a place.
        cap.leave(&semaphore, Signal::None, 0);
        assert_eq!(semaphore.available_permits(), 0);
        assert_eq!(cap.in_flight(&semaphore), 4);
        cap.leave(&semaphore, Signal::None, 0);
        assert_eq!(semaphore.available_permits(), 1);
        assert_eq!(cap.in_flight(&semaphore), 3);
    }

    #[test]
    fn a_call_from_before_a_cut_cannot_cut_again() {
        let cap = AdaptiveCap::new(bounds(1, 8, 8), Arc::from("t"), Events::new());
        let semaphore = Semaphore::new(8);
        admit(&semaphore, 8);
        cap.leave(&semaphore, Signal::Cut, 0);
        assert_eq!(cap.cap(), 4);
        cap.leave(&semaphore, Signal::Cut, 0);
        assert_eq!(cap.cap(), 4, "admitted before the cut: cooled down");
        assert_eq!(cap.epoch(), 1);
        cap.leave(&semaphore, Signal::Cut, 1);
        assert_eq!(cap.cap(), 2, "admitted after it");
    }

    #[test]
    fn growth_needs_cap_successes_with_the_cap_half_used() {
        let cap = AdaptiveCap::new(bounds(1, 8, 4), Arc::from("t"), Events::new());
        let semaphore = Semaphore::new(4);
        // One call at a time: a quarter of the cap, no growth.
        for _ in 0..10 {
            admit(&semaphore, 1);
            cap.leave(&semaphore, Signal::Grow, 0);
        }
        assert_eq!(cap.cap(), 4);
        // Four in flight: four successes grow the cap by one.
        admit(&semaphore, 4);
        for _ in 0..4 {
            cap.leave(&semaphore, Signal::Grow, 0);
            admit(&semaphore, 1);
        }
        assert_eq!(cap.cap(), 5);
        assert_eq!(semaphore.available_permits(), 1);
    }
}
