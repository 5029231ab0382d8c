//! Metric names, label names, descriptions, and the per-recorder cache of
//! metric handles that keeps registration off the hot path. The names and
//! labels are listed in the crate docs ("Metrics"); the cache is explained
//! on [`Cached`] and in the crate docs ("Recorders").

use std::sync::OnceLock;

use metrics::{Key, Label, Level, Metadata, Recorder, SharedString, Unit};

/// The histogram of call durations in seconds (OpenTelemetry MCP
/// conventions), `mcp.client.operation.duration`.
pub const METRIC_OPERATION_DURATION: &str = "mcp.client.operation.duration";
/// The counter of calls by outcome, `toolwarden.calls`.
pub const METRIC_CALLS: &str = "toolwarden.calls";
/// The counter of resilience events reported by the other layers,
/// `toolwarden.events`.
pub const METRIC_EVENTS: &str = "toolwarden.events";
/// The gauge of circuit state per key (0 closed, 1 half-open, 2 open),
/// `toolwarden.circuit.state`.
pub const METRIC_CIRCUIT_STATE: &str = "toolwarden.circuit.state";

/// The label of the JSON-RPC method (OpenTelemetry `mcp.method.name`).
pub const LABEL_METHOD: &str = "mcp.method.name";
/// The label of the tool of a `tools/call` (OpenTelemetry `gen_ai.tool.name`).
pub const LABEL_TOOL: &str = "gen_ai.tool.name";
/// The label of the failure kind (OpenTelemetry `error.type`); absent on success.
pub const LABEL_ERROR_TYPE: &str = "error.type";
/// The label of the outcome of a call, `outcome`.
pub const LABEL_OUTCOME: &str = "outcome";
/// The label of the name of a resilience event, `event`.
pub const LABEL_EVENT: &str = "event";
/// The label of the key (tool, breaker or limiter key) an event is about, `key`.
pub const LABEL_KEY: &str = "key";

/// The label value that stands for every tool, method or key past the
/// cardinality cap, `other`.
pub const OTHER_LABEL_VALUE: &str = "other";

/// The `outcome` label value of a call whose future was dropped before it
/// finished, `cancelled`.
pub const CANCELLED_OUTCOME: &str = "cancelled";

pub(crate) static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

/// Describes the layer's metrics (unit and help text) to the installed
/// recorder. Call it once after installing the recorder; recorders that
/// support descriptions (Prometheus: `# HELP`) then show them.
pub fn describe_metrics() {
    metrics::describe_histogram!(
        METRIC_OPERATION_DURATION,
        Unit::Seconds,
        "Duration of MCP client operations, by method, tool and error type."
    );
    metrics::describe_counter!(
        METRIC_CALLS,
        Unit::Count,
        "MCP calls by method, tool and outcome."
    );
    metrics::describe_counter!(
        METRIC_EVENTS,
        Unit::Count,
        "Resilience events (circuit transitions, rate limits, retries, loops, stale results)."
    );
    metrics::describe_gauge!(
        crate::active::METRIC_CALLS_ACTIVE,
        Unit::Count,
        "MCP calls in flight (started, not yet completed or dropped), by method and tool."
    );
    metrics::describe_gauge!(
        METRIC_CIRCUIT_STATE,
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

/// Metric handles resolved per recorder.
///
/// The `metrics` macros build a [`Key`] and ask the recorder to register it
/// on every use. The layer instead resolves each (series, outcome) handle
/// once per recorder and keeps it with the identity (address) of the
/// recorder it came from. Every record looks up the handle of the current
/// recorder ([`metrics::with_recorder`]), so a layer used before a recorder
/// was installed (or under [`metrics::with_local_recorder`]) still reports
/// to the right recorder. [`RECORDER_SLOTS`] recorders are remembered per
/// series; beyond that, handles are registered on every call.
///
/// Each slot is filled once, for one recorder, and never replaced, so a
/// lookup is an acquire load and a comparison per slot, with no lock and no
/// reference count. The recorder registers a handle outside the slot (it is
/// the user's code: it may take its own locks, or record a metric itself):
/// two threads filling a slot at once may each register, and one handle is
/// kept.
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
        let mut registered = None;
        for slot in &self.slots {
            let resolved = match slot.get() {
                Some(resolved) => resolved,
                None => {
                    // A free slot: claim it (a racing thread may fill it
                    // first, perhaps for another recorder; then keep
                    // looking, with the handle registered here).
                    let handle = registered.take().unwrap_or_else(|| register(recorder));
                    if let Err(lost) = slot.set(Resolved {
                        recorder: id,
                        handle,
                    }) {
                        registered = Some(lost.handle);
                    }
                    match slot.get() {
                        Some(resolved) => resolved,
                        None => continue,
                    }
                }
            };
            if resolved.recorder == id {
                use_handle(&resolved.handle);
                return;
            }
        }
        use_handle(&registered.unwrap_or_else(|| register(recorder)));
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

    /// The successful calls' counter of `recorder`.
    fn register(recorder: &dyn Recorder) -> metrics::Counter {
        recorder.register_counter(
            &key(METRIC_CALLS, vec![label(LABEL_OUTCOME, "success")]),
            &METADATA,
        )
    }

    #[test]
    fn handles_follow_the_current_recorder() {
        let first = PrometheusBuilder::new().build_recorder();
        let second = PrometheusBuilder::new().build_recorder();
        let cached: Cached<metrics::Counter> = Cached::default();
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

    /// A recorder's registration is its own code: one that records a metric
    /// through the same series while it registers (a wrapper counting its
    /// registrations) is served, not deadlocked on the slot being filled.
    #[test]
    fn a_registration_that_records_through_the_same_series_is_served() {
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let recorder = PrometheusBuilder::new().build_recorder();
            let cached: Cached<metrics::Counter> = Cached::default();
            let recording = |r: &dyn Recorder| {
                cached.with(r, register, |c| c.increment(1));
                register(r)
            };
            cached.with(&recorder, recording, |c| c.increment(1));
            let _ = done.send(recorder.handle().render());
        });
        let text = finished
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the registration returned (it deadlocked in the slot before)");
        assert!(
            text.contains("toolwarden_calls{outcome=\"success\"} 2"),
            "{text}"
        );
    }
}
