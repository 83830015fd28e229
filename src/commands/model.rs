//! `lineguard model list | rollback`: the versions a line's trainer keeps, and going back to one.

use std::process::ExitCode;

use anyhow::Context;
use lineguard::service::retrain::gate::GateReport;
use lineguard::service::retrain::store::VersionStore;
use lineguard::service::settings::{RetrainSettings, Settings};

use super::cli::{ModelAction, ModelArgs, ModelLineArgs};

pub fn run(args: &ModelArgs) -> anyhow::Result<ExitCode> {
    match &args.action {
        ModelAction::List(target) => list(target),
        ModelAction::Rollback(rollback) => {
            let (settings, retrain, store) = open(&rollback.target)?;
            let line = &rollback.target.line;
            let current = store.current()?.context("no current version recorded yet: the trainer has not started")?;
            let kept: Vec<u64> = store.versions()?.iter().map(|r| r.version).collect();
            let target =
                match rollback.to {
                    Some(version) => version,
                    None => kept.iter().rev().copied().find(|v| *v < current).with_context(|| {
                        format!("no kept version older than the current {current} (kept: {kept:?})")
                    })?,
                };
            anyhow::ensure!(kept.contains(&target), "version {target} is not kept (kept: {kept:?})");
            anyhow::ensure!(target != current, "version {target} is already current");
            let path = store.model_path(target);
            let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            store.set_current(target)?;
            let producer = super::produce::producer(&settings.kafka)?;
            let runtime = super::runtime()?;
            let manifest = runtime
                .block_on(lineguard::service::retrain::models_topic::publish(
                    &producer,
                    &retrain.models_topic,
                    line,
                    &bytes,
                    target,
                    "rollback",
                    retrain.signing_key.as_ref(),
                ))
                .with_context(|| format!("publishing version {target} on {}", retrain.models_topic))?;
            println!(
                "line {line}: version {target} is current again (was {current}); published on {} as {}. Every \
                 replica swaps it in at its next batch; the trainer continues from it.",
                retrain.models_topic, manifest.publication
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn open(target: &ModelLineArgs) -> anyhow::Result<(Settings, RetrainSettings, VersionStore)> {
    let settings = Settings::load(&target.pipeline)?;
    let line = settings
        .lines
        .get(&target.line)
        .with_context(|| format!("{} has no line {:?}", target.pipeline.display(), target.line))?;
    let retrain = line
        .retrain
        .clone()
        .with_context(|| format!("line {} does not retrain (no [lines.{}.retrain] table)", target.line, target.line))?;
    let store = VersionStore::open(&retrain.line_dir(&target.line), retrain.keep_versions)?;
    Ok((settings, retrain, store))
}

fn list(target: &ModelLineArgs) -> anyhow::Result<ExitCode> {
    let (_, retrain, store) = open(target)?;
    let current = store.current()?;
    let versions = store.versions()?;
    if versions.is_empty() {
        println!("line {}: no versions in {} yet", target.line, retrain.line_dir(&target.line).display());
        return Ok(ExitCode::SUCCESS);
    }
    println!("line {} ({}):", target.line, retrain.line_dir(&target.line).display());
    for record in &versions {
        let marker = if Some(record.version) == current { "*" } else { " " };
        let gate = record.gate.as_ref().map(GateReport::summary).unwrap_or_default();
        println!(
            "{marker} v{:<4} {:<9} {:>7} steps  parent {:<6} {gate}",
            record.version,
            record.origin,
            record.trained_steps,
            record.parent.map_or("-".into(), |p| format!("v{p}")),
        );
    }
    let log = retrain.line_dir(&target.line).join("gate-log.jsonl");
    if let Ok(text) = std::fs::read_to_string(&log) {
        let decisions: Vec<GateReport> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        println!("\nlatest gate decisions ({} in all, {}):", decisions.len(), log.display());
        for report in decisions.iter().rev().take(5).rev() {
            println!("  {}", report.summary());
        }
    }
    Ok(ExitCode::SUCCESS)
}
