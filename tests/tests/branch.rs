//! Branches: a writable data directory as of a past LSN, mounted by the sidecar (FUSE), on
//! which stock PostgreSQL 15 boots without replay. The oracles are PostgreSQL's own: `pg_dump`
//! of every database on the branch equals the dump the compute gave at that LSN, and
//! `pg_amcheck --heapallindexed` passes. Writes on a branch survive `kill -9` of its postmaster
//! and of the sidecar (remounted when it starts again); history and a second branch at the same
//! LSN do not see them; a dead sidecar gives the branch server I/O errors, not pages; dropping
//! a branch leaves no mount and no files. Needs FUSE: as CI runs (root, `/dev/fuse`, fuse3
//! installed by `make`), a missing piece fails the test with the reason.

use anyhow::{Context, Result};
use neon_tests::sidecar::{cluster_born_with_store, cluster_born_with_store_and, SidecarProcess};
use neon_tests::workload::{self, dump_all};
use neon_tests::Cluster;
use neon_types::Lsn;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `neon-sidecar branch ARGS` against the running sidecar; its output.
fn branch_cli(s: &SidecarProcess, args: &[&str]) -> Result<String> {
    let (sub, rest) = args.split_first().expect("a subcommand");
    let out = std::process::Command::new(neon_tests::sidecar_bin()?)
        .args(["branch", sub, "--socket"])
        .arg(s.socket())
        .args(rest)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "neon-sidecar branch {args:?}: {}{}",
        String::from_utf8_lossy(&out.stderr),
        s.log_text()
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// Detaches, when the test ends however it ends, every branch mount it made (dropped after the
/// branch servers, which are declared after it).
struct Unmount(std::cell::RefCell<Vec<PathBuf>>);

impl Unmount {
    /// A new branch at `lsn`: its id and mount path (from `branch create`'s line), the mount
    /// to be detached at the end.
    fn create(&self, s: &SidecarProcess, lsn: Lsn) -> Result<(u32, PathBuf)> {
        self.create_at(s, lsn, None)
    }

    /// The same, mounted at `mount` if given (`--mount`).
    fn create_at(&self, s: &SidecarProcess, lsn: Lsn, mount: Option<&Path>) -> Result<(u32, PathBuf)> {
        let lsn_text = lsn.to_string();
        let mut args = vec!["create", "--lsn", &lsn_text];
        if let Some(m) = mount {
            args.extend(["--mount", m.to_str().context("mount point")?]);
        }
        let line = branch_cli(s, &args)?;
        let fields: Vec<&str> = line.trim().split('\t').collect();
        anyhow::ensure!(fields.len() == 5 && fields[1] == lsn_text, "branch create said {line:?}");
        let path = PathBuf::from(fields[4]);
        anyhow::ensure!(mount.is_none_or(|m| m == path), "branch create mounted at {}, not {mount:?}", path.display());
        self.0.borrow_mut().push(path.clone());
        Ok((fields[0].parse()?, path))
    }
}

impl Drop for Unmount {
    fn drop(&mut self) {
        for p in self.0.borrow().iter() {
            if mounted(p).unwrap_or(false) {
                sidecar::branch::unmount(p);
            }
        }
    }
}

fn mounted(path: &Path) -> Result<bool> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    let p = path.to_str().context("path")?;
    Ok(mounts.lines().any(|l| l.split(' ').nth(1) == Some(p)))
}

/// Boots a server on a branch's mount; checks it replayed nothing.
fn boot(path: &Path, lsn: Lsn) -> Result<Cluster> {
    let mut b = Cluster::builder().existing_data_dir(path).guc("log_min_messages", "log").init()?;
    b.start_again().with_context(|| format!("booting the branch at {lsn}"))?;
    let log = b.log_contents();
    anyhow::ensure!(!log.contains("redo starts"), "the branch at {lsn} replayed WAL: {log}");
    Ok(b)
}

fn expect_as_recorded(b: &Cluster, lsn: Lsn, dumps: &BTreeMap<String, String>) -> Result<()> {
    workload::expect_dumps_equal(b.root_dir(), lsn, dumps, &dump_all(b)?)?;
    b.run_tool(
        "pg_amcheck",
        &["--all", "--heapallindexed", "--install-missing", "--maintenance-db", &b.conn_str("postgres")],
    )
    .with_context(|| format!("pg_amcheck of the branch at {lsn}"))?;
    Ok(())
}

/// Drops branch `id` (its server stopped) and checks nothing of it is left.
fn drop_branch(s: &SidecarProcess, id: u32, path: &Path) -> Result<()> {
    branch_cli(s, &["drop", &id.to_string()])?;
    anyhow::ensure!(!mounted(path)? && !path.exists(), "branch {id} left {} behind", path.display());
    Ok(())
}

/// A branch at `lsn` boots without replay, is as recorded there, and is dropped.
fn boot_check_drop(s: &SidecarProcess, mounts: &Unmount, lsn: Lsn, dumps: &BTreeMap<String, String>) -> Result<()> {
    let (id, path) = mounts.create(s, lsn)?;
    let mut b = boot(&path, lsn)?;
    expect_as_recorded(&b, lsn, dumps)?;
    b.stop()?;
    drop(b);
    drop_branch(s, id, &path)?;
    eprintln!("{lsn}: a branch boots without replay, dumps as recorded, pg_amcheck passes");
    Ok(())
}

/// Block `blkno` of `node`'s main fork at `lsn`, from the sidecar's history.
fn history_page(
    s: &SidecarProcess,
    node: neon_types::RelFileNode,
    blkno: u32,
    lsn: Lsn,
) -> Result<Box<[u8; neon_types::BLCKSZ]>> {
    use neon_types::protocol::{Request, Response};
    let tag = neon_types::BufferTag { rel: neon_types::RelTag { node, fork: neon_types::ForkNumber::Main }, blkno };
    match s.ask(&Request::GetPage { tag, lsn, wait_ms: 1000 })? {
        Response::Page(p) => Ok(p),
        r => anyhow::bail!("GetPage of {tag} at {lsn}: {r:?}"),
    }
}

#[test]
fn branches_boot_at_past_lsns_keep_their_writes_and_leave_history_alone() -> Result<()> {
    anyhow::ensure!(Path::new("/dev/fuse").exists(), "branches need FUSE: /dev/fuse is missing on this machine");
    let (c, store) = cluster_born_with_store()?;
    // (A cache several times the pages read, so eviction of those the test looks for is rare.)
    let sidecar_args = ["--page-cache-mb", "256"];
    let sidecar = SidecarProcess::start_for_compute(&c, &store, &sidecar_args)?;
    let mounts = Unmount(Default::default());
    // Five LSNs through pgbench and the DDL mix (as basebackup_history records them).
    let mut marks: Vec<(Lsn, BTreeMap<String, String>)> = Vec::new();
    let mut mark = |c: &Cluster| -> Result<()> {
        marks.push((workload::flush_lsn(c)?, dump_all(c)?));
        Ok(())
    };
    c.pgbench(&["-i", "-q", "-s", "1"])?;
    let accounts = workload::pgbench_accounts_file(&c)?;
    mark(&c)?;
    workload::mixed(&c, 1)?;
    mark(&c)?;
    c.execute("CREATE TABLE held AS SELECT g FROM generate_series(1, 100) g")?;
    c.execute("BEGIN; UPDATE held SET g = -g WHERE g < 5; PREPARE TRANSACTION 'across';")?;
    mark(&c)?;
    c.execute("COMMIT PREPARED 'across'")?;
    c.pgbench(&["-n", "-c", "2", "-j", "2", "-t", "200"])?;
    c.execute("VACUUM FULL docs")?;
    mark(&c)?;
    c.execute("ALTER TABLE pgbench_tellers ADD COLUMN note text DEFAULT 'x'")?;
    c.pgbench(&["-n", "-c", "2", "-j", "2", "-t", "200"])?;
    mark(&c)?;
    c.execute("DROP TABLE pgbench_history")?;
    sidecar.wait_durable(workload::flush_lsn(&c)?)?;
    for (lsn, dumps) in &marks[1..] {
        boot_check_drop(&sidecar, &mounts, *lsn, dumps)?;
    }
    // The branches read history through the page service's cache: what the last one read
    // (pg_dump reads every block) is there for `GetPage` at its LSN (nothing else reads now;
    // one of eight may have been evicted since).
    let counters = || -> Result<(u64, u64)> {
        Ok((sidecar.status("cache_hits")?.parse()?, sidecar.status("cache_misses")?.parse()?))
    };
    let (hits, misses) = counters()?;
    // (pgbench_accounts as it is now: the DDL mix rewrote it after the first mark.)
    let accounts_now = workload::pgbench_accounts_file(&c)?;
    for blkno in 1..=8 {
        history_page(&sidecar, accounts_now, blkno, marks[marks.len() - 1].0)?;
    }
    let (hits_after, misses_after) = counters()?;
    anyhow::ensure!(
        hits_after - hits >= 7 && (hits_after - hits) + (misses_after - misses) == 8,
        "GetPage of 8 blocks a branch read at its LSN: {} cache hits, {} misses",
        hits_after - hits,
        misses_after - misses
    );

    // Writes on a branch at the first LSN, through a crash of its postmaster.
    let (l1, dumps1) = &marks[0];
    let before = history_page(&sidecar, accounts, 0, *l1)?;
    let (id1, path1) = mounts.create(&sidecar, *l1)?;
    // The segment after the checkpoint's is there already, sparse: PostgreSQL's start-up need
    // not write 16 MB of zeros through the mount to preallocate it.
    let overlay_wal = path1.parent().context("branch dir")?.join("overlay/pg_wal");
    let mut segments: Vec<(String, u64, u64)> = std::fs::read_dir(&overlay_wal)?
        .map(|e| {
            let e = e?;
            let m = e.metadata()?;
            Ok((
                e.file_name().to_string_lossy().into_owned(),
                m.len(),
                std::os::unix::fs::MetadataExt::blocks(&m) * 512,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    segments.retain(|(name, ..)| name.len() == 24);
    segments.sort();
    anyhow::ensure!(
        segments.len() == 2 && segments[1].1 == 16 << 20 && segments[1].2 < 1 << 20,
        "the new branch's WAL segments (name, size, allocated): {segments:?}"
    );
    let mut b1 = boot(&path1, *l1)?;
    // Relation files are made in the overlay when the server first looks them up: booted, it
    // sees every one of them and the overlay holds few.
    let db_dir = format!("base/{}", accounts.dbnode);
    let count = |dir: &Path| -> Result<usize> { Ok(std::fs::read_dir(dir.join(&db_dir))?.count()) };
    let (listed, made) = (count(&path1)?, count(&path1.parent().context("branch dir")?.join("overlay"))?);
    anyhow::ensure!(
        listed > 200 && made * 2 < listed,
        "{db_dir}: {listed} files listed on the mount, {made} made in the overlay"
    );
    anyhow::ensure!(path1.join(&db_dir).join(accounts.relnode.to_string()).exists(), "pgbench_accounts is not listed");
    expect_as_recorded(&b1, *l1, dumps1)?;
    b1.pgbench(&["-n", "-c", "2", "-j", "2", "-t", "300"])?;
    b1.execute("CREATE TABLE branch_only AS SELECT g FROM generate_series(1, 5000) g; CHECKPOINT;")?;
    b1.execute("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= 1000")?;
    let state = |b: &Cluster| {
        b.query_one_string(
            "SELECT (SELECT count(*) FROM pgbench_history) || ' ' || (SELECT count(*) FROM branch_only) || ' ' || \
             (SELECT sum(abalance) FROM pgbench_accounts)",
        )
    };
    let written = state(&b1)?;
    anyhow::ensure!(written.starts_with("600 5000 "), "the branch's writes: {written}");
    b1.kill9()?;
    b1.start_again()?;
    anyhow::ensure!(
        state(&b1)? == written,
        "after kill -9 of the branch's postmaster: {} (was {written})",
        state(&b1)?
    );

    // History did not change: the store's page and a second branch at the same LSN.
    anyhow::ensure!(history_page(&sidecar, accounts, 0, *l1)? == before, "history's page changed under a branch");
    boot_check_drop(&sidecar, &mounts, *l1, dumps1)?;

    // The sidecar dies: the branch server gets errors, not pages.
    sidecar.kill9()?;
    let read = b1.query_one_string("SELECT length(pg_read_binary_file('PG_VERSION'))");
    anyhow::ensure!(read.is_err(), "a read on the branch with the sidecar dead gave {read:?}");
    b1.kill9()?;
    // Started again, it mounts its branches; the branch server recovers with its writes.
    let sidecar = SidecarProcess::restart_for_compute(&c, &store, &sidecar_args)?;
    anyhow::ensure!(mounted(&path1)?, "branch {id1} is not mounted again: {}", sidecar.log_text());
    b1.start_again()?;
    anyhow::ensure!(state(&b1)? == written, "after the sidecar's kill -9: {} (was {written})", state(&b1)?);
    let list = branch_cli(&sidecar, &["list"])?;
    anyhow::ensure!(list.lines().count() == 1 && list.starts_with(&format!("{id1}\t")), "branches listed: {list}");

    // A branch in use is not dropped; stopped, it goes with its mount and files.
    let busy = std::process::Command::new(neon_tests::sidecar_bin()?)
        .args(["branch", "drop", "--socket"])
        .arg(sidecar.socket())
        .arg(id1.to_string())
        .output()?;
    anyhow::ensure!(
        !busy.status.success() && String::from_utf8_lossy(&busy.stderr).contains("in use"),
        "dropping a branch in use: {}",
        String::from_utf8_lossy(&busy.stderr)
    );
    b1.stop()?;
    drop(b1);
    drop_branch(&sidecar, id1, &path1)?;
    anyhow::ensure!(branch_cli(&sidecar, &["list"])?.is_empty(), "branches left after dropping all");
    sidecar.stop()?;
    Ok(())
}

/// WAL until the store's oldest readable LSN passes `lsn` or `until` says stop (checked after
/// each round); fails after four minutes.
fn churn(c: &Cluster, sidecar: &SidecarProcess, mut until: impl FnMut(Lsn) -> bool) -> Result<Lsn> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(240);
    c.execute("CREATE TABLE IF NOT EXISTS filler (id int, pad text)")?;
    loop {
        c.execute("INSERT INTO filler SELECT g, repeat('x', 400) FROM generate_series(1, 20000) g")?;
        c.execute("TRUNCATE filler")?;
        c.pgbench(&["-n", "-c", "2", "-j", "2", "-t", "300"])?;
        sidecar.wait_durable(workload::flush_lsn(c)?)?;
        let oldest = sidecar.timelines()?[0].oldest;
        if until(oldest) {
            return Ok(oldest);
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "history never got there: {}", sidecar.log_text());
    }
}

/// From SQL: `neon_branch_create` makes a branch that `neon_branches()` and `neon_history()`
/// show as a pin; with a small retention, history behind the horizon stays while the branch
/// lives (it boots and reads old pages), and goes once it is dropped.
#[test]
fn a_branch_made_from_sql_pins_its_history() -> Result<()> {
    let (c, store) = cluster_born_with_store()?;
    let sidecar = SidecarProcess::start_for_compute(&c, &store, &["--retention-mb", "8"])?;
    let mounts = Unmount(Default::default());
    c.execute("CREATE EXTENSION neon")?;
    c.pgbench(&["-i", "-q", "-s", "1"])?;
    let early = workload::flush_lsn(&c)?;
    let sum_then = c.query_one_string("SELECT sum(abalance) FROM pgbench_accounts")?;
    sidecar.wait_durable(early)?;
    let made = c.query_rows(&format!("SELECT id, path, lsn FROM neon_branch_create('{early}')"))?;
    let (id, path) = match &made[..] {
        [row] => (row[0].clone().context("id")?, PathBuf::from(row[1].clone().context("path")?)),
        rows => anyhow::bail!("neon_branch_create gave {rows:?}"),
    };
    mounts.0.borrow_mut().push(path.clone());
    anyhow::ensure!(
        made[0][2].as_deref() == Some(&early.to_string()[..]),
        "branch LSN {:?}, asked {early}",
        made[0][2]
    );
    let listed = c.query_one_string(
        "SELECT string_agg(id || ' ' || lsn || ' ' || coalesce(problem, 'ok'), ',') FROM neon_branches()",
    )?;
    anyhow::ensure!(listed == format!("{id} {early} ok"), "neon_branches() says {listed}");
    let pins = c.query_one_string("SELECT branch_pins FROM neon_history() WHERE followed")?;
    anyhow::ensure!(pins == format!("branch {id} at {early}"), "neon_history() pins: {pins}");

    // Far past the retention: history does not move while the branch pins it.
    let mut rounds = 0;
    churn(&c, &sidecar, |_| {
        rounds += 1;
        rounds == 6
    })?;
    let (durable, _) = sidecar.history()?;
    let oldest = sidecar.timelines()?[0].oldest;
    anyhow::ensure!(oldest <= early, "history starts at {oldest}, past the branch's {early} (durable {durable})");
    anyhow::ensure!(durable.0 - early.0 > 3 * (8 << 20), "only {} bytes of WAL past the branch", durable.0 - early.0);
    let mut b = boot(&path, early)?;
    let sum = b.query_one_string("SELECT sum(abalance) FROM pgbench_accounts")?;
    anyhow::ensure!(sum == sum_then, "the branch reads sum(abalance) {sum}, it was {sum_then}");
    b.stop()?;
    drop(b);

    // Dropped, it pins nothing: history moves past it.
    let dropped = c.query_one_string(&format!("SELECT neon_branch_drop({id})"))?;
    anyhow::ensure!(Path::new(&dropped) == path && !mounted(&path)? && !path.exists(), "dropped {dropped}");
    let moved = churn(&c, &sidecar, |oldest| oldest > early)?;
    eprintln!("with branch {id} at {early}: history kept from {oldest}; dropped: history from {moved}");
    let err = c.query_one_string(&format!("SELECT neon_branch_create('{early}')")).unwrap_err();
    anyhow::ensure!(format!("{err:#}").contains(&early.to_string()), "a branch before history: {err:#}");
    sidecar.stop()?;
    Ok(())
}

/// Flips a byte of the payload of the newest value of `key` at or before `lsn` in the store's
/// layer files (in place: the running sidecar's mapping sees it); returns the file's path.
fn corrupt_newest_value(store: &Path, key: sidecar::repo::key::Key, lsn: Lsn) -> Result<PathBuf> {
    use sidecar::repo::layer::DeltaLayer;
    use std::os::unix::fs::FileExt;
    let mut newest: Option<(Lsn, PathBuf, usize)> = None;
    for t in std::fs::read_dir(store.join("timelines"))? {
        for f in std::fs::read_dir(t?.path())? {
            let path = f?.path();
            let Ok(layer) = DeltaLayer::open(&path) else { continue };
            for (i, (k, at)) in layer.entries()?.into_iter().enumerate() {
                if k == key && at <= lsn && newest.as_ref().is_none_or(|(n, _, _)| at > *n) {
                    newest = Some((at, path.clone(), i));
                }
            }
        }
    }
    let (_, path, i) =
        newest.with_context(|| format!("no value of {key} at or before {lsn} in {}", store.display()))?;
    // Footer (last 48 bytes): magic u64 | version u32 | entries u32 | index offset u64 | ...;
    // index entries of 38 bytes: key [18] | lsn u64 | blob offset u64 | length u32; a blob's
    // payload follows its 8-byte header (see `repo::layer`).
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&path)?;
    let len = file.metadata()?.len();
    let u64_at = |at: u64| -> Result<u64> {
        let mut b = [0u8; 8];
        file.read_exact_at(&mut b, at)?;
        Ok(u64::from_le_bytes(b))
    };
    let index = u64_at(len - 48 + 16)?;
    let blob = u64_at(index + i as u64 * 38 + 26)?;
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, blob + 9)?;
    file.write_all_at(&[byte[0] ^ 0x40], blob + 9)?;
    Ok(path)
}

/// A value of the store that fails its CRC, read through a branch: the branch's server gets an
/// I/O error for that block (never a page), the sidecar's log names the file and the layer,
/// and the rest of the branch reads on.
#[test]
fn a_corrupt_value_read_through_a_branch_is_an_io_error() -> Result<()> {
    let (c, store) = cluster_born_with_store()?;
    let sidecar = SidecarProcess::start_for_compute(&c, &store, &[])?;
    let mounts = Unmount(Default::default());
    c.execute("CREATE TABLE victim AS SELECT g, md5(g::text) AS h FROM generate_series(1, 2000) g")?;
    c.execute("CREATE TABLE fine AS SELECT 42 AS x")?;
    let ids = c.query_one_string(
        "SELECT (SELECT oid FROM pg_database WHERE datname = current_database()) || ' ' || pg_relation_filenode('victim')",
    )?;
    let (db, rel) = ids.split_once(' ').context("two numbers")?;
    let node = neon_types::RelFileNode { spcnode: 1663, dbnode: db.parse()?, relnode: rel.parse()? };
    let lsn = workload::flush_lsn(&c)?;
    sidecar.wait_durable(lsn)?;
    let (id, path) = mounts.create(&sidecar, lsn)?;
    let tag = neon_types::BufferTag { rel: neon_types::RelTag { node, fork: neon_types::ForkNumber::Main }, blkno: 0 };
    let layer = corrupt_newest_value(&store, sidecar::repo::key::Key::rel_block(&tag), lsn)?;
    let mut b = boot(&path, lsn)?;
    let err = b.query_one_string("SELECT count(*) FROM victim").err().context("read a corrupt page")?;
    let file = format!("base/{}/{}", node.dbnode, node.relnode);
    anyhow::ensure!(
        format!("{err:#}").contains("Input/output error") && format!("{err:#}").contains(&file),
        "the branch server said {err:#}"
    );
    let log = sidecar.log_text();
    let layer_name = layer.file_name().context("a file")?.to_string_lossy().into_owned();
    anyhow::ensure!(
        log.lines().any(|l| l.contains(&format!("branch {id}")) && l.contains(&file) && l.contains(&layer_name)),
        "the sidecar's log does not name {file} and {layer_name}: {log}"
    );
    anyhow::ensure!(b.query_one_string("SELECT x FROM fine")? == "42", "the rest of the branch");
    b.stop()?;
    drop(b);
    drop_branch(&sidecar, id, &path)?;
    sidecar.stop()?;
    Ok(())
}

/// A cluster with data checksums: every page a branch reads from history carries a valid
/// checksum — `pg_checksums --check` of the branch's data directory (every block of every
/// relation read through the mount) passes, and the branch dumps as recorded.
#[test]
fn a_branch_of_a_cluster_with_checksums_has_valid_checksums() -> Result<()> {
    let (c, store) = cluster_born_with_store_and(&["--data-checksums"])?;
    let sidecar = SidecarProcess::start_for_compute(&c, &store, &[])?;
    let mounts = Unmount(Default::default());
    c.pgbench(&["-i", "-q", "-s", "1"])?;
    c.pgbench(&["-n", "-c", "2", "-j", "2", "-t", "200"])?;
    let lsn = workload::flush_lsn(&c)?;
    let dumps = dump_all(&c)?;
    c.pgbench(&["-n", "-c", "2", "-j", "2", "-t", "200"])?;
    sidecar.wait_durable(workload::flush_lsn(&c)?)?;
    let (id, path) = mounts.create(&sidecar, lsn)?;
    // Every block, read cold from history through the mount (no server running on it yet).
    let out = c.run_server_tool("pg_checksums", &["--check", "-D", path.to_str().context("path")?])?;
    anyhow::ensure!(out.contains("Bad checksums:  0") && out.contains("Data checksum version: 1"), "{out}");
    let blocks: u64 =
        out.lines().find_map(|l| l.strip_prefix("Blocks scanned:")).context("no block count")?.trim().parse()?;
    anyhow::ensure!(blocks > 300, "pg_checksums scanned only {blocks} blocks: {out}");
    let mut b = boot(&path, lsn)?;
    expect_as_recorded(&b, lsn, &dumps)?;
    b.stop()?;
    drop(b);
    drop_branch(&sidecar, id, &path)?;
    sidecar.stop()?;
    Ok(())
}

/// Tablespaces on a branch mounted where it is asked (`--mount DIR`): each is a directory in
/// place under `pg_tblspc/` (as in our base backups), so the branch's writes never reach the
/// compute's tablespace directories; the branch dumps as recorded, with a database whose
/// default tablespace is one of them, and its writes stay its own. When its mount point is
/// unusable at the sidecar's next start, the branch is listed with why, and can be dropped.
#[test]
fn a_branch_mounted_where_asked_holds_its_tablespaces_in_place() -> Result<()> {
    anyhow::ensure!(Path::new("/dev/fuse").exists(), "branches need FUSE: /dev/fuse is missing on this machine");
    let (c, store) = cluster_born_with_store()?;
    let sidecar = SidecarProcess::start_for_compute(&c, &store, &[])?;
    let mounts = Unmount(Default::default());
    let ts = c.tablespace_dir("ts1")?;
    c.execute(&format!("CREATE TABLESPACE ts1 LOCATION '{ts}'"))?;
    c.execute(
        "CREATE TABLE t_ts (id int PRIMARY KEY, v text) TABLESPACE ts1;
         INSERT INTO t_ts SELECT g, md5(g::text) FROM generate_series(1, 20000) g;",
    )?;
    c.execute("CREATE DATABASE db_ts TABLESPACE ts1")?;
    c.connect("db_ts")?
        .batch_execute("CREATE TABLE home AS SELECT g, md5(g::text) AS v FROM generate_series(1, 3000) g")?;
    let lsn = workload::flush_lsn(&c)?;
    let dumps = dump_all(&c)?;
    // (Nothing but this test writes t_ts on the compute from here on: no autovacuum.)
    c.execute("UPDATE t_ts SET v = 'after' WHERE id % 3 = 0; ALTER TABLE t_ts SET (autovacuum_enabled = off)")?;
    c.execute("VACUUM t_ts")?;
    c.execute("CHECKPOINT")?;
    sidecar.wait_durable(workload::flush_lsn(&c)?)?;
    let spc = c.query_one_string("SELECT oid FROM pg_tablespace WHERE spcname = 'ts1'")?;
    // t_ts's files in the compute's tablespace directory: sizes and modification times.
    let t_ts_file = c.data_dir().join(c.query_one_string("SELECT pg_relation_filepath('t_ts')")?);
    let t_ts_files = || -> Result<Vec<(String, u64, std::time::SystemTime)>> {
        let (dir, name) = (t_ts_file.parent().context("dir")?, t_ts_file.file_name().context("name")?);
        let mut files = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(&*name.to_string_lossy()) {
                let m = e.metadata()?;
                files.push((n, m.len(), m.modified()?));
            }
        }
        files.sort();
        Ok(files)
    };
    let compute_files = t_ts_files()?;
    anyhow::ensure!(t_ts_file.canonicalize()?.starts_with(&ts), "t_ts is not in {ts}: {}", t_ts_file.display());

    let parent = PathBuf::from(c.tablespace_dir("mounts")?);
    let (id, path) = mounts.create_at(&sidecar, lsn, Some(&parent.join("branch")))?;
    let in_branch = path.join("pg_tblspc").join(&spc);
    let kind = std::fs::symlink_metadata(&in_branch)?.file_type();
    anyhow::ensure!(kind.is_dir(), "pg_tblspc/{spc} on the branch is not a directory in place: {kind:?}");
    let b = boot(&path, lsn)?;
    expect_as_recorded(&b, lsn, &dumps)?;
    b.execute("UPDATE t_ts SET v = 'branch' WHERE id <= 1000; CHECKPOINT")?;
    b.connect("db_ts")?
        .batch_execute("INSERT INTO home SELECT g, 'branch' FROM generate_series(1, 500) g; CHECKPOINT")?;
    anyhow::ensure!(
        b.query_one_string("SELECT count(*) FROM t_ts WHERE v = 'branch'")? == "1000",
        "the branch's writes to its tablespace"
    );
    anyhow::ensure!(t_ts_files()? == compute_files, "the branch's writes changed t_ts's files in the compute's {ts}");
    anyhow::ensure!(
        c.query_one_string("SELECT count(*) FROM t_ts WHERE v = 'branch'")? == "0",
        "the compute sees the branch's writes"
    );

    // The mount point goes wrong while the sidecar is down (a file where its directory was):
    // the sidecar starts, lists the branch with why it is not mounted, and drops it.
    drop(b);
    sidecar.stop()?;
    std::fs::remove_dir(&path).with_context(|| format!("the mount point {} after the stop", path.display()))?;
    std::fs::write(&path, b"in the way")?;
    let sidecar = SidecarProcess::restart_for_compute(&c, &store, &[])?;
    let list = branch_cli(&sidecar, &["list"])?;
    anyhow::ensure!(
        list.lines().count() == 1
            && list.starts_with(&format!("{id}\t{lsn}\t"))
            && list.contains(&format!("{}\tnot mounted: ", path.display())),
        "branches listed with a broken mount point: {list}"
    );
    branch_cli(&sidecar, &["drop", &id.to_string()])?;
    anyhow::ensure!(branch_cli(&sidecar, &["list"])?.is_empty(), "the branch is still listed after its drop");
    anyhow::ensure!(std::fs::read(&path)? == b"in the way", "dropping the branch touched the file at its mount point");
    std::fs::remove_file(&path)?;
    sidecar.stop()?;
    Ok(())
}
