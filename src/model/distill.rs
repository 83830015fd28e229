//! Teacher pre-training by distillation (EfficientAD's recipe, with EfficientNet-Lite0 in place of
//! WideResNet-101, whose weights are not obtainable here): a PDN-S learns to reproduce channel-normalised
//! backbone features of natural images under an MSE loss.
//!
//! Geometry: the PDN sees the image at side S and outputs S/4 − 8 features per side (56 at 256). The
//! backbone sees the same image at side 2S − 64 (448), so that its stride-8 grid has exactly S/4 − 8 cells;
//! its stride-16 tap is upsampled onto that grid. As in EfficientAD (after PatchCore), each tap is averaged
//! over 3x3 neighbours, the taps are concatenated (240 + 672 channels) and averaged in adjacent channel
//! groups down to the teacher's 384 channels.
//!
//! Every step is a pure function of (weights, optimiser state, seed, step), so a resumed run continues
//! exactly as an uninterrupted one would.

use std::collections::BTreeMap;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use super::backbone::{EfficientNetLite0, TAPS};
use super::losses::mse;
use super::net::Pdn;
use super::optim::AdamW;
use super::train::TrainError;
use super::weights::TensorFile;
use crate::data::preprocess;
use crate::error::WeightsError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistillConfig {
    /// PDN input side S (a multiple of 64); the backbone sees 2S − 64.
    pub image_size: i64,
    pub channels: i64,
    pub steps: u64,
    pub batch_size: i64,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub seed: u64,
    /// Smallest random crop, as a fraction of the image area.
    pub min_crop_area: f64,
    pub grayscale_probability: f64,
    /// Images whose features set the per-channel target statistics.
    pub statistics_images: i64,
}

impl Default for DistillConfig {
    /// EfficientAD's pre-training: Adam(W) lr 1e-4, weight decay 1e-5, batch 16, 60,000 iterations.
    fn default() -> Self {
        DistillConfig {
            image_size: 256,
            channels: 384,
            steps: 60_000,
            batch_size: 16,
            learning_rate: 1e-4,
            weight_decay: 1e-5,
            seed: 0,
            min_crop_area: 0.5,
            grayscale_probability: 0.1,
            statistics_images: 256,
        }
    }
}

impl DistillConfig {
    pub fn backbone_side(&self) -> i64 {
        2 * self.image_size - 64
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.image_size < 128 || self.image_size % 64 != 0 {
            return Err(format!("image size {} must be a multiple of 64, at least 128", self.image_size));
        }
        if self.batch_size < 1 || self.channels < 1 || self.steps == 0 {
            return Err("steps, batch size and channels must be positive".into());
        }
        Ok(())
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct DistillState {
    step: u64,
    optimizer_steps: u64,
    config: DistillConfig,
}

pub struct Distiller {
    pub config: DistillConfig,
    backbone: EfficientNetLite0,
    pdn_vs: nn::VarStore,
    pdn: Pdn,
    params: Vec<(String, Tensor)>,
    optimizer: AdamW,
    /// Training images as [N, 3, L, L] bytes on the device, L = the backbone side.
    images: Tensor,
    target_mean: Tensor,
    target_std: Tensor,
    step: u64,
}

impl Distiller {
    /// A new run. `images` are [N, 3, L, L] pixels in [0, 1] at the backbone side (see
    /// [`DistillConfig::backbone_side`]).
    pub fn new(config: DistillConfig, backbone: EfficientNetLite0, images: &Tensor) -> Result<Distiller, TrainError> {
        config.validate().map_err(TrainError::Data)?;
        let mut distiller = Self::assemble(config, backbone, images)?;
        let (mean, std) = distiller.target_statistics();
        if !bool::try_from(mean.isfinite().all().logical_and(&std.isfinite().all())).unwrap_or(false) {
            return Err(TrainError::Data("backbone features are not finite (corrupt images?)".into()));
        }
        distiller.target_mean = mean;
        distiller.target_std = std;
        Ok(distiller)
    }

    fn assemble(config: DistillConfig, backbone: EfficientNetLite0, images: &Tensor) -> Result<Distiller, TrainError> {
        let device = backbone.device();
        let side = config.backbone_side();
        if images.dim() != 4 || images.size()[1..] != [3, side, side] || images.size()[0] == 0 {
            return Err(TrainError::Data(format!("expected images [N, 3, {side}, {side}], got {:?}", images.size())));
        }
        tch::manual_seed(config.seed as i64);
        let pdn_vs = nn::VarStore::new(device);
        let pdn = Pdn::new(&pdn_vs.root(), config.channels);
        let mut params: Vec<(String, Tensor)> = pdn_vs.variables().into_iter().collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let tensors: Vec<Tensor> = params.iter().map(|(_, t)| t.shallow_clone()).collect();
        let optimizer = AdamW::new(&tensors, config.weight_decay);
        let images = (images * 255.0).round().clamp(0.0, 255.0).to_kind(Kind::Uint8).to_device(device);
        let c = config.channels;
        Ok(Distiller {
            config,
            backbone,
            pdn_vs,
            pdn,
            params,
            optimizer,
            images,
            target_mean: Tensor::zeros([1, c, 1, 1], (Kind::Float, device)),
            target_std: Tensor::ones([1, c, 1, 1], (Kind::Float, device)),
            step: 0,
        })
    }

    pub fn step_index(&self) -> u64 {
        self.step
    }

    pub fn is_done(&self) -> bool {
        self.step >= self.config.steps
    }

    /// Backbone features of `pixels` ([B, 3, L, L] in [0, 1]) reduced to the teacher's shape, unnormalised.
    pub fn raw_targets(&self, pixels: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let taps = self.backbone.expansion_activations(&EfficientNetLite0::scale_input(pixels), &TAPS);
            let neighbourhood = |t: &Tensor| t.avg_pool2d([3, 3], [1, 1], [1, 1], false, false, None::<i64>);
            let fine = neighbourhood(&taps[0]);
            let (h, w) = (fine.size()[2], fine.size()[3]);
            let coarse = neighbourhood(&taps[1]).upsample_bilinear2d([h, w], false, None, None);
            let stacked = Tensor::cat(&[fine, coarse], 1);
            let (b, c) = (stacked.size()[0], stacked.size()[1]);
            stacked
                .permute([0, 2, 3, 1])
                .reshape([b * h * w, 1, c])
                .adaptive_avg_pool1d(self.config.channels)
                .reshape([b, h, w, self.config.channels])
                .permute([0, 3, 1, 2])
                .contiguous()
        })
    }

    /// Per-channel mean and std of the targets over (up to `statistics_images` of) the whole images,
    /// spread evenly over the set (files sorted by class name would otherwise give only the first classes).
    fn target_statistics(&self) -> (Tensor, Tensor) {
        let total = self.images.size()[0];
        let n = total.min(self.config.statistics_images.max(1));
        let indices: Vec<i64> = (0..n).map(|i| i * total / n).collect();
        let chosen = self.images.index_select(0, &Tensor::from_slice(&indices).to_device(self.images.device()));
        let mut sum = Tensor::zeros([self.config.channels], (Kind::Double, self.images.device()));
        let mut sum_sq = sum.zeros_like();
        let mut count = 0i64;
        let chunk = 8;
        let mut start = 0;
        while start < n {
            let len = chunk.min(n - start);
            let pixels = chosen.narrow(0, start, len).to_kind(Kind::Float) / 255.0;
            let t = self.raw_targets(&pixels).to_kind(Kind::Double);
            sum += t.sum_dim_intlist([0, 2, 3].as_slice(), false, Kind::Double);
            sum_sq += t.square().sum_dim_intlist([0, 2, 3].as_slice(), false, Kind::Double);
            count += t.size()[0] * t.size()[2] * t.size()[3];
            start += len;
        }
        let mean = &sum / count as f64;
        let var = (&sum_sq / count as f64 - mean.square()).clamp_min(0.0);
        let std = var.sqrt().clamp_min(1e-6);
        let shape = [1, self.config.channels, 1, 1];
        (mean.to_kind(Kind::Float).reshape(shape), std.to_kind(Kind::Float).reshape(shape))
    }

    /// One optimisation step; returns the MSE loss. A non-finite loss skips the update and is reported.
    pub fn step(&mut self) -> Result<f64, TrainError> {
        let loss = self.forward();
        let value = loss.double_value(&[]);
        if !value.is_finite() {
            self.step += 1;
            return Err(TrainError::NonFinite { step: self.step - 1, loss: value });
        }
        self.update(&loss)?;
        Ok(value)
    }

    /// One optimisation step whose loss stays on the device until [`PendingLoss::read`], as
    /// [`super::train::Trainer::step_deferred`]: a GPU keeps working while the host queues the next steps.
    pub fn step_deferred(&mut self) -> Result<PendingLoss, TrainError> {
        let loss = self.forward();
        let pending = PendingLoss { step: self.step, loss: loss.detach() };
        self.update(&loss)?;
        Ok(pending)
    }

    fn forward(&self) -> Tensor {
        let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ self.step);
        let pixels = augmented_batch(&self.images, &self.config, &mut rng);
        let target = (self.raw_targets(&pixels) - &self.target_mean) / &self.target_std;
        let s = self.config.image_size;
        let pdn_input = preprocess::normalise(&pixels.adaptive_avg_pool2d([s, s]));
        mse(&self.pdn.forward(&pdn_input), &target)
    }

    fn update(&mut self, loss: &Tensor) -> Result<(), TrainError> {
        for (_, p) in &mut self.params {
            p.zero_grad();
        }
        loss.backward();
        let tensors: Vec<Tensor> = self.params.iter().map(|(_, t)| t.shallow_clone()).collect();
        self.optimizer.step(&tensors, self.config.learning_rate)?;
        self.step += 1;
        Ok(())
    }

    /// Starts from a teacher written by an earlier run of `steps_done` steps: its weights, fresh optimiser
    /// moments (AdamW's bias correction rebuilds them within a few hundred steps). The target statistics
    /// are recomputed from the same images, so they match the earlier run's when the images do.
    pub fn warm_start(&mut self, teacher: &mut TensorFile, path: &Path, steps_done: u64) -> Result<(), TrainError> {
        for (name, mut variable) in self.pdn_vs.variables() {
            let source = teacher.take(path, &name, &variable.size())?;
            tch::no_grad(|| variable.copy_(&source));
        }
        self.step = steps_done;
        Ok(())
    }

    /// The teacher's weights, keyed `conv1.weight` … `conv4.bias` on the CPU (see [`super::teacher`]).
    pub fn teacher_tensors(&self) -> BTreeMap<String, Tensor> {
        self.pdn_vs.variables().into_iter().map(|(k, t)| (k, t.detach().to_device(Device::Cpu))).collect()
    }

    pub fn save_checkpoint(&self, path: &Path) -> Result<(), TrainError> {
        let mut file = TensorFile::default();
        for (name, tensor) in self.teacher_tensors() {
            file.tensors.insert(format!("pdn.{name}"), tensor);
        }
        self.optimizer.export(&self.params, &mut file.tensors);
        file.tensors.insert("target_mean".into(), self.target_mean.to_device(Device::Cpu));
        file.tensors.insert("target_std".into(), self.target_std.to_device(Device::Cpu));
        let state =
            DistillState { step: self.step, optimizer_steps: self.optimizer.steps_taken, config: self.config.clone() };
        file.metadata.insert("distill_state".into(), serde_json::to_string(&state).unwrap_or_default());
        file.save(path)?;
        Ok(())
    }

    /// Continues from [`Distiller::save_checkpoint`]; `steps` may extend the run.
    pub fn resume(
        path: &Path,
        backbone: EfficientNetLite0,
        images: &Tensor,
        steps: Option<u64>,
    ) -> Result<Distiller, TrainError> {
        let device = backbone.device();
        let mut file = TensorFile::load(path, device)?;
        if !file.metadata.contains_key("distill_state") {
            return Err(WeightsError::Content {
                path: path.to_path_buf(),
                reason: "not a distillation checkpoint (no distill_state)".into(),
            }
            .into());
        }
        let state: DistillState = file.metadata_json(path, "distill_state")?;
        let mut config = state.config;
        if let Some(steps) = steps {
            config.steps = steps;
        }
        let mut distiller = Self::assemble(config, backbone, images)?;
        let c = distiller.config.channels;
        for (name, mut variable) in distiller.pdn_vs.variables() {
            let source = file.take(path, &format!("pdn.{name}"), &variable.size())?;
            tch::no_grad(|| variable.copy_(&source));
        }
        distiller.optimizer.import(&distiller.params, &mut file, path, state.optimizer_steps)?;
        distiller.target_mean = file.take(path, "target_mean", &[1, c, 1, 1])?;
        distiller.target_std = file.take(path, "target_std", &[1, c, 1, 1])?;
        distiller.step = state.step;
        Ok(distiller)
    }
}

/// One distillation step's loss still on the device (see [`Distiller::step_deferred`]).
pub struct PendingLoss {
    step: u64,
    loss: Tensor,
}

impl PendingLoss {
    /// Waits for the step's kernels and returns its loss; a non-finite one ends the run, since its update
    /// already reached the weights.
    pub fn read(self) -> Result<f64, TrainError> {
        let value = self.loss.double_value(&[]);
        if !value.is_finite() {
            return Err(TrainError::NonFiniteApplied { step: self.step, loss: value });
        }
        Ok(value)
    }
}

/// One image's random augmentation, drawn in a fixed order so that a step's batch depends only on the
/// seed and the step.
#[derive(Debug, Clone, Copy)]
struct Augmentation {
    index: i64,
    crop: i64,
    y: i64,
    x: i64,
    flip: bool,
    brightness: f64,
    contrast: f64,
    saturation: f64,
    grayscale: bool,
}

impl Augmentation {
    fn draw(rng: &mut ChaCha8Rng, images: i64, side: i64, config: &DistillConfig) -> Augmentation {
        let index = rng.gen_range(0..images);
        let crop = ((side as f64) * rng.gen_range(config.min_crop_area..=1.0).sqrt()).round() as i64;
        let crop = crop.clamp(8, side);
        let (y, x) = (rng.gen_range(0..=side - crop), rng.gen_range(0..=side - crop));
        Augmentation {
            index,
            crop,
            y,
            x,
            flip: rng.gen_bool(0.5),
            brightness: rng.gen_range(0.8..1.2),
            contrast: rng.gen_range(0.8..1.2),
            saturation: rng.gen_range(0.8..1.2),
            grayscale: rng.gen_bool(config.grayscale_probability),
        }
    }
}

/// A batch of augmented images, [B, 3, L, L] in [0, 1], from `images` ([N, 3, L, L] bytes): random crop
/// (area ≥ `min_crop_area`) resized back (bilinear), horizontal flip, brightness/contrast/saturation jitter
/// in [0.8, 1.2], occasional grayscale.
fn augmented_batch(images: &Tensor, config: &DistillConfig, rng: &mut ChaCha8Rng) -> Tensor {
    let (n, side) = (images.size()[0], config.backbone_side());
    let draws: Vec<Augmentation> = (0..config.batch_size).map(|_| Augmentation::draw(rng, n, side, config)).collect();
    augment(images, &draws)
}

/// Applies `draws`. Crops differ in size, so crop, resize and flip stay per image (a view and one or two
/// kernels each); the colour jitter runs on the whole batch with per-image factors that reach the device
/// in one small copy. About 3 kernels per image plus 15, where jittering one image at a time took about 25
/// per image (400 launches per step on a GPU at batch 16). Resampling the whole batch with one
/// `grid_sample` would save the per-image kernels, but made a CPU step 4% slower than bilinear upsampling.
fn augment(images: &Tensor, draws: &[Augmentation]) -> Tensor {
    let side = images.size()[2];
    let b = draws.len() as i64;
    let crops: Vec<Tensor> = draws
        .iter()
        .map(|d| {
            let crop = images.narrow(0, d.index, 1).narrow(2, d.y, d.crop).narrow(3, d.x, d.crop).to_kind(Kind::Float);
            let resized = if d.crop == side { crop } else { crop.upsample_bilinear2d([side, side], false, None, None) };
            if d.flip {
                resized.flip([3])
            } else {
                resized
            }
        })
        .collect();
    let mut pixels = Tensor::cat(&crops, 0) / 255.0;

    let values: Vec<f64> =
        draws.iter().flat_map(|d| [d.brightness, d.contrast, d.saturation, f64::from(u8::from(d.grayscale))]).collect();
    // Non-blocking: a GPU need not finish its queue before this copy, as a plain copy would make it.
    let factors = Tensor::from_slice(&values).reshape([b, 4]).to_device_(pixels.device(), Kind::Float, true, false);
    let factor = |column: i64| factors.narrow(1, column, 1).reshape([b, 1, 1, 1]);
    let luma = Tensor::from_slice(&[0.299f32, 0.587, 0.114]).reshape([1, 3, 1, 1]).to_device(pixels.device());
    let gray = |p: &Tensor| (p * &luma).sum_dim_intlist(1, true, Kind::Float);
    pixels *= factor(0);
    let mean = gray(&pixels).mean_dim([1, 2, 3].as_slice(), true, Kind::Float);
    pixels = (&pixels - &mean) * factor(1) + &mean;
    let g = gray(&pixels);
    pixels = (&pixels - &g) * factor(2) + &g;
    pixels = gray(&pixels).expand_as(&pixels).where_self(&factor(3).gt(0.5), &pixels);
    pixels.clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One image at a time, as distillation augmented before the batched jitter: crop, resize the crop
    /// back, flip, jitter. The reference the batched version must agree with.
    fn augment_one_by_one(images: &Tensor, draws: &[Augmentation]) -> Tensor {
        let side = images.size()[2];
        let gray = |p: &Tensor| (p.select(1, 0) * 0.299 + p.select(1, 1) * 0.587 + p.select(1, 2) * 0.114).unsqueeze(1);
        let samples: Vec<Tensor> = draws
            .iter()
            .map(|d| {
                let image = images.get(d.index).to_kind(Kind::Float) / 255.0;
                let mut pixels = image.narrow(1, d.y, d.crop).narrow(2, d.x, d.crop).unsqueeze(0);
                if d.crop != side {
                    pixels = pixels.upsample_bilinear2d([side, side], false, None, None);
                }
                if d.flip {
                    pixels = pixels.flip([3]);
                }
                pixels = &pixels * d.brightness;
                let mean = gray(&pixels).mean(Kind::Float);
                pixels = (&pixels - &mean) * d.contrast + &mean;
                let g = gray(&pixels);
                pixels = (&pixels - &g) * d.saturation + &g;
                if d.grayscale {
                    pixels = gray(&pixels).expand([1, 3, side, side], false);
                }
                pixels.clamp(0.0, 1.0)
            })
            .collect();
        Tensor::cat(&samples, 0)
    }

    #[test]
    fn batched_augmentation_matches_one_image_at_a_time() {
        tch::manual_seed(7);
        let side = 64;
        let images = Tensor::randint(256, [3, 3, side, side], (Kind::Uint8, Device::Cpu));
        let config =
            DistillConfig { image_size: 64, batch_size: 24, grayscale_probability: 0.3, ..DistillConfig::default() };
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let draws: Vec<Augmentation> = (0..24).map(|_| Augmentation::draw(&mut rng, 3, side, &config)).collect();
        assert!(draws.iter().any(|d| d.flip) && draws.iter().any(|d| d.grayscale));
        assert!(draws.iter().any(|d| d.crop < side));
        let batched = augment(&images, &draws);
        let reference = augment_one_by_one(&images, &draws);
        assert_eq!(batched.size(), [24, 3, side, side]);
        // The same images up to rounding (the batch sums its channels and scales in another order).
        let gap = (&batched - &reference).abs().max().double_value(&[]);
        assert!(gap < 1e-5, "batched and one-by-one augmentation differ by {gap}");
    }

    #[test]
    fn a_deferred_loss_reports_a_non_finite_value_with_its_step() {
        let pending = PendingLoss { step: 4, loss: Tensor::from(f64::NAN) };
        let err = pending.read().unwrap_err();
        assert!(matches!(err, TrainError::NonFiniteApplied { step: 4, .. }), "{err}");
        assert_eq!(PendingLoss { step: 0, loss: Tensor::from(0.25) }.read().unwrap(), 0.25);
    }
}
