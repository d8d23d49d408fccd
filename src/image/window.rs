//! An image file read front to back in large windows, each holding whole
//! payloads, for a restore: the page cache's copy of buffered reads cost as
//! much as decompressing did, and reading ahead while the chunks of the
//! last window are decoded keeps the decoders fed.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};

use super::aligned::{AlignedBuf, DIRECT_ALIGN};
use super::format::Entry;
use super::read::Image;

/// Large enough that a read is worth an O_DIRECT round trip; a few of them
/// are all the memory a restore's reading takes.
const WINDOW: usize = 8 << 20;

/// A stretch of the image file. Its buffer goes back to the pool when the
/// last chunk decoded from it lets go.
pub struct Window {
    buf: Option<AlignedBuf>,
    start: u64,
    home: SyncSender<AlignedBuf>,
}

impl Window {
    /// The stored bytes of `e`, one of the entries this window was read for.
    pub fn payload(&self, e: &Entry) -> &[u8] {
        let at = (e.pos - self.start) as usize;
        match &self.buf {
            Some(b) => &b.bytes()[at..at + e.stored_len as usize],
            None => &[],
        }
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            let _ = self.home.try_send(b);
        }
    }
}

pub struct Windows<'a> {
    img: &'a Image,
    entries: &'a [&'a Entry],
    next: usize,
    direct: Option<File>,
    pool: Receiver<AlignedBuf>,
    home: SyncSender<AlignedBuf>,
}

impl<'a> Windows<'a> {
    /// `entries` are chunks stored in `img`'s file, sorted by their place
    /// in it; `count` windows are in use at most.
    pub fn new(img: &'a Image, entries: &'a [&'a Entry], count: usize) -> Windows<'a> {
        Windows::sized(img, entries, count, WINDOW)
    }

    fn sized(img: &'a Image, entries: &'a [&'a Entry], count: usize, window: usize) -> Windows<'a> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        // Reopened through /proc: the image may be a download whose path
        // is not the one it was named by.
        let direct = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_DIRECT)
            .open(format!("/proc/self/fd/{}", img.file().as_raw_fd()))
            .ok();
        let largest = entries.iter().map(|e| e.stored_len as usize).max();
        let size = window
            .max(largest.unwrap_or(0) + 2 * DIRECT_ALIGN)
            .next_multiple_of(DIRECT_ALIGN);
        let (home, pool) = sync_channel(count);
        for _ in 0..count {
            let _ = home.send(AlignedBuf::new(size));
        }
        Windows {
            img,
            entries,
            next: 0,
            direct,
            pool,
            home,
        }
    }

    /// The next window and which of the entries it holds; None at the end,
    /// or once `stopped` says so while waiting for a free window.
    pub fn next(
        &mut self,
        stopped: &dyn Fn() -> bool,
    ) -> Option<Result<(Arc<Window>, Range<usize>)>> {
        let first = *self.entries.get(self.next)?;
        let mut buf = loop {
            match self.pool.recv_timeout(Duration::from_millis(100)) {
                Ok(b) => break b,
                Err(RecvTimeoutError::Timeout) if !stopped() => {}
                Err(_) => return None,
            }
        };
        let start = first.pos / DIRECT_ALIGN as u64 * DIRECT_ALIGN as u64;
        let end_of = |e: &Entry| e.pos + u64::from(e.stored_len);
        // Reads are whole aligned blocks, so that is what must fit.
        let room = buf.capacity() / DIRECT_ALIGN * DIRECT_ALIGN;
        let fits =
            |e: &Entry| ((end_of(e) - start) as usize).next_multiple_of(DIRECT_ALIGN) <= room;
        let from = self.next;
        while self
            .entries
            .get(self.next)
            .is_some_and(|e| e.pos >= start && fits(e))
        {
            self.next += 1;
        }
        if self.next == from {
            return Some(Err(anyhow::anyhow!(
                "the chunk at volume offset {} claims {} stored bytes, more than a read window: damaged index",
                first.offset,
                first.stored_len
            )));
        }
        let last = self.entries[self.next - 1];
        let want = ((end_of(last) - start) as usize).next_multiple_of(DIRECT_ALIGN);
        let got = match self.read(buf.take(want), start) {
            Ok(n) => n,
            Err(e) => return Some(Err(e)),
        };
        buf.take(got);
        let held = start + got as u64;
        if let Some(short) = self.entries[from..self.next]
            .iter()
            .find(|e| end_of(e) > held)
        {
            return Some(Err(anyhow::anyhow!(
                "reading the chunk at volume offset {}: {} ends at byte {held}, inside it (truncated?)",
                short.offset,
                self.img.path.display()
            )));
        }
        let win = Window {
            buf: Some(buf),
            start,
            home: self.home.clone(),
        };
        Some(Ok((Arc::new(win), from..self.next)))
    }

    /// Fills `buf` from `pos`, short only at the end of the file. A file
    /// that refuses O_DIRECT is read through the page cache from then on.
    fn read(&mut self, buf: &mut [u8], pos: u64) -> Result<usize> {
        if let Some(d) = &self.direct {
            match read_full(d, buf, pos, true) {
                Ok(n) => return Ok(n),
                Err(err) => {
                    eprintln!(
                        "warning: {}: reading without O_DIRECT ({err})",
                        self.img.path.display()
                    );
                    self.direct = None;
                }
            }
        }
        match read_full(self.img.file(), buf, pos, false) {
            Ok(n) => Ok(n),
            Err(e) => bail!("reading {} at byte {pos}: {e}", self.img.path.display()),
        }
    }
}

fn read_full(f: &File, buf: &mut [u8], pos: u64, direct: bool) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], pos + got as u64) {
            Ok(0) => break,
            Ok(k) => {
                got += k;
                // A direct read short of the alignment is the end of the file.
                if direct && k % DIRECT_ALIGN != 0 {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::create::{create, CreateOptions};

    /// An image of a 3 MiB volume bmr does not know (read whole) in 64 KiB
    /// chunks, half of them compressible, none all-zero.
    fn image(dir: &std::path::Path) -> std::path::PathBuf {
        let vol = dir.join("vol");
        let mut x = 7u64;
        let data: Vec<u8> = (0..3 << 20)
            .map(|i: usize| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                if (i >> 16) % 2 == 0 {
                    b'a' + (x >> 60) as u8
                } else {
                    (x >> 33) as u8
                }
            })
            .collect();
        std::fs::write(&vol, data).unwrap();
        let to = dir.join("vol.bmri");
        create(&CreateOptions {
            device: vol,
            to: to.clone(),
            parent: None,
            secret: None,
            level: 3,
            chunk_size: Some(64 << 10),
            name: None,
            watch: None,
        })
        .unwrap();
        to
    }

    fn stored(img: &Image) -> Vec<&Entry> {
        let mut v: Vec<&Entry> = img
            .entries
            .iter()
            .filter(|e| e.kind.has_payload())
            .collect();
        v.sort_by_key(|e| e.pos);
        v
    }

    #[test]
    fn windows_hold_every_payload_once_in_file_order() {
        let dir = tempfile::tempdir().unwrap();
        let img = Image::open(&image(dir.path()), None).unwrap();
        let entries = stored(&img);
        assert!(entries.len() >= 48, "{} chunks", entries.len());
        // Windows of 128 KiB: each holds a few payloads, many straddle one.
        let mut w = Windows::sized(&img, &entries, 2, 128 << 10);
        let (mut next, mut windows) = (0, 0);
        while let Some(r) = w.next(&|| false) {
            let (win, range) = r.unwrap();
            assert_eq!(range.start, next);
            for e in &entries[range.clone()] {
                assert_eq!(win.payload(e), &img.payload(e).unwrap()[..]);
            }
            next = range.end;
            windows += 1;
        }
        assert_eq!(next, entries.len());
        assert!(windows > 4, "{windows} windows");
    }

    #[test]
    fn a_file_cut_short_names_the_chunk_it_cuts() {
        let dir = tempfile::tempdir().unwrap();
        let path = image(dir.path());
        let img = Image::open(&path, None).unwrap();
        let entries = stored(&img);
        let cut = entries[entries.len() / 2];
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(cut.pos + 10)
            .unwrap();
        let mut w = Windows::sized(&img, &entries, 2, 128 << 10);
        let err = std::iter::from_fn(|| w.next(&|| false))
            .find_map(|r| r.err())
            .expect("an error for the cut chunk");
        let msg = format!("{err:#}");
        assert!(
            msg.contains(&format!("volume offset {}", cut.offset)) && msg.contains("truncated"),
            "{msg}"
        );
    }
}
