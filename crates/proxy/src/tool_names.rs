//! Middleware that answers a `tools/call` with a name the proxy will not
//! serve with `-32602` before any layer of the stack sees it: a name longer
//! than `limits.max_tool_name_bytes`, and, once the catalog has been filled
//! from `tools/list`, a name not in it (`limits.reject_unknown_tools`). So a
//! client cannot make the layers keep state (a breaker, a quota, a metric
//! label, a cache entry) for names the server does not have.
//!
//! The refusal is a JSON-RPC error ([`ErrorObject`]), answered as such
//! ([`error_data`](crate::downstream::server::error_data); see "Errors" in
//! [`crate::downstream::server`]).

use std::fmt;
use std::task::{Context, Poll};

use futures::future::{self, Either, Ready};
use rmcp::model::{ClientRequest, ServerResult};
use toolwarden_core::jsonrpc::{code, ErrorObject};
use toolwarden_core::{BoxError, McpRequest, ToolCatalog};
use tower::{Layer, Service};

/// Configuration of [`ToolNameGuard`].
#[derive(Clone)]
pub struct ToolNameGuardLayer {
    max_bytes: usize,
    catalog: Option<ToolCatalog>,
}

impl fmt::Debug for ToolNameGuardLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ToolNameGuardLayer")
            .field("max_bytes", &self.max_bytes)
            .field("reject_unknown", &self.catalog.is_some())
            .finish()
    }
}

impl ToolNameGuardLayer {
    /// Refuses names longer than `max_bytes`, and names not in `catalog`
    /// once it holds tools (when given).
    #[must_use]
    pub fn new(max_bytes: usize, catalog: Option<ToolCatalog>) -> Self {
        ToolNameGuardLayer { max_bytes, catalog }
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
        if name.len() > max {
            return Some(ErrorObject::new(
                code::INVALID_PARAMS,
                format!(
                    "Invalid params: the tool name is longer than {max} bytes ({} bytes)",
                    name.len()
                ),
            ));
        }
        let catalog = self.config.catalog.as_ref()?;
        if !catalog.is_empty() && catalog.get(name).is_none() {
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

    async fn refused(guard: ToolNameGuardLayer, name: &str) -> ErrorObject {
        let error = guard.layer(never()).oneshot(call(name)).await.unwrap_err();
        *error.downcast::<ErrorObject>().unwrap()
    }

    #[tokio::test]
    async fn long_and_unknown_names_never_reach_the_stack() {
        let catalog = ToolCatalog::new();
        let guard = ToolNameGuardLayer::new(128, Some(catalog.clone()));
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

    #[tokio::test]
    async fn before_the_catalog_is_filled_or_when_off_any_short_name_passes() {
        let served = || {
            tower::service_fn(|_r: ClientRequest| async {
                Ok::<_, BoxError>(ServerResult::empty(()))
            })
        };
        let empty = ToolNameGuardLayer::new(128, Some(ToolCatalog::new()));
        assert!(empty.layer(served()).oneshot(call("any")).await.is_ok());
        let catalog = ToolCatalog::new();
        catalog.insert(ToolInfo::new("search", "Searches"));
        let off = ToolNameGuardLayer::new(128, None);
        assert!(off.layer(served()).oneshot(call("other")).await.is_ok());
    }
}
