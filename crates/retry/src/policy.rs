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

/// The knobs one call follows: the layer's, or its tool's override (see
/// [`RetryBackoffBuilder::tool`](crate::RetryBackoffBuilder::tool)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CallPolicy {
    pub(crate) backoff: Backoff,
    pub(crate) max_attempts: u32,
    pub(crate) deadline: Duration,
    pub(crate) classes: Classes,
    /// Whether the tool is safe to repeat, overriding the catalog (set per
    /// tool only; `None` on the layer's knobs).
    pub(crate) safe_to_repeat: Option<bool>,
}

/// A failed attempt, as a verdict reads it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FailedAttempt<'a, R> {
    /// The knobs the call follows.
    pub(crate) call: &'a CallPolicy,
    pub(crate) request: &'a R,
    pub(crate) outcome: &'a Outcome,
    /// The attempt's number (1 for the first).
    pub(crate) attempt: u32,
    /// The delay before the attempt (the base delay for the first).
    pub(crate) previous: Duration,
    /// The time left before the call's deadline.
    pub(crate) remaining: Duration,
}

/// Which [`CallPolicy`] a call follows: the layer's or one tool's. A call
/// that may be retried carries this (4 bytes), not the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PolicyIndex(u32);

impl PolicyIndex {
    /// The layer's own knobs.
    pub(crate) const LAYER: PolicyIndex = PolicyIndex(0);
}

/// The knobs of the tools with an override (see
/// [`RetryBackoffBuilder::tool`](crate::RetryBackoffBuilder::tool)).
#[derive(Debug, Clone, Default)]
pub(crate) struct ToolPolicies {
    by_name: HashMap<Box<str>, PolicyIndex>,
    /// `PolicyIndex(n)` is `policies[n - 1]`.
    policies: Vec<CallPolicy>,
}

impl ToolPolicies {
    /// Sets `tool`'s knobs. `None` if there are already `u32::MAX - 1`
    /// tools (a call carries a 32-bit index).
    pub(crate) fn insert(&mut self, tool: Box<str>, policy: CallPolicy) -> Option<()> {
        if let Some(&PolicyIndex(n)) = self.by_name.get(&tool) {
            *self.policies.get_mut(n.checked_sub(1)? as usize)? = policy;
            return Some(());
        }
        let n = u32::try_from(self.policies.len()).ok()?.checked_add(1)?;
        self.policies.push(policy);
        self.by_name.insert(tool, PolicyIndex(n));
        Some(())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// Everything but the budget that decides a retry.
#[derive(Debug, Clone)]
pub(crate) struct RetryPolicy {
    /// The layer's knobs, for every call whose tool has no override.
    pub(crate) call: CallPolicy,
    /// The tools' knobs; empty (and never looked up) without overrides.
    pub(crate) tools: ToolPolicies,
    pub(crate) catalog: ToolCatalog,
    pub(crate) safe_methods: Vec<String>,
}

impl RetryPolicy {
    /// Which knobs `request` follows, and them: its tool's override (a
    /// `tools/call` of a tool that has one), else the layer's. No lookup
    /// without overrides.
    #[inline]
    pub(crate) fn select<R: McpRequest>(&self, request: &R) -> (PolicyIndex, &CallPolicy) {
        if self.tools.is_empty() {
            return (PolicyIndex::LAYER, &self.call);
        }
        let index = request
            .tool_name()
            .and_then(|tool| self.tools.by_name.get(tool))
            .copied()
            .unwrap_or(PolicyIndex::LAYER);
        (index, self.get(index))
    }

    /// The knobs `index` stands for.
    #[inline]
    pub(crate) fn get(&self, index: PolicyIndex) -> &CallPolicy {
        index
            .0
            .checked_sub(1)
            .and_then(|n| self.tools.policies.get(n as usize))
            .unwrap_or(&self.call)
    }

    /// The knobs `request` follows.
    #[cfg(test)]
    pub(crate) fn call_policy<R: McpRequest>(&self, request: &R) -> &CallPolicy {
        self.select(request).1
    }

    /// Whether `request`, following `call`, may be sent again after the
    /// server may have acted on it: its tool's `safe_to_repeat` override,
    /// else the catalog's verdict; for other methods, membership of the
    /// safe-method list.
    pub(crate) fn is_safe_to_repeat<R: McpRequest>(&self, call: &CallPolicy, request: &R) -> bool {
        if request.is_tool_call() {
            // A tools/call without a name is malformed: never repeat it.
            return request.tool_name().is_some_and(|tool| {
                call.safe_to_repeat
                    .unwrap_or_else(|| self.catalog.is_safe_to_repeat(tool))
            });
        }
        let method = request.method();
        self.safe_methods.iter().any(|m| m == method)
    }

    /// Decides what follows `failed`, drawing any jitter from `rng`.
    pub(crate) fn verdict<R: McpRequest>(
        &self,
        failed: &FailedAttempt<'_, R>,
        rng: &mut fastrand::Rng,
    ) -> Verdict {
        let FailedAttempt {
            call,
            request,
            outcome,
            attempt,
            previous,
            remaining,
        } = *failed;
        let Some(class) = outcome.class else {
            return Verdict::Stop;
        };
        if outcome.is_success() || attempt >= call.max_attempts || !call.classes.contains(class) {
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
        if !(rejected || outcome.before_sent || self.is_safe_to_repeat(call, request)) {
            return Verdict::Stop;
        }
        // A hint longer than any backoff of ours (a breaker's open period,
        // a server asking for a long pause) is the caller's to act on, with
        // the failure's `retry_after`: not a wait inside the call, which
        // would hold every call to an open circuit until it half-opens.
        if outcome
            .retry_after
            .is_some_and(|hint| hint > call.backoff.max)
        {
            return Verdict::Stop;
        }
        let computed = call.backoff.delay(attempt, previous, rng);
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
            call: CallPolicy {
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
                safe_to_repeat: None,
            },
            tools: ToolPolicies::default(),
            catalog,
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
        let call = p.call_policy(req);
        let failed = FailedAttempt {
            call,
            request: req,
            outcome: &outcome,
            attempt,
            previous: call.backoff.base,
            remaining,
        };
        p.verdict(&failed, &mut fastrand::Rng::with_seed(1))
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
        // A hint past max_delay (10 s here) is answered at once, whatever
        // the deadline left.
        limited.retry_after = Some(11 * SEC);
        assert_eq!(verdict(&p, &search, limited, 1, 60 * SEC), Verdict::Stop);
        limited.retry_after = Some(10 * SEC);
        assert_eq!(
            verdict(&p, &search, limited, 1, 60 * SEC),
            Verdict::Retry(10 * SEC)
        );
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
    fn tool_calls_follow_their_tools_policy() {
        let mut p = policy(trusted());
        let search = Request::tool_call(1, "search", json!({}));
        let list = Request::new(1, "tools/list", None);
        assert_eq!(*p.call_policy(&search), p.call);
        let once = CallPolicy {
            max_attempts: 1,
            ..p.call
        };
        p.tools.insert("search".into(), once).unwrap();
        // A method named like the tool is not the tool.
        p.tools.insert("tools/list".into(), once).unwrap();
        assert_eq!(*p.call_policy(&search), once);
        assert_eq!(*p.call_policy(&list), p.call);
        let other = Request::tool_call(1, "fetch", json!({}));
        assert_eq!(*p.call_policy(&other), p.call);
        let server = Outcome::failure(OutcomeKind::ToolError, FailureClass::Server);
        assert_eq!(verdict(&p, &search, server, 1, 30 * SEC), Verdict::Stop);
        // Setting a tool again replaces its knobs.
        let twice = CallPolicy {
            max_attempts: 2,
            ..p.call
        };
        p.tools.insert("search".into(), twice).unwrap();
        assert_eq!(*p.call_policy(&search), twice);
        assert_eq!(p.tools.policies.len(), 2);
    }

    #[test]
    fn overrides_and_methods() {
        let mut p = policy(trusted());
        for (tool, safe) in [("search", false), ("delete", true)] {
            let knobs = CallPolicy {
                safe_to_repeat: Some(safe),
                ..p.call
            };
            p.tools.insert(tool.into(), knobs).unwrap();
        }
        let safe = |p: &RetryPolicy, req: &Request| p.is_safe_to_repeat(p.call_policy(req), req);
        assert!(!safe(&p, &Request::tool_call(1, "search", json!({}))));
        assert!(safe(&p, &Request::tool_call(1, "delete", json!({}))));
        assert!(safe(&p, &Request::new(1, "tools/list", None)));
        assert!(safe(
            &p,
            &Request::new(1, "resources/read", Some(json!({"uri": "x"})))
        ));
        assert!(!safe(&p, &Request::new(1, "initialize", None)));
        // A tools/call without a tool name is never repeated.
        assert!(!safe(&p, &Request::new(1, "tools/call", Some(json!({})))));
    }
}
