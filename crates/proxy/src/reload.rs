//! Hot reload: `SIGHUP` (and `toolwarden run --watch`) re-reads the
//! configuration file, applies the `TOOLWARDEN_*` environment over it again
//! (the process's, fixed at start: a variable still wins over the file),
//! validates it fully, and swaps the tool policies without dropping a session or
//! forgetting a circuit's state. A file that does not validate is reported
//! (an error naming the key) and the running configuration stays.
//!
//! # What a reload changes
//!
//! The tool policies, for the calls that start after it:
//!
//! - every layer section (`[circuit_breaker]`, `[rate_limit]`, `[retry]`,
//!   `[loop_guard]`, `[fallback_cache]`) and its `enabled`, and the tools'
//!   tables of them (`[tools."x".retry]`, `[upstreams.NAME.tools."x"]`);
//! - `safe_to_repeat` and `cacheable` of each tool, `catalog.trust_annotations`;
//! - `upstream.attempt_timeout` (it bounds each attempt, inside the stack).
//!
//! What each layer keeps:
//!
//! - **The circuit breaker keeps every circuit** (its registry is
//!   reconfigured in place, see
//!   [`CircuitRegistry::reconfigure`](toolwarden::circuit_breaker::CircuitRegistry::reconfigure)):
//!   an open circuit stays open to the end of its open period, the windows
//!   keep their counts, forced and disabled circuits stay so; the new
//!   thresholds decide from the next outcome, the next open period is the
//!   new one. A tool newly `enabled = false` is disabled; one no longer
//!   disabled is closed afresh.
//! - **A layer whose settings did not change is kept whole**: the rate
//!   limit's quotas, the retry budget, the loop guard's history, the
//!   fallback cache's entries. A layer whose section or tool tables changed
//!   is built anew and starts fresh (quotas full, budget full, no history,
//!   an empty cache), and the log says so.
//! - Observability keeps its statistics and metric series.
//!
//! A call in flight finishes in the stack it started in (a retry loop keeps
//! its old policy); sessions, their upstream connections and the catalog
//! are untouched. With `upstream.session_mode = "per_session"`, every
//! session's stack is replaced, and sessions opened later get the new one;
//! a gateway (`[upstreams.NAME]`) reloads the same way.
//!
//! # What needs a restart
//!
//! What shapes the process rather than the policies: `[upstream]` (the
//! connection: command, restarts, timeouts, headers, `session_mode`; all
//! but `attempt_timeout`), `[upstreams.NAME]` other than its `tools`
//! tables (its connection, `allow`, `deny`, `aliases`, its upstream
//! breaker; adding or removing one), `[gateway]`, `[downstream]`, `[http]`,
//! `[limits]`, `[observability]`, and the breaker's registry-wide
//! `circuit_breaker.name` and `circuit_breaker.bounds`. A reload that
//! changes one of them applies everything else, keeps the running value of
//! each, and logs a warning naming the key ("takes effect after a
//! restart"); [`ReloadReport::restart_required`] lists them. Command-line
//! flags are not re-read.
//!
//! # Watching
//!
//! `--watch` polls the file's modification time and size every second
//! ([`WATCH_INTERVAL`]) rather than subscribing to file-system events: no
//! dependency, and it sees an editor's write-and-rename and a Kubernetes
//! ConfigMap's symlink swap alike. A file caught half-written fails to
//! validate, is reported, and the next change reloads it.
//!
//! Each attempt counts in `toolwarden_proxy_config_reloads_total` with
//! `result="ok"` or `result="error"`; a success is logged at `info`
//! (`RUST_LOG=toolwarden_proxy=info`), a failure at `error`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use toolwarden::stack::StackLayer;
use toolwarden_core::ConfigError;

use crate::config::{optional_on, process_env, Config, ConfigFileError, ToolConfig};
use crate::Proxy;

/// How often `--watch` looks at the file.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// The metric counting reload attempts, by `result` (`ok` or `error`).
pub const RELOADS_METRIC: &str = "toolwarden_proxy_config_reloads_total";

/// What a successful reload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// The keys whose new values wait for a restart (their running values
    /// were kept): `http`, `upstream`, `circuit_breaker.bounds`, ...
    pub restart_required: Vec<String>,
    /// The layers kept whole, state and all (their settings did not change).
    pub kept: Vec<StackLayer>,
    /// The layers built anew from changed settings, with fresh state.
    pub renewed: Vec<StackLayer>,
    /// The sessions whose own stack was replaced (`per_session` mode).
    pub sessions: usize,
}

/// Why a reload was refused; the running configuration is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadError {
    /// The file could not be read, parsed or validated.
    Config(ConfigFileError),
    /// The new policies could not be put in place of the running ones.
    Stack(ConfigError),
}

impl ReloadError {
    /// The key at fault, when the error is about one.
    #[must_use]
    pub fn key(&self) -> Option<&str> {
        match self {
            ReloadError::Config(e) => e.key(),
            ReloadError::Stack(e) => Some(e.field()),
        }
    }
}

impl fmt::Display for ReloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReloadError::Config(e) => e.fmt(f),
            ReloadError::Stack(e) => write!(f, "invalid configuration: {e}"),
        }
    }
}

impl std::error::Error for ReloadError {}

/// The configuration a reload applies: `next`, with the running value of
/// every key that only changes on a restart, and those keys.
pub(crate) fn effective(running: &Config, mut next: Config) -> (Config, Vec<String>) {
    let mut restart = Vec::new();
    let mut keep = |key: &str, changed: bool| {
        if changed {
            restart.push(key.to_owned());
        }
    };
    let mut upstream = running.upstream.clone();
    upstream.attempt_timeout = next.upstream.attempt_timeout;
    keep("upstream", upstream != next.upstream);
    next.upstream = upstream;
    keep("upstreams", running.upstreams != next.upstreams);
    next.upstreams.clone_from(&running.upstreams);
    keep("gateway", running.gateway != next.gateway);
    next.gateway = running.gateway.clone();
    keep("downstream", running.downstream != next.downstream);
    next.downstream = running.downstream.clone();
    keep("http", running.http != next.http);
    next.http = running.http.clone();
    keep("limits", running.limits != next.limits);
    next.limits = running.limits.clone();
    keep("observability", running.observability != next.observability);
    next.observability = running.observability.clone();
    // The replicas' connections and syncs are made at start.
    keep("redis", running.redis != next.redis);
    next.redis.clone_from(&running.redis);
    let (breaker, next_breaker) = (&running.circuit_breaker, &mut next.circuit_breaker);
    keep("circuit_breaker.name", breaker.name != next_breaker.name);
    next_breaker.name.clone_from(&breaker.name);
    keep(
        "circuit_breaker.bounds",
        breaker.bounds != next_breaker.bounds,
    );
    next_breaker.bounds = breaker.bounds;
    (next, restart)
}

/// The layers whose settings (section and every tool's table of it) are
/// the same in both configurations: a reload keeps them whole.
pub(crate) fn unchanged_layers(running: &Config, next: &Config) -> Vec<StackLayer> {
    fn same_tables<T: PartialEq>(
        running: &Config,
        next: &Config,
        table: impl Fn(&ToolConfig) -> Option<&T>,
    ) -> bool {
        let names = running.tools.keys().chain(next.tools.keys());
        names
            .into_iter()
            .all(|name| running.tool(name).and_then(&table) == next.tool(name).and_then(&table))
    }
    let mut unchanged = Vec::new();
    if running.rate_limit == next.rate_limit
        && same_tables(running, next, |t| t.rate_limit.as_ref())
    {
        unchanged.push(StackLayer::RateLimit);
    }
    if running.retry == next.retry && same_tables(running, next, |t| t.retry.as_ref()) {
        unchanged.push(StackLayer::Retry);
    }
    if running.loop_guard == next.loop_guard
        && same_tables(running, next, |t| t.loop_guard.as_ref())
    {
        unchanged.push(StackLayer::LoopGuard);
    }
    if running.fallback_cache == next.fallback_cache {
        unchanged.push(StackLayer::FallbackCache);
    }
    // Issue 21: kept (places in use, calls in flight) when unchanged.
    // On only with the section and `enabled` not `false`: a layer that is
    // off is neither kept nor renewed.
    if optional_on(next.bulkhead.as_ref().map(|s| s.enabled))
        && running.bulkhead == next.bulkhead
        && same_tables(running, next, |t| t.bulkhead.as_ref())
    {
        unchanged.push(StackLayer::Bulkhead);
    }
    if optional_on(next.coalesce.as_ref().map(|s| s.enabled))
        && running.coalesce == next.coalesce
        && same_tables(running, next, |t| t.coalesce.as_ref())
    {
        unchanged.push(StackLayer::Coalesce);
    }
    if optional_on(next.hedge.as_ref().map(|s| s.enabled))
        && running.hedge == next.hedge
        && same_tables(running, next, |t| t.hedge.as_ref())
    {
        unchanged.push(StackLayer::Hedge);
    }
    unchanged
}

/// Re-reads `path` (no file: every default) with the process's
/// environment and applies it to `proxy` ([`Proxy::reload`]); logs the
/// outcome and counts it in [`RELOADS_METRIC`]. On error the running
/// configuration stays.
pub fn reload_file(proxy: &Proxy, path: Option<&Path>) -> Result<ReloadReport, ReloadError> {
    let result = refuse_empty(path)
        .and_then(|()| Config::load(path, process_env()).map_err(ReloadError::Config))
        .and_then(|config| proxy.reload(config).map_err(ReloadError::Stack));
    let file = path.map_or_else(|| "(no file)".into(), |p| p.display().to_string());
    match &result {
        Ok(report) => {
            metrics::counter!(RELOADS_METRIC, "result" => "ok").increment(1);
            for key in &report.restart_required {
                tracing::warn!(
                    file = %file,
                    key = %key,
                    "configuration reload: `{key}` changed, but takes effect only after a restart; its running value is kept"
                );
            }
            let names = |layers: &[StackLayer]| {
                layers
                    .iter()
                    .map(|l| l.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            tracing::info!(
                file = %file,
                kept = %names(&report.kept),
                renewed = %names(&report.renewed),
                sessions = report.sessions,
                "configuration reloaded (circuits kept; renewed layers start with fresh state)"
            );
        }
        Err(e) => {
            metrics::counter!(RELOADS_METRIC, "result" => "error").increment(1);
            tracing::error!(
                file = %file,
                key = e.key().unwrap_or("-"),
                "configuration reload failed, the running configuration is kept: {e}"
            );
        }
    }
    result
}

/// An empty file (or only whitespace) is a valid configuration, every key
/// at its default, but on a reload it is almost always a file caught
/// half-written (a writer that truncates first; `>` in a shell): applied,
/// it dropped every configured limit until the rest was written, and then
/// renewed the layers again, their state lost (the quotas refilled).
/// Refused: the running configuration stays.
fn refuse_empty(path: Option<&Path>) -> Result<(), ReloadError> {
    let Some(path) = path else {
        return Ok(());
    };
    match std::fs::read(path) {
        Ok(bytes) if bytes.iter().all(u8::is_ascii_whitespace) => {
            Err(ReloadError::Config(ConfigFileError::new(
                None,
                format!(
                    "{} is empty: not applied on a reload (an empty file is every default, \
                     most likely a file caught half-written)",
                    path.display()
                ),
            )))
        }
        // Unreadable: `Config::load` says why.
        _ => Ok(()),
    }
}

/// Reloads `path` into `proxy` on each `SIGHUP` until `shutdown` (on
/// platforms without signals, never).
pub async fn on_hangup(proxy: Arc<Proxy>, path: Option<PathBuf>, shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(hangup) => hangup,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP: no reload on SIGHUP");
                return;
            }
        };
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                received = hangup.recv() => {
                    if received.is_none() {
                        return;
                    }
                    tracing::info!("SIGHUP: reloading the configuration");
                    let _ = reload_file(&proxy, path.as_deref());
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (proxy, path);
        shutdown.cancelled().await;
    }
}

/// What `--watch` compares: the file's modification time and size (`None`
/// while it cannot be read).
fn stamp(path: &Path) -> Option<(Option<SystemTime>, u64)> {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok(), metadata.len()))
}

/// Reloads `path` into `proxy` whenever its modification time or size
/// changes, looking every `interval` ([`WATCH_INTERVAL`]), until `shutdown`:
/// once the change has held for one more look, so that a file being
/// written (slowly, or truncated and then filled) is read when its writer
/// is done, not halfway (a prefix of a file that ends on a line is valid
/// TOML, every key it lacks at its default).
pub async fn watch(
    proxy: Arc<Proxy>,
    path: PathBuf,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut seen = stamp(&path);
    // A change seen at the last look, not yet held for one more.
    let mut changing = None;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = stamp(&path);
        if now == seen {
            changing = None;
            continue;
        }
        if changing.as_ref() != Some(&now) {
            changing = Some(now);
            continue;
        }
        seen = now;
        changing = None;
        tracing::info!(file = %path.display(), "the configuration file changed: reloading");
        let _ = reload_file(&proxy, Some(&path));
    }
}

#[cfg(test)]
mod tests;
