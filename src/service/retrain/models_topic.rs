//! Promoted models on Kafka, so that every replica of a line serves the same version.
//!
//! A publication is the model file cut into chunks of at most [`CHUNK_BYTES`] (under any broker's default
//! message limit), keyed `<line>/chunk/<i>`, followed by a JSON [`Manifest`] keyed `<line>/manifest`.
//! The topic has one partition, so chunks precede their manifest and the last manifest is the newest.
//! Keys repeat from one publication to the next, so a compacted topic keeps only the newest model of
//! each line; chunks carry their publication id and a manifest only completes with the chunks of its own
//! publication (checked by length and checksum), so leftovers of older publications are ignored.
//!
//! Followers read the topic from the beginning without a consumer group: a replica that starts late
//! catches up to the newest complete publication before it serves, then keeps following.
//!
//! The topic is a way in for whoever can write to it, so a follower trusts nothing it reads: with a
//! signing key (`retrain.signing_key`), a manifest carries an HMAC-SHA256 over the line, version,
//! publication and the model's SHA-256, and unsigned or wrongly signed publications are ignored;
//! reassembly holds at most [`MAX_MODEL_BYTES`]; the model file's recipe is validated before any network
//! is built (see `EfficientAd::from_bytes`); and the topic must have exactly one partition.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tch::Device;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::buffer::fnv64;
use crate::model::EfficientAd;
use crate::service::infer::{ModelSwapper, SwapRefused};
use crate::service::metrics::{LineHealth, ProducerReplacement};
use crate::service::settings::{KafkaSettings, Secret};

pub const CHUNK_BYTES: usize = 900 * 1024;
/// The largest model file a follower reassembles (an EfficientAD-S file is about 30 MB in f32): chunks
/// beyond it, or a manifest declaring more, are dropped, so the topic cannot make a replica's memory grow.
pub const MAX_MODEL_BYTES: usize = 256 << 20;
pub const HEADER_PUBLICATION: &str = "lineguard_publication";
pub const HEADER_CHUNK: &str = "lineguard_chunk";

/// The last record of a publication.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub line: String,
    pub model_version: u64,
    /// Unique per publication: a rollback republishes an older version under a new id.
    pub publication: String,
    pub chunks: u32,
    pub bytes: u64,
    /// FNV-1a of the whole model file, hex.
    pub checksum: String,
    pub published_unix: u64,
    /// `initial`, `promoted` or `rollback`.
    pub origin: String,
    /// SHA-256 of the whole model file, hex (what the signature covers).
    #[serde(default)]
    pub sha256: String,
    /// HMAC-SHA256 (hex) with the line's signing key over `Manifest::signed_text`; absent when unsigned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

type HmacSha256 = Hmac<Sha256>;

impl Manifest {
    /// What the signature covers: which line, which version, which publication, and the exact bytes.
    fn signed_text(&self) -> String {
        format!(
            "lineguard-model\n{}\n{}\n{}\n{}\n{}",
            self.line, self.model_version, self.publication, self.bytes, self.sha256
        )
    }

    fn sign(&mut self, key: &Secret) {
        let mut mac = hmac_for(key);
        mac.update(self.signed_text().as_bytes());
        self.signature = Some(hex(&mac.finalize().into_bytes()));
    }

    /// Whether the signature is the key's (compared in constant time).
    fn signed_by(&self, key: &Secret) -> bool {
        let Some(signature) = self.signature.as_deref().and_then(unhex) else { return false };
        let mut mac = hmac_for(key);
        mac.update(self.signed_text().as_bytes());
        mac.verify_slice(&signature).is_ok()
    }
}

fn hmac_for(key: &Secret) -> HmacSha256 {
    // HMAC takes keys of any length.
    <HmacSha256 as Mac>::new_from_slice(key.expose().as_bytes()).expect("HMAC accepts any key length")
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

/// A complete publication: its manifest and the model file's bytes.
pub struct Published {
    pub manifest: Manifest,
    pub model: Vec<u8>,
}

fn manifest_key(line: &str) -> String {
    format!("{line}/manifest")
}

fn chunk_key(line: &str, index: usize) -> String {
    format!("{line}/chunk/{index}")
}

/// Publishes `model` (the bytes of a model file) as `version`, signed with `key` when given; returns once
/// the broker has every record.
pub async fn publish(
    producer: &FutureProducer,
    topic: &str,
    line: &str,
    model: &[u8],
    version: u64,
    origin: &str,
    key: Option<&Secret>,
) -> Result<Manifest, rdkafka::error::KafkaError> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let publication = format!("v{version}-{}-{}", now.as_millis(), std::process::id());
    let chunks: Vec<&[u8]> = model.chunks(CHUNK_BYTES).collect();
    for (index, chunk) in chunks.iter().enumerate() {
        let index_text = index.to_string();
        let headers = crate::service::kafka::to_owned_headers([
            (HEADER_PUBLICATION, publication.as_bytes()),
            (HEADER_CHUNK, index_text.as_bytes()),
        ]);
        let key = chunk_key(line, index);
        let record = FutureRecord::to(topic).key(&key).payload(*chunk).headers(headers);
        producer.send(record, Timeout::After(Duration::from_secs(30))).await.map_err(|(err, _)| err)?;
    }
    let mut manifest = Manifest {
        line: line.to_string(),
        model_version: version,
        publication,
        chunks: chunks.len() as u32,
        bytes: model.len() as u64,
        checksum: format!("{:016x}", fnv64(model)),
        published_unix: now.as_secs(),
        origin: origin.to_string(),
        sha256: sha256_hex(model),
        signature: None,
    };
    if let Some(key) = key {
        manifest.sign(key);
    }
    let json = serde_json::to_vec(&manifest).unwrap_or_default();
    let key = manifest_key(line);
    producer
        .send(FutureRecord::to(topic).key(&key).payload(&json), Timeout::After(Duration::from_secs(30)))
        .await
        .map_err(|(err, _)| err)?;
    Ok(manifest)
}

/// The trainer's way to the models topic. A publication that fails, or has not been delivered within its
/// timeout, is tried again later (after 5 s, doubling up to 5 min) while training goes on. When the client
/// failed fatally or the publication timed out, the next try goes through a fresh client: librdkafka's
/// idempotent producer can retry for ever against a broker that lost its producer state (see
/// `sink::publisher`); before, every try after a broker restart waited out librdkafka's 5-minute delivery
/// timeout on the stuck client, with training held. A timed-out publication's chunks are left on the
/// topic without their manifest, which followers ignore; the next try is a new publication.
pub struct ModelPublisher {
    config: rdkafka::ClientConfig,
    producer: FutureProducer,
    timeout: Duration,
    backoff: Duration,
    retry_at: Option<Instant>,
}

const FIRST_RETRY: Duration = Duration::from_secs(5);
const LAST_RETRY: Duration = Duration::from_secs(300);

/// A publication that did not go out, and what was done about it.
#[derive(Debug, thiserror::Error)]
#[error("{cause}; trying again in {}s{}", retry_in.as_secs(), if replaced.is_some() { " through a fresh client" } else { "" })]
pub struct PublishFailure {
    pub cause: String,
    /// Why the client was replaced, if it was.
    pub replaced: Option<ProducerReplacement>,
    pub retry_in: Duration,
}

impl ModelPublisher {
    /// `timeout`: how long one publication may take (a model of 30 MB takes seconds on a healthy broker).
    pub fn new(config: rdkafka::ClientConfig, timeout: Duration) -> rdkafka::error::KafkaResult<ModelPublisher> {
        let producer = config.create()?;
        Ok(ModelPublisher { config, producer, timeout, backoff: FIRST_RETRY, retry_at: None })
    }

    /// Whether a publication may be tried now: not before the retry time of a failed one.
    pub fn ready(&self, now: Instant) -> bool {
        self.retry_at.is_none_or(|at| now >= at)
    }

    /// [`publish`] through the current client, within the timeout.
    pub async fn publish(
        &mut self,
        topic: &str,
        line: &str,
        model: &[u8],
        version: u64,
        origin: &str,
        key: Option<&Secret>,
    ) -> Result<Manifest, PublishFailure> {
        let attempt = publish(&self.producer, topic, line, model, version, origin, key);
        let (cause, mut replaced) = match tokio::time::timeout(self.timeout, attempt).await {
            Ok(Ok(manifest)) => {
                (self.backoff, self.retry_at) = (FIRST_RETRY, None);
                return Ok(manifest);
            }
            Ok(Err(err)) => match crate::service::kafka::fatal_reason(self.producer.client(), &err) {
                Some(reason) => (format!("the producer failed fatally ({reason})"), Some(ProducerReplacement::Fatal)),
                // Refused, or a transient error: the same client may succeed next time.
                None => (err.to_string(), None),
            },
            Err(_) => {
                (format!("not delivered within {}s", self.timeout.as_secs_f64()), Some(ProducerReplacement::Stalled))
            }
        };
        if replaced.is_some() {
            match self.config.create() {
                // Dropping the old client purges what it still holds (a second at most).
                Ok(fresh) => drop(std::mem::replace(&mut self.producer, fresh)),
                Err(err) => {
                    log::error!("cannot create a fresh producer for the models topic: {err}");
                    replaced = None;
                }
            }
        }
        let retry_in = self.backoff;
        self.retry_at = Some(Instant::now() + retry_in);
        self.backoff = (self.backoff * 2).min(LAST_RETRY);
        Err(PublishFailure { cause, replaced, retry_in })
    }
}

/// Reassembles publications of one line from the records of the models topic, in topic order.
pub struct Assembler {
    line: String,
    /// Publications must carry this key's signature, when set.
    key: Option<Secret>,
    /// Chunks by publication id, then index.
    pending: HashMap<String, BTreeMap<u32, Vec<u8>>>,
    /// Bytes held in `pending`, at most `max_bytes`.
    pending_bytes: usize,
    max_bytes: usize,
}

impl Assembler {
    pub fn new(line: &str, key: Option<Secret>) -> Assembler {
        Assembler::with_limit(line, key, MAX_MODEL_BYTES)
    }

    /// An assembler that holds at most `max_bytes` of chunks and assembles no larger model.
    pub fn with_limit(line: &str, key: Option<Secret>, max_bytes: usize) -> Assembler {
        Assembler { line: line.to_string(), key, pending: HashMap::new(), pending_bytes: 0, max_bytes }
    }

    /// Bytes of chunks held while waiting for their manifest (at most the limit).
    pub fn held_bytes(&self) -> usize {
        self.pending_bytes
    }

    /// Takes one record; returns the publication it completes, if any.
    pub fn offer(&mut self, key: &[u8], publication: Option<&[u8]>, payload: &[u8]) -> Option<Published> {
        let key = std::str::from_utf8(key).ok()?;
        let rest = key.strip_prefix(&self.line)?.strip_prefix('/')?;
        if rest == "manifest" {
            let manifest: Manifest = match serde_json::from_slice(payload) {
                Ok(manifest) => manifest,
                Err(err) => {
                    log::warn!("models topic: unreadable manifest for line {}: {err}", self.line);
                    return None;
                }
            };
            let chunks = self.pending.remove(&manifest.publication).unwrap_or_default();
            // Anything older than this manifest can never complete any more.
            self.pending.clear();
            self.pending_bytes = 0;
            if manifest.bytes > self.max_bytes as u64 {
                log::warn!(
                    "models topic: publication {} declares {} bytes; ignored",
                    manifest.publication,
                    manifest.bytes
                );
                return None;
            }
            if chunks.len() != manifest.chunks as usize || chunks.keys().copied().ne(0..manifest.chunks) {
                log::warn!(
                    "models topic: publication {} of line {} is incomplete ({} of {} chunks; compacted away?)",
                    manifest.publication,
                    self.line,
                    chunks.len(),
                    manifest.chunks
                );
                return None;
            }
            let model: Vec<u8> = chunks.into_values().flatten().collect();
            if model.len() as u64 != manifest.bytes || format!("{:016x}", fnv64(&model)) != manifest.checksum {
                log::warn!("models topic: publication {} fails its checksum; ignored", manifest.publication);
                return None;
            }
            if let Some(key) = &self.key {
                if manifest.sha256 != sha256_hex(&model) || !manifest.signed_by(key) {
                    log::error!(
                        "models topic: publication {} of line {} (version {}) is not signed with this line's \
                         key; ignored (someone wrote to the topic who should not, or the keys differ)",
                        manifest.publication,
                        self.line,
                        manifest.model_version
                    );
                    return None;
                }
            }
            return Some(Published { manifest, model });
        }
        let index: u32 = rest.strip_prefix("chunk/")?.parse().ok()?;
        let publication = String::from_utf8(publication?.to_vec()).ok()?;
        if self.pending_bytes + payload.len() > self.max_bytes {
            log::warn!(
                "models topic: more than {} bytes of chunks for line {} without a manifest; dropped",
                self.max_bytes,
                self.line
            );
            self.pending.clear();
            self.pending_bytes = 0;
            return None;
        }
        let chunks = self.pending.entry(publication).or_default();
        self.pending_bytes += payload.len();
        if let Some(replaced) = chunks.insert(index, payload.to_vec()) {
            self.pending_bytes -= replaced.len();
        }
        None
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error(transparent)]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(
        "models topic {topic} has {partitions} partitions: it needs exactly one, which orders a publication's \
         chunks before its manifest (was it auto-created? delete it and let lineguard create it)"
    )]
    Layout { topic: String, partitions: usize },
}

impl From<FeedError> for super::RetrainError {
    fn from(err: FeedError) -> Self {
        match err {
            FeedError::Kafka(err) => super::RetrainError::Kafka(err),
            layout => super::RetrainError::Data(layout.to_string()),
        }
    }
}

/// Follows the models topic for one line (blocking calls; use from a thread).
pub struct ModelFeed {
    consumer: BaseConsumer,
    assembler: Assembler,
    topic: String,
}

impl ModelFeed {
    /// Reads `topic` from its beginning; no consumer group offsets are used or committed. Publications
    /// must be signed with `key` when one is given.
    pub fn open(
        kafka: &KafkaSettings,
        topic: &str,
        line: &str,
        key: Option<&Secret>,
    ) -> Result<ModelFeed, rdkafka::error::KafkaError> {
        let group = format!("lineguard-models-{line}-{}-{}", std::process::id(), rand::random::<u32>());
        // New models are rare: a fetch that waits long for data keeps the broker from re-serving the end of
        // a large topic several times a second (which costs a small broker whole cores).
        let consumer: BaseConsumer = crate::service::kafka::consumer_config(kafka, &group)
            .set("statistics.interval.ms", "0")
            .set("fetch.wait.max.ms", "10000")
            .create()?;
        let mut partitions = TopicPartitionList::new();
        partitions.add_partition_offset(topic, 0, Offset::Beginning)?;
        consumer.assign(&partitions)?;
        Ok(ModelFeed { consumer, assembler: Assembler::new(line, key.cloned()), topic: topic.to_string() })
    }

    /// Checks the topic's layout, reads everything published so far and returns the newest complete
    /// publication.
    pub fn catch_up(&mut self, timeout: Duration) -> Result<Option<Published>, FeedError> {
        let deadline = Instant::now() + timeout;
        let metadata = self.consumer.fetch_metadata(Some(&self.topic), timeout)?;
        let partitions = metadata.topics().first().map_or(0, |topic| topic.partitions().len());
        if partitions > 1 {
            return Err(FeedError::Layout { topic: self.topic.clone(), partitions });
        }
        let (_, high) = self.consumer.fetch_watermarks(&self.topic, 0, timeout)?;
        let mut newest = None;
        let mut position = -1;
        while position + 1 < high && Instant::now() < deadline {
            match self.consumer.poll(Duration::from_millis(200)) {
                Some(Ok(message)) => {
                    position = message.offset();
                    if let Some(published) = take(&mut self.assembler, &message) {
                        newest = Some(published);
                    }
                }
                Some(Err(err)) => return Err(err.into()),
                None => {}
            }
        }
        if position + 1 < high {
            log::warn!("models topic {}: caught up to offset {position} of {high} before the timeout", self.topic);
        }
        Ok(newest)
    }

    /// The next complete publication, waiting at most `timeout`.
    pub fn poll(&mut self, timeout: Duration) -> Option<Published> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.consumer.poll(left) {
                Some(Ok(message)) => {
                    if let Some(published) = take(&mut self.assembler, &message) {
                        return Some(published);
                    }
                }
                Some(Err(err)) => {
                    log::warn!("models topic {}: {err}", self.topic);
                    return None;
                }
                None => return None,
            }
            if left.is_zero() {
                return None;
            }
        }
    }
}

/// Where a follower reads the line's publications: the models topic ([`ModelFeed`]) or a unit test's
/// stand-in.
pub trait Publications: Send + 'static {
    /// The next complete publication, waiting at most `timeout`.
    fn next_publication(&mut self, timeout: Duration) -> Option<Published>;
}

impl Publications for ModelFeed {
    fn next_publication(&mut self, timeout: Duration) -> Option<Published> {
        self.poll(timeout)
    }
}

/// Runs a replica's follower until `stop`: every newer publication of the line is loaded onto `device`
/// and handed to the inference stage, which swaps it in between batches. When several publications
/// arrived meanwhile, only the newest is loaded. The thread ends only when stopped, or on a panic, which
/// marks the line's stage dead (`/healthz` 503, so the orchestrator restarts the replica) instead of
/// leaving it silently on an old model; its result type is the other stages'.
pub fn follow(
    line: String,
    mut feed: impl Publications,
    swapper: ModelSwapper,
    serving_version: u64,
    device: Device,
    stop: Arc<AtomicBool>,
    health: Arc<LineHealth>,
) -> std::io::Result<JoinHandle<Result<(), String>>> {
    std::thread::Builder::new().name(format!("models-{line}")).spawn(move || {
        let followed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            follow_until_stopped(&line, &mut feed, &swapper, serving_version, device, &stop)
        }));
        followed.map_err(|panic| {
            let message = crate::service::panic_message(&*panic);
            health.stage_dead.store(true, Ordering::Relaxed);
            let reason = format!("the models follower of line {line} panicked ({message}); /healthz reports it");
            log::error!("{reason}");
            reason
        })
    })
}

fn follow_until_stopped(
    line: &str,
    feed: &mut impl Publications,
    swapper: &ModelSwapper,
    mut serving_version: u64,
    device: Device,
    stop: &AtomicBool,
) {
    let mut pending: Option<EfficientAd> = None;
    while !stop.load(Ordering::Relaxed) {
        let mut newest = feed.next_publication(Duration::from_millis(200));
        while let Some(next) = feed.next_publication(Duration::ZERO) {
            newest = Some(next);
        }
        if let Some(Published { manifest, model }) = newest {
            let differs = manifest.model_version != serving_version
                || pending.as_ref().is_some_and(|p| p.info.model_version != manifest.model_version);
            if differs {
                match EfficientAd::from_bytes(&model, std::path::Path::new("<models topic>"), device) {
                    Ok(model) => pending = Some(model),
                    Err(err) => log::error!(
                        "line {line}: model version {} from the models topic does not load: {err}",
                        manifest.model_version
                    ),
                }
            }
        }
        if let Some(model) = pending.take() {
            let version = model.info.model_version;
            match swapper.try_swap(model) {
                Ok(()) => {
                    log::info!("line {line}: model version {version} queued for the next batch");
                    serving_version = version;
                }
                Err(SwapRefused { model: Some(model), .. }) => pending = Some(*model), // still pending
                Err(SwapRefused { error, .. }) => {
                    log::error!("line {line}: cannot serve model version {version}: {error}")
                }
            }
        }
    }
}

fn take(assembler: &mut Assembler, message: &rdkafka::message::BorrowedMessage<'_>) -> Option<Published> {
    let publication =
        message.headers().and_then(|h| h.iter().find(|h| h.key == HEADER_PUBLICATION).and_then(|h| h.value));
    assembler.offer(message.key().unwrap_or_default(), publication, message.payload().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(line: &str, model: &[u8], publication: &str, version: u64) -> Vec<(String, Option<String>, Vec<u8>)> {
        let chunks: Vec<&[u8]> = model.chunks(CHUNK_BYTES).collect();
        let mut out: Vec<(String, Option<String>, Vec<u8>)> = chunks
            .iter()
            .enumerate()
            .map(|(i, c)| (chunk_key(line, i), Some(publication.to_string()), c.to_vec()))
            .collect();
        let manifest = Manifest {
            line: line.into(),
            model_version: version,
            publication: publication.into(),
            chunks: chunks.len() as u32,
            bytes: model.len() as u64,
            checksum: format!("{:016x}", fnv64(model)),
            published_unix: 0,
            origin: "promoted".into(),
            sha256: sha256_hex(model),
            signature: None,
        };
        out.push((manifest_key(line), None, serde_json::to_vec(&manifest).unwrap()));
        out
    }

    /// The records of a publication signed with `key`.
    fn signed(
        line: &str,
        model: &[u8],
        publication: &str,
        version: u64,
        key: &Secret,
    ) -> Vec<(String, Option<String>, Vec<u8>)> {
        let mut out = records(line, model, publication, version);
        let last = out.last_mut().unwrap();
        let mut manifest: Manifest = serde_json::from_slice(&last.2).unwrap();
        manifest.sign(key);
        last.2 = serde_json::to_vec(&manifest).unwrap();
        out
    }

    /// Before: whoever could write to the topic replaced every replica's model.
    #[test]
    fn with_a_key_only_publications_signed_with_it_are_taken() {
        let key = Secret::new("0123456789abcdef-line-key");
        let mut assembler = Assembler::new("trays", Some(key.clone()));
        assert_eq!(feed(&mut assembler, &signed("trays", b"good model", "p1", 1, &key)), vec![1]);
        assert_eq!(feed(&mut assembler, &records("trays", b"unsigned", "p2", 2)), Vec::<u64>::new());
        let other = Secret::new("another-key-of-enough-length");
        assert_eq!(feed(&mut assembler, &signed("trays", b"wrong key", "p3", 3, &other)), Vec::<u64>::new());
        // A signed manifest cannot be reused for other bytes, nor for another version.
        let mut swapped = signed("trays", b"good model", "p4", 4, &key);
        swapped[0].2 = b"evil model".to_vec();
        let mut manifest: Manifest = serde_json::from_slice(&swapped[1].2).unwrap();
        manifest.checksum = format!("{:016x}", fnv64(b"evil model"));
        swapped[1].2 = serde_json::to_vec(&manifest).unwrap();
        assert_eq!(feed(&mut assembler, &swapped), Vec::<u64>::new());
        let mut bumped = signed("trays", b"good model", "p5", 5, &key);
        let mut manifest: Manifest = serde_json::from_slice(&bumped[1].2).unwrap();
        manifest.model_version = 99;
        bumped[1].2 = serde_json::to_vec(&manifest).unwrap();
        assert_eq!(feed(&mut assembler, &bumped), Vec::<u64>::new());
        assert_eq!(feed(&mut assembler, &signed("trays", b"next model", "p6", 6, &key)), vec![6]);
    }

    #[test]
    fn reassembly_holds_a_bounded_number_of_bytes() {
        let mut assembler = Assembler::with_limit("trays", None, 100);
        // Chunks of many publications that never get a manifest: dropped once they pass the limit.
        for i in 0..50 {
            assembler.offer(chunk_key("trays", 0).as_bytes(), Some(format!("junk{i}").as_bytes()), &[0u8; 30]);
            assert!(assembler.pending_bytes <= 100, "{}", assembler.pending_bytes);
        }
        // A manifest declaring more than the limit is refused before anything is assembled.
        assert_eq!(feed(&mut assembler, &records("trays", &[1u8; 150], "big", 7)), Vec::<u64>::new());
        assert_eq!(feed(&mut assembler, &records("trays", &[1u8; 60], "fits", 8)), vec![8]);
    }

    fn feed(assembler: &mut Assembler, records: &[(String, Option<String>, Vec<u8>)]) -> Vec<u64> {
        records
            .iter()
            .filter_map(|(k, p, v)| assembler.offer(k.as_bytes(), p.as_ref().map(|p| p.as_bytes()), v))
            .map(|published| {
                assert_eq!(published.model.len() as u64, published.manifest.bytes);
                published.manifest.model_version
            })
            .collect()
    }

    #[test]
    fn chunked_publications_reassemble_per_line_and_reject_gaps() {
        let big: Vec<u8> = (0..(2 * CHUNK_BYTES + 10)).map(|i| (i % 251) as u8).collect();
        let mut assembler = Assembler::new("trays", None);
        let mut all = records("trays", &big, "p1", 1);
        all.extend(records("bottles", b"other line", "q1", 9));
        all.extend(records("trays", b"small", "p2", 2));
        assert_eq!(feed(&mut assembler, &all), vec![1, 2], "other lines are ignored");

        // A compacted topic may have lost a chunk of an old publication: that one is skipped.
        let mut gap = records("trays", &big, "p3", 3);
        gap.remove(1);
        assert_eq!(feed(&mut assembler, &gap), Vec::<u64>::new());
        // A corrupted chunk fails the checksum.
        let mut corrupt = records("trays", b"abcdef", "p4", 4);
        corrupt[0].2[0] ^= 1;
        assert_eq!(feed(&mut assembler, &corrupt), Vec::<u64>::new());
        assert_eq!(feed(&mut assembler, &records("trays", b"fine", "p5", 5)), vec![5]);
    }

    /// A client that failed fatally (librdkafka's own test hook) costs one try: the next goes through a
    /// fresh client and the model reaches the topic. The retry waits, and the wait doubles.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_model_publication_whose_client_failed_fatally_goes_out_through_a_fresh_one() {
        let (_cluster, kafka) = crate::service::kafka::mock_cluster_with("models", &[]);
        let config = crate::service::kafka::producer_config(&kafka);
        let mut publisher = ModelPublisher::new(config, Duration::from_secs(60)).unwrap();
        crate::service::kafka::fail_fatally(&publisher.producer);
        let model = vec![7u8; CHUNK_BYTES + 5];
        let failure = publisher.publish("models", "trays", &model, 3, "promoted", None).await.unwrap_err();
        assert_eq!(failure.replaced, Some(ProducerReplacement::Fatal), "{failure}");
        assert!(failure.cause.contains("injected by the test"), "{failure}");
        assert_eq!(failure.retry_in, FIRST_RETRY);
        assert!(!publisher.ready(Instant::now()) && publisher.ready(Instant::now() + FIRST_RETRY));
        assert!(publisher.producer.client().fatal_error().is_none(), "a fresh client");
        let manifest = publisher.publish("models", "trays", &model, 3, "promoted", None).await.unwrap();
        assert_eq!((manifest.model_version, manifest.chunks, manifest.bytes), (3, 2, model.len() as u64));
        assert!(publisher.ready(Instant::now()), "a success clears the wait");
    }

    /// A publication not delivered within its timeout (what a client stuck on a lost producer id does)
    /// is given up for now, and the next try goes through a fresh client.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_model_publication_that_times_out_is_retried_later_through_a_fresh_client() {
        let (_cluster, kafka) = crate::service::kafka::mock_cluster_with("models", &[]);
        let config = crate::service::kafka::producer_config(&kafka);
        let mut publisher = ModelPublisher::new(config, Duration::ZERO).unwrap();
        let mut waits = Vec::new();
        for _ in 0..2 {
            let failure = publisher.publish("models", "trays", b"model", 4, "promoted", None).await.unwrap_err();
            assert_eq!(failure.replaced, Some(ProducerReplacement::Stalled), "{failure}");
            waits.push(failure.retry_in);
        }
        assert_eq!(waits, [FIRST_RETRY, FIRST_RETRY * 2]);
        publisher.timeout = Duration::from_secs(60);
        assert!(publisher.publish("models", "trays", b"model", 4, "promoted", None).await.is_ok());
    }

    /// A stand-in for the models topic: hands out its publications (`None`: nothing new), then panics.
    struct ThenPanics(std::collections::VecDeque<Option<Published>>);

    impl Publications for ThenPanics {
        fn next_publication(&mut self, _timeout: Duration) -> Option<Published> {
            self.0.pop_front().unwrap_or_else(|| panic!("injected failure"))
        }
    }

    /// The follower hands a publication to the inference stage; a panic in it (nothing in lineguard is
    /// known to panic there, so one is injected) ends the thread with a reason that names the line and
    /// marks the line's stage dead, which turns `/healthz` to 503, instead of leaving the replica
    /// silently on its model of the moment.
    #[test]
    fn the_follower_swaps_in_publications_and_a_panic_in_it_marks_the_line_s_stage_dead() {
        use crate::service::infer::{Batching, StageConfig};
        let model = crate::service::infer::tests::tiny_model(2, 128).to_bytes().unwrap();
        let mut assembler = Assembler::new("trays", None);
        let published = records("trays", &model, "p2", 2)
            .iter()
            .find_map(|(k, p, v)| assembler.offer(k.as_bytes(), p.as_ref().map(|p| p.as_bytes()), v));
        assert!(published.is_some());

        let (_to_infer, input) = crossbeam_channel::bounded(1);
        let (to_sink, _output) = tokio::sync::mpsc::channel(1);
        let metrics = crate::service::metrics::Metrics::new().unwrap().line("trays");
        let config = StageConfig {
            precision: crate::model::Precision::F32,
            batching: Batching { max_batch: 1, max_wait: Duration::from_millis(1) },
            cpu_threads: 1,
        };
        let health = Arc::new(LineHealth::default());
        let serving = crate::service::infer::tests::tiny_model(1, 128);
        let (_stage, swapper) = crate::service::infer::spawn(
            vec![serving],
            config,
            input,
            to_sink,
            metrics,
            health.clone(),
            Box::new(|_| {}),
        )
        .unwrap();

        let feed = ThenPanics([published, None].into());
        let stop = Arc::new(AtomicBool::new(false));
        let follower = follow("trays".into(), feed, swapper.clone(), 1, Device::Cpu, stop, health.clone()).unwrap();
        let reason = follower.join().unwrap().unwrap_err();
        assert!(reason.contains("models follower of line trays panicked (injected failure)"), "{reason}");
        assert!(health.stage_dead.load(Ordering::Relaxed));
        let deadline = Instant::now() + Duration::from_secs(30);
        while swapper.serving_version() != 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(swapper.serving_version(), 2, "the publication before the panic was swapped in");
    }
}
