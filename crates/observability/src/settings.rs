//! [`ObservabilitySettings`]: the builder's knobs as a serde type (feature
//! `serde`), for configuration files.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::builder::ObservabilityBuilder;

/// The knobs of an [`ObservabilityBuilder`] as a settings type (an
/// `[observability]` table), applied with [`ObservabilityBuilder::settings`].
/// Keys are the builder's method names; every key is optional (unset: the
/// builder's default). Values are only read here:
/// [`build`](ObservabilityBuilder::build) checks them, naming the key.
///
/// ```
/// use toolwarden_observability::{ObservabilityLayer, ObservabilitySettings};
///
/// let settings: ObservabilitySettings =
///     serde_json::from_value(serde_json::json!({ "max_tools": 50 })).unwrap();
/// assert!(ObservabilityLayer::builder().settings(&settings).build().is_ok());
///
/// let bad: ObservabilitySettings =
///     serde_json::from_value(serde_json::json!({ "recent_window": 0 })).unwrap();
/// let err = ObservabilityLayer::builder().settings(&bad).build().unwrap_err();
/// assert_eq!(err.field(), "recent_window");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ObservabilitySettings {
    /// Whether the layer is used at all. Default `true`. The builder does
    /// not read it: whoever assembles a stack leaves the layer out when it
    /// is `false`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Distinct tool names labelled by name; later ones are `other`. At most
    /// [`MAX_TOOLS_LIMIT`](crate::MAX_TOOLS_LIMIT). Default `100`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tools: Option<usize>,
    /// Distinct methods labelled by name; later ones are `other`. At most
    /// [`MAX_METHODS_LIMIT`](crate::MAX_METHODS_LIMIT). Default `32`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_methods: Option<usize>,
    /// The latest completed calls of a tool its recent failure rate covers.
    /// At most [`RECENT_WINDOW_LIMIT`](crate::RECENT_WINDOW_LIMIT). Default `100`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recent_window: Option<usize>,
    /// Whether the call span records the argument fingerprint. Default `true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub span_fingerprint: Option<bool>,
    /// The OpenTelemetry collector to export traces and metrics to over
    /// OTLP: its base URL, `http://host:4317` (gRPC) or
    /// `http://host:4318` (HTTP/protobuf, where `/v1/traces` and
    /// `/v1/metrics` are appended). Default unset: nothing is exported. The
    /// `otlp_*` keys and `service_name` are not the builder's: whoever
    /// installs the exporter reads them (the `toolwarden` proxy does; a
    /// library user wires `tracing-opentelemetry` as the crate docs show).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// How to reach `otlp_endpoint`: `"grpc"` or `"http/protobuf"`.
    /// Default `"grpc"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_protocol: Option<OtlpProtocol>,
    /// Headers sent with every export (gRPC metadata or HTTP headers), for
    /// a collector's API key: `{ "x-api-key" = "..." }`. Default none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub otlp_headers: BTreeMap<String, String>,
    /// How often metrics are exported; spans leave in batches at least
    /// every `min(otlp_interval, 5s)`. Default `"60s"`.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub otlp_interval: Option<Duration>,
    /// The `service.name` resource attribute of what is exported. Default
    /// `"toolwarden"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
}

/// The OTLP transport of [`ObservabilitySettings::otlp_protocol`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum OtlpProtocol {
    /// OTLP over gRPC (the collector's port 4317). The default.
    #[default]
    #[serde(rename = "grpc")]
    Grpc,
    /// OTLP over HTTP with protobuf bodies (the collector's port 4318).
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

impl<C> ObservabilityBuilder<C> {
    /// Sets every knob that `settings` sets; the others keep their values.
    /// `settings.enabled` is not the builder's (see
    /// [`ObservabilitySettings::enabled`]).
    #[must_use]
    pub fn settings(mut self, settings: &ObservabilitySettings) -> Self {
        if let Some(n) = settings.max_tools {
            self = self.max_tools(n);
        }
        if let Some(n) = settings.max_methods {
            self = self.max_methods(n);
        }
        if let Some(n) = settings.recent_window {
            self = self.recent_window(n);
        }
        if let Some(on) = settings.span_fingerprint {
            self = self.span_fingerprint(on);
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builder_checks_the_settings_and_names_the_key() {
        for (json, field) in [
            (serde_json::json!({ "max_tools": 0 }), "max_tools"),
            (serde_json::json!({ "max_methods": 100_000 }), "max_methods"),
            (serde_json::json!({ "recent_window": 0 }), "recent_window"),
        ] {
            let settings: ObservabilitySettings = serde_json::from_value(json).unwrap();
            let err = ObservabilityBuilder::new()
                .settings(&settings)
                .build()
                .unwrap_err();
            assert_eq!(err.field(), field);
        }
        assert!(serde_json::from_value::<ObservabilitySettings>(
            serde_json::json!({ "max_tool_labels": 5 })
        )
        .is_err());
    }
}
