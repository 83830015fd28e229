//! Kafka client plumbing shared by the pipeline stages and the `produce`/`tail` commands: client
//! configuration, header conversion, topic creation, the publish errors that retrying cannot clear, the
//! consumer's asynchronous commit, and sending image files as camera frames (`produce`, the demo, the
//! benchmarks). The sink's publishing until the broker acknowledges is `sink::publisher`.

use std::path::PathBuf;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{Client, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{ClientContext, TopicPartitionList};

use crate::service::frame::{HEADER_CAMERA, HEADER_CAPTURED_AT, HEADER_LINE};
use crate::service::settings::KafkaSettings;

/// Largest message our producers send (maps of big images, dead-lettered frames); topics need a
/// `max.message.bytes` at least this large for such messages.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Producer settings for at-least-once outputs: idempotent (no duplicates from internal retries),
/// acknowledged by all in-sync replicas.
pub fn producer_config(kafka: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &kafka.brokers)
        .set("client.id", &kafka.client_id)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.max.bytes", MAX_MESSAGE_BYTES.to_string());
    for (key, value) in &kafka.producer {
        config.set(key, value);
    }
    with_secrets(config, kafka)
}

/// The credentials of `kafka.secrets` go to every client, last.
fn with_secrets(mut config: ClientConfig, kafka: &KafkaSettings) -> ClientConfig {
    for (property, value) in kafka.secret_properties() {
        config.set(property, value);
    }
    config
}

/// Consumer settings: offsets are committed by the pipeline itself, only for published frames.
pub fn consumer_config(kafka: &KafkaSettings, group_id: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &kafka.brokers)
        .set("client.id", &kafka.client_id)
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.message.max.bytes", MAX_MESSAGE_BYTES.to_string())
        .set("statistics.interval.ms", "5000");
    for (key, value) in &kafka.consumer {
        config.set(key, value);
    }
    with_secrets(config, kafka)
}

/// Whether a consumer's error is fatal, and why. librdkafka raises a fatal error when, for example, a
/// static group member is fenced by another started with the same `group.instance.id`; it reaches us as
/// `MessageConsumptionFatal` carrying the broker's code (`FencedInstanceId`), not as the generic `Fatal`
/// code. Matching that code alone missed it: a fenced line logged three warnings, then consumed nothing
/// while its process stayed healthy (tests/pipeline.rs). The client's own record is asked first, since it
/// holds the original cause.
pub fn fatal_reason<C: ClientContext>(client: &Client<C>, err: &KafkaError) -> Option<String> {
    if let Some((code, reason)) = client.fatal_error() {
        let hint = match code {
            RDKafkaErrorCode::FencedInstanceId => {
                "; another consumer joined the group with this group.instance.id ([kafka.consumer]): give each \
                 replica its own"
            }
            _ => "",
        };
        return Some(format!("{reason} ({code:?}){hint}"));
    }
    let fatal = matches!(err, KafkaError::MessageConsumptionFatal(_))
        || err.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal);
    fatal.then(|| err.to_string())
}

/// Commits `offsets` without waiting, with the outcome delivered to the consumer's
/// `ConsumerContext::commit_callback` when `recv` next serves the consumer's queue.
///
/// rust-rdkafka's `commit(.., CommitMode::Async)` asks librdkafka for no reply at all, so that callback
/// never runs for it (rust-rdkafka issue 856, open): lineguard's periodic commits were never counted in
/// `lineguard_offset_commits_total` (the dashboard's commit-error panel stayed at 0 through a broker
/// restart whose commits failed) and their failures were never logged. Handing librdkafka the consumer's
/// queue makes it post the result there as an offset-commit event, which rust-rdkafka turns into the
/// callback.
pub fn commit_async<C: ConsumerContext>(consumer: &StreamConsumer<C>, offsets: &TopicPartitionList) -> KafkaResult<()> {
    use rdkafka::bindings;
    let client = consumer.client().native_ptr();
    // SAFETY: `client` is the live consumer's handle for the whole call. rd_kafka_queue_get_consumer
    // returns a new reference to the consumer's queue (null for a consumer without a group.id), released
    // below once rd_kafka_commit_queue has taken its own; rd_kafka_commit_queue copies `offsets`.
    let code = unsafe {
        let queue = bindings::rd_kafka_queue_get_consumer(client);
        if queue.is_null() {
            return consumer.commit(offsets, CommitMode::Async);
        }
        let code = bindings::rd_kafka_commit_queue(client, offsets.ptr(), queue, None, std::ptr::null_mut());
        bindings::rd_kafka_queue_destroy(queue);
        code
    };
    match code {
        bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR => Ok(()),
        error => Err(KafkaError::ConsumerCommit(error.into())),
    }
}

pub fn to_owned_headers<'a>(headers: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> OwnedHeaders {
    headers.into_iter().fold(OwnedHeaders::new(), |acc, (key, value)| acc.insert(Header { key, value: Some(value) }))
}

pub fn from_headers(headers: Option<&impl Headers>) -> Vec<(String, Vec<u8>)> {
    headers
        .map(|headers| {
            headers.iter().map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec).unwrap_or_default())).collect()
        })
        .unwrap_or_default()
}

/// Whether the cluster answers a metadata request within `timeout` (blocking; call from a blocking
/// context). Tools fail fast with this; the service only warns and keeps retrying, as Kafka clients do.
pub fn check_reachable(kafka: &KafkaSettings, timeout: Duration) -> Result<(), KafkaError> {
    use rdkafka::producer::Producer;
    let producer: rdkafka::producer::BaseProducer = producer_config(kafka).create()?;
    producer.client().fetch_metadata(None, timeout).map(|_| ())
}

/// Creates topics that do not exist yet (existing ones are left alone).
pub async fn ensure_topics(kafka: &KafkaSettings, topics: &[&str], partitions: i32) -> Result<(), KafkaError> {
    ensure_topics_with(kafka, topics, partitions, &[]).await
}

/// [`ensure_topics`] with extra topic configuration (e.g. `cleanup.policy = compact`).
pub async fn ensure_topics_with(
    kafka: &KafkaSettings,
    topics: &[&str],
    partitions: i32,
    configs: &[(&str, &str)],
) -> Result<(), KafkaError> {
    // The producer's settings: a secured cluster needs the same protocol and credentials for admin calls.
    let admin: AdminClient<DefaultClientContext> = producer_config(kafka).create()?;
    let max_bytes = MAX_MESSAGE_BYTES.to_string();
    let new_topics: Vec<NewTopic> = topics
        .iter()
        .map(|name| {
            let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
            let topic = if configs.iter().any(|(key, _)| *key == "max.message.bytes") {
                topic
            } else {
                topic.set("max.message.bytes", &max_bytes)
            };
            configs.iter().fold(topic, |topic, (key, value)| topic.set(key, value))
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Timeout::After(Duration::from_secs(10))));
    for result in admin.create_topics(&new_topics, &options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(KafkaError::AdminOp(code)).inspect_err(|_| log::error!("cannot create topic {topic}"))
            }
        }
    }
    Ok(())
}

/// A publish error that retrying cannot clear.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permanent {
    /// The record is larger than the producer's `message.max.bytes` or the topic's `max.message.bytes`:
    /// a smaller record (a dead letter without its payload) may still pass.
    TooLarge,
    /// Authorisation, an invalid topic or record: nothing passes until an operator acts.
    Refused,
    /// The producer failed fatally (an idempotent producer whose sequence the broker no longer accepts):
    /// this client instance publishes nothing more, a fresh one may.
    Fatal,
}

impl Permanent {
    /// `None` for errors that clear by themselves (a broker restarting, a leader election, timeouts).
    pub fn classify(err: &KafkaError) -> Option<Permanent> {
        use RDKafkaErrorCode as Code;
        match err.rdkafka_error_code()? {
            Code::MessageSizeTooLarge | Code::InvalidMessageSize | Code::MessageBatchTooLarge => {
                Some(Permanent::TooLarge)
            }
            Code::TopicAuthorizationFailed
            | Code::ClusterAuthorizationFailed
            | Code::TransactionalIdAuthorizationFailed
            | Code::SaslAuthenticationFailed
            | Code::Authentication
            | Code::InvalidTopic
            | Code::InvalidRecord
            | Code::InvalidRequiredAcks
            | Code::PolicyViolation => Some(Permanent::Refused),
            Code::Fatal => Some(Permanent::Fatal),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("publishing {key} to {topic} cannot succeed: {source}")]
pub struct PublishError {
    pub topic: String,
    pub key: String,
    pub kind: Permanent,
    #[source]
    pub source: KafkaError,
}

/// What to send and how.
pub struct Sending<'a> {
    pub topic: &'a str,
    pub camera: &'a str,
    pub line: Option<&'a str>,
    pub key_prefix: &'a str,
    /// Frames per second; 0 sends as fast as the producer queue takes them.
    pub rate: f64,
}

/// `<folder>-<file stem>`: enough to recognise the image in results (`logical_anomalies-003`).
pub fn label(path: &std::path::Path) -> String {
    let name = |p: Option<&std::ffi::OsStr>| p.map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let folder = name(path.parent().and_then(|p| p.file_name()));
    let stem = name(path.file_stem());
    if folder.is_empty() {
        stem
    } else {
        format!("{folder}-{stem}")
    }
}

/// Milliseconds since the Unix epoch, as frames' capture times are written.
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    #[error("cannot read {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot send {path}: {source}")]
    Send { path: PathBuf, source: KafkaError },
    #[error("frame {key} was not delivered: {source}")]
    NotDelivered { key: String, source: KafkaError },
    #[error("frame {key}: the producer was dropped before delivery")]
    Dropped { key: String },
}

/// Sends `files` in order, paced at `rate`, numbering frames from `first_sequence`; waits until the
/// broker acknowledged all of them. `on_sent` sees each frame id as it is queued. Returns the count.
pub async fn send_files(
    producer: &FutureProducer,
    files: &[PathBuf],
    sending: &Sending<'_>,
    first_sequence: u64,
    mut on_sent: impl FnMut(&str),
) -> Result<u64, ProduceError> {
    let mut pacing = (sending.rate > 0.0).then(|| {
        let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / sending.rate));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        ticks
    });
    let mut deliveries = Vec::with_capacity(files.len());
    for (index, path) in files.iter().enumerate() {
        if let Some(ticks) = pacing.as_mut() {
            ticks.tick().await;
        }
        let bytes = std::fs::read(path).map_err(|source| ProduceError::Read { path: path.clone(), source })?;
        let key = format!("{}-{:06}-{}", sending.key_prefix, first_sequence + index as u64, label(path));
        let captured = unix_ms().to_string();
        let mut headers = vec![(HEADER_CAMERA, sending.camera.as_bytes()), (HEADER_CAPTURED_AT, captured.as_bytes())];
        if let Some(line) = sending.line {
            headers.push((HEADER_LINE, line.as_bytes()));
        }
        let headers = to_owned_headers(headers);
        loop {
            let record = FutureRecord::to(sending.topic).key(&key).payload(&bytes).headers(headers.clone());
            match producer.send_result(record) {
                Ok(delivery) => {
                    deliveries.push((key.clone(), delivery));
                    break;
                }
                // The local queue is full: let librdkafka send some, then try again.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err((source, _)) => return Err(ProduceError::Send { path: path.clone(), source }),
            }
        }
        on_sent(&key);
    }
    let count = deliveries.len() as u64;
    for (key, delivery) in deliveries {
        match delivery.await {
            Ok(Ok(_)) => {}
            Ok(Err((source, _))) => return Err(ProduceError::NotDelivered { key, source }),
            Err(_) => return Err(ProduceError::Dropped { key }),
        }
    }
    Ok(count)
}

/// librdkafka's in-process mock cluster with `topic` (one partition) holding `records` (key, value), and
/// the settings that reach it: what one stage's unit tests use for a broker (tests/ use the real one).
#[cfg(test)]
pub(crate) fn mock_cluster_with(
    topic: &str,
    records: &[(&str, &[u8])],
) -> (rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>, KafkaSettings) {
    use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    cluster.create_topic(topic, 1, 1).unwrap();
    let kafka = KafkaSettings::for_brokers(&cluster.bootstrap_servers(), "test");
    let producer: ThreadedProducer<rdkafka::producer::DefaultProducerContext> =
        producer_config(&kafka).create().unwrap();
    for (key, payload) in records {
        producer.send(BaseRecord::<str, [u8]>::to(topic).key(*key).payload(*payload)).map_err(|(e, _)| e).unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    (cluster, kafka)
}

/// librdkafka's own test hook puts `producer` in the state that an idempotent producer reaches when the
/// broker refuses its sequence: a fatal error, after which that client publishes nothing more.
#[cfg(test)]
pub(crate) fn fail_fatally(producer: &FutureProducer) {
    use rdkafka::producer::Producer;
    use rdkafka::types::RDKafkaRespErr;
    let reason = std::ffi::CString::new("injected by the test").unwrap();
    let code = RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER;
    // SAFETY: a live client handle and a NUL-terminated reason, which the function only reads.
    let raised =
        unsafe { rdkafka::bindings::rd_kafka_test_fatal_error(producer.client().native_ptr(), code, reason.as_ptr()) };
    assert_eq!(raised, RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_reach_every_client_under_their_property_names() {
        let mut kafka = KafkaSettings::for_brokers("b:9092", "test");
        kafka.secrets.insert("sasl_password".into(), crate::service::settings::Secret::new("hunter2"));
        kafka.consumer.insert("security.protocol".into(), "SASL_SSL".into());
        assert_eq!(producer_config(&kafka).get("sasl.password"), Some("hunter2"));
        let consumer = consumer_config(&kafka, "group");
        assert_eq!(
            (consumer.get("sasl.password"), consumer.get("security.protocol")),
            (Some("hunter2"), Some("SASL_SSL"))
        );
    }

    #[test]
    fn errors_that_retrying_cannot_clear_are_told_apart() {
        let produce = |code| KafkaError::MessageProduction(code);
        assert_eq!(Permanent::classify(&produce(RDKafkaErrorCode::MessageSizeTooLarge)), Some(Permanent::TooLarge));
        assert_eq!(Permanent::classify(&produce(RDKafkaErrorCode::MessageBatchTooLarge)), Some(Permanent::TooLarge));
        for refused in [RDKafkaErrorCode::TopicAuthorizationFailed, RDKafkaErrorCode::InvalidTopic] {
            assert_eq!(Permanent::classify(&produce(refused)), Some(Permanent::Refused), "{refused:?}");
        }
        assert_eq!(Permanent::classify(&produce(RDKafkaErrorCode::Fatal)), Some(Permanent::Fatal));
        for transient in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::NotLeaderForPartition,
            RDKafkaErrorCode::QueueFull,
        ] {
            assert_eq!(Permanent::classify(&produce(transient)), None, "{transient:?}");
        }
        assert_eq!(Permanent::classify(&KafkaError::Canceled), None);
    }
}
