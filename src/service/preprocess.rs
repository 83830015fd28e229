//! The preprocessing stage: a pool of OS threads (decoding is CPU work and must not stall the async
//! Kafka I/O) that checks each consumed frame against the message contract, decodes it and resizes it to
//! the model's side (RGB bytes; `infer` normalises them on the model's device). Usable frames go on to `infer`; the others go straight to the sink's dead-letter path
//! with the reason, so a bad message never stops the line.

use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use tokio::sync::mpsc;

use crate::data::preprocess::{decode_within, DecodeLimits};
use crate::error::ImageError;
use crate::service::frame::{
    CameraInfo, PreparedFrame, RawFrame, RejectReason, RejectedFrame, SinkItem, HEADER_CAMERA, HEADER_CAPTURED_AT,
    HEADER_LINE, MAX_ID_BYTES,
};
use crate::service::metrics::{LineMetrics, Queue};

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub workers: usize,
    /// The model's input side.
    pub side: u32,
    pub max_frame_bytes: usize,
    pub expected_size: Option<[u32; 2]>,
    pub decode_limits: DecodeLimits,
    /// Keep the encoded image with the prepared frame (lines that retrain publish accepted frames).
    pub keep_payload: bool,
}

pub fn spawn(
    config: PoolConfig,
    input: Receiver<RawFrame>,
    to_infer: Sender<PreparedFrame>,
    to_sink: mpsc::Sender<SinkItem>,
    metrics: LineMetrics,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    (0..config.workers.max(1))
        .map(|index| {
            let (config, input, to_infer, to_sink, metrics) =
                (config.clone(), input.clone(), to_infer.clone(), to_sink.clone(), metrics.clone());
            std::thread::Builder::new().name(format!("preprocess-{index}")).spawn(move || {
                // Ends when the source closes its side and the queue is empty (shutdown), or when the
                // next stage is gone.
                for frame in input.iter() {
                    metrics.queue_depth(Queue::Preprocess, input.len());
                    match prepare(&config, frame) {
                        Ok(prepared) => {
                            if to_infer.send(prepared).is_err() {
                                break;
                            }
                        }
                        Err(rejected) => {
                            metrics.frame_rejected(rejected.reason);
                            log::warn!(
                                "frame {} ({}/{}@{}) rejected: {}",
                                rejected.meta.frame_id,
                                rejected.meta.source.topic,
                                rejected.meta.source.partition,
                                rejected.meta.source.offset,
                                rejected.detail
                            );
                            if to_sink.blocking_send(SinkItem::Rejected(*rejected)).is_err() {
                                break;
                            }
                        }
                    }
                }
            })
        })
        .collect()
}

/// Checks, decodes and resizes one frame.
pub fn prepare(config: &PoolConfig, frame: RawFrame) -> Result<PreparedFrame, Box<RejectedFrame>> {
    let started = Instant::now();
    let RawFrame { mut meta, payload, oversized_key, ack } = frame;
    meta.timings.queue = started.duration_since(meta.received_at).as_secs_f64();
    let checked = check_contract(config, &meta.headers, &payload, oversized_key, &meta.line).and_then(|camera| {
        let image = decode_within(&payload, &meta.frame_id, &config.decode_limits).map_err(|err| {
            let reason = match err {
                ImageError::TooLarge { .. } => RejectReason::TooLarge,
                _ => RejectReason::Decode,
            };
            (reason, err.to_string())
        })?;
        if let Some([width, height]) = config.expected_size {
            if (image.width(), image.height()) != (width, height) {
                return Err((
                    RejectReason::WrongSize,
                    format!(
                        "image is {}x{}, this line expects {width}x{height} (lines.<name>.expected_size)",
                        image.width(),
                        image.height()
                    ),
                ));
            }
        }
        Ok((camera, image))
    });
    match checked {
        Ok((camera, image)) => {
            let original_size = (image.width(), image.height());
            let input = crate::data::preprocess::resized_rgb(&image, config.side);
            meta.timings.preprocess = started.elapsed().as_secs_f64();
            let payload = config.keep_payload.then_some(payload);
            Ok(PreparedFrame { meta, camera, input, original_size, prepared_at: Instant::now(), payload, ack })
        }
        Err((reason, detail)) => Err(Box::new(RejectedFrame { meta, payload, reason, detail, ack })),
    }
}

/// The message contract (see `frame`), before spending time on decoding.
fn check_contract(
    config: &PoolConfig,
    headers: &[(String, Vec<u8>)],
    payload: &[u8],
    oversized_key: Option<usize>,
    default_line: &str,
) -> Result<CameraInfo, (RejectReason, String)> {
    if let Some(len) = oversized_key {
        return Err((
            RejectReason::BadKey,
            format!("the key (the frame id) is {len} bytes, over the limit of {MAX_ID_BYTES}; this frame's id is its source position"),
        ));
    }
    if payload.is_empty() {
        return Err((RejectReason::Empty, "empty message (no image bytes)".into()));
    }
    if payload.len() > config.max_frame_bytes {
        return Err((
            RejectReason::Oversized,
            format!(
                "{} bytes, over the limit of {} (lines.<name>.max_frame_bytes)",
                payload.len(),
                config.max_frame_bytes
            ),
        ));
    }
    let header = |name: &str| headers.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_slice());
    let text = |name: &str| -> Result<Option<String>, (RejectReason, String)> {
        header(name)
            .map(|value| {
                let value = std::str::from_utf8(value)
                    .map(str::trim)
                    .map_err(|_| (RejectReason::BadHeader, format!("header {name} is not UTF-8")))?;
                if value.len() > MAX_ID_BYTES {
                    let len = value.len();
                    return Err((
                        RejectReason::BadHeader,
                        format!("header {name} is {len} bytes, over the limit of {MAX_ID_BYTES}"),
                    ));
                }
                Ok(value.to_string())
            })
            .transpose()
    };
    let camera_id = text(HEADER_CAMERA)?
        .filter(|s| !s.is_empty())
        .ok_or_else(|| (RejectReason::MissingHeader, format!("missing header {HEADER_CAMERA}")))?;
    let captured = text(HEADER_CAPTURED_AT)?
        .ok_or_else(|| (RejectReason::MissingHeader, format!("missing header {HEADER_CAPTURED_AT}")))?;
    let captured_at_ms = captured.parse::<i64>().map_err(|_| {
        (
            RejectReason::BadHeader,
            format!("header {HEADER_CAPTURED_AT} is {captured:?}, expected Unix epoch milliseconds"),
        )
    })?;
    let line_id = text(HEADER_LINE)?.filter(|s| !s.is_empty()).unwrap_or_else(|| default_line.to_string());
    Ok(CameraInfo { camera_id, line_id, captured_at_ms })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::ack::{OffsetTracker, TopicPartition};
    use crate::service::frame::FrameMeta;

    fn config() -> PoolConfig {
        PoolConfig {
            workers: 1,
            side: 32,
            max_frame_bytes: 100_000,
            expected_size: None,
            decode_limits: DecodeLimits::default(),
            keep_payload: false,
        }
    }

    fn encoded(width: u32, height: u32, format: image::ImageFormat) -> Vec<u8> {
        let mut bytes = Vec::new();
        image::RgbImage::from_pixel(width, height, image::Rgb([200, 10, 10]))
            .write_to(&mut std::io::Cursor::new(&mut bytes), format)
            .unwrap();
        bytes
    }

    fn png(width: u32, height: u32) -> Vec<u8> {
        encoded(width, height, image::ImageFormat::Png)
    }

    fn jpeg(width: u32, height: u32) -> Vec<u8> {
        encoded(width, height, image::ImageFormat::Jpeg)
    }

    fn frame(payload: Vec<u8>, headers: &[(&str, &str)]) -> RawFrame {
        let tracker = OffsetTracker::new();
        let ack = tracker.register(TopicPartition { topic: "frames".into(), partition: 0 }, 0, None);
        RawFrame {
            meta: FrameMeta {
                headers: headers.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect(),
                ..FrameMeta::for_test("f1", "juice", 0)
            },
            payload,
            oversized_key: None,
            ack,
        }
    }

    const GOOD_HEADERS: &[(&str, &str)] = &[("camera_id", "cam-1"), ("captured_at_ms", "1700000000000")];

    fn reason(result: Result<PreparedFrame, Box<RejectedFrame>>) -> (RejectReason, String) {
        match result {
            Ok(_) => panic!("expected a rejection"),
            Err(rejected) => (rejected.reason, rejected.detail),
        }
    }

    #[test]
    fn a_valid_frame_is_resized_to_the_model_side() {
        let bytes = png(48, 40);
        let prepared = prepare(&config(), frame(bytes.clone(), GOOD_HEADERS)).unwrap();
        let decoded = crate::data::preprocess::decode(&bytes, "png").unwrap();
        assert_eq!(prepared.input, crate::data::preprocess::resized_rgb(&decoded, 32), "RGB bytes at 32x32");
        assert_eq!(prepared.original_size, (48, 40));
        assert_eq!(prepared.camera.camera_id, "cam-1");
        assert_eq!(prepared.camera.line_id, "juice", "line defaults to the pipeline's line");
        assert_eq!(prepared.camera.captured_at_ms, 1_700_000_000_000);
    }

    #[test]
    fn every_contract_violation_has_its_reason() {
        let cases: Vec<(RawFrame, RejectReason, &str)> = vec![
            (frame(vec![], GOOD_HEADERS), RejectReason::Empty, "empty"),
            (frame(vec![0; 100_001], GOOD_HEADERS), RejectReason::Oversized, "100001 bytes"),
            (frame(png(48, 40), &[("captured_at_ms", "1")]), RejectReason::MissingHeader, "camera_id"),
            (frame(png(48, 40), &[("camera_id", "c")]), RejectReason::MissingHeader, "captured_at_ms"),
            (frame(png(48, 40), &[("camera_id", "c"), ("captured_at_ms", "noon")]), RejectReason::BadHeader, "noon"),
            (frame(b"not an image at all".to_vec(), GOOD_HEADERS), RejectReason::Decode, "cannot decode"),
            (frame(png(48, 40)[..60].to_vec(), GOOD_HEADERS), RejectReason::Decode, "cannot decode"),
            (frame(jpeg(48, 40)[..200].to_vec(), GOOD_HEADERS), RejectReason::Decode, "truncated JPEG"),
        ];
        for (input, expected, needle) in cases {
            let (reason, detail) = reason(prepare(&config(), input));
            assert_eq!(reason, expected, "{detail}");
            assert!(detail.contains(needle), "{detail:?} should mention {needle:?}");
        }
    }

    /// The result repeats the frame id and the camera ids: bounded, so that no frame can make a result too
    /// large to publish (which would hold the line on that frame).
    #[test]
    fn ids_longer_than_the_limit_are_rejected_and_ids_at_the_limit_pass() {
        let at_limit = "c".repeat(MAX_ID_BYTES);
        let over = "c".repeat(MAX_ID_BYTES + 1);
        let with_ids = |camera: &str, line: &str| {
            frame(png(40, 40), &[("camera_id", camera), ("line_id", line), ("captured_at_ms", "1")])
        };
        assert!(prepare(&config(), with_ids(&at_limit, &at_limit)).is_ok());
        for (input, needle) in [(with_ids(&over, "l"), "camera_id"), (with_ids("c", &over), "line_id")] {
            let (reason, detail) = reason(prepare(&config(), input));
            assert_eq!(reason, RejectReason::BadHeader, "{detail}");
            assert!(detail.contains(needle) && detail.contains("257 bytes, over the limit of 256"), "{detail}");
        }
        let long_key = RawFrame { oversized_key: Some(600_000), ..frame(png(40, 40), GOOD_HEADERS) };
        let (reason, detail) = reason(prepare(&config(), long_key));
        assert_eq!(reason, RejectReason::BadKey, "{detail}");
        assert!(detail.contains("600000 bytes"), "{detail}");
    }

    #[test]
    fn wrong_size_is_rejected_only_when_a_size_is_expected() {
        let strict = PoolConfig { expected_size: Some([48, 48]), ..config() };
        let (reason, detail) = reason(prepare(&strict, frame(png(48, 40), GOOD_HEADERS)));
        assert_eq!(reason, RejectReason::WrongSize);
        assert!(detail.contains("48x40"), "{detail}");
        assert!(prepare(&strict, frame(png(48, 48), GOOD_HEADERS)).is_ok());
    }

    #[test]
    fn an_image_over_the_line_limits_is_too_large_not_a_decode_failure() {
        let small =
            PoolConfig { decode_limits: DecodeLimits { max_width: 64, max_height: 64, max_pixels: 2000 }, ..config() };
        let (reason, detail) = reason(prepare(&small, frame(png(48, 48), GOOD_HEADERS)));
        assert_eq!(reason, RejectReason::TooLarge);
        assert!(detail.contains("48x48") && detail.contains("2304 pixels, over 2000"), "{detail}");
        assert!(prepare(&small, frame(png(40, 40), GOOD_HEADERS)).is_ok());
    }

    #[test]
    fn the_pool_routes_good_and_bad_frames_and_stops_when_the_source_closes() {
        let (to_pool, pool_input) = crossbeam_channel::bounded(4);
        let (to_infer, infer_input) = crossbeam_channel::bounded(4);
        let (to_sink, mut sink_input) = mpsc::channel(4);
        let metrics = crate::service::metrics::Metrics::new().unwrap().line("juice");
        let workers = spawn(PoolConfig { workers: 2, ..config() }, pool_input, to_infer, to_sink, metrics).unwrap();
        to_pool.send(frame(png(40, 40), GOOD_HEADERS)).unwrap();
        to_pool.send(frame(vec![], GOOD_HEADERS)).unwrap();
        drop(to_pool);
        for worker in workers {
            worker.join().unwrap();
        }
        assert_eq!(infer_input.try_iter().count(), 1);
        match sink_input.try_recv() {
            Ok(SinkItem::Rejected(rejected)) => assert_eq!(rejected.reason, RejectReason::Empty),
            other => panic!("expected one rejection, got {other:?}"),
        }
    }
}
