//! Base backups in the shared directory, for the extension and the CLI: `<shared>/basebackups/
//! base-<timeline>-<LSN>[-nonrel][-newtli<timeline>].tar` (without relation pages; on a new timeline), written under a
//! temporary name, fsync'd and renamed, so a reader never sees a partial file and a failed
//! build (a full disk) leaves nothing behind. Asking again for the same LSN returns the file
//! already there. The directory has a size limit: after each build the oldest backups are
//! removed until the rest fit (never the one just made). The directory is private to the
//! sidecar's OS user (0700), the files 0600.
//!
//! Callers asking for one backup share its build; different backups build at once, up to a
//! bound. A build stops, leaving nothing behind, once no caller waits for it any more (a
//! cancelled query, a closed connection).

use super::{write_basebackup, BasebackupError, Options, Progress, Stats, TimelineFiles, Watch};
use crate::repo::store::Store;
use crate::repo::timeline::Timeline;
use crate::walredo::WalRedoManager;
use neon_types::Lsn;
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Writes the base backup as of `lsn` to `path`: under the temporary name `tmp` (a build's
/// own: two builds of one backup may overlap), fsync'd, renamed, the directory fsync'd; on any
/// error nothing is left behind.
#[allow(clippy::too_many_arguments)]
pub fn write_file(
    path: &Path,
    tmp: &Path,
    repo: &Timeline,
    redo: &dyn WalRedoManager,
    lsn: Lsn,
    timeline: &TimelineFiles,
    opts: Options,
    watch: &mut dyn Watch,
) -> Result<Stats, BasebackupError> {
    crate::repo::timeline::write_durably_with(tmp, path, |file| -> Result<Stats, BasebackupError> {
        let (w, stats) =
            write_basebackup(repo, redo, lsn, timeline, opts, std::io::BufWriter::with_capacity(1 << 20, file), watch)?;
        w.into_inner().map_err(|e| e.into_error())?;
        Ok(stats)
    })
}

/// A finished base backup.
#[derive(Debug, Clone, PartialEq)]
pub struct Made {
    pub path: PathBuf,
    pub lsn: Lsn,
    pub bytes: u64,
    /// Time to build it; zero when it was already there.
    pub seconds: f64,
    pub stats: Option<Stats>,
}

pub struct SharedBasebackups {
    dir: PathBuf,
    limit_bytes: u64,
    /// Builds under way, by file name: a second caller for the same backup waits for the one
    /// being built instead of starting another.
    builds: Mutex<HashMap<String, Arc<Build>>>,
    /// Builds running at once, at most `concurrency` (they share the redo pool).
    running: (Mutex<usize>, Condvar),
    concurrency: usize,
    /// Builds nobody wants any more, on their way out (their files not yet removed).
    stopping: AtomicUsize,
    /// Numbers builds' temporary files: a build on its way out and a new one of the same
    /// backup never share one.
    builds_started: AtomicUsize,
    /// Backups built to the end, and asks answered with a file already there: what shows a
    /// caller that a second ask was not built again (`neon_sidecar_status()`).
    built: AtomicU64,
    reused: AtomicU64,
}

/// One backup being built, and who waits for it.
struct Build {
    /// Callers who still want it (its builder's included); none: it stops.
    wanted: AtomicUsize,
    result: Mutex<Option<Result<Made, String>>>,
    done: Condvar,
}

/// How often a caller waiting for a build looks whether it was cancelled itself.
const POLL: Duration = Duration::from_millis(50);

impl SharedBasebackups {
    /// Uses (creating it, private) `<shared>/basebackups` for the backups of the cluster
    /// `system_id`, building at most `concurrency` backups at once.
    pub fn new(
        shared: &Path,
        limit_bytes: u64,
        concurrency: usize,
        system_id: u64,
    ) -> std::io::Result<SharedBasebackups> {
        let dir = shared.join("basebackups");
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(shared, std::fs::Permissions::from_mode(0o700))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        // Backups are found by timeline and LSN: those of another cluster (a store made anew
        // with the same shared directory) must not be handed out.
        // (Beside the directory, which holds only backups.)
        let cluster = shared.join("basebackups.cluster");
        let ours = system_id.to_string();
        let same = std::fs::read_to_string(&cluster).is_ok_and(|c| c.trim() == ours);
        // Temporary files of builds a crash interrupted, and other clusters' backups.
        for e in std::fs::read_dir(&dir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") || (!same && name.ends_with(".tar")) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        if !same {
            crate::repo::timeline::write_durably(&shared.join("basebackups.cluster.tmp"), &cluster, ours.as_bytes())?;
        }
        Ok(SharedBasebackups {
            dir,
            limit_bytes,
            builds: Mutex::default(),
            running: (Mutex::new(0), Condvar::new()),
            concurrency: concurrency.max(1),
            stopping: AtomicUsize::new(0),
            builds_started: AtomicUsize::new(0),
            built: AtomicU64::new(0),
            reused: AtomicU64::new(0),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Builds under way (waiting for their turn, and stopping, included).
    pub fn building(&self) -> usize {
        self.builds.lock().unwrap_or_else(|p| p.into_inner()).len() + self.stopping.load(Ordering::Acquire)
    }

    /// Builds running now.
    pub fn running(&self) -> usize {
        *self.running.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Backups built to the end since the sidecar started.
    pub fn built(&self) -> u64 {
        self.built.load(Ordering::Relaxed)
    }

    /// Asks answered with a backup already in the directory, since the sidecar started.
    pub fn reused(&self) -> u64 {
        self.reused.load(Ordering::Relaxed)
    }

    fn name(lsn: Lsn, timeline: &TimelineFiles, opts: &Options) -> String {
        let nonrel = if opts.relation_pages { "" } else { "-nonrel" };
        let tli = if opts.new_timeline { format!("-newtli{:08X}", timeline.next_free) } else { String::new() };
        format!("base-{:08X}-{:016X}{nonrel}{tli}.tar", timeline.timeline, lsn.0)
    }

    /// The base backup of timeline `t` as of `lsn`, built unless it is already there (or
    /// waited for, if another caller is building it). `watch` hears the progress of a build
    /// it started, and is asked whether its caller still wants the backup: when none of those
    /// waiting for a build do, it stops within a page and leaves nothing behind.
    pub fn get(
        &self,
        store: &Store,
        t: &Arc<Timeline>,
        redo: &dyn WalRedoManager,
        lsn: Lsn,
        opts: Options,
        watch: &mut dyn Watch,
    ) -> Result<Made, BasebackupError> {
        let timeline = TimelineFiles::of(store, t, lsn)?;
        let name = Self::name(lsn, &timeline, &opts);
        let path = self.dir.join(&name);
        let (build, mine) = {
            let mut builds = self.builds.lock().unwrap_or_else(|p| p.into_inner());
            if let Ok(m) = std::fs::metadata(&path) {
                self.reused.fetch_add(1, Ordering::Relaxed);
                return Ok(Made { path, lsn, bytes: m.len(), seconds: 0.0, stats: None });
            }
            match builds.get(&name) {
                Some(b) => {
                    b.wanted.fetch_add(1, Ordering::AcqRel);
                    (b.clone(), false)
                }
                None => {
                    let b =
                        Arc::new(Build { wanted: AtomicUsize::new(1), result: Mutex::new(None), done: Condvar::new() });
                    builds.insert(name.clone(), b.clone());
                    (b, true)
                }
            }
        };
        if !mine {
            return self.wait_for(&build, lsn, watch);
        }
        let mut caller = Caller { shared: self, name: &name, build: &build, watch, gone: false, stopped: false };
        let result = self.build(&path, t, redo, lsn, &timeline, opts, &mut caller);
        let gone = caller.gone;
        if caller.stopped {
            self.stopping.fetch_sub(1, Ordering::AcqRel);
        }
        *build.result.lock().unwrap_or_else(|p| p.into_inner()) = Some(match &result {
            Ok(made) => Ok(made.clone()),
            Err(e) => Err(e.to_string()),
        });
        self.forget(&name, &build);
        build.done.notify_all();
        match result {
            Ok(_) if gone => Err(BasebackupError::Cancelled { lsn }),
            r => r,
        }
    }

    /// Takes `build` out of the builds under way (if it is still the one under `name`).
    fn forget(&self, name: &str, build: &Arc<Build>) {
        let mut builds = self.builds.lock().unwrap_or_else(|p| p.into_inner());
        if builds.get(name).is_some_and(|b| Arc::ptr_eq(b, build)) {
            builds.remove(name);
        }
    }

    /// Waits for another caller's build of the same backup, unless cancelled first.
    fn wait_for(&self, build: &Build, lsn: Lsn, watch: &mut dyn Watch) -> Result<Made, BasebackupError> {
        let mut result = build.result.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = result.as_ref() {
                return r.clone().map_err(|why| BasebackupError::Failed { lsn, why });
            }
            if watch.cancelled() {
                build.wanted.fetch_sub(1, Ordering::AcqRel);
                return Err(BasebackupError::Cancelled { lsn });
            }
            result = build.done.wait_timeout(result, POLL).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Builds into `path`, once a place among the builds running at once is free.
    #[allow(clippy::too_many_arguments)]
    fn build(
        &self,
        path: &Path,
        t: &Timeline,
        redo: &dyn WalRedoManager,
        lsn: Lsn,
        timeline: &TimelineFiles,
        opts: Options,
        caller: &mut Caller<'_>,
    ) -> Result<Made, BasebackupError> {
        {
            let (count, freed) = &self.running;
            let mut n = count.lock().unwrap_or_else(|p| p.into_inner());
            while *n >= self.concurrency {
                if caller.cancelled() {
                    return Err(BasebackupError::Cancelled { lsn });
                }
                n = freed.wait_timeout(n, POLL).unwrap_or_else(|p| p.into_inner()).0;
            }
            *n += 1;
        }
        let started = Instant::now();
        let n = self.builds_started.fetch_add(1, Ordering::Relaxed);
        let tmp = path.with_extension(format!("{n}.tmp"));
        let built = write_file(path, &tmp, t, redo, lsn, timeline, opts, caller);
        {
            let (count, freed) = &self.running;
            *count.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
            freed.notify_one();
        }
        let stats = built?;
        self.built.fetch_add(1, Ordering::Relaxed);
        let bytes = std::fs::metadata(path)?.len();
        // The backup is made: trimming the directory may not fail it.
        if let Err(e) = self.evict(path) {
            eprintln!("neon-sidecar: trimming {}: {e}", self.dir.display());
        }
        Ok(Made { path: path.to_path_buf(), lsn, bytes, seconds: started.elapsed().as_secs_f64(), stats: Some(stats) })
    }

    /// Removes the oldest backups until the directory fits its limit, keeping `keep`. Other
    /// builds come and go meanwhile: a file gone already is not an error.
    fn evict(&self, keep: &Path) -> std::io::Result<Vec<PathBuf>> {
        let mut files = Vec::new();
        for e in std::fs::read_dir(&self.dir)?.flatten() {
            if !e.file_name().to_string_lossy().ends_with(".tar") {
                continue;
            }
            match e.metadata() {
                Ok(m) if m.is_file() => files.push((m.modified().unwrap_or(std::time::UNIX_EPOCH), m.len(), e.path())),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        files.sort();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        let mut removed = Vec::new();
        for (_, len, path) in files {
            if total <= self.limit_bytes {
                break;
            }
            if path != keep {
                match std::fs::remove_file(&path) {
                    Ok(()) => removed.push(path),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                total -= len;
            }
        }
        Ok(removed)
    }
}

/// The builder's caller: progress goes to its watch; the build goes on while anyone wants it.
struct Caller<'a> {
    shared: &'a SharedBasebackups,
    name: &'a str,
    build: &'a Arc<Build>,
    watch: &'a mut dyn Watch,
    /// The caller itself gave up (others may still wait).
    gone: bool,
    /// Nobody wants the build: it left the builds under way and counts as stopping.
    stopped: bool,
}

impl Watch for Caller<'_> {
    fn progress(&mut self, p: &Progress) {
        if !self.gone {
            self.watch.progress(p);
        }
    }

    fn cancelled(&mut self) -> bool {
        if !self.gone && self.watch.cancelled() {
            self.gone = true;
            self.build.wanted.fetch_sub(1, Ordering::AcqRel);
        }
        if self.build.wanted.load(Ordering::Acquire) > 0 {
            return false;
        }
        // Nobody wants it: it stops, unless a caller joined meanwhile. Once out of the
        // builds under way, a new caller starts a build of its own.
        let mut builds = self.shared.builds.lock().unwrap_or_else(|p| p.into_inner());
        if self.build.wanted.load(Ordering::Acquire) > 0 {
            return false;
        }
        if !self.stopped {
            self.stopped = true;
            self.shared.stopping.fetch_add(1, Ordering::AcqRel);
            if builds.get(self.name).is_some_and(|b| Arc::ptr_eq(b, self.build)) {
                builds.remove(self.name);
            }
        }
        true
    }
}
