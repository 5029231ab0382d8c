//! [`LatencyRecord`]: the recent latencies of one key's good answers, and
//! the percentile a hedge waits for.

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// Latencies kept per key: the most recent good answers.
pub(crate) const SAMPLES: usize = 64;

/// One waited-for answer in this many is recorded (the first of every
/// four): the ring then covers about the last 256 calls that waited, and
/// the others save a clock reading. Round robin, so which calls are
/// recorded does not depend on their latency.
pub(crate) const SAMPLE_EVERY: u64 = 4;

/// The percentile is computed again after this many new samples (and when
/// the record first holds enough of them): a call reads one atomic, and
/// one recording in sixteen pays for a selection over [`SAMPLES`] values.
const RECOMPUTE_EVERY: u64 = 16;

/// A percentile in thousandths (950 for p95), `1..=1000`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Permille(pub(crate) u16);

/// The latencies of the latest [`SAMPLES`] good answers of one key, in a
/// ring of atomics (microseconds, saturating at about 71 minutes), and the
/// percentile last computed from them. Written without a lock: concurrent
/// writers each take their own slot; a reader never waits.
pub(crate) struct LatencyRecord {
    /// Calls that waited, sampled or not.
    waits: AtomicU64,
    /// Samples written so far.
    written: AtomicU64,
    samples: [AtomicU32; SAMPLES],
    /// The percentile in microseconds plus one; 0 while too few samples.
    cached: AtomicU64,
}

impl LatencyRecord {
    pub(crate) fn new() -> Self {
        LatencyRecord {
            waits: AtomicU64::new(0),
            written: AtomicU64::new(0),
            samples: std::array::from_fn(|_| AtomicU32::new(0)),
            cached: AtomicU64::new(0),
        }
    }

    /// The percentile of recent good answers, once at least `min_samples`
    /// were recorded; `None` before.
    #[inline]
    pub(crate) fn percentile(&self) -> Option<Duration> {
        match self.cached.load(Ordering::Relaxed) {
            0 => None,
            micros => Some(Duration::from_micros(micros - 1)),
        }
    }

    /// Counts a call that waits, and whether its answer is to be recorded
    /// (one in [`SAMPLE_EVERY`]).
    ///
    /// The count is a load and a store, not a read-modify-write: two calls
    /// counting at the same instant may count once, which shifts the round
    /// robin by one and costs nothing else; every call saves a locked
    /// instruction.
    #[inline]
    pub(crate) fn sample(&self) -> bool {
        let waits = self.waits.load(Ordering::Relaxed);
        self.waits.store(waits.wrapping_add(1), Ordering::Relaxed);
        waits.is_multiple_of(SAMPLE_EVERY)
    }

    /// Records one good answer's latency; recomputes the percentile
    /// `permille` when it is due (see [`RECOMPUTE_EVERY`]).
    pub(crate) fn record(&self, latency: Duration, permille: Permille, min_samples: u32) {
        let micros = u32::try_from(latency.as_micros()).unwrap_or(u32::MAX);
        let n = self.written.fetch_add(1, Ordering::Relaxed);
        self.samples[(n % SAMPLES as u64) as usize].store(micros, Ordering::Relaxed);
        let count = n.saturating_add(1);
        let min = u64::from(min_samples.max(1));
        if count < min || (count != min && !count.is_multiple_of(RECOMPUTE_EVERY)) {
            return;
        }
        let held = count.min(SAMPLES as u64) as usize;
        let mut values = [0u32; SAMPLES];
        for (value, sample) in values.iter_mut().zip(&self.samples).take(held) {
            *value = sample.load(Ordering::Relaxed);
        }
        let values = &mut values[..held];
        // The smallest value at or above the percentile: ⌈p · n⌉-th, 1-based.
        let rank = (usize::from(permille.0) * held)
            .div_ceil(1000)
            .clamp(1, held);
        let (_, at, _) = values.select_nth_unstable(rank - 1);
        self.cached
            .store(u64::from(*at).saturating_add(1), Ordering::Relaxed);
    }

    /// Samples recorded so far (for the `Debug` output and tests).
    pub(crate) fn count(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for LatencyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LatencyRecord")
            .field("samples", &self.count())
            .field("percentile", &self.percentile())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn no_percentile_before_min_samples() {
        let r = LatencyRecord::new();
        for _ in 0..19 {
            r.record(ms(10), Permille(950), 20);
        }
        assert_eq!(r.percentile(), None);
        r.record(ms(10), Permille(950), 20);
        assert_eq!(r.percentile(), Some(ms(10)));
    }

    #[test]
    fn p95_of_a_hundred_values_over_the_last_64() {
        let r = LatencyRecord::new();
        // 1..=100 ms; p95 of 64 values is the 61st smallest.
        for i in 1..=100 {
            r.record(ms(i), Permille(950), 20);
        }
        assert_eq!(r.count(), 100);
        // Last recomputed at 96 samples: the ring held 33..=96, the 61st is 93.
        assert_eq!(r.percentile(), Some(ms(93)));
        for i in 101..=112 {
            r.record(ms(i), Permille(950), 20);
        }
        // At 112: 49..=112, the 61st is 109.
        assert_eq!(r.percentile(), Some(ms(109)));
    }

    #[test]
    fn extremes_saturate() {
        let r = LatencyRecord::new();
        r.record(Duration::MAX, Permille(1000), 1);
        assert_eq!(
            r.percentile(),
            Some(Duration::from_micros(u64::from(u32::MAX)))
        );
        let r = LatencyRecord::new();
        r.record(Duration::ZERO, Permille(1), 1);
        assert_eq!(r.percentile(), Some(Duration::ZERO));
    }
}
