//! [`LoopGuardSettings`] and [`LoopGuardToolSettings`]: the builder's knobs
//! as serde types (feature `serde`), for configuration files.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use toolwarden_core::settings::or_off;
use toolwarden_core::Bounds;

use crate::builder::LoopGuardBuilder;
use crate::config::ToolLimits;

/// The layer-wide knobs of a [`LoopGuardBuilder`] as a settings type (a
/// `[loop_guard]` table), applied with [`LoopGuardBuilder::settings`]. Keys
/// are the builder's method names; every key is optional (unset: the
/// builder's default). Values are only read here:
/// [`build`](LoopGuardBuilder::build) checks them, naming the key.
///
/// ```
/// use toolwarden_loop_guard::{LoopGuardLayer, LoopGuardSettings};
///
/// let settings: LoopGuardSettings = serde_json::from_value(serde_json::json!({
///     "limits": { "max_repeats": false },
///     "window_calls": 32,
///     "bounds": { "max_keys": 500, "idle_timeout": "30m" },
/// })).unwrap();
/// let layer = LoopGuardLayer::builder().settings(&settings).build().unwrap();
/// assert_eq!(layer.config().limits().max_repeats, None);
/// assert_eq!(layer.config().limits().max_failing_repeats, Some(3)); // unset: the default
///
/// let bad: LoopGuardSettings =
///     serde_json::from_value(serde_json::json!({ "window_calls": 1 })).unwrap();
/// let err = LoopGuardLayer::builder().settings(&bad).build().unwrap_err();
/// assert_eq!(err.field(), "window_calls");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoopGuardSettings {
    /// Whether the layer is used at all. Default `true`. The builder does
    /// not read it: whoever assembles a stack leaves the layer out when it
    /// is `false`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// The limits of every tool without limits of its own. Default: 3
    /// identical failures, 8 identical calls, cycles detected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsSettings>,
    /// Whether every tool without settings of its own passes untouched.
    /// Default `false`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exempt: Option<bool>,
    /// The longest cycle looked for, in [2, 8]. Default `3`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_cycle_period: Option<usize>,
    /// Full rounds of a cycle allowed (≥ 2). Default `3`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_cycle_repeats: Option<u32>,
    /// Recent calls each session remembers, in [2, 1024]. Default `16`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_calls: Option<usize>,
    /// How long a call is remembered. Default `"5m"`.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub window_time: Option<Duration>,
    /// The bounds of the session histories: `{ max_keys = 10000,
    /// idle_timeout = "10m" }` (the default: sessions), either key optional.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bounds: Option<Bounds>,
    /// How long a refusal stays in force at most (at most 30 s). Default `"30s"`.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub refusal_cooldown: Option<Duration>,
}

/// One tool's own knobs (a `[tools."name".loop_guard]` table), applied with
/// [`LoopGuardBuilder::tool_settings`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoopGuardToolSettings {
    /// Never guard the tool (not with `limits`). Default: the layer's `exempt`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exempt: Option<bool>,
    /// The tool's limits; unset keys keep the layer's. Default: the layer's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsSettings>,
}

/// [`ToolLimits`] as settings: `{ max_failing_repeats = 3, max_repeats =
/// 8, cycles = true }`, every key optional (unset: the limits they apply
/// over), `false` turning a rule off. A tool polled on purpose
/// ([`ToolLimits::polling`]) is `{ max_repeats = false, cycles = false }`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSettings {
    /// Identical calls that may fail in a row before the next is blocked
    /// (between 1 and `window_calls`), or `false`. Default `3`.
    #[serde(with = "or_off", skip_serializing_if = "Option::is_none")]
    pub max_failing_repeats: Option<Option<u32>>,
    /// Identical calls that may be made in a row before the next is
    /// blocked (between 1 and `window_calls`), or `false`. Default `8`.
    #[serde(with = "or_off", skip_serializing_if = "Option::is_none")]
    pub max_repeats: Option<Option<u32>>,
    /// Whether the tool's calls can make up a cycle that is blocked.
    /// Default `true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cycles: Option<bool>,
}

impl LimitsSettings {
    /// `limits` with the keys these settings set.
    #[must_use]
    pub fn over(&self, limits: ToolLimits) -> ToolLimits {
        ToolLimits {
            max_failing_repeats: self
                .max_failing_repeats
                .unwrap_or(limits.max_failing_repeats),
            max_repeats: self.max_repeats.unwrap_or(limits.max_repeats),
            cycles: self.cycles.unwrap_or(limits.cycles),
        }
    }
}

impl<C> LoopGuardBuilder<C> {
    /// Sets every knob that `settings` sets; the others keep their values.
    /// `settings.enabled` is not the builder's (see
    /// [`LoopGuardSettings::enabled`]).
    #[must_use]
    pub fn settings(mut self, settings: &LoopGuardSettings) -> Self {
        if let Some(limits) = settings.limits {
            let limits = limits.over(self.current_limits());
            self = self.limits(limits);
        }
        if let Some(exempt) = settings.exempt {
            self = self.exempt(exempt);
        }
        if let Some(period) = settings.max_cycle_period {
            self = self.max_cycle_period(period);
        }
        if let Some(rounds) = settings.max_cycle_repeats {
            self = self.max_cycle_repeats(rounds);
        }
        if let Some(calls) = settings.window_calls {
            self = self.window_calls(calls);
        }
        if let Some(window) = settings.window_time {
            self = self.window_time(window);
        }
        if let Some(bounds) = settings.bounds {
            self = self.bounds(bounds);
        }
        if let Some(cooldown) = settings.refusal_cooldown {
            self = self.refusal_cooldown(cooldown);
        }
        self
    }

    /// Gives `tool` the knobs that `settings` sets (see [`tool`](Self::tool)),
    /// its limits over the layer's; errors name `tools."<tool>".<key>`.
    #[must_use]
    pub fn tool_settings(self, tool: impl Into<String>, settings: &LoopGuardToolSettings) -> Self {
        let settings = settings.clone();
        self.tool(tool, move |mut b| {
            if let Some(exempt) = settings.exempt {
                b = b.exempt(exempt);
            }
            if let Some(limits) = settings.limits {
                let limits = limits.over(b.current_limits());
                b = b.limits(limits);
            }
            b
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read<T: serde::de::DeserializeOwned>(json: serde_json::Value) -> T {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn tool_limits_apply_over_the_layers() {
        let settings: LoopGuardSettings = read(serde_json::json!({
            "limits": { "max_failing_repeats": 5 },
        }));
        let polling: LoopGuardToolSettings =
            read(serde_json::json!({ "limits": { "max_repeats": false, "cycles": false } }));
        let exempt: LoopGuardToolSettings = read(serde_json::json!({ "exempt": true }));
        let layer = LoopGuardBuilder::default()
            .tool_settings("job_status", &polling)
            .tool_settings("wait", &exempt)
            .settings(&settings)
            .build()
            .unwrap();
        let config = layer.config();
        assert_eq!(
            config.limits_for("job_status"),
            Some(ToolLimits {
                max_failing_repeats: Some(5),
                ..ToolLimits::polling()
            })
        );
        assert_eq!(config.limits_for("wait"), None);
        assert_eq!(
            config.limits_for("search").unwrap().max_failing_repeats,
            Some(5)
        );
    }

    #[test]
    fn the_builder_checks_the_settings_and_names_the_key() {
        let field = |json: serde_json::Value| {
            let settings: LoopGuardSettings = read(json);
            LoopGuardBuilder::default()
                .settings(&settings)
                .build()
                .unwrap_err()
                .field()
                .to_owned()
        };
        assert_eq!(
            field(serde_json::json!({ "window_calls": 1 })),
            "window_calls"
        );
        assert_eq!(
            field(serde_json::json!({ "limits": { "max_repeats": 0 } })),
            "limits.max_repeats"
        );
        assert_eq!(
            field(serde_json::json!({ "window_calls": 10, "limits": { "max_repeats": 12 } })),
            "limits.max_repeats"
        );
        let both: LoopGuardToolSettings =
            read(serde_json::json!({ "exempt": true, "limits": { "cycles": false } }));
        let err = LoopGuardBuilder::default()
            .tool_settings("x", &both)
            .build()
            .unwrap_err();
        assert_eq!(err.field(), r#"tools."x".exempt"#);
    }

    #[test]
    fn unknown_keys_are_refused_and_values_round_trip() {
        assert!(serde_json::from_value::<LoopGuardSettings>(
            serde_json::json!({ "cycle_repeats": 3 })
        )
        .is_err());
        assert!(serde_json::from_value::<LoopGuardToolSettings>(
            serde_json::json!({ "polling": true })
        )
        .is_err());
        let settings: LoopGuardSettings = read(serde_json::json!({
            "limits": { "max_failing_repeats": false, "max_repeats": 4 },
            "window_time": "1m",
        }));
        let json = serde_json::to_value(&settings).unwrap();
        assert_eq!(
            json["limits"],
            serde_json::json!({ "max_failing_repeats": false, "max_repeats": 4 })
        );
        assert_eq!(read::<LoopGuardSettings>(json), settings);
    }
}
