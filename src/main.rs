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
use ces_stream::report::MovementStart;

/// jemalloc for the whole process, librdkafka's C code included (its
/// `malloc` and `free` are replaced too). With glibc's allocator, a worker
/// freeing a message librdkafka's fetch thread allocated waits on that
/// thread's arena lock: measured, most of the time a worker was not
/// running it was blocked there.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser, Debug)]
#[command(
    name = "ces-stream",
    version,
    about = "Live customer engagement scores from a Kafka clickstream"
)]
struct Cli {
    /// Log format: human-readable text or one JSON object per line.
    /// Levels come from RUST_LOG (default: info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

/// The options of `generate`.
#[derive(clap::Args, Debug)]
struct GenerateArgs {
    /// Write JSONL to this file (`-` for stdout), in simulated time.
    #[arg(long, short, conflicts_with_all = ["brokers", "topic"], required_unless_present = "topic")]
    output: Option<PathBuf>,
    /// Produce to Kafka at these bootstrap servers, in live time.
    #[arg(long, requires = "topic")]
    brokers: Option<String>,
    /// The Kafka topic to produce to.
    #[arg(long, requires = "brokers")]
    topic: Option<String>,
    /// Events per second to Kafka (0: as fast as possible).
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Number of events (a file needs it; Kafka runs until Ctrl-C without it).
    #[arg(long)]
    events: Option<u64>,
    /// Number of distinct customers.
    #[arg(long, default_value_t = 100_000)]
    customers: u64,
    /// Random seed: the same seed gives the same stream.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// File only: time of the first event (RFC 3339).
    #[arg(long, default_value = "2026-09-01T00:00:00Z")]
    start: String,
    /// File only: time covered by the stream.
    #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
    span: std::time::Duration,
    /// Share of malformed events.
    #[arg(long, default_value_t = 0.001)]
    malformed: f64,
    /// Share of events sent twice with the same id (producer retries).
    #[arg(long, default_value_t = 0.0)]
    duplicates: f64,
    /// Share of erasure requests (tombstones on Kafka).
    #[arg(long, default_value_t = 0.0)]
    erasures: f64,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Consume touchpoints from Kafka, score them live, publish signals.
    Run {
        /// The configuration file, with a [kafka] section (or CES_KAFKA_*
        /// variables). Without it, or without [scoring] in it: the built-in
        /// model (config/default.toml).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// The whole product on this machine, no Kafka needed: an embedded
    /// broker, a synthetic clickstream and the live pipeline, with a live view.
    Demo {
        /// Events per second.
        #[arg(long, default_value_t = 1_000)]
        rate: u64,
        /// Distinct customers in the stream.
        #[arg(long, default_value_t = 2_000)]
        customers: u64,
        /// Partitions of the input topic.
        #[arg(long, default_value_t = 4)]
        partitions: i32,
        /// Stop after this long (e.g. 30s, 5m); default: until Ctrl-C.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<std::time::Duration>,
        /// A model to use instead of the demo's fast-clock one.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// A plain line per second instead of a redrawn screen.
        #[arg(long)]
        plain: bool,
    },
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
        /// Also write every customer's final state as JSONL (as `inspect` does).
        #[arg(long, requires = "at")]
        final_state: Option<PathBuf>,
        /// The time to evaluate the final state at (RFC 3339).
        #[arg(long, requires = "final_state")]
        at: Option<String>,
    },
    /// Print what the snapshot store holds, per customer, as JSONL: what a
    /// restart would restore.
    Inspect {
        /// The configuration file ([snapshot] and [kafka].group_id locate the store).
        #[arg(long, short)]
        config: PathBuf,
        /// Only this partition.
        #[arg(long)]
        partition: Option<i32>,
        /// Evaluate scores at this time (RFC 3339); default now.
        #[arg(long)]
        at: Option<String>,
    },
    /// Generate a synthetic clickstream (personas, bots, a few malformed
    /// events) into a JSONL file or a Kafka topic.
    Generate(GenerateArgs),
    /// Replay a history and write a self-contained HTML report of it: tiers
    /// over time, the score distribution, what separates the tiers, how
    /// customers moved.
    Report {
        /// The configuration file (only the scoring sections are needed).
        #[arg(long, short)]
        config: PathBuf,
        /// The events, one JSON object per line; `-` reads stdin.
        #[arg(long, short)]
        input: PathBuf,
        /// Where to write the HTML page.
        #[arg(long, short)]
        output: PathBuf,
        /// Also write the figures as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Compare with the same history under this model: tier migration,
        /// churn alerts per week, score differences, the top movers.
        #[arg(long)]
        compare: Option<PathBuf>,
        /// Show the score distribution per segment: an `attributes` key of
        /// the events (each customer's latest value), or `channel` (each
        /// customer's main channel).
        #[arg(long)]
        segment_by: Option<String>,
        /// The movement matrix compares with the tiers this long before
        /// the last event (e.g. 30d, 7d).
        #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
        movement_window: std::time::Duration,
        /// The movement matrix compares with the tiers at this time instead
        /// (RFC 3339, e.g. 2026-10-01T00:00:00Z).
        #[arg(long, conflicts_with = "movement_window")]
        since: Option<String>,
        /// Do not show a progress bar.
        #[arg(long)]
        no_progress: bool,
    },
    /// Validate a configuration file and print the effective model, defaults filled in.
    CheckConfig {
        /// The configuration file.
        file: PathBuf,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// A panic on any thread ends the process. A thread that dies alone leaves
/// a service that looks alive and is not: a panicked delivery thread
/// acknowledges nothing more, so no offset is committed again while
/// `/readyz` still answers 200. Exiting hands the partitions to the group
/// and the restart to the supervisor; the state comes back from the last
/// snapshot, and nothing is lost (at_least_once) or sent twice
/// (exactly_once).
fn exit_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        tracing::error!("a thread panicked ({info}): exiting");
        std::process::abort();
    }));
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    exit_on_panic();
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
        Command::Run { config } => run_service(config.as_deref()),
        Command::Demo {
            rate,
            customers,
            partitions,
            duration,
            config,
            plain,
        } => run_demo(ces_stream::demo::DemoOptions {
            rate,
            customers,
            partitions,
            duration,
            config,
            plain,
        }),
        Command::CheckConfig { file } => {
            let settings = Settings::load(&file)?;
            print!("{}", settings.effective_toml());
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate(args) => generate(args),
        Command::Report {
            config,
            input,
            output,
            json,
            compare,
            segment_by,
            movement_window,
            since,
            no_progress,
        } => {
            let settings = Settings::load(&config)?;
            let other = compare.as_deref().map(Settings::load).transpose()?;
            let movement_start = match since {
                Some(text) => MovementStart::At(parse_time(&text)?),
                None => MovementStart::Before(
                    ces_stream::timestamp::duration_millis(movement_window)
                        .map_err(anyhow::Error::msg)?,
                ),
            };
            let options = ces_stream::report::ReportOptions {
                movement_start,
                segment_by: segment_by
                    .as_deref()
                    .map(ces_stream::report::figures::SegmentBy::parse),
            };
            report(
                settings,
                other,
                &input,
                &output,
                json.as_deref(),
                &options,
                no_progress,
            )
        }
        Command::Replay {
            config,
            input,
            output,
            dead_letter,
            no_progress,
            final_state,
            at,
        } => {
            let settings = Settings::load(&config)?;
            let final_state = match (final_state, at) {
                (Some(path), Some(at)) => Some((path, parse_time(&at)?)),
                _ => None,
            };
            run_replay(
                settings,
                input,
                output,
                dead_letter,
                no_progress,
                final_state,
            )
        }
        Command::Inspect {
            config,
            partition,
            at,
        } => {
            let settings = Settings::load(&config)?;
            let at = match at {
                Some(a) => parse_time(&a)?,
                None => ces_stream::timestamp::now_millis(),
            };
            inspect(&settings, partition, at)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `run`: the service, until a signal.
fn run_service(config: Option<&std::path::Path>) -> anyhow::Result<ExitCode> {
    let settings = match config {
        Some(path) => Settings::load(path)?,
        None => Settings::load_built_in()?,
    };
    if settings.built_in_model {
        let from = config.map_or_else(
            || "no --config".to_string(),
            |p| format!("no [scoring] in {}", p.display()),
        );
        tracing::info!(
            activities = settings.model.activities.len(),
            "{from}: scoring with the built-in model (config/default.toml)"
        );
    }
    settings.kafka()?;
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(ces_stream::service::run(
        settings,
        ces_stream::shutdown::signal(),
    ));
    // The service bounds its own shutdown: a client call still blocked
    // past shutdown_timeout must not hold the exit.
    runtime.shutdown_background();
    result?;
    Ok(ExitCode::SUCCESS)
}

/// `demo`: the embedded broker, generator and pipeline.
fn run_demo(options: ces_stream::demo::DemoOptions) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(ces_stream::demo::run(
        options,
        ces_stream::shutdown::signal(),
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// `generate`: a synthetic clickstream to Kafka (live) or to a file.
fn generate(args: GenerateArgs) -> anyhow::Result<ExitCode> {
    for (flag, share) in [
        ("--malformed", args.malformed),
        ("--duplicates", args.duplicates),
        ("--erasures", args.erasures),
    ] {
        anyhow::ensure!(
            (0.0..=1.0).contains(&share),
            "{flag} must be a share in [0, 1], got {share}"
        );
    }
    let options = ces_stream::synth::SynthOptions {
        customers: args.customers,
        seed: args.seed,
        malformed: args.malformed,
        duplicates: args.duplicates,
        erasures: args.erasures,
        ..Default::default()
    };
    if let (Some(brokers), Some(topic)) = (args.brokers, args.topic) {
        let target = ces_stream::generate::KafkaTarget {
            brokers,
            topic,
            rate: args.rate,
            events: args.events,
            cycle: std::time::Duration::from_secs(600),
            options: Vec::new(),
        };
        return generate_to_kafka(target, options);
    }
    let output = args
        .output
        .context("--output or --brokers/--topic is required")?;
    let events = args.events.unwrap_or(1_000_000);
    let start = ces_stream::timestamp::parse_rfc3339(&args.start)
        .with_context(|| format!("--start {:?} is not an RFC 3339 time", args.start))?;
    let span = ces_stream::timestamp::duration_millis(args.span).map_err(anyhow::Error::msg)?;
    let out: Box<dyn Write> = if output.as_os_str() == "-" {
        Box::new(BufWriter::with_capacity(1 << 20, std::io::stdout().lock()))
    } else {
        Box::new(create(&output)?)
    };
    ces_stream::generate::to_file(out, events, options, start, span)?;
    Ok(ExitCode::SUCCESS)
}

/// Produces to Kafka until the events are sent or a signal comes.
fn generate_to_kafka(
    target: ces_stream::generate::KafkaTarget,
    options: ces_stream::synth::SynthOptions,
) -> anyhow::Result<ExitCode> {
    let running = ces_stream::generate::spawn(target, options);
    let stop = std::sync::Arc::clone(&running.stop);
    let runtime = tokio::runtime::Runtime::new()?;
    let sent = std::sync::Arc::clone(&running.sent);
    runtime.spawn(async move {
        ces_stream::shutdown::signal().await;
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let result = running
        .thread
        .join()
        .map_err(|_| anyhow::anyhow!("the generator thread panicked"))?;
    result.context("cannot produce to Kafka")?;
    eprintln!(
        "generate: {} events sent",
        sent.load(std::sync::atomic::Ordering::SeqCst)
    );
    Ok(ExitCode::SUCCESS)
}

fn parse_time(text: &str) -> anyhow::Result<i64> {
    ces_stream::timestamp::parse_rfc3339(text)
        .with_context(|| format!("{text:?} is not an RFC 3339 time"))
}

fn inspect(settings: &Settings, partition: Option<i32>, at: i64) -> anyhow::Result<()> {
    use ces_stream::snapshot::Store;
    let Some(store) = ces_stream::service::open_store(settings)? else {
        anyhow::bail!("[snapshot] store = \"none\": there is nothing to inspect");
    };
    let model = Arc::new(settings.model.clone());
    let metrics = ces_stream::metrics::Metrics::new(&model);
    let partitions = match (partition, &store) {
        (Some(p), _) => vec![p],
        (None, Store::Local(s)) => s.partitions(),
        (None, Store::Kafka(c)) => c.partitions(),
    };
    if partitions.is_empty() {
        anyhow::bail!("the snapshot store holds no partitions");
    }
    let mut out = BufWriter::new(std::io::stdout().lock());
    for p in partitions {
        match store.load(p, &model, &metrics) {
            Some(r) => {
                let n = ces_stream::inspect::write_engine(&mut out, &r.engine, at, Some(p))?;
                eprintln!(
                    "partition {p}: {n} customers from {} (offsets {:?})",
                    r.path.display(),
                    r.header.offsets
                );
            }
            None => eprintln!("partition {p}: no usable snapshot"),
        }
    }
    out.flush()?;
    Ok(())
}

fn create(path: &PathBuf) -> anyhow::Result<BufWriter<File>> {
    let f = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    Ok(BufWriter::with_capacity(1 << 20, f))
}

/// `report`: the history replayed, its figures as a page (and JSON).
fn report(
    settings: Settings,
    other: Option<Settings>,
    input: &std::path::Path,
    output: &std::path::Path,
    json: Option<&std::path::Path>,
    options: &ces_stream::report::ReportOptions,
    no_progress: bool,
) -> anyhow::Result<ExitCode> {
    let title = format!("ces-stream report: {}", input.display());
    let (reader, bar) = open_input(input, no_progress)?;
    let mut tick = |bytes: u64| {
        if let Some(b) = &bar {
            b.set_position(bytes);
        }
    };
    let progress: Option<replay::Progress<'_>> = bar.is_some().then_some(&mut tick as _);
    let model = Arc::new(settings.model);
    let (figures, summary) = match other {
        None => ces_stream::report::figures(model, reader, options, progress)?,
        Some(other) => ces_stream::report::figures_compared(
            model,
            Arc::new(other.model),
            reader,
            options,
            progress,
        )?,
    };
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    eprint!("{}", summary.render());
    std::fs::write(output, ces_stream::report::html::render(&figures, &title))
        .with_context(|| format!("cannot write {}", output.display()))?;
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&figures)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    eprintln!("report: {}", output.display());
    Ok(ExitCode::SUCCESS)
}

/// The input of `replay` and `report` (`-`: stdin), and a progress bar
/// when someone watches and the size is known.
fn open_input(
    input: &std::path::Path,
    no_progress: bool,
) -> anyhow::Result<(Box<dyn std::io::BufRead>, Option<indicatif::ProgressBar>)> {
    let is_stdin = input.as_os_str() == "-";
    let reader: Box<dyn std::io::BufRead> = if is_stdin {
        Box::new(BufReader::with_capacity(1 << 20, std::io::stdin().lock()))
    } else {
        let f = File::open(input).with_context(|| format!("cannot open {}", input.display()))?;
        Box::new(BufReader::with_capacity(1 << 20, f))
    };
    let bar = (!no_progress && !is_stdin && std::io::stderr().is_terminal())
        .then(|| std::fs::metadata(input).map(|m| m.len()).ok())
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
    Ok((reader, bar))
}

fn run_replay(
    settings: Settings,
    input: PathBuf,
    output: Option<PathBuf>,
    dead_letter: Option<PathBuf>,
    no_progress: bool,
    final_state: Option<(PathBuf, i64)>,
) -> anyhow::Result<ExitCode> {
    let model = Arc::new(settings.model);
    let mut dead: Option<BufWriter<File>> = dead_letter.as_ref().map(create).transpose()?;
    // Replay writes its outputs in chunks of 64 KiB already: a BufWriter
    // here would only copy them once more.
    let out: Box<dyn Write> = match &output {
        Some(p) => {
            Box::new(File::create(p).with_context(|| format!("cannot create {}", p.display()))?)
        }
        None => Box::new(std::io::stdout().lock()),
    };

    let (reader, bar) = open_input(&input, no_progress)?;
    let mut tick = |bytes: u64| {
        if let Some(b) = &bar {
            b.set_position(bytes);
        }
    };
    let progress: Option<replay::Progress<'_>> = bar.is_some().then_some(&mut tick as _);

    let (engine, summary) = replay::replay(
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
    if let Some((path, at)) = final_state {
        let mut f = create(&path)?;
        ces_stream::inspect::write_engine(&mut f, &engine, at, None)?;
        f.flush()?;
    }
    if summary.invalid_total() > 0 && dead_letter.is_none() {
        eprintln!("  (invalid events were only counted: pass --dead-letter FILE to keep them)");
    }
    Ok(ExitCode::SUCCESS)
}
