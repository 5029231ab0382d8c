//! Hot reload, end to end: the `toolwarden` binary in front of
//! `mcp-server-time` (`TOOLWARDEN_MCP_SERVER_TIME`), its configuration file
//! changed under it. SIGHUP (or `--watch`) applies a new tool quota to the
//! session already open; a broken file is reported, naming the key, and
//! the running policy stays.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use support::{component, eventually, free_port, http_get, kill, Proxy, LIMIT};

/// A temporary directory of this test's own.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("toolwarden-reload-{name}-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The configuration with `get_current_time` limited to `rate` (burst
/// `burst`), and `extra` after it.
fn quota(rate: &str, burst: u32, extra: &str) -> String {
    format!(
        "[tools.\"get_current_time\".rate_limit]\nper_tool = {{ rate = \"{rate}\", burst = {burst} }}\n{extra}"
    )
}

/// The layer that refused a call, if one did.
fn refused_by(response: &Value) -> Option<String> {
    support::failure_facts(&response["result"])["layer"]
        .as_str()
        .map(str::to_owned)
}

/// Waits (bounded) until the `n`th stderr line containing `needle` shows.
async fn logged(proxy: &Proxy, needle: &str, n: usize) -> String {
    let stderr = proxy.stderr.clone();
    let found = eventually(LIMIT, || {
        let stderr = stderr.clone();
        async move {
            let lines = stderr.lock().unwrap();
            lines
                .iter()
                .filter(|line| line.contains(needle))
                .nth(n - 1)
                .cloned()
        }
    })
    .await;
    found.unwrap_or_else(|| panic!("no stderr line #{n} with {needle:?}"))
}

fn start(bin: &Path, config: &Path, extra: &[&str]) -> Proxy {
    let mut args = vec!["run", "--config", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", bin.to_str().unwrap(), "--local-timezone", "UTC"]);
    Proxy::start(&args, &[("RUST_LOG", "warn,toolwarden_proxy=info")])
}

async fn now(proxy: &mut Proxy, id: i64) -> Value {
    proxy
        .call(id, "get_current_time", json!({"timezone": "UTC"}))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_swaps_a_quota_for_the_open_session_and_a_broken_file_keeps_it() {
    let Some(bin) = component("TOOLWARDEN_MCP_SERVER_TIME") else {
        return;
    };
    let dir = temp_dir("hup");
    let file = dir.join("toolwarden.toml");
    std::fs::write(&file, quota("100/s", 100, "")).unwrap();
    let metrics = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics}");
    let mut proxy = start(&bin, &file, &["--metrics-addr", &metrics_addr]);
    let pid = proxy.child.id().unwrap();
    proxy.initialize().await;
    for id in 1..=3 {
        let answer = now(&mut proxy, id).await;
        assert_eq!(answer["result"]["isError"], false, "{answer}");
    }

    // One call a minute: the second call of the same session is refused.
    std::fs::write(&file, quota("1/m", 1, "")).unwrap();
    kill(pid, "HUP");
    logged(&proxy, "configuration reloaded", 1).await;
    let first = now(&mut proxy, 10).await;
    assert_eq!(first["result"]["isError"], false, "{first}");
    let second = now(&mut proxy, 11).await;
    assert_eq!(second["result"]["isError"], true, "{second}");
    assert_eq!(
        refused_by(&second).as_deref(),
        Some("rate_limit"),
        "{second}"
    );

    // A broken file (an invalid value, and the quota raised again): the
    // error names the key, and the running quota stays in force.
    std::fs::write(
        &file,
        quota(
            "100/s",
            100,
            "[tools.\"get_current_time\".retry]\nmax_attempts = 0\n",
        ),
    )
    .unwrap();
    kill(pid, "HUP");
    let error = logged(&proxy, "configuration reload failed", 1).await;
    assert!(
        error.contains(r#"tools."get_current_time".retry.max_attempts"#),
        "{error}"
    );
    let still = now(&mut proxy, 12).await;
    assert_eq!(refused_by(&still).as_deref(), Some("rate_limit"), "{still}");

    // Both attempts are counted.
    let body = eventually(LIMIT, || async move {
        let (status, body) = http_get(metrics, "/metrics").await?;
        (status == 200 && body.contains("toolwarden_proxy_config_reloads_total")).then_some(body)
    })
    .await
    .expect("/metrics serves the reload counter");
    for result in ["ok", "error"] {
        let line = body
            .lines()
            .find(|l| {
                l.starts_with("toolwarden_proxy_config_reloads_total")
                    && l.contains(&format!("result=\"{result}\""))
            })
            .unwrap_or_else(|| panic!("no {result} count in {body}"));
        assert!(line.ends_with(" 1"), "{line}");
    }

    // The session is the same one all along, and the proxy exits cleanly.
    assert!(support::alive(pid));
    let status = proxy.terminate().await;
    assert!(status.success(), "exit status {status:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reloads_when_the_file_changes() {
    let Some(bin) = component("TOOLWARDEN_MCP_SERVER_TIME") else {
        return;
    };
    let dir = temp_dir("watch");
    let file = dir.join("toolwarden.toml");
    std::fs::write(&file, quota("100/s", 100, "")).unwrap();
    let mut proxy = start(&bin, &file, &["--watch"]);
    proxy.initialize().await;
    for id in 1..=2 {
        let answer = now(&mut proxy, id).await;
        assert_eq!(answer["result"]["isError"], false, "{answer}");
    }
    // No signal: the watcher sees the new size (and time) and reloads.
    std::fs::write(&file, quota("1/m", 1, "# one call a minute\n")).unwrap();
    logged(&proxy, "configuration reloaded", 1).await;
    let first = now(&mut proxy, 10).await;
    assert_eq!(first["result"]["isError"], false, "{first}");
    let second = now(&mut proxy, 11).await;
    assert_eq!(
        refused_by(&second).as_deref(),
        Some("rate_limit"),
        "{second}"
    );
    let status = proxy.terminate().await;
    assert!(status.success(), "exit status {status:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_reloads_its_upstreams_tool_tables_on_sighup() {
    let Some(bin) = component("TOOLWARDEN_MCP_SERVER_TIME") else {
        return;
    };
    let upstream = format!(
        "[upstreams.time]\ncommand = {:?}\nargs = [\"--local-timezone\", \"UTC\"]\n",
        bin.to_str().unwrap()
    );
    let table = |rate: &str, burst: u32| {
        format!(
            "{upstream}[upstreams.time.tools.\"get_current_time\".rate_limit]\n\
             per_tool = {{ rate = \"{rate}\", burst = {burst} }}\n"
        )
    };
    let dir = temp_dir("gateway");
    let file = dir.join("toolwarden.toml");
    std::fs::write(&file, table("100/s", 100)).unwrap();
    let mut proxy = Proxy::start(
        &["run", "--config", file.to_str().unwrap()],
        &[("RUST_LOG", "warn,toolwarden_proxy=info")],
    );
    let pid = proxy.child.id().unwrap();
    proxy.initialize().await;
    for id in 1..=2 {
        let answer = now(&mut proxy, id).await;
        assert_eq!(answer["result"]["isError"], false, "{answer}");
    }

    // The tool's quota drops to one a minute; a second upstream is added,
    // which needs a restart: said so, and the rest applies.
    let more = format!("{}[upstreams.other]\ncommand = \"true\"\n", table("1/m", 1));
    std::fs::write(&file, more).unwrap();
    kill(pid, "HUP");
    logged(&proxy, "configuration reloaded", 1).await;
    let warning = logged(&proxy, "takes effect only after a restart", 1).await;
    assert!(warning.contains("upstreams"), "{warning}");
    let first = now(&mut proxy, 10).await;
    assert_eq!(first["result"]["isError"], false, "{first}");
    let second = now(&mut proxy, 11).await;
    assert_eq!(
        refused_by(&second).as_deref(),
        Some("rate_limit"),
        "{second}"
    );

    let status = proxy.terminate().await;
    assert!(status.success(), "exit status {status:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
