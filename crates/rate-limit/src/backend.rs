//! [`RateLimitBackend`]: where a [`RateLimitLayer`](crate::RateLimitLayer)
//! takes its tokens when they live outside this process.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::quota::Quota;

/// The future a [`RateLimitBackend`] returns.
pub type BackendFuture = Pin<Box<dyn Future<Output = BackendDecision> + Send + 'static>>;

/// Takes rate-limit tokens for a [`RateLimitLayer`](crate::RateLimitLayer)
/// somewhere else than in this process (for example in Redis, shared by
/// every replica: `toolwarden_redis::RedisRateLimiter`).
///
/// Set one with [`RateLimitBuilder::backend`](crate::RateLimitBuilder::backend).
///
/// # What changes with a backend
///
/// Without a backend (the default) the layer decides in process, in `call`,
/// synchronously, allocating nothing. With one, for each limited call,
/// `call` builds an [`Acquire`] (the request's key as it appears in
/// [`RateLimited::key`](toolwarden_core::RateLimited::key), its per-key quota
/// — the tool's override or the `per_tool` quota — and the global quota) and
/// the response future asks the backend before it calls the inner service.
/// The backend answers with a [`BackendDecision`]:
///
/// - [`Admit`](BackendDecision::Admit): the call goes to the inner service.
/// - [`Refuse`](BackendDecision::Refuse): the call is refused with the same
///   [`RateLimited`](toolwarden_core::RateLimited) the local limiter gives
///   (key `global` or the request's key, the backend's `retry_after`), and a
///   `RateLimited` event is emitted.
/// - [`DecideLocally`](BackendDecision::DecideLocally): the backend could not
///   decide (its store is away) and wants the layer's own in-process quotas
///   to decide, exactly as without a backend.
///
/// Everything else is unchanged: requests that are not limited (not a
/// `tools/call`, unless all methods are limited) never reach the backend;
/// `poll_ready` is still the inner service's readiness; a limited call
/// gives that readiness up (the handle keeps a fresh clone, as tower does),
/// and its response future drives its own clone of the inner service to
/// readiness only once the backend has admitted the call, so a call waiting
/// for the backend holds no place in the service below. In [`Mode::Wait`](crate::Mode::Wait)
/// a refused call sleeps `retry_after` and asks the backend again, until
/// admitted or until the next try would come later than `max_wait` after the
/// call; the call then takes at most `max_wait` plus one backend answer.
///
/// # Contract for implementors
///
/// - Take one token from every quota of the [`Acquire`], or from none: a
///   quota that admits must not be spent when another refuses. Check the
///   per-key quota first, so that its refusal is the one reported.
/// - The returned future must resolve in bounded time, whatever the state of
///   the remote store: the layer puts no timeout around it. Map failures to
///   `Admit`, `Refuse` or `DecideLocally` by the backend's own policy; a
///   backend never fails a call with an error of its own.
/// - Do not emit `RateLimited` events: the layer does, once per refusal.
///
/// The backend future is boxed (a trait object must return one type); the
/// remote round trip it stands for costs far more than the allocation.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), toolwarden_core::BoxError> {
/// use std::time::Duration;
/// use serde_json::json;
/// use tower::{Layer, ServiceExt};
/// use toolwarden_core::{jsonrpc::Request, testing::MockMcp, RateLimited};
/// use toolwarden_rate_limit::{
///     Acquire, BackendDecision, BackendFuture, Rate, RateLimitBackend, RateLimitLayer, Scope,
/// };
///
/// /// Refuses every call to a tool named `forbidden`, admits the rest.
/// #[derive(Debug)]
/// struct DenyList;
///
/// impl RateLimitBackend for DenyList {
///     fn acquire(&self, acquire: &Acquire) -> BackendFuture {
///         let refused = acquire.key().is_some_and(|(key, _)| key == "forbidden");
///         Box::pin(async move {
///             if refused {
///                 BackendDecision::Refuse { scope: Scope::Key, retry_after: Duration::from_secs(5) }
///             } else {
///                 BackendDecision::Admit
///             }
///         })
///     }
/// }
///
/// let layer = RateLimitLayer::builder().per_tool(Rate::per_second(10), 10).backend(DenyList).build()?;
/// let svc = layer.layer(MockMcp::new());
/// svc.clone().oneshot(Request::tool_call(1, "search", json!({}))).await?;
/// let err = svc.oneshot(Request::tool_call(2, "forbidden", json!({}))).await.unwrap_err();
/// assert_eq!(err.downcast_ref::<RateLimited>().unwrap().key(), "forbidden");
/// # Ok(()) }
/// ```
pub trait RateLimitBackend: fmt::Debug + Send + Sync + 'static {
    /// Takes one token from every quota of `acquire` (per-key first, then
    /// global), or from none, and says so. Called once per limited call, and
    /// again after each wait in [`Mode::Wait`](crate::Mode::Wait).
    fn acquire(&self, acquire: &Acquire) -> BackendFuture;
}

/// Which quota refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The global quota: the refusal names the key `global`.
    Global,
    /// The per-key quota: the refusal names the request's key (the tool
    /// name, `session/tool`, ...).
    Key,
}

/// The quotas one call takes a token from, as a backend sees them.
///
/// ```
/// use std::time::Duration;
/// use toolwarden_rate_limit::{Acquire, Quota, Rate};
///
/// let acquire = Acquire::new(Some(("search".into(), Quota::new(Rate::per_second(2), 4).unwrap())), None);
/// let (key, quota) = acquire.key().unwrap();
/// assert_eq!(key, "search");
/// assert_eq!(quota.interval(), Duration::from_millis(500));
/// assert_eq!(acquire.global(), None);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acquire {
    key: Option<(Arc<str>, Quota)>,
    global: Option<Quota>,
}

impl Acquire {
    /// A call that takes a token from the quota of `key` (if any) and from
    /// the `global` quota (if any).
    #[must_use]
    pub fn new(key: Option<(Arc<str>, Quota)>, global: Option<Quota>) -> Self {
        Acquire { key, global }
    }

    /// The request's key, as it appears in
    /// [`RateLimited::key`](toolwarden_core::RateLimited::key) (the tool name,
    /// `session/tool`, `*` for [`KeyBy::Server`](toolwarden_core::KeyBy::Server),
    /// the custom key), and its quota: the tool's override or the `per_tool`
    /// quota. `None` when the call has no per-key quota.
    #[must_use]
    pub fn key(&self) -> Option<(&str, Quota)> {
        self.key.as_ref().map(|(key, quota)| (&**key, *quota))
    }

    /// The global quota, if any.
    #[must_use]
    pub fn global(&self) -> Option<Quota> {
        self.global
    }
}

/// A backend's answer for one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendDecision {
    /// Every quota admitted the call (and is spent by one token).
    Admit,
    /// A quota refused the call; nothing was spent.
    Refuse {
        /// Which quota refused.
        scope: Scope,
        /// When that quota would admit a call.
        retry_after: Duration,
    },
    /// The backend could not decide; the layer's in-process quotas decide.
    DecideLocally,
}
