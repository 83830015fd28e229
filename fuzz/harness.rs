#![allow(dead_code)] // each fuzz target uses one of these checks
//! What each fuzz target checks, shared by the coverage-guided targets (`fuzz_targets/`, built with
//! `cargo +nightly fuzz`, see `scripts/fuzz.sh`) and the stable test suite (`tests/fuzz.rs`), which replays
//! the committed seeds and the corpus the fuzzer found (`fuzz/seeds`, `fuzz/corpus`) on every CI run.
//! Every function takes raw bytes, as libFuzzer gives them, and panics only when a property fails.

use std::path::Path;
use std::sync::OnceLock;
use std::time::Instant;

use arbitrary::{Arbitrary, Unstructured};
use lineguard::data::preprocess::DecodeLimits;
use lineguard::eval::metrics::{au_spro, au_spro_by_definition, DefectRegion};
use lineguard::model::config::Recipe;
use lineguard::model::{EfficientAd, MapQuantiles};
use lineguard::service::ack::{OffsetTracker, TopicPartition};
use lineguard::service::frame::{
    FrameMeta, PreparedFrame, RawFrame, RejectReason, RejectedFrame, SourcePosition, StageTimings,
};
use lineguard::service::preprocess::{prepare, PoolConfig};
use lineguard::service::retrain::models_topic::Assembler;
use lineguard::service::settings::Secret;
use tch::{Device, Kind, Tensor};

/// A target's checks on one input: panics when a property fails.
pub type Check = fn(&[u8]);

/// The targets, by the name of their folder in `fuzz/seeds` and of their file in `fuzz/corpus`.
pub const TARGETS: [(&str, Check); 5] = [
    ("checkpoint", checkpoint),
    ("frame", frame),
    ("models_topic", models_topic),
    ("model_file", model_file),
    ("spro", spro),
];

/// PyTorch checkpoints (`import-teacher`): our reader of PyTorch's zip and legacy formats and of the
/// pickle subset inside them returns tensors or an error, and every element of a tensor it returns can
/// be read (summing touches the whole view, strides and offset included).
pub fn checkpoint(bytes: &[u8]) {
    let _ = lineguard::model::pth::pickle::load(bytes);
    if let Ok(state) = lineguard::model::pth::parse_state_dict(bytes, Path::new("fuzz.pth")) {
        for (name, tensor) in &state.tensors {
            let read = tensor.f_to_kind(Kind::Double).and_then(|t| t.f_sum(Kind::Double));
            assert!(read.is_ok(), "{name}: {:?}", read.err());
        }
    }
}

/// Header values the first byte of a `frame` input chooses from, two bits per contract header:
/// absent, valid, or one of two invalid values.
const CAMERA: [Option<&[u8]>; 4] = [None, Some(b"cam-1"), Some(b" "), Some(b"\xff\xfe")];
const CAPTURED_AT: [Option<&[u8]>; 4] = [None, Some(b"1700000000000"), Some(b"-5"), Some(b"12:00")];
const LINE: [Option<&[u8]>; 4] = [None, Some(b"line"), Some(b"another"), Some(b"\xc3")];
const SIDE: u32 = 32;

/// A consumed frame as the decode pool sees it: prepared (decoded within the limits, resized to the
/// model's side) or rejected with a listed reason, a readable detail and its original bytes for the
/// dead-letter topic. The first byte chooses the headers (two bits each: camera, capture time, line) and
/// whether the line expects 40x40 images (bit 6); the rest is the payload, so that image files seed it.
pub fn frame(bytes: &[u8]) {
    let Some((_, payload)) = bytes.split_first() else { return };
    match prepare_frame(bytes) {
        Some(Ok(prepared)) => assert_eq!(prepared.input.len(), (3 * SIDE * SIDE) as usize),
        Some(Err(rejected)) => {
            assert!(RejectReason::ALL.contains(&rejected.reason));
            assert!(!rejected.detail.is_empty(), "a reason an operator can read");
            assert_eq!(rejected.payload, payload, "the original bytes go to the dead letter");
        }
        None => {}
    }
}

/// A `frame` input of `payload` with every contract header valid.
pub fn frame_input(payload: &[u8]) -> Vec<u8> {
    [&[0b01_01_01u8][..], payload].concat()
}

/// What the decode pool makes of a `frame` input (none when it is empty).
pub fn prepare_frame(bytes: &[u8]) -> Option<Result<PreparedFrame, Box<RejectedFrame>>> {
    let (&choice, payload) = bytes.split_first()?;
    let pick = |values: &[Option<&'static [u8]>; 4], shift: u8| values[usize::from((choice >> shift) & 3)];
    let headers =
        [("camera_id", pick(&CAMERA, 0)), ("captured_at_ms", pick(&CAPTURED_AT, 2)), ("line_id", pick(&LINE, 4))]
            .into_iter()
            .filter_map(|(name, value)| Some((name.to_string(), value?.to_vec())))
            .collect();
    let config = PoolConfig {
        workers: 1,
        side: SIDE,
        max_frame_bytes: 1 << 20,
        expected_size: (choice & 0x40 != 0).then_some([40, 40]),
        decode_limits: DecodeLimits { max_width: 1024, max_height: 1024, max_pixels: 1 << 18 },
        keep_payload: false,
    };
    Some(prepare(&config, raw_frame(payload.to_vec(), headers, &OffsetTracker::new(), 0)))
}

/// A frame as the source stage hands it on: consumed from line `line`'s topic `frames` at `offset`.
pub fn raw_frame(payload: Vec<u8>, headers: Vec<(String, Vec<u8>)>, tracker: &OffsetTracker, offset: i64) -> RawFrame {
    RawFrame {
        meta: FrameMeta {
            frame_id: format!("fuzz-{offset}"),
            line: "line".into(),
            source: SourcePosition { topic: "frames".into(), partition: 0, offset },
            headers,
            received_at: Instant::now(),
            timings: StageTimings::default(),
        },
        payload,
        oversized_key: None,
        ack: tracker.register(TopicPartition { topic: "frames".into(), partition: 0 }, offset, None),
    }
}

#[derive(Debug, Arbitrary)]
struct Record {
    /// 0: the line's manifest, 1..=4: one of its chunks, else `other` is the key.
    kind: u8,
    other: Vec<u8>,
    publication: Option<Vec<u8>>,
    payload: Vec<u8>,
}

const REASSEMBLY_LIMIT: usize = 4096;

/// The models topic as a follower reads it, any sequence of records from whoever can write to it:
/// reassembly never holds more than its limit and completes only publications as long as their manifest
/// says; a follower with a signing key completes none (the records cannot carry its signature).
pub fn models_topic(bytes: &[u8]) {
    let Ok(records) = Vec::<Record>::arbitrary_take_rest(Unstructured::new(bytes)) else { return };
    let mut assembler = Assembler::with_limit("trays", None, REASSEMBLY_LIMIT);
    let mut signed = Assembler::with_limit("trays", Some(Secret::new("the line's key")), REASSEMBLY_LIMIT);
    for record in &records {
        let key = match record.kind {
            0 => b"trays/manifest".to_vec(),
            i @ 1..=4 => format!("trays/chunk/{}", i - 1).into_bytes(),
            _ => record.other.clone(),
        };
        let publication = record.publication.as_deref();
        if let Some(published) = assembler.offer(&key, publication, &record.payload) {
            assert_eq!(published.model.len() as u64, published.manifest.bytes);
            assert!(published.model.len() <= REASSEMBLY_LIMIT);
        }
        assert!(assembler.held_bytes() <= REASSEMBLY_LIMIT);
        assert!(signed.offer(&key, publication, &record.payload).is_none(), "an unsigned publication completed");
    }
}

/// A valid model file of the smallest recipe, cut into its safetensors header (JSON, as bytes and parsed)
/// and its tensor data.
struct ValidModel {
    header: Vec<u8>,
    parsed_header: serde_json::Value,
    data: Vec<u8>,
}

fn valid_model() -> &'static ValidModel {
    static VALID: OnceLock<ValidModel> = OnceLock::new();
    VALID.get_or_init(|| {
        let recipe = Recipe { image_size: 128, channels: 1, ..Recipe::default() };
        let mut model = EfficientAd::new(recipe, Device::Cpu).expect("the smallest recipe builds");
        model.map_quantiles = Some(MapQuantiles { student_teacher: (0.1, 0.2), autoencoder: (0.1, 0.3) });
        let bytes = model.to_bytes().expect("a fresh model serialises");
        let length = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
        let header = bytes[8..8 + length].to_vec();
        let parsed_header = serde_json::from_slice(&header).expect("a model file's header is JSON");
        ValidModel { header, parsed_header, data: bytes[8 + length..].to_vec() }
    })
}

/// How the rest of a `model_file` input makes a file, by its first byte modulo 3.
const WHOLE_FILE: u8 = 0;
const HEADER: u8 = 1;
const RECIPE: u8 = 2;

/// The model a `model_file` input makes: the rest of the input is the whole file, or the safetensors
/// header (JSON: metadata, tensor names, types, shapes and offsets) in front of a valid model's tensor
/// data, or the recipe (JSON) in a valid model's metadata. The last two keep the fuzzer where the
/// structure is rather than in megabytes of weights.
pub fn load_model_file(bytes: &[u8]) -> Result<EfficientAd, lineguard::error::WeightsError> {
    let file = match bytes.split_first() {
        None => Vec::new(),
        Some((mode, rest)) => match mode % 3 {
            WHOLE_FILE => rest.to_vec(),
            HEADER => with_header(rest),
            _ => {
                let mut header = valid_model().parsed_header.clone();
                header["__metadata__"]["recipe"] = String::from_utf8_lossy(rest).into();
                with_header(&serde_json::to_vec(&header).expect("JSON serialises"))
            }
        },
    };
    tch::set_num_threads(1);
    EfficientAd::from_bytes(&file, Path::new("fuzz.safetensors"), Device::Cpu)
}

fn with_header(header: &[u8]) -> Vec<u8> {
    [&(header.len() as u64).to_le_bytes()[..], header, &valid_model().data].concat()
}

/// The seeds of `model_file`, by name: a valid model's header, and its recipe.
pub fn model_file_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let recipe = valid_model().parsed_header["__metadata__"]["recipe"].as_str().expect("the recipe is in the metadata");
    vec![
        ("valid-header", [&[HEADER][..], &valid_model().header].concat()),
        ("valid-recipe", [&[RECIPE][..], recipe.as_bytes()].concat()),
    ]
}

/// A model file as a replica receives it (the models topic, a user's path; see [`load_model_file`]): it
/// loads or fails with an error, and a model that loads scores an image of its input size (a file that
/// loads but cannot serve would take a line down at the swap).
pub fn model_file(bytes: &[u8]) {
    let Ok(model) = load_model_file(bytes) else { return };
    let side = model.recipe.image_size;
    let image = Tensor::zeros([1, 3, side, side], (Kind::Float, Device::Cpu));
    if let Ok(maps) = model.anomaly_maps(&image, 40, 30) {
        assert_eq!(maps.size(), [1, 40, 30]);
    }
}

/// LOCO's AU-sPRO (our own implementation, see `eval::metrics`) against its definition computed the slow
/// way, on small maps with many tied scores, overlapping regions, all saturation kinds and limits.
pub fn spro(bytes: &[u8]) {
    let mut input = Unstructured::new(bytes);
    let Ok(case) = spro_case(&mut input) else { return };
    let (good, anomalous, max_fpr) = case;
    let good_refs: Vec<&[f32]> = good.iter().map(Vec::as_slice).collect();
    let anomalous_refs: Vec<(&[f32], &[DefectRegion])> =
        anomalous.iter().map(|(map, regions)| (map.as_slice(), regions.as_slice())).collect();
    let fast = au_spro(&good_refs, &anomalous_refs, max_fpr);
    let regions: usize = anomalous.iter().map(|(_, r)| r.len()).sum();
    let negatives = good.iter().map(Vec::len).sum::<usize>()
        + anomalous
            .iter()
            .map(|(map, regions)| {
                let inside: std::collections::HashSet<u32> =
                    regions.iter().flat_map(|r| r.pixels.iter().copied()).collect();
                map.len() - inside.len()
            })
            .sum::<usize>();
    match fast {
        None => assert!(regions == 0 || negatives == 0, "{regions} regions, {negatives} negative pixels"),
        Some(fast) => {
            let slow = au_spro_by_definition(&good, &anomalous, max_fpr);
            assert!((fast - slow).abs() < 1e-9, "au_spro {fast} against {slow} by definition");
            assert!((0.0..=1.0 + 1e-12).contains(&fast));
        }
    }
}

type SproCase = (Vec<Vec<f32>>, Vec<(Vec<f32>, Vec<DefectRegion>)>, f64);

fn spro_case(input: &mut Unstructured) -> arbitrary::Result<SproCase> {
    let (width, height) = (input.int_in_range(1..=8usize)?, input.int_in_range(1..=6usize)?);
    // Few levels: ties within and across classes are where a sweep goes wrong.
    let levels = input.int_in_range(1..=16u8)?;
    let map = |input: &mut Unstructured| -> arbitrary::Result<Vec<f32>> {
        (0..width * height).map(|_| Ok(f32::from(input.int_in_range(0..=levels)?) / f32::from(levels))).collect()
    };
    let good = (0..input.int_in_range(0..=3)?).map(|_| map(input)).collect::<arbitrary::Result<_>>()?;
    let mut anomalous = Vec::new();
    for _ in 0..input.int_in_range(1..=3)? {
        let scores = map(input)?;
        let mut regions = Vec::new();
        for _ in 0..input.int_in_range(0..=3)? {
            let (x0, y0) = (input.int_in_range(0..=width - 1)?, input.int_in_range(0..=height - 1)?);
            let (x1, y1) = (input.int_in_range(x0..=width - 1)?, input.int_in_range(y0..=height - 1)?);
            let pixels: Vec<u32> = (y0..=y1).flat_map(|y| (x0..=x1).map(move |x| (y * width + x) as u32)).collect();
            let area = pixels.len() as f64;
            // Saturation below, at and above the region's area (LOCO saturates by pixel count).
            let saturation = area * f64::from(input.int_in_range(1..=20u8)?) / 10.0;
            regions.push(DefectRegion { pixels, saturation });
        }
        anomalous.push((scores, regions));
    }
    let max_fpr = match input.int_in_range(0..=4u8)? {
        0 => 0.05,
        1 => 1.0,
        _ => f64::from(input.int_in_range(1..=255u8)?) / 255.0,
    };
    Ok((good, anomalous, max_fpr))
}
