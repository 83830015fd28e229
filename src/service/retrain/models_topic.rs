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

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tch::Device;

use super::buffer::fnv64;
use crate::model::EfficientAd;
use crate::service::infer::{ModelSwapper, SwapRefused};
use crate::service::settings::KafkaSettings;

pub const CHUNK_BYTES: usize = 900 * 1024;
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

/// Publishes `model` (the bytes of a model file) as `version`; returns once the broker has every record.
pub async fn publish(
    producer: &FutureProducer,
    topic: &str,
    line: &str,
    model: &[u8],
    version: u64,
    origin: &str,
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
    let manifest = Manifest {
        line: line.to_string(),
        model_version: version,
        publication,
        chunks: chunks.len() as u32,
        bytes: model.len() as u64,
        checksum: format!("{:016x}", fnv64(model)),
        published_unix: now.as_secs(),
        origin: origin.to_string(),
    };
    let json = serde_json::to_vec(&manifest).unwrap_or_default();
    let key = manifest_key(line);
    producer
        .send(FutureRecord::to(topic).key(&key).payload(&json), Timeout::After(Duration::from_secs(30)))
        .await
        .map_err(|(err, _)| err)?;
    Ok(manifest)
}

/// Reassembles publications of one line from the records of the models topic, in topic order.
pub struct Assembler {
    line: String,
    /// Chunks by publication id, then index.
    pending: HashMap<String, BTreeMap<u32, Vec<u8>>>,
}

impl Assembler {
    pub fn new(line: &str) -> Assembler {
        Assembler { line: line.to_string(), pending: HashMap::new() }
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
            return Some(Published { manifest, model });
        }
        let index: u32 = rest.strip_prefix("chunk/")?.parse().ok()?;
        let publication = String::from_utf8(publication?.to_vec()).ok()?;
        self.pending.entry(publication).or_default().insert(index, payload.to_vec());
        None
    }
}

/// Follows the models topic for one line (blocking calls; use from a thread).
pub struct ModelFeed {
    consumer: BaseConsumer,
    assembler: Assembler,
    topic: String,
}

impl ModelFeed {
    /// Reads `topic` from its beginning; no consumer group offsets are used or committed.
    pub fn open(kafka: &KafkaSettings, topic: &str, line: &str) -> Result<ModelFeed, rdkafka::error::KafkaError> {
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
        Ok(ModelFeed { consumer, assembler: Assembler::new(line), topic: topic.to_string() })
    }

    /// Reads everything published so far and returns the newest complete publication.
    pub fn catch_up(&mut self, timeout: Duration) -> Result<Option<Published>, rdkafka::error::KafkaError> {
        let deadline = Instant::now() + timeout;
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
                Some(Err(err)) => return Err(err),
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

/// Runs a replica's follower until `stop`: every newer publication of the line is loaded onto `device`
/// and handed to the inference stage, which swaps it in between batches. When several publications
/// arrived meanwhile, only the newest is loaded. The thread ends only when stopped; its result type is
/// the other stages'.
pub fn follow(
    line: String,
    mut feed: ModelFeed,
    swapper: ModelSwapper,
    mut serving_version: u64,
    device: Device,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<Result<(), String>>> {
    std::thread::Builder::new().name(format!("models-{line}")).spawn(move || {
        let mut pending: Option<EfficientAd> = None;
        while !stop.load(Ordering::Relaxed) {
            let mut newest = feed.poll(Duration::from_millis(200));
            while let Some(next) = feed.poll(Duration::ZERO) {
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
        Ok(())
    })
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
        };
        out.push((manifest_key(line), None, serde_json::to_vec(&manifest).unwrap()));
        out
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
        let mut assembler = Assembler::new("trays");
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
}
