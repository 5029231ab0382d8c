//! [`RetryBackoffLayer`] and the state its services share.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use toolwarden_core::{Entry, Events, KeyBy, KeyedState, McpClassifier, McpRequest};
use tower_layer::Layer;

use crate::budget::RetryBudget;
use crate::builder::RetryBackoffBuilder;
use crate::policy::{RetryPolicy, ToolPolicies};
use crate::service::RetryBackoff;

/// Applies [`RetryBackoff`] to a service: retries failed MCP calls with
/// exponential backoff and jitter, only when the failure class, the tool and
/// the retry budget allow it. See the [crate docs](crate) for the rules.
///
/// The layer holds configuration and the retry budget: every service it
/// makes, and every clone of those, draws on one budget (per key, with
/// [`RetryBackoffBuilder::key_by`]).
///
/// ```
/// use std::time::Duration;
/// use toolwarden_retry::{Jitter, RetryBackoffLayer};
/// let layer = RetryBackoffLayer::builder()
///     .max_attempts(4)
///     .base_delay(Duration::from_millis(50))
///     .jitter(Jitter::Equal)
///     .build()
///     .unwrap();
/// # let _ = layer;
/// ```
pub struct RetryBackoffLayer<C = McpClassifier> {
    shared: Arc<Shared<C>>,
}

impl<C> Clone for RetryBackoffLayer<C> {
    fn clone(&self) -> Self {
        RetryBackoffLayer {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<C> fmt::Debug for RetryBackoffLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBackoffLayer")
            .field("policy", &self.shared.policy)
            .field("budget", &self.shared.budget)
            .field("events", &self.shared.events)
            .finish_non_exhaustive()
    }
}

impl RetryBackoffLayer {
    /// A layer with every default (see [`RetryBackoffBuilder`]). With the
    /// default empty, untrusted catalog it retries only failures that
    /// happened before the request left, rejections carrying a retry-after
    /// hint, and the read-only methods of
    /// [`DEFAULT_SAFE_METHODS`](crate::DEFAULT_SAFE_METHODS).
    #[must_use]
    pub fn new() -> Self {
        // The defaults are valid (tested): nothing for `build` to check.
        RetryBackoffBuilder::new().into_layer(ToolPolicies::default())
    }

    /// A builder, starting from the defaults.
    #[must_use]
    pub fn builder() -> RetryBackoffBuilder {
        RetryBackoffBuilder::new()
    }
}

impl Default for RetryBackoffLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<C> RetryBackoffLayer<C> {
    /// The deadline of a call whose tool has no override of its own (see
    /// [`RetryBackoffBuilder::deadline`]).
    #[must_use]
    pub fn deadline(&self) -> Duration {
        self.shared.policy.call.deadline
    }

    /// Whole retries the budget allows right now for `request` (for its key,
    /// with a per-key budget); `None` without a budget.
    #[must_use]
    pub fn budget_available<R: McpRequest>(&self, request: &R) -> Option<u64> {
        match &self.shared.budget {
            Budgets::Off => None,
            Budgets::Global(budget) => Some(budget.available()),
            Budgets::Keyed { key_by, state } => {
                let key = key_by.key(request);
                // Reading must not insert a key: an unseen key has a fresh budget.
                Some(match state.get(&key) {
                    Some(budget) => budget.available(),
                    None => state.make_value(&key.to_key()).available(),
                })
            }
        }
    }

    pub(crate) fn from_shared(shared: Shared<C>) -> Self {
        RetryBackoffLayer {
            shared: Arc::new(shared),
        }
    }

    pub(crate) fn shared(&self) -> &Arc<Shared<C>> {
        &self.shared
    }
}

impl<S, C> Layer<S> for RetryBackoffLayer<C> {
    type Service = RetryBackoff<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        RetryBackoff::new(inner, self)
    }
}

/// State shared by the layer, its services and their futures.
pub(crate) struct Shared<C> {
    pub(crate) policy: RetryPolicy,
    pub(crate) classifier: C,
    pub(crate) budget: Budgets,
    pub(crate) events: Events,
    pub(crate) seed: Option<(u64, AtomicU64)>,
}

impl<C> Shared<C> {
    /// A random source for one call's jitter: from the configured seed (one
    /// stream per call, in call order), else from the thread's generator.
    pub(crate) fn rng(&self) -> fastrand::Rng {
        match &self.seed {
            Some((seed, calls)) => {
                let n = calls.fetch_add(1, Ordering::Relaxed);
                fastrand::Rng::with_seed(seed.wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
            }
            None => fastrand::Rng::new(),
        }
    }
}

/// The budget of a layer: none, one, or one per key.
pub(crate) enum Budgets {
    Off,
    // Boxed: a budget is four cache-line stripes, the other variants a word.
    Global(Box<RetryBudget>),
    Keyed {
        key_by: KeyBy,
        state: KeyedState<RetryBudget>,
    },
}

/// The budget a call draws on, held by its future.
#[derive(Debug)]
pub(crate) enum BudgetHandle {
    /// No budget, or the call is never retried.
    None,
    /// The layer's one budget.
    Global,
    /// One key's budget.
    Keyed(Entry<RetryBudget>),
}

impl Budgets {
    /// Deposits one request and returns the handle its retries withdraw from.
    #[inline]
    pub(crate) fn deposit<R: McpRequest>(&self, request: &R, now: Instant) -> BudgetHandle {
        match self {
            Budgets::Off => BudgetHandle::None,
            Budgets::Global(budget) => {
                budget.deposit_at(now);
                BudgetHandle::Global
            }
            Budgets::Keyed { key_by, state } => {
                let entry = state.entry(key_by.key(request));
                entry.deposit_at(now);
                BudgetHandle::Keyed(entry)
            }
        }
    }

    /// The budget `handle` refers to.
    pub(crate) fn get<'a>(&'a self, handle: &'a BudgetHandle) -> Option<&'a RetryBudget> {
        match (handle, self) {
            (BudgetHandle::Global, Budgets::Global(budget)) => Some(budget),
            (BudgetHandle::Keyed(entry), _) => Some(entry),
            _ => None,
        }
    }
}

impl fmt::Debug for Budgets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Budgets::Off => f.write_str("Off"),
            Budgets::Global(budget) => f.debug_tuple("Global").field(budget).finish(),
            Budgets::Keyed { key_by, state } => f
                .debug_struct("Keyed")
                .field("key_by", key_by)
                .field("state", state)
                .finish(),
        }
    }
}
