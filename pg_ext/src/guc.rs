//! The extension's settings. `neon-sidecar init` writes the first two into the compute's
//! `postgresql.conf`; the others have defaults that suit one compute and one sidecar on a
//! machine.

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;
use std::path::PathBuf;
use std::time::Duration;

pub static SIDECAR_SOCKET: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static SHARED_DIR: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static PREFETCH_DISTANCE: GucSetting<i32> = GucSetting::<i32>::new(128);
pub static REQUEST_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(30_000);
pub static MAX_AS_OF: GucSetting<i32> = GucSetting::<i32>::new(4);
pub static AS_OF_IDLE_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(600_000);

pub fn define() {
    GucRegistry::define_string_guc(
        c"neon.sidecar_socket",
        c"The sidecar's unix socket.",
        c"Where the neon sidecar serves pages, sizes, history and base backups.",
        &SIDECAR_SOCKET,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_string_guc(
        c"neon.shared_dir",
        c"The directory the sidecar shares with the compute: base backups and cached pages.",
        c"The sidecar's --shared-dir: neon_basebackup() returns paths inside it, and neon_get_page() reads pages the sidecar has cached from its page file there.",
        &SHARED_DIR,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_int_guc(
        c"neon.prefetch_distance",
        c"How many blocks ahead neon_get_page reads when it sees a sequential scan (0: off).",
        c"Sequential neon_get_page calls on one relation at one LSN queue the next blocks for the background worker, which has the sidecar rebuild them ahead of the reader.",
        &PREFETCH_DISTANCE,
        0,
        1024,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"neon.request_timeout",
        c"How long a call waits for the sidecar (and for an LSN to arrive there).",
        c"A query cancel ends the wait sooner.",
        &REQUEST_TIMEOUT_MS,
        100,
        i32::MAX,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"neon.max_as_of",
        c"How many past schemas (neon_as_of) may exist at once, each with its own server on a branch.",
        c"Each runs a read-only PostgreSQL on a branch of the sidecar until neon_as_of_drop.",
        &MAX_AS_OF,
        0,
        1000,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"neon.as_of_idle_timeout",
        c"How long a past server (neon_as_of) may go unused before the sidecar stops it (0: never).",
        c"A stopped one starts again when its foreign tables are next read; taken when neon_as_of runs.",
        &AS_OF_IDLE_TIMEOUT_MS,
        0,
        i32::MAX,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
}

/// `neon.sidecar_socket`, if set.
pub fn sidecar_socket() -> Option<PathBuf> {
    SIDECAR_SOCKET.get().filter(|s| !s.as_bytes().is_empty()).map(|s| PathBuf::from(s.to_string_lossy().into_owned()))
}

/// `neon.shared_dir`, if set.
pub fn shared_dir() -> Option<PathBuf> {
    SHARED_DIR.get().filter(|s| !s.as_bytes().is_empty()).map(|s| PathBuf::from(s.to_string_lossy().into_owned()))
}

/// `neon.as_of_idle_timeout` in ms (0: never).
pub fn as_of_idle_timeout_ms() -> u32 {
    AS_OF_IDLE_TIMEOUT_MS.get().max(0) as u32
}

pub fn request_timeout() -> Duration {
    Duration::from_millis(REQUEST_TIMEOUT_MS.get().max(1) as u64)
}

pub fn prefetch_distance() -> u32 {
    PREFETCH_DISTANCE.get().max(0) as u32
}
