//! [`HedgeBuilder`]: the knobs of a [`HedgeLayer`], their defaults and
//! their validation.

use std::fmt;
use std::time::Duration;

use toolwarden_core::overrides::{Overridable, ToolOverrides};
use toolwarden_core::{Bounds, ConfigError, Events, KeyBy, KeyedState, McpClassifier, ToolCatalog};
use toolwarden_retry::{BudgetConfig, RetryBudget};

use crate::latency::{LatencyRecord, Permille, SAMPLES};
use crate::layer::{CallPolicy, HedgeLayer, HedgePolicy, Shared, ToolPolicies};

/// The longest delay `build` accepts.
const MAX_DELAY: Duration = Duration::from_secs(3600);

/// The hedge budget's default: hedges may add 10 % to the hedgeable calls
/// of the last 10 s, plus one hedge per second of the window.
pub const DEFAULT_BUDGET: BudgetConfig = BudgetConfig {
    ratio: 0.1,
    min_per_sec: 1,
    ttl: Duration::from_secs(10),
};

/// Builds a [`HedgeLayer`]; [`build`](Self::build) checks the
/// configuration. Every knob states its default.
pub struct HedgeBuilder<C = McpClassifier> {
    delay: Duration,
    percentile: Option<f64>,
    min_samples: u32,
    /// Per tool only (see [`HedgeBuilder::safe_to_hedge`]).
    safe_to_hedge: Option<bool>,
    catalog: ToolCatalog,
    budget: BudgetConfig,
    key_by: KeyBy,
    bounds: Bounds,
    events: Events,
    classifier: C,
    tools: ToolOverrides<HedgeBuilder>,
}

impl Overridable for HedgeBuilder {
    fn overrides(&mut self) -> &mut ToolOverrides<Self> {
        &mut self.tools
    }
}

impl<C> fmt::Debug for HedgeBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HedgeBuilder")
            .field("delay", &self.delay)
            .field("percentile", &self.percentile)
            .field("min_samples", &self.min_samples)
            .field("safe_to_hedge", &self.safe_to_hedge)
            .field("catalog", &self.catalog)
            .field("budget", &self.budget)
            .field("key_by", &self.key_by)
            .field("bounds", &self.bounds)
            .field("tools", &self.tools)
            .finish_non_exhaustive()
    }
}

impl HedgeBuilder {
    pub(crate) fn new() -> Self {
        HedgeBuilder {
            delay: Duration::from_millis(100),
            percentile: Some(0.95),
            min_samples: 20,
            safe_to_hedge: None,
            catalog: ToolCatalog::new(),
            budget: DEFAULT_BUDGET,
            key_by: KeyBy::Tool,
            bounds: Bounds::default(),
            events: Events::new(),
            classifier: McpClassifier::new(),
            tools: ToolOverrides::new(),
        }
    }
}

impl<C> HedgeBuilder<C> {
    /// How long the first attempt runs before the hedge is sent, when the
    /// tool's latency record has fewer than
    /// [`min_samples`](Self::min_samples) good answers or
    /// [`percentile`](Self::percentile) is off. Positive and at most 1 h
    /// (else `build` names `delay`). Default 100 ms.
    #[must_use]
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Sends the hedge after this percentile (`0.95`: the p95) of the
    /// latencies of the key's (the tool's) latest 64 recorded good answers
    /// (one waited-for answer in four is recorded), once it has
    /// [`min_samples`](Self::min_samples) of them; `None` always waits the
    /// fixed [`delay`](Self::delay). Above 0 and at most 1, resolution
    /// 0.001 (else `build` names `percentile`). Default `Some(0.95)`.
    #[must_use]
    pub fn percentile(mut self, percentile: Option<f64>) -> Self {
        self.percentile = percentile;
        self
    }

    /// Recorded good answers a key needs before its percentile replaces
    /// the fixed delay. Between 1 and 64 (the record's size; else `build`
    /// names `min_samples`). Default 20.
    #[must_use]
    pub fn min_samples(mut self, min_samples: u32) -> Self {
        self.min_samples = min_samples;
        self
    }

    /// Inside [`tool`](Self::tool) only: whether the tool may be sent twice
    /// at once, overriding the catalog for this layer. Default: the catalog
    /// decides ([`ToolCatalog::is_safe_to_hedge`]: configured safe to
    /// repeat, or trusted annotations saying read-only and idempotent).
    ///
    /// On the layer's builder `build` refuses it, naming `safe_to_hedge`:
    /// a blanket "hedge every tool" would send destructive tools twice.
    ///
    /// ```
    /// use toolwarden_hedge::HedgeLayer;
    /// let layer = HedgeLayer::builder()
    ///     .tool("lookup", |b| b.safe_to_hedge(true))
    ///     .tool("search", |b| b.safe_to_hedge(false)) // whatever the catalog says
    ///     .build();
    /// assert!(layer.is_ok());
    /// let err = HedgeLayer::builder().safe_to_hedge(true).build().unwrap_err();
    /// assert_eq!(err.field(), "safe_to_hedge");
    /// ```
    #[must_use]
    pub fn safe_to_hedge(mut self, safe: bool) -> Self {
        self.safe_to_hedge = Some(safe);
        self
    }

    /// The catalog that says which tools are safe to send twice; share the
    /// stack's. Default: an empty, untrusted catalog, **so by default no
    /// call is hedged** but those of tools named with
    /// `.tool(name, |b| b.safe_to_hedge(true))`.
    #[must_use]
    pub fn catalog(mut self, catalog: ToolCatalog) -> Self {
        self.tools.layer_wide("catalog");
        self.catalog = catalog;
        self
    }

    /// The hedge budget: every hedgeable call deposits `ratio` of a hedge,
    /// every hedge withdraws one, and `min_per_sec · ttl` hedges are always
    /// available (see [`RetryBudget`], the same mechanism as the retry
    /// budget). Over any `ttl` window, hedges ≤ `ratio` × hedgeable calls +
    /// `min_per_sec` × `ttl`, so a slow server does not get twice the load.
    /// Checked like the retry budget (errors name `budget.<field>`).
    /// Default [`DEFAULT_BUDGET`]: ratio 0.1, 1 per second, 10 s.
    #[must_use]
    pub fn budget(mut self, budget: BudgetConfig) -> Self {
        self.tools.layer_wide("budget");
        self.budget = budget;
        self
    }

    /// How latency records are keyed. Default [`KeyBy::Tool`].
    #[must_use]
    pub fn key_by(mut self, key_by: KeyBy) -> Self {
        self.tools.layer_wide("key_by");
        self.key_by = key_by;
        self
    }

    /// The bounds of the latency records (about 300 bytes each): past
    /// `max_keys`, new keys share one overflow record; a key idle for
    /// `idle_timeout` is evicted. Kept per tool, a tool with an override
    /// ([`tool`](Self::tool)) keeps its record beside the override, outside
    /// these bounds. Checked as [`Bounds::validate`] (errors
    /// name `bounds.<field>`). Default [`Bounds::default`] (10 000 keys,
    /// 10 minutes idle).
    #[must_use]
    pub fn bounds(mut self, bounds: Bounds) -> Self {
        self.tools.layer_wide("bounds");
        self.bounds = bounds;
        self
    }

    /// Where [`Event::Hedged`](toolwarden_core::Event::Hedged) goes.
    /// Default: nowhere.
    #[must_use]
    pub fn events(mut self, events: Events) -> Self {
        self.tools.layer_wide("events");
        self.events = events;
        self
    }

    /// The classifier that judges each answer (a failed answer waits for
    /// the other attempt); share the stack's. Default [`McpClassifier`].
    #[must_use]
    pub fn classifier<C2>(mut self, classifier: C2) -> HedgeBuilder<C2> {
        self.tools.layer_wide("classifier");
        HedgeBuilder {
            delay: self.delay,
            percentile: self.percentile,
            min_samples: self.min_samples,
            safe_to_hedge: self.safe_to_hedge,
            catalog: self.catalog,
            budget: self.budget,
            key_by: self.key_by,
            bounds: self.bounds,
            events: self.events,
            classifier,
            tools: self.tools,
        }
    }

    /// Gives the calls of `tool` their own `delay`, `percentile`,
    /// `min_samples` and `safe_to_hedge`. Default: no overrides.
    ///
    /// At [`build`](Self::build), `configure` receives a fresh builder
    /// carrying this builder's final `delay`, `percentile` and
    /// `min_samples` (the order of the calls does not matter); those three
    /// and `safe_to_hedge` become the tool's. The catalog, the budget, the
    /// key, the bounds, the events and the classifier are layer-wide: a
    /// `configure` that sets one is refused (`tools."<tool>".<knob>`), and
    /// so is a bad value (`tools."<tool>".<field>`). Overrides apply to
    /// `tools/call` requests naming `tool`, found by one lookup of the tool
    /// name per call, skipped when no tool has an override.
    #[must_use]
    pub fn tool(
        mut self,
        tool: impl Into<String>,
        configure: impl FnOnce(HedgeBuilder) -> HedgeBuilder + Send + 'static,
    ) -> Self {
        self.tools.push(tool, configure);
        self
    }

    fn call_policy(&self) -> Result<CallPolicy, ConfigError> {
        if self.delay.is_zero() || self.delay > MAX_DELAY {
            return Err(ConfigError::new(
                "delay",
                "must be positive and at most 1 h",
            ));
        }
        let percentile = match self.percentile {
            None => None,
            Some(p) if p.is_finite() && p > 0.0 && p <= 1.0 && (p * 1000.0).round() >= 1.0 => {
                Some(Permille((p * 1000.0).round() as u16))
            }
            Some(_) => {
                return Err(ConfigError::new(
                    "percentile",
                    "must be above 0 and at most 1, at a resolution of 0.001",
                ))
            }
        };
        if self.min_samples == 0 || self.min_samples as usize > SAMPLES {
            return Err(ConfigError::new(
                "min_samples",
                format!("must be between 1 and {SAMPLES}"),
            ));
        }
        Ok(CallPolicy {
            delay: self.delay,
            percentile,
            min_samples: self.min_samples,
            safe_to_hedge: self.safe_to_hedge,
            record: None,
        })
    }

    /// Checks the configuration and builds the layer, or names the first
    /// bad field.
    pub fn build(mut self) -> Result<HedgeLayer<C>, ConfigError> {
        if self.safe_to_hedge.is_some() {
            return Err(ConfigError::new(
                "safe_to_hedge",
                "is per tool: set it in `.tool(name, |b| b.safe_to_hedge(..))`, or configure the catalog",
            ));
        }
        let call = self.call_policy()?;
        let budget = RetryBudget::new(self.budget).map_err(|e| e.in_section("budget"))?;
        self.bounds.validate().map_err(|e| e.in_section("bounds"))?;
        let (delay, percentile, min_samples) = (self.delay, self.percentile, self.min_samples);
        let tools = std::mem::take(&mut self.tools).resolve(
            || {
                HedgeBuilder::new()
                    .delay(delay)
                    .percentile(percentile)
                    .min_samples(min_samples)
            },
            |b| b.call_policy(),
        )?;
        Ok(self.into_layer(call, budget, tools.into_iter().collect()))
    }

    /// The layer, from checked parts.
    pub(crate) fn into_layer(
        self,
        call: CallPolicy,
        budget: RetryBudget,
        mut tools: ToolPolicies,
    ) -> HedgeLayer<C> {
        // Kept per tool, a tool with an override and a percentile gets its
        // record beside its override: the call that looks the override up
        // has found it, and it takes no place in the bounded map.
        let mut tool_records = Vec::new();
        if matches!(self.key_by, KeyBy::Tool) {
            for policy in tools.values_mut().filter(|p| p.percentile.is_some()) {
                policy.record = u32::try_from(tool_records.len()).ok();
                tool_records.push(LatencyRecord::new());
            }
        }
        HedgeLayer::from_shared(Shared {
            policy: HedgePolicy {
                call,
                tools,
                catalog: self.catalog,
            },
            classifier: self.classifier,
            budget,
            key_by: self.key_by,
            latency: KeyedState::new(self.bounds, |_| LatencyRecord::new()),
            tool_records: tool_records.into_boxed_slice(),
            events: self.events,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HedgeLayer;

    fn field(b: HedgeBuilder) -> String {
        b.build().unwrap_err().field().to_owned()
    }

    #[test]
    fn defaults_are_valid() {
        assert!(HedgeLayer::builder().build().is_ok());
        DEFAULT_BUDGET.validate().unwrap();
        let layer = HedgeLayer::new();
        let policy = &layer.shared().policy;
        assert_eq!(policy.call.delay, Duration::from_millis(100));
        assert_eq!(policy.call.percentile, Some(Permille(950)));
        assert_eq!(policy.call.min_samples, 20);
    }

    #[test]
    fn bad_values_name_their_field() {
        let b = HedgeLayer::builder;
        assert_eq!(field(b().delay(Duration::ZERO)), "delay");
        assert_eq!(field(b().delay(Duration::from_secs(3601))), "delay");
        for p in [0.0, -0.5, 1.001, f64::NAN, f64::INFINITY, 0.0004] {
            assert_eq!(field(b().percentile(Some(p))), "percentile", "{p}");
        }
        assert!(b().percentile(Some(1.0)).build().is_ok());
        assert!(b().percentile(None).build().is_ok());
        assert_eq!(field(b().min_samples(0)), "min_samples");
        assert_eq!(field(b().min_samples(65)), "min_samples");
        assert_eq!(field(b().safe_to_hedge(true)), "safe_to_hedge");
        let bad = BudgetConfig {
            ratio: f64::NAN,
            ..DEFAULT_BUDGET
        };
        assert_eq!(field(b().budget(bad)), "budget.ratio");
        assert_eq!(field(b().bounds(Bounds::max_keys(0))), "bounds.max_keys");
    }

    #[test]
    fn tool_errors_name_the_tool() {
        let b = HedgeLayer::builder;
        assert_eq!(
            field(b().tool("search", |t| t.delay(Duration::ZERO))),
            r#"tools."search".delay"#
        );
        assert_eq!(
            field(b().tool("search", |t| t.budget(DEFAULT_BUDGET))),
            r#"tools."search".budget"#
        );
        assert_eq!(
            field(b().tool("search", |t| t.catalog(ToolCatalog::new()))),
            r#"tools."search".catalog"#
        );
        // A tool gets the outer values it does not set, whatever the order.
        let layer = b()
            .tool("search", |t| t.safe_to_hedge(true))
            .delay(Duration::from_millis(40))
            .build()
            .unwrap();
        let search = layer.shared().policy.tools.get("search").copied().unwrap();
        assert_eq!(search.delay, Duration::from_millis(40));
        assert_eq!(search.safe_to_hedge, Some(true));
    }
}
