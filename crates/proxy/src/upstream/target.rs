//! Where the upstream server is: a command, a URL or a server in this
//! process.

use std::fmt;
use std::sync::Arc;

use crate::redact::{redact_url, Redactor};

/// An MCP server in this process, reached over an in-memory pipe: each
/// connection (and each reconnection) calls the function for a fresh pipe,
/// whose other end the function serves. The demo and tests use it.
#[derive(Clone)]
pub struct InProcessServer {
    name: String,
    pub(super) connect: Arc<dyn Fn() -> tokio::io::DuplexStream + Send + Sync>,
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
    pub(super) fn redactor(&self, secrets: Vec<String>) -> Redactor {
        let redactor = match self {
            UpstreamTarget::Url(url) => Redactor::default().with_url(url),
            UpstreamTarget::Command { .. } | UpstreamTarget::InProcess(_) => Redactor::default(),
        };
        secrets.into_iter().fold(redactor, Redactor::with_secret)
    }
}
