//! [`UpstreamService`]: the innermost service of the stack.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use rmcp::model::{ClientRequest, ServerResult};
use toolwarden_core::classify::{
    CallTimedOut, HttpStatusError, TransportError, TransportErrorKind,
};
use toolwarden_core::jsonrpc::ErrorObject;
use toolwarden_core::BoxError;
use toolwarden_rmcp::RmcpClientFuture;
use tower::ServiceExt as _;

use super::connect::error_chain;
use super::Shared;
use crate::redact::{Redactor, UPSTREAM_FAILED};

/// The innermost service of the stack: sends a request through the current
/// upstream connection (see the [module docs](super)). Clones share the
/// connection.
#[derive(Clone)]
pub struct UpstreamService {
    shared: Arc<Shared>,
}

impl fmt::Debug for UpstreamService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamService")
            .field("status", &*self.shared.status.borrow())
            .finish()
    }
}

impl UpstreamService {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        UpstreamService { shared }
    }
}

impl tower::Service<ClientRequest> for UpstreamService {
    type Response = ServerResult;
    type Error = BoxError;
    type Future = UpstreamFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Always ready: with no connection, `call` fails at once, which is
        // what the layers above must see (a refusal they can classify).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: ClientRequest) -> Self::Future {
        let inner: RmcpClientFuture = match self.shared.connection() {
            Some(connection) => Box::pin(connection.client.clone().oneshot(request)),
            None => {
                // The status's error is for the log (the supervisor wrote it
                // there); the caller gets the state alone.
                let status = self.shared.status.borrow().name();
                Box::pin(std::future::ready(Err(Box::new(TransportError::new(
                    TransportErrorKind::ConnectFailed,
                    format!("the upstream server is {status}: see the proxy's log"),
                )) as BoxError)))
            }
        };
        UpstreamFuture {
            inner,
            redactor: Arc::clone(&self.shared.redactor),
        }
    }
}

/// Response future of [`UpstreamService`]: the connection's answer, with a
/// failure of the connection itself replaced by a generic one
/// ([`UPSTREAM_FAILED`], same kind and class) once its details are logged,
/// scrubbed. The server's own JSON-RPC errors, timeouts and HTTP statuses
/// (a status and a `Retry-After`: nothing secret) pass unchanged.
pub struct UpstreamFuture {
    inner: RmcpClientFuture,
    redactor: Arc<Redactor>,
}

impl fmt::Debug for UpstreamFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamFuture").finish_non_exhaustive()
    }
}

impl std::future::Future for UpstreamFuture {
    type Output = Result<ServerResult, BoxError>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.inner.as_mut().poll(cx) {
            Poll::Ready(Err(error)) => Poll::Ready(Err(generic_error(error, &self.redactor))),
            other => other,
        }
    }
}
/// A connection failure as a caller may see it (see [`UpstreamFuture`]).
fn generic_error(error: BoxError, redactor: &Redactor) -> BoxError {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error.as_ref());
    while let Some(e) = current {
        if e.is::<ErrorObject>() || e.is::<CallTimedOut>() || e.is::<HttpStatusError>() {
            return error;
        }
        if let Some(transport) = e.downcast_ref::<TransportError>() {
            if transport.kind == TransportErrorKind::ConnectFailed {
                // Ours (no connection): already says nothing more than the state.
                return error;
            }
            let detail = redactor.scrub(&error_chain(error.as_ref())).into_owned();
            tracing::warn!(error = %detail, "upstream request failed");
            return Box::new(TransportError::new(transport.kind, UPSTREAM_FAILED));
        }
        current = e.source();
    }
    let detail = redactor.scrub(&error_chain(error.as_ref())).into_owned();
    tracing::warn!(error = %detail, "upstream request failed");
    Box::new(UpstreamFailed)
}

/// Any other failure of the upstream connection, its details in the log.
/// Classified as a server failure, as rmcp's errors it replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamFailed;

impl fmt::Display for UpstreamFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(UPSTREAM_FAILED)
    }
}

impl std::error::Error for UpstreamFailed {}
