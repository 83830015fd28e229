//! The events of one line's serving stages: one method per occurrence, with the line's label bound.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{Histogram, IntCounter, IntGauge};

use super::{Metrics, Output, ProducerReplacement, Queue, Stage};
use crate::service::frame::{RejectReason, StageTimings};

impl Metrics {
    /// The event methods of one line, with its label bound.
    pub fn line(self: &Arc<Self>, line: &str) -> LineMetrics {
        let l = [line];
        for reason in RejectReason::ALL {
            // Zero-initialised series make `rate()` work from the first failure on.
            self.frames_failed.with_label_values(&[line, reason.as_str()]);
        }
        for output in Output::ALL {
            self.publish_errors.with_label_values(&[line, output.as_str()]);
        }
        for reason in ProducerReplacement::ALL {
            self.producer_replacements.with_label_values(&[line, "outputs", reason.as_str()]);
        }
        for result in ["ok", "error"] {
            self.offset_commits.with_label_values(&[line, result]);
        }
        // Pacing leaves frames out only on a busy line, perhaps never: its series must still exist.
        self.acceptance_paced.with_label_values(&l);
        LineMetrics {
            metrics: self.clone(),
            line: line.to_string(),
            received: self.frames_received.with_label_values(&l),
            normal: self.frames_scored.with_label_values(&[line, "normal"]),
            anomalous: self.frames_scored.with_label_values(&[line, "anomalous"]),
            end_to_end: self.end_to_end.with_label_values(&l),
            capture_to_result: self.capture_to_result.with_label_values(&l),
            in_flight: self.in_flight.with_label_values(&l),
            batch_size: self.batch_size.with_label_values(&l),
            score: self.anomaly_score.with_label_values(&l),
            model_version: self.model_version.with_label_values(&l),
            assigned: self.partitions_assigned.with_label_values(&l),
            paused: self.consumer_paused.with_label_values(&l),
        }
    }
}

#[derive(Clone)]
pub struct LineMetrics {
    metrics: Arc<Metrics>,
    line: String,
    received: IntCounter,
    normal: IntCounter,
    anomalous: IntCounter,
    end_to_end: Histogram,
    capture_to_result: Histogram,
    in_flight: IntGauge,
    batch_size: Histogram,
    score: Histogram,
    model_version: IntGauge,
    assigned: IntGauge,
    paused: IntGauge,
}

impl LineMetrics {
    pub fn frame_received(&self) {
        self.received.inc();
    }

    pub fn frame_rejected(&self, reason: RejectReason) {
        self.metrics.frames_failed.with_label_values(&[self.line.as_str(), reason.as_str()]).inc();
    }

    fn stage(&self, stage: Stage, seconds: f64) {
        self.metrics.stage_duration.with_label_values(&[self.line.as_str(), stage.as_str()]).observe(seconds);
    }

    /// A frame's results are acknowledged by the broker.
    pub fn frame_scored(&self, score: f32, anomalous: bool, timings: &StageTimings, publish: Duration) {
        if anomalous { &self.anomalous } else { &self.normal }.inc();
        self.score.observe(score as f64);
        self.stage(Stage::Queue, timings.queue);
        self.stage(Stage::Preprocess, timings.preprocess);
        self.stage(Stage::BatchWait, timings.batch_wait);
        self.stage(Stage::Inference, timings.inference);
        self.stage(Stage::Publish, publish.as_secs_f64());
    }

    /// Every output of a frame (scored or dead-lettered) is acknowledged.
    pub fn frame_done(&self, end_to_end: Duration, capture_to_result: Option<Duration>) {
        self.end_to_end.observe(end_to_end.as_secs_f64());
        if let Some(latency) = capture_to_result {
            self.capture_to_result.observe(latency.as_secs_f64());
        }
    }

    pub fn batch_run(&self, size: usize) {
        self.batch_size.observe(size as f64);
    }

    pub fn model_loaded(&self, version: u64, created_unix: u64) {
        self.model_version.set(version as i64);
        self.metrics.model_created.with_label_values(&[self.line.as_str()]).set(created_unix as i64);
        self.model_age_tick();
    }

    /// Refreshes the model-age gauge (called periodically).
    pub fn model_age_tick(&self) {
        let created = self.metrics.model_created.with_label_values(&[self.line.as_str()]).get();
        if created > 0 {
            self.metrics
                .model_age
                .with_label_values(&[self.line.as_str()])
                .set(crate::model::unix_seconds() as i64 - created);
        }
    }

    pub fn frame_accepted(&self) {
        self.metrics.frames_accepted.with_label_values(&[self.line.as_str()]).inc();
    }

    pub fn acceptance_paced(&self) {
        self.metrics.acceptance_paced.with_label_values(&[self.line.as_str()]).inc();
    }

    /// Reported by the stage that reads the queue, each time it takes an item.
    pub fn queue_depth(&self, queue: Queue, depth: usize) {
        self.metrics.queue_depth.with_label_values(&[self.line.as_str(), queue.as_str()]).set(depth as i64);
    }

    pub fn frames_in_flight(&self, count: usize) {
        self.in_flight.set(count as i64);
    }

    pub fn oldest_unacknowledged(&self, age: Option<Duration>) {
        let seconds = age.map_or(0.0, |age| age.as_secs_f64());
        self.metrics.oldest_unacknowledged.with_label_values(&[self.line.as_str()]).set(seconds);
    }

    pub fn consumer_lag(&self, topic: &str, partition: i32, lag: i64) {
        self.metrics.consumer_lag.with_label_values(&[self.line.as_str(), topic, &partition.to_string()]).set(lag);
    }

    pub fn partitions_assigned(&self, count: usize) {
        self.assigned.set(count as i64);
    }

    pub fn consumer_paused(&self, paused: bool) {
        self.paused.set(paused as i64);
    }

    pub fn offsets_committed(&self, ok: bool) {
        self.metrics.offset_commits.with_label_values(&[self.line.as_str(), if ok { "ok" } else { "error" }]).inc();
    }

    pub fn publish_failed(&self, output: Output) {
        self.metrics.publish_errors.with_label_values(&[self.line.as_str(), output.as_str()]).inc();
    }

    /// The producer of the line's outputs was replaced (see `sink::publisher`).
    pub fn producer_replaced(&self, reason: ProducerReplacement) {
        self.metrics.producer_replacements.with_label_values(&[self.line.as_str(), "outputs", reason.as_str()]).inc();
    }
}
