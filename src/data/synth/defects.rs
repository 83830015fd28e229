//! The anomalies: each edits a normal scene into an anomalous one and returns the shape of its
//! ground-truth region (see the module docs of [`super`] for the kinds and their masks).

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::raster::*;
use super::scene::*;
use super::{DefectKind, PALETTE};

/// Turns a normal scene into a logical anomaly; returns the annotated region.
pub(super) fn apply_logical(scene: &mut Scene, kind: DefectKind, rng: &mut ChaCha8Rng) -> Shape {
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
pub(super) fn apply_structural(
    scene: &mut Scene,
    kind: DefectKind,
    slot: usize,
    size: u32,
    rng: &mut ChaCha8Rng,
) -> Shape {
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
