//! [`InFlight`]: the bounded map of calls in flight that others may join.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures_util::TryFuture;
use parking_lot::Mutex;
use toolwarden_core::Fingerprint;

use crate::call::SharedCall;

/// What identifies identical calls: the fingerprint of (tool, arguments),
/// and the session when calls are shared per session only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CallKey {
    pub(crate) fingerprint: Fingerprint,
    pub(crate) session: Option<Arc<str>>,
}

impl Hash for CallKey {
    /// The fingerprint is already a hash of the call: its low half is
    /// enough to place the key (equality still compares all of it), hashed
    /// again by the map's seeded hasher, so that nobody outside can choose
    /// colliding keys.
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.fingerprint.as_u64());
        if let Some(session) = &self.session {
            session.hash(state);
        }
    }
}

/// The boxed inner future of a call: boxed so that it stays pinned in its
/// shared call; an `Option` so that the box outlives the future and can
/// carry a next call's.
pub(crate) type Boxed<F> = Pin<Box<Option<F>>>;

/// The most answered calls a map keeps for the next calls.
const MAX_SPARE_CALLS: usize = 32;

struct Slot<F: TryFuture> {
    /// Tells this call apart from a later one with the same key.
    generation: u64,
    call: Arc<SharedCall<F>>,
}

struct Map<F: TryFuture> {
    slots: HashMap<CallKey, Slot<F>, foldhash::fast::RandomState>,
    next_generation: u64,
    /// Answered calls nobody holds any more, for the next calls: a call
    /// nobody joins then allocates nothing. At most [`MAX_SPARE_CALLS`].
    spare: Vec<Arc<SharedCall<F>>>,
}

/// The calls in flight of one service future type `F` (a layer keeps one
/// map per type, in practice one), bounded together with the layer's other
/// maps by one count: at most `max_keys` calls in flight that others may
/// join. A call past the bound is made on its own. Besides, it keeps up to
/// 32 answered calls (their allocations) for the next calls.
pub(crate) struct InFlight<F: TryFuture> {
    map: Mutex<Map<F>>,
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
    /// A call in flight: the caller's place in it, and the call's
    /// generation.
    Follower(Arc<SharedCall<F>>, usize, u64),
    /// No call in flight: the caller made it (with `make`) and leads it
    /// (at place [`LEADER`](crate::call::LEADER)); the call's generation.
    Leader(Arc<SharedCall<F>>, u64),
    /// The map is full: the caller makes its call on its own.
    Alone,
}

impl<F: TryFuture> InFlight<F> {
    pub(crate) fn new(count: Arc<Count>) -> Self {
        InFlight {
            map: Mutex::new(Map {
                slots: HashMap::default(),
                next_generation: 0,
                spare: Vec::new(),
            }),
            count,
        }
    }

    /// Joins the call in flight for `key`, or makes a new one with `make`
    /// (the inner service's `call`) and leads it. `make` runs under the
    /// lock, so that no identical call can start meanwhile: it only creates
    /// the inner service's future, it does not drive it.
    pub(crate) fn join(&self, key: &CallKey, make: impl FnOnce() -> F) -> Joined<F> {
        let mut guard = self.map.lock();
        let map = &mut *guard;
        let generation = map.next_generation.wrapping_add(1);
        let entry = match map.slots.entry(key.clone()) {
            Entry::Occupied(entry) => {
                let slot = entry.get();
                if let Some(place) = slot.call.join() {
                    return Joined::Follower(Arc::clone(&slot.call), place, slot.generation);
                }
                // Over (answered, or dropped by its last caller): this
                // caller makes a new call in its place, counted already.
                Entry::Occupied(entry)
            }
            Entry::Vacant(entry) => {
                let reserved =
                    self.count
                        .len
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |len| {
                            (len < self.count.max_keys).then_some(len + 1)
                        });
                if reserved.is_err() {
                    return Joined::Alone;
                }
                Entry::Vacant(entry)
            }
        };
        map.next_generation = generation;
        let future = make();
        let call = match map.spare.pop() {
            Some(mut call) => match Arc::get_mut(&mut call) {
                Some(unshared) => {
                    unshared.reuse(future);
                    call
                }
                // Not reachable: only calls nobody holds are kept.
                None => Arc::new(SharedCall::new(future)),
            },
            None => Arc::new(SharedCall::new(future)),
        };
        let slot = Slot {
            generation,
            call: Arc::clone(&call),
        };
        match entry {
            Entry::Occupied(mut entry) => {
                entry.insert(slot);
            }
            Entry::Vacant(entry) => {
                entry.insert(slot);
            }
        }
        Joined::Leader(call, generation)
    }

    /// Removes the slot of the call `generation` of `key`, if it is still
    /// there: what it held.
    fn remove_locked(&self, map: &mut Map<F>, key: &CallKey, generation: u64) -> Option<Slot<F>> {
        let slot = map.slots.remove(key)?;
        if slot.generation != generation {
            // Not this call's (a new call took the place of this one, over):
            // put it back.
            map.slots.insert(key.clone(), slot);
            return None;
        }
        self.count.len.fetch_sub(1, Ordering::Relaxed);
        Some(slot)
    }

    /// Removes the slot of a call that was dropped or panicked.
    pub(crate) fn remove(&self, key: &CallKey, generation: u64) {
        let slot = self.remove_locked(&mut self.map.lock(), key, generation);
        drop(slot);
    }

    /// A caller got the answer of `call`: removes the call's slot (a new
    /// caller makes a new call), and keeps `call` for a next call if
    /// nobody else holds it.
    pub(crate) fn finish(&self, key: &CallKey, generation: u64, call: Arc<SharedCall<F>>) {
        let mut map = self.map.lock();
        let slot = self.remove_locked(&mut map, key, generation);
        drop(slot);
        // Nobody else holds it (no `Weak` is ever made, and nobody can
        // clone it from here): it stays so, and `join` resets it.
        if map.spare.len() < MAX_SPARE_CALLS && Arc::strong_count(&call) == 1 {
            map.spare.push(call);
        }
    }
}
