//! The persistence service: the only component that talks to the database.
//!
//! * [`core`]: sequencing, batching and idempotency; every decision comes from the protocol
//!   crate's rules.
//! * [`backend`]: the storage interface the core runs on; [`postgres`] (the service, several
//!   replicas on one database) and [`sqlite`] (the embedded single-node binary, one local file)
//!   implement it.
//! * [`load_cache`]: documents kept in memory for loads, current as the core commits.
//! * [`metrics`]: the service's OpenTelemetry instruments.
//! * [`grpc`]: the thin gRPC layer over the core (`proto/secsync/persistence/v1`).
//! * [`config`]: the binary's flags and environment variables.
//!
//! The gateway can also run the core in-process (the embedded single-node binary).

pub mod backend;
pub mod config;
pub mod core;
pub mod grpc;
pub mod load_cache;
pub mod metrics;
pub mod postgres;
pub mod sqlite;

pub use crate::core::{Core, CoreError, CoreOptions, Kind, LoadedDocument, Outcome};
