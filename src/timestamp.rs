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
    let dt = chrono::DateTime::parse_from_rfc3339(s).ok()?;
    let ms = dt.timestamp_millis();
    (MIN_MILLIS..=MAX_MILLIS).contains(&ms).then_some(ms)
}

/// Accepts an integer epoch-milliseconds value if RFC 3339 can represent it.
pub fn from_epoch_millis(ms: i64) -> Option<Millis> {
    (MIN_MILLIS..=MAX_MILLIS).contains(&ms).then_some(ms)
}

/// A formatted `YYYY-MM-DDTHH:MM:SS.mmmZ` timestamp, kept on the stack.
#[derive(Clone, Copy)]
pub struct Rfc3339([u8; 24]);

impl Rfc3339 {
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
    let in_day = ms.rem_euclid(MILLIS_PER_DAY);
    let (y, m, d) = civil_from_days(days);
    let (hh, rest) = (in_day / 3_600_000, in_day % 3_600_000);
    let (mm, rest) = (rest / 60_000, rest % 60_000);
    let (ss, milli) = (rest / 1000, rest % 1000);

    let mut b = *b"0000-00-00T00:00:00.000Z";
    put_digits(&mut b[0..4], y as u32);
    put_digits(&mut b[5..7], m);
    put_digits(&mut b[8..10], d);
    put_digits(&mut b[11..13], hh as u32);
    put_digits(&mut b[14..16], mm as u32);
    put_digits(&mut b[17..19], ss as u32);
    put_digits(&mut b[20..23], milli as u32);
    Rfc3339(b)
}

fn put_digits(out: &mut [u8], mut v: u32) {
    for slot in out.iter_mut().rev() {
        *slot = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

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
    fn durations_must_be_whole_millis() {
        assert_eq!(duration_millis(Duration::from_secs(90)), Ok(90_000));
        assert!(duration_millis(Duration::from_nanos(1_500_000)).is_err());
    }
}
