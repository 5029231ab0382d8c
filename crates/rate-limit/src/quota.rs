//! [`Rate`] and [`Quota`]: what a quota admits.

use std::fmt;
use std::num::NonZeroU32;
use std::time::Duration;

use toolwarden_core::ConfigError;

/// The longest time a quota may take to refill its whole burst. Governor
/// keeps time in `u64` nanoseconds (about 584 years); this leaves ample room.
const MAX_REFILL: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// A sustained rate: `count` calls per `per`.
///
/// The quota refills one call every `per / count` (GCRA's emission interval,
/// rounded down to the nanosecond); the burst says how many calls may be made
/// at once after a quiet period.
///
/// ```
/// use std::time::Duration;
/// use toolwarden_rate_limit::Rate;
/// assert_eq!(Rate::per_second(4).interval(), Duration::from_millis(250));
/// assert_eq!(Rate::new(3, Duration::from_secs(30)).interval(), Duration::from_secs(10));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    count: u32,
    per: Duration,
}

impl Rate {
    /// `count` calls per `per`.
    #[must_use]
    pub const fn new(count: u32, per: Duration) -> Self {
        Rate { count, per }
    }

    /// `count` calls per second.
    #[must_use]
    pub const fn per_second(count: u32) -> Self {
        Rate::new(count, Duration::from_secs(1))
    }

    /// `count` calls per minute.
    #[must_use]
    pub const fn per_minute(count: u32) -> Self {
        Rate::new(count, Duration::from_secs(60))
    }

    /// `count` calls per hour.
    #[must_use]
    pub const fn per_hour(count: u32) -> Self {
        Rate::new(count, Duration::from_secs(60 * 60))
    }

    /// The number of calls per period.
    #[must_use]
    pub const fn count(&self) -> u32 {
        self.count
    }

    /// The period.
    #[must_use]
    pub const fn per(&self) -> Duration {
        self.per
    }

    /// The time to refill one call: `per / count` (zero when `count` is zero).
    #[must_use]
    pub fn interval(&self) -> Duration {
        self.per.checked_div(self.count).unwrap_or(Duration::ZERO)
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} per {:?}", self.count, self.per)
    }
}

/// A validated GCRA quota: [`rate`](Self::rate) sustained, up to
/// [`burst`](Self::burst) calls at once after a quiet period.
///
/// What the builder's quotas become once built, as
/// [`RateLimitLayer::global_quota`](crate::RateLimitLayer::global_quota),
/// [`RateLimitLayer::tool_quota`](crate::RateLimitLayer::tool_quota) and a
/// backend's [`Acquire`](crate::Acquire) show them.
///
/// ```
/// use std::time::Duration;
/// use toolwarden_rate_limit::{Quota, Rate};
///
/// let quota = Quota::new(Rate::per_second(2), 4).unwrap();
/// assert_eq!(quota.interval(), Duration::from_millis(500));
/// assert_eq!(quota.refill_time(), Duration::from_secs(2));
/// assert_eq!(Quota::new(Rate::per_second(2), 0).unwrap_err().field(), "burst");
/// ```
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    rate: Rate,
    burst: u32,
    /// The same quota as governor takes it (a function of `rate` and `burst`).
    gcra: governor::Quota,
}

impl Quota {
    /// `rate` sustained, `burst` at once. Refuses (naming `rate` or `burst`)
    /// a rate of zero calls, a period of zero, more than one call per
    /// nanosecond, a burst of zero, and a rate whose burst would take more
    /// than 100 years to refill (so a period of `Duration::MAX` is refused,
    /// never a panic).
    pub fn new(rate: Rate, burst: u32) -> Result<Self, ConfigError> {
        if rate.count == 0 {
            return Err(ConfigError::new(
                "rate",
                "must allow at least one call per period",
            ));
        }
        let Some(gcra) = governor::Quota::with_period(rate.interval()) else {
            return Err(ConfigError::new(
                "rate",
                "must be positive and at most one call per nanosecond",
            ));
        };
        let Some(max_burst) = NonZeroU32::new(burst) else {
            return Err(ConfigError::new("burst", "must be at least 1"));
        };
        if rate.interval().as_nanos() * u128::from(burst) > MAX_REFILL.as_nanos() {
            return Err(ConfigError::new(
                "rate",
                "with this burst would take more than 100 years to refill",
            ));
        }
        Ok(Quota {
            rate,
            burst,
            gcra: gcra.allow_burst(max_burst),
        })
    }

    /// The sustained rate.
    #[must_use]
    pub const fn rate(&self) -> Rate {
        self.rate
    }

    /// How many calls may be made at once after a quiet period (at least 1).
    #[must_use]
    pub const fn burst(&self) -> u32 {
        self.burst
    }

    /// The time to refill one call (GCRA's emission interval, at least one
    /// nanosecond).
    #[must_use]
    pub fn interval(&self) -> Duration {
        self.gcra.replenish_interval()
    }

    /// The time to refill the whole burst from empty: `interval × burst`.
    #[must_use]
    pub fn refill_time(&self) -> Duration {
        self.gcra.burst_size_replenished_in()
    }

    /// The quota as governor takes it.
    pub(crate) fn gcra(&self) -> governor::Quota {
        self.gcra
    }
}

impl fmt::Debug for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Quota")
            .field("rate", &self.rate)
            .field("burst", &self.burst)
            .finish()
    }
}

impl fmt::Display for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}, burst {}", self.rate, self.burst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(rate: Rate, burst: u32) -> String {
        Quota::new(rate, burst).unwrap_err().field().to_owned()
    }

    #[test]
    fn bad_quotas_name_the_field() {
        assert_eq!(field(Rate::per_second(0), 5), "rate");
        assert_eq!(field(Rate::per_second(5), 0), "burst");
        assert_eq!(field(Rate::new(1, Duration::ZERO), 1), "rate");
        // Faster than one call per nanosecond.
        assert_eq!(field(Rate::new(2, Duration::from_nanos(1)), 1), "rate");
        // Refill time past governor's arithmetic.
        assert_eq!(field(Rate::per_hour(1), u32::MAX), "rate");
        assert_eq!(field(Rate::new(1, Duration::MAX), 1), "rate");
    }

    #[test]
    fn a_quota_is_what_governor_takes() {
        let quota = Quota::new(Rate::new(3, Duration::from_secs(30)), 2).unwrap();
        assert_eq!(quota.interval(), Duration::from_secs(10));
        assert_eq!(quota.refill_time(), Duration::from_secs(20));
        assert_eq!(quota.gcra().burst_size().get(), 2);
        assert_eq!(quota.rate(), Rate::new(3, Duration::from_secs(30)));
        assert_eq!(quota.to_string(), "3 per 30s, burst 2");
    }
}
