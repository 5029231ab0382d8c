//! [`ServiceBuilderExt`]: one `ServiceBuilder` method per toolwarden layer.

use tower::layer::util::Stack;
use tower::ServiceBuilder;

use crate::render::RenderErrorsLayer;

mod sealed {
    pub trait Sealed {}
    impl<L> Sealed for tower::ServiceBuilder<L> {}
}

/// Adds toolwarden's layers to a [`ServiceBuilder`], one method per layer,
/// each taking the built layer (so its configuration was validated).
/// Sealed: implemented for `ServiceBuilder` only.
///
/// ```
/// # #[cfg(all(feature = "circuit-breaker", feature = "retry"))] {
/// use tower::ServiceBuilder;
/// use toolwarden::ServiceBuilderExt;
/// use toolwarden::circuit_breaker::CircuitBreakerLayer;
/// use toolwarden::retry::RetryBackoffLayer;
/// use toolwarden_core::testing::MockMcp;
///
/// let svc = ServiceBuilder::new()
///     .render_errors()
///     .retry_backoff(RetryBackoffLayer::builder().max_attempts(2).build().unwrap())
///     .circuit_breaker(CircuitBreakerLayer::builder().build().unwrap())
///     .service(MockMcp::new());
/// # let _ = svc;
/// # }
/// ```
pub trait ServiceBuilderExt<L>: sealed::Sealed + Sized {
    /// Renders errors of tool calls into `isError` results (outermost).
    fn render_errors(self) -> ServiceBuilder<Stack<RenderErrorsLayer, L>>;

    /// Adds the observability layer.
    #[cfg(feature = "observability")]
    fn observability<C>(
        self,
        layer: toolwarden_observability::ObservabilityLayer<C>,
    ) -> ServiceBuilder<Stack<toolwarden_observability::ObservabilityLayer<C>, L>>;

    /// Adds the loop guard.
    #[cfg(feature = "loop-guard")]
    fn loop_guard<C>(
        self,
        layer: toolwarden_loop_guard::LoopGuardLayer<C>,
    ) -> ServiceBuilder<Stack<toolwarden_loop_guard::LoopGuardLayer<C>, L>>;

    /// Adds the fallback cache.
    #[cfg(feature = "fallback-cache")]
    fn fallback_cache<C>(
        self,
        layer: toolwarden_fallback_cache::FallbackCacheLayer<C>,
    ) -> ServiceBuilder<Stack<toolwarden_fallback_cache::FallbackCacheLayer<C>, L>>;

    /// Adds retry with backoff.
    #[cfg(feature = "retry")]
    fn retry_backoff<C>(
        self,
        layer: toolwarden_retry::RetryBackoffLayer<C>,
    ) -> ServiceBuilder<Stack<toolwarden_retry::RetryBackoffLayer<C>, L>>;

    /// Adds the rate limit.
    #[cfg(feature = "rate-limit")]
    fn rate_limit(
        self,
        layer: toolwarden_rate_limit::RateLimitLayer,
    ) -> ServiceBuilder<Stack<toolwarden_rate_limit::RateLimitLayer, L>>;

    /// Adds the circuit breaker.
    #[cfg(feature = "circuit-breaker")]
    fn circuit_breaker<C>(
        self,
        layer: toolwarden_circuit_breaker::CircuitBreakerLayer<C>,
    ) -> ServiceBuilder<Stack<toolwarden_circuit_breaker::CircuitBreakerLayer<C>, L>>;
}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    fn render_errors(self) -> ServiceBuilder<Stack<RenderErrorsLayer, L>> {
        self.layer(RenderErrorsLayer::new())
    }

    #[cfg(feature = "observability")]
    fn observability<C>(
        self,
        layer: toolwarden_observability::ObservabilityLayer<C>,
    ) -> ServiceBuilder<Stack<toolwarden_observability::ObservabilityLayer<C>, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "loop-guard")]
    fn loop_guard<C>(
        self,
        layer: toolwarden_loop_guard::LoopGuardLayer<C>,
    ) -> ServiceBuilder<Stack<toolwarden_loop_guard::LoopGuardLayer<C>, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "fallback-cache")]
    fn fallback_cache<C>(
        self,
        layer: toolwarden_fallback_cache::FallbackCacheLayer<C>,
    ) -> ServiceBuilder<Stack<toolwarden_fallback_cache::FallbackCacheLayer<C>, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "retry")]
    fn retry_backoff<C>(
        self,
        layer: toolwarden_retry::RetryBackoffLayer<C>,
    ) -> ServiceBuilder<Stack<toolwarden_retry::RetryBackoffLayer<C>, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "rate-limit")]
    fn rate_limit(
        self,
        layer: toolwarden_rate_limit::RateLimitLayer,
    ) -> ServiceBuilder<Stack<toolwarden_rate_limit::RateLimitLayer, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "circuit-breaker")]
    fn circuit_breaker<C>(
        self,
        layer: toolwarden_circuit_breaker::CircuitBreakerLayer<C>,
    ) -> ServiceBuilder<Stack<toolwarden_circuit_breaker::CircuitBreakerLayer<C>, L>> {
        self.layer(layer)
    }
}
