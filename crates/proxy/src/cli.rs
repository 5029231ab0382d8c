//! The `toolwarden` command line: `run`, `check-config`, `demo` and `top`.

// The argument docs are `--help` texts (clap prints them as written): a URL
// there is an example to type, not a link.
#![allow(rustdoc::bare_urls)]

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use toolwarden_core::events::Event;
use toolwarden_core::Events;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

use crate::access::{AccessPolicy, AuthTokens, AUTH_TOKENS_ENV};
use crate::config::{process_env, Config};
use crate::endpoints::{self, MetricsEndpoints};
use crate::redact::{RedactingStderr, Redactor, SharedRedactor};
use crate::stack::SharedState;
use crate::upstream::UpstreamTarget;
use crate::Proxy;

#[cfg(feature = "otlp")]
type Slot = crate::otlp::TracingSlot;
#[cfg(not(feature = "otlp"))]
type Slot = NoSlot;

/// Without the `otlp` feature, there is no OpenTelemetry layer to fill.
#[cfg(not(feature = "otlp"))]
#[derive(Debug)]
struct NoSlot;

/// The toolwarden proxy: resilience for MCP tool calls, in front of any MCP server.
#[derive(Debug, Parser)]
#[command(name = "toolwarden", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
pub enum Command {
    /// Run the proxy in front of an MCP server: `toolwarden run [OPTIONS] -- <command> [args]`
    /// or `toolwarden run --upstream-url URL`.
    Run(RunArgs),
    /// Validate a configuration file (with the TOOLWARDEN_* environment) without running.
    CheckConfig(CheckConfigArgs),
    /// Run a flaky in-process MCP server and a scripted agent through the proxy,
    /// and show what each layer did. Needs nothing installed; under a minute.
    Demo,
    /// Show a running proxy's per-tool table live (calls, errors, latency,
    /// circuits, the layers' events), read from its --metrics-addr; q quits.
    #[cfg(unix)]
    Top(crate::top::TopArgs),
}

/// `toolwarden run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The configuration file (TOML). Without one, every default applies.
    /// SIGHUP re-reads it (with the TOOLWARDEN_* environment) and swaps the
    /// tool policies in place; a bad file is reported and the running
    /// configuration kept (see the README, "Reloading").
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Also reload the --config file when it changes (its modification time
    /// or size, looked at every second).
    #[arg(long, requires = "config")]
    pub watch: bool,
    /// The upstream is a Streamable HTTP(S) endpoint (e.g. http://127.0.0.1:3001/mcp
    /// or https://mcp.example.com/mcp) instead of a child process.
    #[arg(long, value_name = "URL")]
    pub upstream_url: Option<String>,
    /// Trust the certificates in FILE (PEM) for an https:// upstream, besides the
    /// system's roots (overrides `upstream.ca_file`).
    #[arg(long, value_name = "FILE")]
    pub upstream_ca_file: Option<PathBuf>,
    /// Serve clients over Streamable HTTP at http://ADDR/mcp instead of stdio.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Allow a non-loopback --listen address. Clients must then send a bearer
    /// token (--auth-token-file or TOOLWARDEN_AUTH_TOKENS); the Host check
    /// stays on (the listen address is allowed; add names with --allow-host).
    #[arg(long)]
    pub listen_allow_remote: bool,
    /// Also allow this browser Origin on --listen (repeatable; loopback
    /// origins always are): https://app.example.com, http://host:8080, http://host:*.
    #[arg(long, value_name = "ORIGIN")]
    pub allow_origin: Vec<String>,
    /// Also allow this Host on --listen (repeatable; loopback names and the
    /// listen address always are): mcp.example.com or mcp.example.com:8443.
    #[arg(long, value_name = "HOST")]
    pub allow_host: Vec<String>,
    /// Bearer tokens clients of --listen must send, one a line (overrides
    /// `http.auth_token_file`; TOOLWARDEN_AUTH_TOKENS adds comma-separated ones).
    #[arg(long, value_name = "FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// Require the same bearer tokens on --metrics-addr.
    #[arg(long)]
    pub metrics_auth: bool,
    /// Serve /metrics, /health, /circuits and /stats on ADDR (e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Allow a non-loopback --metrics-addr.
    #[arg(long)]
    pub metrics_allow_remote: bool,
    /// Threads serving the clients and the upstream (the runtime's
    /// workers). Default 1, or TOKIO_WORKER_THREADS if set: each call hops
    /// between a dozen tasks (the HTTP connection, the MCP session, the
    /// stack, the upstream's client), and with more workers than busy
    /// clients those hops wake idle threads, which doubled the proxy's CPU
    /// per call and added about 1 ms at p50 on a 2-core machine
    /// (BENCHMARKS.md). Raise it for many clients calling at once.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
    /// The upstream server's command and arguments, after `--`.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

/// The runtime's workers when `--worker-threads` is not given: tokio's own
/// `TOKIO_WORKER_THREADS` if set (tokio reads it), else one.
const DEFAULT_WORKER_THREADS: usize = 1;

/// The worker threads of the runtime `command` runs on: `--worker-threads`,
/// else `None` when `TOKIO_WORKER_THREADS` is set (the runtime builder
/// reads it), else [`DEFAULT_WORKER_THREADS`]. `demo` and `top` take the
/// default.
fn worker_threads(command: &Command, tokio_env: Option<OsString>) -> Option<usize> {
    let flag = match command {
        Command::Run(args) => args.worker_threads,
        _ => None,
    };
    match (flag, tokio_env) {
        (Some(n), _) => Some(usize::from(n)),
        (None, Some(_)) => None,
        (None, None) => Some(DEFAULT_WORKER_THREADS),
    }
}

/// `toolwarden check-config`.
#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    /// The configuration file.
    pub file: PathBuf,
    /// Print the effective configuration (file plus environment) as TOML.
    #[arg(long)]
    pub print: bool,
}

/// Exit status 2: the configuration or the command line is wrong.
const USAGE: u8 = 2;

impl RunArgs {
    fn target(&self) -> Result<UpstreamTarget, String> {
        match (&self.upstream_url, self.command.split_first()) {
            (Some(_), Some(_)) => Err("give either --upstream-url or a command after --, not both".into()),
            (Some(url), None) => {
                // The URL may carry a token: the error shows it redacted.
                let scheme = reqwest::Url::parse(url).map(|u| u.scheme().to_owned());
                if !matches!(scheme.as_deref(), Ok("http" | "https")) {
                    return Err(format!(
                        "--upstream-url must be an http:// or https:// URL, got {}",
                        crate::redact::redact_url(url)
                    ));
                }
                Ok(UpstreamTarget::Url(url.clone()))
            }
            (None, Some((program, args))) => Ok(UpstreamTarget::Command {
                program: program.clone(),
                args: args.to_vec(),
            }),
            (None, None) => Err(
                "no upstream server: give its command after -- (toolwarden run -- mcp-server-time) \
                 or --upstream-url URL"
                    .into(),
            ),
        }
    }
}

/// A log line per resilience event, at `info`; a failed Redis operation
/// (`SyncFailed`) at `warn`, at most once per [`SYNC_WARNING_EVERY`] (the
/// rest at `info`): a wrong password or an unreachable Redis showed
/// nowhere at the default level, and an outage fails every operation.
fn log_event(event: &Event<'_>) {
    if matches!(event, Event::SyncFailed { .. })
        && warning_due(&LAST_SYNC_WARNING, monotonic_ms(), SYNC_WARNING_EVERY)
    {
        tracing::warn!(
            event = event.name(),
            "{event:?} (state is not shared while Redis fails; more failures \
             within {}s are logged at info)",
            SYNC_WARNING_EVERY.as_secs()
        );
        return;
    }
    tracing::info!(
        event = event.name(),
        subject = event.subject().unwrap_or("-"),
        "{event:?}"
    );
}

/// How often a failing Redis is warned about.
const SYNC_WARNING_EVERY: Duration = Duration::from_secs(10);

/// When the last Redis warning was logged, in [`monotonic_ms`] (0: never).
static LAST_SYNC_WARNING: AtomicU64 = AtomicU64::new(0);

/// Milliseconds since the first call, from 1 (0 stands for never).
fn monotonic_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .saturating_add(1)
}

/// Whether a warning last logged at `last` is due again at `now` (ms):
/// takes the turn when it is.
fn warning_due(last: &AtomicU64, now: u64, every: Duration) -> bool {
    let every = u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
    let previous = last.load(Ordering::Relaxed);
    (previous == 0 || now.saturating_sub(previous) >= every)
        && last
            .compare_exchange(previous, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// Who may use `--listen` (and, with `--metrics-auth`, the metrics
/// address): `[http]` lists plus the flags, and the bearer tokens of
/// `--auth-token-file` (else `http.auth_token_file`) and
/// `TOOLWARDEN_AUTH_TOKENS`. Off loopback, tokens are required.
fn access_policy(args: &RunArgs, config: &Config) -> Result<AccessPolicy, String> {
    let metrics_auth = args.metrics_auth || config.http.metrics_auth;
    let tokens = if args.listen.is_some() || metrics_auth {
        let file = args
            .auth_token_file
            .as_deref()
            .or(config.http.auth_token_file.as_deref());
        AuthTokens::from_env(file)?
    } else {
        AuthTokens::default()
    };
    if let Some(addr) = args.listen.filter(|a| !a.ip().is_loopback()) {
        if tokens.is_empty() {
            return Err(format!(
                "--listen {addr} is not a loopback address, so clients must authenticate: \
                 give bearer tokens with --auth-token-file FILE, http.auth_token_file or \
                 {AUTH_TOKENS_ENV} (refusing to serve without them)"
            ));
        }
    }
    if metrics_auth && tokens.is_empty() {
        return Err(format!(
            "--metrics-auth needs bearer tokens: --auth-token-file FILE, \
             http.auth_token_file or {AUTH_TOKENS_ENV}"
        ));
    }
    let origins: Vec<String> = config
        .http
        .allowed_origins
        .iter()
        .chain(&args.allow_origin)
        .cloned()
        .collect();
    let hosts: Vec<String> = config
        .http
        .allowed_hosts
        .iter()
        .chain(&args.allow_host)
        .cloned()
        .collect();
    AccessPolicy::new(&origins, &hosts, args.listen, tokens)
}

/// SIGTERM or SIGINT (Ctrl-C).
pub(crate) async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

async fn run(args: RunArgs, redactor: SharedRedactor, slot: Slot) -> ExitCode {
    #[cfg(not(feature = "otlp"))]
    let NoSlot = slot;
    let mut config = match Config::load(args.config.as_deref(), process_env()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("toolwarden: {e}");
            return ExitCode::from(USAGE);
        }
    };
    // `[upstreams.NAME]` in the file, or one upstream on the command line.
    let target = if config.upstreams.is_empty() {
        match args.target() {
            Ok(target) => Some(target),
            Err(e) => {
                eprintln!("toolwarden: {e}");
                return ExitCode::from(USAGE);
            }
        }
    } else if args.upstream_url.is_some() || !args.command.is_empty() {
        eprintln!(
            "toolwarden: the configuration lists [upstreams]: give no upstream on the command line"
        );
        return ExitCode::from(USAGE);
    } else {
        None
    };
    if let Some(ca_file) = &args.upstream_ca_file {
        config.upstream.ca_file = Some(ca_file.clone());
    }
    for (addr, allow, flag) in [
        (
            args.listen,
            args.listen_allow_remote,
            "--listen-allow-remote",
        ),
        (
            args.metrics_addr,
            args.metrics_allow_remote,
            "--metrics-allow-remote",
        ),
    ] {
        if let Some(addr) = addr {
            if let Err(e) = endpoints::check_loopback(addr, allow, flag) {
                eprintln!("toolwarden: {e}");
                return ExitCode::from(USAGE);
            }
        }
    }

    // Validated with the configuration (1 to 1000).
    let history = toolwarden::observability::HealthHistory::new(config.http.health_history)
        .unwrap_or_default();
    let endpoints = MetricsEndpoints::with_health_history(history);
    // Prometheus for the metrics address, OpenTelemetry for the collector:
    // one recorder each, or a fan-out to both.
    let prometheus = args.metrics_addr.map(|_| {
        let recorder = endpoints::prometheus_builder().build_recorder();
        let handle = recorder.handle();
        (recorder, handle)
    });
    #[cfg(feature = "otlp")]
    let export = match crate::otlp::OtlpSettings::from_settings(&config.observability) {
        Ok(None) => None,
        Ok(Some(settings)) => match crate::otlp::OtlpExport::start(&settings) {
            Ok(export) => {
                if let Err(e) = slot.fill(&export) {
                    tracing::warn!(error = %e, "OpenTelemetry: spans are not exported");
                }
                tracing::info!(
                    endpoint = %settings.endpoint,
                    protocol = ?settings.protocol,
                    "exporting traces and metrics over OTLP"
                );
                Some(export)
            }
            Err(e) => {
                eprintln!("toolwarden: {}", e.in_section("observability"));
                return ExitCode::from(USAGE);
            }
        },
        Err(e) => {
            eprintln!("toolwarden: {}", e.in_section("observability"));
            return ExitCode::from(USAGE);
        }
    };
    #[cfg(feature = "otlp")]
    let otel_recorder = export.as_ref().map(crate::otlp::OtlpExport::recorder);
    #[cfg(not(feature = "otlp"))]
    let otel_recorder: Option<metrics_exporter_prometheus::PrometheusRecorder> = None;
    fn install<R: metrics::Recorder + Sync + 'static>(recorder: R) -> Result<(), String> {
        metrics::set_global_recorder(recorder).map_err(|e| e.to_string())
    }
    let installed = match (prometheus, otel_recorder) {
        (None, None) => None,
        (Some((recorder, handle)), None) => Some((install(recorder), Some(handle))),
        (None, Some(otel)) => Some((install(otel), None)),
        (Some((recorder, handle)), Some(otel)) => {
            let fanout = metrics_util::layers::FanoutBuilder::default()
                .add_recorder(recorder)
                .add_recorder(otel)
                .build();
            Some((install(fanout), Some(handle)))
        }
    };
    match installed {
        Some((Err(e), _)) => {
            tracing::warn!(error = %e, "metrics recorder not installed; no metrics are exported")
        }
        Some((Ok(()), Some(handle))) => {
            toolwarden::observability::describe_metrics();
            let upkeep = handle.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tick.tick().await;
                    upkeep.run_upkeep();
                }
            });
            endpoints.set_metrics(move || handle.render());
        }
        Some((Ok(()), None)) | None => {}
    }
    let access = match access_policy(&args, &config) {
        Ok(access) => access,
        Err(e) => {
            eprintln!("toolwarden: {e}");
            return ExitCode::from(USAGE);
        }
    };
    let metrics_tokens =
        (args.metrics_auth || config.http.metrics_auth).then(|| access.tokens().clone());
    let shared = SharedState::new(Events::new().with(log_event), endpoints.clone());
    let max_line_bytes = config.downstream.max_line_bytes;
    let max_body_bytes = config.downstream.max_body_bytes;
    let http_options = crate::HttpOptions::new(&config.http, max_body_bytes, access);
    let built = match target {
        Some(target) => Proxy::new(config, target, shared),
        None => Proxy::gateway(config, shared),
    };
    let proxy = match built {
        Ok(proxy) => Arc::new(proxy),
        Err(e) => {
            eprintln!("toolwarden: {e}");
            return ExitCode::from(USAGE);
        }
    };
    // From here on every log line is scrubbed of the upstream's secrets.
    let mut secrets = match proxy.gateway_ref() {
        Some(gateway) => gateway.redactor(),
        None => Redactor::clone(&proxy.upstream().redactor()),
    };
    if let Some(redis) = &proxy.config().redis {
        // A password in `redis.url` stays out of the logs too.
        secrets = secrets.with_url(&redis.url);
    }
    // Nor do the collector's header values (an API key).
    for value in proxy.config().observability.otlp_headers.values() {
        secrets = secrets.with_secret(value.clone());
    }
    redactor.set(secrets);

    let shutdown = CancellationToken::new();
    // Reloads: on SIGHUP, and with --watch when the file changes.
    tokio::spawn(crate::reload::on_hangup(
        Arc::clone(&proxy),
        args.config.clone(),
        shutdown.child_token(),
    ));
    if let (true, Some(path)) = (args.watch, &args.config) {
        tokio::spawn(crate::reload::watch(
            Arc::clone(&proxy),
            path.clone(),
            crate::reload::WATCH_INTERVAL,
            shutdown.child_token(),
        ));
    }
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            shutdown_signal().await;
            tracing::info!("shutting down");
            shutdown.cancel();
            // A second signal: the operator will not wait for the drain.
            shutdown_signal().await;
            eprintln!("toolwarden: second signal, exiting at once");
            std::process::exit(130);
        }
    });

    let metrics_server = match args.metrics_addr {
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                let bound = listener.local_addr().map_or(addr, |a| a);
                tracing::info!(%bound, "serving /metrics, /health, /circuits and /stats");
                let mut limits = http_options.connection_limits();
                limits.max_connections = limits
                    .max_connections
                    .min(endpoints::METRICS_MAX_CONNECTIONS);
                Some(tokio::spawn(endpoints::serve(
                    listener,
                    endpoints,
                    proxy.upstreams(),
                    metrics_tokens,
                    limits,
                    shutdown.child_token(),
                )))
            }
            Err(e) => {
                eprintln!("toolwarden: cannot listen on {addr} for metrics: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };

    let served = match args.listen {
        None => {
            crate::serve_stdio(
                proxy.cores().session_core(),
                tokio::io::stdin(),
                tokio::io::stdout(),
                max_line_bytes,
                shutdown.clone(),
            )
            .await
        }
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                let bound = listener.local_addr().map_or(addr, |a| a);
                tracing::info!(url = %format!("http://{bound}/mcp"), "serving MCP over Streamable HTTP");
                crate::serve_http_with(proxy.cores(), listener, http_options, shutdown.clone())
                    .await
            }
            Err(e) => Err(e),
        },
    };
    shutdown.cancel();
    proxy.shutdown().await;
    if let Some(server) = metrics_server {
        let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    }
    // The last spans and metrics leave before the process does.
    #[cfg(feature = "otlp")]
    if let Some(export) = export {
        export.shutdown().await;
    }
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("toolwarden: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(args: &CheckConfigArgs) -> ExitCode {
    // Loading runs every check, the layers' builders included (it builds
    // the stack); then what the HTTP client needs (the CA file, variables).
    let loaded = Config::load(Some(&args.file), process_env()).map_err(|e| e.to_string());
    let checked = loaded.and_then(|config| {
        crate::upstream::check_http_config(&config.upstream).map_err(|e| e.to_string())?;
        for (name, entry) in config.upstreams.iter().filter(|(_, e)| e.url.is_some()) {
            let section = format!("upstreams.{}", crate::config::quote_key(name));
            crate::upstream::check_http_config(&entry.connection)
                .map_err(|e| crate::config::in_upstream_table(&section, &e).to_string())?;
        }
        Ok(config)
    });
    match checked {
        Ok(config) => {
            if args.print {
                match toml::to_string(&config) {
                    Ok(text) => print!("{text}"),
                    Err(e) => {
                        eprintln!("toolwarden: cannot print the configuration: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                println!("{}: ok", args.file.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}: {e}", args.file.display());
            ExitCode::from(USAGE)
        }
    }
}

/// Runs the command line: sets up logging (stderr, `RUST_LOG`, default
/// `warn,rmcp=error`) and the runtime, and returns the exit status.
#[must_use]
pub fn main(cli: Cli) -> ExitCode {
    // SIGHUP reloads a running proxy; until `run` listens for it (after the
    // runtime is up and the configuration loaded), its default action
    // would end the process: one sent by a supervisor right after a start
    // did. Caught from here on, and ignored until then (the configuration
    // being loaded is the file's newest anyway). `top` and `demo` keep the
    // default: a terminal's hangup ends them.
    #[cfg(unix)]
    if matches!(cli.command, Command::Run(_)) {
        let caught = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        if let Err(e) = signal_hook::flag::register(signal_hook::consts::SIGHUP, caught) {
            eprintln!("toolwarden: cannot catch SIGHUP early: {e}");
        }
    }
    // rmcp logs every error response at WARN; those are answers, not faults.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,rmcp=error"));
    // Every line is scrubbed of the upstream's secrets (URL userinfo and
    // query, header values), whichever crate logs it; `run` sets them.
    let redactor = SharedRedactor::default();
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(RedactingStderr::new(redactor.clone()))
        .with_filter(filter);
    // The OpenTelemetry layer's place, filled once `run` has read
    // `[observability]` (the filter above is the log lines' only).
    #[cfg(feature = "otlp")]
    let slot = {
        let (layer, slot) = crate::otlp::TracingSlot::new();
        tracing_subscriber::registry().with(layer).with(logs).init();
        slot
    };
    #[cfg(not(feature = "otlp"))]
    let slot = {
        tracing_subscriber::registry().with(logs).init();
        NoSlot
    };
    if let Command::CheckConfig(args) = &cli.command {
        return check_config(args);
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = worker_threads(&cli.command, std::env::var_os("TOKIO_WORKER_THREADS")) {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("toolwarden: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => run(args, redactor, slot).await,
            Command::Demo => crate::demo::run().await,
            #[cfg(unix)]
            Command::Top(args) => crate::top::run(args).await,
            Command::CheckConfig(_) => ExitCode::SUCCESS,
        }
    });
    // A read of stdin may still be blocking a thread: do not wait for it.
    runtime.shutdown_timeout(Duration::from_millis(500));
    code
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn command(args: &[&str]) -> Command {
        Cli::try_parse_from(args).unwrap().command
    }

    #[test]
    fn a_failing_redis_is_warned_about_once_per_period() {
        let last = AtomicU64::new(0);
        let every = Duration::from_secs(10);
        assert!(warning_due(&last, 5, every), "the first failure");
        assert!(!warning_due(&last, 5_000, every), "within the period");
        assert!(!warning_due(&last, 10_004, every));
        assert!(warning_due(&last, 10_005, every), "the period is over");
        assert!(!warning_due(&last, 10_006, every));
    }

    #[test]
    fn one_worker_unless_the_flag_or_tokios_variable_says_otherwise() {
        let run = command(&["toolwarden", "run", "--", "server"]);
        assert_eq!(worker_threads(&run, None), Some(1));
        // TOKIO_WORKER_THREADS is left to the runtime builder, which reads it.
        assert_eq!(worker_threads(&run, Some("3".into())), None);
        let flag = command(&["toolwarden", "run", "--worker-threads", "4", "--", "server"]);
        assert_eq!(worker_threads(&flag, None), Some(4));
        assert_eq!(worker_threads(&flag, Some("3".into())), Some(4));
        assert_eq!(
            worker_threads(&command(&["toolwarden", "demo"]), None),
            Some(1)
        );
    }

    #[test]
    fn worker_threads_must_be_between_1_and_1024() {
        for bad in ["0", "1025", "many"] {
            let parsed = Cli::try_parse_from(["toolwarden", "run", "--worker-threads", bad]);
            let error = parsed.unwrap_err().to_string();
            assert!(error.contains("--worker-threads"), "{bad}: {error}");
        }
    }
}
