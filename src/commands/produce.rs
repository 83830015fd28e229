//! `lineguard produce`: image files → camera frames on a topic, keyed and with the contract's headers.

use std::process::ExitCode;

use anyhow::Context;
use lineguard::service::kafka::{send_files, Sending};
use lineguard::service::settings::KafkaSettings;
use rdkafka::producer::FutureProducer;

use super::cli::ProduceArgs;

pub fn run(args: &ProduceArgs) -> anyhow::Result<ExitCode> {
    let files = super::predict::expand(&args.inputs)?;
    let kafka = kafka_settings(&args.kafka.brokers);
    let key_prefix = args
        .key_prefix
        .clone()
        .unwrap_or_else(|| format!("{}-{}", args.camera, lineguard::service::kafka::unix_ms() / 1000));
    let sending = Sending {
        topic: &args.topic,
        camera: &args.camera,
        line: args.line.as_deref(),
        key_prefix: &key_prefix,
        rate: args.rate,
    };
    let runtime = super::runtime()?;
    ensure_reachable(&kafka)?;
    runtime.block_on(async {
        if let Some(partitions) = args.create_partitions {
            lineguard::service::kafka::ensure_topics(&kafka, &[&args.topic], partitions)
                .await
                .with_context(|| format!("creating topic {}", args.topic))?;
        }
        let producer = producer(&kafka)?;
        let total = files.len() as u64 * args.repeat as u64;
        let mut progress = super::Progress::new(total, &format!("sending to {}", args.topic));
        let mut sent = 0;
        for _ in 0..args.repeat {
            sent += send_files(&producer, &files, &sending, sent, |_| progress.inc()).await?;
        }
        progress.finish();
        eprintln!("sent {sent} frames to {} (keys {key_prefix}-*)", args.topic);
        anyhow::Ok(ExitCode::SUCCESS)
    })
}

pub fn kafka_settings(brokers: &str) -> KafkaSettings {
    KafkaSettings::for_brokers(brokers, "lineguard-produce")
}

/// A producer for a cluster that answered: an unreachable broker is an error now, not after librdkafka's
/// five-minute delivery timeout.
pub fn producer(kafka: &KafkaSettings) -> anyhow::Result<FutureProducer> {
    ensure_reachable(kafka)?;
    lineguard::service::kafka::producer_config(kafka)
        .create()
        .with_context(|| format!("connecting to {}", kafka.brokers))
}

pub fn ensure_reachable(kafka: &KafkaSettings) -> anyhow::Result<()> {
    lineguard::service::kafka::check_reachable(kafka, std::time::Duration::from_secs(10))
        .with_context(|| format!("cannot reach Kafka at {} (is the broker running? --brokers sets it)", kafka.brokers))
}
