//! The `neon` extension installs into Debian's PostgreSQL 15 and loads: `CREATE EXTENSION neon`
//! on a real server, its functions answer, and it drops cleanly. `make test` installs the
//! extension first (`make install-ext`); the installed `neon.so` must be the one this checkout
//! builds (`neon_version()` carries the build's identity), or every other test here would
//! test an older extension than the sources they are read beside.

use anyhow::{Context, Result};
use neon_tests::Cluster;
use std::path::Path;

/// The identity the build script stamps into `neon.so`, computed here for the checkout as it
/// is now.
#[path = "../../pg_ext/build_id.rs"]
mod build_id;

#[test]
fn create_extension_neon_works() -> Result<()> {
    let c = Cluster::start()?;
    c.execute("CREATE EXTENSION neon")
        .context("CREATE EXTENSION neon failed; is the extension installed? run `make install-ext`")?;
    let version = c.query_one_string("SELECT neon_version()")?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is in the workspace");
    let checkout = build_id::of_checkout(root);
    assert_ne!(
        checkout,
        "unknown",
        "{} is not a git checkout (or git is missing): cannot tell whether the installed neon.so was built from it",
        root.display()
    );
    // The commit part asked of git here, not only through build_id.rs.
    let head = build_id::git(root, &["rev-parse", "--short=12", "HEAD"]).context("git rev-parse HEAD")?;
    let head = head.trim();
    assert!(head.len() == 12 && checkout.starts_with(head), "build id {checkout} is not of HEAD {head}");
    assert_eq!(
        version,
        format!("{}+{checkout}", env!("CARGO_PKG_VERSION")),
        "installed neon.so is stale: run make install-ext (neon_version() is {version}; this checkout builds {}+{checkout})",
        env!("CARGO_PKG_VERSION")
    );
    let ext = c.query_one_string("SELECT extversion FROM pg_extension WHERE extname = 'neon'")?;
    assert_eq!(ext, env!("CARGO_PKG_VERSION"));
    assert_eq!(
        c.query_one_string("SELECT neon_block_size()::text")?,
        c.query_one_string("SELECT current_setting('block_size')")?
    );
    // The wal-redo loop refuses to run under a postmaster, and only superusers may call it.
    let err = c.execute("SELECT neon_walredo_loop()").expect_err("walredo loop under a postmaster");
    assert!(format!("{err:#}").contains("single-user"), "{err:#}");
    c.execute("CREATE ROLE alice LOGIN")?;
    let mut alice = postgres::Client::connect(&format!("{} user=alice", c.conn_str("postgres")), postgres::NoTls)?;
    let err = alice.batch_execute("SELECT neon_walredo_loop()").expect_err("walredo loop as a plain role");
    assert_eq!(err.code(), Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE), "{err}");
    c.execute("DROP EXTENSION neon")?;
    assert_eq!(c.query_one_string("SELECT count(*)::text FROM pg_proc WHERE proname LIKE 'neon\\_%'")?, "0");
    Ok(())
}
