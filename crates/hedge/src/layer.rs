//! [`HedgeLayer`] and the state its services share.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use toolwarden_core::{Entry, Events, KeyBy, KeyedState, McpClassifier, McpRequest, ToolCatalog};
use toolwarden_retry::RetryBudget;
use tower_layer::Layer;

use crate::builder::HedgeBuilder;
use crate::latency::{LatencyRecord, Permille};
use crate::service::Hedge;

/// Applies [`Hedge`] to a service: a `tools/call` of a tool safe to send
/// twice that has not answered after a delay gets a second copy, and the
/// first good answer of the two is returned. See the [crate docs](crate).
///
/// The layer holds the configuration, the hedge budget and the per-tool
/// latency records: every service it makes, and every clone of those,
/// shares them.
///
/// ```
/// use std::time::Duration;
/// use toolwarden_hedge::HedgeLayer;
/// let layer = HedgeLayer::builder()
///     .delay(Duration::from_millis(250))
///     .percentile(Some(0.9))
///     .tool("lookup", |b| b.safe_to_hedge(true))
///     .build()
///     .unwrap();
/// # let _ = layer;
/// ```
pub struct HedgeLayer<C = McpClassifier> {
    shared: Arc<Shared<C>>,
}

impl<C> Clone for HedgeLayer<C> {
    fn clone(&self) -> Self {
        HedgeLayer {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<C> fmt::Debug for HedgeLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HedgeLayer")
            .field("policy", &self.shared.policy)
            .field("budget", &self.shared.budget)
            .field("key_by", &self.shared.key_by)
            .field("latency", &self.shared.latency)
            .field("tool_records", &self.shared.tool_records)
            .field("events", &self.shared.events)
            .finish_non_exhaustive()
    }
}

impl HedgeLayer {
    /// A layer with every default (see [`HedgeBuilder`]). With the default
    /// empty, untrusted catalog it hedges nothing: give it the stack's
    /// catalog, or name tools with `.tool(name, |b| b.safe_to_hedge(true))`.
    #[must_use]
    pub fn new() -> Self {
        // The defaults are valid (tested in `defaults_are_valid`).
        #[allow(clippy::expect_used)]
        HedgeBuilder::new()
            .build()
            .expect("invariant: the defaults are valid")
    }

    /// A builder, starting from the defaults.
    #[must_use]
    pub fn builder() -> HedgeBuilder {
        HedgeBuilder::new()
    }
}

impl Default for HedgeLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<C> HedgeLayer<C> {
    /// Whether a call of `request` may be hedged: a `tools/call` whose tool
    /// is safe to send twice (its `safe_to_hedge` override, else the
    /// catalog's [`is_safe_to_hedge`](ToolCatalog::is_safe_to_hedge)).
    #[must_use]
    pub fn is_hedged<R: McpRequest>(&self, request: &R) -> bool {
        self.shared.policy.select(request).is_some()
    }

    /// The delay after which a call of `request` would be hedged right now
    /// (its tool's recent percentile, else the fixed delay); `None` for a
    /// call that is never hedged.
    #[must_use]
    pub fn delay_for<R: McpRequest>(&self, request: &R) -> Option<Duration> {
        let policy = self.shared.policy.select(request)?;
        if policy.percentile.is_none() {
            return Some(policy.delay);
        }
        if let Some(record) = self.shared.tool_record(policy) {
            return Some(policy.delay_with(Some(record)));
        }
        let record = self.shared.latency.entry(self.shared.key_by.key(request));
        Some(policy.delay_with(Some(&record)))
    }

    /// Whole hedges the budget allows right now.
    #[must_use]
    pub fn budget_available(&self) -> u64 {
        self.shared.budget.available()
    }

    pub(crate) fn from_shared(shared: Shared<C>) -> Self {
        HedgeLayer {
            shared: Arc::new(shared),
        }
    }

    pub(crate) fn shared(&self) -> &Arc<Shared<C>> {
        &self.shared
    }
}

impl<S, C> Layer<S> for HedgeLayer<C> {
    type Service = Hedge<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        Hedge::new(inner, self)
    }
}

/// State shared by the layer, its services and their futures.
pub(crate) struct Shared<C> {
    pub(crate) policy: HedgePolicy,
    pub(crate) classifier: C,
    pub(crate) budget: RetryBudget,
    pub(crate) key_by: KeyBy,
    pub(crate) latency: KeyedState<LatencyRecord>,
    /// The records of the tools with an override, by
    /// [`CallPolicy::record`], when records are kept per tool: found by
    /// the override's lookup, outside the bounded map (there are as many
    /// as the configuration names).
    pub(crate) tool_records: Box<[LatencyRecord]>,
    pub(crate) events: Events,
}

impl<C> Shared<C> {
    /// The record of a tool with an override, if it keeps its own.
    #[inline]
    pub(crate) fn tool_record(&self, policy: &CallPolicy) -> Option<&LatencyRecord> {
        policy
            .record
            .and_then(|index| self.tool_records.get(index as usize))
    }
}

/// The knobs one call follows: the layer's, or its tool's override.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CallPolicy {
    /// The fixed delay, and the fallback while a tool has too few samples.
    pub(crate) delay: Duration,
    /// `None`: always the fixed delay.
    pub(crate) percentile: Option<Permille>,
    pub(crate) min_samples: u32,
    /// Per tool only: overrides the catalog.
    pub(crate) safe_to_hedge: Option<bool>,
    /// Per tool only, with a percentile and records kept per tool: the
    /// tool's record in [`Shared::tool_records`].
    pub(crate) record: Option<u32>,
}

impl CallPolicy {
    /// The delay of a call whose key's record is `record` (read only with
    /// a percentile).
    #[inline]
    pub(crate) fn delay_with(&self, record: Option<&LatencyRecord>) -> Duration {
        record
            .and_then(LatencyRecord::percentile)
            .unwrap_or(self.delay)
    }
}

/// Which calls are hedged, and with which knobs.
#[derive(Debug, Clone)]
pub(crate) struct HedgePolicy {
    pub(crate) call: CallPolicy,
    /// The tools' knobs; empty (and never looked up) without overrides.
    pub(crate) tools: ToolPolicies,
    pub(crate) catalog: ToolCatalog,
}

impl HedgePolicy {
    /// The knobs of `request` if it may be hedged: a `tools/call` of a
    /// tool whose override, else the catalog, says it is safe to send
    /// twice. Never another method.
    #[inline]
    pub(crate) fn select<R: McpRequest>(&self, request: &R) -> Option<&CallPolicy> {
        if !request.is_tool_call() {
            return None;
        }
        // A tools/call without a name is malformed: never hedged.
        let tool = request.tool_name()?;
        let policy = if self.tools.is_empty() {
            &self.call
        } else {
            self.tools.get(tool).unwrap_or(&self.call)
        };
        let safe = match policy.safe_to_hedge {
            Some(safe) => safe,
            None => self.catalog.is_safe_to_hedge(tool),
        };
        safe.then_some(policy)
    }
}

/// The knobs of the tools with an override, by name.
pub(crate) type ToolPolicies = HashMap<Box<str>, CallPolicy, foldhash::fast::RandomState>;

/// What a hedged call records its good answers' latency into.
pub(crate) type RecordHandle = Entry<LatencyRecord>;
