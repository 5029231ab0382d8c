//! The exporters, the providers on the tokio runtime, the tracing layer's
//! slot, and the rate-limited logging of export failures.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::InstrumentationScope;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::periodic_reader_with_async_runtime::PeriodicReader;
use opentelemetry_sdk::metrics::{SdkMeterProvider, Temporality};
use opentelemetry_sdk::runtime::Tokio;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{BatchConfigBuilder, SdkTracerProvider, SpanData, SpanExporter};
use opentelemetry_sdk::Resource;
use toolwarden::observability::OtlpProtocol;
use toolwarden_core::ConfigError;
use tracing_subscriber::filter::{FilterFn, Filtered};
use tracing_subscriber::{reload, Layer, Registry};

use super::{OtelRecorder, OtlpSettings, SHUTDOWN_DEADLINE};

/// The target of the spans and events exported: the observability layer's.
const EXPORTED_TARGET: &str = "toolwarden_observability";
/// The instrumentation scope of what the proxy exports.
const SCOPE: &str = "toolwarden";
/// One warning per signal per this, at most, while exports fail.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// The timeout of one export request.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Spans waiting for export at most; later ones are dropped.
const MAX_QUEUED_SPANS: usize = 2048;

type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// The tracing subscriber's place for the OpenTelemetry layer: empty (and
/// filtering everything out, so no span is built for it) until
/// [`fill`](Self::fill) puts the layer in, once the configuration is read.
#[derive(Clone)]
pub(crate) struct TracingSlot {
    handle: reload::Handle<Option<BoxedLayer>, Registry>,
    on: Arc<AtomicBool>,
}

impl fmt::Debug for TracingSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TracingSlot")
            .field("on", &self.on.load(Relaxed))
            .finish_non_exhaustive()
    }
}

/// The slot's layer, first in the subscriber (its subscriber is the bare
/// registry, so the boxed layer's type is simple).
pub(crate) type SlotLayer =
    Filtered<reload::Layer<Option<BoxedLayer>, Registry>, FilterFn<SlotFilter>, Registry>;

/// The slot's filter: the observability layer's spans and events, once filled.
pub(crate) type SlotFilter = Box<dyn Fn(&tracing::Metadata<'_>) -> bool + Send + Sync>;

impl TracingSlot {
    /// An empty slot and the layer to add to the registry first.
    pub(crate) fn new() -> (SlotLayer, TracingSlot) {
        let (layer, handle) = reload::Layer::new(None::<BoxedLayer>);
        let on = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&on);
        // The filter is cached per callsite: `fill` sets the flag, then the
        // reload rebuilds the cache.
        let filter: SlotFilter = Box::new(move |meta: &tracing::Metadata<'_>| {
            flag.load(Relaxed) && meta.target().starts_with(EXPORTED_TARGET)
        });
        let filter = FilterFn::new(filter);
        (layer.with_filter(filter), TracingSlot { handle, on })
    }

    /// Puts `export`'s tracing layer in the slot.
    pub(crate) fn fill(&self, export: &OtlpExport) -> Result<(), String> {
        let tracer = export.tracers.tracer_with_scope(
            InstrumentationScope::builder(SCOPE)
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        );
        let layer = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false);
        self.on.store(true, Relaxed);
        self.handle
            .reload(Some(Box::new(layer) as BoxedLayer))
            .map_err(|e| e.to_string())
    }
}

/// The running export: a tracer provider and a meter provider, both with
/// their exporter to the collector, exporting from tasks on the runtime.
#[derive(Debug)]
pub(crate) struct OtlpExport {
    tracers: SdkTracerProvider,
    meters: SdkMeterProvider,
}

impl OtlpExport {
    /// Builds the exporters and starts the providers' tasks. Call it within
    /// the tokio runtime. Errors name the key.
    pub(crate) fn start(settings: &OtlpSettings) -> Result<Self, ConfigError> {
        let resource = Resource::builder()
            .with_service_name(settings.service_name.clone())
            .build();
        let spans = LoggedExporter::new("traces", span_exporter(settings)?);
        let processor = BatchSpanProcessor::builder(spans, Tokio)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_scheduled_delay(settings.span_delay())
                    .with_max_queue_size(MAX_QUEUED_SPANS)
                    .build(),
            )
            .build();
        let tracers = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource.clone())
            .build();
        let metrics = LoggedExporter::new("metrics", metric_exporter(settings)?);
        let reader = PeriodicReader::builder(metrics, Tokio)
            .with_interval(settings.interval)
            .with_timeout(EXPORT_TIMEOUT)
            .build();
        let meters = SdkMeterProvider::builder()
            .with_reader(reader)
            .with_resource(resource)
            .build();
        Ok(OtlpExport { tracers, meters })
    }

    /// A `metrics` recorder that records into this export's meter.
    pub(crate) fn recorder(&self) -> OtelRecorder {
        use opentelemetry::metrics::MeterProvider as _;
        OtelRecorder::new(
            self.meters.meter_with_scope(
                InstrumentationScope::builder(SCOPE)
                    .with_version(env!("CARGO_PKG_VERSION"))
                    .build(),
            ),
        )
    }

    /// Exports what is left and stops, within [`SHUTDOWN_DEADLINE`]. The
    /// providers' shutdown waits for their tasks, so it runs on a blocking
    /// thread.
    pub(crate) async fn shutdown(self) {
        let OtlpExport { tracers, meters } = self;
        let done = tokio::task::spawn_blocking(move || {
            let traces = tracers.shutdown_with_timeout(SHUTDOWN_DEADLINE);
            let metrics = meters.shutdown_with_timeout(SHUTDOWN_DEADLINE);
            (traces, metrics)
        });
        match tokio::time::timeout(SHUTDOWN_DEADLINE * 2, done).await {
            Ok(Ok((traces, metrics))) => {
                for (signal, result) in [("traces", traces), ("metrics", metrics)] {
                    if let Err(e) = result {
                        tracing::warn!(signal, error = %e, "OpenTelemetry export: last flush failed");
                    }
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "OpenTelemetry export: shutdown failed"),
            Err(_) => tracing::warn!("OpenTelemetry export: shutdown timed out"),
        }
    }
}

fn build_error(
    signal: &str,
) -> impl Fn(opentelemetry_otlp::ExporterBuildError) -> ConfigError + '_ {
    move |e| {
        ConfigError::new(
            "otlp_endpoint",
            format!("cannot set up the {signal} exporter: {e}"),
        )
    }
}

fn metadata(
    settings: &OtlpSettings,
) -> Result<opentelemetry_otlp::tonic_types::metadata::MetadataMap, ConfigError> {
    use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
    let mut headers = HeaderMap::new();
    for (name, value) in &settings.headers {
        let invalid = || {
            ConfigError::new(
                format!("otlp_headers.{name}"),
                "not a valid gRPC metadata entry",
            )
        };
        let key = HeaderName::from_bytes(name.as_bytes()).map_err(|_| invalid())?;
        let value = HeaderValue::from_str(value).map_err(|_| invalid())?;
        headers.insert(key, value);
    }
    Ok(opentelemetry_otlp::tonic_types::metadata::MetadataMap::from_headers(headers))
}

fn http_headers(settings: &OtlpSettings) -> HashMap<String, String> {
    settings
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn span_exporter(settings: &OtlpSettings) -> Result<opentelemetry_otlp::SpanExporter, ConfigError> {
    let url = settings.signal_url("traces");
    match settings.protocol {
        OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(url)
            .with_timeout(EXPORT_TIMEOUT)
            .with_metadata(metadata(settings)?)
            .build(),
        OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(url)
            .with_timeout(EXPORT_TIMEOUT)
            .with_headers(http_headers(settings))
            .with_http_client(http_client()?)
            .build(),
    }
    .map_err(build_error("traces"))
}

fn metric_exporter(
    settings: &OtlpSettings,
) -> Result<opentelemetry_otlp::MetricExporter, ConfigError> {
    let url = settings.signal_url("metrics");
    match settings.protocol {
        OtlpProtocol::Grpc => opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .with_endpoint(url)
            .with_timeout(EXPORT_TIMEOUT)
            .with_metadata(metadata(settings)?)
            .build(),
        OtlpProtocol::HttpProtobuf => opentelemetry_otlp::MetricExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(url)
            .with_timeout(EXPORT_TIMEOUT)
            .with_headers(http_headers(settings))
            .with_http_client(http_client()?)
            .build(),
    }
    .map_err(build_error("metrics"))
}

/// The HTTP/protobuf exporters' client: the proxy's reqwest (rustls with
/// the platform's roots), no redirects.
fn http_client() -> Result<ReqwestClient, ConfigError> {
    reqwest::Client::builder()
        .timeout(EXPORT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map(ReqwestClient)
        .map_err(|e| {
            ConfigError::new(
                "otlp_endpoint",
                format!("cannot set up the HTTP client: {e}"),
            )
        })
}

/// The collector's answer is read up to this; an OTLP response is a few bytes.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone)]
struct ReqwestClient(reqwest::Client);

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for ReqwestClient {
    async fn send_bytes(
        &self,
        request: opentelemetry_http::Request<opentelemetry_http::Bytes>,
    ) -> Result<
        opentelemetry_http::Response<opentelemetry_http::Bytes>,
        opentelemetry_http::HttpError,
    > {
        let (parts, body) = request.into_parts();
        let mut response = self
            .0
            .request(parts.method, parts.uri.to_string())
            .headers(parts.headers)
            .body(body)
            .send()
            .await?;
        let mut out = opentelemetry_http::Response::builder().status(response.status());
        if let Some(headers) = out.headers_mut() {
            *headers = response.headers().clone();
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await? {
            if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err("the collector's response is too large".into());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(out.body(opentelemetry_http::Bytes::from(body))?)
    }
}

/// An exporter whose failures are logged: one warning for the first, then
/// at most one per [`FAILURE_LOG_INTERVAL`] with the count of those not
/// logged, and a line when exports succeed again. The SDK's own logs are
/// off (its `internal-logs` feature is not enabled).
pub(crate) struct LoggedExporter<E> {
    inner: E,
    signal: &'static str,
    failures: AtomicU64,
    last_logged: Mutex<Option<Instant>>,
}

impl<E> LoggedExporter<E> {
    fn new(signal: &'static str, inner: E) -> Self {
        LoggedExporter {
            inner,
            signal,
            failures: AtomicU64::new(0),
            last_logged: Mutex::new(None),
        }
    }

    fn observe(&self, result: &OTelSdkResult) {
        match result {
            Ok(()) => {
                let failed = self.failures.swap(0, Relaxed);
                if failed > 0 {
                    tracing::info!(
                        signal = self.signal,
                        failed,
                        "OpenTelemetry export: the collector accepts exports again"
                    );
                }
            }
            Err(e) => {
                let failed = self.failures.fetch_add(1, Relaxed) + 1;
                let mut last = self
                    .last_logged
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let now = Instant::now();
                if last.is_none_or(|at| now.duration_since(at) >= FAILURE_LOG_INTERVAL) {
                    *last = Some(now);
                    tracing::warn!(
                        signal = self.signal,
                        error = %e,
                        failed,
                        "OpenTelemetry export failed (calls are unaffected; logged at most once a minute)"
                    );
                }
            }
        }
    }
}

impl<E> fmt::Debug for LoggedExporter<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoggedExporter")
            .field("signal", &self.signal)
            .field("failures", &self.failures.load(Relaxed))
            .finish_non_exhaustive()
    }
}

impl<E: SpanExporter> SpanExporter for LoggedExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let result = self.inner.export(batch).await;
        self.observe(&result);
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

impl<E: PushMetricExporter> PushMetricExporter for LoggedExporter<E> {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let result = self.inner.export(metrics).await;
        self.observe(&result);
        result
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}
