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

/// An edit made between two layers' classifications.
#[derive(Debug, Clone)]
enum Edit {
    InsertMeta(String, Value),
    RemoveMeta(String),
    PushText(String),
    Readdress(i64),
}

fn edit() -> impl Strategy<Value = Edit> {
    let key = prop_oneof![
        Just("toolwarden/outcome".to_owned()),
        Just("toolwarden/stale".to_owned()),
        "\\PC{0,6}",
    ];
    prop_oneof![
        (key.clone(), json_value()).prop_map(|(k, v)| Edit::InsertMeta(k, v)),
        key.prop_map(Edit::RemoveMeta),
        "\\PC{0,12}".prop_map(Edit::PushText),
        any::<i64>().prop_map(Edit::Readdress),
    ]
}

proptest! {
    /// A sharing classifier (issue 17) never gives another outcome than a
    /// plain one: for any result, and after any edits made with
    /// `McpResponse`'s methods, each sharing classification (which may read
    /// the mark left by the one before) equals a plain classification of
    /// the response as it is. (It fails if a failure is ever marked as a
    /// success. None of today's edits can turn a success into a failure, so
    /// the edits' removing the mark is defence in depth, checked directly
    /// by `edits_remove_the_mark_and_failures_leave_none` in `classify.rs`.)
    #[test]
    fn a_shared_classification_always_equals_a_plain_one(
        result in json_value(),
        edits in prop::collection::vec(edit(), 0..6),
        tool_call in any::<bool>(),
    ) {
        use toolwarden_core::jsonrpc::{Id, Response};
        use toolwarden_core::{CallKind, Classify, McpClassifier, McpResponse};
        let kind = if tool_call { CallKind::ToolCall } else { CallKind::Other };
        let sharing = McpClassifier::new().share_outcomes(true);
        let plain = McpClassifier::new();
        let mut response = Response::result(Id::Number(1), result);
        let check = |response: &mut Response| {
            let expected = plain.classify_response(kind, response);
            let shared = sharing.classify_owned(kind, response);
            prop_assert_eq!(shared, expected);
            // Read back from the mark, if one was left.
            prop_assert_eq!(sharing.classify_owned(kind, response), expected);
            Ok(())
        };
        check(&mut response)?;
        for edit in edits {
            match edit {
                Edit::InsertMeta(key, value) => response.insert_result_meta(&key, value),
                Edit::RemoveMeta(key) => response.remove_result_meta(&key),
                Edit::PushText(text) => response.push_text(text),
                Edit::Readdress(id) => McpResponse::set_request_id(&mut response, &Id::Number(id)),
            }
            check(&mut response)?;
        }
    }
}
