//! Read and write access to one customer's record, by the names of its
//! values ([`super::layout`]): the decayed sums kept at one reference
//! time (the customer's `last_event_at`, so that a customer with no new
//! events costs nothing until it is evaluated; stored as f32, computed in
//! f64: their relative error, about 1e-7, is far below the model's
//! 0.01-point tolerance), the channel times and the remembered event ids.

use super::layout::{
    header_word, Layout, EMITTED_SCORE, EXPIRED, HEADER, LAST_EVENT_AT, NEVER, PEAK_AT, PEAK_SCORE,
    SUMS,
};
use crate::model::TierId;
use crate::timestamp::Millis;

/// Read access to one customer's record.
#[derive(Clone, Copy)]
pub struct Record<'a> {
    pub(super) w: &'a [u32],
    pub(super) layout: &'a Layout,
}

/// Write access to one customer's record.
pub struct RecordMut<'a> {
    pub(super) w: &'a mut [u32],
    pub(super) layout: &'a Layout,
}

macro_rules! getters {
    () => {
        #[inline]
        fn get_i64(&self, at: usize) -> i64 {
            (u64::from(self.w[at]) | (u64::from(self.w[at + 1]) << 32)) as i64
        }
        #[inline]
        pub fn last_event_at(&self) -> Millis {
            self.get_i64(LAST_EVENT_AT)
        }
        #[inline]
        pub fn peak_at(&self) -> Millis {
            self.get_i64(PEAK_AT)
        }
        #[inline]
        pub fn peak_score(&self) -> f32 {
            f32::from_bits(self.w[PEAK_SCORE])
        }
        #[inline]
        pub fn emitted_score(&self) -> f32 {
            f32::from_bits(self.w[EMITTED_SCORE])
        }
        /// The customer's configured segment (`[metrics] segments`), 0 if none.
        #[inline]
        pub fn segment(&self) -> u8 {
            header_word::segment(self.w[HEADER])
        }
        #[inline]
        pub fn emitted_tier(&self) -> TierId {
            header_word::tier(self.w[HEADER])
        }
        #[inline]
        pub fn flags(&self) -> u8 {
            header_word::flags(self.w[HEADER])
        }
        #[inline]
        pub fn has(&self, flag: u8) -> bool {
            self.flags() & flag != 0
        }
        /// Decayed sum of activity `k` at `last_event_at`.
        #[inline]
        pub fn sum(&self, k: usize) -> f32 {
            f32::from_bits(self.w[SUMS + k])
        }
        /// The decayed sums of every activity, as f32 bits (one bounds
        /// check for all of them, for loops over activities).
        #[inline]
        pub fn sum_bits(&self) -> &[u32] {
            &self.w[SUMS..SUMS + self.layout.activities]
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
            let at = self.layout.channels_at();
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
            let at = self.layout.channels_at();
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
    pub(super) fn set_i64(&mut self, at: usize, v: i64) {
        self.w[at] = v as u64 as u32;
        self.w[at + 1] = ((v as u64) >> 32) as u32;
    }

    #[inline]
    pub fn set_peak(&mut self, score: f32, at: Millis) {
        self.w[PEAK_SCORE] = score.to_bits();
        self.set_i64(PEAK_AT, at);
    }

    #[inline]
    pub fn set_emitted(&mut self, score: f32, tier: TierId) {
        self.w[EMITTED_SCORE] = score.to_bits();
        self.w[HEADER] = header_word::with_tier(self.w[HEADER], tier);
    }

    #[inline]
    pub fn set_segment(&mut self, segment: u8) {
        self.w[HEADER] = header_word::with_segment(self.w[HEADER], segment);
    }

    #[inline]
    pub fn set_flag(&mut self, flag: u8, on: bool) {
        let flags = if on {
            self.flags() | flag
        } else {
            self.flags() & !flag
        };
        self.w[HEADER] = header_word::with_flags(self.w[HEADER], flags);
    }

    #[inline]
    pub fn set_sum(&mut self, k: usize, v: f64) {
        // Saturate instead of overflowing to infinity: inf - inf would be NaN.
        let v = v.clamp(-(f32::MAX as f64), f32::MAX as f64) as f32;
        self.w[SUMS + k] = v.to_bits();
    }

    pub(super) fn clear_channel(&mut self, c: usize) {
        let at = self.layout.channels_at();
        if self.layout.wide_channels {
            self.set_i64(at + 2 * c, NEVER);
        } else {
            self.w[at + c] = EXPIRED;
        }
    }

    /// Moves the reference time of the sums to `t > last_event_at`:
    /// multiplies every sum by `factor` (the decay over the gap) and ages the
    /// channel times.
    // Always inlined into the evaluation: left to the heuristics, it
    // was not once the report's code joined the crate (replay +2.5% of
    // its instructions, callgrind).
    #[inline(always)]
    pub fn advance_to(&mut self, t: Millis, factor: f64) {
        let gap = t - self.last_event_at();
        let n = self.layout.activities;
        // A decay factor is at most 1: no product leaves f32's range, so
        // `set_sum`'s clamp is not needed (and the loop vectorizes).
        debug_assert!((0.0..=1.0).contains(&factor));
        for w in &mut self.w[SUMS..SUMS + n] {
            *w = ((f64::from(f32::from_bits(*w)) * factor) as f32).to_bits();
        }
        if !self.layout.wide_channels {
            let at = SUMS + n;
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
        self.set_i64(LAST_EVENT_AT, t);
    }

    /// Records a positive event at `t <= last_event_at` in channel `c`.
    #[inline]
    pub fn touch_channel(&mut self, c: usize, t: Millis) {
        let at = self.layout.channels_at();
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
