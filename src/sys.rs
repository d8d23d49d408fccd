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

mod blk {
    use std::os::raw::{c_int, c_longlong, c_void};

    /// struct blkpg_partition from <linux/blkpg.h>.
    #[repr(C)]
    pub struct BlkpgPartition {
        pub start: c_longlong,
        pub length: c_longlong,
        pub pno: c_int,
        pub devname: [u8; 64],
        pub volname: [u8; 64],
    }

    /// struct blkpg_ioctl_arg from <linux/blkpg.h>.
    #[repr(C)]
    pub struct BlkpgIoctlArg {
        pub op: c_int,
        pub flags: c_int,
        pub datalen: c_int,
        pub data: *mut c_void,
    }

    nix::ioctl_write_ptr_bad!(blkpg, nix::request_code_none!(0x12, 105), BlkpgIoctlArg);
    nix::ioctl_none!(blkrrpart, 0x12, 95);
}

/// Asks the kernel to re-read the partition table (BLKRRPART). Kernels built
/// without partition-table parsers accept it and find nothing.
pub fn reread_partitions(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: BLKRRPART takes no argument.
    unsafe { blk::blkrrpart(fd.as_raw_fd()) }
        .map(drop)
        .map_err(io::Error::from)
}

fn blkpg(fd: BorrowedFd<'_>, op: i32, number: u32, start: u64, length: u64) -> io::Result<()> {
    let mut part = blk::BlkpgPartition {
        start: i64::try_from(start).map_err(|_| io::Error::other("start out of range"))?,
        length: i64::try_from(length).map_err(|_| io::Error::other("length out of range"))?,
        pno: i32::try_from(number)
            .map_err(|_| io::Error::other("partition number out of range"))?,
        devname: [0; 64],
        volname: [0; 64],
    };
    let arg = blk::BlkpgIoctlArg {
        op,
        flags: 0,
        datalen: std::mem::size_of::<blk::BlkpgPartition>() as i32,
        data: std::ptr::addr_of_mut!(part).cast(),
    };
    // SAFETY: arg points to a valid blkpg_partition that outlives the call;
    // the kernel only reads it.
    unsafe { blk::blkpg(fd.as_raw_fd(), &arg) }
        .map(drop)
        .map_err(io::Error::from)
}

/// Tells the kernel about one partition (BLKPG_ADD_PARTITION), as `partx -a` does.
pub fn add_partition(fd: BorrowedFd<'_>, number: u32, start: u64, length: u64) -> io::Result<()> {
    blkpg(fd, 1, number, start, length)
}

/// Makes the kernel forget one partition (BLKPG_DEL_PARTITION).
pub fn delete_partition(fd: BorrowedFd<'_>, number: u32) -> io::Result<()> {
    blkpg(fd, 2, number, 0, 0)
}

mod zero {
    // <linux/fs.h>: BLKZEROOUT _IO(0x12, 127), argument uint64_t[2] {start, length}
    nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);
}

/// Has a block device zero `len` bytes at `offset` itself (BLKZEROOUT: a
/// WRITE ZEROES request where the device takes one, else the kernel writes
/// zero pages). Both must be multiples of the logical sector size.
pub fn zero_out(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    let range = [offset, len];
    // SAFETY: range is a valid [u64; 2] that outlives the call; the kernel
    // only reads it.
    unsafe { zero::blkzeroout(fd.as_raw_fd(), &range) }
        .map(drop)
        .map_err(io::Error::from)
}

/// Starts writing back the dirty pages of `len` bytes at `offset`, without
/// waiting: a long write then reaches the disk as it goes instead of in one
/// flush at the end.
pub fn start_writeback(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Ok(());
    };
    // SAFETY: plain syscall on a valid fd; no memory is passed.
    let r = unsafe {
        nix::libc::sync_file_range(fd.as_raw_fd(), off, n, nix::libc::SYNC_FILE_RANGE_WRITE)
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

mod freeze {
    // <linux/fs.h>: FIFREEZE _IOWR('X', 119, int), FITHAW _IOWR('X', 120, int)
    nix::ioctl_readwrite!(fifreeze, b'X', 119, std::os::raw::c_int);
    nix::ioctl_readwrite!(fithaw, b'X', 120, std::os::raw::c_int);
}

/// Freezes the filesystem mounted at `dir` (an fd of the mount point): writes
/// block until `thaw`, so a read of its device sees one consistent state.
pub fn freeze_fs(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut zero = 0;
    // SAFETY: FIFREEZE ignores its argument; the pointer is valid.
    unsafe { freeze::fifreeze(fd.as_raw_fd(), &mut zero) }
        .map(drop)
        .map_err(io::Error::from)
}

pub fn thaw_fs(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut zero = 0;
    // SAFETY: FITHAW ignores its argument; the pointer is valid.
    unsafe { freeze::fithaw(fd.as_raw_fd(), &mut zero) }
        .map(drop)
        .map_err(io::Error::from)
}

mod fiemap {
    /// struct fiemap with room for one extent (<linux/fiemap.h>).
    #[repr(C)]
    pub struct Fiemap {
        pub start: u64,
        pub length: u64,
        pub flags: u32,
        pub mapped_extents: u32,
        pub extent_count: u32,
        pub reserved: u32,
        pub extent: [u64; 7], // fe_logical, fe_physical, fe_length, 2 reserved, fe_flags+3 reserved (as u64s)
    }
    // FS_IOC_FIEMAP = _IOWR('f', 11, struct fiemap)
    nix::ioctl_readwrite!(fs_ioc_fiemap, b'f', 11, [u8; 32]);
}

/// Where on its device a file's first byte lies (FIEMAP), for reading many
/// files in disk order. None for empty or inline files.
pub fn first_physical(fd: BorrowedFd<'_>) -> io::Result<Option<u64>> {
    let mut map = fiemap::Fiemap {
        start: 0,
        length: u64::MAX,
        flags: 0,
        mapped_extents: 0,
        extent_count: 1,
        reserved: 0,
        extent: [0; 7],
    };
    // SAFETY: the struct is fiemap's 32-byte header followed by room for the
    // one extent requested; the kernel writes at most that much.
    unsafe { fiemap::fs_ioc_fiemap(fd.as_raw_fd(), std::ptr::addr_of_mut!(map).cast()) }
        .map_err(io::Error::from)?;
    Ok((map.mapped_extents > 0).then_some(map.extent[1]))
}

// Magnetic tape through the st driver (<linux/mtio.h>), for image::tape.
// Neither libc nor nix defines these, so they are spelled out here.

/// struct mtop: one MTIOCTOP operation and its count.
#[repr(C)]
pub struct MtOp {
    pub op: std::os::raw::c_short,
    pub count: std::os::raw::c_int,
}

/// struct mtget: what MTIOCGET reports (`long` is 64-bit on x86_64: 48 bytes).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct MtGet {
    pub mt_type: std::os::raw::c_long,
    pub resid: std::os::raw::c_long,
    /// Block size in the low 24 bits, density code above.
    pub dsreg: std::os::raw::c_long,
    /// GMT_* bits.
    pub gstat: std::os::raw::c_long,
    pub erreg: std::os::raw::c_long,
    pub fileno: std::os::raw::c_int,
    pub blkno: std::os::raw::c_int,
}

mod mtio {
    // MTIOCTOP = _IOW('m', 1, struct mtop), MTIOCGET = _IOR('m', 2, struct mtget)
    nix::ioctl_write_ptr!(mtioctop, b'm', 1, super::MtOp);
    nix::ioctl_read!(mtiocget, b'm', 2, super::MtGet);
}

/// mt_op values.
pub const MTFSF: i16 = 1;
pub const MTWEOF: i16 = 5;
pub const MTREW: i16 = 6;
pub const MTSETBLK: i16 = 20;

/// mt_gstat bits.
pub const GMT_BOT: u32 = 0x4000_0000;
pub const GMT_EOT: u32 = 0x2000_0000;
pub const GMT_EOD: u32 = 0x0800_0000;
pub const GMT_WR_PROT: u32 = 0x0400_0000;
pub const GMT_ONLINE: u32 = 0x0100_0000;
pub const GMT_DR_OPEN: u32 = 0x0004_0000;

/// Runs one tape operation (MTIOCTOP), e.g. `tape_op(fd, MTREW, 1)`.
pub fn tape_op(fd: BorrowedFd<'_>, op: i16, count: i32) -> io::Result<()> {
    let arg = MtOp { op, count };
    // SAFETY: MTIOCTOP reads one struct mtop through the pointer, which is valid.
    unsafe { mtio::mtioctop(fd.as_raw_fd(), &arg) }
        .map(drop)
        .map_err(io::Error::from)
}

/// The drive's status (MTIOCGET).
pub fn tape_status(fd: BorrowedFd<'_>) -> io::Result<MtGet> {
    let mut status = MtGet::default();
    // SAFETY: MTIOCGET writes one struct mtget through the pointer, which is valid.
    unsafe { mtio::mtiocget(fd.as_raw_fd(), &mut status) }.map_err(io::Error::from)?;
    Ok(status)
}
