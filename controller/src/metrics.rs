//! Prometheus metrics (text format): per-volume NBD counters read from each
//! export's `ExportStats` at scrape time, and CSI RPC counts and latencies.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nbd::server::{Export, ExportStats};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The exports being served, by volume id; the driver keeps it current.
#[derive(Debug, Default, Clone)]
pub struct ExportTable(Arc<Mutex<BTreeMap<String, Arc<Export>>>>);

impl ExportTable {
    pub fn insert(&self, id: &str, export: Arc<Export>) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).insert(id.to_string(), export);
    }

    pub fn remove(&self, id: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }

    fn snapshot(&self) -> Vec<(String, Arc<Export>)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, v)| (k.clone(), Arc::clone(v))).collect()
    }
}

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

/// Longest request head we read before answering.
const MAX_REQUEST: usize = 8 << 10;

/// Answers every HTTP GET on `listener` with the metrics, until dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let mut head = Vec::with_capacity(1024);
            let mut buf = [0u8; 1024];
            let read = async {
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
                    let n = stream.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                Ok::<_, std::io::Error>(())
            };
            if tokio::time::timeout(Duration::from_secs(10), read).await.is_err() {
                return;
            }
            let (status, body) = if head.starts_with(b"GET ") {
                ("200 OK", metrics.render())
            } else {
                ("405 Method Not Allowed", String::new())
            };
            let reply = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(reply.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// Binds the metrics listener and serves it in the background.
pub async fn spawn(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(serve(listener, metrics));
    Ok(local)
}
