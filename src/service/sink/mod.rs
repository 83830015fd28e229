//! The sink: publishes each frame's outputs and only then acknowledges the frame, which lets the source
//! commit its offset (see `ack`).
//!
//! - scored frame → a JSON [`ResultRecord`] on the results topic and, unless disabled, the anomaly map on
//!   the maps topic, both keyed by the frame id;
//! - scored frame below the retraining acceptance score (lines that retrain) → also the encoded image on
//!   the accepted topic, keyed by frame id, for the line's trainer (see `retrain`), at most one frame per
//!   `60 / accept_per_minute` seconds (see [`AcceptancePacer`]);
//! - rejected frame → the original bytes and headers on the dead-letter topic, plus `lineguard_error*`
//!   headers saying why, keyed by the frame id (nothing is lost: the record can be fixed and replayed);
//!   without the bytes when the topic refuses them as too large (see `publish_rejected`).
//!
//! Every record goes through the line's [`publisher::Publisher`], which retries until the broker
//! acknowledges and replaces a producer that stalled or failed fatally with a fresh client. A publish
//! error that no retry clears costs an optional output (map, accepted frame) only that output; for a
//! required one (result, dead letter) the frame stays uncommitted and the line reports itself unable to
//! progress (`/healthz`), or, when fresh producers failed fatally again and again, the sink ends with the
//! error, which ends the line.
//!
//! Records are keyed by frame id, so a frame processed twice (after a crash or a rebalance, the price of
//! at-least-once without transactions) produces the same key twice and consumers can keep the last.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::service::frame::{
    CameraInfo, RejectReason, RejectedFrame, ScoredFrame, SinkItem, SourcePosition, StageTimings,
};
use crate::service::kafka::{to_owned_headers, Permanent, PublishError};
use crate::service::metrics::{LineHealth, LineMetrics, Output, Queue};
use crate::service::settings::MapFormat;

pub mod publisher;

use publisher::Publisher;

pub const RESULT_SCHEMA: &str = "lineguard.result.v1";
pub const HEADER_ERROR_REASON: &str = "lineguard_error_reason";
pub const HEADER_ERROR: &str = "lineguard_error";
pub const HEADER_SOURCE_TOPIC: &str = "lineguard_source_topic";
pub const HEADER_SOURCE_PARTITION: &str = "lineguard_source_partition";
pub const HEADER_SOURCE_OFFSET: &str = "lineguard_source_offset";
/// On a dead letter sent without its payload (too large for the topic): the payload's size in bytes.
pub const HEADER_PAYLOAD_OMITTED: &str = "lineguard_payload_omitted";
pub const HEADER_MAP_FORMAT: &str = "lineguard_map_format";
pub const HEADER_MAP_WIDTH: &str = "lineguard_map_width";
pub const HEADER_MAP_HEIGHT: &str = "lineguard_map_height";
pub const HEADER_MODEL_VERSION: &str = "lineguard_model_version";
pub const HEADER_SCORE: &str = "lineguard_score";

#[derive(Debug, Clone)]
pub struct SinkConfig {
    pub line: String,
    pub results_topic: String,
    pub maps_topic: Option<String>,
    pub dead_letter_topic: String,
    pub threshold: f32,
    pub map_format: MapFormat,
    /// Where confidently normal frames go for retraining, and below which score.
    pub acceptance: Option<Acceptance>,
}

#[derive(Debug, Clone)]
pub struct Acceptance {
    pub topic: String,
    pub below: f32,
    pub per_minute: f64,
}

/// Spaces accepted frames in time: a frame below the acceptance score is published when at least
/// `60 / per_minute` seconds passed since the last one, else only counted. Spacing rather than a burst
/// allowance, so the replay buffer samples the line evenly over time instead of in clumps.
#[derive(Debug)]
pub struct AcceptancePacer {
    interval: Duration,
    next_at: Option<Instant>,
}

impl AcceptancePacer {
    pub fn new(per_minute: f64) -> AcceptancePacer {
        // Settings validation keeps `per_minute` finite and positive; the floor keeps a rate of zero or
        // NaN, should one get past it, from making `Duration::from_secs_f64` panic.
        AcceptancePacer { interval: Duration::from_secs_f64(60.0 / per_minute.max(1e-6)), next_at: None }
    }

    /// Whether a frame below the acceptance score at `now` is published.
    pub fn admit(&mut self, now: Instant) -> bool {
        if self.next_at.is_some_and(|next| now < next) {
            return false;
        }
        self.next_at = Some(now + self.interval);
        true
    }
}

/// The JSON value of a results-topic record.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct ResultRecord {
    pub schema: String,
    pub frame_id: String,
    /// The pipeline line that scored it.
    pub line: String,
    #[serde(flatten)]
    pub camera: CameraFields,
    /// The maximum of the anomaly map; `null` when the model's output was not finite.
    pub score: Option<f32>,
    pub threshold: f32,
    /// `anomalous` when `score > threshold`, `normal` when not, `error` when the model gave no usable
    /// score (see `error`): an error is never `normal` and never becomes training data.
    pub verdict: String,
    /// Why the frame has no verdict, for `verdict = "error"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub model_version: u64,
    pub image_width: u32,
    pub image_height: u32,
    /// Where the anomaly map went, if anywhere.
    pub map_topic: Option<String>,
    pub source: SourceFields,
    pub batch_size: usize,
    /// Milliseconds per stage, and from consumption to publishing this record.
    pub timings_ms: TimingFields,
    pub published_at_ms: i64,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct CameraFields {
    pub camera_id: String,
    pub line_id: String,
    pub captured_at_ms: i64,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct SourceFields {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct TimingFields {
    pub queue: f64,
    pub preprocess: f64,
    pub batch_wait: f64,
    pub inference: f64,
    pub in_pipeline: f64,
}

impl TimingFields {
    fn new(timings: &StageTimings, in_pipeline: Duration) -> TimingFields {
        let ms = |s: f64| (s * 1e5).round() / 100.0;
        TimingFields {
            queue: ms(timings.queue),
            preprocess: ms(timings.preprocess),
            batch_wait: ms(timings.batch_wait),
            inference: ms(timings.inference),
            in_pipeline: ms(in_pipeline.as_secs_f64()),
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Runs until every sender of `input` is gone (all upstream stages finished) and every started publish
/// is acknowledged.
pub async fn run(
    config: SinkConfig,
    publisher: Publisher,
    mut input: mpsc::Receiver<SinkItem>,
    metrics: LineMetrics,
    health: Arc<LineHealth>,
) -> Result<(), String> {
    let config = Arc::new(config);
    let publisher = Arc::new(publisher);
    // Dropped (aborted) with the sink, whichever way it ends.
    let mut watchdog = JoinSet::new();
    watchdog.spawn({
        let publisher = publisher.clone();
        async move { publisher.watch_for_stalls().await }
    });
    let mut pacer = config.acceptance.as_ref().map(|acceptance| AcceptancePacer::new(acceptance.per_minute));
    let mut publishing = JoinSet::new();
    loop {
        let item = tokio::select! {
            item = input.recv() => match item {
                Some(item) => item,
                None => break,
            },
            // Reaped as they finish, so the set does not grow with the stream and a fatal producer error
            // ends the sink at once (dropping the set aborts the other publishes; their frames stay
            // uncommitted).
            Some(done) = publishing.join_next() => {
                finished(done)?;
                continue;
            }
        };
        metrics.queue_depth(Queue::Sink, input.len());
        // Decided here, in arrival order, so the pacer needs no lock.
        let accept = match (&item, &config.acceptance, pacer.as_mut()) {
            (SinkItem::Scored(frame), Some(acceptance), Some(pacer)) if frame.is_acceptable(acceptance.below) => {
                let admitted = pacer.admit(Instant::now());
                if !admitted {
                    metrics.acceptance_paced();
                }
                admitted
            }
            _ => false,
        };
        let (config, publisher, metrics, health) = (config.clone(), publisher.clone(), metrics.clone(), health.clone());
        publishing.spawn(async move {
            match item {
                SinkItem::Scored(frame) => publish_scored(&config, &publisher, frame, accept, &metrics, &health).await,
                SinkItem::Rejected(frame) => publish_rejected(&config, &publisher, frame, &metrics, &health).await,
            }
        });
    }
    while let Some(done) = publishing.join_next().await {
        finished(done)?;
    }
    Ok(())
}

/// A publish's outcome: a panic costs its frame only (uncommitted, consumed again); producers that keep
/// failing fatally end the sink.
fn finished(done: Result<Result<(), String>, tokio::task::JoinError>) -> Result<(), String> {
    match done {
        Ok(outcome) => outcome,
        Err(err) => {
            log::error!("a publish task failed: {err}; its frame stays uncommitted and will be consumed again");
            Ok(())
        }
    }
}

async fn publish_scored(
    config: &SinkConfig,
    publisher: &Publisher,
    frame: ScoredFrame,
    accept: bool,
    metrics: &LineMetrics,
    health: &LineHealth,
) -> Result<(), String> {
    let started = Instant::now();
    let judged = frame.is_judged();
    let ScoredFrame {
        meta,
        camera,
        original_size,
        score,
        non_finite,
        map,
        map_side,
        display_range,
        model_version,
        batch_size,
        payload,
        ack,
    } = frame;
    let anomalous = judged && score > config.threshold;
    let verdict = match (judged, anomalous) {
        (false, _) => "error",
        (true, true) => "anomalous",
        (true, false) => "normal",
    };
    let error = (!judged).then(|| {
        format!(
            "the model's anomaly map holds {non_finite} non-finite values (NaN or infinity): no verdict; check \
             the model (version {model_version})"
        )
    });
    // No picture of a broken map.
    let maps_topic = config.maps_topic.as_ref().filter(|_| judged);
    let CameraInfo { camera_id, line_id, captured_at_ms } = camera;
    let record = ResultRecord {
        schema: RESULT_SCHEMA.into(),
        frame_id: meta.frame_id.clone(),
        line: config.line.clone(),
        camera: CameraFields { camera_id, line_id, captured_at_ms },
        score: judged.then_some(score),
        threshold: config.threshold,
        verdict: verdict.into(),
        error,
        model_version,
        image_width: original_size.0,
        image_height: original_size.1,
        map_topic: maps_topic.cloned(),
        source: SourceFields {
            topic: meta.source.topic.clone(),
            partition: meta.source.partition,
            offset: meta.source.offset,
        },
        batch_size,
        timings_ms: TimingFields::new(&meta.timings, meta.received_at.elapsed()),
        published_at_ms: now_ms(),
    };
    let json = serde_json::to_vec(&record).unwrap_or_default();
    let version = model_version.to_string();
    let result_headers = to_owned_headers([(HEADER_MODEL_VERSION, version.as_bytes())]);
    let key = meta.frame_id.as_str();
    let result = publisher.send_until_delivered(&config.results_topic, key, &json, &result_headers, |_| {
        metrics.publish_failed(Output::Results)
    });
    let accepted = async {
        let (true, Some(acceptance), Some(image)) = (accept, &config.acceptance, &payload) else { return Ok(()) };
        let (partition, offset, score_text) =
            (meta.source.partition.to_string(), meta.source.offset.to_string(), score.to_string());
        let context = [
            (HEADER_SCORE, score_text.as_bytes()),
            (HEADER_MODEL_VERSION, version.as_bytes()),
            (HEADER_SOURCE_TOPIC, meta.source.topic.as_bytes()),
            (HEADER_SOURCE_PARTITION, partition.as_bytes()),
            (HEADER_SOURCE_OFFSET, offset.as_bytes()),
        ];
        let original = meta.headers.iter().map(|(k, v)| (k.as_str(), v.as_slice()));
        let headers = to_owned_headers(original.chain(context));
        publisher
            .send_until_delivered(&acceptance.topic, key, image, &headers, |_| metrics.publish_failed(Output::Accepted))
            .await?;
        metrics.frame_accepted();
        Ok(())
    };
    let map = async {
        let Some(maps_topic) = maps_topic else { return Ok(()) };
        let format = config.map_format;
        // PNG encoding is CPU work: keep it off the async runtime threads.
        let encoded = tokio::task::spawn_blocking(move || encode_map(&map, map_side, display_range, format)).await;
        let (format_name, bytes) = match encoded {
            Ok(encoded) => encoded,
            // A panic while encoding is a bug, not the frame's fault: the result still goes out.
            Err(err) => {
                log::error!("encoding the map of {key} failed: {err}; no map for this frame");
                return Ok(());
            }
        };
        let side = map_side.to_string();
        let map_headers = to_owned_headers([
            (HEADER_MAP_FORMAT, format_name.as_bytes()),
            (HEADER_MAP_WIDTH, side.as_bytes()),
            (HEADER_MAP_HEIGHT, side.as_bytes()),
            (HEADER_MODEL_VERSION, version.as_bytes()),
        ]);
        publisher
            .send_until_delivered(maps_topic, key, &bytes, &map_headers, |_| metrics.publish_failed(Output::Maps))
            .await
    };
    let (result, accepted, map) = tokio::join!(result, accepted, map);
    if let Err(err) = result {
        // Without its result the frame must not be committed; the line cannot go on (see `refused`).
        return refused(publisher, health, err);
    }
    // Maps and accepted frames are optional outputs: a permanent failure costs that output only.
    for failed in [accepted, map].into_iter().filter_map(Result::err) {
        log::error!("{failed}; the frame's result is published, this output is skipped");
    }
    if judged {
        metrics.frame_scored(score, anomalous, &meta.timings, started.elapsed());
    } else {
        metrics.frame_rejected(RejectReason::NonFiniteOutput);
    }
    metrics.frame_done(meta.received_at.elapsed(), capture_latency(captured_at_ms));
    ack.delivered();
    Ok(())
}

/// A dead letter holds the original payload when it fits; when the producer or the topic refuses the
/// record as too large, it goes again without the payload, with `lineguard_payload_omitted` (the
/// payload's size) and the source topic, partition and offset, where the bytes can still be read while
/// the input topic retains them. So every dead letter is publishable and a large bad message cannot
/// stop the line.
async fn publish_rejected(
    config: &SinkConfig,
    publisher: &Publisher,
    frame: RejectedFrame,
    metrics: &LineMetrics,
    health: &LineHealth,
) -> Result<(), String> {
    let RejectedFrame { meta, payload, reason, detail, ack } = frame;
    let SourcePosition { topic, partition, offset } = &meta.source;
    let (partition, offset, size) = (partition.to_string(), offset.to_string(), payload.len().to_string());
    let context = [
        (HEADER_ERROR_REASON, reason.as_str().as_bytes()),
        (HEADER_ERROR, detail.as_bytes()),
        (HEADER_SOURCE_TOPIC, topic.as_bytes()),
        (HEADER_SOURCE_PARTITION, partition.as_bytes()),
        (HEADER_SOURCE_OFFSET, offset.as_bytes()),
    ];
    let original = || meta.headers.iter().map(|(k, v)| (k.as_str(), v.as_slice()));
    let headers = to_owned_headers(original().chain(context));
    let mut published = publisher
        .send_until_delivered(&config.dead_letter_topic, &meta.frame_id, &payload, &headers, |_| {
            metrics.publish_failed(Output::DeadLetter)
        })
        .await;
    if let Err(PublishError { kind: Permanent::TooLarge, .. }) = &published {
        log::warn!(
            "the dead letter of {} is too large for {} with its {} payload bytes; publishing it without them",
            meta.frame_id,
            config.dead_letter_topic,
            payload.len()
        );
        let headers = to_owned_headers(original().chain(context).chain([(HEADER_PAYLOAD_OMITTED, size.as_bytes())]));
        published = publisher
            .send_until_delivered(&config.dead_letter_topic, &meta.frame_id, &[], &headers, |_| {
                metrics.publish_failed(Output::DeadLetter)
            })
            .await;
    }
    if let Err(err) = published {
        return refused(publisher, health, err);
    }
    metrics.frame_done(meta.received_at.elapsed(), None);
    ack.delivered();
    Ok(())
}

/// A required output (a result, a dead letter) that no retry can publish: the frame stays uncommitted,
/// so nothing is lost, and the line is marked broken, which turns `/healthz` to 503 so the orchestrator
/// restarts the process and the operator sees why in its log (authorisation, a missing or invalid topic).
/// Producers that failed fatally one after the other, fresh ones included, will publish nothing more,
/// whatever an operator fixes: that ends the sink (the error), and the line with it, rather than wait for
/// a liveness probe.
fn refused(publisher: &Publisher, health: &LineHealth, err: PublishError) -> Result<(), String> {
    health.publish_refused.store(true, Ordering::Relaxed);
    if err.kind == Permanent::Fatal {
        let reason = publisher.fatal_reason(&err.source).unwrap_or_else(|| err.source.to_string());
        return Err(format!("the producer failed fatally: {reason}"));
    }
    log::error!("{err}; the frame stays uncommitted and this line cannot make progress until that is fixed");
    Ok(())
}

fn capture_latency(captured_at_ms: i64) -> Option<Duration> {
    // A camera clock ahead of ours would give nonsense: report nothing rather than a negative latency.
    // The header is the camera's word: a value near i64::MIN must not overflow (a panic here, after the
    // result went out, would leave the frame unacknowledged and hold the line's commits on it).
    let age = now_ms().checked_sub(captured_at_ms)?;
    u64::try_from(age).ok().map(Duration::from_millis)
}

/// The map as the configured format: a colourised PNG (values from `range.0` transparent-dark to
/// `range.1` bright) or raw little-endian f16.
pub fn encode_map(map: &[f32], side: u32, range: (f32, f32), format: MapFormat) -> (&'static str, Vec<u8>) {
    match format {
        MapFormat::F16 => ("f16", map.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect()),
        MapFormat::Png | MapFormat::None => {
            use image::ImageEncoder;
            let mut pixels = crate::eval::heatmap::colourise(map, range);
            // A short map (never from the inference stage) is padded dark rather than refused.
            pixels.resize(3 * (side * side) as usize, 0);
            let mut bytes = Vec::new();
            // fdeflate's fast mode, which `image` also picks by default: a 256 px map takes 0.58 ms in all,
            // where the balanced level takes 15.7 ms for 13% fewer bytes (`cargo bench --bench maps`).
            // Writing a PNG into memory only fails on allocation failure.
            let encoder = image::codecs::png::PngEncoder::new_with_quality(
                &mut bytes,
                image::codecs::png::CompressionType::Fast,
                image::codecs::png::FilterType::Adaptive,
            );
            if let Err(err) = encoder.write_image(&pixels, side, side, image::ExtendedColorType::Rgb8) {
                log::error!("cannot encode a heatmap PNG: {err}");
            }
            ("png", bytes)
        }
    }
}

/// Decodes an f16 map record back into values (for consumers written in Rust, and the tests).
pub fn decode_f16_map(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(2).map(|pair| half::f16::from_le_bytes([pair[0], pair[1]]).to_f32()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_encode_as_png_or_f16() {
        let map: Vec<f32> = (0..16).map(|i| i as f32 / 16.0).collect();
        let (name, png) = encode_map(&map, 4, (0.0, 1.0), MapFormat::Png);
        assert_eq!(name, "png");
        let decoded = image::load_from_memory(&png).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (4, 4));
        let (name, raw) = encode_map(&map, 4, (0.0, 1.0), MapFormat::F16);
        assert_eq!(name, "f16");
        assert_eq!(raw.len(), 32);
        let back = decode_f16_map(&raw);
        for (a, b) in map.iter().zip(&back) {
            assert!((a - b).abs() < 1e-3, "{a} vs {b}");
        }
    }

    #[test]
    fn accepted_frames_are_spaced_by_the_pacer_interval() {
        let mut pacer = AcceptancePacer::new(30.0);
        let start = Instant::now();
        let at = |seconds: f64| start + Duration::from_secs_f64(seconds);
        // A frame every 0.5 s for 10 s: one every 2 s passes, the first at once.
        let admitted: Vec<f64> = (0..20).map(|i| f64::from(i) * 0.5).filter(|&t| pacer.admit(at(t))).collect();
        assert_eq!(admitted, [0.0, 2.0, 4.0, 6.0, 8.0]);
        // After a quiet spell the next frame passes, and only one: no burst allowance builds up.
        assert!(pacer.admit(at(60.0)));
        assert!(!pacer.admit(at(60.1)));
        // A rate that validation refuses makes a pacer that admits almost nothing, not a panic.
        for refused in [0.0, f64::NAN] {
            let mut pacer = AcceptancePacer::new(refused);
            assert!(pacer.admit(start) && !pacer.admit(at(3600.0)));
        }
    }

    #[test]
    fn capture_latency_ignores_clocks_ahead_of_ours() {
        assert!(capture_latency(now_ms() + 60_000).is_none());
        assert!(capture_latency(i64::MAX).is_none());
        assert!(capture_latency(i64::MIN).is_none(), "no overflow");
        assert!(capture_latency(now_ms() - 1_000).unwrap() >= Duration::from_millis(1_000));
    }

    /// A real producer in the state that an idempotent producer reaches when the broker refuses its
    /// sequence (the broker restarted without its state). Before, the line stopped (and earlier still, it
    /// waited, unable to publish, for a liveness probe); now a fresh producer publishes the dead letter and
    /// the frame is acknowledged.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_producer_that_failed_fatally_is_replaced_and_the_frame_is_published_and_acknowledged() {
        use crate::service::ack::{OffsetTracker, TopicPartition};
        use crate::service::frame::FrameMeta;

        let (_cluster, kafka) = crate::service::kafka::mock_cluster_with("dead-letter", &[]);
        let metrics = crate::service::metrics::Metrics::new().unwrap().line("l");
        let config = crate::service::kafka::producer_config(&kafka);
        let publisher = Publisher::new(config, "l", metrics.clone(), Some(Duration::from_secs(30))).unwrap();
        publisher.fail_fatally();

        let tracker = OffsetTracker::new();
        let tp = TopicPartition { topic: "frames".into(), partition: 0 };
        tracker.assign(tp.clone());
        let meta = FrameMeta::for_test("f0", "l", 0);
        let ack = tracker.register(tp, 0, None);
        let rejected =
            RejectedFrame { meta, payload: b"bytes".to_vec(), reason: RejectReason::Empty, detail: "".into(), ack };
        let (to_sink, input) = mpsc::channel(1);
        to_sink.send(SinkItem::Rejected(rejected)).await.unwrap();
        drop(to_sink);
        let config = SinkConfig {
            line: "l".into(),
            results_topic: "results".into(),
            maps_topic: None,
            dead_letter_topic: "dead-letter".into(),
            threshold: 0.5,
            map_format: MapFormat::None,
            acceptance: None,
        };
        let health = Arc::new(LineHealth::default());
        let outcome =
            tokio::time::timeout(Duration::from_secs(60), run(config, publisher, input, metrics, health.clone()))
                .await
                .expect("the sink ends");
        assert_eq!(outcome, Ok(()));
        assert!(!health.publish_refused.load(Ordering::Relaxed));
        assert_eq!(tracker.in_flight(), 0, "the frame is acknowledged");
    }
}
