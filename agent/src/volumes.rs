//! One NBD server per published volume: start it on a port with its secret
//! export name, apply who may connect, stop it.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use nbd::server::{Allowed, Export, ExportConfig, Fence, ReadOnlyPeers, Server};
use nbd::tls::TlsMode;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::store::{ExportTls, Publication, VolumeRecord};

/// Connection caps for every volume's NBD server (see [`ExportConfig`]):
/// one volume's clients cannot use up the descriptors every other volume
/// of the process needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionCaps {
    pub per_volume: usize,
    pub per_peer: usize,
}

impl Default for ConnectionCaps {
    fn default() -> Self {
        Self {
            per_volume: nbd::server::DEFAULT_MAX_CONNECTIONS,
            per_peer: nbd::server::DEFAULT_MAX_CONNECTIONS_PER_PEER,
        }
    }
}

/// A running export server. Dropping it stops the server too.
#[derive(Debug)]
pub struct Served {
    pub export: Arc<Export>,
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<io::Result<()>>,
}

/// Who may connect, from a volume's publications and TLS mode: nobody
/// while it is not published. An export that requires TLS admits the
/// published nodes by the node name in their verified client certificate
/// (the node id is the Node's name, which the certificate carries), from
/// any address. Otherwise by address: anyone when a publication has no
/// known addresses (no Kubernetes), else the union of the nodes'
/// addresses. Nodes published read-only may only read; with unknown
/// addresses that is enforced only when every publication is read-only.
pub fn policy(published: &BTreeMap<String, Publication>, tls: ExportTls) -> (Allowed, ReadOnlyPeers) {
    if tls == ExportTls::Required {
        let nodes = published.keys().cloned().collect();
        let readers = published.iter().filter(|(_, p)| p.read_only).map(|(node, _)| node.clone()).collect();
        return (Allowed::Nodes(nodes), ReadOnlyPeers { nodes: readers, ..Default::default() });
    }
    let mut set = BTreeSet::new();
    let mut read_only = ReadOnlyPeers::default();
    let mut unknown = false;
    for publication in published.values() {
        match &publication.addresses {
            None => unknown = true,
            Some(addresses) => {
                set.extend(addresses.iter().copied());
                if publication.read_only {
                    read_only.peers.extend(addresses.iter().copied());
                }
            }
        }
    }
    if unknown {
        read_only.all = published.values().all(|p| p.read_only);
        return (Allowed::Any, read_only);
    }
    (Allowed::Only(set), read_only)
}

/// Applies [`policy`] to an export of volume `record`; the fence covers
/// the connections it stopped (and any stopped before that are still
/// open).
pub fn apply_policy(export: &Export, record: &VolumeRecord) -> Fence {
    let (allowed, read_only) = policy(&record.published, record.tls);
    export.access().set_policy(allowed, read_only)
}

/// Opens the image and listens on `addr` (port 0 picks one).
/// `tls` is the record's mode with its certificates.
pub async fn serve(
    image: &Path,
    record: &VolumeRecord,
    addr: SocketAddr,
    caps: ConnectionCaps,
    tls: TlsMode,
) -> io::Result<Served> {
    let mut config = ExportConfig::new(record.export_name.clone());
    config.list_export = false;
    config.read_only = record.read_only;
    config.description = format!("nbd-csi volume {}", record.id);
    config.max_connections = caps.per_volume;
    config.max_connections_per_peer = caps.per_peer;
    config.tls = tls;
    let export = Export::open(image, config)?;
    // A new export has no connections to fence.
    drop(apply_policy(&export, record));
    let server = Server::bind(Arc::clone(&export), addr).await?;
    let addr = server.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    Ok(Served { export, addr, stop: Some(stop), task })
}

impl Served {
    pub fn is_serving(&self) -> bool {
        !self.task.is_finished()
    }

    /// Stops accepting, lets connections finish, flushes the file.
    pub async fn stop(mut self) -> io::Result<()> {
        drop(self.stop.take());
        (&mut self.task).await.map_err(io::Error::other)?
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn publication(read_only: bool, addresses: Option<&[&str]>) -> Publication {
        let addresses = addresses.map(|a| a.iter().map(|s| s.parse().unwrap()).collect());
        Publication { read_only, access_mode: 5, addresses }
    }

    fn ips(list: &[&str]) -> BTreeSet<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn policy_admits_published_nodes_and_marks_readers() {
        let none = BTreeMap::new();
        assert_eq!(policy(&none, ExportTls::Off), (Allowed::Only(BTreeSet::new()), ReadOnlyPeers::default()));

        let mut published = BTreeMap::new();
        published.insert("a".to_string(), publication(false, Some(&["10.0.0.1"])));
        published.insert("b".to_string(), publication(true, Some(&["10.0.0.2", "fd00::2"])));
        let (allowed, read_only) = policy(&published, ExportTls::Off);
        assert_eq!(allowed, Allowed::Only(ips(&["10.0.0.1", "10.0.0.2", "fd00::2"])));
        assert_eq!(read_only, ReadOnlyPeers { peers: ips(&["10.0.0.2", "fd00::2"]), ..Default::default() });

        // Unknown addresses: anyone may connect; read-only for all only
        // when nobody may write.
        let mut unknown = BTreeMap::new();
        unknown.insert("a".to_string(), publication(true, None));
        assert_eq!(
            policy(&unknown, ExportTls::Allowed),
            (Allowed::Any, ReadOnlyPeers { all: true, ..Default::default() })
        );
        unknown.insert("b".to_string(), publication(false, None));
        assert_eq!(policy(&unknown, ExportTls::Off), (Allowed::Any, ReadOnlyPeers::default()));
    }

    /// With TLS required the certificate's node name decides, from any
    /// address, whether or not addresses are known; read-only nodes by name.
    #[test]
    fn a_volume_that_requires_tls_admits_its_nodes_by_name() {
        let mut published = BTreeMap::new();
        published.insert("worker-1".to_string(), publication(false, Some(&["10.0.0.1"])));
        published.insert("worker-2".to_string(), publication(true, None));
        let (allowed, read_only) = policy(&published, ExportTls::Required);
        assert_eq!(allowed, Allowed::Nodes(["worker-1".to_string(), "worker-2".to_string()].into()));
        assert_eq!(read_only, ReadOnlyPeers { nodes: ["worker-2".to_string()].into(), ..Default::default() });
        assert_eq!(policy(&BTreeMap::new(), ExportTls::Required).0, Allowed::Nodes(BTreeSet::new()), "nobody");
    }
}
