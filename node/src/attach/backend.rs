//! The BACKEND_IDENTIFIER a node plugin gives the kernel for a volume's
//! device: `<volume id>@<node id>`. It names the plugin instance as well as
//! the volume, so two plugins on one kernel (two node ids, as when a test
//! bed stands in for the two nodes of a KubeVirt live migration sharing a
//! raw block volume) each find their own device of the same volume, and
//! neither takes the other's for its own, heals it, or disconnects it.
//!
//! Older versions used the volume id alone. A plugin upgraded in place still
//! knows those devices: their state files carry no identifier, which means
//! the volume id ([`crate::state::VolumeState::backend_id`]), and a device
//! named by a bare volume id of this driver is still one of its own.

use super::devices::is_driver_volume_id;

/// Between the volume id and the node id; in neither (volume ids are
/// `vol-` + hex, node ids Kubernetes node names).
const SEPARATOR: char = '@';

/// The identifier a device of `volume_id` attached by the plugin of
/// `node_id` gets.
pub fn backend_id(volume_id: &str, node_id: &str) -> String {
    format!("{volume_id}{SEPARATOR}{node_id}")
}

/// Whether a device with this backend identifier belongs to the plugin of
/// `node_id` (`None`: a plugin that knows no node id, such as `watch`): a
/// volume id of this driver followed by this node's id, or alone (attached
/// by an older version). Another node's device on the same kernel is not.
pub fn is_own(backend: &str, node_id: Option<&str>) -> bool {
    match backend.split_once(SEPARATOR) {
        None => is_driver_volume_id(backend),
        Some((volume, node)) => is_driver_volume_id(volume) && node_id == Some(node),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VOL: &str = "vol-0123456789abcdef0123456789abcdef";

    #[test]
    fn names_the_volume_and_the_node() {
        assert_eq!(backend_id(VOL, "node-a"), format!("{VOL}@node-a"));
        assert_ne!(backend_id(VOL, "node-a"), backend_id(VOL, "node-b"));
    }

    #[test]
    fn owns_its_own_and_older_versions_devices_only() {
        let a = Some("node-a");
        assert!(is_own(&backend_id(VOL, "node-a"), a));
        assert!(is_own(VOL, a), "attached by an older version");
        assert!(is_own(VOL, None));
        assert!(!is_own(&backend_id(VOL, "node-b"), a), "another plugin's on the same kernel");
        assert!(!is_own(&backend_id(VOL, "node-a"), None));
        assert!(!is_own("vol-mc@node-a", a), "not a volume id of this driver");
        assert!(!is_own("vol-mc", a));
        assert!(!is_own(&format!("{VOL}@node-a@x"), a));
    }
}
