//! What the decode pool spends per frame: JPEG decoding, resizing to the model's side and normalising into
//! the planar input, measured separately on the same frames, interleaved over rounds, medians per frame.
//! At 5,000 frames/s on 16 cores a frame may cost a core at most 3.2 ms (issue 12).
//!
//!     cargo bench --bench decode                                  # juice_bottle's 400x800 frames, 256 px
//!     cargo bench --bench decode -- --frames DIR --side 256 --rounds 5
//!     cargo bench --bench decode -- --enlarge 4     # frames enlarged 4x first (1600x3200)
//!
//! Frames are re-encoded as JPEG (quality 90) first, as cameras send them; `--enlarge` resizes them first
//! (Catmull-Rom) to stand in for high-resolution cameras.

use std::path::{Path, PathBuf};
use std::time::Instant;

mod common;

use common::{arg, median};
use lineguard::data::preprocess::{decode, to_planar};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = arg(&args, "--rounds", 5);
    let side: u32 = arg(&args, "--side", 256);
    let count: usize = arg(&args, "--count", 32);
    let enlarge: u32 = arg(&args, "--enlarge", 1);
    let default_frames =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/datasets/mvtec_loco_juice_bottle/test/good");
    let folder: PathBuf = arg(&args, "--frames", default_frames);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&folder)
        .unwrap_or_else(|err| panic!("{}: {err} (pass --frames DIR)", folder.display()))
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .collect();
    paths.sort();
    paths.truncate(count);
    let jpegs: Vec<Vec<u8>> = paths
        .iter()
        .map(|path| {
            let mut image = lineguard::data::preprocess::load_image(path).expect("an image");
            if enlarge > 1 {
                let (w, h) = (image.width() * enlarge, image.height() * enlarge);
                image = image::imageops::resize(&image, w, h, image::imageops::FilterType::CatmullRom);
            }
            let mut bytes = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 90).encode_image(&image).expect("encoded");
            bytes
        })
        .collect();
    let first = decode(&jpegs[0], "first").expect("decodes");
    println!(
        "{} frames of {}x{} from {} as JPEG (mean {} KiB), to {side} px; {rounds} rounds; medians per frame",
        jpegs.len(),
        first.width(),
        first.height(),
        folder.display(),
        jpegs.iter().map(Vec::len).sum::<usize>() / jpegs.len() / 1024
    );

    // Per round: medians per frame of each step.
    let mut steps: Vec<(&str, Vec<f64>)> = [
        "decode JPEG at full size",
        "resize to the side and normalise (SIMD resize, table lookup)",
        "for comparison: the former portable resize alone",
        "whole",
    ]
    .into_iter()
    .map(|name| (name, Vec::new()))
    .collect();
    for round in 0..=rounds {
        let mut samples = vec![Vec::new(); steps.len()];
        for bytes in &jpegs {
            let started = Instant::now();
            let image = decode(bytes, "frame").expect("decodes");
            let decoded = Instant::now();
            let full = to_planar(&image, side);
            let done = Instant::now();
            let before = Instant::now();
            let resized = image::imageops::resize(&image, side, side, image::imageops::FilterType::Triangle);
            let portable = before.elapsed();
            assert_eq!(resized.width(), side);
            assert_eq!(full.len(), 3 * (side * side) as usize);
            for (i, took) in [decoded - started, done - decoded, portable, done - started].into_iter().enumerate() {
                samples[i].push(took.as_secs_f64() * 1e3);
            }
        }
        if round > 0 {
            // Round 0 warms caches and the allocator.
            for ((_, medians), frame_samples) in steps.iter_mut().zip(&samples) {
                medians.push(median(frame_samples));
            }
        }
    }
    println!("| step (one thread) | ms per frame |");
    println!("|---|---|");
    for (name, medians) in &steps {
        println!("| {name} | {:.2} |", median(medians));
    }
    println!("| frames/s per core | {:.0} |", 1e3 / median(&steps[3].1));
}
