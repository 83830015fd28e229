//! EfficientAD-S with the Distinctive Feature Separation Constraint.
//!
//! - [`config`]: the typed training recipe and its two presets;
//! - [`net`]: teacher/student PDN and the autoencoder;
//! - [`losses`]: hard feature loss, MSEs, ImageNet penalty, DFSC margin loss;
//! - [`train`]: the training loop with warm-up, EMA and resumable checkpoints;
//! - [`optim`]: AdamW with checkpointable state and the EMA update, on ATen's fused kernels;
//! - [`weights`]: the self-describing safetensors model file;
//! - [`pth`]: a reader of PyTorch checkpoints; [`teacher`]: importing published teachers;
//! - [`backbone`] and [`distill`]: EfficientNet-Lite0 and the distillation of a teacher of our own.
//!
//! [`EfficientAd`] is the trained detector that `predict`, `eval` and the streaming service load.

pub mod activity;
pub mod backbone;
pub mod config;
pub mod distill;
pub mod losses;
pub mod net;
pub mod optim;
pub mod pth;
pub mod teacher;
pub mod train;
pub mod weights;

use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::error::WeightsError;
use config::Recipe;
use net::{Autoencoder, Pdn};
use weights::TensorFile;

/// Identifies our files among other safetensors files.
pub const MODEL_FORMAT: &str = "lineguard-efficientad";
/// Bumped when the tensor layout or metadata of model files changes incompatibly.
pub const FORMAT_VERSION: u32 = 1;
/// The networks whose weights a model file holds, as tensor-name prefixes.
const NETWORKS: [&str; 3] = ["teacher", "student", "autoencoder"];

/// Validation quantiles (low, high) of each raw map, used to put both maps on one scale.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MapQuantiles {
    pub student_teacher: (f64, f64),
    pub autoencoder: (f64, f64),
}

impl MapQuantiles {
    /// The scale of `self` (a served model's) carried over to a retrained copy of it: `before` and `after`
    /// are the raw map quantiles of the served model and of the copy on the same images. The copy's maps
    /// are mapped so that its quantiles on those images land where the served model's do, so a copy that
    /// did not change scores exactly as the served model, and one that did is judged on what it learnt
    /// rather than on how a handful of calibration images happen to spread. None when a map has no spread
    /// on those images.
    pub fn carried_over(&self, before: &MapQuantiles, after: &MapQuantiles) -> Option<MapQuantiles> {
        let carry =
            |(low, high): (f64, f64), (low_before, high_before): (f64, f64), (low_after, high_after): (f64, f64)| {
                // The affine map taking the served model's calibration quantiles to the copy's.
                let stretch = (high_after - low_after) / (high_before - low_before);
                let moved = |value: f64| low_after + (value - low_before) * stretch;
                (stretch.is_finite() && stretch > 0.0).then(|| (moved(low), moved(high)))
            };
        Some(MapQuantiles {
            student_teacher: carry(self.student_teacher, before.student_teacher, after.student_teacher)?,
            autoencoder: carry(self.autoencoder, before.autoencoder, after.autoencoder)?,
        })
    }
}

/// Provenance carried in every model file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Increases with every promoted model of a line; results carry it.
    pub model_version: u64,
    pub trained_steps: u64,
    pub created_unix: u64,
    pub lineguard_version: String,
    /// How much the DFSC term acted over the last quarter of training (absent without DFSC and in files
    /// written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dfsc_activity: Option<activity::DfscActivitySummary>,
    /// The dataset images `lineguard train` learned from (absent for models retrained on a stream, and in
    /// files written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trained_on: Option<crate::data::loco::TrainingImages>,
}

impl ModelInfo {
    pub fn new(model_version: u64, trained_steps: u64) -> ModelInfo {
        ModelInfo {
            model_version,
            trained_steps,
            created_unix: unix_seconds(),
            lineguard_version: env!("CARGO_PKG_VERSION").to_string(),
            dfsc_activity: None,
            trained_on: None,
        }
    }
}

/// Seconds since the Unix epoch (0 on a clock set before 1970).
pub fn unix_seconds() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The number format the three networks compute in when scoring. Reduced precision is for inference
/// only (training stays in f32); the maps themselves are always formed in f32 from the networks' outputs,
/// so only the convolutions round. On a GPU with tensor cores bf16/f16 run several times faster than f32;
/// on a CPU without native support they are slower (measure with `lineguard bench-serving`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    F16,
}

impl Precision {
    pub fn kind(self) -> Kind {
        match self {
            Precision::F32 => Kind::Float,
            Precision::Bf16 => Kind::BFloat16,
            Precision::F16 => Kind::Half,
        }
    }

    /// Whether this machine's CPU computes in this precision natively, from the instruction-set flags
    /// of `/proc/cpuinfo` (AVX-512 or AMX bf16/fp16 on x86, `bf16`/`fphp` on Arm); `None` where they
    /// cannot be read. Without them libtorch emulates the format: on a 2-core AMD EPYC with AVX2 only,
    /// `bench-serving` measured 0.2-0.7 images/s in bf16 and 0.1 in f16 against 11-15 in f32 (128 px).
    pub fn native_on_this_cpu(self) -> Option<bool> {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
        Some(self.native_with_flags(&cpuinfo))
    }

    /// [`Precision::native_on_this_cpu`] for the flag lines of a `/proc/cpuinfo` text.
    fn native_with_flags(self, cpuinfo: &str) -> bool {
        let native: &[&str] = match self {
            Precision::F32 => return true,
            Precision::Bf16 => &["avx512_bf16", "amx_bf16", "bf16"],
            Precision::F16 => &["avx512_fp16", "amx_fp16", "fphp"],
        };
        let present = crate::torch::cpu_extensions(cpuinfo);
        native.iter().any(|flag| present.contains(flag))
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        })
    }
}

/// Raw (unnormalised) difference maps at feature resolution, [B, 1, h, w] each.
pub struct RawMaps {
    pub student_teacher: Tensor,
    pub autoencoder: Tensor,
}

/// Teacher, student and autoencoder with the statistics needed to score images.
pub struct EfficientAd {
    pub recipe: Recipe,
    pub info: ModelInfo,
    pub map_quantiles: Option<MapQuantiles>,
    pub(crate) device: Device,
    pub(crate) teacher_vs: nn::VarStore,
    pub(crate) student_vs: nn::VarStore,
    pub(crate) autoencoder_vs: nn::VarStore,
    pub(crate) teacher: Pdn,
    pub(crate) student: Pdn,
    pub(crate) autoencoder: Autoencoder,
    /// Per-channel statistics of the teacher output on the training images, [1, C, 1, 1].
    pub(crate) teacher_mean: Tensor,
    pub(crate) teacher_std: Tensor,
    /// What the networks compute in; see [`EfficientAd::with_precision`].
    pub(crate) precision: Precision,
}

impl EfficientAd {
    /// Freshly initialised networks (seeded by `recipe.train.seed`); the teacher comes from
    /// `recipe.teacher` when set.
    pub fn new(recipe: Recipe, device: Device) -> Result<EfficientAd, WeightsError> {
        tch::manual_seed(recipe.train.seed as i64);
        let c = recipe.channels;
        let mut teacher_vs = nn::VarStore::new(device);
        let teacher = Pdn::new(&teacher_vs.root(), c);
        let student_vs = nn::VarStore::new(device);
        let student = Pdn::new(&student_vs.root(), 2 * c);
        let autoencoder_vs = nn::VarStore::new(device);
        let autoencoder = Autoencoder::new(&autoencoder_vs.root(), c, recipe.image_size, recipe.autoencoder);
        if let Some(path) = &recipe.teacher {
            load_teacher(&mut teacher_vs, path)?;
        }
        teacher_vs.freeze();
        Ok(EfficientAd {
            info: ModelInfo::new(0, 0),
            map_quantiles: None,
            device,
            teacher_vs,
            student_vs,
            autoencoder_vs,
            teacher,
            student,
            autoencoder,
            teacher_mean: Tensor::zeros([1, c, 1, 1], (Kind::Float, device)),
            teacher_std: Tensor::ones([1, c, 1, 1], (Kind::Float, device)),
            precision: Precision::F32,
            recipe,
        })
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The same model computing in `precision` (its weights converted; f32 inputs are converted on the
    /// way in and the networks' outputs back to f32). For scoring only: a model in reduced precision is
    /// not trained further, and saving it writes its weights in that precision (loading converts them back
    /// to f32).
    pub fn with_precision(mut self, precision: Precision) -> EfficientAd {
        if precision != self.precision {
            for vs in [&mut self.teacher_vs, &mut self.student_vs, &mut self.autoencoder_vs] {
                vs.set_kind(precision.kind());
            }
            self.precision = precision;
        }
        self
    }

    /// A network's output in f32, from images converted to the precision the networks compute in.
    fn run_network(&self, network: impl Fn(&Tensor) -> Tensor, images: &Tensor) -> Tensor {
        match self.precision {
            Precision::F32 => network(images),
            reduced => network(&images.to_kind(reduced.kind())).to_kind(Kind::Float),
        }
    }

    /// Teacher output normalised per channel, without gradient (the teacher is frozen).
    pub fn teacher_features(&self, images: &Tensor) -> Tensor {
        tch::no_grad(|| {
            (self.run_network(|x| self.teacher.forward(x), images) - &self.teacher_mean) / &self.teacher_std
        })
    }

    /// The two difference maps (channel means of squared differences).
    pub fn raw_maps(&self, images: &Tensor) -> RawMaps {
        tch::no_grad(|| {
            let c = self.recipe.channels;
            let teacher = self.teacher_features(images);
            let student = self.run_network(|x| self.student.forward(x), images);
            let autoencoder = self.run_network(|x| self.autoencoder.forward_t(x, false), images);
            RawMaps {
                student_teacher: (teacher - student.narrow(1, 0, c)).square().mean_dim(1, true, Kind::Float),
                autoencoder: (autoencoder - student.narrow(1, c, c)).square().mean_dim(1, true, Kind::Float),
            }
        })
    }

    /// Combined, normalised anomaly maps [B, height, width] at the requested output size (the original
    /// image size). Needs map quantiles (set by training on validation images).
    pub fn anomaly_maps(&self, images: &Tensor, height: i64, width: i64) -> Result<Tensor, WeightsError> {
        let quantiles = self.map_quantiles.ok_or_else(|| WeightsError::Content {
            path: "<in memory>".into(),
            reason: "the model has no map normalisation quantiles (it was not calibrated on validation images)".into(),
        })?;
        let raw = self.raw_maps(images);
        Ok(tch::no_grad(|| {
            let maps = &self.recipe.maps;
            let st = normalise_map(&raw.student_teacher, quantiles.student_teacher, maps.sigmoid);
            let ae = normalise_map(&raw.autoencoder, quantiles.autoencoder, maps.sigmoid);
            let combined = st * maps.student_teacher_weight + ae * maps.autoencoder_weight;
            // The PDN's valid convolutions lose 4 feature cells of context on each side (8 px of a 4-px
            // grid at 256); padding restores the alignment with the image before resizing.
            combined
                .constant_pad_nd([4, 4, 4, 4])
                .upsample_bilinear2d([height, width], false, None::<f64>, None::<f64>)
                .squeeze_dim(1)
        }))
    }

    /// Map values for pictures: from halfway between the validation's low and high quantiles (calm, the
    /// bulk of normal pixels stays transparent) to five times the validation spread above the low quantile
    /// (clearly anomalous).
    pub fn display_range(&self) -> (f32, f32) {
        let maps = &self.recipe.maps;
        let level = |normalised: f64| {
            let v = if maps.sigmoid { 1.0 / (1.0 + (-normalised).exp()) } else { normalised };
            (v * (maps.student_teacher_weight + maps.autoencoder_weight)) as f32
        };
        (level(0.05), level(0.5))
    }

    /// Writes the model (inference student, teacher, autoencoder, statistics, recipe) atomically.
    pub fn save(&self, path: &Path) -> Result<(), WeightsError> {
        self.to_tensor_file().save(path)
    }

    /// Writes the model with the networks' weights in f16: half the file (about 16 MB instead of 33 for
    /// the real size). Loading converts them back to f32, so scores move by the weights' rounding; check
    /// them on real images before shipping such a file (`lineguard model compact` does).
    pub fn save_f16(&self, path: &Path) -> Result<(), WeightsError> {
        let mut file = self.to_tensor_file();
        for (name, tensor) in file.tensors.iter_mut() {
            // The teacher statistics stay f32: they are small and set the scale of every feature.
            if NETWORKS.iter().any(|network| name.starts_with(&format!("{network}."))) {
                *tensor = tensor.to_kind(Kind::Half);
            }
        }
        file.metadata.insert("weights_storage".into(), "f16".into());
        file.save(path)
    }

    pub(crate) fn to_tensor_file(&self) -> TensorFile {
        let mut file = TensorFile::default();
        weights::export_store(&self.teacher_vs, "teacher", &mut file.tensors);
        weights::export_store(&self.student_vs, "student", &mut file.tensors);
        weights::export_store(&self.autoencoder_vs, "autoencoder", &mut file.tensors);
        file.tensors.insert("teacher_mean".into(), self.teacher_mean.to_device(Device::Cpu));
        file.tensors.insert("teacher_std".into(), self.teacher_std.to_device(Device::Cpu));
        file.metadata.insert("format".into(), MODEL_FORMAT.into());
        file.metadata.insert("format_version".into(), FORMAT_VERSION.to_string());
        file.metadata.insert("recipe".into(), json(&self.recipe));
        file.metadata.insert("info".into(), json(&self.info));
        file.metadata.insert("map_quantiles".into(), json(&self.map_quantiles));
        file
    }

    pub fn load(path: &Path, device: Device) -> Result<EfficientAd, WeightsError> {
        let mut file = TensorFile::load(path, device)?;
        Self::from_tensor_file(&mut file, path, device)
    }

    /// The model file's bytes (what `save` writes), for publishing a model through Kafka.
    pub fn to_bytes(&self) -> Result<Vec<u8>, WeightsError> {
        self.to_tensor_file().to_bytes(Path::new("<model in memory>"))
    }

    /// An independent copy on the same device (its own tensors, in f32), through the model file's bytes so
    /// that nothing can be left out of it. For running one model on several threads: tensors are `Send`
    /// but not `Sync`.
    pub fn duplicate(&self) -> Result<EfficientAd, WeightsError> {
        Self::from_bytes(&self.to_bytes()?, Path::new("<model copy>"), self.device)
    }

    /// A model from the bytes of a model file; `origin` names them in errors.
    pub fn from_bytes(bytes: &[u8], origin: &Path, device: Device) -> Result<EfficientAd, WeightsError> {
        let mut file = TensorFile::from_bytes(bytes, origin, device)?;
        Self::from_tensor_file(&mut file, origin, device)
    }

    pub(crate) fn from_tensor_file(
        file: &mut TensorFile,
        path: &Path,
        device: Device,
    ) -> Result<EfficientAd, WeightsError> {
        match file.metadata.get("format").map(String::as_str) {
            Some(MODEL_FORMAT) => {}
            other => {
                return Err(WeightsError::Content {
                    path: path.to_path_buf(),
                    reason: format!(
                        "not a lineguard model (format {:?}, expected {MODEL_FORMAT:?}); teacher-only files go \
                         in the recipe's `teacher` key",
                        other
                    ),
                })
            }
        }
        let version: u32 = file.metadata_json(path, "format_version")?;
        if version != FORMAT_VERSION {
            return Err(WeightsError::Content {
                path: path.to_path_buf(),
                reason: format!("model format version {version}, this lineguard reads {FORMAT_VERSION}"),
            });
        }
        let mut recipe: Recipe = file.metadata_json(path, "recipe")?;
        // The teacher's weights are inside the file: do not go looking for the original teacher file.
        recipe.teacher = None;
        // The file's recipe decides how large the networks are: check it before building them.
        recipe.validate().map_err(|err| WeightsError::Content { path: path.to_path_buf(), reason: err.to_string() })?;
        let info: ModelInfo = file.metadata_json(path, "info")?;
        let map_quantiles: Option<MapQuantiles> = file.metadata_json(path, "map_quantiles")?;
        let mut model = EfficientAd::new(recipe, device)?;
        weights::import_store(&mut model.teacher_vs, "teacher", file, path)?;
        weights::import_store(&mut model.student_vs, "student", file, path)?;
        weights::import_store(&mut model.autoencoder_vs, "autoencoder", file, path)?;
        let c = model.recipe.channels;
        model.teacher_mean = file.take(path, "teacher_mean", &[1, c, 1, 1])?;
        model.teacher_std = file.take(path, "teacher_std", &[1, c, 1, 1])?;
        model.info = info;
        model.map_quantiles = map_quantiles;
        Ok(model)
    }
}

/// EfficientAD's map normalisation: validation quantiles q_a → 0 and q_b → 0.1, optional sigmoid.
pub fn normalise_map(map: &Tensor, (low, high): (f64, f64), sigmoid: bool) -> Tensor {
    let scaled = (map - low) * (0.1 / (high - low).max(1e-12));
    if sigmoid {
        scaled.sigmoid()
    } else {
        scaled
    }
}

/// Loads teacher weights from a safetensors file with keys `conv1.weight` … (or `teacher.conv1.weight`).
fn load_teacher(vs: &mut nn::VarStore, path: &Path) -> Result<(), WeightsError> {
    let mut file = TensorFile::load(path, vs.device())?;
    let prefixed = file.tensors.keys().any(|k| k.starts_with("teacher."));
    if !prefixed {
        file.tensors =
            std::mem::take(&mut file.tensors).into_iter().map(|(k, v)| (format!("teacher.{k}"), v)).collect();
    }
    weights::import_store(vs, "teacher", &mut file, path)
}

/// Serialising our own plain-data types cannot fail (no maps with non-string keys, no foreign
/// `Serialize` impls); the fallback keeps `expect` out of the call sites all the same.
fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| format!("\"unserialisable: {e}\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Preset;

    fn small_recipe() -> Recipe {
        Recipe { image_size: 128, channels: 16, ..Recipe::preset(Preset::Dfsc) }
    }

    #[test]
    fn save_and_load_give_identical_maps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let mut model = EfficientAd::new(small_recipe(), Device::Cpu).unwrap();
        model.map_quantiles = Some(MapQuantiles { student_teacher: (0.1, 0.5), autoencoder: (0.2, 0.9) });
        model.info = ModelInfo::new(7, 123);
        model.save(&path).unwrap();
        let loaded = EfficientAd::load(&path, Device::Cpu).unwrap();
        assert_eq!(loaded.recipe, model.recipe);
        assert_eq!(loaded.info, model.info);
        assert_eq!(loaded.map_quantiles, model.map_quantiles);
        let x = Tensor::randn([2, 3, 128, 128], (Kind::Float, Device::Cpu));
        let a = model.anomaly_maps(&x, 100, 60).unwrap();
        let b = loaded.anomaly_maps(&x, 100, 60).unwrap();
        assert_eq!(a.size(), vec![2, 100, 60]);
        assert!(a.equal(&b));
    }

    #[test]
    fn f16_storage_halves_the_weights_and_loads_back_as_f32() {
        let dir = tempfile::tempdir().unwrap();
        let mut model = EfficientAd::new(small_recipe(), Device::Cpu).unwrap();
        model.map_quantiles = Some(MapQuantiles { student_teacher: (0.1, 0.5), autoencoder: (0.2, 0.9) });
        let (full, half) = (dir.path().join("f32.safetensors"), dir.path().join("f16.safetensors"));
        model.save(&full).unwrap();
        model.save_f16(&half).unwrap();
        let size = |path: &Path| std::fs::metadata(path).unwrap().len() as f64;
        assert!(size(&half) < 0.55 * size(&full), "{} vs {}", size(&half), size(&full));
        let loaded = EfficientAd::load(&half, Device::Cpu).unwrap();
        assert_eq!(loaded.precision(), Precision::F32, "f16 storage, f32 compute");
        let x = Tensor::rand([2, 3, 128, 128], (Kind::Float, Device::Cpu));
        let (a, b) = (model.anomaly_maps(&x, 128, 128).unwrap(), loaded.anomaly_maps(&x, 128, 128).unwrap());
        let range = (a.max() - a.min()).double_value(&[]);
        let error = (&a - &b).abs().max().double_value(&[]) / range;
        assert!(error > 0.0 && error < 5e-3, "{error}");
    }

    /// Reduced precision rounds only the networks: the maps stay close to f32's, relative to their range.
    /// (Measured on a Xeon with AMX at 128 px, 16 channels, random weights: f16 6e-4, bf16 3e-3 of the range.)
    #[test]
    fn reduced_precision_maps_stay_close_to_f32() {
        let mut model = EfficientAd::new(small_recipe(), Device::Cpu).unwrap();
        model.map_quantiles = Some(MapQuantiles { student_teacher: (0.1, 0.5), autoencoder: (0.2, 0.9) });
        // One image: on CPUs without native bf16/f16 (AVX2 only) libtorch emulates them, 0.1-0.7 images/s.
        let x = Tensor::rand([1, 3, 128, 128], (Kind::Float, Device::Cpu));
        let reference = model.anomaly_maps(&x, 128, 128).unwrap();
        let range = (reference.max() - reference.min()).double_value(&[]);
        assert!(range > 0.0);
        let dir = tempfile::tempdir().unwrap();
        for (precision, tolerance) in [(Precision::F16, 5e-3), (Precision::Bf16, 2e-2)] {
            let path = dir.path().join("copy.safetensors");
            model.save(&path).unwrap();
            let reduced = EfficientAd::load(&path, Device::Cpu).unwrap().with_precision(precision);
            assert_eq!(reduced.precision(), precision);
            let maps = reduced.anomaly_maps(&x, 128, 128).unwrap();
            assert_eq!(maps.kind(), Kind::Float, "maps are formed in f32");
            let error = (&maps - &reference).abs().max().double_value(&[]) / range;
            eprintln!("{precision}: largest difference {error:.2e} of the map range");
            assert!(error > 0.0 && error < tolerance, "{precision}: {error}");
        }
    }

    #[test]
    fn a_carried_over_scale_scores_an_unchanged_copy_exactly_as_the_served_model() {
        let served = MapQuantiles { student_teacher: (0.2, 1.4), autoencoder: (0.1, 0.7) };
        let raw = MapQuantiles { student_teacher: (0.3, 0.9), autoencoder: (0.05, 0.5) };
        assert_eq!(served.carried_over(&raw, &raw), Some(served));
        // A copy whose maps doubled and shifted on the same images: its normalised values at its own
        // calibration quantiles equal the served model's at the served model's.
        let after = MapQuantiles { student_teacher: (0.7, 1.9), autoencoder: (0.1, 1.0) };
        let carried = served.carried_over(&raw, &after).unwrap();
        let normalised = |value: f64, (low, high): (f64, f64)| (value - low) * 0.1 / (high - low);
        for (served, raw, after, carried) in [
            (served.student_teacher, raw.student_teacher, after.student_teacher, carried.student_teacher),
            (served.autoencoder, raw.autoencoder, after.autoencoder, carried.autoencoder),
        ] {
            assert!((normalised(after.0, carried) - normalised(raw.0, served)).abs() < 1e-12);
            assert!((normalised(after.1, carried) - normalised(raw.1, served)).abs() < 1e-12);
        }
        let flat = MapQuantiles { student_teacher: (0.5, 0.5), autoencoder: (0.1, 0.7) };
        assert_eq!(served.carried_over(&raw, &flat), None, "no spread, no scale");
    }

    /// A model file carries the recipe its networks are built from: a crafted one (here from the models
    /// topic) must be refused before anything is allocated, not build a network of a billion channels.
    #[test]
    fn a_file_whose_recipe_asks_for_huge_networks_is_refused_before_building() {
        let model = EfficientAd::new(small_recipe(), Device::Cpu).unwrap();
        let mut file = model.to_tensor_file();
        let huge = Recipe { channels: 1_000_000_000, image_size: 1 << 20, ..small_recipe() };
        file.metadata.insert("recipe".into(), serde_json::to_string(&huge).unwrap());
        let bytes = file.to_bytes(Path::new("crafted")).unwrap();
        let err = match EfficientAd::from_bytes(&bytes, Path::new("<models topic>"), Device::Cpu) {
            Ok(_) => panic!("a crafted recipe must not load"),
            Err(err) => err.to_string(),
        };
        assert!(err.contains("channels = 1000000000") && err.contains("image_size = 1048576"), "{err}");
    }

    #[test]
    fn normalisation_maps_quantiles_to_0_and_0_1() {
        let map = Tensor::from_slice(&[1.0f32, 3.0, 5.0]);
        let plain: Vec<f32> = Vec::try_from(normalise_map(&map, (1.0, 3.0), false)).unwrap();
        assert_eq!(plain, vec![0.0, 0.1, 0.2]);
        let squashed: Vec<f32> = Vec::try_from(normalise_map(&map, (1.0, 3.0), true)).unwrap();
        assert!((squashed[0] - 0.5).abs() < 1e-6 && (squashed[1] - 0.524_979).abs() < 1e-5);
    }

    #[test]
    fn loading_a_foreign_file_names_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("other.safetensors");
        let mut file = TensorFile::default();
        file.tensors.insert("x".into(), Tensor::zeros([1], (Kind::Float, Device::Cpu)));
        file.save(&path).unwrap();
        let err = EfficientAd::load(&path, Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("not a lineguard model"), "{err}");
    }

    #[test]
    fn native_reduced_precision_is_read_from_the_cpu_flags() {
        let epyc_avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma f16c\n";
        let sapphire_rapids = "flags\t\t: avx2 avx512f avx512_bf16 avx512_fp16 amx_bf16\n";
        let neoverse_v1 = "Features\t: fp asimd fphp asimdhp bf16\n";
        let bf16_without_f16 = "flags\t\t: avx512f avx512_bf16\n";
        for (cpuinfo, bf16, f16) in [
            (epyc_avx2, false, false),
            (sapphire_rapids, true, true),
            (neoverse_v1, true, true),
            (bf16_without_f16, true, false),
        ] {
            assert!(Precision::F32.native_with_flags(cpuinfo), "{cpuinfo}");
            assert_eq!(Precision::Bf16.native_with_flags(cpuinfo), bf16, "{cpuinfo}");
            assert_eq!(Precision::F16.native_with_flags(cpuinfo), f16, "{cpuinfo}");
        }
        // f16c (conversion only) is not f16 arithmetic, and a flag in another line's value does not count.
        assert!(!Precision::F16.native_with_flags("model name\t: avx512_fp16 lookalike\nflags\t: f16c\n"));
    }
}
