//! Metric names, label names, descriptions, and the per-recorder cache of
//! metric handles that keeps registration off the hot path.
//!
//! # Metrics
//!
//! | name | kind | labels |
//! |---|---|---|
//! | `mcp.client.operation.duration` | histogram, seconds | `mcp.method.name`, `gen_ai.tool.name` (tool calls only), `error.type` (failures only) |
//! | `toolwarden.calls` | counter | `mcp.method.name`, `gen_ai.tool.name` (tool calls only), `outcome` |
//! | `toolwarden.events` | counter | `event`, `key` (events about a key or tool) |
//! | `toolwarden.circuit.state` | gauge: 0 closed, 1 half-open, 2 open | `key` |
//!
//! `outcome` is one of `success`, `tool_error`, `protocol_error`,
//! `transport`, `timeout`, `rejected` ([`OutcomeKind::as_str`]), or
//! `cancelled` when the caller dropped the call before it finished.
//! `error.type` follows OpenTelemetry: it is absent on success and otherwise
//! the outcome (`tool_error`, `protocol_error`, ...). Cancelled calls are
//! counted but not timed: the operation never ended.
//!
//! Prometheus renders the dots as underscores (`mcp_client_operation_duration`,
//! `toolwarden_calls`, `gen_ai_tool_name`, ...).
//!
//! # Handle cache
//!
//! The `metrics` macros build a [`Key`] and ask the recorder to register it
//! on every use. The layer instead resolves each (series, outcome) handle
//! once per recorder and keeps it with the identity (address) of the
//! recorder it came from. Every record looks up the handle of the current
//! recorder ([`metrics::with_recorder`]), so a layer used before a recorder
//! was installed (or under [`metrics::with_local_recorder`]) still reports
//! to the right recorder. Two recorders are remembered per series;
//! beyond that (only tests switch recorders that often), handles are
//! registered on every call. Two recorders that share an address
//! (zero-sized recorders, or a local recorder dropped and another created
//! in the same place) cannot be told apart; use recorders that live as long
//! as the layer.
//!
//! [`OutcomeKind::as_str`]: toolwarden_core::OutcomeKind::as_str

use std::sync::OnceLock;

use metrics::{Key, Label, Level, Metadata, Recorder, SharedString, Unit};

/// Metric names.
pub mod names {
    /// Histogram of call durations in seconds (OpenTelemetry MCP conventions).
    pub const OPERATION_DURATION: &str = "mcp.client.operation.duration";
    /// Counter of calls by outcome.
    pub const CALLS: &str = "toolwarden.calls";
    /// Counter of resilience events reported by the other layers.
    pub const EVENTS: &str = "toolwarden.events";
    /// Gauge of circuit state per key: 0 closed, 1 half-open, 2 open.
    pub const CIRCUIT_STATE: &str = "toolwarden.circuit.state";
}

/// Label names.
pub mod labels {
    /// The JSON-RPC method (OpenTelemetry `mcp.method.name`).
    pub const METHOD: &str = "mcp.method.name";
    /// The tool of a `tools/call` (OpenTelemetry `gen_ai.tool.name`).
    pub const TOOL: &str = "gen_ai.tool.name";
    /// The failure kind (OpenTelemetry `error.type`); absent on success.
    pub const ERROR_TYPE: &str = "error.type";
    /// The outcome of a call.
    pub const OUTCOME: &str = "outcome";
    /// The name of a resilience event.
    pub const EVENT: &str = "event";
    /// The key (tool, breaker or limiter key) an event is about.
    pub const KEY: &str = "key";
}

/// The label value that stands for every tool, method or key past the
/// cardinality cap.
pub const OTHER: &str = "other";

/// The outcome label of a call whose future was dropped before it finished.
pub const CANCELLED: &str = "cancelled";

pub(crate) static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

/// Describes the layer's metrics (unit and help text) to the installed
/// recorder. Call it once after installing the recorder; recorders that
/// support descriptions (Prometheus: `# HELP`) then show them.
pub fn describe_metrics() {
    metrics::describe_histogram!(
        names::OPERATION_DURATION,
        Unit::Seconds,
        "Duration of MCP client operations, by method, tool and error type."
    );
    metrics::describe_counter!(
        names::CALLS,
        Unit::Count,
        "MCP calls by method, tool and outcome."
    );
    metrics::describe_counter!(
        names::EVENTS,
        Unit::Count,
        "Resilience events (circuit transitions, rate limits, retries, loops, stale results)."
    );
    metrics::describe_gauge!(
        names::CIRCUIT_STATE,
        "Circuit state per key: 0 closed, 1 half-open, 2 open."
    );
}

/// The identity of a recorder: its address.
#[inline]
pub(crate) fn recorder_id(recorder: &dyn Recorder) -> usize {
    std::ptr::from_ref(recorder).cast::<()>().addr()
}

/// How many recorders a handle cache remembers; past that, handles are
/// registered on every use (correct, slower). Production sees one or two
/// (the no-op recorder before installation, then the real one).
const RECORDER_SLOTS: usize = 2;

/// Metric handles resolved per recorder. See the [module docs](self).
///
/// Each slot is filled once, for one recorder, and never replaced, so a
/// lookup is an acquire load and a comparison per slot, with no lock and no
/// reference count.
pub(crate) struct Cached<T> {
    slots: [OnceLock<Resolved<T>>; RECORDER_SLOTS],
}

struct Resolved<T> {
    recorder: usize,
    handle: T,
}

impl<T> Default for Cached<T> {
    fn default() -> Self {
        Cached {
            slots: Default::default(),
        }
    }
}

impl<T> Cached<T> {
    /// Runs `use_handle` on the handle for `recorder`, registering it with
    /// `register` first when no slot holds one for that recorder.
    #[inline]
    pub(crate) fn with(
        &self,
        recorder: &dyn Recorder,
        register: impl Fn(&dyn Recorder) -> T,
        use_handle: impl FnOnce(&T),
    ) {
        let id = recorder_id(recorder);
        for slot in &self.slots {
            let resolved = match slot.get() {
                Some(resolved) => resolved,
                // A free slot: claim it (a racing thread may fill it first,
                // perhaps for another recorder; then keep looking).
                None => slot.get_or_init(|| Resolved {
                    recorder: id,
                    handle: register(recorder),
                }),
            };
            if resolved.recorder == id {
                use_handle(&resolved.handle);
                return;
            }
        }
        use_handle(&register(recorder));
    }
}

/// Builds a metric key.
pub(crate) fn key(name: &'static str, labels: Vec<Label>) -> Key {
    Key::from_parts(name, labels)
}

/// A label with a static name.
pub(crate) fn label(name: &'static str, value: impl Into<SharedString>) -> Label {
    Label::new(name, value.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_exporter_prometheus::PrometheusBuilder;

    #[test]
    fn handles_follow_the_current_recorder() {
        let first = PrometheusBuilder::new().build_recorder();
        let second = PrometheusBuilder::new().build_recorder();
        let cached: Cached<metrics::Counter> = Cached::default();
        let register = |r: &dyn Recorder| {
            r.register_counter(
                &key(names::CALLS, vec![label(labels::OUTCOME, "success")]),
                &METADATA,
            )
        };
        let bump = || metrics::with_recorder(|r| cached.with(r, register, |c| c.increment(1)));
        // Before any recorder: a no-op handle, not kept past the next recorder.
        bump();
        metrics::with_local_recorder(&first, || {
            bump();
            bump();
        });
        metrics::with_local_recorder(&second, bump);
        // More recorders than slots: still counted, into the right one.
        let more: Vec<_> = (0..RECORDER_SLOTS)
            .map(|_| PrometheusBuilder::new().build_recorder())
            .collect();
        for recorder in &more {
            metrics::with_local_recorder(recorder, bump);
        }
        let count = |text: String| {
            text.lines()
                .find(|l| l.starts_with("toolwarden_calls{"))
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_owned)
        };
        assert_eq!(count(first.handle().render()).as_deref(), Some("2"));
        assert_eq!(count(second.handle().render()).as_deref(), Some("1"));
        for recorder in &more {
            assert_eq!(count(recorder.handle().render()).as_deref(), Some("1"));
        }
        metrics::with_local_recorder(&first, bump);
        assert_eq!(count(first.handle().render()).as_deref(), Some("3"));
    }
}
