//! A read-only view of circuit states, for layers and reports that need to
//! know which keys are open without depending on the circuit-breaker crate
//! (the fallback cache skips open tools when it suggests alternatives; the
//! health report names open circuits).

use std::fmt;
use std::sync::Arc;

/// Which circuits are open. Implemented by the circuit-breaker registry.
pub trait CircuitView: Send + Sync + 'static {
    /// Whether the circuit of `key` (a tool name with the default key
    /// function) currently refuses calls.
    fn is_open(&self, key: &str) -> bool;

    /// Every key whose circuit currently refuses calls.
    fn open_keys(&self) -> Vec<String>;
}

/// A shared, optional [`CircuitView`].
#[derive(Clone, Default)]
pub struct Circuits(Option<Arc<dyn CircuitView>>);

impl Circuits {
    /// No view: every circuit reads as closed.
    pub fn none() -> Self {
        Circuits(None)
    }

    /// A view.
    pub fn new(view: Arc<dyn CircuitView>) -> Self {
        Circuits(Some(view))
    }

    /// Whether `key` is open (false without a view).
    pub fn is_open(&self, key: &str) -> bool {
        self.0.as_ref().is_some_and(|v| v.is_open(key))
    }

    /// Every open key (empty without a view).
    pub fn open_keys(&self) -> Vec<String> {
        self.0.as_ref().map(|v| v.open_keys()).unwrap_or_default()
    }
}

impl fmt::Debug for Circuits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Circuits").field(&self.0.is_some()).finish()
    }
}
