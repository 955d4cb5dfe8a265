//! The gRPC contract of `proto/`, generated at build time without `protoc` (protox compiles the
//! `.proto` files in pure Rust), and the conversions between its messages and the protocol
//! crate's types. Nothing else is hand-written here.

#[allow(clippy::pedantic, clippy::unwrap_used, missing_debug_implementations)]
pub mod v1 {
    tonic::include_proto!("secsync.persistence.v1");

    /// The encoded file descriptor set, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("persistence_descriptor");
}
