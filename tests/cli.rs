//! The command line as a user meets it: help, clear errors that name the culprit, and a small
//! synth → train → predict → eval round trip on real files.

mod common;

use common::{lineguard, lineguard_ok, path_str, stderr, stdout};

#[test]
fn help_teaches_the_workflow() {
    let help = stdout(&lineguard_ok(&["--help"]));
    for word in ["synth", "train", "predict", "eval", "demo", "run", "produce", "tail", "broker", "MVTec LOCO"] {
        assert!(help.contains(word), "--help lacks {word}:\n{help}");
    }
    let train_help = stdout(&lineguard_ok(&["train", "--help"]));
    assert!(train_help.contains("--resume") && train_help.contains("efficientad_s"), "{train_help}");
}

#[test]
fn missing_or_malformed_datasets_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    let model = dir.path().join("m.safetensors");
    let args = ["train", "--data", path_str(&root), "--out", path_str(&model), "--image-size", "128"];
    let out = lineguard(&args);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));

    std::fs::create_dir_all(root.join("train/good")).unwrap();
    std::fs::write(root.join("train/good/000.png"), b"not an image").unwrap();
    std::fs::create_dir_all(root.join("validation/good")).unwrap();
    let out = lineguard(&args);
    assert!(stderr(&out).contains("validation/good") && stderr(&out).contains("no images"), "{}", stderr(&out));

    std::fs::copy(root.join("train/good/000.png"), root.join("validation/good/000.png")).unwrap();
    let out = lineguard(&args);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("train/good/000.png"), "the broken file is named: {}", stderr(&out));
}

#[test]
fn broken_recipes_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = dir.path().join("r.toml");
    let data = path_str(dir.path());
    std::fs::write(&recipe, "[dfsc]\nmargn = 0.4\n").unwrap();
    let out = lineguard(&["train", "--data", data, "--out", "m", "-c", path_str(&recipe)]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("margn") && stderr(&out).contains("r.toml"), "{}", stderr(&out));

    std::fs::write(&recipe, "image_size = 100\n[dfsc]\nmargin = 5.0\n").unwrap();
    let out = lineguard(&["train", "--data", data, "--out", "m", "-c", path_str(&recipe)]);
    let err = stderr(&out);
    assert!(err.contains("image_size = 100") && err.contains("dfsc.margin = 5"), "all problems listed: {err}");

    std::fs::write(&recipe, "image_size = [").unwrap();
    let out = lineguard(&["train", "--data", data, "--out", "m", "-c", path_str(&recipe)]);
    assert!(stderr(&out).contains("r.toml"), "{}", stderr(&out));
}

#[test]
fn synth_train_predict_eval_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let model = dir.path().join("model.safetensors");
    let heatmaps = dir.path().join("heatmaps");
    common::synth_small(&data, 3, 2, 2);
    assert!(data.join("defects_config.json").is_file());
    lineguard_ok(&[
        "train",
        "--data",
        path_str(&data),
        "--out",
        path_str(&model),
        "--image-size",
        "128",
        "--steps",
        "2",
    ]);

    // A corrupt file among good ones: reported by name, exit code 1, the others still scored.
    let corrupt = dir.path().join("corrupt.png");
    std::fs::write(&corrupt, b"\x89PNG\r\n\x1a\ntruncated").unwrap();
    let good = data.join("test/good/000.png");
    let out = lineguard(&[
        "predict",
        "--model",
        path_str(&model),
        "--out",
        path_str(&heatmaps),
        "--json",
        "--threshold",
        "0.5",
        path_str(&good),
        path_str(&corrupt),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("corrupt.png"), "{}", stderr(&out));
    let line: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert!(line["score"].as_f64().unwrap().is_finite());
    let heatmap = std::path::PathBuf::from(line["heatmap"].as_str().unwrap());
    let picture = image::open(&heatmap).unwrap();
    assert_eq!((picture.width(), picture.height()), (2 * 128 + 4, 128), "original | overlay");

    let out = lineguard_ok(&["eval", "--model", path_str(&model), "--data", path_str(&data), "--json"]);
    let report: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    for key in ["logical", "structural", "mean"] {
        let auroc = report["image_auroc"][key].as_f64().unwrap();
        let spro = report["au_spro"][key].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&auroc) && (0.0..=1.0).contains(&spro), "{report}");
    }
    // The scores come with the model they belong to: its steps and how its DFSC term acted (a 2-step run
    // is read at its last step).
    assert_eq!(report["model"]["trained_steps"], 2, "{report}");
    assert_eq!(report["model"]["dfsc_activity"]["to_step"], 1, "{report}");

    // An empty split is null, not an error.
    std::fs::remove_dir_all(data.join("test/structural_anomalies")).unwrap();
    let out = lineguard_ok(&["eval", "--model", path_str(&model), "--data", path_str(&data), "--json"]);
    let report: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert!(report["image_auroc"]["structural"].is_null() && report["au_spro"]["structural"].is_null());
    assert_eq!(report["image_auroc"]["mean"], report["image_auroc"]["logical"]);
}

#[test]
fn broken_pipeline_files_list_every_problem_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = dir.path().join("p.toml");
    std::fs::write(
        &pipeline,
        "[kafka]\nbrokers = \"\"\n[lines.trays]\nmodel = \"m\"\ninput_topics = [\"f\"]\nthreshold = 0.5\nmax_batch = 0\n",
    )
    .unwrap();
    let out = lineguard(&["run", "--pipeline", path_str(&pipeline)]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("kafka.brokers") && err.contains("lines.trays.max_batch"), "{err}");

    std::fs::write(&pipeline, "[kafka]\nbrokers = \"b:9092\"\n[lines.trays]\nmodel = \"m\"\ninput_topics = [\"f\"]\n")
        .unwrap();
    let err = stderr(&lineguard(&["run", "--pipeline", path_str(&pipeline)]));
    assert!(err.contains("threshold") && err.contains("p.toml"), "a missing key is named: {err}");

    let checked = stdout(&lineguard_ok(&["run", "--pipeline", "pipelines/local.toml", "--check"]));
    assert!(checked.contains("\"max_in_flight\": 64"), "{checked}");
}

/// Before: `run --check` printed `sasl.password`, and the environment override for credentials was
/// rejected as an unknown key, so passwords ended up in the ConfigMap.
#[test]
fn credentials_come_from_the_environment_or_files_and_are_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, "from-a-mounted-secret\n").unwrap();
    let pipeline = dir.path().join("p.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[kafka]\nbrokers = \"b:9092\"\n[kafka.producer]\n\"sasl.password\" = \"typed-in-the-file\"\n\
             [kafka.secret_files]\n\"ssl.key.password\" = \"{}\"\n\
             [lines.trays]\nmodel = \"m\"\ninput_topics = [\"f\"]\nthreshold = 0.5\n",
            path_str(&password_file)
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lineguard"))
        .args(["run", "--pipeline", path_str(&pipeline), "--check"])
        .env("LINEGUARD__KAFKA__SECRETS__SASL_PASSWORD", "from-the-environment")
        .output()
        .unwrap();
    let (printed, err) = (stdout(&out), stderr(&out));
    assert!(out.status.success(), "the environment override is accepted: {err}");
    for secret in ["typed-in-the-file", "from-a-mounted-secret", "from-the-environment"] {
        assert!(!printed.contains(secret) && !err.contains(secret), "{secret} leaked:\n{printed}{err}");
    }
    assert!(printed.contains("\"sasl_password\": \"<redacted>\""), "{printed}");
    assert!(printed.contains("\"sasl.password\": \"<redacted>\""), "{printed}");

    std::fs::remove_file(&password_file).unwrap();
    let out = lineguard(&["run", "--pipeline", path_str(&pipeline), "--check"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("kafka.secret_files.ssl.key.password: cannot read"), "{}", stderr(&out));
}

/// The environment the Helm chart sets for credentials from existing Secrets (paths to the mounted
/// files, never values; scripts/check-chart.py checks the chart side) is accepted, and nothing read
/// from the files is printed.
#[test]
fn the_chart_s_credential_files_are_read_and_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, value: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, value).unwrap();
        path_str(&path).to_string()
    };
    let env = [
        ("LINEGUARD__KAFKA__SECRET_FILES__SASL_USERNAME", file("username", "sasl-user-7\n")),
        ("LINEGUARD__KAFKA__SECRET_FILES__SASL_PASSWORD", file("password", "sasl-pass-7\n")),
        ("LINEGUARD__KAFKA__SECRET_FILES__SSL_CA_PEM", file("ca.crt", "-----BEGIN CERTIFICATE-----ca-7\n")),
        ("LINEGUARD__KAFKA__SECRET_FILES__SSL_CERTIFICATE_PEM", file("tls.crt", "-----BEGIN CERTIFICATE-----crt-7\n")),
        ("LINEGUARD__KAFKA__SECRET_FILES__SSL_KEY_PEM", file("tls.key", "-----BEGIN PRIVATE KEY-----key-7\n")),
        ("LINEGUARD__LINES__TRAYS__RETRAIN__SIGNING_KEY_FILE", file("signing-key", "signing-key-of-the-line-7\n")),
    ];
    let pipeline = dir.path().join("p.toml");
    std::fs::write(
        &pipeline,
        "[kafka]\nbrokers = \"b:9092\"\n[lines.trays]\nmodel = \"m\"\ninput_topics = [\"f\"]\nthreshold = 0.5\n\
         [lines.trays.retrain]\naccept_below = 0.3\nstate_dir = \"/var/lib/lineguard\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lineguard"))
        .args(["run", "--pipeline", path_str(&pipeline), "--check"])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    let (printed, err) = (stdout(&out), stderr(&out));
    assert!(out.status.success(), "{err}");
    for secret in ["sasl-user-7", "sasl-pass-7", "ca-7", "crt-7", "key-7", "signing-key-of-the-line-7"] {
        assert!(!printed.contains(secret) && !err.contains(secret), "{secret} leaked:\n{printed}{err}");
    }
    for property in ["sasl_username", "sasl_password", "ssl_ca_pem", "ssl_certificate_pem", "ssl_key_pem"] {
        assert!(printed.contains(&format!("\"{property}\": \"<redacted>\"")), "{property} read:\n{printed}");
    }
    assert!(printed.contains("\"signing_key\": \"<redacted>\""), "the line's key was read:\n{printed}");
}

#[test]
fn a_missing_model_stops_the_service_with_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = dir.path().join("p.toml");
    let model = dir.path().join("absent.safetensors");
    std::fs::write(
        &pipeline,
        format!(
            "[kafka]\nbrokers = \"127.0.0.1:1\"\n[metrics]\nlisten = \"\"\n[lines.trays]\nmodel = \"{}\"\n\
             input_topics = [\"f\"]\nthreshold = 0.5\n",
            path_str(&model)
        ),
    )
    .unwrap();
    let out = lineguard(&["run", "--pipeline", path_str(&pipeline)]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("line trays") && err.contains("absent.safetensors"), "{err}");
}

#[test]
fn an_unreachable_broker_is_named() {
    let out = lineguard(&["produce", "--brokers", "127.0.0.1:1", "--topic", "t", "Cargo.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("cannot reach Kafka at 127.0.0.1:1"), "{}", stderr(&out));
}

/// `model compact` writes a half-size copy only after checking the scores on images; the copy serves with
/// the scores it was checked for.
#[test]
fn model_compact_writes_a_checked_half_size_copy_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::synth_small(&data, 3, 2, 2);
    let model = dir.path().join("model.safetensors");
    common::train_tiny(&data, &model);
    let compact = dir.path().join("model-f16.safetensors");
    let check = [data.join("test/good"), data.join("test/logical_anomalies")];
    let (good, logical) = (path_str(&check[0]), path_str(&check[1]));

    let compact_args = |extra: &[&'static str]| -> Vec<&str> {
        let mut args = vec!["model", "compact", "--model", path_str(&model), "--out", path_str(&compact)];
        args.extend(["--check", good, logical]);
        args.extend(extra);
        args
    };
    let refused = lineguard(&compact_args(&["--tolerance", "0"]));
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("more than the tolerance"), "{}", stderr(&refused));
    assert!(!compact.exists(), "nothing written when a score moved too much");
    let leftovers: Vec<_> =
        std::fs::read_dir(dir.path()).unwrap().filter_map(Result::ok).map(|e| e.file_name()).collect();
    assert!(!leftovers.iter().any(|name| name.to_string_lossy().contains("checking")), "{leftovers:?}");

    let out = lineguard_ok(&compact_args(&[]));
    assert!(stdout(&out).contains("largest score difference on 4 images"), "{}", stdout(&out));
    let size = |path: &std::path::Path| std::fs::metadata(path).unwrap().len() as f64;
    assert!(size(&compact) < 0.55 * size(&model), "{} vs {}", size(&compact), size(&model));

    let scores = |model: &std::path::Path| -> Vec<f64> {
        let heatmaps = dir.path().join("heatmaps");
        let out = lineguard_ok(&[
            "predict",
            "--model",
            path_str(model),
            "--out",
            path_str(&heatmaps),
            "--json",
            good,
            logical,
        ]);
        stdout(&out)
            .lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap()["score"].as_f64().unwrap())
            .collect()
    };
    let (original, compacted) = (scores(&model), scores(&compact));
    assert_eq!(original.len(), 4);
    for (a, b) in original.iter().zip(&compacted) {
        assert!((a - b).abs() <= 1e-3, "{a} vs {b}");
    }

    // The copy keeps the record of what the model learnt from.
    let shown = stdout(&lineguard_ok(&["model", "show", "--model", path_str(&compact), "--data", path_str(&data)]));
    assert!(shown.contains("weights stored in f16") && shown.contains(": yes"), "{shown}");
}

/// `model show` says what a model file is and which images it learnt from; `--data` answers whether
/// those are a dataset's training images, with exit status 1 when they are not.
#[test]
fn model_show_names_the_training_images_and_checks_them_against_a_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let (data, other) = (dir.path().join("data"), dir.path().join("other"));
    common::synth_small(&data, 3, 2, 1);
    common::synth_small(&other, 4, 2, 1);
    let model = dir.path().join("model.safetensors");
    common::train_tiny(&data, &model);
    let show = |extra: &[&str]| {
        let mut args = vec!["model", "show", "--model", path_str(&model)];
        args.extend(extra);
        lineguard(&args)
    };

    let plain = show(&[]);
    let text = stdout(&plain);
    assert!(plain.status.success(), "{}", stderr(&plain));
    assert!(text.contains("weights stored in f32") && text.contains("16 teacher channels"), "{text}");
    assert!(text.contains("3 steps") && text.contains("images      3 train / 2 validation, sha256 "), "{text}");

    let same = show(&["--data", path_str(&data)]);
    assert!(same.status.success() && stdout(&same).contains(": yes"), "{}", stdout(&same));
    let differ = show(&["--data", path_str(&other)]);
    assert_eq!(differ.status.code(), Some(1), "{}", stderr(&differ));
    assert!(stdout(&differ).contains(": no (there: 4 train / 2 validation images"), "{}", stdout(&differ));

    let json: serde_json::Value = serde_json::from_str(&stdout(&show(&["--json", "--data", path_str(&data)]))).unwrap();
    assert_eq!(json["trained_on_data"], true, "{json}");
    assert_eq!(
        (json["info"]["trained_on"]["train"].as_u64(), json["weights_storage"].as_str()),
        (Some(3), Some("f32"))
    );
    assert_eq!(json["recipe"]["channels"], 16, "{json}");

    // A reader that goes away (`… | head`) ends the command quietly, not with a panic.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lineguard"))
        .args(["model", "show", "--model", path_str(&model)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let closed = child.wait_with_output().unwrap();
    assert!(closed.status.success() && !stderr(&closed).contains("panicked"), "{}", stderr(&closed));
}
