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
//! moved out, not copied. Answered calls' `Arc`s (and their boxes) are kept
//! for the next calls when nobody else holds them (see
//! [`InFlight`](crate::inflight::InFlight)), so that a call nobody joins
//! allocates nothing once the layer has warmed up.
//!
//! Lock order: the map's lock, then a call's; never the other way round (a
//! caller that must remove the call's slot takes the map's lock after
//! releasing the call's).
//!
//! Panics: a panic of the inner future's `poll` unwinds to the caller whose
//! poll polled it; the call is then over (its future dropped, its slot
//! removed when that caller's future is dropped) and every other caller
//! waiting for it gets a [`SharedFailure`] whose source is
//! [`SharedCallPanicked`]. Nobody is left waiting.

use std::fmt;
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
    /// The inner future until the call is over; the box stays, empty, to
    /// carry a next call's.
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
    /// A caller's poll of the call panicked: a caller leaving removes the
    /// call's slot.
    panicked: bool,
}

/// One call in flight and its callers: see the [module docs](self).
pub(crate) struct SharedCall<F: TryFuture> {
    state: Mutex<State<F>>,
}

impl<F: TryFuture> fmt::Debug for SharedCall<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedCall").finish_non_exhaustive()
    }
}

/// A caller's poll that is over: its answer, and whether this caller's
/// poll got it (then it removes the call's slot).
pub(crate) struct Answer<F: TryFuture> {
    pub(crate) output: Output<F>,
    pub(crate) completed_here: bool,
}

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
    /// A call of `future` with its leader waiting.
    fn lead(&mut self, future: F) {
        self.future.set(Some(future));
        self.output = None;
        self.closed = false;
        self.waiting = 1;
        self.places.clear();
        self.places.push(Place::Waiting(None));
        self.poller = None;
        self.panicked = false;
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
    /// A call of `future`, its leader at place [`LEADER`].
    pub(crate) fn new(future: F) -> Self {
        let mut places = SmallVec::new();
        places.push(Place::Waiting(None));
        SharedCall {
            state: Mutex::new(State {
                future: Box::pin(Some(future)),
                output: None,
                closed: false,
                waiting: 1,
                places,
                poller: None,
                panicked: false,
            }),
        }
    }

    /// A kept call (answered) made a new call of `future` (it is not
    /// shared: no lock).
    pub(crate) fn reuse(&mut self, future: F) {
        self.state.get_mut().lead(future);
    }

    /// One more caller, unless the call is over: its place.
    pub(crate) fn join(&self) -> Option<usize> {
        let mut state = self.state.lock();
        if state.closed {
            return None;
        }
        state.waiting += 1;
        let place = match state.places.iter().position(|p| matches!(p, Place::Vacant)) {
            Some(place) => {
                state.places[place] = Place::Waiting(None);
                place
            }
            None => {
                state.places.push(Place::Waiting(None));
                state.places.len() - 1
            }
        };
        Some(place)
    }

    /// A caller leaves before collecting the answer. `true` when it must
    /// remove the call's slot: it was the last caller, and dropped the call
    /// (cancelled it); or the call panicked.
    pub(crate) fn leave(&self, place: usize) -> bool {
        let mut state = self.state.lock();
        if let Some(p) = state.places.get_mut(place) {
            *p = Place::Vacant;
        }
        state.waiting = state.waiting.saturating_sub(1);
        if state.closed {
            if state.waiting == 0 {
                state.output = None;
            }
            return std::mem::take(&mut state.panicked);
        }
        if state.waiting == 0 {
            state.closed = true;
            // Dropped under the call's lock, so that a caller arriving now
            // (it sees `closed`) starts its call after this one is gone.
            state.future.set(None);
            return true;
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
        false
    }

    /// A caller's poll: the answer if it is there, else polls the call.
    pub(crate) fn poll(&self, place: usize, cx: &mut Context<'_>) -> Poll<Answer<F>>
    where
        F::Ok: Clone,
        F::Error: Into<BoxError>,
    {
        let mut polling = Polling {
            state: self.state.lock(),
            done: false,
        };
        if polling.state.closed {
            // Answered by another caller's poll (or panicked there).
            polling.done = true;
            let output = polling.state.collect(place).unwrap_or_else(panicked);
            return Poll::Ready(Answer {
                output,
                completed_here: false,
            });
        }
        let poll = match polling.state.future.as_mut().as_pin_mut() {
            Some(future) => future.try_poll(cx),
            None => Poll::Pending,
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
                let output = output.map_err(|e| SharedFailure::new(e.into()));
                if state.waiting == 1 {
                    // Nobody else waits (most calls): the answer is this
                    // caller's, moved, not copied.
                    state.waiting = 0;
                    if let Some(p) = state.places.get_mut(place) {
                        *p = Place::Vacant;
                    }
                    drop(polling);
                    return Poll::Ready(Answer {
                        output,
                        completed_here: true,
                    });
                }
                state.output = Some(output);
                let output = state.collect(place).unwrap_or_else(panicked);
                let wakers = state.take_wakers(place);
                drop(polling);
                wake_all(wakers);
                Poll::Ready(Answer {
                    output,
                    completed_here: true,
                })
            }
        }
    }
}

/// Holds the call's lock while a caller polls the call: if the poll panics,
/// it closes the call and wakes the others (who get [`SharedCallPanicked`])
/// as the panic unwinds.
struct Polling<'a, F: TryFuture> {
    state: MutexGuard<'a, State<F>>,
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
        state.panicked = true;
        wake_all(state.take_wakers(usize::MAX));
    }
}
