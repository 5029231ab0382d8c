//! The classification fuzz target's checks as a proptest, so CI runs them:
//! arbitrary JSON values, and arbitrary bytes read as JSON, through every
//! classifier entry point ([`check_classification`]). The cargo-fuzz target
//! `classify` (in `crates/proxy/fuzz`) runs the same checks on libFuzzer's
//! inputs.

#![cfg(feature = "testing")]

use proptest::prelude::*;
use serde_json::{json, Value};
use toolwarden_core::testing::check_classification;

/// Any JSON, biased towards the members the classifier reads.
fn json_value() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("content".to_owned()),
        Just("isError".to_owned()),
        Just("structuredContent".to_owned()),
        Just("resultType".to_owned()),
        Just("_meta".to_owned()),
        Just("text".to_owned()),
        Just("type".to_owned()),
        Just("retryAfter".to_owned()),
        Just("retryAfterMs".to_owned()),
        Just("retry_after".to_owned()),
        Just("code".to_owned()),
        Just("toolwarden/outcome".to_owned()),
        Just("kind".to_owned()),
        Just("seal".to_owned()),
        "\\PC{0,8}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        Just(json!(1e20)),
        Just(json!(1.7e308)),
        Just(json!("input_required")),
        Just(json!("text")),
        Just(json!("MCP error -32023: retry after 1e300 hours")),
        Just(json!("Retry-After: 99999999999999999999999")),
        Just(json!("Fri, 31 Dec 9999 23:59:59 GMT")),
        "\\PC{0,24}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..6)
                .prop_map(|members| Value::Object(members.into_iter().collect())),
        ]
    })
}

proptest! {
    #[test]
    fn every_classifier_entry_point_takes_any_json(value in json_value()) {
        check_classification(&value);
    }

    #[test]
    fn every_classifier_entry_point_takes_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(value) = serde_json::from_slice::<Value>(&bytes) {
            check_classification(&value);
        }
        check_classification(&Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    }
}

/// Deep nesting does not overflow the stack: serde_json refuses past 128
/// levels when parsing, and the classifier reads only the top levels.
#[test]
fn deep_json_is_classified_without_overflow() {
    let mut value = json!({"isError": true, "content": [{"type": "text", "text": "rate limited"}]});
    for _ in 0..100 {
        value = json!({"content": [value], "isError": true, "_meta": {"retryAfter": 1e300}});
    }
    check_classification(&value);
}
