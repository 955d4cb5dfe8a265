//! Compiles proto/ with protox (no protoc needed) and generates tonic + prost code.

#![allow(clippy::disallowed_methods)] // a build script is an edge: it reads OUT_DIR
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = "../../proto";
    let file = "secsync/persistence/v1/persistence.proto";
    let descriptors = protox::compile([file], [proto_root])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("persistence_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    // Load bodies decode as shared slices of the received buffer, not one allocation each.
    tonic_prost_build::configure()
        .bytes(".secsync.persistence.v1.LoadDocumentChunk.snapshot_part")
        .bytes(".secsync.persistence.v1.UpdateBodies.bodies")
        .compile_fds(descriptors)?;
    println!("cargo:rerun-if-changed={proto_root}");
    Ok(())
}
