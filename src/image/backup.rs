//! `bmr backup`: image every volume the manifest lists into a repository,
//! boot and system volumes first, and record the image names in the manifest
//! on the medium (and a copy next to the images).

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};

use super::create::{self, CreateOptions, Created};
use crate::manifest::Manifest;
use crate::medium;
use crate::probe;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Consistency {
    /// Freeze a mounted filesystem (FIFREEZE) while it is read.
    Freeze,
    /// Read it as it is; writes during the read may leave the image inconsistent.
    None,
}

pub struct BackupOptions {
    pub medium: PathBuf,
    pub to: PathBuf,
    pub secret: Option<Vec<u8>>,
    pub level: i32,
    pub consistency: Option<Consistency>,
    /// Tape record size, for `tape:` destinations.
    pub record_kib: u32,
}

pub struct Done {
    pub volume: String,
    pub device: PathBuf,
    pub created: Created,
    pub how: String,
}

/// The device that now holds each saved volume, found by filesystem UUID.
fn locate(m: &Manifest) -> Result<Vec<(String, PathBuf, Option<PathBuf>)>> {
    let disks: Vec<PathBuf> = m
        .disks
        .iter()
        .map(|d| PathBuf::from(&d.device))
        // A saved name that is now an empty device (a loop device with
        // nothing attached, a card reader) holds nothing of the system.
        .filter(|p| probe::disks::named(p).is_ok())
        .collect();
    let report = probe::probe(&disks)?;
    let mut order: Vec<&crate::manifest::Volume> = m.volumes.iter().collect();
    order.sort_by_key(|v| v.role.rank());
    let mut out = Vec::new();
    for v in order {
        let found: Vec<_> = report
            .disks
            .iter()
            .flat_map(|d| &d.partitions)
            .filter(|p| {
                p.filesystem.as_ref().is_some_and(|f| {
                    !v.uuid.is_empty()
                        && f.uuid.eq_ignore_ascii_case(&v.uuid)
                        && f.filesystem == v.filesystem
                })
            })
            .collect();
        match found.as_slice() {
            [p] => {
                let dev = p.device.clone().ok_or_else(|| anyhow!("volume {} has no device node", v.id))?;
                let mounted = p.filesystem.as_ref().filter(|f| !f.mountpoint.is_empty()).map(|f| PathBuf::from(&f.mountpoint));
                out.push((v.id.clone(), dev, mounted));
            }
            [] => bail!("volume {} ({} {}) is not on the disks of this machine ({}); run bmr save again if the layout changed", v.id, v.filesystem, v.uuid, m.disks.iter().map(|d| d.device.as_str()).collect::<Vec<_>>().join(", ")),
            _ => bail!("volume {} ({}) is found on more than one partition; detach the copy", v.id, v.uuid),
        }
    }
    Ok(out)
}

fn make(
    tape: &mut Option<super::on_tape::Writer>,
    opts: &CreateOptions,
) -> Result<create::Created> {
    match tape.as_mut() {
        Some(t) => t.image(opts),
        None => create::create(opts),
    }
}

/// Runs `f` when dropped.
struct Guard<F: FnMut()>(F);

impl<F: FnMut()> Drop for Guard<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

fn scopeguard<F: FnMut()>(f: F) -> Guard<F> {
    Guard(f)
}

fn same_fs(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    matches!((std::fs::metadata(a), std::fs::metadata(b)), (Ok(x), Ok(y)) if x.dev() == y.dev())
}

pub fn backup(o: &BackupOptions) -> Result<Vec<Done>> {
    let mut m = medium::load_manifest(&o.medium)?;
    let remote = super::http::is_url(&o.to.to_string_lossy());
    let volumes = locate(&m)?;
    // A tape set's directory lists every image before the first is written.
    let mut tape = match super::on_tape::spec(&o.to) {
        Some((drive, _)) => {
            let names: Vec<(String, String)> = volumes
                .iter()
                .map(|(id, _, _)| (id.clone(), id.clone()))
                .collect();
            Some(super::on_tape::Writer::start(&drive, o.record_kib, &names)?)
        }
        None => None,
    };
    if tape.is_none() && !remote {
        std::fs::create_dir_all(&o.to).with_context(|| format!("creating {}", o.to.display()))?;
    }
    let stamp = time::OffsetDateTime::now_utc()
        .format(&time::macros::format_description!(
            "[year][month][day]-[hour][minute][second]"
        ))
        .unwrap_or_default();
    let mut done = Vec::new();
    for (id, dev, mounted) in volumes {
        let name = format!("{}-{id}-{stamp}", m.system.hostname);
        let opts = CreateOptions {
            device: dev.clone(),
            to: o.to.clone(),
            parent: None,
            secret: o.secret.clone(),
            level: o.level,
            chunk_size: create::DEFAULT_CHUNK,
            name: Some(name.clone()),
            watch: None,
        };
        // Freeze what is mounted, unless the images go onto that same
        // filesystem (for an HTTP repository they are staged in $TMPDIR).
        let staging = if remote || tape.is_some() {
            std::env::temp_dir()
        } else {
            o.to.clone()
        };
        let freeze = match (&mounted, o.consistency) {
            (None, _) | (_, Some(Consistency::None)) => None,
            (Some(dir), _) if same_fs(dir, &staging) => {
                if o.consistency == Some(Consistency::Freeze) {
                    bail!("{id} is mounted at {} and the images go onto it: it cannot be frozen while bmr writes there; choose another --to", dir.display());
                }
                None
            }
            (Some(dir), _) => Some(dir.clone()),
        };
        let (created, how) = match &freeze {
            Some(dir) => {
                let f = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
                // Ctrl-C or SIGTERM while frozen would leave the filesystem frozen:
                // hold them until it is thawed, then let them act.
                let signals = nix::sys::signal::SigSet::from_iter([
                    nix::sys::signal::Signal::SIGINT,
                    nix::sys::signal::Signal::SIGTERM,
                    nix::sys::signal::Signal::SIGHUP,
                ]);
                signals.thread_block()?;
                let _unblock = scopeguard(move || {
                    let _ = signals.thread_unblock();
                });
                match crate::sys::freeze_fs(f.as_fd()) {
                    // Not every filesystem can freeze (vfat: an ESP). Unless
                    // freezing was asked for, it is read mounted, watched.
                    Err(e)
                        if o.consistency.is_none()
                            && e.raw_os_error() == Some(nix::libc::EOPNOTSUPP) =>
                    {
                        eprintln!(
                            "warning: {id} ({}) cannot be frozen ({e}); reading it while mounted",
                            dir.display()
                        );
                        let watched = CreateOptions {
                            watch: mounted.clone(),
                            ..opts
                        };
                        let c = make(&mut tape, &watched)?;
                        let how = format!("read while mounted, its filesystem cannot freeze: {} files changed meanwhile, listed in the image", c.exceptions.len());
                        (c, how)
                    }
                    Err(e) => {
                        return Err(e).with_context(|| {
                            format!(
                                "freezing {} (use --consistency none to image it unfrozen)",
                                dir.display()
                            )
                        })
                    }
                    Ok(()) => {
                        let start = Instant::now();
                        let result = make(&mut tape, &opts);
                        let thawed = crate::sys::thaw_fs(f.as_fd());
                        let frozen = start.elapsed().as_secs_f64();
                        thawed.with_context(|| {
                            format!(
                                "thawing {}: run fsfreeze -u {}",
                                dir.display(),
                                dir.display()
                            )
                        })?;
                        (result?, format!("frozen {frozen:.1} s while read"))
                    }
                }
            }
            None if mounted.is_some() => {
                let watched = CreateOptions {
                    watch: mounted.clone(),
                    ..opts
                };
                let c = make(&mut tape, &watched)?;
                let how = format!("read while mounted, not frozen: {} files changed meanwhile, listed in the image", c.exceptions.len());
                (c, how)
            }
            None => (make(&mut tape, &opts)?, "not mounted".to_string()),
        };
        if let Some(v) = m.volumes.iter_mut().find(|v| v.id == id) {
            // Relative to the repository, wherever it is mounted or served
            // later; on tape, by its name in the tape directory.
            v.image = Some(if tape.is_some() {
                format!("tape#{id}")
            } else {
                let name = created
                    .path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                format!("images/{name}")
            });
        }
        done.push(Done {
            volume: id,
            device: dev,
            created,
            how,
        });
    }
    let text = m.to_toml().context("serialising the manifest")?;
    let copy = format!("{}.manifest.toml", m.system.hostname);
    if let Some(t) = tape.take() {
        t.finish()?;
    } else if remote {
        super::http::HttpStore::open(&o.to.to_string_lossy(), false)?
            .put_file(&copy, text.as_bytes())?;
    } else {
        std::fs::write(o.to.join(&copy), &text)
            .context("copying the manifest next to the images")?;
    }
    if medium::looks_like_fat(&o.medium) {
        let mut content = medium::read_all(&o.medium)?;
        content.files.retain(|(p, _)| p != medium::MANIFEST_PATH);
        content
            .files
            .insert(0, (medium::MANIFEST_PATH.to_string(), text.into_bytes()));
        medium::write(&o.medium, &content).context("recording the image names on the medium")?;
    } else {
        std::fs::write(&o.medium, text)
            .with_context(|| format!("updating {}", o.medium.display()))?;
    }
    Ok(done)
}
