//! An entry's field/value pairs.

use std::fmt;
use std::ops::Range;

use bytes::Bytes;

/// A value longer than any entry may be keeps only its first bytes, as it arrives and in the
/// dead letter of its `too_large` entry: an oversized entry must cost little, in the worker and in
/// Redis.
pub const TRUNCATED_VALUE_BYTES: usize = 4096;

/// An entry's field/value pairs as spans of the reply they were read in: the reply buffer is
/// shared (reference-counted) by every entry of a read, so reading a batch allocates a few
/// vectors, not one buffer per field.
#[derive(Clone)]
pub struct Fields {
    pub(crate) buf: Bytes,
    pub(crate) spans: Vec<(Range<usize>, Range<usize>)>,
    /// Values cut while they arrived (too long for any entry): pair index and true length.
    /// Empty, and free, for every entry of an acceptable size.
    pub(crate) cut: Vec<(usize, usize)>,
}

impl Fields {
    /// The pairs in stream order (repeated names included: the decoder rejects them).
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&[u8], &[u8])> + '_ {
        self.spans
            .iter()
            .map(|(k, v)| (&self.buf[k.clone()], &self.buf[v.clone()]))
    }

    /// The first value of `name`.
    pub fn get(&self, name: &[u8]) -> Option<&[u8]> {
        self.iter().find(|(k, _)| *k == name).map(|(_, v)| v)
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// Whether the entry has no fields.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Total bytes of names and values as the producer wrote them (cut values counted whole),
    /// for size limits checked before any parsing.
    pub fn byte_size(&self) -> usize {
        let kept: usize = self.spans.iter().map(|(k, v)| k.len() + v.len()).sum();
        kept + self
            .cut
            .iter()
            .map(|&(i, len)| len - self.spans[i].1.len())
            .sum::<usize>()
    }

    /// A copy in a buffer of its own: an entry kept after its read (waiting for its channel's
    /// budget) must not keep the whole reply it came in alive.
    pub fn detached(&self) -> Fields {
        let mut buf = Vec::with_capacity(self.spans.iter().map(|(k, v)| k.len() + v.len()).sum());
        let mut spans = Vec::with_capacity(self.spans.len());
        for (k, v) in self.iter() {
            let k_start = buf.len();
            buf.extend_from_slice(k);
            let v_start = buf.len();
            buf.extend_from_slice(v);
            spans.push((k_start..v_start, v_start..buf.len()));
        }
        Fields {
            buf: Bytes::from(buf),
            spans,
            cut: self.cut.clone(),
        }
    }

    /// The length of the `i`-th value as the producer wrote it (a cut value holds only its first
    /// bytes).
    pub fn value_len(&self, i: usize) -> usize {
        self.cut
            .iter()
            .find(|(at, _)| *at == i)
            .map(|(_, len)| *len)
            .unwrap_or_else(|| self.spans[i].1.len())
    }
}

impl<K: AsRef<[u8]>, V: AsRef<[u8]>> FromIterator<(K, V)> for Fields {
    /// Copies owned pairs into one buffer (tests, tools).
    fn from_iter<I: IntoIterator<Item = (K, V)>>(pairs: I) -> Self {
        let mut buf = Vec::new();
        let mut spans = Vec::new();
        for (k, v) in pairs {
            let k_start = buf.len();
            buf.extend_from_slice(k.as_ref());
            let v_start = buf.len();
            buf.extend_from_slice(v.as_ref());
            spans.push((k_start..v_start, v_start..buf.len()));
        }
        Fields {
            buf: Bytes::from(buf),
            spans,
            cut: Vec::new(),
        }
    }
}

impl fmt::Debug for Fields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.iter()
                    .map(|(k, v)| (String::from_utf8_lossy(k), String::from_utf8_lossy(v))),
            )
            .finish()
    }
}
