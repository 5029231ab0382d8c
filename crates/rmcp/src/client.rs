//! [`RmcpClient`]: a `tower::Service<ClientRequest>` over an rmcp peer.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use std::sync::Arc;

use rmcp::model::{
    CancelledNotification, CancelledNotificationParam, ClientRequest, GetExtensions, ProgressToken,
    RequestId, ServerResult,
};
use rmcp::service::{Peer, PeerRequestOptions, RoleClient};
use toolwarden_core::classify::{TransportError, TransportErrorKind};
use toolwarden_core::{BoxError, ToolCatalog, ToolInfo};
use tower_service::Service;

use crate::map_service_error;

/// The response future of [`RmcpClient`]. Boxed: rmcp's request futures are
/// `async fn`s whose types cannot be named.
pub type RmcpClientFuture = Pin<Box<dyn Future<Output = Result<ServerResult, BoxError>> + Send>>;

/// A `tower::Service<ClientRequest>` over a `Peer<RoleClient>`.
///
/// - Dropping a call's future before its response arrives sends
///   `notifications/cancelled` for it, so a timeout or a lost race above
///   cancels the work on the server too (rmcp's plain `send_request` does not).
/// - rmcp errors are mapped with [`map_service_error`] so the default
///   classifier reads them.
/// - With [`RmcpClient::with_catalog`], every `tools/list` result that passes
///   through adds its tools to the catalog.
/// - `poll_ready` fails once the transport is closed: nothing is sent into a
///   dead connection.
///
/// Clones share the peer (one connection).
#[derive(Clone)]
pub struct RmcpClient {
    peer: Peer<RoleClient>,
    catalog: Option<ToolCatalog>,
    timeout: Option<Duration>,
    reset_timeout_on_progress: bool,
    max_total_timeout: Option<Duration>,
}

impl fmt::Debug for RmcpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RmcpClient")
            .field("catalog", &self.catalog)
            .field("timeout", &self.timeout)
            .field("reset_timeout_on_progress", &self.reset_timeout_on_progress)
            .field("max_total_timeout", &self.max_total_timeout)
            .finish_non_exhaustive()
    }
}

impl RmcpClient {
    /// A client over `peer`, with no timeout of its own (put a timeout or the
    /// retry layer's deadline above it).
    #[must_use]
    pub fn new(peer: Peer<RoleClient>) -> Self {
        RmcpClient {
            peer,
            catalog: None,
            timeout: None,
            reset_timeout_on_progress: false,
            max_total_timeout: None,
        }
    }

    /// Adds the tools of every `tools/list` result to `catalog`.
    #[must_use]
    pub fn with_catalog(mut self, catalog: ToolCatalog) -> Self {
        self.catalog = Some(catalog);
        self
    }

    /// rmcp's per-request timeout: past it, rmcp cancels the request upstream
    /// and the call fails with a timeout (class `Transient`). Default: none.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Restarts the timeout whenever the server reports progress for the
    /// request (the spec's MAY). Default: `false`.
    #[must_use]
    pub fn reset_timeout_on_progress(mut self, reset: bool) -> Self {
        self.reset_timeout_on_progress = reset;
        self
    }

    /// A cap on the total time, progress or not (the spec's SHOULD). Default: none.
    #[must_use]
    pub fn max_total_timeout(mut self, max: Duration) -> Self {
        self.max_total_timeout = Some(max);
        self
    }

    /// The peer.
    #[must_use]
    pub fn peer(&self) -> &Peer<RoleClient> {
        &self.peer
    }

    /// Lists every tool (following pagination, within the bounds of
    /// [`read_pages`](crate::read_pages)) and replaces the catalog's tools
    /// with them. Returns how many were read.
    pub async fn refresh_catalog(&self) -> Result<usize, BoxError> {
        let tools = crate::list_tools(&self.peer)
            .await
            .map_err(map_service_error)?
            .items;
        let list = serde_json::json!({ "tools": tools });
        Ok(match &self.catalog {
            Some(catalog) => catalog.fill_from_tools_list(&list),
            None => 0,
        })
    }

    fn options(&self) -> PeerRequestOptions {
        let mut options = PeerRequestOptions::no_options();
        options.timeout = self.timeout;
        options.reset_timeout_on_progress = self.reset_timeout_on_progress;
        options.max_total_timeout = self.max_total_timeout;
        options
    }
}

/// A hook [`RmcpClient`] runs once a request has been handed to the
/// connection, with the request id and the progress token rmcp put in its
/// `_meta` (rmcp replaces any token the caller set with one of its own).
///
/// Put it in the request's extensions (`request.extensions_mut().insert(..)`).
/// A proxy uses it to route the server's `notifications/progress` back to the
/// client that asked for them; a request retried by a layer above runs it
/// once per attempt, each with its own token. The hook runs on the caller's
/// task right after the request is queued, so a progress notification can in
/// principle arrive before it ran: whoever routes progress should wait a
/// moment for an unknown token.
#[derive(Clone)]
pub struct OnRequestSent(Arc<SentHook>);

type SentHook = dyn Fn(&RequestId, &ProgressToken) + Send + Sync;

impl OnRequestSent {
    /// A hook running `f`.
    pub fn new(f: impl Fn(&RequestId, &ProgressToken) + Send + Sync + 'static) -> Self {
        OnRequestSent(Arc::new(f))
    }
}

impl fmt::Debug for OnRequestSent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OnRequestSent")
    }
}

/// Sends `notifications/cancelled` for a request whose future was dropped
/// while it was still waiting for the response.
struct CancelOnDrop {
    peer: Peer<RoleClient>,
    id: Option<RequestId>,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let Some(id) = self.id.take() else {
            return;
        };
        // Drop cannot await; without a runtime (process shutdown) there is
        // nobody left to tell.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let peer = self.peer.clone();
        runtime.spawn(async move {
            let params = CancelledNotificationParam::new(
                Some(id),
                Some("request abandoned by the caller".to_owned()),
            );
            let _ = peer
                .send_notification(CancelledNotification::new(params).into())
                .await;
        });
    }
}

impl Service<ClientRequest> for RmcpClient {
    type Response = ServerResult;
    type Error = BoxError;
    type Future = RmcpClientFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.peer.is_transport_closed() {
            return Poll::Ready(Err(Box::new(TransportError::new(
                TransportErrorKind::ConnectFailed,
                "the MCP connection is closed",
            ))));
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: ClientRequest) -> Self::Future {
        let peer = self.peer.clone();
        let options = self.options();
        let catalog = self.catalog.clone();
        let on_sent = request.extensions().get::<OnRequestSent>().cloned();
        Box::pin(async move {
            let handle = peer
                .send_cancellable_request(request, options)
                .await
                .map_err(map_service_error)?;
            if let Some(on_sent) = on_sent {
                (on_sent.0)(&handle.id, &handle.progress_token);
            }
            let mut guard = CancelOnDrop {
                peer: peer.clone(),
                id: Some(handle.id.clone()),
            };
            let result = handle.await_response().await;
            // Answered (or timed out, which rmcp cancels itself): nothing to cancel.
            guard.id = None;
            let result = result.map_err(map_service_error)?;
            if let (Some(catalog), ServerResult::ListToolsResult(list)) = (&catalog, &result) {
                let tools = list
                    .tools
                    .iter()
                    .filter_map(|t| serde_json::to_value(t).ok())
                    .filter_map(|t| ToolInfo::from_value(&t));
                catalog.extend(tools);
            }
            Ok(result)
        })
    }
}
