//! What operations teams see, checked against the real tools: the alert rules by `promtool` (syntax and
//! unit tests of every alert), and every dashboard query and alert rule by a real Prometheus server that
//! scrapes a real `lineguard run` fed with good, anomalous and broken frames, retraining on.
//! Prometheus and promtool come from Debian's package (scripts/setup.sh puts them in .tools/bin).

mod common;

use std::collections::{BTreeSet, HashSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::kafka::{free_port, metric, wait_for, Harness};
use common::path_str;
use serde_json::Value;

const DASHBOARD: &str = "grafana/lineguard-dashboard.json";
const ALERTS: &str = "grafana/lineguard-alerts.yml";
const ALERT_TESTS: &str = "grafana/lineguard-alerts.test.yml";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Prometheus or promtool, from `.tools/bin` (scripts/setup.sh monitoring) or PATH.
fn tool(name: &str) -> Option<PathBuf> {
    common::setup_tool(&format!("bin/{name}"), Some(name), "monitoring")
}

#[test]
fn the_alert_rules_pass_promtool_s_checks_and_unit_tests() {
    let Some(promtool) = tool("promtool") else { return };
    for args in [["check", "rules", ALERTS], ["test", "rules", ALERT_TESTS]] {
        let output = Command::new(&promtool).args(args).current_dir(repo("")).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(output.status.success() && text.contains("SUCCESS"), "promtool {args:?}:\n{text}");
    }
    // Every alert has a unit test.
    let rules = std::fs::read_to_string(repo(ALERTS)).unwrap();
    let tests = std::fs::read_to_string(repo(ALERT_TESTS)).unwrap();
    for alert in rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")) {
        assert!(tests.contains(&format!("alertname: {alert}")), "{alert} has no promtool test");
    }
}

fn dashboard() -> Value {
    serde_json::from_str(&std::fs::read_to_string(repo(DASHBOARD)).unwrap()).unwrap()
}

fn panels(dashboard: &Value) -> Vec<&Value> {
    dashboard["panels"].as_array().unwrap().iter().filter(|p| p["type"] != "row").collect()
}

#[test]
fn the_dashboard_has_what_grafana_needs_on_import() {
    let dashboard = dashboard();
    let variables: Vec<&Value> = dashboard["templating"]["list"].as_array().unwrap().iter().collect();
    let variable = |name: &str| variables.iter().find(|v| v["name"] == name).copied();
    let datasource = variable("datasource").expect("a datasource variable");
    assert_eq!(datasource["type"], "datasource");
    assert_eq!(datasource["query"], "prometheus");
    let line = variable("line").expect("a line variable");
    assert_eq!(line["datasource"]["uid"], "${datasource}");
    assert!(line["includeAll"].as_bool().unwrap() && line["multi"].as_bool().unwrap());
    assert!(dashboard["uid"].as_str().is_some_and(|u| !u.is_empty() && u.len() <= 40));

    let all: Vec<&Value> = dashboard["panels"].as_array().unwrap().iter().collect();
    let ids: Vec<i64> = all.iter().map(|p| p["id"].as_i64().expect("every panel has an id")).collect();
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), ids.len(), "panel ids are unique: {ids:?}");
    for panel in panels(&dashboard) {
        let title = panel["title"].as_str().unwrap_or("?");
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        assert!(panel["gridPos"]["w"].as_i64().is_some_and(|w| w > 0 && w <= 24), "{title}");
        let targets = panel["targets"].as_array().filter(|t| !t.is_empty()).expect(title);
        for target in targets {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{title}");
            assert!(target["expr"].as_str().is_some_and(|e| e.contains("line=~\"$line\"")), "{title}: {target}");
        }
        if matches!(panel["type"].as_str(), Some("timeseries" | "stat")) {
            let unit = panel["fieldConfig"]["defaults"]["unit"].as_str();
            assert!(unit.is_some_and(|u| !u.is_empty()), "{title} has a unit");
        }
    }
}

/// A Prometheus server on a loopback port, scraping `targets` every second and evaluating the alert
/// rules every second; killed when dropped.
struct Prometheus {
    child: Child,
    port: u16,
}

impl Prometheus {
    fn start(binary: &Path, dir: &Path, target: &str) -> Prometheus {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: lineguard\n    static_configs:\n      - targets: [\"{target}\"]\n",
                path_str(&repo(ALERTS))
            ),
        )
        .unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new(binary)
            .arg(format!("--config.file={}", path_str(&config)))
            .arg(format!("--storage.tsdb.path={}", path_str(&dir.join("tsdb"))))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let prometheus = Prometheus { child, port };
        let started = Instant::now();
        while prometheus.get("/-/ready").is_none_or(|r| !r.starts_with("HTTP/1.0 200")) {
            assert!(started.elapsed() < Duration::from_secs(60), "Prometheus is not ready");
            std::thread::sleep(Duration::from_millis(200));
        }
        prometheus
    }

    /// HTTP/1.0, so that the answer comes whole (no chunks) and the connection closes.
    fn get(&self, path: &str) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
        stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        Some(response)
    }

    /// The JSON of an API call (`status`, `data`, `error`).
    fn api(&self, path: &str) -> Value {
        let response = self.get(path).unwrap_or_else(|| panic!("no answer to {path}"));
        let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{path}: {e}\n{response}"))
    }

    fn query(&self, expr: &str) -> Value {
        self.api(&format!("/api/v1/query?query={}", url_encode(expr)))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A panel query as Grafana sends it: every line selected, 1 s scrapes, a 5-minute dashboard range.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "10s")
        .replace("$__interval", "2s")
        .replace("$__range", "5m")
        .replace("$line", ".*")
}

/// Names of the lineguard metrics an expression reads (histogram series by their base name).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(start) = rest.find("lineguard_") {
        let preceded = rest[..start].chars().last().is_some_and(|c| c.is_ascii_alphanumeric() || c == ':' || c == '_');
        let tail = &rest[start..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        if !preceded {
            names.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    names
}

/// The dashboard and the alerts against live data: two lines in one `lineguard run` (one that flags
/// every frame, one that accepts every frame and retrains), good, anomalous and undecodable frames.
/// Every panel query must be answered without error and with at least one series, and every alert
/// and recording rule must be evaluated by Prometheus without error on metrics the run exports.
#[test]
fn every_panel_query_and_alert_rule_is_answered_by_a_live_prometheus_scraping_a_live_line() {
    let Some(prometheus_binary) = tool("prometheus") else { return };
    let harness = Harness::new("monitoring");
    let dir = harness.dir.path().to_path_buf();
    let data = dir.join("data");
    common::synth_small(&data, 6, 3, 6);
    let model = dir.join("model.safetensors");
    common::train_tiny(&data, &model);
    let topic = |line: &str, kind: &str| format!("monitoring.{line}.{kind}");
    let mut names = Vec::new();
    for line in ["watch", "learn"] {
        for kind in ["frames", "results", "maps", "dead-letter"] {
            names.push(topic(line, kind));
        }
    }
    names.extend(["monitoring.accepted".to_string(), "monitoring.models".to_string()]);
    harness.create_topics(&names.iter().map(String::as_str).collect::<Vec<_>>(), 1);

    let port = free_port();
    let line_table = |line: &str, threshold: &str| {
        format!(
            "[lines.{line}]\nmodel = \"{}\"\ninput_topics = [\"{}\"]\nresults_topic = \"{}\"\nmaps_topic = \"{}\"\n\
             dead_letter_topic = \"{}\"\nthreshold = {threshold}\ndevice = \"cpu\"\nmax_batch = 4\n",
            path_str(&model),
            topic(line, "frames"),
            topic(line, "results"),
            topic(line, "maps"),
            topic(line, "dead-letter"),
        )
    };
    let pipeline = dir.join("monitoring.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[kafka]\nbrokers = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n{}{}\
             [lines.learn.retrain]\naccept_below = 999\naccepted_topic = \"monitoring.accepted\"\n\
             models_topic = \"monitoring.models\"\nstate_dir = \"{}\"\noriginals = \"{}\"\npinned_originals = 4\n\
             holdout_every = 2\nmin_frames = 2\nsteps_per_minute = 6000\nevaluate_every = 3\n\
             accept_per_minute = 60000\n",
            harness.brokers(),
            // One line flags every frame, the other accepts every frame for retraining.
            line_table("watch", "0.000001"),
            line_table("learn", "1000"),
            path_str(&dir.join("state")),
            path_str(&data.join("train/good")),
        ),
    )
    .unwrap();
    let prometheus = Prometheus::start(&prometheus_binary, &dir, &format!("127.0.0.1:{port}"));
    let service = harness.run(&pipeline);

    let mut frames: Vec<PathBuf> = Vec::new();
    for split in ["good", "logical_anomalies", "structural_anomalies"] {
        frames.extend(lineguard::data::loco::list_images(&data.join("test").join(split)).unwrap());
    }
    let broken = dir.join("broken.png");
    std::fs::write(&broken, b"not an image").unwrap();
    frames.push(broken);
    for line in ["watch", "learn"] {
        harness.produce(&topic(line, "frames"), &frames, line);
    }
    let value = |sample: &str| metric(port, sample).unwrap_or(0.0);
    wait_for("every frame scored or dead-lettered", Duration::from_secs(180), &[&service], || {
        ["watch", "learn"].iter().all(|line| {
            let scored = value(&format!("lineguard_frames_scored_total{{line=\"{line}\",verdict=\"anomalous\"}}"))
                + value(&format!("lineguard_frames_scored_total{{line=\"{line}\",verdict=\"normal\"}}"));
            let failed = value(&format!("lineguard_frames_failed_total{{line=\"{line}\",reason=\"decode\"}}"));
            scored + failed >= frames.len() as f64
        })
    });
    wait_for("retraining steps and a gate", Duration::from_secs(180), &[&service], || {
        value("lineguard_retrain_steps_total{line=\"learn\"}") >= 3.0
    });
    // Consumer lag comes with librdkafka's statistics (every 5 s); rates need a few scrapes.
    wait_for("Prometheus to hold consumer lag", Duration::from_secs(60), &[&service], || {
        prometheus.query("lineguard_consumer_lag")["data"]["result"].as_array().is_some_and(|r| !r.is_empty())
    });
    std::thread::sleep(Duration::from_secs(5));

    // The line variable's query (Grafana's label_values) lists both lines.
    let lines = prometheus.api("/api/v1/label/line/values?match[]=lineguard_frames_received_total");
    let lines: BTreeSet<&str> = lines["data"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert_eq!(lines, BTreeSet::from(["learn", "watch"]));

    let dashboard = dashboard();
    let mut answered = 0;
    for panel in panels(&dashboard) {
        for target in panel["targets"].as_array().unwrap() {
            let expr = substitute(target["expr"].as_str().unwrap());
            let answer = prometheus.query(&expr);
            let title = panel["title"].as_str().unwrap_or("?");
            assert_eq!(answer["status"], "success", "{title}: {expr}\n{answer}");
            let series = answer["data"]["result"].as_array().map_or(0, Vec::len);
            assert!(series > 0, "{title}: no series for {expr}\n{}", service.log());
            answered += 1;
        }
    }

    // The rules as Prometheus loaded and evaluated them.
    let rules = prometheus.api("/api/v1/rules");
    let loaded: Vec<&Value> =
        rules["data"]["groups"].as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap()).collect();
    let exported: HashSet<String> = prometheus.api("/api/v1/label/__name__/values")["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    let in_file = std::fs::read_to_string(repo(ALERTS)).unwrap();
    let expected =
        in_file.lines().filter(|l| l.trim_start().starts_with("- alert:") || l.trim_start().starts_with("- record:"));
    assert_eq!(loaded.len(), expected.count(), "every rule of {ALERTS} is loaded");
    for rule in &loaded {
        let name = rule["name"].as_str().unwrap();
        assert_eq!(rule["health"], "ok", "{name}: {}", rule["lastError"]);
        let query = rule["query"].as_str().unwrap();
        for metric_name in metric_names(query) {
            let base = metric_name.trim_end_matches("_bucket");
            let known = exported.contains(&metric_name) || exported.contains(&format!("{base}_bucket"));
            assert!(known, "{name} reads {metric_name}, which the run does not export");
        }
        assert_eq!(prometheus.query(query)["status"], "success", "{name}");
    }
    let ratio = prometheus.query("line:lineguard_anomaly_ratio:rate15m");
    assert_eq!(ratio["data"]["result"].as_array().map_or(0, Vec::len), 2, "the recording rule, per line: {ratio}");
    eprintln!("{answered} panel queries and {} rules answered by Prometheus on live data", loaded.len());
}
