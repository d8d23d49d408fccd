//! The imaging pipeline: two threads read the volume's chunks in image order
//! (O_DIRECT where the device takes it: no page-cache copy, and the disk
//! reads ahead of the sealing), one sealer per core hashes and compresses,
//! and the caller's thread receives the sealed records back in image order
//! to write them. Buffers come from a fixed pool that returns to the reader
//! only once a record is written, so memory stays bounded however uneven
//! the chunks are to compress.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};

use super::aligned::{direct_ok, AlignedBuf};
use super::format::Record;

/// One chunk read from the volume; `seq` is its place in the image.
pub struct Job {
    pub seq: usize,
    pub offset: u64,
    pub meta: bool,
    pub buf: AlignedBuf,
}

/// The volume being imaged, opened twice: through the page cache, and
/// O_DIRECT when the device or file allows it.
pub struct Source {
    path: PathBuf,
    cached: File,
    direct: Option<File>,
}

impl Source {
    pub fn open(path: &Path) -> Result<Source> {
        let cached =
            File::open(path).with_context(|| format!("opening {} to read it", path.display()))?;
        let direct = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_DIRECT)
            .open(path)
            .ok();
        Ok(Source {
            path: path.to_path_buf(),
            cached,
            direct,
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if let Some(d) = self.direct.as_ref().filter(|_| direct_ok(buf, offset)) {
            match d.read_exact_at(buf, offset) {
                Ok(()) => return Ok(()),
                // Some stacks refuse O_DIRECT only at the first read.
                Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {}
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("reading {} at {offset}", self.path.display()))
                }
            }
        }
        self.cached
            .read_exact_at(buf, offset)
            .with_context(|| format!("reading {} at {offset}", self.path.display()))
    }
}

/// Zeroes the parts of a chunk that no used range covers: free blocks hold
/// nothing worth keeping, and zeros compress to nothing.
pub fn mask(data: &mut [u8], at: u64, used: &[Range<u64>]) {
    let end = at + data.len() as u64;
    let mut pos = at;
    let mut i = used.partition_point(|x| x.end <= at);
    while pos < end {
        let next_used = used.get(i).map_or(end, |r| r.start.max(pos).min(end));
        data[(pos - at) as usize..(next_used - at) as usize].fill(0);
        match used.get(i) {
            Some(r) if r.start < end => {
                pos = r.end.min(end);
                i += 1;
            }
            _ => pos = end,
        }
    }
}

/// The next item of a queue that several workers take from, or None once
/// its senders are gone (or a worker panicked holding it).
pub fn recv_shared<T>(rx: &Mutex<Receiver<T>>) -> Option<T> {
    rx.lock().ok()?.recv().ok()
}

/// Reader threads, each taking every other chunk: two reads in flight keep
/// a disk or a virtual disk busier than one (1 GiB cold: 0.62 s, not 0.73).
const READERS: usize = 2;

/// Reads the chunks at `plan`'s offsets (of `chunk` bytes, shorter at the
/// volume's end), masked to `used`, seals each with `seal` on every core,
/// and hands the records to `emit` in plan order. The first error stops
/// every stage and is returned.
pub fn run(
    source: &Source,
    plan: &[(u64, bool)],
    chunk: u64,
    size: u64,
    used: &[Range<u64>],
    seal: impl Fn(&Job) -> Result<(Record, bool)> + Sync,
    mut emit: impl FnMut(Record, bool) -> Result<()>,
) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    // Each reader has its own buffers: one reader's chunks then never wait
    // for buffers held by the other's later ones, which could not be
    // written before them. At least 16 MiB each lets reading go on through
    // a run of changed chunks, which are slow to seal as deltas (incremental
    // of the bench volume 0.90-1.05 s, was 1.06-1.15 with 6 MiB); with many
    // cores, enough that every sealer has a chunk and the next is read.
    let per_reader = (cores.div_ceil(READERS) + 2).max((16 << 20) / chunk.max(1) as usize);
    let buffers = READERS * per_reader;
    let pools: Vec<_> = (0..READERS)
        .map(|_| {
            let (tx, rx) = sync_channel::<AlignedBuf>(per_reader);
            for _ in 0..per_reader {
                let _ = tx.send(AlignedBuf::new(chunk as usize));
            }
            (tx, rx)
        })
        .collect();
    let (pool_txs, pool_rxs): (Vec<_>, Vec<_>) = pools.into_iter().unzip();
    type Sealed = (usize, Result<(Record, bool)>, AlignedBuf);
    type Read = (usize, Result<Job>);
    let (job_tx, job_rx) = sync_channel::<Read>(buffers);
    let (done_tx, done_rx) = sync_channel::<Sealed>(buffers);
    let job_rx: Arc<Mutex<Receiver<Read>>> = Arc::new(Mutex::new(job_rx));
    let stop = AtomicBool::new(false);
    let stop = &stop;
    let seal = &seal;

    std::thread::scope(|scope| -> Result<()> {
        for (r, pool_rx) in pool_rxs.into_iter().enumerate() {
            let job_tx = job_tx.clone();
            scope.spawn(move || {
                for (seq, &(offset, meta)) in plan.iter().enumerate().skip(r).step_by(READERS) {
                    let Ok(mut buf) = pool_rx.recv() else { return };
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let data = buf.take(chunk.min(size - offset) as usize);
                    let read = source.read_at(data, offset);
                    if read.is_ok() {
                        mask(data, offset, used);
                    }
                    let job = read.map(|()| Job {
                        seq,
                        offset,
                        meta,
                        buf,
                    });
                    let failed = job.is_err();
                    if job_tx.send((seq, job)).is_err() || failed {
                        return;
                    }
                }
            });
        }
        drop(job_tx);
        for _ in 0..cores {
            let (job_rx, done_tx) = (job_rx.clone(), done_tx.clone());
            scope.spawn(move || loop {
                let Some((seq, job)) = recv_shared(&job_rx) else {
                    return;
                };
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let sealed = match job {
                    Ok(job) => {
                        let r = seal(&job);
                        (job.seq, r, job.buf)
                    }
                    // A read error takes the place of the chunk it failed on.
                    Err(e) => (seq, Err(e), AlignedBuf::new(0)),
                };
                if done_tx.send(sealed).is_err() {
                    return;
                }
            });
        }
        drop(job_rx);
        drop(done_tx);

        let mut waiting: BTreeMap<usize, (Result<(Record, bool)>, AlignedBuf)> = BTreeMap::new();
        let mut next = 0;
        let result = (|| -> Result<()> {
            while next < plan.len() {
                let Ok((seq, sealed, buf)) = done_rx.recv() else {
                    bail!("imaging stopped after {next} of {} chunks", plan.len());
                };
                // An error is returned in its turn, so that what was
                // written before it is the same every time.
                waiting.insert(seq, (sealed, buf));
                while let Some((sealed, buf)) = waiting.remove(&next) {
                    let (rec, dedup) = sealed?;
                    emit(rec, dedup)?;
                    let _ = pool_txs[next % READERS].send(buf);
                    next += 1;
                }
            }
            Ok(())
        })();
        // Wind every stage down: each sees the flag or its channel closing.
        stop.store(true, Ordering::Relaxed);
        drop(done_rx);
        drop(pool_txs);
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masking_keeps_only_used_bytes() {
        let mut d = vec![0xFFu8; 16];
        mask(&mut d, 100, &[90..102, 105..107, 114..200]);
        assert_eq!(
            d,
            [255, 255, 0, 0, 0, 255, 255, 0, 0, 0, 0, 0, 0, 0, 255, 255]
        );
        let mut d = vec![1u8; 4];
        mask(&mut d, 0, &[]);
        assert_eq!(d, [0, 0, 0, 0]);
    }

    fn record(offset: u64, data: &[u8]) -> Record {
        Record {
            kind: super::super::format::Kind::Data,
            offset,
            raw_len: data.len() as u32,
            flags: 0,
            id: *blake3::hash(data).as_bytes(),
            payload: data.to_vec(),
        }
    }

    #[test]
    fn records_come_back_in_plan_order_with_the_bytes_read() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let bytes: Vec<u8> = (0..(40 * 4096 + 100)).map(|i| (i % 251) as u8).collect();
        std::io::Write::write_all(&mut f, &bytes).unwrap();
        let src = Source::open(f.path()).unwrap();
        let size = bytes.len() as u64;
        // Out of order on purpose, the short last chunk included.
        let plan: Vec<(u64, bool)> = [40u64, 3, 0, 17, 8, 39, 1]
            .iter()
            .map(|c| (c * 4096, false))
            .collect();
        let mut got = Vec::new();
        run(
            &src,
            &plan,
            4096,
            size,
            std::slice::from_ref(&(0..size)),
            |job| {
                // Uneven work, so sealers finish out of order.
                if job.seq % 2 == 0 {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Ok((record(job.offset, job.buf.bytes()), false))
            },
            |rec, _| {
                got.push(rec);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(got.len(), plan.len());
        for (rec, (off, _)) in got.iter().zip(&plan) {
            assert_eq!(rec.offset, *off);
            let end = (*off + 4096).min(size) as usize;
            assert_eq!(rec.payload, bytes[*off as usize..end]);
        }
    }

    #[test]
    fn an_error_stops_the_pipeline_and_is_returned() {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), vec![7u8; 64 * 4096]).unwrap();
        let src = Source::open(f.path()).unwrap();
        let plan: Vec<(u64, bool)> = (0..64).map(|c| (c * 4096, false)).collect();
        let mut emitted = 0;
        let err = run(
            &src,
            &plan,
            4096,
            64 * 4096,
            std::slice::from_ref(&(0..64 * 4096)),
            |job| {
                if job.seq == 20 {
                    bail!("chunk 20 is bad");
                }
                Ok((record(job.offset, job.buf.bytes()), false))
            },
            |_, _| {
                emitted += 1;
                Ok(())
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("chunk 20"), "{err}");
        assert_eq!(emitted, 20);
        // A read past the end fails the same way, naming the offset.
        let err = run(
            &src,
            &[(1 << 30, false)],
            4096,
            2 << 30,
            &[],
            |_| bail!("x"),
            |_, _| Ok(()),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("at 1073741824"), "{err:#}");
    }
}
