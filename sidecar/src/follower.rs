//! Following a live compute: the loop of `neon-sidecar run`. It owns a physical replication
//! slot, streams WAL from the repository's durable LSN (or the slot's start, for a new
//! repository), files every record, flushes the repository on a timer or every so many bytes,
//! and only then reports the new durable LSN to the compute as flushed — so the slot never lets
//! go of WAL the sidecar has not made durable, whatever happens to the sidecar. When the
//! connection drops (the compute restarts), it reconnects with backoff.

use crate::replication::client::{ReplicationConfig, ReplicationConn, ReplicationError, StreamEvent};
use crate::repo::ingest::{Ingest, IngestError};
use crate::repo::key::Key;
use crate::repo::timeline::{RepoError, Timeline};
use crate::wal::decoder::{DecodeError, WalStreamDecoder};
use neon_types::Lsn;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct FollowerConfig {
    pub replication: ReplicationConfig,
    pub store: PathBuf,
    pub slot: String,
    /// Flush at least this often while WAL arrives.
    pub flush_interval: Duration,
    /// Flush after this many bytes of WAL.
    pub flush_bytes: u64,
    /// Page chains longer than this are handed to `on_flush` for imaging (0: not tracked).
    pub chain_limit: u32,
}

/// Called after each flush with the durable LSN and the page keys whose chains grew long.
pub type OnFlush<'a> = &'a mut (dyn FnMut(Lsn, Vec<Key>) + Send);

#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error("decoding streamed WAL: {0}")]
    Decode(#[from] DecodeError),
    #[error("history gap: the repository is durable to {durable} but slot {slot} starts at {restart}")]
    Gap { durable: Lsn, slot: String, restart: Lsn },
    #[error("server reports an unusable wal_segment_size {0:?}")]
    SegmentSize(String),
    #[error(transparent)]
    Files(#[from] crate::wal::segment::SegmentError),
}

/// What filing WAL from segment files did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FiledFiles {
    pub records: u64,
    /// Time the flusher spent writing layer files (beside filing).
    pub flushing: Duration,
}

/// Files every record `reader` gives into `repo` as streaming does: layer files are written
/// by a flusher thread beside ingest, every `flush_bytes` of WAL read and at the end;
/// `progress` hears the bytes read at each flush.
pub fn file_wal_files(
    repo: &Timeline,
    reader: &mut crate::wal::segment::WalFileReader,
    flush_bytes: u64,
    mut progress: impl FnMut(u64),
) -> Result<FiledFiles, FollowError> {
    let mut ingest = Ingest::new();
    std::thread::scope(|s| {
        let (requests, pending) = crossbeam_channel::bounded::<()>(1);
        let flusher = s.spawn(move || -> Result<Duration, RepoError> {
            let mut busy = Duration::ZERO;
            for () in pending {
                let started = Instant::now();
                repo.flush()?;
                busy += started.elapsed();
            }
            Ok(busy)
        });
        let (mut records, mut next_flush) = (0u64, flush_bytes);
        let filed = (|| -> Result<(), FollowError> {
            while let Some(rec) = reader.next_record()? {
                ingest.ingest(repo, &rec)?;
                records += 1;
                if reader.bytes_read() >= next_flush {
                    // At most one flush waits: filing pauses when the disk is behind. A
                    // flusher gone has failed; joining it below says why.
                    if requests.send(()).is_err() {
                        break;
                    }
                    progress(reader.bytes_read());
                    next_flush += flush_bytes;
                }
            }
            Ok(())
        })();
        drop(requests);
        let busy = flusher.join().expect("flusher thread")?;
        filed?;
        let started = Instant::now();
        repo.flush()?;
        Ok(FiledFiles { records, flushing: busy + started.elapsed() })
    })
}

fn segment_size(conn: &mut ReplicationConn) -> Result<u32, FollowError> {
    let rows = conn.command("SHOW wal_segment_size")?;
    let text = rows.first().and_then(|r| r.first().cloned().flatten()).unwrap_or_default();
    let mb = text.strip_suffix("MB").and_then(|n| n.parse::<u32>().ok());
    let gb = text.strip_suffix("GB").and_then(|n| n.parse::<u32>().ok()).map(|g| g * 1024);
    mb.or(gb).map(|m| m << 20).ok_or(FollowError::SegmentSize(text))
}

/// Follows the compute until `stop` is set, reconnecting after errors, into the store at
/// `cfg.store`.
pub fn run(cfg: &FollowerConfig, stop: &AtomicBool) -> Result<(), FollowError> {
    run_into(&Timeline::open(&cfg.store)?, cfg, stop, &mut |_, _| {})
}

/// Like [`run`], into an open repository that others may be reading, telling `on_flush`
/// about each flush.
pub fn run_into(
    repo: &Timeline,
    cfg: &FollowerConfig,
    stop: &AtomicBool,
    on_flush: OnFlush<'_>,
) -> Result<(), FollowError> {
    let mut ingest = if cfg.chain_limit > 0 { Ingest::with_chain_limit(cfg.chain_limit) } else { Ingest::new() };
    let mut backoff = Duration::from_millis(100);
    while !stop.load(Ordering::Relaxed) {
        match follow(cfg, repo, &mut ingest, stop, on_flush) {
            Ok(()) => break,
            // Problems of our own store or of the WAL's content are not cured by reconnecting.
            Err(e @ (FollowError::Repo(_) | FollowError::Ingest(_) | FollowError::Gap { .. })) => return Err(e),
            Err(e) => {
                eprintln!("neon-sidecar: following the compute: {e}; reconnecting in {backoff:?}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    repo.flush()?;
    Ok(())
}

fn follow(
    cfg: &FollowerConfig,
    repo: &Timeline,
    ingest: &mut Ingest,
    stop: &AtomicBool,
    on_flush: OnFlush<'_>,
) -> Result<(), FollowError> {
    let mut conn = ReplicationConn::connect(&cfg.replication)?;
    let sys = conn.identify_system()?;
    let seg_size = segment_size(&mut conn)?;
    let restart = match conn.slot_restart_lsn(&cfg.slot)? {
        Some(l) => l,
        None => conn.create_slot(&cfg.slot)?,
    };
    let durable = repo.durable_lsn();
    let start = if durable.is_valid() { durable } else { restart };
    if start < restart {
        return Err(FollowError::Gap { durable, slot: cfg.slot.clone(), restart });
    }
    repo.begin_history(start);
    let mut dec = WalStreamDecoder::new(start, seg_size)?;
    let mut stream = conn.start_replication(Some(&cfg.slot), start, sys.timeline)?;
    // Layer files are written by a flusher thread while ingest goes on (the repository's
    // frozen layer is made for this); the compute hears of each new durable LSN afterwards.
    // One flush runs at a time; when ingest gets twice the flush size ahead, it waits.
    std::thread::scope(|s| {
        let (requests, pending) = crossbeam_channel::bounded::<Vec<Key>>(1);
        let flusher = s.spawn(move || -> Result<(), FollowError> {
            for keys in pending {
                let durable = repo.flush()?;
                on_flush(durable, keys);
            }
            Ok(())
        });
        let result = stream_loop(cfg, repo, ingest, stop, &mut dec, &mut stream, &requests, &flusher);
        drop(requests);
        let flushed = flusher.join().expect("flusher thread");
        result.and(flushed)
    })
}

#[allow(clippy::too_many_arguments)]
fn stream_loop(
    cfg: &FollowerConfig,
    repo: &Timeline,
    ingest: &mut Ingest,
    stop: &AtomicBool,
    dec: &mut WalStreamDecoder,
    stream: &mut crate::replication::client::WalStream,
    requests: &crossbeam_channel::Sender<Vec<Key>>,
    flusher: &std::thread::ScopedJoinHandle<'_, Result<(), FollowError>>,
) -> Result<(), FollowError> {
    let mut last_flush = Instant::now();
    let mut unflushed = 0u64;
    let mut reported = repo.durable_lsn();
    while !stop.load(Ordering::Relaxed) {
        if flusher.is_finished() {
            // It only stops early on an error, which joining reports.
            return Ok(());
        }
        let event = match stream.next_event(Duration::from_millis(50)) {
            Ok(Some(e)) => Some(e),
            Ok(None) => return Err(ReplicationError::Protocol("the server ended the stream".into()).into()),
            Err(ReplicationError::Timeout(_)) => None,
            Err(e) => return Err(e.into()),
        };
        let mut reply = false;
        match event {
            Some(StreamEvent::XLogData { data, .. }) => {
                unflushed += data.len() as u64;
                dec.feed(data);
                while let Some(rec) = dec.poll()? {
                    ingest.ingest(repo, &rec)?;
                }
            }
            Some(StreamEvent::Keepalive { reply_requested, .. }) => reply = reply_requested,
            None => {}
        }
        if repo.last_lsn() > repo.durable_lsn()
            && (unflushed >= cfg.flush_bytes || last_flush.elapsed() >= cfg.flush_interval)
        {
            let keys = ingest.take_long_chains();
            let sent = if unflushed >= 2 * cfg.flush_bytes {
                requests.send(keys).is_ok()
            } else {
                match requests.try_send(keys) {
                    Ok(()) => true,
                    Err(crossbeam_channel::TrySendError::Full(keys)) => {
                        // A flush is still running: these keys wait for the next one.
                        ingest.return_long_chains(keys);
                        false
                    }
                    Err(crossbeam_channel::TrySendError::Disconnected(_)) => false,
                }
            };
            if sent {
                last_flush = Instant::now();
                unflushed = 0;
            }
        }
        let durable = repo.durable_lsn();
        if reply || durable > reported {
            stream.send_status(durable, durable, durable, false)?;
            reported = durable;
        }
    }
    Ok(())
}
