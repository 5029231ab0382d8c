//! [`Upstream`]: the connection to the server and the supervisor that
//! keeps it up, reconnecting with backoff (see the [module docs](super)).

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use rmcp::model::{ClientConfig, ServerPeerInfo};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use toolwarden_core::{ConfigError, ToolCatalog};
use toolwarden_rmcp::RmcpClient;

use super::connect::{connect, Connected};
use super::{
    check_http_config, http_client, Connection, Shared, UpstreamHandler, UpstreamService,
    UpstreamStatus, UpstreamTarget,
};
use crate::config::UpstreamConfig;
use crate::downstream::Downstreams;
use crate::redact::{Redactor, UPSTREAM_FAILED};

struct Inner {
    target: UpstreamTarget,
    config: UpstreamConfig,
    shared: Arc<Shared>,
    restarts: AtomicU64,
    supervisor: Mutex<Option<JoinHandle<()>>>,
    shutdown: CancellationToken,
}

/// The upstream server connection and its supervisor. Clones share it.
#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("target", &self.inner.target)
            .field("status", &*self.inner.shared.status.borrow())
            .field("restarts", &self.restarts())
            .finish()
    }
}

impl Upstream {
    /// An upstream at `target`, not started. Tools listed by the server are
    /// added to `catalog`; server→client traffic goes to `downstreams`.
    #[must_use]
    pub fn new(
        target: UpstreamTarget,
        config: UpstreamConfig,
        catalog: ToolCatalog,
        downstreams: Downstreams,
    ) -> Self {
        let redactor = Arc::new(Self::redactor_for(&target, &config));
        Self::with_redactor(target, config, catalog, downstreams, redactor)
    }

    /// What [`redactor`](Self::redactor) of an upstream at `target` with
    /// `config` scrubs: the URL's userinfo and query, the header values.
    #[must_use]
    pub fn redactor_for(target: &UpstreamTarget, config: &UpstreamConfig) -> Redactor {
        // A header that does not resolve is reported by `check_http`; the
        // connection attempts then fail and say why.
        let secrets = match target {
            UpstreamTarget::Url(_) => http_client::http_client(config, &http_client::process_var)
                .map(|(_, secrets)| secrets)
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        target.redactor(secrets)
    }

    /// [`new`](Self::new), scrubbing with `redactor` (made once by
    /// [`redactor_for`](Self::redactor_for) for many upstreams at one target).
    #[must_use]
    pub fn with_redactor(
        target: UpstreamTarget,
        config: UpstreamConfig,
        catalog: ToolCatalog,
        downstreams: Downstreams,
        redactor: Arc<Redactor>,
    ) -> Self {
        let (status, _) = watch::channel(UpstreamStatus::Idle);
        Upstream {
            inner: Arc::new(Inner {
                target,
                config,
                shared: Arc::new(Shared {
                    catalog,
                    current: ArcSwapOption::empty(),
                    last_info: ArcSwapOption::empty(),
                    downstreams,
                    progress_up: Arc::default(),
                    status,
                    redactor,
                    refreshing: AtomicU8::new(super::IDLE),
                    tools_before_reconnect: Mutex::new(None),
                    progress_backlog: super::Backlog::default(),
                }),
                restarts: AtomicU64::new(0),
                supervisor: Mutex::new(None),
                shutdown: CancellationToken::new(),
            }),
        }
    }

    /// Starts the supervisor, which connects as a client described by
    /// `client_info` (the first downstream client's, mirrored; its protocol
    /// version replaced by `upstream.protocol_version` when that is pinned).
    /// Later calls do nothing: the upstream is started once.
    pub fn start(&self, mut client_info: ClientConfig) {
        if let Some(pinned) = self.config().pinned_protocol_version() {
            client_info.protocol_version = pinned;
        }
        let mut supervisor = self
            .inner
            .supervisor
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if supervisor.is_some() || self.inner.shutdown.is_cancelled() {
            return;
        }
        let inner = Arc::clone(&self.inner);
        *supervisor = Some(tokio::spawn(supervise(inner, client_info)));
    }

    /// Whether [`start`](Self::start) was called.
    pub fn is_started(&self) -> bool {
        self.inner
            .supervisor
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// Waits until connected, up to `limit`. Fails early when the very first
    /// connection attempt failed (a wrong command should not make the first
    /// client wait for the whole limit); while reconnecting after a crash it
    /// waits. The error is for a client: it says what happened, not why
    /// (the why, which may quote the URL, is in the log).
    pub async fn wait_connected(&self, limit: Duration) -> Result<Arc<Connection>, String> {
        let mut status = self.inner.shared.status.subscribe();
        let wait = async {
            loop {
                let current = status.borrow_and_update().clone();
                match current {
                    UpstreamStatus::Up { .. } => {
                        if let Some(connection) = self.inner.shared.connection() {
                            return Ok(connection);
                        }
                    }
                    UpstreamStatus::Down { .. } if self.restarts() == 0 => {
                        return Err(UPSTREAM_FAILED.to_owned());
                    }
                    UpstreamStatus::Stopped => return Err("the proxy is shutting down".to_owned()),
                    _ => {}
                }
                if status.changed().await.is_err() {
                    return Err("the proxy is shutting down".to_owned());
                }
            }
        };
        match tokio::time::timeout(limit, wait).await {
            Ok(result) => result,
            Err(_) => Err(format!(
                "the upstream server did not become available within {} ({}): see the proxy's log",
                humantime::format_duration(limit),
                self.status().name()
            )),
        }
    }

    /// What the server said in its last `initialize` (kept while it restarts).
    #[must_use]
    pub fn server_info(&self) -> Option<Arc<ServerPeerInfo>> {
        self.inner.shared.last_info.load_full()
    }

    /// The current connection, if open.
    #[must_use]
    pub fn connection(&self) -> Option<Arc<Connection>> {
        self.inner.shared.connection()
    }

    /// The connection state.
    #[must_use]
    pub fn status(&self) -> UpstreamStatus {
        self.inner.shared.status.borrow().clone()
    }

    /// How many times the connection was lost and re-established.
    #[must_use]
    pub fn restarts(&self) -> u64 {
        self.inner.restarts.load(Ordering::Relaxed)
    }

    /// Where the server is.
    #[must_use]
    pub fn target(&self) -> &UpstreamTarget {
        &self.inner.target
    }

    /// The `tower::Service` that sends requests through the current connection.
    #[must_use]
    pub fn service(&self) -> UpstreamService {
        UpstreamService::new(Arc::clone(&self.inner.shared))
    }

    /// The connection's configuration.
    #[must_use]
    pub fn config(&self) -> &UpstreamConfig {
        &self.inner.config
    }

    /// Checks what an HTTP(S) upstream needs before anything connects: the
    /// headers resolve (variables set, files readable), `ca_file` holds
    /// certificates. Errors name the key. Nothing to check for a command.
    pub fn check_http(&self) -> Result<(), ConfigError> {
        match &self.inner.target {
            UpstreamTarget::Url(_) => check_http_config(&self.inner.config),
            UpstreamTarget::Command { .. } | UpstreamTarget::InProcess(_) => Ok(()),
        }
    }

    /// What the proxy scrubs out of every text it shows: the URL's userinfo
    /// and query, the header values. The binary's log writer uses it too.
    #[must_use]
    pub fn redactor(&self) -> Arc<Redactor> {
        Arc::clone(&self.inner.shared.redactor)
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }

    /// The upstream part of `/health`: state, pid, restarts, target.
    #[must_use]
    pub fn health_json(&self) -> Value {
        let status = self.status();
        let mut report = json!({
            "state": status.name(),
            "target": self.inner.target.to_string(),
            "restarts": self.restarts(),
            "tools": self.inner.shared.catalog.len(),
        });
        match &status {
            UpstreamStatus::Up { pid, generation } => {
                report["pid"] = json!(pid);
                report["generation"] = json!(generation);
                if let Some(info) = self.connection().and_then(|c| c.info.clone()) {
                    report["protocolVersion"] = json!(info.protocol_version.as_str());
                    if let Some(server) = &info.server_info {
                        report["server"] = json!({"name": server.name, "version": server.version});
                    }
                }
            }
            UpstreamStatus::Down { error, retry_in } => {
                report["error"] = json!(error);
                report["retryInSeconds"] = json!(retry_in.as_secs_f64());
            }
            UpstreamStatus::Connecting { attempt } => report["attempt"] = json!(attempt),
            UpstreamStatus::Idle | UpstreamStatus::Stopped => {}
        }
        report
    }

    /// Stops the supervisor without waiting: it closes the connection in
    /// the background, and [`start`](Self::start) does nothing from now on.
    pub fn close(&self) {
        self.inner.shutdown.cancel();
    }

    /// Stops the supervisor and closes the connection (a child gets its
    /// stdin closed, then SIGTERM, then SIGKILL, a few seconds apart), waiting
    /// at most `limit`.
    pub async fn shutdown(&self, limit: Duration) {
        self.inner.shutdown.cancel();
        let supervisor = self
            .inner
            .supervisor
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(mut supervisor) = supervisor {
            if tokio::time::timeout(limit, &mut supervisor).await.is_err() {
                tracing::warn!("the upstream did not shut down in time");
                supervisor.abort();
            }
        }
        self.inner.shared.current.store(None);
        self.inner
            .shared
            .status
            .send_replace(UpstreamStatus::Stopped);
    }
}

fn set_status(shared: &Shared, status: UpstreamStatus) {
    metrics::gauge!("toolwarden_proxy_upstream_up").set(
        if matches!(status, UpstreamStatus::Up { .. }) {
            1.0
        } else {
            0.0
        },
    );
    shared.status.send_replace(status);
}

async fn supervise(inner: Arc<Inner>, client_info: ClientConfig) {
    let config = inner.config.clone();
    let shared = Arc::clone(&inner.shared);
    let mut backoff = config.restart_backoff_min;
    let mut attempt = 0u32;
    let mut generation = 0u64;
    loop {
        attempt += 1;
        set_status(&shared, UpstreamStatus::Connecting { attempt });
        let handler = UpstreamHandler::new(
            Arc::clone(&shared),
            client_info.clone(),
            config.connect_timeout,
        );
        let connected = tokio::select! {
            result = connect(
                &inner.target,
                &config,
                handler,
                Arc::clone(&shared.progress_up),
            ) => result,
            () = inner.shutdown.cancelled() => break,
        };
        let error = match connected {
            Ok(Connected { running, pid, lost }) => {
                generation += 1;
                attempt = 0;
                let mut client =
                    RmcpClient::new(running.peer().clone()).with_catalog(shared.catalog.clone());
                if let Some(timeout) = config.call_timeout {
                    client = client.timeout(timeout);
                }
                let info = running.peer().peer_info();
                if let Some(info) = &info {
                    shared.last_info.store(Some(Arc::clone(info)));
                }
                shared
                    .current
                    .store(Some(Arc::new(Connection { client, info, pid })));
                set_status(&shared, UpstreamStatus::Up { pid, generation });
                match pid {
                    Some(pid) => {
                        tracing::info!(pid, generation, target = %inner.target, "upstream connected")
                    }
                    None => {
                        tracing::info!(generation, target = %inner.target, "upstream connected")
                    }
                }
                if generation == 1 {
                    shared.refresh_catalog(config.connect_timeout);
                } else {
                    shared.refresh_catalog_after_reconnect(config.connect_timeout);
                }
                let up_since = tokio::time::Instant::now();
                let stop = running.cancellation_token();
                let ended = running.waiting();
                tokio::pin!(ended);
                // Over HTTP, rmcp's connection outlives a server that lost
                // the session (see `WatchedClient`): end it here.
                let session_lost = async {
                    match &lost {
                        Some(lost) => lost.notified().await,
                        None => std::future::pending().await,
                    }
                };
                let reason = tokio::select! {
                    reason = &mut ended => match reason {
                        Ok(reason) => format!("the connection ended ({reason:?})"),
                        Err(e) => format!("the connection task failed: {e}"),
                    },
                    () = session_lost => {
                        // New calls fail at once while the old connection
                        // closes; its calls in flight get their errors.
                        shared.current.store(None);
                        stop.cancel();
                        let _ = tokio::time::timeout(Duration::from_secs(5), &mut ended).await;
                        "the server lost the HTTP session".to_owned()
                    }
                    () = inner.shutdown.cancelled() => {
                        stop.cancel();
                        // rmcp drains replies (2 s) then closes the child
                        // (stdin, SIGTERM, SIGKILL, 3 s apart).
                        let _ = tokio::time::timeout(Duration::from_secs(10), &mut ended).await;
                        shared.current.store(None);
                        break;
                    }
                };
                shared.current.store(None);
                inner.restarts.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("toolwarden_proxy_upstream_restarts_total").increment(1);
                if up_since.elapsed() >= config.restart_reset_after {
                    backoff = config.restart_backoff_min;
                }
                reason
            }
            Err(error) => error,
        };
        // rmcp's and reqwest's texts quote the URL, userinfo and query included.
        let error = shared.redactor.scrub(&error).into_owned();
        tracing::warn!(
            target = %inner.target,
            error = %error,
            retry_in = %humantime::format_duration(backoff),
            "upstream unavailable"
        );
        set_status(
            &shared,
            UpstreamStatus::Down {
                error,
                retry_in: backoff,
            },
        );
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = inner.shutdown.cancelled() => break,
        }
        backoff = (backoff * 2).min(config.restart_backoff_max);
    }
    set_status(&shared, UpstreamStatus::Stopped);
}
