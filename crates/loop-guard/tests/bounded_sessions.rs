//! Memory stays bounded whatever the sessions: a million of them through
//! the service.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use toolwarden_core::jsonrpc::{Request, Response};
use toolwarden_core::testing::ReadyChecked;
use toolwarden_core::{Bounds, BoxError, SessionKey};
use toolwarden_loop_guard::{LoopGuard, LoopGuardLayer};
use tower::{Service, ServiceExt};

use support::*;

fn tool_error() -> Value {
    json!({"content": [{"type": "text", "text": "boom"}], "isError": true})
}

#[tokio::test(start_paused = true)]
async fn memory_stays_bounded_under_a_million_sessions() {
    const SESSIONS: usize = 1_000_000;
    const MAX: usize = 1_000;
    let idle = Duration::from_secs(600);
    // A cheap inner service: the point is the guard's state, not the mock's log.
    let inner = tower::service_fn(|req: Request| async move {
        Ok::<_, BoxError>(Response::result(req.id, tool_error()))
    });
    let layer = LoopGuardLayer::builder()
        .bounds(Bounds::max_keys(MAX).idle_timeout(Some(idle)))
        .build()
        .unwrap();
    let mut svc = LoopGuard::new(ReadyChecked::new(inner), &layer);

    let template = tool_call("search", json!({"q": "x"}));
    let mut key = String::new();
    for i in 0..SESSIONS {
        key.clear();
        use std::fmt::Write;
        let _ = write!(key, "session-{i}");
        let mut request = template.clone();
        request.extensions.insert(SessionKey::from(key.as_str()));
        // Every session's first call goes through, whether it has a history
        // or not (past the bound).
        let result = svc.ready().await.unwrap().call(request).await;
        assert!(result.is_ok(), "session {i}");
        if i % 100_000 == 0 {
            assert!(svc.tracked_sessions() <= MAX);
        }
    }
    assert_eq!(svc.tracked_sessions(), MAX);

    // Past the bound, a new session has no history: its calls pass, never
    // counted with another's (regression: they shared one overflow history,
    // where this identical failing call, made by the million sessions
    // before it, had been refused long ago), and its own loops go unseen.
    for _ in 0..6 {
        let late = in_session("late", template.clone());
        expect_forwarded(&mut svc, late).await.unwrap();
    }
    // A session with its own history is unaffected.
    let early = in_session("session-0", template.clone());
    expect_forwarded(&mut svc, early).await.unwrap();

    // Idle sessions are forgotten. Eviction takes no clock on reads: a sweep,
    // run by an insert at most once per idle period, forgets the sessions
    // not used since the previous sweep. So the first sweep only starts the
    // idle period (and the newcomer still gets no history)...
    let fresh = |session: &str| in_session(session, tool_call("search", json!({"q": session})));
    tokio::time::advance(idle + Duration::from_secs(1)).await;
    expect_forwarded(&mut svc, fresh("fresh-1")).await.unwrap();
    assert_eq!(svc.tracked_sessions(), MAX);
    // ...and the next one, an idle period later, evicts every idle session.
    tokio::time::advance(idle + Duration::from_secs(1)).await;
    expect_forwarded(&mut svc, fresh("fresh-2")).await.unwrap();
    assert_eq!(svc.tracked_sessions(), 1);
}
