//! HTTPS upstreams and the upstream's secrets, with the built binary in front
//! of a local HTTPS MCP server (rmcp's Streamable HTTP service behind rustls,
//! its certificate issued by a CA made in the test with rcgen): a call goes
//! through with `--upstream-ca-file` and fails without it (the TLS error in
//! the log, a generic text to the client); a header's token from the
//! environment reaches the server and nothing the proxy writes or serves
//! shows it, nor a URL's query or userinfo. Runs without any external
//! component.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ErrorData,
    ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig,
};
use rmcp::service::{RequestContext, RoleServer};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::ServerHandler;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use support::{eventually, free_port, health, http_get, Proxy, LIMIT};

/// The token the proxy is given in its environment for the upstream header.
const TOKEN: &str = "tw-test-token-5f1c9a";
/// A secret in the upstream URL's query.
const QUERY_SECRET: &str = "tw-query-secret-77d2";
/// A password in the upstream URL's userinfo.
const PASSWORD: &str = "tw-password-c41e";

/// An MCP server with one tool, `echo`.
#[derive(Clone)]
struct EchoServer;

impl ServerHandler for EchoServer {
    fn get_info(&self) -> ServerConfig {
        let mut info = ServerConfig::new(ServerCapabilities::builder().enable_tools().build());
        info.server_info = rmcp::model::Implementation::new("tls-test", "1.0");
        info
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(support::tool_list(&[("echo", "echo")]))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let message = request
            .arguments
            .as_ref()
            .and_then(|a| a.get("message"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        Ok(CallToolResult::success(vec![ContentBlock::text(format!("Echo: {message}"))]).into())
    }
}

/// TLS over a TCP listener, for `axum::serve`. A failed handshake (a client
/// that does not trust the certificate) is skipped.
struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((stream, addr)) = self.tcp.accept().await else {
                continue;
            };
            let handshake = self.acceptor.accept(stream);
            if let Ok(Ok(tls)) = tokio::time::timeout(Duration::from_secs(5), handshake).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// The HTTPS upstream: its port, the CA's certificate (PEM) in a file, the
/// `Authorization` headers it was sent.
struct TlsUpstream {
    port: u16,
    ca_file: PathBuf,
    dir: PathBuf,
    authorization: Arc<Mutex<Vec<String>>>,
    shutdown: CancellationToken,
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn tls_upstream(name: &str) -> TlsUpstream {
    // A CA, and a certificate for 127.0.0.1 and localhost issued by it.
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "toolwarden test CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf_params =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = leaf_params.signed_by(&leaf_key, &*ca).unwrap();

    let dir = std::env::temp_dir().join(format!("tw-tls-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();

    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        )
        .unwrap();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];

    let shutdown = CancellationToken::new();
    let service = StreamableHttpService::new(
        || Ok(EchoServer),
        Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default().with_cancellation_token(shutdown.child_token()),
    );
    let authorization = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&authorization);
    let router =
        axum::Router::new()
            .nest_service("/mcp", service)
            .layer(axum::middleware::from_fn(
                move |request: axum::extract::Request, next: axum::middleware::Next| {
                    if let Some(value) = request.headers().get("authorization") {
                        seen.lock()
                            .unwrap()
                            .push(value.to_str().unwrap_or_default().to_owned());
                    }
                    next.run(request)
                },
            ));
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = tcp.local_addr().unwrap().port();
    let listener = TlsListener {
        tcp,
        acceptor: TlsAcceptor::from(Arc::new(tls)),
    };
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
    });
    TlsUpstream {
        port,
        ca_file,
        dir,
        authorization,
        shutdown,
    }
}

fn text_of(response: &Value) -> String {
    response["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Fails if `text` (what `place` showed) holds any secret.
fn assert_no_secret(place: &str, text: &str) {
    for secret in [TOKEN, QUERY_SECRET, PASSWORD] {
        assert!(
            !text.contains(secret),
            "{place} shows a secret ({secret}): {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_gets_the_header_token_and_no_secret_is_shown() {
    let upstream = tls_upstream("ok").await;
    let config = upstream.dir.join("toolwarden.toml");
    std::fs::write(
        &config,
        "[upstream]\nheaders = { Authorization = \"Bearer ${TW_TEST_UPSTREAM_TOKEN}\" }\n",
    )
    .unwrap();
    let metrics = free_port();
    let url = format!(
        "https://127.0.0.1:{}/mcp?api_key={QUERY_SECRET}",
        upstream.port
    );
    let mut proxy = Proxy::start(
        &[
            "run",
            "--config",
            config.to_str().unwrap(),
            "--upstream-url",
            &url,
            "--upstream-ca-file",
            upstream.ca_file.to_str().unwrap(),
            "--metrics-addr",
            &format!("127.0.0.1:{metrics}"),
        ],
        &[("RUST_LOG", "trace"), ("TW_TEST_UPSTREAM_TOKEN", TOKEN)],
    );
    let mut answers = Vec::new();
    answers.push(proxy.initialize().await.to_string());
    let tools = proxy.request(1, "tools/list", json!({})).await;
    assert_eq!(tools["result"]["tools"][0]["name"], "echo", "{tools}");
    let call = proxy.call(2, "echo", json!({"message": "over TLS"})).await;
    assert_eq!(text_of(&call), "Echo: over TLS", "{call}");
    let unknown = proxy.call(3, "nope", json!({})).await;
    answers.extend([tools.to_string(), call.to_string(), unknown.to_string()]);

    // The token reached the server, on every request.
    let seen = upstream.authorization.lock().unwrap().clone();
    assert!(!seen.is_empty(), "the server saw no Authorization header");
    assert!(
        seen.iter().all(|v| v == &format!("Bearer {TOKEN}")),
        "{seen:?}"
    );

    let (status, report) = health(metrics).await.expect("/health answers");
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        report["upstream"]["target"],
        format!("https://127.0.0.1:{}/mcp", upstream.port),
        "{report}"
    );
    assert_no_secret("/health", &report.to_string());
    for path in ["/circuits", "/metrics"] {
        let (_, body) = http_get(metrics, path).await.expect("the route answers");
        assert_no_secret(path, &body);
    }
    for answer in &answers {
        assert_no_secret("an answer to the client", answer);
    }
    proxy.close_and_wait().await;
    let stderr = proxy.stderr_lines();
    assert!(
        stderr.iter().any(|l| l.contains("TRACE")),
        "RUST_LOG=trace logs at trace: {stderr:?}"
    );
    for line in &stderr {
        assert_no_secret("the proxy's stderr", line);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_ca_file_the_tls_error_is_logged_and_the_client_gets_a_generic_text() {
    let upstream = tls_upstream("no-ca").await;
    let url = format!(
        "https://user:{PASSWORD}@127.0.0.1:{}/mcp?api_key={QUERY_SECRET}",
        upstream.port
    );
    let metrics = free_port();
    let mut proxy = Proxy::start(
        &[
            "run",
            "--upstream-url",
            &url,
            "--metrics-addr",
            &format!("127.0.0.1:{metrics}"),
        ],
        &[("RUST_LOG", "trace")],
    );
    // Shown redacted even before any client connected.
    let (_, report) = eventually(LIMIT, || health(metrics))
        .await
        .expect("/health answers");
    assert_eq!(
        report["upstream"]["target"],
        format!("https://127.0.0.1:{}/mcp", upstream.port),
        "{report}"
    );

    let init = proxy
        .request(
            0,
            "initialize",
            json!({"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}),
        )
        .await;
    assert_eq!(init["error"]["code"], -32000, "{init}");
    let message = init["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("the upstream server failed: see the proxy's log"),
        "{message}"
    );
    assert!(!message.to_lowercase().contains("certificate"), "{message}");
    assert_no_secret("the initialize error", &init.to_string());

    // The proxy's own line says why, with the TLS cause.
    let logged = eventually(LIMIT, || {
        let lines = proxy.stderr_lines();
        async move {
            lines
                .into_iter()
                .find(|l| l.contains("upstream unavailable") && l.contains("UnknownIssuer"))
        }
    })
    .await
    .expect("the TLS failure is in the log");
    assert!(
        logged.contains(&format!("https://127.0.0.1:{}/mcp", upstream.port)),
        "{logged}"
    );
    let (_, report) = health(metrics).await.expect("/health answers");
    assert_no_secret("/health", &report.to_string());
    proxy.close_and_wait().await;
    for line in &proxy.stderr_lines() {
        assert_no_secret("the proxy's stderr", line);
    }
    assert!(
        upstream.authorization.lock().unwrap().is_empty(),
        "nothing reached the server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_header_variable_is_a_config_error_naming_the_header() {
    let dir = std::env::temp_dir().join(format!("tw-tls-missing-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("toolwarden.toml");
    std::fs::write(
        &config,
        "[upstream]\nheaders = { Authorization = \"Bearer ${TW_TEST_NOT_SET_ANYWHERE}\" }\n",
    )
    .unwrap();
    let mut proxy = Proxy::start(
        &[
            "run",
            "--config",
            config.to_str().unwrap(),
            "--upstream-url",
            "https://127.0.0.1:9/mcp",
        ],
        &[],
    );
    let status = proxy.close_and_wait().await;
    assert_eq!(status.code(), Some(2));
    let stderr = proxy.stderr_lines().join("\n");
    assert!(
        stderr.contains("upstream.headers.Authorization"),
        "{stderr}"
    );
    assert!(
        stderr.contains("TW_TEST_NOT_SET_ANYWHERE is not set"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
