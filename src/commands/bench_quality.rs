//! `bench-quality`: the detection-quality benchmark. Every run is its own `lineguard train` and
//! `lineguard eval` process, so runs are independent (libtorch's global seed, memory) and can share a GPU.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::Context;
use lineguard::model::activity::DfscActivitySummary;
use lineguard::model::config::Preset;
use lineguard::model::teacher::TEACHER_METADATA;
use lineguard::model::weights::TensorFile;
use serde::Serialize;
use serde_json::Value;

use super::cli::{BenchQualityArgs, QualityBudget};

/// `pipelines/recipes/cpu_budget.toml`, embedded so the benchmark runs from any folder.
const CPU_BUDGET_RECIPE: &str = include_str!("../../pipelines/recipes/cpu_budget.toml");
const CPU_BUDGET_STEPS: u64 = 200;
const FULL_STEPS: u64 = 70_000;

/// The paper's image AUROC on juice_bottle (logical anomalies), for the table.
const PAPER_LOGICAL_AUROC: [(&str, f64); 3] =
    [("EAD-S (paper)", 96.7), ("EAD-M (paper)", 98.4), ("DFSC (paper)", 99.9)];

#[derive(Debug, Clone)]
struct Run {
    name: String,
    preset: Preset,
    margin: Option<f64>,
}

#[derive(Debug, Serialize)]
struct RunResult {
    name: String,
    preset: String,
    margin: Option<f64>,
    steps: u64,
    image_size: i64,
    train_seconds: f64,
    eval_seconds: f64,
    logical_auroc: Option<f64>,
    structural_auroc: Option<f64>,
    logical_au_spro: Option<f64>,
    structural_au_spro: Option<f64>,
    /// How much the DFSC term acted over the last quarter of training (None for runs without it).
    dfsc_activity: Option<DfscActivitySummary>,
    model: PathBuf,
    error: Option<String>,
}

pub fn run(args: &BenchQualityArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.parallel >= 1, "--parallel must be at least 1");
    std::fs::create_dir_all(&args.out_dir).with_context(|| format!("creating {}", args.out_dir.display()))?;
    // The recipe every run starts from: the user's, else the budget's (the full budget is the presets' own).
    let (recipe, budget_steps) = match (&args.config, args.budget) {
        (Some(path), _) => (Some(path.clone()), None),
        (None, QualityBudget::Cpu) => {
            let path = args.out_dir.join("cpu_budget.toml");
            std::fs::write(&path, CPU_BUDGET_RECIPE).with_context(|| format!("writing {}", path.display()))?;
            (Some(path), Some(CPU_BUDGET_STEPS))
        }
        (None, QualityBudget::Full) => (None, Some(FULL_STEPS)),
    };
    let steps = args.steps.or(budget_steps);
    let image_size = args.image_size.unwrap_or(256);
    let teacher = describe_teacher(args.teacher.as_deref())?;
    let mut runs = vec![Run { name: "efficientad_s".into(), preset: Preset::EfficientadS, margin: None }];
    for &margin in &args.margins {
        runs.push(Run { name: format!("dfsc_m{margin}"), preset: Preset::Dfsc, margin: Some(margin) });
    }
    log::info!(
        "bench-quality: {} runs of {} steps at {image_size} px, seed {}, teacher: {teacher}, {} at a time",
        runs.len(),
        steps.map(|s| s.to_string()).unwrap_or_else(|| "the recipe's".into()),
        args.seed,
        args.parallel
    );
    let started = Instant::now();
    let queue = Mutex::new(runs.into_iter().enumerate().collect::<Vec<_>>());
    let results = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..args.parallel {
            scope.spawn(|| loop {
                let next = queue.lock().ok().and_then(|mut q| if q.is_empty() { None } else { Some(q.remove(0)) });
                let Some((index, run)) = next else { break };
                let result = execute(args, &run, recipe.as_deref(), steps, image_size);
                if let Some(error) = &result.error {
                    log::error!("{}: {error}", run.name);
                }
                if let Ok(mut r) = results.lock() {
                    r.push((index, result));
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_default();
    results.sort_by_key(|(i, _)| *i);
    let results: Vec<RunResult> = results.into_iter().map(|(_, r)| r).collect();
    let total_minutes = started.elapsed().as_secs_f64() / 60.0;

    let machine = machine(args.cpu);
    let table = markdown(&results, &teacher, args, recipe.as_deref(), image_size, &machine, total_minutes);
    println!("{table}");
    let json = serde_json::json!({
        "data": args.data.display().to_string(),
        "teacher": teacher,
        "recipe": recipe.as_ref().map(|r| r.display().to_string()),
        "image_size": image_size,
        // None: each recipe's own (f32 unless the --config file says otherwise).
        "train_precision": args.train_precision.map(|p| p.to_string()),
        "seed": args.seed,
        "parallel": args.parallel,
        "machine": machine,
        "total_minutes": total_minutes,
        "runs": results,
    });
    std::fs::write(args.out_dir.join("results.json"), serde_json::to_string_pretty(&json)?)?;
    std::fs::write(args.out_dir.join("results.md"), &table)?;
    log::info!("results written to {}/results.{{json,md}}", args.out_dir.display());
    let failed = results.iter().filter(|r| r.error.is_some()).count();
    anyhow::ensure!(failed == 0, "{failed} of {} runs failed (see the log above)", results.len());
    Ok(())
}

fn execute(
    args: &BenchQualityArgs,
    run: &Run,
    recipe: Option<&Path>,
    steps: Option<u64>,
    image_size: i64,
) -> RunResult {
    let model = args.out_dir.join(format!("{}.safetensors", run.name));
    let mut result = RunResult {
        name: run.name.clone(),
        preset: run.preset.to_string(),
        margin: run.margin,
        steps: 0,
        image_size,
        train_seconds: 0.0,
        eval_seconds: 0.0,
        logical_auroc: None,
        structural_auroc: None,
        dfsc_activity: None,
        logical_au_spro: None,
        structural_au_spro: None,
        model: model.clone(),
        error: None,
    };
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            result.error = Some(format!("cannot find our own executable: {e}"));
            return result;
        }
    };
    let mut train = Command::new(&exe);
    train.arg("train").arg("--data").arg(&args.data).arg("--out").arg(&model);
    train.args(["--preset", &run.preset.to_string()]);
    if let Some(recipe) = recipe {
        train.arg("--config").arg(recipe);
    }
    if let Some(steps) = steps {
        train.args(["--steps", &steps.to_string()]);
    }
    if let Some(precision) = args.train_precision {
        train.args(["--precision", &precision.to_string()]);
    }
    train.args(["--image-size", &image_size.to_string(), "--seed", &args.seed.to_string()]);
    if let Some(margin) = run.margin {
        train.args(["--margin", &margin.to_string()]);
    }
    if let Some(teacher) = &args.teacher {
        train.arg("--teacher").arg(teacher);
    }
    if let Some(minutes) = args.max_train_minutes {
        train.args(["--max-minutes", &minutes.to_string()]);
    }
    if args.cpu {
        train.arg("--cpu");
    }
    let log_path = args.out_dir.join(format!("{}.log", run.name));
    let clock = Instant::now();
    if let Err(e) = run_logged(&mut train, &log_path) {
        result.error = Some(format!("training failed: {e} (log: {})", log_path.display()));
        return result;
    }
    result.train_seconds = clock.elapsed().as_secs_f64();
    // A time budget may have cut the run: report the steps it really trained.
    match lineguard::model::EfficientAd::load(&model, tch::Device::Cpu) {
        Ok(trained) => {
            result.steps = trained.info.trained_steps;
            result.dfsc_activity = trained.info.dfsc_activity;
        }
        Err(e) => {
            result.error = Some(format!("the trained model does not load: {e}"));
            return result;
        }
    }
    let mut eval = Command::new(&exe);
    eval.arg("eval").arg("--model").arg(&model).arg("--data").arg(&args.data).arg("--json");
    eval.args(["--saturation-scale", &args.saturation_scale.to_string()]);
    if args.cpu {
        eval.arg("--cpu");
    }
    let clock = Instant::now();
    let output = match eval.output() {
        Ok(output) if output.status.success() => output,
        Ok(output) => {
            result.error = Some(format!("eval failed: {}", String::from_utf8_lossy(&output.stderr).trim()));
            return result;
        }
        Err(e) => {
            result.error = Some(format!("cannot start eval: {e}"));
            return result;
        }
    };
    result.eval_seconds = clock.elapsed().as_secs_f64();
    let report: Value = match serde_json::from_slice(&output.stdout) {
        Ok(report) => report,
        Err(e) => {
            result.error = Some(format!("eval printed no JSON report: {e}"));
            return result;
        }
    };
    let metric = |group: &str, kind: &str| report[group][kind].as_f64();
    result.logical_auroc = metric("image_auroc", "logical");
    result.structural_auroc = metric("image_auroc", "structural");
    result.logical_au_spro = metric("au_spro", "logical");
    result.structural_au_spro = metric("au_spro", "structural");
    log::info!(
        "{}: logical image AUROC {} in {:.1} min",
        run.name,
        percent(result.logical_auroc),
        (result.train_seconds + result.eval_seconds) / 60.0
    );
    result
}

/// Runs `command` with its stderr (our log) appended to `log_path`; fails on a non-zero exit.
fn run_logged(command: &mut Command, log_path: &Path) -> anyhow::Result<()> {
    let log = std::fs::File::create(log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let status = command.stdout(log.try_clone()?).stderr(log).status()?;
    anyhow::ensure!(status.success(), "exit status {status}");
    Ok(())
}

fn describe_teacher(teacher: Option<&Path>) -> anyhow::Result<String> {
    let Some(path) = teacher else {
        log::warn!("no --teacher: every run uses a random teacher, far weaker than a distilled one");
        return Ok("random (no --teacher)".into());
    };
    let file =
        TensorFile::load(path, tch::Device::Cpu).with_context(|| format!("reading teacher {}", path.display()))?;
    let provenance: Value =
        file.metadata.get(TEACHER_METADATA).and_then(|m| serde_json::from_str(m).ok()).unwrap_or(Value::Null);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(match provenance["source"].as_str() {
        Some("distilled") => format!(
            "{name}: distilled from EfficientNet-Lite0, {} steps x batch {} on {} images",
            provenance["config"]["steps"], provenance["config"]["batch_size"], provenance["images"]
        ),
        Some("imported") => format!("{name}: imported from {}", provenance["checkpoint"].as_str().unwrap_or("?")),
        _ => format!("{name} (no provenance)"),
    })
}

fn machine(cpu: bool) -> String {
    let device = lineguard::torch::select_device(cpu);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    format!("{} ({model}, {cores} cores)", lineguard::torch::describe(device))
}

fn percent(value: Option<f64>) -> String {
    value.map(|v| format!("{:.1}", 100.0 * v)).unwrap_or_else(|| "-".into())
}

fn markdown(
    results: &[RunResult],
    teacher: &str,
    args: &BenchQualityArgs,
    recipe: Option<&Path>,
    image_size: i64,
    machine: &str,
    total_minutes: f64,
) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "Dataset {}; {} px, seed {}, recipe: {}; teacher: {teacher}; {}; {total_minutes:.0} min in all.\n\n",
        args.data.display(),
        image_size,
        args.seed,
        recipe.map(|r| r.display().to_string()).unwrap_or_else(|| "the presets' own (the paper's)".into()),
        machine
    ));
    out.push_str(
        "| run | margin | steps | logical image AUROC | logical AU-sPRO@5% | structural image AUROC | DFSC hinge \
         active (last quarter) | train + eval (min) |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|---|\n");
    for r in results {
        let margin = r.margin.map(|m| m.to_string()).unwrap_or_else(|| "-".into());
        let status = r.error.as_ref().map(|_| " (failed)").unwrap_or("");
        out.push_str(&format!(
            "| {}{status} | {margin} | {} | {} | {} | {} | {} | {:.1} |\n",
            r.name,
            r.steps,
            percent(r.logical_auroc),
            percent(r.logical_au_spro),
            percent(r.structural_auroc),
            r.dfsc_activity.as_ref().map_or_else(|| "-".into(), |a| format!("{:.0}%", 100.0 * a.mean_active_share)),
            (r.train_seconds + r.eval_seconds) / 60.0
        ));
    }
    for (name, auroc) in PAPER_LOGICAL_AUROC {
        out.push_str(&format!("| {name} | - | 70000 | {auroc:.1} | - | - | - | - |\n"));
    }
    out
}
