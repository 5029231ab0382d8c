//! A read-only view of circuit states, for layers and reports that need to
//! know which keys are open without depending on the circuit-breaker crate
//! (the fallback cache skips open tools when it suggests alternatives; the
//! health report names open circuits).

use std::fmt;
use std::sync::Arc;

use crate::request::McpRequest;

use serde::{Deserialize, Serialize};

/// The state of one circuit: what the circuit breaker's registry reports
/// and what observability tracks from circuit events. One type for both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CircuitState {
    /// Calls pass and their outcomes are recorded.
    Closed,
    /// Calls are refused until the open period ends.
    Open,
    /// A few probe calls pass; their outcomes close or reopen the circuit.
    HalfOpen,
    /// Manual: every call passes and nothing is recorded.
    Disabled,
    /// Manual: every call is refused.
    ForcedOpen,
    /// Manual: every call passes; outcomes are recorded and reported, but
    /// the circuit never opens.
    MetricsOnly,
}

impl CircuitState {
    /// A short lower-case label (`closed`, `open`, `half_open`, `disabled`,
    /// `forced_open`, `metrics_only`), as serialized.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
            CircuitState::Disabled => "disabled",
            CircuitState::ForcedOpen => "forced_open",
            CircuitState::MetricsOnly => "metrics_only",
        }
    }

    /// Whether the state was set by hand (disabled, forced open, metrics only).
    #[must_use]
    pub fn is_manual(self) -> bool {
        matches!(
            self,
            CircuitState::Disabled | CircuitState::ForcedOpen | CircuitState::MetricsOnly
        )
    }

    /// The value of the `toolwarden.circuit.state` gauge by what calls
    /// meet: 0 when they pass (closed, disabled, metrics only), 1 when
    /// probes pass (half-open), 2 when they are refused (open, forced open).
    #[must_use]
    pub fn gauge_value(self) -> f64 {
        match self {
            CircuitState::Closed | CircuitState::Disabled | CircuitState::MetricsOnly => 0.0,
            CircuitState::HalfOpen => 1.0,
            CircuitState::Open | CircuitState::ForcedOpen => 2.0,
        }
    }
}

impl fmt::Display for CircuitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which circuits are open. Implemented by the circuit-breaker registry.
pub trait CircuitView: Send + Sync + 'static {
    /// Whether the circuit of `key` (a tool name with the default key
    /// function) currently refuses calls.
    ///
    /// Other layers ask this under their own locks (the loop guard, under
    /// a session's lock, when a refusal of an identical call is in force):
    /// an implementation reads, and never blocks, emits events or calls
    /// back into the stack.
    fn is_open(&self, key: &str) -> bool;

    /// Whether the circuit a call of `tool` in `session` goes to currently
    /// refuses calls: the key the view's key function makes of them (the
    /// tool, the server, the session and the tool). By default
    /// [`is_open`](Self::is_open) of the tool, which is that key only when
    /// keys are tool names.
    fn is_open_for(&self, tool: &str, session: Option<&str>) -> bool {
        let _ = session;
        self.is_open(tool)
    }

    /// Whether the circuit `request` goes to currently refuses calls (its
    /// key under the view's key function, a custom one included). By
    /// default [`is_open_for`](Self::is_open_for) of its tool and session;
    /// false for a request that is not a tool call.
    fn refuses(&self, request: &dyn McpRequest) -> bool {
        request
            .tool_name()
            .is_some_and(|tool| self.is_open_for(tool, request.session_key()))
    }

    /// Whether the view keeps a circuit per session (so that
    /// [`is_open_for`](Self::is_open_for) needs the session). Default false.
    fn keys_by_session(&self) -> bool {
        false
    }

    /// Every key whose circuit currently refuses calls.
    fn open_keys(&self) -> Vec<String>;
}

/// A shared, optional [`CircuitView`].
#[derive(Clone, Default)]
pub struct Circuits(Option<Arc<dyn CircuitView>>);

impl Circuits {
    /// No view: every circuit reads as closed.
    #[must_use]
    pub fn none() -> Self {
        Circuits(None)
    }

    /// A view.
    pub fn new(view: Arc<dyn CircuitView>) -> Self {
        Circuits(Some(view))
    }

    /// Whether `key` is open (false without a view).
    #[must_use]
    pub fn is_open(&self, key: &str) -> bool {
        self.0.as_ref().is_some_and(|v| v.is_open(key))
    }

    /// Whether the circuit a call of `tool` in `session` goes to is open
    /// (false without a view): see [`CircuitView::is_open_for`].
    #[must_use]
    pub fn is_open_for(&self, tool: &str, session: Option<&str>) -> bool {
        self.0
            .as_ref()
            .is_some_and(|v| v.is_open_for(tool, session))
    }

    /// Whether the circuit `request` goes to refuses calls (false without
    /// a view): see [`CircuitView::refuses`].
    #[must_use]
    pub fn refuses(&self, request: &dyn McpRequest) -> bool {
        self.0.as_ref().is_some_and(|v| v.refuses(request))
    }

    /// Whether the view keeps a circuit per session (false without a
    /// view): see [`CircuitView::keys_by_session`].
    #[must_use]
    pub fn keys_by_session(&self) -> bool {
        self.0.as_ref().is_some_and(|v| v.keys_by_session())
    }

    /// Every open key (empty without a view).
    #[must_use]
    pub fn open_keys(&self) -> Vec<String> {
        self.0.as_ref().map(|v| v.open_keys()).unwrap_or_default()
    }
}

impl fmt::Debug for Circuits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Circuits").field(&self.0.is_some()).finish()
    }
}
