//! [`FallbackCacheSettings`]: the builder's knobs as a serde type (feature
//! `serde`), for configuration files.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::builder::FallbackCacheBuilder;

/// The knobs of a [`FallbackCacheBuilder`] as a settings type (a
/// `[fallback_cache]` table), applied with [`FallbackCacheBuilder::settings`].
/// Keys are the builder's method names; every key is optional (unset: the
/// builder's default). Values are only read here:
/// [`build`](FallbackCacheBuilder::build) checks them, naming the key.
///
/// ```
/// use toolwarden_fallback_cache::{FallbackCacheLayer, FallbackCacheSettings};
///
/// let settings: FallbackCacheSettings = serde_json::from_value(serde_json::json!({
///     "max_staleness": "10m",
///     "fresh_ttl": "30s",
/// })).unwrap();
/// assert!(FallbackCacheLayer::builder().settings(&settings).build().is_ok());
///
/// let bad: FallbackCacheSettings =
///     serde_json::from_value(serde_json::json!({ "max_entries": 0 })).unwrap();
/// let err = FallbackCacheLayer::builder().settings(&bad).build().unwrap_err();
/// assert_eq!(err.field(), "max_entries");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FallbackCacheSettings {
    /// Whether the layer is used at all. Default `true`. The builder does
    /// not read it: whoever assembles a stack leaves the layer out when it
    /// is `false`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// How old a stored result may be and still be served when a call
    /// fails. Default `"5m"`.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub max_staleness: Option<Duration>,
    /// A stored result younger than this is served without calling the
    /// tool (at most `max_staleness`). Default: none (only failures are
    /// answered from the cache).
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub fresh_ttl: Option<Duration>,
    /// Whether a stored result is served only within the session that
    /// stored it. Default `false`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_session: Option<bool>,
    /// The most results kept, between 1 and
    /// [`MAX_MAX_ENTRIES`](crate::MAX_MAX_ENTRIES). Default `4096`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_entries: Option<usize>,
    /// The most bytes of results kept (at least 1 KiB). Default `33554432`
    /// (32 MiB).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<usize>,
    /// Whether a stale result carries a note saying how old it is. Default `true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale_note: Option<bool>,
    /// Whether a failure with nothing to serve becomes a structured error
    /// result. Default `true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub degrade: Option<bool>,
    /// Other tools suggested in a structured error (`0`: none). Default `3`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alternatives: Option<usize>,
    /// The relevance (0 to 1) a tool needs to be suggested: below it,
    /// nothing rather than an unrelated tool. Default `0.15`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_relevance: Option<f64>,
}

impl<C> FallbackCacheBuilder<C> {
    /// Sets every knob that `settings` sets; the others keep their values.
    /// `settings.enabled` is not the builder's (see
    /// [`FallbackCacheSettings::enabled`]).
    #[must_use]
    pub fn settings(mut self, settings: &FallbackCacheSettings) -> Self {
        if let Some(d) = settings.max_staleness {
            self = self.max_staleness(d);
        }
        if settings.fresh_ttl.is_some() {
            self = self.fresh_ttl(settings.fresh_ttl);
        }
        if let Some(per_session) = settings.per_session {
            self = self.per_session(per_session);
        }
        if let Some(n) = settings.max_entries {
            self = self.max_entries(n);
        }
        if let Some(n) = settings.max_bytes {
            self = self.max_bytes(n);
        }
        if let Some(note) = settings.stale_note {
            self = self.stale_note(note);
        }
        if let Some(degrade) = settings.degrade {
            self = self.degrade(degrade);
        }
        if let Some(n) = settings.alternatives {
            self = self.alternatives(n);
        }
        if let Some(floor) = settings.min_relevance {
            self = self.min_relevance(floor);
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(json: serde_json::Value) -> String {
        let settings: FallbackCacheSettings = serde_json::from_value(json).unwrap();
        FallbackCacheBuilder::default()
            .settings(&settings)
            .build()
            .unwrap_err()
            .field()
            .to_owned()
    }

    #[test]
    fn the_builder_checks_the_settings_and_names_the_key() {
        assert_eq!(
            field_of(serde_json::json!({ "max_staleness": "0s" })),
            "max_staleness"
        );
        assert_eq!(
            field_of(serde_json::json!({ "fresh_ttl": "1h", "max_staleness": "1m" })),
            "fresh_ttl, max_staleness"
        );
        assert_eq!(
            field_of(serde_json::json!({ "max_bytes": 10 })),
            "max_bytes"
        );
        let fine: FallbackCacheSettings = serde_json::from_value(serde_json::json!({
            "max_entries": 10, "degrade": false, "alternatives": 0,
        }))
        .unwrap();
        assert!(FallbackCacheBuilder::default()
            .settings(&fine)
            .build()
            .is_ok());
    }

    #[test]
    fn unknown_keys_are_refused_and_values_round_trip() {
        assert!(serde_json::from_value::<FallbackCacheSettings>(
            serde_json::json!({ "max_staleness": "5m", "ttl": "1s" })
        )
        .is_err());
        let settings: FallbackCacheSettings = serde_json::from_value(serde_json::json!({
            "fresh_ttl": "10s", "max_bytes": 2048,
        }))
        .unwrap();
        let json = serde_json::to_value(&settings).unwrap();
        assert_eq!(
            json,
            serde_json::json!({ "fresh_ttl": "10s", "max_bytes": 2048 })
        );
    }
}
