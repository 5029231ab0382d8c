//! [`LoopGuard`]: the service.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use toolwarden_core::{
    BoxError, Classify, Event, Fingerprint, LoopDetected, McpClassifier, McpRequest, McpResponse,
};
use tower_service::Service;

use crate::config::LoopGuardConfig;
use crate::future::{Recorder, ResponseFuture};
use crate::history::Admission;
use crate::layer::LoopGuardLayer;
use crate::sessions::Sessions;

/// Refuses tool calls that repeat the same call, or a short cycle of calls,
/// too often within a session. See the [crate docs](crate) for the rules.
///
/// Only `tools/call` requests of tools that are not exempt are guarded;
/// every other request, and every continuation of a `tools/call`
/// (2026-07-28 `inputResponses` or `requestState`), goes to the inner
/// service untouched. Clones share the session histories, and so do all
/// the services built by one [`LoopGuardLayer`](crate::LoopGuardLayer).
pub struct LoopGuard<S, C = McpClassifier> {
    inner: S,
    config: LoopGuardConfig<C>,
    sessions: Arc<Sessions>,
    /// Forwards every call untouched (see [`LoopGuard::passthrough`]).
    passthrough: bool,
}

impl<S, C: Clone> LoopGuard<S, C> {
    /// Guards `inner` with the configuration of `layer` and its session
    /// histories, shared with every other service built from it (the same
    /// as `layer.layer(inner)`). For histories of its own, build it from a
    /// layer of its own.
    pub fn new(inner: S, layer: &LoopGuardLayer<C>) -> Self {
        LoopGuard {
            inner,
            config: layer.config().clone(),
            sessions: Arc::clone(layer.sessions()),
            passthrough: false,
        }
    }
}

impl<S, C> LoopGuard<S, C> {
    /// This service, forwarding every call to the inner service untouched: no
    /// call is guarded or recorded. The standard stack builds this for the
    /// layer when it is left out, so that its type names each layer once.
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

    /// The inner service, consuming the guard.
    #[must_use]
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &LoopGuardConfig<C> {
        &self.config
    }

    /// How many sessions have a history of their own; never more than
    /// `bounds.max_keys` (the history of calls without a session key is
    /// not counted).
    #[must_use]
    pub fn tracked_sessions(&self) -> usize {
        self.sessions.len()
    }
}

impl<S: Clone, C: Clone> Clone for LoopGuard<S, C> {
    fn clone(&self) -> Self {
        LoopGuard {
            inner: self.inner.clone(),
            config: self.config.clone(),
            sessions: Arc::clone(&self.sessions),
            passthrough: self.passthrough,
        }
    }
}

impl<S: fmt::Debug, C: fmt::Debug> fmt::Debug for LoopGuard<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoopGuard")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .field("tracked_sessions", &self.tracked_sessions())
            .field("passthrough", &self.passthrough)
            .finish()
    }
}

impl<S, C, R> Service<R> for LoopGuard<S, C>
where
    R: McpRequest,
    S: Service<R>,
    S::Response: McpResponse,
    S::Error: Into<BoxError>,
    C: Classify<S::Response>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: R) -> Self::Future {
        if self.passthrough {
            return ResponseFuture::passthrough(self.inner.call(request));
        }
        // One clock reading for this call, here and in the layers below.
        let _now = toolwarden_core::time::CallInstant::hold();
        let guarded = match request.tool_name() {
            // Not a tools/call: untouched.
            None => None,
            Some(tool) => match self.config.limits_for(tool) {
                // An exempt tool: untouched.
                None => None,
                // A continuation (2026-07-28 `inputResponses`,
                // `requestState`) carries the arguments of the call it
                // continues: it is that call going on, not the agent asking
                // again.
                Some(_) if request.is_continuation() => None,
                // The fingerprint is read from the request when an earlier
                // layer computed it; otherwise computed here (from the tool
                // name already read, as `call_fingerprint` would) and stored
                // below for the layers under this one.
                Some(limits) => Some(match request.extension::<Fingerprint>() {
                    Some(known) => (limits, *known, false),
                    None => {
                        let computed = toolwarden_core::fingerprint(tool, request.arguments());
                        (limits, computed, true)
                    }
                }),
            },
        };
        let Some((limits, fingerprint, computed)) = guarded else {
            return ResponseFuture::passthrough(self.inner.call(request));
        };
        if computed {
            request.insert_extension(fingerprint);
        }
        let rules = self.config.rules(limits);
        let Some(session) = self.sessions.get(request.session_key()) else {
            // A new session past the bound has no history: its calls are
            // not counted (with anyone else's, they could be refused for
            // what other sessions did).
            return ResponseFuture::passthrough(self.inner.call(request));
        };
        // Asked only when a refusal of the identical call is found or made.
        let circuits = &self.config.settings.circuits;
        // The circuit this call goes to, under the breaker's key function
        // (per session and tool, say): not the tool's name alone.
        let circuit_open = || request.tool_name().is_some() && circuits.refuses(&request);
        let (admission, admitted_ms) = session.admit(fingerprint.as_u64(), &rules, &circuit_open);
        match admission {
            Admission::Pass { seq, warning } => {
                if let Some(warning) = warning {
                    self.config.events().emit(&Event::LoopWarned {
                        key: request.target(),
                        repeats: warning.repeats,
                    });
                }
                let recorder = Recorder {
                    session,
                    seq,
                    admitted_ms,
                    fingerprint: fingerprint.as_u64(),
                    classifier: self.config.classifier.clone(),
                };
                // The readiness reserved in `poll_ready` is used here.
                ResponseFuture::guarded(self.inner.call(request), recorder)
            }
            Admission::Block(verdict) => {
                // The inner service is not called: the readiness reserved
                // in `poll_ready` stays for the next call, as in tower's
                // `Filter`.
                let tool = request.target();
                self.config.events().emit(&Event::LoopDetected {
                    key: tool,
                    repeats: verdict.repeats,
                });
                ResponseFuture::blocked(LoopDetected::new(tool, verdict.repeats, verdict.pattern))
            }
        }
    }
}
