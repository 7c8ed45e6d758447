//! Types that both sides of the product speak: the `neon` extension inside the compute and
//! the sidecar daemon. Kept free of heavy dependencies so the extension does not link the
//! daemon. Everything here mirrors a PostgreSQL 15 concept and keeps its text form, so that
//! what users type in SQL (`'0/16B3748'::pg_lsn`, fork `'vm'`) parses the same way here.

mod lsn;
pub mod page;
pub mod page_file;
pub mod protocol;
mod reltag;
mod time;
pub mod walredo;

pub use lsn::{Lsn, LsnParseError};
pub use reltag::{BufferTag, ForkNumber, ForkParseError, Oid, RelFileNode, RelTag};
pub use time::{PgTime, TimeParseError};

/// PostgreSQL's page size (`BLCKSZ`); Debian's build uses the default.
pub const BLCKSZ: usize = 8192;

/// A block number within one relation fork (`BlockNumber`).
pub type BlockNumber = u32;

/// PostgreSQL's transaction id (`TransactionId`).
pub type TransactionId = u32;

/// The default WAL segment size (`wal_segment_size`, fixed at initdb).
pub const DEFAULT_WAL_SEGMENT_SIZE: u32 = 16 * 1024 * 1024;

/// The size of a WAL page (`XLOG_BLCKSZ`).
pub const XLOG_BLCKSZ: usize = 8192;
