//! [`ToolNames`]: which of an upstream's tools are exposed, and under what
//! name (`[upstreams.NAME]`'s `allow`, `deny` and `aliases`, behind the
//! gateway's prefix).

use std::collections::HashMap;

use globset::GlobSet;
use toolwarden_core::ConfigError;

use crate::config::{glob_set, UpstreamEntry};

/// One upstream's tool names, the server's and the exposed ones.
#[derive(Debug, Clone)]
pub struct ToolNames {
    prefix: String,
    /// `None`: every tool is allowed.
    allow: Option<GlobSet>,
    deny: GlobSet,
    /// The server's name → its alias.
    alias_of: HashMap<String, String>,
    /// An alias → the server's name.
    tool_of: HashMap<String, String>,
}

impl ToolNames {
    /// The names of `entry`'s tools, exposed behind `prefix`.
    pub fn new(prefix: String, entry: &UpstreamEntry) -> Result<Self, ConfigError> {
        let allow = if entry.allow.is_empty() {
            None
        } else {
            Some(glob_set("allow", &entry.allow)?)
        };
        Ok(ToolNames {
            prefix,
            allow,
            deny: glob_set("deny", &entry.deny)?,
            alias_of: entry
                .aliases
                .iter()
                .map(|(alias, tool)| (tool.clone(), alias.clone()))
                .collect(),
            tool_of: entry.aliases.clone().into_iter().collect(),
        })
    }

    /// The prefix of every exposed name (empty for a single upstream).
    #[must_use]
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether the server's tool `tool` is exposed at all.
    #[must_use]
    pub fn allowed(&self, tool: &str) -> bool {
        !self.deny.is_match(tool) && self.allow.as_ref().is_none_or(|allow| allow.is_match(tool))
    }

    /// The name the server's tool `tool` is exposed under; `None` if it is
    /// not exposed.
    #[must_use]
    pub fn exposed(&self, tool: &str) -> Option<String> {
        // A tool whose own name another tool's alias took is not exposed:
        // the alias answers to that name.
        if !self.allowed(tool)
            || (self.tool_of.contains_key(tool) && !self.alias_of.contains_key(tool))
        {
            return None;
        }
        let name = self.alias_of.get(tool).map_or(tool, String::as_str);
        Some(format!("{}{name}", self.prefix))
    }

    /// The server's name of the exposed tool `exposed`; `None` if no
    /// exposed tool of this upstream has that name (another upstream's,
    /// a denied one, or a tool exposed only under its alias).
    #[must_use]
    pub fn tool<'a>(&'a self, exposed: &'a str) -> Option<&'a str> {
        let name = exposed.strip_prefix(&self.prefix)?;
        let tool = match self.tool_of.get(name) {
            Some(tool) => tool.as_str(),
            None if self.alias_of.contains_key(name) => return None,
            None => name,
        };
        self.allowed(tool).then_some(tool)
    }

    /// `name` (a prompt's, a resource's) behind the prefix.
    #[must_use]
    pub fn prefixed(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(prefix: &str, toml: &str) -> ToolNames {
        let entry: UpstreamEntry = toml::from_str(toml).unwrap();
        ToolNames::new(prefix.to_owned(), &entry).unwrap()
    }

    #[test]
    fn the_prefix_goes_on_and_comes_off() {
        let n = names("time__", "command = \"x\"");
        assert_eq!(n.exposed("get_time").as_deref(), Some("time__get_time"));
        assert_eq!(n.tool("time__get_time"), Some("get_time"));
        assert_eq!(n.tool("get_time"), None);
        assert_eq!(n.tool("docs__get_time"), None);
    }

    #[test]
    fn deny_wins_over_allow_and_hides_the_tool_both_ways() {
        let n = names(
            "t__",
            "command = \"x\"\nallow = [\"get_*\", \"convert_*\"]\ndeny = [\"convert_*\"]",
        );
        assert_eq!(n.exposed("get_time").as_deref(), Some("t__get_time"));
        assert_eq!(n.exposed("convert_time"), None);
        assert_eq!(n.exposed("other"), None, "not allowed");
        assert_eq!(n.tool("t__convert_time"), None);
        assert_eq!(n.tool("t__other"), None);
    }

    #[test]
    fn an_alias_shadows_a_tool_of_the_same_name() {
        let n = names(
            "",
            "command = \"x\"\naliases = { now = \"get_current_time\" }",
        );
        assert_eq!(n.exposed("now"), None, "the server's own `now` is shadowed");
        assert_eq!(n.tool("now"), Some("get_current_time"));
        // Two aliases swapping names: each name goes to the other tool.
        let n = names("", "command = \"x\"\naliases = { a = \"b\", b = \"a\" }");
        assert_eq!(n.exposed("a").as_deref(), Some("b"));
        assert_eq!(n.tool("b"), Some("a"));
    }

    #[test]
    fn an_aliased_tool_answers_to_its_alias_only() {
        let n = names(
            "",
            "command = \"x\"\naliases = { now = \"get_current_time\" }",
        );
        assert_eq!(n.exposed("get_current_time").as_deref(), Some("now"));
        assert_eq!(n.tool("now"), Some("get_current_time"));
        assert_eq!(n.tool("get_current_time"), None);
    }
}
