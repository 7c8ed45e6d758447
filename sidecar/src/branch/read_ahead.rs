//! Read-ahead of a branch's history pages, beyond the kernel's: the kernel asks for at most
//! 128 KB at a time, one or two requests ahead of a sequential reader, which leaves the redo
//! pool idle between them. When a file is read sequentially, the pages after the read are
//! rebuilt by background workers into a small cache that the next reads take from (waiting for
//! a page under way rather than rebuilding it twice).
//!
//! History's pages at the branch's LSN never change, so a page in the cache is always right for
//! its block as history; whether a block comes from history or from the branch's own writes is
//! decided by the reader when it uses the page, as for a page it rebuilt itself. A page the
//! workers could not rebuild is simply not cached: the reader rebuilds it and reports the error.

use super::fs::PageSource;
use neon_types::{BufferTag, BLCKSZ};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Pages cached or under way at most (32 MB).
pub(crate) const CAPACITY: usize = 4096;
/// Pages rebuilt by one worker request (one batched, pipelined redo exchange).
const JOB_PAGES: usize = 32;
const WORKERS: usize = 2;

enum Slot {
    /// Queued: a reader wanting it takes it back and rebuilds it at once.
    Pending,
    /// A worker rebuilds it now: a reader waits.
    Running,
    Ready(Box<[u8; BLCKSZ]>),
}

struct Shared {
    slots: Mutex<HashMap<BufferTag, Slot>>,
    done: Condvar,
    /// The branch is going (unmounted): queued work is dropped, not done.
    stopping: AtomicBool,
}

pub struct ReadAhead {
    shared: Arc<Shared>,
    jobs: crossbeam_channel::Sender<Vec<BufferTag>>,
}

impl ReadAhead {
    /// Workers rebuilding from `source`; they stop when this is dropped (after the request
    /// under way, dropping the queued ones).
    pub fn new(name: &str, source: Arc<dyn PageSource>) -> ReadAhead {
        let shared = Arc::new(Shared {
            slots: Mutex::new(HashMap::new()),
            done: Condvar::new(),
            stopping: AtomicBool::new(false),
        });
        let (jobs, queue) = crossbeam_channel::unbounded::<Vec<BufferTag>>();
        for n in 0..WORKERS {
            let (shared, queue, source) = (shared.clone(), queue.clone(), source.clone());
            let spawned = std::thread::Builder::new().name(format!("ahead-{name}-{n}")).spawn(move || {
                for queued in queue {
                    // Those no reader took back meanwhile, now under way.
                    let tags: Vec<BufferTag> = {
                        let mut slots = shared.slots.lock().unwrap_or_else(|p| p.into_inner());
                        let stopping = shared.stopping.load(Ordering::Relaxed);
                        queued
                            .into_iter()
                            .filter(|t| match slots.get_mut(t) {
                                Some(s @ Slot::Pending) if !stopping => {
                                    *s = Slot::Running;
                                    true
                                }
                                Some(Slot::Pending) => {
                                    slots.remove(t);
                                    false
                                }
                                _ => false,
                            })
                            .collect()
                    };
                    if tags.is_empty() {
                        continue;
                    }
                    // (A panic rebuilding is an error for these pages: the reader's own try says so.)
                    let pages = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| source.pages(&tags)))
                        .unwrap_or_default();
                    let mut slots = shared.slots.lock().unwrap_or_else(|p| p.into_inner());
                    let mut pages = pages.into_iter();
                    for tag in &tags {
                        match pages.next() {
                            Some(Ok(page)) => slots.insert(*tag, Slot::Ready(page)),
                            _ => slots.remove(tag),
                        };
                    }
                    shared.done.notify_all();
                }
            });
            if let Err(e) = spawned {
                eprintln!("neon-sidecar: branch {name}: no read-ahead worker: {e}");
            }
        }
        ReadAhead { shared, jobs }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<BufferTag, Slot>> {
        self.shared.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Has `tags` rebuilt in the background, those not cached or under way already (none
    /// when the cache is full of pages under way).
    pub fn schedule(&self, tags: impl IntoIterator<Item = BufferTag>) {
        let mut slots = self.lock();
        if slots.len() >= CAPACITY {
            // Pages read ahead but never read (a scan that stopped): made room for.
            slots.retain(|_, s| !matches!(s, Slot::Ready(_)));
        }
        let room = CAPACITY.saturating_sub(slots.len());
        let new: Vec<BufferTag> = tags.into_iter().filter(|t| !slots.contains_key(t)).take(room).collect();
        for t in &new {
            slots.insert(*t, Slot::Pending);
        }
        drop(slots);
        for job in new.chunks(JOB_PAGES) {
            if self.jobs.send(job.to_vec()).is_err() {
                let mut slots = self.lock();
                job.iter().for_each(|t| {
                    slots.remove(t);
                });
                self.shared.done.notify_all();
            }
        }
    }

    /// The pages of `tags` the workers have (waiting for those being rebuilt now), taken out
    /// of the cache; `None` for the others (those only queued are taken back: the caller
    /// rebuilds them at once rather than wait for their turn).
    pub fn take(&self, tags: &[BufferTag]) -> Vec<Option<Box<[u8; BLCKSZ]>>> {
        let mut slots = self.lock();
        let mut out = Vec::with_capacity(tags.len());
        for tag in tags {
            while matches!(slots.get(tag), Some(Slot::Running)) {
                // (Bounded, so a lost wake-up costs a moment, not the read.)
                slots = self
                    .shared
                    .done
                    .wait_timeout(slots, Duration::from_millis(100))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            out.push(match slots.remove(tag) {
                Some(Slot::Ready(page)) => Some(page),
                _ => None,
            });
        }
        out
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use neon_types::{ForkNumber, RelFileNode, RelTag};

    /// Pages stamped with their block number; block 13 cannot be rebuilt.
    struct Stamped(std::sync::atomic::AtomicUsize);

    impl PageSource for Stamped {
        fn pages(&self, tags: &[BufferTag]) -> Vec<Result<Box<[u8; BLCKSZ]>, String>> {
            self.0.fetch_add(tags.len(), std::sync::atomic::Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(20));
            tags.iter()
                .map(|t| if t.blkno == 13 { Err("broken".into()) } else { Ok(Box::new([t.blkno as u8; BLCKSZ])) })
                .collect()
        }
    }

    fn tag(blkno: u32) -> BufferTag {
        let rel = RelTag { node: RelFileNode { spcnode: 1663, dbnode: 5, relnode: 16384 }, fork: ForkNumber::Main };
        BufferTag { rel, blkno }
    }

    #[test]
    fn pages_read_ahead_are_taken_once_and_failures_left_to_the_reader() {
        let source = Arc::new(Stamped(Default::default()));
        let ahead = ReadAhead::new("t", source.clone());
        ahead.schedule((10..50).map(tag));
        // Asked again while queued or under way: not rebuilt twice.
        ahead.schedule((10..50).map(tag));
        // (Both requests under way: a reader waits for them rather than taking them back.)
        while source.0.load(std::sync::atomic::Ordering::Relaxed) < 40 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let got = ahead.take(&[tag(12), tag(13), tag(49), tag(50)]);
        assert_eq!(got[0].as_deref().map(|p| p[0]), Some(12));
        assert!(got[1].is_none(), "a page the workers could not rebuild is the reader's to rebuild");
        assert_eq!(got[2].as_deref().map(|p| p[100]), Some(49));
        assert!(got[3].is_none(), "never asked for");
        assert!(ahead.take(&[tag(12)])[0].is_none(), "taken once");
        assert_eq!(source.0.load(std::sync::atomic::Ordering::Relaxed), 40);
    }
}
