//! Per staged volume, labelled by `volume_id` and `device` (`nbd3`): the
//! connections its device holds, its health (`ok`, `reconnecting`, `lost`,
//! one gauge per state of which the current one is 1), how often healing
//! reconnected it, and the kernel's I/O counters from
//! `/sys/block/nbdX/stat`. The volumes are those the state directory says
//! are staged, so an unstaged volume disappears from the next scrape.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::attach::devices::Sysfs;
use crate::health::{Health, Link};
use crate::io_stat::IoStat;
use crate::state::{Phase, StateDir, VolumeState};

/// The states of a volume's connection, in the order they are reported.
const HEALTH_STATES: [&str; 3] = ["ok", "reconnecting", "lost"];

#[derive(Debug)]
pub struct VolumeCollector {
    states: StateDir,
    sysfs: Sysfs,
    health: Arc<Health>,
    /// What NodeGetInfo reports, exported beside the count staged.
    max_volumes: usize,
}

/// What one scrape reports of one volume.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    volume_id: String,
    /// `nbd3`, or empty while the volume has no device.
    device: String,
    /// One blk-mq hardware queue per socket the device was given.
    connections: usize,
    health: &'static str,
    reconnects: u64,
    io: Option<IoStat>,
}

impl Sample {
    fn labels(&self) -> [(&str, &str); 2] {
        [("volume_id", self.volume_id.as_str()), ("device", self.device.as_str())]
    }
}

/// The connection's state: what healing reports, else `ok` while the
/// volume has a device (without one, I/O fails until healing attaches it
/// again, which it does at its next check).
fn health_state(link: Option<&Link>, has_device: bool) -> &'static str {
    match link {
        Some(Link::Reconnecting { .. }) => "reconnecting",
        Some(Link::Lost { .. }) => "lost",
        None if has_device => "ok",
        None => "lost",
    }
}

type CountOf = fn(&IoStat) -> Option<u64>;
type MillisOf = fn(&IoStat) -> u64;

/// The kernel's counts, as Prometheus counters: (name, help, value).
const IO_COUNTS: [(&str, &str, CountOf); 5] = [
    ("nbd_csi_node_volume_reads_completed", "Reads the device completed", |s| Some(s.reads_completed)),
    ("nbd_csi_node_volume_writes_completed", "Writes the device completed", |s| Some(s.writes_completed)),
    ("nbd_csi_node_volume_read_bytes", "Bytes the device read", |s| Some(s.read_bytes())),
    ("nbd_csi_node_volume_written_bytes", "Bytes the device wrote", |s| Some(s.written_bytes())),
    ("nbd_csi_node_volume_flushes_completed", "Flushes the device completed (Linux 5.5 and later)", |s| {
        s.flushes_completed
    }),
];

/// The kernel's times (milliseconds), as counters in seconds.
const IO_TIMES: [(&str, &str, MillisOf); 3] = [
    ("nbd_csi_node_volume_read_time_seconds", "Time reads spent in the device, summed over reads", |s| s.read_ms),
    ("nbd_csi_node_volume_write_time_seconds", "Time writes spent in the device, summed over writes", |s| s.write_ms),
    ("nbd_csi_node_volume_io_time_seconds", "Time the device had at least one request in flight", |s| s.io_ms),
];

impl VolumeCollector {
    pub fn new(states: StateDir, sysfs: Sysfs, health: Arc<Health>, max_volumes: usize) -> Self {
        Self { states, sysfs, health, max_volumes }
    }

    /// The device of a staged volume: the one whose backend identifier is
    /// the one its state records (netlink), else the recorded index if that device is
    /// configured and has no backend identifier (the ioctls set none).
    fn device_of(&self, state: &VolumeState, by_backend: &HashMap<String, u32>) -> Option<u32> {
        by_backend.get(state.backend_id()).copied().or_else(|| {
            state
                .index
                .filter(|&i| self.sysfs.backend(i).is_none() && self.sysfs.size_bytes(i).is_some_and(|size| size > 0))
        })
    }

    fn samples(&self) -> Vec<Sample> {
        let states = match self.states.all() {
            Ok(states) => states,
            Err(e) => {
                tracing::warn!(error = %e.chain(), "metrics: reading the state directory failed");
                Vec::new()
            }
        };
        let by_backend: HashMap<String, u32> = self.sysfs.backends().into_iter().map(|(i, b)| (b, i)).collect();
        states
            .into_iter()
            .filter(|s| s.phase == Phase::Staged)
            .map(|state| {
                let index = self.device_of(&state, &by_backend);
                let io = index.and_then(|i| {
                    self.sysfs
                        .io_stat(i)
                        .inspect_err(|e| tracing::debug!(volume = %state.volume_id, error = %e, "no I/O counters"))
                        .ok()
                });
                Sample {
                    device: index.map(|i| format!("nbd{i}")).unwrap_or_default(),
                    connections: index.map_or(0, |i| self.sysfs.hw_queues(i)),
                    health: health_state(self.health.get(&state.volume_id).as_ref(), index.is_some()),
                    reconnects: self.health.reconnects(&state.volume_id),
                    io,
                    volume_id: state.volume_id,
                }
            })
            .collect()
    }
}

impl Collector for VolumeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        let samples = self.samples();
        let metric = encoder.encode_descriptor(
            "nbd_csi_node_volumes",
            "Volumes staged on this node",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(samples.len() as i64).encode(metric)?;
        let metric = encoder.encode_descriptor(
            "nbd_csi_node_max_volumes",
            "Volumes this node stages at most (what NodeGetInfo reports)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::try_from(self.max_volumes).unwrap_or(i64::MAX)).encode(metric)?;

        let mut metric = encoder.encode_descriptor(
            "nbd_csi_node_volume_connections",
            "NBD connections the volume's device holds",
            None,
            MetricType::Gauge,
        )?;
        for s in &samples {
            ConstGauge::new(s.connections as i64).encode(metric.encode_family(&s.labels())?)?;
        }
        let mut metric = encoder.encode_descriptor(
            "nbd_csi_node_volume_health",
            "The volume's connection: 1 for its state (ok, reconnecting, lost), 0 for the others",
            None,
            MetricType::Gauge,
        )?;
        for s in &samples {
            for state in HEALTH_STATES {
                let [volume, device] = s.labels();
                let labels = [volume, device, ("state", state)];
                ConstGauge::new(i64::from(s.health == state)).encode(metric.encode_family(&labels)?)?;
            }
        }
        let mut metric = encoder.encode_descriptor(
            "nbd_csi_node_volume_reconnects",
            "Times healing gave the volume's device fresh sockets or attached it again since the plugin started",
            None,
            MetricType::Counter,
        )?;
        for s in &samples {
            ConstCounter::new(s.reconnects).encode(metric.encode_family(&s.labels())?)?;
        }
        for (name, help, value) in IO_COUNTS {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for s in &samples {
                if let Some(v) = s.io.as_ref().and_then(value) {
                    ConstCounter::new(v).encode(metric.encode_family(&s.labels())?)?;
                }
            }
        }
        for (name, help, millis) in IO_TIMES {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for s in &samples {
                if let Some(io) = &s.io {
                    ConstCounter::new(millis(io) as f64 / 1000.0).encode(metric.encode_family(&s.labels())?)?;
                }
            }
        }
        let mut metric = encoder.encode_descriptor(
            "nbd_csi_node_volume_ios_in_progress",
            "Requests issued to the device and not yet completed",
            None,
            MetricType::Gauge,
        )?;
        for s in &samples {
            if let Some(io) = &s.io {
                ConstGauge::new(io.in_flight as i64).encode(metric.encode_family(&s.labels())?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::time::Instant;

    use super::*;
    use crate::state::Access;

    fn id(c: char) -> String {
        format!("vol-{}", c.to_string().repeat(32))
    }

    fn state(volume_id: &str, phase: Phase, index: Option<u32>) -> VolumeState {
        VolumeState {
            volume_id: volume_id.to_owned(),
            phase,
            uri: "nbd://127.0.0.1:1/x".into(),
            connections: 4,
            timeout_secs: 30,
            dead_conn_timeout_secs: 120,
            staging_path: PathBuf::from("/staging"),
            access: Access::Block,
            read_only: false,
            index,
            // Named as older versions named devices: by the volume id.
            backend_id: None,
        }
    }

    /// A device under a fake /sys/block: its backend (none for an ioctl
    /// device), size in sectors, hardware queues and stat line.
    fn device(root: &Path, index: u32, backend: Option<&str>, queues: usize, stat: Option<&str>) {
        let dir = root.join(format!("nbd{index}"));
        std::fs::create_dir_all(dir.join("mq")).unwrap();
        std::fs::write(dir.join("size"), "2048\n").unwrap();
        if let Some(b) = backend {
            std::fs::write(dir.join("backend"), format!("{b}\n")).unwrap();
        }
        for q in 0..queues {
            std::fs::create_dir_all(dir.join("mq").join(q.to_string())).unwrap();
        }
        if let Some(stat) = stat {
            std::fs::write(dir.join("stat"), stat).unwrap();
        }
    }

    fn render(collector: VolumeCollector) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(collector));
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).unwrap();
        out
    }

    #[test]
    fn reports_each_staged_volume_with_its_device_health_and_counters() {
        let tmp = tempfile::tempdir().unwrap();
        let sys = tmp.path().join("sys");
        let states = StateDir::open(tmp.path().join("state")).unwrap();
        let (a, b, c, d) = (id('a'), id('b'), id('c'), id('d'));
        // a: netlink device nbd3 named <volume>@<node> (its recorded index
        // is stale), 4 sockets; nbd4 is another plugin's device of a on the
        // same kernel (a shared raw block volume), not this node's.
        let mut staged_a = state(&a, Phase::Staged, Some(0));
        staged_a.backend_id = Some(format!("{a}@node-1"));
        states.save(&staged_a).unwrap();
        device(&sys, 3, Some(&format!("{a}@node-1")), 4, Some("10 0 80 5 20 0 4096 2500 1 3000 3100 0 0 0 0 7 9\n"));
        device(&sys, 4, Some(&format!("{a}@node-2")), 2, Some("99 0 8 1 99 0 8 1 0 1 1\n"));
        // b: an ioctl device (no backend), reconnecting.
        states.save(&state(&b, Phase::Staged, Some(5))).unwrap();
        device(&sys, 5, None, 1, Some("1 0 8 1 0 0 0 0 0 1 1\n"));
        // c: staged, its device gone; d: unstaging, not reported.
        states.save(&state(&c, Phase::Staged, Some(3))).unwrap();
        states.save(&state(&d, Phase::Unstaging, None)).unwrap();
        let health = Arc::new(Health::default());
        health.reconnecting(&b);
        health.reconnected(&a);
        health.reconnected(&a);
        let text = render(VolumeCollector::new(states.clone(), Sysfs::at(&sys), Arc::clone(&health), 64));
        let has = |line: &str| assert!(text.lines().any(|l| l == line), "no line {line:?} in\n{text}");
        has("nbd_csi_node_volumes 3");
        has("nbd_csi_node_max_volumes 64");
        let la = format!("volume_id=\"{a}\",device=\"nbd3\"");
        has(&format!("nbd_csi_node_volume_connections{{{la}}} 4"));
        has(&format!("nbd_csi_node_volume_health{{{la},state=\"ok\"}} 1"));
        has(&format!("nbd_csi_node_volume_health{{{la},state=\"lost\"}} 0"));
        has(&format!("nbd_csi_node_volume_reconnects_total{{{la}}} 2"));
        has(&format!("nbd_csi_node_volume_reads_completed_total{{{la}}} 10"));
        has(&format!("nbd_csi_node_volume_writes_completed_total{{{la}}} 20"));
        has(&format!("nbd_csi_node_volume_read_bytes_total{{{la}}} {}", 80 * 512));
        has(&format!("nbd_csi_node_volume_written_bytes_total{{{la}}} {}", 4096 * 512));
        has(&format!("nbd_csi_node_volume_write_time_seconds_total{{{la}}} 2.5"));
        has(&format!("nbd_csi_node_volume_io_time_seconds_total{{{la}}} 3.0"));
        has(&format!("nbd_csi_node_volume_flushes_completed_total{{{la}}} 7"));
        has(&format!("nbd_csi_node_volume_ios_in_progress{{{la}}} 1"));
        let lb = format!("volume_id=\"{b}\",device=\"nbd5\"");
        has(&format!("nbd_csi_node_volume_health{{{lb},state=\"reconnecting\"}} 1"));
        has(&format!("nbd_csi_node_volume_health{{{lb},state=\"ok\"}} 0"));
        has(&format!("nbd_csi_node_volume_reads_completed_total{{{lb}}} 1"));
        assert!(!text.contains(&format!("nbd_csi_node_volume_flushes_completed_total{{{lb}}}")), "{text}");
        // nbd3 belongs to a: c's stale index does not make it c's device.
        let lc = format!("volume_id=\"{c}\",device=\"\"");
        has(&format!("nbd_csi_node_volume_health{{{lc},state=\"lost\"}} 1"));
        has(&format!("nbd_csi_node_volume_connections{{{lc}}} 0"));
        assert!(!text.contains(&format!("nbd_csi_node_volume_reads_completed_total{{{lc}}}")), "{text}");
        assert!(!text.contains(&d), "an unstaging volume is not reported:\n{text}");

        // Unstaged: gone from the next scrape.
        states.remove(&a).unwrap();
        health.forget(&a);
        let text = render(VolumeCollector::new(states, Sysfs::at(&sys), health, 64));
        assert!(!text.contains(&a), "{text}");
        assert!(text.lines().any(|l| l == "nbd_csi_node_volumes 2"), "{text}");
    }

    #[test]
    fn health_follows_healing_and_the_device() {
        let since = Instant::now();
        assert_eq!(health_state(None, true), "ok");
        assert_eq!(health_state(None, false), "lost");
        assert_eq!(health_state(Some(&Link::Reconnecting { since }), true), "reconnecting");
        assert_eq!(health_state(Some(&Link::Lost { since, error: "x".into() }), true), "lost");
    }
}
