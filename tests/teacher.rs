//! The EfficientNet-Lite0 backbone on real ImageNet images, teacher distillation (resumable), the
//! distilled teacher in training, and the quality benchmark command end to end at toy sizes.

mod common;

use std::path::{Path, PathBuf};

use common::{lineguard_ok, path_str, shared_dataset};
use lineguard::model::backbone::{EfficientNetLite0, CHECKPOINT_NAME};
use lineguard::model::distill::{DistillConfig, Distiller};
use tch::{Device, Kind, Tensor};

/// Installed by `scripts/setup.sh` (the test command runs it first).
fn backbone_checkpoint() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(".weights").join(CHECKPOINT_NAME);
    assert!(path.is_file(), "{} is missing: run scripts/setup.sh backbone", path.display());
    path
}

/// Resize the shorter side to 224, centre crop 224x224, [1, 3, 224, 224] pixels in [0, 1].
fn centre_crop_224(path: &Path) -> Tensor {
    let image = lineguard::data::preprocess::load_image(path).unwrap();
    let scale = 224.0 / image.width().min(image.height()) as f64;
    let (w, h) = ((image.width() as f64 * scale).round() as u32, (image.height() as f64 * scale).round() as u32);
    let resized = image::imageops::resize(&image, w, h, image::imageops::FilterType::Triangle);
    let crop = image::imageops::crop_imm(&resized, (w - 224) / 2, (h - 224) / 2, 224, 224).to_image();
    Tensor::from_slice(crop.as_raw()).reshape([224, 224, 3]).permute([2, 0, 1]).unsqueeze(0).to_kind(Kind::Float)
        / 255.0
}

#[test]
fn backbone_classifies_imagenet_samples_into_their_labelled_class() {
    let Some(samples) = shared_dataset("imagenet_samples") else { return };
    let net = EfficientNetLite0::load(&backbone_checkpoint(), Device::Cpu).unwrap();
    // One image per class; sorted by WordNet id, the file order is the class index.
    let files = lineguard::data::loco::list_images(&samples).unwrap();
    assert_eq!(files.len(), 1000);
    let mut correct = 0;
    let mut checked = 0;
    for (class, file) in files.iter().enumerate().step_by(25) {
        let logits = tch::no_grad(|| net.classify(&EfficientNetLite0::scale_input(&centre_crop_224(file))));
        assert_eq!(logits.size(), vec![1, 1000]);
        checked += 1;
        if logits.argmax(1, false).int64_value(&[0]) == class as i64 {
            correct += 1;
        }
    }
    // Measured: 33 of 40 (EfficientNet-Lite0's published top-1 is 75%). A wrong block layout, padding or
    // input scaling drops this to chance.
    assert!(correct >= 28, "{correct} of {checked} sample images classified correctly");
}

fn few_images(n: usize) -> Option<Vec<PathBuf>> {
    let samples = shared_dataset("imagenet_samples")?;
    let files = lineguard::data::loco::list_images(&samples).unwrap();
    Some(files.into_iter().step_by(97).take(n).collect())
}

fn pixels(files: &[PathBuf], side: u32) -> Tensor {
    lineguard::data::preprocess::denormalise(&lineguard::data::loco::load_inputs(files, side, &|| {}).unwrap())
        .clamp(0.0, 1.0)
}

fn tiny_config() -> DistillConfig {
    DistillConfig {
        image_size: 128,
        batch_size: 2,
        steps: 4,
        statistics_images: 4,
        seed: 3,
        ..DistillConfig::default()
    }
}

#[test]
fn distillation_targets_fit_the_teacher_and_resume_exactly() {
    let Some(files) = few_images(6) else { return };
    let config = tiny_config();
    assert_eq!(config.backbone_side(), 192);
    let images = pixels(&files, config.backbone_side() as u32);
    let load = || EfficientNetLite0::load(&backbone_checkpoint(), Device::Cpu).unwrap();

    let mut straight = Distiller::new(config.clone(), load(), &images).unwrap();
    // The stride-8 grid of a 192 px backbone input matches the PDN's 24x24 output at 128 px.
    assert_eq!(straight.raw_targets(&images.narrow(0, 0, 1)).size(), vec![1, 384, 24, 24]);
    let mut losses = Vec::new();
    while !straight.is_done() {
        losses.push(straight.step().unwrap());
    }
    assert!(losses.iter().all(|l| l.is_finite() && *l > 0.0), "{losses:?}");

    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("distill.safetensors");
    let mut first_half = Distiller::new(config, load(), &images).unwrap();
    first_half.step().unwrap();
    first_half.step().unwrap();
    first_half.save_checkpoint(&checkpoint).unwrap();
    drop(first_half);
    let mut resumed = Distiller::resume(&checkpoint, load(), &images, None).unwrap();
    assert_eq!(resumed.step_index(), 2);
    let mut resumed_losses = Vec::new();
    while !resumed.is_done() {
        resumed_losses.push(resumed.step().unwrap());
    }
    assert_eq!(resumed_losses.len(), 2);
    for (a, b) in losses[2..].iter().zip(&resumed_losses) {
        assert!((a - b).abs() < 1e-4 * a.abs().max(1.0), "resumed loss {b} vs uninterrupted {a}");
    }
    let (a, b) = (straight.teacher_tensors(), resumed.teacher_tensors());
    for (name, tensor) in &a {
        let diff = (tensor - &b[name]).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{name} differs by {diff} after resuming");
    }
}

/// A folder `images` in `dir` holding the first `n` ImageNet samples (None without the shared data).
fn image_folder(dir: &Path, n: usize) -> Option<PathBuf> {
    let files = few_images(n)?;
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    for file in &files {
        std::fs::copy(file, images.join(file.file_name().unwrap())).unwrap();
    }
    Some(images)
}

#[test]
fn a_distilled_teacher_trains_a_model_and_the_quality_benchmark_reports_every_run() {
    let dir = tempfile::tempdir().unwrap();
    let Some(images) = image_folder(dir.path(), 4) else { return };
    let teacher = dir.path().join("teacher.safetensors");
    let backbone = backbone_checkpoint();
    let output = lineguard_ok(&[
        "distill-teacher",
        "--images",
        path_str(&images),
        "--out",
        path_str(&teacher),
        "--backbone",
        path_str(&backbone),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--image-size",
        "128",
        "--cpu",
    ]);
    assert!(common::stdout(&output).contains("teacher written"), "{}", common::stdout(&output));
    assert!(!dir.path().join("teacher.distill-checkpoint.safetensors").exists(), "finished runs leave no checkpoint");

    // A later session continues the teacher from its file alone, to more steps, and says so.
    let continued = dir.path().join("teacher-3.safetensors");
    let continue_to = |steps: &str, from: &Path, out: &Path| {
        common::stdout(&lineguard_ok(&[
            "distill-teacher",
            "--images",
            path_str(&images),
            "--out",
            path_str(out),
            "--backbone",
            path_str(&backbone),
            "--steps",
            steps,
            "--batch-size",
            "2",
            "--image-size",
            "128",
            "--continue-from",
            path_str(from),
            "--cpu",
        ]))
    };
    assert!(continue_to("3", &teacher, &continued).contains("teacher written"));
    let provenance = teacher_provenance(&continued);
    assert_eq!(provenance["config"]["steps"], 3, "{provenance}");
    assert_eq!(provenance["continued_from"]["config"]["steps"], 2, "{provenance}");
    // A teacher that has its steps already is left as it is.
    let again = dir.path().join("teacher-again.safetensors");
    assert!(continue_to("3", &continued, &again).contains("nothing to distil"));
    assert_eq!(teacher_provenance(&again), provenance);

    let data = dir.path().join("synth");
    common::synth_small(&data, 4, 3, 3);
    let out_dir = dir.path().join("bench");
    lineguard_ok(&[
        "bench-quality",
        "--data",
        path_str(&data),
        "--teacher",
        path_str(&teacher),
        "--steps",
        "2",
        "--image-size",
        "128",
        "--margins",
        "0.4",
        "--out-dir",
        path_str(&out_dir),
        "--cpu",
    ]);
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("results.json")).unwrap()).unwrap();
    assert!(results["teacher"].as_str().unwrap().contains("distilled from EfficientNet-Lite0, 2 steps"), "{results}");
    let runs = results["runs"].as_array().unwrap();
    let names: Vec<&str> = runs.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["efficientad_s", "dfsc_m0.4"]);
    // Every DFSC run says how much its margin term acted; the baseline has none.
    assert!(runs[0]["dfsc_activity"].is_null(), "{}", runs[0]);
    let share = runs[1]["dfsc_activity"]["mean_active_share"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&share), "{}", runs[1]);
    for run in runs {
        assert_eq!(run["steps"], 2, "{run}");
        let auroc = run["logical_auroc"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&auroc), "{run}");
        assert!(run["error"].is_null(), "{run}");
    }
    let table = std::fs::read_to_string(out_dir.join("results.md")).unwrap();
    assert!(table.contains("| dfsc_m0.4 | 0.4 | 2 |") && table.contains("DFSC (paper)"), "{table}");
}

/// The GPU window's script, rehearsed on the CPU at toy sizes so that it cannot rot between windows: a
/// first window distils and runs one seed; the next continues the teacher it committed and runs only the
/// seed still missing; a last one finds everything done.
#[test]
fn gpu_quality_script_rehearses_on_the_cpu_and_resumes_across_windows() {
    let dir = tempfile::tempdir().unwrap();
    let Some(images) = image_folder(dir.path(), 4) else { return };
    let data = dir.path().join("synth");
    common::synth_small(&data, 4, 3, 3);
    let backbone = backbone_checkpoint();
    let window = |results: &Path, teacher: &Path, done: &Path, distill_steps: &str, seeds: &str, precision: &str| {
        let output = std::process::Command::new("bash")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/gpu_quality.sh"))
            .env("LINEGUARD", env!("CARGO_BIN_EXE_lineguard"))
            .env("REQUIRE_CUDA", "0")
            .env("DISTILL_STEPS", distill_steps)
            .env("DISTILL_ARGS", "--image-size 128 --batch-size 2 --cpu")
            .env("BENCH_ARGS", "--image-size 128 --steps 2 --cpu")
            .env("PREDICT_ARGS", "--cpu")
            .env("SEEDS", seeds)
            .env("TRAIN_PRECISION", precision)
            .env("MARGINS", "0.4")
            .env("PARALLEL", "1")
            .env("SATURATION_SCALE", "1")
            .env("IMAGES", &images)
            .env("DATA", &data)
            .env("BACKBONE", &backbone)
            .env("TEACHER", teacher)
            .env("DONE", done)
            .env("WORK", dir.path().join("work"))
            .env("RESULTS", results)
            .env_remove("OUT")
            .output()
            .unwrap();
        let text = format!("{}{}", common::stdout(&output), common::stderr(&output));
        assert!(output.status.success(), "{text}");
        text
    };
    let first = dir.path().join("window-1");
    window(&first, &dir.path().join("no-teacher-yet.safetensors"), &dir.path().join("nothing-done"), "2", "1", "f32");
    assert_eq!(teacher_provenance(&first.join("teacher.safetensors"))["config"]["steps"], 2);
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(first.join("quality-seed1.json")).unwrap()).unwrap();
    assert_eq!(results["seed"], 1, "{results}");
    let log = std::fs::read_to_string(first.join("gpu-quality.log")).unwrap();
    assert!(log.contains("images scored"), "{log}");

    // The next window: the committed teacher goes on to 3 steps, seed 1 is not run again; seed 42 trains in
    // mixed precision, and its default DFSC model comes back in f16, checked, as the pretrained model.
    let second = dir.path().join("window-2");
    let text = window(&second, &first.join("teacher.safetensors"), &first, "3", "1 42", "bf16");
    assert!(text.contains("seed 1: done in an earlier window"), "{text}");
    let provenance = teacher_provenance(&second.join("teacher.safetensors"));
    assert_eq!(
        (provenance["config"]["steps"].as_u64(), provenance["continued_from"]["config"]["steps"].as_u64()),
        (Some(3), Some(2))
    );
    assert!(second.join("quality-seed42.json").is_file() && !second.join("quality-seed1.json").exists());
    let summary = std::fs::read_to_string(second.join("summary.md")).unwrap();
    assert!(summary.contains("quality-seed1") && summary.contains("quality-seed42"), "{summary}");
    let pretrained = second.join("pretrained-juice_bottle-dfsc.safetensors");
    assert!(text.contains("largest score difference"), "{text}");
    let pretrained = lineguard::model::EfficientAd::load(&pretrained, Device::Cpu).unwrap();
    assert_eq!(pretrained.info.trained_steps, 2);
    assert_eq!(pretrained.recipe.train.precision, lineguard::model::Precision::Bf16);
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(second.join("quality-seed42.json")).unwrap()).unwrap();
    assert_eq!(results["train_precision"], "bf16", "{results}");

    // Nothing left: the complete teacher and the pretrained model are not sent back again.
    let third = dir.path().join("window-3");
    let text = window(&third, &second.join("teacher.safetensors"), &second, "3", "42", "f32");
    assert!(text.contains("is complete") && !third.join("teacher.safetensors").exists(), "{text}");
    assert!(!third.join("pretrained-juice_bottle-dfsc.safetensors").exists(), "{text}");
}

fn teacher_provenance(path: &Path) -> serde_json::Value {
    let file = lineguard::model::weights::TensorFile::load(path, Device::Cpu).unwrap();
    serde_json::from_str(&file.metadata[lineguard::model::teacher::TEACHER_METADATA]).unwrap()
}

#[test]
fn distill_teacher_without_the_backbone_says_how_to_get_it() {
    let dir = tempfile::tempdir().unwrap();
    let output = common::lineguard(&[
        "distill-teacher",
        "--images",
        path_str(dir.path()),
        "--out",
        path_str(&dir.path().join("t.safetensors")),
        "--backbone",
        path_str(&dir.path().join("absent.pth")),
    ]);
    assert!(!output.status.success());
    let err = common::stderr(&output);
    assert!(err.contains("EfficientNet-Lite0") && err.contains("scripts/setup.sh"), "{err}");
}
