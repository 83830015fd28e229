//! What the sink spends per frame to encode its anomaly map, by format (issue 12: at thousands of frames
//! per second, map encoding competes with decoding for the host's cores). One thread, medians over rounds.
//!
//!     cargo bench --bench maps                       # 256 px maps, 5 rounds of 20 maps
//!     cargo bench --bench maps -- --side 128 --rounds 3
//!
//! Cases: the sink's PNG (`encode_map`) and, as the reference, its former path (the colour scale
//! evaluated per pixel, `image`'s PNG defaults); the `png` crate's balanced deflate level; the colour
//! table alone; f16.
//!
//! The maps are smooth fields with a few hot spots and some coarse noise, like a model's: deflate's cost
//! depends on the content, and a constant or random map would flatter or punish it.

use std::time::Instant;

mod common;

use common::{arg, median};
use lineguard::service::settings::MapFormat;
use lineguard::service::sink::encode_map;

/// A map in about [0, 1] as the model makes them: computed on a coarse grid (the PDN's 56x56 output at
/// 256 px) and bilinearly upsampled, so smooth; a gentle gradient, three Gaussian hot spots and ±0.05 of
/// hash noise per coarse cell.
fn realistic_map(side: u32, seed: u32) -> Vec<f32> {
    const COARSE: u32 = 56;
    let spots = [(0.3, 0.4, 0.05), (0.7, 0.6, 0.08), (0.5 + 0.01 * seed as f32, 0.2, 0.03)];
    let cell = |cx: u32, cy: u32| {
        let (x, y) = (cx as f32 / COARSE as f32, cy as f32 / COARSE as f32);
        let heat: f32 =
            spots.iter().map(|(sx, sy, r)| (-((x - sx).powi(2) + (y - sy).powi(2)) / (2.0 * r * r)).exp()).sum();
        let hash = ((cy * COARSE + cx).wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40_503)) % 1000;
        0.1 + 0.1 * x + 0.8 * heat + 0.05 * (hash as f32 / 500.0 - 1.0)
    };
    let scale = (COARSE - 1) as f32 / (side - 1).max(1) as f32;
    (0..side * side)
        .map(|i| {
            let (fx, fy) = ((i % side) as f32 * scale, (i / side) as f32 * scale);
            let (x0, y0) = (fx as u32, fy as u32);
            let (x1, y1) = ((x0 + 1).min(COARSE - 1), (y0 + 1).min(COARSE - 1));
            let (tx, ty) = (fx - x0 as f32, fy - y0 as f32);
            let top = cell(x0, y0) * (1.0 - tx) + cell(x1, y0) * tx;
            let bottom = cell(x0, y1) * (1.0 - tx) + cell(x1, y1) * tx;
            top * (1.0 - ty) + bottom * ty
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let side: u32 = arg(&args, "--side", 256);
    let rounds: usize = arg(&args, "--rounds", 5);
    let count: u32 = arg(&args, "--maps", 20);
    let maps: Vec<Vec<f32>> = (0..count).map(|seed| realistic_map(side, seed)).collect();
    type Encode = fn(&[f32], u32) -> Vec<u8>;
    let cases: [(&str, Encode); 5] = [
        ("png (encode_map: colour table, fast deflate)", |map, side| encode_map(map, side, RANGE, MapFormat::Png).1),
        ("png (before: the scale per pixel, image's defaults)", former_png),
        ("png, balanced deflate (not used)", balanced_png),
        ("colours only, the table", |map, _| lineguard::eval::heatmap::colourise(map, RANGE)),
        ("f16 (encode_map)", |map, side| encode_map(map, side, RANGE, MapFormat::F16).1),
    ];
    let mut times = vec![Vec::new(); cases.len()];
    let mut sizes = vec![0usize; cases.len()];
    for _ in 0..rounds {
        for (case, (_, encode)) in cases.iter().enumerate() {
            let started = Instant::now();
            let mut bytes = 0;
            for map in &maps {
                bytes += encode(map, side).len();
            }
            times[case].push(started.elapsed().as_secs_f64() * 1e3 / count as f64);
            sizes[case] = bytes / count as usize;
        }
    }
    println!("{side} px maps, {count} per round, {rounds} rounds, one thread; medians:");
    for ((name, _), (time, size)) in cases.iter().zip(times.iter().zip(&sizes)) {
        let per_core = 1e3 / median(time);
        println!("  {name:<52} {:7.3} ms per map ({per_core:6.0} maps/s per core), {size} bytes", median(time));
    }
}

const RANGE: (f32, f32) = (0.0, 1.0);

/// The sink's PNG encoding before the colour table: the scale evaluated per pixel through
/// `RgbImage::from_fn`, then `image`'s PNG writer with its defaults. Kept here as the reference.
fn former_png(map: &[f32], side: u32) -> Vec<u8> {
    let (low, high) = RANGE;
    let picture = image::RgbImage::from_fn(side, side, |x, y| {
        let v = map.get((y * side + x) as usize).copied().unwrap_or(0.0);
        lineguard::eval::heatmap::colour(((v - low) / (high - low)).clamp(0.0, 1.0))
    });
    let mut bytes = Vec::new();
    picture.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png).expect("in memory");
    bytes
}

/// The colour table's pixels through the `png` crate's balanced (default) deflate level: what smaller
/// pictures would cost.
fn balanced_png(map: &[f32], side: u32) -> Vec<u8> {
    let pixels = lineguard::eval::heatmap::colourise(map, RANGE);
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, side, side);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Balanced);
    let mut writer = encoder.write_header().expect("in memory");
    writer.write_image_data(&pixels).expect("in memory");
    writer.finish().expect("in memory");
    bytes
}
