//! Deterministic procedural dataset in the MVTec LOCO AD folder layout.
//!
//! This is the data of the embedded demo and of the fast tests: a small
//! EfficientAD model is trained on it at 128x128 px, so every anomaly has to be
//! visible in the pixels at that size, while the *logical* anomalies must stay
//! logical: each part, looked at alone, is a perfectly normal part; only the
//! arrangement or the combination breaks a rule.
//!
//! # Scene
//!
//! A top-down view of a plastic tray lying on a dark, streaky conveyor belt.
//! The tray fills ~90 % of the frame (jittered by ~1 %) and holds a 2x2 grid of
//! recessed compartments. Each compartment has a fixed item kind:
//!
//! | compartment  | item                                |
//! |--------------|-------------------------------------|
//! | top-left     | round cap (pair colour)             |
//! | top-right    | square block (ivory)                |
//! | bottom-left  | steel bar (horizontal)              |
//! | bottom-right | ring (pair colour)                  |
//!
//! Rules a normal image obeys:
//! * exactly one item per compartment, of that compartment's kind, near the
//!   compartment centre (a few px of jitter, a few degrees of rotation);
//! * **pairing**: the cap and the ring always share one colour, drawn per
//!   image from [`PALETTE`] (red, blue, yellow), so colour varies across normal
//!   images but the pair always matches.
//!
//! Nuisance variation that is *not* anomalous: belt texture, a per-image
//! brightness factor of ±4 %, small per-part shade jitter, sensor noise.
//!
//! # Anomalies
//!
//! Logical (`test/logical_anomalies`, kinds cycled by index):
//! * `missing_item` — one compartment is empty; mask = where the item belongs.
//! * `extra_item` — a second, normal-looking item of any kind is squeezed into
//!   a compartment, partly overlapping the resident one; mask = the extra item.
//! * `colour_mismatch` — cap and ring have two different palette colours (each
//!   colour is normal on its own); mask = both paired items.
//! * `misplaced_item` — either an item is pushed into a corner of its
//!   compartment, or two compartments' items are swapped; mask = the wrong
//!   position(s) together with the proper place(s).
//!
//! Structural (`test/structural_anomalies`, kinds cycled by index; a quarter of
//! the images get a second defect of another kind on another item, written as
//! a second mask file):
//! * `scratch` — a thin bright or dark line across an item.
//! * `contamination` — a blob of an off colour on an item or on a
//!   compartment floor.
//! * `broken_item` — a torn chunk missing from an item's edge; mask = the
//!   missing material.
//!
//! # Determinism
//!
//! Every image has its own RNG seeded from `(seed, split, index)`, and the
//! pixel noise is a hash of the image seed and pixel position, so images do not
//! depend on each other or on the counts of other splits, and the same config
//! gives byte-identical files. Geometry is defined in units of the image side,
//! so any size in `128..=512` shows the same scene.

//!
//! # Code
//!
//! `raster` holds the drawing primitives (geometry in units of the side, shapes, noise, the canvas),
//! `scene` the normal tray and how an image is built from its seed and rendered, `defects` the
//! edits that make a normal scene anomalous with their ground-truth shapes, and `writer` the files.

mod defects;
mod raster;
mod scene;
#[cfg(test)]
mod tests;
mod writer;

use std::collections::BTreeMap;
use std::path::PathBuf;

use image::{GrayImage, RgbImage};
use serde::{Deserialize, Serialize};

use scene::{build, smallest_part_area};
pub use writer::generate;

/// Smallest supported image side: below this the thin defects (scratches)
/// would be sub-pixel.
pub const MIN_IMAGE_SIZE: u32 = 128;
/// Largest supported image side.
pub const MAX_IMAGE_SIZE: u32 = 512;
/// File names are LOCO's three-digit indices, so a split holds at most 1000.
pub const MAX_SPLIT_COUNT: usize = 1000;

/// The pair colours (cap and ring), as display RGB in `0..=1`.
/// Three strongly separated hues keep the pairing rule learnable from ~100
/// training images.
pub const PALETTE: [[f32; 3]; 3] = [
    [0.82, 0.16, 0.14], // red
    [0.16, 0.36, 0.84], // blue
    [0.93, 0.78, 0.16], // yellow
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SynthConfig {
    pub seed: u64,
    /// Square images, side in px, `128..=512`.
    pub image_size: u32,
    /// `train/good` count.
    pub train: usize,
    /// `validation/good` count.
    pub validation: usize,
    /// `test/good` count.
    pub test_good: usize,
    /// `test/logical_anomalies` count.
    pub test_logical: usize,
    /// `test/structural_anomalies` count.
    pub test_structural: usize,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            image_size: 256,
            train: 120,
            validation: 30,
            test_good: 40,
            test_logical: 40,
            test_structural: 40,
        }
    }
}

impl SynthConfig {
    /// Only test images, `per_kind` of each kind (and one train and validation image, which every
    /// dataset needs): frames for benchmarks and demos that stream images rather than train.
    pub fn test_frames(seed: u64, image_size: u32, per_kind: usize) -> SynthConfig {
        SynthConfig {
            seed,
            image_size,
            train: 1,
            validation: 1,
            test_good: per_kind,
            test_logical: per_kind,
            test_structural: per_kind,
        }
    }

    /// Checks the size range and the per-split counts.
    pub fn validate(&self) -> Result<(), SynthError> {
        if !(MIN_IMAGE_SIZE..=MAX_IMAGE_SIZE).contains(&self.image_size) {
            return Err(SynthError::InvalidConfig(format!(
                "image_size {} is outside {MIN_IMAGE_SIZE}..={MAX_IMAGE_SIZE}",
                self.image_size
            )));
        }
        if self.train == 0 {
            return Err(SynthError::InvalidConfig("train must be at least 1 (nothing to train on)".into()));
        }
        for (name, n) in [
            ("train", self.train),
            ("validation", self.validation),
            ("test_good", self.test_good),
            ("test_logical", self.test_logical),
            ("test_structural", self.test_structural),
        ] {
            if n > MAX_SPLIT_COUNT {
                return Err(SynthError::InvalidConfig(format!(
                    "{name} = {n} exceeds {MAX_SPLIT_COUNT} (three-digit file names)"
                )));
            }
        }
        Ok(())
    }

    fn count(&self, split: Split) -> usize {
        match split {
            Split::Train => self.train,
            Split::Validation => self.validation,
            Split::TestGood => self.test_good,
            Split::TestLogical => self.test_logical,
            Split::TestStructural => self.test_structural,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SynthReport {
    /// Images written (all splits).
    pub images: usize,
    /// Mask files written under `ground_truth`.
    pub masks: usize,
    /// Defect instances per defect name (one per mask file).
    pub defects: BTreeMap<String, usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("invalid synthetic dataset config: {0}")]
    InvalidConfig(String),
    #[error("output directory {path} is not empty; refusing to mix two datasets")]
    OutputNotEmpty { path: PathBuf },
    #[error("cannot create directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read directory {path}: {source}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encode PNG for {path}: {source}")]
    Encode {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },
    #[error("cannot serialize {path}: {source}")]
    Serialize {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// The five image folders of a LOCO category.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Validation,
    TestGood,
    TestLogical,
    TestStructural,
}

impl Split {
    pub const ALL: [Split; 5] =
        [Split::Train, Split::Validation, Split::TestGood, Split::TestLogical, Split::TestStructural];

    /// Image folder relative to the dataset root.
    pub fn dir(self) -> &'static str {
        match self {
            Split::Train => "train/good",
            Split::Validation => "validation/good",
            Split::TestGood => "test/good",
            Split::TestLogical => "test/logical_anomalies",
            Split::TestStructural => "test/structural_anomalies",
        }
    }

    /// Mask folder relative to the dataset root, for anomalous splits.
    pub fn mask_dir(self) -> Option<&'static str> {
        match self {
            Split::TestLogical => Some("ground_truth/logical_anomalies"),
            Split::TestStructural => Some("ground_truth/structural_anomalies"),
            _ => None,
        }
    }

    fn seed_tag(self) -> u64 {
        match self {
            Split::Train => 1,
            Split::Validation => 2,
            Split::TestGood => 3,
            Split::TestLogical => 4,
            Split::TestStructural => 5,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DefectKind {
    MissingItem,
    ExtraItem,
    ColourMismatch,
    MisplacedItem,
    Scratch,
    Contamination,
    BrokenItem,
}

impl DefectKind {
    pub const ALL: [DefectKind; 7] = [
        DefectKind::MissingItem,
        DefectKind::ExtraItem,
        DefectKind::ColourMismatch,
        DefectKind::MisplacedItem,
        DefectKind::Scratch,
        DefectKind::Contamination,
        DefectKind::BrokenItem,
    ];
    pub const LOGICAL: [DefectKind; 4] =
        [DefectKind::MissingItem, DefectKind::ExtraItem, DefectKind::ColourMismatch, DefectKind::MisplacedItem];
    pub const STRUCTURAL: [DefectKind; 3] = [DefectKind::Scratch, DefectKind::Contamination, DefectKind::BrokenItem];

    pub fn name(self) -> &'static str {
        match self {
            DefectKind::MissingItem => "missing_item",
            DefectKind::ExtraItem => "extra_item",
            DefectKind::ColourMismatch => "colour_mismatch",
            DefectKind::MisplacedItem => "misplaced_item",
            DefectKind::Scratch => "scratch",
            DefectKind::Contamination => "contamination",
            DefectKind::BrokenItem => "broken_item",
        }
    }

    /// Mask pixel value, as listed in `defects_config.json`.
    pub fn pixel_value(self) -> u8 {
        match self {
            DefectKind::MissingItem => 255,
            DefectKind::ExtraItem => 254,
            DefectKind::ColourMismatch => 253,
            DefectKind::MisplacedItem => 252,
            DefectKind::Scratch => 251,
            DefectKind::Contamination => 250,
            DefectKind::BrokenItem => 249,
        }
    }

    pub fn is_logical(self) -> bool {
        DefectKind::LOGICAL.contains(&self)
    }
}

/// One entry of MVTec LOCO's `defects_config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DefectSpec {
    pub defect_name: String,
    pub pixel_value: u8,
    pub saturation_threshold: f64,
    pub relative_saturation: bool,
}

/// The `defects_config.json` entries for a given image side.
///
/// Absolute thresholds are pixel counts at `image_size`: for a missing or
/// misplaced part, having flagged one part's worth of area is as good as
/// flagging the whole (possibly larger) region, as in LOCO.
pub fn defect_specs(image_size: u32) -> Vec<DefectSpec> {
    let part_area = smallest_part_area(image_size) as f64;
    DefectKind::ALL
        .iter()
        .map(|&kind| {
            let (saturation_threshold, relative_saturation) = match kind {
                DefectKind::MissingItem | DefectKind::MisplacedItem => (part_area, false),
                // Which of the two parts is "wrong" is undecidable, so finding
                // either one of them is a full detection.
                DefectKind::ColourMismatch => (0.5, true),
                DefectKind::ExtraItem | DefectKind::Scratch | DefectKind::Contamination | DefectKind::BrokenItem => {
                    (1.0, true)
                }
            };
            DefectSpec {
                defect_name: kind.name().to_string(),
                pixel_value: kind.pixel_value(),
                saturation_threshold,
                relative_saturation,
            }
        })
        .collect()
}

/// One annotated defect of a rendered image.
#[derive(Debug, Clone)]
pub struct Defect {
    pub kind: DefectKind,
    /// Same size as the image; `kind.pixel_value()` inside, 0 elsewhere.
    pub mask: GrayImage,
}

/// A rendered image with its defects (empty for good images).
#[derive(Debug, Clone)]
pub struct Sample {
    pub image: RgbImage,
    pub defects: Vec<Defect>,
}

/// Renders image `index` of `split` without touching the disk (used by
/// [`generate`], and handy for demos). The index need not be below the
/// configured count.
pub fn render_sample(config: &SynthConfig, split: Split, index: usize) -> Result<Sample, SynthError> {
    config.validate()?;
    let built = build(config.seed, split, index, config.image_size);
    Ok(built.render(config.image_size))
}
