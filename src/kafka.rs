//! Kafka client plumbing shared by the pipeline stages and the `produce`/`tail` commands: client
//! configuration, header conversion, topic creation and publishing until the broker acknowledges.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use crate::settings::KafkaSettings;

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
    config
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

/// Creates topics that do not exist yet (existing ones are left alone).
pub async fn ensure_topics(kafka: &KafkaSettings, topics: &[&str], partitions: i32) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", &kafka.brokers).create()?;
    let max_bytes = MAX_MESSAGE_BYTES.to_string();
    let new_topics: Vec<NewTopic> = topics
        .iter()
        .map(|name| {
            NewTopic::new(name, partitions, TopicReplication::Fixed(1)).set("max.message.bytes", &max_bytes)
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

/// Publishes one record, retrying with backoff until the broker acknowledges it: the frame's offset must
/// not be committed before, and giving up would lose it. `on_error` is called for every failed attempt.
pub async fn send_until_delivered(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    payload: &[u8],
    headers: &OwnedHeaders,
    mut on_error: impl FnMut(&KafkaError),
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let record = FutureRecord::to(topic).key(key).payload(payload).headers(headers.clone());
        match producer.send(record, Timeout::After(Duration::from_secs(5))).await {
            Ok(_) => return,
            Err((err, _)) => {
                on_error(&err);
                log::warn!("publishing {key} to {topic} failed ({err}); retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
