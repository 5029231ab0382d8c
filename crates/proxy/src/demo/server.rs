//! The demo's MCP server: four deliberately unreliable tools, served by rmcp
//! over an in-memory pipe.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ErrorCode, ErrorData,
    JsonObject, ListToolsResult, PaginatedRequestParams, ProgressNotificationParam,
    ServerCapabilities, ServerConfig, Tool, ToolAnnotations,
};
use rmcp::service::{RequestContext, RoleServer};
use rmcp::ServerHandler;
use serde_json::json;
use tokio::time::Instant;

/// How long `flaky_search`'s backend is down, from its third call.
pub(crate) const OUTAGE: Duration = Duration::from_millis(2500);
/// `quota_api`'s own quota: this many calls per second.
pub(crate) const QUOTA_PER_SECOND: usize = 2;
/// `slow_report`'s steps and the time each takes.
const REPORT_STEPS: u32 = 3;
const REPORT_STEP: Duration = Duration::from_millis(350);

#[derive(Default)]
struct State {
    /// Calls that reached the server, per tool.
    calls: BTreeMap<String, u64>,
    /// When `flaky_search`'s outage ends, once it began.
    outage_until: Option<Instant>,
    /// `quota_api` calls of the last second.
    recent_quota_calls: VecDeque<Instant>,
    quota_refusals: u64,
}

/// The flaky server. Clones share their counters.
#[derive(Clone, Default)]
pub(crate) struct FlakyServer {
    state: Arc<Mutex<State>>,
}

fn schema(property: &str, kind: &str) -> Arc<JsonObject> {
    let schema = json!({
        "type": "object",
        "properties": {property: {"type": kind}},
        "required": [property],
    });
    Arc::new(schema.as_object().cloned().unwrap_or_default())
}

fn text(result: String) -> CallToolResult {
    CallToolResult::success(vec![ContentBlock::text(result)])
}

fn failure(message: String) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(message)])
}

impl FlakyServer {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Calls that reached the server, per tool.
    pub(crate) fn calls(&self) -> BTreeMap<String, u64> {
        self.state().calls.clone()
    }

    fn search(&self, query: &str) -> CallToolResult {
        let mut state = self.state();
        let n = state.calls.get("flaky_search").copied().unwrap_or(0);
        let now = Instant::now();
        if n == 3 && state.outage_until.is_none() {
            state.outage_until = Some(now + OUTAGE);
        }
        match state.outage_until {
            Some(until) if now < until => failure(format!(
                "search backend temporarily unavailable (HTTP 503) while looking up {query:?}"
            )),
            _ => text(format!("results for {query:?}: 3 documents (call {n})")),
        }
    }

    fn quota(&self, item: &str) -> Result<CallToolResult, ErrorData> {
        let mut state = self.state();
        let now = Instant::now();
        while state
            .recent_quota_calls
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
        {
            state.recent_quota_calls.pop_front();
        }
        if state.recent_quota_calls.len() >= QUOTA_PER_SECOND {
            state.quota_refusals += 1;
            // Servers say it both ways; the classifier reads both.
            if state.quota_refusals % 2 == 1 {
                return Ok(failure("rate limit exceeded, retry after 1 s".to_owned()));
            }
            return Err(ErrorData::new(
                ErrorCode(-32023),
                "rate limited",
                Some(json!({"retryAfter": 1})),
            ));
        }
        state.recent_quota_calls.push_back(now);
        Ok(text(format!("quote for {item:?}: 42.00")))
    }

    async fn report(&self, topic: &str, context: &RequestContext<RoleServer>) -> CallToolResult {
        let token = context.meta.get_progress_token();
        for step in 1..=REPORT_STEPS {
            tokio::time::sleep(REPORT_STEP).await;
            if let Some(token) = &token {
                let params = ProgressNotificationParam::new(token.clone(), f64::from(step))
                    .with_total(f64::from(REPORT_STEPS))
                    .with_message(format!("section {step} of {REPORT_STEPS}"));
                let _ = context.peer.notify_progress(params).await;
            }
        }
        text(format!("report on {topic:?}: {REPORT_STEPS} sections"))
    }
}

fn argument<'a>(request: &'a CallToolRequestParams, name: &str) -> &'a str {
    request
        .arguments
        .as_ref()
        .and_then(|a| a.get(name))
        .and_then(|v| v.as_str())
        .unwrap_or("")
}

impl ServerHandler for FlakyServer {
    fn get_info(&self) -> ServerConfig {
        let mut info = ServerConfig::new(ServerCapabilities::builder().enable_tools().build());
        info.server_info =
            rmcp::model::Implementation::new("toolwarden-demo-flaky", env!("CARGO_PKG_VERSION"));
        info
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let read_only = ToolAnnotations::new()
            .read_only(true)
            .idempotent(true)
            .destructive(false)
            .open_world(false);
        let mut search = Tool::new(
            "flaky_search",
            "Searches the docs; its backend has an outage, then recovers.",
            schema("query", "string"),
        );
        search.annotations = Some(read_only.clone());
        let mut report = Tool::new(
            "slow_report",
            "Writes a report, slowly, reporting progress.",
            schema("topic", "string"),
        );
        report.annotations = Some(read_only.clone());
        let mut quota = Tool::new(
            "quota_api",
            "A priced API with a quota of 2 calls per second.",
            schema("item", "string"),
        );
        quota.annotations = Some(read_only);
        let mut delete = Tool::new(
            "delete_record",
            "Deletes a record. Destructive; its database connection keeps resetting.",
            schema("id", "string"),
        );
        delete.annotations = Some(
            ToolAnnotations::new()
                .destructive(true)
                .read_only(false)
                .idempotent(false),
        );
        Ok(ListToolsResult::with_all_items(vec![
            search, report, quota, delete,
        ]))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let name = request.name.to_string();
        *self.state().calls.entry(name.clone()).or_default() += 1;
        let result = match name.as_str() {
            "flaky_search" => self.search(argument(&request, "query")),
            "slow_report" => self.report(argument(&request, "topic"), &context).await,
            "quota_api" => self.quota(argument(&request, "item"))?,
            "delete_record" => failure(format!(
                "connection reset while deleting record {:?}",
                argument(&request, "id")
            )),
            other => {
                return Err(ErrorData::new(
                    ErrorCode(-32602),
                    format!("Unknown tool: {other}"),
                    None,
                ))
            }
        };
        Ok(result.into())
    }
}
