//! The secsync 0.5 protocol, in one place and without I/O.
//!
//! * [`json`] and [`canonical`]: reading frames as JavaScript does, and the canonical JSON that
//!   signatures and proofs cover.
//! * [`b64`], [`ids`]: strict base64 and the newtypes every field is parsed into.
//! * [`crypto`]: Ed25519 verification as strict as libsodium, BLAKE2b hashes, snapshot proofs.
//! * [`message`]: client frames, keeping the exact signed text as the body to store and relay.
//! * [`connect`]: the connection URL.
//! * [`rules`]: the server's rules as pure functions over a small document state.
//! * [`outcome`]: what a store answers (submission outcomes, loaded documents), shared by the
//!   persistence core and the gateway.
//! * [`server_frame`]: server → client frames as a client reads them.
//! * [`error`] and [`wire`]: the one error type, its one mapping to replies, and the frames the
//!   server sends.
//!
//! A new rule goes into [`rules`] with a [`error::Reason`] for its rejection; a new frame into
//! [`wire`]. Both stores and the gateway call these, so nothing is decided twice.

pub mod b64;
pub mod canonical;
pub mod connect;
pub mod crypto;
pub mod error;
pub mod ids;
pub mod json;
pub mod message;
pub mod outcome;
pub mod rules;
pub mod server_frame;
pub mod wire;

pub use connect::{parse_connect, ConnectError, ConnectRequest, SessionKey};
pub use crypto::{Domain, KeyCache, ProofEntry};
pub use error::{FrameError, Reason, Shape};
pub use ids::{Clock, DocumentId, PublicKey, SignatureBytes, SnapshotId};
pub use message::{
    parse_client_frame, stored_body, ClientFrame, EphemeralMessage, ParseOptions, Signed,
    SnapshotMessage, UpdateMessage,
};
pub use outcome::{Kind, LoadedDocument, Outcome};
pub use rules::{
    plan_load, ActiveSnapshot, ChainPlan, Clocks, DocumentState, LoadMode, LoadPlan, LoadRequest,
    RuleOptions, UpdateSelection,
};
pub use server_frame::{parse_server_frame, ServerFrame};
