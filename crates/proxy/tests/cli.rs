//! The `toolwarden` command line through the built binary: `check-config`,
//! refused command lines, and the demo. No external component needed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

fn toolwarden(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_toolwarden"));
    command.args(args).env_remove("RUST_LOG");
    // The caller's TOOLWARDEN_* configuration must not leak into these checks.
    for (name, _) in std::env::vars() {
        if name.starts_with("TOOLWARDEN_") {
            command.env_remove(name);
        }
    }
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("the binary runs")
}

fn example() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/toolwarden.example.toml").to_owned()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn write_config(name: &str, contents: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("toolwarden-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

#[test]
fn check_config_accepts_the_gateway_example_and_checks_its_upstreams_headers() {
    let gateway = concat!(env!("CARGO_MANIFEST_DIR"), "/gateway.example.toml");
    let out = toolwarden(&["check-config", gateway], &[("DOCS_MCP_TOKEN", "t0ken")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The docs upstream's header names a variable that must be set.
    let out = toolwarden(&["check-config", gateway], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(err.contains("upstreams.\"docs\".headers"), "{err}");
    assert!(err.contains("DOCS_MCP_TOKEN"), "{err}");
    // --print keeps the upstreams, their own keys and their [upstream] keys.
    let out = toolwarden(
        &["check-config", "--print", gateway],
        &[("DOCS_MCP_TOKEN", "t0ken")],
    );
    let printed = text(&out.stdout);
    assert!(printed.contains("[upstreams.time]"), "{printed}");
    assert!(printed.contains("[redis]"), "{printed}");
    assert!(printed.contains("attempt_timeout = \"5s\""), "{printed}");
    assert!(!printed.contains("t0ken"), "{printed}");
}

#[test]
fn run_refuses_an_upstream_on_the_command_line_with_upstreams_in_the_file() {
    let path = write_config("two.toml", "[upstreams.a]\ncommand = \"x\"\n");
    let out = toolwarden(&["run", "--config", path.to_str().unwrap(), "--", "y"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("[upstreams]"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn check_config_accepts_the_shipped_example() {
    let out = toolwarden(&["check-config", &example()], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).ends_with(": ok\n"),
        "{}",
        text(&out.stdout)
    );
    // --print writes the effective configuration, environment included.
    let out = toolwarden(
        &["check-config", "--print", &example()],
        &[("TOOLWARDEN_CIRCUIT_BREAKER_FAILURE_THRESHOLD", "9")],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("failure_threshold = 9"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn check_config_names_the_bad_key() {
    let path = write_config("bad.toml", "[circuit_breaker]\nfailure_threshold = 0\n");
    let out = toolwarden(&["check-config", path.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("`circuit_breaker.failure_threshold`"), "{err}");

    let path = write_config("unknown.toml", "[retry]\nmax_atempts = 3\n");
    let out = toolwarden(&["check-config", path.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("`retry.max_atempts`"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn check_config_refuses_a_bad_redis_url_and_accepts_a_good_one_without_redis() {
    let path = write_config(
        "redis-bad.toml",
        "[redis]\nurl = \"http://127.0.0.1:6379\"\n",
    );
    let out = toolwarden(&["check-config", path.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("`redis.url`"), "{err}");

    // Checking connects to nothing: no Redis listens on port 1.
    let path = write_config(
        "redis-good.toml",
        "[redis]\nurl = \"redis://127.0.0.1:1/0\"\npolicy = \"quorum\"\nquorum = 2\n",
    );
    let out = toolwarden(&["check-config", path.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn check_config_runs_the_layers_own_checks() {
    // The loop guard's builder refuses a window of one call; its message is
    // the one shown, under the file's key.
    let path = write_config("window.toml", "[loop_guard]\nwindow_calls = 1\n");
    let out = toolwarden(&["check-config", path.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("`loop_guard.window_calls`"), "{err}");
    assert!(err.contains("must be between 2 and 1024"), "{err}");
    // The same in a tool's table, named in its section.
    let path = write_config(
        "tool.toml",
        "[tools.\"search\".loop_guard]\nlimits = { max_repeats = 0 }\n",
    );
    let out = toolwarden(&["check-config", path.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("`tools.\"search\".loop_guard.limits.max_repeats`"),
        "{err}"
    );
    // The breaker accepts more successes to close than probes at once, so
    // the configuration does too.
    let path = write_config(
        "half_open.toml",
        "[circuit_breaker]\nhalf_open_max_calls = 1\nsuccess_threshold = 3\n",
    );
    let out = toolwarden(&["check-config", "--print", path.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("success_threshold = 3"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn check_config_names_the_bad_variable() {
    let out = toolwarden(
        &["check-config", &example()],
        &[("TOOLWARDEN_CIRCUIT_BREAKER_FAILURE_THRESHOLD", "abc")],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("TOOLWARDEN_CIRCUIT_BREAKER_FAILURE_THRESHOLD"),
        "{err}"
    );
    assert!(err.contains("circuit_breaker.failure_threshold"), "{err}");
}

#[test]
fn a_missing_file_is_an_error() {
    let out = toolwarden(&["check-config", "/nonexistent/toolwarden.toml"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("cannot read"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn run_refuses_bad_command_lines_before_starting_anything() {
    let out = toolwarden(&["run"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("no upstream server"),
        "{}",
        text(&out.stderr)
    );

    let out = toolwarden(
        &["run", "--upstream-url", "http://127.0.0.1:1/mcp", "--", "x"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));

    let out = toolwarden(&["run", "--metrics-addr", "0.0.0.0:9464", "--", "x"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--metrics-allow-remote"),
        "{}",
        text(&out.stderr)
    );

    let out = toolwarden(&["run", "--listen", "0.0.0.0:8080", "--", "x"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--listen-allow-remote"),
        "{}",
        text(&out.stderr)
    );

    let out = toolwarden(
        &["run", "--", "x"],
        &[("TOOLWARDEN_RETRY_MAX_ATTEMPTS", "0")],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("TOOLWARDEN_RETRY_MAX_ATTEMPTS"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn the_demo_runs_and_prints_a_table_per_tool() {
    let out = toolwarden(&["demo"], &[]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let table = stdout
        .split("what happened, per tool")
        .nth(1)
        .expect("the demo ends with its table");
    // A row: tool, calls, ok, stale, failed, refused, reached, retries,
    // "N open/M cl", stale served, loops, limited, degraded.
    let row = |tool: &str| -> Vec<u64> {
        let line = table
            .lines()
            .find(|l| l.trim_start().starts_with(tool))
            .unwrap_or_else(|| panic!("{tool} missing from:\n{table}"));
        line.split(|c: char| !c.is_ascii_digit())
            .filter(|n| !n.is_empty())
            .map(|n| n.parse().unwrap())
            .collect()
    };
    let [calls, ok, stale, _failed, _refused, _reached, _retries, opened, closed, stale_served, _loops, _limited, _degraded] =
        row("flaky_search")[..]
    else {
        panic!("a flaky_search row of 13 numbers:\n{table}");
    };
    // The outage is bridged by the cache while the breaker is open, and the
    // breaker closes again once the backend is back.
    assert_eq!(calls, ok + stale, "every search answered:\n{table}");
    assert!(stale > 0 && stale_served == stale, "{table}");
    assert!(opened >= 1 && closed >= 1, "{table}");
    let quota = row("quota_api");
    assert!(quota[11] > 0, "rate limited:\n{table}");
    let delete = row("delete_record");
    assert_eq!(delete[0], 6, "{table}");
    assert!(
        delete[10] >= 1,
        "the failing delete loop is blocked:\n{table}"
    );
    assert!(
        delete[6] < 6,
        "not every delete reached the server:\n{table}"
    );
    let slow = row("slow_report");
    assert_eq!((slow[0], slow[1]), (1, 1), "{table}");
    // It showed progress while running.
    assert!(stdout.contains("↳ progress 3/3"), "{stdout}");
}
