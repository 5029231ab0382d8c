//! Health history: the last results of each check, with when they ran
//! ([`HealthHistory`]), kept by a [`HealthRegistry`](crate::HealthRegistry)
//! each time it makes a report.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use toolwarden_core::ConfigError;

use crate::health::{CheckReport, CheckStatus};

/// How many results of each check a history keeps by default, 20.
pub const DEFAULT_HEALTH_HISTORY: usize = 20;
/// The most results of each check a history may keep, 1000.
pub const HEALTH_HISTORY_LIMIT: usize = 1000;
/// The most checks a history remembers, 256: a registry with more checks
/// (or checks renamed over and over) keeps the first 256 names seen; the
/// results of later names are not kept.
pub const HEALTH_HISTORY_MAX_CHECKS: usize = 256;

/// One past result of a check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// When the report that ran it started, in Unix milliseconds.
    pub at_unix_ms: u64,
    /// What happened.
    pub status: CheckStatus,
    /// The error, timeout or panic message; `None` when it passed.
    pub message: Option<String>,
    /// How long it ran, in milliseconds.
    pub duration_ms: f64,
}

/// The last results of each health check, oldest first, bounded: at most
/// `len` results per check (default 20, [`DEFAULT_HEALTH_HISTORY`]; at most
/// [`HEALTH_HISTORY_LIMIT`]) and at most [`HEALTH_HISTORY_MAX_CHECKS`]
/// checks. Clones share the history.
///
/// A [`HealthRegistry`](crate::HealthRegistry) records every report it
/// makes into its history ([`HealthRegistry::history`](crate::HealthRegistry::history));
/// give one history to successive registries
/// ([`HealthRegistry::with_history`](crate::HealthRegistry::with_history))
/// to keep it across them. A check that is deregistered keeps its past
/// results until [`forget`](Self::forget).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use toolwarden_observability::{CheckStatus, HealthCheck, HealthHistory, HealthRegistry, Priority};
///
/// let history = HealthHistory::new(2).unwrap();
/// let health = HealthRegistry::new().with_history(history.clone());
/// health.register(HealthCheck::new("db", Priority::Critical, || async { Ok(()) })).unwrap();
/// for _ in 0..3 {
///     health.report().await;
/// }
/// let db = &history.snapshot()["db"];
/// assert_eq!(db.len(), 2); // the last two of three
/// assert_eq!(db[1].status, CheckStatus::Passed);
/// # }
/// ```
#[derive(Clone)]
pub struct HealthHistory {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    len: usize,
    checks: BTreeMap<String, VecDeque<HistoryEntry>>,
}

impl Default for HealthHistory {
    /// Keeps [`DEFAULT_HEALTH_HISTORY`] (20) results per check.
    fn default() -> Self {
        HealthHistory::with_len(DEFAULT_HEALTH_HISTORY)
    }
}

impl HealthHistory {
    /// A history of the last `len` results per check. Refuses `0` and
    /// more than [`HEALTH_HISTORY_LIMIT`] (field `health_history`).
    pub fn new(len: usize) -> Result<Self, ConfigError> {
        if len == 0 {
            return Err(ConfigError::new("health_history", "must be at least 1"));
        }
        if len > HEALTH_HISTORY_LIMIT {
            return Err(ConfigError::new(
                "health_history",
                format!("must be at most {HEALTH_HISTORY_LIMIT}, got {len}"),
            ));
        }
        Ok(HealthHistory::with_len(len))
    }

    fn with_len(len: usize) -> Self {
        HealthHistory {
            inner: Arc::new(Mutex::new(Inner {
                len,
                checks: BTreeMap::new(),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many results per check it keeps.
    #[must_use]
    pub fn len_per_check(&self) -> usize {
        self.lock().len
    }

    /// Records the results of one report, made at `at_unix_ms`.
    pub fn record(&self, checks: &[CheckReport], at_unix_ms: u64) {
        let mut inner = self.lock();
        let len = inner.len;
        for check in checks {
            let known = inner.checks.contains_key(&check.name);
            if !known && inner.checks.len() >= HEALTH_HISTORY_MAX_CHECKS {
                continue;
            }
            let results = inner.checks.entry(check.name.clone()).or_default();
            while results.len() >= len {
                results.pop_front();
            }
            results.push_back(HistoryEntry {
                at_unix_ms,
                status: check.status,
                message: check.message.clone(),
                duration_ms: check.duration_ms,
            });
        }
    }

    /// Drops the results of a check; returns whether it had any.
    #[must_use = "whether the check had results"]
    pub fn forget(&self, name: &str) -> bool {
        self.lock().checks.remove(name).is_some()
    }

    /// The results kept, per check name (sorted), oldest first.
    #[must_use]
    pub fn snapshot(&self) -> BTreeMap<String, Vec<HistoryEntry>> {
        self.lock()
            .checks
            .iter()
            .map(|(name, results)| (name.clone(), results.iter().cloned().collect()))
            .collect()
    }

    /// Whether a URL query asks for the history: it has `history=1`
    /// (or `history=true`, or a bare `history`), as `/health?history=1`.
    ///
    /// ```
    /// use toolwarden_observability::HealthHistory;
    /// assert!(HealthHistory::is_requested(Some("history=1")));
    /// assert!(HealthHistory::is_requested(Some("a=b&history=true")));
    /// assert!(!HealthHistory::is_requested(Some("history=0")));
    /// assert!(!HealthHistory::is_requested(None));
    /// ```
    #[must_use]
    pub fn is_requested(query: Option<&str>) -> bool {
        query.is_some_and(|q| {
            q.split('&')
                .any(|pair| matches!(pair, "history" | "history=1" | "history=true"))
        })
    }

    /// The snapshot as JSON: `{"<check>": [{at_unix_ms, status, message,
    /// duration_ms}, ...]}`, oldest first.
    #[must_use]
    pub fn to_json(&self) -> serde_json::Value {
        // A derived Serialize of plain data with string keys cannot fail.
        serde_json::to_value(self.snapshot()).unwrap_or(serde_json::Value::Null)
    }
}

impl fmt::Debug for HealthHistory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.lock();
        f.debug_struct("HealthHistory")
            .field("len_per_check", &inner.len)
            .field("checks", &inner.checks.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::Priority;

    fn result(name: &str, status: CheckStatus) -> CheckReport {
        CheckReport {
            name: name.to_owned(),
            priority: Priority::Critical,
            status,
            message: (!status.is_pass()).then(|| format!("{name} failed")),
            duration_ms: 1.0,
        }
    }

    #[test]
    fn keeps_the_last_results_of_each_check_oldest_first() {
        let history = HealthHistory::new(3).unwrap();
        for at in 0..5u64 {
            let status = if at % 2 == 0 {
                CheckStatus::Passed
            } else {
                CheckStatus::Failed
            };
            history.record(&[result("a", status), result("b", CheckStatus::Passed)], at);
        }
        let snapshot = history.snapshot();
        let at: Vec<u64> = snapshot["a"].iter().map(|e| e.at_unix_ms).collect();
        assert_eq!(at, [2, 3, 4]);
        assert_eq!(snapshot["a"][1].status, CheckStatus::Failed);
        assert_eq!(snapshot["a"][1].message.as_deref(), Some("a failed"));
        assert_eq!(snapshot["b"].len(), 3);
        assert!(history.forget("a"));
        assert!(!history.snapshot().contains_key("a"));
    }

    #[test]
    fn the_number_of_checks_is_bounded() {
        let history = HealthHistory::new(1).unwrap();
        for i in 0..HEALTH_HISTORY_MAX_CHECKS + 10 {
            history.record(&[result(&format!("c{i}"), CheckStatus::Passed)], 0);
        }
        assert_eq!(history.snapshot().len(), HEALTH_HISTORY_MAX_CHECKS);
        // A name already kept still records.
        history.record(&[result("c0", CheckStatus::Failed)], 1);
        assert_eq!(history.snapshot()["c0"][0].status, CheckStatus::Failed);
    }

    #[test]
    fn bad_lengths_are_refused_naming_the_field() {
        for len in [0, HEALTH_HISTORY_LIMIT + 1] {
            let error = HealthHistory::new(len).unwrap_err().to_string();
            assert!(error.contains("health_history"), "{error}");
        }
        assert_eq!(
            HealthHistory::new(HEALTH_HISTORY_LIMIT)
                .unwrap()
                .len_per_check(),
            HEALTH_HISTORY_LIMIT
        );
        assert_eq!(
            HealthHistory::default().len_per_check(),
            DEFAULT_HEALTH_HISTORY
        );
    }
}
