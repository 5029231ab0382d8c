//! The demo's gateway scene: two in-process upstreams behind one proxy
//! (`[upstreams.weather]`, `[upstreams.backup]`). The weather server stops
//! answering; its breaker opens after two timeouts, its tools disappear from
//! `tools/list` (the agent is told with `notifications/tools/list_changed`),
//! and a call to one of them is answered at once with the backup's tool as
//! the alternative.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ClientConfig, ContentBlock, ErrorData,
    JsonObject, ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::{NotificationContext, RequestContext, RoleClient, RoleServer};
use rmcp::{ClientHandler, ServerHandler, ServiceExt as _};
use serde_json::json;
use tokio::time::Instant;
use toolwarden_core::Events;

use super::{stamp, summary};
use toolwarden::circuit_breaker::CircuitBreakerSettings;

use crate::config::{Config, UpstreamEntry};
use crate::endpoints::MetricsEndpoints;
use crate::stack::SharedState;
use crate::upstream::UpstreamTarget;
use crate::Proxy;

/// How long the weather server's calls may take before its upstream
/// counts a timeout.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(300);

/// One of the scene's servers: its tools answer at once, or hang while it
/// is down. Clones share their switch and counter.
#[derive(Clone)]
struct SceneServer {
    name: &'static str,
    tools: &'static [(&'static str, &'static str, &'static str)],
    down: Arc<AtomicBool>,
    calls: Arc<AtomicU64>,
}

impl SceneServer {
    fn new(
        name: &'static str,
        tools: &'static [(&'static str, &'static str, &'static str)],
    ) -> Self {
        SceneServer {
            name,
            tools,
            down: Arc::default(),
            calls: Arc::default(),
        }
    }

    fn target(&self) -> UpstreamTarget {
        super::wiring::in_process(self.name, self.clone())
    }
}

impl ServerHandler for SceneServer {
    fn get_info(&self) -> ServerConfig {
        let mut info = ServerConfig::new(ServerCapabilities::builder().enable_tools().build());
        info.server_info = rmcp::model::Implementation::new(self.name, env!("CARGO_PKG_VERSION"));
        info
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let tools = self
            .tools
            .iter()
            .map(|(name, description, parameter)| {
                let schema =
                    json!({"type": "object", "properties": {*parameter: {"type": "string"}}});
                let schema: Arc<JsonObject> =
                    Arc::new(schema.as_object().cloned().unwrap_or_default());
                Tool::new(*name, *description, schema)
            })
            .collect();
        Ok(ListToolsResult::with_all_items(tools))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if self.down.load(Ordering::Relaxed) {
            // Hangs until the proxy gives up (the upstream's attempt
            // timeout) and cancels the call.
            context.ct.cancelled().await;
            return Err(ErrorData::internal_error("cancelled", None));
        }
        let city = request
            .arguments
            .as_ref()
            .and_then(|a| a.get("city"))
            .and_then(|c| c.as_str())
            .unwrap_or("nowhere");
        Ok(CallToolResponse::Complete(CallToolResult::success(vec![
            ContentBlock::text(format!("{}: sunny in {city}, 21 °C", self.name)),
        ])))
    }
}

/// The scene's agent: counts `notifications/tools/list_changed`.
#[derive(Clone, Default)]
struct Agent {
    list_changes: Arc<AtomicU64>,
}

impl ClientHandler for Agent {
    async fn on_tool_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.list_changes.fetch_add(1, Ordering::Relaxed);
    }

    fn get_info(&self) -> ClientConfig {
        ClientConfig::new(
            Default::default(),
            rmcp::model::Implementation::new("toolwarden-demo-agent", env!("CARGO_PKG_VERSION")),
        )
    }
}

/// The scene's configuration: the two upstreams (their servers are given
/// to the gateway in process), the weather one with a short attempt
/// timeout and a breaker that opens after two failures.
#[must_use]
pub(super) fn gateway_config() -> Config {
    let mut config = Config::default();
    let mut weather = UpstreamEntry::default();
    weather.connection.attempt_timeout = ATTEMPT_TIMEOUT;
    weather.circuit_breaker = CircuitBreakerSettings {
        failure_threshold: Some(Some(2)),
        reset_timeout: Some(Duration::from_secs(30)),
        ..CircuitBreakerSettings::default()
    };
    config.upstreams.insert("weather".to_owned(), weather);
    config
        .upstreams
        .insert("backup".to_owned(), UpstreamEntry::default());
    config
}

/// What the scene saw, for its summary line and the tests.
#[derive(Debug, Default)]
pub(super) struct SceneReport {
    /// The tools listed before and after the outage.
    pub before: Vec<String>,
    /// The tools listed once the weather upstream's breaker opened.
    pub after: Vec<String>,
    /// `notifications/tools/list_changed` the agent received.
    pub list_changes: u64,
    /// The answer to the call made while the weather upstream was open.
    pub refused_answer: String,
    /// Calls that reached the weather server while its breaker was open.
    pub reached_while_open: u64,
}

async fn list(client: &rmcp::service::RunningService<RoleClient, Agent>) -> Vec<String> {
    match toolwarden_rmcp::list_tools(client.peer()).await {
        Ok(tools) => tools
            .items
            .into_iter()
            .map(|t| t.name.into_owned())
            .collect(),
        Err(e) => vec![format!("(tools/list failed: {e})")],
    }
}

async fn call(
    client: &rmcp::service::RunningService<RoleClient, Agent>,
    started: Instant,
    tool: &str,
) -> String {
    let mut params = CallToolRequestParams::new(tool.to_owned());
    params.arguments = json!({"city": "Lisbon"}).as_object().cloned();
    let result = client.peer().call_tool_once(params).await;
    println!(
        "{} gateway   {tool:<40} → {}",
        stamp(started),
        summary(&result)
    );
    match result {
        Ok(CallToolResponse::Complete(result)) => result
            .content
            .iter()
            .filter_map(|c| c.as_text().map(|t| t.text.clone()))
            .collect::<Vec<_>>()
            .join(" "),
        other => summary(&other),
    }
}

/// Runs the scene, printing as it goes.
pub(super) async fn run(started: Instant) -> Result<SceneReport, String> {
    println!(
        "{} ── gateway: two upstreams behind one proxy; the weather server stops answering",
        stamp(started)
    );
    let weather = SceneServer::new(
        "weather",
        &[
            ("get_forecast", "Weather forecast for a city.", "city"),
            (
                "get_alerts",
                "Severe weather alerts for a region.",
                "region",
            ),
        ],
    );
    let backup = SceneServer::new(
        "backup",
        &[
            (
                "city_forecast",
                "Forecast for a city, from the backup provider.",
                "city",
            ),
            ("geocode", "Coordinates of a place name.", "place"),
        ],
    );
    let targets = BTreeMap::from([
        ("weather".to_owned(), weather.target()),
        ("backup".to_owned(), backup.target()),
    ]);
    let shared = SharedState::new(Events::new(), MetricsEndpoints::new());
    let proxy =
        Proxy::gateway_with(gateway_config(), shared, targets).map_err(|e| e.to_string())?;

    let (agent_side, shutdown, serving) = super::wiring::serve_over_pipe(&proxy);
    let agent = Agent::default();
    let client = agent
        .clone()
        .serve(agent_side)
        .await
        .map_err(|e| format!("the agent could not connect: {e}"))?;

    let mut report = SceneReport {
        before: list(&client).await,
        ..SceneReport::default()
    };
    println!(
        "{}           tools/list → {}",
        stamp(started),
        report.before.join(", ")
    );
    call(&client, started, "weather__get_forecast").await;

    weather.down.store(true, Ordering::Relaxed);
    println!("{} ── the weather server hangs from now on", stamp(started));
    for _ in 0..2 {
        call(&client, started, "weather__get_forecast").await;
    }
    // The clients are told within the gateway's watch interval.
    let told = tokio::time::timeout(Duration::from_secs(5), async {
        while agent.list_changes.load(Ordering::Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    if told.is_err() {
        println!(
            "{}           (no tools/list_changed arrived)",
            stamp(started)
        );
    }
    report.after = list(&client).await;
    println!(
        "{}           tools/list → {}",
        stamp(started),
        report.after.join(", ")
    );
    let reached = weather.calls.load(Ordering::Relaxed);
    report.refused_answer = call(&client, started, "weather__get_forecast").await;
    report.reached_while_open = weather.calls.load(Ordering::Relaxed) - reached;
    call(&client, started, "backup__city_forecast").await;
    report.list_changes = agent.list_changes.load(Ordering::Relaxed);

    let _ = client.cancel().await;
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), serving).await;
    proxy.shutdown().await;
    println!(
        "\ngateway: {} tools/list_changed sent, {} call(s) reached the weather server while its circuit was open",
        report.list_changes, report.reached_while_open
    );
    Ok(report)
}
