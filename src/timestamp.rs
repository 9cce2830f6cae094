//! Time as the scoring model sees it: milliseconds since the Unix epoch.
//!
//! Every instant in ces-stream is an `i64` count of milliseconds (UTC). This
//! module converts to and from the two textual forms the model uses: RFC 3339
//! strings on input (any offset) and RFC 3339 UTC with milliseconds on output.
//! Formatting is on the hot path of every output event, so it is done by hand
//! with the civil-from-days algorithm instead of a format-string engine.

use std::time::Duration;

/// Milliseconds since 1970-01-01T00:00:00Z; also used for durations.
pub type Millis = i64;

/// The earliest instant RFC 3339 can write: 0000-01-01T00:00:00Z.
pub const MIN_MILLIS: Millis = -62_167_219_200_000;
/// The latest instant RFC 3339 can write: 9999-12-31T23:59:59.999Z.
pub const MAX_MILLIS: Millis = 253_402_300_799_999;

const MILLIS_PER_DAY: i64 = 86_400_000;

/// Parses an RFC 3339 timestamp with any UTC offset. Sub-millisecond digits
/// are truncated toward the past (the model works in whole milliseconds).
pub fn parse_rfc3339(s: &str) -> Option<Millis> {
    let ms = match fast_rfc3339(s.as_bytes()) {
        Fast::Millis(ms) => ms,
        Fast::Invalid => return None,
        Fast::Unusual => chrono::DateTime::parse_from_rfc3339(s)
            .ok()?
            .timestamp_millis(),
    };
    (MIN_MILLIS..=MAX_MILLIS).contains(&ms).then_some(ms)
}

/// What the fast path made of a timestamp.
enum Fast {
    Millis(Millis),
    Invalid,
    /// Not the common shape: chrono decides.
    Unusual,
}

/// The common shapes by hand (every event carries a timestamp):
/// `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`, with at most 9 fraction
/// digits and no leap second; anything else goes to chrono, which accepts
/// exactly what this accepts and gives the same instant (tested).
fn fast_rfc3339(b: &[u8]) -> Fast {
    if let Some(ms) = canonical(b) {
        return Fast::Millis(ms);
    }
    fn num(b: &[u8]) -> Option<i64> {
        b.iter().try_fold(0i64, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0'))
        })
    }
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't')
        || b[13] != b':'
        || b[16] != b':'
    {
        return Fast::Unusual;
    }
    let (Some(y), Some(mo), Some(d), Some(h), Some(mi), Some(sec)) = (
        num(&b[0..4]),
        num(&b[5..7]),
        num(&b[8..10]),
        num(&b[11..13]),
        num(&b[14..16]),
        num(&b[17..19]),
    ) else {
        return Fast::Unusual;
    };
    let mut i = 19;
    let mut milli = 0;
    if b[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let digits = i - start;
        if digits == 0 || digits > 9 {
            return Fast::Unusual;
        }
        for k in 0..3 {
            milli = milli * 10
                + b.get(start + k)
                    .filter(|_| k < digits)
                    .map_or(0, |c| i64::from(c - b'0'));
        }
    }
    let offset = match &b[i..] {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let (Some(oh), Some(om)) = (num(&[*h1, *h2]), num(&[*m1, *m2])) else {
                return Fast::Unusual;
            };
            if oh > 23 || om > 59 {
                return Fast::Unusual;
            }
            let o = (oh * 60 + om) * 60_000;
            if *sign == b'+' {
                o
            } else {
                -o
            }
        }
        _ => return Fast::Unusual,
    };
    if !(1..=12).contains(&mo) || h > 23 || mi > 59 || sec > 59 {
        // A leap second (60) is chrono's to place; the rest is invalid.
        return if sec == 60 && h <= 23 && mi <= 59 && (1..=12).contains(&mo) {
            Fast::Unusual
        } else {
            Fast::Invalid
        };
    }
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let days_in_month = match mo {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if d < 1 || d > days_in_month {
        return Fast::Invalid;
    }
    let days = days_from_civil(y, mo as u32, d as u32);
    Fast::Millis(days * MILLIS_PER_DAY + ((h * 60 + mi) * 60 + sec) * 1000 + milli - offset)
}

/// The shape nearly every producer writes, `YYYY-MM-DDTHH:MM:SS.mmmZ`,
/// checked eight bytes at a time (separators against a template, digits
/// by their high nibble); `None` for anything else, valid or not, which
/// the general path then decides. (The general path was 4% of a replay's
/// instructions, a tenth of parsing an event.)
fn canonical(b: &[u8]) -> Option<Millis> {
    const TEMPLATE: &[u8; 24] = b"0000-00-00T00:00:00.000Z";
    let b: &[u8; 24] = b.try_into().ok()?;
    let word = |s: &[u8; 24], i: usize| {
        let mut x = [0u8; 8];
        x.copy_from_slice(&s[i..i + 8]);
        u64::from_le_bytes(x)
    };
    const ZEROS: u64 = 0x3030_3030_3030_3030;
    const HIGH: u64 = 0xf0f0_f0f0_f0f0_f0f0;
    for i in [0, 8, 16] {
        let (x, t) = (word(b, i), word(TEMPLATE, i));
        // 0xff on the template's digits, 0 on its separators.
        let digits = {
            let mut m = 0u64;
            for k in 0..8 {
                if TEMPLATE[i + k] == b'0' {
                    m |= 0xff << (8 * k);
                }
            }
            m
        };
        // Separators exactly; digits 0x30..=0x39: high nibble 3, and
        // still 3 after adding 6 (no byte of a passing word carries).
        if (x ^ t) & !digits != 0
            || x & digits & HIGH != ZEROS & digits
            || x.wrapping_add(0x0606_0606_0606_0606) & digits & HIGH != ZEROS & digits
        {
            return None;
        }
    }
    let d = |i: usize| i64::from(b[i] - b'0');
    let (h, mi, sec) = (d(11) * 10 + d(12), d(14) * 10 + d(15), d(17) * 10 + d(18));
    let milli = d(20) * 100 + d(21) * 10 + d(22);
    if h > 23 || mi > 59 || sec > 59 {
        return None;
    }
    let time = ((h * 60 + mi) * 60 + sec) * 1000 + milli;
    // The date: the events of a stream share a few dates, so the last one
    // seen is remembered (per thread) with its day number, and a repeat
    // skips the calendar arithmetic. Its bytes passed the checks above,
    // the same as when it was first seen.
    let date = (word(b, 0), word(b, 8) & 0xffff);
    let (seen, days) = LAST_DATE.get();
    if seen == Some(date) {
        return Some(days * MILLIS_PER_DAY + time);
    }
    let y = d(0) * 1000 + d(1) * 100 + d(2) * 10 + d(3);
    let (mo, day) = (d(5) * 10 + d(6), d(8) * 10 + d(9));
    if !(1..=12).contains(&mo)
        || day < 1
        || day > 28 && {
            let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
            day > match mo {
                2 if leap => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            }
        }
    {
        return None;
    }
    let days = days_from_civil(y, mo as u32, day as u32);
    LAST_DATE.set((Some(date), days));
    Some(days * MILLIS_PER_DAY + time)
}

thread_local! {
    /// The date of the last canonical timestamp: (its first 10 bytes as
    /// two words, its day number). See [`canonical`].
    static LAST_DATE: std::cell::Cell<(Option<(u64, u64)>, i64)> =
        const { std::cell::Cell::new((None, 0)) };
}

/// Howard Hinnant's `days_from_civil`: (year, month, day) to days since
/// 1970-01-01.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Accepts an integer epoch-milliseconds value if RFC 3339 can represent it.
pub fn from_epoch_millis(ms: i64) -> Option<Millis> {
    (MIN_MILLIS..=MAX_MILLIS).contains(&ms).then_some(ms)
}

/// A formatted `YYYY-MM-DDTHH:MM:SS.mmmZ` timestamp, kept on the stack.
#[derive(Clone, Copy)]
pub struct Rfc3339([u8; 24]);

impl Rfc3339 {
    /// The text as bytes, for writers that need no `str`.
    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII digits and separators are ever written.
        std::str::from_utf8(&self.0).unwrap_or("")
    }
}

impl std::fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for Rfc3339 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Formats an instant as RFC 3339 UTC with milliseconds. Instants outside
/// years 0000..=9999 are clamped to that range (they cannot enter the model).
pub fn format_rfc3339(ms: Millis) -> Rfc3339 {
    let ms = ms.clamp(MIN_MILLIS, MAX_MILLIS);
    let days = ms.div_euclid(MILLIS_PER_DAY);
    // Below a day's milliseconds: u32 arithmetic from here.
    let in_day = ms.rem_euclid(MILLIS_PER_DAY) as u32;
    let (y, m, d) = civil_from_days(days);
    let (secs, milli) = (in_day / 1000, in_day % 1000);
    let (hh, rest) = (secs / 3600, secs % 3600);
    let (mm, ss) = (rest / 60, rest % 60);
    let y = y as u32; // 0..=9999 after the clamp

    // Two digits at a time from a table: every output carries one or two
    // of these, and a digit loop per field cost about 260 instructions.
    let mut b = *b"0000-00-00T00:00:00.000Z";
    b[0..2].copy_from_slice(&DIGIT_PAIRS[(y / 100) as usize]);
    b[2..4].copy_from_slice(&DIGIT_PAIRS[(y % 100) as usize]);
    b[5..7].copy_from_slice(&DIGIT_PAIRS[m as usize]);
    b[8..10].copy_from_slice(&DIGIT_PAIRS[d as usize]);
    b[11..13].copy_from_slice(&DIGIT_PAIRS[hh as usize]);
    b[14..16].copy_from_slice(&DIGIT_PAIRS[mm as usize]);
    b[17..19].copy_from_slice(&DIGIT_PAIRS[ss as usize]);
    b[20] = b'0' + (milli / 100) as u8;
    b[21..23].copy_from_slice(&DIGIT_PAIRS[(milli % 100) as usize]);
    Rfc3339(b)
}

/// "00" to "99".
pub(crate) static DIGIT_PAIRS: [[u8; 2]; 100] = {
    let mut t = [[0u8; 2]; 100];
    let mut i = 0;
    while i < 100 {
        t[i] = [b'0' + (i / 10) as u8, b'0' + (i % 10) as u8];
        i += 1;
    }
    t
};

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to (year, month, day).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Converts a configuration duration to whole milliseconds, refusing
/// sub-millisecond remainders rather than silently dropping them.
pub fn duration_millis(d: Duration) -> Result<Millis, String> {
    if d.subsec_nanos() % 1_000_000 != 0 {
        return Err(format!(
            "{} is not a whole number of milliseconds",
            humantime::format_duration(d)
        ));
    }
    i64::try_from(d.as_millis()).map_err(|_| "duration is too long".to_string())
}

/// The current wall-clock time. Only the imperative shell calls this; the
/// scoring core always receives time as an argument.
pub fn now_millis() -> Millis {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(MAX_MILLIS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// chrono alone, the reference of the fast path.
    fn chrono_millis(s: &str) -> Option<Millis> {
        let ms = chrono::DateTime::parse_from_rfc3339(s)
            .ok()?
            .timestamp_millis();
        (MIN_MILLIS..=MAX_MILLIS).contains(&ms).then_some(ms)
    }

    #[test]
    fn the_fast_path_agrees_with_chrono() {
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let fixed = [
            "2026-11-20T10:15:00Z",
            "2026-11-20t10:15:00z",
            "2026-11-20 10:15:00Z",
            "2024-02-29T23:59:59.999999999+00:00",
            "2023-02-29T00:00:00Z",
            "2026-12-31T23:59:60Z",
            "2026-06-30T23:59:60.5+01:00",
            "0000-01-01T00:00:00Z",
            "0000-01-01T00:30:00+01:00",
            "9999-12-31T23:59:59.999Z",
            "9999-12-31T23:59:59.999-00:01",
            "2026-11-20T10:15:00.1234567891Z",
            "2026-11-20T10:15:00.Z",
            "2026-11-20T24:00:00Z",
            "2026-11-20T10:15:00+24:00",
            "2026-11-20T10:15:00+05:30",
            "2026-11-20T10:15:00-23:59",
            "2026-11-20T10:15:00+0530",
            "2026-11-20T10:15Z",
            "2026-00-20T10:15:00Z",
            "2026-11-31T10:15:00Z",
            "+2026-11-20T10:15:00Z",
            "2026-11-20T10:15:00Z ",
            "１９７０-01-01T00:00:00Z",
        ];
        for s in fixed {
            assert_eq!(parse_rfc3339(s), chrono_millis(s), "{s}");
        }
        // The canonical shape (its own fast path), and every one-byte
        // change of it: any byte, any position. First any date; then few
        // dates, so that most strings repeat the date of the one before
        // (the remembered date), with any time and any change.
        for few_dates in [false, true] {
            for _ in 0..20_000 {
                let (year, month, day) = if few_dates {
                    (2026, 2 + next(2), 28 + next(4))
                } else {
                    (next(10_000), next(14), next(33))
                };
                let s = format!(
                    "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
                    next(26),
                    next(61),
                    next(62),
                    next(1000)
                );
                assert_eq!(parse_rfc3339(&s), chrono_millis(&s), "{s}");
                let mut b = s.clone().into_bytes();
                b[next(24) as usize] = next(128) as u8;
                if let Ok(m) = String::from_utf8(b) {
                    assert_eq!(parse_rfc3339(&m), chrono_millis(&m), "{m}");
                }
            }
        }
        for _ in 0..200_000 {
            let s = format!(
                "{:04}-{:02}-{:02}{}{:02}:{:02}:{:02}{}{}",
                next(10_000),
                next(14),
                next(33),
                ["T", "t", " "][next(3) as usize],
                next(26),
                next(61),
                next(62),
                [
                    String::new(),
                    format!(".{}", next(1000)),
                    format!(".{:09}", next(1_000_000_000)),
                    format!(".{}", next(10)),
                ][next(4) as usize],
                [
                    "Z".to_string(),
                    "z".to_string(),
                    format!("+{:02}:{:02}", next(25), next(61)),
                    format!("-{:02}:{:02}", next(25), next(61)),
                    String::new(),
                ][next(5) as usize]
            );
            assert_eq!(parse_rfc3339(&s), chrono_millis(&s), "{s}");
        }
    }

    #[test]
    fn formats_known_instants() {
        assert_eq!(format_rfc3339(0).as_str(), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_rfc3339(1_795_169_700_000).as_str(),
            "2026-11-20T10:15:00.000Z"
        );
        assert_eq!(format_rfc3339(-1).as_str(), "1969-12-31T23:59:59.999Z");
        assert_eq!(
            format_rfc3339(MAX_MILLIS).as_str(),
            "9999-12-31T23:59:59.999Z"
        );
        assert_eq!(
            format_rfc3339(MIN_MILLIS).as_str(),
            "0000-01-01T00:00:00.000Z"
        );
        // 2024 is a leap year.
        assert_eq!(
            format_rfc3339(parse_rfc3339("2024-02-29T23:59:59.5+00:00").unwrap()).as_str(),
            "2024-02-29T23:59:59.500Z"
        );
    }

    #[test]
    fn parses_offsets_and_truncates_to_millis() {
        let utc = parse_rfc3339("2026-11-20T10:15:00Z").unwrap();
        assert_eq!(utc, 1_795_169_700_000);
        assert_eq!(parse_rfc3339("2026-11-20T11:15:00+01:00"), Some(utc));
        assert_eq!(parse_rfc3339("2026-11-20T10:15:00.0009Z"), Some(utc));
        assert_eq!(parse_rfc3339("2026-11-20T10:15:00"), None);
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn round_trips_every_day_of_four_centuries() {
        let mut ms = parse_rfc3339("1900-01-01T00:00:00Z").unwrap();
        let end = parse_rfc3339("2300-01-01T00:00:00Z").unwrap();
        while ms < end {
            let text = format_rfc3339(ms + 45_296_789);
            assert_eq!(parse_rfc3339(text.as_str()), Some(ms + 45_296_789));
            ms += MILLIS_PER_DAY;
        }
    }

    #[test]
    fn formats_like_chrono_at_every_time_of_day() {
        // A step prime to every field's period: each hour, minute, second
        // and millisecond value comes round, over years 0000 to 9999.
        let (min, max) = (MIN_MILLIS, MAX_MILLIS);
        let step = (max - min) / 1_000_003;
        let mut ms = min;
        while ms <= max {
            let expected = chrono::DateTime::from_timestamp_millis(ms)
                .unwrap()
                .format("%Y-%m-%dT%H:%M:%S%.3fZ")
                .to_string();
            assert_eq!(format_rfc3339(ms).as_str(), expected, "{ms}");
            ms += step;
        }
        assert_eq!(format_rfc3339(max).as_str(), "9999-12-31T23:59:59.999Z");
        assert_eq!(format_rfc3339(min).as_str(), "0000-01-01T00:00:00.000Z");
    }

    #[test]
    fn durations_must_be_whole_millis() {
        assert_eq!(duration_millis(Duration::from_secs(90)), Ok(90_000));
        assert!(duration_millis(Duration::from_nanos(1_500_000)).is_err());
    }
}
