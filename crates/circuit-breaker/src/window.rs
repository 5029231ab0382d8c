//! The sliding windows: a count window that really is the last N calls, and
//! a time window of buckets. Both keep running totals, so recording a call
//! and reading a rate are O(1) (the time window also clears the buckets it
//! skips, at most once per bucket width).
//!
//! They are plain data: the breaker keeps them under its per-key lock.

use serde::Serialize;

use crate::config::TimeWindow;

const FAILURE: u8 = 1;
const SLOW: u8 = 2;

/// One recorded call, as the windows see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mark {
    pub(crate) failure: bool,
    pub(crate) slow: bool,
}

impl Mark {
    fn bits(self) -> u8 {
        (self.failure as u8 * FAILURE) | (self.slow as u8 * SLOW)
    }
}

/// Counts over one window, as they appear in a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct WindowStats {
    /// Calls recorded in the window (successes and counted failures).
    pub calls: u32,
    /// Counted failures among them.
    pub failures: u32,
    /// Slow calls among them (successful or not).
    pub slow_calls: u32,
    /// `failures / calls`; `None` when the window is empty.
    pub failure_rate: Option<f64>,
    /// `slow_calls / calls`; `None` when the window is empty.
    pub slow_call_rate: Option<f64>,
}

impl WindowStats {
    fn new(calls: u32, failures: u32, slow_calls: u32) -> Self {
        let rate = |n: u32| (calls > 0).then(|| f64::from(n) / f64::from(calls));
        WindowStats {
            calls,
            failures,
            slow_calls,
            failure_rate: rate(failures),
            slow_call_rate: rate(slow_calls),
        }
    }
}

/// Whether `part` out of `calls` reaches `threshold`. Every rate policy and
/// the reference model of the tests decide with this one comparison.
#[inline]
pub(crate) fn reaches(part: u32, calls: u32, threshold: f64) -> bool {
    calls > 0 && f64::from(part) >= threshold * f64::from(calls)
}

// Rings are kept in 128-byte aligned chunks, so that two keys' rings, both
// written on every call, never share a cache line.
#[derive(Clone, Copy)]
#[repr(align(128))]
struct Chunk([u8; 128]);

/// The last `size` calls, exactly: a ring of outcomes plus running totals.
/// Recording evicts the call `size` places back and subtracts it.
pub(crate) struct CountWindow {
    ring: Box<[Chunk]>,
    size: u32,
    next: u32,
    filled: u32,
    failures: u32,
    slow: u32,
}

impl CountWindow {
    pub(crate) fn new(size: u32) -> Self {
        let chunks = (size as usize).div_ceil(128).max(1);
        CountWindow {
            ring: vec![Chunk([0; 128]); chunks].into_boxed_slice(),
            size: size.max(1),
            next: 0,
            filled: 0,
            failures: 0,
            slow: 0,
        }
    }

    #[inline]
    pub(crate) fn record(&mut self, mark: Mark) {
        let i = self.next as usize;
        let cell = &mut self.ring[i / 128].0[i % 128];
        if self.filled == self.size {
            let old = *cell;
            self.failures -= u32::from(old & FAILURE);
            self.slow -= u32::from((old & SLOW) >> 1);
        } else {
            self.filled += 1;
        }
        let bits = mark.bits();
        *cell = bits;
        self.failures += u32::from(bits & FAILURE);
        self.slow += u32::from((bits & SLOW) >> 1);
        self.next = if self.next + 1 == self.size {
            0
        } else {
            self.next + 1
        };
    }

    /// `(calls, failures, slow calls)` in the window.
    #[inline]
    pub(crate) fn totals(&self) -> (u32, u32, u32) {
        (self.filled, self.failures, self.slow)
    }

    /// Full of plain successes: one more changes nothing but the position.
    #[inline]
    pub(crate) fn is_clean(&self) -> bool {
        self.filled == self.size && self.failures == 0 && self.slow == 0
    }

    pub(crate) fn stats(&self) -> WindowStats {
        WindowStats::new(self.filled, self.failures, self.slow)
    }

    /// The same calls in a window of `size`: the most recent `size` of
    /// them when it is smaller (a reconfigured breaker keeps its counts).
    pub(crate) fn resized(&self, size: u32) -> CountWindow {
        let mut resized = CountWindow::new(size);
        let keep = self.filled.min(resized.size);
        // The oldest kept call is `keep` places before `next`.
        let start = (self.next + self.size - keep) % self.size;
        for i in 0..keep {
            let at = ((start + i) % self.size) as usize;
            let bits = self.ring[at / 128].0[at % 128];
            resized.record(Mark {
                failure: bits & FAILURE != 0,
                slow: bits & SLOW != 0,
            });
        }
        resized
    }

    pub(crate) fn clear(&mut self) {
        // The ring needs no wipe: `filled` says which cells are live.
        self.next = 0;
        self.filled = 0;
        self.failures = 0;
        self.slow = 0;
    }
}

#[derive(Clone, Copy, Default)]
struct Bucket {
    tick: u64,
    calls: u32,
    failures: u32,
    slow: u32,
}

/// The calls of the last `buckets` bucket widths: bucket `t` holds the
/// calls whose time (since the registry's epoch) divided by the bucket
/// width is `t`; the window is the buckets `head - buckets + 1 ..= head`.
pub(crate) struct TimeBuckets {
    buckets: Box<[Bucket]>,
    width_ns: u64,
    head: u64,
    calls: u32,
    failures: u32,
    slow: u32,
}

impl TimeBuckets {
    pub(crate) fn new(window: TimeWindow) -> Self {
        let n = window.buckets.max(1) as usize;
        let width_ns = u64::try_from(window.bucket_width().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        TimeBuckets {
            buckets: vec![Bucket::default(); n].into_boxed_slice(),
            width_ns,
            head: 0,
            calls: 0,
            failures: 0,
            slow: 0,
        }
    }

    /// The bucket of a time, in nanoseconds since the registry's epoch.
    #[inline]
    pub(crate) fn tick_of(&self, now_ns: u64) -> u64 {
        now_ns / self.width_ns
    }

    fn len(&self) -> u64 {
        self.buckets.len() as u64
    }

    /// Moves the window forward to `tick`, dropping the buckets that leave it.
    pub(crate) fn advance(&mut self, tick: u64) {
        if tick <= self.head {
            return;
        }
        let n = self.len();
        if tick - self.head >= n {
            self.buckets.fill(Bucket::default());
            for (i, b) in self.buckets.iter_mut().enumerate() {
                // Mark every bucket as belonging to the new window's ticks.
                let i = i as u64;
                b.tick = tick - ((tick % n + n - i) % n);
            }
            self.calls = 0;
            self.failures = 0;
            self.slow = 0;
        } else {
            for t in self.head + 1..=tick {
                let b = &mut self.buckets[(t % n) as usize];
                self.calls -= b.calls;
                self.failures -= b.failures;
                self.slow -= b.slow;
                *b = Bucket {
                    tick: t,
                    ..Bucket::default()
                };
            }
        }
        self.head = tick;
    }

    /// Records a call made at `tick` (advancing the window when it is new;
    /// dropping it when it is already older than the window).
    #[inline]
    pub(crate) fn record(&mut self, tick: u64, mark: Mark) {
        self.advance(tick);
        let n = self.len();
        if tick + n <= self.head {
            return;
        }
        let b = &mut self.buckets[(tick % n) as usize];
        debug_assert_eq!(b.tick, tick);
        let (failure, slow) = (u32::from(mark.failure), u32::from(mark.slow));
        b.calls += 1;
        b.failures += failure;
        b.slow += slow;
        self.calls += 1;
        self.failures += failure;
        self.slow += slow;
    }

    /// `(calls, failures, slow calls)` in the window as of the last advance.
    #[inline]
    pub(crate) fn totals(&self) -> (u32, u32, u32) {
        (self.calls, self.failures, self.slow)
    }

    pub(crate) fn stats(&self) -> WindowStats {
        WindowStats::new(self.calls, self.failures, self.slow)
    }

    pub(crate) fn clear(&mut self) {
        for b in self.buckets.iter_mut() {
            b.calls = 0;
            b.failures = 0;
            b.slow = 0;
        }
        self.calls = 0;
        self.failures = 0;
        self.slow = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::time::Duration;

    const OK: Mark = Mark {
        failure: false,
        slow: false,
    };
    const FAIL: Mark = Mark {
        failure: true,
        slow: false,
    };

    #[test]
    fn a_resized_count_window_keeps_the_most_recent_calls() {
        let mut w = CountWindow::new(4);
        for mark in [FAIL, OK, FAIL, FAIL, OK, FAIL] {
            w.record(mark); // the window holds FAIL, FAIL, OK, FAIL
        }
        assert_eq!(w.totals(), (4, 3, 0));
        let mut smaller = w.resized(2); // OK, FAIL
        assert_eq!(smaller.totals(), (2, 1, 0));
        smaller.record(OK); // FAIL, OK: the oldest kept call leaves first
        assert_eq!(smaller.totals(), (2, 1, 0));
        smaller.record(OK);
        assert_eq!(smaller.totals(), (2, 0, 0));
        let mut larger = w.resized(10);
        assert_eq!(larger.totals(), (4, 3, 0));
        larger.record(OK);
        assert_eq!(larger.totals(), (5, 3, 0));
    }

    #[test]
    fn count_window_is_the_last_n_calls() {
        let mut w = CountWindow::new(100);
        for _ in 0..1000 {
            w.record(OK);
        }
        assert_eq!(w.totals(), (100, 0, 0));
        for i in 1..=50 {
            w.record(FAIL);
            assert_eq!(w.totals(), (100, i, 0));
        }
        assert!(reaches(50, 100, 0.5));
        assert!(!reaches(49, 100, 0.5));
    }

    #[test]
    fn count_window_matches_a_naive_deque() {
        for size in [1u32, 2, 7, 128, 129, 300] {
            let mut w = CountWindow::new(size);
            let mut naive = VecDeque::new();
            let mut rng = fastrand::Rng::with_seed(u64::from(size));
            for _ in 0..2000 {
                let mark = Mark {
                    failure: rng.bool(),
                    slow: rng.u8(0..4) == 0,
                };
                w.record(mark);
                naive.push_back(mark);
                if naive.len() > size as usize {
                    naive.pop_front();
                }
                let f = naive.iter().filter(|m| m.failure).count() as u32;
                let s = naive.iter().filter(|m| m.slow).count() as u32;
                assert_eq!(w.totals(), (naive.len() as u32, f, s));
            }
            w.clear();
            assert_eq!(w.totals(), (0, 0, 0));
            w.record(FAIL);
            assert_eq!(w.totals(), (1, 1, 0));
        }
    }

    #[test]
    fn time_buckets_match_a_naive_log() {
        let window = TimeWindow::new(Duration::from_millis(100), 5); // 20 ms buckets
        let mut w = TimeBuckets::new(window);
        let mut log: Vec<(u64, Mark)> = Vec::new();
        let mut rng = fastrand::Rng::with_seed(7);
        let mut now_ns = 0u64;
        for _ in 0..5000 {
            now_ns += match rng.u8(0..10) {
                0 => rng.u64(0..400_000_000),
                1..=3 => rng.u64(0..30_000_000),
                _ => 0,
            };
            let mark = Mark {
                failure: rng.bool(),
                slow: rng.bool(),
            };
            let tick = w.tick_of(now_ns);
            w.record(tick, mark);
            log.push((tick, mark));
            let live: Vec<_> = log.iter().filter(|(t, _)| t + 5 > tick).collect();
            let f = live.iter().filter(|(_, m)| m.failure).count() as u32;
            let s = live.iter().filter(|(_, m)| m.slow).count() as u32;
            assert_eq!(w.totals(), (live.len() as u32, f, s));
        }
    }

    #[test]
    fn late_calls_land_in_their_bucket_or_nowhere() {
        let mut w = TimeBuckets::new(TimeWindow::new(Duration::from_secs(4), 4));
        w.record(10, FAIL);
        w.record(9, OK); // still in the window (7..=10)
        w.record(6, FAIL); // too old
        assert_eq!(w.totals(), (2, 1, 0));
        w.advance(13);
        assert_eq!(w.totals(), (1, 1, 0));
        w.advance(14);
        assert_eq!(w.totals(), (0, 0, 0));
    }
}
