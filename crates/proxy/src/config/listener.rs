//! `[http]` (the Streamable HTTP listener) and `[limits]` (bounds on what
//! any client may ask). Defaults are written next to each key.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_with::skip_serializing_none;
use toolwarden_core::ConfigError;

use super::{at_most, positive, within};

/// The longest `http.header_read_timeout` may be: headers a client takes
/// longer than this over are not worth waiting for, and hyper's timer
/// overflows the clock on absurd values.
const MAX_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(3600);
use crate::access::{AllowedHost, AllowedOrigin};

/// `[http]`: what `toolwarden run --listen ADDR` accepts. Every bound here
/// is on by default; see the crate README for the reasons.
#[skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Browser origins allowed besides loopback ones (`http(s)://localhost`,
    /// `127.0.0.1`, `[::1]`, any port, always allowed): `"https://app.example.com"`
    /// (its default port), `"https://app.example.com:8443"`, `"http://host:*"`
    /// (any port) or `"null"`. A request with another `Origin` gets 403; one
    /// without `Origin` (not a browser) is not checked. `--allow-origin` adds
    /// to this list. Default: none.
    pub allowed_origins: Vec<String>,
    /// `Host` values allowed besides loopback names (`localhost`,
    /// `127.0.0.1`, `::1`) and the listen address: `"mcp.example.com"` (any
    /// port) or `"mcp.example.com:8443"`. Another `Host` gets 403 (DNS
    /// rebinding). `--allow-host` adds to this list. Default: none.
    pub allowed_hosts: Vec<String>,
    /// A file of bearer tokens clients must send (`Authorization: Bearer
    /// TOKEN`), one a line (blank lines and lines starting with `#` are
    /// skipped); `--auth-token-file` wins over it. Tokens may also come from
    /// `TOOLWARDEN_AUTH_TOKENS` (comma-separated). Required off loopback.
    /// Default: none.
    pub auth_token_file: Option<PathBuf>,
    /// Require the same tokens on the metrics address (`/metrics`,
    /// `/health`, `/circuits`); `--metrics-auth` turns it on too. Default `false`.
    pub metrics_auth: bool,
    /// How many results of each health check `/health?history=1` keeps on
    /// the metrics address (with the time each ran), 1 to 1000. Read at
    /// start-up (a reload keeps the running length). Default 20.
    pub health_history: usize,
    /// The longest a client may take to send a request's headers; past it the
    /// connection is closed (slowloris). At most an hour. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// The longest a client may take to send a POST body (`408` past it).
    /// Default `30s`.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Connections served at once. At the bound a new connection takes the
    /// place of an idle one (no request in progress) by the rules of
    /// `max_sessions` (idle a second rather than `evict_idle_after`), else waits (and further clients in the listen
    /// backlog) until one closes. Default 256.
    pub max_connections: usize,
    /// Streamable HTTP sessions open at once. Sessions idle 5 minutes are
    /// closed. Past it, an `initialize` takes the place of a session with
    /// no request in flight: the least recently active one of the client
    /// (address) holding the most sessions, if it holds two more than the
    /// newcomer and had no request for 10 s (or `evict_idle_after`, if
    /// shorter); else the longest idle one, if idle `evict_idle_after`, of
    /// a client holding at least as many as the newcomer. If there is none,
    /// it gets `503`. Default 64.
    pub max_sessions: usize,
    /// How long a session must have been idle (no request, no answer in
    /// flight) before a new session may take its place at `max_sessions`,
    /// unless its client holds the most sessions (see `max_sessions`). Set
    /// it to `5m` or more to close idle sessions only when rmcp does.
    /// Default `1m`.
    #[serde(with = "humantime_serde")]
    pub evict_idle_after: Duration,
    /// Requests of one session in flight at once; one more gets `429`.
    /// Default 32.
    pub max_requests_per_session: usize,
    /// On SIGTERM/SIGINT, the longest the listener waits for requests in
    /// flight before closing their connections (a second signal exits at
    /// once). Default `10s`.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            allowed_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            auth_token_file: None,
            metrics_auth: false,
            health_history: toolwarden::observability::DEFAULT_HEALTH_HISTORY,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_connections: 256,
            max_sessions: 64,
            evict_idle_after: Duration::from_secs(60),
            max_requests_per_session: 32,
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

impl HttpConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for origin in &self.allowed_origins {
            AllowedOrigin::parse(origin).map_err(|e| ConfigError::new("allowed_origins", e))?;
        }
        for host in &self.allowed_hosts {
            AllowedHost::parse(host).map_err(|e| ConfigError::new("allowed_hosts", e))?;
        }
        if self
            .auth_token_file
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(ConfigError::new("auth_token_file", "must not be empty"));
        }
        within(
            "health_history",
            Some(self.health_history),
            1,
            toolwarden::observability::HEALTH_HISTORY_LIMIT,
        )?;
        positive("header_read_timeout", Some(self.header_read_timeout))?;
        at_most(
            "header_read_timeout",
            self.header_read_timeout,
            MAX_HEADER_READ_TIMEOUT,
        )?;
        positive("body_read_timeout", Some(self.body_read_timeout))?;
        positive("evict_idle_after", Some(self.evict_idle_after))?;
        positive("shutdown_timeout", Some(self.shutdown_timeout))?;
        within("max_connections", Some(self.max_connections), 1, 1 << 20)?;
        within("max_sessions", Some(self.max_sessions), 1, 1 << 20)?;
        within(
            "max_requests_per_session",
            Some(self.max_requests_per_session),
            1,
            1 << 20,
        )
    }
}

/// `[limits]`: bounds on what any client may ask, over stdio or HTTP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// The longest tool name a `tools/call` may carry, in bytes; a longer
    /// one is answered `-32602` before the tool stack, unless `tools/list`
    /// listed it (a gateway's prefix can take a server's name past the
    /// limit). Default 128.
    pub max_tool_name_bytes: usize,
    /// Once the catalog is filled from `tools/list`, answer a `tools/call`
    /// of a tool not in it with `-32602` before the tool stack, so that junk
    /// names never create per-tool state. Default `true`.
    pub reject_unknown_tools: bool,
    /// The bound on every request other than `tools/call` (`tools/list`,
    /// `resources/read`, `prompts/get`, `ping`, ...) sent upstream; past it
    /// the request is cancelled upstream and answered `-32001`. Tool calls
    /// are bounded by `upstream.attempt_timeout` and `retry.deadline`.
    /// Default `60s`.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long sending one notification to a client may take: past it the
    /// client is not reading, gets no more notifications and, over HTTP,
    /// has its session closed and its connections dropped, so it never
    /// holds up anyone else. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub client_stall_timeout: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_tool_name_bytes: 128,
            reject_unknown_tools: true,
            request_timeout: Duration::from_secs(60),
            client_stall_timeout: Duration::from_secs(10),
        }
    }
}

impl LimitsConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        within(
            "max_tool_name_bytes",
            Some(self.max_tool_name_bytes),
            1,
            65_536,
        )?;
        positive("request_timeout", Some(self.request_timeout))?;
        positive("client_stall_timeout", Some(self.client_stall_timeout))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use crate::config::Config;

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<Config, String> {
        Config::from_toml_str(
            text,
            env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let config = Config::default();
        assert_eq!(config.http.header_read_timeout, Duration::from_secs(10));
        assert_eq!(config.http.body_read_timeout, Duration::from_secs(30));
        assert_eq!(config.http.max_connections, 256);
        assert_eq!(config.http.max_sessions, 64);
        assert_eq!(config.http.evict_idle_after, Duration::from_secs(60));
        assert_eq!(config.http.max_requests_per_session, 32);
        assert_eq!(config.http.shutdown_timeout, Duration::from_secs(10));
        assert!(!config.http.metrics_auth);
        assert_eq!(config.limits.max_tool_name_bytes, 128);
        assert!(config.limits.reject_unknown_tools);
        assert_eq!(config.limits.request_timeout, Duration::from_secs(60));
        assert_eq!(config.limits.client_stall_timeout, Duration::from_secs(10));
    }

    #[test]
    fn file_and_environment_set_them() {
        let config = parse(
            "[http]\nallowed_origins = [\"https://app.example.com\"]\nmax_sessions = 8\n\
             [limits]\nreject_unknown_tools = false\n",
            &[
                ("TOOLWARDEN_HTTP_HEADER_READ_TIMEOUT", "2s"),
                ("TOOLWARDEN_LIMITS_MAX_TOOL_NAME_BYTES", "64"),
                ("TOOLWARDEN_HTTP_ALLOWED_HOSTS", "[\"mcp.internal\"]"),
            ],
        )
        .unwrap();
        assert_eq!(config.http.allowed_origins, ["https://app.example.com"]);
        assert_eq!(config.http.allowed_hosts, ["mcp.internal"]);
        assert_eq!(config.http.max_sessions, 8);
        assert_eq!(config.http.header_read_timeout, Duration::from_secs(2));
        assert_eq!(config.limits.max_tool_name_bytes, 64);
        assert!(!config.limits.reject_unknown_tools);
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            (
                "[http]\nallowed_origins = [\"app.example.com\"]",
                "http.allowed_origins",
            ),
            ("[http]\nallowed_hosts = [\"a b\"]", "http.allowed_hosts"),
            ("[http]\nmax_sessions = 0", "http.max_sessions"),
            ("[http]\nevict_idle_after = \"0s\"", "http.evict_idle_after"),
            (
                "[http]\nheader_read_timeout = \"0s\"",
                "http.header_read_timeout",
            ),
            // hyper adds it to the clock: u64::MAX seconds panicked every
            // connection, on /mcp and on the metrics address.
            (
                "[http]\nheader_read_timeout = \"18446744073709551615s\"",
                "http.header_read_timeout",
            ),
            (
                "[http]\nheader_read_timeout = \"61m\"",
                "http.header_read_timeout",
            ),
            ("[http]\nauth_tokens = [\"x\"]", "auth_tokens"),
            (
                "[limits]\nmax_tool_name_bytes = 0",
                "limits.max_tool_name_bytes",
            ),
            (
                "[limits]\nrequest_timeout = \"0s\"",
                "limits.request_timeout",
            ),
            (
                "[limits]\nclient_stall_timeout = \"0s\"",
                "limits.client_stall_timeout",
            ),
        ] {
            let error = parse(text, &[]).unwrap_err();
            assert!(error.contains(key), "{text}: {error}");
        }
    }
}
