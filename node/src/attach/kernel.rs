//! The Linux kernel NBD driver as an [`Attacher`].

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Mutex};

use super::devices::{Sysfs, device_path, mounts_using};
use super::{AttachSpec, Attached, Attacher, sockets};
use crate::error::{Error, ErrorKind, Result};
use crate::sys::ioctl::IoctlDevice;
use crate::sys::mount;
use crate::sys::nbd::NbdNetlink;
use crate::sys::nbd_genl::ConnectParams;

#[derive(Debug)]
enum Interface {
    Netlink(Mutex<NbdNetlink>),
    /// Fallback: devices configured by ioctl, each served by a thread in
    /// this process (NBD_DO_IT); ownership kept in memory.
    Ioctl(Mutex<HashMap<u32, (String, Arc<IoctlDevice>)>>),
}

#[derive(Debug)]
pub struct KernelAttacher {
    iface: Interface,
    sysfs: Sysfs,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl KernelAttacher {
    /// Netlink when the kernel has the `nbd` family, else the ioctls
    /// (or the ioctls always, when `force_ioctl`).
    pub fn open(force_ioctl: bool) -> Result<Self> {
        let iface = match (force_ioctl, NbdNetlink::open()?) {
            (false, Some(nl)) => Interface::Netlink(Mutex::new(nl)),
            (true, _) | (false, None) => {
                tracing::warn!("using the NBD ioctl interface: devices do not survive a plugin restart");
                Interface::Ioctl(Mutex::new(HashMap::new()))
            }
        };
        Ok(Self { iface, sysfs: Sysfs::default() })
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
            Interface::Netlink(nl) => lock(nl).link_dead_listener().map(Some),
            Interface::Ioctl(_) => Ok(None),
        }
    }

    fn ioctl_attach(
        &self,
        devices: &Mutex<HashMap<u32, (String, Arc<IoctlDevice>)>>,
        params: &ConnectParams<'_>,
    ) -> Result<u32> {
        let mut map = lock(devices);
        let index = self
            .sysfs
            .devices()
            .into_iter()
            .find(|i| !map.contains_key(i) && self.sysfs.is_free(*i))
            .ok_or_else(|| Error::new(ErrorKind::Busy, "no free /dev/nbdX (load nbd with a larger nbds_max)"))?;
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
}

impl Attacher for KernelAttacher {
    async fn attach(&self, spec: &AttachSpec) -> Result<Attached> {
        let (export, socks) = sockets::open(&spec.uri, spec.connections).await?;
        let params = ConnectParams {
            sockets: socks.iter().map(|s| s.as_fd()).collect(),
            size_bytes: export.size,
            block_size: sockets::block_size(&export)?,
            // The kernel takes the server's flags as they came, unknown bits included.
            server_flags: export.transmission_flags.bits(),
            client_flags: 0,
            timeout_secs: spec.timeout.as_secs().max(1),
            dead_conn_timeout_secs: spec.dead_conn_timeout.as_secs(),
            backend_id: spec.backend_id.clone(),
        };
        let index = match &self.iface {
            Interface::Netlink(nl) => lock(nl).connect(&params)?,
            Interface::Ioctl(devices) => self.ioctl_attach(devices, &params)?,
        };
        let connections = params.sockets.len();
        // The kernel holds its own references on the sockets now.
        drop(params);
        drop(socks);
        Ok(Attached { index, size: export.size, transmission_flags: export.transmission_flags.bits(), connections })
    }

    async fn reconnect(&self, index: u32, spec: &AttachSpec) -> Result<usize> {
        let Interface::Netlink(nl) = &self.iface else {
            return Err(Error::new(ErrorKind::Kernel, "reconnecting needs the netlink interface"));
        };
        let (export, socks) = sockets::open(&spec.uri, spec.connections).await?;
        let fds: Vec<BorrowedFd<'_>> = socks.iter().map(|s| s.as_fd()).collect();
        lock(nl).reconfigure(index, &spec.backend_id, &fds, None)?;
        tracing::info!(index, sockets = fds.len(), flags = export.transmission_flags.bits(), "handed fresh sockets");
        Ok(fds.len())
    }

    async fn resize(&self, index: u32, spec: &AttachSpec) -> Result<u64> {
        let Interface::Netlink(nl) = &self.iface else {
            return Err(Error::new(ErrorKind::Kernel, "online resize needs the netlink interface"));
        };
        let (export, _socks) = sockets::open(&spec.uri, 1).await?;
        lock(nl).reconfigure(index, &spec.backend_id, &[], Some(export.size))?;
        Ok(export.size)
    }

    fn detach(&self, index: u32) -> Result<()> {
        match &self.iface {
            Interface::Netlink(nl) => {
                let mut nl = lock(nl);
                if !nl.status(Some(index))?.iter().any(|&(i, connected)| i == index && connected) {
                    return Ok(());
                }
                nl.disconnect(index)
            }
            Interface::Ioctl(devices) => match lock(devices).remove(&index) {
                Some((_, dev)) => dev.disconnect(),
                None => Ok(()),
            },
        }
    }

    fn find(&self, backend_id: &str) -> Result<Option<u32>> {
        Ok(self.list()?.into_iter().find(|(_, b)| b == backend_id).map(|(i, _)| i))
    }

    fn connected(&self, index: u32) -> Result<bool> {
        match &self.iface {
            Interface::Netlink(nl) => Ok(lock(nl).status(Some(index))?.iter().any(|&(i, c)| i == index && c)),
            Interface::Ioctl(devices) => Ok(lock(devices).contains_key(&index)),
        }
    }

    fn list(&self) -> Result<Vec<(u32, String)>> {
        match &self.iface {
            Interface::Netlink(_) => Ok(self.sysfs.backends()),
            Interface::Ioctl(devices) => Ok(lock(devices).iter().map(|(i, (b, _))| (*i, b.clone())).collect()),
        }
    }

    fn in_use(&self, index: u32) -> Result<bool> {
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
    }
}
