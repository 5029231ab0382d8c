//! FallbackCacheLayer: serves the last good result, marked stale, when a tool fails; else a structured error with alternatives.
//!
//! Being built (see the project issues); nothing is exported yet.

#![forbid(unsafe_code)]
