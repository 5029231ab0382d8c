//! The fleet-wide probe permit of a [`RedisBreakerSync`](crate::RedisBreakerSync):
//! one replica probes a half-open key at a time.
//!
//! The breaker asks synchronously, under its per-key lock
//! ([`StateSync::probe_permit`](toolwarden_circuit_breaker::StateSync::probe_permit)),
//! so the answer comes from a per-key lease kept here; Redis is only asked
//! in the background:
//!
//! 1. No lease known: an acquire (`SET {prefix}:cb-permit:{key} <token> NX
//!    PX <ttl>`, with `PTTL` in the same `MULTI`) is queued for the permit
//!    task, and the call is denied for `op_timeout` (the longest the answer
//!    can take).
//! 2. The answer is kept: *held* (this replica won: granted until its TTL,
//!    counted from before the `SET` was sent, runs out here), *taken*
//!    (another replica holds it: denied until its `PTTL` runs out), or
//!    *local* (Redis did not answer: granted, as without a permit, for one
//!    TTL; then Redis is asked again).
//! 3. When this replica's circuit closes, a held permit is released with a
//!    compare-and-delete script (only if Redis still holds this replica's
//!    token), so a replica still waiting may probe at once. When it reopens
//!    (the probe failed or timed out), the permit is kept until it expires,
//!    so no other replica probes before it hears of the re-open. A replica
//!    that dies releases nothing: the permit expires after its TTL.
//!
//! The tokens are `{replica_id}:{random per sync}:{sequence}`, so a release
//! can only delete the lease it was given. The TTL is the larger of the
//! configured one and the key's `probe_timeout`, so a permit outlives the
//! probe it covers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use toolwarden_circuit_breaker::{ProbePermit, ProbeRequest};

use crate::conn::Conn;

/// The most keys a permit is kept for; past it, a probe is granted locally
/// (and counted as a fallback) until old leases expire.
const MAX_LEASES: usize = 10_000;
/// The most permit operations waiting for the permit task; past it, a probe
/// is granted locally (and counted as a fallback), never blocking a call.
const QUEUE: usize = 1024;

/// Deletes KEYS\[1\] only while it still holds ARGV\[1\] (this replica's
/// token): a permit that expired and was taken by another replica is left
/// alone. Returns the number of keys deleted.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// What this replica knows of one key's permit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lease {
    /// An acquire is queued or running.
    Acquiring { token: u64, since: Instant },
    /// This replica holds the permit until `until` (on this replica's clock,
    /// no later than Redis expires it).
    Held { token: u64, until: Instant },
    /// Another replica holds it until about `until`.
    Taken { until: Instant },
    /// Redis did not answer: probes are granted locally until `until`.
    Local { until: Instant },
}

impl Lease {
    fn expired(&self, now: Instant) -> bool {
        match *self {
            Lease::Acquiring { .. } => false,
            Lease::Held { until, .. } | Lease::Taken { until } | Lease::Local { until } => {
                until <= now
            }
        }
    }
}

/// A request for the permit task.
#[derive(Debug)]
pub(crate) enum PermitOp {
    Acquire {
        name: String,
        token: u64,
        ttl: Duration,
    },
    Release {
        name: String,
        token: u64,
    },
}

/// The probe permits of one replica.
pub(crate) struct Permits {
    conn: Conn,
    /// Whether permits are asked for at all (else every probe is granted).
    enabled: bool,
    /// The configured TTL (the key's `probe_timeout` if longer).
    ttl: Duration,
    /// Makes this sync's tokens unique across restarts of one replica id.
    nonce: u64,
    next_token: AtomicU64,
    leases: Mutex<HashMap<String, Lease>>,
    ops: mpsc::Sender<PermitOp>,
    release: redis::Script,
    pub(crate) acquired: AtomicU64,
    pub(crate) denied: AtomicU64,
    pub(crate) fallbacks: AtomicU64,
}

impl Permits {
    /// The permits, and the receiving end of the permit task's queue.
    pub(crate) fn new(
        conn: Conn,
        enabled: bool,
        ttl: Duration,
    ) -> (Self, mpsc::Receiver<PermitOp>) {
        let (ops, rx) = mpsc::channel(QUEUE);
        let permits = Permits {
            conn,
            enabled,
            ttl,
            nonce: fastrand::u64(..),
            next_token: AtomicU64::new(1),
            leases: Mutex::new(HashMap::new()),
            ops,
            release: redis::Script::new(RELEASE),
            acquired: AtomicU64::new(0),
            denied: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
        };
        (permits, rx)
    }

    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }

    pub(crate) fn ttl(&self) -> Duration {
        self.ttl
    }

    fn value(&self, token: u64) -> String {
        format!(
            "{}:{:016x}:{token}",
            self.conn.config.replica_id, self.nonce
        )
    }

    /// How long an acquire may stay unanswered before the probe is granted
    /// locally: the answer takes at most `op_timeout` once the task runs
    /// it, so a longer wait means the queue is backed up behind a slow Redis.
    fn stale_after(&self) -> Duration {
        self.conn.config.op_timeout.saturating_mul(2)
    }

    /// The breaker's question (synchronous, under its lock): answered from
    /// the lease kept for the key; an acquire is queued when none is.
    pub(crate) fn ask(&self, request: &ProbeRequest<'_>) -> ProbePermit {
        if !self.enabled {
            return ProbePermit::Granted;
        }
        let now = Instant::now();
        let ttl = self.ttl.max(request.probe_timeout);
        let Ok(mut leases) = self.leases.lock() else {
            return self.fallback();
        };
        match leases.get(request.name).copied() {
            Some(Lease::Held { until, .. }) if until > now => return ProbePermit::Granted,
            Some(Lease::Local { until }) if until > now => return self.fallback(),
            Some(Lease::Taken { until }) if until > now => {
                return self.deny(until.saturating_duration_since(now));
            }
            Some(Lease::Acquiring { since, .. }) => {
                if now.saturating_duration_since(since) < self.stale_after() {
                    return self.deny(self.conn.config.op_timeout);
                }
                // The answer may still come: it finds the key local and
                // releases what it won. (No event here: this runs under
                // the breaker's lock and the event hook is the user's; the
                // late operation reports itself.)
                leases.insert(request.name.to_owned(), Lease::Local { until: now + ttl });
                return self.fallback();
            }
            _ => {}
        }
        // The bound before any insertion: a Redis down from the start
        // (never connected) must not let the local leases grow past it.
        if leases.len() >= MAX_LEASES && !leases.contains_key(request.name) {
            leases.retain(|_, lease| !lease.expired(now));
            if leases.len() >= MAX_LEASES {
                return self.fallback();
            }
        }
        if !self.conn.is_connected() {
            leases.insert(request.name.to_owned(), Lease::Local { until: now + ttl });
            return self.fallback();
        }
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let op = PermitOp::Acquire {
            name: request.name.to_owned(),
            token,
            ttl,
        };
        if self.ops.try_send(op).is_err() {
            // Backed up behind a slow Redis, whose operations report
            // themselves.
            leases.insert(request.name.to_owned(), Lease::Local { until: now + ttl });
            return self.fallback();
        }
        leases.insert(
            request.name.to_owned(),
            Lease::Acquiring { token, since: now },
        );
        self.deny(self.conn.config.op_timeout)
    }

    fn deny(&self, retry_after: Duration) -> ProbePermit {
        self.denied.fetch_add(1, Ordering::AcqRel);
        ProbePermit::Denied { retry_after }
    }

    fn fallback(&self) -> ProbePermit {
        self.fallbacks.fetch_add(1, Ordering::AcqRel);
        ProbePermit::Granted
    }

    /// This replica's circuit for `name` left the half-open state for one
    /// that admits calls (the probe succeeded, or a manual change): a held
    /// permit is released, so that a replica still waiting may probe now.
    pub(crate) fn end(&self, name: &str) {
        if !self.enabled {
            return;
        }
        let lease = match self.leases.lock() {
            Ok(mut leases) => leases.remove(name),
            Err(_) => None,
        };
        if let Some(Lease::Held { token, until }) = lease {
            if until > Instant::now() {
                let op = PermitOp::Release {
                    name: name.to_owned(),
                    token,
                };
                if self.ops.try_send(op).is_err() {
                    self.conn
                        .report("probe permit queue full: the permit is left to expire");
                }
            }
        }
    }

    /// Another replica announced `name` closed: what was learnt of its
    /// permit (taken elsewhere, or Redis away) is stale; a permit held or
    /// being asked for here is left to [`end`](Self::end).
    pub(crate) fn heard_closed(&self, name: &str) {
        if !self.enabled {
            return;
        }
        if let Ok(mut leases) = self.leases.lock() {
            if matches!(
                leases.get(name),
                Some(Lease::Taken { .. } | Lease::Local { .. })
            ) {
                leases.remove(name);
            }
        }
    }

    async fn acquire(&self, name: String, token: u64, ttl: Duration) {
        let key = self.conn.config.key("cb-permit", &name);
        let value = self.value(token);
        let px = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let (key, value) = (&key, &value);
        let sent = Instant::now();
        let answer = self
            .conn
            .run("acquire probe permit", |mut c| async move {
                redis::pipe()
                    .atomic()
                    .cmd("SET")
                    .arg(key)
                    .arg(value)
                    .arg("NX")
                    .arg("PX")
                    .arg(px)
                    .cmd("PTTL")
                    .arg(key)
                    .query_async::<(Option<String>, i64)>(&mut c)
                    .await
            })
            .await;
        let now = Instant::now();
        let lease = match answer {
            Ok((Some(_), _)) => {
                self.acquired.fetch_add(1, Ordering::AcqRel);
                Lease::Held {
                    token,
                    until: sent + ttl,
                }
            }
            // Another replica's: wait out its TTL. A key gone meanwhile
            // (-2) or without a TTL (-1, not written by a sync) is asked
            // for again soon.
            Ok((None, pttl)) => Lease::Taken {
                until: now
                    + u64::try_from(pttl)
                        .map_or(self.conn.config.op_timeout, Duration::from_millis),
            },
            Err(_) => Lease::Local { until: now + ttl },
        };
        let kept = self
            .leases
            .lock()
            .is_ok_and(|mut leases| match leases.get_mut(&name) {
                Some(slot) if matches!(*slot, Lease::Acquiring { token: t, .. } if t == token) => {
                    *slot = lease;
                    true
                }
                _ => false,
            });
        if !kept {
            // The circuit closed (or went local) while asking: give back
            // what was won.
            if let Lease::Held { .. } = lease {
                self.release(&name, token).await;
            }
        }
    }

    async fn release(&self, name: &str, token: u64) {
        let key = self.conn.config.key("cb-permit", name);
        let mut invocation = self.release.prepare_invoke();
        invocation.key(key).arg(self.value(token));
        let invocation = &invocation;
        let _ = self
            .conn
            .run("release probe permit", |mut c| async move {
                invocation.invoke_async::<i64>(&mut c).await
            })
            .await;
    }
}

/// Runs the permit operations in order. Failures are reported by
/// `Conn::run`; a failed acquire makes the replica probe locally, a failed
/// release leaves the permit to expire.
pub(crate) async fn permit_loop(
    permits: std::sync::Arc<Permits>,
    mut rx: mpsc::Receiver<PermitOp>,
) {
    while let Some(op) = rx.recv().await {
        match op {
            PermitOp::Acquire { name, token, ttl } => permits.acquire(name, token, ttl).await,
            PermitOp::Release { name, token } => permits.release(&name, token).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RedisConfig;
    use toolwarden_core::Key;

    /// Permits on a Redis that is never reached (nothing listens on port 1).
    fn permits(enabled: bool) -> Permits {
        let config = RedisConfig::builder("redis://127.0.0.1:1")
            .replica_id("r")
            .build()
            .unwrap();
        Permits::new(
            Conn::start(config).unwrap(),
            enabled,
            Duration::from_secs(5),
        )
        .0
    }

    fn ask(permits: &Permits, name: &str) -> ProbePermit {
        let key = Key::Tool(name.into());
        permits.ask(&ProbeRequest::new(&key, name, Duration::from_secs(30)))
    }

    fn set(permits: &Permits, name: &str, lease: Lease) {
        permits
            .leases
            .lock()
            .unwrap()
            .insert(name.to_owned(), lease);
    }

    #[tokio::test]
    async fn without_a_connection_probes_are_local_and_counted() {
        let p = permits(true);
        assert_eq!(ask(&p, "t"), ProbePermit::Granted);
        assert_eq!(ask(&p, "t"), ProbePermit::Granted);
        assert_eq!(p.fallbacks.load(Ordering::Acquire), 2);
        // The local lease lasts the key's probe timeout (longer than the TTL).
        let lease = p.leases.lock().unwrap()["t"];
        assert!(
            matches!(lease, Lease::Local { until } if until > Instant::now() + Duration::from_secs(29))
        );
        // The end of the episode forgets it.
        p.end("t");
        assert!(p.leases.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn without_a_connection_the_local_leases_stay_bounded() {
        let p = permits(true);
        for n in 0..MAX_LEASES + 500 {
            assert_eq!(ask(&p, &format!("t{n}")), ProbePermit::Granted);
        }
        assert_eq!(p.leases.lock().unwrap().len(), MAX_LEASES);
        assert_eq!(
            p.fallbacks.load(Ordering::Acquire),
            (MAX_LEASES + 500) as u64,
            "every probe past the bound is still answered locally"
        );
    }

    #[tokio::test]
    async fn disabled_permits_grant_without_counting() {
        let p = permits(false);
        assert_eq!(ask(&p, "t"), ProbePermit::Granted);
        assert_eq!(p.fallbacks.load(Ordering::Acquire), 0);
        assert!(p.leases.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn answers_come_from_the_lease() {
        let p = permits(true);
        let now = Instant::now();
        let secs = Duration::from_secs;
        set(
            &p,
            "held",
            Lease::Held {
                token: 1,
                until: now + secs(3),
            },
        );
        assert_eq!(ask(&p, "held"), ProbePermit::Granted);
        set(
            &p,
            "taken",
            Lease::Taken {
                until: now + secs(3),
            },
        );
        let ProbePermit::Denied { retry_after } = ask(&p, "taken") else {
            panic!("taken elsewhere: denied");
        };
        assert!(
            retry_after <= secs(3) && retry_after > secs(2),
            "{retry_after:?}"
        );
        set(
            &p,
            "asking",
            Lease::Acquiring {
                token: 2,
                since: now,
            },
        );
        assert_eq!(
            ask(&p, "asking"),
            ProbePermit::Denied {
                retry_after: Duration::from_millis(50)
            },
            "denied for op_timeout while the answer is pending"
        );
        assert_eq!(p.fallbacks.load(Ordering::Acquire), 0);
        assert_eq!(p.denied.load(Ordering::Acquire), 2);

        // An answer that does not come within twice op_timeout: local.
        let long_ago = now.checked_sub(secs(1)).unwrap();
        set(
            &p,
            "stuck",
            Lease::Acquiring {
                token: 3,
                since: long_ago,
            },
        );
        assert_eq!(ask(&p, "stuck"), ProbePermit::Granted);
        assert_eq!(p.fallbacks.load(Ordering::Acquire), 1);
        assert!(matches!(
            p.leases.lock().unwrap()["stuck"],
            Lease::Local { .. }
        ));

        // Another replica's close makes what was learnt of its permit
        // stale, but leaves this replica's own lease alone.
        p.heard_closed("taken");
        p.heard_closed("held");
        let leases = p.leases.lock().unwrap();
        assert!(!leases.contains_key("taken"));
        assert!(leases.contains_key("held"));
    }

    #[tokio::test]
    async fn tokens_name_the_replica_and_differ() {
        let p = permits(true);
        assert!(p.value(1).starts_with("r:"));
        assert_ne!(p.value(1), p.value(2));
        assert_ne!(p.value(1), permits(true).value(1), "unique per sync");
    }
}
