//! RateLimitLayer: governor GCRA quotas, global and per tool.
//!
//! Being built (see the project issues); nothing is exported yet.

#![forbid(unsafe_code)]
