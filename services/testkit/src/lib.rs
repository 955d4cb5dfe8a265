//! Test support shared by the services' multi-process tests (a dev-dependency only).
//!
//! * [`process`]: a service binary started as a real process on a free loopback port, its
//!   output kept for assertions (what it logged must never contain a secret).
//! * [`otlp`]: an OpenTelemetry Collector stand-in: an OTLP/gRPC receiver in the test process
//!   that keeps every exported span and metric, and the Collector's OTLP → Prometheus name
//!   translation that the dashboards' queries are checked against.

// Test support: a failed set-up step is a failed test, so it panics with a message.
#![allow(clippy::expect_used)]

pub mod otlp;
pub mod process;
