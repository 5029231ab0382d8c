//! [`TaskTable`]: the tasks (SEP-1686) the proxy keeps something about
//! (which client owns one, which upstream serves it), bounded overall and
//! per owner.
//!
//! An owner past its share forgets its own oldest task; at the overall
//! bound, the owner holding the most tasks forgets its oldest (the oldest
//! of all on a tie). So a client that creates tasks by the thousand makes
//! only its own old tasks unknown, never another client's, as long as
//! fewer than `max / per_owner` owners hold that many. (The gateway's
//! routes once cleared the whole map at the bound: one client's flood made
//! every other client's running tasks unknown.)
//!
//! Two tables use it: the gateway's routes (a task id → the upstream that
//! serves it, owned by the downstream session) and the downstream clients'
//! tasks (a task id → the client whose call created it: its status
//! notifications are that client's only, and no other client may read,
//! update or cancel it). For the second, a forgotten task is nobody's: its
//! notifications go nowhere, and its id alone gives access to it, as for a
//! task created for a client without a session. Task ids are the server's,
//! and only the client that created the task was sent its id.
//!
//! Task ids are the server's, of any length: the table keeps no id, only
//! two 64-bit SipHash digests of it under keys drawn for the table
//! ([`RandomState`]), so a task costs the same few dozen bytes however
//! long its id (a server sending megabyte ids cannot make the table hold
//! gigabytes). Two ids with the same digests would be one task: among
//! 4 096 tasks the chance is about 2⁻¹⁰⁴, and nobody outside knows the
//! keys to make it happen.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash};

/// Tasks remembered in one table.
pub(crate) const MAX_TASKS: usize = 4096;

/// Tasks remembered per owner.
pub(crate) const MAX_TASKS_PER_OWNER: usize = 1024;

/// A task id as a table keeps it: its two digests (see the
/// [module docs](self)).
type IdKey = (u64, u64);

/// See the [module docs](self).
#[derive(Debug)]
pub(crate) struct TaskTable<O, V> {
    /// The keys of the digests of task ids.
    digests: (RandomState, RandomState),
    /// A task id's digests → its value and owner.
    tasks: HashMap<IdKey, (V, O)>,
    /// Each owner's tasks with their creation number, oldest first.
    /// Owners without tasks have no entry.
    by_owner: HashMap<O, VecDeque<(u64, IdKey)>>,
    /// Numbers task ids in creation order.
    created: u64,
    max: usize,
    per_owner: usize,
}

impl<O: Eq + Hash + Clone, V: Copy> Default for TaskTable<O, V> {
    fn default() -> Self {
        TaskTable::with_bounds(MAX_TASKS, MAX_TASKS_PER_OWNER)
    }
}

impl<O: Eq + Hash + Clone, V: Copy> TaskTable<O, V> {
    pub(crate) fn with_bounds(max: usize, per_owner: usize) -> Self {
        TaskTable {
            digests: (RandomState::new(), RandomState::new()),
            tasks: HashMap::new(),
            by_owner: HashMap::new(),
            created: 0,
            max: max.max(1),
            per_owner: per_owner.max(1),
        }
    }

    /// How the table keeps `task_id`.
    fn key(&self, task_id: &str) -> IdKey {
        (
            self.digests.0.hash_one(task_id),
            self.digests.1.hash_one(task_id),
        )
    }

    /// Remembers task `task_id` of `owner`, with `value`. An id seen again
    /// (a server reusing ids) is the new owner's, with the new value.
    pub(crate) fn insert(&mut self, owner: &O, task_id: &str, value: V) {
        let key = self.key(task_id);
        self.remove_key(key);
        let own = self.by_owner.get(owner).map_or(0, VecDeque::len);
        if own >= self.per_owner {
            self.forget_oldest_of(owner);
        } else if self.tasks.len() >= self.max {
            if let Some(largest) = self.largest_owner() {
                self.forget_oldest_of(&largest);
            }
        }
        self.created += 1;
        self.tasks.insert(key, (value, owner.clone()));
        self.by_owner
            .entry(owner.clone())
            .or_default()
            .push_back((self.created, key));
    }

    /// The value of task `task_id`, if remembered.
    pub(crate) fn get(&self, task_id: &str) -> Option<V> {
        self.tasks.get(&self.key(task_id)).map(|(value, _)| *value)
    }

    /// The owner of task `task_id`, if remembered.
    pub(crate) fn owner(&self, task_id: &str) -> Option<&O> {
        self.tasks.get(&self.key(task_id)).map(|(_, owner)| owner)
    }

    /// Forgets task `task_id` (it ended); its value and owner, if it was
    /// remembered.
    pub(crate) fn remove(&mut self, task_id: &str) -> Option<(V, O)> {
        self.remove_key(self.key(task_id))
    }

    fn remove_key(&mut self, key: IdKey) -> Option<(V, O)> {
        let (value, owner) = self.tasks.remove(&key)?;
        if let Some(own) = self.by_owner.get_mut(&owner) {
            own.retain(|&(_, id)| id != key);
            if own.is_empty() {
                self.by_owner.remove(&owner);
            }
        }
        Some((value, owner))
    }

    /// Forgets every task of `owner` (it went away).
    pub(crate) fn forget_owner(&mut self, owner: &O) {
        for (_, key) in self.by_owner.remove(owner).unwrap_or_default() {
            self.tasks.remove(&key);
        }
    }

    /// Tasks remembered.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.tasks.len()
    }

    /// The owner holding the most tasks; of those, the one whose oldest
    /// task is the oldest.
    fn largest_owner(&self) -> Option<O> {
        self.by_owner
            .iter()
            .filter_map(|(owner, tasks)| {
                let (oldest, _) = tasks.front()?;
                Some((tasks.len(), std::cmp::Reverse(*oldest), owner))
            })
            .max_by_key(|&(len, oldest, _)| (len, oldest))
            .map(|(_, _, owner)| owner.clone())
    }

    fn forget_oldest_of(&mut self, owner: &O) {
        let Some(tasks) = self.by_owner.get_mut(owner) else {
            return;
        };
        if let Some((_, key)) = tasks.pop_front() {
            self.tasks.remove(&key);
        }
        if tasks.is_empty() {
            self.by_owner.remove(owner);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use toolwarden_core::SessionKey;

    fn s(n: u64) -> SessionKey {
        SessionKey::from(format!("session-{n}").as_str())
    }

    #[test]
    fn a_session_past_its_share_forgets_its_own_oldest_never_anothers() {
        let mut routes = TaskTable::<SessionKey, usize>::with_bounds(100, 10);
        routes.insert(&s(1), "quiet-1", 0);
        routes.insert(&s(1), "quiet-2", 1);
        for n in 0..1_000 {
            routes.insert(&s(2), &format!("flood-{n}"), 0);
        }
        assert_eq!(routes.get("quiet-1"), Some(0));
        assert_eq!(routes.get("quiet-2"), Some(1));
        // The flooding session keeps its newest ten.
        assert_eq!(routes.get("flood-989"), None);
        assert_eq!(routes.get("flood-990"), Some(0));
        assert_eq!(routes.get("flood-999"), Some(0));
        assert_eq!(routes.len(), 12);
    }

    #[test]
    fn at_the_overall_bound_the_largest_session_forgets_its_oldest() {
        let mut routes = TaskTable::<SessionKey, usize>::with_bounds(20, 10);
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
        assert_eq!(routes.get("s2-0"), None);
        assert_eq!(routes.get("s3-0"), Some(0));
        assert_eq!(
            routes.get("a-0"),
            Some(0),
            "the small session keeps its own"
        );
        assert_eq!(routes.get("new"), Some(0));
        // Many one-task sessions (a stateless client's requests): the
        // bound holds, the oldest go first.
        for n in 0..1_000u64 {
            routes.insert(&s(100 + n), &format!("one-{n}"), 0);
            assert!(routes.len() <= 20);
        }
        assert!(
            routes.by_owner.len() <= 20,
            "no session is kept without routes"
        );
        assert_eq!(routes.get("one-999"), Some(0));
    }

    #[test]
    fn a_task_that_ends_or_whose_owner_goes_is_forgotten_with_its_place() {
        let mut tasks = TaskTable::<u64, ()>::with_bounds(100, 3);
        for n in 0..3 {
            tasks.insert(&1, &format!("a-{n}"), ());
        }
        tasks.insert(&2, "b-0", ());
        assert_eq!(tasks.remove("a-1"), Some(((), 1)));
        assert_eq!(tasks.remove("a-1"), None, "forgotten once");
        assert_eq!(tasks.owner("a-1"), None);
        // The ended task's place is free: a new one costs no old one.
        tasks.insert(&1, "a-3", ());
        assert_eq!(tasks.owner("a-0"), Some(&1));
        assert_eq!(tasks.owner("a-3"), Some(&1));
        assert_eq!(tasks.len(), 4);
        tasks.forget_owner(&1);
        assert_eq!(tasks.len(), 1);
        assert_eq!(tasks.owner("a-0"), None);
        assert_eq!(tasks.owner("b-0"), Some(&2));
        assert!(
            !tasks.by_owner.contains_key(&1),
            "no owner kept without tasks"
        );
        tasks.forget_owner(&2);
        assert!(tasks.by_owner.is_empty() && tasks.tasks.is_empty());
    }

    #[test]
    fn ids_of_any_length_are_kept_as_digests_and_told_apart() {
        let mut tasks = TaskTable::<u64, usize>::with_bounds(100, 10);
        let long = "x".repeat(1 << 20);
        tasks.insert(&1, &long, 7);
        tasks.insert(&2, &long[..long.len() - 1], 8);
        tasks.insert(&3, "", 9);
        assert_eq!(tasks.get(&long), Some(7));
        assert_eq!(tasks.owner(&long[..long.len() - 1]), Some(&2));
        assert_eq!(tasks.get(""), Some(9));
        assert_eq!(tasks.get(&format!("{long}x")), None);
        assert_eq!(tasks.remove(&long), Some((7, 1)));
        assert_eq!(tasks.get(&long), None);
        assert!(!tasks.by_owner.contains_key(&1));
        // Another table keeps the same id under other digests.
        let other = TaskTable::<u64, usize>::with_bounds(100, 10);
        assert_ne!(tasks.key("t"), other.key("t"));
    }

    #[test]
    fn an_id_seen_again_moves_to_its_new_owner() {
        let mut tasks = TaskTable::<u64, ()>::with_bounds(100, 10);
        tasks.insert(&1, "t", ());
        tasks.insert(&2, "t", ());
        assert_eq!(tasks.owner("t"), Some(&2));
        tasks.forget_owner(&1);
        assert_eq!(tasks.owner("t"), Some(&2), "no longer the first owner's");
        assert_eq!(tasks.len(), 1);
    }

    #[test]
    fn an_id_seen_again_is_routed_to_its_newest_upstream_and_counted_once() {
        let mut routes = TaskTable::<SessionKey, usize>::with_bounds(10, 10);
        routes.insert(&s(1), "t", 0);
        routes.insert(&s(2), "t", 3);
        assert_eq!(routes.get("t"), Some(3));
        assert_eq!(routes.len(), 1);
    }
}
