//! The serving benchmark's GPU script, rehearsed on the CPU at toy sizes so that it cannot rot between
//! lent windows: both runs of `benches/gpu_serving.sh` through a real broker and the real pipeline,
//! checked for every measurement the GPU window is meant to bring back; and `bench-serving --lines`.

mod common;

use std::path::Path;

use lineguard::model::Precision;
use serde_json::Value;

fn report(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn number(value: &Value) -> f64 {
    value.as_f64().unwrap_or_else(|| panic!("not a number: {value}"))
}

#[test]
fn gpu_serving_script_rehearses_on_the_cpu() {
    // bf16 beside f32 where the CPU computes it natively. Emulated (AVX2 only) it runs 20-60 times slower
    // than f32 and took 2.7 of this rehearsal's 4 minutes; its rounding in the service is unit-tested
    // either way (service::infer).
    let bf16 = Precision::Bf16.native_on_this_cpu() == Some(true);
    let precisions: &[&str] = if bf16 { &["f32", "bf16"] } else { &["f32"] };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("synth");
    common::synth_small(&data, 1, 1, 2);
    let results = dir.path().join("results");
    let output = std::process::Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/gpu_serving.sh"))
        .env("LINEGUARD", env!("CARGO_BIN_EXE_lineguard"))
        .env("NISSHI", common::kafka::nisshi())
        .env("REQUIRE_CUDA", "0")
        .env("PRECISIONS", precisions.join(","))
        .env("PRECISION", "f32")
        .env("TRAINER_ROUNDS", "1")
        .env("FRAMES", data.join("test"))
        .env(
            "SERVING_ARGS",
            "--cpu --side 128 --channels 8 --batches 1,2 --seconds 0.2 --stream-seconds 1 --max-steps 2 \
             --distinct-frames 4",
        )
        .env("RESULTS", &results)
        .env_remove("OUT")
        .output()
        .unwrap();
    let text = format!("{}{}", common::stdout(&output), common::stderr(&output));
    assert!(output.status.success(), "{text}");
    assert!(std::fs::read_to_string(results.join("gpu-serving.log")).unwrap().contains("done"), "{text}");

    let synthetic = report(&results.join("synthetic/serving.json"));
    let rows = synthetic["model_only"].as_array().unwrap();
    let cases = |channels_last: bool| -> Vec<(String, i64)> {
        rows.iter()
            .filter(|r| r["channels_last"] == channels_last)
            .map(|r| (r["precision"].as_str().unwrap().to_string(), r["batch"].as_i64().unwrap()))
            .collect()
    };
    let expected: Vec<(String, i64)> =
        precisions.iter().flat_map(|p| [1, 2].map(|batch| (p.to_string(), batch))).collect();
    assert_eq!(cases(true), expected, "every precision and batch, as the service feeds the model");
    let largest: Vec<(String, i64)> = precisions.iter().map(|p| (p.to_string(), 2)).collect();
    assert_eq!(cases(false), largest, "the largest batch, channel-major");
    for row in rows {
        assert!(number(&row["images_per_second"]) > 0.0, "{row}");
        assert!(row["pinned_host_memory"].is_null(), "pinned or pageable is a GPU's question: {row}");
        let difference = number(&row["map_difference_vs_f32"]);
        match row["precision"].as_str() {
            Some("f32") => assert_eq!(difference, 0.0, "{row}"),
            _ => assert!(difference > 0.0 && difference < 0.05, "bf16 rounds, a little: {row}"),
        }
    }

    // Run 2 streams through two inference workers, and measures two side by side model-only too.
    let frames = report(&results.join("frames/serving.json"));
    assert_eq!(frames["inference_workers"], 2, "{frames}");
    let side_by_side: Vec<&Value> =
        frames["model_only"].as_array().unwrap().iter().filter(|row| row["workers"] == 2).collect();
    assert_eq!(side_by_side.iter().map(|row| row["batch"].as_i64().unwrap()).collect::<Vec<_>>(), [1, 2]);
    assert!(side_by_side.iter().all(|row| number(&row["images_per_second"]) > 0.0), "{side_by_side:?}");
    assert!(rows.iter().all(|row| row["workers"] == 1), "run 1 measures one worker: {rows:?}");

    for (report, precisions) in [(&synthetic, precisions), (&frames, &["f32"])] {
        let steps = report["end_to_end"].as_array().unwrap();
        for precision in precisions {
            let mine: Vec<&Value> = steps.iter().filter(|s| s["precision"] == *precision).collect();
            assert!(mine.len() >= 2, "at least one offered rate and flat out: {steps:?}");
            let flat_out = mine.last().unwrap();
            assert!(flat_out["offered_per_second"].is_null(), "the curve ends flat out: {flat_out}");
            for step in &mine {
                assert!(number(&step["achieved_per_second"]) > 0.0, "{step}");
                let (p50, p99) = (number(&step["latency_p50_ms"]), number(&step["latency_p99_ms"]));
                assert!(p50 > 0.0 && p50 <= p99, "{step}");
                assert!(number(&step["in_pipeline_p50_ms"]) <= p50, "the pipeline's share is part of it: {step}");
                assert!(number(&step["cpu_ms_per_frame"]["inference"]) > 0.0, "{step}");
                assert!(step["stage_p50_ms"]["4 inference"].as_f64().is_some(), "{step}");
                assert!(number(&step["mean_batch"]) >= 1.0, "{step}");
            }
        }
    }
    let sharing = &synthetic["trainer_sharing"];
    assert!(number(&sharing["trainer_steps_per_second"]) > 0.0, "the trainer ran: {sharing}");
    assert!(number(&sharing["ratio"]) > 0.0, "{sharing}");
    assert!(std::fs::read_to_string(results.join("synthetic/serving.md")).unwrap().contains("## Sharing the device"));
}

/// `--lines 2`: two lines consume every frame, and each step waits for and counts both lines' results.
#[test]
fn two_lines_each_score_every_frame() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("results");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_lineguard"))
        .args(["bench-serving", "--cpu", "--side", "128", "--channels", "8", "--precisions", "f32", "--batches", "1"])
        .args(["--seconds", "0.2", "--stream-seconds", "3", "--start-rate", "4", "--max-steps", "1"])
        .args(["--trainer-rounds", "0", "--distinct-frames", "4", "--lines", "2", "--inference-threads", "1"])
        .arg("--out-dir")
        .arg(&out)
        .env("LINEGUARD_NISSHI", common::kafka::nisshi())
        .output()
        .unwrap();
    let text = format!("{}{}", common::stdout(&output), common::stderr(&output));
    assert!(output.status.success(), "{text}");
    let report = report(&out.join("serving.json"));
    assert_eq!((report["lines"].as_u64(), report["inference_threads"].as_u64()), (Some(2), Some(1)), "{report}");
    let steps = report["end_to_end"].as_array().unwrap();
    // 4 frames/s offered for 3 s: 12 frames, each scored by both lines.
    assert_eq!(steps[0]["offered_per_second"], 4.0, "{steps:?}");
    assert_eq!(steps[0]["frames"], 24, "{steps:?}");
    assert!(steps.iter().all(|step| step["frames"].as_u64().unwrap() % 2 == 0), "{steps:?}");
    let side_by_side = report["model_only"].as_array().unwrap().iter().filter(|row| row["workers"] == 2).count();
    assert_eq!(side_by_side, 1, "both lines' workers measured side by side: {report}");
    let markdown = std::fs::read_to_string(out.join("serving.md")).unwrap();
    assert!(markdown.contains("2 lines of 1 inference worker(s) of 1 CPU thread(s)"), "{markdown}");
}
