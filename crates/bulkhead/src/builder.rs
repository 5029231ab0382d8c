//! [`BulkheadBuilder`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use toolwarden_core::overrides::{Overridable, ToolOverrides};
use toolwarden_core::{Bounds, ConfigError, Events, KeyBy, McpClassifier};

use crate::adaptive::AdaptiveLimit;
use crate::layer::BulkheadLayer;
use crate::state::{Limits, Shared};

/// The default cap of calls in flight per key: 10.
pub const DEFAULT_MAX_CONCURRENT: u32 = 10;

/// The default wait for a place: none, a call over the cap is refused at
/// once (as the rate limit's default `Mode::Reject`): its refusal carries
/// a `retry_after`, which the retry layer above honours.
pub const DEFAULT_MAX_WAIT: Duration = Duration::ZERO;

/// The largest cap accepted (far beyond any real server's concurrency).
pub const MAX_MAX_CONCURRENT: u32 = 1 << 24;

#[derive(Debug, Clone)]
struct Knobs {
    max_concurrent: u32,
    max_wait: Duration,
    adaptive: Option<AdaptiveLimit>,
    key_by: KeyBy,
    bounds: Bounds,
    events: Events,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            max_concurrent: DEFAULT_MAX_CONCURRENT,
            max_wait: DEFAULT_MAX_WAIT,
            adaptive: None,
            key_by: KeyBy::Tool,
            bounds: Bounds::default(),
            events: Events::new(),
        }
    }
}

/// Builds a [`BulkheadLayer`]; see each knob for its default.
///
/// ```
/// use std::time::Duration;
/// use toolwarden_bulkhead::BulkheadLayer;
///
/// let layer = BulkheadLayer::builder()
///     .max_concurrent(8)
///     .max_wait(Duration::from_millis(50))
///     .tool("render_pdf", |b| b.max_concurrent(2))
///     .build()
///     .unwrap();
/// assert_eq!(layer.max_concurrent("render_pdf"), 2);
/// assert_eq!(layer.max_concurrent("search"), 8);
///
/// let err = BulkheadLayer::builder().tool("x", |b| b.max_concurrent(0)).build().unwrap_err();
/// assert_eq!(err.field(), r#"tools."x".max_concurrent"#);
/// ```
#[derive(Debug)]
pub struct BulkheadBuilder<C = McpClassifier> {
    knobs: Knobs,
    classifier: C,
    tools: ToolOverrides<BulkheadBuilder>,
}

impl Default for BulkheadBuilder {
    fn default() -> Self {
        BulkheadBuilder {
            knobs: Knobs::default(),
            classifier: McpClassifier::new(),
            tools: ToolOverrides::new(),
        }
    }
}

impl Overridable for BulkheadBuilder {
    fn overrides(&mut self) -> &mut ToolOverrides<Self> {
        &mut self.tools
    }
}

impl<C> BulkheadBuilder<C> {
    /// The most calls of one key (see [`key_by`](Self::key_by)) in flight
    /// at once; in a [`tool`](Self::tool) closure, that tool's cap.
    /// Default [`DEFAULT_MAX_CONCURRENT`] (10). Between 1 and
    /// [`MAX_MAX_CONCURRENT`]. With an [`adaptive`](Self::adaptive) cap,
    /// its ceiling.
    #[must_use]
    pub fn max_concurrent(mut self, max_concurrent: u32) -> Self {
        self.knobs.max_concurrent = max_concurrent;
        self
    }

    /// How long a call over the cap waits for a place before it is refused
    /// with [`BulkheadFull`](toolwarden_core::BulkheadFull); in a
    /// [`tool`](Self::tool) closure, that tool's wait. Default
    /// [`DEFAULT_MAX_WAIT`] (zero: refused at once). Waiting calls get
    /// places in the order they came, and hold no readiness of the inner
    /// service while they wait. Any value is accepted (`Duration::MAX`:
    /// wait as long as it takes).
    #[must_use]
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.knobs.max_wait = max_wait;
        self
    }

    /// Makes the cap adaptive (AIMD, see the [crate docs](crate#adaptive-cap)):
    /// between [`AdaptiveLimit::min_concurrent`] and
    /// [`max_concurrent`](Self::max_concurrent), growing while calls
    /// succeed within [`AdaptiveLimit::latency_threshold`] and cut when
    /// they fail or are slow. `configure` gets the knobs set so far (by an
    /// earlier call, or in a [`tool`](Self::tool) closure the layer's),
    /// else [`AdaptiveLimit::new`]; `latency_threshold` must be set.
    /// Default: off, the cap is `max_concurrent`, fixed.
    ///
    /// ```
    /// use std::time::Duration;
    /// use toolwarden_bulkhead::BulkheadLayer;
    ///
    /// let layer = BulkheadLayer::builder()
    ///     .max_concurrent(32)
    ///     .adaptive(|a| a.latency_threshold(Duration::from_secs(2)).min_concurrent(4))
    ///     .tool("render_pdf", |b| b.max_concurrent(8).adaptive(|a| a.min_concurrent(1)))
    ///     .build()
    ///     .unwrap();
    /// assert!(layer.is_adaptive("render_pdf"));
    /// let err = BulkheadLayer::builder()
    ///     .adaptive(|a| a.latency_threshold(Duration::from_secs(2)).min_concurrent(4))
    ///     .tool("render_pdf", |b| b.max_concurrent(2))
    ///     .build()
    ///     .unwrap_err();
    /// assert_eq!(err.field(), r#"tools."render_pdf".adaptive.min_concurrent"#);
    /// ```
    #[must_use]
    pub fn adaptive(mut self, configure: impl FnOnce(AdaptiveLimit) -> AdaptiveLimit) -> Self {
        self.knobs.adaptive = Some(configure(self.knobs.adaptive.unwrap_or_default()));
        self
    }

    /// Settings of one tool: `configure` gets a builder carrying this
    /// builder's final values and may change
    /// [`max_concurrent`](Self::max_concurrent),
    /// [`max_wait`](Self::max_wait) and [`adaptive`](Self::adaptive) for
    /// that tool. Every other knob is
    /// layer-wide (`build` refuses it in a closure, naming
    /// `tools."<tool>".<knob>`). Default: no overrides. Needs a key that
    /// contains the tool ([`KeyBy::Tool`] or [`KeyBy::SessionTool`]).
    #[must_use]
    pub fn tool(
        mut self,
        tool: impl Into<String>,
        configure: impl FnOnce(BulkheadBuilder) -> BulkheadBuilder + Send + 'static,
    ) -> Self {
        self.tools.push(tool, configure);
        self
    }

    /// What the cap is kept per. Default [`KeyBy::Tool`] (one cap per
    /// tool); [`KeyBy::Server`] is one cap for every tool call (a global
    /// cap); per upstream, key by the catalog's upstream of the tool with
    /// [`KeyBy::custom`]. Layer-wide.
    #[must_use]
    pub fn key_by(mut self, key_by: KeyBy) -> Self {
        self.tools.layer_wide("key_by");
        self.knobs.key_by = key_by;
        self
    }

    /// Bounds of the per-key state. Default [`Bounds::default`] (10 000
    /// keys, 10 minutes idle). Keys past `max_keys` share one overflow cap
    /// (the default cap, or one per overridden tool), so the bound can only
    /// make the caps stricter. A key with calls in flight or waiting is
    /// never evicted as idle, however long its calls take. Layer-wide.
    #[must_use]
    pub fn bounds(mut self, bounds: Bounds) -> Self {
        self.tools.layer_wide("bounds");
        self.knobs.bounds = bounds;
        self
    }

    /// Where [`Event::BulkheadFull`](toolwarden_core::Event::BulkheadFull)
    /// is reported for each refusal. Default: no sinks. Layer-wide.
    #[must_use]
    pub fn events(mut self, events: Events) -> Self {
        self.tools.layer_wide("events");
        self.knobs.events = events;
        self
    }

    /// The classifier that judges how the calls of an adaptive key ended
    /// (see [`adaptive`](Self::adaptive)); share the stack's. Unused with a
    /// fixed cap. Default [`McpClassifier`]. Layer-wide.
    #[must_use]
    pub fn classifier<C2>(mut self, classifier: C2) -> BulkheadBuilder<C2> {
        self.tools.layer_wide("classifier");
        BulkheadBuilder {
            knobs: self.knobs,
            classifier,
            tools: self.tools,
        }
    }

    /// Validates the configuration; the error names the bad field
    /// (`max_concurrent`, `tools."<tool>".max_concurrent`, `key_by, tools`,
    /// `bounds.max_keys`, `adaptive.min_concurrent`, ...).
    pub fn build(mut self) -> Result<BulkheadLayer<C>, ConfigError> {
        let tools = std::mem::take(&mut self.tools);
        let knobs = self.knobs;
        let limits = |knobs: &Knobs| -> Result<Limits, ConfigError> {
            if knobs.max_concurrent == 0 || knobs.max_concurrent > MAX_MAX_CONCURRENT {
                return Err(ConfigError::new(
                    "max_concurrent",
                    format!("must be between 1 and {MAX_MAX_CONCURRENT}"),
                ));
            }
            let adaptive = match &knobs.adaptive {
                None => None,
                Some(adaptive) => Some(
                    adaptive
                        .validate(knobs.max_concurrent)
                        .map_err(|e| e.in_section("adaptive"))?,
                ),
            };
            Ok(Limits {
                max_concurrent: knobs.max_concurrent,
                max_wait: knobs.max_wait,
                adaptive,
            })
        };
        let default = limits(&knobs)?;
        let resolved = tools.resolve(
            || BulkheadBuilder {
                knobs: knobs.clone(),
                ..BulkheadBuilder::default()
            },
            |b| limits(&b.knobs),
        )?;
        let tools: HashMap<Arc<str>, Limits> = resolved
            .into_iter()
            .map(|(tool, limits)| (Arc::from(tool), limits))
            .collect();
        if !tools.is_empty() && !matches!(knobs.key_by, KeyBy::Tool | KeyBy::SessionTool) {
            return Err(ConfigError::new(
                "key_by, tools",
                "tool overrides need a key that contains the tool (KeyBy::Tool or KeyBy::SessionTool)",
            ));
        }
        knobs
            .bounds
            .validate()
            .map_err(|e| e.in_section("bounds"))?;
        Ok(BulkheadLayer::from_shared(
            Shared::new(knobs.key_by, default, tools, knobs.bounds, knobs.events),
            self.classifier,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(builder: BulkheadBuilder) -> String {
        builder.build().unwrap_err().field().to_owned()
    }

    #[test]
    fn bad_settings_are_refused_naming_the_field() {
        let b = BulkheadLayer::builder;
        assert_eq!(field(b().max_concurrent(0)), "max_concurrent");
        assert_eq!(
            field(b().max_concurrent(MAX_MAX_CONCURRENT + 1)),
            "max_concurrent"
        );
        assert_eq!(
            field(b().tool("a.b", |b| b.max_concurrent(0))),
            r#"tools."a.b".max_concurrent"#
        );
        assert_eq!(
            field(b().tool("x", |b| b.key_by(KeyBy::Server))),
            r#"tools."x".key_by"#
        );
        assert_eq!(
            field(b().tool("x", |b| b.bounds(Bounds::default()))),
            r#"tools."x".bounds"#
        );
        assert_eq!(
            field(b().tool("x", |b| b.max_concurrent(2)).key_by(KeyBy::Server)),
            "key_by, tools"
        );
        assert_eq!(field(b().bounds(Bounds::max_keys(0))), "bounds.max_keys");
        assert_eq!(field(b().tool("", |b| b)), "tools");
    }

    #[test]
    fn defaults_and_overrides() {
        let layer = BulkheadLayer::new();
        assert_eq!(layer.max_concurrent("any"), DEFAULT_MAX_CONCURRENT);
        assert_eq!(layer.max_wait("any"), DEFAULT_MAX_WAIT);
        assert_eq!(layer.bounds(), Bounds::default());
        let layer = BulkheadLayer::builder()
            .tool("slow", |b| {
                b.max_concurrent(2).max_wait(Duration::from_secs(1))
            })
            .max_concurrent(4)
            .tool("slow", |b| b.max_concurrent(3))
            .build()
            .unwrap();
        assert_eq!(layer.max_concurrent("slow"), 3);
        assert_eq!(layer.max_wait("slow"), Duration::from_secs(1));
        assert_eq!(layer.max_concurrent("fast"), 4);
        assert_eq!(layer.max_wait("fast"), Duration::ZERO);
    }
}
