//! The [`FallbackCache`] service.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwapOption;
use toolwarden_core::{BoxError, Classify, Fingerprint, McpClassifier, McpRequest, McpResponse};
use tower_service::Service;

use crate::cache::ResultCache;
use crate::fallback::{CallContext, CallFacts};
use crate::future::ResponseFuture;
use crate::layer::{Config, FallbackCacheLayer};
use crate::rank::AlternativeRanker;

/// What every service built from one layer (and its clones) shares.
pub(crate) struct Shared {
    pub(crate) config: Arc<Config>,
    pub(crate) cache: ResultCache,
    /// The index of the catalog, rebuilt when the catalog's version changes.
    ranker: ArcSwapOption<VersionedRanker>,
}

/// An index of the catalog and the catalog version it was built from.
#[derive(Debug)]
pub(crate) struct VersionedRanker {
    version: u64,
    pub(crate) ranker: AlternativeRanker,
}

impl Shared {
    /// An empty cache and no index yet, for `config`.
    pub(crate) fn new(config: Config) -> Self {
        let cache = ResultCache::new(
            u64::try_from(config.max_entries).unwrap_or(u64::MAX),
            u64::try_from(config.max_bytes).unwrap_or(u64::MAX),
            config.max_staleness,
        );
        Shared {
            config: Arc::new(config),
            cache,
            ranker: ArcSwapOption::empty(),
        }
    }

    /// The ranker for the catalog as it is now. Built on first use and after
    /// each catalog change, on the failure path only; two failures racing
    /// on a change may both build it, which is harmless.
    pub(crate) fn ranker(&self) -> Arc<VersionedRanker> {
        let version = self.config.catalog.version();
        if let Some(current) = self.ranker.load_full() {
            if current.version == version {
                return current;
            }
        }
        let fresh = Arc::new(VersionedRanker {
            version,
            ranker: AlternativeRanker::from_catalog(&self.config.catalog)
                .with_min_relevance(self.config.min_relevance),
        });
        self.ranker.store(Some(Arc::clone(&fresh)));
        fresh
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

/// Serves the last good result of a failed tool call, marked stale, or a
/// structured `isError` result with alternatives. Built by
/// [`FallbackCacheLayer`]; see the [crate docs](crate) for the rules.
///
/// Every service built from one layer, and every clone, shares one cache.
#[derive(Debug, Clone)]
pub struct FallbackCache<S, C = McpClassifier> {
    inner: S,
    shared: Arc<Shared>,
    classifier: C,
    /// Forwards every call untouched (see [`FallbackCache::passthrough`]).
    passthrough: bool,
}

impl<S, C: Clone> FallbackCache<S, C> {
    /// Wraps `inner` with the configuration of `layer` and the cache it
    /// holds: every service built from one layer (and from its clones)
    /// shares one cache.
    pub fn new(inner: S, layer: &FallbackCacheLayer<C>) -> Self {
        FallbackCache {
            inner,
            shared: Arc::clone(&layer.shared),
            classifier: layer.classifier.clone(),
            passthrough: false,
        }
    }
}

impl<S, C> FallbackCache<S, C> {
    /// This service, forwarding every call to the inner service untouched:
    /// nothing stored or served from the cache, no degraded answer. The
    /// standard stack builds this for the layer when it is left out, so that
    /// its type names each layer once.
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
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the wrapper, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// How many results the cache holds now.
    pub fn cached_results(&self) -> usize {
        self.shared.cache.len()
    }
}

impl<S, C, R> Service<R> for FallbackCache<S, C>
where
    R: McpRequest,
    S: Service<R>,
    S::Response: McpResponse + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    C: Classify<S::Response>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, S::Response, C>;

    /// Readiness is the inner service's: a fresh answer from the cache also
    /// waits for it, because the request (and so whether it will hit) is
    /// not known yet. An error here has no request to answer, so it is
    /// passed up unchanged.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: R) -> Self::Future {
        if self.passthrough {
            return ResponseFuture::passthrough(self.inner.call(req));
        }
        let config = &self.shared.config;
        let Some(tool) = req.tool_name() else {
            return ResponseFuture::passthrough(self.inner.call(req));
        };
        let cacheable = !req.is_continuation() && config.catalog.is_cacheable(tool);
        if !cacheable && !config.degrade {
            // Nothing to store, serve or rewrite.
            return ResponseFuture::passthrough(self.inner.call(req));
        }
        // Read from the request when an earlier layer computed it; otherwise
        // computed here from the tool name already read (as
        // `call_fingerprint` would), and stored in the request below, only
        // if the call goes on to the layers under this one.
        let (fingerprint, computed) = if !cacheable {
            (None, false)
        } else if let Some(known) = req.extension::<Fingerprint>() {
            (Some(*known), false)
        } else {
            let computed = toolwarden_core::fingerprint(tool, req.arguments());
            (Some(computed), true)
        };
        // What the result is stored under: the call, or the call in its
        // session.
        let key = match (fingerprint, config.per_session) {
            (Some(fingerprint), true) => {
                Some(fingerprint.scoped(req.session_key().unwrap_or_default()))
            }
            (key, _) => key,
        };
        let id = req.request_id().cloned();
        if let (Some(key), Some(ttl)) = (key, config.fresh_ttl) {
            if let Some((mut response, _age)) =
                self.shared
                    .cache
                    .lookup::<S::Response>(&key, ttl, toolwarden_core::time::now())
            {
                // The inner service's readiness is not consumed: it stays
                // reserved for the next call.
                if let Some(id) = &id {
                    response.set_request_id(id);
                }
                return ResponseFuture::answered(response);
            }
        }
        let rank = config.degrade && config.alternatives > 0;
        let facts = CallFacts::of(&req, tool, rank);
        if let (Some(fingerprint), true) = (fingerprint, computed) {
            req.insert_extension(fingerprint);
        }
        let context = CallContext {
            shared: Arc::clone(&self.shared),
            classifier: self.classifier.clone(),
            facts,
            id,
            fingerprint: key,
            // Only a breaker keyed per session needs it, to skip the
            // alternatives whose circuit refuses this session's calls.
            session: if config.keep_session {
                req.session_key().map(Box::from)
            } else {
                None
            },
        };
        ResponseFuture::called(self.inner.call(req), context)
    }
}
