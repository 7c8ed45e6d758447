//! Reading PostgreSQL 15 WAL: from raw bytes (segment files or a replication stream starting at
//! any LSN) to decoded records with their block references, full-page images and main data.
//!
//! * [`checkpoint`] — PostgreSQL's `CheckPoint` (checkpoint records and `pg_control`).
//! * [`consts`]  — the on-disk constants and layouts of WAL pages and records (one place).
//! * [`page`]    — WAL page headers (short and long) and their validation.
//! * [`record`]  — parsing one complete record: header, block references, main data, CRC.
//! * [`decoder`] — the streaming state machine that strips page headers and reassembles
//!   records crossing page and segment boundaries.
//! * [`segment`] — segment file names and reading a directory of segments.
//! * [`image`]   — turning a full-page image back into an 8192-byte page.
//! * [`pglz`]    — PostgreSQL's own LZ compression (decompression side).
//! * [`rmgr`]    — resource manager ids and record type names, as `pg_waldump` prints them.
//! * [`stats`]   — per-resource-manager totals, as `pg_waldump --stats` prints them.

pub mod checkpoint;
pub mod consts;
pub mod decoder;
pub mod image;
pub mod page;
pub mod pglz;
pub mod record;
pub mod rmgr;
pub mod segment;
pub mod stats;
