//! The events of one line's trainer, and the totals the demo prints.

use std::sync::Arc;

use crate::service::retrain::buffer::BufferCounts;

use super::{
    CandidateOutcome, CandidateSource, GateOutcome, Metrics, ProducerReplacement, RestartCause, StateWrite, WaitCause,
};

impl Metrics {
    /// Totals of a line's retraining so far, for progress lines (the demo's).
    pub fn retrain_summary(&self, line: &str) -> RetrainSummary {
        let gate = |outcome: GateOutcome| {
            let (outcome, reason) = outcome.labels();
            self.model_candidates.with_label_values(&[line, outcome, reason]).get()
        };
        let rejections = GateOutcome::ALL.into_iter().filter(|o| *o != GateOutcome::Promoted);
        RetrainSummary {
            steps: self.retrain_steps.with_label_values(&[line]).get(),
            buffered: ["recent", "marked"]
                .map(|part| self.replay_buffer.with_label_values(&[line, part]).get() as u64)
                .iter()
                .sum(),
            promoted: gate(GateOutcome::Promoted),
            rejected: rejections.map(gate).sum(),
            model_version: self.model_version.with_label_values(&[line]).get() as u64,
        }
    }

    /// The trainer's event methods for one line.
    pub fn retrain(self: &Arc<Self>, line: &str) -> RetrainMetrics {
        // Zero-initialised series let `increase()` (the alert rules) see the first event.
        for outcome in GateOutcome::ALL {
            let (outcome, reason) = outcome.labels();
            self.model_candidates.with_label_values(&[line, outcome, reason]);
        }
        for what in StateWrite::ALL {
            self.retrain_state_write_errors.with_label_values(&[line, what.as_str()]);
        }
        for cause in RestartCause::ALL {
            self.retrain_restarts.with_label_values(&[line, cause.as_str()]);
        }
        for reason in ProducerReplacement::ALL {
            self.producer_replacements.with_label_values(&[line, "models", reason.as_str()]);
        }
        RetrainMetrics { metrics: self.clone(), line: line.to_string() }
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
    /// The trainer's producer for the models topic was replaced (see `retrain::models_topic`).
    pub fn producer_replaced(&self, reason: ProducerReplacement) {
        self.metrics.producer_replacements.with_label_values(&[self.line.as_str(), "models", reason.as_str()]).inc();
    }

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
            CandidateOutcome::NotStored => "not_stored",
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
        if let Some(activity) = &losses.dfsc_activity {
            self.metrics.retrain_dfsc_active_share.with_label_values(&[self.line.as_str()]).set(activity.active_share);
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

    /// A line of training was dropped; the next step starts again from the serving model.
    pub fn restarted(&self, cause: RestartCause) {
        self.metrics.retrain_restarts.with_label_values(&[self.line.as_str(), cause.as_str()]).inc();
    }

    /// The trainer went round its loop (alerts fire when this stops moving).
    pub fn heartbeat(&self) {
        let now = crate::model::unix_seconds() as i64;
        self.metrics.retrain_heartbeat.with_label_values(&[self.line.as_str()]).set(now);
    }

    /// A write to the state directory failed.
    pub fn state_write_failed(&self, what: StateWrite) {
        self.metrics.retrain_state_write_errors.with_label_values(&[self.line.as_str(), what.as_str()]).inc();
    }

    pub fn buffer(&self, counts: BufferCounts) {
        let parts = [
            ("recent", counts.recent),
            ("marked", counts.marked),
            ("held_out", counts.held_out),
            ("pinned", counts.pinned),
        ];
        for (part, count) in parts {
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
