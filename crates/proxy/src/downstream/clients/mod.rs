//! [`Downstreams`]: the connected downstream clients, what the server sends
//! them, and which of them a request of the server's is for.
//!
//! # Notifications
//!
//! Each client has a bounded queue of its own, sent in order by a task of
//! its own (`outbox.rs`): a client that does not read fills only its own
//! queue, and is dropped and disconnected ([`Disconnect`]) once it is full
//! or a send stalls, never slowing the others.
//!
//! # Whose a request of the server's is
//!
//! A request the server sends (sampling, roots, elicitation) goes to the
//! session whose call the server was handling, and to no other
//! ([`Downstreams::target_of`]). Every request the proxy forwards is
//! recorded with its session while in flight ([`Downstreams::forwarding`],
//! dropped with its [`CauseGuard`]), under the upstream request id of each
//! attempt (reported by `toolwarden_rmcp::OnRequestSent`), in the view of
//! the upstream it goes to (see [Several upstreams](#several-upstreams)).
//! Then, among the requests in flight to the server that asks:
//!
//! - Over Streamable HTTP, rmcp's client transport marks a request of the
//!   server's with the request whose response stream it came on
//!   (`InboundStreamOrigin`, SEP-2260); rmcp's server (and the TypeScript
//!   and Python SDKs) send a request made while handling a call on that
//!   call's stream. That id names the session.
//! - Otherwise (stdio; a request on the standalone stream) nothing on the
//!   wire ties it to a call. It goes to the one session with requests in
//!   flight to that server, pings aside, if only one has; with none in
//!   flight, to the one connected client, if only one is (stdio: always).
//! - Else, or when the session found cannot be sent requests (a client
//!   without a session over HTTP), the server gets `-32603 no client session
//!   for this request`: it is never sent to a client it may not be for.
//!
//! Notifications of the server that name a request go where it went
//! (progress by token: see [`crate::progress`]; `notifications/cancelled` by rmcp to the
//! request it cancels), a task's status to the client whose call created
//! it ([`Downstreams::notify_task_owner`]); the rest (list changes, logging,
//! resource updates) names none and goes to every client.
//!
//! Progress is not routed here but in [`crate::progress`]; each client is
//! registered with the progress routes its transport counts into.
//!
//! # Several upstreams
//!
//! The requests in flight are recorded per upstream connection: each
//! numbers its request ids from 0, so two upstreams can have id 3 in flight
//! at once for two different clients, and a session with a call in flight
//! to one upstream is not whom another is asking. A [`Downstreams`] is one
//! view: the clients (their queues, tasks, registration and removal), shared
//! by every view, and the requests in flight to one upstream, its own.
//! [`Downstreams::for_upstream`] makes another view of the same clients; a
//! request of the server's is looked up ([`Downstreams::target_of`]) in the
//! view of the upstream it came from, with the calls forwarded to that
//! upstream recorded there ([`Downstreams::forwarding`]). With one upstream,
//! [`Downstreams::new`] is the one view.
//!
//! Locks: the clients' before a view's requests in flight, never the other
//! way round (only [`Downstreams::target_of`] holds both).

mod causes;
mod outbox;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rmcp::model::ServerNotification;
use rmcp::service::{Peer, RoleClient, RoleServer};

use crate::progress::{lock, ProgressReceiver, ProgressRoutes};
use crate::tasks::TaskTable;

use causes::Causes;
pub use causes::{Caller, CauseGuard, Target};
use outbox::{queue, spawn_outbox};

/// An id for one connected downstream client.
pub type DownstreamId = u64;

/// How many notifications may wait for one client; past it the client is
/// not reading, and is dropped from the list (never slowing the others).
pub const NOTIFICATION_QUEUE: usize = 256;

/// How long sending one notification to a client may take before the
/// client counts as not reading and is dropped from the list (the default
/// of `limits.client_stall_timeout`; see [`Downstreams::with_stall_timeout`]).
pub const NOTIFICATION_STALL: Duration = Duration::from_secs(10);

/// Ends a client's session: called once when the client stops reading
/// (over HTTP it closes the session and drops its connections; see
/// [`super::http`]). It must not block.
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
    /// It as a receiver of the server's progress: its share of the
    /// progress backlog, and its stall watch.
    progress_receiver: Arc<ProgressReceiver>,
    /// The server's requests sent to it and not answered yet.
    awaited: Arc<AtomicUsize>,
}

/// How many of the server's requests (sampling, roots, elicitation) may
/// wait for one client's answer at once: past it, the server's next one is
/// answered an error at once. A client that never answers and a server
/// that never cancels held one waiting task each, without bound (6.5 KB
/// each: 160 MiB at 20 000).
pub const MAX_AWAITED_PER_CLIENT: usize = 64;

/// A place among the server's requests awaiting one client's answer
/// ([`Target::await_place`]); given back when dropped.
#[derive(Debug)]
pub struct AwaitedPlace(Arc<AtomicUsize>);

impl Drop for AwaitedPlace {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The clients, shared by every view of [`Downstreams`] (see
/// [`Downstreams::for_upstream`]).
#[derive(Default)]
struct Registry {
    clients: Vec<Downstream>,
    next_id: DownstreamId,
    /// Tasks (SEP-1686) the server created for a client's call → that
    /// client: their status notifications are its only. Forgotten when the
    /// task ends or the client goes, and past the table's bounds (4 096
    /// tasks, 1 024 per client: a client creating more forgets its own
    /// oldest, see [`TaskTable`]).
    tasks: TaskTable<DownstreamId, ()>,
}

/// The connected downstream clients (one over stdio, one per session over
/// HTTP), and the requests they have in flight to one upstream connection.
/// Entries are removed when their session ends, and closed ones are pruned
/// whenever a client registers, so the list holds at most the open sessions;
/// a request in flight is recorded as long as its [`CauseGuard`] lives.
///
/// A clone is the same view: the same clients, the same requests in flight.
/// [`for_upstream`](Self::for_upstream) makes a view of the same clients for
/// another upstream connection, with requests in flight of its own.
#[derive(Clone)]
pub struct Downstreams {
    /// The clients and their tasks: shared by every view.
    registry: Arc<Mutex<Registry>>,
    /// The requests in flight to this view's upstream: this view's own.
    ///
    /// Lock order: `registry` before `causes` (before a [`CauseGuard`]'s
    /// ids); nothing holding `causes` locks `registry`.
    causes: Arc<Mutex<Causes>>,
    /// How long one notification may take to send (`limits.client_stall_timeout`).
    stall: Duration,
}

impl Default for Downstreams {
    fn default() -> Self {
        Self::with_stall_timeout(NOTIFICATION_STALL)
    }
}

impl fmt::Debug for Downstreams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Downstreams")
            .field("clients", &lock(&self.registry).clients.len())
            .finish()
    }
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
            causes: Arc::default(),
            stall,
        }
    }

    /// A view of the same clients for another upstream connection: a client
    /// registered, removed or sent a notification through either view is
    /// through both (tasks too), but the requests in flight are each view's
    /// own. [`forwarding`](Self::forwarding) records them in this view only,
    /// and [`target_of`](Self::target_of) looks in this view only: each
    /// upstream connection numbers its request ids from 0, so two upstreams
    /// can both have id 3 in flight, for two different clients, and a
    /// session with calls in flight to one upstream is not whom another
    /// upstream is asking. Make one view per upstream connection, and hand
    /// it both the calls forwarded to that upstream and its requests.
    #[must_use]
    pub fn for_upstream(&self) -> Self {
        Downstreams {
            registry: Arc::clone(&self.registry),
            causes: Arc::default(),
            stall: self.stall,
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
        let progress_receiver = Arc::new(ProgressReceiver::new(self.stall, disconnect.clone()));
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
            progress_receiver,
            awaited: Arc::default(),
        });
        id
    }

    /// Client `id` as a receiver of the server's progress (see
    /// [`ProgressReceiver`]), while it is registered.
    #[must_use]
    pub fn progress_receiver(&self, id: DownstreamId) -> Option<Arc<ProgressReceiver>> {
        lock(&self.registry)
            .clients
            .iter()
            .find(|c| c.id == id)
            .map(|c| Arc::clone(&c.progress_receiver))
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
            .owner(task_id)
            .is_some_and(|owner| Some(*owner) != client)
    }

    /// Removes a client (and forgets its tasks).
    pub fn remove(&self, id: DownstreamId) {
        let mut registry = lock(&self.registry);
        registry.clients.retain(|c| c.id != id);
        registry.tasks.forget_owner(&id);
    }

    /// Records that the server created task `task_id` for a call of
    /// `client`'s (none: a client that cannot be sent anything, so the
    /// task's notifications go nowhere).
    pub fn task_created(&self, client: Option<DownstreamId>, task_id: &str) {
        let mut registry = lock(&self.registry);
        match client {
            Some(id) if registry.clients.iter().any(|c| c.id == id) => {
                registry.tasks.insert(&id, task_id, ());
            }
            _ => {
                registry.tasks.remove(task_id);
            }
        }
    }

    /// Queues a notification about task `task_id` for the open client whose
    /// task it is, if it is one of a client's (see [`broadcast`](Self::broadcast)
    /// for the queue). Whether it was queued. A task that ended stays its
    /// creator's: its result is still the creator's to read (it was
    /// forgotten then, and any session could read, update and cancel it);
    /// the table's bounds forget it in time.
    #[must_use]
    pub fn notify_task_owner(&self, task_id: &str, notification: ServerNotification) -> bool {
        let mut registry = lock(&self.registry);
        let owner = registry.tasks.owner(task_id).copied();
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
}
