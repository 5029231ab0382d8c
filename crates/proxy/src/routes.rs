//! Where server→client traffic goes: the connected downstream clients, and
//! the progress tokens the proxy put on requests it forwarded.
//!
//! rmcp replaces the `progressToken` of every request it sends with one of its
//! own. So when the proxy forwards a request that carries a client's token,
//! it records "our token → (that client, its token)" once the request has been
//! sent, and a `notifications/progress` for our token is re-addressed to the
//! client with the client's token. The same holds the other way round for
//! requests the server sends to a client (sampling, roots, elicitation).
//!
//! A route lives as long as its request is in flight ([`RouteGuard`] removes
//! it), so the map holds one entry per in-flight request attempt, plus one
//! per token whose progress is being forwarded just then (see
//! [`ProgressRoutes`]).
//! A progress notification can arrive before the route of its request is
//! recorded (the token is known only once rmcp queued the request); the
//! receiving side waits a little for an unknown token ([`ProgressRoutes::resolve`]).
//!
//! Progress reaches the client before the response to its request, never
//! after. rmcp handles each notification in a task of its own but hands a
//! response straight to the waiting request, so left alone the response could
//! overtake the progress sent before it. Therefore the upstream transport
//! counts each progress notification as it reads it
//! ([`ProgressRoutes::received`]), necessarily before it reads the response
//! behind it; the notification carries a [`ProgressReceipt`] that is dropped
//! once the notification is forwarded (or dropped), and the proxy answers a
//! request only when every progress received for its tokens has been
//! forwarded ([`RouteGuard::progress_forwarded`], bounded by the caller).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rmcp::model::ProgressToken;
use rmcp::service::{Peer, RoleServer, ServiceRole};
use tokio::sync::Notify;

/// How long an unknown progress token is waited for, in total.
const UNKNOWN_TOKEN_WAIT: Duration = Duration::from_millis(200);
const UNKNOWN_TOKEN_POLL: Duration = Duration::from_millis(10);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps hold plain data: a panic elsewhere cannot leave them inconsistent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where progress for one of our tokens goes.
#[derive(Debug)]
enum Route<R: ServiceRole> {
    /// To this peer, under its own token.
    To(Peer<R>, ProgressToken),
    /// Nobody asked for progress on this request: drop it.
    Nowhere,
}

impl<R: ServiceRole> Clone for Route<R> {
    fn clone(&self) -> Self {
        match self {
            Route::To(peer, token) => Route::To(peer.clone(), token.clone()),
            Route::Nowhere => Route::Nowhere,
        }
    }
}

/// What [`ProgressRoutes::resolve`] found for a token.
#[derive(Debug)]
pub enum Resolved<R: ServiceRole> {
    /// Send to this peer with this token.
    To(Peer<R>, ProgressToken),
    /// The request is known but nobody asked for progress.
    Nowhere,
    /// No in-flight request has this token.
    Unknown,
}

/// What is known about one of our tokens.
struct Entry<R: ServiceRole> {
    /// Where its progress goes, while a request sent under it is in flight.
    route: Option<Route<R>>,
    /// How many in-flight requests were sent under it: rmcp numbers tokens
    /// per connection, so after a reconnection a token can be in use twice.
    holders: u32,
    /// Progress notifications received for it and not yet forwarded.
    unforwarded: u32,
}

impl<R: ServiceRole> Entry<R> {
    fn empty() -> Self {
        Entry {
            route: None,
            holders: 0,
            unforwarded: 0,
        }
    }

    fn is_unused(&self) -> bool {
        self.holders == 0 && self.unforwarded == 0
    }
}

/// Our progress tokens → their destination, for requests in flight, with a
/// tally of the progress received for each and not yet forwarded.
///
/// Bounded: a token has an entry while a request sent under it is in flight
/// or while a progress notification received for it is being handled (each
/// is, within the 200 ms wait for an unknown token plus one send to a
/// client); a token of no request is forgotten once its progress is dropped.
pub struct ProgressRoutes<R: ServiceRole> {
    entries: Mutex<HashMap<ProgressToken, Entry<R>>>,
    /// Woken whenever a token's last unforwarded progress was forwarded.
    forwarded: Notify,
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
            forwarded: Notify::new(),
        }
    }
}

impl<R: ServiceRole> ProgressRoutes<R> {
    /// Routes progress for `ours` to `to` (peer and its token), or nowhere,
    /// until a matching [`remove`](Self::remove).
    pub fn insert(&self, ours: ProgressToken, to: Option<(Peer<R>, ProgressToken)>) {
        let route = match to {
            Some((peer, token)) => Route::To(peer, token),
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

    fn lookup(&self, ours: &ProgressToken) -> Resolved<R> {
        match lock(&self.entries).get(ours).and_then(|e| e.route.as_ref()) {
            Some(Route::To(peer, token)) => Resolved::To(peer.clone(), token.clone()),
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

    /// Counts a progress notification for `ours` as received; it counts as
    /// forwarded when the returned receipt (and every clone of it) is dropped.
    /// Call it from the transport, as the notification is read, so it is
    /// counted before any response read after it.
    pub fn received(self: &Arc<Self>, ours: ProgressToken) -> ProgressReceipt<R> {
        lock(&self.entries)
            .entry(ours.clone())
            .or_insert_with(Entry::empty)
            .unforwarded += 1;
        ProgressReceipt(Arc::new(Receipt {
            routes: Arc::clone(self),
            token: ours,
        }))
    }

    fn forwarded(&self, ours: &ProgressToken) {
        let mut entries = lock(&self.entries);
        let Some(entry) = entries.get_mut(ours) else {
            return;
        };
        entry.unforwarded = entry.unforwarded.saturating_sub(1);
        if entry.unforwarded > 0 {
            return;
        }
        if entry.is_unused() {
            entries.remove(ours);
        }
        drop(entries);
        self.forwarded.notify_waiters();
    }

    /// Whether some progress received for one of `tokens` is not forwarded yet.
    fn any_unforwarded(&self, tokens: &[ProgressToken]) -> bool {
        let entries = lock(&self.entries);
        tokens
            .iter()
            .any(|token| entries.get(token).is_some_and(|e| e.unforwarded > 0))
    }
}

/// A progress notification counted by [`ProgressRoutes::received`] and not
/// yet forwarded. It rides in the notification's extensions; the handler
/// drops it once the notification is forwarded (or dropped). Clones share
/// it: the notification counts as forwarded when the last one is dropped.
pub struct ProgressReceipt<R: ServiceRole>(Arc<Receipt<R>>);

struct Receipt<R: ServiceRole> {
    routes: Arc<ProgressRoutes<R>>,
    token: ProgressToken,
}

impl<R: ServiceRole> Drop for Receipt<R> {
    fn drop(&mut self) {
        self.routes.forwarded(&self.token);
    }
}

impl<R: ServiceRole> Clone for ProgressReceipt<R> {
    fn clone(&self) -> Self {
        ProgressReceipt(Arc::clone(&self.0))
    }
}

impl<R: ServiceRole> fmt::Debug for ProgressReceipt<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ProgressReceipt")
            .field(&self.0.token)
            .finish()
    }
}

/// Removes the routes recorded for one forwarded request when it ends.
pub struct RouteGuard<R: ServiceRole> {
    routes: Arc<ProgressRoutes<R>>,
    tokens: Arc<Mutex<Vec<ProgressToken>>>,
    to: Option<(Peer<R>, ProgressToken)>,
}

impl<R: ServiceRole> fmt::Debug for RouteGuard<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteGuard")
            .field("tokens", &lock(&self.tokens).len())
            .field("routed", &self.to.is_some())
            .finish()
    }
}

impl<R: ServiceRole> RouteGuard<R> {
    /// A guard for a request whose progress goes to `to` (peer and its
    /// token), or nowhere.
    pub fn new(routes: Arc<ProgressRoutes<R>>, to: Option<(Peer<R>, ProgressToken)>) -> Self {
        RouteGuard {
            routes,
            tokens: Arc::default(),
            to,
        }
    }

    /// Records that an attempt of the request went out under `ours`.
    pub fn sent(&self, ours: &ProgressToken) {
        lock(&self.tokens).push(ours.clone());
        self.routes.insert(ours.clone(), self.to.clone());
    }

    /// A hook recording each attempt, for `toolwarden_rmcp::OnRequestSent`.
    pub fn hook(&self) -> impl Fn(&ProgressToken) + Send + Sync + 'static {
        let routes = Arc::clone(&self.routes);
        let tokens = Arc::clone(&self.tokens);
        let to = self.to.clone();
        move |ours| {
            lock(&tokens).push(ours.clone());
            routes.insert(ours.clone(), to.clone());
        }
    }

    /// Completes once every progress notification received so far for the
    /// request's attempts has been forwarded (or dropped); at once when there
    /// is none. Await it after the response arrived and before passing it
    /// on, so the client sees the progress first. It waits on the handler's
    /// tasks, so bound it: a task that never finishes would stall it.
    pub async fn progress_forwarded(&self) {
        loop {
            let forwarded = self.routes.forwarded.notified();
            tokio::pin!(forwarded);
            // Registered before the check, so a wake-up between the check
            // and the wait is not missed.
            forwarded.as_mut().enable();
            let pending = {
                let tokens = lock(&self.tokens);
                self.routes.any_unforwarded(&tokens)
            };
            if !pending {
                return;
            }
            forwarded.await;
        }
    }
}

impl<R: ServiceRole> Drop for RouteGuard<R> {
    fn drop(&mut self) {
        for token in lock(&self.tokens).drain(..) {
            self.routes.remove(&token);
        }
    }
}

/// An id for one connected downstream client.
pub type DownstreamId = u64;

struct Downstream {
    id: DownstreamId,
    peer: Peer<RoleServer>,
    /// Bumped on every request, so the most recently active client is known.
    last_active: u64,
}

#[derive(Default)]
struct Registry {
    clients: Vec<Downstream>,
    next_id: DownstreamId,
    clock: u64,
}

/// The connected downstream clients (one over stdio, one per session over
/// HTTP). Entries are removed when their session ends, and closed ones are
/// pruned whenever a client registers, so the list holds at most the open
/// sessions.
#[derive(Clone, Default)]
pub struct Downstreams {
    registry: Arc<Mutex<Registry>>,
}

impl fmt::Debug for Downstreams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Downstreams")
            .field("clients", &lock(&self.registry).clients.len())
            .finish()
    }
}

impl Downstreams {
    /// No clients.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a client; returns its id.
    pub fn register(&self, peer: Peer<RoleServer>) -> DownstreamId {
        let mut registry = lock(&self.registry);
        registry.clients.retain(|c| !c.peer.is_transport_closed());
        registry.next_id += 1;
        registry.clock += 1;
        let id = registry.next_id;
        let last_active = registry.clock;
        registry.clients.push(Downstream {
            id,
            peer,
            last_active,
        });
        id
    }

    /// Marks a client as the most recently active.
    pub fn touch(&self, id: DownstreamId) {
        let mut registry = lock(&self.registry);
        registry.clock += 1;
        let now = registry.clock;
        if let Some(client) = registry.clients.iter_mut().find(|c| c.id == id) {
            client.last_active = now;
        }
    }

    /// Removes a client.
    pub fn remove(&self, id: DownstreamId) {
        lock(&self.registry).clients.retain(|c| c.id != id);
    }

    /// The most recently active open client: where server→client requests
    /// go (with several HTTP sessions, this is a guess; see the crate docs).
    pub fn most_recent(&self) -> Option<Peer<RoleServer>> {
        lock(&self.registry)
            .clients
            .iter()
            .filter(|c| !c.peer.is_transport_closed())
            .max_by_key(|c| c.last_active)
            .map(|c| c.peer.clone())
    }

    /// Every open client: where server notifications are broadcast.
    pub fn all(&self) -> Vec<Peer<RoleServer>> {
        lock(&self.registry)
            .clients
            .iter()
            .filter(|c| !c.peer.is_transport_closed())
            .map(|c| c.peer.clone())
            .collect()
    }

    /// How many clients are registered.
    pub fn len(&self) -> usize {
        lock(&self.registry).clients.len()
    }

    /// Whether no client is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::future::Future;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::task::{Context, Poll, Wake, Waker};

    use rmcp::model::NumberOrString;

    use super::*;

    fn token(n: i64) -> ProgressToken {
        ProgressToken(NumberOrString::Number(n))
    }

    fn routes() -> Arc<ProgressRoutes<RoleServer>> {
        Arc::default()
    }

    /// A waker that records whether it was woken.
    #[derive(Default)]
    struct Woken(AtomicBool);

    impl Wake for Woken {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    fn poll_once<F: Future>(f: std::pin::Pin<&mut F>, woken: &Arc<Woken>) -> Poll<F::Output> {
        let waker = Waker::from(Arc::clone(woken));
        f.poll(&mut Context::from_waker(&waker))
    }

    #[test]
    fn an_answer_waits_for_the_progress_received_for_its_tokens() {
        let routes = routes();
        let guard = RouteGuard::new(Arc::clone(&routes), None);
        guard.sent(&token(1));
        guard.sent(&token(2)); // a retried attempt
        let first = routes.received(token(1));
        let retried = routes.received(token(2));
        let clone = retried.clone();
        let elsewhere = routes.received(token(9)); // another request's progress
        let woken = Arc::new(Woken::default());
        let mut waiting = std::pin::pin!(guard.progress_forwarded());
        assert!(poll_once(waiting.as_mut(), &woken).is_pending());
        drop(first);
        assert!(
            woken.0.swap(false, Ordering::SeqCst),
            "woken to check again"
        );
        assert!(poll_once(waiting.as_mut(), &woken).is_pending());
        drop(retried);
        assert!(
            poll_once(waiting.as_mut(), &woken).is_pending(),
            "a clone of the receipt still holds the progress"
        );
        drop(clone);
        assert!(woken.0.load(Ordering::SeqCst));
        assert!(
            poll_once(waiting.as_mut(), &woken).is_ready(),
            "progress of other requests is not waited for"
        );
        drop(elsewhere);
    }

    #[test]
    fn an_answer_with_no_progress_pending_does_not_wait() {
        let routes = routes();
        let guard = RouteGuard::new(Arc::clone(&routes), None);
        let woken = Arc::new(Woken::default());
        assert!(poll_once(std::pin::pin!(guard.progress_forwarded()), &woken).is_ready());
        guard.sent(&token(1));
        drop(routes.received(token(1)));
        assert!(poll_once(std::pin::pin!(guard.progress_forwarded()), &woken).is_ready());
    }

    #[test]
    fn tallies_are_forgotten_when_their_requests_end_and_their_progress_is_forwarded() {
        let routes = routes();
        // Progress for a token of no request: forgotten once handled.
        drop(routes.received(token(7)));
        assert_eq!(routes.tracked(), 0);
        // A request's token: kept while the request is in flight or while
        // progress received for it is being forwarded.
        let guard = RouteGuard::new(Arc::clone(&routes), None);
        guard.sent(&token(1));
        let receipt = routes.received(token(1));
        assert_eq!((routes.len(), routes.tracked()), (1, 1));
        drop(guard);
        assert_eq!((routes.len(), routes.tracked()), (0, 1));
        assert!(matches!(routes.lookup(&token(1)), Resolved::Unknown));
        drop(receipt);
        assert_eq!(routes.tracked(), 0);
        // Progress arriving before the request's token is recorded.
        let early = routes.received(token(3));
        let guard = RouteGuard::new(Arc::clone(&routes), None);
        guard.sent(&token(3));
        assert!(matches!(routes.lookup(&token(3)), Resolved::Nowhere));
        drop(early);
        drop(guard);
        assert_eq!(routes.tracked(), 0);
    }

    #[test]
    fn a_token_in_use_twice_keeps_its_route_until_both_requests_end() {
        // rmcp numbers tokens per connection: after a reconnection, a new
        // request can get the token of one still failing on the old one.
        let routes = routes();
        let old = RouteGuard::new(Arc::clone(&routes), None);
        let new = RouteGuard::new(Arc::clone(&routes), None);
        old.sent(&token(3));
        new.sent(&token(3));
        drop(old);
        assert!(matches!(routes.lookup(&token(3)), Resolved::Nowhere));
        drop(new);
        assert!(matches!(routes.lookup(&token(3)), Resolved::Unknown));
        assert_eq!(routes.tracked(), 0);
    }
}
