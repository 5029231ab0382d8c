//! [`RateLimits`]: the quota state every clone of a [`RateLimit`](crate::RateLimit)
//! service shares, and how a call takes its tokens.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{NotKeyed, StateStore};
use governor::{NotUntil, RateLimiter};
use tokio::time::Instant;
use toolwarden_core::{Event, Key, KeyRef, KeyedState, McpRequest, RateLimited};

use crate::backend::{Acquire, RateLimitBackend, Scope};
use crate::builder::Mode;
use crate::clock::{CallClock, CallInstant, TokioInstant};
use crate::layer::Config;
use crate::quota::Quota;

/// Governor's GCRA state, the theoretical arrival time (TAT, in nanoseconds
/// since the limiter's start; 0 for "never used"), in a shared atomic so that
/// the bucket can give a token back. The update loop is governor's own
/// (`InMemoryState`); governor offers no way to read or refund it.
#[derive(Debug, Clone, Default)]
struct Tat(Arc<AtomicU64>);

impl StateStore for Tat {
    type Key = NotKeyed;

    #[inline]
    fn measure_and_replace<T, F, E>(&self, _key: &NotKeyed, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let tat = |raw: u64| (raw != 0).then(|| Nanos::from(raw));
        let mut prev = self.0.load(Ordering::Acquire);
        loop {
            let (result, next) = f(tat(prev))?;
            match self.0.compare_exchange_weak(
                prev,
                next.as_u64(),
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(result),
                Err(actual) => prev = actual,
            }
        }
    }
}

impl Tat {
    /// Gives back one token: moves the arrival time back by one emission
    /// interval. Reaching 0 means "full", which is what it then is.
    fn refund(&self, interval: u64) {
        // `fetch_update` only fails when the closure returns `None`, which it never does.
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                Some(tat.saturating_sub(interval))
            });
    }
}

/// One GCRA quota.
struct Bucket {
    limiter: RateLimiter<NotKeyed, Tat, CallClock, NoOpMiddleware<TokioInstant>>,
    tat: Tat,
    /// The emission interval `t`, in nanoseconds (at least 1, as governor's).
    interval: u64,
    /// The burst tolerance `tau = t × (burst - 1)`, in nanoseconds.
    tau: u64,
    /// The limiter's start: the origin of the TAT's nanoseconds.
    start: TokioInstant,
}

impl Bucket {
    fn new(quota: Quota) -> Self {
        let quota = quota.gcra();
        let tat = Tat::default();
        // Governor reads its start from the clock once, in `new`: hold one
        // reading so that this bucket knows the same origin.
        let held = CallInstant::hold();
        let start = CallClock.now();
        let limiter = RateLimiter::new(quota, tat.clone(), CallClock);
        drop(held);
        let interval = u64::try_from(quota.replenish_interval().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        Bucket {
            limiter,
            tat,
            interval,
            tau: interval.saturating_mul(u64::from(quota.burst_size().get() - 1)),
            start,
        }
    }

    #[inline]
    fn check(&self) -> Result<(), Duration> {
        self.limiter
            .check()
            .map_err(|not_until| wait_time(&not_until))
    }

    /// Nanoseconds from this bucket's start to `at` (0 before it).
    fn ns(&self, at: TokioInstant) -> u64 {
        let since = at.0.saturating_duration_since(self.start.0);
        u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
    }

    /// The instant `ns` nanoseconds after this bucket's start (saturating).
    fn instant(&self, ns: u64) -> Instant {
        let start = self.start.into_inner();
        start
            .checked_add(Duration::from_nanos(ns))
            .or_else(|| start.checked_add(MAX_REFILL_HORIZON))
            .unwrap_or(start)
    }

    /// Reserves this quota's next free place in its schedule, at or after
    /// `not_before`: the GCRA update of a call made then, applied now, so
    /// that the next caller is scheduled one emission interval later. Fails,
    /// spending nothing, with the earliest such place when it is later than
    /// `latest` (`None`: no limit).
    fn reserve(&self, not_before: Instant, latest: Option<Instant>) -> Result<Instant, Instant> {
        let not_before_ns = self.ns(TokioInstant(not_before));
        let latest_ns = latest.map_or(u64::MAX, |latest| self.ns(TokioInstant(latest)));
        let mut prev = self.tat.0.load(Ordering::Acquire);
        loop {
            // Governor's GCRA: an unused quota (0) is full at any time.
            let tat = if prev == 0 { not_before_ns } else { prev };
            let at = tat.saturating_sub(self.tau).max(not_before_ns);
            if at > latest_ns {
                return Err(self.instant(at));
            }
            let next = tat.max(at).saturating_add(self.interval);
            match self
                .tat
                .0
                .compare_exchange_weak(prev, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(self.instant(at)),
                Err(actual) => prev = actual,
            }
        }
    }

    /// Moves a reservation made for an earlier time to `at`: the schedule
    /// then continues one emission interval after `at` at the earliest.
    fn postpone_to(&self, at: Instant) {
        let next = self.ns(TokioInstant(at)).saturating_add(self.interval);
        self.tat.0.fetch_max(next, Ordering::AcqRel);
    }

    /// A handle that gives one token of this quota back.
    fn token(&self) -> Token {
        Token {
            tat: self.tat.clone(),
            interval: self.interval,
        }
    }
}

/// Far enough in the future to stand for "never" where an instant is needed.
const MAX_REFILL_HORIZON: Duration = Duration::from_secs(200 * 365 * 24 * 60 * 60);

/// One token of one quota, taken for a waiting call; given back by
/// [`Reservation`] when the call is never made.
#[derive(Debug)]
struct Token {
    tat: Tat,
    interval: u64,
}

/// The tokens a call waiting in [`Mode::Wait`] has reserved, and the time it
/// may be made. Dropped before [`consume`](Self::consume) (the waiting call
/// was dropped, or its inner service failed), it gives the tokens back.
#[derive(Debug)]
pub(crate) struct Reservation {
    at: Instant,
    tokens: [Option<Token>; 2],
}

impl Reservation {
    /// When the call may be made.
    pub(crate) fn at(&self) -> Instant {
        self.at
    }

    /// The call is made: its tokens are spent.
    pub(crate) fn consume(&mut self) {
        self.tokens = [None, None];
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        for token in self.tokens.iter_mut().filter_map(Option::take) {
            token.tat.refund(token.interval);
        }
    }
}

impl fmt::Debug for Bucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bucket")
            .field("interval", &Duration::from_nanos(self.interval))
            .field("tat", &self.tat)
            .finish()
    }
}

#[cold]
fn wait_time(not_until: &NotUntil<TokioInstant>) -> Duration {
    not_until.wait_time_from(CallClock.now())
}

/// A refusal, before it is turned into a [`RateLimited`] (which allocates).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) scope: Scope,
    pub(crate) retry_after: Duration,
}

/// The quota state of one configuration, shared by every clone of the
/// services that use it (cloning it is one reference-count increment).
///
/// A [`RateLimitLayer`](crate::RateLimitLayer) creates one when it is built
/// and gives it to every service it builds (and its clones do the same), so
/// all of them share the quotas; [`RateLimitLayer::limits`](crate::RateLimitLayer::limits)
/// returns it, to check requests without a service.
///
/// # How a call is admitted
///
/// A call takes one token from its key's quota (the tool's override or the
/// `per_tool` quota) and one from the global quota; both must admit. The
/// per-key quota is checked first, so a call refused per key never touches
/// the global quota. When the per-key quota admits and the global one
/// refuses, the per-key token is given back (one emission interval is
/// subtracted from that quota's GCRA state): no quota is spent by a call
/// that was not made. The only imprecision is transient: between taking
/// and giving back that token (a few nanoseconds), a concurrent call on the
/// same key may see one token fewer and be refused; limits are never exceeded.
///
/// # Waiting calls
///
/// In [`Mode::Wait`], a call refused now reserves a place instead: the GCRA
/// update of a call made at the quota's earliest admission time is applied
/// at once (the theoretical arrival time moves one emission interval on),
/// so the next waiter's earliest time is one interval later. Waiters are
/// thus admitted one per interval in the order they reserved, each sleeping
/// until its own time; none is woken to race for a token. The per-key place
/// is reserved first, then the global one no earlier; if the global place
/// is later, the per-key schedule is moved on to it (a little stricter than
/// needed, never looser). A call whose place would be later than `max_wait`
/// is refused and reserves nothing; a waiting call dropped before it is
/// made gives its places back (one emission interval each).
///
/// # State
///
/// Each quota is governor's GCRA state: one `AtomicU64` updated by
/// compare-and-swap, with time read through [`TokioClock`](crate::TokioClock)
/// (once per call, even when two quotas judge it). Per-key quotas live in the
/// core's bounded [`KeyedState`] (at most `max_keys` keys, idle keys evicted);
/// keys past the bound share one overflow quota (the `per_tool` quota, or,
/// for a tool with an override, one quota per override), so the bound can
/// make limits stricter, never looser. A key is only evicted after being
/// idle at least as long as its quota takes to refill, so eviction never
/// forgets a spent quota.
///
/// ```
/// use toolwarden_core::jsonrpc::Request;
/// use toolwarden_rate_limit::{Rate, RateLimitLayer};
///
/// let limits = RateLimitLayer::builder().per_tool(Rate::per_minute(1), 1).build().unwrap().limits();
/// let call = Request::tool_call(1, "search", serde_json::json!({}));
/// assert!(limits.check(&call).is_ok());
/// let refused = limits.check(&call).unwrap_err();
/// assert_eq!(refused.key(), "search");
/// assert_eq!(refused.to_string(), "rate limited on search; retry after 60 s");
/// ```
#[derive(Clone)]
pub struct RateLimits {
    shared: Arc<Shared>,
}

struct Shared {
    config: Arc<Config>,
    global: Option<Bucket>,
    /// Per-key quotas; `None` when no per-key quota is configured. A value is
    /// `None` only for the overflow entry when there is no `per_tool` quota
    /// (tools without a quota are never inserted).
    keyed: Option<KeyedState<Option<Bucket>>>,
    /// The overflow quota of each overridden tool, used past the bound.
    override_overflow: HashMap<Arc<str>, Bucket>,
}

impl RateLimits {
    pub(crate) fn new(config: Arc<Config>) -> Self {
        let keyed = (config.per_tool.is_some() || !config.tools.is_empty()).then(|| {
            let config = Arc::clone(&config);
            KeyedState::new(config.bounds, move |key| {
                let tool = match key {
                    Key::Tool(tool) | Key::SessionTool(_, tool) => Some(&**tool),
                    _ => None,
                };
                tool.map_or(config.per_tool, |tool| config.tool_quota(tool))
                    .map(Bucket::new)
            })
        });
        let override_overflow = config
            .tools
            .iter()
            .map(|(tool, quota)| (Arc::clone(tool), Bucket::new(*quota)))
            .collect();
        RateLimits {
            shared: Arc::new(Shared {
                global: config.global.map(Bucket::new),
                keyed,
                override_overflow,
                config,
            }),
        }
    }

    /// Takes a token for `request` from its quotas, or says why not (the key
    /// is `global` for the global quota, else the request's key, e.g. the
    /// tool name or `session/tool`). Requests that are not `tools/call` pass
    /// untouched unless the layer limits all methods. This is the check the
    /// service makes on every call, without waiting and without emitting
    /// events.
    ///
    /// It reads the in-process quotas only: with a
    /// [backend](crate::RateLimitBuilder::backend), the service asks the
    /// backend, and these quotas decide only when the backend answers
    /// [`DecideLocally`](crate::BackendDecision::DecideLocally).
    pub fn check<R: McpRequest>(&self, request: &R) -> Result<(), RateLimited> {
        self.acquire(request)
            .map_err(|refusal| self.rejection(request, refusal))
    }

    /// The number of keys with their own per-key quota (the overflow quotas
    /// not counted); never above `max_keys`.
    #[must_use]
    pub fn keys(&self) -> usize {
        self.shared.keyed.as_ref().map_or(0, KeyedState::len)
    }

    pub(crate) fn config(&self) -> &Config {
        &self.shared.config
    }

    pub(crate) fn mode(&self) -> Mode {
        self.shared.config.mode
    }

    /// The backend the service asks instead of these quotas, if any.
    #[must_use]
    pub fn backend(&self) -> Option<&Arc<dyn RateLimitBackend>> {
        self.shared.config.backend.as_ref()
    }

    /// What a backend must take for `request`, or `None` when the request is
    /// not limited: the same quotas, keyed the same way, as [`acquire`](Self::acquire)
    /// takes in process (past the key bound too: a backend keeps its own keys).
    pub(crate) fn remote_acquire<R: McpRequest>(&self, request: &R) -> Option<Acquire> {
        let config = &*self.shared.config;
        if !config.all_methods && !request.is_tool_call() {
            return None;
        }
        let key = (config.per_tool.is_some() || config.tools.contains_key(request.target()))
            .then(|| {
                let key = config.key_by.key(request);
                let quota = match key {
                    KeyRef::Tool(tool) | KeyRef::SessionTool(_, tool) => config.tool_quota(tool),
                    _ => config.per_tool,
                };
                quota.map(|quota| (Arc::<str>::from(key.to_string()), quota))
            })
            .flatten();
        if key.is_none() && config.global.is_none() {
            return None;
        }
        Some(Acquire::new(key, config.global))
    }

    /// Takes a token from both quotas of `request`, or neither.
    #[inline]
    pub(crate) fn acquire<R: McpRequest>(&self, request: &R) -> Result<(), Refusal> {
        self.with_quotas(request, Shared::admit).unwrap_or(Ok(()))
    }

    /// Reserves `request`'s next place in both its quotas' schedules (see
    /// [`Mode::Wait`]), from `now` to as late as `latest` (`None`: no limit);
    /// `None` when the request is not limited. Refused, it spends nothing.
    pub(crate) fn reserve<R: McpRequest>(
        &self,
        request: &R,
        now: Instant,
        latest: Option<Instant>,
    ) -> Option<Result<Reservation, Refusal>> {
        self.with_quotas(request, |shared, per_key| {
            shared.reserve(per_key, now, latest)
        })
    }

    /// Runs `f` on `request`'s per-key quota (if it has one), inserting its
    /// key when new; `None` when the request is not limited.
    #[inline]
    fn with_quotas<R: McpRequest, T>(
        &self,
        request: &R,
        f: impl FnOnce(&Shared, Option<&Bucket>) -> T,
    ) -> Option<T> {
        let shared = &*self.shared;
        if !shared.config.all_methods && !request.is_tool_call() {
            return None;
        }
        let Some(keyed) = &shared.keyed else {
            return Some(f(shared, None));
        };
        if shared.config.per_tool.is_none() && !shared.config.tools.contains_key(request.target()) {
            // This tool has no per-key quota: nothing to insert.
            return Some(f(shared, None));
        }
        let key = shared.config.key_by.key(request);
        // The common case: an existing key, read without taking a handle.
        let mut f = Some(f);
        if let Some(result) =
            keyed.with(&key, |bucket| f.take().map(|f| f(shared, bucket.as_ref())))
        {
            return result;
        }
        let f = f?;
        let entry = keyed.entry(key);
        if entry.is_overflow() {
            if let Some(bucket) = shared.override_overflow.get(request.target()) {
                return Some(f(shared, Some(bucket)));
            }
        }
        Some(f(shared, (*entry).as_ref()))
    }

    /// The rejection of `request` for `refusal`, reported to the event sinks.
    #[cold]
    pub(crate) fn reject<R: McpRequest>(&self, request: &R, refusal: Refusal) -> RateLimited {
        let rejection = self.rejection(request, refusal);
        self.shared.config.events.emit(&Event::RateLimited {
            key: rejection.key(),
            retry_after: refusal.retry_after,
        });
        rejection
    }

    #[cold]
    fn rejection<R: McpRequest>(&self, request: &R, refusal: Refusal) -> RateLimited {
        match refusal.scope {
            Scope::Global => RateLimited::new("global", refusal.retry_after),
            Scope::Key => {
                let key: KeyRef<'_> = self.shared.config.key_by.key(request);
                RateLimited::new(key.to_string(), refusal.retry_after)
            }
        }
    }
}

impl Shared {
    /// Reserves a place in the per-key schedule first, then in the global
    /// one no earlier; a later global place postpones the per-key one to it,
    /// and a global refusal gives the per-key place back.
    #[cold]
    fn reserve(
        &self,
        per_key: Option<&Bucket>,
        now: Instant,
        latest: Option<Instant>,
    ) -> Result<Reservation, Refusal> {
        let refusal = |scope, at: Instant| Refusal {
            scope,
            retry_after: at.saturating_duration_since(now),
        };
        let mut reservation = Reservation {
            at: now,
            tokens: [None, None],
        };
        if let Some(bucket) = per_key {
            reservation.at = bucket
                .reserve(now, latest)
                .map_err(|at| refusal(Scope::Key, at))?;
            reservation.tokens[0] = Some(bucket.token());
        }
        if let Some(global) = &self.global {
            // A refusal drops `reservation`, giving the per-key place back.
            let at = global
                .reserve(reservation.at, latest)
                .map_err(|at| refusal(Scope::Global, at))?;
            if at > reservation.at {
                if let Some(bucket) = per_key {
                    bucket.postpone_to(at);
                }
                reservation.at = at;
            }
            reservation.tokens[1] = Some(global.token());
        }
        Ok(reservation)
    }

    /// Per-key first, then global; a global refusal gives the per-key token back.
    #[inline]
    fn admit(&self, per_key: Option<&Bucket>) -> Result<(), Refusal> {
        // With two quotas, read the clock once for both.
        let _instant = (per_key.is_some() && self.global.is_some()).then(CallInstant::hold);
        if let Some(bucket) = per_key {
            bucket.check().map_err(|retry_after| Refusal {
                scope: Scope::Key,
                retry_after,
            })?;
        }
        if let Some(global) = &self.global {
            if let Err(retry_after) = global.check() {
                if let Some(bucket) = per_key {
                    bucket.tat.refund(bucket.interval);
                }
                return Err(Refusal {
                    scope: Scope::Global,
                    retry_after,
                });
            }
        }
        Ok(())
    }
}

impl fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimits")
            .field("config", &self.shared.config)
            .field("global", &self.shared.global)
            .field("keys", &self.keys())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_refund_gives_exactly_one_token_back() {
        let quota = Quota::new(crate::Rate::per_second(1), 3).unwrap();
        let bucket = Bucket::new(quota);
        for _ in 0..3 {
            bucket.check().unwrap();
        }
        assert_eq!(bucket.check(), Err(Duration::from_secs(1)));
        bucket.tat.refund(bucket.interval);
        bucket.check().unwrap();
        assert_eq!(bucket.check(), Err(Duration::from_secs(1)));
        // A refund on a full quota leaves it full (no credit beyond the burst).
        tokio::time::advance(Duration::from_secs(10)).await;
        bucket.tat.refund(bucket.interval);
        for _ in 0..3 {
            bucket.check().unwrap();
        }
        assert!(bucket.check().is_err());
    }
}
