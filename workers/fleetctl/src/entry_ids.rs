//! Stream entry ids as an operator types them, checked before anything connects: a malformed id
//! sent to Redis comes back as a raw protocol error (or, for `XRANGE`, as a different range:
//! `1700000000000` alone means the whole millisecond), so it is refused here with a line that
//! names the argument.

use streamfleet::EntryId;

/// An entry id as Redis writes it: `<ms>-<seq>`, both in decimal digits.
pub fn parse(text: &str) -> Option<EntryId> {
    let (ms, seq) = text.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !(digits(ms) && digits(seq)) {
        return None;
    }
    Some(EntryId {
        ms: ms.parse().ok()?,
        seq: seq.parse().ok()?,
    })
}

/// `parse`, or a line naming `arg` and the expected form.
pub fn parse_arg(arg: &str, text: &str) -> Result<EntryId, String> {
    parse(text).ok_or_else(|| {
        format!("{arg} {text}: not a stream entry id (<ms>-<seq>, e.g. 1700000000000-0)")
    })
}

/// A position in a stream to move a group to: an entry id, or `0` (as Redis takes it in
/// `XGROUP SETID`: before the first entry, the beginning of the stream).
pub fn parse_position(arg: &str, text: &str) -> Result<EntryId, String> {
    if text == "0" {
        return Ok(BEGINNING);
    }
    parse(text).ok_or_else(|| {
        format!(
            "{arg} {text}: not a stream entry id (<ms>-<seq>, or 0 for the beginning of the stream)"
        )
    })
}

/// `0-0`: before every entry of a stream.
pub const BEGINNING: EntryId = EntryId { ms: 0, seq: 0 };

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ms_dash_seq_in_digits_is_an_entry_id() {
        assert_eq!(
            parse("1700000000000-3"),
            Some(EntryId {
                ms: 1_700_000_000_000,
                seq: 3
            })
        );
        assert_eq!(parse("0-0"), Some(BEGINNING));
        for bad in [
            "", "0", "12", "1-", "-1", "+1-0", "1-+0", "a-b", "1-2-3", " 1-0", "1-0x",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        assert!(parse_arg("--id", "1-x")
            .unwrap_err()
            .starts_with("--id 1-x: "));
    }

    #[test]
    fn zero_is_the_beginning_of_the_stream_as_a_position() {
        assert_eq!(parse_position("--to-id", "0"), Ok(BEGINNING));
        assert_eq!(parse_position("--to-id", "0-0"), Ok(BEGINNING));
        assert_eq!(
            parse_position("--to-id", "5-1"),
            Ok(EntryId { ms: 5, seq: 1 })
        );
        assert!(parse_position("--to-id", "soon").is_err());
        assert!(parse_position("--to-id", "00").is_err());
    }
}
