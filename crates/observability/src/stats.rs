//! In-process per-tool statistics ([`Stats`]) and their JSON snapshot
//! ([`StatsSnapshot`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use toolwarden_core::{CircuitState, OutcomeKind};

use crate::clock::{Clock, Stamp};
use crate::registry::Shared;

/// The number of outcome kinds a completed call can have.
pub(crate) const OUTCOME_KINDS: usize = 6;

/// The slot of an outcome kind in per-outcome arrays.
#[inline]
pub(crate) fn outcome_index(kind: OutcomeKind) -> usize {
    match kind {
        OutcomeKind::Success => 0,
        OutcomeKind::ToolError => 1,
        OutcomeKind::ProtocolError => 2,
        OutcomeKind::Transport => 3,
        OutcomeKind::Timeout => 4,
        OutcomeKind::Rejected => 5,
    }
}

/// The outcome kinds, in slot order.
pub(crate) const OUTCOMES: [OutcomeKind; OUTCOME_KINDS] = OutcomeKind::ALL;

pub(crate) fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Durations below 2^10 ns share bucket 0.
const FIRST_OCTAVE: u32 = 10;
/// Octaves 2^10..2^42 ns.
const OCTAVES: usize = 32;
const SUB_BUCKET_BITS: u32 = 2;
const SUB_BUCKETS: usize = 1 << SUB_BUCKET_BITS;
const HISTOGRAM_BUCKETS: usize = 1 + OCTAVES * SUB_BUCKETS;

/// A log-linear histogram of durations in nanoseconds (see [`Stats`], "Precision").
pub(crate) struct DurationHistogram {
    buckets: Box<[AtomicU64]>,
}

impl DurationHistogram {
    fn new() -> Self {
        DurationHistogram {
            buckets: (0..HISTOGRAM_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    #[inline]
    fn bucket_of(nanos: u64) -> usize {
        if nanos < (1 << FIRST_OCTAVE) {
            return 0;
        }
        let msb = 63 - nanos.leading_zeros(); // >= FIRST_OCTAVE
        let octave = (msb - FIRST_OCTAVE) as usize;
        let sub = ((nanos >> (msb - SUB_BUCKET_BITS)) & (SUB_BUCKETS as u64 - 1)) as usize;
        (1 + octave * SUB_BUCKETS + sub).min(HISTOGRAM_BUCKETS - 1)
    }

    /// The midpoint of a bucket, in nanoseconds.
    fn midpoint(bucket: usize) -> f64 {
        if bucket == 0 {
            return f64::from(1u32 << FIRST_OCTAVE) / 2.0;
        }
        let octave = (bucket - 1) / SUB_BUCKETS;
        let sub = (bucket - 1) % SUB_BUCKETS;
        let base = 2f64.powi(FIRST_OCTAVE as i32 + octave as i32);
        let width = base / SUB_BUCKETS as f64;
        base + width * (sub as f64 + 0.5)
    }

    #[inline]
    fn record(&self, nanos: u64) {
        self.buckets[Self::bucket_of(nanos)].fetch_add(1, Relaxed);
    }

    fn counts(&self) -> Vec<u64> {
        self.buckets.iter().map(|b| b.load(Relaxed)).collect()
    }

    /// The `q` quantile (0..=1) of `counts`, in milliseconds.
    fn quantile_ms(counts: &[u64], q: f64) -> Option<f64> {
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        // The smallest value with at least q of the samples at or below it.
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0u64;
        for (bucket, &count) in counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(Self::midpoint(bucket) / 1e6);
            }
        }
        None
    }
}

/// The outcomes of the last N completed calls, as a ring.
pub(crate) struct RecentWindow {
    failed: Box<[AtomicU8]>,
    /// The slot the next outcome goes to; always below `failed.len()`.
    next: AtomicUsize,
    /// How many slots hold an outcome, up to `failed.len()`.
    covered: AtomicUsize,
}

impl RecentWindow {
    fn new(size: usize) -> Self {
        RecentWindow {
            failed: (0..size.max(1)).map(|_| AtomicU8::new(0)).collect(),
            next: AtomicUsize::new(0),
            covered: AtomicUsize::new(0),
        }
    }

    /// Not a read-modify-write: under concurrent calls two outcomes may
    /// land in one slot (the ring is a sample of recent calls, not a count).
    /// The position wraps by comparison, not `%`: a division is the
    /// slowest instruction on this path.
    #[inline]
    fn record(&self, failed: bool) {
        let len = self.failed.len();
        let slot = self.next.load(Relaxed);
        self.next
            .store(if slot + 1 >= len { 0 } else { slot + 1 }, Relaxed);
        // Only values below `len` are ever stored in `next`.
        if let Some(cell) = self.failed.get(slot) {
            cell.store(u8::from(failed), Relaxed);
        }
        let covered = self.covered.load(Relaxed);
        if covered < len {
            self.covered.store(covered + 1, Relaxed);
        }
    }

    /// (failures, calls covered).
    fn read(&self) -> (u64, u64) {
        let covered = self.covered.load(Relaxed).min(self.failed.len());
        // Until the ring is full, the outcomes are in the first slots.
        let failures = self.failed[..covered]
            .iter()
            .filter(|f| f.load(Relaxed) != 0)
            .count() as u64;
        (failures, covered as u64)
    }
}

/// The statistics cell of one tool or method.
pub(crate) struct StatsCell {
    outcomes: [AtomicU64; OUTCOME_KINDS],
    cancelled: AtomicU64,
    total_nanos: AtomicU64,
    /// The clock reading of the last finished call, as
    /// [`Stamp::to_nonzero_bits`] (converted only when read); 0: none.
    last_call: AtomicU64,
    histogram: DurationHistogram,
    recent: RecentWindow,
}

impl StatsCell {
    pub(crate) fn new(recent_window: usize) -> Self {
        StatsCell {
            outcomes: Default::default(),
            cancelled: AtomicU64::new(0),
            total_nanos: AtomicU64::new(0),
            last_call: AtomicU64::new(0),
            histogram: DurationHistogram::new(),
            recent: RecentWindow::new(recent_window),
        }
    }

    #[inline]
    pub(crate) fn record(&self, kind: OutcomeKind, elapsed: Duration, end: Stamp) {
        self.outcomes[outcome_index(kind)].fetch_add(1, Relaxed);
        if kind != OutcomeKind::Rejected {
            // A refusal of ours takes microseconds and says nothing of the
            // tool: in the durations, a tool refused often would look fast.
            let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
            self.total_nanos.fetch_add(nanos, Relaxed);
            self.histogram.record(nanos);
        }
        self.last_call.store(end.to_nonzero_bits(), Relaxed);
        self.recent.record(kind != OutcomeKind::Success);
    }

    #[inline]
    pub(crate) fn record_cancelled(&self, end: Stamp) {
        self.cancelled.fetch_add(1, Relaxed);
        self.last_call.store(end.to_nonzero_bits(), Relaxed);
    }

    pub(crate) fn has_calls(&self) -> bool {
        self.cancelled.load(Relaxed) > 0 || self.outcomes.iter().any(|c| c.load(Relaxed) > 0)
    }

    pub(crate) fn snapshot(&self, name: &str, clock: &Clock) -> CallStats {
        let counts: [u64; OUTCOME_KINDS] = std::array::from_fn(|i| self.outcomes[i].load(Relaxed));
        let completed: u64 = counts.iter().sum();
        let cancelled = self.cancelled.load(Relaxed);
        let successes = counts[outcome_index(OutcomeKind::Success)];
        let timed = completed - counts[outcome_index(OutcomeKind::Rejected)];
        let total_ms = self.total_nanos.load(Relaxed) as f64 / 1e6;
        let histogram = self.histogram.counts();
        let (recent_failures, recent_calls) = self.recent.read();
        let ratio = |n: u64, d: u64| (d > 0).then(|| n as f64 / d as f64);
        let last = self.last_call.load(Relaxed);
        CallStats {
            name: name.to_owned(),
            calls: completed + cancelled,
            errors: completed - successes,
            cancelled,
            outcomes: OutcomeCounts::from_slots(&counts),
            success_rate: ratio(successes, completed),
            recent_failure_rate: ratio(recent_failures, recent_calls),
            recent_calls,
            total_duration_ms: total_ms,
            mean_duration_ms: (timed > 0).then(|| total_ms / timed as f64),
            p50_ms: DurationHistogram::quantile_ms(&histogram, 0.50),
            p95_ms: DurationHistogram::quantile_ms(&histogram, 0.95),
            p99_ms: DurationHistogram::quantile_ms(&histogram, 0.99),
            last_call_unix_ms: Stamp::from_nonzero_bits(last)
                .map(|at| clock.unix_ms(clock.millis_since_epoch(at))),
            active: 0,
        }
    }
}

/// Completed calls by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeCounts {
    /// Results that are not errors.
    pub success: u64,
    /// Tool results with `isError: true`, or empty tool results.
    pub tool_error: u64,
    /// JSON-RPC error responses.
    pub protocol_error: u64,
    /// Transport failures.
    pub transport: u64,
    /// Timeouts.
    pub timeout: u64,
    /// Refusals by a toolwarden layer below this one.
    pub rejected: u64,
}

impl OutcomeCounts {
    fn from_slots(slots: &[u64; OUTCOME_KINDS]) -> Self {
        OutcomeCounts {
            success: slots[0],
            tool_error: slots[1],
            protocol_error: slots[2],
            transport: slots[3],
            timeout: slots[4],
            rejected: slots[5],
        }
    }

    /// The count of one outcome kind.
    #[must_use]
    pub fn get(&self, kind: OutcomeKind) -> u64 {
        match kind {
            OutcomeKind::Success => self.success,
            OutcomeKind::ToolError => self.tool_error,
            OutcomeKind::ProtocolError => self.protocol_error,
            OutcomeKind::Transport => self.transport,
            OutcomeKind::Timeout => self.timeout,
            OutcomeKind::Rejected => self.rejected,
        }
    }
}

/// The statistics of one tool (or of one method, for requests that are not
/// tool calls). Durations are in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallStats {
    /// The tool name (or method); `other` for everything past the cap.
    pub name: String,
    /// Calls made: completed plus cancelled.
    pub calls: u64,
    /// Completed calls whose outcome was not a success (rejections by other
    /// layers and client errors included).
    pub errors: u64,
    /// Calls whose future was dropped before they finished.
    pub cancelled: u64,
    /// Completed calls by outcome.
    pub outcomes: OutcomeCounts,
    /// Successes over completed calls; `None` before the first one.
    pub success_rate: Option<f64>,
    /// Errors over the last `recent_calls` completed calls; `None` before the first one.
    pub recent_failure_rate: Option<f64>,
    /// How many completed calls the recent failure rate covers (at most the window).
    pub recent_calls: u64,
    /// The summed duration of completed calls, refusals by a toolwarden
    /// layer (outcome `rejected`) left out, as in the mean and percentiles
    /// below: they take microseconds, and a tool refused often would look
    /// fast. (The `mcp.client.operation.duration` histogram records them,
    /// with `error.type` `rejected`.)
    pub total_duration_ms: f64,
    /// The mean duration of completed calls (refusals left out).
    pub mean_duration_ms: Option<f64>,
    /// The median duration (within 12.5 %, see [`Stats`], "Precision").
    pub p50_ms: Option<f64>,
    /// The 95th percentile duration.
    pub p95_ms: Option<f64>,
    /// The 99th percentile duration.
    pub p99_ms: Option<f64>,
    /// When the last call ended (or was cancelled), in Unix milliseconds.
    pub last_call_unix_ms: Option<u64>,
    /// Calls started and not yet ended (completed or dropped) at the time
    /// of the snapshot: the `toolwarden.calls.active` gauge
    /// ([`METRIC_CALLS_ACTIVE`](crate::METRIC_CALLS_ACTIVE)). `0` when
    /// absent from older JSON.
    #[serde(default)]
    pub active: u64,
}

/// A point-in-time copy of the layer's statistics, from
/// [`Stats::snapshot`] (see [`Stats`] for its bounds and precision).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    /// When the snapshot was taken, in Unix milliseconds.
    pub taken_at_unix_ms: u64,
    /// One entry per `tools/call` tool name, sorted by name; `other` holds
    /// every name past `max_tools`.
    pub tools: Vec<CallStats>,
    /// One entry per other method (`tools/list`, `initialize`, ...), sorted;
    /// `other` holds every method past `max_methods`.
    pub methods: Vec<CallStats>,
    /// Resilience events seen by the layer's event sink, by event name
    /// (every known name present, zero included).
    pub events: BTreeMap<String, u64>,
    /// The state of each circuit key as its last circuit event reported it
    /// ([`CircuitState::Open`], [`CircuitState::HalfOpen`] or
    /// [`CircuitState::Closed`]: events carry no manual state, so the
    /// breakers' registry is where a forced or disabled circuit shows as
    /// such). Bounded like the tools; keys past the cap are not tracked.
    pub circuits: BTreeMap<String, CircuitState>,
}

impl StatsSnapshot {
    /// The entry of a tool.
    #[must_use]
    pub fn tool(&self, name: &str) -> Option<&CallStats> {
        self.tools.iter().find(|t| t.name == name)
    }

    /// The entry of a method other than `tools/call`.
    #[must_use]
    pub fn method(&self, name: &str) -> Option<&CallStats> {
        self.methods.iter().find(|t| t.name == name)
    }

    /// The snapshot as JSON.
    #[must_use]
    pub fn to_json(&self) -> serde_json::Value {
        // A derived Serialize of plain data with string keys cannot fail.
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// A cheap, cloneable handle to a layer's statistics, from
/// [`ObservabilityLayer::stats`](crate::ObservabilityLayer::stats).
///
/// Every call updates a few relaxed atomics of its tool's (or, for requests
/// that are not tool calls, its method's) cell: one outcome counter, the
/// total duration, one histogram bucket, the last call time and one slot of
/// the recent-outcomes ring. [`Stats::snapshot`] reads them into a
/// [`StatsSnapshot`] that serialises to JSON.
///
/// # Bounds
///
/// The first `max_tools` distinct tool names (default 100) and the first
/// `max_methods` distinct methods (default 32) get a cell each for the life
/// of the layer; later ones share one cell named `other` (a tool really
/// named `other` is then listed twice). A cell, with its cached metric
/// handles, takes about 2 KiB plus one byte per slot of the recent window;
/// each event key about 1.1 KiB more (a cached counter per event kind).
///
/// # Precision
///
/// - Percentiles come from a log-linear histogram of 129 buckets: durations
///   below 1.024 µs share the first bucket; above that, each power of two is
///   split in four, up to 2^42 ns (about 73 minutes), and longer calls share
///   the last bucket. A percentile is reported as the midpoint of its
///   bucket, so it is within 12.5 % of the true value inside that range.
/// - The recent failure rate covers the last `recent_window` completed calls
///   (default 100) of the tool, from a ring of outcomes; under concurrent
///   calls, two outcomes may land in one slot, so it is a close sample of
///   the latest calls rather than an exact count.
/// - Each counter is read atomically, but a snapshot taken while calls
///   complete may count a call in one field and not yet in another.
/// - Times come from the layer's clock ([`ClockSource`](crate::ClockSource):
///   the time-stamp counter by default, tokio's clock with
///   [`ClockSource::Tokio`](crate::ClockSource::Tokio));
///   `last_call_unix_ms` is the wall time of the layer's creation plus the
///   monotonic time since.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use tower::{Layer, ServiceExt};
/// use toolwarden_core::{jsonrpc::Request, testing::{MockMcp, Step}};
/// use toolwarden_observability::ObservabilityLayer;
///
/// let layer = ObservabilityLayer::new();
/// let stats = layer.stats();
/// let mock = MockMcp::new().script("search", [Step::tool_error("boom")]);
/// let svc = layer.layer(mock);
/// for id in 0..4 {
///     svc.clone().oneshot(Request::tool_call(id, "search", serde_json::json!({}))).await.unwrap();
/// }
/// let snapshot = stats.snapshot();
/// let search = snapshot.tool("search").unwrap();
/// assert_eq!((search.calls, search.errors), (4, 1));
/// assert_eq!(search.success_rate, Some(0.75));
/// assert_eq!(snapshot.to_json()["tools"][0]["outcomes"]["tool_error"], 1);
/// # }
/// ```
#[derive(Clone)]
pub struct Stats {
    pub(crate) shared: Arc<Shared>,
}

impl Stats {
    /// Reads every cell into a snapshot.
    #[must_use]
    pub fn snapshot(&self) -> StatsSnapshot {
        self.shared.snapshot()
    }
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stats").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_midpoints_within_an_eighth() {
        let mut last = 0;
        for shift in 0..50u32 {
            for frac in [0u64, 1, 3, 5, 7] {
                let v = (1u64 << shift) + ((1u64 << shift) / 8) * frac;
                let b = DurationHistogram::bucket_of(v);
                assert!(b >= last, "bucket of {v} went back");
                last = b;
                if (1 << FIRST_OCTAVE..1u64 << 42).contains(&v) {
                    let mid = DurationHistogram::midpoint(b);
                    let err = (mid - v as f64).abs() / v as f64;
                    assert!(err <= 0.125 + 1e-9, "{v}: midpoint {mid} err {err}");
                }
            }
        }
        assert_eq!(DurationHistogram::bucket_of(0), 0);
        assert_eq!(
            DurationHistogram::bucket_of(u64::MAX),
            HISTOGRAM_BUCKETS - 1
        );
    }

    #[test]
    fn quantiles_pick_the_bucket_of_the_rank() {
        let h = DurationHistogram::new();
        for _ in 0..90 {
            h.record(10_000_000); // 10 ms
        }
        for _ in 0..10 {
            h.record(1_000_000_000); // 1 s
        }
        let counts = h.counts();
        let p50 = DurationHistogram::quantile_ms(&counts, 0.5).unwrap();
        let p95 = DurationHistogram::quantile_ms(&counts, 0.95).unwrap();
        assert!((p50 - 10.0).abs() / 10.0 <= 0.125, "{p50}");
        assert!((p95 - 1000.0).abs() / 1000.0 <= 0.125, "{p95}");
        // 90 % of samples are 10 ms: the 90th percentile is still 10 ms.
        let p90 = DurationHistogram::quantile_ms(&counts, 0.9).unwrap();
        assert_eq!(p90, p50);
        assert_eq!(DurationHistogram::quantile_ms(&[0; 4], 0.5), None);
    }

    #[test]
    fn recent_window_covers_only_the_last_calls() {
        let w = RecentWindow::new(4);
        assert_eq!(w.read(), (0, 0));
        w.record(true);
        w.record(false);
        assert_eq!(w.read(), (1, 2));
        for _ in 0..4 {
            w.record(false);
        }
        assert_eq!(w.read(), (0, 4));
        w.record(true);
        assert_eq!(w.read(), (1, 4));
    }
}
