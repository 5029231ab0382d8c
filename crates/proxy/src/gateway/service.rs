//! The services of a gateway: each upstream's ([`MemberService`]: its
//! breaker around its connection, bounded by its attempt timeout) and the
//! innermost service of the tool stack ([`GatewayService`]), which sends a
//! `tools/call` to the upstream its name belongs to.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rmcp::model::{ClientRequest, ServerResult};
use toolwarden_core::classify::CallTimedOut;
use toolwarden_core::jsonrpc::{code, ErrorObject};
use toolwarden_core::{BoxError, CallKind, Classify, McpClassifier, Outcome, OutcomeKind};
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceExt as _};

use super::Gateway;
use crate::upstream::UpstreamService;

/// One upstream's service: its circuit breaker over its connection.
pub type MemberService = BoxCloneSyncService<ClientRequest, ServerResult, BoxError>;

type BoxFuture = Pin<Box<dyn Future<Output = Result<ServerResult, BoxError>> + Send>>;

/// What an upstream's own breaker counts: the failures of the connection
/// (transport errors, and timeouts of a request to it), whatever the tool.
/// A server that answers, even with an error or an `isError` result, is up:
/// those are the per-tool breakers' business.
#[derive(Debug, Clone, Copy, Default)]
pub struct UpstreamClassifier(McpClassifier);

impl Classify<ServerResult> for UpstreamClassifier {
    fn classify_response(&self, _kind: CallKind, _response: &ServerResult) -> Outcome {
        Outcome::SUCCESS
    }

    fn classify_error(&self, error: &(dyn StdError + 'static)) -> Outcome {
        let outcome = Classify::<ServerResult>::classify_error(&self.0, error);
        match outcome.kind {
            OutcomeKind::Transport | OutcomeKind::Timeout => outcome,
            _ => Outcome::SUCCESS,
        }
    }
}

/// An upstream's connection, each request bounded by `limit` (its
/// `attempt_timeout`): past it the request is dropped (cancelled upstream)
/// and fails with [`CallTimedOut`], which the upstream's breaker counts.
#[derive(Clone)]
pub struct TimedUpstream {
    inner: UpstreamService,
    limit: Duration,
}

impl fmt::Debug for TimedUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimedUpstream")
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl TimedUpstream {
    pub(super) fn new(inner: UpstreamService, limit: Duration) -> Self {
        TimedUpstream { inner, limit }
    }
}

impl Service<ClientRequest> for TimedUpstream {
    type Response = ServerResult;
    type Error = BoxError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: ClientRequest) -> Self::Future {
        let call = self.inner.call(request);
        let limit = self.limit;
        Box::pin(async move {
            match tokio::time::timeout(limit, call).await {
                Ok(result) => result,
                Err(_) => Err(Box::new(CallTimedOut { after: limit }) as BoxError),
            }
        })
    }
}

/// The innermost service of a gateway's tool stack: a `tools/call` named
/// `NAME<sep>tool` goes to upstream `NAME` as `tool` (its alias resolved),
/// through that upstream's breaker. A name no upstream exposes (unknown,
/// denied, another upstream's prefix) is answered `-32602` and reaches no
/// server. Any other request is refused (`-32601`): the proxy routes those
/// itself.
#[derive(Clone)]
pub struct GatewayService {
    gateway: Arc<Gateway>,
}

impl fmt::Debug for GatewayService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatewayService").finish_non_exhaustive()
    }
}

impl GatewayService {
    pub(super) fn new(gateway: Arc<Gateway>) -> Self {
        GatewayService { gateway }
    }
}

impl Service<ClientRequest> for GatewayService {
    type Response = ServerResult;
    type Error = BoxError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Each call readies the service of the upstream it goes to.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: ClientRequest) -> Self::Future {
        let ClientRequest::CallToolRequest(mut call) = request else {
            return Box::pin(std::future::ready(Err(Box::new(ErrorObject::new(
                code::METHOD_NOT_FOUND,
                "the gateway's tool stack carries tools/call only",
            )) as BoxError)));
        };
        let Some((member, tool)) = self.gateway.tool_route(&call.params.name) else {
            let error = ErrorObject::new(
                code::INVALID_PARAMS,
                format!("unknown tool: {}", call.params.name),
            );
            return Box::pin(std::future::ready(Err(Box::new(error) as BoxError)));
        };
        call.params.name = tool.into();
        let service = member.service.clone();
        Box::pin(service.oneshot(ClientRequest::CallToolRequest(call)))
    }
}
