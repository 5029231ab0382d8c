//! The environment's overrides (`TOOLWARDEN_<SECTION>_<KEY>`).

use super::*;

#[test]
fn the_environment_overrides_the_file() {
    let text = "[circuit_breaker]\nfailure_threshold = 5\n";
    let config = parse_env(
        text,
        &[
            ("TOOLWARDEN_CIRCUIT_BREAKER_FAILURE_THRESHOLD", "7"),
            ("TOOLWARDEN_CIRCUIT_BREAKER_RESET_TIMEOUT", "45s"),
            (
                "TOOLWARDEN_RATE_LIMIT_GLOBAL",
                r#"{ rate = "10/s", burst = 4 }"#,
            ),
            ("TOOLWARDEN_RATE_LIMIT_MODE", "wait"),
            ("TOOLWARDEN_RETRY_RETRY_ON", r#"["transient"]"#),
            ("TOOLWARDEN_RETRY_BUDGET", "false"),
            ("TOOLWARDEN_CATALOG_TRUST_ANNOTATIONS", "true"),
            ("TOOLWARDEN_CIRCUIT_BREAKER_FAILURE_RATE_THRESHOLD", "0.25"),
            ("TOOLWARDEN_CIRCUIT_BREAKER_SLOW_CALL_DURATION", "false"),
            ("TOOLWARDEN_UPSTREAM_CALL_TIMEOUT", "\"20s\""),
            // Not configuration: no such section.
            ("TOOLWARDEN_E2E", "required"),
            ("TOOLWARDEN_SERVER_EVERYTHING", "/bin/true"),
            ("OTHER_VARIABLE", "x"),
        ],
    )
    .unwrap();
    assert_eq!(config.circuit_breaker.failure_threshold, Some(Some(7)));
    assert_eq!(
        config.circuit_breaker.reset_timeout,
        Some(Duration::from_secs(45))
    );
    assert_eq!(
        config.circuit_breaker.failure_rate_threshold,
        Some(Some(0.25))
    );
    assert_eq!(config.circuit_breaker.slow_call_duration, Some(None));
    assert_eq!(config.rate_limit.global.unwrap().burst, Some(4));
    assert_eq!(
        config.rate_limit.mode,
        Some(Mode::Wait {
            max_wait: toolwarden::rate_limit::DEFAULT_MAX_WAIT
        })
    );
    assert_eq!(config.retry.retry_on, Some(vec![FailureClass::Transient]));
    assert_eq!(config.retry.budget, Some(None));
    assert!(config.catalog.trust_annotations);
    assert_eq!(config.upstream.call_timeout, Some(Duration::from_secs(20)));
}

#[test]
fn bad_environment_values_name_the_variable_and_the_key() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "TOOLWARDEN_CIRCUIT_BREAKER_FAILURE_THRESHOLD",
            "abc",
            "circuit_breaker.failure_threshold",
        ),
        (
            "TOOLWARDEN_CIRCUIT_BREAKER_FAILURE_THRESHOLD",
            "0",
            "circuit_breaker.failure_threshold",
        ),
        ("TOOLWARDEN_RETRY_MAX_ATTEMPT", "3", "retry.max_attempt"),
        ("TOOLWARDEN_RETRY_BASE_DELAY", "fast", "retry.base_delay"),
        (
            "TOOLWARDEN_RATE_LIMIT_MAX_WAIT",
            "1s",
            "rate_limit.max_wait",
        ),
        (
            "TOOLWARDEN_RATE_LIMIT_MODE",
            r#"{ max_wait = "0s" }"#,
            "rate_limit.mode.max_wait",
        ),
        (
            "TOOLWARDEN_LOOP_GUARD_WINDOW_CALLS",
            "1",
            "loop_guard.window_calls",
        ),
        ("TOOLWARDEN_RETRY_RETRY_ON", "[1, 2]", "retry.retry_on[0]"),
        (
            "TOOLWARDEN_UPSTREAM_RESTART_BACKOFF_MIN",
            "0s",
            "upstream.restart_backoff_min",
        ),
        ("TOOLWARDEN_RETRY_", "3", "retry"),
    ];
    for (var, value, key) in cases {
        let err = parse_env("", &[(var, value)]).unwrap_err();
        assert_eq!(err.key(), Some(*key), "{var}={value} → {err}");
        assert_eq!(err.env_var(), Some(*var), "{var}={value} → {err}");
        let text = err.to_string();
        assert!(text.contains(var) && text.contains(key), "{text}");
    }
    // A bad file value is not blamed on an unrelated variable.
    let err = parse_env(
        "[retry]\nmax_attempts = 0\n",
        &[("TOOLWARDEN_RETRY_BASE_DELAY", "1s")],
    )
    .unwrap_err();
    assert_eq!(err.key(), Some("retry.max_attempts"));
    assert_eq!(err.env_var(), None);
}

#[test]
fn environment_values_are_toml_literals_or_strings() {
    assert_eq!(env_value("5"), toml::Value::Integer(5));
    assert_eq!(env_value("true"), toml::Value::Boolean(true));
    assert_eq!(env_value("30s"), toml::Value::String("30s".into()));
    assert_eq!(env_value("\"x\""), toml::Value::String("x".into()));
    // A value cannot smuggle in other keys.
    assert_eq!(
        env_value("1\nother = 2"),
        toml::Value::String("1\nother = 2".into())
    );
    assert_eq!(
        split_variable("CIRCUIT_BREAKER_FAILURE_THRESHOLD"),
        Some(("circuit_breaker", "failure_threshold".to_owned()))
    );
    assert_eq!(split_variable("RETRYX_MAX"), None);
    assert_eq!(split_variable("E2E"), None);
}

#[test]
fn rates_are_read_by_the_rate_limit_crate() {
    // The form is the rate-limit crate's (its tests cover it); what a quota
    // may be is its builder's call.
    let config = parse("[rate_limit]\nglobal = { rate = \"600/min\" }\n").unwrap();
    let (rate, burst) = config.rate_limit.global.unwrap().quota();
    assert_eq!(
        (rate.count(), rate.per(), burst),
        (600, Duration::from_secs(60), 600)
    );
    let err = parse("[rate_limit]\nglobal = { rate = 0 }\n").unwrap_err();
    assert_eq!(err.key(), Some("rate_limit.global.rate"));
    let err = parse("[rate_limit]\nglobal = { rate = \"5/soon\" }\n").unwrap_err();
    assert_eq!(err.key(), Some("rate_limit.global.rate"));
}

#[test]
fn redis_keys_come_from_the_environment_but_not_the_test_suites_server() {
    let config = parse_env(
        "",
        &[
            ("TOOLWARDEN_REDIS_URL", "redis://10.0.0.5:6379/"),
            ("TOOLWARDEN_REDIS_REPLICA_ID", "replica-7"),
            ("TOOLWARDEN_REDIS_OP_TIMEOUT", "20ms"),
            // The test suite's redis-server binary, not `redis.server`.
            ("TOOLWARDEN_REDIS_SERVER", "/usr/bin/redis-server"),
        ],
    )
    .unwrap();
    let redis = config.redis.unwrap();
    assert_eq!(redis.url, "redis://10.0.0.5:6379/");
    assert_eq!(redis.replica_id.as_deref(), Some("replica-7"));
    assert_eq!(redis.op_timeout, Some(Duration::from_millis(20)));
    let err = parse_env("", &[("TOOLWARDEN_REDIS_URL", "nope://x")]).unwrap_err();
    assert_eq!(err.key(), Some("redis.url"));
    assert_eq!(err.env_var(), Some("TOOLWARDEN_REDIS_URL"));
}
