//! What healing knows of each volume's connection, shared with
//! NodeGetVolumeStats so that VolumeCondition tells the truth (the kernel's
//! STATUS only says a device is configured, not that its sockets are alive)
//! and with the metrics, which also report how often each volume was
//! reconnected.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    /// A dead link was reported; fresh sockets are being offered.
    Reconnecting { since: Instant },
    /// Reconnecting failed within the dead-connection timeout; I/O fails
    /// until a later retry (every check interval) succeeds.
    Lost { since: Instant, error: String },
}

/// Volumes whose connection is not known to be healthy, and how many times
/// each staged volume was reconnected.
#[derive(Debug, Default)]
pub struct Health {
    links: Mutex<HashMap<String, Link>>,
    reconnects: Mutex<HashMap<String, u64>>,
}

impl Health {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Link>> {
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reconnect_counts(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.reconnects.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Healing gave the volume's device fresh sockets, or attached it again.
    pub fn reconnected(&self, volume_id: &str) {
        *self.reconnect_counts().entry(volume_id.to_owned()).or_insert(0) += 1;
    }

    /// Times the volume was reconnected since this plugin started.
    pub fn reconnects(&self, volume_id: &str) -> u64 {
        self.reconnect_counts().get(volume_id).copied().unwrap_or(0)
    }

    /// The volume was unstaged: nothing about it is kept.
    pub fn forget(&self, volume_id: &str) {
        self.map().remove(volume_id);
        self.reconnect_counts().remove(volume_id);
    }

    /// Healing starts; a volume already lost stays lost until it succeeds.
    pub fn reconnecting(&self, volume_id: &str) {
        self.map().entry(volume_id.to_owned()).or_insert(Link::Reconnecting { since: Instant::now() });
    }

    pub fn healed(&self, volume_id: &str) {
        self.map().remove(volume_id);
    }

    /// Records that healing gave up; true when the volume was not lost
    /// before (so the loss is reported once, not on every retry).
    pub fn lost(&self, volume_id: &str, error: String) -> bool {
        let mut map = self.map();
        let (since, news) = match map.get(volume_id) {
            Some(Link::Lost { since, .. }) => (*since, false),
            Some(Link::Reconnecting { since }) => (*since, true),
            None => (Instant::now(), true),
        };
        map.insert(volume_id.to_owned(), Link::Lost { since, error });
        news
    }

    pub fn get(&self, volume_id: &str) -> Option<Link> {
        self.map().get(volume_id).cloned()
    }

    pub fn lost_volumes(&self) -> Vec<String> {
        let mut out: Vec<String> =
            self.map().iter().filter(|(_, l)| matches!(l, Link::Lost { .. })).map(|(id, _)| id.clone()).collect();
        out.sort();
        out
    }
}

/// VolumeCondition (abnormal, message) from the device the kernel has
/// (index, configured) and what healing knows.
pub fn condition(device: Option<(u32, bool)>, link: Option<&Link>, now: Instant) -> (bool, String) {
    let secs = |since: &Instant| now.saturating_duration_since(*since).as_secs();
    match (device, link) {
        (None, _) => (true, "no NBD device for this volume".into()),
        (Some((index, false)), _) => (true, format!("nbd{index} is disconnected")),
        (Some((index, true)), Some(Link::Reconnecting { since })) => {
            (true, format!("nbd{index} lost its connection {} s ago; reconnecting", secs(since)))
        }
        (Some((index, true)), Some(Link::Lost { since, error })) => (
            true,
            format!(
                "nbd{index} lost its connection {} s ago; I/O fails until reconnecting succeeds: {error}",
                secs(since)
            ),
        ),
        (Some(_), None) => (false, "connected".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ago(now: Instant, secs: u64) -> Instant {
        now - Duration::from_secs(secs)
    }

    #[test]
    fn a_loss_is_news_once_and_keeps_its_start() {
        let health = Health::default();
        health.reconnecting("v");
        let Some(Link::Reconnecting { since }) = health.get("v") else { panic!() };
        assert!(health.lost("v", "refused".into()));
        health.reconnecting("v");
        assert!(!health.lost("v", "refused again".into()));
        assert_eq!(health.get("v"), Some(Link::Lost { since, error: "refused again".into() }));
        assert_eq!(health.lost_volumes(), ["v"]);
        health.healed("v");
        assert_eq!(health.get("v"), None);
        assert!(health.lost_volumes().is_empty());
    }

    #[test]
    fn reconnects_are_counted_per_volume_until_forgotten() {
        let health = Health::default();
        health.reconnected("v");
        health.reconnected("v");
        health.reconnected("w");
        health.reconnecting("v");
        assert_eq!((health.reconnects("v"), health.reconnects("w"), health.reconnects("x")), (2, 1, 0));
        health.healed("v");
        assert_eq!(health.reconnects("v"), 2, "healing keeps the count");
        health.forget("v");
        assert_eq!((health.reconnects("v"), health.get("v")), (0, None));
        assert_eq!(health.reconnects("w"), 1);
    }

    #[test]
    fn condition_is_abnormal_unless_configured_and_not_healing() {
        let now = Instant::now();
        assert_eq!(condition(Some((3, true)), None, now), (false, "connected".into()));
        assert!(condition(None, None, now).0);
        assert_eq!(condition(Some((3, false)), None, now), (true, "nbd3 is disconnected".into()));
        let r = Link::Reconnecting { since: ago(now, 4) };
        assert_eq!(
            condition(Some((3, true)), Some(&r), now),
            (true, "nbd3 lost its connection 4 s ago; reconnecting".into())
        );
        let l = Link::Lost { since: ago(now, 70), error: "connection refused".into() };
        let (abnormal, message) = condition(Some((3, true)), Some(&l), now);
        assert!(abnormal && message.contains("70 s ago") && message.ends_with("connection refused"), "{message}");
    }
}
