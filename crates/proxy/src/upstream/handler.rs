//! [`UpstreamHandler`]: the proxy as the upstream server's client.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rmcp::model::{
    CancelledNotificationParam, ClientConfig, ClientResult, ErrorCode, ErrorData, GetMeta,
    ServerNotification, ServerRequest,
};
use rmcp::service::{
    NotificationContext, PeerRequestOptions, RequestContext, RoleClient, RoleServer, Service,
    ServiceError,
};

use super::Shared;
use crate::routes::{send_in_turn, ProgressReceipt, Resolved, RouteGuard};

/// Answers what the upstream server sends to the proxy (see the
/// [module docs](super)):
///
/// - `ping` is answered here;
/// - other requests (`sampling/createMessage`, `roots/list`,
///   `elicitation/create`, custom ones) go to the most recently active
///   downstream client that can answer them (over HTTP, one with a session:
///   see [`crate::http`]), with no time limit: a human may take long over an
///   elicitation. With no such client the server gets an error at once, and
///   if the client's transport ends before it answers (its session closed),
///   when it ends. Its answer (or error) is passed back once the
///   progress the client sent before it has been forwarded to the server
///   (waiting at most [`PROGRESS_FORWARD_LIMIT`](crate::routes::PROGRESS_FORWARD_LIMIT));
///   if the server cancels one, the client is told too;
/// - `notifications/progress` go to the client whose request they are about,
///   a token's in the order the transport read them ([`send_in_turn`]);
///   each counts as forwarded (its [`ProgressReceipt`] is dropped) once sent
///   on or dropped, so the response can wait for it;
///   `tools/list_changed` refreshes the catalog and, like every other
///   notification, is broadcast to every connected client;
///   `notifications/cancelled` is handled by rmcp (it cancels the forwarded
///   request above).
#[derive(Clone)]
pub struct UpstreamHandler {
    shared: Arc<Shared>,
    info: ClientConfig,
    list_timeout: Duration,
}

impl fmt::Debug for UpstreamHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamHandler")
            .field("client", &self.info.client_info.name)
            .finish_non_exhaustive()
    }
}

impl UpstreamHandler {
    pub(crate) fn new(shared: Arc<Shared>, info: ClientConfig, list_timeout: Duration) -> Self {
        UpstreamHandler {
            shared,
            info,
            list_timeout,
        }
    }
}

/// An rmcp error from a downstream client, as the error the server gets.
fn downstream_error(error: ServiceError) -> ErrorData {
    match error {
        ServiceError::McpError(e) => e,
        other => ErrorData::new(
            ErrorCode(-32000),
            format!("the client behind the toolwarden proxy did not answer: {other}"),
            None,
        ),
    }
}

impl Service<RoleClient> for UpstreamHandler {
    async fn handle_request(
        &self,
        request: ServerRequest,
        context: RequestContext<RoleClient>,
    ) -> Result<ClientResult, ErrorData> {
        let mut request = match request {
            ServerRequest::PingRequest(_) => return Ok(ClientResult::empty(())),
            other => other,
        };
        let Some((client, progress)) = self.shared.downstreams.most_recent() else {
            return Err(ErrorData::new(
                ErrorCode(-32000),
                "no client is connected to the toolwarden proxy",
                None,
            ));
        };
        // rmcp moved the request's _meta into the context; put it back (rmcp
        // gives the forwarded request a progress token of its own, numbered
        // per client: so it is routed in that client's own table).
        let server_token = context.meta.get_progress_token();
        *request.get_meta_mut() = context.meta.clone();
        let route = RouteGuard::new(
            progress,
            server_token.map(|token| (context.peer.clone(), token)),
        );
        let handle = client
            .send_cancellable_request(request, PeerRequestOptions::no_options())
            .await
            .map_err(downstream_error)?;
        route.sent(&handle.progress_token);
        let (peer, id) = (handle.peer.clone(), handle.id.clone());
        let answer = tokio::select! {
            answer = handle.await_response() => answer.map_err(downstream_error),
            () = context.ct.cancelled() => {
                let reason = Some("cancelled by the server".to_owned());
                let _ = peer.notify_cancelled(CancelledNotificationParam::new(Some(id), reason)).await;
                return Err(ErrorData::new(ErrorCode(-32000), "cancelled by the server", None));
            }
        };
        // The client's progress read before its answer goes to the server
        // first (bounded). Cancelled meanwhile, rmcp drops the answer anyway.
        tokio::select! {
            () = route.progress_first() => {}
            () = context.ct.cancelled() => {}
        }
        answer
    }

    async fn handle_notification(
        &self,
        notification: ServerNotification,
        mut context: NotificationContext<RoleClient>,
    ) -> Result<(), ErrorData> {
        let mut notification = notification;
        match &mut notification {
            ServerNotification::ProgressNotification(progress) => {
                // Put there by the transport; dropped below, once forwarded.
                let mut receipt = context.extensions.remove::<ProgressReceipt<RoleServer>>();
                let ours = progress.params.progress_token.clone();
                match self.shared.progress_up.resolve(&ours).await {
                    Resolved::To(client, token) => {
                        let mut params = progress.params.clone();
                        params.progress_token = token;
                        send_in_turn(receipt.take(), client.notify_progress(params)).await;
                    }
                    Resolved::Nowhere => {}
                    Resolved::Unknown => {
                        tracing::debug!(token = ?ours, "progress for no request in flight");
                    }
                }
                drop(receipt);
                return Ok(());
            }
            // rmcp already cancelled the forwarded request's context.
            ServerNotification::CancelledNotification(_) => return Ok(()),
            ServerNotification::ToolListChangedNotification(_) => {
                self.shared.refresh_catalog(self.list_timeout);
            }
            _ => {}
        }
        *notification.get_meta_mut() = context.meta;
        for client in self.shared.downstreams.all() {
            if let Err(e) = client.send_notification(notification.clone()).await {
                tracing::debug!(error = %e, "could not forward a notification");
            }
        }
        Ok(())
    }

    fn get_info(&self) -> ClientConfig {
        self.info.clone()
    }
}
