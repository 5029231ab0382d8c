//! [`InFlight`]: the bounded map of calls in flight that others may join.

use std::collections::HashMap;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures_util::TryFuture;
use parking_lot::Mutex;
use toolwarden_core::Fingerprint;

use crate::call::{HandOver, SharedCall};

/// What identifies identical calls: the fingerprint of (tool, arguments),
/// and the session when calls are shared per session only.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct CallKey {
    pub(crate) fingerprint: Fingerprint,
    pub(crate) session: Option<Arc<str>>,
}

struct Slot<C> {
    /// Tells this call apart from a later one with the same key.
    generation: u64,
    /// What the call's followers share, from the first follower on: a call
    /// nobody joined has none (and costs no allocation of its own).
    shared: Option<Arc<C>>,
}

struct Map<C> {
    slots: HashMap<CallKey, Slot<C>, foldhash::fast::RandomState>,
    next_generation: u64,
}

/// The calls in flight of one service future type `F` (a layer keeps one
/// map per type, in practice one), bounded together with the layer's other
/// maps by one count: at most `max_keys` calls in flight that others may
/// join. A call past the bound is made on its own.
pub(crate) struct InFlight<F: TryFuture> {
    map: Mutex<Map<SharedCall<F>>>,
    count: Arc<Count>,
}

/// The calls in flight of every map of one layer, and their bound.
#[derive(Debug)]
pub(crate) struct Count {
    pub(crate) len: AtomicUsize,
    pub(crate) max_keys: usize,
}

impl<F: TryFuture> fmt::Debug for InFlight<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlight")
            .field("count", &self.count)
            .finish()
    }
}

/// What a caller did: joined a call in flight, led a new one, or neither.
pub(crate) enum Joined<F: TryFuture> {
    /// A call in flight: what its followers share, this follower's place
    /// in it, and the call's generation.
    Follower(Arc<SharedCall<F>>, usize, u64),
    /// No call in flight: the caller made it (the inner future `make`
    /// returned) and leads it; the call's generation.
    Leader(F, u64),
    /// The map is full: the caller makes its call on its own.
    Alone,
}

impl<F: TryFuture> InFlight<F> {
    pub(crate) fn new(count: Arc<Count>) -> Self {
        InFlight {
            map: Mutex::new(Map {
                slots: HashMap::default(),
                next_generation: 0,
            }),
            count,
        }
    }

    /// Joins the call in flight for `key`, or makes a new one with `make`
    /// (the inner service's `call`) and leads it. `make` runs under the
    /// lock, so that no identical call can start meanwhile: it only creates
    /// the inner service's future, it does not drive it.
    pub(crate) fn join(&self, key: &CallKey, make: impl FnOnce() -> F) -> Joined<F> {
        let mut map = self.map.lock();
        if let Some(slot) = map.slots.get_mut(key) {
            let generation = slot.generation;
            match &slot.shared {
                Some(shared) => {
                    if let Some(place) = shared.join() {
                        return Joined::Follower(Arc::clone(shared), place, generation);
                    }
                }
                None => {
                    let (shared, place) = SharedCall::with_follower();
                    let shared = Arc::new(shared);
                    slot.shared = Some(Arc::clone(&shared));
                    return Joined::Follower(shared, place, generation);
                }
            }
            // Over (answered, or dropped by its last caller): this caller
            // starts a new call in its place.
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
        let future = make();
        map.slots.insert(
            key.clone(),
            Slot {
                generation,
                shared: None,
            },
        );
        Joined::Leader(future, generation)
    }

    /// Removes the slot of the call `generation` of `key`, if it is still
    /// there: what it held.
    fn remove_locked(
        &self,
        map: &mut Map<SharedCall<F>>,
        key: &CallKey,
        generation: u64,
    ) -> Option<Slot<SharedCall<F>>> {
        if map.slots.get(key)?.generation != generation {
            return None;
        }
        let slot = map.slots.remove(key)?;
        self.count.len.fetch_sub(1, Ordering::Relaxed);
        Some(slot)
    }

    /// Removes the slot of a call that is over.
    pub(crate) fn remove(&self, key: &CallKey, generation: u64) {
        let slot = self.remove_locked(&mut self.map.lock(), key, generation);
        drop(slot);
    }

    /// The leader got its answer: removes the call's slot (a new caller
    /// makes a new call), giving what its followers share, if any joined.
    pub(crate) fn finish(&self, key: &CallKey, generation: u64) -> Option<Arc<SharedCall<F>>> {
        let slot = self.remove_locked(&mut self.map.lock(), key, generation);
        slot?.shared
    }

    /// The leader leaves before its answer: hands its call (`None` when its
    /// poll panicked) to the followers that wait, or removes the slot and
    /// drops the call (cancels it) when nobody does.
    pub(crate) fn abandon(&self, key: &CallKey, generation: u64, future: Option<Pin<Box<F>>>) {
        let mut map = self.map.lock();
        let future = match map.slots.get(key) {
            Some(slot) if slot.generation == generation => match &slot.shared {
                Some(shared) => match shared.hand_over(future) {
                    HandOver::Kept => return,
                    HandOver::Closed(future) => future,
                },
                None => future,
            },
            _ => future,
        };
        let slot = self.remove_locked(&mut map, key, generation);
        drop(map);
        // Dropped once the map is unlocked: it may do work of its own.
        drop(future);
        drop(slot);
    }
}
