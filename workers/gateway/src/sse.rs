//! Server-sent events framing (the WHATWG `text/event-stream` format): what a browser's
//! `EventSource` parses. Written by hand: it is a few lines, and every message is framed once and
//! shared by every connection that receives it.

use bytes::{BufMut, Bytes, BytesMut};

/// A comment line: ignored by `EventSource`, it keeps proxies and load balancers from closing an
/// idle connection.
pub const KEEPALIVE: &[u8] = b": keepalive\n\n";

/// The reconnection delay a browser should wait after the stream ends.
pub fn retry(ms: u64) -> Bytes {
    Bytes::from(format!("retry: {ms}\n\n"))
}

/// One message: `id:` (the browser's `Last-Event-ID` from then on), `event:` (the listener it
/// goes to), and `data:` once per line of `data`, so that a multi-line payload arrives whole.
/// Line breaks in `id` and `event` would end the field early: they become spaces.
pub fn message(id: Option<&str>, event: &str, data: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + event.len() + 64);
    if let Some(id) = id {
        field(&mut out, "id", id);
    }
    field(&mut out, "event", event);
    // CRLF, CR and LF all end a line for the parser.
    let mut rest = data;
    loop {
        let cut = rest.find(['\r', '\n']);
        let line = &rest[..cut.unwrap_or(rest.len())];
        out.put_slice(b"data: ");
        out.put_slice(line.as_bytes());
        out.put_u8(b'\n');
        match cut {
            None => break,
            Some(i) => {
                let skip = if rest[i..].starts_with("\r\n") { 2 } else { 1 };
                rest = &rest[i + skip..];
            }
        }
    }
    out.put_u8(b'\n');
    out.freeze()
}

fn field(out: &mut BytesMut, name: &str, value: &str) {
    out.put_slice(name.as_bytes());
    out.put_slice(b": ");
    for c in value.chars() {
        // A NUL in an id makes browsers ignore it.
        let c = if matches!(c, '\r' | '\n' | '\0') {
            ' '
        } else {
            c
        };
        let mut buf = [0; 4];
        out.put_slice(c.encode_utf8(&mut buf).as_bytes());
    }
    out.put_u8(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an `EventSource` would dispatch: (id, event, data) per message, parsed as the
    /// specification says.
    fn parse(stream: &[u8]) -> Vec<(String, String, String)> {
        let text = std::str::from_utf8(stream).unwrap();
        let (mut id, mut event, mut data) = (String::new(), String::new(), Vec::new());
        let mut out = Vec::new();
        for line in text.split('\n') {
            if line.is_empty() {
                if !data.is_empty() {
                    out.push((id.clone(), event.clone(), data.join("\n")));
                }
                event.clear();
                data.clear();
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (name, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value).to_owned();
            match name {
                "id" => id = value,
                "event" => event = value,
                "data" => data.push(value),
                _ => {}
            }
        }
        out
    }

    #[test]
    fn multi_line_data_arrives_whole() {
        let m = message(Some("1-0@s"), "t", "{\"a\":\n1,\r\n\"b\":\r2}");
        assert_eq!(
            parse(&m),
            vec![("1-0@s".into(), "t".into(), "{\"a\":\n1,\n\"b\":\n2}".into())]
        );
        assert!(m.ends_with(b"\n\n"));
    }

    #[test]
    fn ids_and_event_names_cannot_break_the_frame() {
        let m = message(Some("1-0@a\nevent: x\0"), "ty\rpe", "d");
        assert_eq!(
            parse(&m),
            vec![("1-0@a event: x ".into(), "ty pe".into(), "d".into())]
        );
        let empty = message(None, "reset", "");
        assert_eq!(parse(&empty), vec![("".into(), "reset".into(), "".into())]);
        assert_eq!(&empty[..], b"event: reset\ndata: \n\n");
    }

    #[test]
    fn keepalives_and_retry_are_not_messages() {
        let mut all = KEEPALIVE.to_vec();
        all.extend_from_slice(&retry(1500));
        all.extend_from_slice(&message(Some("2-0@s"), "t", "x"));
        assert_eq!(parse(&all), vec![("2-0@s".into(), "t".into(), "x".into())]);
        assert_eq!(&retry(1500)[..], b"retry: 1500\n\n");
    }
}
