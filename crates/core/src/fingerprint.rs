//! The argument fingerprint: one canonical hash of (tool name, arguments).
//!
//! The loop guard, the fallback cache and the Redis sync all identify a call
//! by this one value, so its definition is fixed and versioned: replicas on
//! different machines and releases compare fingerprints.
//!
//! # Definition (version 2)
//!
//! The fingerprint is XXH3-128 (seed 0) of this byte stream:
//!
//! ```text
//! "twfp" 0x02                      magic + version
//! str(tool)                        the tool name
//! canon(arguments)                 canon({}) when absent or null: a call
//!                                  without `arguments` and one with `{}`
//!                                  are the same call (version 1 hashed
//!                                  canon(null) for them)
//!
//! canon(null)   = 0x00             canon(false) = 0x01     canon(true) = 0x02
//! canon(int)    = 0x03 i64-le      for integers, and for floats with no fractional
//!                                  part inside the i64 range (1 and 1.0 agree)
//! canon(uint)   = 0x04 u64-le      for integers above i64::MAX
//! canon(float)  = 0x05 f64-bits-le for every other number
//! str(s)        = 0x06 u64-le(XXH3-64(utf-8 bytes of s))
//! canon(array)  = 0x07 u64-le(len) canon(item)...
//! canon(object) = 0x08 (str(key) canon(value))... 0x09
//!                                  members sorted by key bytes, skipping every
//!                                  member named `_meta`; the end tag 0x09 cannot
//!                                  be mistaken for a key, which starts with 0x06
//! ```
//!
//! Object members are hashed in sorted key order, so key order never matters;
//! `_meta` members are skipped at every depth, because clients put a fresh
//! `progressToken` there on each request. No intermediate string is built: the
//! values stream into a fixed stack buffer hashed in one shot (spilling into
//! the streaming hasher past 512 bytes); only a map with `preserve_order`
//! needs sorting, on a small on-stack vector.

use std::cell::RefCell;
use std::fmt;

use serde_json::{Map, Value};
use smallvec::SmallVec;
use xxhash_rust::xxh3::{xxh3_64, Xxh3Default};

/// The version of the fingerprint definition in this crate.
pub const FINGERPRINT_VERSION: u8 = 2;

const MAGIC: &[u8; 5] = b"twfp\x02";

/// The canonical fingerprint of one call: tool name plus arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub u128);

impl Fingerprint {
    /// The low 64 bits, for in-process maps.
    #[must_use]
    pub fn as_u64(self) -> u64 {
        self.0 as u64
    }
}

impl Fingerprint {
    /// This fingerprint within `scope` (a session key): the same call in
    /// two scopes has two values, the same call in one scope one. For
    /// state one scope must not see of another's (a per-session cache);
    /// not part of the versioned definition above, and never sent to
    /// Redis.
    #[must_use]
    pub fn scoped(self, scope: &str) -> Fingerprint {
        let mut hasher = Xxh3Default::new();
        hasher.update(b"twsc");
        hasher.update(&self.0.to_le_bytes());
        hasher.update(scope.as_bytes());
        Fingerprint(hasher.digest128())
    }
}

impl fmt::Display for Fingerprint {
    /// Lower-case hex, 32 digits: the form logged and stored in Redis.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// Computes the fingerprint of a call to `tool` with `arguments`.
///
/// ```
/// use serde_json::json;
/// use toolwarden_core::fingerprint::fingerprint;
/// let a = json!({"q": "rust", "limit": 5, "_meta": {"progressToken": 1}});
/// let b = json!({"limit": 5.0, "q": "rust"});
/// assert_eq!(
///     fingerprint("search", a.as_object()),
///     fingerprint("search", b.as_object()),
/// );
/// assert_ne!(fingerprint("search", a.as_object()), fingerprint("fetch", a.as_object()));
/// ```
#[must_use]
pub fn fingerprint(tool: &str, arguments: Option<&Map<String, Value>>) -> Fingerprint {
    let Some(args) = arguments else {
        return without_arguments(tool);
    };
    with_sink(|sink| {
        sink.write(MAGIC);
        sink.write_str(tool);
        sink.write_object(args);
    })
}

/// The fingerprint of a call without arguments: no arguments are no
/// arguments, however the client says it, so the stream ends with the
/// canonical form of an empty object. The whole stream is 16 bytes, built
/// as one integer and stored at once: the hash then reads it back whole
/// (bytes written one by one, or by stores of other sizes, make the read
/// wait for the stores to land), and no buffer is cleared for it.
fn without_arguments(tool: &str) -> Fingerprint {
    let magic = u128::from(u32::from_le_bytes([MAGIC[0], MAGIC[1], MAGIC[2], MAGIC[3]]))
        | u128::from(MAGIC[4]) << 32;
    let stream =
        magic | 0x06 << 40 | u128::from(xxh3_64(tool.as_bytes())) << 48 | 0x08 << 112 | 0x09 << 120;
    Fingerprint(xxhash_rust::xxh3::xxh3_128(&stream.to_le_bytes()))
}

/// Computes the fingerprint of any JSON value (the `arguments` of a call
/// that is not an object hashes through this, too).
#[must_use]
pub fn fingerprint_value(tool: &str, arguments: &Value) -> Fingerprint {
    with_sink(|sink| {
        sink.write(MAGIC);
        sink.write_str(tool);
        sink.write_value(arguments);
    })
}

const BUF: usize = 512;

/// Whether `serde_json::Map` iterates in key order: true for its default
/// `BTreeMap`, false when some crate in the build enables `preserve_order`.
/// Checked once, at run time, because features unify across the build.
fn map_iterates_sorted() -> bool {
    static SORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SORTED.get_or_init(|| {
        let mut probe = Map::new();
        probe.insert("b".into(), Value::Null);
        probe.insert("a".into(), Value::Null);
        probe.keys().next().map(String::as_str) == Some("a")
    })
}

thread_local! {
    /// The buffer a fingerprint's stream is written into, one per thread:
    /// reused, so that no call clears 512 bytes it may not use (clearing a
    /// fresh one on the stack was about a tenth of a 200-byte fingerprint).
    static BUFFER: RefCell<[u8; BUF]> = const { RefCell::new([0; BUF]) };
}

/// Writes a stream with `write` into this thread's buffer (or a fresh one,
/// should it be in use), and hashes it.
fn with_sink(write: impl FnOnce(&mut Sink<'_>)) -> Fingerprint {
    let run = |buf: &mut [u8; BUF]| {
        let mut sink = Sink {
            buf,
            len: 0,
            spill: None,
        };
        write(&mut sink);
        sink.finish()
    };
    BUFFER.with(|buffer| match buffer.try_borrow_mut() {
        Ok(mut buf) => run(&mut buf),
        // Not reentrant today (nothing runs while a stream is written);
        // a fresh buffer keeps it correct should that change.
        Err(_) => run(&mut [0; BUF]),
    })
}

/// Feeds the canonical stream to XXH3-128 through a fixed buffer: typical
/// arguments fit, and are hashed in one shot; longer ones spill into the
/// streaming hasher, which yields the same digest for the same bytes. Only
/// `buf[..len]` is ever read: what an earlier stream left past it is never
/// hashed.
struct Sink<'a> {
    buf: &'a mut [u8; BUF],
    len: usize,
    spill: Option<Box<Xxh3Default>>,
}

impl Sink<'_> {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        if self.len + bytes.len() <= BUF {
            self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
            self.len += bytes.len();
        } else {
            self.spill_write(bytes);
        }
    }

    #[cold]
    fn spill_write(&mut self, bytes: &[u8]) {
        let hasher = self
            .spill
            .get_or_insert_with(|| Box::new(Xxh3Default::new()));
        hasher.update(&self.buf[..self.len]);
        self.len = 0;
        hasher.update(bytes);
    }

    #[inline]
    fn write_byte(&mut self, byte: u8) {
        if self.len < BUF {
            self.buf[self.len] = byte;
            self.len += 1;
        } else {
            self.spill_write(&[byte]);
        }
    }

    #[inline]
    fn write_tagged(&mut self, tag: u8, bytes: [u8; 8]) {
        if self.len + 9 <= BUF {
            // Fixed-size copies compile to two stores, not a memcpy call.
            let at = self.len;
            self.buf[at] = tag;
            self.buf[at + 1..at + 9].copy_from_slice(&bytes);
            self.len = at + 9;
        } else {
            let mut head = [0u8; 9];
            head[0] = tag;
            head[1..].copy_from_slice(&bytes);
            self.spill_write(&head);
        }
    }

    #[inline]
    fn write_str(&mut self, s: &str) {
        // A fixed-size digest of the string instead of its bytes: every write
        // into the buffer is then a fixed-size store, and long strings are
        // read once by a hash built for them.
        self.write_tagged(0x06, xxh3_64(s.as_bytes()).to_le_bytes());
    }

    fn write_value(&mut self, value: &Value) {
        match value {
            Value::Null => self.write_byte(0x00),
            Value::Bool(false) => self.write_byte(0x01),
            Value::Bool(true) => self.write_byte(0x02),
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    self.write_tagged(0x03, i.to_le_bytes());
                } else if let Some(u) = n.as_u64() {
                    self.write_tagged(0x04, u.to_le_bytes());
                } else {
                    let f = n.as_f64().unwrap_or(f64::NAN);
                    // -2^63 and 2^63 are exact as f64: the i64 range check is exact.
                    if f.fract() == 0.0
                        && (-9_223_372_036_854_775_808.0..9_223_372_036_854_775_808.0).contains(&f)
                    {
                        self.write_tagged(0x03, (f as i64).to_le_bytes());
                    } else {
                        self.write_tagged(0x05, f.to_bits().to_le_bytes());
                    }
                }
            }
            Value::String(s) => self.write_str(s),
            Value::Array(items) => {
                self.write_tagged(0x07, (items.len() as u64).to_le_bytes());
                for item in items {
                    self.write_value(item);
                }
            }
            Value::Object(members) => self.write_object(members),
        }
    }

    fn write_object(&mut self, members: &Map<String, Value>) {
        self.write_byte(0x08);
        if map_iterates_sorted() {
            for (key, value) in members {
                if key != "_meta" {
                    self.write_str(key);
                    self.write_value(value);
                }
            }
        } else {
            let mut pairs: SmallVec<[(&str, &Value); 16]> = members
                .iter()
                .filter(|(k, _)| k.as_str() != "_meta")
                .map(|(k, v)| (k.as_str(), v))
                .collect();
            pairs.sort_unstable_by(|a, b| a.0.cmp(b.0));
            for (key, value) in pairs {
                self.write_str(key);
                self.write_value(value);
            }
        }
        self.write_byte(0x09);
    }

    fn finish(&mut self) -> Fingerprint {
        match self.spill.take() {
            None => Fingerprint(xxhash_rust::xxh3::xxh3_128(&self.buf[..self.len])),
            Some(mut hasher) => {
                hasher.update(&self.buf[..self.len]);
                Fingerprint(hasher.digest128())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn fp(v: &Value) -> Fingerprint {
        fingerprint_value("t", v)
    }

    #[test]
    fn definition_is_stable() {
        // Pinned values: changing them breaks every replica comparing
        // fingerprints through Redis, so bump FINGERPRINT_VERSION instead.
        let args = json!({"q": "tower", "n": [1, 2.5, true, null], "o": {"k": "v"}});
        assert_eq!(
            fingerprint("search", args.as_object()).to_string(),
            PINNED_V2
        );
    }
    const PINNED_V2: &str = "08c317b2461855dfb63a7758854e6bc9";

    // Issue 15: a call without `arguments` and one with `{}` (or only
    // `_meta`) are the same call.
    #[test]
    fn regression_15_absent_arguments_are_an_empty_object() {
        let empty = json!({});
        let meta_only = json!({"_meta": {"progressToken": 7}});
        assert_eq!(fingerprint("t", None), fingerprint("t", empty.as_object()));
        assert_eq!(
            fingerprint("t", None),
            fingerprint("t", meta_only.as_object())
        );
        assert_ne!(
            fingerprint("t", None),
            fingerprint("t", json!({"a": null}).as_object())
        );
    }

    proptest! {
        // The argument-less fast path builds its 16 bytes as one integer:
        // it must give the digest of the stream the definition writes.
        #[test]
        fn no_arguments_hash_as_the_empty_object_written_byte_by_byte(tool in ".{0,40}") {
            let empty = Map::new();
            prop_assert_eq!(fingerprint(&tool, None), fingerprint(&tool, Some(&empty)));
            let written = with_sink(|sink| {
                sink.write(MAGIC);
                sink.write_str(&tool);
                sink.write_byte(0x08);
                sink.write_byte(0x09);
            });
            prop_assert_eq!(fingerprint(&tool, None), written);
        }
    }

    #[test]
    fn long_arguments_spill_to_the_streaming_hasher_with_the_same_definition() {
        // The spill relies on XXH3 streaming giving the one-shot digest of the
        // concatenated bytes, whatever the chunking.
        let bytes: Vec<u8> = (0..5000u32).map(|i| (i * 31 % 251) as u8).collect();
        let mut streamed = Xxh3Default::new();
        for chunk in bytes.chunks(37) {
            streamed.update(chunk);
        }
        assert_eq!(streamed.digest128(), xxhash_rust::xxh3::xxh3_128(&bytes));

        let long = json!({"text": "x".repeat(5000), "list": (0..300).collect::<Vec<_>>()});
        let mut spilled = false;
        with_sink(|sink| {
            sink.write_value(&long);
            spilled = sink.spill.is_some();
        });
        assert!(spilled, "a 5 KB value must spill");
        assert_eq!(fp(&long), fp(&reorder(&long)));
        let shorter = json!({"text": "x".repeat(4999), "list": (0..300).collect::<Vec<_>>()});
        assert_ne!(fp(&long), fp(&shorter));
    }

    #[test]
    fn what_a_longer_stream_left_in_the_buffer_is_never_hashed() {
        // The thread's buffer is reused without clearing: a short stream
        // after a long one must hash only its own bytes.
        let short = json!({"a": 1});
        let alone = fp(&short);
        let _ = fp(&json!({"text": "x", "list": (0..40).collect::<Vec<_>>()}));
        assert_eq!(fp(&short), alone);
        // And on another thread, with a buffer of its own.
        let elsewhere = std::thread::spawn(move || fp(&short)).join().unwrap();
        assert_eq!(elsewhere, alone);
    }

    #[test]
    fn numbers_compare_by_value() {
        assert_eq!(fp(&json!(1)), fp(&json!(1.0)));
        assert_eq!(fp(&json!(0)), fp(&json!(-0.0)));
        assert_ne!(fp(&json!(1)), fp(&json!(1.5)));
        assert_ne!(fp(&json!(1)), fp(&json!("1")));
        assert_ne!(fp(&json!(u64::MAX)), fp(&json!(-1)));
    }

    #[test]
    fn structure_is_unambiguous() {
        // Same leaves, different nesting or split points.
        assert_ne!(fp(&json!(["ab", "c"])), fp(&json!(["a", "bc"])));
        assert_ne!(fp(&json!([[1], 2])), fp(&json!([1, [2]])));
        assert_ne!(fp(&json!({"a": {"b": 1}})), fp(&json!({"a": {}, "b": 1})));
        assert_ne!(fp(&json!([])), fp(&json!({})));
        assert_ne!(fp(&json!(null)), fp(&json!({})));
        assert_ne!(fingerprint("a", None), fingerprint("b", None));
    }

    #[test]
    fn meta_is_ignored_at_every_depth() {
        let a = json!({"x": {"_meta": {"progressToken": 1}, "y": 2}, "_meta": {"t": 1}});
        let b = json!({"x": {"y": 2}});
        assert_eq!(fp(&a), fp(&b));
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            (-1e9f64..1e9).prop_map(Value::from),
            "[a-z]{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map("[a-z_]{1,6}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Rebuilds `v` with every object's members in reverse insertion order.
    fn reorder(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut pairs: Vec<_> = m.iter().map(|(k, v)| (k.clone(), reorder(v))).collect();
                pairs.reverse();
                Value::Object(pairs.into_iter().collect())
            }
            Value::Array(a) => Value::Array(a.iter().map(reorder).collect()),
            other => other.clone(),
        }
    }

    /// Adds a `_meta` member with `token` to every object in `v`.
    fn add_meta(v: &Value, token: u64) -> Value {
        match v {
            Value::Object(m) => {
                let mut out: Map<String, Value> = m
                    .iter()
                    .map(|(k, v)| (k.clone(), add_meta(v, token)))
                    .collect();
                out.insert("_meta".into(), json!({"progressToken": token}));
                Value::Object(out)
            }
            Value::Array(a) => Value::Array(a.iter().map(|x| add_meta(x, token)).collect()),
            other => other.clone(),
        }
    }

    fn strip_meta(v: &Value) -> Value {
        match v {
            Value::Object(m) => Value::Object(
                m.iter()
                    .filter(|(k, _)| k.as_str() != "_meta")
                    .map(|(k, v)| (k.clone(), strip_meta(v)))
                    .collect(),
            ),
            Value::Array(a) => Value::Array(a.iter().map(strip_meta).collect()),
            other => other.clone(),
        }
    }

    proptest! {
        #[test]
        fn key_order_never_changes_it(v in arb_json()) {
            prop_assert_eq!(fp(&v), fp(&reorder(&v)));
        }

        #[test]
        fn meta_never_changes_it(v in arb_json(), token in any::<u64>()) {
            prop_assert_eq!(fp(&v), fp(&add_meta(&v, token)));
        }

        #[test]
        fn different_arguments_differ(a in arb_json(), b in arb_json()) {
            // Values equal once `_meta` is dropped must agree; all others must differ.
            let (sa, sb) = (strip_meta(&a), strip_meta(&b));
            let equal = sa == sb || numbers_equal(&sa, &sb);
            prop_assert_eq!(fp(&a) == fp(&b), equal, "{} vs {}", a, b);
        }
    }

    /// Structural equality where numbers compare by value (1 == 1.0).
    fn numbers_equal(a: &Value, b: &Value) -> bool {
        match (a, b) {
            (Value::Number(x), Value::Number(y)) => {
                x.as_f64() == y.as_f64() && x.as_f64().is_some_and(|f| f.fract() == 0.0 || x == y)
            }
            (Value::Array(x), Value::Array(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(a, b)| numbers_equal(a, b))
            }
            (Value::Object(x), Value::Object(y)) => {
                x.len() == y.len()
                    && x.iter()
                        .all(|(k, v)| y.get(k).is_some_and(|w| numbers_equal(v, w)))
            }
            _ => a == b,
        }
    }
}
