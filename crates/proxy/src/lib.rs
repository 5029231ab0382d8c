//! The toolwarden proxy: toolwarden's resilience stack in front of any MCP
//! server, as the `toolwarden` binary.
//!
//! ```text
//!  MCP client ──stdio or HTTP──▶ ProxyServer ──tools/call──▶ tool stack ──▶ UpstreamService ──▶ MCP server
//!   (agent)    ◀── progress, notifications, server→client requests ──── UpstreamHandler ◀──   (child or URL)
//! ```
//!
//! - [`cli`]: `toolwarden run`, `check-config` and `demo`.
//! - [`config`]: the TOML configuration with `TOOLWARDEN_<SECTION>_<KEY>`
//!   overrides; errors name the key.
//! - [`stack`]: [`build_stack`](stack::build_stack), the one place the
//!   layers are put around the upstream, and what they share ([`stack::SharedState`]).
//! - [`server`]: [`ProxyServer`](server::ProxyServer), the proxy as the
//!   client's MCP server: `tools/call` through the stack, everything else
//!   straight through, errors turned into answers a model can read.
//! - [`upstream`]: the connection to the server (child process or Streamable
//!   HTTP), restarted with backoff when it dies, and the proxy's handler for
//!   what the server sends back.
//! - [`sessions`]: one upstream for every session, or one per session
//!   (`upstream.session_mode`).
//! - [`routes`]: which client gets progress, notifications and server requests.
//! - [`framer`] and [`stdio`]: stdin/stdout with `-32700`/`-32600` answers to
//!   malformed lines and one writer for stdout.
//! - [`http`]: the Streamable HTTP downstream (`--listen`).
//! - [`access`]: `Origin`, `Host` and bearer-token checks of the HTTP listeners.
//! - [`tool_names`]: tool names refused before the stack (too long, unknown).
//! - [`endpoints`]: `/metrics`, `/health`, `/circuits` (`--metrics-addr`).
//! - [`redact`]: the upstream's secrets (URL userinfo and query, header
//!   values) kept out of logs, reports and answers.
//! - [`demo`]: `toolwarden demo`.
//!
//! See `README.md` next to this crate for the decisions and their reasons.

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations)]

pub mod access;
pub mod cli;
pub mod config;
pub mod demo;
pub mod endpoints;
pub mod framer;
pub mod http;
mod proxy;
pub mod redact;
pub mod routes;
pub mod server;
pub mod sessions;
pub mod stack;
pub mod stdio;
pub mod tool_names;
pub mod upstream;

pub use proxy::Proxy;
pub use upstream::{InProcessServer, UpstreamTarget};
