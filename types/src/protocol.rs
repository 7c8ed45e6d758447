//! The page service protocol, spoken over the sidecar's unix socket by the extension (and by
//! `neon-sidecar` commands and tests). One request, one final response, on a connection that
//! may carry many; a long request (a base backup) may send `Progress` frames before its final
//! response. Every frame is versioned and CRC32C-checked, so a torn or foreign message is an
//! error, never a page.
//!
//! ```text
//! frame:    magic u32 "NEPS" | version u8 | kind u8 | reserved u16 | len u32 |
//!           payload (len bytes) | crc32c u32 (of everything before it)
//!           all integers little-endian
//! requests (kind):
//!   0x01 GetPage        rel | blkno u32 | lsn u64 | wait_ms u32
//!   0x02 RelSize        rel | lsn u64 | wait_ms u32
//!   0x03 ListDatabases  lsn u64 | wait_ms u32
//!   0x04 ListRelations  dbnode u32 | lsn u64 | wait_ms u32
//!   0x05 WaitForLsn     lsn u64 | wait_ms u32
//!   0x06 History        (empty)
//!   0x07 Status         (empty)
//!   0x08 Basebackup     lsn u64 | flags u8 (1: full, 2: new timeline) | wait_ms u32
//!   0x09 Prefetch       rel | first u32 | n u32 | lsn u64 | wait_ms u32
//!                       (rebuild blocks first..first+n into the sidecar's page cache; blocks
//!                       past the fork's end are skipped)
//!   0x0A ComputeFlush   lsn u64 (the compute's WAL flush position, for lag reports)
//!   0x0B RelationFile   dbnode u32 | reloid u32 | lsn u64 | wait_ms u32
//!                       (the file relation `reloid` had at `lsn`, from pg_class then)
//!   0x0C OnTimeline     timeline u32 | kind u8 | that request's payload
//!                       (the request, on that PostgreSQL timeline rather than the one the
//!                       sidecar follows now: its lineage up to the timeline's fork, then its
//!                       own history)
//!   0x0D BranchCreate   lsn u64 | wait_ms u32 | UTF-8 mount directory (empty: the default,
//!                       `<shared dir>/branches/<id>/data`)
//!   0x0E BranchList     (empty)
//!   0x0F BranchDrop     id u32
//!   0x10 LsnAt          time i64 | inclusive u8 | clock i64 | clock_lsn u64 | wait_ms u32
//!                       (where recovery with recovery_target_time = time stops; clock: the
//!                       compute's clock when its WAL was flushed to clock_lsn, i64::MIN: none;
//!                       the sidecar waits up to wait_ms to have filed WAL up to clock_lsn)
//!   0x11 TimeAt         lsn u64
//!   0x12 PastStart      lsn u64 | wait_ms u32 | idle_ms u32 (a read-only server on a branch at
//!                       lsn, or on a copy where branches cannot be mounted; stopped after
//!                       idle_ms without use, 0: never, and started again when next used)
//!   0x13 PastStop       id u32 (stops it and drops its branch or copy)
//!   0x14 PastList       (empty)
//!   rel = spcnode u32 | dbnode u32 | relnode u32 | fork u8
//!   wait_ms: how long to wait for `lsn` to arrive before answering NotYet
//! responses:
//!   0x81 Page           8192 bytes
//!   0x82 Size           exists u8 | nblocks u32
//!   0x83 Databases      n u32 | n × (dbnode u32 | spcnode u32)
//!   0x84 Relations      n u32 | n × (rel | nblocks u32)
//!   0x85 Lsn            lsn u64
//!   0x86 History        n u32 | n × timeline (the current one first):
//!                       id u32 | parent u32 (0: none) | fork u64 | origin u64 | oldest u64 |
//!                       durable u64 | last u64 | gaps u32 | gaps × (from u64 | to u64)
//!   0x87 Status         UTF-8 text, "name value" lines
//!   0x88 Basebackup     lsn u64 | bytes u64 | micros u64 (0: it was already there) |
//!                       UTF-8 path of the tar in the shared directory
//!   0x89 Prefetched     pages u32 (now in the cache, rebuilt or already there)
//!   0x8B RelationFile   exists u8 | spcnode u32 | dbnode u32 | relnode u32
//!   0x8A Progress       done u64 | total u64 | bytes u64 | micros u64 (not final: the
//!                       request's answer follows; a base backup's pages so far, of all,
//!                       bytes written and time taken, about once a second)
//!   0x8C Branches       n u32 | n × branch (BranchCreate: the one made; BranchDrop: the one
//!                       dropped; BranchList: all):
//!                       id u32 | lsn u64 | timeline u32 (its own) | source u32 (the
//!                       store's timeline whose history it reads, pinned at lsn) | history_files u32 |
//!                       written_blocks u64 | path_len u32 | UTF-8 mount path |
//!                       problem_len u32 | UTF-8 problem (empty: mounted and served)
//!   0x8D Commits        before, after: each present u8 | lsn u64 | time i64 (the transaction
//!                       ends around an LSN: the last record starting before it, the first at
//!                       or after it)
//!   0x8E Past           n u32 | n × (id u32 | branch u32 (0: a copy) | lsn u64 | port u16 |
//!                       running u8 | path_len u32 | UTF-8 socket directory)
//!   0xFF Error          code u8 | UTF-8 message
//! ```

use crate::{BufferTag, ForkNumber, Lsn, PgTime, RelFileNode, RelTag, BLCKSZ};
use std::io::{Read, Write};

pub const MAGIC: u32 = u32::from_le_bytes(*b"NEPS");
pub const VERSION: u8 = 2;
pub const HEADER_LEN: usize = 12;
/// No message is larger (a relation list of a huge database stays well below).
pub const MAX_PAYLOAD: usize = 64 << 20;

/// What went wrong, for the caller to act on (the message says it for people).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ErrorCode {
    BadRequest = 1,
    /// The LSN is before the retained history.
    OutOfHistory = 2,
    /// The LSN has not arrived within the wait.
    NotYet = 3,
    /// No such relation, block or database at that LSN.
    NotFound = 4,
    /// The store or redo failed (corruption, a redo process error).
    Internal = 5,
}

impl ErrorCode {
    fn from_u8(b: u8) -> ErrorCode {
        match b {
            1 => ErrorCode::BadRequest,
            2 => ErrorCode::OutOfHistory,
            3 => ErrorCode::NotYet,
            4 => ErrorCode::NotFound,
            _ => ErrorCode::Internal,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    GetPage {
        tag: BufferTag,
        lsn: Lsn,
        wait_ms: u32,
    },
    RelSize {
        rel: RelTag,
        lsn: Lsn,
        wait_ms: u32,
    },
    ListDatabases {
        lsn: Lsn,
        wait_ms: u32,
    },
    ListRelations {
        dbnode: u32,
        lsn: Lsn,
        wait_ms: u32,
    },
    WaitForLsn {
        lsn: Lsn,
        wait_ms: u32,
    },
    History,
    Status,
    /// A base backup as of `lsn` in the shared directory (`full`: with relation pages;
    /// `new_timeline`: starting a new timeline).
    Basebackup {
        lsn: Lsn,
        full: bool,
        new_timeline: bool,
        wait_ms: u32,
    },
    /// Blocks `first..first + n` of `rel` as of `lsn` into the sidecar's page cache.
    Prefetch {
        rel: RelTag,
        first: u32,
        n: u32,
        lsn: Lsn,
        wait_ms: u32,
    },
    /// The compute's WAL flush position; answered with the sidecar's last ingested LSN.
    ComputeFlush {
        lsn: Lsn,
    },
    /// The file relation `reloid` of database `dbnode` had at `lsn` (before a rewrite, an
    /// older one than now).
    RelationFile {
        dbnode: u32,
        reloid: u32,
        lsn: Lsn,
        wait_ms: u32,
    },
    /// `request` on PostgreSQL timeline `timeline` instead of the one followed now.
    OnTimeline {
        timeline: u32,
        request: Box<Request>,
    },
    /// A writable branch as of `lsn`, mounted at `mount` (`None`: the default place).
    BranchCreate {
        lsn: Lsn,
        mount: Option<String>,
        wait_ms: u32,
    },
    BranchList,
    BranchDrop {
        id: u32,
    },
    /// The LSN where recovery to `time` stops; `clock`: the compute's clock and its WAL flush
    /// position when it read it.
    LsnAt {
        time: PgTime,
        inclusive: bool,
        clock: Option<(PgTime, Lsn)>,
        wait_ms: u32,
    },
    /// The transaction ends around `lsn`.
    TimeAt {
        lsn: Lsn,
    },
    PastStart {
        lsn: Lsn,
        wait_ms: u32,
        idle_ms: u32,
    },
    PastStop {
        id: u32,
    },
    PastList,
}

/// A read-only server on the past, as `Past` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PastInfo {
    pub id: u32,
    /// The branch it runs on; `None`: on a copy (a base backup), where the sidecar could not
    /// mount a branch.
    pub branch: Option<u32>,
    pub lsn: Lsn,
    /// Where its unix socket is (`host` for libpq).
    pub socket_dir: String,
    pub port: u16,
    /// Whether its postmaster runs now (an idle one is started again by the next connection).
    pub running: bool,
}

/// A branch, as `Branches` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BranchInfo {
    pub id: u32,
    pub lsn: Lsn,
    /// The PostgreSQL timeline the branch starts (its own).
    pub timeline: u32,
    /// The store's timeline whose history the branch reads (pinned at `lsn`).
    pub source: u32,
    /// Relation files whose blocks come from history.
    pub history_files: u32,
    /// Blocks of those the branch has written.
    pub written_blocks: u64,
    /// Where its data directory is mounted.
    pub path: String,
    /// Why the sidecar could not mount it when it started (empty: mounted and served). Such
    /// a branch keeps its history pinned until it is mounted at a later start or dropped.
    pub problem: String,
}

/// One timeline of the sidecar's history, as `History` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelineHistory {
    pub timeline: u32,
    /// The parent timeline and the fork LSN (the history file's switch point).
    pub parent: Option<(u32, Lsn)>,
    /// Where this timeline's own history began.
    pub origin: Lsn,
    /// The oldest LSN readable on its lineage.
    pub oldest: Lsn,
    pub durable: Lsn,
    /// The end of the last record filed.
    pub last: Lsn,
    /// Lost history: LSNs after `.0` and before `.1` cannot be read.
    pub gaps: Vec<(Lsn, Lsn)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Page(Box<[u8; BLCKSZ]>),
    Size(Option<u32>),
    Databases(Vec<(u32, u32)>),
    Relations(Vec<(RelTag, u32)>),
    Lsn(Lsn),
    /// Every timeline, the one followed now first.
    History(Vec<TimelineHistory>),
    Status(String),
    Basebackup {
        lsn: Lsn,
        bytes: u64,
        micros: u64,
        path: String,
    },
    Prefetched(u32),
    /// The answer to `RelationFile`: `None` if no such relation was visible then.
    RelationFile(Option<RelFileNode>),
    Branches(Vec<BranchInfo>),
    Past(Vec<PastInfo>),
    /// Transaction ends (start LSN of the record, its time) before and at or after an LSN.
    Commits {
        before: Option<(Lsn, PgTime)>,
        after: Option<(Lsn, PgTime)>,
    },
    /// Not a final response: how far a long request has come.
    Progress {
        done: u64,
        total: u64,
        bytes: u64,
        micros: u64,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("page service connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("page service message: {0}")]
    Malformed(String),
}

fn malformed<T>(what: impl Into<String>) -> Result<T, ProtocolError> {
    Err(ProtocolError::Malformed(what.into()))
}

/// Reads little-endian fields off a payload.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], ProtocolError> {
        if self.0.len() < n {
            return malformed(format!("payload ends {} bytes early", n - self.0.len()));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn lsn(&mut self) -> Result<Lsn, ProtocolError> {
        Ok(Lsn(self.u64()?))
    }
    fn rel(&mut self) -> Result<RelTag, ProtocolError> {
        let node = RelFileNode { spcnode: self.u32()?, dbnode: self.u32()?, relnode: self.u32()? };
        let f = self.u8()?;
        let fork = ForkNumber::try_from(f).or_else(|_| malformed(format!("fork number {f}")))?;
        Ok(RelTag { node, fork })
    }
    fn text(&mut self) -> Result<String, ProtocolError> {
        let rest = std::mem::take(&mut self.0);
        String::from_utf8(rest.to_vec()).or_else(|_| malformed("text is not UTF-8"))
    }
    fn end(&self) -> Result<(), ProtocolError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            malformed(format!("{} bytes after the message", self.0.len()))
        }
    }
}

fn put_rel(b: &mut Vec<u8>, rel: &RelTag) {
    b.extend_from_slice(&rel.node.spcnode.to_le_bytes());
    b.extend_from_slice(&rel.node.dbnode.to_le_bytes());
    b.extend_from_slice(&rel.node.relnode.to_le_bytes());
    b.push(rel.fork as u8);
}

fn put_lsn_wait(b: &mut Vec<u8>, lsn: Lsn, wait_ms: u32) {
    b.extend_from_slice(&lsn.0.to_le_bytes());
    b.extend_from_slice(&wait_ms.to_le_bytes());
}

impl Request {
    fn encode(&self) -> (u8, Vec<u8>) {
        let mut b = Vec::new();
        let kind = match self {
            Request::GetPage { tag, lsn, wait_ms } => {
                put_rel(&mut b, &tag.rel);
                b.extend_from_slice(&tag.blkno.to_le_bytes());
                put_lsn_wait(&mut b, *lsn, *wait_ms);
                0x01
            }
            Request::RelSize { rel, lsn, wait_ms } => {
                put_rel(&mut b, rel);
                put_lsn_wait(&mut b, *lsn, *wait_ms);
                0x02
            }
            Request::ListDatabases { lsn, wait_ms } => {
                put_lsn_wait(&mut b, *lsn, *wait_ms);
                0x03
            }
            Request::ListRelations { dbnode, lsn, wait_ms } => {
                b.extend_from_slice(&dbnode.to_le_bytes());
                put_lsn_wait(&mut b, *lsn, *wait_ms);
                0x04
            }
            Request::WaitForLsn { lsn, wait_ms } => {
                put_lsn_wait(&mut b, *lsn, *wait_ms);
                0x05
            }
            Request::History => 0x06,
            Request::Status => 0x07,
            Request::Basebackup { lsn, full, new_timeline, wait_ms } => {
                b.extend_from_slice(&lsn.0.to_le_bytes());
                b.push(u8::from(*full) | (u8::from(*new_timeline) << 1));
                b.extend_from_slice(&wait_ms.to_le_bytes());
                0x08
            }
            Request::Prefetch { rel, first, n, lsn, wait_ms } => {
                put_rel(&mut b, rel);
                b.extend_from_slice(&first.to_le_bytes());
                b.extend_from_slice(&n.to_le_bytes());
                put_lsn_wait(&mut b, *lsn, *wait_ms);
                0x09
            }
            Request::ComputeFlush { lsn } => {
                b.extend_from_slice(&lsn.0.to_le_bytes());
                0x0A
            }
            Request::RelationFile { dbnode, reloid, lsn, wait_ms } => {
                b.extend_from_slice(&dbnode.to_le_bytes());
                b.extend_from_slice(&reloid.to_le_bytes());
                put_lsn_wait(&mut b, *lsn, *wait_ms);
                0x0B
            }
            Request::OnTimeline { timeline, request } => {
                b.extend_from_slice(&timeline.to_le_bytes());
                let (kind, payload) = request.encode();
                b.push(kind);
                b.extend_from_slice(&payload);
                0x0C
            }
            Request::BranchCreate { lsn, mount, wait_ms } => {
                put_lsn_wait(&mut b, *lsn, *wait_ms);
                b.extend_from_slice(mount.as_deref().unwrap_or("").as_bytes());
                0x0D
            }
            Request::BranchList => 0x0E,
            Request::BranchDrop { id } => {
                b.extend_from_slice(&id.to_le_bytes());
                0x0F
            }
            Request::LsnAt { time, inclusive, clock, wait_ms } => {
                b.extend_from_slice(&time.0.to_le_bytes());
                b.push(u8::from(*inclusive));
                let (c, at) = clock.unwrap_or((PgTime(i64::MIN), Lsn(0)));
                b.extend_from_slice(&c.0.to_le_bytes());
                put_lsn_wait(&mut b, at, *wait_ms);
                0x10
            }
            Request::TimeAt { lsn } => {
                b.extend_from_slice(&lsn.0.to_le_bytes());
                0x11
            }
            Request::PastStart { lsn, wait_ms, idle_ms } => {
                put_lsn_wait(&mut b, *lsn, *wait_ms);
                b.extend_from_slice(&idle_ms.to_le_bytes());
                0x12
            }
            Request::PastStop { id } => {
                b.extend_from_slice(&id.to_le_bytes());
                0x13
            }
            Request::PastList => 0x14,
        };
        (kind, b)
    }

    fn decode(kind: u8, payload: &[u8]) -> Result<Request, ProtocolError> {
        let mut r = Reader(payload);
        let req = match kind {
            0x01 => {
                let rel = r.rel()?;
                let blkno = r.u32()?;
                Request::GetPage { tag: BufferTag { rel, blkno }, lsn: r.lsn()?, wait_ms: r.u32()? }
            }
            0x02 => Request::RelSize { rel: r.rel()?, lsn: r.lsn()?, wait_ms: r.u32()? },
            0x03 => Request::ListDatabases { lsn: r.lsn()?, wait_ms: r.u32()? },
            0x04 => Request::ListRelations { dbnode: r.u32()?, lsn: r.lsn()?, wait_ms: r.u32()? },
            0x05 => Request::WaitForLsn { lsn: r.lsn()?, wait_ms: r.u32()? },
            0x06 => Request::History,
            0x07 => Request::Status,
            0x08 => {
                let lsn = r.lsn()?;
                let flags = r.u8()?;
                Request::Basebackup { lsn, full: flags & 1 != 0, new_timeline: flags & 2 != 0, wait_ms: r.u32()? }
            }
            0x09 => Request::Prefetch { rel: r.rel()?, first: r.u32()?, n: r.u32()?, lsn: r.lsn()?, wait_ms: r.u32()? },
            0x0A => Request::ComputeFlush { lsn: r.lsn()? },
            0x0B => Request::RelationFile { dbnode: r.u32()?, reloid: r.u32()?, lsn: r.lsn()?, wait_ms: r.u32()? },
            0x0C => {
                let timeline = r.u32()?;
                let kind = r.u8()?;
                if kind == 0x0C {
                    return malformed("a timeline request inside another");
                }
                let inner = std::mem::take(&mut r.0);
                Request::OnTimeline { timeline, request: Box::new(Request::decode(kind, inner)?) }
            }
            0x0D => {
                let (lsn, wait_ms) = (r.lsn()?, r.u32()?);
                let mount = Some(r.text()?).filter(|m| !m.is_empty());
                Request::BranchCreate { lsn, mount, wait_ms }
            }
            0x0E => Request::BranchList,
            0x0F => Request::BranchDrop { id: r.u32()? },
            0x10 => {
                let time = PgTime(r.u64()? as i64);
                let inclusive = r.u8()? != 0;
                let clock = PgTime(r.u64()? as i64);
                let (at, wait_ms) = (r.lsn()?, r.u32()?);
                let clock = (clock.0 != i64::MIN).then_some((clock, at));
                Request::LsnAt { time, inclusive, clock, wait_ms }
            }
            0x11 => Request::TimeAt { lsn: r.lsn()? },
            0x12 => Request::PastStart { lsn: r.lsn()?, wait_ms: r.u32()?, idle_ms: r.u32()? },
            0x13 => Request::PastStop { id: r.u32()? },
            0x14 => Request::PastList,
            k => return malformed(format!("unknown request kind {k:#04x}")),
        };
        r.end()?;
        Ok(req)
    }

    pub fn write_to(&self, w: &mut impl Write) -> Result<(), ProtocolError> {
        let (kind, payload) = self.encode();
        write_frame(w, kind, &payload)
    }

    /// Reads the next request; `Ok(None)` when the peer closed the connection between requests.
    pub fn read_from(r: &mut impl Read) -> Result<Option<Request>, ProtocolError> {
        match read_frame(r)? {
            Some((kind, payload)) => Ok(Some(Request::decode(kind, &payload)?)),
            None => Ok(None),
        }
    }
}

impl Response {
    fn encode(&self) -> (u8, Vec<u8>) {
        let mut b = Vec::new();
        let kind = match self {
            Response::Page(p) => {
                b.extend_from_slice(&p[..]);
                0x81
            }
            Response::Size(n) => {
                b.push(u8::from(n.is_some()));
                b.extend_from_slice(&n.unwrap_or(0).to_le_bytes());
                0x82
            }
            Response::Databases(dbs) => {
                b.extend_from_slice(&(dbs.len() as u32).to_le_bytes());
                for (db, spc) in dbs {
                    b.extend_from_slice(&db.to_le_bytes());
                    b.extend_from_slice(&spc.to_le_bytes());
                }
                0x83
            }
            Response::Relations(rels) => {
                b.extend_from_slice(&(rels.len() as u32).to_le_bytes());
                for (rel, n) in rels {
                    put_rel(&mut b, rel);
                    b.extend_from_slice(&n.to_le_bytes());
                }
                0x84
            }
            Response::Lsn(l) => {
                b.extend_from_slice(&l.0.to_le_bytes());
                0x85
            }
            Response::History(timelines) => {
                b.extend_from_slice(&(timelines.len() as u32).to_le_bytes());
                for t in timelines {
                    let (parent, fork) = t.parent.unwrap_or_default();
                    b.extend_from_slice(&t.timeline.to_le_bytes());
                    b.extend_from_slice(&parent.to_le_bytes());
                    for l in [fork, t.origin, t.oldest, t.durable, t.last] {
                        b.extend_from_slice(&l.0.to_le_bytes());
                    }
                    b.extend_from_slice(&(t.gaps.len() as u32).to_le_bytes());
                    for (from, to) in &t.gaps {
                        b.extend_from_slice(&from.0.to_le_bytes());
                        b.extend_from_slice(&to.0.to_le_bytes());
                    }
                }
                0x86
            }
            Response::Status(text) => {
                b.extend_from_slice(text.as_bytes());
                0x87
            }
            Response::Basebackup { lsn, bytes, micros, path } => {
                for v in [lsn.0, *bytes, *micros] {
                    b.extend_from_slice(&v.to_le_bytes());
                }
                b.extend_from_slice(path.as_bytes());
                0x88
            }
            Response::Prefetched(n) => {
                b.extend_from_slice(&n.to_le_bytes());
                0x89
            }
            Response::RelationFile(node) => {
                b.push(u8::from(node.is_some()));
                let n = node.unwrap_or(RelFileNode { spcnode: 0, dbnode: 0, relnode: 0 });
                for v in [n.spcnode, n.dbnode, n.relnode] {
                    b.extend_from_slice(&v.to_le_bytes());
                }
                0x8B
            }
            Response::Progress { done, total, bytes, micros } => {
                for v in [done, total, bytes, micros] {
                    b.extend_from_slice(&v.to_le_bytes());
                }
                0x8A
            }
            Response::Branches(branches) => {
                b.extend_from_slice(&(branches.len() as u32).to_le_bytes());
                for br in branches {
                    b.extend_from_slice(&br.id.to_le_bytes());
                    b.extend_from_slice(&br.lsn.0.to_le_bytes());
                    b.extend_from_slice(&br.timeline.to_le_bytes());
                    b.extend_from_slice(&br.source.to_le_bytes());
                    b.extend_from_slice(&br.history_files.to_le_bytes());
                    b.extend_from_slice(&br.written_blocks.to_le_bytes());
                    b.extend_from_slice(&(br.path.len() as u32).to_le_bytes());
                    b.extend_from_slice(br.path.as_bytes());
                    b.extend_from_slice(&(br.problem.len() as u32).to_le_bytes());
                    b.extend_from_slice(br.problem.as_bytes());
                }
                0x8C
            }
            Response::Past(servers) => {
                b.extend_from_slice(&(servers.len() as u32).to_le_bytes());
                for p in servers {
                    b.extend_from_slice(&p.id.to_le_bytes());
                    b.extend_from_slice(&p.branch.unwrap_or(0).to_le_bytes());
                    b.extend_from_slice(&p.lsn.0.to_le_bytes());
                    b.extend_from_slice(&p.port.to_le_bytes());
                    b.push(u8::from(p.running));
                    b.extend_from_slice(&(p.socket_dir.len() as u32).to_le_bytes());
                    b.extend_from_slice(p.socket_dir.as_bytes());
                }
                0x8E
            }
            Response::Commits { before, after } => {
                for c in [before, after] {
                    let (lsn, time) = c.unwrap_or((Lsn(0), PgTime(0)));
                    b.push(u8::from(c.is_some()));
                    b.extend_from_slice(&lsn.0.to_le_bytes());
                    b.extend_from_slice(&time.0.to_le_bytes());
                }
                0x8D
            }
            Response::Error { code, message } => {
                b.push(*code as u8);
                b.extend_from_slice(message.as_bytes());
                0xFF
            }
        };
        (kind, b)
    }

    fn decode(kind: u8, payload: &[u8]) -> Result<Response, ProtocolError> {
        let mut r = Reader(payload);
        let resp = match kind {
            0x81 => {
                let page: [u8; BLCKSZ] = r.take(BLCKSZ)?.try_into().expect("BLCKSZ");
                Response::Page(Box::new(page))
            }
            0x82 => {
                let exists = r.u8()? != 0;
                let n = r.u32()?;
                Response::Size(exists.then_some(n))
            }
            0x83 => {
                let n = r.u32()? as usize;
                let mut v = Vec::with_capacity(n.min(1 << 16));
                for _ in 0..n {
                    v.push((r.u32()?, r.u32()?));
                }
                Response::Databases(v)
            }
            0x84 => {
                let n = r.u32()? as usize;
                let mut v = Vec::with_capacity(n.min(1 << 16));
                for _ in 0..n {
                    v.push((r.rel()?, r.u32()?));
                }
                Response::Relations(v)
            }
            0x85 => Response::Lsn(r.lsn()?),
            0x86 => {
                let n = r.u32()? as usize;
                let mut timelines = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    let (timeline, parent, fork) = (r.u32()?, r.u32()?, r.lsn()?);
                    let (origin, oldest, durable, last) = (r.lsn()?, r.lsn()?, r.lsn()?, r.lsn()?);
                    let ngaps = r.u32()? as usize;
                    let mut gaps = Vec::with_capacity(ngaps.min(1024));
                    for _ in 0..ngaps {
                        gaps.push((r.lsn()?, r.lsn()?));
                    }
                    let parent = (parent != 0).then_some((parent, fork));
                    timelines.push(TimelineHistory { timeline, parent, origin, oldest, durable, last, gaps });
                }
                Response::History(timelines)
            }
            0x87 => Response::Status(r.text()?),
            0x88 => {
                let lsn = r.lsn()?;
                let bytes = r.u64()?;
                let micros = r.u64()?;
                Response::Basebackup { lsn, bytes, micros, path: r.text()? }
            }
            0x89 => Response::Prefetched(r.u32()?),
            0x8B => {
                let exists = r.u8()? != 0;
                let n = RelFileNode { spcnode: r.u32()?, dbnode: r.u32()?, relnode: r.u32()? };
                Response::RelationFile(exists.then_some(n))
            }
            0x8A => Response::Progress { done: r.u64()?, total: r.u64()?, bytes: r.u64()?, micros: r.u64()? },
            0x8C => {
                let n = r.u32()? as usize;
                let mut branches = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    let (id, lsn, timeline, source) = (r.u32()?, r.lsn()?, r.u32()?, r.u32()?);
                    let (history_files, written_blocks) = (r.u32()?, r.u64()?);
                    let len = r.u32()? as usize;
                    let path = String::from_utf8(r.take(len)?.to_vec()).or_else(|_| malformed("path is not UTF-8"))?;
                    let len = r.u32()? as usize;
                    let problem =
                        String::from_utf8(r.take(len)?.to_vec()).or_else(|_| malformed("problem is not UTF-8"))?;
                    branches.push(BranchInfo {
                        id,
                        lsn,
                        timeline,
                        source,
                        history_files,
                        written_blocks,
                        path,
                        problem,
                    });
                }
                Response::Branches(branches)
            }
            0x8E => {
                let n = r.u32()? as usize;
                let mut servers = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    let (id, branch, lsn) = (r.u32()?, r.u32()?, r.lsn()?);
                    let port = u16::from_le_bytes(r.take(2)?.try_into().expect("2 bytes"));
                    let running = r.u8()? != 0;
                    let len = r.u32()? as usize;
                    let socket_dir = String::from_utf8(r.take(len)?.to_vec())
                        .or_else(|_| malformed("socket directory is not UTF-8"))?;
                    servers.push(PastInfo {
                        id,
                        branch: (branch != 0).then_some(branch),
                        lsn,
                        socket_dir,
                        port,
                        running,
                    });
                }
                Response::Past(servers)
            }
            0x8D => {
                let mut one = || -> Result<Option<(Lsn, PgTime)>, ProtocolError> {
                    let present = r.u8()? != 0;
                    let (lsn, time) = (r.lsn()?, PgTime(r.u64()? as i64));
                    Ok(present.then_some((lsn, time)))
                };
                let before = one()?;
                Response::Commits { before, after: one()? }
            }
            0xFF => {
                let code = ErrorCode::from_u8(r.u8()?);
                Response::Error { code, message: r.text()? }
            }
            k => return malformed(format!("unknown response kind {k:#04x}")),
        };
        r.end()?;
        Ok(resp)
    }

    pub fn write_to(&self, w: &mut impl Write) -> Result<(), ProtocolError> {
        let (kind, payload) = self.encode();
        write_frame(w, kind, &payload)
    }

    pub fn read_from(r: &mut impl Read) -> Result<Response, ProtocolError> {
        match read_frame(r)? {
            Some((kind, payload)) => Response::decode(kind, &payload),
            None => malformed("the sidecar closed the connection"),
        }
    }
}

fn write_frame(w: &mut impl Write, kind: u8, payload: &[u8]) -> Result<(), ProtocolError> {
    let mut b = Vec::with_capacity(HEADER_LEN + payload.len() + 4);
    b.extend_from_slice(&MAGIC.to_le_bytes());
    b.push(VERSION);
    b.push(kind);
    b.extend_from_slice(&[0, 0]);
    b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    b.extend_from_slice(payload);
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    w.write_all(&b)?;
    w.flush()?;
    Ok(())
}

/// One frame: `Ok(None)` on a clean end of stream before its first byte.
fn read_frame(r: &mut impl Read) -> Result<Option<(u8, Vec<u8>)>, ProtocolError> {
    let mut hdr = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut hdr[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return malformed("connection closed inside a message header"),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    if u32::from_le_bytes(hdr[..4].try_into().expect("4 bytes")) != MAGIC {
        return malformed("not a page service message (bad magic)");
    }
    if hdr[4] != VERSION {
        return malformed(format!("protocol version {} (this side speaks {VERSION})", hdr[4]));
    }
    let len = u32::from_le_bytes(hdr[8..12].try_into().expect("4 bytes")) as usize;
    if len > MAX_PAYLOAD {
        return malformed(format!("message of {len} bytes is larger than {MAX_PAYLOAD}"));
    }
    let mut rest = vec![0u8; len + 4];
    r.read_exact(&mut rest)?;
    let mut crc = crc32c::crc32c(&hdr);
    crc = crc32c::crc32c_append(crc, &rest[..len]);
    if crc != u32::from_le_bytes(rest[len..].try_into().expect("4 bytes")) {
        return malformed("checksum mismatch");
    }
    rest.truncate(len);
    Ok(Some((hdr[5], rest)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel() -> RelTag {
        RelTag { node: RelFileNode { spcnode: 1663, dbnode: 5, relnode: 16384 }, fork: ForkNumber::VisibilityMap }
    }

    #[test]
    fn messages_round_trip_and_damage_is_caught() {
        let reqs = [
            Request::GetPage { tag: BufferTag { rel: rel(), blkno: 7 }, lsn: Lsn(0x16B3748), wait_ms: 100 },
            Request::RelSize { rel: rel(), lsn: Lsn(1), wait_ms: 0 },
            Request::ListDatabases { lsn: Lsn(2), wait_ms: 3 },
            Request::ListRelations { dbnode: 5, lsn: Lsn(2), wait_ms: 3 },
            Request::WaitForLsn { lsn: Lsn(9), wait_ms: 1000 },
            Request::History,
            Request::Status,
            Request::Basebackup { lsn: Lsn(77), full: true, new_timeline: true, wait_ms: 5 },
            Request::Prefetch { rel: rel(), first: 3, n: 64, lsn: Lsn(78), wait_ms: 6 },
            Request::ComputeFlush { lsn: Lsn(79) },
            Request::RelationFile { dbnode: 5, reloid: 16384, lsn: Lsn(80), wait_ms: 7 },
            Request::OnTimeline {
                timeline: 2,
                request: Box::new(Request::GetPage {
                    tag: BufferTag { rel: rel(), blkno: 1 },
                    lsn: Lsn(81),
                    wait_ms: 8,
                }),
            },
            Request::BranchCreate { lsn: Lsn(82), mount: Some("/mnt/b".into()), wait_ms: 9 },
            Request::BranchCreate { lsn: Lsn(83), mount: None, wait_ms: 0 },
            Request::BranchList,
            Request::BranchDrop { id: 3 },
            Request::LsnAt { time: PgTime(-5), inclusive: false, clock: None, wait_ms: 0 },
            Request::LsnAt { time: PgTime(7), inclusive: true, clock: Some((PgTime(9), Lsn(84))), wait_ms: 10 },
            Request::TimeAt { lsn: Lsn(85) },
            Request::PastStart { lsn: Lsn(86), wait_ms: 11, idle_ms: 600_000 },
            Request::PastStop { id: 4 },
            Request::PastList,
        ];
        for req in reqs {
            let mut b = Vec::new();
            req.write_to(&mut b).unwrap();
            assert_eq!(Request::read_from(&mut &b[..]).unwrap(), Some(req.clone()));
            for at in 0..b.len() {
                let mut bad = b.clone();
                bad[at] ^= 0x10;
                assert!(Request::read_from(&mut &bad[..]).is_err(), "{req:?} byte {at}");
            }
        }
        let resps = [
            Response::Page(Box::new([3u8; BLCKSZ])),
            Response::Size(Some(12)),
            Response::Size(None),
            Response::Databases(vec![(5, 1663), (1, 1663)]),
            Response::Relations(vec![(rel(), 4)]),
            Response::Lsn(Lsn(5)),
            Response::History(vec![
                TimelineHistory {
                    timeline: 2,
                    parent: Some((1, Lsn(9))),
                    origin: Lsn(9),
                    oldest: Lsn(2),
                    durable: Lsn(10),
                    last: Lsn(11),
                    gaps: vec![],
                },
                TimelineHistory {
                    timeline: 1,
                    parent: None,
                    origin: Lsn(1),
                    oldest: Lsn(2),
                    durable: Lsn(30),
                    last: Lsn(40),
                    gaps: vec![(Lsn(20), Lsn(25))],
                },
            ]),
            Response::Status("a 1\nb 2\n".into()),
            Response::Basebackup { lsn: Lsn(1), bytes: 2, micros: 3, path: "/x/base.tar".into() },
            Response::Prefetched(17),
            Response::Progress { done: 1, total: 2, bytes: 3, micros: 4 },
            Response::RelationFile(Some(RelFileNode { spcnode: 1663, dbnode: 5, relnode: 16390 })),
            Response::RelationFile(None),
            Response::Branches(vec![]),
            Response::Branches(vec![
                BranchInfo {
                    id: 1,
                    lsn: Lsn(8),
                    timeline: 2,
                    source: 1,
                    history_files: 9,
                    written_blocks: 10,
                    path: "/a".into(),
                    problem: String::new(),
                },
                BranchInfo {
                    id: 2,
                    lsn: Lsn(9),
                    timeline: 3,
                    source: 2,
                    history_files: 0,
                    written_blocks: 0,
                    path: "/b/c".into(),
                    problem: "mounting at /b/c: Transport endpoint is not connected".into(),
                },
            ]),
            Response::Commits { before: None, after: None },
            Response::Past(vec![]),
            Response::Past(vec![
                PastInfo {
                    id: 3,
                    branch: Some(9),
                    lsn: Lsn(7),
                    socket_dir: "/s/past/3".into(),
                    port: 5432,
                    running: true,
                },
                PastInfo {
                    id: 4,
                    branch: None,
                    lsn: Lsn(8),
                    socket_dir: "/s/past/4".into(),
                    port: 5432,
                    running: false,
                },
            ]),
            Response::Commits { before: Some((Lsn(3), PgTime(-4))), after: Some((Lsn(5), PgTime(6))) },
            Response::Error { code: ErrorCode::NotYet, message: "later".into() },
        ];
        for resp in resps {
            let mut b = Vec::new();
            resp.write_to(&mut b).unwrap();
            assert_eq!(Response::read_from(&mut &b[..]).unwrap(), resp);
        }
        assert!(Request::read_from(&mut &[][..]).unwrap().is_none());
        assert!(Response::read_from(&mut &b"NEPS"[..]).is_err());
    }
}
