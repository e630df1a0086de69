//! Compiles `proto/` with protox (no `protoc` needed), then generates the
//! prost types, their canonical proto3 JSON mapping (pbjson) and, with the
//! `grpc` feature, the tonic clients and servers of the gRPC services.
use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(
        [
            "switchboard/v1/switchboard.proto",
            "switchboard/internal/v1/internal.proto",
            "switchboard/events/v1/events.proto",
            "switchboard/api/v1/api.proto",
            "switchboard/hooks/v1/hooks.proto",
        ],
        ["proto"],
    )?;
    let descriptor_bytes = fds.encode_to_vec();
    let mut config = prost_build::Config::new();
    config.bytes(["."]);
    generate(config, fds)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptor_bytes)?
        // Like the binary encoding, JSON skips fields it does not know, so
        // an older peer keeps working when a newer one adds fields.
        .ignore_unknown_fields()
        .build(&[".switchboard.v1"])?;
    Ok(())
}

/// Messages, plus the services' clients and servers. Without a transport:
/// the clients take any tonic channel, the servers run on any HTTP/2
/// server, so `tonic` needs only its `codegen` feature here.
#[cfg(feature = "grpc")]
fn generate(
    config: prost_build::Config,
    fds: prost_types::FileDescriptorSet,
) -> std::io::Result<()> {
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        .compile_fds_with_config(fds, config)
}

/// Messages only: the services' types exist, their code does not.
#[cfg(not(feature = "grpc"))]
fn generate(
    mut config: prost_build::Config,
    fds: prost_types::FileDescriptorSet,
) -> std::io::Result<()> {
    config.compile_fds(fds)
}
