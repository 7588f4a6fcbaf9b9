//! Generates the gRPC code from `proto/`. protoc comes from the `protoc-bin-vendored` crate,
//! so no system protobuf compiler is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure().compile_protos(
        &["proto/kord/v1/kord.proto", "proto/kord/v1/peer.proto"],
        &["proto"],
    )?;
    Ok(())
}
