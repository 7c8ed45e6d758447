//! The demo path as `make demo` runs it: every claim it prints is checked inside
//! `neon_tests::demo::run` (an `ensure!` each); here, beyond those, that the story holds
//! together — pgbench moved the balances after the LSN the backup is of, and the backup is a
//! whole database.

use anyhow::Result;

#[test]
fn the_demo_runs_and_its_claims_hold() -> Result<()> {
    let mut out = Vec::new();
    let shown = neon_tests::demo::run(&mut out, 2, 3)?;
    let text = String::from_utf8(out)?;
    print!("{text}");
    assert_eq!(shown.history_then, 0, "pgbench_history was empty at the LSN");
    assert!(shown.history_now > 0);
    assert_ne!(shown.balance_then, shown.balance_now, "pgbench moved the balances");
    assert!(shown.backup_bytes > 20 << 20, "a scale-2 pgbench database is over 20 MB");
    for step in 1..=6 {
        assert!(text.contains(&format!("== {step}.")), "step {step} missing:\n{text}");
    }
    assert!(text.contains(&shown.then_lsn));
    Ok(())
}
