//! A physical-replication client for PostgreSQL 15, speaking the frontend/backend protocol
//! directly (message codecs and SCRAM from `postgres-protocol`): startup with
//! `replication=true`, trust/cleartext/md5/SCRAM-SHA-256 authentication, the replication
//! commands (`IDENTIFY_SYSTEM`, `CREATE_REPLICATION_SLOT`, `READ_REPLICATION_SLOT`,
//! `START_REPLICATION`), and the COPY-both stream of `XLogData` and keepalives, answered with
//! standby status updates.
//!
//! The stream hands out WAL bytes by LSN exactly as the server sends them — cut anywhere — for
//! [`crate::wal::decoder::WalStreamDecoder`], which reassembles records across messages. The
//! flush position reported in status updates is the caller's to choose: the sidecar reports
//! only what it has made durable, so the slot keeps every byte still needed.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use neon_types::{Lsn, PgTime};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

/// Where and as whom to connect.
#[derive(Debug, Clone)]
pub struct ReplicationConfig {
    /// A unix socket directory (starting with `/`) or a host name / address.
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub application_name: String,
}

/// Errors of the replication connection, naming what was being done.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("connecting to {target}: {source}")]
    Connect { target: String, source: std::io::Error },
    #[error("replication connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("server error during {during}: {severity} {code}: {message}")]
    Server { during: String, severity: String, code: String, message: String },
    #[error("authentication: {0}")]
    Auth(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("no reply within {0:?}")]
    Timeout(Duration),
}

impl ReplicationError {
    /// The SQLSTATE of a server error.
    pub fn code(&self) -> Option<&str> {
        match self {
            ReplicationError::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

/// A physical replication slot, as the server has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Missing,
    /// It keeps WAL from this LSN on.
    Reserving(Lsn),
    /// It exists but keeps no WAL: the server removed it (`max_slot_wal_keep_size`).
    Invalidated,
}

/// What `IDENTIFY_SYSTEM` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemInfo {
    pub system_id: u64,
    pub timeline: u32,
    /// The server's current WAL flush position.
    pub xlogpos: Lsn,
}

/// One message of the WAL stream.
#[derive(Debug, Clone)]
pub enum StreamEvent {
    /// WAL bytes starting at `start`; `server_end` is the server's flush position and
    /// `sent_at` its clock when it sent them.
    XLogData { start: Lsn, server_end: Lsn, sent_at: PgTime, data: Bytes },
    /// The server's WAL position and clock; answer with a status update when
    /// `reply_requested`.
    Keepalive { server_end: Lsn, sent_at: PgTime, reply_requested: bool },
}

/// A replication connection in command mode.
pub struct ReplicationConn {
    stream: Stream,
    inbuf: BytesMut,
    out: BytesMut,
}

fn proto_err(e: std::io::Error) -> ReplicationError {
    ReplicationError::Protocol(e.to_string())
}

fn server_error(during: &str, body: &postgres_protocol::message::backend::ErrorResponseBody) -> ReplicationError {
    let (mut severity, mut code, mut message) = (String::new(), String::new(), String::new());
    let mut fields = body.fields();
    while let Ok(Some(f)) = fields.next() {
        let value = String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            b'S' => severity = value,
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
    }
    ReplicationError::Server { during: during.to_string(), severity, code, message }
}

impl ReplicationConn {
    /// Connects and authenticates in physical replication mode.
    pub fn connect(cfg: &ReplicationConfig) -> Result<ReplicationConn, ReplicationError> {
        let stream = if cfg.host.starts_with('/') {
            let path = PathBuf::from(&cfg.host).join(format!(".s.PGSQL.{}", cfg.port));
            let s = UnixStream::connect(&path)
                .map_err(|source| ReplicationError::Connect { target: path.display().to_string(), source })?;
            Stream::Unix(s)
        } else {
            let target = format!("{}:{}", cfg.host, cfg.port);
            let s = TcpStream::connect(&target).map_err(|source| ReplicationError::Connect { target, source })?;
            s.set_nodelay(true)?;
            Stream::Tcp(s)
        };
        let mut conn = ReplicationConn { stream, inbuf: BytesMut::with_capacity(256 * 1024), out: BytesMut::new() };
        let params =
            [("user", cfg.user.as_str()), ("replication", "true"), ("application_name", cfg.application_name.as_str())];
        frontend::startup_message(params.iter().copied(), &mut conn.out).map_err(proto_err)?;
        conn.send()?;
        conn.authenticate(cfg)?;
        // Parameter statuses and key data until ReadyForQuery.
        loop {
            match conn.recv(None)? {
                Message::ReadyForQuery(_) => return Ok(conn),
                Message::ErrorResponse(e) => return Err(server_error("startup", &e)),
                _ => {}
            }
        }
    }

    fn authenticate(&mut self, cfg: &ReplicationConfig) -> Result<(), ReplicationError> {
        let password = || {
            cfg.password
                .as_deref()
                .ok_or_else(|| ReplicationError::Auth("the server asks for a password and none is configured".into()))
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            match self.recv(None)? {
                Message::AuthenticationOk => return Ok(()),
                Message::AuthenticationCleartextPassword => {
                    frontend::password_message(password()?.as_bytes(), &mut self.out).map_err(proto_err)?;
                    self.send()?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let hash = postgres_protocol::authentication::md5_hash(
                        cfg.user.as_bytes(),
                        password()?.as_bytes(),
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.out).map_err(proto_err)?;
                    self.send()?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut mechs = body.mechanisms();
                    let mut found = false;
                    while let Some(m) = mechs.next().map_err(proto_err)? {
                        found |= m == "SCRAM-SHA-256";
                    }
                    if !found {
                        return Err(ReplicationError::Auth("the server offers no SCRAM-SHA-256".into()));
                    }
                    let s = ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported());
                    frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut self.out).map_err(proto_err)?;
                    self.send()?;
                    scram = Some(s);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let s =
                        scram.as_mut().ok_or_else(|| ReplicationError::Auth("SASL continue before start".into()))?;
                    s.update(body.data()).map_err(|e| ReplicationError::Auth(e.to_string()))?;
                    frontend::sasl_response(s.message(), &mut self.out).map_err(proto_err)?;
                    self.send()?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let s = scram.as_mut().ok_or_else(|| ReplicationError::Auth("SASL final before start".into()))?;
                    s.finish(body.data()).map_err(|e| ReplicationError::Auth(e.to_string()))?;
                }
                Message::ErrorResponse(e) => return Err(server_error("authentication", &e)),
                _ => return Err(ReplicationError::Auth("unsupported authentication method".into())),
            }
        }
    }

    fn send(&mut self) -> Result<(), ReplicationError> {
        self.stream.write_all(&self.out)?;
        self.out.clear();
        Ok(())
    }

    /// The next backend message, waiting at most `timeout` (forever if `None`).
    fn recv(&mut self, timeout: Option<Duration>) -> Result<Message, ReplicationError> {
        loop {
            if let Some(msg) = Message::parse(&mut self.inbuf).map_err(proto_err)? {
                return Ok(msg);
            }
            self.read_more(timeout)?;
        }
    }

    /// Reads whatever the server has sent next into the input buffer.
    fn read_more(&mut self, timeout: Option<Duration>) -> Result<(), ReplicationError> {
        self.stream.set_read_timeout(timeout)?;
        if self.inbuf.capacity() - self.inbuf.len() < 64 * 1024 {
            self.inbuf.reserve(256 * 1024);
        }
        let spare = self.inbuf.spare_capacity_mut();
        // SAFETY: `read` only writes into the slice; we expose just the bytes it reports.
        let dst = unsafe { std::slice::from_raw_parts_mut(spare.as_mut_ptr().cast::<u8>(), spare.len()) };
        let n = match self.stream.read(dst) {
            // A signal (the sidecar's own SIGTERM handler, a child's exit) is not the server.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Ok(()),
            Ok(0) => return Err(ReplicationError::Io(std::io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Err(ReplicationError::Timeout(timeout.unwrap_or_default()))
            }
            Err(e) => return Err(e.into()),
        };
        // SAFETY: `read` initialised the first `n` spare bytes.
        unsafe { self.inbuf.set_len(self.inbuf.len() + n) };
        Ok(())
    }

    /// Consumes a CopyBothResponse ('W') at the head of the input, which `postgres-protocol`
    /// does not parse; true if there was one.
    fn take_copy_both(&mut self) -> Result<bool, ReplicationError> {
        while self.inbuf.len() < 5 {
            self.read_more(None)?;
        }
        if self.inbuf[0] != b'W' {
            return Ok(false);
        }
        let len = i32::from_be_bytes(self.inbuf[1..5].try_into().expect("4 bytes")) as usize;
        while self.inbuf.len() < 1 + len {
            self.read_more(None)?;
        }
        self.inbuf.advance(1 + len);
        Ok(true)
    }

    /// Runs a replication command, returning its rows as text (NULL as `None`).
    pub fn command(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, ReplicationError> {
        frontend::query(sql, &mut self.out).map_err(proto_err)?;
        self.send()?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.recv(None)? {
                Message::DataRow(row) => {
                    let buf = row.buffer();
                    let mut ranges = row.ranges();
                    let mut cols = Vec::new();
                    while let Some(r) = ranges.next().map_err(proto_err)? {
                        cols.push(r.map(|r| String::from_utf8_lossy(&buf[r]).into_owned()));
                    }
                    rows.push(cols);
                }
                Message::ErrorResponse(e) => error = Some(server_error(sql, &e)),
                Message::ReadyForQuery(_) => return error.map_or(Ok(rows), Err),
                _ => {}
            }
        }
    }

    pub fn identify_system(&mut self) -> Result<SystemInfo, ReplicationError> {
        let rows = self.command("IDENTIFY_SYSTEM")?;
        let row = rows.first().ok_or_else(|| ReplicationError::Protocol("IDENTIFY_SYSTEM returned no row".into()))?;
        let col = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        let bad = |what: &str| ReplicationError::Protocol(format!("IDENTIFY_SYSTEM: bad {what}"));
        Ok(SystemInfo {
            system_id: col(0).parse().map_err(|_| bad("systemid"))?,
            timeline: col(1).parse().map_err(|_| bad("timeline"))?,
            xlogpos: col(2).parse().map_err(|_| bad("xlogpos"))?,
        })
    }

    /// Creates a physical slot that reserves WAL now; returns its restart LSN. A slot of that
    /// name existing already is `Err` with code 42710.
    pub fn create_slot(&mut self, name: &str) -> Result<Lsn, ReplicationError> {
        self.command(&format!("CREATE_REPLICATION_SLOT {} PHYSICAL RESERVE_WAL", quote_ident(name)))?;
        // A physical slot's reply carries no consistent point; ask for the slot's position.
        self.slot_restart_lsn(name)?
            .ok_or_else(|| ReplicationError::Protocol(format!("slot {name} has no restart LSN after creation")))
    }

    /// The slot's restart LSN, or `None` if there is no such slot (or it holds no WAL).
    pub fn slot_restart_lsn(&mut self, name: &str) -> Result<Option<Lsn>, ReplicationError> {
        Ok(match self.read_slot(name)? {
            Slot::Reserving(lsn) => Some(lsn),
            Slot::Missing | Slot::Invalidated => None,
        })
    }

    /// What the server says of a physical slot (`READ_REPLICATION_SLOT`: a row of NULLs for a
    /// slot that does not exist; a slot whose WAL the server removed has no restart LSN).
    pub fn read_slot(&mut self, name: &str) -> Result<Slot, ReplicationError> {
        let rows = self.command(&format!("READ_REPLICATION_SLOT {}", quote_ident(name)))?;
        let col = |i: usize| rows.first().and_then(|r| r.get(i).cloned().flatten());
        Ok(match (col(0), col(1).and_then(|l| l.parse().ok())) {
            (None, _) => Slot::Missing,
            (Some(_), Some(lsn)) => Slot::Reserving(lsn),
            (Some(_), None) => Slot::Invalidated,
        })
    }

    /// Drops a physical slot.
    pub fn drop_slot(&mut self, name: &str) -> Result<(), ReplicationError> {
        self.command(&format!("DROP_REPLICATION_SLOT {}", quote_ident(name)))?;
        Ok(())
    }

    /// `TIMELINE_HISTORY`: the history file of `timeline` (which names its parents and where
    /// each forked).
    pub fn timeline_history(&mut self, timeline: u32) -> Result<Vec<u8>, ReplicationError> {
        let rows = self.command(&format!("TIMELINE_HISTORY {timeline}"))?;
        rows.first()
            .and_then(|r| r.get(1).cloned().flatten())
            .map(String::into_bytes)
            .ok_or_else(|| ReplicationError::Protocol(format!("TIMELINE_HISTORY {timeline} returned no file")))
    }

    /// Starts streaming from `start` (rounded down to its page, so the decoder sees a page
    /// header first) on `timeline`, through `slot` if given.
    pub fn start_replication(
        mut self,
        slot: Option<&str>,
        start: Lsn,
        timeline: u32,
    ) -> Result<WalStream, ReplicationError> {
        let slot = slot.map(|s| format!("SLOT {} ", quote_ident(s))).unwrap_or_default();
        let sql = format!("START_REPLICATION {slot}PHYSICAL {} TIMELINE {timeline}", start.page_start());
        frontend::query(&sql, &mut self.out).map_err(proto_err)?;
        self.send()?;
        loop {
            if self.take_copy_both()? {
                return Ok(WalStream { conn: self });
            }
            match self.recv(None)? {
                Message::ErrorResponse(e) => return Err(server_error(&sql, &e)),
                Message::ReadyForQuery(_) => {
                    return Err(ReplicationError::Protocol(format!("{sql} ended without starting a stream")))
                }
                _ => {}
            }
        }
    }
}

/// The COPY-both stream after `START_REPLICATION`.
pub struct WalStream {
    conn: ReplicationConn,
}

impl WalStream {
    /// The next XLogData or keepalive, waiting at most `timeout`; `Ok(None)` when the server
    /// ends the stream (e.g. at a timeline switch).
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<StreamEvent>, ReplicationError> {
        loop {
            match self.conn.recv(Some(timeout))? {
                Message::CopyData(body) => {
                    let mut data = body.into_bytes();
                    if data.is_empty() {
                        return Err(ReplicationError::Protocol("empty CopyData".into()));
                    }
                    match data.get_u8() {
                        b'w' if data.len() >= 24 => {
                            let start = Lsn(data.get_u64());
                            let server_end = Lsn(data.get_u64());
                            let sent_at = PgTime(data.get_i64());
                            return Ok(Some(StreamEvent::XLogData { start, server_end, sent_at, data }));
                        }
                        b'k' if data.len() >= 17 => {
                            let server_end = Lsn(data.get_u64());
                            let sent_at = PgTime(data.get_i64());
                            let reply_requested = data.get_u8() != 0;
                            return Ok(Some(StreamEvent::Keepalive { server_end, sent_at, reply_requested }));
                        }
                        kind => {
                            return Err(ReplicationError::Protocol(format!("unexpected stream message {kind:#04x}")))
                        }
                    }
                }
                Message::CopyDone => return Ok(None),
                Message::ErrorResponse(e) => return Err(server_error("streaming", &e)),
                _ => {}
            }
        }
    }

    /// Tells the server how far WAL has been written, flushed (made durable: the slot may
    /// release WAL before this) and applied.
    pub fn send_status(
        &mut self,
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        reply_requested: bool,
    ) -> Result<(), ReplicationError> {
        let mut body = BytesMut::with_capacity(34);
        body.put_u8(b'r');
        body.put_u64(write.0);
        body.put_u64(flush.0);
        body.put_u64(apply.0);
        body.put_i64(PgTime::now().0);
        body.put_u8(reply_requested as u8);
        // CopyData: 'd', length, body.
        let out = &mut self.conn.out;
        out.put_u8(b'd');
        out.put_i32(4 + body.len() as i32);
        out.put_slice(&body);
        self.conn.send()
    }
}

/// What `BASE_BACKUP` gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseBackupInfo {
    /// The backup's checkpoint redo point: WAL from here makes the files consistent.
    pub start: Lsn,
    /// WAL up to here must be replayed before the files are consistent.
    pub end: Lsn,
    pub timeline: u32,
    pub files: usize,
    pub bytes: u64,
    /// The server's tablespaces (OID and location), each unpacked in place under
    /// `pg_tblspc/<oid>/`.
    pub tablespaces: std::collections::BTreeMap<u32, String>,
}

impl ReplicationConn {
    /// Takes a base backup (fast checkpoint, no WAL, no manifest) and unpacks it into `dest`:
    /// the main archive there, each tablespace's (`<oid>.tar`, paths relative to its location)
    /// in place under `dest/pg_tblspc/<oid>/`.
    pub fn base_backup(
        &mut self,
        label: &str,
        dest: &std::path::Path,
        mut progress: impl FnMut(u64),
    ) -> Result<BaseBackupInfo, ReplicationError> {
        use crate::replication::tar_reader::TarUnpacker;
        let sql = format!("BASE_BACKUP (LABEL '{}', CHECKPOINT 'fast', MANIFEST 'no')", label.replace('\'', "''"));
        frontend::query(&sql, &mut self.out).map_err(proto_err)?;
        self.send()?;
        let mut lsns: Vec<(Lsn, u32)> = Vec::new();
        let mut tablespaces = std::collections::BTreeMap::new();
        // The archive being unpacked, and the totals of those done.
        let mut tar: Option<TarUnpacker> = None;
        let (mut files, mut bytes, mut base_done) = (0usize, 0u64, false);
        let mut error = None;
        let tar_err = |e: crate::replication::tar_reader::TarError| ReplicationError::Protocol(e.to_string());
        let incomplete = |name: &str| ReplicationError::Protocol(format!("archive {name} ended early"));
        let mut current = String::new();
        loop {
            match self.recv(None)? {
                Message::DataRow(row) => {
                    let buf = row.buffer();
                    let cols: Vec<Option<String>> = row
                        .ranges()
                        .map(|r| Ok(r.map(|r| String::from_utf8_lossy(&buf[r]).into_owned())))
                        .collect()
                        .map_err(proto_err)?;
                    match cols.as_slice() {
                        // (recptr, tli): the start, and after the archives the end.
                        [Some(lsn), Some(tli)] => {
                            let lsn = lsn.parse().map_err(|_| ReplicationError::Protocol(format!("LSN {lsn:?}")))?;
                            lsns.push((lsn, tli.parse().unwrap_or(0)));
                        }
                        // (spcoid, spclocation, size): the main directory's row has no oid.
                        [Some(oid), location, ..] => {
                            let oid =
                                oid.parse().map_err(|_| ReplicationError::Protocol(format!("tablespace {oid:?}")))?;
                            tablespaces.insert(oid, location.clone().unwrap_or_default());
                        }
                        _ => {}
                    }
                }
                Message::CopyOutResponse(_) => {}
                Message::CopyData(body) => {
                    let data = body.data();
                    match data.first() {
                        Some(b'n') => {
                            if let Some(t) = tar.take() {
                                if !t.is_done() {
                                    return Err(incomplete(&current));
                                }
                                (files, bytes) = (files + t.files, bytes + t.bytes);
                            }
                            current = String::from_utf8_lossy(&data[1..]).split('\0').next().unwrap_or("").to_string();
                            let into = match current.strip_suffix(".tar").map(|n| n.parse::<u32>()) {
                                _ if current == "base.tar" => {
                                    base_done = true;
                                    dest.to_path_buf()
                                }
                                Some(Ok(oid)) => dest.join("pg_tblspc").join(oid.to_string()),
                                _ => return Err(ReplicationError::Protocol(format!("unexpected archive {current}"))),
                            };
                            tar = Some(TarUnpacker::new(&into));
                        }
                        Some(b'd') => {
                            let t = tar
                                .as_mut()
                                .ok_or_else(|| ReplicationError::Protocol("data before an archive".into()))?;
                            t.feed(&data[1..]).map_err(tar_err)?;
                            progress(bytes + t.bytes);
                        }
                        _ => {}
                    }
                }
                Message::ErrorResponse(e) => error = Some(server_error("BASE_BACKUP", &e)),
                Message::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        if let Some(e) = error {
            return Err(e);
        }
        let t = tar.ok_or_else(|| ReplicationError::Protocol("BASE_BACKUP sent no archive".into()))?;
        if !t.is_done() || !base_done {
            return Err(incomplete(&current));
        }
        match lsns.as_slice() {
            [(start, timeline), (end, _)] => Ok(BaseBackupInfo {
                start: *start,
                end: *end,
                timeline: *timeline,
                files: files + t.files,
                bytes: bytes + t.bytes,
                tablespaces,
            }),
            _ => Err(ReplicationError::Protocol(format!("incomplete base backup (positions {lsns:?})"))),
        }
    }
}

/// A quoted identifier for replication commands.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
