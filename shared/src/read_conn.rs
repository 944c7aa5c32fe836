//! The reader's own Redis connection. It carries the commands that return entries (XREADGROUP,
//! XAUTOCLAIM), whose replies are large (a batch), and decodes each reply where it landed: the reply is read into
//! one buffer, decoded into spans of it (redis-protocol's `decode_range`), and the entries share
//! that buffer. redis-rs instead builds a `Value` tree with a heap buffer per field, which cost the
//! persister about half of its CPU (perf, docs/performance.md).
//!
//! The connection opens lazily and is dropped on any I/O, timeout or protocol failure; the next
//! query reconnects (the pipeline backs off between attempts). It speaks RESP2 and authenticates
//! and selects the database as the URL says, over TLS for `rediss://`.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use redis::ConnectionAddr;
use redis_protocol::resp2::decode::decode_range;
use redis_protocol::resp2::types::RangeFrame;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

use crate::config::ConfigError;

/// Room made in the buffer before each socket read: Redis writes a large reply 64 KiB at a time.
const READ_CHUNK: usize = 64 * 1024;
/// Reply buffers kept for reuse. Each is shared by the entries of one read until they are
/// settled; a handful cover the batches in flight, and anything older is left to the allocator.
const SPARE_BUFFERS: usize = 8;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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
    response_timeout: Duration,
    socket: Option<Box<dyn Socket>>,
    /// Where the next reply is read.
    buf: BytesMut,
    /// Buffers of earlier replies, reused once no entry refers to them (reusing them keeps the
    /// resident memory flat: freshly allocated ones of ~300 KiB each were retained by the
    /// allocator, 76 MiB on a 1 M backlog).
    spare: std::collections::VecDeque<BytesMut>,
    /// The size of the last reply, so a buffer holds the next one without growing.
    last_reply: usize,
}

impl ReadConn {
    /// A connection to where `client` connects, with `tls` for a `rediss://` URL.
    /// `response_timeout` must exceed any BLOCK it is used for.
    pub fn new(
        client: &redis::Client,
        tls: Option<Arc<rustls::ClientConfig>>,
        response_timeout: Duration,
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
            response_timeout,
            socket: None,
            buf: BytesMut::new(),
            spare: Default::default(),
            last_reply: 0,
        })
    }

    /// Sends `cmd` and returns its reply, decoded as spans of the returned buffer. An error
    /// reply is `ReadError::Server`; any other failure drops the connection.
    pub async fn query(&mut self, cmd: &redis::Cmd) -> Result<(Bytes, RangeFrame), ReadError> {
        let result = self.round_trip(cmd).await;
        if let Err(e) = &result {
            if !matches!(e, ReadError::Server(_)) {
                self.socket = None;
                self.buf.clear();
            }
        }
        result
    }

    async fn round_trip(&mut self, cmd: &redis::Cmd) -> Result<(Bytes, RangeFrame), ReadError> {
        if self.socket.is_none() {
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
            for cmd in &hello {
                if let Err(e) = self.exchange(cmd).await {
                    self.socket = None;
                    return Err(e);
                }
            }
        }
        self.exchange(cmd).await
    }

    /// Makes `buf` an empty buffer with room for a reply like the last one: a spare whose entries
    /// are all gone if there is one, else a new one.
    fn fresh_buffer(&mut self) {
        if !self.buf.is_empty() {
            return; // bytes of a reply already arrived (never with one command at a time)
        }
        // Room for a reply like the last one; new buffers get half as much again, so replies
        // that vary a little in size still fit the spares.
        let need = self.last_reply + READ_CHUNK / 4;
        if self.buf.capacity() >= need {
            return;
        }
        let old = std::mem::take(&mut self.buf);
        let reusable = self.spare.iter_mut().position(|b| b.try_reclaim(need));
        self.buf = match reusable.and_then(|i| self.spare.remove(i)) {
            Some(buf) => buf,
            None => BytesMut::with_capacity(need + need / 2),
        };
        if old.capacity() > 0 {
            self.spare.push_back(old);
            if self.spare.len() > SPARE_BUFFERS {
                self.spare.pop_front();
            }
        }
    }

    async fn exchange(&mut self, cmd: &redis::Cmd) -> Result<(Bytes, RangeFrame), ReadError> {
        self.fresh_buffer();
        let deadline = Instant::now() + self.response_timeout;
        let timeout = ReadError::Timeout(self.response_timeout);
        let socket = self.socket.as_mut().ok_or(ReadError::Closed)?;
        timeout_at(deadline, socket.write_all(&cmd.get_packed_command()))
            .await
            .map_err(|_| ReadError::Timeout(self.response_timeout))??;
        loop {
            // A complete reply ends with CRLF; Redis sends a large one 64 KiB at a time, and
            // decoding every partial read from the start would cost several full decodes.
            if self.buf.ends_with(b"\r\n") {
                match decode_range(&self.buf) {
                    Ok(Some((frame, len))) => {
                        let reply = self.buf.split_to(len).freeze();
                        self.last_reply = len;
                        if let RangeFrame::Error((start, end)) = frame {
                            return Err(ReadError::Server(
                                String::from_utf8_lossy(&reply[start..end]).into_owned(),
                            ));
                        }
                        return Ok((reply, frame));
                    }
                    Ok(None) => {}
                    Err(e) => return Err(ReadError::Protocol(e.to_string())),
                }
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
