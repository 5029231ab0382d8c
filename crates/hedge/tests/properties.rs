//! Properties of HedgeLayer over random catalogs, annotations, trust,
//! latencies, outcomes and budgets: a hedge never fires for a tool not safe
//! to repeat; every caller gets exactly one answer, with its id; the budget
//! is never exceeded; nothing is left running.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

use proptest::prelude::*;
use serde_json::{json, Map, Value};
use toolwarden_core::jsonrpc::{Id, Request};
use toolwarden_core::testing::{ready_call, MockMcp, ReadyChecked, Step};
use toolwarden_core::{ToolCatalog, ToolPolicy};
use toolwarden_hedge::{BudgetConfig, HedgeLayer};
use tower::Layer;

const TOOLS: usize = 4;
const TTL: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
struct Tool {
    read_only: Option<bool>,
    idempotent: Option<bool>,
    configured: Option<bool>,
    /// A `safe_to_hedge` override on the layer.
    hedge_override: Option<bool>,
}

fn tool() -> impl Strategy<Value = Tool> {
    let hint = proptest::option::of(any::<bool>());
    (
        hint.clone(),
        hint.clone(),
        hint.clone(),
        proptest::option::weighted(0.2, any::<bool>()),
    )
        .prop_map(|(read_only, idempotent, configured, hedge_override)| Tool {
            read_only,
            idempotent,
            configured,
            hedge_override,
        })
}

fn step() -> impl Strategy<Value = Step> {
    let latency = prop_oneof![0u64..20, 20u64..120, 120u64..400].prop_map(Duration::from_millis);
    let kind = prop_oneof![
        4 => Just(Step::ok("good")),
        1 => Just(Step::tool_error("temporarily unavailable")),
        1 => Just(Step::rpc_error(-32603, "internal error")),
        1 => Just(Step::closed()),
        1 => Just(Step::Hang),
    ];
    (kind, latency).prop_map(|(kind, latency)| kind.after(latency))
}

#[derive(Debug, Clone)]
struct Case {
    tools: Vec<Tool>,
    trusted: bool,
    budget: BudgetConfig,
    percentile: Option<f64>,
    /// Per call: the tool, and how long the caller waits before giving up.
    calls: Vec<(usize, u64)>,
    /// Per tool: the steps its arrivals play, in order (then `good`).
    steps: Vec<Vec<Step>>,
}

fn case() -> impl Strategy<Value = Case> {
    let budget = (
        prop_oneof![Just(0.0), Just(0.1), Just(0.5), Just(1.0)],
        0u32..4,
    )
        .prop_filter("a budget allows something", |(r, m)| *r > 0.0 || *m > 0)
        .prop_map(|(ratio, min_per_sec)| BudgetConfig {
            ratio,
            min_per_sec,
            ttl: TTL,
        });
    (
        proptest::collection::vec(tool(), TOOLS),
        any::<bool>(),
        budget,
        prop_oneof![Just(None), Just(Some(0.5)), Just(Some(0.95))],
        proptest::collection::vec(
            (0..TOOLS, prop_oneof![3 => Just(5_000u64), 1 => 1u64..500]),
            1..40,
        ),
        proptest::collection::vec(proptest::collection::vec(step(), 0..40), TOOLS),
    )
        .prop_map(|(tools, trusted, budget, percentile, calls, steps)| Case {
            tools,
            trusted,
            budget,
            percentile,
            calls,
            steps,
        })
}

fn name(i: usize) -> String {
    format!("t{i}")
}

fn catalog(case: &Case) -> ToolCatalog {
    let catalog = ToolCatalog::new();
    let tools: Vec<Value> = case
        .tools
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let mut annotations = Map::new();
            if let Some(v) = t.read_only {
                annotations.insert("readOnlyHint".into(), v.into());
            }
            if let Some(v) = t.idempotent {
                annotations.insert("idempotentHint".into(), v.into());
            }
            json!({"name": name(i), "annotations": annotations})
        })
        .collect();
    catalog.fill_from_tools_list(&json!({ "tools": tools }));
    for (i, t) in case.tools.iter().enumerate() {
        if t.configured.is_some() {
            catalog.configure(
                &name(i),
                ToolPolicy {
                    safe_to_repeat: t.configured,
                    ..ToolPolicy::default()
                },
            );
        }
    }
    catalog.set_trusted(case.trusted);
    catalog
}

/// Whether `tool` may be repeated at all, as the retry layer decides: the
/// hedge layer must never send a second copy of anything else.
fn safe_to_repeat(catalog: &ToolCatalog, case: &Case, tool: usize) -> bool {
    case.tools[tool]
        .hedge_override
        .unwrap_or_else(|| catalog.is_safe_to_repeat(&name(tool)))
}

/// Runs `case`, checks every property, and returns the hedges sent.
fn run(case: &Case) -> Result<u64, TestCaseError> {
    let catalog = catalog(case);
    let mut builder = HedgeLayer::builder()
        .catalog(catalog.clone())
        .delay(Duration::from_millis(30))
        .percentile(case.percentile)
        .min_samples(3)
        .budget(case.budget);
    for (i, t) in case.tools.iter().enumerate() {
        if let Some(safe) = t.hedge_override {
            builder = builder.tool(name(i), move |b| b.safe_to_hedge(safe));
        }
    }
    let hedge = builder.build().unwrap();
    let mut upstream = MockMcp::new();
    for (i, steps) in case.steps.iter().enumerate() {
        upstream = upstream.script(&name(i), steps.clone());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let answers = runtime.block_on(async {
        let calls = case
            .calls
            .iter()
            .enumerate()
            .map(|(id, &(tool, patience))| {
                let mut svc = hedge.layer(ReadyChecked::new(upstream.clone()));
                let request = Request::tool_call(id as i64, &name(tool), json!({"n": id}));
                async move {
                    tokio::time::timeout(
                        Duration::from_millis(patience),
                        ready_call(&mut svc, request),
                    )
                    .await
                }
            });
        futures::future::join_all(calls).await
    });

    // Exactly one answer per caller, with its own id.
    prop_assert_eq!(answers.len(), case.calls.len());
    for (id, answer) in answers.iter().enumerate() {
        if let Ok(Ok(response)) = answer {
            prop_assert_eq!(&response.id, &Id::Number(id as i64));
        }
    }
    // Arrivals per call: the caller's copy, and a hedge only for tools safe to repeat.
    let mut arrivals: HashMap<i64, (usize, usize)> = HashMap::new();
    let mut hedges = 0u64;
    for request in upstream.requests() {
        let (id, hedged) = match &request.id {
            Id::Number(n) => (*n, false),
            Id::String(s) => {
                let original = s.strip_suffix("#tw-hedge");
                prop_assert!(original.is_some(), "unexpected id {s}");
                (original.unwrap().parse().unwrap(), true)
            }
            Id::Null => return Err(TestCaseError::fail("null id")),
        };
        let entry = arrivals.entry(id).or_default();
        if hedged {
            entry.1 += 1;
            hedges += 1;
        } else {
            entry.0 += 1;
        }
    }
    let mut hedgeable = 0u64;
    for (id, &(tool, _)) in case.calls.iter().enumerate() {
        let (first, hedged) = arrivals.get(&(id as i64)).copied().unwrap_or_default();
        prop_assert_eq!(first, 1, "call {} reached the server once as itself", id);
        prop_assert!(hedged <= 1, "at most one hedge per call");
        if hedged == 1 {
            prop_assert!(
                safe_to_repeat(&catalog, case, tool),
                "call {} of t{} was hedged though the tool is not safe to repeat",
                id,
                tool
            );
        }
        if hedge.is_hedged(&Request::tool_call(0, &name(tool), json!({}))) {
            hedgeable += 1;
        } else {
            prop_assert_eq!(hedged, 0);
        }
    }
    // The budget: every deposit came before every withdrawal (all calls
    // start at once, and the run ends long before the window does).
    let budget = case.budget;
    let bound = (budget.ratio * hedgeable as f64 + 1e-9).floor() as u64
        + u64::from(budget.min_per_sec) * TTL.as_secs();
    prop_assert!(hedges <= bound, "{} hedges, bound {}", hedges, bound);
    // Nothing left running: losers and abandoned calls were dropped.
    prop_assert_eq!(upstream.in_flight(), 0);
    Ok(hedges)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn hedges_are_safe_answered_once_and_within_budget(case in case()) {
        run(&case)?;
    }
}

/// The same check, with everything hedgeable and a generous budget, so
/// that hedges do fire (the property above must not pass vacuously).
#[test]
fn hedges_do_fire_when_allowed() {
    let tool = Tool {
        read_only: Some(true),
        idempotent: Some(true),
        configured: None,
        hedge_override: None,
    };
    let case = Case {
        tools: vec![tool; TOOLS],
        trusted: true,
        budget: BudgetConfig {
            ratio: 1.0,
            min_per_sec: 0,
            ttl: TTL,
        },
        percentile: None,
        calls: (0..8).map(|i| (i % TOOLS, 5_000)).collect(),
        steps: vec![vec![Step::ok("slow").after(Duration::from_millis(300))]; TOOLS],
    };
    // Each tool's first arrival is slow: its first call is hedged.
    assert_eq!(run(&case).unwrap(), TOOLS as u64);
}
