//! Which addresses a Node connects from: the IP addresses in its
//! `status.addresses`. A volume published to a node admits those peers
//! only; both the embedded controller and the reconciler ask here.

use std::collections::BTreeSet;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Node;
use kube::Api;

/// The IP addresses of Node `name` (host names are skipped, IPv4-mapped
/// IPv6 addresses made IPv4); `None` when there is no such Node.
pub async fn node_addresses(client: kube::Client, name: &str) -> Result<Option<BTreeSet<IpAddr>>, kube::Error> {
    let api: Api<Node> = Api::all(client);
    let Some(node) = api.get_opt(name).await? else { return Ok(None) };
    let addresses = node.status.and_then(|s| s.addresses).unwrap_or_default();
    Ok(Some(addresses.iter().filter_map(|a| a.address.parse::<IpAddr>().ok()).map(|ip| ip.to_canonical()).collect()))
}
