//! The normal scene (a tray of four compartments on a conveyor belt, see the module docs of
//! [`super`]), how one image's scene is built from its seed, and how it is rendered.

use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::defects::{apply_logical, apply_structural};
use super::raster::*;
use super::{Defect, DefectKind, Sample, Split, PALETTE};

// ---------------------------------------------------------------------------
// Scene layout (units of the image side).

pub(super) const TRAY_HALF: f32 = 0.45;
pub(super) const TRAY_ROUND: f32 = 0.035;
pub(super) const TRAY_JITTER: f32 = 0.01;
pub(super) const WALL: f32 = 0.028;
pub(super) const DIVIDER: f32 = 0.03;
pub(super) const COMP_HALF: f32 = (2.0 * TRAY_HALF - 2.0 * WALL - DIVIDER) / 4.0;
pub(super) const COMP_ROUND: f32 = 0.02;
/// Normal placement tolerance; misplacements move parts ~6x further.
pub(super) const POS_JITTER: f32 = 0.015;
pub(super) const ANGLE_JITTER: f32 = 0.06;
/// Clearance kept between a part pushed into a corner and the walls.
pub(super) const CORNER_CLEARANCE: f32 = 0.012;

pub(super) const CAP_R: f32 = 0.095;
pub(super) const BLOCK_HALF: f32 = 0.09;
pub(super) const BLOCK_ROUND: f32 = 0.012;
pub(super) const BAR_HALF: V2 = v2(0.13, 0.042);
pub(super) const BAR_ROUND: f32 = 0.02;
pub(super) const RING_R: f32 = 0.10;
pub(super) const RING_IN: f32 = 0.05;

pub(super) const BELT: [f32; 3] = [0.15, 0.155, 0.165];
pub(super) const TRAY: [f32; 3] = [0.30, 0.34, 0.40];
pub(super) const FLOOR: [f32; 3] = [0.24, 0.27, 0.32];
pub(super) const BLOCK_COLOUR: [f32; 3] = [0.86, 0.80, 0.66];
pub(super) const BAR_COLOUR: [f32; 3] = [0.66, 0.69, 0.73];
/// Off colours that never occur on a normal part: oil, rust, mould, dust.
pub(super) const CONTAMINANTS: [[f32; 3]; 4] =
    [[0.06, 0.05, 0.04], [0.60, 0.32, 0.10], [0.32, 0.62, 0.20], [0.88, 0.87, 0.82]];

pub(super) const SHADOW_OFFSET: V2 = v2(0.010, 0.012);
pub(super) const SHADOW_SOFTNESS: f32 = 0.012;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ItemKind {
    Cap,
    Block,
    Bar,
    Ring,
}

/// Compartment kinds in row-major order: cap and ring sit on a diagonal so the
/// pairing rule links parts that are far apart in the image.
pub(super) const SLOT_KINDS: [ItemKind; 4] = [ItemKind::Cap, ItemKind::Block, ItemKind::Bar, ItemKind::Ring];
pub(super) const CAP_SLOT: usize = 0;
pub(super) const RING_SLOT: usize = 3;

impl ItemKind {
    /// Half extents of the axis-aligned box holding the part, including its
    /// largest normal rotation.
    pub(super) fn half_extent(self) -> V2 {
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
pub(super) struct Item {
    pub(super) kind: ItemKind,
    pub(super) centre: V2,
    pub(super) angle: f32,
    pub(super) colour: [f32; 3],
    pub(super) bite: Option<Shape>,
}

impl Item {
    /// The intact part.
    pub(super) fn body(&self) -> Shape {
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
    pub(super) fn footprint(&self) -> Shape {
        match self.kind {
            ItemKind::Ring => Shape::Circle { c: self.centre, r: RING_R },
            _ => self.body(),
        }
    }

    /// The part as drawn, with a broken-off chunk if any.
    pub(super) fn shape(&self) -> Shape {
        match &self.bite {
            Some(bite) => Shape::Subtract(Box::new(self.body()), Box::new(bite.clone())),
            None => self.body(),
        }
    }

    /// Surface colour with simple moulded-part shading, lit from the top left.
    pub(super) fn colour_at(&self, p: V2, d: f32) -> [f32; 3] {
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

pub(super) fn comp_centre(tray: V2, slot: usize) -> V2 {
    let step = COMP_HALF + 0.5 * DIVIDER;
    let sx = [-1.0, 1.0][slot % 2];
    let sy = [-1.0, 1.0][slot / 2];
    tray + v2(sx * step, sy * step)
}

pub(super) fn random_sign(rng: &mut ChaCha8Rng) -> f32 {
    if rng.gen_bool(0.5) {
        1.0
    } else {
        -1.0
    }
}

/// Offset from a compartment centre that pushes a part of `kind` into a
/// random corner while keeping it inside the compartment.
pub(super) fn corner_offset(kind: ItemKind, rng: &mut ChaCha8Rng) -> V2 {
    let e = kind.half_extent();
    let sx = random_sign(rng);
    let sy = random_sign(rng);
    v2(sx * (COMP_HALF - e.x - CORNER_CLEARANCE).max(0.0), sy * (COMP_HALF - e.y - CORNER_CLEARANCE).max(0.0))
}

/// Area of the smallest part's footprint in pixels at `size` (analytic, so
/// it does not wobble with the pixel grid).
pub(super) fn smallest_part_area(size: u32) -> usize {
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
pub(super) struct Overlay {
    pub(super) shape: Shape,
    pub(super) colour: [f32; 3],
    pub(super) opacity: f32,
    /// Mottled rather than uniform (stains).
    pub(super) mottled: bool,
}

#[derive(Debug, Clone)]
pub(super) struct Scene {
    pub(super) noise_seed: u64,
    pub(super) brightness: f32,
    pub(super) tray_centre: V2,
    /// Palette index of the cap/ring pair.
    pub(super) pair: usize,
    /// Drawn in order; the four residents come first, in slot order.
    pub(super) items: Vec<Item>,
    pub(super) overlays: Vec<Overlay>,
}

pub(super) fn pair_colour(pair: usize, rng: &mut ChaCha8Rng) -> [f32; 3] {
    // A couple of percent of shade jitter: parts from one colour batch are
    // never exactly identical, but stay unmistakably the same colour.
    scale(PALETTE[pair], rng.gen_range(0.98..1.02))
}

pub(super) fn part_colour(kind: ItemKind, pair: usize, rng: &mut ChaCha8Rng) -> [f32; 3] {
    match kind {
        ItemKind::Cap | ItemKind::Ring => pair_colour(pair, rng),
        ItemKind::Block => scale(BLOCK_COLOUR, rng.gen_range(0.97..1.03)),
        ItemKind::Bar => scale(BAR_COLOUR, rng.gen_range(0.97..1.03)),
    }
}

pub(super) fn jitter(rng: &mut ChaCha8Rng, amount: f32) -> V2 {
    v2(rng.gen_range(-amount..amount), rng.gen_range(-amount..amount))
}

pub(super) fn normal_scene(rng: &mut ChaCha8Rng) -> Scene {
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

/// A scene, its normal counterpart (same noise, lighting and placement), and
/// the annotated defect regions.
pub(super) struct Built {
    // Only the tests render it, to check masks against pixel differences.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(super) normal: Scene,
    pub(super) scene: Scene,
    pub(super) defects: Vec<(DefectKind, Shape)>,
}

pub(super) fn image_rng(seed: u64, split: Split, index: usize) -> ChaCha8Rng {
    let h = splitmix64(splitmix64(splitmix64(seed) ^ split.seed_tag()) ^ index as u64);
    ChaCha8Rng::seed_from_u64(h)
}

pub(super) fn build(seed: u64, split: Split, index: usize, size: u32) -> Built {
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
    pub(super) fn render(&self, size: u32) -> Sample {
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

pub(super) fn render_scene(scene: &Scene, size: u32) -> RgbImage {
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
