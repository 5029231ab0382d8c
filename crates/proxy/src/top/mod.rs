//! `toolwarden top --metrics-addr ADDR`: the per-tool table of a running
//! proxy, redrawn live in the terminal.
//!
//! Every `--interval` (default 1 s) it reads three routes of the proxy's
//! metrics address — `/stats` (the observability layer's per-tool
//! statistics: calls, calls in flight, outcomes, p50/p95), `/circuits` (each
//! circuit's state and recent errors) and `/metrics` (the layers' events per
//! tool: retries, stale results served, loops blocked, rate limits,
//! degraded answers) — and redraws the table with the renderer
//! `toolwarden demo` prints its table with ([`crate::table`]).
//!
//! The screen is drawn with plain ANSI escapes on the terminal's alternate
//! screen, the terminal put in non-canonical mode without echo so that a
//! key is read as it is typed. `q` (or `Q`, or Ctrl-C, or SIGTERM) quits:
//! the terminal's settings and main screen are restored and the exit status
//! is 0. When standard input is not a terminal, only a signal quits.
//!
//! **Unreachable address.** `top` keeps polling: the screen says which
//! route could not be read and why, and the table comes back as soon as the
//! proxy answers (a proxy being restarted is a normal sight for a live
//! view). `--once` prints the table once, without escapes, and exits with
//! status 1 when the address cannot be read — for scripts.
//!
//! With `--metrics-auth` on the proxy, give the token with
//! `--auth-token-file FILE` (its first non-empty line).

mod model;
mod terminal;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use serde_json::Value;

use model::Reading;

/// `toolwarden top`.
#[derive(Debug, Args)]
pub struct TopArgs {
    /// The proxy's metrics address (its --metrics-addr), e.g. 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: String,
    /// How often to read it and redraw (e.g. 500ms, 2s); at least 100ms.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_interval)]
    pub interval: Duration,
    /// A file whose first non-empty line is the bearer token the metrics
    /// address requires (a proxy run with --metrics-auth).
    #[arg(long, value_name = "FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// Print the table once, without redrawing, and exit (status 1 when
    /// the address cannot be read).
    #[arg(long)]
    pub once: bool,
}

/// The shortest interval: faster redraws only load the proxy.
const MIN_INTERVAL: Duration = Duration::from_millis(100);

fn parse_interval(text: &str) -> Result<Duration, String> {
    let interval = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if interval < MIN_INTERVAL {
        return Err(format!("must be at least 100ms, got {text}"));
    }
    Ok(interval)
}

/// How long one read of a route may take.
const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// Reads the metrics address.
struct Source {
    client: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Source {
    fn new(args: &TopArgs) -> Result<Source, String> {
        let token = match &args.auth_token_file {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                let token = text
                    .lines()
                    .map(str::trim)
                    .find(|l| !l.is_empty())
                    .ok_or_else(|| format!("{} holds no token", path.display()))?;
                Some(token.to_owned())
            }
        };
        let addr = args.metrics_addr.trim_end_matches('/');
        let base = if addr.starts_with("http://") || addr.starts_with("https://") {
            addr.to_owned()
        } else {
            format!("http://{addr}")
        };
        reqwest::Url::parse(&base)
            .map_err(|e| format!("--metrics-addr {}: {e}", args.metrics_addr))?;
        let client = reqwest::Client::builder()
            .timeout(READ_TIMEOUT)
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Source {
            client,
            base,
            token,
        })
    }

    async fn get(&self, path: &str) -> Result<String, String> {
        let url = format!("{}{path}", self.base);
        let mut request = self.client.get(&url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("cannot reach {url}: {}", error_chain(&e)))?;
        let status = response.status();
        let body = response
            .text()
            .await
            .map_err(|e| format!("{url}: {}", error_chain(&e)))?;
        if !status.is_success() {
            return Err(format!("{url} answered {status}"));
        }
        Ok(body)
    }

    async fn json(&self, path: &str) -> Result<Value, String> {
        let body = self.get(path).await?;
        serde_json::from_str(&body).map_err(|e| format!("{}{path}: not JSON: {e}", self.base))
    }

    async fn read(&self) -> Result<Reading, String> {
        let (stats, circuits, metrics) = tokio::join!(
            self.json("/stats"),
            self.json("/circuits"),
            self.get("/metrics")
        );
        Ok(Reading::new(stats?, circuits?, &metrics?))
    }
}

/// The error and its sources, `a: b: c`.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// Runs `toolwarden top`; returns the exit status.
pub async fn run(args: TopArgs) -> ExitCode {
    let source = match Source::new(&args) {
        Ok(source) => source,
        Err(e) => {
            eprintln!("toolwarden top: {e}");
            return ExitCode::from(2);
        }
    };
    if args.once {
        return match source.read().await {
            Ok(reading) => {
                print!("{}", reading.screen());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("toolwarden top: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let screen = terminal::Screen::enter();
    let mut quit = terminal::quit_keys();
    let mut tick = tokio::time::interval(args.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let title = format!(
        "toolwarden top — {} — every {} — q to quit",
        source.base,
        humantime::format_duration(args.interval)
    );
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = quit.recv() => break,
        }
        let read = tokio::select! {
            read = source.read() => read,
            _ = quit.recv() => break,
        };
        let body = match read {
            Ok(reading) => reading.screen(),
            Err(e) => format!(
                "{e}\nretrying every {}…\n",
                humantime::format_duration(args.interval)
            ),
        };
        screen.draw(&format!("{title}\n\n{body}"));
    }
    drop(screen);
    ExitCode::SUCCESS
}
