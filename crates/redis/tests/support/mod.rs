//! Helpers shared by the tests that run against a real `redis-server`.

// Not every test file uses every helper; helpers panic because that is how a test fails.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use toolwarden_core::Events;
use toolwarden_redis::RedisConfig;

/// The longest any awaited condition may take.
pub const LIMIT: Duration = Duration::from_secs(10);

/// The `redis-server` binary from `TOOLWARDEN_REDIS_SERVER`; `None` (the test
/// skips) when it is missing, unless `TOOLWARDEN_E2E=required`, which fails.
pub fn redis_bin() -> Option<PathBuf> {
    let found = std::env::var_os("TOOLWARDEN_REDIS_SERVER")
        .map(PathBuf::from)
        .filter(|p| p.exists());
    if found.is_none() {
        let why =
            "TOOLWARDEN_REDIS_SERVER is not set to an existing redis-server: run scripts/test";
        if std::env::var("TOOLWARDEN_E2E").as_deref() == Ok("required") {
            panic!("required end-to-end component missing: {why}");
        }
        eprintln!("skipping: {why}");
    }
    found
}

/// A `redis-server` on a free local port, killed when dropped.
pub struct RedisServer {
    bin: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    pub async fn start(bin: &Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = RedisServer {
            bin: bin.to_owned(),
            port,
            child: None,
        };
        server.restart().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub async fn restart(&mut self) {
        let child = Command::new(&self.bin)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let client = redis::Client::open(self.url()).unwrap();
        for _ in 0..200 {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                if redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("redis-server did not answer on port {}", self.port);
    }

    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.ok();
            child.wait().await.ok();
        }
    }
}

/// A validated config for `server`: 100 ms op timeout, fast reconnects.
pub fn config(server: &RedisServer, replica: &str, events: Events) -> RedisConfig {
    RedisConfig::builder(server.url())
        .replica_id(replica)
        .op_timeout(Duration::from_millis(100))
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(500))
        .events(events)
        .build()
        .unwrap()
}

/// Waits until `done`, polling every 5 ms; fails after [`LIMIT`].
pub async fn wait(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not happen within {LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
