//! Tessera wire protocol between the coordinator and its workers: the gRPC
//! service generated from `proto/coordinator.proto`, and what both ends of a
//! connection need besides it: the job token and session keys ([`auth`]),
//! TLS settings ([`tls`]) and the coordinator client ([`client`]).

pub mod auth;
pub mod client;
pub mod tls;

/// Bumped on every incompatible change to the wire protocol; Join refuses a
/// worker whose version differs.
pub const PROTOCOL_VERSION: u32 = 3;

#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("tessera.v1");
}

pub use v1::coordinator_client::CoordinatorClient;
pub use v1::coordinator_server::{Coordinator, CoordinatorServer};
