//! [`RetrySettings`] and [`RetryToolSettings`]: the builder's knobs as serde
//! types (feature `serde`), for configuration files.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use toolwarden_core::settings::or_off;
use toolwarden_core::{Bounds, FailureClass};

use crate::backoff::Jitter;
use crate::budget::BudgetConfig;
use crate::builder::RetryBackoffBuilder;

/// Declares a settings struct with the knobs a tool may override after
/// `$extra`, so that each is documented once.
macro_rules! with_call_knobs {
    ($(#[$meta:meta])* pub struct $name:ident { $($extra:tt)* }) => {
        $(#[$meta])*
        pub struct $name {
            $($extra)*
            /// Attempts in all, the first included (1 never retries). Default `3`.
            #[serde(skip_serializing_if = "Option::is_none")]
            pub max_attempts: Option<u32>,
            /// The ceiling of the first retry's delay, doubled for each
            /// further retry. Default `"100ms"`.
            #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
            pub base_delay: Option<Duration>,
            /// The largest computed delay (≥ `base_delay`). Default `"10s"`.
            #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
            pub max_delay: Option<Duration>,
            /// How long after the first attempt started a call may still be
            /// retried (at most 24 h). Default `"30s"`.
            #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
            pub deadline: Option<Duration>,
            /// `"none"`, `"full"` (the default), `"equal"` or `"decorrelated"`
            /// (see [`Jitter`]).
            #[serde(skip_serializing_if = "Option::is_none")]
            pub jitter: Option<Jitter>,
            /// The failure classes retried: `"transient"`, `"server"` or both
            /// (the default).
            #[serde(with = "failure_classes", skip_serializing_if = "Option::is_none")]
            pub retry_on: Option<Vec<FailureClass>>,
        }
    };
}

/// Applies the call knobs that `$settings` sets to the builder `$b`.
macro_rules! apply_call_knobs {
    ($b:ident, $settings:expr) => {{
        let s = $settings;
        if let Some(v) = s.max_attempts {
            $b = $b.max_attempts(v);
        }
        if let Some(v) = s.base_delay {
            $b = $b.base_delay(v);
        }
        if let Some(v) = s.max_delay {
            $b = $b.max_delay(v);
        }
        if let Some(v) = s.deadline {
            $b = $b.deadline(v);
        }
        if let Some(v) = s.jitter {
            $b = $b.jitter(v);
        }
        if let Some(v) = &s.retry_on {
            $b = $b.retry_on(v.iter().copied());
        }
        $b
    }};
}

with_call_knobs! {
    /// The layer-wide knobs of a [`RetryBackoffBuilder`] as a settings type
    /// (a `[retry]` table), applied with [`RetryBackoffBuilder::settings`].
    /// Keys are the builder's method names; every key is optional (unset:
    /// the builder's default). Values are only read here:
    /// [`build`](RetryBackoffBuilder::build) checks them, naming the key.
    ///
    /// ```
    /// use toolwarden_retry::{RetryBackoffLayer, RetrySettings};
    ///
    /// let settings: RetrySettings = serde_json::from_value(serde_json::json!({
    ///     "max_attempts": 4,
    ///     "retry_on": ["transient"],
    ///     "budget": { "ratio": 0.1 },
    /// })).unwrap();
    /// assert!(RetryBackoffLayer::builder().settings(&settings).build().is_ok());
    ///
    /// let bad: RetrySettings =
    ///     serde_json::from_value(serde_json::json!({ "budget": { "ttl": "2h" } })).unwrap();
    /// let err = RetryBackoffLayer::builder().settings(&bad).build().unwrap_err();
    /// assert_eq!(err.field(), "budget.ttl");
    /// ```
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    pub struct RetrySettings {
        /// Whether the layer is used at all. Default `true`. The builder does
        /// not read it: whoever assembles a stack leaves the layer out when
        /// it is `false`.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub enabled: Option<bool>,
        /// The retry budget: `{ ratio = 0.2, min_per_sec = 10, ttl = "10s" }`
        /// (the default, see [`BudgetConfig`]), every key optional, or
        /// `false` for no budget (not recommended: nothing then stops a
        /// retry storm).
        #[serde(with = "or_off", skip_serializing_if = "Option::is_none")]
        pub budget: Option<Option<BudgetConfig>>,
        /// The methods other than `tools/call` that may be repeated after a
        /// failure that may have reached the server. Default
        /// [`DEFAULT_SAFE_METHODS`](crate::DEFAULT_SAFE_METHODS).
        #[serde(skip_serializing_if = "Option::is_none")]
        pub safe_methods: Option<Vec<String>>,
        /// Seeds the jitter, for reproducible delays. Default: unseeded.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub jitter_seed: Option<u64>,
        /// The bounds of per-key budgets (unused with the layer's single
        /// budget): `{ max_keys = 10000, idle_timeout = "10m" }` (the
        /// default), either key optional.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub bounds: Option<Bounds>,
    }
}

with_call_knobs! {
    /// One tool's own knobs (a `[tools."name".retry]` table), applied with
    /// [`RetryBackoffBuilder::tool_settings`]: the per-tool keys of
    /// [`RetrySettings`], documented there (unset: the layer's values), and
    /// `safe_to_repeat`.
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    pub struct RetryToolSettings {
        /// Whether the tool is safe to repeat after a failure that may have
        /// reached the server, whatever the catalog says. Default: the
        /// catalog decides.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub safe_to_repeat: Option<bool>,
    }
}

impl<C> RetryBackoffBuilder<C> {
    /// Sets every knob that `settings` sets; the others keep their values.
    /// `settings.enabled` is not the builder's (see
    /// [`RetrySettings::enabled`]).
    #[must_use]
    pub fn settings(mut self, settings: &RetrySettings) -> Self {
        match settings.budget {
            Some(Some(budget)) => self = self.budget(budget),
            Some(None) => self = self.no_budget(),
            None => {}
        }
        if let Some(methods) = &settings.safe_methods {
            self = self.safe_methods(methods.iter().cloned());
        }
        if let Some(seed) = settings.jitter_seed {
            self = self.jitter_seed(seed);
        }
        if let Some(bounds) = settings.bounds {
            self = self.bounds(bounds);
        }
        apply_call_knobs!(self, settings)
    }

    /// Gives `tool` the knobs that `settings` sets (see [`tool`](Self::tool));
    /// errors name `tools."<tool>".<key>`.
    #[must_use]
    pub fn tool_settings(self, tool: impl Into<String>, settings: &RetryToolSettings) -> Self {
        let settings = settings.clone();
        self.tool(tool, move |mut b| {
            if let Some(safe) = settings.safe_to_repeat {
                b = b.safe_to_repeat(safe);
            }
            apply_call_knobs!(b, &settings)
        })
    }
}

/// Failure classes by their lowercase names (`"transient"`, `"server"`,
/// `"client"`).
mod failure_classes {
    use super::*;

    #[derive(Clone, Copy, Serialize, Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum Name {
        Transient,
        Server,
        Client,
    }

    pub(super) fn serialize<S: Serializer>(
        classes: &Option<Vec<FailureClass>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let names: Option<Vec<Name>> = classes.as_ref().map(|classes| {
            classes
                .iter()
                .map(|class| match class {
                    FailureClass::Transient => Name::Transient,
                    FailureClass::Server => Name::Server,
                    FailureClass::Client => Name::Client,
                })
                .collect()
        });
        names.serialize(serializer)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Vec<FailureClass>>, D::Error> {
        let names = Vec::<Name>::deserialize(deserializer)?;
        Ok(Some(
            names
                .into_iter()
                .map(|name| match name {
                    Name::Transient => FailureClass::Transient,
                    Name::Server => FailureClass::Server,
                    Name::Client => FailureClass::Client,
                })
                .collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read<T: serde::de::DeserializeOwned>(json: serde_json::Value) -> T {
        serde_json::from_value(json).unwrap()
    }

    fn field_of(settings: serde_json::Value) -> String {
        let settings: RetrySettings = read(settings);
        RetryBackoffBuilder::new()
            .settings(&settings)
            .build()
            .unwrap_err()
            .field()
            .to_owned()
    }

    #[test]
    fn the_builder_checks_the_settings_and_names_the_key() {
        assert_eq!(
            field_of(serde_json::json!({ "max_attempts": 0 })),
            "max_attempts"
        );
        assert_eq!(
            field_of(serde_json::json!({ "base_delay": "2s", "max_delay": "1s" })),
            "max_delay"
        );
        assert_eq!(field_of(serde_json::json!({ "retry_on": [] })), "retry_on");
        assert_eq!(
            field_of(serde_json::json!({ "retry_on": ["client"] })),
            "retry_on"
        );
        assert_eq!(
            field_of(serde_json::json!({ "budget": { "ratio": 11.0 } })),
            "budget.ratio"
        );
        assert_eq!(
            field_of(serde_json::json!({ "bounds": { "max_keys": 0 } })),
            "bounds.max_keys"
        );
    }

    #[test]
    fn settings_set_the_builders_knobs() {
        let settings: RetrySettings = read(serde_json::json!({
            "deadline": "12s",
            "budget": false,
            "jitter": "none",
        }));
        let layer = RetryBackoffBuilder::new()
            .settings(&settings)
            .build()
            .unwrap();
        assert_eq!(layer.deadline(), Duration::from_secs(12));
        let request = toolwarden_core::jsonrpc::Request::tool_call(1, "x", serde_json::json!({}));
        assert_eq!(layer.budget_available(&request), None, "no budget");
    }

    #[test]
    fn tool_settings_are_checked_in_the_tools_section() {
        let tool: RetryToolSettings = read(serde_json::json!({
            "max_attempts": 0,
            "safe_to_repeat": true,
        }));
        let err = RetryBackoffBuilder::new()
            .tool_settings("send", &tool)
            .build()
            .unwrap_err();
        assert_eq!(err.field(), r#"tools."send".max_attempts"#);
        let ok: RetryToolSettings = read(serde_json::json!({ "max_attempts": 1 }));
        assert!(RetryBackoffBuilder::new()
            .tool_settings("send", &ok)
            .build()
            .is_ok());
    }

    #[test]
    fn values_read_and_print() {
        let settings: RetrySettings = read(serde_json::json!({
            "retry_on": ["transient", "server"],
            "jitter": "decorrelated",
            "budget": { "ttl": "20s" },
            "base_delay": "250ms",
        }));
        assert_eq!(
            settings.retry_on,
            Some(vec![FailureClass::Transient, FailureClass::Server])
        );
        assert_eq!(
            settings.budget,
            Some(Some(BudgetConfig {
                ttl: Duration::from_secs(20),
                ..BudgetConfig::default()
            }))
        );
        let json = serde_json::to_value(&settings).unwrap();
        assert_eq!(json["retry_on"], serde_json::json!(["transient", "server"]));
        assert_eq!(read::<RetrySettings>(json), settings);
        for bad in [
            serde_json::json!({ "retry_on": ["sometimes"] }),
            serde_json::json!({ "budget_ratio": 0.2 }),
            serde_json::json!({ "budget": true }),
            serde_json::json!({ "jitter": "some" }),
        ] {
            assert!(
                serde_json::from_value::<RetrySettings>(bad.clone()).is_err(),
                "{bad}"
            );
        }
        assert!(serde_json::from_value::<RetryToolSettings>(
            serde_json::json!({ "budget": false })
        )
        .is_err());
    }
}
