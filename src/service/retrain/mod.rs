//! Continuous retraining: the line keeps teaching its model what normal looks like now (new lighting, a
//! new batch of material) without a data scientist, and without the model ever getting worse in
//! production.
//!
//! ```text
//! inference replicas ── sink ──(score < accept_below)──► accepted topic ─┐
//! operators ──────────────────(verdict "normal")──────► feedback topic ─┤
//!                                                                        ▼
//!                             one trainer per line: replay buffer ─► DFSC steps ─► gate every N steps
//!                                                                        │ promoted
//!         every replica ◄── models topic (chunked, one partition) ◄──────┘ + versions on disk
//! ```
//!
//! - [`buffer`]: the on-disk replay buffer (recent frames, held-out frames, pinned originals);
//! - [`trainer`]: the background stage that consumes candidates, trains and gates;
//! - [`gate`]: the promotion rules;
//! - [`store`]: promoted versions on disk, `current.json`, rollback;
//! - [`models_topic`]: publishing models to Kafka and following them (hot swap in every replica).
//!
//! A feedback record is keyed by the frame id; its JSON value names the verdict and where the frame
//! is (a results record with `verdict` changed to `normal` qualifies):
//! `{"verdict": "normal", "source": {"topic": "frames", "partition": 0, "offset": 42}}`.
//! The trainer fetches the frame from its input topic, so feedback works while the input topic retains it.

pub mod buffer;
pub mod gate;
pub mod models_topic;
pub mod store;
pub mod trainer;

use std::path::PathBuf;

use crate::error::WeightsError;
use crate::model::train::TrainError;
use crate::service::settings::{KafkaSettings, RetrainSettings};

/// Creates a line's retraining topics when missing: the candidate topics, and the models topic with one
/// partition (publications must stay in order) and compaction (only the newest model needs keeping).
pub async fn ensure_topics(kafka: &KafkaSettings, retrain: &RetrainSettings) -> Result<(), rdkafka::error::KafkaError> {
    let mut candidates = vec![retrain.accepted_topic.as_str()];
    if !retrain.feedback_topic.is_empty() {
        candidates.push(retrain.feedback_topic.as_str());
    }
    crate::service::kafka::ensure_topics_with(kafka, &candidates, 1, &[]).await?;
    crate::service::kafka::ensure_topics_with(kafka, &[&retrain.models_topic], 1, &[("cleanup.policy", "compact")])
        .await
}

#[derive(Debug, thiserror::Error)]
pub enum RetrainError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Data(String),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("the candidates' consumer failed fatally: {0}")]
    FatalConsumer(String),
}
