//! [`Member`]: one upstream of a gateway, its breaker and its names.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};
use toolwarden::circuit_breaker::CircuitRegistry;
use toolwarden_core::{CircuitState, ToolCatalog};

use super::{MemberService, ToolNames};
use crate::downstream::Downstreams;
use crate::upstream::{Upstream, UpstreamStatus};

/// One upstream of the gateway.
pub struct Member {
    pub(super) name: Arc<str>,
    pub(super) upstream: Upstream,
    pub(super) names: ToolNames,
    /// The server's tools, by its own names (filled on connect and by
    /// every `tools/list`).
    pub(super) catalog: ToolCatalog,
    pub(super) breaker: CircuitRegistry,
    pub(super) service: MemberService,
    /// Availability as the clients were last told it (the watcher's view).
    pub(super) announced: AtomicBool,
    /// The clients, with the requests in flight to this upstream.
    pub(super) downstreams: Downstreams,
}

impl fmt::Debug for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Member")
            .field("name", &self.name)
            .field("upstream", &self.upstream)
            .finish_non_exhaustive()
    }
}

impl Member {
    /// Its name (`[upstreams.NAME]`).
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its connection.
    #[must_use]
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// The clients as this upstream's requests see them: the calls
    /// forwarded to it are recorded here, so what it asks goes to the
    /// client whose call it is handling (its request ids are its own).
    #[must_use]
    pub fn downstreams(&self) -> &Downstreams {
        &self.downstreams
    }

    /// Its breaker around its connection.
    #[must_use]
    pub fn service(&self) -> &MemberService {
        &self.service
    }

    /// Its names.
    #[must_use]
    pub fn names(&self) -> &ToolNames {
        &self.names
    }

    /// The state of its breaker.
    #[must_use]
    pub fn circuit(&self) -> CircuitState {
        self.breaker
            .state(&self.name)
            .unwrap_or(CircuitState::Closed)
    }

    /// Whether a call to it would be let through now: connected, and its
    /// breaker not open (an open one past its wait lets a probe through).
    #[must_use]
    pub fn is_available(&self) -> bool {
        if !matches!(self.upstream.status(), UpstreamStatus::Up { .. }) {
            return false;
        }
        match self.breaker.circuit(&self.name) {
            None => true,
            Some(circuit) => match circuit.state {
                CircuitState::ForcedOpen => false,
                CircuitState::Open => circuit.retry_after_seconds.is_none_or(|s| s <= 0.0),
                _ => true,
            },
        }
    }

    /// Its part of `/health`.
    pub(super) fn health_json(&self) -> Value {
        let mut report = self.upstream.health_json();
        report["circuit"] = json!(self.circuit().as_str());
        report["available"] = json!(self.is_available());
        report["announced"] = json!(self.announced.load(Ordering::Relaxed));
        report
    }
}
