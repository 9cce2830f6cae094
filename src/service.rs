//! The service behind `ces-stream run`: the Kafka pipeline and what runs
//! beside it (the snapshot store), wired together and stopped together.

use std::future::Future;
use std::sync::Arc;

use crate::config::Settings;
use crate::kafka::pipeline::{self, PipelineError, Shared};
use crate::kafka::rebalance::PartitionHooks;
use crate::snapshot::local::LocalStore;
use crate::snapshot::periodic::Periodic;
use crate::snapshot::{fingerprint, StoreHooks, StoreKind};

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
}

/// What a snapshot store plugs into the pipeline: restore and release
/// hooks, and the periodic snapshots.
pub type StateStore = (Option<Arc<dyn PartitionHooks>>, Option<Periodic>);

/// The snapshot store the settings ask for.
pub fn state_store(settings: &Settings, shared: &Shared) -> Result<StateStore, ServiceError> {
    let s = &settings.snapshot;
    match s.store {
        StoreKind::None => Ok((None, None)),
        StoreKind::Local => {
            let kafka = settings.kafka()?;
            let store = Arc::new(LocalStore::new(&s.dir, &kafka.group_id, s.keep));
            // Fail at start, not at the first snapshot.
            std::fs::create_dir_all(store.root()).map_err(|source| ServiceError::SnapshotDir {
                dir: store.root().to_path_buf(),
                source,
            })?;
            let hooks = StoreHooks {
                store: Arc::clone(&store),
                model: Arc::clone(&shared.model),
                metrics: shared.metrics.clone(),
            };
            let periodic = Periodic::new(
                store,
                fingerprint(&shared.model),
                s.interval,
                shared.metrics.clone(),
            );
            Ok((Some(Arc::new(hooks)), Some(periodic)))
        }
    }
}

/// Runs until `shutdown` completes or the pipeline fails.
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServiceError> {
    let shared = Shared::new(Arc::new(settings.model.clone()));
    let (hooks, periodic) = state_store(&settings, &shared)?;
    pipeline::run(&settings, shared, hooks, periodic, shutdown).await?;
    Ok(())
}
