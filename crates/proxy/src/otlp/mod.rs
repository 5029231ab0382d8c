//! OpenTelemetry export: the proxy's traces and metrics over OTLP, to the
//! collector of `[observability] otlp_endpoint` (feature `otlp`, on by
//! default).
//!
//! - **Traces**: the observability layer's call spans (`tools/call {tool}`,
//!   with the MCP conventions' attributes, and toolwarden's decisions as
//!   span events), through `tracing-opentelemetry` into the SDK's batch span
//!   processor, which runs on the proxy's tokio runtime. Only spans and
//!   events of the observability layer (target `toolwarden_observability`)
//!   are exported, at every level, whatever `RUST_LOG` says: `RUST_LOG`
//!   filters the log lines only.
//! - **Metrics**: every metric the proxy records through the `metrics`
//!   facade (`mcp.client.operation.duration`, `toolwarden.calls`,
//!   `toolwarden.events`, `toolwarden.circuit.state`, ...), through a small
//!   bridge ([`OtelRecorder`]) to the SDK's meter, read every
//!   `otlp_interval` by a periodic reader on the runtime. With a metrics
//!   address too, a fan-out recorder feeds Prometheus and OpenTelemetry
//!   alike.
//!
//! Exporting never blocks a call: spans wait in a bounded queue (2048; past
//! it they are dropped) and leave in batches; a collector that is down
//! costs the export task a failed request, logged at most once a minute
//! per signal. On shutdown both providers are flushed,
//! within a deadline.

#[cfg(feature = "otlp")]
mod export;
#[cfg(feature = "otlp")]
mod recorder;

use std::collections::BTreeMap;
use std::time::Duration;

use toolwarden::observability::{ObservabilitySettings, OtlpProtocol};
use toolwarden_core::ConfigError;

#[cfg(feature = "otlp")]
pub(crate) use export::{OtlpExport, TracingSlot};
#[cfg(feature = "otlp")]
pub use recorder::{OtelRecorder, DURATION_BUCKETS};

/// `service_name`'s default.
pub const DEFAULT_SERVICE_NAME: &str = "toolwarden";
/// `otlp_interval`'s default: how often metrics are exported.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);
/// The longest wait between two batches of spans (spans also leave as soon
/// as 512 have ended): `otlp_interval` when shorter.
pub const MAX_SPAN_DELAY: Duration = Duration::from_secs(5);
/// `otlp_interval`'s lower bound.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// How long shutdown waits for the last export.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(5);

/// The OTLP export a configuration asks for, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpSettings {
    /// The collector's base URL, without a trailing `/`.
    pub endpoint: String,
    /// gRPC or HTTP/protobuf.
    pub protocol: OtlpProtocol,
    /// Headers (gRPC metadata) sent with every export; names in lower case.
    pub headers: BTreeMap<String, String>,
    /// How often metrics are exported.
    pub interval: Duration,
    /// The `service.name` resource attribute.
    pub service_name: String,
}

impl OtlpSettings {
    /// The export `settings` asks for: `None` without `otlp_endpoint`. The
    /// error names the key (`otlp_endpoint`, `otlp_headers.NAME`, ...).
    pub fn from_settings(settings: &ObservabilitySettings) -> Result<Option<Self>, ConfigError> {
        let Some(endpoint) = &settings.otlp_endpoint else {
            for (set, key) in [
                (settings.otlp_protocol.is_some(), "otlp_protocol"),
                (!settings.otlp_headers.is_empty(), "otlp_headers"),
                (settings.otlp_interval.is_some(), "otlp_interval"),
                (settings.service_name.is_some(), "service_name"),
            ] {
                if set {
                    return Err(ConfigError::new(
                        key,
                        "is set but otlp_endpoint is not: nothing would be exported",
                    ));
                }
            }
            return Ok(None);
        };
        let protocol = settings.otlp_protocol.unwrap_or_default();
        let endpoint = check_endpoint(endpoint, protocol)?;
        let mut headers = BTreeMap::new();
        for (name, value) in &settings.otlp_headers {
            let key = format!("otlp_headers.{name}");
            let lower = name.to_ascii_lowercase();
            if reqwest::header::HeaderName::from_bytes(lower.as_bytes()).is_err() {
                return Err(ConfigError::new(key, "not a valid header name"));
            }
            if reqwest::header::HeaderValue::from_str(value).is_err() {
                // The value may be a secret: not repeated.
                return Err(ConfigError::new(
                    key,
                    "not a valid header value (visible ASCII only)",
                ));
            }
            headers.insert(lower, value.clone());
        }
        let interval = settings.otlp_interval.unwrap_or(DEFAULT_INTERVAL);
        if interval < MIN_INTERVAL {
            return Err(ConfigError::new(
                "otlp_interval",
                format!(
                    "must be at least {}",
                    humantime::format_duration(MIN_INTERVAL)
                ),
            ));
        }
        let service_name = settings
            .service_name
            .clone()
            .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_owned());
        if service_name.trim().is_empty() {
            return Err(ConfigError::new("service_name", "must not be empty"));
        }
        Ok(Some(OtlpSettings {
            endpoint,
            protocol,
            headers,
            interval,
            service_name,
        }))
    }

    /// How long spans wait for their batch at most.
    #[must_use]
    pub fn span_delay(&self) -> Duration {
        self.interval.min(MAX_SPAN_DELAY)
    }

    /// The URL a signal is sent to: the endpoint for gRPC, the endpoint
    /// and `/v1/traces` or `/v1/metrics` for HTTP/protobuf.
    #[must_use]
    pub fn signal_url(&self, signal: &str) -> String {
        match self.protocol {
            OtlpProtocol::Grpc => self.endpoint.clone(),
            OtlpProtocol::HttpProtobuf => format!("{}/v1/{signal}", self.endpoint),
        }
    }
}

fn check_endpoint(endpoint: &str, protocol: OtlpProtocol) -> Result<String, ConfigError> {
    let key = "otlp_endpoint";
    let url = reqwest::Url::parse(endpoint).map_err(|e| {
        ConfigError::new(
            key,
            format!("{endpoint:?} is not a URL ({e}); give one like \"http://localhost:4317\""),
        )
    })?;
    match url.scheme() {
        "http" => {}
        "https" if protocol == OtlpProtocol::HttpProtobuf => {}
        "https" => {
            return Err(ConfigError::new(
                key,
                "https is supported with otlp_protocol = \"http/protobuf\" only \
                 (gRPC export is plain http, for a collector next to the proxy)",
            ))
        }
        other => {
            return Err(ConfigError::new(
                key,
                format!("the scheme must be http or https, not {other:?}"),
            ))
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(ConfigError::new(key, "the URL has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ConfigError::new(
            key,
            "credentials go in otlp_headers, not in the URL",
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(ConfigError::new(
            key,
            "the URL must have no query or fragment",
        ));
    }
    if protocol == OtlpProtocol::Grpc && url.path() != "/" {
        return Err(ConfigError::new(
            key,
            "a gRPC endpoint has no path: give \"http://host:port\"",
        ));
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// Checks the `otlp_*` keys of `[observability]` (without the `otlp`
/// feature, that none is set).
pub(crate) fn check(settings: &ObservabilitySettings) -> Result<(), ConfigError> {
    let checked = OtlpSettings::from_settings(settings)?;
    if checked.is_some() && !cfg!(feature = "otlp") {
        return Err(ConfigError::new(
            "otlp_endpoint",
            "this toolwarden was built without OpenTelemetry export (cargo feature `otlp`)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
