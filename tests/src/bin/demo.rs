//! `make demo`: the product end to end (see `neon_tests::demo`): a compute and its sidecar,
//! pgbench, a page as it was through `neon_get_page` and pageinspect, a base backup at the
//! earlier LSN from `neon_basebackup`, booted beside the running compute, then all stopped.

fn main() -> anyhow::Result<()> {
    let f = neon_tests::bench::Flags::parse("demo [--scale N] [--seconds S]", &[("scale", "10"), ("seconds", "10")])?;
    neon_tests::demo::run(&mut std::io::stdout(), f.get("scale")?, f.get("seconds")?)?;
    Ok(())
}
