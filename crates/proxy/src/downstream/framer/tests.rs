//! Unit tests of the framer.

use super::*;
use serde_json::{json, Value};

fn reply(frame: &Frame) -> Value {
    match frame {
        Frame::Reply(line) => serde_json::from_str(line).unwrap(),
        other => panic!("expected a reply, got {other:?}"),
    }
}

#[test]
fn malformed_lines_get_the_right_code_and_id() {
    for (line, code, id) in [
        (&b"{not json"[..], -32700, Value::Null),
        (b"[1,2", -32700, Value::Null),
        (b"\xff\xfe", -32700, Value::Null),
        (b"42", -32600, Value::Null),
        (b"[]", -32600, Value::Null),
        (br#"{"id":3,"method":"x"}"#, -32600, json!(3)),
        (
            br#"{"jsonrpc":"2.0","id":"a","method":7}"#,
            -32600,
            json!("a"),
        ),
        (
            br#"{"jsonrpc":"2.0","id":null,"method":"ping"}"#,
            -32600,
            Value::Null,
        ),
        (
            br#"{"jsonrpc":"2.0","id":1.5,"method":"ping"}"#,
            -32600,
            Value::Null,
        ),
        (
            br#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"arguments":{}}}"#,
            -32602,
            json!(4),
        ),
        (
            br#"{"jsonrpc":"2.0","id":5,"method":"initialize","params":{}}"#,
            -32602,
            json!(5),
        ),
        // A notification's method with an id: not a request at all.
        (
            br#"{"jsonrpc":"2.0","id":6,"method":"notifications/initialized"}"#,
            -32600,
            json!(6),
        ),
        (
            br#"{"jsonrpc":"2.0","id":7,"method":"notifications/cancelled","params":{"requestId":"x","reason":[]}}"#,
            -32600,
            json!(7),
        ),
    ] {
        let r = reply(&classify_line(line));
        assert_eq!(r["jsonrpc"], "2.0");
        assert_eq!(
            r["error"]["code"],
            code,
            "{}",
            String::from_utf8_lossy(line)
        );
        assert_eq!(r["id"], id, "{}", String::from_utf8_lossy(line));
    }
}

#[test]
fn valid_messages_go_to_rmcp_and_blank_lines_are_ignored() {
    for line in [
        &br#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#[..],
        br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
        br#"{"jsonrpc":"2.0","id":"x","method":"tools/call","params":{"name":"echo","arguments":{"message":"hi"}}}"#,
        br#"{"jsonrpc":"2.0","id":9,"method":"vendor/custom","params":{"a":1}}"#,
        b"\xEF\xBB\xBF{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}\r",
    ] {
        assert!(
            matches!(classify_line(line), Frame::Message(_)),
            "{}",
            String::from_utf8_lossy(line)
        );
    }
    assert!(matches!(classify_line(b""), Frame::Ignore(_)));
    assert!(matches!(classify_line(b"  \r"), Frame::Ignore(_)));
    // Notifications and responses are never answered, even malformed.
    assert!(matches!(
        classify_line(br#"{"jsonrpc":"2.0","method":"notifications/progress","params":{"x":1}}"#),
        Frame::Ignore(_)
    ));
}

#[tokio::test]
async fn lines_are_split_and_bounded() {
    let mut input = Vec::new();
    input
        .extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"id\":77,\"method\":\"x\",\"params\":{\"p\":\"");
    input.extend(std::iter::repeat_n(b'a', 300));
    input.extend_from_slice(b"\"}}\nshort\nlast-without-newline");
    let mut reader = LineReader::new(&input[..], 100);
    let Some(RawLine::TooLong { prefix }) = reader.next_line().await.unwrap() else {
        panic!("expected a too-long line")
    };
    let r: Value = serde_json::from_str(&too_long_reply(&prefix, 100)).unwrap();
    assert_eq!(
        (r["error"]["code"].as_i64(), r["id"].as_i64()),
        (Some(-32600), Some(77))
    );
    assert!(r["error"]["message"]
        .as_str()
        .unwrap()
        .contains("too large"));
    assert_eq!(
        reader.next_line().await.unwrap(),
        Some(RawLine::Line(b"short".to_vec()))
    );
    assert_eq!(
        reader.next_line().await.unwrap(),
        Some(RawLine::Line(b"last-without-newline".to_vec()))
    );
    assert_eq!(reader.next_line().await.unwrap(), None);
}

#[test]
fn a_huge_line_is_answered_once_and_the_next_line_still_works() {
    let mut input =
        b"{\"jsonrpc\":\"2.0\",\"id\":\"big\",\"method\":\"ping\",\"params\":{\"p\":\"".to_vec();
    input.extend(std::iter::repeat_n(b'x', 5 * 1024 * 1024));
    input.extend_from_slice(b"\"}}\n{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"ping\"}\n");
    let frames = frames_of(&input, DEFAULT_MAX_LINE_BYTES);
    assert_eq!(frames.len(), 2);
    let r = reply(&frames[0]);
    assert_eq!(
        (r["error"]["code"].as_i64(), r["id"].as_str()),
        (Some(-32600), Some("big"))
    );
    assert!(matches!(frames[1], Frame::Message(_)));
}

#[test]
fn ids_are_found_in_prefixes_conservatively() {
    for (prefix, id) in [
        (
            &br#"{"jsonrpc":"2.0","id":12,"method":"x","params":{"#[..],
            Some(Id::Number(12)),
        ),
        (
            br#"{"method":"x","params":{"id":3},"id":"a\"b","#,
            Some(Id::String("a\"b".into())),
        ),
        (br#" { "id" : -4 }"#, Some(Id::Number(-4))),
        (br#"{"jsonrpc":"2.0","method":"x","params":{"id":5"#, None),
        (br#"{"id":12"#, None), // the number may go on
        (br#"{"id":1.5,"#, None),
        (br#"["id",1]"#, None),
        (b"", None),
        (br#"{"params":[[[[[[[[[[["#, None),
    ] {
        assert_eq!(
            id_in_prefix(prefix),
            id,
            "{}",
            String::from_utf8_lossy(prefix)
        );
    }
}
