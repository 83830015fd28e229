//! Prometheus metrics as typed events, and the HTTP endpoint that serves them with the health checks.
//!
//! Stages never touch metric objects directly: they call one method of [`LineMetrics`] per occurrence
//! (`frame_received`, `frame_rejected(reason)`, …), so names, labels and units live here only and label
//! values stay bounded (line names, fixed reasons and stage names, partitions).
//!
//! Endpoints: `/metrics` (Prometheus text format), `/healthz` (the process serves requests), `/readyz`
//! (every line has a model loaded and has joined its consumer group).
//!
//! `labels` holds the bounded label values, `line` the serving stages' events, `retrain` the
//! trainer's, and `endpoint` the HTTP server with the health checks.

mod endpoint;
mod labels;
mod line;
mod retrain;

use std::sync::Arc;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub use endpoint::{serve, LineHealth};
pub use labels::*;
pub use line::LineMetrics;
pub use retrain::{RetrainMetrics, RetrainSummary};

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
    producer_replacements: IntCounterVec,
    model_created: IntGaugeVec,
    model_age: IntGaugeVec,
    frames_accepted: IntCounterVec,
    acceptance_paced: IntCounterVec,
    retrain_frames: IntCounterVec,
    retrain_steps: IntCounterVec,
    retrain_loss: GaugeVec,
    retrain_dfsc_active_share: GaugeVec,
    oldest_unacknowledged: GaugeVec,
    retrain_waits: IntCounterVec,
    retrain_restarts: IntCounterVec,
    retrain_state_write_errors: IntCounterVec,
    retrain_heartbeat: IntGaugeVec,
    replay_buffer: IntGaugeVec,
    model_candidates: IntCounterVec,
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
            producer_replacements: counter(
                r,
                "lineguard_producer_replacements_total",
                "Times a producer of the line was replaced by a fresh client, by client (outputs: results, maps, \
                 dead letters and accepted frames; models: the trainer's publications) and reason (stalled, fatal).",
                &["line", "client", "reason"],
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
            acceptance_paced: counter(
                r,
                "lineguard_frames_acceptance_paced_total",
                "Frames below the acceptance score not published: within retrain.accept_per_minute's interval.",
                &["line"],
            )?,
            retrain_frames: counter(
                r,
                "lineguard_retrain_frames_total",
                "Candidates that reached the trainer, by source and what the replay buffer did with them.",
                &["line", "source", "outcome"],
            )?,
            retrain_steps: counter(r, "lineguard_retrain_steps_total", "Retraining steps taken.", &["line"])?,
            oldest_unacknowledged: {
                let metric = GaugeVec::new(
                    Opts::new(
                        "lineguard_oldest_unacknowledged_seconds",
                        "Age of the oldest consumed frame whose outputs are not yet acknowledged (0 when none).",
                    ),
                    &["line"],
                )?;
                r.register(Box::new(metric.clone()))?;
                metric
            },
            retrain_loss: {
                let metric = GaugeVec::new(
                    Opts::new("lineguard_retrain_loss", "Loss terms of the latest retraining step."),
                    &["line", "term"],
                )?;
                r.register(Box::new(metric.clone()))?;
                metric
            },
            retrain_dfsc_active_share: {
                let metric = GaugeVec::new(
                    Opts::new(
                        "lineguard_retrain_dfsc_active_share",
                        "Share of the features the DFSC margin selects where it still pushes (latest reading).",
                    ),
                    &["line"],
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
            retrain_restarts: counter(
                r,
                "lineguard_retrain_restarts_total",
                "Lines of training dropped for a fresh start from the serving model, by cause.",
                &["line", "cause"],
            )?,
            retrain_state_write_errors: counter(
                r,
                "lineguard_retrain_state_write_errors_total",
                "Writes to the trainer's state directory that failed (full or read-only), by what was written.",
                &["line", "what"],
            )?,
            retrain_heartbeat: gauge(
                r,
                "lineguard_retrain_heartbeat_timestamp_seconds",
                "When the trainer last went round its loop (Unix time): it stops moving when the trainer hangs or dies.",
                &["line"],
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::service::frame::StageTimings;

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

    #[test]
    fn a_trainer_s_series_exist_from_its_start_and_count_its_events() {
        let metrics = Metrics::new().unwrap();
        let retrain = metrics.retrain("juice");
        // Zero from the start, so that `increase()` in alerts and panels sees the first event.
        let before = metrics.render();
        for cause in RestartCause::ALL {
            let series = format!("lineguard_retrain_restarts_total{{cause=\"{}\",line=\"juice\"}} 0", cause.as_str());
            assert!(before.contains(&series), "{series} in\n{before}");
        }
        retrain.restarted(RestartCause::RegressedCandidates);
        retrain.restarted(RestartCause::RegressedCandidates);
        retrain.gate(GateOutcome::RejectedFalsePositives);
        let after = metrics.render();
        let restarts = "lineguard_retrain_restarts_total{cause=\"regressed_candidates\",line=\"juice\"} 2";
        assert!(after.contains(restarts), "{after}");
        let refused =
            "lineguard_model_candidates_total{line=\"juice\",outcome=\"rejected\",reason=\"false_positive_rate\"} 1";
        assert!(after.contains(refused), "{after}");
    }
}
