//! Shared helpers of the proxy's integration and end-to-end tests: finding
//! the real components (the `TOOLWARDEN_*` variables `scripts/test` exports),
//! running the `toolwarden` binary, a raw JSON-RPC client over its stdio, a
//! raw HTTP GET and POST, and bounds on every wait so no test can hang.

#![allow(dead_code)] // each test binary uses a different subset
#![allow(unreachable_pub)] // a module of each test binary, not an API
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test] fns

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// Where a real component is, from its `TOOLWARDEN_*` variable.
///
/// When the variable is unset or points nowhere: with `TOOLWARDEN_E2E=required`
/// (the full run, `scripts/test`) the test fails loudly; otherwise it prints
/// why and the caller skips. A full run never passes without the component.
/// (The same convention as the root package's `tests/support`.)
pub fn component(var: &str) -> Option<PathBuf> {
    let found = std::env::var_os(var)
        .map(PathBuf::from)
        .filter(|p| p.exists());
    if found.is_none() {
        let why = format!(
            "{var} is not set to an existing path: run scripts/install-components and \
             scripts/test (or export {var})"
        );
        if std::env::var("TOOLWARDEN_E2E").as_deref() == Ok("required") {
            panic!("required end-to-end component missing: {why}");
        }
        eprintln!("skipping: {why}");
    }
    found
}

/// The flaky stdio server script shipped in the repository's `tests/e2e/`.
pub fn flaky_server_script() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/e2e/flaky_server.py"
    ))
}

/// The flaky server (see [`flaky_server_script`]) over Streamable HTTP at
/// `http://127.0.0.1:PORT/mcp`, run by `python` with `env`; killed on drop.
pub struct FlakyHttp {
    child: Child,
    pub port: u16,
}

impl Drop for FlakyHttp {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl FlakyHttp {
    /// Starts it on a free port and waits until it listens.
    pub async fn start(python: &std::path::Path, env: &[(&str, &str)]) -> FlakyHttp {
        let port = free_port();
        let child = Command::new(python)
            .arg(flaky_server_script())
            .args(["--http", &port.to_string()])
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("the flaky server starts");
        wait_listening(port, "the flaky server").await;
        FlakyHttp { child, port }
    }
}

/// Writes `contents` to the file `name` in a directory of this test
/// process's own (`toolwarden-<tag>-<pid>` under the temp dir).
pub fn write_temp(tag: &str, name: &str, contents: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("toolwarden-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// A free loopback port (bound, read, released), never one this process
/// was handed before: two calls in a row could get the same port back (a
/// test's metrics port and its listen port were once one, and the proxy
/// could not bind the second).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut given = GIVEN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Waits (up to [`LIMIT`]) until something listens on loopback `port`;
/// fails the test naming `what` if nothing does.
pub async fn wait_listening(port: u16, what: &str) {
    let up = eventually(LIMIT, || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    assert!(up.is_some(), "{what} never listened on {port}");
}

/// Runs `f` until it returns `Some`, up to `limit`; a hang guard, not a timing claim.
pub async fn eventually<T, F, Fut>(limit: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Bounds a future: fails the test instead of hanging.
pub async fn bounded<F: std::future::Future>(what: &str, limit: Duration, f: F) -> F::Output {
    match tokio::time::timeout(limit, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not finish within {limit:?}: it hung"),
    }
}

/// The generous bound on one step of an end-to-end test.
pub const LIMIT: Duration = Duration::from_secs(30);

/// The `toolwarden` binary, running; killed on drop. Its stderr is kept
/// (and printed if the test fails while it is alive).
pub struct Proxy {
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    pub stdout: Option<BufReader<ChildStdout>>,
    pub stderr: Arc<Mutex<Vec<String>>>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            for line in self.stderr.lock().unwrap().iter() {
                eprintln!("toolwarden stderr: {line}");
            }
        }
    }
}

impl Proxy {
    /// Starts `toolwarden <args>`, with `RUST_LOG=info` unless set in `env`.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Proxy {
        let mut command = Command::new(env!("CARGO_BIN_EXE_toolwarden"));
        command
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("the toolwarden binary starts");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().map(BufReader::new);
        let stderr = Arc::new(Mutex::new(Vec::new()));
        if let Some(err) = child.stderr.take() {
            let sink = Arc::clone(&stderr);
            tokio::spawn(async move {
                let mut lines = BufReader::new(err).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    sink.lock().unwrap().push(line);
                }
            });
        }
        Proxy {
            child,
            stdin,
            stdout,
            stderr,
        }
    }

    /// Writes raw bytes to the proxy's stdin.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin is open");
        stdin.write_all(bytes).await.unwrap();
        stdin.flush().await.unwrap();
    }

    /// Writes one JSON-RPC message.
    pub async fn send(&mut self, message: &Value) {
        let mut line = message.to_string().into_bytes();
        line.push(b'\n');
        self.send_raw(&line).await;
    }

    /// Reads the next line of stdout as JSON (bounded).
    pub async fn recv(&mut self) -> Value {
        let stdout = self.stdout.as_mut().expect("stdout is open");
        let mut line = String::new();
        let n = bounded(
            "reading the proxy's stdout",
            LIMIT,
            stdout.read_line(&mut line),
        )
        .await
        .unwrap();
        assert!(n > 0, "the proxy closed stdout");
        serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("stdout is not JSON-RPC: {e}: {line:?}"))
    }

    /// Reads until the response to `id`; returns it and the notifications
    /// seen before it. Server→client requests are answered with an error.
    pub async fn response(&mut self, id: &Value) -> (Value, Vec<Value>) {
        let mut notifications = Vec::new();
        loop {
            let message = self.recv().await;
            if message.get("method").is_some() {
                if message.get("id").is_some() {
                    let refusal = json!({"jsonrpc": "2.0", "id": message["id"], "error": {"code": -32601, "message": "not supported by the test client"}});
                    self.send(&refusal).await;
                } else {
                    notifications.push(message);
                }
                continue;
            }
            if &message["id"] == id {
                return (message, notifications);
            }
        }
    }

    /// Sends a request and waits for its response.
    pub async fn request(&mut self, id: i64, method: &str, params: Value) -> Value {
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
            .await;
        self.response(&json!(id)).await.0
    }

    /// `initialize` (empty capabilities) then `notifications/initialized`;
    /// returns the initialize result.
    pub async fn initialize(&mut self) -> Value {
        let result = self
            .request(
                0,
                "initialize",
                json!({
                    "protocolVersion": "2025-06-18",
                    "capabilities": {},
                    "clientInfo": {"name": "toolwarden-e2e", "version": "0"},
                }),
            )
            .await;
        assert!(
            result.get("result").is_some(),
            "initialize failed: {result}"
        );
        self.send(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .await;
        result["result"].clone()
    }

    /// `tools/call`.
    pub async fn call(&mut self, id: i64, tool: &str, arguments: Value) -> Value {
        self.request(
            id,
            "tools/call",
            json!({"name": tool, "arguments": arguments}),
        )
        .await
    }

    /// Closes stdin and waits (bounded) for the exit status.
    pub async fn close_and_wait(&mut self) -> std::process::ExitStatus {
        drop(self.stdin.take());
        bounded(
            "the proxy's exit after stdin closed",
            LIMIT,
            self.child.wait(),
        )
        .await
        .unwrap()
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("the proxy is running");
        kill(pid, "TERM");
        bounded("the proxy's exit after SIGTERM", LIMIT, self.child.wait())
            .await
            .unwrap()
    }

    /// The stderr lines so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }
}

/// Sends a signal with kill(1) (no libc binding needed).
pub fn kill(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("kill(1) runs");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// Whether a process is alive (kill -0).
pub fn alive(pid: u32) -> bool {
    std::process::Command::new("kill")
        .arg("-0")
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A raw HTTP/1.1 GET on loopback: the status and the body.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    exchange(stream, &request).await
}

/// A raw HTTP/1.1 POST of a JSON body, as an MCP client sends it.
pub async fn http_post(port: u16, path: &str, body: &str) -> Option<(u16, String)> {
    http_post_with(port, path, &[], body).await
}

/// [`http_post`] with extra `headers` (name, value).
pub async fn http_post_with(
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<(u16, String)> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
         Accept: application/json, text/event-stream\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    exchange(stream, &request).await
}

/// Sends `request` on `stream` and reads the answer to its end: the status
/// and the body (dechunked).
async fn exchange(mut stream: tokio::net::TcpStream, request: &str) -> Option<(u16, String)> {
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut raw = Vec::new();
    bounded("an HTTP answer", LIMIT, stream.read_to_end(&mut raw))
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Some((status, body))
}

/// The body of a chunked HTTP/1.1 answer, its chunks joined.
pub fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// `/health` as JSON, when it answers.
pub async fn health(port: u16) -> Option<(u16, Value)> {
    let (status, body) = http_get(port, "/health").await?;
    Some((status, serde_json::from_str(&body).ok()?))
}

/// A `tools/list` answer naming `tools` (name, description), each taking
/// any object: what the in-process test servers list.
pub fn tool_list(tools: &[(&str, &str)]) -> rmcp::model::ListToolsResult {
    let schema = Arc::new(json!({"type": "object"}).as_object().cloned().unwrap());
    rmcp::model::ListToolsResult::with_all_items(
        tools
            .iter()
            .map(|(name, about)| {
                rmcp::model::Tool::new(name.to_string(), about.to_string(), Arc::clone(&schema))
            })
            .collect(),
    )
}

/// An upstream in this process: each connection (and reconnection) is
/// served by a fresh server from `make` over an in-memory pipe, until the
/// proxy closes it; `open` counts the connections being served.
pub fn in_process_upstream<S, F>(
    name: &str,
    open: Arc<std::sync::atomic::AtomicUsize>,
    make: F,
) -> toolwarden_proxy::UpstreamTarget
where
    S: rmcp::ServerHandler,
    F: Fn() -> S + Send + Sync + 'static,
{
    use rmcp::ServiceExt as _;
    use std::sync::atomic::Ordering;
    toolwarden_proxy::UpstreamTarget::InProcess(toolwarden_proxy::InProcessServer::new(
        name,
        move || {
            let (client, server_io) = tokio::io::duplex(1 << 16);
            let (read, write) = tokio::io::split(server_io);
            let server = make();
            let open = Arc::clone(&open);
            tokio::spawn(async move {
                open.fetch_add(1, Ordering::SeqCst);
                let transport =
                    rmcp::transport::async_rw::AsyncRwTransport::new_server(read, write);
                if let Ok(running) = server.serve(transport).await {
                    let _ = running.waiting().await;
                }
                open.fetch_sub(1, Ordering::SeqCst);
            });
            client
        },
    ))
}

/// One HTTP/1.1 connection kept alive, written and read by hand the way a
/// plain keep-alive client does: a request, then its whole (chunked or
/// sized) answer, then the next request on the same socket.
pub struct KeepAlive {
    stream: tokio::net::TcpStream,
    port: u16,
    session: Option<String>,
    /// The `MCP-Protocol-Version` sent with the session's requests.
    version: &'static str,
}

impl KeepAlive {
    pub async fn connect(port: u16) -> KeepAlive {
        let stream = eventually(LIMIT, || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
        })
        .await
        .expect("the proxy listens");
        KeepAlive {
            stream,
            port,
            session: None,
            version: "2025-06-18",
        }
    }

    /// The session this client's requests are sent in.
    #[must_use]
    pub fn session(&self) -> Option<String> {
        self.session.clone()
    }

    /// Sends this client's requests in `session` (another connection's).
    #[must_use]
    pub fn in_session(mut self, session: String) -> KeepAlive {
        self.session = Some(session);
        self
    }

    /// What arrives on the connection within `within` of each read (raw).
    pub async fn read_for(&mut self, within: Duration) -> Vec<u8> {
        let mut body = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        while let Ok(Ok(n)) = tokio::time::timeout(within, self.stream.read(&mut buf)).await {
            if n == 0 {
                break;
            }
            body.extend_from_slice(&buf[..n]);
        }
        body
    }

    /// Sends `version` as the session's `MCP-Protocol-Version` (2025-06-18
    /// unless told).
    #[must_use]
    pub fn with_version(mut self, version: &'static str) -> KeepAlive {
        self.version = version;
        self
    }

    /// `initialize` (at the session's version) and
    /// `notifications/initialized`: a session, ready for calls. The body of
    /// the answer to `initialize`.
    pub async fn open_session(&mut self) -> String {
        self.open_session_with(serde_json::json!({})).await
    }

    /// [`open_session`](Self::open_session) of a client with `capabilities`.
    pub async fn open_session_with(&mut self, capabilities: Value) -> String {
        let (status, body) = self
            .post_with(
                &[],
                &serde_json::json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
                    "protocolVersion": self.version, "capabilities": capabilities,
                    "clientInfo": {"name": "keep-alive", "version": "0"},
                }}),
            )
            .await;
        assert!(status.contains("200"), "{status}");
        assert!(self.session.is_some(), "initialize opened no session");
        self.post(&serde_json::json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .await;
        body
    }

    /// Opens the session's GET stream: its head (lower-cased), and what of
    /// its body came within `within` (raw, chunked).
    pub async fn get_stream(&mut self, within: Duration) -> (String, Vec<u8>) {
        self.get_stream_with(&[], within).await
    }

    /// [`get_stream`](Self::get_stream) with `headers` too (`Last-Event-ID`).
    pub async fn get_stream_with(
        &mut self,
        headers: &[(&str, &str)],
        within: Duration,
    ) -> (String, Vec<u8>) {
        let session = self.session.clone().expect("a session");
        let mut request = format!(
            "GET /mcp HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nAccept: text/event-stream\r\n\
             Mcp-Session-Id: {session}\r\nMcp-Protocol-Version: {}\r\n",
            self.port, self.version
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        self.stream.write_all(request.as_bytes()).await.unwrap();
        let (head, mut body) = self.read_head().await;
        body.extend(self.read_for(within).await);
        (head, body)
    }

    /// Writes a POST of `body` (in the session) and reads only the
    /// answer's head: its status line and headers, lower-cased, and
    /// whatever of the body came with them.
    pub async fn post_for_head(&mut self, body: &Value) -> (String, Vec<u8>) {
        let request = self.request(&[], &body.to_string());
        self.stream.write_all(request.as_bytes()).await.unwrap();
        self.read_head().await
    }

    /// A POST of `body` to /mcp: the session's headers, `headers`, `body`.
    fn request(&self, headers: &[(&str, &str)], body: &str) -> String {
        let mut head = format!(
            "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\n\
             Accept: application/json, text/event-stream\r\nContent-Length: {}\r\n",
            self.port,
            body.len()
        );
        if let Some(session) = &self.session {
            head.push_str(&format!(
                "Mcp-Session-Id: {session}\r\nMcp-Protocol-Version: {}\r\n",
                self.version
            ));
        }
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        head.push_str(body);
        head
    }

    /// Reads up to the end of an answer's head: the head (lower-cased) and
    /// the bytes read past it.
    async fn read_head(&mut self) -> (String, Vec<u8>) {
        let mut answer = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        let end_of_head = loop {
            let n = self.stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "the proxy closed the connection");
            answer.extend_from_slice(&buf[..n]);
            if let Some(at) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
        };
        let head = String::from_utf8_lossy(&answer[..end_of_head]).to_lowercase();
        (head, answer.split_off(end_of_head))
    }

    /// POSTs `body` to /mcp and reads the whole answer; its status line.
    pub async fn post(&mut self, body: &Value) -> String {
        self.post_with(&[], body).await.0
    }

    /// POSTs `body` to /mcp with `headers` besides the session's, and reads
    /// the whole answer: its status line and its body (dechunked).
    pub async fn post_with(&mut self, headers: &[(&str, &str)], body: &Value) -> (String, String) {
        let request = self.request(headers, &body.to_string());
        self.stream.write_all(request.as_bytes()).await.unwrap();
        let (head, mut answer) = self.read_head().await;
        let mut buf = [0u8; 16 * 1024];
        if let Some(line) = head.lines().find(|l| l.starts_with("mcp-session-id:")) {
            self.session = Some(line["mcp-session-id:".len()..].trim().to_owned());
        }
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|n| n.trim().parse::<usize>().ok());
        loop {
            let done = match length {
                Some(n) => answer.len() >= n,
                None => answer.ends_with(b"0\r\n\r\n"),
            };
            if done {
                break;
            }
            let n = self.stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "the proxy closed the connection mid-answer");
            answer.extend_from_slice(&buf[..n]);
        }
        let status = head.lines().next().unwrap_or_default().to_owned();
        let body = String::from_utf8_lossy(&answer).into_owned();
        let body = match length {
            Some(_) => body,
            None => dechunk(&body),
        };
        (status, body)
    }
}

/// A `tools/call` of `tool` as a client of the 2026-07-28 protocol sends
/// each of its requests, without a session: `version` in the
/// `MCP-Protocol-Version` header and in the request's `_meta`, with the
/// client's `capabilities` and identity, and the method and tool named in
/// headers. That is what makes rmcp serve it without a session, through a
/// one-shot transport. The body and the headers.
pub fn sessionless_call<'a>(
    version: &'a str,
    id: i64,
    tool: &'a str,
    arguments: Value,
    capabilities: Value,
) -> (Value, [(&'static str, &'a str); 3]) {
    let body = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {
        "name": tool,
        "arguments": arguments,
        "_meta": {
            "io.modelcontextprotocol/protocolVersion": version,
            "io.modelcontextprotocol/clientCapabilities": capabilities,
            "io.modelcontextprotocol/clientInfo": {"name": "sessionless", "version": "0"},
        },
    }});
    let headers = [
        ("MCP-Protocol-Version", version),
        ("Mcp-Method", "tools/call"),
        ("Mcp-Name", tool),
    ];
    (body, headers)
}

/// The proxy's stdio session loop over `core`, on an in-memory pipe: what
/// a client writes, the lines it reads, the loop's task and what stops it.
pub struct InMemoryStdio {
    pub input: tokio::io::WriteHalf<tokio::io::DuplexStream>,
    pub output: tokio::io::Lines<BufReader<tokio::io::ReadHalf<tokio::io::DuplexStream>>>,
    pub serving: tokio::task::JoinHandle<std::io::Result<()>>,
    pub shutdown: tokio_util::sync::CancellationToken,
}

/// Serves `core` as `toolwarden` serves its stdin and stdout, on an
/// in-memory pipe, with lines of at most 4 096 bytes.
pub fn serve_stdio_in_memory(core: Arc<toolwarden_proxy::ProxyCore>) -> InMemoryStdio {
    let (client, proxy_side) = tokio::io::duplex(1 << 16);
    let (proxy_in, proxy_out) = tokio::io::split(proxy_side);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let serving = tokio::spawn(toolwarden_proxy::serve_stdio(
        core,
        proxy_in,
        proxy_out,
        4096,
        shutdown.clone(),
    ));
    let (read, input) = tokio::io::split(client);
    InMemoryStdio {
        input,
        output: BufReader::new(read).lines(),
        serving,
        shutdown,
    }
}

/// Serves `router` on a loopback port until `shutdown` (graceful): the URL
/// of its `/mcp`.
pub async fn serve_on_loopback(
    router: axum::Router,
    shutdown: tokio_util::sync::CancellationToken,
) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    format!("http://127.0.0.1:{port}/mcp")
}

/// The facts of a failure the stack rendered as a tool result: in
/// `structuredContent.toolwarden`, or in `_meta["toolwarden/failure"]` for a
/// tool that declares an `outputSchema` (`Value::Null` when neither).
#[must_use]
#[allow(dead_code)] // not every test file renders failures
pub fn failure_facts(result: &Value) -> &Value {
    let structured = &result["structuredContent"]["toolwarden"];
    if structured.is_null() {
        &result["_meta"]["toolwarden/failure"]
    } else {
        structured
    }
}
