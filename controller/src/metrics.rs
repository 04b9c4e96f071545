//! Prometheus metrics (text format): per-volume NBD counters read from each
//! export's `ExportStats` at scrape time (through the agent's
//! [`ExportTable`]), and CSI RPC counts and latencies.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use agent::ExportTable;
use nbd::server::ExportStats;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: String,
    code: String,
}

type Stat = fn(&ExportStats) -> u64;

const COUNTERS: [(&str, &str, Stat); 5] = [
    ("nbd_csi_volume_read_bytes", "Bytes read by NBD clients", |s| s.bytes_read.load(Ordering::Relaxed)),
    ("nbd_csi_volume_written_bytes", "Bytes written by NBD clients", |s| s.bytes_written.load(Ordering::Relaxed)),
    ("nbd_csi_volume_read_ops", "NBD READ commands served", |s| s.reads.load(Ordering::Relaxed)),
    ("nbd_csi_volume_write_ops", "NBD WRITE commands served", |s| s.writes.load(Ordering::Relaxed)),
    ("nbd_csi_volume_errors", "NBD commands answered with an error", |s| s.errors.load(Ordering::Relaxed)),
];

const GAUGES: [(&str, &str, Stat); 2] = [
    ("nbd_csi_volume_requests_in_flight", "NBD requests received and not yet answered", |s| {
        s.in_flight.load(Ordering::Relaxed)
    }),
    ("nbd_csi_volume_connections", "Open NBD connections", |s| s.connections.load(Ordering::Relaxed)),
];

#[derive(Debug)]
struct VolumeCollector(ExportTable);

impl Collector for VolumeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        let exports = self.0.snapshot();
        for (name, help, stat) in COUNTERS {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (id, export) in &exports {
                let labels = [("volume_id", id.as_str())];
                ConstCounter::new(stat(export.stats())).encode(metric.encode_family(&labels)?)?;
            }
        }
        for (name, help, stat) in GAUGES {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (id, export) in &exports {
                let labels = [("volume_id", id.as_str())];
                ConstGauge::new(stat(export.stats()) as i64).encode(metric.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    rpcs: Family<RpcLabels, Counter>,
    latency: Family<RpcLabels, Histogram, fn() -> Histogram>,
}

impl Metrics {
    pub fn new(exports: ExportTable) -> Self {
        let mut registry = Registry::default();
        let rpcs = Family::<RpcLabels, Counter>::default();
        let latency = Family::<RpcLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        registry.register("nbd_csi_rpc_requests", "CSI RPCs handled, by method and gRPC code", rpcs.clone());
        registry.register("nbd_csi_rpc_duration_seconds", "CSI RPC latency, by method and gRPC code", latency.clone());
        registry.register_collector(Box::new(VolumeCollector(exports)));
        Self { registry, rpcs, latency }
    }

    pub fn observe(&self, method: &str, code: tonic::Code, elapsed: Duration) {
        let labels = RpcLabels { method: method.to_string(), code: format!("{code:?}") };
        self.rpcs.get_or_create(&labels).inc();
        self.latency.get_or_create(&labels).observe(elapsed.as_secs_f64());
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// The Prometheus text exposition format's content type.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Answers `GET /metrics` on `listener` with the metrics, until dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = Arc::clone(&metrics);
            async move { ([(http::header::CONTENT_TYPE, TEXT_FORMAT)], metrics.render()) }
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
        let metrics = Arc::new(Metrics::new(ExportTable::default()));
        metrics.observe("Probe", tonic::Code::Ok, Duration::from_millis(2));
        let addr = spawn("127.0.0.1:0".parse().unwrap(), metrics).await.unwrap();
        let close = "Connection: close\r\n\r\n";
        let reply = http(addr, &format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{close}")).await;
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
        assert!(reply.to_ascii_lowercase().contains(&format!("content-type: {TEXT_FORMAT}")), "{reply}");
        assert!(reply.contains("nbd_csi_rpc_requests_total{method=\"Probe\",code=\"Ok\"} 1"), "{reply}");
        let other = http(addr, &format!("GET /other HTTP/1.1\r\nHost: x\r\n{close}")).await;
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
        let post = http(addr, &format!("POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n{close}")).await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    }
}
