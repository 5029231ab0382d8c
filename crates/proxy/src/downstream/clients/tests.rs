//! Unit tests of the client registry.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rmcp::model::{ErrorCode, NumberOrString, RequestId, ServerNotification};

use super::*;
use crate::progress::lock;

fn id(n: i64) -> RequestId {
    NumberOrString::Number(n)
}

fn recorded(downstreams: &Downstreams, upstream: i64) -> Option<(Caller, RequestId)> {
    let causes = lock(&downstreams.causes);
    let all = causes.by_upstream_id.get(&id(upstream))?;
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

/// Reads `far_end` (a client's side of its pipe) line by line: how many
/// lines containing `needle` came so far.
fn count_lines(far_end: tokio::io::DuplexStream, needle: &'static str) -> Arc<AtomicUsize> {
    use tokio::io::AsyncBufReadExt;
    let received = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&received);
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(far_end).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains(needle) {
                counter.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    received
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
    let (reading_io, reading_far_end) = tokio::io::duplex(64 * 1024);
    // The far end of this one is kept and never read.
    let (stuck_io, _stuck_far_end) = tokio::io::duplex(1024);
    let reading = rmcp::service::serve_directly(Quiet, reading_io, None);
    let stuck = rmcp::service::serve_directly(Quiet, stuck_io, None);
    let received = count_lines(reading_far_end, "notifications/tools/list_changed");
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

/// stdio's one client cannot be disconnected: a burst past its queue
/// costs it those notifications, not its place. It was dropped for good,
/// got no notification after, and the server's requests were answered
/// "no client is connected" for the rest of the session.
#[tokio::test(start_paused = true)]
async fn a_client_that_cannot_be_disconnected_stays_after_a_burst() {
    // A small pipe read only after the burst: the queue fills meanwhile.
    let (io, far_end) = tokio::io::duplex(1024);
    let service = rmcp::service::serve_directly(Quiet, io, None);
    let downstreams = Downstreams::new();
    downstreams.register(service.peer().clone(), Arc::default(), None);
    let notification = || ServerNotification::ToolListChangedNotification(Default::default());
    for _ in 0..4 * NOTIFICATION_QUEUE {
        downstreams.broadcast(&notification());
    }
    assert_eq!(downstreams.len(), 1, "still registered after the burst");
    // It reads again: later notifications reach it.
    let received = count_lines(far_end, "list_changed");
    tokio::time::sleep(Duration::from_secs(30)).await;
    let before = received.load(Ordering::SeqCst);
    downstreams.broadcast(&notification());
    for _ in 0..1000 {
        if received.load(Ordering::SeqCst) > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        received.load(Ordering::SeqCst) > before,
        "a notification after the burst reached it"
    );
    assert_eq!(downstreams.len(), 1);
}

/// A client registered in a [`Downstreams`], connected through an in-memory
/// pipe whose far end (the client's side) is kept open.
struct Connected {
    id: DownstreamId,
    /// Its own progress routes: tells which client a [`Target`] is.
    progress: Arc<ProgressRoutes<RoleClient>>,
    /// What the proxy sends the client arrives here.
    far_end: tokio::io::DuplexStream,
    _service: rmcp::service::RunningService<RoleServer, Quiet>,
}

fn connect(downstreams: &Downstreams) -> Connected {
    let (io, far_end) = tokio::io::duplex(64 * 1024);
    let service = rmcp::service::serve_directly(Quiet, io, None);
    let progress: Arc<ProgressRoutes<RoleClient>> = Arc::default();
    let id = downstreams.register(service.peer().clone(), Arc::clone(&progress), None);
    Connected {
        id,
        progress,
        far_end,
        _service: service,
    }
}

fn caller(session: u64, client: &Connected) -> Caller {
    Caller {
        session,
        client: Some(client.id),
    }
}

/// Which client `target` is, and the request of theirs it names.
fn whose(target: &Target, clients: &[&Connected]) -> (usize, Option<RequestId>) {
    let at = clients
        .iter()
        .position(|c| Arc::ptr_eq(&c.progress, &target.progress))
        .expect("a target is one of the clients");
    (at, target.request.clone())
}

/// Two upstream connections each number their request ids from 0: the same
/// id in flight to both, for two clients, names in each view its own client.
#[tokio::test(start_paused = true)]
async fn the_same_upstream_id_in_two_views_names_each_views_own_caller() {
    let first = Downstreams::new();
    let second = first.for_upstream();
    let one = connect(&first);
    let two = connect(&second);
    let clients = [&one, &two];
    let to_first = first.forwarding(caller(1, &one), id(10), true);
    to_first.recorder()(&id(3));
    let to_second = second.forwarding(caller(2, &two), id(20), true);
    to_second.recorder()(&id(3));
    assert_eq!(first.causes_tracked(), (1, 1));
    assert_eq!(second.causes_tracked(), (1, 1));

    let target = first.target_of(Some(&id(3))).await.unwrap();
    assert_eq!(whose(&target, &clients), (0, Some(id(10))));
    let target = second.target_of(Some(&id(3))).await.unwrap();
    assert_eq!(whose(&target, &clients), (1, Some(id(20))));

    // The end of one view's request leaves the other's record alone.
    drop(to_second);
    assert_eq!(second.causes_tracked(), (0, 0));
    assert_eq!(first.causes_tracked(), (1, 1));
    let error = second.target_of(Some(&id(3))).await.unwrap_err();
    assert_eq!(error.code, ErrorCode(-32603));
    let target = first.target_of(Some(&id(3))).await.unwrap();
    assert_eq!(whose(&target, &clients), (0, Some(id(10))));
    drop(to_first);
    assert_eq!(first.causes_tracked(), (0, 0));
}

/// "The one session with calls in flight" is counted per upstream: a
/// session with a call in flight to one upstream is not whom another asks.
/// Its one call is named, so that over HTTP the server's request rides
/// that call's response stream (regression: with a stdio upstream it went
/// to the standalone stream, which a client need not open: one without it
/// never saw the request, and its call timed out).
#[tokio::test(start_paused = true)]
async fn requests_in_flight_are_counted_per_view() {
    let first = Downstreams::new();
    let second = first.for_upstream();
    let one = connect(&first);
    let two = connect(&first);
    let clients = [&one, &two];
    let _to_first = first.forwarding(caller(1, &one), id(10), true);

    // Nothing is in flight to the second upstream and two clients are
    // connected: its request is nobody's, not the first one's session's.
    let error = second.target_of(None).await.unwrap_err();
    assert_eq!(error.code, ErrorCode(-32603));
    let target = first.target_of(None).await.unwrap();
    assert_eq!(whose(&target, &clients), (0, Some(id(10))));

    // Each view has one session with a call in flight: each its own.
    let to_second = second.forwarding(caller(2, &two), id(20), true);
    let target = second.target_of(None).await.unwrap();
    assert_eq!(whose(&target, &clients), (1, Some(id(20))));
    let target = first.target_of(None).await.unwrap();
    assert_eq!(whose(&target, &clients), (0, Some(id(10))));

    // Two sessions in flight in one view: no guess there, the other unmoved.
    let also_second = second.forwarding(caller(1, &one), id(11), true);
    let error = second.target_of(None).await.unwrap_err();
    assert_eq!(error.code, ErrorCode(-32603));
    let target = first.target_of(None).await.unwrap();
    assert_eq!(whose(&target, &clients), (0, Some(id(10))));
    drop(to_second);
    let target = second.target_of(None).await.unwrap();
    assert_eq!(whose(&target, &clients), (0, Some(id(11))));

    // Two calls of that session: it is the session's, on no call's stream
    // (nothing tells which); one ends, and the other is named again.
    let third = second.forwarding(caller(1, &one), id(12), true);
    let target = second.target_of(None).await.unwrap();
    assert_eq!(whose(&target, &clients), (0, None));
    drop(also_second);
    let target = second.target_of(None).await.unwrap();
    assert_eq!(whose(&target, &clients), (0, Some(id(12))));
    drop(third);
    assert_eq!(second.causes_tracked(), (0, 0));
}

/// The clients are one list whatever view registers, notifies or removes
/// them: a client registered through one view gets what the other sends.
#[tokio::test]
async fn views_share_their_clients() {
    use tokio::io::AsyncBufReadExt;
    let first = Downstreams::new();
    let second = first.for_upstream();
    let third = second.for_upstream();
    let client = connect(&first);
    assert_eq!(second.len(), 1);
    assert_eq!(third.len(), 1);

    second.broadcast(&ServerNotification::ToolListChangedNotification(
        Default::default(),
    ));
    let mut lines = tokio::io::BufReader::new(client.far_end).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("the broadcast arrives")
        .unwrap()
        .expect("the pipe is open");
    assert!(line.contains("notifications/tools/list_changed"), "{line}");

    // Tasks are the clients': recorded through one view, seen by the others.
    third.task_created(Some(client.id), "t1");
    assert!(first.task_of_another("t1", None));
    assert!(!first.task_of_another("t1", Some(client.id)));
    assert!(second.notify_task_owner(
        "t1",
        ServerNotification::ToolListChangedNotification(Default::default()),
    ));
    // Still its after the notification (a task that ended was forgotten,
    // and any session could then read, update or cancel it).
    assert!(first.task_of_another("t1", None));

    // A client removed through one view is gone from all, with its tasks.
    third.remove(client.id);
    assert!(first.is_empty());
    assert!(second.is_empty());
    assert!(!first.task_of_another("t1", None));
}

/// A client whose calls create tasks without end (a server that never
/// reports them ended) holds at most its share of the task table: it
/// forgets its own oldest, and another client's task stays that client's.
#[tokio::test]
async fn a_client_creating_tasks_without_end_forgets_only_its_own_oldest() {
    let downstreams = Downstreams::new();
    let quiet = connect(&downstreams);
    let flood = connect(&downstreams);
    downstreams.task_created(Some(quiet.id), "quiet-task");
    for n in 0..3_000 {
        downstreams.task_created(Some(flood.id), &format!("flood-{n}"));
    }
    assert_eq!(
        lock(&downstreams.registry).tasks.owner("quiet-task"),
        Some(&quiet.id)
    );
    assert!(downstreams.task_of_another("quiet-task", Some(flood.id)));
    // The flood keeps its newest 1 024; its older ones are nobody's.
    assert!(downstreams.task_of_another("flood-2999", Some(quiet.id)));
    assert!(downstreams.task_of_another("flood-1976", Some(quiet.id)));
    assert!(!downstreams.task_of_another("flood-1975", Some(quiet.id)));
    assert!(!downstreams.task_of_another("flood-0", None));
}

/// Regression (found by running the binary): the server's requests to a
/// client that never answers, from a server that never cancels them, each
/// held a waiting task until the session ended (6.5 KB each: 160 MiB at
/// 20 000). At most [`MAX_AWAITED_PER_CLIENT`] wait per client; each place
/// is given back when its request ends, and one client's places are not
/// another's.
#[tokio::test(start_paused = true)]
async fn the_servers_requests_awaiting_one_client_are_bounded() {
    let downstreams = Downstreams::new();
    let one = connect(&downstreams);
    let two = connect(&downstreams);
    let to_one = downstreams.forwarding(caller(1, &one), id(1), true);
    let target = downstreams.target_of(None).await.unwrap();
    let places: Vec<AwaitedPlace> = (0..MAX_AWAITED_PER_CLIENT)
        .map(|_| target.await_place().expect("a place below the bound"))
        .collect();
    assert!(target.await_place().is_none(), "past the bound");
    // Found again, the client is the same: its places are all taken.
    assert!(downstreams
        .target_of(None)
        .await
        .unwrap()
        .await_place()
        .is_none());
    drop(to_one);
    // The other client has places of its own.
    let _to_two = downstreams.forwarding(caller(2, &two), id(2), true);
    let other = downstreams.target_of(None).await.unwrap();
    assert_eq!(whose(&other, &[&one, &two]).0, 1);
    assert!(other.await_place().is_some());
    // Its requests end: their places are free again.
    drop(places);
    assert!(target.await_place().is_some());
}
