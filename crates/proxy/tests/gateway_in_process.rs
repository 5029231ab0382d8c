//! The gateway in process (no external component): `open_upstreams =
//! "mark"`, resources routed by URI and by template, prompts by prefix, and
//! an upstream that stops answering refused at once by its own breaker.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ClientConfig, ContentBlock, ErrorData,
    GetPromptRequestParams, GetPromptResult, ListPromptsResult, ListResourceTemplatesResult,
    ListResourcesResult, ListToolsResult, PaginatedRequestParams, Prompt, PromptMessage,
    ReadResourceRequestParams, ReadResourceResponse, ReadResourceResult, Resource,
    ResourceContents, ResourceTemplate, ServerCapabilities, ServerConfig,
};
use rmcp::service::{RequestContext, RoleClient, RoleServer, RunningService};
use rmcp::{ClientHandler, ServerHandler, ServiceExt as _};
use support::{bounded, eventually, LIMIT};
use tokio_util::sync::CancellationToken;
use toolwarden_core::Events;
use toolwarden_proxy::config::{Config, OpenUpstreams, UpstreamEntry};
use toolwarden_proxy::endpoints::MetricsEndpoints;
use toolwarden_proxy::gateway::UNAVAILABLE_MARK;
use toolwarden_proxy::stack::SharedState;
use toolwarden_proxy::Proxy;

/// A server named `name`: one tool `lookup`, one prompt `greet`, one
/// resource `NAME://fixed` and the template `NAME://items/{id}`; its
/// calls hang while `down`.
#[derive(Clone)]
struct Server {
    name: &'static str,
    down: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
    /// With more than 0: that many resources `NAME://many/{i}` listed
    /// besides `NAME://fixed`, and `shared://same`, which both list.
    many: Arc<AtomicUsize>,
}

impl ServerHandler for Server {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_prompts()
                .enable_resources()
                .build(),
        )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        if self.down.load(Ordering::SeqCst) {
            context.ct.cancelled().await;
        }
        // Twice: a server may list a tool twice; the gateway lists it once.
        Ok(support::tool_list(&[
            ("lookup", "looks things up"),
            ("lookup", "looks things up"),
        ]))
    }

    async fn call_tool(
        &self,
        _request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            context.ct.cancelled().await;
        }
        Ok(CallToolResult::success(vec![ContentBlock::text(self.name)]).into())
    }

    async fn list_prompts(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListPromptsResult, ErrorData> {
        Ok(ListPromptsResult::with_all_items(vec![Prompt::new(
            "greet",
            Some("a greeting"),
            None,
        )]))
    }

    async fn get_prompt(
        &self,
        request: GetPromptRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::GetPromptResponse, ErrorData> {
        assert_eq!(request.name, "greet", "the prefix is taken off");
        Ok(rmcp::model::GetPromptResponse::Complete(
            GetPromptResult::new(vec![PromptMessage::new_text(
                rmcp::model::Role::User,
                format!("hello from {}", self.name),
            )]),
        ))
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        let mut resources = vec![Resource::new(format!("{}://fixed", self.name), "fixed")];
        let many = self.many.load(Ordering::SeqCst);
        if many > 0 {
            resources.extend(
                (0..many).map(|i| Resource::new(format!("{}://many/{i}", self.name), "many")),
            );
            resources.push(Resource::new("shared://same", "same"));
        }
        Ok(ListResourcesResult::with_all_items(resources))
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, ErrorData> {
        Ok(ListResourceTemplatesResult::with_all_items(vec![
            ResourceTemplate::new(format!("{}://items/{{id}}", self.name), "item"),
        ]))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        Ok(ReadResourceResponse::Complete(ReadResourceResult::new(
            vec![ResourceContents::text(
                format!("{} read {}", self.name, request.uri),
                request.uri,
            )],
        )))
    }
}

#[derive(Clone, Default)]
struct Client;

impl ClientHandler for Client {
    fn get_info(&self) -> ClientConfig {
        ClientConfig::new(
            Default::default(),
            rmcp::model::Implementation::new("gateway-test", "0"),
        )
    }
}

struct Fixture {
    client: RunningService<RoleClient, Client>,
    alpha: Server,
    beta: Server,
    proxy: Proxy,
    _shutdown: CancellationToken,
}

async fn fixture(mark: bool) -> Fixture {
    fixture_with(mark, None).await
}

async fn fixture_with(mark: bool, beta_quota: Option<&str>) -> Fixture {
    let server = |name| Server {
        name,
        down: Arc::default(),
        calls: Arc::default(),
        many: Arc::default(),
    };
    let (alpha, beta) = (server("alpha"), server("beta"));
    let mut config = Config::default();
    if mark {
        config.gateway.open_upstreams = OpenUpstreams::Mark;
    }
    let mut entry = UpstreamEntry::default();
    entry.connection.attempt_timeout = std::time::Duration::from_millis(200);
    entry.circuit_breaker.failure_threshold = Some(Some(1));
    config.upstreams.insert("alpha".to_owned(), entry);
    let mut beta_entry = UpstreamEntry::default();
    if let Some(quota) = beta_quota {
        beta_entry.rate_limit = Some(toml::from_str(quota).unwrap());
    }
    config.upstreams.insert("beta".to_owned(), beta_entry);
    let targets = BTreeMap::from([
        (
            "alpha".to_owned(),
            support::in_process_upstream("alpha", Arc::default(), {
                let alpha = alpha.clone();
                move || alpha.clone()
            }),
        ),
        (
            "beta".to_owned(),
            support::in_process_upstream("beta", Arc::default(), {
                let beta = beta.clone();
                move || beta.clone()
            }),
        ),
    ]);
    let shared = SharedState::new(Events::new(), MetricsEndpoints::new());
    let proxy = Proxy::gateway_with(config, shared, targets).unwrap();
    let (client_io, proxy_io) = tokio::io::duplex(1 << 20);
    let (read, write) = tokio::io::split(proxy_io);
    let shutdown = CancellationToken::new();
    tokio::spawn(toolwarden_proxy::serve_stdio(
        proxy.core(),
        read,
        write,
        toolwarden_proxy::DEFAULT_MAX_LINE_BYTES,
        shutdown.clone(),
    ));
    let client = bounded("the client's initialize", LIMIT, Client.serve(client_io))
        .await
        .unwrap();
    Fixture {
        client,
        alpha,
        beta,
        proxy,
        _shutdown: shutdown,
    }
}

async fn call(client: &RunningService<RoleClient, Client>, tool: &str) -> CallToolResult {
    let result = client
        .peer()
        .call_tool_once(CallToolRequestParams::new(tool.to_owned()))
        .await
        .unwrap();
    match result {
        CallToolResponse::Complete(result) => result,
        other => panic!("not a complete result: {other:?}"),
    }
}

fn text(result: &CallToolResult) -> String {
    result
        .content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_and_resources_go_to_their_upstream() {
    let f = fixture(false).await;
    let peer = f.client.peer();
    let prompts: Vec<String> = peer
        .list_all_prompts()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(prompts, ["alpha__greet", "beta__greet"]);
    let greeting = peer
        .get_prompt(GetPromptRequestParams::new("beta__greet"))
        .await
        .unwrap();
    assert!(
        format!("{greeting:?}").contains("hello from beta"),
        "{greeting:?}"
    );
    let unknown = peer
        .get_prompt(GetPromptRequestParams::new("gamma__greet"))
        .await;
    assert!(unknown.is_err(), "{unknown:?}");
    // A prefix alone names no prompt: it reached beta with an empty name
    // (a server may answer that with a default prompt).
    let bare = peer.get_prompt(GetPromptRequestParams::new("beta__")).await;
    assert!(
        format!("{bare:?}").contains("unknown prompt: beta__"),
        "{bare:?}"
    );

    let resources = peer.list_all_resources().await.unwrap();
    let names: Vec<&str> = resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["alpha__fixed", "beta__fixed"]);
    let templates = peer.list_all_resource_templates().await.unwrap();
    assert_eq!(templates.len(), 2);
    // A listed URI, and one matching a template, each to its own server.
    for (uri, server) in [("beta://fixed", "beta"), ("alpha://items/7", "alpha")] {
        let read = peer
            .read_resource(ReadResourceRequestParams::new(uri))
            .await
            .unwrap();
        let shown = format!("{read:?}");
        assert!(shown.contains(&format!("{server} read {uri}")), "{shown}");
    }
    let nowhere = peer
        .read_resource(ReadResourceRequestParams::new("gamma://x"))
        .await;
    assert!(nowhere.is_err(), "{nowhere:?}");
}

/// Regression (found by running the binary): the URIs remembered for
/// routing reads were all forgotten whenever 4 096 were reached, in the
/// middle of merging a list, so most of a list just read could not be
/// read (`-32602 unknown resource`), and listing again did not help. Each
/// upstream's routes are now its last list's; a URI both list is read
/// from the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listed_resource_can_be_read_however_many_are_listed() {
    let f = fixture(false).await;
    f.alpha.many.store(2_500, Ordering::SeqCst);
    f.beta.many.store(2_500, Ordering::SeqCst);
    let peer = f.client.peer();
    let resources = bounded("resources/list", LIMIT, peer.list_all_resources())
        .await
        .unwrap();
    assert_eq!(resources.len(), 2 * (1 + 2_500 + 1));
    for uri in [
        "alpha://many/0",
        "alpha://many/2499",
        "beta://many/0",
        "beta://many/1200",
        "beta://many/2499",
        "alpha://fixed",
        "beta://fixed",
    ] {
        let server = uri.split(':').next().unwrap();
        let read = peer
            .read_resource(ReadResourceRequestParams::new(uri))
            .await
            .unwrap_or_else(|e| panic!("{uri}: {e}"));
        let shown = format!("{read:?}");
        assert!(shown.contains(&format!("{server} read {uri}")), "{shown}");
    }
    // Listed by both: read from the first upstream of the configuration.
    let read = peer
        .read_resource(ReadResourceRequestParams::new("shared://same"))
        .await
        .unwrap();
    assert!(format!("{read:?}").contains("alpha read"), "{read:?}");
    // A URI an upstream no longer lists is forgotten; its others stay.
    f.beta.many.store(10, Ordering::SeqCst);
    peer.list_all_resources().await.unwrap();
    let gone = peer
        .read_resource(ReadResourceRequestParams::new("beta://many/2499"))
        .await;
    assert!(gone.is_err(), "{gone:?}");
    for uri in ["beta://many/9", "alpha://many/2499"] {
        assert!(
            peer.read_resource(ReadResourceRequestParams::new(uri))
                .await
                .is_ok(),
            "{uri}"
        );
    }
}

/// Each upstream's server lists `lookup` twice: the gateway's list has each
/// exposed name once (a client's list is keyed by name).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_a_server_lists_twice_is_listed_once() {
    let f = fixture(false).await;
    let tools = bounded("tools/list", LIMIT, f.client.peer().list_all_tools())
        .await
        .unwrap();
    let mut names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    names.sort_unstable();
    assert_eq!(names, ["alpha__lookup", "beta__lookup"], "{tools:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_upstream_is_refused_by_its_breaker_and_marked_in_the_list() {
    let f = fixture(true).await;
    let peer = f.client.peer();
    assert_eq!(text(&call(&f.client, "alpha__lookup").await), "alpha");
    f.alpha.down.store(true, Ordering::SeqCst);
    let timed_out = call(&f.client, "alpha__lookup").await;
    assert_eq!(timed_out.is_error, Some(true), "{timed_out:?}");
    let reached = f.alpha.calls.load(Ordering::SeqCst);
    // Open now (one failure): refused at once, without reaching the server.
    let refused = call(&f.client, "alpha__lookup").await;
    assert_eq!(refused.is_error, Some(true), "{refused:?}");
    assert!(text(&refused).contains("retry after"), "{refused:?}");
    assert_eq!(f.alpha.calls.load(Ordering::SeqCst), reached);
    // Marked, not hidden; the other upstream's tool is as it was.
    let marked = eventually(LIMIT, || async {
        let tools = peer.list_all_tools().await.ok()?;
        let alpha = tools.iter().find(|t| t.name == "alpha__lookup")?;
        alpha
            .description
            .as_deref()
            .is_some_and(|d| d.starts_with(UNAVAILABLE_MARK))
            .then_some(tools)
    })
    .await
    .expect("alpha's tool marked unavailable");
    let beta = marked.iter().find(|t| t.name == "beta__lookup").unwrap();
    assert!(!beta
        .description
        .as_deref()
        .unwrap()
        .starts_with(UNAVAILABLE_MARK));
    assert_eq!(text(&call(&f.client, "beta__lookup").await), "beta");
    assert!(f.beta.calls.load(Ordering::SeqCst) >= 1);
}

/// The merged lists ask each upstream through its own quota, breaker and
/// `attempt_timeout`, as every request to it: they were sent past them, so
/// a hung upstream held every `tools/list` for `limits.request_timeout`
/// (60 s) and its breaker never heard of it, and lists spent none of its
/// quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lists_go_through_each_upstreams_quota_breaker_and_timeout() {
    let f = fixture_with(false, Some("rate = \"1/min\"\nburst = 1")).await;
    let peer = f.client.peer();
    f.alpha.down.store(true, Ordering::SeqCst);
    // Bounded by alpha's attempt timeout (200 ms), not the request timeout.
    let tools = bounded("a list while alpha hangs", LIMIT, peer.list_all_tools())
        .await
        .unwrap();
    let names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    assert_eq!(names, ["beta__lookup"], "alpha left out: {tools:?}");
    // Its breaker (one failure opens it) heard of the list's timeout: a
    // call is refused at once, without reaching the server.
    let refused = call(&f.client, "alpha__lookup").await;
    assert!(text(&refused).contains("retry after"), "{refused:?}");
    assert_eq!(f.alpha.calls.load(Ordering::SeqCst), 0);
    // The list spent beta's one token: its call is refused.
    let limited = call(&f.client, "beta__lookup").await;
    assert!(
        text(&limited).contains("too many calls to upstream:beta"),
        "{limited:?}"
    );
    assert_eq!(f.beta.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstreams_quota_covers_all_its_requests_and_only_its_own() {
    let f = fixture_with(false, Some("rate = \"1/min\"\nburst = 2")).await;
    assert_eq!(text(&call(&f.client, "beta__lookup").await), "beta");
    // A prompt counts against the same quota as the tool.
    let prompt = f
        .client
        .peer()
        .get_prompt(GetPromptRequestParams::new("beta__greet"))
        .await;
    assert!(prompt.is_ok(), "{prompt:?}");
    let refused = call(&f.client, "beta__lookup").await;
    assert_eq!(refused.is_error, Some(true), "{refused:?}");
    assert!(
        text(&refused).contains("too many calls to upstream:beta"),
        "{refused:?}"
    );
    assert_eq!(
        f.beta.calls.load(Ordering::SeqCst),
        1,
        "the refused call never reached the server"
    );
    // The other upstream has no quota of its own.
    for _ in 0..3 {
        assert_eq!(text(&call(&f.client, "alpha__lookup").await), "alpha");
    }
    // The upstream quota's refusal is counted with the stack's statistics
    // (/stats, /metrics, `top`), though the quota is outside the stack.
    let stats = f.proxy.tool_stack_layer().standard().stats().snapshot();
    assert_eq!(stats.events["rate_limited"], 1, "{:?}", stats.events);
}
