//! Load harness: the latency the `toolwarden` proxy adds in front of
//! server-everything, and the calls per second through it.
//!
//! `cargo bench -p toolwarden-proxy --bench proxy_latency` with
//! `TOOLWARDEN_SERVER_EVERYTHING` pointing at `mcp-server-everything`.
//!
//! Two set-ups, both an rmcp client (`toolwarden_rmcp::RmcpClient`) calling
//! `echo` over stdio:
//!
//! - direct: client → server-everything (child process);
//! - proxied: client → `toolwarden run` (child process, the release-built
//!   binary of this package) → server-everything (its child).
//!
//! For each: sequential calls (p50, p99, calls/s) and 8 concurrent callers
//! (p50, p99, calls/s). The added latency is proxied minus direct. The
//! proxy runs its whole standard stack with the default configuration but
//! for the rate limit, switched off (`TOOLWARDEN_RATE_LIMIT_ENABLED=false`):
//! the harness calls far above the default quota of 50 calls/s per tool, and
//! refusals would measure the wrong path. Each call echoes a different
//! message, as an agent's calls would, so the loop guard sees no repeats. Without
//! `--bench` (what `cargo test --benches` passes) it makes a handful of calls
//! as a smoke test.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark binary

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rmcp::model::{CallToolRequest, CallToolRequestParams, ClientRequest};
use rmcp::service::RunningService;
use rmcp::transport::TokioChildProcess;
use rmcp::{RoleClient, ServiceExt as _};
use serde_json::json;
use toolwarden_core::McpResponse as _;
use toolwarden_rmcp::RmcpClient;
use tower::ServiceExt as _;

struct Plan {
    warmup: usize,
    sequential: usize,
    concurrent_tasks: usize,
    per_task: usize,
}

fn echo() -> ClientRequest {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let n = CALLS.fetch_add(1, Ordering::Relaxed);
    let mut params = CallToolRequestParams::new("echo");
    params.arguments = json!({"message": format!("bench {n}")})
        .as_object()
        .cloned();
    ClientRequest::CallToolRequest(CallToolRequest::new(params))
}

async fn connect(
    program: &PathBuf,
    args: &[&str],
    env: &[(&str, &str)],
) -> RunningService<RoleClient, ()> {
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "error");
    let (transport, _) = TokioChildProcess::builder(command)
        .stderr(Stdio::null())
        .spawn()
        .expect("the server starts");
    tokio::time::timeout(Duration::from_secs(30), ().serve(transport))
        .await
        .expect("initialize within 30 s")
        .expect("initialize")
}

async fn call(client: &RmcpClient) -> Duration {
    let start = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(30), client.clone().oneshot(echo()))
        .await
        .expect("a call within 30 s");
    match &result {
        Ok(answer) => assert!(!answer.is_tool_error(), "echo refused: {answer:?}"),
        Err(e) => panic!("echo failed: {e}"),
    }
    start.elapsed()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[derive(Clone, Copy)]
struct Figures {
    p50: Duration,
    p99: Duration,
    per_second: f64,
}

fn figures(mut latencies: Vec<Duration>, wall: Duration) -> Figures {
    latencies.sort();
    Figures {
        p50: percentile(&latencies, 50.0),
        p99: percentile(&latencies, 99.0),
        per_second: latencies.len() as f64 / wall.as_secs_f64(),
    }
}

async fn measure(client: &RmcpClient, plan: &Plan) -> (Figures, Figures) {
    for _ in 0..plan.warmup {
        call(client).await;
    }
    let start = Instant::now();
    let mut latencies = Vec::with_capacity(plan.sequential);
    for _ in 0..plan.sequential {
        latencies.push(call(client).await);
    }
    let sequential = figures(latencies, start.elapsed());

    let start = Instant::now();
    let tasks: Vec<_> = (0..plan.concurrent_tasks)
        .map(|_| {
            let client = client.clone();
            let n = plan.per_task;
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(n);
                for _ in 0..n {
                    latencies.push(call(&client).await);
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    let concurrent = figures(latencies, start.elapsed());
    (sequential, concurrent)
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

fn row(name: &str, (seq, conc): (Figures, Figures)) {
    println!(
        "| {name:<8} | {:>10} | {:>10} | {:>8.0} | {:>10} | {:>10} | {:>8.0} |",
        ms(seq.p50),
        ms(seq.p99),
        seq.per_second,
        ms(conc.p50),
        ms(conc.p99),
        conc.per_second
    );
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let Some(server) = std::env::var_os("TOOLWARDEN_SERVER_EVERYTHING")
        .map(PathBuf::from)
        .filter(|p| p.exists())
    else {
        // The full test run (`scripts/test`) sets TOOLWARDEN_E2E=required: there a
        // missing server is a failure, never a silent pass.
        if std::env::var("TOOLWARDEN_E2E").as_deref() == Ok("required") {
            eprintln!(
                "proxy_latency: TOOLWARDEN_E2E=required but TOOLWARDEN_SERVER_EVERYTHING is not set to an existing path"
            );
            std::process::exit(1);
        }
        println!(
            "proxy_latency: TOOLWARDEN_SERVER_EVERYTHING is not set to an existing path; skipped"
        );
        return;
    };
    let plan = if bench {
        Plan {
            warmup: 300,
            sequential: 3000,
            concurrent_tasks: 8,
            per_task: 500,
        }
    } else {
        Plan {
            warmup: 2,
            sequential: 5,
            concurrent_tasks: 2,
            per_task: 3,
        }
    };
    let proxy = PathBuf::from(env!("CARGO_BIN_EXE_toolwarden"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let direct = connect(&server, &["stdio"], &[]).await;
        let direct_figures = measure(&RmcpClient::new(direct.peer().clone()), &plan).await;
        let _ = direct.cancel().await;

        let server_arg = server.to_str().unwrap();
        let proxied = connect(
            &proxy,
            &["run", "--", server_arg, "stdio"],
            &[("TOOLWARDEN_RATE_LIMIT_ENABLED", "false")],
        )
        .await;
        let proxied_figures = measure(&RmcpClient::new(proxied.peer().clone()), &plan).await;
        let _ = proxied.cancel().await;

        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        println!(
            "\necho via rmcp over stdio; sequential: {} calls; concurrent: {} callers × {} calls; load average before the end: {}",
            plan.sequential,
            plan.concurrent_tasks,
            plan.per_task,
            load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
        );
        println!("| path     | seq p50    | seq p99    | seq c/s  | 8× p50     | 8× p99     | 8× c/s   |");
        println!("|----------|-----------:|-----------:|---------:|-----------:|-----------:|---------:|");
        row("direct", direct_figures);
        row("proxied", proxied_figures);
        // Signed: under load a tail can come out lower through the proxy.
        let added = |a: Duration, b: Duration| {
            format!("{:+.3} ms", (a.as_secs_f64() - b.as_secs_f64()) * 1000.0)
        };
        println!(
            "added by the proxy: sequential p50 {} p99 {}; 8 concurrent p50 {} p99 {}",
            added(proxied_figures.0.p50, direct_figures.0.p50),
            added(proxied_figures.0.p99, direct_figures.0.p99),
            added(proxied_figures.1.p50, direct_figures.1.p50),
            added(proxied_figures.1.p99, direct_figures.1.p99),
        );
    });
    runtime.shutdown_timeout(Duration::from_secs(5));
}
