//! Continuous retraining through a real broker, on a small synthetic line: the real `lineguard run`
//! binary in its `inference`, `trainer` and `all` roles, real models, real consumers. Nothing is mocked.
//!
//! - drift: the line's lighting changes, false alarms rise, operators mark them normal, the trainer
//!   promotes a model that raises fewer on held-out frames and scores fresh drifted trays closer to
//!   normal, both replicas swap it in without losing or repeating a frame, and a replica started
//!   afterwards serves it too;
//! - poisoning: operators mark defects normal; the gate refuses what they would teach;
//! - a crash while writing a promoted version leaves the previous one current and loadable.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use common::kafka::{count_by_key, free_port, http_get, metric, read_topic, wait_for, Harness, Record, Service};
use common::{lineguard_ok, path_str};
use lineguard::model::EfficientAd;
use lineguard::service::metrics::GateOutcome;
use lineguard::service::retrain::gate::GateReport;
use lineguard::service::sink::ResultRecord;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tch::Device;

/// A small model of a synthetic line, its threshold, and frames: as built, and with the light changed.
struct Fixture {
    data: PathBuf,
    model: PathBuf,
    threshold: f32,
    good: Vec<PathBuf>,
    drifted: Vec<PathBuf>,
    stained: Vec<PathBuf>,
    defects: PathBuf,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("retrain-fixture-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let data = dir.join("data");
        common::synth_small(&data, 10, 6, 24);
        let model = dir.join("model.safetensors");
        let recipe = "image_size = 128\nchannels = 32\n[train]\nsteps = 200\ncheckpoint_every = 0\n";
        common::train_with_recipe(&data, &model, recipe);
        // The alarm threshold a plant would set: just above every normal validation tray.
        let loaded = EfficientAd::load(&model, Device::Cpu).unwrap();
        let validation = lineguard::data::loco::list_images(&data.join("validation/good")).unwrap();
        let highest = validation
            .iter()
            .map(|p| lineguard::eval::score_image(&loaded, p).unwrap().score)
            .fold(f32::NEG_INFINITY, f32::max);
        let threshold = highest * 1.05;
        let good = lineguard::data::loco::list_images(&data.join("test/good")).unwrap();
        let drifted_dir = dir.join("drifted");
        std::fs::create_dir_all(&drifted_dir).unwrap();
        let drifted = good.iter().map(|p| edit(p, &drifted_dir, brighten)).collect();
        // Known defects for the gate (a dark foreign object on validation trays), and the same defect on
        // test trays for the poisoning stream.
        let defects = dir.join("defects");
        let stained = dir.join("stained");
        for folder in [&defects, &stained] {
            std::fs::create_dir_all(folder).unwrap();
        }
        for path in &validation {
            edit(path, &defects, stain);
        }
        let stained = good.iter().map(|p| edit(p, &stained, stain)).collect();
        Fixture { data, model, threshold, good, drifted, stained, defects }
    })
}

fn edit(path: &Path, out: &Path, change: fn(&mut image::RgbImage)) -> PathBuf {
    let mut image = image::open(path).unwrap().to_rgb8();
    change(&mut image);
    let target = out.join(path.file_name().unwrap());
    image.save(&target).unwrap();
    target
}

/// The same tray under stronger light.
fn brighten(image: &mut image::RgbImage) {
    for pixel in image.pixels_mut() {
        for channel in pixel.0.iter_mut() {
            *channel = channel.saturating_add(45);
        }
    }
}

/// A dark object lying on the tray.
fn stain(image: &mut image::RgbImage) {
    for y in 40..76 {
        for x in 50..86 {
            image.put_pixel(x, y, image::Rgb([230, 30, 200]));
        }
    }
}

/// The known-defect poisoning test isolates the rule on the `anomalies` folder from the synthetic one.
const WITHOUT_SYNTHETIC_GUARD: &str = "synthetic_recall_tolerance = 1.0";

fn recall(model: &Path, defects: &Path, threshold: f32) -> f64 {
    let frames = lineguard::data::loco::list_images(defects).unwrap();
    let caught = scores(model, &frames).iter().filter(|s| **s > threshold).count();
    caught as f64 / frames.len() as f64
}

fn scores(model: &Path, frames: &[PathBuf]) -> Vec<f32> {
    let model = EfficientAd::load(model, Device::Cpu).unwrap();
    frames.iter().map(|p| lineguard::eval::score_image(&model, p).unwrap().score).collect()
}

/// The topics and state folder of one retraining line.
struct Line {
    frames: String,
    results: String,
    dead_letter: String,
    accepted: String,
    feedback: String,
    models: String,
    state: PathBuf,
}

impl Line {
    fn new(harness: &Harness) -> Line {
        let t = |kind: &str| format!("{}.{kind}", harness.name);
        let line = Line {
            frames: t("frames"),
            results: t("results"),
            dead_letter: t("dead-letter"),
            accepted: t("accepted"),
            feedback: t("feedback"),
            models: t("models"),
            state: harness.dir.path().join("state"),
        };
        harness.create_topics(&[&line.frames], 2);
        harness.create_topics(&[&line.results, &line.dead_letter, &line.accepted, &line.feedback, &line.models], 1);
        line
    }

    /// A pipeline file for one process; every process of a deployment shares the line's settings.
    fn pipeline(&self, harness: &Harness, file: &str, metrics_port: u16, extra_retrain: &str) -> PathBuf {
        let f = fixture();
        let text = format!(
            r#"[kafka]
brokers = "{brokers}"
[kafka.consumer]
"session.timeout.ms" = "6000"
[metrics]
listen = "127.0.0.1:{metrics_port}"
[shutdown]
drain_timeout_secs = 60
[lines.trays]
model = "{model}"
input_topics = ["{frames}"]
results_topic = "{results}"
maps_topic = ""
map_format = "none"
dead_letter_topic = "{dead_letter}"
group_id = "replicas"
threshold = {threshold}
device = "cpu"
max_batch = 4
[lines.trays.retrain]
accept_below = {accept_below}
accepted_topic = "{accepted}"
feedback_topic = "{feedback}"
models_topic = "{models}"
state_dir = "{state}"
originals = "{originals}"
pinned_originals = 6
buffer_frames = 64
holdout_every = 3
holdout_frames = 32
min_frames = 4
# The tests stream trays in seconds: every confidently normal one may teach.
accept_per_minute = 60000
learning_rate = 0.0001
steps_per_minute = 6000
evaluate_every = 10
# Every version of a run stays, so that rolling back to 1 works however many promotions came.
keep_versions = 20
# Every publication is signed and every replica checks it, rollback included.
signing_key = "retrain-tests-signing-key-0123456789"
{extra_retrain}
"#,
            brokers = harness.brokers(),
            model = path_str(&f.model),
            frames = self.frames,
            results = self.results,
            dead_letter = self.dead_letter,
            threshold = f.threshold,
            accept_below = f.threshold - 0.02,
            accepted = self.accepted,
            feedback = self.feedback,
            models = self.models,
            state = path_str(&self.state),
            originals = path_str(&f.data.join("train/good")),
        );
        let path = harness.dir.path().join(file);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn store(&self) -> lineguard::service::retrain::store::VersionStore {
        lineguard::service::retrain::store::VersionStore::open(&self.state.join("trays"), 20).unwrap()
    }

    fn gate_log(&self) -> Vec<GateReport> {
        let text = std::fs::read_to_string(self.state.join("trays/gate-log.jsonl")).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }
}

/// Results of the frames sent with `prefix`: every one exactly once. `in_topic` is how many results the
/// topic should hold by now (reading stops 2 s after that many, so duplicates would show).
fn results_of(
    brokers: &str,
    topic: &str,
    (prefix, expected, in_topic): (&str, usize, usize),
    services: &[&Service],
) -> Vec<ResultRecord> {
    let records = read_topic(brokers, topic, in_topic, Duration::from_secs(60));
    let mine: Vec<&Record> = records.iter().filter(|r| r.key.starts_with(prefix)).collect();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for record in &mine {
        *counts.entry(record.key.as_str()).or_default() += 1;
    }
    let logs: Vec<String> = services.iter().map(|s| s.log()).collect();
    assert_eq!(counts.len(), expected, "every {prefix} frame scored:\n{counts:?}\n{}", logs.join("\n----\n"));
    assert!(counts.values().all(|&n| n == 1), "no frame scored twice: {counts:?}");
    mine.iter().map(|r| serde_json::from_slice(&r.payload).unwrap()).collect()
}

/// Waits until every result of `prefix` is in, then returns them.
fn wait_for_results(
    harness: &Harness,
    line: &Line,
    (prefix, expected, in_topic): (&str, usize, usize),
    services: &[&Service],
) -> Vec<ResultRecord> {
    wait_for(&format!("{expected} results of {prefix}"), Duration::from_secs(180), services, || {
        let records = read_topic(&harness.brokers(), &line.results, in_topic, Duration::from_secs(5));
        count_by_key(&records).keys().filter(|k| k.starts_with(prefix)).count() >= expected
    });
    results_of(&harness.brokers(), &line.results, (prefix, expected, in_topic), services)
}

fn false_positive_rate(results: &[ResultRecord]) -> f64 {
    results.iter().filter(|r| r.verdict == "anomalous").count() as f64 / results.len() as f64
}

/// What an operator's tool does: the results record, with the verdict corrected, on the feedback topic.
fn mark_normal<'a>(harness: &Harness, line: &Line, results: impl IntoIterator<Item = &'a ResultRecord>) {
    let producer: FutureProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", harness.brokers()).create().unwrap();
    common::kafka::runtime().block_on(async {
        for result in results {
            let mut record = serde_json::to_value(result).unwrap();
            record["verdict"] = "normal".into();
            let json = serde_json::to_vec(&record).unwrap();
            let sent = FutureRecord::to(&line.feedback).key(&result.frame_id).payload(&json);
            producer.send(sent, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
        }
    });
}

fn model_version(port: u16) -> Option<f64> {
    metric(port, "lineguard_model_version{line=\"trays\"}")
}

fn ready(port: u16) -> bool {
    http_get(port, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200"))
}

fn all<'a>(trainer: &'a Service, replicas: &'a [Service]) -> Vec<&'a Service> {
    std::iter::once(trainer).chain(replicas).collect()
}

#[test]
fn drift_is_learned_and_promoted_to_every_replica_after_a_crash_mid_write() {
    let f = fixture();
    let harness = Harness::new("drift");
    let line = Line::new(&harness);
    let ports = [free_port(), free_port(), free_port(), free_port()];
    let trainer_file = line.pipeline(&harness, "trainer.toml", ports[0], "");
    let replica_files: Vec<PathBuf> =
        (1..4).map(|i| line.pipeline(&harness, &format!("replica{i}.toml"), ports[i], "")).collect();

    // The trainer's first promotion dies halfway through writing version 2, as an OOM kill would.
    let mut trainer = harness.run_with(
        &trainer_file,
        "crashed.log",
        &["--role", "trainer"],
        &[("LINEGUARD_CRASH_WRITING", "v000002.safetensors")],
    );
    let replicas: Vec<Service> =
        replica_files[..2].iter().map(|p| harness.run_with(p, "log", &["--role", "inference"], &[])).collect();
    wait_for("two ready replicas", Duration::from_secs(90), &all(&trainer, &replicas), || {
        ready(ports[1]) && ready(ports[2])
    });
    wait_for("the trainer", Duration::from_secs(60), &all(&trainer, &replicas), || {
        model_version(ports[0]) == Some(1.0)
    });

    // The light changes: the served model flags normal trays.
    harness.produce(&line.frames, &f.drifted[..12], "d1");
    let before = wait_for_results(&harness, &line, ("d1-", 12, 12), &all(&trainer, &replicas));
    let fpr_before = false_positive_rate(&before);
    assert!(before.iter().all(|r| r.model_version == 1));
    assert!(fpr_before >= 0.5, "the drift raises false alarms: {fpr_before}");

    // Operators mark the false alarms normal; the trainer learns, gates, and crashes writing version 2.
    mark_normal(&harness, &line, before.iter().filter(|r| r.verdict == "anomalous"));
    let crashed = trainer.wait_exit(Duration::from_secs(240));
    assert!(!crashed.success(), "the crash hook aborts:\n{}", trainer.log());
    let leftovers: Vec<_> = std::fs::read_dir(line.state.join("trays/versions")).unwrap().flatten().collect();
    let half_written = |e: &std::fs::DirEntry| e.file_name().to_string_lossy().starts_with("v000002.safetensors.tmp");
    assert!(leftovers.iter().any(half_written), "the crash left a temp file: {leftovers:?}\n{}", trainer.log());
    // (Opening the store, as the restarted trainer will, clears it.)
    let store = line.store();
    assert_eq!(store.current().unwrap(), Some(1), "the half-written version never became current");
    assert!(EfficientAd::load(&store.model_path(1), Device::Cpu).is_ok(), "the previous model loads");
    assert_eq!(model_version(ports[1]), Some(1.0), "replicas still serve version 1");

    // The restarted trainer resumes the buffer, promotes, and both replicas swap the new model in.
    let mut trainer = harness.run_with(&trainer_file, "log", &["--role", "trainer"], &[]);
    let buffered =
        |part: &str| metric(ports[0], &format!("lineguard_replay_buffer_frames{{line=\"trays\",part=\"{part}\"}}"));
    wait_for("the reopened replay buffer", Duration::from_secs(60), &all(&trainer, &replicas), || {
        ["recent", "marked"].iter().filter_map(|part| buffered(part)).sum::<f64>() > 0.0
    });
    // A promotion for headroom alone, or one held-out frame cleared, changes few verdicts on new trays:
    // the test goes on once a promoted model raises at most half the false alarms on the held-out frames
    // that version 1 raised (the demo waits for the same).
    let fewer_false_alarms = || {
        let log = line.gate_log();
        let first = log.iter().filter(|r| r.current_version == 1).map(|r| r.current.false_positive_rate);
        let baseline = first.fold(0.0, f64::max);
        log.iter().any(|r| r.outcome == GateOutcome::Promoted && r.candidate.false_positive_rate <= baseline / 2.0)
    };
    let description = "a promotion with half the false alarms, served by both replicas";
    wait_for(description, Duration::from_secs(300), &all(&trainer, &replicas), || {
        let versions = [model_version(ports[0]), model_version(ports[1]), model_version(ports[2])];
        fewer_false_alarms() && versions[0].is_some_and(|v| v >= 2.0) && versions.iter().all(|v| *v == versions[0])
    });
    let promoted = model_version(ports[0]).unwrap() as u64;
    assert!(!std::fs::read_dir(line.state.join("trays/versions"))
        .unwrap()
        .flatten()
        .any(|e| { e.file_name().to_string_lossy().contains(".tmp") }));

    harness.produce(&line.frames, &f.drifted[12..], "d2");
    let after = wait_for_results(&harness, &line, ("d2-", 12, 24), &all(&trainer, &replicas));
    let fpr_after = false_positive_rate(&after);
    assert!(after.iter().all(|r| r.model_version >= promoted), "phase 2 is scored by the promoted model");
    // Learning the light shows in the scores of trays neither model has seen: the promoted model scores
    // them closer to normal than version 1 does. (At this test's budget, a 32-channel model trained for
    // 200 steps, that is about 1% of the score, which clears few verdicts: the drifted trays sit about 2%
    // above the threshold. The demo's larger model shows the false alarms fall: tests/demo.rs.)
    let median = |mut values: Vec<f32>| {
        values.sort_by(f32::total_cmp);
        values[values.len() / 2]
    };
    let by_v1 = median(scores(&f.model, &f.drifted[12..]));
    let by_promoted = median(after.iter().map(|r| r.score.unwrap_or(f32::NAN)).collect());
    let decisions: Vec<String> = line.gate_log().iter().map(GateReport::summary).collect();
    eprintln!(
        "fresh drifted trays: median score {by_v1:.4} with v1 → {by_promoted:.4} with v{promoted} (threshold {:.4}); \
         false alarms {fpr_before:.2} on the first drifted trays → {fpr_after:.2}\n{}",
        f.threshold,
        decisions.join("\n")
    );
    assert!(by_promoted < by_v1, "retraining learns the light: median drifted score {by_v1} → {by_promoted}");
    // No frame lost or scored twice across the swap (checked again now that everything is in).
    results_of(&harness.brokers(), &line.results, ("d1-", 12, 24), &all(&trainer, &replicas));

    // A replica that starts now serves the promoted model from its first frame.
    let late = harness.run_with(&replica_files[2], "log", &["--role", "inference"], &[]);
    wait_for("the late replica", Duration::from_secs(90), &[&late], || {
        model_version(ports[3]).is_some_and(|v| v as u64 >= promoted)
    });
    let report = line.gate_log();
    assert!(report.iter().any(|r| r.outcome == lineguard::service::metrics::GateOutcome::Promoted), "{report:?}");
    let listed =
        common::stdout(&lineguard_ok(&["model", "list", "--pipeline", path_str(&trainer_file), "--line", "trays"]));
    // Training goes on after the first promotion, so a later version may be current by now.
    let current = line.store().current().unwrap().unwrap();
    assert!(current >= promoted && listed.contains(&format!("* v{current} ")), "{listed}");
    eprintln!("{listed}");
    // Adapting to the drift must not cost the defects the gate never saw (before the candidates were
    // scaled on the originals, the promoted model caught none of them).
    let serving = line.store().current().unwrap().unwrap();
    let serving_file = line.store().model_path(serving);
    let (before, after) = (recall(&f.model, &f.defects, f.threshold), recall(&serving_file, &f.defects, f.threshold));
    eprintln!("recall on the known defects: {before:.3} with v1 → {after:.3} with v{serving}");
    assert!(after >= before, "the promoted model still catches the known defects: {before} → {after}");

    // Rolling back (with the trainer stopped, so that it cannot promote again meanwhile) brings every
    // replica back to version 1.
    let _ = trainer.terminate(Duration::from_secs(60));
    lineguard_ok(&["model", "rollback", "--pipeline", path_str(&trainer_file), "--line", "trays", "--to", "1"]);
    wait_for("every replica back on version 1", Duration::from_secs(60), &[&late], || {
        ports[1..].iter().all(|port| model_version(*port) == Some(1.0))
    });
    let listed =
        common::stdout(&lineguard_ok(&["model", "list", "--pipeline", path_str(&trainer_file), "--line", "trays"]));
    assert!(listed.contains("* v1 "), "{listed}");
}

#[test]
fn poisoned_feedback_never_lowers_recall() {
    let f = fixture();
    // Only the known-defect rule here; the synthetic one has a test of its own.
    let anomalies = format!("anomalies = \"{}\"\n{WITHOUT_SYNTHETIC_GUARD}", path_str(&f.defects));
    let (harness, line, port, service) = ready_single_process("poison", &anomalies);
    let initial_recall = recall(&f.model, &f.defects, f.threshold);
    assert!(initial_recall >= 0.8, "the fixture model catches the known defects: {initial_recall}");
    poison(&harness, &line, &service);

    // Since candidates are scaled on the originals, a poisoned one is often refused for its false alarms
    // before it loses recall; whichever rule refuses it, recall must never fall. By the eighth gate the
    // last marked frames were trained on.
    wait_for("eight gate decisions", Duration::from_secs(300), &[&service], || line.gate_log().len() >= 8);
    let accepted = metric(port, "lineguard_frames_accepted_total{line=\"trays\"}").unwrap_or(0.0);
    assert!(accepted > 0.0, "confidently normal frames were accepted automatically");
    let reports = line.gate_log();
    for report in reports.iter().filter(|r| r.outcome == GateOutcome::Promoted) {
        assert!(report.candidate.recall >= report.current.recall, "{}", report.summary());
    }
    let store = line.store();
    let current = store.model_path(store.current().unwrap().unwrap());
    let final_recall = recall(&current, &f.defects, f.threshold);
    assert!(final_recall >= initial_recall, "recall {initial_recall} → {final_recall}");
    // Every decision is counted under its reason.
    let counted: f64 = GateOutcome::ALL
        .iter()
        .map(|outcome| {
            let (outcome, reason) = outcome.labels();
            let sample =
                format!("lineguard_model_candidates_total{{line=\"trays\",outcome=\"{outcome}\",reason=\"{reason}\"}}");
            metric(port, &sample).unwrap_or(0.0)
        })
        .sum();
    assert!(counted >= reports.len() as f64, "{counted} counted, {} logged", reports.len());
}

/// A tmpfs mounted over a test's state folder, so that the trainer meets a real full or read-only disk
/// (`ENOSPC`, `EROFS`); unmounted when dropped. None where mounting is not permitted.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "lineguard-test", path_str(at)])
            .stderr(std::process::Stdio::null())
            .status();
        status.is_ok_and(|s| s.success()).then(|| Tmpfs(at.to_path_buf()))
    }

    /// Remounts with the options `options` gives at each try. The trainer may be writing meanwhile (a
    /// checkpoint is tens of MB): the kernel then refuses a size below what is in use, or read-only while
    /// a file is open for writing (EBUSY), so this tries again for up to 30 s.
    fn remount(&self, options: impl Fn() -> String) {
        wait_for(&format!("remount,{}", options()), Duration::from_secs(30), &[], || {
            std::process::Command::new("mount")
                .args(["-o", &format!("remount,{}", options()), path_str(&self.0)])
                .status()
                .unwrap()
                .success()
        });
    }

    fn used_bytes(&self) -> u64 {
        // SAFETY: statvfs(3) fills the struct it is given; the path is a valid C string.
        let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
        let path = std::ffi::CString::new(path_str(&self.0)).unwrap();
        assert_eq!(unsafe { libc::statvfs(path.as_ptr(), &mut stats) }, 0);
        (stats.f_blocks - stats.f_bfree) * stats.f_frsize
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").args(["-l", path_str(&self.0)]).status();
    }
}

/// The state directory fills up, then turns read-only, while the trainer promotes: the version cannot be
/// written, the replicas keep serving the last good model, nothing stops, and once the disk is writable
/// again the next gate promotes. Before, the first failed write ended the trainer (and, through
/// `/healthz`, restarted the pod into the same full disk).
#[test]
fn a_full_or_read_only_state_directory_costs_promotions_not_inspection() {
    let f = fixture();
    let harness = Harness::new("fulldisk");
    let line = Line::new(&harness);
    let Some(disk) = Tmpfs::mount(&line.state, "256m") else {
        eprintln!("SKIPPED: this machine does not permit mounting a tmpfs (needs CAP_SYS_ADMIN)");
        return;
    };
    let port = free_port();
    let pipeline = line.pipeline(&harness, "all.toml", port, "");
    let mut service = harness.run(&pipeline);
    wait_for("readiness", Duration::from_secs(90), &[&service], || ready(port));
    wait_for("the trainer", Duration::from_secs(90), &[&service], || service.log().contains("trainer starts from"));
    // Room for the frames the trainer buffers, not for another model (the fixture's is 13 MB).
    disk.remount(|| format!("size={}", disk.used_bytes() + 4 * 1024 * 1024));

    harness.produce(&line.frames, &f.drifted[..12], "d1");
    let drifted = wait_for_results(&harness, &line, ("d1-", 12, 12), &[&service]);
    mark_normal(&harness, &line, drifted.iter().filter(|r| r.verdict == "anomalous"));
    let version_errors =
        || metric(port, "lineguard_retrain_state_write_errors_total{line=\"trays\",what=\"version\"}").unwrap_or(0.0);
    wait_for("a promotion that the full disk refuses", Duration::from_secs(240), &[&service], || {
        version_errors() >= 1.0
    });
    assert!(service.log().contains("cannot write the version"), "{}", service.log());
    assert_eq!(model_version(port), Some(1.0), "the last good model serves");
    assert_eq!(line.store().current().unwrap(), Some(1));

    // Read-only now, with room again: still refused, still serving.
    disk.remount(|| "size=256m,ro".into());
    let refused = version_errors();
    wait_for("a promotion that the read-only disk refuses", Duration::from_secs(240), &[&service], || {
        version_errors() > refused
    });
    harness.produce(&line.frames, &f.good[..4], "g1");
    let scored = wait_for_results(&harness, &line, ("g1-", 4, 16), &[&service]);
    assert!(scored.iter().all(|r| r.model_version == 1), "inspection goes on with version 1");
    assert!(http_get(port, "/healthz").is_some_and(|r| r.starts_with("HTTP/1.1 200")), "a restart would not help");

    // Writable again: the next gate promotes, and the line serves the new version.
    disk.remount(|| "rw".into());
    wait_for("a promotion once the disk is writable", Duration::from_secs(240), &[&service], || {
        model_version(port).is_some_and(|v| v >= 2.0)
    });
    assert!(line.store().current().unwrap().is_some_and(|v| v >= 2));
    assert!(service.log().contains("can be written to the state directory again"), "{}", service.log());
    let not_stored = line.gate_log().iter().filter(|r| r.outcome == GateOutcome::NotStored).count();
    eprintln!("state directory full, then read-only: {not_stored} gate decisions not stored, then promoted");
    assert!(service.terminate(Duration::from_secs(60)).success(), "{}", service.log());
}

/// One `--role all` process (inference and trainer) on a line of its own, ready to score: its broker,
/// topics, metrics port and the process.
fn ready_single_process(name: &str, extra_retrain: &str) -> (Harness, Line, u16, Service) {
    let harness = Harness::new(name);
    let line = Line::new(&harness);
    let port = free_port();
    let pipeline = line.pipeline(&harness, "all.toml", port, extra_retrain);
    let service = harness.run(&pipeline);
    wait_for("readiness", Duration::from_secs(90), &[&service], || ready(port));
    (harness, line, port, service)
}

/// A normal stream with 5% defects, and a careless operator who marks every frame normal; then a batch
/// of nothing but defects, all marked normal.
fn poison(harness: &Harness, line: &Line, service: &Service) {
    let f = fixture();
    let mut stream: Vec<PathBuf> = f.good[..19].to_vec();
    stream.insert(9, f.stained[0].clone());
    harness.produce(&line.frames, &stream, "p1");
    let first = wait_for_results(harness, line, ("p1-", 20, 20), &[service]);
    mark_normal(harness, line, &first);
    harness.produce(&line.frames, &f.stained[1..13], "p2");
    let second = wait_for_results(harness, line, ("p2-", 12, 32), &[service]);
    mark_normal(harness, line, &second);
}

/// The same poisoning on a line without a folder of known defects. Before, the gate promoted candidates
/// that scored everything lower (each was scaled on held-out frames, stains included) and the line went
/// blind to every defect. Now candidates are scaled on the pinned originals and judged on foreign
/// objects the gate paints itself (`synthetic_recall_tolerance`, 0.25 by default): the serving model
/// must still flag painted objects on fresh normal trays. The stains themselves are what the operators
/// declared normal; without known defects nothing can refuse that lesson (measured and printed: in one
/// of two runs the stains were learnt as normal), which is what the `anomalies` folder is for.
#[test]
fn poisoned_feedback_without_known_defects_keeps_the_line_seeing_foreign_objects() {
    let f = fixture();
    let (harness, line, _port, service) = ready_single_process("poison-synthetic", "");
    poison(&harness, &line, &service);
    // The last marked frames are on the feedback topic now; by the eighth gate they were trained on.
    wait_for("eight gate decisions", Duration::from_secs(300), &[&service], || line.gate_log().len() >= 8);
    for report in line.gate_log() {
        eprintln!("{}", report.summary());
        if report.outcome == GateOutcome::Promoted {
            let (now, then) = (report.current.synthetic_recall, report.candidate.synthetic_recall);
            assert!(then.unwrap_or(1.0) >= now.unwrap_or(0.0) - 0.25, "{}", report.summary());
        }
    }
    let store = line.store();
    let serving = store.model_path(store.current().unwrap().unwrap());
    // Fresh normal trays (never streamed) with objects painted at other places than any gate's.
    let trays = lineguard::data::loco::list_images(&f.data.join("validation/good")).unwrap();
    let trays = lineguard::data::loco::load_inputs(&trays, 128, &|| {}).unwrap();
    // Four objects per tray, each somewhere else (objects are seeded by position in the batch).
    let trays = tch::Tensor::cat(&[&trays, &trays, &trays, &trays], 0);
    let painted = lineguard::service::retrain::gate::foreign_objects(&trays, 0x5EED);
    let seen = |model: &Path| {
        let model = EfficientAd::load(model, Device::Cpu).unwrap();
        lineguard::service::retrain::gate::read(&model, &trays, &painted, None, f.threshold).synthetic_recall.unwrap()
    };
    let (before, after) = (seen(&f.model), seen(&serving));
    let stains = (recall(&f.model, &f.defects, f.threshold), recall(&serving, &f.defects, f.threshold));
    eprintln!(
        "painted objects caught: {before:.3} → {after:.3}; the stains marked normal: {:.3} → {:.3}",
        stains.0, stains.1
    );
    assert!(after >= before - 0.25, "the line still sees foreign objects: {before} → {after}");
}
