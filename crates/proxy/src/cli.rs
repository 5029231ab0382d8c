//! The `toolwarden` command line: `run`, `check-config` and `demo`.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use toolwarden_core::events::Event;
use toolwarden_core::Events;

use crate::config::{process_env, Config};
use crate::endpoints::{self, MetricsEndpoints};
use crate::stack::SharedState;
use crate::upstream::UpstreamTarget;
use crate::Proxy;

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
pub enum Command {
    /// Run the proxy in front of an MCP server: `toolwarden run [OPTIONS] -- <command> [args]`
    /// or `toolwarden run --upstream-url URL`.
    Run(RunArgs),
    /// Validate a configuration file (with the TOOLWARDEN_* environment) without running.
    CheckConfig(CheckConfigArgs),
    /// Run a flaky in-process MCP server and a scripted agent through the proxy,
    /// and show what each layer did. Needs nothing installed; under a minute.
    Demo,
}

/// `toolwarden run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The configuration file (TOML). Without one, every default applies.
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The upstream is a Streamable HTTP endpoint (e.g. http://127.0.0.1:3001/mcp)
    /// instead of a child process.
    #[arg(long, value_name = "URL")]
    pub upstream_url: Option<String>,
    /// Serve clients over Streamable HTTP at http://ADDR/mcp instead of stdio.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Allow a non-loopback --listen address (and any Host header).
    #[arg(long)]
    pub listen_allow_remote: bool,
    /// Serve /metrics, /health and /circuits on ADDR (e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Allow a non-loopback --metrics-addr.
    #[arg(long)]
    pub metrics_allow_remote: bool,
    /// The upstream server's command and arguments, after `--`.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
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
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(format!("--upstream-url must be an http:// URL, got {url:?}"));
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

/// A log line per resilience event, at `info`.
fn log_event(event: &Event<'_>) {
    tracing::info!(
        event = event.name(),
        subject = event.subject().unwrap_or("-"),
        "{event:?}"
    );
}

async fn shutdown_signal() {
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

async fn run(args: RunArgs) -> ExitCode {
    let target = match args.target() {
        Ok(target) => target,
        Err(e) => {
            eprintln!("toolwarden: {e}");
            return ExitCode::from(USAGE);
        }
    };
    let config = match Config::load(args.config.as_deref(), process_env()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("toolwarden: {e}");
            return ExitCode::from(USAGE);
        }
    };
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

    let endpoints = MetricsEndpoints::new();
    if args.metrics_addr.is_some() {
        match metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder() {
            Ok(handle) => {
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
            Err(e) => {
                tracing::warn!(error = %e, "metrics recorder not installed; /metrics stays empty")
            }
        }
    }
    let shared = SharedState::new(Events::new().with(log_event), endpoints.clone());
    let max_line_bytes = config.downstream.max_line_bytes;
    let max_body_bytes = config.downstream.max_body_bytes;
    let proxy = match Proxy::new(config, target, shared) {
        Ok(proxy) => proxy,
        Err(e) => {
            eprintln!("toolwarden: {e}");
            return ExitCode::from(USAGE);
        }
    };

    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            shutdown_signal().await;
            tracing::info!("shutting down");
            shutdown.cancel();
        }
    });

    let metrics_server = match args.metrics_addr {
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                let bound = listener.local_addr().map_or(addr, |a| a);
                tracing::info!(%bound, "serving /metrics, /health and /circuits");
                Some(tokio::spawn(endpoints::serve(
                    listener,
                    endpoints,
                    proxy.upstream().clone(),
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
            crate::stdio::serve_stdio(
                proxy.core(),
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
                crate::http::serve_http(
                    proxy.core(),
                    listener,
                    max_body_bytes,
                    args.listen_allow_remote,
                    shutdown.clone(),
                )
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
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("toolwarden: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(args: &CheckConfigArgs) -> ExitCode {
    // The file's values, then what only the built stack can check (the
    // cross-field rules of the layers and of the stack).
    let loaded = Config::load(Some(&args.file), process_env()).map_err(|e| e.to_string());
    let checked = loaded.and_then(|config| {
        let shared = SharedState::new(Events::new(), MetricsEndpoints::new());
        crate::stack::standard_stack(&config, &shared)
            .map(|_| config)
            .map_err(|e| e.to_string())
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
pub fn main(cli: Cli) -> ExitCode {
    // rmcp logs every error response at WARN; those are answers, not faults.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,rmcp=error"));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .init();
    if let Command::CheckConfig(args) = &cli.command {
        return check_config(args);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("toolwarden: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => run(args).await,
            Command::Demo => crate::demo::run().await,
            Command::CheckConfig(_) => ExitCode::SUCCESS,
        }
    });
    // A read of stdin may still be blocking a thread: do not wait for it.
    runtime.shutdown_timeout(Duration::from_millis(500));
    code
}
