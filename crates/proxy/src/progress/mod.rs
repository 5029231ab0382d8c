//! Progress between the two sides of the proxy: where a progress
//! notification goes, and that it arrives in order and before the answer
//! of its request.
//!
//! rmcp replaces the `progressToken` of every request it sends with one of its
//! own. So when the proxy forwards a request that carries a client's token,
//! it records "our token → (that client, its token)" once the request has been
//! sent, and a `notifications/progress` for our token is re-addressed to the
//! client with the client's token. The same holds the other way round for
//! requests the server sends to a client (sampling, roots, elicitation).
//!
//! A route lives as long as its request is in flight ([`RouteGuard`] removes
//! it), so the map holds one entry per in-flight request attempt, plus one
//! per token whose progress is being forwarded just then (see
//! [`ProgressRoutes`]).
//!
//! A token is only unique within the peer that numbered it: rmcp numbers the
//! tokens of each peer from 0. Upstream there is one map, for the tokens of
//! the one connection to the server. Downstream, each client has a map of
//! its own ([`Downstreams`](crate::downstream::Downstreams) registers it with its client): over Streamable
//! HTTP each session has its own peer, so two sessions can each be sent a
//! request of the server's under the same token at the same time, and one
//! shared map would mix up their progress.
//!
//! A progress notification can arrive before the route of its request is
//! recorded (the token is known only once rmcp queued the request); the
//! receiving side waits a little for an unknown token ([`ProgressRoutes::resolve`]).
//!
//! # Order
//!
//! rmcp handles each incoming notification in a task of its own, but hands a
//! response straight to the request waiting for it. Left alone, a response
//! could overtake the progress sent before it, and two progress
//! notifications of one token could overtake each other. So, in both
//! directions (server → client for the requests the proxy forwards upstream,
//! client → server for the requests the server sends a client):
//!
//! - The transport that reads the sender's messages counts each progress
//!   notification as it reads it ([`ProgressRoutes::received`]) and numbers
//!   it within its token (0, 1, 2, ... in the order read). The notification
//!   carries a [`ProgressReceipt`] with that number to its handler.
//! - The handler forwards a token's notifications in that order
//!   ([`send_in_turn`]): each waits for its turn (up to
//!   [`PROGRESS_TURN_LIMIT`]), is sent (waiting up to
//!   [`PROGRESS_SEND_LIMIT`] for the send), and drops its receipt. A receipt
//!   dropped for any other reason (the notification was not forwarded, its
//!   task was aborted, rmcp dropped the message) ends its turn all the same.
//! - The answer to a request is passed on only once every progress read for
//!   its tokens before the answer has been forwarded
//!   ([`RouteGuard::progress_first`], up to [`PROGRESS_FORWARD_LIMIT`]).
//!   Messages are read in order, so that is all the progress the sender sent
//!   before its answer.
//!
//! - A request retried or hedged goes out once per attempt, each under a
//!   token of its own whose progress starts again; the attempts' routes
//!   share one [`ProgressMark`] (the receiver's token's last value sent),
//!   which drops a value not above it, so the receiver's progress keeps
//!   increasing.
//!
//! Guaranteed, then, as long as no wait runs into its limit (only a peer that
//! does not take what is sent to it makes one): every progress the sender
//! sent before its answer reaches the receiver before that answer, and a
//! token's progress reaches it in the order the sender sent it. Progress the
//! sender sends after its answer is forwarded while the request's route
//! lives, in order, and is dropped once it is gone.
//!
//! - [`ProgressRoutes`] (`routes.rs`): our tokens → their destinations, with
//!   each token's tally of progress read and forwarded.
//! - [`ProgressReceipt`] and [`send_in_turn`] (`receipt.rs`): one progress
//!   notification counted and not yet forwarded; forwarding in turn.
//! - [`RouteGuard`] (`guard.rs`): a forwarded request's routes, and the
//!   wait for its progress before its answer.
//! - `ProgressTally` (`tally.rs`): the transport hook that counts each
//!   progress notification as it is read, on either side.

mod guard;
mod receipt;
mod receiver;
mod routes;
mod tally;
#[cfg(test)]
mod tests;

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

pub use guard::RouteGuard;
pub use receipt::{send_in_turn, ProgressReceipt};
pub use receiver::{
    Forwarded, ProgressMark, ProgressReceiver, ReceiverPlace, PROGRESS_PER_RECEIVER,
};
pub use routes::{ProgressRoutes, Resolved};
pub(crate) use tally::ProgressTally;

/// How long an unknown progress token is waited for, in total.
pub(crate) const UNKNOWN_TOKEN_WAIT: Duration = Duration::from_millis(200);
pub(crate) const UNKNOWN_TOKEN_POLL: Duration = Duration::from_millis(10);

/// How long an answer waits for the progress read before it to be forwarded
/// ([`RouteGuard::progress_first`]); normally no time at all, as forwarding
/// is one send to a peer. A peer too slow to take the progress in that time
/// gets the answer anyway.
pub const PROGRESS_FORWARD_LIMIT: Duration = Duration::from_secs(1);

/// How long a progress notification waits for the ones read before it under
/// its token to be forwarded ([`ProgressReceipt::take_turn`]); normally no
/// time at all. Past it, the notification is forwarded anyway.
pub const PROGRESS_TURN_LIMIT: Duration = Duration::from_secs(1);

/// How long forwarding one progress notification is waited for once its
/// turn came ([`send_in_turn`]); normally no time at all. Past it the
/// notification's turn passes: rmcp may still send it later, or drop it if
/// the peer's queue is full.
pub const PROGRESS_SEND_LIMIT: Duration = Duration::from_secs(1);

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps hold plain data: a panic elsewhere cannot leave them inconsistent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
