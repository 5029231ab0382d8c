//! [`ProgressTallyTransport`]: the upstream transport, counting progress as it
//! is read.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::sync::Arc;

use rmcp::model::{JsonRpcMessage, JsonRpcNotification, ServerNotification};
use rmcp::service::{RoleClient, RoleServer, RxJsonRpcMessage, TxJsonRpcMessage};
use rmcp::transport::Transport;

use crate::routes::ProgressRoutes;

/// Wraps the transport to the upstream server: each `notifications/progress`
/// it reads is counted as received ([`ProgressRoutes::received`]) before
/// rmcp sees it, and carries the [`ProgressReceipt`](crate::routes::ProgressReceipt)
/// in its extensions to the handler, which drops it once the notification is
/// forwarded. Since messages are read in order, a response is read only
/// after every progress the server sent before it has been counted, which is
/// what lets the proxy hold the response until that progress is forwarded.
/// Everything else passes through untouched.
pub(crate) struct ProgressTallyTransport<T> {
    inner: T,
    routes: Arc<ProgressRoutes<RoleServer>>,
}

impl<T> fmt::Debug for ProgressTallyTransport<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProgressTallyTransport")
            .field("routes", &self.routes)
            .finish_non_exhaustive()
    }
}

impl<T: Transport<RoleClient>> ProgressTallyTransport<T> {
    /// `inner`, counting progress into `routes`.
    pub(crate) fn new(inner: T, routes: Arc<ProgressRoutes<RoleServer>>) -> Self {
        ProgressTallyTransport { inner, routes }
    }
}

impl<T: Transport<RoleClient>> Transport<RoleClient> for ProgressTallyTransport<T> {
    type Error = T::Error;

    fn name() -> Cow<'static, str> {
        T::name()
    }

    fn send(
        &mut self,
        item: TxJsonRpcMessage<RoleClient>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        self.inner.send(item)
    }

    async fn receive(&mut self) -> Option<RxJsonRpcMessage<RoleClient>> {
        let mut message = self.inner.receive().await?;
        // Counted in the same poll that hands the message over, so a
        // cancelled receive cannot count a message rmcp never got.
        if let JsonRpcMessage::Notification(JsonRpcNotification {
            notification: ServerNotification::ProgressNotification(progress),
            ..
        }) = &mut message
        {
            let receipt = self.routes.received(progress.params.progress_token.clone());
            progress.extensions.insert(receipt);
        }
        Some(message)
    }

    fn close(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send {
        self.inner.close()
    }
}
