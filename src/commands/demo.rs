//! The embedded default: everything on data the project makes itself, so it runs on a fresh machine.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;

use lineguard::eval::EvalOptions;
use lineguard::model::config::Recipe;
use lineguard::model::EfficientAd;
use lineguard::synth::SynthConfig;

use crate::cli::DemoArgs;

/// The demo's short CPU schedule, shared with the quality test; the file says why each value differs from
/// the paper's.
const QUICK_RECIPE: &str = include_str!("../../pipelines/recipes/quick.toml");

pub fn run(args: &DemoArgs) -> anyhow::Result<ExitCode> {
    let device = lineguard::torch::select_device(args.cpu);
    let mut recipe = Recipe::from_toml(QUICK_RECIPE, Path::new("pipelines/recipes/quick.toml"), Some(args.preset))?;
    recipe.image_size = args.image_size as i64;
    if let Some(steps) = args.steps {
        recipe.train.steps = steps;
    }
    recipe.validate()?;
    let data = args.workdir.join("data");
    let model_path =
        args.workdir.join(format!("model-{}-{}px-{}steps.safetensors", args.preset, args.image_size, recipe.train.steps));
    let heatmaps = args.workdir.join("heatmaps");

    let synth = SynthConfig { seed: 7, image_size: args.image_size, ..SynthConfig::default() };
    let marker = data.join("synth.json");
    let existing: Option<SynthConfig> =
        std::fs::read_to_string(&marker).ok().and_then(|text| serde_json::from_str(&text).ok());
    if existing.as_ref().map(|e| (e.seed, e.image_size)) == Some((synth.seed, synth.image_size)) {
        log::info!("step 1/3: reusing the synthetic line in {}", data.display());
    } else {
        log::info!("step 1/3: synthesising a production line (trays with 4 compartments) into {}", data.display());
        if data.exists() {
            std::fs::remove_dir_all(&data).with_context(|| format!("replacing {}", data.display()))?;
        }
        super::synth::generate(&synth, &data)?;
    }

    let model = if model_path.exists() && !args.retrain {
        log::info!("step 2/3: reusing the model {} (pass --retrain to train again)", model_path.display());
        EfficientAd::load(&model_path, device)?
    } else {
        log::info!("step 2/3: training a {} model for {} steps at {} px", args.preset, recipe.train.steps, args.image_size);
        super::train::train(&data, &model_path, recipe, None, device)?
    };

    log::info!("step 3/3: evaluating on the test trays and drawing heatmaps into {}", heatmaps.display());
    let report = super::eval::evaluate(&model, &data, &EvalOptions::default(), Some(&heatmaps))?;
    println!();
    super::eval::print_table(&report);
    println!();
    let mut by_split: Vec<_> = report.scores.iter().collect();
    by_split.sort_by(|a, b| b.score.total_cmp(&a.score));
    println!("most anomalous test trays:");
    for s in by_split.iter().take(5) {
        println!("  {:.4}  {:<22} {}", s.score, s.split, s.path.display());
    }
    println!();
    println!("model:    {}", model_path.display());
    println!("heatmaps: {}/ (original | overlay, yellow = anomalous)", heatmaps.display());
    println!("next:     lineguard predict --model {} <images or folders>", model_path.display());
    Ok(ExitCode::SUCCESS)
}
