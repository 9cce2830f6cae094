//! The compact per-customer state store of one partition.
//!
//! A million customers must fit in about 150 MB, so there is no per-customer
//! allocation: every customer is a fixed-size record of 32-bit words in one
//! array (`mapped::MappedWords`: a mapping that grows without copies),
//! whose stride depends on the model (one word per activity sum, one per
//! channel). Customer ids live back to back in one byte arena, and a
//! [`SlotIndex`] maps an id's hash to its record's slot. A removed
//! customer (forgotten or erased) is replaced by the last record, so that
//! the table stays dense and its memory is reused; the id arena is
//! compacted once half of it is garbage.
//!
//! Record layout, in words:
//!
//! | word            | content                                               |
//! |-----------------|-------------------------------------------------------|
//! | 0               | id length (9 bits), segment (7), emitted tier (8), flags (8) |
//! | 1-3             | the id if at most 12 bytes, else its arena offset      |
//! | 4-5             | `last_event_at` (i64 ms)                               |
//! | 6-7             | `peak_at` (i64 ms)                                     |
//! | 8               | `peak_score` (f32)                                     |
//! | 9               | `emitted_score` (f32)                                  |
//! | 8 ..            | one f32 decayed sum per activity, at `last_event_at`  |
//! | then            | one channel time per channel (see below)               |
//! | then            | `input.dedup_depth` remembered event ids, 64-bit hashes, newest first (0: empty) |
//!
//! The decayed sums are kept at one reference time, the customer's
//! `last_event_at`, so that a customer with no new events costs nothing
//! until it is evaluated. Sums are stored as f32 (computed in f64): their
//! relative error, about 1e-7, is far below the model's 0.01-point tolerance.
//!
//! A channel time is the latest event with positive points in the channel.
//! It only matters while it lies within the diversity window, so it is kept
//! as its age at `last_event_at` in one u32 of milliseconds, with
//! `EXPIRED` once older than the window. Windows too long for a u32 (about
//! 49.7 days) switch to two words holding the absolute time instead.

use crate::mapped::{Mapped, MappedWords};
use crate::model::{Model, TierId};
use crate::slot_index::SlotIndex;
use crate::timestamp::Millis;

/// Index of a customer's record.
pub type Slot = u32;

const HEADER_WORDS: usize = 10;
/// Ids up to this many bytes are stored in the record.
const INLINE_ID: usize = 12;
/// A channel age meaning "no positive event within the window".
const EXPIRED: u32 = u32::MAX;
/// A wide channel time meaning "never".
const NEVER: Millis = Millis::MIN;

/// Per-customer boolean flags, in the record's flag byte.
pub mod flags {
    pub const EVER_ENGAGED: u8 = 1;
    pub const AT_RISK: u8 = 2;
    /// Changed since the last snapshot.
    pub const DIRTY: u8 = 4;
    /// A record of this customer went to the changelog store before (in
    /// its current generation): a restore that finds no committed record
    /// of it knows that compaction removed one.
    pub const PERSISTED: u8 = 8;
}

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

/// The shape of a record under a given model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub activities: usize,
    pub channels: usize,
    /// Channel times as absolute i64 (two words) instead of u32 ages.
    pub wide_channels: bool,
    /// Diversity window, for channel ages.
    pub window: Millis,
    /// Event ids remembered per customer (`input.dedup_depth`).
    pub dedup: usize,
    /// First word of the remembered ids.
    dedup_at: usize,
    stride: usize,
}

impl Layout {
    pub fn for_model(model: &Model) -> Layout {
        let activities = model.activities.len();
        // Without diversity, channel times are never read: store none.
        let (channels, window) = match model.diversity {
            Some(d) => (model.channels.len(), d.window),
            None => (0, 0),
        };
        let wide_channels = window >= Millis::from(EXPIRED);
        let channel_words = if wide_channels { 2 } else { 1 };
        let dedup = model.input.dedup_depth;
        let dedup_at = HEADER_WORDS + activities + channels * channel_words;
        Layout {
            activities,
            channels,
            wide_channels,
            window,
            dedup,
            dedup_at,
            stride: dedup_at + 2 * dedup,
        }
    }

    /// Words of one record.
    pub fn stride(&self) -> usize {
        self.stride
    }
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

/// A consistent copy of the table taken chunk by chunk: records not yet
/// copied are saved before their first change, so that the copy is the
/// table as it was when the snapshot began.
#[derive(Debug, Default)]
struct SnapshotCopy {
    /// Records at the start: later ones are not part of the snapshot.
    len: usize,
    /// Id arena bytes at the start.
    ids_len: usize,
    /// Next record to copy.
    next: usize,
    /// Records changed before being copied: their words at the start.
    saved: std::collections::HashMap<Slot, Box<[u32]>>,
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
            let flags = (self.words[s * stride] >> 24) as u8;
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
            let len = (self.words[base] & 0x1ff) as usize;
            if len > INLINE_ID {
                let start = self.words[base + 1] as usize;
                // The arena only shrinks, so new offsets fit in a u32.
                self.words[base + 1] = ids.len() as u32;
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
            let head = &words[slot * layout.stride..slot * layout.stride + 4];
            let len = (head[0] & 0x1ff) as usize;
            if len == 0 || len > 256 {
                return Err(format!("record {slot}: bad id length {len}"));
            }
            if len > INLINE_ID && (head[1] as usize).saturating_add(len) > ids.len() {
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
    fn before_write(&mut self, slot: Slot) {
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
    /// the last snapshot to `f` (id, words), marks the live ones that did
    /// not change during this snapshot clean, and marks every customer
    /// written `PERSISTED`.
    pub fn snapshot_chunk_dirty(&mut self, max: usize, mut f: impl FnMut(&str, &[u32])) -> bool {
        let stride = self.layout.stride;
        let dirty_bit = u32::from(flags::DIRTY) << 24;
        let persisted_bit = u32::from(flags::PERSISTED) << 24;
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
            let id = std::str::from_utf8(id_of(&words[..4], &self.ids)).unwrap_or("");
            f(id, words);
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
        let dirty_bit = u32::from(flags::DIRTY) << 24;
        let stride = self.layout.stride;
        for slot in 0..self.len() {
            self.words[slot * stride] |= dirty_bit;
        }
    }

    /// A table from (id, record words) pairs written by another table: the
    /// id words are rewritten for this one; every record starts clean and
    /// `PERSISTED`.
    pub fn from_records<'a>(
        layout: Layout,
        records: impl Iterator<Item = (&'a str, &'a [u32])>,
    ) -> Result<CustomerTable, String> {
        let stride = layout.stride;
        let dirty_bit = u32::from(flags::DIRTY) << 24;
        let persisted_bit = u32::from(flags::PERSISTED) << 24;
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
            words[base] = (words[base] & !0x1ff & !dirty_bit) | persisted_bit | id.len() as u32;
            if id.len() > INLINE_ID {
                words[base + 1] =
                    u32::try_from(ids.len()).map_err(|_| "id arena full".to_string())?;
                ids.extend_from_slice(id.as_bytes());
            } else {
                let inline: &mut [u8] = bytemuck::cast_slice_mut(&mut words[base + 1..base + 4]);
                inline.fill(0);
                inline[..id.len()].copy_from_slice(id.as_bytes());
            }
        }
        CustomerTable::from_parts(layout, words, ids)
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
        id_of(&words[base..base + 4], ids)
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
        let (words, wake, stride) = (&self.words, &self.wake, self.layout.stride);
        // Every candidate of the probe is prefetched; none is compared.
        self.index.candidates(hash, |slot| {
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
            .filter(|&s| s <= crate::slot_index::MAX_SLOT)
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
            self.words[base + 1] = offset;
        } else {
            self.words.resize(base + stride, 0);
            let inline: &mut [u8] = bytemuck::cast_slice_mut(&mut self.words[base + 1..base + 4]);
            inline[..id.len()].copy_from_slice(id.as_bytes());
        }
        self.wake.resize(self.wake.len() + 1, 0);
        let rec = &mut self.words[base..base + stride];
        rec[0] = id.len() as u32; // tier 0, no flags
        let mut r = RecordMut {
            w: rec,
            layout: &self.layout,
        };
        r.set_i64(4, init.last_event_at);
        r.set_i64(6, init.peak_at);
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
    #[inline]
    pub fn id_and_record_mut(&mut self, slot: Slot) -> (CustomerId<'_>, RecordMut<'_>) {
        self.before_write(slot);
        let stride = self.layout.stride;
        let base = slot as usize * stride;
        let rec = &mut self.words[base..base + stride];
        let len = (rec[0] & 0x1ff) as usize;
        let id = if len <= INLINE_ID {
            let mut inline = [0u8; INLINE_ID];
            inline.copy_from_slice(bytemuck::cast_slice::<u32, u8>(&rec[1..4]));
            CustomerId::Inline(inline, len as u8)
        } else {
            let start = rec[1] as usize;
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

/// Asks the CPU to bring `words` into the cache.
#[inline]
fn prefetch_lines<T>(words: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // Every cache line the words touch: a record need not start at a
        // line, so 30 words can span three lines, not two.
        let base = words.as_ptr().cast::<i8>();
        let misalign = base as usize & 63;
        let first = base.wrapping_sub(misalign);
        let mut offset = 0;
        while offset < misalign + std::mem::size_of_val(words) {
            // SAFETY: SSE is part of the x86_64 baseline, and a prefetch
            // neither reads nor writes memory (any address is allowed).
            unsafe { _mm_prefetch::<_MM_HINT_T0>(first.wrapping_add(offset)) };
            offset += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = words;
}

/// A short id as its record holds it: its length in the low bits of the
/// first word, its bytes zero-padded in the next three. A lookup compares
/// words (a few instructions) instead of calling memcmp on the bytes.
#[derive(Clone, Copy)]
struct InlineKey {
    len: u32,
    words: [u32; 3],
}

impl InlineKey {
    #[inline]
    fn of(id: &str) -> Option<InlineKey> {
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
    fn matches(&self, words: &[u32], stride: usize, slot: Slot) -> bool {
        let base = slot as usize * stride;
        match words.get(base..base + 4) {
            Some(head) => head[0] & 0x1ff == self.len && head[1..4] == self.words,
            None => false,
        }
    }
}

/// The id bytes of a record whose first 4 words are `head`.
#[inline]
fn id_of<'a>(head: &'a [u32], ids: &'a [u8]) -> &'a [u8] {
    let len = (head[0] & 0x1ff) as usize;
    if len <= INLINE_ID {
        &bytemuck::cast_slice::<u32, u8>(&head[1..4])[..len]
    } else {
        let start = head[1] as usize;
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
fn id_str(bytes: &[u8]) -> &str {
    if bytes.is_ascii() {
        // SAFETY: ASCII bytes are valid UTF-8.
        unsafe { std::str::from_utf8_unchecked(bytes) }
    } else {
        std::str::from_utf8(bytes).unwrap_or("")
    }
}

/// Read access to one customer's record.
#[derive(Clone, Copy)]
pub struct Record<'a> {
    w: &'a [u32],
    layout: &'a Layout,
}

/// Write access to one customer's record.
pub struct RecordMut<'a> {
    w: &'a mut [u32],
    layout: &'a Layout,
}

macro_rules! getters {
    () => {
        #[inline]
        fn get_i64(&self, at: usize) -> i64 {
            (u64::from(self.w[at]) | (u64::from(self.w[at + 1]) << 32)) as i64
        }
        #[inline]
        pub fn last_event_at(&self) -> Millis {
            self.get_i64(4)
        }
        #[inline]
        pub fn peak_at(&self) -> Millis {
            self.get_i64(6)
        }
        #[inline]
        pub fn peak_score(&self) -> f32 {
            f32::from_bits(self.w[8])
        }
        #[inline]
        pub fn emitted_score(&self) -> f32 {
            f32::from_bits(self.w[9])
        }
        /// The customer's configured segment (`[metrics] segments`), 0 if none.
        #[inline]
        pub fn segment(&self) -> u8 {
            ((self.w[0] >> 9) & 0x7f) as u8
        }
        #[inline]
        pub fn emitted_tier(&self) -> TierId {
            (self.w[0] >> 16) as u8
        }
        #[inline]
        pub fn flags(&self) -> u8 {
            (self.w[0] >> 24) as u8
        }
        #[inline]
        pub fn has(&self, flag: u8) -> bool {
            self.flags() & flag != 0
        }
        /// Decayed sum of activity `k` at `last_event_at`.
        #[inline]
        pub fn sum(&self, k: usize) -> f32 {
            f32::from_bits(self.w[HEADER_WORDS + k])
        }
        /// The decayed sums of every activity, as f32 bits (one bounds
        /// check for all of them, for loops over activities).
        #[inline]
        pub fn sum_bits(&self) -> &[u32] {
            &self.w[HEADER_WORDS..HEADER_WORDS + self.layout.activities]
        }
        /// Whether `hash` is among the remembered event ids.
        #[inline]
        pub fn remembers(&self, hash: u64) -> bool {
            let at = self.layout.dedup_at;
            (0..self.layout.dedup).any(|i| self.get_i64(at + 2 * i) as u64 == hash)
        }
        /// The remembered event-id hashes, newest first (0: empty).
        pub fn remembered(&self) -> impl Iterator<Item = u64> + '_ {
            let at = self.layout.dedup_at;
            (0..self.layout.dedup).map(move |i| self.get_i64(at + 2 * i) as u64)
        }
        /// How many channels had a positive event within `window` before
        /// `t` (`t - time <= window`): [`Self::channel_time`] for every
        /// channel, counted without a branch per channel.
        #[inline]
        pub fn channels_within(&self, t: Millis, window: Millis) -> u32 {
            let at = HEADER_WORDS + self.layout.activities;
            let n = self.layout.channels;
            if self.layout.wide_channels {
                (0..n)
                    .filter(|&c| self.channel_time(c).is_some_and(|tc| t - tc <= window))
                    .count() as u32
            } else {
                // t - (last - age) <= window, as a bound on the age; below
                // EXPIRED, so that an expired channel never counts.
                let limit = window - (t - self.last_event_at());
                if limit < 0 {
                    return 0;
                }
                let limit = limit.min(i64::from(EXPIRED - 1)) as u32;
                self.w[at..at + n]
                    .iter()
                    .filter(|&&age| age <= limit)
                    .count() as u32
            }
        }
        /// Time of the latest positive event in channel `c`, if it may still
        /// lie within the diversity window.
        #[inline]
        pub fn channel_time(&self, c: usize) -> Option<Millis> {
            let at = HEADER_WORDS + self.layout.activities;
            if self.layout.wide_channels {
                let t = self.get_i64(at + 2 * c);
                (t != NEVER).then_some(t)
            } else {
                let age = self.w[at + c];
                (age != EXPIRED).then(|| self.last_event_at() - Millis::from(age))
            }
        }
    };
}

impl Record<'_> {
    getters!();
}

impl RecordMut<'_> {
    getters!();

    #[inline]
    fn set_i64(&mut self, at: usize, v: i64) {
        self.w[at] = v as u64 as u32;
        self.w[at + 1] = ((v as u64) >> 32) as u32;
    }

    #[inline]
    pub fn set_peak(&mut self, score: f32, at: Millis) {
        self.w[8] = score.to_bits();
        self.set_i64(6, at);
    }

    #[inline]
    pub fn set_emitted(&mut self, score: f32, tier: TierId) {
        self.w[9] = score.to_bits();
        self.w[0] = (self.w[0] & 0xff00_ffff) | (u32::from(tier) << 16);
    }

    #[inline]
    pub fn set_segment(&mut self, segment: u8) {
        self.w[0] = (self.w[0] & !(0x7f << 9)) | (u32::from(segment & 0x7f) << 9);
    }

    #[inline]
    pub fn set_flag(&mut self, flag: u8, on: bool) {
        let f = if on {
            self.flags() | flag
        } else {
            self.flags() & !flag
        };
        self.w[0] = (self.w[0] & 0x00ff_ffff) | (u32::from(f) << 24);
    }

    #[inline]
    pub fn set_sum(&mut self, k: usize, v: f64) {
        // Saturate instead of overflowing to infinity: inf - inf would be NaN.
        let v = v.clamp(-(f32::MAX as f64), f32::MAX as f64) as f32;
        self.w[HEADER_WORDS + k] = v.to_bits();
    }

    fn clear_channel(&mut self, c: usize) {
        let at = HEADER_WORDS + self.layout.activities;
        if self.layout.wide_channels {
            self.set_i64(at + 2 * c, NEVER);
        } else {
            self.w[at + c] = EXPIRED;
        }
    }

    /// Moves the reference time of the sums to `t > last_event_at`:
    /// multiplies every sum by `factor` (the decay over the gap) and ages the
    /// channel times.
    #[inline]
    pub fn advance_to(&mut self, t: Millis, factor: f64) {
        let gap = t - self.last_event_at();
        let n = self.layout.activities;
        // A decay factor is at most 1: no product leaves f32's range, so
        // `set_sum`'s clamp is not needed (and the loop vectorizes).
        debug_assert!((0.0..=1.0).contains(&factor));
        for w in &mut self.w[HEADER_WORDS..HEADER_WORDS + n] {
            *w = ((f64::from(f32::from_bits(*w)) * factor) as f32).to_bits();
        }
        if !self.layout.wide_channels {
            let at = HEADER_WORDS + n;
            let window = self.layout.window;
            // The window is below EXPIRED (else channels are wide), so an
            // expired age, aged further, stays expired without a test.
            for age in &mut self.w[at..at + self.layout.channels] {
                let new_age = Millis::from(*age) + gap;
                *age = if new_age > window {
                    EXPIRED
                } else {
                    new_age as u32
                };
            }
        }
        self.set_i64(4, t);
    }

    /// Records a positive event at `t <= last_event_at` in channel `c`.
    #[inline]
    pub fn touch_channel(&mut self, c: usize, t: Millis) {
        let at = HEADER_WORDS + self.layout.activities;
        if self.layout.wide_channels {
            if self.channel_time(c).is_none_or(|prev| t > prev) {
                self.set_i64(at + 2 * c, t);
            }
        } else {
            let age = self.last_event_at() - t;
            if age <= self.layout.window && (age as u32) < self.w[at + c] {
                self.w[at + c] = age as u32;
            }
        }
    }

    /// Remembers an accepted event's id hash (never 0), forgetting the
    /// oldest one when all `dedup` places are taken.
    #[inline]
    pub fn remember(&mut self, hash: u64) {
        let (at, n) = (self.layout.dedup_at, self.layout.dedup);
        if n == 0 {
            return;
        }
        self.w.copy_within(at..at + 2 * (n - 1), at + 2);
        self.set_i64(at, hash as i64);
    }

    pub fn as_record(&self) -> Record<'_> {
        Record {
            w: self.w,
            layout: self.layout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        let settings = crate::config::Settings::from_toml(
            "[scoring.activities]\na = { weight = 1.0 }\nb = { weight = 2.0 }\n[input]\ndedup_depth = 2\n",
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        Layout::for_model(&settings.model)
    }

    /// Every customer's id and record words, sorted by id.
    fn contents(t: &CustomerTable) -> Vec<(String, Vec<u32>)> {
        let mut v: Vec<_> = (0..t.len() as Slot)
            .map(|s| (t.id(s).to_string(), t.record(s).w[4..].to_vec()))
            .collect();
        v.sort();
        v
    }

    fn id(i: u64) -> String {
        // Short ids live in the record, long ones in the arena.
        if i % 3 == 0 {
            format!("a-rather-long-customer-id-{i}")
        } else {
            format!("c{i}")
        }
    }

    #[test]
    fn channels_within_counts_what_channel_time_says() {
        // Narrow (u32 ages) and wide (absolute times) channel storage.
        for window in ["30d", "60d"] {
            let settings = crate::config::Settings::from_toml(
                &format!(
                    "[scoring.activities]\na = {{ weight = 1.0, channel = \"web\" }}\n\
                     b = {{ weight = 1.0, channel = \"app\" }}\nc = {{ weight = 1.0, channel = \"email\" }}\n\
                     [scoring.diversity]\nwindow = \"{window}\"\nbonus_per_channel = 0.1\nmax_channels = 3\n"
                ),
                std::path::Path::new("t.toml"),
            )
            .unwrap();
            let layout = Layout::for_model(&settings.model);
            let w = settings.model.diversity.unwrap().window;
            let mut t = CustomerTable::new(layout);
            let day = 86_400_000;
            let (slot, _) = t
                .find_or_insert("c", || NewCustomer {
                    last_event_at: 100 * day,
                    peak_at: 0,
                })
                .unwrap();
            let mut r = t.record_mut(slot);
            r.touch_channel(0, 100 * day);
            r.touch_channel(1, 100 * day - 10 * day);
            // Channel 2 never touched.
            for dt in [
                0,
                1,
                10 * day,
                20 * day,
                w - 10 * day,
                w - 1,
                w,
                w + 1,
                2 * w,
                -5,
            ] {
                let at = 100 * day + dt;
                let expected = (0..3)
                    .filter(|&c| r.channel_time(c).is_some_and(|tc| at - tc <= w))
                    .count() as u32;
                assert_eq!(
                    r.channels_within(at, w),
                    expected,
                    "window {window}, dt {dt}"
                );
            }
        }
    }

    #[test]
    fn ids_of_every_length_are_found_exactly() {
        // Around the inline limit (12 bytes), with NUL bytes and ids that
        // are prefixes or zero-padded versions of each other: a lookup
        // finds exactly the id inserted, byte for byte.
        let mut ids: Vec<String> = Vec::new();
        for len in 1..=16 {
            let base: String = "abcdefghijklmnop"[..len].to_string();
            ids.push(base.clone());
            ids.push(format!("{}\0", &base[..len - 1]));
            ids.push(format!("\0{}", &base[1..]));
            ids.push(format!("{}é", &base[..len - 1]));
        }
        ids.sort();
        ids.dedup();
        let mut t = CustomerTable::new(layout());
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(t.find(id), None, "{id:?} before insertion");
            let (slot, new) = t
                .find_or_insert(id, || NewCustomer {
                    last_event_at: i as i64,
                    peak_at: 0,
                })
                .unwrap();
            assert!(new, "{id:?}");
            assert_eq!(slot as usize, i);
        }
        for (i, id) in ids.iter().enumerate() {
            let slot = t.find(id).unwrap();
            assert_eq!(t.id(slot), id);
            assert_eq!(t.record(slot).last_event_at(), i as i64);
            let hash = t.hash_id(id);
            assert_eq!(t.find_hashed(hash, id), Some(slot));
        }
        assert_eq!(t.find("abcdefghijklmnopq"), None);
        assert_eq!(t.find("\0\0"), None);
        assert_eq!(t.find("b"), None);
    }

    #[test]
    fn removal_keeps_the_index_and_the_other_records() {
        let mut t = CustomerTable::new(layout());
        for i in 0..100 {
            let (slot, _) = t
                .find_or_insert(&id(i), || NewCustomer {
                    last_event_at: i as i64,
                    peak_at: 0,
                })
                .unwrap();
            t.record_mut(slot).set_sum(0, i as f64);
            t.record_mut(slot).remember(i + 1);
        }
        for i in (0..100).step_by(3) {
            let slot = t.find(&id(i)).unwrap();
            t.remove(slot);
        }
        assert_eq!(t.len(), 66);
        for i in 0..100 {
            match t.find(&id(i)) {
                Some(slot) => {
                    assert!(i % 3 != 0);
                    assert_eq!(t.id(slot), id(i));
                    let r = t.record(slot);
                    assert_eq!(r.last_event_at(), i as i64);
                    assert_eq!(r.sum(0), i as f32);
                    assert!(r.remembers(i + 1) && !r.remembers(i + 2));
                }
                None => assert_eq!(i % 3, 0),
            }
        }
        // Removed customers come back as new ones.
        let (_, new) = t
            .find_or_insert(&id(0), || NewCustomer {
                last_event_at: 7,
                peak_at: 7,
            })
            .unwrap();
        assert!(new);
    }

    #[test]
    fn a_snapshot_sees_the_table_as_it_began_whatever_is_removed_or_added() {
        // Interleave snapshot chunks with removals, insertions and writes:
        // the copy must equal the table at the start.
        let mut t = CustomerTable::new(layout());
        let mut next = 0u64;
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut rand = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        for _ in 0..300 {
            let (slot, _) = t
                .find_or_insert(&id(next), || NewCustomer {
                    last_event_at: next as i64,
                    peak_at: 0,
                })
                .unwrap();
            t.record_mut(slot).set_sum(1, next as f64);
            next += 1;
        }
        for round in 0..5 {
            let before = contents(&t);
            t.begin_snapshot();
            let mut copied = Vec::new();
            loop {
                for _ in 0..rand(20) {
                    match rand(3) {
                        0 if t.len() > 1 => t.remove(rand(t.len() as u64) as Slot),
                        1 => {
                            let (slot, _) = t
                                .find_or_insert(&id(next), || NewCustomer {
                                    last_event_at: next as i64,
                                    peak_at: 0,
                                })
                                .unwrap();
                            t.record_mut(slot).set_sum(0, 1.0);
                            next += 1;
                        }
                        _ => {
                            let slot = rand(t.len() as u64) as Slot;
                            t.record_mut(slot).set_sum(0, round as f64 + 2.0);
                        }
                    }
                }
                if t.snapshot_chunk(7, &mut copied) {
                    break;
                }
            }
            let ids = t.finish_snapshot();
            let copy = CustomerTable::from_parts(*t.layout(), copied, ids).unwrap();
            assert_eq!(contents(&copy), before, "round {round}");
        }
    }
}
