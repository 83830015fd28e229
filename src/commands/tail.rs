//! `lineguard tail`: follow a results, maps or dead-letter topic and print its records readably.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::ClientConfig;

use lineguard::service::sink::{ResultRecord, HEADER_ERROR, HEADER_ERROR_REASON, HEADER_MAP_FORMAT, HEADER_MAP_WIDTH};

use super::cli::TailArgs;

pub fn run(args: &TailArgs) -> anyhow::Result<ExitCode> {
    super::produce::ensure_reachable(&super::produce::kafka_settings(&args.kafka.brokers))?;
    let runtime = super::runtime()?;
    runtime.block_on(async {
        let consumer = reader(&args.kafka.brokers, &args.topic, args.from_beginning)?;
        let mut stdout = std::io::stdout().lock();
        let idle = args.idle_timeout.map(Duration::from_secs);
        let mut seen = 0u64;
        let mut header_printed = false;
        while args.count.is_none_or(|count| seen < count) {
            let message = match idle {
                Some(idle) => match tokio::time::timeout(idle, consumer.recv()).await {
                    Ok(message) => message,
                    Err(_) => break,
                },
                None => tokio::select! {
                    message = consumer.recv() => message,
                    _ = super::termination() => break,
                },
            };
            let message = message.with_context(|| format!("reading {}", args.topic))?;
            seen += 1;
            if args.json {
                writeln!(stdout, "{}", String::from_utf8_lossy(message.payload().unwrap_or_default()))?;
                continue;
            }
            let (line, is_result) = describe(&message);
            if !header_printed && is_result {
                writeln!(stdout, "{RESULT_HEADER}")?;
                header_printed = true;
            }
            writeln!(stdout, "{line}")?;
        }
        anyhow::Ok(ExitCode::SUCCESS)
    })
}

/// A throwaway consumer group: tailing must not move any pipeline's offsets.
pub fn reader(brokers: &str, topic: &str, from_beginning: bool) -> anyhow::Result<StreamConsumer> {
    let group = format!("lineguard-tail-{}-{}", std::process::id(), rand::random::<u32>());
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", if from_beginning { "earliest" } else { "latest" })
        .set("fetch.message.max.bytes", lineguard::service::kafka::MAX_MESSAGE_BYTES.to_string())
        .create()
        .with_context(|| format!("connecting to {brokers}"))?;
    consumer.subscribe(&[topic]).with_context(|| format!("subscribing to {topic}"))?;
    Ok(consumer)
}

const RESULT_HEADER: &str = "     score  verdict    model  camera        in-pipeline  frame";

fn header<'a>(message: &'a BorrowedMessage<'_>, name: &str) -> Option<&'a [u8]> {
    message.headers()?.iter().find(|h| h.key == name).and_then(|h| h.value)
}

/// The record as one line, and whether it is a result (the kind the column header belongs to).
fn describe(message: &BorrowedMessage<'_>) -> (String, bool) {
    let key = message.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_else(|| "-".into());
    let payload = message.payload().unwrap_or_default();
    if let Some(reason) = header(message, HEADER_ERROR_REASON) {
        let error = header(message, HEADER_ERROR).map(|e| String::from_utf8_lossy(e).into_owned()).unwrap_or_default();
        return (format!("DEAD LETTER {key}: {} - {error}", String::from_utf8_lossy(reason)), false);
    }
    if let Some(format) = header(message, HEADER_MAP_FORMAT) {
        let side =
            header(message, HEADER_MAP_WIDTH).map(|w| String::from_utf8_lossy(w).into_owned()).unwrap_or_default();
        return (
            format!("MAP {key}: {} {side}x{side}, {} bytes", String::from_utf8_lossy(format), payload.len()),
            false,
        );
    }
    match serde_json::from_slice::<ResultRecord>(payload) {
        Ok(result) => (
            format!(
                "  {:>8}  {:<9}  {:>5}  {:<12}  {:>8.1} ms  {}",
                result.score.map_or_else(|| "-".to_string(), |score| format!("{score:.4}")),
                match result.verdict.as_str() {
                    "anomalous" => "ANOMALY",
                    "normal" => "ok",
                    _ => "ERROR",
                },
                result.model_version,
                result.camera.camera_id,
                result.timings_ms.in_pipeline,
                result.frame_id
            ),
            true,
        ),
        Err(_) => (format!("{key}: {} bytes", payload.len()), false),
    }
}
