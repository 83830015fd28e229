//! Builds and runs the streaming topology drawn in [`crate::service`] from validated [`Settings`], one
//! set of stages per product line.
//!
//! Stopping (SIGTERM in `lineguard run`) follows the data: sources stop consuming, each stage ends when
//! its input closes and is drained, the sink finishes publishing, sources commit and return. A line whose
//! source or inference stops on its own (a fatal consumer error, a libtorch failure) stops the whole
//! process, every other line drained, with that line's error, so an orchestrator restarts it;
//! unacknowledged frames are consumed again.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use tch::Device;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinHandle;

use crate::model::EfficientAd;
use crate::service::ack::OffsetTracker;
use crate::service::infer::{Batching, ModelSwapper, StageConfig};
use crate::service::metrics::{LineHealth, LineMetrics, Metrics};
use crate::service::preprocess::PoolConfig;
use crate::service::retrain::models_topic::{FeedError, ModelFeed, Published};
use crate::service::settings::{DeviceChoice, LineSettings, Settings};
use crate::service::sink::publisher::Publisher;
use crate::service::sink::SinkConfig;
use crate::service::source::{Source, SourceContext};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("line {line}: cannot load model {path}: {source}")]
    Model { line: String, path: std::path::PathBuf, source: crate::error::WeightsError },
    #[error("line {line}: {what}: {source}")]
    Kafka { line: String, what: &'static str, source: rdkafka::error::KafkaError },
    #[error("line {line}: device: {reason}")]
    Device { line: String, reason: String },
    #[error("metrics endpoint {address}: {source}")]
    Metrics { address: String, source: std::io::Error },
    #[error("cannot start a thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("line {line}: {reason}")]
    Stage { line: String, reason: String },
    #[error("lines {lines:?} did not drain within {timeout:?}; their unpublished frames stay uncommitted")]
    DrainTimeout { lines: Vec<String>, timeout: Duration },
}

/// Which stages this process runs (`lineguard run --role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Inference for every line, and the trainer of every line that retrains: one process does it all.
    All,
    /// Inference only; models come from the models topic (one of many replicas).
    Inference,
    /// Only the trainers of the lines that retrain (exactly one such process per line).
    Trainer,
}

/// A background thread with its stop flag.
struct Background {
    name: String,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<(), String>>,
}

struct RunningLine {
    name: String,
    follower: Option<Background>,
    stop: watch::Sender<bool>,
    source: JoinHandle<Result<(), String>>,
    infer: std::thread::JoinHandle<Result<(), String>>,
    pool: Vec<std::thread::JoinHandle<()>>,
    sampler: JoinHandle<()>,
    swapper: ModelSwapper,
}

/// A started pipeline: stop it with [`RunningPipeline::shutdown`] or run it with [`run`].
pub struct RunningPipeline {
    lines: Vec<RunningLine>,
    trainers: Vec<Background>,
    metrics_address: Option<SocketAddr>,
    metrics_server: Option<JoinHandle<()>>,
    metrics: Arc<Metrics>,
    /// Receives the name of a line whose source stopped (by itself, or after a stop request).
    line_ended: mpsc::UnboundedReceiver<String>,
    drain_timeout: Duration,
}

/// Runs until `shutdown` completes (then drains) or a line fails.
pub async fn run(settings: Settings, role: Role, shutdown: impl Future<Output = ()>) -> Result<(), PipelineError> {
    let mut pipeline = start_as(&settings, role).await?;
    let failed = tokio::select! {
        _ = shutdown => None,
        ended = pipeline.line_ended.recv() => ended,
    };
    if let Some(line) = &failed {
        log::error!("line {line} stopped unexpectedly; stopping the pipeline");
    } else {
        log::info!("shutdown requested: stopping consumption and draining");
    }
    pipeline.shutdown().await?;
    // A line that stopped by itself is a failure even when the rest drained cleanly: the exit status
    // says so, for the orchestrator and for whoever reads it.
    match failed {
        Some(line) => Err(PipelineError::Stage { line, reason: "stopped unexpectedly (see the log)".into() }),
        None => Ok(()),
    }
}

/// Loads models, connects to Kafka and starts every line's stages (and trainers) and the metrics endpoint.
pub async fn start(settings: &Settings) -> Result<RunningPipeline, PipelineError> {
    start_as(settings, Role::All).await
}

/// [`start`] for one role of a multi-process deployment.
pub async fn start_as(settings: &Settings, role: Role) -> Result<RunningPipeline, PipelineError> {
    if role == Role::Trainer && settings.lines.values().all(|line| line.retrain.is_none()) {
        return Err(PipelineError::Stage {
            line: "*".into(),
            reason: "--role trainer, but no line has a [lines.<name>.retrain] table".into(),
        });
    }
    let metrics = Metrics::new().map_err(|err| PipelineError::Metrics {
        address: settings.metrics.listen.clone(),
        source: std::io::Error::other(err.to_string()),
    })?;
    if role != Role::Trainer {
        warn_of_oversubscription(settings)?;
        warn_of_late_producer_replacement(settings);
    }
    let (ended_tx, line_ended) = mpsc::unbounded_channel();
    let mut lines = Vec::new();
    let mut health = Vec::new();
    let mut trainers = Vec::new();
    for (name, line) in &settings.lines {
        let started = async {
            let mut swapper = None;
            let line_health = Arc::new(LineHealth::default());
            if role != Role::Trainer {
                health.push(line_health.clone());
                let running =
                    start_line(settings, name, line, metrics.clone(), line_health.clone(), ended_tx.clone()).await?;
                swapper = Some(running.swapper.clone());
                lines.push(running);
            }
            if let (Some(retrain), true) = (&line.retrain, role != Role::Inference) {
                let device = choose_device(name, line.device)?;
                let stage = crate::service::retrain::trainer::TrainerStage {
                    line: name.clone(),
                    settings: retrain.clone(),
                    threshold: line.threshold,
                    input_topics: line.input_topics.clone(),
                    kafka: settings.kafka.clone(),
                    configured_model: line.model.clone(),
                    device,
                    inference: swapper,
                    metrics: metrics.retrain(name),
                    runtime: tokio::runtime::Handle::current(),
                };
                let stop = Arc::new(AtomicBool::new(false));
                // A separate trainer process is its trainer: its failure ends the process so the
                // orchestrator restarts it. In-process, inference goes on without retraining, and
                // `/healthz` reports the dead stage so the orchestrator restarts the pod when it may.
                let (ended, line_name) = (ended_tx.clone(), name.clone());
                let on_exit = move |result: &Result<(), String>| match result {
                    Err(reason) if role == Role::Trainer => {
                        log::error!("line {line_name}: {reason}");
                        let _ = ended.send(line_name);
                    }
                    Err(reason) => {
                        log::error!(
                            "line {line_name}: {reason}; inference continues without retraining, /healthz reports it"
                        );
                        line_health.stage_dead.store(true, Ordering::Relaxed);
                    }
                    Ok(()) => {}
                };
                let thread = crate::service::retrain::trainer::spawn(stage, stop.clone(), Box::new(on_exit))?;
                trainers.push(Background { name: name.clone(), stop, thread });
            }
            Ok::<(), PipelineError>(())
        };
        match started.await {
            Ok(()) => {}
            Err(err) => {
                // Lines already consuming must not be left running detached: stop them cleanly first.
                let partial = RunningPipeline {
                    lines,
                    trainers,
                    metrics_address: None,
                    metrics_server: None,
                    metrics: metrics.clone(),
                    line_ended,
                    drain_timeout: settings.drain_timeout(),
                };
                if let Err(stop_err) = partial.shutdown().await {
                    log::warn!("stopping the lines started before the failure: {stop_err}");
                }
                return Err(err);
            }
        }
    }
    let (metrics_address, metrics_server) = if settings.metrics.listen.is_empty() {
        (None, None)
    } else {
        let address = settings.metrics.listen.clone();
        let listener = tokio::net::TcpListener::bind(&address)
            .await
            .map_err(|source| PipelineError::Metrics { address: address.clone(), source })?;
        let bound = listener.local_addr().map_err(|source| PipelineError::Metrics { address, source })?;
        log::info!("metrics on http://{bound}/metrics (also /healthz, /readyz)");
        (Some(bound), Some(tokio::spawn(crate::service::metrics::serve(listener, metrics.clone(), health))))
    };
    Ok(RunningPipeline {
        lines,
        trainers,
        metrics_address,
        metrics_server,
        metrics,
        line_ended,
        drain_timeout: settings.drain_timeout(),
    })
}

impl RunningPipeline {
    pub fn metrics_address(&self) -> Option<SocketAddr> {
        self.metrics_address
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The hot-swap handle of a line's inference stage.
    pub fn swapper(&self, line: &str) -> Option<&ModelSwapper> {
        self.lines.iter().find(|l| l.name == line).map(|l| &l.swapper)
    }

    /// Stops consuming, publishes everything in flight, commits, and waits for every stage (bounded by
    /// `shutdown.drain_timeout_secs`).
    pub async fn shutdown(self) -> Result<(), PipelineError> {
        let RunningPipeline { lines, trainers, metrics_server, drain_timeout, .. } = self;
        for line in &lines {
            let _ = line.stop.send(true);
        }
        let mut first_error = None;
        for background in trainers.iter().chain(lines.iter().filter_map(|l| l.follower.as_ref())) {
            background.stop.store(true, Ordering::Relaxed);
        }
        for trainer in trainers {
            if let Err(reason) = join_background(trainer).await {
                first_error.get_or_insert(reason);
            }
        }
        let deadline = tokio::time::Instant::now() + drain_timeout;
        let mut late = Vec::new();
        for line in lines {
            let RunningLine { name, source, infer, pool, sampler, follower, .. } = line;
            if let Some(follower) = follower {
                if let Err(reason) = join_background(follower).await {
                    first_error.get_or_insert(reason);
                }
            }
            let consumed = match tokio::time::timeout_at(deadline, source).await {
                Err(_) => {
                    late.push(name.clone());
                    continue;
                }
                Ok(joined) => joined.unwrap_or_else(|err| Err(format!("the source task failed: {err}"))),
            };
            sampler.abort();
            let inferred = tokio::task::spawn_blocking(move || {
                for worker in pool {
                    let _ = worker.join();
                }
                infer.join().unwrap_or_else(|_| Err("the inference thread panicked".into()))
            })
            .await
            .unwrap_or_else(|err| Err(err.to_string()));
            match consumed.and(inferred) {
                Ok(()) => log::info!("line {name}: stopped cleanly"),
                Err(reason) => {
                    first_error.get_or_insert(PipelineError::Stage { line: name, reason });
                }
            }
        }
        if let Some(server) = metrics_server {
            server.abort();
        }
        if !late.is_empty() {
            return Err(PipelineError::DrainTimeout { lines: late, timeout: drain_timeout });
        }
        first_error.map_or(Ok(()), Err)
    }
}

async fn start_line(
    settings: &Settings,
    name: &str,
    line: &LineSettings,
    metrics: Arc<Metrics>,
    health: Arc<LineHealth>,
    ended: mpsc::UnboundedSender<String>,
) -> Result<RunningLine, PipelineError> {
    let line_metrics: LineMetrics = metrics.line(name);
    let device = choose_device(name, line.device)?;
    // A line that retrains serves the newest published model, so a replica starting late serves what
    // the others serve; the configured file is the first version.
    let (feed, published) = match &line.retrain {
        Some(retrain) => follow_models_topic(settings, name, retrain).await?,
        None => (None, None),
    };
    let model_path = line.model.clone();
    let line_name = name.to_string();
    let loaded = tokio::task::spawn_blocking(move || {
        let servable = |model: EfficientAd| crate::service::infer::check_servable(&model).map(|_| model);
        // The topic's newest model comes first; one that does not load or cannot serve (a bad publication
        // that passed the checks) must not keep the line down while the configured file can serve.
        if let Some(published) = published {
            let origin = std::path::Path::new("<models topic>");
            match EfficientAd::from_bytes(&published.model, origin, device).and_then(servable) {
                Ok(model) => return Ok((model, true)),
                Err(err) => log::error!(
                    "line {line_name}: model version {} from the models topic cannot serve ({err}); falling back \
                     to the configured {}",
                    published.manifest.model_version,
                    model_path.display()
                ),
            }
        }
        EfficientAd::load(&model_path, device).and_then(servable).map(|model| (model, false))
    })
    .await
    .map_err(|err| PipelineError::Stage { line: name.into(), reason: format!("loading the model panicked: {err}") })?;
    let (model, from_topic) =
        loaded.map_err(|source| PipelineError::Model { line: name.into(), path: line.model.clone(), source })?;
    let workers = line.inference_workers;
    let cpu_threads = inference_threads(line);
    log::info!(
        "line {name}: model {} version {} ({} px, {}) in {} on {} inference worker{} of {}",
        if from_topic { "from the models topic".to_string() } else { line.model.display().to_string() },
        model.info.model_version,
        model.recipe.image_size,
        model.recipe.preset,
        line.precision,
        workers,
        if workers == 1 { "" } else { "s" },
        crate::torch::describe_threads(device, cpu_threads),
    );
    if device == Device::Cpu && line.precision.native_on_this_cpu() == Some(false) {
        log::warn!(
            "line {name}: precision {} on a CPU that does not compute it natively: libtorch emulates it, many \
             times slower than f32 (see `lineguard bench-serving`); use precision = \"f32\" on this machine",
            line.precision
        );
    }
    health.model_loaded.store(true, Ordering::Relaxed);
    let side = model.recipe.image_size as u32;
    let serving_version = model.info.model_version;

    let kafka = settings.kafka.clone();
    if let Ok(Err(err)) =
        tokio::task::spawn_blocking(move || crate::service::kafka::check_reachable(&kafka, Duration::from_secs(10)))
            .await
    {
        // Brokers restart and networks heal: keep trying (readiness stays false) rather than exit.
        log::warn!("line {name}: cannot reach Kafka at {} yet ({err}); retrying", settings.kafka.brokers);
    }
    let kafka_error = |what| move |source| PipelineError::Kafka { line: name.into(), what, source };
    let publisher = Publisher::new(
        crate::service::kafka::producer_config(&settings.kafka),
        name,
        line_metrics.clone(),
        settings.producer_stall(),
    )
    .map_err(kafka_error("creating the producer"))?;
    let tracker = OffsetTracker::new();
    let context = SourceContext { tracker: tracker.clone(), metrics: line_metrics.clone(), health: health.clone() };
    let consumer: StreamConsumer<SourceContext> =
        crate::service::kafka::consumer_config(&settings.kafka, &line.group_id(name))
            .create_with_context(context)
            .map_err(kafka_error("creating the consumer"))?;
    let topics: Vec<&str> = line.input_topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).map_err(kafka_error("subscribing to the input topics"))?;

    let (to_preprocess, preprocess_queue) = crossbeam_channel::bounded(line.max_in_flight);
    let (to_infer, infer_queue) = crossbeam_channel::bounded(2 * line.max_batch);
    let (to_sink, sink_queue) = mpsc::channel(line.max_in_flight);

    let pool_config = PoolConfig {
        workers: line.workers(),
        side,
        max_frame_bytes: line.max_frame_bytes,
        expected_size: line.expected_size,
        decode_limits: line.decode_limits(),
        keep_payload: line.retrain.is_some(),
    };
    let pool = crate::service::preprocess::spawn(
        pool_config,
        preprocess_queue,
        to_infer,
        to_sink.clone(),
        line_metrics.clone(),
    )?;
    let stage = StageConfig {
        precision: line.precision,
        batching: Batching { max_batch: line.max_batch, max_wait: line.max_batch_wait() },
        cpu_threads,
    };
    let models = crate::service::infer::replicate(model, line.inference_workers)
        .map_err(|source| PipelineError::Model { line: name.into(), path: line.model.clone(), source })?;
    // A failed inference stage ends the line now: otherwise its source would notice only when frames
    // found no worker left, and an idle line would wait, dead, for them.
    let (failed, line_name) = (ended.clone(), name.to_string());
    let on_exit = Box::new(move |outcome: &Result<(), String>| {
        if let Err(reason) = outcome {
            log::error!("line {line_name}: {reason}; the line stops");
            let _ = failed.send(line_name);
        }
    });
    let (infer, swapper) = crate::service::infer::spawn(
        models,
        stage,
        infer_queue,
        to_sink.clone(),
        line_metrics.clone(),
        health.clone(),
        on_exit,
    )?;
    let follower = match feed {
        Some(feed) => {
            let stop = Arc::new(AtomicBool::new(false));
            let thread = crate::service::retrain::models_topic::follow(
                name.to_string(),
                feed,
                swapper.clone(),
                serving_version,
                device,
                stop.clone(),
                health.clone(),
            )?;
            Some(Background { name: name.to_string(), stop, thread })
        }
        None => None,
    };

    let sink_config = SinkConfig {
        line: name.to_string(),
        results_topic: line.results_topic.clone(),
        maps_topic: line.maps_output().map(str::to_string),
        dead_letter_topic: line.dead_letter_topic.clone(),
        threshold: line.threshold,
        map_format: line.map_format,
        acceptance: line.retrain.as_ref().map(|retrain| crate::service::sink::Acceptance {
            topic: retrain.accepted_topic.clone(),
            below: retrain.accept_below,
            per_minute: retrain.accept_per_minute,
        }),
    };
    let (drained_tx, drained) = oneshot::channel();
    let sink_metrics = line_metrics.clone();
    let sink_health = health.clone();
    let (failed, line_name) = (ended.clone(), name.to_string());
    tokio::spawn(async move {
        let published = crate::service::sink::run(sink_config, publisher, sink_queue, sink_metrics, sink_health).await;
        if let Err(reason) = &published {
            log::error!("line {line_name}: {reason}; the line stops");
            let _ = failed.send(line_name);
        }
        let _ = drained_tx.send(published);
    });

    // Queue depths are reported by the stages that read them; nothing else may hold a queue end, or a
    // stage that stops would not be noticed by its neighbours.
    // It is also the line's watchdog: a frame unacknowledged for longer than `stalled_after` means the
    // line is stuck (a broker that never comes back, a hung stage) and turns `/healthz` to 503.
    let sampler = {
        let (tracker, metrics, health) = (tracker.clone(), line_metrics.clone(), health.clone());
        let (stalled_after, line_name) = (settings.metrics.stalled_after(), name.to_string());
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_millis(500));
            loop {
                ticks.tick().await;
                metrics.frames_in_flight(tracker.in_flight());
                metrics.model_age_tick();
                let oldest = tracker.oldest_in_flight();
                metrics.oldest_unacknowledged(oldest);
                let stalled = oldest.is_some_and(|age| age > stalled_after);
                if stalled != health.stalled.swap(stalled, Ordering::Relaxed) {
                    match stalled {
                        true => log::error!(
                            "line {line_name}: a frame has waited {:.0}s for its outputs (metrics.stalled_after_secs \
                             = {}); the line is stuck, /healthz reports it",
                            oldest.unwrap_or_default().as_secs_f64(),
                            stalled_after.as_secs()
                        ),
                        false => log::info!("line {line_name}: progressing again"),
                    }
                }
            }
        })
    };
    // Only the stages hold the sink's input from here on, so it closes when they finish.
    drop(to_sink);

    let (stop, stop_rx) = watch::channel(false);
    let source = Source {
        line: name.to_string(),
        consumer,
        tracker,
        permits: Arc::new(Semaphore::new(line.max_in_flight)),
        to_preprocess,
        metrics: line_metrics,
        commit_interval: settings.commit_interval(),
    };
    let line_name = name.to_string();
    let source = tokio::spawn(async move {
        let consumed = source.run(stop_rx, drained).await;
        let _ = ended.send(line_name);
        consumed
    });
    Ok(RunningLine { name: name.to_string(), follower, stop, source, infer, pool, sampler, swapper })
}

/// Creates the line's retraining topics when missing and reads its models topic up to now: the feed to
/// follow and the newest publication. An unreachable broker is not fatal here (the feed catches up once
/// it is reachable).
async fn follow_models_topic(
    settings: &Settings,
    name: &str,
    retrain: &crate::service::settings::RetrainSettings,
) -> Result<(Option<ModelFeed>, Option<Published>), PipelineError> {
    let kafka = &settings.kafka;
    if let Err(err) = crate::service::retrain::ensure_topics(kafka, retrain).await {
        log::warn!("line {name}: cannot create the retraining topics ({err}); they must exist");
    }
    if retrain.signing_key.is_none() {
        log::warn!(
            "line {name}: models from {} are taken unsigned (no retrain.signing_key): whoever can write to the \
             topic can replace this replica's model",
            retrain.models_topic
        );
    }
    let key = retrain.signing_key.clone();
    let (kafka, topic, line) = (kafka.clone(), retrain.models_topic.clone(), name.to_string());
    let opened = tokio::task::spawn_blocking(move || {
        let mut feed = ModelFeed::open(&kafka, &topic, &line, key.as_ref())?;
        let newest = feed.catch_up(Duration::from_secs(30))?;
        Ok::<_, FeedError>((feed, newest))
    })
    .await;
    match opened {
        Ok(Ok((feed, newest))) => Ok((Some(feed), newest)),
        // A topic of several partitions would silently stop updates: refuse to start, saying why.
        Ok(Err(err @ FeedError::Layout { .. })) => {
            Err(PipelineError::Stage { line: name.into(), reason: err.to_string() })
        }
        Ok(Err(err)) => {
            log::warn!("line {name}: cannot read the models topic yet ({err}); serving the configured model");
            let feed = ModelFeed::open(&settings.kafka, &retrain.models_topic, name, retrain.signing_key.as_ref());
            Ok((feed.ok(), None))
        }
        Err(err) => {
            log::warn!("line {name}: reading the models topic failed: {err}");
            Ok((None, None))
        }
    }
}

/// Stops nothing by itself: the caller has set the flag. Waits for the thread off the async runtime.
async fn join_background(background: Background) -> Result<(), PipelineError> {
    let Background { name, thread, .. } = background;
    let joined = tokio::task::spawn_blocking(move || {
        thread.join().unwrap_or_else(|_| Err("a background thread panicked".into()))
    })
    .await;
    match joined {
        Ok(Ok(())) => Ok(()),
        Ok(Err(reason)) => Err(PipelineError::Stage { line: name, reason }),
        Err(err) => Err(PipelineError::Stage { line: name, reason: err.to_string() }),
    }
}

/// libtorch CPU threads of each of the line's inference workers.
fn inference_threads(line: &LineSettings) -> usize {
    crate::service::infer::threads_per_worker(line.inference_threads, line.inference_workers)
}

/// libtorch CPU threads that the inference workers of every CPU line ask for together.
fn cpu_inference_threads(settings: &Settings) -> Result<usize, PipelineError> {
    let mut threads = 0;
    for (name, line) in &settings.lines {
        if !choose_device(name, line.device)?.is_cuda() {
            threads += line.inference_workers * inference_threads(line);
        }
    }
    Ok(threads)
}

/// Each line sizes its inference for the whole machine by default, which is fastest for a line alone or
/// beside idle lines; when several CPU lines (or more workers than threads) are busy at once, their
/// threads outnumber the cores. Says so, with what was measured, rather than choosing for the user.
fn warn_of_oversubscription(settings: &Settings) -> Result<(), PipelineError> {
    let (asked, available) = (cpu_inference_threads(settings)?, crate::torch::parallel_threads());
    if asked > available {
        log::warn!(
            "the inference workers of the CPU lines ask for {asked} libtorch threads in all, on {available} CPU \
             threads: while they are busy at once they compete for cores (two busy lines in bf16 scored 13% fewer \
             frames/s than with lines.<name>.inference_threads sharing the threads out; BENCHMARKS.md, \"two lines \
             in one process\")"
        );
    }
    Ok(())
}

/// A stalled producer is replaced after `kafka.producer_stall_secs`; when that is not before
/// `metrics.stalled_after_secs`, `/healthz` asks for a restart first, which is allowed but rarely meant.
fn warn_of_late_producer_replacement(settings: &Settings) {
    let (replace, stalled) = (settings.kafka.producer_stall_secs, settings.metrics.stalled_after_secs);
    if replace >= stalled {
        log::warn!(
            "kafka.producer_stall_secs = {replace} is not below metrics.stalled_after_secs = {stalled}: a line whose \
             producer stalls turns /healthz to 503 (a restart) before its producer is replaced"
        );
    }
}

fn choose_device(line: &str, choice: DeviceChoice) -> Result<Device, PipelineError> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto => Ok(crate::torch::select_device(false)),
        DeviceChoice::Cuda => match crate::torch::select_device(false) {
            Device::Cuda(index) => Ok(Device::Cuda(index)),
            _ => Err(PipelineError::Device {
                line: line.into(),
                reason: "device = \"cuda\" but libtorch sees no GPU (install with LINEGUARD_TORCH=cuda on a GPU host)"
                    .into(),
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::service::settings::{KafkaSettings, MetricsSettings};

    fn cpu_line(topic: &str, inference_workers: usize, inference_threads: usize) -> LineSettings {
        LineSettings {
            device: DeviceChoice::Cpu,
            inference_workers,
            inference_threads,
            results_topic: format!("{topic}.results"),
            maps_topic: format!("{topic}.maps"),
            dead_letter_topic: format!("{topic}.dead"),
            ..LineSettings::with_defaults(PathBuf::from("model.safetensors"), vec![topic.to_string()], 0.5)
        }
    }

    #[test]
    fn the_warning_counts_every_cpu_line_and_its_workers() {
        let settings = |lines: Vec<(&str, LineSettings)>| Settings {
            kafka: KafkaSettings::for_brokers("localhost:9092", "test"),
            metrics: MetricsSettings::default(),
            shutdown: Default::default(),
            lines: lines.into_iter().map(|(name, line)| (name.to_string(), line)).collect(),
        };
        let shared_out = settings(vec![("a", cpu_line("a", 1, 1)), ("b", cpu_line("b", 2, 3))]);
        assert_eq!(cpu_inference_threads(&shared_out).unwrap(), 1 + 2 * 3);
        // Unset, a line's workers share all of the process's threads: two such lines ask for twice as many.
        let alone = crate::torch::parallel_threads();
        let sized_alone = settings(vec![("a", cpu_line("a", 1, 0)), ("b", cpu_line("b", 1, 0))]);
        assert_eq!(cpu_inference_threads(&sized_alone).unwrap(), 2 * alone);
        assert_eq!(inference_threads(&cpu_line("a", 2, 0)), (alone / 2).max(1));
    }
}
