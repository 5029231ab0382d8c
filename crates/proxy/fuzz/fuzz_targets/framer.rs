//! Fuzzes the downstream framer: any bytes, split into lines and classified.
//! Run: `cargo +nightly fuzz run framer -- -max_total_time=60` in crates/proxy.
//! Checks: no panic; one frame per line; every answer is a JSON-RPC error.

#![no_main]

use libfuzzer_sys::fuzz_target;
use toolwarden_proxy::downstream::framer::{frames_of, Frame};

fuzz_target!(|data: &[u8]| {
    let frames = frames_of(data, 1024);
    let mut lines = data.split(|&b| b == b'\n').count();
    if data.last() == Some(&b'\n') || data.is_empty() {
        lines -= 1;
    }
    assert_eq!(frames.len(), lines);
    for frame in frames {
        if let Frame::Reply(reply) = frame {
            let reply: serde_json::Value = serde_json::from_str(&reply).expect("answers are JSON");
            let code = reply["error"]["code"].as_i64().expect("an error code");
            assert!([-32700, -32600, -32602].contains(&code));
        }
    }
});
