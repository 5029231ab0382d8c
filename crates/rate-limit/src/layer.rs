//! [`RateLimitLayer`] and its configuration: [`RateLimitBuilder`], [`Rate`], [`Mode`].

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::Quota;
use toolwarden_core::{Bounds, ConfigError, Events, KeyBy};
use tower_layer::Layer;

use crate::backend::RateLimitBackend;
use crate::limits::RateLimits;
use crate::service::RateLimit;

/// The longest time a quota may take to refill its whole burst. Governor
/// keeps time in `u64` nanoseconds (about 584 years); this leaves ample room.
const MAX_REFILL: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// The longest idle timeout of the per-key state (longer ones, given or
/// raised, are lowered to it): the keyed state counts idle time in
/// milliseconds in a `u64`, and two centuries is "never" for any process.
const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(200 * 365 * 24 * 60 * 60);

/// A sustained rate: `count` calls per `per`.
///
/// The quota refills one call every `per / count` (GCRA's emission interval,
/// rounded down to the nanosecond); the burst says how many calls may be made
/// at once after a quiet period.
///
/// ```
/// use std::time::Duration;
/// use toolwarden_rate_limit::Rate;
/// assert_eq!(Rate::per_second(4).interval(), Duration::from_millis(250));
/// assert_eq!(Rate::new(3, Duration::from_secs(30)).interval(), Duration::from_secs(10));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    count: u32,
    per: Duration,
}

impl Rate {
    /// `count` calls per `per`.
    #[must_use]
    pub const fn new(count: u32, per: Duration) -> Self {
        Rate { count, per }
    }

    /// `count` calls per second.
    #[must_use]
    pub const fn per_second(count: u32) -> Self {
        Rate::new(count, Duration::from_secs(1))
    }

    /// `count` calls per minute.
    #[must_use]
    pub const fn per_minute(count: u32) -> Self {
        Rate::new(count, Duration::from_secs(60))
    }

    /// `count` calls per hour.
    #[must_use]
    pub const fn per_hour(count: u32) -> Self {
        Rate::new(count, Duration::from_secs(60 * 60))
    }

    /// The number of calls per period.
    #[must_use]
    pub const fn count(&self) -> u32 {
        self.count
    }

    /// The period.
    #[must_use]
    pub const fn per(&self) -> Duration {
        self.per
    }

    /// The time to refill one call: `per / count` (zero when `count` is zero).
    #[must_use]
    pub fn interval(&self) -> Duration {
        self.per.checked_div(self.count).unwrap_or(Duration::ZERO)
    }

    /// The governor quota of this rate with `burst`, validated; errors name
    /// `{section}.rate` or `{section}.burst`.
    fn quota(self, section: &str, burst: u32) -> Result<Quota, ConfigError> {
        let field = |name: &str| format!("{section}.{name}");
        if self.count == 0 {
            return Err(ConfigError::new(
                field("rate"),
                "must allow at least one call per period",
            ));
        }
        let Some(quota) = Quota::with_period(self.interval()) else {
            return Err(ConfigError::new(
                field("rate"),
                "must be positive and at most one call per nanosecond",
            ));
        };
        let Some(burst) = NonZeroU32::new(burst) else {
            return Err(ConfigError::new(field("burst"), "must be at least 1"));
        };
        if self.interval().as_nanos() * u128::from(burst.get()) > MAX_REFILL.as_nanos() {
            return Err(ConfigError::new(
                field("rate"),
                "with this burst would take more than 100 years to refill",
            ));
        }
        Ok(quota.allow_burst(burst))
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} per {:?}", self.count, self.per)
    }
}

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
    /// [`RateLimit`]), so a `Buffer` slot or a
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

/// Builds a [`RateLimitLayer`]; see each knob for its default.
///
/// At least one quota (`global`, `per_tool` or a `tool` override) must be set.
///
/// ```
/// use std::time::Duration;
/// use toolwarden_core::KeyBy;
/// use toolwarden_rate_limit::{Mode, Rate, RateLimitLayer};
///
/// let layer = RateLimitLayer::builder()
///     .global(Rate::per_second(50), 100)
///     .per_tool(Rate::per_second(5), 10)
///     .tool("send_email", Rate::per_minute(6), 1)
///     .key_by(KeyBy::SessionTool)
///     .mode(Mode::Wait { max_wait: Duration::from_secs(2) })
///     .build()
///     .unwrap();
/// # let _ = layer;
///
/// let err = RateLimitLayer::builder().per_tool(Rate::per_second(0), 1).build().unwrap_err();
/// assert_eq!(err.field(), "per_tool.rate");
/// ```
#[derive(Debug, Clone, Default)]
pub struct RateLimitBuilder {
    global: Option<(Rate, u32)>,
    per_tool: Option<(Rate, u32)>,
    tools: Vec<(String, Rate, u32)>,
    key_by: KeyBy,
    mode: Mode,
    bounds: Bounds,
    all_methods: bool,
    events: Events,
    backend: Option<Arc<dyn RateLimitBackend>>,
}

impl RateLimitBuilder {
    /// One quota over every limited call, whatever its tool or session:
    /// `rate` sustained, `burst` at once. Default: none (no global limit).
    /// Refusals name the key `global`.
    ///
    /// For this and every other quota, `build` refuses (naming
    /// `<quota>.rate` or `<quota>.burst`) a rate of zero calls, a period of
    /// zero, more than one call per nanosecond, a burst of zero, and a rate
    /// whose burst would take more than 100 years to refill (so a period of
    /// `Duration::MAX` is refused, never a panic).
    #[must_use]
    pub fn global(mut self, rate: Rate, burst: u32) -> Self {
        self.global = Some((rate, burst));
        self
    }

    /// The quota of each key (see [`key_by`](Self::key_by)) whose tool has no
    /// override. Default: none (tools without an override are limited only
    /// by the global quota).
    #[must_use]
    pub fn per_tool(mut self, rate: Rate, burst: u32) -> Self {
        self.per_tool = Some((rate, burst));
        self
    }

    /// The quota of one tool (by name; with [`limit_all_methods`](Self::limit_all_methods),
    /// a method name also works), replacing the `per_tool` quota for it.
    /// Default: no overrides. Setting the same name twice keeps the last.
    /// Needs a key that contains the tool: [`KeyBy::Tool`] or [`KeyBy::SessionTool`].
    #[must_use]
    pub fn tool(mut self, name: impl Into<String>, rate: Rate, burst: u32) -> Self {
        self.tools.push((name.into(), rate, burst));
        self
    }

    /// What the per-tool quotas are kept per. Default: [`KeyBy::Tool`] (one
    /// quota per tool for all sessions); [`KeyBy::SessionTool`] gives each
    /// session its own quota per tool. [`KeyBy::Server`] and
    /// [`KeyBy::Custom`] work with `per_tool` but not with `tool` overrides.
    #[must_use]
    pub fn key_by(mut self, key_by: KeyBy) -> Self {
        self.key_by = key_by;
        self
    }

    /// Reject at once or wait up to a bound. Default: [`Mode::Reject`].
    #[must_use]
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
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
    /// is lowered to 200 years.
    #[must_use]
    pub fn bounds(mut self, bounds: Bounds) -> Self {
        self.bounds = bounds;
        self
    }

    /// Whether requests other than `tools/call` (`tools/list`, `resources/read`,
    /// ...) are limited too, keyed by their method. Default: `false`: only
    /// tool calls take a token, so a client can always initialize, list
    /// tools and ping.
    #[must_use]
    pub fn limit_all_methods(mut self, all: bool) -> Self {
        self.all_methods = all;
        self
    }

    /// Where [`Event::RateLimited`](toolwarden_core::Event::RateLimited) is
    /// reported for each refusal. Default: no sinks.
    #[must_use]
    pub fn events(mut self, events: Events) -> Self {
        self.events = events;
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
    /// [`DecideLocally`](crate::backend::BackendDecision::DecideLocally).
    /// See [`backend`](crate::backend) for the details and the contract.
    #[must_use]
    pub fn backend(mut self, backend: impl RateLimitBackend) -> Self {
        self.backend = Some(Arc::new(backend));
        self
    }

    /// Validates the configuration; the error names the bad field
    /// (`global.rate`, `per_tool.burst`, `tool.<name>.rate`, `mode.max_wait`,
    /// `bounds.max_keys`, ...).
    pub fn build(self) -> Result<RateLimitLayer, ConfigError> {
        let global = self
            .global
            .map(|(rate, burst)| rate.quota("global", burst))
            .transpose()?;
        let per_tool = self
            .per_tool
            .map(|(rate, burst)| rate.quota("per_tool", burst))
            .transpose()?;
        let mut tools = HashMap::with_capacity(self.tools.len());
        for (name, rate, burst) in self.tools {
            if name.is_empty() {
                return Err(ConfigError::new("tool", "name must not be empty"));
            }
            let quota = rate.quota(&format!("tool.{name}"), burst)?;
            tools.insert(Arc::<str>::from(name), quota);
        }
        if global.is_none() && per_tool.is_none() && tools.is_empty() {
            return Err(ConfigError::new(
                "global, per_tool, tool",
                "no quota configured: set at least one",
            ));
        }
        if !tools.is_empty() && !matches!(self.key_by, KeyBy::Tool | KeyBy::SessionTool) {
            return Err(ConfigError::new(
                "key_by, tool",
                "tool overrides need a key that contains the tool (KeyBy::Tool or KeyBy::SessionTool)",
            ));
        }
        if let Mode::Wait { max_wait } = self.mode {
            if max_wait.is_zero() {
                return Err(ConfigError::new(
                    "mode.max_wait",
                    "must be positive (use Mode::Reject to refuse at once)",
                ));
            }
        }
        self.bounds.validate().map_err(|e| e.in_section("bounds"))?;
        let longest_refill = per_tool
            .iter()
            .chain(tools.values())
            .map(Quota::burst_size_replenished_in)
            .max()
            .unwrap_or(Duration::ZERO);
        // A waiting call may have reserved a place up to `max_wait` past a
        // full refill: its key must outlive that too.
        let longest_spent = match self.mode {
            Mode::Reject => longest_refill,
            Mode::Wait { max_wait } => longest_refill.saturating_add(max_wait),
        };
        let bounds = Bounds {
            idle_timeout: self
                .bounds
                .idle_timeout
                .map(|idle| idle.max(longest_spent).min(MAX_IDLE_TIMEOUT)),
            ..self.bounds
        };
        let config = Arc::new(Config {
            global,
            per_tool,
            tools,
            key_by: self.key_by,
            mode: self.mode,
            bounds,
            all_methods: self.all_methods,
            events: self.events,
            backend: self.backend,
        });
        Ok(RateLimitLayer {
            limits: RateLimits::new(config),
        })
    }
}

/// The validated configuration, shared by the layer's limits and every
/// service built from it.
#[derive(Debug)]
pub(crate) struct Config {
    pub(crate) global: Option<Quota>,
    pub(crate) per_tool: Option<Quota>,
    pub(crate) tools: HashMap<Arc<str>, Quota>,
    pub(crate) key_by: KeyBy,
    pub(crate) mode: Mode,
    pub(crate) bounds: Bounds,
    pub(crate) all_methods: bool,
    pub(crate) events: Events,
    pub(crate) backend: Option<Arc<dyn RateLimitBackend>>,
}

impl Config {
    /// The per-key quota of `tool`: its override, else the `per_tool` quota.
    pub(crate) fn tool_quota(&self, tool: &str) -> Option<Quota> {
        self.tools.get(tool).copied().or(self.per_tool)
    }
}

/// Applies governor GCRA quotas (global and per tool) to MCP calls; see the
/// [crate docs](crate).
///
/// The layer holds the configuration and one set of [`RateLimits`], created
/// by [`build`](RateLimitBuilder::build): every service it builds, every
/// clone of those services, and every service built from a clone of the
/// layer take their tokens from these same quotas (cloning the layer is one
/// reference-count increment). A server that builds one service per
/// connection from one layer therefore enforces one quota, not one per
/// connection (unlike tower's own `RateLimitLayer`, whose services each keep
/// their own budget; see tower#794). For independent quotas, build another
/// layer (the builder is `Clone`).
///
/// ```
/// use toolwarden_core::jsonrpc::Request;
/// use toolwarden_core::testing::MockMcp;
/// use toolwarden_rate_limit::{Rate, RateLimitLayer};
/// use tower::Layer;
///
/// let layer = RateLimitLayer::builder().per_tool(Rate::per_minute(1), 1).build().unwrap();
/// let (one, two) = (layer.layer(MockMcp::new()), layer.clone().layer(MockMcp::new()));
/// let call = Request::tool_call(1, "search", serde_json::json!({}));
/// assert!(one.limits().check(&call).is_ok());
/// assert!(two.limits().check(&call).is_err()); // the same quota
/// ```
#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    limits: RateLimits,
}

impl RateLimitLayer {
    /// A builder with the defaults documented on each knob.
    #[must_use]
    pub fn builder() -> RateLimitBuilder {
        RateLimitBuilder::default()
    }

    /// The limits every service built from this layer (or from its clones)
    /// applies; a handle to the same shared state, for checking requests
    /// without a service or for [`RateLimit::new`].
    #[must_use]
    pub fn limits(&self) -> RateLimits {
        self.limits.clone()
    }

    fn config(&self) -> &Config {
        self.limits.config()
    }

    /// The mode.
    #[must_use]
    pub fn mode(&self) -> Mode {
        self.config().mode
    }

    /// The bounds of the per-key state, with `idle_timeout` as raised by
    /// [`RateLimitBuilder::bounds`].
    #[must_use]
    pub fn bounds(&self) -> Bounds {
        self.config().bounds
    }

    /// The global quota, if any.
    #[must_use]
    pub fn global_quota(&self) -> Option<Quota> {
        self.config().global
    }

    /// The per-key quota of `tool` (its override, else the `per_tool` quota), if any.
    #[must_use]
    pub fn tool_quota(&self, tool: &str) -> Option<Quota> {
        self.config().tool_quota(tool)
    }

    /// The backend that takes the tokens, if one is set.
    #[must_use]
    pub fn backend(&self) -> Option<&Arc<dyn RateLimitBackend>> {
        self.config().backend.as_ref()
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit::new(inner, self.limits.clone())
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
            field(b().tool("search", Rate::per_minute(0), 1)),
            "tool.search.rate"
        );
        assert_eq!(
            field(b().tool("search", Rate::per_minute(1), 0)),
            "tool.search.burst"
        );
        assert_eq!(field(b().tool("", Rate::per_minute(1), 1)), "tool");
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
        assert_eq!(field(RateLimitLayer::builder()), "global, per_tool, tool");
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
        let overrides_by_server = b().tool("x", Rate::per_second(1), 1).key_by(KeyBy::Server);
        assert_eq!(field(overrides_by_server), "key_by, tool");
        // Server and custom keys are fine without overrides.
        assert!(b().key_by(KeyBy::Server).build().is_ok());
        assert!(b()
            .key_by(KeyBy::custom(|_| "tenant".into()))
            .build()
            .is_ok());
    }

    #[test]
    fn quotas_overrides_and_defaults() {
        let layer = RateLimitLayer::builder()
            .per_tool(Rate::per_second(4), 8)
            .tool("slow", Rate::per_minute(1), 1)
            .tool("slow", Rate::per_minute(2), 3)
            .build()
            .unwrap();
        assert_eq!(layer.mode(), Mode::Reject);
        assert_eq!(layer.global_quota(), None);
        let quota = layer.tool_quota("search").unwrap();
        assert_eq!(quota.replenish_interval(), Duration::from_millis(250));
        assert_eq!(quota.burst_size().get(), 8);
        // The last override of a name wins.
        let slow = layer.tool_quota("slow").unwrap();
        assert_eq!(slow.replenish_interval(), Duration::from_secs(30));
        assert_eq!(slow.burst_size().get(), 3);
        assert_eq!(layer.bounds(), Bounds::default());
    }

    #[test]
    fn idle_timeout_is_raised_to_the_longest_refill() {
        let layer = RateLimitLayer::builder()
            .per_tool(Rate::per_second(1), 10)
            .tool("report", Rate::per_hour(2), 2)
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
