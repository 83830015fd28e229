//! The label values of the metric families: fixed sets, so a series count stays bounded.

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
    pub(super) fn as_str(self) -> &'static str {
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
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Queue::Preprocess => "preprocess",
            Queue::Inference => "inference",
            Queue::Sink => "sink",
        }
    }
}

/// What the trainer writes to its state directory (`what` label of
/// `lineguard_retrain_state_write_errors_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StateWrite {
    /// A retraining candidate into the replay buffer.
    Buffer,
    /// A promoted or adopted model version (and `current.json`).
    Version,
    /// The trainer's weights, optimiser moments and state.
    Checkpoint,
}

impl StateWrite {
    pub const ALL: [StateWrite; 3] = [StateWrite::Buffer, StateWrite::Version, StateWrite::Checkpoint];

    pub fn as_str(self) -> &'static str {
        match self {
            StateWrite::Buffer => "buffer",
            StateWrite::Version => "version",
            StateWrite::Checkpoint => "checkpoint",
        }
    }
}

/// Why a line of training was dropped for a fresh start from the serving model (`cause` label of
/// `lineguard_retrain_restarts_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartCause {
    /// Its candidates regressed at several gates in a row (false alarms, recall, synthetic recall).
    RegressedCandidates,
    /// A candidate scored NaN or infinity.
    NonFiniteCandidate,
    /// Several training steps in a row produced a non-finite loss.
    NonFiniteLosses,
}

impl RestartCause {
    pub const ALL: [RestartCause; 3] =
        [RestartCause::RegressedCandidates, RestartCause::NonFiniteCandidate, RestartCause::NonFiniteLosses];

    pub fn as_str(self) -> &'static str {
        match self {
            RestartCause::RegressedCandidates => "regressed_candidates",
            RestartCause::NonFiniteCandidate => "non_finite_candidate",
            RestartCause::NonFiniteLosses => "non_finite_losses",
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

/// Why a producer was replaced by a fresh client (`reason` label of
/// `lineguard_producer_replacements_total`; see `sink::publisher` and `retrain::models_topic`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProducerReplacement {
    /// Records waited without a single delivery: `kafka.producer_stall_secs` for a line's outputs, a
    /// publication's timeout for the trainer's models.
    Stalled,
    /// librdkafka raised a fatal error: that client publishes nothing more.
    Fatal,
}

impl ProducerReplacement {
    pub const ALL: [ProducerReplacement; 2] = [ProducerReplacement::Stalled, ProducerReplacement::Fatal];

    pub fn as_str(self) -> &'static str {
        match self {
            ProducerReplacement::Stalled => "stalled",
            ProducerReplacement::Fatal => "fatal",
        }
    }
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
    /// The state directory could not take it (full, read-only): dropped, counted, training goes on.
    NotStored,
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
    /// Its recall on synthetic foreign objects fell by more than `synthetic_recall_tolerance`.
    RejectedSyntheticRecall,
    /// The gate promoted it but the version store could not write it (state directory full or
    /// read-only): replicas keep the last good model and the next gate tries again.
    NotStored,
}

impl GateOutcome {
    pub const ALL: [GateOutcome; 7] = [
        GateOutcome::Promoted,
        GateOutcome::RejectedNonFinite,
        GateOutcome::RejectedFalsePositives,
        GateOutcome::RejectedRecall,
        GateOutcome::RejectedNoImprovement,
        GateOutcome::RejectedSyntheticRecall,
        GateOutcome::NotStored,
    ];

    pub fn labels(self) -> (&'static str, &'static str) {
        match self {
            GateOutcome::Promoted => ("promoted", "improved"),
            GateOutcome::RejectedNonFinite => ("rejected", "non_finite_scores"),
            GateOutcome::RejectedFalsePositives => ("rejected", "false_positive_rate"),
            GateOutcome::RejectedRecall => ("rejected", "recall"),
            GateOutcome::RejectedNoImprovement => ("rejected", "no_improvement"),
            GateOutcome::RejectedSyntheticRecall => ("rejected", "synthetic_recall"),
            GateOutcome::NotStored => ("rejected", "state_not_writable"),
        }
    }
}

impl Output {
    pub const ALL: [Output; 4] = [Output::Results, Output::Maps, Output::DeadLetter, Output::Accepted];

    pub fn as_str(self) -> &'static str {
        match self {
            Output::Results => "results",
            Output::Maps => "maps",
            Output::DeadLetter => "dead_letter",
            Output::Accepted => "accepted",
        }
    }
}
