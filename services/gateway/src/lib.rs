//! The secsync WebSocket gateway.
//!
//! * [`server`]: HTTP surface (WebSocket endpoint, health, readiness) and the drain.
//! * [`session`]: one connection — opening sequence, frames in arrival order, delivery.
//! * [`hub`]: per-document fan-out in sequence order with gap repair.
//! * Seams: [`store`] (persistence; [`grpc_store`]), [`bus`] (fan-out; [`nats_bus`], and
//!   [`local_bus`] inside one process),
//!   [`auth`] (access control: open, jwt, callback).
//! * Access control around it: [`admission`] (origins, per-address limit at the upgrade),
//!   [`revocation`] (expiry and live revocation on every gateway), [`admin`] (the revoke
//!   endpoint).
//! * [`gateway`]: shared state; [`config`]: the binary's flags; [`metrics`]: its instruments.

pub mod admin;
pub mod admission;
pub mod auth;
pub mod bus;
pub mod config;
pub mod gateway;
pub mod grpc_store;
pub mod hub;
pub mod local_bus;
pub mod metrics;
pub mod nats_bus;
pub mod revocation;
pub mod server;
pub mod session;
pub mod store;
pub mod ws;
