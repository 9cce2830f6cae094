//! A JSON scanner specialised to the shape of an event: one flat object
//! whose few interesting values are captured as raw text, everything else
//! skipped while its syntax is checked, and never a number converted.
//!
//! It is the fast path of [`super::parse`]: it accepts exactly the JSON
//! texts serde_json accepts (RFC 8259), except that a number too large for
//! an f64 in a field the model does not read is accepted, as the grammar
//! says, instead of refused. What it does not handle (an escape in a key,
//! nesting deep enough to approach serde_json's recursion limit) and
//! every invalid text go to the serde_json path, which decides and words
//! the error exactly as before. The input must be valid UTF-8 already.

use super::{Fields, Key};

/// What the scanner made of a payload.
pub(super) enum Scan {
    /// An object, its interesting fields captured.
    Object,
    /// Valid JSON, but not an object.
    NotObject,
    /// Not valid JSON: serde_json words the error.
    Invalid,
    /// Valid or not, a case for serde_json (escapes in keys, deep nesting).
    Unusual,
}

/// Why a scan stopped early.
enum Stop {
    Invalid,
    Unusual,
}

/// Nesting the scanner leaves to serde_json (its limit is 128).
const MAX_DEPTH: u32 = 100;

/// Bytes that end a run of plain string content: the quote, the
/// backslash, and the control characters a JSON string may not hold.
static SPECIAL: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 0x20 {
        t[c] = true;
        c += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

/// Which nested object's keys are captured.
#[derive(Clone, Copy)]
enum Nested {
    /// Native `attributes`: `segment`.
    Attributes,
    /// Segment `properties`: `revenue` and `value`.
    Properties,
}

/// The end of the run of plain string content from `i`: the first quote,
/// backslash or control character, or the end of `b`. Sixteen bytes at a
/// time with SSE2 (part of every x86_64), then byte by byte.
#[inline]
fn plain_run(b: &[u8], mut i: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{
            __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_max_epu8, _mm_movemask_epi8,
            _mm_or_si128, _mm_set1_epi8,
        };
        while i + 16 <= b.len() {
            // SAFETY: SSE2 is in the x86_64 baseline; the 16 bytes loaded
            // (unaligned) lie within `b`.
            let mask = unsafe {
                let v = _mm_loadu_si128(b.as_ptr().add(i).cast::<__m128i>());
                let ctrl = _mm_set1_epi8(0x1f);
                // v <= 0x1f (unsigned) exactly when max(v, 0x1f) == 0x1f.
                let special = _mm_or_si128(
                    _mm_or_si128(
                        _mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8)),
                        _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8)),
                    ),
                    _mm_cmpeq_epi8(_mm_max_epu8(v, ctrl), ctrl),
                );
                _mm_movemask_epi8(special) as u32
            };
            if mask != 0 {
                return i + mask.trailing_zeros() as usize;
            }
            i += 16;
        }
    }
    while i < b.len() && !SPECIAL[usize::from(b[i])] {
        i += 1;
    }
    i
}

struct Scanner<'a> {
    text: &'a str,
    b: &'a [u8],
    i: usize,
    /// Strings with escapes read so far: a caller compares it before and
    /// after a string (a flag in the string's result made that result too
    /// large to return in registers).
    escaped: u32,
}

/// Scans one payload (valid UTF-8) into `fields`, which starts as the
/// default. (The caller's fields are filled in place: returning 240 bytes
/// by value cost two copies per event.) `fields` is left half-filled when the
/// scan ends early.
pub(super) fn scan<'a>(text: &'a str, fields: &mut Fields<'a>) -> Scan {
    let mut s = Scanner {
        text,
        b: text.as_bytes(),
        i: 0,
        escaped: 0,
    };
    s.ws();
    let result = if s.peek() == Some(b'{') {
        s.object(fields).map(|()| true)
    } else {
        s.skip_value(0).map(|()| false)
    };
    let result = result.and_then(|r| {
        s.ws();
        if s.i == s.b.len() {
            Ok(r)
        } else {
            Err(Stop::Invalid) // trailing characters
        }
    });
    match result {
        Ok(true) => Scan::Object,
        Ok(false) => Scan::NotObject,
        Err(Stop::Invalid) => Scan::Invalid,
        Err(Stop::Unusual) => Scan::Unusual,
    }
}

impl<'a> Scanner<'a> {
    #[inline]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    #[inline]
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    #[inline]
    fn expect(&mut self, c: u8) -> Result<(), Stop> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(Stop::Invalid)
        }
    }

    /// A string at `"`: returns its content (escapes undecoded; counted
    /// in `self.escaped`), or `None` when it is not a valid string.
    #[inline(always)]
    fn string(&mut self) -> Option<&'a str> {
        if self.peek() != Some(b'"') {
            return None;
        }
        self.i += 1;
        let start = self.i;
        let mut escaped = false;
        loop {
            self.i = plain_run(self.b, self.i);
            match self.peek() {
                Some(b'"') => {
                    // SAFETY: `start` follows a quote and `self.i` is at
                    // one: both ASCII bytes of a valid UTF-8 text, so both
                    // are char boundaries (the checked slice cost 1.3% of
                    // a replay's instructions).
                    let content = unsafe { self.text.get_unchecked(start..self.i) };
                    self.i += 1;
                    self.escaped += u32::from(escaped);
                    return Some(content);
                }
                Some(b'\\') => {}
                // A control character, or the end of the text.
                _ => return None,
            }
            escaped = true;
            self.i += 1;
            match self.peek() {
                Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.i += 1,
                Some(b'u') => {
                    let hex = self.b.get(self.i + 1..self.i + 5)?;
                    if !hex.iter().all(u8::is_ascii_hexdigit) {
                        return None;
                    }
                    self.i += 5;
                }
                _ => return None,
            }
        }
    }

    fn digits(&mut self) -> Result<(), Stop> {
        let start = self.i;
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
        if self.i == start {
            Err(Stop::Invalid)
        } else {
            Ok(())
        }
    }

    /// A number, by the JSON grammar; its value is never computed.
    fn number(&mut self) -> Result<(), Stop> {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek() {
            Some(b'0') => {
                self.i += 1;
                if let Some(b'0'..=b'9') = self.peek() {
                    return Err(Stop::Invalid); // a leading zero
                }
            }
            Some(b'1'..=b'9') => self.digits()?,
            _ => return Err(Stop::Invalid),
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            self.digits()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            self.digits()?;
        }
        Ok(())
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), Stop> {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            Ok(())
        } else {
            Err(Stop::Invalid)
        }
    }

    /// Skips one value, checking its syntax. `depth`: containers around it.
    fn skip_value(&mut self, depth: u32) -> Result<(), Stop> {
        match self.peek() {
            Some(b'"') => self.string().map(|_| ()).ok_or(Stop::Invalid),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(b'{') => {
                if depth >= MAX_DEPTH {
                    return Err(Stop::Unusual);
                }
                self.i += 1;
                self.ws();
                if self.peek() == Some(b'}') {
                    self.i += 1;
                    return Ok(());
                }
                loop {
                    // A skipped key's escapes are checked; its text unused.
                    self.string().ok_or(Stop::Invalid)?;
                    self.ws();
                    self.expect(b':')?;
                    self.ws();
                    self.skip_value(depth + 1)?;
                    self.ws();
                    match self.peek() {
                        Some(b',') => {
                            self.i += 1;
                            self.ws();
                        }
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(());
                        }
                        _ => return Err(Stop::Invalid),
                    }
                }
            }
            Some(b'[') => {
                if depth >= MAX_DEPTH {
                    return Err(Stop::Unusual);
                }
                self.i += 1;
                self.ws();
                if self.peek() == Some(b']') {
                    self.i += 1;
                    return Ok(());
                }
                loop {
                    self.skip_value(depth + 1)?;
                    self.ws();
                    match self.peek() {
                        Some(b',') => {
                            self.i += 1;
                            self.ws();
                        }
                        Some(b']') => {
                            self.i += 1;
                            return Ok(());
                        }
                        _ => return Err(Stop::Invalid),
                    }
                }
            }
            _ => Err(Stop::Invalid),
        }
    }

    /// [`Self::skip_value`] with the common case, a string, inline: most
    /// skipped members are strings, and the general skip is a call.
    #[inline(always)]
    fn skip(&mut self, depth: u32) -> Result<(), Stop> {
        if self.peek() == Some(b'"') {
            self.string().map(|_| ()).ok_or(Stop::Invalid)
        } else {
            self.skip_value(depth)
        }
    }

    /// Skips a value and returns its raw text; `escapes` is set when it is
    /// a string with escapes.
    #[inline(always)]
    fn raw(&mut self, depth: u32, escapes: &mut bool) -> Result<&'a str, Stop> {
        let start = self.i;
        if self.peek() == Some(b'"') {
            let before = self.escaped;
            self.string().ok_or(Stop::Invalid)?;
            *escapes |= self.escaped != before;
        } else {
            self.skip_value(depth)?;
        }
        // SAFETY: `start` is at the value's first byte and `self.i` just
        // past its last, both ASCII (a quote, a bracket, a brace, a digit or
        // a letter of a literal) or the end: char boundaries of the text.
        Ok(unsafe { self.text.get_unchecked(start..self.i) })
    }

    /// The key of an object member, up to its colon. A key with escapes is
    /// left to serde_json (it decodes them before matching).
    #[inline(always)]
    fn key(&mut self) -> Result<&'a str, Stop> {
        if let Some(key) = self.short_key() {
            return Ok(key);
        }
        let before = self.escaped;
        let key = self.string().ok_or(Stop::Invalid)?;
        if self.escaped != before {
            return Err(Stop::Unusual);
        }
        self.ws();
        self.expect(b':')?;
        self.ws();
        Ok(key)
    }

    /// The common key, whole in the next 17 bytes: `"name":` with no
    /// escape and no control character, then optional whitespace. `None`
    /// leaves the position alone for the general path, which decides
    /// everything else. (One 16-byte comparison instead of the string
    /// loop: keys are a third of a line's tokens.)
    #[inline(always)]
    fn short_key(&mut self) -> Option<&'a str> {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{
                __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_max_epu8, _mm_movemask_epi8,
                _mm_or_si128, _mm_set1_epi8,
            };
            let i = self.i;
            if i + 17 > self.b.len() || self.b[i] != b'"' {
                return None;
            }
            // SAFETY: SSE2 is in the x86_64 baseline; bytes i+1 .. i+17
            // lie within `b` (checked above).
            let (quotes, special) = unsafe {
                let v = _mm_loadu_si128(self.b.as_ptr().add(i + 1).cast::<__m128i>());
                let ctrl = _mm_set1_epi8(0x1f);
                let quotes = _mm_movemask_epi8(_mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8)));
                let special = _mm_movemask_epi8(_mm_or_si128(
                    _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8)),
                    _mm_cmpeq_epi8(_mm_max_epu8(v, ctrl), ctrl),
                ));
                (quotes as u32, special as u32)
            };
            if quotes == 0 {
                return None;
            }
            let len = quotes.trailing_zeros() as usize;
            // A backslash or a control character before the closing quote.
            if special & ((1u32 << len) - 1) != 0 {
                return None;
            }
            let end = i + 1 + len;
            if self.b.get(end + 1) != Some(&b':') {
                return None;
            }
            self.i = end + 2;
            self.ws();
            // SAFETY: `i + 1` follows a quote and `end` is at one: ASCII
            // bytes of a valid UTF-8 text, so char boundaries.
            Some(unsafe { self.text.get_unchecked(i + 1..end) })
        }
        #[cfg(not(target_arch = "x86_64"))]
        None
    }

    /// After a member: `,` (true: another follows) or `}` (false).
    #[inline]
    fn next_member(&mut self) -> Result<bool, Stop> {
        self.ws();
        match self.peek() {
            Some(b',') => {
                self.i += 1;
                self.ws();
                Ok(true)
            }
            Some(b'}') => {
                self.i += 1;
                Ok(false)
            }
            _ => Err(Stop::Invalid),
        }
    }

    /// The top-level object. Duplicate keys: the last one wins.
    fn object(&mut self, fields: &mut Fields<'a>) -> Result<(), Stop> {
        // Whether a captured string holds an escape.
        let mut escapes = false;
        self.expect(b'{')?;
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            fields.plain = true;
            return Ok(());
        }
        loop {
            let key = self.key()?;
            match Key::of(key) {
                Key::Erase => fields.erase = Some(self.raw(1, &mut escapes)?),
                Key::CustomerId => fields.customer_id = Some(self.raw(1, &mut escapes)?),
                Key::Type => fields.kind = Some(self.raw(1, &mut escapes)?),
                Key::Timestamp => fields.timestamp = Some(self.raw(1, &mut escapes)?),
                Key::Value => fields.value = Some(self.raw(1, &mut escapes)?),
                Key::Channel => fields.channel = Some(self.raw(1, &mut escapes)?),
                Key::EventId => fields.event_id = Some(self.raw(1, &mut escapes)?),
                Key::UserId => fields.user_id = Some(self.raw(1, &mut escapes)?),
                Key::AnonymousId => fields.anonymous_id = Some(self.raw(1, &mut escapes)?),
                Key::Event => fields.event = Some(self.raw(1, &mut escapes)?),
                Key::MessageId => fields.message_id = Some(self.raw(1, &mut escapes)?),
                Key::Attributes => {
                    fields.attributes_segment = self.nested(Nested::Attributes, &mut escapes)?.0;
                }
                Key::Properties => {
                    let (revenue, value) = self.nested(Nested::Properties, &mut escapes)?;
                    fields.properties_revenue = revenue;
                    fields.properties_value = value;
                }
                Key::Revenue | Key::Segment | Key::Other => self.skip(1)?,
            }
            if !self.next_member()? {
                fields.plain = !escapes;
                return Ok(());
            }
        }
    }

    /// `attributes` or `properties`: the keys they hold that the model
    /// reads, when the value is an object (anything else is skipped).
    fn nested(
        &mut self,
        which: Nested,
        escapes: &mut bool,
    ) -> Result<(Option<&'a str>, Option<&'a str>), Stop> {
        let mut out = (None, None);
        if self.peek() != Some(b'{') {
            self.skip_value(1)?;
            return Ok(out);
        }
        self.i += 1;
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(out);
        }
        loop {
            let key = self.key()?;
            match (which, Key::of(key)) {
                (Nested::Attributes, Key::Segment) | (Nested::Properties, Key::Revenue) => {
                    out.0 = Some(self.raw(2, escapes)?)
                }
                (Nested::Properties, Key::Value) => out.1 = Some(self.raw(2, escapes)?),
                _ => self.skip(2)?,
            }
            if !self.next_member()? {
                return Ok(out);
            }
        }
    }
}
