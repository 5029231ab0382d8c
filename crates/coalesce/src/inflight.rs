//! [`InFlight`]: the bounded map of calls in flight that others may join.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
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

struct Slot {
    /// Tells this call apart from a later one with the same key.
    generation: u64,
    /// Callers waiting for this call's answer (the leader included).
    waiters: usize,
    /// A weak handle to the shared call (`WeakShared` of the service's
    /// future type): it never keeps the call alive by itself.
    call: Box<dyn Any + Send + Sync>,
}

#[derive(Default)]
struct Map {
    slots: HashMap<CallKey, Slot, foldhash::fast::RandomState>,
    next_generation: u64,
}

/// The calls in flight, at most `max_keys` of them; shared by every service
/// built from one layer. A call past the bound is made on its own.
pub(crate) struct InFlight {
    map: Mutex<Map>,
    max_keys: usize,
}

impl fmt::Debug for InFlight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlight")
            .field("len", &self.len())
            .field("max_keys", &self.max_keys)
            .finish()
    }
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

impl InFlight {
    pub(crate) fn new(max_keys: usize) -> Self {
        InFlight {
            map: Mutex::new(Map::default()),
            max_keys,
        }
    }

    /// Joins the call in flight for `key` (`upgrade` turns its stored weak
    /// handle into a shared one: `None` when the call is gone or of another
    /// service type), or makes a new one with `make` (the shared handle and
    /// the weak one to store) and leads it. `make` runs under the lock, so
    /// that no identical call can start meanwhile: it only creates the
    /// inner service's future (tower's `call`), it does not drive it.
    pub(crate) fn join<T>(
        &self,
        key: &CallKey,
        upgrade: impl FnOnce(&(dyn Any + Send + Sync)) -> Option<T>,
        make: impl FnOnce() -> (T, Box<dyn Any + Send + Sync>),
    ) -> Joined<T> {
        let mut map = self.map.lock();
        if let Some(slot) = map.slots.get_mut(key) {
            if let Some(shared) = upgrade(&*slot.call) {
                slot.waiters += 1;
                return Joined::Follower(shared, slot.generation);
            }
            // Gone (its last waiter is leaving) or of another service type:
            // this caller starts a new call in its place.
            map.slots.remove(key);
        }
        if map.slots.len() >= self.max_keys {
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

    /// A caller leaves: when the call completed (its answer is out, so a
    /// new caller must make a new call) or its last waiter left (the call
    /// is dropped, cancelled), its entry goes.
    pub(crate) fn leave(&self, key: &CallKey, generation: u64, completed: bool) {
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
        }
    }

    /// Calls in flight that others may join.
    pub(crate) fn len(&self) -> usize {
        self.map.lock().slots.len()
    }
}
