//! Exponential backoff with jitter: [`Jitter`] and the schedule it spreads.

use std::time::Duration;

/// How the computed backoff is randomised. Default: [`Jitter::Full`].
///
/// The delay before retry `n` (1 for the first retry) grows from
/// `base_delay` as `base_delay · 2^(n-1)`, capped at `max_delay`; call that
/// the *ceiling* `c(n)`. The [`Jitter`] variant spreads the actual delay so
/// that clients failing together do not retry together:
///
/// | variant | delay before retry `n` |
/// |---|---|
/// | [`Jitter::None`] | exactly `c(n)` |
/// | [`Jitter::Full`] | uniform in `[0, c(n)]` |
/// | [`Jitter::Equal`] | `c(n)/2` plus uniform in `[0, c(n)/2]` |
/// | [`Jitter::Decorrelated`] | `min(max_delay, uniform in [base_delay, 3 · previous delay])`, the previous delay of the first retry being `base_delay` |
///
/// Full and decorrelated jitter are the variants of the AWS architecture
/// blog's "Exponential Backoff And Jitter"; equal jitter keeps a guaranteed
/// minimum wait. A retry-after hint from the failure replaces the computed
/// delay when it is longer (see the [crate docs](crate)).
///
/// With the `serde` feature, written `"none"`, `"full"`, `"equal"` or
/// `"decorrelated"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "lowercase")
)]
pub enum Jitter {
    /// No randomness: the delay before retry `n` is `min(max_delay,
    /// base_delay · 2^(n-1))`. Deterministic; meant for tests and for a
    /// single client.
    None,
    /// Uniform in `[0, ceiling]`: the widest spread, the least total load.
    #[default]
    Full,
    /// Half the ceiling fixed, plus uniform in `[0, ceiling / 2]`: never
    /// retries sooner than half the ceiling.
    Equal,
    /// `min(max_delay, uniform in [base_delay, 3 · previous delay])`: grows
    /// from the delay actually used rather than from the attempt number.
    Decorrelated,
}

/// The backoff schedule of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backoff {
    pub(crate) base: Duration,
    pub(crate) max: Duration,
    pub(crate) jitter: Jitter,
}

impl Backoff {
    /// `min(max, base · 2^(retry-1))`, saturating.
    pub(crate) fn ceiling(&self, retry: u32) -> Duration {
        let doublings = retry.saturating_sub(1);
        let factor = 1u32.checked_shl(doublings).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The delay before retry `retry` (1 for the first retry), given the
    /// delay used before the previous retry (`base` for the first).
    pub(crate) fn delay(
        &self,
        retry: u32,
        previous: Duration,
        rng: &mut fastrand::Rng,
    ) -> Duration {
        match self.jitter {
            Jitter::None => self.ceiling(retry),
            Jitter::Full => uniform(rng, Duration::ZERO, self.ceiling(retry)),
            Jitter::Equal => {
                let ceiling = self.ceiling(retry);
                let half = ceiling / 2;
                half + uniform(rng, Duration::ZERO, ceiling - half)
            }
            Jitter::Decorrelated => {
                let upper = previous.saturating_mul(3).max(self.base);
                uniform(rng, self.base, upper).min(self.max)
            }
        }
    }
}

/// A uniformly random duration in `[low, high]` (nanosecond resolution;
/// durations past 584 years are clamped, which no configuration reaches).
fn uniform(rng: &mut fastrand::Rng, low: Duration, high: Duration) -> Duration {
    let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    let (low, high) = (nanos(low), nanos(high));
    if low >= high {
        return Duration::from_nanos(low);
    }
    Duration::from_nanos(rng.u64(low..=high))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn backoff(jitter: Jitter) -> Backoff {
        Backoff {
            base: 100 * MS,
            max: 2000 * MS,
            jitter,
        }
    }

    #[test]
    fn ceiling_doubles_and_saturates_at_max() {
        let b = backoff(Jitter::None);
        let ceilings: Vec<_> = (1..=7).map(|n| b.ceiling(n)).collect();
        assert_eq!(
            ceilings,
            [
                100 * MS,
                200 * MS,
                400 * MS,
                800 * MS,
                1600 * MS,
                2000 * MS,
                2000 * MS
            ]
        );
        // Huge attempt numbers neither overflow nor panic.
        assert_eq!(b.ceiling(u32::MAX), 2000 * MS);
        let huge = Backoff {
            base: Duration::MAX,
            max: Duration::MAX,
            jitter: Jitter::Full,
        };
        assert_eq!(huge.ceiling(64), Duration::MAX);
        let mut rng = fastrand::Rng::with_seed(1);
        assert!(huge.delay(3, Duration::MAX, &mut rng) <= Duration::MAX);
    }

    #[test]
    fn every_variant_stays_inside_its_bounds() {
        let mut rng = fastrand::Rng::with_seed(7);
        for jitter in [
            Jitter::None,
            Jitter::Full,
            Jitter::Equal,
            Jitter::Decorrelated,
        ] {
            let b = backoff(jitter);
            let (mut lowest, mut highest) = (Duration::MAX, Duration::ZERO);
            for _ in 0..2000 {
                let mut previous = b.base;
                for retry in 1..=6 {
                    let d = b.delay(retry, previous, &mut rng);
                    let c = b.ceiling(retry);
                    let (low, high) = match jitter {
                        Jitter::None => (c, c),
                        Jitter::Full => (Duration::ZERO, c),
                        Jitter::Equal => (c / 2, c),
                        Jitter::Decorrelated => (b.base, (previous * 3).min(b.max)),
                    };
                    assert!(
                        low <= d && d <= high,
                        "{jitter:?} retry {retry}: {d:?} not in [{low:?}, {high:?}]"
                    );
                    lowest = lowest.min(d);
                    highest = highest.max(d);
                    previous = d;
                }
            }
            // The randomised variants really spread over their range.
            match jitter {
                Jitter::None => assert_eq!((lowest, highest), (100 * MS, 2000 * MS)),
                Jitter::Full => assert!(
                    lowest < 10 * MS && highest > 1900 * MS,
                    "{lowest:?} {highest:?}"
                ),
                Jitter::Equal => assert!(
                    lowest < 55 * MS && highest > 1900 * MS,
                    "{lowest:?} {highest:?}"
                ),
                Jitter::Decorrelated => assert!(
                    lowest < 110 * MS && highest == 2000 * MS,
                    "{lowest:?} {highest:?}"
                ),
            }
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_delays() {
        let b = backoff(Jitter::Full);
        let run = |seed| {
            let mut rng = fastrand::Rng::with_seed(seed);
            (1..=5)
                .map(|n| b.delay(n, b.base, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }
}
