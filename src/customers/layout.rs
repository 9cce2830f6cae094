//! A customer's record: where each value sits among its 32-bit words, the
//! bit fields of its first word, and the shape of the whole record under a
//! model ([`Layout`]). Everything that reads or writes a record (the
//! accessors, the table, the snapshot stores) goes through these names.
//!
//! | word                | content                                                 |
//! |---------------------|---------------------------------------------------------|
//! | [`HEADER`] (0)      | [`header_word`]: id length, segment, emitted tier, flags |
//! | [`ID`] .. [`ID_END`] (1-3) | the id if at most 12 bytes, else its arena offset |
//! | [`LAST_EVENT_AT`] (4-5) | `last_event_at` (i64 ms)                             |
//! | [`PEAK_AT`] (6-7)   | `peak_at` (i64 ms)                                      |
//! | [`PEAK_SCORE`] (8)  | `peak_score` (f32)                                      |
//! | [`EMITTED_SCORE`] (9) | `emitted_score` (f32)                                 |
//! | [`SUMS`] (10) ..    | one f32 decayed sum per activity, at `last_event_at`    |
//! | then                | one channel time per channel (see [`Layout`])           |
//! | then                | `input.dedup_depth` remembered event ids, 64-bit hashes, newest first (0: empty) |

use crate::model::Model;
use crate::timestamp::Millis;

/// The header word: see [`header_word`].
pub const HEADER: usize = 0;
/// The first of the words holding the id (or its arena offset).
pub const ID: usize = 1;
/// One past the last id word.
pub const ID_END: usize = 4;
/// `last_event_at`, two words (low, high).
pub const LAST_EVENT_AT: usize = 4;
/// `peak_at`, two words.
pub const PEAK_AT: usize = 6;
pub const PEAK_SCORE: usize = 8;
pub const EMITTED_SCORE: usize = 9;
/// The first decayed sum: the header's words end here.
pub const SUMS: usize = 10;

/// Ids up to this many bytes are stored in the record (the three id words).
pub const INLINE_ID: usize = 12;
/// A channel age meaning "no positive event within the window".
pub const EXPIRED: u32 = u32::MAX;
/// A wide channel time meaning "never".
pub const NEVER: Millis = Millis::MIN;

/// The fields of a record's first word.
pub mod header_word {
    /// Bits 0-8: the id's length in bytes (1 to 256).
    pub const ID_LEN_MASK: u32 = 0x1ff;
    /// Bits 9-15: the customer's segment (`[metrics] segments`), 0 if none.
    pub const SEGMENT_SHIFT: u32 = 9;
    pub const SEGMENT_MASK: u32 = 0x7f;
    /// Bits 16-23: the tier last emitted.
    pub const TIER_SHIFT: u32 = 16;
    /// Bits 24-31: the flags ([`super::flags`]).
    pub const FLAGS_SHIFT: u32 = 24;

    #[inline]
    pub const fn id_len(word: u32) -> usize {
        (word & ID_LEN_MASK) as usize
    }

    #[inline]
    pub const fn segment(word: u32) -> u8 {
        ((word >> SEGMENT_SHIFT) & SEGMENT_MASK) as u8
    }

    #[inline]
    pub const fn tier(word: u32) -> u8 {
        (word >> TIER_SHIFT) as u8
    }

    #[inline]
    pub const fn flags(word: u32) -> u8 {
        (word >> FLAGS_SHIFT) as u8
    }

    /// A flag's bit in the header word.
    #[inline]
    pub const fn flag_bit(flag: u8) -> u32 {
        (flag as u32) << FLAGS_SHIFT
    }

    #[inline]
    pub const fn with_id_len(word: u32, len: usize) -> u32 {
        (word & !ID_LEN_MASK) | (len as u32 & ID_LEN_MASK)
    }

    #[inline]
    pub const fn with_segment(word: u32, segment: u8) -> u32 {
        (word & !(SEGMENT_MASK << SEGMENT_SHIFT))
            | ((segment as u32 & SEGMENT_MASK) << SEGMENT_SHIFT)
    }

    #[inline]
    pub const fn with_tier(word: u32, tier: u8) -> u32 {
        (word & !(0xff << TIER_SHIFT)) | ((tier as u32) << TIER_SHIFT)
    }

    #[inline]
    pub const fn with_flags(word: u32, flags: u8) -> u32 {
        (word & !(0xff << FLAGS_SHIFT)) | ((flags as u32) << FLAGS_SHIFT)
    }
}

/// Per-customer boolean flags, in the header word's flag byte.
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

/// The shape of a record under a given model.
///
/// A channel time is the latest event with positive points in the
/// channel. It only matters while it lies within the diversity window, so
/// it is kept as its age at `last_event_at` in one u32 of milliseconds,
/// [`EXPIRED`] once older than the window. Windows too long for a u32
/// (about 49.7 days) switch to two words holding the absolute time
/// instead ([`NEVER`] for none).
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
    pub(super) dedup_at: usize,
    pub(super) stride: usize,
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
        let dedup_at = SUMS + activities + channels * channel_words;
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

    /// The first channel time.
    #[inline]
    pub(super) fn channels_at(&self) -> usize {
        SUMS + self.activities
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_word_fields_do_not_overlap() {
        let word = header_word::with_id_len(0, 256);
        let word = header_word::with_segment(word, 127);
        let word = header_word::with_tier(word, 200);
        let word = header_word::with_flags(word, flags::DIRTY | flags::PERSISTED);
        assert_eq!(header_word::id_len(word), 256);
        assert_eq!(header_word::segment(word), 127);
        assert_eq!(header_word::tier(word), 200);
        assert_eq!(header_word::flags(word), flags::DIRTY | flags::PERSISTED);
        let word = header_word::with_segment(header_word::with_tier(word, 1), 3);
        assert_eq!(
            (
                header_word::id_len(word),
                header_word::segment(word),
                header_word::tier(word)
            ),
            (256, 3, 1)
        );
        assert_eq!(header_word::flags(word), flags::DIRTY | flags::PERSISTED);
        assert_ne!(word & header_word::flag_bit(flags::DIRTY), 0);
        assert_eq!(word & header_word::flag_bit(flags::AT_RISK), 0);
    }
}
