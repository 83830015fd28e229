//! The inference stage: one OS thread that owns the model (libtorch tensors are `Send` but not `Sync`),
//! gathers prepared frames into batches (up to `max_batch`, or whatever arrived `max_batch_wait` after
//! the first frame), copies their bytes to the model's device, normalises and scores them without gradients,
//! and hands each scored frame to the sink.
//!
//! The model is replaceable at runtime through a [`ModelSwapper`]: a new model is picked up between two
//! batches, so no frame is ever scored by a half-loaded model and every result names the version that
//! produced it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use tch::{Device, Kind, Tensor};
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

/// Hands new models to a running inference stage, and tells how busy it is.
#[derive(Clone)]
pub struct ModelSwapper {
    sender: Sender<EfficientAd>,
    side: i64,
    queued: Arc<AtomicUsize>,
    serving: Arc<AtomicU64>,
}

impl ModelSwapper {
    /// The version of the model scoring frames now (a queued swap counts once it is installed).
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
        self.sender.try_send(model).map_err(|err| match err {
            TrySendError::Full(model) => refused(refuse("a swap is already pending".into()), Some(model)),
            TrySendError::Disconnected(_) => refused(refuse("the inference stage has stopped".into()), None),
        })
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

/// Starts the stage, scoring in `precision` (every model it is given, swapped ones included, is converted on
/// this thread). It ends when `input` is closed and drained (shutdown) or the sink is gone; a
/// libtorch failure ends it with the error (the frames of that batch stay unacknowledged, so they are
/// consumed again after a restart).
pub fn spawn(
    model: EfficientAd,
    precision: Precision,
    batching: Batching,
    input: Receiver<PreparedFrame>,
    to_sink: mpsc::Sender<SinkItem>,
    metrics: LineMetrics,
    health: Arc<LineHealth>,
) -> std::io::Result<(JoinHandle<Result<(), String>>, ModelSwapper)> {
    let (sender, swaps) = crossbeam_channel::bounded(1);
    let queued = Arc::new(AtomicUsize::new(0));
    let serving = Arc::new(AtomicU64::new(model.info.model_version));
    let swapper =
        ModelSwapper { sender, side: model.recipe.image_size, queued: queued.clone(), serving: serving.clone() };
    // A background trainer may set its own thread count; inference keeps the one the process started with.
    let threads = crate::torch::parallel_threads();
    let handle = std::thread::Builder::new().name("infer".into()).spawn(move || {
        crate::torch::use_threads(threads);
        let mut model = model.with_precision(precision);
        crate::torch::autotune_convolutions(model.device());
        let mut swaps = swaps;
        metrics.model_loaded(model.info.model_version, model.info.created_unix);
        let install = |model: &mut EfficientAd, new: EfficientAd| {
            log::info!("model version {} replaces version {}", new.info.model_version, model.info.model_version);
            *model = new.with_precision(precision);
            serving.store(model.info.model_version, Ordering::Relaxed);
            metrics.model_loaded(model.info.model_version, model.info.created_unix);
        };
        loop {
            // Idle, the stage waits for a frame or a new model, so a swap never waits for traffic; busy,
            // swaps land between batches.
            let next = crossbeam_channel::select! {
                recv(input) -> frame => frame.ok().map(Ok),
                recv(swaps) -> new => Some(Err(new.ok())),
            };
            let first = match next {
                None => break,
                Some(Ok(frame)) => frame,
                Some(Err(Some(new))) => {
                    install(&mut model, new);
                    continue;
                }
                Some(Err(None)) => {
                    // Every swapper is gone: no more swaps can come.
                    swaps = crossbeam_channel::never();
                    continue;
                }
            };
            let batch = fill_batch(first, &input, batching.max_batch, batching.max_wait);
            queued.store(input.len(), Ordering::Relaxed);
            metrics.queue_depth(Queue::Inference, input.len());
            if let Ok(new) = swaps.try_recv() {
                install(&mut model, new);
            }
            metrics.batch_run(batch.len());
            let scored = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| score_batch(&model, batch)))
                .map_err(|panic| format!("inference failed: {}", crate::service::panic_message(&*panic)))?;
            report_output_health(&scored, &health, model.info.model_version);
            for frame in scored {
                if to_sink.blocking_send(SinkItem::Scored(frame)).is_err() {
                    return Ok(());
                }
            }
        }
        Ok(())
    })?;
    Ok((handle, swapper))
}

/// A model whose every map in a batch is non-finite is broken (readiness goes false, so alerts and the
/// orchestrator see it); one fully finite batch makes it healthy again. A single bad map among good ones
/// is that frame's problem and only gives it an error result.
fn report_output_health(scored: &[ScoredFrame], health: &LineHealth, version: u64) {
    let broken = scored.iter().filter(|frame| frame.non_finite > 0).count();
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
    let mut pixels = Vec::with_capacity(count * batch.first().map_or(0, |f| f.input.len()));
    for frame in &batch {
        pixels.extend_from_slice(&frame.input);
    }
    let bytes = Tensor::from_slice(&pixels).reshape([count as i64, side, side, 3]).to_device(model.device());
    let images = crate::data::preprocess::normalise_bytes(&bytes);
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
mod tests {
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

    fn tiny_model(version: u64, side: i64) -> EfficientAd {
        use crate::model::config::{Preset, Recipe};
        let recipe = Recipe { image_size: side, channels: 8, ..Recipe::preset(Preset::Dfsc) };
        let mut model = EfficientAd::new(recipe, Device::Cpu).unwrap();
        model.map_quantiles = Some(crate::model::MapQuantiles { student_teacher: (0.0, 1.0), autoencoder: (0.0, 1.0) });
        model.info.model_version = version;
        model
    }

    fn prepared(tracker: &crate::service::ack::OffsetTracker, offset: i64) -> PreparedFrame {
        use crate::service::frame::{CameraInfo, FrameMeta, SourcePosition, StageTimings};
        let tp = crate::service::ack::TopicPartition { topic: "frames".into(), partition: 0 };
        PreparedFrame {
            meta: FrameMeta {
                frame_id: format!("f{offset}"),
                line: "l".into(),
                source: SourcePosition { topic: "frames".into(), partition: 0, offset },
                headers: vec![],
                received_at: Instant::now(),
                timings: StageTimings::default(),
            },
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
    }

    fn start_stage(
        model: EfficientAd,
        precision: Precision,
        max_batch: usize,
        health: Arc<LineHealth>,
    ) -> RunningStage {
        let (to_infer, input) = crossbeam_channel::bounded(8);
        let (to_sink, output) = mpsc::channel(8);
        let metrics = crate::service::metrics::Metrics::new().unwrap().line("l");
        let batching = Batching { max_batch, max_wait: Duration::from_millis(1) };
        let (stage, swapper) = spawn(model, precision, batching, input, to_sink, metrics, health).unwrap();
        RunningStage { to_infer, output, stage, swapper }
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
        let RunningStage { to_infer, mut output, stage, swapper } =
            start_stage(broken, Precision::F32, 1, health.clone());
        let scored = |item: Option<SinkItem>| match item {
            Some(SinkItem::Scored(frame)) => frame,
            other => panic!("expected a scored frame, got {other:?}"),
        };
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
            let RunningStage { to_infer, mut output, stage, swapper } =
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
            let bytes = Tensor::from_slice(&input).reshape([1, 128, 128, 3]);
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
        let RunningStage { to_infer, mut output, stage, swapper } =
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
