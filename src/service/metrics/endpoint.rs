//! The HTTP endpoint: `/metrics`, `/healthz` and `/readyz`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::Metrics;

/// Readiness of one line: a model is loaded, the consumer joined its group, and the model's output is
/// not broken (non-finite maps for every frame of the last batch).
#[derive(Debug, Default)]
pub struct LineHealth {
    pub model_loaded: AtomicBool,
    pub joined_group: AtomicBool,
    pub model_output_broken: AtomicBool,
    /// A required output (result, dead letter) was refused permanently: the line cannot progress, and
    /// only an operator (or a restart with fixed settings) can help.
    pub publish_refused: AtomicBool,
    /// The oldest unacknowledged frame is older than `metrics.stalled_after_secs`.
    pub stalled: AtomicBool,
    /// A stage that cannot come back by itself ended (the line's in-process trainer).
    pub stage_dead: AtomicBool,
}

impl LineHealth {
    /// Whether the line can still make progress by itself (`/healthz`); when not, a restart is due.
    pub fn alive(&self) -> bool {
        !self.publish_refused.load(Ordering::Relaxed)
            && !self.stalled.load(Ordering::Relaxed)
            && !self.stage_dead.load(Ordering::Relaxed)
    }

    pub fn ready(&self) -> bool {
        self.model_loaded.load(Ordering::Relaxed)
            && self.joined_group.load(Ordering::Relaxed)
            && !self.model_output_broken.load(Ordering::Relaxed)
    }
}

/// Bounds on the endpoint's clients. Prometheus and the kubelet send a few small GETs; anything else (a
/// port scan, a client that never finishes its request or never reads the answer) must not hold memory or
/// tasks for long.
#[derive(Debug, Clone, Copy)]
pub struct EndpointLimits {
    /// Connections served at once; more wait in the kernel's accept backlog.
    pub max_connections: usize,
    /// Time for a client to send its request headers.
    pub header_timeout: Duration,
    /// Time for a whole connection, the response's writing included.
    pub connection_timeout: Duration,
}

impl Default for EndpointLimits {
    fn default() -> Self {
        EndpointLimits {
            max_connections: 32,
            header_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(30),
        }
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` with the default limits until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, health: Vec<Arc<LineHealth>>) {
    serve_with(listener, metrics, health, EndpointLimits::default()).await
}

/// [`serve`] with explicit limits: routing by axum, HTTP/1.1 by hyper (one request per connection).
pub async fn serve_with(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Vec<Arc<LineHealth>>,
    limits: EndpointLimits,
) {
    let app = router(metrics, Arc::new(health));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        // A slot before accepting: excess connections wait in the backlog, not in our memory.
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                log::warn!("metrics endpoint: accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).keep_alive(false);
            let connection = http.serve_connection(TokioIo::new(stream), service);
            // Errors here are the client's (a reset, a malformed request, a timeout): nothing to report.
            let _ = tokio::time::timeout(limits.connection_timeout, connection).await;
        });
    }
}

fn router(metrics: Arc<Metrics>, health: Arc<Vec<Arc<LineHealth>>>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], metrics.render()) }
            }),
        )
        .route("/healthz", probe(health.clone(), LineHealth::alive, "ok\n", "a line cannot progress\n"))
        .route("/readyz", probe(health, LineHealth::ready, "ready\n", "not ready\n"))
        .fallback(|| async { text(StatusCode::NOT_FOUND, "try /metrics, /healthz or /readyz\n") })
}

/// A probe: 200 with `up` when `check` holds for every line, else 503 with `down`.
fn probe(
    health: Arc<Vec<Arc<LineHealth>>>,
    check: fn(&LineHealth) -> bool,
    up: &'static str,
    down: &'static str,
) -> axum::routing::MethodRouter {
    get(move || {
        let passed = health.iter().all(|line| check(line));
        async move {
            match passed {
                true => text(StatusCode::OK, up),
                false => text(StatusCode::SERVICE_UNAVAILABLE, down),
            }
        }
    })
}

fn text(status: StatusCode, body: &'static str) -> impl axum::response::IntoResponse {
    (status, [(header::CONTENT_TYPE, "text/plain")], body)
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn get_from(address: std::net::SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    /// Before: one task per connection without a cap, and no bound on writing the response.
    #[tokio::test]
    async fn a_client_that_never_sends_its_request_holds_a_slot_only_until_the_header_timeout() {
        let limits = EndpointLimits {
            max_connections: 1,
            header_timeout: Duration::from_secs(2),
            connection_timeout: Duration::from_secs(20),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(serve_with(listener, Metrics::new().unwrap(), vec![], limits));
        let mut idle = tokio::net::TcpStream::connect(address).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let request = tokio::spawn(get_from(address, "/healthz"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!request.is_finished(), "the only slot is held by the idle client");
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(30), idle.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "the server cuts the idle client off");
        assert!(request.await.unwrap().starts_with("HTTP/1.1 200"), "then the waiting request is served");
        server.abort();
    }

    #[tokio::test]
    async fn healthz_fails_when_a_line_cannot_progress() {
        let health = Arc::new(LineHealth::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, Metrics::new().unwrap(), vec![health.clone()]));
        assert!(get_from(address, "/healthz").await.starts_with("HTTP/1.1 200"));
        for flag in [&health.stalled, &health.publish_refused, &health.stage_dead] {
            flag.store(true, Ordering::Relaxed);
            assert!(get_from(address, "/healthz").await.starts_with("HTTP/1.1 503"));
            flag.store(false, Ordering::Relaxed);
        }
        server.abort();
    }

    #[tokio::test]
    async fn endpoint_serves_metrics_and_readiness() {
        let metrics = Metrics::new().unwrap();
        metrics.line("juice").frame_received();
        let health = Arc::new(LineHealth::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, metrics, vec![health.clone()]));
        let get = |path: &'static str| get_from(address, path);
        assert!(get("/metrics").await.contains("lineguard_frames_received_total{line=\"juice\"} 1"));
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/readyz").await.starts_with("HTTP/1.1 503"));
        health.model_loaded.store(true, Ordering::Relaxed);
        health.joined_group.store(true, Ordering::Relaxed);
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
        server.abort();
    }
}
