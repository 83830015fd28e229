//! A real Kafka-protocol broker for integration tests: each test starts its own `nisshi` (in memory unless
//! it asks for storage that outlives it: `super::s3`) on a free loopback port (killed when the test ends),
//! runs the real `lineguard run` binary against it and reads output topics with a real consumer.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lineguard::service::broker::{BrokerOptions, LocalBroker};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::ClientConfig;

use super::{lineguard_ok, path_str};

pub fn nisshi() -> PathBuf {
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/nisshi");
    if local.is_file() {
        return local;
    }
    lineguard::service::broker::find_nisshi()
        .expect("nisshi is missing: run scripts/setup.sh (it installs it into .tools/)")
}

/// One broker, a scratch folder and unique topic names for one test.
pub struct Harness {
    pub broker: LocalBroker,
    /// How the broker was started, for [`Harness::restart_broker`].
    broker_options: BrokerOptions,
    pub dir: tempfile::TempDir,
    pub name: String,
}

impl Harness {
    /// An in-memory broker.
    pub fn new(name: &str) -> Harness {
        Self::with_broker(name, BrokerOptions::default())
    }

    /// A broker started with `options` (its storage, say), from `.tools/`, logging into the scratch folder.
    pub fn with_broker(name: &str, mut options: BrokerOptions) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        options.binary = Some(nisshi());
        options.log = Some(dir.path().join("broker.log"));
        let broker = LocalBroker::start_with(&options).expect("nisshi starts");
        options.port = Some(broker.port());
        Harness { broker, broker_options: options, dir, name: name.to_string() }
    }

    /// SIGKILLs the broker and, after `pause`, starts it again on the same port and storage (an in-memory
    /// one comes back empty), logging into `<log_name>` in the scratch folder.
    pub fn restart_broker(&mut self, pause: Duration, log_name: &str) {
        self.broker.stop();
        std::thread::sleep(pause);
        let options = BrokerOptions { log: Some(self.dir.path().join(log_name)), ..self.broker_options.clone() };
        self.broker = LocalBroker::start_with(&options).expect("the broker restarts on its port");
    }

    pub fn brokers(&self) -> String {
        self.broker.bootstrap()
    }

    pub fn kafka(&self) -> lineguard::service::settings::KafkaSettings {
        lineguard::service::settings::KafkaSettings::for_brokers(&self.brokers(), "test")
    }

    pub fn create_topics(&self, names: &[&str], partitions: i32) {
        runtime().block_on(lineguard::service::kafka::ensure_topics(&self.kafka(), names, partitions)).unwrap();
    }

    /// Starts `lineguard run`; its log goes to <file>.log in the scratch folder.
    pub fn run(&self, pipeline: &Path) -> Service {
        self.run_with(pipeline, "log", &[], &[])
    }

    /// `lineguard run` with extra arguments and environment; its log goes to <file>.<log_suffix>.
    pub fn run_with(&self, pipeline: &Path, log_suffix: &str, args: &[&str], env: &[(&str, &str)]) -> Service {
        let log = pipeline.with_extension(log_suffix);
        let stderr = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_lineguard"))
            .args(["run", "--pipeline", path_str(pipeline)])
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info,librdkafka=warn")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        Service { child: Some(child), log }
    }

    /// Sends the frames with the real `produce` command.
    pub fn produce(&self, topic: &str, frames: &[PathBuf], key_prefix: &str) {
        let mut args = vec!["produce", "--brokers", "", "--topic", topic, "--rate", "0", "--key-prefix", key_prefix];
        let brokers = self.brokers();
        args[2] = &brokers;
        args.extend(frames.iter().map(|p| path_str(p)));
        lineguard_ok(&args);
    }

    /// Sends records as a camera might, hostile ones included, and waits until the broker has them.
    pub fn produce_records(&self, topic: &str, records: &[RawRecord]) {
        use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
        let producer: ThreadedProducer<DefaultProducerContext> =
            ClientConfig::new().set("bootstrap.servers", self.brokers()).create().unwrap();
        for (key, payload, headers) in records {
            let headers = lineguard::service::kafka::to_owned_headers(headers.iter().copied());
            let record = BaseRecord::<str, [u8]>::to(topic).key(*key).payload(*payload).headers(headers);
            producer.send(record).map_err(|(e, _)| e).unwrap();
        }
        producer.flush(Duration::from_secs(10)).unwrap();
    }
}

/// A record as `Harness::produce_records` sends it: key, value, headers.
pub type RawRecord<'a> = (&'a str, &'a [u8], Vec<(&'a str, &'a [u8])>);

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

pub struct Service {
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Service {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to end by itself (within `limit`).
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("running");
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            if started.elapsed() > limit {
                panic!("lineguard did not exit within {limit:?}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The exit status if the process has ended by itself, without waiting.
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut().expect("running").try_wait().unwrap()?;
        self.child = None;
        Some(status)
    }

    /// SIGKILL: no drain, no last commit (a crash).
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM, then the exit status (within `limit`).
    pub fn terminate(&mut self, limit: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                panic!("lineguard did not stop within {limit:?} after SIGTERM; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn http_get(port: u16, path: &str) -> Option<String> {
    http_request(port, "GET", path)
}

/// One bodiless HTTP/1.1 request to a loopback port; the whole response, or `None` if it did not come
/// within 5 s.
pub fn http_request(port: u16, method: &str, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let request =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

/// The value of an unlabelled-or-labelled sample line of the metrics page, e.g.
/// `lineguard_partitions_assigned{line="a"}`.
pub fn metric(port: u16, sample: &str) -> Option<f64> {
    let page = http_get(port, "/metrics")?;
    page.lines().find_map(|line| line.strip_prefix(sample).and_then(|rest| rest.trim().parse().ok()))
}

pub fn wait_for(what: &str, limit: Duration, service: &[&Service], mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        if started.elapsed() > limit {
            let logs: Vec<String> = service.iter().map(|s| s.log()).collect();
            panic!("timed out waiting for {what}; service logs:\n{}", logs.join("\n-----\n"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub struct Record {
    pub key: String,
    pub payload: Vec<u8>,
    pub headers: HashMap<String, Vec<u8>>,
}

/// Reads `topic` from the beginning until `expected` records arrived, then a little longer (so that
/// duplicates would be seen too), or until `limit`.
pub fn read_topic(brokers: &str, topic: &str, expected: usize, limit: Duration) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{}", rand::random::<u64>()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut records = Vec::new();
    let started = Instant::now();
    let mut complete_at: Option<Instant> = None;
    while started.elapsed() < limit && complete_at.is_none_or(|at| at.elapsed() < Duration::from_secs(2)) {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) {
            records.push(Record {
                key: message.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default(),
                payload: message.payload().unwrap_or_default().to_vec(),
                headers: message
                    .headers()
                    .map(|h| h.iter().map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec())).collect())
                    .unwrap_or_default(),
            });
        }
        if records.len() >= expected && complete_at.is_none() {
            complete_at = Some(Instant::now());
        }
    }
    records
}

pub fn count_by_key(records: &[Record]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for record in records {
        *counts.entry(record.key.clone()).or_insert(0) += 1;
    }
    counts
}

pub fn keys_with_prefix(counts: &HashMap<String, usize>, prefix: &str) -> usize {
    counts.keys().filter(|k| k.starts_with(prefix)).count()
}
