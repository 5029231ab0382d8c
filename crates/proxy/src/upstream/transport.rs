//! [`ProgressTallyTransport`]: a transport counting progress as it is read,
//! on both sides of the proxy.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::sync::Arc;

use rmcp::model::{
    ClientNotification, Extensions, JsonRpcMessage, JsonRpcNotification, ProgressToken,
    ServerNotification,
};
use rmcp::service::{RoleClient, RoleServer, RxJsonRpcMessage, ServiceRole, TxJsonRpcMessage};
use rmcp::transport::Transport;

use crate::routes::ProgressRoutes;

/// Wraps a transport so that each `notifications/progress` it reads is
/// counted and numbered ([`ProgressRoutes::received`]) before rmcp sees it,
/// and carries its [`ProgressReceipt`](crate::routes::ProgressReceipt) in its
/// extensions to the handler, which forwards a token's progress in that
/// order and drops the receipt once the notification is forwarded. Since
/// messages are read in order, a response is read only after every progress
/// the peer sent before it has been counted, which is what lets the proxy
/// hold the response until that progress is forwarded. Everything else
/// passes through untouched.
///
/// Two sides, two impls: as the upstream server's client
/// (`Transport<RoleClient>`, the server's progress counted into routes to
/// downstream clients, `R = RoleServer`) and as a downstream client's server
/// (`Transport<RoleServer>`, the client's progress counted into routes to
/// the upstream server, `R = RoleClient`).
pub(crate) struct ProgressTallyTransport<T, R: ServiceRole> {
    inner: T,
    routes: Arc<ProgressRoutes<R>>,
}

impl<T, R: ServiceRole> fmt::Debug for ProgressTallyTransport<T, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProgressTallyTransport")
            .field("routes", &self.routes)
            .finish_non_exhaustive()
    }
}

impl<T, R: ServiceRole> ProgressTallyTransport<T, R> {
    /// `inner`, counting progress into `routes`.
    pub(crate) fn new(inner: T, routes: Arc<ProgressRoutes<R>>) -> Self {
        ProgressTallyTransport { inner, routes }
    }

    /// Counts one progress notification, its receipt put in `extensions`.
    /// Called in the same poll that hands the message over, so a cancelled
    /// receive cannot count a message rmcp never got.
    fn count(&self, token: &ProgressToken, extensions: &mut Extensions) {
        extensions.insert(self.routes.received(token.clone()));
    }
}

/// The proxy as the upstream server's client: the server's progress.
impl<T: Transport<RoleClient>> Transport<RoleClient> for ProgressTallyTransport<T, RoleServer> {
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
        if let JsonRpcMessage::Notification(JsonRpcNotification {
            notification: ServerNotification::ProgressNotification(progress),
            ..
        }) = &mut message
        {
            self.count(&progress.params.progress_token, &mut progress.extensions);
        }
        Some(message)
    }

    fn close(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send {
        self.inner.close()
    }
}

/// The proxy as a downstream client's server: the client's progress, on the
/// requests the upstream server sent it.
impl<T: Transport<RoleServer>> Transport<RoleServer> for ProgressTallyTransport<T, RoleClient> {
    type Error = T::Error;

    fn name() -> Cow<'static, str> {
        T::name()
    }

    fn send(
        &mut self,
        item: TxJsonRpcMessage<RoleServer>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        self.inner.send(item)
    }

    async fn receive(&mut self) -> Option<RxJsonRpcMessage<RoleServer>> {
        let mut message = self.inner.receive().await?;
        if let JsonRpcMessage::Notification(JsonRpcNotification {
            notification: ClientNotification::ProgressNotification(progress),
            ..
        }) = &mut message
        {
            self.count(&progress.params.progress_token, &mut progress.extensions);
        }
        Some(message)
    }

    fn close(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send {
        self.inner.close()
    }
}
