//! Evaluation metrics of MVTec LOCO AD: image-level AUROC and pixel-level AU-sPRO
//! (area under the saturated per-region overlap curve), plus the loaders for the
//! dataset's `defects_config.json` and `ground_truth/<type>/<NNN>/*.png` masks.
//!
//! Both metrics are computed exactly rather than on a threshold grid: AUROC by
//! Mann–Whitney counting, AU-sPRO by sweeping every distinct score, so results do not
//! depend on how finely thresholds are sampled.
//!
//! Score ordering: scores are compared as real numbers (-0.0 ties with 0.0); NaN is
//! ranked above +inf so that every input has a defined, deterministic result.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Errors from loading the defects config or ground-truth masks. Every variant names the
/// file (or folder) it is about, so a message is actionable without a backtrace.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: invalid defects config JSON: {source}", path.display())]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{}: {reason}", path.display())]
    InvalidConfig { path: PathBuf, reason: String },
    #[error("{}: cannot decode mask: {source}", path.display())]
    Image { path: PathBuf, source: image::ImageError },
    #[error("{}: mask must be 8-bit grayscale, found {color}", path.display())]
    NotGrayscale { path: PathBuf, color: String },
    #[error(
        "{}: mask is {mask_width}x{mask_height} but the image is {image_width}x{image_height}",
        path.display()
    )]
    SizeMismatch { path: PathBuf, mask_width: u32, mask_height: u32, image_width: u32, image_height: u32 },
    #[error("{}: pixel value {value} is not listed in the defects config", path.display())]
    UnknownPixelValue { path: PathBuf, value: u8 },
    #[error(
        "{}: mask has several non-zero pixel values {values:?}; expected one defect type per file",
        path.display()
    )]
    MixedPixelValues { path: PathBuf, values: Vec<u8> },
    #[error("{}: no PNG masks in this ground-truth folder", dir.display())]
    NoMasks { dir: PathBuf },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

/// One entry of MVTec LOCO's `defects_config.json`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct DefectType {
    pub defect_name: String,
    pub pixel_value: u8,
    pub saturation_threshold: f64,
    pub relative_saturation: bool,
}

/// Reads and validates `defects_config.json` (a JSON array of [`DefectType`]).
///
/// Rejected: pixel value 0 (it is the background value of the masks), duplicate pixel
/// values (a mask value must name exactly one defect type) and thresholds that are not
/// finite and positive (a zero saturation area would divide by zero in sPRO).
pub fn load_defects_config(path: &Path) -> Result<Vec<DefectType>, MetricsError> {
    let text = std::fs::read_to_string(path).map_err(|source| MetricsError::Io { path: path.to_path_buf(), source })?;
    let defects: Vec<DefectType> =
        serde_json::from_str(&text).map_err(|source| MetricsError::Json { path: path.to_path_buf(), source })?;
    let invalid = |reason: String| MetricsError::InvalidConfig { path: path.to_path_buf(), reason };
    let mut seen: HashMap<u8, &str> = HashMap::new();
    for d in &defects {
        if d.pixel_value == 0 {
            return Err(invalid(format!(
                "defect \"{}\" has pixel_value 0, which is the background value",
                d.defect_name
            )));
        }
        if !(d.saturation_threshold.is_finite() && d.saturation_threshold > 0.0) {
            return Err(invalid(format!(
                "defect \"{}\" has saturation_threshold {}, expected a finite number > 0",
                d.defect_name, d.saturation_threshold
            )));
        }
        if let Some(other) = seen.insert(d.pixel_value, &d.defect_name) {
            return Err(invalid(format!(
                "pixel_value {} is used by both \"{}\" and \"{}\"",
                d.pixel_value, other, d.defect_name
            )));
        }
    }
    Ok(defects)
}

/// One defect region of one anomalous image: pixel indices (row-major into the
/// width*height map) and its saturation area in pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct DefectRegion {
    pub pixels: Vec<u32>,
    pub saturation: f64,
}

/// All regions of one anomalous test image, read from `ground_truth/<type>/<NNN>/*.png`.
///
/// Every `*.png` in `mask_dir` (sorted by name, other files ignored) is one region made
/// of all its non-zero pixels; that non-zero value selects the [`DefectType`]. Saturation:
/// relative types use `saturation_threshold * area`; absolute types use
/// `min(saturation_threshold * saturation_scale, area)`, where `saturation_scale` converts
/// the config's pixel counts (given at the original resolution) to the mask resolution,
/// e.g. 0.25 for half-resolution masks.
///
/// `expected_size` is `(width, height)` of the anomaly map. An all-zero mask yields no
/// region: downscaled masks can lose a thin defect entirely, and an empty region could
/// never be found, which would unfairly lower sPRO.
pub fn load_regions(
    mask_dir: &Path,
    defects: &[DefectType],
    saturation_scale: f64,
    expected_size: (u32, u32),
) -> Result<Vec<DefectRegion>, MetricsError> {
    if !(saturation_scale.is_finite() && saturation_scale > 0.0) {
        return Err(MetricsError::InvalidArgument(format!(
            "saturation_scale must be a finite number > 0, got {saturation_scale}"
        )));
    }
    let (width, height) = expected_size;
    // Pixel indices are stored as u32 to halve memory on large test sets.
    if u64::from(width) * u64::from(height) > u64::from(u32::MAX) {
        return Err(MetricsError::InvalidArgument(format!(
            "image size {width}x{height} has too many pixels for u32 indices"
        )));
    }

    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| MetricsError::Io { path, source }
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(mask_dir).map_err(io_err(mask_dir))? {
        let path = entry.map_err(io_err(mask_dir))?.path();
        let is_png = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("png"));
        if is_png && path.is_file() {
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(MetricsError::NoMasks { dir: mask_dir.to_path_buf() });
    }
    // read_dir order is filesystem-dependent; sorting keeps region order reproducible.
    files.sort();

    let mut regions = Vec::with_capacity(files.len());
    for path in files {
        let bytes = std::fs::read(&path).map_err(io_err(&path))?;
        let decoded = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
            .map_err(|source| MetricsError::Image { path: path.clone(), source })?;
        if (decoded.width(), decoded.height()) != expected_size {
            return Err(MetricsError::SizeMismatch {
                path,
                mask_width: decoded.width(),
                mask_height: decoded.height(),
                image_width: width,
                image_height: height,
            });
        }
        // Converting colour or 16-bit masks would change the pixel values that name
        // the defect type, so only genuine 8-bit grayscale is accepted.
        let image::DynamicImage::ImageLuma8(gray) = decoded else {
            return Err(MetricsError::NotGrayscale { color: format!("{:?}", decoded.color()), path });
        };

        let mut present = [false; 256];
        let mut pixels = Vec::new();
        for (i, &v) in gray.as_raw().iter().enumerate() {
            if v != 0 {
                present[usize::from(v)] = true;
                // Cannot truncate: width*height <= u32::MAX was checked above.
                pixels.push(i as u32);
            }
        }
        let values: Vec<u8> = (1..=255u8).filter(|&v| present[usize::from(v)]).collect();
        let value = match values.as_slice() {
            [] => continue,
            [v] => *v,
            _ => return Err(MetricsError::MixedPixelValues { path, values }),
        };
        let Some(defect) = defects.iter().find(|d| d.pixel_value == value) else {
            return Err(MetricsError::UnknownPixelValue { path, value });
        };
        let area = pixels.len() as f64;
        let saturation = if defect.relative_saturation {
            defect.saturation_threshold * area
        } else {
            (defect.saturation_threshold * saturation_scale).min(area)
        };
        regions.push(DefectRegion { pixels, saturation });
    }
    Ok(regions)
}

/// Maps a score to a u32 whose unsigned order is the score order, so that sorting,
/// selection and tie detection are plain integer operations (faster than float
/// comparisons and free of the NaN / signed-zero pitfalls).
fn order_key(x: f32) -> u32 {
    let x = if x == 0.0 {
        0.0 // -0.0 must tie with 0.0
    } else if x.is_nan() {
        f32::NAN // one canonical NaN, so all NaNs tie
    } else {
        x
    };
    let bits = x.to_bits();
    if bits & 0x8000_0000 != 0 {
        !bits
    } else {
        bits | 0x8000_0000
    }
}

/// Image-level AUROC: the probability that a random positive scores higher than a random
/// negative, ties counting one half (Mann–Whitney U / (n_neg * n_pos)).
/// `None` when either side is empty, since the AUROC is undefined then.
pub fn auroc(negatives: &[f32], positives: &[f32]) -> Option<f64> {
    if negatives.is_empty() || positives.is_empty() {
        return None;
    }
    let mut neg: Vec<u32> = negatives.iter().map(|&x| order_key(x)).collect();
    neg.sort_unstable();
    // Counting in half-units keeps the sum an exact integer; u128 cannot overflow.
    let mut twice_u: u128 = 0;
    for &p in positives {
        let k = order_key(p);
        let below = neg.partition_point(|&n| n < k);
        let tied = neg[below..].partition_point(|&n| n == k);
        twice_u += 2 * below as u128 + tied as u128;
    }
    let pairs = 2 * negatives.len() as u128 * positives.len() as u128;
    Some(twice_u as f64 / pairs as f64)
}

/// Pixel-level AU-sPRO as defined by MVTec LOCO AD, normalised by `max_fpr` so that a
/// perfect detector scores 1.0.
///
/// A pixel is flagged at threshold t when its score is > t. The sPRO of region i is
/// `min(|G_i ∩ flagged| / s_i, 1)`; the curve value is the mean over all regions of all
/// anomalous images. FPR is over the pixels of `good_maps` plus the pixels of anomalous
/// maps outside every region. The curve starts at (0, 0) and has one point per distinct
/// score. Tied positives and negatives produce a straight segment (the usual ROC
/// convention), so a constant map gets `max_fpr / 2`, i.e. 0.025 for max_fpr = 0.05,
/// rather than 0. The area is integrated with the trapezoidal rule up to exactly
/// `max_fpr`, interpolating linearly at the limit.
///
/// Cost: O(N) to select the top `max_fpr` fraction of negative pixels plus sorting only
/// those and the region pixels above the resulting cut-off; extra memory is 4 bytes per
/// negative pixel.
///
/// Returns `None` when there are no regions, no negative pixels, or `max_fpr` is not in
/// (0, 1].
///
/// # Panics
/// If a region pixel index lies outside its map or a region's saturation is not > 0;
/// [`load_regions`] never produces such regions for a map of the expected size.
pub fn au_spro(good_maps: &[&[f32]], anomalous: &[(&[f32], &[DefectRegion])], max_fpr: f64) -> Option<f64> {
    if !(max_fpr > 0.0 && max_fpr <= 1.0) {
        return None;
    }
    let n_regions: usize = anomalous.iter().map(|(_, r)| r.len()).sum();
    if n_regions == 0 {
        return None;
    }

    let mut negatives = collect_negative_keys(good_maps, anomalous);
    let n_neg = negatives.len();
    if n_neg == 0 {
        return None;
    }

    // Only thresholds down to the first one whose FPR exceeds max_fpr matter, i.e. down
    // to the k-th highest negative with k / n_neg > max_fpr; everything scoring below it
    // can be dropped. The +2 (one more than needed) keeps k / n_neg > max_fpr true even
    // when max_fpr * n_neg rounds just below an integer.
    let k = ((max_fpr * n_neg as f64).floor() as usize).saturating_add(2);
    let cutoff = if k >= n_neg {
        0
    } else {
        let idx = n_neg - k;
        *negatives.select_nth_unstable(idx).1
    };
    // Keeps the whole tie group at the cut-off so the FPR of the crossing point is exact.
    negatives.retain(|&x| x >= cutoff);
    negatives.sort_unstable();

    let events = positive_events(anomalous, cutoff, n_regions);

    // Merge both descending score streams; each distinct score is one curve point.
    let mut neg_iter = negatives.iter().rev().peekable();
    let mut pos_iter = events.iter().rev().peekable();
    let n_neg_f = n_neg as f64;
    let (mut fp, mut spro) = (0usize, 0.0f64);
    let (mut prev_x, mut prev_y) = (0.0f64, 0.0f64);
    let mut area = 0.0f64;
    loop {
        let key = match (neg_iter.peek(), pos_iter.peek()) {
            (None, None) => break,
            (Some(&&n), None) => n,
            (None, Some(&&(p, _))) => p,
            (Some(&&n), Some(&&(p, _))) => n.max(p),
        };
        while neg_iter.next_if(|&&n| n == key).is_some() {
            fp += 1;
        }
        while let Some(&(_, delta)) = pos_iter.next_if(|&&(p, _)| p == key) {
            spro += delta;
        }
        let x = fp as f64 / n_neg_f;
        let y = spro;
        if x > max_fpr {
            // prev_x <= max_fpr < x, so the division is safe.
            let y_at_limit = prev_y + (y - prev_y) * (max_fpr - prev_x) / (x - prev_x);
            area += (max_fpr - prev_x) * (prev_y + y_at_limit) / 2.0;
            prev_x = max_fpr;
            break;
        }
        area += (x - prev_x) * (prev_y + y) / 2.0;
        prev_x = x;
        prev_y = y;
    }
    // The sweep always reaches FPR 1 or passes max_fpr, so the limit has been reached.
    debug_assert!(prev_x >= max_fpr);
    Some(area / max_fpr)
}

/// [`au_spro`] by its definition, the slow way: a threshold at every distinct score, pixels flagged at
/// `score >= threshold`, the trapezoids integrated with interpolation at the limit. O(distinct scores ×
/// pixels): the reference that the tests and the fuzzer (`fuzz/harness.rs`) compare [`au_spro`] with.
/// Finite scores only, and at least one region and one negative pixel.
pub fn au_spro_by_definition(good: &[Vec<f32>], anom: &[(Vec<f32>, Vec<DefectRegion>)], max_fpr: f64) -> f64 {
    let mut values: Vec<f32> = good.iter().flatten().chain(anom.iter().flat_map(|(m, _)| m.iter())).copied().collect();
    values.sort_by(|a, b| b.total_cmp(a));
    values.dedup();
    let n_regions: usize = anom.iter().map(|(_, r)| r.len()).sum();
    let mut points = vec![(0.0, 0.0)];
    for &t in &values {
        let (mut fp, mut n) = (0usize, 0usize);
        for m in good {
            n += m.len();
            fp += m.iter().filter(|&&x| x >= t).count();
        }
        let mut spro = 0.0;
        for (m, regions) in anom {
            let mut inside = vec![false; m.len()];
            for r in regions {
                let hit = r.pixels.iter().filter(|&&p| m[p as usize] >= t).count();
                spro += (hit as f64 / r.saturation).min(1.0);
                for &p in &r.pixels {
                    inside[p as usize] = true;
                }
            }
            for (i, &x) in m.iter().enumerate() {
                if !inside[i] {
                    n += 1;
                    fp += usize::from(x >= t);
                }
            }
        }
        points.push((fp as f64 / n as f64, spro / n_regions as f64));
    }
    let mut area = 0.0;
    for w in points.windows(2) {
        let ((x0, y0), (x1, y1)) = (w[0], w[1]);
        if x1 > max_fpr {
            let y = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0);
            area += (max_fpr - x0) * (y0 + y) / 2.0;
            break;
        }
        area += (x1 - x0) * (y0 + y1) / 2.0;
    }
    area / max_fpr
}

/// Order keys of all negative pixels: every pixel of the good maps and the pixels of
/// anomalous maps that belong to no region (regions may overlap, hence the mask).
fn collect_negative_keys(good_maps: &[&[f32]], anomalous: &[(&[f32], &[DefectRegion])]) -> Vec<u32> {
    // Over-allocates by the region pixels only, which avoids a separate counting pass.
    let total: usize =
        good_maps.iter().map(|m| m.len()).sum::<usize>() + anomalous.iter().map(|(m, _)| m.len()).sum::<usize>();
    let mut keys = Vec::with_capacity(total);
    for map in good_maps {
        keys.extend(map.iter().map(|&x| order_key(x)));
    }
    let mut in_region: Vec<bool> = Vec::new();
    for (map, regions) in anomalous {
        in_region.clear();
        in_region.resize(map.len(), false);
        for region in regions.iter() {
            for &p in &region.pixels {
                let Some(slot) = in_region.get_mut(p as usize) else {
                    panic!("region pixel index {p} is outside an anomaly map of {} pixels", map.len());
                };
                *slot = true;
            }
        }
        keys.extend(map.iter().zip(&in_region).filter(|(_, &inside)| !inside).map(|(&x, _)| order_key(x)));
    }
    keys
}

/// sPRO increments, sorted ascending by key, for region pixels scoring at least `cutoff`.
///
/// Region i's contribution with its j highest pixels flagged is min(j, s_i) / s_i, so
/// its j-th highest pixel adds (min(j, s_i) - min(j-1, s_i)) / s_i; pixels beyond
/// ceil(s_i) add nothing and are skipped, which is how saturation caps the overlap.
fn positive_events(anomalous: &[(&[f32], &[DefectRegion])], cutoff: u32, n_regions: usize) -> Vec<(u32, f64)> {
    let mut events = Vec::new();
    let mut keys: Vec<u32> = Vec::new();
    for (map, regions) in anomalous {
        for region in regions.iter() {
            let s = region.saturation;
            assert!(s > 0.0, "region saturation must be > 0, got {s}");
            keys.clear();
            keys.extend(region.pixels.iter().map(|&p| order_key(map[p as usize])).filter(|&k| k >= cutoff));
            // Dropping pixels below the cut-off does not change the ranks of the rest.
            keys.sort_unstable_by(|a, b| b.cmp(a));
            let useful = keys.len().min(s.ceil() as usize);
            let weight = 1.0 / (s * n_regions as f64);
            for (j, &k) in keys[..useful].iter().enumerate() {
                let j = j as f64;
                let gain = (j + 1.0).min(s) - j.min(s);
                events.push((k, gain * weight));
            }
        }
    }
    events.sort_unstable_by_key(|&(k, _)| k);
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    // ---------- AUROC ----------

    #[test]
    fn auroc_perfect_inverted_tied() {
        assert_eq!(auroc(&[0.1, 0.2, 0.3], &[0.5, 0.9]), Some(1.0));
        assert_eq!(auroc(&[0.5, 0.9], &[0.1, 0.2, 0.3]), Some(0.0));
        assert_eq!(auroc(&[0.5; 3], &[0.5; 2]), Some(0.5));
        // -0.0 and 0.0 are the same score.
        assert_eq!(auroc(&[-0.0], &[0.0]), Some(0.5));
    }

    #[test]
    fn auroc_with_ties_by_hand() {
        // negatives 0.1 0.4 0.4 0.8; positives 0.4 0.9 0.1
        //   pos 0.4: beats 0.1 (1) + ties 0.4,0.4 (2 x 0.5) = 2
        //   pos 0.9: beats all four                         = 4
        //   pos 0.1: ties 0.1 (0.5)                         = 0.5
        // U = 6.5 over 4 * 3 = 12 pairs -> 13/24
        let a = auroc(&[0.1, 0.4, 0.4, 0.8], &[0.4, 0.9, 0.1]).unwrap();
        assert!(close(a, 13.0 / 24.0), "{a}");
    }

    #[test]
    fn auroc_empty_side_is_none() {
        assert_eq!(auroc(&[], &[0.3]), None);
        assert_eq!(auroc(&[0.3], &[]), None);
    }

    // ---------- AU-sPRO ----------

    fn region(pixels: &[u32], saturation: f64) -> DefectRegion {
        DefectRegion { pixels: pixels.to_vec(), saturation }
    }

    #[test]
    fn spro_perfect_map_is_one() {
        let good = vec![0.0f32; 16];
        let mut anom = vec![0.0f32; 16];
        let regions = vec![region(&[0, 1, 4, 5], 4.0), region(&[10, 11], 1.5)];
        for r in &regions {
            for &p in &r.pixels {
                anom[p as usize] = 1.0;
            }
        }
        let v = au_spro(&[&good], &[(&anom, &regions)], 0.05).unwrap();
        assert!(close(v, 1.0), "{v}");
    }

    #[test]
    fn spro_map_that_marks_nothing_is_zero() {
        // Defect pixels score below every negative pixel.
        let good = vec![0.5f32; 16];
        let mut anom = vec![0.5f32; 16];
        let regions = vec![region(&[0, 1, 4, 5], 4.0)];
        for &p in &regions[0].pixels {
            anom[p as usize] = 0.1;
        }
        let v = au_spro(&[&good], &[(&anom, &regions)], 0.05).unwrap();
        assert!(close(v, 0.0), "{v}");
    }

    #[test]
    fn spro_constant_map_follows_the_diagonal() {
        // One tie group: the curve jumps straight from (0,0) to (1,1); at FPR 0.05 the
        // area is 0.05 * 0.05 / 2, normalised by 0.05 -> 0.025.
        let good = vec![0.3f32; 16];
        let anom = vec![0.3f32; 16];
        let regions = vec![region(&[0, 1], 2.0)];
        let v = au_spro(&[&good], &[(&anom, &regions)], 0.05).unwrap();
        assert!(close(v, 0.025), "{v}");
    }

    #[test]
    fn spro_hand_computed_with_interpolation_at_limit() {
        // 4x4 maps. Negatives: 16 good + 12 non-region pixels = 28.
        // Good map: 0 except one 0.7. Anomalous map: region {0,1,4,5} scores
        // 0.9 0.6 0.5 0.2 (s = 4, no saturation effect), one non-region pixel 0.5.
        // Sweep (descending score):
        //   0.9: pos            -> (0,    0.25)
        //   0.7: neg            -> (1/28, 0.25)  area += 1/28 * 0.25
        //   0.6: pos            -> (1/28, 0.50)
        //   0.5: neg + pos tie  -> (2/28, 0.75)  2/28 > 0.05: interpolate
        //        at 0.05: frac = (0.05 - 1/28) / (1/28) = 0.4, y = 0.5 + 0.25*0.4 = 0.6
        //        area += (0.05 - 1/28) * (0.5 + 0.6) / 2 = (0.4/28) * 0.55 = 0.22/28
        // total = 0.47/28; / 0.05 -> 9.4/28 = 47/140
        let mut good = vec![0.0f32; 16];
        good[7] = 0.7;
        let mut anom = vec![0.0f32; 16];
        anom[0] = 0.9;
        anom[1] = 0.6;
        anom[4] = 0.5;
        anom[5] = 0.2;
        anom[15] = 0.5;
        let regions = vec![region(&[0, 1, 4, 5], 4.0)];
        let v = au_spro(&[&good], &[(&anom, &regions)], 0.05).unwrap();
        assert!(close(v, 47.0 / 140.0), "{v}");
    }

    #[test]
    fn spro_saturation_caps_overlap() {
        // Region of 4 pixels, two score above all negatives (0.0), two below.
        // s = 4: sPRO 0.5 at FPR 0, flat until FPR 1 -> 0.5.
        // s = 2: the two found pixels saturate the region -> 1.0.
        // s = 2.5: 2 / 2.5 = 0.8.
        let good = vec![0.0f32; 16];
        let mut anom = vec![0.0f32; 16];
        anom[0] = 0.9;
        anom[1] = 0.8;
        anom[2] = -1.0;
        anom[3] = -1.0;
        for (s, expected) in [(4.0, 0.5), (2.0, 1.0), (2.5, 0.8)] {
            let regions = vec![region(&[0, 1, 2, 3], s)];
            let v = au_spro(&[&good], &[(&anom, &regions)], 0.05).unwrap();
            assert!(close(v, expected), "s = {s}: {v} != {expected}");
        }
    }

    #[test]
    fn spro_averages_regions_across_images() {
        // Image A region found at FPR 0, image B region never found before FPR 1:
        // mean sPRO 0.5 over [0, 0.05] -> 0.5.
        let good = vec![0.0f32; 8];
        let mut a = vec![0.0f32; 8];
        a[0] = 1.0;
        let mut b = vec![0.0f32; 8];
        b[0] = -1.0;
        let ra = vec![region(&[0], 1.0)];
        let rb = vec![region(&[0], 1.0)];
        let v = au_spro(&[&good], &[(&a, &ra), (&b, &rb)], 0.05).unwrap();
        assert!(close(v, 0.5), "{v}");
    }

    #[test]
    fn spro_none_cases() {
        let good = vec![0.0f32; 4];
        let anom = vec![1.0f32; 4];
        let empty: Vec<DefectRegion> = vec![];
        assert_eq!(au_spro(&[&good], &[(&anom, &empty)], 0.05), None);
        let all = vec![region(&[0, 1, 2, 3], 4.0)];
        // No negative pixels at all.
        assert_eq!(au_spro(&[], &[(&anom, &all)], 0.05), None);
        let one = vec![region(&[0], 1.0)];
        assert_eq!(au_spro(&[&good], &[(&anom, &one)], 0.0), None);
        assert_eq!(au_spro(&[&good], &[(&anom, &one)], 1.5), None);
    }

    #[test]
    fn spro_matches_brute_force_on_random_maps() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for case in 0..40 {
            let (w, h) = (6usize, 5usize);
            // Quantised scores create plenty of ties between and within classes.
            let levels = 3 + (case % 5) as u64 * 4;
            let good: Vec<Vec<f32>> =
                (0..3).map(|_| (0..w * h).map(|_| (rnd() % levels) as f32 / levels as f32).collect()).collect();
            let mut anom = Vec::new();
            for _ in 0..3 {
                let map: Vec<f32> = (0..w * h).map(|_| (rnd() % levels) as f32 / levels as f32).collect();
                let mut regions = Vec::new();
                for _ in 0..(1 + rnd() % 3) {
                    let (x0, y0) = ((rnd() % 4) as usize, (rnd() % 3) as usize);
                    let (rw, rh) = (1 + (rnd() % 3) as usize, 1 + (rnd() % 3) as usize);
                    let mut pixels = Vec::new();
                    for y in y0..(y0 + rh).min(h) {
                        for x in x0..(x0 + rw).min(w) {
                            pixels.push((y * w + x) as u32);
                        }
                    }
                    let area = pixels.len() as f64;
                    let saturation = match rnd() % 3 {
                        0 => area,
                        1 => (area * 0.6).max(0.5),
                        _ => area * 1.3,
                    };
                    regions.push(DefectRegion { pixels, saturation });
                }
                let mut map = map;
                // Make the regions somewhat detectable so the curve is non-trivial.
                for r in &regions {
                    for &p in &r.pixels {
                        map[p as usize] += (rnd() % 2) as f32 * 0.5;
                    }
                }
                anom.push((map, regions));
            }
            for max_fpr in [0.01, 0.05, 0.3, 1.0] {
                let good_refs: Vec<&[f32]> = good.iter().map(|m| m.as_slice()).collect();
                let anom_refs: Vec<(&[f32], &[DefectRegion])> =
                    anom.iter().map(|(m, r)| (m.as_slice(), r.as_slice())).collect();
                let fast = au_spro(&good_refs, &anom_refs, max_fpr).unwrap();
                let slow = au_spro_by_definition(&good, &anom, max_fpr);
                assert!(close(fast, slow), "case {case} max_fpr {max_fpr}: {fast} vs {slow}");
            }
        }
    }

    // ---------- loaders ----------

    fn config() -> Vec<DefectType> {
        vec![
            DefectType {
                defect_name: "missing_label".into(),
                pixel_value: 255,
                saturation_threshold: 100.0,
                relative_saturation: false,
            },
            DefectType {
                defect_name: "small_absolute".into(),
                pixel_value: 254,
                saturation_threshold: 10.0,
                relative_saturation: false,
            },
            DefectType {
                defect_name: "half_relative".into(),
                pixel_value: 200,
                saturation_threshold: 0.5,
                relative_saturation: true,
            },
        ]
    }

    fn write_mask(dir: &Path, name: &str, w: u32, h: u32, pixels: &[(u32, u32, u8)]) {
        let mut img = image::GrayImage::new(w, h);
        for &(x, y, v) in pixels {
            img.put_pixel(x, y, image::Luma([v]));
        }
        img.save(dir.join(name)).unwrap();
    }

    #[test]
    fn load_regions_reads_every_png_with_its_saturation() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // 8 wide, 4 high. 000: two pixels of 255 (absolute 100*0.25 = 25 > area -> 2).
        write_mask(d, "000.png", 8, 4, &[(1, 0, 255), (2, 3, 255)]);
        // 001: eight pixels of 200 (relative 0.5 * 8 = 4).
        let px: Vec<_> = (0..8).map(|x| (x, 1, 200)).collect();
        write_mask(d, "001.png", 8, 4, &px);
        // 002: four pixels of 254 (absolute 10 * 0.25 = 2.5 < area 4).
        write_mask(d, "002.png", 8, 4, &[(0, 2, 254), (1, 2, 254), (2, 2, 254), (3, 2, 254)]);
        // All-zero masks give no region; other files are ignored.
        write_mask(d, "003.png", 8, 4, &[]);
        std::fs::write(d.join("notes.txt"), "not a mask").unwrap();

        let regions = load_regions(d, &config(), 0.25, (8, 4)).unwrap();
        assert_eq!(regions.len(), 3);
        assert_eq!(regions[0].pixels, vec![1, 3 * 8 + 2]);
        assert_eq!(regions[0].saturation, 2.0);
        assert_eq!(regions[1].pixels, (8..16).collect::<Vec<u32>>());
        assert_eq!(regions[1].saturation, 4.0);
        assert_eq!(regions[2].pixels, vec![16, 17, 18, 19]);
        assert_eq!(regions[2].saturation, 2.5);
    }

    #[test]
    fn load_regions_size_mismatch_names_file() {
        let dir = tempfile::tempdir().unwrap();
        write_mask(dir.path(), "000.png", 8, 4, &[(0, 0, 255)]);
        let err = load_regions(dir.path(), &config(), 1.0, (4, 8)).unwrap_err();
        assert!(matches!(err, MetricsError::SizeMismatch { .. }));
        let msg = err.to_string();
        assert!(msg.contains("000.png: mask is 8x4 but the image is 4x8"), "{msg}");
    }

    #[test]
    fn load_regions_unknown_value_names_file_and_value() {
        let dir = tempfile::tempdir().unwrap();
        write_mask(dir.path(), "000.png", 4, 4, &[(0, 0, 255)]);
        write_mask(dir.path(), "001.png", 4, 4, &[(1, 1, 17)]);
        let err = load_regions(dir.path(), &config(), 1.0, (4, 4)).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, MetricsError::UnknownPixelValue { value: 17, .. }));
        assert!(msg.contains("001.png") && msg.contains("17"), "{msg}");
    }

    #[test]
    fn load_regions_other_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_regions(dir.path(), &config(), 1.0, (4, 4)).unwrap_err();
        assert!(matches!(err, MetricsError::NoMasks { .. }));

        write_mask(dir.path(), "000.png", 4, 4, &[(0, 0, 255), (1, 0, 200)]);
        let err = load_regions(dir.path(), &config(), 1.0, (4, 4)).unwrap_err();
        assert!(matches!(err, MetricsError::MixedPixelValues { .. }), "{err}");

        let err = load_regions(dir.path(), &config(), 0.0, (4, 4)).unwrap_err();
        assert!(matches!(err, MetricsError::InvalidArgument(_)));

        let rgb = tempfile::tempdir().unwrap();
        image::RgbImage::new(4, 4).save(rgb.path().join("000.png")).unwrap();
        let err = load_regions(rgb.path(), &config(), 1.0, (4, 4)).unwrap_err();
        assert!(matches!(err, MetricsError::NotGrayscale { .. }), "{err}");

        let missing = dir.path().join("nope");
        let err = load_regions(&missing, &config(), 1.0, (4, 4)).unwrap_err();
        assert!(matches!(err, MetricsError::Io { .. }));
        assert!(err.to_string().contains("nope"));
    }

    #[test]
    fn defects_config_round_trip_and_validation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("defects_config.json");
        std::fs::write(&path, serde_json::to_string(&config()).unwrap()).unwrap();
        assert_eq!(load_defects_config(&path).unwrap(), config());

        let mut dup = config();
        dup[1].pixel_value = 255;
        std::fs::write(&path, serde_json::to_string(&dup).unwrap()).unwrap();
        let err = load_defects_config(&path).unwrap_err();
        assert!(err.to_string().contains("pixel_value 255"), "{err}");

        let mut zero = config();
        zero[0].saturation_threshold = 0.0;
        std::fs::write(&path, serde_json::to_string(&zero).unwrap()).unwrap();
        assert!(matches!(load_defects_config(&path), Err(MetricsError::InvalidConfig { .. })));

        std::fs::write(&path, "[{\"defect_name\": 3}]").unwrap();
        let err = load_defects_config(&path).unwrap_err();
        assert!(matches!(err, MetricsError::Json { .. }));
        assert!(err.to_string().contains("defects_config.json"), "{err}");
    }
}
