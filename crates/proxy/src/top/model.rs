//! What `toolwarden top` reads from a metrics address and the table it
//! makes of it.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::table::{render, Column};

/// The table's columns.
const COLUMNS: [Column; 14] = [
    Column::new("tool", 22),
    Column::new("calls", 6),
    Column::new("active", 6),
    Column::new("ok", 6),
    Column::new("failed", 6),
    Column::new("refused", 7),
    Column::new("p50 ms", 8),
    Column::new("p95 ms", 8),
    Column::new("retries", 7),
    Column::new("breaker", 10),
    Column::new("stale srv", 9),
    Column::new("loops", 5),
    Column::new("limited", 7),
    Column::new("degraded", 8),
];

/// What the columns mean, printed under the table.
pub(crate) const LEGEND: &str = "\
calls/active/ok/failed/refused, p50/p95: the observability layer's statistics (/stats; refused =
answered by a toolwarden layer; p50/p95 without those) · breaker: the circuit's state now
(/circuits) · retries, stale srv, loops, limited, degraded: the layers' events (toolwarden_events
in /metrics; limited: by the tool's own quota, the global and upstream quotas' below the table)";

/// Whether `key` names a quota that is no tool's: the global one, or a
/// gateway upstream's (`upstream:NAME`). Its rate-limit refusals are of
/// calls of many tools (each counted as refused in its row).
fn is_shared_quota(key: &str) -> bool {
    key == "global" || key.starts_with("upstream:")
}

/// One reading of a metrics address.
#[derive(Debug, Clone, Default)]
pub(crate) struct Reading {
    /// `/stats`: the observability layer's snapshot.
    pub(crate) stats: Value,
    /// `/circuits`: the breakers' snapshot.
    pub(crate) circuits: Value,
    /// `toolwarden_events` from `/metrics`, by (key, event).
    pub(crate) events: BTreeMap<(String, String), f64>,
}

impl Reading {
    /// The reading of the three answers.
    pub(crate) fn new(stats: Value, circuits: Value, metrics: &str) -> Self {
        Reading {
            stats,
            circuits,
            events: events(metrics),
        }
    }

    fn event(&self, key: &str, event: &str) -> String {
        let n = self
            .events
            .get(&(key.to_owned(), event.to_owned()))
            .copied()
            .unwrap_or(0.0);
        format!("{n}")
    }

    fn circuit(&self, key: &str) -> Option<&Value> {
        self.circuits["circuits"]
            .as_array()?
            .iter()
            .find(|c| c["key"] == key)
    }

    /// Every tool the reading names, sorted: those with statistics, with
    /// a circuit, or with events. A gateway upstream's breaker reports its
    /// events under the upstream's name: that is no tool (its circuit is
    /// listed below the table), unless a tool of that name has statistics
    /// or a circuit of its own.
    fn tools(&self) -> BTreeSet<String> {
        let mut tools = BTreeSet::new();
        let names = |list: &Value| -> Vec<String> {
            list.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|t| t["name"].as_str().or(t["key"].as_str()))
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default()
        };
        tools.extend(names(&self.stats["tools"]));
        tools.extend(names(&self.circuits["circuits"]));
        let upstream = |key: &str| {
            self.circuits["upstreams"]
                .as_object()
                .is_some_and(|upstreams| upstreams.contains_key(key))
        };
        let events_only: Vec<String> = self
            .events
            .keys()
            .map(|(key, _)| key)
            .filter(|key| !tools.contains(*key) && !upstream(key) && !is_shared_quota(key))
            .cloned()
            .collect();
        tools.extend(events_only);
        tools
    }

    /// The rows of the table, one per tool.
    pub(crate) fn rows(&self) -> Vec<Vec<String>> {
        let tool_stats: BTreeMap<&str, &Value> = self.stats["tools"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| Some((t["name"].as_str()?, t)))
                    .collect()
            })
            .unwrap_or_default();
        self.tools()
            .into_iter()
            .map(|tool| {
                let stats = tool_stats
                    .get(tool.as_str())
                    .copied()
                    .unwrap_or(&Value::Null);
                let number = |v: &Value| v.as_u64().unwrap_or(0);
                let outcomes = &stats["outcomes"];
                let failed: u64 = ["tool_error", "protocol_error", "transport", "timeout"]
                    .iter()
                    .map(|k| number(&outcomes[k]))
                    .sum();
                let millis = |v: &Value| v.as_f64().map_or("-".to_owned(), |ms| format!("{ms:.1}"));
                vec![
                    tool.clone(),
                    number(&stats["calls"]).to_string(),
                    number(&stats["active"]).to_string(),
                    number(&outcomes["success"]).to_string(),
                    failed.to_string(),
                    number(&outcomes["rejected"]).to_string(),
                    millis(&stats["p50_ms"]),
                    millis(&stats["p95_ms"]),
                    self.event(&tool, "retried"),
                    self.breaker(&tool),
                    self.event(&tool, "stale_served"),
                    self.event(&tool, "loop_detected"),
                    self.event(&tool, "rate_limited"),
                    self.event(&tool, "degraded"),
                ]
            })
            .collect()
    }

    /// The circuit's state, with the seconds until its next probe when open.
    fn breaker(&self, tool: &str) -> String {
        let Some(circuit) = self.circuit(tool) else {
            return "-".to_owned();
        };
        let state = circuit["state"].as_str().unwrap_or("?");
        match circuit["retry_after_seconds"].as_f64() {
            Some(after) if state == "open" => format!("open {after:.0}s"),
            _ => state.to_owned(),
        }
    }

    /// The recent errors of the circuits that are not closed, one line each:
    /// the tools', then a gateway's upstreams' (`/circuits` lists those under
    /// `"upstreams"`, by name; an open one refuses every tool of its upstream).
    fn open_circuit_errors(&self) -> Vec<String> {
        let tools = self.circuits["circuits"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| (c["key"].as_str().unwrap_or("?").to_owned(), c));
        let upstreams = self.circuits["upstreams"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(name, c)| (format!("upstream {name}"), c));
        tools
            .chain(upstreams)
            .filter(|(_, c)| c["state"] != "closed")
            .map(|(name, c)| {
                let errors: Vec<String> = c["recent_errors"]
                    .as_array()
                    .map(|errors| {
                        errors
                            .iter()
                            .take(3)
                            .map(|e| {
                                format!(
                                    "{}×{}",
                                    e["kind"].as_str().unwrap_or("?"),
                                    e["count"].as_u64().unwrap_or(0)
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                format!(
                    "  {name} is {}: {}",
                    c["state"].as_str().unwrap_or("?"),
                    if errors.is_empty() {
                        "no recent errors".to_owned()
                    } else {
                        errors.join(", ")
                    }
                )
            })
            .collect()
    }

    /// The whole screen below the title: the table, the circuits that are
    /// not closed with their recent errors, the legend.
    pub(crate) fn screen(&self) -> String {
        let rows = self.rows();
        let mut out = render(&COLUMNS, &rows);
        if rows.is_empty() {
            out.push_str("  (no tool calls yet)\n");
        }
        let quotas: Vec<String> = self
            .events
            .iter()
            .filter(|((key, event), _)| event == "rate_limited" && is_shared_quota(key))
            .map(|((key, _), n)| format!("{key} ×{n}"))
            .collect();
        if !quotas.is_empty() {
            out.push('\n');
            out.push_str(&format!(
                "refusals by shared quotas: {}\n",
                quotas.join(", ")
            ));
        }
        let open = self.open_circuit_errors();
        if !open.is_empty() {
            out.push('\n');
            out.push_str("circuits not closed (recent errors):\n");
            for line in open {
                out.push_str(&line);
                out.push('\n');
            }
        }
        out.push('\n');
        out.push_str(LEGEND);
        out.push('\n');
        out
    }
}

/// `toolwarden_events{event="...",key="..."} N` samples of Prometheus text,
/// by (key, event); samples without a key are left out.
pub(crate) fn events(metrics: &str) -> BTreeMap<(String, String), f64> {
    let mut out = BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("toolwarden_events{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let labels = labels_of(labels);
        if let (Some(key), Some(event)) = (labels.get("key"), labels.get("event")) {
            *out.entry((key.clone(), event.clone())).or_default() += value;
        }
    }
    out
}

/// The labels of a sample (`a="x",b="y\"z"`), unescaping `\"`, `\\` and `\n`.
pub(crate) fn labels_of(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut chars = text.chars().peekable();
    loop {
        let name: String = chars
            .by_ref()
            .skip_while(|c| *c == ',' || c.is_whitespace())
            .take_while(|c| *c != '=')
            .collect();
        if name.is_empty() || chars.next() != Some('"') {
            return labels;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '"' => break,
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(other) => value.push(other),
                    None => break,
                },
                other => value.push(other),
            }
        }
        labels.insert(name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn labels_are_parsed_with_escapes() {
        let labels = labels_of(r#"event="retried",key="a\"b\\c""#);
        assert_eq!(labels["event"], "retried");
        assert_eq!(labels["key"], "a\"b\\c");
        assert!(labels_of("").is_empty());
        assert!(labels_of("garbage").is_empty());
    }

    #[test]
    fn a_reading_makes_one_row_per_tool() {
        let stats = json!({"tools": [{
            "name": "echo", "calls": 5, "active": 1,
            "outcomes": {"success": 2, "tool_error": 1, "protocol_error": 0, "transport": 0, "timeout": 1, "rejected": 1},
            "p50_ms": 1.26, "p95_ms": null,
        }]});
        let circuits = json!({"circuits": [
            {"key": "echo", "state": "closed"},
            {"key": "search", "state": "open", "retry_after_seconds": 4.2,
             "recent_errors": [{"kind": "tool_error", "count": 3}]},
        ]});
        let metrics = "# TYPE toolwarden_events counter\n\
            toolwarden_events{event=\"retried\",key=\"echo\"} 2\n\
            toolwarden_events{event=\"rate_limited\",key=\"limited\"} 7\n\
            toolwarden_events{event=\"sync_failed\"} 1\n\
            toolwarden_calls{outcome=\"success\"} 9\n";
        let reading = Reading::new(stats, circuits, metrics);
        let rows = reading.rows();
        let tools: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
        assert_eq!(tools, ["echo", "limited", "search"]);
        assert_eq!(
            rows[0],
            ["echo", "5", "1", "2", "2", "1", "1.3", "-", "2", "closed", "0", "0", "0", "0"]
        );
        assert_eq!(rows[1][12], "7");
        assert_eq!(rows[2][9], "open 4s");
        let screen = reading.screen();
        assert!(screen.contains("search is open: tool_error×3"), "{screen}");
        assert!(Reading::default().screen().contains("no tool calls yet"));
    }

    /// Regression (found by running the binary): the global quota's and a
    /// gateway upstream's quota's refusals are reported under the quota's
    /// key, and `top` made a tool row of each (`global`, `upstream:hunt`,
    /// 0 calls). They are listed below the table instead.
    #[test]
    fn shared_quotas_are_no_tool_rows() {
        let stats = json!({"tools": [{"name": "hunt__ok", "calls": 5,
            "outcomes": {"success": 2, "rejected": 3}}]});
        let metrics = "toolwarden_events{event=\"rate_limited\",key=\"upstream:hunt\"} 3\n\
            toolwarden_events{event=\"rate_limited\",key=\"global\"} 2\n";
        let reading = Reading::new(stats, json!({}), metrics);
        let tools: Vec<String> = reading.rows().into_iter().map(|r| r[0].clone()).collect();
        assert_eq!(tools, ["hunt__ok"]);
        let screen = reading.screen();
        assert!(
            screen.contains("refusals by shared quotas: global ×2, upstream:hunt ×3"),
            "{screen}"
        );
    }

    /// A gateway's upstream whose breaker is open refuses all its tools:
    /// `top` lists it with the tools' circuits that are not closed (it
    /// read the tools' only, and showed every tool's breaker closed).
    #[test]
    fn an_open_upstream_breaker_is_listed() {
        let circuits = json!({
            "circuits": [{"key": "flaky__search", "state": "closed"}],
            "upstreams": {
                "flaky": {"state": "open", "recent_errors": [{"kind": "timeout", "count": 2}]},
                "time": {"state": "closed"},
            },
        });
        // Its breaker's events carry the upstream's name as their key: no
        // tool row of that name (there was one, all zeros).
        let metrics = "toolwarden_events{event=\"circuit_opened\",key=\"flaky\"} 1\n";
        let reading = Reading::new(json!({}), circuits, metrics);
        let screen = reading.screen();
        assert!(
            screen.contains("upstream flaky is open: timeout×2"),
            "{screen}"
        );
        assert!(!screen.contains("upstream time"), "{screen}");
        let tools: Vec<String> = reading.rows().into_iter().map(|r| r[0].clone()).collect();
        assert_eq!(tools, ["flaky__search"]);
    }
}
