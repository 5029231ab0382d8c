//! [`ProgressRoutes`]: our progress tokens → their destinations, with a
//! tally per token (see the [module docs](super) on order).

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};

use rmcp::model::ProgressToken;
use rmcp::service::{Peer, ServiceRole};
use tokio::sync::Notify;

use super::receipt::{ProgressReceipt, Receipt};
use super::ProgressMark;
use super::{lock, UNKNOWN_TOKEN_POLL, UNKNOWN_TOKEN_WAIT};

/// Where progress for one of our tokens goes.
#[derive(Debug)]
enum Route<R: ServiceRole> {
    /// To this peer, under its own token.
    To(Peer<R>, ProgressToken, ProgressMark),
    /// Nobody asked for progress on this request: drop it.
    Nowhere,
}

impl<R: ServiceRole> Clone for Route<R> {
    fn clone(&self) -> Self {
        match self {
            Route::To(peer, token, mark) => Route::To(peer.clone(), token.clone(), mark.clone()),
            Route::Nowhere => Route::Nowhere,
        }
    }
}

/// What [`ProgressRoutes::resolve`] found for a token.
#[derive(Debug)]
pub enum Resolved<R: ServiceRole> {
    /// Send to this peer with this token, through the mark of every route
    /// to it ([`ProgressMark::forward`]).
    To(Peer<R>, ProgressToken, ProgressMark),
    /// The request is known but nobody asked for progress.
    Nowhere,
    /// No in-flight request has this token.
    Unknown,
}

/// What is known about one of our tokens.
pub(super) struct Entry<R: ServiceRole> {
    /// Where its progress goes, while a request sent under it is in flight.
    route: Option<Route<R>>,
    /// How many in-flight requests were sent under it: rmcp numbers tokens
    /// per connection, so after a reconnection a token can be in use twice.
    holders: u32,
    /// The number the next progress read for it gets.
    pub(super) next: u64,
    /// The lowest number whose progress is not forwarded yet: whose turn it is.
    pub(super) turn: u64,
    /// Numbers above `turn` whose progress is already forwarded (or dropped)
    /// out of turn: at most one per progress being handled.
    pub(super) done_early: BTreeSet<u64>,
    /// Woken whenever `turn` moves; made only when someone has to wait.
    moved: Option<Arc<Notify>>,
}

impl<R: ServiceRole> Entry<R> {
    fn empty() -> Self {
        Entry {
            route: None,
            holders: 0,
            next: 0,
            turn: 0,
            done_early: BTreeSet::new(),
            moved: None,
        }
    }

    /// Progress received for it and not yet forwarded.
    pub(super) fn unforwarded(&self) -> u64 {
        // Every number in turn..next is either pending or done early.
        self.next - self.turn - self.done_early.len() as u64
    }

    fn is_unused(&self) -> bool {
        self.holders == 0 && self.unforwarded() == 0
    }
}

/// Our progress tokens → their destination, for requests in flight, with a
/// tally of the progress received for each: how much, and how much of it is
/// forwarded (see the [module docs](super) on order).
///
/// Bounded: a token has an entry while a request sent under it is in flight
/// or while a progress notification received for it is being handled (each
/// is for at most the 200 ms wait for an unknown token, its turn and its
/// send, each bounded: see [`send_in_turn`](super::send_in_turn)); a token of no request is
/// forgotten once its progress is dropped. An entry holds a fixed few
/// fields plus at most one number per progress notification of its token
/// being handled.
pub struct ProgressRoutes<R: ServiceRole> {
    pub(super) entries: Mutex<HashMap<ProgressToken, Entry<R>>>,
}

impl<R: ServiceRole> fmt::Debug for ProgressRoutes<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProgressRoutes")
            .field("tokens", &lock(&self.entries).len())
            .finish()
    }
}

impl<R: ServiceRole> Default for ProgressRoutes<R> {
    fn default() -> Self {
        ProgressRoutes {
            entries: Mutex::new(HashMap::new()),
        }
    }
}

impl<R: ServiceRole> ProgressRoutes<R> {
    /// Routes progress for `ours` to `to` (peer and its token), or nowhere,
    /// until a matching [`remove`](Self::remove).
    pub fn insert(&self, ours: ProgressToken, to: Option<(Peer<R>, ProgressToken)>) {
        self.insert_marked(
            ours,
            to.map(|(peer, token)| (peer, token, ProgressMark::default())),
        );
    }

    /// [`insert`](Self::insert), through `mark`: the routes of one request's
    /// attempts share one.
    pub fn insert_marked(
        &self,
        ours: ProgressToken,
        to: Option<(Peer<R>, ProgressToken, ProgressMark)>,
    ) {
        let route = match to {
            Some((peer, token, mark)) => Route::To(peer, token, mark),
            None => Route::Nowhere,
        };
        let mut entries = lock(&self.entries);
        let entry = entries.entry(ours).or_insert_with(Entry::empty);
        entry.route = Some(route);
        entry.holders += 1;
    }

    /// Undoes one [`insert`](Self::insert) of `ours`: the route is forgotten
    /// when no request sent under `ours` is left in flight.
    pub fn remove(&self, ours: &ProgressToken) {
        let mut entries = lock(&self.entries);
        let Some(entry) = entries.get_mut(ours) else {
            return;
        };
        entry.holders = entry.holders.saturating_sub(1);
        if entry.holders == 0 {
            entry.route = None;
        }
        if entry.is_unused() {
            entries.remove(ours);
        }
    }

    /// How many tokens are routed.
    pub fn len(&self) -> usize {
        lock(&self.entries)
            .values()
            .filter(|entry| entry.route.is_some())
            .count()
    }

    /// Whether no token is routed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many tokens the map holds an entry for: the routed ones, and
    /// those with progress received and not yet forwarded.
    pub fn tracked(&self) -> usize {
        lock(&self.entries).len()
    }

    pub(super) fn lookup(&self, ours: &ProgressToken) -> Resolved<R> {
        match lock(&self.entries).get(ours).and_then(|e| e.route.as_ref()) {
            Some(Route::To(peer, token, mark)) => {
                Resolved::To(peer.clone(), token.clone(), mark.clone())
            }
            Some(Route::Nowhere) => Resolved::Nowhere,
            None => Resolved::Unknown,
        }
    }

    /// Finds where progress for `ours` goes, waiting up to 200 ms for a token
    /// whose request is still being sent.
    pub async fn resolve(&self, ours: &ProgressToken) -> Resolved<R> {
        let deadline = tokio::time::Instant::now() + UNKNOWN_TOKEN_WAIT;
        loop {
            match self.lookup(ours) {
                Resolved::Unknown if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(UNKNOWN_TOKEN_POLL).await;
                }
                found => return found,
            }
        }
    }

    /// Counts a progress notification for `ours` as received and gives it
    /// the next number of its token. It counts as forwarded when the returned
    /// receipt (and every clone of it) is dropped. Call it from the
    /// transport, as the notification is read, so it is counted (and
    /// numbered) before anything read after it.
    pub fn received(self: &Arc<Self>, ours: ProgressToken) -> ProgressReceipt<R> {
        let number = {
            let mut entries = lock(&self.entries);
            let entry = entries.entry(ours.clone()).or_insert_with(Entry::empty);
            entry.next += 1;
            entry.next - 1
        };
        ProgressReceipt(Arc::new(Receipt {
            routes: Arc::clone(self),
            token: ours,
            number,
        }))
    }

    /// Marks progress `number` of `ours` as forwarded (or dropped).
    pub(super) fn done(&self, ours: &ProgressToken, number: u64) {
        let mut entries = lock(&self.entries);
        let Some(entry) = entries.get_mut(ours) else {
            return;
        };
        if number > entry.turn {
            // Out of turn (dropped, or its wait ran out): the turn stays.
            entry.done_early.insert(number);
            return;
        }
        if number < entry.turn {
            return; // counted already; cannot happen
        }
        entry.turn += 1;
        while entry.done_early.remove(&entry.turn) {
            entry.turn += 1;
        }
        let moved = entry.moved.clone();
        if entry.is_unused() {
            entries.remove(ours);
        }
        drop(entries);
        if let Some(moved) = moved {
            moved.notify_waiters();
        }
    }

    /// How many progress notifications were read for `ours` so far (while
    /// it has an entry).
    pub(super) fn read_so_far(&self, ours: &ProgressToken) -> u64 {
        lock(&self.entries).get(ours).map_or(0, |entry| entry.next)
    }

    /// Completes once every progress of `ours` numbered below `number` has
    /// been forwarded (or dropped), or once `ours` has no entry.
    pub(super) async fn forwarded_below(&self, ours: &ProgressToken, number: u64) {
        let reached = |entries: &HashMap<ProgressToken, Entry<R>>| {
            entries.get(ours).is_none_or(|entry| entry.turn >= number)
        };
        loop {
            let moved = {
                let mut entries = lock(&self.entries);
                if reached(&entries) {
                    return;
                }
                let Some(entry) = entries.get_mut(ours) else {
                    return;
                };
                Arc::clone(entry.moved.get_or_insert_with(Arc::default))
            };
            let moved = moved.notified();
            tokio::pin!(moved);
            // Registered before the check, so a move between the check and
            // the wait is not missed.
            moved.as_mut().enable();
            if reached(&lock(&self.entries)) {
                return;
            }
            moved.await;
        }
    }
}
