//! A governor [`Clock`] that reads `tokio::time`, so that quotas follow a
//! paused test clock (`tokio::time::pause` / `advance`) and production time alike.

use std::ops::Add;
use std::time::Duration;

use governor::clock::{Clock, Reference};
use governor::nanos::Nanos;

/// A governor clock over [`tokio::time::Instant`].
///
/// This implements governor's `Clock` trait on purpose: it lets governor's
/// own limiters (and benchmarks comparing them with this crate's) follow a
/// paused tokio clock too.
///
/// In production it reads the same monotonic clock as governor's default
/// clock (tokio's `Instant` is `std::time::Instant` underneath); when the
/// tokio clock is paused, quotas refill only as tests advance time.
///
/// ```
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// use std::num::NonZeroU32;
/// use std::time::Duration;
/// use governor::{Quota, RateLimiter};
/// use toolwarden_rate_limit::TokioClock;
///
/// let quota = Quota::per_second(NonZeroU32::new(1).unwrap());
/// let limiter = RateLimiter::direct_with_clock(quota, TokioClock::default());
/// assert!(limiter.check().is_ok());
/// assert!(limiter.check().is_err());
/// tokio::time::advance(Duration::from_secs(1)).await;
/// assert!(limiter.check().is_ok());
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokioClock;

impl Clock for TokioClock {
    type Instant = TokioInstant;

    #[inline]
    fn now(&self) -> TokioInstant {
        TokioInstant(tokio::time::Instant::now())
    }
}

/// A reading of [`TokioClock`]: a `tokio::time::Instant` that governor can use
/// as a [`Reference`] (the orphan rule forbids implementing governor's trait
/// on tokio's type itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TokioInstant(pub tokio::time::Instant);

impl TokioInstant {
    /// The tokio instant.
    #[must_use]
    pub fn into_inner(self) -> tokio::time::Instant {
        self.0
    }
}

impl Add<Nanos> for TokioInstant {
    type Output = TokioInstant;

    #[inline]
    fn add(self, other: Nanos) -> TokioInstant {
        // Governor adds at most a quota's refill time (validated to fit) to
        // its start instant; saturate rather than panic if that ever overflows.
        let other = Duration::from_nanos(other.as_u64());
        TokioInstant(self.0.checked_add(other).unwrap_or(self.0))
    }
}

impl Reference for TokioInstant {
    #[inline]
    fn duration_since(&self, earlier: Self) -> Nanos {
        nanos(self.0.saturating_duration_since(earlier.0))
    }

    #[inline]
    fn saturating_sub(&self, duration: Nanos) -> Self {
        let duration = Duration::from_nanos(duration.as_u64());
        TokioInstant(self.0.checked_sub(duration).unwrap_or(self.0))
    }
}

/// [`TokioClock`], except that while a [`CallInstant`] is held on this
/// thread it answers that reading (see [`toolwarden_core::time`]): a call
/// checked against two quotas reads the clock once (a clock read costs as
/// much as a GCRA update), both quotas judge it at the same instant, and
/// the other layers of a stack share that reading too.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CallClock;

impl Clock for CallClock {
    type Instant = TokioInstant;

    #[inline]
    fn now(&self) -> TokioInstant {
        TokioInstant(toolwarden_core::time::now())
    }
}

pub(crate) use toolwarden_core::time::CallInstant;

/// `Nanos::from(Duration)` panics past 584 years; saturate instead.
#[inline]
fn nanos(duration: Duration) -> Nanos {
    u64::try_from(duration.as_nanos())
        .unwrap_or(u64::MAX)
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn follows_the_paused_tokio_clock() {
        let clock = TokioClock;
        let before = clock.now();
        tokio::time::advance(Duration::from_millis(1500)).await;
        let after = clock.now();
        assert_eq!(
            after.duration_since(before),
            Nanos::from(Duration::from_millis(1500))
        );
        // Saturating, as governor requires.
        assert_eq!(before.duration_since(after), Nanos::from(0u64));
        assert_eq!(
            after.saturating_sub(Duration::from_millis(1500).into()),
            before
        );
        assert_eq!(before + Nanos::from(Duration::from_millis(1500)), after);
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_call_instant_is_read_until_dropped() {
        let held = CallInstant::hold();
        let at = CallClock.now();
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(CallClock.now(), at);
        drop(held);
        assert_eq!(CallClock.now(), TokioClock.now());
        assert_eq!(
            CallClock.now().duration_since(at),
            Nanos::from(Duration::from_secs(1))
        );
    }

    #[test]
    fn never_panics_on_extreme_values() {
        let now = TokioInstant(tokio::time::Instant::now());
        let far = Nanos::from(u64::MAX);
        assert!(now + far >= now);
        assert!(now.saturating_sub(far) <= now);
        assert_eq!(nanos(Duration::MAX), Nanos::from(u64::MAX));
    }
}
