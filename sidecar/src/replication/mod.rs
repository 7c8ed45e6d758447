//! Getting WAL (and a running server's files) from a compute over PostgreSQL's replication
//! protocol.
//!
//! * [`client`] — a physical-replication client: it follows a live compute's WAL from a
//!   replication slot the sidecar owns, and reports back only what it has made durable.
//! * [`tar_reader`] — unpacking the tar stream of `BASE_BACKUP` (for `neon-sidecar attach`).
pub mod client;
pub mod tar_reader;
