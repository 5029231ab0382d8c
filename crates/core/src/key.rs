//! Keys: what keyed layers keep separate state for.
//!
//! A [`KeyBy`] turns a request into a [`KeyRef`] that borrows from the
//! request, so that looking up the state of an existing key allocates
//! nothing; only a new key is turned into an owned [`Key`].

use std::borrow::Cow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use crate::request::McpRequest;

/// An owned key of keyed state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// One key for the whole server.
    Server,
    /// A tool name (or the method of a request that is not a tool call).
    Tool(Arc<str>),
    /// A session and a tool.
    SessionTool(Arc<str>, Arc<str>),
    /// A key chosen by a custom function.
    Custom(Arc<str>),
    /// The shared key of every key past a container's bound.
    Overflow,
}

/// A borrowed key, as computed from a request on every call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRef<'a> {
    /// See [`Key::Server`].
    Server,
    /// See [`Key::Tool`].
    Tool(&'a str),
    /// See [`Key::SessionTool`].
    SessionTool(&'a str, &'a str),
    /// See [`Key::Custom`].
    Custom(Cow<'a, str>),
    /// See [`Key::Overflow`].
    Overflow,
}

impl Key {
    /// Borrows the key.
    #[must_use]
    pub fn as_key_ref(&self) -> KeyRef<'_> {
        match self {
            Key::Server => KeyRef::Server,
            Key::Tool(t) => KeyRef::Tool(t),
            Key::SessionTool(s, t) => KeyRef::SessionTool(s, t),
            Key::Custom(c) => KeyRef::Custom(Cow::Borrowed(c)),
            Key::Overflow => KeyRef::Overflow,
        }
    }

    /// A tool key.
    #[must_use]
    pub fn tool(name: &str) -> Self {
        Key::Tool(name.into())
    }
}

impl KeyRef<'_> {
    /// Copies the key into an owned [`Key`].
    #[must_use]
    pub fn to_key(&self) -> Key {
        match self {
            KeyRef::Server => Key::Server,
            KeyRef::Tool(t) => Key::Tool((*t).into()),
            KeyRef::SessionTool(s, t) => Key::SessionTool((*s).into(), (*t).into()),
            KeyRef::Custom(c) => Key::Custom(c.as_ref().into()),
            KeyRef::Overflow => Key::Overflow,
        }
    }
}

// `Key` and `KeyRef` must hash alike so a `KeyRef` finds its `Key` in a map;
// both hash through `KeyRef`. Equality decides; the hash only has to spread
// keys well and be cheap, so a tool key hashes as its bytes alone (one
// mixing round), and the variants need no tag: one map holds one kind of key.
impl Hash for KeyRef<'_> {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        match self {
            KeyRef::Server => state.write_u8(0),
            KeyRef::Tool(t) => state.write(t.as_bytes()),
            KeyRef::SessionTool(s, t) => {
                state.write(s.as_bytes());
                state.write_u8(0xff);
                state.write(t.as_bytes());
            }
            KeyRef::Custom(c) => state.write(c.as_bytes()),
            KeyRef::Overflow => state.write_u8(1),
        }
    }
}

impl Hash for Key {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_key_ref().hash(state);
    }
}

impl papaya::Equivalent<Key> for KeyRef<'_> {
    #[inline]
    fn equivalent(&self, key: &Key) -> bool {
        match (self, key) {
            (KeyRef::Tool(a), Key::Tool(b)) => *a == &**b,
            (KeyRef::SessionTool(s, t), Key::SessionTool(ks, kt)) => *s == &**ks && *t == &**kt,
            (KeyRef::Custom(a), Key::Custom(b)) => a.as_ref() == &**b,
            (KeyRef::Server, Key::Server) | (KeyRef::Overflow, Key::Overflow) => true,
            _ => false,
        }
    }
}

impl KeyRef<'_> {
    /// What the key is, for a person or a model reading a refusal: the
    /// tool, `the server`, `search in this session`, the custom key.
    #[must_use]
    pub fn subject(&self) -> String {
        match self {
            KeyRef::Server => "the server".to_owned(),
            KeyRef::Tool(t) => (*t).to_owned(),
            KeyRef::SessionTool(_, t) => format!("{t} in this session"),
            KeyRef::Custom(c) => c.to_string(),
            KeyRef::Overflow => "the calls past the tracked keys".to_owned(),
        }
    }
}

impl fmt::Display for KeyRef<'_> {
    /// `*` for the server, the tool name, `session/tool`, the custom key, or
    /// `(overflow)`. A session with a `/` or a `%` is written with those
    /// escaped (`%2F`, `%25`), so that the first `/` ends the session
    /// whatever either name holds ([`split_session_tool`] reads it back):
    /// an HTTP session id may be any visible ASCII.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyRef::Server => f.write_str("*"),
            KeyRef::Tool(t) => f.write_str(t),
            KeyRef::SessionTool(s, t) => {
                if s.contains(['/', '%']) {
                    for c in s.chars() {
                        match c {
                            '/' => f.write_str("%2F")?,
                            '%' => f.write_str("%25")?,
                            c => fmt::Write::write_char(f, c)?,
                        }
                    }
                } else {
                    f.write_str(s)?;
                }
                write!(f, "/{t}")
            }
            KeyRef::Custom(c) => f.write_str(c),
            KeyRef::Overflow => f.write_str("(overflow)"),
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.as_key_ref().fmt(f)
    }
}

/// The session and the tool of a [`KeyRef::SessionTool`]'s name (as its
/// `Display` writes it): split at the first `/`, the session's `%2F` and
/// `%25` read back (borrowed unless it has them). A name without `/` is the
/// tool of the session `-` (requests without a session).
///
/// ```
/// use toolwarden_core::key::{split_session_tool, KeyRef};
/// let name = KeyRef::SessionTool("user/42", "fs/read").to_string();
/// assert_eq!(name, "user%2F42/fs/read");
/// let (session, tool) = split_session_tool(&name);
/// assert_eq!((&*session, tool), ("user/42", "fs/read"));
/// ```
#[must_use]
pub fn split_session_tool(name: &str) -> (Cow<'_, str>, &str) {
    let Some((session, tool)) = name.split_once('/') else {
        return (Cow::Borrowed("-"), name);
    };
    if !session.contains('%') {
        return (Cow::Borrowed(session), tool);
    }
    let mut decoded = String::with_capacity(session.len());
    let mut rest = session;
    while let Some(at) = rest.find('%') {
        decoded.push_str(&rest[..at]);
        let escape = rest.get(at..at + 3);
        match escape {
            Some("%2F" | "%2f") => decoded.push('/'),
            Some("%25") => decoded.push('%'),
            // Not an escape this writes: kept as it is.
            _ => {
                decoded.push('%');
                rest = &rest[at + 1..];
                continue;
            }
        }
        rest = &rest[at + 3..];
    }
    decoded.push_str(rest);
    (Cow::Owned(decoded), tool)
}

/// A custom key function.
pub type CustomKeyFn = Arc<dyn Fn(&dyn McpRequest) -> String + Send + Sync>;

/// How a keyed layer picks the key of a request. Default: [`KeyBy::Tool`].
#[derive(Clone, Default)]
pub enum KeyBy {
    /// Per tool (requests that are not tool calls key by their method).
    #[default]
    Tool,
    /// One key for the whole server.
    Server,
    /// Per session and tool; requests without a session use the session `-`.
    SessionTool,
    /// Per the string a function returns.
    Custom(CustomKeyFn),
}

impl KeyBy {
    /// A custom key function.
    ///
    /// ```
    /// use toolwarden_core::{jsonrpc::Request, KeyBy, KeyRef, McpRequest};
    /// let by_prefix = KeyBy::custom(|req| req.target().split('_').next().unwrap_or("").to_owned());
    /// let req = Request::tool_call(1, "github_search", serde_json::json!({}));
    /// assert_eq!(by_prefix.key(&req).to_string(), "github");
    /// ```
    pub fn custom(f: impl Fn(&dyn McpRequest) -> String + Send + Sync + 'static) -> Self {
        KeyBy::Custom(Arc::new(f))
    }

    /// The key of `request`.
    #[inline]
    pub fn key<'a, R: McpRequest>(&self, request: &'a R) -> KeyRef<'a> {
        match self {
            KeyBy::Tool => KeyRef::Tool(request.target()),
            KeyBy::Server => KeyRef::Server,
            KeyBy::SessionTool => {
                KeyRef::SessionTool(request.session_key().unwrap_or("-"), request.target())
            }
            KeyBy::Custom(f) => KeyRef::Custom(Cow::Owned(f(request))),
        }
    }

    /// [`KeyBy::key`] of a request behind `dyn` (as a
    /// [`CircuitView`](crate::CircuitView) is asked).
    pub fn key_of_dyn<'a>(&self, request: &'a dyn McpRequest) -> KeyRef<'a> {
        match self {
            KeyBy::Tool => KeyRef::Tool(request.target()),
            KeyBy::Server => KeyRef::Server,
            KeyBy::SessionTool => {
                KeyRef::SessionTool(request.session_key().unwrap_or("-"), request.target())
            }
            KeyBy::Custom(f) => KeyRef::Custom(Cow::Owned(f(request))),
        }
    }
}

impl fmt::Debug for KeyBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyBy::Tool => f.write_str("Tool"),
            KeyBy::Server => f.write_str("Server"),
            KeyBy::SessionTool => f.write_str("SessionTool"),
            KeyBy::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::hash_map::DefaultHasher;

    fn h(v: &impl Hash) -> u64 {
        let mut s = DefaultHasher::new();
        v.hash(&mut s);
        s.finish()
    }

    /// A session and a tool come back from the name `Display` writes,
    /// whatever `/` and `%` either holds: an HTTP session id may be any
    /// visible ASCII.
    #[test]
    fn a_session_tool_name_reads_back_to_its_session_and_tool() {
        for (session, tool) in [
            ("s1", "t"),
            ("user/42", "fetch7"),
            ("a/b/c", "d/e"),
            ("100%", "x"),
            ("%2F", "%25"),
            ("%", "/"),
            ("-", "a"),
            ("é/ü", "ñ"),
        ] {
            let name = KeyRef::SessionTool(session, tool).to_string();
            let (s, t) = split_session_tool(&name);
            assert_eq!((&*s, t), (session, tool), "{name}");
            assert_eq!(
                matches!(s, Cow::Borrowed(_)),
                !session.contains(['/', '%']),
                "{name}"
            );
        }
        // Two keys that joined to one name are two names.
        assert_ne!(
            KeyRef::SessionTool("a/b", "c").to_string(),
            KeyRef::SessionTool("a", "b/c").to_string()
        );
        assert_eq!(split_session_tool("tool"), (Cow::Borrowed("-"), "tool"));
        // Text that is no escape of ours is kept.
        assert_eq!(split_session_tool("a%zz%2/t").0, "a%zz%2");
    }

    #[test]
    fn key_and_key_ref_hash_and_compare_alike() {
        let keys = [
            Key::Server,
            Key::tool("a"),
            Key::SessionTool("s".into(), "a".into()),
            Key::Custom("a".into()),
            Key::Overflow,
        ];
        for k in &keys {
            assert_eq!(h(k), h(&k.as_key_ref()));
            assert_eq!(k.as_key_ref().to_key(), *k);
        }
        // Different variants with the same text are different keys (their
        // hashes may agree: equality decides).
        use papaya::Equivalent;
        assert!(!KeyRef::Tool("a").equivalent(&Key::Custom("a".into())));
        assert!(
            !KeyRef::SessionTool("ab", "c").equivalent(&Key::SessionTool("a".into(), "bc".into()))
        );
        for k in &keys {
            assert!(k.as_key_ref().equivalent(k));
        }
    }
}
