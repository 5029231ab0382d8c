//! The keyed container never exceeds its bound, whatever the keys.

use std::sync::atomic::{AtomicU32, Ordering};

use proptest::prelude::*;
use toolwarden_core::{Bounds, KeyRef, KeyedState};

#[test]
fn a_million_distinct_keys_stay_within_the_bound() {
    let state: KeyedState<AtomicU32> =
        KeyedState::new(Bounds::max_keys(4096), |_| AtomicU32::new(0));
    let mut name = String::new();
    for i in 0..1_000_000u32 {
        name.clear();
        use std::fmt::Write;
        let _ = write!(name, "tool-{i}");
        state
            .entry(KeyRef::SessionTool("s", &name))
            .fetch_add(1, Ordering::Relaxed);
        assert!(state.len() <= 4096);
    }
    assert_eq!(state.len(), 4096);
    // Everything past the bound landed in the one overflow entry.
    assert_eq!(state.overflow().load(Ordering::Relaxed), 1_000_000 - 4096);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn never_exceeds_any_bound(max in 1usize..64, keys in prop::collection::vec("[a-z]{1,4}", 0..400)) {
        let state: KeyedState<()> = KeyedState::new(Bounds::max_keys(max), |_| ());
        let mut distinct = std::collections::HashSet::new();
        for k in &keys {
            let entry = state.entry(KeyRef::Tool(k));
            distinct.insert(k.clone());
            prop_assert!(state.len() <= max);
            // A key gets its own entry exactly when there was room for it.
            prop_assert_eq!(entry.is_overflow(), state.get(&KeyRef::Tool(k)).is_none());
        }
        prop_assert_eq!(state.len(), distinct.len().min(max));
    }
}
