//! [`ProgressReceipt`]: one progress notification counted and not yet
//! forwarded; [`send_in_turn`]: forwarding it in its token's order.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use rmcp::model::ProgressToken;
use rmcp::service::ServiceRole;

use super::{Forwarded, ProgressMark, ProgressRoutes, PROGRESS_TURN_LIMIT};

/// A progress notification counted by [`ProgressRoutes::received`] and not
/// yet forwarded, with its number within its token. It rides in the
/// notification's extensions; the handler waits for its turn
/// ([`take_turn`](Self::take_turn)) and drops it once the notification is
/// forwarded (or dropped). Clones share it: the notification counts as
/// forwarded when the last one is dropped.
pub struct ProgressReceipt<R: ServiceRole>(pub(super) Arc<Receipt<R>>);

pub(super) struct Receipt<R: ServiceRole> {
    pub(super) routes: Arc<ProgressRoutes<R>>,
    pub(super) token: ProgressToken,
    pub(super) number: u64,
}

impl<R: ServiceRole> Drop for Receipt<R> {
    fn drop(&mut self) {
        self.routes.done(&self.token, self.number);
    }
}

impl<R: ServiceRole> ProgressReceipt<R> {
    /// Completes once every progress read before this one under its token
    /// has been forwarded (or dropped): forward it then, and its token's
    /// progress goes out in the order it was read. Unbounded: see
    /// [`take_turn`](Self::take_turn).
    pub async fn turn(&self) {
        let receipt = &self.0;
        receipt
            .routes
            .forwarded_below(&receipt.token, receipt.number)
            .await;
    }

    /// [`turn`](Self::turn), for at most [`PROGRESS_TURN_LIMIT`]: a task
    /// stuck forwarding an earlier notification delays this one by that much
    /// at most. Whether the turn came in time.
    pub async fn take_turn(&self) -> bool {
        let in_time = tokio::time::timeout(PROGRESS_TURN_LIMIT, self.turn())
            .await
            .is_ok();
        if !in_time {
            tracing::debug!(
                token = ?self.0.token,
                limit = ?PROGRESS_TURN_LIMIT,
                "earlier progress still being forwarded; forwarding this one without waiting longer"
            );
        }
        in_time
    }
}

/// Forwards one progress notification (of value `progress`) in its turn:
/// waits for the progress read before it under its token
/// ([`ProgressReceipt::take_turn`], skipped without a receipt), runs `send`
/// (for at most [`PROGRESS_SEND_LIMIT`](super::PROGRESS_SEND_LIMIT)) through the receiver's `mark`
/// (which drops a value not above the last one forwarded to that receiver's
/// token: [`ProgressMark::forward`]), then drops the receipt so the next
/// one's turn comes. Everything it waits for is bounded (the mark is held
/// by sends only), so a receipt is held for at most the two limits plus the
/// sends of the receiver's other routes.
pub async fn send_in_turn<R, E>(
    receipt: Option<ProgressReceipt<R>>,
    mark: &ProgressMark,
    progress: f64,
    send: impl Future<Output = Result<(), E>>,
) where
    R: ServiceRole,
    E: fmt::Display,
{
    if let Some(receipt) = &receipt {
        receipt.take_turn().await;
    }
    if mark.forward(progress, send).await == Forwarded::NotIncreasing {
        metrics::counter!("toolwarden_proxy_progress_not_increasing_total").increment(1);
        tracing::debug!(progress, "progress not above the last forwarded; dropped");
    }
    drop(receipt);
}

impl<R: ServiceRole> Clone for ProgressReceipt<R> {
    fn clone(&self) -> Self {
        ProgressReceipt(Arc::clone(&self.0))
    }
}

impl<R: ServiceRole> fmt::Debug for ProgressReceipt<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProgressReceipt")
            .field("token", &self.0.token)
            .field("number", &self.0.number)
            .finish()
    }
}
