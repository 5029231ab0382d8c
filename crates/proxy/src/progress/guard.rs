//! [`RouteGuard`]: the routes of one forwarded request, removed when it
//! ends, and the wait for its progress before its answer.

use std::fmt;
use std::sync::{Arc, Mutex};

use rmcp::model::ProgressToken;
use rmcp::service::{Peer, ServiceRole};

use super::{lock, ProgressMark, ProgressReceiver, ProgressRoutes, PROGRESS_FORWARD_LIMIT};

/// Removes the routes recorded for one forwarded request when it ends.
pub struct RouteGuard<R: ServiceRole> {
    routes: Arc<ProgressRoutes<R>>,
    tokens: Arc<Mutex<Vec<ProgressToken>>>,
    /// Where its progress goes, through one mark for all its attempts.
    to: Option<(Peer<R>, ProgressToken, ProgressMark)>,
}

impl<R: ServiceRole> fmt::Debug for RouteGuard<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteGuard")
            .field("tokens", &lock(&self.tokens).len())
            .field("routed", &self.to.is_some())
            .finish()
    }
}

impl<R: ServiceRole> RouteGuard<R> {
    /// A guard for a request whose progress goes to `to` (peer and its
    /// token), or nowhere.
    pub fn new(routes: Arc<ProgressRoutes<R>>, to: Option<(Peer<R>, ProgressToken)>) -> Self {
        Self::to_receiver(routes, to, None)
    }

    /// [`new`](Self::new), its progress sent to `receiver` (its share of
    /// the backlog, its stall watch: see [`ProgressReceiver`]).
    pub fn to_receiver(
        routes: Arc<ProgressRoutes<R>>,
        to: Option<(Peer<R>, ProgressToken)>,
        receiver: Option<Arc<ProgressReceiver>>,
    ) -> Self {
        RouteGuard {
            routes,
            tokens: Arc::default(),
            to: to.map(|(peer, token)| (peer, token, ProgressMark::new(receiver))),
        }
    }

    /// Records that an attempt of the request went out under `ours`.
    pub fn sent(&self, ours: &ProgressToken) {
        lock(&self.tokens).push(ours.clone());
        self.routes.insert_marked(ours.clone(), self.to.clone());
    }

    /// A hook recording each attempt, for `toolwarden_rmcp::OnRequestSent`.
    pub fn hook(&self) -> impl Fn(&ProgressToken) + Send + Sync + 'static {
        let routes = Arc::clone(&self.routes);
        let tokens = Arc::clone(&self.tokens);
        let to = self.to.clone();
        move |ours| {
            lock(&tokens).push(ours.clone());
            routes.insert_marked(ours.clone(), to.clone());
        }
    }

    /// Completes once every progress notification read so far for the
    /// request's attempts has been forwarded (or dropped); at once when there
    /// is none. Await it after the response arrived and before passing it
    /// on, so the receiver sees the progress first. It waits on the
    /// handler's tasks, so bound it ([`progress_first`](Self::progress_first)):
    /// a task that never finishes would stall it.
    pub async fn progress_forwarded(&self) {
        // Attempts are few and each is looked at once; indexing (rather
        // than copying the list) keeps the common case allocation-free.
        for attempt in 0.. {
            let Some(token) = lock(&self.tokens).get(attempt).cloned() else {
                return;
            };
            // The entry lives while this guard does, so its numbers hold.
            let read = self.routes.read_so_far(&token);
            self.routes.forwarded_below(&token, read).await;
        }
    }

    /// [`progress_forwarded`](Self::progress_forwarded), for at most
    /// [`PROGRESS_FORWARD_LIMIT`]: after that the answer goes out anyway.
    pub async fn progress_first(&self) {
        let forwarded = tokio::time::timeout(PROGRESS_FORWARD_LIMIT, self.progress_forwarded());
        if forwarded.await.is_err() {
            tracing::debug!(
                limit = ?PROGRESS_FORWARD_LIMIT,
                "progress still being forwarded; answering without waiting longer"
            );
        }
    }
}

impl<R: ServiceRole> Drop for RouteGuard<R> {
    fn drop(&mut self) {
        for token in lock(&self.tokens).drain(..) {
            self.routes.remove(&token);
        }
    }
}
