//! `[upstream]`: how the proxy keeps its connection to the MCP server.
//! Checked in [`Config::validate`](super::Config::validate).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
// Puts `skip_serializing_if = "Option::is_none"` on every `Option` field, so
// that `check-config --print` leaves unset keys out.
use serde_with::skip_serializing_none;

use rmcp::model::ProtocolVersion;

use super::HeaderTemplate;

/// `[upstream]`: how the proxy keeps its connection to the MCP server.
#[skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The first wait before reconnecting (restarting the child) after the
    /// upstream went away; doubled after each failed attempt. Default `100ms`.
    #[serde(with = "humantime_serde")]
    pub restart_backoff_min: Duration,
    /// The longest wait between reconnection attempts. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub restart_backoff_max: Duration,
    /// An upstream that stayed up this long is restarted with
    /// `restart_backoff_min` again when it goes away. Default `30s`.
    #[serde(with = "humantime_serde")]
    pub restart_reset_after: Duration,
    /// The bound on starting the child (or reaching the URL) and completing
    /// the `initialize` handshake. Default `30s`.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// rmcp's timeout of every request sent upstream: past it the request
    /// is cancelled upstream (`notifications/cancelled`) and fails as a
    /// timeout. Default: none (put `retry.deadline` above it instead).
    #[serde(with = "humantime_serde")]
    pub call_timeout: Option<Duration>,
    /// The bound on one attempt of a `tools/call` inside the tool stack
    /// (below the retry layer, so each retry gets its own): past it the
    /// attempt is cancelled upstream, fails as a timeout and counts for the
    /// circuit breaker. At most `retry.deadline`; longer than
    /// `circuit_breaker.slow_call_duration`. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub attempt_timeout: Duration,
    /// Certificates (PEM, one or more) trusted for an `https://` upstream
    /// besides the system's roots, e.g. a private CA. `--upstream-ca-file`
    /// overrides it. Default: none (the system's roots only).
    pub ca_file: Option<std::path::PathBuf>,
    /// How long a connection to an HTTP(S) upstream is kept open, idle,
    /// for the next request (each request over a new connection costs a
    /// TCP, and for `https://` a TLS, handshake). Below the server's own
    /// keep-alive timeout (Node's is 5 s), so that the server never closes a
    /// connection as the proxy reuses it; `0s` opens a new connection for
    /// every request. Default `2s`.
    #[serde(with = "humantime_serde")]
    pub http_keep_alive: Duration,
    /// Headers sent with every request to an HTTP(S) upstream, e.g.
    /// `{ Authorization = "Bearer ${MCP_TOKEN}" }`: `${VAR}` is read from the
    /// environment, `${file:/path}` (or a whole value `@file:/path`) from a
    /// file; the values are never logged or shown. Default: none.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, HeaderTemplate>,
    /// How many upstream connections the proxy keeps: `"shared"` (one, for
    /// every client) or `"per_session"` (one per downstream session, started
    /// by its `initialize` and closed when it ends; for servers that keep
    /// state per connection). Default `"shared"`. See [`SessionMode`].
    pub session_mode: SessionMode,
    /// The MCP protocol version the proxy asks the upstream for in its
    /// `initialize`, e.g. `"2025-06-18"`; one of the versions with an
    /// `initialize` handshake that rmcp knows (`2024-11-05`, `2025-03-26`,
    /// `2025-06-18`, `2025-11-25`). Default: unset, the version the
    /// downstream client asked the proxy for (the newest such version when
    /// rmcp cannot open a session with the client's). Each hop negotiates its
    /// own version: the client keeps the one it agreed with the proxy, and
    /// rmcp's models carry messages between the two; what the pinned version
    /// lacks (tasks before 2025-11-25, for one) the upstream does not offer.
    /// Pin it for a server whose newer protocol path costs more than the
    /// clients need: `server-everything` 2026.1, for one, primes an event
    /// store on every request of a 2025-11-25 session (see BENCHMARKS.md).
    pub protocol_version: Option<String>,
}

/// `upstream.session_mode`: which downstream sessions share an upstream
/// connection.
///
/// - `Shared` (the default): one connection (one child process, one HTTP
///   session) serves every client. Cheapest, and right for servers whose
///   tools keep no state between calls, which is most of them. The server's
///   requests (sampling, elicitation, roots) still reach only the client
///   whose call caused them.
/// - `PerSession`: each downstream session (each HTTP `mcp-session-id`; the
///   one stdio client) gets its own upstream connection, started by its
///   `initialize` and closed when the session ends (`DELETE`, idle timeout,
///   the client going away). For servers that keep state per connection (a
///   browser, a shell, a database transaction, `resources/subscribe`), so
///   that one client never sees another's. The number of connections is
///   bounded by `http.max_sessions`. A request served without a session
///   (2026-07-28 clients) is refused with `-32600`: it has no connection of
///   its own. The tool stack stays one: every session's calls share the
///   circuit breakers, quotas, retry budget and cache, as they share the
///   server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionMode {
    /// One upstream connection for every client.
    #[default]
    Shared,
    /// One upstream connection per downstream session.
    PerSession,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            restart_backoff_min: Duration::from_millis(100),
            restart_backoff_max: Duration::from_secs(10),
            restart_reset_after: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(30),
            call_timeout: None,
            attempt_timeout: Duration::from_secs(10),
            ca_file: None,
            http_keep_alive: Duration::from_secs(2),
            headers: BTreeMap::new(),
            session_mode: SessionMode::Shared,
            protocol_version: None,
        }
    }
}

impl UpstreamConfig {
    /// The pinned [`protocol_version`](Self::protocol_version), if set and
    /// known (`validate` refuses an unknown one).
    #[must_use]
    pub fn pinned_protocol_version(&self) -> Option<ProtocolVersion> {
        let wanted = self.protocol_version.as_deref()?;
        ProtocolVersion::KNOWN_VERSIONS
            .iter()
            .find(|v| v.as_str() == wanted && v.has_initialize())
            .cloned()
    }
}
