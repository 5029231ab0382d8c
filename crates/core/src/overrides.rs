//! Per-tool overrides: the one mechanism behind every layer builder's
//! `.tool(name, |b| …)`.
//!
//! A builder with per-tool settings keeps a [`ToolOverrides`] of closures
//! and implements [`Overridable`]. At `build`, [`ToolOverrides::resolve`]
//! hands each tool's closures (in the order given, several calls for one
//! tool chained) a fresh builder carrying the outer builder's final values,
//! so the order of the builder calls does not matter, then checks what the
//! closures returned. Errors name the tool's field as
//! `tools."<tool>".<field>`, the tool name quoted as a TOML key would be.
//!
//! A knob that cannot differ per tool (a bound, an event sink, a key
//! function) is *layer-wide*: its setter calls
//! [`ToolOverrides::layer_wide`], and a tool's closure that sets it is
//! refused at `build` (`tools."<tool>".<knob>`), never silently ignored.
//!
//! ```
//! use toolwarden_core::overrides::{Overridable, ToolOverrides};
//! use toolwarden_core::ConfigError;
//!
//! #[derive(Default)]
//! struct Builder {
//!     attempts: u32,
//!     tools: ToolOverrides<Builder>,
//! }
//!
//! impl Overridable for Builder {
//!     fn overrides(&mut self) -> &mut ToolOverrides<Self> {
//!         &mut self.tools
//!     }
//! }
//!
//! impl Builder {
//!     /// Layer-wide: refused in a tool's closure.
//!     fn seed(mut self, _seed: u64) -> Self {
//!         self.tools.layer_wide("seed");
//!         self
//!     }
//!
//!     fn attempts(mut self, attempts: u32) -> Self {
//!         self.attempts = attempts;
//!         self
//!     }
//!
//!     fn tool(mut self, tool: &str, configure: impl FnOnce(Builder) -> Builder + Send + 'static) -> Self {
//!         self.tools.push(tool, configure);
//!         self
//!     }
//!
//!     fn build(mut self) -> Result<Vec<(Box<str>, u32)>, ConfigError> {
//!         let attempts = self.attempts;
//!         std::mem::take(&mut self.tools).resolve(
//!             || Builder { attempts, ..Builder::default() },
//!             |b| match b.attempts {
//!                 0 => Err(ConfigError::new("attempts", "must be at least 1")),
//!                 n => Ok(n),
//!             },
//!         )
//!     }
//! }
//!
//! let tools = Builder::default()
//!     .tool("search", |b| b.attempts(5))
//!     .attempts(3)
//!     .tool("fetch", |b| b)
//!     .build()
//!     .unwrap();
//! assert_eq!(tools, [("search".into(), 5), ("fetch".into(), 3)]);
//!
//! let err = Builder::default().attempts(3).tool("a.b", |b| b.attempts(0)).build().unwrap_err();
//! assert_eq!(err.field(), r#"tools."a.b".attempts"#);
//!
//! let err = Builder::default().tool("search", |b| b.seed(7)).build().unwrap_err();
//! assert_eq!(err.field(), r#"tools."search".seed"#);
//! ```

use std::collections::HashMap;
use std::fmt;

use crate::ConfigError;

/// A builder with per-tool overrides.
pub trait Overridable: Sized + 'static {
    /// The builder's own overrides (they must be empty on a tool's builder:
    /// overrides do not nest).
    fn overrides(&mut self) -> &mut ToolOverrides<Self>;
}

type Configure<B> = Box<dyn FnOnce(B) -> B + Send>;

/// The per-tool closures of a builder `B`, in the order they were given.
pub struct ToolOverrides<B> {
    entries: Vec<(String, Configure<B>)>,
    /// Whether the builder holding this is a tool's (handed to a closure).
    in_tool: bool,
    /// In a tool's builder: the first layer-wide knob its closure set.
    layer_wide: Option<&'static str>,
}

impl<B> Default for ToolOverrides<B> {
    fn default() -> Self {
        ToolOverrides {
            entries: Vec::new(),
            in_tool: false,
            layer_wide: None,
        }
    }
}

impl<B> fmt::Debug for ToolOverrides<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|(tool, _)| tool))
            .finish()
    }
}

impl<B: Overridable> ToolOverrides<B> {
    /// No overrides.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `configure` for `tool`, after any closures already given for it.
    pub fn push(
        &mut self,
        tool: impl Into<String>,
        configure: impl FnOnce(B) -> B + Send + 'static,
    ) {
        self.entries.push((tool.into(), Box::new(configure)));
    }

    /// Whether no tool has an override.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Notes that `knob`, a knob that cannot differ per tool, was set. On
    /// the layer's builder this does nothing; on a tool's builder,
    /// [`resolve`](Self::resolve) refuses the tool, naming
    /// `tools."<tool>".<knob>`.
    pub fn layer_wide(&mut self, knob: &'static str) {
        if self.in_tool && self.layer_wide.is_none() {
            self.layer_wide = Some(knob);
        }
    }

    /// Whether the builder holding this is a tool's (the one a `tool`
    /// closure receives).
    #[must_use]
    pub fn in_tool(&self) -> bool {
        self.in_tool
    }

    /// Applies every tool's closures, in the order given, to a builder made
    /// by `base`, and turns each result into the tool's settings with
    /// `finish` (which validates them). Tools come out in the order of their
    /// first override.
    ///
    /// Errors: an empty tool name (`tools`), an override inside an override
    /// (`tools."<tool>".tools`), or `finish`'s error with its field put in
    /// the tool's section (`tools."<tool>".<field>`).
    pub fn resolve<T>(
        self,
        mut base: impl FnMut() -> B,
        mut finish: impl FnMut(B) -> Result<T, ConfigError>,
    ) -> Result<Vec<(Box<str>, T)>, ConfigError> {
        let mut builders: Vec<(String, Option<B>)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for (tool, configure) in self.entries {
            if tool.is_empty() {
                return Err(ConfigError::new("tools", "a tool name must not be empty"));
            }
            let i = *index.entry(tool.clone()).or_insert_with(|| {
                let mut fresh = base();
                fresh.overrides().in_tool = true;
                builders.push((tool, Some(fresh)));
                builders.len() - 1
            });
            let slot = &mut builders[i].1;
            *slot = slot.take().map(configure);
        }
        let mut resolved = Vec::with_capacity(builders.len());
        for (tool, built) in builders {
            let Some(mut built) = built else { continue };
            let section = tool_section(&tool);
            let own = built.overrides();
            if !own.is_empty() {
                return Err(ConfigError::new(
                    format!("{section}.tools"),
                    "per-tool overrides do not nest",
                ));
            }
            if let Some(knob) = own.layer_wide {
                return Err(ConfigError::new(
                    format!("{section}.{knob}"),
                    "cannot differ per tool: set it on the layer's builder, not in `tool`",
                ));
            }
            let settings = finish(built).map_err(|e| e.in_section(&section))?;
            resolved.push((tool.into_boxed_str(), settings));
        }
        Ok(resolved)
    }
}

/// The configuration path of `tool`'s section: `tools."<tool>"`, the name
/// quoted and escaped as a TOML basic string.
#[must_use]
pub fn tool_section(tool: &str) -> String {
    let mut section = String::with_capacity(tool.len() + 8);
    section.push_str("tools.\"");
    for c in tool.chars() {
        match c {
            '"' => section.push_str("\\\""),
            '\\' => section.push_str("\\\\"),
            c if c.is_control() => section.push_str(&format!("\\u{:04X}", c as u32)),
            c => section.push(c),
        }
    }
    section.push('"');
    section
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct B {
        n: u32,
        tools: ToolOverrides<B>,
    }

    impl Overridable for B {
        fn overrides(&mut self) -> &mut ToolOverrides<Self> {
            &mut self.tools
        }
    }

    fn resolve(tools: ToolOverrides<B>) -> Result<Vec<(Box<str>, u32)>, ConfigError> {
        tools.resolve(
            || B {
                n: 1,
                ..B::default()
            },
            |b| {
                if b.n > 9 {
                    Err(ConfigError::new("n", "too big"))
                } else {
                    Ok(b.n)
                }
            },
        )
    }

    #[test]
    fn closures_of_one_tool_chain_in_order() {
        let mut tools = ToolOverrides::new();
        tools.push("a", |b: B| B { n: b.n + 1, ..b });
        tools.push("b", |b: B| b);
        tools.push("a", |b: B| B { n: b.n * 3, ..b });
        assert_eq!(resolve(tools).unwrap(), [("a".into(), 6), ("b".into(), 1)]);
    }

    #[test]
    fn errors_name_the_tool_section() {
        let mut tools = ToolOverrides::new();
        tools.push("we\"ird", |b: B| B { n: 10, ..b });
        let err = resolve(tools).unwrap_err();
        assert_eq!(err.field(), r#"tools."we\"ird".n"#);

        let mut tools = ToolOverrides::new();
        tools.push("", |b: B| b);
        assert_eq!(resolve(tools).unwrap_err().field(), "tools");

        let mut tools = ToolOverrides::new();
        tools.push("x", |mut b: B| {
            b.tools.push("y", |b: B| b);
            b
        });
        assert_eq!(resolve(tools).unwrap_err().field(), r#"tools."x".tools"#);

        let mut tools = ToolOverrides::new();
        tools.push("x", |mut b: B| {
            assert!(b.tools.in_tool());
            b.tools.layer_wide("bounds");
            b.tools.layer_wide("events");
            b
        });
        assert_eq!(resolve(tools).unwrap_err().field(), r#"tools."x".bounds"#);
    }

    #[test]
    fn layer_wide_knobs_are_free_on_the_layers_builder() {
        let mut layer = B::default();
        assert!(!layer.tools.in_tool());
        layer.tools.layer_wide("bounds");
        layer.tools.push("x", |b: B| b);
        assert_eq!(resolve(layer.tools).unwrap(), [("x".into(), 1)]);
    }
}
