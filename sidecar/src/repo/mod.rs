//! The versioned page store: values filed under (key, LSN) in layer files.
//!
//! * [`key`]   — what a value is about (a relation block, a relation's size, an SLRU page, a
//!   piece of cluster metadata), in one sortable 18-byte encoding.
//! * [`value`] — what is stored: a page image, a WAL record for redo, or a Rust-native record.
//! * [`layer`] — immutable delta-layer files: CRC-checked blobs and a sorted index, written to a
//!   temporary name, fsync'd and renamed, read back through `mmap`.
//! * [`layer_summary`] — a layer file's Bloom filter of keys and index-block table: one key's
//!   values read from the remote store without fetching the file.
//! * [`memlayer`] — the in-memory layer: values since the last flush.
//! * [`store`] — the repository: the in-memory layer, the layer files and the manifest.
//! * [`meta`]  — cluster metadata: databases, relation maps, two-phase state, checkpoint
//!   counters, SLRU pages.
//! * [`ingest`] — decoded WAL records into values.
//! * [`import`] — a stopped cluster's data files as images at its checkpoint LSN.
//! * [`slru`]  — which SLRU pages a truncation removes.
//! * [`compaction`] — image layers for long chains, full images for retention.
//! * [`reconstruct`] — any page, and any relation's size, at any LSN.
//! * [`commit_times`] — when each transaction ended, by LSN: times into LSNs as recovery reads them.
//! * [`point_in_time`] — a time as the LSN where recovery to it stops, on a timeline's lineage.
//! * [`catalog`] — the file a relation had at an LSN (before a rewrite), from `pg_class` then.
pub mod catalog;
pub mod commit_times;
pub mod compaction;
pub mod import;
pub mod ingest;
pub mod key;
pub mod layer;
pub mod layer_summary;
pub mod memlayer;
pub mod meta;
pub mod point_in_time;
pub mod reconstruct;
pub mod slru;
pub mod store;
pub mod timeline;
pub mod value;
