//! [`CircuitBreakerSettings`] and [`CircuitBreakerToolSettings`]: the
//! builder's knobs as serde types (feature `serde`), for configuration files.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use toolwarden_core::settings::{optional_duration_or_off, or_off};
use toolwarden_core::Bounds;

use crate::builder::CircuitBreakerBuilder;
use crate::config::TimeWindow;

/// The buckets of a [`TimeWindow`] written as a bare duration (`time_window = "60s"`).
pub const DEFAULT_TIME_BUCKETS: u32 = 10;

/// Declares a settings struct with the breaker's policy knobs (the ones a
/// tool may override) after `$extra`, so that each is documented once.
macro_rules! with_policy_knobs {
    ($(#[$meta:meta])* pub struct $name:ident { $($extra:tt)* }) => {
        $(#[$meta])*
        pub struct $name {
            $($extra)*
            /// Consecutive counted failures that open the circuit, or `false`
            /// for no consecutive policy. Default `5`. See
            /// [`CircuitBreakerBuilder::failure_threshold`].
            #[serde(with = "or_off", skip_serializing_if = "Option::is_none")]
            pub failure_threshold: Option<Option<u32>>,
            /// The failure rate, in (0, 1], over each window at or above which
            /// the circuit opens, or `false` for no rate policy. Default `0.5`.
            #[serde(with = "or_off", skip_serializing_if = "Option::is_none")]
            pub failure_rate_threshold: Option<Option<f64>>,
            /// The count window: the last this many calls (up to
            /// [`MAX_COUNT_WINDOW`](crate::MAX_COUNT_WINDOW)), or `false` for
            /// none. Default `20`.
            #[serde(with = "or_off", skip_serializing_if = "Option::is_none")]
            pub count_window: Option<Option<u32>>,
            /// The time window: a duration (`"60s"`, in
            /// [`DEFAULT_TIME_BUCKETS`] buckets) or `{ duration = "60s",
            /// buckets = 12 }`, or `false` for none. Default: none.
            #[serde(with = "or_off", skip_serializing_if = "Option::is_none")]
            pub time_window: Option<Option<TimeWindow>>,
            /// A call at least this long is slow, or `false` to track no slow
            /// calls. Default: none.
            #[serde(with = "optional_duration_or_off", skip_serializing_if = "Option::is_none")]
            pub slow_call_duration: Option<Option<Duration>>,
            /// The slow-call rate, in (0, 1], at or above which the circuit
            /// opens. Default `1.0`.
            #[serde(skip_serializing_if = "Option::is_none")]
            pub slow_call_rate_threshold: Option<f64>,
            /// Recorded calls below which no policy trips. Default `5`.
            #[serde(skip_serializing_if = "Option::is_none")]
            pub minimum_calls: Option<u32>,
            /// How long the circuit stays open the first time. Default `"30s"`.
            #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
            pub reset_timeout: Option<Duration>,
            /// Each re-open multiplies the open period by this (≥ 1). Default `2.0`.
            #[serde(skip_serializing_if = "Option::is_none")]
            pub reset_multiplier: Option<f64>,
            /// The longest open period (≥ `reset_timeout`). Default `"5m"`.
            #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
            pub max_reset_timeout: Option<Duration>,
            /// Random spread of each open period, in [0, 1). Default `0.1`.
            #[serde(skip_serializing_if = "Option::is_none")]
            pub jitter: Option<f64>,
            /// Probes a half-open circuit admits at once. Default `1`.
            #[serde(skip_serializing_if = "Option::is_none")]
            pub half_open_max_calls: Option<u32>,
            /// Successful probes that close a half-open circuit. Default `1`.
            #[serde(skip_serializing_if = "Option::is_none")]
            pub success_threshold: Option<u32>,
            /// How long a half-open probe may take before it counts as failed.
            /// Default `"30s"`.
            #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
            pub probe_timeout: Option<Duration>,
        }
    };
}

/// Applies the policy knobs that `$settings` sets to the builder `$b`.
macro_rules! apply_policy_knobs {
    ($b:ident, $settings:expr) => {{
        let s = $settings;
        if let Some(v) = s.failure_threshold {
            $b = $b.failure_threshold(v);
        }
        if let Some(v) = s.failure_rate_threshold {
            $b = $b.failure_rate_threshold(v);
        }
        if let Some(v) = s.count_window {
            $b = $b.count_window(v);
        }
        if let Some(v) = s.time_window {
            $b = $b.time_window(v);
        }
        if let Some(v) = s.slow_call_duration {
            $b = $b.slow_call_duration(v);
        }
        if let Some(v) = s.slow_call_rate_threshold {
            $b = $b.slow_call_rate_threshold(v);
        }
        if let Some(v) = s.minimum_calls {
            $b = $b.minimum_calls(v);
        }
        if let Some(v) = s.reset_timeout {
            $b = $b.reset_timeout(v);
        }
        if let Some(v) = s.reset_multiplier {
            $b = $b.reset_multiplier(v);
        }
        if let Some(v) = s.max_reset_timeout {
            $b = $b.max_reset_timeout(v);
        }
        if let Some(v) = s.jitter {
            $b = $b.jitter(v);
        }
        if let Some(v) = s.half_open_max_calls {
            $b = $b.half_open_max_calls(v);
        }
        if let Some(v) = s.success_threshold {
            $b = $b.success_threshold(v);
        }
        if let Some(v) = s.probe_timeout {
            $b = $b.probe_timeout(v);
        }
        $b
    }};
}

with_policy_knobs! {
    /// The layer-wide knobs of a [`CircuitBreakerBuilder`] as a settings type
    /// (a `[circuit_breaker]` table), applied with
    /// [`CircuitBreakerBuilder::settings`]. Keys are the builder's method
    /// names; every key is optional (unset: the builder's default). Values
    /// are only read here: [`build`](CircuitBreakerBuilder::build) checks
    /// them, naming the key.
    ///
    /// ```
    /// use toolwarden_circuit_breaker::{CircuitBreakerLayer, CircuitBreakerSettings};
    ///
    /// let settings: CircuitBreakerSettings = serde_json::from_value(serde_json::json!({
    ///     "failure_threshold": false,
    ///     "time_window": "60s",
    ///     "reset_timeout": "10s",
    /// })).unwrap();
    /// assert!(CircuitBreakerLayer::builder().settings(&settings).build().is_ok());
    ///
    /// let bad: CircuitBreakerSettings =
    ///     serde_json::from_value(serde_json::json!({ "half_open_max_calls": 0 })).unwrap();
    /// let err = CircuitBreakerLayer::builder().settings(&bad).build().unwrap_err();
    /// assert_eq!(err.field(), "half_open_max_calls");
    /// ```
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    pub struct CircuitBreakerSettings {
        /// Whether the layer is used at all. Default `true`. The builder does
        /// not read it: whoever assembles a stack leaves the layer out when
        /// it is `false`.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub enabled: Option<bool>,
        /// The registry's name, shown in snapshots. Default `"circuit_breaker"`.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub name: Option<String>,
        /// The bounds of the keyed breakers: `{ max_keys = 10000,
        /// idle_timeout = "10m" }` (the default), either key optional.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub bounds: Option<Bounds>,
    }
}

with_policy_knobs! {
    /// One tool's own breaker policy (a `[tools."name".circuit_breaker]`
    /// table), applied with [`CircuitBreakerBuilder::tool_settings`]: the
    /// policy keys of [`CircuitBreakerSettings`], documented there; unset
    /// keys keep the layer's values.
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    pub struct CircuitBreakerToolSettings {
        /// `false`: the tool's circuit is disabled (it records nothing and
        /// never refuses). Default `true`. The builder does not read it:
        /// whoever holds the layer disables the circuit with
        /// [`CircuitRegistry::disable`](crate::CircuitRegistry::disable).
        #[serde(skip_serializing_if = "Option::is_none")]
        pub enabled: Option<bool>,
    }
}

impl<C> CircuitBreakerBuilder<C> {
    /// Sets every knob that `settings` sets; the others keep their values.
    /// `settings.enabled` is not the builder's (see
    /// [`CircuitBreakerSettings::enabled`]).
    #[must_use]
    pub fn settings(mut self, settings: &CircuitBreakerSettings) -> Self {
        if let Some(name) = &settings.name {
            self = self.name(name.as_str());
        }
        if let Some(bounds) = settings.bounds {
            self = self.bounds(bounds);
        }
        apply_policy_knobs!(self, settings)
    }

    /// Gives `tool` the policy knobs that `settings` sets (see
    /// [`tool`](Self::tool)); errors name `tools."<tool>".<key>`.
    #[must_use]
    pub fn tool_settings(
        self,
        tool: impl Into<String>,
        settings: &CircuitBreakerToolSettings,
    ) -> Self {
        let settings = settings.clone();
        self.tool(tool, move |mut b| apply_policy_knobs!(b, &settings))
    }
}

impl Serialize for TimeWindow {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut table = serializer.serialize_struct("TimeWindow", 2)?;
        table.serialize_field(
            "duration",
            &humantime_serde::re::humantime::format_duration(self.duration).to_string(),
        )?;
        table.serialize_field("buckets", &self.buckets)?;
        table.end()
    }
}

/// `{ duration = "60s", buckets = 12 }`, `buckets` optional.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TimeWindowTable {
    #[serde(with = "humantime_serde")]
    duration: Duration,
    #[serde(default = "default_buckets")]
    buckets: u32,
}

fn default_buckets() -> u32 {
    DEFAULT_TIME_BUCKETS
}

impl<'de> Deserialize<'de> for TimeWindow {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TimeWindowVisitor;

        impl<'de> Visitor<'de> for TimeWindowVisitor {
            type Value = TimeWindow;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a duration ("60s") or { duration = "60s", buckets = 12 }"#)
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<TimeWindow, E> {
                humantime_serde::re::humantime::parse_duration(v)
                    .map(|d| TimeWindow::new(d, DEFAULT_TIME_BUCKETS))
                    .map_err(|e| E::custom(format!("expected a duration like \"60s\": {e}")))
            }

            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<TimeWindow, A::Error> {
                let table =
                    TimeWindowTable::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(TimeWindow::new(table.duration, table.buckets))
            }
        }

        deserializer.deserialize_any(TimeWindowVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read<T: serde::de::DeserializeOwned>(json: serde_json::Value) -> T {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn settings_set_the_builders_knobs() {
        let settings: CircuitBreakerSettings = read(serde_json::json!({
            "name": "upstream",
            "failure_threshold": false,
            "count_window": false,
            "time_window": { "duration": "1m", "buckets": 12 },
            "minimum_calls": 30,
            "reset_timeout": "7s",
            "max_reset_timeout": "70s",
            "bounds": { "max_keys": 50 },
        }));
        let layer = CircuitBreakerBuilder::new()
            .settings(&settings)
            .build()
            .unwrap();
        let policy = layer.registry().default_policy();
        assert_eq!(&*policy.name, "upstream");
        assert_eq!(policy.failure_threshold, None);
        assert_eq!(policy.count_window, None);
        assert_eq!(
            policy.time_window,
            Some(TimeWindow::new(Duration::from_secs(60), 12))
        );
        assert_eq!(policy.minimum_calls, 30);
        assert_eq!(policy.reset_timeout, Duration::from_secs(7));
        assert_eq!(policy.bounds, Bounds::max_keys(50));
        // Unset keys keep the builder's defaults.
        assert_eq!(policy.half_open_max_calls, 1);
    }

    #[test]
    fn the_builder_checks_the_values_and_names_the_key() {
        let field = |json: serde_json::Value| {
            let settings: CircuitBreakerSettings = read(json);
            CircuitBreakerBuilder::new()
                .settings(&settings)
                .build()
                .unwrap_err()
                .field()
                .to_owned()
        };
        assert_eq!(
            field(serde_json::json!({ "failure_threshold": 0 })),
            "failure_threshold"
        );
        assert_eq!(
            field(serde_json::json!({ "time_window": { "duration": "5ms", "buckets": 10 } })),
            "time_window.duration"
        );
        // success_threshold above half_open_max_calls is the breaker's call.
        let settings: CircuitBreakerSettings = read(serde_json::json!({
            "half_open_max_calls": 1, "success_threshold": 2,
        }));
        assert!(CircuitBreakerBuilder::new()
            .settings(&settings)
            .build()
            .is_ok());
    }

    #[test]
    fn tool_settings_start_from_the_layers_values() {
        let tool: CircuitBreakerToolSettings =
            read(serde_json::json!({ "failure_threshold": 1, "minimum_calls": 1 }));
        let layer = CircuitBreakerBuilder::new()
            .tool_settings("delete", &tool)
            .reset_timeout(Duration::from_secs(9))
            .build()
            .unwrap();
        let policy = layer.registry().tool_policy("delete").unwrap();
        assert_eq!(policy.failure_threshold, Some(1));
        assert_eq!(policy.reset_timeout, Duration::from_secs(9));
        let bad: CircuitBreakerToolSettings = read(serde_json::json!({ "jitter": 2.0 }));
        let err = CircuitBreakerBuilder::new()
            .tool_settings("delete", &bad)
            .build()
            .unwrap_err();
        assert_eq!(err.field(), r#"tools."delete".jitter"#);
    }

    #[test]
    fn unknown_keys_and_bad_types_are_refused() {
        for json in [
            serde_json::json!({ "failure_rate": 0.5 }),
            serde_json::json!({ "time_window": "soon" }),
            serde_json::json!({ "time_window": { "duration": "1m", "bucket": 3 } }),
            serde_json::json!({ "count_window": true }),
        ] {
            assert!(
                serde_json::from_value::<CircuitBreakerSettings>(json.clone()).is_err(),
                "{json}"
            );
        }
        assert!(serde_json::from_value::<CircuitBreakerToolSettings>(
            serde_json::json!({ "name": "x" })
        )
        .is_err());
    }

    #[test]
    fn settings_round_trip() {
        let settings: CircuitBreakerSettings = read(serde_json::json!({
            "enabled": true,
            "failure_rate_threshold": false,
            "time_window": "30s",
            "slow_call_duration": "2s",
            "bounds": { "idle_timeout": false },
        }));
        let json = serde_json::to_value(&settings).unwrap();
        assert_eq!(
            json["time_window"],
            serde_json::json!({ "duration": "30s", "buckets": 10 })
        );
        assert_eq!(read::<CircuitBreakerSettings>(json), settings);
    }
}
