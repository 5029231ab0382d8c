//! Unit tests of the client registry.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rmcp::model::{ErrorCode, NumberOrString, RequestId, ServerNotification};

use super::*;
use crate::progress::lock;

fn id(n: i64) -> RequestId {
    NumberOrString::Number(n)
}

fn recorded(downstreams: &Downstreams, upstream: i64) -> Option<(Caller, RequestId)> {
    let registry = lock(&downstreams.registry);
    let all = registry.causes.by_upstream_id.get(&id(upstream))?;
    all.last().map(|f| (f.caller, f.request.clone()))
}

#[test]
fn forwarded_requests_are_recorded_while_in_flight() {
    let downstreams = Downstreams::new();
    let a = Caller {
        session: 1,
        client: Some(7),
    };
    let b = Caller {
        session: 2,
        client: None,
    };
    let call = downstreams.forwarding(a, id(10), true);
    let record = call.recorder();
    record(&id(0));
    record(&id(1)); // a retried attempt
    let ping = downstreams.forwarding(b, id(20), false);
    ping.recorder()(&id(2));
    assert_eq!(recorded(&downstreams, 1), Some((a, id(10))));
    assert_eq!(recorded(&downstreams, 2), Some((b, id(20))));
    // A ping is recorded under its id, but is not a call in flight.
    assert_eq!(downstreams.causes_tracked(), (3, 1));
    // After a reconnection an id can be in use twice: the last wins,
    // and the first one's end leaves the other's record.
    let again = downstreams.forwarding(b, id(21), true);
    again.recorder()(&id(0));
    assert_eq!(recorded(&downstreams, 0), Some((b, id(21))));
    drop(call);
    assert_eq!(recorded(&downstreams, 0), Some((b, id(21))));
    assert_eq!(recorded(&downstreams, 1), None);
    drop(again);
    drop(ping);
    assert_eq!(downstreams.causes_tracked(), (0, 0));
    // An attempt reported after its request ended is not recorded.
    let late = downstreams.forwarding(a, id(30), true);
    let record = late.recorder();
    drop(late);
    record(&id(5));
    assert_eq!(downstreams.causes_tracked(), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn with_no_client_a_servers_request_gets_an_error_at_once() {
    let downstreams = Downstreams::new();
    let _call = downstreams.forwarding(
        Caller {
            session: 1,
            client: None,
        },
        id(1),
        true,
    );
    let started = tokio::time::Instant::now();
    let error = downstreams.target_of(Some(&id(9))).await.unwrap_err();
    assert_eq!(error.code, ErrorCode(-32000));
    assert_eq!(started.elapsed(), Duration::ZERO);
}

/// A server handler with every default: enough to own a peer.
#[derive(Clone)]
struct Quiet;

impl rmcp::ServerHandler for Quiet {}

/// Issue 16: notifications to every client were sent one client after
/// the other, each awaited; a client that stopped reading stalled them
/// for all. Each client now has a bounded queue of its own.
#[tokio::test(start_paused = true)]
async fn a_client_that_does_not_read_never_slows_the_others() {
    use tokio::io::AsyncBufReadExt;
    let (reading_io, reading_far_end) = tokio::io::duplex(64 * 1024);
    // The far end of this one is kept and never read.
    let (stuck_io, _stuck_far_end) = tokio::io::duplex(1024);
    let reading = rmcp::service::serve_directly(Quiet, reading_io, None);
    let stuck = rmcp::service::serve_directly(Quiet, stuck_io, None);
    let received = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = Arc::clone(&received);
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(reading_far_end).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("notifications/tools/list_changed") {
                counter.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    let downstreams = Downstreams::new();
    let disconnected = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = Arc::clone(&disconnected);
    let disconnect: Disconnect = Arc::new(move || {
        count.fetch_add(1, Ordering::SeqCst);
    });
    downstreams.register(stuck.peer().clone(), Arc::default(), Some(disconnect));
    downstreams.register(reading.peer().clone(), Arc::default(), None);

    let sent = 4 * NOTIFICATION_QUEUE;
    for _ in 0..sent {
        // Never waits, whatever the stuck client does.
        downstreams.broadcast(&ServerNotification::ToolListChangedNotification(
            Default::default(),
        ));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for _ in 0..1000 {
        if received.load(Ordering::SeqCst) == sent {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        received.load(Ordering::SeqCst),
        sent,
        "the reading client got them all"
    );
    assert_eq!(
        downstreams.len(),
        1,
        "the client that does not read was dropped"
    );
    assert!(
        disconnected.load(Ordering::SeqCst) >= 1,
        "the client that does not read was disconnected"
    );
}
