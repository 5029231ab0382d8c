//! [`BulkheadSettings`], [`BulkheadToolSettings`] and
//! [`AdaptiveSettings`]: the builder's knobs as serde types (feature
//! `serde`), for configuration files.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use toolwarden_core::{Bounds, KeyBy};

use crate::adaptive::AdaptiveLimit;
use crate::builder::BulkheadBuilder;

/// What the cap is kept per, as a settings value: `"tool"` (the default),
/// `"session_tool"` or `"server"` (one cap for every tool call).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyBySetting {
    /// [`KeyBy::Tool`].
    Tool,
    /// [`KeyBy::SessionTool`].
    SessionTool,
    /// [`KeyBy::Server`].
    Server,
}

impl From<KeyBySetting> for KeyBy {
    fn from(setting: KeyBySetting) -> Self {
        match setting {
            KeyBySetting::Tool => KeyBy::Tool,
            KeyBySetting::SessionTool => KeyBy::SessionTool,
            KeyBySetting::Server => KeyBy::Server,
        }
    }
}

/// The layer-wide knobs of a [`BulkheadBuilder`] as a settings type (a
/// `[bulkhead]` table), applied with [`BulkheadBuilder::settings`]. Keys are
/// the builder's method names; every key is optional (unset: the builder's
/// default). Values are only read here: [`build`](BulkheadBuilder::build)
/// checks them, naming the key.
///
/// ```
/// use std::time::Duration;
/// use toolwarden_bulkhead::{BulkheadLayer, BulkheadSettings};
///
/// let settings: BulkheadSettings = serde_json::from_value(serde_json::json!({
///     "max_concurrent": 4,
///     "max_wait": "50ms",
/// })).unwrap();
/// let layer = BulkheadLayer::builder().settings(&settings).build().unwrap();
/// assert_eq!(layer.max_concurrent("search"), 4);
/// assert_eq!(layer.max_wait("search"), Duration::from_millis(50));
///
/// let bad: BulkheadSettings = serde_json::from_value(serde_json::json!({ "max_concurrent": 0 })).unwrap();
/// let err = BulkheadLayer::builder().settings(&bad).build().unwrap_err();
/// assert_eq!(err.field(), "max_concurrent");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BulkheadSettings {
    /// Whether the layer is used at all. The builder does not read it:
    /// whoever assembles a stack decides (the standard stack and the proxy
    /// leave the bulkhead out unless its section is present, see there).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// The most calls of one key in flight at once (≥ 1). Default `10`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
    /// How long a call over the cap waits for a place. Default `"0s"`
    /// (refused at once).
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub max_wait: Option<Duration>,
    /// What the cap is kept per: `"tool"`, `"session_tool"` or `"server"`.
    /// Default `"tool"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_by: Option<KeyBySetting>,
    /// The bounds of the per-key state: `{ max_keys = 10000, idle_timeout =
    /// "10m" }` (the default), either key optional.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bounds: Option<Bounds>,
    /// Makes the cap adaptive, `max_concurrent` its ceiling (an
    /// `[bulkhead.adaptive]` table, see [`AdaptiveSettings`]). Default:
    /// absent, the cap is fixed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adaptive: Option<AdaptiveSettings>,
}

/// The knobs of an adaptive cap ([`AdaptiveLimit`]) as a settings type:
/// an `adaptive` table, applied with [`BulkheadBuilder::adaptive`]. Keys
/// are [`AdaptiveLimit`]'s method names; `latency_threshold` is required
/// (`build` names it while unset), the others optional.
///
/// ```
/// use toolwarden_bulkhead::{BulkheadLayer, BulkheadSettings};
/// use toolwarden_core::KeyRef;
///
/// let settings: BulkheadSettings = serde_json::from_value(serde_json::json!({
///     "max_concurrent": 20,
///     "adaptive": { "latency_threshold": "2s", "min_concurrent": 2, "initial_concurrent": 5 },
/// })).unwrap();
/// let layer = BulkheadLayer::builder().settings(&settings).build().unwrap();
/// assert_eq!(layer.current_limit(KeyRef::Tool("search")), 5);
///
/// let bad: BulkheadSettings = serde_json::from_value(serde_json::json!({
///     "adaptive": { "latency_threshold": "2s", "decrease_factor": 1.0 },
/// })).unwrap();
/// let err = BulkheadLayer::builder().settings(&bad).build().unwrap_err();
/// assert_eq!(err.field(), "adaptive.decrease_factor");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdaptiveSettings {
    /// The floor of the cap (≥ 1, ≤ `max_concurrent`). Default `1`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_concurrent: Option<u32>,
    /// The cap a key starts with. Default: `max_concurrent`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initial_concurrent: Option<u32>,
    /// A call slower than this cuts the cap; a success within it grows
    /// it. Required, positive (`"2s"`).
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub latency_threshold: Option<Duration>,
    /// What a cut multiplies the cap by, strictly between 0 and 1.
    /// Default `0.5`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decrease_factor: Option<f64>,
}

impl AdaptiveSettings {
    /// Sets on `limit` every knob these settings set.
    fn apply(&self, mut limit: AdaptiveLimit) -> AdaptiveLimit {
        if let Some(min) = self.min_concurrent {
            limit = limit.min_concurrent(min);
        }
        if let Some(initial) = self.initial_concurrent {
            limit = limit.initial_concurrent(initial);
        }
        if let Some(threshold) = self.latency_threshold {
            limit = limit.latency_threshold(threshold);
        }
        if let Some(factor) = self.decrease_factor {
            limit = limit.decrease_factor(factor);
        }
        limit
    }
}

/// One tool's own knobs (a `[tools."name".bulkhead]` table), applied with
/// [`BulkheadBuilder::tool_settings`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BulkheadToolSettings {
    /// The tool's cap. Default: the layer's `max_concurrent`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
    /// The tool's wait for a place. Default: the layer's `max_wait`.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub max_wait: Option<Duration>,
    /// The tool's adaptive knobs, over the layer's (or makes the tool's
    /// cap adaptive when the layer's is not). Default: the layer's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adaptive: Option<AdaptiveSettings>,
}

impl<C> BulkheadBuilder<C> {
    /// Sets every knob that `settings` sets; the others keep their values.
    /// `settings.enabled` is not the builder's (see
    /// [`BulkheadSettings::enabled`]).
    #[must_use]
    pub fn settings(mut self, settings: &BulkheadSettings) -> Self {
        if let Some(max) = settings.max_concurrent {
            self = self.max_concurrent(max);
        }
        if let Some(wait) = settings.max_wait {
            self = self.max_wait(wait);
        }
        if let Some(key_by) = settings.key_by {
            self = self.key_by(key_by.into());
        }
        if let Some(bounds) = settings.bounds {
            self = self.bounds(bounds);
        }
        if let Some(adaptive) = &settings.adaptive {
            self = self.adaptive(|a| adaptive.apply(a));
        }
        self
    }

    /// Adds `tool`'s settings as a [`tool`](Self::tool) override.
    #[must_use]
    pub fn tool_settings(self, tool: impl Into<String>, settings: &BulkheadToolSettings) -> Self {
        let settings = settings.clone();
        self.tool(tool, move |mut b| {
            if let Some(max) = settings.max_concurrent {
                b = b.max_concurrent(max);
            }
            if let Some(wait) = settings.max_wait {
                b = b.max_wait(wait);
            }
            if let Some(adaptive) = &settings.adaptive {
                b = b.adaptive(|a| adaptive.apply(a));
            }
            b
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BulkheadLayer;

    #[test]
    fn tool_settings_override_and_errors_name_the_tool() {
        let tool: BulkheadToolSettings =
            serde_json::from_value(serde_json::json!({"max_concurrent": 2, "max_wait": "1s"}))
                .unwrap();
        let layer = BulkheadLayer::builder()
            .tool_settings("pdf", &tool)
            .build()
            .unwrap();
        assert_eq!(layer.max_concurrent("pdf"), 2);
        assert_eq!(layer.max_wait("pdf"), Duration::from_secs(1));
        let bad = BulkheadToolSettings {
            max_concurrent: Some(0),
            ..BulkheadToolSettings::default()
        };
        let err = BulkheadLayer::builder()
            .tool_settings("pdf", &bad)
            .build()
            .unwrap_err();
        assert_eq!(err.field(), r#"tools."pdf".max_concurrent"#);
        let unknown = serde_json::from_value::<BulkheadSettings>(serde_json::json!({"cap": 1}));
        assert!(unknown.is_err());
        let server: BulkheadSettings =
            serde_json::from_value(serde_json::json!({"key_by": "server"})).unwrap();
        assert_eq!(server.key_by, Some(KeyBySetting::Server));
    }

    #[test]
    fn adaptive_settings_apply_per_layer_and_per_tool() {
        use toolwarden_core::KeyRef;
        let settings: BulkheadSettings = serde_json::from_value(serde_json::json!({
            "max_concurrent": 8,
            "adaptive": {"latency_threshold": "1s", "initial_concurrent": 6},
        }))
        .unwrap();
        let tool: BulkheadToolSettings = serde_json::from_value(
            serde_json::json!({"max_concurrent": 4, "adaptive": {"initial_concurrent": 3}}),
        )
        .unwrap();
        let layer = BulkheadLayer::builder()
            .settings(&settings)
            .tool_settings("pdf", &tool)
            .build()
            .unwrap();
        assert_eq!(layer.current_limit(KeyRef::Tool("search")), 6);
        // The tool inherits the layer's threshold, sets its own start.
        assert_eq!(layer.current_limit(KeyRef::Tool("pdf")), 3);
        assert!(layer.is_adaptive("pdf"));
        let no_threshold: BulkheadSettings =
            serde_json::from_value(serde_json::json!({"adaptive": {}})).unwrap();
        let err = BulkheadLayer::builder()
            .settings(&no_threshold)
            .build()
            .unwrap_err();
        assert_eq!(err.field(), "adaptive.latency_threshold");
        let tool_bad: BulkheadToolSettings =
            serde_json::from_value(serde_json::json!({"adaptive": {"initial_concurrent": 11}}))
                .unwrap();
        let err = BulkheadLayer::builder()
            .settings(&settings)
            .tool_settings("pdf", &tool_bad)
            .build()
            .unwrap_err();
        assert_eq!(err.field(), r#"tools."pdf".adaptive.initial_concurrent"#);
        let unknown = serde_json::from_value::<BulkheadSettings>(
            serde_json::json!({"adaptive": {"max_concurrent": 3}}),
        );
        assert!(
            unknown.is_err(),
            "the ceiling is the section's max_concurrent"
        );
    }
}
