//! `[gateway]` and `[upstreams.NAME]`: several MCP servers behind one proxy.
//! Checked in [`Config::validate`](super::Config::validate).
//!
//! ```toml
//! [gateway]
//! separator = "__"          # tools are exposed as NAME__tool
//! open_upstreams = "hide"   # or "mark"
//!
//! [upstreams.time]
//! command = "mcp-server-time"
//! deny = ["convert_*"]
//! aliases = { now = "get_current_time" }
//! circuit_breaker = { failure_threshold = 3, reset_timeout = "10s" }
//!
//! [upstreams.docs]
//! url = "https://docs.example.com/mcp"
//! connect_timeout = "5s"    # any [upstream] key, for this upstream
//!
//! [upstreams.docs.tools."search"]   # the layers' per-tool keys, for docs__search
//! safe_to_repeat = true
//! ```

use std::collections::BTreeMap;

use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};
use toolwarden_core::ConfigError;

use toolwarden::circuit_breaker::{CircuitBreakerLayer, CircuitBreakerSettings};
use toolwarden::rate_limit::{QuotaSettings, RateLimitBuilder, RateLimitLayer};

use super::{SessionMode, ToolConfig, UpstreamConfig};

/// Why `session_mode = "per_session"` is refused in a gateway, in
/// `[upstream]` and in `[upstreams.NAME]` alike.
pub(super) const PER_SESSION_REFUSED: &str = "a gateway's upstreams are shared by every session \
     (`per_session` is for a single upstream given on the command line)";

/// `[gateway]`: how the tools of several upstreams are exposed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Between an upstream's name and its tool's (`time__get_current_time`);
    /// also the prefix of its prompts' and resources' names. Default `"__"`.
    /// Not empty; no upstream name may contain it, nor end with its start
    /// (`a_` and `__`: `a___x` is split at its first `__`).
    pub separator: String,
    /// What `tools/list` does with the tools of an upstream that is down or
    /// whose circuit is open: `"hide"` them (the default) or `"mark"` them
    /// (listed, their description starting `[unavailable]`). Either way the
    /// clients are sent `notifications/tools/list_changed` when it changes.
    pub open_upstreams: OpenUpstreams,
    /// With a single `[upstreams.NAME]`, prefix its tools with `NAME` all the
    /// same. Default `false`: one upstream keeps bare names, as a proxy
    /// started with a command line does.
    pub prefix_single: bool,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            separator: "__".to_owned(),
            open_upstreams: OpenUpstreams::Hide,
            prefix_single: false,
        }
    }
}

/// `gateway.open_upstreams`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpenUpstreams {
    /// Left out of `tools/list`.
    #[default]
    Hide,
    /// Listed, the description starting `[unavailable]`.
    Mark,
}

/// `[upstreams.NAME]`: one upstream server of a gateway.
///
/// Besides its own keys, it takes every `[upstream]` key (`connect_timeout`,
/// `headers`, `ca_file`, ...) for this upstream alone; unset ones have the
/// defaults written in [`UpstreamConfig`] (not the values of the file's
/// `[upstream]` section, which is for an upstream given on the command line).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UpstreamEntry {
    /// The server's command (a child process over stdio). Either this or `url`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// The command's arguments.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// The server's Streamable HTTP(S) endpoint. Either this or `command`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Globs over the server's tool names (`get_*`): when not empty, only
    /// matching tools are exposed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Globs over the server's tool names: matching tools are never exposed,
    /// and a call to one is answered `-32602` without reaching the server.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    /// Exposed name → the server's tool name (`now = "get_current_time"`):
    /// the tool is exposed under the alias only.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub aliases: BTreeMap<String, String>,
    /// The upstream's own circuit breaker, around its connection: it counts
    /// transport failures and timeouts of every request to this upstream
    /// (not the server's error answers), and while it is open every request
    /// to it is refused at once and its tools are hidden (or marked). Unset
    /// keys are the breaker's defaults (5 consecutive failures open it for
    /// 30 s), except `minimum_calls`, 1 here (a dead upstream fails every
    /// call, however few came before), and `failure_rate_threshold`, off
    /// unless set. `enabled = false`: no breaker for this upstream (its
    /// circuit is disabled).
    pub circuit_breaker: CircuitBreakerSettings,
    /// A quota on every request to this upstream (all its tools and
    /// methods, every client): `{ rate = "20/s", burst = 5 }`. Past it a
    /// request is refused with a `retry_after` (a rate-limited answer, not
    /// a failure of the upstream); with `[redis]` the replicas share it.
    /// Unset: no quota of its own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<QuotaSettings>,
    /// Per-tool overrides for this upstream's tools, by the exposed name
    /// without the prefix: `[upstreams.docs.tools."search"]` is
    /// `[tools."docs__search"]`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub tools: BTreeMap<String, ToolConfig>,
    /// Every `[upstream]` key, for this upstream.
    #[serde(flatten)]
    pub connection: UpstreamConfig,
    /// Keys none of the above took: refused by `validate` (`deny_unknown_fields`
    /// does not work with `flatten`).
    #[serde(flatten, skip_serializing)]
    pub unknown: BTreeMap<String, toml::Value>,
}

/// An upstream name: letters, digits, `-` and `_`, at most 64 bytes.
pub(super) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The globs of `patterns` as one set; the error names `key` and the glob.
pub(crate) fn glob_set(key: &str, patterns: &[String]) -> Result<GlobSet, ConfigError> {
    let mut set = GlobSetBuilder::new();
    for pattern in patterns {
        let glob = Glob::new(pattern)
            .map_err(|e| ConfigError::new(key, format!("{pattern:?} is not a glob: {e}")))?;
        set.add(glob);
    }
    set.build()
        .map_err(|e| ConfigError::new(key, format!("the globs do not build: {e}")))
}

impl GatewayConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.separator.is_empty() {
            return Err(ConfigError::new("separator", "must not be empty"));
        }
        if self.separator.len() > 8 || self.separator.chars().any(char::is_whitespace) {
            return Err(ConfigError::new(
                "separator",
                "at most 8 bytes, without white space",
            ));
        }
        Ok(())
    }
}

impl UpstreamEntry {
    /// Checks the entry (the error's key is relative to it).
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(key) = self.unknown.keys().next() {
            return Err(ConfigError::new(key.as_str(), "unknown key"));
        }
        match (&self.command, &self.url) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "url",
                    "give either `command` or `url`, not both",
                ))
            }
            (None, None) => {
                return Err(ConfigError::new(
                    "command",
                    "give the server's `command` or `url`",
                ))
            }
            (Some(command), None) if command.is_empty() => {
                return Err(ConfigError::new("command", "must not be empty"))
            }
            (None, Some(url)) => {
                let scheme = reqwest::Url::parse(url).map(|u| u.scheme().to_owned());
                if !matches!(scheme.as_deref(), Ok("http" | "https")) {
                    return Err(ConfigError::new(
                        "url",
                        format!(
                            "must be an http:// or https:// URL, got {}",
                            crate::redact::redact_url(url)
                        ),
                    ));
                }
            }
            (Some(_), None) => {}
        }
        if self.connection.session_mode == SessionMode::PerSession {
            return Err(ConfigError::new("session_mode", PER_SESSION_REFUSED));
        }
        self.connection.validate()?;
        let _ = glob_set("allow", &self.allow)?;
        let deny = glob_set("deny", &self.deny)?;
        for (alias, tool) in &self.aliases {
            let key = format!("aliases.{}", super::quote_key(alias));
            if alias.is_empty() || tool.is_empty() {
                return Err(ConfigError::new(key, "an alias and its tool are not empty"));
            }
            if deny.is_match(tool) {
                return Err(ConfigError::new(key, format!("{tool:?} is denied")));
            }
        }
        let mut targets: BTreeMap<&str, &str> = BTreeMap::new();
        for (alias, tool) in &self.aliases {
            if let Some(other) = targets.insert(tool, alias) {
                return Err(ConfigError::new(
                    format!("aliases.{}", super::quote_key(alias)),
                    format!("{tool:?} already has the alias {other:?}"),
                ));
            }
        }
        let _ = upstream_breaker("", &self.circuit_breaker)
            .build()
            .map_err(|e| e.in_section("circuit_breaker"))?;
        if let Some(quota) = &self.rate_limit {
            let _ = upstream_quota("", quota)
                .build()
                .map_err(|e| e.in_section("rate_limit"))?;
        }
        if self.tools.contains_key("") {
            return Err(ConfigError::new(
                r#"tools."""#,
                "a tool name must not be empty",
            ));
        }
        // The tool tables are checked by the layers, as the exposed tools'.
        Ok(())
    }

    /// Where the server is.
    #[must_use]
    pub fn target(&self) -> crate::UpstreamTarget {
        match (&self.url, &self.command) {
            (Some(url), _) => crate::UpstreamTarget::Url(url.clone()),
            (None, command) => crate::UpstreamTarget::Command {
                program: command.clone().unwrap_or_default().into(),
                args: self.args.iter().map(Into::into).collect(),
            },
        }
    }
}

/// The builder of an upstream's own breaker (see
/// [`UpstreamEntry::circuit_breaker`]): named `upstream NAME`, opening on
/// consecutive failures alone, then `settings`.
pub(crate) fn upstream_breaker(
    name: &str,
    settings: &CircuitBreakerSettings,
) -> toolwarden::circuit_breaker::CircuitBreakerBuilder {
    CircuitBreakerLayer::builder()
        .name(format!("upstream {name}"))
        // Consecutive failures open it however few calls came before (a
        // dead upstream fails every call); no failure rate unless set.
        .minimum_calls(1)
        .failure_rate_threshold(None)
        .settings(settings)
}

/// An error about an `[upstream]` key (`upstream.headers.X`), as the key of
/// the upstream table `section` (`upstreams."docs".headers.X`).
pub(crate) fn in_upstream_table(section: &str, error: &ConfigError) -> ConfigError {
    let field = error.field();
    let field = field.strip_prefix("upstream.").unwrap_or(field);
    ConfigError::new(format!("{section}.{field}"), error.reason())
}

/// The builder of an upstream's own quota (see
/// [`UpstreamEntry::rate_limit`]): one key, `upstream:NAME` (apart from any
/// tool's in a shared Redis), refusing at once past `quota`.
pub(crate) fn upstream_quota(name: &str, quota: &QuotaSettings) -> RateLimitBuilder {
    let key = format!("upstream:{name}");
    let (rate, burst) = quota.quota();
    RateLimitLayer::builder()
        .key_by(toolwarden_core::KeyBy::custom(move |_| key.clone()))
        .limit_all_methods(true)
        .per_tool(rate, burst)
}
