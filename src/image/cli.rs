//! Output of the `bmr image` commands.

use std::process::ExitCode;

use anyhow::Result;
use serde_json::json;

use super::create::{self, CreateOptions};
use super::format::Kind;
use super::read::Image;
use super::{backup, files, mount, on_tape, restore};
use crate::cli::ImageCmd;
use crate::report::size;

/// Where a block device is mounted read-write, if it is.
fn mounted_rw(dev: &std::path::Path) -> Option<std::path::PathBuf> {
    let num = crate::probe::mounts::devnum(dev).ok()?;
    let mounts = crate::probe::mounts::mounts().ok()?;
    let m = crate::probe::mounts::mountpoint_of(&mounts, num)?;
    let ro = nix::sys::statvfs::statvfs(&m.mountpoint)
        .ok()?
        .flags()
        .contains(nix::sys::statvfs::FsFlags::ST_RDONLY);
    (!ro).then(|| m.mountpoint.clone())
}

fn print_restored(from: &std::path::Path, device: &std::path::Path, r: restore::Restored) {
    println!(
        "restored {} onto {}: {} in {:.1} s ({}){}",
        from.display(),
        device.display(),
        size(r.written),
        r.seconds,
        rate(r.written, r.seconds),
        r.grown.map(|g| format!("; {g}")).unwrap_or_default()
    );
}

fn rate(bytes: u64, secs: f64) -> String {
    format!("{}/s", size((bytes as f64 / secs.max(0.001)) as u64))
}

pub fn run(cmd: ImageCmd) -> Result<ExitCode> {
    match cmd {
        ImageCmd::Create {
            device,
            to,
            parent,
            level,
            name,
            chunk_kib,
            record_kib,
            consistency,
            key,
        } => {
            if let Some(k) = chunk_kib {
                if !(64..=65536).contains(&k) || !k.is_power_of_two() {
                    anyhow::bail!("--chunk-kib {k}: give a power of two from 64 to 65536");
                }
            }
            let mounted = mounted_rw(&device);
            let o = CreateOptions {
                device,
                to,
                parent,
                secret: key.secret()?,
                level,
                chunk_size: chunk_kib.map(|k| k * 1024),
                name,
                watch: None,
            };
            let tape = on_tape::spec(&o.to);
            // Where the image is written while the volume is read: a tape
            // or an HTTP upload is staged nowhere on it.
            let written_at = match &tape {
                Some(_) => None,
                None if super::http::is_url(&o.to.to_string_lossy()) => Some(std::env::temp_dir()),
                None => {
                    o.to.ancestors()
                        .find(|p| p.exists())
                        .map(|p| p.to_path_buf())
                }
            };
            let id = o.device.display().to_string();
            let v = backup::Volume {
                id: &id,
                device: &o.device,
                mounted: mounted.as_deref(),
                images_on_it: match (&mounted, &written_at) {
                    (Some(dir), Some(at)) => backup::same_fs(dir, at),
                    _ => false,
                },
            };
            let (c, how) =
                backup::image_volume(&v, consistency, o.clone(), &mut |o| match &tape {
                    Some((drive, named)) => {
                        let name = o.name.clone().or(named.clone()).unwrap_or_else(|| {
                            v.device
                                .file_name()
                                .map(|n| n.to_string_lossy().into_owned())
                                .unwrap_or_else(|| "volume".into())
                        });
                        let mut w = on_tape::Writer::start(
                            drive,
                            record_kib,
                            &[(name.clone(), String::new())],
                        )?;
                        let c = w.image(o)?;
                        w.finish()?;
                        println!("tape {}: file 1 holds image {name}", drive.display());
                        Ok(c)
                    }
                    None => create::create(o),
                })?;
            if mounted.is_some() {
                println!("{}: {how}", o.device.display());
            }
            if let Some(n) = c.uploaded {
                println!("uploaded {n} new chunks; the server had the others");
            }
            println!(
                "image {}: {} used, {} stored ({} chunks: {} stored, {} from the parent, {} already in the repository, {} zero) in {:.1} s ({})",
                c.path.display(),
                size(c.used_bytes),
                size(c.stored_bytes),
                c.chunks,
                c.stored_chunks,
                c.parent_chunks,
                c.deduplicated,
                c.zero_chunks,
                c.seconds,
                rate(c.used_bytes, c.seconds)
            );
        }
        ImageCmd::Restore {
            from,
            device,
            files: by_files,
            no_grow,
            key,
        } => {
            if let Some((drive, name)) = on_tape::spec(&from) {
                if by_files {
                    anyhow::bail!("--files needs random access to the image; a tape is read front to back: restore the image whole, or copy it from the tape to a file first");
                }
                let r = on_tape::restore(
                    &drive,
                    name.as_deref(),
                    &device,
                    key.secret()?.as_deref(),
                    !no_grow,
                )?;
                print_restored(&from, &device, r);
                return Ok(ExitCode::SUCCESS);
            }
            let img = Image::open(&from, key.secret()?.as_deref())?;
            if by_files {
                let copied = files::restore_files(img, &device)?;
                println!(
                    "restored {} file by file onto {} ({} of file data)",
                    from.display(),
                    device.display(),
                    size(copied)
                );
            } else {
                let r = restore::restore(&img, &device, !no_grow)?;
                print_restored(&from, &device, r);
            }
        }
        ImageCmd::Info {
            image,
            json: as_json,
            key,
        } => {
            if let Some((drive, _)) = on_tape::spec(&image) {
                let d = on_tape::list(&drive)?;
                if as_json {
                    println!("{}", serde_json::to_string_pretty(&d)?);
                } else {
                    print!("{}", on_tape::directory_text(&drive, &d));
                }
                return Ok(ExitCode::SUCCESS);
            }
            let img = Image::open(&image, key.secret()?.as_deref())?;
            let count = |k: Kind| img.entries.iter().filter(|e| e.kind == k).count();
            let h = &img.header;
            let info = json!({
                "image_id": h.image_id,
                "format": h.format,
                "created": h.created,
                "volume": h.volume,
                "used_bytes": h.used_bytes,
                "stored_bytes": img.stored_bytes(),
                "map_source": h.map_source,
                "chunk_size": h.chunk_size,
                "compression": format!("{} level {}", h.compression, h.level),
                "encrypted": h.encryption.is_some(),
                "chunks": {"metadata": count(Kind::Meta), "data": count(Kind::Data), "zero": count(Kind::Zero), "parent": count(Kind::Parent), "repository": count(Kind::External)},
                "parent": h.parent,
                "chain_length": img.chain_len(),
                "exceptions": img.exceptions,
            });
            if as_json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                let v = &h.volume;
                println!(
                    "image {} ({}), made {} by {}",
                    h.image_id,
                    image.display(),
                    h.created,
                    h.tool
                );
                println!(
                    "volume: {} uuid {} label \"{}\", {} ({}-byte blocks)",
                    v.filesystem,
                    v.uuid,
                    v.label,
                    size(v.size_bytes),
                    v.block_size
                );
                println!(
                    "used {} (from {}), stored here {}",
                    size(h.used_bytes),
                    h.map_source,
                    size(img.stored_bytes())
                );
                println!(
                    "chunks of {}: {}",
                    size(u64::from(h.chunk_size)),
                    info["chunks"]
                );
                println!(
                    "{}, {}",
                    info["compression"].as_str().unwrap_or_default(),
                    if h.encryption.is_some() {
                        "encrypted (XChaCha20-Poly1305, Argon2id)"
                    } else {
                        "not encrypted"
                    }
                );
                if !img.exceptions.is_empty() {
                    println!(
                        "{} files changed while the volume was read (may be inconsistent): {}",
                        img.exceptions.len(),
                        img.exceptions
                            .iter()
                            .take(10)
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
                if let Some(p) = &h.parent {
                    println!(
                        "incremental on {} ({}); chain of {} images",
                        p.image_id,
                        p.file,
                        img.chain_len()
                    );
                }
            }
        }
        ImageCmd::Mount { image, dir, key } => {
            // Ctrl-C and SIGTERM are taken by a waiting thread, so they unmount cleanly.
            let signals = nix::sys::signal::SigSet::from_iter([
                nix::sys::signal::Signal::SIGINT,
                nix::sys::signal::Signal::SIGTERM,
            ]);
            signals.thread_block()?;
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let flag = stop.clone();
            std::thread::spawn(move || {
                let _ = signals.wait();
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
            });
            let img = Image::open(&image, key.secret()?.as_deref())?;
            let m = mount::mount(img, &dir)?;
            println!(
                "{} mounted read-only at {}; Ctrl-C or `umount {}` ends it",
                image.display(),
                dir.display(),
                dir.display()
            );
            let dev = crate::probe::mounts::mounts()?
                .into_iter()
                .find(|x| x.mountpoint == std::fs::canonicalize(&dir).unwrap_or(dir.clone()))
                .map(|x| (x.major, x.minor));
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(300));
                let still = crate::probe::mounts::mounts()?
                    .iter()
                    .any(|x| Some((x.major, x.minor)) == dev && x.mountpoint == m.dir);
                if !still {
                    break;
                }
            }
            drop(m);
        }
        ImageCmd::Ls { image, path, key } => {
            let img = Image::open(&image, key.secret()?.as_deref())?;
            let dir = tempfile::tempdir()?;
            let m = mount::mount(img, &dir.path().join("root"))?;
            let start = path.unwrap_or_else(|| "/".into());
            let rel = start.strip_prefix("/").unwrap_or(&start).to_path_buf();
            let out = std::process::Command::new("find")
                .arg(if rel.as_os_str().is_empty() {
                    std::path::PathBuf::from(".")
                } else {
                    rel
                })
                .args(["-printf", "%M %10s %TY-%Tm-%Td %TH:%TM  /%P%l\\n"])
                .current_dir(&m.dir)
                .output()?;
            print!("{}", String::from_utf8_lossy(&out.stdout));
            drop(m);
        }
        ImageCmd::Extract {
            image,
            paths,
            to,
            key,
        } => {
            let img = Image::open(&image, key.secret()?.as_deref())?;
            let dir = tempfile::tempdir()?;
            let m = mount::mount(img, &dir.path().join("root"))?;
            let n = mount::extract(&m.dir, &paths, &to)?;
            drop(m);
            println!("extracted {n} entries into {}", to.display());
        }
        ImageCmd::Verify { image, key } => {
            let img = Image::open(&image, key.secret()?.as_deref())?;
            let n = restore::verify(&img)?;
            println!(
                "{}: all {n} chunks match their hashes (chain of {} images)",
                image.display(),
                img.chain_len()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
