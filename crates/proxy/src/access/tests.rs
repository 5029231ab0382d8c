//! Unit tests of the access checks.

#![allow(clippy::unwrap_used)]

use super::*;

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(
            axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    map
}

fn policy(origins: &[&str], hosts: &[&str], tokens: &str) -> AccessPolicy {
    let origins: Vec<String> = origins.iter().map(|s| (*s).to_owned()).collect();
    let hosts: Vec<String> = hosts.iter().map(|s| (*s).to_owned()).collect();
    let listen = "10.1.2.3:8080".parse().ok();
    AccessPolicy::new(
        &origins,
        &hosts,
        listen,
        AuthTokens::load(None, Some(tokens)).unwrap(),
    )
    .unwrap()
}

fn check(p: &AccessPolicy, pairs: &[(&str, &str)]) -> Result<(), Refusal> {
    p.check(&Uri::from_static("/mcp"), &headers(pairs))
}

#[test]
fn origins() {
    let p = policy(
        &["https://app.example.com", "http://dev.example:*"],
        &[],
        "",
    );
    let host = ("host", "localhost:8080");
    for ok in [
        "http://localhost:5173",
        "https://127.0.0.1",
        "http://[::1]:1",
        "https://app.example.com",
        "https://app.example.com:443",
        "http://dev.example:9999",
        "HTTPS://APP.example.com",
    ] {
        assert_eq!(check(&p, &[host, ("origin", ok)]), Ok(()), "{ok}");
    }
    for bad in [
        "https://evil.example",
        "https://app.example.com:8443",
        "http://app.example.com",
        "null",
        "not an origin",
        "http://localhost.evil.example",
        "http://user@localhost",
    ] {
        assert_eq!(
            check(&p, &[host, ("origin", bad)]),
            Err(Refusal::Origin),
            "{bad}"
        );
    }
    assert_eq!(check(&p, &[host]), Ok(()));
    assert_eq!(
        check(
            &p,
            &[
                host,
                ("origin", "http://localhost"),
                ("origin", "https://evil.example")
            ]
        ),
        Err(Refusal::Origin)
    );
}

#[test]
fn hosts() {
    let p = policy(&[], &["mcp.example.com", "pinned.example:8443"], "");
    for ok in [
        "localhost",
        "localhost:1",
        "127.0.0.1:8080",
        "[::1]:9",
        "10.1.2.3:8080",
        "MCP.example.com:1234",
        "pinned.example:8443",
    ] {
        assert_eq!(check(&p, &[("host", ok)]), Ok(()), "{ok}");
    }
    for bad in [
        "evil.example",
        "pinned.example:80",
        "10.1.2.4",
        "user@localhost",
    ] {
        assert_eq!(check(&p, &[("host", bad)]), Err(Refusal::Host), "{bad}");
    }
    assert_eq!(check(&p, &[]), Err(Refusal::Host));
    assert_eq!(
        p.rmcp_hosts(),
        vec![
            "localhost",
            "127.0.0.1",
            "[::1]",
            "10.1.2.3",
            "mcp.example.com",
            "pinned.example:8443"
        ]
    );
}

#[test]
fn tokens() {
    let p = policy(&[], &[], " one , two,,");
    let host = ("host", "localhost");
    assert_eq!(check(&p, &[host]), Err(Refusal::Token));
    for bad in [
        "Bearer three",
        "Bearer on",
        "Bearer one1",
        "Basic one",
        "one",
    ] {
        assert_eq!(
            check(&p, &[host, ("authorization", bad)]),
            Err(Refusal::Token),
            "{bad}"
        );
    }
    for ok in ["Bearer one", "bearer two", "BEARER  one "] {
        assert_eq!(check(&p, &[host, ("authorization", ok)]), Ok(()), "{ok}");
    }
    assert_eq!(format!("{:?}", p.tokens()), "AuthTokens(2 tokens)");
    assert!(AuthTokens::load(None, Some("a b")).is_err());
}

#[test]
fn entries_are_checked() {
    assert!(AllowedOrigin::parse("app.example.com").is_err());
    assert!(AllowedOrigin::parse("https://a.example:443:*").is_err());
    assert!(AllowedOrigin::parse("https://a.example/path").is_err());
    assert!(AllowedOrigin::parse("ftp://a.example").is_err());
    assert_eq!(AllowedOrigin::parse("null"), Ok(AllowedOrigin::Null));
    assert!(AllowedHost::parse("").is_err());
    assert!(AllowedHost::parse("a b").is_err());
}
