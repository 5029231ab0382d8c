//! [`RetryBudget`] and its [`BudgetConfig`].

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use toolwarden_core::ConfigError;

/// Slots in the sliding window.
const SLOTS: usize = 10;
/// One retry, in budget units (thousandths of a retry).
const RETRY: i64 = 1000;

/// The configuration of a [`RetryBudget`].
///
/// ```
/// use std::time::Duration;
/// use toolwarden_retry::BudgetConfig;
/// let config = BudgetConfig { ratio: 0.1, ..BudgetConfig::default() };
/// assert_eq!(config.min_per_sec, 10);
/// assert_eq!(config.ttl, Duration::from_secs(10));
/// config.validate().unwrap();
/// ```
///
/// With the `serde` feature, a settings value: `{ ratio = 0.2, min_per_sec
/// = 10, ttl = "10s" }`, every key optional (unset: its default).
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(default, deny_unknown_fields)
)]
pub struct BudgetConfig {
    /// Retries allowed per request, over the window: `0.2` lets one request
    /// in five be retried once. Between 0 and 10, resolution 0.001 (NaN,
    /// infinities, negatives, and positive ratios that round to 0 at that
    /// resolution are refused, naming `ratio`). Default `0.2`.
    pub ratio: f64,
    /// Retries allowed per second of the window regardless of traffic, so
    /// that a client with few requests can still retry. At most 1 000 000.
    /// Default `10`.
    pub min_per_sec: u32,
    /// How long a request (or a retry) counts. Between 1 s and 1 h (else
    /// refused, naming `ttl`). Default 10 s.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub ttl: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            ratio: 0.2,
            min_per_sec: 10,
            ttl: Duration::from_secs(10),
        }
    }
}

impl BudgetConfig {
    /// Checks the configuration, naming the bad field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.ratio.is_finite() || !(0.0..=10.0).contains(&self.ratio) {
            return Err(ConfigError::new("ratio", "must be between 0 and 10"));
        }
        if self.ratio > 0.0 && deposit_units(self.ratio) == 0 {
            return Err(ConfigError::new(
                "ratio",
                "is below the budget's resolution of 0.001 (use 0 for no deposits)",
            ));
        }
        if self.min_per_sec > 1_000_000 {
            return Err(ConfigError::new("min_per_sec", "must be at most 1000000"));
        }
        if self.ttl < Duration::from_secs(1) || self.ttl > Duration::from_secs(3600) {
            return Err(ConfigError::new("ttl", "must be between 1 s and 1 h"));
        }
        if deposit_units(self.ratio) == 0 && self.min_per_sec == 0 {
            return Err(ConfigError::new(
                "ratio, min_per_sec",
                "are both 0, so the budget never allows a retry; use max_attempts(1) to disable retries",
            ));
        }
        Ok(())
    }
}

fn deposit_units(ratio: f64) -> i32 {
    // Clamped so that even an unvalidated ratio (NaN reads as 0) stays in range.
    (ratio.clamp(0.0, 10.0) * RETRY as f64).round() as i32
}

/// A retry budget shared by everything that holds it (the layer shares one
/// between all its services and their clones): retries allowed are at most
/// a ratio of recent requests, plus a small floor per second.
///
/// As in Finagle (and tower's `TpsBudget`), every request *deposits* `ratio`
/// of a retry and every retry *withdraws* one whole retry; a retry is allowed
/// only while the balance covers it. Deposits and withdrawals count for one
/// `ttl` window and then expire, and a fixed reserve of `min_per_sec · ttl`
/// retries lets clients with little traffic retry at all. So over any `ttl`
/// window, retries ≤ `ratio` × requests + `min_per_sec` × `ttl`: during a
/// failure storm the budget, not the attempt count, bounds the load sent
/// upstream.
///
/// # How it is kept
///
/// The window is ten time slots of `ttl / 10`; each slot is one `AtomicU64`
/// holding its slot number and its net balance, updated with one
/// compare-and-swap, so a deposit takes no lock and the hot path touches one
/// cache line. An entry counts for between `0.9 · ttl` and `ttl`. The slots
/// are kept in four stripes, each on cache lines of its own, and a thread
/// deposits into its stripe: calls on two cores do not fight over one line
/// on every call (a withdrawal, on a retry only, reads every stripe). A
/// budget takes 640 bytes (per key, for budgets kept per tool).
/// Amounts are fixed-point thousandths of a retry, so `ratio` is exact to
/// 0.001: `0.6` allows 6 retries per 10 requests, not 10 (tower#857 truncates
/// `1 / ratio` and over-issues). Concurrent withdrawals check and withdraw
/// in two steps, so under contention the budget can be overdrawn by at most
/// one retry per thread withdrawing at that instant.
///
/// ```
/// use std::time::Duration;
/// use toolwarden_retry::{BudgetConfig, RetryBudget};
/// // 60 % of requests may be retried, no floor.
/// let budget = RetryBudget::new(BudgetConfig { ratio: 0.6, min_per_sec: 0, ttl: Duration::from_secs(1) }).unwrap();
/// for _ in 0..10 {
///     budget.deposit();
/// }
/// let allowed = (0..10).filter(|_| budget.withdraw()).count();
/// assert_eq!(allowed, 6);
/// ```
pub struct RetryBudget {
    epoch: Instant,
    /// `⌊(2^64 - 1) / slot width in ns⌋`: the slot number is a multiply
    /// and a shift instead of a division on every call.
    slot_reciprocal: u64,
    deposit: i32,
    reserve: i64,
    /// Per stripe and slot: the slot number (high 32 bits) and the net
    /// balance in units (low 32 bits, as an `i32`). The balance is the sum
    /// over the stripes.
    stripes: [Stripe; STRIPES],
}

/// Stripes of slots: a thread writes to one (see [`stripe`]).
const STRIPES: usize = 4;

/// One stripe's slots, aligned so that no two stripes share a cache line
/// (128 bytes: adjacent lines are fetched in pairs on x86).
#[repr(align(128))]
struct Stripe([AtomicU64; SLOTS]);

/// This thread's stripe: threads take the next one in turn, once.
fn stripe() -> usize {
    use std::cell::Cell;
    use std::sync::atomic::AtomicUsize;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    STRIPE.with(|stripe| {
        let mut index = stripe.get();
        if index == usize::MAX {
            index = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
            stripe.set(index);
        }
        index
    })
}

fn pack(slot: u32, balance: i32) -> u64 {
    (u64::from(slot) << 32) | u64::from(balance as u32)
}

fn unpack(packed: u64) -> (u32, i32) {
    ((packed >> 32) as u32, packed as u32 as i32)
}

/// `⌊nanos / slot width⌋` given the reciprocal of the width: exact, except
/// that a slot may start late by up to `nanos · width / 2^64` ns (0.05 ns
/// ten seconds after the budget was made, under 2 µs a year later with 1 s
/// slots): irrelevant to a budget window, and cheaper than a division. Wraps
/// after 2^32 slots; [`counts`] compares with wrapping arithmetic.
fn slot_of(nanos: u64, reciprocal: u64) -> u32 {
    ((u128::from(nanos) * u128::from(reciprocal)) >> 64) as u32
}

/// Whether an entry written in slot number `written` still counts at slot
/// number `now` (slot numbers wrap after 2^32 slots, over 13 years).
fn counts(written: u32, now: u32) -> bool {
    let age = now.wrapping_sub(written) as i32;
    // A slightly negative age is a racing writer whose clock read was later.
    age > -(SLOTS as i32) && age < SLOTS as i32
}

impl RetryBudget {
    /// A full budget: only the reserve, no deposits yet.
    pub fn new(config: BudgetConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self::from_validated(config))
    }

    /// A budget from a configuration [`BudgetConfig::validate`] accepted
    /// (any other is clamped into range rather than refused).
    pub(crate) fn from_validated(config: BudgetConfig) -> Self {
        let ttl = config
            .ttl
            .clamp(Duration::from_secs(1), Duration::from_secs(3600));
        let slot = ttl / SLOTS as u32;
        let slot_nanos = u64::try_from(slot.as_nanos()).unwrap_or(u64::MAX).max(1);
        let min_per_sec = config.min_per_sec.min(1_000_000);
        let reserve = (f64::from(min_per_sec) * ttl.as_secs_f64() * RETRY as f64).round() as i64;
        RetryBudget {
            epoch: Instant::now(),
            slot_reciprocal: u64::MAX / slot_nanos,
            deposit: deposit_units(config.ratio),
            reserve,
            // Slot number u32::MAX is "long ago" for slot 0: it never counts.
            stripes: std::array::from_fn(|_| {
                Stripe(std::array::from_fn(|_| {
                    AtomicU64::new(pack(u32::MAX - SLOTS as u32, 0))
                }))
            }),
        }
    }

    fn slot_number(&self, now: Instant) -> u32 {
        let elapsed = now.saturating_duration_since(self.epoch);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        slot_of(nanos, self.slot_reciprocal)
    }

    fn add(&self, slot: u32, amount: i32) {
        let cell = &self.stripes[stripe()].0[slot as usize % SLOTS];
        let mut current = cell.load(Ordering::Relaxed);
        loop {
            let (written, balance) = unpack(current);
            let next = if written.wrapping_sub(slot) as i32 >= 0 {
                // The same slot (or a newer one, opened by a writer whose
                // clock read was later): add to it.
                pack(written, balance.saturating_add(amount))
            } else {
                // A slot from the previous round: start it afresh.
                pack(slot, amount)
            };
            match cell.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return,
                Err(actual) => current = actual,
            }
        }
    }

    fn balance(&self, slot: u32) -> i64 {
        self.stripes
            .iter()
            .flat_map(|stripe| &stripe.0)
            .map(|cell| unpack(cell.load(Ordering::Relaxed)))
            .filter(|&(written, _)| counts(written, slot))
            .map(|(_, balance)| i64::from(balance))
            .sum::<i64>()
            + self.reserve
    }

    /// Records a request.
    pub fn deposit(&self) {
        self.deposit_at(Instant::now());
    }

    /// Asks for one retry: `true` (and the retry is spent) when the balance
    /// covers it.
    pub fn withdraw(&self) -> bool {
        self.withdraw_at(Instant::now())
    }

    /// Whole retries the budget allows right now.
    pub fn available(&self) -> u64 {
        let balance = self.balance(self.slot_number(Instant::now()));
        u64::try_from(balance / RETRY).unwrap_or(0)
    }

    /// Records a request made at `now` (a caller that has just read the
    /// clock saves [`deposit`](Self::deposit)'s own reading).
    #[inline]
    pub fn deposit_at(&self, now: Instant) {
        if self.deposit != 0 {
            self.add(self.slot_number(now), self.deposit);
        }
    }

    pub(crate) fn withdraw_at(&self, now: Instant) -> bool {
        let slot = self.slot_number(now);
        if self.balance(slot) < RETRY {
            return false;
        }
        self.add(slot, -(RETRY as i32));
        true
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("ratio", &(f64::from(self.deposit) / RETRY as f64))
            .field("reserve", &(self.reserve / RETRY))
            .field("available", &self.available())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(ratio: f64, min_per_sec: u32, ttl_secs: u64) -> RetryBudget {
        RetryBudget::new(BudgetConfig {
            ratio,
            min_per_sec,
            ttl: Duration::from_secs(ttl_secs),
        })
        .unwrap()
    }

    fn allowed(budget: &RetryBudget, deposits: usize) -> usize {
        for _ in 0..deposits {
            budget.deposit();
        }
        std::iter::from_fn(|| budget.withdraw().then_some(()))
            .take(100_000)
            .count()
    }

    #[tokio::test(start_paused = true)]
    async fn fractional_ratios_are_exact() {
        // tower's TpsBudget allows 10, 5 and 10 here (tower#857).
        assert_eq!(allowed(&budget(0.6, 0, 1), 10), 6);
        assert_eq!(allowed(&budget(0.4, 0, 1), 10), 4);
        assert_eq!(allowed(&budget(0.7, 0, 1), 10), 7);
        assert_eq!(allowed(&budget(0.2, 0, 10), 1000), 200);
        assert_eq!(allowed(&budget(0.333, 0, 10), 1000), 333);
        assert_eq!(allowed(&budget(2.5, 0, 10), 4), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn the_floor_is_min_per_sec_times_ttl() {
        let b = budget(0.0, 5, 2);
        assert_eq!(b.available(), 10);
        assert_eq!(allowed(&b, 100), 10);
        // No deposits with ratio 0: traffic does not raise the floor.
        assert_eq!(b.available(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_and_withdrawals_expire_after_the_ttl() {
        let b = budget(0.5, 1, 1);
        // Reserve 1, plus 0.5 · 4 deposits.
        assert_eq!(allowed(&b, 4), 3);
        assert!(!b.withdraw());
        // 0.9 s later the spent retries still count.
        tokio::time::advance(Duration::from_millis(900)).await;
        assert!(!b.withdraw());
        // After the ttl they have expired: the reserve is back, the deposits gone.
        tokio::time::advance(Duration::from_millis(200)).await;
        assert_eq!(b.available(), 1);
        assert!(b.withdraw());
        assert!(!b.withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_slides_slot_by_slot() {
        let b = budget(1.0, 0, 1);
        b.deposit();
        tokio::time::advance(Duration::from_millis(500)).await;
        b.deposit();
        assert_eq!(b.available(), 2);
        // The first deposit (slot 0) leaves the window at 1.0 s, the second at 1.5 s.
        tokio::time::advance(Duration::from_millis(550)).await;
        assert_eq!(b.available(), 1);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(b.available(), 0);
        // Reused slots start afresh rather than adding to old balances.
        tokio::time::advance(Duration::from_secs(7)).await;
        b.deposit();
        assert_eq!(b.available(), 1);
    }

    #[test]
    fn the_reciprocal_slot_number_matches_division() {
        let mut rng = fastrand::Rng::with_seed(3);
        for width in [100_000_000u64, 1_000_000_000, 360_000_000_000, 123_456_789] {
            let reciprocal = u64::MAX / width;
            // Boundaries, and random instants over 30 years.
            let boundaries =
                (0..1000u64).flat_map(|k| [k * width, k * width + 1, (k + 1) * width - 1]);
            let random = (0..100_000).map(|_| rng.u64(0..30 * 365 * 86_400 * 1_000_000_000));
            for nanos in boundaries.chain(random) {
                let exact = (nanos / width) as u32;
                let fast = slot_of(nanos, reciprocal);
                // At most one slot behind, and only just after a boundary.
                let late_bound = (nanos as f64 * width as f64 / 2f64.powi(64)).ceil() as u64 + 1;
                assert!(
                    fast == exact || (fast + 1 == exact && nanos % width <= late_bound),
                    "{nanos} / {width}: {fast} vs {exact}"
                );
            }
        }
    }

    #[test]
    fn slot_packing_round_trips_signed_balances() {
        for (slot, balance) in [(0, 0), (7, -1000), (u32::MAX, i32::MIN), (3, i32::MAX)] {
            assert_eq!(unpack(pack(slot, balance)), (slot, balance));
        }
        assert!(counts(5, 5) && counts(5, 14) && !counts(5, 15));
        assert!(counts(u32::MAX, 3), "wraps");
        assert!(
            !counts(u32::MAX - SLOTS as u32, 0),
            "the initial tag never counts"
        );
    }

    #[test]
    fn concurrent_withdrawals_overdraw_by_at_most_one_per_thread() {
        let b = budget(0.1, 0, 10);
        for _ in 0..1000 {
            b.deposit();
        }
        let granted = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        if b.withdraw() {
                            granted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        let granted = granted.into_inner();
        assert!((100..=104).contains(&granted), "{granted}");
    }

    #[test]
    fn deposits_and_withdrawals_on_many_threads_share_one_balance_across_stripes() {
        // 60 % of requests: 8 threads (more than the stripes, so some share
        // one) deposit 10 each; another thread may then withdraw 48.
        let b = budget(0.6, 0, 10);
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    for _ in 0..10 {
                        b.deposit();
                    }
                });
            }
        });
        assert_eq!(b.available(), 48);
        let withdrawn = std::thread::scope(|scope| {
            scope
                .spawn(|| (0..100).filter(|_| b.withdraw()).count())
                .join()
                .unwrap()
        });
        assert_eq!(withdrawn, 48);
        assert_eq!(b.available(), 0);
        // And a withdrawal on one stripe is seen by every thread.
        assert!(!std::thread::scope(|scope| scope
            .spawn(|| b.withdraw())
            .join()
            .unwrap()));
    }

    #[test]
    fn a_budget_takes_the_size_its_docs_say() {
        assert_eq!(std::mem::size_of::<RetryBudget>(), 640);
    }

    #[test]
    fn bad_configuration_names_the_field() {
        let field = |c: BudgetConfig| c.validate().unwrap_err().field().to_owned();
        let d = BudgetConfig::default();
        assert_eq!(field(BudgetConfig { ratio: -0.1, ..d }), "ratio");
        assert_eq!(
            field(BudgetConfig {
                ratio: f64::NAN,
                ..d
            }),
            "ratio"
        );
        assert_eq!(field(BudgetConfig { ratio: 11.0, ..d }), "ratio");
        assert_eq!(field(BudgetConfig { ratio: 0.0001, ..d }), "ratio");
        assert_eq!(
            field(BudgetConfig {
                min_per_sec: 2_000_000,
                ..d
            }),
            "min_per_sec"
        );
        assert_eq!(
            field(BudgetConfig {
                ttl: Duration::from_millis(999),
                ..d
            }),
            "ttl"
        );
        assert_eq!(
            field(BudgetConfig {
                ttl: Duration::from_secs(3601),
                ..d
            }),
            "ttl"
        );
        assert_eq!(
            field(BudgetConfig {
                ratio: 0.0,
                min_per_sec: 0,
                ..d
            }),
            "ratio, min_per_sec"
        );
        assert!(d.validate().is_ok());
    }
}
