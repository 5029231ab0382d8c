//! The upstream MCP server: a child process over stdio or a Streamable HTTP
//! URL, kept connected by a supervisor.
//!
//! - [`Upstream`] owns the connection. The first downstream `initialize`
//!   starts it ([`Upstream::start`]) with that client's capabilities, so what
//!   the server offers (sampling, roots, elicitation tools) matches what the
//!   client can do. A supervisor task waits for the connection to end; when
//!   it does (the child died, the HTTP session broke), every call in flight
//!   gets an error (rmcp drops their response slots), and the supervisor
//!   reconnects after an exponential backoff (`upstream.restart_backoff_min`,
//!   doubling up to `restart_backoff_max`, back to the minimum once a
//!   connection stayed up `restart_reset_after`). Downstream clients are not
//!   re-initialized; the catalog is refilled by a fresh `tools/list`.
//! - [`UpstreamService`] is the `tower::Service<ClientRequest>` the stack
//!   wraps: it sends through the current connection, and while there is none
//!   it fails at once with a
//!   [`TransportError`](toolwarden_core::classify::TransportError) of kind `ConnectFailed`
//!   (classified `before_sent`: safe to retry for any tool).
//! - [`UpstreamHandler`] answers what the server sends to the proxy as its
//!   client: notifications are forwarded to the downstream clients, requests
//!   (sampling, roots, elicitation) to the session whose call caused them.
//! - Progress the server sends for a request reaches the client before the
//!   response, and in the order sent: the transport counts and numbers each
//!   progress notification as it reads it (`ProgressTally` on a
//!   [`HookedTransport`](crate::transport::HookedTransport)), the
//!   handler forwards a token's progress in that order, and the proxy holds a
//!   response until the progress counted for its request has been forwarded
//!   (see [`crate::progress`]). The downstream transports are wrapped the same
//!   way for the progress a client sends on the server's requests, each
//!   counting into its client's own routes (rmcp numbers each client peer's
//!   tokens separately).

//!
//! Files: `target.rs` (where the server is), `status.rs` (the connection's
//! state), `supervisor.rs` ([`Upstream`]: connecting, reconnecting with
//! backoff), `connect.rs` (one connection: the child, the URL or the
//! in-process pipe, hooked, and `initialize`), `http_client.rs` (the HTTP
//! client of a URL), `service.rs` ([`UpstreamService`]), `handler.rs`
//! ([`UpstreamHandler`]).

mod connect;
mod handler;
mod http_client;
mod service;
mod status;
mod supervisor;
mod target;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use rmcp::model::ServerPeerInfo;
use rmcp::model::{ServerNotification, ToolListChangedNotification};
use rmcp::service::RoleServer;
use tokio::sync::watch;
use toolwarden_core::catalog::ToolInfo;

use crate::progress::lock;
use toolwarden_core::{ConfigError, ToolCatalog};
use toolwarden_rmcp::RmcpClient;

use crate::config::UpstreamConfig;
use crate::downstream::Downstreams;
use crate::progress::ProgressRoutes;
use crate::redact::Redactor;

pub use handler::UpstreamHandler;
pub use service::{UpstreamFailed, UpstreamFuture, UpstreamService};
pub use status::UpstreamStatus;
pub use supervisor::Upstream;
pub use target::{InProcessServer, UpstreamTarget};

/// One live connection.
#[derive(Debug)]
pub struct Connection {
    pub(crate) client: RmcpClient,
    pub(crate) info: Option<Arc<ServerPeerInfo>>,
    pub(crate) pid: Option<u32>,
}

impl Connection {
    /// The client over this connection.
    #[must_use]
    pub fn client(&self) -> &RmcpClient {
        &self.client
    }

    /// What the server said in `initialize`.
    #[must_use]
    pub fn info(&self) -> Option<&ServerPeerInfo> {
        self.info.as_deref()
    }

    /// The child's process id, for a child process.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }
}

/// What the upstream side shares with its handler and service.
pub(crate) struct Shared {
    pub(crate) catalog: ToolCatalog,
    pub(crate) current: ArcSwapOption<Connection>,
    /// The server's last `initialize` result.
    pub(crate) last_info: ArcSwapOption<ServerPeerInfo>,
    pub(crate) downstreams: Downstreams,
    /// Our tokens on requests sent upstream → the downstream client's. (The
    /// other way, each downstream client has its own routes: see
    /// [`Downstreams::target_of`].)
    pub(crate) progress_up: Arc<ProgressRoutes<RoleServer>>,
    pub(crate) status: watch::Sender<UpstreamStatus>,
    /// Scrubs the upstream's secrets out of error texts.
    pub(crate) redactor: Arc<Redactor>,
    /// Whether a catalog refresh runs ([`IDLE`], [`RUNNING`], or [`AGAIN`]).
    pub(crate) refreshing: AtomicU8,
    /// The catalog's tools before a reconnect, until a refresh from the
    /// new connection has read the server's: the clients are told
    /// (`notifications/tools/list_changed`) when they differ.
    pub(crate) tools_before_reconnect: std::sync::Mutex<Option<Vec<ToolInfo>>>,
    /// The server's progress notifications being forwarded or waiting
    /// their turn.
    pub(crate) progress_backlog: Backlog,
}

/// The most progress notifications of one upstream connection that wait to
/// be forwarded (their turn, their token, the client): rmcp handles each
/// notification in a task of its own, so a server sending progress faster
/// than the clients take it would otherwise grow those tasks without end.
/// Past it the newest is dropped.
pub(crate) const MAX_PROGRESS_BACKLOG: usize = 1024;

/// A count of work in flight, bounded by [`MAX_PROGRESS_BACKLOG`].
#[derive(Debug, Default)]
pub(crate) struct Backlog(std::sync::atomic::AtomicUsize);

impl Backlog {
    /// A place in the backlog, held until dropped; `None` when it is full.
    pub(crate) fn enter(&self) -> Option<BacklogPlace<'_>> {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_PROGRESS_BACKLOG).then_some(n + 1)
            })
            .ok()
            .map(|_| BacklogPlace(&self.0))
    }
}

/// A place in a [`Backlog`], given back when dropped.
pub(crate) struct BacklogPlace<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for BacklogPlace<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Sets a refresh state back to [`IDLE`] when dropped by a panic.
struct ResetOnPanic<'a>(&'a AtomicU8);

impl Drop for ResetOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(IDLE, Ordering::Release);
        }
    }
}

/// No catalog refresh runs.
pub(crate) const IDLE: u8 = 0;
/// A catalog refresh runs.
const RUNNING: u8 = 1;
/// A catalog refresh runs, and another was asked for since it began.
const AGAIN: u8 = 2;

impl Shared {
    /// The current connection, if it is open.
    pub(crate) fn connection(&self) -> Option<Arc<Connection>> {
        self.current
            .load_full()
            .filter(|c| !c.client.peer().is_transport_closed())
    }

    /// Refills the catalog from the current connection, in the background.
    ///
    /// One refresh at a time: asked while one runs (however often), one
    /// more runs after it, so it reads what changed meanwhile. A server
    /// that floods `notifications/tools/list_changed` gets one `tools/list`
    /// at a time, not one per notification.
    pub(crate) fn refresh_catalog(self: &Arc<Self>, limit: Duration) {
        if self.connection().is_none() {
            return;
        }
        let asked = self
            .refreshing
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |state| {
                Some(if state == IDLE { RUNNING } else { AGAIN })
            });
        if asked != Ok(IDLE) {
            // The one running (or its next) will read the change.
            return;
        }
        let shared = Arc::clone(self);
        tokio::spawn(async move {
            // Should a refresh panic, the next notification starts one.
            let _unwinding = ResetOnPanic(&shared.refreshing);
            loop {
                if let Some(connection) = shared.connection() {
                    if shared.refresh_from(&connection, limit).await {
                        shared.announce_a_changed_list();
                    }
                }
                if shared
                    .refreshing
                    .compare_exchange(RUNNING, IDLE, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    return;
                }
                // Asked again meanwhile: once more.
                shared.refreshing.store(RUNNING, Ordering::Release);
            }
        });
    }

    /// Whether the catalog was refilled.
    async fn refresh_from(&self, connection: &Connection, limit: Duration) -> bool {
        match tokio::time::timeout(limit, connection.client.refresh_catalog()).await {
            Ok(Ok(n)) => {
                tracing::debug!(tools = n, "tool catalog refreshed");
                return true;
            }
            Ok(Err(e)) => {
                let error = self.redactor.scrub(&e.to_string()).into_owned();
                tracing::warn!(%error, "tools/list failed; the catalog keeps its tools")
            }
            Err(_) => tracing::warn!("tools/list timed out; the catalog keeps its tools"),
        }
        false
    }

    /// The catalog's tools, in name order.
    fn tools_by_name(&self) -> Vec<ToolInfo> {
        let mut tools = self.catalog.tools();
        tools.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        tools
    }

    /// Refreshes the catalog from a new connection (after the first),
    /// telling the clients should its tools differ from the last
    /// connection's: a server restarted with other tools (the clients'
    /// lists came from the old one, and no server announces what it had
    /// before it started).
    pub(crate) fn refresh_catalog_after_reconnect(self: &Arc<Self>, limit: Duration) {
        let before = self.tools_by_name();
        *lock(&self.tools_before_reconnect) = Some(before);
        self.refresh_catalog(limit);
    }

    /// After a refresh: `notifications/tools/list_changed` to every client
    /// if it was the first since a reconnect and the tools changed.
    fn announce_a_changed_list(&self) {
        let Some(before) = lock(&self.tools_before_reconnect).take() else {
            return;
        };
        if before != self.tools_by_name() {
            tracing::info!("the upstream's tools changed across its restart; telling the clients");
            self.downstreams
                .broadcast(&ServerNotification::ToolListChangedNotification(
                    ToolListChangedNotification::default(),
                ));
        }
    }
}

/// Checks `upstream.headers` (variables set, files readable, values valid)
/// and `upstream.ca_file` (certificates in it), as an HTTP(S) upstream would
/// use them; `check-config` runs it. Errors name the key and hold no secret.
pub fn check_http_config(config: &UpstreamConfig) -> Result<(), ConfigError> {
    http_client::http_client(config, &http_client::process_var).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backlog_holds_its_bound_and_gives_places_back() {
        let backlog = Backlog::default();
        let places: Vec<_> = (0..MAX_PROGRESS_BACKLOG)
            .map(|_| backlog.enter().expect("room"))
            .collect();
        assert!(backlog.enter().is_none(), "full");
        drop(places);
        let again: Vec<_> = (0..MAX_PROGRESS_BACKLOG)
            .map(|_| backlog.enter().expect("every place was given back"))
            .collect();
        assert!(backlog.enter().is_none());
        drop(again);
    }
}
