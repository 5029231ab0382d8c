//! [`CircuitRegistry`]: every breaker of one layer, by key, with snapshots
//! and manual control.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::time::Instant;
use toolwarden_core::key::split_session_tool;
use toolwarden_core::{
    CircuitView, Circuits, ConfigError, Entry, Events, Key, KeyBy, KeyRef, KeyedState, McpRequest,
};

use toolwarden_core::CircuitState;

use crate::breaker::{Breaker, CircuitSnapshot};
use crate::config::Config;
use crate::sync::{RemoteTransition, StateSync};

/// What every breaker of a registry shares (each breaker holds an `Arc` of
/// it, taken when the breaker is created, never per call).
pub(crate) struct Shared {
    /// The registry-wide settings (`name`, `key_by`, `bounds`), fixed for
    /// the registry's life.
    pub(crate) config: Arc<Config>,
    /// The policies breakers follow, replaced by
    /// [`CircuitRegistry::reconfigure`].
    policies: ArcSwap<Policies>,
    /// Bumped after each replacement of `policies`: a breaker that follows
    /// an older one takes its new policy (see `Breaker::follow_policies`).
    pub(crate) generation: AtomicU64,
    pub(crate) events: Events,
    pub(crate) sync: Option<Arc<dyn StateSync>>,
    /// The origin of the breakers' clocks (open deadlines, time buckets).
    pub(crate) epoch: Instant,
    /// Manual states set by key, so that they outlive idle eviction.
    /// Bounded by `bounds.max_keys`.
    overrides: Mutex<HashMap<Key, CircuitState>>,
}

/// The policy of every breaker whose tool has no override, and the
/// policies of the tools with one (see
/// [`CircuitBreakerBuilder::tool`](crate::CircuitBreakerBuilder::tool)).
struct Policies {
    default: Arc<Config>,
    tools: HashMap<Box<str>, Arc<Config>>,
}

impl Shared {
    /// The policy of the breaker of `key`: its tool's override, else the
    /// registry's. Keys that name no tool (and the overflow breaker) get
    /// the registry's.
    pub(crate) fn policy_for(&self, key: &Key) -> Arc<Config> {
        let tool = match key {
            Key::Tool(tool) | Key::SessionTool(_, tool) => Some(&**tool),
            Key::Server | Key::Custom(_) | Key::Overflow => None,
        };
        let policies = self.policies.load();
        let policy = tool
            .and_then(|tool| policies.tools.get(tool))
            .unwrap_or(&policies.default);
        Arc::clone(policy)
    }
}

struct Inner {
    breakers: KeyedState<Breaker>,
    shared: Arc<Shared>,
}

/// The breakers of one [`CircuitBreakerLayer`](crate::CircuitBreakerLayer),
/// one per key, in the core's bounded [`KeyedState`]. Cloning shares it.
///
/// Keys are named as their `Display` writes them: the tool name with the
/// default [`KeyBy::Tool`]; `*` with [`KeyBy::Server`]; `session/tool` with
/// [`KeyBy::SessionTool`] (a `/` or `%` in the session written `%2F`,
/// `%25`: `user%2F42/search` is session `user/42`'s `search`); the custom
/// string with [`KeyBy::Custom`]; `(overflow)` for the shared breaker past
/// the key bound. A name without `/` under [`KeyBy::SessionTool`] is the
/// tool of the session `-` (calls without a session).
///
/// ```
/// use toolwarden_circuit_breaker::{CircuitBreakerLayer, CircuitState};
/// let layer = CircuitBreakerLayer::builder().build().unwrap();
/// let registry = layer.registry();
/// # let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
/// # rt.block_on(async {
/// registry.force_open("delete_repo");
/// assert_eq!(registry.state("delete_repo"), Some(CircuitState::ForcedOpen));
/// let snapshot = registry.snapshot();
/// let json = serde_json::to_value(&snapshot).unwrap();
/// assert_eq!(json["circuits"][0]["state"], "forced_open");
/// registry.force_close("delete_repo");
/// assert_eq!(registry.state("delete_repo"), Some(CircuitState::Closed));
/// # });
/// ```
#[derive(Clone)]
pub struct CircuitRegistry {
    inner: Arc<Inner>,
}

impl fmt::Debug for CircuitRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitRegistry")
            .field("name", &self.inner.shared.config.name)
            .field("breakers", &self.inner.breakers)
            .field("config", &self.inner.shared.policies.load().default)
            .field("tool_policies", &self.inner.shared.policies.load().tools)
            .finish()
    }
}

/// Every circuit of a registry. Serialises with serde.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RegistrySnapshot {
    /// The registry's name.
    pub name: String,
    /// Keys held (the overflow breaker not counted).
    pub keys: usize,
    /// The bound on keys.
    pub max_keys: usize,
    /// Every circuit, sorted by key.
    pub circuits: Vec<CircuitSnapshot>,
    /// The shared breaker of the keys past the bound, once it has been used.
    pub overflow: Option<CircuitSnapshot>,
}

impl RegistrySnapshot {
    /// The circuit of `key`, if present.
    #[must_use]
    pub fn circuit(&self, key: &str) -> Option<&CircuitSnapshot> {
        self.circuits.iter().find(|c| c.key == key)
    }
}

impl CircuitRegistry {
    pub(crate) fn new(
        config: Config,
        tool_policies: HashMap<Box<str>, Arc<Config>>,
        events: Events,
        sync: Option<Arc<dyn StateSync>>,
    ) -> Self {
        let bounds = config.bounds;
        let config = Arc::new(config);
        let shared = Arc::new(Shared {
            policies: ArcSwap::from_pointee(Policies {
                default: Arc::clone(&config),
                tools: tool_policies,
            }),
            config,
            generation: AtomicU64::new(0),
            events,
            sync,
            epoch: Instant::now(),
            overrides: Mutex::new(HashMap::new()),
        });
        let make_shared = Arc::clone(&shared);
        let breakers = KeyedState::new(bounds, move |key: &Key| {
            let initial = make_shared
                .overrides
                .lock()
                .get(key)
                .copied()
                .unwrap_or(CircuitState::Closed);
            // The generation before the policy: a reconfiguration between
            // the two is caught by the breaker's next call.
            let generation = make_shared.generation.load(Ordering::Acquire);
            let policy = make_shared.policy_for(key);
            Breaker::new(
                key.clone(),
                Arc::clone(&make_shared),
                policy,
                generation,
                initial,
            )
        });
        CircuitRegistry {
            inner: Arc::new(Inner { breakers, shared }),
        }
    }

    /// The policy of every key without an override.
    #[cfg(test)]
    pub(crate) fn default_policy(&self) -> Arc<Config> {
        Arc::clone(&self.inner.shared.policies.load().default)
    }

    /// The policy of `tool`'s override, if it has one.
    #[cfg(test)]
    pub(crate) fn tool_policy(&self, tool: &str) -> Option<Arc<Config>> {
        self.inner.shared.policies.load().tools.get(tool).cloned()
    }

    /// Takes the trip, reset and half-open policies of `from` (the
    /// registry's and each tool's override), keeping every breaker's state:
    /// the hot reload of a breaker. Build `from` with the new settings
    /// ([`CircuitBreakerLayer::builder`](crate::CircuitBreakerLayer::builder),
    /// which validates them); only its policies are read.
    ///
    /// What each breaker keeps: its state (an open circuit stays open until
    /// the end of the open period it started, a forced or disabled one
    /// stays so), its windows and their counts (a count window of another
    /// size keeps its most recent calls; a time window of another duration
    /// or bucket count starts empty), its consecutive failures, totals and
    /// recent errors. The new thresholds decide from the next recorded
    /// outcome; the next open period, probe admission and probe timeout
    /// follow the new policy. A call in flight records its outcome into
    /// the same breaker.
    ///
    /// The registry-wide settings shape the registry itself and are not
    /// changed: a `from` whose `name`, `key_by` or `bounds` differ from this
    /// registry's is refused, naming the field, and nothing is changed.
    /// The events and the [`StateSync`] stay this registry's.
    ///
    /// Cost: each call checks one generation counter (two relaxed atomic
    /// loads) so that a breaker created while the registry was being
    /// reconfigured still takes the new policy.
    ///
    /// ```
    /// use std::time::Duration;
    /// use toolwarden_circuit_breaker::{CircuitBreakerLayer, CircuitState};
    /// # let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    /// # rt.block_on(async {
    /// let running = CircuitBreakerLayer::builder().failure_threshold(5).build().unwrap();
    /// running.registry().force_open("search");
    ///
    /// let next = CircuitBreakerLayer::builder()
    ///     .failure_threshold(2)
    ///     .reset_timeout(Duration::from_secs(5))
    ///     .build()
    ///     .unwrap();
    /// running.registry().reconfigure(next.registry()).unwrap();
    /// assert_eq!(running.registry().state("search"), Some(CircuitState::ForcedOpen));
    ///
    /// let resized = CircuitBreakerLayer::builder()
    ///     .bounds(toolwarden_core::Bounds { max_keys: 10, ..Default::default() })
    ///     .build()
    ///     .unwrap();
    /// let err = running.registry().reconfigure(resized.registry()).unwrap_err();
    /// assert_eq!(err.field(), "bounds");
    /// # });
    /// ```
    pub fn reconfigure(&self, from: &CircuitRegistry) -> Result<(), ConfigError> {
        let ours = &*self.inner.shared.config;
        let theirs = &*from.inner.shared.config;
        if ours.name != theirs.name {
            return Err(ConfigError::new(
                "name",
                "the registry's name cannot change on a reconfiguration",
            ));
        }
        if !same_key_by(&ours.key_by, &theirs.key_by) {
            return Err(ConfigError::new(
                "key_by",
                "the key function cannot change on a reconfiguration (the breakers are kept by key)",
            ));
        }
        if ours.bounds != theirs.bounds {
            return Err(ConfigError::new(
                "bounds",
                "the bounds cannot change on a reconfiguration (they size the registry)",
            ));
        }
        if Arc::ptr_eq(&self.inner, &from.inner) {
            return Ok(());
        }
        let next = from.inner.shared.policies.load_full();
        let shared = &self.inner.shared;
        shared.policies.store(Arc::new(Policies {
            default: Arc::clone(&next.default),
            tools: next.tools.clone(),
        }));
        shared.generation.fetch_add(1, Ordering::AcqRel);
        for entry in self.inner.breakers.entries() {
            entry.adopt_policy();
        }
        self.inner.breakers.overflow().adopt_policy();
        Ok(())
    }

    #[inline]
    pub(crate) fn key_by(&self) -> &KeyBy {
        &self.inner.shared.config.key_by
    }

    /// The breaker of a key, created when new (the overflow breaker past the bound).
    #[inline]
    pub(crate) fn breaker(&self, key: &KeyRef<'_>) -> Entry<Breaker> {
        let entry = match self.inner.breakers.get(key) {
            Some(entry) => entry,
            None => self.inner.breakers.entry(key.clone()),
        };
        entry.follow_policies();
        entry
    }

    /// The registry's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.inner.shared.config.name
    }

    /// The number of keys held (never above the bound).
    #[must_use]
    pub fn len(&self) -> usize {
        self.inner.breakers.len()
    }

    /// Whether no key is held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.inner.breakers.is_empty()
    }

    /// `f` of the key a name stands for, under this registry's key
    /// function (see the type docs: a session's `/` and `%` are escaped in
    /// its keys' names, and read back here).
    fn with_name<T>(&self, name: &str, f: impl FnOnce(&KeyRef<'_>) -> T) -> T {
        if name == "(overflow)" {
            return f(&KeyRef::Overflow);
        }
        match self.key_by() {
            KeyBy::Tool => f(&KeyRef::Tool(name)),
            KeyBy::Server => f(&KeyRef::Server),
            KeyBy::SessionTool => {
                let (session, tool) = split_session_tool(name);
                f(&KeyRef::SessionTool(&session, tool))
            }
            KeyBy::Custom(_) => f(&KeyRef::Custom(name.into())),
        }
    }

    /// Whether the next call to `key` would be refused: see
    /// [`CircuitView::is_open`].
    fn refuses_key(&self, key: &KeyRef<'_>) -> bool {
        let now = Instant::now();
        let breakers = &self.inner.breakers;
        breakers
            .with(key, |b| b.refuses_now_quietly(now))
            .unwrap_or_else(|| {
                // A key not held is served by the overflow breaker once the bound is reached.
                breakers.len() >= breakers.bounds().max_keys
                    && breakers.overflow().refuses_now_quietly(now)
            })
    }

    /// The state of a key's circuit, if the key is held.
    ///
    /// A half-open circuit whose probe has outlived its `probe_timeout` is
    /// reopened first (see [`CircuitBreakerBuilder::probe_timeout`](crate::CircuitBreakerBuilder::probe_timeout)).
    #[must_use]
    pub fn state(&self, name: &str) -> Option<CircuitState> {
        let now = Instant::now();
        self.with_name(name, |key| {
            self.inner.breakers.with(key, |b| b.current_state(now))
        })
    }

    /// A snapshot of one key's circuit, if the key is held.
    #[must_use]
    pub fn circuit(&self, name: &str) -> Option<CircuitSnapshot> {
        let now = Instant::now();
        self.with_name(name, |key| {
            self.inner.breakers.with(key, |b| b.snapshot(now))
        })
    }

    /// A snapshot of every circuit.
    #[must_use]
    pub fn snapshot(&self) -> RegistrySnapshot {
        let now = Instant::now();
        let mut circuits = Vec::with_capacity(self.len());
        self.inner
            .breakers
            .for_each(|_, b| circuits.push(b.snapshot(now)));
        circuits.sort_by(|a, b| a.key.cmp(&b.key));
        let overflow = self.inner.breakers.overflow();
        RegistrySnapshot {
            name: self.name().to_owned(),
            keys: self.len(),
            max_keys: self.inner.breakers.bounds().max_keys,
            circuits,
            overflow: (!overflow.is_pristine()).then(|| overflow.snapshot(now)),
        }
    }

    fn set_override(&self, key: &Key, mode: Option<CircuitState>) {
        let mut overrides = self.inner.shared.overrides.lock();
        match mode {
            Some(mode) => {
                if overrides.len() < self.inner.breakers.bounds().max_keys
                    || overrides.contains_key(key)
                {
                    overrides.insert(key.clone(), mode);
                }
            }
            None => {
                overrides.remove(key);
            }
        }
    }

    /// The breaker `name` stands for, but never the shared overflow breaker
    /// unless it is asked for by name: a change meant for one key must not
    /// reach every key past the bound.
    fn own_breaker(&self, key: &KeyRef<'_>) -> Option<Entry<Breaker>> {
        let entry = self.breaker(key);
        (!entry.is_overflow() || *key == KeyRef::Overflow).then_some(entry)
    }

    fn set_mode(&self, name: &str, mode: CircuitState, fresh: bool) {
        self.with_name(name, |key| {
            let manual = mode.is_manual().then_some(mode);
            // The breaker first, so that a new one starts closed and the change is announced.
            let entry = self.own_breaker(key);
            if *key != KeyRef::Overflow {
                self.set_override(&key.to_key(), manual);
            }
            if let Some(entry) = entry {
                entry.set_mode(mode, fresh);
            }
        });
    }

    /// Forces a key's circuit open: every call is refused until
    /// [`force_close`](Self::force_close) or [`reset`](Self::reset). Kept
    /// even if the key is evicted meanwhile. (Manual states apply to a key's
    /// own breaker: for a key past the bound they wait until it gets one;
    /// name `(overflow)` to set the shared breaker.)
    pub fn force_open(&self, name: &str) {
        self.set_mode(name, CircuitState::ForcedOpen, false);
    }

    /// Closes a key's circuit now, with fresh windows and the base open
    /// period, leaving any manual state.
    pub fn force_close(&self, name: &str) {
        self.set_mode(name, CircuitState::Closed, false);
    }

    /// Disables a key's circuit: every call passes and nothing is recorded.
    pub fn disable(&self, name: &str) {
        self.set_mode(name, CircuitState::Disabled, false);
    }

    /// Puts a key's circuit in metrics-only mode: calls pass, outcomes are
    /// recorded and reported, it never opens.
    pub fn metrics_only(&self, name: &str) {
        self.set_mode(name, CircuitState::MetricsOnly, false);
    }

    /// Resets a key's circuit to a fresh closed breaker (windows, totals and
    /// recent errors forgotten), leaving any manual state.
    pub fn reset(&self, name: &str) {
        self.set_mode(name, CircuitState::Closed, true);
    }

    /// Resets every circuit (the overflow one included) and forgets every
    /// manual state.
    pub fn reset_all(&self) {
        self.inner.shared.overrides.lock().clear();
        for entry in self.inner.breakers.entries() {
            entry.set_mode(CircuitState::Closed, true);
        }
        self.inner
            .breakers
            .overflow()
            .set_mode(CircuitState::Closed, true);
    }

    /// Applies a transition received from another replica to a key's
    /// circuit (see [`StateSync`](crate::StateSync)). Returns whether it changed anything.
    ///
    /// A key past the bound is not applied (it would open the breaker every
    /// such key shares).
    #[allow(clippy::must_use_candidate)] // applies the transition: the result is only informative
    pub fn apply_remote(&self, name: &str, transition: &RemoteTransition) -> bool {
        self.with_name(name, |key| {
            *key != KeyRef::Overflow
                && self
                    .own_breaker(key)
                    .is_some_and(|entry| entry.apply_remote(transition))
        })
    }

    /// This registry as the core's [`Circuits`] view, for the fallback
    /// cache and health reports.
    #[must_use]
    pub fn circuits(&self) -> Circuits {
        Circuits::new(Arc::new(self.clone()))
    }
}

impl CircuitView for CircuitRegistry {
    /// Whether the next call to `key` would be refused (forced open, open
    /// and inside its open period, or half-open with every probe in flight
    /// or one expired). Read without changing the breaker: an expired
    /// probe is timed out (and announced to the events and the state sync)
    /// by the next call or read of the registry, not here, because other
    /// layers ask this under their own locks (the loop guard, when a
    /// refusal of an identical call is in force).
    fn is_open(&self, key: &str) -> bool {
        self.with_name(key, |key| self.refuses_key(key))
    }

    /// The key of `tool` in `session` under the registry's key function; a
    /// custom function is not asked (it needs the request: see
    /// [`refuses`](CircuitView::refuses)), `tool` is read as its key.
    fn is_open_for(&self, tool: &str, session: Option<&str>) -> bool {
        let key = match self.key_by() {
            KeyBy::Tool => KeyRef::Tool(tool),
            KeyBy::Server => KeyRef::Server,
            KeyBy::SessionTool => KeyRef::SessionTool(session.unwrap_or("-"), tool),
            KeyBy::Custom(_) => KeyRef::Custom(tool.into()),
        };
        self.refuses_key(&key)
    }

    fn refuses(&self, request: &dyn McpRequest) -> bool {
        self.refuses_key(&self.key_by().key_of_dyn(request))
    }

    fn keys_by_session(&self) -> bool {
        matches!(self.key_by(), KeyBy::SessionTool)
    }

    fn open_keys(&self) -> Vec<String> {
        let now = Instant::now();
        let mut open = Vec::new();
        self.inner.breakers.for_each(|key, b| {
            if b.refuses_now(now) {
                open.push(key.to_string());
            }
        });
        if self.inner.breakers.overflow().refuses_now(now) {
            open.push(Key::Overflow.to_string());
        }
        open.sort();
        open
    }
}

/// Whether two key functions are the same: the same variant, and for
/// [`KeyBy::Custom`] the same function.
fn same_key_by(a: &KeyBy, b: &KeyBy) -> bool {
    match (a, b) {
        (KeyBy::Tool, KeyBy::Tool)
        | (KeyBy::Server, KeyBy::Server)
        | (KeyBy::SessionTool, KeyBy::SessionTool) => true,
        (KeyBy::Custom(a), KeyBy::Custom(b)) => Arc::ptr_eq(a, b),
        _ => false,
    }
}
