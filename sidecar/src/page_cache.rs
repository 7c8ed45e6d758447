//! The page service's cache of rebuilt pages, keyed by page and LSN. Prefetch requests fill
//! it ahead of a reader; `GetPage` looks here first and files what it rebuilds.
//!
//! A page being rebuilt is *claimed*: whoever asks for it meanwhile waits for that rebuild
//! instead of starting a second one (a reader that catches up with the prefetcher waits for
//! the page already under way). A claim is a guard: dropped without a page — an error, a panic
//! — it is withdrawn and a waiter claims the page itself. Eviction is oldest-filled first.

use neon_types::{BufferTag, Lsn, BLCKSZ};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub type Key = (BufferTag, Lsn);
type Page = Arc<[u8; BLCKSZ]>;

enum Slot {
    Pending,
    Ready(Page),
}

#[derive(Default)]
struct Inner {
    map: HashMap<Key, Slot>,
    /// Ready keys, oldest first.
    order: VecDeque<Key>,
}

/// Counters for status reports.
#[derive(Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Asks that found the page being rebuilt and waited for it.
    pub waits: AtomicU64,
}

pub struct PageCache {
    inner: Mutex<Inner>,
    filled: Condvar,
    capacity: usize,
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
    filed: bool,
}

impl PageCache {
    /// A cache of at most `capacity` pages (0: nothing is kept, claims still work).
    pub fn new(capacity: usize) -> PageCache {
        PageCache { inner: Mutex::default(), filled: Condvar::new(), capacity, stats: CacheStats::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The page if cached; else a claim on it, after waiting (at most `wait`) for a rebuild
    /// someone else has under way.
    pub fn lookup(&self, key: Key, wait: Duration) -> Lookup<'_> {
        let deadline = Instant::now() + wait;
        let mut inner = self.lock();
        let mut waited = false;
        loop {
            match inner.map.get(&key) {
                Some(Slot::Ready(p)) => {
                    self.stats.hits.fetch_add(1, Ordering::Relaxed);
                    return Lookup::Hit(Box::new(**p));
                }
                Some(Slot::Pending) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        // Give up waiting and rebuild it too, unclaimed: whichever files
                        // first wins, the other's page is the same.
                        self.stats.misses.fetch_add(1, Ordering::Relaxed);
                        return Lookup::Claimed(Claim { cache: self, key, filed: true });
                    }
                    if !waited {
                        self.stats.waits.fetch_add(1, Ordering::Relaxed);
                        waited = true;
                    }
                    inner = self.filled.wait_timeout(inner, left).unwrap_or_else(|e| e.into_inner()).0;
                }
                None => {
                    self.stats.misses.fetch_add(1, Ordering::Relaxed);
                    inner.map.insert(key, Slot::Pending);
                    return Lookup::Claimed(Claim { cache: self, key, filed: false });
                }
            }
        }
    }

    /// A claim on `key` if nobody has it or is rebuilding it (for prefetching).
    pub fn try_claim(&self, key: Key) -> Option<Claim<'_>> {
        let mut inner = self.lock();
        if inner.map.contains_key(&key) {
            return None;
        }
        inner.map.insert(key, Slot::Pending);
        Some(Claim { cache: self, key, filed: false })
    }

    /// Pages held now.
    pub fn len(&self) -> usize {
        self.lock().order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn file(&self, key: Key, page: Option<&[u8; BLCKSZ]>) {
        let mut inner = self.lock();
        match page {
            Some(p) if self.capacity > 0 => {
                if !matches!(inner.map.insert(key, Slot::Ready(Arc::new(*p))), Some(Slot::Ready(_))) {
                    inner.order.push_back(key);
                }
                while inner.order.len() > self.capacity {
                    let old = inner.order.pop_front().expect("over capacity");
                    inner.map.remove(&old);
                }
            }
            _ => {
                if matches!(inner.map.get(&key), Some(Slot::Pending)) {
                    inner.map.remove(&key);
                }
            }
        }
        drop(inner);
        self.filled.notify_all();
    }
}

impl Claim<'_> {
    pub fn key(&self) -> Key {
        self.key
    }

    /// Files the rebuilt page; waiters get it.
    pub fn fill(mut self, page: &[u8; BLCKSZ]) {
        self.cache.file(self.key, Some(page));
        self.filed = true;
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if !self.filed {
            self.cache.file(self.key, None);
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
        let cache = PageCache::new(2);
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
        cache.try_claim(key(3)).unwrap().fill(&[3; BLCKSZ]);
        assert_eq!(cache.len(), 2);
        assert!(matches!(cache.lookup(key(1), Duration::ZERO), Lookup::Claimed(_)), "oldest evicted");
        assert!(matches!(cache.lookup(key(3), Duration::ZERO), Lookup::Hit(p) if p[0] == 3));
    }
}
