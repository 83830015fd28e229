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

use std::collections::BTreeMap;
use std::fs;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{GrayImage, ImageBuffer, ImageFormat, Luma, Pixel, PixelWithColorType, Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

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

/// Writes the dataset under `out` (created if needed; it must not exist or be
/// empty). Calls `on_image` once per image written.
pub fn generate(config: &SynthConfig, out: &Path, on_image: &mut dyn FnMut()) -> Result<SynthReport, SynthError> {
    config.validate()?;
    prepare_output(out)?;

    let specs = defect_specs(config.image_size);
    write_json(&out.join("defects_config.json"), &specs)?;
    write_json(&out.join("synth.json"), config)?;

    let mut report = SynthReport::default();
    for kind in DefectKind::ALL {
        report.defects.insert(kind.name().to_string(), 0);
    }
    for split in Split::ALL {
        let count = config.count(split);
        let dir = out.join(split.dir());
        create_dir(&dir)?;
        for index in 0..count {
            let sample = build(config.seed, split, index, config.image_size).render(config.image_size);
            write_png(&dir.join(format!("{index:03}.png")), &sample.image)?;
            report.images += 1;
            if let Some(mask_dir) = split.mask_dir() {
                let dir = out.join(mask_dir).join(format!("{index:03}"));
                create_dir(&dir)?;
                for (n, defect) in sample.defects.iter().enumerate() {
                    write_png(&dir.join(format!("{n:03}.png")), &defect.mask)?;
                    report.masks += 1;
                    *report.defects.entry(defect.kind.name().to_string()).or_default() += 1;
                }
            }
            on_image();
        }
    }
    Ok(report)
}

// ---------------------------------------------------------------------------
// Output helpers

fn prepare_output(out: &Path) -> Result<(), SynthError> {
    if out.exists() {
        let mut entries =
            fs::read_dir(out).map_err(|source| SynthError::ReadDir { path: out.to_path_buf(), source })?;
        if entries.next().is_some() {
            return Err(SynthError::OutputNotEmpty { path: out.to_path_buf() });
        }
    }
    create_dir(out)
}

fn create_dir(path: &Path) -> Result<(), SynthError> {
    fs::create_dir_all(path).map_err(|source| SynthError::CreateDir { path: path.to_path_buf(), source })
}

fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<(), SynthError> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|source| SynthError::Serialize { path: path.to_path_buf(), source })?;
    text.push('\n');
    fs::write(path, text).map_err(|source| SynthError::Write { path: path.to_path_buf(), source })
}

fn write_png<P>(path: &Path, img: &ImageBuffer<P, Vec<u8>>) -> Result<(), SynthError>
where
    P: Pixel<Subpixel = u8> + PixelWithColorType,
{
    let mut buf = Vec::new();
    img.write_to(&mut Cursor::new(&mut buf), ImageFormat::Png)
        .map_err(|source| SynthError::Encode { path: path.to_path_buf(), source })?;
    fs::write(path, buf).map_err(|source| SynthError::Write { path: path.to_path_buf(), source })
}

// ---------------------------------------------------------------------------
// Geometry. All coordinates are in units of the image side (0..1), so the
// scene is the same at every resolution.

#[derive(Debug, Clone, Copy, PartialEq)]
struct V2 {
    x: f32,
    y: f32,
}

const fn v2(x: f32, y: f32) -> V2 {
    V2 { x, y }
}

impl std::ops::Add for V2 {
    type Output = V2;
    fn add(self, o: V2) -> V2 {
        v2(self.x + o.x, self.y + o.y)
    }
}

impl std::ops::Sub for V2 {
    type Output = V2;
    fn sub(self, o: V2) -> V2 {
        v2(self.x - o.x, self.y - o.y)
    }
}

impl std::ops::Mul<f32> for V2 {
    type Output = V2;
    fn mul(self, k: f32) -> V2 {
        v2(self.x * k, self.y * k)
    }
}

impl V2 {
    fn len(self) -> f32 {
        self.x.hypot(self.y)
    }
    fn dot(self, o: V2) -> f32 {
        self.x * o.x + self.y * o.y
    }
    fn rotate(self, angle: f32) -> V2 {
        let (s, c) = angle.sin_cos();
        v2(c * self.x - s * self.y, s * self.x + c * self.y)
    }
    fn from_angle(angle: f32) -> V2 {
        let (s, c) = angle.sin_cos();
        v2(c, s)
    }
}

/// Shapes as signed distance fields: one evaluation gives both the inside
/// test for masks and a cheap one-pixel anti-aliasing ramp for drawing, and
/// boolean operations (bites, clipping) come for free.
#[derive(Debug, Clone)]
enum Shape {
    Circle {
        c: V2,
        r: f32,
    },
    Ring {
        c: V2,
        r_out: f32,
        r_in: f32,
    },
    RoundBox {
        c: V2,
        half: V2,
        round: f32,
        angle: f32,
    },
    Capsule {
        a: V2,
        b: V2,
        r: f32,
    },
    /// Disc with an angle-dependent radius, so a break looks torn, not machined.
    Jagged {
        c: V2,
        r: f32,
        phase: f32,
        amp: f32,
    },
    /// Smooth union of discs: an organic-looking stain.
    Blob {
        circles: Vec<(V2, f32)>,
        k: f32,
    },
    Intersect(Box<Shape>, Box<Shape>),
    Subtract(Box<Shape>, Box<Shape>),
    Union(Box<Shape>, Box<Shape>),
}

fn smooth_min(a: f32, b: f32, k: f32) -> f32 {
    let h = (0.5 + 0.5 * (b - a) / k).clamp(0.0, 1.0);
    b + (a - b) * h - k * h * (1.0 - h)
}

impl Shape {
    fn union(a: Shape, b: Shape) -> Shape {
        Shape::Union(Box::new(a), Box::new(b))
    }

    fn sdf(&self, p: V2) -> f32 {
        match self {
            Shape::Circle { c, r } => (p - *c).len() - r,
            Shape::Ring { c, r_out, r_in } => {
                let mid = 0.5 * (r_out + r_in);
                let half_width = 0.5 * (r_out - r_in);
                ((p - *c).len() - mid).abs() - half_width
            }
            Shape::RoundBox { c, half, round, angle } => {
                let q = (p - *c).rotate(-angle);
                let dx = q.x.abs() - (half.x - round);
                let dy = q.y.abs() - (half.y - round);
                v2(dx.max(0.0), dy.max(0.0)).len() + dx.max(dy).min(0.0) - round
            }
            Shape::Capsule { a, b, r } => {
                let pa = p - *a;
                let ba = *b - *a;
                let h = (pa.dot(ba) / ba.dot(ba)).clamp(0.0, 1.0);
                (pa - ba * h).len() - r
            }
            Shape::Jagged { c, r, phase, amp } => {
                let d = p - *c;
                let ang = d.y.atan2(d.x);
                let wobble = 0.5 * (3.0 * ang + phase).sin()
                    + 0.3 * (7.0 * ang + 2.0 * phase).sin()
                    + 0.2 * (13.0 * ang + 3.0 * phase).sin();
                d.len() - r * (1.0 + amp * wobble)
            }
            Shape::Blob { circles, k } => circles
                .iter()
                .map(|(c, r)| (p - *c).len() - r)
                .reduce(|a, b| smooth_min(a, b, *k))
                .unwrap_or(f32::INFINITY),
            Shape::Intersect(a, b) => a.sdf(p).max(b.sdf(p)),
            Shape::Subtract(a, b) => a.sdf(p).max(-b.sdf(p)),
            Shape::Union(a, b) => a.sdf(p).min(b.sdf(p)),
        }
    }

    /// Axis-aligned bounds (may be loose, never too tight).
    fn bounds(&self) -> (V2, V2) {
        match self {
            Shape::Circle { c, r } => (*c - v2(*r, *r), *c + v2(*r, *r)),
            Shape::Ring { c, r_out, .. } => (*c - v2(*r_out, *r_out), *c + v2(*r_out, *r_out)),
            Shape::RoundBox { c, half, angle, .. } => {
                let (s, co) = angle.sin_cos();
                let e = v2(co.abs() * half.x + s.abs() * half.y, s.abs() * half.x + co.abs() * half.y);
                (*c - e, *c + e)
            }
            Shape::Capsule { a, b, r } => {
                (v2(a.x.min(b.x) - r, a.y.min(b.y) - r), v2(a.x.max(b.x) + r, a.y.max(b.y) + r))
            }
            Shape::Jagged { c, r, amp, .. } => {
                let e = r * (1.0 + amp);
                (*c - v2(e, e), *c + v2(e, e))
            }
            Shape::Blob { circles, k } => {
                let mut lo = v2(f32::INFINITY, f32::INFINITY);
                let mut hi = v2(f32::NEG_INFINITY, f32::NEG_INFINITY);
                for (c, r) in circles {
                    // The smooth union bulges by at most k/4 between discs.
                    let e = r + k;
                    lo = v2(lo.x.min(c.x - e), lo.y.min(c.y - e));
                    hi = v2(hi.x.max(c.x + e), hi.y.max(c.y + e));
                }
                (lo, hi)
            }
            Shape::Intersect(a, b) => {
                let (alo, ahi) = a.bounds();
                let (blo, bhi) = b.bounds();
                (v2(alo.x.max(blo.x), alo.y.max(blo.y)), v2(ahi.x.min(bhi.x), ahi.y.min(bhi.y)))
            }
            Shape::Subtract(a, _) => a.bounds(),
            Shape::Union(a, b) => {
                let (alo, ahi) = a.bounds();
                let (blo, bhi) = b.bounds();
                (v2(alo.x.min(blo.x), alo.y.min(blo.y)), v2(ahi.x.max(bhi.x), ahi.y.max(bhi.y)))
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Hash noise: a pure function of (seed, position), so an anomalous image and
// its normal counterpart share exactly the same texture and sensor noise.

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn hash01(seed: u64, x: i64, y: i64) -> f32 {
    let h = splitmix64(seed ^ splitmix64((x as u64).wrapping_mul(0x9E37_79B9) ^ (y as u64).rotate_left(32)));
    (h >> 40) as f32 / (1u64 << 24) as f32
}

/// Smooth value noise in `0..1`, one lattice cell per unit of (x, y).
fn value_noise(seed: u64, x: f32, y: f32) -> f32 {
    let (xf, yf) = (x.floor(), y.floor());
    let (xi, yi) = (xf as i64, yf as i64);
    let (tx, ty) = (x - xf, y - yf);
    let (sx, sy) = (tx * tx * (3.0 - 2.0 * tx), ty * ty * (3.0 - 2.0 * ty));
    let a = hash01(seed, xi, yi);
    let b = hash01(seed, xi + 1, yi);
    let c = hash01(seed, xi, yi + 1);
    let d = hash01(seed, xi + 1, yi + 1);
    let top = a + (b - a) * sx;
    let bottom = c + (d - c) * sx;
    top + (bottom - top) * sy
}

fn smoothstep(e0: f32, e1: f32, x: f32) -> f32 {
    let t = ((x - e0) / (e1 - e0)).clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

fn scale(c: [f32; 3], k: f32) -> [f32; 3] {
    [c[0] * k, c[1] * k, c[2] * k]
}

fn mix(a: [f32; 3], b: [f32; 3], t: f32) -> [f32; 3] {
    [a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t, a[2] + (b[2] - a[2]) * t]
}

fn luminance(c: [f32; 3]) -> f32 {
    0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
}

fn colour_distance(a: [f32; 3], b: [f32; 3]) -> f32 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt()
}

// ---------------------------------------------------------------------------
// Raster canvas (linear float RGB, quantised once at the end).

struct Canvas {
    size: u32,
    px: Vec<[f32; 3]>,
}

fn pixel_centre(size: u32, x: u32, y: u32) -> V2 {
    let s = size as f32;
    v2((x as f32 + 0.5) / s, (y as f32 + 0.5) / s)
}

/// Pixel index ranges covering `bounds` plus a margin, clipped to the image.
fn pixel_span(size: u32, (lo, hi): (V2, V2), margin_px: f32) -> Option<(u32, u32, u32, u32)> {
    let s = size as f32;
    let clip = |v: f32| v.clamp(0.0, s) as u32;
    let (x0, x1) = (clip((lo.x * s - margin_px).floor()), clip((hi.x * s + margin_px).ceil()));
    let (y0, y1) = (clip((lo.y * s - margin_px).floor()), clip((hi.y * s + margin_px).ceil()));
    (x0 < x1 && y0 < y1).then_some((x0, x1, y0, y1))
}

impl Canvas {
    fn new(size: u32, background: impl Fn(V2) -> [f32; 3]) -> Self {
        let mut px = Vec::with_capacity((size * size) as usize);
        for y in 0..size {
            for x in 0..size {
                px.push(background(pixel_centre(size, x, y)));
            }
        }
        Self { size, px }
    }

    /// Composites `shape` with a one-pixel coverage ramp; `colour` gets the
    /// position and the signed distance (for edge shading).
    fn paint(&mut self, shape: &Shape, opacity: f32, colour: impl Fn(V2, f32) -> [f32; 3]) {
        let s = self.size as f32;
        let Some((x0, x1, y0, y1)) = pixel_span(self.size, shape.bounds(), 2.0) else {
            return;
        };
        for y in y0..y1 {
            for x in x0..x1 {
                let p = pixel_centre(self.size, x, y);
                let d = shape.sdf(p);
                let alpha = (0.5 - d * s).clamp(0.0, 1.0) * opacity;
                if alpha > 0.0 {
                    let c = colour(p, d);
                    let dst = &mut self.px[(y * self.size + x) as usize];
                    *dst = mix(*dst, c, alpha);
                }
            }
        }
    }

    /// Darkens under `shape` moved by `offset`, with a soft edge: cheap
    /// contact shadows that make the parts read as objects on a floor.
    fn shadow(&mut self, shape: &Shape, offset: V2, softness: f32, strength: f32) {
        let (lo, hi) = shape.bounds();
        let grow = v2(softness, softness);
        let span = pixel_span(self.size, (lo + offset - grow, hi + offset + grow), 1.0);
        let Some((x0, x1, y0, y1)) = span else {
            return;
        };
        for y in y0..y1 {
            for x in x0..x1 {
                let p = pixel_centre(self.size, x, y);
                let d = shape.sdf(p - offset);
                let a = (0.5 - d / softness).clamp(0.0, 1.0) * strength;
                if a > 0.0 {
                    let dst = &mut self.px[(y * self.size + x) as usize];
                    *dst = scale(*dst, 1.0 - a);
                }
            }
        }
    }

    fn finish(self, brightness: f32, noise_seed: u64) -> RgbImage {
        let size = self.size;
        let seed_a = splitmix64(noise_seed ^ 0xA11CE);
        let seed_b = splitmix64(noise_seed ^ 0xB0B);
        let mut img = RgbImage::new(size, size);
        for (i, c) in self.px.iter().enumerate() {
            let (x, y) = ((i as u32 % size) as i64, (i as u32 / size) as i64);
            // Triangular sensor noise of about ±2 grey levels.
            let n = (hash01(seed_a, x, y) + hash01(seed_b, x, y) - 1.0) * 0.02;
            let q = |v: f32| ((v * brightness + n).clamp(0.0, 1.0) * 255.0).round() as u8;
            img.put_pixel(x as u32, y as u32, Rgb([q(c[0]), q(c[1]), q(c[2])]));
        }
        img
    }
}

fn rasterize_mask(shape: &Shape, size: u32, value: u8) -> GrayImage {
    let mut mask = GrayImage::new(size, size);
    if let Some((x0, x1, y0, y1)) = pixel_span(size, shape.bounds(), 1.0) {
        for y in y0..y1 {
            for x in x0..x1 {
                if shape.sdf(pixel_centre(size, x, y)) < 0.0 {
                    mask.put_pixel(x, y, Luma([value]));
                }
            }
        }
    }
    mask
}

// ---------------------------------------------------------------------------
// Scene layout (units of the image side).

const TRAY_HALF: f32 = 0.45;
const TRAY_ROUND: f32 = 0.035;
const TRAY_JITTER: f32 = 0.01;
const WALL: f32 = 0.028;
const DIVIDER: f32 = 0.03;
const COMP_HALF: f32 = (2.0 * TRAY_HALF - 2.0 * WALL - DIVIDER) / 4.0;
const COMP_ROUND: f32 = 0.02;
/// Normal placement tolerance; misplacements move parts ~6x further.
const POS_JITTER: f32 = 0.015;
const ANGLE_JITTER: f32 = 0.06;
/// Clearance kept between a part pushed into a corner and the walls.
const CORNER_CLEARANCE: f32 = 0.012;

const CAP_R: f32 = 0.095;
const BLOCK_HALF: f32 = 0.09;
const BLOCK_ROUND: f32 = 0.012;
const BAR_HALF: V2 = v2(0.13, 0.042);
const BAR_ROUND: f32 = 0.02;
const RING_R: f32 = 0.10;
const RING_IN: f32 = 0.05;

const BELT: [f32; 3] = [0.15, 0.155, 0.165];
const TRAY: [f32; 3] = [0.30, 0.34, 0.40];
const FLOOR: [f32; 3] = [0.24, 0.27, 0.32];
const BLOCK_COLOUR: [f32; 3] = [0.86, 0.80, 0.66];
const BAR_COLOUR: [f32; 3] = [0.66, 0.69, 0.73];
/// Off colours that never occur on a normal part: oil, rust, mould, dust.
const CONTAMINANTS: [[f32; 3]; 4] = [[0.06, 0.05, 0.04], [0.60, 0.32, 0.10], [0.32, 0.62, 0.20], [0.88, 0.87, 0.82]];

const SHADOW_OFFSET: V2 = v2(0.010, 0.012);
const SHADOW_SOFTNESS: f32 = 0.012;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ItemKind {
    Cap,
    Block,
    Bar,
    Ring,
}

/// Compartment kinds in row-major order: cap and ring sit on a diagonal so the
/// pairing rule links parts that are far apart in the image.
const SLOT_KINDS: [ItemKind; 4] = [ItemKind::Cap, ItemKind::Block, ItemKind::Bar, ItemKind::Ring];
const CAP_SLOT: usize = 0;
const RING_SLOT: usize = 3;

impl ItemKind {
    /// Half extents of the axis-aligned box holding the part, including its
    /// largest normal rotation.
    fn half_extent(self) -> V2 {
        let (s, c) = ANGLE_JITTER.sin_cos();
        match self {
            ItemKind::Cap => v2(CAP_R, CAP_R),
            ItemKind::Ring => v2(RING_R, RING_R),
            ItemKind::Block => {
                let e = BLOCK_HALF * (c + s);
                v2(e, e)
            }
            ItemKind::Bar => v2(c * BAR_HALF.x + s * BAR_HALF.y, s * BAR_HALF.x + c * BAR_HALF.y),
        }
    }
}

#[derive(Debug, Clone)]
struct Item {
    kind: ItemKind,
    centre: V2,
    angle: f32,
    colour: [f32; 3],
    bite: Option<Shape>,
}

impl Item {
    /// The intact part.
    fn body(&self) -> Shape {
        let c = self.centre;
        match self.kind {
            ItemKind::Cap => Shape::Circle { c, r: CAP_R },
            ItemKind::Block => {
                Shape::RoundBox { c, half: v2(BLOCK_HALF, BLOCK_HALF), round: BLOCK_ROUND, angle: self.angle }
            }
            ItemKind::Bar => Shape::RoundBox { c, half: BAR_HALF, round: BAR_ROUND, angle: self.angle },
            ItemKind::Ring => Shape::Ring { c, r_out: RING_R, r_in: RING_IN },
        }
    }

    /// The area the part occupies, hole included: what a missing or moved part
    /// leaves empty.
    fn footprint(&self) -> Shape {
        match self.kind {
            ItemKind::Ring => Shape::Circle { c: self.centre, r: RING_R },
            _ => self.body(),
        }
    }

    /// The part as drawn, with a broken-off chunk if any.
    fn shape(&self) -> Shape {
        match &self.bite {
            Some(bite) => Shape::Subtract(Box::new(self.body()), Box::new(bite.clone())),
            None => self.body(),
        }
    }

    /// Surface colour with simple moulded-part shading, lit from the top left.
    fn colour_at(&self, p: V2, d: f32) -> [f32; 3] {
        let q = (p - self.centre).rotate(-self.angle);
        let reach = self.kind.half_extent().len();
        let light = 1.0 - 0.10 * (q.x + q.y) / reach;
        let rim = 0.82 + 0.18 * smoothstep(0.0, 0.007, -d);
        let base = scale(self.colour, light * rim);
        match self.kind {
            ItemKind::Cap => {
                let r = q.len();
                let groove = 1.0 - 0.22 * (1.0 - smoothstep(0.0, 0.006, (r - 0.62 * CAP_R).abs()));
                let spec_d = (q - v2(-0.35 * CAP_R, -0.35 * CAP_R)).len() / (0.28 * CAP_R);
                let spec = 0.35 * (-spec_d * spec_d).exp();
                mix(scale(base, groove), [1.0, 1.0, 1.0], spec)
            }
            ItemKind::Block => {
                // Raised top face with a bevel that is bright towards the light.
                let inner = BLOCK_HALF - 0.022;
                let face = q.x.abs().max(q.y.abs()) < inner;
                let k = if face { 1.04 } else { 0.95 - 0.16 * (q.x + q.y) / (q.x.abs() + q.y.abs() + 1e-6) };
                scale(base, k)
            }
            ItemKind::Bar => {
                let t = q.y / (0.35 * BAR_HALF.y);
                scale(base, 0.88 + 0.28 * (-t * t).exp())
            }
            ItemKind::Ring => {
                let half_width = 0.5 * (RING_R - RING_IN);
                let t = ((q.len() - 0.5 * (RING_R + RING_IN)) / half_width).clamp(-1.0, 1.0);
                scale(base, 0.72 + 0.3 * (1.0 - t * t).sqrt())
            }
        }
    }
}

fn comp_centre(tray: V2, slot: usize) -> V2 {
    let step = COMP_HALF + 0.5 * DIVIDER;
    let sx = [-1.0, 1.0][slot % 2];
    let sy = [-1.0, 1.0][slot / 2];
    tray + v2(sx * step, sy * step)
}

fn random_sign(rng: &mut ChaCha8Rng) -> f32 {
    if rng.gen_bool(0.5) {
        1.0
    } else {
        -1.0
    }
}

/// Offset from a compartment centre that pushes a part of `kind` into a
/// random corner while keeping it inside the compartment.
fn corner_offset(kind: ItemKind, rng: &mut ChaCha8Rng) -> V2 {
    let e = kind.half_extent();
    let sx = random_sign(rng);
    let sy = random_sign(rng);
    v2(sx * (COMP_HALF - e.x - CORNER_CLEARANCE).max(0.0), sy * (COMP_HALF - e.y - CORNER_CLEARANCE).max(0.0))
}

/// Area of the smallest part's footprint in pixels at `size` (analytic, so
/// it does not wobble with the pixel grid).
fn smallest_part_area(size: u32) -> usize {
    use std::f32::consts::PI;
    let round_box = |half: V2, round: f32| 4.0 * half.x * half.y - (4.0 - PI) * round * round;
    let areas = [
        PI * CAP_R * CAP_R,
        round_box(v2(BLOCK_HALF, BLOCK_HALF), BLOCK_ROUND),
        round_box(BAR_HALF, BAR_ROUND),
        PI * RING_R * RING_R,
    ];
    let smallest = areas.iter().copied().fold(f32::INFINITY, f32::min);
    (smallest * (size * size) as f32).round() as usize
}

#[derive(Debug, Clone)]
struct Overlay {
    shape: Shape,
    colour: [f32; 3],
    opacity: f32,
    /// Mottled rather than uniform (stains).
    mottled: bool,
}

#[derive(Debug, Clone)]
struct Scene {
    noise_seed: u64,
    brightness: f32,
    tray_centre: V2,
    /// Palette index of the cap/ring pair.
    pair: usize,
    /// Drawn in order; the four residents come first, in slot order.
    items: Vec<Item>,
    overlays: Vec<Overlay>,
}

fn pair_colour(pair: usize, rng: &mut ChaCha8Rng) -> [f32; 3] {
    // A couple of percent of shade jitter: parts from one colour batch are
    // never exactly identical, but stay unmistakably the same colour.
    scale(PALETTE[pair], rng.gen_range(0.98..1.02))
}

fn part_colour(kind: ItemKind, pair: usize, rng: &mut ChaCha8Rng) -> [f32; 3] {
    match kind {
        ItemKind::Cap | ItemKind::Ring => pair_colour(pair, rng),
        ItemKind::Block => scale(BLOCK_COLOUR, rng.gen_range(0.97..1.03)),
        ItemKind::Bar => scale(BAR_COLOUR, rng.gen_range(0.97..1.03)),
    }
}

fn jitter(rng: &mut ChaCha8Rng, amount: f32) -> V2 {
    v2(rng.gen_range(-amount..amount), rng.gen_range(-amount..amount))
}

fn normal_scene(rng: &mut ChaCha8Rng) -> Scene {
    let noise_seed = rng.gen::<u64>();
    let brightness = rng.gen_range(0.96..1.04);
    let tray_centre = v2(0.5, 0.5) + jitter(rng, TRAY_JITTER);
    let pair = rng.gen_range(0..PALETTE.len());
    let mut items = Vec::with_capacity(5);
    for (slot, &kind) in SLOT_KINDS.iter().enumerate() {
        let centre = comp_centre(tray_centre, slot) + jitter(rng, POS_JITTER);
        let angle = match kind {
            ItemKind::Block | ItemKind::Bar => rng.gen_range(-ANGLE_JITTER..ANGLE_JITTER),
            ItemKind::Cap | ItemKind::Ring => 0.0,
        };
        let colour = part_colour(kind, pair, rng);
        items.push(Item { kind, centre, angle, colour, bite: None });
    }
    Scene { noise_seed, brightness, tray_centre, pair, items, overlays: Vec::new() }
}

/// Turns a normal scene into a logical anomaly; returns the annotated region.
fn apply_logical(scene: &mut Scene, kind: DefectKind, rng: &mut ChaCha8Rng) -> Shape {
    match kind {
        DefectKind::MissingItem => {
            let slot = rng.gen_range(0..4);
            scene.items.remove(slot).footprint()
        }
        DefectKind::ExtraItem => {
            let slot = rng.gen_range(0..4);
            let extra_kind = SLOT_KINDS[rng.gen_range(0..4)];
            let centre = comp_centre(scene.tray_centre, slot) + corner_offset(extra_kind, rng);
            let angle = match extra_kind {
                ItemKind::Block | ItemKind::Bar => rng.gen_range(-ANGLE_JITTER..ANGLE_JITTER),
                ItemKind::Cap | ItemKind::Ring => 0.0,
            };
            // A normal part (pair colour included), so only the count is wrong.
            let colour = part_colour(extra_kind, scene.pair, rng);
            let extra = Item { kind: extra_kind, centre, angle, colour, bite: None };
            let region = extra.footprint();
            scene.items.push(extra);
            region
        }
        DefectKind::ColourMismatch => {
            let slot = if rng.gen_bool(0.5) { CAP_SLOT } else { RING_SLOT };
            let other = (scene.pair + rng.gen_range(1..PALETTE.len())) % PALETTE.len();
            scene.items[slot].colour = pair_colour(other, rng);
            Shape::union(scene.items[CAP_SLOT].footprint(), scene.items[RING_SLOT].footprint())
        }
        DefectKind::MisplacedItem => {
            if rng.gen_bool(0.5) {
                // Pushed into a corner of its own compartment.
                let slot = rng.gen_range(0..4);
                let before = scene.items[slot].footprint();
                let offset = corner_offset(scene.items[slot].kind, rng) * 0.9;
                scene.items[slot].centre = comp_centre(scene.tray_centre, slot) + offset;
                Shape::union(before, scene.items[slot].footprint())
            } else {
                // Two parts swapped: each is normal, just in the wrong place.
                let a = rng.gen_range(0..4);
                let b = (a + rng.gen_range(1..4)) % 4;
                let before = Shape::union(scene.items[a].footprint(), scene.items[b].footprint());
                scene.items[a].centre = comp_centre(scene.tray_centre, b) + jitter(rng, POS_JITTER);
                scene.items[b].centre = comp_centre(scene.tray_centre, a) + jitter(rng, POS_JITTER);
                let after = Shape::union(scene.items[a].footprint(), scene.items[b].footprint());
                Shape::union(before, after)
            }
        }
        DefectKind::Scratch | DefectKind::Contamination | DefectKind::BrokenItem => {
            unreachable!("structural kind passed to apply_logical")
        }
    }
}

/// Adds one structural defect on the part (or compartment) `slot`; returns
/// the annotated region.
fn apply_structural(scene: &mut Scene, kind: DefectKind, slot: usize, size: u32, rng: &mut ChaCha8Rng) -> Shape {
    let item = scene.items[slot].clone();
    let extent = item.kind.half_extent();
    match kind {
        DefectKind::Scratch => {
            let through = item.centre + v2(rng.gen_range(-0.3..0.3) * extent.x, rng.gen_range(-0.3..0.3) * extent.y);
            let dir = V2::from_angle(rng.gen_range(0.0..std::f32::consts::PI)) * (1.3 * extent.len());
            // At least one pixel either side of the centre line, so a scratch
            // survives at 128 px.
            let half_width = 0.0055f32.max(1.0 / size as f32);
            let line = Shape::Capsule { a: through - dir, b: through + dir, r: half_width };
            let region = Shape::Intersect(Box::new(line), Box::new(item.shape()));
            let colour = if luminance(item.colour) < 0.5 { [0.97, 0.96, 0.92] } else { [0.10, 0.09, 0.08] };
            scene.overlays.push(Overlay { shape: region.clone(), colour, opacity: 0.95, mottled: false });
            region
        }
        DefectKind::Contamination => {
            let (centre, surface) = if rng.gen_bool(0.5) {
                let offset = match item.kind {
                    // On the ring's material, not in its hole.
                    ItemKind::Ring => {
                        V2::from_angle(rng.gen_range(0.0..std::f32::consts::TAU)) * (0.5 * (RING_R + RING_IN))
                    }
                    _ => v2(rng.gen_range(-0.5..0.5) * extent.x, rng.gen_range(-0.5..0.5) * extent.y),
                };
                (item.centre + offset, item.colour)
            } else {
                // A free corner of the compartment floor.
                let corner = v2(random_sign(rng) * 0.12, random_sign(rng) * 0.12);
                (comp_centre(scene.tray_centre, slot) + corner, FLOOR)
            };
            // Around 8-10 % of the image side across: >10 px at 128 px.
            let n = rng.gen_range(3..=6);
            let circles = (0..n).map(|_| (centre + jitter(rng, 0.03), rng.gen_range(0.018..0.036))).collect();
            let blob = Shape::Blob { circles, k: 0.015 };
            let colour = CONTAMINANTS
                .iter()
                .copied()
                .max_by(|a, b| colour_distance(*a, surface).total_cmp(&colour_distance(*b, surface)))
                .unwrap_or(CONTAMINANTS[0]);
            scene.overlays.push(Overlay { shape: blob.clone(), colour, opacity: 0.92, mottled: true });
            blob
        }
        DefectKind::BrokenItem => {
            let body = item.body();
            let dir = V2::from_angle(rng.gen_range(0.0..std::f32::consts::TAU));
            // Walk outwards from inside the material to the part's edge.
            let mut t = if item.kind == ItemKind::Ring { 0.5 * (RING_R + RING_IN) } else { 0.0 };
            while body.sdf(item.centre + dir * t) < 0.0 && t < 0.3 {
                t += 0.002;
            }
            let r = rng.gen_range(0.045..0.06);
            let bite = Shape::Jagged {
                c: item.centre + dir * (t + 0.1 * r),
                r,
                phase: rng.gen_range(0.0..std::f32::consts::TAU),
                amp: 0.18,
            };
            scene.items[slot].bite = Some(bite.clone());
            Shape::Intersect(Box::new(body), Box::new(bite))
        }
        DefectKind::MissingItem | DefectKind::ExtraItem | DefectKind::ColourMismatch | DefectKind::MisplacedItem => {
            unreachable!("logical kind passed to apply_structural")
        }
    }
}

/// A scene, its normal counterpart (same noise, lighting and placement), and
/// the annotated defect regions.
struct Built {
    // Only the tests render it, to check masks against pixel differences.
    #[cfg_attr(not(test), allow(dead_code))]
    normal: Scene,
    scene: Scene,
    defects: Vec<(DefectKind, Shape)>,
}

fn image_rng(seed: u64, split: Split, index: usize) -> ChaCha8Rng {
    let h = splitmix64(splitmix64(splitmix64(seed) ^ split.seed_tag()) ^ index as u64);
    ChaCha8Rng::seed_from_u64(h)
}

fn build(seed: u64, split: Split, index: usize, size: u32) -> Built {
    let mut rng = image_rng(seed, split, index);
    let normal = normal_scene(&mut rng);
    let mut scene = normal.clone();
    let defects = match split {
        Split::Train | Split::Validation | Split::TestGood => Vec::new(),
        Split::TestLogical => {
            let kind = DefectKind::LOGICAL[index % DefectKind::LOGICAL.len()];
            vec![(kind, apply_logical(&mut scene, kind, &mut rng))]
        }
        Split::TestStructural => {
            let n = DefectKind::STRUCTURAL.len();
            let first = DefectKind::STRUCTURAL[index % n];
            let mut slots = [0usize, 1, 2, 3];
            rand::seq::SliceRandom::shuffle(&mut slots[..], &mut rng);
            let mut defects = vec![(first, apply_structural(&mut scene, first, slots[0], size, &mut rng))];
            if rng.gen_bool(0.25) {
                let second = DefectKind::STRUCTURAL[(index + rng.gen_range(1..n)) % n];
                defects.push((second, apply_structural(&mut scene, second, slots[1], size, &mut rng)));
            }
            defects
        }
    };
    Built { normal, scene, defects }
}

impl Built {
    fn render(&self, size: u32) -> Sample {
        Sample {
            image: render_scene(&self.scene, size),
            defects: self
                .defects
                .iter()
                .map(|(kind, shape)| Defect { kind: *kind, mask: rasterize_mask(shape, size, kind.pixel_value()) })
                .collect(),
        }
    }
}

fn render_scene(scene: &Scene, size: u32) -> RgbImage {
    let seed = scene.noise_seed;
    let belt_seed = splitmix64(seed ^ 0xBE17);
    let grain_seed = splitmix64(seed ^ 0x6A11);
    let stain_seed = splitmix64(seed ^ 0x57A1);
    // Belt fabric: long streaks along the running direction plus fine grain.
    let mut canvas = Canvas::new(size, |p| {
        let streak = value_noise(belt_seed, p.x * 6.0, p.y * 90.0) - 0.5;
        let grain = value_noise(grain_seed, p.x * 45.0, p.y * 45.0) - 0.5;
        scale(BELT, 1.0 + 0.30 * streak + 0.15 * grain)
    });

    let tc = scene.tray_centre;
    let tray = Shape::RoundBox { c: tc, half: v2(TRAY_HALF, TRAY_HALF), round: TRAY_ROUND, angle: 0.0 };
    canvas.shadow(&tray, v2(0.012, 0.014), 0.02, 0.55);
    canvas.paint(&tray, 1.0, |p, d| {
        let q = p - tc;
        let light = 1.0 - 0.05 * (q.x + q.y) / TRAY_HALF;
        let edge = 0.85 + 0.15 * smoothstep(0.0, 0.008, -d);
        let grain = 1.0 + 0.04 * (value_noise(grain_seed, p.x * 70.0, p.y * 70.0) - 0.5);
        scale(TRAY, light * edge * grain)
    });
    for slot in 0..4 {
        let c = comp_centre(tc, slot);
        let comp = Shape::RoundBox { c, half: v2(COMP_HALF, COMP_HALF), round: COMP_ROUND, angle: 0.0 };
        canvas.paint(&comp, 1.0, |p, d| {
            let q = p - c;
            // Recessed floor: occlusion along all walls, plus the top and left
            // walls' cast shadow (light from the top left).
            let occlusion = 0.8 + 0.2 * smoothstep(0.0, 0.025, -d);
            let cast = 0.78 + 0.22 * smoothstep(0.0, 0.03, (q.x + COMP_HALF).min(q.y + COMP_HALF));
            let grain = 1.0 + 0.04 * (value_noise(grain_seed, p.x * 70.0, p.y * 70.0) - 0.5);
            scale(FLOOR, occlusion * cast * grain)
        });
    }
    for item in &scene.items {
        let shape = item.shape();
        canvas.shadow(&shape, SHADOW_OFFSET, SHADOW_SOFTNESS, 0.45);
        canvas.paint(&shape, 1.0, |p, d| item.colour_at(p, d));
    }
    for overlay in &scene.overlays {
        canvas.paint(&overlay.shape, overlay.opacity, |p, _| {
            if overlay.mottled {
                scale(overlay.colour, 0.85 + 0.3 * value_noise(stain_seed, p.x * 160.0, p.y * 160.0))
            } else {
                overlay.colour
            }
        });
    }
    canvas.finish(scene.brightness, seed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn small(seed: u64) -> SynthConfig {
        SynthConfig {
            seed,
            image_size: 128,
            train: 3,
            validation: 2,
            test_good: 2,
            test_logical: 8,
            test_structural: 6,
        }
    }

    fn png_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .expect("read dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn all_files(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut out = BTreeMap::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).expect("read dir") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    let rel = path.strip_prefix(root).expect("prefix").to_path_buf();
                    out.insert(rel, fs::read(&path).expect("read file"));
                }
            }
        }
        out
    }

    #[test]
    fn writes_loco_layout_and_counts() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("synth");
        let config = small(7);
        let mut calls = 0;
        let report = generate(&config, &root, &mut || calls += 1).expect("generate");
        assert_eq!(calls, 21);
        assert_eq!(report.images, 21);

        for split in Split::ALL {
            let n = config.count(split);
            let expected: Vec<String> = (0..n).map(|i| format!("{i:03}.png")).collect();
            assert_eq!(png_names(&root.join(split.dir())), expected, "{}", split.dir());
            for name in &expected {
                let img = image::open(root.join(split.dir()).join(name)).expect("open image");
                assert_eq!((img.width(), img.height()), (128, 128));
                assert!(matches!(img, image::DynamicImage::ImageRgb8(_)));
            }
        }

        let specs: Vec<DefectSpec> = serde_json::from_slice(&fs::read(root.join("defects_config.json")).expect("read"))
            .expect("parse defects_config.json");
        let values: BTreeSet<u8> = specs.iter().map(|s| s.pixel_value).collect();
        assert_eq!(values.len(), specs.len(), "pixel values must be distinct");
        for spec in &specs {
            assert!(spec.saturation_threshold > 0.0);
            if spec.relative_saturation {
                assert!(spec.saturation_threshold <= 1.0);
            }
        }

        let saved: SynthConfig =
            serde_json::from_slice(&fs::read(root.join("synth.json")).expect("read")).expect("parse synth.json");
        assert_eq!(saved, config);

        let mut masks = 0;
        let mut names_seen = BTreeSet::new();
        for split in [Split::TestLogical, Split::TestStructural] {
            let mask_root = root.join(split.mask_dir().expect("mask dir"));
            let expected: Vec<String> = (0..config.count(split)).map(|i| format!("{i:03}")).collect();
            assert_eq!(png_names(&mask_root), expected);
            for folder in &expected {
                let files = png_names(&mask_root.join(folder));
                assert!(!files.is_empty(), "no mask for {folder}");
                for (n, file) in files.iter().enumerate() {
                    assert_eq!(file, &format!("{n:03}.png"));
                    let mask = image::open(mask_root.join(folder).join(file)).expect("open mask");
                    let image::DynamicImage::ImageLuma8(mask) = mask else {
                        panic!("mask is not 8-bit grey");
                    };
                    assert_eq!(mask.dimensions(), (128, 128));
                    let used: BTreeSet<u8> = mask.pixels().map(|p| p.0[0]).filter(|&v| v != 0).collect();
                    assert_eq!(used.len(), 1, "one defect type per mask file");
                    let value = *used.iter().next().expect("non-empty mask");
                    let spec = specs.iter().find(|s| s.pixel_value == value).expect("listed pixel value");
                    let kind = DefectKind::ALL.iter().find(|k| k.pixel_value() == value).expect("kind");
                    assert_eq!(kind.is_logical(), split == Split::TestLogical);
                    names_seen.insert(spec.defect_name.clone());
                    masks += 1;
                }
            }
        }
        assert_eq!(report.masks, masks);
        assert_eq!(report.defects.values().sum::<usize>(), masks);
        // 8 logical images cycle all four kinds, 6 structural all three.
        assert_eq!(names_seen.len(), 7, "{names_seen:?}");
    }

    #[test]
    fn same_config_same_bytes_and_images_independent() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let config =
            SynthConfig { train: 2, validation: 1, test_good: 1, test_logical: 4, test_structural: 3, ..small(3) };
        let a = tmp.path().join("a");
        let b = tmp.path().join("b");
        let c = tmp.path().join("c");
        generate(&config, &a, &mut || {}).expect("a");
        generate(&config, &b, &mut || {}).expect("b");
        let more = SynthConfig { train: 4, test_logical: 5, ..config.clone() };
        generate(&more, &c, &mut || {}).expect("c");
        let (fa, fb, fc) = (all_files(&a), all_files(&b), all_files(&c));
        assert_eq!(fa, fb);
        // A split's images do not depend on how many others are generated.
        for (path, bytes) in &fa {
            if path != Path::new("synth.json") {
                assert_eq!(fc.get(path), Some(bytes), "{}", path.display());
            }
        }
    }

    #[test]
    fn seeds_and_indices_differ() {
        let a = render_sample(&small(1), Split::Train, 0).expect("a").image;
        let b = render_sample(&small(2), Split::Train, 0).expect("b").image;
        let c = render_sample(&small(1), Split::Train, 1).expect("c").image;
        let d = render_sample(&small(1), Split::Validation, 0).expect("d").image;
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
    }

    #[test]
    fn invalid_config_rejected() {
        for bad in [
            SynthConfig { image_size: 64, ..small(0) },
            SynthConfig { image_size: 1024, ..small(0) },
            SynthConfig { train: 0, ..small(0) },
            SynthConfig { test_logical: MAX_SPLIT_COUNT + 1, ..small(0) },
        ] {
            let tmp = tempfile::tempdir().expect("tempdir");
            let err = generate(&bad, tmp.path(), &mut || {}).expect_err("must reject");
            assert!(matches!(err, SynthError::InvalidConfig(_)), "{err}");
            assert_eq!(fs::read_dir(tmp.path()).expect("read").count(), 0, "nothing written");
        }
        assert!(SynthConfig { image_size: 512, ..small(0) }.validate().is_ok());
        assert!(SynthConfig::default().validate().is_ok());

        let tmp = tempfile::tempdir().expect("tempdir");
        fs::write(tmp.path().join("old.txt"), "x").expect("write");
        let err = generate(&small(0), tmp.path(), &mut || {}).expect_err("must refuse");
        assert!(matches!(err, SynthError::OutputNotEmpty { .. }), "{err}");
        assert!(err.to_string().contains(&tmp.path().display().to_string()));
    }

    #[test]
    fn normal_scenes_obey_the_rules() {
        for split in [Split::Train, Split::Validation, Split::TestGood] {
            for index in 0..40 {
                let built = build(11, split, index, 128);
                let scene = &built.scene;
                assert!(built.defects.is_empty());
                assert_eq!(scene.items.len(), 4);
                for (slot, item) in scene.items.iter().enumerate() {
                    assert_eq!(item.kind, SLOT_KINDS[slot]);
                    let off = item.centre - comp_centre(scene.tray_centre, slot);
                    assert!(off.x.abs() <= POS_JITTER && off.y.abs() <= POS_JITTER);
                }
                let (cap, ring) = (scene.items[CAP_SLOT].colour, scene.items[RING_SLOT].colour);
                assert!(colour_distance(cap, ring) < 0.05, "pair must match");
                assert!(colour_distance(cap, PALETTE[scene.pair]) < 0.05);
            }
        }
    }

    #[test]
    fn logical_anomalies_use_normal_parts() {
        for index in 0..40 {
            let built = build(5, Split::TestLogical, index, 128);
            let scene = &built.scene;
            let kind = built.defects[0].0;
            for item in &scene.items {
                let c = item.colour;
                let normal_colour = match item.kind {
                    ItemKind::Cap | ItemKind::Ring => PALETTE.iter().any(|p| colour_distance(c, *p) < 0.05),
                    ItemKind::Block => colour_distance(c, BLOCK_COLOUR) < 0.06,
                    ItemKind::Bar => colour_distance(c, BAR_COLOUR) < 0.06,
                };
                assert!(normal_colour, "{kind:?}: abnormal colour on a part");
                assert!(item.bite.is_none() && scene.overlays.is_empty());
            }
            let expected_items = match kind {
                DefectKind::MissingItem => 3,
                DefectKind::ExtraItem => 5,
                _ => 4,
            };
            assert_eq!(scene.items.len(), expected_items, "{kind:?}");
            if kind == DefectKind::ColourMismatch {
                let (cap, ring) = (scene.items[CAP_SLOT].colour, scene.items[RING_SLOT].colour);
                assert!(colour_distance(cap, ring) > 0.3);
            }
        }
    }

    fn dilate(mask: &GrayImage, radius: i64) -> Vec<bool> {
        let size = mask.width() as i64;
        let mut out = vec![false; (size * size) as usize];
        for (x, y, p) in mask.enumerate_pixels() {
            if p.0[0] == 0 {
                continue;
            }
            for dy in -radius..=radius {
                for dx in -radius..=radius {
                    let (nx, ny) = (x as i64 + dx, y as i64 + dy);
                    if (0..size).contains(&nx) && (0..size).contains(&ny) {
                        out[(ny * size + nx) as usize] = true;
                    }
                }
            }
        }
        out
    }

    /// Each mask covers the pixels that differ from the normal counterpart
    /// (same noise, lighting and placement), up to shadows and edge
    /// anti-aliasing, and a good share of the mask really is changed.
    #[test]
    fn masks_lie_where_the_image_differs() {
        let size = 128;
        for split in [Split::TestLogical, Split::TestStructural] {
            for index in 0..24 {
                let built = build(21, split, index, size);
                let sample = built.render(size);
                let normal = render_scene(&built.normal, size);
                let changed: Vec<bool> = sample
                    .image
                    .pixels()
                    .zip(normal.pixels())
                    .map(|(a, b)| (0..3).any(|c| (a.0[c] as i32 - b.0[c] as i32).abs() > 12))
                    .collect();
                let mut union = GrayImage::new(size, size);
                for defect in &sample.defects {
                    let inside: Vec<bool> = defect.mask.pixels().map(|p| p.0[0] > 0).collect();
                    let area = inside.iter().filter(|&&v| v).count();
                    let hit = inside.iter().zip(&changed).filter(|(m, c)| **m && **c).count();
                    assert!(area > 20, "{:?} #{index}: tiny mask ({area} px)", defect.kind);
                    assert!(
                        hit as f32 >= 0.25 * area as f32,
                        "{:?} #{index}: only {hit} of {area} mask px changed",
                        defect.kind
                    );
                    for (u, m) in union.pixels_mut().zip(defect.mask.pixels()) {
                        u.0[0] = u.0[0].max(m.0[0]);
                    }
                }
                // Shadows reach ~0.03 of the side beyond a part.
                let near = dilate(&union, (0.035 * size as f32).ceil() as i64);
                let stray = changed.iter().zip(&near).filter(|(c, n)| **c && !**n).count();
                assert_eq!(stray, 0, "{split:?} #{index}: {stray} changed px outside the masks");
            }
        }
    }

    #[test]
    fn thresholds_scale_with_size() {
        let small_area = smallest_part_area(128) as f64;
        let big_area = smallest_part_area(256) as f64;
        assert!((big_area / small_area - 4.0).abs() < 0.01, "{small_area} {big_area}");
        let spec = defect_specs(256);
        let missing = spec.iter().find(|s| s.defect_name == "missing_item").expect("missing_item");
        assert!(!missing.relative_saturation);
        assert_eq!(missing.saturation_threshold, big_area);
    }
}
