//! Restoring from a sequential medium (a tape): the image is read once,
//! front to back. Each record carries its volume offset, so it is written as
//! it arrives; the index at the end is then checked against every record
//! seen before the first chunk (superblock, boot sector) goes in last.

use std::io::{BufReader, Read};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;

use super::format::{self, Kind, Record};
use super::progress::Progress;
use super::read::{decode, key_for};
use super::restore::{batch_len, finish, open_target, Restored};

/// Restores the image read from `r` onto `dev`. `what` names the source in
/// messages (e.g. `tape /dev/nst0 file 2`).
pub fn restore_stream<R: Read>(
    r: R,
    what: &str,
    dev: &Path,
    secret: Option<&[u8]>,
    grow: bool,
) -> Result<Restored> {
    let mut r = BufReader::with_capacity(4 << 20, r);
    let (header, _) = format::read_header(&mut r).with_context(|| what.to_string())?;
    if header.parent.is_some() {
        bail!(
            "{what} is an incremental image; a sequential medium carries full images only (its parent cannot be read alongside)"
        );
    }
    let key = key_for(&header, secret, what)?;
    let vol = header.volume.clone();
    let out = open_target(dev, &vol)?;
    let mut progress = Progress::new(
        &format!("restoring {} from {what}", dev.display()),
        if header.imaged_bytes > 0 {
            header.imaged_bytes
        } else {
            header.used_bytes
        },
    );
    let result = (|| -> Result<u64> {
        out.zero_start()?;
        let mut seen: Vec<(u64, Kind, [u8; 32])> = Vec::new();
        let mut first: Option<Vec<u8>> = None;
        let mut written = 0u64;
        let batch_len = batch_len(header.chunk_size);
        loop {
            let mut batch: Vec<Record> = Vec::with_capacity(batch_len);
            let mut ended = false;
            while batch.len() < batch_len {
                match format::read_record(&mut r).with_context(|| what.to_string())? {
                    Some(rec) => batch.push(rec),
                    None => {
                        ended = true;
                        break;
                    }
                }
            }
            let decoded: Vec<Result<(u64, Vec<u8>)>> = batch
                .par_iter_mut()
                .map(|rec| {
                    let data = match rec.kind {
                        Kind::Zero => vec![0u8; rec.raw_len as usize],
                        Kind::Meta | Kind::Data => decode(
                            key.as_ref(),
                            rec.raw_len,
                            &rec.id,
                            rec.flags,
                            std::mem::take(&mut rec.payload),
                            &format!("chunk at volume offset {} ({what})", rec.offset),
                        )?,
                        Kind::Parent | Kind::External => bail!(
                            "{what}: the chunk at volume offset {} lives in another image or a repository, which a sequential medium does not carry",
                            rec.offset
                        ),
                    };
                    Ok((rec.offset, data))
                })
                .collect();
            for (rec, d) in batch.iter().zip(decoded) {
                let (offset, data) = d?;
                ensure!(
                    offset
                        .checked_add(data.len() as u64)
                        .is_some_and(|end| end <= vol.size_bytes),
                    "{what}: a record points outside the volume (offset {offset}): damaged"
                );
                seen.push((rec.offset, rec.kind, rec.id));
                written += data.len() as u64;
                progress.add(data.len() as u64);
                if offset == 0 {
                    first = Some(data);
                } else if rec.kind == Kind::Zero {
                    out.zero_range(offset, data.len() as u64)?;
                } else {
                    out.write_at(&data, offset)?;
                }
            }
            if ended {
                break;
            }
        }
        let (index, trailer) =
            format::read_index_stream(&mut r).with_context(|| what.to_string())?;
        let (entries, _) = format::decode_index(&index, vol.size_bytes)?;
        ensure!(
            trailer.records == seen.len() as u64 && entries.len() == seen.len(),
            "{what}: {} records were read but the index lists {}: damaged",
            seen.len(),
            entries.len()
        );
        seen.sort_by_key(|s| s.0);
        for (s, e) in seen.iter().zip(&entries) {
            ensure!(
                *s == (e.offset, e.kind, e.id),
                "{what}: the record at volume offset {} does not match the index: damaged",
                s.0
            );
        }
        if let Some(data) = first {
            out.sync()?;
            out.write_at(&data, 0)?;
        }
        out.sync().context("flushing the restored volume")?;
        Ok(written)
    })();
    finish(result, &out, dev, &vol, grow, &mut progress)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::create::{create, CreateOptions};
    use std::fs;
    use std::process::Command;

    /// A populated ext4 volume in a file, made without mounting (mkfs -d).
    fn volume(dir: &Path) -> std::path::PathBuf {
        let content = dir.join("content");
        fs::create_dir_all(content.join("etc")).unwrap();
        fs::write(content.join("etc/hostname"), b"tape-test\n").unwrap();
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        fs::write(content.join("big.bin"), big).unwrap();
        let vol = dir.join("vol.img");
        fs::File::create(&vol).unwrap().set_len(32 << 20).unwrap();
        let ok = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&content)
            .arg(&vol)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mkfs.ext4 -d");
        vol
    }

    fn image_of(vol: &Path, dir: &Path) -> std::path::PathBuf {
        let img = dir.join("vol.bmri");
        create(&CreateOptions {
            device: vol.to_path_buf(),
            to: img.clone(),
            parent: None,
            secret: None,
            level: 3,
            chunk_size: Some(256 << 10),
            name: None,
            watch: None,
        })
        .unwrap();
        img
    }

    fn blank(dir: &Path, name: &str, len: u64) -> std::path::PathBuf {
        let p = dir.join(name);
        fs::File::create(&p).unwrap().set_len(len).unwrap();
        p
    }

    #[test]
    fn a_stream_restores_the_volume_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let vol = volume(dir.path());
        let img = image_of(&vol, dir.path());
        let target = blank(dir.path(), "target.img", 32 << 20);
        // Padding after the trailer, as the last tape record has.
        let mut bytes = fs::read(&img).unwrap();
        bytes.extend_from_slice(&[0u8; 5000]);
        let r = restore_stream(&bytes[..], "test stream", &target, None, false).unwrap();
        assert!(r.written > 3_000_000);
        assert!(fs::read(&vol).unwrap() == fs::read(&target).unwrap());
    }

    #[test]
    fn a_truncated_or_damaged_stream_leaves_no_mountable_volume() {
        let dir = tempfile::tempdir().unwrap();
        let vol = volume(dir.path());
        let img = image_of(&vol, dir.path());
        let bytes = fs::read(&img).unwrap();
        let target = blank(dir.path(), "target.img", 32 << 20);
        let err =
            restore_stream(&bytes[..bytes.len() - 100], "cut", &target, None, false).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("truncated") && msg.contains("zeroed"), "{msg}");
        let start = &fs::read(&target).unwrap()[..1 << 20];
        assert!(
            start.iter().all(|&b| b == 0),
            "the superblock must not be there"
        );

        // One flipped byte inside a chunk's payload is caught by its hash.
        let mut bad = bytes.clone();
        let at = bad.len() / 2;
        bad[at] ^= 0x55;
        let err = restore_stream(&bad[..], "flipped", &target, None, false).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("damaged") || msg.contains("does not decompress"),
            "{msg}"
        );
    }

    #[test]
    fn a_small_target_is_refused_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let vol = volume(dir.path());
        let img = image_of(&vol, dir.path());
        let target = blank(dir.path(), "small.img", 16 << 20);
        fs::write(&target, vec![7u8; 16 << 20]).unwrap();
        let err =
            restore_stream(&fs::read(&img).unwrap()[..], "s", &target, None, false).unwrap_err();
        assert!(format!("{err:#}").contains("smaller than the filesystem"));
        assert!(fs::read(&target).unwrap().iter().all(|&b| b == 7));
    }
}
