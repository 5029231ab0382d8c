//! Routing by exposed name, over adversarial tool names: whatever names the
//! servers list (separators, aliases' names, unicode, empty), every exposed
//! name is unique and routes back to its upstream and tool, and no name
//! routes to a tool that is not exposed (a denied one, a shadowed one).

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;

use super::Gateway;
use crate::config::{Config, UpstreamEntry};
use crate::downstream::Downstreams;
use crate::endpoints::MetricsEndpoints;
use crate::stack::SharedState;

fn gateway(
    upstreams: &BTreeMap<String, UpstreamEntry>,
    prefix_single: bool,
) -> std::sync::Arc<Gateway> {
    let mut config = Config::default();
    config.gateway.prefix_single = prefix_single;
    config.upstreams = upstreams.clone();
    let shared = SharedState::new(toolwarden_core::Events::new(), MetricsEndpoints::new());
    Gateway::new(&config, &shared, Downstreams::new(), BTreeMap::new()).unwrap()
}

fn tool_name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z_]{0,8}",
        "[a-z]{1,3}__[a-z_]{0,6}",
        "[a-zé ✓_-]{1,6}",
        Just("__".to_owned()),
    ]
}

fn upstream() -> impl Strategy<Value = (Vec<String>, Vec<(String, usize)>, Vec<String>)> {
    (
        proptest::collection::vec(tool_name(), 0..8),
        proptest::collection::vec(("[a-z_]{1,6}", 0usize..8), 0..3),
        proptest::collection::vec(prop_oneof![Just("x*"), Just("*__*"), Just("a?")], 0..2),
    )
        .prop_map(|(tools, aliases, deny)| {
            let deny = deny.into_iter().map(str::to_owned).collect();
            (tools, aliases, deny)
        })
}

proptest! {
    #[test]
    fn every_exposed_name_is_unique_and_routes_back(
        ups in proptest::collection::btree_map("[a-z][a-z0-9-]{0,5}", upstream(), 1..4),
        prefix_single in any::<bool>(),
        probes in proptest::collection::vec(tool_name(), 0..8),
    ) {
        let mut entries = BTreeMap::new();
        let mut tools_of = BTreeMap::new();
        for (name, (tools, aliases, deny)) in &ups {
            let mut entry = UpstreamEntry { command: Some("x".to_owned()), ..UpstreamEntry::default() };
            entry.deny = deny.clone();
            for (alias, i) in aliases {
                if let Some(tool) = tools.get(*i) {
                    // One alias per tool, as validation requires.
                    if !entry.aliases.values().any(|t| t == tool) && !tool.is_empty() {
                        entry.aliases.insert(alias.clone(), tool.clone());
                    }
                }
            }
            entry.aliases.retain(|_, tool| !entry.deny.iter().any(|d| globset::Glob::new(d).unwrap().compile_matcher().is_match(tool.as_str())));
            entries.insert(name.clone(), entry);
            tools_of.insert(name.clone(), tools.clone());
        }
        let gateway = gateway(&entries, prefix_single);
        let mut seen: HashMap<String, (String, String)> = HashMap::new();
        for member in gateway.members() {
            for tool in &tools_of[member.name()] {
                let Some(exposed) = member.names().exposed(tool) else { continue };
                let (routed, server_name) = gateway
                    .tool_route(&exposed)
                    .unwrap_or_else(|| panic!("{exposed:?} does not route"));
                prop_assert_eq!(routed.name(), member.name());
                prop_assert_eq!(&server_name, tool);
                if let Some(other) = seen.insert(exposed.clone(), (member.name().to_owned(), tool.clone())) {
                    prop_assert_eq!(&other, &(member.name().to_owned(), tool.clone()), "{} listed twice", exposed);
                }
            }
        }
        // Any name at all routes only to a tool exposed under that name.
        for probe in probes.iter().cloned().chain(seen.keys().map(|k| format!("{k}x"))) {
            if let Some((member, tool)) = gateway.tool_route(&probe) {
                prop_assert_eq!(member.names().exposed(&tool), Some(probe.clone()));
            }
        }
    }
}
