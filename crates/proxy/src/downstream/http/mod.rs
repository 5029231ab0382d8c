//! The downstream side over Streamable HTTP (`--listen ADDR`): rmcp's
//! `StreamableHttpService` at `/mcp`, served by axum. Each session gets its
//! own [`ProxyServer`]; all of them share the one upstream and tool stack,
//! or each has an upstream of its own under the one stack
//! (`upstream.session_mode = "per_session"`, see [`super::sessions`]).
//!
//! POST bodies are checked by the same [`framer`](super::framer) code as
//! stdio lines before rmcp sees them: malformed JSON-RPC gets a JSON-RPC
//! error (`-32700`, `-32600`, `-32602`; HTTP 400) rather than rmcp's
//! plain-text 415.
//!
//! Before that, every request is checked and bounded by `guard`: `Host`
//! and `Origin` against their allow-lists (403; loopback by default, never
//! turned off), the bearer token (401), the body's read time (408), the
//! number of sessions (503, unless a session gives way: see `evict`) and
//! of a session's requests in flight (429).
//! Connections are served by [`serve_bounded`] rather than axum's `serve`:
//! at most `http.max_connections` at once, headers within
//! `http.header_read_timeout`, and a shutdown that waits at most
//! `http.shutdown_timeout`. Sessions idle for 5 minutes are closed by rmcp.
//! A session whose client stops reading its notifications (see
//! [`Downstreams::broadcast`](super::Downstreams::broadcast)) has
//! the connections its requests came on dropped ([`ConnectionKill`]) and is
//! closed: rmcp's session worker, stuck writing to the stream nobody reads,
//! is freed only by the connection's end.
//!
//! Server→client requests (sampling, roots, elicitation) go to the session
//! whose call caused them, on that call's response stream, and to no other
//! (see [`super::Downstreams`]); one no session can be found for gets an error.
//! A request rmcp serves without
//! a session (from a client of the 2026-07-28 protocol, or any request with
//! per-request protocol metadata) goes through a one-shot transport that
//! carries its answer back and nothing more: rmcp takes no answer from such
//! a client. So the proxy does not count it among the connected clients
//! (a session's transport marks each request it reads `InSession`; see
//! `takes_requests` in [`super::server`]): it gets neither the server's
//! requests nor the notifications broadcast to every client, only the
//! progress of its own requests. With no client that has a session, a
//! request of the server's gets an error at once (`-32000 no client is
//! connected ...`), as does one whose client's session ends before it
//! answers; one the session keeps open waits for its answer, as long as a
//! human takes over an elicitation, until the server cancels it.
//!
//! rmcp's session manager makes each session's transport; the proxy's
//! `ProxySessions` wraps rmcp's `LocalSessionManager` and each transport it
//! makes (a `HookedTransport`), so the client's `notifications/progress`
//! are counted as the session reads them, as over stdio: progress on a
//! request of the server's reaches the server in order and before the
//! client's answer (see [`crate::progress`]). Each session counts into
//! progress routes of its own, which its transport hands to the session's
//! [`ProxyServer`] with every request it marks `InSession`, so that its
//! client is registered with them: rmcp numbers the progress tokens of each
//! session's peer separately (from 0), so two sessions each sent a request
//! of the server's can have it under the same token at the same time, and
//! their progress is kept apart. That holds for what the client
//! sent in order, that is each POST after the previous one was accepted;
//! POSTs sent concurrently have no order to keep. The one-shot transports
//! of requests without a session are rmcp's, unseen by the session manager;
//! but rmcp accepts neither notifications nor answers from such a client, so
//! there is no progress of its to order.
//!
//! Files: `guard.rs` (what `/mcp` checks before rmcp), `evict.rs` (which
//! session gives way to a new one at `http.max_sessions`), `session.rs` (the
//! session manager and each session's transport), `serve.rs`
//! ([`serve_bounded`]: the bounded connections).

mod evict;
mod guard;
mod serve;
mod session;

use std::sync::{Arc, Weak};
use std::time::Duration;

use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use self::guard::Guard;
use self::session::ProxySessions;
use super::sessions::Cores;
use super::ProxyServer;
use crate::access::{AccessPolicy, AuthTokens};
use crate::config::HttpConfig;

pub use self::serve::{serve_bounded, ConnectionKill, ConnectionLimits};
pub(crate) use self::session::InSession;

/// How a Streamable HTTP listener is bounded and who may use it; see
/// `[http]` in [`crate::config::HttpConfig`] for each default.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// The largest POST body (`413` past it).
    pub max_body_bytes: usize,
    /// `Origin`, `Host` and bearer tokens.
    pub access: AccessPolicy,
    /// The longest a client may take to send a request's headers.
    pub header_read_timeout: Duration,
    /// The longest a client may take to send a POST body (`408`).
    pub body_read_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// Sessions open at once: past it, an `initialize` closes the session
    /// it takes the place of (the heaviest client's, or one idle for
    /// `evict_idle_after`), or gets `503`.
    pub max_sessions: usize,
    /// How long a session must have been idle before a new session may
    /// take its place at `max_sessions`, unless its client holds the most.
    pub evict_idle_after: Duration,
    /// Requests of one session in flight at once (`429` past it).
    pub max_requests_per_session: usize,
    /// The longest the listener waits for requests in flight on shutdown.
    pub shutdown_timeout: Duration,
}

/// How long a kept-alive connection must have sat idle before a new
/// connection may take its place at `http.max_connections` (rule 2 of
/// `evict`; rule 1, the client holding the most, needs none). Closing an
/// idle connection costs its client a reconnection, not a call: a second
/// leaves a client that is about to reuse it alone. Behind one address
/// (a NAT), one client's pool of idle connections locked the others out.
pub const CONNECTION_IDLE_EVICT: Duration = Duration::from_secs(1);

impl HttpOptions {
    /// The connection bounds among these options.
    #[must_use]
    pub fn connection_limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            header_read_timeout: self.header_read_timeout,
            max_connections: self.max_connections,
            shutdown_timeout: self.shutdown_timeout,
            evict_idle_after: CONNECTION_IDLE_EVICT,
        }
    }

    /// The options of `[http]` (and `downstream.max_body_bytes`), with `access`.
    #[must_use]
    pub fn new(config: &HttpConfig, max_body_bytes: usize, access: AccessPolicy) -> Self {
        HttpOptions {
            max_body_bytes,
            access,
            header_read_timeout: config.header_read_timeout,
            body_read_timeout: config.body_read_timeout,
            max_connections: config.max_connections,
            max_sessions: config.max_sessions,
            evict_idle_after: config.evict_idle_after,
            max_requests_per_session: config.max_requests_per_session,
            shutdown_timeout: config.shutdown_timeout,
        }
    }
}

/// Serves MCP over Streamable HTTP at `/mcp` on `listener` until `shutdown`
/// is cancelled, with every default of `[http]`: loopback origins and hosts
/// (and the listener's own address) only, no token. `allow_remote` is kept
/// for callers of earlier versions: the `Host` check is never turned off
/// any more (see [`serve_http_with`] to extend it).
pub async fn serve_http(
    core: impl Into<Cores>,
    listener: TcpListener,
    max_body_bytes: usize,
    allow_remote: bool,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let _ = allow_remote;
    let access = AccessPolicy::new(&[], &[], listener.local_addr().ok(), AuthTokens::default())
        .map_err(std::io::Error::other)?;
    let options = HttpOptions::new(&HttpConfig::default(), max_body_bytes, access);
    serve_http_with(core, listener, options, shutdown).await
}

/// Serves MCP over Streamable HTTP at `/mcp` on `listener` until `shutdown`
/// is cancelled, checked and bounded by `options` (see `guard` and
/// [`serve_bounded`]).
pub async fn serve_http_with(
    cores: impl Into<Cores>,
    listener: TcpListener,
    options: HttpOptions,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    // rmcp checks `Host` too; give it the same list, never an empty one
    // (which would turn its check off). Its sessions end once the drain is
    // over, not when it starts: cancelled with `shutdown`, rmcp ended every
    // call's stream at once, unanswered (the drain then had nothing to wait
    // for). The standalone GET streams, which would hold the drain to its
    // timeout, end when it starts (see `guard`).
    let sessions_end = CancellationToken::new();
    let _end_sessions = sessions_end.clone().drop_guard();
    let config = StreamableHttpServerConfig::default()
        .with_cancellation_token(sessions_end.child_token())
        // A request served without a session (2026-07-28) is answered with
        // JSON when its answer is the first message (SSE otherwise): the
        // Python SDK closes an SSE answer before reading its end, which
        // costs it the kept-alive connection (a new one per call, and the
        // loop guard, keyed by connection for such clients, never saw a
        // repeat). Sessions' answers are rmcp's SSE either way.
        .with_json_response(true)
        .with_max_request_body_bytes(options.max_body_bytes)
        .with_allowed_hosts(options.access.rmcp_hosts());
    let sessions = Arc::new_cyclic(|me: &Weak<ProxySessions<LocalSessionManager>>| {
        ProxySessions::new(LocalSessionManager::default(), Weak::clone(me))
    });
    let cores = cores.into();
    let service = StreamableHttpService::new(
        move || Ok(ProxyServer::new(cores.session_core())),
        Arc::clone(&sessions),
        config,
    );
    let guard = Guard::new(&options, sessions, shutdown.child_token());
    let router = axum::Router::new()
        .nest_service("/mcp", service)
        .layer(axum::middleware::from_fn_with_state(guard, guard::guard));
    serve_bounded(listener, router, options.connection_limits(), shutdown).await
}
