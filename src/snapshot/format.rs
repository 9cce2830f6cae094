//! The snapshot file format (version 1), written as a stream and checked
//! as a whole on read.
//!
//! ```text
//! magic "CESSNAP\0", version u32, partition i32, model fingerprint u64,
//! created_at i64, watermark i64 (i64::MIN: none), clock i64,
//! record stride u32, topic count u32, then per topic: name length u16,
//! name, next offset i64; customers u64, id arena bytes u64,
//! the records (customers * stride little-endian u32 words), the id arena,
//! CRC-32 of everything before it.
//! ```
//! All integers little-endian. A record is the engine's own fixed-size
//! customer record (see `customers`), so that writing is a copy and
//! restoring is a copy plus an index rebuild.

use std::io::{self, Write};

use crate::timestamp::Millis;

pub const MAGIC: &[u8; 8] = b"CESSNAP\0";
pub const VERSION: u32 = 1;

/// What a snapshot covers.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub partition: i32,
    /// Identifies the scoring model the state was built with.
    pub fingerprint: u64,
    pub created_at: Millis,
    pub watermark: Option<Millis>,
    pub clock: Millis,
    pub stride: u32,
    /// Per input topic, the next offset to process: every event before it
    /// is in the state, none after.
    pub offsets: Vec<(String, i64)>,
    pub customers: u64,
    pub ids_len: u64,
}

/// Why a snapshot could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("not a ces-stream snapshot")]
    Magic,
    #[error("snapshot format version {0} is not supported")]
    Version(u32),
    #[error("truncated at byte {0}")]
    Truncated(usize),
    #[error("checksum mismatch: the file is corrupt")]
    Checksum,
    #[error("inconsistent: {0}")]
    Inconsistent(String),
}

/// Writes a snapshot as a stream: header, records in chunks, then the ids.
pub struct Encoder<W: Write> {
    out: W,
    crc: crc32fast::Hasher,
    records_left: u64,
    stride: usize,
}

impl<W: Write> Encoder<W> {
    pub fn new(out: W, header: &Header) -> io::Result<Encoder<W>> {
        let mut e = Encoder {
            out,
            crc: crc32fast::Hasher::new(),
            records_left: header.customers,
            stride: header.stride as usize,
        };
        let mut h = Vec::with_capacity(128);
        h.extend_from_slice(MAGIC);
        h.extend_from_slice(&VERSION.to_le_bytes());
        h.extend_from_slice(&header.partition.to_le_bytes());
        h.extend_from_slice(&header.fingerprint.to_le_bytes());
        h.extend_from_slice(&header.created_at.to_le_bytes());
        h.extend_from_slice(&header.watermark.unwrap_or(i64::MIN).to_le_bytes());
        h.extend_from_slice(&header.clock.to_le_bytes());
        h.extend_from_slice(&header.stride.to_le_bytes());
        h.extend_from_slice(&(header.offsets.len() as u32).to_le_bytes());
        for (topic, offset) in &header.offsets {
            let name = topic.as_bytes();
            let len = u16::try_from(name.len())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "topic name too long"))?;
            h.extend_from_slice(&len.to_le_bytes());
            h.extend_from_slice(name);
            h.extend_from_slice(&offset.to_le_bytes());
        }
        h.extend_from_slice(&header.customers.to_le_bytes());
        h.extend_from_slice(&header.ids_len.to_le_bytes());
        e.put(&h)?;
        Ok(e)
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.crc.update(bytes);
        self.out.write_all(bytes)
    }

    /// Writes whole records (a multiple of the stride).
    pub fn records(&mut self, words: &[u32]) -> io::Result<()> {
        let n = (words.len() / self.stride.max(1)) as u64;
        if n > self.records_left || words.len() % self.stride.max(1) != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "more records than the header announced",
            ));
        }
        self.records_left -= n;
        #[cfg(target_endian = "little")]
        {
            self.put(bytemuck::cast_slice(words))
        }
        #[cfg(not(target_endian = "little"))]
        {
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            self.put(&bytes)
        }
    }

    /// Writes the id arena and the checksum; returns the writer.
    pub fn finish(mut self, ids: &[u8]) -> io::Result<W> {
        if self.records_left != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "fewer records than the header announced",
            ));
        }
        self.put(ids)?;
        let crc = self.crc.clone().finalize();
        self.out.write_all(&crc.to_le_bytes())?;
        self.out.flush()?;
        Ok(self.out)
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        let end = self
            .at
            .checked_add(n)
            .ok_or(FormatError::Truncated(self.at))?;
        let s = self
            .bytes
            .get(self.at..end)
            .ok_or(FormatError::Truncated(self.at))?;
        self.at = end;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().unwrap_or_default(),
        ))
    }
    fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or_default(),
        ))
    }
    fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().unwrap_or_default(),
        ))
    }
    fn i64(&mut self) -> Result<i64, FormatError> {
        Ok(self.u64()? as i64)
    }
}

/// Reads and checks a whole snapshot: header, records, id arena.
pub fn decode(bytes: &[u8]) -> Result<(Header, Vec<u32>, Vec<u8>), FormatError> {
    if bytes.len() < 12 || &bytes[..8] != MAGIC {
        return Err(FormatError::Magic);
    }
    let body_len = bytes
        .len()
        .checked_sub(4)
        .ok_or(FormatError::Truncated(0))?;
    let stored = u32::from_le_bytes(bytes[body_len..].try_into().unwrap_or_default());
    let mut r = Reader {
        bytes: &bytes[..body_len],
        at: 8,
    };
    let version = r.u32()?;
    if version != VERSION {
        return Err(FormatError::Version(version));
    }
    if crc32fast::hash(&bytes[..body_len]) != stored {
        return Err(FormatError::Checksum);
    }
    let partition = r.u32()? as i32;
    let fingerprint = r.u64()?;
    let created_at = r.i64()?;
    let watermark = Some(r.i64()?).filter(|&w| w != i64::MIN);
    let clock = r.i64()?;
    let stride = r.u32()?;
    let topics = r.u32()?;
    let mut offsets = Vec::with_capacity(topics.min(1024) as usize);
    for _ in 0..topics {
        let len = r.u16()? as usize;
        let name = std::str::from_utf8(r.take(len)?)
            .map_err(|_| FormatError::Inconsistent("topic name is not UTF-8".into()))?
            .to_string();
        offsets.push((name, r.i64()?));
    }
    let customers = r.u64()?;
    let ids_len = r.u64()?;
    let words_len = customers
        .checked_mul(u64::from(stride))
        .and_then(|w| usize::try_from(w).ok())
        .ok_or_else(|| FormatError::Inconsistent("record count overflows".into()))?;
    let record_bytes = r.take(
        words_len
            .checked_mul(4)
            .ok_or(FormatError::Truncated(r.at))?,
    )?;
    let words: Vec<u32> = record_bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let ids = r
        .take(usize::try_from(ids_len).map_err(|_| FormatError::Truncated(r.at))?)?
        .to_vec();
    if r.at != body_len {
        return Err(FormatError::Inconsistent("trailing bytes".into()));
    }
    Ok((
        Header {
            partition,
            fingerprint,
            created_at,
            watermark,
            clock,
            stride,
            offsets,
            customers,
            ids_len,
        },
        words,
        ids,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Header, Vec<u32>, Vec<u8>) {
        let header = Header {
            partition: 3,
            fingerprint: 0xfeed,
            created_at: 1_000,
            watermark: Some(2_000),
            clock: 2_500,
            stride: 4,
            offsets: vec![("clicks".into(), 42), ("segment".into(), 7)],
            customers: 3,
            ids_len: 5,
        };
        (header, (0..12).collect(), b"hello".to_vec())
    }

    fn encode(h: &Header, words: &[u32], ids: &[u8]) -> Vec<u8> {
        let mut e = Encoder::new(Vec::new(), h).unwrap();
        e.records(&words[..4]).unwrap();
        e.records(&words[4..]).unwrap();
        e.finish(ids).unwrap()
    }

    #[test]
    fn round_trips_in_chunks() {
        let (h, words, ids) = sample();
        let bytes = encode(&h, &words, &ids);
        let (h2, w2, i2) = decode(&bytes).unwrap();
        assert_eq!((h2, w2, i2), (h, words, ids));
    }

    #[test]
    fn corruption_and_truncation_are_detected() {
        let (h, words, ids) = sample();
        let bytes = encode(&h, &words, &ids);
        for cut in [0, 5, 20, bytes.len() / 2, bytes.len() - 1] {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut flipped = bytes.clone();
        flipped[60] ^= 1;
        assert!(matches!(decode(&flipped), Err(FormatError::Checksum)));
        let mut wrong = bytes.clone();
        wrong[0] = b'X';
        assert!(matches!(decode(&wrong), Err(FormatError::Magic)));
    }

    #[test]
    fn the_header_must_announce_the_records() {
        let (h, words, ids) = sample();
        let mut e = Encoder::new(Vec::new(), &h).unwrap();
        e.records(&words[..4]).unwrap();
        assert!(e.finish(&ids).is_err());
    }
}
