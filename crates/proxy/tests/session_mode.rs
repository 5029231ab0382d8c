//! `upstream.session_mode` (issue 16): `"per_session"` gives each
//! downstream HTTP session an upstream connection of its own, for servers
//! that keep state per connection; `"shared"` (the default) one for all.
//! In process, in front of a server that remembers what each connection
//! told it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ErrorData,
    ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig,
};
use rmcp::service::{RequestContext, RoleClient, RoleServer, RunningService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{ServerHandler, ServiceExt as _};
use serde_json::{json, Value};
use support::{bounded, eventually, LIMIT};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use toolwarden_core::Events;
use toolwarden_proxy::access::{AccessPolicy, AuthTokens};
use toolwarden_proxy::config::Config;
use toolwarden_proxy::endpoints::MetricsEndpoints;
use toolwarden_proxy::stack::SharedState;
use toolwarden_proxy::HttpOptions;
use toolwarden_proxy::{Proxy, UpstreamTarget};

/// A server that keeps state per connection: `remember {value}` appends to
/// this connection's list, `recall` answers it (comma-separated). `open`
/// counts the connections being served.
#[derive(Clone, Default)]
struct Notebook {
    notes: Arc<Mutex<Vec<String>>>,
}

impl ServerHandler for Notebook {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(support::tool_list(&[
            ("remember", "remembers a value"),
            ("recall", "what this connection remembered"),
        ]))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let mut notes = self.notes.lock().unwrap();
        let text = match request.name.as_ref() {
            "remember" => {
                let value = request
                    .arguments
                    .as_ref()
                    .and_then(|a| a.get("value"))
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                notes.push(value);
                "ok".to_owned()
            }
            _ => notes.join(","),
        };
        Ok(CallToolResult::success(vec![ContentBlock::text(text)]).into())
    }
}

/// A [`Notebook`] per connection, in process; `open` counts the
/// connections being served.
fn notebooks(open: Arc<AtomicUsize>) -> UpstreamTarget {
    support::in_process_upstream("notebook", open, Notebook::default)
}

/// The proxy with `config` (TOML) serving Streamable HTTP on a loopback
/// port in front of [`notebooks`].
struct Harness {
    port: u16,
    proxy: Arc<Proxy>,
    open: Arc<AtomicUsize>,
    serving: JoinHandle<std::io::Result<()>>,
    shutdown: CancellationToken,
}

impl Harness {
    async fn start(config: &str) -> Harness {
        let open = Arc::new(AtomicUsize::new(0));
        let config = Config::from_toml_str(config, std::iter::empty()).unwrap();
        let shared = SharedState::new(Events::new(), MetricsEndpoints::new());
        let proxy = Arc::new(Proxy::new(config, notebooks(Arc::clone(&open)), shared).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let shutdown = CancellationToken::new();
        let access =
            AccessPolicy::new(&[], &[], listener.local_addr().ok(), AuthTokens::default()).unwrap();
        let options = HttpOptions::new(&proxy.config().http, 1 << 20, access);
        let serving = tokio::spawn(toolwarden_proxy::serve_http_with(
            proxy.cores(),
            listener,
            options,
            shutdown.clone(),
        ));
        Harness {
            port,
            proxy,
            open,
            serving,
            shutdown,
        }
    }

    async fn session(&self) -> RunningService<RoleClient, ()> {
        let url = format!("http://127.0.0.1:{}/mcp", self.port);
        bounded(
            "an HTTP session",
            LIMIT,
            ().serve(StreamableHttpClientTransport::from_uri(url)),
        )
        .await
        .unwrap()
    }

    fn health(&self) -> Value {
        self.proxy.upstreams().health_json()
    }

    /// Waits until `n` upstream connections are served.
    async fn wait_open(&self, n: usize) {
        let reached = eventually(LIMIT, || async {
            (self.open.load(Ordering::SeqCst) == n).then_some(())
        })
        .await;
        assert!(
            reached.is_some(),
            "{} upstream connections open, expected {n}; health: {}",
            self.open.load(Ordering::SeqCst),
            self.health()
        );
    }

    async fn finish(mut self) {
        self.shutdown.cancel();
        bounded("serve_http after shutdown", LIMIT, &mut self.serving)
            .await
            .unwrap()
            .unwrap();
        bounded("the proxy's shutdown", LIMIT, self.proxy.shutdown()).await;
        self.wait_open(0).await;
    }
}

/// Calls `tool` with `arguments` through `client`: the result's text, or
/// the error's message.
async fn call(client: &RunningService<RoleClient, ()>, tool: &str, arguments: Value) -> String {
    let mut params = CallToolRequestParams::new(tool.to_owned());
    params.arguments = arguments.as_object().cloned();
    match bounded(tool, LIMIT, client.peer().call_tool_once(params)).await {
        Ok(CallToolResponse::Complete(result)) => result
            .content
            .iter()
            .filter_map(|c| c.as_text().map(|t| t.text.clone()))
            .collect::<Vec<_>>()
            .join(""),
        Ok(other) => panic!("{other:?}"),
        Err(e) => format!("error: {e}"),
    }
}

/// Two clients remember a value each: per session, each recalls only its
/// own, each has an upstream of its own, and one leaving closes only its
/// own. Shared (below), they see each other's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_session_each_client_has_an_upstream_of_its_own() {
    let h = Harness::start("[upstream]\nsession_mode = \"per_session\"\n").await;
    assert_eq!(h.health()["mode"], "per_session");
    assert_eq!(h.health()["sessions"], 0, "{}", h.health());
    let alice = h.session().await;
    let bob = h.session().await;
    h.wait_open(2).await;
    assert_eq!(call(&alice, "remember", json!({"value": "a"})).await, "ok");
    assert_eq!(call(&bob, "remember", json!({"value": "b"})).await, "ok");
    assert_eq!(call(&alice, "recall", json!({})).await, "a");
    assert_eq!(call(&bob, "recall", json!({})).await, "b");
    let health = h.health();
    assert_eq!(health["sessions"], 2, "{health}");
    assert_eq!(health["states"]["up"], 2, "{health}");
    assert_eq!(health["state"], "up", "{health}");

    // Alice leaves (DELETE of her session): her upstream closes, Bob's stays.
    bounded("closing Alice's session", LIMIT, alice.cancel())
        .await
        .unwrap();
    h.wait_open(1).await;
    assert_eq!(call(&bob, "recall", json!({})).await, "b");
    let closed = eventually(LIMIT, || async {
        (h.health()["sessions"] == 1).then_some(())
    })
    .await;
    assert!(closed.is_some(), "{}", h.health());

    // A new session starts from a blank page.
    let carol = h.session().await;
    h.wait_open(2).await;
    assert_eq!(call(&carol, "recall", json!({})).await, "");
    bounded("closing a session", LIMIT, carol.cancel())
        .await
        .unwrap();

    // The proxy's shutdown closes the rest (`finish` waits for 0).
    drop(bob);
    h.finish().await;
}

/// Each session's server answers from its own state, so one session's
/// answer must never serve another's call: the fallback cache (here in
/// fresh mode) served Alice's stored `recall` to Bob. Shared, one answer
/// serves both, as configured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_session_a_cached_answer_is_its_sessions_only() {
    let config = |mode: &str| {
        format!(
            "[upstream]\nsession_mode = \"{mode}\"\n[fallback_cache]\nfresh_ttl = \"60s\"\n\
             [tools.\"recall\"]\ncacheable = true\n"
        )
    };
    for (mode, bob_recalls) in [("per_session", "b"), ("shared", "a")] {
        let h = Harness::start(&config(mode)).await;
        let alice = h.session().await;
        let bob = h.session().await;
        assert_eq!(call(&alice, "remember", json!({"value": "a"})).await, "ok");
        assert_eq!(call(&alice, "recall", json!({})).await, "a");
        if mode == "per_session" {
            assert_eq!(call(&bob, "remember", json!({"value": "b"})).await, "ok");
        }
        assert_eq!(call(&bob, "recall", json!({})).await, bob_recalls, "{mode}");
        drop((alice, bob));
        h.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_every_client_shares_one_upstream() {
    let h = Harness::start("").await;
    assert_eq!(h.health()["mode"], "shared");
    let alice = h.session().await;
    let bob = h.session().await;
    h.wait_open(1).await;
    assert_eq!(call(&alice, "remember", json!({"value": "a"})).await, "ok");
    assert_eq!(call(&bob, "remember", json!({"value": "b"})).await, "ok");
    assert_eq!(call(&alice, "recall", json!({})).await, "a,b");
    bounded("closing Alice's session", LIMIT, alice.cancel())
        .await
        .unwrap();
    // The upstream is everyone's: it stays.
    assert_eq!(call(&bob, "recall", json!({})).await, "a,b");
    assert_eq!(h.open.load(Ordering::SeqCst), 1);
    drop(bob);
    h.finish().await;
}

/// The layers are one stack for every session: a quota is the server's,
/// not each connection's, and the loop guard still tells sessions apart
/// (each core numbers its session from one counter).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_session_sessions_share_the_stack_but_not_their_loop_history() {
    let h = Harness::start(
        r#"
        [upstream]
        session_mode = "per_session"
        [loop_guard]
        limits = { max_repeats = 2 }
        [tools."remember".rate_limit]
        per_tool = { rate = "1/h", burst = 2 }
        "#,
    )
    .await;
    let alice = h.session().await;
    let bob = h.session().await;
    // The quota of `remember` is shared: two calls, one each, then no more.
    assert_eq!(call(&alice, "remember", json!({"value": "1"})).await, "ok");
    assert_eq!(call(&bob, "remember", json!({"value": "2"})).await, "ok");
    let refused = call(&alice, "remember", json!({"value": "3"})).await;
    assert!(refused.contains("too many calls to remember"), "{refused}");

    // Alice loops on `recall`; Bob's first identical call is his own.
    let mut looped = None;
    for n in 0..5 {
        let answer = call(&alice, "recall", json!({})).await;
        if answer.to_lowercase().contains("loop") {
            looped = Some(n);
            break;
        }
        assert_eq!(answer, "1", "call {n}");
    }
    assert!(looped.is_some(), "Alice's repeats were never refused");
    assert_eq!(call(&bob, "recall", json!({})).await, "2");
    drop((alice, bob));
    h.finish().await;
}

/// A request rmcp serves without a session has no upstream of its own in
/// `per_session` mode: it gets `-32600` saying so, and no upstream is started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_session_refuses_requests_without_a_session() {
    let h = Harness::start("[upstream]\nsession_mode = \"per_session\"\n").await;
    let (body, headers) =
        support::sessionless_call("2026-07-28", 7, "recall", json!({}), json!({}));
    let (status, body) = support::http_post_with(h.port, "/mcp", &headers, &body.to_string())
        .await
        .expect("an HTTP answer");
    let message: Value = if body.trim_start().starts_with('{') {
        serde_json::from_str(&body).unwrap()
    } else {
        body.lines()
            .filter_map(|line| line.strip_prefix("data:"))
            .map(str::trim)
            .find(|data| !data.is_empty())
            .map(|data| serde_json::from_str(data).unwrap())
            .expect("a message")
    };
    assert_eq!(message["id"], 7, "{status} {message}");
    assert_eq!(message["error"]["code"], -32600, "{message}");
    let text = message["error"]["message"].as_str().unwrap_or_default();
    assert!(text.contains("per_session"), "{text}");
    assert_eq!(h.open.load(Ordering::SeqCst), 0);
    assert_eq!(h.health()["sessions"], 0, "{}", h.health());
    h.finish().await;
}

/// Sessions, and so upstream connections, are bounded by `http.max_sessions`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_session_upstreams_are_bounded_by_max_sessions() {
    let h =
        Harness::start("[upstream]\nsession_mode = \"per_session\"\n[http]\nmax_sessions = 2\n")
            .await;
    let _alice = h.session().await;
    let _bob = h.session().await;
    let url = format!("http://127.0.0.1:{}/mcp", h.port);
    let third = bounded(
        "a third session",
        LIMIT,
        ().serve(StreamableHttpClientTransport::from_uri(url)),
    )
    .await;
    assert!(third.is_err(), "a third session was opened");
    h.wait_open(2).await;
    h.finish().await;
}

/// A reload reaches every open session's own stack (and their upstreams
/// stay): a quota set on `recall` (one call a minute, shared by the
/// sessions as the layers' state is) applies to both sessions, and what
/// each remembered is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_session_a_reload_reaches_every_open_session() {
    let per_session = "[upstream]\nsession_mode = \"per_session\"\n";
    let h = Harness::start(per_session).await;
    let alice = h.session().await;
    let bob = h.session().await;
    h.wait_open(2).await;
    assert_eq!(call(&alice, "remember", json!({"value": "a"})).await, "ok");
    assert_eq!(call(&bob, "remember", json!({"value": "b"})).await, "ok");

    let limited = format!(
        "{per_session}[tools.\"recall\".rate_limit]\nper_tool = {{ rate = \"1/m\", burst = 1 }}\n"
    );
    let config = Config::from_toml_str(&limited, std::iter::empty()).unwrap();
    let report = h.proxy.reload(config).unwrap();
    assert_eq!(report.sessions, 2, "{report:?}");
    assert_eq!(call(&alice, "recall", json!({})).await, "a");
    for client in [&alice, &bob] {
        let refused = call(client, "recall", json!({})).await;
        assert!(refused.contains("too many calls to recall"), "{refused}");
    }
    // The same two upstream connections: nothing was reconnected.
    assert_eq!(h.open.load(Ordering::SeqCst), 2);
    drop((alice, bob));
    h.finish().await;
}
