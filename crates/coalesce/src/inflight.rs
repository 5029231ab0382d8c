//! [`InFlight`]: the bounded map of calls in flight that others may join.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use toolwarden_core::Fingerprint;

/// What identifies identical calls: the fingerprint of (tool, arguments),
/// and the session when calls are shared per session only.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct CallKey {
    pub(crate) fingerprint: Fingerprint,
    pub(crate) session: Option<Arc<str>>,
}

struct Slot<W> {
    /// Tells this call apart from a later one with the same key.
    generation: u64,
    /// Callers waiting for this call's answer (the leader included).
    waiters: usize,
    /// A weak handle to the shared call (`WeakShared` of the service's
    /// future type): it never keeps the call alive by itself.
    call: W,
}

struct Map<W> {
    slots: HashMap<CallKey, Slot<W>, foldhash::fast::RandomState>,
    next_generation: u64,
}

/// The calls in flight of one service future type `W` (a layer keeps one
/// map per type, in practice one), bounded together with the layer's other
/// maps by one count: at most `max_keys` calls in flight that others may
/// join. A call past the bound is made on its own.
pub(crate) struct InFlight<W> {
    map: Mutex<Map<W>>,
    count: Arc<Count>,
}

/// The calls in flight of every map of one layer, and their bound.
#[derive(Debug)]
pub(crate) struct Count {
    pub(crate) len: AtomicUsize,
    pub(crate) max_keys: usize,
}

impl<W> fmt::Debug for InFlight<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlight")
            .field("count", &self.count)
            .finish()
    }
}

/// Leaving a call, whatever the map's type (what a caller's ticket holds).
pub(crate) trait Leave: Send + Sync {
    fn leave(&self, key: &CallKey, generation: u64, completed: bool);
}

/// What a caller did: joined a call in flight, led a new one, or neither.
pub(crate) enum Joined<T> {
    /// A call in flight, shared: its handle, and the generation to leave.
    Follower(T, u64),
    /// No call in flight: the caller made it; its handle and generation.
    Leader(T, u64),
    /// The map is full: the caller makes its call on its own.
    Alone,
}

impl<W> InFlight<W> {
    pub(crate) fn new(count: Arc<Count>) -> Self {
        InFlight {
            map: Mutex::new(Map {
                slots: HashMap::default(),
                next_generation: 0,
            }),
            count,
        }
    }

    /// Joins the call in flight for `key` (`upgrade` turns its stored weak
    /// handle into a shared one: `None` when the call is gone), or makes a
    /// new one with `make` (the shared handle and the weak one to store)
    /// and leads it. `make` runs under the lock, so that no identical call
    /// can start meanwhile: it only creates the inner service's future
    /// (tower's `call`), it does not drive it.
    pub(crate) fn join<T>(
        &self,
        key: &CallKey,
        upgrade: impl FnOnce(&W) -> Option<T>,
        make: impl FnOnce() -> (T, W),
    ) -> Joined<T> {
        let mut map = self.map.lock();
        if let Some(slot) = map.slots.get_mut(key) {
            if let Some(shared) = upgrade(&slot.call) {
                slot.waiters += 1;
                return Joined::Follower(shared, slot.generation);
            }
            // Gone (its last waiter is leaving): this caller starts a new
            // call in its place.
            map.slots.remove(key);
            self.count.len.fetch_sub(1, Ordering::Relaxed);
        }
        let reserved = self
            .count
            .len
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |len| {
                (len < self.count.max_keys).then_some(len + 1)
            });
        if reserved.is_err() {
            return Joined::Alone;
        }
        map.next_generation = map.next_generation.wrapping_add(1);
        let generation = map.next_generation;
        let (shared, call) = make();
        map.slots.insert(
            key.clone(),
            Slot {
                generation,
                waiters: 1,
                call,
            },
        );
        Joined::Leader(shared, generation)
    }
}

impl<W: Send> Leave for InFlight<W> {
    /// A caller leaves: when the call completed (its answer is out, so a
    /// new caller must make a new call) or its last waiter left (the call
    /// is dropped, cancelled), its entry goes.
    fn leave(&self, key: &CallKey, generation: u64, completed: bool) {
        let mut map = self.map.lock();
        let Some(slot) = map.slots.get_mut(key) else {
            return;
        };
        if slot.generation != generation {
            return;
        }
        slot.waiters = slot.waiters.saturating_sub(1);
        if completed || slot.waiters == 0 {
            map.slots.remove(key);
            self.count.len.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
