//! [`CircuitRegistry`]: every breaker of one layer, by key, with snapshots
//! and manual control.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use parking_lot::Mutex;
use serde::Serialize;
use tokio::time::Instant;
use toolwarden_core::{CircuitView, Circuits, Entry, Events, Key, KeyBy, KeyRef, KeyedState};

use toolwarden_core::CircuitState;

use crate::breaker::{Breaker, CircuitSnapshot};
use crate::config::Config;
use crate::sync::{RemoteTransition, StateSync};

/// What every breaker of a registry shares (each breaker holds an `Arc` of
/// it, taken when the breaker is created, never per call).
pub(crate) struct Shared {
    /// The registry-wide settings, and the policy of every breaker whose
    /// tool has no override.
    pub(crate) config: Arc<Config>,
    /// The policies of the tools with an override (see
    /// [`CircuitBreakerBuilder::tool`](crate::CircuitBreakerBuilder::tool)),
    /// read once when a breaker is created.
    tool_policies: HashMap<Box<str>, Arc<Config>>,
    pub(crate) events: Events,
    pub(crate) sync: Option<Arc<dyn StateSync>>,
    /// The origin of the breakers' clocks (open deadlines, time buckets).
    pub(crate) epoch: Instant,
    /// Manual states set by key, so that they outlive idle eviction.
    /// Bounded by `bounds.max_keys`.
    overrides: Mutex<HashMap<Key, CircuitState>>,
}

impl Shared {
    /// The policy of a new breaker for `key`: its tool's override, else the
    /// registry's. Keys that name no tool (and the overflow breaker) get the
    /// registry's.
    fn policy_for(&self, key: &Key) -> Arc<Config> {
        let tool = match key {
            Key::Tool(tool) | Key::SessionTool(_, tool) => Some(&**tool),
            Key::Server | Key::Custom(_) | Key::Overflow => None,
        };
        let policy = tool
            .and_then(|tool| self.tool_policies.get(tool))
            .unwrap_or(&self.config);
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
/// [`KeyBy::SessionTool`]; the custom string with [`KeyBy::Custom`];
/// `(overflow)` for the shared breaker past the key bound.
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
            .field("config", &self.inner.shared.config)
            .field("tool_policies", &self.inner.shared.tool_policies)
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
        let shared = Arc::new(Shared {
            config: Arc::new(config),
            tool_policies,
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
            let policy = make_shared.policy_for(key);
            Breaker::new(key.clone(), Arc::clone(&make_shared), policy, initial)
        });
        CircuitRegistry {
            inner: Arc::new(Inner { breakers, shared }),
        }
    }

    /// The policy of every key without an override.
    #[cfg(test)]
    pub(crate) fn default_policy(&self) -> &Config {
        &self.inner.shared.config
    }

    /// The policy of `tool`'s override, if it has one.
    #[cfg(test)]
    pub(crate) fn tool_policy(&self, tool: &str) -> Option<&Config> {
        self.inner.shared.tool_policies.get(tool).map(|p| &**p)
    }

    #[inline]
    pub(crate) fn key_by(&self) -> &KeyBy {
        &self.inner.shared.config.key_by
    }

    /// The breaker of a key, created when new (the overflow breaker past the bound).
    #[inline]
    pub(crate) fn breaker(&self, key: &KeyRef<'_>) -> Entry<Breaker> {
        match self.inner.breakers.get(key) {
            Some(entry) => entry,
            None => self.inner.breakers.entry(key.clone()),
        }
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

    /// The key a name stands for, under this registry's key function (see
    /// the type docs).
    #[must_use]
    pub fn key_ref<'a>(&self, name: &'a str) -> KeyRef<'a> {
        if name == "(overflow)" {
            return KeyRef::Overflow;
        }
        match self.key_by() {
            KeyBy::Tool => KeyRef::Tool(name),
            KeyBy::Server => KeyRef::Server,
            KeyBy::SessionTool => match name.split_once('/') {
                Some((session, tool)) => KeyRef::SessionTool(session, tool),
                None => KeyRef::SessionTool("-", name),
            },
            KeyBy::Custom(_) => KeyRef::Custom(name.into()),
        }
    }

    /// The state of a key's circuit, if the key is held.
    ///
    /// A half-open circuit whose probe has outlived its `probe_timeout` is
    /// reopened first (see [`CircuitBreakerBuilder::probe_timeout`](crate::CircuitBreakerBuilder::probe_timeout)).
    #[must_use]
    pub fn state(&self, name: &str) -> Option<CircuitState> {
        let now = Instant::now();
        self.inner
            .breakers
            .with(&self.key_ref(name), |b| b.current_state(now))
    }

    /// A snapshot of one key's circuit, if the key is held.
    #[must_use]
    pub fn circuit(&self, name: &str) -> Option<CircuitSnapshot> {
        let now = Instant::now();
        self.inner
            .breakers
            .with(&self.key_ref(name), |b| b.snapshot(now))
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
        let key = self.key_ref(name);
        let manual = mode.is_manual().then_some(mode);
        // The breaker first, so that a new one starts closed and the change is announced.
        let entry = self.own_breaker(&key);
        if key != KeyRef::Overflow {
            self.set_override(&key.to_key(), manual);
        }
        if let Some(entry) = entry {
            entry.set_mode(mode, fresh);
        }
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
        let key = self.key_ref(name);
        if key == KeyRef::Overflow {
            return false;
        }
        self.own_breaker(&key)
            .is_some_and(|entry| entry.apply_remote(transition))
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
    /// and inside its open period, or half-open with every probe in flight).
    fn is_open(&self, key: &str) -> bool {
        let now = Instant::now();
        let breakers = &self.inner.breakers;
        breakers
            .with(&self.key_ref(key), |b| b.refuses_now(now))
            .unwrap_or_else(|| {
                // A key not held is served by the overflow breaker once the bound is reached.
                breakers.len() >= breakers.bounds().max_keys && breakers.overflow().refuses_now(now)
            })
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
