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
    for tool in ["flaky_search", "slow_report", "quota_api", "delete_record"] {
        assert!(table.contains(tool), "{tool} missing from:\n{table}");
    }
    // It showed progress while running and what the tools answered.
    assert!(stdout.contains("progress"), "{stdout}");
    assert!(stdout.contains("temporarily unavailable"), "{stdout}");
}
