//! Inference on a spawned thread (as the service's inference stage runs) with and without a libgomp team
//! on the main thread: what `torch::make_parallelism_opt_in` is for. Each case runs in its own process
//! (a team, once made, lives as long as its thread), the cases alternate over rounds, medians per call.
//!
//!     cargo bench --bench threads                       # f32, batch 1, 128 px, the real 384 channels
//!     cargo bench --bench threads -- --precision bf16 --batch 8 --rounds 5 --calls 15
//!
//! Cases:
//! - `main-team`: the main thread builds the model with libtorch's default threads (a team of workers
//!   that then sits idle), the spawned thread scores;
//! - `opt-in`: parallelism opt-in first, so the main thread has no team; the spawned thread opts in;
//! - `main-thread`: the main thread scores (the old model-only measurement);
//! - `two-workers`: opt-in, then two spawned threads of one libtorch thread each score side by side, each
//!   with its own copy of the model (`inference_workers = 2`); time per image = the slower one's time /
//!   all calls, so it compares with the others' time per call at batch 1;
//! - `two-lines`: as `two-workers`, but each thread takes all the CPU threads, as two lines of one
//!   process each sized their inference alone (before the threads were shared out across lines): two
//!   OpenMP teams, twice as many threads as cores;
//! - `half-threads`: opt-in, one spawned thread scores with half the CPU threads: a line whose threads
//!   were shared with another line of the process that has nothing to score.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

mod common;

use common::{arg, median};
use lineguard::model::config::{Preset, Recipe};
use lineguard::model::{EfficientAd, MapQuantiles, Precision};
use tch::{Device, Kind, Tensor};

const CASES: [&str; 6] = ["main-team", "opt-in", "main-thread", "two-workers", "two-lines", "half-threads"];
const CHILD: &str = "LINEGUARD_BENCH_THREADS_CASE";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = arg(&args, "--rounds", 3);
    match std::env::var(CHILD) {
        Ok(case) => println!("{}", run_case(&case, &args)),
        Err(_) => {
            let mut times: Vec<Vec<f64>> = vec![Vec::new(); CASES.len()];
            for round in 0..rounds {
                for (case, time) in CASES.iter().zip(&mut times) {
                    let output = Command::new(std::env::current_exe().expect("own path"))
                        .args(&args[1..])
                        .env(CHILD, case)
                        .output()
                        .expect("the bench can run itself");
                    assert!(output.status.success(), "{case}: {}", String::from_utf8_lossy(&output.stderr));
                    let ms: f64 = String::from_utf8_lossy(&output.stdout).trim().parse().expect("a time");
                    println!("round {round}: {case:<12} {ms:7.1} ms per call");
                    time.push(ms);
                }
            }
            let reference = median(&times[2]);
            println!("\nmedians over {rounds} rounds (ratio to the main thread):");
            for (case, time) in CASES.iter().zip(&times) {
                println!("  {case:<12} {:7.1} ms  {:.2}", median(time), median(time) / reference);
            }
        }
    }
}

/// Median milliseconds per call of `--calls` calls (after two warm-up calls) in one case.
fn run_case(case: &str, args: &[String]) -> f64 {
    let side: i64 = arg(args, "--side", 128);
    let batch: i64 = arg(args, "--batch", 1);
    let calls: usize = arg(args, "--calls", 15);
    let precision: String = arg(args, "--precision", "f32".to_string());
    let precision = <Precision as clap::ValueEnum>::from_str(&precision, true).expect("--precision f32|bf16|f16");
    if case != "main-team" && case != "main-thread" {
        lineguard::torch::make_parallelism_opt_in();
    }
    let recipe = Recipe { image_size: side, ..Recipe::preset(Preset::Dfsc) };
    let mut model = EfficientAd::new(recipe, Device::Cpu).expect("a model");
    model.map_quantiles = Some(MapQuantiles { student_teacher: (0.0, 1.0), autoencoder: (0.0, 1.0) });
    let score = move |model: &EfficientAd| {
        // Channels-last input, as the inference stage normalises frames from bytes.
        let images = Tensor::rand([batch, side, side, 3], (Kind::Float, Device::Cpu)).permute([0, 3, 1, 2]);
        let mut times = Vec::new();
        for call in 0..calls + 2 {
            let started = Instant::now();
            let _ = model.anomaly_maps(&images, side, side).expect("maps").to_device(Device::Cpu);
            if call >= 2 {
                times.push(started.elapsed().as_secs_f64() * 1e3);
            }
        }
        median(&times)
    };
    if case == "main-thread" {
        return score(&model.with_precision(precision));
    }
    let bytes = model.to_bytes().expect("model bytes");
    if case == "two-workers" || case == "two-lines" {
        let threads = if case == "two-lines" { lineguard::torch::parallel_threads() } else { 1 };
        // Both workers start timing together, after their warm-up; the slower one sets the rate.
        let start_line = std::sync::Arc::new(std::sync::Barrier::new(2));
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let bytes = bytes.clone();
                let start_line = start_line.clone();
                std::thread::spawn(move || {
                    lineguard::torch::use_threads(threads);
                    let model = EfficientAd::from_bytes(&bytes, Path::new("<bench>"), Device::Cpu).expect("a model");
                    let model = model.with_precision(precision);
                    let images = Tensor::rand([batch, side, side, 3], (Kind::Float, Device::Cpu)).permute([0, 3, 1, 2]);
                    let _ = model.anomaly_maps(&images, side, side).expect("maps");
                    start_line.wait();
                    let started = Instant::now();
                    for _ in 0..calls {
                        let _ = model.anomaly_maps(&images, side, side).expect("maps").to_device(Device::Cpu);
                    }
                    started.elapsed().as_secs_f64() * 1e3
                })
            })
            .collect();
        let slowest = workers.into_iter().map(|w| w.join().expect("worker")).fold(0.0, f64::max);
        return slowest / (2 * calls) as f64;
    }
    let threads = lineguard::torch::parallel_threads();
    let threads = if case == "half-threads" { (threads / 2).max(1) } else { threads };
    std::thread::spawn(move || {
        lineguard::torch::use_threads(threads);
        let model = EfficientAd::from_bytes(&bytes, Path::new("<bench>"), Device::Cpu).expect("a model");
        score(&model.with_precision(precision))
    })
    .join()
    .expect("the scoring thread")
}
