//! [`UpstreamHandler`]: the proxy as the upstream server's client.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rmcp::model::{
    CancelledNotificationParam, ClientConfig, ClientResult, ErrorCode, ErrorData, GetExtensions,
    GetMeta, ServerNotification, ServerRequest,
};
use rmcp::service::{
    InboundStreamOrigin, NotificationContext, OriginatingRequestId, PeerRequestOptions,
    RequestContext, RoleClient, RoleServer, Service, ServiceError,
};

use super::Shared;
use crate::downstream::MAX_AWAITED_PER_CLIENT;
use crate::progress::{send_in_turn, ProgressReceipt, Resolved, RouteGuard};

/// Answers what the upstream server sends to the proxy (see the
/// [module docs](super)):
///
/// - `ping` is answered here, and so is one of MCP's requests whose params
///   do not fit (rmcp reads it as a custom one): `-32602`, no client sees it;
/// - other requests (`sampling/createMessage`, `roots/list`,
///   `elicitation/create`, custom ones) go to the downstream session whose
///   call the server was handling, found by
///   [`Downstreams::target_of`](crate::downstream::Downstreams::target_of), and
///   to no other (over HTTP it must have a session: see [`crate::downstream::http`]),
///   with no time limit: a human may take long over an elicitation. When no
///   such session can be told, the server gets `-32603 no client session
///   for this request` at once (`-32000` with no client at all), and
///   if the client's transport ends before it answers (its session closed),
///   when it ends. Its answer (or error) is passed back once the
///   progress the client sent before it has been forwarded to the server
///   (waiting at most [`PROGRESS_FORWARD_LIMIT`](crate::progress::PROGRESS_FORWARD_LIMIT));
///   if the server cancels one, the client is told too;
/// - `notifications/progress` go to the client whose request they are about,
///   a token's in the order the transport read them ([`send_in_turn`]);
///   each counts as forwarded (its [`ProgressReceipt`] is dropped) once sent
///   on or dropped, so the response can wait for it;
///   a task's status goes to the client whose call created the task;
///   `tools/list_changed` refreshes the catalog (one `tools/list` at a
///   time: see `Shared::refresh_catalog`) and, like every other
///   notification (none of them names a request), is broadcast to every
///   connected client; `notifications/cancelled` is handled by rmcp (it
///   cancels the forwarded request above, whose client is told); one of
///   MCP's notifications whose params do not fit, and any task notification
///   rmcp cannot read, goes to no client.
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

/// The capability `request` needs that `client` did not declare in its
/// `initialize`, if any (`None` too for a client that sent none: a
/// sessionless one, whose capabilities ride each request). With one
/// upstream session for every client, the server sees the first client's
/// capabilities, not this one's.
fn undeclared_capability(
    request: &ServerRequest,
    client: &rmcp::service::Peer<rmcp::service::RoleServer>,
) -> Option<&'static str> {
    let info = client.peer_info()?;
    let capabilities = &info.capabilities;
    match request {
        ServerRequest::CreateMessageRequest(_) if capabilities.sampling.is_none() => {
            Some("sampling")
        }
        ServerRequest::ListRootsRequest(_) if capabilities.roots.is_none() => Some("roots"),
        ServerRequest::ElicitRequest(_) if capabilities.elicitation.is_none() => {
            Some("elicitation")
        }
        _ => None,
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
            // One of MCP's own requests with params that do not fit (rmcp
            // reads it as a custom one): the server is told, as a client's
            // malformed request is told by the framer; no client sees it.
            ServerRequest::CustomRequest(custom)
                if SERVER_REQUESTS.contains(&custom.method.as_str()) =>
            {
                metrics::counter!("toolwarden_proxy_malformed_messages_total").increment(1);
                return Err(ErrorData::new(
                    ErrorCode(-32602),
                    format!("Invalid params for {}", custom.method),
                    None,
                ));
            }
            other => other,
        };
        // Over Streamable HTTP, rmcp's transport says which of our requests'
        // response streams the server's request came on: the request the
        // server was handling. Elsewhere nothing on the wire says it.
        let origin = match context.extensions.get::<InboundStreamOrigin>() {
            Some(InboundStreamOrigin::OutboundRequest(id)) => Some(id.clone()),
            _ => None,
        };
        let target = self.shared.downstreams.target_of(origin.as_ref()).await?;
        if let Some(capability) = undeclared_capability(&request, &target.peer) {
            // The client would not know the method; the server is told at
            // once, as the client itself would tell it.
            return Err(ErrorData::new(
                ErrorCode::METHOD_NOT_FOUND,
                format!(
                    "the client behind the toolwarden proxy does not support {capability}: \
                     it did not declare the capability"
                ),
                None,
            ));
        }
        // Bounded per client: a client that never answers, with a server
        // that never cancels, would hold a task per request without end.
        let Some(_awaited) = target.await_place() else {
            metrics::counter!("toolwarden_proxy_server_requests_refused_total").increment(1);
            return Err(ErrorData::new(
                ErrorCode(-32000),
                format!(
                    "the client behind the toolwarden proxy has {MAX_AWAITED_PER_CLIENT} \
                     requests unanswered already"
                ),
                None,
            ));
        };
        // rmcp moved the request's _meta into the context; put it back (rmcp
        // gives the forwarded request a progress token of its own, numbered
        // per client: so it is routed in that client's own table).
        let server_token = context.meta.get_progress_token();
        *request.get_meta_mut() = context.meta.clone();
        let route = RouteGuard::new(
            target.progress,
            server_token.map(|token| (context.peer.clone(), token)),
        );
        // Tied to the client's request it is for, so that over Streamable
        // HTTP it rides that request's response stream (SEP-2260). Sent from
        // a task of its own: within this handler rmcp would tie it to the
        // server's request id instead, which means nothing downstream.
        if let Some(id) = target.request {
            request.extensions_mut().insert(OriginatingRequestId(id));
        }
        let client = target.peer;
        let handle = tokio::spawn(async move {
            client
                .send_cancellable_request(request, PeerRequestOptions::no_options())
                .await
        })
        .await
        .map_err(|e| ErrorData::internal_error(format!("toolwarden proxy: {e}"), None))?
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
                // Past the backlog the newest is dropped, its receipt with it
                // (so the ones after it and the answer do not wait for it).
                let Some(_place) = self.shared.progress_backlog.enter() else {
                    metrics::counter!("toolwarden_proxy_progress_dropped_total").increment(1);
                    return Ok(());
                };
                let ours = progress.params.progress_token.clone();
                match self.shared.progress_up.resolve(&ours).await {
                    Resolved::To(client, token, mark) => {
                        // The client's own share of the backlog: one that
                        // does not read fills only its share.
                        let Some(_share) = mark.enter() else {
                            metrics::counter!("toolwarden_proxy_progress_dropped_total")
                                .increment(1);
                            return Ok(());
                        };
                        let mut params = progress.params.clone();
                        params.progress_token = token;
                        let value = params.progress;
                        send_in_turn(receipt.take(), &mark, value, client.notify_progress(params))
                            .await;
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
            ServerNotification::CustomNotification(custom) if is_malformed(&custom.method) => {
                // MCP's own method with params rmcp could not read: progress,
                // a cancellation or a task's status that names no request
                // or task we can route by. Broadcast, it would show every
                // client what belongs to one; forwarded to nobody.
                metrics::counter!("toolwarden_proxy_malformed_messages_total").increment(1);
                tracing::debug!(method = %custom.method, "a malformed notification from the server, dropped");
                return Ok(());
            }
            ServerNotification::ToolListChangedNotification(_) => {
                self.shared.refresh_catalog(self.list_timeout);
            }
            // A task's status is the client's whose call created it; a task
            // of no client's goes to nobody.
            ServerNotification::TaskStatusNotification(status) => {
                let task_id = status.params.task.task.task_id.clone();
                *notification.get_meta_mut() = context.meta;
                if !self
                    .shared
                    .downstreams
                    .notify_task_owner(&task_id, notification)
                {
                    tracing::debug!(task = %task_id, "status of a task of no client's");
                }
                return Ok(());
            }
            _ => {}
        }
        // The rest is server-wide (list changes, logging, resource updates,
        // custom ones): nothing in it names a request. Every client gets it.
        // Queued per client, never awaited here: a client that does not read
        // cannot stall the upstream, nor the other clients.
        *notification.get_meta_mut() = context.meta;
        self.shared.downstreams.broadcast(&notification);
        Ok(())
    }

    fn get_info(&self) -> ClientConfig {
        self.info.clone()
    }
}

/// The requests MCP defines for a server to send a client (rmcp 3.9 reads
/// each into its own type): one rmcp hands over as a custom request had
/// params that do not fit.
const SERVER_REQUESTS: &[&str] = &[
    "ping",
    "sampling/createMessage",
    "roots/list",
    "elicitation/create",
];

/// The notifications MCP defines for a server to send (rmcp 3.9 reads each
/// into its own type): one rmcp hands over as a custom notification had
/// params that do not fit.
const SERVER_NOTIFICATIONS: &[&str] = &[
    "notifications/cancelled",
    "notifications/progress",
    "notifications/message",
    "notifications/resources/updated",
    "notifications/resources/list_changed",
    "notifications/tools/list_changed",
    "notifications/prompts/list_changed",
    "notifications/subscriptions/acknowledged",
];

/// Whether a notification rmcp read as a custom one is malformed: one of
/// MCP's own methods ([`SERVER_NOTIFICATIONS`]) whose params do not fit,
/// or any task notification (`notifications/tasks`, and the
/// `notifications/tasks/...` of other drafts), which names a task and so
/// goes to its creator or nobody, never to every client.
fn is_malformed(method: &str) -> bool {
    SERVER_NOTIFICATIONS.contains(&method)
        || method == "notifications/tasks"
        || method.starts_with("notifications/tasks/")
}
