//! What the decode pool spends per frame: JPEG decoding, resizing to the model's side and normalising into
//! the planar input, measured separately on the same frames, interleaved over rounds, medians per frame.
//! At 5,000 frames/s on 16 cores a frame may cost a core at most 3.2 ms (issue 12).
//!
//!     cargo bench --bench decode                                  # juice_bottle's 400x800 frames, 256 px
//!     cargo bench --bench decode -- --frames DIR --side 256 --rounds 5
//!
//! Frames are re-encoded as JPEG (quality 90) first, as cameras send them.

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
            let image = lineguard::data::preprocess::load_image(path).expect("an image");
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

    let (mut decoding, mut preparing, mut whole, mut portable) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..=rounds {
        let mut decode_ms = Vec::new();
        let mut prepare_ms = Vec::new();
        let mut whole_ms = Vec::new();
        let mut portable_ms = Vec::new();
        for bytes in &jpegs {
            let started = Instant::now();
            let image = decode(bytes, "frame").expect("decodes");
            let decoded = Instant::now();
            let planar = to_planar(&image, side);
            let done = Instant::now();
            assert_eq!(planar.len(), 3 * (side * side) as usize);
            decode_ms.push((decoded - started).as_secs_f64() * 1e3);
            prepare_ms.push((done - decoded).as_secs_f64() * 1e3);
            whole_ms.push((done - started).as_secs_f64() * 1e3);
            // The resizer the decode pool used before (image's portable triangle filter), alone.
            let before = Instant::now();
            let resized = image::imageops::resize(&image, side, side, image::imageops::FilterType::Triangle);
            portable_ms.push(before.elapsed().as_secs_f64() * 1e3);
            assert_eq!(resized.width(), side);
        }
        if round > 0 {
            // Round 0 warms caches and the allocator.
            decoding.push(median(&decode_ms));
            preparing.push(median(&prepare_ms));
            whole.push(median(&whole_ms));
            portable.push(median(&portable_ms));
        }
    }
    println!("| step (one thread) | ms per frame |");
    println!("|---|---|");
    println!("| decode JPEG | {:.2} |", median(&decoding));
    println!("| resize to {side} px and normalise (SIMD resize, table lookup) | {:.2} |", median(&preparing));
    println!("| for comparison: the former portable resize alone | {:.2} |", median(&portable));
    println!("| whole | {:.2} |", median(&whole));
    println!("| frames/s per core | {:.0} |", 1e3 / median(&whole));
}
