//! A server-sent events client as small as the tests need: HTTP/1.1 over a TCP stream, chunked
//! bodies decoded, messages parsed as `EventSource` parses them. Written by hand so that the
//! benchmark can hold ten thousand of them, and so that a test can stop reading (a slow client).

use std::collections::HashMap;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One dispatched message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub id: String,
    pub event: String,
    pub data: String,
}

impl Message {
    /// `data` as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data).unwrap_or(serde_json::Value::Null)
    }
}

/// An open stream (or a refused request: `status` says which).
pub struct Client {
    pub status: u16,
    pub headers: HashMap<String, String>,
    stream: TcpStream,
    chunked: bool,
    /// Body bytes still to come, for a body with a `Content-Length`.
    remaining: Option<usize>,
    /// Body bytes received, not yet parsed.
    raw: Vec<u8>,
    /// Decoded body text not yet parsed into messages.
    text: String,
    last_id: String,
    ended: bool,
    /// Comments (keep-alives) seen.
    pub comments: usize,
    /// `retry:` received.
    pub retry: Option<u64>,
}

/// `GET path` on `addr` with extra headers; returns once the response head is read.
pub async fn connect(addr: &str, path: &str, headers: &[(&str, &str)]) -> std::io::Result<Client> {
    let mut stream = TcpStream::connect(addr).await?;
    let mut request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await? == 0 {
            return Err(std::io::Error::other("closed before the response head"));
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .get("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"));
    let remaining = headers.get("content-length").and_then(|v| v.parse().ok());
    Ok(Client {
        status,
        headers,
        stream,
        chunked,
        remaining,
        raw: Vec::new(),
        text: String::new(),
        last_id: String::new(),
        ended: remaining == Some(0),
        comments: 0,
        retry: None,
    })
}

impl Client {
    /// The next message, `None` when the stream ended (or nothing came within `timeout`:
    /// `timed_out` tells).
    pub async fn next(&mut self, timeout: Duration) -> Option<Message> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(m) = self.parse_one() {
                return Some(m);
            }
            if self.ended {
                return None;
            }
            let mut buf = [0u8; 16 * 1024];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await {
                Err(_) => return None,
                Ok(Ok(0)) | Ok(Err(_)) => {
                    self.ended = true;
                }
                Ok(Ok(n)) => {
                    self.raw.extend_from_slice(&buf[..n]);
                    self.decode();
                }
            }
        }
    }

    /// Whether the server ended the stream (as opposed to a timeout).
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Everything until `n` messages arrived or `timeout` passed.
    pub async fn take(&mut self, n: usize, timeout: Duration) -> Vec<Message> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Some(m) => out.push(m),
                None => break,
            }
        }
        out
    }

    /// The body so far, for error messages.
    pub fn body_text(&self) -> String {
        self.text.clone()
    }

    /// Reads the rest of a (refused) response's body.
    pub async fn read_body(&mut self, timeout: Duration) -> String {
        let _ = self.next(timeout).await;
        self.text.clone()
    }

    fn decode(&mut self) {
        if !self.chunked {
            self.text.push_str(&String::from_utf8_lossy(&self.raw));
            if let Some(left) = &mut self.remaining {
                *left = left.saturating_sub(self.raw.len());
                if *left == 0 {
                    self.ended = true;
                }
            }
            self.raw.clear();
            return;
        }
        loop {
            let Some(end) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let size_text = String::from_utf8_lossy(&self.raw[..end]).into_owned();
            let Ok(size) =
                usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            else {
                self.ended = true;
                return;
            };
            if size == 0 {
                self.ended = true;
                self.raw.clear();
                return;
            }
            if self.raw.len() < end + 2 + size + 2 {
                return;
            }
            let chunk = self.raw[end + 2..end + 2 + size].to_vec();
            self.text.push_str(&String::from_utf8_lossy(&chunk));
            self.raw.drain(..end + 2 + size + 2);
        }
    }

    /// One message out of the decoded text, if a whole one is there.
    fn parse_one(&mut self) -> Option<Message> {
        loop {
            let end = self.text.find("\n\n")?;
            let block: String = self.text.drain(..end + 2).collect();
            let (mut event, mut data, mut has_data) = (String::new(), Vec::new(), false);
            for line in block.split('\n').filter(|l| !l.is_empty()) {
                if line.starts_with(':') {
                    self.comments += 1;
                    continue;
                }
                let (name, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match name {
                    "id" => self.last_id = value.to_owned(),
                    "event" => event = value.to_owned(),
                    "data" => {
                        has_data = true;
                        data.push(value.to_owned());
                    }
                    "retry" => self.retry = value.parse().ok(),
                    _ => {}
                }
            }
            if has_data {
                return Some(Message {
                    id: self.last_id.clone(),
                    event: if event.is_empty() {
                        "message".into()
                    } else {
                        event
                    },
                    data: data.join("\n"),
                });
            }
        }
    }

    /// The id a browser would send as `Last-Event-ID`.
    pub fn last_event_id(&self) -> &str {
        &self.last_id
    }
}
