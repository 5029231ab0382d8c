//! [`standard_stack`]: the umbrella crate's standard stack as the
//! configuration's layer sections and `[tools."name"]` describe it (see
//! [`build_stack`](super::build_stack) for how they map onto the layers).

use std::time::Duration;

use toolwarden::circuit_breaker::{CircuitBreakerBuilder, TimeWindow};
use toolwarden::loop_guard::ToolLimits;
use toolwarden::rate_limit::{Mode, Rate};
use toolwarden::retry::{BudgetConfig, Jitter as RetryJitter};
use toolwarden::stack::{StackLayer, StandardStack, StandardStackLayer};
use toolwarden_core::{ConfigError, FailureClass};

use super::SharedState;
use crate::config::{
    quote_key, CircuitBreakerConfig, Config, Jitter, LimitMode, ToolLoopGuard, ToolRateLimit,
    ToolRetry, Window,
};

/// The buckets a time window of the circuit breaker is kept in.
pub const TIME_WINDOW_BUCKETS: u32 = 10;

/// The [`StandardStackLayer`] `config` describes (what [`build_stack`](super::build_stack) puts
/// over the upstream).
pub fn standard_stack(
    config: &Config,
    shared: &SharedState,
) -> Result<StandardStackLayer, ConfigError> {
    let mut builder = StandardStack::builder()
        .catalog(shared.catalog.clone())
        .events(shared.events.clone())
        .attempt_timeout(config.upstream.attempt_timeout);
    for (enabled, layer) in [
        (config.circuit_breaker.enabled, StackLayer::CircuitBreaker),
        (config.rate_limit.enabled, StackLayer::RateLimit),
        (config.retry.enabled, StackLayer::Retry),
        (config.loop_guard.enabled, StackLayer::LoopGuard),
        (config.fallback_cache.enabled, StackLayer::FallbackCache),
        (config.observability.enabled, StackLayer::Observability),
    ] {
        if enabled == Some(false) {
            builder = builder.without(layer);
        }
    }

    let breaker = config.circuit_breaker.clone();
    if let Some(Window::Time(duration)) = breaker.window {
        builder = builder.breaker_time_window(TimeWindow::new(duration, TIME_WINDOW_BUCKETS));
    }
    if let Some(slow) = breaker.slow_call_duration {
        builder = builder.slow_call_duration(slow);
    }
    let tool_breakers: Vec<(String, CircuitBreakerConfig)> = config
        .tools
        .iter()
        .filter_map(|(name, tool)| Some((name.clone(), tool.circuit_breaker.clone()?)))
        .collect();
    builder = builder.circuit_breaker(move |mut b| {
        b = breaker_policy(b, &breaker);
        for (name, tool) in tool_breakers {
            b = b.tool(name, move |b| breaker_policy(b, &tool));
        }
        b
    });

    let limits = config.rate_limit.clone();
    let tool_limits: Vec<(String, ToolRateLimit)> = config
        .tools
        .iter()
        .filter_map(|(name, tool)| Some((name.clone(), tool.rate_limit.clone()?)))
        .collect();
    builder = builder.rate_limit(move |mut b| {
        if let Some(rate) = limits.global_rate {
            b = b.global(quota_rate(rate), limits.global_burst.unwrap_or(rate.count));
        }
        if let Some(rate) = limits.per_tool_rate {
            b = b.per_tool(
                quota_rate(rate),
                limits.per_tool_burst.unwrap_or(rate.count),
            );
        }
        if limits.mode == Some(LimitMode::Wait) {
            b = b.mode(Mode::Wait {
                max_wait: limits.max_wait.unwrap_or(DEFAULT_MAX_WAIT),
            });
        }
        for (name, tool) in tool_limits {
            if let Some(rate) = tool.rate {
                let (rate, burst) = (quota_rate(rate), tool.burst.unwrap_or(rate.count));
                b = b.tool(name, move |b| b.per_tool(rate, burst));
            }
        }
        b
    });

    let retry = config.retry.clone();
    if let Some(deadline) = retry.deadline {
        builder = builder.retry_deadline(deadline);
    }
    let tool_retries: Vec<(String, ToolRetry)> = config
        .tools
        .iter()
        .filter_map(|(name, tool)| Some((name.clone(), tool.retry.clone()?)))
        .collect();
    builder = builder.retry(move |mut b| {
        if let Some(n) = retry.max_attempts {
            b = b.max_attempts(n);
        }
        if let Some(d) = retry.base_delay {
            b = b.base_delay(d);
        }
        if let Some(d) = retry.max_delay {
            b = b.max_delay(d);
        }
        if let Some(jitter) = retry.jitter {
            b = b.jitter(match jitter {
                Jitter::None => RetryJitter::None,
                Jitter::Full => RetryJitter::Full,
                Jitter::Equal => RetryJitter::Equal,
                Jitter::Decorrelated => RetryJitter::Decorrelated,
            });
        }
        if let Some(classes) = &retry.retry_on {
            b = b.retry_on(classes.iter().map(|&c| FailureClass::from(c)));
        }
        if retry.budget_enabled == Some(false) {
            b = b.no_budget();
        } else if retry.budget_ratio.is_some()
            || retry.budget_min_per_sec.is_some()
            || retry.budget_ttl.is_some()
        {
            let defaults = BudgetConfig::default();
            b = b.budget(BudgetConfig {
                ratio: retry.budget_ratio.unwrap_or(defaults.ratio),
                min_per_sec: retry.budget_min_per_sec.unwrap_or(defaults.min_per_sec),
                ttl: retry.budget_ttl.unwrap_or(defaults.ttl),
            });
        }
        for (name, tool) in tool_retries {
            b = b.tool(name, move |mut b| {
                if tool.enabled == Some(false) {
                    return b.max_attempts(1);
                }
                if let Some(n) = tool.max_attempts {
                    b = b.max_attempts(n);
                }
                if let Some(d) = tool.base_delay {
                    b = b.base_delay(d);
                }
                if let Some(d) = tool.max_delay {
                    b = b.max_delay(d);
                }
                if let Some(d) = tool.deadline {
                    b = b.deadline(d);
                }
                b
            });
        }
        b
    });

    let guard = config.loop_guard.clone();
    let tool_guards: Vec<(String, ToolLoopGuard)> = config
        .tools
        .iter()
        .filter_map(|(name, tool)| Some((name.clone(), tool.loop_guard.clone()?)))
        .collect();
    builder = builder.loop_guard(move |mut b| {
        let rule = |n: u32| (n > 0).then_some(n);
        let defaults = ToolLimits::default();
        let limits = ToolLimits {
            max_failing_repeats: guard
                .max_failing_repeats
                .map_or(defaults.max_failing_repeats, rule),
            max_repeats: guard.max_repeats.map_or(defaults.max_repeats, rule),
            cycles: guard.cycles.unwrap_or(defaults.cycles),
        };
        b = b.limits(limits);
        let polling = ToolLimits {
            max_repeats: None,
            cycles: false,
            ..limits
        };
        if let Some(n) = guard.cycle_max_period {
            b = b.max_cycle_period(n as usize);
        }
        if let Some(n) = guard.cycle_repeats {
            b = b.max_cycle_repeats(n);
        }
        if let Some(n) = guard.window_calls {
            b = b.window_calls(n as usize);
        }
        if let Some(d) = guard.window_time {
            b = b.window_time(d);
        }
        if guard.max_sessions.is_some() || guard.session_idle_timeout.is_some() {
            let mut bounds = toolwarden_core::Bounds::default();
            if let Some(n) = guard.max_sessions {
                bounds.max_keys = n as usize;
            }
            if let Some(d) = guard.session_idle_timeout {
                bounds.idle_timeout = Some(d);
            }
            b = b.bounds(bounds);
        }
        for tool in guard.exempt_tools.iter().flatten() {
            b = b.tool(tool.clone(), |b| b.exempt(true));
        }
        for tool in guard.polling_tools.iter().flatten() {
            b = b.tool(tool.clone(), move |b| b.limits(polling));
        }
        for (name, tool) in tool_guards {
            if tool.exempt == Some(true) {
                b = b.tool(name, |b| b.exempt(true));
                continue;
            }
            let listed_polling = guard.polling_tools.iter().flatten().any(|t| *t == name);
            let mut own = if tool.polling.unwrap_or(listed_polling) {
                polling
            } else {
                limits
            };
            if let Some(n) = tool.max_failing_repeats {
                own.max_failing_repeats = rule(n);
            }
            if let Some(n) = tool.max_repeats {
                own.max_repeats = rule(n);
            }
            if let Some(cycles) = tool.cycles {
                own.cycles = cycles;
            }
            b = b.tool(name, move |b| b.limits(own));
        }
        b
    });

    let cache = config.fallback_cache.clone();
    let availability = shared.availability.clone();
    builder = builder.fallback_cache(move |mut b| {
        if let Some(available) = availability {
            b = b.available(move |tool: &str| available(tool));
        }
        if let Some(d) = cache.max_staleness {
            b = b.max_staleness(d);
        }
        if cache.fresh_ttl.is_some() {
            b = b.fresh_ttl(cache.fresh_ttl);
        }
        if let Some(n) = cache.max_entries {
            b = b.max_entries(n as usize);
        }
        if let Some(n) = cache.max_bytes {
            b = b.max_bytes(usize::try_from(n).unwrap_or(usize::MAX));
        }
        if let Some(degrade) = cache.degrade {
            b = b.degrade(degrade);
        }
        if let Some(note) = cache.stale_note {
            b = b.stale_note(note);
        }
        if let Some(n) = cache.alternatives {
            b = b.alternatives(n as usize);
        }
        b
    });

    let observability = config.observability.clone();
    builder = builder.observability(move |mut b| {
        if let Some(n) = observability.max_tool_labels {
            b = b.max_tools(n as usize);
        }
        if let Some(n) = observability.max_method_labels {
            b = b.max_methods(n as usize);
        }
        if let Some(n) = observability.recent_window {
            b = b.recent_window(n as usize);
        }
        b
    });

    let layer = builder.build().map_err(|e| proxy_key_names(e, config))?;
    // A tool whose breaker is switched off: its circuit is disabled, so it
    // records nothing and never refuses.
    for (name, tool) in &config.tools {
        if tool
            .circuit_breaker
            .as_ref()
            .is_some_and(|cb| cb.enabled == Some(false))
        {
            layer.registry().disable(name);
        }
    }
    Ok(layer)
}

/// The wait of `rate_limit.mode = "wait"` when `max_wait` is unset.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(1);

/// Renames the fields of a stack error to the file's keys: the stack's
/// `attempt_timeout` is `upstream.attempt_timeout`; a tool's own policy
/// (`circuit_breaker.tools."search".failure_threshold`) is
/// `tools."search".circuit_breaker.failure_threshold` (likewise for
/// `rate_limit` and `loop_guard`, whose `per_tool.` and `limits.` are the
/// tool's section itself); the loop guard's `bounds` are
/// `max_sessions` and `session_idle_timeout`; and the later fields
/// of a multi-field error (`minimum_calls, count_window`) get the section of
/// the first.
fn proxy_key_names(error: ConfigError, config: &Config) -> ConfigError {
    let mut prefix = String::new();
    let fields: Vec<String> = error
        .field()
        .split(", ")
        .enumerate()
        .map(|(i, field)| {
            if field == "attempt_timeout" {
                return "upstream.attempt_timeout".to_owned();
            }
            if i > 0 && !field.contains('.') {
                return format!("{prefix}{field}");
            }
            // The loop guard's session bounds, as the file names them.
            let field = match field {
                "loop_guard.bounds.max_keys" => "loop_guard.max_sessions",
                "loop_guard.bounds.idle_timeout" => "loop_guard.session_idle_timeout",
                field => field,
            };
            for name in config.tools.keys() {
                for layer in ["circuit_breaker", "retry", "rate_limit", "loop_guard"] {
                    let section = toolwarden_core::overrides::tool_section(name);
                    if let Some(rest) = field.strip_prefix(&format!("{layer}.{section}.")) {
                        // A tool's quota (`per_tool`) and limits (`limits`)
                        // are its section's own keys in the file.
                        let rest = rest
                            .strip_prefix("per_tool.")
                            .or_else(|| rest.strip_prefix("limits."))
                            .unwrap_or(rest);
                        prefix = format!("tools.{}.{layer}.", quote_key(name));
                        return format!("{prefix}{rest}");
                    }
                }
            }
            if let Some((section, _)) = field.split_once('.') {
                prefix = format!("{section}.");
            }
            field.to_owned()
        })
        .collect();
    ConfigError::new(fields.join(", "), error.reason())
}

fn quota_rate(rate: crate::config::Rate) -> Rate {
    Rate::new(rate.count, rate.per)
}

/// Applies one `[circuit_breaker]` table (the section or a tool's) to `b`.
pub(crate) fn breaker_policy(
    mut b: CircuitBreakerBuilder,
    cb: &CircuitBreakerConfig,
) -> CircuitBreakerBuilder {
    if let Some(n) = cb.failure_threshold {
        b = b.failure_threshold(n);
    }
    if let Some(rate) = cb.failure_rate {
        b = b.failure_rate_threshold(rate);
    }
    match cb.window {
        Some(Window::Calls(n)) => b = b.count_window(n).time_window(None),
        Some(Window::Time(duration)) => {
            b = b
                .count_window(None)
                .time_window(TimeWindow::new(duration, TIME_WINDOW_BUCKETS));
        }
        None => {}
    }
    if let Some(n) = cb.minimum_calls {
        b = b.minimum_calls(n);
    }
    if let Some(d) = cb.slow_call_duration {
        b = b.slow_call_duration(d);
    }
    if let Some(rate) = cb.slow_call_rate {
        b = b.slow_call_rate_threshold(rate);
    }
    if let Some(d) = cb.reset_timeout {
        b = b.reset_timeout(d);
    }
    if let Some(m) = cb.reset_multiplier {
        b = b.reset_multiplier(m);
    }
    if let Some(d) = cb.max_reset_timeout {
        b = b.max_reset_timeout(d);
    }
    if let Some(n) = cb.half_open_max_calls {
        b = b.half_open_max_calls(n);
    }
    if let Some(n) = cb.success_threshold {
        b = b.success_threshold(n);
    }
    b
}
