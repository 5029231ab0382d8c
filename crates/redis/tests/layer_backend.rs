//! `RedisRateLimiter` as the backend of `RateLimitLayer`, against a real
//! `redis-server` (from `TOOLWARDEN_REDIS_SERVER`, started and stopped here):
//! two layer stacks in one process stand for two replicas.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use toolwarden_core::jsonrpc::{Request, Response};
use toolwarden_core::testing::{MockMcp, ReadyChecked};
use toolwarden_core::{BoxError, Event, Events, RateLimited, Rejection};
use toolwarden_rate_limit::{Rate, RateLimit, RateLimitBuilder, RateLimitLayer};
use toolwarden_redis::{quota, Fallback, RedisConfig, RedisRateLimiter};
use tower::{Layer, Service, ServiceExt};

use support::{config, redis_bin, wait, RedisServer, LIMIT};

type Stack = RateLimit<ReadyChecked<MockMcp>>;

/// Counts of the events one replica saw.
#[derive(Debug, Default)]
struct Counts {
    sync_errors: AtomicU32,
    rate_limited: AtomicU32,
}

fn counting(counts: &Arc<Counts>) -> Events {
    let counts = Arc::clone(counts);
    Events::new().with(move |e: &Event<'_>| match e {
        Event::SyncFailed { .. } => {
            counts.sync_errors.fetch_add(1, Ordering::Relaxed);
        }
        Event::RateLimited { .. } => {
            counts.rate_limited.fetch_add(1, Ordering::Relaxed);
        }
        _ => {}
    })
}

/// One replica: a layer built from `builder` whose backend is a Redis
/// limiter on `server`, over a mock that panics when called before it is ready.
struct Replica {
    svc: Stack,
    mock: MockMcp,
    limiter: RedisRateLimiter,
    counts: Arc<Counts>,
}

async fn replica(
    server: &RedisServer,
    name: &str,
    fallback: Fallback,
    builder: RateLimitBuilder,
) -> Replica {
    let counts = Arc::new(Counts::default());
    // `local_quota` serves only the standalone check; the layer has its own.
    let unused = quota(Duration::from_secs(1), 1).unwrap();
    let limiter =
        RedisRateLimiter::new(config(server, name, counting(&counts)), fallback, unused).unwrap();
    wait("the connection", || limiter.is_connected()).await;
    let layer = builder
        .backend(limiter.clone())
        .events(counting(&counts))
        .build()
        .unwrap();
    let mock = MockMcp::new();
    let svc = layer.layer(ReadyChecked::new(mock.clone()));
    Replica {
        svc,
        mock,
        limiter,
        counts,
    }
}

/// `poll_ready`, then `call`.
async fn call(svc: &mut Stack, tool: &str) -> Result<Response, BoxError> {
    svc.ready()
        .await?
        .call(Request::tool_call(1, tool, json!({})))
        .await
}

fn rate_limited(result: Result<Response, BoxError>) -> RateLimited {
    match result {
        Ok(resp) => panic!("expected RateLimited, the call went through: {resp:?}"),
        Err(err) => match err.downcast::<RateLimited>() {
            Ok(limited) => *limited,
            Err(other) => panic!("expected RateLimited, got {other}"),
        },
    }
}

fn retry_after(limited: &RateLimited) -> Duration {
    Rejection::retry_after(limited).expect("a rate limit knows when to retry")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_layer_replicas_admit_the_global_quota_between_them() {
    let Some(bin) = redis_bin() else { return };
    let server = RedisServer::start(&bin).await;
    // 100 calls/s with a burst of 10, shared by both replicas.
    let builder = || RateLimitLayer::builder().global(Rate::per_second(100), 10);
    let replicas = [
        replica(&server, "a", Fallback::Deny, builder()).await,
        replica(&server, "b", Fallback::Deny, builder()).await,
    ];
    let window = Duration::from_secs(2);
    let tools = ["search", "fetch", "read_file"];
    let started = tokio::time::Instant::now();
    let tasks: Vec<_> = replicas
        .iter()
        .map(|r| {
            let mut svc = r.svc.clone();
            tokio::spawn(async move {
                let (mut admitted, mut refused) = (0u32, 0u32);
                let mut i = 0;
                while started.elapsed() < window {
                    i += 1;
                    match call(&mut svc, tools[i % tools.len()]).await {
                        Ok(_) => admitted += 1,
                        Err(err) => {
                            let limited = rate_limited(Err(err));
                            assert_eq!(limited.key(), "global");
                            let retry_after = retry_after(&limited);
                            assert!(
                                retry_after > Duration::ZERO
                                    && retry_after <= Duration::from_millis(10),
                                "{limited}"
                            );
                            refused += 1;
                        }
                    }
                }
                (admitted, refused)
            })
        })
        .collect();
    let mut admitted = 0;
    for (task, r) in tasks.into_iter().zip(&replicas) {
        let (n, refused) = task.await.unwrap();
        assert!(n > 0, "both replicas were admitted some calls");
        assert!(refused > 0, "the quota was exhausted");
        assert_eq!(
            r.mock.total_calls(),
            n as usize,
            "admitted calls reached the tool"
        );
        assert_eq!(r.counts.rate_limited.load(Ordering::Relaxed), refused);
        assert_eq!(
            r.counts.sync_errors.load(Ordering::Relaxed),
            0,
            "redis answered every check"
        );
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
    // The in-process quotas were never used.
    for r in &replicas {
        assert!(r
            .svc
            .limits()
            .check(&Request::tool_call(1, "x", json!({})))
            .is_ok());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_through_the_layer_names_the_tool_and_when_to_retry() {
    let Some(bin) = redis_bin() else { return };
    let server = RedisServer::start(&bin).await;
    let builder = || RateLimitLayer::builder().per_tool(Rate::per_minute(1), 2);
    let mut a = replica(&server, "a", Fallback::Allow, builder()).await;
    let mut b = replica(&server, "b", Fallback::Allow, builder()).await;
    // a spends the burst of `search`; b is refused, on the tool's key.
    call(&mut a.svc, "search").await.unwrap();
    call(&mut a.svc, "search").await.unwrap();
    let limited = rate_limited(call(&mut b.svc, "search").await);
    assert_eq!(limited.key(), "search");
    let retry_after = retry_after(&limited);
    assert!(
        retry_after > Duration::from_secs(55) && retry_after <= Duration::from_secs(60),
        "{limited}"
    );
    assert_eq!(b.mock.calls("search"), 0);
    assert_eq!(b.counts.rate_limited.load(Ordering::Relaxed), 1);
    // Another tool has its own quota.
    call(&mut b.svc, "fetch").await.unwrap();
    // The layer's key is the standalone limiter's key: the same quota.
    let layer_quota = builder().build().unwrap().tool_quota("search").unwrap();
    let standalone = a
        .limiter
        .check(
            "search",
            quota(layer_quota.interval(), layer_quota.burst()).unwrap(),
        )
        .await
        .unwrap_err();
    assert_eq!(standalone.key(), "search");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_tool_override_is_honoured_through_redis() {
    let Some(bin) = redis_bin() else { return };
    let server = RedisServer::start(&bin).await;
    let builder = || {
        RateLimitLayer::builder()
            .per_tool(Rate::per_second(1000), 1000)
            .tool("send_email", |b| b.per_tool(Rate::per_minute(1), 1))
    };
    let mut a = replica(&server, "a", Fallback::Allow, builder()).await;
    let mut b = replica(&server, "b", Fallback::Allow, builder()).await;
    call(&mut a.svc, "send_email").await.unwrap();
    let limited = rate_limited(call(&mut b.svc, "send_email").await);
    assert_eq!(limited.key(), "send_email");
    assert!(retry_after(&limited) > Duration::from_secs(55), "{limited}");
    let limited = rate_limited(call(&mut a.svc, "send_email").await);
    assert_eq!(limited.key(), "send_email");
    // Other tools get the generous per-tool quota meanwhile.
    for _ in 0..20 {
        call(&mut a.svc, "search").await.unwrap();
        call(&mut b.svc, "search").await.unwrap();
    }
    assert_eq!(a.mock.calls("send_email") + b.mock.calls("send_email"), 1);
    assert_eq!(a.mock.calls("search") + b.mock.calls("search"), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_run_every_call_gets_one_answer_by_the_fallback() {
    let Some(bin) = redis_bin() else { return };
    let mut server = RedisServer::start(&bin).await;
    // `search`: a quota that does not refill during the test (3 at once, then
    // one a minute); `stream`: a generous one for the calls across the kill.
    let builder = || {
        RateLimitLayer::builder()
            .per_tool(Rate::per_minute(1), 3)
            .tool("stream", |b| b.per_tool(Rate::per_second(1000), 1000))
    };
    let mut allow = replica(&server, "allow", Fallback::Allow, builder()).await;
    let mut deny = replica(&server, "deny", Fallback::Deny, builder()).await;
    let mut local = replica(&server, "local", Fallback::Local, builder()).await;
    // Before the kill, Redis decides: one `search` each, a shared key (3 in all).
    for r in [&mut allow, &mut deny, &mut local] {
        call(&mut r.svc, "search").await.unwrap();
    }
    let limited = rate_limited(call(&mut allow.svc, "search").await);
    assert_eq!(limited.key(), "search");

    // Calls keep flowing on every replica while Redis is killed under them.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let streams: Vec<_> = [&allow, &deny, &local]
        .into_iter()
        .map(|r| {
            let mut svc = r.svc.clone();
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let (mut answered, mut admitted) = (0u32, 0u32);
                while !stop.load(Ordering::Relaxed) {
                    let result = tokio::time::timeout(LIMIT, call(&mut svc, "stream"))
                        .await
                        .expect("a call never hangs");
                    match result {
                        Ok(_) => admitted += 1,
                        Err(err) => assert!(err.is::<RateLimited>(), "{err}"),
                    }
                    answered += 1;
                }
                (answered, admitted)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.kill().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for (task, r) in streams.into_iter().zip([&allow, &deny, &local]) {
        let (answered, admitted) = task.await.expect("no panic");
        assert!(answered > 0);
        // Each admitted call reached the tool once; refused ones never did.
        assert_eq!(r.mock.calls("stream"), admitted as usize);
    }

    // Now without Redis: 10 concurrent calls on each replica, one answer each.
    async fn ten(r: &Replica) -> Vec<Result<Response, BoxError>> {
        let calls: Vec<_> = (0..10)
            .map(|_| {
                let mut svc = r.svc.clone();
                tokio::spawn(async move {
                    tokio::time::timeout(LIMIT, call(&mut svc, "search"))
                        .await
                        .expect("a call never hangs")
                })
            })
            .collect();
        let mut results = Vec::new();
        for c in calls {
            results.push(c.await.expect("no panic"));
        }
        results
    }
    // Allow: every call goes through.
    let results = ten(&allow).await;
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(allow.mock.calls("search"), 1 + 10);
    // Deny: every call is refused on its key, retry after the emission interval.
    for result in ten(&deny).await {
        let limited = rate_limited(result);
        assert_eq!(limited.key(), "search");
        assert_eq!(retry_after(&limited), Duration::from_secs(60));
    }
    assert_eq!(deny.mock.calls("search"), 1);
    // Local: the layer's own quota decides: its burst of 3 (unspent, Redis
    // decided before), then refusals with its retry_after.
    let results = ten(&local).await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 3);
    for result in results.into_iter().filter(Result::is_err) {
        let limited = rate_limited(result);
        assert_eq!(limited.key(), "search");
        assert!(
            retry_after(&limited) <= Duration::from_secs(60),
            "{limited}"
        );
    }
    assert_eq!(local.mock.calls("search"), 1 + 3);
    for r in [&allow, &deny, &local] {
        assert!(
            r.counts.sync_errors.load(Ordering::Relaxed) > 0,
            "sync errors are reported"
        );
    }

    // Redis back: decisions are shared again (the deny replica is admitted
    // on a fresh key, which its fallback would refuse).
    server.restart().await;
    let mut back = false;
    for _ in 0..400 {
        if call(&mut deny.svc, "fresh").await.is_ok() {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(back, "the layer decides in Redis again");
}

/// Redis restarted between two calls, with none while it was down: the
/// first call after it is back is decided by Redis, not by the fallback.
/// The command connection learns that its socket is gone from that call's
/// failure; it is run again on the new connection (within `op_timeout`),
/// where each replica's first limited call after a restart was refused
/// (`Fallback::Deny`) though Redis had been back for seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_call_after_a_redis_restart_is_decided_by_redis() {
    let Some(bin) = redis_bin() else { return };
    let mut server = RedisServer::start(&bin).await;
    let builder = RateLimitLayer::builder().per_tool(Rate::per_second(1000), 1000);
    let mut deny = replica(&server, "deny", Fallback::Deny, builder).await;
    call(&mut deny.svc, "search").await.unwrap();
    server.kill().await;
    server.restart().await;
    let errors_before = deny.counts.sync_errors.load(Ordering::Relaxed);
    for n in 0..3 {
        call(&mut deny.svc, "search")
            .await
            .unwrap_or_else(|e| panic!("call {n} after the restart: {e}"));
    }
    assert_eq!(deny.mock.calls("search"), 4);
    assert_eq!(
        deny.counts.sync_errors.load(Ordering::Relaxed),
        errors_before,
        "no operation failed"
    );
    assert!(deny.limiter.is_connected());
}

/// While Redis is gone, one operation per `reconnect_min` tries it (and
/// may wait up to `op_timeout`); the others fail at once, reporting
/// nothing: every call of every replica waited the whole `op_timeout`
/// while Redis was down. Once Redis is back, the next try finds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_is_down_one_operation_per_interval_tries_it() {
    let Some(bin) = redis_bin() else { return };
    let mut server = RedisServer::start(&bin).await;
    let limiter = |interval: Duration, counts: &Arc<Counts>| {
        let config = RedisConfig::builder(server.url())
            .replica_id("r")
            .op_timeout(Duration::from_millis(100))
            .reconnect_backoff(interval, interval)
            .events(counting(counts))
            .build()
            .unwrap();
        let unused = quota(Duration::from_secs(1), 1).unwrap();
        RedisRateLimiter::new(config, Fallback::Deny, unused).unwrap()
    };
    let counts = Arc::new(Counts::default());
    let hourly = limiter(Duration::from_secs(3600), &counts);
    let quick = limiter(Duration::from_millis(50), &Arc::default());
    wait("the connections", || {
        hourly.is_connected() && quick.is_connected()
    })
    .await;
    hourly.ping().await.unwrap();
    quick.ping().await.unwrap();
    server.kill().await;

    let tried = hourly.ping().await.unwrap_err();
    assert!(!tried.detail.contains("is down"), "{tried}");
    let reported = counts.sync_errors.load(Ordering::Relaxed);
    assert!(reported >= 1);
    for _ in 0..20 {
        let skipped = hourly.ping().await.unwrap_err();
        assert!(skipped.detail.contains("redis is down"), "{skipped}");
    }
    assert_eq!(counts.sync_errors.load(Ordering::Relaxed), reported);

    quick.ping().await.unwrap_err();
    server.restart().await;
    let mut back = false;
    for _ in 0..200 {
        if quick.ping().await.is_ok() {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(back, "the next try after Redis came back found it");
}
