//! The byte layouts and constants of PostgreSQL 15 WAL, in one place. Every other module of
//! `wal` reads bytes through the offsets documented here. All integers are little-endian
//! (the machine's byte order; PostgreSQL writes WAL in native order, and we only support
//! little-endian 64-bit builds, which is what Debian ships on amd64/arm64).
//!
//! ```text
//! WAL page (XLOG_BLCKSZ = 8192 bytes), header at offset 0:
//!   XLogPageHeaderData (short, 24 bytes with MAXALIGN padding; 20 bytes of fields)
//!     0  u16 xlp_magic      0xD110 for PostgreSQL 15
//!     2  u16 xlp_info       XLP_* flags
//!     4  u32 xlp_tli        timeline of the first record on the page
//!     8  u64 xlp_pageaddr   LSN of this page's first byte
//!    16  u32 xlp_rem_len    bytes of a continued record at the start of this page
//!   XLogLongPageHeaderData (first page of each segment, 40 bytes):
//!    24  u64 xlp_sysid      system identifier of the cluster
//!    32  u32 xlp_seg_size   wal_segment_size
//!    36  u32 xlp_xlog_blcksz
//!
//! XLogRecord (24 bytes, MAXALIGNed start):
//!     0  u32 xl_tot_len     total length of the record, this header included
//!     4  u32 xl_xid         transaction id
//!     8  u64 xl_prev        start LSN of the previous record
//!    16  u8  xl_info        rmgr-specific bits (high 4) and XLR_* flags (low 4)
//!    17  u8  xl_rmid        resource manager
//!    18  u16 (padding)
//!    20  u32 xl_crc         CRC32C of everything after the header, then of bytes 0..20
//!
//! Then block headers, in order, identified by their first byte:
//!   0..=32 (block_id)       XLogRecordBlockHeader: u8 id, u8 fork_flags, u16 data_length
//!                             [if BKPBLOCK_HAS_IMAGE] XLogRecordBlockImageHeader:
//!                                u16 length, u16 hole_offset, u8 bimg_info
//!                                [if hole && compressed] u16 hole_length
//!                             [unless BKPBLOCK_SAME_REL] RelFileNode (3 × u32)
//!                             u32 block number
//!   XLR_BLOCK_ID_DATA_SHORT  u8 length of main data
//!   XLR_BLOCK_ID_DATA_LONG   u32 length of main data
//!   XLR_BLOCK_ID_ORIGIN      u16 replication origin
//!   XLR_BLOCK_ID_TOPLEVEL_XID u32 top-level transaction id
//! followed by the payloads in the same order: each block's image, each block's data,
//! then the main data.
//! ```

/// `XLOG_PAGE_MAGIC` of PostgreSQL 15.
pub const XLOG_PAGE_MAGIC: u16 = 0xD110;

/// Size of the short page header, MAXALIGNed (`SizeOfXLogShortPHD`).
pub const SIZE_OF_SHORT_PAGE_HEADER: usize = 24;
/// Size of the long page header, MAXALIGNed (`SizeOfXLogLongPHD`).
pub const SIZE_OF_LONG_PAGE_HEADER: usize = 40;

/// `xlp_info`: the page starts with the continuation of a record.
pub const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
/// `xlp_info`: this page has a long header.
pub const XLP_LONG_HEADER: u16 = 0x0002;
/// `xlp_info`: replication may skip the page (unused since 9.x, still defined).
pub const XLP_BKP_REMOVABLE: u16 = 0x0004;
/// `xlp_info`: the record continued here was abandoned (`XLOG_OVERWRITE_CONTRECORD` follows).
pub const XLP_FIRST_IS_OVERWRITE_CONTRECORD: u16 = 0x0008;
/// Every valid `xlp_info` bit.
pub const XLP_ALL_FLAGS: u16 = 0x000F;

/// Size of `XLogRecord` (`SizeOfXLogRecord`).
pub const SIZE_OF_XLOG_RECORD: usize = 24;
/// Offset of `xl_crc` within `XLogRecord`.
pub const XL_CRC_OFFSET: usize = 20;

/// `xl_info` bits owned by the WAL machinery, not the resource manager.
pub const XLR_INFO_MASK: u8 = 0x0F;
/// `xl_info` bits owned by the resource manager.
pub const XLR_RMGR_INFO_MASK: u8 = 0xF0;
/// `xl_info`: the record is special for logical decoding only.
pub const XLR_SPECIAL_REL_UPDATE: u8 = 0x01;
/// `xl_info`: consistency check requested for every block (wal_consistency_checking).
pub const XLR_CHECK_CONSISTENCY: u8 = 0x02;

/// Largest block id (`XLR_MAX_BLOCK_ID`).
pub const XLR_MAX_BLOCK_ID: u8 = 32;
pub const XLR_BLOCK_ID_DATA_SHORT: u8 = 255;
pub const XLR_BLOCK_ID_DATA_LONG: u8 = 254;
pub const XLR_BLOCK_ID_ORIGIN: u8 = 253;
pub const XLR_BLOCK_ID_TOPLEVEL_XID: u8 = 252;

/// Size of `XLogRecordBlockHeader`.
pub const SIZE_OF_BLOCK_HEADER: usize = 4;
/// Size of `XLogRecordBlockImageHeader`.
pub const SIZE_OF_BLOCK_IMAGE_HEADER: usize = 5;
/// Size of `XLogRecordBlockCompressHeader` (the hole length).
pub const SIZE_OF_BLOCK_COMPRESS_HEADER: usize = 2;
/// Size of a `RelFileNode`.
pub const SIZE_OF_REL_FILE_NODE: usize = 12;

/// `fork_flags`: the low bits hold the fork number.
pub const BKPBLOCK_FORK_MASK: u8 = 0x0F;
/// `fork_flags`: a full-page image follows.
pub const BKPBLOCK_HAS_IMAGE: u8 = 0x10;
/// `fork_flags`: block data follows.
pub const BKPBLOCK_HAS_DATA: u8 = 0x20;
/// `fork_flags`: redo reinitialises the page; no earlier version is needed.
pub const BKPBLOCK_WILL_INIT: u8 = 0x40;
/// `fork_flags`: same relation as the previous block reference; the RelFileNode is omitted.
pub const BKPBLOCK_SAME_REL: u8 = 0x80;

/// `bimg_info`: the image has a hole (free space) that was left out.
pub const BKPIMAGE_HAS_HOLE: u8 = 0x01;
/// `bimg_info`: redo must restore the image (otherwise it is only for consistency checking).
pub const BKPIMAGE_APPLY: u8 = 0x02;
/// `bimg_info`: the image is compressed with pglz.
pub const BKPIMAGE_COMPRESS_PGLZ: u8 = 0x04;
/// `bimg_info`: the image is compressed with LZ4 (raw block format).
pub const BKPIMAGE_COMPRESS_LZ4: u8 = 0x08;
/// `bimg_info`: the image is compressed with zstd (frame format).
pub const BKPIMAGE_COMPRESS_ZSTD: u8 = 0x10;
/// Any compression bit.
pub const BKPIMAGE_COMPRESSED: u8 = BKPIMAGE_COMPRESS_PGLZ | BKPIMAGE_COMPRESS_LZ4 | BKPIMAGE_COMPRESS_ZSTD;

/// `XLOG_SWITCH`: the rest of the segment is unused (XLOG rmgr info).
pub const XLOG_SWITCH: u8 = 0x40;
/// `RM_XLOG_ID`.
pub const RM_XLOG_ID: u8 = 0;

/// The largest record PostgreSQL 15 can produce or read (`AllocSizeIsValid` bound, 1 GB - 1).
/// A header claiming more is garbage; we refuse before buffering anything.
pub const MAX_RECORD_LENGTH: u32 = 0x3fff_ffff;

// ---------------------------------------------------------------------------------------------
// Resource managers and their record types (`xl_info & XLR_RMGR_INFO_MASK`), as defined by
// PostgreSQL 15's src/include/access/rmgrlist.h and each rmgr's *_xlog.h. `rmgr` names them;
// redo code dispatches on them.
// ---------------------------------------------------------------------------------------------

/// `RM_XACT_ID`: transaction commit/abort/prepare.
pub const RM_XACT_ID: u8 = 1;
/// `RM_SMGR_ID`: relation file creation and truncation.
pub const RM_SMGR_ID: u8 = 2;
/// `RM_CLOG_ID`: commit log (pg_xact) pages.
pub const RM_CLOG_ID: u8 = 3;
/// `RM_DBASE_ID`: CREATE/DROP DATABASE.
pub const RM_DBASE_ID: u8 = 4;
/// `RM_TBLSPC_ID`: CREATE/DROP TABLESPACE.
pub const RM_TBLSPC_ID: u8 = 5;
/// `RM_MULTIXACT_ID`: multixact offsets and members.
pub const RM_MULTIXACT_ID: u8 = 6;
/// `RM_RELMAP_ID`: relation mapper files (pg_filenode.map).
pub const RM_RELMAP_ID: u8 = 7;
/// `RM_STANDBY_ID`: hot standby information (locks, running xacts).
pub const RM_STANDBY_ID: u8 = 8;
/// `RM_HEAP2_ID`: heap records that did not fit in `RM_HEAP_ID`'s 8 opcodes.
pub const RM_HEAP2_ID: u8 = 9;
/// `RM_HEAP_ID`: heap tuples.
pub const RM_HEAP_ID: u8 = 10;
/// `RM_BTREE_ID`: B-tree indexes.
pub const RM_BTREE_ID: u8 = 11;
/// `RM_HASH_ID`: hash indexes.
pub const RM_HASH_ID: u8 = 12;
/// `RM_GIN_ID`: GIN indexes.
pub const RM_GIN_ID: u8 = 13;
/// `RM_GIST_ID`: GiST indexes.
pub const RM_GIST_ID: u8 = 14;
/// `RM_SEQ_ID`: sequences.
pub const RM_SEQ_ID: u8 = 15;
/// `RM_SPGIST_ID`: SP-GiST indexes.
pub const RM_SPGIST_ID: u8 = 16;
/// `RM_BRIN_ID`: BRIN indexes.
pub const RM_BRIN_ID: u8 = 17;
/// `RM_COMMIT_TS_ID`: commit timestamps.
pub const RM_COMMIT_TS_ID: u8 = 18;
/// `RM_REPLORIGIN_ID`: replication origins.
pub const RM_REPLORIGIN_ID: u8 = 19;
/// `RM_GENERIC_ID`: generic WAL (extensions' page deltas).
pub const RM_GENERIC_ID: u8 = 20;
/// `RM_LOGICALMSG_ID`: pg_logical_emit_message.
pub const RM_LOGICALMSG_ID: u8 = 21;
/// The largest built-in rmgr id (`RM_MAX_BUILTIN_ID`).
pub const RM_MAX_BUILTIN_ID: u8 = RM_LOGICALMSG_ID;
/// Ids from here up belong to custom (extension) resource managers (`RM_MIN_CUSTOM_ID`).
pub const RM_MIN_CUSTOM_ID: u8 = 128;

// RM_XLOG_ID (catalog/pg_control.h). XLOG_SWITCH is defined above.
pub const XLOG_CHECKPOINT_SHUTDOWN: u8 = 0x00;
pub const XLOG_CHECKPOINT_ONLINE: u8 = 0x10;
pub const XLOG_NOOP: u8 = 0x20;
pub const XLOG_NEXTOID: u8 = 0x30;
pub const XLOG_BACKUP_END: u8 = 0x50;
pub const XLOG_PARAMETER_CHANGE: u8 = 0x60;
pub const XLOG_RESTORE_POINT: u8 = 0x70;
pub const XLOG_FPW_CHANGE: u8 = 0x80;
pub const XLOG_END_OF_RECOVERY: u8 = 0x90;
pub const XLOG_FPI_FOR_HINT: u8 = 0xA0;
pub const XLOG_FPI: u8 = 0xB0;
// 0xC0 is unused in PostgreSQL 15.
pub const XLOG_OVERWRITE_CONTRECORD: u8 = 0xD0;

// RM_XACT_ID (access/xact.h). Only the bits under XLOG_XACT_OPMASK select the record type;
// XLOG_XACT_HAS_INFO says an xinfo word follows in the main data.
pub const XLOG_XACT_COMMIT: u8 = 0x00;
pub const XLOG_XACT_PREPARE: u8 = 0x10;
pub const XLOG_XACT_ABORT: u8 = 0x20;
pub const XLOG_XACT_COMMIT_PREPARED: u8 = 0x30;
pub const XLOG_XACT_ABORT_PREPARED: u8 = 0x40;
pub const XLOG_XACT_ASSIGNMENT: u8 = 0x50;
pub const XLOG_XACT_INVALIDATIONS: u8 = 0x60;
pub const XLOG_XACT_OPMASK: u8 = 0x70;
pub const XLOG_XACT_HAS_INFO: u8 = 0x80;

// RM_SMGR_ID (catalog/storage_xlog.h).
pub const XLOG_SMGR_CREATE: u8 = 0x10;
pub const XLOG_SMGR_TRUNCATE: u8 = 0x20;

// RM_CLOG_ID (access/clog.h).
pub const CLOG_ZEROPAGE: u8 = 0x00;
pub const CLOG_TRUNCATE: u8 = 0x10;

// RM_DBASE_ID (commands/dbcommands_xlog.h).
pub const XLOG_DBASE_CREATE_FILE_COPY: u8 = 0x00;
pub const XLOG_DBASE_CREATE_WAL_LOG: u8 = 0x10;
pub const XLOG_DBASE_DROP: u8 = 0x20;

// RM_TBLSPC_ID (commands/tablespace.h).
pub const XLOG_TBLSPC_CREATE: u8 = 0x00;
pub const XLOG_TBLSPC_DROP: u8 = 0x10;

// RM_MULTIXACT_ID (access/multixact.h).
pub const XLOG_MULTIXACT_ZERO_OFF_PAGE: u8 = 0x00;
pub const XLOG_MULTIXACT_ZERO_MEM_PAGE: u8 = 0x10;
pub const XLOG_MULTIXACT_CREATE_ID: u8 = 0x20;
pub const XLOG_MULTIXACT_TRUNCATE_ID: u8 = 0x30;

// RM_RELMAP_ID (utils/relmapper.h).
pub const XLOG_RELMAP_UPDATE: u8 = 0x00;

// RM_STANDBY_ID (storage/standbydefs.h).
pub const XLOG_STANDBY_LOCK: u8 = 0x00;
pub const XLOG_RUNNING_XACTS: u8 = 0x10;
pub const XLOG_INVALIDATIONS: u8 = 0x20;

// RM_HEAP_ID (access/heapam_xlog.h). XLOG_HEAP_INIT_PAGE is a flag on top of the opcode
// (also used by RM_HEAP2_ID's MULTI_INSERT): the redo starts from an empty page.
pub const XLOG_HEAP_INSERT: u8 = 0x00;
pub const XLOG_HEAP_DELETE: u8 = 0x10;
pub const XLOG_HEAP_UPDATE: u8 = 0x20;
pub const XLOG_HEAP_TRUNCATE: u8 = 0x30;
pub const XLOG_HEAP_HOT_UPDATE: u8 = 0x40;
pub const XLOG_HEAP_CONFIRM: u8 = 0x50;
pub const XLOG_HEAP_LOCK: u8 = 0x60;
pub const XLOG_HEAP_INPLACE: u8 = 0x70;
pub const XLOG_HEAP_OPMASK: u8 = 0x70;
pub const XLOG_HEAP_INIT_PAGE: u8 = 0x80;

// RM_HEAP2_ID (access/heapam_xlog.h).
pub const XLOG_HEAP2_REWRITE: u8 = 0x00;
pub const XLOG_HEAP2_PRUNE: u8 = 0x10;
pub const XLOG_HEAP2_VACUUM: u8 = 0x20;
pub const XLOG_HEAP2_FREEZE_PAGE: u8 = 0x30;
pub const XLOG_HEAP2_VISIBLE: u8 = 0x40;
pub const XLOG_HEAP2_MULTI_INSERT: u8 = 0x50;
pub const XLOG_HEAP2_LOCK_UPDATED: u8 = 0x60;
pub const XLOG_HEAP2_NEW_CID: u8 = 0x70;

// RM_BTREE_ID (access/nbtxlog.h).
pub const XLOG_BTREE_INSERT_LEAF: u8 = 0x00;
pub const XLOG_BTREE_INSERT_UPPER: u8 = 0x10;
pub const XLOG_BTREE_INSERT_META: u8 = 0x20;
pub const XLOG_BTREE_SPLIT_L: u8 = 0x30;
pub const XLOG_BTREE_SPLIT_R: u8 = 0x40;
pub const XLOG_BTREE_INSERT_POST: u8 = 0x50;
pub const XLOG_BTREE_DEDUP: u8 = 0x60;
pub const XLOG_BTREE_DELETE: u8 = 0x70;
pub const XLOG_BTREE_UNLINK_PAGE: u8 = 0x80;
pub const XLOG_BTREE_UNLINK_PAGE_META: u8 = 0x90;
pub const XLOG_BTREE_NEWROOT: u8 = 0xA0;
pub const XLOG_BTREE_MARK_PAGE_HALFDEAD: u8 = 0xB0;
pub const XLOG_BTREE_VACUUM: u8 = 0xC0;
pub const XLOG_BTREE_REUSE_PAGE: u8 = 0xD0;
pub const XLOG_BTREE_META_CLEANUP: u8 = 0xE0;

// RM_HASH_ID (access/hash_xlog.h).
pub const XLOG_HASH_INIT_META_PAGE: u8 = 0x00;
pub const XLOG_HASH_INIT_BITMAP_PAGE: u8 = 0x10;
pub const XLOG_HASH_INSERT: u8 = 0x20;
pub const XLOG_HASH_ADD_OVFL_PAGE: u8 = 0x30;
pub const XLOG_HASH_SPLIT_ALLOCATE_PAGE: u8 = 0x40;
pub const XLOG_HASH_SPLIT_PAGE: u8 = 0x50;
pub const XLOG_HASH_SPLIT_COMPLETE: u8 = 0x60;
pub const XLOG_HASH_MOVE_PAGE_CONTENTS: u8 = 0x70;
pub const XLOG_HASH_SQUEEZE_PAGE: u8 = 0x80;
pub const XLOG_HASH_DELETE: u8 = 0x90;
pub const XLOG_HASH_SPLIT_CLEANUP: u8 = 0xA0;
pub const XLOG_HASH_UPDATE_META_PAGE: u8 = 0xB0;
pub const XLOG_HASH_VACUUM_ONE_PAGE: u8 = 0xC0;

// RM_GIN_ID (access/ginxlog.h). Note VACUUM_DATA_LEAF_PAGE (0x90) was added after the others.
pub const XLOG_GIN_CREATE_PTREE: u8 = 0x10;
pub const XLOG_GIN_INSERT: u8 = 0x20;
pub const XLOG_GIN_SPLIT: u8 = 0x30;
pub const XLOG_GIN_VACUUM_PAGE: u8 = 0x40;
pub const XLOG_GIN_DELETE_PAGE: u8 = 0x50;
pub const XLOG_GIN_UPDATE_META_PAGE: u8 = 0x60;
pub const XLOG_GIN_INSERT_LISTPAGE: u8 = 0x70;
pub const XLOG_GIN_DELETE_LISTPAGE: u8 = 0x80;
pub const XLOG_GIN_VACUUM_DATA_LEAF_PAGE: u8 = 0x90;

// RM_GIST_ID (access/gistxlog.h). 0x40 and 0x50 are retired opcodes.
pub const XLOG_GIST_PAGE_UPDATE: u8 = 0x00;
pub const XLOG_GIST_DELETE: u8 = 0x10;
pub const XLOG_GIST_PAGE_REUSE: u8 = 0x20;
pub const XLOG_GIST_PAGE_SPLIT: u8 = 0x30;
pub const XLOG_GIST_PAGE_DELETE: u8 = 0x60;
pub const XLOG_GIST_ASSIGN_LSN: u8 = 0x70;

// RM_SEQ_ID (commands/sequence.h).
pub const XLOG_SEQ_LOG: u8 = 0x00;

// RM_SPGIST_ID (access/spgxlog.h). 0x00 (CREATE_INDEX) is retired.
pub const XLOG_SPGIST_ADD_LEAF: u8 = 0x10;
pub const XLOG_SPGIST_MOVE_LEAFS: u8 = 0x20;
pub const XLOG_SPGIST_ADD_NODE: u8 = 0x30;
pub const XLOG_SPGIST_SPLIT_TUPLE: u8 = 0x40;
pub const XLOG_SPGIST_PICKSPLIT: u8 = 0x50;
pub const XLOG_SPGIST_VACUUM_LEAF: u8 = 0x60;
pub const XLOG_SPGIST_VACUUM_ROOT: u8 = 0x70;
pub const XLOG_SPGIST_VACUUM_REDIRECT: u8 = 0x80;

// RM_BRIN_ID (access/brin_xlog.h). XLOG_BRIN_INIT_PAGE is a flag like XLOG_HEAP_INIT_PAGE.
pub const XLOG_BRIN_CREATE_INDEX: u8 = 0x00;
pub const XLOG_BRIN_INSERT: u8 = 0x10;
pub const XLOG_BRIN_UPDATE: u8 = 0x20;
pub const XLOG_BRIN_SAMEPAGE_UPDATE: u8 = 0x30;
pub const XLOG_BRIN_REVMAP_EXTEND: u8 = 0x40;
pub const XLOG_BRIN_DESUMMARIZE: u8 = 0x50;
pub const XLOG_BRIN_OPMASK: u8 = 0x70;
pub const XLOG_BRIN_INIT_PAGE: u8 = 0x80;

// RM_COMMIT_TS_ID (access/commit_ts.h).
pub const COMMIT_TS_ZEROPAGE: u8 = 0x00;
pub const COMMIT_TS_TRUNCATE: u8 = 0x10;

// RM_REPLORIGIN_ID (replication/origin.h).
pub const XLOG_REPLORIGIN_SET: u8 = 0x00;
pub const XLOG_REPLORIGIN_DROP: u8 = 0x10;

// RM_LOGICALMSG_ID (replication/message.h).
pub const XLOG_LOGICAL_MESSAGE: u8 = 0x00;

// xl_xact_commit / xl_xact_abort `xinfo` bits (access/xact.h): which optional parts follow
// the fixed part of the record, in this order.
pub const XACT_XINFO_HAS_DBINFO: u32 = 1 << 0;
pub const XACT_XINFO_HAS_SUBXACTS: u32 = 1 << 1;
pub const XACT_XINFO_HAS_RELFILENODES: u32 = 1 << 2;
pub const XACT_XINFO_HAS_INVALS: u32 = 1 << 3;
pub const XACT_XINFO_HAS_TWOPHASE: u32 = 1 << 4;
pub const XACT_XINFO_HAS_ORIGIN: u32 = 1 << 5;
pub const XACT_XINFO_HAS_AE_LOCKS: u32 = 1 << 6;
pub const XACT_XINFO_HAS_GID: u32 = 1 << 7;
pub const XACT_XINFO_HAS_DROPPED_STATS: u32 = 1 << 8;

// Heap record flags that say the record also cleared visibility-map bits
// (access/heapam_xlog.h). The flags byte sits in each record's main data.
/// `xl_heap_insert.flags` (byte 2) and `xl_heap_multi_insert.flags` (byte 0).
pub const XLH_INSERT_ALL_VISIBLE_CLEARED: u8 = 1 << 0;
/// `xl_heap_update.flags` (byte 7): the old tuple's page.
pub const XLH_UPDATE_OLD_ALL_VISIBLE_CLEARED: u8 = 1 << 0;
/// `xl_heap_update.flags` (byte 7): the new tuple's page.
pub const XLH_UPDATE_NEW_ALL_VISIBLE_CLEARED: u8 = 1 << 1;
/// `xl_heap_delete.flags` (byte 7).
pub const XLH_DELETE_ALL_VISIBLE_CLEARED: u8 = 1 << 0;
/// `xl_heap_lock.flags` and `xl_heap_lock_updated.flags` (byte 7): only ALL_FROZEN was cleared.
pub const XLH_LOCK_ALL_FROZEN_CLEARED: u8 = 0x01;
