//! Keeping the upstream's secrets out of logs, reports and answers.
//!
//! What the proxy knows to be secret: the userinfo and query of an upstream
//! URL (`https://user:pass@host/mcp?token=x`), and the values of the
//! configured upstream headers (`[upstream] headers`). What it does with them:
//!
//! - a URL is shown as [`redact_url`] makes it (`https://host/mcp`), a command
//!   as its program alone (its arguments may carry tokens): see
//!   [`UpstreamTarget`](crate::upstream::UpstreamTarget)'s `Display` and `Debug`;
//! - error texts of the upstream connection (rmcp's, reqwest's, which quote
//!   the full URL) are [scrubbed](Redactor::scrub) before they are logged or
//!   shown in `/health`, and clients only get a generic text
//!   ([`UPSTREAM_FAILED`]);
//! - every log line the binary writes goes through a [`RedactingStderr`]
//!   writer holding the same [`Redactor`], so a secret that some library logs
//!   (at any level, `trace` included) is replaced before it reaches stderr.

use std::borrow::Cow;
use std::fmt;
use std::io::{self, Write};
use std::sync::Arc;

use arc_swap::ArcSwap;

/// What a client is told when the upstream connection failed; the details
/// (scrubbed) are in the proxy's log.
pub const UPSTREAM_FAILED: &str = "the upstream server failed: see the proxy's log";

/// What a secret is replaced with.
pub const REDACTED: &str = "[redacted]";

/// Secrets shorter than this are not searched for in texts: replacing every
/// `a` in a log line hides nothing and garbles everything.
const MIN_SECRET_LEN: usize = 4;

/// `url` without userinfo, query or fragment: `https://user:pass@host:8443/mcp?token=x`
/// becomes `https://host:8443/mcp`. A text that is not a URL is shown as
/// `<not a URL>`, since it could be anything.
///
/// ```
/// use toolwarden_proxy::redact::redact_url;
/// assert_eq!(redact_url("https://user:pass@example.com/mcp?token=x#f"), "https://example.com/mcp");
/// assert_eq!(redact_url("http://127.0.0.1:3001/mcp"), "http://127.0.0.1:3001/mcp");
/// ```
#[must_use]
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(parsed) => {
            let mut shown = format!("{}://", parsed.scheme());
            if let Some(host) = parsed.host_str() {
                shown.push_str(host);
            }
            if let Some(port) = parsed.port() {
                shown.push_str(&format!(":{port}"));
            }
            shown.push_str(parsed.path());
            shown
        }
        Err(_) => "<not a URL>".to_owned(),
    }
}

/// The secrets of one upstream, and how each is shown instead. Cheap to
/// consult; built once per configuration.
///
/// ```
/// use toolwarden_proxy::redact::Redactor;
/// let redactor = Redactor::default()
///     .with_url("https://me:hunter22@example.com/mcp?key=abc123")
///     .with_secret("Bearer tok-1234");
/// let line = "error sending request for url (https://me:hunter22@example.com/mcp?key=abc123): Bearer tok-1234";
/// assert_eq!(
///     redactor.scrub(line),
///     "error sending request for url (https://example.com/mcp): [redacted]"
/// );
/// ```
#[derive(Clone, Default)]
pub struct Redactor {
    /// (secret, replacement), longest secret first so that a URL is replaced
    /// whole before its parts are.
    replacements: Vec<(String, String)>,
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redactor")
            .field("secrets", &self.replacements.len())
            .finish()
    }
}

impl Redactor {
    /// Adds what is secret in `url`: the URL itself as written and as
    /// normalized (shown as [`redact_url`] shows it), its userinfo, password
    /// and query (percent-encoded and decoded).
    #[must_use]
    pub fn with_url(mut self, url: &str) -> Self {
        let shown = redact_url(url);
        self.push(url.to_owned(), shown.clone());
        if let Ok(parsed) = reqwest::Url::parse(url) {
            self.push(parsed.as_str().to_owned(), shown.clone());
            // reqwest takes the userinfo out (as Basic auth) and quotes the rest.
            let mut without_userinfo = parsed.clone();
            let _ = without_userinfo.set_username("");
            let _ = without_userinfo.set_password(None);
            self.push(without_userinfo.as_str().to_owned(), shown);
            let user = parsed.username();
            if let Some(password) = parsed.password() {
                self.push(format!("{user}:{password}@"), String::new());
                self.push_secret(password.to_owned());
                self.push_secret(decoded(password));
            } else if !user.is_empty() {
                self.push(format!("{user}@"), String::new());
            }
            self.push_secret(user.to_owned());
            self.push_secret(decoded(user));
            if let Some(query) = parsed.query() {
                self.push_secret(query.to_owned());
                for (_, value) in parsed.query_pairs() {
                    self.push_secret(value.into_owned());
                }
            }
            if let Some(fragment) = parsed.fragment() {
                self.push_secret(fragment.to_owned());
            }
        }
        self
    }

    /// Scrubs what `other` scrubs too (a gateway's log: every upstream's secrets).
    #[must_use]
    pub fn merge(mut self, other: &Redactor) -> Self {
        for (secret, replacement) in &other.replacements {
            self.push(secret.clone(), replacement.clone());
        }
        self
    }

    /// Adds a secret value (a header's), replaced by [`REDACTED`].
    #[must_use]
    pub fn with_secret(mut self, secret: impl Into<String>) -> Self {
        self.push_secret(secret.into());
        self
    }

    /// Whether there is anything to scrub.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.replacements.is_empty()
    }

    fn push_secret(&mut self, secret: String) {
        // A header value such as `Bearer <token>`: its parts are secret too
        // (a library may log the token alone).
        let parts: Vec<String> = secret
            .split_whitespace()
            .filter(|part| part.len() >= MIN_SECRET_LEN && *part != secret)
            .map(str::to_owned)
            .collect();
        self.push(secret, REDACTED.to_owned());
        for part in parts {
            // `Bearer` itself is no secret.
            if !part.eq_ignore_ascii_case("bearer") && !part.eq_ignore_ascii_case("basic") {
                self.push(part, REDACTED.to_owned());
            }
        }
    }

    fn push(&mut self, secret: String, replacement: String) {
        if secret.len() < MIN_SECRET_LEN || secret == replacement {
            return;
        }
        if self.replacements.iter().any(|(s, _)| *s == secret) {
            return;
        }
        self.replacements.push((secret, replacement));
        self.replacements
            .sort_by(|(a, _), (b, _)| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    }

    /// `text` with every known secret replaced.
    #[must_use]
    pub fn scrub<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for (secret, replacement) in &self.replacements {
            if out.contains(secret.as_str()) {
                out = Cow::Owned(out.replace(secret.as_str(), replacement));
            }
        }
        out
    }
}

fn decoded(text: &str) -> String {
    // Percent-decoding by hand: `url` keeps userinfo encoded and offers no
    // decoder of its own for it.
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(high), Some(low)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                // Two hex digits: at most 0xff.
                out.push(u8::try_from(high * 16 + low).unwrap_or(b'?'));
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A redactor that can be set after logging started (the configuration is
/// read after the subscriber is installed). Clones share it.
#[derive(Clone, Default)]
pub struct SharedRedactor {
    current: Arc<ArcSwap<Redactor>>,
}

impl fmt::Debug for SharedRedactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self.current.load(), f)
    }
}

impl SharedRedactor {
    /// Replaces the redactor every clone uses.
    pub fn set(&self, redactor: Redactor) {
        self.current.store(Arc::new(redactor));
    }

    /// The current redactor.
    #[must_use]
    pub fn get(&self) -> Arc<Redactor> {
        self.current.load_full()
    }
}

/// A `tracing_subscriber` writer to stderr that [scrubs](Redactor::scrub)
/// each log line before writing it. `tracing_subscriber::fmt` formats an
/// event whole and writes it with one `write_all`, so a secret is never
/// split between two writes.
#[derive(Clone, Debug, Default)]
pub struct RedactingStderr {
    redactor: SharedRedactor,
}

impl RedactingStderr {
    /// A writer scrubbing with `redactor` (as it is at each write).
    #[must_use]
    pub fn new(redactor: SharedRedactor) -> Self {
        RedactingStderr { redactor }
    }
}

impl Write for RedactingStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let redactor = self.redactor.current.load();
        if redactor.is_empty() {
            return io::stderr().write(buf);
        }
        let text = String::from_utf8_lossy(buf);
        io::stderr().write_all(redactor.scrub(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for RedactingStderr {
    type Writer = RedactingStderr;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_userinfo_query_and_fragment() {
        for (url, shown) in [
            ("https://u:p@h.example/mcp?t=1#x", "https://h.example/mcp"),
            ("https://u@h.example:8443/a/b", "https://h.example:8443/a/b"),
            ("http://127.0.0.1:3001/mcp", "http://127.0.0.1:3001/mcp"),
            ("http://[::1]:80/mcp", "http://[::1]/mcp"),
            ("not a url", "<not a URL>"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn scrub_replaces_the_url_and_every_part() {
        let r = Redactor::default()
            .with_url("https://alice:s%40cret-pw@h.example/mcp?token=qs-secret-1&x=2")
            .with_secret("Bearer tok-abcdef");
        let scrubbed = r.scrub(
            "for url (https://alice:s%40cret-pw@h.example/mcp?token=qs-secret-1&x=2) \
             pw s@cret-pw, qs-secret-1, token=qs-secret-1&x=2, auth Bearer tok-abcdef, tok-abcdef",
        );
        for secret in [
            "alice",
            "s%40cret-pw",
            "s@cret-pw",
            "qs-secret-1",
            "tok-abcdef",
        ] {
            assert!(!scrubbed.contains(secret), "{secret} in {scrubbed}");
        }
        assert!(scrubbed.contains("(https://h.example/mcp)"), "{scrubbed}");
        assert!(
            scrubbed.contains("auth [redacted], [redacted]"),
            "{scrubbed}"
        );
        assert_eq!(
            r.scrub("Bearer tokens"),
            "Bearer tokens",
            "`Bearer` is no secret"
        );
    }

    #[test]
    fn short_values_are_not_searched() {
        let r = Redactor::default().with_url("https://h.example/mcp?a=1");
        assert_eq!(r.scrub("a=1 is fine here"), "a=1 is fine here");
        assert_eq!(
            r.scrub("url https://h.example/mcp?a=1"),
            "url https://h.example/mcp"
        );
    }
}
