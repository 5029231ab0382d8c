//! Which session an `initialize` past `http.max_sessions` closes
//! ([`choose`]), so that one client holding every session cannot lock the
//! others out.
//!
//! A client is the address its connection came from (an IPv6 address's
//! /64: one host may hold all of it). At the bound, a new
//! session from client X takes the place of:
//!
//! 1. the least recently active session of the client holding the most
//!    sessions, if that client holds at least two more than X and the
//!    session has been idle a short while ([`MinIdle::fair_share`]: a
//!    session in use is not cut; the heaviest client keeps the rest);
//! 2. else the least recently active session idle for at least
//!    [`MinIdle::any`] (`http.evict_idle_after`), of a client holding at least as many
//!    sessions as X (never one of a client holding fewer: a client
//!    opening many cannot close the one of a client holding one);
//! 3. else none: the `initialize` gets `503`.
//!
//! A session with a request in flight is never chosen (closing it would
//! cut the call). Behind one address (a NAT, a reverse proxy) every
//! session is the same client's, so only rule 2 applies there: the
//! longest idle session gives way, once idle long enough.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// When a session or a connection was last active, in milliseconds from
/// its listener's epoch: what [`Candidate::idle`] is read from.
#[derive(Debug)]
pub(super) struct LastActive {
    epoch: Instant,
    millis: AtomicU64,
}

impl LastActive {
    /// Active now.
    pub(super) fn new(epoch: Instant) -> Self {
        let last = LastActive {
            epoch,
            millis: AtomicU64::new(0),
        };
        last.touch();
        last
    }

    /// Marks it active now.
    pub(super) fn touch(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.millis.fetch_max(now, Ordering::Relaxed);
    }

    /// How long since it was last active.
    pub(super) fn idle(&self) -> Duration {
        self.epoch
            .elapsed()
            .saturating_sub(Duration::from_millis(self.millis.load(Ordering::Relaxed)))
    }
}

/// What [`choose`] knows of an open session.
#[derive(Debug, Clone)]
pub(super) struct Candidate<K> {
    /// The session.
    pub key: K,
    /// The client that opened it (`None`: unknown, counted as one client).
    pub client: Option<IpAddr>,
    /// How long since its last request, or the end of its last answer.
    pub idle: Duration,
    /// Whether it has a request in flight.
    pub busy: bool,
}

/// Why a session was chosen: the `reason` label of
/// `toolwarden_proxy_http_sessions_evicted_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reason {
    /// Rule 1: its client held the most sessions.
    FairShare,
    /// Rule 2: it was idle for `evict_idle_after`.
    Idle,
}

impl Reason {
    /// The metric label.
    pub(super) fn label(self) -> &'static str {
        match self {
            Reason::FairShare => "fair_share",
            Reason::Idle => "idle",
        }
    }
}

/// How long a session (or connection) must have been idle to be closed
/// by each rule.
#[derive(Debug, Clone, Copy)]
pub(super) struct MinIdle {
    /// Rule 1 (its client holds the most): long enough that a session or
    /// connection in use is not cut between two of its requests (clients
    /// with a new address each, an IPv6 host's, otherwise closed an active
    /// client's connections one call after the other).
    pub fair_share: Duration,
    /// Rule 2 (any client holding at least as many as the newcomer).
    pub any: Duration,
}

/// Sessions: rule 1 after 10 s without a request (or `evict_idle_after`
/// if shorter), rule 2 after `evict_idle_after`.
pub(super) const SESSION_FAIR_SHARE_IDLE: Duration = Duration::from_secs(10);

/// The session a new session of `newcomer` takes the place of, among the
/// open `sessions`, by the rules of the module docs; `None` if none may
/// be closed.
pub(super) fn choose<K: Clone>(
    sessions: &[Candidate<K>],
    newcomer: Option<IpAddr>,
    min_idle: MinIdle,
) -> Option<(K, Reason)> {
    let mut held: HashMap<Option<IpAddr>, usize> = HashMap::new();
    for session in sessions {
        *held.entry(session.client).or_default() += 1;
    }
    let mine = held.get(&newcomer).copied().unwrap_or(0);
    let heaviest = sessions
        .iter()
        .filter(|s| {
            !s.busy
                && s.idle >= min_idle.fair_share
                && s.client != newcomer
                && held[&s.client] > mine + 1
        })
        .max_by_key(|s| (held[&s.client], s.idle));
    if let Some(session) = heaviest {
        return Some((session.key.clone(), Reason::FairShare));
    }
    sessions
        .iter()
        .filter(|s| !s.busy && s.idle >= min_idle.any && held[&s.client] >= mine)
        .max_by_key(|s| s.idle)
        .map(|s| (s.key.clone(), Reason::Idle))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1)));
    const B: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2)));
    const C: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 3)));
    /// Rule 1 after a second, rule 2 after a minute.
    const MINUTE: MinIdle = MinIdle {
        fair_share: Duration::from_secs(1),
        any: Duration::from_secs(60),
    };

    fn any_after(secs: u64) -> MinIdle {
        MinIdle {
            any: Duration::from_secs(secs),
            ..MINUTE
        }
    }

    fn session(key: u32, client: Option<IpAddr>, idle_secs: u64, busy: bool) -> Candidate<u32> {
        Candidate {
            key,
            client,
            idle: Duration::from_secs(idle_secs),
            busy,
        }
    }

    #[test]
    fn the_client_holding_every_session_gives_way_to_another_once_idle_a_while() {
        let hog: Vec<_> = (0..4).map(|k| session(k, A, u64::from(k), false)).collect();
        assert_eq!(choose(&hog, B, MINUTE), Some((3, Reason::FairShare)));
        // In use (a request within the short while): not cut, whoever asks.
        let in_use: Vec<_> = (0..4).map(|k| session(k, A, 0, false)).collect();
        assert_eq!(choose(&in_use, B, MINUTE), None);
    }

    #[test]
    fn the_heaviest_client_gives_way_first_and_its_longest_idle_session() {
        let sessions = vec![
            session(1, A, 5, false),
            session(2, A, 9, false),
            session(3, B, 50, false),
            session(4, B, 40, false),
            session(5, B, 1, false),
        ];
        assert_eq!(choose(&sessions, C, MINUTE), Some((3, Reason::FairShare)));
    }

    #[test]
    fn a_client_does_not_close_the_session_of_a_client_holding_fewer() {
        // A, holding three, opens a fourth: B's one idle session stays.
        let sessions = vec![
            session(1, A, 1, false),
            session(2, A, 2, false),
            session(3, A, 3, false),
            session(4, B, 600, false),
        ];
        assert_eq!(choose(&sessions, A, MINUTE), None);
        // Unless one of A's own is idle long enough.
        let mut idle = sessions.clone();
        idle[1].idle = Duration::from_secs(61);
        assert_eq!(choose(&idle, A, MINUTE), Some((2, Reason::Idle)));
    }

    #[test]
    fn a_client_one_session_ahead_keeps_its_sessions_unless_idle() {
        // B holds two, C (the newcomer) one: fair enough, no fair-share close.
        let sessions = vec![
            session(1, B, 10, false),
            session(2, B, 20, false),
            session(3, C, 30, false),
        ];
        assert_eq!(choose(&sessions, C, MINUTE), None);
        let mut idle = sessions.clone();
        idle[2].idle = Duration::from_secs(90);
        assert_eq!(choose(&idle, C, MINUTE), Some((3, Reason::Idle)));
    }

    #[test]
    fn behind_one_address_the_longest_idle_session_gives_way_once_idle_long_enough() {
        let sessions = vec![
            session(1, A, 70, false),
            session(2, A, 200, false),
            session(3, A, 5, false),
        ];
        assert_eq!(choose(&sessions, A, MINUTE), Some((2, Reason::Idle)));
        assert_eq!(choose(&sessions, A, any_after(300)), None);
    }

    #[test]
    fn a_session_with_a_request_in_flight_is_never_closed() {
        let sessions = vec![
            session(1, A, 900, true),
            session(2, A, 900, true),
            session(3, A, 900, true),
        ];
        assert_eq!(choose(&sessions, B, MINUTE), None);
        assert_eq!(choose(&sessions, A, MINUTE), None);
        let mut one_free = sessions.clone();
        one_free[1].busy = false;
        assert_eq!(choose(&one_free, B, MINUTE), Some((2, Reason::FairShare)));
    }

    #[test]
    fn unknown_clients_count_as_one() {
        let sessions = vec![
            session(1, None, 1, false),
            session(2, None, 2, false),
            session(3, None, 3, false),
        ];
        assert_eq!(choose(&sessions, A, MINUTE), Some((3, Reason::FairShare)));
        assert_eq!(choose(&sessions, None, MINUTE), None);
    }
}
