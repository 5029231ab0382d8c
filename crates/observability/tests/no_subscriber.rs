//! A process with no tracing subscriber at all (its own test binary, so no
//! other test installs one): the span is disabled and the arguments are
//! never hashed for it.

mod support;

use std::sync::{Arc, Mutex};

use toolwarden_core::jsonrpc::Request;
use toolwarden_core::testing::MockMcp;
use toolwarden_core::{Fingerprint, McpRequest};
use toolwarden_observability::ObservabilityLayer;
use tower::{Layer, ServiceExt};

use support::{call, tool_call};

#[tokio::test]
async fn no_subscriber_means_no_fingerprint_and_a_working_layer() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    let upstream = tower::service_fn(move |req: Request| {
        record
            .lock()
            .unwrap()
            .push(req.extension::<Fingerprint>().copied());
        MockMcp::new().oneshot(req)
    });
    let layer = ObservabilityLayer::new();
    let mut svc = layer.layer(upstream);
    call(&mut svc, tool_call(1, "search")).await.unwrap();
    assert_eq!(*seen.lock().unwrap(), [None]);
    assert_eq!(layer.stats().snapshot().tool("search").unwrap().calls, 1);
}
