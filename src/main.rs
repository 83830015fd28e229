//! The `lineguard` command: parses arguments, dispatches to a subcommand, turns errors into one clear
//! message and an exit code.

mod commands;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Before any other libtorch call: registers CUDA when this is a GPU install (see `lineguard::torch`).
    lineguard::torch::init();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).format_timestamp_secs().init();
    let cli = commands::cli::Cli::parse();
    match commands::run(cli) {
        Ok(code) => code,
        Err(err) => {
            if is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

/// `lineguard predict … | head` must not end with an error.
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
