//! Which upstream connection serves a downstream session:
//! `upstream.session_mode` ([`SessionMode`](crate::config::SessionMode)).
//!
//! - [`Cores::Shared`]: every session's [`ProxyServer`](super::ProxyServer)
//!   gets the one [`ProxyCore`] (one upstream, one stack).
//! - [`Cores::PerSession`]: each session gets a core of its own from
//!   [`SessionUpstreams::open`], over an upstream of its own (started by the
//!   session's `initialize`, like the shared one), with the one tool stack
//!   layer put around it ([`ToolStackLayer::stack`]): the layers' state is
//!   shared by every session, as the server is. When the session ends rmcp
//!   drops its server, the last handle on the core goes, and the core's
//!   `Lease` shuts the upstream down (a child gets its stdin closed, then
//!   SIGTERM, then SIGKILL) in the background.
//!
//! rmcp asks for a server more often than for sessions (one for each
//! request it serves without a session, one to look up a tool's schema):
//! a core is cheap until its upstream is started, and one whose upstream
//! never started is dropped with nothing to close. Requests without a
//! session are refused in this mode (see `touch_and_start` in
//! [`super::server`]): they have no connection of their own to go to.
//!
//! `/health` reports either through [`Upstreams`].

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use serde_json::{json, Value};
use toolwarden_core::ToolCatalog;

use super::{Downstreams, ProxyCore};
use crate::config::UpstreamConfig;
use crate::redact::Redactor;
use crate::stack::ToolStackLayer;
use crate::upstream::{Upstream, UpstreamStatus, UpstreamTarget};

/// How long a session's upstream is given to close once its session ended.
const SESSION_SHUTDOWN: Duration = Duration::from_secs(15);

/// Where each downstream session's [`ProxyCore`] comes from.
#[derive(Debug, Clone)]
pub enum Cores {
    /// One core for every session.
    Shared(Arc<ProxyCore>),
    /// A core of its own for each session.
    PerSession(Arc<SessionUpstreams>),
}

impl Cores {
    /// The core for a new session.
    #[must_use]
    pub fn session_core(&self) -> Arc<ProxyCore> {
        match self {
            Cores::Shared(core) => Arc::clone(core),
            Cores::PerSession(sessions) => sessions.open(),
        }
    }
}

impl From<Arc<ProxyCore>> for Cores {
    fn from(core: Arc<ProxyCore>) -> Self {
        Cores::Shared(core)
    }
}

/// The upstream connections of `upstream.session_mode = "per_session"`: a
/// new one for each session ([`open`](Self::open)), each closed when its
/// session ends, all closed by [`shutdown`](Self::shutdown).
pub struct SessionUpstreams {
    target: UpstreamTarget,
    config: UpstreamConfig,
    catalog: ToolCatalog,
    redactor: Arc<Redactor>,
    request_timeout: Duration,
    /// `limits.client_stall_timeout`.
    stall: Duration,
    /// Session numbers, shared by every core: the loop guard keeps each
    /// session's history under `session-<n>`, which must stay unique.
    numbers: Arc<AtomicU64>,
    /// The layers put around each new session's upstream, and the
    /// sessions alive, under one lock so that a reload
    /// ([`restack`](Self::restack)) reaches every session, those opened
    /// meanwhile included.
    live: Mutex<Live>,
    next_lease: AtomicU64,
    /// Set by [`shutdown`](Self::shutdown): cores opened after it never start.
    closed: std::sync::atomic::AtomicBool,
}

/// See [`SessionUpstreams::live`].
struct Live {
    layer: ToolStackLayer,
    /// The upstream and the core of each session alive, by lease.
    sessions: HashMap<u64, (Upstream, Weak<ProxyCore>)>,
}

impl fmt::Debug for SessionUpstreams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionUpstreams")
            .field("target", &self.target)
            .field("live", &self.live_upstreams().len())
            .finish_non_exhaustive()
    }
}

impl SessionUpstreams {
    /// Upstreams at `target`, each with `config`, their tools listed into
    /// `catalog`, their texts scrubbed by `redactor`, wrapped in `layer`;
    /// requests other than `tools/call` bounded by `limits.request_timeout`,
    /// clients not reading dropped after `limits.client_stall_timeout`.
    #[must_use]
    pub fn new(
        target: UpstreamTarget,
        config: UpstreamConfig,
        catalog: ToolCatalog,
        redactor: Arc<Redactor>,
        layer: ToolStackLayer,
        limits: &crate::config::LimitsConfig,
    ) -> Arc<Self> {
        Arc::new(SessionUpstreams {
            target,
            config,
            catalog,
            redactor,
            request_timeout: limits.request_timeout,
            stall: limits.client_stall_timeout,
            numbers: Arc::default(),
            live: Mutex::new(Live {
                layer,
                sessions: HashMap::new(),
            }),
            next_lease: AtomicU64::new(0),
            closed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// A core over a new upstream, not started (the session's `initialize`
    /// starts it). Its upstream is shut down when the core is dropped.
    pub fn open(self: &Arc<Self>) -> Arc<ProxyCore> {
        let downstreams = Downstreams::with_stall_timeout(self.stall);
        let upstream = Upstream::with_redactor(
            self.target.clone(),
            self.config.clone(),
            self.catalog.clone(),
            downstreams.clone(),
            Arc::clone(&self.redactor),
        );
        let lease = self.next_lease.fetch_add(1, Ordering::Relaxed);
        let mut live = lock(&self.live);
        if self.closed.load(Ordering::Acquire) {
            // Shutting down: a core that can never connect.
            upstream.close();
        }
        let stack = live.layer.stack(upstream.service());
        let core = ProxyCore::for_session(
            upstream.clone(),
            stack,
            downstreams,
            self.request_timeout,
            Arc::clone(&self.numbers),
            Some(Lease {
                sessions: Arc::downgrade(self),
                id: lease,
                upstream: upstream.clone(),
            }),
        );
        live.sessions
            .insert(lease, (upstream, Arc::downgrade(&core)));
        core
    }

    /// Puts `layer` around every session's upstream, for their calls from
    /// now on and for the sessions opened later (a configuration reload).
    /// Returns how many sessions were restacked.
    pub(crate) fn restack(&self, layer: &ToolStackLayer) -> usize {
        let cores: Vec<Arc<ProxyCore>> = {
            let mut live = lock(&self.live);
            live.layer = layer.clone();
            live.sessions
                .values()
                .filter_map(|(_, core)| core.upgrade())
                .collect()
        };
        // Outside the lock: dropping the last handle on a core takes it
        // (its lease forgets the session).
        for core in &cores {
            core.restack(layer);
        }
        cores.len()
    }

    /// The upstreams of the sessions open now (started or not).
    fn live_upstreams(&self) -> Vec<Upstream> {
        lock(&self.live)
            .sessions
            .values()
            .map(|(upstream, _)| upstream.clone())
            .collect()
    }

    /// The upstreams started (by a session's `initialize`) and not closed.
    pub fn started(&self) -> Vec<Upstream> {
        self.live_upstreams()
            .into_iter()
            .filter(Upstream::is_started)
            .collect()
    }

    /// Whether `/health` should say unhealthy: sessions have upstreams and
    /// not one of them is up (a single session's server failing is that
    /// session's error, not the proxy's).
    pub fn failing(&self) -> bool {
        let started = self.started();
        !started.is_empty()
            && !started
                .iter()
                .any(|u| matches!(u.status(), UpstreamStatus::Up { .. }))
    }

    /// The upstream part of `/health`: the mode, the target, how many
    /// sessions have an upstream and in which state, their restarts, the
    /// catalog's size, the children's pids.
    pub fn health_json(&self) -> Value {
        let started = self.started();
        let mut states = serde_json::Map::new();
        for upstream in &started {
            let name = upstream.status().name();
            let count = states.get(name).and_then(Value::as_u64).unwrap_or(0);
            states.insert(name.to_owned(), json!(count + 1));
        }
        // At most `http.max_sessions` of them.
        let pids: Vec<u32> = started
            .iter()
            .filter_map(|u| match u.status() {
                UpstreamStatus::Up { pid, .. } => pid,
                _ => None,
            })
            .collect();
        json!({
            "mode": "per_session",
            "state": if started.is_empty() { "idle" } else if self.failing() { "down" } else { "up" },
            "target": self.target.to_string(),
            "sessions": started.len(),
            "states": states,
            "restarts": started.iter().map(Upstream::restarts).sum::<u64>(),
            "tools": self.catalog.len(),
            "pids": pids,
        })
    }

    /// Shuts every session's upstream down, at most `limit` in all; the
    /// cores opened from now on never connect.
    pub async fn shutdown(&self, limit: Duration) {
        self.closed.store(true, Ordering::Release);
        let upstreams = self.live_upstreams();
        futures::future::join_all(upstreams.iter().map(|u| u.shutdown(limit))).await;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A session's hold on its upstream, kept by its [`ProxyCore`]: dropped
/// with the core, it closes the upstream and forgets it.
pub(crate) struct Lease {
    sessions: Weak<SessionUpstreams>,
    id: u64,
    upstream: Upstream,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease").field("id", &self.id).finish()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(sessions) = self.sessions.upgrade() {
            lock(&sessions.live).sessions.remove(&self.id);
        }
        if !self.upstream.is_started() {
            return;
        }
        let upstream = self.upstream.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    upstream.shutdown(SESSION_SHUTDOWN).await;
                    tracing::debug!("closed a session's upstream");
                });
            }
            // No runtime left (the process is ending): stop the supervisor;
            // a child is killed as its handle is dropped.
            Err(_) => upstream.close(),
        }
    }
}

/// The upstream(s) `/health` reports on.
#[derive(Debug, Clone)]
pub enum Upstreams {
    /// The one upstream of every session.
    Shared(Upstream),
    /// Each session's own.
    PerSession(Arc<SessionUpstreams>),
    /// A gateway's, each reported by name.
    Gateway(Arc<crate::gateway::Gateway>),
}

impl From<Upstream> for Upstreams {
    fn from(upstream: Upstream) -> Self {
        Upstreams::Shared(upstream)
    }
}

impl Upstreams {
    /// Whether the upstream is failing (connecting, down or stopped; per
    /// session: no session's upstream is up). Not started is not failing.
    #[must_use]
    pub fn failing(&self) -> bool {
        match self {
            Upstreams::Shared(upstream) => matches!(
                upstream.status(),
                UpstreamStatus::Connecting { .. }
                    | UpstreamStatus::Down { .. }
                    | UpstreamStatus::Stopped
            ),
            Upstreams::PerSession(sessions) => sessions.failing(),
            Upstreams::Gateway(gateway) => gateway.failing(),
        }
    }

    /// The `"upstream"` part of `/health`.
    #[must_use]
    pub fn health_json(&self) -> Value {
        match self {
            Upstreams::Shared(upstream) => {
                let mut report = upstream.health_json();
                report["mode"] = json!("shared");
                report
            }
            Upstreams::PerSession(sessions) => sessions.health_json(),
            Upstreams::Gateway(gateway) => gateway.health_json(),
        }
    }
}
