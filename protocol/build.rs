//! Compiles `proto/` with protox (no `protoc` needed), then generates the
//! prost types and their canonical proto3 JSON mapping (pbjson).
use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(
        [
            "switchboard/v1/switchboard.proto",
            "switchboard/internal/v1/internal.proto",
            "switchboard/events/v1/events.proto",
        ],
        ["proto"],
    )?;
    let descriptor_bytes = fds.encode_to_vec();
    prost_build::Config::new().bytes(["."]).compile_fds(fds)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptor_bytes)?
        // Like the binary encoding, JSON skips fields it does not know, so
        // an older peer keeps working when a newer one adds fields.
        .ignore_unknown_fields()
        .build(&[".switchboard.v1"])?;
    Ok(())
}
