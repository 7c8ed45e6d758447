//! A real object store for tests: SeaweedFS (master, volume server, filer and S3 gateway in
//! one `weed server` process), its `weed` binary fetched by `scripts/install-deps.sh` into
//! `.tools/`. Each instance keeps its data in its own directory, listens on 127.0.0.1 on free
//! ports, and has S3 credentials of its own, made up at start, which reach the sidecar only
//! through the environment ([`SeaweedFs::env`]). It is stopped by PID when dropped; it can be
//! stopped and started again on the same data and ports (an outage).

use anyhow::{bail, Context, Result};
use sidecar::remote::storage::RemoteStorage;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The version `scripts/install-deps.sh` installs.
const VERSION: &str = "4.48";
const BUCKET: &str = "neon-history";

/// The `weed` binary.
pub fn weed_bin() -> Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("the workspace")?;
    let bin = root.join(format!(".tools/seaweedfs-{VERSION}/weed"));
    anyhow::ensure!(
        bin.exists(),
        "{} is missing: the object-storage tests need SeaweedFS; `bash scripts/install-deps.sh` (which `make test` \
         runs) fetches it",
        bin.display()
    );
    Ok(bin)
}

pub struct SeaweedFs {
    dir: PathBuf,
    ports: Ports,
    access_key: String,
    secret_key: String,
    child: Option<Child>,
}

#[derive(Clone, Copy)]
struct Ports {
    master: u16,
    volume: u16,
    filer: u16,
    s3: u16,
}

/// A TCP port on 127.0.0.1, and the one 10000 above it (SeaweedFS's gRPC port beside an HTTP
/// one), both free a moment ago. Both lie below the kernel's ephemeral range (32768 and up by
/// default), so no outgoing connection takes one between this check and the server's bind;
/// and none is handed out twice by this process.
fn free_port_pair() -> Result<u16> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    let mut b = [0u8; 2];
    for _ in 0..1000 {
        use std::io::Read;
        std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
        let port = 20000 + u16::from_le_bytes(b) % 2700;
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if !given.contains(&port) && free(port) && free(port + 10000) {
            given.push(port);
            return Ok(port);
        }
    }
    bail!("no free pair of ports on 127.0.0.1 between 20000 and 32700")
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut b = vec![0u8; bytes];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

impl SeaweedFs {
    /// Starts a store keeping its data under `dir` (made if missing), ready for S3 requests.
    pub fn start(dir: &Path) -> Result<SeaweedFs> {
        std::fs::create_dir_all(dir.join("data"))?;
        let ports = Ports {
            master: free_port_pair()?,
            volume: free_port_pair()?,
            filer: free_port_pair()?,
            s3: free_port_pair()?,
        };
        let mut s = SeaweedFs {
            dir: dir.to_path_buf(),
            ports,
            access_key: format!("neon{}", random_hex(8)?),
            secret_key: random_hex(20)?,
            child: None,
        };
        // Identities of the S3 gateway: ours, with every right (it makes the bucket on first use).
        let config = format!(
            r#"{{"identities":[{{"name":"neon","credentials":[{{"accessKey":"{}","secretKey":"{}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#,
            s.access_key, s.secret_key
        );
        let config_path = dir.join("s3.json");
        std::fs::write(&config_path, config)?;
        s.start_again()?;
        Ok(s)
    }

    /// Starts the stopped store again, on the same data and ports; waits until it serves.
    pub fn start_again(&mut self) -> Result<()> {
        anyhow::ensure!(self.child.is_none(), "SeaweedFS in {} is running", self.dir.display());
        let p = self.ports;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("weed.log"))?;
        // Its glog files go beside its data, not into /tmp (where they would outlive the test).
        let logs = self.dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let child = Command::new(weed_bin()?)
            .arg(format!("-logdir={}", logs.display()))
            .arg("server")
            .arg(format!("-dir={}", self.dir.join("data").display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false", "-s3"])
            .arg(format!("-master.port={}", p.master))
            .arg(format!("-master.port.grpc={}", p.master + 10000))
            .arg(format!("-volume.port={}", p.volume))
            .arg(format!("-volume.port.grpc={}", p.volume + 10000))
            .arg(format!("-filer.port={}", p.filer))
            .arg(format!("-filer.port.grpc={}", p.filer + 10000))
            .arg(format!("-filer.localSocket={}", self.dir.join("filer.sock").display()))
            .arg(format!("-s3.port={}", p.s3))
            .arg(format!("-s3.port.grpc={}", p.s3 + 10000))
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.max=0", "-master.volumeSizeLimitMB=256"])
            .arg(format!("-s3.config={}", self.dir.join("s3.json").display()))
            .arg(format!("-s3.localSocket={}", self.dir.join("s3.sock").display()))
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting weed server")?;
        self.child = Some(child);
        self.wait_ready()
    }

    /// Until an object can be put and read back (the volume server has registered).
    fn wait_ready(&mut self) -> Result<()> {
        let storage = self.storage()?;
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let probe = bytes::Bytes::from_static(b"ready");
            let answered = storage.put("probe/ready", probe.clone()).and_then(|()| storage.get("probe/ready"));
            match answered {
                Ok(b) if b == probe => return Ok(()),
                _ if Instant::now() > deadline => bail!("SeaweedFS never served S3 requests: {}", self.log_tail()),
                _ => {}
            }
            if let Some(status) = self.child.as_mut().context("not running")?.try_wait()? {
                self.child = None;
                bail!("weed server exited with {status}: {}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Stops the store (an outage: its data stays).
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            while child.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    child.kill()?;
                    child.wait()?;
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // The gRPC sockets it makes in /tmp whatever it is told (no option moves them); also
        // when it had exited by itself.
        let p = self.ports;
        for (what, port) in [("master", p.master), ("volume", p.volume), ("filer", p.filer), ("s3", p.s3)] {
            let _ = std::fs::remove_file(format!("/tmp/seaweedfs-{what}-grpc-{}.sock", port + 10000));
        }
        Ok(())
    }

    /// `http://127.0.0.1:PORT` of the S3 gateway.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.s3)
    }

    /// The `--remote` URL of a prefix in its bucket.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{prefix}")
    }

    /// The environment that gives a client its credentials (and region).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
            ("AWS_DEFAULT_REGION", "us-east-1".to_string()),
        ]
    }

    /// What must never appear in a log line, a message or a process title.
    pub fn secrets(&self) -> [&str; 2] {
        [&self.access_key, &self.secret_key]
    }

    /// The sidecar's flags for it (besides `--remote`).
    pub fn flags(&self) -> Vec<String> {
        vec!["--remote-endpoint".into(), self.endpoint(), "--remote-path-style".into()]
    }

    /// A client of ours on `prefix` of its bucket, with its credentials.
    pub fn storage_at(&self, prefix: &str) -> Result<sidecar::remote::storage::ObjectStorage> {
        use sidecar::remote::storage::{ObjectStorage, S3Settings};
        let settings = S3Settings {
            endpoint: Some(self.endpoint()),
            region: Some("us-east-1".into()),
            path_style: true,
            keys: Some((self.access_key.clone(), self.secret_key.clone())),
        };
        Ok(ObjectStorage::open(&self.url(prefix).parse()?, &settings)?)
    }

    fn storage(&self) -> Result<sidecar::remote::storage::ObjectStorage> {
        self.storage_at("neon-test")
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("weed.log")).unwrap_or_default();
        crate::tail_lines(&log, 20)
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
