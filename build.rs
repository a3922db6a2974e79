//! Compiles `proto/` with protox (pure Rust, no `protoc` needed) and writes the descriptor set
//! that gRPC reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let fds = protox::compile(["user/v1/user.proto"], ["proto"])?;
    std::fs::write(
        out_dir.join("user_descriptor.bin"),
        protox::prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        // Decode failures are the peer's bytes, not our fault: INVALID_ARGUMENT (src/codec.rs).
        .codec_path("crate::codec::ProstCodec")
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
