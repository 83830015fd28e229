//! A local S3-compatible object store (moto's server, installed by `scripts/setup.sh s3`) for a broker
//! whose storage must outlive it: nisshi's `s3://` engine keeps topics, committed offsets and producer
//! state there, so a broker killed and started again finds them, as a Kafka broker finds its disks.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lineguard::service::broker::BrokerOptions;

use super::kafka::{free_port, http_request};
use super::setup_tool;

/// A running moto server on a loopback port, killed when dropped. Its data lives in its memory: it
/// survives the broker, not itself.
pub struct LocalS3 {
    child: Child,
    port: u16,
    /// Holds the server's log.
    pub dir: tempfile::TempDir,
}

impl LocalS3 {
    /// Starts the server and creates `bucket`; `None` (with a note, or a failure in CI) when setup did not
    /// install it.
    pub fn start(bucket: &str) -> Option<LocalS3> {
        let server = setup_tool("s3-venv/bin/moto_server", None, "s3")?;
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("s3.log");
        // A port found free can be taken before the server binds it (tests run in parallel): a server that
        // exits before listening is tried again on a fresh port.
        for _attempt in 0..4 {
            let port = free_port();
            let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).unwrap();
            let mut child = Command::new(&server)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", server.display()));
            let started = Instant::now();
            // Python's start-up and moto's imports take a few seconds on 2 cores.
            while TcpStream::connect(("127.0.0.1", port)).is_err() && child.try_wait().unwrap().is_none() {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                assert!(started.elapsed() < Duration::from_secs(60), "moto did not listen on {port}:\n{log}");
                std::thread::sleep(Duration::from_millis(100));
            }
            if child.try_wait().unwrap().is_some() {
                continue;
            }
            let s3 = LocalS3 { child, port, dir };
            let response = http_request(port, "PUT", &format!("/{bucket}")).unwrap_or_default();
            assert!(response.starts_with("HTTP/1.1 200"), "creating bucket {bucket}: {response}\n{}", s3.log());
            return Some(s3);
        }
        panic!("moto exited before listening, 4 times:\n{}", std::fs::read_to_string(&log_path).unwrap_or_default());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("s3.log")).unwrap_or_default()
    }

    /// Options for a broker that keeps everything in `bucket` (moto takes any credentials).
    pub fn broker_options(&self, bucket: &str) -> BrokerOptions {
        let env = [
            ("AWS_ENDPOINT", format!("http://127.0.0.1:{}", self.port)),
            ("AWS_ALLOW_HTTP", "true".to_string()),
            ("AWS_ACCESS_KEY_ID", "lineguard".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "lineguard".to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
        ];
        BrokerOptions {
            storage: Some(format!("s3://{bucket}/")),
            env: env.into_iter().map(|(key, value)| (key.to_string(), value)).collect(),
            ..BrokerOptions::default()
        }
    }
}

impl Drop for LocalS3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
