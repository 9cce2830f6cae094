//! Customer ids in the table: short ones (up to [`INLINE_ID`] bytes) inside
//! their record, zero-padded, compared as words; longer ones in the id
//! arena, the record holding their offset.

use super::index::Slot;
use super::layout::{header_word, HEADER, ID, ID_END, INLINE_ID};

/// A short id as its record holds it: its length in the low bits of the
/// first word, its bytes zero-padded in the next three. A lookup compares
/// words (a few instructions) instead of calling memcmp on the bytes.
#[derive(Clone, Copy)]
pub(super) struct InlineKey {
    len: u32,
    words: [u32; 3],
}

impl InlineKey {
    #[inline]
    pub(super) fn of(id: &str) -> Option<InlineKey> {
        let b = id.as_bytes();
        if b.is_empty() || b.len() > INLINE_ID {
            return None;
        }
        let mut bytes = [0u8; INLINE_ID];
        bytes[..b.len()].copy_from_slice(b);
        let word =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        Some(InlineKey {
            len: b.len() as u32,
            words: [word(0), word(4), word(8)],
        })
    }

    /// Whether the record in `slot` holds this id. Inline ids are stored
    /// zero-padded (records start zeroed; see `push` and `from_records`).
    #[inline]
    pub(super) fn matches(&self, words: &[u32], stride: usize, slot: Slot) -> bool {
        let base = slot as usize * stride;
        match words.get(base..base + ID_END) {
            Some(head) => {
                header_word::id_len(head[HEADER]) == self.len as usize
                    && head[ID..ID_END] == self.words
            }
            None => false,
        }
    }
}

/// The id bytes of a record whose first words (to [`ID_END`]) are `head`.
#[inline]
pub(super) fn id_of<'a>(head: &'a [u32], ids: &'a [u8]) -> &'a [u8] {
    let len = header_word::id_len(head[HEADER]);
    if len <= INLINE_ID {
        &bytemuck::cast_slice::<u32, u8>(&head[ID..ID_END])[..len]
    } else {
        let start = head[ID] as usize;
        &ids[start..start + len]
    }
}

/// A customer's id, copied out of its record when short, so that the
/// record can be written while the id is in use; decoded only when needed.
#[derive(Clone, Copy)]
pub enum CustomerId<'a> {
    Inline([u8; INLINE_ID], u8),
    Arena(&'a [u8]),
}

impl CustomerId<'_> {
    pub fn as_str(&self) -> &str {
        let bytes = match self {
            CustomerId::Inline(b, len) => &b[..usize::from(*len)],
            CustomerId::Arena(b) => b,
        };
        id_str(bytes)
    }
}

/// A stored id as text. Ids are copied from `&str`s (and checked when a
/// snapshot is restored), so they are valid UTF-8; an ASCII id, the usual
/// case, is taken as it is (`from_utf8` on every output was 0.5% of a
/// replay's instructions).
#[inline]
pub(super) fn id_str(bytes: &[u8]) -> &str {
    if bytes.is_ascii() {
        // SAFETY: ASCII bytes are valid UTF-8.
        unsafe { std::str::from_utf8_unchecked(bytes) }
    } else {
        std::str::from_utf8(bytes).unwrap_or("")
    }
}
