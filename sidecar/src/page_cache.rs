//! The page service's cache of rebuilt pages, keyed by page and LSN. Prefetch requests fill
//! it ahead of a reader; `GetPage` looks here first and files what it rebuilds, and so do the
//! reads of history through a branch (`branch`): a branch at L and `GetPage` at L share pages.
//!
//! The pages live in the shared page file (`neon_types::page_file`, `<shared dir>/pages`,
//! its data in `/dev/shm` where there is one), which backends read directly: a page the
//! sidecar has here costs them no round trip. Without a shared directory the same layout is
//! kept in private memory. Eviction is the
//! file's: per set of eight slots, round robin.
//!
//! A page being rebuilt is *claimed*: whoever asks for it meanwhile waits for that rebuild
//! instead of starting a second one (a reader that catches up with the prefetcher waits for
//! the page already under way). A claim is a guard: dropped without a page — an error, a panic
//! — it is withdrawn and a waiter claims the page itself.

use neon_types::page_file::{PageFileError, PageFileWriter};
use neon_types::{BufferTag, Lsn, BLCKSZ};
use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

pub type Key = (BufferTag, Lsn);

/// A rebuilt page, or why it could not be.
type Rebuilt<E> = Result<Box<[u8; BLCKSZ]>, E>;

/// How long a reader waits for a rebuild of the same page already under way.
pub const PENDING_WAIT: Duration = Duration::from_secs(30);

/// Counters for status reports.
#[derive(Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Asks that found the page being rebuilt and waited for it.
    pub waits: AtomicU64,
}

pub struct PageCache {
    /// Keys claimed and not yet filed.
    pending: Mutex<HashSet<Key>>,
    filled: Condvar,
    pages: PageFileWriter,
    /// Counts [`PageCache::clear`]s. A claim made before a clear files nothing after it (its
    /// page may be of the history that was cleared): stores hold it shared, a clear
    /// exclusively, so none lands between a clear's check and its wipe.
    epoch: RwLock<u64>,
    pub stats: CacheStats,
}

/// What a lookup found.
pub enum Lookup<'c> {
    Hit(Box<[u8; BLCKSZ]>),
    /// Not there: the caller rebuilds it and files it through the claim.
    Claimed(Claim<'c>),
}

/// The right and duty to file one page.
pub struct Claim<'c> {
    cache: &'c PageCache,
    key: Key,
    /// The cache's epoch when the claim was made.
    epoch: u64,
    /// Whether this claim marked the key pending (and so must withdraw it); a waiter that gave
    /// up rebuilds unclaimed, leaving the pending mark to its owner.
    owner: bool,
    filed: bool,
}

impl PageCache {
    /// A cache of about `capacity` pages in the shared page file in `shared_dir`, its data in
    /// `memory_dir` (a tmpfs) if given.
    pub fn shared(shared_dir: &Path, capacity: usize, memory_dir: Option<&Path>) -> Result<PageCache, PageFileError> {
        Ok(Self::over(PageFileWriter::create(shared_dir, capacity, memory_dir)?))
    }

    /// Stops serving from the shared page file (a clean shutdown).
    pub fn retire(&self) {
        self.pages.retire();
    }

    /// A cache of about `capacity` pages in private memory.
    pub fn private(capacity: usize) -> std::io::Result<PageCache> {
        Ok(Self::over(PageFileWriter::anonymous(capacity)?))
    }

    fn over(pages: PageFileWriter) -> PageCache {
        PageCache {
            pending: Mutex::default(),
            filled: Condvar::new(),
            pages,
            epoch: RwLock::new(0),
            stats: CacheStats::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<Key>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, key: &Key) -> Option<Box<[u8; BLCKSZ]>> {
        let mut page = Box::new([0u8; BLCKSZ]);
        self.pages.get(key, &mut page).then(|| {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            page
        })
    }

    /// The page if cached; else a claim on it, after waiting (at most `wait`) for a rebuild
    /// someone else has under way.
    pub fn lookup(&self, key: Key, wait: Duration) -> Lookup<'_> {
        if let Some(page) = self.get(&key) {
            return Lookup::Hit(page);
        }
        let deadline = Instant::now() + wait;
        let mut pending = self.lock();
        let mut waited = false;
        loop {
            if !pending.contains(&key) {
                // Filed since the look above? (A page is stored before its claim goes.)
                if let Some(page) = self.get(&key) {
                    return Lookup::Hit(page);
                }
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                pending.insert(key);
                return Lookup::Claimed(self.claim(key, true));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // Give up waiting and rebuild it too, unclaimed: whichever files first wins,
                // the other's page is the same.
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                return Lookup::Claimed(self.claim(key, false));
            }
            if !waited {
                self.stats.waits.fetch_add(1, Ordering::Relaxed);
                waited = true;
            }
            pending = self.filled.wait_timeout(pending, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// A claim on `key` if nobody has it or is rebuilding it (for prefetching).
    pub fn try_claim(&self, key: Key) -> Option<Claim<'_>> {
        let mut pending = self.lock();
        if pending.contains(&key) || self.pages.contains(&key) {
            return None;
        }
        pending.insert(key);
        Some(self.claim(key, true))
    }

    /// The pages of `keys` (one reader's batch): those cached; those someone else is
    /// rebuilding, waited for (at most `wait` in all); the others rebuilt by `rebuild` as one
    /// batch — it gets their positions in `keys` and returns their pages in that order — and
    /// filed if `keep`, asked once they are rebuilt, says they are still the pages of their
    /// keys (the followed history may have moved meanwhile).
    pub fn pages<E: From<&'static str>>(
        &self,
        keys: &[Key],
        wait: Duration,
        mut rebuild: impl FnMut(&[usize]) -> Vec<Rebuilt<E>>,
        keep: impl Fn() -> bool,
    ) -> Vec<Rebuilt<E>> {
        let mut out: Vec<Option<Rebuilt<E>>> = keys.iter().map(|_| None).collect();
        let (mut claims, mut busy) = (Vec::new(), Vec::new());
        for (n, key) in keys.iter().enumerate() {
            if let Some(page) = self.get(key) {
                out[n] = Some(Ok(page));
            } else if let Some(claim) = self.try_claim(*key) {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                claims.push((n, claim));
            } else {
                busy.push(n);
            }
        }
        Self::rebuild_into(&mut out, claims, &mut rebuild, &keep);
        // Waited for only now, holding no claim, and one at a time: two batches each waiting
        // for a page the other has claimed would otherwise both wait out `wait`. One deadline
        // for the whole batch.
        let deadline = Instant::now() + wait;
        for n in busy {
            match self.lookup(keys[n], deadline.saturating_duration_since(Instant::now())) {
                Lookup::Hit(page) => out[n] = Some(Ok(page)),
                Lookup::Claimed(claim) => Self::rebuild_into(&mut out, vec![(n, claim)], &mut rebuild, &keep),
            }
        }
        out.into_iter().map(|p| p.unwrap_or_else(|| Err(E::from("the page was not rebuilt")))).collect()
    }

    fn rebuild_into<E>(
        out: &mut [Option<Rebuilt<E>>],
        claims: Vec<(usize, Claim<'_>)>,
        rebuild: &mut impl FnMut(&[usize]) -> Vec<Rebuilt<E>>,
        keep: &impl Fn() -> bool,
    ) {
        if claims.is_empty() {
            return;
        }
        let at: Vec<usize> = claims.iter().map(|(n, _)| *n).collect();
        let pages = rebuild(&at);
        let keep = keep();
        for ((n, claim), page) in claims.into_iter().zip(pages) {
            if let (Ok(p), true) = (&page, keep) {
                claim.fill(p);
            }
            out[n] = Some(page);
        }
    }

    /// Pages held now.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.pages.capacity()
    }

    /// Forgets every page (the sidecar follows another timeline: pages read without one are
    /// of another history now, which begins at `oldest`).
    pub fn clear(&self, oldest: Lsn) {
        let mut epoch = self.epoch.write().unwrap_or_else(|p| p.into_inner());
        *epoch += 1;
        self.pages.clear(oldest);
    }

    fn claim(&self, key: Key, owner: bool) -> Claim<'_> {
        let epoch = *self.epoch.read().unwrap_or_else(|p| p.into_inner());
        Claim { cache: self, key, epoch, owner, filed: false }
    }

    /// Pages at LSNs before `lsn` are out of history: not served any more.
    pub fn set_oldest_lsn(&self, lsn: Lsn) {
        self.pages.set_oldest_lsn(lsn);
    }

    fn file(&self, key: Key, page: Option<&[u8; BLCKSZ]>, owner: bool, epoch: u64) {
        // Stored before the claim is withdrawn (under the lock), so whoever finds the key no
        // longer pending finds the page; but not under the lock, which lookups share.
        if let Some(p) = page {
            let now = self.epoch.read().unwrap_or_else(|p| p.into_inner());
            if *now == epoch {
                self.pages.store(&key, p);
            }
        }
        if !owner {
            return;
        }
        let mut pending = self.lock();
        pending.remove(&key);
        drop(pending);
        self.filled.notify_all();
    }
}

impl Claim<'_> {
    pub fn key(&self) -> Key {
        self.key
    }

    /// Files the rebuilt page; waiters get it.
    pub fn fill(mut self, page: &[u8; BLCKSZ]) {
        self.cache.file(self.key, Some(page), self.owner, self.epoch);
        self.filed = true;
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if !self.filed {
            self.cache.file(self.key, None, self.owner, self.epoch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use neon_types::{ForkNumber, RelFileNode, RelTag};

    fn key(blkno: u32) -> Key {
        let rel = RelTag { node: RelFileNode { spcnode: 1663, dbnode: 5, relnode: 16384 }, fork: ForkNumber::Main };
        (BufferTag { rel, blkno }, Lsn(0x100))
    }

    #[test]
    fn claims_hits_waits_and_eviction() {
        // One set of eight slots.
        let cache = PageCache::private(8).unwrap();
        let Lookup::Claimed(c) = cache.lookup(key(1), Duration::ZERO) else { panic!("empty cache hit") };
        assert!(cache.try_claim(key(1)).is_none(), "a claimed page is not claimed twice");
        std::thread::scope(|s| {
            let waiter = s.spawn(|| match cache.lookup(key(1), Duration::from_secs(10)) {
                Lookup::Hit(p) => p[0],
                Lookup::Claimed(_) => 0,
            });
            std::thread::sleep(Duration::from_millis(50));
            c.fill(&[7; BLCKSZ]);
            assert_eq!(waiter.join().unwrap(), 7, "the waiter gets the page filed for it");
        });
        assert_eq!(cache.stats.waits.load(Ordering::Relaxed), 1);
        // A claim dropped unfilled is withdrawn.
        drop(cache.try_claim(key(2)).unwrap());
        assert!(cache.try_claim(key(2)).is_some_and(|c| {
            c.fill(&[2; BLCKSZ]);
            true
        }));
        for b in 3..10 {
            cache.try_claim(key(b)).unwrap().fill(&[b as u8; BLCKSZ]);
        }
        assert_eq!(cache.len(), 8);
        assert!(matches!(cache.lookup(key(1), Duration::ZERO), Lookup::Claimed(_)), "oldest evicted");
        assert!(matches!(cache.lookup(key(9), Duration::ZERO), Lookup::Hit(p) if p[0] == 9));
    }

    #[test]
    fn a_batch_takes_what_is_cached_waits_for_what_is_under_way_and_rebuilds_the_rest_once() {
        let cache = PageCache::private(64).unwrap();
        cache.try_claim(key(1)).unwrap().fill(&[1; BLCKSZ]);
        let other = cache.try_claim(key(2)).unwrap();
        let keys: Vec<Key> = (1..=5).map(key).collect();
        let mut asked: Vec<Vec<usize>> = Vec::new();
        let got = std::thread::scope(|s| {
            let cache = &cache;
            s.spawn(move || {
                // Once the batch waits for it.
                let until = Instant::now() + Duration::from_secs(10);
                while cache.stats.waits.load(Ordering::Relaxed) == 0 && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(1));
                }
                other.fill(&[2; BLCKSZ]);
            });
            cache.pages(
                &keys,
                Duration::from_secs(10),
                |at: &[usize]| {
                    asked.push(at.to_vec());
                    at.iter()
                        .map(|n| {
                            if keys[*n].0.blkno == 4 {
                                Err("broken".to_string())
                            } else {
                                Ok(Box::new([keys[*n].0.blkno as u8; BLCKSZ]))
                            }
                        })
                        .collect()
                },
                || true,
            )
        });
        assert_eq!(asked, vec![vec![2, 3, 4]], "one batch: neither the cached page nor the one under way");
        assert_eq!(cache.stats.waits.load(Ordering::Relaxed), 1, "the page under way was waited for");
        let firsts: Vec<Result<u8, String>> = got.into_iter().map(|p| p.map(|p| p[0])).collect();
        assert_eq!(firsts, vec![Ok(1), Ok(2), Ok(3), Err("broken".to_string()), Ok(5)]);
        assert!(matches!(cache.lookup(key(5), Duration::ZERO), Lookup::Hit(p) if p[0] == 5), "filed");
        assert!(matches!(cache.lookup(key(4), Duration::ZERO), Lookup::Claimed(_)), "a failure is not filed");
        // Not kept: rebuilt, returned, not filed.
        let got = cache.pages(
            &[key(9)],
            Duration::ZERO,
            |_: &[usize]| vec![Ok::<_, String>(Box::new([9; BLCKSZ]))],
            || false,
        );
        assert_eq!(got[0].as_ref().map(|p| p[0]), Ok(9));
        assert!(matches!(cache.lookup(key(9), Duration::ZERO), Lookup::Claimed(_)), "not kept, yet filed");
        // A claim made before a clear (the followed history changed) files nothing after it.
        let before = cache.try_claim(key(20)).unwrap();
        cache.clear(Lsn(0));
        before.fill(&[20; BLCKSZ]);
        assert!(matches!(cache.lookup(key(20), Duration::ZERO), Lookup::Claimed(_)), "filed across a clear");
    }
}
