//! All customers of one partition: the records in one array of words
//! (`mapped::MappedWords`: a mapping that grows without copies), the ids
//! of the long ones back to back in a byte arena, the [`SlotIndex`] from
//! an id's hash to its slot, and the wake-up marks of the sweeps. A
//! removed customer (forgotten or erased) is replaced by the last record,
//! so that the table stays dense and its memory is reused; the id arena is
//! compacted once half of it is garbage. A snapshot copies the table
//! while it changes ([`SnapshotCopy`]).

use super::id::{id_of, id_str, CustomerId, InlineKey};
use super::index::{Slot, SlotIndex, MAX_SLOT};
use super::layout::{
    flags, header_word, Layout, HEADER, ID, ID_END, INLINE_ID, LAST_EVENT_AT, PEAK_AT,
};
use super::prefetch::prefetch_lines;
use super::record::{Record, RecordMut};
use super::snapshot_copy::SnapshotCopy;
use crate::mapped::{Mapped, MappedWords};
use crate::timestamp::Millis;

/// A removed customer, as the changelog store needs it for a tombstone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    pub id: Box<str>,
    /// Its record had gone to the changelog before (`flags::PERSISTED`).
    pub persisted: bool,
}

/// Why the table cannot take another customer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableFull {
    #[error("a partition cannot hold more than {} customers", u32::MAX)]
    Customers,
    #[error("a partition cannot hold more than 4 GiB of customer ids")]
    Ids,
}

/// All customers of one partition.
pub struct CustomerTable {
    layout: Layout,
    words: MappedWords,
    ids: Mapped<u8>,
    index: SlotIndex,
    hasher: foldhash::fast::RandomState,
    /// Per customer, the sweep (counted from `wake_base`) up to which
    /// evaluating it cannot change anything; 0 when unknown. Kept apart from
    /// the records so that a sweep scans 2 bytes per customer, not a record.
    wake: Mapped<u16>,
    wake_base: i64,
    /// A snapshot being copied out while processing goes on (copy-on-write).
    snapshot: Option<SnapshotCopy>,
    /// Bytes of the id arena no record points to any more.
    ids_garbage: usize,
    /// Customers removed since [`Self::take_removed`], with their
    /// `PERSISTED` flag, when the shell asked for them (the changelog store
    /// writes their tombstones).
    removed: Option<Vec<Removed>>,
}

impl std::fmt::Debug for CustomerTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CustomerTable")
            .field("customers", &self.len())
            .field("layout", &self.layout)
            .finish()
    }
}

/// A new customer's first values.
pub struct NewCustomer {
    pub last_event_at: Millis,
    pub peak_at: Millis,
}

impl CustomerTable {
    pub fn new(layout: Layout) -> CustomerTable {
        CustomerTable {
            layout,
            words: MappedWords::new(),
            ids: Mapped::new(),
            index: SlotIndex::new(),
            hasher: foldhash::fast::RandomState::default(),
            wake: Mapped::new(),
            wake_base: 0,
            snapshot: None,
            ids_garbage: 0,
            removed: None,
        }
    }

    /// From now on, ids hash as in `other` (the table must be empty): two
    /// tables fed the same events then share each event's one hash.
    pub fn hash_like(&mut self, other: &CustomerTable) {
        debug_assert!(self.is_empty());
        self.hasher = other.hasher.clone();
    }

    /// Keeps the ids of removed customers until [`Self::take_removed`].
    pub fn track_removals(&mut self) {
        self.removed.get_or_insert_with(Vec::new);
    }

    /// The customers removed since the last call (empty unless
    /// [`Self::track_removals`] was called).
    pub fn take_removed(&mut self) -> Vec<Removed> {
        self.removed
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Adds to the removed customers one that the store must delete (a
    /// restore found a record of it that no longer counts).
    pub fn note_removed(&mut self, removed: Removed) {
        self.removed.get_or_insert_with(Vec::new).push(removed);
    }

    /// Marks a customer changed, so that the next snapshot writes it.
    pub fn mark_dirty(&mut self, id: &str) {
        if let Some(slot) = self.find(id) {
            self.record_mut(slot).set_flag(flags::DIRTY, true);
        }
    }

    /// Removes the customer in `slot`. The last record moves into `slot`
    /// (a caller walking the slots must look at `slot` again). During a
    /// snapshot both records are saved first, so that the snapshot still
    /// sees the table as it was when it began.
    pub fn remove(&mut self, slot: Slot) {
        let len = self.len();
        let s = slot as usize;
        if s >= len {
            return;
        }
        let last = (len - 1) as Slot;
        self.before_write(slot);
        self.before_write(last);
        let stride = self.layout.stride;
        let id = Self::id_bytes(&self.words, &self.ids, stride, slot);
        let hash = self.hash(id);
        if id.len() > INLINE_ID {
            self.ids_garbage += id.len();
        }
        if let Some(removed) = &mut self.removed {
            let flags = header_word::flags(self.words[s * stride]);
            removed.push(Removed {
                id: String::from_utf8_lossy(id).into(),
                persisted: flags & flags::PERSISTED != 0,
            });
        }
        {
            let (words, ids, hasher) = (&self.words, &self.ids, &self.hasher);
            self.index.remove(hash, slot, |s| {
                Self::slot_hash(hasher, words, ids, stride, s)
            });
        }
        if slot != last {
            let moved_hash = self.hash(Self::id_bytes(&self.words, &self.ids, stride, last));
            self.index.replace(moved_hash, last, slot);
            let from = last as usize * stride;
            self.words.copy_within(from..from + stride, s * stride);
            self.wake[s] = self.wake[last as usize];
        }
        self.words.truncate(last as usize * stride);
        self.wake.truncate(last as usize);
        self.compact_ids();
    }

    /// Rewrites the id arena without the ids of removed customers, once
    /// they are most of it. Not while a snapshot copies records: their
    /// arena offsets must stay valid until it ends.
    fn compact_ids(&mut self) {
        if self.snapshot.is_some()
            || self.ids_garbage < 1 << 16
            || self.ids_garbage * 2 < self.ids.len()
        {
            return;
        }
        let stride = self.layout.stride;
        let mut ids = Mapped::new();
        ids.reserve(self.ids.len() - self.ids_garbage);
        for base in (0..self.words.len()).step_by(stride) {
            let len = header_word::id_len(self.words[base]);
            if len > INLINE_ID {
                let start = self.words[base + ID] as usize;
                // The arena only shrinks, so new offsets fit in a u32.
                self.words[base + ID] = ids.len() as u32;
                ids.extend_from_slice(&self.ids[start..start + len]);
            }
        }
        self.ids = ids;
        self.ids_garbage = 0;
    }

    /// A table from the records and id arena of a snapshot, its index
    /// rebuilt. Fails when the parts are inconsistent.
    pub fn from_parts(
        layout: Layout,
        words: impl Into<MappedWords>,
        ids: impl Into<Mapped<u8>>,
    ) -> Result<CustomerTable, String> {
        let words = words.into();
        let ids = ids.into();
        if words.len() % layout.stride != 0 {
            return Err("record data is not a whole number of records".into());
        }
        let mut t = CustomerTable::new(layout);
        let n = words.len() / layout.stride;
        for slot in 0..n {
            let head = &words[slot * layout.stride..slot * layout.stride + ID_END];
            let len = header_word::id_len(head[HEADER]);
            if len == 0 || len > 256 {
                return Err(format!("record {slot}: bad id length {len}"));
            }
            if len > INLINE_ID && (head[ID] as usize).saturating_add(len) > ids.len() {
                return Err(format!("record {slot}: id outside the id arena"));
            }
            if std::str::from_utf8(id_of(head, &ids)).is_err() {
                return Err(format!("record {slot}: id is not UTF-8"));
            }
        }
        t.words = words;
        t.ids = ids;
        t.wake.resize(n, 0);
        let stride = layout.stride;
        {
            let (words, ids, hasher) = (&t.words, &t.ids, &t.hasher);
            t.index
                .reserve(n, |s| Self::slot_hash(hasher, words, ids, stride, s));
        }
        for slot in 0..n as Slot {
            let hash = t.hash(Self::id_bytes(&t.words, &t.ids, stride, slot));
            let (words, ids, hasher) = (&t.words, &t.ids, &t.hasher);
            if t.index
                .find(hash, |s| {
                    Self::id_bytes(words, ids, stride, s)
                        == Self::id_bytes(words, ids, stride, slot)
                })
                .is_some()
            {
                return Err(format!("record {slot}: duplicate customer id"));
            }
            t.index.insert_unique(hash, slot, |s| {
                Self::slot_hash(hasher, words, ids, stride, s)
            });
        }
        Ok(t)
    }

    /// All records and the id arena, as stored.
    pub fn raw_parts(&self) -> (&[u32], &[u8]) {
        (&self.words, &self.ids)
    }

    /// A table from (id, record words) pairs written by another table: the
    /// id words are rewritten for this one; every record starts clean and
    /// `PERSISTED`.
    pub fn from_records<'a>(
        layout: Layout,
        records: impl Iterator<Item = (&'a str, &'a [u32])>,
    ) -> Result<CustomerTable, String> {
        let stride = layout.stride;
        let dirty_bit = header_word::flag_bit(flags::DIRTY);
        let persisted_bit = header_word::flag_bit(flags::PERSISTED);
        let mut words = MappedWords::new();
        let mut ids = Mapped::new();
        for (id, rec) in records {
            if rec.len() != stride {
                return Err(format!("record of {} words, expected {stride}", rec.len()));
            }
            if id.is_empty() || id.len() > 256 {
                return Err(format!("bad customer id length {}", id.len()));
            }
            let base = words.len();
            words.extend_from_slice(rec);
            words[base] =
                header_word::with_id_len(words[base] & !dirty_bit, id.len()) | persisted_bit;
            if id.len() > INLINE_ID {
                words[base + ID] =
                    u32::try_from(ids.len()).map_err(|_| "id arena full".to_string())?;
                ids.extend_from_slice(id.as_bytes());
            } else {
                let inline: &mut [u8] =
                    bytemuck::cast_slice_mut(&mut words[base + ID..base + ID_END]);
                inline.fill(0);
                inline[..id.len()].copy_from_slice(id.as_bytes());
            }
        }
        CustomerTable::from_parts(layout, words, ids)
    }

    /// Starts a copy-on-write snapshot; returns (records, id bytes) it covers.
    pub fn begin_snapshot(&mut self) -> (usize, usize) {
        let copy = SnapshotCopy::begin(self.len(), self.ids.len());
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
    fn before_write(&mut self, slot: Slot) {
        if self.snapshot.is_some() {
            self.save_for_snapshot(slot);
        }
    }

    /// [`Self::before_write`] while a snapshot is being copied.
    #[cold]
    fn save_for_snapshot(&mut self, slot: Slot) {
        let stride = self.layout.stride;
        if let Some(copy) = &mut self.snapshot {
            let base = slot as usize * stride;
            if let Some(record) = self.words.get(base..base + stride) {
                copy.save(slot, record);
            }
        }
    }

    /// Appends up to `max` more records of the snapshot to `out`, as they
    /// were when it began. Returns true when every record was copied; the
    /// id arena is then `ids_at_start`.
    pub fn snapshot_chunk(&mut self, max: usize, out: &mut Vec<u32>) -> bool {
        let stride = self.layout.stride;
        match &mut self.snapshot {
            Some(copy) => copy.chunk(&self.words, stride, max, out),
            None => true,
        }
    }

    /// As [`Self::snapshot_chunk`], but hands only the records changed since
    /// the last snapshot to `write` (id, words), marks the live ones that did
    /// not change during this snapshot clean, and marks every customer
    /// written `PERSISTED`.
    pub fn snapshot_chunk_dirty(&mut self, max: usize, write: impl FnMut(&str, &[u32])) -> bool {
        let stride = self.layout.stride;
        let Some(copy) = &mut self.snapshot else {
            return true;
        };
        let (done, moved) = copy.chunk_dirty(&mut self.words, &self.ids, stride, max, write);
        // Changed (or moved, or removed) since the snapshot began: it
        // stays dirty; find it by id to flag it.
        let persisted_bit = header_word::flag_bit(flags::PERSISTED);
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

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn len(&self) -> usize {
        self.words.len() / self.layout.stride
    }

    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    fn hash(&self, id: &[u8]) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(id)
    }

    /// The hash of the id in `slot`, from the table's parts: what the
    /// index asks for (to grow or shift) while it is borrowed mutably.
    #[inline]
    fn slot_hash(
        hasher: &foldhash::fast::RandomState,
        words: &[u32],
        ids: &[u8],
        stride: usize,
        slot: Slot,
    ) -> u64 {
        use std::hash::BuildHasher;
        hasher.hash_one(Self::id_bytes(words, ids, stride, slot))
    }

    #[inline]
    fn id_bytes<'a>(words: &'a [u32], ids: &'a [u8], stride: usize, slot: Slot) -> &'a [u8] {
        let base = slot as usize * stride;
        id_of(&words[base..base + ID_END], ids)
    }

    /// The slot of a customer, if known.
    #[inline]
    pub fn find(&self, id: &str) -> Option<Slot> {
        self.find_hashed(self.hash(id.as_bytes()), id)
    }

    /// The hash [`Self::find_hashed`] and [`Self::find_or_insert_hashed`] take.
    #[inline]
    pub fn hash_id(&self, id: &str) -> u64 {
        self.hash(id.as_bytes())
    }

    /// [`Self::find`] with the id's hash computed beforehand.
    #[inline]
    pub fn find_hashed(&self, hash: u64, id: &str) -> Option<Slot> {
        let (words, ids, stride) = (&self.words, &self.ids, self.layout.stride);
        if let Some(key) = InlineKey::of(id) {
            return self
                .index
                .find(hash, |slot| key.matches(words, stride, slot));
        }
        self.index.find(hash, |slot| {
            Self::id_bytes(words, ids, stride, slot) == id.as_bytes()
        })
    }

    /// The first stage of a lookup in stages: starts loading the index
    /// lines where the probe for `id` begins, without reading memory. Only
    /// a hint; [`Self::prefetch`] is the second stage.
    #[inline]
    pub fn prefetch_index(&self, id: &str) {
        self.index.prefetch(self.hash(id.as_bytes()));
    }

    /// [`Self::prefetch_index`] with the id's hash computed beforehand.
    #[inline]
    pub fn prefetch_index_hashed(&self, hash: u64) {
        self.index.prefetch(hash);
    }

    /// Starts loading the record of `id` into the cache, if it exists, so
    /// that a lookup a little later does not wait for memory. Only a hint.
    /// Reads the index: best after [`Self::prefetch_index`].
    #[inline]
    pub fn prefetch(&self, id: &str) {
        self.prefetch_hashed(self.hash(id.as_bytes()));
    }

    /// [`Self::prefetch`] with the id's hash computed beforehand.
    #[inline]
    pub fn prefetch_hashed(&self, hash: u64) {
        self.prefetch_hashed_with(hash, |_| {});
    }

    /// [`Self::prefetch_hashed`], also handing each candidate slot to
    /// `also` (a report prefetches its own counters of the customer).
    #[inline]
    pub fn prefetch_hashed_with(&self, hash: u64, mut also: impl FnMut(Slot)) {
        let (words, wake, stride) = (&self.words, &self.wake, self.layout.stride);
        // Every candidate of the probe is prefetched; none is compared.
        self.index.candidates(hash, |slot| {
            also(slot);
            let base = slot as usize * stride;
            if let Some(rec) = words.get(base..base + stride) {
                prefetch_lines(rec);
            }
            // Its wake-up mark is written at every evaluation.
            if let Some(w) = wake.get(slot as usize..slot as usize + 1) {
                prefetch_lines(w);
            }
        });
    }

    /// Starts loading the record in `slot` into the cache: a sweep calls
    /// it for the customers it will evaluate next. Only a hint.
    #[inline]
    pub fn prefetch_slot(&self, slot: Slot) {
        let stride = self.layout.stride;
        let base = slot as usize * stride;
        if let Some(rec) = self.words.get(base..base + stride) {
            prefetch_lines(rec);
        }
    }

    /// The slot of a customer, adding it with `init` when unknown.
    /// Returns the slot and whether it was added.
    #[inline]
    pub fn find_or_insert(
        &mut self,
        id: &str,
        init: impl FnOnce() -> NewCustomer,
    ) -> Result<(Slot, bool), TableFull> {
        self.find_or_insert_hashed(self.hash(id.as_bytes()), id, init)
    }

    /// [`Self::find_or_insert`] with the id's hash computed beforehand.
    #[inline]
    pub fn find_or_insert_hashed(
        &mut self,
        hash: u64,
        id: &str,
        init: impl FnOnce() -> NewCustomer,
    ) -> Result<(Slot, bool), TableFull> {
        if let Some(slot) = self.find_hashed(hash, id) {
            return Ok((slot, false));
        }
        Ok((self.insert_new_hashed(hash, id, init())?, true))
    }

    /// Adds a customer known to be absent (its hash computed beforehand).
    pub fn insert_new_hashed(
        &mut self,
        hash: u64,
        id: &str,
        init: NewCustomer,
    ) -> Result<Slot, TableFull> {
        let slot = self.push(id, init)?;
        let stride = self.layout.stride;
        let hasher = &self.hasher;
        let (words, ids) = (&self.words, &self.ids);
        if self.index.needs_room(1) {
            // Records in slot order: read one after the other.
            self.index.rebuild(
                self.index.len() + 1,
                (0..slot).map(|s| (Self::slot_hash(hasher, words, ids, stride, s), s)),
            );
        }
        self.index.insert_unique(hash, slot, |s| {
            Self::slot_hash(hasher, words, ids, stride, s)
        });
        Ok(slot)
    }

    fn push(&mut self, id: &str, init: NewCustomer) -> Result<Slot, TableFull> {
        let slot = Slot::try_from(self.len())
            .ok()
            .filter(|&s| s <= MAX_SLOT)
            .ok_or(TableFull::Customers)?;
        let stride = self.layout.stride;
        let base = self.words.len();
        if id.len() > INLINE_ID {
            let offset = u32::try_from(self.ids.len()).map_err(|_| TableFull::Ids)?;
            if self.ids.len() + id.len() > u32::MAX as usize {
                return Err(TableFull::Ids);
            }
            self.ids.extend_from_slice(id.as_bytes());
            self.words.resize(base + stride, 0);
            self.words[base + ID] = offset;
        } else {
            self.words.resize(base + stride, 0);
            let inline: &mut [u8] =
                bytemuck::cast_slice_mut(&mut self.words[base + ID..base + ID_END]);
            inline[..id.len()].copy_from_slice(id.as_bytes());
        }
        self.wake.resize(self.wake.len() + 1, 0);
        let rec = &mut self.words[base..base + stride];
        rec[HEADER] = header_word::with_id_len(0, id.len()); // segment 0, tier 0, no flags
        let mut r = RecordMut {
            w: rec,
            layout: &self.layout,
        };
        r.set_i64(LAST_EVENT_AT, init.last_event_at);
        r.set_i64(PEAK_AT, init.peak_at);
        for c in 0..self.layout.channels {
            r.clear_channel(c);
        }
        Ok(slot)
    }

    /// The id of the customer in `slot`.
    pub fn id(&self, slot: Slot) -> &str {
        id_str(Self::id_bytes(
            &self.words,
            &self.ids,
            self.layout.stride,
            slot,
        ))
    }

    #[inline]
    pub fn record(&self, slot: Slot) -> Record<'_> {
        let base = slot as usize * self.layout.stride;
        Record {
            w: &self.words[base..base + self.layout.stride],
            layout: &self.layout,
        }
    }

    #[inline]
    pub fn record_mut(&mut self, slot: Slot) -> RecordMut<'_> {
        self.before_write(slot);
        let base = slot as usize * self.layout.stride;
        RecordMut {
            w: &mut self.words[base..base + self.layout.stride],
            layout: &self.layout,
        }
    }

    /// The mutable record of a slot, with a way to get its id: the id is
    /// only decoded when a signal needs it.
    // Always inlined into the evaluation: left to the heuristics, it
    // was not once the report's code joined the crate (replay +2.5% of
    // its instructions, callgrind).
    #[inline(always)]
    pub fn id_and_record_mut(&mut self, slot: Slot) -> (CustomerId<'_>, RecordMut<'_>) {
        self.before_write(slot);
        let stride = self.layout.stride;
        let base = slot as usize * stride;
        let rec = &mut self.words[base..base + stride];
        let len = header_word::id_len(rec[HEADER]);
        let id = if len <= INLINE_ID {
            let mut inline = [0u8; INLINE_ID];
            inline.copy_from_slice(bytemuck::cast_slice::<u32, u8>(&rec[ID..ID_END]));
            CustomerId::Inline(inline, len as u8)
        } else {
            let start = rec[ID] as usize;
            CustomerId::Arena(&self.ids[start..start + len])
        };
        (
            id,
            RecordMut {
                w: rec,
                layout: &self.layout,
            },
        )
    }

    /// The wake-up marks of all customers, relative to [`Self::wake_base`].
    pub fn wakes(&self) -> &[u16] {
        &self.wake
    }

    pub fn wake_base(&self) -> i64 {
        self.wake_base
    }

    #[inline]
    pub fn set_wake(&mut self, slot: Slot, w: u16) {
        self.wake[slot as usize] = w;
    }

    /// Moves the base of the wake-up marks to `base`, keeping every mark's
    /// absolute value where it still fits and forgetting it (0) otherwise.
    pub fn rebase_wakes(&mut self, base: i64) {
        let shift = base - self.wake_base;
        for w in self.wake.iter_mut() {
            let abs = i64::from(*w) - shift;
            *w = if *w == 0 || abs <= 0 {
                0
            } else {
                abs.min(i64::from(u16::MAX)) as u16
            };
        }
        self.wake_base = base;
    }
}
