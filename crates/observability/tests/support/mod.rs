//! Helpers shared by the integration tests.
// Helpers panic on bad input: a panic is how a test fails.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;
use toolwarden_core::jsonrpc::{Request, Response};
use toolwarden_core::testing::{ready_call, MockMcp};
use toolwarden_core::{BoxError, CircuitOpen, McpRequest};
use tower::{Service, ServiceExt};

/// A `tools/call` of `tool` with a small arguments object.
pub fn tool_call(id: i64, tool: &str) -> Request {
    Request::tool_call(
        id,
        tool,
        json!({"query": "secret-argument-value", "limit": 3}),
    )
}

/// Drives one call through `poll_ready` then `call`.
pub async fn call<S>(svc: &mut S, req: Request) -> Result<Response, BoxError>
where
    S: Service<Request, Response = Response, Error = BoxError>,
{
    ready_call(svc, req).await
}

/// The upstream every test drives: `mock` for most tools, with two extras
/// that produce the outcomes a mock cannot: `blocked` is refused by a
/// (simulated) circuit breaker, and a call that hangs times out after 1 s.
pub fn upstream(
    mock: MockMcp,
) -> impl Service<Request, Response = Response, Error = BoxError, Future = impl Send> + Clone {
    tower::service_fn(move |req: Request| {
        let mock = mock.clone();
        async move {
            if req.tool_name() == Some("blocked") {
                return Err(
                    Box::new(CircuitOpen::new("blocked", Duration::from_secs(5))) as BoxError,
                );
            }
            tokio::time::timeout(Duration::from_secs(1), mock.oneshot(req)).await?
        }
    })
}

/// One sample of Prometheus text output.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the sample lines of Prometheus text output (no escapes in our
/// label values, so a simple split is enough).
pub fn parse_prometheus(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("sample line has a value");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').expect("closing brace");
                    let labels = body
                        .split("\",")
                        .filter(|kv| !kv.is_empty())
                        .map(|kv| {
                            let (k, v) = kv.split_once("=\"").expect("label has a value");
                            (k.to_owned(), v.trim_end_matches('"').to_owned())
                        })
                        .collect();
                    (name.to_owned(), labels)
                }
                None => (series.to_owned(), BTreeMap::new()),
            };
            Sample {
                name,
                labels,
                value: value.parse().expect("numeric value"),
            }
        })
        .collect()
}

/// The value of the sample of `name` whose labels are exactly `labels`.
pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let wanted: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    samples
        .iter()
        .find(|s| s.name == name && s.labels == wanted)
        .map(|s| s.value)
}
