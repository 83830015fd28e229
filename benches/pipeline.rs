//! Streaming throughput and latency next to the model-only throughput of the same model, measured side by
//! side in one run: every round scores the same frames with the model alone (batch 1 and batch 8, inputs
//! already decoded) and then streams them through the full pipeline (local nisshi broker, decode pool,
//! batched inference, results and PNG maps published, offsets committed). Medians over rounds.
//!
//!     cargo bench --bench pipeline                          # 128 px, 48 frames, 3 rounds
//!     cargo bench --bench pipeline -- --side 256 --frames 32 --rounds 5
//!
//! Needs the nisshi broker (scripts/setup.sh installs it). The model has the real architecture and size
//! (DFSC preset, 384 channels) with untrained weights: speed does not depend on what the weights learnt.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

mod common;

use common::{arg, median};
use lineguard::data::synth::SynthConfig;
use lineguard::model::config::{Preset, Recipe};
use lineguard::model::{EfficientAd, MapQuantiles};
use lineguard::service::broker::LocalBroker;
use lineguard::service::kafka::{send_files, Sending};
use lineguard::service::settings::{KafkaSettings, LineSettings, MetricsSettings, Settings};
use lineguard::service::sink::ResultRecord;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::ClientConfig;
use tch::Tensor;

fn percentile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Frames per second of the model alone on decoded inputs.
fn model_only(model: &EfficientAd, inputs: &[Tensor], batch: usize) -> f64 {
    let side = model.recipe.image_size;
    let started = Instant::now();
    for chunk in inputs.chunks(batch) {
        let images = Tensor::stack(chunk, 0).to_device(model.device());
        let maps = model.anomaly_maps(&images, side, side).expect("calibrated");
        let _ = maps.max().double_value(&[]);
    }
    inputs.len() as f64 / started.elapsed().as_secs_f64()
}

struct StreamRun {
    /// From the first frame sent to the last result: includes the consumer joining its group and the
    /// first fetch, a fixed start-up cost that weighs heavily on a short run.
    frames_per_second: f64,
    /// Results that arrived after the first batch's, per second from the first result to the last: the rate
    /// of a line that is already running. (A batch's results arrive together, so frames of the first batch
    /// must not count in a window that starts when it is done.)
    steady_frames_per_second: f64,
    /// From the first frame sent to its first result.
    first_result_ms: f64,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
}

/// Streams `frames` through a freshly started pipeline at `rate` (0 = as fast as possible).
async fn stream(brokers: &str, model: &Path, frames: &[PathBuf], round: usize, rate: f64) -> StreamRun {
    let kafka = KafkaSettings::for_brokers(brokers, "bench");
    let topic = |kind: &str| format!("bench.{round}.{rate}.{kind}");
    let (input, results, maps, dead) = (topic("frames"), topic("results"), topic("maps"), topic("dead-letter"));
    lineguard::service::kafka::ensure_topics(&kafka, &[&input, &results, &maps, &dead], 4).await.expect("topics");
    let line = LineSettings {
        results_topic: results.clone(),
        maps_topic: maps,
        dead_letter_topic: dead,
        group_id: Some(format!("bench-{round}-{rate}")),
        ..LineSettings::with_defaults(model.to_path_buf(), vec![input.clone()], 0.5)
    };
    let settings = Settings {
        kafka: kafka.clone(),
        metrics: MetricsSettings { listen: String::new(), ..Default::default() },
        shutdown: Default::default(),
        lines: BTreeMap::from([("bench".to_string(), line)]),
    };
    let pipeline = lineguard::service::pipeline::start(&settings).await.expect("pipeline starts");
    let reader: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("bench-reader-{round}-{rate}"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader");
    reader.subscribe(&[&results]).expect("subscribe");
    let producer = lineguard::service::kafka::producer_config(&kafka).create().expect("producer");
    let prefix = format!("bench-{round}");
    let sending = Sending { topic: &input, camera: "bench", line: None, key_prefix: &prefix, rate };
    let started = Instant::now();
    let sent = send_files(&producer, frames, &sending, 0, |_| {});
    tokio::pin!(sent);
    let mut sent_done = false;
    let mut seen = HashSet::new();
    let mut latencies = Vec::new();
    let mut first = None;
    let mut after_first_batch = 0usize;
    let mut last = started;
    while seen.len() < frames.len() {
        tokio::select! {
            done = &mut sent, if !sent_done => { done.expect("frames sent"); sent_done = true; }
            message = reader.recv() => {
                let message = message.expect("results readable");
                let result: ResultRecord = serde_json::from_slice(message.payload().unwrap_or_default()).expect("a result");
                if seen.insert(result.frame_id.clone()) {
                    latencies.push((now_ms() - result.camera.captured_at_ms) as f64);
                    last = Instant::now();
                    let first = *first.get_or_insert(last);
                    if last - first > std::time::Duration::from_millis(20) {
                        after_first_batch += 1;
                    }
                }
            }
        }
    }
    pipeline.shutdown().await.expect("clean shutdown");
    let first = first.unwrap_or(last);
    StreamRun {
        frames_per_second: frames.len() as f64 / (last - started).as_secs_f64(),
        steady_frames_per_second: after_first_batch as f64 / (last - first).as_secs_f64(),
        first_result_ms: (first - started).as_secs_f64() * 1e3,
        latency_p50_ms: percentile(&latencies, 0.5),
        latency_p99_ms: percentile(&latencies, 0.99),
    }
}

fn main() {
    lineguard::torch::init();
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = arg(&args, "--rounds", 3);
    let count: usize = arg(&args, "--frames", 48);
    let side: u32 = arg(&args, "--side", 128);

    let dir = tempfile::tempdir().expect("scratch folder");
    let data = dir.path().join("data");
    let per_split = count.div_ceil(3);
    let synth = SynthConfig::test_frames(3, side, per_split);
    lineguard::data::synth::generate(&synth, &data, &mut || {}).expect("synthetic frames");
    let mut frames = Vec::new();
    for split in ["good", "logical_anomalies", "structural_anomalies"] {
        frames.extend(lineguard::data::loco::list_images(&data.join("test").join(split)).expect("frames"));
    }
    frames.truncate(count);

    let device = lineguard::torch::select_device(false);
    let mut model =
        EfficientAd::new(Recipe { image_size: side as i64, ..Recipe::preset(Preset::Dfsc) }, device).expect("model");
    model.map_quantiles = Some(MapQuantiles { student_teacher: (0.0, 1.0), autoencoder: (0.0, 1.0) });
    let model_path = dir.path().join("model.safetensors");
    model.save(&model_path).expect("model saved");
    let inputs: Vec<Tensor> = frames
        .iter()
        .map(|p| {
            lineguard::data::preprocess::to_input(&lineguard::data::preprocess::load_image(p).expect("frame"), side)
        })
        .collect();

    let broker = LocalBroker::start(None, Some(&dir.path().join("broker.log")))
        .expect("the nisshi broker (run scripts/setup.sh to install it)");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    println!(
        "device: {}; {} frames of {side} px; {rounds} rounds; medians",
        lineguard::torch::describe(device),
        frames.len()
    );

    let mut batch1 = Vec::new();
    let mut batch8 = Vec::new();
    let mut flat_out = Vec::new();
    let mut paced = Vec::new();
    for round in 0..rounds {
        batch1.push(model_only(&model, &inputs, 1));
        batch8.push(model_only(&model, &inputs, 8));
        let fast = runtime.block_on(stream(&broker.bootstrap(), &model_path, &frames, round, 0.0));
        // Offered at 70% of this round's model-only rate: latency without a standing queue.
        let rate = (0.7 * batch8[round]).max(0.1);
        let steady =
            runtime.block_on(stream(&broker.bootstrap(), &model_path, &frames, round, (rate * 10.0).round() / 10.0));
        println!(
            "round {round}: model {:.2}/{:.2} fps (batch 1/8); pipeline flat out {:.2} fps ({:.2} after the first \
             result, which took {:.0} ms) p50 {:.0} ms p99 {:.0} ms; at {:.1} fps p50 {:.0} ms p99 {:.0} ms",
            batch1[round],
            batch8[round],
            fast.frames_per_second,
            fast.steady_frames_per_second,
            fast.first_result_ms,
            fast.latency_p50_ms,
            fast.latency_p99_ms,
            rate,
            steady.latency_p50_ms,
            steady.latency_p99_ms
        );
        flat_out.push(fast);
        paced.push(steady);
    }
    let med = |runs: &[StreamRun], f: fn(&StreamRun) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    let pipeline_fps = med(&flat_out, |r| r.frames_per_second);
    println!();
    println!("| measurement | median |");
    println!("|---|---|");
    println!("| model only, batch 1 (frames/s) | {:.2} |", median(&batch1));
    println!("| model only, batch 8 (frames/s) | {:.2} |", median(&batch8));
    println!("| pipeline, flat out (frames/s) | {pipeline_fps:.2} |");
    println!("| pipeline / model batch 8 | {:.2} |", pipeline_fps / median(&batch8));
    let steady_fps = med(&flat_out, |r| r.steady_frames_per_second);
    println!("| pipeline after its first result (frames/s) | {steady_fps:.2} |");
    println!("| pipeline after its first result / model batch 8 | {:.2} |", steady_fps / median(&batch8));
    println!("| first result after (ms) | {:.0} |", med(&flat_out, |r| r.first_result_ms));
    println!(
        "| flat out: capture→result p50 / p99 (ms) | {:.0} / {:.0} |",
        med(&flat_out, |r| r.latency_p50_ms),
        med(&flat_out, |r| r.latency_p99_ms)
    );
    println!(
        "| at 70% of model rate: capture→result p50 / p99 (ms) | {:.0} / {:.0} |",
        med(&paced, |r| r.latency_p50_ms),
        med(&paced, |r| r.latency_p99_ms)
    );
}
