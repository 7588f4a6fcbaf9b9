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
    // The server's Watch service, whose responses carry pre-encoded events (see the file).
    let wire_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("wire");
    std::fs::create_dir_all(&wire_dir)?;
    tonic_prost_build::configure()
        .build_client(false)
        .out_dir(&wire_dir)
        .extern_path(".kord.v1.WatchRequest", "crate::v1::WatchRequest")
        .extern_path(".kord.v1.ResponseHeader", "crate::v1::ResponseHeader")
        .bytes(".kord.v1.WatchResponseWire.events")
        .compile_protos(&["proto/kord/v1/watch_wire.proto"], &["proto"])?;
    Ok(())
}
