//! The HTTP client of a Streamable HTTP(S) upstream: reqwest with rustls
//! (system roots through the platform verifier, plus `upstream.ca_file`),
//! the configured headers, and redirects kept to the same origin.

use std::collections::HashMap;
use std::sync::Arc;

use futures::stream::BoxStream;

use futures::StreamExt as _;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use rmcp::model::{ClientJsonRpcMessage, JsonRpcError, RequestId, ServerJsonRpcMessage};
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

    fn posted(id: i64) -> Option<RequestId> {
        Some(RequestId::Number(id))
    }

    fn event(data: serde_json::Value) -> Result<sse_stream::Sse, SseError> {
        Ok(sse_stream::Sse {
            event: Some("message".into()),
            data: Some(data.to_string()),
            id: None,
            retry: None,
        })
    }

    /// Regression (found by a hunt with a misbehaving HTTP upstream): an
    /// answer carrying another request's id, on request B's POST, was
    /// handed by rmcp to that other request (another client's call), and B
    /// waited out its timeout. A JSON one now fails B at once; on an SSE
    /// stream it is dropped, and the rest of the stream is kept.
    #[tokio::test]
    async fn a_posts_answer_is_the_answer_to_that_request_only() {
        let answer =
            |id: i64| serde_json::json!({"jsonrpc": "2.0", "id": id, "result": {"content": []}});
        let json = |id: i64| {
            Ok(StreamableHttpPostResponse::Json(
                serde_json::from_value(answer(id)).unwrap(),
                None,
            ))
        };
        assert!(matches!(
            answers_only(posted(2), json(2)),
            Ok(StreamableHttpPostResponse::Json(..))
        ));
        let error = answers_only(posted(2), json(1)).unwrap_err();
        assert!(error.to_string().contains("answer to request 1"), "{error}");
        // A notification is not an answer; a message that is not a request
        // (a notification posted) has no answer to check.
        assert!(answers_only(None, json(1)).is_ok());

        let events = vec![
            event(
                serde_json::json!({"jsonrpc": "2.0", "method": "notifications/message", "params": {}}),
            ),
            event(answer(1)),
            event(
                serde_json::json!({"jsonrpc": "2.0", "id": 1, "error": {"code": -32603, "message": "x"}}),
            ),
            event(serde_json::json!({"jsonrpc": "2.0", "id": 7, "method": "roots/list"})),
            event(answer(2)),
        ];
        let sse: SseStream = Box::pin(futures::stream::iter(events));
        let Ok(StreamableHttpPostResponse::Sse(kept, _)) =
            answers_only(posted(2), Ok(StreamableHttpPostResponse::Sse(sse, None)))
        else {
            panic!("an SSE answer stays one");
        };
        let kept: Vec<String> = kept
            .map(|e| e.unwrap().data.unwrap_or_default())
            .collect()
            .await;
        assert_eq!(kept.len(), 3, "{kept:?}");
        assert!(kept[0].contains("notifications/message"), "{kept:?}");
        assert!(kept[1].contains("roots/list"), "{kept:?}");
        assert!(kept[2].contains("\"id\":2"), "{kept:?}");
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

fn request_id(message: &ClientJsonRpcMessage) -> Option<RequestId> {
    match message {
        ClientJsonRpcMessage::Request(request) => Some(request.id.clone()),
        _ => None,
    }
}

/// The id of the request a server's message answers, if it is an answer.
fn answered(message: &ServerJsonRpcMessage) -> Option<&RequestId> {
    match message {
        ServerJsonRpcMessage::Response(response) => Some(&response.id),
        ServerJsonRpcMessage::Error(error) => error.id.as_ref(),
        _ => None,
    }
}

/// What the answer to a POSTed request may carry: the answer to that
/// request, and the server's notifications and requests; never the answer
/// to another request. rmcp hands any answer on any stream to whichever
/// request has its id: a server (buggy or hostile) answering request B's
/// POST with request A's id gave A, another client's call, B's answer
/// (and the fallback cache kept it under A's call), while B waited out
/// its timeout. Such an answer is dropped from an SSE stream (B's then
/// ends without its answer: "connection closed"), and a JSON one fails B
/// at once; both logged and counted in
/// `toolwarden_proxy_malformed_messages_total`.
fn answers_only(posted: Option<RequestId>, result: PostResult) -> PostResult {
    let Some(posted) = posted else {
        return result;
    };
    match result {
        Ok(StreamableHttpPostResponse::Json(message, session)) => {
            match answered(&message) {
                Some(other) if *other != posted => {
                    misaddressed(&posted, other);
                    Err(StreamableHttpError::UnexpectedServerResponse(
                    format!("the server answered request {posted} with the answer to request {other}")
                        .into(),
                ))
                }
                _ => Ok(StreamableHttpPostResponse::Json(message, session)),
            }
        }
        Ok(StreamableHttpPostResponse::Sse(stream, session)) => {
            let stream = stream.filter(move |event| {
                let keep = match event {
                    Ok(sse) => match sse.data.as_deref().map(answer_id) {
                        Some(Some(other)) if other != posted => {
                            misaddressed(&posted, &other);
                            false
                        }
                        _ => true,
                    },
                    Err(_) => true,
                };
                std::future::ready(keep)
            });
            Ok(StreamableHttpPostResponse::Sse(Box::pin(stream), session))
        }
        other => other,
    }
}

/// The id an SSE event's data answers, when it is an answer (an `id`, and
/// no `method`), read without building the message (rmcp reads it next).
fn answer_id(data: &str) -> Option<RequestId> {
    #[derive(serde::Deserialize)]
    struct Addressed {
        id: Option<RequestId>,
        method: Option<serde::de::IgnoredAny>,
    }
    let addressed: Addressed = serde_json::from_str(data).ok()?;
    addressed.method.is_none().then_some(addressed.id).flatten()
}

fn misaddressed(posted: &RequestId, other: &RequestId) {
    metrics::counter!("toolwarden_proxy_malformed_messages_total").increment(1);
    tracing::warn!(
        %posted,
        %other,
        "the upstream answered a request with the answer to another: dropped"
    );
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
        let posted = request_id(&message);
        let result = self
            .client
            .post_message(uri, message, session_id, auth_header, custom_headers)
            .await;
        answers_only(posted, self.watch_post(request_in_session, result))
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
        let posted = request_id(&message);
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
        answers_only(posted, self.watch_post(request_in_session, result))
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
