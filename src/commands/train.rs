use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use lineguard::data::loco::{self, LocoDataset};
use lineguard::model::activity::DfscActivity;
use lineguard::model::config::Recipe;
use lineguard::model::train::{StepLosses, Trainer};
use lineguard::model::EfficientAd;
use tch::{Device, Tensor};

use super::cli::{RecipeArgs, TrainArgs};
use super::{sibling, Progress, TimeBudget, Unread};

/// Recipe from file and preset, then the command-line overrides, validated as a whole.
pub fn recipe_from_args(args: &RecipeArgs) -> anyhow::Result<Recipe> {
    let mut recipe = Recipe::load(args.config.as_deref(), args.preset)?;
    if let Some(steps) = args.steps {
        recipe.train.steps = steps;
    }
    if let Some(size) = args.image_size {
        recipe.image_size = size;
    }
    if let Some(margin) = args.margin {
        recipe.dfsc.margin = margin;
    }
    if let Some(seed) = args.seed {
        recipe.train.seed = seed;
    }
    if let Some(precision) = args.precision {
        recipe.train.precision = precision;
    }
    if let Some(teacher) = &args.teacher {
        recipe.teacher = Some(teacher.clone());
    }
    recipe.validate()?;
    Ok(recipe)
}

pub fn run(args: &TrainArgs) -> anyhow::Result<EfficientAd> {
    let device = lineguard::torch::select_device(args.cpu);
    let recipe = recipe_from_args(&args.recipe)?;
    let resume = args.resume.as_deref().map(|checkpoint| Resume { checkpoint, steps: args.recipe.steps });
    train(&args.data, &args.out, recipe, resume, args.max_minutes, device)
}

/// Continue a checkpoint; its own recipe applies, except for a new total step count.
pub struct Resume<'a> {
    pub checkpoint: &'a Path,
    pub steps: Option<u64>,
}

/// Loads the data, trains (or resumes), checkpoints, calibrates and saves. Returns the trained model.
pub fn train(
    data: &Path,
    out: &Path,
    recipe: Recipe,
    resume: Option<Resume<'_>>,
    max_minutes: Option<f64>,
    device: Device,
) -> anyhow::Result<EfficientAd> {
    lineguard::torch::autotune_convolutions(device);
    let dataset = LocoDataset::open(data)?;
    let side = recipe.image_size as u32;
    log::info!(
        "training {} at {side} px on {} ({} train / {} validation images of {})",
        recipe.preset,
        lineguard::torch::describe(device),
        dataset.train.len(),
        dataset.validation.len(),
        data.display()
    );
    let train_images = load(&dataset.train, side, "loading train/good")?;
    let validation = load(&dataset.validation, side, "loading validation/good")?;

    let mut trainer = match resume {
        Some(Resume { checkpoint, steps }) => {
            let mut trainer = Trainer::resume(checkpoint, train_images, device)
                .with_context(|| format!("resuming from {}", checkpoint.display()))?;
            if let Some(steps) = steps {
                trainer.model.recipe.train.steps = steps;
            }
            log::info!("resumed {} at step {} of {}", checkpoint.display(), trainer.step, trainer.total_steps());
            trainer
        }
        None => Trainer::new(recipe, train_images, device)?,
    };
    let checkpoint = sibling(out, ".checkpoint.safetensors");
    let every = trainer.model.recipe.train.checkpoint_every;
    let total = trainer.total_steps();
    let mut progress = Progress::new(total, "train");
    let started = Instant::now();
    let first_step = trainer.step;
    let mut budget = TimeBudget::new(max_minutes, first_step);
    // Losses are read in groups (`Unread`): on a GPU a read per step would make the host wait for every
    // step's kernels instead of queueing the next ones. The progress line shows the latest reading.
    let mut unread = Unread::default();
    let mut dfsc_activity = None;
    while !trainer.is_done() {
        unread.push(trainer.step_deferred()?);
        if let Some(cut) = budget.as_mut().and_then(|b| b.after_step(trainer.step, trainer.total_steps())) {
            trainer.model.recipe.train.steps = cut;
            progress.set_length(cut);
        }
        let checkpoint_due = every > 0 && trainer.step % every == 0 && !trainer.is_done();
        if checkpoint_due || trainer.is_done() || unread.due() {
            for pending in unread.drain() {
                let losses = trainer.read(pending)?;
                dfsc_activity = losses.dfsc_activity.or(dfsc_activity);
                progress.set_position(trainer.step, &describe_losses(&losses, dfsc_activity.as_ref()));
            }
        }
        if checkpoint_due {
            trainer
                .save_checkpoint(&checkpoint)
                .with_context(|| format!("writing checkpoint {}", checkpoint.display()))?;
        }
    }
    progress.finish();
    let steps_run = trainer.step - first_step;
    let elapsed = started.elapsed().as_secs_f64();
    if steps_run > 0 {
        log::info!("{steps_run} steps in {elapsed:.1} s ({:.1} ms/step)", 1e3 * elapsed / steps_run as f64);
    }
    let mut model = trainer.finish(&validation, 1)?;
    model.info.trained_on = Some(dataset.training_fingerprint()?);
    if let Some(activity) = &model.info.dfsc_activity {
        log::info!("{}", activity.describe());
    }
    model.save(out).with_context(|| format!("writing model {}", out.display()))?;
    super::remove_finished_checkpoint(&checkpoint);
    log::info!("model written to {}", out.display());
    Ok(model)
}

pub(super) fn load(paths: &[PathBuf], side: u32, what: &str) -> anyhow::Result<Tensor> {
    let progress = std::sync::Mutex::new(Progress::new(paths.len() as u64, what));
    let images = loco::load_inputs(paths, side, &|| {
        if let Ok(mut p) = progress.lock() {
            p.inc();
        }
    })?;
    if let Ok(p) = progress.lock() {
        p.finish();
    }
    Ok(images)
}

fn describe_losses(l: &StepLosses, dfsc_activity: Option<&DfscActivity>) -> String {
    let mut text =
        format!("loss {:.4} (hard {:.4} ae {:.4} st-ae {:.4}", l.total, l.hard, l.autoencoder, l.student_autoencoder);
    if let Some(dfsc) = l.dfsc {
        text.push_str(&format!(" dfsc {dfsc:.3}"));
    }
    if let Some(activity) = dfsc_activity {
        text.push_str(&format!(
            " [dfsc active {:.0}%, grad {:.1e} vs ae {:.1e}]",
            100.0 * activity.active_share,
            activity.gradient_norm,
            activity.autoencoder_gradient_norm
        ));
    }
    if let Some(penalty) = l.penalty {
        text.push_str(&format!(" penalty {penalty:.4}"));
    }
    text.push_str(&format!(") lr {:.1e}", l.learning_rate));
    text
}
