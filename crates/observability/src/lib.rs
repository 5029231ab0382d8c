//! ObservabilityLayer: MCP-aware metrics, tracing spans, a stats snapshot and health.
//!
//! Being built (see the project issues); nothing is exported yet.

#![forbid(unsafe_code)]
