//! The gRPC code of `examples/tonic_service` is generated from
//! `proto/toolwarden/mcp_tools.proto` and checked in, so building the
//! workspace needs neither `protoc` nor a build script. This test generates
//! it again, with the `protoc` binary of the `protoc-bin-vendored` crate
//! (nothing installed by hand), and fails when the checked-in file differs.
//!
//! After editing the `.proto` (or upgrading tonic / prost), write the new
//! code with `TOOLWARDEN_REGENERATE=1 cargo test --test tonic_codegen`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

const PROTO: &str = "proto/toolwarden/mcp_tools.proto";
const GENERATED: &str = "examples/tonic_service/toolwarden.mcp.v1.rs";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs tonic's code generator into `out_dir` and returns the module's code.
fn generate(out_dir: &Path) -> String {
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc for this platform");
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        .emit_rerun_if_changed(false)
        .out_dir(out_dir)
        .compile_with_config(config, &[root().join(PROTO)], &[root().join("proto")])
        .expect("tonic-prost-build compiles the proto");
    std::fs::read_to_string(out_dir.join("toolwarden.mcp.v1.rs")).expect("generated module")
}

#[test]
fn the_checked_in_grpc_code_is_what_the_proto_generates() {
    let out_dir = std::env::temp_dir().join(format!("toolwarden-codegen-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let generated = generate(&out_dir);
    let _ = std::fs::remove_dir_all(&out_dir);
    let path = root().join(GENERATED);
    if std::env::var_os("TOOLWARDEN_REGENERATE").is_some() {
        std::fs::write(&path, &generated).unwrap();
        eprintln!("wrote {}", path.display());
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "{GENERATED} is not what {PROTO} generates: run \
         `TOOLWARDEN_REGENERATE=1 cargo test --test tonic_codegen` and commit the result"
    );
}
