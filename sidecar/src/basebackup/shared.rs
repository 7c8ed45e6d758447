//! Base backups in the shared directory, for the extension and the CLI: `<shared>/basebackups/
//! base-<timeline>-<LSN>[-nonrel][-newtli<timeline>].tar` (without relation pages; on a new timeline), written under a
//! temporary name, fsync'd and renamed, so a reader never sees a partial file and a failed
//! build (a full disk) leaves nothing behind. Asking again for the same LSN returns the file
//! already there. The directory has a size limit: after each build the oldest backups are
//! removed until the rest fit (never the one just made). The directory is private to the
//! sidecar's OS user (0700), the files 0600.

use super::{write_basebackup, BasebackupError, Options, Progress, Stats, TimelineFiles};
use crate::repo::store::Store;
use crate::repo::timeline::Timeline;
use crate::walredo::WalRedoManager;
use neon_types::Lsn;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Instant;

/// Writes the base backup as of `lsn` to `path`: under a temporary name (`.tar.tmp`), fsync'd,
/// renamed, the directory fsync'd; on any error nothing is left behind.
pub fn write_file(
    path: &Path,
    repo: &Timeline,
    redo: &dyn WalRedoManager,
    lsn: Lsn,
    timeline: &TimelineFiles,
    opts: Options,
    report: &mut dyn FnMut(&Progress),
) -> Result<Stats, BasebackupError> {
    let tmp = path.with_extension("tar.tmp");
    let built = (|| -> Result<Stats, BasebackupError> {
        // A leftover is unlinked (never followed, were it a symbolic link), and the file is
        // made new, private: nothing outside the directory is written through it.
        let _ = std::fs::remove_file(&tmp);
        let file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        let (w, stats) = write_basebackup(
            repo,
            redo,
            lsn,
            timeline,
            opts,
            std::io::BufWriter::with_capacity(1 << 20, file),
            report,
        )?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::File::open(dir)?.sync_all()?;
        Ok(stats)
    })();
    if built.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    built
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
    /// One build at a time: they share the redo pool anyway.
    building: Mutex<()>,
}

impl SharedBasebackups {
    /// Uses (creating it, private) `<shared>/basebackups`.
    pub fn new(shared: &Path, limit_bytes: u64) -> std::io::Result<SharedBasebackups> {
        let dir = shared.join("basebackups");
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(shared, std::fs::Permissions::from_mode(0o700))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        // Temporary files of builds a crash interrupted.
        for e in std::fs::read_dir(&dir)?.flatten() {
            if e.file_name().to_string_lossy().ends_with(".tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(SharedBasebackups { dir, limit_bytes, building: Mutex::new(()) })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn name(lsn: Lsn, timeline: &TimelineFiles, opts: &Options) -> String {
        let nonrel = if opts.relation_pages { "" } else { "-nonrel" };
        let tli = if opts.new_timeline { format!("-newtli{:08X}", timeline.next_free) } else { String::new() };
        format!("base-{:08X}-{:016X}{nonrel}{tli}.tar", timeline.timeline, lsn.0)
    }

    /// The base backup of timeline `t` as of `lsn`, built unless it is already there.
    pub fn get(
        &self,
        store: &Store,
        t: &Arc<Timeline>,
        redo: &dyn WalRedoManager,
        lsn: Lsn,
        opts: Options,
        report: &mut dyn FnMut(&Progress),
    ) -> Result<Made, BasebackupError> {
        let _one = self.building.lock().unwrap_or_else(|p| p.into_inner());
        let timeline = TimelineFiles::of(store, t, lsn)?;
        let path = self.dir.join(Self::name(lsn, &timeline, &opts));
        if let Ok(m) = std::fs::metadata(&path) {
            return Ok(Made { path, lsn, bytes: m.len(), seconds: 0.0, stats: None });
        }
        let started = Instant::now();
        let stats = write_file(&path, t, redo, lsn, &timeline, opts, report)?;
        let bytes = std::fs::metadata(&path)?.len();
        self.evict(&path)?;
        Ok(Made { path, lsn, bytes, seconds: started.elapsed().as_secs_f64(), stats: Some(stats) })
    }

    /// Removes the oldest backups until the directory fits its limit, keeping `keep`.
    fn evict(&self, keep: &Path) -> std::io::Result<Vec<PathBuf>> {
        let mut files = Vec::new();
        for e in std::fs::read_dir(&self.dir)?.flatten() {
            let m = e.metadata()?;
            if m.is_file() && e.file_name().to_string_lossy().ends_with(".tar") {
                files.push((m.modified().unwrap_or(std::time::UNIX_EPOCH), m.len(), e.path()));
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
                std::fs::remove_file(&path)?;
                total -= len;
                removed.push(path);
            }
        }
        Ok(removed)
    }
}
