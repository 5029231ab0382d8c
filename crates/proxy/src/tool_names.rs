//! Middleware that answers a `tools/call` with a name the proxy will not
//! serve with `-32602` before any layer of the stack sees it: a name longer
//! than `limits.max_tool_name_bytes`, and, once the catalog has been filled
//! from `tools/list`, a name not in it (`limits.reject_unknown_tools`). So a
//! client cannot make the layers keep state (a breaker, a quota, a metric
//! label, a cache entry) for names the server does not have.
//!
//! A gateway fills the catalog one upstream at a time, as each one's
//! `tools/list` comes. A name whose prefix is an upstream with no tool in
//! the catalog yet (not listed yet, down since the start, or listing
//! nothing) is not refused here: whether it exists is not known, and the
//! gateway's routing answers it. Before, such a name was refused as
//! unknown as soon as another upstream's tools were in.
//!
//! The refusal is a JSON-RPC error ([`ErrorObject`]), answered as such
//! ([`error_data`](crate::downstream::server::error_data); see "Errors" in
//! [`crate::downstream::server`]).

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{self, Either, Ready};
use rmcp::model::{ClientRequest, ServerResult};
use toolwarden_core::jsonrpc::{code, ErrorObject};
use toolwarden_core::{BoxError, McpRequest, ToolCatalog};

use crate::stack::Availability;
use tower::{Layer, Service};

/// In a gateway: the upstream a tool name is routed to (by its prefix),
/// `None` when no upstream has it.
pub type UpstreamOf = Arc<dyn Fn(&str) -> Option<Arc<str>> + Send + Sync>;

/// Configuration of [`ToolNameGuard`].
#[derive(Clone)]
pub struct ToolNameGuardLayer {
    max_bytes: usize,
    catalog: ToolCatalog,
    reject_unknown: bool,
    upstream_of: Option<UpstreamOf>,
    connected: Option<Availability>,
}

impl fmt::Debug for ToolNameGuardLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ToolNameGuardLayer")
            .field("max_bytes", &self.max_bytes)
            .field("reject_unknown", &self.reject_unknown)
            .field("gateway", &self.upstream_of.is_some())
            .finish()
    }
}

impl ToolNameGuardLayer {
    /// Refuses names longer than `max_bytes` that `catalog` does not list,
    /// and names not in `catalog` once it holds tools (unless
    /// [`reject_unknown`](Self::reject_unknown) turns that off).
    #[must_use]
    pub fn new(max_bytes: usize, catalog: ToolCatalog) -> Self {
        ToolNameGuardLayer {
            max_bytes,
            catalog,
            reject_unknown: true,
            upstream_of: None,
            connected: None,
        }
    }

    /// Whether a name not in the filled catalog is refused (`limits.reject_unknown_tools`).
    #[must_use]
    pub fn reject_unknown(mut self, reject: bool) -> Self {
        self.reject_unknown = reject;
        self
    }

    /// In a gateway: `upstream_of` routes a name to its upstream, and a
    /// name of an upstream with no tool in the catalog yet passes (see
    /// the [module docs](self)).
    #[must_use]
    pub fn with_upstreams(mut self, upstream_of: UpstreamOf) -> Self {
        self.upstream_of = Some(upstream_of);
        self
    }

    /// In a gateway: a name of an upstream with no tool in the catalog
    /// passes only while `connected` says its upstream is connected (its
    /// breaker then refuses, with its retry-after, if open); else it is
    /// refused `-32000` at once (see the [module docs](self)).
    #[must_use]
    pub fn with_connected(mut self, connected: Availability) -> Self {
        self.connected = Some(connected);
        self
    }
}

impl<S> Layer<S> for ToolNameGuardLayer {
    type Service = ToolNameGuard<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ToolNameGuard {
            inner,
            config: self.clone(),
        }
    }
}

/// The service of [`ToolNameGuardLayer`].
#[derive(Clone, Debug)]
pub struct ToolNameGuard<S> {
    inner: S,
    config: ToolNameGuardLayer,
}

impl<S> ToolNameGuard<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Why `name` is refused, if it is.
    fn refusal(&self, name: &str) -> Option<ErrorObject> {
        let max = self.config.max_bytes;
        // A name the server listed is served however long: a gateway's
        // prefix can take a listed name past the limit, which then listed
        // a tool no call could reach.
        let catalog = &self.config.catalog;
        if name.len() > max && catalog.get(name).is_none() {
            return Some(ErrorObject::new(
                code::INVALID_PARAMS,
                format!(
                    "Invalid params: the tool name is longer than {max} bytes ({} bytes)",
                    name.len()
                ),
            ));
        }
        if self.config.reject_unknown && !catalog.is_empty() && catalog.get(name).is_none() {
            let upstream = self.config.upstream_of.as_ref().and_then(|f| f(name));
            if let Some(upstream) = upstream.filter(|u| !catalog.has_upstream(u)) {
                // Its upstream has not listed its tools (yet): not known
                // to be wrong, while the upstream is connected.
                // Otherwise nothing can tell a made-up name from a real
                // one, and each would get per-tool state in the stack (a
                // client flooding such names filled the layers' maps, and
                // the rate limit's overflow quota then starved real tools).
                if self.config.connected.as_ref().is_none_or(|up| up(name)) {
                    return None;
                }
                return Some(ErrorObject::new(
                    code::SERVER_ERROR_END,
                    format!(
                        "upstream {upstream:?} is not connected and has not listed its tools: \
                         {name:?} is not known yet; retry later"
                    ),
                ));
            }
            return Some(ErrorObject::new(
                code::INVALID_PARAMS,
                format!("Invalid params: unknown tool {name:?} (not in the server's tools/list)"),
            ));
        }
        None
    }
}

impl<S> Service<ClientRequest> for ToolNameGuard<S>
where
    S: Service<ClientRequest, Response = ServerResult, Error = BoxError>,
{
    type Response = ServerResult;
    type Error = BoxError;
    type Future = Either<Ready<Result<ServerResult, BoxError>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: ClientRequest) -> Self::Future {
        if let Some(refusal) = request.tool_name().and_then(|name| self.refusal(name)) {
            return Either::Left(future::ready(Err(Box::new(refusal))));
        }
        Either::Right(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use rmcp::model::{CallToolRequest, CallToolRequestParams};
    use std::sync::atomic::Ordering;
    use toolwarden_core::catalog::ToolInfo;
    use tower::ServiceExt;

    use super::*;

    fn call(name: &str) -> ClientRequest {
        ClientRequest::CallToolRequest(CallToolRequest::new(CallToolRequestParams::new(
            name.to_owned(),
        )))
    }

    /// An inner service that fails the test if it is called.
    fn never() -> tower::util::BoxService<ClientRequest, ServerResult, BoxError> {
        tower::util::BoxService::new(tower::service_fn(|r: ClientRequest| async move {
            panic!("reached the stack: {r:?}")
        }))
    }

    /// An inner service that answers every call.
    fn served() -> impl Service<
        ClientRequest,
        Response = ServerResult,
        Error = BoxError,
        Future = impl std::future::Future<Output = Result<ServerResult, BoxError>>,
    > {
        tower::service_fn(|_r: ClientRequest| async { Ok::<_, BoxError>(ServerResult::empty(())) })
    }

    /// A gateway's routes by the prefix `NAME__`, for `upstreams`.
    fn routes(upstreams: &'static [&'static str]) -> UpstreamOf {
        Arc::new(move |name: &str| {
            let (upstream, _) = name.split_once("__")?;
            upstreams.contains(&upstream).then(|| Arc::from(upstream))
        })
    }

    async fn refused(guard: ToolNameGuardLayer, name: &str) -> ErrorObject {
        let error = guard.layer(never()).oneshot(call(name)).await.unwrap_err();
        *error.downcast::<ErrorObject>().unwrap()
    }

    #[tokio::test]
    async fn long_and_unknown_names_never_reach_the_stack() {
        let catalog = ToolCatalog::new();
        let guard = ToolNameGuardLayer::new(128, catalog.clone());
        let error = refused(guard.clone(), &"x".repeat(129)).await;
        assert_eq!(error.code, -32602);
        assert!(error.message.contains("128 bytes"), "{}", error.message);

        catalog.insert(ToolInfo::new("search", "Searches"));
        let error = refused(guard.clone(), "serch").await;
        assert_eq!(error.code, -32602);
        assert!(error.message.contains("unknown tool"), "{}", error.message);

        let served = tower::service_fn(|_r: ClientRequest| async {
            Ok::<_, BoxError>(ServerResult::empty(()))
        });
        assert!(guard.layer(served).oneshot(call("search")).await.is_ok());
    }

    /// A gateway's prefix can take a listed name past the limit: it was
    /// listed, and every call to it refused.
    #[tokio::test]
    async fn a_listed_name_longer_than_the_limit_is_served() {
        let catalog = ToolCatalog::new();
        let guard = ToolNameGuardLayer::new(16, catalog.clone());
        let long = format!("upstream__{}", "t".repeat(20));
        catalog.insert(ToolInfo::new(long.clone(), "A tool"));
        let served = tower::service_fn(|_r: ClientRequest| async {
            Ok::<_, BoxError>(ServerResult::empty(()))
        });
        assert!(guard
            .clone()
            .layer(served)
            .oneshot(call(&long))
            .await
            .is_ok());
        let error = refused(guard, &format!("{long}x")).await;
        assert!(error.message.contains("16 bytes"), "{}", error.message);
    }

    #[tokio::test]
    async fn in_a_gateway_names_of_an_upstream_not_listed_yet_pass_and_others_are_checked() {
        let catalog = ToolCatalog::new();
        // alpha listed its tools; beta has not yet.
        catalog.replace_upstream("alpha", [ToolInfo::new("alpha__lookup", "Looks up")]);
        let routes = routes(&["alpha", "beta"]);
        let guard = ToolNameGuardLayer::new(128, catalog.clone()).with_upstreams(routes);
        let passes = |name: &'static str| {
            let layer = guard.clone();
            async move { layer.layer(served()).oneshot(call(name)).await.is_ok() }
        };
        assert!(passes("alpha__lookup").await);
        assert!(
            passes("beta__lookup").await,
            "beta has not listed its tools"
        );
        // A wrong name of an upstream that has listed, or of no upstream.
        assert!(refused(guard.clone(), "alpha__nope")
            .await
            .message
            .contains("unknown tool"));
        assert!(refused(guard.clone(), "gamma__x")
            .await
            .message
            .contains("unknown tool"));
        // Once beta has listed, its wrong names are refused too.
        catalog.replace_upstream("beta", [ToolInfo::new("beta__lookup", "Looks up")]);
        assert!(passes("beta__lookup").await);
        assert!(refused(guard.clone(), "beta__nope")
            .await
            .message
            .contains("unknown tool"));
        // Without the routes (a single upstream), as before: refused.
        let single = ToolNameGuardLayer::new(128, catalog);
        assert!(refused(single, "beta__nope")
            .await
            .message
            .contains("unknown tool"));
    }

    /// Regression (found by running the binary): the names of a gateway
    /// upstream that never listed its tools (down since the start) all
    /// passed, so a client flooding made-up ones filled the layers' maps
    /// with per-tool state, and the rate limit's shared overflow quota then
    /// refused a real tool first called after the flood. They pass only
    /// while that upstream is connected; else `-32000`, retry later.
    #[tokio::test]
    async fn names_of_an_unlisted_upstream_pass_only_while_it_is_connected() {
        let catalog = ToolCatalog::new();
        catalog.replace_upstream("alpha", [ToolInfo::new("alpha__lookup", "Looks up")]);
        let routes = routes(&["alpha", "dead"]);
        let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = Arc::clone(&up);
        let connected: Availability =
            Arc::new(move |name: &str| !name.starts_with("dead__") || seen.load(Ordering::SeqCst));
        let guard = ToolNameGuardLayer::new(128, catalog)
            .with_upstreams(routes)
            .with_connected(connected);
        for junk in ["dead__junk1", "dead__junk2"] {
            let error = refused(guard.clone(), junk).await;
            assert_eq!(error.code, code::SERVER_ERROR_END, "{}", error.message);
            assert!(error.message.contains("retry later"), "{}", error.message);
        }
        // The listed upstream's names are checked against its list, as before.
        assert!(guard
            .clone()
            .layer(served())
            .oneshot(call("alpha__lookup"))
            .await
            .is_ok());
        // Once up (its list not in yet), its names pass to the routing.
        up.store(true, Ordering::SeqCst);
        assert!(guard
            .layer(served())
            .oneshot(call("dead__anything"))
            .await
            .is_ok());
    }

    #[tokio::test]
    async fn before_the_catalog_is_filled_or_when_off_any_short_name_passes() {
        let empty = ToolNameGuardLayer::new(128, ToolCatalog::new());
        assert!(empty.layer(served()).oneshot(call("any")).await.is_ok());
        let catalog = ToolCatalog::new();
        catalog.insert(ToolInfo::new("search", "Searches"));
        let off = ToolNameGuardLayer::new(128, catalog.clone()).reject_unknown(false);
        assert!(off
            .clone()
            .layer(served())
            .oneshot(call("other"))
            .await
            .is_ok());
        // Off, a listed long name is served all the same.
        let long = "l".repeat(129);
        catalog.insert(ToolInfo::new(long.clone(), "Long"));
        assert!(off.layer(served()).oneshot(call(&long)).await.is_ok());
    }
}
