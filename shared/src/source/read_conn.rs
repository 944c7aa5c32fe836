//! The reader's own Redis connection. It carries the commands that return entries (XREADGROUP,
//! XAUTOCLAIM), whose replies are large (a batch), and decodes each reply where it landed: the reply is read into
//! one buffer, parsed into spans of it (`reply`), and the entries share
//! that buffer. redis-rs instead builds a `Value` tree with a heap buffer per field, which cost the
//! persister about half of its CPU (perf, docs/src/performance.md).
//!
//! The connection opens lazily and is dropped on any I/O, timeout or protocol failure; the next
//! query reconnects (the pipeline backs off between attempts). It speaks RESP2, authenticates
//! and selects the database as the URL says, over TLS for `rediss://`, and names itself
//! (`CLIENT SETNAME`) so that `CLIENT LIST` shows which worker, group and consumer it reads for.
//! With Sentinel (`redis+sentinel://`), each connect asks the sentinels where the master is
//! first; a `READONLY` reply (a demoted master) or the sentinels' announcement of a promotion
//! drops the connection so that the next query finds the new one.
//!
//! Replies are parsed as they arrive (`reply`): a value longer than any acceptable entry is cut
//! to its first bytes while it streams in, so an oversized entry never sits whole in memory.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use redis::ConnectionAddr;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

use crate::runtime::config::ConfigError;
use crate::runtime::sentinel::{ResolveError, Sentinel};
use crate::source::reply::{Elided, Frame, ReplyParser};

/// Room made in the buffer before each socket read: Redis writes a large reply 64 KiB at a time.
const READ_CHUNK: usize = 64 * 1024;
/// Reply buffers kept for reuse. Each is shared by the entries of one read until they are
/// settled; a handful cover the batches in flight, and anything older is left to the allocator.
const SPARE_BUFFERS: usize = 8;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Buffers above this size are not kept for reuse, and replies above it do not size the next
/// buffer: one exceptional reply must not keep its memory.
const MAX_KEPT_BUFFER: usize = 2 * 1024 * 1024;

/// Why a query on the read connection failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("connecting to Redis at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("Redis connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("no reply from Redis within {0:?}")]
    Timeout(Duration),
    #[error("Redis closed the connection")]
    Closed,
    #[error("malformed reply from Redis: {0}")]
    Protocol(String),
    /// An error reply (`-NOGROUP ...`, `-WRONGPASS ...`).
    #[error("Redis: {0}")]
    Server(String),
    /// The sentinels named no master that answers as one (mid-failover).
    #[error("Redis Sentinel: {0}")]
    Sentinel(#[from] ResolveError),
}

impl ReadError {
    /// The error code of an error reply (`NOGROUP`), as redis-rs's `RedisError::code`.
    pub fn code(&self) -> Option<&str> {
        match self {
            ReadError::Server(message) => message.split_whitespace().next(),
            _ => None,
        }
    }
}

trait Socket: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Socket for T {}

/// A connection dedicated to blocking reads, whose replies are decoded without copies.
pub struct ReadConn {
    host: String,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
    username: Option<String>,
    password: Option<String>,
    db: i64,
    /// `CLIENT SETNAME` at each connection, if set.
    name: Option<String>,
    response_timeout: Duration,
    /// Values longer than this are cut to `stream::fields::TRUNCATED_VALUE_BYTES` as they arrive.
    value_limit: usize,
    socket: Option<Box<dyn Socket>>,
    /// Where the next reply is read.
    buf: BytesMut,
    /// Buffers of earlier replies, reused once no entry refers to them (reusing them keeps the
    /// resident memory flat: freshly allocated ones of ~300 KiB each were retained by the
    /// allocator, 76 MiB on a 1 M backlog).
    spare: std::collections::VecDeque<BytesMut>,
    /// The size of the last reply, so a buffer holds the next one without growing.
    last_reply: usize,
    /// Where the master is, asked at each connect (`host` and `port` are then the last master).
    sentinel: Option<Arc<Sentinel>>,
    /// The sentinels' announcements of promotions counted at the last connect.
    switches: u64,
}

/// The replies of a pipeline: frames are spans of `buf`.
#[derive(Debug)]
pub struct Replies {
    pub buf: Bytes,
    /// One per command, in order; an error reply is a `Frame::Error`.
    pub frames: Vec<Frame>,
    /// Values cut while they arrived (their true length).
    pub elided: Vec<Elided>,
}

impl ReadConn {
    /// A connection to where `client` connects, with `tls` for a `rediss://` URL.
    /// `response_timeout` must exceed any BLOCK it is used for; values longer than `value_limit`
    /// bytes are cut as they arrive.
    pub fn new(
        client: &redis::Client,
        tls: Option<Arc<rustls::ClientConfig>>,
        response_timeout: Duration,
        value_limit: usize,
    ) -> Result<Self, ConfigError> {
        let info = client.get_connection_info();
        let (host, port, tls) = match info.addr() {
            ConnectionAddr::Tcp(host, port) => (host.clone(), *port, None),
            ConnectionAddr::TcpTls {
                host,
                port,
                insecure: false,
                ..
            } => match tls {
                Some(tls) => (host.clone(), *port, Some(tls)),
                None => return Err(ConfigError("FLEET_REDIS_URL: no TLS settings".into())),
            },
            ConnectionAddr::TcpTls { insecure: true, .. } => {
                return Err(ConfigError(
                    "FLEET_REDIS_URL: TLS without certificate verification (#insecure) is not supported"
                        .into(),
                ))
            }
            other => {
                return Err(ConfigError(format!(
                    "FLEET_REDIS_URL: unsupported address {other}"
                )))
            }
        };
        let settings = info.redis_settings();
        Ok(ReadConn {
            host,
            port,
            tls,
            username: settings.username().map(str::to_owned),
            password: settings.password().map(str::to_owned),
            db: settings.db(),
            name: None,
            response_timeout,
            value_limit,
            socket: None,
            buf: BytesMut::new(),
            spare: Default::default(),
            last_reply: 0,
            sentinel: None,
            switches: 0,
        })
    }

    /// Connects to the master `sentinel` names at each connect, instead of the client's address.
    pub fn following(mut self, sentinel: Option<Arc<Sentinel>>) -> Self {
        self.sentinel = sentinel;
        self
    }

    /// A connection like this one (credentials, TLS, name, limits), to another node of a cluster.
    pub fn to_node(&self, host: &str, port: u16) -> ReadConn {
        ReadConn {
            host: host.to_owned(),
            port,
            tls: self.tls.clone(),
            username: self.username.clone(),
            password: self.password.clone(),
            db: self.db,
            name: self.name.clone(),
            response_timeout: self.response_timeout,
            value_limit: self.value_limit,
            socket: None,
            buf: BytesMut::new(),
            spare: Default::default(),
            last_reply: 0,
            sentinel: None,
            switches: 0,
        }
    }

    /// Names the connection (`CLIENT SETNAME`) from the next connect on.
    pub fn set_name(&mut self, name: String) {
        self.name = Some(name);
    }

    /// Sends `cmd` and returns its reply. An error reply is `ReadError::Server`; any other failure
    /// drops the connection.
    pub async fn query(
        &mut self,
        cmd: &redis::Cmd,
    ) -> Result<(Bytes, Frame, Vec<Elided>), ReadError> {
        let mut replies = self.pipeline(std::slice::from_ref(cmd)).await?;
        match replies.frames.pop() {
            Some(Frame::Error(r)) => Err(ReadError::Server(
                String::from_utf8_lossy(&replies.buf[r]).into_owned(),
            )),
            Some(frame) => Ok((replies.buf, frame, replies.elided)),
            None => Err(ReadError::Protocol("no reply".into())),
        }
    }

    /// Sends `cmds` in one round trip and returns their replies (errors included, as frames); any
    /// failure other than an error reply drops the connection.
    pub async fn pipeline(&mut self, cmds: &[redis::Cmd]) -> Result<Replies, ReadError> {
        if let Some(sentinel) = &self.sentinel {
            if sentinel.switches() != self.switches {
                // A promotion announced: this master is no longer the master.
                self.socket = None;
            }
        }
        let result = self.round_trip(cmds).await;
        let demoted = |r: &Replies| {
            r.frames
                .iter()
                .any(|f| matches!(f, Frame::Error(e) if r.buf[e.clone()].starts_with(b"READONLY")))
        };
        match &result {
            Err(_) => {
                self.socket = None;
                self.buf.clear();
            }
            // The master was demoted: the next query connects to the one the sentinels name.
            Ok(replies) if self.sentinel.is_some() && demoted(replies) => self.socket = None,
            Ok(_) => {}
        }
        result
    }

    async fn round_trip(&mut self, cmds: &[redis::Cmd]) -> Result<Replies, ReadError> {
        if self.socket.is_none() {
            if let Some(sentinel) = &self.sentinel {
                self.switches = sentinel.switches();
                (self.host, self.port) = sentinel.master().await?;
            }
            let socket = self.connect().await?;
            self.socket = Some(socket);
            let mut hello = Vec::new();
            if let Some(password) = &self.password {
                let mut auth = redis::cmd("AUTH");
                if let Some(user) = &self.username {
                    auth.arg(user);
                }
                hello.push(auth.arg(password).clone());
            }
            if self.db != 0 {
                hello.push(redis::cmd("SELECT").arg(self.db).clone());
            }
            let named = self.name.is_some();
            if let Some(name) = &self.name {
                hello.push(redis::cmd("CLIENT").arg("SETNAME").arg(name).clone());
            }
            if hello.is_empty() {
                return self.exchange(cmds).await;
            }
            let replies = self.exchange(&hello).await?;
            for (i, frame) in replies.frames.iter().enumerate() {
                if let Frame::Error(r) = frame {
                    let message = String::from_utf8_lossy(&replies.buf[r.clone()]).into_owned();
                    if named && i == hello.len() - 1 {
                        // A name is a convenience (and a duplicate check): an ACL may forbid it.
                        tracing::debug!(error = %message, "CLIENT SETNAME refused");
                    } else {
                        return Err(ReadError::Server(message));
                    }
                }
            }
        }
        self.exchange(cmds).await
    }

    /// Makes `buf` an empty buffer with room for a reply like the last one: a spare whose entries
    /// are all gone if there is one, else a new one.
    fn fresh_buffer(&mut self) {
        if !self.buf.is_empty() {
            return; // bytes of a reply already arrived (never with one command at a time)
        }
        // Room for a reply like the last one; new buffers get half as much again, so replies
        // that vary a little in size still fit the spares.
        let need = self.last_reply.min(MAX_KEPT_BUFFER) + READ_CHUNK / 4;
        if self.buf.capacity() >= need && self.buf.capacity() <= MAX_KEPT_BUFFER {
            return;
        }
        let old = std::mem::take(&mut self.buf);
        let reusable = self.spare.iter_mut().position(|b| b.try_reclaim(need));
        self.buf = match reusable.and_then(|i| self.spare.remove(i)) {
            Some(buf) => buf,
            None => BytesMut::with_capacity(need + need / 2),
        };
        if old.capacity() > 0 && old.capacity() <= MAX_KEPT_BUFFER {
            self.spare.push_back(old);
            if self.spare.len() > SPARE_BUFFERS {
                self.spare.pop_front();
            }
        }
    }

    async fn exchange(&mut self, cmds: &[redis::Cmd]) -> Result<Replies, ReadError> {
        self.fresh_buffer();
        let deadline = Instant::now() + self.response_timeout;
        let timeout = ReadError::Timeout(self.response_timeout);
        let socket = self.socket.as_mut().ok_or(ReadError::Closed)?;
        let mut packed = Vec::new();
        for cmd in cmds {
            cmd.write_packed_command(&mut packed);
        }
        timeout_at(deadline, socket.write_all(&packed))
            .await
            .map_err(|_| ReadError::Timeout(self.response_timeout))??;
        let mut parser = ReplyParser::new(
            cmds.len(),
            self.value_limit,
            crate::stream::fields::TRUNCATED_VALUE_BYTES,
        );
        loop {
            if parser
                .feed(&mut self.buf)
                .map_err(|e| ReadError::Protocol(e.to_string()))?
            {
                let len = parser.used();
                let buf = self.buf.split_to(len).freeze();
                self.last_reply = len;
                let (frames, elided) = parser.finish();
                return Ok(Replies {
                    buf,
                    frames,
                    elided,
                });
            }
            self.buf.reserve(READ_CHUNK);
            let read = timeout_at(deadline, socket.read_buf(&mut self.buf)).await;
            match read {
                Err(_) => return Err(timeout),
                Ok(Ok(0)) => return Err(ReadError::Closed),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.into()),
            }
        }
    }

    async fn connect(&self) -> Result<Box<dyn Socket>, ReadError> {
        let addr = format!("{}:{}", self.host, self.port);
        let failed = |source: std::io::Error| ReadError::Connect {
            addr: addr.clone(),
            source,
        };
        let tcp = tokio::time::timeout(
            CONNECT_TIMEOUT,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| failed(std::io::ErrorKind::TimedOut.into()))?
        .map_err(failed)?;
        tcp.set_nodelay(true).map_err(failed)?;
        let Some(tls) = &self.tls else {
            return Ok(Box::new(tcp));
        };
        let name = rustls::pki_types::ServerName::try_from(self.host.clone())
            .map_err(|e| failed(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
        let connector = tokio_rustls::TlsConnector::from(tls.clone());
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp))
            .await
            .map_err(|_| failed(std::io::ErrorKind::TimedOut.into()))?
            .map_err(failed)?;
        Ok(Box::new(stream))
    }
}
