//! Shared helpers of the root package's integration and end-to-end tests:
//! finding the real components (installed by `scripts/install-components`,
//! located through `TOOLWARDEN_*` variables), starting MCP servers, and
//! bounding every wait so no test can hang.

#![allow(dead_code)] // each test binary uses a different subset
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test] fns

use std::path::PathBuf;
use std::time::Duration;

/// Where a real component is, from its `TOOLWARDEN_*` variable.
///
/// When the variable is unset or points nowhere: with `TOOLWARDEN_E2E=required`
/// (the full run, `scripts/test`) the test fails loudly; otherwise it prints
/// why and the caller skips. A full run never passes without the component.
pub fn component(var: &str) -> Option<PathBuf> {
    let found = std::env::var_os(var)
        .map(PathBuf::from)
        .filter(|p| p.exists());
    if found.is_none() {
        let why = format!(
            "{var} is not set to an existing path: run scripts/install-components and \
             scripts/test (or export {var})"
        );
        if std::env::var("TOOLWARDEN_E2E").as_deref() == Ok("required") {
            panic!("required end-to-end component missing: {why}");
        }
        eprintln!("skipping: {why}");
    }
    found
}

/// The flaky stdio server script shipped in `tests/e2e/`.
pub fn flaky_server_script() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/e2e/flaky_server.py"
    ))
}

/// A free loopback port (bound, read, released).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Runs `f` until it returns `Some`, up to `limit`; a hang guard, not a timing claim.
pub async fn eventually<T, F, Fut>(limit: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Bounds a future: fails the test instead of hanging.
pub async fn bounded<F: std::future::Future>(what: &str, limit: Duration, f: F) -> F::Output {
    match tokio::time::timeout(limit, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not finish within {limit:?}: it hung"),
    }
}
