//! CircuitBreakerLayer: per-key circuit breakers with true sliding windows, half-open probes and a registry.
//!
//! Being built (see the project issues); nothing is exported yet.

#![forbid(unsafe_code)]
