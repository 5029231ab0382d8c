//! Fuzzes the HTTP guard's check of a body: any bytes, decided by
//! `check_message` (with its fast path for plain `tools/call`s) and by
//! `check_message_by_framer` (the framer alone).
//! Run: `cargo +nightly fuzz run check -- -max_total_time=60` in crates/proxy.
//! Checks: no panic; the two give the same verdict (the same id, the same
//! answer, or the same silence).

#![no_main]

use libfuzzer_sys::fuzz_target;
use toolwarden_proxy::downstream::framer::{check_message, check_message_by_framer};

fuzz_target!(|data: &[u8]| {
    assert_eq!(check_message(data), check_message_by_framer(data));
});
