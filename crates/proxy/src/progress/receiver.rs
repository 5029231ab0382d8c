//! [`ProgressMark`] and [`ProgressReceiver`]: what one receiver of progress
//! is sent, kept increasing, bounded per receiver, and watched for a stall.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::{lock, PROGRESS_SEND_LIMIT};
use crate::downstream::Disconnect;

/// The most progress notifications for one receiver (one downstream
/// client) waiting to be forwarded, out of the upstream connection's
/// backlog of 1 024: past it the newest for that receiver is dropped. So a
/// client that stops reading its call's stream takes a quarter of the
/// places, not all of them (it took all of them, and every other client's
/// progress was dropped), until it is disconnected for not reading; and a
/// client that reads has room for bursts (a few dozen calls' progress at
/// once).
pub const PROGRESS_PER_RECEIVER: usize = 256;

/// One downstream client as a receiver of progress: its places in the
/// backlog, and whether it still takes what is sent. A client whose
/// progress sends keep running into [`PROGRESS_SEND_LIMIT`] for
/// `limits.client_stall_timeout` is not reading: it is disconnected, as a
/// client that does not take its notifications is (over HTTP its session
/// is closed and its connections dropped, which also frees the session's
/// other requests, stuck behind its unread stream).
pub struct ProgressReceiver {
    waiting: AtomicUsize,
    stalled_since: Mutex<Option<Instant>>,
    stall: Duration,
    disconnect: Option<Disconnect>,
    disconnected: AtomicBool,
}

impl fmt::Debug for ProgressReceiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProgressReceiver")
            .field("waiting", &self.waiting.load(Ordering::Relaxed))
            .field("stall", &self.stall)
            .field("disconnected", &self.disconnected.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl ProgressReceiver {
    /// A receiver that is not reading once its sends have timed out for
    /// `stall`; then `disconnect` ends its session.
    #[must_use]
    pub fn new(stall: Duration, disconnect: Option<Disconnect>) -> Self {
        ProgressReceiver {
            waiting: AtomicUsize::new(0),
            stalled_since: Mutex::new(None),
            stall,
            disconnect,
            disconnected: AtomicBool::new(false),
        }
    }

    /// Progress notifications for it waiting to be forwarded now.
    #[must_use]
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Whether it was disconnected for not reading.
    #[must_use]
    pub fn is_disconnected(&self) -> bool {
        self.disconnected.load(Ordering::Acquire)
    }

    fn enter(self: &Arc<Self>) -> Option<ReceiverPlace> {
        self.waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < PROGRESS_PER_RECEIVER).then_some(n + 1)
            })
            .ok()
            .map(|_| ReceiverPlace(Some(Arc::clone(self))))
    }

    fn sent(&self) {
        lock(&self.stalled_since).take();
    }

    /// A send ran into its limit: the first starts the stall's clock; one
    /// past `stall` since then disconnects (once).
    fn timed_out(&self) {
        let now = Instant::now();
        let since = *lock(&self.stalled_since).get_or_insert(now);
        if now.saturating_duration_since(since) < self.stall
            || self.disconnected.swap(true, Ordering::AcqRel)
        {
            return;
        }
        tracing::warn!(
            stall = ?self.stall,
            "a client has not taken its progress for the stall timeout: it is disconnected"
        );
        metrics::counter!("toolwarden_proxy_clients_disconnected_total", "reason" => "stalled")
            .increment(1);
        if let Some(disconnect) = &self.disconnect {
            disconnect();
        }
    }
}

/// A place of a receiver's ([`ProgressMark::enter`]), given back when
/// dropped; none to give back for a receiver not watched.
#[derive(Debug)]
pub struct ReceiverPlace(Option<Arc<ProgressReceiver>>);

impl Drop for ReceiverPlace {
    fn drop(&mut self) {
        if let Some(receiver) = &self.0 {
            receiver.waiting.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// The progress last forwarded under one receiver's token, shared by every
/// route to it: a request's attempts (retries) and hedged copies each go
/// out under a token of their own, and each restarts its progress, so
/// without it the receiver saw `1, 2, 3, 1, 2, 3` (retried) or `1, 2, 1, 3,
/// 2` (hedged). Progress must increase (MCP): a value not above the last one
/// forwarded is dropped. Locked across the send, so two routes' sends cannot
/// overtake each other either. With the [`ProgressReceiver`] it is sent to,
/// when known.
#[derive(Debug, Clone, Default)]
pub struct ProgressMark(Arc<Mark>);

#[derive(Debug, Default)]
struct Mark {
    last: tokio::sync::Mutex<Option<f64>>,
    receiver: Option<Arc<ProgressReceiver>>,
}

/// What [`ProgressMark::forward`] did with a notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarded {
    /// Sent.
    Sent,
    /// Not above the last value sent: dropped.
    NotIncreasing,
    /// The send failed (the peer is gone).
    Failed,
    /// The send ran into [`PROGRESS_SEND_LIMIT`].
    TimedOut,
}

impl ProgressMark {
    /// A mark for progress sent to `receiver` (`None`: a receiver not
    /// watched, such as the server).
    #[must_use]
    pub fn new(receiver: Option<Arc<ProgressReceiver>>) -> Self {
        ProgressMark(Arc::new(Mark {
            last: tokio::sync::Mutex::new(None),
            receiver,
        }))
    }

    /// A place for one more notification to its receiver, held while it
    /// waits and is sent; `None` when the receiver has
    /// [`PROGRESS_PER_RECEIVER`] waiting already (drop it) or was
    /// disconnected. Always a place without a receiver.
    #[must_use]
    pub fn enter(&self) -> Option<ReceiverPlace> {
        match &self.0.receiver {
            None => Some(ReceiverPlace(None)),
            Some(receiver) if receiver.is_disconnected() => None,
            Some(receiver) => receiver.enter(),
        }
    }

    /// Runs `send` (for at most [`PROGRESS_SEND_LIMIT`]) if `progress` is
    /// above the last value forwarded (and records it); drops it otherwise.
    pub async fn forward<E: fmt::Display>(
        &self,
        progress: f64,
        send: impl Future<Output = Result<(), E>>,
    ) -> Forwarded {
        let mut last = self.0.last.lock().await;
        if last.is_some_and(|last| progress <= last) {
            return Forwarded::NotIncreasing;
        }
        *last = Some(progress);
        let outcome = match tokio::time::timeout(PROGRESS_SEND_LIMIT, send).await {
            Ok(Ok(())) => Forwarded::Sent,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "could not forward progress");
                Forwarded::Failed
            }
            Err(_) => {
                tracing::debug!(
                    limit = ?PROGRESS_SEND_LIMIT,
                    "forwarding progress is slow; no longer waiting for it"
                );
                Forwarded::TimedOut
            }
        };
        if let Some(receiver) = &self.0.receiver {
            match outcome {
                Forwarded::Sent => receiver.sent(),
                Forwarded::TimedOut => receiver.timed_out(),
                Forwarded::Failed | Forwarded::NotIncreasing => {}
            }
        }
        outcome
    }
}
