//! `deploy/`: the Grafana dashboard's queries name only metrics and labels
//! the proxy really exports, and `prometheus.yml` scrapes the path the
//! proxy serves. End-to-end: the built `toolwarden` binary in front of the
//! repository's flaky test server (Python SDK), driven until every family
//! of metrics appears (calls, errors, durations, calls in flight, circuit
//! state, rate-limit refusals, loop blocks), then scraped.
//!
//! The same run checks what the metrics address serves beside `/metrics`:
//! `/stats` (calls in flight), `/health?history=1` (the checks' history)
//! and `/circuits` (each circuit's recent errors, timed).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde_json::{json, Value};
use support::{component, eventually, flaky_server_script, free_port, http_get, Proxy, LIMIT};

fn deploy_file(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy")).join(name)
}

/// Labels Prometheus adds to every series it scrapes (not the proxy's).
const TARGET_LABELS: [&str; 2] = ["job", "instance"];

/// What a scrape exports: per metric name a query may use (histogram
/// families as `_bucket`, `_sum`, `_count`; summaries as themselves,
/// `_sum`, `_count`), the label names seen on its samples.
#[derive(Debug, Default)]
struct Exported {
    metrics: BTreeMap<String, BTreeSet<String>>,
}

impl Exported {
    fn parse(text: &str) -> Exported {
        let mut types: BTreeMap<String, String> = BTreeMap::new();
        let mut samples: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                    types.insert(name.to_owned(), kind.to_owned());
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (series, _) = line.rsplit_once(' ').expect("a sample has a value");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, label_names(rest.trim_end_matches('}'))),
                None => (series, BTreeSet::new()),
            };
            samples.entry(name.to_owned()).or_default().extend(labels);
        }
        let mut metrics = BTreeMap::new();
        for (name, labels) in samples {
            // A sample name is usable only with the suffix its family's
            // type gives it: `x_bucket` of a histogram, not of a counter.
            let family = types.contains_key(&name).then(|| name.clone()).or_else(|| {
                ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
                    let base = name.strip_suffix(suffix)?;
                    let kind = types.get(base)?;
                    let allowed = match kind.as_str() {
                        "histogram" => true,
                        "summary" => *suffix != "_bucket",
                        _ => false,
                    };
                    allowed.then(|| base.to_owned())
                })
            });
            assert!(
                family.is_some(),
                "{name}: a sample without a # TYPE family in the scrape"
            );
            metrics.insert(name, labels);
        }
        Exported { metrics }
    }
}

/// The label names of a sample's label set `a="x",b="y"`.
fn label_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some((name, after)) = rest.split_once("=\"") {
        names.insert(name.trim_start_matches(',').trim().to_owned());
        // Skip the value, honouring escaped quotes.
        let mut escaped = false;
        let mut end = after.len();
        for (i, c) in after.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    end = i + 1;
                    break;
                }
                _ => escaped = false,
            }
        }
        rest = &after[end..];
    }
    names
}

/// What one PromQL expression names: metrics (with the labels of their
/// selectors) and the labels of `by`/`without`/`on`/`ignoring` clauses.
#[derive(Debug, Default, PartialEq)]
struct Names {
    metrics: Vec<(String, Vec<String>)>,
    grouping: Vec<String>,
}

const KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "inf",
    "nan",
];

/// A small PromQL scanner: enough for dashboard queries (selectors,
/// functions, aggregations with grouping, ranges, numbers, `$variables`).
fn promql_names(expr: &str) -> Names {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Names::default();
    let mut i = 0;
    let ident_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let ident_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let skip_ws = |mut j: usize| {
        while j < chars.len() && chars[j].is_whitespace() {
            j += 1;
        }
        j
    };
    // Reads `( a, b )` from `j` (at the parenthesis): the names and the end.
    let list = |j: usize| -> (Vec<String>, usize) {
        let close = chars[j..]
            .iter()
            .position(|c| *c == ')')
            .map_or(chars.len(), |p| j + p);
        let inner: String = chars[j + 1..close].iter().collect();
        let items = inner
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        (items, close + 1)
    };
    // Reads `{ a="x", b!~"y" }` from `j` (at the brace): label names and the end.
    let selector = |j: usize| -> (Vec<String>, usize) {
        let mut labels = Vec::new();
        let mut k = j + 1;
        while k < chars.len() && chars[k] != '}' {
            if chars[k] == '"' {
                k += 1;
                while k < chars.len() && chars[k] != '"' {
                    if chars[k] == '\\' {
                        k += 1;
                    }
                    k += 1;
                }
                k += 1;
                continue;
            }
            if ident_start(chars[k]) {
                let start = k;
                while k < chars.len() && ident_char(chars[k]) {
                    k += 1;
                }
                labels.push(chars[start..k].iter().collect());
                continue;
            }
            k += 1;
        }
        (labels, k + 1)
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
        } else if c == '[' {
            // A range or subquery duration: `[5m]`, `[$__rate_interval]`.
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c == '$' || c.is_ascii_digit() || c == '.' {
            // A variable or a number (with exponent or unit letters).
            i += 1;
            while i < chars.len() && (ident_char(chars[i]) || chars[i] == '.') {
                i += 1;
            }
        } else if c == '{' {
            // A selector without a metric name: its labels still count.
            let (labels, end) = selector(i);
            names.metrics.push((String::new(), labels));
            i = end;
        } else if ident_start(c) {
            let start = i;
            while i < chars.len() && ident_char(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = skip_ws(i);
            if matches!(
                word.as_str(),
                "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
            ) && chars.get(next) == Some(&'(')
            {
                let (labels, end) = list(next);
                names.grouping.extend(labels);
                i = end;
            } else if KEYWORDS.contains(&word.as_str()) || chars.get(next) == Some(&'(') {
                // An operator, an aggregation or a function.
            } else if chars.get(next) == Some(&'{') {
                let (labels, end) = selector(next);
                names.metrics.push((word, labels));
                i = end;
            } else {
                names.metrics.push((word, Vec::new()));
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Every `expr` of the dashboard's panels (and of panels nested in rows),
/// with its panel's title.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for panel in panels.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("(untitled)");
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push((title.to_owned(), expr.to_owned()));
                }
            }
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// What is wrong with the queries against `exported`: one line per
/// unknown metric or label, naming the panel and the query.
fn problems(queries: &[(String, String)], exported: &Exported) -> Vec<String> {
    let mut problems = Vec::new();
    for (title, expr) in queries {
        let names = promql_names(expr);
        let mut labels_in_query: BTreeSet<&str> = TARGET_LABELS.into_iter().collect();
        for (metric, labels) in &names.metrics {
            if metric.is_empty() {
                problems.push(format!(
                    "{title}: `{expr}`: a selector without a metric name"
                ));
                continue;
            }
            let Some(exported_labels) = exported.metrics.get(metric) else {
                problems.push(format!(
                    "{title}: `{expr}` names the metric {metric}, which the proxy does not export"
                ));
                continue;
            };
            labels_in_query.extend(exported_labels.iter().map(String::as_str));
            for label in labels {
                if !exported_labels.contains(label) && !TARGET_LABELS.contains(&label.as_str()) {
                    problems.push(format!(
                        "{title}: `{expr}` selects {metric} by the label {label}, which it does not have"
                    ));
                }
            }
        }
        for label in &names.grouping {
            if !labels_in_query.contains(label.as_str()) {
                problems.push(format!(
                    "{title}: `{expr}` groups by the label {label}, which none of its metrics has"
                ));
            }
        }
    }
    problems
}

#[test]
fn the_promql_scanner_finds_metrics_and_labels() {
    let names = promql_names(
        r#"histogram_quantile(0.95, sum by (gen_ai_tool_name, le) (rate(mcp_client_operation_duration_bucket{instance=~"$instance", mcp_method_name="tools/call"}[$__rate_interval])))"#,
    );
    assert_eq!(
        names.metrics,
        [(
            "mcp_client_operation_duration_bucket".to_owned(),
            vec!["instance".to_owned(), "mcp_method_name".to_owned()]
        )]
    );
    assert_eq!(names.grouping, ["gen_ai_tool_name", "le"]);
    let names = promql_names(
        r#"max(a_metric{x="a}b\"c"}) / on (key) group_left (tool) b_metric + 1e3 offset 5m"#,
    );
    let metrics: Vec<&str> = names.metrics.iter().map(|(m, _)| m.as_str()).collect();
    assert_eq!(metrics, ["a_metric", "b_metric"]);
    assert_eq!(names.grouping, ["key", "tool"]);
    assert_eq!(
        label_names(r#"a="x\"y",b="z""#),
        BTreeSet::from(["a".to_owned(), "b".to_owned()])
    );
}

#[test]
fn the_checker_names_a_query_whose_metric_or_label_is_not_exported() {
    let exported = Exported::parse(
        "# TYPE toolwarden_calls counter\n\
         toolwarden_calls{gen_ai_tool_name=\"echo\",outcome=\"success\"} 1\n\
         # TYPE d histogram\n\
         d_bucket{le=\"0.1\"} 1\n\
         d_sum 0.01\n\
         d_count 1\n",
    );
    let ok = [(
        "fine".to_owned(),
        "histogram_quantile(0.5, sum by (le) (rate(d_bucket[5m]))) + sum by (outcome) (toolwarden_calls{job=\"x\"})".to_owned(),
    )];
    assert_eq!(problems(&ok, &exported), Vec::<String>::new());
    let bad = [
        ("typo".to_owned(), "rate(toolwarden_call[5m])".to_owned()),
        (
            "label".to_owned(),
            "toolwarden_calls{tool=\"x\"}".to_owned(),
        ),
        (
            "grouping".to_owned(),
            "sum by (reason) (toolwarden_calls)".to_owned(),
        ),
        // A counter has no buckets.
        ("suffix".to_owned(), "toolwarden_calls_bucket".to_owned()),
    ];
    let found = problems(&bad, &exported);
    assert_eq!(found.len(), 4, "{found:?}");
    assert!(
        found[0].starts_with("typo: `rate(toolwarden_call[5m])` names the metric toolwarden_call"),
        "{found:?}"
    );
    assert!(found[1].contains("by the label tool"), "{found:?}");
    assert!(found[2].contains("groups by the label reason"), "{found:?}");
    assert!(found[3].contains("toolwarden_calls_bucket"), "{found:?}");
}

/// The scrape target, metrics path and scheme `prometheus.yml` sets, read
/// structurally (keys and list items at their indentation).
fn scrape_config(text: &str) -> (Vec<String>, String, String) {
    let mut targets = Vec::new();
    let mut path = String::new();
    let mut scheme = String::new();
    let mut in_targets = false;
    let mut jobs = 0;
    for line in text.lines() {
        let content = line.split(" #").next().unwrap_or("").trim_end();
        let trimmed = content.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        assert!(!line.contains('\t'), "prometheus.yml: a tab in {line:?}");
        if let Some(job) = trimmed.strip_prefix("- job_name:") {
            assert_eq!(job.trim(), "toolwarden");
            jobs += 1;
        }
        if let Some(value) = trimmed.strip_prefix("metrics_path:") {
            path = value.trim().to_owned();
        }
        if let Some(value) = trimmed.strip_prefix("scheme:") {
            scheme = value.trim().to_owned();
        }
        if trimmed == "- targets:" {
            in_targets = true;
            continue;
        }
        if in_targets {
            match trimmed.strip_prefix("- ") {
                Some(target) => targets.push(target.trim_matches(['"', '\'']).to_owned()),
                None => in_targets = false,
            }
        }
    }
    assert_eq!(jobs, 1, "one scrape job");
    (targets, path, scheme)
}

#[test]
fn prometheus_yml_scrapes_the_path_the_proxy_serves() {
    let text = std::fs::read_to_string(deploy_file("prometheus.yml")).unwrap();
    assert!(text.contains("scrape_configs:"), "{text}");
    let (targets, path, scheme) = scrape_config(&text);
    assert_eq!(path, "/metrics");
    assert_eq!(scheme, "http");
    assert!(!targets.is_empty(), "no target");
    for target in &targets {
        let addr: std::net::SocketAddr = target
            .parse()
            .unwrap_or_else(|e| panic!("target {target} is not host:port: {e}"));
        // The proxy's default stance: a loopback metrics address.
        assert!(addr.ip().is_loopback(), "{target}");
    }
}

#[test]
fn the_dashboard_is_a_grafana_dashboard_with_the_panels_of_the_issue() {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(deploy_file("grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 36);
    assert!(dashboard["uid"].is_string() && dashboard["title"].is_string());
    let queries = dashboard_queries(&dashboard);
    let mentions = |needle: &str| queries.iter().any(|(_, expr)| expr.contains(needle));
    for needle in [
        "toolwarden_calls{",        // calls
        "outcome!~",                // errors by class
        "histogram_quantile(0.5,",  // p50
        "histogram_quantile(0.95,", // p95
        "histogram_quantile(0.99,", // p99
        "toolwarden_circuit_state", // breaker states
        "event=\"rate_limited\"",   // rate-limit refusals
        "event=\"loop_detected\"",  // loop blocks
        "event=\"stale_served\"",   // stale serves
        "toolwarden_calls_active",  // in flight
    ] {
        assert!(mentions(needle), "no panel queries {needle}");
    }
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "duplicate panel id"
        );
        for key in ["type", "title", "gridPos", "datasource"] {
            assert!(
                !panel[key].is_null(),
                "panel {} has no {key}",
                panel["title"]
            );
        }
    }
}

/// Drives the proxy until every family the dashboard reads has appeared,
/// then checks the dashboard's queries against a scrape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_names_metrics_and_labels_a_running_proxy_exports() {
    let Some(python) = component("TOOLWARDEN_PYTHON") else {
        return;
    };
    let config = support::write_temp(
        "dashboard",
        "toolwarden.toml",
        r#"
[circuit_breaker]
failure_threshold = 2
minimum_calls = 2
reset_timeout = "60s"

[rate_limit]
mode = "reject"

[loop_guard.limits]
max_failing_repeats = 2

[tools."stats".rate_limit]
per_tool = { rate = "1/min", burst = 1 }

[http]
health_history = 2
"#,
    );
    let metrics = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics}");
    let script = flaky_server_script();
    let mut proxy = Proxy::start(
        &[
            "run",
            "--config",
            config.to_str().unwrap(),
            "--metrics-addr",
            &metrics_addr,
            "--",
            python.to_str().unwrap(),
            script.to_str().unwrap(),
        ],
        &[("FLAKY_FAILURES", "1000")],
    );
    proxy.initialize().await;
    let listed = proxy.request(1, "tools/list", json!({})).await;
    assert!(listed["result"]["tools"].is_array(), "{listed}");

    // Successes, then a refusal by the rate limit.
    let first = proxy.call(2, "stats", json!({})).await;
    assert_eq!(first["result"]["isError"], false, "{first}");
    let limited = proxy.call(3, "stats", json!({})).await;
    assert_eq!(limited["result"]["isError"], true, "{limited}");
    // Failures that open the circuit and trip the loop guard.
    let mut refused_by = BTreeSet::new();
    for id in 10..16 {
        let failed = proxy
            .call(id, "flaky_search", json!({"query": "same"}))
            .await;
        assert_eq!(failed["result"]["isError"], true, "{failed}");
        if let Some(layer) = support::failure_facts(&failed["result"])["layer"].as_str() {
            refused_by.insert(layer.to_owned());
        }
    }
    // Different arguments: not a loop, so they reach the breaker.
    for id in 16..19 {
        let failed = proxy
            .call(id, "flaky_search", json!({"query": format!("q{id}")}))
            .await;
        assert_eq!(failed["result"]["isError"], true, "{failed}");
        if let Some(layer) = support::failure_facts(&failed["result"])["layer"].as_str() {
            refused_by.insert(layer.to_owned());
        }
    }
    assert!(
        refused_by.contains("loop_guard") && refused_by.contains("circuit_breaker"),
        "{refused_by:?}"
    );
    // A short call that completes.
    let slept = proxy.call(20, "slow", json!({"seconds": 0.01})).await;
    assert_eq!(slept["result"]["isError"], false, "{slept}");

    // Every family the dashboard reads, in one scrape.
    let families = [
        "toolwarden_calls",
        "toolwarden_calls_active",
        "mcp_client_operation_duration_bucket",
        "toolwarden_circuit_state",
        "toolwarden_events",
        "toolwarden_proxy_requests_total",
        "toolwarden_proxy_upstream_up",
    ];
    let text = eventually(LIMIT, || async {
        let (status, text) = http_get(metrics, "/metrics").await?;
        (status == 200
            && families.iter().all(|f| {
                text.lines()
                    .any(|l| l.starts_with(&format!("{f}{{")) || l.starts_with(&format!("{f} ")))
            }))
        .then_some(text)
    })
    .await;
    let Some(text) = text else {
        let last = http_get(metrics, "/metrics").await.map(|(_, t)| t);
        panic!("not every family of {families:?} appeared in /metrics:\n{last:?}");
    };
    for event in ["rate_limited", "circuit_opened", "loop_detected"] {
        assert!(
            text.contains(&format!("event=\"{event}\"")),
            "no {event} event in /metrics:\n{text}"
        );
    }
    let exported = Exported::parse(&text);

    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(deploy_file("grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 10, "{queries:?}");
    let found = problems(&queries, &exported);
    assert!(
        found.is_empty(),
        "dashboard queries the proxy cannot answer:\n{}\n\nexported: {:#?}",
        found.join("\n"),
        exported.metrics.keys().collect::<Vec<_>>()
    );
    // And the check bites on the real scrape: a misspelt metric is named.
    let mut broken = queries.clone();
    broken[0].1 = broken[0].1.replace("toolwarden_calls{", "toolwarden_call{");
    let found = problems(&broken, &exported);
    assert!(
        found[0].starts_with(&format!(
            "{}: `{}` names the metric toolwarden_call,",
            broken[0].0, broken[0].1
        )),
        "{found:?}"
    );
    assert!(
        found.iter().all(|p| p.starts_with(&broken[0].0)),
        "{found:?}"
    );

    // /stats: the calls, none in flight now.
    let (status, body) = http_get(metrics, "/stats").await.unwrap();
    assert_eq!(status, 200);
    let stats: Value = serde_json::from_str(&body).unwrap();
    let slow = stats["tools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "slow")
        .unwrap_or_else(|| panic!("no slow in {stats}"));
    assert_eq!(
        (slow["calls"].as_u64(), slow["active"].as_u64()),
        (Some(1), Some(0)),
        "{slow}"
    );

    // /circuits: flaky_search's circuit with its recent errors, timed.
    let (_, body) = http_get(metrics, "/circuits").await.unwrap();
    let circuits: Value = serde_json::from_str(&body).unwrap();
    let search = circuits["circuits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["key"] == "flaky_search")
        .unwrap_or_else(|| panic!("no flaky_search circuit in {circuits}"));
    assert_eq!(search["state"], "open", "{search}");
    let recent = &search["recent_errors"][0];
    assert_eq!(recent["kind"], "tool_error", "{search}");
    assert_eq!(recent["counted"], true, "{search}");
    assert!(recent["count"].as_u64() >= Some(2), "{search}");
    assert!(
        recent["last_seen_unix_ms"].as_u64() > Some(1_600_000_000_000),
        "{search}"
    );

    // /health?history=1: the circuits check failing since it opened, with
    // times; the last `http.health_history` (2) reports only.
    for _ in 0..3 {
        http_get(metrics, "/health").await.unwrap();
    }
    let (status, body) = http_get(metrics, "/health?history=1").await.unwrap();
    assert_eq!(status, 200, "degraded still serves: {body}");
    let report: Value = serde_json::from_str(&body).unwrap();
    let history = report["history"]["circuits"]
        .as_array()
        .unwrap_or_else(|| panic!("{report}"));
    assert_eq!(history.len(), 2, "{report}");
    let last = history.last().unwrap();
    assert_eq!(last["status"], "failed", "{report}");
    assert!(
        last["message"].as_str().unwrap().contains("flaky_search"),
        "{report}"
    );
    assert_eq!(last["at_unix_ms"], report["checked_at_unix_ms"], "{report}");
    let (_, plain) = http_get(metrics, "/health").await.unwrap();
    assert!(!plain.contains("\"history\""), "{plain}");

    let status = proxy.close_and_wait().await;
    assert!(status.success(), "{status:?}");
}
