//! The channel grammar of the contract (section 1): 1 to 16 segments joined by `.`, each
//! `[a-z0-9_-]{1,64}`. Kept in one place because routing, backpressure and the legacy upcast
//! all depend on exactly the same rule.

/// Most segments a channel may have; also bounds pattern matching work.
pub const MAX_SEGMENTS: usize = 16;
/// Longest a single segment may be, in bytes.
pub const MAX_SEGMENT_LEN: usize = 64;

/// Why a string is not a valid channel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error("channel is empty")]
    Empty,
    #[error("channel has more than {MAX_SEGMENTS} segments")]
    TooManySegments,
    #[error("segment {0} is empty")]
    EmptySegment(usize),
    #[error("segment {0} is longer than {MAX_SEGMENT_LEN} bytes")]
    SegmentTooLong(usize),
    #[error("segment {0} has a character outside [a-z0-9_-]")]
    BadCharacter(usize),
}

/// Whether `segment` is a valid channel segment; `index` only labels the error.
pub fn check_segment(index: usize, segment: &str) -> Result<(), ChannelError> {
    if segment.is_empty() {
        return Err(ChannelError::EmptySegment(index));
    }
    if segment.len() > MAX_SEGMENT_LEN {
        return Err(ChannelError::SegmentTooLong(index));
    }
    if !segment.bytes().all(is_segment_byte) {
        return Err(ChannelError::BadCharacter(index));
    }
    Ok(())
}

/// Validates a whole channel.
pub fn check(channel: &str) -> Result<(), ChannelError> {
    if channel.is_empty() {
        return Err(ChannelError::Empty);
    }
    let mut count = 0;
    for (i, segment) in channel.split('.').enumerate() {
        count += 1;
        if count > MAX_SEGMENTS {
            return Err(ChannelError::TooManySegments);
        }
        check_segment(i + 1, segment)?;
    }
    Ok(())
}

fn is_segment_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_contract_examples() {
        assert_eq!(check("user.42.profile"), Ok(()));
        assert_eq!(check("flow.7f3c.progress"), Ok(()));
        assert_eq!(check("a"), Ok(()));
        assert_eq!(check(&["s"; 16].join(".")), Ok(()));
        assert_eq!(check(&"x".repeat(64)), Ok(()));
    }

    #[test]
    fn rejects_each_broken_rule() {
        assert_eq!(check(""), Err(ChannelError::Empty));
        assert_eq!(check("a..b"), Err(ChannelError::EmptySegment(2)));
        assert_eq!(check("a."), Err(ChannelError::EmptySegment(2)));
        assert_eq!(check("User.1"), Err(ChannelError::BadCharacter(1)));
        assert_eq!(check("user.*"), Err(ChannelError::BadCharacter(2)));
        assert_eq!(check(&"x".repeat(65)), Err(ChannelError::SegmentTooLong(1)));
        assert_eq!(
            check(&["s"; 17].join(".")),
            Err(ChannelError::TooManySegments)
        );
    }
}
