//! The value types of the configuration that are more than a number, a
//! string or a duration: rates, windows and the named choices.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A quota: `count` calls per `per`.
///
/// Written `"<count>/<period>"`: the period is a unit (`ms`, `s`, `sec`,
/// `m`, `min`, `h`, `hour`) or a humantime duration (`"5/100ms"`,
/// `"600/10m"`). A bare number is calls per second.
///
/// ```
/// use std::time::Duration;
/// use toolwarden_proxy::config::Rate;
/// let rate: Rate = "600/min".parse().unwrap();
/// assert_eq!((rate.count, rate.per), (600, Duration::from_secs(60)));
/// assert_eq!("5/100ms".parse::<Rate>().unwrap().per, Duration::from_millis(100));
/// assert!("0/s".parse::<Rate>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Calls allowed per period (≥ 1).
    pub count: u32,
    /// The period (positive).
    pub per: Duration,
}

impl Rate {
    /// The time between two calls at this rate.
    #[must_use]
    pub fn interval(&self) -> Duration {
        self.per / self.count.max(1)
    }
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const FORM: &str = "expected a rate like \"10/s\", \"600/min\" or \"5/100ms\"";
        let (count, per) = s.split_once('/').unwrap_or((s, "s"));
        let count: u32 = count
            .trim()
            .parse()
            .map_err(|_| format!("{FORM}: the count must be a whole number, got {s:?}"))?;
        if count == 0 {
            return Err(format!("{FORM}: the count must be at least 1"));
        }
        let per = per.trim();
        let per = match per {
            "ms" => Duration::from_millis(1),
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            other => humantime::parse_duration(other)
                .map_err(|e| format!("{FORM}: bad period {other:?}: {e}"))?,
        };
        if per.is_zero() {
            return Err(format!("{FORM}: the period must be positive"));
        }
        Ok(Rate { count, per })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, humantime::format_duration(self.per))
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RateVisitor;
        impl Visitor<'_> for RateVisitor {
            type Value = Rate;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a rate like \"10/s\" or a number of calls per second")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Rate, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Rate, E> {
                let count = u32::try_from(v)
                    .ok()
                    .filter(|&c| c > 0)
                    .ok_or_else(|| E::custom("the rate must be at least 1 call per second"))?;
                Ok(Rate {
                    count,
                    per: Duration::from_secs(1),
                })
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Rate, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(-1))
            }
        }
        deserializer.deserialize_any(RateVisitor)
    }
}

/// The breaker's sliding window: the last `Calls(n)` calls, or the calls of
/// the last `Time(d)`. Written as an integer (`100`) or a duration (`"60s"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// The last n calls.
    Calls(u32),
    /// The calls of the last duration.
    Time(Duration),
}

impl Serialize for Window {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Window::Calls(n) => serializer.serialize_u32(*n),
            Window::Time(d) => serializer.collect_str(&humantime::format_duration(*d)),
        }
    }
}

impl<'de> Deserialize<'de> for Window {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct WindowVisitor;
        impl Visitor<'_> for WindowVisitor {
            type Value = Window;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of calls (100) or a duration (\"60s\")")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Window, E> {
                humantime::parse_duration(v).map(Window::Time).map_err(|e| {
                    E::custom(format!(
                        "expected a number of calls (100) or a duration (\"60s\"): {e}"
                    ))
                })
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Window, E> {
                u32::try_from(v)
                    .map(Window::Calls)
                    .map_err(|_| E::custom("the number of calls must be between 0 and 4294967295"))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Window, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(-1))
            }
        }
        deserializer.deserialize_any(WindowVisitor)
    }
}

/// The retry backoff's randomness (see `toolwarden-retry`'s `Jitter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Jitter {
    /// No randomness.
    None,
    /// Uniform in `[0, ceiling]`.
    Full,
    /// Half the ceiling plus uniform in `[0, ceiling / 2]`.
    Equal,
    /// Grows from the delay actually used.
    Decorrelated,
}

/// What the rate limiter does with a call over quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitMode {
    /// Refuse at once with a rate-limited result.
    Reject,
    /// Wait for a token, up to `max_wait`.
    Wait,
}

/// A failure class by name, for `retry.retry_on`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureClassName {
    /// Timeouts, connection failures, rate limits.
    Transient,
    /// The tool failing on its side.
    Server,
    /// The request itself is wrong.
    Client,
}

impl From<FailureClassName> for toolwarden_core::FailureClass {
    fn from(name: FailureClassName) -> Self {
        match name {
            FailureClassName::Transient => toolwarden_core::FailureClass::Transient,
            FailureClassName::Server => toolwarden_core::FailureClass::Server,
            FailureClassName::Client => toolwarden_core::FailureClass::Client,
        }
    }
}
