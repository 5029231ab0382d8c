//! The gateway: several MCP servers behind one proxy (`[upstreams.NAME]`).
//!
//! - **Names.** Each upstream's tools are exposed as `NAME<sep>tool`
//!   (`gateway.separator`, default `__`); a single upstream keeps bare names
//!   unless `gateway.prefix_single`. Its prompts are prefixed the same way,
//!   and its resources' and resource templates' *names* (a URI is the
//!   server's and stays as it is: a read is routed by the URI, learned from
//!   the last `resources/list` and `resources/templates/list`). `allow` /
//!   `deny` globs and `aliases` apply per upstream ([`ToolNames`]); a denied
//!   tool is never listed, and a call to it is answered `-32602` without
//!   reaching its server.
//! - **One breaker per upstream**, around its connection ([`MemberService`]):
//!   it counts the connection's failures (transport errors, requests past
//!   the upstream's `attempt_timeout`) across all its tools, and while it is
//!   open every request to that upstream is refused at once with a
//!   `retry_after`. The per-tool breakers of the stack stay as they are.
//! - **A quota per upstream** (`rate_limit` in its table), outside its
//!   breaker, over every request to it; with `[redis]` the replicas share
//!   it, as they share its breaker (keyed by the upstream's name).
//! - **Visibility.** An upstream is *available* while it is connected and
//!   its breaker lets calls through. The tools of an unavailable upstream
//!   are hidden from `tools/list` (or marked, `gateway.open_upstreams =
//!   "mark"`), and every client is sent `notifications/tools/list_changed`
//!   when an upstream's availability changes (checked on every breaker
//!   transition, and every 250 ms for the connection).
//! - **The tool stack** is one, above the gateway: its per-tool layers see
//!   the exposed names (so `[tools."time__get_current_time"]`, or
//!   `[upstreams.time.tools."get_current_time"]`, configures one tool).
//!   Its innermost service is [`GatewayService`].
//! - **Other requests** are routed by the proxy's server (see
//!   [`crate::downstream::server`]): lists are merged from every available
//!   upstream (all pages at once, no cursor), `prompts/get`,
//!   `resources/read`, `completion/complete` and the task requests go to the
//!   upstream they belong to (task ids are remembered bounded overall and
//!   per session, see `src/tasks.rs`), `ping` is answered by the proxy,
//!   `logging/setLevel` and the client's notifications go to every
//!   upstream. Requests that name nothing a gateway can route (custom
//!   requests, skills, resource directories) are answered `-32601`.
//!
//! Sessions share the upstreams (`session_mode = "per_session"` is refused
//! for them).

mod lists;
mod member;
mod names;
mod service;
mod watch;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use rmcp::model::{
    ClientConfig, Implementation, PromptsCapability, ProtocolVersion, ResourcesCapability,
    ServerCapabilities, ServerConfig, ToolsCapability,
};
use serde_json::{json, Map, Value};
use tokio::sync::Notify;
use toolwarden_core::events::Event;
use toolwarden_core::{ConfigError, Events, KeyBy, SessionKey, ToolCatalog, ToolInfo};
use tower::Layer as _;

use crate::config::{in_upstream_table, upstream_breaker, upstream_quota, Config, OpenUpstreams};
use crate::downstream::Downstreams;
use crate::redact::Redactor;
use crate::stack::SharedState;
use crate::tasks::TaskTable;
use crate::upstream::{Upstream, UpstreamStatus, UpstreamTarget};

pub use lists::UNAVAILABLE_MARK;
pub use member::Member;
pub use names::ToolNames;
pub use service::{GatewayService, MemberService, TimedUpstream, UpstreamClassifier};

/// How often the gateway looks at its upstreams' connections (breaker
/// transitions are noticed at once).
const WATCH_INTERVAL: Duration = Duration::from_millis(250);

/// Resource template prefixes remembered for routing reads, over all
/// upstreams; past it, templates are listed but not routed by.
const MAX_RESOURCE_ROUTES: usize = 4096;

/// Where a resource read goes: learned from the lists.
#[derive(Default)]
struct ResourceRoutes {
    /// A resource's URI → its upstream: each upstream's from its last
    /// `resources/list` (at most `MAX_LISTED_ITEMS` each, as its list is
    /// read no further); a URI two upstreams list is the first's in the
    /// configuration's order.
    uris: HashMap<String, usize>,
    /// How many URIs the last `resources/list` found listed by two
    /// upstreams (warned of when it changes, not at every list).
    shared: usize,
    /// A template's literal start (up to its first `{`) → its upstream.
    templates: Vec<(String, usize)>,
}

/// Several upstreams behind one proxy (see the [module docs](self)).
pub struct Gateway {
    members: Vec<Member>,
    by_name: HashMap<Arc<str>, usize>,
    separator: String,
    prefixed: bool,
    open_upstreams: OpenUpstreams,
    /// The stack's catalog: every upstream's exposed tools.
    catalog: ToolCatalog,
    downstreams: Downstreams,
    resources: Mutex<ResourceRoutes>,
    /// Task id → upstream, bounded overall and per session.
    tasks: Mutex<TaskTable<SessionKey, usize>>,
    /// Poked on every transition of an upstream's breaker.
    changed: Arc<Notify>,
    watcher: OnceLock<()>,
    request_timeout: Duration,
}

impl fmt::Debug for Gateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gateway")
            .field("members", &self.members)
            .field("separator", &self.separator)
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Gateway {
    /// The upstreams of `config.upstreams` (not started), their tools
    /// exposed into `shared.catalog`, server→client traffic to
    /// `downstreams`; an upstream named in `targets` is at that target
    /// instead of its `command` or `url`. The error names the key at fault.
    pub fn new(
        config: &Config,
        shared: &SharedState,
        downstreams: Downstreams,
        mut targets: BTreeMap<String, UpstreamTarget>,
    ) -> Result<Arc<Self>, ConfigError> {
        if config.upstreams.is_empty() {
            return Err(ConfigError::new(
                "upstreams",
                "a gateway needs at least one [upstreams.NAME]",
            ));
        }
        let changed = Arc::new(Notify::new());
        let mut members = Vec::with_capacity(config.upstreams.len());
        for (name, entry) in &config.upstreams {
            let section = format!("upstreams.{}", crate::config::quote_key(name));
            let catalog = ToolCatalog::new();
            catalog.set_trusted(config.catalog.trust_annotations);
            let target = targets.remove(name).unwrap_or_else(|| entry.target());
            // Its own view of the clients: its request ids are its own.
            let view = downstreams.for_upstream();
            let upstream = Upstream::new(
                target,
                entry.connection.clone(),
                catalog.clone(),
                view.clone(),
            );
            upstream
                .check_http()
                .map_err(|e| in_upstream_table(&section, &e))?;
            let names = ToolNames::new(config.upstream_prefix(name), entry)
                .map_err(|e| e.in_section(&section))?;
            let name: Arc<str> = Arc::from(name.as_str());
            let poke = Arc::clone(&changed);
            let transitions = Events::new().with(move |event: &Event<'_>| {
                if matches!(
                    event,
                    Event::CircuitOpened { .. }
                        | Event::CircuitHalfOpened { .. }
                        | Event::CircuitClosed { .. }
                ) {
                    poke.notify_one();
                }
            });
            let key = Arc::clone(&name);
            // `[redis]`: replicas share this upstream's circuit, keyed by its name.
            let sync = match &shared.replicas {
                Some(replicas) => replicas.upstream_sync(&name)?,
                None => None,
            };
            let mut breaker = upstream_breaker(&name, &entry.circuit_breaker);
            if let Some(sync) = &sync {
                breaker = breaker.sync(Arc::new(sync.clone()));
            }
            let breaker = breaker
                .key_by(KeyBy::custom(move |_| key.to_string()))
                .events(shared.events_outside_the_stack().merge(&transitions))
                .classifier(UpstreamClassifier::default())
                .build()
                .map_err(|e| e.in_section(&format!("{section}.circuit_breaker")))?;
            if entry.circuit_breaker.enabled == Some(false) {
                breaker.registry().disable(&name);
            }
            if let Some(sync) = sync {
                sync.attach(breaker.registry().clone());
            }
            let timed = TimedUpstream::new(upstream.service(), entry.connection.attempt_timeout);
            let guarded = breaker.layer(timed);
            // Its quota, outside its breaker: a refusal is no outcome of the
            // upstream's, and never a probe.
            let service = match &entry.rate_limit {
                None => MemberService::new(guarded),
                Some(quota) => {
                    let mut limit =
                        upstream_quota(&name, quota).events(shared.events_outside_the_stack());
                    if let Some(limiter) = shared.replicas.as_ref().and_then(|r| r.limiter()) {
                        limit = limit.backend(limiter.clone());
                    }
                    let limit = limit
                        .build()
                        .map_err(|e| e.in_section(&format!("{section}.rate_limit")))?;
                    MemberService::new(limit.layer(guarded))
                }
            };
            members.push(Member {
                breaker: breaker.registry().clone(),
                service,
                name,
                upstream,
                names,
                catalog,
                announced: AtomicBool::new(false),
                downstreams: view,
            });
        }
        let by_name = members
            .iter()
            .enumerate()
            .map(|(i, m)| (Arc::clone(&m.name), i))
            .collect();
        Ok(Arc::new(Gateway {
            members,
            by_name,
            separator: config.gateway.separator.clone(),
            prefixed: config.names_prefixed(),
            open_upstreams: config.gateway.open_upstreams,
            catalog: shared.catalog.clone(),
            downstreams,
            resources: Mutex::default(),
            tasks: Mutex::default(),
            changed,
            watcher: OnceLock::new(),
            request_timeout: config.limits.request_timeout,
        }))
    }

    /// The upstreams, by name (never empty: [`new`](Self::new) refuses
    /// a configuration without one).
    #[must_use]
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The upstream called `name`.
    #[must_use]
    pub fn member(&self, name: &str) -> Option<&Member> {
        self.by_name.get(name).map(|&i| &self.members[i])
    }

    /// The innermost service of the tool stack.
    #[must_use]
    pub fn service(self: &Arc<Self>) -> GatewayService {
        GatewayService::new(Arc::clone(self))
    }

    /// The upstream whose name prefixes `name` (the only one when names
    /// are bare), and `name` without the prefix.
    fn split<'a>(&self, name: &'a str) -> Option<(usize, &'a str)> {
        if !self.prefixed {
            return (self.members.len() == 1).then_some((0, name));
        }
        let (upstream, rest) = name.split_once(self.separator.as_str())?;
        self.by_name.get(upstream).map(|&i| (i, rest))
    }

    /// The upstream of the exposed tool `name` and the server's name of it;
    /// `None` if no upstream exposes it.
    #[must_use]
    pub fn tool_route(&self, name: &str) -> Option<(&Member, String)> {
        let (i, _) = self.split(name)?;
        let member = &self.members[i];
        member
            .names
            .tool(name)
            .map(|tool| (member, tool.to_owned()))
    }

    /// Whether a call to the exposed tool `name` would reach its server
    /// now (its upstream available); unknown names are not.
    #[must_use]
    pub fn is_available(&self, name: &str) -> bool {
        self.tool_route(name)
            .is_some_and(|(member, _)| member.is_available())
    }

    /// Whether the upstream of the exposed tool `name` is connected (its
    /// breaker open or not); unknown names are not.
    #[must_use]
    pub fn is_connected(&self, name: &str) -> bool {
        self.tool_route(name).is_some_and(|(member, _)| {
            matches!(member.upstream.status(), UpstreamStatus::Up { .. })
        })
    }

    /// Whether any upstream is connected (or not yet started).
    #[must_use]
    pub fn failing(&self) -> bool {
        !self.members.iter().any(|m| {
            matches!(
                m.upstream.status(),
                UpstreamStatus::Up { .. } | UpstreamStatus::Idle
            )
        })
    }

    /// Starts every upstream as a client described by `client`, and the
    /// watcher of their availability (once).
    pub fn start(self: &Arc<Self>, client: &ClientConfig) {
        for member in &self.members {
            member.upstream.start(client.clone());
        }
        self.watcher.get_or_init(|| {
            tokio::spawn(watch::watch(
                Arc::downgrade(self),
                Arc::clone(&self.changed),
            ));
        });
    }

    /// Whether [`start`](Self::start) was called.
    #[must_use]
    pub fn is_started(&self) -> bool {
        self.members.iter().all(|m| m.upstream.is_started())
    }

    /// Waits for every upstream to connect (each up to its
    /// `connect_timeout`); fails only when none did.
    pub async fn wait_connected(&self) -> Result<(), String> {
        let waits = self.members.iter().map(|m| async move {
            let limit = m.upstream.config().connect_timeout;
            m.upstream
                .wait_connected(limit)
                .await
                .map_err(|e| format!("{}: {e}", m.name))
        });
        let results = futures::future::join_all(waits).await;
        if results.iter().any(Result::is_ok) {
            for error in results.iter().filter_map(|r| r.as_ref().err()) {
                tracing::warn!(%error, "an upstream of the gateway is not connected");
            }
            return Ok(());
        }
        Err(results
            .into_iter()
            .filter_map(Result::err)
            .collect::<Vec<_>>()
            .join("; "))
    }

    /// The gateway's `initialize` answer: the union of its upstreams'
    /// capabilities (tools always, with `listChanged`), their instructions
    /// each under its upstream's name.
    #[must_use]
    pub fn server_config(&self) -> ServerConfig {
        let mut capabilities = ServerCapabilities::default();
        let mut tools = ToolsCapability::default();
        tools.list_changed = Some(true);
        capabilities.tools = Some(tools);
        let mut instructions = Vec::new();
        for member in &self.members {
            let Some(info) = member.upstream.server_info() else {
                continue;
            };
            let theirs = &info.capabilities;
            if theirs.prompts.is_some() {
                let mut prompts = PromptsCapability::default();
                prompts.list_changed = Some(true);
                capabilities.prompts = Some(prompts);
            }
            if let Some(resources) = &theirs.resources {
                let subscribe = capabilities
                    .resources
                    .as_ref()
                    .and_then(|r| r.subscribe)
                    .unwrap_or(false)
                    || resources.subscribe.unwrap_or(false);
                let mut merged = ResourcesCapability::default();
                merged.subscribe = Some(subscribe);
                merged.list_changed = Some(true);
                capabilities.resources = Some(merged);
            }
            if theirs.logging.is_some() {
                capabilities.logging = theirs.logging.clone();
            }
            if theirs.completions.is_some() {
                capabilities.completions = theirs.completions.clone();
            }
            if let Some(text) = &info.instructions {
                instructions.push(format!("[{}] {text}", member.name));
            }
        }
        let mut config = ServerConfig::new(capabilities);
        config.protocol_version = ProtocolVersion::LATEST_WITH_INITIALIZE;
        config.server_info = Implementation::new("toolwarden-gateway", env!("CARGO_PKG_VERSION"));
        if !instructions.is_empty() {
            config.instructions = Some(instructions.join("\n"));
        }
        config
    }

    /// The `"upstream"` part of `/health`: each upstream's state and circuit.
    #[must_use]
    pub fn health_json(&self) -> Value {
        let upstreams: Map<String, Value> = self
            .members
            .iter()
            .map(|m| (m.name.to_string(), m.health_json()))
            .collect();
        json!({
            "mode": "gateway",
            "available": self.members.iter().filter(|m| m.is_available()).count(),
            "upstreams": upstreams,
        })
    }

    /// The upstreams' breakers, for `/circuits`.
    #[must_use]
    pub fn circuits_json(&self) -> Value {
        let upstreams: Map<String, Value> = self
            .members
            .iter()
            .map(|m| {
                let snapshot = m.breaker.circuit(&m.name).map_or_else(
                    || json!({"state": "closed"}),
                    |c| serde_json::to_value(c).unwrap_or(Value::Null),
                );
                (m.name.to_string(), snapshot)
            })
            .collect();
        Value::Object(upstreams)
    }

    /// A redactor scrubbing every upstream's secrets.
    #[must_use]
    pub fn redactor(&self) -> Redactor {
        self.members.iter().fold(Redactor::default(), |all, m| {
            all.merge(&m.upstream.redactor())
        })
    }

    /// Closes every upstream, each within `limit`.
    pub async fn shutdown(&self, limit: Duration) {
        futures::future::join_all(self.members.iter().map(|m| m.upstream.shutdown(limit))).await;
    }

    /// Puts each upstream's exposed tools into the stack's catalog, under
    /// its name (replacing what it had there).
    fn sync_catalog(&self) {
        for member in &self.members {
            let tools = member.catalog.tools().into_iter().filter_map(|tool| {
                let exposed = member.names.exposed(&tool.name)?;
                Some(ToolInfo {
                    name: exposed,
                    ..tool
                })
            });
            self.catalog.replace_upstream(&member.name, tools);
        }
    }

    /// Remembers that task `task_id`, created for a call of downstream
    /// session `session`, is `member`'s. Bounded overall and per
    /// session: see [`TaskTable`].
    pub(crate) fn task_created(&self, member: &Member, session: &SessionKey, task_id: &str) {
        let Some(&i) = self.by_name.get(&member.name) else {
            return;
        };
        lock(&self.tasks).insert(session, task_id, i);
    }

    /// The upstream of task `task_id`, if known.
    pub(crate) fn task_member(&self, task_id: &str) -> Option<&Member> {
        let i = lock(&self.tasks).get(task_id)?;
        self.members.get(i)
    }
}

#[cfg(test)]
mod tests;
