//! Circuit-breaker state shared across replicas.
//!
//! Each replica keeps its local breakers as the fast path. Through the
//! circuit-breaker crate's [`StateSync`] seam, every local transition is
//! queued (never blocking a call), then a background writer persists it in
//! Redis — one hash per breaker key, `origin → open-until (unix ms)` — and
//! publishes it on a channel. A subscriber task applies other replicas'
//! transitions to the local [`CircuitRegistry`] according to a
//! [`RemoteOpenPolicy`]:
//!
//! - `Follow`: every remote open opens the local circuit until the remote
//!   deadline; a remote close closes it.
//! - `Quorum(k)`: a remote open applies only while at least `k` replicas
//!   report the key open, so one bad node cannot open everyone's circuit; the
//!   local circuit then stays open until the k-th latest of their deadlines.
//!   When fewer than `k` remain, a circuit opened by the quorum is closed.
//!
//! A replica starting up (or reconnecting) loads the persisted states and
//! applies them the same way, then re-publishes its own open circuits, so
//! state written while Redis was away converges once it returns. The load
//! is bounded: at most 10 000 keys (as many as a sync tracks), found by
//! `SCAN` pages of 200 and read by pipelines of 200 `HGETALL`s, each round
//! trip one operation bounded by `op_timeout`; keys under the prefix that
//! are not breaker states, and values that are not times, are skipped, not
//! fatal. What a load leaves out is counted in
//! [`SyncStats::resync_skipped`] and reported as a `SyncFailed` event. Redis
//! failures never reach the call path: they become `SyncFailed` events and
//! the replica keeps deciding locally.
//!
//! Deadlines are absolute unix times from the publishing replica's clock;
//! replicas are assumed to keep their clocks in sync (NTP) to well within
//! an open period.
//!
//! # One probe across the fleet
//!
//! Half-open is not broadcast, but the probe is shared: when a key's open
//! period is over, a replica's breaker asks the sync for the key's **probe
//! permit** ([`StateSync::probe_permit`]), a Redis key
//! `{prefix}:cb-permit:{key}` taken with `SET … NX PX <ttl>` and a value
//! unique to this replica and request. The breaker cannot wait, so the
//! sync answers from what it knows and asks Redis in the background (see
//! [`RedisBreakerSyncBuilder::probe_permit`] for the whole contract):
//!
//! - not asked yet, or the answer pending: the call is refused as open with
//!   `retry_after` = `op_timeout` (the longest the answer takes);
//! - another replica holds the permit: refused as open until its TTL runs
//!   out (`retry_after` = Redis' `PTTL`); these refusals count as *not
//!   permitted*, never as failures;
//! - this replica holds it: the probe passes. Success closes the circuit
//!   (broadcast; the others follow) and releases the permit (a
//!   compare-and-delete script: only while Redis still holds this
//!   replica's value); failure reopens it (broadcast) and keeps the permit
//!   until it expires. A holder that dies releases nothing: the permit
//!   expires after its TTL, `probe_permit_ttl` (default 5 s) or the key's
//!   `probe_timeout` if longer, and another replica may probe.
//! - Redis does not answer in time (or is not connected): the replica
//!   probes on its own, as it did before permits existed, for one TTL,
//!   then asks Redis again; each such probe is counted in
//!   [`SyncStats::permit_fallbacks`], and the failed Redis operation is
//!   reported as a `SyncFailed` event. Nothing blocks and nothing panics.
//!
//! A closed circuit never touches the permit, and a replica holding one
//! asks Redis nothing more for its further probes until it expires.
//! Permits are kept for at most 10 000 keys (past it, a probe of a new key
//! is let through as a fallback until old leases expire).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use toolwarden_circuit_breaker::{
    CircuitRegistry, CircuitState, LocalTransition, ProbePermit, ProbeRequest, RemoteTransition,
    StateSync,
};
use toolwarden_core::ConfigError;

use crate::config::RedisConfig;
use crate::conn::{next_backoff, Conn};
use crate::permit::{permit_loop, Permits};

/// How remote opens apply locally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteOpenPolicy {
    /// Apply every remote open and close.
    Follow,
    /// Open only when at least this many replicas report the key open.
    Quorum(usize),
}

/// The most breaker keys tracked for quorum decisions; past it, reports of
/// new keys are ignored until old ones expire.
const MAX_TRACKED_KEYS: usize = 10_000;
/// The most local transitions waiting to be written; past it, they are
/// dropped (and reported), never blocking a call.
const QUEUE: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Message {
    /// Breaker key.
    k: String,
    /// Origin replica.
    o: String,
    /// Open until this unix time in ms; 0 means closed.
    u: u64,
    /// The publishing process (random, never 0); 0 when unknown (a state
    /// loaded from its hash, a replica of an earlier release). Tells a
    /// replica that another uses its `replica_id`.
    #[serde(default, skip_serializing_if = "is_zero")]
    n: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Tracker {
    /// Records this replica's own circuit `key` open until `until` (0:
    /// closed). A circuit whose breaker was dropped while open (idle keys
    /// are evicted) never reports its close: past [`MAX_TRACKED_KEYS`]
    /// keys, those whose open period has passed are forgotten.
    fn record_own(&mut self, key: &str, until: u64, now: u64) {
        if until == 0 {
            self.own.remove(key);
            return;
        }
        if self.own.len() >= MAX_TRACKED_KEYS && !self.own.contains_key(key) {
            self.own.retain(|_, open_until| *open_until > now);
        }
        self.own.insert(key.to_owned(), until);
    }

    /// Remembers that this sync opened `key` on a quorum. Past
    /// [`MAX_TRACKED_KEYS`] keys, those with no report left (their remote
    /// opens expired without a close) are forgotten: their circuits' open
    /// periods end on their own, and nothing is left to close.
    fn mark_applied(&mut self, key: &str) {
        if self.applied.len() >= MAX_TRACKED_KEYS && !self.applied.contains(key) {
            let Tracker { opens, applied, .. } = self;
            applied.retain(|k| opens.contains_key(k));
        }
        self.applied.insert(key.to_owned());
    }
}

#[derive(Default)]
struct Tracker {
    /// key → origin → open until (unix ms), for remote origins.
    opens: HashMap<String, HashMap<String, u64>>,
    /// Keys this sync opened locally on a quorum.
    applied: HashSet<String>,
    /// This replica's own open circuits: key → open until, to re-publish.
    own: HashMap<String, u64>,
}

struct Shared {
    conn: Conn,
    policy: RemoteOpenPolicy,
    permits: Arc<Permits>,
    tracker: Mutex<Tracker>,
    registry: Mutex<Option<CircuitRegistry>>,
    received: AtomicU64,
    applied: AtomicU64,
    published: AtomicU64,
    resyncs: AtomicU64,
    resync_skipped: AtomicU64,
    /// This process's mark on what it publishes (see [`Message::n`]).
    instance: u64,
    /// Whether another replica with this one's id was reported (once).
    twin_reported: std::sync::atomic::AtomicBool,
}

/// Shares circuit state through Redis. Give it to the circuit-breaker
/// builder (`.sync(sync.clone())`), then [`attach`](RedisBreakerSync::attach)
/// the built layer's registry.
///
/// It also hands out the fleet-wide probe permit (on by default, see
/// [`RedisBreakerSyncBuilder::probe_permit`]): one replica probes a
/// half-open key at a time.
///
/// Dropping every handle stops the background tasks.
#[derive(Clone)]
pub struct RedisBreakerSync {
    shared: Arc<Shared>,
    outbox: mpsc::Sender<Message>,
    tasks: Arc<Tasks>,
}

/// The background tasks (aborted when the last clone goes), and whether
/// the subscriber is among them (it is started once, by the first `attach`).
struct Tasks(Mutex<Vec<tokio::task::JoinHandle<()>>>, AtomicBool);

impl Drop for Tasks {
    fn drop(&mut self) {
        if let Ok(tasks) = self.0.lock() {
            for t in tasks.iter() {
                t.abort();
            }
        }
    }
}

impl fmt::Debug for RedisBreakerSync {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBreakerSync")
            .field("replica", &self.shared.conn.config.replica_id)
            .field("policy", &self.shared.policy)
            .field("probe_permit", &self.shared.permits.enabled())
            .field("probe_permit_ttl", &self.shared.permits.ttl())
            .field("stats", &self.stats())
            .finish()
    }
}

/// Counters of a [`RedisBreakerSync`], for tests and health reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SyncStats {
    /// Messages received from other replicas (loads included).
    pub received: u64,
    /// Remote transitions applied to the local registry.
    pub applied: u64,
    /// Local transitions written to Redis.
    pub published: u64,
    /// Completed (re)subscriptions with a state load.
    pub resyncs: u64,
    /// What the state loads left out: keys past the first 10 000 (as many
    /// as a sync tracks), keys under the prefix that are not breaker
    /// states (not hashes), fields whose value is not a time.
    pub resync_skipped: u64,
    /// Probe permits this replica won in Redis.
    pub permits_acquired: u64,
    /// Probes refused because another replica held the permit, or while it
    /// was being asked for (the breaker refuses them as open).
    pub permits_denied: u64,
    /// Probes let through without a permit because Redis did not answer in
    /// time (or the key or queue bound was reached): the local behaviour,
    /// each replica probing on its own.
    pub permit_fallbacks: u64,
}

/// The default [`RedisBreakerSyncBuilder::probe_permit_ttl`].
pub const DEFAULT_PROBE_PERMIT_TTL: Duration = Duration::from_secs(5);

/// Builds a [`RedisBreakerSync`]; [`start`](Self::start) validates it.
///
/// | knob | default | meaning |
/// |---|---|---|
/// | `policy` | [`RemoteOpenPolicy::Follow`] | how remote opens apply locally |
/// | `probe_permit` | on | one replica probes a half-open key at a time |
/// | `probe_permit_ttl` | 5 s ([`DEFAULT_PROBE_PERMIT_TTL`]), and never less than the key's `probe_timeout` | how long a permit lasts when its holder does not release it |
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use std::time::Duration;
/// use toolwarden_circuit_breaker::CircuitBreakerLayer;
/// use toolwarden_redis::{RedisBreakerSync, RedisConfig, RemoteOpenPolicy};
///
/// let config = RedisConfig::builder("redis://127.0.0.1:6379").build()?;
/// let sync = RedisBreakerSync::builder(config)
///     .policy(RemoteOpenPolicy::Quorum(2))
///     .probe_permit_ttl(Duration::from_secs(10))
///     .start()?;
/// let breakers = CircuitBreakerLayer::builder()
///     .probe_timeout(Duration::from_secs(10)) // permits last max(ttl, probe_timeout): 10 s
///     .sync(Arc::new(sync.clone()))
///     .build()?;
/// sync.attach(breakers.registry().clone());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct RedisBreakerSyncBuilder {
    config: RedisConfig,
    policy: RemoteOpenPolicy,
    probe_permit: bool,
    probe_permit_ttl: Duration,
}

impl RedisBreakerSyncBuilder {
    /// Checks the settings as [`start`](Self::start) does, without starting
    /// anything (no runtime needed). The error names the bad field.
    pub fn check(&self) -> Result<(), ConfigError> {
        if let RemoteOpenPolicy::Quorum(0) = self.policy {
            return Err(ConfigError::new("redis.quorum", "must be at least 1"));
        }
        if self.probe_permit_ttl < Duration::from_millis(1) {
            return Err(ConfigError::new(
                "redis.probe_permit_ttl",
                "must be at least 1 ms",
            ));
        }
        Ok(())
    }

    /// How remote opens apply locally. Default [`RemoteOpenPolicy::Follow`].
    pub fn policy(mut self, policy: RemoteOpenPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Whether a probe needs the fleet-wide permit. Default `true`.
    ///
    /// When a key's open period is over, a replica's breaker asks for the
    /// permit (`SET {prefix}:cb-permit:{key} <replica token> NX PX <ttl>`,
    /// in the background: the call is never kept waiting). Until the answer
    /// comes (at most `op_timeout`), and while another replica holds the
    /// permit (until its TTL runs out), the breaker refuses the key's calls
    /// as open, with that wait as `retry_after`; those refusals count as
    /// *not permitted*, never as failures. The holder probes; if the probe
    /// succeeds, its close is broadcast (the others follow it) and the
    /// permit is released (compare-and-delete: only the holder's own
    /// token); if it fails, the re-open is broadcast and the permit kept
    /// until it expires, so no other replica probes before it hears of the
    /// re-open. A holder that dies releases nothing: after the TTL another
    /// replica may probe.
    ///
    /// When Redis does not answer in time (or is not connected), the
    /// replica probes on its own (the behaviour without a permit) for one
    /// TTL, then asks Redis again; each such probe is counted in
    /// [`SyncStats::permit_fallbacks`], and the failed Redis operation is
    /// reported as a `SyncFailed` event. Nothing blocks and nothing panics.
    ///
    /// `false`: every replica probes on its own after its open period.
    pub fn probe_permit(mut self, enabled: bool) -> Self {
        self.probe_permit = enabled;
        self
    }

    /// How long a probe permit lasts unless its holder releases it: the
    /// larger of this and the asking key's `probe_timeout` (30 s by
    /// default), so that a permit outlives the probe it covers. Default 5 s
    /// ([`DEFAULT_PROBE_PERMIT_TTL`]); at least 1 ms (Redis' `PX` unit).
    ///
    /// It is the longest other replicas wait on a holder that died, and the
    /// spacing of probes when the others do not hear of a failed probe
    /// (a [`RemoteOpenPolicy::Quorum`] that one replica does not make).
    pub fn probe_permit_ttl(mut self, ttl: Duration) -> Self {
        self.probe_permit_ttl = ttl;
        self
    }

    /// Validates the settings and starts the writer and permit tasks;
    /// needs a Tokio runtime. Remote state is applied once a registry is
    /// attached. The error names the bad field.
    pub fn start(self) -> Result<RedisBreakerSync, ConfigError> {
        self.check()?;
        let conn =
            Conn::start(self.config).map_err(|e| ConfigError::new("redis.url", e.to_string()))?;
        let (permits, permit_ops) =
            Permits::new(conn.clone(), self.probe_permit, self.probe_permit_ttl);
        let permits = Arc::new(permits);
        let shared = Arc::new(Shared {
            conn,
            policy: self.policy,
            permits: Arc::clone(&permits),
            tracker: Mutex::new(Tracker::default()),
            registry: Mutex::new(None),
            received: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            published: AtomicU64::new(0),
            resyncs: AtomicU64::new(0),
            resync_skipped: AtomicU64::new(0),
            instance: fastrand::u64(1..),
            twin_reported: std::sync::atomic::AtomicBool::new(false),
        });
        let (outbox, rx) = mpsc::channel(QUEUE);
        let writer = tokio::spawn(write_loop(Arc::clone(&shared), rx));
        let permit_task = tokio::spawn(permit_loop(permits, permit_ops));
        Ok(RedisBreakerSync {
            shared,
            outbox,
            tasks: Arc::new(Tasks(
                Mutex::new(vec![writer, permit_task]),
                AtomicBool::new(false),
            )),
        })
    }
}

impl RedisBreakerSync {
    /// Starts the sync with `policy` and every other default (the same as
    /// `builder(config).policy(policy).start()`); needs a Tokio runtime.
    /// Remote state is applied once a registry is attached.
    pub fn start(config: RedisConfig, policy: RemoteOpenPolicy) -> Result<Self, ConfigError> {
        Self::builder(config).policy(policy).start()
    }

    /// A builder with every default (see [`RedisBreakerSyncBuilder`]).
    pub fn builder(config: RedisConfig) -> RedisBreakerSyncBuilder {
        RedisBreakerSyncBuilder {
            config,
            policy: RemoteOpenPolicy::Follow,
            probe_permit: true,
            probe_permit_ttl: DEFAULT_PROBE_PERMIT_TTL,
        }
    }

    /// Applies other replicas' state to `registry` from now on (loading the
    /// persisted states first). Attaching again (a reloaded stack) replaces
    /// the registry; the one subscription goes on.
    pub fn attach(&self, registry: CircuitRegistry) {
        if let Ok(mut slot) = self.shared.registry.lock() {
            *slot = Some(registry);
        }
        if let Ok(mut tasks) = self.tasks.0.lock() {
            if self.tasks.1.swap(true, Ordering::AcqRel) {
                return;
            }
            tasks.push(tokio::spawn(subscribe_loop(Arc::clone(&self.shared))));
        }
    }

    /// This replica's id.
    #[must_use]
    pub fn replica_id(&self) -> &str {
        &self.shared.conn.config.replica_id
    }

    /// Asks Redis for a `PING` on the command connection, bounded by
    /// `op_timeout`: `Err` while Redis is away (or not connected yet).
    pub async fn ping(&self) -> Result<(), crate::Unavailable> {
        self.shared.conn.ping().await
    }

    /// The counters.
    #[must_use]
    pub fn stats(&self) -> SyncStats {
        SyncStats {
            received: self.shared.received.load(Ordering::Acquire),
            applied: self.shared.applied.load(Ordering::Acquire),
            published: self.shared.published.load(Ordering::Acquire),
            resyncs: self.shared.resyncs.load(Ordering::Acquire),
            resync_skipped: self.shared.resync_skipped.load(Ordering::Acquire),
            permits_acquired: self.shared.permits.acquired.load(Ordering::Acquire),
            permits_denied: self.shared.permits.denied.load(Ordering::Acquire),
            permit_fallbacks: self.shared.permits.fallbacks.load(Ordering::Acquire),
        }
    }
}

impl StateSync for RedisBreakerSync {
    fn publish(&self, transition: &LocalTransition<'_>) {
        if matches!(
            transition.state,
            CircuitState::Closed | CircuitState::Disabled | CircuitState::MetricsOnly
        ) {
            // The probe (if any) is over and succeeded, or a manual change.
            self.shared.permits.end(transition.name);
        }
        let until = match transition.state {
            CircuitState::Open | CircuitState::ForcedOpen => {
                let retry_after = transition.retry_after.unwrap_or(Duration::from_secs(1));
                now_ms().saturating_add(u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX))
            }
            CircuitState::Closed => 0,
            // Half-open is not shared; manual states other than forced open are local.
            _ => return,
        };
        let message = Message {
            k: transition.name.to_owned(),
            o: self.shared.conn.config.replica_id.to_string(),
            u: until,
            n: self.shared.instance,
        };
        if let Ok(mut tracker) = self.shared.tracker.lock() {
            tracker.record_own(&message.k, until, now_ms());
        }
        if self.outbox.try_send(message).is_err() {
            self.shared
                .conn
                .report("breaker sync queue full: transition dropped");
        }
    }

    /// See [`RedisBreakerSyncBuilder::probe_permit`]: answered from the
    /// lease kept for the key, never waiting for Redis.
    fn probe_permit(&self, request: &ProbeRequest<'_>) -> ProbePermit {
        self.shared.permits.ask(request)
    }
}

async fn write_loop(shared: Arc<Shared>, mut rx: mpsc::Receiver<Message>) {
    while let Some(message) = rx.recv().await {
        if write(&shared, &message).await {
            shared.published.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// Persists and publishes one message. Failures are reported by `Conn::run`;
/// the state is re-published after the next reconnect.
async fn write(shared: &Shared, message: &Message) -> bool {
    let config = &shared.conn.config;
    let key = config.key("cb", &message.k);
    let channel = config.channel();
    let Ok(payload) = serde_json::to_string(message) else {
        return false;
    };
    let (origin, until) = (message.o.clone(), message.u);
    let ttl_ms = until.saturating_sub(now_ms()).max(1000) + 60_000;
    let (key, channel, origin, payload) = (&key, &channel, &origin, &payload);
    shared
        .conn
        .run("publish breaker state", |mut c| async move {
            let mut pipe = redis::pipe();
            if until > 0 {
                pipe.hset(key, origin, until).ignore();
                pipe.pexpire(key, ttl_ms as i64).ignore();
            } else {
                pipe.hdel(key, origin).ignore();
            }
            pipe.publish(channel, payload).ignore();
            pipe.query_async::<()>(&mut c).await
        })
        .await
        .is_ok()
}

async fn subscribe_loop(shared: Arc<Shared>) {
    let mut backoff = shared.conn.config.reconnect_min;
    loop {
        match shared.conn.pubsub().await {
            Ok(mut pubsub) => {
                if let Err(e) = pubsub.subscribe(shared.conn.config.channel()).await {
                    shared.conn.report(&format!("subscribe: {e}"));
                } else {
                    backoff = shared.conn.config.reconnect_min;
                    resync(&shared).await;
                    let mut messages = pubsub.on_message();
                    while let Some(msg) = messages.next().await {
                        if let Ok(message) =
                            serde_json::from_slice::<Message>(msg.get_payload_bytes())
                        {
                            receive(&shared, message);
                        }
                    }
                    shared.conn.report("subscription lost");
                }
            }
            Err(e) => shared.conn.report(&e.detail),
        }
        tokio::time::sleep(backoff).await;
        backoff = next_backoff(backoff, shared.conn.config.reconnect_max);
    }
}

/// The most breaker states a resync loads: as many keys as the tracker
/// keeps. Past it, keys are left out (and counted).
const MAX_RESYNC_KEYS: usize = MAX_TRACKED_KEYS;
/// Keys asked for in one round trip of a resync (one `SCAN` page, or one
/// pipeline of `HGETALL`s): each round trip is one operation, bounded by
/// `op_timeout` on its own.
const RESYNC_BATCH: usize = 200;

/// The breaker states persisted in Redis, as loaded by a resync.
#[derive(Debug, Default)]
struct Loaded {
    /// Key → origin replica → open until (unix ms).
    states: Vec<(String, HashMap<String, u64>)>,
    /// What was left out: keys past [`MAX_RESYNC_KEYS`], keys that are not
    /// hashes, fields whose value is not an integer.
    skipped: u64,
}

/// Loads the persisted breaker states, one bounded round trip at a time:
/// at most [`MAX_RESYNC_KEYS`] keys, found by `SCAN` pages of
/// [`RESYNC_BATCH`], read by pipelines of as many `HGETALL`s. A key that
/// is not a breaker state (another program's, under the same prefix) is
/// skipped, never the whole load. `Err` when a round trip fails.
async fn load_states(shared: &Shared) -> Result<Loaded, crate::Unavailable> {
    let config = &shared.conn.config;
    let pattern = format!("{}:cb:*", config.prefix);
    let mut loaded = Loaded::default();
    // A set: `SCAN` may return a key twice (while Redis rehashes).
    let mut keys: HashSet<String> = HashSet::new();
    let mut cursor: u64 = 0;
    loop {
        let pattern = &pattern;
        let (next, page): (u64, Vec<String>) = shared
            .conn
            .run("load breaker states", |mut c| async move {
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(RESYNC_BATCH)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        // The channel (`…:cb:events`) is no key: a key of that name is the
        // state of a tool named `events`.
        for key in page {
            if keys.len() < MAX_RESYNC_KEYS {
                keys.insert(key);
            } else if !keys.contains(&key) {
                loaded.skipped += 1;
            }
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let keys: Vec<String> = keys.into_iter().collect();
    for batch in keys.chunks(RESYNC_BATCH) {
        let replies: Vec<redis::RedisResult<HashMap<String, String>>> = shared
            .conn
            .run("load breaker states", |mut c| async move {
                let mut pipe = redis::pipe();
                pipe.ignore_errors();
                for key in batch {
                    pipe.cmd("HGETALL").arg(key);
                }
                pipe.query_async(&mut c).await
            })
            .await?;
        for (key, reply) in batch.iter().zip(replies) {
            let Ok(fields) = reply else {
                loaded.skipped += 1;
                continue;
            };
            let mut opens = HashMap::with_capacity(fields.len());
            for (origin, until) in fields {
                match until.parse::<u64>() {
                    Ok(until) => {
                        opens.insert(origin, until);
                    }
                    Err(_) => loaded.skipped += 1,
                }
            }
            loaded.states.push((key.clone(), opens));
        }
    }
    Ok(loaded)
}

/// Loads every persisted state (see [`load_states`]), then re-publishes
/// this replica's own opens.
async fn resync(shared: &Arc<Shared>) {
    // The command connection may still be reconnecting: retry briefly.
    let mut states = None;
    for _ in 0..50 {
        if let Ok(loaded) = load_states(shared).await {
            if loaded.skipped > 0 {
                shared.conn.report(&format!(
                    "load breaker states: {} left out (keys past the first {MAX_RESYNC_KEYS}, \
                     keys that are not breaker states, values that are not times)",
                    loaded.skipped
                ));
                shared
                    .resync_skipped
                    .fetch_add(loaded.skipped, Ordering::AcqRel);
            }
            states = Some(loaded.states);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let Some(states) = states else { return };
    let prefix_len = format!("{}:cb:", shared.conn.config.prefix).len();
    for (key, fields) in states {
        let name = key.get(prefix_len..).unwrap_or_default().to_owned();
        for (origin, until) in fields {
            receive(
                shared,
                Message {
                    k: name.clone(),
                    o: origin,
                    u: until,
                    n: 0,
                },
            );
        }
    }
    let own: Vec<Message> = match shared.tracker.lock() {
        Ok(t) => t
            .own
            .iter()
            .filter(|(_, until)| **until > now_ms())
            .map(|(k, u)| Message {
                k: k.clone(),
                o: shared.conn.config.replica_id.to_string(),
                u: *u,
                n: shared.instance,
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    for message in own {
        if write(shared, &message).await {
            shared.published.fetch_add(1, Ordering::AcqRel);
        }
    }
    shared.resyncs.fetch_add(1, Ordering::AcqRel);
}

/// Applies one message from another replica, per the policy.
fn receive(shared: &Shared, message: Message) {
    if *message.o == *shared.conn.config.replica_id {
        // Ours, or another process's under the same id: their states then
        // overwrite each other's field and neither applies the other's.
        if message.n != 0
            && message.n != shared.instance
            && !shared.twin_reported.swap(true, Ordering::AcqRel)
        {
            shared.conn.report(&format!(
                "another replica uses replica_id {:?} too: breaker states are not shared \
                 between the two (give each replica its own id)",
                message.o
            ));
        }
        return;
    }
    shared.received.fetch_add(1, Ordering::AcqRel);
    let now = now_ms();
    let registry = match shared.registry.lock() {
        Ok(r) => r.clone(),
        Err(_) => None,
    };
    let Some(registry) = registry else { return };
    if message.u <= now {
        shared.permits.heard_closed(&message.k);
    }
    let origin: Arc<str> = message.o.as_str().into();
    let decision = {
        let Ok(mut tracker) = shared.tracker.lock() else {
            return;
        };
        decide(&mut tracker, shared.policy, &message, now)
    };
    let applied = match decision {
        Some(Apply::Open(until)) => registry.apply_remote(
            &message.k,
            &RemoteTransition::open(Duration::from_millis(until.saturating_sub(now)), origin),
        ),
        Some(Apply::Close) => registry.apply_remote(&message.k, &RemoteTransition::closed(origin)),
        None => false,
    };
    if applied {
        shared.applied.fetch_add(1, Ordering::AcqRel);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Apply {
    Open(u64),
    Close,
}

/// The policy, as a pure function of the tracked reports (unit-tested).
fn decide(
    tracker: &mut Tracker,
    policy: RemoteOpenPolicy,
    message: &Message,
    now: u64,
) -> Option<Apply> {
    let open = message.u > now;
    match policy {
        RemoteOpenPolicy::Follow => Some(if open {
            Apply::Open(message.u)
        } else {
            Apply::Close
        }),
        RemoteOpenPolicy::Quorum(k) => {
            if open
                && !tracker.opens.contains_key(&message.k)
                && tracker.opens.len() >= MAX_TRACKED_KEYS
            {
                tracker.opens.retain(|_, origins| {
                    origins.retain(|_, until| *until > now);
                    !origins.is_empty()
                });
                if tracker.opens.len() >= MAX_TRACKED_KEYS {
                    return None;
                }
            }
            let origins = tracker.opens.entry(message.k.clone()).or_default();
            if open {
                origins.insert(message.o.clone(), message.u);
            } else {
                origins.remove(&message.o);
            }
            origins.retain(|_, until| *until > now);
            let mut deadlines: Vec<u64> = origins.values().copied().collect();
            if origins.is_empty() {
                tracker.opens.remove(&message.k);
            }
            deadlines.sort_unstable_by(|a, b| b.cmp(a));
            if deadlines.len() >= k {
                tracker.mark_applied(&message.k);
                Some(Apply::Open(deadlines[k - 1]))
            } else if tracker.applied.remove(&message.k) {
                Some(Apply::Close)
            } else {
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(k: &str, o: &str, u: u64) -> Message {
        Message {
            k: k.into(),
            o: o.into(),
            u,
            n: 0,
        }
    }

    #[test]
    fn follow_applies_everything() {
        let mut t = Tracker::default();
        assert_eq!(
            decide(
                &mut t,
                RemoteOpenPolicy::Follow,
                &msg("a", "r1", 2000),
                1000
            ),
            Some(Apply::Open(2000))
        );
        assert_eq!(
            decide(&mut t, RemoteOpenPolicy::Follow, &msg("a", "r1", 0), 1000),
            Some(Apply::Close)
        );
    }

    #[test]
    fn quorum_needs_k_distinct_live_origins() {
        let q = RemoteOpenPolicy::Quorum(2);
        let mut t = Tracker::default();
        assert_eq!(decide(&mut t, q, &msg("a", "r1", 5000), 1000), None);
        // The same origin again does not make a quorum.
        assert_eq!(decide(&mut t, q, &msg("a", "r1", 6000), 1000), None);
        // A second origin does; open until the 2nd-latest deadline.
        assert_eq!(
            decide(&mut t, q, &msg("a", "r2", 4000), 1000),
            Some(Apply::Open(4000))
        );
        // One closes: below quorum, the quorum-opened circuit closes.
        assert_eq!(
            decide(&mut t, q, &msg("a", "r2", 0), 1000),
            Some(Apply::Close)
        );
        // Expired reports do not count.
        assert_eq!(decide(&mut t, q, &msg("a", "r3", 7000), 6500), None);
    }

    #[test]
    fn quorum_of_one_is_follow_for_opens() {
        let mut t = Tracker::default();
        assert_eq!(
            decide(
                &mut t,
                RemoteOpenPolicy::Quorum(1),
                &msg("a", "r1", 2000),
                1000
            ),
            Some(Apply::Open(2000))
        );
        // A close from an origin whose open was never counted changes nothing.
        let mut t = Tracker::default();
        assert_eq!(
            decide(
                &mut t,
                RemoteOpenPolicy::Quorum(1),
                &msg("b", "r1", 0),
                1000
            ),
            None
        );
    }

    #[test]
    fn quorum_opened_keys_whose_reports_expired_are_forgotten_at_the_bound() {
        let q = RemoteOpenPolicy::Quorum(1);
        let mut t = Tracker::default();
        for n in 0..MAX_TRACKED_KEYS {
            decide(&mut t, q, &msg(&format!("k{n}"), "r1", 2000), 1000);
        }
        assert_eq!(t.applied.len(), MAX_TRACKED_KEYS);
        // Every one expired without a close; new opens still apply, and the
        // keys opened on a quorum stay bounded.
        for n in 0..MAX_TRACKED_KEYS {
            assert_eq!(
                decide(&mut t, q, &msg(&format!("new{n}"), "r1", 9000), 5000),
                Some(Apply::Open(9000))
            );
        }
        assert!(t.applied.len() <= MAX_TRACKED_KEYS, "{}", t.applied.len());
        assert!(t.applied.contains("new0") && !t.applied.contains("k0"));
    }

    #[test]
    fn own_opens_past_their_period_are_forgotten_at_the_bound() {
        let mut t = Tracker::default();
        for n in 0..MAX_TRACKED_KEYS {
            t.record_own(&format!("k{n}"), 2000, 1000);
        }
        t.record_own("k0", 0, 1000);
        assert_eq!(t.own.len(), MAX_TRACKED_KEYS - 1, "a close forgets its key");
        // Their breakers were dropped while open: no close ever came.
        for n in 0..MAX_TRACKED_KEYS {
            t.record_own(&format!("new{n}"), 9000, 5000);
        }
        assert_eq!(t.own.len(), MAX_TRACKED_KEYS);
        assert!(t.own.contains_key("new0") && !t.own.contains_key("k1"));
    }

    #[test]
    fn messages_round_trip() {
        let m = msg("search", "replica-1", 123);
        let s = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<Message>(&s).unwrap(), m);
    }
}
