//! `[gateway]` and `[upstreams.NAME]`.

use super::*;

const TWO: &str = r#"
[upstreams.time]
command = "mcp-server-time"
connect_timeout = "5s"
deny = ["convert_*"]
aliases = { now = "get_current_time" }
circuit_breaker = { failure_threshold = 3 }

[upstreams.time.tools."now"]
safe_to_repeat = true

[upstreams.docs]
url = "https://docs.example.com/mcp"
"#;

#[test]
fn upstreams_take_their_own_keys_and_every_upstream_key() {
    let config = parse(TWO).unwrap();
    let time = &config.upstreams["time"];
    assert_eq!(time.command.as_deref(), Some("mcp-server-time"));
    assert_eq!(time.connection.connect_timeout, Duration::from_secs(5));
    assert_eq!(time.deny, ["convert_*"]);
    assert_eq!(time.aliases["now"], "get_current_time");
    assert_eq!(time.circuit_breaker.failure_threshold, Some(Some(3)));
    assert_eq!(
        config.upstreams["docs"].connection.connect_timeout,
        UpstreamConfig::default().connect_timeout,
        "unset keys keep their defaults"
    );
}

/// `[gateway]` is set from the environment like the other sections (its
/// variables were ignored, silently); a bad value names its variable.
#[test]
fn the_gateway_keys_come_from_the_environment_too() {
    let config = parse_env(TWO, &[("TOOLWARDEN_GATEWAY_SEPARATOR", "--")]).unwrap();
    assert_eq!(config.gateway.separator, "--");
    assert_eq!(config.upstream_prefix("time"), "time--");
    // `time` contains `e`: refused, as from the file.
    let err = parse_env(TWO, &[("TOOLWARDEN_GATEWAY_SEPARATOR", "e")]).unwrap_err();
    assert!(err.to_string().contains("gateway.separator"), "{err}");
    let err = parse_env(TWO, &[("TOOLWARDEN_GATEWAY_OPEN_UPSTREAMS", "shout")]).unwrap_err();
    assert_eq!(err.key(), Some("gateway.open_upstreams"), "{err}");
}

#[test]
fn several_upstreams_prefix_their_tools_and_one_keeps_bare_names() {
    let config = parse(TWO).unwrap();
    assert_eq!(config.upstream_prefix("time"), "time__");
    let tools = config.with_upstream_tools().tools;
    assert_eq!(tools["time__now"].safe_to_repeat, Some(true));

    let one = parse("[upstreams.time]\ncommand = \"t\"\n").unwrap();
    assert_eq!(one.upstream_prefix("time"), "");
    let forced = parse(
        "[gateway]\nprefix_single = true\nseparator = \".\"\n[upstreams.time]\ncommand = \"t\"\n",
    )
    .unwrap();
    assert_eq!(forced.upstream_prefix("time"), "time.");
}

#[test]
fn an_unknown_key_in_an_upstream_is_refused_by_name() {
    assert_eq!(
        key_of("[upstreams.time]\ncommand = \"t\"\nconect_timeout = \"5s\"\n"),
        "upstreams.\"time\".conect_timeout"
    );
}

#[test]
fn an_upstream_needs_exactly_one_of_command_and_url() {
    assert_eq!(
        key_of("[upstreams.time]\nargs = []\n"),
        "upstreams.\"time\".command"
    );
    assert_eq!(
        key_of("[upstreams.time]\ncommand = \"t\"\nurl = \"http://x/mcp\"\n"),
        "upstreams.\"time\".url"
    );
    assert_eq!(
        key_of("[upstreams.time]\nurl = \"ftp://x/mcp\"\n"),
        "upstreams.\"time\".url"
    );
}

#[test]
fn names_separators_and_session_modes_are_checked() {
    assert_eq!(
        key_of("[upstreams.\"a b\"]\ncommand = \"t\"\n"),
        "upstreams.\"a b\""
    );
    assert_eq!(
        key_of("[upstreams.a__b]\ncommand = \"t\"\n"),
        "upstreams.\"a__b\"",
        "a name holding the separator would make names ambiguous"
    );
    assert_eq!(key_of("[gateway]\nseparator = \"\"\n"), "gateway.separator");
    // `a_` and `__` expose `a___x`, split at its first `__` as `a` + `_x`:
    // listed, then unknown or sent to upstream `a`.
    assert_eq!(
        key_of("[upstreams.a_]\ncommand = \"t\"\n[upstreams.b]\ncommand = \"t\"\n"),
        "upstreams.\"a_\"",
        "a name ending with the separator's start reads as a shorter name"
    );
    assert_eq!(
        key_of("[gateway]\nseparator = \"-_-\"\n[upstreams.a-_]\ncommand = \"t\"\n"),
        "upstreams.\"a-_\""
    );
    parse("[gateway]\nseparator = \"-.\"\n[upstreams.a-]\ncommand = \"t\"\n")
        .expect("`a--.x` has its first `-.` after `a-`");
    parse("[upstreams._a_b]\ncommand = \"t\"\n[upstreams.c]\ncommand = \"t\"\n")
        .expect("`_` inside a name, or at its start, is no separator");
    // Accepted, and every session shared one upstream all the same.
    assert_eq!(
        key_of("[upstream]\nsession_mode = \"per_session\"\n[upstreams.t]\ncommand = \"t\"\n"),
        "upstream.session_mode"
    );
    assert_eq!(
        key_of("[upstreams.t]\ncommand = \"t\"\nsession_mode = \"per_session\"\n"),
        "upstreams.\"t\".session_mode"
    );
    assert_eq!(
        key_of("[upstreams.t]\ncommand = \"t\"\nconnect_timeout = \"0s\"\n"),
        "upstreams.\"t\".connect_timeout",
        "the [upstream] keys are checked as there"
    );
}

/// An upstream's `attempt_timeout` bounds its calls; the stack's own bound
/// was `[upstream]`'s (10 s by default), which cut a longer one short,
/// silently.
#[test]
fn an_upstreams_attempt_timeout_longer_than_the_default_is_the_stacks_bound() {
    let config = parse(
        "[upstreams.slow]\ncommand = \"t\"\nattempt_timeout = \"20s\"\n\
         [upstreams.quick]\ncommand = \"t\"\nattempt_timeout = \"2s\"\n",
    )
    .unwrap();
    let shared = crate::stack::SharedState::new(
        toolwarden_core::Events::new(),
        crate::endpoints::MetricsEndpoints::new(),
    );
    let stack = crate::stack::standard_stack(&config, &shared).unwrap();
    // Past it by a margin: the upstream's own bound ends a hung call
    // first, and its breaker counts it.
    assert_eq!(
        stack.attempt_timeout(),
        Duration::from_secs(20) + crate::config::GATEWAY_STACK_MARGIN
    );
    // And it is checked as `[upstream]`'s is, under its own name.
    assert_eq!(
        key_of("[upstreams.slow]\ncommand = \"t\"\nattempt_timeout = \"1h\"\n"),
        "upstreams.\"slow\".attempt_timeout, retry.deadline"
    );
    assert_eq!(
        key_of(
            "[upstreams.slow]\ncommand = \"t\"\nattempt_timeout = \"20s\"\n\
             [circuit_breaker]\nslow_call_duration = \"25s\"\n"
        ),
        "circuit_breaker.slow_call_duration, upstreams.\"slow\".attempt_timeout"
    );
}

#[test]
fn globs_and_aliases_are_checked() {
    assert_eq!(
        key_of("[upstreams.t]\ncommand = \"t\"\ndeny = [\"a[\"]\n"),
        "upstreams.\"t\".deny"
    );
    assert_eq!(
        key_of("[upstreams.t]\ncommand = \"t\"\ndeny = [\"x*\"]\naliases = { y = \"xy\" }\n"),
        "upstreams.\"t\".aliases.\"y\"",
        "an alias of a denied tool"
    );
    assert_eq!(
        key_of("[upstreams.t]\ncommand = \"t\"\naliases = { a = \"x\", b = \"x\" }\n"),
        "upstreams.\"t\".aliases.\"b\"",
        "two aliases of one tool"
    );
}

#[test]
fn a_tool_configured_twice_is_refused() {
    let text = format!("{TWO}\n[tools.\"time__now\"]\ncacheable = true\n");
    assert_eq!(key_of(&text), "upstreams.\"time\".tools.\"now\"");
}

#[test]
fn the_gateway_sections_round_trip_through_print() {
    let config = parse(TWO).unwrap();
    let printed = toml::to_string(&config).unwrap();
    assert_eq!(parse(&printed).unwrap(), config, "{printed}");
}
