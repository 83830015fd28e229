//! The promotion gate: a retrained candidate replaces the serving model only if, on images neither has
//! trained on, it raises no more false alarms at the line's threshold, catches no fewer known defects
//! (when a folder of them is configured), and is better at something: fewer false alarms, or more
//! headroom between normal frames and the threshold.

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::model::EfficientAd;
use crate::service::metrics::GateOutcome;

/// What the gate measured of one model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    /// Share of the normal evaluation images scoring above the threshold.
    pub false_positive_rate: f64,
    /// 95th percentile of the normal images' scores.
    pub p95_normal_score: f32,
    /// Share of the known defects scoring above the threshold, when a defect folder is configured.
    pub recall: Option<f64>,
    /// Whether every score was a number (a poisoned model can produce NaN).
    pub finite: bool,
    /// Of the normal evaluation images this model scores below the threshold, the share it flags once a
    /// synthetic foreign object is painted on them ([`foreign_objects`]); None when it flags them all.
    /// Known defects or not, a candidate that learnt to overlook what does not belong shows here.
    #[serde(default)]
    pub synthetic_recall: Option<f64>,
    /// How many images `synthetic_recall` was measured on.
    #[serde(default)]
    pub synthetic_images: usize,
    /// Median over all evaluation images of (painted score − clean score) / threshold: how much a
    /// foreign object raises the score, whatever the threshold; None when a score was not finite.
    #[serde(default)]
    pub synthetic_contrast: Option<f32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Tolerances {
    pub false_positive_rate: f64,
    pub recall: f64,
    /// 1 (or more): synthetic recall is measured and logged, not enforced.
    pub synthetic_recall: f64,
}

/// The gate's verdict with both readings, kept beside every promoted version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateReport {
    pub outcome: GateOutcome,
    pub threshold: f32,
    pub normal_images: usize,
    pub defect_images: usize,
    pub current_version: u64,
    pub current: Reading,
    pub candidate: Reading,
}

impl GateReport {
    /// One line for logs and `lineguard model list`.
    pub fn summary(&self) -> String {
        let recall = match (self.current.recall, self.candidate.recall) {
            (Some(a), Some(b)) => format!(", recall {:.3} → {:.3} on {} defects", a, b, self.defect_images),
            _ => String::new(),
        };
        let synthetic = match (self.current.synthetic_recall, self.candidate.synthetic_recall) {
            (Some(a), Some(b)) => format!(
                ", synthetic recall {:.3} → {:.3} on {} → {} painted images, contrast {:.3} → {:.3}",
                a,
                b,
                self.current.synthetic_images,
                self.candidate.synthetic_images,
                self.current.synthetic_contrast.unwrap_or(f32::NAN),
                self.candidate.synthetic_contrast.unwrap_or(f32::NAN)
            ),
            _ => String::new(),
        };
        format!(
            "{} vs v{}: false positives {:.3} → {:.3}, p95 normal score {:.3} → {:.3} on {} normal images{recall}{synthetic}",
            self.outcome.labels().1,
            self.current_version,
            self.current.false_positive_rate,
            self.candidate.false_positive_rate,
            self.current.p95_normal_score,
            self.candidate.p95_normal_score,
            self.normal_images,
        )
    }
}

/// Image scores (maximum of the anomaly map), in chunks to bound memory.
pub fn image_scores(model: &EfficientAd, images: &Tensor) -> Vec<f32> {
    let side = model.recipe.image_size;
    let count = images.size().first().copied().unwrap_or(0);
    let mut scores = Vec::with_capacity(count as usize);
    for start in (0..count).step_by(8) {
        let chunk = images.narrow(0, start, 8.min(count - start)).to_device(model.device());
        let maps = match model.anomaly_maps(&chunk, side, side) {
            Ok(maps) => maps,
            // Only uncalibrated models fail here; gated models are calibrated first.
            Err(_) => return vec![f32::NAN; count as usize],
        };
        let maxima = maps.flatten(1, -1).amax([1], false).to_device(tch::Device::Cpu);
        scores.extend(Vec::<f32>::try_from(maxima).unwrap_or_else(|_| vec![f32::NAN; chunk.size()[0] as usize]));
    }
    scores
}

/// `synthetic` holds `normal` with a foreign object painted on each image, in the same order.
pub fn read(
    model: &EfficientAd,
    normal: &Tensor,
    synthetic: &Tensor,
    defects: Option<&Tensor>,
    threshold: f32,
) -> Reading {
    let normal_scores = image_scores(model, normal);
    let synthetic_scores = image_scores(model, synthetic);
    let defect_scores = defects.map(|d| image_scores(model, d));
    let finite =
        normal_scores.iter().chain(&synthetic_scores).chain(defect_scores.iter().flatten()).all(|s| s.is_finite());
    let above = |scores: &[f32]| scores.iter().filter(|s| **s > threshold).count() as f64 / scores.len().max(1) as f64;
    // Only frames the model calls normal can show whether a defect changes its mind: under drift the
    // serving model flags clean frames too, and those would count as caught for the wrong reason.
    let painted: Vec<f32> = normal_scores
        .iter()
        .zip(&synthetic_scores)
        .filter(|(clean, _)| **clean <= threshold)
        .map(|(_, d)| *d)
        .collect();
    Reading {
        false_positive_rate: above(&normal_scores),
        p95_normal_score: percentile(&normal_scores, 0.95),
        recall: defect_scores.as_deref().map(above),
        finite,
        synthetic_recall: (!painted.is_empty()).then(|| above(&painted)),
        synthetic_images: painted.len(),
        synthetic_contrast: {
            let rises: Vec<f32> =
                normal_scores.iter().zip(&synthetic_scores).map(|(clean, d)| (d - clean) / threshold).collect();
            Some(percentile(&rises, 0.5)).filter(|c| c.is_finite())
        },
    }
}

/// Foreign objects on normal frames: on each image an ellipse of one random colour covering about 3–10%
/// of it, at a random place, seeded per image so that both models of a gate see the same ones. What a
/// line's defects look like is unknown to the trainer; something lying where nothing should is the
/// simplest defect every line has, and a model poisoned into calling anything normal stops seeing it.
pub fn foreign_objects(images: &Tensor, seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let size = images.size();
    let (count, height, width) = (size[0], size[2], size[3]);
    let options = (tch::Kind::Float, images.device());
    let rows = Tensor::arange(height, options).view([height, 1]);
    let columns = Tensor::arange(width, options).view([1, width]);
    let mut painted = Vec::with_capacity(count as usize);
    for index in 0..count {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let radius_y = rng.gen_range(0.10..0.18) * height as f64;
        let radius_x = rng.gen_range(0.10..0.18) * width as f64;
        let centre_y = rng.gen_range(radius_y..height as f64 - radius_y);
        let centre_x = rng.gen_range(radius_x..width as f64 - radius_x);
        let inside = ((&rows - centre_y) / radius_y).square() + ((&columns - centre_x) / radius_x).square();
        let mask = inside.le(1.0).to_kind(tch::Kind::Float).view([1, height, width]);
        // A saturated colour: one channel full, one empty, one anywhere.
        let mut rgb = [1.0f32, 0.0, rng.gen_range(0.0..1.0)];
        rgb.rotate_left(rng.gen_range(0..3));
        let colour: Vec<f32> = (0..3)
            .map(|c| (rgb[c] - crate::data::preprocess::IMAGENET_MEAN[c]) / crate::data::preprocess::IMAGENET_STD[c])
            .collect();
        let colour = Tensor::from_slice(&colour).to_device(images.device()).view([3, 1, 1]);
        let image = images.get(index);
        painted.push(&image * (1.0 - &mask) + colour * &mask);
    }
    Tensor::stack(&painted, 0)
}

/// The rules above, in order; `threshold` scales what counts as more headroom (1% of it).
pub fn decide(current: &Reading, candidate: &Reading, tolerances: Tolerances, threshold: f32) -> GateOutcome {
    const EPSILON: f64 = 1e-9;
    if !candidate.finite {
        return GateOutcome::RejectedNonFinite;
    }
    if candidate.false_positive_rate > current.false_positive_rate + tolerances.false_positive_rate + EPSILON {
        return GateOutcome::RejectedFalsePositives;
    }
    if let (Some(now), Some(then)) = (current.recall, candidate.recall) {
        if then < now - tolerances.recall - EPSILON {
            return GateOutcome::RejectedRecall;
        }
    }
    if let (Some(now), Some(then)) = (current.synthetic_recall, candidate.synthetic_recall) {
        if then < now - tolerances.synthetic_recall - EPSILON {
            return GateOutcome::RejectedSyntheticRecall;
        }
    }
    let fewer_false_alarms = candidate.false_positive_rate < current.false_positive_rate - EPSILON;
    if fewer_false_alarms || more_headroom(current, candidate, threshold) || !current.finite {
        GateOutcome::Promoted
    } else {
        GateOutcome::RejectedNoImprovement
    }
}

/// Whether the candidate's normal scores lie lower than the current model's: its p95 by more than 1% of
/// the threshold, so that rounding noise is not an improvement.
pub fn more_headroom(current: &Reading, candidate: &Reading, threshold: f32) -> bool {
    candidate.p95_normal_score < current.p95_normal_score - 0.01 * threshold
}

/// Nearest-rank percentile; NaN for no values.
fn percentile(values: &[f32], q: f64) -> f32 {
    let mut sorted: Vec<f32> = values.to_vec();
    sorted.sort_by(f32::total_cmp);
    if sorted.is_empty() {
        return f32::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(fpr: f64, p95: f32, recall: Option<f64>) -> Reading {
        Reading {
            false_positive_rate: fpr,
            p95_normal_score: p95,
            recall,
            finite: true,
            synthetic_recall: None,
            synthetic_images: 0,
            synthetic_contrast: None,
        }
    }

    const STRICT: Tolerances = Tolerances { false_positive_rate: 0.0, recall: 0.0, synthetic_recall: 0.0 };

    #[test]
    fn the_gate_promotes_only_improvements_without_regressions() {
        let current = reading(0.2, 0.45, Some(0.8));
        let decide = |candidate: Reading| decide(&current, &candidate, STRICT, 0.5);
        assert_eq!(decide(reading(0.1, 0.45, Some(0.8))), GateOutcome::Promoted, "fewer false alarms");
        assert_eq!(decide(reading(0.2, 0.40, Some(0.9))), GateOutcome::Promoted, "more headroom");
        assert_eq!(decide(reading(0.2, 0.449, Some(0.8))), GateOutcome::RejectedNoImprovement, "within noise");
        assert_eq!(decide(reading(0.3, 0.10, Some(0.8))), GateOutcome::RejectedFalsePositives);
        // Poisoning: trained on defects, the candidate calls everything normal, defects included.
        assert_eq!(decide(reading(0.0, 0.10, Some(0.5))), GateOutcome::RejectedRecall);
        let nan = Reading { finite: false, ..reading(0.0, 0.1, None) };
        assert_eq!(decide(nan), GateOutcome::RejectedNonFinite);
        let tolerant = Tolerances { false_positive_rate: 0.15, ..STRICT };
        assert_eq!(
            super::decide(&current, &reading(0.3, 0.30, Some(0.8)), tolerant, 0.5),
            GateOutcome::Promoted,
            "within the configured tolerance"
        );
    }

    #[test]
    fn synthetic_recall_is_enforced_up_to_its_tolerance() {
        let with_synthetic =
            |fpr: f64, recall: f64| Reading { synthetic_recall: Some(recall), ..reading(fpr, 0.45, None) };
        let (current, candidate) = (with_synthetic(0.2, 1.0), with_synthetic(0.0, 0.125));
        let off = Tolerances { synthetic_recall: 1.0, ..STRICT };
        assert_eq!(decide(&current, &candidate, off, 0.5), GateOutcome::Promoted, "measured, not enforced");
        let guarded = Tolerances { synthetic_recall: 0.25, ..STRICT };
        assert_eq!(decide(&current, &candidate, guarded, 0.5), GateOutcome::RejectedSyntheticRecall);
        assert_eq!(decide(&current, &with_synthetic(0.0, 0.8), guarded, 0.5), GateOutcome::Promoted, "within it");
    }

    #[test]
    fn foreign_objects_change_a_few_percent_of_each_image_the_same_way_for_the_same_seed() {
        let images = Tensor::zeros([3, 3, 64, 64], (tch::Kind::Float, tch::Device::Cpu));
        let painted = foreign_objects(&images, 7);
        assert_eq!(painted.size(), images.size());
        for index in 0..3 {
            let changed = painted.get(index).ne_tensor(&images.get(index)).any_dim(0, false);
            let share = changed.to_kind(tch::Kind::Float).mean(tch::Kind::Float).double_value(&[]);
            assert!((0.02..0.12).contains(&share), "image {index}: {share}");
        }
        assert!(painted.equal(&foreign_objects(&images, 7)), "both models of a gate see the same objects");
        assert!(!painted.equal(&foreign_objects(&images, 8)));
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let values: Vec<f32> = (1..=20).map(|v| v as f32).collect();
        assert_eq!(percentile(&values, 0.95), 19.0);
        assert_eq!(percentile(&values[..1], 0.95), 1.0);
        assert!(percentile(&[], 0.95).is_nan());
    }
}
