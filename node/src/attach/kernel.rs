//! The Linux kernel NBD driver as an [`Attacher`]. Every request that can
//! block (netlink, the ioctls, an exclusive open of a device) runs on the
//! blocking pool, never on a runtime worker.

use std::collections::HashMap;
use std::net::{IpAddr, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Mutex};

use super::control::NbdControl;
use super::devices::{Sysfs, device_path, mounts_using};
use super::tls::TlsDir;
use super::{AttachSpec, Attached, Attacher, sockets};
use crate::blocking::blocking;
use crate::error::{Error, ErrorKind, Result};
use crate::sys::ioctl::IoctlDevice;
use crate::sys::mount;
use crate::sys::nbd::NbdNetlink;
use crate::sys::nbd_genl::ConnectParams;

/// Devices configured by ioctl, each served by a thread in this process
/// (NBD_DO_IT): index → (backend identifier, device).
type IoctlDevices = Arc<Mutex<HashMap<u32, (String, Arc<IoctlDevice>)>>>;

#[derive(Debug)]
enum Interface {
    Netlink(Arc<dyn NbdControl>),
    /// Fallback: ownership kept in memory.
    Ioctl(IoctlDevices),
}

#[derive(Debug)]
pub struct KernelAttacher {
    iface: Interface,
    sysfs: Sysfs,
    /// Address every connection to a server is made from (the node's).
    source: Option<IpAddr>,
    /// The node's certificates, for exports that require TLS (`nbds://`).
    tls: Option<TlsDir>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What CONNECT (or the ioctls) need besides the sockets.
#[derive(Debug, Clone)]
struct Connect {
    size_bytes: u64,
    block_size: u64,
    server_flags: u16,
    timeout_secs: u64,
    dead_conn_timeout_secs: u64,
    backend_id: String,
}

impl Connect {
    fn params<'fd>(&self, socks: &'fd [TcpStream]) -> ConnectParams<'fd> {
        ConnectParams {
            sockets: socks.iter().map(|s| s.as_fd()).collect(),
            size_bytes: self.size_bytes,
            block_size: self.block_size,
            server_flags: self.server_flags,
            client_flags: 0,
            timeout_secs: self.timeout_secs,
            dead_conn_timeout_secs: self.dead_conn_timeout_secs,
            backend_id: self.backend_id.clone(),
        }
    }
}

impl KernelAttacher {
    /// Netlink when the kernel has the `nbd` family, else the ioctls
    /// (or the ioctls always, when `force_ioctl`).
    pub fn open(force_ioctl: bool) -> Result<Self> {
        let iface = match (force_ioctl, NbdNetlink::open()?) {
            (false, Some(nl)) => Interface::Netlink(Arc::new(Mutex::new(nl))),
            (true, _) | (false, None) => {
                tracing::warn!("using the NBD ioctl interface: devices do not survive a plugin restart");
                Interface::Ioctl(IoctlDevices::default())
            }
        };
        Ok(Self { iface, sysfs: Sysfs::default(), source: None, tls: None })
    }

    /// Connections to servers from `source` (see [`sockets::connect`]).
    pub fn with_source_address(self, source: Option<IpAddr>) -> Self {
        Self { source, ..self }
    }

    /// The node's certificates for exports that require TLS; without them
    /// such an export is refused (see [`sockets::open`]).
    pub fn with_tls_dir(self, tls: Option<TlsDir>) -> Self {
        Self { tls, ..self }
    }

    /// An attacher driving `control` instead of the kernel's netlink
    /// family, with devices listed under `sysfs`.
    #[cfg(test)]
    pub fn with_control(control: Arc<dyn NbdControl>, sysfs: Sysfs) -> Self {
        Self { iface: Interface::Netlink(control), sysfs, source: None, tls: None }
    }

    /// How many devices the kernel can give this plugin: unbounded over
    /// netlink (CONNECT adds a device when none is free, beyond nbds_max),
    /// the `/dev/nbdX` that exist with the ioctls (nbds_max of them).
    pub fn device_limit(&self) -> Option<usize> {
        match self.iface {
            Interface::Netlink(_) => None,
            Interface::Ioctl(_) => Some(self.sysfs.devices().len()),
        }
    }

    pub fn is_netlink(&self) -> bool {
        matches!(self.iface, Interface::Netlink(_))
    }

    pub fn sysfs(&self) -> &Sysfs {
        &self.sysfs
    }

    /// The netlink handle, for the LINK_DEAD listener.
    pub fn link_dead_listener(&self) -> Result<Option<crate::sys::nbd::LinkDeadListener>> {
        match &self.iface {
            Interface::Netlink(control) => control.link_dead_listener().map(Some),
            Interface::Ioctl(_) => Ok(None),
        }
    }

    fn netlink(&self, what: &str) -> Result<Arc<dyn NbdControl>> {
        match &self.iface {
            Interface::Netlink(control) => Ok(Arc::clone(control)),
            Interface::Ioctl(_) => Err(Error::new(ErrorKind::Kernel, format!("{what} needs the netlink interface"))),
        }
    }
}

/// Configures a free device by ioctl and starts its NBD_DO_IT thread
/// (blocking: run it on the blocking pool).
fn ioctl_attach(sysfs: &Sysfs, devices: &IoctlDevices, params: &ConnectParams<'_>) -> Result<u32> {
    let mut map = lock(devices);
    let index = sysfs.devices().into_iter().find(|i| !map.contains_key(i) && sysfs.is_free(*i)).ok_or_else(|| {
        Error::new(
            ErrorKind::Exhausted,
            "every /dev/nbdX is in use: load nbd with a larger nbds_max, or use a kernel with the NBD netlink \
                 interface, which adds devices as needed",
        )
    })?;
    let dev = Arc::new(IoctlDevice::open(&device_path(index))?);
    dev.configure(params.block_size, params.size_bytes, params.timeout_secs, params.server_flags, &params.sockets)?;
    let runner = Arc::clone(&dev);
    std::thread::Builder::new()
        .name(format!("nbd{index}"))
        .spawn(move || {
            if let Err(e) = runner.run() {
                tracing::warn!(index, error = %e.chain(), "NBD_DO_IT ended");
            }
        })
        .map_err(|e| Error::with_source(ErrorKind::Io, "spawning the NBD_DO_IT thread", e))?;
    map.insert(index, (params.backend_id.clone(), dev));
    Ok(index)
}

impl Attacher for KernelAttacher {
    async fn attach(&self, spec: &AttachSpec) -> Result<Attached> {
        let (export, socks) = sockets::open(&spec.uri, spec.connections, self.source, self.tls.as_ref()).await?;
        let connect = Connect {
            size_bytes: export.size,
            block_size: sockets::block_size(&export)?,
            // The kernel takes the server's flags as they came, unknown bits included.
            server_flags: export.transmission_flags.bits(),
            timeout_secs: spec.timeout.as_secs().max(1),
            dead_conn_timeout_secs: spec.dead_conn_timeout.as_secs(),
            backend_id: spec.backend_id.clone(),
        };
        let connections = socks.len();
        // The sockets go with the request and are closed once it returns:
        // the kernel holds its own references by then.
        let index = match &self.iface {
            Interface::Netlink(control) => {
                let control = Arc::clone(control);
                blocking(move || control.connect(&connect.params(&socks))).await?
            }
            Interface::Ioctl(devices) => {
                let (sysfs, devices) = (self.sysfs.clone(), Arc::clone(devices));
                blocking(move || ioctl_attach(&sysfs, &devices, &connect.params(&socks))).await?
            }
        };
        Ok(Attached { index, size: export.size, transmission_flags: export.transmission_flags.bits(), connections })
    }

    async fn reconnect(&self, index: u32, spec: &AttachSpec) -> Result<usize> {
        let control = self.netlink("reconnecting")?;
        let (export, socks) = sockets::open(&spec.uri, spec.connections, self.source, self.tls.as_ref()).await?;
        let backend_id = spec.backend_id.clone();
        let n = blocking(move || {
            let fds: Vec<BorrowedFd<'_>> = socks.iter().map(|s| s.as_fd()).collect();
            control.reconfigure(index, &backend_id, &fds, None).map(|()| fds.len())
        })
        .await?;
        let tls = spec.uri.tls;
        tracing::info!(index, sockets = n, flags = export.transmission_flags.bits(), tls, "handed fresh sockets");
        Ok(n)
    }

    async fn resize(&self, index: u32, spec: &AttachSpec) -> Result<u64> {
        let control = self.netlink("online resize")?;
        let (export, socks) = sockets::open(&spec.uri, 1, self.source, self.tls.as_ref()).await?;
        let backend_id = spec.backend_id.clone();
        blocking(move || {
            let _socks = socks;
            control.reconfigure(index, &backend_id, &[], Some(export.size))
        })
        .await?;
        Ok(export.size)
    }

    async fn detach(&self, index: u32) -> Result<()> {
        match &self.iface {
            Interface::Netlink(control) => {
                let control = Arc::clone(control);
                blocking(move || {
                    if !control.status(Some(index))?.iter().any(|&(i, connected)| i == index && connected) {
                        return Ok(());
                    }
                    control.disconnect(index)
                })
                .await
            }
            Interface::Ioctl(devices) => {
                let removed = lock(devices).remove(&index);
                match removed {
                    Some((_, dev)) => blocking(move || dev.disconnect()).await,
                    None => Ok(()),
                }
            }
        }
    }

    fn find(&self, backend_id: &str) -> Result<Option<u32>> {
        Ok(self.list()?.into_iter().find(|(_, b)| b == backend_id).map(|(i, _)| i))
    }

    async fn connected(&self, index: u32) -> Result<bool> {
        match &self.iface {
            Interface::Netlink(control) => {
                let control = Arc::clone(control);
                blocking(move || Ok(control.status(Some(index))?.iter().any(|&(i, c)| i == index && c))).await
            }
            Interface::Ioctl(devices) => Ok(lock(devices).contains_key(&index)),
        }
    }

    fn list(&self) -> Result<Vec<(u32, String)>> {
        match &self.iface {
            Interface::Netlink(_) => Ok(self.sysfs.backends()),
            Interface::Ioctl(devices) => Ok(lock(devices).iter().map(|(i, (b, _))| (*i, b.clone())).collect()),
        }
    }

    async fn in_use(&self, index: u32) -> Result<bool> {
        blocking(move || {
            if !mounts_using(&mount::mounts()?, index).is_empty() {
                return Ok(true);
            }
            // An exclusive open fails with EBUSY while anything holds the device.
            let dev = device_path(index);
            let exclusive = nix::fcntl::OFlag::O_EXCL.bits();
            match std::fs::OpenOptions::new().read(true).custom_flags(exclusive).open(&dev) {
                Ok(_) => Ok(false),
                Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EBUSY as i32) => Ok(true),
                Err(e) => Err(Error::with_source(ErrorKind::Io, format!("opening {} exclusively", dev.display()), e)),
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ioctls cannot add devices: the plugin's limit is how many
    /// /dev/nbdX exist, and with every one of them taken an attach is
    /// RESOURCE_EXHAUSTED saying why, before any device is touched.
    #[test]
    fn with_the_ioctls_the_devices_that_exist_are_the_limit_and_running_out_is_exhausted() {
        let dir = tempfile::tempdir().unwrap();
        for (index, sectors) in [(0, 2048), (1, 4096)] {
            let device = dir.path().join(format!("nbd{index}"));
            std::fs::create_dir_all(&device).unwrap();
            std::fs::write(device.join("size"), format!("{sectors}\n")).unwrap();
        }
        let attacher = KernelAttacher {
            iface: Interface::Ioctl(IoctlDevices::default()),
            sysfs: Sysfs::at(dir.path()),
            source: None,
            tls: None,
        };
        assert_eq!(attacher.device_limit(), Some(2));
        let Interface::Ioctl(devices) = &attacher.iface else { unreachable!() };
        let params = ConnectParams {
            sockets: Vec::new(),
            size_bytes: 1 << 20,
            block_size: 512,
            server_flags: 0,
            client_flags: 0,
            timeout_secs: 30,
            dead_conn_timeout_secs: 120,
            backend_id: "vol-1".into(),
        };
        let error = ioctl_attach(&attacher.sysfs, devices, &params).unwrap_err();
        assert_eq!(error.kind, ErrorKind::Exhausted, "{}", error.chain());
        assert!(error.message.contains("nbds_max"), "{}", error.message);
    }
}
