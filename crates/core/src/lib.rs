//! The MCP call model shared by every toolwarden layer.
//!
//! Layers never parse JSON themselves. They read a request through one trait
//! ([`McpRequest`]), judge a result through one classifier ([`Classify`],
//! default [`McpClassifier`]), identify a call by one fingerprint
//! ([`fingerprint()`]), keep per-key state in one bounded container
//! ([`KeyedState`]), refuse calls with small public errors
//! ([`rejection`]) and report what they did through one hook ([`Events`]).
//!
//! ```
//! use serde_json::json;
//! use toolwarden_core::{
//!     call_fingerprint, jsonrpc::{Request, Response, Id}, CallKind, Classify, FailureClass,
//!     McpClassifier, McpRequest, OutcomeKind,
//! };
//!
//! // A tools/call as a raw transport would read it.
//! let mut req = Request::tool_call(7, "get_weather", json!({"city": "Oslo", "_meta": {"progressToken": 1}}));
//! assert_eq!(req.tool_name(), Some("get_weather"));
//! let fp = call_fingerprint(&mut req).unwrap(); // computed once, stored in the request
//!
//! // The server answered with a tool error: MCP puts those inside a successful response.
//! let resp = Response::result(Id::Number(7), json!({
//!     "content": [{"type": "text", "text": "upstream API rate limit exceeded"}],
//!     "isError": true,
//! }));
//! let outcome = McpClassifier::new().classify_response(CallKind::ToolCall, &resp);
//! assert_eq!(outcome.kind, OutcomeKind::ToolError);
//! assert_eq!(outcome.class, Some(FailureClass::Transient));
//! assert!(outcome.is_counted_failure());
//! # let _ = fp;
//! ```
//!
//! Features: `testing` adds [`testing`]: a scripted mock MCP service and a
//! readiness-checking wrapper for layer tests; `rmcp` implements the request
//! and response views for rmcp's `ClientRequest` and `ServerResult`; `serde`
//! adds [`settings`], what the layers' serde settings types share, and makes
//! [`Bounds`] a settings value (`{ max_keys = 10000, idle_timeout = "10m" }`).

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations)]

pub mod catalog;
pub mod circuits;
pub mod classify;
pub mod events;
pub mod fingerprint;
pub mod jsonrpc;
pub mod key;
pub mod keyed;
pub mod overrides;
pub mod rejection;
pub mod request;
#[cfg(feature = "rmcp")]
pub mod rmcp;
#[cfg(feature = "serde")]
pub mod settings;
#[cfg(feature = "testing")]
pub mod testing;
pub mod time;

use std::fmt;

pub use catalog::{ToolAnnotations, ToolCatalog, ToolInfo, ToolPolicy};
pub use circuits::{CircuitState, CircuitView, Circuits};
pub use classify::{CallKind, Classify, FailureClass, McpClassifier, Outcome, OutcomeKind};
pub use events::{Event, EventSink, Events};
pub use fingerprint::{fingerprint, Fingerprint};
pub use key::{Key, KeyBy, KeyRef};
pub use keyed::{Bounds, Entry, KeyedState};
pub use overrides::{Overridable, ToolOverrides};
pub use rejection::{
    BulkheadFull, CircuitOpen, FailureReport, LoopDetected, LoopPattern, RateLimited, Rejection,
    RetryBudgetExhausted, FAILURE_META_KEY,
};
pub use request::{
    call_fingerprint, tool_result, Attempt, McpRequest, McpResponse, SessionKey, ToolResultStatus,
    TOOLS_CALL,
};

/// The error type of every toolwarden service, as in tower.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A configuration value was refused when the configuration was built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    field: String,
    reason: String,
}

impl ConfigError {
    /// An error about `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The name of the bad field (for cross-field checks, the fields, comma-separated).
    #[must_use]
    pub fn field(&self) -> &str {
        &self.field
    }

    /// Why it was refused.
    #[must_use]
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// Prefixes the field with a section name (`retry` + `max_attempts` → `retry.max_attempts`).
    #[must_use]
    pub fn in_section(mut self, section: &str) -> Self {
        self.field = format!("{section}.{}", self.field);
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration: `{}` {}", self.field, self.reason)
    }
}

impl std::error::Error for ConfigError {}
