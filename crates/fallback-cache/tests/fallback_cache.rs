//! FallbackCacheLayer behaviour, driven through `poll_ready` then `call`
//! over a readiness-checking inner service, with a paused clock.
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test] fns: a panic fails the test

mod support;

use serde_json::json;
use toolwarden_circuit_breaker::{
    CircuitBreaker, CircuitBreakerLayer, CircuitRegistry, CircuitState,
};
use toolwarden_core::jsonrpc::{Id, Request, Response};
use toolwarden_core::testing::{ready_call, MockMcp, ReadyChecked, Step};
use toolwarden_core::{
    fingerprint, BoxError, CircuitOpen, Fingerprint, LoopDetected, LoopPattern, McpRequest,
    McpResponse, RetryBudgetExhausted, ToolAnnotations, ToolCatalog, ToolInfo, ToolPolicy,
};
use toolwarden_fallback_cache::{
    AlternativeRanker, FallbackCache, FallbackCacheBuilder, FallbackCacheLayer, DEGRADED_META_KEY,
    STALE_META_KEY,
};
use tower::{Layer, Service, ServiceExt};

use support::*;

type Stack = FallbackCache<BreakerStandIn<ReadyChecked<MockMcp>>>;

struct Harness {
    svc: Stack,
    mock: MockMcp,
    open: OpenCircuits,
    inject: ErrorInjector,
    recorder: Recorder,
}

fn harness_with(
    catalog: ToolCatalog,
    pending_first: bool,
    configure: impl FnOnce(FallbackCacheBuilder) -> FallbackCacheBuilder,
) -> Harness {
    let mock = server();
    let open = OpenCircuits::default();
    let recorder = Recorder::default();
    let mut checked = ReadyChecked::new(mock.clone());
    if pending_first {
        checked = checked.pending_first();
    }
    let below = BreakerStandIn::new(checked, open.clone());
    let inject = below.injector();
    let builder = FallbackCacheLayer::builder()
        .catalog(catalog)
        .max_staleness(secs(300))
        .circuits(open.circuits())
        .events(recorder.events());
    let layer = match configure(builder).build() {
        Ok(layer) => layer,
        Err(e) => panic!("test configuration refused: {e}"),
    };
    Harness {
        svc: layer.layer(below),
        mock,
        open,
        inject,
        recorder,
    }
}

fn harness(configure: impl FnOnce(FallbackCacheBuilder) -> FallbackCacheBuilder) -> Harness {
    harness_with(fixture_catalog(), false, configure)
}

fn docs_query() -> serde_json::Value {
    json!({"query": "tokio timeout"})
}

#[tokio::test(start_paused = true)]
async fn serves_a_stale_result_with_its_age_when_the_breaker_below_is_open() {
    let mut h = harness(|b| b);
    h.mock.push(
        "search_docs",
        [Step::ok("tokio::time::timeout wraps a future")],
    );
    let fresh = call(&mut h.svc, 1, "search_docs", docs_query())
        .await
        .unwrap();
    assert_eq!(h.svc.cached_results(), 1);

    tokio::time::advance(secs(42)).await;
    h.open.open("search_docs");
    let stale = call(&mut h.svc, 2, "search_docs", docs_query())
        .await
        .unwrap();

    assert_eq!(
        h.mock.calls("search_docs"),
        1,
        "the breaker refused before the server"
    );
    assert_eq!(
        stale.id,
        Id::Number(2),
        "re-addressed to the current request"
    );
    let meta = &result(&stale)["_meta"][STALE_META_KEY];
    assert_eq!(meta["stale"], true);
    assert_eq!(meta["ageSeconds"], 42);
    assert!(
        meta["reason"]
            .as_str()
            .unwrap()
            .contains("circuit open for search_docs"),
        "{meta}"
    );
    let texts = texts(&stale);
    assert_eq!(
        texts[0], "tokio::time::timeout wraps a future",
        "the original content comes first"
    );
    assert!(
        texts[1].starts_with("[stale: result from 42 s ago; search_docs is failing: circuit open"),
        "{}",
        texts[1]
    );
    assert!(!stale.is_tool_error());
    assert_eq!(
        result(&fresh)["content"],
        json!([{"type": "text", "text": texts[0]}])
    );
    assert_eq!(
        h.recorder.seen(),
        [("stale_served", "search_docs".to_owned(), Some(secs(42)))]
    );
}

#[tokio::test(start_paused = true)]
async fn without_the_note_only_meta_marks_the_result() {
    let mut h = harness(|b| b.stale_note(false));
    call(&mut h.svc, 1, "search_docs", docs_query())
        .await
        .unwrap();
    h.open.open("search_docs");
    let stale = call(&mut h.svc, 2, "search_docs", docs_query())
        .await
        .unwrap();
    assert_eq!(texts(&stale), ["search_docs ok"]);
    assert_eq!(result(&stale)["_meta"][STALE_META_KEY]["ageSeconds"], 0);
}

#[tokio::test(start_paused = true)]
async fn a_destructive_tool_result_is_never_stored() {
    let catalog = fixture_catalog();
    // Even configured as cacheable: declared destructive wins.
    catalog.configure(
        "delete_file",
        ToolPolicy {
            cacheable: Some(true),
            ..Default::default()
        },
    );
    let mut h = harness_with(catalog, false, |b| b);
    let args = json!({"path": "/tmp/x"});
    call(&mut h.svc, 1, "delete_file", args.clone())
        .await
        .unwrap();
    call(&mut h.svc, 2, "send_email", json!({"to": "a@b.c"}))
        .await
        .unwrap();
    assert_eq!(h.svc.cached_results(), 0);

    h.open.open("delete_file");
    let answer = call(&mut h.svc, 3, "delete_file", args).await.unwrap();
    assert!(answer.is_tool_error(), "degraded, not served from a cache");
    assert!(result(&answer)
        .pointer("/_meta/toolwarden~1stale")
        .is_none());
    assert_eq!(facts(&answer)["tool"], "delete_file");
    assert_eq!(
        h.recorder.seen(),
        [("degraded", "delete_file".to_owned(), None)]
    );
}

#[tokio::test(start_paused = true)]
async fn past_max_staleness_a_structured_error_with_alternatives_comes_instead() {
    let mut h = harness(|b| b.max_staleness(secs(60)));
    call(&mut h.svc, 1, "search_docs", docs_query())
        .await
        .unwrap();
    h.open.open("search_docs");

    tokio::time::advance(secs(59)).await;
    let stale = call(&mut h.svc, 2, "search_docs", docs_query())
        .await
        .unwrap();
    assert_eq!(result(&stale)["_meta"][STALE_META_KEY]["ageSeconds"], 59);

    tokio::time::advance(secs(1)).await; // 60 s: no longer younger than max_staleness
    let answer = call(&mut h.svc, 3, "search_docs", docs_query())
        .await
        .unwrap();
    assert_eq!(answer.id, Id::Number(3));
    assert!(answer.is_tool_error());
    let facts = facts(&answer);
    assert_eq!(facts["tool"], "search_docs");
    assert_eq!(facts["kind"], "rejected");
    assert_eq!(facts["class"], "transient");
    assert_eq!(facts["layer"], "circuit_breaker");
    assert_eq!(facts["retryAfterSeconds"], 30.0);
    let alternatives = facts["alternatives"].as_array().unwrap();
    assert_eq!(alternatives[0], "web_search", "{alternatives:?}");
    assert!(alternatives.len() <= 3);
    assert!(!alternatives.iter().any(|a| a == "search_docs"));
    assert!(
        texts(&answer)[0].contains("try: web_search"),
        "{:?}",
        texts(&answer)
    );
    assert_eq!(h.svc.cached_results(), 0, "the expired result was dropped");
    let names: Vec<_> = h.recorder.seen().into_iter().map(|e| e.0).collect();
    assert_eq!(names, ["stale_served", "degraded"]);
}

#[tokio::test(start_paused = true)]
async fn alternatives_skip_tools_whose_circuit_is_open() {
    let mut h = harness(|b| b);
    h.open.open("search_docs");
    h.open.open("web_search");
    let answer = call(&mut h.svc, 1, "search_docs", docs_query())
        .await
        .unwrap();
    // web_search is the one relevant tool; with its circuit open, nothing
    // is offered rather than an unrelated tool (query_database shares only
    // the word `query`).
    assert_eq!(facts(&answer)["alternatives"], json!([]));

    // Once web_search's circuit closes, it is offered again, first.
    h.open.close("web_search");
    let answer = call(&mut h.svc, 2, "search_docs", docs_query())
        .await
        .unwrap();
    assert_eq!(facts(&answer)["alternatives"][0], "web_search");
}

#[test]
fn the_ranker_puts_the_sensible_tool_first_on_the_fixture_catalog() {
    let catalog = fixture_catalog();
    let ranker = AlternativeRanker::from_catalog(&catalog);
    assert_eq!(ranker.len(), 11);
    // As the layer does for a read-only tool: no destructive tool is offered.
    let skip = |tool: &str| catalog.is_destructive(tool);
    let cases = [
        ("search_docs", "query tokio timeout", Some("web_search")),
        (
            "web_search",
            "query rust release notes",
            Some("search_docs"),
        ),
        ("read_file", "path /etc/hosts", Some("list_directory")),
        ("list_directory", "path /var/log", Some("read_file")),
        // Only `get` in common: below the relevance floor, nothing offered.
        ("get_weather", "city Oslo", None),
        ("translate_text", "text hello", None),
    ];
    for (failed, args, expected) in cases {
        let ranked = ranker.alternatives(failed, args, 3, skip);
        assert_eq!(
            ranked.first().map(String::as_str),
            expected,
            "{failed}: {ranked:?}"
        );
        assert!(!ranked.iter().any(|t| t == failed));
    }
    // With the floor off, the old behaviour: any shared term will do.
    let unfloored = AlternativeRanker::from_catalog(&catalog).with_min_relevance(0.0);
    assert_eq!(
        unfloored.alternatives("get_weather", "city Oslo", 3, skip),
        ["get_stock_price"]
    );
    // Without that rule, the plain ranking would offer delete_file first.
    assert_eq!(
        ranker.alternatives("read_file", "path /etc/hosts", 1, |_| false),
        ["delete_file"]
    );
    // Free-text ranking on its own.
    let ranked = ranker.rank("translate this sentence to French", 1, |_| false);
    assert_eq!(ranked[0].name, "translate_text");
    let ranked = ranker.rank("SQL analytics", 5, |_| false);
    assert_eq!(ranked.len(), 1);
    assert_eq!(ranked[0].name, "query_database");
}

#[tokio::test(start_paused = true)]
async fn error_results_are_never_stored_and_a_tool_error_is_answered_stale() {
    let mut h = harness(|b| b);
    // First an isError result: nothing stored, nothing stale to serve.
    h.mock.push(
        "search_docs",
        [Step::tool_error("upstream rate limit exceeded")],
    );
    let first = call(&mut h.svc, 1, "search_docs", docs_query())
        .await
        .unwrap();
    assert!(first.is_tool_error());
    assert_eq!(h.svc.cached_results(), 0);

    // A good result is stored; the next tool error is answered with it.
    call(&mut h.svc, 2, "search_docs", docs_query())
        .await
        .unwrap();
    tokio::time::advance(secs(5)).await;
    h.mock.push(
        "search_docs",
        [Step::tool_error("upstream rate limit exceeded")],
    );
    let stale = call(&mut h.svc, 3, "search_docs", docs_query())
        .await
        .unwrap();
    assert!(!stale.is_tool_error());
    let meta = &result(&stale)["_meta"][STALE_META_KEY];
    assert_eq!(meta["ageSeconds"], 5);
    assert_eq!(meta["reason"], "upstream rate limit exceeded");
    assert_eq!(texts(&stale)[0], "search_docs ok");
}

#[tokio::test(start_paused = true)]
async fn a_tool_error_with_nothing_stored_keeps_its_text_and_gains_alternatives() {
    let mut h = harness(|b| b);
    h.mock.push(
        "search_docs",
        [Step::tool_error(
            "Error executing tool search_docs: index offline",
        )],
    );
    let answer = call(&mut h.svc, 1, "search_docs", docs_query())
        .await
        .unwrap();
    assert!(answer.is_tool_error());
    let texts = texts(&answer);
    assert_eq!(texts[0], "Error executing tool search_docs: index offline");
    assert!(
        texts[1].contains("other tools that may help: web_search"),
        "{}",
        texts[1]
    );
    let meta = &result(&answer)["_meta"][DEGRADED_META_KEY];
    assert_eq!(meta["class"], "server");
    assert_eq!(meta["alternatives"][0], "web_search");
    assert_eq!(
        h.recorder.seen(),
        [("degraded", "search_docs".to_owned(), None)]
    );
}

#[tokio::test(start_paused = true)]
async fn client_errors_reach_the_model_without_stale_or_alternatives() {
    let mut h = harness(|b| b);
    call(&mut h.svc, 1, "search_docs", docs_query())
        .await
        .unwrap();

    h.mock.push(
        "search_docs",
        [Step::tool_error(
            "invalid arguments: limit must be a number",
        )],
    );
    let answer = call(&mut h.svc, 2, "search_docs", docs_query())
        .await
        .unwrap();
    assert_eq!(
        texts(&answer),
        ["invalid arguments: limit must be a number"],
        "unchanged"
    );
    assert!(result(&answer)
        .pointer("/_meta/toolwarden~1stale")
        .is_none());

    // A JSON-RPC client error becomes a readable isError result, no alternatives.
    h.mock.push(
        "search_docs",
        [Step::rpc_error(-32602, "Invalid params: limit")],
    );
    let answer = call(&mut h.svc, 3, "search_docs", docs_query())
        .await
        .unwrap();
    assert!(answer.is_tool_error());
    assert_eq!(facts(&answer)["class"], "client");
    assert_eq!(facts(&answer)["alternatives"], json!([]));
    assert!(
        texts(&answer)[0].contains("change the arguments"),
        "{:?}",
        texts(&answer)
    );
    assert_eq!(h.svc.cached_results(), 1, "the good result is still there");
}

#[tokio::test(start_paused = true)]
async fn json_rpc_server_errors_are_answered_stale_or_degraded() {
    let mut h = harness(|b| b);
    h.mock
        .push("search_docs", [Step::rpc_error(-32603, "Internal error")]);
    let answer = call(&mut h.svc, 1, "search_docs", docs_query())
        .await
        .unwrap();
    assert_eq!(answer.id, Id::Number(1));
    assert!(
        answer.is_tool_error(),
        "a JSON-RPC error became an isError result"
    );
    assert_eq!(facts(&answer)["kind"], "protocol_error");
    assert_eq!(facts(&answer)["class"], "server");
    assert_eq!(facts(&answer)["alternatives"][0], "web_search");
    assert_eq!(h.svc.cached_results(), 0);

    call(&mut h.svc, 2, "search_docs", docs_query())
        .await
        .unwrap();
    h.mock
        .push("search_docs", [Step::rpc_error(-32603, "Internal error")]);
    let stale = call(&mut h.svc, 3, "search_docs", docs_query())
        .await
        .unwrap();
    assert_eq!(
        result(&stale)["_meta"][STALE_META_KEY]["reason"],
        "JSON-RPC error -32603: Internal error"
    );
}

#[tokio::test(start_paused = true)]
async fn a_loop_detected_below_is_never_answered_stale() {
    let mut h = harness(|b| b);
    call(&mut h.svc, 1, "search_docs", docs_query())
        .await
        .unwrap();
    h.inject.fail_next(LoopDetected::new(
        "search_docs",
        5,
        LoopPattern::RepeatedFailure,
    ));
    let answer = call(&mut h.svc, 2, "search_docs", docs_query())
        .await
        .unwrap();
    assert!(answer.is_tool_error());
    assert_eq!(facts(&answer)["layer"], "loop_guard");
    assert!(texts(&answer)[0].contains("change approach"));
    assert!(result(&answer)
        .pointer("/_meta/toolwarden~1stale")
        .is_none());
}

#[tokio::test(start_paused = true)]
async fn spent_retries_are_answered_stale_else_reported_with_their_attempts() {
    let mut h = harness(|b| b);
    h.inject
        .fail_next(RetryBudgetExhausted::new("search_docs", 3));
    let answer = call(&mut h.svc, 1, "search_docs", docs_query())
        .await
        .unwrap();
    assert_eq!(facts(&answer)["attempts"], 3);
    assert_eq!(facts(&answer)["layer"], "retry");

    call(&mut h.svc, 2, "search_docs", docs_query())
        .await
        .unwrap();
    h.inject
        .fail_next(RetryBudgetExhausted::new("search_docs", 3));
    let stale = call(&mut h.svc, 3, "search_docs", docs_query())
        .await
        .unwrap();
    assert_eq!(result(&stale)["_meta"][STALE_META_KEY]["stale"], true);
}

#[tokio::test(start_paused = true)]
async fn transport_failures_are_answered_stale() {
    let mut h = harness(|b| b);
    call(&mut h.svc, 1, "read_file", json!({"path": "a"}))
        .await
        .unwrap();
    h.mock.push("read_file", [Step::closed()]);
    let stale = call(&mut h.svc, 2, "read_file", json!({"path": "a"}))
        .await
        .unwrap();
    assert!(result(&stale)["_meta"][STALE_META_KEY]["reason"]
        .as_str()
        .unwrap()
        .contains("connection closed"));
    // Other arguments, other fingerprint: nothing to serve.
    h.mock.push("read_file", [Step::closed()]);
    let answer = call(&mut h.svc, 3, "read_file", json!({"path": "b"}))
        .await
        .unwrap();
    assert!(answer.is_tool_error());
    assert_eq!(facts(&answer)["kind"], "transport");
    // `_meta` in the arguments does not change the fingerprint.
    h.mock.push("read_file", [Step::closed()]);
    let args = json!({"path": "a", "_meta": {"progressToken": 7}});
    let stale = call(&mut h.svc, 4, "read_file", args).await.unwrap();
    assert_eq!(result(&stale)["_meta"][STALE_META_KEY]["stale"], true);
}

#[tokio::test(start_paused = true)]
async fn continuations_are_never_stored_nor_served() {
    let mut h = harness(|b| b.fresh_ttl(Some(secs(60))));
    let continuation = |id: i64| {
        Request::new(
            id,
            "tools/call",
            Some(json!({
                "name": "search_docs",
                "arguments": {"query": "tokio timeout"},
                "inputResponses": {"confirm": {"action": "accept"}},
            })),
        )
    };
    h.svc
        .ready()
        .await
        .unwrap()
        .call(continuation(1))
        .await
        .unwrap();
    assert_eq!(h.svc.cached_results(), 0);

    // A plain call with the same tool and arguments is stored...
    call(&mut h.svc, 2, "search_docs", docs_query())
        .await
        .unwrap();
    assert_eq!(h.svc.cached_results(), 1);
    // ... but a continuation is neither answered fresh from it ...
    h.svc
        .ready()
        .await
        .unwrap()
        .call(continuation(3))
        .await
        .unwrap();
    assert_eq!(h.mock.calls("search_docs"), 3);
    // ... nor stale when it fails.
    h.open.open("search_docs");
    let answer = h
        .svc
        .ready()
        .await
        .unwrap()
        .call(continuation(4))
        .await
        .unwrap();
    assert!(answer.is_tool_error());
    assert!(result(&answer)
        .pointer("/_meta/toolwarden~1stale")
        .is_none());
}

#[tokio::test(start_paused = true)]
async fn input_required_results_are_not_stored() {
    let mut h = harness(|b| b);
    h.mock.push(
        "search_docs",
        [Step::Result(
            json!({"resultType": "input_required", "inputRequests": {}}),
        )],
    );
    call(&mut h.svc, 1, "search_docs", docs_query())
        .await
        .unwrap();
    assert_eq!(h.svc.cached_results(), 0);
}

#[tokio::test(start_paused = true)]
async fn fresh_mode_answers_from_the_cache_within_the_ttl() {
    let mut h = harness(|b| b.fresh_ttl(Some(secs(10))));
    call(&mut h.svc, 1, "search_docs", docs_query())
        .await
        .unwrap();
    tokio::time::advance(secs(9)).await;
    let hit = call(&mut h.svc, 2, "search_docs", docs_query())
        .await
        .unwrap();
    assert_eq!(h.mock.calls("search_docs"), 1, "answered without calling");
    assert_eq!(hit.id, Id::Number(2));
    assert_eq!(texts(&hit), ["search_docs ok"]);
    assert!(
        result(&hit).get("_meta").is_none(),
        "a fresh answer is not marked stale"
    );

    tokio::time::advance(secs(1)).await;
    call(&mut h.svc, 3, "search_docs", docs_query())
        .await
        .unwrap();
    assert_eq!(
        h.mock.calls("search_docs"),
        2,
        "past the ttl the call goes through"
    );
    // A tool that is not cacheable is always called.
    call(&mut h.svc, 4, "create_issue", json!({"title": "x"}))
        .await
        .unwrap();
    call(&mut h.svc, 5, "create_issue", json!({"title": "x"}))
        .await
        .unwrap();
    assert_eq!(h.mock.calls("create_issue"), 2);
}

#[tokio::test(start_paused = true)]
async fn degrade_off_passes_errors_up_as_they_are() {
    let mut h = harness(|b| b.degrade(false));
    h.open.open("search_docs");
    let err = call(&mut h.svc, 1, "search_docs", docs_query())
        .await
        .unwrap_err();
    assert!(err.is::<CircuitOpen>(), "{err}");
    h.open.close("search_docs");
    h.mock
        .push("search_docs", [Step::rpc_error(-32603, "Internal error")]);
    let answer = call(&mut h.svc, 2, "search_docs", docs_query())
        .await
        .unwrap();
    assert_eq!(answer.rpc_error().map(|e| e.code), Some(-32603));
    h.mock.push("search_docs", [Step::tool_error("boom")]);
    let answer = call(&mut h.svc, 3, "search_docs", docs_query())
        .await
        .unwrap();
    assert_eq!(texts(&answer), ["boom"], "no alternatives added");
    assert!(h.recorder.seen().is_empty());
    // Stale serving does not depend on degrading.
    call(&mut h.svc, 4, "search_docs", docs_query())
        .await
        .unwrap();
    h.open.open("search_docs");
    let stale = call(&mut h.svc, 5, "search_docs", docs_query())
        .await
        .unwrap();
    assert_eq!(result(&stale)["_meta"][STALE_META_KEY]["stale"], true);
}

#[tokio::test(start_paused = true)]
async fn no_alternatives_when_ranking_is_off() {
    let mut h = harness(|b| b.alternatives(0));
    h.open.open("search_docs");
    let answer = call(&mut h.svc, 1, "search_docs", docs_query())
        .await
        .unwrap();
    assert_eq!(facts(&answer)["alternatives"], json!([]));
}

#[tokio::test(start_paused = true)]
async fn an_untrusted_catalog_caches_nothing_it_was_not_told_to() {
    let catalog = fixture_catalog();
    catalog.set_trusted(false);
    catalog.configure(
        "get_weather",
        ToolPolicy {
            cacheable: Some(true),
            ..Default::default()
        },
    );
    let mut h = harness_with(catalog, false, |b| b);
    call(&mut h.svc, 1, "search_docs", docs_query())
        .await
        .unwrap();
    assert_eq!(h.svc.cached_results(), 0, "read-only hints are not trusted");
    call(&mut h.svc, 2, "get_weather", json!({"city": "Oslo"}))
        .await
        .unwrap();
    assert_eq!(h.svc.cached_results(), 1, "configured as cacheable");
}

#[tokio::test(start_paused = true)]
async fn the_ranking_follows_catalog_changes() {
    let catalog = fixture_catalog();
    let mut h = harness_with(catalog.clone(), false, |b| b);
    h.open.open("search_docs");
    let answer = call(&mut h.svc, 1, "search_docs", docs_query())
        .await
        .unwrap();
    assert_eq!(facts(&answer)["alternatives"][0], "web_search");
    let mirror = ToolInfo::new(
        "search_docs_mirror",
        "Search the mirrored project documentation for pages matching a query about tokio",
    );
    // Without annotations a tool counts as destructive: not offered for a read.
    catalog.insert(mirror.clone());
    let answer = call(&mut h.svc, 2, "search_docs", docs_query())
        .await
        .unwrap();
    assert_eq!(facts(&answer)["alternatives"][0], "web_search");
    catalog.insert(mirror.annotations(ToolAnnotations {
        read_only_hint: Some(true),
        ..Default::default()
    }));
    let answer = call(&mut h.svc, 3, "search_docs", docs_query())
        .await
        .unwrap();
    assert_eq!(facts(&answer)["alternatives"][0], "search_docs_mirror");
}

#[tokio::test(start_paused = true)]
async fn the_cache_is_bounded_by_entries_and_by_bytes() {
    let mut h = harness(|b| b.max_entries(3));
    for i in 0..20 {
        call(&mut h.svc, i, "search_docs", json!({"query": i}))
            .await
            .unwrap();
        assert!(h.svc.cached_results() <= 3, "{}", h.svc.cached_results());
    }
    assert!(h.svc.cached_results() >= 1);

    // 8 KiB of room, results of ~1 KiB: at most 8 fit, whatever max_entries says.
    let mut h = harness(|b| b.max_entries(1000).max_bytes(8 * 1024));
    let big = "x".repeat(1000);
    h.mock.set_default("search_docs", Step::ok(&big));
    let one =
        Response::result(Id::Number(0), toolwarden_core::testing::text_result(&big)).size_hint();
    assert!(one >= 1000);
    for i in 0..50 {
        call(&mut h.svc, i, "search_docs", json!({"query": i}))
            .await
            .unwrap();
        assert!(
            h.svc.cached_results() * one <= 8 * 1024,
            "{}",
            h.svc.cached_results()
        );
    }
    assert!(h.svc.cached_results() >= 1);
}

#[tokio::test(start_paused = true)]
async fn other_requests_pass_through_untouched() {
    let mut h = harness(|b| b.fresh_ttl(Some(secs(60))));
    let list = || Request::new(1, "tools/list", None);
    let answer = h.svc.ready().await.unwrap().call(list()).await.unwrap();
    assert_eq!(answer.payload.unwrap(), json!({}));
    h.inject.fail_next(CircuitOpen::new("x", secs(1)));
    let err = h.svc.ready().await.unwrap().call(list()).await.unwrap_err();
    assert!(err.is::<CircuitOpen>(), "no degrading outside tools/call");
    assert_eq!(h.svc.cached_results(), 0);
}

#[tokio::test(start_paused = true)]
async fn malformed_calls_never_panic() {
    let mut h = harness(|b| b.fresh_ttl(Some(secs(60))));
    let weird = [
        Request::new(1, "tools/call", None),
        Request::new(2, "tools/call", Some(json!([1, 2]))),
        Request::new(3, "tools/call", Some(json!({"name": 7}))),
        Request::new(
            4,
            "tools/call",
            Some(json!({"name": "search_docs", "arguments": "text"})),
        ),
        Request::new(
            Id::String("s".into()),
            "tools/call",
            Some(json!({"name": "", "arguments": {}})),
        ),
        Request::new(
            Id::Null,
            "tools/call",
            Some(json!({"name": "unknown_tool", "arguments": {"q": "ü".repeat(10_000)}})),
        ),
    ];
    for req in weird {
        h.inject.fail_next(CircuitOpen::new("x", secs(1)));
        let answer = h.svc.ready().await.unwrap().call(req).await;
        if let Ok(answer) = answer {
            assert!(
                answer.is_tool_error() || answer.rpc_error().is_some() || answer.payload.is_ok()
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn readiness_is_reserved_and_pending_is_propagated() {
    for pending_first in [false, true] {
        let mut h = harness_with(fixture_catalog(), pending_first, |b| {
            b.fresh_ttl(Some(secs(10)))
        });
        for id in 0..3 {
            // Misses, a fresh hit (inner stays ready, not called), then a miss again.
            if id == 2 {
                tokio::time::advance(secs(10)).await;
            }
            let answer = call(&mut h.svc, id, "search_docs", docs_query())
                .await
                .unwrap();
            assert_eq!(answer.id, Id::Number(id));
        }
        assert_eq!(h.mock.calls("search_docs"), 2);
        tokio::time::advance(secs(10)).await; // past the ttl: the call goes below and fails
        h.open.open("search_docs");
        let stale = call(&mut h.svc, 9, "search_docs", docs_query())
            .await
            .unwrap();
        assert_eq!(result(&stale)["_meta"][STALE_META_KEY]["stale"], true);
    }
}

#[tokio::test(start_paused = true)]
async fn clones_share_one_cache() {
    let mut h = harness(|b| b);
    let mut other = h.svc.clone();
    call(&mut h.svc, 1, "search_docs", docs_query())
        .await
        .unwrap();
    h.open.open("search_docs");
    let stale = call(&mut other, 2, "search_docs", docs_query())
        .await
        .unwrap();
    assert_eq!(result(&stale)["_meta"][STALE_META_KEY]["stale"], true);
    assert_eq!(h.svc.cached_results(), other.cached_results());
    // The inner service is reachable and can be taken back.
    other
        .get_mut()
        .injector()
        .fail_next(CircuitOpen::new("x", secs(1)));
    let mut below = other.into_inner();
    let err = below
        .ready()
        .await
        .unwrap()
        .call(Request::tool_call(3, "x", json!({})))
        .await;
    assert!(err.unwrap_err().is::<CircuitOpen>());
}

#[tokio::test(start_paused = true)]
async fn works_over_a_service_fn_with_any_error() {
    let layer = FallbackCacheLayer::builder()
        .catalog(fixture_catalog())
        .build()
        .unwrap();
    let inner = tower::service_fn(|req: Request| async move {
        if req.id == Id::Number(1) {
            Ok(Response::result(
                req.id,
                toolwarden_core::testing::text_result("first"),
            ))
        } else {
            Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset))
        }
    });
    let mut svc = ServiceExt::<Request>::map_err(layer.layer(inner), |e: BoxError| e);
    call(&mut svc, 1, "web_search", json!({"query": "x"}))
        .await
        .unwrap();
    let stale = call(&mut svc, 2, "web_search", json!({"query": "x"}))
        .await
        .unwrap();
    assert_eq!(texts(&stale)[0], "first");
    let degraded = call(&mut svc, 3, "web_search", json!({"query": "y"}))
        .await
        .unwrap();
    assert_eq!(facts(&degraded)["kind"], "transport");
    assert_eq!(facts(&degraded)["alternatives"][0], "search_docs");
}

/// The layer over the real `CircuitBreakerLayer` (as in the standard stack:
/// the cache above, the breaker below it), the breaker's registry telling
/// the cache which circuits are open.
struct OverBreaker {
    svc: FallbackCache<CircuitBreaker<ReadyChecked<MockMcp>>>,
    mock: MockMcp,
    registry: CircuitRegistry,
    recorder: Recorder,
}

/// A breaker that opens after three failures, for two minutes.
fn three_strikes() -> toolwarden_circuit_breaker::CircuitBreakerBuilder {
    CircuitBreakerLayer::builder()
        .failure_threshold(3)
        .minimum_calls(3)
        .reset_timeout(secs(120))
        .jitter(0.0)
}

fn over_breaker(max_staleness: std::time::Duration) -> OverBreaker {
    let mock = server();
    let breaker = three_strikes().build().unwrap();
    let registry = breaker.registry().clone();
    let recorder = Recorder::default();
    let cache = FallbackCacheLayer::builder()
        .catalog(fixture_catalog())
        .max_staleness(max_staleness)
        .circuits(registry.circuits())
        .events(recorder.events())
        .build()
        .unwrap();
    OverBreaker {
        svc: cache.layer(breaker.layer(ReadyChecked::new(mock.clone()))),
        mock,
        registry,
        recorder,
    }
}

/// Makes `tool` fail (a server-class tool error) until the breaker opens.
async fn trip(h: &mut OverBreaker, tool: &str, args: serde_json::Value) {
    h.mock.set_default(
        tool,
        Step::tool_error(&format!("Error executing tool {tool}: index offline")),
    );
    for id in 100..103 {
        call(&mut h.svc, id, tool, args.clone()).await.unwrap();
    }
    assert_eq!(h.registry.state(tool), Some(CircuitState::Open), "{tool}");
}

#[tokio::test(start_paused = true)]
async fn over_the_real_breaker_an_open_circuit_is_answered_with_the_stale_result_and_its_age() {
    let mut h = over_breaker(secs(300));
    let fresh = call(&mut h.svc, 1, "search_docs", docs_query())
        .await
        .unwrap();
    assert_eq!(h.svc.cached_results(), 1);

    trip(&mut h, "search_docs", docs_query()).await;
    let reached = h.mock.calls("search_docs");

    tokio::time::advance(secs(20)).await;
    let stale = call(&mut h.svc, 2, "search_docs", docs_query())
        .await
        .unwrap();
    assert_eq!(
        h.mock.calls("search_docs"),
        reached,
        "the open breaker refused the call before the server"
    );
    assert_eq!(stale.id, Id::Number(2));
    assert!(!stale.is_tool_error());
    assert_eq!(texts(&stale)[0], texts(&fresh)[0]);
    let meta = &result(&stale)["_meta"][STALE_META_KEY];
    assert_eq!(meta["stale"], true);
    assert_eq!(meta["ageSeconds"], 20);
    let reason = meta["reason"].as_str().unwrap();
    assert!(reason.contains("circuit open for search_docs"), "{reason}");
    assert!(
        texts(&stale)[1].starts_with("[stale: result from 20 s ago; search_docs is failing"),
        "{:?}",
        texts(&stale)
    );
    let last = h.recorder.seen().pop().unwrap();
    assert_eq!(
        last,
        ("stale_served", "search_docs".to_owned(), Some(secs(20)))
    );
}

#[tokio::test(start_paused = true)]
async fn over_the_real_breaker_past_max_staleness_alternatives_skip_open_circuits() {
    let mut h = over_breaker(secs(60));
    call(&mut h.svc, 1, "search_docs", docs_query())
        .await
        .unwrap();
    trip(&mut h, "search_docs", docs_query()).await;

    tokio::time::advance(secs(61)).await;
    let answer = call(&mut h.svc, 2, "search_docs", docs_query())
        .await
        .unwrap();
    assert!(answer.is_tool_error());
    assert!(
        result(&answer)
            .pointer("/_meta/toolwarden~1stale")
            .is_none(),
        "nothing stale served"
    );
    let refused = facts(&answer);
    assert_eq!(refused["layer"], "circuit_breaker");
    assert_eq!(refused["kind"], "rejected");
    assert_eq!(refused["alternatives"][0], "web_search");
    assert_eq!(h.svc.cached_results(), 0, "the expired result was dropped");

    // web_search's breaker opens too: it is no longer offered, and neither
    // a destructive tool nor an unrelated one is offered in its place.
    trip(&mut h, "web_search", json!({"query": "tokio timeout"})).await;
    let answer = call(&mut h.svc, 3, "search_docs", docs_query())
        .await
        .unwrap();
    let alternatives: Vec<String> = facts(&answer)["alternatives"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    // The next best match by score, query_database (read-only, sharing the
    // word `query`), is under the relevance floor.
    assert!(alternatives.is_empty(), "{alternatives:?}");
}

/// With the breaker keyed per session and tool, an alternative is skipped
/// when its circuit refuses the failed call's session, and offered to a
/// session whose circuit of it is closed. (Asked by the tool's name alone,
/// the registry read the session `-`'s circuit: an alternative open for
/// the session was offered.)
#[tokio::test(start_paused = true)]
async fn alternatives_skip_tools_whose_circuit_is_open_for_the_calls_session() {
    let mock = server();
    let breaker = three_strikes()
        .key_by(toolwarden_core::KeyBy::SessionTool)
        .build()
        .unwrap();
    let registry = breaker.registry().clone();
    let cache = FallbackCacheLayer::builder()
        .catalog(fixture_catalog())
        .circuits(registry.circuits())
        .build()
        .unwrap();
    let svc = cache.layer(breaker.layer(ReadyChecked::new(mock.clone())));
    let in_session = |session: &'static str, id: i64, tool: &'static str| {
        let mut request = Request::tool_call(id, tool, docs_query());
        request
            .extensions
            .insert(toolwarden_core::SessionKey::from(session));
        svc.clone().oneshot(request)
    };
    mock.set_default(
        "web_search",
        Step::tool_error("Error executing tool web_search: down"),
    );
    for id in 0..3 {
        in_session("s1", id, "web_search").await.unwrap();
    }
    assert_eq!(registry.state("s1/web_search"), Some(CircuitState::Open));
    mock.set_default(
        "search_docs",
        Step::tool_error("Error executing tool search_docs: index offline"),
    );
    // A tool error is passed on with the alternatives in its `_meta`; a
    // refusal is rendered with them in its facts.
    let alternatives = |answer: &Response| -> Vec<String> {
        let degraded = &result(answer)["_meta"][DEGRADED_META_KEY];
        let facts = if degraded.is_null() {
            facts(answer)
        } else {
            degraded
        };
        facts["alternatives"]
            .as_array()
            .map(|a| a.iter().map(|t| t.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default()
    };
    let failed_in_s1 = in_session("s1", 10, "search_docs").await.unwrap();
    assert!(
        !alternatives(&failed_in_s1).contains(&"web_search".to_owned()),
        "{:?}",
        facts(&failed_in_s1)
    );
    let failed_in_s2 = in_session("s2", 11, "search_docs").await.unwrap();
    assert_eq!(
        alternatives(&failed_in_s2).first().map(String::as_str),
        Some("web_search"),
        "{:?}",
        failed_in_s2.payload
    );
}

#[tokio::test(start_paused = true)]
async fn the_fingerprint_is_computed_once_and_shared_with_the_layers_below() {
    let mut h = harness(|b| b);
    let args = json!({"query": "tokio timeout", "_meta": {"progressToken": 7}});
    call(&mut h.svc, 1, "search_docs", args.clone())
        .await
        .unwrap();
    let below = McpRequest::extension::<Fingerprint>(&h.mock.requests()[0]).copied();
    assert_eq!(below, Some(fingerprint("search_docs", args.as_object())));
    // A tool that is not cacheable needs none, so none is computed.
    call(&mut h.svc, 2, "create_issue", json!({"title": "x"}))
        .await
        .unwrap();
    assert_eq!(
        McpRequest::extension::<Fingerprint>(&h.mock.requests()[1]),
        None
    );

    // A fingerprint an earlier layer stored is used as it is: a request with
    // other arguments but that fingerprint is answered with the stored result.
    h.open.open("search_docs");
    let mut request = Request::tool_call(3, "search_docs", json!({"query": "other"}));
    request
        .extensions
        .insert(fingerprint("search_docs", args.as_object()));
    let stale = h.svc.ready().await.unwrap().call(request).await.unwrap();
    assert_eq!(result(&stale)["_meta"][STALE_META_KEY]["stale"], true);
}

// Issue 15, scenario 5: every service built from one layer (and from a clone
// of it) shares one cache, as a stack layered over one service per
// connection expects. Before, each `layer()` call made a fresh cache.
#[tokio::test(start_paused = true)]
async fn regression_15_5_services_from_one_layer_share_one_cache() {
    let mock = server();
    let open = OpenCircuits::default();
    let layer = FallbackCacheLayer::builder()
        .catalog(fixture_catalog())
        .circuits(open.circuits())
        .build()
        .unwrap();
    let mut first = layer.layer(BreakerStandIn::new(
        ReadyChecked::new(mock.clone()),
        open.clone(),
    ));
    let mut second = layer.clone().layer(BreakerStandIn::new(
        ReadyChecked::new(mock.clone()),
        open.clone(),
    ));
    mock.push(
        "search_docs",
        [Step::ok("tokio::time::timeout wraps a future")],
    );
    call(&mut first, 1, "search_docs", docs_query())
        .await
        .unwrap();
    assert_eq!(first.cached_results(), 1);
    assert_eq!(second.cached_results(), 1, "one cache for both services");

    open.open("search_docs");
    let stale = call(&mut second, 2, "search_docs", docs_query())
        .await
        .unwrap();
    assert_eq!(
        result(&stale)["_meta"][STALE_META_KEY]["stale"],
        true,
        "the other connection's service serves the result the first stored"
    );
}

// The design's promise: a refusal rendered by the fallback cache stays a
// refusal for the layers above it (loop guard, observability).
#[tokio::test(start_paused = true)]
async fn a_degraded_refusal_is_still_classified_as_a_rejection() {
    use toolwarden_core::{CallKind, Classify, McpClassifier, OutcomeKind};
    let mut h = harness(|b| b);
    h.open.open("search_docs");
    let answer = call(&mut h.svc, 1, "search_docs", docs_query())
        .await
        .unwrap();
    assert!(answer.is_tool_error());
    let outcome = McpClassifier::new().classify_response(CallKind::ToolCall, &answer);
    assert_eq!(outcome.kind, OutcomeKind::Rejected);
    assert!(!outcome.is_counted_failure());
    assert!(outcome.retry_after.is_some());
}

/// A passthrough service neither stores nor serves: the tool error a normal
/// service answers with the stored result comes back as the tool sent it.
#[tokio::test(start_paused = true)]
async fn passthrough_forwards_every_call_untouched() {
    for passthrough in [false, true] {
        let mut h = harness(|b| b);
        if passthrough {
            h.svc = h.svc.passthrough();
        }
        assert_eq!(h.svc.is_passthrough(), passthrough);
        call(&mut h.svc, 1, "search_docs", docs_query())
            .await
            .unwrap();
        assert_eq!(h.svc.cached_results(), usize::from(!passthrough));
        h.mock.push(
            "search_docs",
            [Step::tool_error("upstream rate limit exceeded")],
        );
        let answer = call(&mut h.svc, 2, "search_docs", docs_query())
            .await
            .unwrap();
        assert_eq!(h.mock.calls("search_docs"), 2);
        assert_eq!(answer.id, Id::Number(2));
        if passthrough {
            assert!(answer.is_tool_error());
            assert_eq!(texts(&answer), ["upstream rate limit exceeded"]);
            assert!(result(&answer).get("_meta").is_none());
            assert!(h.recorder.seen().is_empty());
        } else {
            assert!(!answer.is_tool_error(), "answered stale");
            assert_eq!(result(&answer)["_meta"][STALE_META_KEY]["stale"], true);
            assert_eq!(h.recorder.seen().len(), 1);
        }
    }
}

/// With `per_session`, a stored result is one session's: another session's
/// failing call of the same tool and arguments gets no stale answer (a
/// proxy's upstream per session answers each from state of its own), and
/// the session that stored it does.
#[tokio::test(start_paused = true)]
async fn per_session_results_are_served_only_in_their_session() {
    let in_session = |id: i64, session: &str| {
        let mut request = Request::tool_call(id, "search_docs", docs_query());
        request.insert_extension(toolwarden_core::SessionKey::from(session));
        request
    };
    for per_session in [true, false] {
        let mut h = harness(|b| b.per_session(per_session).fresh_ttl(Some(secs(10))));
        h.mock.push("search_docs", [Step::ok("alice's documents")]);
        ready_call(&mut h.svc, in_session(1, "a")).await.unwrap();
        assert_eq!(h.svc.cached_results(), 1);

        // Fresh: another session's call goes to its server when scoped.
        h.mock.push("search_docs", [Step::ok("bob's documents")]);
        let other = ready_call(&mut h.svc, in_session(2, "b")).await.unwrap();
        let expected = if per_session {
            "bob's documents"
        } else {
            "alice's documents"
        };
        assert_eq!(texts(&other)[0], expected, "per_session = {per_session}");

        // Stale: session "c" never stored anything.
        tokio::time::advance(secs(20)).await;
        h.open.open("search_docs");
        let refused = ready_call(&mut h.svc, in_session(3, "c")).await.unwrap();
        assert_eq!(
            result(&refused)["_meta"][STALE_META_KEY].is_object(),
            !per_session,
            "per_session = {per_session}: {refused:?}"
        );
        let stale = ready_call(&mut h.svc, in_session(4, "a")).await.unwrap();
        assert_eq!(result(&stale)["_meta"][STALE_META_KEY]["stale"], true);
        assert_eq!(texts(&stale)[0], "alice's documents");
    }
}
