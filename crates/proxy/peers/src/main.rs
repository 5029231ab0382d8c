//! Peer harness: the latency toolwarden and mcp-proxy 0.6 add in front of the
//! same MCP server, measured with the same client in one run.
//!
//! `./run` (next to this crate's Cargo.toml) builds everything and runs it;
//! see README.md. Five paths, each an rmcp Streamable HTTP client (one
//! kept-alive reqwest connection pool per client) calling `echo` on
//! `mcp-server-everything streamableHttp`, a different message each call:
//!
//! - `direct`: client → server-everything;
//! - `mcp-proxy minimal`: client → mcp-proxy (no middleware) → server-everything;
//! - `mcp-proxy loaded`: client → mcp-proxy (timeout, retry with budget,
//!   circuit breaker, outlier detection, response cache, request
//!   coalescing) → server-everything;
//! - `toolwarden off`: client → `toolwarden run --listen` with every layer
//!   switched off → server-everything;
//! - `toolwarden pinned`: `toolwarden full` with `upstream.protocol_version`
//!   pinned to 2025-06-18, the version mcp-proxy opens its upstream with.
//! - `toolwarden full`: the same with the standard stack at its defaults,
//!   but for the rate limit (off: the harness calls far above its quota).
//!
//! Both proxies are separate processes and reach the backend over HTTP
//! (mcp-proxy `transport = "http"`, toolwarden `--upstream-url`), one shared
//! upstream session each. mcp-proxy runs as this binary re-executed with the
//! `serve-mcp-proxy CONFIG` subcommand, which does what mcp-proxy's own
//! `main` does (load the TOML, `Proxy::from_config`, `serve`).
//!
//! Every path gets its own, freshly started backend process (server-everything
//! keeps every response of a session in memory, so a long-lived one would
//! slow the paths measured last). With `--rounds 2` (the default) the paths
//! run forwards then backwards and the latencies of both rounds are pooled,
//! so drift over the run does not favour the ones measured first.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use rmcp::model::{CallToolRequestParams, CallToolResponse};
use rmcp::service::{Peer, RunningService};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{RoleClient, ServiceExt as _};
use serde_json::json;

const DEFAULT_TOOLWARDEN: &str = "/work/main/target/release/toolwarden";
const DEFAULT_SERVER: &str = "/work/main/tests/e2e/node/node_modules/.bin/mcp-server-everything";

/// mcp-proxy's namespace for the one backend: its tool is `b/echo`.
const BACKEND_NAME: &str = "b";

/// mcp-proxy with no per-backend middleware.
const MCP_PROXY_MINIMAL: &str = "";

/// mcp-proxy's resilience middleware, configured so that it never refuses
/// or short-circuits a call of this run (every call succeeds and has
/// distinct arguments, so the cache and the coalescer always miss but still
/// do their work: key, lookup, insert), with values chosen to match
/// toolwarden's defaults where there is a counterpart.
const MCP_PROXY_LOADED: &str = r#"
[backends.timeout]
# toolwarden: upstream.attempt_timeout = "20s"
seconds = 20

[backends.retry]
# toolwarden: retry.max_attempts = 3 (2 retries), base_delay 100ms,
# max_delay 10s, budget = { ratio = 0.2, min_per_sec = 10 }
max_retries = 2
initial_backoff_ms = 100
max_backoff_ms = 10000
budget_percent = 20.0
min_retries_per_sec = 10

[backends.circuit_breaker]
# toolwarden: circuit_breaker.failure_rate_threshold 0.5, minimum_calls 20,
# reset_timeout 30s, half_open_max_calls 1
failure_rate_threshold = 0.5
minimum_calls = 20
wait_duration_seconds = 30
permitted_calls_in_half_open = 1

[backends.outlier_detection]
# toolwarden: circuit_breaker.failure_threshold = 5 (consecutive)
consecutive_errors = 5
interval_seconds = 10
base_ejection_seconds = 30
max_ejection_percent = 50

[backends.cache]
# toolwarden: fallback_cache.max_staleness 5m, max_entries 10000
tool_ttl_seconds = 300
resource_ttl_seconds = 300
max_entries = 10000
"#;

/// Every toolwarden layer switched off.
const TOOLWARDEN_OFF: &str = r#"
[circuit_breaker]
enabled = false
[rate_limit]
enabled = false
[retry]
enabled = false
[loop_guard]
enabled = false
[fallback_cache]
enabled = false
[observability]
enabled = false
"#;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Direct,
    McpProxyMinimal,
    McpProxyLoaded,
    ToolwardenOff,
    ToolwardenFull,
    ToolwardenPinned,
}

const ROUTES: [Route; 6] = [
    Route::Direct,
    Route::McpProxyMinimal,
    Route::McpProxyLoaded,
    Route::ToolwardenOff,
    Route::ToolwardenFull,
    Route::ToolwardenPinned,
];

/// The upstream protocol version of the `toolwarden pinned` path: the one
/// the raw client asks for, which mcp-proxy's rmcp also opens its upstream
/// with.
const PINNED_PROTOCOL_VERSION: &str = "2025-06-18";

impl Route {
    fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::McpProxyMinimal => "mcp-proxy minimal",
            Route::McpProxyLoaded => "mcp-proxy loaded",
            Route::ToolwardenOff => "toolwarden off",
            Route::ToolwardenFull => "toolwarden full",
            Route::ToolwardenPinned => "toolwarden pinned",
        }
    }
}

struct Options {
    toolwarden: PathBuf,
    server: PathBuf,
    warmup: usize,
    calls: usize,
    clients: usize,
    per_client: usize,
    rounds: usize,
    keep_alive: bool,
    clients_kinds: Vec<ClientKind>,
}

const USAGE: &str = "\
usage: toolwarden-proxy-peers [OPTIONS]
       toolwarden-proxy-peers serve-mcp-proxy CONFIG.toml
       toolwarden-proxy-peers mcp-proxy-config minimal|loaded PORT BACKEND_URL

  --toolwarden PATH   the toolwarden binary (env TOOLWARDEN_BIN; default
                      /work/main/target/release/toolwarden)
  --server PATH       mcp-server-everything (env TOOLWARDEN_SERVER_EVERYTHING;
                      default /work/main/tests/e2e/node/node_modules/.bin/mcp-server-everything)
  --warmup N          warm-up calls per path and round (default 300)
  --calls N           sequential calls with 1 client per path and round (default 2000)
  --clients N         clients at once, a session each (default 8)
  --per-client N      calls of each of those clients per path and round (default 300)
  --rounds N          rounds over the paths, alternately forwards and backwards (default 2)
  --client KIND       rmcp (rmcp's Streamable HTTP client), raw (a minimal MCP
                      client on reqwest) or both (default), each measured on every path
  --no-keep-alive     use rmcp's default HTTP client (no idle connection kept:
                      a new TCP connection per request) instead of a kept-alive pool
  --quick             a smoke run: --warmup 10 --calls 50 --per-client 10 --rounds 1";

fn parse_options() -> Result<Options> {
    let env_path = |var: &str, default: &str| {
        std::env::var_os(var)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(default))
    };
    let mut options = Options {
        toolwarden: env_path("TOOLWARDEN_BIN", DEFAULT_TOOLWARDEN),
        server: env_path("TOOLWARDEN_SERVER_EVERYTHING", DEFAULT_SERVER),
        warmup: 300,
        calls: 2000,
        clients: 8,
        per_client: 300,
        rounds: 2,
        keep_alive: true,
        clients_kinds: CLIENT_KINDS.to_vec(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--toolwarden" => options.toolwarden = PathBuf::from(value()?),
            "--server" => options.server = PathBuf::from(value()?),
            "--warmup" => options.warmup = value()?.parse()?,
            "--calls" => options.calls = value()?.parse()?,
            "--clients" => options.clients = value()?.parse()?,
            "--per-client" => options.per_client = value()?.parse()?,
            "--rounds" => options.rounds = value()?.parse()?,
            "--no-keep-alive" => options.keep_alive = false,
            "--client" => {
                options.clients_kinds = match value()?.as_str() {
                    "rmcp" => vec![ClientKind::Rmcp],
                    "raw" => vec![ClientKind::Raw],
                    "both" => CLIENT_KINDS.to_vec(),
                    other => bail!("--client rmcp, raw or both, not {other:?}"),
                }
            }
            "--quick" => {
                options.warmup = 10;
                options.calls = 50;
                options.per_client = 10;
                options.rounds = 1;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if options.calls == 0 || options.clients == 0 || options.per_client == 0 || options.rounds == 0
    {
        bail!("--calls, --clients, --per-client and --rounds must be at least 1");
    }
    for (what, path) in [
        ("toolwarden", &options.toolwarden),
        ("mcp-server-everything", &options.server),
    ] {
        if !path.exists() {
            bail!("{what} not found at {}", path.display());
        }
    }
    Ok(options)
}

/// mcp-proxy's configuration for a path: listening on `port`, one HTTP
/// backend at `backend_url`, with the loaded middleware (and coalescing) or
/// none.
fn mcp_proxy_config(loaded: bool, port: u16, backend_url: &str) -> String {
    let middleware = if loaded {
        MCP_PROXY_LOADED
    } else {
        MCP_PROXY_MINIMAL
    };
    format!(
        r#"[proxy]
name = "peers"
separator = "/"
[proxy.listen]
host = "127.0.0.1"
port = {port}

[performance]
coalesce_requests = {loaded}

[observability]
log_level = "error"

[[backends]]
name = "{BACKEND_NAME}"
transport = "http"
url = "{backend_url}"
{middleware}"#
    )
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("mcp-proxy-config") {
        // `mcp-proxy-config minimal|loaded PORT BACKEND_URL`: the config a
        // path runs mcp-proxy with (for `instructions`).
        let (Some(kind), Some(port), Some(url)) = (args.get(2), args.get(3), args.get(4)) else {
            bail!("usage: mcp-proxy-config minimal|loaded PORT BACKEND_URL");
        };
        let loaded = match kind.as_str() {
            "minimal" => false,
            "loaded" => true,
            other => bail!("mcp-proxy-config: {other} is not minimal or loaded"),
        };
        print!("{}", mcp_proxy_config(loaded, port.parse()?, url));
        return Ok(());
    }
    if args.get(1).map(String::as_str) == Some("serve-mcp-proxy") {
        let config = args.get(2).context("serve-mcp-proxy needs a config file")?;
        return serve_mcp_proxy(Path::new(config));
    }
    let options = parse_options()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(run(&options));
    runtime.shutdown_timeout(Duration::from_secs(5));
    result
}

/// mcp-proxy as its own binary runs it (src/main.rs of mcp-proxy 0.6.0:
/// `#[tokio::main]`, `ProxyConfig::load`, `resolve_env_vars`, logging at
/// the configured level, `Proxy::from_config`, `serve`). Logging goes to
/// stderr at `observability.log_level`, which the harness sets to "error",
/// as it sets `RUST_LOG=error` for toolwarden.
fn serve_mcp_proxy(config: &Path) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut config = mcp_proxy::ProxyConfig::load(config)?;
        config.resolve_env_vars();
        let level = config.observability.log_level.clone();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(format!(
                "tower_mcp={level},mcp_proxy={level}"
            )))
            .with_writer(std::io::stderr)
            .init();
        let proxy = mcp_proxy::Proxy::from_config(config).await?;
        proxy.serve().await
    })
}

/// A free loopback port (bound, then released for the child to take).
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts a child with output discarded; killed when dropped.
fn spawn(program: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<tokio::process::Child> {
    tokio::process::Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))
}

/// Waits until something accepts TCP connections on `port`.
async fn wait_listening(port: u16, child: &mut tokio::process::Child, what: &str) -> Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let start = Instant::now();
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited before listening on {port}: {status}");
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("{what} does not listen on {port} after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An rmcp client over Streamable HTTP at `url`, with its session settled
/// (a `tools/list` answered: the `initialized` notification has been taken).
async fn connect(url: &str, keep_alive: bool) -> Result<RunningService<RoleClient, ()>> {
    let start = Instant::now();
    loop {
        let transport = if keep_alive {
            // reqwest's default pool: idle connections kept (90 s) and
            // reused, one pool per client.
            StreamableHttpClientTransport::with_client(
                reqwest::Client::new(),
                StreamableHttpClientTransportConfig::with_uri(url.to_owned()),
            )
        } else {
            // rmcp's own default client: `pool_max_idle_per_host(0)`, a new
            // TCP connection for every request.
            StreamableHttpClientTransport::from_uri(url.to_owned())
        };
        let attempt = tokio::time::timeout(Duration::from_secs(5), ().serve(transport)).await;
        match attempt {
            Ok(Ok(running)) => {
                for _ in 0..50 {
                    if running.peer().list_tools(None).await.is_ok() {
                        return Ok(running);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let _ = running.cancel().await;
            }
            Ok(Err(e)) if start.elapsed() > Duration::from_secs(30) => {
                bail!("initialize over HTTP at {url}: {e}")
            }
            Err(_) if start.elapsed() > Duration::from_secs(30) => {
                bail!("initialize over HTTP at {url}: no answer")
            }
            _ => {}
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("no settled session at {url} within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The two clients. Both keep their connections alive (unless
/// `--no-keep-alive`), one reqwest pool per client (per session).
#[derive(Clone, Copy, PartialEq, Eq)]
enum ClientKind {
    /// rmcp's Streamable HTTP client (`call_tool_once` on its peer): what an
    /// rmcp-based agent uses; the client the issue asks for.
    Rmcp,
    /// A minimal MCP client straight on reqwest: one POST per call, the
    /// whole body read (JSON or SSE, the answer picked out of it), nothing
    /// else. It costs the same whatever the server answers with, so it
    /// separates the proxies from the rmcp client's own costs.
    Raw,
}

const CLIENT_KINDS: [ClientKind; 2] = [ClientKind::Rmcp, ClientKind::Raw];

impl ClientKind {
    fn name(self) -> &'static str {
        match self {
            ClientKind::Rmcp => "rmcp client",
            ClientKind::Raw => "raw reqwest client",
        }
    }
}

fn http_client(keep_alive: bool) -> Result<reqwest::Client> {
    let builder = reqwest::Client::builder();
    let builder = if keep_alive {
        builder
    } else {
        builder.pool_max_idle_per_host(0)
    };
    Ok(builder.build()?)
}

/// A session of either client.
enum Session {
    Rmcp(RunningService<RoleClient, ()>),
    Raw(Arc<RawSession>),
}

/// What calls through a [`Session`] (cloned into each task).
#[derive(Clone)]
enum Handle {
    Rmcp(Peer<RoleClient>),
    Raw(Arc<RawSession>),
}

impl Session {
    async fn connect(kind: ClientKind, url: &str, keep_alive: bool) -> Result<Self> {
        match kind {
            ClientKind::Rmcp => Ok(Session::Rmcp(connect(url, keep_alive).await?)),
            ClientKind::Raw => Ok(Session::Raw(Arc::new(
                RawSession::connect(url, keep_alive).await?,
            ))),
        }
    }

    fn handle(&self) -> Handle {
        match self {
            Session::Rmcp(running) => Handle::Rmcp(running.peer().clone()),
            Session::Raw(raw) => Handle::Raw(raw.clone()),
        }
    }

    async fn close(self) {
        match self {
            Session::Rmcp(running) => {
                let _ = running.cancel().await;
            }
            Session::Raw(raw) => raw.close().await,
        }
    }
}

/// A message never sent before (so no cache can answer the call).
fn unique_message() -> String {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    format!("peers {}", CALLS.fetch_add(1, Ordering::Relaxed))
}

impl Handle {
    /// One `echo` call with a message never sent before; checks the answer
    /// carries that message (so no cache answered it) and returns its latency.
    async fn call(&self, tool: &str) -> Result<Duration> {
        let message = unique_message();
        let start = Instant::now();
        let content =
            tokio::time::timeout(Duration::from_secs(30), self.call_inner(tool, &message))
                .await
                .context("no answer to echo within 30 s")??;
        let elapsed = start.elapsed();
        if !content.iter().any(|text| text.contains(&message)) {
            bail!("echo answered without the message {message:?}: {content:?}");
        }
        Ok(elapsed)
    }

    /// The texts of the answer.
    async fn call_inner(&self, tool: &str, message: &str) -> Result<Vec<String>> {
        match self {
            Handle::Rmcp(peer) => {
                let mut params = CallToolRequestParams::new(tool.to_owned());
                params.arguments = json!({ "message": message }).as_object().cloned();
                let response = peer.call_tool_once(params).await.context("echo failed")?;
                let CallToolResponse::Complete(result) = response else {
                    bail!("echo: not a complete result");
                };
                if result.is_error == Some(true) {
                    bail!("echo answered an error: {:?}", result.content);
                }
                Ok(result
                    .content
                    .iter()
                    .filter_map(|c| c.as_text())
                    .map(|t| t.text.clone())
                    .collect())
            }
            Handle::Raw(raw) => {
                let result = raw
                    .request(
                        "tools/call",
                        json!({ "name": tool, "arguments": { "message": message } }),
                    )
                    .await?;
                if result.get("isError") == Some(&serde_json::Value::Bool(true)) {
                    bail!("echo answered an error: {result}");
                }
                Ok(result
                    .get("content")
                    .and_then(|c| c.as_array())
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c.get("text").and_then(|t| t.as_str()))
                    .map(str::to_owned)
                    .collect())
            }
        }
    }
}

/// The raw client's session: its reqwest client (its own pool), the
/// session id and protocol version the server gave.
struct RawSession {
    http: reqwest::Client,
    url: String,
    session_id: Option<String>,
    protocol_version: String,
    next_id: AtomicU64,
}

/// The protocol version the raw client asks for (all three servers speak it).
const RAW_PROTOCOL_VERSION: &str = "2025-06-18";

impl RawSession {
    async fn connect(url: &str, keep_alive: bool) -> Result<Self> {
        let start = Instant::now();
        loop {
            match Self::try_connect(url, keep_alive).await {
                Ok(session) => return Ok(session),
                Err(e) if start.elapsed() > Duration::from_secs(30) => {
                    return Err(e.context(format!("raw client: no session at {url} within 30 s")));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    async fn try_connect(url: &str, keep_alive: bool) -> Result<Self> {
        let mut session = RawSession {
            http: http_client(keep_alive)?,
            url: url.to_owned(),
            session_id: None,
            protocol_version: RAW_PROTOCOL_VERSION.to_owned(),
            next_id: AtomicU64::new(0),
        };
        let (result, session_id) = session
            .post(
                json!({
                    "jsonrpc": "2.0", "id": 0, "method": "initialize",
                    "params": {
                        "protocolVersion": RAW_PROTOCOL_VERSION,
                        "capabilities": {},
                        "clientInfo": { "name": "toolwarden-proxy-peers", "version": "0.0.0" }
                    }
                }),
                Some(0),
            )
            .await?;
        session.session_id = session_id;
        if let Some(v) = result.and_then(|r| {
            r.get("protocolVersion")
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        }) {
            session.protocol_version = v;
        }
        session
            .post(
                json!({ "jsonrpc": "2.0", "method": "notifications/initialized" }),
                None,
            )
            .await?;
        session.request("tools/list", json!({})).await?;
        Ok(session)
    }

    /// A request and its result (a JSON-RPC error is an error).
    async fn request(&self, method: &str, params: serde_json::Value) -> Result<serde_json::Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (result, _) = self
            .post(
                json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params }),
                Some(id),
            )
            .await?;
        result.context("no result")
    }

    /// POSTs `body`; with `id`, finds the answer to it in the JSON or SSE
    /// body (read to its end, so the connection goes back to the pool).
    async fn post(
        &self,
        body: serde_json::Value,
        id: Option<u64>,
    ) -> Result<(Option<serde_json::Value>, Option<String>)> {
        let mut request = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", &self.protocol_version)
            .body(serde_json::to_vec(&body)?);
        if let Some(session_id) = &self.session_id {
            request = request.header("mcp-session-id", session_id);
        }
        let response = request.send().await?;
        let status = response.status();
        let session_id = response
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let sse = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("text/event-stream"));
        let bytes = response.bytes().await?;
        if !status.is_success() {
            bail!("HTTP {status}: {}", String::from_utf8_lossy(&bytes));
        }
        let Some(id) = id else {
            return Ok((None, session_id));
        };
        let answer = |message: serde_json::Value| -> Option<Result<serde_json::Value>> {
            if message.get("id").and_then(|v| v.as_u64()) != Some(id) {
                return None;
            }
            if let Some(error) = message.get("error") {
                return Some(Err(anyhow::anyhow!("JSON-RPC error: {error}")));
            }
            Some(
                message
                    .get("result")
                    .cloned()
                    .context("an answer without result"),
            )
        };
        if sse {
            let text = std::str::from_utf8(&bytes)?;
            // Events are separated by a blank line; their data lines joined.
            for event in text.split("\n\n") {
                let data: Vec<&str> = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                if data.is_empty() {
                    continue;
                }
                let Ok(message) = serde_json::from_str::<serde_json::Value>(&data.join("\n"))
                else {
                    continue;
                };
                if let Some(result) = answer(message) {
                    return Ok((Some(result?), session_id));
                }
            }
            bail!("no answer to request {id} in the SSE body: {text}");
        }
        let message: serde_json::Value = serde_json::from_slice(&bytes)?;
        match answer(message) {
            Some(result) => Ok((Some(result?), session_id)),
            None => bail!(
                "no answer to request {id}: {}",
                String::from_utf8_lossy(&bytes)
            ),
        }
    }

    async fn close(&self) {
        if let Some(session_id) = &self.session_id {
            let _ = self
                .http
                .delete(&self.url)
                .header("mcp-session-id", session_id)
                .header("mcp-protocol-version", &self.protocol_version)
                .send()
                .await;
        }
    }
}

/// The latencies of one path: 1 client sequential, N clients at once, and
/// the TCP connections opened on the machine while they were measured.
#[derive(Default)]
struct Samples {
    sequential: Vec<Duration>,
    sequential_wall: Duration,
    sequential_opens: u64,
    /// The proxy process's CPU time and context switches over the
    /// sequential calls (zero for the direct path).
    sequential_cpu: Usage,
    clients: Vec<Duration>,
    clients_wall: Duration,
    clients_opens: u64,
}

/// A process's CPU time (user and system, every thread) and context
/// switches (voluntary and not, summed over its threads), from /proc.
#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    cpu: Duration,
    switches: u64,
}

impl Usage {
    /// `pid`'s usage so far; zero without a pid or a /proc.
    fn of(pid: Option<u32>) -> Usage {
        let Some(pid) = pid else {
            return Usage::default();
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The fields after the command's closing parenthesis: utime and
        // stime are the 12th and 13th (the 14th and 15th of the line).
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: u64 = [11, 12]
            .iter()
            .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
            .sum();
        // Linux reports these in USER_HZ, 100 per second on every
        // architecture it runs on.
        let cpu = Duration::from_millis(ticks * 10);
        let mut switches = 0;
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for task in tasks.flatten() {
                let status =
                    std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
                switches += status
                    .lines()
                    .filter(|l| {
                        l.starts_with("voluntary_ctxt_switches")
                            || l.starts_with("nonvoluntary_ctxt_switches")
                    })
                    .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                    .sum::<u64>();
            }
        }
        Usage { cpu, switches }
    }

    fn since(self, earlier: Usage) -> Usage {
        Usage {
            cpu: self.cpu.saturating_sub(earlier.cpu),
            switches: self.switches.saturating_sub(earlier.switches),
        }
    }

    fn add(&mut self, other: Usage) {
        self.cpu += other.cpu;
        self.switches += other.switches;
    }
}

/// TCP connections this machine has opened so far (`Tcp: ActiveOpens` in
/// /proc/net/snmp, every process: the client's and the proxy's upstream
/// connections alike); 0 where there is no such file.
fn active_opens() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "ActiveOpens")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0)
}

async fn measure(
    kind: ClientKind,
    url: &str,
    tool: &str,
    options: &Options,
    proxy: Option<u32>,
    samples: &mut Samples,
) -> Result<()> {
    // One client, sequential calls.
    let session = Session::connect(kind, url, options.keep_alive).await?;
    let handle = session.handle();
    for _ in 0..options.warmup {
        handle.call(tool).await?;
    }
    let opens = active_opens();
    let usage = Usage::of(proxy);
    let start = Instant::now();
    for _ in 0..options.calls {
        samples.sequential.push(handle.call(tool).await?);
    }
    samples.sequential_wall += start.elapsed();
    samples.sequential_opens += active_opens().saturating_sub(opens);
    samples.sequential_cpu.add(Usage::of(proxy).since(usage));
    drop(handle);
    session.close().await;

    // N clients at once, each its own session and connection pool.
    let mut sessions = Vec::with_capacity(options.clients);
    for _ in 0..options.clients {
        sessions.push(Session::connect(kind, url, options.keep_alive).await?);
    }
    let warmup = options.warmup.div_ceil(options.clients);
    for session in &sessions {
        let handle = session.handle();
        for _ in 0..warmup {
            handle.call(tool).await?;
        }
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(options.clients + 1));
    let tasks: Vec<_> = sessions
        .iter()
        .map(|session| {
            let handle = session.handle();
            let tool = tool.to_owned();
            let n = options.per_client;
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                let mut latencies = Vec::with_capacity(n);
                for _ in 0..n {
                    latencies.push(handle.call(&tool).await?);
                }
                anyhow::Ok(latencies)
            })
        })
        .collect();
    let opens = active_opens();
    barrier.wait().await;
    let start = Instant::now();
    for task in tasks {
        samples.clients.extend(task.await??);
    }
    samples.clients_wall += start.elapsed();
    samples.clients_opens += active_opens().saturating_sub(opens);
    for session in sessions {
        session.close().await;
    }
    Ok(())
}

/// Starts a fresh backend and `route`'s proxy in front of it, measures, and
/// stops both.
async fn run_route(
    route: Route,
    kinds: &[ClientKind],
    options: &Options,
    scratch: &Path,
    samples: &mut [Vec<Samples>],
) -> Result<()> {
    let backend_port = free_port()?;
    let mut backend = spawn(
        &options.server,
        &["streamableHttp"],
        &[("PORT", &backend_port.to_string())],
    )?;
    wait_listening(backend_port, &mut backend, "mcp-server-everything").await?;
    let backend_url = format!("http://127.0.0.1:{backend_port}/mcp");

    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let (mut proxy, url, tool) = match route {
        Route::Direct => (None, backend_url.clone(), "echo".to_owned()),
        Route::McpProxyMinimal | Route::McpProxyLoaded => {
            let config = mcp_proxy_config(route == Route::McpProxyLoaded, port, &backend_url);
            let file = scratch.join(format!("mcp-proxy-{port}.toml"));
            std::fs::write(&file, config)?;
            let me = std::env::current_exe()?;
            let file = file.to_str().context("a UTF-8 temp path")?;
            let child = spawn(&me, &["serve-mcp-proxy", file], &[])?;
            (
                Some(child),
                format!("http://{listen}/"),
                format!("{BACKEND_NAME}/echo"),
            )
        }
        Route::ToolwardenOff | Route::ToolwardenFull | Route::ToolwardenPinned => {
            let mut args = vec!["run", "--listen", &listen, "--upstream-url", &backend_url];
            let file = scratch.join("toolwarden-off.toml");
            let file_arg;
            if route == Route::ToolwardenOff {
                std::fs::write(&file, TOOLWARDEN_OFF)?;
                file_arg = file.to_str().context("a UTF-8 temp path")?.to_owned();
                args.extend(["--config", &file_arg]);
            }
            let mut env = vec![
                ("RUST_LOG", "error"),
                ("TOOLWARDEN_RATE_LIMIT_ENABLED", "false"),
            ];
            if route == Route::ToolwardenPinned {
                env.push((
                    "TOOLWARDEN_UPSTREAM_PROTOCOL_VERSION",
                    PINNED_PROTOCOL_VERSION,
                ));
            }
            let child = spawn(&options.toolwarden, &args, &env)?;
            (
                Some(child),
                format!("http://{listen}/mcp"),
                "echo".to_owned(),
            )
        }
    };
    if let Some(child) = proxy.as_mut() {
        wait_listening(port, child, route.name()).await?;
    }
    let mut result = Ok(());
    for &kind in kinds {
        let k = CLIENT_KINDS.iter().position(|c| *c == kind).unwrap_or(0);
        let r = ROUTES.iter().position(|x| *x == route).unwrap_or(0);
        let pid = proxy.as_ref().and_then(tokio::process::Child::id);
        result = measure(kind, &url, &tool, options, pid, &mut samples[k][r])
            .await
            .with_context(|| format!("path {}, {}", route.name(), kind.name()));
        if result.is_err() {
            break;
        }
    }
    if let Some(mut child) = proxy {
        let _ = child.kill().await;
    }
    let _ = backend.kill().await;
    result
}

#[derive(Clone, Copy)]
struct Figures {
    p50: Duration,
    p99: Duration,
    per_second: f64,
    /// TCP connections opened per call.
    opens: f64,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn figures(latencies: &[Duration], wall: Duration, opens: u64) -> Figures {
    let mut sorted = latencies.to_vec();
    sorted.sort();
    Figures {
        p50: percentile(&sorted, 50.0),
        p99: percentile(&sorted, 99.0),
        per_second: sorted.len() as f64 / wall.as_secs_f64().max(1e-9),
        opens: opens as f64 / sorted.len().max(1) as f64,
    }
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

fn added(a: Duration, b: Duration) -> f64 {
    (a.as_secs_f64() - b.as_secs_f64()) * 1e6
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

async fn run(options: &Options) -> Result<()> {
    let scratch = std::env::temp_dir().join(format!("toolwarden-peers-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let load_before = load_average();
    let started = Instant::now();
    let mut samples: Vec<Vec<Samples>> = CLIENT_KINDS
        .iter()
        .map(|_| ROUTES.iter().map(|_| Samples::default()).collect())
        .collect();
    let mut result = Ok(());
    'rounds: for round in 0..options.rounds {
        let forwards = round % 2 == 0;
        let mut order: Vec<Route> = ROUTES.to_vec();
        let mut kinds: Vec<ClientKind> = options.clients_kinds.clone();
        if !forwards {
            order.reverse();
            kinds.reverse();
        }
        for route in order {
            eprintln!("round {}: {}", round + 1, route.name());
            if let Err(e) = run_route(route, &kinds, options, &scratch, &mut samples).await {
                result = Err(e);
                break 'rounds;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    result?;
    let elapsed = started.elapsed();
    let load_after = load_average();

    let n = options.clients;
    let client_pool = if options.keep_alive {
        "each client keeps its connections alive (a reqwest pool per client)"
    } else {
        "no idle connection kept (a new TCP connection per request)"
    };
    println!(
        "\necho on mcp-server-everything streamableHttp ({}); per path, client and round: {} warm-up calls, \
         {} sequential calls with 1 client, then {n} clients at once (a session each) × {} calls; \
         {} round(s), alternately forwards and backwards, pooled; {client_pool}; {:.0} s; \
         load average before: {load_before}, after: {load_after}",
        options.server.display(),
        options.warmup,
        options.calls,
        options.per_client,
        options.rounds,
        elapsed.as_secs_f64(),
    );
    for &kind in &options.clients_kinds {
        let k = CLIENT_KINDS.iter().position(|c| *c == kind).unwrap_or(0);
        print_tables(kind, &samples[k], n);
    }
    println!();
    println!(
        "TCP/call: TCP connections opened on the machine per measured call (the client's and the \
         proxy's upstream ones; /proc/net/snmp ActiveOpens)."
    );
    Ok(())
}

fn print_tables(kind: ClientKind, samples: &[Samples], n: usize) {
    let results: Vec<(Figures, Figures)> = samples
        .iter()
        .map(|s| {
            (
                figures(&s.sequential, s.sequential_wall, s.sequential_opens),
                figures(&s.clients, s.clients_wall, s.clients_opens),
            )
        })
        .collect();
    println!();
    println!("### {}", kind.name());
    println!();
    println!("| path              | 1× p50   | 1× p99   | 1× c/s  | 1× TCP/call | {n}× p50   | {n}× p99   | {n}× c/s  | {n}× TCP/call |");
    println!("|-------------------|---------:|---------:|--------:|------------:|---------:|---------:|--------:|------------:|");
    for (route, (seq, conc)) in ROUTES.iter().zip(&results) {
        println!(
            "| {:<17} | {:>8} | {:>8} | {:>7.0} | {:>11.2} | {:>8} | {:>8} | {:>7.0} | {:>11.2} |",
            route.name(),
            us(seq.p50),
            us(seq.p99),
            seq.per_second,
            seq.opens,
            us(conc.p50),
            us(conc.p99),
            conc.per_second,
            conc.opens,
        );
    }
    let direct = results[0];
    println!();
    println!(
        "Added over direct ({}; signed: a proxy can come out faster than direct):",
        kind.name()
    );
    println!();
    println!("| path              | 1× p50    | 1× p99    | {n}× p50    | {n}× p99    |");
    println!("|-------------------|----------:|----------:|----------:|----------:|");
    for (route, (seq, conc)) in ROUTES.iter().zip(&results).skip(1) {
        println!(
            "| {:<17} | {:>+6.0} µs | {:>+6.0} µs | {:>+6.0} µs | {:>+6.0} µs |",
            route.name(),
            added(seq.p50, direct.0.p50),
            added(seq.p99, direct.0.p99),
            added(conc.p50, direct.1.p50),
            added(conc.p99, direct.1.p99),
        );
    }
    println!();
    println!(
        "The proxy process's work per call, 1 client ({}; CPU from /proc/PID/stat in 10 ms \
         ticks, context switches summed over its threads):",
        kind.name()
    );
    println!();
    println!("| path              | CPU µs/call | context switches/call |");
    println!("|-------------------|------------:|----------------------:|");
    for (route, sample) in ROUTES.iter().zip(samples).skip(1) {
        let calls = sample.sequential.len().max(1) as f64;
        println!(
            "| {:<17} | {:>11.0} | {:>21.1} |",
            route.name(),
            sample.sequential_cpu.cpu.as_secs_f64() * 1e6 / calls,
            sample.sequential_cpu.switches as f64 / calls,
        );
    }
    let index = |r: Route| ROUTES.iter().position(|x| *x == r).unwrap_or(0);
    let tw = results[index(Route::ToolwardenFull)];
    let pinned = results[index(Route::ToolwardenPinned)];
    let mp = results[index(Route::McpProxyLoaded)];
    let compare = |t: f64, m: f64| {
        let ratio = if m > 0.0 {
            format!("{:.2}", t / m)
        } else {
            "n/a (mcp-proxy loaded added nothing)".to_owned()
        };
        format!(
            "{ratio} ({t:+.0} µs vs {m:+.0} µs, difference {:+.0} µs)",
            t - m
        )
    };
    println!();
    println!(
        "toolwarden full added / mcp-proxy loaded added, p50 ({}): 1 client {}; {n} clients {}",
        kind.name(),
        compare(added(tw.0.p50, direct.0.p50), added(mp.0.p50, direct.0.p50)),
        compare(added(tw.1.p50, direct.1.p50), added(mp.1.p50, direct.1.p50)),
    );
    println!(
        "toolwarden pinned added / mcp-proxy loaded added, p50 ({}): 1 client {}; {n} clients {}",
        kind.name(),
        compare(
            added(pinned.0.p50, direct.0.p50),
            added(mp.0.p50, direct.0.p50)
        ),
        compare(
            added(pinned.1.p50, direct.1.p50),
            added(mp.1.p50, direct.1.p50)
        ),
    );
}
