//! Every piece of kernel ABI the node plugin touches, and all of its unsafe
//! code: generic netlink (the `nbd` family), the NBD ioctls (fallback only),
//! and mount(2). Everything above this module is safe Rust. Each unsafe block
//! holds one call under its own `// SAFETY:` comment (clippy's
//! `undocumented_unsafe_blocks` and `multiple_unsafe_ops_per_block`, denied
//! for the workspace), and descriptors we lend the kernel are `BorrowedFd`s.
#![allow(unsafe_code)]

pub mod genl;
pub mod ioctl;
pub mod mount;
pub mod nbd;
pub mod nbd_genl;
pub mod netlink;
