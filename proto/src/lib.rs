//! Tessera wire protocol between the coordinator and its workers.
//!
//! The gRPC service arrives with the coordinator issue; until then this crate
//! only fixes the protocol version both sides will compare on Join.

/// Bumped on every incompatible change to the wire protocol.
pub const PROTOCOL_VERSION: u32 = 1;
