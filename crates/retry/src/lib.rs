//! RetryBackoffLayer: exponential backoff with jitter, aware of failure classes, safe-to-repeat tools and a retry budget.
//!
//! Being built (see the project issues); nothing is exported yet.

#![forbid(unsafe_code)]
