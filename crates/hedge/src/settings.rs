//! [`HedgeSettings`] and [`HedgeToolSettings`]: the builder's knobs as
//! serde types (feature `serde`), for configuration files.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use toolwarden_core::settings::or_off;
use toolwarden_core::Bounds;

use crate::builder::HedgeBuilder;
use toolwarden_retry::BudgetConfig;

/// The layer-wide knobs of a [`HedgeBuilder`] as a settings type (a
/// `[hedge]` table), applied with [`HedgeBuilder::settings`]. Keys are the
/// builder's method names; every key is optional (unset: the builder's
/// default). Values are only read here: [`build`](HedgeBuilder::build)
/// checks them, naming the key.
///
/// ```
/// use toolwarden_hedge::{HedgeLayer, HedgeSettings};
///
/// let settings: HedgeSettings = serde_json::from_value(serde_json::json!({
///     "enabled": true,
///     "delay": "250ms",
///     "percentile": false,
///     "budget": { "ratio": 0.05 },
/// })).unwrap();
/// assert!(HedgeLayer::builder().settings(&settings).build().is_ok());
///
/// let bad: HedgeSettings = serde_json::from_value(serde_json::json!({ "percentile": 1.5 })).unwrap();
/// let err = HedgeLayer::builder().settings(&bad).build().unwrap_err();
/// assert_eq!(err.field(), "percentile");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HedgeSettings {
    /// Whether the layer is used at all. The builder does not read it:
    /// whoever assembles a stack decides. The proxy puts the layer in when
    /// the `[hedge]` section is present and this is not `false` (hedging
    /// sends extra calls, so without the section it is off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// How long the first attempt runs before the hedge, while the tool
    /// has too few samples or without a percentile (positive, at most 1 h).
    /// Default `"100ms"`.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub delay: Option<Duration>,
    /// The percentile of the tool's recent good answers after which the
    /// hedge is sent (above 0, at most 1), or `false` for always `delay`.
    /// Default `0.95`.
    #[serde(with = "or_off", skip_serializing_if = "Option::is_none")]
    pub percentile: Option<Option<f64>>,
    /// Good answers a tool needs before its percentile replaces `delay`
    /// (1 to 64). Default `20`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_samples: Option<u32>,
    /// The hedge budget: `{ ratio = 0.1, min_per_sec = 1, ttl = "10s" }`
    /// (the default), every key optional (unset: that default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<HedgeBudgetSettings>,
    /// The bounds of the per-tool latency records: `{ max_keys = 10000,
    /// idle_timeout = "10m" }` (the default), either key optional. A tool
    /// with a `[tools."<name>".hedge]` table keeps its record outside
    /// them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bounds: Option<Bounds>,
}

/// The `budget` table of [`HedgeSettings`]: [`BudgetConfig`]'s keys, each
/// defaulting to [`DEFAULT_BUDGET`](crate::DEFAULT_BUDGET)'s value (not the
/// retry budget's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HedgeBudgetSettings {
    /// Hedges per hedgeable call over the window (0 to 10). Default `0.1`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    /// Hedges per second always available. Default `1`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_per_sec: Option<u32>,
    /// The window (1 s to 1 h). Default `"10s"`.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Duration>,
}

impl HedgeBudgetSettings {
    fn config(&self) -> BudgetConfig {
        let d = crate::DEFAULT_BUDGET;
        BudgetConfig {
            ratio: self.ratio.unwrap_or(d.ratio),
            min_per_sec: self.min_per_sec.unwrap_or(d.min_per_sec),
            ttl: self.ttl.unwrap_or(d.ttl),
        }
    }
}

/// One tool's own knobs (a `[tools."name".hedge]` table), applied with
/// [`HedgeBuilder::tool_settings`]: `delay`, `percentile` and
/// `min_samples` as in [`HedgeSettings`] (unset: the layer's), and
/// `safe_to_hedge`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HedgeToolSettings {
    /// Whether the tool may be sent twice at once, whatever the catalog
    /// says. Default: the catalog decides.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub safe_to_hedge: Option<bool>,
    /// See [`HedgeSettings::delay`].
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub delay: Option<Duration>,
    /// See [`HedgeSettings::percentile`].
    #[serde(with = "or_off", skip_serializing_if = "Option::is_none")]
    pub percentile: Option<Option<f64>>,
    /// See [`HedgeSettings::min_samples`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_samples: Option<u32>,
}

impl<C> HedgeBuilder<C> {
    /// Sets every knob that `settings` sets; the others keep their values.
    /// `settings.enabled` is not the builder's (see
    /// [`HedgeSettings::enabled`]).
    #[must_use]
    pub fn settings(mut self, settings: &HedgeSettings) -> Self {
        if let Some(v) = settings.delay {
            self = self.delay(v);
        }
        if let Some(v) = settings.percentile {
            self = self.percentile(v);
        }
        if let Some(v) = settings.min_samples {
            self = self.min_samples(v);
        }
        if let Some(v) = &settings.budget {
            self = self.budget(v.config());
        }
        if let Some(v) = settings.bounds {
            self = self.bounds(v);
        }
        self
    }

    /// Gives `tool` the knobs `settings` sets (see [`HedgeBuilder::tool`]).
    #[must_use]
    pub fn tool_settings(self, tool: impl Into<String>, settings: &HedgeToolSettings) -> Self {
        let settings = settings.clone();
        self.tool(tool, move |mut b| {
            if let Some(v) = settings.safe_to_hedge {
                b = b.safe_to_hedge(v);
            }
            if let Some(v) = settings.delay {
                b = b.delay(v);
            }
            if let Some(v) = settings.percentile {
                b = b.percentile(v);
            }
            if let Some(v) = settings.min_samples {
                b = b.min_samples(v);
            }
            b
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HedgeLayer;

    #[test]
    fn tool_settings_apply_and_errors_name_the_tool() {
        let tool: HedgeToolSettings = serde_json::from_value(serde_json::json!({
            "safe_to_hedge": true, "delay": "0s",
        }))
        .unwrap();
        let err = HedgeLayer::builder()
            .tool_settings("lookup", &tool)
            .build()
            .unwrap_err();
        assert_eq!(err.field(), r#"tools."lookup".delay"#);
        assert!(
            serde_json::from_value::<HedgeToolSettings>(serde_json::json!({"budget": {}})).is_err()
        );
    }

    #[test]
    fn a_partial_budget_keeps_the_hedge_defaults() {
        let s: HedgeSettings =
            serde_json::from_value(serde_json::json!({"budget": {"ratio": 0.3}})).unwrap();
        let c = s.budget.unwrap().config();
        assert_eq!(
            (c.ratio, c.min_per_sec, c.ttl),
            (0.3, 1, Duration::from_secs(10))
        );
        let bad: HedgeSettings =
            serde_json::from_value(serde_json::json!({"budget": {"ttl": "2h"}})).unwrap();
        let err = HedgeLayer::builder().settings(&bad).build().unwrap_err();
        assert_eq!(err.field(), "budget.ttl");
    }
}
