//! Prometheus metrics of the node plugin (text format, `GET /metrics` on
//! `--metrics-address`): per staged volume its connections, health,
//! reconnects and the kernel's I/O counters ([`volumes`]), and a few
//! figures of the process ([`process`]). Everything is read when scraped,
//! on tokio's blocking pool: sysfs, /proc and the state directory are
//! files that a wedged kernel can make slow, and a scrape must never hold a
//! runtime worker that CSI calls need.

mod process;
mod volumes;

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

pub use volumes::VolumeCollector;

/// The Prometheus text exposition format's content type.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    pub fn new(volumes: VolumeCollector) -> Self {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(volumes));
        registry.register_collector(Box::new(process::ProcessCollector::started_now()));
        Self { registry }
    }

    /// The metrics now, in the text format. Reads files: call it off the
    /// async runtime (as [`serve`] does).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// Answers `GET /metrics` on `listener` with the metrics, until dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = Arc::clone(&metrics);
            async move {
                match tokio::task::spawn_blocking(move || metrics.render()).await {
                    Ok(text) => Ok(([(axum::http::header::CONTENT_TYPE, TEXT_FORMAT)], text)),
                    Err(e) => {
                        tracing::error!(error = %e, "rendering the metrics failed");
                        Err(axum::http::StatusCode::INTERNAL_SERVER_ERROR)
                    }
                }
            }
        }),
    );
    axum::serve(listener, app).await
}

/// Binds the metrics listener and serves it in the background.
pub async fn spawn(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = serve(listener, metrics).await {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attach::devices::Sysfs;
    use crate::health::Health;
    use crate::state::StateDir;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn http(addr: SocketAddr, request: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await.unwrap();
        reply
    }

    #[tokio::test]
    async fn scrapes_get_the_text_format_and_nothing_else_is_served() {
        let tmp = tempfile::tempdir().unwrap();
        let states = StateDir::open(tmp.path().join("state")).unwrap();
        let volumes = VolumeCollector::new(states, Sysfs::at(tmp.path().join("sys")), Arc::new(Health::default()), 5);
        let addr = spawn("127.0.0.1:0".parse().unwrap(), Arc::new(Metrics::new(volumes))).await.unwrap();
        let close = "Connection: close\r\n\r\n";
        let reply = http(addr, &format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{close}")).await;
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
        assert!(reply.to_ascii_lowercase().contains(&format!("content-type: {TEXT_FORMAT}")), "{reply}");
        assert!(reply.contains("\nnbd_csi_node_volumes 0\n"), "{reply}");
        assert!(reply.contains("\nnbd_csi_node_max_volumes 5\n"), "{reply}");
        assert!(reply.contains("\nprocess_open_fds "), "{reply}");
        let other = http(addr, &format!("GET /other HTTP/1.1\r\nHost: x\r\n{close}")).await;
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
    }
}
