//! Where server→client traffic goes: the connected downstream clients, the
//! requests they have in flight upstream, and the progress tokens the proxy
//! put on requests it forwarded.
//!
//! # Whose a request of the server's is
//!
//! A request the server sends (sampling, roots, elicitation) goes to the
//! session whose call the server was handling, and to no other
//! ([`Downstreams::target_of`]). Every request the proxy forwards is
//! recorded with its session while in flight ([`Downstreams::forwarding`],
//! dropped with its [`CauseGuard`]), under the upstream request id of each
//! attempt (reported by `toolwarden_rmcp::OnRequestSent`). Then:
//!
//! - Over Streamable HTTP, rmcp's client transport marks a request of the
//!   server's with the request whose response stream it came on
//!   (`InboundStreamOrigin`, SEP-2260); rmcp's server (and the TypeScript
//!   and Python SDKs) send a request made while handling a call on that
//!   call's stream. That id names the session.
//! - Otherwise (stdio; a request on the standalone stream) nothing on the
//!   wire ties it to a call. It goes to the one session with requests in
//!   flight upstream, pings aside, if only one has; with none in flight, to
//!   the one connected client, if only one is (stdio: always).
//! - Else, or when the session found cannot be sent requests (a client
//!   without a session over HTTP), the server gets `-32603 no client session
//!   for this request`: it is never sent to a client it may not be for.
//!
//! Notifications of the server that name a request go where it went
//! (progress by token, below; `notifications/cancelled` by rmcp to the
//! request it cancels), a task's status to the client whose call created
//! it ([`Downstreams::notify_task_owner`]); the rest (list changes, logging,
//! resource updates) names none and goes to every client.
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
//!
//! A token is only unique within the peer that numbered it: rmcp numbers the
//! tokens of each peer from 0. Upstream there is one map, for the tokens of
//! the one connection to the server. Downstream, each client has a map of
//! its own ([`Downstreams`] registers it with its client): over Streamable
//! HTTP each session has its own peer, so two sessions can each be sent a
//! request of the server's under the same token at the same time, and one
//! shared map would mix up their progress.
//!
//! A progress notification can arrive before the route of its request is
//! recorded (the token is known only once rmcp queued the request); the
//! receiving side waits a little for an unknown token ([`ProgressRoutes::resolve`]).
//!
//! # Order
//!
//! rmcp handles each incoming notification in a task of its own, but hands a
//! response straight to the request waiting for it. Left alone, a response
//! could overtake the progress sent before it, and two progress
//! notifications of one token could overtake each other. So, in both
//! directions (server → client for the requests the proxy forwards upstream,
//! client → server for the requests the server sends a client):
//!
//! - The transport that reads the sender's messages counts each progress
//!   notification as it reads it ([`ProgressRoutes::received`]) and numbers
//!   it within its token (0, 1, 2, ... in the order read). The notification
//!   carries a [`ProgressReceipt`] with that number to its handler.
//! - The handler forwards a token's notifications in that order
//!   ([`send_in_turn`]): each waits for its turn (up to
//!   [`PROGRESS_TURN_LIMIT`]), is sent (waiting up to
//!   [`PROGRESS_SEND_LIMIT`] for the send), and drops its receipt. A receipt
//!   dropped for any other reason (the notification was not forwarded, its
//!   task was aborted, rmcp dropped the message) ends its turn all the same.
//! - The answer to a request is passed on only once every progress read for
//!   its tokens before the answer has been forwarded
//!   ([`RouteGuard::progress_first`], up to [`PROGRESS_FORWARD_LIMIT`]).
//!   Messages are read in order, so that is all the progress the sender sent
//!   before its answer.
//!
//! Guaranteed, then, as long as no wait runs into its limit (only a peer that
//! does not take what is sent to it makes one): every progress the sender
//! sent before its answer reaches the receiver before that answer, and a
//! token's progress reaches it in the order the sender sent it. Progress the
//! sender sends after its answer is forwarded while the request's route
//! lives, in order, and is dropped once it is gone.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rmcp::model::{ErrorCode, ErrorData, ProgressToken, RequestId, ServerNotification};
use rmcp::service::{Peer, RoleClient, RoleServer, ServiceRole};
use tokio::sync::Notify;

/// How long an unknown progress token is waited for, in total.
const UNKNOWN_TOKEN_WAIT: Duration = Duration::from_millis(200);
const UNKNOWN_TOKEN_POLL: Duration = Duration::from_millis(10);

/// How long an answer waits for the progress read before it to be forwarded
/// ([`RouteGuard::progress_first`]); normally no time at all, as forwarding
/// is one send to a peer. A peer too slow to take the progress in that time
/// gets the answer anyway.
pub const PROGRESS_FORWARD_LIMIT: Duration = Duration::from_secs(1);

/// How long a progress notification waits for the ones read before it under
/// its token to be forwarded ([`ProgressReceipt::take_turn`]); normally no
/// time at all. Past it, the notification is forwarded anyway.
pub const PROGRESS_TURN_LIMIT: Duration = Duration::from_secs(1);

/// How long forwarding one progress notification is waited for once its
/// turn came ([`send_in_turn`]); normally no time at all. Past it the
/// notification's turn passes: rmcp may still send it later, or drop it if
/// the peer's queue is full.
pub const PROGRESS_SEND_LIMIT: Duration = Duration::from_secs(1);

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
    /// The number the next progress read for it gets.
    next: u64,
    /// The lowest number whose progress is not forwarded yet: whose turn it is.
    turn: u64,
    /// Numbers above `turn` whose progress is already forwarded (or dropped)
    /// out of turn: at most one per progress being handled.
    done_early: BTreeSet<u64>,
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
    fn unforwarded(&self) -> u64 {
        // Every number in turn..next is either pending or done early.
        self.next - self.turn - self.done_early.len() as u64
    }

    fn is_unused(&self) -> bool {
        self.holders == 0 && self.unforwarded() == 0
    }
}

/// Our progress tokens → their destination, for requests in flight, with a
/// tally of the progress received for each: how much, and how much of it is
/// forwarded (see the [module docs](self) on order).
///
/// Bounded: a token has an entry while a request sent under it is in flight
/// or while a progress notification received for it is being handled (each
/// is for at most the 200 ms wait for an unknown token, its turn and its
/// send, each bounded: see [`send_in_turn`]); a token of no request is
/// forgotten once its progress is dropped. An entry holds a fixed few
/// fields plus at most one number per progress notification of its token
/// being handled.
pub struct ProgressRoutes<R: ServiceRole> {
    entries: Mutex<HashMap<ProgressToken, Entry<R>>>,
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
    fn done(&self, ours: &ProgressToken, number: u64) {
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
    fn read_so_far(&self, ours: &ProgressToken) -> u64 {
        lock(&self.entries).get(ours).map_or(0, |entry| entry.next)
    }

    /// Completes once every progress of `ours` numbered below `number` has
    /// been forwarded (or dropped), or once `ours` has no entry.
    async fn forwarded_below(&self, ours: &ProgressToken, number: u64) {
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

/// A progress notification counted by [`ProgressRoutes::received`] and not
/// yet forwarded, with its number within its token. It rides in the
/// notification's extensions; the handler waits for its turn
/// ([`take_turn`](Self::take_turn)) and drops it once the notification is
/// forwarded (or dropped). Clones share it: the notification counts as
/// forwarded when the last one is dropped.
pub struct ProgressReceipt<R: ServiceRole>(Arc<Receipt<R>>);

struct Receipt<R: ServiceRole> {
    routes: Arc<ProgressRoutes<R>>,
    token: ProgressToken,
    number: u64,
}

impl<R: ServiceRole> Drop for Receipt<R> {
    fn drop(&mut self) {
        self.routes.done(&self.token, self.number);
    }
}

impl<R: ServiceRole> ProgressReceipt<R> {
    /// Completes once every progress read before this one under its token
    /// has been forwarded (or dropped): forward it then, and its token's
    /// progress goes out in the order it was read. Unbounded: see
    /// [`take_turn`](Self::take_turn).
    pub async fn turn(&self) {
        let receipt = &self.0;
        receipt
            .routes
            .forwarded_below(&receipt.token, receipt.number)
            .await;
    }

    /// [`turn`](Self::turn), for at most [`PROGRESS_TURN_LIMIT`]: a task
    /// stuck forwarding an earlier notification delays this one by that much
    /// at most. Whether the turn came in time.
    pub async fn take_turn(&self) -> bool {
        let in_time = tokio::time::timeout(PROGRESS_TURN_LIMIT, self.turn())
            .await
            .is_ok();
        if !in_time {
            tracing::debug!(
                token = ?self.0.token,
                limit = ?PROGRESS_TURN_LIMIT,
                "earlier progress still being forwarded; forwarding this one without waiting longer"
            );
        }
        in_time
    }
}

/// Forwards one progress notification in its turn: waits for the progress
/// read before it under its token ([`ProgressReceipt::take_turn`], skipped
/// without a receipt), runs `send` (for at most [`PROGRESS_SEND_LIMIT`]),
/// then drops the receipt so the next one's turn comes. Everything it waits
/// for is bounded, so a receipt is held for at most the two limits.
pub async fn send_in_turn<R, E>(
    receipt: Option<ProgressReceipt<R>>,
    send: impl Future<Output = Result<(), E>>,
) where
    R: ServiceRole,
    E: fmt::Display,
{
    if let Some(receipt) = &receipt {
        receipt.take_turn().await;
    }
    match tokio::time::timeout(PROGRESS_SEND_LIMIT, send).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "could not forward progress"),
        Err(_) => tracing::debug!(
            limit = ?PROGRESS_SEND_LIMIT,
            "forwarding progress is slow; no longer waiting for it"
        ),
    }
    drop(receipt);
}

impl<R: ServiceRole> Clone for ProgressReceipt<R> {
    fn clone(&self) -> Self {
        ProgressReceipt(Arc::clone(&self.0))
    }
}

impl<R: ServiceRole> fmt::Debug for ProgressReceipt<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProgressReceipt")
            .field("token", &self.0.token)
            .field("number", &self.0.number)
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

    /// Completes once every progress notification read so far for the
    /// request's attempts has been forwarded (or dropped); at once when there
    /// is none. Await it after the response arrived and before passing it
    /// on, so the receiver sees the progress first. It waits on the
    /// handler's tasks, so bound it ([`progress_first`](Self::progress_first)):
    /// a task that never finishes would stall it.
    pub async fn progress_forwarded(&self) {
        // Attempts are few and each is looked at once; indexing (rather
        // than copying the list) keeps the common case allocation-free.
        for attempt in 0.. {
            let Some(token) = lock(&self.tokens).get(attempt).cloned() else {
                return;
            };
            // The entry lives while this guard does, so its numbers hold.
            let read = self.routes.read_so_far(&token);
            self.routes.forwarded_below(&token, read).await;
        }
    }

    /// [`progress_forwarded`](Self::progress_forwarded), for at most
    /// [`PROGRESS_FORWARD_LIMIT`]: after that the answer goes out anyway.
    pub async fn progress_first(&self) {
        let forwarded = tokio::time::timeout(PROGRESS_FORWARD_LIMIT, self.progress_forwarded());
        if forwarded.await.is_err() {
            tracing::debug!(
                limit = ?PROGRESS_FORWARD_LIMIT,
                "progress still being forwarded; answering without waiting longer"
            );
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

/// How long a server's request tied to an upstream request id nobody has
/// recorded yet waits for it (the id is known only once rmcp queued the
/// request, and the server can answer that fast).
const UNKNOWN_ID_WAIT: Duration = Duration::from_millis(200);

/// How many notifications may wait for one client; past it the client is
/// not reading, and is dropped from the list (never slowing the others).
pub const NOTIFICATION_QUEUE: usize = 256;

/// How long sending one notification to a client may take before the
/// client counts as not reading and is dropped from the list (the default
/// of `limits.client_stall_timeout`; see [`Downstreams::with_stall_timeout`]).
pub const NOTIFICATION_STALL: Duration = Duration::from_secs(10);

/// Ends a client's session: called once when the client stops reading
/// (over HTTP it closes the session and drops its connections; see
/// [`crate::http`]). It must not block.
pub type Disconnect = Arc<dyn Fn() + Send + Sync>;

struct Downstream {
    id: DownstreamId,
    peer: Peer<RoleServer>,
    /// The client's notifications, sent in order by a task of its own: a
    /// client that does not read fills only its own queue.
    outbox: tokio::sync::mpsc::Sender<ServerNotification>,
    /// Where the progress it sends on the server's requests is counted and
    /// routed: its own, since rmcp numbers each peer's tokens separately.
    progress: Arc<ProgressRoutes<RoleClient>>,
    /// Ends its session when it stops reading.
    disconnect: Option<Disconnect>,
}

/// Who sent a request the proxy forwards upstream: one downstream session
/// (any `ProxyServer`, with a session or not) and, when it can be sent the
/// server's requests, its registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// The session, unique in the proxy's life.
    pub session: u64,
    /// Its client's id in [`Downstreams`], if registered (see
    /// [`Downstreams::register`]): a client without a session over HTTP is not.
    pub client: Option<DownstreamId>,
}

/// One forwarded request: who sent it, under which id (the client's).
#[derive(Debug, Clone)]
struct Forwarded {
    /// Tells apart the requests recorded under one upstream id (see
    /// [`Causes::by_upstream_id`]).
    serial: u64,
    caller: Caller,
    request: RequestId,
}

/// The requests the proxy forwards upstream, for finding which client a
/// request of the server's is for (see [`Downstreams::target_of`]).
#[derive(Default)]
struct Causes {
    /// The upstream request id of each attempt in flight → the client's
    /// request it forwards. rmcp numbers request ids per connection, so after
    /// a reconnection an id can be in use twice for a moment: the last one
    /// recorded is the current connection's.
    by_upstream_id: HashMap<RequestId, Vec<Forwarded>>,
    /// Per session, its requests in flight upstream that can make the server
    /// ask something (all but `ping`).
    in_flight: HashMap<u64, (Caller, usize)>,
    next_serial: u64,
}

#[derive(Default)]
struct Registry {
    clients: Vec<Downstream>,
    next_id: DownstreamId,
    causes: Causes,
    /// Tasks (SEP-1686) the server created for a client's call → that
    /// client: their status notifications are its only. Forgotten when the
    /// task ends or the client goes.
    tasks: HashMap<String, DownstreamId>,
}

/// Where a request of the server's goes ([`Downstreams::target_of`]).
#[derive(Debug)]
pub struct Target {
    /// The client.
    pub peer: Peer<RoleServer>,
    /// Its progress routes: the request forwarded to it is routed there, as
    /// that is where its transport counts the progress it sends.
    pub progress: Arc<ProgressRoutes<RoleClient>>,
    /// The client's request the server's is for, when known: over
    /// Streamable HTTP the server's request rides that request's response
    /// stream (SEP-2260), as a client of 2026-07-28 expects.
    pub request: Option<RequestId>,
}

/// The connected downstream clients (one over stdio, one per session over
/// HTTP), and the requests they have in flight upstream. Entries are removed
/// when their session ends, and closed ones are pruned whenever a client
/// registers, so the list holds at most the open sessions; a request in
/// flight is recorded as long as its [`CauseGuard`] lives.
#[derive(Clone)]
pub struct Downstreams {
    registry: Arc<Mutex<Registry>>,
    /// How long one notification may take to send (`limits.client_stall_timeout`).
    stall: Duration,
}

impl Default for Downstreams {
    fn default() -> Self {
        Downstreams {
            registry: Arc::default(),
            stall: NOTIFICATION_STALL,
        }
    }
}

impl fmt::Debug for Downstreams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Downstreams")
            .field("clients", &lock(&self.registry).clients.len())
            .finish()
    }
}

/// Queues `notification` for `client`; `false` when the client is not
/// reading (its queue is full, or its sender gave up), so it is dropped
/// (and, for a full queue, disconnected).
fn queue(client: &Downstream, notification: ServerNotification) -> bool {
    use tokio::sync::mpsc::error::TrySendError;
    match client.outbox.try_send(notification) {
        Ok(()) => true,
        Err(TrySendError::Full(_)) => {
            tracing::warn!(
                client = client.id,
                "a client is not reading its notifications ({NOTIFICATION_QUEUE} waiting): it gets no more"
            );
            disconnect_stalled(client.disconnect.as_ref());
            false
        }
        Err(TrySendError::Closed(_)) => false,
    }
}

/// Disconnects a client that stopped reading, and counts it.
fn disconnect_stalled(disconnect: Option<&Disconnect>) {
    metrics::counter!("toolwarden_proxy_clients_disconnected_total", "reason" => "stalled")
        .increment(1);
    if let Some(disconnect) = disconnect {
        disconnect();
    }
}

/// The task that sends a client's queued notifications, in order, each
/// within `stall`; it ends (closing the queue) when the client goes or
/// stalls, and a stalled client is disconnected.
fn spawn_outbox(
    peer: Peer<RoleServer>,
    stall: Duration,
    disconnect: Option<Disconnect>,
) -> tokio::sync::mpsc::Sender<ServerNotification> {
    let (outbox, mut queued) = tokio::sync::mpsc::channel(NOTIFICATION_QUEUE);
    tokio::spawn(async move {
        while let Some(notification) = queued.recv().await {
            match tokio::time::timeout(stall, peer.send_notification(notification)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::debug!(%error, "could not forward a notification");
                    if peer.is_transport_closed() {
                        break;
                    }
                }
                Err(_) => {
                    tracing::warn!(
                        "a client took over {stall:?} to take a notification: it gets no more"
                    );
                    disconnect_stalled(disconnect.as_ref());
                    break;
                }
            }
        }
    });
    outbox
}

/// The error a server's request gets when no client session can be found
/// for it: it is never sent to a client it may not be for.
fn no_session(why: &str) -> ErrorData {
    ErrorData::new(
        ErrorCode(-32603),
        format!("no client session for this request: {why}"),
        None,
    )
}

impl Downstreams {
    /// No clients; a client that takes over [`NOTIFICATION_STALL`] to take
    /// a notification is not reading.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// No clients; a client that takes over `stall` to take a notification
    /// is not reading (`limits.client_stall_timeout`).
    #[must_use]
    pub fn with_stall_timeout(stall: Duration) -> Self {
        Downstreams {
            registry: Arc::default(),
            stall,
        }
    }

    /// Adds a client, with the routes its transport counts the progress it
    /// sends into (each client its own: rmcp numbers the progress tokens of
    /// each client's peer from 0, so two clients can be sent a request under
    /// the same token at the same time); returns its id. `disconnect` ends
    /// its session if it stops reading (see [`broadcast`](Self::broadcast)).
    pub fn register(
        &self,
        peer: Peer<RoleServer>,
        progress: Arc<ProgressRoutes<RoleClient>>,
        disconnect: Option<Disconnect>,
    ) -> DownstreamId {
        let outbox = spawn_outbox(peer.clone(), self.stall, disconnect.clone());
        let mut registry = lock(&self.registry);
        registry.clients.retain(|c| !c.peer.is_transport_closed());
        registry.next_id += 1;
        let id = registry.next_id;
        registry.clients.push(Downstream {
            id,
            peer,
            progress,
            outbox,
            disconnect,
        });
        id
    }

    /// Queues `notification` for every open client (list changes, logging,
    /// resource updates: nothing in them names a request). Never waits: a
    /// client whose queue is full ([`NOTIFICATION_QUEUE`]) or whose sender
    /// stalled (the stall timeout) is not reading: it is dropped from the
    /// list and disconnected, so one client never slows the others.
    pub fn broadcast(&self, notification: &ServerNotification) {
        let mut registry = lock(&self.registry);
        registry.clients.retain(|client| {
            !client.peer.is_transport_closed() && queue(client, notification.clone())
        });
    }

    /// Whether task `task_id` was created for a call of a client other than
    /// `client` (who then may not read, update or cancel it). A task of no
    /// known client's (created for a client without a session, or whose
    /// client went away) is nobody's: its id alone is the key to it.
    #[must_use]
    pub fn task_of_another(&self, task_id: &str, client: Option<DownstreamId>) -> bool {
        lock(&self.registry)
            .tasks
            .get(task_id)
            .is_some_and(|owner| Some(*owner) != client)
    }

    /// Removes a client (and forgets its tasks).
    pub fn remove(&self, id: DownstreamId) {
        let mut registry = lock(&self.registry);
        registry.clients.retain(|c| c.id != id);
        registry.tasks.retain(|_, owner| *owner != id);
    }

    /// Records that the server created task `task_id` for a call of
    /// `client`'s (none: a client that cannot be sent anything, so the
    /// task's notifications go nowhere).
    pub fn task_created(&self, client: Option<DownstreamId>, task_id: &str) {
        let mut registry = lock(&self.registry);
        match client {
            Some(id) if registry.clients.iter().any(|c| c.id == id) => {
                registry.tasks.insert(task_id.to_owned(), id);
            }
            _ => {
                registry.tasks.remove(task_id);
            }
        }
    }

    /// Queues a notification about task `task_id` for the open client whose
    /// task it is, if it is one of a client's (see [`broadcast`](Self::broadcast)
    /// for the queue); `ended` forgets the task. Whether it was queued.
    #[must_use]
    pub fn notify_task_owner(
        &self,
        task_id: &str,
        ended: bool,
        notification: ServerNotification,
    ) -> bool {
        let mut registry = lock(&self.registry);
        let owner = if ended {
            registry.tasks.remove(task_id)
        } else {
            registry.tasks.get(task_id).copied()
        };
        let Some(owner) = owner else {
            return false;
        };
        let Some(at) = registry
            .clients
            .iter()
            .position(|c| c.id == owner && !c.peer.is_transport_closed())
        else {
            return false;
        };
        if queue(&registry.clients[at], notification) {
            return true;
        }
        registry.clients.remove(at);
        false
    }

    /// Records that `caller`'s request `request` is being forwarded upstream,
    /// until the returned guard is dropped; `asks` says whether the server
    /// may ask something while handling it (all requests but `ping`). Each
    /// attempt's upstream id is recorded with [`CauseGuard::recorder`].
    #[must_use]
    pub fn forwarding(&self, caller: Caller, request: RequestId, asks: bool) -> CauseGuard {
        let mut registry = lock(&self.registry);
        let causes = &mut registry.causes;
        causes.next_serial += 1;
        let serial = causes.next_serial;
        if asks {
            causes
                .in_flight
                .entry(caller.session)
                .or_insert((caller, 0))
                .1 += 1;
        }
        CauseGuard {
            registry: Arc::clone(&self.registry),
            forwarded: Forwarded {
                serial,
                caller,
                request,
            },
            asks,
            upstream_ids: Arc::new(Mutex::new(Some(Vec::new()))),
        }
    }

    /// The client a request of the server's goes to: the one whose request
    /// the server was handling when it made it, or an error for the server
    /// when that cannot be told (never a guess):
    ///
    /// - `origin`, the upstream request the transport says it came with
    ///   (over Streamable HTTP, the response stream it arrived on): the
    ///   client whose request that is, waiting up to 200 ms for its id to be
    ///   recorded; none, if it is none of theirs (the proxy's own, or done);
    /// - else (stdio, or a server that sent it on the standalone stream):
    ///   the one session with requests in flight upstream (pings aside), if
    ///   only one has; with none in flight, the one connected client, if
    ///   there is only one.
    ///
    /// The session found must be a connected client that can be sent
    /// requests (not one without a session over HTTP).
    pub async fn target_of(&self, origin: Option<&RequestId>) -> Result<Target, ErrorData> {
        let deadline = tokio::time::Instant::now() + UNKNOWN_ID_WAIT;
        loop {
            match self.find_target(origin) {
                Err(None) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(UNKNOWN_TOKEN_POLL).await;
                }
                Err(None) => {
                    return Err(no_session(
                        "it came with a request that is no client's (the proxy's own, or one that ended)",
                    ))
                }
                Err(Some(error)) => return Err(error),
                Ok(target) => return Ok(target),
            }
        }
    }

    /// [`target_of`](Self::target_of) once: `Err(None)` when `origin` is not
    /// (yet) recorded.
    fn find_target(&self, origin: Option<&RequestId>) -> Result<Target, Option<ErrorData>> {
        let registry = lock(&self.registry);
        let open: Vec<&Downstream> = registry
            .clients
            .iter()
            .filter(|c| !c.peer.is_transport_closed())
            .collect();
        if open.is_empty() {
            return Err(Some(ErrorData::new(
                ErrorCode(-32000),
                "no client is connected to the toolwarden proxy",
                None,
            )));
        }
        let causes = &registry.causes;
        let (caller, request) = match origin {
            Some(id) => {
                let forwarded = causes
                    .by_upstream_id
                    .get(id)
                    .and_then(|all| all.last())
                    .ok_or(None)?;
                (forwarded.caller, Some(forwarded.request.clone()))
            }
            None => {
                let mut sessions = causes.in_flight.values().filter(|(_, n)| *n > 0);
                match (sessions.next(), sessions.next()) {
                    (Some((caller, _)), None) => (*caller, None),
                    (Some(_), Some(_)) => {
                        return Err(Some(no_session(
                            "nothing ties it to a call, and calls of several sessions are in flight",
                        )))
                    }
                    (None, _) => match open.as_slice() {
                        [only] => {
                            return Ok(Target {
                                peer: only.peer.clone(),
                                progress: Arc::clone(&only.progress),
                                request: None,
                            })
                        }
                        _ => {
                            return Err(Some(no_session(
                                "nothing ties it to a call, no call is in flight, and several clients are connected",
                            )))
                        }
                    },
                }
            }
        };
        let client = caller
            .client
            .and_then(|id| open.iter().find(|c| c.id == id))
            .ok_or_else(|| {
                Some(no_session(
                    "the client whose call it is for cannot be sent requests (no session, or gone)",
                ))
            })?;
        Ok(Target {
            peer: client.peer.clone(),
            progress: Arc::clone(&client.progress),
            request,
        })
    }

    /// How many clients are registered.
    #[must_use]
    pub fn len(&self) -> usize {
        lock(&self.registry).clients.len()
    }

    /// Whether no client is registered.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many upstream request ids and sessions with requests in flight
    /// are recorded (both drop to 0 once every request ended).
    #[must_use]
    pub fn causes_tracked(&self) -> (usize, usize) {
        let registry = lock(&self.registry);
        (
            registry.causes.by_upstream_id.len(),
            registry.causes.in_flight.len(),
        )
    }
}

/// One request being forwarded upstream, recorded in [`Downstreams`] for
/// finding whose a request of the server's is; forgotten when dropped.
pub struct CauseGuard {
    registry: Arc<Mutex<Registry>>,
    forwarded: Forwarded,
    asks: bool,
    /// The upstream ids recorded; `None` once the guard is dropped, so an
    /// attempt sent after that (it cannot be, normally) is not recorded.
    upstream_ids: Arc<Mutex<Option<Vec<RequestId>>>>,
}

impl fmt::Debug for CauseGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CauseGuard")
            .field("caller", &self.forwarded.caller)
            .field("request", &self.forwarded.request)
            .finish_non_exhaustive()
    }
}

impl CauseGuard {
    /// A hook recording the upstream id of each attempt, for
    /// `toolwarden_rmcp::OnRequestSent`.
    pub fn recorder(&self) -> impl Fn(&RequestId) + Send + Sync + 'static {
        let registry = Arc::clone(&self.registry);
        let upstream_ids = Arc::clone(&self.upstream_ids);
        let forwarded = self.forwarded.clone();
        move |id| {
            // Both locks at once, so the guard's drop sees every id recorded.
            let mut registry = lock(&registry);
            let mut upstream_ids = lock(&upstream_ids);
            let Some(upstream_ids) = upstream_ids.as_mut() else {
                return;
            };
            upstream_ids.push(id.clone());
            registry
                .causes
                .by_upstream_id
                .entry(id.clone())
                .or_default()
                .push(forwarded.clone());
        }
    }
}

impl Drop for CauseGuard {
    fn drop(&mut self) {
        let mut registry = lock(&self.registry);
        let causes = &mut registry.causes;
        let upstream_ids = lock(&self.upstream_ids).take().unwrap_or_default();
        for id in upstream_ids {
            if let Some(all) = causes.by_upstream_id.get_mut(&id) {
                all.retain(|f| f.serial != self.forwarded.serial);
                if all.is_empty() {
                    causes.by_upstream_id.remove(&id);
                }
            }
        }
        if self.asks {
            let session = self.forwarded.caller.session;
            if let Some((_, n)) = causes.in_flight.get_mut(&session) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    causes.in_flight.remove(&session);
                }
            }
        }
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
    fn a_tokens_progress_takes_turns_in_the_order_read() {
        let routes = routes();
        let first = routes.received(token(1));
        let second = routes.received(token(1));
        let third = routes.received(token(1));
        let other = routes.received(token(2)); // another token: its own turns
        let woken = Arc::new(Woken::default());
        assert!(poll_once(std::pin::pin!(first.turn()), &woken).is_ready());
        assert!(poll_once(std::pin::pin!(other.turn()), &woken).is_ready());
        {
            let mut third_turn = std::pin::pin!(third.turn());
            assert!(poll_once(third_turn.as_mut(), &woken).is_pending());
            // The second is dropped out of turn (not forwarded, or its wait
            // ran out): the first still goes before the third.
            drop(second);
            assert!(poll_once(third_turn.as_mut(), &woken).is_pending());
            assert!(!woken.0.load(Ordering::SeqCst), "the turn did not move");
            drop(first);
            assert!(woken.0.load(Ordering::SeqCst), "woken when the turn moved");
            assert!(
                poll_once(third_turn.as_mut(), &woken).is_ready(),
                "the turn skips the second, already done"
            );
        }
        drop(third);
        drop(other);
        assert_eq!(routes.tracked(), 0);
    }

    #[test]
    fn progress_done_out_of_turn_is_remembered_only_until_the_turn_passes() {
        let routes = routes();
        let receipts: Vec<_> = (0..5).map(|_| routes.received(token(1))).collect();
        let mut receipts = receipts.into_iter();
        let first = receipts.next().unwrap();
        for later in receipts.rev() {
            drop(later);
        }
        {
            let entries = lock(&routes.entries);
            let entry = &entries[&token(1)];
            assert_eq!((entry.turn, entry.done_early.len()), (0, 4));
            assert_eq!(entry.unforwarded(), 1);
        }
        drop(first);
        assert_eq!(routes.tracked(), 0, "nothing left once all are done");
        // A request's token keeps its entry, emptied, while it is in flight.
        let guard = RouteGuard::new(Arc::clone(&routes), None);
        guard.sent(&token(3));
        let early = routes.received(token(3));
        drop(routes.received(token(3)));
        drop(early);
        let entries = lock(&routes.entries);
        let entry = &entries[&token(3)];
        assert_eq!((entry.next, entry.turn, entry.done_early.len()), (2, 2, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn an_aborted_task_does_not_hold_up_the_next_turn() {
        let routes = routes();
        let first = routes.received(token(1));
        let second = routes.received(token(1));
        let (running, is_running) = tokio::sync::oneshot::channel();
        let stuck = tokio::spawn(async move {
            let _first = first;
            let _ = running.send(());
            std::future::pending::<()>().await;
        });
        is_running.await.unwrap(); // stuck forwarding the first
        let started = tokio::time::Instant::now();
        stuck.abort();
        assert!(stuck.await.unwrap_err().is_cancelled());
        assert!(second.take_turn().await, "its turn came at once");
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn every_wait_is_bounded() {
        let routes = routes();
        let guard = RouteGuard::new(Arc::clone(&routes), None);
        guard.sent(&token(1));
        let held = routes.received(token(1)); // never forwarded in time
        let next = routes.received(token(1));
        let started = tokio::time::Instant::now();
        assert!(!next.take_turn().await, "the turn did not come");
        assert_eq!(started.elapsed(), PROGRESS_TURN_LIMIT);
        let started = tokio::time::Instant::now();
        guard.progress_first().await;
        assert_eq!(started.elapsed(), PROGRESS_FORWARD_LIMIT);
        // A send that never completes: the turn passes all the same.
        let last = routes.received(token(1));
        let started = tokio::time::Instant::now();
        send_in_turn(Some(next), std::future::pending::<Result<(), String>>()).await;
        assert_eq!(started.elapsed(), PROGRESS_TURN_LIMIT + PROGRESS_SEND_LIMIT);
        drop(held);
        assert!(last.take_turn().await);
        drop(last);
        drop(guard);
        assert_eq!(routes.tracked(), 0);
    }

    #[test]
    fn an_answer_does_not_wait_for_progress_read_after_it() {
        let routes = routes();
        let guard = RouteGuard::new(Arc::clone(&routes), None);
        guard.sent(&token(1));
        let before = routes.received(token(1));
        let woken = Arc::new(Woken::default());
        let mut waiting = std::pin::pin!(guard.progress_forwarded());
        assert!(poll_once(waiting.as_mut(), &woken).is_pending());
        let after = routes.received(token(1)); // sent after the answer
        drop(before);
        assert!(poll_once(waiting.as_mut(), &woken).is_ready());
        drop(after);
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

    fn id(n: i64) -> RequestId {
        NumberOrString::Number(n)
    }

    fn recorded(downstreams: &Downstreams, upstream: i64) -> Option<(Caller, RequestId)> {
        let registry = lock(&downstreams.registry);
        let all = registry.causes.by_upstream_id.get(&id(upstream))?;
        all.last().map(|f| (f.caller, f.request.clone()))
    }

    #[test]
    fn forwarded_requests_are_recorded_while_in_flight() {
        let downstreams = Downstreams::new();
        let a = Caller {
            session: 1,
            client: Some(7),
        };
        let b = Caller {
            session: 2,
            client: None,
        };
        let call = downstreams.forwarding(a, id(10), true);
        let record = call.recorder();
        record(&id(0));
        record(&id(1)); // a retried attempt
        let ping = downstreams.forwarding(b, id(20), false);
        ping.recorder()(&id(2));
        assert_eq!(recorded(&downstreams, 1), Some((a, id(10))));
        assert_eq!(recorded(&downstreams, 2), Some((b, id(20))));
        // A ping is recorded under its id, but is not a call in flight.
        assert_eq!(downstreams.causes_tracked(), (3, 1));
        // After a reconnection an id can be in use twice: the last wins,
        // and the first one's end leaves the other's record.
        let again = downstreams.forwarding(b, id(21), true);
        again.recorder()(&id(0));
        assert_eq!(recorded(&downstreams, 0), Some((b, id(21))));
        drop(call);
        assert_eq!(recorded(&downstreams, 0), Some((b, id(21))));
        assert_eq!(recorded(&downstreams, 1), None);
        drop(again);
        drop(ping);
        assert_eq!(downstreams.causes_tracked(), (0, 0));
        // An attempt reported after its request ended is not recorded.
        let late = downstreams.forwarding(a, id(30), true);
        let record = late.recorder();
        drop(late);
        record(&id(5));
        assert_eq!(downstreams.causes_tracked(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn with_no_client_a_servers_request_gets_an_error_at_once() {
        let downstreams = Downstreams::new();
        let _call = downstreams.forwarding(
            Caller {
                session: 1,
                client: None,
            },
            id(1),
            true,
        );
        let started = tokio::time::Instant::now();
        let error = downstreams.target_of(Some(&id(9))).await.unwrap_err();
        assert_eq!(error.code, ErrorCode(-32000));
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    /// A server handler with every default: enough to own a peer.
    #[derive(Clone)]
    struct Quiet;

    impl rmcp::ServerHandler for Quiet {}

    /// Issue 16: notifications to every client were sent one client after
    /// the other, each awaited; a client that stopped reading stalled them
    /// for all. Each client now has a bounded queue of its own.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_does_not_read_never_slows_the_others() {
        use tokio::io::AsyncBufReadExt;
        let (reading_io, reading_far_end) = tokio::io::duplex(64 * 1024);
        // The far end of this one is kept and never read.
        let (stuck_io, _stuck_far_end) = tokio::io::duplex(1024);
        let reading = rmcp::service::serve_directly(Quiet, reading_io, None);
        let stuck = rmcp::service::serve_directly(Quiet, stuck_io, None);
        let received = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = Arc::clone(&received);
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(reading_far_end).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("notifications/tools/list_changed") {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        let downstreams = Downstreams::new();
        let disconnected = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = Arc::clone(&disconnected);
        let disconnect: Disconnect = Arc::new(move || {
            count.fetch_add(1, Ordering::SeqCst);
        });
        downstreams.register(stuck.peer().clone(), Arc::default(), Some(disconnect));
        downstreams.register(reading.peer().clone(), Arc::default(), None);

        let sent = 4 * NOTIFICATION_QUEUE;
        for _ in 0..sent {
            // Never waits, whatever the stuck client does.
            downstreams.broadcast(&ServerNotification::ToolListChangedNotification(
                Default::default(),
            ));
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        for _ in 0..1000 {
            if received.load(Ordering::SeqCst) == sent {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            received.load(Ordering::SeqCst),
            sent,
            "the reading client got them all"
        );
        assert_eq!(
            downstreams.len(),
            1,
            "the client that does not read was dropped"
        );
        assert!(
            disconnected.load(Ordering::SeqCst) >= 1,
            "the client that does not read was disconnected"
        );
    }
}
