//! A throwaway local Kafka-compatible broker (`nisshi`, loopback only; in memory unless told otherwise)
//! for the embedded demo and the integration tests. `scripts/setup.sh` installs it into `.tools/`.
//! Production deployments use their own Kafka cluster; nothing else in lineguard depends on this module.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(
        "the nisshi broker was not found (looked at $LINEGUARD_NISSHI, .tools/bin/nisshi and PATH); \
         run scripts/setup.sh, which installs it"
    )]
    NotFound,
    #[error("cannot start {binary}: {source}")]
    Spawn { binary: PathBuf, source: std::io::Error },
    #[error("loopback port: {0}")]
    Port(std::io::Error),
    #[error("the broker did not accept connections on {address} within {waited:?}{log_hint}")]
    NotReady { address: SocketAddr, waited: Duration, log_hint: String },
    #[error("the broker exited before accepting connections on {address}{log_hint}")]
    Exited { address: SocketAddr, log_hint: String },
}

/// How to start a [`LocalBroker`]; `Default` is a free port, the `nisshi` that [`find_nisshi`] finds, no
/// log, in memory.
#[derive(Clone, Debug, Default)]
pub struct BrokerOptions {
    pub port: Option<u16>,
    pub binary: Option<PathBuf>,
    pub log: Option<PathBuf>,
    /// nisshi's `--storage-engine` (`memory://nisshi/` when `None`). A store outside the process, e.g.
    /// `s3://bucket/` with `AWS_ENDPOINT` and credentials in `env`, keeps topics, committed offsets and
    /// producer state across a restart, as a Kafka broker's disks do.
    pub storage: Option<String>,
    /// Extra environment for the broker process.
    pub env: Vec<(String, String)>,
}

/// A running broker process, killed when dropped.
pub struct LocalBroker {
    child: Child,
    address: SocketAddr,
}

/// Where `nisshi` is: `$LINEGUARD_NISSHI`, `.tools/bin/nisshi` under the current folder or the
/// repository that holds this executable, then `PATH`.
pub fn find_nisshi() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("LINEGUARD_NISSHI") {
        return Some(PathBuf::from(path));
    }
    let mut candidates = vec![PathBuf::from(".tools/bin/nisshi")];
    if let Ok(exe) = std::env::current_exe() {
        // target/{debug,release}[/deps]/lineguard → the repository root is two or three levels up.
        for up in exe.ancestors().skip(2).take(3) {
            candidates.push(up.join(".tools/bin/nisshi"));
        }
    }
    if let Some(found) = candidates.into_iter().find(|p| p.is_file()) {
        return Some(found);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join("nisshi")).find(|p| p.is_file())
}

impl LocalBroker {
    /// Starts `binary` (or the one [`find_nisshi`] finds) on a free loopback port, in memory, and waits
    /// until it accepts connections. Its output goes to `log` when given.
    pub fn start(binary: Option<&Path>, log: Option<&Path>) -> Result<LocalBroker, BrokerError> {
        Self::start_on(None, binary, log)
    }

    /// [`LocalBroker::start`] on a given loopback port (`lineguard broker`), or a free one.
    pub fn start_on(port: Option<u16>, binary: Option<&Path>, log: Option<&Path>) -> Result<LocalBroker, BrokerError> {
        let options = BrokerOptions {
            port,
            binary: binary.map(Path::to_path_buf),
            log: log.map(Path::to_path_buf),
            ..BrokerOptions::default()
        };
        Self::start_with(&options)
    }

    /// Starts a broker as `options` say and waits until it accepts connections.
    pub fn start_with(options: &BrokerOptions) -> Result<LocalBroker, BrokerError> {
        let binary = options.binary.clone().or_else(find_nisshi).ok_or(BrokerError::NotFound)?;
        if let Some(port) = options.port {
            return Self::spawn(port, &binary, options);
        }
        // A port found free can be taken before the broker binds it (tests start brokers in parallel, and
        // outgoing connections draw from the same range): try a few fresh ones before giving up.
        let mut attempt = 0;
        loop {
            let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(BrokerError::Port)?.port();
            match Self::spawn(port, &binary, options) {
                Err(BrokerError::Port(_) | BrokerError::Exited { .. }) if attempt < 4 => attempt += 1,
                started => return started,
            }
        }
    }

    fn spawn(port: u16, binary: &Path, options: &BrokerOptions) -> Result<LocalBroker, BrokerError> {
        let log = options.log.as_deref();
        if TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_millis(200)).is_ok() {
            return Err(BrokerError::Port(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("127.0.0.1:{port} is already in use (another broker?)"),
            )));
        }
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        let url = format!("tcp://{address}");
        let output = || -> Stdio {
            log.and_then(|path| std::fs::OpenOptions::new().create(true).append(true).open(path).ok())
                .map_or_else(Stdio::null, Stdio::from)
        };
        let child = Command::new(binary)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", options.storage.as_deref().unwrap_or("memory://nisshi/")])
            // Without it every new consumer group waits 3 s for more members.
            .args(["--group-initial-rebalance-delay", "0ms"])
            // nisshi logs every request at info: inheriting a user's RUST_LOG=info costs it more than a
            // core formatting log lines.
            .env("RUST_LOG", "warn")
            .envs(options.env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .stdout(output())
            .stderr(output())
            .spawn()
            .map_err(|source| BrokerError::Spawn { binary: binary.to_path_buf(), source })?;
        let mut broker = LocalBroker { child, address };
        let started = Instant::now();
        let limit = Duration::from_secs(20);
        while TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_err() {
            let exited = matches!(broker.child.try_wait(), Ok(Some(_)));
            if exited || started.elapsed() > limit {
                let log_hint = log.map(|p| format!(" (see {})", p.display())).unwrap_or_default();
                broker.stop();
                return Err(if exited {
                    BrokerError::Exited { address, log_hint }
                } else {
                    BrokerError::NotReady { address, waited: started.elapsed(), log_hint }
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(broker)
    }

    /// `host:port`, for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        self.address.to_string()
    }

    pub fn port(&self) -> u16 {
        self.address.port()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LocalBroker {
    fn drop(&mut self) {
        self.stop();
    }
}
