//! What every nbd-csi binary reports about the plugin as a whole. The CSI
//! spec has every instance of one plugin version return the same
//! GetPluginCapabilities, whichever services it serves (csi-sanity, for
//! one, reads the node's to decide whether to ControllerPublish), so both
//! binaries answer from here.

use crate::plugin_capability::{Service, Type, VolumeExpansion, service, volume_expansion};
use crate::{GetPluginCapabilitiesResponse, PluginCapability};

/// The controller service, and expansion of volumes in use.
pub fn capabilities() -> GetPluginCapabilitiesResponse {
    let service =
        PluginCapability { r#type: Some(Type::Service(Service { r#type: service::Type::ControllerService as i32 })) };
    let expansion = PluginCapability {
        r#type: Some(Type::VolumeExpansion(VolumeExpansion { r#type: volume_expansion::Type::Online as i32 })),
    };
    GetPluginCapabilitiesResponse { capabilities: vec![service, expansion] }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_controller_service_and_online_expansion() {
        let caps = capabilities().capabilities;
        let has = |t: &Type| caps.iter().any(|c| c.r#type.as_ref() == Some(t));
        assert_eq!(caps.len(), 2);
        assert!(has(&Type::Service(Service { r#type: service::Type::ControllerService as i32 })));
        assert!(has(&Type::VolumeExpansion(VolumeExpansion { r#type: volume_expansion::Type::Online as i32 })));
    }
}
