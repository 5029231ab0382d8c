//! [`CoalesceSettings`] and [`CoalesceToolSettings`]: the builder's knobs as
//! serde types (feature `serde`), for configuration files.

use serde::{Deserialize, Serialize};

use crate::builder::CoalesceBuilder;

/// The layer-wide knobs of a [`CoalesceBuilder`] as a settings type (a
/// `[coalesce]` table), applied with [`CoalesceBuilder::settings`]. Keys
/// are the builder's method names; every key is optional (unset: the
/// builder's default). The catalog is not a setting: whoever assembles the
/// stack gives the layer its catalog.
///
/// ```
/// use toolwarden_coalesce::{CoalesceLayer, CoalesceSettings};
///
/// let settings: CoalesceSettings =
///     serde_json::from_value(serde_json::json!({ "per_session": true, "max_in_flight": 500 })).unwrap();
/// let layer = CoalesceLayer::builder().settings(&settings).build().unwrap();
/// assert_eq!(layer.max_in_flight(), 500);
///
/// let bad: CoalesceSettings = serde_json::from_value(serde_json::json!({ "max_in_flight": 0 })).unwrap();
/// assert_eq!(CoalesceLayer::builder().settings(&bad).build().unwrap_err().field(), "max_in_flight");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoalesceSettings {
    /// Whether the layer is used at all. The builder does not read it:
    /// whoever assembles a stack decides (the standard stack and the proxy
    /// leave coalescing out unless asked for).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Share identical calls of every tool (`true`) or of none (`false`),
    /// whatever the catalog says. Default: unset, the catalog decides.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coalesce: Option<bool>,
    /// Whether only calls of one session share a call. Default `false`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_session: Option<bool>,
    /// The most calls in flight others may join (≥ 1). Default `10000`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<usize>,
}

/// One tool's own knobs (a `[tools."name".coalesce]` table), applied with
/// [`CoalesceBuilder::tool_settings`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoalesceToolSettings {
    /// Share the tool's identical calls (`true`) or never (`false`).
    /// Default: the layer's `coalesce`, else the catalog.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coalesce: Option<bool>,
}

impl CoalesceBuilder {
    /// Sets every knob that `settings` sets; the others keep their values.
    #[must_use]
    pub fn settings(mut self, settings: &CoalesceSettings) -> Self {
        if let Some(coalesce) = settings.coalesce {
            self = self.coalesce(coalesce);
        }
        if let Some(per_session) = settings.per_session {
            self = self.per_session(per_session);
        }
        if let Some(max) = settings.max_in_flight {
            self = self.max_in_flight(max);
        }
        self
    }

    /// Adds `tool`'s settings as a [`tool`](Self::tool) override.
    #[must_use]
    pub fn tool_settings(self, tool: impl Into<String>, settings: &CoalesceToolSettings) -> Self {
        let coalesce = settings.coalesce;
        self.tool(tool, move |b| match coalesce {
            Some(coalesce) => b.coalesce(coalesce),
            None => b,
        })
    }
}
