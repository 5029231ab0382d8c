//! What may be retried, and when: failure classes, safe-to-repeat requests,
//! attempts, deadline and backoff.

use std::collections::HashMap;
use std::time::Duration;

use toolwarden_core::{FailureClass, McpRequest, Outcome, OutcomeKind, ToolCatalog};

use crate::backoff::Backoff;

/// The methods other than `tools/call` that are retried by default: they
/// only read (`ping` does nothing at all), so repeating them is harmless.
pub const DEFAULT_SAFE_METHODS: &[&str] = &[
    "tools/list",
    "prompts/list",
    "prompts/get",
    "resources/list",
    "resources/templates/list",
    "resources/read",
    "ping",
];

/// The failure classes a layer retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Classes {
    pub(crate) transient: bool,
    pub(crate) server: bool,
}

impl Classes {
    fn contains(self, class: FailureClass) -> bool {
        match class {
            FailureClass::Transient => self.transient,
            FailureClass::Server => self.server,
            // Refused when the layer is built; a client error never gets
            // better by asking again.
            FailureClass::Client => false,
        }
    }
}

/// The decision taken after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Return this attempt's result.
    Stop,
    /// Retry after this delay (the budget is still to be asked).
    Retry(Duration),
}

/// Everything but the budget that decides a retry.
#[derive(Debug, Clone)]
pub(crate) struct RetryPolicy {
    pub(crate) backoff: Backoff,
    pub(crate) max_attempts: u32,
    pub(crate) deadline: Duration,
    pub(crate) classes: Classes,
    pub(crate) catalog: ToolCatalog,
    pub(crate) tool_overrides: HashMap<String, bool>,
    pub(crate) safe_methods: Vec<String>,
}

impl RetryPolicy {
    /// Whether `request` may be sent again after the server may have acted
    /// on it: a per-tool override of the layer, else the catalog's verdict;
    /// for other methods, membership of the safe-method list.
    pub(crate) fn is_safe_to_repeat<R: McpRequest>(&self, request: &R) -> bool {
        if request.is_tool_call() {
            // A tools/call without a name is malformed: never repeat it.
            return request.tool_name().is_some_and(|tool| {
                self.tool_overrides
                    .get(tool)
                    .copied()
                    .unwrap_or_else(|| self.catalog.is_safe_to_repeat(tool))
            });
        }
        let method = request.method();
        self.safe_methods.iter().any(|m| m == method)
    }

    /// Decides what follows the failed attempt number `attempt` (1-based),
    /// `remaining` before the deadline, `previous` being the delay before the
    /// attempt (the base delay for the first).
    pub(crate) fn verdict<R: McpRequest>(
        &self,
        request: &R,
        outcome: &Outcome,
        attempt: u32,
        previous: Duration,
        remaining: Duration,
        rng: &mut fastrand::Rng,
    ) -> Verdict {
        let Some(class) = outcome.class else {
            return Verdict::Stop;
        };
        if outcome.is_success() || attempt >= self.max_attempts || !self.classes.contains(class) {
            return Verdict::Stop;
        }
        let rejected = outcome.kind == OutcomeKind::Rejected;
        // A layer below refused without a hint (a loop guard, a spent
        // budget): asking again at once would be refused again.
        if rejected && outcome.retry_after.is_none() {
            return Verdict::Stop;
        }
        // A rejection by a layer below, or a failure before the request
        // left, never reached the tool: repeating it is safe for any tool.
        if !(rejected || outcome.before_sent || self.is_safe_to_repeat(request)) {
            return Verdict::Stop;
        }
        let computed = self.backoff.delay(attempt, previous, rng);
        let delay = outcome
            .retry_after
            .map_or(computed, |hint| hint.max(computed));
        // Only a retry that can start before the deadline is worth waiting for.
        if delay >= remaining {
            return Verdict::Stop;
        }
        Verdict::Retry(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use toolwarden_core::catalog::{ToolAnnotations, ToolInfo};
    use toolwarden_core::jsonrpc::Request;

    const SEC: Duration = Duration::from_secs(1);

    fn policy(catalog: ToolCatalog) -> RetryPolicy {
        RetryPolicy {
            backoff: Backoff {
                base: SEC,
                max: 10 * SEC,
                jitter: crate::Jitter::None,
            },
            max_attempts: 3,
            deadline: 30 * SEC,
            classes: Classes {
                transient: true,
                server: true,
            },
            catalog,
            tool_overrides: HashMap::new(),
            safe_methods: DEFAULT_SAFE_METHODS
                .iter()
                .map(|m| (*m).to_owned())
                .collect(),
        }
    }

    fn verdict(
        p: &RetryPolicy,
        req: &Request,
        outcome: Outcome,
        attempt: u32,
        remaining: Duration,
    ) -> Verdict {
        p.verdict(
            req,
            &outcome,
            attempt,
            p.backoff.base,
            remaining,
            &mut fastrand::Rng::with_seed(1),
        )
    }

    fn trusted() -> ToolCatalog {
        let catalog = ToolCatalog::new();
        catalog.set_trusted(true);
        let read_only = ToolAnnotations {
            read_only_hint: Some(true),
            ..Default::default()
        };
        catalog.insert(ToolInfo::new("search", "reads").annotations(read_only));
        catalog
    }

    #[test]
    fn classes_attempts_and_safety_gate_a_retry() {
        let p = policy(trusted());
        let search = Request::tool_call(1, "search", json!({}));
        let server = Outcome::failure(OutcomeKind::ToolError, FailureClass::Server);
        let client = Outcome::failure(OutcomeKind::ProtocolError, FailureClass::Client);
        assert_eq!(
            verdict(&p, &search, server, 1, 30 * SEC),
            Verdict::Retry(SEC)
        );
        assert_eq!(
            verdict(&p, &search, server, 2, 30 * SEC),
            Verdict::Retry(2 * SEC)
        );
        assert_eq!(verdict(&p, &search, server, 3, 30 * SEC), Verdict::Stop);
        assert_eq!(verdict(&p, &search, client, 1, 30 * SEC), Verdict::Stop);
        assert_eq!(
            verdict(&p, &search, Outcome::SUCCESS, 1, 30 * SEC),
            Verdict::Stop
        );
        let unknown = Request::tool_call(1, "delete", json!({}));
        assert_eq!(verdict(&p, &unknown, server, 1, 30 * SEC), Verdict::Stop);
        let mut refused = Outcome::failure(OutcomeKind::Transport, FailureClass::Transient);
        refused.before_sent = true;
        assert_eq!(
            verdict(&p, &unknown, refused, 1, 30 * SEC),
            Verdict::Retry(SEC)
        );
    }

    #[test]
    fn hints_replace_shorter_delays_and_must_fit_the_deadline() {
        let p = policy(trusted());
        let search = Request::tool_call(1, "search", json!({}));
        let mut limited = Outcome::failure(OutcomeKind::ProtocolError, FailureClass::Transient);
        limited.retry_after = Some(5 * SEC);
        assert_eq!(
            verdict(&p, &search, limited, 1, 30 * SEC),
            Verdict::Retry(5 * SEC)
        );
        assert_eq!(verdict(&p, &search, limited, 1, 5 * SEC), Verdict::Stop);
        limited.retry_after = Some(SEC / 2);
        assert_eq!(
            verdict(&p, &search, limited, 2, 30 * SEC),
            Verdict::Retry(2 * SEC)
        );
        // The computed delay must fit too.
        assert_eq!(verdict(&p, &search, limited, 2, 2 * SEC), Verdict::Stop);
    }

    #[test]
    fn rejections_are_retried_only_with_a_hint_and_for_any_tool() {
        let p = policy(ToolCatalog::new());
        let destructive = Request::tool_call(1, "delete", json!({}));
        let mut open = Outcome::failure(OutcomeKind::Rejected, FailureClass::Transient);
        assert_eq!(verdict(&p, &destructive, open, 1, 30 * SEC), Verdict::Stop);
        open.retry_after = Some(3 * SEC);
        assert_eq!(
            verdict(&p, &destructive, open, 1, 30 * SEC),
            Verdict::Retry(3 * SEC)
        );
    }

    #[test]
    fn overrides_and_methods() {
        let mut p = policy(trusted());
        p.tool_overrides.insert("search".into(), false);
        p.tool_overrides.insert("delete".into(), true);
        assert!(!p.is_safe_to_repeat(&Request::tool_call(1, "search", json!({}))));
        assert!(p.is_safe_to_repeat(&Request::tool_call(1, "delete", json!({}))));
        assert!(p.is_safe_to_repeat(&Request::new(1, "tools/list", None)));
        assert!(p.is_safe_to_repeat(&Request::new(
            1,
            "resources/read",
            Some(json!({"uri": "x"}))
        )));
        assert!(!p.is_safe_to_repeat(&Request::new(1, "initialize", None)));
        // A tools/call without a tool name is never repeated.
        assert!(!p.is_safe_to_repeat(&Request::new(1, "tools/call", Some(json!({})))));
    }
}
