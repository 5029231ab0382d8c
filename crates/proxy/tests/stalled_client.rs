//! A client that stops reading (issue 16): over Streamable HTTP, once it
//! takes longer than `limits.client_stall_timeout` to take a notification,
//! its connections are dropped and its session closed, and the other
//! clients get every notification meanwhile. In process, in front of a
//! server that floods every client with logging notifications.

#![allow(clippy::unwrap_used, clippy::expect_used)]
// Logging is deprecated by the newest protocol; servers still send it.
#![allow(deprecated)]

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ErrorData,
    ListToolsResult, LoggingLevel, LoggingMessageNotificationParam, PaginatedRequestParams,
    ServerCapabilities, ServerConfig,
};
use rmcp::service::{NotificationContext, RequestContext, RoleClient, RoleServer};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{ClientHandler, ServerHandler, ServiceExt as _};
use serde_json::{json, Value};
use support::{bounded, eventually, LIMIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use toolwarden_core::Events;
use toolwarden_proxy::access::{AccessPolicy, AuthTokens};
use toolwarden_proxy::config::Config;
use toolwarden_proxy::endpoints::MetricsEndpoints;
use toolwarden_proxy::stack::SharedState;
use toolwarden_proxy::HttpOptions;
use toolwarden_proxy::{Proxy, UpstreamTarget};

/// How many logging notifications `shout` sends, and how big each is: far
/// more than a client that does not read can have buffered (the proxy's
/// queue, rmcp's channel, both sockets' buffers).
const SHOUTS: usize = 600;
const SHOUT_BYTES: usize = 16 * 1024;

/// One tool, `shout`: sends [`SHOUTS`] logging notifications, then answers.
/// It never gets more than [`AHEAD`] ahead of what the reading client has
/// heard (`heard`). Unpaced, on a loaded machine (CI, twice), the reading
/// client fell 256 notifications behind the burst, was taken for one that
/// does not read and disconnected, and its call never answered: a known
/// limit of the proxy (its README, "Known limits"). This test is about the
/// client that does not read at all, on machines of any speed.
#[derive(Clone)]
struct Shouter {
    heard: Arc<AtomicUsize>,
}

/// How far ahead of the reading client the shouter may get: well within
/// the proxy's queue of 256 notifications per client.
const AHEAD: usize = 64;

impl ServerHandler for Shouter {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_logging()
                .build(),
        )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(support::tool_list(&[(
            "shout",
            "floods every client with logging",
        )]))
    }

    async fn call_tool(
        &self,
        _request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let data = json!("x".repeat(SHOUT_BYTES));
        for sent in 0..SHOUTS {
            let caught_up = eventually(LIMIT, || async {
                (sent < self.heard.load(Ordering::SeqCst) + AHEAD).then_some(())
            });
            if caught_up.await.is_none() {
                break;
            }
            let message = LoggingMessageNotificationParam::new(LoggingLevel::Info, data.clone());
            if context.peer.notify_logging_message(message).await.is_err() {
                break;
            }
        }
        Ok(CallToolResult::success(vec![ContentBlock::text("done")]).into())
    }
}

/// A client counting the logging notifications it reads.
#[derive(Clone, Default)]
struct Listener {
    heard: Arc<AtomicUsize>,
}

impl ClientHandler for Listener {
    async fn on_logging_message(
        &self,
        _params: LoggingMessageNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        self.heard.fetch_add(1, Ordering::SeqCst);
    }
}

fn shouter(heard: &Arc<AtomicUsize>) -> UpstreamTarget {
    let heard = Arc::clone(heard);
    support::in_process_upstream("shouter", Arc::default(), move || Shouter {
        heard: Arc::clone(&heard),
    })
}

/// A raw POST of `body` under `session` (if any): status, head, body.
async fn post(port: u16, session: Option<&str>, body: &Value) -> (u16, String, String) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let session = session
        .map(|id| format!("Mcp-Session-Id: {id}\r\n"))
        .unwrap_or_default();
    let body = body.to_string();
    let request = format!(
        "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
         Accept: application/json, text/event-stream\r\n{session}Content-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    bounded("an HTTP answer", LIMIT, stream.read_to_end(&mut raw))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP head");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_disconnected_and_the_others_get_everything() {
    // Long enough that the reading client, on a loaded machine, never looks
    // stalled; the one that stops reading is dropped all the same.
    let config = Config::from_toml_str(
        "[limits]\nclient_stall_timeout = \"2s\"\n",
        std::iter::empty(),
    )
    .unwrap();
    let shared = SharedState::new(Events::new(), MetricsEndpoints::new());
    let heard = Arc::new(AtomicUsize::new(0));
    let proxy = Proxy::new(config, shouter(&heard), shared).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let access =
        AccessPolicy::new(&[], &[], listener.local_addr().ok(), AuthTokens::default()).unwrap();
    let options = HttpOptions::new(&proxy.config().http, 1 << 20, access);
    let shutdown = CancellationToken::new();
    let serving = tokio::spawn(toolwarden_proxy::serve_http_with(
        proxy.cores(),
        listener,
        options,
        shutdown.clone(),
    ));

    // The stuck client: a session, and its standalone GET stream on a
    // socket with a small receive buffer, never read.
    let initialize = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "stuck", "version": "0"}}});
    let (status, head, _) = post(port, None, &initialize).await;
    assert_eq!(status, 200, "{head}");
    let session = head
        .lines()
        .find_map(|l| l.strip_prefix("mcp-session-id:"))
        .map(|v| v.trim().to_owned())
        .expect("a session id");
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let (status, _, _) = post(port, Some(&session), &initialized).await;
    assert_eq!(status, 202);
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stuck = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
    let get = format!(
        "GET /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n\
         Mcp-Session-Id: {session}\r\n\r\n"
    );
    stuck.write_all(get.as_bytes()).await.unwrap();

    // The reading client calls `shout`: it gets every notification, and its
    // answer, while the other does not read.
    let listener = Listener { heard };
    let url = format!("http://127.0.0.1:{port}/mcp");
    let reading = bounded(
        "the reading client's session",
        LIMIT,
        listener
            .clone()
            .serve(StreamableHttpClientTransport::from_uri(url)),
    )
    .await
    .unwrap();
    let mut params = CallToolRequestParams::new("shout");
    params.arguments = Some(Default::default());
    let answer = bounded(
        "the reading client's call",
        LIMIT,
        reading.peer().call_tool_once(params),
    )
    .await
    .unwrap();
    assert!(
        matches!(answer, CallToolResponse::Complete(_)),
        "{answer:?}"
    );
    let heard_all = eventually(LIMIT, || async {
        (listener.heard.load(Ordering::SeqCst) == SHOUTS).then_some(())
    })
    .await;
    assert!(
        heard_all.is_some(),
        "the reading client heard {} of {SHOUTS}",
        listener.heard.load(Ordering::SeqCst)
    );

    // The stuck client's connection was dropped: reading it now ends
    // (what was buffered, then the end) instead of streaming forever...
    let mut drained = Vec::new();
    let ended = bounded(
        "the end of the stuck client's stream",
        LIMIT,
        stuck.read_to_end(&mut drained),
    )
    .await;
    // (a reset is an end too)
    let _ = ended;
    // ... and its session is gone.
    let closed = eventually(LIMIT, || async {
        let ping = json!({"jsonrpc": "2.0", "id": 9, "method": "ping"});
        let (status, _, _) = post(port, Some(&session), &ping).await;
        (status == 404).then_some(())
    })
    .await;
    assert!(closed.is_some(), "the stuck client's session still answers");

    bounded("closing the reading session", LIMIT, reading.cancel())
        .await
        .unwrap();
    shutdown.cancel();
    bounded("serve_http after shutdown", LIMIT, serving)
        .await
        .unwrap()
        .unwrap();
    proxy.shutdown().await;
}
