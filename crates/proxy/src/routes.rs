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
//! it), so the map holds at most one entry per in-flight request attempt.
//! A progress notification can arrive before the route of its request is
//! recorded (the token is known only once rmcp queued the request); the
//! receiving side waits a little for an unknown token ([`ProgressRoutes::resolve`]).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rmcp::model::ProgressToken;
use rmcp::service::{Peer, RoleServer, ServiceRole};

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

/// Our progress tokens → their destination, for requests in flight.
pub struct ProgressRoutes<R: ServiceRole> {
    routes: Mutex<HashMap<ProgressToken, Route<R>>>,
}

impl<R: ServiceRole> fmt::Debug for ProgressRoutes<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProgressRoutes")
            .field("in_flight", &lock(&self.routes).len())
            .finish()
    }
}

impl<R: ServiceRole> Default for ProgressRoutes<R> {
    fn default() -> Self {
        ProgressRoutes {
            routes: Mutex::new(HashMap::new()),
        }
    }
}

impl<R: ServiceRole> ProgressRoutes<R> {
    /// Routes progress for `ours` to `to` (peer and its token), or nowhere.
    pub fn insert(&self, ours: ProgressToken, to: Option<(Peer<R>, ProgressToken)>) {
        let route = match to {
            Some((peer, token)) => Route::To(peer, token),
            None => Route::Nowhere,
        };
        lock(&self.routes).insert(ours, route);
    }

    /// Forgets `ours`.
    pub fn remove(&self, ours: &ProgressToken) {
        lock(&self.routes).remove(ours);
    }

    /// How many tokens are routed.
    pub fn len(&self) -> usize {
        lock(&self.routes).len()
    }

    /// Whether no token is routed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lookup(&self, ours: &ProgressToken) -> Resolved<R> {
        match lock(&self.routes).get(ours) {
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
