//! Helpers shared by the integration tests: running the real `lineguard` binary and finding the shared
//! datasets.

#![allow(dead_code)]

pub mod kafka;
pub mod s3;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn lineguard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lineguard"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("the lineguard binary runs")
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs and requires success, showing stderr otherwise.
pub fn lineguard_ok(args: &[&str]) -> Output {
    let output = lineguard(args);
    assert!(output.status.success(), "lineguard {args:?} failed:\n{}", stderr(&output));
    output
}

pub fn path_str(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

/// `../shared/datasets/<name>` when present. Absent data is a failure in CI (which always has it) and
/// a loud note elsewhere, never a silent pass.
pub fn shared_dataset(name: &str) -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/datasets").join(name);
    if path.is_dir() {
        return Some(path);
    }
    if std::env::var_os("CI").is_some() {
        panic!("{} is missing: CI must have the shared datasets", path.display());
    }
    eprintln!("NOTE: {} is absent; this test checked nothing on real data", path.display());
    None
}

/// A tool that `scripts/setup.sh <part>` installs at `.tools/<relative>`, else `on_path` if given and on
/// PATH. Missing is a failure in CI (setup installs it) and a loud note elsewhere, never a silent pass.
pub fn setup_tool(relative: &str, on_path: Option<&str>, part: &str) -> Option<PathBuf> {
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools").join(relative);
    let found = if local.is_file() {
        Some(local)
    } else {
        let path = std::env::var_os("PATH").unwrap_or_default();
        on_path.and_then(|name| std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| p.is_file()))
    };
    if found.is_none() {
        assert!(std::env::var_os("CI").is_none(), "{relative} is missing: scripts/setup.sh {part} installs it");
        eprintln!("SKIPPED: {relative} is missing (scripts/setup.sh {part} installs it)");
    }
    found
}

/// A small synthetic dataset at 128 px through the real `synth` command.
pub fn synth_small(out: &Path, train: usize, validation: usize, test: usize) {
    let (train, validation, test) = (train.to_string(), validation.to_string(), test.to_string());
    let args = ["--image-size", "128", "--train", &train, "--validation", &validation, "--test", &test];
    let mut all = vec!["synth", "--out", path_str(out)];
    all.extend(args);
    lineguard_ok(&all);
}

/// A narrow model (16 teacher channels, 3 steps) for tests that need a real model file, not a good one:
/// inference stays cheap.
pub fn train_tiny(data: &Path, out: &Path) {
    train_with_recipe(data, out, "image_size = 128\nchannels = 16\n[train]\nsteps = 3\ncheckpoint_every = 0\n");
}

/// Trains a model on `data` with the recipe `recipe_toml` (written beside `out`) through the real CLI, on
/// the CPU.
pub fn train_with_recipe(data: &Path, out: &Path, recipe_toml: &str) {
    let recipe = out.with_extension("toml");
    std::fs::write(&recipe, recipe_toml).expect("recipe written");
    lineguard_ok(&["train", "--data", path_str(data), "--out", path_str(out), "-c", path_str(&recipe), "--cpu"]);
}
