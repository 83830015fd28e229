//! Prometheus metrics as typed events, and the HTTP endpoint that serves them with the health checks.
//!
//! Stages never touch metric objects directly: they call one method of [`LineMetrics`] per occurrence
//! (`frame_received`, `frame_rejected(reason)`, …), so names, labels and units live here only and label
//! values stay bounded (line names, fixed reasons and stage names, partitions).
//!
//! Endpoints: `/metrics` (Prometheus text format), `/healthz` (the process serves requests), `/readyz`
//! (every line has a model loaded and has joined its consumer group).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::frame::{RejectReason, StageTimings};

const LATENCY_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0];
const SCORE_BUCKETS: &[f64] = &[0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

/// The process-wide registry and metric families.
pub struct Metrics {
    registry: Registry,
    frames_received: IntCounterVec,
    frames_scored: IntCounterVec,
    frames_failed: IntCounterVec,
    stage_duration: HistogramVec,
    end_to_end: HistogramVec,
    capture_to_result: HistogramVec,
    queue_depth: IntGaugeVec,
    in_flight: IntGaugeVec,
    batch_size: HistogramVec,
    anomaly_score: HistogramVec,
    model_version: IntGaugeVec,
    consumer_lag: IntGaugeVec,
    partitions_assigned: IntGaugeVec,
    consumer_paused: IntGaugeVec,
    offset_commits: IntCounterVec,
    publish_errors: IntCounterVec,
    model_created: IntGaugeVec,
    model_age: IntGaugeVec,
    frames_accepted: IntCounterVec,
    retrain_frames: IntCounterVec,
    retrain_steps: IntCounterVec,
    retrain_loss: GaugeVec,
    retrain_waits: IntCounterVec,
    replay_buffer: IntGaugeVec,
    model_candidates: IntCounterVec,
}

/// Which stage a latency belongs to (`stage` label of `lineguard_stage_duration_seconds`).
#[derive(Debug, Clone, Copy)]
pub enum Stage {
    Queue,
    Preprocess,
    BatchWait,
    Inference,
    Publish,
}

impl Stage {
    fn as_str(self) -> &'static str {
        match self {
            Stage::Queue => "queue",
            Stage::Preprocess => "preprocess",
            Stage::BatchWait => "batch_wait",
            Stage::Inference => "inference",
            Stage::Publish => "publish",
        }
    }
}

/// The bounded queues between stages (`queue` label of `lineguard_queue_depth`).
#[derive(Debug, Clone, Copy)]
pub enum Queue {
    Preprocess,
    Inference,
    Sink,
}

impl Queue {
    fn as_str(self) -> &'static str {
        match self {
            Queue::Preprocess => "preprocess",
            Queue::Inference => "inference",
            Queue::Sink => "sink",
        }
    }
}

/// The outputs of a frame (`output` label of `lineguard_publish_errors_total`).
#[derive(Debug, Clone, Copy)]
pub enum Output {
    Results,
    Maps,
    DeadLetter,
    Accepted,
}

/// Where a retraining candidate came from (`source` label of `lineguard_retrain_frames_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CandidateSource {
    /// Scored below the acceptance score by the serving model.
    Auto,
    /// Marked normal by an operator on the feedback topic.
    Feedback,
}

/// What the replay buffer did with a candidate (`outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CandidateOutcome {
    Buffered,
    HeldOut,
    Duplicate,
    /// Not an image of the line's kind (undecodable, empty): never trained on.
    Invalid,
}

/// Why the trainer did not take a step (`cause` label of `lineguard_retrain_waits_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitCause {
    RateLimit,
    InferenceBusy,
    TooFewFrames,
    /// The step's loss was not finite; the update was skipped.
    NonFiniteLoss,
}

/// A gate's decision (`outcome`/`reason` labels of `lineguard_model_candidates_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateOutcome {
    Promoted,
    RejectedNonFinite,
    RejectedFalsePositives,
    RejectedRecall,
    RejectedNoImprovement,
}

impl GateOutcome {
    pub fn labels(self) -> (&'static str, &'static str) {
        match self {
            GateOutcome::Promoted => ("promoted", "improved"),
            GateOutcome::RejectedNonFinite => ("rejected", "non_finite_scores"),
            GateOutcome::RejectedFalsePositives => ("rejected", "false_positive_rate"),
            GateOutcome::RejectedRecall => ("rejected", "recall"),
            GateOutcome::RejectedNoImprovement => ("rejected", "no_improvement"),
        }
    }
}

impl Output {
    pub fn as_str(self) -> &'static str {
        match self {
            Output::Results => "results",
            Output::Maps => "maps",
            Output::DeadLetter => "dead_letter",
            Output::Accepted => "accepted",
        }
    }
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntCounterVec> {
    let metric = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntGaugeVec> {
    let metric = IntGaugeVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> prometheus::Result<HistogramVec> {
    let metric = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels)?;
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

impl Metrics {
    pub fn new() -> prometheus::Result<Arc<Metrics>> {
        let registry = Registry::new();
        let r = &registry;
        let build_info =
            gauge(r, "lineguard_build_info", "Always 1; the version label says which build runs.", &["version"])?;
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        Ok(Arc::new(Metrics {
            frames_received: counter(
                r,
                "lineguard_frames_received_total",
                "Messages consumed from input topics.",
                &["line"],
            )?,
            frames_scored: counter(
                r,
                "lineguard_frames_scored_total",
                "Frames scored and published, by verdict.",
                &["line", "verdict"],
            )?,
            frames_failed: counter(
                r,
                "lineguard_frames_failed_total",
                "Frames sent to the dead-letter topic, by reason.",
                &["line", "reason"],
            )?,
            stage_duration: histogram(
                r,
                "lineguard_stage_duration_seconds",
                "Time a frame spent in each stage.",
                &["line", "stage"],
                LATENCY_BUCKETS,
            )?,
            end_to_end: histogram(
                r,
                "lineguard_end_to_end_seconds",
                "From consumption to the broker acknowledging every output of the frame.",
                &["line"],
                LATENCY_BUCKETS,
            )?,
            capture_to_result: histogram(
                r,
                "lineguard_capture_to_result_seconds",
                "From the camera's capture timestamp to the acknowledged result.",
                &["line"],
                LATENCY_BUCKETS,
            )?,
            queue_depth: gauge(
                r,
                "lineguard_queue_depth",
                "Frames waiting in the queue in front of a stage.",
                &["line", "queue"],
            )?,
            in_flight: gauge(
                r,
                "lineguard_frames_in_flight",
                "Frames consumed whose outputs are not yet acknowledged.",
                &["line"],
            )?,
            batch_size: histogram(
                r,
                "lineguard_inference_batch_size",
                "Frames per inference batch.",
                &["line"],
                BATCH_BUCKETS,
            )?,
            anomaly_score: histogram(
                r,
                "lineguard_anomaly_score",
                "Anomaly scores of scored frames.",
                &["line"],
                SCORE_BUCKETS,
            )?,
            model_version: gauge(r, "lineguard_model_version", "Version of the model serving the line.", &["line"])?,
            consumer_lag: gauge(
                r,
                "lineguard_consumer_lag",
                "Messages between the consumer's position and the partition's end (librdkafka statistics).",
                &["line", "topic", "partition"],
            )?,
            partitions_assigned: gauge(
                r,
                "lineguard_partitions_assigned",
                "Input partitions assigned to this instance.",
                &["line"],
            )?,
            consumer_paused: gauge(
                r,
                "lineguard_consumer_paused",
                "1 while backpressure pauses consumption.",
                &["line"],
            )?,
            offset_commits: counter(
                r,
                "lineguard_offset_commits_total",
                "Offset commits, by result.",
                &["line", "result"],
            )?,
            publish_errors: counter(
                r,
                "lineguard_publish_errors_total",
                "Failed publish attempts (retried), by output.",
                &["line", "output"],
            )?,
            model_created: gauge(
                r,
                "lineguard_model_created_timestamp_seconds",
                "When the serving model was trained (Unix seconds).",
                &["line"],
            )?,
            model_age: gauge(r, "lineguard_model_age_seconds", "Age of the serving model.", &["line"])?,
            frames_accepted: counter(
                r,
                "lineguard_frames_accepted_total",
                "Scored frames published to the accepted topic as retraining candidates.",
                &["line"],
            )?,
            retrain_frames: counter(
                r,
                "lineguard_retrain_frames_total",
                "Candidates that reached the trainer, by source and what the replay buffer did with them.",
                &["line", "source", "outcome"],
            )?,
            retrain_steps: counter(r, "lineguard_retrain_steps_total", "Retraining steps taken.", &["line"])?,
            retrain_loss: {
                let metric = GaugeVec::new(
                    Opts::new("lineguard_retrain_loss", "Loss terms of the latest retraining step."),
                    &["line", "term"],
                )?;
                r.register(Box::new(metric.clone()))?;
                metric
            },
            retrain_waits: counter(
                r,
                "lineguard_retrain_waits_total",
                "Times the trainer did not step, by cause.",
                &["line", "cause"],
            )?,
            replay_buffer: gauge(
                r,
                "lineguard_replay_buffer_frames",
                "Frames in the replay buffer.",
                &["line", "part"],
            )?,
            model_candidates: counter(
                r,
                "lineguard_model_candidates_total",
                "Retrained candidates evaluated by the promotion gate, by outcome and reason.",
                &["line", "outcome", "reason"],
            )?,
            registry,
        }))
    }

    /// Totals of a line's retraining so far, for progress lines (the demo's).
    pub fn retrain_summary(&self, line: &str) -> RetrainSummary {
        let gate = |outcome: GateOutcome| {
            let (outcome, reason) = outcome.labels();
            self.model_candidates.with_label_values(&[line, outcome, reason]).get()
        };
        let rejections = [
            GateOutcome::RejectedNonFinite,
            GateOutcome::RejectedFalsePositives,
            GateOutcome::RejectedRecall,
            GateOutcome::RejectedNoImprovement,
        ];
        RetrainSummary {
            steps: self.retrain_steps.with_label_values(&[line]).get(),
            buffered: self.replay_buffer.with_label_values(&[line, "recent"]).get() as u64,
            promoted: gate(GateOutcome::Promoted),
            rejected: rejections.into_iter().map(gate).sum(),
            model_version: self.model_version.with_label_values(&[line]).get() as u64,
        }
    }

    /// The trainer's event methods for one line.
    pub fn retrain(self: &Arc<Self>, line: &str) -> RetrainMetrics {
        RetrainMetrics { metrics: self.clone(), line: line.to_string() }
    }

    /// The event methods of one line, with its label bound.
    pub fn line(self: &Arc<Self>, line: &str) -> LineMetrics {
        let l = [line];
        for reason in RejectReason::ALL {
            // Zero-initialised series make `rate()` work from the first failure on.
            self.frames_failed.with_label_values(&[line, reason.as_str()]);
        }
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

    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        // Encoding our own registry into memory cannot fail but for a bug in a metric name, which would
        // surface in tests; an empty page is better than a crashed endpoint.
        if let Err(err) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            log::error!("cannot encode metrics: {err}");
        }
        String::from_utf8(buffer).unwrap_or_default()
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

    /// Reported by the stage that reads the queue, each time it takes an item.
    pub fn queue_depth(&self, queue: Queue, depth: usize) {
        self.metrics.queue_depth.with_label_values(&[self.line.as_str(), queue.as_str()]).set(depth as i64);
    }

    pub fn frames_in_flight(&self, count: usize) {
        self.in_flight.set(count as i64);
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
}

#[derive(Debug, Clone, Copy, Default)]
pub struct RetrainSummary {
    pub steps: u64,
    pub buffered: u64,
    pub promoted: u64,
    pub rejected: u64,
    pub model_version: u64,
}

/// Events of a line's trainer.
#[derive(Clone)]
pub struct RetrainMetrics {
    metrics: Arc<Metrics>,
    line: String,
}

impl RetrainMetrics {
    pub fn candidate(&self, source: CandidateSource, outcome: CandidateOutcome) {
        let source = match source {
            CandidateSource::Auto => "auto",
            CandidateSource::Feedback => "feedback",
        };
        let outcome = match outcome {
            CandidateOutcome::Buffered => "buffered",
            CandidateOutcome::HeldOut => "held_out",
            CandidateOutcome::Duplicate => "duplicate",
            CandidateOutcome::Invalid => "invalid",
        };
        self.metrics.retrain_frames.with_label_values(&[self.line.as_str(), source, outcome]).inc();
    }

    pub fn step(&self, losses: &crate::model::train::StepLosses) {
        self.metrics.retrain_steps.with_label_values(&[self.line.as_str()]).inc();
        let terms = [
            ("total", Some(losses.total)),
            ("hard", Some(losses.hard)),
            ("autoencoder", Some(losses.autoencoder)),
            ("student_autoencoder", Some(losses.student_autoencoder)),
            ("dfsc", losses.dfsc),
        ];
        for (term, value) in terms {
            if let Some(value) = value {
                self.metrics.retrain_loss.with_label_values(&[self.line.as_str(), term]).set(value);
            }
        }
    }

    pub fn waited(&self, cause: WaitCause) {
        let cause = match cause {
            WaitCause::RateLimit => "rate_limit",
            WaitCause::InferenceBusy => "inference_busy",
            WaitCause::TooFewFrames => "too_few_frames",
            WaitCause::NonFiniteLoss => "non_finite_loss",
        };
        self.metrics.retrain_waits.with_label_values(&[self.line.as_str(), cause]).inc();
    }

    pub fn buffer(&self, recent: usize, held_out: usize, pinned: usize) {
        for (part, count) in [("recent", recent), ("held_out", held_out), ("pinned", pinned)] {
            self.metrics.replay_buffer.with_label_values(&[self.line.as_str(), part]).set(count as i64);
        }
    }

    pub fn gate(&self, outcome: GateOutcome) {
        let (outcome, reason) = outcome.labels();
        self.metrics.model_candidates.with_label_values(&[self.line.as_str(), outcome, reason]).inc();
    }

    /// The trainer's current model (the version every replica follows).
    pub fn current_model(&self, version: u64, created_unix: u64) {
        let line = [self.line.as_str()];
        self.metrics.model_version.with_label_values(&line).set(version as i64);
        self.metrics.model_created.with_label_values(&line).set(created_unix as i64);
        self.metrics
            .model_age
            .with_label_values(&line)
            .set(crate::model::unix_seconds().saturating_sub(created_unix) as i64);
    }
}

/// Readiness of one line: a model is loaded and the consumer joined its group.
#[derive(Debug, Default)]
pub struct LineHealth {
    pub model_loaded: AtomicBool,
    pub joined_group: AtomicBool,
}

impl LineHealth {
    pub fn ready(&self) -> bool {
        self.model_loaded.load(Ordering::Relaxed) && self.joined_group.load(Ordering::Relaxed)
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the task is dropped. A deliberately small HTTP/1.1
/// responder: these three GETs are all Prometheus and Kubernetes probes send.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, health: Vec<Arc<LineHealth>>) {
    let health = Arc::new(health);
    loop {
        let (mut stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                log::warn!("metrics endpoint: accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let mut request = vec![0u8; 2048];
            let read = match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut request)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let first_line = String::from_utf8_lossy(&request[..read]).lines().next().unwrap_or_default().to_string();
            let path = first_line.split_whitespace().nth(1).unwrap_or("");
            let (status, content_type, body) = match path {
                "/metrics" => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", metrics.render()),
                "/healthz" => ("200 OK", "text/plain", "ok\n".to_string()),
                "/readyz" if health.iter().all(|line| line.ready()) => ("200 OK", "text/plain", "ready\n".to_string()),
                "/readyz" => ("503 Service Unavailable", "text/plain", "not ready\n".to_string()),
                _ => ("404 Not Found", "text/plain", "try /metrics, /healthz or /readyz\n".to_string()),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let metrics = Metrics::new().unwrap();
        let line = metrics.line("juice");
        line.frame_received();
        line.frame_scored(0.2, false, &StageTimings::default(), Duration::from_millis(3));
        line.frame_done(Duration::from_millis(40), None);
        line.queue_depth(Queue::Preprocess, 1);
        line.frames_in_flight(1);
        line.consumer_lag("frames", 0, 5);
        let text = metrics.render();
        for family in metrics.registry.gather() {
            let name = family.name();
            assert!(name.starts_with("lineguard_"), "{name}");
            match family.get_field_type() {
                prometheus::proto::MetricType::COUNTER => assert!(name.ends_with("_total"), "{name}"),
                prometheus::proto::MetricType::HISTOGRAM => {
                    assert!(name.ends_with("_seconds") || name.ends_with("_size") || name.ends_with("_score"), "{name}")
                }
                _ => assert!(!name.ends_with("_total"), "gauge {name} must not end in _total"),
            }
        }
        assert!(text.contains("lineguard_frames_received_total{line=\"juice\"} 1"), "{text}");
        assert!(text.contains("lineguard_frames_failed_total{line=\"juice\",reason=\"decode\"} 0"), "{text}");
        assert!(text.contains("lineguard_consumer_lag{line=\"juice\",partition=\"0\",topic=\"frames\"} 5"), "{text}");
    }

    #[tokio::test]
    async fn endpoint_serves_metrics_and_readiness() {
        let metrics = Metrics::new().unwrap();
        metrics.line("juice").frame_received();
        let health = Arc::new(LineHealth::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, metrics, vec![health.clone()]));
        let get = |path: &'static str| async move {
            let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
            stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).await.unwrap();
            response
        };
        assert!(get("/metrics").await.contains("lineguard_frames_received_total{line=\"juice\"} 1"));
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/readyz").await.starts_with("HTTP/1.1 503"));
        health.model_loaded.store(true, Ordering::Relaxed);
        health.joined_group.store(true, Ordering::Relaxed);
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
        server.abort();
    }
}
