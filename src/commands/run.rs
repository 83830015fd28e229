//! `lineguard run`: the streaming service.

use std::process::ExitCode;

use lineguard::service::settings::Settings;

use super::cli::{RoleArg, RunArgs};
use lineguard::service::pipeline::Role;

pub fn run(args: &RunArgs) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(&args.pipeline)?;
    if args.check {
        println!("{} is valid; resolved settings (after LINEGUARD__ overrides):\n", args.pipeline.display());
        // Every default filled in: what an operator checking a deployment wants to see.
        println!("{}", serde_json::to_string_pretty(&settings)?);
        return Ok(ExitCode::SUCCESS);
    }
    // Before any libtorch work: inference (and the trainer, as configured) are the only threads with
    // libtorch parallelism, which keeps libgomp's idle workers spinning between the model's layers.
    lineguard::torch::make_parallelism_opt_in();
    let runtime = super::runtime()?;
    let role = match args.role {
        RoleArg::All => Role::All,
        RoleArg::Inference => Role::Inference,
        RoleArg::Trainer => Role::Trainer,
    };
    runtime.block_on(lineguard::service::pipeline::run(settings, role, super::termination()))?;
    log::info!("stopped: every consumed frame was published and its offset committed");
    Ok(ExitCode::SUCCESS)
}
