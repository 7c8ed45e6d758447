//! Page reconstruction against the compute's own pages. A real PostgreSQL 15 server runs a
//! workload over heap, TOAST and every index type; the base images are its data files after a
//! first CHECKPOINT, the records come from our decoder, and every page rebuilt by the redo
//! processes must equal the page on disk after a second CHECKPOINT, once both are masked as
//! PostgreSQL's own `rm_mask` functions do (hint bits, pd_prune_xid, the free-space hole, LSN and
//! checksum). Run with `full_page_writes=off` (pages rebuilt by real redo) and `on`.

use anyhow::{Context, Result};
use bytes::Bytes;
use neon_tests::pages::{
    block_requests, compare_page, fork_path, read_block, redo_config, relations, Compared, Exceptions, PageMatch,
};
use neon_tests::store::copy_data_files;
use neon_tests::{workload, Cluster};
use neon_types::{ForkNumber, Lsn, BLCKSZ};
use sidecar::wal::segment::{SegmentSet, WalFileReader};
use sidecar::walredo::{PostgresRedoManager, RedoRecord, RedoRequest, WalRedoManager};
use std::collections::BTreeMap;

/// The workload between the two checkpoints: every page-level resource manager.
fn workload_after_base(c: &Cluster) -> Result<()> {
    c.pgbench(&["-n", "-c", "2", "-t", "150"])?;
    c.execute(
        "INSERT INTO docs SELECT g, CASE WHEN g % 7 = 0 THEN (SELECT string_agg(md5(g::text || i), '') FROM generate_series(1, 400) i) ELSE md5(g::text) END,
                ARRAY['t' || (g % 5)], point(g % 30, g % 70), to_tsvector('simple', 'fresh' || (g % 9)), int4range(g, g + 3)
         FROM generate_series(3001, 6000) g;
         UPDATE docs SET tags = tags || 'x'::text, pos = point(pos[0] + 1, pos[1]) WHERE id % 3 = 0;
         UPDATE docs SET body = body || 'hot' WHERE id % 5 = 0;
         DELETE FROM docs WHERE id % 11 = 0;
         SELECT nextval('seq') FROM generate_series(1, 50);
         -- nextval logs a value 32 ahead of what it leaves on the page (so a crash never
         -- reuses one); setval logs the page as it is, which makes the page on disk an oracle.
         SELECT setval('seq', 1000);",
    )?;
    c.execute("BEGIN; SELECT * FROM docs WHERE id < 100 FOR UPDATE; COMMIT;")?;
    c.execute("VACUUM docs")?;
    c.execute("CREATE INDEX docs_late ON docs (id DESC)")?;
    // A btree that grows from one page (a new root) and one full of duplicates (deduplication).
    c.execute(
        "CREATE TABLE grow (k int PRIMARY KEY, d int);
         CREATE INDEX grow_dups ON grow (d);
         INSERT INTO grow SELECT g, g % 3 FROM generate_series(1, 3000) g;",
    )?;
    c.execute("INSERT INTO docs (id, body) SELECT g, 'late' FROM generate_series(6001, 6500) g")?;
    Ok(())
}

fn setup(c: &Cluster) -> Result<()> {
    c.pgbench(&["-i", "-q", "-s", "1"])?;
    c.execute(
        "CREATE TABLE docs (id int PRIMARY KEY, body text, tags text[], pos point, words tsvector, span int4range);
         INSERT INTO docs SELECT g, md5(g::text), ARRAY['t' || (g % 7)], point(g % 100, g / 100),
                to_tsvector('simple', 'word' || (g % 50)), int4range(g, g + 10) FROM generate_series(1, 3000) g;
         CREATE INDEX docs_hash ON docs USING hash (id);
         CREATE INDEX docs_gin ON docs USING gin (tags);
         CREATE INDEX docs_gist ON docs USING gist (pos);
         CREATE INDEX docs_spgist ON docs USING spgist (pos);
         CREATE INDEX docs_brin ON docs USING brin (id) WITH (pages_per_range = 2);
         CREATE INDEX docs_body ON docs (left(body, 20) text_pattern_ops);
         CREATE SEQUENCE seq;",
    )?;
    c.execute("VACUUM docs")?;
    Ok(())
}

/// Whether `lsn` is the end of one of `req`'s records that is an XLOG `FPI_FOR_HINT` without a
/// full-page image (written so when `full_page_writes` is off). The primary stamps the page
/// with such a record's LSN (`MarkBufferDirtyHint`), while redo skips the record (`xlog_redo`:
/// "there is nothing to do here"), so a standby keeps the page's older LSN: the one place
/// where the compute's `pd_lsn` is not what redo gives, its contents equal once hint bits are
/// masked.
fn imageless_hint_record_ends_at(req: &RedoRequest, lsn: Lsn) -> bool {
    use sidecar::wal::consts::{RM_XLOG_ID, XLOG_FPI_FOR_HINT};
    req.records.iter().any(|r| match r {
        RedoRecord::Postgres { end_lsn, raw } if *end_lsn == lsn => {
            sidecar::wal::record::DecodedRecord::parse(lsn, lsn, raw.clone()).is_ok_and(|rec| {
                rec.header.rmid == RM_XLOG_ID
                    && rec.header.info & 0xF0 == XLOG_FPI_FOR_HINT
                    && rec.blocks.iter().all(|b| !b.has_image())
            })
        }
        _ => false,
    })
}

/// Which record of a failing request fails first (bisecting with shorter requests), to make a
/// failure report name the record to look at with pg_waldump.
fn first_failing_record(manager: &PostgresRedoManager, req: &RedoRequest) -> String {
    let (mut ok, mut bad) = (0, req.records.len());
    while bad - ok > 1 {
        let mid = (ok + bad) / 2;
        let shorter = RedoRequest { records: req.records[..mid].to_vec(), ..req.clone() };
        if manager.redo(shorter).is_ok() {
            ok = mid;
        } else {
            bad = mid;
        }
    }
    format!("#{} of {}, ending at {}", bad - 1, req.records.len(), req.records[bad - 1].lsn())
}

/// A compute that ran [`setup`], a CHECKPOINT (whose data files, copied to `snapshot`, are the
/// base images), [`workload_after_base`] and a second CHECKPOINT; `from..to` is the WAL between.
struct Scenario {
    c: Cluster,
    snapshot: std::path::PathBuf,
    /// A copy of the data files right after the second CHECKPOINT: the pages at `to`.
    end: std::path::PathBuf,
    from: Lsn,
    to: Lsn,
}

fn scenario(full_page_writes: &str, checksums: bool) -> Result<Scenario> {
    let mut builder = Cluster::builder()
        .gucs(&[("full_page_writes", full_page_writes), ("autovacuum", "off"), ("checkpoint_timeout", "1h")])
        .gucs(workload::MIXED_GUCS);
    if checksums {
        builder = builder.initdb_arg("--data-checksums");
    }
    let c = builder.start()?;
    setup(&c)?;
    c.execute("CHECKPOINT")?;
    let from = workload::insert_lsn(&c)?;
    let snapshot = copy_data_files(&c, "snapshot")?;
    workload_after_base(&c)?;
    c.execute("CHECKPOINT")?;
    let to = workload::flush_lsn(&c)?;
    // The files as of `to`: later queries (the test's own, of the catalogs) set hint bits,
    // which with checksums are logged and stamp the pages with LSNs past `to`.
    let end = copy_data_files(&c, "end")?;
    Ok(Scenario { c, snapshot, end, from, to })
}

fn rebuilt_pages_equal_disk(full_page_writes: &str, checksums: bool) -> Result<()> {
    let Scenario { c, snapshot, end, from, to } = scenario(full_page_writes, checksums)?;
    let rels = relations(&c)?;

    let reqs = block_requests(&snapshot, &rels, &c.wal_dir(), from, to)?;
    let mut types = std::collections::BTreeSet::new();
    for r in reqs.iter().flat_map(|r| &r.records) {
        if let RedoRecord::Postgres { raw, .. } = r {
            let (info, rmid) = (raw[16], raw[17]);
            let name = sidecar::wal::rmgr::record_type(rmid, info).unwrap_or("?");
            types.insert(format!("{}/{}", sidecar::wal::stats::rmgr_name(rmid), name));
        }
    }
    for needed in [
        "Heap/INSERT",
        "Heap/UPDATE",
        "Heap/HOT_UPDATE",
        "Heap/DELETE",
        "Heap/LOCK",
        "Heap2/PRUNE",
        "Heap2/VACUUM",
        "Heap2/VISIBLE",
        "Btree/INSERT_LEAF",
        "Btree/SPLIT_L",
        "Btree/NEWROOT",
        "Btree/DEDUP",
        "Btree/VACUUM",
        "Hash/INSERT",
        "Gin/INSERT",
        "Gist/PAGE_UPDATE",
        "SPGist/ADD_LEAF",
        "BRIN/INSERT",
        "Sequence/LOG",
    ] {
        assert!(types.contains(needed), "the workload replayed no {needed} record: {types:?}");
    }
    let mut cfg = redo_config(c.root_dir(), 2);
    // With checksums, redo of VISIBLE stamps the heap page's LSN; the template must match.
    cfg.data_checksums = checksums;
    let manager = PostgresRedoManager::new(cfg)?;
    let (mut exceptions, mut hint_lsn) = (Exceptions::default(), 0usize);
    let (mut compared, mut mismatches, mut from_nothing, mut native, mut kinds) =
        (0, Vec::new(), 0, 0, BTreeMap::new());
    for req in &reqs {
        let rel = &rels[&req.target.rel.node.relnode];
        // Blocks gone by the end (dropped, truncated) have nothing to compare with.
        let Some(disk) = read_block(&fork_path(&end, &rel.path, req.target.rel.fork), req.target.blkno) else {
            continue;
        };
        let page = match manager.redo(req.clone()) {
            Ok(page) => page,
            Err(e) => {
                let culprit = first_failing_record(&manager, req);
                return Err(e).with_context(|| {
                    format!("redo of {} ({}); first failing record: {culprit}", req.target, rel.name)
                });
            }
        };
        let kind = if req.target.rel.fork == ForkNumber::VisibilityMap {
            "VisibilityMap".to_string()
        } else {
            format!("{:?}", rel.kind)
        };
        let diff = compare_page(rel.kind, &req.target, &page[..], &disk);
        compared += 1;
        from_nothing += req.base.is_none() as usize;
        native += req.records.iter().any(|r| matches!(r, RedoRecord::Native { .. })) as usize;
        *kinds.entry(kind).or_insert(0) += 1;
        if let PageMatch::Exception(e) = diff {
            exceptions.count(e);
        }
        let disk_lsn = neon_types::page::page_lsn(&disk);
        // Only the LSN may differ there: the page with the disk's LSN must be equal.
        let equal_but_lsn = || {
            let mut relsn = page.to_vec();
            relsn[0..8].copy_from_slice(&disk[0..8]);
            compare_page(rel.kind, &req.target, &relsn, &disk) == PageMatch::Equal
        };
        if matches!(diff, PageMatch::Differs(at) if at < 8)
            && imageless_hint_record_ends_at(req, disk_lsn)
            && equal_but_lsn()
        {
            hint_lsn += 1;
        } else if let PageMatch::Differs(at) = diff {
            let lsns: Vec<String> = req.records.iter().map(|r| r.lsn().to_string()).collect();
            mismatches.push(format!(
                "{} ({}, records ending at {}): first difference at byte {at}; page LSN rebuilt {}, on disk {}",
                req.target,
                rel.name,
                lsns.join(", "),
                neon_types::page::page_lsn(&page[..]),
                neon_types::page::page_lsn(&disk)
            ));
        }
    }
    eprintln!(
        "full_page_writes={full_page_writes}, checksums={checksums}: {compared} pages compared ({from_nothing} rebuilt without a base image, \
         {native} with Rust-native records, exceptions {exceptions:?}, \
         {hint_lsn} stamped by a hint record without an image), by kind {kinds:?}"
    );
    // Hint records carry no image only without full-page writes, and are logged only with
    // checksums (or wal_log_hints).
    if full_page_writes == "on" || !checksums {
        assert_eq!(hint_lsn, 0, "pages stamped by an imageless hint record with full_page_writes={full_page_writes}");
    }
    assert!(
        mismatches.is_empty(),
        "{} of {compared} pages differ:\n{}",
        mismatches.len(),
        mismatches.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
    // No WAL_LOG database copy, no GiST sorted build, the sequence ends with setval (logged
    // as it is): no exception but, at most, the one SP-GiST index's metapage cache.
    Compared { exceptions, ..Compared::default() }
        .expect(Exceptions { spgist_meta_cache: 1, ..Exceptions::default() })?;
    assert!(native > 0, "no visibility-map page was rebuilt with Rust-native records");
    for kind in ["Heap", "Btree", "Hash", "Gin", "Gist", "SpGist", "Brin", "Sequence", "VisibilityMap"] {
        assert!(kinds.contains_key(kind), "no {kind} page was rebuilt: {kinds:?}");
    }
    assert!(from_nothing > 0, "no page was rebuilt from an initialising record alone");
    assert!(manager.stats().failures == 0);
    Ok(())
}

#[test]
fn rebuilt_pages_equal_the_computes_without_full_page_writes() -> Result<()> {
    rebuilt_pages_equal_disk("off", false)
}

#[test]
fn rebuilt_pages_equal_the_computes_with_data_checksums() -> Result<()> {
    rebuilt_pages_equal_disk("off", true)
}

#[test]
fn rebuilt_pages_equal_the_computes_with_full_page_writes() -> Result<()> {
    rebuilt_pages_equal_disk("on", false)
}

/// A small deterministic shuffle (xorshift), so a failure can be replayed.
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut x = seed | 1;
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    order
}

#[test]
fn no_state_leaks_between_requests() -> Result<()> {
    let Scenario { c, snapshot, from, to, .. } = scenario("off", false)?;
    let reqs = block_requests(&snapshot, &relations(&c)?, &c.wal_dir(), from, to)?;
    assert!(reqs.len() > 1000, "only {} requests", reqs.len());

    // The reference: every page once, in block order, through one process.
    let single = PostgresRedoManager::new(redo_config(&c.root_dir().join("single"), 1))?;
    let reference = reqs.iter().map(|r| single.redo(r.clone())).collect::<Result<Vec<_>, _>>()?;
    // The same pages in shuffled orders through the same process...
    for seed in [1, 2] {
        for i in shuffled(reqs.len(), seed) {
            let page = single.redo(reqs[i].clone())?;
            assert!(page == reference[i], "{} differs when rebuilt in shuffled order (seed {seed})", reqs[i].target);
        }
    }
    // ...and through a pool of two, from four client threads at once.
    let pool = PostgresRedoManager::new(redo_config(&c.root_dir().join("pool"), 2))?;
    for seed in [3, 4] {
        let order = shuffled(reqs.len(), seed);
        std::thread::scope(|s| {
            for part in order.chunks(order.len().div_ceil(4)) {
                let (pool, reqs, reference) = (&pool, &reqs, &reference);
                s.spawn(move || {
                    for &i in part {
                        let page = pool.redo(reqs[i].clone()).expect("redo through the pool");
                        assert!(page == reference[i], "{} differs through the pool (seed {seed})", reqs[i].target);
                    }
                });
            }
        });
    }
    let (s1, s2) = (single.stats(), pool.stats());
    eprintln!("{} pages × 3 passes through one process, × 2 through the pool: identical ({s1:?}, {s2:?})", reqs.len());
    assert_eq!((s1.failures, s2.failures), (0, 0));
    assert_eq!(s1.process_starts, 1, "the single process was restarted");
    assert_eq!(s2.process_starts, 2);
    Ok(())
}

#[test]
fn faults_fail_one_request_and_the_pool_recovers() -> Result<()> {
    use sidecar::walredo::process::{ProcessError, RedoProcess};
    use sidecar::walredo::scratch::ScratchTemplate;
    use sidecar::walredo::RedoError;

    let c = Cluster::builder().gucs(workload::MIXED_GUCS).start()?;
    let from = workload::insert_lsn(&c)?;
    c.execute("CREATE TABLE t (id int, v text); INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 200) g")?;
    let to = workload::flush_lsn(&c)?;
    let rels = relations(&c)?;
    let filenode: u32 = c.query_one_string("SELECT pg_relation_filenode('t')")?.parse()?;
    let empty = c.root_dir().join("nothing");
    let good = block_requests(&empty, &rels, &c.wal_dir(), from, to)?
        .into_iter()
        .find(|r| r.target.rel.node.relnode == filenode && r.target.blkno == 0 && r.target.rel.fork == ForkNumber::Main)
        .context("no request for t's first block")?;
    // A transaction commit record: real, valid, and not page-level.
    let mut commit = None;
    let mut reader = WalFileReader::new(SegmentSet::collect(&[c.wal_dir()], None)?, Some(from), Some(to))?;
    while let Some(rec) = reader.next_record()? {
        if rec.header.rmid == 1 {
            commit = Some(RedoRecord::Postgres { end_lsn: rec.end_lsn, raw: rec.raw.clone() });
        }
    }
    let commit = commit.context("no commit record")?;

    let manager = PostgresRedoManager::new(redo_config(c.root_dir(), 1))?;
    let expected = manager.redo(good.clone())?;
    let with = |records: Vec<RedoRecord>| RedoRequest { records, ..good.clone() };
    let garbage = RedoRecord::Postgres { end_lsn: Lsn(to.0 + 8), raw: Bytes::from(vec![0x55u8; 100]) };
    let mut cases: Vec<(&str, RedoRequest)> = vec![
        ("a garbage record", with([good.records.clone(), vec![garbage]].concat())),
        ("a record for a non-page rmgr", with([good.records.clone(), vec![commit]].concat())),
    ];
    // A record whose bytes were cut: its length no longer matches its header.
    if let RedoRecord::Postgres { end_lsn, raw } = &good.records[0] {
        let cut = RedoRecord::Postgres { end_lsn: *end_lsn, raw: raw.slice(..raw.len() - 7) };
        cases.push(("a truncated record", with(vec![cut])));
    }
    for (what, req) in cases {
        let err = manager.redo(req).expect_err(what);
        assert!(matches!(err, RedoError::Process { .. }), "{what}: {err}");
        eprintln!("{what}: {err}");
        assert!(manager.redo(good.clone())? == expected, "after {what}, the next request is wrong");
    }

    // The same page by hand, with the CLI.
    let out_file = c.root_dir().join("page.bin");
    let (start, end, rel) = (from.to_string(), to.to_string(), good.target.rel.node.to_string());
    let cli = |extra: &[&str]| -> Result<String> {
        let out = std::process::Command::new(neon_tests::sidecar_bin()?)
            .args(["redo", "--rel", &rel, "--blkno", "0", "--start", &start, "--end", &end])
            .args(extra)
            .arg(c.wal_dir())
            .output()?;
        anyhow::ensure!(out.status.success(), "neon-sidecar redo failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8(out.stdout)?)
    };
    cli(&["--out", out_file.to_str().unwrap()])?;
    assert!(std::fs::read(&out_file)? == expected.to_vec(), "the CLI rebuilt a different page");
    let described = cli(&[])?;
    assert!(described.contains("records applied; lsn"), "{described}");

    // kill -9 of the redo process mid-request: the process is stopped, a request is sent to
    // it, and it is killed while the request waits for its reply. That request fails; the next
    // one gets a new process.
    let pids = manager.process_ids();
    assert_eq!(pids.len(), 1);
    let pid = nix::unistd::Pid::from_raw(pids[0] as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP)?;
    let err = std::thread::scope(|s| {
        let in_flight = s.spawn(|| manager.redo(good.clone()));
        std::thread::sleep(std::time::Duration::from_millis(300));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill -9");
        in_flight.join().expect("request thread").expect_err("request to a killed process")
    });
    assert!(matches!(err, RedoError::Process { source: ProcessError::Died { .. }, .. }), "{err}");
    assert!(manager.redo(good.clone())? == expected);
    // A process that dies while idle is replaced before the next request, which succeeds.
    let idle = manager.process_ids()[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(idle as i32), nix::sys::signal::Signal::SIGKILL)?;
    assert!(neon_tests::wait_process_gone(idle as i32, std::time::Duration::from_secs(5)));
    assert!(manager.redo(good.clone())? == expected, "after an idle process died");
    let stats = manager.stats();
    assert_eq!((stats.failures, stats.process_starts), (4, 6), "{stats:?}");

    // A message cut short on the wire: the loop waits for the rest, the client times out.
    let mut cfg = redo_config(&c.root_dir().join("direct"), 1);
    cfg.request_timeout = std::time::Duration::from_secs(2);
    let template = ScratchTemplate::create(&cfg)?;
    let mut p = RedoProcess::start(&template.copy_for(0, &cfg)?, &cfg)?;
    let mut msg = Vec::new();
    neon_types::walredo::encode_begin(&mut msg, &good.target);
    msg.extend_from_slice(&[neon_types::walredo::TAG_APPLY, 0xE8, 0x03, 0, 0, 1, 2, 3]);
    let mut reply = [0u8; BLCKSZ];
    let err =
        p.exchange(&msg, &mut reply, std::time::Instant::now() + cfg.request_timeout).expect_err("truncated message");
    assert!(matches!(err, ProcessError::Timeout { .. }), "{err}");
    let direct_pid = p.pid();
    drop(p);
    template.remove();
    assert!(neon_tests::wait_process_gone(direct_pid as i32, std::time::Duration::from_secs(5)));

    // Dropping the manager stops its processes and removes its scratch directories.
    let (pids, root) = (manager.process_ids(), manager.scratch_root().to_path_buf());
    drop(manager);
    for pid in pids {
        assert!(
            neon_tests::wait_process_gone(pid as i32, std::time::Duration::from_secs(5)),
            "redo process {pid} left"
        );
    }
    assert!(!root.exists(), "{} left behind", root.display());
    Ok(())
}
