//! The HTTP endpoint: `/metrics`, `/healthz` and `/readyz`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

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

/// Serves `/metrics`, `/healthz` and `/readyz` until the task is dropped. A deliberately small HTTP/1.1
/// responder: these three GETs are all Prometheus and Kubernetes probes send.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, health: Vec<Arc<LineHealth>>) {
    let health = Arc::new(health);
    loop {
        let (mut stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                log::warn!("metrics endpoint: accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let mut request = vec![0u8; 2048];
            let read = match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut request)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let first_line = String::from_utf8_lossy(&request[..read]).lines().next().unwrap_or_default().to_string();
            let path = first_line.split_whitespace().nth(1).unwrap_or("");
            let (status, content_type, body) = match path {
                "/metrics" => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", metrics.render()),
                "/healthz" if health.iter().all(|line| line.alive()) => ("200 OK", "text/plain", "ok\n".to_string()),
                "/healthz" => ("503 Service Unavailable", "text/plain", "a line cannot progress\n".to_string()),
                "/readyz" if health.iter().all(|line| line.ready()) => ("200 OK", "text/plain", "ready\n".to_string()),
                "/readyz" => ("503 Service Unavailable", "text/plain", "not ready\n".to_string()),
                _ => ("404 Not Found", "text/plain", "try /metrics, /healthz or /readyz\n".to_string()),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn endpoint_serves_metrics_and_readiness() {
        let metrics = Metrics::new().unwrap();
        metrics.line("juice").frame_received();
        let health = Arc::new(LineHealth::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, metrics, vec![health.clone()]));
        let get = |path: &'static str| async move {
            let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
            stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).await.unwrap();
            response
        };
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
