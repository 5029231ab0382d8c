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
//!   it fails at once with a [`TransportError`] of kind `ConnectFailed`
//!   (classified `before_sent`: safe to retry for any tool).
//! - [`UpstreamHandler`] answers what the server sends to the proxy as its
//!   client: notifications are forwarded to the downstream clients, requests
//!   (sampling, roots, elicitation) to the session whose call caused them.
//! - Progress the server sends for a request reaches the client before the
//!   response, and in the order sent: the transport counts and numbers each
//!   progress notification as it reads it (`ProgressTallyTransport`), the
//!   handler forwards a token's progress in that order, and the proxy holds a
//!   response until the progress counted for its request has been forwarded
//!   (see [`crate::routes`]). The downstream transports are wrapped the same
//!   way for the progress a client sends on the server's requests, each
//!   counting into its client's own routes (rmcp numbers each client peer's
//!   tokens separately).

mod handler;
mod http_client;
mod transport;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use rmcp::model::{ClientConfig, ClientRequest, ServerPeerInfo, ServerResult};
use rmcp::service::{RoleClient, RoleServer, RunningService};
use rmcp::transport::async_rw::AsyncRwTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use rmcp::ServiceExt as _;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use toolwarden_core::classify::CallTimedOut;
use toolwarden_core::classify::{TransportError, TransportErrorKind};
use toolwarden_core::jsonrpc::ErrorObject;
use toolwarden_core::{BoxError, ConfigError, ToolCatalog};
use toolwarden_rmcp::{RmcpClient, RmcpClientFuture};
use tower::ServiceExt as _;

use crate::config::UpstreamConfig;
use crate::redact::{redact_url, Redactor, UPSTREAM_FAILED};
use crate::routes::{Downstreams, ProgressRoutes};

pub use handler::UpstreamHandler;
pub(crate) use transport::ProgressTallyTransport;

/// An MCP server in this process, reached over an in-memory pipe: each
/// connection (and each reconnection) calls the function for a fresh pipe,
/// whose other end the function serves. The demo and tests use it.
#[derive(Clone)]
pub struct InProcessServer {
    name: String,
    connect: Arc<dyn Fn() -> tokio::io::DuplexStream + Send + Sync>,
}

impl InProcessServer {
    /// A server called `name` (for logs), connected by `connect`.
    pub fn new(
        name: impl Into<String>,
        connect: impl Fn() -> tokio::io::DuplexStream + Send + Sync + 'static,
    ) -> Self {
        InProcessServer {
            name: name.into(),
            connect: Arc::new(connect),
        }
    }
}

impl fmt::Debug for InProcessServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InProcessServer")
            .field("name", &self.name)
            .finish()
    }
}

/// Where the upstream server is.
///
/// Shown (`Display`, `Debug`, `/health`'s `target`, logs) without what may
/// be secret: a command as its program alone (arguments may carry tokens), a
/// URL without userinfo, query or fragment (see [`redact_url`]).
#[derive(Clone)]
pub enum UpstreamTarget {
    /// A child process speaking MCP on its stdin/stdout.
    Command {
        /// The program.
        program: std::ffi::OsString,
        /// Its arguments.
        args: Vec<std::ffi::OsString>,
    },
    /// A Streamable HTTP endpoint (`http://host:port/mcp` or `https://...`).
    Url(String),
    /// A server in this process.
    InProcess(InProcessServer),
}

impl fmt::Display for UpstreamTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamTarget::Command { program, .. } => {
                write!(f, "{}", program.to_string_lossy())
            }
            UpstreamTarget::Url(url) => f.write_str(&redact_url(url)),
            UpstreamTarget::InProcess(server) => write!(f, "{} (in process)", server.name),
        }
    }
}

impl fmt::Debug for UpstreamTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamTarget::Command { program, args } => f
                .debug_struct("Command")
                .field("program", program)
                .field("args", &format_args!("[{} hidden]", args.len()))
                .finish(),
            UpstreamTarget::Url(url) => f.debug_tuple("Url").field(&redact_url(url)).finish(),
            UpstreamTarget::InProcess(server) => f.debug_tuple("InProcess").field(server).finish(),
        }
    }
}

impl UpstreamTarget {
    /// What must never be shown about this target (a URL's userinfo and
    /// query), plus `secrets` (the header values).
    fn redactor(&self, secrets: Vec<String>) -> Redactor {
        let redactor = match self {
            UpstreamTarget::Url(url) => Redactor::default().with_url(url),
            UpstreamTarget::Command { .. } | UpstreamTarget::InProcess(_) => Redactor::default(),
        };
        secrets.into_iter().fold(redactor, Redactor::with_secret)
    }
}

/// The state of the upstream connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamStatus {
    /// Not started: no client has initialized yet.
    Idle,
    /// Connecting (starting the child, `initialize`).
    Connecting {
        /// Attempts since the last successful connection, this one included.
        attempt: u32,
    },
    /// Connected.
    Up {
        /// The child's process id (none for a URL).
        pid: Option<u32>,
        /// Counts connections since the proxy started (1 for the first).
        generation: u64,
    },
    /// Down, waiting to reconnect.
    Down {
        /// Why the last connection ended or the last attempt failed.
        error: String,
        /// The wait before the next attempt.
        retry_in: Duration,
    },
    /// Shut down with the proxy.
    Stopped,
}

impl UpstreamStatus {
    /// A short name: `idle`, `connecting`, `up`, `down` or `stopped`.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            UpstreamStatus::Idle => "idle",
            UpstreamStatus::Connecting { .. } => "connecting",
            UpstreamStatus::Up { .. } => "up",
            UpstreamStatus::Down { .. } => "down",
            UpstreamStatus::Stopped => "stopped",
        }
    }
}

impl fmt::Display for UpstreamStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamStatus::Idle => f.write_str("not started"),
            UpstreamStatus::Connecting { attempt } => write!(f, "connecting (attempt {attempt})"),
            UpstreamStatus::Up { .. } => f.write_str("connected"),
            UpstreamStatus::Down { error, retry_in } => write!(
                f,
                "down ({error}); reconnecting in {}",
                humantime::format_duration(*retry_in)
            ),
            UpstreamStatus::Stopped => f.write_str("stopped"),
        }
    }
}

/// One live connection.
#[derive(Debug)]
pub struct Connection {
    client: RmcpClient,
    info: Option<Arc<ServerPeerInfo>>,
    pid: Option<u32>,
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
    status: watch::Sender<UpstreamStatus>,
    /// Scrubs the upstream's secrets out of error texts.
    redactor: Arc<Redactor>,
}

impl Shared {
    /// The current connection, if it is open.
    pub(crate) fn connection(&self) -> Option<Arc<Connection>> {
        self.current
            .load_full()
            .filter(|c| !c.client.peer().is_transport_closed())
    }

    /// Refills the catalog from the current connection, in the background.
    pub(crate) fn refresh_catalog(&self, limit: Duration) {
        let Some(connection) = self.connection() else {
            return;
        };
        let redactor = Arc::clone(&self.redactor);
        tokio::spawn(async move {
            match tokio::time::timeout(limit, connection.client.refresh_catalog()).await {
                Ok(Ok(n)) => tracing::debug!(tools = n, "tool catalog refreshed"),
                Ok(Err(e)) => {
                    let error = redactor.scrub(&e.to_string()).into_owned();
                    tracing::warn!(%error, "tools/list failed; the catalog keeps its tools")
                }
                Err(_) => tracing::warn!("tools/list timed out; the catalog keeps its tools"),
            }
        });
    }
}

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
                }),
                restarts: AtomicU64::new(0),
                supervisor: Mutex::new(None),
                shutdown: CancellationToken::new(),
            }),
        }
    }

    /// Starts the supervisor, which connects as a client described by
    /// `client_info` (the first downstream client's, mirrored). Later calls
    /// do nothing: the upstream is started once.
    pub fn start(&self, client_info: ClientConfig) {
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
        UpstreamService {
            shared: Arc::clone(&self.inner.shared),
        }
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

/// Checks `upstream.headers` (variables set, files readable, values valid)
/// and `upstream.ca_file` (certificates in it), as an HTTP(S) upstream would
/// use them; `check-config` runs it. Errors name the key and hold no secret.
pub fn check_http_config(config: &UpstreamConfig) -> Result<(), ConfigError> {
    http_client::http_client(config, &http_client::process_var).map(|_| ())
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

type Running = RunningService<RoleClient, UpstreamHandler>;

/// Starts the child or opens the URL, and runs `initialize`. Progress the
/// server sends is counted into `progress` as it is read.
async fn connect(
    target: &UpstreamTarget,
    config: &UpstreamConfig,
    handler: UpstreamHandler,
    progress: Arc<ProgressRoutes<RoleServer>>,
) -> Result<(Running, Option<u32>), String> {
    let limit = config.connect_timeout;
    let connecting = async {
        match target {
            UpstreamTarget::Command { program, args } => {
                let mut command = tokio::process::Command::new(program);
                command.args(args);
                // stdin/stdout are the MCP pipe; stderr is the proxy's stderr,
                // so the server's logs land with ours (never on our stdout).
                let (transport, _) = TokioChildProcess::builder(command)
                    .spawn()
                    .map_err(|e| format!("cannot start {target}: {e}"))?;
                let pid = transport.id();
                let running = handler
                    .serve(ProgressTallyTransport::new(transport, progress))
                    .await
                    .map_err(initialize_failed)?;
                Ok((running, pid))
            }
            UpstreamTarget::InProcess(server) => {
                let (read, write) = tokio::io::split((server.connect)());
                let transport = AsyncRwTransport::new_client(read, write);
                let running = handler
                    .serve(ProgressTallyTransport::new(transport, progress))
                    .await
                    .map_err(initialize_failed)?;
                Ok((running, None))
            }
            UpstreamTarget::Url(url) => {
                // Built per connection: a rotated token file is read again.
                let (client, _) = http_client::http_client(config, &http_client::process_var)
                    .map_err(|e| e.to_string())?;
                let transport = StreamableHttpClientTransport::with_client(
                    client,
                    StreamableHttpClientTransportConfig::with_uri(url.as_str()),
                );
                let running = handler
                    .serve(ProgressTallyTransport::new(transport, progress))
                    .await
                    .map_err(initialize_failed)?;
                Ok((running, None))
            }
        }
    };
    match tokio::time::timeout(limit, connecting).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "no answer to initialize within {}",
            humantime::format_duration(limit)
        )),
    }
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
            Ok((running, pid)) => {
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
                shared.refresh_catalog(config.connect_timeout);
                let up_since = tokio::time::Instant::now();
                let stop = running.cancellation_token();
                let ended = running.waiting();
                tokio::pin!(ended);
                let reason = tokio::select! {
                    reason = &mut ended => reason,
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
                match reason {
                    Ok(reason) => format!("the connection ended ({reason:?})"),
                    Err(e) => format!("the connection task failed: {e}"),
                }
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

/// The innermost service of the stack: sends a request through the current
/// upstream connection (see the [module docs](self)). Clones share the
/// connection.
#[derive(Clone)]
pub struct UpstreamService {
    shared: Arc<Shared>,
}

impl fmt::Debug for UpstreamService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamService")
            .field("status", &*self.shared.status.borrow())
            .finish()
    }
}

impl tower::Service<ClientRequest> for UpstreamService {
    type Response = ServerResult;
    type Error = BoxError;
    type Future = UpstreamFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Always ready: with no connection, `call` fails at once, which is
        // what the layers above must see (a refusal they can classify).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: ClientRequest) -> Self::Future {
        let inner: RmcpClientFuture = match self.shared.connection() {
            Some(connection) => Box::pin(connection.client.clone().oneshot(request)),
            None => {
                // The status's error is for the log (the supervisor wrote it
                // there); the caller gets the state alone.
                let status = self.shared.status.borrow().name();
                Box::pin(std::future::ready(Err(Box::new(TransportError::new(
                    TransportErrorKind::ConnectFailed,
                    format!("the upstream server is {status}: see the proxy's log"),
                )) as BoxError)))
            }
        };
        UpstreamFuture {
            inner,
            redactor: Arc::clone(&self.shared.redactor),
        }
    }
}

/// Response future of [`UpstreamService`]: the connection's answer, with a
/// failure of the connection itself replaced by a generic one
/// ([`UPSTREAM_FAILED`], same kind and class) once its details are logged,
/// scrubbed. The server's own JSON-RPC errors and timeouts pass unchanged.
pub struct UpstreamFuture {
    inner: RmcpClientFuture,
    redactor: Arc<Redactor>,
}

impl fmt::Debug for UpstreamFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamFuture").finish_non_exhaustive()
    }
}

impl std::future::Future for UpstreamFuture {
    type Output = Result<ServerResult, BoxError>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.inner.as_mut().poll(cx) {
            Poll::Ready(Err(error)) => Poll::Ready(Err(generic_error(error, &self.redactor))),
            other => other,
        }
    }
}

/// Why `initialize` failed, with the transport's own cause (a TLS or
/// connect failure), which rmcp's error does not give as its source.
fn initialize_failed(error: rmcp::service::ClientInitializeError) -> String {
    match &error {
        rmcp::service::ClientInitializeError::TransportError { error, context } => {
            format!("initialize failed: {context}: {}", error_chain(error))
        }
        _ => format!("initialize failed: {}", error_chain(&error)),
    }
}

/// `error` and its sources, each once: reqwest's `Display` stops at
/// "error sending request", the TLS or connect failure is in its sources.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = cause(error);
    while let Some(e) = source {
        let more = e.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause(e);
    }
    text
}

/// The error's source, and for rmcp's HTTP client error the reqwest error it
/// holds (rmcp does not give it as the source: the TLS cause would be lost).
fn cause<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a (dyn std::error::Error + 'static)> {
    use rmcp::transport::streamable_http_client::StreamableHttpError;
    if let Some(StreamableHttpError::Client(inner)) =
        error.downcast_ref::<StreamableHttpError<reqwest::Error>>()
    {
        return Some(inner);
    }
    error.source()
}

/// A connection failure as a caller may see it (see [`UpstreamFuture`]).
fn generic_error(error: BoxError, redactor: &Redactor) -> BoxError {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error.as_ref());
    while let Some(e) = current {
        if e.is::<ErrorObject>() || e.is::<CallTimedOut>() {
            return error;
        }
        if let Some(transport) = e.downcast_ref::<TransportError>() {
            if transport.kind == TransportErrorKind::ConnectFailed {
                // Ours (no connection): already says nothing more than the state.
                return error;
            }
            let detail = redactor.scrub(&error_chain(error.as_ref())).into_owned();
            tracing::warn!(error = %detail, "upstream request failed");
            return Box::new(TransportError::new(transport.kind, UPSTREAM_FAILED));
        }
        current = e.source();
    }
    let detail = redactor.scrub(&error_chain(error.as_ref())).into_owned();
    tracing::warn!(error = %detail, "upstream request failed");
    Box::new(UpstreamFailed)
}

/// Any other failure of the upstream connection, its details in the log.
/// Classified as a server failure, as rmcp's errors it replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamFailed;

impl fmt::Display for UpstreamFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(UPSTREAM_FAILED)
    }
}

impl std::error::Error for UpstreamFailed {}
