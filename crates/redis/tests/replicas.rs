//! Against a real `redis-server` (from `TOOLWARDEN_REDIS_SERVER`, started and
//! stopped here): two or three stacks in one process stand for replicas.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use toolwarden_circuit_breaker::{CircuitBreakerLayer, CircuitState};
use toolwarden_core::jsonrpc::Request;
use toolwarden_core::testing::{MockMcp, Step};
use toolwarden_core::{Event, Events};
use toolwarden_redis::{
    quota, Decision, Fallback, RedisBreakerSync, RedisRateLimiter, RemoteOpenPolicy,
};
use tower::{Layer, ServiceExt};

use support::{config, redis_bin, wait, RedisServer, LIMIT};

struct Replica {
    sync: RedisBreakerSync,
    layer: CircuitBreakerLayer,
}

async fn replica(server: &RedisServer, name: &str, policy: RemoteOpenPolicy) -> Replica {
    replica_with(server, name, policy, Events::new()).await
}

async fn replica_with(
    server: &RedisServer,
    name: &str,
    policy: RemoteOpenPolicy,
    events: Events,
) -> Replica {
    let sync = RedisBreakerSync::start(config(server, name, events), policy).unwrap();
    let layer = CircuitBreakerLayer::builder()
        .failure_threshold(3)
        .minimum_calls(3)
        .reset_timeout(Duration::from_secs(30))
        .sync(Arc::new(sync.clone()))
        .build()
        .unwrap();
    sync.attach(layer.registry().clone());
    // Subscribed and loaded before the test goes on.
    wait("the subscription", || sync.stats().resyncs >= 1).await;
    Replica { sync, layer }
}

/// Trips `tool` on a replica's breaker with three failing calls.
async fn trip(replica: &Replica, tool: &str) {
    let mock = MockMcp::new().default_step(tool, Step::tool_error("upstream exploded"));
    let svc = replica.layer.layer(mock);
    for i in 0..3 {
        let _ = svc
            .clone()
            .oneshot(Request::tool_call(i, tool, json!({})))
            .await;
    }
    assert_eq!(
        replica.layer.registry().state(tool),
        Some(CircuitState::Open)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attaching_again_keeps_one_subscription() {
    let Some(bin) = redis_bin() else {
        return;
    };
    let server = RedisServer::start(&bin).await;
    let a = replica(&server, "a", RemoteOpenPolicy::Follow).await;
    let b = replica(&server, "b", RemoteOpenPolicy::Follow).await;
    // A reloaded stack attaches its registry again.
    b.sync.attach(b.layer.registry().clone());
    trip(&a, "search").await;
    wait("b hearing a", || b.sync.stats().received >= 1).await;
    // A second subscription would have heard it too, at the same time.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = b.sync.stats();
    assert_eq!((stats.received, stats.resyncs), (1, 1), "{stats:?}");
    assert_eq!(b.layer.registry().state("search"), Some(CircuitState::Open));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_opens_the_other_replica() {
    let Some(bin) = redis_bin() else { return };
    let server = RedisServer::start(&bin).await;
    let a = replica(&server, "a", RemoteOpenPolicy::Follow).await;
    let b = replica(&server, "b", RemoteOpenPolicy::Follow).await;
    let started = std::time::Instant::now();
    trip(&a, "search").await;
    wait("the open reaching b", || {
        b.layer.registry().state("search") == Some(CircuitState::Open)
    })
    .await;
    eprintln!(
        "open propagated in {:?} (see BENCHMARKS.md for the measured figure)",
        started.elapsed()
    );
    // b refuses calls now, without calling its tool.
    let mock = MockMcp::new();
    let err = b
        .layer
        .layer(mock.clone())
        .oneshot(Request::tool_call(9, "search", json!({})))
        .await
        .unwrap_err();
    assert!(err.is::<toolwarden_core::CircuitOpen>());
    assert_eq!(mock.calls("search"), 0);
    // Other keys are untouched, and b did not echo the open back.
    assert_eq!(b.layer.registry().state("fetch"), None);
    assert_eq!(b.sync.stats().published, 0);
    // A close on a closes b too.
    a.layer.registry().force_close("search");
    wait("the close reaching b", || {
        b.layer.registry().state("search") == Some(CircuitState::Closed)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_ignores_one_bad_replica() {
    let Some(bin) = redis_bin() else { return };
    let server = RedisServer::start(&bin).await;
    let a = replica(&server, "a", RemoteOpenPolicy::Follow).await;
    let b = replica(&server, "b", RemoteOpenPolicy::Quorum(2)).await;
    let c = replica(&server, "c", RemoteOpenPolicy::Quorum(2)).await;
    trip(&a, "search").await;
    // b heard a's open and did not follow it.
    wait("b hearing a", || b.sync.stats().received >= 1).await;
    assert_ne!(b.layer.registry().state("search"), Some(CircuitState::Open));
    // A second replica failing on its own makes the quorum.
    wait("c hearing a", || c.sync.stats().received >= 1).await;
    trip(&c, "search").await;
    wait("the quorum opening b", || {
        b.layer.registry().state("search") == Some(CircuitState::Open)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_starting_late_loads_the_current_state() {
    let Some(bin) = redis_bin() else { return };
    let server = RedisServer::start(&bin).await;
    let a = replica(&server, "a", RemoteOpenPolicy::Follow).await;
    trip(&a, "search").await;
    wait("a publishing", || a.sync.stats().published >= 1).await;
    let late = replica(&server, "late", RemoteOpenPolicy::Follow).await;
    assert_eq!(
        late.layer.registry().state("search"),
        Some(CircuitState::Open)
    );
}

/// A quota changed (a reload) starts full in Redis, as the in-process one
/// does: its key carries the quota. Before, a loosened quota kept the debt
/// computed under the old one and refused for the old refill time (here a
/// minute); an unchanged quota still keeps its state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_quota_starts_full_in_redis() {
    let Some(bin) = redis_bin() else { return };
    let server = RedisServer::start(&bin).await;
    let strict = quota(Duration::from_secs(60), 2).unwrap();
    let loose = quota(Duration::from_millis(10), 100).unwrap();
    let limiter =
        RedisRateLimiter::new(config(&server, "a", Events::new()), Fallback::Deny, strict).unwrap();
    wait("the connection", || limiter.is_connected()).await;
    for _ in 0..2 {
        assert_eq!(limiter.decide("slow", strict).await, Decision::Allowed);
    }
    assert!(matches!(
        limiter.decide("slow", strict).await,
        Decision::Limited { .. }
    ));
    for _ in 0..50 {
        assert_eq!(limiter.decide("slow", loose).await, Decision::Allowed);
    }
    assert!(
        matches!(
            limiter.decide("slow", strict).await,
            Decision::Limited { .. }
        ),
        "the strict quota kept its state"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_quota() {
    let Some(bin) = redis_bin() else { return };
    let server = RedisServer::start(&bin).await;
    // 100 calls/s with a burst of 10, shared.
    let q = quota(Duration::from_millis(10), 10).unwrap();
    let window = Duration::from_secs(2);
    let limiters = [
        RedisRateLimiter::new(config(&server, "a", Events::new()), Fallback::Deny, q).unwrap(),
        RedisRateLimiter::new(config(&server, "b", Events::new()), Fallback::Deny, q).unwrap(),
    ];
    for l in &limiters {
        wait("the connection", || l.is_connected()).await;
    }
    let started = tokio::time::Instant::now();
    let tasks: Vec<_> = limiters
        .iter()
        .cloned()
        .map(|limiter| {
            tokio::spawn(async move {
                let (mut admitted, mut fallbacks) = (0u32, 0u32);
                while started.elapsed() < window {
                    match limiter.decide("search", q).await {
                        Decision::Allowed => admitted += 1,
                        Decision::Limited { retry_after } => {
                            assert!(retry_after <= Duration::from_millis(10));
                        }
                        Decision::Fallback(_) => fallbacks += 1,
                    }
                }
                (admitted, fallbacks)
            })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        let (n, fallbacks) = t.await.unwrap();
        assert_eq!(fallbacks, 0, "redis answered every check");
        assert!(n > 0, "both replicas were admitted some calls");
        admitted += n;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let expected = 10.0 + elapsed * 100.0;
    let error = (f64::from(admitted) - expected).abs() / expected;
    assert!(
        error <= 0.05,
        "admitted {admitted}, expected {expected:.0} (±5 %), off by {:.1} %",
        error * 100.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_going_away_keeps_calls_flowing_and_state_converges_after() {
    let Some(bin) = redis_bin() else { return };
    let mut server = RedisServer::start(&bin).await;
    let errors = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counted = Arc::clone(&errors);
    let events = Events::new().with(move |e: &Event<'_>| {
        if e.name() == "sync_failed" {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    // A slow quota: no cell comes back while the checks below run.
    let q = quota(Duration::from_secs(60), 3).unwrap();
    let limiter = RedisRateLimiter::new(config(&server, "a", events), Fallback::Local, q).unwrap();
    wait("the connection", || limiter.is_connected()).await;
    let a = replica(&server, "a", RemoteOpenPolicy::Follow).await;
    let b = replica(&server, "b", RemoteOpenPolicy::Follow).await;
    assert_eq!(limiter.decide("search", q).await, Decision::Allowed);

    server.kill().await;
    // Calls keep flowing on local decisions: the local GCRA admits its burst.
    let mut local = Vec::new();
    for _ in 0..5 {
        let d = tokio::time::timeout(LIMIT, limiter.decide("search", q))
            .await
            .expect("a check never hangs");
        local.push(d);
    }
    assert_eq!(
        local,
        [true, true, true, false, false].map(Decision::Fallback)
    );
    assert!(
        errors.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "sync errors are reported"
    );
    // Breakers keep working locally while Redis is away.
    trip(&a, "search").await;
    assert_ne!(b.layer.registry().state("search"), Some(CircuitState::Open));

    server.restart().await;
    // a re-publishes what happened meanwhile; b converges.
    wait("b converging after the restart", || {
        b.layer.registry().state("search") == Some(CircuitState::Open)
    })
    .await;
    let mut back = false;
    for _ in 0..400 {
        if !matches!(limiter.decide("fresh-key", q).await, Decision::Fallback(_)) {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(back, "the limiter decides in Redis again");
}

/// Two replicas given one `replica_id` (a config file shared by the fleet)
/// share no breaker state: each drops the other's messages as its own, and
/// they write the same field. That was silent; the first message of the
/// twin is now reported as a `SyncFailed` that names the id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_id_used_twice_is_reported() {
    let Some(bin) = redis_bin() else { return };
    let server = RedisServer::start(&bin).await;
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let events = Events::new().with({
        let failures = Arc::clone(&failures);
        move |event: &Event<'_>| {
            if let Event::SyncFailed { detail } = event {
                failures.lock().unwrap().push((*detail).to_owned());
            }
        }
    });
    let a = replica(&server, "dup", RemoteOpenPolicy::Follow).await;
    let b = replica_with(&server, "dup", RemoteOpenPolicy::Follow, events).await;
    trip(&a, "search").await;
    wait("the twin reported", || {
        failures
            .lock()
            .unwrap()
            .iter()
            .any(|f| f.contains("another replica uses replica_id \"dup\""))
    })
    .await;
    assert_ne!(b.layer.registry().state("search"), Some(CircuitState::Open));
}

/// A tool named `events`, as the pub/sub channel's last segment: its state
/// is a key like any other's, and a replica started late loads it (it was
/// skipped as the channel, which is no key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_named_like_the_channel_is_loaded_by_a_late_replica() {
    let Some(bin) = redis_bin() else { return };
    let server = RedisServer::start(&bin).await;
    let a = replica(&server, "a", RemoteOpenPolicy::Follow).await;
    trip(&a, "events").await;
    trip(&a, "boom").await;
    let late = replica(&server, "late", RemoteOpenPolicy::Follow).await;
    for tool in ["events", "boom"] {
        wait("the late replica following the open", || {
            late.layer.registry().state(tool) == Some(CircuitState::Open)
        })
        .await;
    }
}

/// A replica loads the fleet's breaker states however many keys there are,
/// at most 10 000 of them, and skips what is not a breaker state instead of
/// failing the whole load. Before, the load was one operation bounded by
/// `op_timeout`, one round trip per key: past a few hundred keys it timed
/// out, was tried fifty times and given up, and the replica never loaded
/// anything (and any key of another type under the prefix failed it too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_loads_thousands_of_states_and_skips_what_is_not_one() {
    let Some(bin) = redis_bin() else { return };
    let server = RedisServer::start(&bin).await;
    let client = redis::Client::open(server.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let until = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + 600_000;
    const STATES: usize = 10_300;
    for first in (0..STATES).step_by(1_000) {
        let mut pipe = redis::pipe();
        for n in first..(first + 1_000).min(STATES) {
            pipe.hset(format!("toolwarden:cb:tool-{n}"), "elsewhere", until)
                .ignore();
        }
        pipe.query_async::<()>(&mut c).await.unwrap();
    }
    // Another program's key under the prefix, and a state whose value is
    // not a time.
    redis::cmd("SET")
        .arg("toolwarden:cb:not-a-hash")
        .arg("x")
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    redis::cmd("HSET")
        .arg("toolwarden:cb:not-a-time")
        .arg("elsewhere")
        .arg("soon")
        .query_async::<()>(&mut c)
        .await
        .unwrap();

    // `replica` waits for the first load to complete.
    let late = replica(&server, "late", RemoteOpenPolicy::Follow).await;
    let stats = late.sync.stats();
    // Every key is either loaded (one report each from `elsewhere`), at
    // most 10 000, or counted as left out: the 302 past 10 000, and each of
    // the two odd ones that was among the first 10 000. (A key `SCAN`
    // returns twice past the bound is counted twice.)
    assert!(
        stats.received + stats.resync_skipped >= STATES as u64 + 2,
        "{stats:?}"
    );
    assert!((9_998..=10_000).contains(&stats.received), "{stats:?}");
    assert!(stats.resync_skipped >= 302, "{stats:?}");
    assert!(
        stats.applied > 0,
        "the loaded opens were followed: {stats:?}"
    );
}
