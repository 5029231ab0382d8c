//! [`Coalesce`]: the service built by [`CoalesceLayer`].

use std::any::Any;
use std::sync::Arc;
use std::task::{Context, Poll};

use toolwarden_core::{call_fingerprint, BoxError, Event, McpRequest, McpResponse};
use tower_service::Service;

use crate::call::LEADER;
use crate::future::{Recall, ResponseFuture};
use crate::inflight::{CallKey, ErasedMap, InFlight, Joined};
use crate::layer::{CoalesceLayer, Shared};

/// Lets identical concurrent tool calls share one call of the inner
/// service. Clones share the map of calls in flight (and so do all
/// services built from one [`CoalesceLayer`]).
///
/// `poll_ready` is the inner service's readiness. `call` decides: a
/// `tools/call` of a tool that [coalesces](CoalesceLayer::coalesces), not
/// a continuation, joins the identical call in flight (same fingerprint of
/// tool and arguments, `_meta` ignored) if there is one, without calling
/// the inner service (the readiness it reserved stays for the next call);
/// otherwise it calls the inner service and others may join it. Every
/// other request is passed to the inner service untouched.
#[derive(Clone)]
pub struct Coalesce<S> {
    inner: S,
    shared: Arc<Shared>,
    /// The layer's map for this service's future type, found once (as
    /// `Any`: a call's downcast is then one type check).
    map: Option<Arc<dyn Any + Send + Sync>>,
    /// Forwards every call untouched (see [`Coalesce::passthrough`]).
    passthrough: bool,
}

impl<S: std::fmt::Debug> std::fmt::Debug for Coalesce<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalesce")
            .field("inner", &self.inner)
            .field("shared", &self.shared)
            .field("passthrough", &self.passthrough)
            .finish_non_exhaustive()
    }
}

impl<S> Coalesce<S> {
    /// Shares the calls of `inner` through the map of `layer` (the same as
    /// `layer.layer(inner)`).
    pub fn new(inner: S, layer: &CoalesceLayer) -> Self {
        Coalesce {
            inner,
            shared: Arc::clone(layer.shared()),
            map: None,
            passthrough: false,
        }
    }

    /// This service, forwarding every call to the inner service untouched: no
    /// call is shared. The standard stack builds this for the layer when it is
    /// left out, so that its type names each layer once.
    #[must_use]
    pub fn passthrough(mut self) -> Self {
        self.passthrough = true;
        self
    }

    /// Whether calls pass through untouched ([`passthrough`](Self::passthrough)).
    #[must_use]
    pub fn is_passthrough(&self) -> bool {
        self.passthrough
    }

    /// The inner service.
    #[must_use]
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    #[must_use]
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the service, returning the inner one.
    #[must_use]
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, R> Service<R> for Coalesce<S>
where
    R: McpRequest + Send + 'static,
    S: Service<R> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    S::Response: McpResponse + Clone + Send + Sync + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, request: R) -> Self::Future {
        let shareable = !self.passthrough
            && request.is_tool_call()
            && !request.is_continuation()
            && request
                .tool_name()
                .is_some_and(|tool| self.shared.config.coalesces(tool));
        if !shareable {
            return ResponseFuture::direct(self.inner.call(request));
        }
        self.call_shared(request)
    }
}

impl<S> Coalesce<S> {
    #[inline(never)]
    fn call_shared<R>(&mut self, mut request: R) -> ResponseFuture<S::Future>
    where
        R: McpRequest + Send + 'static,
        S: Service<R> + Clone + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        S::Response: McpResponse + Clone + Send + Sync + 'static,
    {
        let Some(fingerprint) = call_fingerprint(&mut request) else {
            return ResponseFuture::direct(self.inner.call(request));
        };
        let session = match self.shared.config.per_session {
            true => Some(Arc::from(request.session_key().unwrap_or("-"))),
            false => None,
        };
        let key = CallKey {
            fingerprint,
            session,
        };
        if self.map.is_none() {
            let map: Arc<dyn ErasedMap> = self.shared.map::<S::Future>();
            self.map = Some(map);
        }
        let Some(map) = self
            .map
            .as_deref()
            .and_then(|map| map.downcast_ref::<InFlight<S::Future>>())
        else {
            return ResponseFuture::direct(self.inner.call(request));
        };
        let inner = &mut self.inner;
        let mut pending = Some(request);
        let joined = map.join(key, || {
            #[allow(clippy::expect_used)] // invariant: `join` calls it at most once
            let request = pending.take().expect("the request is still here");
            inner.call(request)
        });
        match joined {
            // The inner service answered the leader's own request: its
            // answer carries the leader's id already.
            Joined::Leader(call) => ResponseFuture::shared(call, LEADER, None, None),
            Joined::Follower(call, place) => {
                let id = pending.as_ref().and_then(|request| {
                    self.shared.config.events.emit(&Event::Coalesced {
                        key: request.target(),
                    });
                    request.request_id().cloned()
                });
                let recall = pending
                    .take()
                    .map(|request| recall(self.inner.clone(), request));
                ResponseFuture::shared(call, place, id, recall)
            }
            Joined::Alone => match pending.take() {
                Some(request) => ResponseFuture::direct(self.inner.call(request)),
                None => unreachable_alone(),
            },
        }
    }
}

/// A follower's own call of `service` with `request`, should the shared
/// call answer with a task: made only then (waiting for the service's
/// readiness first, as a call must).
fn recall<S, R>(mut service: S, request: R) -> Recall<S::Response>
where
    R: Send + 'static,
    S: Service<R> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    Box::new(move || {
        Box::pin(async move {
            futures_util::future::poll_fn(|cx| service.poll_ready(cx))
                .await
                .map_err(Into::into)?;
            service.call(request).await.map_err(Into::into)
        })
    })
}

#[cold]
#[allow(clippy::panic)]
fn unreachable_alone() -> ! {
    panic!("a call made on its own had its request taken")
}
