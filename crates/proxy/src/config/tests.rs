//! Unit tests of the configuration: the file, its checks and round trips
//! (the environment's overrides in `tests/environment.rs`).

use std::time::Duration;

use toolwarden::circuit_breaker::TimeWindow;
use toolwarden::rate_limit::{Mode, Rate};
use toolwarden::retry::Jitter;
use toolwarden_core::FailureClass;

use super::load::test_support::{env_value, split_variable};
use super::*;

fn parse(text: &str) -> Result<Config, ConfigFileError> {
    Config::from_toml_str(text, std::iter::empty())
}

fn parse_env(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigFileError> {
    Config::from_toml_str(
        text,
        env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    )
}

fn key_of(text: &str) -> String {
    match parse(text) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e.key().unwrap_or("<no key>").to_owned(),
    }
}

#[test]
fn an_empty_file_is_every_default() {
    let config = parse("").unwrap();
    assert_eq!(config, Config::default());
    assert_eq!(
        config.upstream.restart_backoff_min,
        Duration::from_millis(100)
    );
    assert_eq!(config.downstream.max_line_bytes, 4 * 1024 * 1024);
    assert!(!config.catalog.trust_annotations);
    assert!(config.tools.is_empty());
}

#[test]
fn the_shipped_example_is_valid_and_sets_every_section() {
    let text = include_str!("../../toolwarden.example.toml");
    let config = parse(text).unwrap();
    assert_eq!(config.circuit_breaker.failure_threshold, Some(Some(5)));
    assert_eq!(config.circuit_breaker.count_window, Some(Some(100)));
    assert_eq!(config.rate_limit.mode, Some(Mode::Reject));
    assert_eq!(config.retry.jitter, Some(Jitter::Full));
    assert!(config.tools.contains_key("search_docs"));
    // Every key of every section appears in the example (commented or not):
    // the example is the reference.
    let defaults = toml::Table::try_from(Config::default()).unwrap();
    for section in SECTIONS {
        assert!(
            text.contains(&format!("[{section}]")),
            "the example lacks [{section}]"
        );
    }
    assert!(defaults.contains_key("upstream"));
    // Each key a default configuration writes, set or commented out.
    let set = |key: &str| {
        text.lines().any(|line| {
            let line = line.trim_start_matches(['#', ' ']);
            line.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
    };
    for (section, table) in &defaults {
        let Some(table) = table.as_table() else {
            continue;
        };
        for key in table.keys() {
            assert!(set(key), "the example lacks {section}.{key}");
        }
    }
}

#[test]
fn a_full_configuration_round_trips() {
    let config = parse(
        r#"
        [upstream]
        restart_backoff_min = "50ms"
        restart_backoff_max = "2s"
        call_timeout = "20s"

        [circuit_breaker]
        failure_threshold = false
        failure_rate_threshold = 0.5
        count_window = false
        time_window = "60s"
        reset_timeout = "10s"
        max_reset_timeout = "2m"
        reset_multiplier = 2.0
        bounds = { max_keys = 500 }

        [rate_limit]
        global = { rate = "100/s", burst = 20 }
        per_tool = { rate = 5 }
        mode = { max_wait = "2s" }

        [retry]
        max_attempts = 3
        jitter = "equal"
        retry_on = ["transient", "server"]
        budget = { ratio = 0.2, ttl = "10s" }

        [loop_guard]
        limits = { max_failing_repeats = 3, max_repeats = false }
        window_calls = 16
        bounds = { idle_timeout = false }

        [tools."search_docs"]
        safe_to_repeat = true
        cacheable = true
        circuit_breaker = { failure_threshold = 2 }
        rate_limit = { per_tool = { rate = "1/s", burst = 2 } }
        retry = { max_attempts = 5, base_delay = "100ms", max_delay = "1s" }
        loop_guard = { limits = { max_repeats = false, cycles = false } }

        [tools."poll_status"]
        loop_guard = { exempt = true }
        "#,
    )
    .unwrap();
    assert_eq!(config.circuit_breaker.failure_threshold, Some(None));
    assert_eq!(
        config.circuit_breaker.time_window,
        Some(Some(TimeWindow::new(Duration::from_secs(60), 10)))
    );
    assert_eq!(
        config.rate_limit.per_tool.unwrap().quota(),
        (Rate::per_second(5), 5)
    );
    assert_eq!(
        config.rate_limit.mode,
        Some(Mode::Wait {
            max_wait: Duration::from_secs(2)
        })
    );
    assert_eq!(config.retry.jitter, Some(Jitter::Equal));
    assert_eq!(
        config.retry.retry_on,
        Some(vec![FailureClass::Transient, FailureClass::Server])
    );
    assert_eq!(config.loop_guard.bounds.unwrap().idle_timeout, None);
    let tool = config.tool("search_docs").unwrap();
    assert_eq!(tool.retry.as_ref().unwrap().max_attempts, Some(5));
    let quota = tool.rate_limit.as_ref().unwrap().per_tool.unwrap();
    assert_eq!(quota.rate.interval(), Duration::from_secs(1));
    // What check-config --print writes reads back the same.
    let text = toml::to_string(&config).unwrap();
    assert_eq!(parse(&text).unwrap(), config);
}

#[test]
fn unknown_keys_are_named_in_every_section() {
    for section in SECTIONS {
        let key = key_of(&format!("[{section}]\nbogus_key = 1\n"));
        assert_eq!(key, format!("{section}.bogus_key"));
    }
    assert_eq!(key_of("bogus = 1\n"), "bogus");
    assert_eq!(
        key_of("[tools.search]\nbogus = 1\n"),
        "tools.\"search\".bogus"
    );
    assert_eq!(
        key_of("[tools.search.retry]\nbudget = false\n"),
        "tools.\"search\".retry.budget"
    );
    // A layer-wide knob is not a key of a tool's table.
    assert_eq!(
        key_of("[tools.search.loop_guard]\nwindow_calls = 8\n"),
        "tools.\"search\".loop_guard.window_calls"
    );
    let err = parse("[retry]\nmax_atempts = 3\n").unwrap_err();
    assert!(err.to_string().contains("`retry.max_atempts`"), "{err}");
    assert!(
        err.to_string().contains("max_attempts"),
        "suggests the real keys: {err}"
    );
}

#[test]
fn bad_values_name_their_key() {
    let cases: &[(&str, &str)] = &[
        (
            "[upstream]\nrestart_backoff_min = \"0s\"",
            "upstream.restart_backoff_min",
        ),
        (
            "[upstream]\nrestart_backoff_min = \"5s\"\nrestart_backoff_max = \"1s\"",
            "upstream.restart_backoff_max",
        ),
        (
            "[upstream]\nconnect_timeout = \"soon\"",
            "upstream.connect_timeout",
        ),
        (
            "[upstream]\ncall_timeout = \"0ms\"",
            "upstream.call_timeout",
        ),
        (
            "[downstream]\nmax_line_bytes = 3",
            "downstream.max_line_bytes",
        ),
        (
            "[downstream]\nmax_body_bytes = -1",
            "downstream.max_body_bytes",
        ),
        (
            "[catalog]\ntrust_annotations = \"yes\"",
            "catalog.trust_annotations",
        ),
        ("[http]\nhealth_history = 0", "http.health_history"),
        ("[http]\nhealth_history = 1001", "http.health_history"),
        // From the layer builders, in the file's keys.
        (
            "[circuit_breaker]\nfailure_threshold = 0",
            "circuit_breaker.failure_threshold",
        ),
        (
            "[circuit_breaker]\nfailure_threshold = \"abc\"",
            "circuit_breaker.failure_threshold",
        ),
        (
            "[circuit_breaker]\nfailure_threshold = true",
            "circuit_breaker.failure_threshold",
        ),
        (
            "[circuit_breaker]\nfailure_rate_threshold = 1.5",
            "circuit_breaker.failure_rate_threshold",
        ),
        (
            "[circuit_breaker]\nfailure_rate_threshold = 0.0",
            "circuit_breaker.failure_rate_threshold",
        ),
        (
            "[circuit_breaker]\ncount_window = 0",
            "circuit_breaker.count_window",
        ),
        (
            "[circuit_breaker]\ntime_window = { duration = \"30s\", buckets = 0 }",
            "circuit_breaker.time_window.buckets",
        ),
        // The stack's check of the window against the attempt timeout.
        (
            "[circuit_breaker]\ntime_window = \"0s\"",
            "circuit_breaker.time_window, upstream.attempt_timeout",
        ),
        (
            "[circuit_breaker]\ntime_window = true",
            "circuit_breaker.time_window",
        ),
        (
            "[circuit_breaker]\nminimum_calls = 0",
            "circuit_breaker.minimum_calls",
        ),
        (
            "[circuit_breaker]\nslow_call_rate_threshold = -0.1",
            "circuit_breaker.slow_call_rate_threshold",
        ),
        (
            "[circuit_breaker]\nreset_multiplier = 0.5",
            "circuit_breaker.reset_multiplier",
        ),
        (
            "[circuit_breaker]\nreset_timeout = \"1m\"\nmax_reset_timeout = \"10s\"",
            "circuit_breaker.max_reset_timeout",
        ),
        (
            "[circuit_breaker]\nhalf_open_max_calls = 0",
            "circuit_breaker.half_open_max_calls",
        ),
        (
            "[rate_limit]\nglobal = { rate = \"0/s\" }",
            "rate_limit.global.rate",
        ),
        (
            "[rate_limit]\nglobal = { rate = \"10/fortnight\" }",
            "rate_limit.global.rate",
        ),
        ("[rate_limit]\nglobal = { burst = 5 }", "rate_limit.global"),
        (
            "[rate_limit]\nper_tool = { rate = \"5/s\", burst = 0 }",
            "rate_limit.per_tool.burst",
        ),
        ("[rate_limit]\nmode = \"drop\"", "rate_limit.mode"),
        (
            "[rate_limit]\nmode = { max_wait = \"0s\" }",
            "rate_limit.mode.max_wait",
        ),
        ("[retry]\nmax_attempts = 0", "retry.max_attempts"),
        (
            "[retry]\nbase_delay = \"2s\"\nmax_delay = \"1s\"",
            "retry.max_delay",
        ),
        ("[retry]\njitter = \"some\"", "retry.jitter"),
        ("[retry]\nretry_on = []", "retry.retry_on"),
        ("[retry]\nretry_on = [\"sometimes\"]", "retry.retry_on[0]"),
        ("[retry]\nbudget = { ratio = 11 }", "retry.budget.ratio"),
        ("[retry]\nbudget = { ttl = \"2h\" }", "retry.budget.ttl"),
        ("[retry]\ndeadline = \"0s\"", "retry.deadline"),
        (
            "[loop_guard]\nwindow_calls = 2000",
            "loop_guard.window_calls",
        ),
        ("[loop_guard]\nwindow_calls = 1", "loop_guard.window_calls"),
        (
            "[loop_guard]\nmax_cycle_period = 9",
            "loop_guard.max_cycle_period",
        ),
        (
            "[loop_guard]\nmax_cycle_repeats = 1",
            "loop_guard.max_cycle_repeats",
        ),
        (
            "[loop_guard]\nwindow_calls = 10\nlimits = { max_repeats = 12 }",
            "loop_guard.limits.max_repeats",
        ),
        (
            "[loop_guard]\nlimits = { max_repeats = 0 }",
            "loop_guard.limits.max_repeats",
        ),
        (
            "[loop_guard]\nbounds = { max_keys = 0 }",
            "loop_guard.bounds.max_keys",
        ),
        (
            "[fallback_cache]\nmax_staleness = \"0s\"",
            "fallback_cache.max_staleness",
        ),
        (
            "[fallback_cache]\nfresh_ttl = \"1h\"\nmax_staleness = \"1m\"",
            "fallback_cache.fresh_ttl, fallback_cache.max_staleness",
        ),
        (
            "[fallback_cache]\nmax_entries = 0",
            "fallback_cache.max_entries",
        ),
        ("[observability]\nmax_tools = 0", "observability.max_tools"),
        (
            "[tools.\"a b\"]\nsafe_to_repeat = 1",
            "tools.\"a b\".safe_to_repeat",
        ),
        (
            "[tools.search.retry]\nmax_attempts = 0",
            "tools.\"search\".retry.max_attempts",
        ),
        (
            "[tools.search.rate_limit]\nper_tool = { burst = 3 }",
            "tools.\"search\".rate_limit.per_tool",
        ),
        (
            "[tools.search.rate_limit]\nper_tool = { rate = \"0/s\" }",
            "tools.\"search\".rate_limit.per_tool.rate",
        ),
        (
            "[tools.search.circuit_breaker]\nfailure_rate_threshold = 2",
            "tools.\"search\".circuit_breaker.failure_rate_threshold",
        ),
        (
            "[tools.search.loop_guard]\nexempt = true\nlimits = { cycles = false }",
            "tools.\"search\".loop_guard.exempt",
        ),
        ("[tools.\"\"]\ncacheable = true", "tools.\"\""),
        // Hedging: checked whether on or not (`enabled = false`).
        ("[hedge]\npercentile = 1.5", "hedge.percentile"),
        (
            "[hedge]\nenabled = false\npercentile = 1.5",
            "hedge.percentile",
        ),
        ("[hedge]\ndelay = \"0s\"", "hedge.delay"),
        ("[hedge]\nbudget = { ratio = -1 }", "hedge.budget.ratio"),
        ("[hedge]\nbudget = { speed = 1 }", "hedge.budget.speed"),
        (
            "[hedge]\n[tools.search.hedge]\nmin_samples = 0",
            "tools.\"search\".hedge.min_samples",
        ),
        (
            "[hedge]\nenabled = false\n[tools.search.hedge]\ndelay = \"2h\"",
            "tools.\"search\".hedge.delay",
        ),
        // A tool's hedge table without the section: the layer is off.
        (
            "[tools.search.hedge]\ndelay = \"1s\"",
            "tools.\"search\".hedge",
        ),
    ];
    for (text, key) in cases {
        let err = parse(text).unwrap_err();
        assert_eq!(err.key(), Some(*key), "{text}\n→ {err}");
        assert!(err.to_string().contains(key), "{err}");
        assert_eq!(err.env_var(), None);
    }
}

#[test]
fn the_layers_rules_are_the_layers_own() {
    // The loop guard remembers at least 2 calls: its builder refuses 1, and
    // its message is the one shown.
    let err = parse("[loop_guard]\nwindow_calls = 1\n").unwrap_err();
    assert_eq!(err.key(), Some("loop_guard.window_calls"));
    assert!(err.message().contains("between 2 and 1024"), "{err}");
    // The breaker allows more successes to close than probes at once
    // (probes are admitted again as earlier ones end).
    let config =
        parse("[circuit_breaker]\nhalf_open_max_calls = 1\nsuccess_threshold = 2\n").unwrap();
    assert_eq!(config.circuit_breaker.success_threshold, Some(2));
    // A tool's table is checked in its own section.
    let err =
        parse("[tools.\"x\".loop_guard]\nlimits = { max_failing_repeats = 40 }\n").unwrap_err();
    assert_eq!(
        err.key(),
        Some("tools.\"x\".loop_guard.limits.max_failing_repeats")
    );
}

#[test]
fn syntax_errors_say_where() {
    let err = parse("[retry\nmax_attempts = 3\n").unwrap_err();
    assert_eq!(err.key(), None);
    assert!(err.to_string().contains("line 1"), "{err}");
}

#[test]
fn upstream_headers_and_ca_file_parse_check_and_round_trip() {
    let text = r#"
        [upstream]
        ca_file = "/etc/toolwarden/ca.pem"
        headers = { Authorization = "Bearer ${MCP_TOKEN}", "X-Tenant" = "@file:/run/secrets/t" }
    "#;
    let config = parse(text).unwrap();
    assert_eq!(
        config.upstream.ca_file.as_deref(),
        Some(std::path::Path::new("/etc/toolwarden/ca.pem"))
    );
    assert_eq!(
        config.upstream.headers["Authorization"],
        HeaderTemplate::new("Bearer ${MCP_TOKEN}")
    );
    // --print writes them as written (the variable's name, not its value).
    let printed = toml::to_string(&config).unwrap();
    assert!(printed.contains("${MCP_TOKEN}"), "{printed}");
    assert_eq!(parse(&printed).unwrap(), config);
    // Debug (what a log of the configuration would show) never shows a value.
    let literal =
        parse("[upstream]\nheaders = { Authorization = \"Bearer lit-secret\" }\n").unwrap();
    assert!(!format!("{literal:?}").contains("lit-secret"));

    // Bad names and templates are named by key.
    assert_eq!(
        key_of("[upstream]\nheaders = { Authorization = \"Bearer ${MCP_TOKEN\" }\n"),
        "upstream.headers.Authorization"
    );
    assert_eq!(
        key_of("[upstream]\nheaders = { Accept = \"x\" }\n"),
        "upstream.headers.Accept"
    );
    assert_eq!(
        key_of("[upstream]\nheaders = { Authorization = 5 }\n"),
        "upstream.headers.Authorization"
    );
    assert_eq!(key_of("[upstream]\nca_file = \"\"\n"), "upstream.ca_file");

    // From the environment: an inline table.
    let config = parse_env(
        "",
        &[(
            "TOOLWARDEN_UPSTREAM_HEADERS",
            "{ Authorization = \"Bearer ${T}\" }",
        )],
    )
    .unwrap();
    assert_eq!(
        config.upstream.headers["Authorization"],
        HeaderTemplate::new("Bearer ${T}")
    );
}

#[test]
fn session_mode_is_shared_unless_per_session_is_asked_for() {
    assert_eq!(
        parse("").unwrap().upstream.session_mode,
        SessionMode::Shared
    );
    let file = parse("[upstream]\nsession_mode = \"per_session\"").unwrap();
    assert_eq!(file.upstream.session_mode, SessionMode::PerSession);
    let env = parse_env("", &[("TOOLWARDEN_UPSTREAM_SESSION_MODE", "per_session")]).unwrap();
    assert_eq!(env.upstream.session_mode, SessionMode::PerSession);
    assert_eq!(
        key_of("[upstream]\nsession_mode = \"per_client\""),
        "upstream.session_mode"
    );
}

/// The keys that act only on requests other than `tools/call` would do
/// nothing in the proxy (those go straight upstream): refused, not
/// accepted and ignored.
#[test]
fn keys_for_other_methods_are_refused_as_they_would_do_nothing() {
    assert_eq!(
        key_of("[rate_limit]\nlimit_all_methods = true\n"),
        "rate_limit.limit_all_methods"
    );
    assert_eq!(
        key_of("[retry]\nsafe_methods = [\"tools/list\"]\n"),
        "retry.safe_methods"
    );
    parse("[rate_limit]\nlimit_all_methods = false\n[retry]\nsafe_methods = []\n")
        .expect("saying they are off is fine");
}

/// Each session's upstream answers from state of its own, so one
/// session's answer must never serve another's call: coalescing joined
/// calls across sessions (session B got session A's upstream's answer)
/// and the fallback cache served one session's result to all.
#[test]
fn per_session_upstreams_keep_coalescing_and_the_cache_within_a_session() {
    let stack = |text: &str| {
        let config = parse(text).unwrap();
        crate::stack::standard_stack(
            &config,
            &crate::stack::SharedState::new(
                toolwarden_core::Events::new(),
                crate::endpoints::MetricsEndpoints::new(),
            ),
        )
        .unwrap()
    };
    let per_session = stack("[upstream]\nsession_mode = \"per_session\"\n[coalesce]\n");
    assert!(per_session.coalesce_layer().unwrap().per_session());
    assert!(per_session.fallback_cache_layer().unwrap().per_session());
    let shared = stack("[coalesce]\n");
    assert!(!shared.coalesce_layer().unwrap().per_session());
    assert!(!shared.fallback_cache_layer().unwrap().per_session());
    // Asking for both to be shared across sessions is refused, by key.
    assert_eq!(
        key_of("[upstream]\nsession_mode = \"per_session\"\n[coalesce]\nper_session = false\n"),
        "coalesce.per_session"
    );
    assert_eq!(
        key_of(
            "[upstream]\nsession_mode = \"per_session\"\n[fallback_cache]\nper_session = false\n"
        ),
        "fallback_cache.per_session"
    );
    // In shared mode the cache can be scoped too.
    assert!(stack("[fallback_cache]\nper_session = true\n")
        .fallback_cache_layer()
        .unwrap()
        .per_session());
}

#[test]
fn a_pinned_protocol_version_must_be_one_with_an_initialize_handshake() {
    assert_eq!(parse("").unwrap().upstream.pinned_protocol_version(), None);
    let file = parse("[upstream]\nprotocol_version = \"2025-06-18\"").unwrap();
    assert_eq!(
        file.upstream
            .pinned_protocol_version()
            .map(|v| v.as_str().to_owned()),
        Some("2025-06-18".to_owned())
    );
    let env = parse_env(
        "",
        &[("TOOLWARDEN_UPSTREAM_PROTOCOL_VERSION", "2024-11-05")],
    )
    .unwrap();
    assert_eq!(env.upstream.protocol_version.as_deref(), Some("2024-11-05"));
    // Unknown, and known but without an initialize handshake.
    for bad in ["2025-13-01", "latest", "2026-07-28"] {
        assert_eq!(
            key_of(&format!("[upstream]\nprotocol_version = \"{bad}\"")),
            "upstream.protocol_version",
            "{bad}"
        );
    }
}

mod environment;
mod gateway;

#[test]
fn the_redis_section_is_the_redis_crates_settings() {
    use toolwarden::redis::{Fallback, RemoteOpenPolicy};
    let config = parse(
        r#"
        [redis]
        url = "redis://127.0.0.1:6379/0"
        prefix = "fleet"
        policy = "quorum"
        quorum = 3
        probe_permit_ttl = "10s"
        fallback = "deny"
        "#,
    )
    .unwrap();
    let redis = config.redis.as_ref().unwrap();
    assert_eq!(redis.remote_open_policy(), RemoteOpenPolicy::Quorum(3));
    assert_eq!(redis.fallback(), Fallback::Deny);
    assert_eq!(redis.probe_permit_ttl, Some(Duration::from_secs(10)));
    assert!(redis.breaker_sync() && redis.distributed_quotas());
    // Unset: nothing is shared.
    assert_eq!(parse("").unwrap().redis, None);

    // Bad values name `redis.<key>`.
    assert_eq!(
        key_of("[redis]\nurl = \"http://example.com\"\n"),
        "redis.url"
    );
    assert_eq!(key_of("[redis]\nprefix = \"x\"\n"), "redis");
    assert_eq!(
        key_of("[redis]\nurl = \"redis://h\"\npolicy = \"quorum\"\nquorum = 0\n"),
        "redis.quorum"
    );
    assert_eq!(
        key_of("[redis]\nurl = \"redis://h\"\nquorum = 2\n"),
        "redis.quorum"
    );
    assert_eq!(
        key_of("[redis]\nurl = \"redis://h\"\nop_timeout = \"0s\"\n"),
        "redis.op_timeout"
    );
    assert_eq!(
        key_of("[redis]\nurl = \"redis://h\"\npolicy = \"majority\"\n"),
        "redis.policy"
    );
    assert_eq!(
        key_of("[redis]\nurl = \"redis://h\"\nfallback = \"maybe\"\n"),
        "redis.fallback"
    );
    assert_eq!(
        key_of("[redis]\nurl = \"redis://h\"\nservers = 2\n"),
        "redis.servers"
    );
}

#[test]
fn bulkhead_adaptive_table_makes_the_cap_adaptive_and_names_bad_keys() {
    let config = parse(
        "[bulkhead]\nmax_concurrent = 12\n[bulkhead.adaptive]\nlatency_threshold = \"2s\"\nmin_concurrent = 2\ninitial_concurrent = 6\ndecrease_factor = 0.75\n[tools.\"pdf\"]\nbulkhead = { max_concurrent = 4, adaptive = { initial_concurrent = 3 } }\n",
    )
    .unwrap();
    let adaptive = config.bulkhead.as_ref().unwrap().adaptive.clone().unwrap();
    assert_eq!(adaptive.latency_threshold, Some(Duration::from_secs(2)));
    assert_eq!(adaptive.decrease_factor, Some(0.75));
    let stack = crate::stack::standard_stack(
        &config,
        &crate::stack::SharedState::new(
            toolwarden_core::Events::new(),
            crate::endpoints::MetricsEndpoints::new(),
        ),
    )
    .unwrap();
    let bulkhead = stack.bulkhead_layer().unwrap();
    assert!(bulkhead.is_adaptive("search"));
    assert_eq!(
        bulkhead.current_limit(toolwarden_core::KeyRef::Tool("search")),
        6
    );
    assert_eq!(
        bulkhead.current_limit(toolwarden_core::KeyRef::Tool("pdf")),
        3
    );
    // Without the table the cap is fixed.
    let fixed = parse("[bulkhead]\nmax_concurrent = 5\n").unwrap();
    assert!(fixed.bulkhead.unwrap().adaptive.is_none());
    // Error paths name the key.
    assert_eq!(
        key_of("[bulkhead]\n[bulkhead.adaptive]\nmin_concurrent = 2\n"),
        "bulkhead.adaptive.latency_threshold"
    );
    assert_eq!(
        key_of("[bulkhead]\nadaptive = { latency_threshold = \"1s\", decrease_factor = 1.0 }\n"),
        "bulkhead.adaptive.decrease_factor"
    );
    assert_eq!(
        key_of("[bulkhead]\nmax_concurrent = 4\nadaptive = { latency_threshold = \"1s\", min_concurrent = 5 }\n"),
        "bulkhead.adaptive.min_concurrent"
    );
    assert_eq!(
        key_of("[bulkhead]\nadaptive = { latency_threshold = \"1s\" }\n[tools.\"pdf\"]\nbulkhead = { adaptive = { initial_concurrent = 0 } }\n"),
        "tools.\"pdf\".bulkhead.adaptive.initial_concurrent"
    );
    assert_eq!(
        key_of("[bulkhead]\nadaptive = { latency_threshold = \"1s\", max_concurrent = 3 }\n"),
        "bulkhead.adaptive.max_concurrent"
    );
}

#[test]
fn bulkhead_and_coalesce_sections_turn_the_layers_on_and_name_bad_keys() {
    let config = parse(
        "[bulkhead]\nmax_concurrent = 3\n[coalesce]\nper_session = true\n[tools.\"pdf\"]\nbulkhead = { max_concurrent = 1 }\ncoalesce = { coalesce = false }\n",
    )
    .unwrap();
    assert_eq!(config.bulkhead.as_ref().unwrap().max_concurrent, Some(3));
    assert_eq!(config.coalesce.as_ref().unwrap().per_session, Some(true));
    let stack = crate::stack::standard_stack(
        &config,
        &crate::stack::SharedState::new(
            toolwarden_core::Events::new(),
            crate::endpoints::MetricsEndpoints::new(),
        ),
    )
    .unwrap();
    let bulkhead = stack.bulkhead_layer().unwrap();
    assert_eq!(bulkhead.max_concurrent("pdf"), 1);
    assert_eq!(bulkhead.max_concurrent("other"), 3);
    assert!(!stack.coalesce_layer().unwrap().coalesces("pdf"));
    // Absent (or enabled = false): off.
    assert!(parse("").unwrap().bulkhead.is_none());
    // Error paths name the key.
    assert_eq!(
        key_of("[bulkhead]\nmax_concurrent = 0\n"),
        "bulkhead.max_concurrent"
    );
    assert_eq!(
        key_of("[bulkhead]\n[tools.\"pdf\"]\nbulkhead = { max_concurrent = 0 }\n"),
        "tools.\"pdf\".bulkhead.max_concurrent"
    );
    assert_eq!(key_of("[bulkhead]\ncap = 1\n"), "bulkhead.cap");
    assert_eq!(
        key_of("[coalesce]\nmax_in_flight = 0\n"),
        "coalesce.max_in_flight"
    );
    assert_eq!(key_of("[coalesce]\nshare = true\n"), "coalesce.share");
    // A tool's table of a layer that is off does nothing: refused.
    assert_eq!(
        key_of("[tools.\"pdf\"]\nbulkhead = { max_concurrent = 1 }\n"),
        "tools.\"pdf\".bulkhead"
    );
    assert_eq!(
        key_of("[coalesce]\nenabled = false\n[tools.\"pdf\"]\ncoalesce = { coalesce = true }\n"),
        "tools.\"pdf\".coalesce"
    );
}
