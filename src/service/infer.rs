//! The inference stage: `inference_workers` OS threads, each owning a copy of the model (libtorch
//! tensors are `Send` but not `Sync`), each gathering prepared frames from the shared queue into batches
//! (up to `max_batch`, or whatever arrived `max_batch_wait` after the first), copying their bytes to the
//! model's device, normalising and scoring them without gradients, and handing each scored frame to the
//! sink.
//!
//! Why several workers: one worker parallelises each batch across the cores (libtorch's OpenMP team), and
//! the team's threads wait for each other at every layer, so any other thread that takes a core for a
//! moment (the decode pool, the Kafka clients, a broker on the same machine) stalls the whole team. Workers
//! of one thread each score different batches side by side and only stall one at a time (measured in
//! BENCHMARKS.md); on a GPU, one worker's host work (copies, the maps' conversion) can overlap another's
//! kernels (not measured yet). Frames may then leave the stage slightly out of order; offsets are
//! committed per frame (`ack`), so that loses nothing.
//!
//! The model is replaceable at runtime through a [`ModelSwapper`]: every worker picks the new model up
//! between two batches, so no frame is ever scored by a half-loaded model and every result names the
//! version that produced it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use tch::{Device, Kind};
use tokio::sync::mpsc;

use crate::error::WeightsError;
use crate::model::{EfficientAd, Precision};
use crate::service::frame::{PreparedFrame, ScoredFrame, SinkItem};
use crate::service::metrics::{LineHealth, LineMetrics, Queue};

#[derive(Debug, Clone, Copy)]
pub struct Batching {
    pub max_batch: usize,
    pub max_wait: Duration,
}

/// How every worker of the stage runs its model.
#[derive(Debug, Clone, Copy)]
pub struct StageConfig {
    pub precision: Precision,
    pub batching: Batching,
    /// libtorch CPU threads of each worker (unused on a GPU).
    pub cpu_threads: usize,
}

/// libtorch CPU threads of each of `workers` inference workers: `configured` (`inference_threads`) when
/// set, else the process's parallel threads shared out, at least one each. (A background trainer may set
/// its own thread count; inference keeps the one the process started with.)
pub fn threads_per_worker(configured: usize, workers: usize) -> usize {
    match configured {
        0 => (crate::torch::parallel_threads() / workers.max(1)).max(1),
        threads => threads,
    }
}

/// `count` independent copies of `model` (the first is `model` itself): one per inference worker.
pub fn replicate(model: EfficientAd, count: usize) -> Result<Vec<EfficientAd>, WeightsError> {
    let mut copies = Vec::with_capacity(count.max(1));
    for _ in 1..count {
        copies.push(model.duplicate()?);
    }
    copies.insert(0, model);
    Ok(copies)
}

/// A new model on its way to one worker; the last worker to install its copy makes the swap visible.
struct Swap {
    model: EfficientAd,
    workers_left: Arc<AtomicUsize>,
}

/// Hands new models to a running inference stage, and tells how busy it is.
#[derive(Clone)]
pub struct ModelSwapper {
    /// One sender per worker, each holding at most one pending swap. The lock makes a swap reach every
    /// worker or none, whichever swapper sends it.
    workers: Arc<Mutex<Vec<Sender<Swap>>>>,
    side: i64,
    queued: Arc<AtomicUsize>,
    serving: Arc<AtomicU64>,
}

impl ModelSwapper {
    /// The version of the model that every worker scores with now (a queued swap counts once each worker
    /// has installed it).
    pub fn serving_version(&self) -> u64 {
        self.serving.load(Ordering::Relaxed)
    }

    /// Queues `model` to replace the serving one before the next batch. Refuses models that cannot serve
    /// this line (another input size, no calibration) so the stage never has to.
    pub fn swap(&self, model: EfficientAd) -> Result<(), WeightsError> {
        self.try_swap(model).map_err(|refused| refused.error)
    }

    /// [`ModelSwapper::swap`], handing the model back when it was not queued (a swap is still pending).
    pub fn try_swap(&self, model: EfficientAd) -> Result<(), SwapRefused> {
        let refuse = |reason: String| WeightsError::Content { path: "<hot swap>".into(), reason };
        let refused = |error, model: Option<EfficientAd>| SwapRefused { error, model: model.map(Box::new) };
        if let Err(err) = check_servable(&model) {
            return Err(refused(err, None));
        }
        if model.recipe.image_size != self.side {
            let reason = format!(
                "the new model takes {} px images, the serving one {} px; restart the line to change sizes",
                model.recipe.image_size, self.side
            );
            return Err(refused(refuse(reason), None));
        }
        let workers = self.workers.lock().unwrap_or_else(PoisonError::into_inner);
        if workers.iter().any(Sender::is_full) {
            return Err(refused(refuse("a swap is already pending".into()), Some(model)));
        }
        let copies = replicate(model, workers.len()).map_err(|err| refused(err, None))?;
        let workers_left = Arc::new(AtomicUsize::new(copies.len()));
        for (worker, model) in workers.iter().zip(copies) {
            // Only swappers send, under this lock, and every channel had room: a failure means a stopped
            // worker, and a stopping stage serves nothing more.
            if worker.try_send(Swap { model, workers_left: workers_left.clone() }).is_err() {
                return Err(refused(refuse("the inference stage has stopped".into()), None));
            }
        }
        Ok(())
    }

    /// Frames waiting in front of inference when the last batch started (the trainer yields to them).
    pub fn queued_frames(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
}

/// Why a swap did not happen; `model` comes back when it may be offered again later.
pub struct SwapRefused {
    pub error: WeightsError,
    pub model: Option<Box<EfficientAd>>,
}

/// A model can serve when its maps can be normalised.
pub fn check_servable(model: &EfficientAd) -> Result<(), WeightsError> {
    if model.map_quantiles.is_none() {
        return Err(WeightsError::Content {
            path: "<model>".into(),
            reason: "the model has no map normalisation quantiles; train it with `lineguard train` (which \
                     calibrates on validation/good)"
                .into(),
        });
    }
    Ok(())
}

/// What every worker of one stage shares.
struct Shared {
    config: StageConfig,
    input: Receiver<PreparedFrame>,
    to_sink: mpsc::Sender<SinkItem>,
    metrics: LineMetrics,
    health: Arc<LineHealth>,
    queued: Arc<AtomicUsize>,
    serving: Arc<AtomicU64>,
    /// Dropped by the first worker that fails, which ends the others: a stage that lost a worker to a
    /// libtorch failure stops whole, as one worker did, rather than limp on at a fraction of its rate.
    abort: Mutex<Option<Sender<()>>>,
    aborted: Receiver<()>,
}

/// Starts the stage with one worker per model in `models` (copies of one model, see [`replicate`]),
/// scoring in `config.precision` (every model it is given, swapped ones included, is converted on its
/// worker's thread). It ends when `input` is closed and drained (shutdown) or the sink is gone; a
/// libtorch failure ends it with the error (the frames of the failed batch stay unacknowledged, so they
/// are consumed again after a restart). `on_exit` hears the outcome as the stage ends.
pub fn spawn(
    models: Vec<EfficientAd>,
    config: StageConfig,
    input: Receiver<PreparedFrame>,
    to_sink: mpsc::Sender<SinkItem>,
    metrics: LineMetrics,
    health: Arc<LineHealth>,
    on_exit: crate::service::OnExit,
) -> std::io::Result<(JoinHandle<Result<(), String>>, ModelSwapper)> {
    let (senders, swaps): (Vec<_>, Vec<_>) = models.iter().map(|_| crossbeam_channel::bounded(1)).unzip();
    let mut workers = models.into_iter().zip(swaps);
    let Some((first_model, first_swaps)) = workers.next() else {
        return Err(std::io::Error::other("the inference stage needs a model"));
    };
    let (side, version, created) =
        (first_model.recipe.image_size, first_model.info.model_version, first_model.info.created_unix);
    let queued = Arc::new(AtomicUsize::new(0));
    let serving = Arc::new(AtomicU64::new(version));
    let swapper =
        ModelSwapper { workers: Arc::new(Mutex::new(senders)), side, queued: queued.clone(), serving: serving.clone() };
    metrics.model_loaded(version, created);
    let (abort, aborted) = crossbeam_channel::bounded(0);
    let shared =
        Shared { config, input, to_sink, metrics, health, queued, serving, abort: Mutex::new(Some(abort)), aborted };
    let handle = std::thread::Builder::new().name("infer".into()).spawn(move || {
        let outcome = std::thread::scope(|scope| {
            let mut others = Vec::new();
            for (index, (model, swaps)) in workers.enumerate() {
                let shared = &shared;
                let thread = std::thread::Builder::new()
                    .name(format!("infer-{}", index + 1))
                    .spawn_scoped(scope, move || run_worker(shared, model, swaps));
                match thread {
                    Ok(thread) => others.push(thread),
                    Err(err) => {
                        shared.abort_all();
                        return Err(format!("cannot start an inference worker: {err}"));
                    }
                }
            }
            let mut outcome = run_worker(&shared, first_model, first_swaps);
            for thread in others {
                let joined = thread.join().unwrap_or_else(|_| Err("an inference worker panicked".into()));
                if outcome.is_ok() {
                    outcome = joined;
                }
            }
            outcome
        });
        on_exit(&outcome);
        outcome
    })?;
    Ok((handle, swapper))
}

impl Shared {
    fn abort_all(&self) {
        drop(self.abort.lock().unwrap_or_else(PoisonError::into_inner).take());
    }

    fn install(&self, model: &mut EfficientAd, swap: Swap) {
        let previous = model.info.model_version;
        *model = swap.model.with_precision(self.config.precision);
        if swap.workers_left.fetch_sub(1, Ordering::AcqRel) == 1 {
            log::info!("model version {} replaces version {previous}", model.info.model_version);
            self.serving.store(model.info.model_version, Ordering::Relaxed);
            self.metrics.model_loaded(model.info.model_version, model.info.created_unix);
        }
    }
}

/// One worker: batches from the shared queue until it is closed and drained, the sink is gone, or another
/// worker failed.
fn run_worker(shared: &Shared, model: EfficientAd, swaps: Receiver<Swap>) -> Result<(), String> {
    crate::torch::use_threads(shared.config.cpu_threads);
    let mut model = model.with_precision(shared.config.precision);
    crate::torch::autotune_convolutions(model.device());
    let mut swaps = swaps;
    let Batching { max_batch, max_wait } = shared.config.batching;
    loop {
        // Idle, the worker waits for a frame or a new model, so a swap never waits for traffic; busy,
        // swaps land between batches.
        let next = crossbeam_channel::select! {
            recv(shared.input) -> frame => frame.ok().map(Ok),
            recv(swaps) -> new => Some(Err(new.ok())),
            recv(shared.aborted) -> _ => None,
        };
        let first = match next {
            None => break,
            Some(Ok(frame)) => frame,
            Some(Err(Some(new))) => {
                shared.install(&mut model, new);
                continue;
            }
            Some(Err(None)) => {
                // Every swapper is gone: no more swaps can come.
                swaps = crossbeam_channel::never();
                continue;
            }
        };
        let batch = fill_batch(first, &shared.input, max_batch, max_wait);
        shared.queued.store(shared.input.len(), Ordering::Relaxed);
        shared.metrics.queue_depth(Queue::Inference, shared.input.len());
        if let Ok(new) = swaps.try_recv() {
            shared.install(&mut model, new);
        }
        shared.metrics.batch_run(batch.len());
        let scored = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| score_batch(&model, batch)));
        let scored = match scored {
            Ok(scored) => scored,
            Err(panic) => {
                shared.abort_all();
                return Err(format!("inference failed: {}", crate::service::panic_message(&*panic)));
            }
        };
        report_output_health(&scored, &shared.health, model.info.model_version);
        for frame in scored {
            if shared.to_sink.blocking_send(SinkItem::Scored(frame)).is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// A model whose every map in a batch is non-finite is broken (readiness goes false, so alerts and the
/// orchestrator see it); one fully finite batch makes it healthy again. A single bad map among good ones
/// is that frame's problem and only gives it an error result.
fn report_output_health(scored: &[ScoredFrame], health: &LineHealth, version: u64) {
    let broken = scored.iter().filter(|frame| !frame.is_judged()).count();
    if broken == scored.len() && broken > 0 {
        if !health.model_output_broken.swap(true, Ordering::Relaxed) {
            log::error!("model version {version} produces non-finite anomaly maps: frames get error results");
        }
    } else if broken == 0 && health.model_output_broken.swap(false, Ordering::Relaxed) {
        log::info!("model version {version} produces finite anomaly maps again");
    }
}

/// Blocks for a first item, then gathers more until `max_batch` items or `max_wait` after the first.
/// `None` once the channel is closed and empty.
pub fn collect_batch<T>(input: &Receiver<T>, max_batch: usize, max_wait: Duration) -> Option<Vec<T>> {
    let first = input.recv().ok()?;
    Some(fill_batch(first, input, max_batch, max_wait))
}

/// Gathers more items after `first` until `max_batch` items or `max_wait` after it.
fn fill_batch<T>(first: T, input: &Receiver<T>, max_batch: usize, max_wait: Duration) -> Vec<T> {
    let deadline = Instant::now() + max_wait;
    let mut batch = Vec::with_capacity(max_batch);
    batch.push(first);
    while batch.len() < max_batch {
        match input.recv_deadline(deadline) {
            Ok(item) => batch.push(item),
            Err(_) => break,
        }
    }
    batch
}

fn score_batch(model: &EfficientAd, batch: Vec<PreparedFrame>) -> Vec<ScoredFrame> {
    let started = Instant::now();
    let side = model.recipe.image_size;
    let count = batch.len();
    let device = model.device();
    // Every frame was resized to the model's side (a swap keeps the side), so each fills one slot exactly.
    let host = crate::torch::host_bytes(&[count as i64, side, side, 3], device, |bytes| {
        for (slot, frame) in bytes.chunks_exact_mut((side * side * 3) as usize).zip(&batch) {
            slot.copy_from_slice(&frame.input);
        }
    });
    let images = crate::data::preprocess::normalise_bytes(&crate::torch::to_device_async(&host, device));
    // Servability is checked before a model reaches this thread, so the maps can always be normalised.
    let maps = match model.anomaly_maps(&images, side, side) {
        Ok(maps) => maps,
        Err(err) => panic!("{err}"),
    };
    let maps: Vec<f32> =
        maps.to_device(Device::Cpu).to_kind(Kind::Float).contiguous().view([-1]).try_into().unwrap_or_default();
    let inference = started.elapsed().as_secs_f64();
    let cells = (side * side) as usize;
    let display_range = model.display_range();
    batch
        .into_iter()
        .enumerate()
        .map(|(index, frame)| {
            let PreparedFrame { mut meta, camera, original_size, prepared_at, payload, ack, .. } = frame;
            meta.timings.batch_wait = started.duration_since(prepared_at).as_secs_f64();
            meta.timings.inference = inference;
            let map = maps.get(index * cells..(index + 1) * cells).map(<[f32]>::to_vec).unwrap_or_default();
            let non_finite = map.iter().filter(|value| !value.is_finite()).count();
            // `f32::max` skips NaN: a map with a few NaN values would still get a finite, meaningless score.
            let score = if non_finite > 0 { f32::NAN } else { map.iter().copied().fold(f32::NEG_INFINITY, f32::max) };
            ScoredFrame {
                meta,
                camera,
                original_size,
                score,
                non_finite,
                map,
                map_side: side as u32,
                display_range,
                model_version: model.info.model_version,
                batch_size: count,
                payload,
                ack,
            }
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn a_full_batch_does_not_wait() {
        let (tx, rx) = crossbeam_channel::unbounded();
        for i in 0..5 {
            tx.send(i).unwrap();
        }
        let started = Instant::now();
        let batch = collect_batch(&rx, 4, Duration::from_secs(30)).unwrap();
        assert_eq!(batch, vec![0, 1, 2, 3]);
        assert!(started.elapsed() < Duration::from_secs(10), "must not wait for the deadline");
        assert_eq!(collect_batch(&rx, 4, Duration::from_millis(1)).unwrap(), vec![4]);
    }

    #[test]
    fn a_partial_batch_runs_at_the_deadline() {
        let (tx, rx) = crossbeam_channel::unbounded();
        tx.send(1).unwrap();
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            tx.send(2).unwrap();
            tx
        });
        let batch = collect_batch(&rx, 8, Duration::from_millis(20)).unwrap();
        assert_eq!(batch, vec![1], "the late item belongs to the next batch");
        let tx = late.join().unwrap();
        assert_eq!(collect_batch(&rx, 8, Duration::from_millis(20)).unwrap(), vec![2]);
        drop(tx);
        assert_eq!(collect_batch(&rx, 8, Duration::from_millis(20)), None, "closed and drained");
    }

    #[test]
    fn frames_queued_before_close_are_still_batched() {
        let (tx, rx) = crossbeam_channel::unbounded();
        tx.send(1).unwrap();
        tx.send(2).unwrap();
        drop(tx);
        assert_eq!(collect_batch(&rx, 8, Duration::from_secs(30)).unwrap(), vec![1, 2]);
        assert_eq!(collect_batch(&rx, 8, Duration::from_secs(30)), None);
    }

    pub(crate) fn tiny_model(version: u64, side: i64) -> EfficientAd {
        use crate::model::config::{Preset, Recipe};
        let recipe = Recipe { image_size: side, channels: 8, ..Recipe::preset(Preset::Dfsc) };
        let mut model = EfficientAd::new(recipe, Device::Cpu).unwrap();
        model.map_quantiles = Some(crate::model::MapQuantiles { student_teacher: (0.0, 1.0), autoencoder: (0.0, 1.0) });
        model.info.model_version = version;
        model
    }

    fn prepared(tracker: &crate::service::ack::OffsetTracker, offset: i64) -> PreparedFrame {
        use crate::service::frame::{CameraInfo, FrameMeta};
        let tp = crate::service::ack::TopicPartition { topic: "frames".into(), partition: 0 };
        PreparedFrame {
            meta: FrameMeta::for_test(&format!("f{offset}"), "l", offset),
            camera: CameraInfo { camera_id: "c".into(), line_id: "l".into(), captured_at_ms: 0 },
            input: vec![26; 3 * 128 * 128],
            original_size: (128, 128),
            prepared_at: Instant::now(),
            payload: None,
            ack: tracker.register(tp, offset, None),
        }
    }

    /// A running stage with a 1 ms batch wait: where frames go in, where results come out, its thread and
    /// its swapper.
    struct RunningStage {
        to_infer: Sender<PreparedFrame>,
        output: mpsc::Receiver<SinkItem>,
        stage: JoinHandle<Result<(), String>>,
        swapper: ModelSwapper,
        /// What the stage's `on_exit` heard.
        exit: Receiver<Result<(), String>>,
    }

    fn start_stage(
        model: EfficientAd,
        precision: Precision,
        max_batch: usize,
        health: Arc<LineHealth>,
    ) -> RunningStage {
        start_workers(replicate(model, 1).unwrap(), precision, max_batch, health)
    }

    fn start_workers(
        models: Vec<EfficientAd>,
        precision: Precision,
        max_batch: usize,
        health: Arc<LineHealth>,
    ) -> RunningStage {
        let (to_infer, input) = crossbeam_channel::bounded(8);
        let (to_sink, output) = mpsc::channel(8);
        let metrics = crate::service::metrics::Metrics::new().unwrap().line("l");
        let batching = Batching { max_batch, max_wait: Duration::from_millis(1) };
        let config = StageConfig { precision, batching, cpu_threads: threads_per_worker(0, models.len()) };
        let (exited, exit) = crossbeam_channel::bounded(1);
        let on_exit = Box::new(move |outcome: &Result<(), String>| {
            let _ = exited.send(outcome.clone());
        });
        let (stage, swapper) = spawn(models, config, input, to_sink, metrics, health, on_exit).unwrap();
        RunningStage { to_infer, output, stage, swapper, exit }
    }

    fn scored(item: Option<SinkItem>) -> ScoredFrame {
        match item {
            Some(SinkItem::Scored(frame)) => frame,
            other => panic!("expected a scored frame, got {other:?}"),
        }
    }

    /// Two workers, each with its own copy, score every frame once and to the same scores as one worker;
    /// a swap counts as serving once both workers have it, and every frame sent after it is scored by the
    /// new model, whichever worker takes it.
    #[test]
    fn two_workers_score_like_one_and_both_take_a_swap() {
        let tracker = crate::service::ack::OffsetTracker::new();
        let weights = tiny_model(1, 128).to_bytes().unwrap();
        let copy = |version: u64| {
            let mut model = EfficientAd::from_bytes(&weights, "<test>".as_ref(), Device::Cpu).unwrap();
            model.info.model_version = version;
            model
        };
        let frame = |offset: i64| {
            let mut frame = prepared(&tracker, offset);
            frame.input = (0..3 * 128 * 128).map(|i| ((i + offset as usize * 13) * 7 % 251) as u8).collect();
            frame
        };
        let score_all = |models: Vec<EfficientAd>, swap_to: Option<u64>| {
            let workers = models.len();
            let RunningStage { to_infer, mut output, stage, swapper, .. } =
                start_workers(models, Precision::F32, 1, Arc::new(LineHealth::default()));
            if let Some(version) = swap_to {
                swapper.swap(copy(version)).unwrap();
            }
            let mut scores = std::collections::BTreeMap::new();
            let mut frame_ids = std::collections::BTreeSet::new();
            for offset in 0..12 {
                to_infer.send(frame(offset)).unwrap();
            }
            for _ in 0..12 {
                let frame = scored(output.blocking_recv());
                assert_eq!(frame.model_version, swap_to.unwrap_or(1), "{workers} workers");
                frame_ids.insert(frame.meta.frame_id.clone());
                scores.insert(frame.meta.source.offset, frame.score);
            }
            assert_eq!(frame_ids.len(), 12, "every frame scored once");
            // A worker that took no frame installs the swap when it wakes for it.
            let deadline = Instant::now() + Duration::from_secs(30);
            while swapper.serving_version() != swap_to.unwrap_or(1) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            assert_eq!(swapper.serving_version(), swap_to.unwrap_or(1));
            drop(to_infer);
            assert_eq!(stage.join().unwrap(), Ok(()));
            scores
        };
        let alone = score_all(vec![copy(1)], None);
        let pair = score_all(replicate(copy(1), 2).unwrap(), None);
        for (offset, score) in &alone {
            assert!((score - pair[offset]).abs() <= 1e-4 * score.abs(), "frame {offset}: {score} vs {}", pair[offset]);
        }
        score_all(replicate(copy(1), 2).unwrap(), Some(5));
    }

    /// Before, a worker that failed would have left the other scoring at half the rate, and the stage's
    /// failure would have surfaced only at shutdown. Now the first failure ends every worker.
    #[test]
    fn a_failing_worker_stops_the_whole_stage() {
        let tracker = crate::service::ack::OffsetTracker::new();
        let RunningStage { to_infer, output: _output, stage, exit, .. } = start_workers(
            replicate(tiny_model(1, 128), 3).unwrap(),
            Precision::F32,
            1,
            Arc::new(LineHealth::default()),
        );
        let mut broken = prepared(&tracker, 0);
        broken.input.truncate(10); // not a 128 px frame: the batch tensor cannot be shaped
        to_infer.send(broken).unwrap();
        // The pipeline hears of it at once (it stops the line then, not when the next frames would
        // find no worker), and the same outcome is what the thread returns.
        let heard = exit.recv_timeout(Duration::from_secs(60)).unwrap();
        assert!(heard.as_ref().is_err_and(|reason| reason.contains("inference failed")), "{heard:?}");
        assert_eq!(stage.join().unwrap(), heard);
        assert!(to_infer.send(prepared(&tracker, 1)).is_err(), "no worker is left to take frames");
    }

    /// Before: `f32::max` skipped the NaN values and the frame was scored on the rest, `normal`.
    #[test]
    fn non_finite_maps_have_no_score_and_make_the_line_unready_until_a_good_model_serves() {
        let tracker = crate::service::ack::OffsetTracker::new();
        let health = Arc::new(LineHealth::default());
        health.model_loaded.store(true, Ordering::Relaxed);
        health.joined_group.store(true, Ordering::Relaxed);
        let mut broken = tiny_model(1, 128);
        broken.map_quantiles =
            Some(crate::model::MapQuantiles { student_teacher: (f64::NAN, 1.0), autoencoder: (0.0, 1.0) });
        let RunningStage { to_infer, mut output, stage, swapper, .. } =
            start_stage(broken, Precision::F32, 1, health.clone());
        to_infer.send(prepared(&tracker, 0)).unwrap();
        let frame = scored(output.blocking_recv());
        // The padded border of the map stays finite (zeros), so `f32::max` alone would have scored it 0.
        assert!(frame.non_finite > 0 && frame.non_finite < 128 * 128, "{}", frame.non_finite);
        assert!(frame.score.is_nan(), "no score: {}", frame.score);
        assert!(!health.ready(), "a model whose every map is non-finite makes the line unready");

        swapper.swap(tiny_model(2, 128)).unwrap();
        to_infer.send(prepared(&tracker, 1)).unwrap();
        let frame = scored(output.blocking_recv());
        assert_eq!((frame.non_finite, frame.model_version), (0, 2));
        assert!(frame.score.is_finite());
        assert!(health.ready(), "finite maps again");
        drop(to_infer);
        assert_eq!(stage.join().unwrap(), Ok(()));
    }

    /// The stage scores in its precision, with its first model and with swapped-in ones: its score of a
    /// frame is the model's own score in that precision, and a bf16 stage's differs from an f32 stage's
    /// (bf16 keeps 8 bits of mantissa).
    ///
    /// Every model here is a copy of one model's bytes: `tiny_model` draws its weights from libtorch's
    /// process-wide generator, which tests running in parallel reseed and draw from, so two calls may
    /// give different networks (CI once compared two such and saw them 15% apart).
    #[test]
    fn the_stage_scores_every_model_in_its_precision() {
        let tracker = crate::service::ack::OffsetTracker::new();
        let input: Vec<u8> = (0..3 * 128 * 128).map(|i| (i * 7 % 251) as u8).collect();
        let weights = tiny_model(1, 128).to_bytes().unwrap();
        let copy = |version: u64| {
            let mut model = EfficientAd::from_bytes(&weights, "<test>".as_ref(), Device::Cpu).unwrap();
            model.info.model_version = version;
            model
        };
        let stage_score = |precision: Precision, swap: bool| -> f32 {
            let RunningStage { to_infer, mut output, stage, swapper, .. } =
                start_stage(copy(1), precision, 1, Arc::new(LineHealth::default()));
            if swap {
                swapper.swap(copy(2)).unwrap();
            }
            let mut frame = prepared(&tracker, 0);
            frame.input = input.clone();
            to_infer.send(frame).unwrap();
            let scored = match output.blocking_recv() {
                Some(SinkItem::Scored(frame)) => frame,
                other => panic!("expected a scored frame, got {other:?}"),
            };
            assert_eq!(scored.model_version, if swap { 2 } else { 1 });
            drop(to_infer);
            assert_eq!(stage.join().unwrap(), Ok(()));
            scored.score
        };
        let direct_score = |precision: Precision| -> f32 {
            let bytes = tch::Tensor::from_slice(&input).reshape([1, 128, 128, 3]);
            let images = crate::data::preprocess::normalise_bytes(&bytes);
            let maps = copy(1).with_precision(precision).anomaly_maps(&images, 128, 128).unwrap();
            maps.max().double_value(&[]) as f32
        };
        let (direct_full, direct_reduced) = (direct_score(Precision::F32), direct_score(Precision::Bf16));
        for swap in [false, true] {
            let (full, reduced) = (stage_score(Precision::F32, swap), stage_score(Precision::Bf16, swap));
            assert!(full.is_finite() && reduced.is_finite());
            assert_ne!(full, reduced, "swap {swap}: the bf16 stage rounds");
            // The stage may run on another thread count than this thread, so its sums may be ordered
            // differently: near, not equal.
            assert!((full - direct_full).abs() <= 1e-4 * full.abs(), "swap {swap}: {full} vs {direct_full}");
            assert!(
                (reduced - direct_reduced).abs() < (reduced - direct_full).abs(),
                "swap {swap}: the bf16 stage's {reduced} is nearer f32's {direct_full} than bf16's {direct_reduced}"
            );
        }
    }

    #[test]
    fn a_swapped_model_scores_from_the_next_batch_on() {
        let tracker = crate::service::ack::OffsetTracker::new();
        let RunningStage { to_infer, mut output, stage, swapper, .. } =
            start_stage(tiny_model(1, 128), Precision::F32, 2, Arc::new(LineHealth::default()));
        let version = |item: SinkItem| match item {
            SinkItem::Scored(frame) => {
                assert_eq!(frame.map.len(), 128 * 128);
                assert!(frame.score.is_finite());
                frame.model_version
            }
            SinkItem::Rejected(_) => panic!("nothing is rejected here"),
        };
        to_infer.send(prepared(&tracker, 0)).unwrap();
        assert_eq!(version(output.blocking_recv().unwrap()), 1);
        assert_eq!(swapper.serving_version(), 1);

        let refused = swapper.swap(tiny_model(9, 192)).unwrap_err().to_string();
        assert!(refused.contains("192 px"), "{refused}");
        let mut uncalibrated = tiny_model(9, 128);
        uncalibrated.map_quantiles = None;
        assert!(swapper.swap(uncalibrated).is_err());

        swapper.swap(tiny_model(2, 128)).unwrap();
        to_infer.send(prepared(&tracker, 1)).unwrap();
        to_infer.send(prepared(&tracker, 2)).unwrap();
        assert_eq!(version(output.blocking_recv().unwrap()), 2);
        assert_eq!(version(output.blocking_recv().unwrap()), 2);
        assert_eq!(swapper.serving_version(), 2, "what the replica reports serving is what scored");
        drop(to_infer);
        assert_eq!(stage.join().unwrap(), Ok(()));
    }
}
