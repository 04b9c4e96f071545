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

pub use volumes::VolumeCollector;

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
    /// async runtime (as the endpoint does).
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
    use crate::attach::devices::Sysfs;
    use crate::health::Health;
    use crate::state::StateDir;

    #[test]
    fn an_empty_node_renders_its_limit_and_process_figures() {
        let tmp = tempfile::tempdir().unwrap();
        let states = StateDir::open(tmp.path().join("state")).unwrap();
        let volumes = VolumeCollector::new(states, Sysfs::at(tmp.path().join("sys")), Arc::new(Health::default()), 5);
        let text = Metrics::new(volumes).render();
        assert!(text.contains("\nnbd_csi_node_volumes 0\n"), "{text}");
        assert!(text.contains("\nnbd_csi_node_max_volumes 5\n"), "{text}");
        assert!(text.contains("\nprocess_open_fds "), "{text}");
    }
}
