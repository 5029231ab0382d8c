//! The HTTP client of a Streamable HTTP(S) upstream: reqwest with rustls
//! (system roots through the platform verifier, plus `upstream.ca_file`),
//! the configured headers, and redirects kept to the same origin.

use std::collections::HashMap;
use std::sync::Arc;

use futures::stream::BoxStream;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use rmcp::model::{ClientJsonRpcMessage, JsonRpcError, ServerJsonRpcMessage};
use rmcp::transport::streamable_http_client::{
    SseError, StreamableHttpClient, StreamableHttpError, StreamableHttpPostResponse,
};
use toolwarden_core::ConfigError;

use crate::config::{resolve_headers, UpstreamConfig};

/// Redirects followed at most (as rmcp's own client).
const MAX_REDIRECTS: usize = 10;

/// The client for an HTTP(S) upstream, and the header values it sends (for
/// the [`Redactor`](crate::redact::Redactor)). Variables are looked up by
/// `env`; files (`ca_file`, `@file:` headers) are read now. Errors name the
/// key (`upstream.ca_file`, `upstream.headers.Authorization`) and hold no
/// secret.
pub(crate) fn http_client(
    config: &UpstreamConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(reqwest::Client, Vec<String>), ConfigError> {
    let mut headers = HeaderMap::new();
    let mut secrets = Vec::new();
    for (name, value) in resolve_headers(&config.headers, env)? {
        if let Ok(text) = value.to_str() {
            secrets.push(text.to_owned());
        }
        headers.insert(name, value);
    }
    let mut builder = reqwest::Client::builder().default_headers(headers);
    // Idle connections are kept for `http_keep_alive` only (rmcp's own
    // client keeps none: a new TCP connection, and TLS handshake, for every
    // request). Shorter than servers' keep-alive timeouts, so a server does
    // not close one as it is reused; one it closed (a restarted server) is
    // found closed by the pool and not used.
    builder = if config.http_keep_alive.is_zero() {
        builder.pool_max_idle_per_host(0)
    } else {
        builder.pool_idle_timeout(config.http_keep_alive)
    };
    let mut builder = builder
        // Redirects only within the origin, so the headers never reach
        // another host.
        .redirect(reqwest::redirect::Policy::custom(|attempt| {
            let same_origin = attempt
                .previous()
                .first()
                .is_some_and(|first| first.origin() == attempt.url().origin());
            if attempt.previous().len() > MAX_REDIRECTS {
                attempt.error("too many redirects")
            } else if same_origin {
                attempt.follow()
            } else {
                attempt.stop()
            }
        }));
    if let Some(path) = &config.ca_file {
        let key = "upstream.ca_file";
        let pem = std::fs::read(path)
            .map_err(|e| ConfigError::new(key, format!("cannot read {}: {e}", path.display())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            ConfigError::new(key, format!("{} is not a PEM file: {e}", path.display()))
        })?;
        if certs.is_empty() {
            return Err(ConfigError::new(
                key,
                format!("{} holds no PEM certificate", path.display()),
            ));
        }
        builder = builder.tls_certs_merge(certs);
    }
    let client = builder
        .build()
        .map_err(|e| ConfigError::new("upstream", format!("cannot set up the HTTP client: {e}")))?;
    Ok((client, secrets))
}

/// The process's environment, for [`http_client`].
pub(crate) fn process_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HeaderTemplate;

    #[test]
    fn a_bad_ca_file_or_a_missing_variable_is_a_config_error_naming_the_key() {
        let mut config = UpstreamConfig {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..UpstreamConfig::default()
        };
        let e = http_client(&config, &|_| None).unwrap_err();
        assert_eq!(e.field(), "upstream.ca_file");

        let not_pem = std::env::temp_dir().join(format!("tw-not-pem-{}", std::process::id()));
        std::fs::write(&not_pem, "hello").unwrap();
        config.ca_file = Some(not_pem.clone());
        let e = http_client(&config, &|_| None).unwrap_err();
        assert_eq!(e.field(), "upstream.ca_file");
        assert!(e.reason().contains("no PEM certificate"), "{e}");
        std::fs::remove_file(&not_pem).unwrap();

        config.ca_file = None;
        config.headers.insert(
            "Authorization".into(),
            HeaderTemplate::new("Bearer ${TW_TEST_TOKEN}"),
        );
        let e = http_client(&config, &|_| None).unwrap_err();
        assert_eq!(e.field(), "upstream.headers.Authorization");
        assert!(e.reason().contains("TW_TEST_TOKEN is not set"), "{e}");
        let (_, secrets) =
            http_client(&config, &|_| Some("tok-value".to_owned())).expect("a client");
        assert_eq!(secrets, ["Bearer tok-value"]);
    }
}

/// rmcp's reqwest client, watched for a lost server session: rmcp keeps
/// its Streamable HTTP connection open whatever happens to the server,
/// so without this a server that died, or restarted and forgot the
/// session, was never reconnected to. Each request then waited for its
/// timeout, and `/health` said "up".
///
/// [`lost`](Self::lost) is notified (the supervisor then ends the
/// connection and reconnects, with its backoff) when:
///
/// - a request of the session is answered with a JSON-RPC error without an
///   id: what servers built on the TypeScript SDK (server-everything)
///   answer a session they do not know, with a 400. rmcp would hand it to
///   nobody (no request has that id); the request fails at once;
/// - the server does not accept connections (it is down);
/// - a stream of the session is refused with 400 or 404 (resuming the
///   stream of a call in flight, after the server lost the session).
///
/// A 404 to a POST is left to rmcp, which opens a new session itself.
#[derive(Clone)]
pub(crate) struct WatchedClient {
    client: reqwest::Client,
    lost: std::sync::Arc<tokio::sync::Notify>,
}

type HttpError = StreamableHttpError<reqwest::Error>;
type PostResult = Result<StreamableHttpPostResponse, HttpError>;
type SseStream = BoxStream<'static, Result<sse_stream::Sse, SseError>>;

impl WatchedClient {
    /// `client`, watched; notified through the second value.
    pub(crate) fn new(client: reqwest::Client) -> (Self, std::sync::Arc<tokio::sync::Notify>) {
        let lost = std::sync::Arc::default();
        let watched = WatchedClient {
            client,
            lost: std::sync::Arc::clone(&lost),
        };
        (watched, lost)
    }

    fn lose(&self, why: &str) {
        tracing::warn!(why, "the upstream's HTTP session is lost; reconnecting");
        // A permit is kept should the supervisor not be waiting yet.
        self.lost.notify_one();
    }

    fn watch_post(&self, request_in_session: bool, result: PostResult) -> PostResult {
        match &result {
            Ok(StreamableHttpPostResponse::Json(
                ServerJsonRpcMessage::Error(JsonRpcError { id: None, .. }),
                _,
            )) if request_in_session => {
                self.lose(
                    "the server answered a request of the session with an error for no request",
                );
                return Err(StreamableHttpError::UnexpectedServerResponse(
                    "the server answered with an error that names no request (it no longer knows the session)"
                        .into(),
                ));
            }
            Err(StreamableHttpError::Client(e)) if e.is_connect() => {
                self.lose("the server does not accept connections");
            }
            _ => {}
        }
        result
    }

    fn watch_stream(
        &self,
        in_session: bool,
        result: Result<SseStream, HttpError>,
    ) -> Result<SseStream, HttpError> {
        if let Err(StreamableHttpError::Client(e)) = &result {
            let refused = matches!(
                e.status(),
                Some(reqwest::StatusCode::BAD_REQUEST | reqwest::StatusCode::NOT_FOUND)
            );
            if e.is_connect() {
                self.lose("the server does not accept connections");
            } else if refused && in_session {
                self.lose("the server refused a stream of the session");
            }
        }
        result
    }
}

fn is_request(message: &ClientJsonRpcMessage) -> bool {
    matches!(message, ClientJsonRpcMessage::Request(_))
}

impl StreamableHttpClient for WatchedClient {
    type Error = reqwest::Error;

    async fn post_message(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id: Option<Arc<str>>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
    ) -> PostResult {
        let request_in_session = is_request(&message) && session_id.is_some();
        let result = self
            .client
            .post_message(uri, message, session_id, auth_header, custom_headers)
            .await;
        self.watch_post(request_in_session, result)
    }

    async fn post_message_with_max_sse_event_size(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id: Option<Arc<str>>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
        max_sse_event_size: usize,
    ) -> PostResult {
        let request_in_session = is_request(&message) && session_id.is_some();
        let result = self
            .client
            .post_message_with_max_sse_event_size(
                uri,
                message,
                session_id,
                auth_header,
                custom_headers,
                max_sse_event_size,
            )
            .await;
        self.watch_post(request_in_session, result)
    }

    async fn delete_session(
        &self,
        uri: Arc<str>,
        session_id: Arc<str>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
    ) -> Result<(), HttpError> {
        self.client
            .delete_session(uri, session_id, auth_header, custom_headers)
            .await
    }

    async fn get_stream(
        &self,
        uri: Arc<str>,
        session_id: Option<Arc<str>>,
        last_event_id: Option<String>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
    ) -> Result<SseStream, HttpError> {
        let in_session = session_id.is_some();
        let result = self
            .client
            .get_stream(uri, session_id, last_event_id, auth_header, custom_headers)
            .await;
        self.watch_stream(in_session, result)
    }

    async fn get_stream_with_max_sse_event_size(
        &self,
        uri: Arc<str>,
        session_id: Option<Arc<str>>,
        last_event_id: Option<String>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
        max_sse_event_size: usize,
    ) -> Result<SseStream, HttpError> {
        let in_session = session_id.is_some();
        let result = self
            .client
            .get_stream_with_max_sse_event_size(
                uri,
                session_id,
                last_event_id,
                auth_header,
                custom_headers,
                max_sse_event_size,
            )
            .await;
        self.watch_stream(in_session, result)
    }
}
