//! History in an object store (issue 16), against a real one: SeaweedFS's S3 gateway, and the
//! same through `file://` (a mounted share).

use anyhow::{Context, Result};
use bytes::Bytes;
use neon_tests::seaweed::SeaweedFs;
use sidecar::remote::storage::{ObjectStorage, RemoteStorage, RemoteUrl, S3Settings};
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
