//! The typed messages that flow between stages, in order:
//!
//! `source` → [`RawFrame`] → `preprocess` → [`PreparedFrame`] → `infer` → [`SinkItem::Scored`] → `sink`.
//! `preprocess` sends frames it cannot use straight to the sink as [`SinkItem::Rejected`] (dead-letter).
//!
//! Every frame carries its [`Ack`] until the sink has published its outputs, and its [`FrameMeta`] (who
//! sent it, where it came from, when each stage touched it) so the result can report stage timings.
//!
//! ## The input message contract
//! - value: one encoded image (JPEG or PNG);
//! - key: the frame id, UTF-8, at most [`MAX_ID_BYTES`] (without a key the frame id is
//!   `<topic>/<partition>/<offset>`, which is stable across redeliveries, so results stay idempotent);
//! - headers: `camera_id` (required, UTF-8), `captured_at_ms` (required, Unix epoch milliseconds, decimal),
//!   `line_id` (optional, defaults to the pipeline's line name); ids at most [`MAX_ID_BYTES`].

use std::time::Instant;

use crate::service::ack::Ack;

pub const HEADER_CAMERA: &str = "camera_id";
pub const HEADER_CAPTURED_AT: &str = "captured_at_ms";
pub const HEADER_LINE: &str = "line_id";

/// The longest frame id (the key), `camera_id` or `line_id`, in bytes. The result repeats them, and a
/// result that no topic takes would hold its frame uncommitted, stopping the line on it: longer ones make
/// the frame a dead letter instead. Real ids are tens of bytes.
pub const MAX_ID_BYTES: usize = 256;

/// Where a frame was consumed from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SourcePosition {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

#[derive(Debug, Clone)]
pub struct FrameMeta {
    pub frame_id: String,
    /// The pipeline's line (the `[lines.<name>]` table), which owns the model and the metrics label.
    pub line: String,
    pub source: SourcePosition,
    /// All headers as received, kept for the dead-letter record.
    pub headers: Vec<(String, Vec<u8>)>,
    pub received_at: Instant,
    pub timings: StageTimings,
}

impl FrameMeta {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_slice())
    }

    /// A frame of line `line` consumed from partition 0 of `frames` at `offset`, without headers: what one
    /// stage's unit tests feed it.
    #[cfg(test)]
    pub(crate) fn for_test(frame_id: &str, line: &str, offset: i64) -> FrameMeta {
        FrameMeta {
            frame_id: frame_id.into(),
            line: line.into(),
            source: SourcePosition { topic: "frames".into(), partition: 0, offset },
            headers: vec![],
            received_at: Instant::now(),
            timings: StageTimings::default(),
        }
    }
}

/// Seconds spent in each stage (filled as the frame moves on).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct StageTimings {
    /// Waiting for a decoding worker.
    pub queue: f64,
    pub preprocess: f64,
    /// Waiting for the inference thread and for the batch to fill.
    pub batch_wait: f64,
    /// The batch's forward pass (shared by the frames of the batch).
    pub inference: f64,
}

/// Consumed, not yet looked at.
#[derive(Debug)]
pub struct RawFrame {
    pub meta: FrameMeta,
    pub payload: Vec<u8>,
    /// The length of a key too long to be the frame id ([`MAX_ID_BYTES`]): the frame id is then the
    /// source position, and the frame a dead letter.
    pub oversized_key: Option<usize>,
    pub ack: Ack,
}

/// What the camera headers say about a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CameraInfo {
    pub camera_id: String,
    pub line_id: String,
    pub captured_at_ms: i64,
}

/// Decoded and resized, ready for the model.
#[derive(Debug)]
pub struct PreparedFrame {
    pub meta: FrameMeta,
    pub camera: CameraInfo,
    /// Interleaved RGB bytes resized to the model's side (`data::preprocess::resized_rgb`); the inference
    /// stage normalises them on the model's device (a quarter of the bytes of f32 inputs to copy there).
    pub input: Vec<u8>,
    pub original_size: (u32, u32),
    pub prepared_at: Instant,
    /// The encoded image, kept only on lines that retrain (an accepted frame is published as received).
    pub payload: Option<Vec<u8>>,
    pub ack: Ack,
}

#[derive(Debug)]
pub struct ScoredFrame {
    pub meta: FrameMeta,
    pub camera: CameraInfo,
    pub original_size: (u32, u32),
    /// Maximum of the anomaly map; NaN when the map holds non-finite values.
    pub score: f32,
    /// Non-finite (NaN or infinite) values in the map: a broken model, never a verdict.
    pub non_finite: usize,
    /// Normalised anomaly map at the model's resolution, row-major `map_side`².
    pub map: Vec<f32>,
    pub map_side: u32,
    /// The map values drawn from transparent to fully coloured in heatmap pictures.
    pub display_range: (f32, f32),
    pub model_version: u64,
    pub batch_size: usize,
    /// The encoded image on lines that retrain (see [`PreparedFrame::payload`]).
    pub payload: Option<Vec<u8>>,
    pub ack: Ack,
}

impl ScoredFrame {
    /// Whether the model's map of the frame is finite, so its score can give a verdict (otherwise the score
    /// is NaN and the frame gets an error result).
    pub fn is_judged(&self) -> bool {
        self.non_finite == 0
    }

    /// Whether the frame may teach the model: judged and scored below the acceptance score.
    pub fn is_acceptable(&self, accept_below: f32) -> bool {
        self.is_judged() && self.score < accept_below
    }
}

/// Why a frame got no verdict; the label of `lineguard_frames_failed_total`. Every reason but
/// `NonFiniteOutput` sends the frame to the dead-letter topic; that one is the model's fault, not the
/// frame's, and gives the frame an error result instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    Empty,
    Oversized,
    MissingHeader,
    BadHeader,
    /// The key, which is the frame id, is longer than [`MAX_ID_BYTES`].
    BadKey,
    Decode,
    /// The image's header declares more pixels than the line's limits: refused before decoding.
    TooLarge,
    WrongSize,
    /// The model's anomaly map held NaN or infinite values.
    NonFiniteOutput,
}

impl RejectReason {
    pub const ALL: [RejectReason; 9] = [
        RejectReason::Empty,
        RejectReason::Oversized,
        RejectReason::MissingHeader,
        RejectReason::BadHeader,
        RejectReason::BadKey,
        RejectReason::Decode,
        RejectReason::TooLarge,
        RejectReason::WrongSize,
        RejectReason::NonFiniteOutput,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Empty => "empty",
            RejectReason::Oversized => "oversized",
            RejectReason::MissingHeader => "missing_header",
            RejectReason::BadHeader => "bad_header",
            RejectReason::BadKey => "bad_key",
            RejectReason::Decode => "decode",
            RejectReason::TooLarge => "too_large",
            RejectReason::WrongSize => "wrong_size",
            RejectReason::NonFiniteOutput => "non_finite_output",
        }
    }
}

#[derive(Debug)]
pub struct RejectedFrame {
    pub meta: FrameMeta,
    pub payload: Vec<u8>,
    pub reason: RejectReason,
    /// A sentence for the operator, e.g. "missing header camera_id".
    pub detail: String,
    pub ack: Ack,
}

/// Everything the sink publishes.
#[derive(Debug)]
pub enum SinkItem {
    Scored(ScoredFrame),
    Rejected(RejectedFrame),
}
