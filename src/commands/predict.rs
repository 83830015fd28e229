use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use lineguard::data::loco;
use lineguard::eval::score_image;
use lineguard::model::EfficientAd;
use serde::Serialize;

use super::cli::PredictArgs;

#[derive(Serialize)]
struct Prediction<'a> {
    path: &'a std::path::Path,
    score: f32,
    anomalous: Option<bool>,
    heatmap: &'a std::path::Path,
    model_version: u64,
}

/// Scores every input; an unreadable image is reported and makes the exit code 1, the others still run.
pub fn run(args: &PredictArgs) -> anyhow::Result<ExitCode> {
    let device = lineguard::torch::select_device(args.cpu);
    let model = EfficientAd::load(&args.model, device)?;
    let inputs = expand(&args.inputs)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let range = model.display_range();
    let mut stdout = std::io::stdout().lock();
    if !args.json {
        writeln!(stdout, "{:>8}  {:<8}  {:<40}  heatmap", "score", "verdict", "image")?;
    }
    let mut failures = 0;
    for (index, path) in inputs.iter().enumerate() {
        let scored = match score_image(&model, path) {
            Ok(scored) => scored,
            Err(err) => {
                eprintln!("error: {err}");
                failures += 1;
                continue;
            }
        };
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        // The index keeps pictures of same-named files from different folders apart.
        let heatmap = args.out.join(format!("{index:04}_{stem}.png"));
        lineguard::eval::heatmap::side_by_side(&scored.image, &scored.map, range)
            .save(&heatmap)
            .with_context(|| format!("writing {}", heatmap.display()))?;
        let anomalous = args.threshold.map(|t| scored.score > t);
        if args.json {
            let line = Prediction {
                path,
                score: scored.score,
                anomalous,
                heatmap: &heatmap,
                model_version: model.info.model_version,
            };
            writeln!(stdout, "{}", serde_json::to_string(&line)?)?;
        } else {
            let verdict = match anomalous {
                Some(true) => "ANOMALY",
                Some(false) => "ok",
                None => "-",
            };
            writeln!(stdout, "{:>8.4}  {:<8}  {:<40}  {}", scored.score, verdict, path.display(), heatmap.display())?;
        }
    }
    Ok(if failures > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

/// Files as given, folders expanded to their images (sorted).
pub fn expand(inputs: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let found = loco::list_images(input)?;
            if found.is_empty() {
                anyhow::bail!("folder {} holds no images (.png, .jpg, .jpeg)", input.display());
            }
            out.extend(found);
        } else if input.exists() {
            out.push(input.clone());
        } else {
            anyhow::bail!("{} does not exist", input.display());
        }
    }
    Ok(out)
}
