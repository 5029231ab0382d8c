//! Health: checks with priorities and timeouts ([`HealthCheck`]), one
//! aggregated report ([`HealthRegistry`]), a built-in check fed by circuit
//! states ([`circuit_check`]), and a periodic monitor ([`HealthMonitor`]).

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use futures_util::future::join_all;
use futures_util::FutureExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use toolwarden_core::{Circuits, ConfigError};

use crate::health_history::HealthHistory;
use crate::stats::unix_ms_now;

/// How much a failing check matters. See [`HealthRegistry`], "Aggregation".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Failing makes the report unhealthy.
    Critical,
    /// Failing makes the report degraded.
    Important,
    /// Failing makes the report degraded only if every informational check fails.
    Informational,
}

/// The overall status of a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    /// Everything that matters passed.
    Healthy,
    /// Serving, with reduced capacity or an important dependency failing.
    Degraded,
    /// A critical check failed.
    Unhealthy,
}

impl HealthStatus {
    /// The HTTP status a health endpoint answers with: 200 when healthy or
    /// degraded (still serving), 503 when unhealthy.
    #[must_use]
    pub fn http_status(self) -> u16 {
        match self {
            HealthStatus::Healthy | HealthStatus::Degraded => 200,
            HealthStatus::Unhealthy => 503,
        }
    }
}

/// What happened to one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckStatus {
    /// The check passed.
    Passed,
    /// The check returned an error.
    Failed,
    /// The check did not finish within its timeout.
    TimedOut,
    /// The check panicked.
    Panicked,
}

impl CheckStatus {
    /// Whether the check passed.
    #[must_use]
    pub fn is_pass(self) -> bool {
        self == CheckStatus::Passed
    }
}

/// The result of one check in a [`HealthReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckReport {
    /// The check's name.
    pub name: String,
    /// Its priority.
    pub priority: Priority,
    /// What happened.
    pub status: CheckStatus,
    /// The error, timeout or panic message; `None` when it passed.
    pub message: Option<String>,
    /// How long it ran, in milliseconds.
    pub duration_ms: f64,
}

/// The aggregated result of every registered check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthReport {
    /// The overall status (see [`HealthRegistry`], "Aggregation").
    pub status: HealthStatus,
    /// When the checks started, in Unix milliseconds.
    pub checked_at_unix_ms: u64,
    /// Every check, in registration order.
    pub checks: Vec<CheckReport>,
}

impl HealthReport {
    /// Aggregates check results by the priority rules.
    #[must_use]
    pub fn from_checks(checks: Vec<CheckReport>, checked_at_unix_ms: u64) -> Self {
        HealthReport {
            status: aggregate(&checks),
            checked_at_unix_ms,
            checks,
        }
    }

    /// The report of a check by name.
    #[must_use]
    pub fn check(&self, name: &str) -> Option<&CheckReport> {
        self.checks.iter().find(|c| c.name == name)
    }

    /// The report as JSON: `{status, checked_at_unix_ms, checks: [{name,
    /// priority, status, message, duration_ms}]}`.
    #[must_use]
    pub fn to_json(&self) -> serde_json::Value {
        // A derived Serialize of plain data with string keys cannot fail.
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

fn aggregate(checks: &[CheckReport]) -> HealthStatus {
    let failing = |p: Priority| {
        checks
            .iter()
            .any(|c| c.priority == p && !c.status.is_pass())
    };
    if failing(Priority::Critical) {
        return HealthStatus::Unhealthy;
    }
    if failing(Priority::Important) {
        return HealthStatus::Degraded;
    }
    let mut informational = checks
        .iter()
        .filter(|c| c.priority == Priority::Informational)
        .peekable();
    if informational.peek().is_some() && informational.all(|c| !c.status.is_pass()) {
        return HealthStatus::Degraded;
    }
    HealthStatus::Healthy
}

type CheckFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
type CheckFn = Arc<dyn Fn() -> CheckFuture + Send + Sync>;

/// The default timeout of a check.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// One named check: an async function returning `Ok(())` when healthy or
/// `Err(message)`.
#[derive(Clone)]
pub struct HealthCheck {
    name: String,
    priority: Priority,
    timeout: Duration,
    check: CheckFn,
}

impl HealthCheck {
    /// A check that runs `check` each time a report is made, with the
    /// default timeout of 5 s ([`DEFAULT_CHECK_TIMEOUT`]).
    pub fn new<F, Fut>(name: impl Into<String>, priority: Priority, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        HealthCheck {
            name: name.into(),
            priority,
            timeout: DEFAULT_CHECK_TIMEOUT,
            check: Arc::new(move || Box::pin(check()) as CheckFuture),
        }
    }

    /// How long the check may run before it counts as failed. Default 5 s;
    /// must be positive.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The check's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The check's priority.
    #[must_use]
    pub fn priority(&self) -> Priority {
        self.priority
    }

    async fn run(&self) -> CheckReport {
        let start = Instant::now();
        let (status, message) = match std::panic::catch_unwind(AssertUnwindSafe(|| (self.check)()))
        {
            Err(panic) => (CheckStatus::Panicked, Some(panic_message(&*panic))),
            Ok(future) => {
                match tokio::time::timeout(self.timeout, AssertUnwindSafe(future).catch_unwind())
                    .await
                {
                    Ok(Ok(Ok(()))) => (CheckStatus::Passed, None),
                    Ok(Ok(Err(message))) => (CheckStatus::Failed, Some(message)),
                    Ok(Err(panic)) => (CheckStatus::Panicked, Some(panic_message(&*panic))),
                    Err(_) => (
                        CheckStatus::TimedOut,
                        Some(format!("timed out after {:?}", self.timeout)),
                    ),
                }
            }
        };
        CheckReport {
            name: self.name.clone(),
            priority: self.priority,
            status,
            message,
            duration_ms: start.elapsed().as_secs_f64() * 1e3,
        }
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    let detail = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("non-string panic payload");
    format!("check panicked: {detail}")
}

impl fmt::Debug for HealthCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthCheck")
            .field("name", &self.name)
            .field("priority", &self.priority)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// A shared set of health checks, run together into one [`HealthReport`].
/// Clones share the set.
///
/// # Aggregation
///
/// | priority | when the check fails (error, timeout or panic) |
/// |---|---|
/// | [`Priority::Critical`] | the report is [`Unhealthy`](HealthStatus::Unhealthy) |
/// | [`Priority::Important`] | the report is at least [`Degraded`](HealthStatus::Degraded) |
/// | [`Priority::Informational`] | [`Degraded`](HealthStatus::Degraded) only if every informational check fails |
///
/// With no failing check (or no check at all) the report is
/// [`Healthy`](HealthStatus::Healthy). Every check runs concurrently under
/// its own timeout (default 5 s); a check that panics is reported as failed,
/// never propagated. Checks run on the calling task, so they must not block
/// the thread (use `tokio::task::spawn_blocking` inside a check that must).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::time::Duration;
/// use toolwarden_observability::{HealthCheck, HealthRegistry, HealthStatus, Priority};
///
/// let health = HealthRegistry::new();
/// health.register(HealthCheck::new("upstream", Priority::Critical, || async { Ok(()) })).unwrap();
/// health
///     .register(
///         HealthCheck::new("cache", Priority::Important, || async { Err("cache is cold".to_owned()) })
///             .timeout(Duration::from_secs(1)),
///     )
///     .unwrap();
/// let report = health.report().await;
/// assert_eq!(report.status, HealthStatus::Degraded);
/// assert_eq!(report.to_json()["checks"][1]["message"], "cache is cold");
/// # }
/// ```
///
/// # History
///
/// Each report's results are also recorded, with the report's time, into
/// the registry's [`HealthHistory`] ([`history`](Self::history)): the last
/// 20 results of each check by default, bounded (see [`HealthHistory`];
/// [`with_history`](Self::with_history) sets another length or shares one
/// history between registries).
#[derive(Clone, Default)]
pub struct HealthRegistry {
    checks: Arc<RwLock<Vec<HealthCheck>>>,
    history: HealthHistory,
}

impl HealthRegistry {
    /// An empty registry (reports healthy).
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Records reports into `history` instead of a history of its own
    /// (default: the last 20 results of each check).
    #[must_use]
    pub fn with_history(mut self, history: HealthHistory) -> Self {
        self.history = history;
        self
    }

    /// The history of this registry's reports.
    #[must_use]
    pub fn history(&self) -> &HealthHistory {
        &self.history
    }

    /// Adds a check. Refuses an empty or duplicate name (field `name`) and a
    /// zero timeout (field `timeout`).
    pub fn register(&self, check: HealthCheck) -> Result<(), ConfigError> {
        if check.name.trim().is_empty() {
            return Err(ConfigError::new("name", "must not be empty"));
        }
        if check.timeout.is_zero() {
            return Err(ConfigError::new("timeout", "must be positive").in_section(&check.name));
        }
        let mut checks = self.checks.write().unwrap_or_else(PoisonError::into_inner);
        if checks.iter().any(|c| c.name == check.name) {
            return Err(ConfigError::new(
                "name",
                format!("`{}` is already registered", check.name),
            ));
        }
        checks.push(check);
        Ok(())
    }

    /// Removes a check by name; returns whether it was there.
    pub fn deregister(&self, name: &str) -> bool {
        let mut checks = self.checks.write().unwrap_or_else(PoisonError::into_inner);
        let before = checks.len();
        checks.retain(|c| c.name != name);
        checks.len() != before
    }

    /// The names of the registered checks, in order.
    #[must_use]
    pub fn names(&self) -> Vec<String> {
        self.read().iter().map(|c| c.name.clone()).collect()
    }

    fn read(&self) -> Vec<HealthCheck> {
        self.checks
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Runs every check concurrently, each under its timeout, and
    /// aggregates the results.
    pub async fn report(&self) -> HealthReport {
        let checked_at = unix_ms_now();
        let checks = self.read();
        let results = join_all(checks.iter().map(HealthCheck::run)).await;
        self.history.record(&results, checked_at);
        HealthReport::from_checks(results, checked_at)
    }
}

impl fmt::Debug for HealthRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthRegistry")
            .field("checks", &self.names())
            .finish()
    }
}

/// The most open keys named in the circuit check's message.
const NAMED_OPEN_KEYS: usize = 20;

/// A check named `circuits`, [`Priority::Important`], that fails while any
/// circuit is open and names the open keys (sorted; at most 20, then a
/// count). Give it the [`Circuits`] view of the circuit breakers
/// (`toolwarden-circuit-breaker`: `breaker_layer.registry().circuits()`).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::sync::Arc;
/// use toolwarden_core::{CircuitView, Circuits};
/// use toolwarden_observability::{circuit_check, HealthRegistry, HealthStatus};
///
/// struct Open(Vec<String>);
/// impl CircuitView for Open {
///     fn is_open(&self, key: &str) -> bool { self.0.iter().any(|k| k == key) }
///     fn open_keys(&self) -> Vec<String> { self.0.clone() }
/// }
/// let health = HealthRegistry::new();
/// health.register(circuit_check(Circuits::new(Arc::new(Open(vec!["search".into()]))))).unwrap();
/// let report = health.report().await;
/// assert_eq!(report.status, HealthStatus::Degraded);
/// assert_eq!(report.checks[0].message.as_deref(), Some("open circuits: search"));
/// # }
/// ```
#[must_use]
pub fn circuit_check(circuits: Circuits) -> HealthCheck {
    HealthCheck::new("circuits", Priority::Important, move || {
        let result = open_circuits_message(circuits.open_keys());
        async move { result }
    })
}

fn open_circuits_message(mut open: Vec<String>) -> Result<(), String> {
    if open.is_empty() {
        return Ok(());
    }
    open.sort_unstable();
    let named = open.len().min(NAMED_OPEN_KEYS);
    let mut message = format!("open circuits: {}", open[..named].join(", "));
    if open.len() > named {
        message.push_str(&format!(" (and {} more)", open.len() - named));
    }
    Err(message)
}

/// The latest report of a [`HealthMonitor`]; `None` until the first one.
pub type LatestReport = Option<Arc<HealthReport>>;

/// Runs a registry's report every interval in a spawned task and keeps the
/// latest. Stops when [`shutdown`](Self::shutdown) is awaited or when the
/// monitor is dropped; subscribers then see the channel close.
///
/// ```
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// use std::time::Duration;
/// use toolwarden_observability::{HealthMonitor, HealthRegistry, HealthStatus};
///
/// let monitor = HealthMonitor::start(HealthRegistry::new(), Duration::from_secs(10)).unwrap();
/// let mut reports = monitor.subscribe();
/// reports.changed().await.unwrap(); // the first report is made at once
/// assert_eq!(monitor.latest().unwrap().status, HealthStatus::Healthy);
/// monitor.shutdown().await;
/// assert!(reports.changed().await.is_err()); // the task has ended
/// # }
/// ```
#[derive(Debug)]
pub struct HealthMonitor {
    latest: watch::Receiver<LatestReport>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl HealthMonitor {
    /// Spawns the monitor on the current tokio runtime. The first report is
    /// made at once, then one every `interval` (a slow report delays the
    /// next tick rather than bunching them). Refuses a zero `interval`, and
    /// a call outside a tokio runtime (field `runtime`).
    pub fn start(registry: HealthRegistry, interval: Duration) -> Result<Self, ConfigError> {
        if interval.is_zero() {
            return Err(ConfigError::new("interval", "must be positive"));
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            ConfigError::new(
                "runtime",
                "HealthMonitor::start must be called inside a tokio runtime",
            )
        })?;
        let (tx, latest) = watch::channel(None);
        let (stop, stopped) = oneshot::channel();
        let task = runtime.spawn(run_monitor(registry, interval, tx, stopped));
        Ok(HealthMonitor {
            latest,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// The latest report; `None` before the first one completes.
    #[must_use]
    pub fn latest(&self) -> LatestReport {
        self.latest.borrow().clone()
    }

    /// A receiver notified of each new report.
    #[must_use]
    pub fn subscribe(&self) -> watch::Receiver<LatestReport> {
        self.latest.clone()
    }

    /// Stops the task (cancelling a report in progress) and waits for it to end.
    pub async fn shutdown(mut self) {
        self.stop.take();
        if let Some(task) = self.task.take() {
            // The task never panics (checks' panics are caught); a JoinError
            // can only mean the runtime is shutting down, which also ends it.
            let _ = task.await;
        }
    }
}

impl Drop for HealthMonitor {
    fn drop(&mut self) {
        // Dropping the sender wakes the task, which then ends.
        self.stop.take();
    }
}

async fn run_monitor(
    registry: HealthRegistry,
    interval: Duration,
    tx: watch::Sender<LatestReport>,
    mut stopped: oneshot::Receiver<()>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = &mut stopped => return,
            _ = ticker.tick() => {}
        }
        let report = tokio::select! {
            biased;
            _ = &mut stopped => return,
            report = registry.report() => report,
        };
        tx.send_replace(Some(Arc::new(report)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(priority: Priority, status: CheckStatus) -> CheckReport {
        CheckReport {
            name: format!("{priority:?}-{status:?}"),
            priority,
            status,
            message: None,
            duration_ms: 0.0,
        }
    }

    #[test]
    fn aggregation_follows_the_priority_rules() {
        use CheckStatus::*;
        use HealthStatus::*;
        use Priority::*;
        let cases: &[(&[(Priority, CheckStatus)], HealthStatus)] = &[
            (&[], Healthy),
            (
                &[
                    (Critical, Passed),
                    (Important, Passed),
                    (Informational, Passed),
                ],
                Healthy,
            ),
            (&[(Critical, Failed)], Unhealthy),
            (&[(Critical, TimedOut), (Important, Failed)], Unhealthy),
            (&[(Critical, Passed), (Important, Panicked)], Degraded),
            (&[(Important, Failed), (Important, Passed)], Degraded),
            // One informational failing out of two: still healthy.
            (&[(Informational, Failed), (Informational, Passed)], Healthy),
            (
                &[(Informational, Failed), (Informational, TimedOut)],
                Degraded,
            ),
            (&[(Critical, Passed), (Informational, Failed)], Degraded),
            (&[(Critical, Failed), (Informational, Failed)], Unhealthy),
        ];
        for (checks, expected) in cases {
            let checks: Vec<_> = checks.iter().map(|(p, s)| check(*p, *s)).collect();
            assert_eq!(aggregate(&checks), *expected, "{checks:?}");
        }
    }

    #[test]
    fn open_circuits_are_named_sorted_and_bounded() {
        assert_eq!(open_circuits_message(vec![]), Ok(()));
        assert_eq!(
            open_circuits_message(vec!["b".into(), "a".into()]),
            Err("open circuits: a, b".into())
        );
        let many: Vec<String> = (0..25).map(|i| format!("k{i:02}")).collect();
        let message = open_circuits_message(many).unwrap_err();
        assert!(message.starts_with("open circuits: k00, k01"), "{message}");
        assert!(message.ends_with("k19 (and 5 more)"), "{message}");
    }
}
