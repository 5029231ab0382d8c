//! The HTTP client of a Streamable HTTP(S) upstream: reqwest with rustls
//! (system roots through the platform verifier, plus `upstream.ca_file`),
//! the configured headers, and redirects kept to the same origin.

use reqwest::header::HeaderMap;
use toolwarden_core::ConfigError;

use crate::config::{resolve_headers, UpstreamConfig};

/// Redirects followed at most (as rmcp's own client).
const MAX_REDIRECTS: usize = 10;

/// The client for an HTTP(S) upstream, and the header values it sends (for
/// the [`Redactor`](crate::redact::Redactor)). Variables are looked up by
/// `env`; files (`ca_file`, `@file:` headers) are read now. Errors name the
/// key (`upstream.ca_file`, `upstream.headers.Authorization`) and hold no
/// secret.
pub(crate) fn http_client(
    config: &UpstreamConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(reqwest::Client, Vec<String>), ConfigError> {
    let mut headers = HeaderMap::new();
    let mut secrets = Vec::new();
    for (name, value) in resolve_headers(&config.headers, env)? {
        if let Ok(text) = value.to_str() {
            secrets.push(text.to_owned());
        }
        headers.insert(name, value);
    }
    let mut builder = reqwest::Client::builder().default_headers(headers);
    // Idle connections are kept for `http_keep_alive` only (rmcp's own
    // client keeps none: a new TCP connection, and TLS handshake, for every
    // request). Shorter than servers' keep-alive timeouts, so a server does
    // not close one as it is reused; one it closed (a restarted server) is
    // found closed by the pool and not used.
    builder = if config.http_keep_alive.is_zero() {
        builder.pool_max_idle_per_host(0)
    } else {
        builder.pool_idle_timeout(config.http_keep_alive)
    };
    let mut builder = builder
        // Redirects only within the origin, so the headers never reach
        // another host.
        .redirect(reqwest::redirect::Policy::custom(|attempt| {
            let same_origin = attempt
                .previous()
                .first()
                .is_some_and(|first| first.origin() == attempt.url().origin());
            if attempt.previous().len() > MAX_REDIRECTS {
                attempt.error("too many redirects")
            } else if same_origin {
                attempt.follow()
            } else {
                attempt.stop()
            }
        }));
    if let Some(path) = &config.ca_file {
        let key = "upstream.ca_file";
        let pem = std::fs::read(path)
            .map_err(|e| ConfigError::new(key, format!("cannot read {}: {e}", path.display())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            ConfigError::new(key, format!("{} is not a PEM file: {e}", path.display()))
        })?;
        if certs.is_empty() {
            return Err(ConfigError::new(
                key,
                format!("{} holds no PEM certificate", path.display()),
            ));
        }
        builder = builder.tls_certs_merge(certs);
    }
    let client = builder
        .build()
        .map_err(|e| ConfigError::new("upstream", format!("cannot set up the HTTP client: {e}")))?;
    Ok((client, secrets))
}

/// The process's environment, for [`http_client`].
pub(crate) fn process_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HeaderTemplate;

    #[test]
    fn a_bad_ca_file_or_a_missing_variable_is_a_config_error_naming_the_key() {
        let mut config = UpstreamConfig {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..UpstreamConfig::default()
        };
        let e = http_client(&config, &|_| None).unwrap_err();
        assert_eq!(e.field(), "upstream.ca_file");

        let not_pem = std::env::temp_dir().join(format!("tw-not-pem-{}", std::process::id()));
        std::fs::write(&not_pem, "hello").unwrap();
        config.ca_file = Some(not_pem.clone());
        let e = http_client(&config, &|_| None).unwrap_err();
        assert_eq!(e.field(), "upstream.ca_file");
        assert!(e.reason().contains("no PEM certificate"), "{e}");
        std::fs::remove_file(&not_pem).unwrap();

        config.ca_file = None;
        config.headers.insert(
            "Authorization".into(),
            HeaderTemplate::new("Bearer ${TW_TEST_TOKEN}"),
        );
        let e = http_client(&config, &|_| None).unwrap_err();
        assert_eq!(e.field(), "upstream.headers.Authorization");
        assert!(e.reason().contains("TW_TEST_TOKEN is not set"), "{e}");
        let (_, secrets) =
            http_client(&config, &|_| Some("tok-value".to_owned())).expect("a client");
        assert_eq!(secrets, ["Bearer tok-value"]);
    }
}
