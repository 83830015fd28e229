//! The PyTorch checkpoint reader and teacher import, against files written by real PyTorch 2.11
//! (`tests/fixtures/pth/make_fixtures.py` says how).

mod common;

use std::path::{Path, PathBuf};

use lineguard::model::pth::{read_state_dict, StateDict};
use lineguard::model::teacher::{map_pdn_teacher, ImportError, PdnShape};
use tch::{Kind, Tensor};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pth").join(name)
}

fn read(name: &str) -> StateDict {
    read_state_dict(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The tiny PDN of the fixtures: 3 -> 8 -> 16 -> 16 -> 12 channels with PDN-S kernels.
fn tiny_shape() -> PdnShape {
    PdnShape { convs: [[8, 3, 4, 4], [16, 8, 4, 4], [16, 16, 3, 3], [12, 16, 4, 4]] }
}

fn tiny_pdn_forward(weights: &std::collections::BTreeMap<String, Tensor>, x: &Tensor) -> Tensor {
    let conv = |x: &Tensor, i: usize| {
        x.conv2d(
            &weights[&format!("conv{i}.weight")],
            Some(&weights[&format!("conv{i}.bias")]),
            [1, 1],
            [0, 0],
            [1, 1],
            1,
        )
    };
    let pool = |x: Tensor| x.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None::<i64>);
    let x = pool(conv(x, 1).relu());
    let x = pool(conv(&x, 2).relu());
    let x = conv(&x, 3).relu();
    conv(&x, 4)
}

#[test]
fn zip_and_legacy_formats_hold_the_same_tensors_in_file_order() {
    let zipped = read("tiny_pdn_zip.pth");
    let legacy = read("tiny_pdn_legacy.pth");
    let names: Vec<&str> = zipped.tensors.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["0.weight", "0.bias", "3.weight", "3.bias", "6.weight", "6.bias", "8.weight", "8.bias"]);
    assert_eq!(legacy.tensors.len(), zipped.tensors.len());
    for ((name_a, a), (name_b, b)) in zipped.tensors.iter().zip(&legacy.tensors) {
        assert_eq!(name_a, name_b);
        assert_eq!(a.kind(), Kind::Float);
        assert!(a.equal(b), "{name_a} differs between the formats");
    }
    assert_eq!(zipped.get("3.weight").map(Tensor::size), Some(vec![16, 8, 4, 4]));
}

#[test]
fn imported_weights_compute_what_pytorch_computed() {
    let io = read("tiny_pdn_io.pth");
    let (input, expected) = (io.get("input").unwrap(), io.get("output").unwrap());
    assert_eq!(expected.size(), vec![1, 12, 2, 2]);
    for file in ["tiny_pdn_zip.pth", "tiny_pdn_legacy.pth", "tiny_pdn_wrapped.pth"] {
        let weights = map_pdn_teacher(&read(file), &tiny_shape(), &fixture(file)).unwrap();
        let output = tiny_pdn_forward(&weights, input);
        let error = (output - expected).abs().max().double_value(&[]);
        assert!(error < 1e-5, "{file}: max abs error {error}");
    }
    // Half precision: widened to f32 on import, within f16 rounding of the f32 result.
    let state = read("tiny_pdn_f16.pth");
    assert_eq!(state.get("0.weight").unwrap().kind(), Kind::Half);
    let weights = map_pdn_teacher(&state, &tiny_shape(), &fixture("tiny_pdn_f16.pth")).unwrap();
    assert_eq!(weights["conv1.weight"].kind(), Kind::Float);
    let error = (tiny_pdn_forward(&weights, input) - expected).abs().max().double_value(&[]);
    assert!(error < 1e-2, "f16 max abs error {error}");
}

#[test]
fn views_offsets_strides_and_other_dtypes_are_rebuilt() {
    for file in ["views_zip.pth", "views_legacy.pth"] {
        let state = read(file);
        let values = |name: &str| -> Vec<f64> {
            let t = state.get(name).unwrap_or_else(|| panic!("{file}: {name} missing"));
            Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
        };
        // base[:12].reshape(3, 4).t(): a 4x3 view with strides (1, 4).
        assert_eq!(state.get("transposed").unwrap().size(), vec![4, 3], "{file}");
        assert_eq!(values("transposed"), [0., 4., 8., 1., 5., 9., 2., 6., 10., 3., 7., 11.], "{file}");
        assert_eq!(values("sliced"), [5., 6., 7., 8.], "{file}");
        assert_eq!(values("doubles"), [0.5, -2.25], "{file}");
        assert_eq!(values("counter"), [7.], "{file}");
        assert_eq!(state.get("counter").unwrap().kind(), Kind::Int64, "{file}");
        assert_eq!(values("bf16"), [1.5, -3.0], "{file}");
    }
}

#[test]
fn wrong_shapes_name_the_key_and_both_shapes() {
    let path = fixture("tiny_pdn_zip.pth");
    let err = map_pdn_teacher(&read("tiny_pdn_zip.pth"), &PdnShape::small(384), &path).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ImportError::Shape { .. }), "{text}");
    assert!(text.contains("0.weight") && text.contains("[8, 3, 4, 4]") && text.contains("[128, 3, 4, 4]"), "{text}");
}

#[test]
fn files_that_are_not_teachers_or_not_state_dicts_are_refused_clearly() {
    // Views fixture: a state dict, but not of a PDN.
    let err = map_pdn_teacher(&read("views_zip.pth"), &tiny_shape(), &fixture("views_zip.pth")).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("not a PDN-S teacher") && text.contains("0.weight or conv1.weight"), "{text}");
    assert!(text.contains("transposed"), "the message lists what the file holds: {text}");

    // torch.save(model): a pickled module.
    let err = read_state_dict(&fixture("tiny_pdn_module.pth")).unwrap_err().to_string();
    assert!(err.contains("not a state dict") && err.contains("state_dict()"), "{err}");
}

#[test]
fn truncated_and_garbage_files_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["tiny_pdn_zip.pth", "tiny_pdn_legacy.pth"] {
        let bytes = std::fs::read(fixture(name)).unwrap();
        for fraction in [0.0, 0.01, 0.3, 0.6, 0.99] {
            let cut = dir.path().join(format!("cut_{fraction}_{name}"));
            std::fs::write(&cut, &bytes[..(bytes.len() as f64 * fraction) as usize]).unwrap();
            let result = read_state_dict(&cut);
            assert!(result.is_err(), "{name} cut at {fraction} was accepted");
        }
    }
    let garbage = dir.path().join("garbage.pth");
    std::fs::write(&garbage, b"definitely not a checkpoint").unwrap();
    let err = read_state_dict(&garbage).unwrap_err().to_string();
    assert!(err.contains("not a PyTorch checkpoint"), "{err}");
    let err = read_state_dict(&dir.path().join("absent.pth")).unwrap_err().to_string();
    assert!(err.contains("cannot read checkpoint"), "{err}");
}

#[test]
fn import_teacher_command_reports_a_mismatch_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("teacher.safetensors");
    let output = common::lineguard(&[
        "import-teacher",
        common::path_str(&fixture("tiny_pdn_legacy.pth")),
        "--out",
        common::path_str(&out),
    ]);
    assert!(!output.status.success());
    let err = common::stderr(&output);
    assert!(
        err.contains("key 0.weight has shape [8, 3, 4, 4]") && err.contains("PDN-S expects [128, 3, 4, 4]"),
        "{err}"
    );
    assert!(!out.exists(), "nothing is written on failure");
}
