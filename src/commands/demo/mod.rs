//! The embedded default: everything on data the project makes itself, so it runs on a fresh machine with
//! no data and no broker of the user's. It synthesises a production line, trains (or reuses) a small DFSC
//! model, chooses a threshold on normal validation trays, starts a local broker and the streaming
//! pipeline with continuous retraining in the same process, and plays two acts:
//!
//! 1. the line as built: the test trays (good, logical and structural anomalies, plus a few broken
//!    messages) stream through, with a live line and where the heatmaps went;
//! 2. the light changes ([`light`]): another day's trays under brighter light raise false alarms, an
//!    operator marks them normal on the feedback topic, the quiet line lets the trainer learn and gate
//!    candidates until one is promoted and hot-swapped, and fresh drifted trays show the new model's false
//!    alarms and catches beside the old one's ([`tally`]).
//!
//! With `--real DIR` the first act streams a real MVTec LOCO category's test images instead, scored by
//! `--model` (or a quick model trained here), and the second act, which synthesises its trays, is skipped.

mod light;
mod tally;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

use lineguard::data::loco::LocoDataset;
use lineguard::data::synth::SynthConfig;
use lineguard::eval::EvalOptions;
use lineguard::model::config::Recipe;
use lineguard::model::EfficientAd;
use lineguard::service::broker::LocalBroker;
use lineguard::service::metrics::GateOutcome;
use lineguard::service::pipeline::RunningPipeline;
use lineguard::service::retrain::gate::GateReport;
use lineguard::service::settings::{KafkaSettings, LineSettings, RetrainSettings, Settings};

use super::cli::DemoArgs;
use light::DriftedTrays;
use tally::{fmt_ms, RetrainingSummary, Scene, Summary, Tally, SPLITS};

/// The demo's short CPU schedule, shared with the quality test; the file says why each value differs from
/// the paper's.
const QUICK_RECIPE: &str = include_str!("../../../pipelines/recipes/quick.toml");

pub fn run(args: &DemoArgs) -> anyhow::Result<ExitCode> {
    // As `lineguard run` does. Training and validation run on a thread of their own that ends before the
    // streaming starts, taking its libtorch worker threads with it (see `make_parallelism_opt_in`).
    lineguard::torch::make_parallelism_opt_in();
    let device = lineguard::torch::select_device(args.cpu);
    let prepare = || -> anyhow::Result<_> {
        let (data, model_path, model, act_one) = match &args.real {
            Some(folder) => real_category(args, folder, device)?,
            None => synthetic_line(args, device)?,
        };
        log::info!("step 3/4: choosing the alarm threshold on the normal validation images");
        let (threshold, accept_below) = validation_threshold(&model, &data.join("validation/good"))?;
        if args.eval {
            let report = super::eval::evaluate(&model, &data, &EvalOptions::default(), None)?;
            println!();
            super::eval::print_table(&report);
            println!();
        }
        Ok((data, model_path, threshold, accept_below, act_one))
    };
    let (data, model_path, threshold, accept_below, act_one) = super::on_parallel_thread("training", prepare)?;

    // The light-change act synthesises its trays: it belongs to the synthetic line.
    let drifted = match args.no_drift || args.real.is_some() {
        true => None,
        false => Some(light::drifted_trays(&args.workdir.join("drift"), args.image_size)?),
    };
    log::info!("step 4/4: streaming the test images through the pipeline");
    let runtime = super::runtime()?;
    runtime.block_on(stream(args, &data, &model_path, threshold, accept_below, act_one, drifted))
}

/// The demo's short schedule at the demo's image size and steps.
fn quick_recipe(args: &DemoArgs) -> anyhow::Result<Recipe> {
    let mut recipe = Recipe::from_toml(QUICK_RECIPE, Path::new("pipelines/recipes/quick.toml"), Some(args.preset))?;
    recipe.image_size = args.image_size as i64;
    if let Some(steps) = args.steps {
        recipe.train.steps = steps;
    }
    recipe.validate()?;
    Ok(recipe)
}

/// `--model` when given; else the model trained on `data` for these settings, reused unless `--retrain`.
fn model_for(args: &DemoArgs, data: &Path, name: &str, device: tch::Device) -> anyhow::Result<(PathBuf, EfficientAd)> {
    if let Some(path) = &args.model {
        log::info!("step 2/4: serving the model {}", path.display());
        let model = EfficientAd::load(path, device).with_context(|| format!("loading --model {}", path.display()))?;
        return Ok((path.clone(), model));
    }
    let recipe = quick_recipe(args)?;
    let path = args
        .workdir
        .join(format!("model-{name}{}-{}px-{}steps.safetensors", args.preset, args.image_size, recipe.train.steps));
    if path.exists() && !args.retrain {
        log::info!("step 2/4: reusing the model {} (pass --retrain to train again)", path.display());
        let model = EfficientAd::load(&path, device)?;
        return Ok((path, model));
    }
    log::info!("step 2/4: training a {} model for {} steps at {} px", args.preset, recipe.train.steps, args.image_size);
    let model = super::train::train(data, &path, recipe, None, None, device)?;
    Ok((path, model))
}

/// A real category instead of the synthetic line: its test images, in random order, are the first act.
fn real_category(
    args: &DemoArgs,
    folder: &Path,
    device: tch::Device,
) -> anyhow::Result<(PathBuf, PathBuf, EfficientAd, Batch)> {
    let dataset = LocoDataset::open(folder)
        .with_context(|| format!("--real {}: expected an MVTec LOCO category folder", folder.display()))?;
    let mut frames: Vec<PathBuf> =
        [&dataset.test_good, &dataset.test_logical, &dataset.test_structural].into_iter().flatten().cloned().collect();
    anyhow::ensure!(!frames.is_empty(), "--real {}: no test images", folder.display());
    frames.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(7));
    let count = frames.len();
    let category = folder.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    log::info!(
        "step 1/4: the real images of {} ({} good, {} logical, {} structural test images)",
        folder.display(),
        dataset.test_good.len(),
        dataset.test_logical.len(),
        dataset.test_structural.len()
    );
    if args.model.is_none() {
        log::warn!(
            "no --model: the demo trains its quick CPU recipe on {category}, minutes instead of the paper's GPU \
             recipe, so expect far weaker detection than BENCHMARKS.md reports"
        );
    }
    let (model_path, model) = model_for(args, folder, &format!("{category}-"), device)?;
    let act_one = Batch {
        prefix: format!("real-{}", std::process::id()),
        scene: Scene::AsBuilt,
        frames,
        with_broken: true,
        title: format!("act 1: {category} — its {count} test images, shuffled, then three broken messages"),
    };
    Ok((folder.to_path_buf(), model_path, model, act_one))
}

/// The synthetic line: synthesised (or reused) in the work folder, with a model trained on it.
fn synthetic_line(args: &DemoArgs, device: tch::Device) -> anyhow::Result<(PathBuf, PathBuf, EfficientAd, Batch)> {
    let data = args.workdir.join("data");
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
    let (model_path, model) = model_for(args, &data, "", device)?;
    let frames = shuffled_trays(&data.join("test"), 7)?;
    let act_one = Batch {
        prefix: format!("demo-{}", std::process::id()),
        scene: Scene::AsBuilt,
        title: format!("act 1: the line as built — {} test trays, shuffled, then three broken messages", frames.len()),
        frames,
        with_broken: true,
    };
    Ok((data, model_path, model, act_one))
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

/// The trays of `folder`'s split subfolders, shuffled like a real line; each keeps its split folder in its
/// path, which labels its frame.
fn shuffled_trays(folder: &Path, seed: u64) -> anyhow::Result<Vec<PathBuf>> {
    let mut frames = Vec::new();
    for split in SPLITS {
        frames.extend(lineguard::data::loco::list_images(&folder.join(split))?);
    }
    frames.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    Ok(frames)
}

struct Topics {
    frames: String,
    results: String,
    maps: String,
    dead_letter: String,
    accepted: String,
    feedback: String,
    models: String,
}

/// Frames sent as one unit: their keys start with `prefix`, and the demo waits for all their outputs.
struct Batch {
    prefix: String,
    scene: Scene,
    frames: Vec<PathBuf>,
    /// Whether three broken messages follow the frames.
    with_broken: bool,
    /// What the batch shows, printed when it starts (empty: nothing printed).
    title: String,
}

/// How a phase of the demo ended.
enum Ended {
    Done,
    Interrupted,
}

async fn stream(
    args: &DemoArgs,
    data: &Path,
    model_path: &Path,
    threshold: f32,
    accept_below: f32,
    act_one: Batch,
    drifted: Option<DriftedTrays>,
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
    let topic = |kind: &str| format!("demo.{kind}{suffix}");
    let topics = Topics {
        frames: topic("frames"),
        results: topic("results"),
        maps: topic("maps"),
        dead_letter: topic("dead-letter"),
        accepted: topic("accepted"),
        feedback: topic("feedback"),
        models: topic("models"),
    };
    let kafka = super::produce::kafka_settings(&brokers);
    lineguard::service::kafka::ensure_topics(
        &kafka,
        &[&topics.frames, &topics.results, &topics.maps, &topics.dead_letter],
        4,
    )
    .await
    .context("creating the demo topics")?;
    lineguard::service::kafka::ensure_topics(&kafka, &[&topics.feedback], 1)
        .await
        .context("creating the demo's feedback topic")?;

    // Every demo run retrains from its own starting model: versions of earlier runs would not compare.
    let state = args.workdir.join("retrain-state");
    if state.exists() {
        std::fs::remove_dir_all(&state).with_context(|| format!("clearing {}", state.display()))?;
    }
    let retrain = RetrainSettings {
        accept_below,
        accepted_topic: topics.accepted.clone(),
        feedback_topic: topics.feedback.clone(),
        models_topic: topics.models.clone(),
        state_dir: state.clone(),
        originals: Some(data.join("train/good")),
        pinned_originals: 16,
        min_frames: 8,
        // Gates a few times a minute: often enough for the act's few minutes, rarely enough that training
        // rather than judging takes most of the trainer's time.
        evaluate_every: 30,
        // No pace limit and both cores: the trainer runs at nice 19 and waits while frames queue, so it
        // takes only what inference leaves, which is everything while the line is quiet.
        steps_per_minute: 6000.0,
        threads: 2,
        // Four times the default: the act has minutes, not the hours a plant's trainer has; the gate
        // still judges every candidate as in production.
        learning_rate: 2e-4,
        // The demo line runs at a few frames a second and its acts last minutes: every confidently normal
        // tray may teach (a plant's line keeps the default spacing).
        accept_per_minute: 6000.0,
        marked_share: args.marked_share,
        ..RetrainSettings::default()
    };
    let settings = demo_settings(&kafka, &topics, model_path, threshold, retrain);
    settings.validate()?;
    let pipeline = lineguard::service::pipeline::start(&settings).await?;
    if let Some(address) = pipeline.metrics_address() {
        println!("pipeline running; Prometheus metrics at http://{address}/metrics");
    }

    let heatmaps = args.workdir.join("stream-heatmaps");
    if heatmaps.exists() {
        std::fs::remove_dir_all(&heatmaps)?;
    }
    std::fs::create_dir_all(&heatmaps)?;
    let mut line = DemoLine {
        producer: super::produce::producer(&kafka)?,
        watcher: watch_outputs(&brokers, &topics)?,
        pipeline: &pipeline,
        topics: &topics,
        gates: GateLog::new(state.join(LINE).join("gate-log.jsonl")),
        tally: Tally::new(threshold),
        paths: HashMap::new(),
        sent: 0,
        started: Instant::now(),
        rate: args.rate,
    };
    println!("{}", act_one.title);
    let mut ended = line.stream_batch(&act_one).await?;
    let mut act_two = ActTwo::default();
    if let (Some(trays), Ended::Done) = (drifted, &ended) {
        (ended, act_two) = play_act_two(&mut line, trays, args.drift_minutes).await?;
    }
    if let Ended::Interrupted = ended {
        log::warn!("interrupted; summarising what came back");
    }
    line.tally.write_pictures(&line.paths, &heatmaps);
    let elapsed = line.started.elapsed();
    line.gates.refresh();
    let (tally, sent, gates) = (line.tally, line.sent, line.gates.reports);
    drop(line.watcher);
    let retrain = pipeline.metrics().retrain_summary(LINE);
    pipeline.shutdown().await?;
    let retraining = RetrainingSummary {
        steps: retrain.steps,
        promoted: retrain.promoted,
        rejected: retrain.rejected,
        marked_normal: act_two.marked_normal,
        fewer_false_alarms_after_s: act_two.promotions.fewer.map(|d| d.as_secs_f64()),
        half_the_false_alarms_after_s: act_two.promotions.half.map(|d| d.as_secs_f64()),
        gates,
    };
    let summary = tally.summary(sent, elapsed, retraining);
    let summary_path = args.workdir.join("summary.json");
    std::fs::write(&summary_path, serde_json::to_vec_pretty(&summary)?)
        .with_context(|| format!("writing {}", summary_path.display()))?;
    print_summary(&summary, &heatmaps, &state.join(LINE));
    println!("the same as JSON: {}", summary_path.display());
    println!("next: lineguard run --pipeline pipelines/local.toml   (your own topics and model)");
    Ok(ExitCode::SUCCESS)
}

/// What the second act did besides streaming.
#[derive(Default)]
struct ActTwo {
    /// False alarms the operator marked normal.
    marked_normal: usize,
    /// How long the trainer took to promote models with fewer and with half the false alarms.
    promotions: Promotions,
}

/// The light changes: drifted trays scored by the serving model, the operator's verdicts on its false
/// alarms, the wait for a better model, and fresh drifted trays scored by whichever model then serves.
async fn play_act_two(
    line: &mut DemoLine<'_>,
    trays: DriftedTrays,
    drift_minutes: f64,
) -> anyhow::Result<(Ended, ActTwo)> {
    let pid = std::process::id();
    let drifted = |batch: u32, frames: Vec<PathBuf>| Batch {
        prefix: format!("drift-{pid}-{batch}"),
        scene: Scene::BrighterLight,
        frames,
        with_broken: false,
        title: String::new(),
    };
    let mut act = ActTwo::default();
    println!(
        "act 2: the light changes — {} trays of another day under brighter light, scored by the serving model",
        trays.before.len()
    );
    let before = drifted(1, trays.before);
    if let Ended::Interrupted = line.stream_batch(&before).await? {
        return Ok((Ended::Interrupted, act));
    }
    act.marked_normal = line.mark_normal(&before.prefix).await?;
    println!(
        "an operator marks the {} false alarms normal on {}; the line is quiet while the trainer learns the \
         new light and gates candidates (up to {drift_minutes} min)",
        act.marked_normal, line.topics.feedback
    );
    let ended;
    (ended, act.promotions) = line.wait_for_fewer_false_alarms(Duration::from_secs_f64(drift_minutes * 60.0)).await?;
    if let Ended::Interrupted = ended {
        return Ok((ended, act));
    }
    let fresh = trays.after.len();
    match act.promotions {
        Promotions { half: Some(after), .. } => println!(
            "a model with at most half the false alarms on held-out frames was promoted after {:.0} s; the next \
             {fresh} trays under the same light go to it",
            after.as_secs_f64(),
        ),
        Promotions { fewer: Some(after), .. } => println!(
            "a model with fewer false alarms on held-out frames was promoted after {:.0} s, but none with half \
             of them within {drift_minutes} min; the next {fresh} trays go to the last promoted model",
            after.as_secs_f64(),
        ),
        Promotions { fewer: None, .. } => println!(
            "no model with fewer false alarms on held-out frames was promoted within {drift_minutes} min; the \
             next {fresh} trays go to the serving model",
        ),
    }
    let ended = line.stream_batch(&drifted(2, trays.after)).await?;
    Ok((ended, act))
}

/// The demo's one line.
const LINE: &str = "demo";

/// The running demo: what it sends with, what it watches, and what it has seen.
struct DemoLine<'a> {
    producer: FutureProducer,
    watcher: StreamConsumer,
    pipeline: &'a RunningPipeline,
    topics: &'a Topics,
    gates: GateLog,
    tally: Tally,
    /// The image file behind each frame key, for the heatmap pictures.
    paths: HashMap<String, PathBuf>,
    sent: u64,
    started: Instant,
    rate: f64,
}

impl DemoLine<'_> {
    /// Sends the batch and reads the output topics until every frame of it has a result or a dead letter,
    /// printing a live line every 3 s.
    async fn stream_batch(&mut self, batch: &Batch) -> anyhow::Result<Ended> {
        let DemoLine { producer, watcher, pipeline, topics, gates, tally, paths, sent, started, rate } = self;
        tally.expect_batch(&batch.prefix, batch.scene);
        let sending = lineguard::service::kafka::Sending {
            topic: &topics.frames,
            camera: "tray-camera",
            line: None,
            key_prefix: &batch.prefix,
            rate: *rate,
        };
        let producing = async {
            let mut keys = Vec::new();
            let count = lineguard::service::kafka::send_files(producer, &batch.frames, &sending, 0, |key| {
                keys.push(key.to_string())
            })
            .await?;
            let broken = if batch.with_broken { send_broken(producer, &topics.frames, batch).await? } else { 0 };
            anyhow::Ok((count + broken, keys))
        };
        tokio::pin!(producing);
        let mut produced: Option<u64> = None;
        let mut report = tokio::time::interval(Duration::from_secs(3));
        let deadline = Instant::now() + Duration::from_secs(30 * 60);
        loop {
            if produced.is_some_and(|total| tally.outputs_of(&batch.prefix) >= total) {
                return Ok(Ended::Done);
            }
            if Instant::now() > deadline {
                log::warn!("gave up waiting for the results of {} after 30 min", batch.prefix);
                return Ok(Ended::Done);
            }
            tokio::select! {
                result = &mut producing, if produced.is_none() => {
                    let (total, keys) = result?;
                    paths.extend(keys.into_iter().zip(batch.frames.iter().cloned()));
                    log::info!("{total} frames sent; waiting for the last results");
                    *sent += total;
                    produced = Some(total);
                }
                message = watcher.recv() => {
                    let message = message.context("reading the demo's output topics")?;
                    tally.record(&message, &topics.maps, &topics.dead_letter);
                }
                _ = report.tick() => {
                    let retrain = pipeline.metrics().retrain_summary(LINE);
                    println!("{}", tally.live_line(batch.scene, started.elapsed(), &retrain));
                    gates.refresh();
                    gates.print_new();
                }
                _ = super::termination() => return Ok(Ended::Interrupted),
            }
        }
    }

    /// What an operator's tool does for each false alarm among the batch's normal trays: the results
    /// record, its verdict changed to `normal`, on the feedback topic. Returns how many were marked.
    async fn mark_normal(&self, prefix: &str) -> anyhow::Result<usize> {
        let false_alarms = self.tally.false_alarms_of(prefix);
        for (key, record) in &false_alarms {
            let mut record: serde_json::Value =
                serde_json::from_slice(record).with_context(|| format!("reading the result of {key}"))?;
            record["verdict"] = "normal".into();
            let payload = serde_json::to_vec(&record)?;
            let sent = FutureRecord::to(&self.topics.feedback).key(*key).payload(&payload);
            self.producer.send(sent, Duration::from_secs(10)).await.map_err(|(err, _)| err)?;
        }
        Ok(false_alarms.len())
    }

    /// Keeps reading outputs and reporting while the trainer learns the new light, until it has promoted a
    /// model that raises at most half the false alarms on held-out frames that the model serving at the
    /// light change raised, and the line serves it; or until `limit` passes, and then until the line
    /// serves the last promotion. (Whether half comes within minutes on 2 cores is a draw of the first
    /// model: a first promotion often clears one held-out frame, or only gains headroom, which changes few
    /// verdicts on new trays; so the act waits for half, and reports what the window gave when it did
    /// not come.)
    async fn wait_for_fewer_false_alarms(&mut self, limit: Duration) -> anyhow::Result<(Ended, Promotions)> {
        let earlier_gates = self.gates.refresh().len();
        let at_light_change = self.pipeline.swapper(LINE).map_or(0, |s| s.serving_version());
        let waiting = Instant::now();
        let mut promotions = Promotions::default();
        let mut check = tokio::time::interval(Duration::from_secs(1));
        let mut checks = 0u64;
        loop {
            tokio::select! {
                message = self.watcher.recv() => {
                    let message = message.context("reading the demo's output topics")?;
                    self.tally.record(&message, &self.topics.maps, &self.topics.dead_letter);
                    continue;
                }
                _ = check.tick() => {}
                _ = super::termination() => return Ok((Ended::Interrupted, promotions)),
            }
            checks += 1;
            let retrain = self.pipeline.metrics().retrain_summary(LINE);
            let gates = self.gates.refresh();
            let since_light_change = || gates.iter().skip(earlier_gates);
            // The light-change model's false alarms on the held-out frames, as the gates measured it once
            // the operator's frames were in.
            let baseline = since_light_change()
                .filter(|gate| gate.current_version == at_light_change)
                .map(|gate| gate.current.false_positive_rate)
                .fold(0.0, f64::max);
            let promoted = |better: &dyn Fn(f64) -> bool| {
                baseline > 0.0
                    && since_light_change()
                        .any(|gate| gate.outcome == GateOutcome::Promoted && better(gate.candidate.false_positive_rate))
            };
            // Rates on the gate's few frames are multiples of 1/n: "fewer" needs a whole frame less, and
            // a rate equal to half is not lost to rounding.
            if promotions.fewer.is_none() && promoted(&|rate| rate < baseline - 1e-9) {
                promotions.fewer = Some(waiting.elapsed());
            }
            if promotions.half.is_none() && promoted(&|rate| rate <= baseline / 2.0 + 1e-9) {
                promotions.half = Some(waiting.elapsed());
            }
            if checks.is_multiple_of(3) {
                println!("{}", self.tally.live_line(Scene::BrighterLight, self.started.elapsed(), &retrain));
                self.gates.print_new();
            }
            // The promoted model reaches the line's inference through the models topic, as it reaches
            // every replica: the act goes on once it scores frames.
            let serving = self.pipeline.swapper(LINE).map_or(0, |s| s.serving_version());
            let serves_the_last = serving >= retrain.model_version;
            let window_over = waiting.elapsed() > limit;
            if serves_the_last && (promotions.half.is_some() || window_over) {
                self.gates.print_new();
                return Ok((Ended::Done, promotions));
            }
            // A promotion made just before the window closed gets a minute to reach the line.
            if waiting.elapsed() > limit + Duration::from_secs(60) {
                return Ok((Ended::Done, promotions));
            }
        }
    }
}

/// When, counted from the operator's verdicts, the trainer promoted models that raised fewer false
/// alarms on the gate's held-out frames than the model serving at the light change.
#[derive(Default, Clone, Copy)]
struct Promotions {
    /// The first with fewer.
    fewer: Option<Duration>,
    /// The first with at most half.
    half: Option<Duration>,
}

/// Three broken messages, as cameras and networks produce them: each must reach the dead-letter topic
/// with its reason while the line keeps going. Returns how many were sent.
async fn send_broken(producer: &FutureProducer, topic: &str, batch: &Batch) -> anyhow::Result<u64> {
    let Some(first) = batch.frames.first() else { return Ok(0) };
    let truncated = std::fs::read(first).map(|b| b[..b.len() / 3].to_vec())?;
    let captured = lineguard::service::kafka::unix_ms().to_string();
    let good_headers = lineguard::service::kafka::to_owned_headers([
        (lineguard::service::frame::HEADER_CAMERA, b"tray-camera".as_slice()),
        (lineguard::service::frame::HEADER_CAPTURED_AT, captured.as_bytes()),
    ]);
    let broken: [(&str, &[u8], bool); 3] =
        [("truncated-png", &truncated, true), ("empty", &[], true), ("no-headers", &truncated, false)];
    for (name, payload, with_headers) in broken {
        let key = format!("{}-broken-{name}", batch.prefix);
        let mut record = FutureRecord::to(topic).key(&key).payload(payload);
        if with_headers {
            record = record.headers(good_headers.clone());
        }
        producer.send(record, Duration::from_secs(10)).await.map_err(|(err, _)| err)?;
    }
    Ok(broken.len() as u64)
}

/// The trainer's gate decisions (`gate-log.jsonl` in its state folder), read once per refresh and
/// printed as they come.
struct GateLog {
    path: PathBuf,
    reports: Vec<GateReport>,
    printed: usize,
}

impl GateLog {
    fn new(path: PathBuf) -> GateLog {
        GateLog { path, reports: Vec::new(), printed: 0 }
    }

    /// Reads the decisions made so far.
    fn refresh(&mut self) -> &[GateReport] {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        // A line being appended right now may be incomplete; it is read next time.
        self.reports = text.lines().map_while(|line| serde_json::from_str(line).ok()).collect();
        &self.reports
    }

    /// Prints the decisions read but not printed yet.
    fn print_new(&mut self) {
        for report in self.reports.iter().skip(self.printed) {
            println!("  gate: {}", report.summary());
        }
        self.printed = self.printed.max(self.reports.len());
    }
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
        lines: BTreeMap::from([(LINE.to_string(), line)]),
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

fn print_summary(summary: &Summary, heatmaps: &Path, state: &Path) {
    println!();
    println!(
        "=== lineguard demo: {} frames sent, {} scored, {} dead-lettered ===",
        summary.sent,
        summary.scored,
        summary.dead_letters.len()
    );
    println!("threshold {:.4} (highest score of a normal validation tray)", summary.threshold);
    println!(
        "  {:<15} {:>5}  {:>14}  {:>14}  {:>17}",
        "scene", "model", "false alarms", "logical caught", "structural caught"
    );
    for row in &summary.rows {
        let scene = row.scene.map_or("-", Scene::describe);
        println!(
            "  {scene:<15} {:>5}  {:>14}  {:>14}  {:>17}",
            format!("v{}", row.model_version),
            format!("{}/{} ({:.2})", row.false_alarms, row.good, row.false_alarm_rate()),
            format!("{}/{}", row.logical_caught, row.logical),
            format!("{}/{}", row.structural_caught, row.structural),
        );
    }
    for dead in &summary.dead_letters {
        println!("  dead letter: {} ({})", dead.key, dead.reason);
    }
    println!(
        "act 1 throughput {:.2} frames/s; capture→result latency p50 {} / p99 {}; inside the pipeline p50 {} / p99 {}",
        summary.throughput_frames_per_s,
        fmt_ms(summary.latency_p50_ms),
        fmt_ms(summary.latency_p99_ms),
        fmt_ms(summary.in_pipeline_p50_ms),
        fmt_ms(summary.in_pipeline_p99_ms),
    );
    let retraining = &summary.retraining;
    let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
    for gate in &retraining.gates {
        *outcomes.entry(gate.outcome.labels().1).or_default() += 1;
    }
    let outcomes: Vec<String> = outcomes.iter().map(|(reason, n)| format!("{n} {reason}")).collect();
    println!(
        "retraining: {} steps, {} false alarms marked normal, candidates {} promoted / {} rejected ({})",
        retraining.steps,
        retraining.marked_normal,
        retraining.promoted,
        retraining.rejected,
        outcomes.join(", ")
    );
    for gate in retraining.gates.iter().filter(|g| g.outcome == GateOutcome::Promoted) {
        println!("  promoted: {}", gate.summary());
    }
    println!("heatmaps of flagged trays (original | anomaly map, yellow = anomalous): {}/", heatmaps.display());
    println!("versions and gate decisions: {} (lineguard model list reads them from a pipeline file)", state.display());
}
