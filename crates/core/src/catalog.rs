//! The tool catalog: tool name → annotations and description, with a trust
//! switch and the decisions layers take from it.
//!
//! The MCP spec calls tool annotations untrusted hints: clients must not
//! decide from the annotations of an untrusted server. So a tool is retried
//! or cached only when it is *configured* as safe, or when the catalog is
//! *trusted* and its annotations say `readOnlyHint` (or, for retries,
//! `idempotentHint`). Absent annotations take the spec's defaults: not
//! read-only, destructive, not idempotent, open world.
//!
//! Reads are lock-free (an [`arc_swap`] snapshot); updates (a `tools/list`
//! result, configuration) replace the snapshot. A catalog holds at most
//! [`MAX_CATALOG_TOOLS`] tools: past it, known tools are still updated and
//! new names are left out (a server's lists are untrusted input).
//!
//! # Several upstreams
//!
//! A gateway in front of several MCP servers keeps one catalog for all of
//! them and says which server (*upstream*) each tool belongs to
//! ([`ToolInfo::upstream`]): it registers one upstream's tools, already
//! namespaced (`time__get_current_time`), with
//! [`ToolCatalog::replace_upstream`], drops them with
//! [`ToolCatalog::remove_upstream`], and reads them back with
//! [`ToolCatalog::upstream_tools`]; each touches that upstream's tools only.
//! A proxy with a single upstream leaves the upstream unset (`None`), and
//! [`ToolCatalog::fill_from_tools_list`] manages those tools.
//!
//! ```
//! use toolwarden_core::catalog::{ToolCatalog, ToolInfo};
//! let catalog = ToolCatalog::new();
//! catalog.replace_upstream("time", [ToolInfo::new("time__get_current_time", "Current time in a timezone")]);
//! catalog.replace_upstream("weather", [
//!     ToolInfo::new("weather__forecast", "Weather forecast for a city"),
//!     ToolInfo::new("weather__alerts", "Weather alerts for a region"),
//! ]);
//! assert_eq!(catalog.upstream_of("weather__forecast").as_deref(), Some("weather"));
//! // The weather server's tools/list changed: only its tools are replaced.
//! catalog.replace_upstream("weather", [ToolInfo::new("weather__forecast", "Forecast")]);
//! assert_eq!(catalog.len(), 2);
//! assert_eq!(catalog.remove_upstream("time"), 1);
//! assert_eq!(catalog.upstreams().len(), 1);
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A tool's annotations, as sent in `tools/list`. `None` means absent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ToolAnnotations {
    /// The tool does not modify its environment. Default `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only_hint: Option<bool>,
    /// The tool may perform destructive updates. Default `true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destructive_hint: Option<bool>,
    /// Repeating the call with the same arguments has no additional effect. Default `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotent_hint: Option<bool>,
    /// The tool interacts with an open world of external entities. Default `true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_world_hint: Option<bool>,
}

/// What the catalog knows of one tool.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ToolInfo {
    /// The tool name.
    pub name: String,
    /// A human-readable title.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// The description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The annotations.
    #[serde(default)]
    pub annotations: ToolAnnotations,
    /// The names of the input schema's properties (used to rank alternatives).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parameters: Vec<String>,
    /// Whether the tool declares an `outputSchema`: a client validates the
    /// `structuredContent` of its results against it, an `isError`
    /// result's too (the TypeScript SDK does), so a failure toolwarden
    /// renders for it carries no `structuredContent` of its own.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub structured_output: bool,
    /// The upstream server the tool belongs to, when a gateway serves the
    /// tools of several (set by [`ToolCatalog::replace_upstream`], or with
    /// [`ToolInfo::upstream`]); `None` with a single upstream. Shared by
    /// every tool of one upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<Arc<str>>,
}

impl ToolInfo {
    /// A tool with a name and a description, no annotations.
    pub fn new(name: impl Into<String>, description: impl Into<String>) -> Self {
        ToolInfo {
            name: name.into(),
            description: Some(description.into()),
            ..Default::default()
        }
    }

    /// Sets the annotations.
    #[must_use]
    pub fn annotations(mut self, annotations: ToolAnnotations) -> Self {
        self.annotations = annotations;
        self
    }

    /// Sets the upstream the tool belongs to (see [`ToolInfo::upstream`](field@ToolInfo::upstream)).
    ///
    /// ```
    /// use toolwarden_core::ToolInfo;
    /// let tool = ToolInfo::new("time__get_current_time", "Current time").upstream("time");
    /// assert_eq!(tool.upstream.as_deref(), Some("time"));
    /// ```
    #[must_use]
    pub fn upstream(mut self, upstream: impl Into<Arc<str>>) -> Self {
        self.upstream = Some(upstream.into());
        self
    }

    /// Reads one tool object of a `tools/list` result (no upstream set).
    pub fn from_value(tool: &Value) -> Option<Self> {
        let name = tool.get("name")?.as_str()?.to_owned();
        let text = |k: &str| tool.get(k).and_then(Value::as_str).map(str::to_owned);
        let annotations = tool
            .get("annotations")
            .and_then(|a| serde_json::from_value(a.clone()).ok())
            .unwrap_or_default();
        let parameters = tool
            .get("inputSchema")
            .and_then(|s| s.get("properties"))
            .and_then(Value::as_object)
            .map(|props| props.keys().cloned().collect())
            .unwrap_or_default();
        Some(ToolInfo {
            name,
            title: text("title").or_else(|| {
                tool.get("annotations")
                    .and_then(|a| a.get("title"))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            }),
            description: text("description"),
            annotations,
            parameters,
            structured_output: tool.get("outputSchema").is_some_and(|s| !s.is_null()),
            upstream: None,
        })
    }
}

/// Decisions configured for a tool, overriding its annotations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolPolicy {
    /// Whether the tool may be called again after a failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub safe_to_repeat: Option<bool>,
    /// Whether the tool's results may be cached and served stale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cacheable: Option<bool>,
}

#[derive(Debug, Default)]
struct Snapshot {
    /// Bumped by every update, so users of the catalog can tell it changed.
    version: u64,
    trusted: bool,
    tools: ByName<ToolInfo>,
    policies: ByName<ToolPolicy>,
}

/// A map by tool name, read on every call by the layers that ask the
/// catalog: foldhash (seeded per process) instead of SipHash, as the
/// layers' other maps by name.
type ByName<V> = HashMap<String, V, foldhash::fast::RandomState>;

/// The most tools a catalog holds. A server's lists are untrusted input:
/// one that lists new names on every `tools/list` (or many sessions' servers
/// listing different ones into one catalog, which adds pages and never
/// removes) would otherwise grow it, and every update copies it, without
/// end. Past the bound a tool already known is still updated; a new name is
/// left out (so, with unknown tools refused, its calls are refused).
pub const MAX_CATALOG_TOOLS: usize = 10_000;

impl Snapshot {
    /// Adds or replaces `tools`, within [`MAX_CATALOG_TOOLS`]: how many of
    /// them the catalog now holds.
    fn add_tools(&mut self, tools: impl IntoIterator<Item = ToolInfo>) -> usize {
        let mut kept = 0;
        for tool in tools {
            if self.tools.len() < MAX_CATALOG_TOOLS || self.tools.contains_key(&tool.name) {
                self.tools.insert(tool.name.clone(), tool);
                kept += 1;
            }
        }
        kept
    }
}

/// A shared tool catalog. Clones share one catalog.
///
/// ```
/// use serde_json::json;
/// use toolwarden_core::catalog::{ToolCatalog, ToolPolicy};
/// let catalog = ToolCatalog::new();
/// catalog.fill_from_tools_list(&json!({"tools": [
///     {"name": "search", "annotations": {"readOnlyHint": true}},
///     {"name": "delete_file", "annotations": {"destructiveHint": true}},
/// ]}));
/// // Untrusted: annotations are ignored, spec defaults apply.
/// assert!(!catalog.is_safe_to_repeat("search"));
/// catalog.set_trusted(true);
/// assert!(catalog.is_safe_to_repeat("search") && catalog.is_cacheable("search"));
/// assert!(!catalog.is_safe_to_repeat("delete_file"));
/// // Configuration wins over annotations.
/// catalog.configure("delete_file", ToolPolicy { safe_to_repeat: Some(true), ..Default::default() });
/// assert!(catalog.is_safe_to_repeat("delete_file"));
/// ```
#[derive(Clone, Default)]
pub struct ToolCatalog {
    inner: Arc<Shared>,
}

/// What the clones of a catalog share.
#[derive(Default)]
struct Shared {
    snapshot: ArcSwap<Snapshot>,
    /// Whether any tool in the snapshot declares an `outputSchema`: read
    /// on every call (one relaxed load, no snapshot), so that only the
    /// stacks over such servers look a tool up (see
    /// [`ToolCatalog::may_have_output_schema`]).
    structured_output: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for ToolCatalog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let snap = self.inner.snapshot.load();
        f.debug_struct("ToolCatalog")
            .field("trusted", &snap.trusted)
            .field("tools", &snap.tools.len())
            .field("policies", &snap.policies.len())
            .finish()
    }
}

impl ToolCatalog {
    /// An empty, untrusted catalog.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    fn update(&self, f: impl Fn(&mut Snapshot)) {
        self.inner.snapshot.rcu(|old| {
            let mut next = Snapshot {
                version: old.version.wrapping_add(1),
                trusted: old.trusted,
                tools: old.tools.clone(),
                policies: old.policies.clone(),
            };
            f(&mut next);
            next
        });
        let structured = self
            .inner
            .snapshot
            .load()
            .tools
            .values()
            .any(|t| t.structured_output);
        self.inner
            .structured_output
            .store(structured, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether `tool` declares an `outputSchema` (its results must then
    /// carry `structuredContent` that matches it: a client validates it,
    /// an error result's too). One relaxed load when no tool of the catalog
    /// declares one.
    #[must_use]
    pub fn has_output_schema(&self, tool: &str) -> bool {
        self.may_have_output_schema()
            && self
                .inner
                .snapshot
                .load()
                .tools
                .get(tool)
                .is_some_and(|t| t.structured_output)
    }

    /// Whether any tool of the catalog declares an `outputSchema`: one
    /// relaxed load.
    #[must_use]
    pub fn may_have_output_schema(&self) -> bool {
        self.inner
            .structured_output
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A counter bumped by every change to the catalog (tools, policies or
    /// trust), so that data derived from it (an index of tool descriptions,
    /// say) can be rebuilt only when it changed. Starts at 0.
    ///
    /// ```
    /// use toolwarden_core::catalog::{ToolCatalog, ToolInfo};
    /// let catalog = ToolCatalog::new();
    /// let before = catalog.version();
    /// catalog.insert(ToolInfo::new("search", "Searches the web"));
    /// assert_ne!(catalog.version(), before);
    /// ```
    #[must_use]
    pub fn version(&self) -> u64 {
        self.inner.snapshot.load().version
    }

    /// Whether annotations are trusted. Default `false`.
    #[must_use]
    pub fn is_trusted(&self) -> bool {
        self.inner.snapshot.load().trusted
    }

    /// Trusts (or stops trusting) the server's annotations.
    pub fn set_trusted(&self, trusted: bool) {
        self.update(|s| s.trusted = trusted);
    }

    /// Replaces the tools of a single upstream with those of its
    /// `tools/list` result (`{"tools": [...]}`), keeping configured
    /// policies. Returns how many tools were read; malformed entries are
    /// skipped.
    ///
    /// It replaces the tools with no [`upstream`](field@ToolInfo::upstream)
    /// (with a single upstream: every tool) and keeps those registered under
    /// a named upstream ([`replace_upstream`](Self::replace_upstream)); a
    /// listed tool with the name of one of those takes its place.
    pub fn fill_from_tools_list(&self, result: &Value) -> usize {
        let tools: HashMap<String, ToolInfo> = result
            .get("tools")
            .and_then(Value::as_array)
            .map(|list| list.iter().filter_map(ToolInfo::from_value))
            .into_iter()
            .flatten()
            .map(|t| (t.name.clone(), t))
            .collect();
        let n = tools.len();
        self.update(|s| {
            s.tools.retain(|_, t| t.upstream.is_some());
            s.add_tools(tools.values().cloned());
        });
        n
    }

    /// Registers the tools of the upstream named `upstream`, replacing every
    /// tool registered under that name before and leaving the other
    /// upstreams' tools alone (a gateway refreshing one server's
    /// `tools/list`). Each tool's [`upstream`](field@ToolInfo::upstream) is
    /// set to `upstream`, whatever it was. Names are taken as they are (a
    /// gateway namespaces them first, `time__get_current_time`); a tool with
    /// the name of another upstream's tool replaces it. Configured policies
    /// are kept. Returns how many distinct tools are now registered under
    /// `upstream`.
    ///
    /// ```
    /// use toolwarden_core::catalog::{ToolCatalog, ToolInfo};
    /// let catalog = ToolCatalog::new();
    /// catalog.replace_upstream("a", [ToolInfo::new("a__search", "Search"), ToolInfo::new("a__read", "Read")]);
    /// catalog.replace_upstream("b", [ToolInfo::new("b__search", "Search")]);
    /// assert_eq!(catalog.replace_upstream("a", [ToolInfo::new("a__search", "Search v2")]), 1);
    /// let names: Vec<_> = catalog.tools().into_iter().map(|t| t.name).collect();
    /// assert_eq!(names, ["a__search", "b__search"]);
    /// ```
    pub fn replace_upstream(
        &self,
        upstream: &str,
        tools: impl IntoIterator<Item = ToolInfo>,
    ) -> usize {
        let name: Arc<str> = Arc::from(upstream);
        let tools: HashMap<String, ToolInfo> = tools
            .into_iter()
            .map(|mut t| {
                t.upstream = Some(Arc::clone(&name));
                (t.name.clone(), t)
            })
            .collect();
        // Set by the update that took effect (an update may be retried).
        let registered = std::cell::Cell::new(0);
        self.update(|s| {
            s.tools
                .retain(|_, t| t.upstream.as_deref() != Some(upstream));
            registered.set(s.add_tools(tools.values().cloned()));
        });
        registered.get()
    }

    /// Removes every tool registered under `upstream` (a server that left
    /// the gateway's configuration), leaving the others. Returns how many
    /// were removed; the catalog is not changed (its
    /// [`version`](Self::version) not bumped) when there were none.
    #[allow(clippy::must_use_candidate)] // removes the tools: the count is only informative
    pub fn remove_upstream(&self, upstream: &str) -> usize {
        let of_upstream = |t: &ToolInfo| t.upstream.as_deref() == Some(upstream);
        let n = self
            .inner
            .snapshot
            .load()
            .tools
            .values()
            .filter(|t| of_upstream(t))
            .count();
        if n > 0 {
            self.update(|s| s.tools.retain(|_, t| !of_upstream(t)));
        }
        n
    }

    /// Whether any tool is registered under the upstream named `upstream`
    /// (its `tools/list` has come, and listed something).
    ///
    /// ```
    /// use toolwarden_core::catalog::{ToolCatalog, ToolInfo};
    /// let catalog = ToolCatalog::new();
    /// catalog.replace_upstream("a", [ToolInfo::new("a__search", "Search")]);
    /// assert!(catalog.has_upstream("a"));
    /// assert!(!catalog.has_upstream("b"));
    /// ```
    #[must_use]
    pub fn has_upstream(&self, upstream: &str) -> bool {
        self.inner
            .snapshot
            .load()
            .tools
            .values()
            .any(|t| t.upstream.as_deref() == Some(upstream))
    }

    /// The tools registered under `upstream`, sorted by name.
    #[must_use]
    pub fn upstream_tools(&self, upstream: &str) -> Vec<ToolInfo> {
        let mut tools: Vec<_> = self
            .inner
            .snapshot
            .load()
            .tools
            .values()
            .filter(|t| t.upstream.as_deref() == Some(upstream))
            .cloned()
            .collect();
        tools.sort_by(|a, b| a.name.cmp(&b.name));
        tools
    }

    /// The upstream `tool` is registered under; `None` for an unknown tool
    /// or one with no upstream.
    #[must_use]
    pub fn upstream_of(&self, tool: &str) -> Option<Arc<str>> {
        self.inner.snapshot.load().tools.get(tool)?.upstream.clone()
    }

    /// The name of every upstream with at least one tool, sorted.
    #[must_use]
    pub fn upstreams(&self) -> Vec<Arc<str>> {
        let mut names: Vec<Arc<str>> = self
            .inner
            .snapshot
            .load()
            .tools
            .values()
            .filter_map(|t| t.upstream.clone())
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    /// Adds or replaces one tool (with the upstream it carries, if any).
    pub fn insert(&self, tool: ToolInfo) {
        self.update(|s| {
            s.add_tools([tool.clone()]);
        });
    }

    /// Adds or replaces several tools at once (one page of a paginated
    /// `tools/list`, say), keeping the others.
    pub fn extend(&self, tools: impl IntoIterator<Item = ToolInfo>) {
        let tools: Vec<ToolInfo> = tools.into_iter().collect();
        if tools.is_empty() {
            return;
        }
        self.update(|s| {
            s.add_tools(tools.iter().cloned());
        });
    }

    /// Configures the policy of a tool (it need not be listed yet).
    pub fn configure(&self, tool: &str, policy: ToolPolicy) {
        self.update(|s| {
            s.policies.insert(tool.to_owned(), policy);
        });
    }

    /// What the catalog knows of a tool.
    #[must_use]
    pub fn get(&self, tool: &str) -> Option<ToolInfo> {
        self.inner.snapshot.load().tools.get(tool).cloned()
    }

    /// Every known tool, sorted by name.
    #[must_use]
    pub fn tools(&self) -> Vec<ToolInfo> {
        let mut tools: Vec<_> = self.inner.snapshot.load().tools.values().cloned().collect();
        tools.sort_by(|a, b| a.name.cmp(&b.name));
        tools
    }

    /// The number of known tools.
    #[must_use]
    pub fn len(&self) -> usize {
        self.inner.snapshot.load().tools.len()
    }

    /// Whether no tool is known.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a failed call of `tool` may be made again: configured so,
    /// or trusted annotations say read-only or idempotent.
    #[must_use]
    pub fn is_safe_to_repeat(&self, tool: &str) -> bool {
        let snap = self.inner.snapshot.load();
        if let Some(safe) = snap.policies.get(tool).and_then(|p| p.safe_to_repeat) {
            return safe;
        }
        snap.trusted
            && snap.tools.get(tool).is_some_and(|t| {
                t.annotations.read_only_hint == Some(true)
                    || t.annotations.idempotent_hint == Some(true)
            })
    }

    /// Whether a call of `tool` may be sent twice at once (hedged), a
    /// stricter test than [`is_safe_to_repeat`](Self::is_safe_to_repeat):
    /// configured safe to repeat (the operator's decision, which covers
    /// hedging too), or trusted annotations that say both read-only **and**
    /// idempotent. A tool whose only hint is `idempotentHint` may still
    /// change its environment, and two copies of it run concurrently, not
    /// one after the other; a read-only tool without `idempotentHint`
    /// (absent means `false`) may answer differently each time. Either can
    /// be hedged by configuration.
    ///
    /// ```
    /// use serde_json::json;
    /// use toolwarden_core::catalog::{ToolCatalog, ToolPolicy};
    /// let catalog = ToolCatalog::new();
    /// catalog.fill_from_tools_list(&json!({"tools": [
    ///     {"name": "lookup", "annotations": {"readOnlyHint": true, "idempotentHint": true}},
    ///     {"name": "search", "annotations": {"readOnlyHint": true}},
    /// ]}));
    /// assert!(!catalog.is_safe_to_hedge("lookup")); // untrusted
    /// catalog.set_trusted(true);
    /// assert!(catalog.is_safe_to_hedge("lookup"));
    /// assert!(catalog.is_safe_to_repeat("search") && !catalog.is_safe_to_hedge("search"));
    /// catalog.configure("search", ToolPolicy { safe_to_repeat: Some(true), ..Default::default() });
    /// assert!(catalog.is_safe_to_hedge("search"));
    /// ```
    #[must_use]
    pub fn is_safe_to_hedge(&self, tool: &str) -> bool {
        let snap = self.inner.snapshot.load();
        if let Some(safe) = snap.policies.get(tool).and_then(|p| p.safe_to_repeat) {
            return safe;
        }
        snap.trusted
            && snap.tools.get(tool).is_some_and(|t| {
                t.annotations.read_only_hint == Some(true)
                    && t.annotations.idempotent_hint == Some(true)
            })
    }

    /// Whether results of `tool` may be cached and served stale: configured
    /// so, or trusted annotations say read-only. A tool whose annotations
    /// (trusted or not) explicitly say `destructiveHint: true` without
    /// `readOnlyHint: true` is never cacheable, whatever the configuration.
    #[must_use]
    pub fn is_cacheable(&self, tool: &str) -> bool {
        let snap = self.inner.snapshot.load();
        let info = snap.tools.get(tool);
        let declared_destructive = info.is_some_and(|t| {
            t.annotations.destructive_hint == Some(true)
                && t.annotations.read_only_hint != Some(true)
        });
        if declared_destructive {
            return false;
        }
        if let Some(cacheable) = snap.policies.get(tool).and_then(|p| p.cacheable) {
            return cacheable;
        }
        snap.trusted && info.is_some_and(|t| t.annotations.read_only_hint == Some(true))
    }

    /// Whether `tool` may change its environment destructively, with the
    /// spec's default (`true`) unless trusted annotations or configuration
    /// say otherwise.
    #[must_use]
    pub fn is_destructive(&self, tool: &str) -> bool {
        if self.is_cacheable(tool) {
            return false;
        }
        let snap = self.inner.snapshot.load();
        if !snap.trusted {
            return true;
        }
        snap.tools.get(tool).is_none_or(|t| {
            t.annotations.read_only_hint != Some(true)
                && t.annotations.destructive_hint != Some(false)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_upstream_registered_near_the_bound_counts_only_the_tools_that_fit() {
        let c = ToolCatalog::new();
        c.extend((0..MAX_CATALOG_TOOLS - 3).map(|n| ToolInfo::new(format!("t{n}"), "")));
        let registered =
            c.replace_upstream("b", (0..100).map(|n| ToolInfo::new(format!("b__{n}"), "")));
        assert_eq!(registered, 3);
        assert_eq!(c.upstream_tools("b").len(), 3);
    }

    #[test]
    fn a_server_listing_new_names_every_time_never_grows_the_catalog_past_its_bound() {
        let c = ToolCatalog::new();
        for page in 0..30 {
            c.extend((0..500).map(|n| ToolInfo::new(format!("p{page}-t{n}"), "")));
        }
        assert_eq!(c.tools().len(), MAX_CATALOG_TOOLS);
        // A known tool is still updated at the bound; a new name is left out.
        c.insert(ToolInfo::new("p0-t0", "updated"));
        c.insert(ToolInfo::new("new", ""));
        assert_eq!(
            c.get("p0-t0").and_then(|t| t.description),
            Some("updated".to_owned())
        );
        assert!(c.get("new").is_none());
        assert_eq!(c.tools().len(), MAX_CATALOG_TOOLS);
        // An upstream's count says what was registered.
        let left = c.replace_upstream(
            "a",
            (0..MAX_CATALOG_TOOLS).map(|n| ToolInfo::new(format!("a__{n}"), "")),
        );
        assert_eq!(left, 0, "the catalog was full");
        let list: Vec<Value> = (0..MAX_CATALOG_TOOLS + 10)
            .map(|n| json!({"name": format!("x{n}")}))
            .collect();
        assert_eq!(
            c.fill_from_tools_list(&json!({ "tools": list })),
            MAX_CATALOG_TOOLS + 10,
            "read"
        );
        assert_eq!(c.tools().len(), MAX_CATALOG_TOOLS, "kept");
    }

    fn catalog() -> ToolCatalog {
        let c = ToolCatalog::new();
        let n = c.fill_from_tools_list(&json!({"tools": [
            {"name": "read", "description": "reads", "annotations": {"readOnlyHint": true},
             "inputSchema": {"type": "object", "properties": {"path": {"type": "string"}}}},
            {"name": "put", "annotations": {"idempotentHint": true, "destructiveHint": false}},
            {"name": "rm", "annotations": {"destructiveHint": true}},
            {"name": "bare"},
            {"description": "no name: skipped"},
        ]}));
        assert_eq!(n, 4);
        c
    }

    #[test]
    fn untrusted_uses_the_spec_defaults() {
        let c = catalog();
        for tool in ["read", "put", "rm", "bare", "unknown"] {
            assert!(!c.is_safe_to_repeat(tool), "{tool}");
            assert!(!c.is_cacheable(tool), "{tool}");
            assert!(c.is_destructive(tool), "{tool}");
        }
    }

    #[test]
    fn trusted_follows_annotations() {
        let c = catalog();
        c.set_trusted(true);
        assert!(c.is_safe_to_repeat("read") && c.is_cacheable("read"));
        assert!(c.is_safe_to_repeat("put") && !c.is_cacheable("put"));
        assert!(!c.is_destructive("put"));
        assert!(!c.is_safe_to_repeat("rm") && !c.is_cacheable("rm") && c.is_destructive("rm"));
        assert!(!c.is_safe_to_repeat("bare") && c.is_destructive("bare"));
        assert_eq!(c.get("read").unwrap().parameters, ["path"]);
    }

    #[test]
    fn configuration_overrides_but_never_caches_a_declared_destructive_tool() {
        let c = catalog();
        let yes = ToolPolicy {
            safe_to_repeat: Some(true),
            cacheable: Some(true),
        };
        c.configure("bare", yes);
        c.configure("rm", yes);
        assert!(c.is_safe_to_repeat("bare") && c.is_cacheable("bare"));
        assert!(c.is_safe_to_repeat("rm"));
        assert!(!c.is_cacheable("rm"));
        // A later tools/list keeps the configuration.
        c.fill_from_tools_list(&json!({"tools": [{"name": "bare"}]}));
        assert!(c.is_cacheable("bare"));
        assert_eq!(c.len(), 1);
    }

    fn names(tools: &[ToolInfo]) -> Vec<&str> {
        tools.iter().map(|t| t.name.as_str()).collect()
    }

    #[test]
    fn each_upstream_is_replaced_and_removed_on_its_own() {
        let c = ToolCatalog::new();
        // A tool that claims another upstream is registered under this one.
        let n = c.replace_upstream(
            "time",
            [
                ToolInfo::new("time__now", "Current time"),
                ToolInfo::new("time__convert", "Convert a time").upstream("elsewhere"),
            ],
        );
        assert_eq!(n, 2);
        c.replace_upstream("weather", [ToolInfo::new("weather__forecast", "Forecast")]);
        assert_eq!(c.upstream_of("time__convert").as_deref(), Some("time"));
        assert_eq!(c.upstream_of("unknown"), None);
        assert_eq!(
            names(&c.upstream_tools("time")),
            ["time__convert", "time__now"]
        );
        assert!(c.upstream_tools("elsewhere").is_empty());

        // A refresh of one upstream replaces its tools only.
        assert_eq!(
            c.replace_upstream("time", [ToolInfo::new("time__now", "Now")]),
            1
        );
        assert_eq!(names(&c.tools()), ["time__now", "weather__forecast"]);
        assert_eq!(
            c.get("time__now").unwrap().description.as_deref(),
            Some("Now")
        );

        let upstreams = c.upstreams();
        assert_eq!(
            upstreams.iter().map(|u| &**u).collect::<Vec<_>>(),
            ["time", "weather"]
        );

        let version = c.version();
        assert_eq!(c.remove_upstream("nope"), 0);
        assert_eq!(c.version(), version, "nothing removed, nothing changed");
        assert_eq!(c.remove_upstream("time"), 1);
        assert_ne!(c.version(), version);
        assert_eq!(names(&c.tools()), ["weather__forecast"]);
        // An empty refresh leaves the upstream with no tools.
        assert_eq!(c.replace_upstream("weather", []), 0);
        assert!(c.is_empty() && c.upstreams().is_empty());
    }

    #[test]
    fn a_tools_list_replaces_the_tools_with_no_upstream_only() {
        let c = catalog();
        c.replace_upstream("remote", [ToolInfo::new("remote__search", "Search")]);
        c.fill_from_tools_list(&json!({"tools": [{"name": "read"}]}));
        assert_eq!(names(&c.tools()), ["read", "remote__search"]);
        assert_eq!(c.upstream_of("read"), None);
        // A listed tool with the name of an upstream's tool takes its place.
        c.fill_from_tools_list(&json!({"tools": [{"name": "remote__search"}]}));
        assert_eq!(names(&c.tools()), ["remote__search"]);
        assert_eq!(c.upstream_of("remote__search"), None);
        assert!(c.upstreams().is_empty());
    }

    #[test]
    fn the_upstream_round_trips_through_serde_and_is_left_out_when_unset() {
        let tool = ToolInfo::new("time__now", "Now").upstream("time");
        let value = serde_json::to_value(&tool).unwrap();
        assert_eq!(value["upstream"], "time");
        assert_eq!(serde_json::from_value::<ToolInfo>(value).unwrap(), tool);
        let bare = serde_json::to_value(ToolInfo::new("now", "Now")).unwrap();
        assert!(bare.get("upstream").is_none());
        assert_eq!(
            ToolInfo::from_value(&json!({"name": "x", "upstream": "y"}))
                .unwrap()
                .upstream,
            None
        );
    }
}
