//! Pictures of anomaly maps: the camera image beside the same image with the map laid over it in a
//! perceptual colour scale (dark purple = normal, yellow = anomalous). A fixed scale per model, not per
//! image, so that a normal product looks calm instead of having its noise stretched to full colour.

use image::{Rgb, RgbImage};

/// Control points of an inferno-like colour scale (perceptually ordered, readable in greyscale).
const SCALE: [[f32; 3]; 6] = [
    [0.0, 0.0, 4.0],
    [66.0, 10.0, 104.0],
    [147.0, 38.0, 103.0],
    [221.0, 81.0, 58.0],
    [252.0, 165.0, 10.0],
    [252.0, 255.0, 164.0],
];

/// Colour of `v` in [0, 1].
pub fn colour(v: f32) -> Rgb<u8> {
    let v = if v.is_finite() { v.clamp(0.0, 1.0) } else { 1.0 };
    let position = v * (SCALE.len() - 1) as f32;
    let i = (position.floor() as usize).min(SCALE.len() - 2);
    let t = position - i as f32;
    let mix = |c: usize| (SCALE[i][c] * (1.0 - t) + SCALE[i + 1][c] * t).round() as u8;
    Rgb([mix(0), mix(1), mix(2)])
}

/// Entries of [`colourise`]'s table: neighbouring entries differ by at most 0.3 of a level per channel
/// (the scale's steepest segment spans 255 levels over a fifth of [0, 1]), so a table colour is within
/// one level of [`colour`]'s.
const TABLE_ENTRIES: usize = 4096;

/// The map's values scaled from `range.0` (darkest) to `range.1` (brightest) as interleaved RGB bytes,
/// through a table of the colour scale: the sink colours every frame's map, and evaluating the scale per
/// pixel cost more than compressing the picture (BENCHMARKS.md, "map encoding"). Non-finite values are
/// brightest, as in [`colour`].
pub fn colourise(map: &[f32], range: (f32, f32)) -> Vec<u8> {
    static TABLE: std::sync::OnceLock<Vec<[u8; 3]>> = std::sync::OnceLock::new();
    let table = TABLE
        .get_or_init(|| (0..TABLE_ENTRIES).map(|index| colour(index as f32 / (TABLE_ENTRIES - 1) as f32).0).collect());
    let (low, high) = range;
    let scale = (TABLE_ENTRIES - 1) as f32 / (high - low).max(1e-6);
    let top = (TABLE_ENTRIES - 1) as f32;
    let mut pixels = vec![0; 3 * map.len()];
    for (pixel, &value) in pixels.chunks_exact_mut(3).zip(map) {
        // NaN is brightest; +0.5 and truncation round the clamped, non-negative position (`round` is a
        // library call here, and this loop runs for every pixel of every frame).
        let position = if value.is_nan() { top } else { ((value - low) * scale).clamp(0.0, top) };
        pixel.copy_from_slice(&table[((position + 0.5) as usize).min(TABLE_ENTRIES - 1)]);
    }
    pixels
}

/// The image with the map (row-major, same size as the image) blended over it; values are scaled from
/// `range.0` (transparent) to `range.1` (opaque, brightest).
pub fn overlay(image: &RgbImage, map: &[f32], range: (f32, f32)) -> RgbImage {
    let (low, high) = range;
    let span = (high - low).max(f32::EPSILON);
    let width = image.width();
    RgbImage::from_fn(image.width(), image.height(), |x, y| {
        let v = ((map[(y * width + x) as usize] - low) / span).clamp(0.0, 1.0);
        // Calm pixels stay as the camera saw them; hot ones take the colour.
        let alpha = 0.8 * v;
        let base = image.get_pixel(x, y);
        let heat = colour(v);
        Rgb([0, 1, 2].map(|c| (base[c] as f32 * (1.0 - alpha) + heat[c] as f32 * alpha).round() as u8))
    })
}

/// Original and overlay side by side, separated by a thin white bar.
pub fn side_by_side(image: &RgbImage, map: &[f32], range: (f32, f32)) -> RgbImage {
    let heat = overlay(image, map, range);
    let gap = 4;
    let (w, h) = (image.width(), image.height());
    let mut canvas = RgbImage::from_pixel(2 * w + gap, h, Rgb([255, 255, 255]));
    image::imageops::replace(&mut canvas, image, 0, 0);
    image::imageops::replace(&mut canvas, &heat, (w + gap) as i64, 0);
    canvas
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table stands in for the scale: every value of a dense sweep (and the range's ends, values
    /// outside it, and non-finite ones) gets [`colour`]'s colour within one level.
    #[test]
    fn the_colour_table_matches_the_scale_within_one_level() {
        let range = (0.2f32, 0.7f32);
        let mut values: Vec<f32> = (0..=100_000).map(|i| -0.1 + i as f32 * 1e-5).collect();
        values.extend([f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.2, 0.7]);
        let pixels = colourise(&values, range);
        assert_eq!(pixels.len(), 3 * values.len());
        for (value, got) in values.iter().zip(pixels.chunks_exact(3)) {
            let scaled = (value - range.0) / (range.1 - range.0);
            let want = if value.is_nan() { colour(1.0) } else { colour(scaled.clamp(0.0, 1.0)) };
            for channel in 0..3 {
                let difference = (got[channel] as i32 - want[channel] as i32).abs();
                assert!(difference <= 1, "{value}: {got:?} vs {want:?}");
            }
        }
        assert_eq!(&pixels[3 * 100_001..3 * 100_002], &colour(1.0).0, "NaN is brightest");
        assert_eq!(&pixels[3 * 100_003..3 * 100_004], &colour(0.0).0, "-inf is darkest");
    }

    #[test]
    fn scale_runs_from_dark_to_bright() {
        let lum = |c: Rgb<u8>| c[0] as u32 + c[1] as u32 + c[2] as u32;
        let samples: Vec<u32> = (0..=10).map(|i| lum(colour(i as f32 / 10.0))).collect();
        assert!(samples.windows(2).all(|w| w[0] <= w[1]), "{samples:?}");
        assert_eq!(colour(-1.0), colour(0.0));
        assert_eq!(colour(f32::NAN), colour(1.0));
    }

    #[test]
    fn overlay_marks_only_the_hot_region() {
        let image = RgbImage::from_pixel(4, 2, Rgb([100, 100, 100]));
        let mut map = vec![0.0f32; 8];
        map[3] = 1.0;
        let out = overlay(&image, &map, (0.0, 1.0));
        assert_eq!(out.get_pixel(0, 0), out.get_pixel(1, 1));
        assert_ne!(out.get_pixel(3, 0), out.get_pixel(0, 0));
        let panel = side_by_side(&image, &map, (0.0, 1.0));
        assert_eq!((panel.width(), panel.height()), (12, 2));
        assert_eq!(panel.get_pixel(0, 0), image.get_pixel(0, 0));
    }
}
