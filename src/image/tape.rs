//! Images on tape: a SCSI tape through Linux's st driver (`/dev/nst0`, the
//! non-rewinding node, so the position survives between operations).
//!
//! A bmr tape holds one backup set:
//!
//! ```text
//! tape file 0   the directory: "BMR-TAPE-DIRECTORY\n" + JSON, zero-padded, 512-byte records
//! file mark
//! tape file 1   the first image in fixed records of `record_size` (default 256 KiB),
//! file mark     its last record zero-padded
//! tape file 2   the next image, and so on in the directory's order
//! ```
//!
//! Fixed-size records: every write is one whole record, so the drive keeps
//! streaming and st can hand an aligned buffer straight to it (direct I/O).
//! The directory has its own small record size because a reader has to read
//! it before it knows the images' record size, and a fixed-block read of a
//! record of another size fails; 512 bytes is the fixed size drives accept.

// Nothing outside this module uses it until tape destinations and sources are
// wired into `image create` / restore; remove this then.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use nix::libc;
use serde::{Deserialize, Serialize};

use crate::sys;

pub const DEFAULT_RECORD: usize = 256 * 1024;
/// Record sizes are whole 512-byte units up to the largest that fits the
/// 24-bit block length of SCSI tape commands (st's MTSETBLK masks the rest).
pub const MIN_RECORD: u32 = 512;
pub const MAX_RECORD: u32 = 16 * 1024 * 1024 - 512;
/// The directory's format; a reader refuses others.
pub const FORMAT: u32 = 1;
const DIR_RECORD: u32 = 512;
const DIR_MAGIC: &[u8] = b"BMR-TAPE-DIRECTORY\n";
/// A first tape file larger than this is not a bmr directory (an entry is
/// about 100 bytes).
const DIR_MAX: usize = 4 << 20;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    pub online: bool,
    pub write_protected: bool,
    pub bot: bool,
    pub eod: bool,
    pub door_open: bool,
    pub file_no: i32,
    pub block_no: i32,
    pub block_size: u32,
}

/// One tape drive, real (`St`) or emulated (`MemTape`, cfg(test) only).
pub trait TapeDev: Send {
    fn status(&mut self) -> io::Result<Status>;
    fn rewind(&mut self) -> io::Result<()>;
    /// Forward space `n` file marks (positions after the n-th mark).
    fn forward_files(&mut self, n: u32) -> io::Result<()>;
    /// Fixed block (record) size; Err(EINVAL) when the drive refuses it.
    fn set_record_size(&mut self, bytes: u32) -> io::Result<()>;
    /// Writes exactly one record of the set size.
    fn write_record(&mut self, data: &[u8]) -> io::Result<()>;
    fn write_filemark(&mut self) -> io::Result<()>;
    /// Reads one record into buf (len = record size); Ok(0) at a file mark (the position is then after it).
    fn read_record(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// How messages name the drive, e.g. "/dev/nst0".
    fn name(&self) -> String {
        "the tape drive".to_string()
    }
}

/// Lets a caller lend a drive (`SetWriter::create(&mut st, ..)`) and keep it.
impl<T: TapeDev + ?Sized> TapeDev for &mut T {
    fn status(&mut self) -> io::Result<Status> {
        (**self).status()
    }
    fn rewind(&mut self) -> io::Result<()> {
        (**self).rewind()
    }
    fn forward_files(&mut self, n: u32) -> io::Result<()> {
        (**self).forward_files(n)
    }
    fn set_record_size(&mut self, bytes: u32) -> io::Result<()> {
        (**self).set_record_size(bytes)
    }
    fn write_record(&mut self, data: &[u8]) -> io::Result<()> {
        (**self).write_record(data)
    }
    fn write_filemark(&mut self) -> io::Result<()> {
        (**self).write_filemark()
    }
    fn read_record(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (**self).read_record(buf)
    }
    fn name(&self) -> String {
        (**self).name()
    }
}

/// `tape:/dev/nst0` or `tape:/dev/nst0#root` -> (device, image name).
pub fn parse_spec(s: &str) -> Option<(PathBuf, Option<String>)> {
    let rest = s.strip_prefix("tape:")?;
    let (path, name) = match rest.rsplit_once('#') {
        Some((path, name)) => (path, (!name.is_empty()).then(|| name.to_string())),
        None => (rest, None),
    };
    Some((PathBuf::from(path), name))
}

/// Record sizes bmr writes and reads.
pub fn check_record_size(bytes: u32) -> Result<()> {
    if !(MIN_RECORD..=MAX_RECORD).contains(&bytes) || bytes % 512 != 0 {
        bail!(
            "a tape record of {bytes} bytes is not possible: records are a multiple of 512 bytes \
             from 512 bytes to just under 16 MiB (--record-kib 1 to 16383)"
        );
    }
    Ok(())
}

/// The tape directory, tape file 0: which image is in which tape file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Directory {
    /// `FORMAT` (1).
    pub format: u32,
    pub created: String,
    pub host: String,
    pub record_size: u32,
    pub files: Vec<DirEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    /// Tape file number, 1..
    pub file: u32,
    /// Image name, e.g. "root".
    pub name: String,
    /// Manifest volume id, may be empty.
    pub volume: String,
}

// ---- errors a person can act on ----

fn no_tape(name: &str) -> String {
    format!("no tape in {name} (or it is still loading); insert a tape and retry")
}

fn write_protected(name: &str) -> String {
    format!(
        "the tape in {name} is write-protected; slide its write-protect tab or use another tape"
    )
}

/// What an errno from the drive means; `doing` says what failed otherwise.
fn explain(name: &str, doing: &str, e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOMEDIUM) => no_tape(name),
        Some(libc::EROFS | libc::EACCES) => write_protected(name),
        Some(libc::EBUSY) => format!("{name} is in use by another program"),
        _ => format!("{doing} on {name}: {e}"),
    }
}

fn io_err(name: &str, doing: &str, e: io::Error) -> anyhow::Error {
    anyhow!(explain(name, doing, &e))
}

fn is_full(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSPC)
}

fn full(name: &str, file: u32, what: &str, bytes: u64) -> String {
    format!(
        "the tape in {name} is full: tape file {file} ({what}) ended after {bytes} bytes; \
         use a larger tape or put fewer images on it"
    )
}

/// The drive's status, failing clearly when it holds no tape.
fn loaded<D: TapeDev>(dev: &mut D, name: &str) -> Result<Status> {
    let status = dev
        .status()
        .map_err(|e| io_err(name, "reading the drive status", e))?;
    if !status.online || status.door_open {
        bail!(no_tape(name));
    }
    Ok(status)
}

/// Sets the record size; `hint` says what to do when the drive refuses it.
fn set_size<D: TapeDev>(dev: &mut D, name: &str, bytes: u32, hint: &str) -> Result<()> {
    dev.set_record_size(bytes).map_err(|e| {
        if e.raw_os_error() == Some(libc::EINVAL) {
            anyhow!("{name} refuses tape records of {bytes} bytes; {hint}")
        } else {
            io_err(name, &format!("setting {bytes}-byte records"), e)
        }
    })
}

fn data_hint(bytes: u32) -> String {
    let example = if bytes == 64 * 1024 { 32 } else { 64 };
    format!("choose a record size it accepts with --record-kib, e.g. --record-kib {example}")
}

const DIR_HINT: &str =
    "bmr writes its tape directory in 512-byte records, so it cannot use this drive";

/// A record buffer aligned to 4 KiB: st moves an aligned user buffer to the
/// drive directly and copies an unaligned one through its own buffer.
struct RecordBuf {
    mem: Vec<u8>,
    start: usize,
    len: usize,
}

impl RecordBuf {
    const ALIGN: usize = 4096;

    fn new(len: usize) -> RecordBuf {
        let mem = vec![0; len + Self::ALIGN];
        let start = (Self::ALIGN - mem.as_ptr() as usize % Self::ALIGN) % Self::ALIGN;
        RecordBuf { mem, start, len }
    }
    fn get(&self) -> &[u8] {
        &self.mem[self.start..self.start + self.len]
    }
    fn get_mut(&mut self) -> &mut [u8] {
        &mut self.mem[self.start..self.start + self.len]
    }
}

// ---- writing ----

/// Writing a tape set: directory first, then one tape file per image.
pub struct SetWriter<D: TapeDev> {
    dev: D,
    name: String,
    dir: Directory,
    /// Index in `dir.files` of the next image to write.
    next: usize,
    /// A tape file was begun and has no file mark yet.
    open: bool,
    rec: RecordBuf,
}

impl<D: TapeDev> SetWriter<D> {
    /// Checks status (no tape, write protected -> clear errors), rewinds, sets the record size
    /// (refusal -> clear error naming the size and suggesting --record-kib), writes the directory
    /// as tape file 0 (JSON, padded to whole records) and its file mark.
    pub fn create(mut dev: D, dir: Directory) -> Result<SetWriter<D>> {
        let name = dev.name();
        check_record_size(dir.record_size)?;
        if dir.format != FORMAT {
            bail!("tape directory format {} is not {FORMAT}", dir.format);
        }
        // Readers find an image by its tape file number; images go in order.
        for (i, entry) in dir.files.iter().enumerate() {
            if entry.file as usize != i + 1 {
                bail!(
                    "tape directory entry {} ({}) is tape file {}; entries must be tape files 1, 2, ... in order",
                    i + 1,
                    entry.name,
                    entry.file
                );
            }
        }
        if loaded(&mut dev, &name)?.write_protected {
            bail!(write_protected(&name));
        }
        dev.rewind().map_err(|e| io_err(&name, "rewinding", e))?;
        // The images' record size first, so a refusal comes before anything is written.
        let hint = data_hint(dir.record_size);
        set_size(&mut dev, &name, dir.record_size, &hint)?;
        set_size(&mut dev, &name, DIR_RECORD, DIR_HINT)?;

        let mut bytes = DIR_MAGIC.to_vec();
        serde_json::to_writer_pretty(&mut bytes, &dir)?;
        bytes.push(b'\n');
        let mut rec = RecordBuf::new(DIR_RECORD as usize);
        let mut done = 0u64;
        let failed = |e: io::Error, done: u64| {
            if is_full(&e) {
                anyhow!(full(&name, 0, "the tape directory", done))
            } else {
                io_err(&name, "writing the tape directory", e)
            }
        };
        for chunk in bytes.chunks(DIR_RECORD as usize) {
            let r = rec.get_mut();
            r[..chunk.len()].copy_from_slice(chunk);
            r[chunk.len()..].fill(0);
            dev.write_record(rec.get()).map_err(|e| failed(e, done))?;
            done += u64::from(DIR_RECORD);
        }
        dev.write_filemark().map_err(|e| failed(e, done))?;
        set_size(&mut dev, &name, dir.record_size, &hint)?;

        let rec = RecordBuf::new(dir.record_size as usize);
        Ok(SetWriter {
            dev,
            name,
            dir,
            next: 0,
            open: false,
            rec,
        })
    }

    /// A writer for the next tape file (the directory's next entry, in order). It buffers into
    /// whole records; `FileWriter::finish()` pads the last record with zeros, writes the file mark
    /// and returns the bytes written (unpadded). ENOSPC/end of medium anywhere -> an error that says
    /// the tape is full, after how many bytes, in which tape file.
    pub fn next_file(&mut self) -> Result<FileWriter<'_, D>> {
        self.check_closed()?;
        let Some(entry) = self.dir.files.get(self.next).cloned() else {
            bail!(
                "all {} images of the tape directory are written",
                self.dir.files.len()
            );
        };
        self.next += 1;
        self.open = true;
        Ok(FileWriter {
            set: self,
            entry,
            filled: 0,
            accepted: 0,
            on_tape: 0,
            failed: false,
        })
    }

    /// After the last file: rewinds and returns the device.
    pub fn finish(mut self) -> Result<D> {
        self.check_closed()?;
        if self.next < self.dir.files.len() {
            bail!(
                "the tape directory on {} lists {} images but only {} were written",
                self.name,
                self.dir.files.len(),
                self.next
            );
        }
        self.dev
            .rewind()
            .map_err(|e| io_err(&self.name, "rewinding", e))?;
        Ok(self.dev)
    }

    fn check_closed(&self) -> Result<()> {
        if self.open {
            bail!(
                "tape file {} on {} was not finished (no file mark); the set cannot go on",
                self.next,
                self.name
            );
        }
        Ok(())
    }
}

/// One image being written as one tape file.
pub struct FileWriter<'a, D: TapeDev> {
    set: &'a mut SetWriter<D>,
    entry: DirEntry,
    /// Bytes waiting in `set.rec`.
    filled: usize,
    /// Bytes taken from the caller.
    accepted: u64,
    /// Bytes in records the drive took.
    on_tape: u64,
    /// After an error the file has a hole; nothing more may go after it.
    failed: bool,
}

impl<D: TapeDev> FileWriter<'_, D> {
    /// Pads the last record with zeros, writes the file mark and returns the
    /// image's size (unpadded).
    pub fn finish(mut self) -> Result<u64> {
        if self.failed {
            bail!(self.abandoned());
        }
        if self.filled > 0 {
            self.set.rec.get_mut()[self.filled..].fill(0);
            self.write_record()?;
        }
        if let Err(e) = self.set.dev.write_filemark() {
            return Err(self.error(e).into());
        }
        self.set.open = false;
        Ok(self.accepted)
    }

    fn write_record(&mut self) -> io::Result<()> {
        match self.set.dev.write_record(self.set.rec.get()) {
            Ok(()) => {
                self.on_tape += self.set.rec.len as u64;
                self.filled = 0;
                Ok(())
            }
            Err(e) => {
                self.failed = true;
                Err(self.error(e))
            }
        }
    }

    fn error(&self, e: io::Error) -> io::Error {
        let file = self.entry.file;
        if is_full(&e) {
            let what = format!("image {}", self.entry.name);
            let msg = full(&self.set.name, file, &what, self.on_tape);
            io::Error::new(io::ErrorKind::StorageFull, msg)
        } else {
            let msg = explain(&self.set.name, &format!("writing tape file {file}"), &e);
            io::Error::new(e.kind(), msg)
        }
    }

    fn abandoned(&self) -> String {
        format!(
            "tape file {} on {} is incomplete after an earlier error",
            self.entry.file, self.set.name
        )
    }
}

impl<D: TapeDev> Write for FileWriter<'_, D> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.failed {
            return Err(io::Error::other(self.abandoned()));
        }
        let room = self.set.rec.len - self.filled;
        let n = room.min(data.len());
        self.set.rec.get_mut()[self.filled..self.filled + n].copy_from_slice(&data[..n]);
        self.filled += n;
        self.accepted += n as u64;
        if self.filled == self.set.rec.len {
            self.write_record()?;
        }
        Ok(n)
    }

    /// A partial record cannot go to tape before `finish` (records are fixed-size).
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

// ---- reading ----

/// Reading: rewinds, reads and returns the directory (a tape that does not start with a bmr
/// directory -> clear error: "not a bmr tape" / blank tape).
pub fn read_directory<D: TapeDev>(dev: &mut D) -> Result<Directory> {
    let name = dev.name();
    loaded(dev, &name)?;
    dev.rewind().map_err(|e| io_err(&name, "rewinding", e))?;
    set_size(dev, &name, DIR_RECORD, DIR_HINT)?;
    let not_ours = |why: &str| {
        anyhow!("the tape in {name} is not a bmr tape ({why}); it is blank or was written by another program")
    };
    let mut rec = RecordBuf::new(DIR_RECORD as usize);
    let mut bytes = Vec::new();
    loop {
        let n = match dev.read_record(rec.get_mut()) {
            Ok(n) => n,
            // Blank tape (blank check) or a first record of another size.
            Err(e) if bytes.is_empty() && e.raw_os_error() == Some(libc::EIO) => {
                return Err(not_ours(&format!(
                    "its first record cannot be read as a bmr directory: {e}"
                )));
            }
            Err(e) => return Err(io_err(&name, "reading the tape directory", e)),
        };
        if n == 0 {
            break;
        }
        if bytes.is_empty() && !rec.get()[..n].starts_with(DIR_MAGIC) {
            return Err(not_ours("it does not start with a bmr tape directory"));
        }
        bytes.extend_from_slice(&rec.get()[..n]);
        if bytes.len() > DIR_MAX {
            return Err(not_ours(
                "its first tape file is too large for a bmr directory",
            ));
        }
    }
    if bytes.is_empty() {
        return Err(not_ours("its first tape file is empty"));
    }
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let json = &bytes[DIR_MAGIC.len()..end.max(DIR_MAGIC.len())];
    let dir: Directory = serde_json::from_slice(json)
        .with_context(|| format!("the bmr tape directory on {name} is damaged"))?;
    if dir.format != FORMAT {
        bail!(
            "the tape in {name} has tape directory format {}; this bmr reads format {FORMAT}",
            dir.format
        );
    }
    check_record_size(dir.record_size)
        .with_context(|| format!("the bmr tape directory on {name} is damaged"))?;
    Ok(dir)
}

/// Positions at tape file `file` (rewind + forward space file) and returns a reader of its bytes
/// (impl std::io::Read) that ends (read returns 0) at the file mark. Padding at the end of the last
/// record is returned too (the image format knows its own end).
pub fn open_file<D: TapeDev>(
    dev: &mut D,
    record_size: u32,
    file: u32,
) -> Result<FileReader<'_, D>> {
    let name = dev.name();
    check_record_size(record_size)?;
    if file == 0 {
        bail!("tape file 0 is the bmr tape directory, not an image");
    }
    loaded(dev, &name)?;
    dev.rewind().map_err(|e| io_err(&name, "rewinding", e))?;
    set_size(dev, &name, record_size, &data_hint(record_size))?;
    dev.forward_files(file).map_err(|e| {
        if e.raw_os_error() == Some(libc::EIO) {
            anyhow!("the tape in {name} ends before tape file {file}: {e}")
        } else {
            io_err(&name, &format!("spacing to tape file {file}"), e)
        }
    })?;
    let rec = RecordBuf::new(record_size as usize);
    Ok(FileReader {
        dev,
        name,
        file,
        rec,
        pos: 0,
        len: 0,
        done: false,
    })
}

/// The bytes of one tape file, up to its file mark.
pub struct FileReader<'a, D: TapeDev> {
    dev: &'a mut D,
    name: String,
    file: u32,
    rec: RecordBuf,
    /// Unread bytes of the current record are `rec[pos..len]`.
    pos: usize,
    len: usize,
    /// The file mark was read; the tape is positioned after it.
    done: bool,
}

impl<D: TapeDev> Read for FileReader<'_, D> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        if self.pos == self.len {
            if self.done {
                return Ok(0);
            }
            let n = self.dev.read_record(self.rec.get_mut()).map_err(|e| {
                let msg = explain(&self.name, &format!("reading tape file {}", self.file), &e);
                io::Error::new(e.kind(), msg)
            })?;
            if n == 0 {
                self.done = true;
                return Ok(0);
            }
            (self.pos, self.len) = (0, n);
        }
        let n = (self.len - self.pos).min(out.len());
        out[..n].copy_from_slice(&self.rec.get()[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

// ---- the st driver ----

/// /dev/nstN through the st driver (non-rewinding device node). `open(path, write)`.
pub struct St {
    file: std::fs::File,
    path: PathBuf,
    write: bool,
}

impl St {
    pub fn open(path: &Path, write: bool) -> Result<St> {
        use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
        let shown = path.display();
        if path.as_os_str().is_empty() {
            bail!("no tape device given (e.g. tape:/dev/nst0)");
        }
        // O_NONBLOCK: st then opens a drive with no tape (or one still
        // loading) at once instead of failing or waiting; status() tells.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENOENT) => {
                    anyhow!(
                        "{shown} does not exist: no tape drive there (is the st driver loaded?)"
                    )
                }
                Some(libc::ENXIO | libc::ENODEV) => anyhow!("no tape drive behind {shown}"),
                Some(libc::EBUSY) => anyhow!("{shown} is in use by another program"),
                Some(libc::ENOMEDIUM) => anyhow!(no_tape(&shown.to_string())),
                Some(libc::EROFS) => anyhow!(write_protected(&shown.to_string())),
                _ => anyhow!("opening {shown}: {e}"),
            })?;
        if !file.metadata()?.file_type().is_char_device() {
            bail!("{shown} is not a tape device (use the st driver's /dev/nstN)");
        }
        // Reads and writes wait for the drive as usual.
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        use std::os::fd::AsRawFd;
        let fd = file.as_raw_fd();
        let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
        fcntl(fd, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK))?;
        Ok(St {
            file,
            path: path.to_path_buf(),
            write,
        })
    }

    fn op(&self, op: i16, count: u32) -> io::Result<()> {
        let count = i32::try_from(count).map_err(|_| errno(libc::EINVAL))?;
        sys::tape_op(self.file.as_fd(), op, count)
    }

    fn gstat(&self) -> io::Result<u32> {
        // The GMT_* bits are the low 32 bits of a long.
        Ok(sys::tape_status(self.file.as_fd())?.gstat as u32)
    }

    fn writable(&self) -> io::Result<()> {
        if self.write {
            Ok(())
        } else {
            Err(errno(libc::EBADF))
        }
    }
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// Retries a call the st driver interrupted before moving the tape.
fn retry<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

impl TapeDev for St {
    fn status(&mut self) -> io::Result<Status> {
        let s = sys::tape_status(self.file.as_fd())?;
        let g = s.gstat as u32;
        Ok(Status {
            online: g & sys::GMT_ONLINE != 0,
            write_protected: g & sys::GMT_WR_PROT != 0,
            bot: g & sys::GMT_BOT != 0,
            eod: g & sys::GMT_EOD != 0,
            door_open: g & sys::GMT_DR_OPEN != 0,
            file_no: s.fileno,
            block_no: s.blkno,
            block_size: (s.dsreg & 0xff_ffff) as u32,
        })
    }

    fn rewind(&mut self) -> io::Result<()> {
        self.op(sys::MTREW, 1)
    }

    fn forward_files(&mut self, n: u32) -> io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.op(sys::MTFSF, n)
    }

    fn set_record_size(&mut self, bytes: u32) -> io::Result<()> {
        if bytes > 0xff_ffff {
            return Err(errno(libc::EINVAL));
        }
        match self.op(sys::MTSETBLK, bytes) {
            // st says EINVAL for sizes outside the drive's block limits; the
            // drive's own refusal (MODE SELECT rejected) comes back as EIO.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => Err(errno(libc::EINVAL)),
            r => r,
        }
    }

    fn write_record(&mut self, data: &[u8]) -> io::Result<()> {
        self.writable()?;
        match retry(|| (&self.file).write(data)) {
            Ok(n) if n == data.len() => Ok(()),
            // Only part of the record fit before the end of the medium.
            Ok(_) => Err(errno(libc::ENOSPC)),
            // st reports the end of the medium as ENOSPC, but as EIO when it
            // met it inside data it had buffered; then its status says EOT.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => match self.gstat() {
                Ok(g) if g & sys::GMT_EOT != 0 => Err(errno(libc::ENOSPC)),
                _ => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    fn write_filemark(&mut self) -> io::Result<()> {
        self.writable()?;
        self.op(sys::MTWEOF, 1)
    }

    fn read_record(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        retry(|| (&self.file).read(buf))
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }
}

// ---- an emulated tape for unit tests ----

/// A tape in memory with st's semantics: writing truncates everything after
/// the position, a read at a file mark returns 0 once and moves past it, a
/// read past the last data fails with EIO (blank check).
#[cfg(test)]
#[derive(Debug, Clone)]
pub struct MemTape {
    /// Tape files of records. Every file but the last is followed by a file
    /// mark; the data ends after the last.
    pub files: Vec<Vec<Vec<u8>>>,
    /// Position: before record `record` of tape file `file`.
    pub file: usize,
    pub record: usize,
    pub record_size: u32,
    /// Bytes of records the tape holds; a write beyond is ENOSPC.
    pub capacity: usize,
    /// Largest record size the drive accepts.
    pub max_record: u32,
    pub write_protected: bool,
    pub no_tape: bool,
}

#[cfg(test)]
impl MemTape {
    /// A blank tape.
    pub fn new(capacity: usize) -> MemTape {
        MemTape {
            files: vec![Vec::new()],
            file: 0,
            record: 0,
            record_size: 512,
            capacity,
            max_record: MAX_RECORD,
            write_protected: false,
            no_tape: false,
        }
    }

    fn ready(&self) -> io::Result<()> {
        if self.no_tape {
            Err(errno(libc::ENOMEDIUM))
        } else {
            Ok(())
        }
    }

    fn writable(&self) -> io::Result<()> {
        self.ready()?;
        if self.write_protected {
            return Err(errno(libc::EACCES));
        }
        Ok(())
    }

    /// Writing here makes everything after the position unreadable.
    fn truncate_here(&mut self) {
        self.files.truncate(self.file + 1);
        self.files[self.file].truncate(self.record);
    }
}

#[cfg(test)]
impl TapeDev for MemTape {
    fn status(&mut self) -> io::Result<Status> {
        if self.no_tape {
            return Ok(Status {
                door_open: true,
                file_no: -1,
                block_no: -1,
                ..Status::default()
            });
        }
        let last = self.files.len() - 1;
        Ok(Status {
            online: true,
            write_protected: self.write_protected,
            bot: self.file == 0 && self.record == 0,
            eod: self.file == last && self.record == self.files[last].len(),
            door_open: false,
            file_no: self.file as i32,
            block_no: self.record as i32,
            block_size: self.record_size,
        })
    }

    fn rewind(&mut self) -> io::Result<()> {
        self.ready()?;
        (self.file, self.record) = (0, 0);
        Ok(())
    }

    fn forward_files(&mut self, n: u32) -> io::Result<()> {
        self.ready()?;
        for _ in 0..n {
            if self.file + 1 == self.files.len() {
                return Err(errno(libc::EIO)); // end of data before the mark
            }
            (self.file, self.record) = (self.file + 1, 0);
        }
        Ok(())
    }

    fn set_record_size(&mut self, bytes: u32) -> io::Result<()> {
        self.ready()?;
        if bytes == 0 || bytes > self.max_record {
            return Err(errno(libc::EINVAL));
        }
        self.record_size = bytes;
        Ok(())
    }

    fn write_record(&mut self, data: &[u8]) -> io::Result<()> {
        self.writable()?;
        if data.len() != self.record_size as usize {
            return Err(errno(libc::EINVAL));
        }
        self.truncate_here();
        let used: usize = self.files.iter().flatten().map(Vec::len).sum();
        if used + data.len() > self.capacity {
            return Err(errno(libc::ENOSPC));
        }
        self.files[self.file].push(data.to_vec());
        self.record += 1;
        Ok(())
    }

    fn write_filemark(&mut self) -> io::Result<()> {
        self.writable()?;
        self.truncate_here();
        self.files.push(Vec::new());
        (self.file, self.record) = (self.file + 1, 0);
        Ok(())
    }

    fn read_record(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.ready()?;
        if buf.len() != self.record_size as usize {
            return Err(errno(libc::EINVAL));
        }
        match self.files[self.file].get(self.record) {
            // A record of another size: st reports it and stays before it.
            Some(r) if r.len() != buf.len() => Err(errno(libc::EIO)),
            Some(r) => {
                buf.copy_from_slice(r);
                self.record += 1;
                Ok(buf.len())
            }
            None if self.file + 1 < self.files.len() => {
                (self.file, self.record) = (self.file + 1, 0);
                Ok(0)
            }
            None => Err(errno(libc::EIO)),
        }
    }

    fn name(&self) -> String {
        "memtape".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RS: u32 = 4096;

    fn bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect()
    }

    fn directory(record_size: u32, names: &[&str]) -> Directory {
        Directory {
            format: FORMAT,
            created: "2024-05-01T12:00:00Z".to_string(),
            host: "pc1".to_string(),
            record_size,
            files: names
                .iter()
                .enumerate()
                .map(|(i, n)| DirEntry {
                    file: i as u32 + 1,
                    name: n.to_string(),
                    volume: format!("vol{i}"),
                })
                .collect(),
        }
    }

    /// Writes `images` in odd-sized pieces, as an image writer would.
    fn write_set<D: TapeDev>(dev: D, dir: Directory, images: &[Vec<u8>]) -> Result<D> {
        let mut set = SetWriter::create(dev, dir)?;
        for image in images {
            let mut f = set.next_file()?;
            for piece in image.chunks(777) {
                f.write_all(piece)?;
            }
            assert_eq!(f.finish()?, image.len() as u64);
        }
        set.finish()
    }

    fn three() -> Vec<Vec<u8>> {
        vec![bytes(10_000, 1), Vec::new(), bytes(3 * RS as usize + 1, 3)]
    }

    fn read_all<D: TapeDev>(dev: &mut D, file: u32) -> Vec<u8> {
        let mut out = Vec::new();
        open_file(dev, RS, file)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    /// What a tape file holds: the image and zeros up to a whole record.
    fn padded(image: &[u8]) -> Vec<u8> {
        let mut v = image.to_vec();
        v.resize(image.len().div_ceil(RS as usize) * RS as usize, 0);
        v
    }

    #[test]
    fn tape_set_round_trips() {
        let images = three();
        let dir = directory(RS, &["boot", "empty", "root"]);
        let mut tape = write_set(MemTape::new(1 << 20), dir.clone(), &images).unwrap();
        assert!(tape.status().unwrap().bot, "finish rewinds");
        // Directory, three images, end of data.
        assert_eq!(tape.files.len(), 5);
        assert!(tape.files[0].iter().all(|r| r.len() == DIR_RECORD as usize));
        assert!(tape.files[1].iter().all(|r| r.len() == RS as usize));
        assert!(tape.files[2].is_empty());

        assert_eq!(read_directory(&mut tape).unwrap(), dir);
        for (i, image) in images.iter().enumerate() {
            assert_eq!(
                read_all(&mut tape, i as u32 + 1),
                padded(image),
                "tape file {}",
                i + 1
            );
        }
    }

    #[test]
    fn tape_file_read_directly() {
        let images = three();
        let mut tape = write_set(
            MemTape::new(1 << 20),
            directory(RS, &["a", "b", "c"]),
            &images,
        )
        .unwrap();
        let mut reader = open_file(&mut tape, RS, 3).unwrap();
        let mut first = [0u8; 10];
        reader.read_exact(&mut first).unwrap();
        assert_eq!(first, images[2][..10]);
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).unwrap();
        assert_eq!(rest.len() + 10, padded(&images[2]).len());
        assert_eq!(reader.read(&mut first).unwrap(), 0, "stays at the end");
        drop(reader);
        // The reader consumed the file mark: the tape is at the end of data.
        let status = tape.status().unwrap();
        assert!(status.eod && status.file_no == 4, "{status:?}");

        // The empty image, then one that is not on the tape.
        assert!(read_all(&mut tape, 2).is_empty());
        let err = open_file(&mut tape, RS, 5).err().unwrap();
        assert!(
            format!("{err:#}").contains("ends before tape file 5"),
            "{err:#}"
        );
        assert!(open_file(&mut tape, RS, 0).is_err());
    }

    #[test]
    fn tape_full_names_the_file() {
        let images = vec![bytes(8000, 1), bytes(60_000, 2), bytes(100, 3)];
        let err = write_set(
            MemTape::new(40_000),
            directory(RS, &["boot", "data", "x"]),
            &images,
        )
        .err()
        .unwrap();
        let msg = format!("{err:#}");
        assert!(msg.contains("memtape is full"), "{msg}");
        assert!(
            msg.contains("tape file 2 (image data) ended after"),
            "{msg}"
        );

        // Full at the padded last record: the error comes from finish.
        let mut tape = MemTape::new(2 * 512 + RS as usize);
        let mut set = SetWriter::create(&mut tape, directory(RS, &["a"])).unwrap();
        let mut f = set.next_file().unwrap();
        f.write_all(&bytes(RS as usize + 1, 4)).unwrap();
        let msg = format!("{:#}", f.finish().err().unwrap());
        assert!(
            msg.contains("tape file 1 (image a) ended after 4096 bytes"),
            "{msg}"
        );
    }

    #[test]
    fn tape_write_protected_writes_nothing() {
        let mut tape =
            write_set(MemTape::new(1 << 20), directory(RS, &["a"]), &[bytes(9, 1)]).unwrap();
        let before = tape.files.clone();
        tape.write_protected = true;
        let err = SetWriter::create(&mut tape, directory(RS, &["b"]))
            .err()
            .unwrap();
        assert_eq!(
            format!("{err:#}"),
            "the tape in memtape is write-protected; slide its write-protect tab or use another tape"
        );
        assert_eq!(tape.files, before);
        // Reading a protected tape is fine.
        assert_eq!(read_all(&mut tape, 1), padded(&bytes(9, 1)));
    }

    #[test]
    fn tape_missing() {
        let mut tape = MemTape::new(1 << 20);
        tape.no_tape = true;
        let err = SetWriter::create(&mut tape, directory(RS, &["a"]))
            .err()
            .unwrap();
        assert!(
            format!("{err:#}").starts_with("no tape in memtape"),
            "{err:#}"
        );
        let err = read_directory(&mut tape).err().unwrap();
        assert!(
            format!("{err:#}").starts_with("no tape in memtape"),
            "{err:#}"
        );
        assert!(open_file(&mut tape, RS, 1).is_err());
    }

    #[test]
    fn tape_record_size_refused_or_impossible() {
        let mut tape = MemTape::new(1 << 20);
        tape.max_record = 64 * 1024;
        let err = SetWriter::create(&mut tape, directory(256 * 1024, &["a"]))
            .err()
            .unwrap();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("memtape refuses tape records of 262144 bytes"),
            "{msg}"
        );
        assert!(msg.contains("--record-kib"), "{msg}");
        assert_eq!(tape.files, vec![Vec::<Vec<u8>>::new()], "nothing written");

        for size in [0, 1, 511, 513, 1000, 16 << 20] {
            let err = SetWriter::create(&mut tape, directory(size, &["a"]))
                .err()
                .unwrap();
            assert!(
                format!("{err:#}").contains("multiple of 512"),
                "{size}: {err:#}"
            );
        }
        assert!(check_record_size(MIN_RECORD).is_ok());
        assert!(check_record_size(MAX_RECORD).is_ok());
        assert!(check_record_size(DEFAULT_RECORD as u32).is_ok());
    }

    #[test]
    fn tape_not_bmr() {
        let check = |mut tape: MemTape, why: &str| {
            let msg = format!("{:#}", read_directory(&mut tape).err().unwrap());
            assert!(
                msg.starts_with("the tape in memtape is not a bmr tape"),
                "{msg}"
            );
            assert!(msg.contains(why), "{msg}");
        };
        check(MemTape::new(1 << 20), "first record cannot be read");
        let mut tar = MemTape::new(1 << 20);
        tar.files = vec![vec![vec![b'x'; 10240]], vec![]]; // e.g. tar's 10 KiB records
        check(tar, "first record cannot be read");
        let mut other = MemTape::new(1 << 20);
        other.files = vec![vec![vec![b'x'; 512]], vec![]];
        check(other, "does not start with a bmr tape directory");
        let mut empty = MemTape::new(1 << 20);
        empty.files = vec![vec![], vec![]];
        check(empty, "first tape file is empty");
    }

    #[test]
    fn tape_set_misuse() {
        let mut tape = MemTape::new(1 << 20);
        {
            let mut set = SetWriter::create(&mut tape, directory(RS, &["a", "b"])).unwrap();
            let mut f = set.next_file().unwrap();
            f.write_all(b"half").unwrap();
            drop(f); // never finished: no file mark
            assert!(format!("{:#}", set.next_file().err().unwrap()).contains("not finished"));
        }
        {
            let mut set = SetWriter::create(&mut tape, directory(RS, &["a", "b"])).unwrap();
            set.next_file().unwrap().finish().unwrap();
            let err = set.finish().err().unwrap();
            assert!(
                format!("{err:#}").contains("lists 2 images but only 1"),
                "{err:#}"
            );
        }

        let mut dir = directory(RS, &["a", "b"]);
        dir.files[1].file = 3;
        assert!(SetWriter::create(&mut tape, dir).is_err());
    }

    #[test]
    fn tape_memtape_acts_like_st() {
        let mut t = MemTape::new(1 << 20);
        t.set_record_size(512).unwrap();
        let rec = |b: u8| vec![b; 512];
        t.write_record(&rec(1)).unwrap();
        t.write_filemark().unwrap();
        t.write_record(&rec(2)).unwrap();
        t.write_record(&rec(3)).unwrap();
        t.write_filemark().unwrap();
        t.rewind().unwrap();

        let mut buf = vec![0; 512];
        assert_eq!(t.read_record(&mut buf).unwrap(), 512);
        assert_eq!(buf, rec(1));
        assert_eq!(t.read_record(&mut buf).unwrap(), 0, "file mark");
        assert_eq!(t.read_record(&mut buf).unwrap(), 512, "next file");
        assert_eq!(buf, rec(2));
        // Writing in the middle drops everything after.
        t.write_record(&rec(4)).unwrap();
        t.rewind().unwrap();
        t.forward_files(1).unwrap();
        t.read_record(&mut buf).unwrap();
        t.read_record(&mut buf).unwrap();
        assert_eq!(buf, rec(4));
        assert_eq!(
            t.read_record(&mut buf).unwrap_err().raw_os_error(),
            Some(libc::EIO)
        );
        assert!(t.forward_files(2).is_err());
    }

    #[test]
    fn tape_specs() {
        assert_eq!(
            parse_spec("tape:/dev/nst0"),
            Some((PathBuf::from("/dev/nst0"), None))
        );
        assert_eq!(
            parse_spec("tape:/dev/nst0#root"),
            Some((PathBuf::from("/dev/nst0"), Some("root".to_string())))
        );
        assert_eq!(
            parse_spec("tape:/dev/nst1#"),
            Some((PathBuf::from("/dev/nst1"), None))
        );
        assert_eq!(parse_spec("/srv/images/root.bmr"), None);
        assert_eq!(parse_spec("http://host/tape:x"), None);
    }

    #[test]
    fn tape_st_refuses_non_tapes() {
        let dir = tempfile::tempdir().unwrap();
        let err = St::open(&dir.path().join("nst9"), false).err().unwrap();
        assert!(format!("{err:#}").contains("does not exist"), "{err:#}");
        let file = dir.path().join("plain");
        std::fs::write(&file, b"").unwrap();
        let err = St::open(&file, true).err().unwrap();
        assert!(
            format!("{err:#}").contains("is not a tape device"),
            "{err:#}"
        );
        assert!(St::open(Path::new(""), false).is_err());

        // A character device without the st ioctls: the status ioctl is refused.
        let st = St::open(Path::new("/dev/null"), true).unwrap();
        let err = SetWriter::create(st, directory(RS, &["a"])).err().unwrap();
        assert!(
            format!("{err:#}").contains("reading the drive status on /dev/null"),
            "{err:#}"
        );
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn tape_mtio_abi_matches_linux() {
        use std::mem::size_of;
        assert_eq!(size_of::<sys::MtOp>(), 8);
        assert_eq!(size_of::<sys::MtGet>(), 48);
        assert_eq!(
            nix::request_code_write!(b'm', 1, size_of::<sys::MtOp>()),
            0x4008_6d01
        );
        assert_eq!(
            nix::request_code_read!(b'm', 2, size_of::<sys::MtGet>()),
            0x8030_6d02
        );
    }
}
