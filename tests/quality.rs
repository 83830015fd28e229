//! Detection quality on the synthetic line: train a small DFSC model, then evaluate it. This is the test
//! that says the model core learns something real; it takes a few minutes on 2 cores.
//!
//! One test in its own binary so that it has the cores to itself.

mod common;

use common::{lineguard_ok, path_str, stdout};

/// Settings chosen from runs on this machine (see README, "Measured"): 128 px, short schedule with a
/// faster warm-up and a larger learning rate than the paper's 70,000-step recipe.
const RECIPE: &str = r#"
preset = "dfsc"
image_size = 128
[train]
steps = 400
learning_rate = 5e-4
warmup_beta2 = 0.99
checkpoint_every = 0
"#;

#[test]
fn dfsc_detects_logical_anomalies_on_the_synthetic_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let recipe = dir.path().join("recipe.toml");
    let model = dir.path().join("model.safetensors");
    std::fs::write(&recipe, RECIPE).unwrap();
    lineguard_ok(&["synth", "--out", path_str(&data), "--image-size", "128", "--seed", "11"]);
    lineguard_ok(&["train", "--data", path_str(&data), "-c", path_str(&recipe), "--out", path_str(&model)]);
    let out = lineguard_ok(&["eval", "--model", path_str(&model), "--data", path_str(&data), "--json"]);
    let report: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    eprintln!("synthetic line, DFSC 400 steps at 128 px: {report}");
    let logical = report["image_auroc"]["logical"].as_f64().unwrap();
    let structural = report["image_auroc"]["structural"].as_f64().unwrap();
    assert!(logical >= LOGICAL_AUROC_FLOOR, "logical image AUROC {logical:.3} < {LOGICAL_AUROC_FLOOR}");
    assert!(structural >= STRUCTURAL_AUROC_FLOOR, "structural image AUROC {structural:.3} < {STRUCTURAL_AUROC_FLOOR}");
}

const LOGICAL_AUROC_FLOOR: f64 = 0.9;
const STRUCTURAL_AUROC_FLOOR: f64 = 0.9;
