use std::process::ExitCode;

use anyhow::Context;
use lineguard::data::synth::{self, SynthConfig};

use super::cli::SynthArgs;
use super::Progress;

pub fn run(args: &SynthArgs) -> anyhow::Result<ExitCode> {
    let defaults = SynthConfig::default();
    let test = args.test.unwrap_or(defaults.test_good);
    let config = SynthConfig {
        seed: args.seed,
        image_size: args.image_size,
        train: args.train.unwrap_or(defaults.train),
        validation: args.validation.unwrap_or(defaults.validation),
        test_good: test,
        test_logical: args.test.unwrap_or(defaults.test_logical),
        test_structural: args.test.unwrap_or(defaults.test_structural),
    };
    generate(&config, &args.out)?;
    Ok(ExitCode::SUCCESS)
}

pub fn generate(config: &SynthConfig, out: &std::path::Path) -> anyhow::Result<()> {
    let total = config.train + config.validation + config.test_good + config.test_logical + config.test_structural;
    let mut progress = Progress::new(total as u64, "synth");
    let started = std::time::Instant::now();
    let report = synth::generate(config, out, &mut || progress.inc())
        .with_context(|| format!("generating a synthetic dataset in {}", out.display()))?;
    progress.finish();
    log::info!(
        "wrote {} images and {} masks to {} in {:.1} s (seed {}, {} px)",
        report.images,
        report.masks,
        out.display(),
        started.elapsed().as_secs_f64(),
        config.seed,
        config.image_size
    );
    Ok(())
}
