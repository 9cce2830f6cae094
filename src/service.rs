//! The service behind `ces-stream run`: the Kafka pipeline and what runs
//! beside it (the snapshot store), wired together and stopped together.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::config::Settings;
use crate::config_secrets::without_final_newline;
use crate::http::{ApiState, Routing};
use crate::kafka::claim_signature::ClaimSignature;
use crate::kafka::error::PipelineError;
use crate::kafka::members::{Members, MembersConfig, Rejection};
use crate::kafka::pipeline;
use crate::kafka::settings::KafkaSettings;
use crate::kafka::shared::Shared;
use crate::partition::PartitionHooks;
use crate::snapshot::changelog::Connection;
use crate::snapshot::changelog::{ChangelogError, ChangelogStore};
use crate::snapshot::local::LocalStore;
use crate::snapshot::{Store, StoreHooks, StoreKind};

/// Why the service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot use the snapshot directory {dir}: {source}")]
    SnapshotDir {
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("cannot listen on {addr} (http.listen): {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Changelog(#[from] ChangelogError),
    #[error("http.api_token_env names {var}, which is not set or empty")]
    Token { var: String },
    #[error("http.api_token_file: cannot read {path}: {reason}")]
    TokenFile {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("cannot start the members thread: {0}")]
    Members(std::io::Error),
    #[error("cannot build the client that forwards requests to other instances (http.forward_ca_file): {0}")]
    Forwarding(reqwest::Error),
}

/// What a snapshot store plugs into the pipeline: restore and release
/// hooks and periodic snapshots, or nothing.
pub type StateStore = Option<Arc<dyn PartitionHooks>>;

/// How the changelog store reaches the input's cluster.
fn connection(kafka: &KafkaSettings) -> Connection {
    Connection {
        client: kafka.common_config(),
        producer_options: kafka.producer_options.clone(),
        input_topics: kafka.input_topics.clone(),
    }
}

/// The snapshot store the settings ask for.
pub fn state_store(settings: &Settings, shared: &Shared) -> Result<StateStore, ServiceError> {
    let s = &settings.snapshot;
    match s.store {
        StoreKind::None => Ok(None),
        StoreKind::Local => {
            let kafka = settings.kafka()?;
            let store = Arc::new(LocalStore::new(&s.dir, &kafka.group_id, s.keep));
            // Fail at start, not at the first snapshot.
            std::fs::create_dir_all(store.root()).map_err(|source| ServiceError::SnapshotDir {
                dir: store.root().to_path_buf(),
                source,
            })?;
            Ok(hooks_for(Store::Local(store), s.interval, shared, kafka))
        }
        StoreKind::Kafka => {
            let kafka = settings.kafka()?;
            let topic = s
                .topic
                .clone()
                .unwrap_or_else(|| format!("{}-state", kafka.group_id));
            let store = ChangelogStore::open(&connection(kafka), s, &topic)?;
            tracing::info!(topic = %topic, "snapshots go to the changelog topic");
            Ok(hooks_for(
                Store::Kafka(Arc::new(store)),
                s.interval,
                shared,
                kafka,
            ))
        }
    }
}

/// The snapshot store of the settings, for reading (`inspect`).
pub fn open_store(settings: &Settings) -> Result<Option<Store>, ServiceError> {
    let s = &settings.snapshot;
    let kafka = settings.kafka()?;
    Ok(match s.store {
        StoreKind::None => None,
        StoreKind::Local => Some(Store::Local(Arc::new(LocalStore::new(
            &s.dir,
            &kafka.group_id,
            s.keep,
        )))),
        StoreKind::Kafka => {
            let topic = s
                .topic
                .clone()
                .unwrap_or_else(|| format!("{}-state", kafka.group_id));
            Some(Store::Kafka(Arc::new(ChangelogStore::open_existing(
                &connection(kafka),
                &topic,
            )?)))
        }
    })
}

fn hooks_for(
    store: Store,
    interval: std::time::Duration,
    shared: &Shared,
    kafka: &KafkaSettings,
) -> StateStore {
    Some(Arc::new(StoreHooks::new(
        store,
        Arc::clone(&shared.model),
        shared.metrics.clone(),
        interval,
        kafka.exactly_once(),
    )))
}

/// Runs until `shutdown` completes or the pipeline fails.
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServiceError> {
    let listener = tokio::net::TcpListener::bind(settings.http.listen)
        .await
        .map_err(|source| ServiceError::Listen {
            addr: settings.http.listen,
            source,
        })?;
    run_on(settings, listener, shutdown).await
}

/// As [`run`], with the HTTP listener already bound (tests bind port 0).
pub async fn run_on(
    settings: Settings,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServiceError> {
    let token = api_token(&settings.http)?;
    let mut shared = Shared::with_segments(
        Arc::new(settings.model.clone()),
        settings.http.segments.clone(),
    );
    shared.track_removals = settings.snapshot.store == StoreKind::Kafka;
    let hooks = state_store(&settings, &shared)?;
    let kafka = settings.kafka()?;
    let local = listener
        .local_addr()
        .map_err(|source| ServiceError::Listen {
            addr: settings.http.listen,
            source,
        })?;
    let url = settings
        .http
        .advertised_url
        .clone()
        .unwrap_or_else(|| default_advertised_url(local));
    let leaving = Arc::new(AtomicBool::new(false));
    let members_topic = format!("{}-members", kafka.group_id);
    if token.is_none() {
        tracing::warn!(
            topic = %members_topic,
            "no [http] api_token_env or api_token_file: the customer API answers anyone who reaches it, and member claims are not signed, so any client allowed to write to the members topic can have requests forwarded to an address of its choosing (see the README's Security section)"
        );
    }
    for reason in Rejection::ALL {
        // At zero from the start, so that an alert can use `increase`.
        shared
            .metrics
            .member_claims_rejected
            .with_label_values(&[reason.label()]);
    }
    let (members, members_thread) = Members::start(
        MembersConfig {
            client: kafka.common_config(),
            topic: members_topic.clone(),
            input_topic: kafka.input_topics.first().cloned().unwrap_or_default(),
            url: url.clone(),
            signature: token
                .as_deref()
                .map(|t: &str| ClaimSignature::new(t.as_bytes())),
        },
        shared.partitions.clone(),
        shared.metrics.member_claims_rejected.clone(),
        Arc::clone(&leaving),
    )
    .map_err(ServiceError::Members)?;
    tracing::info!(
        advertised_url = %url,
        topic = %members_topic,
        partitioner = %kafka.partitioner,
        "answering for the whole group: requests for other instances' partitions are forwarded"
    );
    let api = ApiState {
        shared: shared.clone(),
        clock: settings.clock,
        token,
        routing: Some(
            Routing::new(
                members,
                kafka.partitioner,
                settings.http.forward_ca.as_ref().map(|(_, pem)| &pem[..]),
            )
            .map_err(ServiceError::Forwarding)?,
        ),
    };
    tracing::info!(listen = %local, "HTTP server: /metrics /healthz /readyz /v1/customers/{{id}} /v1/tiers");
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::http::serve(listener, api, async {
        let _ = http_stopped.await;
    }));
    // The claim is withdrawn as soon as the stop begins: while this
    // instance drains, the others answer 503 for its partitions rather than
    // forward to an instance about to go.
    let withdraw = Arc::clone(&leaving);
    let shutdown = async move {
        shutdown.await;
        withdraw.store(true, Ordering::SeqCst);
    };
    let result = pipeline::run(kafka, settings.clock, shared, hooks, shutdown).await;
    leaving.store(true, Ordering::SeqCst);
    let _ = stop_http.send(());
    let _ = server.await;
    // The thread ends within a watch interval and a bounded flush, unless
    // it is still waiting on an unreachable cluster: then it is left to the
    // process's exit rather than allowed to stretch the stop.
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        tokio::task::spawn_blocking(move || members_thread.join()),
    )
    .await;
    result?;
    Ok(())
}

/// The API token, from the variable or the file the settings name.
fn api_token(http: &crate::config::HttpSettings) -> Result<Option<Arc<str>>, ServiceError> {
    if let Some(var) = &http.api_token_env {
        return match std::env::var(var) {
            Ok(token) if !token.is_empty() => Ok(Some(Arc::from(token))),
            _ => Err(ServiceError::Token { var: var.clone() }),
        };
    }
    let Some(path) = &http.api_token_file else {
        return Ok(None);
    };
    let failed = |reason: String| ServiceError::TokenFile {
        path: path.clone(),
        reason,
    };
    let token = std::fs::read_to_string(path)
        .map(without_final_newline)
        .map_err(|e| failed(e.to_string()))?;
    if token.is_empty() {
        return Err(failed("it is empty".into()));
    }
    Ok(Some(Arc::from(token)))
}

/// `http://<host>:<port>`: the listen address if it is a specific one, else
/// this machine's host name (in Kubernetes, the pod's name).
fn default_advertised_url(local: std::net::SocketAddr) -> String {
    let ip = local.ip();
    let host = if ip.is_unspecified() {
        crate::kafka::settings::host_name()
    } else if ip.is_ipv6() {
        format!("[{ip}]")
    } else {
        ip.to_string()
    };
    format!("http://{host}:{}", local.port())
}
