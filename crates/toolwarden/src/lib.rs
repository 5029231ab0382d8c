//! Resilience layers for MCP (Model Context Protocol) tool calls.
//!
//! AI agents call tools on MCP servers. Those servers fail, rate-limit, hang
//! and return errors inside successful responses; agents retry blindly, loop
//! on the same failing call and pile load onto a server that is already
//! down. toolwarden fixes this where the calls flow, as `tower::Layer`s that
//! stack onto any `tower::Service` carrying MCP requests.
//!
//! This umbrella crate re-exports every layer behind a feature of its name
//! (`circuit-breaker`, `rate-limit`, `retry`, `loop-guard`, `fallback-cache`,
//! `observability`, `bulkhead`, `coalesce`, plus `rmcp` and `redis`), `stack`
//! for every layer and
//! the [standard stack](stack), `serde` for the enabled layers' settings
//! types (their builders' knobs as serde types, for configuration files),
//! `full` for everything. Default features are empty: the core call model
//! and [`RenderErrorsLayer`] only.
//!
//! - [`ServiceBuilderExt`]: one `ServiceBuilder` method per layer.
//! - [`stack::StandardStack`] (feature `stack`): every layer in the standard
//!   order, from one validated configuration with cross-field checks.
//! - [`RenderErrorsLayer`]: failed tool calls become `isError` results a
//!   model can act on.
//!
//! # Guarantees
//!
//! The standard stack keeps promises that no single layer can keep alone.
//! Each is proved on the whole stack by the property test
//! `the_stack_keeps_its_guarantees_against_any_upstream`
//! (`crates/toolwarden/tests/guarantees.rs`: random agents on two
//! connections, trusted and untrusted catalogs, against an upstream that
//! answers each arrival with a success, an `isError` result, an empty or
//! malformed result, a JSON-RPC error with any code and any retry hint, a
//! transport failure before or after sending, or a hang; agents that drop
//! their calls; every guarantee checked after every call; in half the
//! cases with the optional layers too: coalescing, hedging and a
//! bulkhead of one or two attempts in flight per tool), by its twin
//! `the_stack_keeps_its_guarantees_when_calls_overlap` for every guarantee
//! that does not depend on the order of the calls (the same agents' calls
//! started side by side through clones of the two services, so identical
//! ones are coalesced, hedges meet the bulkhead and quotas are raced; one
//! answer per call with its id, "never sent" true, at most one arrival for
//! a tool not safe to repeat, the shared quota, hedges, observability's
//! `rejected` = the refusals the agents saw), and by the named
//! tests below.
//!
//! | guarantee | tests |
//! |---|---|
//! | **One answer per call**, with the caller's request id, within the retry deadline (plus backoff and rate-limit waits); a dropped call leaves no state behind. | property test (its upstream's transport answers some calls under another request's id); `regression_15_1_a_huge_retry_hint_answers_instead_of_panicking`; `toolwarden-retry`: `each_attempt_carries_its_own_request_id_and_the_caller_gets_its_id_back` |
//! | **No panic on any input**: nothing a server sends (any JSON, any number, any hint) and no configuration value panics; bad configuration is a `ConfigError` naming the field. Retry hints are clamped to 1 hour ([`core::classify::DEFAULT_MAX_RETRY_AFTER`]). | property test; `regression_15_1_…`; `tests/stack.rs`: `the_stack_builds_or_names_a_field_for_any_durations`, `regression_15_the_retry_closures_deadline_is_respected_or_refused`; `toolwarden-core`: `classify_fuzz.rs` (every classifier entry point on arbitrary JSON and bytes; the cargo-fuzz target `classify` runs the same checks), `regression_15_1_huge_retry_hints_are_clamped_not_a_panic`; the builders' extreme-value proptests in each layer crate |
//! | **A refusal by a toolwarden layer is never a failure of the tool** for any layer — not for the breaker, the retry budget or the loop guard — even after the fallback cache renders it as an `isError` result (it carries a sealed `_meta` mark, [`core::classify::OUTCOME_META_KEY`], that only this process can write, and that the edge removes so its seal never reaches a client); observability counts it as `rejected`. | property test (observability's `rejected` = refusals the agents saw); `regression_15_2_rate_limit_refusals_build_no_loop`; `toolwarden-core`: `rendered_failures_keep_their_outcome_and_forged_marks_do_not`; `toolwarden-fallback-cache`: `a_degraded_refusal_is_still_classified_as_a_rejection`; `render.rs`: `the_outcome_seal_never_reaches_a_client` |
//! | **A tool that is not safe to repeat reaches the server at most once per call**, unless the failure happened before the request was sent; an error that says "never sent" is true. | property test (per call, arrivals that were sent ≤ 1 for unsafe tools; an error classified `before_sent` had no sent arrival; some connects fail only after a hedge was sent); `regression_15_4_a_deadline_cut_never_reports_a_sent_call_as_unsent`; `toolwarden-hedge`: `a_never_sent_failure_is_not_the_answer_when_the_hedge_was_sent` |
//! | **A hedge is sent only for a tool safe to send twice** (read-only and idempotent in a trusted catalog, or configured so), never for one that is only idempotent, only read-only or unannotated, nor for a continuation (2026-07-28 `inputResponses`, `requestState`); a bulkhead's cap counts it like any attempt. | property test (every arrival marked `#tw-hedge` is of the read-only, idempotent tool with the catalog trusted; with per-tool overrides, only of the tool configured safe (hedged after its own p95), never of the one configured unsafe; a tool hedged but not safe to repeat reaches the server at most twice a call); `toolwarden-hedge` (`tests/properties.rs`): `hedges_are_safe_answered_once_and_within_budget`, `a_continuation_is_never_hedged` |
//! | **Every service built from one stack shares its state**: quotas, retry budgets, breakers, caches, loop histories and statistics, whether built from the layer or from a clone. | property test (upstream arrivals per tool ≤ burst + refill, over two connections); `regression_15_5_services_from_one_stack_share_quotas_caches_and_loop_histories` |
//! | **A loop-guard refusal lifts once the cause is gone**: failures of an upstream that is down (transport, timeout) and refusals of our own layers build no loop; a refusal in force lifts when the same call succeeds for anyone, when the tool's circuit closes, or after a cool-down (30 s by default). | property test (a loop refusal needs three identical calls the tool itself answered); `regression_15_2_…`; `toolwarden-loop-guard` (`tests/outages_and_lifting.rs`): `an_agent_polling_through_an_upstream_restart_is_never_refused`, `a_refusal_lifts_when_the_same_call_succeeds_in_another_session`, `a_refusal_made_while_the_circuit_was_open_lifts_when_it_closes`, `a_refusal_lifts_after_the_default_cool_down_of_30_s_however_often_it_is_asked`; `toolwarden-circuit-breaker`: `failures_before_sending_never_trip_it`; the proxy's e2e `an_agent_polling_through_an_upstream_restart_is_served_again` (a real child that takes 4 s to restart; no poll refused by the loop guard or the breaker, at most 3 failed polls once `/health` reports it up) |
//! | **A task is a success**: a task the server created for a call (2026-07-28 `resultType: "task"`, or a 2025-11-25 `CreateTaskResult`) is not retried, counted by the breaker or the loop guard, nor kept by the fallback cache (it is its creator's). | `a_task_is_a_success_for_every_layer_and_never_served_stale`; `toolwarden-core`: `status_of_typical_results`, `a_marked_tool_call_success_is_never_an_error_result_under_any_settings` |

#![forbid(unsafe_code)]

#[cfg(feature = "stack")]
mod boxed;
mod builder_ext;
mod render;
#[cfg(feature = "stack")]
pub mod stack;
#[cfg(feature = "stack")]
mod timeout;

pub use builder_ext::ServiceBuilderExt;
pub use render::{RenderErrors, RenderErrorsLayer, RenderFuture};
/// The MCP call model every layer shares.
pub use toolwarden_core as core;

/// Concurrency caps per tool (feature `bulkhead`).
#[cfg(feature = "bulkhead")]
pub use toolwarden_bulkhead as bulkhead;
/// Circuit breakers per tool (feature `circuit-breaker`).
#[cfg(feature = "circuit-breaker")]
pub use toolwarden_circuit_breaker as circuit_breaker;
/// Request coalescing for tools safe to share (feature `coalesce`).
#[cfg(feature = "coalesce")]
pub use toolwarden_coalesce as coalesce;
/// Rejections and renderings shared by every layer.
pub use toolwarden_core::{rejection, FailureReport};
/// Stale-if-error caching and degraded answers (feature `fallback-cache`).
#[cfg(feature = "fallback-cache")]
pub use toolwarden_fallback_cache as fallback_cache;
/// Hedging of slow calls to tools safe to send twice (feature `hedge`).
#[cfg(feature = "hedge")]
pub use toolwarden_hedge as hedge;
/// Loop guarding (feature `loop-guard`).
#[cfg(feature = "loop-guard")]
pub use toolwarden_loop_guard as loop_guard;
/// Metrics, tracing, statistics and health (feature `observability`).
#[cfg(feature = "observability")]
pub use toolwarden_observability as observability;
/// GCRA rate limits (feature `rate-limit`).
#[cfg(feature = "rate-limit")]
pub use toolwarden_rate_limit as rate_limit;
/// Shared state through Redis (feature `redis`).
#[cfg(feature = "redis")]
pub use toolwarden_redis as redis;
/// Retry with backoff and budgets (feature `retry`).
#[cfg(feature = "retry")]
pub use toolwarden_retry as retry;
/// rmcp adapters (feature `rmcp`).
#[cfg(feature = "rmcp")]
pub use toolwarden_rmcp as rmcp;
