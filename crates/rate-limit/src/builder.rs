//! [`RateLimitBuilder`] and [`Mode`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use toolwarden_core::overrides::{Overridable, ToolOverrides};
use toolwarden_core::{Bounds, ConfigError, Events, KeyBy};

use crate::backend::RateLimitBackend;
use crate::layer::{Config, RateLimitLayer};
use crate::limits::RateLimits;
use crate::quota::{Quota, Rate};

/// The default `per_tool` rate, used when no quota at all is configured
/// (no `global`, no `per_tool`, no `tool` override): 50 calls per second.
pub const DEFAULT_PER_TOOL_RATE: Rate = Rate::per_second(50);

/// The default `per_tool` burst, used with [`DEFAULT_PER_TOOL_RATE`].
pub const DEFAULT_PER_TOOL_BURST: u32 = 100;

/// The longest idle timeout of the per-key state (longer ones, given or
/// raised, are lowered to it): the keyed state counts idle time in
/// milliseconds in a `u64`, and two centuries is "never" for any process.
pub(crate) const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(200 * 365 * 24 * 60 * 60);

/// What the layer does with a call that is over its quota.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Mode {
    /// Refuse at once with [`RateLimited`](toolwarden_core::RateLimited),
    /// whose `retry_after` is governor's earliest time a call would be
    /// admitted. The default.
    #[default]
    Reject,
    /// Wait in the response future until the call is admitted, or refuse
    /// with `RateLimited` at once when that would be later than `max_wait`
    /// after the call.
    ///
    /// A call over quota reserves its own place in each quota's GCRA
    /// schedule (the next free emission slot, after the calls already
    /// waiting), so waiters are admitted one per emission interval in the
    /// order they came, none refused while its place fits in `max_wait`,
    /// and none woken just to find its token taken. While it waits it holds
    /// no readiness of the inner service: it drives a clone of the inner
    /// service to readiness only once its place is due (see
    /// [`RateLimit`](crate::RateLimit)), so a `Buffer` slot or a
    /// `ConcurrencyLimit` permit below stays free for calls to other tools.
    /// Dropping a waiting call gives its place back.
    ///
    /// With a [backend](RateLimitBuilder::backend), the backend keeps the
    /// schedule: a refused call sleeps its `retry_after` and asks the
    /// backend again, so a call takes at most `max_wait` plus one backend
    /// answer (and readiness is taken only once admitted, as above).
    Wait {
        /// The longest a call may wait for its token. Must be positive; any
        /// larger value is accepted (`Duration::MAX`: wait as long as it
        /// takes; the wait for the inner service's readiness afterwards is
        /// not bounded by this).
        max_wait: Duration,
    },
}

/// The knobs, as set so far (a tool's builder starts from the outer
/// builder's final values).
#[derive(Debug, Clone, Default)]
struct Knobs {
    global: Option<(Rate, u32)>,
    per_tool: Option<(Rate, u32)>,
    key_by: KeyBy,
    mode: Mode,
    bounds: Bounds,
    all_methods: bool,
    events: Events,
    backend: Option<Arc<dyn RateLimitBackend>>,
}

/// Builds a [`RateLimitLayer`]; see each knob for its default.
///
/// With no quota set at all (no `global`, no `per_tool` and no
/// [`tool`](Self::tool) override), every tool gets the default `per_tool`
/// quota:
/// [`DEFAULT_PER_TOOL_RATE`] (50 calls/s), burst [`DEFAULT_PER_TOOL_BURST`]
/// (100). That is [`RateLimitLayer::new`].
///
/// ```
/// use std::time::Duration;
/// use toolwarden_core::KeyBy;
/// use toolwarden_rate_limit::{Mode, Rate, RateLimitLayer};
///
/// let layer = RateLimitLayer::builder()
///     .global(Rate::per_second(50), 100)
///     .per_tool(Rate::per_second(5), 10)
///     .tool("send_email", |b| b.per_tool(Rate::per_minute(6), 1))
///     .key_by(KeyBy::SessionTool)
///     .mode(Mode::Wait { max_wait: Duration::from_secs(2) })
///     .build()
///     .unwrap();
/// # let _ = layer;
///
/// let err = RateLimitLayer::builder().per_tool(Rate::per_second(0), 1).build().unwrap_err();
/// assert_eq!(err.field(), "per_tool.rate");
/// ```
#[derive(Debug, Default)]
pub struct RateLimitBuilder {
    knobs: Knobs,
    tools: ToolOverrides<RateLimitBuilder>,
}

impl Overridable for RateLimitBuilder {
    fn overrides(&mut self) -> &mut ToolOverrides<Self> {
        &mut self.tools
    }
}

impl RateLimitBuilder {
    /// One quota over every limited call, whatever its tool or session:
    /// `rate` sustained, `burst` at once. Default: none (no global limit).
    /// Refusals name the key `global`. Layer-wide: not in a
    /// [`tool`](Self::tool) closure.
    ///
    /// For this and every other quota, `build` refuses (naming
    /// `<quota>.rate` or `<quota>.burst`) what [`Quota::new`] refuses: a
    /// rate of zero calls, a period of zero, more than one call per
    /// nanosecond, a burst of zero, and a rate whose burst would take more
    /// than 100 years to refill.
    #[must_use]
    pub fn global(mut self, rate: Rate, burst: u32) -> Self {
        self.tools.layer_wide("global");
        self.knobs.global = Some((rate, burst));
        self
    }

    /// The quota of each key (see [`key_by`](Self::key_by)); in a
    /// [`tool`](Self::tool) closure, the quota of that tool's keys. Default:
    /// [`DEFAULT_PER_TOOL_RATE`] (50 calls/s), burst
    /// [`DEFAULT_PER_TOOL_BURST`] (100), when neither `global` nor any
    /// `tool` override is set; otherwise none (tools without a quota of
    /// their own are then limited only by the global quota).
    #[must_use]
    pub fn per_tool(mut self, rate: Rate, burst: u32) -> Self {
        self.knobs.per_tool = Some((rate, burst));
        self
    }

    /// Settings of one tool (by name; with
    /// [`limit_all_methods`](Self::limit_all_methods), a method name also
    /// works): `configure` gets a builder carrying this builder's final
    /// values and may change [`per_tool`](Self::per_tool), the quota of that
    /// tool, replacing the `per_tool` quota for it. Every other knob is
    /// layer-wide: `build` refuses it in a closure (`tools."<tool>".<knob>`).
    /// Default: no overrides. Several closures for one tool apply in order.
    /// Needs a key that contains the tool: [`KeyBy::Tool`] or
    /// [`KeyBy::SessionTool`].
    ///
    /// ```
    /// use toolwarden_rate_limit::{Rate, RateLimitLayer};
    ///
    /// let layer = RateLimitLayer::builder()
    ///     .per_tool(Rate::per_second(10), 10)
    ///     .tool("send_email", |b| b.per_tool(Rate::per_minute(1), 1))
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(layer.tool_quota("send_email").unwrap().burst(), 1);
    /// assert_eq!(layer.tool_quota("search").unwrap().burst(), 10);
    ///
    /// let err = RateLimitLayer::builder()
    ///     .tool("send_email", |b| b.per_tool(Rate::per_minute(0), 1))
    ///     .build()
    ///     .unwrap_err();
    /// assert_eq!(err.field(), r#"tools."send_email".per_tool.rate"#);
    /// ```
    #[must_use]
    pub fn tool(
        mut self,
        tool: impl Into<String>,
        configure: impl FnOnce(RateLimitBuilder) -> RateLimitBuilder + Send + 'static,
    ) -> Self {
        self.tools.push(tool, configure);
        self
    }

    /// What the per-tool quotas are kept per. Default: [`KeyBy::Tool`] (one
    /// quota per tool for all sessions); [`KeyBy::SessionTool`] gives each
    /// session its own quota per tool. [`KeyBy::Server`] and
    /// [`KeyBy::Custom`] work with `per_tool` but not with `tool` overrides.
    /// Layer-wide.
    #[must_use]
    pub fn key_by(mut self, key_by: KeyBy) -> Self {
        self.tools.layer_wide("key_by");
        self.knobs.key_by = key_by;
        self
    }

    /// Reject at once or wait up to a bound. Default: [`Mode::Reject`].
    /// Layer-wide.
    #[must_use]
    pub fn mode(mut self, mode: Mode) -> Self {
        self.tools.layer_wide("mode");
        self.knobs.mode = mode;
        self
    }

    /// Bounds of the per-key state. Default: [`Bounds::default`] (10 000
    /// keys, 10 minutes idle). Keys past `max_keys` share one overflow
    /// quota (the `per_tool` quota, or for an overridden tool one quota per
    /// override), so the bound can only make limits stricter. `idle_timeout`
    /// is raised, when shorter, to the longest time a per-tool quota takes
    /// to refill its burst (plus `max_wait` in [`Mode::Wait`], for the
    /// places waiting calls reserve): evicting a key then only forgets a
    /// full quota, never one that is still spent. Must be positive; any
    /// longer value is accepted, and one past 200 years (given or raised)
    /// is lowered to 200 years. Layer-wide.
    #[must_use]
    pub fn bounds(mut self, bounds: Bounds) -> Self {
        self.tools.layer_wide("bounds");
        self.knobs.bounds = bounds;
        self
    }

    /// Whether requests other than `tools/call` (`tools/list`, `resources/read`,
    /// ...) are limited too, keyed by their method. Default: `false`: only
    /// tool calls take a token, so a client can always initialize, list
    /// tools and ping. Layer-wide.
    #[must_use]
    pub fn limit_all_methods(mut self, all: bool) -> Self {
        self.tools.layer_wide("limit_all_methods");
        self.knobs.all_methods = all;
        self
    }

    /// Where [`Event::RateLimited`](toolwarden_core::Event::RateLimited) is
    /// reported for each refusal. Default: no sinks. Layer-wide.
    #[must_use]
    pub fn events(mut self, events: Events) -> Self {
        self.tools.layer_wide("events");
        self.knobs.events = events;
        self
    }

    /// Where the tokens are taken. Default: none, the quotas live in this
    /// process (no allocation and no `.await` per call). With a backend, for
    /// example `toolwarden_redis::RedisRateLimiter` to share the quotas
    /// between replicas, each limited call asks the backend in its response
    /// future before the inner call, with the same keys and quotas (global,
    /// per tool, overrides), and is refused with the same
    /// [`RateLimited`](toolwarden_core::RateLimited). The in-process quotas
    /// still decide when the backend answers
    /// [`DecideLocally`](crate::BackendDecision::DecideLocally).
    /// See [`RateLimitBackend`] for the details and the contract.
    /// Layer-wide.
    #[must_use]
    pub fn backend(mut self, backend: impl RateLimitBackend) -> Self {
        self.tools.layer_wide("backend");
        self.knobs.backend = Some(Arc::new(backend));
        self
    }

    /// Validates the configuration; the error names the bad field
    /// (`global.rate`, `per_tool.burst`, `tools."<tool>".per_tool.rate`,
    /// `mode.max_wait`, `bounds.max_keys`, ...).
    pub fn build(mut self) -> Result<RateLimitLayer, ConfigError> {
        let tools = std::mem::take(&mut self.tools);
        let mut knobs = self.knobs;
        if knobs.global.is_none() && knobs.per_tool.is_none() && tools.is_empty() {
            knobs.per_tool = Some((DEFAULT_PER_TOOL_RATE, DEFAULT_PER_TOOL_BURST));
        }
        let quota = |knob: Option<(Rate, u32)>, section: &str| {
            knob.map(|(rate, burst)| Quota::new(rate, burst).map_err(|e| e.in_section(section)))
                .transpose()
        };
        let global = quota(knobs.global, "global")?;
        let per_tool = quota(knobs.per_tool, "per_tool")?;
        let resolved = tools.resolve(
            || RateLimitBuilder {
                knobs: knobs.clone(),
                ..RateLimitBuilder::default()
            },
            |b| quota(b.knobs.per_tool, "per_tool"),
        )?;
        // A tool left without a quota (none set anywhere) has no override.
        let tools: HashMap<Arc<str>, Quota> = resolved
            .into_iter()
            .filter_map(|(tool, quota)| Some((Arc::from(tool), quota?)))
            .collect();
        if global.is_none() && per_tool.is_none() && tools.is_empty() {
            return Err(ConfigError::new(
                "global, per_tool, tools",
                "no quota configured: set at least one",
            ));
        }
        if !tools.is_empty() && !matches!(knobs.key_by, KeyBy::Tool | KeyBy::SessionTool) {
            return Err(ConfigError::new(
                "key_by, tools",
                "tool overrides need a key that contains the tool (KeyBy::Tool or KeyBy::SessionTool)",
            ));
        }
        if let Mode::Wait { max_wait } = knobs.mode {
            if max_wait.is_zero() {
                return Err(ConfigError::new(
                    "mode.max_wait",
                    "must be positive (use Mode::Reject to refuse at once)",
                ));
            }
        }
        knobs
            .bounds
            .validate()
            .map_err(|e| e.in_section("bounds"))?;
        let longest_refill = per_tool
            .iter()
            .chain(tools.values())
            .map(Quota::refill_time)
            .max()
            .unwrap_or(Duration::ZERO);
        // A waiting call may have reserved a place up to `max_wait` past a
        // full refill: its key must outlive that too.
        let longest_spent = match knobs.mode {
            Mode::Reject => longest_refill,
            Mode::Wait { max_wait } => longest_refill.saturating_add(max_wait),
        };
        let bounds = Bounds {
            idle_timeout: knobs
                .bounds
                .idle_timeout
                .map(|idle| idle.max(longest_spent).min(MAX_IDLE_TIMEOUT)),
            ..knobs.bounds
        };
        let config = Arc::new(Config {
            global,
            per_tool,
            tools,
            key_by: knobs.key_by,
            mode: knobs.mode,
            bounds,
            all_methods: knobs.all_methods,
            events: knobs.events,
            backend: knobs.backend,
        });
        Ok(RateLimitLayer::from_limits(RateLimits::new(config)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(builder: RateLimitBuilder) -> String {
        builder.build().unwrap_err().field().to_owned()
    }

    #[test]
    fn bad_quotas_are_refused_naming_the_field() {
        let b = RateLimitLayer::builder;
        assert_eq!(field(b().global(Rate::per_second(0), 5)), "global.rate");
        assert_eq!(field(b().global(Rate::per_second(5), 0)), "global.burst");
        assert_eq!(
            field(b().per_tool(Rate::new(1, Duration::ZERO), 1)),
            "per_tool.rate"
        );
        assert_eq!(
            field(b().per_tool(Rate::per_second(1), 0)),
            "per_tool.burst"
        );
        assert_eq!(
            field(b().tool("search", |b| b.per_tool(Rate::per_minute(0), 1))),
            r#"tools."search".per_tool.rate"#
        );
        assert_eq!(
            field(b().tool("search", |b| b.per_tool(Rate::per_minute(1), 0))),
            r#"tools."search".per_tool.burst"#
        );
        assert_eq!(
            field(b().tool("", |b| b.per_tool(Rate::per_minute(1), 1))),
            "tools"
        );
        // Faster than one call per nanosecond.
        assert_eq!(
            field(b().per_tool(Rate::new(2, Duration::from_nanos(1)), 1)),
            "per_tool.rate"
        );
        // Refill time past governor's arithmetic.
        assert_eq!(
            field(b().global(Rate::per_hour(1), u32::MAX)),
            "global.rate"
        );
        assert_eq!(
            field(b().global(Rate::new(1, Duration::MAX), 1)),
            "global.rate"
        );
    }

    #[test]
    fn other_bad_settings_are_refused_naming_the_field() {
        let b = || RateLimitLayer::builder().per_tool(Rate::per_second(1), 1);
        // Overrides that leave every tool without a quota.
        assert_eq!(
            field(RateLimitLayer::builder().tool("x", |b| b)),
            "global, per_tool, tools"
        );
        assert_eq!(
            field(b().mode(Mode::Wait {
                max_wait: Duration::ZERO
            })),
            "mode.max_wait"
        );
        assert_eq!(field(b().bounds(Bounds::max_keys(0))), "bounds.max_keys");
        assert_eq!(
            field(b().bounds(Bounds::default().idle_timeout(Some(Duration::ZERO)))),
            "bounds.idle_timeout"
        );
        let overrides_by_server = b()
            .tool("x", |b| b.per_tool(Rate::per_second(1), 1))
            .key_by(KeyBy::Server);
        assert_eq!(field(overrides_by_server), "key_by, tools");
        // Server and custom keys are fine without overrides.
        assert!(b().key_by(KeyBy::Server).build().is_ok());
        assert!(b()
            .key_by(KeyBy::custom(|_| "tenant".into()))
            .build()
            .is_ok());
        // Layer-wide knobs cannot be set for one tool.
        assert_eq!(
            field(b().tool("x", |b| b.global(Rate::per_second(1), 1))),
            r#"tools."x".global"#
        );
        assert_eq!(
            field(b().tool("x", |b| b.mode(Mode::Reject))),
            r#"tools."x".mode"#
        );
    }

    #[test]
    fn quotas_overrides_and_defaults() {
        let layer = RateLimitLayer::builder()
            .per_tool(Rate::per_second(4), 8)
            .tool("slow", |b| b.per_tool(Rate::per_minute(1), 1))
            .tool("slow", |b| b.per_tool(Rate::per_minute(2), 3))
            .build()
            .unwrap();
        assert_eq!(layer.mode(), Mode::Reject);
        assert_eq!(layer.global_quota(), None);
        let quota = layer.tool_quota("search").unwrap();
        assert_eq!(quota.interval(), Duration::from_millis(250));
        assert_eq!(quota.burst(), 8);
        // The closures of one tool apply in order: the last quota wins.
        let slow = layer.tool_quota("slow").unwrap();
        assert_eq!(slow.interval(), Duration::from_secs(30));
        assert_eq!(slow.burst(), 3);
        assert_eq!(layer.bounds(), Bounds::default());
        // A tool's builder starts from the outer builder's final values,
        // whatever the order of the calls.
        let layer = RateLimitLayer::builder()
            .tool("same", |b| b)
            .per_tool(Rate::per_second(4), 8)
            .build()
            .unwrap();
        assert_eq!(layer.tool_quota("same"), layer.tool_quota("other"));
    }

    #[test]
    fn with_no_quota_every_tool_gets_the_default_one() {
        let layer = RateLimitLayer::new();
        let default = Quota::new(DEFAULT_PER_TOOL_RATE, DEFAULT_PER_TOOL_BURST).unwrap();
        assert_eq!(layer.tool_quota("search"), Some(default));
        assert_eq!(layer.global_quota(), None);
        assert_eq!(
            RateLimitLayer::builder().build().unwrap().tool_quota("x"),
            Some(default)
        );
        // Any quota set replaces the default.
        let global_only = RateLimitLayer::builder()
            .global(Rate::per_second(1), 1)
            .build()
            .unwrap();
        assert_eq!(global_only.tool_quota("search"), None);
    }

    #[test]
    fn idle_timeout_is_raised_to_the_longest_refill() {
        let layer = RateLimitLayer::builder()
            .per_tool(Rate::per_second(1), 10)
            .tool("report", |b| b.per_tool(Rate::per_hour(2), 2))
            .bounds(Bounds::max_keys(5).idle_timeout(Some(Duration::from_secs(60))))
            .build()
            .unwrap();
        assert_eq!(layer.bounds().idle_timeout, Some(Duration::from_secs(3600)));
        assert_eq!(layer.bounds().max_keys, 5);
        // Never-evict stays never-evict.
        let layer = RateLimitLayer::builder()
            .per_tool(Rate::per_hour(1), 1)
            .bounds(Bounds::max_keys(5).idle_timeout(None))
            .build()
            .unwrap();
        assert_eq!(layer.bounds().idle_timeout, None);
        // Waiting calls reserve places up to max_wait ahead; an idle timeout
        // past 200 years is lowered to it.
        let layer = RateLimitLayer::builder()
            .per_tool(Rate::per_hour(2), 2)
            .mode(Mode::Wait {
                max_wait: Duration::from_secs(30),
            })
            .build()
            .unwrap();
        assert_eq!(layer.bounds().idle_timeout, Some(Duration::from_secs(3630)));
        let layer = RateLimitLayer::builder()
            .per_tool(Rate::per_hour(2), 2)
            .bounds(Bounds::default().idle_timeout(Some(Duration::MAX)))
            .build()
            .unwrap();
        assert_eq!(layer.bounds().idle_timeout, Some(MAX_IDLE_TIMEOUT));
    }
}
