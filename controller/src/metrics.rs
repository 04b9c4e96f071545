//! Prometheus metrics (text format): per-volume NBD counters read from each
//! export's `ExportStats` at scrape time (through the agent's
//! [`ExportTable`]), CSI RPC counts and latencies, and where an agent keeps
//! volumes (the embedded controller, `nbd-csi-controller agent`) the
//! store's usage: each volume's allocated bytes beside its capacity and the
//! data directory's free and total bytes, so that over-commit shows before
//! ENOSPC. Those are file metadata and statvfs reads, so a scrape renders
//! on the blocking pool.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use agent::{Agent, ExportTable};
use nbd::server::ExportStats;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

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

/// The store's usage, read from the agent at scrape time. Weak: the
/// metrics do not keep an agent alive that was shut down.
#[derive(Debug)]
struct StoreCollector(Weak<Agent>);

impl Collector for StoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        let Some(agent) = self.0.upgrade() else { return Ok(()) };
        let usage = match agent.usage() {
            Ok(usage) => usage,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: reading the store's usage failed");
                return Ok(());
            }
        };
        let mut metric = encoder.encode_descriptor(
            "nbd_csi_volume_allocated_bytes",
            "Bytes the volume's sparse image takes on the store's filesystem (thin usage)",
            None,
            MetricType::Gauge,
        )?;
        for v in &usage.volumes {
            let labels = [("volume_id", v.id.as_str())];
            ConstGauge::new(v.allocated_bytes as i64).encode(metric.encode_family(&labels)?)?;
        }
        let mut metric = encoder.encode_descriptor(
            "nbd_csi_volume_capacity_bytes",
            "The volume's size as provisioned",
            None,
            MetricType::Gauge,
        )?;
        for v in &usage.volumes {
            let labels = [("volume_id", v.id.as_str())];
            ConstGauge::new(v.capacity_bytes as i64).encode(metric.encode_family(&labels)?)?;
        }
        let data_dir = usage.data_dir.to_string_lossy();
        let labels = [("data_dir", data_dir.as_ref())];
        let provisioned: u64 = usage.volumes.iter().map(|v| v.capacity_bytes).sum();
        for (name, help, value) in [
            (
                "nbd_csi_store_free_bytes",
                "Bytes free for the store on its data directory's filesystem",
                usage.space.available,
            ),
            ("nbd_csi_store_size_bytes", "Size of the store's data directory's filesystem", usage.space.total),
            (
                "nbd_csi_store_provisioned_bytes",
                "Sum of the store's volume capacities (over-committed above size)",
                provisioned,
            ),
        ] {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value as i64).encode(metric.encode_family(&labels)?)?;
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
    /// The metrics of a controller that keeps no volumes (cluster mode):
    /// RPCs, and the volumes of `exports` (none there).
    pub fn new(exports: ExportTable) -> Self {
        let mut registry = Registry::default();
        let rpcs = Family::<RpcLabels, Counter>::default();
        let latency = Family::<RpcLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        registry.register("nbd_csi_rpc_requests", "CSI RPCs handled, by method and gRPC code", rpcs.clone());
        registry.register("nbd_csi_rpc_duration_seconds", "CSI RPC latency, by method and gRPC code", latency.clone());
        registry.register_collector(Box::new(VolumeCollector(exports)));
        Self { registry, rpcs, latency }
    }

    /// The metrics of a process that keeps volumes: its agent's exports
    /// and its store's usage, besides the RPCs.
    pub fn for_agent(agent: &Arc<Agent>) -> Self {
        let mut metrics = Self::new(agent.exports().clone());
        metrics.registry.register_collector(Box::new(StoreCollector(Arc::downgrade(agent))));
        metrics
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

/// Binds the metrics listener and serves it in the background
/// ([`csi_proto::metrics_endpoint`]).
pub async fn spawn(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<SocketAddr> {
    csi_proto::metrics_endpoint::spawn(addr, Arc::new(move || metrics.render())).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rpc_counters_are_rendered() {
        let metrics = Metrics::new(ExportTable::default());
        metrics.observe("Probe", tonic::Code::Ok, Duration::from_millis(2));
        let text = metrics.render();
        assert!(text.contains("nbd_csi_rpc_requests_total{method=\"Probe\",code=\"Ok\"} 1"), "{text}");
    }

    /// The store's usage as an agent process serves it: the written
    /// volume's allocated bytes, the empty one's near zero, the free bytes
    /// of a 64 MiB tmpfs as statvfs says.
    #[tokio::test]
    async fn an_agents_metrics_show_each_volumes_allocation_and_the_free_space() {
        use agent::testing::{Client, Tmpfs};
        let fs = Tmpfs::mount(64 << 20);
        let config = agent::Config {
            listen: "127.0.0.1".parse().unwrap(),
            ports: 27940..=27949,
            connection_caps: agent::ConnectionCaps::default(),
            tls_dir: None,
        };
        let agent = agent::Agent::open(config, fs.path(), Arc::new(agent::LogsOnly)).await.unwrap();
        let new = |name: &str| agent::NewVolume {
            id: None,
            name: name.into(),
            capacity_bytes: 32 << 20,
            block: true,
            access_modes: vec![1],
            fs_type: String::new(),
            parameters: Default::default(),
            source: None,
            read_only: false,
            export_name: None,
            tls: Default::default(),
        };
        let written = agent.create_volume(new("written")).await.unwrap();
        let empty = agent.create_volume(new("empty")).await.unwrap();
        let publication = agent::Publication { read_only: false, access_mode: 1, addresses: None };
        let published = [("node-a".to_string(), publication)].into();
        let port = agent.set_access(&written.id, published, Duration::from_secs(5)).await.unwrap().port.unwrap();
        let mut client = Client::connect(&format!("127.0.0.1:{port}"), &written.export_name).await.unwrap();
        assert_eq!(client.write(0, &[7; 1 << 20]).await.unwrap(), 0);
        assert_eq!(client.flush().await.unwrap(), 0);

        let reply = Metrics::for_agent(&agent).render();
        let value = |name: &str, labels: &str| -> u64 {
            let prefix = format!("{name}{{{labels}}} ");
            let line = reply.lines().find_map(|l| l.strip_prefix(&prefix));
            line.unwrap_or_else(|| panic!("no {prefix} in {reply}")).parse().unwrap()
        };
        let allocated = value("nbd_csi_volume_allocated_bytes", &format!("volume_id=\"{}\"", written.id));
        assert!((1 << 20..4 << 20).contains(&allocated), "1 MiB written, {allocated} allocated");
        assert!(value("nbd_csi_volume_allocated_bytes", &format!("volume_id=\"{}\"", empty.id)) < 1 << 20);
        assert_eq!(value("nbd_csi_volume_capacity_bytes", &format!("volume_id=\"{}\"", empty.id)), 32 << 20);
        let store = format!("data_dir=\"{}\"", fs.path().display());
        let st = nix::sys::statvfs::statvfs(fs.path()).unwrap();
        let free = st.blocks_available() as u64 * st.fragment_size() as u64;
        assert_eq!(value("nbd_csi_store_free_bytes", &store), free, "nothing written meanwhile");
        assert_eq!(value("nbd_csi_store_size_bytes", &store), 64 << 20);
        assert_eq!(value("nbd_csi_store_provisioned_bytes", &store), 64 << 20, "two volumes of 32 MiB");
        drop(client);
        agent.shutdown().await;
    }
}
