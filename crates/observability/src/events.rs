//! The event sink ([`ObservabilityEvents`]) that turns the other layers'
//! resilience events into metrics, statistics and span fields, and the
//! bounded per-key state behind it.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;

use metrics::{Counter, Gauge, SharedString};
use toolwarden_core::{Bounds, CircuitState, Event, EventSink, Key, KeyRef, KeyedState};

use crate::instruments::{
    self, Cached, LABEL_EVENT, LABEL_KEY, METADATA, METRIC_CIRCUIT_STATE, METRIC_EVENTS,
    OTHER_LABEL_VALUE,
};
use crate::registry::Shared;

/// Every event name the sink counts in the snapshot, in slot order.
pub(crate) const EVENT_NAMES: [&str; 15] = [
    "circuit_opened",
    "circuit_half_opened",
    "circuit_closed",
    "rate_limited",
    "retried",
    "retry_budget_exhausted",
    "loop_warned",
    "loop_detected",
    "stale_served",
    "degraded",
    "bulkhead_full",
    "bulkhead_limit_changed",
    "coalesced",
    "hedged",
    "sync_failed",
];

fn event_index(name: &str) -> Option<usize> {
    EVENT_NAMES.iter().position(|n| *n == name)
}

fn circuit_state(event: &Event<'_>) -> Option<CircuitState> {
    match event {
        Event::CircuitOpened { .. } => Some(CircuitState::Open),
        Event::CircuitHalfOpened { .. } => Some(CircuitState::HalfOpen),
        Event::CircuitClosed { .. } => Some(CircuitState::Closed),
        _ => None,
    }
}

const CIRCUIT_UNKNOWN: u8 = 0;

fn encode(state: CircuitState) -> u8 {
    match state {
        CircuitState::Closed => 1,
        CircuitState::HalfOpen => 2,
        CircuitState::Open => 3,
        CircuitState::Disabled => 4,
        CircuitState::ForcedOpen => 5,
        CircuitState::MetricsOnly => 6,
    }
}

fn decode(value: u8) -> Option<CircuitState> {
    match value {
        1 => Some(CircuitState::Closed),
        2 => Some(CircuitState::HalfOpen),
        3 => Some(CircuitState::Open),
        4 => Some(CircuitState::Disabled),
        5 => Some(CircuitState::ForcedOpen),
        6 => Some(CircuitState::MetricsOnly),
        _ => None,
    }
}

/// The event series of one key.
pub(crate) struct EventSeries {
    key: Option<SharedString>,
    overflow: bool,
    counters: [Cached<Counter>; EVENT_NAMES.len()],
    gauge: Cached<Gauge>,
    circuit: AtomicU8,
}

impl EventSeries {
    fn new(key: Option<SharedString>, overflow: bool) -> Self {
        EventSeries {
            key,
            overflow,
            counters: Default::default(),
            gauge: Cached::default(),
            circuit: AtomicU8::new(CIRCUIT_UNKNOWN),
        }
    }

    fn labels(&self, event: &'static str) -> Vec<metrics::Label> {
        let mut out = vec![instruments::label(LABEL_EVENT, event)];
        if let Some(key) = &self.key {
            out.push(instruments::label(LABEL_KEY, key.clone()));
        }
        out
    }

    fn count(&self, name: &'static str, slot: Option<usize>) {
        let register = |r: &dyn metrics::Recorder| {
            r.register_counter(
                &instruments::key(METRIC_EVENTS, self.labels(name)),
                &METADATA,
            )
        };
        metrics::with_recorder(|recorder| match slot {
            Some(i) => self.counters[i].with(recorder, register, |c| c.increment(1)),
            // An event added to the core after this crate: counted, not cached.
            None => register(recorder).increment(1),
        });
    }

    fn set_circuit(&self, state: CircuitState) {
        self.circuit.store(encode(state), Relaxed);
        if self.overflow {
            return;
        }
        let Some(key) = &self.key else { return };
        metrics::with_recorder(|recorder| {
            self.gauge.with(
                recorder,
                |r| {
                    let labels = vec![instruments::label(LABEL_KEY, key.clone())];
                    r.register_gauge(&instruments::key(METRIC_CIRCUIT_STATE, labels), &METADATA)
                },
                |g| g.set(state.gauge_value()),
            );
        });
    }
}

/// Event counters and per-key series, bounded like the tool set.
pub(crate) struct EventState {
    keys: KeyedState<EventSeries>,
    unkeyed: EventSeries,
    totals: [AtomicU64; EVENT_NAMES.len()],
}

impl EventState {
    pub(crate) fn new(max_keys: usize) -> Self {
        EventState {
            keys: KeyedState::new(
                Bounds::max_keys(max_keys).idle_timeout(None),
                |key| match key {
                    Key::Tool(name) => {
                        EventSeries::new(Some(SharedString::from(name.clone())), false)
                    }
                    _ => EventSeries::new(Some(SharedString::const_str(OTHER_LABEL_VALUE)), true),
                },
            ),
            unkeyed: EventSeries::new(None, false),
            totals: Default::default(),
        }
    }

    fn record(&self, event: &Event<'_>) {
        let name = event.name();
        let slot = event_index(name);
        if let Some(i) = slot {
            self.totals[i].fetch_add(1, Relaxed);
        }
        let entry = event.subject().map(|s| self.keys.entry(KeyRef::Tool(s)));
        let series = entry.as_deref().unwrap_or(&self.unkeyed);
        series.count(name, slot);
        if let Some(state) = circuit_state(event) {
            series.set_circuit(state);
        }
    }

    pub(crate) fn totals(&self) -> BTreeMap<String, u64> {
        EVENT_NAMES
            .iter()
            .zip(&self.totals)
            .map(|(name, n)| ((*name).to_owned(), n.load(Relaxed)))
            .collect()
    }

    pub(crate) fn circuits(&self) -> BTreeMap<String, CircuitState> {
        let mut out = BTreeMap::new();
        self.keys.for_each(|key, series| {
            if let (Key::Tool(name), Some(state)) = (key, decode(series.circuit.load(Relaxed))) {
                out.insert(name.to_string(), state);
            }
        });
        out
    }
}

/// An [`EventSink`] feeding the layer's metrics, statistics and spans with
/// the other layers' resilience events.
///
/// Get it from [`ObservabilityLayer::event_sink`] (or all of
/// [`ObservabilityLayer::events`]) and add it to the [`Events`] you give the
/// other layers. For each event it:
///
/// - increments `toolwarden.events{event, key}`: `event` is the event's name
///   ([`Event::name`]: `circuit_opened`, `circuit_half_opened`,
///   `circuit_closed`, `rate_limited`, `retried`, `retry_budget_exhausted`,
///   `loop_warned`, `loop_detected`, `stale_served`, `degraded`,
///   `bulkhead_full`, `bulkhead_limit_changed`, `coalesced`, `hedged`, `sync_failed`) and `key` its subject ([`Event::subject`]: a tool or
///   breaker key; events without one, like `sync_failed`, have no `key`);
/// - on circuit events, sets the gauge `toolwarden.circuit.state{key}` to 0
///   (closed), 1 (half-open) or 2 (open);
/// - counts the event in the [stats snapshot](crate::StatsSnapshot) (totals
///   by name, and the last circuit state per key);
/// - on `retried`, records the attempt about to be made in the `attempt`
///   field of the current span, which is the layer's call span when the retry
///   layer sits below it (events are emitted while the layer polls the call);
/// - emits a `DEBUG` tracing event named `toolwarden.{event}`
///   (`toolwarden.retried`, `toolwarden.circuit_opened`, ...). Emitted while
///   the call is polled, it lands in the layer's call span, so under
///   `tracing-opentelemetry` each decision is a **span event** of the call's
///   span. Its attributes: `toolwarden.event` (the name), `toolwarden.key`
///   (the subject, when there is one), and by event
///   `toolwarden.retry_after_ms` (`circuit_opened`: how long the circuit
///   stays open; `rate_limited`: when a token is available),
///   `toolwarden.attempt` and `toolwarden.delay_ms` (`retried`: the attempt
///   about to be made and the backoff before it), `toolwarden.repeats`
///   (`loop_warned`, `loop_detected`), `toolwarden.age_ms` (`stale_served`:
///   the age of the result served). A call refused without an event of its
///   own (an open circuit refuses without reopening) shows as the span's
///   `outcome = rejected` and `error.type = rejected`, with
///   `toolwarden.rejected_by = circuit_breaker` when the refusal reaches the
///   layer as an error (no fallback cache rendering it).
///
/// Keys share the layer's cardinality cap: the first `max_tools` distinct
/// keys are labelled by name, later ones `other` (and get no gauge, since
/// one gauge cannot hold many circuits' states). Cloning the sink is cheap;
/// clones share state with the layer they came from.
///
/// ```
/// use std::time::Duration;
/// use toolwarden_core::{Event, Events};
/// use toolwarden_observability::{CircuitState, ObservabilityLayer};
///
/// let layer = ObservabilityLayer::new();
/// let events = Events::new().with(layer.event_sink()); // give these to the other layers
/// events.emit(&Event::CircuitOpened { key: "search", retry_after: Duration::from_secs(30) });
/// events.emit(&Event::CircuitHalfOpened { key: "search" });
/// let snapshot = layer.stats().snapshot();
/// assert_eq!(snapshot.events["circuit_opened"], 1);
/// assert_eq!(snapshot.events["circuit_half_opened"], 1);
/// assert_eq!(snapshot.circuits["search"], CircuitState::HalfOpen);
/// ```
///
/// [`ObservabilityLayer::event_sink`]: crate::ObservabilityLayer::event_sink
/// [`ObservabilityLayer::events`]: crate::ObservabilityLayer::events
/// [`Events`]: toolwarden_core::Events
#[derive(Clone)]
pub struct ObservabilityEvents {
    pub(crate) shared: Arc<Shared>,
}

impl EventSink for ObservabilityEvents {
    fn on_event(&self, event: &Event<'_>) {
        self.shared.events.record(event);
        if let Event::Retried { attempt, .. } = event {
            tracing::Span::current().record("attempt", attempt);
        }
        trace_event(event);
    }
}

fn millis(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The `DEBUG` tracing event of a resilience event: named
/// `toolwarden.{name}`, it becomes a span event of the current span (the
/// call span) under `tracing-opentelemetry`. Its attributes are listed in
/// [`ObservabilityEvents`]; nothing of the call's arguments or result.
fn trace_event(event: &Event<'_>) {
    let name = event.name();
    let key = event.subject();
    match *event {
        Event::CircuitOpened { retry_after, .. } | Event::RateLimited { retry_after, .. } => {
            tracing::debug!(
                toolwarden.event = name,
                toolwarden.key = key,
                toolwarden.retry_after_ms = millis(retry_after),
                "toolwarden.{name}"
            );
        }
        Event::Retried { attempt, delay, .. } => {
            tracing::debug!(
                toolwarden.event = name,
                toolwarden.key = key,
                toolwarden.attempt = attempt,
                toolwarden.delay_ms = millis(delay),
                "toolwarden.{name}"
            );
        }
        Event::LoopWarned { repeats, .. } | Event::LoopDetected { repeats, .. } => {
            tracing::debug!(
                toolwarden.event = name,
                toolwarden.key = key,
                toolwarden.repeats = repeats,
                "toolwarden.{name}"
            );
        }
        Event::StaleServed { age, .. } => {
            tracing::debug!(
                toolwarden.event = name,
                toolwarden.key = key,
                toolwarden.age_ms = millis(age),
                "toolwarden.{name}"
            );
        }
        _ => {
            tracing::debug!(
                toolwarden.event = name,
                toolwarden.key = key,
                "toolwarden.{name}"
            );
        }
    }
}

impl fmt::Debug for ObservabilityEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObservabilityEvents")
            .finish_non_exhaustive()
    }
}
