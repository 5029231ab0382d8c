//! Fuzzes classification: any bytes, read as JSON (and as text), through
//! every classifier entry point of `toolwarden-core`.
//! Run: `cargo +nightly fuzz run classify -- -max_total_time=60` in crates/proxy.
//! Checks (`toolwarden_core::testing::check_classification`): no panic;
//! every retry-after hint within the documented bound; success and failure
//! class agree; nothing a server sends passes for a toolwarden refusal. CI
//! runs the same checks as a proptest (`crates/core/tests/classify_fuzz.rs`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use toolwarden_core::testing::check_classification;

fuzz_target!(|data: &[u8]| {
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) {
        check_classification(&value);
    }
    check_classification(&serde_json::Value::String(
        String::from_utf8_lossy(data).into_owned(),
    ));
});
