//! [`UpstreamStatus`]: the state of the upstream connection.

use std::fmt;
use std::time::Duration;

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
