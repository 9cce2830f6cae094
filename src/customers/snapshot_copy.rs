//! A copy-on-write snapshot of the table, taken chunk by chunk while
//! processing goes on: a record not yet copied is saved before its first
//! change, so that the copy is the table as it was when the snapshot
//! began; the incremental form hands out only the records changed since
//! the last snapshot (the `DIRTY` flag) and marks them `PERSISTED`.

use super::id::id_of;
use super::index::Slot;
use super::layout::{flags, header_word, ID_END};
use super::table::CustomerTable;

/// A consistent copy of the table taken chunk by chunk: records not yet
/// copied are saved before their first change, so that the copy is the
/// table as it was when the snapshot began.
#[derive(Debug, Default)]
pub(super) struct SnapshotCopy {
    /// Records at the start: later ones are not part of the snapshot.
    pub(super) len: usize,
    /// Id arena bytes at the start.
    pub(super) ids_len: usize,
    /// Next record to copy.
    pub(super) next: usize,
    /// Records changed before being copied: their words at the start.
    pub(super) saved: std::collections::HashMap<Slot, Box<[u32]>>,
}

impl CustomerTable {
    /// Starts a copy-on-write snapshot; returns (records, id bytes) it covers.
    pub fn begin_snapshot(&mut self) -> (usize, usize) {
        let copy = SnapshotCopy {
            len: self.len(),
            ids_len: self.ids.len(),
            ..SnapshotCopy::default()
        };
        let covers = (copy.len, copy.ids_len);
        self.snapshot = Some(copy);
        covers
    }

    /// Whether a snapshot copy is in progress.
    pub fn snapshot_active(&self) -> bool {
        self.snapshot.is_some()
    }

    /// Saves a record's words before its first change during a snapshot.
    #[inline(always)]
    pub(super) fn before_write(&mut self, slot: Slot) {
        if self.snapshot.is_some() {
            self.save_for_snapshot(slot);
        }
    }

    /// [`Self::before_write`] while a snapshot is being copied.
    #[cold]
    fn save_for_snapshot(&mut self, slot: Slot) {
        if let Some(copy) = &mut self.snapshot {
            let s = slot as usize;
            if s >= copy.next && s < copy.len && !copy.saved.contains_key(&slot) {
                let base = s * self.layout.stride;
                copy.saved
                    .insert(slot, self.words[base..base + self.layout.stride].into());
            }
        }
    }

    /// Appends up to `max` more records of the snapshot to `out`, as they
    /// were when it began. Returns true when every record was copied; the
    /// id arena is then `ids_at_start`.
    pub fn snapshot_chunk(&mut self, max: usize, out: &mut Vec<u32>) -> bool {
        let stride = self.layout.stride;
        let Some(copy) = &mut self.snapshot else {
            return true;
        };
        let end = (copy.next + max).min(copy.len);
        for slot in copy.next..end {
            match copy.saved.remove(&(slot as Slot)) {
                Some(old) => out.extend_from_slice(&old),
                None => out.extend_from_slice(&self.words[slot * stride..(slot + 1) * stride]),
            }
        }
        copy.next = end;
        end == copy.len
    }

    /// As [`Self::snapshot_chunk`], but hands only the records changed since
    /// the last snapshot to `write` (id, words), marks the live ones that did
    /// not change during this snapshot clean, and marks every customer
    /// written `PERSISTED`.
    pub fn snapshot_chunk_dirty(
        &mut self,
        max: usize,
        mut write: impl FnMut(&str, &[u32]),
    ) -> bool {
        let stride = self.layout.stride;
        let dirty_bit = header_word::flag_bit(flags::DIRTY);
        let persisted_bit = header_word::flag_bit(flags::PERSISTED);
        let Some(copy) = &mut self.snapshot else {
            return true;
        };
        let end = (copy.next + max).min(copy.len);
        let mut moved: Vec<String> = Vec::new();
        for slot in copy.next..end {
            let base = slot * stride;
            let saved = copy.saved.remove(&(slot as Slot));
            let words: &[u32] = match &saved {
                Some(old) => old,
                None => &self.words[base..base + stride],
            };
            if words[0] & dirty_bit == 0 {
                continue;
            }
            let id = std::str::from_utf8(id_of(&words[..ID_END], &self.ids)).unwrap_or("");
            write(id, words);
            if saved.is_none() {
                self.words[base] = (self.words[base] & !dirty_bit) | persisted_bit;
            } else {
                // Changed (or moved, or removed) since the snapshot began:
                // it stays dirty; find it by id to flag it.
                moved.push(id.to_string());
            }
        }
        copy.next = end;
        let done = end == copy.len;
        for id in moved {
            if let Some(slot) = self.find(&id) {
                self.words[slot as usize * stride] |= persisted_bit;
            }
        }
        done
    }

    /// Marks every customer changed (after a failed incremental write).
    pub fn mark_all_dirty(&mut self) {
        let dirty_bit = header_word::flag_bit(flags::DIRTY);
        let stride = self.layout.stride;
        for slot in 0..self.len() {
            self.words[slot * stride] |= dirty_bit;
        }
    }

    /// The id arena as it was when the snapshot began, and ends the snapshot.
    pub fn finish_snapshot(&mut self) -> Vec<u8> {
        let ids = match self.snapshot.take() {
            Some(copy) => self.ids[..copy.ids_len].to_vec(),
            None => Vec::new(),
        };
        self.compact_ids();
        ids
    }

    /// Abandons a snapshot in progress.
    pub fn cancel_snapshot(&mut self) {
        self.snapshot = None;
        self.compact_ids();
    }
}
