//! [`SharedCall`]: what the followers of a call share with its leader.
//!
//! A call that nobody joins (most calls) never has one: its leader polls
//! its own boxed inner future on its own task, with no lock and no waker
//! of ours. The first follower to join allocates the `SharedCall` (one
//! `Arc`) and stores it in the call's map slot; later followers share it.
//!
//! While the leader is there it polls the call; followers wait with their
//! wakers registered here, and the leader, when the answer comes, stores a
//! copy of it here and wakes them. When the leader leaves before the
//! answer, it hands the inner future over (a `Pin<Box<F>>` moves without
//! moving the future) and wakes one follower, which polls it from then on;
//! whichever follower is polled polls the call, and a follower that leaves
//! while the call holds its waker wakes another. The last caller to leave
//! drops the call (cancels it).
//!
//! Lock order: the map's lock, then a call's; never the other way round
//! (a follower that must remove the call's slot takes the map's lock after
//! releasing the call's).
//!
//! Panics: a panic of the inner future's `poll` unwinds to the caller whose
//! poll polled it; the call is then over (its future dropped, its slot
//! removed) and every other caller waiting for it gets a [`SharedFailure`]
//! whose source is [`SharedCallPanicked`](crate::error::SharedCallPanicked).
//! Nobody is left waiting.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use futures_util::TryFuture;
use parking_lot::{Mutex, MutexGuard};
use smallvec::SmallVec;
use toolwarden_core::BoxError;

use crate::error::{SharedCallPanicked, SharedFailure};

/// The answer of a shared call, as it is kept for the followers.
pub(crate) type Output<F> = Result<<F as TryFuture>::Ok, SharedFailure>;

/// A follower's place in the call.
enum Place {
    /// Free for the next follower.
    Vacant,
    /// A follower waits; its waker once it was polled.
    Waiting(Option<Waker>),
}

struct State<F: TryFuture> {
    /// The leader still holds the call and polls it.
    leader: bool,
    /// The call, once the leader handed it over.
    future: Option<Pin<Box<F>>>,
    /// The answer, once it came and while a follower has not collected it.
    output: Option<Output<F>>,
    /// Nobody may join any more: the answer came, or the call was dropped.
    closed: bool,
    /// Followers that have not collected the answer nor left.
    waiting: usize,
    places: SmallVec<[Place; 2]>,
    /// The follower whose waker the handed-over call holds (the last to poll it).
    poller: Option<usize>,
    /// A follower's poll of the call panicked: that follower, leaving,
    /// removes the call's slot.
    panicked: bool,
}

/// What the followers of one call share: see the [module docs](self).
pub(crate) struct SharedCall<F: TryFuture> {
    state: Mutex<State<F>>,
}

impl<F: TryFuture> fmt::Debug for SharedCall<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedCall").finish_non_exhaustive()
    }
}

/// What the leader leaving did with its call.
pub(crate) enum HandOver<F> {
    /// Followers wait: they have the call now; its slot stays.
    Kept,
    /// Nobody waits (or the call panicked): the slot goes; drop this
    /// future, the call, once the map's lock is released.
    Closed(Option<Pin<Box<F>>>),
}

/// A follower's poll: the answer, and whether this follower completed the
/// call (then it removes the call's slot).
pub(crate) struct Answer<F: TryFuture> {
    pub(crate) output: Output<F>,
    pub(crate) completed_here: bool,
}

type Wakers = SmallVec<[Waker; 4]>;

fn wake_all(wakers: Wakers) {
    for waker in wakers {
        waker.wake();
    }
}

impl<F: TryFuture> State<F> {
    /// Takes the wakers of every waiting follower (to wake once unlocked).
    fn take_wakers(&mut self) -> Wakers {
        self.places
            .iter_mut()
            .filter_map(|place| match place {
                Place::Waiting(waker) => waker.take(),
                Place::Vacant => None,
            })
            .collect()
    }

    /// The waker of one waiting follower other than `except`, to take over
    /// the polling.
    fn take_one_waker(&mut self, except: Option<usize>) -> Option<Waker> {
        self.places
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| Some(*i) != except)
            .find_map(|(_, place)| match place {
                Place::Waiting(waker) => waker.take(),
                Place::Vacant => None,
            })
    }

    fn register(&mut self, place: usize, cx: &Context<'_>) {
        if let Some(Place::Waiting(waker)) = self.places.get_mut(place) {
            match waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *waker = Some(cx.waker().clone()),
            }
        }
    }

    /// The answer for one follower collecting it: the last one takes it.
    fn collect(&mut self, place: usize) -> Option<Output<F>>
    where
        F::Ok: Clone,
    {
        let output = match self.waiting {
            1 => self.output.take(),
            _ => self.output.clone(),
        }
        .or_else(|| (self.closed).then(panicked));
        if output.is_some() {
            self.waiting -= 1;
            if let Some(p) = self.places.get_mut(place) {
                *p = Place::Vacant;
            }
        }
        output
    }
}

fn panicked<T>() -> Result<T, SharedFailure> {
    Err(SharedFailure::new(BoxError::from(SharedCallPanicked)))
}

impl<F: TryFuture> SharedCall<F> {
    /// A call its leader holds, with one follower (place 0).
    pub(crate) fn with_follower() -> (Self, usize) {
        let mut places = SmallVec::new();
        places.push(Place::Waiting(None));
        let call = SharedCall {
            state: Mutex::new(State {
                leader: true,
                future: None,
                output: None,
                closed: false,
                waiting: 1,
                places,
                poller: None,
                panicked: false,
            }),
        };
        (call, 0)
    }

    /// One more follower, unless the call is over: its place.
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

    /// The leader got the answer (its slot is already out of the map):
    /// keeps a copy for the followers that wait, and wakes them.
    pub(crate) fn complete(&self, output: impl FnOnce() -> Output<F>) {
        let mut state = self.state.lock();
        state.leader = false;
        state.closed = true;
        if state.waiting == 0 {
            return;
        }
        state.output = Some(output());
        let wakers = state.take_wakers();
        drop(state);
        wake_all(wakers);
    }

    /// The leader leaves before the answer, under the map's lock: hands
    /// its call (`None` when its poll panicked) to the followers that
    /// wait, or closes it.
    pub(crate) fn hand_over(&self, future: Option<Pin<Box<F>>>) -> HandOver<F> {
        let mut state = self.state.lock();
        state.leader = false;
        if state.waiting > 0 && future.is_some() {
            state.future = future;
            state.poller = None;
            let waker = state.take_one_waker(None);
            drop(state);
            if let Some(waker) = waker {
                waker.wake();
            }
            return HandOver::Kept;
        }
        // Nobody waits, or the call panicked: those who wait get the error.
        state.closed = true;
        let wakers = state.take_wakers();
        drop(state);
        wake_all(wakers);
        HandOver::Closed(future)
    }

    /// A follower leaves before collecting the answer. `true` when it was
    /// the last caller of a handed-over call, which it dropped (cancelled):
    /// it then removes the call's slot.
    pub(crate) fn leave(&self, place: usize) -> bool {
        let mut state = self.state.lock();
        if let Some(p) = state.places.get_mut(place) {
            *p = Place::Vacant;
        }
        state.waiting = state.waiting.saturating_sub(1);
        if state.closed || state.leader {
            if state.waiting == 0 {
                state.output = None;
            }
            return std::mem::take(&mut state.panicked);
        }
        if state.waiting == 0 {
            state.closed = true;
            // Dropped under the call's lock, so that a caller arriving now
            // (it sees `closed`) starts its call after this one is gone.
            state.future = None;
            return true;
        }
        if state.poller == Some(place) {
            // The call holds this follower's waker: another must poll it.
            state.poller = None;
            let waker = state.take_one_waker(Some(place));
            drop(state);
            if let Some(waker) = waker {
                waker.wake();
            }
        }
        false
    }

    /// A follower's poll: the answer if it is there; else, once the leader
    /// handed the call over, polls it.
    pub(crate) fn poll_follower(&self, place: usize, cx: &mut Context<'_>) -> Poll<Answer<F>>
    where
        F::Ok: Clone,
        F::Error: Into<BoxError>,
    {
        let mut state = self.state.lock();
        if let Some(output) = state.collect(place) {
            return Poll::Ready(Answer {
                output,
                completed_here: false,
            });
        }
        if state.leader || state.future.is_none() {
            state.register(place, cx);
            return Poll::Pending;
        }
        let mut polling = Polling {
            state: Some(state),
            done: false,
        };
        let Some(guard) = polling.state.as_mut() else {
            return Poll::Pending;
        };
        let poll = match guard.future.as_mut() {
            Some(future) => future.as_mut().try_poll(cx),
            None => Poll::Pending,
        };
        polling.done = true;
        let Some(mut state) = polling.state.take() else {
            return Poll::Pending;
        };
        match poll {
            Poll::Pending => {
                state.poller = Some(place);
                state.register(place, cx);
                Poll::Pending
            }
            Poll::Ready(output) => {
                let output = output.map_err(|e| SharedFailure::new(e.into()));
                state.future = None;
                state.closed = true;
                state.output = Some(output);
                let output = state.collect(place).unwrap_or_else(panicked);
                let wakers = state.take_wakers();
                drop(state);
                wake_all(wakers);
                Poll::Ready(Answer {
                    output,
                    completed_here: true,
                })
            }
        }
    }
}

/// Holds the call's lock while a follower polls the call: if the poll
/// panics, it closes the call and wakes the others (who get
/// [`SharedCallPanicked`]) as the panic unwinds. The panicking follower's
/// own leaving (when its future is dropped) then removes the slot.
struct Polling<'a, F: TryFuture> {
    state: Option<MutexGuard<'a, State<F>>>,
    done: bool,
}

impl<F: TryFuture> Drop for Polling<'_, F> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Some(mut state) = self.state.take() {
            state.future = None;
            state.closed = true;
            state.panicked = true;
            let wakers = state.take_wakers();
            drop(state);
            wake_all(wakers);
        }
    }
}
