//! The `ces-stream` command line: parses arguments, loads the configuration
//! once, and hands over to the subcommand.

use std::fs::File;
use std::io::{BufReader, BufWriter, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};

use ces_stream::config::Settings;
use ces_stream::replay;

#[derive(Parser, Debug)]
#[command(
    name = "ces-stream",
    version,
    about = "Live customer engagement scores from a Kafka clickstream"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Score a JSONL file of events and write the output events as JSONL.
    Replay {
        /// The configuration file (only the scoring sections are needed).
        #[arg(long, short)]
        config: PathBuf,
        /// The events, one JSON object per line; `-` reads stdin.
        #[arg(long, short)]
        input: PathBuf,
        /// Where to write output events; stdout by default.
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Where to write invalid events as JSONL; without it they are only counted.
        #[arg(long)]
        dead_letter: Option<PathBuf>,
        /// Do not show a progress bar.
        #[arg(long)]
        no_progress: bool,
    },
    /// Generate a synthetic clickstream (personas, bots, a few malformed events).
    Generate {
        /// Write JSONL to this file (`-` for stdout).
        #[arg(long, short)]
        output: PathBuf,
        /// Number of events.
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
        /// Number of distinct customers.
        #[arg(long, default_value_t = 100_000)]
        customers: u64,
        /// Random seed: the same seed gives the same stream.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Time of the first event (RFC 3339).
        #[arg(long, default_value = "2026-09-01T00:00:00Z")]
        start: String,
        /// Time covered by the stream.
        #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
        span: std::time::Duration,
        /// Share of malformed events.
        #[arg(long, default_value_t = 0.001)]
        malformed: f64,
    },
    /// Validate a configuration file and print the effective model, defaults filled in.
    CheckConfig {
        /// The configuration file.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ces-stream: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::CheckConfig { file } => {
            let settings = Settings::load(&file)?;
            print!("{}", settings.effective_toml());
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate {
            output,
            events,
            customers,
            seed,
            start,
            span,
            malformed,
        } => {
            let start = ces_stream::timestamp::parse_rfc3339(&start)
                .with_context(|| format!("--start {start:?} is not an RFC 3339 time"))?;
            let span = ces_stream::timestamp::duration_millis(span).map_err(anyhow::Error::msg)?;
            let out: Box<dyn Write> = if output.as_os_str() == "-" {
                Box::new(BufWriter::with_capacity(1 << 20, std::io::stdout().lock()))
            } else {
                Box::new(create(&output)?)
            };
            generate_file(out, events, customers, seed, start, span, malformed)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Replay {
            config,
            input,
            output,
            dead_letter,
            no_progress,
        } => {
            let settings = Settings::load(&config)?;
            run_replay(settings, input, output, dead_letter, no_progress)
        }
    }
}

fn generate_file(
    mut out: impl Write,
    events: u64,
    customers: u64,
    seed: u64,
    start: i64,
    span: i64,
    malformed: f64,
) -> anyhow::Result<()> {
    use ces_stream::synth::{Synth, SynthEvent, SynthOptions};
    let mut synth = Synth::new(SynthOptions {
        customers,
        seed,
        malformed,
        ..SynthOptions::default()
    });
    let mut ev = SynthEvent::default();
    let step = span as f64 / events.max(1) as f64;
    for i in 0..events {
        let t = start + (i as f64 * step) as i64;
        synth.next(t, i as f64 / events.max(1) as f64, &mut ev);
        out.write_all(&ev.payload)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

fn create(path: &PathBuf) -> anyhow::Result<BufWriter<File>> {
    let f = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    Ok(BufWriter::with_capacity(1 << 20, f))
}

fn run_replay(
    settings: Settings,
    input: PathBuf,
    output: Option<PathBuf>,
    dead_letter: Option<PathBuf>,
    no_progress: bool,
) -> anyhow::Result<ExitCode> {
    let model = Arc::new(settings.model);
    let mut dead: Option<BufWriter<File>> = dead_letter.as_ref().map(create).transpose()?;
    let out: Box<dyn Write> = match &output {
        Some(p) => Box::new(create(p)?),
        None => Box::new(BufWriter::with_capacity(1 << 20, std::io::stdout().lock())),
    };

    let is_stdin = input.as_os_str() == "-";
    let reader: Box<dyn std::io::BufRead> = if is_stdin {
        Box::new(BufReader::with_capacity(1 << 20, std::io::stdin().lock()))
    } else {
        let f = File::open(&input).with_context(|| format!("cannot open {}", input.display()))?;
        Box::new(BufReader::with_capacity(1 << 20, f))
    };

    // A progress bar only when someone watches and the size is known.
    let bar = (!no_progress && !is_stdin && std::io::stderr().is_terminal())
        .then(|| std::fs::metadata(&input).map(|m| m.len()).ok())
        .flatten()
        .map(|len| {
            let bar = indicatif::ProgressBar::new(len);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
    let mut tick = |bytes: u64| {
        if let Some(b) = &bar {
            b.set_position(bytes);
        }
    };
    let progress: Option<replay::Progress<'_>> = bar.is_some().then_some(&mut tick as _);

    let (_engine, summary) = replay::replay(
        model,
        reader,
        out,
        dead.as_mut().map(|d| d as &mut dyn Write),
        progress,
    )?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    eprint!("{}", summary.render());
    if summary.invalid_total() > 0 && dead_letter.is_none() {
        eprintln!("  (invalid events were only counted: pass --dead-letter FILE to keep them)");
    }
    Ok(ExitCode::SUCCESS)
}
