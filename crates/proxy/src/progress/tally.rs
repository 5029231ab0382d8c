//! [`ProgressTally`]: counts each progress notification as a transport reads
//! it, on either side of the proxy.

use std::fmt;
use std::sync::Arc;

use rmcp::model::{ClientNotification, JsonRpcMessage, ProgressNotification, ServerNotification};
use rmcp::service::{RoleClient, RoleServer, RxJsonRpcMessage, ServiceRole};

use super::ProgressRoutes;
use crate::transport::OnReceive;

/// A transport hook ([`OnReceive`]) that counts and numbers each
/// `notifications/progress` it reads ([`ProgressRoutes::received`]) before
/// rmcp sees it, and puts its [`ProgressReceipt`](super::ProgressReceipt)
/// in the notification's extensions for the handler, which forwards a
/// token's progress in that order and drops the receipt once the
/// notification is forwarded. Since messages are read in order, a response
/// is read only after every progress the peer sent before it has been
/// counted, which is what lets the proxy hold the response until that
/// progress is forwarded. Everything else passes through untouched.
///
/// Counted in the poll that hands the message over, so a cancelled receive
/// cannot count a message rmcp never got.
///
/// Two sides ([`TalliedSide`]): as the upstream server's client
/// (`RoleClient`, the server's progress counted into routes to downstream
/// clients, `ProgressRoutes<RoleServer>`) and as a downstream client's
/// server (`RoleServer`, the client's progress counted into routes to the
/// upstream server, `ProgressRoutes<RoleClient>`).
pub(crate) struct ProgressTally<R: ServiceRole> {
    routes: Arc<ProgressRoutes<R>>,
}

impl<R: ServiceRole> ProgressTally<R> {
    /// Counting into `routes`.
    pub(crate) fn new(routes: Arc<ProgressRoutes<R>>) -> Self {
        ProgressTally { routes }
    }
}

impl<R: ServiceRole> fmt::Debug for ProgressTally<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProgressTally")
            .field("routes", &self.routes)
            .finish()
    }
}

/// A side of the proxy whose peer's progress is tallied: the role the proxy
/// plays there, the role it plays towards whom that progress is forwarded,
/// and where a progress notification is in what the peer sends.
pub(crate) trait TalliedSide: ServiceRole {
    /// The role of the routes the progress is counted into.
    type ForwardedTo: ServiceRole;

    /// The notification, if it is `notifications/progress`.
    fn progress(notification: &mut Self::PeerNot) -> Option<&mut ProgressNotification>;
}

/// [`TalliedSide`] for the role `$side`, whose peer's notifications are
/// `$notification`, forwarding to `$forwarded_to`: one body for both sides.
macro_rules! tallied_side {
    ($side:ty, $forwarded_to:ty, $notification:ident) => {
        impl TalliedSide for $side {
            type ForwardedTo = $forwarded_to;

            fn progress(notification: &mut $notification) -> Option<&mut ProgressNotification> {
                match notification {
                    $notification::ProgressNotification(progress) => Some(progress),
                    _ => None,
                }
            }
        }
    };
}

// The proxy as the upstream server's client: the server's progress.
tallied_side!(RoleClient, RoleServer, ServerNotification);
// The proxy as a downstream client's server: the client's progress, on the
// requests the upstream server sent it.
tallied_side!(RoleServer, RoleClient, ClientNotification);

impl<S: TalliedSide> OnReceive<S> for ProgressTally<S::ForwardedTo> {
    fn on_receive(&self, message: &mut RxJsonRpcMessage<S>) {
        let JsonRpcMessage::Notification(notification) = message else {
            return;
        };
        if let Some(progress) = S::progress(&mut notification.notification) {
            let receipt = self.routes.received(progress.params.progress_token.clone());
            progress.extensions.insert(receipt);
        }
    }
}
