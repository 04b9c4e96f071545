//! One NBD server per volume: start it on the volume's port with its secret
//! export name, apply who may connect, stop it.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use nbd::server::{Allowed, Export, ExportConfig, Server};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::store::{Publication, VolumeRecord};

/// A running export server. Dropping it stops the server too.
#[derive(Debug)]
pub struct Served {
    pub export: Arc<Export>,
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<io::Result<()>>,
}

/// Peers allowed by a volume's publications: nobody while it is not
/// published, anyone when a publication has no known addresses (no
/// Kubernetes), else the union of the nodes' addresses.
pub fn allowed(published: &BTreeMap<String, Publication>) -> Allowed {
    let mut set = BTreeSet::new();
    for publication in published.values() {
        match &publication.addresses {
            None => return Allowed::Any,
            Some(addresses) => set.extend(addresses.iter().copied()),
        }
    }
    Allowed::Only(set)
}

/// Opens the image and listens on `listen`:`record.port` (0 picks one).
pub async fn serve(image: &Path, record: &VolumeRecord, listen: IpAddr) -> io::Result<Served> {
    let mut config = ExportConfig::new(record.export_name.clone());
    config.list_export = false;
    config.read_only = record.read_only;
    config.description = format!("nbd-csi volume {}", record.id);
    let export = Export::open(image, config)?;
    export.access().set_allowed(allowed(&record.published));
    let server = Server::bind(Arc::clone(&export), SocketAddr::new(listen, record.port)).await?;
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
