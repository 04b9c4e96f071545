//! Generates the CSI v1 gRPC bindings from `csi.proto`.
//!
//! Uses the vendored `protoc` binary and include directory so no system
//! protobuf installation is needed. The protoc path is handed to prost-build
//! through its `Config` rather than the `PROTOC` environment variable, which
//! keeps this script free of `unsafe` (`std::env::set_var` is unsafe in
//! edition 2024 and the workspace forbids `unsafe_code`).

use std::error::Error;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=csi.proto");
    println!("cargo:rerun-if-changed=build.rs");

    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // Holds google/protobuf/{descriptor,timestamp,wrappers}.proto.
    let well_known = protoc_bin_vendored::include_path()?;

    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);

    let proto_files = [PathBuf::from("csi.proto")];
    let includes = [PathBuf::from("."), well_known];

    tonic_prost_build::configure().build_server(true).build_client(true).compile_with_config(
        config,
        &proto_files,
        &includes,
    )?;
    Ok(())
}
