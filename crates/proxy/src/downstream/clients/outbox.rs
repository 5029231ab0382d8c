//! Each client's notification queue and the task that sends it.

use std::time::Duration;

use rmcp::model::ServerNotification;
use rmcp::service::{Peer, RoleServer};

use super::{Disconnect, Downstream, NOTIFICATION_QUEUE};

/// Queues `notification` for `client`; `false` when the client is not
/// reading (its queue is full, or its sender gave up), so it is dropped
/// (and, for a full queue, disconnected). A client that cannot be
/// disconnected (stdio's one client) is never dropped: a full queue costs
/// it that notification only. It was dropped for good after one burst of
/// over 256 notifications, and got no notification, and was asked none of
/// the server's requests, for the rest of the session.
pub(super) fn queue(client: &Downstream, notification: ServerNotification) -> bool {
    use tokio::sync::mpsc::error::TrySendError;
    match client.outbox.try_send(notification) {
        Ok(()) => true,
        Err(TrySendError::Full(_)) if client.disconnect.is_none() => {
            metrics::counter!("toolwarden_proxy_notifications_dropped_total").increment(1);
            tracing::debug!(
                client = client.id,
                "a client is {NOTIFICATION_QUEUE} notifications behind: this one is dropped"
            );
            true
        }
        Err(TrySendError::Full(_)) => {
            tracing::warn!(
                client = client.id,
                "a client is not reading its notifications ({NOTIFICATION_QUEUE} waiting): it gets no more"
            );
            disconnect_stalled(client.disconnect.as_ref());
            false
        }
        Err(TrySendError::Closed(_)) => false,
    }
}

/// Disconnects a client that stopped reading, and counts it.
fn disconnect_stalled(disconnect: Option<&Disconnect>) {
    metrics::counter!("toolwarden_proxy_clients_disconnected_total", "reason" => "stalled")
        .increment(1);
    if let Some(disconnect) = disconnect {
        disconnect();
    }
}

/// The task that sends a client's queued notifications, in order, each
/// within `stall`; it ends (closing the queue) when the client goes or
/// stalls, and a stalled client is disconnected.
pub(super) fn spawn_outbox(
    peer: Peer<RoleServer>,
    stall: Duration,
    disconnect: Option<Disconnect>,
) -> tokio::sync::mpsc::Sender<ServerNotification> {
    let (outbox, mut queued) = tokio::sync::mpsc::channel(NOTIFICATION_QUEUE);
    tokio::spawn(async move {
        while let Some(notification) = queued.recv().await {
            match tokio::time::timeout(stall, peer.send_notification(notification)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::debug!(%error, "could not forward a notification");
                    if peer.is_transport_closed() {
                        break;
                    }
                }
                Err(_) if disconnect.is_none() => {
                    // Nothing to disconnect (stdio's one client): the
                    // notification is lost, the next ones still go.
                    metrics::counter!("toolwarden_proxy_notifications_dropped_total").increment(1);
                    tracing::debug!("a client took over {stall:?} to take a notification");
                }
                Err(_) => {
                    tracing::warn!(
                        "a client took over {stall:?} to take a notification: it gets no more"
                    );
                    disconnect_stalled(disconnect.as_ref());
                    break;
                }
            }
        }
    });
    outbox
}
