//! Getting WAL into the sidecar.
//!
//! * [`replication`] — a physical-replication client: it follows a live compute's WAL from a
//!   replication slot the sidecar owns, and reports back only what it has made durable.
//! * [`tar_reader`] — unpacking the tar stream of `BASE_BACKUP` (for `neon-sidecar attach`).
pub mod replication;
pub mod tar_reader;
