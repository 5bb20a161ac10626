//! Generates the gRPC code from `proto/coordinator.proto` with a protoc that
//! ships as a crate, so a fresh machine builds with cargo alone.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure().compile_protos(&["proto/coordinator.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/coordinator.proto");
    Ok(())
}
