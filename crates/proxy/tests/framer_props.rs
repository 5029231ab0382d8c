//! Property tests of the downstream framer, run in CI with a bounded number
//! of cases (256 per property): arbitrary bytes and mutated valid messages.
//! For every input: nothing panics, every line gets exactly one frame, every
//! answer is a well-formed JSON-RPC error with the right code and the line's
//! id when it has one, and unmutated valid messages are forwarded.
//! (`fuzz/` has the cargo-fuzz target over the same entry point.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use serde_json::{json, Value};
use toolwarden_core::jsonrpc::Message;
use toolwarden_proxy::downstream::framer::{
    check_message, check_message_by_framer, frames_of, Frame,
};

/// Small, so that over-long lines are common.
const MAX_LINE: usize = 512;

const VALID: &[&str] = &[
    r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"p","version":"1"}}}"#,
    r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
    r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#,
    r#"{"jsonrpc":"2.0","id":"c-3","method":"tools/call","params":{"name":"echo","arguments":{"message":"hi"},"_meta":{"progressToken":7}}}"#,
    r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":3,"reason":"user"}}"#,
    r#"{"jsonrpc":"2.0","id":4,"method":"ping"}"#,
    r#"{"jsonrpc":"2.0","id":5,"result":{}}"#,
    r#"{"jsonrpc":"2.0","id":6,"method":"resources/read","params":{"uri":"file:///x"}}"#,
];

/// The lines a reader sees in `input`.
fn lines_of(input: &[u8]) -> Vec<&[u8]> {
    let mut lines: Vec<&[u8]> = input.split(|&b| b == b'\n').collect();
    if lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    lines
}

/// The id a well-behaved answer to `line` must carry, if the line is a JSON
/// object whose `id` is an integer or a string.
fn expected_id(line: &[u8]) -> Option<Value> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
    let value: Value = serde_json::from_slice(line).ok()?;
    let id = value.as_object()?.get("id")?;
    (id.is_string() || id.as_i64().is_some()).then(|| id.clone())
}

fn check(input: &[u8]) -> Result<(), TestCaseError> {
    let frames = frames_of(input, MAX_LINE);
    let lines = lines_of(input);
    prop_assert_eq!(frames.len(), lines.len(), "one frame per line");
    for (line, frame) in lines.iter().zip(&frames) {
        match frame {
            Frame::Reply(reply) => {
                let reply: Value = serde_json::from_str(reply).expect("answers are JSON");
                prop_assert_eq!(&reply["jsonrpc"], "2.0");
                let code = reply["error"]["code"].as_i64().unwrap_or(0);
                prop_assert!([-32700, -32600, -32602].contains(&code), "code {}", code);
                prop_assert!(reply["error"]["message"].is_string());
                if line.len() <= MAX_LINE {
                    if let Some(id) = expected_id(line) {
                        prop_assert_eq!(&reply["id"], &id, "the answer carries the request's id");
                    }
                    // A line that is not JSON at all is a parse error.
                    let trimmed = line.strip_suffix(b"\r").unwrap_or(line);
                    let trimmed = trimmed.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(trimmed);
                    if serde_json::from_slice::<Value>(trimmed).is_err() {
                        prop_assert_eq!(code, -32700);
                    }
                } else {
                    prop_assert_eq!(code, -32600, "an over-long line is an invalid request");
                }
            }
            Frame::Message(_) => {
                prop_assert!(line.len() <= MAX_LINE);
                let trimmed = line.strip_suffix(b"\r").unwrap_or(line);
                let trimmed = trimmed.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(trimmed);
                prop_assert!(
                    Message::parse(trimmed).is_ok(),
                    "only valid JSON-RPC is forwarded"
                );
            }
            Frame::Ignore(_) => {
                // Only blank lines and notifications/responses (never answered) are ignored.
                let trimmed = line.strip_suffix(b"\r").unwrap_or(line);
                let trimmed = trimmed.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(trimmed);
                let blank = trimmed.iter().all(u8::is_ascii_whitespace);
                let unanswerable = matches!(
                    Message::parse(trimmed),
                    Ok(Message::Notification(_) | Message::Response(_))
                );
                prop_assert!(
                    blank || unanswerable,
                    "ignored: {:?}",
                    String::from_utf8_lossy(line)
                );
            }
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Duplicate(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, bytes)| Mutation::Insert(i, bytes)),
        (any::<usize>(), 1usize..16).prop_map(|(i, n)| Mutation::Delete(i, n)),
        (any::<usize>(), 1usize..32).prop_map(|(i, n)| Mutation::Duplicate(i, n)),
    ]
}

fn apply(mut line: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = line.len().max(1);
        match m {
            Mutation::Flip(i, b) => {
                if !line.is_empty() {
                    let i = i % line.len();
                    line[i] = *b;
                }
            }
            Mutation::Truncate(i) => line.truncate(i % len),
            Mutation::Insert(i, bytes) => {
                let i = i % len;
                let i = i.min(line.len());
                line.splice(i..i, bytes.iter().copied());
            }
            Mutation::Delete(i, n) => {
                let i = (i % len).min(line.len());
                let end = (i + n).min(line.len());
                line.drain(i..end);
            }
            Mutation::Duplicate(i, n) => {
                let i = (i % len).min(line.len());
                let end = (i + n).min(line.len());
                let copy = line[i..end].to_vec();
                line.splice(end..end, copy);
            }
        }
    }
    line
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_are_framed_without_panics(input in proptest::collection::vec(any::<u8>(), 0..2048)) {
        check(&input)?;
    }

    #[test]
    fn arbitrary_lines_with_newlines_are_framed(
        lines in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..96), 0..16)
    ) {
        let input = lines.join(&b'\n');
        check(&input)?;
    }

    #[test]
    fn mutated_valid_messages_are_answered_or_forwarded(
        picks in proptest::collection::vec((0..VALID.len(), proptest::collection::vec(mutation(), 0..4)), 1..12),
        crlf in any::<bool>(),
    ) {
        let mut input = Vec::new();
        let mut untouched = Vec::new();
        for (pick, mutations) in &picks {
            let line = apply(VALID[*pick].as_bytes().to_vec(), mutations);
            // A mutation may add newlines: the framer then sees several lines.
            untouched.push(mutations.is_empty());
            input.extend_from_slice(&line);
            if crlf {
                input.push(b'\r');
            }
            input.push(b'\n');
        }
        check(&input)?;
        // Lines that were not mutated (and so hold no extra newline) are forwarded.
        if untouched.iter().all(|u| *u) {
            let frames = frames_of(&input, MAX_LINE);
            for frame in &frames {
                prop_assert!(matches!(frame, Frame::Message(_)), "{:?}", frame);
            }
        }
    }

    #[test]
    fn answers_never_carry_a_wrong_id(id in -1_000_000i64..1_000_000, tail in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut line = format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":"#).into_bytes();
        line.extend(tail.iter().filter(|b| **b != b'\n'));
        let frames = frames_of(&line, MAX_LINE);
        prop_assert_eq!(frames.len(), 1);
        if let Frame::Reply(reply) = &frames[0] {
            let reply: Value = serde_json::from_str(reply).unwrap();
            // The id is the request's, or null when the line could not be read.
            prop_assert!(reply["id"].is_null() || reply["id"].as_i64() == Some(id), "{}", reply);
        }
    }
}

#[test]
fn every_valid_message_is_forwarded() {
    for line in VALID {
        let frames = frames_of(line.as_bytes(), MAX_LINE);
        assert_eq!(frames.len(), 1);
        assert!(matches!(frames[0], Frame::Message(_)), "{line}");
    }
}

/// A JSON value of any of the shapes a member of a message may take.
fn member() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        Just(None),
        Just(Some(Value::Null)),
        Just(Some(json!(7))),
        Just(Some(json!(1.5))),
        Just(Some(json!(-3))),
        Just(Some(json!("echo"))),
        Just(Some(json!(true))),
        Just(Some(json!([1, "a"]))),
        Just(Some(json!({}))),
        Just(Some(json!({"message": "hi"}))),
        Just(Some(json!({"progressToken": 7}))),
        Just(Some(json!({"progressToken": {"x": 1}}))),
        Just(Some(json!({"progressToken": 1.5}))),
        Just(Some(json!({"ttl": 1000}))),
        Just(Some(json!(u64::MAX))),
    ]
}

/// Sets `key` of `object` to `value`, or leaves it out.
/// Members [`with_member_twice`] can repeat: `(object, member)`, the
/// object `""` for the message itself.
const TWICE: &[(&str, &str)] = &[
    ("", "jsonrpc"),
    ("", "id"),
    ("", "method"),
    ("", "params"),
    ("params", "name"),
    ("params", "arguments"),
    ("params", "_meta"),
    ("arguments", "q"),
    ("_meta", "progressToken"),
];

/// `line` with `member` of `object` given twice, the first time with
/// another value (JSON allows it; rmcp refuses a repeated member of its
/// structs and keeps the last of a map's). `line` as it is when the
/// object or the member is not there.
fn with_member_twice(line: &str, (object, member): (&str, &str)) -> String {
    let Ok(Value::Object(message)) = serde_json::from_str::<Value>(line) else {
        return line.to_owned();
    };
    let found = match object {
        "" => Some(&message),
        "params" => message.get("params").and_then(Value::as_object),
        nested => message
            .get("params")
            .and_then(|p| p.get(nested))
            .and_then(Value::as_object),
    };
    if found.is_none_or(|o| !o.contains_key(member)) {
        return line.to_owned();
    }
    // Objects serialize with sorted keys and no spaces: the object's
    // opening brace is found by its key, the message's is the first.
    let at = match object {
        "" => Some(0),
        key => line
            .find(&format!("\"{key}\":{{"))
            .map(|i| i + key.len() + 3),
    };
    match at {
        Some(i) => format!("{}{{\"{member}\":\"first\",{}", &line[..i], &line[i + 1..]),
        None => line.to_owned(),
    }
}

fn set(object: &mut serde_json::Map<String, Value>, key: &str, value: Option<Value>) {
    if let Some(value) = value {
        object.insert(key.to_owned(), value);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The HTTP guard's check reads a plain `tools/call` with one parser
    /// instead of two: on messages of every shape near a tool call (each
    /// member absent, null, of another type, extra members, other
    /// methods), it decides exactly as `classify_line` does: the same
    /// request id, the same answer, the same silence.
    #[test]
    fn the_guards_check_decides_as_the_framer_on_tool_calls_of_any_shape(
        jsonrpc in prop_oneof![6 => Just(Some(json!("2.0"))), 1 => Just(Some(json!("1.0"))), 1 => Just(None)],
        id in prop_oneof![6 => prop_oneof![Just(Some(json!(7))), Just(Some(json!("c-1")))], 2 => member()],
        method in prop_oneof![6 => Just(json!("tools/call")), 1 => Just(json!("tools/list")), 1 => Just(json!("initialize")), 1 => Just(json!(3))],
        params_kind in prop_oneof![6 => Just(1u8), 1 => Just(0u8), 1 => Just(2u8), 1 => Just(3u8)],
        message_as_array in prop_oneof![9 => Just(false), 1 => Just(true)],
        name in prop_oneof![6 => Just(Some(json!("echo"))), 2 => member()],
        arguments in prop_oneof![6 => prop_oneof![Just(None), Just(Some(json!({"q": 1})))], 2 => member()],
        meta in prop_oneof![6 => prop_oneof![Just(None), Just(Some(json!({"progressToken": 7})))], 2 => member()],
        extra_param in prop_oneof![6 => Just(None), 1 => Just(Some(("task", json!({"ttl": 1})))), 1 => Just(Some(("requestState", json!("s")))), 1 => Just(Some(("inputResponses", json!({})))), 1 => Just(Some(("other", json!(1))))],
        extra_member in prop_oneof![6 => Just(false), 1 => Just(true)],
        twice in prop_oneof![6 => Just(None), 1 => proptest::sample::select(TWICE).prop_map(Some)],
    ) {
        let mut params = serde_json::Map::new();
        set(&mut params, "name", name);
        set(&mut params, "arguments", arguments);
        set(&mut params, "_meta", meta);
        if let Some((key, value)) = extra_param {
            params.insert(key.to_owned(), value);
        }
        let mut message = serde_json::Map::new();
        set(&mut message, "jsonrpc", jsonrpc);
        set(&mut message, "id", id);
        message.insert("method".into(), method);
        match params_kind {
            0 => {}
            1 => {
                message.insert("params".into(), Value::Object(params));
            }
            // Its members' values in order: serde reads a struct from an
            // array by position (the guard let `["echo"]` through to rmcp).
            3 => {
                message.insert("params".into(), Value::Array(params.into_iter().map(|(_, v)| v).collect()));
            }
            _ => {
                message.insert("params".into(), json!("not an object"));
            }
        }
        if extra_member {
            message.insert("extra".into(), json!(1));
        }
        let mut line = if message_as_array {
            Value::Array(message.into_iter().map(|(_, v)| v).collect()).to_string()
        } else {
            Value::Object(message).to_string()
        };
        if let Some(member) = twice {
            line = with_member_twice(&line, member);
        }
        prop_assert_eq!(
            check_message(line.as_bytes()),
            check_message_by_framer(line.as_bytes()),
            "{}",
            line
        );
    }
}
