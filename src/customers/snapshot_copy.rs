//! A copy-on-write snapshot of the table, taken chunk by chunk while
//! processing goes on: a record not yet copied is saved before its first
//! change, so that the copy is the table as it was when the snapshot
//! began; the incremental form hands out only the records changed since
//! the last snapshot (the `DIRTY` flag) and marks them `PERSISTED`. The
//! table drives it (`CustomerTable::begin_snapshot` and the rest) and
//! lends it its records.

use super::id::id_of;
use super::index::Slot;
use super::layout::{flags, header_word, ID_END};

/// A consistent copy of the table taken chunk by chunk.
#[derive(Debug, Default)]
pub(super) struct SnapshotCopy {
    /// Records at the start: later ones are not part of the snapshot.
    pub(super) len: usize,
    /// Id arena bytes at the start.
    pub(super) ids_len: usize,
    /// Next record to copy.
    next: usize,
    /// Records changed before being copied: their words at the start.
    saved: std::collections::HashMap<Slot, Box<[u32]>>,
}

impl SnapshotCopy {
    /// A snapshot of `len` records and `ids_len` bytes of id arena.
    pub(super) fn begin(len: usize, ids_len: usize) -> SnapshotCopy {
        SnapshotCopy {
            len,
            ids_len,
            ..SnapshotCopy::default()
        }
    }

    /// Saves `record` (the words of `slot`) before its first change, if
    /// the snapshot has yet to copy it.
    pub(super) fn save(&mut self, slot: Slot, record: &[u32]) {
        let s = slot as usize;
        if s >= self.next && s < self.len && !self.saved.contains_key(&slot) {
            self.saved.insert(slot, record.into());
        }
    }

    /// Appends up to `max` more records to `out`, as they were when the
    /// snapshot began; true when every record was copied.
    pub(super) fn chunk(
        &mut self,
        words: &[u32],
        stride: usize,
        max: usize,
        out: &mut Vec<u32>,
    ) -> bool {
        let end = (self.next + max).min(self.len);
        for slot in self.next..end {
            match self.saved.remove(&(slot as Slot)) {
                Some(old) => out.extend_from_slice(&old),
                None => out.extend_from_slice(&words[slot * stride..(slot + 1) * stride]),
            }
        }
        self.next = end;
        end == self.len
    }

    /// As [`Self::chunk`], handing only the records changed since the last
    /// snapshot to `write` (id, words). The live ones that did not change
    /// during this snapshot are marked clean and `PERSISTED` in `words`;
    /// the ids of those that did (changed, moved or removed since it
    /// began: they stay dirty) are returned, for the table to mark them
    /// `PERSISTED` where they are now. True when every record was copied.
    pub(super) fn chunk_dirty(
        &mut self,
        words: &mut [u32],
        ids: &[u8],
        stride: usize,
        max: usize,
        mut write: impl FnMut(&str, &[u32]),
    ) -> (bool, Vec<String>) {
        let dirty_bit = header_word::flag_bit(flags::DIRTY);
        let persisted_bit = header_word::flag_bit(flags::PERSISTED);
        let end = (self.next + max).min(self.len);
        let mut moved: Vec<String> = Vec::new();
        for slot in self.next..end {
            let base = slot * stride;
            let saved = self.saved.remove(&(slot as Slot));
            let record: &[u32] = match &saved {
                Some(old) => old,
                None => &words[base..base + stride],
            };
            if record[0] & dirty_bit == 0 {
                continue;
            }
            let id = std::str::from_utf8(id_of(&record[..ID_END], ids)).unwrap_or("");
            write(id, record);
            if saved.is_none() {
                words[base] = (words[base] & !dirty_bit) | persisted_bit;
            } else {
                moved.push(id.to_string());
            }
        }
        self.next = end;
        (end == self.len, moved)
    }
}
