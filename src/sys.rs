//! The only module allowed `unsafe`: thin, audited wrappers over the block
//! device ioctls bmr needs. Each takes a borrowed fd and returns io::Result.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

mod raw {
    // <linux/fs.h>: _IO(0x12, 104), _IO(0x12, 123), _IOR(0x12, 114, size_t)
    use std::os::raw::{c_int, c_uint};
    nix::ioctl_read_bad!(blksszget, nix::request_code_none!(0x12, 104), c_int);
    nix::ioctl_read_bad!(blkpbszget, nix::request_code_none!(0x12, 123), c_uint);
    nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
}

/// Size in bytes of an open block device.
pub fn block_size_bytes(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid.
    unsafe { raw::blkgetsize64(fd.as_raw_fd(), &mut size) }.map_err(io::Error::from)?;
    Ok(size)
}

/// Logical sector size of an open block device.
pub fn logical_sector_size(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut size: std::os::raw::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which is valid.
    unsafe { raw::blksszget(fd.as_raw_fd(), &mut size) }.map_err(io::Error::from)?;
    u32::try_from(size).map_err(|_| io::Error::other("negative sector size"))
}

/// Physical sector size of an open block device.
pub fn physical_sector_size(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut size: std::os::raw::c_uint = 0;
    // SAFETY: BLKPBSZGET writes one unsigned int through the pointer, which is valid.
    unsafe { raw::blkpbszget(fd.as_raw_fd(), &mut size) }.map_err(io::Error::from)?;
    Ok(size)
}

/// Restores the default SIGPIPE action, so `bmr probe | head` ends quietly
/// instead of panicking on a closed stdout (Rust ignores SIGPIPE by default).
pub fn default_sigpipe() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: installing SIG_DFL runs no handler code; nothing else in bmr
    // relies on SIGPIPE being ignored (writes to closed pipes end the process).
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}
