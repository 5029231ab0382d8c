//! [`CoalesceLayer`]: the configuration and the shared map of calls in flight.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use futures_util::TryFuture;
use parking_lot::Mutex;

use toolwarden_core::{Events, ToolCatalog};
use tower_layer::Layer;

use crate::builder::CoalesceBuilder;
use crate::inflight::{Count, ErasedMap, InFlight};
use crate::service::Coalesce;

#[derive(Debug)]
pub(crate) struct Config {
    pub(crate) catalog: ToolCatalog,
    pub(crate) coalesce: Option<bool>,
    pub(crate) tools: HashMap<Arc<str>, bool>,
    pub(crate) per_session: bool,
    pub(crate) max_in_flight: usize,
    pub(crate) events: Events,
}

impl Config {
    /// Whether identical calls of `tool` share one call.
    #[inline]
    pub(crate) fn coalesces(&self, tool: &str) -> bool {
        if !self.tools.is_empty() {
            if let Some(coalesce) = self.tools.get(tool) {
                return *coalesce;
            }
        }
        if let Some(coalesce) = self.coalesce {
            return coalesce;
        }
        self.catalog.is_cacheable(tool) || self.catalog.is_safe_to_repeat(tool)
    }
}

pub(crate) struct Shared {
    pub(crate) config: Config,
    /// The slots of every map, and the bound.
    pub(crate) count: Arc<Count>,
    /// One map of calls per service future type (in practice one): each
    /// holds its own handles without boxing them per call.
    pub(crate) maps: Mutex<Vec<Arc<dyn ErasedMap>>>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// The map of calls of future type `F`, created on first use.
    pub(crate) fn map<F>(&self) -> Arc<dyn ErasedMap>
    where
        F: TryFuture + Send + 'static,
        F::Ok: Send,
    {
        let mut maps = self.maps.lock();
        if let Some(map) = maps.iter().find(|m| m.as_any().is::<InFlight<F>>()) {
            return Arc::clone(map);
        }
        let map: Arc<dyn ErasedMap> = Arc::new(InFlight::<F>::new(Arc::clone(&self.count)));
        maps.push(Arc::clone(&map));
        map
    }
}

/// Middleware that lets identical concurrent tool calls share one call;
/// see the [crate docs](crate).
///
/// The layer holds the configuration and the map of calls in flight:
/// every service it builds, every clone of those and every service built
/// from a clone of the layer share it, so identical calls arriving on two
/// connections share one call too.
#[derive(Debug, Clone)]
pub struct CoalesceLayer {
    shared: Arc<Shared>,
}

impl CoalesceLayer {
    /// A layer with every default: the empty, untrusted catalog, so no call
    /// is shared until tools are configured or annotations trusted. The
    /// same as `CoalesceLayer::builder().build()`.
    #[must_use]
    // Invariant: the defaults are valid (a test builds them).
    #[allow(clippy::expect_used)]
    pub fn new() -> Self {
        Self::builder()
            .build()
            .expect("the default coalesce configuration is valid")
    }

    /// A builder with the defaults documented on each knob.
    #[must_use]
    pub fn builder() -> CoalesceBuilder {
        CoalesceBuilder::default()
    }

    pub(crate) fn from_config(config: Config) -> Self {
        let count = Arc::new(Count {
            len: Default::default(),
            max_keys: config.max_in_flight,
        });
        CoalesceLayer {
            shared: Arc::new(Shared {
                config,
                count,
                maps: Mutex::new(Vec::new()),
            }),
        }
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Whether identical concurrent calls of `tool` share one call.
    #[must_use]
    pub fn coalesces(&self, tool: &str) -> bool {
        self.shared.config.coalesces(tool)
    }

    /// The calls in flight that others may join now.
    #[must_use]
    ///
    /// Counted over the layer's maps under their locks: for tests and
    /// diagnostics, not for every call.
    pub fn in_flight(&self) -> usize {
        let maps = self.shared.maps.lock();
        maps.iter().map(|map| map.open()).sum()
    }

    /// Whether only calls of one session share a call
    /// ([`CoalesceBuilder::per_session`]).
    #[must_use]
    pub fn per_session(&self) -> bool {
        self.shared.config.per_session
    }

    /// The bound on calls in flight that others may join.
    #[must_use]
    pub fn max_in_flight(&self) -> usize {
        self.shared.config.max_in_flight
    }

    /// The catalog the layer reads.
    #[must_use]
    pub fn catalog(&self) -> &ToolCatalog {
        &self.shared.config.catalog
    }
}

impl Default for CoalesceLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for CoalesceLayer {
    type Service = Coalesce<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Coalesce::new(inner, self)
    }
}
