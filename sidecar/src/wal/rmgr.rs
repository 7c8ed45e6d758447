//! Resource managers (`xl_rmid`) and record type names (`xl_info`), spelled exactly as
//! PostgreSQL 15's `pg_waldump` prints them, so our dumps and `--stats` tables can be diffed
//! against the real tool's output.
//!
//! Rmgr names come from src/include/access/rmgrlist.h. Record type names come from each
//! rmgr's `*_identify` function in src/backend/access/rmgrdesc/*.c; we follow each one's
//! masking literally, because they differ:
//!
//! * most switch on `info & ~XLR_INFO_MASK` (the whole high nibble), so a flag bit such as
//!   `XLOG_HEAP_INIT_PAGE` yields a distinct "+INIT" name only for the opcodes that list one
//!   (heap DELETE with the INIT bit is unknown, not "DELETE");
//! * Transaction masks with `XLOG_XACT_OPMASK`, ignoring `XLOG_XACT_HAS_INFO`;
//! * CommitTs and ReplicationOrigin switch on the raw `info`, so any `XLR_*` flag bit in the
//!   low nibble makes the record unknown;
//! * Generic names every record "Generic".
//!
//! `None` corresponds to a NULL from the identify function; `pg_waldump` then prints
//! `UNKNOWN (%x)` with `info & ~XLR_INFO_MASK`.

use super::consts::*;

/// A built-in resource manager. Discriminants are the on-disk `xl_rmid` values (`RM_*_ID`).
/// Custom rmgrs (ids 128..=255) have no variant: they are not part of stock PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum RmgrId {
    Xlog = 0,
    Transaction,
    Storage,
    Clog,
    Database,
    Tablespace,
    MultiXact,
    RelMap,
    Standby,
    Heap2,
    Heap,
    Btree,
    Hash,
    Gin,
    Gist,
    Sequence,
    SpGist,
    Brin,
    CommitTs,
    ReplicationOrigin,
    Generic,
    LogicalMessage,
}

impl RmgrId {
    /// Every built-in rmgr, in id order (`ALL[i] as u8 == i`), which is also the row order of
    /// `pg_waldump --stats`.
    pub const ALL: [RmgrId; 22] = [
        RmgrId::Xlog,
        RmgrId::Transaction,
        RmgrId::Storage,
        RmgrId::Clog,
        RmgrId::Database,
        RmgrId::Tablespace,
        RmgrId::MultiXact,
        RmgrId::RelMap,
        RmgrId::Standby,
        RmgrId::Heap2,
        RmgrId::Heap,
        RmgrId::Btree,
        RmgrId::Hash,
        RmgrId::Gin,
        RmgrId::Gist,
        RmgrId::Sequence,
        RmgrId::SpGist,
        RmgrId::Brin,
        RmgrId::CommitTs,
        RmgrId::ReplicationOrigin,
        RmgrId::Generic,
        RmgrId::LogicalMessage,
    ];

    /// The rmgr for an `xl_rmid`, or `None` for ids that are not built in (unused or custom).
    pub fn from_u8(v: u8) -> Option<RmgrId> {
        Self::ALL.get(usize::from(v)).copied()
    }

    /// The on-disk id (`xl_rmid`).
    pub fn id(self) -> u8 {
        self as u8
    }

    /// The name `pg_waldump` prints in its `rmgr:` column (`rm_name` in rmgrlist.h).
    pub fn name(self) -> &'static str {
        match self {
            RmgrId::Xlog => "XLOG",
            RmgrId::Transaction => "Transaction",
            RmgrId::Storage => "Storage",
            RmgrId::Clog => "CLOG",
            RmgrId::Database => "Database",
            RmgrId::Tablespace => "Tablespace",
            RmgrId::MultiXact => "MultiXact",
            RmgrId::RelMap => "RelMap",
            RmgrId::Standby => "Standby",
            RmgrId::Heap2 => "Heap2",
            RmgrId::Heap => "Heap",
            RmgrId::Btree => "Btree",
            RmgrId::Hash => "Hash",
            RmgrId::Gin => "Gin",
            RmgrId::Gist => "Gist",
            RmgrId::Sequence => "Sequence",
            RmgrId::SpGist => "SPGist",
            RmgrId::Brin => "BRIN",
            RmgrId::CommitTs => "CommitTs",
            RmgrId::ReplicationOrigin => "ReplicationOrigin",
            RmgrId::Generic => "Generic",
            RmgrId::LogicalMessage => "LogicalMessage",
        }
    }

    /// The record type name for `xl_info` under this rmgr; see [`record_type`].
    pub fn record_type(self, xl_info: u8) -> Option<&'static str> {
        // `info & ~XLR_INFO_MASK`, what most identify functions switch on.
        let op = xl_info & XLR_RMGR_INFO_MASK;
        match self {
            RmgrId::Xlog => xlog_identify(op),
            RmgrId::Transaction => xact_identify(xl_info & XLOG_XACT_OPMASK),
            RmgrId::Storage => match op {
                XLOG_SMGR_CREATE => Some("CREATE"),
                XLOG_SMGR_TRUNCATE => Some("TRUNCATE"),
                _ => None,
            },
            RmgrId::Clog => match op {
                CLOG_ZEROPAGE => Some("ZEROPAGE"),
                CLOG_TRUNCATE => Some("TRUNCATE"),
                _ => None,
            },
            RmgrId::Database => match op {
                XLOG_DBASE_CREATE_FILE_COPY => Some("CREATE_FILE_COPY"),
                XLOG_DBASE_CREATE_WAL_LOG => Some("CREATE_WAL_LOG"),
                XLOG_DBASE_DROP => Some("DROP"),
                _ => None,
            },
            RmgrId::Tablespace => match op {
                XLOG_TBLSPC_CREATE => Some("CREATE"),
                XLOG_TBLSPC_DROP => Some("DROP"),
                _ => None,
            },
            RmgrId::MultiXact => match op {
                XLOG_MULTIXACT_ZERO_OFF_PAGE => Some("ZERO_OFF_PAGE"),
                XLOG_MULTIXACT_ZERO_MEM_PAGE => Some("ZERO_MEM_PAGE"),
                XLOG_MULTIXACT_CREATE_ID => Some("CREATE_ID"),
                XLOG_MULTIXACT_TRUNCATE_ID => Some("TRUNCATE_ID"),
                _ => None,
            },
            RmgrId::RelMap => match op {
                XLOG_RELMAP_UPDATE => Some("UPDATE"),
                _ => None,
            },
            RmgrId::Standby => match op {
                XLOG_STANDBY_LOCK => Some("LOCK"),
                XLOG_RUNNING_XACTS => Some("RUNNING_XACTS"),
                XLOG_INVALIDATIONS => Some("INVALIDATIONS"),
                _ => None,
            },
            RmgrId::Heap2 => heap2_identify(op),
            RmgrId::Heap => heap_identify(op),
            RmgrId::Btree => btree_identify(op),
            RmgrId::Hash => hash_identify(op),
            RmgrId::Gin => gin_identify(op),
            RmgrId::Gist => match op {
                XLOG_GIST_PAGE_UPDATE => Some("PAGE_UPDATE"),
                XLOG_GIST_DELETE => Some("DELETE"),
                XLOG_GIST_PAGE_REUSE => Some("PAGE_REUSE"),
                XLOG_GIST_PAGE_SPLIT => Some("PAGE_SPLIT"),
                XLOG_GIST_PAGE_DELETE => Some("PAGE_DELETE"),
                XLOG_GIST_ASSIGN_LSN => Some("ASSIGN_LSN"),
                _ => None,
            },
            RmgrId::Sequence => match op {
                XLOG_SEQ_LOG => Some("LOG"),
                _ => None,
            },
            RmgrId::SpGist => spgist_identify(op),
            RmgrId::Brin => brin_identify(op),
            // commit_ts_identify switches on the unmasked info.
            RmgrId::CommitTs => match xl_info {
                COMMIT_TS_ZEROPAGE => Some("ZEROPAGE"),
                COMMIT_TS_TRUNCATE => Some("TRUNCATE"),
                _ => None,
            },
            // replorigin_identify switches on the unmasked info.
            RmgrId::ReplicationOrigin => match xl_info {
                XLOG_REPLORIGIN_SET => Some("SET"),
                XLOG_REPLORIGIN_DROP => Some("DROP"),
                _ => None,
            },
            RmgrId::Generic => Some("Generic"),
            RmgrId::LogicalMessage => match op {
                XLOG_LOGICAL_MESSAGE => Some("MESSAGE"),
                _ => None,
            },
        }
    }
}

impl From<RmgrId> for u8 {
    fn from(r: RmgrId) -> u8 {
        r as u8
    }
}

/// The record type name `pg_waldump` prints after the rmgr (each rmgr's `*_identify` function
/// in src/backend/access/rmgrdesc/*.c), e.g. "INSERT", "INSERT+INIT", "COMMIT", "FPI",
/// "CHECKPOINT_ONLINE"; `None` when the identify function returns NULL (`pg_waldump` then
/// prints "UNKNOWN (%x)") or when `rmid` is not a built-in rmgr.
pub fn record_type(rmid: u8, xl_info: u8) -> Option<&'static str> {
    RmgrId::from_u8(rmid)?.record_type(xl_info)
}

// The identify functions with many cases live apart so `record_type` stays readable. Each
// takes the already-masked opcode. Combined opcode|flag values need named consts because a
// `|` in a match pattern means "or", not a bitwise or.

fn xlog_identify(op: u8) -> Option<&'static str> {
    Some(match op {
        XLOG_CHECKPOINT_SHUTDOWN => "CHECKPOINT_SHUTDOWN",
        XLOG_CHECKPOINT_ONLINE => "CHECKPOINT_ONLINE",
        XLOG_NOOP => "NOOP",
        XLOG_NEXTOID => "NEXTOID",
        XLOG_SWITCH => "SWITCH",
        XLOG_BACKUP_END => "BACKUP_END",
        XLOG_PARAMETER_CHANGE => "PARAMETER_CHANGE",
        XLOG_RESTORE_POINT => "RESTORE_POINT",
        XLOG_FPW_CHANGE => "FPW_CHANGE",
        XLOG_END_OF_RECOVERY => "END_OF_RECOVERY",
        XLOG_OVERWRITE_CONTRECORD => "OVERWRITE_CONTRECORD",
        XLOG_FPI => "FPI",
        XLOG_FPI_FOR_HINT => "FPI_FOR_HINT",
        _ => return None,
    })
}

fn xact_identify(op: u8) -> Option<&'static str> {
    Some(match op {
        XLOG_XACT_COMMIT => "COMMIT",
        XLOG_XACT_PREPARE => "PREPARE",
        XLOG_XACT_ABORT => "ABORT",
        XLOG_XACT_COMMIT_PREPARED => "COMMIT_PREPARED",
        XLOG_XACT_ABORT_PREPARED => "ABORT_PREPARED",
        XLOG_XACT_ASSIGNMENT => "ASSIGNMENT",
        // Singular in PostgreSQL, unlike Standby's "INVALIDATIONS".
        XLOG_XACT_INVALIDATIONS => "INVALIDATION",
        _ => return None,
    })
}

fn heap_identify(op: u8) -> Option<&'static str> {
    const INSERT_INIT: u8 = XLOG_HEAP_INSERT | XLOG_HEAP_INIT_PAGE;
    const UPDATE_INIT: u8 = XLOG_HEAP_UPDATE | XLOG_HEAP_INIT_PAGE;
    const HOT_UPDATE_INIT: u8 = XLOG_HEAP_HOT_UPDATE | XLOG_HEAP_INIT_PAGE;
    Some(match op {
        XLOG_HEAP_INSERT => "INSERT",
        INSERT_INIT => "INSERT+INIT",
        XLOG_HEAP_DELETE => "DELETE",
        XLOG_HEAP_UPDATE => "UPDATE",
        UPDATE_INIT => "UPDATE+INIT",
        XLOG_HEAP_HOT_UPDATE => "HOT_UPDATE",
        HOT_UPDATE_INIT => "HOT_UPDATE+INIT",
        XLOG_HEAP_TRUNCATE => "TRUNCATE",
        XLOG_HEAP_CONFIRM => "HEAP_CONFIRM",
        XLOG_HEAP_LOCK => "LOCK",
        XLOG_HEAP_INPLACE => "INPLACE",
        _ => return None,
    })
}

fn heap2_identify(op: u8) -> Option<&'static str> {
    const MULTI_INSERT_INIT: u8 = XLOG_HEAP2_MULTI_INSERT | XLOG_HEAP_INIT_PAGE;
    Some(match op {
        XLOG_HEAP2_PRUNE => "PRUNE",
        XLOG_HEAP2_VACUUM => "VACUUM",
        XLOG_HEAP2_FREEZE_PAGE => "FREEZE_PAGE",
        XLOG_HEAP2_VISIBLE => "VISIBLE",
        XLOG_HEAP2_MULTI_INSERT => "MULTI_INSERT",
        MULTI_INSERT_INIT => "MULTI_INSERT+INIT",
        XLOG_HEAP2_LOCK_UPDATED => "LOCK_UPDATED",
        XLOG_HEAP2_NEW_CID => "NEW_CID",
        XLOG_HEAP2_REWRITE => "REWRITE",
        _ => return None,
    })
}

fn btree_identify(op: u8) -> Option<&'static str> {
    Some(match op {
        XLOG_BTREE_INSERT_LEAF => "INSERT_LEAF",
        XLOG_BTREE_INSERT_UPPER => "INSERT_UPPER",
        XLOG_BTREE_INSERT_META => "INSERT_META",
        XLOG_BTREE_SPLIT_L => "SPLIT_L",
        XLOG_BTREE_SPLIT_R => "SPLIT_R",
        XLOG_BTREE_INSERT_POST => "INSERT_POST",
        XLOG_BTREE_DEDUP => "DEDUP",
        XLOG_BTREE_VACUUM => "VACUUM",
        XLOG_BTREE_DELETE => "DELETE",
        XLOG_BTREE_MARK_PAGE_HALFDEAD => "MARK_PAGE_HALFDEAD",
        XLOG_BTREE_UNLINK_PAGE => "UNLINK_PAGE",
        XLOG_BTREE_UNLINK_PAGE_META => "UNLINK_PAGE_META",
        XLOG_BTREE_NEWROOT => "NEWROOT",
        XLOG_BTREE_REUSE_PAGE => "REUSE_PAGE",
        XLOG_BTREE_META_CLEANUP => "META_CLEANUP",
        _ => return None,
    })
}

fn hash_identify(op: u8) -> Option<&'static str> {
    Some(match op {
        XLOG_HASH_INIT_META_PAGE => "INIT_META_PAGE",
        XLOG_HASH_INIT_BITMAP_PAGE => "INIT_BITMAP_PAGE",
        XLOG_HASH_INSERT => "INSERT",
        XLOG_HASH_ADD_OVFL_PAGE => "ADD_OVFL_PAGE",
        XLOG_HASH_SPLIT_ALLOCATE_PAGE => "SPLIT_ALLOCATE_PAGE",
        XLOG_HASH_SPLIT_PAGE => "SPLIT_PAGE",
        XLOG_HASH_SPLIT_COMPLETE => "SPLIT_COMPLETE",
        XLOG_HASH_MOVE_PAGE_CONTENTS => "MOVE_PAGE_CONTENTS",
        XLOG_HASH_SQUEEZE_PAGE => "SQUEEZE_PAGE",
        XLOG_HASH_DELETE => "DELETE",
        XLOG_HASH_SPLIT_CLEANUP => "SPLIT_CLEANUP",
        XLOG_HASH_UPDATE_META_PAGE => "UPDATE_META_PAGE",
        XLOG_HASH_VACUUM_ONE_PAGE => "VACUUM_ONE_PAGE",
        _ => return None,
    })
}

fn gin_identify(op: u8) -> Option<&'static str> {
    Some(match op {
        XLOG_GIN_CREATE_PTREE => "CREATE_PTREE",
        XLOG_GIN_INSERT => "INSERT",
        XLOG_GIN_SPLIT => "SPLIT",
        XLOG_GIN_VACUUM_PAGE => "VACUUM_PAGE",
        XLOG_GIN_VACUUM_DATA_LEAF_PAGE => "VACUUM_DATA_LEAF_PAGE",
        XLOG_GIN_DELETE_PAGE => "DELETE_PAGE",
        XLOG_GIN_UPDATE_META_PAGE => "UPDATE_META_PAGE",
        XLOG_GIN_INSERT_LISTPAGE => "INSERT_LISTPAGE",
        XLOG_GIN_DELETE_LISTPAGE => "DELETE_LISTPAGE",
        _ => return None,
    })
}

fn spgist_identify(op: u8) -> Option<&'static str> {
    Some(match op {
        XLOG_SPGIST_ADD_LEAF => "ADD_LEAF",
        XLOG_SPGIST_MOVE_LEAFS => "MOVE_LEAFS",
        XLOG_SPGIST_ADD_NODE => "ADD_NODE",
        XLOG_SPGIST_SPLIT_TUPLE => "SPLIT_TUPLE",
        XLOG_SPGIST_PICKSPLIT => "PICKSPLIT",
        XLOG_SPGIST_VACUUM_LEAF => "VACUUM_LEAF",
        XLOG_SPGIST_VACUUM_ROOT => "VACUUM_ROOT",
        XLOG_SPGIST_VACUUM_REDIRECT => "VACUUM_REDIRECT",
        _ => return None,
    })
}

fn brin_identify(op: u8) -> Option<&'static str> {
    const INSERT_INIT: u8 = XLOG_BRIN_INSERT | XLOG_BRIN_INIT_PAGE;
    const UPDATE_INIT: u8 = XLOG_BRIN_UPDATE | XLOG_BRIN_INIT_PAGE;
    Some(match op {
        XLOG_BRIN_CREATE_INDEX => "CREATE_INDEX",
        XLOG_BRIN_INSERT => "INSERT",
        INSERT_INIT => "INSERT+INIT",
        XLOG_BRIN_UPDATE => "UPDATE",
        UPDATE_INIT => "UPDATE+INIT",
        XLOG_BRIN_SAMEPAGE_UPDATE => "SAMEPAGE_UPDATE",
        XLOG_BRIN_REVMAP_EXTEND => "REVMAP_EXTEND",
        XLOG_BRIN_DESUMMARIZE => "DESUMMARIZE",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_match_rmgrlist() {
        for (i, r) in RmgrId::ALL.iter().enumerate() {
            assert_eq!(usize::from(r.id()), i);
            assert_eq!(RmgrId::from_u8(i as u8), Some(*r));
        }
        assert_eq!(RmgrId::from_u8(22), None);
        assert_eq!(RmgrId::from_u8(RM_MIN_CUSTOM_ID), None);
        assert_eq!(RmgrId::from_u8(255), None);
        assert_eq!(RmgrId::Xlog.id(), RM_XLOG_ID);
        assert_eq!(RmgrId::Transaction.id(), RM_XACT_ID);
        assert_eq!(RmgrId::Storage.id(), RM_SMGR_ID);
        assert_eq!(RmgrId::Heap2.id(), RM_HEAP2_ID);
        assert_eq!(RmgrId::Heap.id(), RM_HEAP_ID);
        assert_eq!(RmgrId::Btree.id(), RM_BTREE_ID);
        assert_eq!(RmgrId::SpGist.id(), RM_SPGIST_ID);
        assert_eq!(RmgrId::Brin.id(), RM_BRIN_ID);
        assert_eq!(RmgrId::CommitTs.id(), RM_COMMIT_TS_ID);
        assert_eq!(RmgrId::ReplicationOrigin.id(), RM_REPLORIGIN_ID);
        assert_eq!(RmgrId::LogicalMessage.id(), RM_LOGICALMSG_ID);
        assert_eq!(RmgrId::LogicalMessage.id(), RM_MAX_BUILTIN_ID);
        assert_eq!(u8::from(RmgrId::Gin), RM_GIN_ID);
    }

    #[test]
    fn names_as_in_rmgrlist() {
        let names: Vec<&str> = RmgrId::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(
            names,
            [
                "XLOG",
                "Transaction",
                "Storage",
                "CLOG",
                "Database",
                "Tablespace",
                "MultiXact",
                "RelMap",
                "Standby",
                "Heap2",
                "Heap",
                "Btree",
                "Hash",
                "Gin",
                "Gist",
                "Sequence",
                "SPGist",
                "BRIN",
                "CommitTs",
                "ReplicationOrigin",
                "Generic",
                "LogicalMessage",
            ]
        );
    }

    #[test]
    fn xlog() {
        assert_eq!(record_type(RM_XLOG_ID, 0x00), Some("CHECKPOINT_SHUTDOWN"));
        assert_eq!(record_type(RM_XLOG_ID, 0x10), Some("CHECKPOINT_ONLINE"));
        assert_eq!(record_type(RM_XLOG_ID, 0x40), Some("SWITCH"));
        assert_eq!(record_type(RM_XLOG_ID, 0xA0), Some("FPI_FOR_HINT"));
        assert_eq!(record_type(RM_XLOG_ID, 0xB0), Some("FPI"));
        // XLR flag bits in the low nibble do not change the name.
        assert_eq!(record_type(RM_XLOG_ID, 0xB0 | XLR_CHECK_CONSISTENCY), Some("FPI"));
        assert_eq!(record_type(RM_XLOG_ID, 0xD0), Some("OVERWRITE_CONTRECORD"));
        assert_eq!(record_type(RM_XLOG_ID, 0xC0), None);
        assert_eq!(record_type(RM_XLOG_ID, 0xE0), None);
    }

    #[test]
    fn transaction_ignores_has_info() {
        assert_eq!(record_type(RM_XACT_ID, 0x00), Some("COMMIT"));
        assert_eq!(record_type(RM_XACT_ID, 0x80), Some("COMMIT"));
        assert_eq!(record_type(RM_XACT_ID, 0xA0), Some("ABORT"));
        assert_eq!(record_type(RM_XACT_ID, 0x10), Some("PREPARE"));
        assert_eq!(record_type(RM_XACT_ID, 0x30), Some("COMMIT_PREPARED"));
        assert_eq!(record_type(RM_XACT_ID, 0x40), Some("ABORT_PREPARED"));
        assert_eq!(record_type(RM_XACT_ID, 0x50), Some("ASSIGNMENT"));
        assert_eq!(record_type(RM_XACT_ID, 0x60), Some("INVALIDATION"));
        assert_eq!(record_type(RM_XACT_ID, 0x70), None);
        assert_eq!(record_type(RM_XACT_ID, 0xF0), None);
    }

    #[test]
    fn heap_init_variants_only_where_listed() {
        assert_eq!(record_type(RM_HEAP_ID, 0x00), Some("INSERT"));
        assert_eq!(record_type(RM_HEAP_ID, 0x80), Some("INSERT+INIT"));
        assert_eq!(record_type(RM_HEAP_ID, 0x10), Some("DELETE"));
        // heap_identify has no DELETE+INIT case, and masks only the XLR bits.
        assert_eq!(record_type(RM_HEAP_ID, 0x90), None);
        assert_eq!(record_type(RM_HEAP_ID, 0x20), Some("UPDATE"));
        assert_eq!(record_type(RM_HEAP_ID, 0xA0), Some("UPDATE+INIT"));
        assert_eq!(record_type(RM_HEAP_ID, 0x30), Some("TRUNCATE"));
        assert_eq!(record_type(RM_HEAP_ID, 0x40), Some("HOT_UPDATE"));
        assert_eq!(record_type(RM_HEAP_ID, 0xC0), Some("HOT_UPDATE+INIT"));
        assert_eq!(record_type(RM_HEAP_ID, 0x50), Some("HEAP_CONFIRM"));
        assert_eq!(record_type(RM_HEAP_ID, 0x60), Some("LOCK"));
        assert_eq!(record_type(RM_HEAP_ID, 0x70), Some("INPLACE"));
        assert_eq!(record_type(RM_HEAP_ID, 0xF0), None);
        assert_eq!(record_type(RM_HEAP_ID, 0x80 | XLR_SPECIAL_REL_UPDATE), Some("INSERT+INIT"));
    }

    #[test]
    fn heap2() {
        assert_eq!(record_type(RM_HEAP2_ID, 0x00), Some("REWRITE"));
        assert_eq!(record_type(RM_HEAP2_ID, 0x10), Some("PRUNE"));
        assert_eq!(record_type(RM_HEAP2_ID, 0x20), Some("VACUUM"));
        assert_eq!(record_type(RM_HEAP2_ID, 0x30), Some("FREEZE_PAGE"));
        assert_eq!(record_type(RM_HEAP2_ID, 0x40), Some("VISIBLE"));
        assert_eq!(record_type(RM_HEAP2_ID, 0x50), Some("MULTI_INSERT"));
        assert_eq!(record_type(RM_HEAP2_ID, 0xD0), Some("MULTI_INSERT+INIT"));
        assert_eq!(record_type(RM_HEAP2_ID, 0x60), Some("LOCK_UPDATED"));
        assert_eq!(record_type(RM_HEAP2_ID, 0x70), Some("NEW_CID"));
        assert_eq!(record_type(RM_HEAP2_ID, 0x80), None);
    }

    #[test]
    fn indexes() {
        assert_eq!(record_type(RM_BTREE_ID, 0x00), Some("INSERT_LEAF"));
        assert_eq!(record_type(RM_BTREE_ID, 0xB0), Some("MARK_PAGE_HALFDEAD"));
        assert_eq!(record_type(RM_BTREE_ID, 0xC0), Some("VACUUM"));
        assert_eq!(record_type(RM_BTREE_ID, 0xE0), Some("META_CLEANUP"));
        assert_eq!(record_type(RM_BTREE_ID, 0xF0), None);
        assert_eq!(record_type(RM_HASH_ID, 0x00), Some("INIT_META_PAGE"));
        assert_eq!(record_type(RM_HASH_ID, 0xC0), Some("VACUUM_ONE_PAGE"));
        assert_eq!(record_type(RM_HASH_ID, 0xD0), None);
        assert_eq!(record_type(RM_GIN_ID, 0x00), None);
        assert_eq!(record_type(RM_GIN_ID, 0x10), Some("CREATE_PTREE"));
        assert_eq!(record_type(RM_GIN_ID, 0x90), Some("VACUUM_DATA_LEAF_PAGE"));
        assert_eq!(record_type(RM_GIST_ID, 0x00), Some("PAGE_UPDATE"));
        assert_eq!(record_type(RM_GIST_ID, 0x40), None);
        assert_eq!(record_type(RM_GIST_ID, 0x60), Some("PAGE_DELETE"));
        assert_eq!(record_type(RM_GIST_ID, 0x70), Some("ASSIGN_LSN"));
        assert_eq!(record_type(RM_SPGIST_ID, 0x00), None);
        assert_eq!(record_type(RM_SPGIST_ID, 0x10), Some("ADD_LEAF"));
        assert_eq!(record_type(RM_SPGIST_ID, 0x80), Some("VACUUM_REDIRECT"));
        assert_eq!(record_type(RM_BRIN_ID, 0x00), Some("CREATE_INDEX"));
        assert_eq!(record_type(RM_BRIN_ID, 0x90), Some("INSERT+INIT"));
        assert_eq!(record_type(RM_BRIN_ID, 0xA0), Some("UPDATE+INIT"));
        assert_eq!(record_type(RM_BRIN_ID, 0xB0), None);
        assert_eq!(record_type(RM_BRIN_ID, 0x50), Some("DESUMMARIZE"));
    }

    #[test]
    fn small_rmgrs() {
        assert_eq!(record_type(RM_SMGR_ID, 0x10), Some("CREATE"));
        assert_eq!(record_type(RM_SMGR_ID, 0x20), Some("TRUNCATE"));
        assert_eq!(record_type(RM_SMGR_ID, 0x00), None);
        assert_eq!(record_type(RM_CLOG_ID, 0x00), Some("ZEROPAGE"));
        assert_eq!(record_type(RM_CLOG_ID, 0x10), Some("TRUNCATE"));
        assert_eq!(record_type(RM_DBASE_ID, 0x00), Some("CREATE_FILE_COPY"));
        assert_eq!(record_type(RM_DBASE_ID, 0x10), Some("CREATE_WAL_LOG"));
        assert_eq!(record_type(RM_DBASE_ID, 0x20), Some("DROP"));
        assert_eq!(record_type(RM_TBLSPC_ID, 0x10), Some("DROP"));
        assert_eq!(record_type(RM_MULTIXACT_ID, 0x20), Some("CREATE_ID"));
        assert_eq!(record_type(RM_RELMAP_ID, 0x00), Some("UPDATE"));
        assert_eq!(record_type(RM_RELMAP_ID, 0x10), None);
        assert_eq!(record_type(RM_STANDBY_ID, 0x10), Some("RUNNING_XACTS"));
        assert_eq!(record_type(RM_STANDBY_ID, 0x20), Some("INVALIDATIONS"));
        assert_eq!(record_type(RM_SEQ_ID, 0x00), Some("LOG"));
        assert_eq!(record_type(RM_LOGICALMSG_ID, 0x00), Some("MESSAGE"));
        assert_eq!(record_type(RM_LOGICALMSG_ID, 0x01), Some("MESSAGE"));
        assert_eq!(record_type(RM_LOGICALMSG_ID, 0x10), None);
    }

    #[test]
    fn unmasked_and_constant_identifiers() {
        // commit_ts_identify and replorigin_identify do not mask the XLR bits.
        assert_eq!(record_type(RM_COMMIT_TS_ID, 0x00), Some("ZEROPAGE"));
        assert_eq!(record_type(RM_COMMIT_TS_ID, 0x10), Some("TRUNCATE"));
        assert_eq!(record_type(RM_COMMIT_TS_ID, 0x12), None);
        assert_eq!(record_type(RM_REPLORIGIN_ID, 0x00), Some("SET"));
        assert_eq!(record_type(RM_REPLORIGIN_ID, 0x10), Some("DROP"));
        assert_eq!(record_type(RM_REPLORIGIN_ID, 0x01), None);
        // generic_identify ignores info entirely.
        for info in [0x00, 0x10, 0xFF] {
            assert_eq!(record_type(RM_GENERIC_ID, info), Some("Generic"));
        }
    }

    #[test]
    fn unknown_rmgrs() {
        assert_eq!(record_type(22, 0x00), None);
        assert_eq!(record_type(128, 0x00), None);
        assert_eq!(record_type(255, 0x00), None);
    }

    #[test]
    fn total_over_all_inputs() {
        // Every (rmid, info) pair is answered without panicking.
        let mut known = 0;
        for rmid in 0..=255u8 {
            for info in 0..=255u8 {
                known += usize::from(record_type(rmid, info).is_some());
            }
        }
        assert!(known > 0);
    }
}
