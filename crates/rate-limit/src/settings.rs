//! [`RateLimitSettings`] and [`RateLimitToolSettings`]: the builder's knobs
//! as serde types (feature `serde`), for configuration files; rates written
//! `"10/s"` ([`Rate`]'s `FromStr`) and modes written `"reject"` or `"wait"`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use humantime_serde::re::humantime;
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use toolwarden_core::Bounds;

use crate::builder::{Mode, RateLimitBuilder};
use crate::quota::Rate;

/// The wait of a [`Mode`] written `"wait"`, without its `max_wait`: 1 s.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(1);

/// The layer-wide knobs of a [`RateLimitBuilder`] as a settings type (a
/// `[rate_limit]` table), applied with [`RateLimitBuilder::settings`]. Keys
/// are the builder's method names; every key is optional (unset: the
/// builder's default). Values are only read here:
/// [`build`](RateLimitBuilder::build) checks them, naming the key.
///
/// ```
/// use toolwarden_rate_limit::{RateLimitLayer, RateLimitSettings};
///
/// let settings: RateLimitSettings = serde_json::from_value(serde_json::json!({
///     "global": { "rate": "100/s", "burst": 20 },
///     "per_tool": { "rate": "600/min" },
///     "mode": { "max_wait": "2s" },
/// })).unwrap();
/// let layer = RateLimitLayer::builder().settings(&settings).build().unwrap();
/// assert_eq!(layer.global_quota().unwrap().burst(), 20);
/// assert_eq!(layer.tool_quota("search").unwrap().burst(), 600); // the rate's count
///
/// let bad: RateLimitSettings =
///     serde_json::from_value(serde_json::json!({ "per_tool": { "rate": 5, "burst": 0 } })).unwrap();
/// let err = RateLimitLayer::builder().settings(&bad).build().unwrap_err();
/// assert_eq!(err.field(), "per_tool.burst");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitSettings {
    /// Whether the layer is used at all. Default `true`. The builder does
    /// not read it: whoever assembles a stack leaves the layer out when it
    /// is `false`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// The quota over every limited call (see [`RateLimitBuilder::global`]).
    /// Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub global: Option<QuotaSettings>,
    /// The quota of each key (see [`RateLimitBuilder::per_tool`]). Default:
    /// 50 calls/s, burst 100, when no other quota is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_tool: Option<QuotaSettings>,
    /// `"reject"` (the default), `"wait"` (up to [`DEFAULT_MAX_WAIT`]) or
    /// `{ max_wait = "2s" }` (wait up to that).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// Whether requests other than `tools/call` are limited too. Default `false`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit_all_methods: Option<bool>,
    /// The bounds of the per-key state: `{ max_keys = 10000, idle_timeout =
    /// "10m" }` (the default), either key optional.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bounds: Option<Bounds>,
}

/// One tool's own knobs (a `[tools."name".rate_limit]` table), applied
/// with [`RateLimitBuilder::tool_settings`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitToolSettings {
    /// The tool's quota, replacing the layer's `per_tool` for it. Default:
    /// the layer's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_tool: Option<QuotaSettings>,
}

/// A quota: `{ rate = "10/s", burst = 5 }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaSettings {
    /// The sustained rate: `"<count>/<period>"` (see [`Rate`]'s `FromStr`)
    /// or a number of calls per second. Required.
    pub rate: Rate,
    /// Calls allowed at once after a quiet period. Default: the rate's count
    /// (one period's worth of calls).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

impl QuotaSettings {
    /// The rate and the burst, as the builder takes them.
    #[must_use]
    pub fn quota(&self) -> (Rate, u32) {
        (self.rate, self.burst.unwrap_or(self.rate.count()))
    }
}

impl RateLimitBuilder {
    /// Sets every knob that `settings` sets; the others keep their values.
    /// `settings.enabled` is not the builder's (see
    /// [`RateLimitSettings::enabled`]).
    #[must_use]
    pub fn settings(mut self, settings: &RateLimitSettings) -> Self {
        if let Some(quota) = settings.global {
            let (rate, burst) = quota.quota();
            self = self.global(rate, burst);
        }
        if let Some(quota) = settings.per_tool {
            let (rate, burst) = quota.quota();
            self = self.per_tool(rate, burst);
        }
        if let Some(mode) = settings.mode {
            self = self.mode(mode);
        }
        if let Some(all) = settings.limit_all_methods {
            self = self.limit_all_methods(all);
        }
        if let Some(bounds) = settings.bounds {
            self = self.bounds(bounds);
        }
        self
    }

    /// Gives `tool` the knobs that `settings` sets (see [`tool`](Self::tool));
    /// errors name `tools."<tool>".<key>`.
    #[must_use]
    pub fn tool_settings(self, tool: impl Into<String>, settings: &RateLimitToolSettings) -> Self {
        let per_tool = settings.per_tool;
        self.tool(tool, move |b| match per_tool {
            Some(quota) => {
                let (rate, burst) = quota.quota();
                b.per_tool(rate, burst)
            }
            None => b,
        })
    }
}

/// Reads `"<count>/<period>"`: the period a unit (`ms`, `s`, `sec`, `m`,
/// `min`, `h`, `hour`) or a humantime duration (`"5/100ms"`, `"600/10m"`);
/// a bare number is calls per second. Only the form is checked here (a
/// whole count, a duration); what a quota may be is checked by
/// [`Quota::new`](crate::Quota::new), when the layer is built.
///
/// ```
/// use std::time::Duration;
/// use toolwarden_rate_limit::Rate;
/// let rate: Rate = "600/min".parse().unwrap();
/// assert_eq!((rate.count(), rate.per()), (600, Duration::from_secs(60)));
/// assert_eq!("5/100ms".parse::<Rate>().unwrap().per(), Duration::from_millis(100));
/// assert!("5/fortnight".parse::<Rate>().is_err());
/// ```
impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const FORM: &str = "expected a rate like \"10/s\", \"600/min\" or \"5/100ms\"";
        let (count, per) = s.split_once('/').unwrap_or((s, "s"));
        let count: u32 = count
            .trim()
            .parse()
            .map_err(|_| format!("{FORM}: the count must be a whole number, got {s:?}"))?;
        let per = match per.trim() {
            "ms" => Duration::from_millis(1),
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            other => humantime::parse_duration(other)
                .map_err(|e| format!("{FORM}: bad period {other:?}: {e}"))?,
        };
        Ok(Rate::new(count, per))
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&format_args!(
            "{}/{}",
            self.count(),
            humantime::format_duration(self.per())
        ))
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

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Rate, E> {
                u32::try_from(v)
                    .map(Rate::per_second)
                    .map_err(|_| E::custom("the count must fit in 32 bits"))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Rate, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom("the count must not be negative"))
                    .and_then(|v| self.visit_u64(v))
            }
        }

        deserializer.deserialize_any(RateVisitor)
    }
}

/// `{ max_wait = "2s" }`: [`Mode::Wait`] as a table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitTable {
    #[serde(with = "humantime_serde")]
    max_wait: Duration,
}

impl Serialize for Mode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        match self {
            Mode::Reject => serializer.serialize_str("reject"),
            Mode::Wait { max_wait } => {
                let mut table = serializer.serialize_struct("Wait", 1)?;
                table.serialize_field(
                    "max_wait",
                    &humantime::format_duration(*max_wait).to_string(),
                )?;
                table.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ModeVisitor;

        impl<'de> Visitor<'de> for ModeVisitor {
            type Value = Mode;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#""reject", "wait" or { max_wait = "2s" }"#)
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Mode, E> {
                match v {
                    "reject" => Ok(Mode::Reject),
                    "wait" => Ok(Mode::Wait {
                        max_wait: DEFAULT_MAX_WAIT,
                    }),
                    other => Err(E::unknown_variant(other, &["reject", "wait"])),
                }
            }

            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Mode, A::Error> {
                let wait = WaitTable::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(Mode::Wait {
                    max_wait: wait.max_wait,
                })
            }
        }

        deserializer.deserialize_any(ModeVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read<T: serde::de::DeserializeOwned>(json: serde_json::Value) -> Result<T, String> {
        serde_json::from_value(json).map_err(|e| e.to_string())
    }

    #[test]
    fn rates_parse_and_print() {
        for (text, count, per) in [
            ("10/s", 10, Duration::from_secs(1)),
            ("600/min", 600, Duration::from_secs(60)),
            ("5/100ms", 5, Duration::from_millis(100)),
            ("3/2h", 3, Duration::from_secs(7200)),
            ("7", 7, Duration::from_secs(1)),
        ] {
            let rate: Rate = text.parse().unwrap();
            assert_eq!((rate.count(), rate.per()), (count, per), "{text}");
            let printed = serde_json::to_value(rate).unwrap();
            assert_eq!(read::<Rate>(printed).unwrap(), rate);
        }
        for bad in ["", "x/s", "-1/s", "5/soon", "5/"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
        assert_eq!(
            read::<Rate>(serde_json::json!(4)).unwrap(),
            Rate::per_second(4)
        );
        assert!(read::<Rate>(serde_json::json!(-4)).is_err());
    }

    #[test]
    fn modes_read_and_print() {
        assert_eq!(
            read::<Mode>(serde_json::json!("reject")).unwrap(),
            Mode::Reject
        );
        assert_eq!(
            read::<Mode>(serde_json::json!("wait")).unwrap(),
            Mode::Wait {
                max_wait: DEFAULT_MAX_WAIT
            }
        );
        let wait = Mode::Wait {
            max_wait: Duration::from_millis(250),
        };
        assert_eq!(
            read::<Mode>(serde_json::json!({ "max_wait": "250ms" })).unwrap(),
            wait
        );
        assert_eq!(
            read::<Mode>(serde_json::to_value(wait).unwrap()).unwrap(),
            wait
        );
        assert!(read::<Mode>(serde_json::json!("drop")).is_err());
        assert!(read::<Mode>(serde_json::json!({ "wait": "1s" })).is_err());
    }

    #[test]
    fn settings_set_the_builders_knobs_and_it_checks_them() {
        let settings: RateLimitSettings = read(serde_json::json!({
            "per_tool": { "rate": "5/s", "burst": 2 },
            "mode": "wait",
            "bounds": { "max_keys": 9 },
        }))
        .unwrap();
        let tool: RateLimitToolSettings =
            read(serde_json::json!({ "per_tool": { "rate": "1/min" } })).unwrap();
        let layer = RateLimitBuilder::default()
            .settings(&settings)
            .tool_settings("send", &tool)
            .build()
            .unwrap();
        assert_eq!(layer.tool_quota("search").unwrap().burst(), 2);
        assert_eq!(layer.tool_quota("send").unwrap().burst(), 1);
        assert_eq!(
            layer.mode(),
            Mode::Wait {
                max_wait: DEFAULT_MAX_WAIT
            }
        );
        assert_eq!(layer.bounds().max_keys, 9);

        let bad: RateLimitToolSettings =
            read(serde_json::json!({ "per_tool": { "rate": "0/s" } })).unwrap();
        let err = RateLimitBuilder::default()
            .tool_settings("send", &bad)
            .build()
            .unwrap_err();
        assert_eq!(err.field(), r#"tools."send".per_tool.rate"#);
        let zero_wait: RateLimitSettings =
            read(serde_json::json!({ "mode": { "max_wait": "0s" } })).unwrap();
        let err = RateLimitBuilder::default()
            .settings(&zero_wait)
            .build()
            .unwrap_err();
        assert_eq!(err.field(), "mode.max_wait");
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(read::<RateLimitSettings>(serde_json::json!({ "global_rate": "1/s" })).is_err());
        assert!(
            read::<RateLimitSettings>(serde_json::json!({ "global": { "burst": 1 } })).is_err()
        );
        assert!(read::<RateLimitToolSettings>(serde_json::json!({ "rate": "1/s" })).is_err());
    }
}
