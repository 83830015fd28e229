//! The embedded demo exactly as a newcomer runs it (`lineguard demo` with its defaults: its own broker and
//! data, the 600-step model, 3 frames/s; 8 to 13 minutes on 2 cores). Both acts must tell their story,
//! read from the demo's `summary.json`: the first act scores every tray and dead-letters the broken
//! messages; in the second the light changes, false alarms rise, the trainer promotes a model, and that
//! model raises fewer false alarms on fresh drifted trays while still catching anomalies.

mod common;

use common::{lineguard_ok, path_str, stdout};
use serde_json::Value;

fn rows<'a>(summary: &'a Value, scene: &str) -> Vec<&'a Value> {
    summary["rows"].as_array().unwrap().iter().filter(|r| r["scene"] == scene).collect()
}

fn count(row: &Value, field: &str) -> u64 {
    row[field].as_u64().unwrap()
}

#[test]
fn the_demo_retrains_under_new_light_and_promotes_a_model_with_fewer_false_alarms() {
    let dir = tempfile::tempdir().unwrap();
    let workdir = dir.path().join("demo");
    let output = lineguard_ok(&["demo", "--workdir", path_str(&workdir)]);
    let printed = stdout(&output);
    let text = std::fs::read_to_string(workdir.join("summary.json")).unwrap();
    let summary: Value = serde_json::from_str(&text).unwrap();
    eprintln!("{printed}");

    // Act 1: the 120 test trays scored once each by the model as built, the three broken messages with
    // their reasons.
    let as_built = rows(&summary, "as_built");
    let scored: u64 = as_built.iter().map(|r| count(r, "good") + count(r, "logical") + count(r, "structural")).sum();
    assert_eq!(scored, 120, "{text}");
    let mut reasons: Vec<&str> =
        summary["dead_letters"].as_array().unwrap().iter().map(|d| d["reason"].as_str().unwrap()).collect();
    reasons.sort();
    assert_eq!(reasons, ["decode", "empty", "missing_header"], "{text}");

    // Act 2: after the operator's verdicts a model with fewer false alarms on the gate's held-out frames
    // was promoted (half of them, the act's early end, is a draw of the first model on 2 cores: README,
    // "Known limitations"), and the fresh drifted trays were scored by the model before it and by the
    // promoted one.
    let retraining = &summary["retraining"];
    assert!(
        retraining["fewer_false_alarms_after_s"].is_f64(),
        "no promotion with fewer false alarms in the second act:\n{printed}"
    );
    eprintln!("half the held-out false alarms after {} s", retraining["half_the_false_alarms_after_s"]);
    assert!(retraining["marked_normal"].as_u64().unwrap() > 0, "{text}");
    let drifted = rows(&summary, "brighter_light");
    let (before, after) = (drifted.first().unwrap(), drifted.last().unwrap());
    assert!(count(after, "model_version") > count(before, "model_version"), "{text}");
    let rate = |row: &Value| count(row, "false_alarms") as f64 / count(row, "good") as f64;
    let caught = |row: &Value| {
        (count(row, "logical_caught") + count(row, "structural_caught")) as f64
            / (count(row, "logical") + count(row, "structural")) as f64
    };
    eprintln!(
        "false alarms under brighter light {:.2} (v{}) → {:.2} (v{}); anomalies caught {:.2} → {:.2}",
        rate(before),
        count(before, "model_version"),
        rate(after),
        count(after, "model_version"),
        caught(before),
        caught(after)
    );
    assert!(rate(before) >= 0.5, "the new light raises false alarms: {text}");
    assert!(rate(after) < rate(before), "the promoted model raises fewer: {text}");
    assert!(caught(after) >= 0.5, "the promoted model still catches anomalies: {text}");
    assert!(printed.contains("promoted: "), "the summary names the promotion:\n{printed}");
    // Each promotion builds on the one before: the trainer never mistakes its own earlier publication,
    // read back late from the models topic, for a rollback.
    let parents: Vec<u64> = retraining["gates"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["outcome"] == "promoted")
        .map(|g| g["current_version"].as_u64().unwrap())
        .collect();
    assert!(parents.windows(2).all(|w| w[0] < w[1]), "promoted from {parents:?}");
}

/// `lineguard demo --real DIR --model M`: the real juice_bottle images (400x800 JPEG) stream through the
/// same pipeline. The model is a narrow 3-step one (what it catches is not the point here); every test
/// image must be scored once, the broken messages, a cut-off JPEG among them, dead-lettered with their
/// reasons, and the synthetic line's second act must not play.
#[test]
fn the_demo_streams_a_real_category_with_a_given_model() {
    let Some(real) = common::shared_dataset("mvtec_loco_juice_bottle") else { return };
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.safetensors");
    common::train_tiny(&real, &model);
    let workdir = dir.path().join("demo");
    let output = lineguard_ok(&[
        "demo",
        "--real",
        path_str(&real),
        "--model",
        path_str(&model),
        "--workdir",
        path_str(&workdir),
        "--rate",
        "0",
        "--cpu",
    ]);
    let printed = stdout(&output);
    let text = std::fs::read_to_string(workdir.join("summary.json")).unwrap();
    let summary: Value = serde_json::from_str(&text).unwrap();
    let count_files = |split: &str| lineguard::data::loco::list_images(&real.join("test").join(split)).unwrap().len();
    let as_built = rows(&summary, "as_built");
    assert_eq!(as_built.len(), 1, "one model, one scene: {text}");
    let row = as_built[0];
    assert_eq!(count(row, "good") as usize, count_files("good"), "{text}");
    assert_eq!(count(row, "logical") as usize, count_files("logical_anomalies"), "{text}");
    assert_eq!(count(row, "structural"), 0, "{text}");
    let mut reasons: Vec<&str> =
        summary["dead_letters"].as_array().unwrap().iter().map(|d| d["reason"].as_str().unwrap()).collect();
    reasons.sort();
    assert_eq!(reasons, ["decode", "empty", "missing_header"], "{text}");
    assert!(rows(&summary, "brighter_light").is_empty() && !printed.contains("act 2"), "{printed}");
    assert!(printed.contains("mvtec_loco_juice_bottle"), "{printed}");
}
