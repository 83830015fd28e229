//! Evaluation on a MVTec LOCO test set: image AUROC and pixel AU-sPRO (up to a false-positive rate of
//! 0.05), separately for logical and structural anomalies and their mean. A split without images is
//! `None` (printed as null), not an error: our data has no structural anomalies for some categories.
//!
//! This module scores images with a model and gathers the report; [`metrics`] computes image AUROC and
//! AU-sPRO from scores, maps and ground truth; [`heatmap`] draws maps over their images (`predict`, the
//! demo).

pub mod heatmap;
pub mod metrics;

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::data::loco::{LocoDataset, Split};
use crate::data::preprocess;
use crate::error::ImageError;
use crate::model::EfficientAd;
use metrics::DefectRegion;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    #[error(transparent)]
    Model(#[from] crate::error::WeightsError),
    #[error("{path}: anomalous test image has no ground-truth folder {expected}")]
    MissingGroundTruth { path: PathBuf, expected: PathBuf },
    #[error("the test set has no good images (test/good): AUROC and sPRO need them")]
    NoGoodImages,
    #[error("{path}: the model's anomaly map holds {count} non-finite values (NaN or infinity); check the model")]
    NonFiniteMap { path: PathBuf, count: usize },
}

#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Multiplies absolute saturation thresholds of `defects_config.json` (0.25 for half-size masks).
    pub saturation_scale: f64,
    pub max_fpr: f64,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions { saturation_scale: 1.0, max_fpr: 0.05 }
    }
}

/// Logical, structural and their mean; None where a split is empty.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ByAnomalyType {
    pub logical: Option<f64>,
    pub structural: Option<f64>,
    pub mean: Option<f64>,
}

impl ByAnomalyType {
    fn new(logical: Option<f64>, structural: Option<f64>) -> ByAnomalyType {
        let present: Vec<f64> = [logical, structural].into_iter().flatten().collect();
        let mean = (!present.is_empty()).then(|| present.iter().sum::<f64>() / present.len() as f64);
        ByAnomalyType { logical, structural, mean }
    }
}

/// Score of one test image.
#[derive(Debug, Clone, Serialize)]
pub struct ImageScore {
    pub path: PathBuf,
    pub split: &'static str,
    pub score: f32,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub image_auroc: ByAnomalyType,
    pub au_spro: ByAnomalyType,
    pub images: ImageCounts,
    #[serde(skip)]
    pub scores: Vec<ImageScore>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct ImageCounts {
    pub good: usize,
    pub logical: usize,
    pub structural: usize,
}

/// One scored image: its map at the original resolution.
pub struct ScoredImage {
    pub image: image::RgbImage,
    pub map: Vec<f32>,
    pub score: f32,
}

/// Scores one image file: anomaly map at the original size and its maximum.
pub fn score_image(model: &EfficientAd, path: &Path) -> Result<ScoredImage, EvalError> {
    let image = preprocess::load_image(path)?;
    let input = preprocess::to_input(&image, model.recipe.image_size as u32).unsqueeze(0).to_device(model.device());
    let map = model.anomaly_maps(&input, image.height() as i64, image.width() as i64)?;
    let map: Vec<f32> =
        Vec::try_from(map.flatten(0, -1).to_device(tch::Device::Cpu)).map_err(crate::error::WeightsError::from)?;
    let count = map.iter().filter(|value| !value.is_finite()).count();
    if count > 0 {
        // `f32::max` would skip NaN and score the image on what is left: no score beats a wrong one.
        return Err(EvalError::NonFiniteMap { path: path.to_path_buf(), count });
    }
    let score = map.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    Ok(ScoredImage { image, map, score })
}

/// Scores every test image and computes the metrics. `on_image(path, scored)` sees each image (progress,
/// heatmaps).
pub fn evaluate(
    model: &EfficientAd,
    dataset: &LocoDataset,
    options: &EvalOptions,
    on_image: &mut dyn FnMut(&Path, Split, &ScoredImage),
) -> Result<EvalReport, EvalError> {
    if dataset.test_good.is_empty() {
        return Err(EvalError::NoGoodImages);
    }
    let needs_defects = !dataset.test_logical.is_empty() || !dataset.test_structural.is_empty();
    let defects = if needs_defects { metrics::load_defects_config(&dataset.defects_config())? } else { Vec::new() };

    let mut scores = Vec::new();
    let mut good_maps = Vec::new();
    let mut good_scores = Vec::new();
    for path in &dataset.test_good {
        let scored = score_image(model, path)?;
        on_image(path, Split::TestGood, &scored);
        scores.push(ImageScore { path: path.clone(), split: "good", score: scored.score });
        good_scores.push(scored.score);
        good_maps.push(scored.map);
    }
    let good_refs: Vec<&[f32]> = good_maps.iter().map(Vec::as_slice).collect();

    let mut per_type = Vec::new();
    for split in [Split::TestLogical, Split::TestStructural] {
        let mut anomalous: Vec<(Vec<f32>, Vec<DefectRegion>)> = Vec::new();
        let mut anomaly_scores = Vec::new();
        for path in dataset.images(split) {
            let scored = score_image(model, path)?;
            on_image(path, split, &scored);
            let expected = dataset.ground_truth_dir(split, path).unwrap_or_default();
            if !expected.is_dir() {
                return Err(EvalError::MissingGroundTruth { path: path.clone(), expected });
            }
            let size = (scored.image.width(), scored.image.height());
            let regions = metrics::load_regions(&expected, &defects, options.saturation_scale, size)?;
            scores.push(ImageScore {
                path: path.clone(),
                split: split.anomaly_type().unwrap_or(""),
                score: scored.score,
            });
            anomaly_scores.push(scored.score);
            anomalous.push((scored.map, regions));
        }
        let auroc = metrics::auroc(&good_scores, &anomaly_scores);
        let pairs: Vec<(&[f32], &[DefectRegion])> =
            anomalous.iter().map(|(map, regions)| (map.as_slice(), regions.as_slice())).collect();
        let spro = if pairs.is_empty() { None } else { metrics::au_spro(&good_refs, &pairs, options.max_fpr) };
        per_type.push((auroc, spro));
    }
    let (logical, structural) = (per_type[0], per_type[1]);
    Ok(EvalReport {
        image_auroc: ByAnomalyType::new(logical.0, structural.0),
        au_spro: ByAnomalyType::new(logical.1, structural.1),
        images: ImageCounts {
            good: dataset.test_good.len(),
            logical: dataset.test_logical.len(),
            structural: dataset.test_structural.len(),
        },
        scores,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_skips_missing_splits() {
        assert_eq!(ByAnomalyType::new(Some(0.8), None).mean, Some(0.8));
        assert_eq!(ByAnomalyType::new(Some(0.8), Some(0.6)).mean, Some(0.7));
        assert_eq!(ByAnomalyType::new(None, None).mean, None);
        let json = serde_json::to_string(&ByAnomalyType::new(Some(1.0), None)).unwrap();
        assert_eq!(json, r#"{"logical":1.0,"structural":null,"mean":1.0}"#);
    }
}
