//! `toolwarden`: the proxy binary. Everything is in the library (`toolwarden_proxy::cli`).

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser as _;

/// mimalloc, unless built without the `mimalloc` feature: a proxied call
/// makes hundreds of small allocations (rmcp's messages, hyper's headers,
/// serde's buffers), which cost glibc's allocator about a fifth of the
/// proxy's instructions (BENCHMARKS.md).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    toolwarden_proxy::cli::main(toolwarden_proxy::cli::Cli::parse())
}
