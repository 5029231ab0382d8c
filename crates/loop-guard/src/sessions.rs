//! The sessions a guard keeps a history for: bounded in number, each of a
//! fixed size; and what every session of a guard shares: its clock and a
//! fixed-size record of recent successes.

use std::borrow::Cow;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use toolwarden_core::{Bounds, Entry, KeyRef, KeyedState};
use xxhash_rust::xxh3::xxh3_128;

use crate::history::Session;

/// Session keys longer than this are replaced by a digest, so that the
/// length of a key never grows memory.
const MAX_VERBATIM_KEY: usize = 64;

/// How many fingerprints [`RecentSuccesses`] remembers at most: 1024
/// slots of 8 bytes, 8 KiB per guard.
const SUCCESS_SLOTS: usize = 1024;

/// Bits of a slot holding the time of the success, in milliseconds since
/// the guard's epoch (saturating after about 34 years); the other 24 hold
/// the top bits of the fingerprint.
const SUCCESS_TIME_BITS: u32 = 40;
const SUCCESS_TIME_MASK: u64 = (1 << SUCCESS_TIME_BITS) - 1;

/// When each of the recently successful calls last succeeded, in any
/// session of the guard: a fixed, direct-mapped table of
/// [`SUCCESS_SLOTS`] atomics, so recording and reading a success takes no
/// lock and the table never grows.
///
/// A slot is chosen by the fingerprint's low bits and tagged with its top
/// 24 bits. Two calls sharing a slot overwrite each other: a success is
/// then forgotten, and the refusal it would have lifted waits for the
/// other ways of lifting (the cool-down at most). A call whose fingerprint
/// matches another's slot and tag (about one in 2^34 pairs) reads the
/// other's success: its refusal lifts early, which lets one more call
/// through and never refuses one.
pub(crate) struct RecentSuccesses {
    slots: Box<[AtomicU64]>,
}

impl RecentSuccesses {
    fn new() -> Self {
        RecentSuccesses {
            slots: (0..SUCCESS_SLOTS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    #[inline]
    fn slot(&self, fingerprint: u64) -> &AtomicU64 {
        // SUCCESS_SLOTS is a power of two; the truncating cast keeps the low bits.
        &self.slots[(fingerprint as usize) & (SUCCESS_SLOTS - 1)]
    }

    fn record(&self, fingerprint: u64, now_ms: u64) {
        let tag = fingerprint & !SUCCESS_TIME_MASK;
        let value = tag | now_ms.min(SUCCESS_TIME_MASK);
        self.slot(fingerprint).store(value, Ordering::Relaxed);
    }

    /// When `fingerprint` last succeeded; 0 when not known.
    fn last(&self, fingerprint: u64) -> u64 {
        let value = self.slot(fingerprint).load(Ordering::Relaxed);
        if value & !SUCCESS_TIME_MASK == fingerprint & !SUCCESS_TIME_MASK {
            value & SUCCESS_TIME_MASK
        } else {
            0
        }
    }
}

impl std::fmt::Debug for RecentSuccesses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The slots themselves say nothing useful.
        f.debug_struct("RecentSuccesses")
            .field("slots", &self.slots.len())
            .finish()
    }
}

/// What every session of a guard shares.
#[derive(Debug)]
pub(crate) struct Shared {
    epoch: Instant,
    successes: RecentSuccesses,
    /// 1 + when the latest block was made (milliseconds since the epoch);
    /// 0 before the first. See [`Shared::record_success`].
    latest_block: AtomicU64,
}

impl Shared {
    pub(crate) fn new() -> Self {
        Shared {
            epoch: Instant::now(),
            successes: RecentSuccesses::new(),
            latest_block: AtomicU64::new(0),
        }
    }

    /// Notes that a call was blocked at `now_ms`.
    pub(crate) fn note_block(&self, now_ms: u64) {
        self.latest_block
            .fetch_max(now_ms.saturating_add(1), Ordering::Relaxed);
    }

    /// Milliseconds since the guard was built, on tokio's clock.
    #[inline]
    pub(crate) fn now_ms(&self) -> u64 {
        let elapsed = toolwarden_core::time::now().saturating_duration_since(self.epoch);
        u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
    }

    /// Notes that the call `fingerprint`, admitted at `admitted_ms`,
    /// succeeded now.
    ///
    /// A success is only ever compared with when a refusal of the same call
    /// began (it lifts the refusal when newer). When no block was made
    /// since the call was admitted, every refusal began either before the
    /// call was admitted or after this success, so the admission time
    /// compares with it exactly as the time of the success would, and the
    /// clock is not read (a read costs 20–30 ns on a virtual machine, and
    /// this is the only one a call makes after its answer). Otherwise the
    /// clock is read. (A block made on another thread at the same moment,
    /// not yet seen here, can make a success of a call admitted before it
    /// count as older than the refusal: the refusal then lifts at the next
    /// success, or after its cooldown.)
    pub(crate) fn record_success(&self, fingerprint: u64, admitted_ms: u64) {
        let latest_block = self.latest_block.load(Ordering::Relaxed);
        let when = if latest_block == 0 || latest_block - 1 < admitted_ms {
            admitted_ms
        } else {
            self.now_ms()
        };
        self.successes.record(fingerprint, when);
    }

    /// When the call `fingerprint` last succeeded in any session, in
    /// milliseconds since the epoch; 0 when not known.
    pub(crate) fn last_success_ms(&self, fingerprint: u64) -> u64 {
        self.successes.last(fingerprint)
    }
}

/// Every guard's sessions: one history per session key, at most
/// `bounds.max_keys` of them (past that, none), plus the history of calls
/// that carry no session key.
pub(crate) struct Sessions {
    keyed: KeyedState<Session>,
    /// Calls without a session key: kept apart from the map so that the
    /// common single-agent case does no map lookup at all.
    default: Arc<Session>,
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

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("tracked", &self.len())
            .finish_non_exhaustive()
    }
}

impl Sessions {
    /// The histories a guard with `config` keeps, empty.
    pub(crate) fn for_config<C>(config: &crate::LoopGuardConfig<C>) -> Self {
        let bounds = config.bounds();
        Self::new(config.window_calls(), bounds.max_keys, bounds.idle_timeout)
    }

    pub(crate) fn new(
        window_calls: usize,
        max_sessions: usize,
        idle_timeout: Option<Duration>,
    ) -> Self {
        // The map reads the timeout in whole milliseconds of a u64:
        // longer ones would wrap around to short ones.
        let longest = Duration::from_millis(u64::MAX);
        let bounds = Bounds {
            max_keys: max_sessions,
            idle_timeout: idle_timeout.map(|idle| idle.min(longest)),
        };
        let shared = Arc::new(Shared::new());
        let for_keyed = Arc::clone(&shared);
        Sessions {
            keyed: KeyedState::new(bounds, move |_| {
                Session::new(window_calls, Arc::clone(&for_keyed))
            }),
            default: Arc::new(Session::new(window_calls, shared)),
        }
    }

    /// The history of `session_key`, created when new; the default history
    /// without a key; none for a new session past the bound (the map's
    /// overflow entry is never used as a history: see [`crate`], "Sessions
    /// and memory").
    #[inline]
    pub(crate) fn get(&self, session_key: Option<&str>) -> Option<SessionRef> {
        let entry = match session_key {
            None => return Some(SessionRef::Default(Arc::clone(&self.default))),
            Some(key) if key.len() <= MAX_VERBATIM_KEY => {
                self.keyed.entry(KeyRef::Custom(Cow::Borrowed(key)))
            }
            Some(key) => self.keyed.entry(KeyRef::Custom(Cow::Owned(digest(key)))),
        };
        (!entry.is_overflow()).then_some(SessionRef::Keyed(entry))
    }

    /// Sessions with a history of their own (not counting the default
    /// history).
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
        let a = sessions.get(Some(&long)).unwrap();
        let b = sessions.get(Some(&long)).unwrap();
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
        assert!(matches!(sessions.get(None), Some(SessionRef::Default(_))));
        assert_eq!(sessions.len(), 2, "the default session is not in the map");
    }

    #[test]
    fn recent_successes_are_tagged_and_saturate() {
        let successes = RecentSuccesses::new();
        let fp = 0xABCD_EF01_2345_6789;
        assert_eq!(successes.last(fp), 0);
        successes.record(fp, 1_234);
        assert_eq!(successes.last(fp), 1_234);
        // Same slot, another tag: overwrites, and reads as unknown for the other.
        let rival = fp ^ (1 << 63);
        successes.record(rival, 99);
        assert_eq!((successes.last(fp), successes.last(rival)), (0, 99));
        successes.record(fp, u64::MAX);
        assert_eq!(successes.last(fp), SUCCESS_TIME_MASK);
        assert_eq!(
            std::mem::size_of::<AtomicU64>() * SUCCESS_SLOTS,
            8 * 1024,
            "8 KiB per guard, as documented"
        );
    }
}
