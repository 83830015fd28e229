//! The training recipe: every knob of EfficientAD-S + DFSC, typed, with the paper's defaults.
//!
//! A recipe starts from a preset (`dfsc`, the paper's method, or `efficientad_s`, its baseline) and a TOML
//! file overrides any key, so an ablation is one flag. The recipe travels inside every model file, which
//! makes each model self-describing.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Precision;
use crate::error::ConfigError;

/// The two starting points of the paper's ablation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// EfficientAD-S as published: plain autoencoder, no DFSC, no EMA student, no sigmoid on the maps,
    /// EfficientAD's colour-jitter augmentation of the autoencoder input.
    #[value(name = "efficientad_s")]
    EfficientadS,
    /// All of the DFSC paper's changes: InstanceNorm autoencoder with a leading decoder ReLU, sigmoid on the
    /// normalised maps, the DFSC margin loss and an EMA student; no augmentation.
    Dfsc,
}

impl std::fmt::Display for Preset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Preset::EfficientadS => "efficientad_s",
            Preset::Dfsc => "dfsc",
        })
    }
}

/// Which autoencoder architecture to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AutoencoderVariant {
    /// EfficientAD's: ReLU after each conv, no normalisation.
    Plain,
    /// DFSC's: InstanceNorm before every activation and a ReLU at the start of the decoder.
    InstanceNorm,
}

/// Which pair of feature maps the DFSC margin keeps apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DfscPair {
    /// Normalised teacher output vs autoencoder output (the default reading of the paper).
    TeacherAutoencoder,
    /// Autoencoder output vs the student's autoencoder-mimicking channels.
    AutoencoderStudent,
}

/// How "distinctive features" are selected before the margin is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DfscSelection {
    /// Threshold each element of the squared difference (C×H×W), like the hard feature loss.
    Element,
    /// Threshold the channel mean of the squared difference and keep whole locations.
    Location,
}

/// Which difference map says where the "distinctive features" are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DfscSource {
    /// The squared difference of the pair itself. The margin is then applied where the pair is already
    /// furthest apart: the term stays small in value (~0.01), though its hinge still pushes at about 29%
    /// of the selected locations (BENCHMARKS.md, "Which reading of the DFSC loss?").
    Pair,
    /// The teacher–student squared difference that the hard feature loss thresholds: the features the
    /// student finds hardest to imitate, i.e. what the teacher says that is distinctive. The margin keeps
    /// the autoencoder from copying the teacher there, and it binds at nearly every selected location
    /// (the pair is not selected for being apart already).
    TeacherStudent,
}

/// Order of the two DFSC operations. The paper's text masks first, but masking first leaves one to three
/// channels per location whose normalised values are ±1 and carry no useful gradient, hence the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DfscOrder {
    NormaliseThenMask,
    MaskThenNormalise,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DfscConfig {
    pub enabled: bool,
    /// Weight of the margin loss in the total (α).
    pub alpha: f64,
    /// Minimum distance kept between unit feature vectors, 0..=2. Best per category in the paper (0.4 for
    /// juice_bottle, up to 2.0 for screw_bag).
    pub margin: f64,
    /// Quantile of the squared difference above which a feature counts as distinctive.
    pub quantile: f64,
    pub pair: DfscPair,
    pub source: DfscSource,
    pub selection: DfscSelection,
    pub order: DfscOrder,
}

impl Default for DfscConfig {
    fn default() -> Self {
        DfscConfig {
            enabled: true,
            alpha: 2.0,
            margin: 0.4,
            quantile: 0.999,
            pair: DfscPair::TeacherAutoencoder,
            source: DfscSource::Pair,
            selection: DfscSelection::Element,
            order: DfscOrder::NormaliseThenMask,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Optimiser steps (the paper: 70,000 at batch 1).
    pub steps: u64,
    pub batch_size: i64,
    pub learning_rate: f64,
    pub weight_decay: f64,
    /// β₂ of the untuned exponential warm-up (Ma & Yarats); None disables warm-up.
    pub warmup_beta2: Option<f64>,
    /// The learning rate is multiplied by `final_lr_factor` for the last `final_lr_fraction` of the steps.
    pub final_lr_fraction: f64,
    pub final_lr_factor: f64,
    /// Momentum of the EMA student used at inference; None serves the trained student directly.
    pub ema_momentum: Option<f64>,
    /// Quantile of the hard feature loss.
    pub hard_quantile: f64,
    /// EfficientAD's colour-jitter augmentation of the autoencoder branch input.
    pub augmentation: bool,
    /// Folder of natural images for EfficientAD's penalty mean(S_st(P)²); None disables it.
    pub imagenet_penalty_dir: Option<PathBuf>,
    /// Seed of weight init, data order and dropout: the same seed and data give the same model.
    pub seed: u64,
    /// Write a resumable checkpoint every this many steps (0 = only at the end).
    pub checkpoint_every: u64,
    /// The format the student's and autoencoder's convolutions compute in while training: `f32`, or
    /// `bf16` (mixed precision: weights, optimiser state, losses and the teacher's targets stay f32).
    /// `f16` is refused: it would need loss scaling.
    pub precision: Precision,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 70_000,
            batch_size: 1,
            learning_rate: 1e-4,
            weight_decay: 1e-5,
            warmup_beta2: Some(0.997),
            final_lr_fraction: 0.1,
            final_lr_factor: 0.1,
            ema_momentum: Some(0.99),
            hard_quantile: 0.999,
            augmentation: false,
            imagenet_penalty_dir: None,
            seed: 42,
            checkpoint_every: 1000,
            precision: Precision::F32,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MapConfig {
    /// Quantiles of the validation maps mapped to 0 and 0.1 (EfficientAD's normalisation).
    pub quantile_low: f64,
    pub quantile_high: f64,
    /// Pass each normalised map through a sigmoid before combining (DFSC), so that negative regions of
    /// one map cannot cancel positive regions of the other.
    pub sigmoid: bool,
    pub student_teacher_weight: f64,
    pub autoencoder_weight: f64,
}

impl Default for MapConfig {
    fn default() -> Self {
        MapConfig {
            quantile_low: 0.9,
            quantile_high: 0.995,
            sigmoid: true,
            student_teacher_weight: 0.5,
            autoencoder_weight: 0.5,
        }
    }
}

/// Largest input side a recipe may ask for (the paper: 256).
pub const MAX_IMAGE_SIZE: i64 = 1024;
/// Most teacher channels a recipe may ask for (EfficientAD-S: 384).
pub const MAX_CHANNELS: i64 = 1024;
/// Largest training batch a recipe may ask for (the paper: 1).
pub const MAX_BATCH_SIZE: i64 = 256;

/// Everything that defines how a model is built and trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Recipe {
    pub preset: Preset,
    /// Square input side in pixels: a multiple of 64, at least 128 (the paper: 256).
    pub image_size: i64,
    /// Teacher output channels (the student has twice as many).
    pub channels: i64,
    pub autoencoder: AutoencoderVariant,
    /// Pretrained teacher weights (safetensors). None: a randomly initialised teacher from `train.seed`,
    /// which works on simple data but is far weaker than a distilled one.
    pub teacher: Option<PathBuf>,
    pub train: TrainConfig,
    pub dfsc: DfscConfig,
    pub maps: MapConfig,
}

impl Default for Recipe {
    fn default() -> Self {
        Recipe::preset(Preset::Dfsc)
    }
}

impl Recipe {
    pub fn preset(preset: Preset) -> Recipe {
        let dfsc = Recipe {
            preset: Preset::Dfsc,
            image_size: 256,
            channels: 384,
            autoencoder: AutoencoderVariant::InstanceNorm,
            teacher: None,
            train: TrainConfig::default(),
            dfsc: DfscConfig::default(),
            maps: MapConfig::default(),
        };
        match preset {
            Preset::Dfsc => dfsc,
            Preset::EfficientadS => Recipe {
                preset,
                autoencoder: AutoencoderVariant::Plain,
                train: TrainConfig { ema_momentum: None, augmentation: true, ..dfsc.train },
                dfsc: DfscConfig { enabled: false, ..dfsc.dfsc },
                maps: MapConfig { sigmoid: false, ..dfsc.maps },
                ..dfsc
            },
        }
    }

    /// Layers: the preset (from `preset_override`, else the file's `preset` key, else `dfsc`), then the
    /// file. Unknown keys are errors, so a typo never silently trains the wrong model.
    pub fn load(file: Option<&Path>, preset_override: Option<Preset>) -> Result<Recipe, ConfigError> {
        match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
                Recipe::from_toml(&text, path, preset_override)
            }
            None => {
                let recipe = Recipe::preset(preset_override.unwrap_or(Preset::Dfsc));
                recipe.validate()?;
                Ok(recipe)
            }
        }
    }

    /// As [`Recipe::load`] for TOML text; `origin` names it in errors (embedded recipes have no file).
    pub fn from_toml(text: &str, origin: &Path, preset_override: Option<Preset>) -> Result<Recipe, ConfigError> {
        let parse_error = |source| ConfigError::Parse { path: origin.to_path_buf(), source };
        let table = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .map_err(parse_error)?;
        let file_preset = match table.get::<Preset>("preset") {
            Ok(preset) => Some(preset),
            Err(config::ConfigError::NotFound(_)) => None,
            Err(source) => return Err(parse_error(source)),
        };
        let preset = preset_override.or(file_preset).unwrap_or(Preset::Dfsc);
        let defaults = config::Config::try_from(&Recipe::preset(preset)).map_err(parse_error)?;
        let recipe: Recipe = config::Config::builder()
            .add_source(defaults)
            .add_source(table)
            .set_override("preset", preset.to_string())
            .and_then(|builder| builder.build())
            .and_then(|merged| merged.try_deserialize())
            .map_err(parse_error)?;
        recipe.validate()?;
        Ok(recipe)
    }

    /// Checks every key and reports all problems at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if self.image_size < 128 || self.image_size % 64 != 0 || self.image_size > MAX_IMAGE_SIZE {
            problems.push(format!(
                "image_size = {}: must be a multiple of 64 from 128 to {MAX_IMAGE_SIZE} (the autoencoder decodes \
                 from a 1x1 code through sides H/64-1 .. H/2-1)",
                self.image_size
            ));
        }
        // Upper bounds matter because model files carry their recipe: one crafted file must not make a
        // replica allocate without bound when it builds the networks.
        if self.channels <= 0 || self.channels > MAX_CHANNELS {
            problems.push(format!("channels = {}: must be from 1 to {MAX_CHANNELS}", self.channels));
        }
        let t = &self.train;
        if t.steps == 0 {
            problems.push("train.steps = 0: must be at least 1".into());
        }
        if t.precision == Precision::F16 {
            problems.push("train.precision = \"f16\": f16 training needs loss scaling; use \"bf16\" or \"f32\"".into());
        }
        if t.batch_size < 1 || t.batch_size > MAX_BATCH_SIZE {
            problems.push(format!("train.batch_size = {}: must be from 1 to {MAX_BATCH_SIZE}", t.batch_size));
        }
        if t.learning_rate.is_nan() || t.learning_rate <= 0.0 {
            problems.push(format!("train.learning_rate = {}: must be positive", t.learning_rate));
        }
        if t.weight_decay < 0.0 {
            problems.push(format!("train.weight_decay = {}: must not be negative", t.weight_decay));
        }
        if let Some(beta2) = t.warmup_beta2 {
            if !(0.0..1.0).contains(&beta2) {
                problems.push(format!("train.warmup_beta2 = {beta2}: must be in [0, 1)"));
            }
        }
        if !(0.0..=1.0).contains(&t.final_lr_fraction) {
            problems.push(format!("train.final_lr_fraction = {}: must be in [0, 1]", t.final_lr_fraction));
        }
        if let Some(m) = t.ema_momentum {
            if !(0.0..1.0).contains(&m) {
                problems.push(format!("train.ema_momentum = {m}: must be in [0, 1)"));
            }
        }
        for (key, q) in [
            ("train.hard_quantile", t.hard_quantile),
            ("dfsc.quantile", self.dfsc.quantile),
            ("maps.quantile_low", self.maps.quantile_low),
            ("maps.quantile_high", self.maps.quantile_high),
        ] {
            if !(0.0..=1.0).contains(&q) {
                problems.push(format!("{key} = {q}: a quantile must be in [0, 1]"));
            }
        }
        if self.maps.quantile_low >= self.maps.quantile_high {
            problems.push(format!(
                "maps.quantile_low = {} must be below maps.quantile_high = {}",
                self.maps.quantile_low, self.maps.quantile_high
            ));
        }
        if !(0.0..=2.0).contains(&self.dfsc.margin) {
            problems.push(format!(
                "dfsc.margin = {}: must be in [0, 2] (a distance between unit vectors)",
                self.dfsc.margin
            ));
        }
        if self.dfsc.alpha < 0.0 {
            problems.push(format!("dfsc.alpha = {}: must not be negative", self.dfsc.alpha));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid { problems })
        }
    }

    /// Side of the student/teacher feature maps for this image size (56 at 256).
    pub fn feature_side(&self) -> i64 {
        pdn_output_side(self.image_size)
    }
}

/// Output side of the padding-free PDN: conv4 → pool2 → conv4 → pool2 → conv3 → conv4.
pub fn pdn_output_side(image_side: i64) -> i64 {
    let side = (image_side - 3) / 2;
    let side = (side - 3) / 2;
    side - 2 - 3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_differ_only_in_the_papers_changes() {
        let dfsc = Recipe::preset(Preset::Dfsc);
        let base = Recipe::preset(Preset::EfficientadS);
        assert_eq!(dfsc.autoencoder, AutoencoderVariant::InstanceNorm);
        assert_eq!(base.autoencoder, AutoencoderVariant::Plain);
        assert!(dfsc.dfsc.enabled && !base.dfsc.enabled);
        assert_eq!(dfsc.train.ema_momentum, Some(0.99));
        assert_eq!(base.train.ema_momentum, None);
        assert!(dfsc.maps.sigmoid && !base.maps.sigmoid);
        assert_eq!(dfsc.train.steps, base.train.steps);
        assert_eq!(dfsc.train.learning_rate, 1e-4);
        assert_eq!(dfsc.dfsc.alpha, 2.0);
        assert_eq!(dfsc.train.hard_quantile, 0.999);
    }

    #[test]
    fn feature_side_matches_the_reference_table() {
        assert_eq!(pdn_output_side(256), 56);
        assert_eq!(pdn_output_side(128), 24);
        for side in [128_i64, 192, 256, 320, 512] {
            assert_eq!(pdn_output_side(side), (side + 3) / 4 - 8, "side {side}");
        }
    }

    #[test]
    fn file_overrides_preset_and_unknown_keys_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.toml");
        std::fs::write(&path, "preset = \"efficientad_s\"\nimage_size = 128\n[train]\nsteps = 10\n").unwrap();
        let recipe = Recipe::load(Some(&path), None).unwrap();
        assert_eq!(recipe.preset, Preset::EfficientadS);
        assert_eq!(recipe.autoencoder, AutoencoderVariant::Plain);
        assert_eq!(recipe.image_size, 128);
        assert_eq!(recipe.train.steps, 10);
        // The flag wins over the file's preset; the file's other keys still apply.
        let recipe = Recipe::load(Some(&path), Some(Preset::Dfsc)).unwrap();
        assert!(recipe.dfsc.enabled);
        assert_eq!(recipe.train.steps, 10);

        std::fs::write(&path, "[train]\nprecision = \"bf16\"\n").unwrap();
        assert_eq!(Recipe::load(Some(&path), None).unwrap().train.precision, crate::model::Precision::Bf16);
        std::fs::write(&path, "[train]\nprecision = \"f16\"\n").unwrap();
        let err = Recipe::load(Some(&path), None).unwrap_err().to_string();
        assert!(err.contains("train.precision") && err.contains("loss scaling"), "{err}");

        std::fs::write(&path, "[train]\nstepz = 10\n").unwrap();
        let err = Recipe::load(Some(&path), None).unwrap_err().to_string();
        assert!(err.contains("stepz"), "{err}");
    }

    #[test]
    fn shipped_recipes_load_and_spell_out_their_presets() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/recipes");
        let load = |name: &str| Recipe::load(Some(&dir.join(name)), None).unwrap();
        assert_eq!(load("dfsc.toml"), Recipe::preset(Preset::Dfsc));
        assert_eq!(load("efficientad_s.toml"), Recipe::preset(Preset::EfficientadS));
        let quick = load("quick.toml");
        assert_eq!((quick.image_size, quick.train.steps), (128, 600));
        assert!(quick.dfsc.enabled && quick.train.ema_momentum.is_some());
    }

    #[test]
    fn validation_lists_every_problem() {
        let mut recipe = Recipe::preset(Preset::Dfsc);
        recipe.image_size = 100;
        recipe.dfsc.margin = 3.0;
        let err = recipe.validate().unwrap_err().to_string();
        assert!(err.contains("image_size") && err.contains("dfsc.margin"), "{err}");
    }
}
