//! `lineguard model list | rollback`: the versions a line's trainer keeps, and going back to one;
//! `lineguard model compact`: a half-size copy of a model file, checked on images;
//! `lineguard model show`: what a model file says about itself.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use lineguard::service::retrain::gate::GateReport;
use lineguard::service::retrain::store::VersionStore;
use lineguard::service::settings::{RetrainSettings, Settings};

use lineguard::data::loco::LocoDataset;
use lineguard::error::WeightsError;
use lineguard::model::EfficientAd;

use super::cli::{CompactArgs, ModelAction, ModelArgs, ModelLineArgs, ShowArgs};

pub fn run(args: &ModelArgs) -> anyhow::Result<ExitCode> {
    match &args.action {
        ModelAction::List(target) => list(target),
        ModelAction::Compact(compact_args) => compact(compact_args),
        ModelAction::Show(show_args) => show(show_args),
        ModelAction::Rollback(rollback) => {
            let (settings, retrain, store) = open(&rollback.target)?;
            let line = &rollback.target.line;
            let current = store.current()?.context("no current version recorded yet: the trainer has not started")?;
            let kept: Vec<u64> = store.versions()?.iter().map(|r| r.version).collect();
            let target =
                match rollback.to {
                    Some(version) => version,
                    None => kept.iter().rev().copied().find(|v| *v < current).with_context(|| {
                        format!("no kept version older than the current {current} (kept: {kept:?})")
                    })?,
                };
            anyhow::ensure!(kept.contains(&target), "version {target} is not kept (kept: {kept:?})");
            anyhow::ensure!(target != current, "version {target} is already current");
            let path = store.model_path(target);
            let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            store.set_current(target)?;
            let producer = super::produce::producer(&settings.kafka)?;
            let runtime = super::runtime()?;
            let manifest = runtime
                .block_on(lineguard::service::retrain::models_topic::publish(
                    &producer,
                    &retrain.models_topic,
                    line,
                    &bytes,
                    target,
                    "rollback",
                    retrain.signing_key.as_ref(),
                ))
                .with_context(|| format!("publishing version {target} on {}", retrain.models_topic))?;
            println!(
                "line {line}: version {target} is current again (was {current}); published on {} as {}. Every \
                 replica swaps it in at its next batch; the trainer continues from it.",
                retrain.models_topic, manifest.publication
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn open(target: &ModelLineArgs) -> anyhow::Result<(Settings, RetrainSettings, VersionStore)> {
    let settings = Settings::load(&target.pipeline)?;
    let line = settings
        .lines
        .get(&target.line)
        .with_context(|| format!("{} has no line {:?}", target.pipeline.display(), target.line))?;
    let retrain = line
        .retrain
        .clone()
        .with_context(|| format!("line {} does not retrain (no [lines.{}.retrain] table)", target.line, target.line))?;
    let store = VersionStore::open(&retrain.line_dir(&target.line), retrain.keep_versions)?;
    Ok((settings, retrain, store))
}

fn list(target: &ModelLineArgs) -> anyhow::Result<ExitCode> {
    let (_, retrain, store) = open(target)?;
    let current = store.current()?;
    let versions = store.versions()?;
    if versions.is_empty() {
        println!("line {}: no versions in {} yet", target.line, retrain.line_dir(&target.line).display());
        return Ok(ExitCode::SUCCESS);
    }
    println!("line {} ({}):", target.line, retrain.line_dir(&target.line).display());
    for record in &versions {
        let marker = if Some(record.version) == current { "*" } else { " " };
        let gate = record.gate.as_ref().map(GateReport::summary).unwrap_or_default();
        println!(
            "{marker} v{:<4} {:<9} {:>7} steps  parent {:<6} {gate}",
            record.version,
            record.origin,
            record.trained_steps,
            record.parent.map_or("-".into(), |p| format!("v{p}")),
        );
    }
    let log = retrain.line_dir(&target.line).join("gate-log.jsonl");
    if let Ok(text) = std::fs::read_to_string(&log) {
        let decisions: Vec<GateReport> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        println!("\nlatest gate decisions ({} in all, {}):", decisions.len(), log.display());
        for report in decisions.iter().rev().take(5).rev() {
            println!("  {}", report.summary());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes the f16 copy next to its destination, scores every check image with both files, and moves it
/// into place only when no score moved by more than the tolerance.
fn compact(args: &CompactArgs) -> anyhow::Result<ExitCode> {
    let device = lineguard::torch::select_device(args.cpu);
    let original = lineguard::model::EfficientAd::load(&args.model, device)?;
    let images = super::predict::expand(&args.check)?;
    anyhow::ensure!(!images.is_empty(), "no check images");
    let file_name = args.out.file_name().with_context(|| format!("{} names no file", args.out.display()))?;
    let staged = args.out.with_file_name(format!(".{}.checking", file_name.to_string_lossy()));
    original.save_f16(&staged)?;
    let checked = (|| -> anyhow::Result<f32> {
        let compacted = lineguard::model::EfficientAd::load(&staged, device)?;
        let mut largest = 0f32;
        for path in &images {
            let before = lineguard::eval::score_image(&original, path)?.score;
            let after = lineguard::eval::score_image(&compacted, path)?.score;
            largest = largest.max((before - after).abs());
        }
        Ok(largest)
    })();
    let largest = match checked {
        Ok(largest) if largest <= args.tolerance => largest,
        other => {
            let _ = std::fs::remove_file(&staged);
            let largest = other?;
            anyhow::bail!(
                "in f16 a score moved by {largest:.2e} on the {} check images, more than the tolerance {:.0e}; \
                 {} not written",
                images.len(),
                args.tolerance,
                args.out.display()
            );
        }
    };
    std::fs::rename(&staged, &args.out).with_context(|| format!("moving the copy to {}", args.out.display()))?;
    let size = |path: &std::path::Path| std::fs::metadata(path).map(|m| m.len() as f64 / 1e6).unwrap_or(0.0);
    println!(
        "{}: {:.1} MB (f16 weights; was {:.1} MB); largest score difference on {} images: {largest:.2e} (tolerance \
         {:.0e})",
        args.out.display(),
        size(&args.out),
        size(&args.model),
        images.len(),
        args.tolerance
    );
    Ok(ExitCode::SUCCESS)
}

/// Prints the model file's own account of itself; with `--data`, exit status 1 unless it records that it
/// was trained on exactly that dataset's training and validation images.
fn show(args: &ShowArgs) -> anyhow::Result<ExitCode> {
    let path = &args.model;
    // One read and one decoding: the model from the bytes, the storage note from their header alone.
    let bytes = std::fs::read(path).map_err(|source| WeightsError::Read { path: path.clone(), source })?;
    let model = EfficientAd::from_bytes(&bytes, path, tch::Device::Cpu)?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("reading the header of {}", path.display()))?;
    let storage = header.metadata().as_ref().and_then(|m| m.get("weights_storage")).cloned();
    let storage = storage.unwrap_or_else(|| "f32".into());
    let file_bytes = bytes.len() as u64;
    let data_check = match &args.data {
        Some(folder) => {
            let dataset = LocoDataset::open(folder)?;
            Some(
                dataset
                    .training_fingerprint()
                    .with_context(|| format!("reading the images of {}", folder.display()))?,
            )
        }
        None => None,
    };
    let matches = data_check.as_ref().map(|images| model.info.trained_on.as_ref() == Some(images));
    // Written, not printed: `lineguard model show … | head` ends quietly (see main's broken-pipe check).
    let mut out = std::io::stdout().lock();
    if args.json {
        let mut report = serde_json::json!({
            "recipe": model.recipe,
            "info": model.info,
            "map_quantiles": model.map_quantiles,
            "weights_storage": storage,
            "file_bytes": file_bytes,
        });
        if let Some(matches) = matches {
            report["trained_on_data"] = matches.into();
        }
        writeln!(out, "{report}")?;
    } else {
        print_model(&mut out, path, &model, &storage, file_bytes)?;
        if let (Some(folder), Some(images), Some(matches)) = (&args.data, &data_check, matches) {
            match (matches, &model.info.trained_on) {
                (true, _) => writeln!(out, "trained on the images of {}: yes", folder.display()),
                (false, None) => writeln!(
                    out,
                    "trained on the images of {}: unknown, the file does not record its training images",
                    folder.display()
                ),
                (false, Some(_)) => writeln!(
                    out,
                    "trained on the images of {}: no (there: {} train / {} validation images, sha256 {})",
                    folder.display(),
                    images.train,
                    images.validation,
                    images.sha256
                ),
            }?;
        }
    }
    Ok(if matches == Some(false) { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

fn print_model(
    out: &mut impl Write,
    path: &std::path::Path,
    model: &EfficientAd,
    storage: &str,
    file_bytes: u64,
) -> std::io::Result<()> {
    let (recipe, info) = (&model.recipe, &model.info);
    writeln!(out, "{} ({:.1} MB, weights stored in {storage})", path.display(), file_bytes as f64 / 1e6)?;
    writeln!(
        out,
        "  network     {} preset, {} px, {} teacher channels, {:?} autoencoder",
        recipe.preset, recipe.image_size, recipe.channels, recipe.autoencoder
    )?;
    let teacher = recipe.teacher.as_ref().map_or_else(
        || format!("random, from seed {} (no distilled teacher)", recipe.train.seed),
        |teacher| teacher.display().to_string(),
    );
    writeln!(out, "  teacher     {teacher}")?;
    writeln!(
        out,
        "  trained     {} steps, learning rate {:.0e}, {} (version {}, lineguard {}, {})",
        info.trained_steps,
        recipe.train.learning_rate,
        recipe.train.precision,
        info.model_version,
        info.lineguard_version,
        jiff::Timestamp::from_second(info.created_unix as i64).map_or_else(
            |_| format!("created at Unix time {}", info.created_unix),
            |t| t.strftime("%Y-%m-%d %H:%M UTC").to_string()
        )
    )?;
    match (&info.dfsc_activity, recipe.dfsc.enabled) {
        (_, false) => writeln!(out, "  DFSC        off"),
        (None, true) => writeln!(out, "  DFSC        margin {}, activity not recorded", recipe.dfsc.margin),
        (Some(activity), true) => writeln!(out, "  DFSC        margin {}; {}", recipe.dfsc.margin, activity.describe()),
    }?;
    match &info.trained_on {
        Some(images) => writeln!(
            out,
            "  images      {} train / {} validation, sha256 {}",
            images.train, images.validation, images.sha256
        ),
        None => {
            writeln!(
                out,
                "  images      not recorded (retrained on a stream, or written before lineguard recorded them)"
            )
        }
    }?;
    match &model.map_quantiles {
        Some(q) => writeln!(
            out,
            "  map scale   student-teacher {:.4}..{:.4}, autoencoder {:.4}..{:.4} (validation quantiles)",
            q.student_teacher.0, q.student_teacher.1, q.autoencoder.0, q.autoencoder.1
        ),
        None => writeln!(out, "  map scale   none (maps are not normalised)"),
    }
}
