//! Where the layer reads the time a call takes ([`ClockSource`]) and the
//! clock behind it.

use std::time::Duration;

/// Where an [`ObservabilityLayer`](crate::ObservabilityLayer) reads the
/// time a call takes ([`ObservabilityBuilder::clock`](crate::ObservabilityBuilder::clock)).
///
/// Every call is timed with two clock reads, and on a virtual machine a read
/// of the monotonic clock (`clock_gettime` through the vDSO, which
/// `std::time::Instant` and tokio's `Instant` use) costs 20–30 ns: together,
/// a third of the layer's per-call cost. By default the layer reads the
/// CPU's time-stamp counter through [quanta] instead (≈ 10 ns a read),
/// calibrated against the monotonic clock once per process, and converts
/// only the difference of two reads into nanoseconds. Where there is no
/// usable invariant TSC, quanta reads the monotonic clock itself.
///
/// The TSC does not follow tokio's paused clock, so a test that pauses time
/// (`#[tokio::test(start_paused = true)]`, `tokio::time::advance`) and
/// checks recorded durations chooses [`ClockSource::Tokio`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClockSource {
    /// The time-stamp counter through quanta (the monotonic clock where
    /// there is no usable TSC). The default.
    #[default]
    Fast,
    /// tokio's clock (`tokio::time::Instant`): follows a paused clock, so
    /// durations recorded under `start_paused` / `advance` are exact.
    Tokio,
}

/// One reading of a [`Clock`]: raw counter ticks ([`ClockSource::Fast`]) or
/// nanoseconds since the clock was made ([`ClockSource::Tokio`]). Only
/// meaningful to the clock that took it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stamp(u64);

impl Stamp {
    /// The reading as a nonzero integer, for an atomic where 0 means "none".
    #[inline]
    pub(crate) fn to_nonzero_bits(self) -> u64 {
        self.0.saturating_add(1)
    }

    /// The reading stored by [`to_nonzero_bits`](Self::to_nonzero_bits);
    /// `None` for 0.
    pub(crate) fn from_nonzero_bits(bits: u64) -> Option<Stamp> {
        bits.checked_sub(1).map(Stamp)
    }
}

/// The layer's clock, with its epoch: the wall time when it was made, so a
/// reading can be shown as a wall time without reading the wall clock on
/// every call.
#[derive(Debug, Clone)]
pub(crate) struct Clock {
    source: ClockSource,
    quanta: quanta::Clock,
    /// Raw counter at the epoch ([`ClockSource::Fast`]).
    raw_epoch: u64,
    /// tokio's clock at the epoch ([`ClockSource::Tokio`]).
    tokio_epoch: tokio::time::Instant,
    /// Unix milliseconds at the epoch.
    unix_ms: u64,
}

impl Clock {
    pub(crate) fn new(source: ClockSource) -> Self {
        let quanta = quanta::Clock::new();
        Clock {
            source,
            raw_epoch: quanta.raw(),
            quanta,
            tokio_epoch: tokio::time::Instant::now(),
            unix_ms: crate::stats::unix_ms_now(),
        }
    }

    /// The current reading.
    #[inline]
    pub(crate) fn now(&self) -> Stamp {
        match self.source {
            ClockSource::Fast => Stamp(self.quanta.raw()),
            ClockSource::Tokio => Stamp(nanos(
                tokio::time::Instant::now().saturating_duration_since(self.tokio_epoch),
            )),
        }
    }

    /// The time from `start` to `end` (zero if `end` is earlier).
    #[inline]
    pub(crate) fn between(&self, start: Stamp, end: Stamp) -> Duration {
        Duration::from_nanos(self.nanos_between(start, end))
    }

    #[inline]
    fn nanos_between(&self, start: Stamp, end: Stamp) -> u64 {
        match self.source {
            ClockSource::Fast => self.quanta.delta_as_nanos(start.0, end.0),
            ClockSource::Tokio => end.0.saturating_sub(start.0),
        }
    }

    /// Milliseconds from the epoch to `at`.
    #[inline]
    pub(crate) fn millis_since_epoch(&self, at: Stamp) -> u64 {
        let epoch = match self.source {
            ClockSource::Fast => Stamp(self.raw_epoch),
            ClockSource::Tokio => Stamp(0),
        };
        self.nanos_between(epoch, at) / 1_000_000
    }

    /// The wall time, in Unix milliseconds, `millis` after the epoch.
    pub(crate) fn unix_ms(&self, millis: u64) -> u64 {
        self.unix_ms.saturating_add(millis)
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_tokio_source_follows_the_paused_clock() {
        let clock = Clock::new(ClockSource::Tokio);
        let start = clock.now();
        tokio::time::advance(Duration::from_millis(1500)).await;
        let end = clock.now();
        assert_eq!(clock.between(start, end), Duration::from_millis(1500));
        assert_eq!(clock.millis_since_epoch(end), 1500);
        assert_eq!(clock.between(end, start), Duration::ZERO);
    }

    #[test]
    fn the_fast_source_measures_real_time() {
        let clock = Clock::new(ClockSource::Fast);
        let start = clock.now();
        let wall = std::time::Instant::now();
        std::thread::sleep(Duration::from_millis(20));
        let end = clock.now();
        let wall = wall.elapsed();
        let measured = clock.between(start, end);
        // Calibrated against the monotonic clock: within a few percent of it.
        assert!(measured >= Duration::from_millis(19), "{measured:?}");
        assert!(
            measured.as_secs_f64() <= wall.as_secs_f64() * 1.05 + 0.001,
            "{measured:?} vs {wall:?}"
        );
        assert!(clock.millis_since_epoch(end) >= 19);
        assert_eq!(clock.between(end, start), Duration::ZERO);
    }
}
