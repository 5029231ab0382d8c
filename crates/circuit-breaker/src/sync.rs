//! [`StateSync`]: the seam through which replicas share circuit state, the
//! transitions that cross it, and the fleet-wide probe permit.

use std::sync::Arc;
use std::time::Duration;

use toolwarden_core::Key;

use toolwarden_core::CircuitState;

/// Receives the transitions that happened on this replica: the seam
/// through which replicas share circuit state (used by the Redis crate;
/// nothing here talks to a network).
///
/// Two directions, both small:
///
/// - **Out**: a [`StateSync`] given to the builder
///   ([`CircuitBreakerBuilder::sync`](crate::CircuitBreakerBuilder::sync))
///   hears every transition that happened **here** ([`LocalTransition`]):
///   opened (with its open period), half-open, closed, and manual changes.
///   Transitions applied from another replica are not reported to it, so a
///   sync never echoes what it received. (The core's event hook, by contrast,
///   reports every transition, local or remote, for observability.)
/// - **In**: [`CircuitRegistry::apply_remote`](crate::CircuitRegistry::apply_remote)
///   applies a [`RemoteTransition`] to one key: a remote *open* makes the
///   local circuit refuse calls until its deadline (keeping the later one if
///   it is already open); a remote *close* closes it with fresh windows.
///   Manual states (disabled, forced open, metrics only) are local decisions
///   and are never overridden.
///
/// # How the Redis crate uses it
///
/// 1. It implements [`StateSync::publish`] by queueing the transition on a
///    bounded channel (it is called on the call path, under no lock, and must
///    not block); a background task writes the key's state to Redis (`open`
///    with an absolute deadline, so late readers compute the remaining time)
///    and publishes it on a pub/sub channel with the replica id as origin.
/// 2. Its subscriber task turns each message from *another* origin into a
///    [`RemoteTransition`], converting the absolute deadline into a
///    `retry_after` from now, and calls `apply_remote(key, &transition)`;
///    on start (and on reconnect) it reads the persisted states and applies
///    them the same way.
/// 3. Whether one replica's open is enough (or a quorum is needed, so one
///    bad node cannot poison the rest) is the Redis crate's policy, decided
///    before it calls `apply_remote`; the origin is kept in the snapshot.
///
/// # One probe across the fleet
///
/// Half-open itself is not shared (the Redis crate does not broadcast it,
/// and each replica keeps its own open period), but the probe can be:
/// before a circuit admits a probe (when its open period is over and it
/// would leave *open* for *half-open*, and for each further probe while
/// half-open), it asks its sync for a permit ([`StateSync::probe_permit`]),
/// synchronously and under the breaker's per-key lock, so that one replica
/// probes a recovering server at a time instead of every replica at once:
///
/// - [`ProbePermit::Granted`]: the probe passes, as without a sync. The
///   default implementation always grants, so a sync that does not
///   implement it keeps the old behaviour: each replica probes on its own.
/// - [`ProbePermit::Denied`]: the call is refused as if the circuit were
///   open, with [`CircuitOpen`](toolwarden_core::CircuitOpen) carrying the
///   denial's `retry_after` (at least 1 ms). The refusal is counted as *not
///   permitted*, never as a failure: it changes no window, streak or open
///   period. A circuit still open stays open, its deadline moved to the end
///   of that `retry_after`, so the calls until then are refused without a
///   lock and without asking again; a half-open one stays half-open.
///
/// The permit's holder learns how its probe ended through
/// [`StateSync::publish`]: *closed* (the probe succeeded: the close is
/// announced, the other replicas follow it, and the holder may release the
/// permit at once) or *open* (the probe failed or outlived `probe_timeout`:
/// the re-open is announced with its next open period; the permit is best
/// kept until it expires, so that no other replica probes before it hears
/// of the re-open). A holder that dies releases nothing, so a permit must
/// expire by itself (the Redis crate's lasts at least the
/// [`ProbeRequest::probe_timeout`]); then another replica may probe.
/// The shared breaker of the keys past the bound (`(overflow)`) never asks:
/// it covers different keys on each replica.
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use std::time::Duration;
/// use toolwarden_circuit_breaker::{
///     CircuitBreakerLayer, CircuitState, LocalTransition, RemoteTransition, StateSync,
/// };
///
/// #[derive(Default)]
/// struct Outbox(Mutex<Vec<(String, CircuitState)>>);
/// impl StateSync for Outbox {
///     fn publish(&self, t: &LocalTransition<'_>) {
///         self.0.lock().unwrap().push((t.name.to_owned(), t.state));
///     }
/// }
///
/// let outbox = Arc::new(Outbox::default());
/// let layer = CircuitBreakerLayer::builder().sync(outbox.clone()).build().unwrap();
/// let registry = layer.registry();
///
/// // Another replica opened `search`: here it refuses calls too ...
/// # let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
/// # rt.block_on(async {
/// registry.apply_remote("search", &RemoteTransition::open(Duration::from_secs(20), "replica-2"));
/// assert_eq!(registry.state("search"), Some(CircuitState::Open));
/// // ... without echoing it back out.
/// assert!(outbox.0.lock().unwrap().is_empty());
/// registry.apply_remote("search", &RemoteTransition::closed("replica-2"));
/// assert_eq!(registry.state("search"), Some(CircuitState::Closed));
/// # });
/// ```
pub trait StateSync: Send + Sync + 'static {
    /// Called synchronously after each local transition, outside the
    /// breaker's lock: queue it, never block.
    fn publish(&self, transition: &LocalTransition<'_>);

    /// Whether this replica may probe `request.name` now (see
    /// [One probe across the fleet](#one-probe-across-the-fleet)). Called
    /// on the call path, under the breaker's per-key lock, only when a
    /// probe is about to be admitted (never while the circuit is closed):
    /// answer from memory, never block, never call back into the registry.
    /// Default: always [`ProbePermit::Granted`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use serde_json::json;
    /// use tower::{Layer, ServiceExt};
    /// use toolwarden_core::{jsonrpc::Request, testing::MockMcp, CircuitOpen, Rejection};
    /// use toolwarden_circuit_breaker::{
    ///     CircuitBreakerLayer, CircuitState, LocalTransition, ProbePermit, ProbeRequest,
    ///     RemoteTransition, StateSync,
    /// };
    ///
    /// /// Another replica holds every permit.
    /// struct ElsewhereProbing;
    /// impl StateSync for ElsewhereProbing {
    ///     fn publish(&self, _: &LocalTransition<'_>) {}
    ///     fn probe_permit(&self, _: &ProbeRequest<'_>) -> ProbePermit {
    ///         ProbePermit::Denied { retry_after: Duration::from_secs(2) }
    ///     }
    /// }
    ///
    /// let layer = CircuitBreakerLayer::builder().sync(Arc::new(ElsewhereProbing)).build().unwrap();
    /// let registry = layer.registry();
    /// registry.apply_remote("search", &RemoteTransition::open(Duration::from_secs(10), "replica-2"));
    /// tokio::time::advance(Duration::from_secs(10)).await; // the open period is over ...
    ///
    /// let mock = MockMcp::new();
    /// let err = layer.layer(mock.clone()).oneshot(Request::tool_call(1, "search", json!({}))).await.unwrap_err();
    /// let open = err.downcast_ref::<CircuitOpen>().unwrap(); // ... but the permit is elsewhere
    /// assert_eq!(open.retry_after(), Some(Duration::from_secs(2)));
    /// assert_eq!(mock.calls("search"), 0);
    /// assert_eq!(registry.state("search"), Some(CircuitState::Open));
    /// assert_eq!(registry.circuit("search").unwrap().totals.failed, 0); // not a failure
    /// # }
    /// ```
    fn probe_permit(&self, request: &ProbeRequest<'_>) -> ProbePermit {
        let _ = request;
        ProbePermit::Granted
    }
}

/// A breaker about to admit a probe asks for a permit (see
/// [`StateSync::probe_permit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProbeRequest<'a> {
    /// The breaker key.
    pub key: &'a Key,
    /// The key as text (its `Display`), as
    /// [`CircuitRegistry::apply_remote`](crate::CircuitRegistry::apply_remote) takes it.
    pub name: &'a str,
    /// The key's `probe_timeout`: a probe with no outcome after this long
    /// counts as failed. A permit should last at least this long, or
    /// another replica could probe while this one's probe hangs.
    pub probe_timeout: Duration,
}

impl<'a> ProbeRequest<'a> {
    /// A request for `key` (named `name`), whose probes time out after
    /// `probe_timeout`: what a breaker passes, for a provider's own tests.
    #[must_use]
    pub fn new(key: &'a Key, name: &'a str, probe_timeout: Duration) -> Self {
        ProbeRequest {
            key,
            name,
            probe_timeout,
        }
    }
}

/// The answer to a [`ProbeRequest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbePermit {
    /// This replica may probe now.
    Granted,
    /// Not now (another replica is probing, or the permit is still being
    /// asked for): the call is refused as open, not counted as a failure.
    Denied {
        /// When to ask again; the refusal carries it (at least 1 ms).
        retry_after: Duration,
    },
}

/// A transition that happened on this replica.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalTransition<'a> {
    /// The breaker key.
    pub key: &'a Key,
    /// The key as text (its `Display`), as [`CircuitRegistry::apply_remote`](crate::CircuitRegistry::apply_remote) takes it.
    pub name: &'a str,
    /// The state entered.
    pub state: CircuitState,
    /// For an open (or forced-open) state: how long until a probe.
    pub retry_after: Option<Duration>,
}

/// The state another replica reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RemoteState {
    /// Open; a probe may pass after `retry_after` (from when it is applied).
    Open {
        /// Time left in the remote open period.
        retry_after: Duration,
    },
    /// Closed.
    Closed,
}

/// A transition received from another replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteTransition {
    /// What the other replica's circuit did.
    pub state: RemoteState,
    /// Which replica it was (shown in snapshots).
    pub origin: Arc<str>,
}

impl RemoteTransition {
    /// Another replica opened the circuit, which allows a probe after `retry_after`.
    pub fn open(retry_after: Duration, origin: impl Into<Arc<str>>) -> Self {
        RemoteTransition {
            state: RemoteState::Open { retry_after },
            origin: origin.into(),
        }
    }

    /// Another replica closed the circuit.
    pub fn closed(origin: impl Into<Arc<str>>) -> Self {
        RemoteTransition {
            state: RemoteState::Closed,
            origin: origin.into(),
        }
    }
}
