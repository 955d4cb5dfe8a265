//! A secsync 0.5 client in Rust, interoperable with the published JavaScript client.
//!
//! Used by the gateway's integration tests and by the load generator, so it does what the JS
//! client does, byte for byte where bytes are defined:
//!
//! * [`crypto`]: the document encryption (XChaCha20-Poly1305 with a libsodium `crypto_auth`
//!   key-commitment tag), the document key, the ephemeral payload layout and session proofs.
//! * [`frames`]: building signed snapshot / update / ephemeral frames from plaintext, and
//!   verifying and decrypting received ones (through the protocol crate's parser and verifier).
//! * [`sync`]: the document state and the acceptance rules for received snapshots and updates
//!   (proof chain, parent, clocks), pure so the vectors test the code the client runs.
//! * [`ephemeral`]: the ephemeral session handshake and replay protection.
//! * [`client`]: the async WebSocket client ([`Client`]).
//! * [`ydoc`]: a Yjs text document (yrs) serialised as the JS harness does, so Rust and JS
//!   clients can edit one document.

pub mod client;
pub mod crypto;
pub mod ephemeral;
pub mod frames;
pub mod sync;
pub mod ydoc;

pub use client::{
    Client, ClientOptions, ClientState, Error, Failure, Received, Refusal, SnapshotAck, Status,
    UpdateAck,
};
pub use crypto::DocumentKey;
pub use sync::{Event, KnownSnapshot, SyncError};
pub use ydoc::TextDoc;

/// Re-exported so users need not depend on the protocol crate for the basic types.
pub use secsync_protocol::{Clock, DocumentId, LoadMode, PublicKey, ServerFrame, SnapshotId};
