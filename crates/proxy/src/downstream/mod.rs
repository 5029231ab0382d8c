//! The downstream side: the proxy as the MCP server its clients talk to.
//!
//! ```text
//!  stdin/stdout ──▶ stdio ──┐                     ┌──▶ tool stack (tools/call)
//!                           ├──▶ ProxyServer ─────┤
//!  POST /mcp ─────▶ http ───┘   (one per session) └──▶ upstream (everything else)
//! ```
//!
//! - [`stdio`]: newline-delimited JSON-RPC on stdin/stdout, checked line by
//!   line by the [`framer`].
//! - [`http`]: Streamable HTTP at `/mcp`, checked and bounded before rmcp
//!   sees a request ([`framer`] again for the bodies).
//! - [`server`]: [`ProxyServer`], rmcp's `ServerHandler` for one session,
//!   over the [`ProxyCore`] every session shares; where errors become the
//!   client's answers.
//! - [`sessions`]: one upstream for every session, or one per session
//!   (`upstream.session_mode`).
//! - [`Downstreams`] (`clients/`): the registry of connected clients, their
//!   notification queues, and which of them a request of the server's is
//!   for.
//!
//! Each transport a session is served over counts the client's progress as
//! it reads it (see [`crate::progress`]).

mod clients;
pub mod framer;
pub mod http;
pub mod server;
pub mod sessions;
pub mod stdio;

pub use clients::{
    AwaitedPlace, Caller, CauseGuard, Disconnect, DownstreamId, Downstreams, Target,
    MAX_AWAITED_PER_CLIENT, NOTIFICATION_QUEUE, NOTIFICATION_STALL,
};
pub use server::{ProxyCore, ProxyServer};
pub use sessions::{Cores, SessionUpstreams, Upstreams};
