//! [`standard_stack`]: the umbrella crate's standard stack as the
//! configuration's layer sections and `[tools."name"]` describe it (see
//! [`build_stack`](super::build_stack) for how they map onto the layers).

use std::sync::Arc;

use toolwarden::hedge::{HedgeBuilder, HedgeLayer};
use toolwarden::stack::{StackLayer, StandardStack, StandardStackLayer};
use toolwarden_core::ConfigError;

use super::SharedState;
use crate::config::{quote_key, Config, SessionMode, ToolConfig};

/// The [`StandardStackLayer`] `config` describes (what [`build_stack`](super::build_stack) puts
/// over the upstream).
pub fn standard_stack(
    config: &Config,
    shared: &SharedState,
) -> Result<StandardStackLayer, ConfigError> {
    standard_stack_over(config, shared, None)
}

/// [`standard_stack`], replacing `previous` when given (a reload, see
/// [`StandardStackBuilder::reload`](toolwarden::stack::StandardStackBuilder::reload)):
/// its breakers reconfigured, its observability and the layers in `keep`
/// kept whole.
pub(crate) fn standard_stack_over(
    config: &Config,
    shared: &SharedState,
    previous: Option<(&StandardStackLayer, &[StackLayer])>,
) -> Result<StandardStackLayer, ConfigError> {
    let mut builder = StandardStack::builder()
        .catalog(shared.catalog.clone())
        .events(shared.events.clone())
        .attempt_timeout(config.stack_attempt_timeout().0);
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

    // The breaker's time window and slow-call duration are the stack's knobs
    // too, so that its checks against the attempt timeout apply.
    let breaker = config.circuit_breaker.clone();
    if let Some(Some(window)) = breaker.time_window {
        builder = builder.breaker_time_window(window);
    }
    if let Some(Some(slow)) = breaker.slow_call_duration {
        builder = builder.slow_call_duration(slow);
    }
    let tool_breakers = tool_tables(config, |tool| tool.circuit_breaker.as_ref());
    let breaker_sync = shared
        .replicas
        .as_ref()
        .and_then(|r| r.breaker_sync().cloned());
    let sync = breaker_sync.clone();
    builder = builder.circuit_breaker(move |mut b| {
        if let Some(sync) = &sync {
            b = b.sync(Arc::new(sync.clone()));
        }
        b = b.settings(&breaker);
        for (name, tool) in &tool_breakers {
            b = b.tool_settings(name.as_str(), tool);
        }
        b
    });

    let limits = config.rate_limit.clone();
    let tool_limits = tool_tables(config, |tool| tool.rate_limit.as_ref());
    let backend = shared.replicas.as_ref().and_then(|r| r.limiter().cloned());
    builder = builder.rate_limit(move |mut b| {
        if let Some(backend) = &backend {
            b = b.backend(backend.clone());
        }
        b = b.settings(&limits);
        for (name, tool) in &tool_limits {
            b = b.tool_settings(name.as_str(), tool);
        }
        b
    });

    let retry = config.retry.clone();
    let tool_retries = tool_tables(config, |tool| tool.retry.as_ref());
    builder = builder.retry(move |mut b| {
        b = b.settings(&retry);
        for (name, tool) in &tool_retries {
            b = b.tool_settings(name.as_str(), tool);
        }
        b
    });

    let guard = config.loop_guard.clone();
    let tool_guards = tool_tables(config, |tool| tool.loop_guard.as_ref());
    builder = builder.loop_guard(move |mut b| {
        b = b.settings(&guard);
        for (name, tool) in &tool_guards {
            b = b.tool_settings(name.as_str(), tool);
        }
        b
    });

    let cache = config.fallback_cache.clone();
    let availability = shared.availability.clone();
    let per_session = per_session_upstreams(config);
    builder = builder.fallback_cache(move |mut b| {
        if let Some(available) = availability {
            b = b.available(move |tool: &str| available(tool));
        }
        let b = b.settings(&cache);
        if per_session {
            b.per_session(true)
        } else {
            b
        }
    });
    let observability = config.observability.clone();
    builder = builder.observability(move |b| b.settings(&observability));

    // Issue 21: the bulkhead, coalescing and hedging, on only with their section.
    builder = optional_layers(builder, config)?;

    if let Some((previous, keep)) = previous {
        builder = builder.reload(previous, keep.iter().copied());
    }
    let layer = builder.build().map_err(|e| proxy_key_names(e, config))?;
    shared.observed_by(&layer);
    if let Some(sync) = breaker_sync {
        // Other replicas' transitions apply to this stack's circuits.
        sync.attach(layer.registry().clone());
    }
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

/// Adds the bulkhead and coalescing when their sections are present and not
/// `enabled = false`; a tool's table of a layer that is off is refused
/// (it would do nothing), naming it.
fn optional_layers(
    mut builder: toolwarden::stack::StandardStackBuilder,
    config: &Config,
) -> Result<toolwarden::stack::StandardStackBuilder, ConfigError> {
    let on = |enabled: Option<bool>| crate::config::optional_on(Some(enabled));
    let bulkhead = config.bulkhead.clone().filter(|s| on(s.enabled));
    let tool_bulkheads = tool_tables(config, |tool| tool.bulkhead.as_ref());
    match bulkhead {
        Some(settings) => {
            builder = builder.bulkhead(move |mut b| {
                b = b.settings(&settings);
                for (name, tool) in &tool_bulkheads {
                    b = b.tool_settings(name.as_str(), tool);
                }
                b
            });
        }
        None => off_layer_tables(&tool_bulkheads, "bulkhead")?,
    }
    let coalesce = config.coalesce.clone().filter(|s| on(s.enabled));
    let per_session = per_session_upstreams(config);
    let tool_coalesce = tool_tables(config, |tool| tool.coalesce.as_ref());
    match coalesce {
        Some(settings) => {
            builder = builder.coalesce(move |mut b| {
                b = b.settings(&settings);
                for (name, tool) in &tool_coalesce {
                    b = b.tool_settings(name.as_str(), tool);
                }
                if per_session {
                    b = b.per_session(true);
                }
                b
            });
        }
        None => off_layer_tables(&tool_coalesce, "coalesce")?,
    }
    let tool_hedges = tool_tables(config, |tool| tool.hedge.as_ref());
    match &config.hedge {
        Some(settings) => {
            let settings = settings.clone();
            let configure = move |mut b: HedgeBuilder| {
                b = b.settings(&settings);
                for (name, tool) in &tool_hedges {
                    b = b.tool_settings(name.as_str(), tool);
                }
                b
            };
            if on(config.hedge.as_ref().and_then(|s| s.enabled)) {
                builder = builder.hedge(configure);
            } else {
                // `enabled = false`: off, its keys checked all the same.
                configure(HedgeLayer::builder())
                    .build()
                    .map_err(|e| proxy_key_names(e.in_section("hedge"), config))?;
            }
        }
        None => off_layer_tables(&tool_hedges, "hedge")?,
    }
    Ok(builder)
}

fn off_layer_tables<T>(tables: &[(String, T)], layer: &str) -> Result<(), ConfigError> {
    match tables.first() {
        Some((name, _)) => Err(ConfigError::new(
            format!("tools.{}.{layer}", quote_key(name)),
            format!("the {layer} layer is off: add a [{layer}] section to turn it on"),
        )),
        None => Ok(()),
    }
}

/// Each tool's table of one layer, by tool name.
fn tool_tables<T: Clone>(
    config: &Config,
    table: impl Fn(&ToolConfig) -> Option<&T>,
) -> Vec<(String, T)> {
    config
        .tools
        .iter()
        .filter_map(|(name, tool)| Some((name.clone(), table(tool)?.clone())))
        .collect()
}

/// Whether each session has an upstream of its own
/// (`upstream.session_mode = "per_session"`): then one session's answers
/// never serve another's calls, neither joined by coalescing nor from the
/// fallback cache (a setting that says otherwise is refused at load).
fn per_session_upstreams(config: &Config) -> bool {
    config.upstream.session_mode == SessionMode::PerSession
}

/// Renames the fields of a stack error to the file's keys (the settings'
/// keys are the builders' names, so only the places differ): the stack's
/// `attempt_timeout` is `upstream.attempt_timeout` (a gateway's longest
/// `upstreams."NAME".attempt_timeout`); a tool's own settings
/// (`circuit_breaker.tools."search".failure_threshold`) are
/// `tools."search".circuit_breaker.failure_threshold`; and the later fields
/// of a multi-field error (`minimum_calls, count_window`) get the section of
/// the first.
fn proxy_key_names(error: ConfigError, config: &Config) -> ConfigError {
    let mut prefix = String::new();
    let mut layer_section = String::new();
    let fields: Vec<String> = error
        .field()
        .split(", ")
        .enumerate()
        .map(|(i, field)| {
            if field == "attempt_timeout" {
                return config.stack_attempt_timeout().1;
            }
            if i > 0 && !field.contains('.') {
                return format!("{prefix}{field}");
            }
            // A later field in a tool's section of the first field's layer.
            let in_layer;
            let field = if i > 0 && field.starts_with("tools.") {
                in_layer = format!("{layer_section}.{field}");
                in_layer.as_str()
            } else {
                field
            };
            if i == 0 {
                layer_section = field.split('.').next().unwrap_or_default().to_owned();
            }
            for name in config.tools.keys() {
                for layer in [
                    "circuit_breaker",
                    "retry",
                    "rate_limit",
                    "loop_guard",
                    "bulkhead",
                    "coalesce",
                    "hedge",
                ] {
                    let section = toolwarden_core::overrides::tool_section(name);
                    if let Some(rest) = field.strip_prefix(&format!("{layer}.{section}.")) {
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
