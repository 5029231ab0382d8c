//! Workspace root package of toolwarden: owns the cross-crate integration tests,
//! examples and benchmarks. It has no API of its own and is never published.
