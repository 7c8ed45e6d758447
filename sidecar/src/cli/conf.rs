//! What `init` and `attach` leave in the store for `run`: where the compute is and where the
//! sidecar serves, so that `neon-sidecar run --store S` needs nothing else (each can still be
//! given on the command line, which wins).
//!
//! ```text
//! <store>/sidecar.conf: "name = value" lines, any of
//!   pgdata = <dir>       a local compute: its socket directory and port come from its
//!                        postmaster.pid when the sidecar starts
//!   host = <dir|name>    a compute reached by socket directory or host name (attach)
//!   port = <n>
//!   user = <role>        a role with REPLICATION
//!   slot = <name>        the replication slot the sidecar owns
//!   socket = <path>      the page service's socket (the compute's neon.sidecar_socket)
//!   shared_dir = <dir>   the directory shared with the compute (its neon.shared_dir)
//! ```

use anyhow::{bail, Context};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const FILE: &str = "sidecar.conf";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SidecarConf {
    pub pgdata: Option<PathBuf>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
    pub slot: Option<String>,
    pub socket: Option<PathBuf>,
    pub shared_dir: Option<PathBuf>,
}

impl SidecarConf {
    /// The store's file (empty if it has none).
    pub fn read(store: &Path) -> anyhow::Result<SidecarConf> {
        let path = store.join(FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(SidecarConf::default()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let mut values: BTreeMap<&str, &str> = BTreeMap::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let Some((name, value)) = line.split_once('=') else { bail!("{}: bad line {line:?}", path.display()) };
            values.insert(name.trim(), value.trim());
        }
        let port = match values.get("port") {
            Some(p) => Some(p.parse().with_context(|| format!("{}: port {p:?}", path.display()))?),
            None => None,
        };
        Ok(SidecarConf {
            pgdata: values.get("pgdata").map(PathBuf::from),
            host: values.get("host").map(|s| s.to_string()),
            port,
            user: values.get("user").map(|s| s.to_string()),
            slot: values.get("slot").map(|s| s.to_string()),
            socket: values.get("socket").map(PathBuf::from),
            shared_dir: values.get("shared_dir").map(PathBuf::from),
        })
    }

    /// Writes it into the store (private, replacing the old one whole).
    pub fn write(&self, store: &Path) -> anyhow::Result<()> {
        let mut text = String::from("# written by neon-sidecar init/attach: what `neon-sidecar run` uses by default\n");
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        for (name, value) in [
            ("pgdata", path(&self.pgdata)),
            ("host", self.host.clone()),
            ("port", self.port.map(|p| p.to_string())),
            ("user", self.user.clone()),
            ("slot", self.slot.clone()),
            ("socket", path(&self.socket)),
            ("shared_dir", path(&self.shared_dir)),
        ] {
            if let Some(v) = value {
                text.push_str(&format!("{name} = {v}\n"));
            }
        }
        crate::repo::timeline::write_durably(&store.join("sidecar.conf.tmp"), &store.join(FILE), text.as_bytes())
            .with_context(|| format!("writing {}", store.join(FILE).display()))
    }
}

/// A running server's socket directory and port, from its `postmaster.pid` (lines 4 and 5).
pub fn local_compute(pgdata: &Path) -> anyhow::Result<(String, u16)> {
    let pid = pgdata.join("postmaster.pid");
    let text = std::fs::read_to_string(&pid).with_context(|| {
        format!(
            "the compute at {} is not running (no {}): start it, or give --host and --port",
            pgdata.display(),
            pid.display()
        )
    })?;
    let lines: Vec<&str> = text.lines().collect();
    let port = lines.get(3).and_then(|p| p.trim().parse().ok());
    let dir = lines.get(4).map(|d| d.trim()).filter(|d| !d.is_empty());
    match (dir, port) {
        (Some(dir), Some(port)) => Ok((dir.to_string(), port)),
        _ => bail!("{}: no socket directory and port in it (the compute listens on no unix socket?)", pid.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(SidecarConf::read(dir.path()).unwrap(), SidecarConf::default());
        let conf = SidecarConf {
            pgdata: Some("/var/lib/neon/pgdata".into()),
            port: Some(5433),
            slot: Some("neon_sidecar".into()),
            socket: Some("/var/lib/neon/run/sidecar.sock".into()),
            ..SidecarConf::default()
        };
        conf.write(dir.path()).unwrap();
        assert_eq!(SidecarConf::read(dir.path()).unwrap(), conf);
        std::fs::write(dir.path().join(FILE), "port = x\n").unwrap();
        assert!(SidecarConf::read(dir.path()).is_err());
    }

    #[test]
    fn a_local_compute_is_found_by_its_pid_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(local_compute(dir.path()).unwrap_err().to_string().contains("not running"));
        std::fs::write(dir.path().join("postmaster.pid"), "123\n/data\n1700000000\n5433\n/var/run/postgresql\n*\n")
            .unwrap();
        assert_eq!(local_compute(dir.path()).unwrap(), ("/var/run/postgresql".to_string(), 5433));
    }
}
