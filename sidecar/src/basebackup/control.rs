//! The generated `global/pg_control` of a base backup: the compute's own control file (kept in
//! the store at import, for the settings and constants only it knows: system identifier,
//! catalog version, wal_level, checksums, the auth nonce…) with the fields that say where the
//! cluster stands rewritten — shut down cleanly, its last checkpoint at the backup's LSN, no
//! recovery or backup in progress — and the CRC recomputed. DESIGN.md §4.
//!
//! ```text
//! ControlFileData (x86-64, 296 bytes; the file is 8192 bytes, zero-padded):
//!   0 system_identifier u64 | 8 pg_control_version u32 | 12 catalog_version_no u32 |
//!  16 state u32 | 24 time i64 | 32 checkPoint u64 | 40 checkPointCopy (88 bytes) |
//! 128 unloggedLSN u64 | 136 minRecoveryPoint u64 | 144 minRecoveryPointTLI u32 |
//! 152 backupStartPoint u64 | 160 backupEndPoint u64 | 168 backupEndRequired bool |
//! 172 wal_level … 228 xlog_seg_size u32 … 252 data_checksum_version u32 |
//! 256 mock_authentication_nonce [32] | 288 crc u32 (CRC32C of bytes 0..288)
//! ```

use crate::wal::checkpoint::{CheckPoint, CONTROL_CHECKPOINT_COPY, CONTROL_CHECKPOINT_LSN, SIZEOF_CHECKPOINT};
use neon_types::Lsn;

pub const PG_CONTROL_FILE_SIZE: usize = 8192;
const PG_CONTROL_VERSION: u32 = 1300;
const DB_SHUTDOWNED: u32 = 1;
const OFF_STATE: usize = 16;
const OFF_TIME: usize = 24;
const OFF_UNLOGGED_LSN: usize = 128;
/// minRecoveryPoint through backupEndRequired: all zeroed.
const RECOVERY_FIELDS: std::ops::Range<usize> = 136..172;
const OFF_SEG_SIZE: usize = 228;
const OFF_CHECKSUM_VERSION: usize = 252;
const OFF_CRC: usize = 288;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the stored pg_control is {0} bytes, not a PostgreSQL 15 control file")]
    Size(usize),
    #[error("the stored pg_control has version {0}, not {PG_CONTROL_VERSION} (PostgreSQL 15)")]
    Version(u32),
    #[error("the stored pg_control fails its CRC")]
    Crc,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// What a control file says that a base backup needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlInfo {
    pub system_identifier: u64,
    pub wal_segment_size: u32,
    pub data_checksums: bool,
}

/// Checks a control file (size, version, CRC) and reads what a base backup needs.
pub fn info(template: &[u8]) -> Result<ControlInfo, ControlError> {
    if template.len() != PG_CONTROL_FILE_SIZE {
        return Err(ControlError::Size(template.len()));
    }
    if u32_at(template, 8) != PG_CONTROL_VERSION {
        return Err(ControlError::Version(u32_at(template, 8)));
    }
    if crc32c::crc32c(&template[..OFF_CRC]) != u32_at(template, OFF_CRC) {
        return Err(ControlError::Crc);
    }
    Ok(ControlInfo {
        system_identifier: u64::from_le_bytes(template[..8].try_into().expect("8 bytes")),
        wal_segment_size: u32_at(template, OFF_SEG_SIZE),
        data_checksums: u32_at(template, OFF_CHECKSUM_VERSION) != 0,
    })
}

/// `template` rewritten for a cluster shut down at checkpoint record `at` with `checkpoint`.
pub fn generate(template: &[u8], at: Lsn, checkpoint: &CheckPoint) -> Result<Vec<u8>, ControlError> {
    info(template)?;
    let mut b = template.to_vec();
    b[OFF_STATE..OFF_STATE + 4].copy_from_slice(&DB_SHUTDOWNED.to_le_bytes());
    b[OFF_TIME..OFF_TIME + 8].copy_from_slice(&checkpoint.time.to_le_bytes());
    b[CONTROL_CHECKPOINT_LSN..CONTROL_CHECKPOINT_LSN + 8].copy_from_slice(&at.0.to_le_bytes());
    b[CONTROL_CHECKPOINT_COPY..CONTROL_CHECKPOINT_COPY + SIZEOF_CHECKPOINT].copy_from_slice(&checkpoint.encode());
    // Unlogged relations start from their init forks; their fake LSNs may start anywhere.
    b[OFF_UNLOGGED_LSN..OFF_UNLOGGED_LSN + 8].copy_from_slice(&1000u64.to_le_bytes());
    b[RECOVERY_FIELDS].fill(0);
    let crc = crc32c::crc32c(&b[..OFF_CRC]);
    b[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_le_bytes());
    Ok(b)
}
