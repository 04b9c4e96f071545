//! The process figures Prometheus' client libraries conventionally export
//! (`process_*`), read from /proc/self at scrape time: when the plugin
//! started, its open descriptors (each attached device holds its sockets in
//! the kernel, not here, so a growing count is a leak) and its resident
//! memory.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;

#[derive(Debug)]
pub struct ProcessCollector {
    /// Seconds since the Unix epoch.
    started: f64,
}

impl ProcessCollector {
    pub fn started_now() -> Self {
        Self { started: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()) }
    }
}

fn open_fds() -> Option<u64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as u64)
}

/// VmRSS from /proc/self/status, which the kernel gives in kB.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_rss(&status)
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kb = line.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()?;
    kb.checked_mul(1024)
}

fn gauge(encoder: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: f64) -> Result<(), fmt::Error> {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(value).encode(metric)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        gauge(
            &mut encoder,
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch",
            self.started,
        )?;
        if let Some(fds) = open_fds() {
            gauge(&mut encoder, "process_open_fds", "Open file descriptors", fds as f64)?;
        }
        if let Some(rss) = resident_bytes() {
            gauge(&mut encoder, "process_resident_memory_bytes", "Resident memory size", rss as f64)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_resident_memory_in_bytes() {
        assert_eq!(parse_vm_rss("Name:\tx\nVmRSS:\t    2048 kB\nThreads:\t3\n"), Some(2048 * 1024));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\t 12 pages\n"), None);
        assert!(resident_bytes().is_some_and(|b| b > 0));
        assert!(open_fds().is_some_and(|n| n >= 3));
    }
}
