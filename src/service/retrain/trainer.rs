//! The trainer stage: one thread per line (in the single-process default, or alone with
//! `lineguard run --role trainer`). Each turn of its loop:
//!
//! 1. consumes retraining candidates (the accepted topic, and operator feedback when configured) into the
//!    replay buffer, committing their offsets only once they are on disk;
//! 2. notices a model published by someone else (a rollback) and continues from it;
//! 3. takes one DFSC training step when the buffer holds enough frames, the pace allows
//!    (`steps_per_minute`) and the in-process inference queue is short;
//! 4. every `evaluate_every` steps, gates a candidate; a promoted one is written to the version store,
//!    published on the models topic (every replica swaps it in) and becomes the base of further training.
//!    A line of training whose candidates regress at three gates in a row (for false positives: without
//!    more headroom than the serving model) restarts from the serving model, so bad frames cannot
//!    accumulate into the weights without end.
//!
//! The trainer checkpoints its weights and optimiser state after every gate and on shutdown; with the
//! replay buffer on disk, a restarted trainer continues where it stopped.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use super::buffer::{BufferLimits, ReplayBuffer};
use super::gate::{self, GateReport, Reading, Tolerances};
use super::models_topic::{self, ModelFeed, Published};
use super::store::{VersionRecord, VersionStore};
use super::RetrainError;
use crate::model::config::TrainConfig;
use crate::model::train::{TrainError, Trainer};
use crate::model::{EfficientAd, MapQuantiles};
use crate::service::infer::ModelSwapper;
use crate::service::metrics::{
    CandidateOutcome, CandidateSource, GateOutcome, RestartCause, RetrainMetrics, StateWrite, WaitCause,
};
use crate::service::settings::{KafkaSettings, RetrainSettings};

/// Everything a line's trainer needs.
pub struct TrainerStage {
    pub line: String,
    pub settings: RetrainSettings,
    /// The line's anomaly threshold: the gate counts false alarms and caught defects against it.
    pub threshold: f32,
    /// The line's input topics: the only topics feedback may ask the trainer to read frames from.
    pub input_topics: Vec<String>,
    pub kafka: KafkaSettings,
    /// The model file of the line's configuration: the first version when nothing was promoted yet.
    pub configured_model: PathBuf,
    pub device: Device,
    /// The in-process inference stage, whose queue the trainer yields to; None for a separate trainer.
    pub inference: Option<ModelSwapper>,
    pub metrics: RetrainMetrics,
    pub runtime: tokio::runtime::Handle,
}

/// An operator's verdict on a frame (feedback topic value). Unknown fields are ignored, so a results
/// record with its `verdict` changed is a valid feedback record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Feedback {
    pub verdict: String,
    pub source: FrameLocation,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrameLocation {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// What survives a restart besides the buffer and the weights.
#[derive(Debug, Default, Serialize, Deserialize)]
struct TrainerState {
    /// The version the checkpointed weights continue from; a checkpoint of another base is stale. None
    /// once that line of training was discarded (a regression, another model adopted): whatever
    /// checkpoint is on disk then must not be resumed.
    base_version: Option<u64>,
    steps_since_gate: u64,
}

impl TrainerState {
    /// Training that continues `version` from now on.
    fn continuing(version: u64) -> Self {
        Self { base_version: Some(version), steps_since_gate: 0 }
    }

    /// The next run starts from the serving model, not from the checkpoint.
    fn discarded() -> Self {
        Self { base_version: None, steps_since_gate: 0 }
    }

    fn resumes(&self, version: u64) -> bool {
        self.base_version == Some(version)
    }
}

/// Starts the stage; it runs until `stop` is set (then checkpoints) or fails.
pub fn spawn(
    stage: TrainerStage,
    stop: Arc<AtomicBool>,
    on_exit: crate::service::OnExit,
) -> std::io::Result<JoinHandle<Result<(), String>>> {
    let name = format!("retrain-{}", stage.line);
    std::thread::Builder::new().name(name).spawn(move || {
        let result =
            Running::start(stage).and_then(|mut running| running.run(&stop)).map_err(|err| format!("trainer: {err}"));
        on_exit(&result);
        result
    })
}

/// A started trainer: its stores, Kafka clients, current model and training state.
struct Running {
    stage: TrainerStage,
    dir: PathBuf,
    store: VersionStore,
    models_out: models_topic::ModelPublisher,
    feed: ModelFeed,
    candidates: BaseConsumer,
    fetcher: Option<BaseConsumer>,
    buffer: ReplayBuffer,
    defects: Option<Tensor>,
    current: EfficientAd,
    /// The publication of `current` that this trainer made or adopted.
    publication: Option<String>,
    /// The trainer's own latest publications. Its feed reads them back, possibly after a later promotion:
    /// an own publication arriving late is not a rollback to adopt.
    own_publications: VecDeque<String>,
    unpublished: bool,
    trainer: Option<Trainer>,
    state: TrainerState,
    next_step_at: Instant,
    waiting: Option<WaitCause>,
    /// How the current line of training fared at its steps and gates.
    line_record: LineRecord,
    writes: StateWrites,
    /// Runs restarted from the serving model (after regressed or non-finite candidates, or non-finite
    /// losses). Each restart samples other batches: the same seed would rebuild the same rejected
    /// candidate while no new frame arrives.
    restarts: u64,
    /// The serving model's raw map quantiles on the calibration images and its reading, with what they
    /// were measured on.
    serving_reading: Option<(GateKey, MapQuantiles, Reading)>,
}

/// Regressed gates in a row after which a line of training is dropped (see [`LineRecord::after_gate`]).
const REGRESSIONS_BEFORE_RESTART: u32 = 3;
/// Non-finite losses in a row after which a line of training is dropped (see [`LineRecord::after_step`]).
const NON_FINITE_STEPS_BEFORE_RESTART: u32 = 3;

/// How the current line of training has fared at its steps and gates: whether to go on with it or to drop
/// it for a fresh start from the serving model.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct LineRecord {
    /// Gates in a row at which its candidate regressed (see [`LineRecord::after_gate`]).
    regressed_in_a_row: u32,
    /// Steps in a row whose loss was not finite (their updates were skipped).
    non_finite_in_a_row: u32,
}

impl LineRecord {
    /// Records one step, finite or not; why the line is to be dropped, if it is. A non-finite loss skips
    /// its update; several in a row mean the weights themselves went wrong. The count belongs to the line:
    /// carried over a restart (as it was when the trainer kept it), it restarted the next line at its
    /// first non-finite loss.
    fn after_step(&mut self, finite: bool) -> Option<RestartCause> {
        if finite {
            self.non_finite_in_a_row = 0;
            return None;
        }
        self.non_finite_in_a_row += 1;
        let drop = self.non_finite_in_a_row >= NON_FINITE_STEPS_BEFORE_RESTART;
        if drop {
            *self = LineRecord::default();
        }
        drop.then_some(RestartCause::NonFiniteLosses)
    }

    /// Records one gate; why the line is to be dropped, if it is (the record then starts again).
    ///
    /// One regressed candidate is not yet a line gone wrong: fine-tuning first disturbs a model (fresh
    /// optimiser moments, new frames) before it improves on it, and a held-out false alarm more or less
    /// among a few dozen frames is within that noise. Dropping the line at its first regression kept every
    /// line at `evaluate_every` steps: under AVX2-only kernels the demo's trainer refused 16 of 16 such
    /// candidates. Several in a row say the recent training data teaches something wrong; a non-finite
    /// candidate's weights are broken at once.
    ///
    /// A candidate refused only for false positives although it has more headroom than the serving model
    /// on the same images (`more_headroom`, the gate's own criterion) does not count: the line is still
    /// learning the frames it was given (drifted ones, typically the highest normal scores) while frames
    /// just below the threshold cross it. Counting those dropped the progress at every third gate (the
    /// demo under AVX2 kernels: p95 0.670 → 0.652 → 0.637 → 0.616 against the serving 0.670, each with a
    /// false alarm more, then a restart). Such a line is never promoted while it raises more false alarms;
    /// what it costs is training time, which a restart would spend on the same frames. Lost recall or
    /// synthetic recall always counts: lower normal scores together with missed defects are what
    /// poisoning looks like.
    fn after_gate(&mut self, outcome: GateOutcome, more_headroom: bool) -> Option<RestartCause> {
        let drop = match outcome {
            GateOutcome::Promoted | GateOutcome::NotStored | GateOutcome::RejectedNoImprovement => {
                self.regressed_in_a_row = 0;
                None
            }
            GateOutcome::RejectedNonFinite => Some(RestartCause::NonFiniteCandidate),
            GateOutcome::RejectedFalsePositives if more_headroom => None,
            GateOutcome::RejectedFalsePositives
            | GateOutcome::RejectedRecall
            | GateOutcome::RejectedSyntheticRecall => {
                self.regressed_in_a_row += 1;
                (self.regressed_in_a_row >= REGRESSIONS_BEFORE_RESTART).then_some(RestartCause::RegressedCandidates)
            }
        };
        if drop.is_some() {
            *self = LineRecord::default();
        }
        drop
    }
}

/// Far more publications than a feed can lag behind.
const OWN_PUBLICATIONS_KEPT: usize = 64;
/// How long one model publication may take before the trainer gives it up for now and replaces its client:
/// a model file of 30 MB takes seconds on a healthy broker.
const MODEL_PUBLICATION_TIMEOUT: Duration = Duration::from_secs(60);

/// What a serving model's gate measurements depend on.
#[derive(Debug, Clone, PartialEq)]
struct GateKey {
    serving: u64,
    /// The candidate version, which seeds the painted foreign objects.
    seed: u64,
    /// The sequence numbers of the calibration and evaluation images.
    images: Vec<u64>,
}

impl Running {
    fn start(stage: TrainerStage) -> Result<Running, RetrainError> {
        crate::torch::use_threads(stage.settings.threads);
        // Inference threads come first whenever both want a core.
        crate::torch::lower_thread_priority();
        let settings = &stage.settings;
        let dir = settings.line_dir(&stage.line);
        let store = VersionStore::open(&dir, settings.keep_versions)?;
        let models_out = models_topic::ModelPublisher::new(
            crate::service::kafka::producer_config(&stage.kafka),
            MODEL_PUBLICATION_TIMEOUT,
        )?;
        if let Err(err) = stage.runtime.block_on(super::ensure_topics(&stage.kafka, settings)) {
            log::warn!("line {}: cannot create the retraining topics ({err}); they must exist", stage.line);
        }
        if settings.signing_key.is_none() {
            log::warn!(
                "line {}: models on {} are published unsigned (no retrain.signing_key): whoever can write to \
                 the topic can replace every replica's model",
                stage.line,
                settings.models_topic
            );
        }
        let mut feed =
            ModelFeed::open(&stage.kafka, &settings.models_topic, &stage.line, settings.signing_key.as_ref())?;
        let published = feed.catch_up(Duration::from_secs(30))?;
        let current = initial_model(&stage, &store, published.as_ref())?;
        let publication = published
            .as_ref()
            .filter(|p| p.manifest.model_version == current.info.model_version)
            .map(|p| p.manifest.publication.clone());
        let unpublished = publication.is_none();
        stage.metrics.current_model(current.info.model_version, current.info.created_unix);
        log::info!(
            "line {}: trainer starts from model version {} (state in {})",
            stage.line,
            current.info.model_version,
            dir.display()
        );

        let side = current.recipe.image_size as u32;
        let limits = BufferLimits {
            side,
            recent: settings.buffer_frames,
            marked: settings.marked_frames,
            held_out: settings.holdout_frames,
            holdout_every: settings.holdout_every,
        };
        let mut buffer = ReplayBuffer::open(&dir.join("buffer"), limits)?;
        if let Some(originals) = &settings.originals {
            buffer.pin_originals(originals, settings.pinned_originals, current.recipe.train.seed)?;
        }
        let defects = match &settings.anomalies {
            Some(folder) => Some(load_folder(folder, side)?),
            None => None,
        };

        let group = format!("lineguard-trainer-{}", stage.line);
        // Consumer statistics feed the inference lines' lag metrics; the trainer has no use for them.
        let quiet = |group: &str| {
            let mut config = crate::service::kafka::consumer_config(&stage.kafka, group);
            config.set("statistics.interval.ms", "0");
            config
        };
        let candidates: BaseConsumer = quiet(&group).create()?;
        let mut topics = vec![settings.accepted_topic.as_str()];
        if !settings.feedback_topic.is_empty() {
            topics.push(settings.feedback_topic.as_str());
        }
        candidates.subscribe(&topics)?;
        let fetcher = if settings.feedback_topic.is_empty() {
            None
        } else {
            let group = format!("lineguard-trainer-fetch-{}", stage.line);
            Some(quiet(&group).create()?)
        };
        let state = read_json(&dir.join("trainer.json")).unwrap_or_default();
        Ok(Running {
            dir: dir.clone(),
            store,
            models_out,
            feed,
            candidates,
            fetcher,
            buffer,
            defects,
            current,
            publication,
            own_publications: VecDeque::new(),
            unpublished,
            trainer: None,
            state,
            next_step_at: Instant::now(),
            waiting: None,
            line_record: LineRecord::default(),
            writes: StateWrites {
                line: stage.line.clone(),
                dir,
                metrics: stage.metrics.clone(),
                failing: Default::default(),
            },
            restarts: 0,
            serving_reading: None,
            stage,
        })
    }

    fn run(&mut self, stop: &AtomicBool) -> Result<(), RetrainError> {
        while !stop.load(Ordering::Relaxed) {
            if self.unpublished {
                self.publish_current();
            }
            self.ingest()?;
            self.follow_publications()?;
            self.stage.metrics.buffer(self.buffer.counts());
            self.stage.metrics.heartbeat();
            // Keeps the model-age gauge moving in a trainer-only process.
            self.stage.metrics.current_model(self.current.info.model_version, self.current.info.created_unix);
            if let Err(cause) = self.ready_to_step() {
                if self.waiting != Some(cause) {
                    self.stage.metrics.waited(cause);
                    self.waiting = Some(cause);
                }
                continue;
            }
            self.waiting = None;
            self.step()?;
            if self.state.steps_since_gate >= self.stage.settings.evaluate_every {
                self.gate()?;
            }
        }
        self.checkpoint();
        log::info!("line {}: trainer stopped (checkpoint in {})", self.stage.line, self.dir.display());
        Ok(())
    }

    /// Takes what arrived on the candidate topics (waiting up to 50 ms for the first record).
    fn ingest(&mut self) -> Result<(), RetrainError> {
        let feedback_topic = self.stage.settings.feedback_topic.clone();
        let mut taken = 0;
        while taken < 64 {
            let wait = if taken == 0 { Duration::from_millis(50) } else { Duration::ZERO };
            let message = match self.candidates.poll(wait) {
                None => break,
                Some(Err(err)) => {
                    // A fatal error never clears: without this the trainer would go on training on what
                    // it has, never hearing of a new frame.
                    if let Some(reason) = crate::service::kafka::fatal_reason(self.candidates.client(), &err) {
                        return Err(RetrainError::FatalConsumer(reason));
                    }
                    log::warn!("line {}: reading candidates: {err}", self.stage.line);
                    break;
                }
                Some(Ok(message)) => message,
            };
            let frame_id = String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned();
            let payload = message.payload().unwrap_or_default();
            let (source, image) = if !feedback_topic.is_empty() && message.topic() == feedback_topic {
                let location = marked_frame_location(&frame_id, payload, &self.stage.input_topics);
                (CandidateSource::Feedback, location.and_then(|at| fetch_frame(self.fetcher.as_ref(), &frame_id, &at)))
            } else {
                (CandidateSource::Auto, Some(payload.to_vec()))
            };
            let outcome = match image.map(|image| self.buffer.add(&frame_id, &image, source)) {
                Some(Ok(outcome)) => {
                    self.writes.succeeded(StateWrite::Buffer);
                    outcome
                }
                Some(Err(err)) => {
                    self.writes.failed(StateWrite::Buffer, &err, self.current.info.model_version);
                    CandidateOutcome::NotStored
                }
                None => CandidateOutcome::Invalid,
            };
            self.stage.metrics.candidate(source, outcome);
            self.candidates.store_offset_from_message(&message)?;
            taken += 1;
        }
        if taken > 0 {
            // The frames are on disk: only now may the topics move on.
            if let Err(err) = self.candidates.commit_consumer_state(CommitMode::Sync) {
                log::warn!("line {}: committing candidate offsets: {err} (they will be read again)", self.stage.line);
            }
        }
        Ok(())
    }

    /// A publication this trainer did not make (a rollback) becomes the current model.
    fn follow_publications(&mut self) -> Result<(), RetrainError> {
        let Some(Published { manifest, model }) = self.feed.poll(Duration::ZERO) else { return Ok(()) };
        if Some(&manifest.publication) == self.publication.as_ref()
            || self.own_publications.contains(&manifest.publication)
            || manifest.model_version == self.current.info.model_version
        {
            return Ok(());
        }
        let origin = Path::new("<models topic>");
        let adopted = EfficientAd::from_bytes(&model, origin, self.stage.device)?;
        let version = manifest.model_version;
        let stored = if self.store.model_path(version).is_file() {
            self.store.set_current(version)
        } else {
            let record = VersionRecord {
                version,
                recorded_unix: crate::model::unix_seconds(),
                origin: manifest.origin.clone(),
                trained_steps: adopted.info.trained_steps,
                parent: None,
                gate: None,
            };
            self.store.record(&adopted, &record)
        };
        // The replicas serve the publication whether or not this disk can record it.
        match stored {
            Ok(()) => self.writes.succeeded(StateWrite::Version),
            Err(err) => self.writes.failed(StateWrite::Version, &err, self.current.info.model_version),
        }
        log::info!(
            "line {}: model version {version} was published ({}); training continues from it",
            self.stage.line,
            manifest.origin
        );
        self.adopt(adopted, Some(manifest.publication));
        Ok(())
    }

    fn adopt(&mut self, model: EfficientAd, publication: Option<String>) {
        self.stage.metrics.current_model(model.info.model_version, model.info.created_unix);
        self.state = TrainerState::discarded();
        self.current = model;
        self.publication = publication;
        self.trainer = None;
        self.line_record = LineRecord::default();
    }

    fn ready_to_step(&self) -> Result<(), WaitCause> {
        let settings = &self.stage.settings;
        if self.buffer.counts().trainable() < settings.min_frames {
            return Err(WaitCause::TooFewFrames);
        }
        let busy = self.stage.inference.as_ref().is_some_and(|i| i.queued_frames() > settings.pause_when_queue_above);
        if busy {
            return Err(WaitCause::InferenceBusy);
        }
        if Instant::now() < self.next_step_at {
            return Err(WaitCause::RateLimit);
        }
        Ok(())
    }

    fn step(&mut self) -> Result<(), RetrainError> {
        let interval = Duration::from_secs_f64(60.0 / self.stage.settings.steps_per_minute);
        self.next_step_at = Instant::now() + interval;
        if self.trainer.is_none() {
            self.trainer = Some(self.make_trainer()?);
        } else if self.buffer.take_changed() {
            let marked_share = self.stage.settings.marked_share;
            if let (Some(trainer), Some(set)) = (self.trainer.as_mut(), self.buffer.training_set(marked_share)) {
                trainer.set_images(set.images, set.weights.as_deref())?;
            }
        }
        let Some(trainer) = self.trainer.as_mut() else { return Ok(()) };
        match trainer.step() {
            Ok(losses) => {
                let _ = self.line_record.after_step(true);
                self.stage.metrics.step(&losses);
                self.state.steps_since_gate += 1;
            }
            Err(TrainError::NonFinite { step, loss }) => {
                self.stage.metrics.waited(WaitCause::NonFiniteLoss);
                log::warn!("line {}: retraining step {step}: loss {loss}; update skipped", self.stage.line);
                if let Some(cause) = self.line_record.after_step(false) {
                    log::warn!("line {}: restarting training from the serving model", self.stage.line);
                    // (Not from the last gate's checkpoint: the weights that keep failing descend from it.)
                    self.restart_from_serving_model(cause);
                }
            }
            Err(err) => return Err(err.into()),
        }
        Ok(())
    }

    /// Drops the training run; the next step starts a new one from the serving model, on other batches.
    /// The checkpoint is marked stale too: resuming it instead led back to the same rejected candidate at
    /// every gate (seen in CI).
    fn restart_from_serving_model(&mut self, cause: RestartCause) {
        self.stage.metrics.restarted(cause);
        self.trainer = None;
        self.restarts += 1;
        self.line_record = LineRecord::default();
        self.state = TrainerState::discarded();
    }

    /// Resumes the checkpoint when it continues the current model, else starts from the current model.
    fn make_trainer(&mut self) -> Result<Trainer, RetrainError> {
        let set = self
            .buffer
            .training_set(self.stage.settings.marked_share)
            .ok_or_else(|| RetrainError::Data("empty replay buffer".into()))?;
        let _ = self.buffer.take_changed();
        let checkpoint = self.dir.join("trainer.safetensors");
        let version = self.current.info.model_version;
        let mut trainer = if checkpoint.is_file() && self.state.resumes(version) {
            log::info!("line {}: resuming retraining from {}", self.stage.line, checkpoint.display());
            Trainer::resume(&checkpoint, set.images, self.stage.device)?
        } else {
            self.state = TrainerState::continuing(version);
            Trainer::continue_from(self.store.load(version, self.stage.device)?, set.images)?
        };
        trainer.set_draw_weights(set.weights.as_deref())?;
        fine_tuning(&mut trainer.model.recipe.train, &self.stage.settings);
        trainer.model.recipe.train.seed = trainer.model.recipe.train.seed.wrapping_add(self.restarts);
        Ok(trainer)
    }

    fn gate(&mut self) -> Result<(), RetrainError> {
        self.state.steps_since_gate = 0;
        let (Some(calibration), Some(evaluation)) = self.buffer.gate_images() else {
            log::info!("line {}: no held-out frames or pinned originals to judge a candidate yet", self.stage.line);
            return Ok(());
        };
        let Some(trainer) = self.trainer.as_ref() else { return Ok(()) };
        let version = self.store.highest_version()?.max(self.current.info.model_version) + 1;
        let mut candidate = trainer.snapshot(&calibration, version)?;
        let threshold = self.stage.threshold;
        let defects = self.defects.as_ref();
        let synthetic = gate::foreign_objects(&evaluation, version);
        // What the serving model measures does not change between gates while it, the gate's images and
        // the painted objects (seeded by `version`) stay the same: measured once, not at every gate.
        let key =
            GateKey { serving: self.current.info.model_version, seed: version, images: self.buffer.gate_sequence() };
        let (serving_raw, current_reading) = match self.serving_reading.take().filter(|(k, ..)| *k == key) {
            Some((_, raw, reading)) => (raw, reading),
            None => (
                crate::model::train::map_quantiles(&self.current, &calibration)?,
                gate::read(&self.current, &evaluation, &synthetic, defects, threshold),
            ),
        };
        self.serving_reading = Some((key, serving_raw, current_reading));
        // The candidate keeps the serving model's scale, moved by how its maps changed on the pinned
        // originals: a fresh calibration on a few images would shift every score by its own noise (and by
        // the images being training images), which at a threshold just above the normal scores flips
        // verdicts that nothing learnt changed.
        let carried = self
            .current
            .map_quantiles
            .zip(candidate.map_quantiles)
            .and_then(|(serving, candidate_raw)| serving.carried_over(&serving_raw, &candidate_raw));
        if carried.is_some() {
            candidate.map_quantiles = carried;
        }
        // The file records the recipe the model was built with, not the fine-tuning overrides.
        candidate.recipe.train = self.current.recipe.train.clone();
        let candidate_reading = gate::read(&candidate, &evaluation, &synthetic, defects, threshold);
        let tolerances = Tolerances {
            false_positive_rate: self.stage.settings.fpr_tolerance,
            recall: self.stage.settings.recall_tolerance,
            synthetic_recall: self.stage.settings.synthetic_recall_tolerance,
        };
        let outcome = gate::decide(&current_reading, &candidate_reading, tolerances, threshold);
        let mut report = GateReport {
            outcome,
            threshold,
            normal_images: evaluation.size()[0] as usize,
            defect_images: defects.map_or(0, |d| d.size()[0] as usize),
            current_version: self.current.info.model_version,
            current: current_reading,
            candidate: candidate_reading,
        };
        log::info!("line {}: candidate {}", self.stage.line, report.summary());
        if outcome == GateOutcome::Promoted {
            if let Err(err) = self.promote(candidate, report.clone()) {
                // Replicas keep serving the last good model; training goes on and the next gate tries
                // again, so a full or read-only disk costs promotions, not inspection.
                self.writes.failed(StateWrite::Version, &err, self.current.info.model_version);
                report.outcome = GateOutcome::NotStored;
            }
        }
        let more_headroom = gate::more_headroom(&current_reading, &candidate_reading, threshold);
        if let Some(cause) = self.line_record.after_gate(outcome, more_headroom) {
            log::info!("line {}: restarting training from the serving model ({})", self.stage.line, outcome.labels().1);
            self.restart_from_serving_model(cause);
        }
        self.stage.metrics.gate(report.outcome);
        append_json_line(&self.dir.join("gate-log.jsonl"), &report);
        self.checkpoint();
        Ok(())
    }

    /// Records the candidate as the next version, then serves and publishes it; nothing changes unless
    /// the store took it.
    fn promote(&mut self, candidate: EfficientAd, report: GateReport) -> Result<(), RetrainError> {
        let version = candidate.info.model_version;
        let record = VersionRecord {
            version,
            recorded_unix: crate::model::unix_seconds(),
            origin: "promoted".into(),
            trained_steps: candidate.info.trained_steps,
            parent: Some(self.current.info.model_version),
            gate: Some(report),
        };
        self.store.record(&candidate, &record)?;
        self.writes.succeeded(StateWrite::Version);
        log::info!("line {}: promoted model version {version}", self.stage.line);
        self.stage.metrics.current_model(version, candidate.info.created_unix);
        self.state = TrainerState::continuing(version);
        self.current = candidate;
        self.publication = None;
        self.unpublished = true;
        self.publish_current();
        Ok(())
    }

    /// Publishes the current model on the models topic; on failure, a later turn tries again, once the
    /// retry time has come (see `ModelPublisher`).
    fn publish_current(&mut self) {
        if !self.models_out.ready(Instant::now()) {
            return;
        }
        let bytes = match self.current.to_bytes() {
            Ok(bytes) => bytes,
            Err(err) => {
                log::error!("line {}: cannot serialise the model: {err}", self.stage.line);
                return;
            }
        };
        let (topic, line) = (&self.stage.settings.models_topic, &self.stage.line);
        let version = self.current.info.model_version;
        let origin = self
            .store
            .versions()
            .ok()
            .and_then(|records| records.into_iter().find(|r| r.version == version))
            .map_or_else(|| "promoted".to_string(), |r| r.origin);
        let key = self.stage.settings.signing_key.as_ref();
        let published =
            self.stage.runtime.block_on(self.models_out.publish(topic, line, &bytes, version, &origin, key));
        match published {
            Ok(manifest) => {
                log::info!(
                    "line {line}: model version {version} published on {topic} ({} bytes in {} chunks)",
                    manifest.bytes,
                    manifest.chunks
                );
                if self.own_publications.len() == OWN_PUBLICATIONS_KEPT {
                    self.own_publications.pop_front();
                }
                self.own_publications.push_back(manifest.publication.clone());
                self.publication = Some(manifest.publication);
                self.unpublished = false;
            }
            Err(failure) => {
                log::warn!("line {line}: publishing model version {version} failed: {failure}");
                if let Some(reason) = failure.replaced {
                    self.stage.metrics.producer_replaced(reason);
                }
            }
        }
    }

    /// Saves the weights, optimiser moments and state for a restart. A failure costs only the progress
    /// since the last checkpoint after a restart, so it is counted and training goes on.
    fn checkpoint(&mut self) {
        let saved = (|| -> Result<(), RetrainError> {
            if let Some(trainer) = &self.trainer {
                trainer.save_checkpoint(&self.dir.join("trainer.safetensors"))?;
            }
            let json = serde_json::to_vec(&self.state).unwrap_or_default();
            crate::model::weights::write_atomically(&self.dir.join("trainer.json"), &json)?;
            Ok(())
        })();
        match saved {
            Ok(()) => self.writes.succeeded(StateWrite::Checkpoint),
            Err(err) => self.writes.failed(StateWrite::Checkpoint, &err, self.current.info.model_version),
        }
    }
}

/// Failed writes to the state directory (full, read-only): counted every time, logged once per episode.
/// None of them stops the trainer, since restarting cannot make a disk writable.
struct StateWrites {
    line: String,
    dir: PathBuf,
    metrics: RetrainMetrics,
    failing: std::collections::BTreeSet<StateWrite>,
}

impl StateWrites {
    fn failed(&mut self, what: StateWrite, err: &RetrainError, serving_version: u64) {
        self.metrics.state_write_failed(what);
        if self.failing.insert(what) {
            log::error!(
                "line {}: cannot write the {} to the state directory {} ({err}); the replicas keep \
                 serving model version {serving_version} and retraining goes on, but nothing it learns can be \
                 kept until the directory is writable again (lineguard_retrain_state_write_errors_total)",
                self.line,
                what.as_str(),
                self.dir.display(),
            );
        }
    }

    fn succeeded(&mut self, what: StateWrite) {
        if self.failing.remove(&what) {
            log::info!("line {}: the {} can be written to the state directory again", self.line, what.as_str());
        }
    }
}

/// Retraining continues from a served model at a small constant learning rate: no warm-up, no final
/// drop, no schedule end, and no ImageNet penalty (its images belong to the original training machine).
fn fine_tuning(train: &mut TrainConfig, settings: &RetrainSettings) {
    train.learning_rate = settings.learning_rate;
    train.warmup_beta2 = None;
    train.final_lr_fraction = 0.0;
    train.steps = u64::MAX;
    train.imagenet_penalty_dir = None;
    train.checkpoint_every = 0;
}

/// The current model: the store's, else the newest on the models topic, else the configured file.
/// A model not yet in the store is recorded there so that it can be rolled back to.
fn initial_model(
    stage: &TrainerStage,
    store: &VersionStore,
    published: Option<&Published>,
) -> Result<EfficientAd, RetrainError> {
    if let Some(version) = store.current()? {
        return store.load(version, stage.device);
    }
    let model = match published {
        Some(p) => EfficientAd::from_bytes(&p.model, Path::new("<models topic>"), stage.device)?,
        None => EfficientAd::load(&stage.configured_model, stage.device)?,
    };
    crate::service::infer::check_servable(&model)?;
    let record = VersionRecord {
        version: model.info.model_version,
        recorded_unix: crate::model::unix_seconds(),
        origin: "initial".into(),
        trained_steps: model.info.trained_steps,
        parent: None,
        gate: None,
    };
    store.record(&model, &record)?;
    Ok(model)
}

/// Where the frame an operator marked normal is; None (logged) when the record is not feedback we
/// understand, the verdict is not `normal`, or it names a topic that is not one of the line's inputs (the
/// trainer reads with the service's credentials: feedback must not make it read, and train on, anything
/// else on the cluster).
fn marked_frame_location(frame_id: &str, payload: &[u8], input_topics: &[String]) -> Option<FrameLocation> {
    let feedback: Feedback = match serde_json::from_slice(payload) {
        Ok(feedback) => feedback,
        Err(err) => {
            log::warn!("feedback for {frame_id}: not a feedback record ({err})");
            return None;
        }
    };
    if !matches!(feedback.verdict.as_str(), "normal" | "ok") {
        log::info!("feedback for {frame_id}: verdict {:?} is not a training candidate", feedback.verdict);
        return None;
    }
    if !input_topics.contains(&feedback.source.topic) {
        log::warn!(
            "feedback for {frame_id}: topic {:?} is not one of this line's input topics; ignored",
            feedback.source.topic
        );
        return None;
    }
    Some(feedback.source)
}

/// The frame at `location`, read back from its input topic; None (logged) when it cannot be.
fn fetch_frame(fetcher: Option<&BaseConsumer>, frame_id: &str, location: &FrameLocation) -> Option<Vec<u8>> {
    let FrameLocation { topic, partition, offset } = location;
    read_back(fetcher?, location)
        .map_err(|why| log::warn!("feedback for {frame_id}: cannot read {topic}/{partition}@{offset}: {why}"))
        .ok()
}

/// Why a frame that feedback names could not be read back.
#[derive(Debug, PartialEq, thiserror::Error)]
enum Unreadable {
    #[error("offsets are never negative")]
    Negative,
    #[error("the partition holds offsets {low}..{high} (the frame expired, or never was)")]
    NotOnBroker { low: i64, high: i64 },
    #[error("the partition's next record is at offset {next} (the frame expired or was compacted away)")]
    Gone { next: i64 },
    #[error("{0}")]
    Broker(String),
    #[error("not delivered within {0:?}")]
    TimedOut(Duration),
}

/// Reads one record. Feedback may name a partition that does not exist or an offset past the end (a
/// typo, another cluster's record), and the trainer, which trains nothing while it waits here, must not
/// wait the whole deadline for a record that cannot come: when the record is not there within
/// `BOUNDS_AFTER`, the partition's bounds are asked once. Not before: asking costs a round trip (half a
/// second on nisshi, whose fetches hold the connection), which every read would pay.
fn read_back(fetcher: &BaseConsumer, location: &FrameLocation) -> Result<Vec<u8>, Unreadable> {
    const DEADLINE: Duration = Duration::from_secs(10);
    const BOUNDS_AFTER: Duration = Duration::from_secs(1);
    let FrameLocation { topic, partition, offset } = location;
    if *offset < 0 {
        // librdkafka would read these as logical offsets (end, beginning).
        return Err(Unreadable::Negative);
    }
    let mut wanted = TopicPartitionList::new();
    wanted
        .add_partition_offset(topic, *partition, Offset::Offset(*offset))
        .and_then(|()| fetcher.assign(&wanted))
        .map_err(|err| Unreadable::Broker(err.to_string()))?;
    let started = Instant::now();
    let mut bounds_checked = false;
    while started.elapsed() < DEADLINE {
        match fetcher.poll(Duration::from_millis(200)) {
            Some(Ok(message)) if message.topic() == topic && message.partition() == *partition => {
                if message.offset() == *offset {
                    return Ok(message.payload().unwrap_or_default().to_vec());
                }
                if message.offset() > *offset {
                    return Err(Unreadable::Gone { next: message.offset() });
                }
            }
            Some(Err(err)) => return Err(Unreadable::Broker(err.to_string())),
            _ => {}
        }
        if !bounds_checked && started.elapsed() >= BOUNDS_AFTER {
            bounds_checked = true;
            let (low, high) = fetcher
                .fetch_watermarks(topic, *partition, DEADLINE.saturating_sub(started.elapsed()))
                .map_err(|err| Unreadable::Broker(err.to_string()))?;
            if !(low..high).contains(offset) {
                return Err(Unreadable::NotOnBroker { low, high });
            }
        }
    }
    Err(Unreadable::TimedOut(DEADLINE))
}

fn load_folder(folder: &Path, side: u32) -> Result<Tensor, RetrainError> {
    let paths = crate::data::loco::list_images(folder).map_err(|e| RetrainError::Data(e.to_string()))?;
    if paths.is_empty() {
        return Err(RetrainError::Data(format!("retrain.anomalies: {} holds no images", folder.display())));
    }
    crate::data::loco::load_inputs(&paths, side, &|| {}).map_err(|e| RetrainError::Data(e.to_string()))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Gate decisions, one JSON object per line, for `lineguard model list` and post-mortems.
fn append_json_line<T: Serialize>(path: &Path, value: &T) {
    use std::io::Write;
    let line = serde_json::to_string(value).unwrap_or_default();
    let written =
        std::fs::OpenOptions::new().create(true).append(true).open(path).and_then(|mut file| writeln!(file, "{line}"));
    if let Err(err) = written {
        log::warn!("cannot append to {}: {err}", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_records_with_a_changed_verdict_are_feedback() {
        let record = r#"{"schema":"lineguard.result.v1","frame_id":"f1","verdict":"normal","score":0.7,
            "source":{"topic":"frames","partition":2,"offset":41},"batch_size":4}"#;
        let feedback: Feedback = serde_json::from_str(record).unwrap();
        assert_eq!(feedback.source, FrameLocation { topic: "frames".into(), partition: 2, offset: 41 });
        let inputs = ["frames".to_string()];
        assert_eq!(marked_frame_location("f1", record.as_bytes(), &inputs), Some(feedback.source));
        assert!(marked_frame_location("f1", b"{}", &inputs).is_none(), "not feedback");
        let anomalous = br#"{"verdict":"anomalous","source":{"topic":"frames","partition":0,"offset":1}}"#;
        assert!(marked_frame_location("f1", anomalous, &inputs).is_none(), "only normal verdicts teach");
    }

    /// Before: feedback could name any topic, and the trainer read it with the service's credentials.
    #[test]
    fn feedback_may_name_only_the_line_s_own_input_topics() {
        let elsewhere = br#"{"verdict":"normal","source":{"topic":"payroll","partition":0,"offset":1}}"#;
        assert!(marked_frame_location("f1", elsewhere, &["frames".to_string()]).is_none());
        assert!(marked_frame_location("f1", elsewhere, &["frames".to_string(), "payroll".to_string()]).is_some());
    }

    /// Feedback may name a partition that does not exist or an offset past the end (a typo, a record
    /// from another cluster): the trainer must not wait for it. Before, each such record held the trainer
    /// for the fetch deadline (10 s; up to 64 per round), training nothing meanwhile; now the partition's
    /// bounds, asked after a second without the record, answer (a wait that runs out is `TimedOut`).
    #[test]
    fn feedback_for_a_frame_that_is_not_on_the_broker_is_refused_without_waiting() {
        let records = [("f", b"frame 0".as_slice()), ("f", b"frame 1".as_slice())];
        let (_cluster, kafka) = crate::service::kafka::mock_cluster_with("frames", &records);
        let fetcher: BaseConsumer = crate::service::kafka::consumer_config(&kafka, "fetch").create().unwrap();
        let at = |partition, offset| FrameLocation { topic: "frames".into(), partition, offset };

        assert_eq!(read_back(&fetcher, &at(0, 1)), Ok(b"frame 1".to_vec()));
        for bogus in [at(0, 2), at(0, 1_000_000_000)] {
            assert_eq!(read_back(&fetcher, &bogus), Err(Unreadable::NotOnBroker { low: 0, high: 2 }), "{bogus:?}");
        }
        for negative in [at(0, -2), at(0, -1)] {
            assert_eq!(read_back(&fetcher, &negative), Err(Unreadable::Negative), "{negative:?}");
        }
        let missing_partition = read_back(&fetcher, &at(7, 0));
        assert!(matches!(&missing_partition, Err(Unreadable::Broker(_))), "{missing_partition:?}");
        assert_eq!(read_back(&fetcher, &at(0, 0)), Ok(b"frame 0".to_vec()));
    }

    #[test]
    fn a_line_of_training_is_dropped_after_three_regressions_in_a_row_or_one_non_finite_candidate() {
        use GateOutcome::*;
        // Each gate: its outcome, and whether the candidate had more headroom than the serving model.
        // Played back: whether the line was dropped at each gate.
        let play = |gates: &[(GateOutcome, bool)]| -> Vec<bool> {
            let mut record = LineRecord::default();
            gates.iter().map(|&(outcome, more_headroom)| record.after_gate(outcome, more_headroom).is_some()).collect()
        };
        let without_headroom = |outcomes: &[GateOutcome]| -> Vec<(GateOutcome, bool)> {
            outcomes.iter().map(|&outcome| (outcome, false)).collect()
        };
        let regressions = [RejectedFalsePositives, RejectedRecall, RejectedSyntheticRecall];
        assert_eq!(play(&without_headroom(&regressions)), [false, false, true]);
        let twice = [regressions.as_slice(), &regressions].concat();
        assert_eq!(play(&without_headroom(&twice)), [false, false, true, false, false, true]);
        // A gate without a regression in between starts the count again.
        for calm in [Promoted, RejectedNoImprovement, NotStored] {
            let outcomes = [RejectedFalsePositives, RejectedFalsePositives, calm, RejectedRecall, RejectedRecall];
            assert_eq!(play(&without_headroom(&outcomes)), [false; 5], "{calm:?}");
        }
        assert_eq!(play(&without_headroom(&[RejectedNonFinite])), [true]);
        assert_eq!(play(&without_headroom(&[RejectedRecall, RejectedNonFinite, RejectedRecall])), [false, true, false]);
        // A line that keeps lowering the normal scores while a frame near the threshold crosses it goes
        // on; one that loses recall does not, whatever its normal scores do.
        assert_eq!(play(&[(RejectedFalsePositives, true); 6]), [false; 6]);
        let mixed = [(RejectedFalsePositives, false), (RejectedFalsePositives, true), (RejectedFalsePositives, false)];
        assert_eq!(play(&mixed), [false, false, false], "progress neither counts nor resets");
        assert_eq!(play(&[mixed.as_slice(), &[(RejectedFalsePositives, false)]].concat()), [false, false, false, true]);
        assert_eq!(play(&[(RejectedRecall, true); 3]), [false, false, true]);
        assert_eq!(play(&[(RejectedSyntheticRecall, true); 3]), [false, false, true]);
        assert_eq!(play(&[(RejectedNonFinite, true)]), [true]);
        // The cause the restart is counted under.
        let mut record = LineRecord::default();
        assert_eq!(record.after_gate(RejectedNonFinite, false), Some(RestartCause::NonFiniteCandidate));
        let causes: Vec<_> = regressions.iter().map(|&outcome| record.after_gate(outcome, false)).collect();
        assert_eq!(causes, [None, None, Some(RestartCause::RegressedCandidates)]);
    }

    #[test]
    fn a_line_of_training_is_dropped_after_three_non_finite_losses_in_a_row_and_the_next_gets_three_too() {
        let mut record = LineRecord::default();
        let play = |record: &mut LineRecord, steps: &[bool]| -> Vec<Option<RestartCause>> {
            steps.iter().map(|&finite| record.after_step(finite)).collect()
        };
        let dropped = Some(RestartCause::NonFiniteLosses);
        assert_eq!(play(&mut record, &[false, false, true, false, false]), [None; 5], "a finite step resets");
        assert_eq!(play(&mut record, &[false]), [dropped]);
        // The fresh line starts counting from zero.
        assert_eq!(play(&mut record, &[false, false, false]), [None, None, dropped]);
        // A gate that drops the line for regressions resets the count of losses too.
        let mut record = LineRecord::default();
        let _ = play(&mut record, &[false, false]);
        assert_eq!(record.after_gate(GateOutcome::RejectedNonFinite, false), Some(RestartCause::NonFiniteCandidate));
        assert_eq!(play(&mut record, &[false, false]), [None, None]);
    }

    /// Before: a regression recorded the serving version as the checkpoint's base, so the next run resumed
    /// the last gate's checkpoint and rebuilt the same rejected candidate at every gate (seen in CI).
    #[test]
    fn a_discarded_line_of_training_is_never_resumed() {
        // A state file written before the field became optional still resumes its version.
        let old: TrainerState = serde_json::from_str(r#"{"base_version":2,"steps_since_gate":7}"#).unwrap();
        assert!(old.resumes(2) && !old.resumes(3));
        assert!(TrainerState::continuing(2).resumes(2));
        let discarded = TrainerState::discarded();
        assert!(!discarded.resumes(2) && !discarded.resumes(0));
        let reread: TrainerState = serde_json::from_str(&serde_json::to_string(&discarded).unwrap()).unwrap();
        assert!(!reread.resumes(2), "a restart after a regression starts from the serving model too");
        assert!(!TrainerState::default().resumes(1), "no state file: nothing to resume");
    }

    #[test]
    fn fine_tuning_keeps_a_constant_small_learning_rate() {
        let settings = RetrainSettings { learning_rate: 2e-5, ..RetrainSettings::default() };
        let mut train = TrainConfig { imagenet_penalty_dir: Some("/elsewhere".into()), ..TrainConfig::default() };
        fine_tuning(&mut train, &settings);
        for step in [0, 10, 1_000_000_000] {
            assert_eq!(crate::model::train::learning_rate(&train, step), 2e-5);
        }
        assert!(train.imagenet_penalty_dir.is_none());
    }
}
