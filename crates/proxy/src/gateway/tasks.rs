//! [`TaskRoutes`]: which upstream each task id belongs to, for routing
//! `tasks/*`, bounded overall and per session.
//!
//! A session past its share forgets its own oldest task; at the overall
//! bound, the session holding the most routes forgets its oldest (the
//! oldest of all on a tie). So a client that creates tasks by the thousand
//! makes only its own old tasks unknown, never another client's, as long
//! as fewer than `max / per_session` sessions hold that many. (Before, the
//! whole map was cleared at the bound: one client's flood made every other
//! client's running tasks unknown.)

use std::collections::{HashMap, VecDeque};

use toolwarden_core::SessionKey;

/// Task ids remembered for routing `tasks/*`, over all upstreams.
pub(super) const MAX_TASK_ROUTES: usize = 4096;

/// Task ids remembered per downstream session.
pub(super) const MAX_TASK_ROUTES_PER_SESSION: usize = 1024;

/// See the [module docs](self).
#[derive(Debug)]
pub(super) struct TaskRoutes {
    /// A task id → its upstream (the gateway's member index).
    member_of: HashMap<String, usize>,
    /// Each session's task ids with their creation number, oldest first.
    /// Sessions without routes have no entry.
    by_session: HashMap<SessionKey, VecDeque<(u64, String)>>,
    /// Numbers task ids in creation order.
    created: u64,
    max: usize,
    per_session: usize,
}

impl Default for TaskRoutes {
    fn default() -> Self {
        TaskRoutes::with_bounds(MAX_TASK_ROUTES, MAX_TASK_ROUTES_PER_SESSION)
    }
}

impl TaskRoutes {
    pub(super) fn with_bounds(max: usize, per_session: usize) -> Self {
        TaskRoutes {
            member_of: HashMap::new(),
            by_session: HashMap::new(),
            created: 0,
            max: max.max(1),
            per_session: per_session.max(1),
        }
    }

    /// Remembers that `session` created task `task_id` on `member`.
    pub(super) fn insert(&mut self, session: &SessionKey, task_id: &str, member: usize) {
        if let Some(known) = self.member_of.get_mut(task_id) {
            // An id seen again (a server reusing ids): the newest upstream.
            *known = member;
            return;
        }
        let own = self.by_session.get(session).map_or(0, VecDeque::len);
        if own >= self.per_session {
            self.forget_oldest_of(session);
        } else if self.member_of.len() >= self.max {
            if let Some(largest) = self.largest_session() {
                self.forget_oldest_of(&largest);
            }
        }
        self.created += 1;
        self.member_of.insert(task_id.to_owned(), member);
        self.by_session
            .entry(session.clone())
            .or_default()
            .push_back((self.created, task_id.to_owned()));
    }

    /// The upstream of task `task_id`, if remembered.
    pub(super) fn member(&self, task_id: &str) -> Option<usize> {
        self.member_of.get(task_id).copied()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.member_of.len()
    }

    /// The session holding the most routes; of those, the one whose oldest
    /// route is the oldest.
    fn largest_session(&self) -> Option<SessionKey> {
        self.by_session
            .iter()
            .filter_map(|(session, routes)| {
                let (oldest, _) = routes.front()?;
                Some((routes.len(), std::cmp::Reverse(*oldest), session))
            })
            .max_by_key(|&(len, oldest, _)| (len, oldest))
            .map(|(_, _, session)| session.clone())
    }

    fn forget_oldest_of(&mut self, session: &SessionKey) {
        let Some(routes) = self.by_session.get_mut(session) else {
            return;
        };
        if let Some((_, task_id)) = routes.pop_front() {
            self.member_of.remove(&task_id);
        }
        if routes.is_empty() {
            self.by_session.remove(session);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> SessionKey {
        SessionKey::from(format!("session-{n}").as_str())
    }

    #[test]
    fn a_session_past_its_share_forgets_its_own_oldest_never_anothers() {
        let mut routes = TaskRoutes::with_bounds(100, 10);
        routes.insert(&s(1), "quiet-1", 0);
        routes.insert(&s(1), "quiet-2", 1);
        for n in 0..1_000 {
            routes.insert(&s(2), &format!("flood-{n}"), 0);
        }
        assert_eq!(routes.member("quiet-1"), Some(0));
        assert_eq!(routes.member("quiet-2"), Some(1));
        // The flooding session keeps its newest ten.
        assert_eq!(routes.member("flood-989"), None);
        assert_eq!(routes.member("flood-990"), Some(0));
        assert_eq!(routes.member("flood-999"), Some(0));
        assert_eq!(routes.len(), 12);
    }

    #[test]
    fn at_the_overall_bound_the_largest_session_forgets_its_oldest() {
        let mut routes = TaskRoutes::with_bounds(20, 10);
        routes.insert(&s(1), "a-0", 0);
        for k in 2..=4 {
            for n in 0..6 {
                routes.insert(&s(k), &format!("s{k}-{n}"), 0);
            }
        }
        routes.insert(&s(1), "a-1", 0);
        assert_eq!(routes.len(), 20);
        // Full: the next route costs the largest session (2, 3 and 4 hold
        // six each; 2's oldest is the oldest) its oldest route.
        routes.insert(&s(5), "new", 0);
        assert_eq!(routes.len(), 20);
        assert_eq!(routes.member("s2-0"), None);
        assert_eq!(routes.member("s3-0"), Some(0));
        assert_eq!(
            routes.member("a-0"),
            Some(0),
            "the small session keeps its own"
        );
        assert_eq!(routes.member("new"), Some(0));
        // Many one-task sessions (a stateless client's requests): the
        // bound holds, the oldest go first.
        for n in 0..1_000u64 {
            routes.insert(&s(100 + n), &format!("one-{n}"), 0);
            assert!(routes.len() <= 20);
        }
        assert!(
            routes.by_session.len() <= 20,
            "no session is kept without routes"
        );
        assert_eq!(routes.member("one-999"), Some(0));
    }

    #[test]
    fn an_id_seen_again_is_routed_to_its_newest_upstream_and_counted_once() {
        let mut routes = TaskRoutes::with_bounds(10, 10);
        routes.insert(&s(1), "t", 0);
        routes.insert(&s(2), "t", 3);
        assert_eq!(routes.member("t"), Some(3));
        assert_eq!(routes.len(), 1);
    }
}
