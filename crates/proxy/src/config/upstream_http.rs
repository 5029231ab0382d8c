//! `[upstream] headers` and `ca_file`: what an HTTP(S) upstream is sent and
//! trusted with.
//!
//! A header value is a template: `${NAME}` is replaced by the environment
//! variable `NAME`, `${file:/path}` by the content of a file (without its
//! trailing newline), `$$` is a `$`; a value that is `@file:/path` as a whole
//! is the file's content. The values are secrets: they are read when the
//! proxy starts (a missing variable or an unreadable file is a configuration
//! error naming the header) and again at each connection (a rotated token
//! file is picked up on reconnect), and are never logged or shown.

use std::fmt;
use std::path::PathBuf;

use reqwest::header::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use toolwarden_core::ConfigError;

/// Header names the MCP transport sets itself: configuring them would break
/// the protocol (or the HTTP framing).
const RESERVED_HEADERS: &[&str] = &[
    "accept",
    "content-type",
    "content-length",
    "transfer-encoding",
    "connection",
    "host",
    "mcp-session-id",
    "mcp-protocol-version",
    "last-event-id",
];

/// One header value as written in the configuration, e.g.
/// `"Bearer ${MCP_TOKEN}"` or `"@file:/run/secrets/mcp-token"`: `${NAME}`
/// is the environment variable `NAME`, `${file:/path}` a file's content
/// (without its trailing newline), `$$` a `$`, and a whole value
/// `@file:/path` the file's content. Its `Debug` never shows it (a literal
/// value may be a secret); `check-config --print` writes it as written.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct HeaderTemplate(String);

impl fmt::Debug for HeaderTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HeaderTemplate([redacted])")
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Part<'a> {
    Text(&'a str),
    Env(&'a str),
    File(&'a str),
}

impl HeaderTemplate {
    /// A template from its text.
    pub fn new(text: impl Into<String>) -> Self {
        HeaderTemplate(text.into())
    }

    fn parts(&self) -> Result<Vec<Part<'_>>, String> {
        if let Some(path) = self.0.strip_prefix("@file:") {
            return file_part(path).map(|p| vec![p]);
        }
        let mut parts = Vec::new();
        let mut rest = self.0.as_str();
        while let Some(at) = rest.find('$') {
            parts.push(Part::Text(&rest[..at]));
            let after = &rest[at + 1..];
            if let Some(after) = after.strip_prefix('$') {
                parts.push(Part::Text("$"));
                rest = after;
            } else if let Some(inner) = after.strip_prefix('{') {
                let end = inner
                    .find('}')
                    .ok_or("`${` without its closing `}` (write `$$` for a `$`)")?;
                let name = &inner[..end];
                parts.push(match name.strip_prefix("file:") {
                    Some(path) => file_part(path)?,
                    None => env_part(name)?,
                });
                rest = &inner[end + 1..];
            } else {
                parts.push(Part::Text("$"));
                rest = after;
            }
        }
        parts.push(Part::Text(rest));
        parts.retain(|p| *p != Part::Text(""));
        Ok(parts)
    }

    /// Checks the template's syntax (not whether its variables are set).
    pub fn check(&self) -> Result<(), String> {
        self.parts().map(|_| ())
    }

    /// The value, with variables looked up by `env` and files read.
    pub fn resolve(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
        let mut value = String::new();
        for part in self.parts()? {
            match part {
                Part::Text(text) => value.push_str(text),
                Part::Env(name) => match env(name) {
                    Some(v) => value.push_str(&v),
                    None => return Err(format!("the environment variable {name} is not set")),
                },
                Part::File(path) => {
                    let content = std::fs::read_to_string(path)
                        .map_err(|e| format!("cannot read {path}: {e}"))?;
                    value.push_str(content.trim_end_matches(['\n', '\r']));
                }
            }
        }
        Ok(value)
    }
}

fn env_part(name: &str) -> Result<Part<'_>, String> {
    let valid = name
        .chars()
        .enumerate()
        .all(|(i, c)| c == '_' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit()));
    if name.is_empty() || !valid {
        return Err(format!(
            "`${{{name}}}` is not a variable name (letters, digits, `_`) nor `${{file:/path}}`"
        ));
    }
    Ok(Part::Env(name))
}

fn file_part(path: &str) -> Result<Part<'_>, String> {
    if path.is_empty() {
        return Err("a file reference needs a path (`@file:/run/secrets/token`)".into());
    }
    Ok(Part::File(path))
}

/// The key of header `name` in errors: `headers.Authorization`.
fn header_key(name: &str) -> String {
    if name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        format!("headers.{name}")
    } else {
        format!("headers.{}", super::quote_key(name))
    }
}

fn header_name(name: &str) -> Result<HeaderName, ConfigError> {
    let parsed = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| ConfigError::new(header_key(name), "is not a valid HTTP header name"))?;
    if RESERVED_HEADERS.contains(&parsed.as_str()) {
        return Err(ConfigError::new(
            header_key(name),
            "is set by the MCP transport itself and cannot be configured",
        ));
    }
    Ok(parsed)
}

/// Checks `[upstream] headers` and `ca_file` without reading the
/// environment or any file (that is [`resolve_headers`]'s and the HTTP
/// client's job). Keys are relative to `[upstream]`.
pub(super) fn validate(
    headers: &std::collections::BTreeMap<String, HeaderTemplate>,
    ca_file: Option<&PathBuf>,
) -> Result<(), ConfigError> {
    for (name, template) in headers {
        header_name(name)?;
        template
            .check()
            .map_err(|reason| ConfigError::new(header_key(name), reason))?;
    }
    if ca_file.is_some_and(|p| p.as_os_str().is_empty()) {
        return Err(ConfigError::new("ca_file", "must not be empty"));
    }
    Ok(())
}

/// The configured headers with their values, variables looked up by `env`
/// (pass `|name| std::env::var(name).ok()`) and files read. Each value is
/// marked sensitive (reqwest and hyper never print it). Errors name the
/// header (`upstream.headers.Authorization`) and never hold a value.
pub fn resolve_headers(
    headers: &std::collections::BTreeMap<String, HeaderTemplate>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<(HeaderName, HeaderValue)>, ConfigError> {
    let mut resolved = Vec::with_capacity(headers.len());
    for (name, template) in headers {
        let key = || format!("upstream.{}", header_key(name));
        let header = header_name(name).map_err(|e| e.in_section("upstream"))?;
        let text = template
            .resolve(env)
            .map_err(|reason| ConfigError::new(key(), reason))?;
        let mut value = HeaderValue::from_str(&text).map_err(|_| {
            ConfigError::new(
                key(),
                "the value is not a valid HTTP header value (control characters or line breaks)",
            )
        })?;
        value.set_sensitive(true);
        resolved.push((header, value));
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn env(name: &str) -> Option<String> {
        (name == "TOKEN").then(|| "s3cret-token".to_owned())
    }

    #[test]
    fn templates_expand_variables_files_and_dollars() {
        let dir = std::env::temp_dir().join(format!("tw-header-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "from-file\n").unwrap();
        let path = file.display();
        for (template, value) in [
            ("Bearer ${TOKEN}", "Bearer s3cret-token".to_owned()),
            ("plain", "plain".to_owned()),
            ("cost: $$5 $x", "cost: $5 $x".to_owned()),
            (&format!("@file:{path}") as &str, "from-file".to_owned()),
            (
                &format!("Bearer ${{file:{path}}}") as &str,
                "Bearer from-file".to_owned(),
            ),
        ] {
            assert_eq!(
                HeaderTemplate::new(template).resolve(&env).unwrap(),
                value,
                "{template}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_templates_and_missing_values_are_errors_without_the_value() {
        for (template, error) in [
            ("Bearer ${TOKEN", "closing"),
            ("${}", "not a variable name"),
            ("${1X}", "not a variable name"),
            ("@file:", "needs a path"),
        ] {
            let e = HeaderTemplate::new(template).check().unwrap_err();
            assert!(e.contains(error), "{template}: {e}");
        }
        let e = HeaderTemplate::new("Bearer ${MISSING}")
            .resolve(&env)
            .unwrap_err();
        assert_eq!(e, "the environment variable MISSING is not set");
        let e = HeaderTemplate::new("@file:/nonexistent/tw-token")
            .resolve(&env)
            .unwrap_err();
        assert!(e.starts_with("cannot read /nonexistent/tw-token"), "{e}");
    }

    #[test]
    fn resolved_headers_name_the_header_in_errors_and_are_sensitive() {
        let mut headers = BTreeMap::new();
        headers.insert(
            "Authorization".to_owned(),
            HeaderTemplate::new("Bearer ${TOKEN}"),
        );
        let resolved = resolve_headers(&headers, &env).unwrap();
        assert_eq!(resolved[0].0, "authorization");
        assert!(resolved[0].1.is_sensitive());
        assert!(!format!("{:?}", resolved[0].1).contains("s3cret"));
        headers.insert("X-Key".to_owned(), HeaderTemplate::new("${NOPE}"));
        let e = resolve_headers(&headers, &env).unwrap_err();
        assert_eq!(e.field(), "upstream.headers.X-Key");
        headers.remove("X-Key");
        headers.insert("X-Bad".to_owned(), HeaderTemplate::new("a\nb"));
        let e = resolve_headers(&headers, &env).unwrap_err();
        assert_eq!(e.field(), "upstream.headers.X-Bad");
        assert!(!e.to_string().contains("a\nb"));
    }

    #[test]
    fn reserved_and_invalid_names_are_refused() {
        for name in ["Accept", "Mcp-Session-Id", "content-type", "bad name"] {
            let mut headers = BTreeMap::new();
            headers.insert(name.to_owned(), HeaderTemplate::new("x"));
            let e = validate(&headers, None).unwrap_err();
            assert!(e.field().starts_with("headers."), "{name}: {e}");
        }
    }

    #[test]
    fn debug_never_shows_a_value() {
        assert_eq!(
            format!("{:?}", HeaderTemplate::new("Bearer literal-secret")),
            "HeaderTemplate([redacted])"
        );
    }
}
