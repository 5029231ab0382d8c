//! [`StateSync`]: the seam through which replicas share circuit state, and
//! the transitions that cross it.

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
/// Half-open is not shared: after a remote open period each replica probes
/// on its own, and the first to close announces it.
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
