//! The embedded default: everything on data the project makes itself, so it runs on a fresh machine with
//! no data and no broker of the user's. It synthesises a production line, trains (or reuses) a small DFSC
//! model, chooses a threshold on normal validation trays, starts a local broker and the streaming
//! pipeline, streams the test trays (good, logical and structural anomalies, plus a few broken messages)
//! through it, and prints a live summary and where the heatmaps went. Retraining runs alongside: trays
//! scored confidently normal feed the in-process trainer, whose candidates are gated and, when better,
//! swapped in (the live line shows the model version and the gate's decisions).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::FutureRecord;
use rdkafka::ClientConfig;

use lineguard::data::synth::SynthConfig;
use lineguard::eval::EvalOptions;
use lineguard::model::config::Recipe;
use lineguard::model::EfficientAd;
use lineguard::service::broker::LocalBroker;
use lineguard::service::metrics::RetrainSummary;
use lineguard::service::settings::{KafkaSettings, LineSettings, RetrainSettings, Settings};
use lineguard::service::sink::{ResultRecord, HEADER_ERROR_REASON};

use super::cli::DemoArgs;

/// The demo's short CPU schedule, shared with the quality test; the file says why each value differs from
/// the paper's.
const QUICK_RECIPE: &str = include_str!("../../pipelines/recipes/quick.toml");

/// Kinds of test tray, by folder.
const SPLITS: [&str; 3] = ["good", "logical_anomalies", "structural_anomalies"];

pub fn run(args: &DemoArgs) -> anyhow::Result<ExitCode> {
    let device = lineguard::torch::select_device(args.cpu);
    let mut recipe = Recipe::from_toml(QUICK_RECIPE, Path::new("pipelines/recipes/quick.toml"), Some(args.preset))?;
    recipe.image_size = args.image_size as i64;
    if let Some(steps) = args.steps {
        recipe.train.steps = steps;
    }
    recipe.validate()?;
    let data = args.workdir.join("data");
    let model_path = args
        .workdir
        .join(format!("model-{}-{}px-{}steps.safetensors", args.preset, args.image_size, recipe.train.steps));

    let synth = SynthConfig { seed: 7, image_size: args.image_size, ..SynthConfig::default() };
    let marker = data.join("synth.json");
    let existing: Option<SynthConfig> =
        std::fs::read_to_string(&marker).ok().and_then(|text| serde_json::from_str(&text).ok());
    if existing.as_ref().map(|e| (e.seed, e.image_size)) == Some((synth.seed, synth.image_size)) {
        log::info!("step 1/4: reusing the synthetic line in {}", data.display());
    } else {
        log::info!("step 1/4: synthesising a production line (trays with 4 compartments) into {}", data.display());
        if data.exists() {
            std::fs::remove_dir_all(&data).with_context(|| format!("replacing {}", data.display()))?;
        }
        super::synth::generate(&synth, &data)?;
    }

    let model = if model_path.exists() && !args.retrain {
        log::info!("step 2/4: reusing the model {} (pass --retrain to train again)", model_path.display());
        EfficientAd::load(&model_path, device)?
    } else {
        log::info!(
            "step 2/4: training a {} model for {} steps at {} px",
            args.preset,
            recipe.train.steps,
            args.image_size
        );
        super::train::train(&data, &model_path, recipe, None, None, device)?
    };

    log::info!("step 3/4: choosing the alarm threshold on the normal validation trays");
    let (threshold, accept_below) = validation_threshold(&model, &data.join("validation/good"))?;
    if args.eval {
        let report = super::eval::evaluate(&model, &data, &EvalOptions::default(), None)?;
        println!();
        super::eval::print_table(&report);
        println!();
    }
    drop(model);

    log::info!("step 4/4: streaming the test trays through the pipeline");
    let runtime = super::runtime()?;
    runtime.block_on(stream(args, &data, &model_path, threshold, accept_below))
}

/// The alarm threshold is the highest score of a normal validation image: no false alarm on validation,
/// and anything scoring above every normal tray seen so far is flagged. Frames scoring below the
/// validation median are confident enough to retrain on.
fn validation_threshold(model: &EfficientAd, folder: &Path) -> anyhow::Result<(f32, f32)> {
    let mut scores = Vec::new();
    for path in lineguard::data::loco::list_images(folder)? {
        scores.push(lineguard::eval::score_image(model, &path)?.score);
    }
    scores.sort_by(f32::total_cmp);
    let (Some(&highest), Some(&median)) = (scores.last(), scores.get(scores.len() / 2)) else {
        anyhow::bail!("no validation images in {}", folder.display());
    };
    log::info!("threshold {highest:.4} (highest validation score); retraining accepts frames below {median:.4}");
    Ok((highest, median))
}

/// The frames to stream: every test tray, shuffled like a real line, labelled by folder.
fn test_frames(data: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut frames = Vec::new();
    for split in SPLITS {
        frames.extend(lineguard::data::loco::list_images(&data.join("test").join(split))?);
    }
    frames.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(7));
    Ok(frames)
}

struct Topics {
    frames: String,
    results: String,
    maps: String,
    dead_letter: String,
    accepted: String,
    models: String,
}

async fn stream(
    args: &DemoArgs,
    data: &Path,
    model_path: &Path,
    threshold: f32,
    accept_below: f32,
) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&args.workdir)?;
    let (_broker, brokers, suffix) = match &args.brokers {
        Some(brokers) => (None, brokers.clone(), format!(".{}", std::process::id())),
        None => {
            let log_path = args.workdir.join("broker.log");
            let broker = LocalBroker::start(None, Some(&log_path))?;
            log::info!(
                "local nisshi broker on {} (pid {}, log {})",
                broker.bootstrap(),
                broker.pid(),
                log_path.display()
            );
            let bootstrap = broker.bootstrap();
            (Some(broker), bootstrap, String::new())
        }
    };
    let topics = Topics {
        frames: format!("demo.frames{suffix}"),
        results: format!("demo.results{suffix}"),
        maps: format!("demo.maps{suffix}"),
        dead_letter: format!("demo.dead-letter{suffix}"),
        accepted: format!("demo.accepted{suffix}"),
        models: format!("demo.models{suffix}"),
    };
    let kafka = super::produce::kafka_settings(&brokers);
    lineguard::service::kafka::ensure_topics(
        &kafka,
        &[&topics.frames, &topics.results, &topics.maps, &topics.dead_letter],
        4,
    )
    .await
    .context("creating the demo topics")?;

    // Every demo run retrains from its own starting model: versions of earlier runs would not compare.
    let state = args.workdir.join("retrain-state");
    if state.exists() {
        std::fs::remove_dir_all(&state).with_context(|| format!("clearing {}", state.display()))?;
    }
    let retrain = RetrainSettings {
        accept_below,
        accepted_topic: topics.accepted.clone(),
        models_topic: topics.models.clone(),
        state_dir: state,
        originals: Some(data.join("train/good")),
        pinned_originals: 16,
        min_frames: 8,
        // A short gate interval so that the demo's one minute of stream sees candidates judged.
        evaluate_every: 8,
        steps_per_minute: 60.0,
        ..RetrainSettings::default()
    };
    let settings = demo_settings(&kafka, &topics, model_path, threshold, retrain);
    settings.validate()?;
    let pipeline = lineguard::service::pipeline::start(&settings).await?;
    if let Some(address) = pipeline.metrics_address() {
        println!("pipeline running; Prometheus metrics at http://{address}/metrics");
    }

    let frames = test_frames(data)?;
    let heatmaps = args.workdir.join("stream-heatmaps");
    if heatmaps.exists() {
        std::fs::remove_dir_all(&heatmaps)?;
    }
    std::fs::create_dir_all(&heatmaps)?;
    let watcher = watch_outputs(&brokers, &topics)?;

    let producer = super::produce::producer(&kafka)?;
    let key_prefix = format!("demo-{}", std::process::id());
    let sending = lineguard::service::kafka::Sending {
        topic: &topics.frames,
        camera: "tray-camera",
        line: None,
        key_prefix: &key_prefix,
        rate: args.rate,
    };
    let started = Instant::now();
    let mut tally = Tally::new(threshold);
    let mut paths: HashMap<String, PathBuf> = HashMap::new();
    let producing = async {
        let mut sent_keys = Vec::new();
        let count = lineguard::service::kafka::send_files(&producer, &frames, &sending, 0, |key| {
            sent_keys.push(key.to_string())
        })
        .await?;
        // Three broken messages, as cameras and networks produce them: each must reach the dead-letter
        // topic with its reason while the line keeps going.
        let truncated = std::fs::read(&frames[0]).map(|b| b[..b.len() / 3].to_vec())?;
        let captured = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis().to_string();
        let good_headers = lineguard::service::kafka::to_owned_headers([
            (lineguard::service::frame::HEADER_CAMERA, b"tray-camera".as_slice()),
            (lineguard::service::frame::HEADER_CAPTURED_AT, captured.as_bytes()),
        ]);
        let broken: [(&str, &[u8], bool); 3] =
            [("truncated-png", &truncated, true), ("empty", &[], true), ("no-headers", &truncated, false)];
        for (name, payload, with_headers) in broken {
            let key = format!("{key_prefix}-broken-{name}");
            let mut record = FutureRecord::to(&topics.frames).key(&key).payload(payload);
            if with_headers {
                record = record.headers(good_headers.clone());
            }
            producer.send(record, Duration::from_secs(10)).await.map_err(|(err, _)| err)?;
        }
        anyhow::Ok((count + broken.len() as u64, sent_keys))
    };
    tokio::pin!(producing);
    let mut produced: Option<u64> = None;
    let mut report = tokio::time::interval(Duration::from_secs(3));
    let deadline = Duration::from_secs(30 * 60);
    loop {
        if produced.is_some_and(|total| tally.outputs() >= total) || started.elapsed() > deadline {
            break;
        }
        tokio::select! {
            result = &mut producing, if produced.is_none() => {
                let (total, sent_keys) = result?;
                for (key, path) in sent_keys.iter().zip(&frames) {
                    paths.insert(key.clone(), path.clone());
                }
                log::info!("all {total} frames sent in {:.1}s; waiting for the last results", started.elapsed().as_secs_f64());
                produced = Some(total);
            }
            message = watcher.recv() => {
                let message = message.context("reading the demo's output topics")?;
                tally.record(&message, &topics);
            }
            _ = report.tick() => {
                let retrain = pipeline.metrics().retrain_summary("demo");
                println!("{}", tally.live_line(started.elapsed(), &retrain));
            }
            _ = super::termination() => {
                log::warn!("interrupted");
                break;
            }
        }
    }
    tally.write_pictures(&paths, &heatmaps);
    let elapsed = started.elapsed();
    let metrics = pipeline.metrics().clone();
    pipeline.shutdown().await?;
    let retrain = metrics.retrain_summary("demo");
    tally.print_summary(elapsed, &heatmaps, produced.unwrap_or(0));
    tally.print_retraining(&retrain, &args.workdir.join("retrain-state"));
    Ok(ExitCode::SUCCESS)
}

fn demo_settings(
    kafka: &KafkaSettings,
    topics: &Topics,
    model_path: &Path,
    threshold: f32,
    retrain: RetrainSettings,
) -> Settings {
    let line = LineSettings {
        retrain: Some(retrain),
        results_topic: topics.results.clone(),
        maps_topic: topics.maps.clone(),
        dead_letter_topic: topics.dead_letter.clone(),
        group_id: Some(format!("lineguard-demo-{}", std::process::id())),
        ..LineSettings::with_defaults(model_path.to_path_buf(), vec![topics.frames.clone()], threshold)
    };
    Settings {
        kafka: kafka.clone(),
        metrics: lineguard::service::settings::MetricsSettings { listen: "127.0.0.1:0".into(), ..Default::default() },
        shutdown: Default::default(),
        lines: BTreeMap::from([("demo".to_string(), line)]),
    }
}

fn watch_outputs(brokers: &str, topics: &Topics) -> anyhow::Result<StreamConsumer> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("lineguard-demo-watch-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.message.max.bytes", lineguard::service::kafka::MAX_MESSAGE_BYTES.to_string())
        .create()?;
    consumer.subscribe(&[&topics.results, &topics.maps, &topics.dead_letter])?;
    Ok(consumer)
}

/// What the demo has seen on the output topics.
struct Tally {
    threshold: f32,
    /// (split, flagged) per frame key; a key seen twice (redelivery) counts once.
    results: HashMap<String, (String, bool, f32)>,
    /// Frames scored by each model version.
    versions: BTreeMap<u64, usize>,
    dead_letters: Vec<(String, String)>,
    maps: HashMap<String, Vec<u8>>,
    latencies_ms: Vec<f64>,
    in_pipeline_ms: Vec<f64>,
    first_result: Option<Instant>,
    last_result: Option<Instant>,
}

impl Tally {
    fn new(threshold: f32) -> Tally {
        Tally {
            threshold,
            results: HashMap::new(),
            versions: BTreeMap::new(),
            dead_letters: Vec::new(),
            maps: HashMap::new(),
            latencies_ms: Vec::new(),
            in_pipeline_ms: Vec::new(),
            first_result: None,
            last_result: None,
        }
    }

    fn outputs(&self) -> u64 {
        (self.results.len() + self.dead_letters.len()) as u64
    }

    fn record(&mut self, message: &rdkafka::message::BorrowedMessage<'_>, topics: &Topics) {
        let key = message.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default();
        let payload = message.payload().unwrap_or_default();
        let topic = message.topic();
        if topic == topics.maps {
            self.maps.insert(key, payload.to_vec());
        } else if topic == topics.dead_letter {
            let reason = message
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == HEADER_ERROR_REASON).and_then(|h| h.value))
                .map(|r| String::from_utf8_lossy(r).into_owned())
                .unwrap_or_default();
            self.dead_letters.push((key, reason));
        } else if let Ok(result) = serde_json::from_slice::<ResultRecord>(payload) {
            let now = Instant::now();
            self.first_result.get_or_insert(now);
            self.last_result = Some(now);
            let split = SPLITS.iter().find(|s| key.contains(&format!("-{s}-"))).copied().unwrap_or("unknown");
            let captured = result.camera.captured_at_ms;
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(captured);
            let score = result.score.unwrap_or(f32::NAN);
            if self.results.insert(key, (split.to_string(), result.verdict == "anomalous", score)).is_none() {
                *self.versions.entry(result.model_version).or_default() += 1;
                self.latencies_ms.push((now_ms - captured) as f64);
                self.in_pipeline_ms.push(result.timings_ms.in_pipeline);
            }
        }
    }

    fn counts(&self) -> BTreeMap<&str, (usize, usize)> {
        let mut counts: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        for (split, flagged, _) in self.results.values() {
            let entry = counts.entry(split.as_str()).or_default();
            entry.0 += 1;
            entry.1 += *flagged as usize;
        }
        counts
    }

    fn live_line(&self, elapsed: Duration, retrain: &RetrainSummary) -> String {
        let counts = self.counts();
        let get = |s: &str| counts.get(s).copied().unwrap_or_default();
        let (good, false_alarms) = get("good");
        let (logical, logical_caught) = get("logical_anomalies");
        let (structural, structural_caught) = get("structural_anomalies");
        format!(
            "[{:>5.1}s] scored {:>3} ({:.2}/s) | caught logical {logical_caught}/{logical}, structural \
             {structural_caught}/{structural} | false alarms {false_alarms}/{good} | dead letters {} | latency p50 {}",
            elapsed.as_secs_f64(),
            self.results.len(),
            self.results.len() as f64 / elapsed.as_secs_f64().max(1e-3),
            self.dead_letters.len(),
            percentile(&self.latencies_ms, 0.5).map_or("-".into(), |v| format!("{v:.0} ms")),
        ) + &format!(
            " | model v{} | retraining: {} frames, {} steps, {} promoted, {} rejected",
            retrain.model_version, retrain.buffered, retrain.steps, retrain.promoted, retrain.rejected
        )
    }

    fn print_retraining(&self, retrain: &RetrainSummary, state: &Path) {
        let by_version: Vec<String> = self.versions.iter().map(|(v, n)| format!("v{v}: {n}")).collect();
        println!(
            "retraining: {} accepted frames in the replay buffer, {} steps, candidates {} promoted / {} rejected; \
             frames scored by model {}",
            retrain.buffered,
            retrain.steps,
            retrain.promoted,
            retrain.rejected,
            by_version.join(", ")
        );
        println!(
            "versions and gate decisions: {}/demo (lineguard model list reads them from a pipeline file)",
            state.display()
        );
    }

    /// Original | heatmap pictures of the flagged frames.
    fn write_pictures(&self, paths: &HashMap<String, PathBuf>, folder: &Path) {
        for (key, (split, flagged, score)) in &self.results {
            let (Some(map), Some(path), true) = (self.maps.get(key), paths.get(key), *flagged) else { continue };
            let (Ok(original), Ok(map)) = (lineguard::data::preprocess::load_image(path), image::load_from_memory(map))
            else {
                continue;
            };
            let map = image::imageops::resize(
                &map.to_rgb8(),
                original.width(),
                original.height(),
                image::imageops::FilterType::Triangle,
            );
            let mut picture = image::RgbImage::new(original.width() * 2, original.height());
            image::imageops::replace(&mut picture, &original, 0, 0);
            image::imageops::replace(&mut picture, &map, original.width() as i64, 0);
            let name = format!("{score:.3}-{split}-{}.png", key.rsplit('-').next().unwrap_or("frame"));
            if let Err(err) = picture.save(folder.join(&name)) {
                log::warn!("cannot write {name}: {err}");
            }
        }
    }

    fn print_summary(&self, elapsed: Duration, heatmaps: &Path, sent: u64) {
        let counts = self.counts();
        let throughput_window = match (self.first_result, self.last_result) {
            (Some(first), Some(last)) if last > first => (last - first).as_secs_f64(),
            _ => elapsed.as_secs_f64(),
        };
        println!();
        println!(
            "=== lineguard demo: {} frames sent, {} scored, {} dead-lettered ===",
            sent,
            self.results.len(),
            self.dead_letters.len()
        );
        println!("threshold {:.4} (highest score of a normal validation tray)", self.threshold);
        for (split, (total, flagged)) in &counts {
            let what = if *split == "good" { "false alarms" } else { "caught" };
            println!("  {split:<22} {flagged:>3}/{total:<3} {what}");
        }
        for (key, reason) in &self.dead_letters {
            println!("  dead letter: {key} ({reason})");
        }
        println!(
            "throughput {:.2} frames/s; capture→result latency p50 {} / p99 {}; inside the pipeline p50 {} / p99 {}",
            self.results.len() as f64 / throughput_window.max(1e-3),
            fmt_ms(percentile(&self.latencies_ms, 0.5)),
            fmt_ms(percentile(&self.latencies_ms, 0.99)),
            fmt_ms(percentile(&self.in_pipeline_ms, 0.5)),
            fmt_ms(percentile(&self.in_pipeline_ms, 0.99)),
        );
        println!("heatmaps of flagged trays (original | anomaly map, yellow = anomalous): {}/", heatmaps.display());
        println!("next: lineguard run --pipeline pipelines/local.toml   (your own topics and model)");
    }
}

fn fmt_ms(value: Option<f64>) -> String {
    value.map_or("-".into(), |v| format!("{v:.0} ms"))
}

/// Nearest-rank percentile.
fn percentile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}
