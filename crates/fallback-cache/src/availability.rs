//! [`ToolAvailability`]: whether a call to a tool would be refused right
//! now, so that the fallback cache never suggests a tool that cannot answer.

use std::fmt;
use std::sync::Arc;

/// Answers "would a call to this tool be refused right now?" (its circuit
/// is open, its upstream is down or being restarted, ...). The fallback
/// cache never suggests a tool this calls unavailable.
///
/// Implemented for every `Fn(&str) -> bool + Send + Sync + 'static`
/// closure (`true`: available), so a gateway can pass its own health view:
///
/// ```
/// use std::collections::HashSet;
/// use std::sync::{Arc, RwLock};
/// use toolwarden_core::ToolCatalog;
/// use toolwarden_fallback_cache::FallbackCacheLayer;
///
/// let catalog = ToolCatalog::new();
/// let down: Arc<RwLock<HashSet<String>>> = Arc::default(); // upstreams the gateway saw fail
/// let layer = FallbackCacheLayer::builder()
///     .catalog(catalog.clone())
///     .available({
///         let down = Arc::clone(&down);
///         move |tool: &str| match catalog.upstream_of(tool) {
///             Some(upstream) => !down.read().is_ok_and(|d| d.contains(&*upstream)),
///             None => true,
///         }
///     })
///     .build()
///     .unwrap();
/// # let _ = layer;
/// ```
///
/// It is asked on the failure path only, once per candidate tool, so it
/// should be cheap (an atomic, a lock-free map) but need not be free.
pub trait ToolAvailability: Send + Sync + 'static {
    /// Whether a call to `tool` would be let through now.
    fn is_available(&self, tool: &str) -> bool;
}

impl<F> ToolAvailability for F
where
    F: Fn(&str) -> bool + Send + Sync + 'static,
{
    fn is_available(&self, tool: &str) -> bool {
        self(tool)
    }
}

/// A shared, optional [`ToolAvailability`]: without one, every tool is
/// available.
#[derive(Clone, Default)]
pub(crate) struct Availability(Option<Arc<dyn ToolAvailability>>);

impl Availability {
    pub(crate) fn new(check: impl ToolAvailability) -> Self {
        Availability(Some(Arc::new(check)))
    }

    pub(crate) fn is_available(&self, tool: &str) -> bool {
        self.0.as_ref().is_none_or(|check| check.is_available(tool))
    }
}

impl fmt::Debug for Availability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Availability")
            .field(&if self.0.is_some() { "custom" } else { "all" })
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_check_every_tool_is_available() {
        assert!(Availability::default().is_available("anything"));
        let only_echo = Availability::new(|tool: &str| tool == "echo");
        assert!(only_echo.is_available("echo"));
        assert!(!only_echo.is_available("add"));
        assert_eq!(format!("{only_echo:?}"), "Availability(\"custom\")");
    }
}
