//! `ces-stream replay`: the scoring model over a JSONL file (spec section 7).
//!
//! The imperative shell around the engine for files: read lines, parse,
//! process with the replay clock, write outputs and dead letters, count.
//! The same code serves the command, the golden tests and the benchmarks.

use std::io::{BufRead, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::{Engine, EngineError, Outcome, Signal, SignalKind};
use crate::event::{self, IgnoreReason, InvalidReason, ParseContext, Parsed};
use crate::model::Model;
use crate::output::{push_json_str, Encoder};

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

/// Replays `input` through `engine`.
pub fn replay_into(
    engine: &mut Engine,
    mut input: impl BufRead,
    mut output: impl Write,
    mut dead_letters: Option<&mut dyn Write>,
    mut progress: Option<Progress<'_>>,
) -> Result<Summary, ReplayError> {
    let started = Instant::now();
    let model = Arc::clone(engine.model());
    let encoder = Encoder::new(&model);
    let mut summary = Summary::default();
    let mut out = Vec::with_capacity(FLUSH_BYTES * 2);
    let mut dead = Vec::new();
    let mut bytes_read = 0u64;
    let mut outputs = [0u64; SignalKind::NAMES.len()];
    // Lines are read and parsed in batches, so that each customer's state
    // can be prefetched a few events before it is needed: with a million
    // customers, waiting for memory is most of the cost of an event.
    let mut batch: Vec<u8> = Vec::with_capacity(BATCH * 256);
    let mut lines: Vec<(u64, std::ops::Range<usize>)> = Vec::with_capacity(BATCH);

    loop {
        batch.clear();
        lines.clear();
        while lines.len() < BATCH {
            let start = batch.len();
            let n = read_line(&mut input, &mut batch).map_err(ReplayError::Read)?;
            if n == 0 {
                break;
            }
            bytes_read += n as u64;
            summary.lines += 1;
            let mut end = batch.len();
            if batch[end - 1] == b'\n' {
                end -= 1;
            }
            if batch[start..end]
                .iter()
                .all(|b| matches!(b, b' ' | b'\t' | b'\r'))
            {
                continue;
            }
            lines.push((summary.lines, start..end));
        }
        if lines.is_empty() {
            break;
        }
        summary.events += lines.len() as u64;
        let parsed: Vec<Parsed<'_>> = lines
            .iter()
            .map(|(_, range)| event::parse(&batch[range.clone()], &model, ParseContext::default()))
            .collect();

        for (i, p) in parsed.iter().enumerate() {
            // A lookup in two stages: the index lines of the customer two
            // distances ahead, then the record of the one a distance ahead
            // (its index lines loaded by now).
            if let Some(Parsed::Event(ahead)) = parsed.get(i + 2 * PREFETCH_DISTANCE) {
                engine.prefetch_index(&ahead.customer_id);
            }
            if let Some(Parsed::Event(ahead)) = parsed.get(i + PREFETCH_DISTANCE) {
                engine.prefetch(&ahead.customer_id);
            }
            let line_no = lines[i].0;
            match p {
                Parsed::Event(ev) => {
                    let mut sink = |s: &Signal<'_>| {
                        outputs[s.kind.index()] += 1;
                        encoder.encode(s, &mut out);
                        out.push(b'\n');
                    };
                    match engine.process_replay(ev, &mut sink) {
                        Ok(Outcome::Applied { .. }) => summary.accepted += 1,
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
                        encoder.encode(s, &mut out);
                        out.push(b'\n');
                    });
                }
                Parsed::Ignored(r) => summary.ignored[*r as usize] += 1,
                Parsed::Invalid(inv) => {
                    summary.invalid[inv.reason as usize] += 1;
                    if let Some(w) = dead_letters.as_deref_mut() {
                        dead.clear();
                        let payload = &batch[lines[i].1.clone()];
                        write_dead_letter(&mut dead, line_no, inv.reason, &inv.detail, payload);
                        w.write_all(&dead).map_err(ReplayError::WriteDeadLetter)?;
                    }
                }
            }
            if out.len() >= FLUSH_BYTES {
                output.write_all(&out).map_err(ReplayError::WriteOutput)?;
                out.clear();
            }
        }
        if let Some(p) = progress.as_mut() {
            p(bytes_read);
        }
    }
    output.write_all(&out).map_err(ReplayError::WriteOutput)?;
    output.flush().map_err(ReplayError::WriteOutput)?;
    if let Some(w) = dead_letters {
        w.flush().map_err(ReplayError::WriteDeadLetter)?;
    }
    if let Some(p) = progress.as_mut() {
        p(bytes_read);
    }
    summary.outputs = outputs;
    summary.customers = engine.customers().len() as u64;
    summary.forgotten = engine.forgotten_count();
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// Appends the next line of `input` to `out`, its newline included: what
/// `BufRead::read_until(b'\n', out)` does, with the memchr crate's SIMD
/// search instead of std's word-at-a-time one (std's search was 3% of a
/// replay's instructions, about 300 for a 200-byte line).
fn read_line(input: &mut impl BufRead, out: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut read = 0;
    loop {
        let available = match input.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let (done, used) = match memchr::memchr(b'\n', available) {
            Some(i) => {
                out.extend_from_slice(&available[..=i]);
                (true, i + 1)
            }
            None => {
                out.extend_from_slice(available);
                (available.is_empty(), available.len())
            }
        };
        input.consume(used);
        read += used;
        if done {
            return Ok(read);
        }
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
    use super::read_line;
    use std::io::{BufRead, BufReader};

    #[test]
    fn read_line_splits_like_read_until() {
        let text: &[u8] =
            b"{\"a\":1}\n\n\r\nlonger line spanning several reads \xc3\xa9\nlast without newline";
        // A 4-byte buffer: most lines straddle several refills.
        for capacity in [1, 4, 7, 64, 8192] {
            let mut ours = BufReader::with_capacity(capacity, text);
            let mut theirs = BufReader::with_capacity(capacity, text);
            loop {
                let (mut a, mut b) = (Vec::new(), Vec::new());
                let n = read_line(&mut ours, &mut a).unwrap();
                let m = theirs.read_until(b'\n', &mut b).unwrap();
                assert_eq!((n, &a), (m, &b), "capacity {capacity}");
                if n == 0 {
                    break;
                }
            }
        }
    }
}
