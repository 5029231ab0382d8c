//! [`KeyedState`]: the one bounded concurrent keyed-state container every
//! keyed layer uses.
//!
//! # Bounds
//!
//! - At most `max_keys` keys (default 10 000). Past the bound, a new key
//!   shares one overflow entry ([`Key::Overflow`]) instead of growing the map:
//!   no input can grow memory without bound.
//! - Entries idle for `idle_timeout` (default 10 minutes) are evicted. Reads
//!   take no clock: a read sets a `touched` flag, and a sweep, run on the
//!   insert path at most once per `idle_timeout`, evicts entries not touched
//!   since the previous sweep and clears the flag of the others. An entry is
//!   therefore evicted after between one and two idle periods without use.
//!
//! # Why papaya
//!
//! Reads are the hot path: every call of every keyed layer does one. papaya is
//! a lock-free hash map whose reads never block and never write shared cache
//! lines (epoch-based reclamation through `seize`), it supports lookups by an
//! `Equivalent` borrowed key (so [`KeyRef`] finds a [`Key`] without building
//! one), and unlike moka it gives an exact length we can bound hard. dashmap
//! takes a shard read-lock per read (a shared write of the lock word), and
//! moka's size bound is eventually consistent and its reads cost several
//! times more.

use std::fmt;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::key::{Key, KeyRef};

type Map<V> = papaya::HashMap<Key, Arc<Slot<V>>, foldhash::fast::RandomState>;
type Make<V> = Box<dyn Fn(&Key) -> V + Send + Sync>;
type InUse<V> = Box<dyn Fn(&V) -> bool + Send + Sync>;

/// A handle to one key's state. Cloning it is one atomic increment; it keeps
/// the state alive even if the key is evicted meanwhile.
pub struct Entry<V> {
    slot: Arc<Slot<V>>,
}

struct Slot<V> {
    key: Key,
    value: V,
    touched: AtomicBool,
}

impl<V> Entry<V> {
    /// The key this entry belongs to ([`Key::Overflow`] for the overflow entry).
    #[must_use]
    pub fn key(&self) -> &Key {
        &self.slot.key
    }

    /// Whether this is the shared overflow entry.
    #[must_use]
    pub fn is_overflow(&self) -> bool {
        self.slot.key == Key::Overflow
    }
}

impl<V> Clone for Entry<V> {
    fn clone(&self) -> Self {
        Entry {
            slot: Arc::clone(&self.slot),
        }
    }
}

impl<V> Deref for Entry<V> {
    type Target = V;
    fn deref(&self) -> &V {
        &self.slot.value
    }
}

impl<V: fmt::Debug> fmt::Debug for Entry<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("key", &self.slot.key)
            .field("value", &self.slot.value)
            .finish()
    }
}

/// The bounds of a [`KeyedState`].
///
/// With the `serde` feature, a settings value: `{ max_keys = 10000,
/// idle_timeout = "10m" }`, either key optional (unset: its default),
/// `idle_timeout = false` never evicting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(default, deny_unknown_fields)
)]
pub struct Bounds {
    /// The maximum number of keys. Default 10 000.
    pub max_keys: usize,
    /// Evict keys idle this long; `None` never evicts. Default 10 minutes.
    #[cfg_attr(feature = "serde", serde(with = "crate::settings::duration_or_off"))]
    pub idle_timeout: Option<Duration>,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            max_keys: 10_000,
            idle_timeout: Some(Duration::from_secs(600)),
        }
    }
}

impl Bounds {
    /// Bounds of at most `max_keys` keys and the default idle timeout.
    #[must_use]
    pub fn max_keys(max_keys: usize) -> Self {
        Bounds {
            max_keys,
            ..Self::default()
        }
    }

    /// Sets the idle timeout.
    #[must_use]
    pub fn idle_timeout(mut self, idle_timeout: Option<Duration>) -> Self {
        self.idle_timeout = idle_timeout;
        self
    }

    /// Checks the bounds, naming the bad field.
    pub fn validate(&self) -> Result<(), crate::ConfigError> {
        if self.max_keys == 0 {
            return Err(crate::ConfigError::new("max_keys", "must be at least 1"));
        }
        if self.idle_timeout == Some(Duration::ZERO) {
            return Err(crate::ConfigError::new("idle_timeout", "must be positive"));
        }
        Ok(())
    }
}

/// A bounded concurrent map from [`Key`] to per-key state `V`, shared by
/// every clone. See the [module docs](self) for its bounds.
///
/// ```
/// use toolwarden_core::{keyed::{Bounds, KeyedState}, Key, KeyRef};
/// use std::sync::atomic::{AtomicU32, Ordering};
/// let state: KeyedState<AtomicU32> = KeyedState::new(Bounds::max_keys(2), |_| AtomicU32::new(0));
/// state.entry(KeyRef::Tool("a")).fetch_add(1, Ordering::Relaxed);
/// state.entry(KeyRef::Tool("a")).fetch_add(1, Ordering::Relaxed);
/// state.entry(KeyRef::Tool("b"));
/// assert!(state.entry(KeyRef::Tool("c")).is_overflow()); // past the bound
/// assert_eq!(state.get(&KeyRef::Tool("a")).unwrap().load(Ordering::Relaxed), 2);
/// assert_eq!(state.len(), 2);
/// ```
pub struct KeyedState<V> {
    inner: Arc<Inner<V>>,
}

struct Inner<V> {
    map: Map<V>,
    len: AtomicUsize,
    bounds: Bounds,
    overflow: Entry<V>,
    make: Make<V>,
    /// Entries for which this says `true` are never evicted as idle.
    keep: Option<InUse<V>>,
    epoch: Instant,
    last_sweep_ms: AtomicU64,
}

impl<V> Clone for KeyedState<V> {
    fn clone(&self) -> Self {
        KeyedState {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<V> fmt::Debug for KeyedState<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedState")
            .field("len", &self.len())
            .field("bounds", &self.inner.bounds)
            .finish()
    }
}

impl<V: Send + Sync + 'static> KeyedState<V> {
    /// An empty container whose new keys get the state `make(key)`.
    /// Invalid bounds are clamped (at least one key); validate them first
    /// with [`Bounds::validate`] to report the error instead.
    pub fn new(bounds: Bounds, make: impl Fn(&Key) -> V + Send + Sync + 'static) -> Self {
        Self::build(bounds, Box::new(make), None)
    }

    /// Like [`new`](Self::new), but an entry for which `in_use` says `true`
    /// is never evicted as idle, however long it goes untouched: for state
    /// that must outlive a long call (a bulkhead's permits held by calls in
    /// flight), where a fresh entry for the same key would forget them.
    /// Entries in use still count toward `max_keys`.
    ///
    /// ```
    /// use std::sync::atomic::{AtomicU32, Ordering};
    /// use toolwarden_core::{keyed::{Bounds, KeyedState}, KeyRef};
    /// let state: KeyedState<AtomicU32> =
    ///     KeyedState::new_keeping(Bounds::default(), |_| AtomicU32::new(0), |n| n.load(Ordering::Relaxed) > 0);
    /// state.entry(KeyRef::Tool("busy")).store(1, Ordering::Relaxed);
    /// state.entry(KeyRef::Tool("idle"));
    /// state.sweep(); // starts an idle period
    /// state.sweep(); // evicts what went untouched, except what is in use
    /// assert!(state.get(&KeyRef::Tool("busy")).is_some());
    /// assert!(state.get(&KeyRef::Tool("idle")).is_none());
    /// ```
    pub fn new_keeping(
        bounds: Bounds,
        make: impl Fn(&Key) -> V + Send + Sync + 'static,
        in_use: impl Fn(&V) -> bool + Send + Sync + 'static,
    ) -> Self {
        Self::build(bounds, Box::new(make), Some(Box::new(in_use)))
    }

    fn build(bounds: Bounds, make: Make<V>, keep: Option<InUse<V>>) -> Self {
        let bounds = Bounds {
            max_keys: bounds.max_keys.max(1),
            idle_timeout: bounds.idle_timeout.filter(|d| !d.is_zero()),
        };
        let overflow = Entry {
            slot: Arc::new(Slot {
                value: make(&Key::Overflow),
                key: Key::Overflow,
                touched: AtomicBool::new(true),
            }),
        };
        KeyedState {
            inner: Arc::new(Inner {
                map: Map::with_hasher(foldhash::fast::RandomState::default()),
                len: AtomicUsize::new(0),
                bounds,
                overflow,
                make,
                keep,
                epoch: Instant::now(),
                last_sweep_ms: AtomicU64::new(0),
            }),
        }
    }
}

impl<V> KeyedState<V> {
    /// The entry of `key`, created when new; the overflow entry when the
    /// container is full.
    #[inline]
    #[allow(clippy::must_use_candidate)] // creates the key: callers may call it for that alone
    pub fn entry(&self, key: KeyRef<'_>) -> Entry<V> {
        if let Some(entry) = self.get(&key) {
            return entry;
        }
        self.insert_slow(key)
    }

    /// The entry of `key`, if it exists (never the overflow entry, unless
    /// asked for [`KeyRef::Overflow`]).
    #[inline]
    #[allow(clippy::must_use_candidate)] // refreshes the key's idle time: callers may call it for that alone
    pub fn get(&self, key: &KeyRef<'_>) -> Option<Entry<V>> {
        if *key == KeyRef::Overflow {
            return Some(self.inner.overflow.clone());
        }
        let map = self.inner.map.pin();
        let slot = map.get(key)?;
        // Only write the shared flag when it is clear: reads stay read-only.
        if !slot.touched.load(Ordering::Relaxed) {
            slot.touched.store(true, Ordering::Relaxed);
        }
        Some(Entry {
            slot: Arc::clone(slot),
        })
    }

    /// Like [`with`](Self::with), and a handle on the entry when `f`'s
    /// second value says to keep one: one lookup for callers that keep the
    /// entry only sometimes (a sampled call).
    #[inline]
    pub fn with_keep<T>(
        &self,
        key: &KeyRef<'_>,
        f: impl FnOnce(&V) -> (T, bool),
    ) -> Option<(T, Option<Entry<V>>)> {
        if *key == KeyRef::Overflow {
            let (read, keep) = f(&self.inner.overflow);
            return Some((read, keep.then(|| self.inner.overflow.clone())));
        }
        let map = self.inner.map.pin();
        let slot = map.get(key)?;
        if !slot.touched.load(Ordering::Relaxed) {
            slot.touched.store(true, Ordering::Relaxed);
        }
        let (read, keep) = f(&slot.value);
        let entry = keep.then(|| Entry {
            slot: Arc::clone(slot),
        });
        Some((read, entry))
    }

    /// Runs `f` on the state of `key`, if it exists, without taking a
    /// handle: the cheapest read, for callers that need the state only now.
    #[inline]
    pub fn with<T>(&self, key: &KeyRef<'_>, f: impl FnOnce(&V) -> T) -> Option<T> {
        if *key == KeyRef::Overflow {
            return Some(f(&self.inner.overflow));
        }
        let map = self.inner.map.pin();
        let slot = map.get(key)?;
        if !slot.touched.load(Ordering::Relaxed) {
            slot.touched.store(true, Ordering::Relaxed);
        }
        Some(f(&slot.value))
    }

    #[cold]
    fn insert_slow(&self, key: KeyRef<'_>) -> Entry<V> {
        let inner = &*self.inner;
        self.sweep_if_due();
        // Reserve a place first, so concurrent inserts can never exceed the bound.
        let reserved = inner
            .len
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |len| {
                (len < inner.bounds.max_keys).then_some(len + 1)
            });
        if reserved.is_err() {
            return inner.overflow.clone();
        }
        let key = key.to_key();
        let slot = Arc::new(Slot {
            value: (inner.make)(&key),
            key: key.clone(),
            touched: AtomicBool::new(true),
        });
        let map = inner.map.pin();
        match map.try_insert(key, Arc::clone(&slot)) {
            Ok(_) => Entry { slot },
            Err(existing) => {
                // Another thread inserted the same key first.
                inner.len.fetch_sub(1, Ordering::AcqRel);
                Entry {
                    slot: Arc::clone(existing.current),
                }
            }
        }
    }

    fn sweep_if_due(&self) {
        let inner = &*self.inner;
        let Some(idle) = inner.bounds.idle_timeout else {
            return;
        };
        let now_ms = inner.epoch.elapsed().as_millis() as u64;
        let last = inner.last_sweep_ms.load(Ordering::Acquire);
        if now_ms.saturating_sub(last) < u64::try_from(idle.as_millis()).unwrap_or(u64::MAX) {
            return;
        }
        if inner
            .last_sweep_ms
            .compare_exchange(last, now_ms, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.sweep();
        }
    }

    /// Evicts every entry not used since the previous sweep, and starts a
    /// new idle period for the others. Layers call this on their insert
    /// path; call it yourself to evict on a schedule of your own.
    pub fn sweep(&self) {
        let inner = &*self.inner;
        let map = inner.map.pin();
        let mut idle = Vec::new();
        for (key, slot) in map.iter() {
            let in_use = inner.keep.as_ref().is_some_and(|keep| keep(&slot.value));
            if !slot.touched.swap(false, Ordering::Relaxed) && !in_use {
                idle.push(key.clone());
            }
        }
        for key in idle {
            if map.remove(&key).is_some() {
                inner.len.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// Removes one key. Returns whether it was there.
    #[must_use]
    pub fn remove(&self, key: &KeyRef<'_>) -> bool {
        let removed = self.inner.map.pin().remove(key).is_some();
        if removed {
            self.inner.len.fetch_sub(1, Ordering::AcqRel);
        }
        removed
    }

    /// The number of keys (the overflow entry not counted). Never above `max_keys`.
    #[must_use]
    pub fn len(&self) -> usize {
        self.inner.len.load(Ordering::Acquire)
    }

    /// Whether there are no keys.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bounds.
    #[must_use]
    pub fn bounds(&self) -> Bounds {
        self.inner.bounds
    }

    /// The shared overflow entry.
    #[must_use]
    pub fn overflow(&self) -> &Entry<V> {
        &self.inner.overflow
    }

    /// Every entry (the overflow entry not included), for snapshots.
    #[must_use]
    pub fn entries(&self) -> Vec<Entry<V>> {
        self.inner
            .map
            .pin()
            .values()
            .map(|slot| Entry {
                slot: Arc::clone(slot),
            })
            .collect()
    }

    /// Visits every entry without collecting them.
    pub fn for_each(&self, mut f: impl FnMut(&Key, &V)) {
        for (key, slot) in self.inner.map.pin().iter() {
            f(key, &slot.value);
        }
    }

    /// Removes every key.
    pub fn clear(&self) {
        let map = self.inner.map.pin();
        let keys: Vec<Key> = map.keys().cloned().collect();
        for key in keys {
            if map.remove(&key).is_some() {
                self.inner.len.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// Creates a fresh value for `key` with the container's factory,
    /// without inserting it.
    #[must_use]
    pub fn make_value(&self, key: &Key) -> V {
        (self.inner.make)(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    fn counter_state(bounds: Bounds) -> KeyedState<AtomicU32> {
        KeyedState::new(bounds, |_| AtomicU32::new(0))
    }

    #[test]
    fn entries_are_shared_by_key() {
        let state = counter_state(Bounds::default());
        state
            .entry(KeyRef::Tool("a"))
            .fetch_add(1, Ordering::Relaxed);
        let again = state.clone().entry(KeyRef::Tool("a"));
        assert_eq!(again.load(Ordering::Relaxed), 1);
        assert_eq!(again.key(), &Key::tool("a"));
        assert!(state.get(&KeyRef::Tool("b")).is_none());
        assert_eq!(
            state.with(&KeyRef::Tool("a"), |v| v.load(Ordering::Relaxed)),
            Some(1)
        );
        assert_eq!(
            state.with(&KeyRef::Tool("b"), |v| v.load(Ordering::Relaxed)),
            None
        );
    }

    #[test]
    fn overflow_is_shared_past_the_bound() {
        let state = counter_state(Bounds::max_keys(3));
        for name in ["a", "b", "c"] {
            assert!(!state.entry(KeyRef::Tool(name)).is_overflow());
        }
        let d = state.entry(KeyRef::Tool("d"));
        let e = state.entry(KeyRef::Tool("e"));
        assert!(d.is_overflow() && e.is_overflow());
        d.fetch_add(1, Ordering::Relaxed);
        assert_eq!(e.load(Ordering::Relaxed), 1);
        assert_eq!(state.len(), 3);
        assert!(state.remove(&KeyRef::Tool("a")));
        assert!(!state.entry(KeyRef::Tool("d")).is_overflow());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_keys_are_evicted_and_used_keys_kept() {
        let idle = Duration::from_secs(60);
        let state = counter_state(Bounds::max_keys(100).idle_timeout(Some(idle)));
        state.entry(KeyRef::Tool("busy"));
        state.entry(KeyRef::Tool("idle"));
        for i in 0..4 {
            tokio::time::advance(Duration::from_secs(40)).await;
            state.get(&KeyRef::Tool("busy"));
            // Inserting a new key runs the sweep when one is due (t = 80 s, 160 s).
            state.entry(KeyRef::Tool(&format!("new{i}")));
        }
        assert!(state.get(&KeyRef::Tool("busy")).is_some());
        assert!(state.get(&KeyRef::Tool("idle")).is_none());
        // new0 (idle since the sweep at 80 s) went too; new1..new3 are recent.
        assert!(state.get(&KeyRef::Tool("new0")).is_none());
        assert_eq!(state.len(), 4);
    }

    #[test]
    fn concurrent_inserts_never_exceed_the_bound() {
        let state = counter_state(Bounds::max_keys(1000).idle_timeout(None));
        std::thread::scope(|s| {
            for t in 0..4 {
                let state = state.clone();
                s.spawn(move || {
                    for i in 0..20_000 {
                        let name = format!("{t}-{i}");
                        state.entry(KeyRef::Tool(&name));
                        assert!(state.len() <= 1000);
                    }
                });
            }
        });
        assert_eq!(state.len(), 1000);
        assert_eq!(state.entries().len(), 1000);
    }
}
