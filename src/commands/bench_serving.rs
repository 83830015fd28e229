//! `lineguard bench-serving`: how fast this machine serves the model, in three measurements made in one
//! run (issue 12). Everything is written to `serving.json` and `serving.md` as soon as it is measured, so a
//! run cut short (a lent GPU's window) still leaves what finished.
//!
//! 1. **Model only**: images/s for each precision × batch, timed from the frames' bytes on the host to the
//!    maps back on the host (as the paper times EfficientAD, with the service's normalisation on the
//!    device), the median over calls; and how far each reduced precision's
//!    maps are from f32's on the same images.
//! 2. **End to end**: JPEG frames through a local broker and the real pipeline (decode pool, batched
//!    inference, results and maps published, offsets committed) at rising offered rates until the
//!    achieved rate falls below 90% of the offered one (the knee), then flat out. Per step: achieved
//!    frames/s, capture→result p50/p99, GPU utilisation (nvidia-smi, when present), CPU per thread group.
//! 3. **Sharing with a trainer**: model-only inference at the largest batch alone and beside a background
//!    trainer started as the retraining stage starts it, alternating, medians.
//!
//! The model is the real architecture with untrained weights unless `--model` names a trained one: speed
//! does not depend on what the weights learnt (the map differences do, a little).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use lineguard::model::config::{Preset, Recipe};
use lineguard::model::train::Trainer;
use lineguard::model::{EfficientAd, MapQuantiles, Precision};
use lineguard::service::broker::LocalBroker;
use lineguard::service::kafka::{send_files, Sending};
use lineguard::service::settings::{KafkaSettings, LineSettings, MetricsSettings, Settings};
use lineguard::service::sink::ResultRecord;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::ClientConfig;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use super::cli::BenchServingArgs;

#[derive(Debug, Default, Serialize)]
struct Report {
    device: String,
    /// The host CPU's model name and the vector extensions that decide CPU speed (machines differ).
    cpu: String,
    image_size: i64,
    channels: i64,
    model: String,
    /// The pipeline's `inference_workers` in the end-to-end steps, in each of its `lines`.
    inference_workers: usize,
    /// Lines in the pipeline, each scoring every frame; end-to-end rates count the results of all.
    lines: usize,
    /// The pipeline's `inference_threads` (0: each line's workers share all the CPU threads).
    inference_threads: usize,
    /// The command line that reproduces this report.
    command: String,
    model_only: Vec<ModelOnlyRow>,
    end_to_end: Vec<StreamStep>,
    trainer_sharing: Option<TrainerSharing>,
}

impl Report {
    /// The highest model-only rate measured in `precision` (0 before any).
    fn best_model_only(&self, precision: Precision) -> f64 {
        self.model_only
            .iter()
            .filter(|row| row.precision == precision)
            .map(|row| row.images_per_second)
            .fold(0.0, f64::max)
    }
}

#[derive(Debug, Serialize)]
struct ModelOnlyRow {
    precision: Precision,
    batch: i64,
    images_per_second: f64,
    calls: usize,
    /// Largest |maps − f32 maps| over the f32 maps' range, on the same images.
    map_difference_vs_f32: f64,
    /// On CUDA: whether cuDNN chose its kernels by timing them (the service turns it on; one row measures
    /// the first precision at the largest batch without it).
    cudnn_benchmark: Option<bool>,
    /// Threads scoring side by side, each with its own copy of the model and an equal share of the CPU
    /// threads (`inference_workers`); the rate is their sum.
    workers: usize,
    /// Whether the input reached the networks in channels-last memory order, as the service's normalisation
    /// of interleaved RGB bytes leaves it (oneDNN and cuDNN then keep that order through the
    /// convolutions); one row per precision measures the contiguous channel-major order for comparison.
    channels_last: bool,
    /// On CUDA: whether the batch was assembled in pinned host memory, as the service does on a GPU (one
    /// row per precision measures pageable memory for comparison).
    pinned_host_memory: Option<bool>,
}

#[derive(Debug, Serialize)]
struct StreamStep {
    precision: Precision,
    /// Frames/s offered by the producer; `None` = flat out.
    offered_per_second: Option<f64>,
    /// Results: frames × lines (every line scores every frame).
    frames: usize,
    /// Results per second, all lines together.
    achieved_per_second: f64,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
    /// Consumption → result published, the pipeline's own share of the latency (the rest is the broker
    /// and the clients: producer linger, fetches).
    in_pipeline_p50_ms: f64,
    in_pipeline_p99_ms: f64,
    /// Median milliseconds per stage inside the pipeline: queue (consumed → decoding starts), preprocess,
    /// batch wait, inference.
    stage_p50_ms: BTreeMap<String, f64>,
    mean_batch: f64,
    gpu_utilisation_percent: Option<f64>,
    /// CPU milliseconds per frame, by thread group (this process; the broker is another process).
    cpu_ms_per_frame: BTreeMap<String, f64>,
    broker_cpu_ms_per_frame: Option<f64>,
}

#[derive(Debug, Serialize)]
struct TrainerSharing {
    precision: Precision,
    batch: i64,
    alone_images_per_second: f64,
    with_trainer_images_per_second: f64,
    ratio: f64,
    trainer_steps_per_second: f64,
    rounds: usize,
}

pub fn run(args: &BenchServingArgs) -> anyhow::Result<()> {
    // As `lineguard run` does: the measuring threads are the only ones with libtorch parallelism.
    lineguard::torch::make_parallelism_opt_in();
    let device = lineguard::torch::select_device(args.cpu);
    if !(1..=64).contains(&args.inference_workers) {
        bail!("--inference-workers {}: expected 1..=64", args.inference_workers);
    }
    if !(1..=16).contains(&args.lines) {
        bail!("--lines {}: expected 1..=16", args.lines);
    }
    if args.inference_threads > 1024 {
        bail!("--inference-threads {}: expected 0..=1024", args.inference_threads);
    }
    if args.require_cuda && !device.is_cuda() {
        bail!("--require-cuda: libtorch sees no CUDA device");
    }
    std::fs::create_dir_all(&args.out_dir).with_context(|| format!("cannot create {}", args.out_dir.display()))?;
    let model = bench_model(args, device)?;
    let mut report = Report {
        device: lineguard::torch::describe_threads(device, lineguard::torch::parallel_threads()),
        cpu: cpu_description(),
        image_size: model.recipe.image_size,
        channels: model.recipe.channels,
        model: args.model.as_ref().map_or("untrained DFSC preset".into(), |p| p.display().to_string()),
        inference_workers: args.inference_workers,
        lines: args.lines,
        inference_threads: args.inference_threads,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        ..Default::default()
    };
    log::info!("bench-serving on {}, {} px, results in {}", report.device, report.image_size, args.out_dir.display());
    let model_bytes = model.to_bytes()?;
    let copy = |precision: Precision| -> anyhow::Result<EfficientAd> {
        Ok(EfficientAd::from_bytes(&model_bytes, Path::new("<bench>"), device)?.with_precision(precision))
    };

    // Model-only rates measured on a thread like the pipeline's inference thread.
    super::on_parallel_thread("model-only", || measure_model_only(args, &copy(Precision::F32)?, &copy, &mut report))?;
    if args.stream_seconds > 0.0 {
        measure_end_to_end(args, &model, &mut report)?;
    }
    if args.trainer_rounds > 0 {
        let precision = args.precisions.first().copied().unwrap_or_default();
        let batch = args.batches.iter().copied().max().unwrap_or(1);
        let sharing = super::on_parallel_thread("model-only", || {
            measure_trainer_sharing(args, copy(precision)?, &model_bytes, batch, device)
        })?;
        report.trainer_sharing = Some(sharing);
        write_report(&report, &args.out_dir)?;
    }
    println!("{}", markdown(&report));
    Ok(())
}

/// `model name` from /proc/cpuinfo with the extensions libtorch's CPU kernels use when present: on a CPU
/// with AMX, bf16 inference is faster than f32; on one with AVX2 only, slower.
fn cpu_description() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|line| line.starts_with(name))
            .and_then(|line| line.split_once(':'))
            .map(|(_, value)| value.trim().to_string())
            .unwrap_or_default()
    };
    let extensions = lineguard::torch::cpu_extensions(&info);
    let present: Vec<&str> = ["avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16"]
        .into_iter()
        .filter(|wanted| extensions.contains(wanted))
        .collect();
    format!(
        "{} ({} cores; {})",
        field("model name"),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        present.join(" ")
    )
}

fn bench_model(args: &BenchServingArgs, device: Device) -> anyhow::Result<EfficientAd> {
    if let Some(path) = &args.model {
        let model = EfficientAd::load(path, device)?;
        lineguard::service::infer::check_servable(&model)?;
        return Ok(model);
    }
    let mut recipe = Recipe { image_size: args.side, ..Recipe::preset(Preset::Dfsc) };
    if let Some(channels) = args.channels {
        recipe.channels = channels;
    }
    recipe.validate()?;
    let mut model = EfficientAd::new(recipe, device)?;
    model.map_quantiles = Some(MapQuantiles { student_teacher: (0.0, 1.0), autoencoder: (0.0, 1.0) });
    Ok(model)
}

fn measure_model_only(
    args: &BenchServingArgs,
    reference: &EfficientAd,
    copy: &dyn Fn(Precision) -> anyhow::Result<EfficientAd>,
    report: &mut Report,
) -> anyhow::Result<()> {
    let side = reference.recipe.image_size;
    tch::manual_seed(17);
    let probe = host_frames(4, side);
    let reference_maps = maps_on_host(reference, &probe, true, false)?;
    let range = (reference_maps.max() - reference_maps.min()).double_value(&[]).max(f64::MIN_POSITIVE);
    let cuda = reference.device().is_cuda();
    let largest = args.batches.iter().copied().max().unwrap_or(1);
    for (index, &precision) in args.precisions.iter().enumerate() {
        let model = copy(precision)?;
        let maps = maps_on_host(&model, &probe, true, false)?;
        let difference = (maps - &reference_maps).abs().max().double_value(&[]) / range;
        // (batch, cuDNN benchmark, channels-last input, pinned host memory)
        let mut cases: Vec<(i64, Option<bool>, bool, Option<bool>)> = Vec::new();
        let pinned = cuda.then_some(true);
        if cuda && index == 0 {
            // cuDNN's heuristic choice first, then (as the service runs) its timed choice for every case.
            cases.push((largest, Some(false), true, pinned));
        }
        // The channel-major input order, next to the same case in channels-last order.
        cases.push((largest, cuda.then_some(true), false, pinned));
        if cuda {
            // Pageable host memory, next to the same case from pinned memory.
            cases.push((largest, Some(true), true, Some(false)));
        }
        cases.extend(args.batches.iter().map(|&batch| (batch, cuda.then_some(true), true, pinned)));
        for (batch, cudnn_benchmark, channels_last, pinned_host_memory) in cases {
            let pageable = pinned_host_memory == Some(false);
            if let Some(on) = cudnn_benchmark {
                tch::Cuda::cudnn_set_benchmark(on);
            }
            let images = host_frames(batch, side);
            for _ in 0..3 {
                // Warm-up: allocators, cuDNN's kernel choice.
                let _ = maps_on_host(&model, &images, channels_last, pageable)?;
            }
            let mut calls = Vec::new();
            let started = Instant::now();
            while started.elapsed().as_secs_f64() < args.seconds || calls.len() < 3 {
                let call = Instant::now();
                let _ = maps_on_host(&model, &images, channels_last, pageable)?;
                calls.push(call.elapsed().as_secs_f64());
            }
            let images_per_second = batch as f64 / median(&calls);
            let order = if channels_last { "" } else { " (channel-major input)" };
            let memory = if pageable { " (pageable host memory)" } else { "" };
            log::info!("model only, {precision}, batch {batch}{order}{memory}: {images_per_second:.1} images/s");
            report.model_only.push(ModelOnlyRow {
                precision,
                batch,
                images_per_second,
                calls: calls.len(),
                map_difference_vs_f32: difference,
                cudnn_benchmark,
                workers: 1,
                channels_last,
                pinned_host_memory,
            });
            write_report(report, &args.out_dir)?;
        }
        let workers = args.inference_workers * args.lines;
        if workers > 1 {
            for &batch in &args.batches {
                let (images_per_second, calls) = side_by_side(args, copy, precision, batch, workers)?;
                log::info!(
                    "model only, {precision}, batch {batch}, {workers} workers: {images_per_second:.1} images/s"
                );
                report.model_only.push(ModelOnlyRow {
                    precision,
                    batch,
                    images_per_second,
                    calls,
                    map_difference_vs_f32: difference,
                    cudnn_benchmark: cuda.then_some(true),
                    workers,
                    channels_last: true,
                    pinned_host_memory: cuda.then_some(true),
                });
                write_report(report, &args.out_dir)?;
            }
        }
    }
    Ok(())
}

/// `workers` threads scoring batches of `batch` side by side, as the inference stages' workers do (every
/// line's): each its own copy of the model and its share of the CPU threads. They start timing together
/// after their warm-up; the rate is the sum of theirs. Returns (images/s, calls in all).
fn side_by_side(
    args: &BenchServingArgs,
    copy: &dyn Fn(Precision) -> anyhow::Result<EfficientAd>,
    precision: Precision,
    batch: i64,
    workers: usize,
) -> anyhow::Result<(f64, usize)> {
    let threads = lineguard::service::infer::threads_per_worker(args.inference_threads, workers);
    let models: Vec<EfficientAd> = (0..workers).map(|_| copy(precision)).collect::<anyhow::Result<_>>()?;
    let start_line = std::sync::Barrier::new(workers);
    let start_line = &start_line;
    let rates = std::thread::scope(|scope| {
        let handles: Vec<_> = models
            .into_iter()
            .map(|model| {
                scope.spawn(move || -> anyhow::Result<(f64, usize)> {
                    lineguard::torch::use_threads(threads);
                    let images = host_frames(batch, model.recipe.image_size);
                    let warm_up = (0..3).try_for_each(|_| maps_on_host(&model, &images, true, false).map(drop));
                    // Every worker reaches the start line, even one whose warm-up failed.
                    start_line.wait();
                    warm_up?;
                    let started = Instant::now();
                    let mut calls = 0;
                    while started.elapsed().as_secs_f64() < args.seconds || calls < 3 {
                        let _ = maps_on_host(&model, &images, true, false)?;
                        calls += 1;
                    }
                    Ok((batch as f64 * calls as f64 / started.elapsed().as_secs_f64(), calls))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().map_err(|_| anyhow::anyhow!("a model-only worker panicked"))?)
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    Ok(rates.iter().fold((0.0, 0), |(rate, calls), &(r, c)| (rate + r, calls + c)))
}

/// Host frames → maps back on the host (the copy back waits for the device), as the inference stage does
/// it: the frames' RGB bytes [B, side, side, 3] written into one batch tensor on the host (pinned for a
/// GPU unless `pageable`), copied to the device and normalised there.
fn maps_on_host(model: &EfficientAd, frames: &Tensor, channels_last: bool, pageable: bool) -> anyhow::Result<Tensor> {
    let (side, device) = (model.recipe.image_size, model.device());
    let host = lineguard::torch::host_bytes(&frames.size(), if pageable { Device::Cpu } else { device }, |bytes| {
        frames.copy_data_u8(bytes, bytes.len())
    });
    let images = lineguard::data::preprocess::normalise_bytes(&lineguard::torch::to_device_async(&host, device));
    let images = if channels_last { images } else { images.contiguous() };
    let maps = model.anomaly_maps(&images, side, side)?;
    Ok(maps.to_device(Device::Cpu))
}

/// Random RGB frames as the decode pool hands them over: bytes [count, side, side, 3] on the host.
fn host_frames(count: i64, side: i64) -> Tensor {
    Tensor::randint(256, [count, side, side, 3], (Kind::Uint8, Device::Cpu))
}

fn measure_end_to_end(args: &BenchServingArgs, model: &EfficientAd, report: &mut Report) -> anyhow::Result<()> {
    // Frames, the model file and the broker's log, outside the results folder (a lent GPU returns only a
    // few files of it); removed afterwards, kept when a step failed.
    let scratch = std::env::temp_dir().join(format!("lineguard-bench-serving-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).with_context(|| format!("cannot create {}", scratch.display()))?;
    let frames = jpeg_frames(args, &scratch)?;
    let model_path = scratch.join("model.safetensors");
    model.save(&model_path)?;
    let broker = LocalBroker::start(None, Some(&scratch.join("broker.log")))
        .context("the end-to-end measurement needs the nisshi broker (scripts/setup.sh installs it)")?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    for &precision in &args.precisions {
        let best_model_only = report.best_model_only(precision).max(1.0);
        let line = StreamLine { args, brokers: broker.bootstrap(), broker_pid: broker.pid(), model: &model_path };
        runtime.block_on(line.curve(precision, &frames, best_model_only, report))?;
    }
    drop(broker);
    std::fs::remove_dir_all(&scratch).with_context(|| format!("cannot remove {}", scratch.display()))?;
    Ok(())
}

/// The frames as JPEG files (quality 90), as cameras send them: `--frames` (any image folder, searched
/// recursively) or synthetic trays at the model's side.
fn jpeg_frames(args: &BenchServingArgs, scratch: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let sources = match &args.frames {
        Some(folder) => images_under(folder)?,
        None => {
            let side = (args.side as u32).clamp(128, 512);
            let per_split = args.distinct_frames.div_ceil(3).max(1);
            let config = lineguard::data::synth::SynthConfig::test_frames(3, side, per_split);
            lineguard::data::synth::generate(&config, &scratch.join("synth"), &mut || {})?;
            images_under(&scratch.join("synth").join("test"))?
        }
    };
    if sources.is_empty() {
        bail!("no images to stream");
    }
    let folder = scratch.join("frames");
    std::fs::create_dir_all(&folder)?;
    let mut frames = Vec::new();
    for (index, source) in sources.iter().take(args.distinct_frames.max(1)).enumerate() {
        let image = lineguard::data::preprocess::load_image(source)?;
        let path = folder.join(format!("frame-{index:04}.jpg"));
        let mut file = std::io::BufWriter::new(std::fs::File::create(&path)?);
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut file, 90).encode_image(&image)?;
        frames.push(path);
    }
    Ok(frames)
}

fn images_under(folder: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(folder)
        .with_context(|| format!("cannot read {}", folder.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            found.extend(images_under(&path)?);
        } else if lineguard::data::loco::is_image(&path) {
            found.push(path);
        }
    }
    Ok(found)
}

struct StreamLine<'a> {
    args: &'a BenchServingArgs,
    brokers: String,
    broker_pid: u32,
    model: &'a Path,
}

impl StreamLine<'_> {
    /// One pipeline in `precision`; a warm-up, then rising offered rates until the knee, then flat out.
    async fn curve(
        &self,
        precision: Precision,
        frames: &[PathBuf],
        model_only_rate: f64,
        report: &mut Report,
    ) -> anyhow::Result<()> {
        let args = self.args;
        let mut kafka = KafkaSettings::for_brokers(&self.brokers, "bench-serving");
        // nisshi answers a fetch that found no new records by polling its storage with halving sleeps
        // (250 ms, 125 ms, … of librdkafka's default 500 ms wait), where Kafka answers as soon as records
        // arrive: a short wait keeps that out of the measured latency.
        let fetch_wait = args.fetch_wait_ms.to_string();
        kafka.consumer.insert("fetch.wait.max.ms".into(), fetch_wait.clone());
        let topic = |kind: &str| format!("serving.{precision}.{kind}");
        let (input, results, maps, dead) = (topic("frames"), topic("results"), topic("maps"), topic("dead-letter"));
        lineguard::service::kafka::ensure_topics(&kafka, &[&input, &results, &maps, &dead], args.partitions).await?;
        let line = |index: usize| LineSettings {
            results_topic: results.clone(),
            maps_topic: maps.clone(),
            dead_letter_topic: dead.clone(),
            group_id: Some(format!("serving-{precision}-{index}")),
            map_format: args.map_format,
            precision,
            device: if args.cpu {
                lineguard::service::settings::DeviceChoice::Cpu
            } else {
                lineguard::service::settings::DeviceChoice::Auto
            },
            max_batch: args.batches.iter().copied().max().unwrap_or(8).max(1) as usize,
            inference_workers: args.inference_workers,
            inference_threads: args.inference_threads,
            max_batch_wait_ms: args.max_batch_wait_ms,
            max_in_flight: args.max_in_flight,
            ..LineSettings::with_defaults(self.model.to_path_buf(), vec![input.clone()], 0.5)
        };
        let lines = (0..args.lines).map(|index| (format!("bench-{index}"), line(index))).collect();
        let settings = Settings {
            kafka: kafka.clone(),
            metrics: MetricsSettings { listen: String::new(), ..Default::default() },
            shutdown: Default::default(),
            lines,
        };
        let pipeline = lineguard::service::pipeline::start(&settings).await?;
        let reader: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("fetch.wait.max.ms", &fetch_wait)
            .set("group.id", format!("serving-reader-{precision}"))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()?;
        reader.subscribe(&[&results])?;
        let producer = lineguard::service::kafka::producer_config(&kafka).create()?;
        let stream = Stream {
            input: &input,
            lines: args.lines,
            reader: &reader,
            producer: &producer,
            frames,
            broker_pid: self.broker_pid,
        };

        // Group join, first fetch, first batches: not part of any step.
        stream.step("warm-up", precision, 2 * frames.len().max(8), None).await?;
        // Offered rates are frames/s into the topic; every line scores each frame.
        let lines = args.lines as f64;
        let mut rate = args.start_rate.unwrap_or(0.25 * model_only_rate / lines).max(1.0);
        for step in 0..args.max_steps {
            let count = ((rate * args.stream_seconds).ceil() as usize).max(8);
            let measured = stream.step(&format!("step{step}"), precision, count, Some(rate)).await?;
            let kept_up = measured.achieved_per_second >= 0.9 * rate * lines;
            log::info!(
                "{precision}: offered {rate:.1}/s, achieved {:.1}/s, p50 {:.1} ms, p99 {:.1} ms",
                measured.achieved_per_second,
                measured.latency_p50_ms,
                measured.latency_p99_ms
            );
            report.end_to_end.push(measured);
            write_report(report, &args.out_dir)?;
            if !kept_up {
                break;
            }
            rate *= args.rate_factor;
        }
        let last_rate = report.end_to_end.last().map_or(1.0, |s| s.achieved_per_second) / lines;
        let count = ((last_rate * args.stream_seconds).ceil() as usize).max(8);
        let flat_out = stream.step("flat", precision, count, None).await?;
        log::info!("{precision}: flat out {:.1}/s", flat_out.achieved_per_second);
        report.end_to_end.push(flat_out);
        write_report(report, &args.out_dir)?;
        pipeline.shutdown().await?;
        Ok(())
    }
}

struct Stream<'a> {
    input: &'a str,
    /// Lines scoring every frame: each frame has this many results.
    lines: usize,
    reader: &'a StreamConsumer,
    producer: &'a rdkafka::producer::FutureProducer,
    frames: &'a [PathBuf],
    broker_pid: u32,
}

impl Stream<'_> {
    /// Sends `count` frames (cycling through the files) at `rate` (`None`: flat out) and waits for all of
    /// their results (every line's); rates and per-frame figures count results.
    async fn step(
        &self,
        name: &str,
        precision: Precision,
        count: usize,
        rate: Option<f64>,
    ) -> anyhow::Result<StreamStep> {
        let files: Vec<PathBuf> = self.frames.iter().cycle().take(count).cloned().collect();
        let prefix = format!("{precision}-{name}");
        let sending =
            Sending { topic: self.input, camera: "bench", line: None, key_prefix: &prefix, rate: rate.unwrap_or(0.0) };
        let cpu_before = ThreadCpu::read(self.broker_pid);
        let gpu = GpuSampler::start();
        let started = Instant::now();
        let sent = send_files(self.producer, &files, &sending, 0, |_| {});
        tokio::pin!(sent);
        let mut sent_done = false;
        let results = count * self.lines;
        let mut seen = HashSet::new();
        let mut latencies = Vec::with_capacity(results);
        let mut in_pipeline = Vec::with_capacity(results);
        let mut stages: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        let mut batch_sizes = 0usize;
        let mut last = started;
        // A step that cannot finish (a stalled pipeline) must not hang the benchmark.
        let patience = Duration::from_secs_f64(count as f64 / rate.unwrap_or(50.0).max(1.0) + 60.0);
        while seen.len() < results {
            let remaining = patience.saturating_sub(started.elapsed());
            tokio::select! {
                done = &mut sent, if !sent_done => { done?; sent_done = true; }
                message = self.reader.recv() => {
                    let message = message?;
                    let result: ResultRecord = serde_json::from_slice(message.payload().unwrap_or_default())?;
                    if result.frame_id.starts_with(&prefix) && seen.insert((result.line.clone(), result.frame_id.clone())) {
                        latencies.push((lineguard::service::kafka::unix_ms() - result.camera.captured_at_ms) as f64);
                        let timings = &result.timings_ms;
                        in_pipeline.push(timings.in_pipeline);
                        for (stage, ms) in [("1 queue", timings.queue), ("2 preprocess", timings.preprocess),
                            ("3 batch wait", timings.batch_wait), ("4 inference", timings.inference)] {
                            stages.entry(stage.to_string()).or_default().push(ms);
                        }
                        batch_sizes += result.batch_size;
                        last = Instant::now();
                    }
                }
                _ = tokio::time::sleep(remaining) => bail!("{name}: {} of {results} results after {patience:?}", seen.len()),
            }
        }
        let wall = (last - started).as_secs_f64();
        let cpu = ThreadCpu::read(self.broker_pid).since(&cpu_before);
        let per_frame = |seconds: f64| seconds * 1e3 / results as f64;
        Ok(StreamStep {
            precision,
            offered_per_second: rate,
            frames: results,
            achieved_per_second: results as f64 / wall,
            latency_p50_ms: percentile(&latencies, 0.5),
            latency_p99_ms: percentile(&latencies, 0.99),
            in_pipeline_p50_ms: percentile(&in_pipeline, 0.5),
            in_pipeline_p99_ms: percentile(&in_pipeline, 0.99),
            stage_p50_ms: stages.iter().map(|(stage, ms)| (stage.clone(), median(ms))).collect(),
            mean_batch: batch_sizes as f64 / results as f64,
            gpu_utilisation_percent: gpu.and_then(GpuSampler::stop),
            cpu_ms_per_frame: cpu.groups.into_iter().map(|(group, seconds)| (group, per_frame(seconds))).collect(),
            broker_cpu_ms_per_frame: cpu.broker.map(per_frame),
        })
    }
}

/// CPU seconds used so far by this process's threads, grouped by what they do (from their names), and by
/// the broker process.
struct ThreadCpu {
    groups: BTreeMap<String, f64>,
    broker: Option<f64>,
}

impl ThreadCpu {
    fn read(broker_pid: u32) -> ThreadCpu {
        let mut groups = BTreeMap::new();
        if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
            for task in tasks.filter_map(Result::ok) {
                if let Some((name, seconds)) =
                    std::fs::read_to_string(task.path().join("stat")).ok().and_then(|s| parse_stat(&s))
                {
                    *groups.entry(thread_group(&name).to_string()).or_insert(0.0) += seconds;
                }
            }
        }
        let broker = std::fs::read_to_string(format!("/proc/{broker_pid}/stat"))
            .ok()
            .and_then(|s| parse_stat(&s))
            .map(|(_, s)| s);
        ThreadCpu { groups, broker }
    }

    fn since(mut self, before: &ThreadCpu) -> ThreadCpu {
        for (group, seconds) in &mut self.groups {
            *seconds -= before.groups.get(group).copied().unwrap_or(0.0);
        }
        self.broker = self.broker.zip(before.broker).map(|(after, before)| after - before);
        self
    }
}

/// `(name, user + system CPU seconds)` from a `/proc/.../stat` line; the name may hold spaces and
/// parentheses, so fields are counted from the last `)`.
fn parse_stat(stat: &str) -> Option<(String, f64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?.to_string();
    let fields: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    // After the name: state is field 3 of stat(5); utime and stime are fields 14 and 15.
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some((name, ticks / per_second))
}

fn thread_group(name: &str) -> &'static str {
    if name == "infer" || name.starts_with("infer-") {
        "inference"
    } else if name.starts_with("preprocess") {
        "decode pool"
    } else if name.starts_with("rdk:") {
        "kafka clients (pipeline and bench)"
    } else if name.starts_with("tokio") {
        "async stages (source, sink, map encoding)"
    } else {
        "other (libtorch workers, main)"
    }
}

/// `nvidia-smi` sampling GPU utilisation every 100 ms; `None` where there is no nvidia-smi.
struct GpuSampler {
    child: std::process::Child,
    reader: std::thread::JoinHandle<Vec<f64>>,
}

impl GpuSampler {
    fn start() -> Option<GpuSampler> {
        let mut child = std::process::Command::new("nvidia-smi")
            .args(["--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100", "-i", "0"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let stdout = child.stdout.take()?;
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .filter_map(|l| l.trim().parse().ok())
                .collect()
        });
        Some(GpuSampler { child, reader })
    }

    fn stop(mut self) -> Option<f64> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let samples = self.reader.join().ok()?;
        (!samples.is_empty()).then(|| samples.iter().sum::<f64>() / samples.len() as f64)
    }
}

/// Inference alone and beside a trainer, alternating for `trainer_rounds` rounds of `seconds` each.
fn measure_trainer_sharing(
    args: &BenchServingArgs,
    model: EfficientAd,
    model_bytes: &[u8],
    batch: i64,
    device: Device,
) -> anyhow::Result<TrainerSharing> {
    let side = model.recipe.image_size;
    let images = host_frames(batch, side);
    // Images/s over at least `duration`, and until `done()`.
    let rate_for = |duration: f64, done: &dyn Fn() -> bool| -> anyhow::Result<f64> {
        let started = Instant::now();
        let mut scored = 0;
        while started.elapsed().as_secs_f64() < duration || scored == 0 || !done() {
            let _ = maps_on_host(&model, &images, true, false)?;
            scored += batch;
        }
        Ok(scored as f64 / started.elapsed().as_secs_f64())
    };
    rate_for(0.2, &|| true)?; // warm-up
    let stop = Arc::new(AtomicBool::new(false));
    let steps = Arc::new(AtomicU64::new(0));
    let paused = Arc::new(AtomicBool::new(true));
    let trainer = {
        let (stop, steps, paused) = (stop.clone(), steps.clone(), paused.clone());
        let bytes = model_bytes.to_vec();
        let threads = args.trainer_threads;
        std::thread::Builder::new().name("bench-trainer".into()).spawn(move || -> anyhow::Result<()> {
            // As the retraining stage starts its trainer (service::retrain::trainer).
            lineguard::torch::use_threads(threads);
            lineguard::torch::lower_thread_priority();
            let model = EfficientAd::from_bytes(&bytes, Path::new("<bench>"), device)?;
            let images = Tensor::rand([16, 3, side, side], (Kind::Float, Device::Cpu));
            let mut trainer = Trainer::continue_from(model, images)?;
            trainer.model.recipe.train.steps = u64::MAX;
            while !stop.load(Ordering::Relaxed) {
                if paused.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                trainer.step()?;
                steps.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })?
    };
    let mut alone = Vec::new();
    let mut shared = Vec::new();
    let mut trainer_rates = Vec::new();
    for _ in 0..args.trainer_rounds {
        alone.push(rate_for(args.seconds, &|| true)?);
        paused.store(false, Ordering::Relaxed);
        // The trainer's first step builds its optimiser state: not part of the shared window.
        let wait = Instant::now();
        while steps.load(Ordering::Relaxed) == 0 && wait.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let first = steps.load(Ordering::Relaxed);
        let started = Instant::now();
        // A window that saw no trainer step measured nothing shared: it lasts until one step ends in it.
        shared.push(rate_for(args.seconds, &|| steps.load(Ordering::Relaxed) > first)?);
        trainer_rates.push((steps.load(Ordering::Relaxed) - first) as f64 / started.elapsed().as_secs_f64());
        paused.store(true, Ordering::Relaxed);
    }
    stop.store(true, Ordering::Relaxed);
    trainer.join().map_err(|_| anyhow::anyhow!("the trainer thread panicked"))??;
    let (alone, shared) = (median(&alone), median(&shared));
    Ok(TrainerSharing {
        precision: model.precision(),
        batch,
        alone_images_per_second: alone,
        with_trainer_images_per_second: shared,
        ratio: shared / alone,
        trainer_steps_per_second: median(&trainer_rates),
        rounds: args.trainer_rounds,
    })
}

fn write_report(report: &Report, dir: &Path) -> anyhow::Result<()> {
    let json = dir.join("serving.json");
    std::fs::write(&json, serde_json::to_string_pretty(report)?)
        .with_context(|| format!("cannot write {}", json.display()))?;
    std::fs::write(dir.join("serving.md"), markdown(report))?;
    Ok(())
}

fn markdown(report: &Report) -> String {
    let mut out = format!(
        "# Serving speed: {}, {} px, {} channels, {}\n\nCPU: {}\n\n`{}`\n\n## Model only (frame bytes on the host → maps on the host)\n\n\
         | precision | batch | workers | images/s | calls | max map difference vs f32 (of range) | cuDNN benchmark | input order | host memory |\n\
         |---|---|---|---|---|---|---|---|---|\n",
        report.device, report.image_size, report.channels, report.model, report.cpu, report.command
    );
    for row in &report.model_only {
        out += &format!(
            "| {} | {} | {} | {:.1} | {} | {:.1e} | {} | {} | {} |\n",
            row.precision,
            row.batch,
            row.workers,
            row.images_per_second,
            row.calls,
            row.map_difference_vs_f32,
            row.cudnn_benchmark.map_or("-", |on| if on { "on" } else { "off" }),
            if row.channels_last { "channels-last" } else { "channel-major" },
            row.pinned_host_memory.map_or("-", |pinned| if pinned { "pinned" } else { "pageable" })
        );
    }
    if !report.end_to_end.is_empty() {
        out += "\n## End to end (JPEG frames through the broker and the pipeline)\n\n";
        if report.lines > 1 {
            out += &format!(
                "{} lines of {} inference worker(s) of {} each score every frame: offered = frames/s into the \
                 topic, achieved = results/s of all lines.\n\n",
                report.lines,
                report.inference_workers,
                match report.inference_threads {
                    0 => "the line's share of the CPU threads".to_string(),
                    threads => format!("{threads} CPU thread(s)"),
                }
            );
        }
        out += "| precision | offered/s | achieved/s | p50 / p99 ms | in pipeline p50 / p99 ms | mean batch | GPU % | CPU ms per frame |\n\
                |---|---|---|---|---|---|---|---|\n";
        for step in &report.end_to_end {
            let cpu: Vec<String> = step
                .cpu_ms_per_frame
                .iter()
                .filter(|(_, ms)| **ms > 0.0)
                .map(|(group, ms)| format!("{group} {ms:.2}"))
                .chain(step.broker_cpu_ms_per_frame.map(|ms| format!("broker {ms:.2}")))
                .collect();
            out += &format!(
                "| {} | {} | {:.1} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} | {} | {} |\n",
                step.precision,
                step.offered_per_second.map_or("flat out".into(), |r| format!("{r:.1}")),
                step.achieved_per_second,
                step.latency_p50_ms,
                step.latency_p99_ms,
                step.in_pipeline_p50_ms,
                step.in_pipeline_p99_ms,
                step.mean_batch,
                step.gpu_utilisation_percent.map_or("-".into(), |u| format!("{u:.0}")),
                cpu.join(", ")
            );
        }
        let mut precisions: Vec<Precision> = report.end_to_end.iter().map(|s| s.precision).collect();
        precisions.dedup();
        for precision in precisions {
            let best_stream = report
                .end_to_end
                .iter()
                .filter(|s| s.precision == precision && s.offered_per_second.is_none())
                .map(|s| s.achieved_per_second)
                .fold(0.0, f64::max);
            let best_model = report.best_model_only(precision);
            if best_model > 0.0 && best_stream > 0.0 {
                out += &format!(
                    "\n{precision}: end to end flat out / best model-only = {best_stream:.1} / {best_model:.1} = {:.2}\n",
                    best_stream / best_model
                );
            }
        }
    }
    if let Some(sharing) = &report.trainer_sharing {
        out += &format!(
            "\n## Sharing the device with a trainer ({}, batch {}, {} rounds, medians)\n\n\
             inference alone {:.1} images/s, beside the trainer {:.1} images/s: ratio {:.2}; trainer {:.2} steps/s\n",
            sharing.precision,
            sharing.batch,
            sharing.rounds,
            sharing.alone_images_per_second,
            sharing.with_trainer_images_per_second,
            sharing.ratio,
            sharing.trainer_steps_per_second
        );
    }
    out
}

fn median(values: &[f64]) -> f64 {
    percentile(values, 0.5)
}

/// The nearest-rank percentile; NaN for no values.
fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_thread_names_parse() {
        let line = "4242 (rdk:broker (1)) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0 100 0 0";
        let (name, seconds) = parse_stat(line).unwrap();
        assert_eq!(name, "rdk:broker (1)");
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        assert!((seconds - 300.0 / ticks).abs() < 1e-9, "{seconds}");
        assert_eq!(thread_group(&name), "kafka clients (pipeline and bench)");
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.5), 50.0);
        assert_eq!(percentile(&values, 0.99), 99.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
