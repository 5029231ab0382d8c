//! The bounded store of last good results, keyed by call fingerprint.
//!
//! Backed by [`quick_cache`]: lookups and inserts are synchronous and
//! sharded (no background housekeeping), so both bounds hold at every
//! instant, not eventually; eviction is its CLOCK-Pro-like policy, which
//! keeps results that are asked for again over one-off ones. moka was the
//! other candidate; it was not chosen because its weight bound is enforced
//! by deferred housekeeping (the cache may run over until it runs), its
//! default TinyLFU admission may refuse a tool's newest good result, its
//! TTL runs on its own clock (not `tokio::time`, so not testable with a
//! paused clock), and it brings more dependencies for features not needed
//! here.
//!
//! # How both bounds hold
//!
//! quick_cache bounds one thing, the total weight, per shard. Each entry
//! weighs `max(bytes, min_weight)`, where `bytes` is the response's
//! [`McpResponse::size_hint`] and `min_weight` is a shard's byte budget
//! divided by its entry budget (rounded up). So within a shard the weights
//! add up to at most the byte budget, which bounds the bytes, and no more
//! than the entry budget of entries fit, since each weighs at least
//! `min_weight`. Budgets are split evenly between shards (up to 8; fewer for
//! small caches, so that each holds at least 32 entries and 64 KiB), rounding
//! down, so the totals never exceed `max_entries` and `max_bytes`.
//!
//! quick_cache does not admit an entry heavier than 97 % of its shard's
//! budget: a result larger than that (about `max_bytes / shards`) is not
//! stored, and replacing a key with one drops the older result.

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use quick_cache::sync::{Cache, DefaultLifecycle};
use quick_cache::{OptionsBuilder, Weighter};
use tokio::time::Instant;
use toolwarden_core::{Fingerprint, McpResponse};

/// Shards at most; fewer when the budgets are small.
const MAX_SHARDS: u64 = 8;
/// A shard holds at least this many entries (unless there is one shard).
const MIN_SHARD_ENTRIES: u64 = 32;
/// A shard holds at least this many bytes (unless there is one shard).
const MIN_SHARD_BYTES: u64 = 64 * 1024;
/// quick_cache's share of a shard for "hot" entries; it refuses an entry
/// heavier than this share of the shard's weight. Set explicitly so that
/// the minimum weight below stays admissible.
const HOT_ALLOCATION: f64 = 0.97;

/// One stored result. The response is type-erased because the cache is
/// created before the service knows its response type; one service only ever
/// stores one type, so the downcast on lookup always succeeds.
#[derive(Clone)]
struct Stored {
    stored_at: Instant,
    weight: u64,
    response: Arc<dyn Any + Send + Sync>,
}

#[derive(Debug, Clone, Copy)]
struct StoredWeight;

impl Weighter<Fingerprint, Stored> for StoredWeight {
    fn weight(&self, _key: &Fingerprint, value: &Stored) -> u64 {
        value.weight
    }
}

/// How budgets are split over shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Plan {
    pub(crate) shards: u64,
    pub(crate) shard_entries: u64,
    pub(crate) shard_bytes: u64,
    pub(crate) min_weight: u64,
}

impl Plan {
    /// Requires `max_entries >= 1` and `max_bytes >= 1024` (checked by the builder).
    pub(crate) fn new(max_entries: u64, max_bytes: u64) -> Self {
        let mut shards = MAX_SHARDS;
        while shards > 1
            && (max_entries / shards < MIN_SHARD_ENTRIES || max_bytes / shards < MIN_SHARD_BYTES)
        {
            shards /= 2;
        }
        let shard_entries = (max_entries / shards).max(1);
        let shard_bytes = (max_bytes / shards).max(1);
        // The heaviest entry quick_cache admits into one shard, computed as it does.
        let admissible = ((shard_bytes as f64 * HOT_ALLOCATION) as u64).clamp(1, shard_bytes);
        // With one entry per shard, `ceil(bytes / 1)` would not be admitted; any
        // weight above half the shard still lets only one entry in.
        let min_weight = shard_bytes.div_ceil(shard_entries).min(admissible);
        Plan {
            shards,
            shard_entries,
            shard_bytes,
            min_weight,
        }
    }
}

/// The last good result per fingerprint, bounded by entries and bytes.
pub(crate) struct ResultCache {
    cache: Cache<Fingerprint, Stored, StoredWeight, foldhash::fast::RandomState>,
    plan: Plan,
    /// A result this old can never be served again: a lookup that finds one drops it.
    max_staleness: Duration,
}

impl ResultCache {
    pub(crate) fn new(max_entries: u64, max_bytes: u64, max_staleness: Duration) -> Self {
        let plan = Plan::new(max_entries, max_bytes);
        let mut options = OptionsBuilder::new();
        options
            .shards(plan.shards as usize)
            .estimated_items_capacity((plan.shard_entries * plan.shards) as usize)
            .weight_capacity(plan.shard_bytes * plan.shards)
            .hot_allocation(HOT_ALLOCATION);
        let cache = match options.build() {
            Ok(options) => Cache::with_options(
                options,
                StoredWeight,
                foldhash::fast::RandomState::default(),
                DefaultLifecycle::default(),
            ),
            // Unreachable: both required options are set above. Should a later
            // quick_cache refuse them, fall back to the same budgets unsharded.
            Err(_) => Cache::with(
                plan.shard_entries as usize,
                plan.shard_bytes,
                StoredWeight,
                foldhash::fast::RandomState::default(),
                DefaultLifecycle::default(),
            ),
        };
        ResultCache {
            cache,
            plan,
            max_staleness,
        }
    }

    /// Stores `response` as the last good result of `key`, as of `now`.
    pub(crate) fn store<T>(&self, key: Fingerprint, response: T, now: Instant)
    where
        T: McpResponse + Send + Sync + 'static,
    {
        let bytes = u64::try_from(response.size_hint()).unwrap_or(u64::MAX);
        let stored = Stored {
            stored_at: now,
            weight: bytes.max(self.plan.min_weight),
            response: Arc::new(response),
        };
        self.cache.insert(key, stored);
    }

    /// The result stored for `key` and its age, if younger than `max_age`.
    /// A result found no younger than `max_staleness` is removed.
    pub(crate) fn lookup<T>(
        &self,
        key: &Fingerprint,
        max_age: Duration,
        now: Instant,
    ) -> Option<(T, Duration)>
    where
        T: Clone + 'static,
    {
        let stored = self.cache.get(key)?;
        let age = now.saturating_duration_since(stored.stored_at);
        if age >= self.max_staleness {
            let stored_at = stored.stored_at;
            // Only if nobody stored a newer result in between.
            self.cache.remove_if(key, |s| s.stored_at == stored_at);
            return None;
        }
        if age >= max_age {
            return None;
        }
        let response = stored.response.downcast_ref::<T>()?.clone();
        Some((response, age))
    }

    /// The number of stored results.
    pub(crate) fn len(&self) -> usize {
        self.cache.len()
    }
}

impl fmt::Debug for ResultCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResultCache")
            .field("len", &self.cache.len())
            .field("plan", &self.plan)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use toolwarden_core::jsonrpc::{Id, Response};

    fn response(bytes: usize) -> Response {
        Response::result(
            Id::Number(1),
            json!({"content": [{"type": "text", "text": "x".repeat(bytes)}]}),
        )
    }

    #[test]
    fn plans_keep_both_totals_within_the_budgets() {
        for (entries, bytes) in [
            (1, 1024),
            (2, 1024),
            (31, 10_000),
            (100, 1 << 20),
            (4096, 32 << 20),
            (10_000, 1024),
            (1_000_000, u64::MAX),
        ] {
            let plan = Plan::new(entries, bytes);
            assert!(plan.shards.is_power_of_two() && plan.shards <= MAX_SHARDS);
            assert!(plan.shard_entries * plan.shards <= entries, "{plan:?}");
            assert!(plan.shard_bytes * plan.shards <= bytes, "{plan:?}");
            // The most entries of minimum weight a shard can take.
            assert!(
                plan.shard_bytes / plan.min_weight <= plan.shard_entries,
                "{plan:?}"
            );
            // A minimum-weight entry is admissible.
            assert!(
                plan.min_weight as f64 <= plan.shard_bytes as f64 * HOT_ALLOCATION,
                "{plan:?}"
            );
        }
        assert_eq!(Plan::new(4096, 32 << 20).shards, 8);
        assert_eq!(Plan::new(40, 32 << 20).shards, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn stores_and_expires_by_age() {
        let cache = ResultCache::new(10, 1 << 20, Duration::from_secs(10));
        let key = Fingerprint(7);
        cache.store(key, response(10), Instant::now());
        tokio::time::advance(Duration::from_secs(5)).await;
        let (found, age) = cache
            .lookup::<Response>(&key, Duration::from_secs(6), Instant::now())
            .unwrap();
        assert_eq!(found, response(10));
        assert_eq!(age, Duration::from_secs(5));
        // Too old for this lookup, still kept for a longer one.
        assert!(cache
            .lookup::<Response>(&key, Duration::from_secs(5), Instant::now())
            .is_none());
        assert_eq!(cache.len(), 1);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(cache
            .lookup::<Response>(&key, Duration::MAX, Instant::now())
            .is_none());
        assert_eq!(cache.len(), 0, "a result past max_staleness is dropped");
    }

    #[test]
    fn a_lookup_of_another_type_misses() {
        let cache = ResultCache::new(10, 1 << 20, Duration::from_secs(10));
        cache.store(Fingerprint(1), response(1), Instant::now());
        assert!(cache
            .lookup::<String>(&Fingerprint(1), Duration::MAX, Instant::now())
            .is_none());
    }

    #[test]
    fn one_entry_cache_holds_one_result() {
        let cache = ResultCache::new(1, 1024, Duration::MAX);
        for i in 0..10 {
            cache.store(Fingerprint(i), response(10), Instant::now());
            assert_eq!(cache.len(), 1);
        }
    }

    #[test]
    fn entry_bound_holds() {
        let cache = ResultCache::new(50, 1 << 20, Duration::MAX);
        for i in 0..1000 {
            cache.store(Fingerprint(i), response(10), Instant::now());
            assert!(cache.len() <= 50, "{}", cache.len());
        }
        assert!(cache.len() >= 25, "the cache still fills: {}", cache.len());
    }

    #[test]
    fn byte_bound_holds() {
        // 64 KiB with room for 10,000 entries: at most 64 results of ~1 KiB fit.
        let cache = ResultCache::new(10_000, 64 * 1024, Duration::MAX);
        let one = response(1000).size_hint() as u64;
        for i in 0..1000 {
            cache.store(Fingerprint(i), response(1000), Instant::now());
            assert!(cache.len() as u64 * one <= 64 * 1024, "{}", cache.len());
        }
        assert!(cache.len() >= 32, "{}", cache.len());
    }

    #[test]
    fn a_result_larger_than_a_shard_is_not_stored() {
        let cache = ResultCache::new(10, 4096, Duration::MAX);
        cache.store(Fingerprint(1), response(100), Instant::now());
        cache.store(Fingerprint(1), response(8000), Instant::now());
        assert_eq!(
            cache.len(),
            0,
            "the oversized result is refused and replaces the old one"
        );
    }
}
