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
