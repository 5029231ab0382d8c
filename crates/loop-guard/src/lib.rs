//! LoopGuardLayer: stops agents that repeat the same tool call or a short cycle of calls.
//!
//! Being built (see the project issues); nothing is exported yet.

#![forbid(unsafe_code)]
