//! `lineguard produce`: image files → camera frames on a topic, keyed and with the contract's headers.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use lineguard::frame::{HEADER_CAMERA, HEADER_CAPTURED_AT, HEADER_LINE};
use lineguard::kafka::to_owned_headers;
use lineguard::settings::KafkaSettings;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::cli::ProduceArgs;

/// What to send and how.
pub struct Sending<'a> {
    pub topic: &'a str,
    pub camera: &'a str,
    pub line: Option<&'a str>,
    pub key_prefix: &'a str,
    /// Frames per second; 0 sends as fast as the producer queue takes them.
    pub rate: f64,
}

pub fn run(args: &ProduceArgs) -> anyhow::Result<ExitCode> {
    let files = super::predict::expand(&args.inputs)?;
    let kafka = kafka_settings(&args.kafka.brokers);
    let key_prefix = args.key_prefix.clone().unwrap_or_else(|| format!("{}-{}", args.camera, unix_ms() / 1000));
    let sending = Sending { topic: &args.topic, camera: &args.camera, line: args.line.as_deref(), key_prefix: &key_prefix, rate: args.rate };
    let runtime = super::runtime()?;
    runtime.block_on(async {
        if let Some(partitions) = args.create_partitions {
            lineguard::kafka::ensure_topics(&kafka, &[&args.topic], partitions)
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
    KafkaSettings {
        brokers: brokers.to_string(),
        client_id: "lineguard-produce".into(),
        consumer: Default::default(),
        producer: Default::default(),
    }
}

pub fn producer(kafka: &KafkaSettings) -> anyhow::Result<FutureProducer> {
    lineguard::kafka::producer_config(kafka).create().with_context(|| format!("connecting to {}", kafka.brokers))
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

fn unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Sends `files` in order, paced at `rate`, numbering frames from `first_sequence`; waits until the
/// broker acknowledged all of them. `on_sent` sees each frame id as it is queued. Returns the count.
pub async fn send_files(
    producer: &FutureProducer,
    files: &[PathBuf],
    sending: &Sending<'_>,
    first_sequence: u64,
    mut on_sent: impl FnMut(&str),
) -> anyhow::Result<u64> {
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
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
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
                Err((err, _)) => return Err(err).with_context(|| format!("sending {}", path.display())),
            }
        }
        on_sent(&key);
    }
    let count = deliveries.len() as u64;
    for (key, delivery) in deliveries {
        match delivery.await {
            Ok(Ok(_)) => {}
            Ok(Err((err, _))) => anyhow::bail!("frame {key} was not delivered: {err}"),
            Err(_) => anyhow::bail!("frame {key}: the producer was dropped before delivery"),
        }
    }
    Ok(count)
}
