//! One function per subcommand. They own the user-facing side: progress bars, tables, files written.
//! [`cli`] declares the arguments; [`run`] dispatches to the subcommand's file; the library does the work.

mod bench_quality;
mod bench_serving;
mod broker;
pub mod cli;
mod demo;
mod eval;
mod model;
mod predict;
mod produce;
mod run;
mod synth;
mod tail;
mod teacher;
mod train;

use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressStyle};

use cli::{Cli, Command};

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Synth(args) => synth::run(&args),
        Command::Train(args) => train::run(&args).map(|_| ExitCode::SUCCESS),
        Command::ImportTeacher(args) => teacher::import(&args).map(|_| ExitCode::SUCCESS),
        Command::DistillTeacher(args) => teacher::distill(&args).map(|_| ExitCode::SUCCESS),
        Command::BenchQuality(args) => bench_quality::run(&args).map(|_| ExitCode::SUCCESS),
        Command::BenchServing(args) => bench_serving::run(&args).map(|_| ExitCode::SUCCESS),
        Command::Predict(args) => predict::run(&args),
        Command::Eval(args) => eval::run(&args).map(|_| ExitCode::SUCCESS),
        Command::Demo(args) => demo::run(&args),
        Command::Run(args) => run::run(&args),
        Command::Model(args) => model::run(&args),
        Command::Produce(args) => produce::run(&args),
        Command::Tail(args) => tail::run(&args),
        Command::Broker(args) => broker::run(&args),
    }
}

/// A progress bar on a terminal; when stderr is not a terminal (CI, logs) a log line per tenth of the work
/// instead, at most one every few seconds, so long jobs show they are alive without flooding short ones.
pub struct Progress {
    bar: ProgressBar,
    what: String,
    total: u64,
    logged_tenths: u64,
    last_log: std::time::Instant,
}

const LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

impl Progress {
    pub fn new(total: u64, what: &str) -> Progress {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template("{spinner} {prefix} [{bar:30}] {pos}/{len} {elapsed}<{eta} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(what.to_string());
        Progress { bar, what: what.to_string(), total, logged_tenths: 0, last_log: std::time::Instant::now() }
    }

    pub fn set_position(&mut self, position: u64, message: &str) {
        self.bar.set_position(position);
        self.bar.set_message(message.to_string());
        if self.bar.is_hidden() && self.total > 0 {
            let tenths = position * 10 / self.total;
            if tenths > self.logged_tenths && self.last_log.elapsed() >= LOG_INTERVAL {
                self.logged_tenths = tenths;
                self.last_log = std::time::Instant::now();
                log::info!("{}: {position}/{} {message}", self.what, self.total);
            }
        }
    }

    pub fn set_length(&mut self, total: u64) {
        self.total = total;
        self.bar.set_length(total);
    }

    pub fn inc(&mut self) {
        let position = self.bar.position() + 1;
        self.set_position(position, "");
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Cuts a training run to what fits in a time budget. The rate is measured over steps 3..23 of this
/// process (the first steps pay for allocator and cuDNN warm-up), then the total is lowered, never raised.
/// Schedules that depend on the total (the final learning-rate drop) see the cut total from then on.
pub struct TimeBudget {
    limit: std::time::Duration,
    started: std::time::Instant,
    first_step: u64,
    warm: Option<std::time::Instant>,
    decided: bool,
}

const BUDGET_WARMUP_STEPS: u64 = 3;
const BUDGET_MEASURED_STEPS: u64 = 20;

impl TimeBudget {
    pub fn new(minutes: Option<f64>, first_step: u64) -> Option<TimeBudget> {
        minutes.map(|m| TimeBudget {
            limit: std::time::Duration::from_secs_f64(m.max(0.0) * 60.0),
            started: std::time::Instant::now(),
            first_step,
            warm: None,
            decided: false,
        })
    }

    /// Call after each step; returns the new total once, when the rate is known and the budget cuts it.
    pub fn after_step(&mut self, step: u64, total: u64) -> Option<u64> {
        let done = step - self.first_step;
        if self.decided {
            return None;
        }
        if done == BUDGET_WARMUP_STEPS {
            self.warm = Some(std::time::Instant::now());
        }
        let warm = self.warm?;
        if done < BUDGET_WARMUP_STEPS + BUDGET_MEASURED_STEPS {
            return None;
        }
        self.decided = true;
        let per_step = warm.elapsed().as_secs_f64() / BUDGET_MEASURED_STEPS as f64;
        let left = self.limit.saturating_sub(self.started.elapsed()).as_secs_f64();
        let affordable = step + (left / per_step.max(1e-9)) as u64;
        log::info!(
            "time budget: {:.0} ms/step, {:.1} min left: room for {affordable} steps",
            per_step * 1e3,
            left / 60.0
        );
        (affordable < total).then_some(affordable.max(step))
    }
}

/// The async runtime of the streaming commands. Two worker threads are plenty for Kafka I/O: decoding
/// and inference run on their own threads.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

/// Runs `work` on a thread named `name` that has the libtorch CPU threads the process started with, and
/// waits for it. Commands that made libtorch parallelism opt-in (`torch::make_parallelism_opt_in`) do
/// their heavy libtorch work this way: the thread's libgomp workers end with it, where the main thread's
/// would sit idle beside the inference stage's for the rest of the run.
pub fn on_parallel_thread<T: Send>(name: &str, work: impl FnOnce() -> anyhow::Result<T> + Send) -> anyhow::Result<T> {
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new().name(name.into()).spawn_scoped(scope, || {
            lineguard::torch::use_threads(lineguard::torch::parallel_threads());
            work()
        })?;
        thread
            .join()
            .map_err(|panic| anyhow::anyhow!("{name} failed: {}", lineguard::service::panic_message(&*panic)))?
    })
}

/// Completes on SIGTERM (Kubernetes, `kill`) or Ctrl-C.
pub async fn termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => log::info!("SIGTERM received"),
                    _ = tokio::signal::ctrl_c() => log::info!("Ctrl-C received"),
                }
            }
            Err(err) => {
                log::warn!("cannot listen for SIGTERM ({err}); Ctrl-C still stops");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A finished model or teacher supersedes its checkpoint; keeping it would invite resuming a finished run.
pub fn remove_finished_checkpoint(checkpoint: &std::path::Path) {
    if checkpoint.exists() {
        let _ = std::fs::remove_file(checkpoint);
    }
}

/// `path` with its extension replaced, for files written beside another (checkpoints beside models).
pub fn sibling(path: &std::path::Path, suffix: &str) -> std::path::PathBuf {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    path.with_file_name(format!("{stem}{suffix}"))
}

/// Training steps whose losses are still on the device, read in groups: after [`Unread::MAX_STEPS`] steps
/// or [`Unread::MAX_WAIT`], whichever comes first (a slow CPU step is read at once, GPU steps a few dozen at
/// a time). A read waits for the step's kernels; reading every step would make a GPU idle while the host
/// prepares the next one.
pub(crate) struct Unread<T> {
    steps: Vec<T>,
    since: Option<std::time::Instant>,
}

impl<T> Default for Unread<T> {
    fn default() -> Self {
        Unread { steps: Vec::new(), since: None }
    }
}

impl<T> Unread<T> {
    const MAX_STEPS: usize = 25;
    const MAX_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

    pub(crate) fn push(&mut self, pending: T) {
        self.since.get_or_insert_with(std::time::Instant::now);
        self.steps.push(pending);
    }

    pub(crate) fn due(&self) -> bool {
        self.steps.len() >= Self::MAX_STEPS || self.since.is_some_and(|t| t.elapsed() >= Self::MAX_WAIT)
    }

    /// The unread steps, oldest first.
    pub(crate) fn drain(&mut self) -> std::vec::Drain<'_, T> {
        self.since = None;
        self.steps.drain(..)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_budget_cuts_once_after_the_measured_steps_and_never_extends() {
        let mut spent = TimeBudget::new(Some(0.0), 10).unwrap();
        let cuts: Vec<Option<u64>> = (11..=40).map(|step| spent.after_step(step, 1000)).collect();
        let decided_at = 10 + BUDGET_WARMUP_STEPS + BUDGET_MEASURED_STEPS;
        for (step, cut) in (11..=40).zip(&cuts) {
            let expected = (step == decided_at).then_some(decided_at);
            assert_eq!(*cut, expected, "step {step}");
        }
        let mut ample = TimeBudget::new(Some(600.0), 0).unwrap();
        assert!((1..=40).all(|step| ample.after_step(step, 100).is_none()), "an ample budget keeps the total");
        assert!(TimeBudget::new(None, 0).is_none());
    }
}
