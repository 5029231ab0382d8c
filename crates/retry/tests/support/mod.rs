//! Shared helpers for the retry layer's tests: a scripted upstream that logs
//! every attempt, a readiness gate, an event recorder and a catalog.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;
use toolwarden_core::catalog::{ToolAnnotations, ToolInfo};
use toolwarden_core::jsonrpc::{Request, Response};
use toolwarden_core::testing::{ready_call, MockMcp, ReadyChecked};
use toolwarden_core::{Attempt, BoxError, Event, Events, McpRequest, ToolCatalog};
use tower::Service;

pub const MS: Duration = Duration::from_millis(1);
pub const SEC: Duration = Duration::from_secs(1);

/// One call as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    pub target: String,
    pub attempt: Option<u32>,
}

type MakeError = Box<dyn Fn() -> BoxError + Send + Sync>;

/// A [`MockMcp`] (scripted results per tool) behind a queue of errors that
/// the mock cannot produce (rejections by layers below, HTTP statuses,
/// failures of methods other than `tools/call`): the n-th call takes the
/// n-th queued entry, `None` passing through to the mock. Logs every call.
#[derive(Clone, Default)]
pub struct Upstream {
    pub mock: MockMcp,
    errors: Arc<Mutex<VecDeque<Option<MakeError>>>>,
    log: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    pub fn new(mock: MockMcp) -> Self {
        Upstream {
            mock,
            ..Default::default()
        }
    }

    /// The next call fails with `make()`.
    pub fn fail_next(&self, make: impl Fn() -> BoxError + Send + Sync + 'static) -> &Self {
        self.errors.lock().unwrap().push_back(Some(Box::new(make)));
        self
    }

    /// The next call passes through to the mock.
    pub fn pass_next(&self) -> &Self {
        self.errors.lock().unwrap().push_back(None);
        self
    }

    pub fn log(&self) -> Vec<Seen> {
        self.log.lock().unwrap().clone()
    }

    pub fn calls(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// The gaps between the starts of consecutive attempts.
    pub fn gaps(&self) -> Vec<Duration> {
        let log = self.log();
        log.windows(2).map(|w| w[1].at - w[0].at).collect()
    }

    pub fn attempts(&self) -> Vec<Option<u32>> {
        self.log().iter().map(|s| s.attempt).collect()
    }
}

impl Service<Request> for Upstream {
    type Response = Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.mock.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        self.log.lock().unwrap().push(Seen {
            at: Instant::now(),
            target: req.target().to_owned(),
            attempt: req.extension::<Attempt>().map(|a| a.0),
        });
        let queued = self.errors.lock().unwrap().pop_front().flatten();
        match queued {
            Some(make) => {
                let error = make();
                Box::pin(async move { Err(error) })
            }
            None => self.mock.call(req),
        }
    }
}

/// The upstream behind a readiness check, as every layer is tested.
pub fn checked(upstream: &Upstream) -> ReadyChecked<Upstream> {
    ReadyChecked::new(upstream.clone())
}

/// A service that is ready only while its gate is open.
#[derive(Clone)]
pub struct Gated<S> {
    inner: S,
    gate: Gate,
}

#[derive(Clone, Default)]
pub struct Gate(Arc<Mutex<(bool, Vec<Waker>)>>);

impl Gate {
    pub fn open() -> Self {
        let gate = Gate::default();
        gate.set(true);
        gate
    }

    pub fn set(&self, open: bool) {
        let mut state = self.0.lock().unwrap();
        state.0 = open;
        if open {
            for waker in state.1.drain(..) {
                waker.wake();
            }
        }
    }

    pub fn wrap<S>(&self, inner: S) -> Gated<S> {
        Gated {
            inner,
            gate: self.clone(),
        }
    }
}

impl<S: Service<Request>> Service<Request> for Gated<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        {
            let mut state = self.gate.0.lock().unwrap();
            if !state.0 {
                state.1.push(cx.waker().clone());
                return Poll::Pending;
            }
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> S::Future {
        self.inner.call(req)
    }
}

/// An event as recorded by [`recorder`].
#[derive(Debug, Clone, PartialEq)]
pub enum Recorded {
    Retry {
        tool: String,
        attempt: u32,
        delay: Duration,
    },
    RetryBudgetExhausted {
        tool: String,
    },
}

/// Events that record retries and budget refusals.
pub fn recorder() -> (Events, Arc<Mutex<Vec<Recorded>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&seen);
    let events = Events::new().with(move |e: &Event<'_>| {
        let record = match *e {
            Event::Retried {
                key: tool,
                attempt,
                delay,
            } => Recorded::Retry {
                tool: tool.to_owned(),
                attempt,
                delay,
            },
            Event::RetryBudgetExhausted { key: tool } => Recorded::RetryBudgetExhausted {
                tool: tool.to_owned(),
            },
            _ => return,
        };
        sink.lock().unwrap().push(record);
    });
    (events, seen)
}

/// The delays of the recorded retry events.
pub fn retry_delays(seen: &Mutex<Vec<Recorded>>) -> Vec<Duration> {
    seen.lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            Recorded::Retry { delay, .. } => Some(*delay),
            _ => None,
        })
        .collect()
}

/// `search` read-only, `put` idempotent, `delete_file` destructive, `bare`
/// without annotations; trusted or not.
pub fn catalog(trusted: bool) -> ToolCatalog {
    let catalog = ToolCatalog::new();
    let hints = |read_only, idempotent, destructive| ToolAnnotations {
        read_only_hint: read_only,
        idempotent_hint: idempotent,
        destructive_hint: destructive,
        ..Default::default()
    };
    catalog.insert(ToolInfo::new("search", "searches").annotations(hints(
        Some(true),
        None,
        Some(false),
    )));
    catalog.insert(ToolInfo::new("put", "writes a key").annotations(hints(
        None,
        Some(true),
        Some(false),
    )));
    catalog.insert(ToolInfo::new("delete_file", "deletes").annotations(hints(
        None,
        None,
        Some(true),
    )));
    catalog.insert(ToolInfo::new("bare", "no annotations"));
    catalog.set_trusted(trusted);
    catalog
}

pub fn tool_call(tool: &str) -> Request {
    Request::tool_call(1, tool, json!({"q": "x"}))
}

/// Drives one call through `poll_ready`, then `call`.
pub async fn call<S>(svc: &mut S, req: Request) -> Result<Response, BoxError>
where
    S: Service<Request, Response = Response, Error = BoxError>,
{
    ready_call(svc, req).await
}
