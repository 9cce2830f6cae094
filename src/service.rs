//! The service behind `ces-stream run`: the Kafka pipeline and what runs
//! beside it, wired together and stopped together.

use std::future::Future;
use std::sync::Arc;

use crate::config::Settings;
use crate::kafka::pipeline::{self, PipelineError, Shared};

/// Runs until `shutdown` completes or the pipeline fails.
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()>,
) -> Result<(), PipelineError> {
    let shared = Shared::new(Arc::new(settings.model.clone()));
    pipeline::run(&settings, shared, None, shutdown).await
}
