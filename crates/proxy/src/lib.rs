//! The toolwarden proxy: toolwarden's resilience stack in front of any MCP
//! server, as the `toolwarden` binary.
//!
//! ```text
//!  MCP client ──stdio or HTTP──▶ downstream ──tools/call──▶ tool stack ──▶ upstream ──▶ MCP server
//!   (agent)    ◀── progress, notifications, server→client requests ─────── upstream ◀──  (child or URL)
//! ```
//!
//! The folders follow a call:
//!
//! - [`downstream`]: the proxy as its clients' MCP server: stdio
//!   ([`downstream::stdio`]), Streamable HTTP ([`downstream::http`]), the
//!   session registry ([`downstream::sessions`], [`Downstreams`]) and
//!   [`ProxyServer`], the `ServerHandler`: `tools/call` through the stack,
//!   everything else straight through, errors turned into answers.
//! - [`stack`]: [`build_stack`](stack::build_stack), the one place the
//!   layers are put around the upstream, and what they share
//!   ([`stack::SharedState`]).
//! - [`upstream`]: the connection to the server (child process, Streamable
//!   HTTP URL or in-process), restarted with backoff when it dies, the
//!   stack's innermost service, and the proxy's handler for what the server
//!   sends back.
//! - [`progress`]: where progress goes, in order and before the answer of
//!   its request, in both directions.
//! - [`config`]: the TOML configuration with `TOOLWARDEN_<SECTION>_<KEY>`
//!   overrides; errors name the key.
//!
//! And beside the flow: [`cli`] (`toolwarden run`, `check-config`, `demo`
//! and `top`), [`top`] (the live per-tool view of a running proxy, drawn
//! with [`table`], the demo's table renderer), [`reload`] (`SIGHUP` and `--watch`: new policies, circuits kept), [`access`] (`Origin`, `Host` and bearer-token checks of the HTTP
//! listeners), [`tool_names`] (tool names refused before the stack),
//! [`endpoints`] (`/metrics`, `/health`, `/circuits`), [`redact`] (the
//! upstream's secrets kept out of logs, reports and answers), [`replicas`]
//! (breakers and quotas shared through Redis, `[redis]`), [`demo`]
//! (`toolwarden demo`), and [`transport`], the one wrapper of rmcp
//! transports (a hook on each message read) that both sides use.
//!
//! See `README.md` next to this crate for the decisions and their reasons.

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations)]

pub mod access;
pub mod cli;
pub mod config;
pub mod demo;
pub mod downstream;
pub mod endpoints;
pub mod gateway;
pub mod otlp;
pub mod progress;
mod proxy;
pub mod redact;
pub mod reload;
pub mod replicas;
pub mod stack;
pub mod table;
mod tasks;
pub mod tool_names;
#[cfg(unix)]
pub mod top;
pub mod transport;
pub mod upstream;

pub use downstream::framer::DEFAULT_MAX_LINE_BYTES;
pub use downstream::http::{serve_http, serve_http_with, HttpOptions};
pub use downstream::server::upstream_client_config;
pub use downstream::stdio::serve_stdio;
pub use downstream::{Downstreams, ProxyCore, ProxyServer};
pub use proxy::Proxy;
pub use upstream::{InProcessServer, Upstream, UpstreamStatus, UpstreamTarget};
