//! History in an object store (issue 16), against a real one: SeaweedFS's S3 gateway, and the
//! same through `file://` (a mounted share).

use anyhow::{Context, Result};
use bytes::Bytes;
use neon_tests::seaweed::SeaweedFs;
use neon_tests::sidecar::{cluster_born_with_store, SidecarProcess};
use neon_tests::snapshot::{self, Snapshot};
use neon_tests::workload;
use neon_types::protocol::{Request, Response};
use sidecar::remote::index::Index;
use sidecar::remote::storage::{ObjectStorage, RemoteStorage, RemoteUrl, S3Settings};
use sidecar::remote::upload::newest_index;
use sidecar::remote::Remote;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Sealed objects come back as put; one damaged in the store is an error naming it; a listing
/// is sorted and complete.
fn keeps_sealed_objects(remote: &Remote, damage: impl Fn(&str, Bytes) -> Result<()>) -> Result<()> {
    let store = remote.describe();
    let layers: Vec<(String, Vec<u8>)> =
        (0..5).map(|i| (format!("layers/delta-{i:04}"), vec![i as u8; 100_000 + i * 4097])).collect();
    for (name, body) in &layers {
        remote.put_object(name, body)?;
    }
    for (name, body) in &layers {
        anyhow::ensure!(remote.get_object(name)?[..] == body[..], "{store}: {name} came back different");
    }
    let listed = remote.list("layers")?;
    let names: Vec<&String> = layers.iter().map(|(n, _)| n).collect();
    anyhow::ensure!(listed.iter().collect::<Vec<_>>() == names, "{store}: listed {listed:?}");
    // Bit rot where the store keeps it: the same object, one bit flipped.
    let (victim, body) = &layers[3];
    let mut sealed = sidecar::remote::object::seal(body).to_vec();
    sealed[50_000] ^= 0x04;
    damage(victim, Bytes::from(sealed))?;
    let e = remote.get_object(victim).expect_err("a damaged object was served").to_string();
    anyhow::ensure!(
        e.contains(&format!("remote store {store}: object {victim} is damaged")) && e.contains("CRC32C"),
        "the error for a damaged object: {e}"
    );
    // Gone is gone, twice over; the others stay.
    remote.delete(victim)?;
    remote.delete(victim)?;
    anyhow::ensure!(remote.list("layers")?.len() == 4, "{store}: delete left {:?}", remote.list("layers")?);
    let e = remote.get_object(victim).expect_err("a deleted object was served").to_string();
    anyhow::ensure!(e.contains(&format!("object {victim} does not exist")), "{e}");
    Ok(())
}

#[test]
fn objects_in_seaweedfs_and_in_files_come_back_as_put_or_not_at_all() -> Result<()> {
    let dir = tempfile::Builder::new().prefix("neon-remote-").tempdir_in("/tmp")?;
    let mut weed = SeaweedFs::start(&dir.path().join("seaweedfs"))?;
    let storage: Arc<dyn RemoteStorage> = Arc::new(weed.storage_at("objects")?);
    let remote = Remote::new(storage.clone());
    anyhow::ensure!(remote.describe() == weed.url("objects"), "described as {}", remote.describe());
    keeps_sealed_objects(&remote, |name, b| Ok(storage.put(name, b)?))?;

    let files = dir.path().join("share");
    let url = RemoteUrl::File { dir: files.clone() };
    let remote_files = Remote::new(Arc::new(ObjectStorage::open(&url, &S3Settings::default())?));
    keeps_sealed_objects(&remote_files, |name, b| Ok(std::fs::write(files.join(name), b)?))?;

    // Wrong keys: refused, and neither the right nor the wrong secret is in the message.
    let wrong_secret = "0123456789abcdef-not-the-secret";
    let settings = S3Settings {
        endpoint: Some(weed.endpoint()),
        region: Some("us-east-1".into()),
        path_style: true,
        keys: Some((weed.env()[0].1.clone(), wrong_secret.into())),
    };
    let wrong = ObjectStorage::open(&weed.url("objects").parse()?, &settings)?;
    let e = wrong.put("layers/x", Bytes::from_static(b"x")).expect_err("wrong keys were taken").to_string();
    anyhow::ensure!(e.contains("upload of object layers/x failed"), "{e}");
    for secret in weed.secrets().iter().chain([&wrong_secret]) {
        anyhow::ensure!(!e.contains(secret), "a credential in the message: {e}");
    }

    // The store down: a request fails in bounded time, naming the object; started again, it
    // serves what it had.
    weed.stop()?;
    let t = Instant::now();
    let e = remote.put_object("layers/during-outage", b"x").expect_err("the store is down").to_string();
    anyhow::ensure!(t.elapsed() < Duration::from_secs(60), "a request to a store that is down took {:?}", t.elapsed());
    anyhow::ensure!(e.contains("upload of object layers/during-outage failed"), "{e}");
    weed.start_again()?;
    remote.put_object("layers/during-outage", b"x").context("after the outage")?;
    anyhow::ensure!(remote.list("layers")?.len() == 5, "after the outage: {:?}", remote.list("layers")?);
    Ok(())
}

/// Polls the newest index on `remote` until it holds history up to `lsn`.
fn wait_remote_durable(remote: &Remote, lsn: neon_types::Lsn, sidecar: &SidecarProcess) -> Result<(String, Index)> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some((name, index)) = newest_index(remote)? {
            if index.durable >= lsn {
                return Ok((name, index));
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the remote store never held history up to {lsn}; the sidecar's log:\n{}",
            neon_tests::tail_lines(&sidecar.log_text(), 30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every object the index names is there, whole; those of layer files the store still has
/// locally are those files' bytes; every layer file the manifest in it names has one.
fn index_matches_store(remote: &Remote, (name, index): &(String, Index), store: &std::path::Path) -> Result<usize> {
    let mut compared = 0;
    for t in &index.timelines {
        let dir = store.join(format!("timelines/{:08X}", t.id));
        for (layer, stub) in &t.files {
            let object = &stub.object;
            let body = remote.get_object(object).with_context(|| format!("{name} names {object}"))?;
            if let Ok(local) = std::fs::read(dir.join(layer)) {
                anyhow::ensure!(body[..] == local[..], "{object} differs from {layer}");
                compared += 1;
            }
        }
    }
    // The manifest in the index names only files the index has objects of.
    let indexed = index.timeline(1).context("timeline 1 not in the index")?;
    let (names, _) = sidecar::repo::timeline::manifest_layers(std::path::Path::new(name), &indexed.manifest)?;
    anyhow::ensure!(!names.is_empty(), "{name}: a manifest of no layer files");
    for n in &names {
        anyhow::ensure!(
            indexed.files.iter().any(|(l, _)| l == n),
            "{n} is in the manifest of {name}, not in its files"
        );
    }
    Ok(compared)
}

/// Waits (up to a minute) until every object under `timelines/` is named by one of the two
/// newest indexes and at most two indexes are left (the grace period being short).
fn expect_no_garbage(remote: &Remote) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let indexes = remote.list("index")?;
        let mut named = std::collections::BTreeSet::new();
        for name in indexes.iter().rev().take(2) {
            let index = Index::decode(&remote.get_object(name)?).map_err(anyhow::Error::msg)?;
            named.extend(index.objects());
        }
        let stray: Vec<String> = remote.list("timelines")?.into_iter().filter(|o| !named.contains(o)).collect();
        if stray.is_empty() && indexes.len() <= 2 {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "garbage stays in the remote store: {} indexes, objects no index names: {stray:?}",
            indexes.len()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn a_sidecar_keeps_its_layer_files_in_seaweedfs_resumes_after_kill_9_and_yields_to_a_newer_one() -> Result<()> {
    let (c, store) = cluster_born_with_store()?;
    let mut weed = SeaweedFs::start(&c.root_dir().join("seaweedfs"))?;
    let url = weed.url("cluster-a");
    let mut flags: Vec<String> = ["--remote", &url, "--remote-upload-ms", "200", "--remote-grace-ms", "1000"]
        .into_iter()
        .map(String::from)
        .collect();
    flags.extend(weed.flags());
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let sidecar = SidecarProcess::start_for_compute_with_env(&c, &store, &args, &weed.env())?;
    let remote = Remote::new(Arc::new(weed.storage_at("cluster-a")?));

    c.pgbench(&["-i", "-q", "-s", "2"])?;
    c.pgbench(&["-n", "-c", "2", "-j", "2", "-T", "3"])?;
    c.execute("CHECKPOINT")?;
    let target = workload::flush_lsn(&c)?;
    sidecar.wait_durable(target)?;
    let index = wait_remote_durable(&remote, target, &sidecar)?;
    let compared = index_matches_store(&remote, &index, &store)?;
    anyhow::ensure!(compared > 0, "no layer file compared with its object");
    eprintln!("{}: up to {}, {compared} layer files as on disk", index.0, index.1.durable);

    // No credential in its log or its command line.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", sidecar.pid().context("pid")?))?;
    for secret in weed.secrets() {
        anyhow::ensure!(!sidecar.log_text().contains(secret), "a credential in the sidecar's log");
        anyhow::ensure!(!String::from_utf8_lossy(&cmdline).contains(secret), "a credential on its command line");
    }

    // Killed while it uploads: started again (a new generation), it resumes, and the index
    // names only objects that are there.
    c.pgbench(&["-n", "-c", "2", "-j", "2", "-T", "2"])?;
    sidecar.kill9()?;
    let sidecar = SidecarProcess::restart_for_compute_with_env(&c, &store, &args, &weed.env())?;
    c.pgbench(&["-n", "-c", "2", "-j", "2", "-t", "100"])?;
    let target = workload::flush_lsn(&c)?;
    sidecar.wait_durable(target)?;
    let index = wait_remote_durable(&remote, target, &sidecar)?;
    anyhow::ensure!(index.1.generation == 2, "after a restart the index is of generation {}", index.1.generation);
    index_matches_store(&remote, &index, &store)?;

    // The object store down for 30 s: ingest goes on locally — a sidecar started meanwhile
    // too — and the uploads resume after (its generation claimed then).
    weed.stop()?;
    let down = Instant::now();
    c.pgbench(&["-n", "-c", "2", "-j", "2", "-t", "200"])?;
    let target = workload::flush_lsn(&c)?;
    sidecar.wait_durable(target)?;
    sidecar.stop()?;
    let mut sidecar = SidecarProcess::restart_for_compute_with_env(&c, &store, &args, &weed.env())?;
    c.pgbench(&["-n", "-c", "2", "-j", "2", "-t", "100"])?;
    let target = workload::flush_lsn(&c)?;
    sidecar.wait_durable(target)?;
    anyhow::ensure!(sidecar.status("remote_generation")? == "0", "a generation claimed with the store down");
    std::thread::sleep(Duration::from_secs(30).saturating_sub(down.elapsed()));
    weed.start_again()?;
    let index = wait_remote_durable(&remote, target, &sidecar)?;
    index_matches_store(&remote, &index, &store)?;
    anyhow::ensure!(index.1.generation == 3, "after the outage the index is of generation {}", index.1.generation);
    anyhow::ensure!(sidecar.log_text().contains("trying again in"), "the outage went unreported");

    // Garbage goes: what the kill orphaned, layer files merged away, older indexes — every
    // object left is named by one of the two newest indexes.
    expect_no_garbage(&remote)?;

    // A newer writer on the same prefix: this one stops, saying so.
    let other_store = tempfile::tempdir()?;
    std::fs::create_dir_all(other_store.path().join("timelines"))?;
    // The same cluster's (a prefix of another cluster's history is refused).
    std::fs::copy(store.join("identity"), other_store.path().join("identity"))?;
    let newer = sidecar::remote::upload::Uploader::start(remote.clone(), other_store.path())?;
    c.pgbench(&["-n", "-c", "1", "-j", "1", "-t", "50"])?;
    let exited = sidecar.wait_exit(Duration::from_secs(60))?;
    anyhow::ensure!(exited.is_some(), "the older sidecar goes on after generation {} took over", newer.generation());
    let log = sidecar.log_text();
    anyhow::ensure!(
        log.contains(&format!(
            "generation {} (another neon-sidecar, started later on the same prefix)",
            newer.generation()
        )),
        "the older sidecar's last words: {}",
        neon_tests::tail_lines(&log, 10)
    );
    Ok(())
}

/// Where a test's history goes: SeaweedFS's S3 gateway, or a directory (`file://`, as a
/// mounted share would be).
enum Backend {
    Seaweed(SeaweedFs),
    Files(std::path::PathBuf),
}

impl Backend {
    fn url(&self) -> String {
        match self {
            Backend::Seaweed(w) => w.url("history"),
            Backend::Files(dir) => format!("file://{}", dir.display()),
        }
    }

    /// `--remote` and what goes with it, for `run` and `attach-remote`.
    fn flags(&self) -> Vec<String> {
        let mut f = vec!["--remote".to_string(), self.url()];
        if let Backend::Seaweed(w) = self {
            f.extend(w.flags());
        }
        f
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        match self {
            Backend::Seaweed(w) => w.env(),
            Backend::Files(_) => Vec::new(),
        }
    }

    /// Takes the store out of reach (SeaweedFS stopped; the share's directory closed to the
    /// sidecar's OS user) or back.
    fn set_down(&mut self, down: bool) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        match (self, down) {
            (Backend::Seaweed(w), true) => w.stop(),
            (Backend::Seaweed(w), false) => w.start_again(),
            (Backend::Files(dir), down) => {
                Ok(std::fs::set_permissions(dir, std::fs::Permissions::from_mode(if down { 0 } else { 0o700 }))?)
            }
        }
    }

    /// A client of ours on the same objects.
    fn storage(&self) -> Result<Arc<dyn RemoteStorage>> {
        Ok(match self {
            Backend::Seaweed(w) => Arc::new(w.storage_at("history")?),
            Backend::Files(dir) => {
                Arc::new(ObjectStorage::open(&RemoteUrl::File { dir: dir.clone() }, &S3Settings::default())?)
            }
        })
    }
}

/// Polls the sidecar's status until `ok` holds of the value `name`.
fn wait_status(s: &SidecarProcess, name: &str, what: &str, ok: impl Fn(&str) -> bool) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let v = s.status(name)?;
        if ok(&v) {
            return Ok(v);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{what}: {name} is still {v}; the sidecar's log:\n{}",
            neon_tests::tail_lines(&s.log_text(), 30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn status_u64(s: &SidecarProcess, name: &str) -> Result<u64> {
    Ok(s.status(name)?.parse()?)
}

/// How far the sidecar's (physical) slot lets go of WAL.
fn slot_restart(c: &neon_tests::Cluster) -> Result<neon_types::Lsn> {
    Ok(c.query_one_string("SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = 'neon_sidecar'")?.parse()?)
}

/// Block 0 of `pgbench_accounts` at `lsn`, as the sidecar answers.
fn accounts_page(c: &neon_tests::Cluster, s: &SidecarProcess, lsn: neon_types::Lsn) -> Result<Response> {
    let node = workload::pgbench_accounts_file(c)?;
    let tag = neon_types::BufferTag { rel: neon_types::RelTag { node, fork: neon_types::ForkNumber::Main }, blkno: 0 };
    Ok(s.client()?.request(&Request::GetPage { tag, lsn, wait_ms: 10_000 })?)
}

/// Issue 16's main path on `backend`: history kept in the remote store with a local cache far
/// smaller than it, every page as the compute had it at three LSNs; then the local store
/// deleted and set up again on a fresh directory from the remote alone — damaged objects are
/// refused by name, the same pages, a base backup that boots and dumps as recorded, and
/// following the compute resumed.
fn history_lives_in_the_remote_store(backend: &mut Backend) -> Result<()> {
    let (c, store) = cluster_born_with_store()?;
    let mut run_flags = backend.flags();
    for f in ["--remote-upload-ms", "300", "--local-cache-mb", "1", "--durability", "remote"] {
        run_flags.push(f.to_string());
    }
    let run_args: Vec<&str> = run_flags.iter().map(String::as_str).collect();
    let env = backend.env();
    let sidecar = SidecarProcess::start_for_compute_with_env(&c, &store, &run_args, &env)?;

    c.pgbench(&["-i", "-q", "-s", "2"])?;
    let first = Snapshot::take(&c, "first")?;
    c.pgbench(&["-n", "-c", "2", "-j", "2", "-T", "3"])?;
    let second = Snapshot::take(&c, "second")?;
    let dumps = workload::dump_all(&c)?;
    c.pgbench(&["-n", "-c", "2", "-j", "2", "-T", "3"])?;
    let now = Snapshot::take(&c, "now")?;
    sidecar.wait_durable(now.lsn)?;
    wait_status(&sidecar, "remote_durable_lsn", "uploads", |v| v.parse().is_ok_and(|l: neon_types::Lsn| l >= now.lsn))?;

    // Most of the history evicted from local disk (files read lately stay a while).
    let layer_bytes = status_u64(&sidecar, "layer_bytes")?;
    wait_status(&sidecar, "local_layer_bytes", "eviction", |v| v.parse().is_ok_and(|n: u64| n * 4 <= layer_bytes))?;
    eprintln!(
        "{} layer files ({layer_bytes} bytes), {} of them ({} bytes) on local disk",
        sidecar.status("layer_files")?,
        sidecar.status("local_layer_files")?,
        sidecar.status("local_layer_bytes")?
    );
    for snap in [&first, &second, &now] {
        let n = snapshot::compare(&sidecar, snap, 0)?;
        eprintln!("{n:?} equal the compute's at {}", snap.lsn);
    }
    let fetched = status_u64(&sidecar, "remote_fetched_files")? + status_u64(&sidecar, "remote_range_reads")?;
    anyhow::ensure!(fetched > 0, "every page was read with nothing read from the remote store");
    anyhow::ensure!(status_u64(&sidecar, "remote_fetch_errors")? == 0, "fetch errors with a healthy store");

    // The remote store out of reach: ingest goes on locally, and with `--durability remote`
    // the compute's slot keeps the WAL the remote store does not hold yet.
    backend.set_down(true)?;
    c.pgbench(&["-n", "-c", "2", "-j", "2", "-t", "200"])?;
    let target = workload::flush_lsn(&c)?;
    sidecar.wait_durable(target)?;
    wait_status(&sidecar, "remote_error", "the outage", |v| !v.is_empty())?;
    let (held, remote_durable) = (slot_restart(&c)?, status_lsn(&sidecar, "remote_durable_lsn")?);
    anyhow::ensure!(
        remote_durable < target && held <= remote_durable,
        "during the outage: slot at {held}, remote durable {remote_durable}, local durable {target}"
    );
    backend.set_down(false)?;
    wait_status(&sidecar, "remote_durable_lsn", "uploads after the outage", |v| {
        v.parse().is_ok_and(|l: neon_types::Lsn| l >= target)
    })?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while slot_restart(&c)? <= held {
        anyhow::ensure!(Instant::now() < deadline, "the slot still holds WAL from {held} after the outage");
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_status(&sidecar, "remote_error", "the error after the outage", str::is_empty)?;

    if let Backend::Seaweed(_) = backend {
        // No credential in the log or on the command line.
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", sidecar.pid().context("pid")?))?;
        for (_, secret) in env.iter().filter(|(k, _)| k.contains("KEY")) {
            anyhow::ensure!(!sidecar.log_text().contains(secret.as_str()), "a credential in the sidecar's log");
            anyhow::ensure!(!String::from_utf8_lossy(&cmdline).contains(secret.as_str()), "a credential in argv");
        }
    }

    // This machine is lost: the store is gone, and a new one is set up from the remote.
    sidecar.kill9()?;
    std::fs::remove_dir_all(&store)?;
    let store2 = c.root_dir().join("store2");
    std::fs::create_dir(&store2)?;
    std::fs::set_permissions(&store2, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    neon_tests::chown_to_server_user(&store2)?;
    let flags = backend.flags();
    let attach: Vec<&str> = ["attach-remote", "--store", store2.to_str().context("UTF-8")?]
        .into_iter()
        .chain(flags.iter().map(String::as_str))
        .collect();
    let said = neon_tests::sidecar::sidecar_cli_as_server_user(&c, &attach, &env)?;
    eprintln!("{said}");
    anyhow::ensure!(said.contains("history up to"), "attach-remote said: {said}");

    // Every layer object damaged in the store (a bit flipped in every 8 bytes, so that
    // whatever part of it a read takes is damaged — an index block, a value, the footer, the
    // whole object): a read is refused naming the object; never a page.
    let storage = backend.storage()?;
    let remote = Remote::new(storage.clone());
    let (index_name, index) = newest_index(&remote)?.context("no index in the remote store")?;
    let mut originals = Vec::new();
    for t in &index.timelines {
        for (_, stub) in &t.files {
            let body = storage.get(&stub.object)?;
            let mut bad = body.to_vec();
            for at in (3..body.len()).step_by(8) {
                bad[at] ^= 0x10;
            }
            storage.put(&stub.object, Bytes::from(bad))?;
            originals.push((stub.object.clone(), body));
        }
    }
    anyhow::ensure!(!originals.is_empty(), "{index_name} names no layer file");
    let sidecar = SidecarProcess::start_for_compute_with_env(&c, &store2, &run_args, &env)?;
    match accounts_page(&c, &sidecar, second.lsn)? {
        Response::Error { message, .. } => anyhow::ensure!(
            message.contains("is damaged") && originals.iter().any(|(o, _)| message.contains(o.as_str())),
            "the error for a damaged layer object: {message}"
        ),
        r => anyhow::bail!("a page was served from damaged objects: {r:?}"),
    }
    anyhow::ensure!(status_u64(&sidecar, "remote_fetch_errors")? > 0, "the damage was not counted");
    // Whole objects, each of another layer file (swapped in the store): refused as well.
    for (i, (object, _)) in originals.iter().enumerate() {
        storage.put(object, originals[(i + 1) % originals.len()].1.clone())?;
    }
    match accounts_page(&c, &sidecar, second.lsn)? {
        Response::Error { message, .. } => {
            anyhow::ensure!(message.contains("as another file"), "the error for a swapped layer object: {message}")
        }
        r => anyhow::bail!("a page was served from swapped objects: {r:?}"),
    }
    for (object, body) in originals {
        storage.put(&object, body)?;
    }

    // Whole again: the same pages, and a base backup of the past that boots and dumps as recorded.
    for snap in [&first, &second, &now] {
        let n = snapshot::compare(&sidecar, snap, 0)?;
        eprintln!("after attach-remote: {n:?} equal the compute's at {}", snap.lsn);
    }
    let Response::Basebackup { path, .. } =
        sidecar.ask(&Request::Basebackup { lsn: second.lsn, full: true, new_timeline: false, wait_ms: 30_000 })?
    else {
        anyhow::bail!("no base backup")
    };
    let booted = neon_tests::sidecar::boot_basebackup(std::path::Path::new(&path))?;
    workload::expect_dumps_equal(c.root_dir(), second.lsn, &dumps, &workload::dump_all(&booted)?)?;
    drop(booted);

    // Following the compute resumed where the remote store's history ended.
    c.pgbench(&["-n", "-c", "2", "-j", "2", "-t", "100"])?;
    let target = workload::flush_lsn(&c)?;
    sidecar.wait_durable(target)?;
    wait_status(&sidecar, "remote_durable_lsn", "uploads after attach", |v| {
        v.parse().is_ok_and(|l: neon_types::Lsn| l >= target)
    })?;
    sidecar.stop()?;
    Ok(())
}

fn status_lsn(s: &SidecarProcess, name: &str) -> Result<neon_types::Lsn> {
    Ok(s.status(name)?.parse()?)
}

#[test]
fn history_in_seaweedfs_serves_every_page_with_a_small_cache_and_after_attach_remote_elsewhere() -> Result<()> {
    let dir = tempfile::Builder::new().prefix("neon-remote-").tempdir_in("/tmp")?;
    let weed = SeaweedFs::start(&dir.path().join("seaweedfs"))?;
    history_lives_in_the_remote_store(&mut Backend::Seaweed(weed))
}

#[test]
fn history_in_a_file_share_serves_every_page_with_a_small_cache_and_after_attach_remote_elsewhere() -> Result<()> {
    let dir = tempfile::Builder::new().prefix("neon-remote-").tempdir_in("/tmp")?;
    let share = dir.path().join("share");
    std::fs::create_dir(&share)?;
    neon_tests::chown_to_server_user(&share)?;
    neon_tests::chown_to_server_user(dir.path())?;
    history_lives_in_the_remote_store(&mut Backend::Files(share))
}
