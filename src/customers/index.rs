//! The hash index of a customer table: from the hash of a customer id to
//! the slot of its record.
//!
//! Open addressing with linear probing over one array of `u32` buckets,
//! at most three buckets in four used. A bucket packs an occupied bit, a
//! tag from the hash's high bits and the slot, so that a probe reads one
//! cache line, not two (a tag array beside a slot array cost a second
//! miss per event at a million customers), in 4 bytes a bucket instead of
//! hashbrown's 5. Two reasons for a table of our own:
//! - the bucket of a hash is known without reading memory, so a batch can
//!   have the index line of an event's customer loaded two steps ahead of
//!   its turn, and its record one step ahead ([`SlotIndex::prefetch`], then
//!   [`SlotIndex::candidates`]): at a million customers an event otherwise
//!   waits for memory twice, the index and then the record;
//! - the array lives in a mapping of its own (see `mapped`), so an index
//!   that doubles leaves no old copy resident.
//!
//! The index stores no ids: comparing and rehashing go through the caller,
//! who knows the slot's record. The slot takes the low `slot_bits` bits of
//! a bucket: enough for any slot below the bucket count (a customer
//! table's slots are dense, below its length), widened when a larger slot
//! comes; the tag takes the bits between it and the occupied bit, fewer as
//! the index grows (10 at a million customers). A tag match only makes a
//! candidate: the caller compares ids. The home bucket comes from the
//! hash's low bits. Removal shifts the rest of the cluster back, so there
//! are no tombstones and a lookup stops at the first empty bucket.

use super::prefetch::prefetch_lines;
use crate::mapped::Mapped;

/// Index of a customer's record in its table.
pub type Slot = u32;

/// Buckets of the smallest index.
const MIN_BUCKETS: usize = 16;

/// The occupied bit of a bucket (0 is an empty bucket).
const OCCUPIED: u32 = 1 << 31;

/// The largest slot an index holds: slots must leave the occupied bit.
pub const MAX_SLOT: Slot = OCCUPIED - 1;

#[derive(Debug, Default, Clone)]
pub struct SlotIndex {
    buckets: Mapped<u32>,
    /// Buckets minus one (a power of two minus one); 0 without buckets.
    mask: usize,
    /// Bits of a bucket that hold its slot.
    slot_bits: u32,
    len: usize,
}

/// The tag bits a hash would have with every bit above `slot_bits`.
#[inline]
fn hash_tag(hash: u64) -> u32 {
    (hash >> 33) as u32
}

/// Buckets for `n` entries at most three quarters full.
fn buckets_for(n: usize) -> usize {
    (n.saturating_mul(4) / 3 + 1)
        .next_power_of_two()
        .max(MIN_BUCKETS)
}

/// Bits needed to hold `v`.
fn bits_of(v: usize) -> u32 {
    usize::BITS - v.leading_zeros()
}

impl SlotIndex {
    pub fn new() -> SlotIndex {
        SlotIndex::default()
    }

    /// An empty index of `buckets` buckets.
    fn with_buckets(buckets: usize, slot_bits: u32) -> SlotIndex {
        let mut new = SlotIndex {
            // Sized once, every bucket written (zero): huge pages waste
            // nothing here.
            buckets: Mapped::filled_whole(),
            mask: buckets - 1,
            // Slots below the bucket count fit without widening.
            slot_bits: slot_bits.max(bits_of(buckets - 1)).min(31),
            len: 0,
        };
        new.buckets.resize(buckets, 0);
        new
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn buckets(&self) -> usize {
        self.buckets.len()
    }

    #[inline]
    fn slot_mask(&self) -> u32 {
        ((1u64 << self.slot_bits) - 1) as u32
    }

    /// What the bits above the slot of a bucket holding `hash` are.
    #[inline]
    fn want(&self, hash: u64) -> u32 {
        OCCUPIED | (hash_tag(hash) & !self.slot_mask())
    }

    /// Stage 1 of a lookup in stages: starts loading the index line where
    /// the probe for `hash` begins. Only a hint.
    #[inline]
    pub fn prefetch(&self, hash: u64) {
        if self.buckets() == 0 {
            return;
        }
        let i = hash as usize & self.mask;
        prefetch_lines(&self.buckets[i..i + 1]);
    }

    /// Stage 2: every slot whose bucket has the tag of `hash`, until the
    /// probe ends (for the caller to prefetch their records). No id is
    /// compared, so the records are not read.
    #[inline]
    pub fn candidates(&self, hash: u64, mut f: impl FnMut(Slot)) {
        self.probe(hash, |_, s| {
            f(s);
            false
        });
    }

    /// The slot for which `eq` holds, among those with the tag of `hash`.
    #[inline]
    pub fn find(&self, hash: u64, mut eq: impl FnMut(Slot) -> bool) -> Option<Slot> {
        self.probe(hash, |_, s| eq(s)).map(|(_, s)| s)
    }

    /// Walks the buckets of `hash`'s probe with its tag until `hit` says
    /// so: (bucket, slot).
    #[inline]
    fn probe(&self, hash: u64, mut hit: impl FnMut(usize, Slot) -> bool) -> Option<(usize, Slot)> {
        if self.buckets() == 0 {
            return None;
        }
        let (want, slot_mask, mask) = (self.want(hash), self.slot_mask(), self.mask);
        let mut i = hash as usize & mask;
        // Never more than 3/4 full: an empty bucket ends every probe.
        loop {
            let b = self.buckets[i];
            if b == 0 {
                return None;
            }
            if b & !slot_mask == want {
                let s = b & slot_mask;
                if hit(i, s) {
                    return Some((i, s));
                }
            }
            i = (i + 1) & mask;
        }
    }

    /// Adds `slot` under `hash`; the caller knows it is not there yet.
    /// `rehash` gives the hash of any slot in the index (to grow it).
    pub fn insert_unique(&mut self, hash: u64, slot: Slot, rehash: impl Fn(Slot) -> u64) {
        if (self.len + 1) * 4 > self.buckets() * 3 {
            self.resize(buckets_for(self.len + 1), &rehash);
        }
        self.place(hash, slot);
        self.len += 1;
    }

    /// Makes room for `additional` more entries without growing.
    pub fn reserve(&mut self, additional: usize, rehash: impl Fn(Slot) -> u64) {
        let n = self.len.saturating_add(additional);
        if n * 4 > self.buckets() * 3 {
            self.resize(buckets_for(n), &rehash);
        }
    }

    /// Whether `additional` more entries would make the index grow.
    pub fn needs_room(&self, additional: usize) -> bool {
        self.len.saturating_add(additional).saturating_mul(4) > self.buckets() * 3
    }

    /// Rebuilds the index with room for `n` entries from all its entries,
    /// (hash, slot) in any order. A customer table gives them in slot
    /// order, reading its records one after the other: growing by
    /// [`Self::insert_unique`] rehashes in bucket order, a random read of
    /// a record per entry (3% of a replay at a million customers).
    pub fn rebuild(&mut self, n: usize, entries: impl Iterator<Item = (u64, Slot)>) {
        let mut new = SlotIndex::with_buckets(buckets_for(n.max(self.len)), self.slot_bits);
        for (hash, slot) in entries {
            new.place(hash, slot);
            new.len += 1;
        }
        *self = new;
    }

    /// Stores `slot` under `hash` in the first free bucket of its probe.
    fn place(&mut self, hash: u64, slot: Slot) {
        assert!(slot <= MAX_SLOT, "slot {slot} over the index's limit");
        if slot > self.slot_mask() {
            self.widen(bits_of(slot as usize));
        }
        let mask = self.mask;
        let mut i = hash as usize & mask;
        while self.buckets[i] != 0 {
            i = (i + 1) & mask;
        }
        self.buckets[i] = self.want(hash) | slot;
    }

    /// Gives slots `bits` bits, taking them from the tags (whose remaining
    /// bits are the same bits of the same hashes).
    fn widen(&mut self, bits: u32) {
        let old_mask = self.slot_mask();
        self.slot_bits = bits;
        let tag_mask = !self.slot_mask();
        for b in self.buckets.iter_mut().filter(|b| **b != 0) {
            *b = (*b & tag_mask) | (*b & old_mask);
        }
    }

    fn resize(&mut self, buckets: usize, rehash: &impl Fn(Slot) -> u64) {
        let mut new = SlotIndex::with_buckets(buckets, self.slot_bits);
        let slot_mask = self.slot_mask();
        for &b in self.buckets.iter().filter(|b| **b != 0) {
            let s = b & slot_mask;
            new.place(rehash(s), s);
        }
        new.len = self.len;
        // The old array is unmapped here, not kept by an allocator.
        *self = new;
    }

    /// Removes the entry of `slot` (under `hash`); false if there is none.
    /// `rehash` gives the hash of any slot in the index: the entries after
    /// it in its cluster move back when their home allows.
    pub fn remove(&mut self, hash: u64, slot: Slot, rehash: impl Fn(Slot) -> u64) -> bool {
        let Some((mut hole, _)) = self.probe(hash, |_, s| s == slot) else {
            return false;
        };
        let (mask, slot_mask) = (self.mask, self.slot_mask());
        let mut j = (hole + 1) & mask;
        while self.buckets[j] != 0 {
            let home = rehash(self.buckets[j] & slot_mask) as usize & mask;
            // The entry at j may fill the hole unless its home lies
            // cyclically in (hole, j]: then it would be found no more.
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(hole) & mask) {
                self.buckets[hole] = self.buckets[j];
                hole = j;
            }
            j = (j + 1) & mask;
        }
        self.buckets[hole] = 0;
        self.len -= 1;
        true
    }

    /// Points the entry of `from` (under `hash`) at `to`.
    pub fn replace(&mut self, hash: u64, from: Slot, to: Slot) -> bool {
        assert!(to <= MAX_SLOT, "slot {to} over the index's limit");
        if to > self.slot_mask() {
            self.widen(bits_of(to as usize));
        }
        match self.probe(hash, |_, s| s == from) {
            Some((i, _)) => {
                self.buckets[i] = (self.buckets[i] & !self.slot_mask()) | to;
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    /// A deliberately poor hash (many equal homes and tags), to exercise
    /// clusters and wrap-around.
    fn weak(key: u32) -> u64 {
        let h = u64::from(key % 37).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        h ^ (u64::from(key % 5) << 58)
    }

    proptest! {
        #[test]
        fn behaves_like_a_map(ops in proptest::collection::vec((0u8..3, 0u32..300), 1..2000)) {
            // Keys are slots here: the index maps hash(slot) to slot.
            let mut index = SlotIndex::new();
            let mut model: HashSet<u32> = HashSet::new();
            for (op, k) in ops {
                match op {
                    0 | 1 => {
                        if model.insert(k) {
                            index.insert_unique(weak(k), k, weak);
                        }
                    }
                    _ => {
                        let removed = index.remove(weak(k), k, weak);
                        prop_assert_eq!(removed, model.remove(&k));
                    }
                }
                prop_assert_eq!(index.len(), model.len());
            }
            for k in 0..300u32 {
                let found = index.find(weak(k), |s| s == k);
                prop_assert_eq!(found.is_some(), model.contains(&k), "key {}", k);
                let mut seen = false;
                index.candidates(weak(k), |s| seen |= s == k);
                prop_assert_eq!(seen, model.contains(&k));
            }
        }
    }

    #[test]
    fn slots_larger_than_the_index_widen_it_and_stay_found() {
        // A customer table's slots stay below the bucket count; the index
        // holds any slot up to MAX_SLOT all the same, giving tag bits up.
        let mut index = SlotIndex::new();
        let slots = [3u32, 1 << 12, 1 << 20, MAX_SLOT, 77];
        for &s in &slots {
            index.insert_unique(weak(s), s, weak);
        }
        for &s in &slots {
            assert_eq!(index.find(weak(s), |x| x == s), Some(s), "slot {s}");
        }
        assert!(index.remove(weak(MAX_SLOT), MAX_SLOT, weak));
        assert_eq!(index.find(weak(MAX_SLOT), |x| x == MAX_SLOT), None);
        assert!(index.replace(weak(77), 77, 1 << 30));
        assert_eq!(index.find(weak(77), |x| x == 1 << 30), Some(1 << 30));
        assert_eq!(index.find(weak(77), |x| x == 77), None);
        assert_eq!(index.find(weak(3), |x| x == 3), Some(3));
    }

    #[test]
    fn a_rebuild_keeps_every_entry() {
        let mut index = SlotIndex::new();
        for k in 0..100u32 {
            index.insert_unique(weak(k), k, weak);
        }
        assert!(!index.needs_room(1));
        index.rebuild(5000, (0..100u32).rev().map(|k| (weak(k), k)));
        assert_eq!(index.len(), 100);
        assert!(!index.needs_room(3000));
        for k in 0..100u32 {
            assert_eq!(index.find(weak(k), |s| s == k), Some(k));
        }
        assert_eq!(index.find(weak(100), |s| s == 100), None);
    }

    #[test]
    fn replace_points_an_entry_elsewhere_and_reserve_keeps_entries() {
        let mut index = SlotIndex::new();
        for k in 0..1000u32 {
            index.insert_unique(weak(k), k, weak);
        }
        index.reserve(100_000, weak);
        assert!(index.buckets() >= 100_000 * 4 / 3);
        assert!(index.replace(weak(7), 7, 5000));
        assert_eq!(index.find(weak(7), |s| s == 5000), Some(5000));
        assert_eq!(index.find(weak(7), |s| s == 7), None);
        for k in (0..1000u32).filter(|&k| k != 7) {
            assert_eq!(index.find(weak(k), |s| s == k), Some(k));
        }
        assert!(!index.remove(weak(7), 7, weak));
    }
}
