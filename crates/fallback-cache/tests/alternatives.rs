//! Which alternatives a degraded answer suggests: the relevance floor, the
//! availability check and the upstream rules (issue 19), driven through
//! `poll_ready` then `call` over a readiness-checking inner service.
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test] fns: a panic fails the test

mod support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use serde_json::{json, Value};
use toolwarden_core::classify::{CallTimedOut, TransportError, TransportErrorKind};
use toolwarden_core::jsonrpc::Response;
use toolwarden_core::testing::{MockMcp, ReadyChecked, Step};
use toolwarden_core::{CircuitOpen, McpResponse, ToolCatalog, ToolInfo};
use toolwarden_fallback_cache::{
    AlternativeRanker, FailedCall, FallbackCache, FallbackCacheBuilder, FallbackCacheLayer,
    DEFAULT_MIN_RELEVANCE, DEGRADED_META_KEY,
};
use tower::Layer;

use support::*;

type Stack = FallbackCache<BreakerStandIn<ReadyChecked<MockMcp>>>;

struct Harness {
    svc: Stack,
    mock: MockMcp,
    open: OpenCircuits,
    inject: ErrorInjector,
}

fn harness(
    catalog: ToolCatalog,
    configure: impl FnOnce(FallbackCacheBuilder) -> FallbackCacheBuilder,
) -> Harness {
    let mock = server();
    let open = OpenCircuits::default();
    let below = BreakerStandIn::new(ReadyChecked::new(mock.clone()), open.clone());
    let inject = below.injector();
    let builder = FallbackCacheLayer::builder()
        .catalog(catalog)
        .circuits(open.circuits());
    let layer = configure(builder).build().expect("valid configuration");
    Harness {
        svc: layer.layer(below),
        mock,
        open,
        inject,
    }
}

/// A `tools/list` entry with a description and string parameters.
fn listed(name: &str, description: &str, params: &[&str]) -> Value {
    let properties: serde_json::Map<String, Value> = params
        .iter()
        .map(|p| ((*p).to_owned(), json!({"type": "string"})))
        .collect();
    json!({"name": name, "description": description,
           "inputSchema": {"type": "object", "properties": properties}})
}

fn tool(name: &str, description: &str, params: &[&str]) -> ToolInfo {
    ToolInfo::from_value(&listed(name, description, params)).unwrap()
}

/// The alternatives a failed call was answered with: the structured
/// error's, or those added to a tool's own `isError` result (none when
/// nothing was added).
fn suggested(answer: &Response) -> Vec<String> {
    let result = result(answer);
    let list = if result["structuredContent"]["toolwarden"].is_object() {
        &result["structuredContent"]["toolwarden"]["alternatives"]
    } else {
        &result["_meta"][DEGRADED_META_KEY]["alternatives"]
    };
    list.as_array()
        .map(|a| a.iter().map(|t| t.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

/// A scripted flaky server, as a single upstream lists it (untrusted,
/// so every tool counts as destructive and none is filtered out for it).
/// `always_fail` and `crash` share only generic words (`call`, `return`).
fn flaky_server_catalog() -> ToolCatalog {
    let catalog = ToolCatalog::new();
    catalog.fill_from_tools_list(&json!({"tools": [
        listed("always_fail", "Always fails: the call returns an error", &[]),
        listed("crash", "Crash the server process: the call never returns", &[]),
        listed("echo", "Echo the message back", &["message"]),
        listed("add", "Add two numbers", &["a", "b"]),
    ]}));
    catalog
}

#[tokio::test(start_paused = true)]
async fn always_fail_suggests_nothing_rather_than_an_unrelated_tool() {
    let mut h = harness(flaky_server_catalog(), |b| b);
    h.mock
        .set_default("always_fail", Step::rpc_error(-32603, "boom"));
    let answer = call(&mut h.svc, 1, "always_fail", json!({})).await.unwrap();
    assert_eq!(facts(&answer)["alternatives"], json!([]));
    assert!(
        !texts(&answer)[0].contains("try:"),
        "no alternative named: {:?}",
        texts(&answer)
    );

    // The tool's own isError result is kept as it is, nothing added.
    h.mock
        .set_default("always_fail", Step::tool_error("always fails"));
    let answer = call(&mut h.svc, 2, "always_fail", json!({})).await.unwrap();
    assert_eq!(texts(&answer), ["always fails"]);
    assert!(result(&answer).pointer("/_meta").is_none());

    // Without the floor, the old answer: "try: crash".
    let mut h = harness(flaky_server_catalog(), |b| b.min_relevance(0.0));
    h.mock
        .set_default("always_fail", Step::rpc_error(-32603, "boom"));
    let answer = call(&mut h.svc, 3, "always_fail", json!({})).await.unwrap();
    assert_eq!(facts(&answer)["alternatives"], json!(["crash"]));
}

/// A gateway's catalog: three upstreams, tools namespaced.
fn gateway_catalog() -> ToolCatalog {
    let catalog = ToolCatalog::new();
    catalog.replace_upstream(
        "weather",
        [tool(
            "weather_get_forecast",
            "Get the weather forecast for a city",
            &["city", "days"],
        )],
    );
    catalog.replace_upstream(
        "other",
        [
            tool(
                "other__forecast_lookup",
                "Look up the forecast for a place",
                &["place", "days"],
            ),
            tool(
                "other__send_email",
                "Send an email message",
                &["to", "body"],
            ),
        ],
    );
    catalog.replace_upstream(
        "time",
        [tool(
            "time__get_current_time",
            "Get the current time in a timezone",
            &["timezone"],
        )],
    );
    catalog
}

#[tokio::test(start_paused = true)]
async fn a_forecast_of_another_upstream_is_suggested_for_a_failed_forecast() {
    let mut h = harness(gateway_catalog(), |b| b);
    let args = json!({"city": "Oslo", "days": "3"});
    // The server answered with an error, then the connection dropped: either
    // way the other upstream's forecast is offered, and nothing else.
    h.mock.push(
        "weather_get_forecast",
        [Step::rpc_error(-32603, "internal"), Step::closed()],
    );
    for id in 1..=2 {
        let answer = call(&mut h.svc, id, "weather_get_forecast", args.clone())
            .await
            .unwrap();
        assert_eq!(suggested(&answer), ["other__forecast_lookup"], "call {id}");
    }
    let answer = call(&mut h.svc, 3, "weather_get_forecast", args.clone())
        .await
        .unwrap();
    assert!(!answer.is_tool_error(), "the mock answers again");
}

#[tokio::test(start_paused = true)]
async fn an_unavailable_tool_is_never_suggested_and_is_again_once_available() {
    let down: Arc<Mutex<HashSet<String>>> = Arc::default();
    let catalog = gateway_catalog();
    let availability = {
        let down = Arc::clone(&down);
        let catalog = catalog.clone();
        move |tool: &str| {
            catalog
                .upstream_of(tool)
                .is_none_or(|upstream| !down.lock().unwrap().contains(&*upstream))
        }
    };
    let mut h = harness(catalog, |b| b.available(availability));
    h.mock
        .set_default("weather_get_forecast", Step::rpc_error(-32603, "internal"));
    let args = json!({"city": "Oslo"});

    down.lock().unwrap().insert("other".to_owned());
    let answer = call(&mut h.svc, 1, "weather_get_forecast", args.clone())
        .await
        .unwrap();
    assert!(suggested(&answer).is_empty(), "{:?}", suggested(&answer));

    down.lock().unwrap().clear();
    let answer = call(&mut h.svc, 2, "weather_get_forecast", args.clone())
        .await
        .unwrap();
    assert_eq!(suggested(&answer), ["other__forecast_lookup"]);

    // An open circuit is read alongside: either one keeps a tool out.
    h.open.open("other__forecast_lookup");
    let answer = call(&mut h.svc, 3, "weather_get_forecast", args)
        .await
        .unwrap();
    assert!(suggested(&answer).is_empty());
}

/// Two forecasts on the failing upstream, one on another.
fn forecasts_catalog() -> ToolCatalog {
    let catalog = ToolCatalog::new();
    catalog.replace_upstream(
        "weather",
        [
            tool(
                "weather__forecast",
                "Weather forecast for a city",
                &["city"],
            ),
            tool(
                "weather__forecast_hourly",
                "Hourly weather forecast for a city",
                &["city"],
            ),
        ],
    );
    catalog.replace_upstream(
        "meteo",
        [tool(
            "meteo__forecast",
            "Forecast of the weather at a place",
            &["place"],
        )],
    );
    catalog
}

#[test]
fn the_same_upstreams_forecast_scores_higher_on_its_own() {
    // The precondition of the next test: by score alone, the failing
    // upstream's own tool would come first.
    let ranker = AlternativeRanker::from_catalog(&forecasts_catalog());
    let ranked = ranker.rank("forecast Weather forecast for a city city", 3, |_| false);
    let names: Vec<&str> = ranked.iter().map(|r| r.name).collect();
    assert_eq!(
        names,
        [
            "weather__forecast",
            "weather__forecast_hourly",
            "meteo__forecast"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn the_failing_upstreams_tools_come_last_on_a_tool_failure_and_not_at_all_when_it_is_down() {
    let mut h = harness(forecasts_catalog(), |b| b);
    let args = json!({"city": "Oslo"});
    let tool_level = ["meteo__forecast", "weather__forecast_hourly"];

    // The server answered: the tool failed, its upstream did not.
    h.mock.push(
        "weather__forecast",
        [Step::tool_error("upstream API error")],
    );
    let answer = call(&mut h.svc, 1, "weather__forecast", args.clone())
        .await
        .unwrap();
    assert_eq!(suggested(&answer), tool_level, "isError result");
    h.mock
        .push("weather__forecast", [Step::rpc_error(-32603, "internal")]);
    let answer = call(&mut h.svc, 2, "weather__forecast", args.clone())
        .await
        .unwrap();
    assert_eq!(suggested(&answer), tool_level, "JSON-RPC error");
    // A refusal by a layer below says nothing about the upstream.
    h.open.open("weather__forecast");
    let answer = call(&mut h.svc, 3, "weather__forecast", args.clone())
        .await
        .unwrap();
    assert_eq!(facts(&answer)["layer"], "circuit_breaker");
    assert_eq!(suggested(&answer), tool_level, "circuit open");
    h.open.close("weather__forecast");

    // The upstream itself failed: none of its tools is offered.
    h.mock.push("weather__forecast", [Step::closed()]);
    let answer = call(&mut h.svc, 4, "weather__forecast", args.clone())
        .await
        .unwrap();
    assert_eq!(facts(&answer)["kind"], "transport");
    assert_eq!(suggested(&answer), ["meteo__forecast"], "connection closed");
    let down: [(&str, toolwarden_core::BoxError); 2] = [
        (
            "connect failed",
            Box::new(TransportError::new(
                TransportErrorKind::ConnectFailed,
                "refused",
            )),
        ),
        (
            "timeout",
            Box::new(CallTimedOut {
                after: Duration::from_secs(30),
            }),
        ),
    ];
    for (id, (what, error)) in (5..).zip(down) {
        h.inject.fail_next(error);
        let answer = call(&mut h.svc, id, "weather__forecast", args.clone())
            .await
            .unwrap();
        assert_eq!(suggested(&answer), ["meteo__forecast"], "{what}");
    }
    // meteo's circuit opens: on a tool-level failure the same upstream's
    // forecast is still offered; when the upstream is down, nothing is.
    h.open.open("meteo__forecast");
    h.inject
        .fail_next(CircuitOpen::new("weather", Duration::from_secs(1)));
    let answer = call(&mut h.svc, 7, "weather__forecast", args.clone())
        .await
        .unwrap();
    assert_eq!(
        suggested(&answer),
        ["weather__forecast_hourly"],
        "a refusal"
    );
    h.mock.push("weather__forecast", [Step::closed()]);
    let answer = call(&mut h.svc, 8, "weather__forecast", args)
        .await
        .unwrap();
    assert!(suggested(&answer).is_empty(), "{:?}", suggested(&answer));
}

#[tokio::test(start_paused = true)]
async fn with_a_single_upstream_a_transport_failure_still_suggests_its_other_tools() {
    // No upstream is known: every tool is ranked by score alone, as before.
    let catalog = ToolCatalog::new();
    catalog.fill_from_tools_list(&json!({"tools": [
        listed("forecast", "Weather forecast for a city", &["city"]),
        listed("forecast_hourly", "Hourly weather forecast for a city", &["city"]),
    ]}));
    let mut h = harness(catalog, |b| b);
    h.mock.push("forecast", [Step::closed()]);
    let answer = call(&mut h.svc, 1, "forecast", json!({"city": "Oslo"}))
        .await
        .unwrap();
    assert_eq!(suggested(&answer), ["forecast_hourly"]);
}

#[test]
fn the_default_floor_separates_related_tools_from_incidental_ones() {
    // The figures DEFAULT_MIN_RELEVANCE's docs quote, on the fixture catalog.
    let catalog = fixture_catalog();
    let ranker = AlternativeRanker::from_catalog(&catalog);
    let relevance = |failed: &str, args: &str, candidate: &str| {
        let info = catalog.get(failed).unwrap();
        let query = format!(
            "{failed} {} {} {args}",
            info.description.unwrap(),
            info.parameters.join(" ")
        );
        ranker
            .rank(&query, 11, |_| false)
            .into_iter()
            .find(|r| r.name == candidate)
            .map_or(0.0, |r| r.relevance)
    };
    let cases = [
        ("search_docs", "query tokio timeout", "web_search", 0.37),
        ("read_file", "path /etc/hosts", "list_directory", 0.51),
        ("send_email", "", "create_issue", 0.14),
        ("search_docs", "query tokio timeout", "query_database", 0.11),
        ("get_weather", "city Oslo", "get_stock_price", 0.0),
    ];
    for (failed, args, candidate, expected) in cases {
        let found = relevance(failed, args, candidate);
        assert!(
            (found - expected).abs() < 0.01,
            "{failed} / {candidate}: {found:.3}"
        );
        assert_eq!(
            found >= DEFAULT_MIN_RELEVANCE,
            expected > 0.3,
            "{failed} / {candidate}"
        );
    }
}

// ---------------------------------------------------------------------------
// Properties of the ranker over arbitrary catalogs.

const WORDS: &[&str] = &[
    "search", "web", "docs", "weather", "forecast", "city", "file", "read", "write", "delete",
    "email", "send", "query", "database", "get", "list", "time", "zone", "convert", "issue",
];
const UPSTREAMS: &[Option<&str>] = &[None, Some("alpha"), Some("beta"), Some("gamma")];

fn arb_tool() -> impl Strategy<Value = ToolInfo> {
    (
        prop::collection::vec(prop::sample::select(WORDS), 1..3),
        prop::collection::vec(prop::sample::select(WORDS), 0..6),
        prop::sample::select(UPSTREAMS),
    )
        .prop_map(|(name, description, upstream)| {
            let base = name.join("_");
            let name = match upstream {
                Some(u) => format!("{u}__{base}"),
                None => base,
            };
            let mut tool = ToolInfo::new(name, description.join(" "));
            tool.upstream = upstream.map(Arc::from);
            tool
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn suggestions_keep_every_rule(
        tools in prop::collection::vec(arb_tool(), 1..12),
        failed in any::<prop::sample::Index>(),
        unavailable in prop::collection::vec(any::<bool>(), 12),
        upstream_failed in any::<bool>(),
        floor in prop::sample::select(&[0.0, 0.15, 0.5][..]),
        limit in 1usize..6,
        argument in prop::sample::select(WORDS),
    ) {
        let ranker = AlternativeRanker::new(&tools).with_min_relevance(floor);
        // The ranker keeps the last of tools sharing a name.
        let unique: Vec<&ToolInfo> = tools
            .iter()
            .enumerate()
            .filter(|(i, t)| !tools[i + 1..].iter().any(|later| later.name == t.name))
            .map(|(_, t)| t)
            .collect();
        let failed = unique[failed.index(unique.len())];
        let is_unavailable = |name: &str| {
            unique.iter().position(|t| t.name == name).is_some_and(|i| unavailable[i])
        };
        let call = FailedCall::new(&failed.name)
            .argument_text(argument)
            .upstream_failed(upstream_failed);
        let suggested = ranker.suggest(&call, limit, is_unavailable);

        prop_assert!(suggested.len() <= limit);
        let mut seen = HashSet::new();
        let mut reached_own_upstream = false;
        for name in &suggested {
            prop_assert!(seen.insert(name), "{name} twice");
            prop_assert_ne!(name, &failed.name);
            prop_assert!(!is_unavailable(name), "{name} is unavailable");
            let upstream = unique.iter().find(|t| &t.name == name).unwrap().upstream.clone();
            let own = failed.upstream.is_some() && upstream == failed.upstream;
            prop_assert!(!(own && upstream_failed), "{name}: the failed upstream's");
            // Other upstreams' tools all come before the failed upstream's.
            prop_assert!(own || !reached_own_upstream, "{name} after the own upstream's");
            reached_own_upstream |= own;
        }
        // A higher floor only ever takes suggestions away.
        let wide = 64;
        let lower = ranker_with(&tools, 0.0).suggest(&call, wide, is_unavailable);
        let higher = ranker_with(&tools, floor).suggest(&call, wide, is_unavailable);
        prop_assert!(higher.iter().all(|t| lower.contains(t)), "{higher:?} ⊄ {lower:?}");
    }
}

fn ranker_with(tools: &[ToolInfo], floor: f64) -> AlternativeRanker {
    AlternativeRanker::new(tools).with_min_relevance(floor)
}

const FIXTURE_TOOLS: &[&str] = &[
    "search_docs",
    "web_search",
    "get_weather",
    "send_email",
    "delete_file",
    "read_file",
    "list_directory",
    "create_issue",
    "query_database",
    "translate_text",
    "get_stock_price",
];

/// The fixture tools, spread over three upstreams (a tool's upstream is
/// its position modulo 3).
fn fixture_gateway() -> ToolCatalog {
    let catalog = fixture_catalog();
    let tools = catalog.tools();
    for (i, upstream) in ["one", "two", "three"].into_iter().enumerate() {
        let mine = tools
            .iter()
            .filter(|t| FIXTURE_TOOLS.iter().position(|n| *n == t.name).unwrap() % 3 == i)
            .cloned();
        catalog.replace_upstream(upstream, mine);
    }
    assert_eq!(catalog.len(), FIXTURE_TOOLS.len());
    catalog
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn the_layer_never_suggests_an_unavailable_tool(
        unavailable in prop::collection::hash_set(prop::sample::select(FIXTURE_TOOLS), 0..11),
        failed in prop::sample::select(FIXTURE_TOOLS),
        failure in 0usize..4,
        floor in prop::sample::select(&[0.0, DEFAULT_MIN_RELEVANCE][..]),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let catalog = fixture_gateway();
        let failed_upstream = catalog.upstream_of(failed).unwrap();
        let down: HashSet<String> = unavailable.iter().map(|t| (*t).to_owned()).collect();
        let mut h = harness(catalog.clone(), move |b| {
            b.min_relevance(floor).available(move |tool: &str| !down.contains(tool))
        });
        let step = match failure {
            0 => Step::tool_error("upstream API error"),
            1 => Step::rpc_error(-32603, "internal"),
            2 => Step::closed(),
            _ => Step::ok(""), // an empty result: a Server failure
        };
        h.mock.push(failed, [step]);
        let answer = runtime
            .block_on(call(&mut h.svc, 1, failed, json!({"query": "tokio", "path": "/tmp"})))
            .unwrap();
        for name in suggested(&answer) {
            prop_assert!(!unavailable.contains(name.as_str()), "{name} is unavailable");
            prop_assert_ne!(&name, failed);
            if failure == 2 {
                prop_assert_ne!(catalog.upstream_of(&name), Some(failed_upstream.clone()));
            }
        }
    }
}
