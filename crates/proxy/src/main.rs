//! `toolwarden`: the proxy binary. Everything is in the library (`toolwarden_proxy::cli`).

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    toolwarden_proxy::cli::main(toolwarden_proxy::cli::Cli::parse())
}
