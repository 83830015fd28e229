//! `lineguard broker`: a local broker in the foreground, to try `run`, `produce` and `tail` by hand.

use std::process::ExitCode;

use lineguard::service::broker::LocalBroker;

use super::cli::BrokerArgs;

pub fn run(args: &BrokerArgs) -> anyhow::Result<ExitCode> {
    let broker = LocalBroker::start_on(Some(args.port), None, None)?;
    eprintln!(
        "nisshi broker on {} (pid {}, in memory: data is gone when it stops); Ctrl-C to stop\n\
         try: lineguard produce --topic frames.trays --create-partitions 4 runs/demo/data/test/logical_anomalies",
        broker.bootstrap(),
        broker.pid()
    );
    super::runtime()?.block_on(super::termination());
    drop(broker);
    Ok(ExitCode::SUCCESS)
}
