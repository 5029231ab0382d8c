//! Who may talk to the proxy over HTTP: the `Origin` and `Host` allow-lists
//! (against DNS rebinding, as the MCP transport spec asks) and bearer tokens.
//!
//! - `Origin`: loopback origins (`http(s)://localhost`, `127.0.0.1`,
//!   `[::1]`, any port) are always allowed, plus the configured ones; a
//!   request without `Origin` (not a browser) is not checked.
//! - `Host`: loopback names, the listen address and the configured hosts.
//! - Tokens: compared in constant time ([`subtle`]); never logged, never
//!   printed (their `Debug` shows how many there are).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use axum::http::{header, HeaderMap, Uri};
use subtle::ConstantTimeEq;

/// The variable bearer tokens may come from, comma-separated.
pub const AUTH_TOKENS_ENV: &str = "TOOLWARDEN_AUTH_TOKENS";

const LOOPBACK_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// A host as compared: lower case, IPv6 without brackets.
fn normalize_host(host: &str) -> String {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase()
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

/// One entry of the `Origin` allow-list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedOrigin {
    /// `null` (sandboxed documents, `file:` pages).
    Null,
    /// `scheme://host[:port|:*]`; without a port, the scheme's default one.
    Site {
        /// `http` or `https`, lower case.
        scheme: String,
        /// Lower case, IPv6 without brackets.
        host: String,
        /// Any port, or one.
        port: Option<u16>,
    },
}

impl AllowedOrigin {
    /// Reads an entry: `"null"`, `"https://app.example.com"`,
    /// `"https://app.example.com:8443"`, `"http://localhost:*"`.
    pub fn parse(entry: &str) -> Result<Self, String> {
        let entry = entry.trim();
        if entry.eq_ignore_ascii_case("null") {
            return Ok(AllowedOrigin::Null);
        }
        let (base, any_port) = match entry.strip_suffix(":*") {
            Some(base) => (base, true),
            None => (entry, false),
        };
        let (scheme, host, port) = parse_origin(base).ok_or_else(|| {
            format!("{entry:?} is not an origin (scheme://host[:port], with :* for any port)")
        })?;
        if any_port && port.is_some() {
            return Err(format!("{entry:?} has both a port and :*"));
        }
        let port =
            if any_port {
                None
            } else {
                Some(port.or_else(|| default_port(&scheme)).ok_or_else(|| {
                    format!("{entry:?} needs a port (its scheme has no default one)")
                })?)
            };
        Ok(AllowedOrigin::Site { scheme, host, port })
    }

    fn matches(&self, origin: &Origin) -> bool {
        match (self, origin) {
            (AllowedOrigin::Null, Origin::Null) => true,
            (
                AllowedOrigin::Site { scheme, host, port },
                Origin::Site {
                    scheme: s,
                    host: h,
                    port: p,
                },
            ) => scheme == s && host == h && port.is_none_or(|port| Some(port) == *p),
            _ => false,
        }
    }

    fn loopback() -> impl Iterator<Item = AllowedOrigin> {
        ["http", "https"].into_iter().flat_map(|scheme| {
            LOOPBACK_HOSTS
                .into_iter()
                .map(move |host| AllowedOrigin::Site {
                    scheme: scheme.to_owned(),
                    host: host.to_owned(),
                    port: None,
                })
        })
    }
}

/// An `Origin` header as compared (RFC 6454: scheme, host, port).
enum Origin {
    Null,
    Site {
        scheme: String,
        host: String,
        /// The explicit port, else the scheme's default one.
        port: Option<u16>,
    },
}

/// `scheme://authority` with nothing after it: scheme and host lower case,
/// the port if given.
fn parse_origin(value: &str) -> Option<(String, String, Option<u16>)> {
    let uri: Uri = value.parse().ok()?;
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let authority = uri.authority()?;
    if authority.as_str().contains('@') || !matches!(uri.path(), "" | "/") || uri.query().is_some()
    {
        return None;
    }
    Some((
        scheme,
        normalize_host(authority.host()),
        authority.port_u16(),
    ))
}

/// One entry of the `Host` allow-list: a host (any port) or `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHost {
    host: String,
    port: Option<u16>,
}

impl AllowedHost {
    /// Reads an entry: `"mcp.example.com"`, `"mcp.example.com:8443"`,
    /// `"10.0.0.5"`, `"[fd00::1]:8080"`.
    pub fn parse(entry: &str) -> Result<Self, String> {
        let entry = entry.trim();
        let authority: axum::http::uri::Authority = entry
            .parse()
            .map_err(|_| format!("{entry:?} is not a host or host:port"))?;
        if entry.is_empty() || authority.as_str().contains('@') {
            return Err(format!("{entry:?} is not a host or host:port"));
        }
        Ok(AllowedHost {
            host: normalize_host(authority.host()),
            port: authority.port_u16(),
        })
    }

    fn of_ip(ip: IpAddr, port: Option<u16>) -> Self {
        AllowedHost {
            host: ip.to_string(),
            port,
        }
    }

    /// The entry as rmcp's allow-list reads it.
    fn to_rmcp(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match self.port {
            Some(port) => format!("{host}:{port}"),
            None => host,
        }
    }
}

/// Bearer tokens clients must present. `Debug` shows only how many.
#[derive(Clone, Default)]
pub struct AuthTokens {
    tokens: Arc<[Box<[u8]>]>,
}

impl fmt::Debug for AuthTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AuthTokens({} tokens)", self.tokens.len())
    }
}

impl AuthTokens {
    /// Tokens from `file` (one a line; blank lines and `#` comments skipped)
    /// and from `env` (the value of [`AUTH_TOKENS_ENV`], comma-separated).
    /// The error names the file, never a token.
    pub fn load(file: Option<&Path>, env: Option<&str>) -> Result<Self, String> {
        let mut tokens: Vec<Box<[u8]>> = Vec::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the token file {}: {e}", path.display()))?;
            tokens.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(|l| l.as_bytes().into()),
            );
            if tokens.is_empty() {
                return Err(format!("the token file {} holds no token", path.display()));
            }
        }
        if let Some(list) = env {
            tokens.extend(
                list.split(',')
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(|t| t.as_bytes().into()),
            );
        }
        if let Some(bad) = tokens
            .iter()
            .position(|t| t.iter().any(|b| !b.is_ascii_graphic()))
        {
            return Err(format!(
                "token #{} contains a space or a character that cannot be sent in a header",
                bad + 1
            ));
        }
        Ok(AuthTokens {
            tokens: tokens.into(),
        })
    }

    /// Tokens from `file` and the process's [`AUTH_TOKENS_ENV`].
    pub fn from_env(file: Option<&Path>) -> Result<Self, String> {
        let env = std::env::var(AUTH_TOKENS_ENV).ok();
        AuthTokens::load(file, env.as_deref())
    }

    /// Whether there is no token (authentication is off).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Whether `headers` carry `Authorization: Bearer <one of the tokens>`.
    /// Each token is compared in constant time, and all of them are.
    pub fn accepts(&self, headers: &HeaderMap) -> bool {
        let Some(presented) = headers
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes())
            .and_then(bearer)
        else {
            return false;
        };
        let mut accepted = subtle::Choice::from(0u8);
        for token in self.tokens.iter() {
            accepted |= token.as_ref().ct_eq(presented);
        }
        accepted.into()
    }
}

/// The credentials of `Bearer <credentials>` (scheme case-insensitive).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let start = rest.iter().position(|b| *b != b' ')?;
    let credentials = &rest[start..];
    let end = credentials
        .iter()
        .rposition(|b| *b != b' ')
        .map_or(0, |i| i + 1);
    Some(&credentials[..end])
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `Host` not in the allow-list (403).
    Host,
    /// `Origin` not in the allow-list (403).
    Origin,
    /// No token, or a wrong one (401).
    Token,
}

/// The `Origin` and `Host` allow-lists and the tokens of one listener.
#[derive(Debug, Clone)]
pub struct AccessPolicy {
    origins: Arc<[AllowedOrigin]>,
    hosts: Arc<[AllowedHost]>,
    tokens: AuthTokens,
}

impl AccessPolicy {
    /// Loopback origins and hosts plus `origins` and `hosts` (entries as
    /// [`AllowedOrigin::parse`] and [`AllowedHost::parse`] read them), the
    /// listen address `listen` as a host, and `tokens` (empty: none needed).
    pub fn new(
        origins: &[String],
        hosts: &[String],
        listen: Option<SocketAddr>,
        tokens: AuthTokens,
    ) -> Result<Self, String> {
        let mut allowed_origins: Vec<AllowedOrigin> = AllowedOrigin::loopback().collect();
        for entry in origins {
            allowed_origins.push(AllowedOrigin::parse(entry)?);
        }
        let mut allowed_hosts: Vec<AllowedHost> = LOOPBACK_HOSTS
            .iter()
            .map(|h| AllowedHost {
                host: (*h).to_owned(),
                port: None,
            })
            .collect();
        if let Some(addr) = listen.filter(|a| !a.ip().is_unspecified()) {
            allowed_hosts.push(AllowedHost::of_ip(addr.ip(), None));
        }
        for entry in hosts {
            allowed_hosts.push(AllowedHost::parse(entry)?);
        }
        Ok(AccessPolicy {
            origins: allowed_origins.into(),
            hosts: allowed_hosts.into(),
            tokens,
        })
    }

    /// Loopback only, no token.
    #[must_use]
    pub fn loopback() -> Self {
        AccessPolicy {
            origins: AllowedOrigin::loopback().collect::<Vec<_>>().into(),
            hosts: LOOPBACK_HOSTS
                .iter()
                .map(|h| AllowedHost {
                    host: (*h).to_owned(),
                    port: None,
                })
                .collect::<Vec<_>>()
                .into(),
            tokens: AuthTokens::default(),
        }
    }

    /// The tokens.
    #[must_use]
    pub fn tokens(&self) -> &AuthTokens {
        &self.tokens
    }

    /// The allowed hosts as rmcp's own `Host` check reads them.
    pub fn rmcp_hosts(&self) -> Vec<String> {
        self.hosts.iter().map(AllowedHost::to_rmcp).collect()
    }

    /// Checks `Host`, then `Origin`, then the token.
    pub fn check(&self, uri: &Uri, headers: &HeaderMap) -> Result<(), Refusal> {
        self.check_host(uri, headers)?;
        self.check_origin(headers)?;
        if !self.tokens.is_empty() && !self.tokens.accepts(headers) {
            return Err(Refusal::Token);
        }
        Ok(())
    }

    fn check_host(&self, uri: &Uri, headers: &HeaderMap) -> Result<(), Refusal> {
        let authority = match headers.get(header::HOST) {
            Some(value) => value
                .to_str()
                .ok()
                .and_then(|v| v.parse::<axum::http::uri::Authority>().ok()),
            None => uri.authority().cloned(),
        };
        let Some(authority) = authority.filter(|a| !a.as_str().contains('@')) else {
            return Err(Refusal::Host);
        };
        let host = normalize_host(authority.host());
        let port = authority.port_u16();
        let allowed = self
            .hosts
            .iter()
            .any(|h| h.host == host && h.port.is_none_or(|p| Some(p) == port));
        if allowed {
            Ok(())
        } else {
            Err(Refusal::Host)
        }
    }

    fn check_origin(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        let mut values = headers.get_all(header::ORIGIN).iter();
        let Some(value) = values.next() else {
            return Ok(());
        };
        if values.next().is_some() {
            return Err(Refusal::Origin);
        }
        let value = value.to_str().map_err(|_| Refusal::Origin)?.trim();
        let origin = if value.eq_ignore_ascii_case("null") {
            Origin::Null
        } else {
            let (scheme, host, port) = parse_origin(value).ok_or(Refusal::Origin)?;
            let port = port.or_else(|| default_port(&scheme));
            Origin::Site { scheme, host, port }
        };
        if self.origins.iter().any(|allowed| allowed.matches(&origin)) {
            Ok(())
        } else {
            Err(Refusal::Origin)
        }
    }
}

#[cfg(test)]
mod tests;
