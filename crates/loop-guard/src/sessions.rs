//! The sessions a guard keeps a history for: bounded in number, each of a
//! fixed size.

use std::borrow::Cow;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use toolwarden_core::{Bounds, Entry, KeyRef, KeyedState};
use xxhash_rust::xxh3::xxh3_128;

use crate::history::Session;

/// Session keys longer than this are replaced by a digest, so that the
/// length of a key never grows memory.
const MAX_VERBATIM_KEY: usize = 64;

/// Every guard's sessions: one history per session key, at most
/// `max_sessions` of them (past that, one shared overflow history), plus
/// the history of calls that carry no session key.
#[derive(Debug)]
pub(crate) struct Sessions {
    keyed: KeyedState<Session>,
    /// Calls without a session key: kept apart from the map so that the
    /// common single-agent case does no map lookup at all.
    default: Arc<Session>,
    epoch: Instant,
}

/// A handle to one session's history.
#[derive(Debug)]
pub(crate) enum SessionRef {
    Default(Arc<Session>),
    Keyed(Entry<Session>),
}

impl Deref for SessionRef {
    type Target = Session;

    #[inline]
    fn deref(&self) -> &Session {
        match self {
            SessionRef::Default(session) => session,
            SessionRef::Keyed(entry) => entry,
        }
    }
}

impl Sessions {
    pub(crate) fn new(
        window_calls: usize,
        max_sessions: usize,
        idle_timeout: Option<Duration>,
    ) -> Self {
        let bounds = Bounds {
            max_keys: max_sessions,
            idle_timeout,
        };
        Sessions {
            keyed: KeyedState::new(bounds, move |_| Session::new(window_calls)),
            default: Arc::new(Session::new(window_calls)),
            epoch: Instant::now(),
        }
    }

    /// The history of `session_key`, created when new; the overflow history
    /// past the bound; the default history without a key.
    #[inline]
    pub(crate) fn get(&self, session_key: Option<&str>) -> SessionRef {
        match session_key {
            None => SessionRef::Default(Arc::clone(&self.default)),
            Some(key) if key.len() <= MAX_VERBATIM_KEY => {
                SessionRef::Keyed(self.keyed.entry(KeyRef::Custom(Cow::Borrowed(key))))
            }
            Some(key) => {
                SessionRef::Keyed(self.keyed.entry(KeyRef::Custom(Cow::Owned(digest(key)))))
            }
        }
    }

    /// Milliseconds since the guard was built, on tokio's clock.
    #[inline]
    pub(crate) fn now_ms(&self) -> u64 {
        let elapsed = Instant::now().saturating_duration_since(self.epoch);
        u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
    }

    /// Sessions with a history of their own (not counting the overflow and
    /// default histories).
    pub(crate) fn len(&self) -> usize {
        self.keyed.len()
    }
}

/// The key a long session key is stored under: 65 bytes, longer than any
/// key kept verbatim, so a digest never equals a verbatim key.
fn digest(key: &str) -> String {
    format!("{:~>33}{:032x}", "", xxh3_128(key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_keys_are_stored_as_digests_that_no_verbatim_key_equals() {
        let long = "k".repeat(10_000);
        let d = digest(&long);
        assert_eq!(d.len(), MAX_VERBATIM_KEY + 1);
        assert_ne!(d, digest(&"k".repeat(10_001)));

        let sessions = Sessions::new(4, 10, None);
        let a = sessions.get(Some(&long));
        let b = sessions.get(Some(&long));
        let SessionRef::Keyed(a) = a else {
            panic!("keyed")
        };
        let SessionRef::Keyed(b) = b else {
            panic!("keyed")
        };
        assert_eq!(a.key(), b.key(), "the same long key finds the same session");
        assert_eq!(a.key().to_string().len(), MAX_VERBATIM_KEY + 1);
        sessions.get(Some("short"));
        assert_eq!(sessions.len(), 2);
        assert!(matches!(sessions.get(None), SessionRef::Default(_)));
        assert_eq!(sessions.len(), 2, "the default session is not in the map");
    }
}
