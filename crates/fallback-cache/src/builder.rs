//! [`FallbackCacheBuilder`]: every knob of the fallback cache, checked when
//! built.

use std::sync::Arc;
use std::time::Duration;

use toolwarden_core::{Circuits, ConfigError, Events, McpClassifier, ToolCatalog};

use crate::availability::{Availability, ToolAvailability};
use crate::layer::{Config, FallbackCacheLayer};
use crate::rank::DEFAULT_MIN_RELEVANCE;
use crate::service::Shared;

/// Default [`FallbackCacheBuilder::max_staleness`]: 5 minutes.
pub const DEFAULT_MAX_STALENESS: Duration = Duration::from_secs(300);
/// Default [`FallbackCacheBuilder::max_entries`].
pub const DEFAULT_MAX_ENTRIES: usize = 4096;
/// Default [`FallbackCacheBuilder::max_bytes`]: 32 MiB.
pub const DEFAULT_MAX_BYTES: usize = 32 * 1024 * 1024;
/// Default [`FallbackCacheBuilder::alternatives`].
pub const DEFAULT_ALTERNATIVES: usize = 3;
/// The smallest [`FallbackCacheBuilder::max_bytes`] accepted.
pub const MIN_MAX_BYTES: usize = 1024;
/// The largest [`FallbackCacheBuilder::max_entries`] accepted: 16 Mi entries
/// (the cache sizes its tables from it when built).
pub const MAX_MAX_ENTRIES: usize = 1 << 24;

/// Configures a [`FallbackCacheLayer`]; [`build`](Self::build) validates.
///
/// ```
/// use std::time::Duration;
/// use toolwarden_core::ToolCatalog;
/// use toolwarden_fallback_cache::FallbackCacheLayer;
///
/// let layer = FallbackCacheLayer::builder()
///     .catalog(ToolCatalog::new())
///     .max_staleness(Duration::from_secs(600))
///     .fresh_ttl(Some(Duration::from_secs(30)))
///     .max_entries(10_000)
///     .build()
///     .unwrap();
/// # let _ = layer;
/// let err = FallbackCacheLayer::builder()
///     .max_staleness(Duration::ZERO)
///     .build()
///     .unwrap_err();
/// assert_eq!(err.field(), "max_staleness");
/// ```
#[derive(Debug, Clone)]
pub struct FallbackCacheBuilder<C = McpClassifier> {
    config: Config,
    classifier: C,
}

impl Default for FallbackCacheBuilder {
    fn default() -> Self {
        FallbackCacheBuilder {
            config: Config {
                catalog: ToolCatalog::new(),
                circuits: Circuits::none(),
                availability: Availability::default(),
                events: Events::new(),
                max_staleness: DEFAULT_MAX_STALENESS,
                fresh_ttl: None,
                per_session: false,
                max_entries: DEFAULT_MAX_ENTRIES,
                max_bytes: DEFAULT_MAX_BYTES,
                stale_note: true,
                degrade: true,
                alternatives: DEFAULT_ALTERNATIVES,
                min_relevance: DEFAULT_MIN_RELEVANCE,
                keep_session: false,
            },
            classifier: McpClassifier::new(),
        }
    }
}

impl<C> FallbackCacheBuilder<C> {
    /// The catalog that says which tools are cacheable
    /// ([`ToolCatalog::is_cacheable`]: configured so, or trusted read-only
    /// annotations) and describes the tools offered as alternatives. The
    /// layer reads it on every call, so it may be filled after the layer is
    /// built (a `tools/list` result, policies): clones of a `ToolCatalog`
    /// share one catalog. Default: a new, empty, untrusted catalog, in which
    /// no tool is cacheable and none is offered as an alternative: until it
    /// is filled (through [`FallbackCacheLayer::catalog`]), the layer only
    /// degrades failures, with no alternatives.
    #[must_use]
    pub fn catalog(mut self, catalog: ToolCatalog) -> Self {
        self.config.catalog = catalog;
        self
    }

    /// How old a stored result may be and still be served when a call
    /// fails. A result is served while strictly younger than this. Must be
    /// above zero. Default: [`DEFAULT_MAX_STALENESS`] (5 minutes).
    #[must_use]
    pub fn max_staleness(mut self, max_staleness: Duration) -> Self {
        self.config.max_staleness = max_staleness;
        self
    }

    /// Fresh mode: a cacheable call whose stored result is younger than
    /// this is answered from the cache without calling the service below.
    /// Must be above zero and at most `max_staleness`. Default: `None`
    /// (every call goes through; the cache only serves failures).
    #[must_use]
    pub fn fresh_ttl(mut self, fresh_ttl: Option<Duration>) -> Self {
        self.config.fresh_ttl = fresh_ttl;
        self
    }

    /// Whether a stored result is served only within the session that
    /// stored it ([`McpRequest::session_key`]; calls without one share
    /// theirs): for servers that answer each session from state of its own
    /// (a proxy's upstream per session), whose result for one session must
    /// never reach another. Default `false`: one result per call, for
    /// every session.
    ///
    /// [`McpRequest::session_key`]: toolwarden_core::McpRequest::session_key
    #[must_use]
    pub fn per_session(mut self, per_session: bool) -> Self {
        self.config.per_session = per_session;
        self
    }

    /// The most results kept. Must be between 1 and [`MAX_MAX_ENTRIES`].
    /// Default: [`DEFAULT_MAX_ENTRIES`] (4096).
    #[must_use]
    pub fn max_entries(mut self, max_entries: usize) -> Self {
        self.config.max_entries = max_entries;
        self
    }

    /// The most bytes of results kept, as measured by
    /// [`McpResponse::size_hint`](toolwarden_core::McpResponse::size_hint).
    /// Must be at least [`MIN_MAX_BYTES`] (1 KiB). The cache is split into
    /// shards with equal budgets (8 when `max_entries >= 256` and
    /// `max_bytes >= 512 KiB`, fewer for smaller caches), and a single
    /// result larger than 97 % of a shard's bytes is not stored.
    /// Default: [`DEFAULT_MAX_BYTES`] (32 MiB).
    #[must_use]
    pub fn max_bytes(mut self, max_bytes: usize) -> Self {
        self.config.max_bytes = max_bytes;
        self
    }

    /// Whether a stale result also carries a short text note the model sees
    /// (`[stale: result from 42 s ago; search is failing: ...]`), besides
    /// its `_meta["toolwarden/stale"]` member. Default: `true`.
    #[must_use]
    pub fn stale_note(mut self, stale_note: bool) -> Self {
        self.config.stale_note = stale_note;
        self
    }

    /// Whether a failed call with no result to serve is turned into a
    /// structured `isError` result (an `Err` or a JSON-RPC error becomes
    /// `Ok`), rather than passed up as it is. Default: `true`.
    #[must_use]
    pub fn degrade(mut self, degrade: bool) -> Self {
        self.config.degrade = degrade;
        self
    }

    /// How many other tools to suggest in a structured error; `0` turns
    /// ranking off. Default: [`DEFAULT_ALTERNATIVES`] (3).
    #[must_use]
    pub fn alternatives(mut self, alternatives: usize) -> Self {
        self.config.alternatives = alternatives;
        self
    }

    /// How relevant a tool must be to the failed call to be suggested: its
    /// [relevance](crate::Ranked::relevance), the idf-weighted overlap of
    /// informative terms, from 0 (nothing in common but generic words) to
    /// 1 (the same terms). Under the floor, nothing is suggested rather
    /// than an unrelated tool. `0.0` turns the floor off (any tool sharing
    /// a term may be suggested, as before the floor existed). Must be
    /// within `0.0..=1.0`. Default: [`DEFAULT_MIN_RELEVANCE`] (0.15).
    #[must_use]
    pub fn min_relevance(mut self, min_relevance: f64) -> Self {
        self.config.min_relevance = min_relevance;
        self
    }

    /// Which circuits are open, so that tools whose breaker refuses calls
    /// are not suggested as alternatives. Default: [`Circuits::none`]
    /// (every circuit reads as closed).
    #[must_use]
    pub fn circuits(mut self, circuits: Circuits) -> Self {
        self.config.circuits = circuits;
        self
    }

    /// Whether a tool would be refused right now (an upstream that is down,
    /// a circuit keyed by upstream that is open, ...): tools it calls
    /// unavailable are never suggested as alternatives. A closure
    /// `|tool: &str| -> bool` (`true`: available) or any
    /// [`ToolAvailability`]; asked on the failure path, once per candidate.
    /// Complements [`circuits`](Self::circuits): a tool is suggested only if
    /// its circuit is closed *and* this calls it available. Default: every
    /// tool available.
    #[must_use]
    pub fn available(mut self, availability: impl ToolAvailability) -> Self {
        self.config.availability = Availability::new(availability);
        self
    }

    /// Where to report `StaleServed` and `Degraded` events. Default: no sink.
    #[must_use]
    pub fn events(mut self, events: Events) -> Self {
        self.config.events = events;
        self
    }

    /// The classifier that tells a good result (stored) from a failure
    /// (answered from the cache or degraded); share it with the other layers
    /// of the stack. Default: [`McpClassifier`].
    #[must_use]
    pub fn classifier<C2>(self, classifier: C2) -> FallbackCacheBuilder<C2> {
        FallbackCacheBuilder {
            config: self.config,
            classifier,
        }
    }

    /// Validates the configuration.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the field: `max_staleness` zero, `fresh_ttl`
    /// zero, `fresh_ttl, max_staleness` when the first exceeds the second,
    /// `max_entries` zero or over [`MAX_MAX_ENTRIES`], `max_bytes` under
    /// [`MIN_MAX_BYTES`], `min_relevance` outside `0.0..=1.0` (or NaN).
    /// Any `Duration` is accepted where it is not refused here (ages are
    /// compared, never added to an instant).
    pub fn build(self) -> Result<FallbackCacheLayer<C>, ConfigError> {
        if self.config.max_staleness.is_zero() {
            return Err(ConfigError::new(
                "max_staleness",
                "must be greater than zero",
            ));
        }
        if let Some(ttl) = self.config.fresh_ttl {
            if ttl.is_zero() {
                return Err(ConfigError::new(
                    "fresh_ttl",
                    "must be greater than zero (or None)",
                ));
            }
            if ttl > self.config.max_staleness {
                return Err(ConfigError::new(
                    "fresh_ttl, max_staleness",
                    format!(
                        "fresh_ttl ({ttl:?}) must not exceed max_staleness ({:?})",
                        self.config.max_staleness
                    ),
                ));
            }
        }
        if self.config.max_entries == 0 || self.config.max_entries > MAX_MAX_ENTRIES {
            return Err(ConfigError::new(
                "max_entries",
                format!("must be between 1 and {MAX_MAX_ENTRIES}"),
            ));
        }
        if self.config.max_bytes < MIN_MAX_BYTES {
            return Err(ConfigError::new(
                "max_bytes",
                format!("must be at least {MIN_MAX_BYTES} bytes"),
            ));
        }
        if !(0.0..=1.0).contains(&self.config.min_relevance) {
            return Err(ConfigError::new(
                "min_relevance",
                format!(
                    "must be between 0.0 and 1.0 (got {})",
                    self.config.min_relevance
                ),
            ));
        }
        let mut config = self.config;
        config.keep_session =
            config.degrade && config.alternatives > 0 && config.circuits.keys_by_session();
        Ok(FallbackCacheLayer {
            shared: Arc::new(Shared::new(config)),
            classifier: self.classifier,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn builder() -> FallbackCacheBuilder {
        FallbackCacheLayer::builder()
    }

    #[test]
    fn defaults_build() {
        let layer = builder().build().unwrap();
        assert!(layer.catalog().is_empty() && !layer.catalog().is_trusted());
        let layer = FallbackCacheLayer::new();
        let c = &layer.shared.config;
        assert_eq!(c.max_staleness, DEFAULT_MAX_STALENESS);
        assert_eq!(c.fresh_ttl, None);
        assert_eq!(
            (c.max_entries, c.max_bytes),
            (DEFAULT_MAX_ENTRIES, DEFAULT_MAX_BYTES)
        );
        assert!(c.stale_note && c.degrade);
        assert_eq!(c.alternatives, DEFAULT_ALTERNATIVES);
        assert_eq!(c.min_relevance.to_bits(), DEFAULT_MIN_RELEVANCE.to_bits());
        assert!(c.availability.is_available("any_tool"));
    }

    #[test]
    fn bad_values_name_their_field() {
        let secs = Duration::from_secs;
        let cases = [
            (builder().max_staleness(Duration::ZERO), "max_staleness"),
            (builder().fresh_ttl(Some(Duration::ZERO)), "fresh_ttl"),
            (
                builder().max_staleness(secs(10)).fresh_ttl(Some(secs(11))),
                "fresh_ttl, max_staleness",
            ),
            (builder().max_entries(0), "max_entries"),
            (builder().max_entries(usize::MAX), "max_entries"),
            (builder().max_bytes(MIN_MAX_BYTES - 1), "max_bytes"),
            (builder().min_relevance(-0.01), "min_relevance"),
            (builder().min_relevance(1.01), "min_relevance"),
            (builder().min_relevance(f64::NAN), "min_relevance"),
            (builder().min_relevance(f64::INFINITY), "min_relevance"),
        ];
        for (b, field) in cases {
            assert_eq!(b.build().unwrap_err().field(), field);
        }
        assert!(builder()
            .max_staleness(secs(10))
            .fresh_ttl(Some(secs(10)))
            .build()
            .is_ok());
        assert!(builder()
            .max_entries(1)
            .max_bytes(MIN_MAX_BYTES)
            .build()
            .is_ok());
        for floor in [0.0, 0.5, 1.0] {
            let layer = builder().min_relevance(floor).build().unwrap();
            assert_eq!(layer.shared.config.min_relevance.to_bits(), floor.to_bits());
        }
    }
}
