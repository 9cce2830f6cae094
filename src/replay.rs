//! `ces-stream replay`: the scoring model over a JSONL file (spec section 7).
//!
//! The imperative shell around the engine for files: read lines, parse,
//! process with the replay clock, write outputs and dead letters, count.
//! The same code serves the command, the golden tests and the benchmarks.

use std::io::{BufRead, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::customers::Slot;
use crate::engine::{Engine, EngineError, Outcome, Signal, SignalKind};
use crate::event::{self, Event, IgnoreReason, InvalidReason, ParseContext, Parsed};
use crate::model::Model;
use crate::output::{push_json_str, Encoder};
use crate::timestamp::Millis;

/// Why a replay stopped before the end of its input.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot read the input: {0}")]
    Read(#[source] std::io::Error),
    #[error("cannot write the outputs: {0}")]
    WriteOutput(#[source] std::io::Error),
    #[error("cannot write the dead letters: {0}")]
    WriteDeadLetter(#[source] std::io::Error),
    #[error("line {line}: {source}")]
    Engine { line: u64, source: EngineError },
}

/// Counts of one replay, printed as its summary.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    /// Every line, blank ones included.
    pub lines: u64,
    /// Non-blank lines.
    pub events: u64,
    pub accepted: u64,
    pub invalid: [u64; InvalidReason::ALL.len()],
    pub ignored: [u64; IgnoreReason::ALL.len()],
    /// Erasure requests (section 1), of known customers or not.
    pub erasures: u64,
    /// Per output kind, in `SignalKind::NAMES` order.
    pub outputs: [u64; 4],
    /// Customers held at the end.
    pub customers: u64,
    /// Customers removed by sweeps (`scoring.forget_after`).
    pub forgotten: u64,
    pub elapsed: Duration,
}

impl Summary {
    pub fn invalid_total(&self) -> u64 {
        self.invalid.iter().sum()
    }

    pub fn invalid_count(&self, r: InvalidReason) -> u64 {
        self.invalid[r as usize]
    }

    pub fn ignored_count(&self, r: IgnoreReason) -> u64 {
        self.ignored[r as usize]
    }

    pub fn events_per_second(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The human-readable summary for stderr.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "replay: {} events in {:.2}s ({:.0} events/s), {} customers ({} forgotten)",
            self.events,
            self.elapsed.as_secs_f64(),
            self.events_per_second(),
            self.customers,
            self.forgotten
        );
        let _ = writeln!(s, "  accepted {:>12}", self.accepted);
        let _ = writeln!(s, "  invalid  {:>12}", self.invalid_total());
        for r in InvalidReason::ALL {
            if self.invalid_count(r) > 0 {
                let _ = writeln!(s, "    {:<22}{:>10}", r.as_str(), self.invalid_count(r));
            }
        }
        let _ = writeln!(s, "  ignored  {:>12}", self.ignored.iter().sum::<u64>());
        for r in IgnoreReason::ALL {
            if self.ignored_count(r) > 0 {
                let _ = writeln!(s, "    {:<22}{:>10}", r.as_str(), self.ignored_count(r));
            }
        }
        let _ = writeln!(s, "  erasures {:>12}", self.erasures);
        let _ = writeln!(s, "  outputs  {:>12}", self.outputs.iter().sum::<u64>());
        for (name, n) in SignalKind::NAMES.iter().zip(self.outputs) {
            let _ = writeln!(s, "    {name:<22}{n:>10}");
        }
        s
    }
}

/// Called every so many lines with the number of bytes read so far.
pub type Progress<'a> = &'a mut dyn FnMut(u64);

/// Flush the output buffer to its writer past this size.
const FLUSH_BYTES: usize = 1 << 16;
/// Lines read and parsed at a time.
const BATCH: usize = 256;
/// How many events ahead a customer's state is prefetched.
const PREFETCH_DISTANCE: usize = 8;

/// Replays `input` through a fresh engine.
pub fn replay(
    model: Arc<Model>,
    input: impl BufRead,
    output: impl Write,
    dead_letters: Option<&mut dyn Write>,
    progress: Option<Progress<'_>>,
) -> Result<(Engine, Summary), ReplayError> {
    let mut engine = Engine::new(model);
    let summary = replay_into(&mut engine, input, output, dead_letters, progress)?;
    Ok((engine, summary))
}

/// What a caller may watch of a replay as it goes (the report's figures):
/// each call is made in file order, with the engine as it is then.
pub trait Observer {
    /// False for [`NoObserver`]: `replay` then does no work for an observer
    /// (not even slicing out an event's line).
    const OBSERVES: bool = true;
    /// Before an event at `t` is applied.
    #[inline]
    fn before_event(&mut self, _engine: &Engine, _t: Millis) {}
    /// An event was applied (accepted) to the customer in `slot`; `line`
    /// is its text.
    #[inline]
    fn applied(&mut self, _engine: &Engine, _event: &Event<'_>, _slot: Slot, _line: &[u8]) {}
    /// A customer whose event comes soon may be in `slot`: a hint to load
    /// what the observer keeps of it.
    #[inline]
    fn prefetch(&mut self, _slot: Slot) {}
    /// An output event.
    #[inline]
    fn signal(&mut self, _signal: &Signal<'_>) {}
    /// The customer whose id hashes to `hash` (by the engine's hasher) has
    /// an event two prefetch distances ahead: a hint to load the index
    /// lines of whatever the observer looks customers up in.
    #[inline]
    fn customer_far_ahead(&mut self, _hash: u64) {}
    /// As [`Self::customer_far_ahead`], one prefetch distance ahead: a
    /// hint to load the customer's own state.
    #[inline]
    fn customer_ahead(&mut self, _hash: u64) {}
    /// Every non-blank line (number `line_no`, text `line`), as parsed
    /// under the engine's model, after the engine handled it; `hash` is
    /// its customer id's hash for an event, else 0.
    #[inline]
    fn parsed(&mut self, _line_no: u64, _line: &[u8], _parsed: &Parsed<'_>, _hash: u64) {}
}

/// Watches nothing: `replay` itself.
pub struct NoObserver;

impl Observer for NoObserver {
    const OBSERVES: bool = false;
}

/// Replays `input` through `engine`.
pub fn replay_into(
    engine: &mut Engine,
    input: impl BufRead,
    output: impl Write,
    dead_letters: Option<&mut dyn Write>,
    progress: Option<Progress<'_>>,
) -> Result<Summary, ReplayError> {
    replay_observed(
        engine,
        input,
        Some(output),
        dead_letters,
        progress,
        &mut NoObserver,
    )
}

/// As [`replay_into`], telling `observer` what happens; without `output`
/// the outputs are not encoded at all (the report only counts them).
pub fn replay_observed<O: Observer>(
    engine: &mut Engine,
    mut input: impl BufRead,
    mut output: Option<impl Write>,
    dead_letters: Option<&mut dyn Write>,
    mut progress: Option<Progress<'_>>,
    observer: &mut O,
) -> Result<Summary, ReplayError> {
    let started = Instant::now();
    let mut run = Run {
        observer,
        encoder: Encoder::new(engine.model()),
        engine,
        summary: Summary::default(),
        out: Vec::with_capacity(FLUSH_BYTES * 2),
        dead: Vec::new(),
        dead_letters,
        outputs: [0; SignalKind::NAMES.len()],
        lines: Vec::with_capacity(BATCH),
        hashes: Vec::with_capacity(BATCH),
    };
    let mut bytes_read = 0u64;
    // A line the reader's buffer ended in the middle of.
    let mut carry: Vec<u8> = Vec::new();

    // Lines are parsed where the reader holds them (no copy), in batches,
    // so that each customer's state can be prefetched a few events before
    // it is needed: with a million customers, waiting for memory is most
    // of the cost of an event.
    loop {
        let buf = loop {
            match input.fill_buf() {
                Ok(b) => break b,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ReplayError::Read(e)),
            }
        };
        if buf.is_empty() {
            // The last line, without a newline.
            if !carry.is_empty() {
                run.add_line(&carry, 0..carry.len());
                run.batch(&carry, &mut output)?;
            }
            break;
        }
        if !carry.is_empty() {
            // Complete the carried line, then process it alone.
            let used = match memchr::memchr(b'\n', buf) {
                Some(i) => i + 1,
                None => buf.len(),
            };
            carry.extend_from_slice(&buf[..used]);
            input.consume(used);
            bytes_read += used as u64;
            if carry.last() == Some(&b'\n') {
                run.add_line(&carry, 0..carry.len() - 1);
                run.batch(&carry, &mut output)?;
                carry.clear();
            }
            continue;
        }
        let mut end = 0;
        while run.lines.len() < BATCH {
            match memchr::memchr(b'\n', &buf[end..]) {
                Some(i) => {
                    run.add_line(buf, end..end + i);
                    end += i + 1;
                }
                None => break,
            }
        }
        if end == 0 {
            // Not one whole line in the buffer: carry what there is.
            carry.extend_from_slice(buf);
            let used = buf.len();
            input.consume(used);
            bytes_read += used as u64;
            continue;
        }
        run.batch(buf, &mut output)?;
        input.consume(end);
        bytes_read += end as u64;
        if let Some(p) = progress.as_mut() {
            p(bytes_read);
        }
    }
    if let Some(output) = output.as_mut() {
        output
            .write_all(&run.out)
            .map_err(ReplayError::WriteOutput)?;
        output.flush().map_err(ReplayError::WriteOutput)?;
    }
    if let Some(w) = run.dead_letters {
        w.flush().map_err(ReplayError::WriteDeadLetter)?;
    }
    if let Some(p) = progress.as_mut() {
        p(bytes_read);
    }
    let mut summary = run.summary;
    summary.outputs = run.outputs;
    summary.customers = run.engine.customers().len() as u64;
    summary.forgotten = run.engine.forgotten_count();
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// The state of one replay between batches.
struct Run<'e, 'd, 'o, O: Observer> {
    observer: &'o mut O,
    engine: &'e mut Engine,
    encoder: Encoder,
    summary: Summary,
    /// Encoded outputs not yet written.
    out: Vec<u8>,
    /// One dead letter being encoded.
    dead: Vec<u8>,
    dead_letters: Option<&'d mut dyn Write>,
    outputs: [u64; SignalKind::NAMES.len()],
    /// The batch's non-blank lines: (line number, range in the text).
    lines: Vec<(u64, std::ops::Range<usize>)>,
    /// Per line of the batch, its event's customer id hash, computed once
    /// for the two prefetch stages and the lookup (0 for a line without an
    /// event: its prefetches are wasted hints, never wrong).
    hashes: Vec<u64>,
}

impl<O: Observer> Run<'_, '_, '_, O> {
    /// Counts the line at `range` of `text` (its newline excluded) and
    /// queues it unless it is blank.
    #[inline]
    fn add_line(&mut self, text: &[u8], range: std::ops::Range<usize>) {
        self.summary.lines += 1;
        if text[range.clone()]
            .iter()
            .all(|b| matches!(b, b' ' | b'\t' | b'\r'))
        {
            return;
        }
        self.lines.push((self.summary.lines, range));
    }

    /// Parses and applies the queued lines of `text`, and empties the queue.
    fn batch(&mut self, text: &[u8], output: &mut Option<impl Write>) -> Result<(), ReplayError> {
        let Run {
            observer,
            engine,
            encoder,
            summary,
            out,
            dead,
            dead_letters,
            outputs,
            lines,
            hashes,
        } = self;
        summary.events += lines.len() as u64;
        let encodes = output.is_some();
        let model = engine.model();
        let parsed: Vec<Parsed<'_>> = lines
            .iter()
            .map(|(_, range)| event::parse(&text[range.clone()], model, ParseContext::default()))
            .collect();
        hashes.clear();
        hashes.extend(parsed.iter().map(|p| match p {
            Parsed::Event(ev) => engine.customer_hash(&ev.customer_id),
            _ => 0,
        }));

        for (i, p) in parsed.iter().enumerate() {
            // A lookup in two stages: the index lines of the customer two
            // distances ahead, then the record of the one a distance ahead
            // (its index lines loaded by now).
            if let Some(&h) = hashes.get(i + 2 * PREFETCH_DISTANCE) {
                engine.prefetch_index_hashed(h);
                if O::OBSERVES {
                    observer.customer_far_ahead(h);
                }
            }
            if let Some(&h) = hashes.get(i + PREFETCH_DISTANCE) {
                if O::OBSERVES {
                    observer.customer_ahead(h);
                    engine.prefetch_hashed_with(h, |slot| observer.prefetch(slot));
                } else {
                    engine.prefetch_hashed(h);
                }
            }
            let line_no = lines[i].0;
            match p {
                Parsed::Event(ev) => {
                    if O::OBSERVES {
                        observer.before_event(engine, ev.timestamp);
                    }
                    let mut sink = |s: &Signal<'_>| {
                        outputs[s.kind.index()] += 1;
                        if O::OBSERVES {
                            observer.signal(s);
                        }
                        if encodes {
                            encoder.encode(s, out);
                            out.push(b'\n');
                        }
                    };
                    match engine.process_replay_hashed(ev, hashes[i], &mut sink) {
                        Ok(Outcome::Applied { slot, .. }) => {
                            summary.accepted += 1;
                            if O::OBSERVES {
                                observer.applied(engine, ev, slot, &text[lines[i].1.clone()]);
                            }
                        }
                        Ok(Outcome::Ignored(r)) => summary.ignored[r as usize] += 1,
                        Err(source) => {
                            return Err(ReplayError::Engine {
                                line: line_no,
                                source,
                            })
                        }
                    }
                }
                Parsed::Erase(id) => {
                    summary.erasures += 1;
                    engine.erase_replay(id, &mut |s: &Signal<'_>| {
                        outputs[s.kind.index()] += 1;
                        if O::OBSERVES {
                            observer.signal(s);
                        }
                        if encodes {
                            encoder.encode(s, out);
                            out.push(b'\n');
                        }
                    });
                }
                Parsed::Ignored(r) => summary.ignored[*r as usize] += 1,
                Parsed::Invalid(inv) => {
                    summary.invalid[inv.reason as usize] += 1;
                    if let Some(w) = dead_letters.as_deref_mut() {
                        dead.clear();
                        let payload = &text[lines[i].1.clone()];
                        write_dead_letter(dead, line_no, inv.reason, &inv.detail, payload);
                        w.write_all(dead).map_err(ReplayError::WriteDeadLetter)?;
                    }
                }
            }
            if O::OBSERVES {
                observer.parsed(line_no, &text[lines[i].1.clone()], p, hashes[i]);
            }
            if out.len() >= FLUSH_BYTES {
                if let Some(output) = output.as_mut() {
                    output.write_all(out).map_err(ReplayError::WriteOutput)?;
                }
                out.clear();
            }
        }
        lines.clear();
        Ok(())
    }
}

/// `{"line": N, "reason": "...", "detail": "...", "payload": "..."}` + newline.
fn write_dead_letter(
    out: &mut Vec<u8>,
    line: u64,
    reason: InvalidReason,
    detail: &str,
    payload: &[u8],
) {
    out.extend_from_slice(b"{\"line\":");
    out.extend_from_slice(itoa::Buffer::new().format(line).as_bytes());
    out.extend_from_slice(b",\"reason\":\"");
    out.extend_from_slice(reason.as_str().as_bytes());
    out.extend_from_slice(b"\",\"detail\":");
    push_json_str(out, detail);
    out.extend_from_slice(b",\"payload\":");
    push_json_str(out, &String::from_utf8_lossy(payload));
    out.extend_from_slice(b"}\n");
}

#[cfg(test)]
mod tests {
    use super::replay;
    use std::io::BufReader;
    use std::sync::Arc;

    /// Lines straddle the reader's buffer at every position: blank lines,
    /// CRLF, an invalid line, a last line without a newline. Every buffer
    /// size must give the outputs, dead letters and counts of reading the
    /// whole text at once.
    #[test]
    fn lines_split_across_reads_replay_as_one_text() {
        let model = Arc::new(
            crate::config::Settings::from_toml(
                "[scoring.activities]\npage_view = { weight = 1.0 }\npurchase = { weight = 10.0 }\n",
                std::path::Path::new("t.toml"),
            )
            .unwrap()
            .model,
        );
        let mut text = String::new();
        for i in 0..40 {
            let kind = if i % 3 == 0 { "purchase" } else { "page_view" };
            text.push_str(&format!(
                "{{\"customer_id\":\"c-{}\",\"type\":\"{kind}\",\"timestamp\":\"2026-11-20T10:{:02}:00Z\"}}",
                i % 7,
                i
            ));
            text.push_str(match i % 5 {
                0 => "\r\n",
                1 => "\n\n",
                2 => "\n \t\n",
                _ => "\n",
            });
            if i == 17 {
                text.push_str("{\"customer_id\": oops\n");
            }
        }
        text.push_str(
            "{\"customer_id\":\"last\",\"type\":\"purchase\",\"timestamp\":\"2026-11-20T11:00:00Z\"}",
        );
        let run = |capacity: usize| {
            let mut out = Vec::new();
            let mut dead = Vec::new();
            let reader = BufReader::with_capacity(capacity, text.as_bytes());
            let (_, mut summary) =
                replay(Arc::clone(&model), reader, &mut out, Some(&mut dead), None).unwrap();
            summary.elapsed = Default::default();
            (summary, out, dead)
        };
        let whole = run(1 << 20);
        assert_eq!(whole.0.events, 42);
        assert_eq!(whole.0.invalid_total(), 1);
        assert_eq!(whole.0.lines, 40 + 8 + 8 + 1 + 1);
        assert!(!whole.1.is_empty() && !whole.2.is_empty());
        for capacity in [1, 2, 3, 7, 64, 100, 101, 4096] {
            assert_eq!(run(capacity), whole, "capacity {capacity}");
        }
    }
}
