//! Unit tests of the progress routes, receipts and guards.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use std::sync::Arc;
use std::time::Duration;

use rmcp::model::{NumberOrString, ProgressToken};
use rmcp::service::RoleServer;

use super::*;

fn token(n: i64) -> ProgressToken {
    ProgressToken(NumberOrString::Number(n))
}

fn routes() -> Arc<ProgressRoutes<RoleServer>> {
    Arc::default()
}

/// A waker that records whether it was woken.
#[derive(Default)]
struct Woken(AtomicBool);

impl Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn poll_once<F: Future>(f: std::pin::Pin<&mut F>, woken: &Arc<Woken>) -> Poll<F::Output> {
    let waker = Waker::from(Arc::clone(woken));
    f.poll(&mut Context::from_waker(&waker))
}

#[test]
fn an_answer_waits_for_the_progress_received_for_its_tokens() {
    let routes = routes();
    let guard = RouteGuard::new(Arc::clone(&routes), None);
    guard.sent(&token(1));
    guard.sent(&token(2)); // a retried attempt
    let first = routes.received(token(1));
    let retried = routes.received(token(2));
    let clone = retried.clone();
    let elsewhere = routes.received(token(9)); // another request's progress
    let woken = Arc::new(Woken::default());
    let mut waiting = std::pin::pin!(guard.progress_forwarded());
    assert!(poll_once(waiting.as_mut(), &woken).is_pending());
    drop(first);
    assert!(
        woken.0.swap(false, Ordering::SeqCst),
        "woken to check again"
    );
    assert!(poll_once(waiting.as_mut(), &woken).is_pending());
    drop(retried);
    assert!(
        poll_once(waiting.as_mut(), &woken).is_pending(),
        "a clone of the receipt still holds the progress"
    );
    drop(clone);
    assert!(woken.0.load(Ordering::SeqCst));
    assert!(
        poll_once(waiting.as_mut(), &woken).is_ready(),
        "progress of other requests is not waited for"
    );
    drop(elsewhere);
}

#[test]
fn an_answer_with_no_progress_pending_does_not_wait() {
    let routes = routes();
    let guard = RouteGuard::new(Arc::clone(&routes), None);
    let woken = Arc::new(Woken::default());
    assert!(poll_once(std::pin::pin!(guard.progress_forwarded()), &woken).is_ready());
    guard.sent(&token(1));
    drop(routes.received(token(1)));
    assert!(poll_once(std::pin::pin!(guard.progress_forwarded()), &woken).is_ready());
}

#[test]
fn tallies_are_forgotten_when_their_requests_end_and_their_progress_is_forwarded() {
    let routes = routes();
    // Progress for a token of no request: forgotten once handled.
    drop(routes.received(token(7)));
    assert_eq!(routes.tracked(), 0);
    // A request's token: kept while the request is in flight or while
    // progress received for it is being forwarded.
    let guard = RouteGuard::new(Arc::clone(&routes), None);
    guard.sent(&token(1));
    let receipt = routes.received(token(1));
    assert_eq!((routes.len(), routes.tracked()), (1, 1));
    drop(guard);
    assert_eq!((routes.len(), routes.tracked()), (0, 1));
    assert!(matches!(routes.lookup(&token(1)), Resolved::Unknown));
    drop(receipt);
    assert_eq!(routes.tracked(), 0);
    // Progress arriving before the request's token is recorded.
    let early = routes.received(token(3));
    let guard = RouteGuard::new(Arc::clone(&routes), None);
    guard.sent(&token(3));
    assert!(matches!(routes.lookup(&token(3)), Resolved::Nowhere));
    drop(early);
    drop(guard);
    assert_eq!(routes.tracked(), 0);
}

#[test]
fn a_tokens_progress_takes_turns_in_the_order_read() {
    let routes = routes();
    let first = routes.received(token(1));
    let second = routes.received(token(1));
    let third = routes.received(token(1));
    let other = routes.received(token(2)); // another token: its own turns
    let woken = Arc::new(Woken::default());
    assert!(poll_once(std::pin::pin!(first.turn()), &woken).is_ready());
    assert!(poll_once(std::pin::pin!(other.turn()), &woken).is_ready());
    {
        let mut third_turn = std::pin::pin!(third.turn());
        assert!(poll_once(third_turn.as_mut(), &woken).is_pending());
        // The second is dropped out of turn (not forwarded, or its wait
        // ran out): the first still goes before the third.
        drop(second);
        assert!(poll_once(third_turn.as_mut(), &woken).is_pending());
        assert!(!woken.0.load(Ordering::SeqCst), "the turn did not move");
        drop(first);
        assert!(woken.0.load(Ordering::SeqCst), "woken when the turn moved");
        assert!(
            poll_once(third_turn.as_mut(), &woken).is_ready(),
            "the turn skips the second, already done"
        );
    }
    drop(third);
    drop(other);
    assert_eq!(routes.tracked(), 0);
}

#[test]
fn progress_done_out_of_turn_is_remembered_only_until_the_turn_passes() {
    let routes = routes();
    let receipts: Vec<_> = (0..5).map(|_| routes.received(token(1))).collect();
    let mut receipts = receipts.into_iter();
    let first = receipts.next().unwrap();
    for later in receipts.rev() {
        drop(later);
    }
    {
        let entries = lock(&routes.entries);
        let entry = &entries[&token(1)];
        assert_eq!((entry.turn, entry.done_early.len()), (0, 4));
        assert_eq!(entry.unforwarded(), 1);
    }
    drop(first);
    assert_eq!(routes.tracked(), 0, "nothing left once all are done");
    // A request's token keeps its entry, emptied, while it is in flight.
    let guard = RouteGuard::new(Arc::clone(&routes), None);
    guard.sent(&token(3));
    let early = routes.received(token(3));
    drop(routes.received(token(3)));
    drop(early);
    let entries = lock(&routes.entries);
    let entry = &entries[&token(3)];
    assert_eq!((entry.next, entry.turn, entry.done_early.len()), (2, 2, 0));
}

#[tokio::test(start_paused = true)]
async fn an_aborted_task_does_not_hold_up_the_next_turn() {
    let routes = routes();
    let first = routes.received(token(1));
    let second = routes.received(token(1));
    let (running, is_running) = tokio::sync::oneshot::channel();
    let stuck = tokio::spawn(async move {
        let _first = first;
        let _ = running.send(());
        std::future::pending::<()>().await;
    });
    is_running.await.unwrap(); // stuck forwarding the first
    let started = tokio::time::Instant::now();
    stuck.abort();
    assert!(stuck.await.unwrap_err().is_cancelled());
    assert!(second.take_turn().await, "its turn came at once");
    assert_eq!(started.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn every_wait_is_bounded() {
    let routes = routes();
    let guard = RouteGuard::new(Arc::clone(&routes), None);
    guard.sent(&token(1));
    let held = routes.received(token(1)); // never forwarded in time
    let next = routes.received(token(1));
    let started = tokio::time::Instant::now();
    assert!(!next.take_turn().await, "the turn did not come");
    assert_eq!(started.elapsed(), PROGRESS_TURN_LIMIT);
    let started = tokio::time::Instant::now();
    guard.progress_first().await;
    assert_eq!(started.elapsed(), PROGRESS_FORWARD_LIMIT);
    // A send that never completes: the turn passes all the same.
    let last = routes.received(token(1));
    let started = tokio::time::Instant::now();
    send_in_turn(
        Some(next),
        &ProgressMark::default(),
        1.0,
        std::future::pending::<Result<(), String>>(),
    )
    .await;
    assert_eq!(started.elapsed(), PROGRESS_TURN_LIMIT + PROGRESS_SEND_LIMIT);
    drop(held);
    assert!(last.take_turn().await);
    drop(last);
    drop(guard);
    assert_eq!(routes.tracked(), 0);
}

#[test]
fn an_answer_does_not_wait_for_progress_read_after_it() {
    let routes = routes();
    let guard = RouteGuard::new(Arc::clone(&routes), None);
    guard.sent(&token(1));
    let before = routes.received(token(1));
    let woken = Arc::new(Woken::default());
    let mut waiting = std::pin::pin!(guard.progress_forwarded());
    assert!(poll_once(waiting.as_mut(), &woken).is_pending());
    let after = routes.received(token(1)); // sent after the answer
    drop(before);
    assert!(poll_once(waiting.as_mut(), &woken).is_ready());
    drop(after);
}

#[test]
fn a_token_in_use_twice_keeps_its_route_until_both_requests_end() {
    // rmcp numbers tokens per connection: after a reconnection, a new
    // request can get the token of one still failing on the old one.
    let routes = routes();
    let old = RouteGuard::new(Arc::clone(&routes), None);
    let new = RouteGuard::new(Arc::clone(&routes), None);
    old.sent(&token(3));
    new.sent(&token(3));
    drop(old);
    assert!(matches!(routes.lookup(&token(3)), Resolved::Nowhere));
    drop(new);
    assert!(matches!(routes.lookup(&token(3)), Resolved::Unknown));
    assert_eq!(routes.tracked(), 0);
}

/// A receiver that does not read holds at most its share of the backlog:
/// past [`PROGRESS_PER_RECEIVER`] waiting, its newest are refused a place
/// (and dropped by the caller); a place given back is free again.
#[test]
fn a_receiver_holds_at_most_its_share_of_the_backlog() {
    let receiver = Arc::new(ProgressReceiver::new(Duration::from_secs(10), None));
    let mark = ProgressMark::new(Some(Arc::clone(&receiver)));
    let places: Vec<_> = (0..PROGRESS_PER_RECEIVER)
        .map(|_| mark.enter().expect("within its share"))
        .collect();
    assert_eq!(receiver.waiting(), PROGRESS_PER_RECEIVER);
    assert!(mark.enter().is_none(), "past its share");
    // Another request's mark of the same client shares the count.
    let other = ProgressMark::new(Some(Arc::clone(&receiver)));
    assert!(other.enter().is_none());
    drop(places);
    assert_eq!(receiver.waiting(), 0);
    assert!(other.enter().is_some());
    // A mark of no receiver (the server's) is never refused.
    assert!(ProgressMark::default().enter().is_some());
}

/// A client whose progress sends keep timing out for the stall timeout is
/// not reading: disconnected once (it was never: its session hung, and
/// its unsent progress took every other client's places). A send that
/// goes through starts the clock again.
#[tokio::test(start_paused = true)]
async fn a_receiver_whose_sends_keep_timing_out_is_disconnected_once() {
    let disconnects = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = Arc::clone(&disconnects);
    let disconnect: crate::downstream::Disconnect = Arc::new(move || {
        counted.fetch_add(1, Ordering::SeqCst);
    });
    let receiver = Arc::new(ProgressReceiver::new(
        Duration::from_secs(3),
        Some(disconnect),
    ));
    let mark = ProgressMark::new(Some(Arc::clone(&receiver)));
    let stuck = || std::future::pending::<Result<(), String>>();
    let ok = || std::future::ready(Ok::<(), String>(()));
    // Two timeouts (2 s of stall), then a send that goes through.
    assert_eq!(mark.forward(1.0, stuck()).await, Forwarded::TimedOut);
    assert_eq!(mark.forward(2.0, stuck()).await, Forwarded::TimedOut);
    assert_eq!(mark.forward(3.0, ok()).await, Forwarded::Sent);
    // Stalled again: disconnected once 3 s of timeouts have passed.
    for value in 4..=6 {
        assert_eq!(
            mark.forward(f64::from(value), stuck()).await,
            Forwarded::TimedOut
        );
    }
    assert_eq!(disconnects.load(Ordering::SeqCst), 0, "2 s of stall so far");
    assert_eq!(mark.forward(7.0, stuck()).await, Forwarded::TimedOut);
    assert_eq!(disconnects.load(Ordering::SeqCst), 1);
    assert!(receiver.is_disconnected());
    assert!(mark.enter().is_none(), "a disconnected client gets no more");
    assert_eq!(mark.forward(8.0, stuck()).await, Forwarded::TimedOut);
    assert_eq!(disconnects.load(Ordering::SeqCst), 1, "once");
}
