//! What a background trainer costs inference, measured side by side in one run. Each round measures the
//! model-only inference rate (batch 8, decoded inputs, the inference thread's default thread count)
//! three ways, for the same wall time each:
//!
//! - alone;
//! - with the trainer as the service runs it: its own thread, one libtorch thread, lowest CPU priority;
//! - with an unprotected trainer: as many libtorch threads as inference, normal priority;
//!
//! and reports the trainer's steps per minute in each case. Medians over rounds.
//!
//!     cargo bench --bench retrain                              # 128 px, 3 rounds of 3 × 20 s
//!     cargo bench --bench retrain -- --side 256 --seconds 30 --rounds 5
//!
//! The model has the real architecture and size (DFSC preset, 384 channels) with untrained weights.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::{arg, median};
use lineguard::model::config::{Preset, Recipe};
use lineguard::model::train::Trainer;
use lineguard::model::{EfficientAd, MapQuantiles};
use tch::{Device, Tensor};

/// Inference frames per second over `duration`.
fn infer_for(model: &EfficientAd, batch: &Tensor, duration: Duration) -> f64 {
    let side = model.recipe.image_size;
    let started = Instant::now();
    let mut frames = 0;
    while started.elapsed() < duration {
        let maps = model.anomaly_maps(batch, side, side).expect("calibrated");
        let _ = maps.max().double_value(&[]);
        frames += batch.size()[0];
    }
    frames as f64 / started.elapsed().as_secs_f64()
}

#[derive(Clone, Copy)]
enum TrainerMode {
    Protected,
    Unprotected(usize),
}

/// Runs a trainer thread until `stop`; counts its steps.
fn spawn_trainer(
    model_bytes: Arc<Vec<u8>>,
    images: Tensor,
    mode: TrainerMode,
    stop: Arc<AtomicBool>,
    steps: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        match mode {
            TrainerMode::Protected => {
                lineguard::torch::use_threads(1);
                lineguard::torch::lower_thread_priority();
            }
            TrainerMode::Unprotected(threads) => lineguard::torch::use_threads(threads),
        }
        let model = EfficientAd::from_bytes(&model_bytes, std::path::Path::new("<bench>"), Device::Cpu).expect("model");
        let mut trainer = Trainer::continue_from(model, images).expect("trainer");
        trainer.model.recipe.train.warmup_beta2 = None;
        trainer.model.recipe.train.steps = u64::MAX;
        while !stop.load(Ordering::Relaxed) {
            trainer.step().expect("step");
            steps.fetch_add(1, Ordering::Relaxed);
        }
    })
}

fn main() {
    lineguard::torch::init();
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = arg(&args, "--rounds", 3);
    let seconds: f64 = arg(&args, "--seconds", 20.0);
    let side: i64 = arg(&args, "--side", 128);
    let duration = Duration::from_secs_f64(seconds);

    let mut model =
        EfficientAd::new(Recipe { image_size: side, ..Recipe::preset(Preset::Dfsc) }, Device::Cpu).expect("model");
    model.map_quantiles = Some(MapQuantiles { student_teacher: (0.0, 1.0), autoencoder: (0.0, 1.0) });
    let model_bytes = Arc::new(model.to_bytes().expect("model bytes"));
    tch::manual_seed(5);
    let batch = Tensor::randn([8, 3, side, side], (tch::Kind::Float, Device::Cpu));
    let training_images = Tensor::randn([16, 3, side, side], (tch::Kind::Float, Device::Cpu));
    let inference_threads = tch::get_num_threads().max(1) as usize;
    println!(
        "CPU, inference with {inference_threads} libtorch threads; {side} px; batch 8; {rounds} rounds of 3 × {seconds} s; medians"
    );

    let mut alone = Vec::new();
    let mut protected = Vec::new();
    let mut unprotected = Vec::new();
    let mut protected_steps = Vec::new();
    let mut unprotected_steps = Vec::new();
    for round in 0..rounds {
        alone.push(infer_for(&model, &batch, duration));
        for (mode, fps, steps_per_minute) in [
            (TrainerMode::Protected, &mut protected, &mut protected_steps),
            (TrainerMode::Unprotected(inference_threads), &mut unprotected, &mut unprotected_steps),
        ] {
            let stop = Arc::new(AtomicBool::new(false));
            let steps = Arc::new(AtomicU64::new(0));
            let trainer =
                spawn_trainer(model_bytes.clone(), training_images.shallow_clone(), mode, stop.clone(), steps.clone());
            // Let the trainer build its networks before the clock starts.
            while steps.load(Ordering::Relaxed) == 0 {
                std::thread::sleep(Duration::from_millis(50));
            }
            let first = steps.load(Ordering::Relaxed);
            let started = Instant::now();
            fps.push(infer_for(&model, &batch, duration));
            let taken = steps.load(Ordering::Relaxed) - first;
            steps_per_minute.push(taken as f64 * 60.0 / started.elapsed().as_secs_f64());
            stop.store(true, Ordering::Relaxed);
            let _ = trainer.join();
        }
        println!(
            "round {round}: inference alone {:.2} fps | with protected trainer {:.2} fps ({:.1} steps/min) | with \
             unprotected trainer {:.2} fps ({:.1} steps/min)",
            alone[round], protected[round], protected_steps[round], unprotected[round], unprotected_steps[round]
        );
    }
    let base = median(&alone);
    println!();
    println!("| inference (batch 8) | frames/s | vs alone | trainer steps/min |");
    println!("|---|---|---|---|");
    println!("| alone | {base:.2} | 1.00 | - |");
    println!(
        "| with the trainer as the service runs it (1 thread, nice 19) | {:.2} | {:.2} | {:.1} |",
        median(&protected),
        median(&protected) / base,
        median(&protected_steps)
    );
    println!(
        "| with an unprotected trainer ({inference_threads} threads, normal priority) | {:.2} | {:.2} | {:.1} |",
        median(&unprotected),
        median(&unprotected) / base,
        median(&unprotected_steps)
    );
}
