//! Replicas end to end: two `toolwarden` processes sharing one real
//! `redis-server` (`[redis]`), in front of ONE flaky test server over
//! Streamable HTTP (so its `stats` count what reached it from both).
//!
//! One test, in steps, because each step builds on the state the previous
//! one left (an open circuit, a spent quota, a dead Redis):
//!
//! 1. a breaker opened in replica A refuses in replica B (the propagation
//!    time is printed; it is measured by `benches/redis.rs`,
//!    `redis/breaker_open_propagation`, not asserted: tests time nothing);
//! 2. once the open period is over, both replicas are called, and only one
//!    probe reaches the recovering server (the fleet-wide probe permit);
//! 3. a global quota of 20/s admits 20/s ± 5 % across both replicas;
//! 4. with Redis killed both replicas keep serving under `fallback =
//!    "local"` (each limited by its own quota), `/health` says `fallback`;
//!    with Redis restarted on the same port they report `connected` and
//!    converge: a breaker opened in A after the restart refuses in B.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use support::{bounded, component, eventually, free_port, health, http_get, Proxy, LIMIT};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;
use tokio::time::Instant;

/// The global quota the replicas share, per second.
const QUOTA: f64 = 20.0;
/// Its burst. Not 1: with a burst of one cell, every cell a call reaches
/// late (its round trip through a loaded machine) is lost for good, and the
/// count drifts below the quota by the machine's load, not the limiter's
/// accuracy; five cells (250 ms) absorb those delays, so the ±5 % below
/// measures the sharing.
const BURST: f64 = 5.0;
/// How long the replicas hammer the quota.
const HAMMER: Duration = Duration::from_secs(3);

/// A `redis-server` on a fixed free port; killed on drop, restartable.
struct Redis {
    bin: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Redis {
    async fn start(bin: &Path) -> Redis {
        let mut redis = Redis {
            bin: bin.to_owned(),
            port: free_port(),
            child: None,
        };
        redis.restart().await;
        redis
    }

    async fn restart(&mut self) {
        let child = Command::new(&self.bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let port = self.port;
        let up = eventually(LIMIT, || async move {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()?;
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            stream.write_all(b"PING\r\n").await.ok()?;
            let mut answer = [0u8; 7];
            stream.read_exact(&mut answer).await.ok()?;
            (&answer == b"+PONG\r\n").then_some(())
        })
        .await;
        assert!(up.is_some(), "redis-server never answered on {port}");
    }

    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.ok();
            child.wait().await.ok();
        }
    }
}

/// The flaky server over Streamable HTTP: `flaky_search` always fails.
async fn flaky_server(python: &Path) -> support::FlakyHttp {
    support::FlakyHttp::start(python, &[("FLAKY_FAILURES", "1000000")]).await
}

/// One replica: the proxy over stdio, its metrics port, its request ids.
struct Replica {
    name: &'static str,
    proxy: Proxy,
    metrics: u16,
    next_id: AtomicI64,
}

/// What a `tools/call` came back as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// A result from the server (its `isError` too: the server answered).
    Reached { is_error: bool },
    /// Refused by the rate limit.
    RateLimited,
    /// Refused by an open circuit.
    CircuitOpen,
}

fn text(answer: &Value) -> String {
    answer["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

impl Replica {
    /// `toolwarden run --config <config> <upstream...>` (no `upstream`
    /// arguments: a gateway of the file's `[upstreams.NAME]`).
    async fn start(name: &'static str, config: &Path, upstream: &[&str]) -> Replica {
        let metrics = free_port();
        let metrics_addr = format!("127.0.0.1:{metrics}");
        let mut args = vec![
            "run",
            "--config",
            config.to_str().unwrap(),
            "--metrics-addr",
            &metrics_addr,
        ];
        args.extend_from_slice(upstream);
        let mut proxy = Proxy::start(&args, &[("TOOLWARDEN_REDIS_REPLICA_ID", name)]);
        proxy.initialize().await;
        Replica {
            name,
            proxy,
            metrics,
            next_id: AtomicI64::new(1),
        }
    }

    async fn call(&mut self, tool: &str, arguments: Value) -> (Answer, Value) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let answer = self.proxy.call(id, tool, arguments).await;
        assert!(answer.get("result").is_some(), "{}: {answer}", self.name);
        let is_error = answer["result"]["isError"] == true;
        let said = text(&answer);
        let kind = if !is_error {
            Answer::Reached { is_error }
        } else if said.starts_with("too many calls to") {
            Answer::RateLimited
        } else if said.contains("is failing and was not called") {
            Answer::CircuitOpen
        } else {
            Answer::Reached { is_error }
        };
        (kind, answer)
    }

    /// Calls until the rate limit lets the call through (the quota is
    /// shared and small); returns the first answer that is not a
    /// rate-limit refusal.
    async fn call_admitted(&mut self, tool: &str, arguments: Value) -> (Answer, Value) {
        let deadline = Instant::now() + LIMIT;
        loop {
            let (kind, answer) = self.call(tool, arguments.clone()).await;
            if kind != Answer::RateLimited {
                return (kind, answer);
            }
            assert!(
                Instant::now() < deadline,
                "{}: {tool} was rate limited for {LIMIT:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
    }

    /// The flaky server's call counts, asked through this replica.
    async fn upstream_calls(&mut self, tool: &str) -> u64 {
        let (kind, answer) = self.call_admitted("stats", json!({})).await;
        assert_eq!(kind, Answer::Reached { is_error: false }, "{answer}");
        answer["result"]["structuredContent"][tool]
            .as_u64()
            .unwrap_or_else(|| panic!("no {tool} count in {answer}"))
    }

    /// The state of `tool`'s circuit in `/circuits` (`None`: no circuit yet).
    async fn circuit(&self, tool: &str) -> Option<String> {
        let (_, body) = http_get(self.metrics, "/circuits").await?;
        let snapshot: Value = serde_json::from_str(&body).ok()?;
        snapshot["circuits"]
            .as_array()?
            .iter()
            .find(|c| c["key"] == tool)
            .and_then(|c| c["state"].as_str().map(str::to_owned))
    }

    /// The state of the gateway upstream `name`'s breaker in `/circuits`.
    async fn upstream_circuit(&self, name: &str) -> Option<String> {
        let (_, body) = http_get(self.metrics, "/circuits").await?;
        let snapshot: Value = serde_json::from_str(&body).ok()?;
        snapshot["upstreams"][name]["state"]
            .as_str()
            .map(str::to_owned)
    }

    /// Waits until `/health`'s `redis.state` is `want`; returns the report.
    async fn wait_redis_state(&self, want: &str) -> Value {
        let metrics = self.metrics;
        let reached = eventually(LIMIT, || async move {
            let (_, report) = health(metrics).await?;
            (report["redis"]["state"] == want).then_some(report)
        })
        .await;
        reached.unwrap_or_else(|| panic!("{}: /health never said redis {want}", self.name))
    }

    /// Trips `tool`'s circuit: calls it (each failing) until it is open.
    /// Returns when the answer that opened it came (the circuit opened
    /// before that answer left the proxy).
    async fn trip(&mut self, tool: &str, arguments: Value) -> Instant {
        let deadline = Instant::now() + LIMIT;
        let mut last_failure = None;
        loop {
            let (kind, answer) = self.call_admitted(tool, arguments.clone()).await;
            match kind {
                Answer::CircuitOpen => {
                    return last_failure.unwrap_or_else(|| panic!("{tool} was open already"))
                }
                Answer::Reached { is_error: true } => last_failure = Some(Instant::now()),
                other => panic!("{}: {tool} answered {other:?}: {answer}", self.name),
            }
            if self.circuit(tool).await.as_deref() == Some("open") {
                return last_failure.unwrap_or_else(Instant::now);
            }
            assert!(
                Instant::now() < deadline,
                "{}: {tool}'s circuit never opened",
                self.name
            );
        }
    }
}

/// Both replicas call `tool` as fast as they answer for `length`: how many
/// calls were admitted and refused by the rate limit, each replica's
/// admitted count, and the window from the first call sent to the last.
/// Waits until the quota's bucket is full again: its burst, and a margin.
async fn sleep_to_a_full_bucket() {
    tokio::time::sleep(Duration::from_secs_f64(BURST / QUOTA) + Duration::from_millis(100)).await;
}

async fn hammer(
    replicas: &[Arc<Mutex<Replica>>],
    tool: &'static str,
    length: Duration,
) -> (u64, u64, Vec<u64>, Duration) {
    let start = Instant::now();
    let deadline = start + length;
    let tasks: Vec<_> = replicas
        .iter()
        .map(|replica| {
            let replica = Arc::clone(replica);
            tokio::spawn(async move {
                let mut replica = replica.lock().await;
                let (mut admitted, mut refused) = (0u64, 0u64);
                let mut last_sent = Instant::now();
                while Instant::now() < deadline {
                    last_sent = Instant::now();
                    let (kind, answer) = replica.call(tool, json!({})).await;
                    match kind {
                        Answer::Reached { is_error: false } => admitted += 1,
                        Answer::RateLimited => refused += 1,
                        other => panic!("{}: {tool} answered {other:?}: {answer}", replica.name),
                    }
                }
                (admitted, refused, last_sent)
            })
        })
        .collect();
    let mut per_replica = Vec::new();
    let (mut admitted, mut refused) = (0, 0);
    let mut last = start;
    for task in tasks {
        let (a, r, sent) = bounded("a replica's hammering", LIMIT, task).await.unwrap();
        admitted += a;
        refused += r;
        per_replica.push(a);
        last = last.max(sent);
    }
    (admitted, refused, per_replica, last - start)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_breakers_and_quotas_through_redis() {
    let (Some(redis_bin), Some(python)) = (
        component("TOOLWARDEN_REDIS_SERVER"),
        component("TOOLWARDEN_PYTHON"),
    ) else {
        return;
    };
    let mut redis = Redis::start(&redis_bin).await;
    let flaky = flaky_server(&python).await;
    let dir = std::env::temp_dir().join(format!("toolwarden-replicas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("replicas.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[redis]
url = "redis://127.0.0.1:{redis_port}/"
prefix = "replicas-e2e-{pid}"
op_timeout = "100ms"
reconnect_min = "50ms"
reconnect_max = "500ms"
probe_permit_ttl = "5s"
fallback = "local"

[upstream]
attempt_timeout = "500ms"

[circuit_breaker]
failure_threshold = 3
minimum_calls = 3
reset_timeout = "2s"
jitter = 0.0
probe_timeout = "5s"

[rate_limit]
global = {{ rate = "{quota}/s", burst = {burst} }}

[retry]
enabled = false

[loop_guard]
enabled = false

[fallback_cache]
enabled = false
"#,
            redis_port = redis.port,
            pid = std::process::id(),
            quota = QUOTA as u32,
            burst = BURST as u32,
        ),
    )
    .unwrap();
    let upstream = format!("http://127.0.0.1:{}/mcp", flaky.port);
    let upstream = ["--upstream-url", upstream.as_str()];
    let mut a = Replica::start("replica-a", &config, &upstream).await;
    let mut b = Replica::start("replica-b", &config, &upstream).await;
    for replica in [&a, &b] {
        let report = replica.wait_redis_state("connected").await;
        assert_eq!(report["redis"]["replica_id"], replica.name, "{report}");
        assert_eq!(report["redis"]["fallback"], "local", "{report}");
    }

    // 1. A breaker opened in A refuses in B.
    let search = json!({"query": "replicas"});
    let opened = a.trip("flaky_search", search.clone()).await;
    assert_eq!(a.circuit("flaky_search").await.as_deref(), Some("open"));
    let seen = bounded("B seeing A's open circuit", LIMIT, async {
        while b.circuit("flaky_search").await.as_deref() != Some("open") {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        opened.elapsed()
    })
    .await;
    println!(
        "replicas: B saw A's open circuit {seen:?} after A's opening answer (polling /circuits)"
    );
    let reached = a.upstream_calls("flaky_search").await;
    assert_eq!(reached, 3, "three failures open the circuit");
    let (kind, answer) = b.call_admitted("flaky_search", search.clone()).await;
    assert_eq!(kind, Answer::CircuitOpen, "B refuses: {answer}");
    assert_eq!(
        a.upstream_calls("flaky_search").await,
        reached,
        "B's refused call did not reach the server"
    );

    // 2. The open period (2 s) ends; both replicas call the recovering
    //    server until 4 s after the open: one probe reaches it (it fails:
    //    the holder re-opens for 4 s and keeps the permit for 5 s, the
    //    other is refused while the permit is taken).
    let replicas = [Arc::new(Mutex::new(a)), Arc::new(Mutex::new(b))];
    let probe_window_end = opened + Duration::from_secs(4);
    let tasks: Vec<_> = replicas
        .iter()
        .map(|replica| {
            let replica = Arc::clone(replica);
            let search = search.clone();
            tokio::spawn(async move {
                let mut replica = replica.lock().await;
                let mut reached = 0u32;
                while Instant::now() < probe_window_end {
                    if let (Answer::Reached { .. }, _) =
                        replica.call("flaky_search", search.clone()).await
                    {
                        reached += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                reached
            })
        })
        .collect();
    let mut probes = Vec::new();
    for task in tasks {
        probes.push(bounded("the probe window", LIMIT, task).await.unwrap());
    }
    let after_probe = replicas[0]
        .lock()
        .await
        .upstream_calls("flaky_search")
        .await;
    println!("replicas: probes reaching the server per replica: {probes:?}");
    assert_eq!(
        after_probe,
        reached + 1,
        "exactly one probe reached the recovering server (per replica: {probes:?})"
    );
    assert_eq!(probes.iter().sum::<u32>(), 1, "{probes:?}");
    // Through the permit in Redis: one replica won it, the other was denied.
    let (mut acquired, mut denied) = (0, 0);
    for replica in &replicas {
        let metrics = replica.lock().await.metrics;
        let (_, report) = health(metrics).await.unwrap();
        acquired += report["redis"]["sync"]["permits_acquired"]
            .as_u64()
            .unwrap();
        denied += report["redis"]["sync"]["permits_denied"].as_u64().unwrap();
    }
    println!("replicas: probe permits acquired {acquired}, denied {denied}");
    assert!(
        acquired >= 1 && denied >= 1,
        "acquired {acquired}, denied {denied}"
    );

    // 3. The global quota is shared: N/s across both replicas.
    sleep_to_a_full_bucket().await;
    let (admitted, refused, per_replica, window) = hammer(&replicas, "stats", HAMMER).await;
    let expected = BURST + QUOTA * window.as_secs_f64();
    println!(
        "replicas: quota {QUOTA}/s over {window:?}: admitted {admitted} ({per_replica:?}), \
         refused {refused}, expected {expected:.1}"
    );
    assert!(
        (admitted as f64 - expected).abs() <= expected * 0.05,
        "admitted {admitted} across both replicas, expected {expected:.1} ± 5 %"
    );
    assert!(
        per_replica.iter().all(|&n| n > 0),
        "both replicas were admitted: {per_replica:?}"
    );
    assert!(refused > admitted, "the replicas called past the quota");

    // 4. Redis goes away: both keep serving under the local fallback.
    redis.kill().await;
    for replica in &replicas {
        let replica = replica.lock().await;
        let report = replica.wait_redis_state("fallback").await;
        assert_eq!(report["status"], "degraded", "{report}");
    }
    sleep_to_a_full_bucket().await;
    let (admitted, refused, per_replica, window) =
        hammer(&replicas, "stats", Duration::from_secs(1)).await;
    let local_bound = BURST + QUOTA * window.as_secs_f64();
    println!(
        "replicas: Redis away, over {window:?}: admitted {per_replica:?}, refused {refused} \
         (each replica's own quota: {local_bound:.1})"
    );
    assert!(
        per_replica.iter().all(|&n| n >= 1),
        "both replicas kept serving: {per_replica:?}"
    );
    assert!(
        per_replica
            .iter()
            .all(|&n| n as f64 <= local_bound * 1.05 + 1.0),
        "each replica is still limited by its own quota: {per_replica:?}"
    );
    // (How many are refused depends on how fast a call to the dead Redis
    // fails: at once when the connection is refused, else after
    // `op_timeout`. Every answer was admitted or rate limited: `hammer`
    // fails on anything else, and every call was answered.)
    let _ = (admitted, refused);

    // ... and when Redis returns on the same port, they converge.
    redis.restart().await;
    for replica in &replicas {
        replica.lock().await.wait_redis_state("connected").await;
    }
    let mut a = replicas[0].lock().await;
    let b = replicas[1].lock().await;
    assert_eq!(
        b.circuit("slow").await,
        None,
        "slow has not been called yet"
    );
    let opened = a.trip("slow", json!({"seconds": 3})).await;
    let seen = bounded(
        "B seeing A's open circuit after Redis returned",
        LIMIT,
        async {
            while b.circuit("slow").await.as_deref() != Some("open") {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            opened.elapsed()
        },
    )
    .await;
    println!("replicas: after Redis restarted, B saw A's open circuit after {seen:?}");
    drop((a, b));
    let mut b = replicas[1].lock().await;
    let (kind, answer) = b.call_admitted("slow", json!({"seconds": 3})).await;
    assert_eq!(kind, Answer::CircuitOpen, "B refuses: {answer}");
    drop(flaky);
}

/// A gateway's per-upstream breaker is shared too, keyed by the upstream's
/// name: the upstream's breaker opened in A (a call past its attempt
/// timeout) refuses B's calls to that upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_replicas_share_upstream_breakers() {
    let (Some(redis_bin), Some(python)) = (
        component("TOOLWARDEN_REDIS_SERVER"),
        component("TOOLWARDEN_PYTHON"),
    ) else {
        return;
    };
    let redis = Redis::start(&redis_bin).await;
    let flaky = flaky_server(&python).await;
    let dir = std::env::temp_dir().join(format!("toolwarden-replicas-gw-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[redis]
url = "redis://127.0.0.1:{redis_port}/"
prefix = "replicas-gw-{pid}"
op_timeout = "100ms"

# The refusal is the answer here: the retry layer would otherwise hold a
# refused call for the open period (its `retry_after`, within the deadline)
# and send it as the probe.
[retry]
enabled = false

[gateway]
open_upstreams = "mark"

[upstreams.flaky]
url = "http://127.0.0.1:{flaky_port}/mcp"
attempt_timeout = "300ms"
circuit_breaker = {{ failure_threshold = 1, reset_timeout = "30s" }}
"#,
            redis_port = redis.port,
            flaky_port = flaky.port,
            pid = std::process::id(),
        ),
    )
    .unwrap();
    let mut a = Replica::start("gateway-a", &config, &[]).await;
    let mut b = Replica::start("gateway-b", &config, &[]).await;
    for replica in [&a, &b] {
        replica.wait_redis_state("connected").await;
        assert_eq!(
            replica.upstream_circuit("flaky").await.as_deref(),
            Some("closed")
        );
    }
    let (kind, answer) = b.call("stats", json!({})).await;
    assert_eq!(kind, Answer::Reached { is_error: false }, "{answer}");

    // A call past the upstream's attempt timeout opens its breaker in A ...
    let (kind, answer) = a.call("slow", json!({"seconds": 3})).await;
    assert!(
        matches!(kind, Answer::Reached { is_error: true }),
        "{kind:?}: {answer}"
    );
    let opened = Instant::now();
    assert_eq!(a.upstream_circuit("flaky").await.as_deref(), Some("open"));
    // ... and in B, which refuses its calls to that upstream.
    let seen = bounded("B seeing the upstream's open breaker", LIMIT, async {
        while b.upstream_circuit("flaky").await.as_deref() != Some("open") {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        opened.elapsed()
    })
    .await;
    println!("gateway replicas: B saw the upstream's open breaker {seen:?} after A's answer");
    let (kind, answer) = b.call("stats", json!({})).await;
    assert_eq!(kind, Answer::CircuitOpen, "B refuses: {answer}");
    let (_, report) = health(b.metrics).await.unwrap();
    assert!(
        report["redis"]["upstream_sync"]["flaky"]["applied"].as_u64() >= Some(1),
        "{report}"
    );
    println!("gateway replicas: checks done after {:?}", opened.elapsed());
    drop((a, b, redis, flaky));
}
