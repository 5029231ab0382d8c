//! The proxy in front of a raw JSON-RPC server that answers `tools/call`
//! with what a careless or hostile server sends: results of the wrong
//! shape, malformed errors, retry hints of 1e300 s, garbage lines, answers
//! to ids nobody asked, two answers to one call, no answer, a closed
//! connection, malformed notifications and requests of its own. Every call
//! gets exactly one answer, with its id, within the attempt timeout; the
//! session goes on; nothing malformed reaches the client. Runs in process
//! (the server on an in-memory pipe), through the standard stack with the
//! circuit breaker left out, so that every call reaches the server. The
//! same over Streamable HTTP against a raw HTTP server on a loopback port:
//! error statuses, bodies that are not JSON-RPC, SSE streams, bodies cut
//! off or too large, a rate limit, an expired session.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use toolwarden_core::{Events, ToolCatalog};
use toolwarden_proxy::config::{Config, UpstreamConfig};
use toolwarden_proxy::endpoints::MetricsEndpoints;
use toolwarden_proxy::stack::{build_stack, SharedState};
use toolwarden_proxy::upstream::Upstream;
use toolwarden_proxy::{Downstreams, InProcessServer, ProxyCore, UpstreamTarget};

/// How long a call waits for an upstream that never answers it.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(400);
/// The same over HTTP, where an answer takes several round trips (a
/// renewed session: `initialize`, then the call again) and one case moves
/// 17 MB: long enough that a loaded machine does not cut them.
const HTTP_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Far more than any answer here needs: past it, the test fails.
const BOUND: Duration = Duration::from_secs(20);

/// What the server does with one `tools/call`.
#[derive(Debug, Clone)]
enum Reply {
    /// Answers with this `result`.
    Result(Value),
    /// Answers with this `error`.
    Error(Value),
    /// Writes this line, and answers nothing.
    Line(&'static str),
    /// Answers the call twice.
    Twice(Value),
    /// Closes the connection.
    Close,
}

/// What the client should get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// A JSON-RPC error.
    RpcError,
    /// A tool result whose text contains this.
    Text(&'static str),
    /// A tool result whose text contains one of these.
    OneOf(&'static [&'static str]),
}

fn text(result: &Value) -> &str {
    result["content"][0]["text"].as_str().unwrap_or("")
}

fn script() -> Vec<(Reply, Expect)> {
    use Expect::{RpcError, Text};
    let ok = |s: &str| json!({"content": [{"type": "text", "text": s}]});
    vec![
        (Reply::Result(json!(42)), RpcError),
        (Reply::Result(json!(null)), RpcError),
        (Reply::Result(json!({"content": "not an array"})), RpcError),
        (
            Reply::Result(json!({"content": [{"type": "bogus"}]})),
            RpcError,
        ),
        (
            Reply::Result(json!({"content": [], "isError": "yes"})),
            RpcError,
        ),
        (
            Reply::Error(json!({"code": "x", "message": 3})),
            Text("timed out"),
        ),
        (
            Reply::Error(json!({"code": -32023, "message": "slow", "data": {"retryAfter": 1e300}})),
            Text("retry after 3600 s"),
        ),
        (Reply::Error(json!(null)), Text("timed out")),
        (Reply::Line("garbage {"), Text("timed out")),
        (
            Reply::Line(r#"{"jsonrpc":"2.0","id":999999,"result":{}}"#),
            Text("timed out"),
        ),
        (Reply::Twice(ok("twice")), Text("twice")),
        (Reply::Result(ok("after twice")), Text("after twice")),
        (
            Reply::Line(
                r#"{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":{"x":1},"progress":"a"}}"#,
            ),
            Text("timed out"),
        ),
        (
            Reply::Line(
                r#"{"jsonrpc":"2.0","method":"notifications/tasks","params":{"taskId":5}}"#,
            ),
            Text("timed out"),
        ),
        (
            Reply::Line(
                r#"{"jsonrpc":"2.0","id":"srv-1","method":"sampling/createMessage","params":{"bogus":true}}"#,
            ),
            Text("timed out"),
        ),
        (Reply::Close, Text("connection closed")),
        (Reply::Result(ok("after close")), Text("after close")),
    ]
}

/// An in-process server that reads one JSON-RPC message a line and writes
/// the lines `answer` gives for each (`None`: it closes the connection).
fn line_server(
    name: &str,
    answer: impl Fn(Value) -> Option<Vec<String>> + Clone + Send + Sync + 'static,
) -> UpstreamTarget {
    UpstreamTarget::InProcess(InProcessServer::new(name, move || {
        let (client, server) = tokio::io::duplex(1 << 16);
        let answer = answer.clone();
        tokio::spawn(async move {
            let (read, mut write) = tokio::io::split(server);
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let Some(out) = answer(serde_json::from_str(&line).unwrap()) else {
                    return;
                };
                for line in out {
                    if write
                        .write_all(format!("{line}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        });
        client
    }))
}

/// A [`line_server`] that answers `initialize`, every request but
/// `tools/call` with `{}`, and a `tools/call` with the lines `call` makes of
/// its id and progress token.
fn progress_server(
    call: impl Fn(&Value, &Value) -> Vec<String> + Clone + Send + Sync + 'static,
) -> UpstreamTarget {
    line_server("progress", move |message| {
        let (Some(id), Some(method)) = (message.get("id"), message["method"].as_str()) else {
            return Some(Vec::new());
        };
        Some(match method {
            "initialize" => vec![result_line(id, initialized("progress"))],
            "tools/call" => call(id, &message["params"]["_meta"]["progressToken"]),
            _ => vec![result_line(id, json!({}))],
        })
    })
}

/// `notifications/progress` under `token`, one line per value.
fn progress_lines(token: &Value, values: impl Iterator<Item = u64>) -> Vec<String> {
    values
        .map(|i| {
            json!({"jsonrpc": "2.0", "method": "notifications/progress",
                "params": {"progressToken": token, "progress": i}})
            .to_string()
        })
        .collect()
}

/// The answer to request `id`: `result`, as a line.
fn result_line(id: &Value, result: Value) -> String {
    json!({"jsonrpc": "2.0", "id": id, "result": result}).to_string()
}

/// What a server named `name` answers `initialize` with.
fn initialized(name: &str) -> Value {
    json!({
        "protocolVersion": "2025-06-18",
        "capabilities": {"tools": {}},
        "serverInfo": {"name": name, "version": "0"},
    })
}

/// The raw server: `initialize`, `tools/list` (one tool, `t`) and `ping`
/// answered well, each `tools/call` with the next reply of `replies`, and
/// what the server is sent besides requests recorded in `received`.
fn raw_server(
    replies: Arc<Mutex<VecDeque<Reply>>>,
    received: Arc<Mutex<Vec<Value>>>,
) -> UpstreamTarget {
    line_server("raw", move |message| {
        let method = message["method"].as_str().unwrap_or("").to_owned();
        let Some(id) = message.get("id").cloned().filter(|_| !method.is_empty()) else {
            received.lock().unwrap().push(message);
            return Some(Vec::new());
        };
        let answer = |result: Value| result_line(&id, result);
        Some(match method.as_str() {
            "initialize" => vec![answer(initialized("raw"))],
            "tools/list" => vec![answer(json!({"tools": [
                {"name": "t", "inputSchema": {"type": "object"}},
            ]}))],
            "tools/call" => match replies.lock().unwrap().pop_front() {
                Some(Reply::Result(result)) => vec![answer(result)],
                Some(Reply::Error(error)) => {
                    vec![json!({"jsonrpc": "2.0", "id": id, "error": error}).to_string()]
                }
                Some(Reply::Line(line)) => vec![line.to_owned()],
                Some(Reply::Twice(result)) => vec![answer(result.clone()), answer(result)],
                Some(Reply::Close) => return None,
                None => vec![answer(json!({"content": []}))],
            },
            _ => vec![answer(json!({}))],
        })
    })
}

/// The proxy in front of `target` (the standard stack, the circuit
/// breaker off, attempts cut at `attempt_timeout`), served on an
/// in-memory stdio pipe to a client that has initialized; every message
/// the client was sent is kept in `seen`.
struct Proxied {
    upstream: Upstream,
    stdio: support::InMemoryStdio,
    seen: Vec<Value>,
}

impl Proxied {
    async fn start(target: UpstreamTarget, attempt_timeout: Duration) -> Self {
        let downstreams = Downstreams::new();
        let upstream_config = UpstreamConfig {
            restart_backoff_min: Duration::from_millis(20),
            restart_backoff_max: Duration::from_millis(100),
            ..UpstreamConfig::default()
        };
        let upstream = Upstream::new(
            target,
            upstream_config,
            ToolCatalog::new(),
            downstreams.clone(),
        );
        let mut config = Config::default();
        config.upstream.attempt_timeout = attempt_timeout;
        config.circuit_breaker.enabled = Some(false);
        let shared = SharedState::new(Events::new(), MetricsEndpoints::new());
        let stack = build_stack(&config, upstream.service(), &shared).unwrap();
        let stdio =
            support::serve_stdio_in_memory(ProxyCore::new(upstream.clone(), stack, downstreams));
        let mut proxied = Proxied {
            upstream,
            stdio,
            seen: Vec::new(),
        };
        let init = proxied
            .exchange(
                json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
                "protocolVersion": "2025-06-18", "capabilities": {},
                "clientInfo": {"name": "t", "version": "0"}}}),
            )
            .await;
        assert!(init.get("result").is_some(), "{init}");
        proxied
    }

    /// Sends `message` and reads up to its answer (within [`BOUND`]).
    async fn exchange(&mut self, message: Value) -> Value {
        let id = message["id"].clone();
        self.stdio
            .input
            .write_all(format!("{message}\n").as_bytes())
            .await
            .unwrap();
        loop {
            let line = tokio::time::timeout(BOUND, self.stdio.output.next_line())
                .await
                .unwrap_or_else(|_| panic!("no answer to {message} within {BOUND:?}"))
                .unwrap()
                .expect("the proxy's output is open");
            let got: Value = serde_json::from_str(&line).unwrap();
            self.seen.push(got.clone());
            if got.get("method").is_none() && got["id"] == id {
                return got;
            }
        }
    }

    /// Calls tool `t` as request `id`, and checks its answer against
    /// `expect` (`what`: the server's doing, for the message).
    async fn call(&mut self, id: i64, what: &dyn std::fmt::Debug, expect: Expect) {
        let answer = self
            .exchange(json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                "params": {"name": "t", "arguments": {"call": id}}}))
            .await;
        match expect {
            Expect::RpcError => assert!(
                answer.get("error").is_some() && answer.get("result").is_none(),
                "{what:?}: {answer}"
            ),
            Expect::Text(part) => assert!(
                text(&answer["result"]).contains(part),
                "{what:?}: wanted {part:?} in {answer}"
            ),
            Expect::OneOf(parts) => assert!(
                parts
                    .iter()
                    .any(|part| text(&answer["result"]).contains(part)),
                "{what:?}: wanted one of {parts:?} in {answer}"
            ),
        }
    }

    /// A last `ping`, then: the client got exactly one answer for each of
    /// its `requests` requests (the pings and the initialize included) and
    /// nothing else, no notification or request of the server.
    async fn check_one_answer_each(&mut self, requests: usize) {
        let pong = self
            .exchange(json!({"jsonrpc": "2.0", "id": "last", "method": "ping"}))
            .await;
        assert_eq!(pong["result"], json!({}), "{pong}");
        let mut answers: HashMap<String, usize> = HashMap::new();
        for message in &self.seen {
            assert!(
                message.get("method").is_none(),
                "forwarded to the client: {message}"
            );
            *answers.entry(message["id"].to_string()).or_default() += 1;
        }
        assert_eq!(answers.len(), requests + 1, "{answers:?}");
        assert!(answers.values().all(|n| *n == 1), "{answers:?}");
    }

    async fn finish(self) {
        let Proxied {
            upstream, stdio, ..
        } = self;
        stdio.shutdown.cancel();
        drop(stdio.input);
        let _ = tokio::time::timeout(BOUND, stdio.serving).await;
        upstream.shutdown(BOUND).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_gets_one_answer_whatever_the_server_sends() {
    let script = script();
    let replies = Arc::new(Mutex::new(script.iter().map(|(r, _)| r.clone()).collect()));
    let received = Arc::new(Mutex::new(Vec::new()));
    let mut proxied =
        Proxied::start(raw_server(replies, Arc::clone(&received)), ATTEMPT_TIMEOUT).await;
    for (i, (reply, expect)) in script.iter().enumerate() {
        proxied.call(i as i64 + 1, reply, *expect).await;
    }
    // The initialize, the calls, the ping: the server's malformed
    // notifications and request reached no client.
    proxied.check_one_answer_each(script.len() + 1).await;
    // The server's malformed request was answered, to the server.
    let received = received.lock().unwrap().clone();
    let answer = received
        .iter()
        .find(|m| m["id"] == "srv-1")
        .unwrap_or_else(|| panic!("no answer to the server's request: {received:?}"));
    assert_eq!(answer["error"]["code"], -32602, "{answer}");
    proxied.finish().await;
}

/// `tools/list` requests a server was sent: in all, and the most at once.
#[derive(Debug, Default)]
struct Lists {
    total: usize,
    open: usize,
    most: usize,
}

/// A server that answers `tools/list` 20 ms late (counting those in flight)
/// and answers a `tools/call` after sending `notifications/tools/list_changed`
/// `flood` times.
fn flooding_server(flood: usize, lists: Arc<Mutex<Lists>>) -> UpstreamTarget {
    UpstreamTarget::InProcess(InProcessServer::new("flooding", move || {
        let (client, server) = tokio::io::duplex(1 << 20);
        let lists = Arc::clone(&lists);
        tokio::spawn(async move {
            let (read, mut write) = tokio::io::split(server);
            let (out, mut outgoing) = tokio::sync::mpsc::unbounded_channel::<String>();
            tokio::spawn(async move {
                while let Some(line) = outgoing.recv().await {
                    if write
                        .write_all(format!("{line}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let message: Value = serde_json::from_str(&line).unwrap();
                let (Some(id), Some(method)) =
                    (message.get("id").cloned(), message["method"].as_str())
                else {
                    continue;
                };
                let answer = move |result: Value| {
                    json!({"jsonrpc": "2.0", "id": id, "result": result}).to_string()
                };
                match method {
                    "initialize" => drop(out.send(answer(json!({
                        "protocolVersion": "2025-06-18",
                        "capabilities": {"tools": {"listChanged": true}},
                        "serverInfo": {"name": "flooding", "version": "0"},
                    })))),
                    "tools/list" => {
                        {
                            let mut lists = lists.lock().unwrap();
                            lists.total += 1;
                            lists.open += 1;
                            lists.most = lists.most.max(lists.open);
                        }
                        let (out, lists) = (out.clone(), Arc::clone(&lists));
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            lists.lock().unwrap().open -= 1;
                            let _ = out.send(answer(json!({"tools": [
                                {"name": "t", "inputSchema": {"type": "object"}},
                            ]})));
                        });
                    }
                    "tools/call" => {
                        let changed =
                            json!({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
                                .to_string();
                        for _ in 0..flood {
                            let _ = out.send(changed.clone());
                        }
                        let _ = out.send(answer(
                            json!({"content": [{"type": "text", "text": "flooded"}]}),
                        ));
                    }
                    _ => drop(out.send(answer(json!({})))),
                }
            }
        });
        client
    }))
}

/// A server that sends `notifications/tools/list_changed` by the hundred
/// gets one `tools/list` at a time, and a few in all, not one per
/// notification (each once spawned a refresh of its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_list_changed_costs_one_tools_list_at_a_time() {
    const FLOOD: usize = 500;
    let lists = Arc::new(Mutex::new(Lists::default()));
    let downstreams = Downstreams::new();
    let upstream = Upstream::new(
        flooding_server(FLOOD, Arc::clone(&lists)),
        UpstreamConfig::default(),
        ToolCatalog::new(),
        downstreams.clone(),
    );
    upstream.start(rmcp::model::ClientConfig::default());
    upstream.wait_connected(BOUND).await.unwrap();
    let service = upstream.service();
    let request = rmcp::model::ClientRequest::CallToolRequest(rmcp::model::CallToolRequest::new(
        rmcp::model::CallToolRequestParams::new("t"),
    ));
    let answer = tokio::time::timeout(BOUND, tower::ServiceExt::oneshot(service, request))
        .await
        .expect("the call is answered")
        .unwrap();
    assert!(format!("{answer:?}").contains("flooded"), "{answer:?}");
    // Every notification read, every refresh they started done: the count
    // stays still.
    let mut last = usize::MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let lists = lists.lock().unwrap();
        if lists.total == last && lists.open == 0 {
            break;
        }
        last = lists.total;
    }
    let (total, most) = {
        let lists = lists.lock().unwrap();
        (lists.total, lists.most)
    };
    assert_eq!(most, 1, "{total} tools/list, {most} at once");
    assert!(total <= 5, "{FLOOD} notifications cost {total} tools/list");
    upstream.shutdown(BOUND).await;
}

/// A server whose `tools/list` pages never end (one tool a page, the next
/// cursor always new), counting the pages it is asked for.
fn endless_pages_server(pages: Arc<Mutex<usize>>) -> UpstreamTarget {
    line_server("endless", move |message| {
        let (Some(id), Some(method)) = (message.get("id"), message["method"].as_str()) else {
            return Some(Vec::new());
        };
        let result = match method {
            "initialize" => initialized("endless"),
            "tools/list" => {
                *pages.lock().unwrap() += 1;
                let n: u64 = message["params"]["cursor"]
                    .as_str()
                    .map_or(0, |c| c.parse().unwrap());
                json!({
                    "tools": [{"name": format!("t{n}"), "inputSchema": {"type": "object"}}],
                    "nextCursor": (n + 1).to_string(),
                })
            }
            _ => json!({}),
        };
        Some(vec![result_line(id, result)])
    })
}

/// A server whose pages never end is read to the page bound and no
/// further: the catalog refresh ends (it once read pages, keeping every
/// tool, until its timeout) and the catalog holds what was read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_tools_list_pages_are_read_to_a_bound() {
    let pages = Arc::new(Mutex::new(0));
    let catalog = ToolCatalog::new();
    let upstream = Upstream::new(
        endless_pages_server(Arc::clone(&pages)),
        UpstreamConfig::default(),
        catalog.clone(),
        Downstreams::new(),
    );
    upstream.start(rmcp::model::ClientConfig::default());
    upstream.wait_connected(BOUND).await.unwrap();
    let deadline = tokio::time::Instant::now() + BOUND;
    while catalog.len() < toolwarden_rmcp::MAX_LIST_PAGES {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the refresh did not end: {} tools, {} pages",
            catalog.len(),
            pages.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(*pages.lock().unwrap(), toolwarden_rmcp::MAX_LIST_PAGES);
    assert_eq!(catalog.len(), toolwarden_rmcp::MAX_LIST_PAGES);
    upstream.shutdown(BOUND).await;
}

/// A server that sends progress far faster than it can be forwarded (20 000
/// notifications for one call, at once) gets its call answered, and the
/// client gets progress under its own token only. Past a backlog of 1 024
/// waiting, the newest are dropped (`toolwarden_proxy_progress_dropped_total`):
/// rmcp handles each notification in a task of its own, and without the
/// bound those tasks grew with the flood (229 MB at the peak for 50 000 in
/// a release build, 39 MB with it, measured by hand: no test measures
/// memory). Under such a flood the order is not kept either way: a
/// notification waits at most 1 s for its turn (the README, "Progress").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_progress_is_answered_within_a_bounded_backlog() {
    const N: u64 = 20_000;
    let target = progress_server(|id, token| {
        let mut out = progress_lines(token, 1..=N);
        out.push(result_line(
            id,
            json!({"content": [{"type": "text", "text": "done"}]}),
        ));
        out
    });
    let (answer, progress, closing) = call_with_progress(target, &Config::default()).await;
    assert_eq!(answer["result"]["content"][0]["text"], "done", "{answer}");
    let progress = progress.len() as u64;
    assert!(progress > 0 && progress <= N, "{progress}");
    closing.close().await;
}

/// A retried call goes upstream again under a token of its own, and the
/// server's progress starts again: the client saw `1, 2, 3, 1, 2, 3, 4`.
/// Progress must increase (MCP): only values above the last forwarded
/// reach it. (A hedged copy's progress interleaved the same way.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_calls_progress_keeps_increasing() {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&calls);
    let target = progress_server(move |id, token| {
        let first = seen.fetch_add(1, Ordering::SeqCst) == 0;
        let mut out = progress_lines(token, 1..=if first { 3 } else { 4 });
        out.push(if first {
            json!({"jsonrpc": "2.0", "id": id,
                        "error": {"code": -32000, "message": "connection closed"}})
            .to_string()
        } else {
            result_line(id, json!({"content": [{"type": "text", "text": "done"}]}))
        });
        out
    });
    let config = Config::from_toml_str(
        "[tools.t]\nsafe_to_repeat = true\n[retry]\nbase_delay = \"10ms\"\n",
        std::iter::empty(),
    )
    .unwrap();
    let (answer, progress, closing) = call_with_progress(target, &config).await;
    assert_eq!(answer["result"]["content"][0]["text"], "done", "{answer}");
    assert_eq!(calls.load(Ordering::SeqCst), 2, "retried once");
    assert_eq!(progress, [1.0, 2.0, 3.0, 4.0]);
    closing.close().await;
}

/// What [`call_with_progress`] leaves to stop: the stdio session, the
/// upstream.
struct Closing {
    session: tokio_util::sync::CancellationToken,
    upstream: Upstream,
}

impl Closing {
    async fn close(self) {
        self.session.cancel();
        self.upstream.shutdown(BOUND).await;
    }
}

/// `target` behind the stack of `config`, served over an in-memory stdio
/// session: `initialize`, then one `tools/call` of `t` under progress
/// token `mine`. Its answer, the values of the progress notifications the
/// client got before it (each checked to carry `mine`), and what to stop.
async fn call_with_progress(target: UpstreamTarget, config: &Config) -> (Value, Vec<f64>, Closing) {
    let downstreams = Downstreams::new();
    let upstream = Upstream::new(
        target,
        UpstreamConfig::default(),
        ToolCatalog::new(),
        downstreams.clone(),
    );
    let shared = SharedState::new(Events::new(), MetricsEndpoints::new());
    toolwarden_proxy::stack::configure_catalog(config, &shared.catalog);
    let stack = build_stack(config, upstream.service(), &shared).unwrap();
    let stdio =
        support::serve_stdio_in_memory(ProxyCore::new(upstream.clone(), stack, downstreams));
    let (mut write, mut lines) = (stdio.input, stdio.output);
    for message in [
        json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "t", "version": "0"}}}),
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
            "name": "t", "arguments": {}, "_meta": {"progressToken": "mine"}}}),
    ] {
        write
            .write_all(format!("{message}\n").as_bytes())
            .await
            .unwrap();
    }
    let mut progress = Vec::new();
    let answer = loop {
        let line = tokio::time::timeout(BOUND, lines.next_line())
            .await
            .expect("the call is answered")
            .unwrap()
            .unwrap();
        let message: Value = serde_json::from_str(&line).unwrap();
        if message["method"] == "notifications/progress" {
            assert_eq!(message["params"]["progressToken"], "mine", "{message}");
            progress.push(message["params"]["progress"].as_f64().unwrap());
        } else if message["id"] == 1 {
            break message;
        }
    };
    (
        answer,
        progress,
        Closing {
            session: stdio.shutdown,
            upstream,
        },
    )
}

/// What the Streamable HTTP server does with one `tools/call` POST.
#[derive(Debug, Clone)]
enum HttpReply {
    /// This status, content type and body.
    Raw(u16, &'static str, String),
    /// This status, the body a JSON-RPC `error` for the request.
    RpcError(u16, Value),
    /// 429 with this `Retry-After`.
    Limited(&'static str),
    /// 401 with a `WWW-Authenticate` challenge.
    Unauthorized,
    /// 404 (the session expired), then this `result` to the request sent
    /// again.
    Expired(Value),
    /// The answer with this `result`, as JSON.
    Answer(Value),
    /// The answer with this `result`, as the one event of an SSE stream.
    Sse(Value),
    /// An SSE stream that ends with no event.
    SseEmpty,
    /// A JSON body cut off by an error of the connection.
    Cut,
    /// The answer with a result of 17 MB of text (past rmcp's 16 MiB).
    Huge,
    /// An SSE stream of this many progress notifications (under the
    /// request's token), as many `notifications/tools/list_changed`, a
    /// `ping` request, then the answer `done`.
    Flood(u64),
}

type HttpReplies = Arc<Mutex<VecDeque<HttpReply>>>;

/// What the HTTP server was sent: `initialize` requests counted, and
/// `tools/list` requests (each answered after 20 ms): in all, and the
/// most at once.
#[derive(Debug, Default)]
struct HttpSeen {
    initialize: AtomicUsize,
    lists: Mutex<Lists>,
    /// Answers to the server's `ping` (id `server-ping`).
    pongs: AtomicUsize,
}

/// A raw Streamable HTTP server on a loopback port: `initialize` (a session
/// id), `tools/list` (one tool, `t`) and `ping` answered well as JSON,
/// notifications and responses accepted, the standalone GET stream refused
/// (405), each `tools/call` answered with the next of `replies` (a result
/// as JSON when they are used up). Its URL.
async fn http_server(
    replies: HttpReplies,
    seen: Arc<HttpSeen>,
    shutdown: tokio_util::sync::CancellationToken,
) -> String {
    use axum::body::{Body, Bytes};
    use axum::http::{header::CONTENT_TYPE, Method, StatusCode};
    use axum::response::{IntoResponse, Response};

    async fn handle(
        axum::extract::State((replies, seen)): axum::extract::State<(HttpReplies, Arc<HttpSeen>)>,
        method: Method,
        body: Bytes,
    ) -> Response {
        if method != Method::POST {
            return StatusCode::METHOD_NOT_ALLOWED.into_response();
        }
        let Ok(message) = serde_json::from_slice::<Value>(&body) else {
            return StatusCode::BAD_REQUEST.into_response();
        };
        if message["id"] == "server-ping" && message.get("result").is_some() {
            seen.pongs.fetch_add(1, Ordering::SeqCst);
        }
        let Some(id) = message
            .get("id")
            .cloned()
            .filter(|_| message.get("method").is_some())
        else {
            return StatusCode::ACCEPTED.into_response();
        };
        let json = |status: u16, body: String| {
            Response::builder()
                .status(status)
                .header(CONTENT_TYPE, "application/json")
                .header("mcp-session-id", "s1")
                .body(Body::from(body))
                .unwrap()
        };
        let answer = |result: Value| result_line(&id, result);
        match message["method"].as_str().unwrap_or("") {
            "initialize" => {
                seen.initialize.fetch_add(1, Ordering::SeqCst);
                json(200, answer(initialized("http")))
            }
            "tools/list" => {
                {
                    let mut lists = seen.lists.lock().unwrap();
                    lists.total += 1;
                    lists.open += 1;
                    lists.most = lists.most.max(lists.open);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                seen.lists.lock().unwrap().open -= 1;
                json(
                    200,
                    answer(json!({"tools": [{"name": "t", "inputSchema": {"type": "object"}}]})),
                )
            }
            "tools/call" => match next_reply(&replies) {
                Some(HttpReply::Raw(status, content_type, body)) => Response::builder()
                    .status(status)
                    .header(CONTENT_TYPE, content_type)
                    .body(Body::from(body))
                    .unwrap(),
                Some(HttpReply::RpcError(status, error)) => json(
                    status,
                    json!({"jsonrpc": "2.0", "id": id, "error": error}).to_string(),
                ),
                Some(HttpReply::Limited(retry_after)) => Response::builder()
                    .status(429)
                    .header("retry-after", retry_after)
                    .body(Body::from("slow down"))
                    .unwrap(),
                Some(HttpReply::Unauthorized) => Response::builder()
                    .status(401)
                    .header("www-authenticate", "Bearer realm=\"mcp\"")
                    .body(Body::empty())
                    .unwrap(),
                Some(HttpReply::Expired(result)) => {
                    replies
                        .lock()
                        .unwrap()
                        .push_front(HttpReply::Answer(result));
                    StatusCode::NOT_FOUND.into_response()
                }
                Some(HttpReply::Answer(result)) => json(200, answer(result)),
                Some(HttpReply::Sse(result)) => Response::builder()
                    .header(CONTENT_TYPE, "text/event-stream")
                    .body(Body::from(format!(
                        "event: message\ndata: {}\n\n",
                        answer(result)
                    )))
                    .unwrap(),
                Some(HttpReply::SseEmpty) => Response::builder()
                    .header(CONTENT_TYPE, "text/event-stream")
                    .body(Body::empty())
                    .unwrap(),
                Some(HttpReply::Cut) => {
                    let chunks = futures::stream::iter([
                        Ok(Bytes::from_static(br#"{"jsonrpc":"2.0","id":"#)),
                        Err(std::io::Error::other("cut")),
                    ]);
                    Response::builder()
                        .header(CONTENT_TYPE, "application/json")
                        .body(Body::from_stream(chunks))
                        .unwrap()
                }
                Some(HttpReply::Flood(n)) => {
                    let token = &message["params"]["_meta"]["progressToken"];
                    let mut events = String::new();
                    for i in 1..=n {
                        let progress = json!({"jsonrpc": "2.0", "method": "notifications/progress",
                            "params": {"progressToken": token, "progress": i}});
                        let changed =
                            json!({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"});
                        events.push_str(&format!("data: {progress}\n\ndata: {changed}\n\n"));
                    }
                    let ping = json!({"jsonrpc": "2.0", "id": "server-ping", "method": "ping"});
                    events.push_str(&format!("data: {ping}\n\n"));
                    events.push_str(&format!(
                        "data: {}\n\n",
                        answer(json!({"content": [{"type": "text", "text": "done"}]}))
                    ));
                    Response::builder()
                        .header(CONTENT_TYPE, "text/event-stream")
                        .body(Body::from(events))
                        .unwrap()
                }
                Some(HttpReply::Huge) => json(
                    200,
                    answer(json!({"content": [{"type": "text", "text": "x".repeat(17 << 20)}]})),
                ),
                None => json(
                    200,
                    answer(json!({"content": [{"type": "text", "text": "last"}]})),
                ),
            },
            _ => json(200, answer(json!({}))),
        }
    }

    /// The next reply, the queue unlocked again before it is acted on.
    fn next_reply(replies: &HttpReplies) -> Option<HttpReply> {
        replies.lock().unwrap().pop_front()
    }

    let router = axum::Router::new()
        .route("/mcp", axum::routing::any(handle))
        .with_state((replies, seen));
    support::serve_on_loopback(router, shutdown).await
}

/// The same over Streamable HTTP: error statuses with and without JSON-RPC
/// bodies, bodies that are not JSON or not JSON-RPC, an answer to another
/// id, SSE streams with and without the answer, a body cut off, one past
/// rmcp's 16 MiB bound, a rate limit with `Retry-After`, an expired
/// session. Every call gets one answer within the attempt timeout; an HTTP
/// status is told as a status (429 and 503 transient with their hint, 500
/// the tool failing), not as a closed connection; and no bad answer
/// takes the connection down: the server sees `initialize` twice only,
/// the second for the session it expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_gets_one_answer_whatever_an_http_server_sends() {
    use Expect::Text;
    let ok = |s: &str| json!({"content": [{"type": "text", "text": s}]});
    let json_ct = "application/json";
    let closed = Text("connection closed");
    let script = vec![
        (
            HttpReply::Raw(500, "text/plain", "boom".into()),
            Text("HTTP status 500; the tool is failing"),
        ),
        (
            HttpReply::Raw(503, "text/plain", "down".into()),
            Text("HTTP status 503; this may be temporary"),
        ),
        (
            HttpReply::RpcError(500, json!({"code": -32603, "message": "internal"})),
            Text("JSON-RPC error -32603: internal"),
        ),
        (HttpReply::Raw(200, "text/plain", "hello".into()), closed),
        (HttpReply::Raw(200, json_ct, "{not json".into()), closed),
        (HttpReply::Raw(200, json_ct, r#"{"foo":1}"#.into()), closed),
        (HttpReply::Raw(200, json_ct, String::new()), closed),
        // The answer to another request, on this one's POST: refused at
        // once (it waited out the attempt timeout, and rmcp handed the
        // answer to any request in flight with that id).
        (
            HttpReply::Raw(200, json_ct, result_line(&json!(999_999), json!({}))),
            closed,
        ),
        (HttpReply::Sse(ok("sse ok")), Text("sse ok")),
        (HttpReply::SseEmpty, closed),
        (HttpReply::Cut, closed),
        // Refused at 16 MiB, or cut by the attempt timeout first should
        // moving 17 MB take longer (a machine under heavy load).
        (
            HttpReply::Huge,
            Expect::OneOf(&["connection closed", "timed out"]),
        ),
        (
            HttpReply::Limited("7"),
            Text("HTTP status 429; retry after 7 s"),
        ),
        (
            HttpReply::Unauthorized,
            Text("HTTP status 401; the server refused the request"),
        ),
        (HttpReply::Expired(ok("after 404")), Text("after 404")),
        (HttpReply::Answer(ok("answered")), Text("answered")),
    ];
    let replies: HttpReplies =
        Arc::new(Mutex::new(script.iter().map(|(r, _)| r.clone()).collect()));
    let seen = Arc::new(HttpSeen::default());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let url = http_server(replies, Arc::clone(&seen), shutdown.clone()).await;
    let mut proxied = Proxied::start(UpstreamTarget::Url(url), HTTP_ATTEMPT_TIMEOUT).await;
    for (i, (reply, expect)) in script.iter().enumerate() {
        proxied.call(i as i64 + 1, reply, *expect).await;
    }
    proxied.check_one_answer_each(script.len() + 1).await;
    assert_eq!(
        seen.initialize.load(Ordering::SeqCst),
        2,
        "one connection, its session renewed once"
    );
    proxied.finish().await;
    shutdown.cancel();
}

/// The stdio floods above, over Streamable HTTP: one `tools/call` answered
/// by an SSE stream of 5 000 progress notifications, 5 000
/// `notifications/tools/list_changed` and a `ping` request before its
/// answer. The call is answered; the client gets progress under its own
/// token only, no more than was sent; the flood of list changes costs one
/// `tools/list` at a time, far fewer than one per change (over a pipe the
/// changes come faster than over HTTP's stream, and cost fewer lists); the
/// server's `ping` is answered on the same session (the server sees one
/// `initialize`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http_floods_of_progress_and_list_changes_stay_bounded() {
    const N: u64 = 5_000;
    let replies: HttpReplies = Arc::new(Mutex::new(VecDeque::from([HttpReply::Flood(N)])));
    let seen = Arc::new(HttpSeen::default());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let url = http_server(replies, Arc::clone(&seen), shutdown.clone()).await;
    let (answer, progress, closing) =
        call_with_progress(UpstreamTarget::Url(url), &Config::default()).await;
    assert_eq!(answer["result"]["content"][0]["text"], "done", "{answer}");
    let progress = progress.len() as u64;
    assert!(
        progress <= N,
        "{progress} progress notifications for {N} sent"
    );
    // Every refresh the list changes started, done: the count stays still.
    let deadline = tokio::time::Instant::now() + BOUND;
    let mut last = usize::MAX;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the refreshes never settled, or the ping was never answered: {:?}",
            seen
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let lists = seen.lists.lock().unwrap();
        if lists.total == last && lists.open == 0 && seen.pongs.load(Ordering::SeqCst) > 0 {
            break;
        }
        last = lists.total;
    }
    assert_eq!(
        seen.pongs.load(Ordering::SeqCst),
        1,
        "the server's ping answered once"
    );
    let (total, most) = {
        let lists = seen.lists.lock().unwrap();
        (lists.total, lists.most)
    };
    assert_eq!(most, 1, "{total} tools/list, {most} at once");
    // One refresh at a time, and one more if the list changed meanwhile:
    // their number follows how long the flood takes to read (each refresh
    // a round trip of 20 ms here; 12 in a quiet run), not its size.
    assert!(
        total <= N as usize / 50,
        "{N} list changes cost {total} tools/list"
    );
    assert_eq!(seen.initialize.load(Ordering::SeqCst), 1, "one session");
    closing.close().await;
    shutdown.cancel();
}
