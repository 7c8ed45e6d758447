//! The `neon` extension installs into Debian's PostgreSQL 15 and loads: `CREATE EXTENSION neon`
//! on a real server, its functions answer, and it drops cleanly. `make test` installs the
//! extension first (`make install-ext`).

use anyhow::{Context, Result};
use neon_tests::Cluster;

#[test]
fn create_extension_neon_works() -> Result<()> {
    let c = Cluster::start()?;
    c.execute("CREATE EXTENSION neon")
        .context("CREATE EXTENSION neon failed; is the extension installed? run `make install-ext`")?;
    let version = c.query_one_string("SELECT neon_version()")?;
    assert_eq!(version, env!("CARGO_PKG_VERSION"), "installed extension is not this build");
    let ext = c.query_one_string("SELECT extversion FROM pg_extension WHERE extname = 'neon'")?;
    assert_eq!(ext, version);
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
