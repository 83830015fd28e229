//! Property-based fuzzing of every parser that reads bytes from outside: camera frames and their
//! headers (the message contract), the models topic's chunks and manifests, and PyTorch checkpoints.
//! Inputs are random bytes and mutations (overwritten bytes, truncation, insertion) of valid seeds.
//! Nothing may panic; bad frames must come back with a reason and their original bytes; reassembly must
//! stay within its memory limit; decoded images within their limits.
//!
//! CI runs `FUZZ_CASES` cases per property (default 2,000, a few seconds). Longer runs:
//! `FUZZ_CASES=100000 cargo test --release --test fuzz`.
//!
//! Coverage-guided fuzzing (`scripts/fuzz.sh`, libFuzzer through `cargo +nightly fuzz`) checks the same
//! properties and one more, AU-sPRO against its definition (`fuzz/harness.rs`); the inputs it keeps are
//! committed in `fuzz/corpus` and replayed here on every run, with the seeds it starts from (`fuzz/seeds`).

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::time::Instant;

use lineguard::data::preprocess::{decode_within, DecodeLimits};
use lineguard::service::ack::OffsetTracker;
use lineguard::service::frame::RejectReason;
use lineguard::service::preprocess::{prepare, PoolConfig};
use lineguard::service::retrain::models_topic::Assembler;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

#[path = "../fuzz/harness.rs"]
mod harness;

fn cases() -> u32 {
    std::env::var("FUZZ_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(2000)
}

fn runner() -> TestRunner {
    // No regression files in the repository: a failure prints its minimal input.
    TestRunner::new(Config { cases: cases(), failure_persistence: None, ..Config::default() })
}

/// Overwrites, then truncates or extends, a copy of `seed`.
#[derive(Debug, Clone)]
struct Mutation {
    writes: Vec<(usize, u8)>,
    cut: Option<usize>,
    extra: Vec<u8>,
}

impl Mutation {
    fn apply(&self, seed: &[u8]) -> Vec<u8> {
        let mut bytes = seed.to_vec();
        if !bytes.is_empty() {
            for &(at, value) in &self.writes {
                let len = bytes.len();
                bytes[at % len] = value;
            }
        }
        if let Some(cut) = self.cut {
            bytes.truncate(cut % (seed.len() + 1));
        }
        bytes.extend_from_slice(&self.extra);
        bytes
    }
}

fn mutation() -> impl Strategy<Value = Mutation> {
    (
        prop::collection::vec((any::<usize>(), any::<u8>()), 0..12),
        prop::option::of(any::<usize>()),
        prop::collection::vec(any::<u8>(), 0..16),
    )
        .prop_map(|(writes, cut, extra)| Mutation { writes, cut, extra })
}

/// Either random bytes or a mutation of one of `seeds`.
fn input(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let count = seeds.len();
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        (0..count, mutation()).prop_map(move |(seed, mutation)| mutation.apply(&seeds[seed])),
    ]
}

fn encoded(format: image::ImageFormat, side: u32) -> Vec<u8> {
    let picture = image::RgbImage::from_fn(side, side, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, 90]));
    let mut bytes = Cursor::new(Vec::new());
    picture.write_to(&mut bytes, format).unwrap();
    bytes.into_inner()
}

fn image_seeds() -> Vec<Vec<u8>> {
    vec![
        encoded(image::ImageFormat::Png, 40),
        encoded(image::ImageFormat::Jpeg, 40),
        encoded(image::ImageFormat::Png, 16),
    ]
}

const LIMITS: DecodeLimits = DecodeLimits { max_width: 512, max_height: 512, max_pixels: 512 * 300 };

fn report(property: &str, started: Instant) {
    eprintln!("fuzz {property}: {} cases in {:.1}s", cases(), started.elapsed().as_secs_f64());
}

#[test]
fn frames_decode_within_the_limits_or_fail_with_an_error() {
    let started = Instant::now();
    runner()
        .run(&input(image_seeds()), |bytes| {
            if let Ok(image) = decode_within(&bytes, "fuzz", &LIMITS) {
                let (width, height) = image.dimensions();
                prop_assert!(width <= LIMITS.max_width && height <= LIMITS.max_height);
                prop_assert!((width as u64 * height as u64) <= LIMITS.max_pixels);
            }
            Ok(())
        })
        .unwrap();
    report("decode", started);
}

/// Headers drawn from the contract's names (and others), with valid-looking or random values.
fn headers() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    let name = prop_oneof![
        Just("camera_id".to_string()),
        Just("captured_at_ms".to_string()),
        Just("line_id".to_string()),
        "[a-z_]{0,12}",
    ];
    let value = prop_oneof![
        Just(b"1700000000000".to_vec()),
        Just(b"cam-1".to_vec()),
        "-?[0-9]{0,20}".prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..24),
    ];
    prop::collection::vec((name, value), 0..5)
}

#[test]
fn every_consumed_frame_is_prepared_or_rejected_with_its_reason_and_bytes() {
    let started = Instant::now();
    let config = PoolConfig {
        workers: 1,
        side: 32,
        max_frame_bytes: 4096,
        expected_size: None,
        decode_limits: LIMITS,
        keep_payload: false,
    };
    let tracker = OffsetTracker::new();
    let offsets = std::sync::atomic::AtomicI64::new(0);
    runner()
        .run(&(input(image_seeds()), headers()), |(payload, headers)| {
            let offset = offsets.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            match prepare(&config, harness::raw_frame(payload.clone(), headers, &tracker, offset)) {
                Ok(prepared) => prop_assert_eq!(prepared.input.len(), 3 * 32 * 32),
                Err(rejected) => {
                    prop_assert!(RejectReason::ALL.contains(&rejected.reason));
                    prop_assert!(!rejected.detail.is_empty(), "a reason an operator can read");
                    prop_assert_eq!(&rejected.payload, &payload, "the original bytes go to the dead letter");
                }
            }
            Ok(())
        })
        .unwrap();
    report("message contract", started);
}

/// A record of the models topic: key, publication header, payload.
fn models_record() -> impl Strategy<Value = (String, Option<String>, Vec<u8>)> {
    let key = prop_oneof![
        Just("trays/manifest".to_string()),
        (0u32..4).prop_map(|i| format!("trays/chunk/{i}")),
        "[a-z/0-9]{0,16}",
    ];
    let publication = prop::option::of(prop_oneof![Just("p1".to_string()), Just("p2".to_string()), "[a-z0-9]{0,6}"]);
    let manifest = (0u64..3, 0u32..5, 0u64..5000, "[0-9a-f]{0,16}").prop_map(|(version, chunks, bytes, checksum)| {
        format!(
            r#"{{"line":"trays","model_version":{version},"publication":"p1","chunks":{chunks},"bytes":{bytes},
                "checksum":"{checksum}","published_unix":0,"origin":"promoted"}}"#
        )
        .into_bytes()
    });
    let payload = prop_oneof![prop::collection::vec(any::<u8>(), 0..2048), manifest];
    (key, publication, payload)
}

#[test]
fn models_topic_records_never_panic_and_reassembly_stays_bounded() {
    let started = Instant::now();
    const LIMIT: usize = 4096;
    runner()
        .run(&prop::collection::vec(models_record(), 0..40), |records| {
            let mut assembler = Assembler::with_limit("trays", None, LIMIT);
            for (key, publication, payload) in &records {
                if let Some(published) =
                    assembler.offer(key.as_bytes(), publication.as_deref().map(str::as_bytes), payload)
                {
                    prop_assert_eq!(published.model.len() as u64, published.manifest.bytes);
                }
                prop_assert!(assembler.held_bytes() <= LIMIT);
            }
            Ok(())
        })
        .unwrap();
    report("models topic", started);
}

fn pth_fixtures() -> Vec<Vec<u8>> {
    let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pth");
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&folder)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path: &PathBuf| path.extension().is_some_and(|e| e == "pth"))
        .map(|path| std::fs::read(path).unwrap())
        .collect();
    // pickle.dumps({'a': [1, 2**40, -3], 'b': ('x', True, None, 1.5)}, protocol=2): a bare pickle.
    seeds.push(b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01\x8a\x06\x00\x00\x00\x00\x00\x01J\xfd\xff\xff\xffeX\x01\x00\x00\x00bq\x03(X\x01\x00\x00\x00xq\x04\x88NG?\xf8\x00\x00\x00\x00\x00\x00tq\x05u.".to_vec());
    seeds
}

#[test]
fn checkpoints_and_pickles_never_panic() {
    let started = Instant::now();
    runner()
        .run(&input(pth_fixtures()), |bytes| {
            let _ = lineguard::model::pth::parse_state_dict(&bytes, Path::new("fuzz.pth"));
            let _ = lineguard::model::pth::pickle::load(&bytes);
            Ok(())
        })
        .unwrap();
    report("checkpoints", started);
}

fn files_in(folder: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(folder) {
        Ok(entries) => entries.map(|entry| entry.unwrap().path()).filter(|path| path.is_file()).collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

fn fuzz_folder(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join(kind)
}

/// The inputs of a packed corpus (`scripts/fuzz.sh`: each a 4-byte little-endian length and its bytes).
fn unpack(packed: &[u8]) -> Vec<&[u8]> {
    let mut inputs = Vec::new();
    let mut rest = packed;
    while !rest.is_empty() {
        let (length, tail) = rest.split_at(4);
        let length = u32::from_le_bytes(length.try_into().unwrap()) as usize;
        let (input, tail) = tail.split_at(length);
        inputs.push(input);
        rest = tail;
    }
    inputs
}

/// The seeds the coverage-guided fuzzer starts from, and every input it kept, pass their target's checks.
#[test]
fn the_coverage_guided_corpus_replays_cleanly() {
    for (target, check) in harness::TARGETS {
        let started = Instant::now();
        let seeds: Vec<(String, Vec<u8>)> = files_in(&fuzz_folder("seeds").join(target))
            .into_iter()
            .map(|path| (path.display().to_string(), std::fs::read(&path).unwrap()))
            .collect();
        let packed = std::fs::read(fuzz_folder("corpus").join(format!("{target}.corpus"))).unwrap_or_default();
        let corpus = unpack(&packed);
        assert!(!corpus.is_empty(), "{target}: no fuzz/corpus/{target}.corpus (scripts/fuzz.sh writes it)");
        let named = seeds.iter().map(|(name, bytes)| (name.clone(), bytes.as_slice()));
        let found = corpus.iter().enumerate().map(|(i, bytes)| (format!("corpus input {i}"), *bytes));
        for (name, bytes) in named.chain(found) {
            let outcome = std::panic::catch_unwind(|| check(bytes));
            assert!(outcome.is_ok(), "{target}: {name} fails its check");
        }
        eprintln!(
            "fuzz {target}: {} seeds and {} corpus inputs replayed in {:.1}s",
            seeds.len(),
            corpus.len(),
            started.elapsed().as_secs_f64()
        );
    }
}

/// The seeds stay what the fuzzer needs to start well: the model-file seeds (a header, a recipe) make a
/// valid model, the frame seeds are frames that decode. `FUZZ_WRITE_SEEDS=1` writes them again (after a change of
/// the model format).
#[test]
fn the_fuzzers_seeds_are_valid_inputs() {
    let mut seeds: Vec<(&str, &str, Vec<u8>)> = vec![
        ("frame", "png", harness::frame_input(&encoded(image::ImageFormat::Png, 40))),
        ("frame", "jpeg", harness::frame_input(&encoded(image::ImageFormat::Jpeg, 40))),
    ];
    seeds.extend(harness::model_file_seeds().into_iter().map(|(name, bytes)| ("model_file", name, bytes)));
    if std::env::var_os("FUZZ_WRITE_SEEDS").is_some() {
        for (target, name, bytes) in &seeds {
            let folder = fuzz_folder("seeds").join(target);
            std::fs::create_dir_all(&folder).unwrap();
            std::fs::write(folder.join(name), bytes).unwrap();
        }
    }
    for (name, _) in harness::model_file_seeds() {
        let seed = std::fs::read(fuzz_folder("seeds").join("model_file").join(name)).unwrap();
        assert!(harness::load_model_file(&seed).is_ok(), "the committed model-file seed {name} no longer loads");
    }
    for name in ["png", "jpeg"] {
        let bytes = std::fs::read(fuzz_folder("seeds").join("frame").join(name)).unwrap();
        let prepared = harness::prepare_frame(&bytes);
        assert!(matches!(prepared, Some(Ok(_))), "the committed {name} frame seed no longer decodes");
    }
}
