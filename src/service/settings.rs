//! Pipeline configuration: a TOML file per deployment (see `pipelines/`), then `LINEGUARD__…` environment
//! overrides, deserialised strictly (unknown keys are errors) and validated whole, so that one start-up
//! reports every problem with the key that has it.
//!
//! Environment overrides use double underscores between levels, e.g. `LINEGUARD__KAFKA__BROKERS=k1:9092` or
//! `LINEGUARD__LINES__JUICE_BOTTLE__THRESHOLD=0.4`. Lists (such as `input_topics`) take comma-separated
//! values.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::data::preprocess::{DecodeLimits, MIN_IMAGE_SIDE};
use crate::error::ConfigError;
use crate::model::Precision;

/// A signing key shorter than this is refused: a guessable key signs nothing.
pub const MIN_SIGNING_KEY_BYTES: usize = 16;

/// Room left for a record's headers and framing when a frame's bytes are republished.
const HEADERS_ROOM: usize = 64 << 10;

/// The environment prefix of overrides.
pub const ENV_PREFIX: &str = "LINEGUARD";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub kafka: KafkaSettings,
    #[serde(default)]
    pub metrics: MetricsSettings,
    #[serde(default)]
    pub shutdown: ShutdownSettings,
    /// Product lines by name; each has its own model, topics, consumer group and stages.
    pub lines: BTreeMap<String, LineSettings>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    /// Bootstrap servers, comma-separated `host:port`.
    pub brokers: String,
    #[serde(default = "default_client_id")]
    pub client_id: String,
    /// Extra librdkafka properties for consumers (e.g. `security.protocol`). Values of keys that look like
    /// credentials are redacted when settings are printed; keep credentials in `secrets` anyway.
    #[serde(default, serialize_with = "redact_credentials")]
    pub consumer: BTreeMap<String, String>,
    /// Extra librdkafka properties for producers.
    #[serde(default, serialize_with = "redact_credentials")]
    pub producer: BTreeMap<String, String>,
    /// librdkafka properties whose values are secrets (`sasl.password`, `ssl.key.password`, …), for every
    /// client (consumers, producers, admin), applied last. Meant to come from a Kubernetes Secret through
    /// the environment, where underscores stand for the dots of the property name:
    /// `LINEGUARD__KAFKA__SECRETS__SASL_PASSWORD`. Never printed or logged.
    #[serde(default)]
    pub secrets: BTreeMap<String, Secret>,
    /// The same from files (a mounted Secret): property → path, read at start; one trailing newline is
    /// dropped. A property in both takes the file's value.
    #[serde(default)]
    pub secret_files: BTreeMap<String, PathBuf>,
    /// A line's producer whose records have waited this long without a single delivery is replaced by a
    /// fresh client, and the records go again through it (0: never). What it clears: librdkafka's
    /// idempotent producer retries forever when a broker lost its producer state (see
    /// `sink::publisher`). Below `metrics.stalled_after_secs`, so it acts before `/healthz` asks for a
    /// restart.
    #[serde(default = "default_producer_stall_secs")]
    pub producer_stall_secs: u64,
}

/// A credential: its value is never printed (`Debug` and serialisation show `<redacted>`), only handed
/// to the Kafka client.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

pub const REDACTED: &str = "<redacted>";

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

/// Whether a librdkafka property holds a credential (passwords, secrets, private keys, tokens).
pub fn is_credential(property: &str) -> bool {
    let property = property.to_ascii_lowercase();
    ["password", "secret", "jaas", "token", "key.pem", "oauthbearer.config"].iter().any(|word| property.contains(word))
}

fn redact_credentials<S: serde::Serializer>(map: &BTreeMap<String, String>, serializer: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut out = serializer.serialize_map(Some(map.len()))?;
    for (key, value) in map {
        out.serialize_entry(key, if is_credential(key) { REDACTED } else { value })?;
    }
    out.end()
}

/// A secret from a file (a mounted Kubernetes Secret), without the one trailing newline (`\n` or `\r\n`)
/// editors and `echo` add. The error names the file, never its content.
fn read_secret_file(path: &Path) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path).map_err(|err| format!("cannot read {}: {err}", path.display()))?;
    let value = text.strip_suffix('\n').map_or(text.as_str(), |line| line.strip_suffix('\r').unwrap_or(line));
    Ok(Secret::new(value))
}

impl KafkaSettings {
    /// The secret properties under their librdkafka names (`sasl_password` from the environment becomes
    /// `sasl.password`).
    pub fn secret_properties(&self) -> impl Iterator<Item = (String, &str)> {
        self.secrets.iter().map(|(key, value)| (key.replace('_', "."), value.expose()))
    }

    /// Reads `secret_files` into `secrets`; every unreadable file is named.
    fn read_secret_files(&mut self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        for (property, path) in &self.secret_files {
            match read_secret_file(path) {
                Ok(secret) => {
                    self.secrets.insert(property.clone(), secret);
                }
                Err(err) => problems.push(format!("kafka.secret_files.{property}: {err}")),
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// Address of the HTTP endpoint serving `/metrics`, `/healthz` and `/readyz`; empty disables it.
    #[serde(default = "default_metrics_listen")]
    pub listen: String,
    /// `/healthz` turns 503 when a line's oldest unacknowledged frame is older than this: the line is stuck
    /// (outputs cannot be published, a stage hangs) and a restart is due. Well above the worst latency.
    #[serde(default = "default_stalled_after_secs")]
    pub stalled_after_secs: u64,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        MetricsSettings { listen: default_metrics_listen(), stalled_after_secs: default_stalled_after_secs() }
    }
}

impl MetricsSettings {
    pub fn stalled_after(&self) -> Duration {
        Duration::from_secs(self.stalled_after_secs)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownSettings {
    /// After SIGTERM, how long in-flight frames may take to be published before the process gives up
    /// (their offsets then stay uncommitted and the frames are processed again after a restart).
    #[serde(default = "default_drain_timeout_secs")]
    pub drain_timeout_secs: u64,
    /// How often offsets of fully published frames are committed while running.
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        ShutdownSettings {
            drain_timeout_secs: default_drain_timeout_secs(),
            commit_interval_ms: default_commit_interval_ms(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum MapFormat {
    /// A colourised heatmap PNG at the model's resolution.
    Png,
    /// The raw normalised map as little-endian IEEE half floats, row-major, at the model's resolution.
    F16,
    /// No maps topic messages.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceChoice {
    /// CUDA when libtorch sees a GPU, else CPU.
    Auto,
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineSettings {
    /// Model file written by `lineguard train`.
    pub model: PathBuf,
    /// Topics carrying this line's camera frames.
    pub input_topics: Vec<String>,
    #[serde(default = "default_results_topic")]
    pub results_topic: String,
    /// Topic of anomaly maps; empty disables maps (as does `map_format = "none"`).
    #[serde(default = "default_maps_topic")]
    pub maps_topic: String,
    #[serde(default = "default_dead_letter_topic")]
    pub dead_letter_topic: String,
    /// Consumer group; defaults to `lineguard-<line name>`.
    #[serde(default)]
    pub group_id: Option<String>,
    /// Frames scoring above this are `anomalous`. Choose it on normal validation images (the demo uses
    /// the highest validation score); `lineguard predict` prints scores to help.
    pub threshold: f32,
    #[serde(default = "default_map_format")]
    pub map_format: MapFormat,
    #[serde(default = "default_device")]
    pub device: DeviceChoice,
    /// What the networks compute in: `f32`, or `bf16` / `f16` on a GPU with tensor cores (several times
    /// faster there, maps within about 1e-2 of f32's range; slower on most CPUs). Training stays in f32.
    #[serde(default)]
    pub precision: Precision,
    /// Decoding threads; 0 means one per CPU core.
    #[serde(default)]
    pub preprocess_workers: usize,
    /// Threads scoring batches side by side, each with its own copy of the model and an equal share of
    /// the CPU threads. One worker spreads each batch over every core; on CPUs shared with other work
    /// (decoding, Kafka clients, a broker) two or more workers of fewer threads each stall less, at the
    /// cost of each frame's inference taking longer (see BENCHMARKS.md, "Serving speed").
    #[serde(default = "default_inference_workers")]
    pub inference_workers: usize,
    /// libtorch CPU threads of each inference worker; 0 (the default) shares the process's CPU threads out
    /// over this line's workers, as if the line were alone. Several lines busy at once in one process then
    /// hold more threads than there are cores; giving each worker its share of the whole process (e.g. 1
    /// for two lines on 2 cores) scored 15% more frames/s in bf16 with both lines busy and the same in f32,
    /// but a line whose neighbours are idle then scores 1.5–1.8× slower (BENCHMARKS.md, "two lines in one
    /// process"). Unused on a GPU.
    #[serde(default)]
    pub inference_threads: usize,
    /// Largest inference batch.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// How long the first frame of a batch waits for company before the batch runs anyway.
    #[serde(default = "default_max_batch_wait_ms")]
    pub max_batch_wait_ms: u64,
    /// Frames between consumption and acknowledged output; when reached, the consumer pauses.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Larger messages go to the dead-letter topic without being decoded.
    #[serde(default = "default_max_frame_bytes")]
    pub max_frame_bytes: usize,
    /// When set, frames of another `[width, height]` go to the dead-letter topic (a camera misconfigured).
    #[serde(default)]
    pub expected_size: Option<[u32; 2]>,
    /// Frames whose header declares a wider, taller or larger image go to the dead-letter topic as
    /// `too_large` without being decoded: they bound each decoding worker's memory (about 11 bytes per
    /// pixel of `max_image_pixels`), which `max_frame_bytes` cannot since compressed images can be tiny.
    #[serde(default = "default_max_image_width")]
    pub max_image_width: u32,
    #[serde(default = "default_max_image_height")]
    pub max_image_height: u32,
    #[serde(default = "default_max_image_pixels")]
    pub max_image_pixels: u64,
    /// Continuous retraining on accepted normal frames; absent = the model never changes by itself.
    #[serde(default)]
    pub retrain: Option<RetrainSettings>,
}

/// `[lines.<name>.retrain]`: what becomes training data, how the trainer may use the machine, and when a
/// retrained model replaces the serving one (see `retrain`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrainSettings {
    /// Frames scoring below this are retraining candidates: stricter than the line's `threshold`, so only
    /// confidently normal frames teach the model.
    pub accept_below: f32,
    /// At most this many accepted frames per minute leave each replica, one per interval (the first frame
    /// below `accept_below` after it): the trainer learns at tens of steps a minute, and republishing every
    /// normal frame of a line at full rate would double its broker traffic and make the replay buffer hold
    /// only its last seconds.
    pub accept_per_minute: f64,
    /// Where inference replicas publish accepted frames (key = frame id) for the line's one trainer.
    pub accepted_topic: String,
    /// Optional topic where operators mark frames normal (key = frame id, JSON value, see `retrain`);
    /// empty disables it.
    pub feedback_topic: String,
    /// Promoted models, chunked, for every replica to follow (one partition; compaction recommended).
    pub models_topic: String,
    /// The trainer's state: replay buffer, checkpoint, kept versions (a subfolder per line).
    pub state_dir: PathBuf,
    /// Folder of the original training images; a pinned sample of it stays in the replay buffer and in
    /// the promotion gate so the model cannot drift away from the line it was built for.
    pub originals: Option<PathBuf>,
    pub pinned_originals: usize,
    /// Optional folder of known defects: the gate rejects candidates that catch fewer of them.
    pub anomalies: Option<PathBuf>,
    /// Recent accepted frames kept for training (a sliding window).
    pub buffer_frames: usize,
    /// Frames operators marked normal kept for training, in a window of their own: the flow of accepted
    /// frames must not push them out.
    pub marked_frames: usize,
    /// The share of training draws taken from operator-marked frames while there are any (the others
    /// from accepted frames and pinned originals); 0, the default, draws every frame alike. A share lowers
    /// the marked frames' scores faster, and can make the model forget the rest: in the demo 0.5 met the
    /// gate's held-out goal with one first model of three, 0 with all three (README, Known limitations).
    pub marked_share: f64,
    /// Every n-th accepted frame is held out of training for the gate.
    pub holdout_every: usize,
    pub holdout_frames: usize,
    /// Recent frames needed before training starts.
    pub min_frames: usize,
    pub learning_rate: f64,
    /// Upper bound on the trainer's pace.
    pub steps_per_minute: f64,
    /// The in-process trainer waits while more frames than this queue in front of inference.
    pub pause_when_queue_above: usize,
    /// Steps between promotion gates.
    pub evaluate_every: u64,
    /// How much the gate lets the false-positive rate rise and the recall fall (fractions).
    pub fpr_tolerance: f64,
    pub recall_tolerance: f64,
    /// How much the recall on synthetic foreign objects (painted on the held-out frames) may fall: the
    /// guard against a candidate that stopped seeing defects, known defects or not. 1 turns it off.
    pub synthetic_recall_tolerance: f64,
    /// Promoted versions kept on disk for `lineguard model rollback`.
    pub keep_versions: usize,
    /// CPU threads of the trainer's libtorch operations (inference keeps its own).
    pub threads: usize,
    /// The key that signs models on the models topic (HMAC-SHA256): replicas serve only publications
    /// signed with it, so writing to the topic is not enough to replace every replica's model. Give it
    /// from a Kubernetes Secret: `LINEGUARD__LINES__<LINE>__RETRAIN__SIGNING_KEY`, or a file
    /// (`signing_key_file`). Without a key, models are unsigned and a warning says so at start.
    pub signing_key: Option<Secret>,
    pub signing_key_file: Option<PathBuf>,
}

impl RetrainSettings {
    /// Reads `signing_key_file` into `signing_key` (one trailing newline dropped).
    fn read_signing_key_file(&mut self, line: &str) -> Result<(), String> {
        let Some(path) = &self.signing_key_file else { return Ok(()) };
        let secret = read_secret_file(path).map_err(|err| format!("lines.{line}.retrain.signing_key_file: {err}"))?;
        self.signing_key = Some(secret);
        Ok(())
    }
}

impl Default for RetrainSettings {
    fn default() -> Self {
        RetrainSettings {
            accept_below: f32::NAN,
            accept_per_minute: 30.0,
            accepted_topic: "lineguard.accepted".into(),
            feedback_topic: String::new(),
            models_topic: "lineguard.models".into(),
            state_dir: PathBuf::from("lineguard-state"),
            originals: None,
            pinned_originals: 32,
            anomalies: None,
            buffer_frames: 256,
            marked_frames: 64,
            marked_share: 0.0,
            holdout_every: 5,
            holdout_frames: 64,
            min_frames: 16,
            learning_rate: 5e-5,
            steps_per_minute: 60.0,
            pause_when_queue_above: 8,
            evaluate_every: 200,
            fpr_tolerance: 0.0,
            recall_tolerance: 0.0,
            synthetic_recall_tolerance: 0.25,
            keep_versions: 5,
            threads: 1,
            signing_key: None,
            signing_key_file: None,
        }
    }
}

impl RetrainSettings {
    /// This line's own folder under `state_dir`.
    pub fn line_dir(&self, line: &str) -> PathBuf {
        self.state_dir.join(line)
    }

    fn problems(&self, line: &LineSettings, key: &dyn Fn(&str) -> String, problems: &mut Vec<String>) {
        let key = |field: &str| key(&format!("retrain.{field}"));
        if !self.accept_below.is_finite() {
            problems
                .push(format!("{}: required, a score below `threshold` (e.g. 0.8 × threshold)", key("accept_below")));
        } else if self.accept_below >= line.threshold {
            problems.push(format!(
                "{}: {} is not below the line's threshold {} (only confidently normal frames may teach the model)",
                key("accept_below"),
                self.accept_below,
                line.threshold
            ));
        }
        for (field, topic) in [("accepted_topic", &self.accepted_topic), ("models_topic", &self.models_topic)] {
            if topic.trim().is_empty() {
                problems.push(format!("{}: empty", key(field)));
            }
        }
        let own = [&self.accepted_topic, &self.models_topic, &self.feedback_topic];
        for topic in own.into_iter().filter(|t| !t.is_empty()) {
            let clash = line.input_topics.contains(topic)
                || [&line.results_topic, &line.maps_topic, &line.dead_letter_topic].contains(&topic);
            if clash {
                problems.push(format!("{}: {topic:?} is also one of the line's other topics", key("*_topic")));
            }
        }
        if self.accepted_topic == self.models_topic || self.feedback_topic == self.models_topic {
            problems.push(format!("{}: must differ from the accepted and feedback topics", key("models_topic")));
        }
        for (field, value, least) in [
            ("buffer_frames", self.buffer_frames, 1),
            ("marked_frames", self.marked_frames, 1),
            ("holdout_every", self.holdout_every, 2),
            ("holdout_frames", self.holdout_frames, 1),
            ("min_frames", self.min_frames, 1),
            ("keep_versions", self.keep_versions, 2),
            ("threads", self.threads, 1),
        ] {
            if value < least {
                problems.push(format!("{}: {value} (at least {least})", key(field)));
            }
        }
        if self.evaluate_every == 0 {
            problems.push(format!("{}: must be > 0", key("evaluate_every")));
        }
        for (field, value) in
            [("steps_per_minute", self.steps_per_minute), ("accept_per_minute", self.accept_per_minute)]
        {
            if !(value.is_finite() && value > 0.0) {
                problems.push(format!("{}: {value} (must be > 0)", key(field)));
            }
        }
        if !(0.0..1.0).contains(&self.marked_share) {
            problems.push(format!("{}: {} (a fraction, 0 <= share < 1)", key("marked_share"), self.marked_share));
        }
        if !(self.learning_rate > 0.0 && self.learning_rate < 1.0) {
            problems.push(format!("{}: {} (expected 0 < lr < 1)", key("learning_rate"), self.learning_rate));
        }
        let tolerances = [
            ("fpr_tolerance", self.fpr_tolerance),
            ("recall_tolerance", self.recall_tolerance),
            ("synthetic_recall_tolerance", self.synthetic_recall_tolerance),
        ];
        for (field, value) in tolerances {
            if !(0.0..=1.0).contains(&value) {
                problems.push(format!("{}: {value} (a fraction, 0..=1)", key(field)));
            }
        }
        if self.state_dir.as_os_str().is_empty() {
            problems.push(format!("{}: empty", key("state_dir")));
        }
    }
}

fn default_client_id() -> String {
    "lineguard".into()
}
fn default_producer_stall_secs() -> u64 {
    30
}
fn default_stalled_after_secs() -> u64 {
    120
}
fn default_metrics_listen() -> String {
    "0.0.0.0:9464".into()
}
fn default_drain_timeout_secs() -> u64 {
    30
}
fn default_commit_interval_ms() -> u64 {
    1000
}
fn default_results_topic() -> String {
    "lineguard.results".into()
}
fn default_maps_topic() -> String {
    "lineguard.maps".into()
}
fn default_dead_letter_topic() -> String {
    "lineguard.dead-letter".into()
}
fn default_map_format() -> MapFormat {
    MapFormat::Png
}
fn default_device() -> DeviceChoice {
    DeviceChoice::Auto
}
fn default_inference_workers() -> usize {
    1
}
fn default_max_batch() -> usize {
    8
}
fn default_max_batch_wait_ms() -> u64 {
    20
}
fn default_max_in_flight() -> usize {
    64
}
fn default_max_frame_bytes() -> usize {
    8 << 20
}
fn default_max_image_width() -> u32 {
    DecodeLimits::default().max_width
}
fn default_max_image_height() -> u32 {
    DecodeLimits::default().max_height
}
fn default_max_image_pixels() -> u64 {
    DecodeLimits::default().max_pixels
}

impl Settings {
    /// Reads `path`, applies `LINEGUARD__…` overrides from the process environment, validates.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Settings::from_toml(&text, path, std::env::vars())
    }

    /// [`Settings::load`] on text, with the environment given explicitly (tests pass their own).
    pub fn from_toml(
        text: &str,
        origin: &Path,
        environment: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let parse_error = |source| ConfigError::Parse { path: origin.to_path_buf(), source };
        let overrides: config::Map<String, String> =
            environment.into_iter().filter(|(key, _)| key.starts_with(&format!("{ENV_PREFIX}__"))).collect();
        // `config` splits only the keys it is told are lists, by their full dotted path.
        let list_keys: Vec<String> = overrides
            .keys()
            .filter(|key| key.ends_with("__INPUT_TOPICS"))
            .map(|key| key[ENV_PREFIX.len() + 2..].to_lowercase().replace("__", "."))
            .collect();
        let mut environment =
            config::Environment::with_prefix(ENV_PREFIX).prefix_separator("__").separator("__").try_parsing(true);
        if !list_keys.is_empty() {
            // Without named list keys, `config` would split every string value on the separator.
            environment = environment.list_separator(",");
            for key in &list_keys {
                environment = environment.with_list_parse_key(key);
            }
        }
        let mut settings: Settings = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .add_source(environment.source(Some(overrides)))
            .build()
            .and_then(|merged| merged.try_deserialize())
            .map_err(parse_error)?;
        settings.validate()?;
        let mut problems = settings.kafka.read_secret_files().err().unwrap_or_default();
        for (name, line) in settings.lines.iter_mut() {
            if let Some(retrain) = line.retrain.as_mut() {
                if let Err(problem) = retrain.read_signing_key_file(name) {
                    problems.push(problem);
                }
                if retrain.signing_key.as_ref().is_some_and(|key| key.expose().len() < MIN_SIGNING_KEY_BYTES) {
                    problems.push(format!(
                        "lines.{name}.retrain.signing_key: shorter than {MIN_SIGNING_KEY_BYTES} bytes; use a random \
                         key (e.g. `openssl rand -hex 32`)"
                    ));
                }
            }
        }
        if !problems.is_empty() {
            return Err(ConfigError::Invalid { problems });
        }
        Ok(settings)
    }

    /// Every problem at once, each naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if self.kafka.brokers.trim().is_empty() {
            problems.push("kafka.brokers: empty; give `host:port[,host:port…]`".to_string());
        }
        if !self.metrics.listen.is_empty() && self.metrics.listen.parse::<SocketAddr>().is_err() {
            problems.push(format!("metrics.listen: {:?} is not an address like 0.0.0.0:9464", self.metrics.listen));
        }
        if self.metrics.stalled_after_secs == 0 {
            problems.push("metrics.stalled_after_secs: must be > 0".into());
        }
        if self.shutdown.commit_interval_ms == 0 {
            problems.push("shutdown.commit_interval_ms: must be > 0".into());
        }
        if self.lines.is_empty() {
            problems.push("lines: no product line configured; add a [lines.<name>] table".into());
        }
        let producer_limit = match self.kafka.producer.get("message.max.bytes") {
            None => Some(crate::service::kafka::MAX_MESSAGE_BYTES),
            Some(text) => text.trim().parse::<usize>().ok().or_else(|| {
                problems.push(format!("kafka.producer.\"message.max.bytes\": {text:?} is not a number of bytes"));
                None
            }),
        };
        let mut groups = BTreeMap::new();
        for (name, line) in &self.lines {
            let key = |field: &str| format!("lines.{name}.{field}");
            if !name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-') {
                problems.push(format!("lines.{name}: line names use a-z, 0-9, _ and - (they become metric labels)"));
            }
            if line.input_topics.is_empty() || line.input_topics.iter().any(|t| t.trim().is_empty()) {
                problems.push(format!("{}: give at least one non-empty topic", key("input_topics")));
            }
            for (field, topic) in
                [("results_topic", &line.results_topic), ("dead_letter_topic", &line.dead_letter_topic)]
            {
                if topic.trim().is_empty() {
                    problems.push(format!("{}: empty", key(field)));
                }
                if line.input_topics.contains(topic) {
                    problems.push(format!("{}: {topic:?} is also an input topic (a loop)", key(field)));
                }
            }
            if line.input_topics.contains(&line.maps_topic) {
                problems.push(format!("{}: {:?} is also an input topic (a loop)", key("maps_topic"), line.maps_topic));
            }
            if !(line.threshold.is_finite()) {
                problems.push(format!("{}: {} is not a finite number", key("threshold"), line.threshold));
            }
            if line.inference_workers == 0 || line.inference_workers > 64 {
                problems.push(format!("{}: {} (expected 1..=64)", key("inference_workers"), line.inference_workers));
            }
            if line.inference_threads > 1024 {
                problems.push(format!(
                    "{}: {} (expected 0..=1024; 0 shares the process's CPU threads out over the line's workers)",
                    key("inference_threads"),
                    line.inference_threads
                ));
            }
            if line.max_batch == 0 || line.max_batch > 256 {
                problems.push(format!("{}: {} (expected 1..=256)", key("max_batch"), line.max_batch));
            }
            if line.max_in_flight == 0 {
                problems.push(format!("{}: must be > 0", key("max_in_flight")));
            } else if line.max_in_flight < line.max_batch {
                problems.push(format!(
                    "{}: {} is below max_batch {} (batches could never fill)",
                    key("max_in_flight"),
                    line.max_in_flight,
                    line.max_batch
                ));
            }
            if line.max_frame_bytes == 0 {
                problems.push(format!("{}: must be > 0", key("max_frame_bytes")));
            }
            if let Some([w, h]) = line.expected_size {
                if w == 0 || h == 0 {
                    problems.push(format!("{}: [{w}, {h}] has a zero side", key("expected_size")));
                } else if let Some(limit) = line.decode_limits().exceeded(w, h) {
                    problems
                        .push(format!("{}: [{w}, {h}] is refused by the image limits ({limit})", key("expected_size")));
                }
            }
            let least = MIN_IMAGE_SIDE as u64;
            for (field, value, least) in [
                ("max_image_width", line.max_image_width as u64, least),
                ("max_image_height", line.max_image_height as u64, least),
                ("max_image_pixels", line.max_image_pixels, least * least),
            ] {
                if value < least {
                    problems
                        .push(format!("{}: {value} (at least {least}, the smallest image a model reads)", key(field)));
                }
            }
            if let Some(retrain) = &line.retrain {
                retrain.problems(line, &key, &mut problems);
                // An accepted frame is republished whole: a frame the line takes must fit what its
                // producer sends, or it could never be published (dead letters shed their payload instead).
                if let Some(limit) = producer_limit.filter(|limit| line.max_frame_bytes + HEADERS_ROOM > *limit) {
                    problems.push(format!(
                        "{}: {} bytes and their headers do not fit the producer's message.max.bytes ({limit}): \
                         accepted frames could not be published; lower it or raise kafka.producer.\"message.max.bytes\"",
                        key("max_frame_bytes"),
                        line.max_frame_bytes
                    ));
                }
            }
            let group = line.group_id(name);
            if let Some(other) = groups.insert(group.clone(), name.clone()) {
                problems.push(format!(
                    "{}: consumer group {group:?} is also used by line {other:?}; lines need their own groups",
                    key("group_id")
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid { problems })
        }
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown.drain_timeout_secs)
    }

    pub fn commit_interval(&self) -> Duration {
        Duration::from_millis(self.shutdown.commit_interval_ms)
    }

    /// How long a line's producer may leave records undelivered before it is replaced; `None`: never.
    pub fn producer_stall(&self) -> Option<Duration> {
        (self.kafka.producer_stall_secs > 0).then(|| Duration::from_secs(self.kafka.producer_stall_secs))
    }
}

impl KafkaSettings {
    /// Plain settings for a cluster (tools, tests, the demo): no extra librdkafka properties.
    pub fn for_brokers(brokers: &str, client_id: &str) -> KafkaSettings {
        KafkaSettings {
            brokers: brokers.to_string(),
            client_id: client_id.to_string(),
            consumer: BTreeMap::new(),
            producer: BTreeMap::new(),
            secrets: BTreeMap::new(),
            secret_files: BTreeMap::new(),
            producer_stall_secs: default_producer_stall_secs(),
        }
    }
}

impl LineSettings {
    /// A line with every optional key at its documented default.
    pub fn with_defaults(model: PathBuf, input_topics: Vec<String>, threshold: f32) -> LineSettings {
        LineSettings {
            model,
            input_topics,
            results_topic: default_results_topic(),
            maps_topic: default_maps_topic(),
            dead_letter_topic: default_dead_letter_topic(),
            group_id: None,
            threshold,
            map_format: default_map_format(),
            device: default_device(),
            precision: Precision::F32,
            preprocess_workers: 0,
            inference_workers: default_inference_workers(),
            inference_threads: 0,
            max_batch: default_max_batch(),
            max_batch_wait_ms: default_max_batch_wait_ms(),
            max_in_flight: default_max_in_flight(),
            max_frame_bytes: default_max_frame_bytes(),
            expected_size: None,
            max_image_width: default_max_image_width(),
            max_image_height: default_max_image_height(),
            max_image_pixels: default_max_image_pixels(),
            retrain: None,
        }
    }

    pub fn group_id(&self, line_name: &str) -> String {
        self.group_id.clone().unwrap_or_else(|| format!("lineguard-{line_name}"))
    }

    /// The maps topic when maps are published at all.
    pub fn maps_output(&self) -> Option<&str> {
        (self.map_format != MapFormat::None && !self.maps_topic.is_empty()).then_some(self.maps_topic.as_str())
    }

    pub fn decode_limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_width: self.max_image_width,
            max_height: self.max_image_height,
            max_pixels: self.max_image_pixels,
        }
    }

    pub fn max_batch_wait(&self) -> Duration {
        Duration::from_millis(self.max_batch_wait_ms)
    }

    pub fn workers(&self) -> usize {
        if self.preprocess_workers > 0 {
            self.preprocess_workers
        } else {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[kafka]
brokers = "127.0.0.1:9092"

[lines.juice]
model = "model.safetensors"
input_topics = ["frames"]
threshold = 0.4
"#;

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Settings::from_toml(text, Path::new("test.toml"), env)
    }

    #[test]
    fn minimal_file_gets_documented_defaults() {
        let with_extra =
            MINIMAL.replace("[lines.juice]", "[kafka.consumer]\n\"session.timeout.ms\" = \"6000\"\n[lines.juice]");
        let settings = parse(&with_extra, &[]).unwrap();
        assert_eq!(settings.kafka.consumer.get("session.timeout.ms").map(String::as_str), Some("6000"));
        let line = &settings.lines["juice"];
        assert_eq!(line, &LineSettings::with_defaults("model.safetensors".into(), vec!["frames".into()], 0.4));
        assert_eq!(line.results_topic, "lineguard.results");
        assert_eq!(line.maps_output(), Some("lineguard.maps"));
        assert_eq!(line.group_id("juice"), "lineguard-juice");
        assert_eq!(
            (line.max_batch, line.max_batch_wait_ms, line.max_in_flight, line.inference_workers),
            (8, 20, 64, 1)
        );
        assert_eq!(settings.metrics.listen, "0.0.0.0:9464");
    }

    #[test]
    fn precision_is_read_from_the_file_and_the_environment_and_checked() {
        assert_eq!(parse(MINIMAL, &[]).unwrap().lines["juice"].precision, Precision::F32, "f32 by default");
        let in_file = MINIMAL.replace("threshold = 0.4", "threshold = 0.4\nprecision = \"bf16\"");
        assert_eq!(parse(&in_file, &[]).unwrap().lines["juice"].precision, Precision::Bf16);
        let from_env = parse(MINIMAL, &[("LINEGUARD__LINES__JUICE__PRECISION", "f16")]).unwrap();
        assert_eq!(from_env.lines["juice"].precision, Precision::F16);
        let wrong = MINIMAL.replace("threshold = 0.4", "threshold = 0.4\nprecision = \"int8\"");
        let error = parse(&wrong, &[]).unwrap_err().to_string();
        assert!(error.contains("int8"), "{error}");
    }

    #[test]
    fn secret_files_lose_one_trailing_newline_only() {
        let dir = tempfile::tempdir().unwrap();
        for (written, read) in [("key", "key"), ("key\n", "key"), ("key\r\n", "key"), ("key\n\n", "key\n")] {
            let path = dir.path().join("secret");
            std::fs::write(&path, written).unwrap();
            assert_eq!(read_secret_file(&path).unwrap().expose(), read, "{written:?}");
        }
        let missing = read_secret_file(&dir.path().join("absent")).unwrap_err();
        assert!(missing.starts_with("cannot read") && missing.contains("absent"), "{missing}");
    }

    #[test]
    fn secrets_are_redacted_in_debug_and_serialisation() {
        let settings = parse(MINIMAL, &[("LINEGUARD__KAFKA__SECRETS__SASL_PASSWORD", "hunter2")]).unwrap();
        assert_eq!(settings.kafka.secret_properties().collect::<Vec<_>>(), vec![("sasl.password".into(), "hunter2")]);
        let printed = format!("{settings:?}{}", serde_json::to_string(&settings).unwrap());
        assert!(!printed.contains("hunter2") && printed.contains(REDACTED), "{printed}");
        assert!(is_credential("sasl.password") && is_credential("ssl.key.pem") && !is_credential("security.protocol"));
    }

    #[test]
    fn environment_overrides_nested_keys_and_lists() {
        let settings = parse(
            MINIMAL,
            &[
                ("LINEGUARD__KAFKA__BROKERS", "k1:9092,k2:9092"),
                ("LINEGUARD__KAFKA__CLIENT_ID", "plant,7"),
                ("LINEGUARD__LINES__JUICE__THRESHOLD", "0.75"),
                ("LINEGUARD__LINES__JUICE__INPUT_TOPICS", "a,b"),
                ("OTHER__KAFKA__BROKERS", "ignored"),
            ],
        )
        .unwrap();
        assert_eq!(settings.kafka.brokers, "k1:9092,k2:9092");
        assert_eq!(settings.kafka.client_id, "plant,7", "only list keys are split");
        assert_eq!(settings.lines["juice"].threshold, 0.75);
        assert_eq!(settings.lines["juice"].input_topics, vec!["a".to_string(), "b".to_string()]);
    }

    #[test]
    fn unknown_and_mistyped_keys_are_named() {
        let err = parse(&format!("{MINIMAL}treshold = 0.3\n"), &[]).unwrap_err().to_string();
        assert!(err.contains("treshold"), "{err}");
        let err = parse(&MINIMAL.replace("0.4", "\"high\""), &[]).unwrap_err().to_string();
        assert!(err.contains("threshold"), "{err}");
        let err = parse(MINIMAL, &[("LINEGUARD__LINES__JUICE__THRESHOLD", "abc")]).unwrap_err().to_string();
        assert!(err.contains("lines.juice.threshold") && err.contains("string"), "{err}");
    }

    #[test]
    fn retraining_tables_get_defaults_and_are_checked_whole() {
        let settings = parse(&format!("{MINIMAL}[lines.juice.retrain]\naccept_below = 0.3\n"), &[]).unwrap();
        let retrain = settings.lines["juice"].retrain.as_ref().unwrap();
        assert_eq!(retrain, &RetrainSettings { accept_below: 0.3, ..RetrainSettings::default() });
        assert_eq!(retrain.line_dir("juice"), Path::new("lineguard-state/juice"));

        let broken = format!(
            "{MINIMAL}[lines.juice.retrain]\naccept_below = 0.5\nmodels_topic = \"frames\"\nholdout_every = 1\n\
             keep_versions = 1\nsteps_per_minute = 0\nfpr_tolerance = 2\naccept_per_minute = -1\n\
             marked_share = 1\n"
        );
        let err = parse(&broken, &[]).unwrap_err().to_string();
        for needle in [
            "lines.juice.retrain.accept_below: 0.5 is not below the line's threshold 0.4",
            "\"frames\" is also one of the line's other topics",
            "lines.juice.retrain.holdout_every",
            "lines.juice.retrain.keep_versions",
            "lines.juice.retrain.steps_per_minute",
            "lines.juice.retrain.fpr_tolerance",
            "lines.juice.retrain.accept_per_minute: -1",
            "lines.juice.retrain.marked_share: 1",
        ] {
            assert!(err.contains(needle), "missing {needle} in:\n{err}");
        }
        let missing = parse(&format!("{MINIMAL}[lines.juice.retrain]\n"), &[]).unwrap_err().to_string();
        assert!(missing.contains("retrain.accept_below: required"), "{missing}");
    }

    #[test]
    fn limits_that_could_never_publish_or_decode_are_refused_at_start() {
        let retrain = "[lines.juice.retrain]\naccept_below = 0.3\n";
        let small_producer = "[kafka.producer]\n\"message.max.bytes\" = \"1000000\"\n";
        let err = parse(&format!("{MINIMAL}{retrain}{small_producer}"), &[]).unwrap_err().to_string();
        assert!(err.contains("lines.juice.max_frame_bytes: 8388608 bytes and their headers do not fit"), "{err}");
        let fits = format!("{MINIMAL}max_frame_bytes = 900000\n{retrain}{small_producer}");
        assert!(parse(&fits, &[]).is_ok(), "a frame that fits with room for headers");
        assert!(parse(&format!("{MINIMAL}{small_producer}"), &[]).is_ok(), "dead letters shed their payload");

        let err = parse(&format!("{MINIMAL}max_image_pixels = 100\nexpected_size = [2000, 1000]\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("lines.juice.max_image_pixels: 100 (at least 256"), "{err}");
        assert!(err.contains("lines.juice.expected_size: [2000, 1000] is refused by the image limits"), "{err}");
    }

    #[test]
    fn validation_lists_every_problem_with_its_key() {
        let text = r#"
[kafka]
brokers = ""
[metrics]
listen = "nowhere"
[lines.a]
model = "m"
input_topics = ["frames"]
results_topic = "frames"
threshold = 0.4
max_batch = 16
max_in_flight = 4
inference_workers = 0
inference_threads = 5000
[lines.b]
model = "m"
input_topics = []
threshold = 0.4
group_id = "lineguard-a"
"#;
        let err = parse(text, &[]).unwrap_err().to_string();
        for needle in [
            "kafka.brokers",
            "metrics.listen",
            "lines.a.results_topic",
            "lines.a.max_in_flight",
            "lines.a.inference_workers",
            "lines.a.inference_threads",
            "lines.b.input_topics",
            "lines.b.group_id",
        ] {
            assert!(err.contains(needle), "missing {needle} in:\n{err}");
        }
    }
}
