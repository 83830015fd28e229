//! Model-core speed: training step and inference latency/throughput, measured side by side in one run
//! (rounds interleave the variants, so a noisy neighbour slows all of them alike) and reported as medians.
//!
//!     cargo bench --bench model                # CPU, 128 and 256 px
//!     cargo bench --bench model -- --rounds 9  # more rounds
//!     cargo bench --bench model -- --cuda      # on a GPU host

use std::time::Instant;

mod common;

use common::median;

use lineguard::model::config::{Preset, Recipe};
use lineguard::model::train::Trainer;
use lineguard::model::{EfficientAd, MapQuantiles, Precision};
use tch::{Device, Kind, Tensor};

struct Case {
    name: String,
    samples_ms: Vec<f64>,
    per: f64,
    run: Box<dyn FnMut()>,
}

fn trainer(preset: Preset, side: i64, device: Device) -> Trainer {
    let mut recipe = Recipe::preset(preset);
    recipe.image_size = side;
    recipe.train.steps = u64::MAX;
    let images = Tensor::randn([8, 3, side, side], (Kind::Float, Device::Cpu));
    Trainer::new(recipe, images, device).expect("trainer builds")
}

fn model(side: i64, device: Device) -> EfficientAd {
    let recipe = Recipe { image_size: side, ..Recipe::preset(Preset::Dfsc) };
    let mut model = EfficientAd::new(recipe, device).expect("model builds");
    model.map_quantiles = Some(MapQuantiles { student_teacher: (0.0, 1.0), autoencoder: (0.0, 1.0) });
    model
}

fn main() {
    lineguard::torch::init();
    let args: Vec<String> = std::env::args().collect();
    let rounds = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let device = if args.iter().any(|a| a == "--cuda") { lineguard::torch::select_device(false) } else { Device::Cpu };
    println!("device: {}, {rounds} rounds, medians", lineguard::torch::describe(device));
    if device.is_cuda() {
        // cuDNN's heuristics for every case but the one that measures the autotuner.
        tch::Cuda::cudnn_set_benchmark(false);
    }

    let mut cases: Vec<Case> = Vec::new();
    for side in [128_i64, 256] {
        let variants = [
            (Preset::Dfsc, false, Precision::F32),
            (Preset::Dfsc, true, Precision::F32),
            (Preset::Dfsc, true, Precision::Bf16),
            (Preset::EfficientadS, false, Precision::F32),
        ];
        for (preset, channels_last, precision) in variants {
            let mut t = trainer(preset, side, device);
            t.channels_last = channels_last;
            t.model.recipe.train.precision = precision;
            let order = if channels_last { ", channels-last" } else { "" };
            let precision = if precision == Precision::F32 { String::new() } else { format!(", {precision}") };
            cases.push(Case {
                name: format!("train step {preset} {side}px (batch 1{order}{precision})"),
                samples_ms: Vec::new(),
                per: 1.0,
                run: Box::new(move || {
                    t.step().expect("step");
                }),
            });
        }
        // The same DFSC step with its losses read in groups, as `train` does: on a GPU the host queues the
        // next steps instead of waiting for each (on a CPU every kernel is synchronous anyway).
        let group = if device.is_cuda() { 25 } else { 3 };
        let mut t = trainer(Preset::Dfsc, side, device);
        cases.push(Case {
            name: format!("train step dfsc {side}px (batch 1, read every {group})"),
            samples_ms: Vec::new(),
            per: group as f64,
            run: Box::new(move || {
                let pending: Vec<_> = (0..group).map(|_| t.step_deferred().expect("step")).collect();
                for p in pending {
                    t.read(p).expect("finite losses");
                }
            }),
        });
        if !device.is_cuda() {
            // GPUs use the fused AdamW update by default; CPUs keep the per-tensor one for its rounding
            // (`AdamW::fused`), at this cost.
            let mut t = trainer(Preset::Dfsc, side, device);
            t.set_fused_update(true);
            cases.push(Case {
                name: format!("train step dfsc {side}px (batch 1, fused AdamW)"),
                samples_ms: Vec::new(),
                per: 1.0,
                run: Box::new(move || {
                    t.step().expect("step");
                }),
            });
        }
        if device.is_cuda() {
            // cuDNN's autotuner picks each convolution's fastest algorithm for the shapes it sees; training
            // shapes never change, so the one-off search should pay. Switched on for this case only.
            let mut t = trainer(Preset::Dfsc, side, device);
            cases.push(Case {
                name: format!("train step dfsc {side}px (batch 1, cuDNN autotuned)"),
                samples_ms: Vec::new(),
                per: 1.0,
                run: Box::new(move || {
                    tch::Cuda::cudnn_set_benchmark(true);
                    t.step().expect("step");
                    tch::Cuda::cudnn_set_benchmark(false);
                }),
            });
        }
        for batch in [1_i64, 8] {
            let m = model(side, device);
            let x = Tensor::randn([batch, 3, side, side], (Kind::Float, device));
            cases.push(Case {
                name: format!("inference {side}px batch {batch} (per image)"),
                samples_ms: Vec::new(),
                per: batch as f64,
                run: Box::new(move || {
                    let maps = m.anomaly_maps(&x, side, side).expect("maps");
                    // Timed until the maps are back on the host, as the paper times EfficientAD.
                    let _ = maps.to_device(Device::Cpu);
                }),
            });
        }
    }
    for case in &mut cases {
        (case.run)(); // warm-up: allocator, kernels, first-touch
    }
    for round in 0..rounds {
        for case in &mut cases {
            let start = Instant::now();
            (case.run)();
            case.samples_ms.push(start.elapsed().as_secs_f64() * 1e3 / case.per);
        }
        eprintln!("round {}/{rounds} done", round + 1);
    }
    println!("{:<44} {:>12} {:>12}", "case", "median ms", "per second");
    for case in &cases {
        let m = median(&case.samples_ms);
        println!("{:<44} {:>12.1} {:>12.2}", case.name, m, 1e3 / m);
    }
    let find = |name: &str| cases.iter().find(|c| c.name == name).map(|c| median(&c.samples_ms));
    if let (Some(a), Some(b)) =
        (find("train step dfsc 256px (batch 1)"), find("train step efficientad_s 256px (batch 1)"))
    {
        println!("ratio train step dfsc / efficientad_s at 256 px: {:.2}", a / b);
    }
    for side in [128, 256] {
        let order = |suffix: &str| find(&format!("train step dfsc {side}px (batch 1{suffix})"));
        if let (Some(a), Some(b)) = (order(", channels-last"), order("")) {
            println!("ratio train step dfsc channels-last / channel-major at {side} px: {:.2}", a / b);
        }
        if let (Some(a), Some(b)) = (order(", channels-last, bf16"), order(", channels-last")) {
            println!("ratio train step dfsc bf16 / f32 (channels-last) at {side} px: {:.2}", a / b);
        }
        for variant in [", read every 25", ", read every 3", ", cuDNN autotuned", ", fused AdamW"] {
            if let (Some(a), Some(b)) = (order(variant), order("")) {
                println!("ratio train step dfsc{variant} / the plain step (read every step, per-tensor AdamW on CPUs) at {side} px: {:.2}", a / b);
            }
        }
    }
    if let (Some(a), Some(b)) =
        (find("inference 256px batch 1 (per image)"), find("inference 256px batch 8 (per image)"))
    {
        println!("ratio inference per image batch 1 / batch 8 at 256 px: {:.2}", a / b);
    }
}
