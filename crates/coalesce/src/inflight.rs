//! [`InFlight`]: the bounded map of calls in flight that others may join,
//! and of answered calls' slots kept for the next call with their key.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures_util::TryFuture;
use parking_lot::Mutex;
use toolwarden_core::Fingerprint;

use crate::call::{Busy, SharedCall};

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

/// The most answered calls a map keeps, out of its slots, for new keys.
const MAX_SPARE_CALLS: usize = 32;

/// A map sweeps its answered calls' slots once it holds this many slots,
/// or twice as many as it held open after its last sweep if more.
const MIN_SWEEP_AT: usize = 64;

struct Map<F: TryFuture> {
    /// One slot per key: the call in flight, or the last answered one
    /// (closed, emptied), which carries the next call with that key.
    slots: HashMap<CallKey, Arc<SharedCall<F>>, foldhash::fast::RandomState>,
    /// Sweep the closed slots when `slots` holds this many.
    sweep_at: usize,
    /// Swept calls nobody holds any more, for new keys: a call nobody
    /// joins then allocates nothing. At most [`MAX_SPARE_CALLS`].
    spare: Vec<Arc<SharedCall<F>>>,
}

/// The calls of one service future type `F` (a layer keeps one map per
/// type, in practice one), bounded together with the layer's other maps by
/// one count of slots: at most `max_keys`. A new key past the bound first
/// sweeps this map's answered slots, and is made on its own if the map is
/// still full: at most `max_keys` calls in flight can be joined.
///
/// An answered call keeps its slot (closed, emptied) until the next call
/// with its key, which it then carries without allocating, or until a
/// sweep: one lock of the map per call, not one to register and one to
/// remove. A map sweeps when its slots reach `max(64, 2 × open)`, so it
/// keeps at most about as many answered slots as calls in flight, and at
/// least 64.
pub(crate) struct InFlight<F: TryFuture> {
    map: Mutex<Map<F>>,
    count: Arc<Count>,
}

/// The slots of every map of one layer, and their bound.
#[derive(Debug)]
pub(crate) struct Count {
    pub(crate) len: AtomicUsize,
    pub(crate) max_keys: usize,
}

impl Count {
    /// Takes one slot, unless the bound is reached.
    fn reserve(&self) -> bool {
        self.len
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |len| {
                (len < self.max_keys).then_some(len + 1)
            })
            .is_ok()
    }
}

impl<F: TryFuture> fmt::Debug for InFlight<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlight")
            .field("count", &self.count)
            .finish()
    }
}

/// A layer's map of one future type, its type erased (the layer keeps one
/// per future type): counted for [`CoalesceLayer::in_flight`](crate::CoalesceLayer::in_flight),
/// downcast by the services to their own.
pub(crate) trait ErasedMap: Any + Send + Sync {
    /// Calls in flight that others may join now.
    fn open(&self) -> usize;
    /// The map, to downcast.
    fn as_any(&self) -> &dyn Any;
}

impl<F> ErasedMap for InFlight<F>
where
    F: TryFuture + Send + 'static,
    F::Ok: Send,
{
    fn open(&self) -> usize {
        let map = self.map.lock();
        map.slots.values().filter(|call| !call.is_closed()).count()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// What a caller did: joined a call in flight, led a new one, or neither.
pub(crate) enum Joined<F: TryFuture> {
    /// A call in flight: the caller's place in it.
    Follower(Arc<SharedCall<F>>, usize),
    /// No call in flight: the caller made it (with `make`) and leads it
    /// (at place [`LEADER`](crate::call::LEADER)).
    Leader(Arc<SharedCall<F>>),
    /// The map is full: the caller makes its call on its own.
    Alone,
}

impl<F: TryFuture> InFlight<F> {
    pub(crate) fn new(count: Arc<Count>) -> Self {
        InFlight {
            map: Mutex::new(Map {
                slots: HashMap::default(),
                sweep_at: MIN_SWEEP_AT,
                spare: Vec::new(),
            }),
            count,
        }
    }

    /// Joins the call in flight for `key`, or registers a new one, makes
    /// it with `make` (the map unlocked) and leads it; `Alone` (nothing
    /// made) when the map is full.
    #[inline]
    pub(crate) fn join(&self, key: CallKey, make: impl FnOnce() -> F) -> Joined<F> {
        let call = loop {
            match self.register(&key) {
                Registered::Led(call) => break call,
                Registered::Joined(call, place) => return Joined::Follower(call, place),
                Registered::Full => return Joined::Alone,
                Registered::Busy(call) => {
                    // Joined with the map unlocked, once the poll is over
                    // (the handle held keeps the slot from carrying
                    // another call meanwhile); answered by then, the key
                    // is registered again.
                    if let Some(place) = call.join() {
                        return Joined::Follower(call, place);
                    }
                }
            }
        };
        // Abandons the call if `make` panics: who joined meanwhile is
        // answered (with an error), not left waiting.
        let mut making = Making {
            call: &call,
            made: false,
        };
        let future = make();
        making.made = true;
        drop(making);
        call.start(future);
        Joined::Leader(call)
    }

    /// Joins the call in flight for `key`, or registers a new one (not
    /// made yet) for the caller to make.
    fn register(&self, key: &CallKey) -> Registered<F> {
        let mut guard = self.map.lock();
        let map = &mut *guard;
        if map.slots.len() >= map.sweep_at {
            self.sweep(map);
        }
        let Map { slots, spare, .. } = map;
        // Looked up by reference: the key is copied only into a new entry
        // (a key's first call); the calls that find their entry copy
        // nothing.
        if let Some(call) = slots.get_mut(key) {
            // A closed call stays closed until reused, which takes this
            // lock: the flag is read without the call's lock, and `join`
            // checks again under it. A call being polled is joined after
            // this lock is released: nobody waits for a poll behind it.
            if !call.is_closed() {
                match call.try_join() {
                    Ok(Some(place)) => return Registered::Joined(Arc::clone(call), place),
                    Ok(None) => {}
                    Err(Busy) => return Registered::Busy(Arc::clone(call)),
                }
            }
            // Answered, or dropped by its last caller: the slot carries the
            // new call, in the same allocation unless a caller of the last
            // one still holds it (it then keeps it).
            match Arc::get_mut(call) {
                Some(unshared) => unshared.reuse(),
                None => *call = fresh(spare),
            }
            return Registered::Led(Arc::clone(call));
        }
        // Full: this map's answered slots make room, if any (the sweep only
        // removes, so the key is still absent after it).
        if !self.count.reserve() {
            self.sweep(map);
            if !self.count.reserve() {
                return Registered::Full;
            }
        }
        let call = fresh(&mut map.spare);
        map.slots.insert(key.clone(), Arc::clone(&call));
        Registered::Led(call)
    }

    /// Removes the closed slots, keeping up to [`MAX_SPARE_CALLS`] of their
    /// calls (those nobody else holds) for new keys, and sets the next
    /// sweep at twice the slots left open (at least [`MIN_SWEEP_AT`]).
    #[cold]
    fn sweep(&self, map: &mut Map<F>) {
        let before = map.slots.len();
        let spare = &mut map.spare;
        map.slots.retain(|_, call| {
            if !call.is_closed() {
                return true;
            }
            if spare.len() < MAX_SPARE_CALLS && Arc::strong_count(call) == 1 {
                spare.push(Arc::clone(call));
            }
            false
        });
        let removed = before - map.slots.len();
        self.count.len.fetch_sub(removed, Ordering::Relaxed);
        map.sweep_at = map.slots.len().saturating_mul(2).max(MIN_SWEEP_AT);
    }
}

/// What [`InFlight::register`] found: the caller leads a new call (not
/// made yet), joined one in flight, found one in flight being polled (to
/// join with the map unlocked), or neither (the map is full).
enum Registered<F: TryFuture> {
    Led(Arc<SharedCall<F>>),
    Joined(Arc<SharedCall<F>>, usize),
    Busy(Arc<SharedCall<F>>),
    Full,
}

/// While a leader makes its call: abandons it if the making panics.
struct Making<'a, F: TryFuture> {
    call: &'a SharedCall<F>,
    made: bool,
}

impl<F: TryFuture> Drop for Making<'_, F> {
    fn drop(&mut self) {
        if !self.made {
            self.call.abandon();
        }
    }
}

/// A new call in a kept allocation if there is one, else a new one.
fn fresh<F: TryFuture>(spare: &mut Vec<Arc<SharedCall<F>>>) -> Arc<SharedCall<F>> {
    while let Some(mut call) = spare.pop() {
        // Kept only when nobody else held it: nobody can have cloned it
        // since.
        if let Some(unshared) = Arc::get_mut(&mut call) {
            unshared.reuse();
            return call;
        }
    }
    Arc::new(SharedCall::new())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use std::future::{ready, Ready};
    use std::task::{Context, Poll};

    use futures::task::noop_waker_ref;

    use super::*;
    use crate::call::LEADER;

    type Answered = Ready<Result<u32, toolwarden_core::BoxError>>;

    fn key(n: u128) -> CallKey {
        CallKey {
            fingerprint: Fingerprint(n),
            session: None,
        }
    }

    /// Leads a call of `n` and collects its answer at once.
    fn answer(map: &InFlight<Answered>, n: u128) {
        let Joined::Leader(call) = map.join(key(n), || ready(Ok(7))) else {
            panic!("a lone call leads")
        };
        let mut cx = Context::from_waker(noop_waker_ref());
        assert!(matches!(call.poll(LEADER, &mut cx), Poll::Ready(Ok(7))));
    }

    /// A map bounded to `max_keys` slots, and its count.
    fn map_of(max_keys: usize) -> (InFlight<Answered>, Arc<Count>) {
        let count = Arc::new(Count {
            len: AtomicUsize::new(0),
            max_keys,
        });
        (InFlight::new(Arc::clone(&count)), count)
    }

    fn slots(map: &InFlight<Answered>) -> usize {
        map.map.lock().slots.len()
    }

    /// A waker that counts its wakes.
    struct Wakes(AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn the_call_is_made_with_the_map_unlocked_and_who_joins_meanwhile_is_woken_to_its_answer() {
        let (map, _) = map_of(100);
        let woken = Arc::new(Wakes(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(Arc::clone(&woken));
        let mut joined = None;
        let Joined::Leader(call) = map.join(key(1), || {
            assert!(
                map.map.try_lock().is_some(),
                "the map is not locked while the call is made"
            );
            // The inner service may call through the same map: another
            // key, and this call's own, which it joins.
            answer(&map, 2);
            let Joined::Follower(follower, place) = map.join(key(1), || panic!("not made twice"))
            else {
                panic!("the call is registered before it is made")
            };
            let mut cx = Context::from_waker(&waker);
            assert!(
                follower.poll(place, &mut cx).is_pending(),
                "not started yet"
            );
            joined = Some((follower, place));
            ready(Ok(7))
        }) else {
            panic!("a lone call leads")
        };
        assert_eq!(
            woken.0.load(Ordering::Relaxed),
            1,
            "starting the call woke who had polled it"
        );
        let (follower, place) = joined.unwrap();
        let mut cx = Context::from_waker(noop_waker_ref());
        // The follower, polled first, makes the call's answer; the leader
        // collects it.
        assert!(matches!(follower.poll(place, &mut cx), Poll::Ready(Ok(7))));
        assert!(matches!(call.poll(LEADER, &mut cx), Poll::Ready(Ok(7))));
        assert_eq!(map.open(), 0);
    }

    #[test]
    fn a_panic_while_the_call_is_made_answers_who_joined_with_an_error_and_frees_the_key() {
        let (map, _) = map_of(100);
        let woken = Arc::new(Wakes(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(Arc::clone(&woken));
        let mut joined = None;
        let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            map.join(key(1), || {
                assert!(map.map.try_lock().is_some(), "the map is not locked");
                let Joined::Follower(follower, place) = map.join(key(1), || panic!("not made"))
                else {
                    panic!("the call is registered before it is made")
                };
                let mut cx = Context::from_waker(&waker);
                assert!(follower.poll(place, &mut cx).is_pending());
                joined = Some((follower, place));
                panic!("the inner service's call panicked")
            })
        }));
        assert!(made.is_err(), "the panic reaches the leader");
        assert_eq!(woken.0.load(Ordering::Relaxed), 1, "the follower is woken");
        let (follower, place) = joined.unwrap();
        let mut cx = Context::from_waker(noop_waker_ref());
        let Poll::Ready(Err(failure)) = follower.poll(place, &mut cx) else {
            panic!("the follower is answered, with an error")
        };
        assert!(failure.error().is::<crate::SharedCallPanicked>());
        assert_eq!(map.open(), 0, "the call is over");
        answer(&map, 1); // the key leads a new call
    }

    #[test]
    fn a_call_joined_while_it_is_polled_holds_up_no_other_key() {
        use std::sync::mpsc;
        use std::time::Duration;

        type Blocking = futures::future::BoxFuture<'static, Result<u32, toolwarden_core::BoxError>>;
        fn answered(n: u32) -> Blocking {
            Box::pin(ready(Ok(n)))
        }
        let (_, count) = map_of(100);
        let map: InFlight<Blocking> = InFlight::new(count);
        let (polling_tx, polling) = mpsc::channel::<()>();
        let (release, released) = mpsc::channel::<()>();
        // Key 1's inner future blocks its poll until released: a caller
        // polls it (holding the call's lock) on thread `a`.
        let Joined::Leader(call) = map.join(key(1), move || {
            Box::pin(async move {
                polling_tx.send(()).unwrap();
                released.recv().unwrap();
                Ok::<u32, toolwarden_core::BoxError>(1)
            }) as Blocking
        }) else {
            panic!("a lone call leads")
        };
        std::thread::scope(|scope| {
            let a = scope.spawn(|| {
                let mut cx = Context::from_waker(noop_waker_ref());
                matches!(call.poll(LEADER, &mut cx), Poll::Ready(Ok(1)))
            });
            polling.recv().unwrap();
            // Thread `b` joins key 1 while it is polled: it waits for the
            // poll, but not with the map locked.
            let b = scope.spawn(|| match map.join(key(1), || answered(3)) {
                Joined::Follower(..) => "joined",
                Joined::Leader(..) => "led",
                Joined::Alone => "alone",
            });
            std::thread::sleep(Duration::from_millis(50));
            // Key 2 is registered meanwhile, on thread `c`.
            let (done_tx, done) = mpsc::channel();
            let map = &map;
            let c = scope.spawn(move || {
                let led = matches!(map.join(key(2), || answered(2)), Joined::Leader(..));
                done_tx.send(led).unwrap();
            });
            let other_key = done.recv_timeout(Duration::from_secs(10));
            release.send(()).unwrap();
            assert_eq!(other_key, Ok(true), "key 2 was not held up by key 1's poll");
            assert!(a.join().unwrap(), "the poll answered");
            // `b` waited for the poll, which answered the call: it leads a
            // new one.
            assert_eq!(b.join().unwrap(), "led");
            c.join().unwrap();
        });
    }

    #[test]
    fn answered_slots_are_kept_for_their_key_and_swept_past_min_sweep_at() {
        let (map, count) = map_of(10_000);
        // The same key again and again: one slot, carried from call to call.
        for _ in 0..100 {
            answer(&map, 1);
        }
        assert_eq!(slots(&map), 1);
        // Distinct keys: answered slots pile up to the sweep, never past it.
        for n in 2..=64 {
            answer(&map, n);
        }
        assert_eq!(slots(&map), MIN_SWEEP_AT);
        // The next new key sweeps the 64 answered slots, keeps 32 of their
        // calls for new keys, and carries its call in one of them.
        answer(&map, 65);
        assert_eq!(slots(&map), 1);
        assert_eq!(map.map.lock().spare.len(), MAX_SPARE_CALLS - 1);
        for n in 66..2_000 {
            answer(&map, n);
            assert!(slots(&map) <= MIN_SWEEP_AT, "{} slots", slots(&map));
            assert_eq!(count.len.load(Ordering::Relaxed), slots(&map));
        }
        assert_eq!(map.open(), 0);
    }

    #[test]
    fn open_calls_are_never_swept_and_the_next_sweep_waits_for_twice_as_many() {
        let (map, count) = map_of(10_000);
        // 100 calls led and never polled: open.
        let open: Vec<_> = (0..100)
            .map(|n| match map.join(key(n), || ready(Ok(1))) {
                Joined::Leader(call) => call,
                _ => panic!("a lone call leads"),
            })
            .collect();
        assert_eq!(map.open(), 100);
        assert_eq!(slots(&map), 100);
        // A follower of an open call joins it.
        assert!(matches!(
            map.join(key(5), || panic!("not made")),
            Joined::Follower(_, 1)
        ));
        // The sweep at 64 slots found every call open: the next is at 128.
        assert_eq!(map.map.lock().sweep_at, 128);
        for n in 1_000..1_028 {
            answer(&map, n);
        }
        assert_eq!(slots(&map), 128);
        // This one sweeps the 28 answered slots, and no open one; the next
        // sweep waits for twice the slots left.
        answer(&map, 2_000);
        assert_eq!(map.open(), 100, "the sweep kept every open call");
        assert_eq!(slots(&map), 101);
        assert_eq!(
            count.len.load(Ordering::Relaxed),
            101,
            "the count follows the sweep"
        );
        assert_eq!(map.map.lock().sweep_at, 200);
        drop(open);
    }
}
