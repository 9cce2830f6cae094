//! The hash index of a customer table: from the hash of a customer id to
//! the slot of its record.
//!
//! Open addressing with linear probing over two parallel arrays, a tag
//! byte and a slot per bucket (5 bytes a bucket, as hashbrown's table it
//! replaces), at most three buckets in four used. Two reasons for a table
//! of our own:
//! - the bucket of a hash is known without reading memory, so a batch can
//!   have the index lines of an event's customer loaded two steps ahead of
//!   its turn, and its record one step ahead ([`SlotIndex::prefetch`], then
//!   [`SlotIndex::candidates`]): at a million customers an event otherwise
//!   waits for memory twice, the index and then the record;
//! - the arrays live in mappings of their own (see `mapped`), so an index
//!   that doubles leaves no old copy resident.
//!
//! The index stores no ids: comparing and rehashing go through the caller,
//! who knows the slot's record. A tag is the top 7 bits of the hash with
//! the high bit set (0 is an empty bucket); the home bucket comes from the
//! low bits. Removal shifts the rest of the cluster back, so there are no
//! tombstones and a lookup stops at the first empty bucket.

use crate::customers::Slot;
use crate::mapped::Mapped;

/// Buckets of the smallest index.
const MIN_BUCKETS: usize = 16;

#[derive(Debug, Default, Clone)]
pub struct SlotIndex {
    tags: Mapped<u8>,
    slots: Mapped<u32>,
    /// Buckets minus one (a power of two minus one); 0 without buckets.
    mask: usize,
    len: usize,
}

#[inline]
fn tag(hash: u64) -> u8 {
    0x80 | (hash >> 57) as u8
}

/// Buckets for `n` entries at most three quarters full.
fn buckets_for(n: usize) -> usize {
    (n.saturating_mul(4) / 3 + 1)
        .next_power_of_two()
        .max(MIN_BUCKETS)
}

impl SlotIndex {
    pub fn new() -> SlotIndex {
        SlotIndex::default()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn buckets(&self) -> usize {
        self.tags.len()
    }

    /// Stage 1 of a lookup in stages: starts loading the index lines where
    /// the probe for `hash` begins. Only a hint.
    #[inline]
    pub fn prefetch(&self, hash: u64) {
        if self.buckets() == 0 {
            return;
        }
        let i = hash as usize & self.mask;
        prefetch_line(&self.tags[i..]);
        prefetch_line(&self.slots[i..]);
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
        let (t, mask) = (tag(hash), self.mask);
        let mut i = hash as usize & mask;
        // Never more than 3/4 full: an empty bucket ends every probe.
        loop {
            let b = self.tags[i];
            if b == 0 {
                return None;
            }
            if b == t {
                let s = self.slots[i];
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
        let buckets = buckets_for(n.max(self.len));
        let mut new = SlotIndex {
            tags: Mapped::new(),
            slots: Mapped::new(),
            mask: buckets - 1,
            len: 0,
        };
        new.tags.resize(buckets, 0);
        new.slots.resize(buckets, 0);
        for (hash, slot) in entries {
            new.place(hash, slot);
            new.len += 1;
        }
        *self = new;
    }

    fn place(&mut self, hash: u64, slot: Slot) {
        let mask = self.mask;
        let mut i = hash as usize & mask;
        while self.tags[i] != 0 {
            i = (i + 1) & mask;
        }
        self.tags[i] = tag(hash);
        self.slots[i] = slot;
    }

    fn resize(&mut self, buckets: usize, rehash: &impl Fn(Slot) -> u64) {
        let mut new = SlotIndex {
            tags: Mapped::new(),
            slots: Mapped::new(),
            mask: buckets - 1,
            len: self.len,
        };
        new.tags.resize(buckets, 0);
        new.slots.resize(buckets, 0);
        for (&t, &s) in self.tags.iter().zip(self.slots.iter()) {
            if t != 0 {
                new.place(rehash(s), s);
            }
        }
        // The old arrays are unmapped here, not kept by an allocator.
        *self = new;
    }

    /// Removes the entry of `slot` (under `hash`); false if there is none.
    /// `rehash` gives the hash of any slot in the index: the entries after
    /// it in its cluster move back when their home allows.
    pub fn remove(&mut self, hash: u64, slot: Slot, rehash: impl Fn(Slot) -> u64) -> bool {
        let Some((mut hole, _)) = self.probe(hash, |_, s| s == slot) else {
            return false;
        };
        let mask = self.mask;
        let mut j = (hole + 1) & mask;
        while self.tags[j] != 0 {
            let home = rehash(self.slots[j]) as usize & mask;
            // The entry at j may fill the hole unless its home lies
            // cyclically in (hole, j]: then it would be found no more.
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(hole) & mask) {
                self.tags[hole] = self.tags[j];
                self.slots[hole] = self.slots[j];
                hole = j;
            }
            j = (j + 1) & mask;
        }
        self.tags[hole] = 0;
        self.len -= 1;
        true
    }

    /// Points the entry of `from` (under `hash`) at `to`.
    pub fn replace(&mut self, hash: u64, from: Slot, to: Slot) -> bool {
        match self.probe(hash, |_, s| s == from) {
            Some((i, _)) => {
                self.slots[i] = to;
                true
            }
            None => false,
        }
    }
}

#[inline]
fn prefetch_line<T>(at: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: SSE is part of the x86_64 baseline, and a prefetch
        // neither reads nor writes memory.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(at.as_ptr().cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
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
