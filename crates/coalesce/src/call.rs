//! [`SharedCall`]: one call in flight, shared by every caller waiting for it.
//!
//! One `Arc` per call holds, under one lock, the inner future (boxed, so
//! that it stays pinned while the `Arc` is shared), the answer once it
//! came, and the waiting callers' wakers. Every caller, the one that made
//! the call (the leader) and those that joined it (followers) alike, polls
//! the call when it is polled: the inner future then holds the waker of the
//! last caller that polled it (the poller). When the answer comes, the
//! caller whose poll got it keeps it for the others and wakes them; a
//! poller that leaves wakes the others, one of which polls in its place; the last
//! caller to leave drops the call (cancels it).
//!
//! A call nobody joins (most calls) is polled by its leader alone, with its
//! own waker (kept, cloned, only if the call waits), and its answer is
//! moved out, not copied. An answered call stays in its slot of the map,
//! closed and emptied (no future, no answer once collected), and carries
//! the next call with its key when nobody else holds it (see
//! [`InFlight`](crate::inflight::InFlight)), so that a call nobody joins
//! allocates nothing once the layer has warmed up, and nobody takes the
//! map's lock a second time to remove it.
//!
//! A call is registered (in the map, under the map's lock) before it is
//! made: its leader then calls the inner service with no lock held and
//! [starts](SharedCall::start) the call with the future it got, waking any
//! caller that joined meanwhile. An inner service may so make calls
//! through the same layer from its `call`, and a slow `call` holds up no
//! other key. If the inner service's `call` panics, the call is
//! [abandoned](SharedCall::abandon): those who joined get a
//! [`SharedFailure`] whose source is [`SharedCallPanicked`].
//!
//! Lock order: the map's lock, then a call's; never the other way round.
//! Under the map's lock a call's lock is only tried
//! ([`SharedCall::try_join`]), never waited for: a caller polling the
//! inner future holds its call's lock for that poll, and no call of
//! another key waits for it (nor deadlocks, when the inner future calls
//! through the same layer while a caller joins on another thread).
//!
//! Panics: a panic of the inner future's `poll` unwinds to the caller whose
//! poll polled it; the call is then over (its future dropped, its slot
//! closed) and every other caller waiting for it gets a [`SharedFailure`]
//! whose source is [`SharedCallPanicked`]. Nobody is left waiting.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};

use futures_util::TryFuture;
use parking_lot::{Mutex, MutexGuard};
use smallvec::SmallVec;
use toolwarden_core::BoxError;

use crate::error::{SharedCallPanicked, SharedFailure};
use crate::inflight::Boxed;

/// The answer of a shared call, as it is kept for the callers.
pub(crate) type Output<F> = Result<<F as TryFuture>::Ok, SharedFailure>;

/// A caller's place in the call.
enum Place {
    /// Free for the next caller.
    Vacant,
    /// A caller waits; its waker once its poll returned `Pending`.
    Waiting(Option<Waker>),
}

struct State<F: TryFuture> {
    /// The inner future from the call's [start](SharedCall::start) until it
    /// is over; the box stays, empty, to carry a next call's.
    future: Boxed<F>,
    /// The answer, once it came and while a caller has not collected it.
    output: Option<Output<F>>,
    /// Nobody may join any more: the answer came, or the call was dropped.
    closed: bool,
    /// Callers that have neither collected the answer nor left.
    waiting: usize,
    places: SmallVec<[Place; 2]>,
    /// The caller whose waker the inner future holds (the last to poll it).
    poller: Option<usize>,
}

/// One call in flight and its callers: see the [module docs](self).
pub(crate) struct SharedCall<F: TryFuture> {
    state: Mutex<State<F>>,
    /// `State::closed`, readable without the lock: written under it, and
    /// read by the map (under the map's lock) to tell an answered call's
    /// slot from a call that may be joined. A call is reopened only by
    /// [`reuse`](SharedCall::reuse), which holds it alone.
    closed: AtomicBool,
}

impl<F: TryFuture> fmt::Debug for SharedCall<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedCall").finish_non_exhaustive()
    }
}

/// A call's lock was held (a caller polls the inner future): see
/// [`SharedCall::try_join`].
#[derive(Debug)]
pub(crate) struct Busy;

/// The place of the caller that makes a call.
pub(crate) const LEADER: usize = 0;

type Wakers = SmallVec<[Waker; 4]>;

#[inline]
fn wake_all(wakers: Wakers) {
    if !wakers.is_empty() {
        wake_each(wakers);
    }
}

#[cold]
fn wake_each(wakers: Wakers) {
    for waker in wakers {
        waker.wake();
    }
}

fn panicked<T>() -> Result<T, SharedFailure> {
    Err(SharedFailure::new(BoxError::from(SharedCallPanicked)))
}

impl<F: TryFuture> State<F> {
    /// A call not made yet, its leader waiting.
    ///
    /// A call answered to its lone caller (most calls) left no future, no
    /// answer and one place: only what differs is written.
    #[inline]
    fn lead(&mut self) {
        if self.future.is_some() {
            self.future.set(None);
        }
        if self.output.is_some() {
            self.output = None;
        }
        self.closed = false;
        self.waiting = 1;
        match self.places.as_mut_slice() {
            [only] => *only = Place::Waiting(None),
            _ => {
                self.places.clear();
                self.places.push(Place::Waiting(None));
            }
        }
        self.poller = None;
    }

    /// Takes the wakers of every waiting caller but `except`, to wake once
    /// unlocked.
    fn take_wakers(&mut self, except: usize) -> Wakers {
        self.places
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| *i != except)
            .filter_map(|(_, place)| match place {
                Place::Waiting(waker) => waker.take(),
                Place::Vacant => None,
            })
            .collect()
    }

    fn register(&mut self, place: usize, cx: &Context<'_>) {
        if let Some(Place::Waiting(waker)) = self.places.get_mut(place) {
            match waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *waker = Some(cx.waker().clone()),
            }
        }
    }

    /// One more caller, unless the call is over: its place.
    fn join(&mut self) -> Option<usize> {
        if self.closed {
            return None;
        }
        self.waiting += 1;
        let place = match self.places.iter().position(|p| matches!(p, Place::Vacant)) {
            Some(place) => {
                self.places[place] = Place::Waiting(None);
                place
            }
            None => {
                self.places.push(Place::Waiting(None));
                self.places.len() - 1
            }
        };
        Some(place)
    }

    /// The answer for one caller collecting it: the last one takes it.
    fn collect(&mut self, place: usize) -> Option<Output<F>>
    where
        F::Ok: Clone,
    {
        let output = match self.waiting {
            1 => self.output.take(),
            _ => self.output.clone(),
        }
        .or_else(|| self.closed.then(panicked));
        if output.is_some() {
            self.waiting -= 1;
            if let Some(p) = self.places.get_mut(place) {
                *p = Place::Vacant;
            }
        }
        output
    }
}

impl<F: TryFuture> SharedCall<F> {
    /// A call not made yet, its leader at place [`LEADER`]: the leader
    /// [starts](Self::start) it.
    pub(crate) fn new() -> Self {
        let mut places = SmallVec::new();
        places.push(Place::Waiting(None));
        SharedCall {
            state: Mutex::new(State {
                future: Box::pin(None),
                output: None,
                closed: false,
                waiting: 1,
                places,
                poller: None,
            }),
            closed: AtomicBool::new(false),
        }
    }

    /// A kept call (answered) carries a new call, not made yet (it is not
    /// shared: no lock).
    pub(crate) fn reuse(&mut self) {
        self.state.get_mut().lead();
        *self.closed.get_mut() = false;
    }

    /// The leader made the call: `future` is its inner future. Callers
    /// that joined and polled meanwhile are woken to poll it.
    pub(crate) fn start(&self, future: F) {
        let mut state = self.state.lock();
        state.future.set(Some(future));
        if state.waiting > 1 {
            let wakers = state.take_wakers(LEADER);
            drop(state);
            wake_all(wakers);
        }
    }

    /// The leader could not make the call (the inner service's `call`
    /// panicked): the call is over, and those who joined are woken to an
    /// error ([`SharedCallPanicked`]).
    #[cold]
    pub(crate) fn abandon(&self) {
        let mut state = self.state.lock();
        if let Some(p) = state.places.get_mut(LEADER) {
            *p = Place::Vacant;
        }
        state.waiting = state.waiting.saturating_sub(1);
        state.closed = true;
        self.closed.store(true, Ordering::Relaxed);
        let wakers = state.take_wakers(LEADER);
        drop(state);
        wake_all(wakers);
    }

    /// Whether the call is over (answered, dropped, or panicked): nobody
    /// may join it, and its slot may carry a new call.
    #[inline]
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// One more caller, unless the call is over: its place. Waits for the
    /// call's lock (held while a caller polls the inner future): never
    /// called with the map's lock held (see [`try_join`](Self::try_join)).
    pub(crate) fn join(&self) -> Option<usize> {
        self.state.lock().join()
    }

    /// [`join`](Self::join) if the call's lock is free now, as the map
    /// does under its own lock: `Err(Busy)` if a caller holds it (polls
    /// the inner future), so that no call of any key waits for that poll
    /// behind the map's lock (nor deadlocks, if the inner future calls
    /// through the same layer).
    pub(crate) fn try_join(&self) -> Result<Option<usize>, Busy> {
        match self.state.try_lock() {
            Some(mut state) => Ok(state.join()),
            None => Err(Busy),
        }
    }

    /// A caller leaves before collecting the answer. The last caller to
    /// leave drops the call (cancels it); its slot then stays, closed, for
    /// the next call with its key or the map's sweep.
    pub(crate) fn leave(&self, place: usize) {
        let mut state = self.state.lock();
        if let Some(p) = state.places.get_mut(place) {
            *p = Place::Vacant;
        }
        state.waiting = state.waiting.saturating_sub(1);
        if state.closed {
            if state.waiting == 0 {
                state.output = None;
            }
            return;
        }
        if state.waiting == 0 {
            state.closed = true;
            self.closed.store(true, Ordering::Relaxed);
            // Dropped under the call's lock, so that a caller arriving now
            // (it sees `closed`) starts its call after this one is gone.
            state.future.set(None);
            return;
        }
        if state.poller == Some(place) {
            // The inner future holds this caller's waker: another must poll.
            // All are woken, not one: one that is woken but not polled (its
            // task busy elsewhere) must not leave the others waiting.
            state.poller = None;
            let wakers = state.take_wakers(place);
            drop(state);
            wake_all(wakers);
        }
    }

    /// A caller's poll: the answer if it is there, else polls the call.
    pub(crate) fn poll(&self, place: usize, cx: &mut Context<'_>) -> Poll<Output<F>>
    where
        F::Ok: Clone,
        F::Error: Into<BoxError>,
    {
        let mut polling = Polling {
            state: self.state.lock(),
            closed: &self.closed,
            done: false,
        };
        if polling.state.closed {
            // Answered by another caller's poll (or panicked there).
            polling.done = true;
            return Poll::Ready(polling.state.collect(place).unwrap_or_else(panicked));
        }
        let poll = match polling.state.future.as_mut().as_pin_mut() {
            Some(future) => future.try_poll(cx),
            None => {
                // Not started: its leader is still making it, and wakes
                // this caller when it has.
                polling.done = true;
                polling.state.register(place, cx);
                return Poll::Pending;
            }
        };
        polling.done = true;
        let state = &mut polling.state;
        match poll {
            Poll::Pending => {
                state.poller = Some(place);
                // Registered even when nobody else waits, since a caller
                // may join and complete the call; cheap once registered.
                state.register(place, cx);
                Poll::Pending
            }
            Poll::Ready(output) => {
                state.future.set(None);
                state.closed = true;
                self.closed.store(true, Ordering::Relaxed);
                let output = output.map_err(|e| SharedFailure::new(e.into()));
                if state.waiting == 1 {
                    // Nobody else waits (most calls): the answer is this
                    // caller's, moved, not copied.
                    state.waiting = 0;
                    if let Some(p) = state.places.get_mut(place) {
                        *p = Place::Vacant;
                    }
                    drop(polling);
                    return Poll::Ready(output);
                }
                state.output = Some(output);
                let output = state.collect(place).unwrap_or_else(panicked);
                let wakers = state.take_wakers(place);
                drop(polling);
                wake_all(wakers);
                Poll::Ready(output)
            }
        }
    }
}

/// Holds the call's lock while a caller polls the call: if the poll panics,
/// it closes the call and wakes the others (who get [`SharedCallPanicked`])
/// as the panic unwinds.
struct Polling<'a, F: TryFuture> {
    state: MutexGuard<'a, State<F>>,
    closed: &'a AtomicBool,
    done: bool,
}

impl<F: TryFuture> Drop for Polling<'_, F> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let state = &mut self.state;
        state.future.set(None);
        state.closed = true;
        self.closed.store(true, Ordering::Relaxed);
        wake_all(state.take_wakers(usize::MAX));
    }
}
