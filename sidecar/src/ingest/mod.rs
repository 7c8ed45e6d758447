//! Getting WAL into the sidecar.
//!
//! * [`replication`] — a physical-replication client: it follows a live compute's WAL from a
//!   replication slot the sidecar owns, and reports back only what it has made durable.
pub mod replication;
