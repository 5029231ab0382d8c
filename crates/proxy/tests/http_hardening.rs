//! `toolwarden run --listen` made safe to expose (issue 16): `Origin` and
//! `Host` checked, bearer tokens, and bounds on connections, sessions, header
//! reads and tool names. Through the built binary in front of
//! mcp-server-time (`TOOLWARDEN_MCP_SERVER_TIME`), and in process for what
//! must never reach the upstream.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::Ipv4Addr;
use std::time::Duration;

use serde_json::{json, Value};
use support::{bounded, component, dechunk, eventually, free_port, Proxy, LIMIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An HTTP answer: status, head (lower-cased) and body (de-chunked when needed).
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<String> {
        let prefix = format!("{}:", name.to_ascii_lowercase());
        self.head
            .lines()
            .find_map(|line| line.strip_prefix(prefix.as_str()))
            .map(|v| v.trim().to_owned())
    }

    /// The JSON-RPC messages of the body (plain JSON or SSE `data:` lines).
    fn messages(&self) -> Vec<Value> {
        if self.body.trim_start().starts_with('{') {
            return vec![serde_json::from_str(&self.body).unwrap()];
        }
        self.body
            .lines()
            .filter_map(|line| line.strip_prefix("data:"))
            .map(str::trim)
            .filter(|data| !data.is_empty())
            .map(|data| serde_json::from_str(data).unwrap())
            .collect()
    }
}

/// A raw HTTP/1.1 POST of `body` to `/mcp` with `headers`; `Host` is
/// `127.0.0.1:port` unless given.
async fn post(port: u16, headers: &[(&str, &str)], body: &str) -> Answer {
    post_from(LOOPBACK, port, headers, body).await
}

const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// A connection to the proxy from the address `source` (another loopback
/// address is another client for the proxy).
async fn connect_from(source: Ipv4Addr, port: u16) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((source, 0).into()).unwrap();
    socket
        .connect((Ipv4Addr::LOCALHOST, port).into())
        .await
        .unwrap()
}

/// As [`post`], from the address `source` ([`connect_from`]).
async fn post_from(source: Ipv4Addr, port: u16, headers: &[(&str, &str)], body: &str) -> Answer {
    let mut stream = connect_from(source, port).await;
    let mut head = String::from("POST /mcp HTTP/1.1\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("Host: 127.0.0.1:{port}\r\n"));
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!(
        "Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    bounded("an HTTP answer", LIMIT, stream.read_to_end(&mut raw))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP head");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let head = head.to_ascii_lowercase();
    let body = if head.contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Answer { status, head, body }
}

fn initialize_body() -> String {
    json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "toolwarden-hardening", "version": "0"},
    }})
    .to_string()
}

/// `toolwarden run --listen 127.0.0.1:PORT <extra> -- mcp-server-time`, with
/// `env`; waits until it accepts connections. `None` without the component.
async fn proxy(extra: &[&str], env: &[(&str, &str)]) -> Option<(Proxy, u16)> {
    let bin = component("TOOLWARDEN_MCP_SERVER_TIME")?;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["run", "--listen", &listen];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", bin.to_str().unwrap(), "--local-timezone", "UTC"]);
    let proxy = Proxy::start(&args, env);
    support::wait_listening(port, "the proxy").await;
    Some((proxy, port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_origin_gets_403_and_loopback_ones_are_served() {
    let Some((_proxy, port)) = proxy(&[], &[]).await else {
        return;
    };
    for origin in [
        "https://evil.example",
        "null",
        "http://localhost.evil.example",
    ] {
        let foreign = post(port, &[("Origin", origin)], &initialize_body()).await;
        assert_eq!(foreign.status, 403, "{origin}: {foreign:?}");
    }
    for origin in [
        "http://localhost:5173",
        "https://127.0.0.1:3000",
        "http://[::1]:8080",
    ] {
        let allowed = post(port, &[("Origin", origin)], &initialize_body()).await;
        assert_eq!(allowed.status, 200, "{origin}: {allowed:?}");
    }
    // No Origin at all: a non-browser client.
    let plain = post(port, &[], &initialize_body()).await;
    assert_eq!(plain.status, 200, "{plain:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_origin_adds_an_origin_and_only_that_one() {
    let Some((_proxy, port)) = proxy(&["--allow-origin", "https://app.example.com"], &[]).await
    else {
        return;
    };
    let allowed = post(
        port,
        &[("Origin", "https://app.example.com")],
        &initialize_body(),
    )
    .await;
    assert_eq!(allowed.status, 200, "{allowed:?}");
    // The same site on another port is another origin.
    for origin in ["https://app.example.com:8443", "https://evil.example"] {
        let foreign = post(port, &[("Origin", origin)], &initialize_body()).await;
        assert_eq!(foreign.status, 403, "{origin}: {foreign:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_not_allowed_gets_403_and_allow_host_extends_the_list() {
    let Some((_proxy, port)) = proxy(&["--allow-host", "mcp.internal"], &[]).await else {
        return;
    };
    let rebound = post(port, &[("Host", "attacker.example")], &initialize_body()).await;
    assert_eq!(rebound.status, 403, "{rebound:?}");
    let named = post(port, &[("Host", "mcp.internal:9000")], &initialize_body()).await;
    assert_eq!(named.status, 200, "{named:?}");
    let loopback = post(port, &[("Host", "localhost")], &initialize_body()).await;
    assert_eq!(loopback.status, 200, "{loopback:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_right_bearer_token_a_client_gets_401() {
    let tokens = [("TOOLWARDEN_AUTH_TOKENS", "first-secret, second-secret")];
    let Some((proxy, port)) = proxy(&[], &tokens).await else {
        return;
    };
    let missing = post(port, &[], &initialize_body()).await;
    assert_eq!(missing.status, 401, "{missing:?}");
    assert!(
        missing
            .header("www-authenticate")
            .is_some_and(|v| v.starts_with("bearer")),
        "{missing:?}"
    );
    let wrong = post(
        port,
        &[("Authorization", "Bearer first-secreT")],
        &initialize_body(),
    )
    .await;
    assert_eq!(wrong.status, 401, "{wrong:?}");
    let right = post(
        port,
        &[("Authorization", "Bearer second-secret")],
        &initialize_body(),
    )
    .await;
    assert_eq!(right.status, 200, "{right:?}");
    let logs = proxy.stderr_lines().join("\n");
    assert!(!logs.contains("secret"), "a token reached the log:\n{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_from_a_file_are_accepted() {
    let dir = std::env::temp_dir().join(format!("toolwarden-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tokens");
    std::fs::write(
        &file,
        "# one token a line\nfile-token-1\n\n  file-token-2  \n",
    )
    .unwrap();
    let Some((_proxy, port)) = proxy(&["--auth-token-file", file.to_str().unwrap()], &[]).await
    else {
        return;
    };
    let missing = post(port, &[], &initialize_body()).await;
    assert_eq!(missing.status, 401, "{missing:?}");
    let right = post(
        port,
        &[("Authorization", "Bearer file-token-2")],
        &initialize_body(),
    )
    .await;
    assert_eq!(right.status, 200, "{right:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_loopback_listen_address_without_tokens_refuses_to_start() {
    let port = free_port();
    let listen = format!("0.0.0.0:{port}");
    let mut proxy = Proxy::start(
        &[
            "run",
            "--listen",
            &listen,
            "--listen-allow-remote",
            "--",
            "true",
        ],
        &[("TOOLWARDEN_AUTH_TOKENS", "")],
    );
    let status = bounded("the refused start", LIMIT, proxy.child.wait())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(2), "{:?}", proxy.stderr_lines());
    // The pipe is drained by a task; give it a moment (bounded).
    let said = eventually(LIMIT, || {
        let lines = proxy.stderr_lines();
        async move { lines.iter().any(|l| l.contains("token")).then_some(()) }
    })
    .await;
    assert!(said.is_some(), "{:?}", proxy.stderr_lines());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_client_is_disconnected_by_the_header_timeout() {
    let Some((_proxy, port)) = proxy(&[], &[("TOOLWARDEN_HTTP_HEADER_READ_TIMEOUT", "1s")]).await
    else {
        return;
    };
    slowloris_is_cut_off(port, "POST /mcp").await;
}

/// Sends `request_line`'s headers one byte every 100 ms, never ending them,
/// until the server at `port` hangs up (bounded: the test fails if it never
/// does).
async fn slowloris_is_cut_off(port: u16, request_line: &str) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream
        .write_all(format!("{request_line} HTTP/1.1\r\nHost: 127.0.0.1\r\n").as_bytes())
        .await
        .unwrap();
    bounded("the slowloris connection to be closed", LIMIT, async {
        loop {
            if stream.write_all(b"x").await.is_err() {
                return;
            }
            let mut buf = [0u8; 256];
            match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => return,
                Ok(Ok(_)) => return, // an error answer, then the close
                Err(_) => {}
            }
        }
    })
    .await;
}

/// The metrics address is served by the same bounded loop: a slowloris
/// connection is cut off there too (it was held forever by axum's `serve`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_address_cuts_off_a_slowloris_client_too() {
    let metrics = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics}");
    let env = [("TOOLWARDEN_HTTP_HEADER_READ_TIMEOUT", "1s")];
    let Some((_proxy, _port)) = proxy(&["--metrics-addr", &metrics_addr], &env).await else {
        return;
    };
    let up = eventually(LIMIT, || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", metrics))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    assert!(up.is_some(), "the metrics address never listened");
    slowloris_is_cut_off(metrics, "GET /metrics").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_past_the_cap_get_503() {
    let Some((_proxy, port)) = proxy(&[], &[("TOOLWARDEN_HTTP_MAX_SESSIONS", "2")]).await else {
        return;
    };
    for n in 0..2 {
        let answer = post(port, &[], &initialize_body()).await;
        assert_eq!(answer.status, 200, "session {n}: {answer:?}");
        assert!(answer.header("mcp-session-id").is_some(), "{answer:?}");
    }
    let third = post(port, &[], &initialize_body()).await;
    assert_eq!(third.status, 503, "{third:?}");
    let message = &third.messages()[0];
    assert_eq!(message["id"], 1, "{message}");
    assert!(message["error"]["code"].is_i64(), "{message}");
}

/// `initialize` then `notifications/initialized` from `source`: the new
/// session's id, or the status of the `initialize`.
async fn initialize_from(source: Ipv4Addr, port: u16) -> Result<String, u16> {
    let answer = post_from(source, port, &[], &initialize_body()).await;
    let session = match answer.header("mcp-session-id") {
        Some(session) if answer.status == 200 => session,
        _ => return Err(answer.status),
    };
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let answer = post_from(
        source,
        port,
        &[("Mcp-Session-Id", &session)],
        &initialized.to_string(),
    )
    .await;
    // Closed already (it gave way to another at the cap): 404.
    if answer.status == 404 {
        return Err(404);
    }
    assert_eq!(answer.status, 202, "{answer:?}");
    Ok(session)
}

/// Whether `session` is still open: a `ping` in it is answered (rmcp
/// answers `404` for a closed one).
async fn is_open(port: u16, session: &str) -> bool {
    let ping = json!({"jsonrpc": "2.0", "id": 9, "method": "ping"}).to_string();
    post(port, &[("Mcp-Session-Id", session)], &ping)
        .await
        .status
        == 200
}

/// One client (address) holding every session cannot lock another out:
/// at `max_sessions`, another client's `initialize` takes the place of
/// the hog's least recently active session once it has sat idle a short
/// while (`evict_idle_after` here, under 10 s), and the hog's own next
/// `initialize` never closes the other client's session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_holding_every_session_gives_one_up_to_another_client() {
    let env = [
        ("TOOLWARDEN_HTTP_MAX_SESSIONS", "3"),
        ("TOOLWARDEN_HTTP_EVICT_IDLE_AFTER", "2s"),
    ];
    let Some((_proxy, port)) = proxy(&[], &env).await else {
        return;
    };
    let hog = Ipv4Addr::new(127, 0, 0, 2);
    let other = Ipv4Addr::new(127, 0, 0, 3);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(initialize_from(hog, port).await.expect("the hog's session"));
    }
    assert_eq!(initialize_from(hog, port).await, Err(503));
    // Sessions in use (a request within the last while) are not cut.
    assert_eq!(initialize_from(other, port).await, Err(503));
    tokio::time::sleep(Duration::from_millis(2200)).await;
    // The first-opened is used last: the second is the least recently active.
    assert!(is_open(port, &held[0]).await);

    let mine = initialize_from(other, port)
        .await
        .expect("another client gets a session at the cap");
    let closed = eventually(LIMIT, || {
        let session = held[1].clone();
        async move { (!is_open(port, &session).await).then_some(()) }
    })
    .await;
    assert!(closed.is_some(), "the hog's least recently active gave way");
    assert!(is_open(port, &held[0]).await);
    assert!(is_open(port, &held[2]).await);
    assert!(is_open(port, &mine).await);
    // The hog, back at the cap, never closes the other client's session
    // (it may close one of its own, idle long enough).
    let _ = initialize_from(hog, port).await;
    assert!(
        is_open(port, &mine).await,
        "the other client's session stays"
    );
}

/// Behind one address, at `max_sessions`, the longest idle session gives
/// way once idle `http.evict_idle_after`; before that, `503`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_cap_a_session_idle_long_enough_gives_way() {
    let env = [
        ("TOOLWARDEN_HTTP_MAX_SESSIONS", "2"),
        ("TOOLWARDEN_HTTP_EVICT_IDLE_AFTER", "1s"),
    ];
    let Some((_proxy, port)) = proxy(&[], &env).await else {
        return;
    };
    let idle = initialize_from(LOOPBACK, port).await.unwrap();
    let active = initialize_from(LOOPBACK, port).await.unwrap();
    assert_eq!(initialize_from(LOOPBACK, port).await, Err(503));
    let third = eventually(LIMIT, || {
        let active = active.clone();
        async move {
            // `active` keeps itself active; `idle` does nothing.
            assert!(is_open(port, &active).await);
            tokio::time::sleep(Duration::from_millis(200)).await;
            initialize_from(LOOPBACK, port).await.ok()
        }
    })
    .await
    .expect("a session once the idle one was idle long enough");
    let closed = eventually(LIMIT, || {
        let idle = idle.clone();
        async move { (!is_open(port, &idle).await).then_some(()) }
    })
    .await;
    assert!(closed.is_some(), "the idle session gave way");
    assert!(is_open(port, &active).await);
    assert!(is_open(port, &third).await);
}

/// `initialize` then `notifications/initialized`; the session id.
/// `upstream.protocol_version` pins the version the proxy asks the server
/// for, whatever the client asked; the client keeps the version it asked the
/// proxy for (each hop negotiates its own). Without the pin the server would
/// be asked for the client's 2025-06-18.
#[tokio::test]
async fn a_pinned_protocol_version_is_what_the_upstream_is_asked_for() {
    let metrics = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics}");
    let env = [("TOOLWARDEN_UPSTREAM_PROTOCOL_VERSION", "2025-03-26")];
    let Some((proxy, port)) = proxy(&["--metrics-addr", &metrics_addr], &env).await else {
        return;
    };
    let answer = post(port, &[], &initialize_body()).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let result = answer
        .messages()
        .into_iter()
        .find(|m| m["id"] == 1)
        .expect("the initialize answer");
    assert_eq!(
        result["result"]["protocolVersion"], "2025-06-18",
        "{result}"
    );
    let report = eventually(LIMIT, || async move {
        let (_, report) = support::health(metrics).await?;
        report["upstream"]["protocolVersion"]
            .is_string()
            .then_some(report)
    })
    .await
    .unwrap_or_else(|| panic!("{:?}", proxy.stderr_lines()));
    assert_eq!(
        report["upstream"]["protocolVersion"], "2025-03-26",
        "{report}"
    );
}

async fn open_session(port: u16) -> String {
    let answer = post(port, &[], &initialize_body()).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let session = answer.header("mcp-session-id").expect("a session id");
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let answer = post(
        port,
        &[("Mcp-Session-Id", &session)],
        &initialized.to_string(),
    )
    .await;
    assert_eq!(answer.status, 202, "{answer:?}");
    session
}

async fn call(port: u16, session: &str, id: i64, tool: &str) -> Value {
    let body = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
        "params": {"name": tool, "arguments": {"timezone": "UTC"}}});
    let answer = post(port, &[("Mcp-Session-Id", session)], &body.to_string()).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    answer
        .messages()
        .into_iter()
        .find(|m| m["id"] == id)
        .expect("the call's answer")
}

/// `upstream.session_mode = "per_session"` with a real server: each HTTP
/// session gets a child process of its own, and ending the session
/// (`DELETE`) stops its child and no other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_session_mode_gives_each_session_a_server_process_of_its_own() {
    let metrics = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics}");
    let env = [("TOOLWARDEN_UPSTREAM_SESSION_MODE", "per_session")];
    let Some((proxy, port)) = proxy(&["--metrics-addr", &metrics_addr], &env).await else {
        return;
    };
    let first = open_session(port).await;
    let second = open_session(port).await;
    for (n, session) in [&first, &second].into_iter().enumerate() {
        let answer = call(port, session, 10 + n as i64, "get_current_time").await;
        assert!(answer.get("result").is_some(), "{answer}");
    }
    let pids = |report: &Value| -> Vec<u32> {
        report["upstream"]["pids"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| p.as_u64())
                    .map(|p| p as u32)
                    .collect()
            })
            .unwrap_or_default()
    };
    let report = eventually(LIMIT, || async move {
        let (_, report) = support::health(metrics).await?;
        (pids(&report).len() == 2).then_some(report)
    })
    .await;
    let report = report.unwrap_or_else(|| panic!("{:?}", proxy.stderr_lines()));
    assert_eq!(report["upstream"]["mode"], "per_session", "{report}");
    assert_eq!(report["upstream"]["sessions"], 2, "{report}");
    let children = pids(&report);
    assert_ne!(children[0], children[1], "{report}");
    assert!(children.iter().all(|&pid| support::alive(pid)), "{report}");

    // The first session ends: one child exits, the other still serves.
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let delete = format!(
        "DELETE /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nMcp-Session-Id: {first}\r\n\
         Connection: close\r\n\r\n"
    );
    stream.write_all(delete.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    bounded("the DELETE's answer", LIMIT, stream.read_to_end(&mut raw))
        .await
        .unwrap();
    // 200, as the Python SDK takes a session's end (it logged rmcp's 202
    // as a failure).
    let answer = String::from_utf8_lossy(&raw);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let left = eventually(LIMIT, || async move {
        let (_, report) = support::health(metrics).await?;
        (pids(&report).len() == 1).then_some(pids(&report))
    })
    .await
    .expect("one child left after the session ended");
    let gone: Vec<u32> = children
        .iter()
        .copied()
        .filter(|p| !left.contains(p))
        .collect();
    assert_eq!(gone.len(), 1, "{children:?} -> {left:?}");
    let exited = eventually(LIMIT, || async { (!support::alive(gone[0])).then_some(()) }).await;
    assert!(
        exited.is_some(),
        "the ended session's child {} still runs",
        gone[0]
    );
    let answer = call(port, &second, 20, "get_current_time").await;
    assert!(answer.get("result").is_some(), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_over_long_or_unknown_tool_name_is_invalid_params() {
    let Some((_proxy, port)) = proxy(&[], &[]).await else {
        return;
    };
    let session = open_session(port).await;
    let long = "a".repeat(129);
    let answer = call(port, &session, 2, &long).await;
    assert_eq!(answer["error"]["code"], -32602, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("128 bytes"),
        "{answer}"
    );
    // Once the catalog is filled (tools/list), names not in it are refused
    // by the proxy; a listed tool still works.
    let listed = eventually(LIMIT, || async {
        let answer = call(port, &session, 3, "get_current_time").await;
        (answer["result"]["isError"] == false).then_some(())
    })
    .await;
    assert!(listed.is_some());
    let unknown = eventually(LIMIT, || async {
        let answer = call(port, &session, 4, "no_such_tool").await;
        (answer["error"]["code"] == -32602).then_some(answer)
    })
    .await
    .expect("an unknown tool refused with -32602");
    assert!(
        unknown["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown tool"),
        "{unknown}"
    );
}

/// A `tools/call` with a member of the message or of its params given
/// twice is refused with -32602 under its id, over HTTP as over stdio.
/// The guard's fast path for plain calls once read such a body as a
/// `Value` (the last member counts) and handed it to rmcp, which called
/// the tool named last, while the same line over stdio was refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_call_with_a_member_given_twice_gets_a_json_rpc_error_with_its_id() {
    let Some((_proxy, port)) = proxy(&[], &[]).await else {
        return;
    };
    let session = open_session(port).await;
    for (id, body) in [
        (
            7,
            r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"x","name":"get_current_time","arguments":{"timezone":"UTC"}}}"#,
        ),
        (
            8,
            r#"{"jsonrpc":"2.0","id":1,"id":8,"method":"tools/call","params":{"name":"get_current_time","arguments":{"timezone":"UTC"}}}"#,
        ),
        (
            9,
            r#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"get_current_time","arguments":{},"arguments":{"timezone":"UTC"}}}"#,
        ),
        // Params that are an array (rmcp answered a bare 415, no id).
        (
            12,
            r#"{"jsonrpc":"2.0","id":12,"method":"tools/call","params":["get_current_time"]}"#,
        ),
    ] {
        let answer = post(port, &[("Mcp-Session-Id", &session)], body).await;
        assert_eq!(answer.status, 400, "{body}: {answer:?}");
        let messages = answer.messages();
        assert_eq!(messages.len(), 1, "{body}: {answer:?}");
        assert_eq!(messages[0]["error"]["code"], -32602, "{body}: {answer:?}");
        assert_eq!(messages[0]["id"], id, "{body}: {answer:?}");
    }
    // A member given twice inside the arguments is JSON's business (the
    // last one counts, for rmcp too): the call goes through.
    let body = r#"{"jsonrpc":"2.0","id":10,"method":"tools/call","params":{"name":"get_current_time","arguments":{"timezone":"Mars/Olympus","timezone":"UTC"}}}"#;
    let answer = post(port, &[("Mcp-Session-Id", &session)], body).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let result = answer.messages().into_iter().find(|m| m["id"] == 10);
    assert_eq!(
        result.as_ref().map(|m| &m["result"]["isError"]),
        Some(&json!(false)),
        "{answer:?}"
    );
    assert_eq!(
        call(port, &session, 11, "get_current_time").await["result"]["isError"],
        false
    );
}

/// A body after a UTF-8 byte-order mark is read as over stdio: the call is
/// answered (rmcp's own reader refused it with a bare 415).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_after_a_byte_order_mark_is_answered() {
    let Some((_proxy, port)) = proxy(&[], &[]).await else {
        return;
    };
    let session = open_session(port).await;
    let body = json!({"jsonrpc": "2.0", "id": 12, "method": "tools/call",
        "params": {"name": "get_current_time", "arguments": {"timezone": "UTC"}}});
    let answer = eventually(LIMIT, || {
        let body = format!("\u{feff}{body}");
        let session = session.clone();
        async move {
            let answer = post(port, &[("Mcp-Session-Id", &session)], &body).await;
            let result = answer.messages().into_iter().find(|m| m["id"] == 12)?;
            (result["result"]["isError"] == false).then_some(answer)
        }
    })
    .await;
    assert!(
        answer.is_some(),
        "the call after a byte-order mark was never answered"
    );
}

/// As [`proxy`], in front of the flaky server (its `slow {seconds}` tool).
async fn flaky_proxy(env: &[(&str, &str)]) -> Option<(Proxy, u16)> {
    let python = component("TOOLWARDEN_PYTHON")?;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let script = support::flaky_server_script();
    let args = [
        "run",
        "--listen",
        &listen,
        "--",
        python.to_str().unwrap(),
        script.to_str().unwrap(),
    ];
    let proxy = Proxy::start(&args, env);
    support::wait_listening(port, "the proxy").await;
    Some((proxy, port))
}

/// Waits until a call of `slow` in `session` is answered: the catalog
/// knows it (its `tools/list` follows the upstream's connection).
async fn slow_is_known(port: u16, session: &str) {
    let known = eventually(LIMIT, || async move {
        let answer = post(port, &[("Mcp-Session-Id", session)], &slow_call(0, 0.0)).await;
        let result = answer.messages().into_iter().find(|m| m["id"] == 0)?;
        (result["result"]["isError"] == false).then_some(())
    })
    .await;
    assert!(known.is_some(), "slow never answered");
}

fn slow_call(id: i64, seconds: f64) -> String {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
        "params": {"name": "slow", "arguments": {"seconds": seconds}}})
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_past_its_requests_in_flight_gets_429() {
    let env = [("TOOLWARDEN_HTTP_MAX_REQUESTS_PER_SESSION", "1")];
    let Some((_proxy, port)) = flaky_proxy(&env).await else {
        return;
    };
    let session = open_session(port).await;
    let first = tokio::spawn({
        let session = session.clone();
        async move { post(port, &[("Mcp-Session-Id", &session)], &slow_call(2, 5.0)).await }
    });
    // Let it take the session's one slot first (it holds it for 5 s).
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Once the first call is in flight, a second one of the same session is refused.
    let refused = eventually(LIMIT, || {
        let session = session.clone();
        async move {
            let answer = post(port, &[("Mcp-Session-Id", &session)], &slow_call(3, 0.0)).await;
            (answer.status == 429).then_some(answer)
        }
    })
    .await
    .expect("a second request in flight refused with 429");
    assert_eq!(refused.messages()[0]["id"], 3, "{refused:?}");
    let first = bounded("the first call", LIMIT, first).await.unwrap();
    assert_eq!(first.status, 200, "{first:?}");
    // Its permit is back once it is answered.
    let again = post(port, &[("Mcp-Session-Id", &session)], &slow_call(4, 0.0)).await;
    assert_eq!(again.status, 200, "{again:?}");
}

/// A request with the id of one still in flight in its session is refused
/// (-32600 under that id, HTTP 400), and the first is answered. rmcp routes
/// answers by id: it sent the first one's answer nowhere, and its stream
/// and in-flight permit stayed open until the session expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_the_id_of_one_in_flight_is_refused_and_the_first_answered() {
    let Some((_proxy, port)) = flaky_proxy(&[]).await else {
        return;
    };
    let session = open_session(port).await;
    slow_is_known(port, &session).await;
    let first = tokio::spawn({
        let session = session.clone();
        async move { post(port, &[("Mcp-Session-Id", &session)], &slow_call(5, 3.0)).await }
    });
    // Let it be in flight first (for 3 s).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let refused = eventually(LIMIT, || {
        let session = session.clone();
        async move {
            let answer = post(port, &[("Mcp-Session-Id", &session)], &slow_call(5, 0.0)).await;
            (answer.status == 400).then_some(answer)
        }
    })
    .await
    .expect("the second request with id 5 refused");
    let refusal = &refused.messages()[0];
    assert_eq!(refusal["id"], 5, "{refused:?}");
    assert_eq!(refusal["error"]["code"], -32600, "{refused:?}");
    let first = bounded("the first call", LIMIT, first).await.unwrap();
    assert_eq!(first.status, 200, "{first:?}");
    let answer = first.messages().into_iter().find(|m| m["id"] == 5);
    assert_eq!(
        answer.as_ref().map(|m| &m["result"]["isError"]),
        Some(&json!(false)),
        "{first:?}"
    );
    // Answered, its id is free again.
    let again = post(port, &[("Mcp-Session-Id", &session)], &slow_call(5, 0.0)).await;
    assert_eq!(again.status, 200, "{again:?}");
}

/// A client that drops its connection once its call is sent still has the
/// call in flight until the server answers it: its place is not given back
/// early (it was, with the answer's stream, so a client could keep any
/// number of calls running upstream past `max_requests_per_session`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_client_hung_up_keeps_its_place_until_answered() {
    let env = [("TOOLWARDEN_HTTP_MAX_REQUESTS_PER_SESSION", "1")];
    let Some((_proxy, port)) = flaky_proxy(&env).await else {
        return;
    };
    let session = open_session(port).await;
    slow_is_known(port, &session).await;
    // A 3 s call, sent; the client reads the answer's head and hangs up.
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let body = slow_call(2, 3.0);
    let request = format!(
        "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
         Accept: application/json, text/event-stream\r\nMcp-Session-Id: {session}\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = bounded("the answer's head", LIMIT, stream.read(&mut buf))
            .await
            .unwrap();
        assert!(n > 0, "closed before the head");
        head.extend_from_slice(&buf[..n]);
    }
    drop(stream);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = post(port, &[("Mcp-Session-Id", &session)], &slow_call(3, 0.0)).await;
    assert_eq!(
        refused.status, 429,
        "the hung-up call is still in flight: {refused:?}"
    );
    // Once the server answered it, the place is back.
    let back = eventually(LIMIT, || {
        let session = session.clone();
        async move {
            let answer = post(port, &[("Mcp-Session-Id", &session)], &slow_call(4, 0.0)).await;
            (answer.status == 200).then_some(())
        }
    })
    .await;
    assert!(back.is_some(), "the place never came back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_sent_too_slowly_gets_408() {
    let env = [("TOOLWARDEN_HTTP_BODY_READ_TIMEOUT", "1s")];
    let Some((_proxy, port)) = proxy(&[], &env).await else {
        return;
    };
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let head = format!(
        "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
         Accept: application/json, text/event-stream\r\nContent-Length: 1000\r\n\r\n{{\"jsonrpc\""
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    // The body never completes; the answer comes anyway (bounded).
    let mut buf = [0u8; 1024];
    bounded("the 408", LIMIT, async {
        loop {
            let n = stream.read(&mut buf).await.unwrap_or(0);
            raw.extend_from_slice(&buf[..n]);
            if n == 0 || String::from_utf8_lossy(&raw).contains("\r\n\r\n") {
                return;
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_wait_for_a_free_slot() {
    let env = [("TOOLWARDEN_HTTP_MAX_CONNECTIONS", "1")];
    let Some((_proxy, port)) = proxy(&[], &env).await else {
        return;
    };
    // A request the proxy answers itself at once (400: not JSON-RPC).
    let invalid = r#"{"jsonrpc":"2.0","id":7}"#;
    assert_eq!(post(port, &[], invalid).await.status, 400);
    // The one slot, held by a connection that sent nothing yet.
    let holder = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let waiting = tokio::spawn(async move { post(port, &[], invalid).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "a second connection was served");
    drop(holder);
    let answer = bounded("the waiting connection", LIMIT, waiting)
        .await
        .unwrap();
    assert_eq!(answer.status, 400, "{answer:?}");
}

/// A connection whose request body never ends: the listener cannot drain it.
async fn stuck_request(port: u16) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let head = format!(
        "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
         Accept: application/json, text/event-stream\r\nContent-Length: 1000\r\n\r\n{{"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // Let the proxy start reading it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stream
}

/// SIGTERM lets the calls in flight finish: each is answered with its
/// result, while a session's standalone GET stream (which never ends by
/// itself) does not hold the drain (its timeout here is 10 minutes). rmcp's
/// sessions were cancelled with the shutdown, so every call's stream ended
/// at once with no answer, and the proxy exited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_the_calls_in_flight_and_ends_the_get_streams() {
    let env = [("TOOLWARDEN_HTTP_SHUTDOWN_TIMEOUT", "10m")];
    let Some((mut running, port)) = flaky_proxy(&env).await else {
        return;
    };
    let session = open_session(port).await;
    slow_is_known(port, &session).await;
    let mut get = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let head = format!(
        "GET /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n\
         Mcp-Session-Id: {session}\r\n\r\n"
    );
    get.write_all(head.as_bytes()).await.unwrap();
    let calls: Vec<_> = (1..=3)
        .map(|id| {
            let session = session.clone();
            tokio::spawn(async move {
                post(port, &[("Mcp-Session-Id", &session)], &slow_call(id, 2.0)).await
            })
        })
        .collect();
    // Let the calls reach the server.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let status = running.terminate().await;
    assert!(status.success(), "exit status {status:?}");
    for (call, id) in calls.into_iter().zip(1..) {
        let answer = bounded("a call in flight", LIMIT, call).await.unwrap();
        let message = answer
            .messages()
            .into_iter()
            .find(|m| m["id"] == id)
            .unwrap_or_else(|| panic!("call {id} unanswered: {answer:?}"));
        assert_eq!(message["result"]["isError"], false, "{message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_at_most_its_timeout_and_a_second_signal_exits_at_once() {
    // The drain gives up after http.shutdown_timeout.
    let env = [
        ("TOOLWARDEN_HTTP_SHUTDOWN_TIMEOUT", "1s"),
        ("TOOLWARDEN_HTTP_BODY_READ_TIMEOUT", "10m"),
    ];
    let Some((mut running, port)) = proxy(&[], &env).await else {
        return;
    };
    let _stuck = stuck_request(port).await;
    let status = running.terminate().await;
    assert!(status.success(), "exit status {status:?}");

    // A second signal while the first shutdown waits: exit at once (130).
    let env = [
        ("TOOLWARDEN_HTTP_SHUTDOWN_TIMEOUT", "10m"),
        ("TOOLWARDEN_HTTP_BODY_READ_TIMEOUT", "10m"),
    ];
    let Some((mut running, port)) = proxy(&[], &env).await else {
        return;
    };
    let _stuck = stuck_request(port).await;
    let pid = running.child.id().unwrap();
    support::kill(pid, "TERM");
    let draining = eventually(LIMIT, || {
        let lines = running.stderr_lines();
        async move {
            lines
                .iter()
                .any(|l| l.contains("shutting down"))
                .then_some(())
        }
    })
    .await;
    assert!(draining.is_some(), "{:?}", running.stderr_lines());
    support::kill(pid, "INT");
    let status = bounded(
        "the exit after a second signal",
        LIMIT,
        running.child.wait(),
    )
    .await
    .unwrap();
    assert_eq!(status.code(), Some(130), "{:?}", running.stderr_lines());
}

// ---- In process: what never reaches the upstream, and the bound on other requests.

mod in_process {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use rmcp::model::{
        CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ErrorData,
        ListPromptsResult, ListToolsResult, PaginatedRequestParams, ServerCapabilities,
        ServerConfig,
    };
    use rmcp::service::{RequestContext, RoleServer};

    use rmcp::ServerHandler;
    use serde_json::{json, Value};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio_util::sync::CancellationToken;
    use toolwarden_core::Events;
    use toolwarden_proxy::config::Config;
    use toolwarden_proxy::endpoints::MetricsEndpoints;
    use toolwarden_proxy::stack::SharedState;
    use toolwarden_proxy::Proxy;

    use super::support::{bounded, eventually, LIMIT};

    /// One tool, `echo`, counting its calls; `prompts/list` never answers.
    #[derive(Clone, Default)]
    struct CountingServer {
        calls: Arc<AtomicUsize>,
    }

    impl ServerHandler for CountingServer {
        fn get_info(&self) -> ServerConfig {
            ServerConfig::new(
                ServerCapabilities::builder()
                    .enable_tools()
                    .enable_prompts()
                    .build(),
            )
        }

        async fn list_tools(
            &self,
            _request: Option<PaginatedRequestParams>,
            _context: RequestContext<RoleServer>,
        ) -> Result<ListToolsResult, ErrorData> {
            Ok(super::support::tool_list(&[("echo", "echoes")]))
        }

        async fn call_tool(
            &self,
            _request: CallToolRequestParams,
            _context: RequestContext<RoleServer>,
        ) -> Result<CallToolResponse, ErrorData> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Ok(CallToolResult::success(vec![ContentBlock::text("echoed")]).into())
        }

        async fn list_prompts(
            &self,
            _request: Option<PaginatedRequestParams>,
            _context: RequestContext<RoleServer>,
        ) -> Result<ListPromptsResult, ErrorData> {
            std::future::pending().await
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refused_tool_names_never_reach_the_upstream_and_other_requests_are_bounded() {
        let server = CountingServer::default();
        let target = super::support::in_process_upstream("counting", Arc::default(), {
            let server = server.clone();
            move || server.clone()
        });
        let mut config = Config::default();
        config.limits.request_timeout = Duration::from_millis(300);
        let shared = SharedState::new(Events::new(), MetricsEndpoints::new());
        let proxy = Proxy::new(config, target, shared).unwrap();
        let (client, proxy_side) = tokio::io::duplex(1 << 16);
        let (proxy_in, proxy_out) = tokio::io::split(proxy_side);
        let shutdown = CancellationToken::new();
        let serving = tokio::spawn(toolwarden_proxy::serve_stdio(
            proxy.core(),
            proxy_in,
            proxy_out,
            1 << 20,
            shutdown.clone(),
        ));
        let (read, mut write) = tokio::io::split(client);
        let mut lines = BufReader::new(read).lines();
        let mut request = async |message: Value| -> Value {
            let id = message["id"].clone();
            write
                .write_all(format!("{message}\n").as_bytes())
                .await
                .unwrap();
            loop {
                let line = bounded("an answer", LIMIT, lines.next_line())
                    .await
                    .unwrap()
                    .unwrap();
                let answer: Value = serde_json::from_str(&line).unwrap();
                if answer["id"] == id {
                    return answer;
                }
            }
        };
        let init = request(
            json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "t", "version": "0"}}}),
        )
        .await;
        assert!(init.get("result").is_some(), "{init}");

        let call = |id: i64, name: String| {
            json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                "params": {"name": name, "arguments": {}}})
        };
        // Too long: refused whether or not the catalog is filled.
        let long = request(call(1, "e".repeat(129))).await;
        assert_eq!(long["error"]["code"], -32602, "{long}");
        // 128 bytes is still a name (unknown here, so refused once listed).
        let catalog = proxy.shared().catalog.clone();
        let filled = eventually(LIMIT, || {
            let catalog = catalog.clone();
            async move { (!catalog.is_empty()).then_some(()) }
        })
        .await;
        assert!(filled.is_some(), "the catalog was never filled");
        let unknown = request(call(2, "no_such_tool".into())).await;
        assert_eq!(unknown["error"]["code"], -32602, "{unknown}");
        assert_eq!(
            server.calls.load(Ordering::SeqCst),
            0,
            "a refused name reached the server"
        );
        let echo = request(call(3, "echo".into())).await;
        assert_eq!(echo["result"]["isError"], false, "{echo}");
        assert_eq!(server.calls.load(Ordering::SeqCst), 1);

        // A request other than tools/call the server never answers: -32001
        // after limits.request_timeout.
        let prompts =
            request(json!({"jsonrpc": "2.0", "id": 4, "method": "prompts/list", "params": {}}))
                .await;
        assert_eq!(prompts["error"]["code"], -32001, "{prompts}");

        shutdown.cancel();
        let _ = bounded("serve_stdio after shutdown", LIMIT, serving).await;
        proxy.shutdown().await;
    }
}

/// A raw GET of `path` with `headers`: the status.
async fn get_status(port: u16, path: &str, headers: &[(&str, &str)]) -> u16 {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}Connection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    bounded("an HTTP answer", LIMIT, stream.read_to_end(&mut raw))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&raw);
    text.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_auth_requires_the_token_on_the_metrics_address() {
    let metrics = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics}");
    let env = [("TOOLWARDEN_AUTH_TOKENS", "metrics-secret")];
    let Some((_proxy, _port)) =
        proxy(&["--metrics-addr", &metrics_addr, "--metrics-auth"], &env).await
    else {
        return;
    };
    let up = eventually(LIMIT, || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", metrics))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    assert!(up.is_some(), "the metrics address never listened");
    for path in ["/metrics", "/health", "/circuits"] {
        assert_eq!(get_status(metrics, path, &[]).await, 401, "{path}");
        let token = [("Authorization", "Bearer metrics-secret")];
        assert_eq!(get_status(metrics, path, &token).await, 200, "{path}");
    }
}

/// One request on a kept-alive connection from `source`: its status,
/// the connection left open (the answer is read by its `Content-Length`).
async fn kept_alive(source: Ipv4Addr, port: u16) -> tokio::net::TcpStream {
    let mut stream = connect_from(source, port).await;
    // Malformed JSON-RPC: answered at once, with a length.
    let body = "{}";
    let head = format!(
        "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
         Accept: application/json, text/event-stream\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = bounded("an answer", LIMIT, stream.read(&mut buf))
            .await
            .unwrap();
        assert!(n > 0, "closed before its answer");
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
        if let Some((head, rest)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .expect("an answer with a length");
            if rest.len() >= length {
                assert!(head.starts_with("http/1.1 400"), "{head}");
                return stream;
            }
        }
    }
}

/// [`proxy`] serving at most `max_connections`, with 10 minutes for a
/// request's headers: a connection is closed only to make room.
async fn capped_proxy(max_connections: u16) -> Option<(Proxy, u16)> {
    let max = max_connections.to_string();
    let env = [
        ("TOOLWARDEN_HTTP_MAX_CONNECTIONS", max.as_str()),
        ("TOOLWARDEN_HTTP_HEADER_READ_TIMEOUT", "10m"),
    ];
    proxy(&[], &env).await
}

/// Whether the proxy closed `stream` (read sees its end at once).
async fn closed(stream: &mut tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// One client's kept-alive idle connections at `http.max_connections` do
/// not lock another client out: an idle one of the client holding the
/// most gives way. (Headers may take 10 minutes here: without that, the
/// newcomer waited until one closed, and forever if the client used each
/// now and then.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_holding_every_connection_gives_an_idle_one_up() {
    let Some((_proxy, port)) = capped_proxy(3).await else {
        return;
    };
    let hog = Ipv4Addr::new(127, 0, 0, 2);
    let mut pool = Vec::new();
    for _ in 0..3 {
        pool.push(kept_alive(hog, port).await);
    }
    let other = Ipv4Addr::new(127, 0, 0, 3);
    initialize_from(other, port)
        .await
        .expect("another client is served at the cap");
    let mut gave_way = 0;
    for stream in &mut pool {
        if closed(stream).await {
            gave_way += 1;
        }
    }
    assert_eq!(gave_way, 1, "one of the hog's idle connections gave way");
}

/// Behind one address (a NAT), at `http.max_connections`, a new connection
/// takes the place of the longest idle one once it has sat idle a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_one_address_an_idle_connection_gives_way() {
    let Some((_proxy, port)) = capped_proxy(2).await else {
        return;
    };
    let mut pool = vec![
        kept_alive(LOOPBACK, port).await,
        kept_alive(LOOPBACK, port).await,
    ];
    tokio::time::sleep(Duration::from_millis(1200)).await;
    initialize_from(LOOPBACK, port)
        .await
        .expect("a new connection is served at the cap");
    let mut gave_way = 0;
    for stream in &mut pool {
        if closed(stream).await {
            gave_way += 1;
        }
    }
    assert!(gave_way >= 1, "an idle connection gave way");
}

/// A request of a session closed while it arrives (here by its client's
/// `DELETE` on another connection; the same for one given way at
/// `http.max_sessions`) is answered `404`, the transport's cue to start a
/// new session, or served; never rmcp's `500 Session service terminated`,
/// which clients read as a failed call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_of_a_session_closed_meanwhile_gets_404_not_500() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let Some((_proxy, port)) = flaky_proxy(&[]).await else {
        return;
    };
    let stop = Arc::new(AtomicBool::new(false));
    let current: Arc<Mutex<Vec<Option<String>>>> = Arc::new(Mutex::new(vec![None; 4]));
    let workers: Vec<_> = (0..4)
        .map(|worker| {
            let (stop, current) = (Arc::clone(&stop), Arc::clone(&current));
            tokio::spawn(async move {
                let (mut gone, mut other) = (0u32, Vec::new());
                let mut id = 100;
                while !stop.load(Ordering::Relaxed) {
                    let Some(open) = current.lock().unwrap()[worker].clone() else {
                        let opened = initialize_from(LOOPBACK, port).await.ok();
                        current.lock().unwrap()[worker] = opened;
                        continue;
                    };
                    id += 1;
                    let answer =
                        post(port, &[("Mcp-Session-Id", &open)], &slow_call(id, 0.0)).await;
                    match answer.status {
                        200 => {}
                        404 => {
                            gone += 1;
                            current.lock().unwrap()[worker] = None;
                        }
                        status => other.push((status, answer.body)),
                    }
                }
                (gone, other)
            })
        })
        .collect();
    // The sessions are ended under the calls, one after the other.
    // Sixty of them, however long the sessions take to open (a loaded
    // machine: a fixed number of rounds could end before any was open).
    let closing = async {
        let (mut round, mut deleted) = (0, 0);
        while deleted < 60 {
            round += 1;
            let session = current.lock().unwrap()[round % 4].clone();
            let Some(session) = session else {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            };
            deleted += 1;
            let delete = format!(
                "DELETE /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nMcp-Session-Id: {session}\r\n\
             Connection: close\r\n\r\n"
            );
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            stream.write_all(delete.as_bytes()).await.unwrap();
            let mut raw = Vec::new();
            stream.read_to_end(&mut raw).await.unwrap();
        }
    };
    bounded("sixty sessions ended", LIMIT, closing).await;
    stop.store(true, Ordering::Relaxed);
    let mut gone = 0;
    for worker in workers {
        let (closed, other) = bounded("a busy client", LIMIT, worker).await.unwrap();
        assert!(
            other.is_empty(),
            "answers neither served nor 404: {other:?}"
        );
        gone += closed;
    }
    assert!(gone > 0, "no session was closed under a call");
}

/// Connections that never send a request, opened past
/// `http.max_connections`, do not lock other clients out: a newcomer
/// waiting at the bound looks again, every 100 ms, for one that has sat
/// idle a second. (It looked once: every slot stayed held until the
/// header timeout, 10 minutes here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_past_the_cap_give_way_to_a_client() {
    let Some((_proxy, port)) = capped_proxy(3).await else {
        return;
    };
    let silent = Ipv4Addr::new(127, 0, 0, 2);
    let mut held = Vec::new();
    for _ in 0..6 {
        held.push(connect_from(silent, port).await);
    }
    let other = Ipv4Addr::new(127, 0, 0, 3);
    initialize_from(other, port)
        .await
        .expect("a client is served past the silent connections");
}

/// SIGTERM does not wait for a connection whose request head is half
/// sent (nothing is in progress on it): it held the drain to its timeout,
/// or the header timeout (both 10 minutes here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_a_half_sent_request_head() {
    let env = [
        ("TOOLWARDEN_HTTP_SHUTDOWN_TIMEOUT", "10m"),
        ("TOOLWARDEN_HTTP_HEADER_READ_TIMEOUT", "10m"),
    ];
    let Some((mut running, port)) = proxy(&[], &env).await else {
        return;
    };
    let mut half = connect_from(LOOPBACK, port).await;
    half.write_all(format!("POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n").as_bytes())
        .await
        .unwrap();
    // Let the proxy start reading it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = running.terminate().await;
    assert!(status.success(), "exit status {status:?}");
}
