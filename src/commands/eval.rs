use std::path::Path;

use anyhow::Context;
use lineguard::data::loco::LocoDataset;
use lineguard::eval::{self, EvalOptions, EvalReport};
use lineguard::model::EfficientAd;

use super::cli::EvalArgs;
use super::Progress;

pub fn run(args: &EvalArgs) -> anyhow::Result<EvalReport> {
    let device = lineguard::torch::select_device(args.cpu);
    let model = EfficientAd::load(&args.model, device)?;
    let options = EvalOptions { saturation_scale: args.saturation_scale, ..EvalOptions::default() };
    let report = evaluate(&model, &args.data, &options, args.heatmaps.as_deref())?;
    if args.json {
        // The model's provenance (steps, version, the DFSC term's activity) travels with its scores.
        #[derive(serde::Serialize)]
        struct WithModel<'a> {
            #[serde(flatten)]
            report: &'a EvalReport,
            model: &'a lineguard::model::ModelInfo,
        }
        println!("{}", serde_json::to_string(&WithModel { report: &report, model: &model.info })?);
    } else {
        print_table(&report);
    }
    Ok(report)
}

pub fn evaluate(
    model: &EfficientAd,
    data: &Path,
    options: &EvalOptions,
    heatmaps: Option<&Path>,
) -> anyhow::Result<EvalReport> {
    let dataset = LocoDataset::open_test(data)?;
    let total = dataset.test_good.len() + dataset.test_logical.len() + dataset.test_structural.len();
    let mut progress = Progress::new(total as u64, "eval");
    if let Some(dir) = heatmaps {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let range = model.display_range();
    let mut write_error = None;
    let report = eval::evaluate(model, &dataset, options, &mut |path, split, scored| {
        progress.inc();
        if let (Some(dir), None) = (heatmaps, &write_error) {
            let name = format!(
                "{}_{}.png",
                split.folder().replace('/', "_"),
                path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
            );
            let picture = lineguard::eval::heatmap::side_by_side(&scored.image, &scored.map, range);
            if let Err(e) = picture.save(dir.join(&name)) {
                write_error = Some(anyhow::anyhow!("writing heatmap {}: {e}", dir.join(name).display()));
            }
        }
    });
    progress.finish();
    if let Some(err) = write_error {
        return Err(err);
    }
    report.with_context(|| format!("evaluating on {}", data.display()))
}

pub fn print_table(report: &EvalReport) {
    let cell = |v: Option<f64>| v.map(|v| format!("{:>8.1}", 100.0 * v)).unwrap_or_else(|| format!("{:>8}", "-"));
    println!("{:<12} {:>8} {:>8} {:>8}", "metric (%)", "logical", "struct.", "mean");
    for (name, v) in [("image AUROC", report.image_auroc), ("AU-sPRO@5%", report.au_spro)] {
        println!("{:<12} {} {} {}", name, cell(v.logical), cell(v.structural), cell(v.mean));
    }
    println!(
        "test images: {} good, {} logical, {} structural",
        report.images.good, report.images.logical, report.images.structural
    );
}
