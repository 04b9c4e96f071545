//! The ioctl interface of the kernel NBD driver (include/uapi/linux/nbd.h),
//! used only where the generic netlink family is missing. Every request is
//! `_IO(0xab, n)`: no size is encoded, the argument is an integer.
//!
//! Unlike netlink, NBD_DO_IT blocks for the life of the device in the
//! calling thread, and the device goes away when that thread's process
//! dies: a plugin restart interrupts ioctl-attached devices.

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::Path;

use nix::libc::c_int;

use crate::error::{Context, ErrorKind, Result};

pub const NBD_IOCTL_TYPE: u8 = 0xab;

/// The whole request table of nbd.h, pinned by a test (not all are used).
#[allow(dead_code)]
pub mod nr {
    pub const SET_SOCK: u8 = 0;
    pub const SET_BLKSIZE: u8 = 1;
    pub const SET_SIZE: u8 = 2;
    pub const DO_IT: u8 = 3;
    pub const CLEAR_SOCK: u8 = 4;
    pub const CLEAR_QUE: u8 = 5;
    pub const PRINT_DEBUG: u8 = 6;
    pub const SET_SIZE_BLOCKS: u8 = 7;
    pub const DISCONNECT: u8 = 8;
    pub const SET_TIMEOUT: u8 = 9;
    pub const SET_FLAGS: u8 = 10;
}

nix::ioctl_write_int_bad!(set_sock, nix::request_code_none!(NBD_IOCTL_TYPE, nr::SET_SOCK));
nix::ioctl_write_int_bad!(set_blksize, nix::request_code_none!(NBD_IOCTL_TYPE, nr::SET_BLKSIZE));
nix::ioctl_write_int_bad!(set_size_blocks, nix::request_code_none!(NBD_IOCTL_TYPE, nr::SET_SIZE_BLOCKS));
nix::ioctl_write_int_bad!(set_timeout, nix::request_code_none!(NBD_IOCTL_TYPE, nr::SET_TIMEOUT));
nix::ioctl_write_int_bad!(set_flags, nix::request_code_none!(NBD_IOCTL_TYPE, nr::SET_FLAGS));
nix::ioctl_none_bad!(do_it, nix::request_code_none!(NBD_IOCTL_TYPE, nr::DO_IT));
nix::ioctl_none_bad!(clear_sock, nix::request_code_none!(NBD_IOCTL_TYPE, nr::CLEAR_SOCK));
nix::ioctl_none_bad!(disconnect, nix::request_code_none!(NBD_IOCTL_TYPE, nr::DISCONNECT));

/// An open /dev/nbdX configured through ioctls.
#[derive(Debug)]
pub struct IoctlDevice {
    file: File,
}

fn int(v: u64, what: &str) -> Result<c_int> {
    c_int::try_from(v).ctx(ErrorKind::InvalidArgument, || format!("{what} {v} does not fit the ioctl argument"))
}

impl IoctlDevice {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .ctx(ErrorKind::Io, || format!("opening {}", path.display()))?;
        Ok(Self { file })
    }

    /// The device's descriptor for the nix ioctl wrappers, which take a raw
    /// one; it stays open as long as `self` (and so the borrow) lives.
    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Block size, size (in blocks), timeout, the server's transmission
    /// flags, then the sockets; NBD_DO_IT is [`IoctlDevice::run`]. The
    /// sockets stay the caller's: the kernel takes its own reference on each.
    pub fn configure(
        &self,
        block_size: u64,
        size: u64,
        timeout_secs: u64,
        flags: u16,
        sockets: &[BorrowedFd<'_>],
    ) -> Result<()> {
        let fd = self.fd();
        let block_size_arg = int(block_size, "block size")?;
        let blocks = int(size / block_size.max(1), "size in blocks")?;
        let timeout = int(timeout_secs, "timeout")?;
        // SAFETY: fd is the NBD device self.file keeps open for the whole call;
        // NBD_SET_BLKSIZE takes its argument by value, no user memory is read.
        unsafe { set_blksize(fd, block_size_arg) }.ctx(ErrorKind::Kernel, || "NBD_SET_BLKSIZE")?;
        // SAFETY: as for NBD_SET_BLKSIZE: an open NBD device, an integer argument.
        unsafe { set_size_blocks(fd, blocks) }.ctx(ErrorKind::Kernel, || "NBD_SET_SIZE_BLOCKS")?;
        // SAFETY: as for NBD_SET_BLKSIZE: an open NBD device, an integer argument.
        unsafe { set_timeout(fd, timeout) }.ctx(ErrorKind::Kernel, || "NBD_SET_TIMEOUT")?;
        // SAFETY: as for NBD_SET_BLKSIZE: an open NBD device, an integer argument.
        unsafe { set_flags(fd, c_int::from(flags)) }.ctx(ErrorKind::Kernel, || "NBD_SET_FLAGS")?;
        for sock in sockets {
            // SAFETY: fd is the open NBD device; the argument is the number of
            // `sock`, a descriptor the borrow keeps open during the call, which
            // the kernel looks up and takes its own reference on (it never
            // closes or reuses ours).
            unsafe { set_sock(fd, sock.as_raw_fd()) }.ctx(ErrorKind::Kernel, || "NBD_SET_SOCK")?;
        }
        Ok(())
    }

    /// NBD_DO_IT: serves the device until it is disconnected. Blocks.
    pub fn run(&self) -> Result<()> {
        // SAFETY: fd is the NBD device self.file keeps open; DO_IT takes no
        // argument and touches no user memory.
        unsafe { do_it(self.fd()) }.map(drop).ctx(ErrorKind::Kernel, || "NBD_DO_IT")
    }

    /// NBD_DISCONNECT then NBD_CLEAR_SOCK (the two ioctls netlink-made devices accept too).
    pub fn disconnect(&self) -> Result<()> {
        // SAFETY: fd is the NBD device self.file keeps open; DISCONNECT takes
        // no argument and touches no user memory.
        unsafe { disconnect(self.fd()) }.ctx(ErrorKind::Kernel, || "NBD_DISCONNECT")?;
        // SAFETY: as for NBD_DISCONNECT: an open NBD device, no argument.
        unsafe { clear_sock(self.fd()) }.map(drop).ctx(ErrorKind::Kernel, || "NBD_CLEAR_SOCK")
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    use nix::errno::Errno;

    use super::*;

    #[test]
    fn request_codes_are_io_0xab_n() {
        // _IO(type, nr) = (type << 8) | nr: no direction, no size.
        assert_eq!(nix::request_code_none!(NBD_IOCTL_TYPE, nr::SET_SOCK), 0xab00);
        assert_eq!(nix::request_code_none!(NBD_IOCTL_TYPE, nr::DO_IT), 0xab03);
        assert_eq!(nix::request_code_none!(NBD_IOCTL_TYPE, nr::SET_FLAGS), 0xab0a);
        let nrs = [
            nr::SET_SOCK,
            nr::SET_BLKSIZE,
            nr::SET_SIZE,
            nr::DO_IT,
            nr::CLEAR_SOCK,
            nr::CLEAR_QUE,
            nr::PRINT_DEBUG,
            nr::SET_SIZE_BLOCKS,
            nr::DISCONNECT,
            nr::SET_TIMEOUT,
            nr::SET_FLAGS,
        ];
        assert_eq!(nrs, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    }

    /// Every argument is checked before the first ioctl, so a bad one leaves
    /// the device as it was instead of half configured. /dev/null stands in
    /// for the device: the kernel answers any NBD ioctl on it with ENOTTY.
    #[test]
    fn bad_arguments_are_refused_before_any_ioctl() {
        let dev = IoctlDevice::open(Path::new("/dev/null")).unwrap();
        let err = dev.configure(4096, 1 << 20, 1 << 40, 0, &[]).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidArgument, "{}", err.chain());

        // Valid arguments and a borrowed socket reach the kernel, which
        // refuses them on a file that is no NBD device.
        let (sock, _peer) = UnixStream::pair().unwrap();
        let err = dev.configure(4096, 1 << 20, 30, 0, &[sock.as_fd()]).unwrap_err();
        assert_eq!((err.kind, err.errno()), (ErrorKind::Kernel, Some(Errno::ENOTTY)), "{}", err.chain());
        // The socket is still ours and open.
        assert!(nix::sys::socket::getsockname::<nix::sys::socket::UnixAddr>(sock.as_raw_fd()).is_ok());
    }

    #[test]
    fn oversized_arguments_are_refused_not_truncated() {
        assert!(int(1 << 40, "x").is_err());
        assert_eq!(int(4096, "x").unwrap(), 4096);
    }
}
