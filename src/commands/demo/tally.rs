//! What the demo sees on the output topics, grouped the way a newcomer reads it: per scene (the line as
//! built, then under brighter light) and per model version that scored the frames, so that the second
//! act's before/after is one table.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rdkafka::message::{Headers, Message};
use serde::Serialize;

use lineguard::service::metrics::RetrainSummary;
use lineguard::service::retrain::gate::GateReport;
use lineguard::service::sink::{ResultRecord, HEADER_ERROR_REASON};

/// Kinds of test tray, by folder.
pub const SPLITS: [&str; 3] = ["good", "logical_anomalies", "structural_anomalies"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scene {
    /// The line the model was trained for.
    AsBuilt,
    /// The second act: the same kind of trays under stronger light.
    BrighterLight,
}

impl Scene {
    pub fn describe(self) -> &'static str {
        match self {
            Scene::AsBuilt => "as built",
            Scene::BrighterLight => "brighter light",
        }
    }
}

/// One scored frame.
struct Scored {
    scene: Scene,
    split: &'static str,
    flagged: bool,
    score: f32,
    model_version: u64,
    /// The results record as published: an operator's verdict on it goes back as this record with its
    /// verdict changed.
    record: Vec<u8>,
}

/// Frames, false alarms and catches of one (scene, model version).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Row {
    pub scene: Option<Scene>,
    pub model_version: u64,
    pub good: usize,
    pub false_alarms: usize,
    pub logical: usize,
    pub logical_caught: usize,
    pub structural: usize,
    pub structural_caught: usize,
}

impl Row {
    fn add(&mut self, split: &str, flagged: bool) {
        let (total, hits) = match split {
            "good" => (&mut self.good, &mut self.false_alarms),
            "logical_anomalies" => (&mut self.logical, &mut self.logical_caught),
            _ => (&mut self.structural, &mut self.structural_caught),
        };
        *total += 1;
        *hits += flagged as usize;
    }

    pub fn false_alarm_rate(&self) -> f64 {
        self.false_alarms as f64 / self.good.max(1) as f64
    }
}

/// The demo's machine-readable summary (`<workdir>/summary.json`), what its CI test checks.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub threshold: f32,
    pub sent: u64,
    pub scored: usize,
    pub dead_letters: Vec<DeadLetter>,
    pub rows: Vec<Row>,
    /// Frames per second while the first act's trays streamed.
    pub throughput_frames_per_s: f64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub in_pipeline_p50_ms: Option<f64>,
    pub in_pipeline_p99_ms: Option<f64>,
    pub retraining: RetrainingSummary,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub key: String,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct RetrainingSummary {
    pub steps: u64,
    pub promoted: u64,
    pub rejected: u64,
    /// Operator verdicts the demo sent (false alarms on normal trays marked normal).
    pub marked_normal: usize,
    /// Seconds from the operator's verdicts to the first promotion of a model that raised fewer false
    /// alarms on the gate's held-out frames than the model serving at the light change; None when none
    /// came within the act's window.
    pub fewer_false_alarms_after_s: Option<f64>,
    /// The same for at most half of them, the act's early end.
    pub half_the_false_alarms_after_s: Option<f64>,
    /// Every gate decision of the run, in order.
    pub gates: Vec<GateReport>,
}

pub struct Tally {
    threshold: f32,
    /// Key prefix of each batch of frames sent, and its scene.
    batches: Vec<(String, Scene)>,
    results: HashMap<String, Scored>,
    dead_letters: Vec<DeadLetter>,
    maps: HashMap<String, Vec<u8>>,
    latencies_ms: Vec<f64>,
    in_pipeline_ms: Vec<f64>,
    first_result: Option<Instant>,
    last_result: Option<Instant>,
}

impl Tally {
    pub fn new(threshold: f32) -> Tally {
        Tally {
            threshold,
            batches: Vec::new(),
            results: HashMap::new(),
            dead_letters: Vec::new(),
            maps: HashMap::new(),
            latencies_ms: Vec::new(),
            in_pipeline_ms: Vec::new(),
            first_result: None,
            last_result: None,
        }
    }

    /// Frames whose key starts with `prefix` belong to `scene`.
    pub fn expect_batch(&mut self, prefix: &str, scene: Scene) {
        self.batches.push((format!("{prefix}-"), scene));
    }

    fn scene_of(&self, key: &str) -> Option<Scene> {
        self.batches.iter().find(|(prefix, _)| key.starts_with(prefix.as_str())).map(|(_, scene)| *scene)
    }

    /// Results and dead letters in so far for the frames of `prefix`.
    pub fn outputs_of(&self, prefix: &str) -> u64 {
        let prefix = format!("{prefix}-");
        let results = self.results.keys().filter(|k| k.starts_with(&prefix)).count();
        let dead = self.dead_letters.iter().filter(|d| d.key.starts_with(&prefix)).count();
        (results + dead) as u64
    }

    pub fn record(
        &mut self,
        message: &rdkafka::message::BorrowedMessage<'_>,
        maps_topic: &str,
        dead_letter_topic: &str,
    ) {
        let key = message.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default();
        let payload = message.payload().unwrap_or_default();
        let topic = message.topic();
        if topic == maps_topic {
            self.maps.insert(key, payload.to_vec());
        } else if topic == dead_letter_topic {
            let reason = message
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == HEADER_ERROR_REASON).and_then(|h| h.value))
                .map(|r| String::from_utf8_lossy(r).into_owned())
                .unwrap_or_default();
            self.dead_letters.push(DeadLetter { key, reason });
        } else if let Ok(result) = serde_json::from_slice::<ResultRecord>(payload) {
            // A key seen twice (redelivery) counts once.
            if self.results.contains_key(&key) {
                return;
            }
            let Some(scene) = self.scene_of(&key) else { return };
            // Throughput is the first act's: the second has a quiet pause in the middle.
            if scene == Scene::AsBuilt {
                let now = Instant::now();
                self.first_result.get_or_insert(now);
                self.last_result = Some(now);
            }
            let split = SPLITS.iter().find(|s| key.contains(&format!("-{s}-"))).copied().unwrap_or("unknown");
            let captured = result.camera.captured_at_ms;
            self.latencies_ms.push((lineguard::service::kafka::unix_ms() - captured) as f64);
            self.in_pipeline_ms.push(result.timings_ms.in_pipeline);
            let scored = Scored {
                scene,
                split,
                flagged: result.verdict == "anomalous",
                score: result.score.unwrap_or(f32::NAN),
                model_version: result.model_version,
                record: payload.to_vec(),
            };
            self.results.insert(key, scored);
        }
    }

    /// One row per (scene, model version), in that order.
    pub fn rows(&self) -> Vec<Row> {
        let mut rows: BTreeMap<(Scene, u64), Row> = BTreeMap::new();
        for scored in self.results.values() {
            let row = rows.entry((scored.scene, scored.model_version)).or_insert_with(|| Row {
                scene: Some(scored.scene),
                model_version: scored.model_version,
                ..Row::default()
            });
            row.add(scored.split, scored.flagged);
        }
        rows.into_values().collect()
    }

    /// The results records of normal trays that were flagged, among the frames of `prefix`: what an
    /// operator looking at the alarms would mark normal (the demo knows which trays are normal).
    pub fn false_alarms_of(&self, prefix: &str) -> Vec<(&str, &[u8])> {
        let prefix = format!("{prefix}-");
        let mut found: Vec<(&str, &[u8])> = self
            .results
            .iter()
            .filter(|(key, s)| key.starts_with(&prefix) && s.split == "good" && s.flagged)
            .map(|(key, s)| (key.as_str(), s.record.as_slice()))
            .collect();
        found.sort();
        found
    }

    pub fn live_line(&self, scene: Scene, elapsed: Duration, retrain: &RetrainSummary) -> String {
        let mut row = Row::default();
        for scored in self.results.values().filter(|s| s.scene == scene) {
            row.add(scored.split, scored.flagged);
        }
        format!(
            "[{:>5.1}s] {} | scored {:>3} ({:.2}/s) | caught logical {}/{}, structural {}/{} | false alarms {}/{} | \
             dead letters {} | latency p50 {} | model v{} | retraining: {} frames, {} steps, {} promoted, {} rejected",
            elapsed.as_secs_f64(),
            scene.describe(),
            self.results.len(),
            self.results.len() as f64 / elapsed.as_secs_f64().max(1e-3),
            row.logical_caught,
            row.logical,
            row.structural_caught,
            row.structural,
            row.false_alarms,
            row.good,
            self.dead_letters.len(),
            fmt_ms(percentile(&self.latencies_ms, 0.5)),
            retrain.model_version,
            retrain.buffered,
            retrain.steps,
            retrain.promoted,
            retrain.rejected
        )
    }

    /// Original | heatmap pictures of the flagged frames.
    pub fn write_pictures(&self, paths: &HashMap<String, PathBuf>, folder: &Path) {
        for (key, scored) in &self.results {
            let (Some(map), Some(path), true) = (self.maps.get(key), paths.get(key), scored.flagged) else { continue };
            let (Ok(original), Ok(map)) = (lineguard::data::preprocess::load_image(path), image::load_from_memory(map))
            else {
                continue;
            };
            let map = image::imageops::resize(
                &map.to_rgb8(),
                original.width(),
                original.height(),
                image::imageops::FilterType::Triangle,
            );
            let mut picture = image::RgbImage::new(original.width() * 2, original.height());
            image::imageops::replace(&mut picture, &original, 0, 0);
            image::imageops::replace(&mut picture, &map, original.width() as i64, 0);
            let scene = match scored.scene {
                Scene::AsBuilt => "",
                Scene::BrighterLight => "brighter-",
            };
            let name = format!(
                "{:.3}-{scene}{}-v{}-{}.png",
                scored.score,
                scored.split,
                scored.model_version,
                key.rsplit('-').next().unwrap_or("frame")
            );
            if let Err(err) = picture.save(folder.join(&name)) {
                log::warn!("cannot write {name}: {err}");
            }
        }
    }

    pub fn summary(&self, sent: u64, elapsed: Duration, retraining: RetrainingSummary) -> Summary {
        let window = match (self.first_result, self.last_result) {
            (Some(first), Some(last)) if last > first => (last - first).as_secs_f64(),
            _ => elapsed.as_secs_f64(),
        };
        Summary {
            threshold: self.threshold,
            sent,
            scored: self.results.len(),
            dead_letters: self.dead_letters.clone(),
            rows: self.rows(),
            throughput_frames_per_s: self.results.values().filter(|r| r.scene == Scene::AsBuilt).count() as f64
                / window.max(1e-3),
            latency_p50_ms: percentile(&self.latencies_ms, 0.5),
            latency_p99_ms: percentile(&self.latencies_ms, 0.99),
            in_pipeline_p50_ms: percentile(&self.in_pipeline_ms, 0.5),
            in_pipeline_p99_ms: percentile(&self.in_pipeline_ms, 0.99),
            retraining,
        }
    }
}

pub fn fmt_ms(value: Option<f64>) -> String {
    value.map_or("-".into(), |v| format!("{v:.0} ms"))
}

/// Nearest-rank percentile.
fn percentile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}
