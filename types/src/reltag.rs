//! Relation and block identities: `RelFileNode`, `ForkNumber`, `RelTag` (a fork of a
//! relation) and `BufferTag` (one block of it), as PostgreSQL 15 names them.

use std::fmt;
use std::str::FromStr;

/// PostgreSQL's object id.
pub type Oid = u32;

/// The physical identity of a relation (`RelFileNode`): tablespace, database, relfilenode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelFileNode {
    pub spcnode: Oid,
    pub dbnode: Oid,
    pub relnode: Oid,
}

impl fmt::Display for RelFileNode {
    /// `spc/db/rel`, as `pg_waldump` prints it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.spcnode, self.dbnode, self.relnode)
    }
}

/// A relation fork (`ForkNumber`). The discriminants are PostgreSQL's on-disk values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum ForkNumber {
    Main = 0,
    Fsm = 1,
    VisibilityMap = 2,
    Init = 3,
}

/// Why a fork name or number is not one PostgreSQL has.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid fork {0:?}: expected one of main, fsm, vm, init")]
pub struct ForkParseError(pub String);

impl ForkNumber {
    pub const ALL: [ForkNumber; 4] = [ForkNumber::Main, ForkNumber::Fsm, ForkNumber::VisibilityMap, ForkNumber::Init];

    /// The name PostgreSQL uses in file names and SQL (`forkNames[]`).
    pub const fn name(self) -> &'static str {
        match self {
            ForkNumber::Main => "main",
            ForkNumber::Fsm => "fsm",
            ForkNumber::VisibilityMap => "vm",
            ForkNumber::Init => "init",
        }
    }
}

impl TryFrom<u8> for ForkNumber {
    type Error = ForkParseError;
    #[inline]
    fn try_from(v: u8) -> Result<Self, Self::Error> {
        ForkNumber::ALL.get(v as usize).copied().ok_or_else(|| ForkParseError(v.to_string()))
    }
}

impl FromStr for ForkNumber {
    type Err = ForkParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ForkNumber::ALL.into_iter().find(|f| f.name() == s).ok_or_else(|| ForkParseError(s.to_string()))
    }
}

impl fmt::Display for ForkNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One fork of one relation: the unit that has a size and a sequence of blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelTag {
    pub node: RelFileNode,
    pub fork: ForkNumber,
}

impl fmt::Display for RelTag {
    /// `spc/db/rel` for the main fork, `spc/db/rel_fork` otherwise (PostgreSQL's file naming).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.fork {
            ForkNumber::Main => write!(f, "{}", self.node),
            fork => write!(f, "{}_{}", self.node, fork),
        }
    }
}

/// One block of one relation fork (`BufferTag`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BufferTag {
    pub rel: RelTag,
    pub blkno: crate::BlockNumber,
}

impl fmt::Display for BufferTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} blk {}", self.rel, self.blkno)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fork_names_round_trip() {
        for fork in ForkNumber::ALL {
            assert_eq!(fork.name().parse::<ForkNumber>().unwrap(), fork);
            assert_eq!(ForkNumber::try_from(fork as u8).unwrap(), fork);
        }
        assert!("heap".parse::<ForkNumber>().is_err());
        assert!(ForkNumber::try_from(4).is_err());
    }

    #[test]
    fn tags_print_like_postgres() {
        let node = RelFileNode { spcnode: 1663, dbnode: 5, relnode: 16384 };
        let rel = RelTag { node, fork: ForkNumber::VisibilityMap };
        assert_eq!(rel.to_string(), "1663/5/16384_vm");
        let tag = BufferTag { rel: RelTag { node, fork: ForkNumber::Main }, blkno: 7 };
        assert_eq!(tag.to_string(), "1663/5/16384 blk 7");
    }
}
