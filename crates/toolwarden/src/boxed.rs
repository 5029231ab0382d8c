//! Boxed response futures, for the standard stack's hedging.
//!
//! Hedging is the one layer of the stack that is an
//! [`Either`](tower::util::Either) of its service and the service below,
//! whose future is as large as the larger of its two sides. A hedged call's
//! future holds two attempts and a timer; unboxed, it would grow every
//! call's future by that much while hedging is off (the default), and that
//! future is moved at every level of the stack on every call. Boxed,
//! hedging costs one allocation per call when it is on, and nothing when it
//! is off.

use std::pin::Pin;
use std::task::{Context, Poll};

use tower_layer::Layer;
use tower_service::Service;

/// A service whose response futures are boxed ([`Pin<Box<F>>`]).
#[derive(Debug, Clone)]
pub struct BoxedFutures<S> {
    inner: S,
}

impl<S> BoxedFutures<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, R> Service<R> for BoxedFutures<S>
where
    S: Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        Box::pin(self.inner.call(request))
    }
}

/// Wraps the services of layer `L` in [`BoxedFutures`].
#[derive(Debug, Clone)]
pub struct BoxFuturesLayer<L> {
    layer: L,
}

impl<L> BoxFuturesLayer<L> {
    /// `layer`, whose services' futures are boxed.
    pub fn new(layer: L) -> Self {
        BoxFuturesLayer { layer }
    }
}

impl<L, S> Layer<S> for BoxFuturesLayer<L>
where
    L: Layer<S>,
{
    type Service = BoxedFutures<L::Service>;

    fn layer(&self, inner: S) -> Self::Service {
        BoxedFutures {
            inner: self.layer.layer(inner),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_future_is_a_pointer_and_answers_what_the_inner_one_does() {
        let svc = tower::service_fn(|n: u32| async move { Ok::<_, ()>(n + 1) });
        let mut boxed = BoxFuturesLayer::new(tower::layer::util::Identity::new()).layer(svc);
        let future = boxed.call(41);
        assert_eq!(std::mem::size_of_val(&future), std::mem::size_of::<usize>());
        assert_eq!(future.await, Ok(42));
    }
}
