//! Core hot paths: the argument fingerprint and one keyed-state lookup.
//!
//! Run: `cargo bench --bench core`

mod support;

use std::hint::black_box;
use std::sync::atomic::AtomicU64;

use criterion::{criterion_group, criterion_main, Criterion};
use support::arguments_200_bytes;
use toolwarden_core::{fingerprint, Bounds, KeyRef, KeyedState};

fn bench_fingerprint(c: &mut Criterion) {
    // ~200 bytes serialised, nested, with a _meta member the hash must skip.
    let args = arguments_200_bytes(25);
    let obj = args.as_object();
    c.bench_function("core/fingerprint_200B", |b| {
        b.iter(|| fingerprint(black_box("search_repositories"), black_box(obj)))
    });
}

fn bench_keyed_lookup(c: &mut Criterion) {
    let state: KeyedState<AtomicU64> = KeyedState::new(Bounds::default(), |_| AtomicU64::new(0));
    let names: Vec<String> = (0..100).map(|i| format!("tool_{i}")).collect();
    for n in &names {
        state.entry(KeyRef::Tool(n));
    }
    // The lookup itself: find the key's state and read it.
    c.bench_function("core/keyed_lookup_100_keys", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 1) % names.len();
            state.with(&KeyRef::Tool(black_box(&names[i])), |v| {
                black_box(v.load(std::sync::atomic::Ordering::Relaxed))
            })
        })
    });
    // A lookup that also takes an owned handle (what a layer's future keeps).
    c.bench_function("core/keyed_entry_handle_100_keys", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 1) % names.len();
            black_box(state.entry(KeyRef::Tool(black_box(&names[i]))))
        })
    });
}

criterion_group!(benches, bench_fingerprint, bench_keyed_lookup);
criterion_main!(benches);
