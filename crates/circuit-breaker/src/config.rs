//! The validated policy every breaker follows ([`Config`]), its defaults
//! and its checks; the knobs that set it are on
//! [`CircuitBreakerBuilder`](crate::CircuitBreakerBuilder).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use toolwarden_core::{Bounds, ConfigError, KeyBy};

/// The largest count window: outcomes are kept one byte each, and the
/// running totals of a window must fit in `u32`.
pub const MAX_COUNT_WINDOW: u32 = 1 << 20;

/// The largest number of buckets of a [`TimeWindow`].
pub const MAX_TIME_BUCKETS: u32 = 1_000;

/// A time-based sliding window: the calls of the last `duration`, kept in
/// `buckets` buckets of `duration / buckets` each (the oldest bucket leaves
/// the window whole, so the window spans between `duration - duration/buckets`
/// and `duration`).
///
/// ```
/// use std::time::Duration;
/// use toolwarden_circuit_breaker::TimeWindow;
/// let w = TimeWindow::new(Duration::from_secs(60), 12); // 5-second buckets
/// assert_eq!(w.bucket_width(), Duration::from_secs(5));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeWindow {
    /// How far back the window reaches.
    pub duration: Duration,
    /// How many buckets it is kept in.
    pub buckets: u32,
}

impl TimeWindow {
    /// A window over the last `duration`, in `buckets` buckets.
    #[must_use]
    pub fn new(duration: Duration, buckets: u32) -> Self {
        TimeWindow { duration, buckets }
    }

    /// The width of one bucket.
    #[must_use]
    pub fn bucket_width(&self) -> Duration {
        self.duration / self.buckets.max(1)
    }
}

/// The validated configuration every breaker of one registry shares.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) name: Arc<str>,
    pub(crate) failure_threshold: Option<u32>,
    pub(crate) failure_rate_threshold: Option<f64>,
    pub(crate) count_window: Option<u32>,
    pub(crate) time_window: Option<TimeWindow>,
    pub(crate) slow_call_duration: Option<Duration>,
    pub(crate) slow_call_rate_threshold: f64,
    pub(crate) minimum_calls: u32,
    pub(crate) reset_timeout: Duration,
    pub(crate) reset_multiplier: f64,
    pub(crate) max_reset_timeout: Duration,
    pub(crate) jitter: f64,
    pub(crate) half_open_max_calls: u32,
    pub(crate) success_threshold: u32,
    pub(crate) probe_timeout: Duration,
    pub(crate) key_by: KeyBy,
    pub(crate) bounds: Bounds,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            name: "circuit_breaker".into(),
            failure_threshold: Some(5),
            failure_rate_threshold: Some(0.5),
            count_window: Some(20),
            time_window: None,
            slow_call_duration: None,
            slow_call_rate_threshold: 1.0,
            minimum_calls: 5,
            reset_timeout: Duration::from_secs(30),
            reset_multiplier: 2.0,
            max_reset_timeout: Duration::from_secs(300),
            jitter: 0.1,
            half_open_max_calls: 1,
            success_threshold: 1,
            probe_timeout: Duration::from_secs(30),
            key_by: KeyBy::Tool,
            bounds: Bounds::default(),
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("name", &self.name)
            .field("failure_threshold", &self.failure_threshold)
            .field("failure_rate_threshold", &self.failure_rate_threshold)
            .field("count_window", &self.count_window)
            .field("time_window", &self.time_window)
            .field("slow_call_duration", &self.slow_call_duration)
            .field("slow_call_rate_threshold", &self.slow_call_rate_threshold)
            .field("minimum_calls", &self.minimum_calls)
            .field("reset_timeout", &self.reset_timeout)
            .field("reset_multiplier", &self.reset_multiplier)
            .field("max_reset_timeout", &self.max_reset_timeout)
            .field("jitter", &self.jitter)
            .field("half_open_max_calls", &self.half_open_max_calls)
            .field("success_threshold", &self.success_threshold)
            .field("probe_timeout", &self.probe_timeout)
            .field("key_by", &self.key_by)
            .field("bounds", &self.bounds)
            .finish()
    }
}

fn rate_ok(rate: f64) -> bool {
    rate.is_finite() && rate > 0.0 && rate <= 1.0
}

impl Config {
    /// Validates the whole configuration: the policy, the registry-wide
    /// settings, and the idle timeout against this policy's open periods.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.name.is_empty() {
            return Err(ConfigError::new("name", "must not be empty"));
        }
        self.validate_policy()?;
        self.bounds.validate().map_err(|e| e.in_section("bounds"))?;
        self.check_idle_timeout("max_reset_timeout")
    }

    /// This configuration with the trip, reset and half-open knobs of
    /// `policy` (the registry-wide settings stay this one's).
    pub(crate) fn with_policy_of(&self, policy: &Config) -> Config {
        Config {
            name: Arc::clone(&self.name),
            key_by: self.key_by.clone(),
            bounds: self.bounds,
            ..policy.clone()
        }
    }

    /// Validates the trip, reset and half-open knobs.
    pub(crate) fn validate_policy(&self) -> Result<(), ConfigError> {
        if self.failure_threshold == Some(0) {
            return Err(ConfigError::new(
                "failure_threshold",
                "must be at least 1 (or None to disable)",
            ));
        }
        if let Some(rate) = self.failure_rate_threshold {
            if !rate_ok(rate) {
                return Err(ConfigError::new(
                    "failure_rate_threshold",
                    "must be in (0, 1]",
                ));
            }
        }
        if let Some(size) = self.count_window {
            if size == 0 || size > MAX_COUNT_WINDOW {
                return Err(ConfigError::new(
                    "count_window",
                    format!("must be between 1 and {MAX_COUNT_WINDOW} calls (or None to disable)"),
                ));
            }
        }
        if let Some(w) = self.time_window {
            if w.buckets == 0 || w.buckets > MAX_TIME_BUCKETS {
                return Err(ConfigError::new(
                    "time_window.buckets",
                    format!("must be between 1 and {MAX_TIME_BUCKETS}"),
                ));
            }
            if w.bucket_width() < Duration::from_millis(1) {
                return Err(ConfigError::new(
                    "time_window.duration",
                    "must give buckets of at least 1 ms (duration / buckets)",
                ));
            }
        }
        if self.slow_call_duration == Some(Duration::ZERO) {
            return Err(ConfigError::new(
                "slow_call_duration",
                "must be positive (or None to disable)",
            ));
        }
        if !rate_ok(self.slow_call_rate_threshold) {
            return Err(ConfigError::new(
                "slow_call_rate_threshold",
                "must be in (0, 1]",
            ));
        }
        if self.minimum_calls == 0 {
            return Err(ConfigError::new("minimum_calls", "must be at least 1"));
        }
        let has_window = self.count_window.is_some() || self.time_window.is_some();
        if !has_window
            && (self.failure_rate_threshold.is_some() || self.slow_call_duration.is_some())
        {
            return Err(ConfigError::new(
                "count_window, time_window",
                "a failure-rate or slow-call policy needs a count window or a time window",
            ));
        }
        if self.failure_threshold.is_none()
            && !(has_window
                && (self.failure_rate_threshold.is_some() || self.slow_call_duration.is_some()))
        {
            return Err(ConfigError::new(
                "failure_threshold, failure_rate_threshold, slow_call_duration",
                "no trip policy is enabled: the breaker could never open",
            ));
        }
        if let Some(size) = self.count_window {
            let rate_policy =
                self.failure_rate_threshold.is_some() || self.slow_call_duration.is_some();
            if rate_policy && self.minimum_calls > size && self.time_window.is_none() {
                return Err(ConfigError::new(
                    "minimum_calls, count_window",
                    "minimum_calls is larger than the count window: the rate policies could never trip",
                ));
            }
        }
        if self.reset_timeout.is_zero() {
            return Err(ConfigError::new("reset_timeout", "must be positive"));
        }
        if !(self.reset_multiplier.is_finite() && self.reset_multiplier >= 1.0) {
            return Err(ConfigError::new(
                "reset_multiplier",
                "must be a finite number >= 1",
            ));
        }
        if self.max_reset_timeout < self.reset_timeout {
            return Err(ConfigError::new(
                "max_reset_timeout",
                "must be at least reset_timeout",
            ));
        }
        if !(self.jitter.is_finite() && (0.0..1.0).contains(&self.jitter)) {
            return Err(ConfigError::new("jitter", "must be in [0, 1)"));
        }
        if self.half_open_max_calls == 0 {
            return Err(ConfigError::new(
                "half_open_max_calls",
                "must be at least 1",
            ));
        }
        if self.success_threshold == 0 {
            return Err(ConfigError::new("success_threshold", "must be at least 1"));
        }
        if self.probe_timeout.is_zero() {
            return Err(ConfigError::new("probe_timeout", "must be positive"));
        }
        Ok(())
    }

    /// An open circuit untouched for an idle period is evicted and comes
    /// back closed: the longest open period of this policy must fit inside
    /// one. `max_reset_field` names this policy's `max_reset_timeout`.
    pub(crate) fn check_idle_timeout(&self, max_reset_field: &str) -> Result<(), ConfigError> {
        if let Some(idle) = self.bounds.idle_timeout {
            // Saturating: `mul_f64` panics past `Duration::MAX`.
            let longest = Duration::try_from_secs_f64(
                self.max_reset_timeout.as_secs_f64() * (1.0 + self.jitter),
            )
            .unwrap_or(Duration::MAX);
            if idle <= longest {
                return Err(ConfigError::new(
                    format!("bounds.idle_timeout, {max_reset_field}"),
                    "idle_timeout must be longer than the longest open period (max_reset_timeout plus jitter), \
                     or an open circuit could be evicted and forgotten",
                ));
            }
        }
        Ok(())
    }

    /// Whether a call's start time must be taken (slow calls are tracked).
    pub(crate) fn tracks_slow_calls(&self) -> bool {
        self.slow_call_duration.is_some()
    }
}
