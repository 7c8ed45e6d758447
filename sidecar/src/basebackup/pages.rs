//! Rebuilding many pages in parallel, handed out in order: worker threads take chunks of the
//! page list (so the redo pool's processes all work; a chunk's redo requests go as one
//! pipelined batch), and the writer takes their results back
//! in list order. At most `window` chunks are out at once, which bounds memory however large
//! the database is.

use super::BasebackupError;
use crate::repo::reconstruct::{pages_of, relation_at, RelationAt};
use crate::repo::timeline::Timeline;
use crate::walredo::WalRedoManager;
use crossbeam_channel::bounded;
use neon_types::{BufferTag, Lsn, BLCKSZ};
use std::collections::{BTreeMap, HashMap};

const CHUNK: usize = 32;

type Page = Box<[u8; BLCKSZ]>;

/// Calls `sink(i, page)` for every `tags[i]` as of `lsn`, in order, rebuilding with `workers`
/// threads. Stops at the first error.
pub fn rebuild_in_order(
    repo: &Timeline,
    redo: &dyn WalRedoManager,
    lsn: Lsn,
    tags: &[BufferTag],
    workers: usize,
    mut sink: impl FnMut(usize, Page) -> Result<(), BasebackupError>,
) -> Result<(), BasebackupError> {
    // Size and read-through of each relation, looked up once rather than per page.
    let mut relations: HashMap<_, RelationAt> = HashMap::new();
    for tag in tags {
        if let std::collections::hash_map::Entry::Vacant(e) = relations.entry(tag.rel) {
            e.insert(relation_at(repo, tag.rel, lsn)?);
        }
    }
    let relations = &relations;
    let chunks = tags.len().div_ceil(CHUNK);
    let workers = workers.clamp(1, chunks.max(1));
    let window = workers * 3;
    std::thread::scope(|s| {
        let (jobs, job_rx) = bounded::<usize>(window);
        let (results, result_rx) = bounded::<(usize, Result<Vec<Page>, BasebackupError>)>(window);
        for _ in 0..workers {
            let (job_rx, results) = (job_rx.clone(), results.clone());
            s.spawn(move || {
                for k in job_rx {
                    let chunk = &tags[k * CHUNK..((k + 1) * CHUNK).min(tags.len())];
                    let pages = pages_of(repo, redo, chunk.iter().map(|tag| (&relations[&tag.rel], tag.blkno)))
                        .into_iter()
                        .map(|page| page.map_err(|source| BasebackupError::Page { lsn, source }))
                        .collect();
                    if results.send((k, pages)).is_err() {
                        return;
                    }
                }
            });
        }
        drop((job_rx, results));
        let mut handed_out = 0;
        while handed_out < chunks.min(window) {
            jobs.send(handed_out).expect("workers are running");
            handed_out += 1;
        }
        let mut pending: BTreeMap<usize, Result<Vec<Page>, BasebackupError>> = BTreeMap::new();
        let mut index = 0;
        for k in 0..chunks {
            let chunk = loop {
                if let Some(c) = pending.remove(&k) {
                    break c;
                }
                let (j, c) = result_rx.recv().expect("a worker for every chunk handed out");
                pending.insert(j, c);
            };
            if handed_out < chunks {
                jobs.send(handed_out).expect("workers are running");
                handed_out += 1;
            }
            for page in chunk? {
                sink(index, page)?;
                index += 1;
            }
        }
        Ok(())
    })
}
