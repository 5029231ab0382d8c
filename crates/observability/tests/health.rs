//! Health: every priority rule, timeouts on a paused clock, panics, the
//! circuit check and the monitor's lifecycle.
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test] fns: a panic fails the test

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use toolwarden_core::{CircuitView, Circuits};
use toolwarden_observability::{
    circuit_check, CheckStatus, HealthCheck, HealthMonitor, HealthRegistry, HealthStatus, Priority,
};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn passing(name: &str, priority: Priority) -> HealthCheck {
    HealthCheck::new(name, priority, || async { Ok(()) })
}

fn failing(name: &str, priority: Priority) -> HealthCheck {
    let message = format!("{name} is down");
    HealthCheck::new(name, priority, move || {
        let message = message.clone();
        async move { Err(message) }
    })
}

/// A check that sleeps `delay` (tokio clock), then passes.
fn sleeping(name: &str, priority: Priority, delay: Duration, timeout: Duration) -> HealthCheck {
    HealthCheck::new(name, priority, move || async move {
        tokio::time::sleep(delay).await;
        Ok(())
    })
    .timeout(timeout)
}

async fn status_of(checks: Vec<HealthCheck>) -> HealthStatus {
    let registry = HealthRegistry::new();
    for check in checks {
        registry.register(check).unwrap();
    }
    registry.report().await.status
}

#[tokio::test]
async fn no_checks_is_healthy() {
    assert_eq!(status_of(vec![]).await, HealthStatus::Healthy);
}

#[tokio::test]
async fn a_failing_critical_check_makes_the_report_unhealthy() {
    use Priority::*;
    assert_eq!(
        status_of(vec![failing("db", Critical), passing("cache", Important)]).await,
        HealthStatus::Unhealthy
    );
    // Critical wins over everything else failing too.
    assert_eq!(
        status_of(vec![
            failing("db", Critical),
            failing("cache", Important),
            failing("docs", Informational)
        ])
        .await,
        HealthStatus::Unhealthy
    );
    assert_eq!(
        status_of(vec![passing("db", Critical)]).await,
        HealthStatus::Healthy
    );
}

#[tokio::test]
async fn a_failing_important_check_makes_the_report_degraded() {
    use Priority::*;
    assert_eq!(
        status_of(vec![
            passing("db", Critical),
            failing("cache", Important),
            passing("x", Important)
        ])
        .await,
        HealthStatus::Degraded
    );
}

#[tokio::test]
async fn informational_checks_degrade_only_when_all_fail() {
    use Priority::*;
    assert_eq!(
        status_of(vec![
            failing("a", Informational),
            passing("b", Informational),
            passing("db", Critical)
        ])
        .await,
        HealthStatus::Healthy
    );
    assert_eq!(
        status_of(vec![
            failing("a", Informational),
            failing("b", Informational),
            passing("db", Critical)
        ])
        .await,
        HealthStatus::Degraded
    );
    assert_eq!(
        status_of(vec![failing("a", Informational)]).await,
        HealthStatus::Degraded
    );
}

#[tokio::test(start_paused = true)]
async fn checks_time_out_concurrently_on_the_paused_clock() {
    let registry = HealthRegistry::new();
    registry
        .register(sleeping("slow", Priority::Critical, secs(60), secs(2)))
        .unwrap();
    registry
        .register(sleeping("slower", Priority::Important, secs(60), secs(3)))
        .unwrap();
    registry
        .register(sleeping("quick", Priority::Important, secs(1), secs(3)))
        .unwrap();
    let start = Instant::now();
    let report = registry.report().await;
    // Concurrent: the report took the longest timeout, not their sum.
    assert_eq!(start.elapsed(), secs(3));
    assert_eq!(report.status, HealthStatus::Unhealthy);
    let slow = report.check("slow").unwrap();
    assert_eq!(slow.status, CheckStatus::TimedOut);
    assert_eq!(slow.message.as_deref(), Some("timed out after 2s"));
    assert_eq!(slow.duration_ms, 2000.0);
    assert_eq!(
        report.check("slower").unwrap().status,
        CheckStatus::TimedOut
    );
    let quick = report.check("quick").unwrap();
    assert_eq!(
        (quick.status, quick.duration_ms),
        (CheckStatus::Passed, 1000.0)
    );
}

#[tokio::test(start_paused = true)]
async fn a_check_just_inside_its_timeout_passes() {
    assert_eq!(
        status_of(vec![sleeping(
            "edge",
            Priority::Critical,
            Duration::from_millis(1999),
            secs(2)
        )])
        .await,
        HealthStatus::Healthy
    );
    assert_eq!(
        status_of(vec![sleeping(
            "edge",
            Priority::Critical,
            secs(2) + Duration::from_millis(1),
            secs(2)
        )])
        .await,
        HealthStatus::Unhealthy
    );
}

#[tokio::test]
async fn a_panicking_check_is_reported_as_failed() {
    let registry = HealthRegistry::new();
    registry
        .register(HealthCheck::new(
            "in_future",
            Priority::Important,
            || async { panic!("boom in the future") },
        ))
        .unwrap();
    registry
        .register(HealthCheck::new(
            "on_call",
            Priority::Informational,
            || -> std::future::Ready<Result<(), String>> { panic!("boom on call") },
        ))
        .unwrap();
    registry
        .register(passing("db", Priority::Critical))
        .unwrap();
    let report = registry.report().await;
    assert_eq!(report.status, HealthStatus::Degraded);
    let in_future = report.check("in_future").unwrap();
    assert_eq!(in_future.status, CheckStatus::Panicked);
    assert_eq!(
        in_future.message.as_deref(),
        Some("check panicked: boom in the future")
    );
    assert_eq!(
        report.check("on_call").unwrap().message.as_deref(),
        Some("check panicked: boom on call")
    );
    // The registry still works afterwards.
    assert_eq!(registry.report().await.status, HealthStatus::Degraded);
}

#[tokio::test]
async fn the_report_has_the_documented_json_shape() {
    let registry = HealthRegistry::new();
    registry
        .register(failing("cache", Priority::Important))
        .unwrap();
    registry
        .register(passing("db", Priority::Critical))
        .unwrap();
    let json = registry.report().await.to_json();
    assert_eq!(json["status"], "degraded");
    assert!(json["checked_at_unix_ms"].as_u64().unwrap() > 1_600_000_000_000);
    assert_eq!(json["checks"][0]["name"], "cache");
    assert_eq!(json["checks"][0]["priority"], "important");
    assert_eq!(json["checks"][0]["status"], "failed");
    assert_eq!(json["checks"][0]["message"], "cache is down");
    assert!(json["checks"][0]["duration_ms"].is_number());
    assert_eq!(json["checks"][1]["status"], "passed");
    assert_eq!(json["checks"][1]["message"], serde_json::Value::Null);
    assert_eq!(json["checks"][1]["priority"], "critical");
}

#[test]
fn registration_refuses_bad_checks_naming_the_field() {
    let registry = HealthRegistry::new();
    registry
        .register(passing("db", Priority::Critical))
        .unwrap();
    assert_eq!(
        registry
            .register(passing("db", Priority::Important))
            .unwrap_err()
            .field(),
        "name"
    );
    assert_eq!(
        registry
            .register(passing(" ", Priority::Important))
            .unwrap_err()
            .field(),
        "name"
    );
    let zero = passing("cache", Priority::Important).timeout(Duration::ZERO);
    assert_eq!(
        registry.register(zero).unwrap_err().field(),
        "cache.timeout"
    );
    assert_eq!(registry.names(), ["db"]);
    assert!(registry.deregister("db"));
    assert!(!registry.deregister("db"));
}

/// A circuit view whose open keys the test sets.
#[derive(Default)]
struct FakeCircuits(Mutex<Vec<String>>);

impl CircuitView for FakeCircuits {
    fn is_open(&self, key: &str) -> bool {
        self.0.lock().unwrap().iter().any(|k| k == key)
    }
    fn open_keys(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

#[tokio::test]
async fn the_circuit_check_names_open_circuits() {
    let view = Arc::new(FakeCircuits::default());
    let registry = HealthRegistry::new();
    registry
        .register(circuit_check(Circuits::new(view.clone())))
        .unwrap();
    assert_eq!(registry.report().await.status, HealthStatus::Healthy);

    *view.0.lock().unwrap() = vec!["search".into(), "fetch".into()];
    let report = registry.report().await;
    assert_eq!(report.status, HealthStatus::Degraded);
    let check = report.check("circuits").unwrap();
    assert_eq!(check.priority, Priority::Important);
    assert_eq!(
        check.message.as_deref(),
        Some("open circuits: fetch, search")
    );

    view.0.lock().unwrap().clear();
    assert_eq!(registry.report().await.status, HealthStatus::Healthy);
    // Without a view, every circuit reads as closed.
    let none = HealthRegistry::new();
    none.register(circuit_check(Circuits::none())).unwrap();
    assert_eq!(none.report().await.status, HealthStatus::Healthy);
}

#[tokio::test(start_paused = true)]
async fn the_monitor_reports_every_interval_and_stops_on_shutdown() {
    let runs = Arc::new(AtomicUsize::new(0));
    let healthy = Arc::new(AtomicBool::new(true));
    let registry = HealthRegistry::new();
    let (r, h) = (Arc::clone(&runs), Arc::clone(&healthy));
    registry
        .register(HealthCheck::new("flip", Priority::Critical, move || {
            r.fetch_add(1, Ordering::SeqCst);
            let ok = h.load(Ordering::SeqCst);
            async move {
                if ok {
                    Ok(())
                } else {
                    Err("down".to_owned())
                }
            }
        }))
        .unwrap();
    let monitor = HealthMonitor::start(registry, secs(10)).unwrap();
    let mut reports = monitor.subscribe();
    reports.changed().await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 1); // at once
    assert_eq!(monitor.latest().unwrap().status, HealthStatus::Healthy);

    healthy.store(false, Ordering::SeqCst);
    tokio::time::sleep(secs(5)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 1); // not before the interval
    reports.changed().await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!(monitor.latest().unwrap().status, HealthStatus::Unhealthy);
    tokio::time::sleep(secs(25)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 4);

    monitor.shutdown().await;
    reports.borrow_and_update(); // the reports made meanwhile are seen
    assert!(
        reports.changed().await.is_err(),
        "the task ended and closed the channel"
    );
    tokio::time::sleep(secs(100)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 4);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_monitor_stops_it_even_mid_report() {
    let registry = HealthRegistry::new();
    registry
        .register(sleeping(
            "hangs",
            Priority::Critical,
            secs(3600),
            secs(7200),
        ))
        .unwrap();
    let monitor = HealthMonitor::start(registry.clone(), secs(1)).unwrap();
    let mut reports = monitor.subscribe();
    tokio::time::sleep(secs(10)).await; // the first report is still running
    assert!(monitor.latest().is_none());
    let start = Instant::now();
    drop(monitor);
    assert!(reports.changed().await.is_err());
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "the report in progress was cancelled"
    );

    // shutdown() also cancels a report in progress, and returns once the task ended.
    let monitor = HealthMonitor::start(registry, secs(1)).unwrap();
    tokio::time::sleep(secs(10)).await;
    let start = Instant::now();
    monitor.shutdown().await;
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[test]
fn the_monitor_refuses_a_zero_interval_and_a_missing_runtime() {
    let err = HealthMonitor::start(HealthRegistry::new(), secs(1)).unwrap_err();
    assert_eq!(err.field(), "runtime");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        let err = HealthMonitor::start(HealthRegistry::new(), Duration::ZERO).unwrap_err();
        assert_eq!(err.field(), "interval");
    });
}

#[tokio::test(start_paused = true)]
async fn every_report_is_kept_in_a_bounded_history_shared_across_registries() {
    use toolwarden_observability::{CheckStatus, HealthHistory};
    let history = HealthHistory::new(3).unwrap();
    let flips = Arc::new(AtomicUsize::new(0));
    let health = HealthRegistry::new().with_history(history.clone());
    let counter = Arc::clone(&flips);
    health
        .register(HealthCheck::new("flip", Priority::Important, move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                if n.is_multiple_of(2) {
                    Ok(())
                } else {
                    Err(format!("failure {n}"))
                }
            }
        }))
        .unwrap();
    for _ in 0..5 {
        health.report().await;
    }
    let kept = &history.snapshot()["flip"];
    let statuses: Vec<CheckStatus> = kept.iter().map(|e| e.status).collect();
    // Reports 2, 3 and 4 of 0..5: passed, failed, passed.
    assert_eq!(
        statuses,
        [
            CheckStatus::Passed,
            CheckStatus::Failed,
            CheckStatus::Passed
        ]
    );
    assert_eq!(kept[1].message.as_deref(), Some("failure 3"));
    assert!(kept.windows(2).all(|w| w[0].at_unix_ms <= w[1].at_unix_ms));
    assert_eq!(health.history().snapshot(), history.snapshot());

    // A new registry given the same history (a reload) continues it.
    let next = HealthRegistry::new().with_history(history.clone());
    next.register(failing("flip", Priority::Important)).unwrap();
    next.report().await;
    let kept = &history.snapshot()["flip"];
    assert_eq!(kept.len(), 3);
    assert_eq!(kept[2].status, CheckStatus::Failed);

    // A fresh registry has a history of its own, 20 results by default.
    assert_eq!(HealthRegistry::new().history().len_per_check(), 20);
}
