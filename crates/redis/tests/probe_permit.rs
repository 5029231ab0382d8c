//! The fleet-wide probe permit (issue 19), against a real `redis-server`
//! (from `TOOLWARDEN_REDIS_SERVER`, started and stopped here): two breaker
//! layers in one process stand for two replicas in front of one upstream.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use toolwarden_circuit_breaker::{CircuitBreaker, CircuitBreakerLayer, CircuitState};
use toolwarden_core::jsonrpc::{Request, Response};
use toolwarden_core::testing::{text_result, ReadyChecked};
use toolwarden_core::{BoxError, CircuitOpen, Events, Rejection};
use toolwarden_redis::{RedisBreakerSync, RemoteOpenPolicy};
use tower::{Layer, Service, ServiceExt};

use support::{config, redis_bin, wait, RedisServer, LIMIT};

const TOOL: &str = "search";
/// The open period of every breaker here: short, so the tests reach the
/// half-open state soon.
const RESET: Duration = Duration::from_millis(300);

/// The upstream every replica calls: counts the calls that reach it, and
/// answers each one once the gate is open (a counted failure while
/// `failing`, else a success).
#[derive(Clone)]
struct Upstream {
    calls: Arc<AtomicUsize>,
    failing: Arc<AtomicBool>,
    gate: Arc<watch::Sender<bool>>,
}

impl Upstream {
    fn new() -> Self {
        Upstream {
            calls: Arc::new(AtomicUsize::new(0)),
            failing: Arc::new(AtomicBool::new(false)),
            gate: Arc::new(watch::channel(true).0),
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn fail(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Open: calls are answered; closed: they wait.
    fn gate(&self, open: bool) {
        self.gate.send_replace(open);
    }
}

impl Service<Request> for Upstream {
    type Response = Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut gate = self.gate.subscribe();
        let failing = Arc::clone(&self.failing);
        Box::pin(async move {
            gate.wait_for(|open| *open).await?;
            let result = if failing.load(Ordering::SeqCst) {
                json!({"content": [{"type": "text", "text": "Error executing tool search: boom"}], "isError": true})
            } else {
                text_result("ok")
            };
            Ok(Response::result(req.id, result))
        })
    }
}

type Svc = CircuitBreaker<ReadyChecked<Upstream>>;

struct Replica {
    name: &'static str,
    sync: RedisBreakerSync,
    layer: CircuitBreakerLayer,
    svc: Svc,
}

impl Replica {
    fn state(&self) -> Option<CircuitState> {
        self.layer.registry().state(TOOL)
    }

    /// One call (`poll_ready`, then `call`), on its own task: a refusal
    /// ends at once, a call that reached the upstream waits for its gate.
    fn spawn_call(&self) -> JoinHandle<Result<Response, BoxError>> {
        let svc = self.svc.clone();
        tokio::spawn(svc.oneshot(Request::tool_call(1, TOOL, json!({}))))
    }

    /// One call, bounded: a call never hangs on Redis.
    async fn call(&self) -> Result<Response, BoxError> {
        tokio::time::timeout(LIMIT, self.spawn_call())
            .await
            .expect("a call never hangs")
            .unwrap()
    }
}

/// A replica whose breaker opens on one counted failure, stays open for
/// [`RESET`], and lets a probe run `probe_timeout`; its probe permit lasts
/// `permit_ttl` (or `probe_timeout`, if longer).
async fn replica(
    server: &RedisServer,
    name: &'static str,
    upstream: &Upstream,
    probe_timeout: Duration,
    permit_ttl: Duration,
) -> Replica {
    let sync = RedisBreakerSync::builder(config(server, name, Events::new()))
        .policy(RemoteOpenPolicy::Follow)
        .probe_permit_ttl(permit_ttl)
        .start()
        .unwrap();
    let layer = CircuitBreakerLayer::builder()
        .failure_threshold(1)
        .minimum_calls(1)
        .reset_timeout(RESET)
        .jitter(0.0)
        .probe_timeout(probe_timeout)
        .sync(Arc::new(sync.clone()))
        .build()
        .unwrap();
    sync.attach(layer.registry().clone());
    wait("the subscription", || sync.stats().resyncs >= 1).await;
    let svc = layer.layer(ReadyChecked::new(upstream.clone()));
    Replica {
        name,
        sync,
        layer,
        svc,
    }
}

/// Opens `a`'s circuit with one failing call and waits until `b` follows.
async fn open_both(a: &Replica, b: &Replica, upstream: &Upstream) {
    upstream.fail(true);
    assert!(a.call().await.is_ok(), "the failure passes through");
    assert_eq!(a.state(), Some(CircuitState::Open));
    wait("the open reaching b", || {
        b.state() == Some(CircuitState::Open)
    })
    .await;
    upstream.fail(false);
}

/// The refusal in a finished call, if it was one.
fn refused(result: &Result<Response, BoxError>) -> Option<&CircuitOpen> {
    result.as_ref().err()?.downcast_ref::<CircuitOpen>()
}

/// The value of `key` in Redis.
async fn get(server: &RedisServer, key: &str) -> Option<String> {
    let client = redis::Client::open(server.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("GET")
        .arg(key)
        .query_async(&mut c)
        .await
        .unwrap()
}

/// Calls both replicas every 5 ms until `done` or [`LIMIT`]; every
/// finished call must be a refusal with a wait (the probes stay pending at
/// the closed gate and are returned).
async fn hammer(
    replicas: [&Replica; 2],
    mut done: impl FnMut(usize) -> bool,
) -> Vec<JoinHandle<Result<Response, BoxError>>> {
    let deadline = tokio::time::Instant::now() + LIMIT;
    let mut pending = Vec::new();
    let mut rounds = 0;
    while !done(rounds) {
        assert!(tokio::time::Instant::now() < deadline, "hammering too long");
        for r in replicas {
            pending.push(r.spawn_call());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        let mut still = Vec::new();
        for call in pending {
            if call.is_finished() {
                let result = call.await.unwrap();
                let open = refused(&result).expect("a finished call is a refusal");
                let retry_after = open.retry_after().unwrap();
                assert!(retry_after > Duration::ZERO, "{retry_after:?}");
            } else {
                still.push(call);
            }
        }
        pending = still;
        rounds += 1;
    }
    pending
}

/// The calls of `pending` that are still waiting after a moment (the
/// probes at the closed gate); those that finish must be refusals.
async fn settle(
    pending: Vec<JoinHandle<Result<Response, BoxError>>>,
) -> Vec<JoinHandle<Result<Response, BoxError>>> {
    let mut waiting = Vec::new();
    for mut call in pending {
        match tokio::time::timeout(Duration::from_millis(200), &mut call).await {
            Ok(result) => assert!(refused(&result.unwrap()).is_some()),
            Err(_) => waiting.push(call),
        }
    }
    waiting
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_probes_at_a_time_and_both_close_after_its_probe() {
    let Some(bin) = redis_bin() else { return };
    let server = RedisServer::start(&bin).await;
    let upstream = Upstream::new();
    let (probe_timeout, ttl) = (Duration::from_secs(5), Duration::from_secs(20));
    let a = replica(&server, "a", &upstream, probe_timeout, ttl).await;
    let b = replica(&server, "b", &upstream, probe_timeout, ttl).await;
    open_both(&a, &b, &upstream).await;
    assert_eq!(upstream.calls(), 1);

    // The open periods end; the probe will wait at the upstream.
    upstream.gate(false);
    tokio::time::sleep(RESET).await;
    let mut probes = hammer([&a, &b], |_| upstream.calls() >= 2).await;
    // Both keep calling while the permit holds: no second probe.
    probes.extend(hammer([&a, &b], |rounds| rounds >= 100).await);
    let probes = settle(probes).await;
    assert_eq!(
        upstream.calls(),
        2,
        "exactly one probe reached the upstream"
    );
    assert_eq!(probes.len(), 1, "one call is waiting at the upstream");

    let (holder, other) = if a.state() == Some(CircuitState::HalfOpen) {
        (&a, &b)
    } else {
        (&b, &a)
    };
    assert_eq!(holder.state(), Some(CircuitState::HalfOpen));
    assert_eq!(
        other.state(),
        Some(CircuitState::Open),
        "denied: still open"
    );
    let permit = get(&server, "toolwarden:cb-permit:search")
        .await
        .expect("the permit is held in Redis");
    assert!(permit.starts_with(&format!("{}:", holder.name)), "{permit}");
    let (hs, os) = (holder.sync.stats(), other.sync.stats());
    assert_eq!((hs.permits_acquired, os.permits_acquired), (1, 0));
    assert!(os.permits_denied >= 1);
    assert_eq!((hs.permit_fallbacks, os.permit_fallbacks), (0, 0));
    // The denied replica's refusals are not failures.
    let snap = other.layer.registry().circuit(TOOL).unwrap();
    assert!(snap.totals.not_permitted >= 100);
    assert_eq!(snap.totals.failed, u64::from(other.name == "a"));
    // Its refusal waits for the permit's TTL at most.
    let result = other.call().await;
    let retry_after = refused(&result).unwrap().retry_after().unwrap();
    assert!(retry_after <= ttl, "{retry_after:?}");

    // The probe succeeds: the holder closes, the other follows its close,
    // and the permit is released.
    upstream.gate(true);
    for probe in probes {
        assert!(probe.await.unwrap().is_ok());
    }
    assert_eq!(holder.state(), Some(CircuitState::Closed));
    wait("the close reaching the other replica", || {
        other.state() == Some(CircuitState::Closed)
    })
    .await;
    let mut released = false;
    for _ in 0..200 {
        if get(&server, "toolwarden:cb-permit:search").await.is_none() {
            released = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(released, "the holder released the permit");
    assert_eq!(upstream.calls(), 2);
    assert!(a.call().await.is_ok() && b.call().await.is_ok());
    assert_eq!(upstream.calls(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permit_whose_holder_died_expires_and_another_replica_probes() {
    let Some(bin) = redis_bin() else { return };
    let server = RedisServer::start(&bin).await;
    let upstream = Upstream::new();
    // The permit lasts the probe timeout, 1 s (longer than the 1 ms asked).
    let (probe_timeout, ttl) = (Duration::from_secs(1), Duration::from_millis(1));
    let a = replica(&server, "a", &upstream, probe_timeout, ttl).await;
    let b = replica(&server, "b", &upstream, probe_timeout, ttl).await;
    open_both(&a, &b, &upstream).await;

    // Only a asks: it takes the permit and its probe reaches the upstream.
    upstream.gate(false);
    tokio::time::sleep(RESET).await;
    let mut probe = None;
    let deadline = tokio::time::Instant::now() + LIMIT;
    while probe.is_none() {
        assert!(tokio::time::Instant::now() < deadline, "a never probed");
        let call = a.spawn_call();
        tokio::time::sleep(Duration::from_millis(5)).await;
        if call.is_finished() {
            assert!(refused(&call.await.unwrap()).is_some());
        } else {
            probe = Some(call);
        }
    }
    assert_eq!(upstream.calls(), 2);
    assert_eq!(a.sync.stats().permits_acquired, 1);

    // a dies mid-probe: nothing releases its permit.
    probe.unwrap().abort();
    drop(a);
    upstream.gate(true);

    // b is refused while the permit lives, then takes it over and probes;
    // its success closes the circuit.
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        assert!(tokio::time::Instant::now() < deadline, "b never probed");
        let result = b.call().await;
        if result.is_ok() {
            break;
        }
        let retry_after = refused(&result).unwrap().retry_after().unwrap();
        assert!(retry_after <= probe_timeout, "{retry_after:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(upstream.calls(), 3, "one probe each, one at a time");
    assert_eq!(b.state(), Some(CircuitState::Closed));
    let stats = b.sync.stats();
    assert_eq!(stats.permits_acquired, 1);
    assert!(stats.permits_denied >= 1);
    assert_eq!(stats.permit_fallbacks, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_each_replica_probes_on_its_own() {
    let Some(bin) = redis_bin() else { return };
    let mut server = RedisServer::start(&bin).await;
    let upstream = Upstream::new();
    let (probe_timeout, ttl) = (Duration::from_secs(5), Duration::from_secs(20));
    let a = replica(&server, "a", &upstream, probe_timeout, ttl).await;
    let b = replica(&server, "b", &upstream, probe_timeout, ttl).await;
    server.kill().await;

    // Each replica trips on its own failures (nothing propagates) ...
    upstream.fail(true);
    for r in [&a, &b] {
        assert!(r.call().await.is_ok());
        assert_eq!(r.state(), Some(CircuitState::Open));
    }
    upstream.fail(false);
    tokio::time::sleep(RESET).await;

    // ... and, Redis not answering, probes on its own, without hanging:
    // refusals while it finds out, then its own probe closes it.
    for r in [&a, &b] {
        let deadline = tokio::time::Instant::now() + LIMIT;
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} never probed",
                r.name
            );
            let result = r.call().await;
            if result.is_ok() {
                break;
            }
            assert!(refused(&result).unwrap().retry_after().unwrap() > Duration::ZERO);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(r.state(), Some(CircuitState::Closed));
        let stats = r.sync.stats();
        assert!(stats.permit_fallbacks >= 1, "{}: {stats:?}", r.name);
        assert_eq!(stats.permits_acquired, 0);
    }
    assert_eq!(upstream.calls(), 4, "two trips, one probe per replica");
}
