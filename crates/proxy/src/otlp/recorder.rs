//! [`OtelRecorder`]: the `metrics` facade's recorder over an OpenTelemetry
//! meter.
//!
//! A bridge of our own rather than a crate: the one published
//! (`metrics-exporter-opentelemetry`) panics on a poisoned lock, drops
//! gauge increments' history and gives histograms the SDK's default
//! millisecond-sized buckets, while the MCP conventions time operations in
//! seconds. This one is a hundred lines: counters become OTel counters,
//! gauges OTel gauges (increments kept in an atomic and the new value
//! recorded), histograms OTel histograms with the conventions' second
//! buckets ([`DURATION_BUCKETS`]). Each `register_*` builds the instrument
//! (the SDK returns the same one for a name it knows) and keeps the labels
//! as attributes; the observability layer registers each series once and
//! keeps the handle, so nothing is looked up per call.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata,
    SharedString, Unit,
};
use opentelemetry::metrics::Meter;
use opentelemetry::KeyValue;

/// Histogram bucket boundaries for durations in seconds: the ones the
/// OpenTelemetry MCP conventions advise for `mcp.*.operation.duration`.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// Descriptions kept at most (one per metric name; the proxy has a dozen).
const MAX_DESCRIPTIONS: usize = 256;

/// A metric's unit and description, from `describe_*`.
type Description = (Option<Unit>, SharedString);

/// A `metrics` recorder that records into an OpenTelemetry [`Meter`].
#[derive(Clone, Debug)]
pub struct OtelRecorder {
    meter: Meter,
    described: Arc<Mutex<HashMap<KeyName, Description>>>,
}

impl OtelRecorder {
    /// Records into `meter`.
    #[must_use]
    pub fn new(meter: Meter) -> Self {
        OtelRecorder {
            meter,
            described: Arc::default(),
        }
    }

    fn describe(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        let mut described = self
            .described
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if described.len() < MAX_DESCRIPTIONS || described.contains_key(&key) {
            described.insert(key, (unit, description));
        }
    }

    fn description(&self, key: &Key) -> Option<Description> {
        self.described
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key.name())
            .cloned()
    }
}

fn attributes(key: &Key) -> Vec<KeyValue> {
    key.labels()
        .map(|label| KeyValue::new(label.key().to_owned(), label.value().to_owned()))
        .collect()
}

/// The unit as OpenTelemetry spells it (UCUM): `s`, `ms`, `By`, `1`.
fn unit_label(unit: Unit) -> &'static str {
    match unit {
        Unit::Seconds => "s",
        Unit::Milliseconds => "ms",
        Unit::Microseconds => "us",
        Unit::Nanoseconds => "ns",
        Unit::Bytes => "By",
        Unit::Count => "1",
        Unit::Percent => "%",
        other => other.as_canonical_label(),
    }
}

impl metrics::Recorder for OtelRecorder {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.describe(key, unit, description);
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.describe(key, unit, description);
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.describe(key, unit, description);
    }

    fn register_counter(&self, key: &Key, _metadata: &Metadata<'_>) -> Counter {
        let mut builder = self.meter.u64_counter(key.name().to_owned());
        if let Some((unit, description)) = self.description(key) {
            if let Some(unit) = unit {
                builder = builder.with_unit(unit_label(unit));
            }
            builder = builder.with_description(description.into_owned());
        }
        Counter::from_arc(Arc::new(OtelCounter {
            counter: builder.build(),
            attributes: attributes(key),
            total: AtomicU64::new(0),
        }))
    }

    fn register_gauge(&self, key: &Key, _metadata: &Metadata<'_>) -> Gauge {
        let mut builder = self.meter.f64_gauge(key.name().to_owned());
        if let Some((unit, description)) = self.description(key) {
            if let Some(unit) = unit {
                builder = builder.with_unit(unit_label(unit));
            }
            builder = builder.with_description(description.into_owned());
        }
        Gauge::from_arc(Arc::new(OtelGauge {
            gauge: builder.build(),
            attributes: attributes(key),
            value: AtomicU64::new(0f64.to_bits()),
        }))
    }

    fn register_histogram(&self, key: &Key, _metadata: &Metadata<'_>) -> Histogram {
        let mut builder = self.meter.f64_histogram(key.name().to_owned());
        let described = self.description(key);
        let unit = described.as_ref().and_then(|(unit, _)| *unit);
        // Durations are in seconds here (the observability layer's are),
        // described or not.
        if unit == Some(Unit::Seconds) || (unit.is_none() && key.name().ends_with(".duration")) {
            builder = builder
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .with_unit("s");
        } else if let Some(unit) = unit {
            builder = builder.with_unit(unit_label(unit));
        }
        if let Some((_, description)) = described {
            builder = builder.with_description(description.into_owned());
        }
        Histogram::from_arc(Arc::new(OtelHistogram {
            histogram: builder.build(),
            attributes: attributes(key),
        }))
    }
}

struct OtelCounter {
    counter: opentelemetry::metrics::Counter<u64>,
    attributes: Vec<KeyValue>,
    /// For `absolute`: what was added so far.
    total: AtomicU64,
}

impl CounterFn for OtelCounter {
    fn increment(&self, value: u64) {
        self.total.fetch_add(value, Relaxed);
        self.counter.add(value, &self.attributes);
    }

    fn absolute(&self, value: u64) {
        let before = self.total.fetch_max(value, Relaxed);
        if value > before {
            self.counter.add(value - before, &self.attributes);
        }
    }
}

struct OtelGauge {
    gauge: opentelemetry::metrics::Gauge<f64>,
    attributes: Vec<KeyValue>,
    /// The current value's bits, for increments.
    value: AtomicU64,
}

impl OtelGauge {
    fn add(&self, delta: f64) {
        let mut new = 0.0;
        let _ = self.value.fetch_update(Relaxed, Relaxed, |bits| {
            new = f64::from_bits(bits) + delta;
            Some(new.to_bits())
        });
        self.gauge.record(new, &self.attributes);
    }
}

impl GaugeFn for OtelGauge {
    fn increment(&self, value: f64) {
        self.add(value);
    }

    fn decrement(&self, value: f64) {
        self.add(-value);
    }

    fn set(&self, value: f64) {
        self.value.store(value.to_bits(), Relaxed);
        self.gauge.record(value, &self.attributes);
    }
}

struct OtelHistogram {
    histogram: opentelemetry::metrics::Histogram<f64>,
    attributes: Vec<KeyValue>,
}

impl HistogramFn for OtelHistogram {
    fn record(&self, value: f64) {
        self.histogram.record(value, &self.attributes);
    }
}
