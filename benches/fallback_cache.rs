//! The fallback cache's costs: storing a good 1 KiB result on the success
//! path, a fresh-mode cache hit, serving a stale result after a failure,
//! and ranking alternatives over a described tool catalog.
//!
//! Run: `cargo bench -p toolwarden-workspace --bench fallback_cache -- --warm-up-time 2 --measurement-time 5`
//!
//! Every variant calls an always-ready service whose future is ready at
//! once (`std::future::Ready`), driven synchronously: `poll_ready`, `call`,
//! one poll of the response future. Requests are the core's JSON-RPC
//! `tools/call` for `search_docs` with `{"query": "tokio timeout"}`, cloned
//! outside the timed section (so the fingerprint is computed in every timed
//! call, as for a fresh request); responses carry a 1 KiB result (a text
//! item and a structured list of ten hits, ~1 KiB serialised).
//!
//! - `bare_1KiB`: the service alone (cloning the 1 KiB response it returns).
//! - `store_1KiB`: `FallbackCacheLayer` (defaults) over it, the tool
//!   cacheable: fingerprint, classify, clone the result into the cache.
//! - `not_cacheable_1KiB`: the layer over it, the tool not cacheable
//!   (classify only, for degrading).
//! - `hit_fresh_1KiB`: fresh mode, result stored: answered from the cache
//!   (fingerprint, lookup, clone, re-address) without calling the service.
//! - `stale_1KiB`: the service fails with `CircuitOpen`; the stored result is
//!   served, marked stale with `_meta` and a text note.
//! - `rank_11_tools`: `AlternativeRanker::alternatives` for a failed
//!   `search_docs` over the 11-tool fixture catalog (index already built).
//! - `overhead_store_1KiB`: `store - bare` measured directly: each sample
//!   alternates chunks of 32 calls on each side (which side goes first
//!   alternates too; the request is cloned inside the timed section on both
//!   sides, so it cancels out) and reports the difference of their times,
//!   so load that drifts during the run hits both sides alike. A chunk pair
//!   in which either chunk ran over 3 times the fastest chunk of its side
//!   was interrupted (preempted) and is measured again.

mod support;

use std::future::{ready, Ready};
use std::hint::black_box;
use std::task::{Context, Poll};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use serde_json::{json, Value};
use support::{one_call, overhead_pair};
use toolwarden_core::jsonrpc::{Id, Request, Response};
use toolwarden_core::{BoxError, CircuitOpen, ToolCatalog};
use toolwarden_fallback_cache::{AlternativeRanker, FallbackCacheLayer};
use tower::{Layer, Service};

/// A ready service answering every call with a clone of one response (or
/// with `CircuitOpen`, when `fail` is set).
#[derive(Clone)]
struct Ready1KiB {
    response: Response,
    fail: bool,
}

impl Service<Request> for Ready1KiB {
    type Response = Response;
    type Error = BoxError;
    type Future = Ready<Result<Response, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        if self.fail {
            return ready(Err(Box::new(CircuitOpen::new(
                "search_docs",
                Duration::from_secs(30),
            ))));
        }
        let mut response = self.response.clone();
        response.id = req.id;
        ready(Ok(response))
    }
}

fn result_1kib() -> Value {
    let hits: Vec<Value> = (0..10)
        .map(|i| json!({"title": format!("tokio::time::timeout, part {i}"), "url": format!("https://docs.example/t/{i}"), "score": 0.5}))
        .collect();
    let result = json!({
        "content": [{"type": "text", "text": "x".repeat(78)}],
        "structuredContent": {"hits": hits},
        "isError": false,
    });
    let len = result.to_string().len();
    assert!((1000..=1100).contains(&len), "{len}");
    result
}

fn fixture_catalog() -> ToolCatalog {
    let read_only = json!({"readOnlyHint": true});
    let tools = [
        (
            "search_docs",
            "Search the project documentation for pages matching a query",
            &["query", "limit"][..],
        ),
        (
            "web_search",
            "Search the web and return the pages that best match a query",
            &["query"],
        ),
        (
            "get_weather",
            "Get the current weather and forecast for a city",
            &["city"],
        ),
        (
            "send_email",
            "Send an email message to a recipient",
            &["to", "subject", "body"],
        ),
        ("delete_file", "Delete a file from the workspace", &["path"]),
        (
            "read_file",
            "Read the contents of a file in the workspace",
            &["path"],
        ),
        (
            "list_directory",
            "List the files and folders in a directory of the workspace",
            &["path"],
        ),
        (
            "create_issue",
            "Create a new issue in the project tracker",
            &["title", "body"],
        ),
        (
            "query_database",
            "Run a read-only SQL query against the analytics database",
            &["sql"],
        ),
        (
            "translate_text",
            "Translate text from one language to another",
            &["text", "target_language"],
        ),
        (
            "get_stock_price",
            "Get the latest stock price for a ticker symbol",
            &["symbol"],
        ),
    ];
    let list: Vec<Value> = tools
        .iter()
        .map(|(name, description, params)| {
            let properties: serde_json::Map<String, Value> = params
                .iter()
                .map(|p| ((*p).to_owned(), json!({"type": "string"})))
                .collect();
            let annotations = if name.starts_with("send")
                || name.starts_with("delete")
                || name.starts_with("create")
            {
                json!({"destructiveHint": true})
            } else {
                read_only.clone()
            };
            json!({"name": name, "description": description,
                   "inputSchema": {"type": "object", "properties": properties},
                   "annotations": annotations})
        })
        .collect();
    let catalog = ToolCatalog::new();
    assert_eq!(catalog.fill_from_tools_list(&json!({ "tools": list })), 11);
    catalog.set_trusted(true);
    catalog
}

fn request() -> Request {
    Request::tool_call(1, "search_docs", json!({"query": "tokio timeout"}))
}

fn bench_fallback_cache(c: &mut Criterion) {
    let response = Response::result(Id::Number(1), result_1kib());
    let inner = Ready1KiB {
        response,
        fail: false,
    };
    let req = request();
    let mut group = c.benchmark_group("fallback_cache");

    let mut bare = inner.clone();
    group.bench_function("bare_1KiB", |b| {
        b.iter_batched(
            || req.clone(),
            |r| black_box(one_call(&mut bare, r)),
            BatchSize::SmallInput,
        )
    });

    let layer = FallbackCacheLayer::builder()
        .catalog(fixture_catalog())
        .build()
        .expect("valid configuration");
    // Each sanity check runs one call before its bench, so it holds even when a
    // filter skips the bench itself.
    let mut store = layer.layer(inner.clone());
    one_call(&mut store, req.clone());
    assert_eq!(store.cached_results(), 1);
    group.bench_function("store_1KiB", |b| {
        b.iter_batched(
            || req.clone(),
            |r| black_box(one_call(&mut store, r)),
            BatchSize::SmallInput,
        )
    });

    // A layer of its own: every service built from one layer shares its cache.
    let mut not_cacheable = FallbackCacheLayer::builder()
        .catalog(fixture_catalog())
        .build()
        .expect("valid configuration")
        .layer(inner.clone());
    let create = Request::tool_call(1, "create_issue", json!({"title": "tokio timeout"}));
    one_call(&mut not_cacheable, create.clone());
    assert_eq!(not_cacheable.cached_results(), 0);
    group.bench_function("not_cacheable_1KiB", |b| {
        b.iter_batched(
            || create.clone(),
            |r| black_box(one_call(&mut not_cacheable, r)),
            BatchSize::SmallInput,
        )
    });

    let fresh = FallbackCacheLayer::builder()
        .catalog(fixture_catalog())
        .fresh_ttl(Some(Duration::from_secs(300)))
        .build()
        .expect("valid configuration");
    let mut hit = fresh.layer(inner.clone());
    one_call(&mut hit, req.clone());
    group.bench_function("hit_fresh_1KiB", |b| {
        b.iter_batched(
            || req.clone(),
            |r| black_box(one_call(&mut hit, r)),
            BatchSize::SmallInput,
        )
    });

    let mut stale = layer.layer(inner.clone());
    one_call(&mut stale, req.clone());
    stale.get_mut().fail = true;
    let answer = one_call(&mut stale, req.clone());
    assert_eq!(
        answer.payload.as_ref().expect("a result")["_meta"]["toolwarden/stale"]["stale"],
        true
    );
    group.bench_function("stale_1KiB", |b| {
        b.iter_batched(
            || req.clone(),
            |r| black_box(one_call(&mut stale, r)),
            BatchSize::SmallInput,
        )
    });

    let mut bare = inner.clone();
    let mut store = layer.layer(inner.clone());
    one_call(&mut store, req.clone());
    assert_eq!(store.cached_results(), 1);
    let mut overhead = overhead_pair(
        || {
            black_box(one_call(&mut bare, black_box(&req).clone()));
        },
        || {
            black_box(one_call(&mut store, black_box(&req).clone()));
        },
    );
    group.bench_function("overhead_store_1KiB", |b| b.iter_custom(&mut overhead));
    drop(overhead);

    let ranker = AlternativeRanker::from_catalog(&fixture_catalog());
    assert_eq!(
        ranker.alternatives("search_docs", "query tokio timeout", 3, |_| false)[0],
        "web_search"
    );
    group.bench_function("rank_11_tools", |b| {
        b.iter(|| {
            black_box(ranker.alternatives(
                black_box("search_docs"),
                "query tokio timeout",
                3,
                |_| false,
            ))
        })
    });
    group.finish();
}

criterion_group!(benches, bench_fallback_cache);
criterion_main!(benches);
