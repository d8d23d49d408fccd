//! `bmr backup`: image every volume the manifest lists into a repository,
//! boot and system volumes first, and record the image names in the manifest
//! on the medium (and a copy next to the images).

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};

use super::create::{self, CreateOptions, Created};
use super::snapshot::{self, Snapshot};
use crate::manifest::Manifest;
use crate::medium;
use crate::probe;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Consistency {
    /// Image an LVM snapshot of the volume, removed afterwards.
    Snapshot,
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

pub fn same_fs(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    matches!((std::fs::metadata(a), std::fs::metadata(b)), (Ok(x), Ok(y)) if x.dev() == y.dev())
}

/// Whether bmr's standard output or error is a file on the filesystem
/// mounted at `dir`: a write to it while frozen would wait for the thaw
/// that bmr itself is to do.
fn output_on(dir: &Path) -> Option<&'static str> {
    use std::os::unix::fs::MetadataExt;
    let fs = std::fs::metadata(dir).ok()?.dev();
    [(1, "output"), (2, "error output")]
        .into_iter()
        .find_map(|(fd, what)| {
            let st = nix::sys::stat::fstat(fd).ok()?;
            let file = st.st_mode & nix::libc::S_IFMT == nix::libc::S_IFREG;
            (file && st.st_dev == fs).then_some(what)
        })
}

/// The volume one image is read from, and where it is.
pub struct Volume<'a> {
    /// Its name in messages (the manifest's volume id, or the device).
    pub id: &'a str,
    pub device: &'a Path,
    /// Where it is mounted, if it is.
    pub mounted: Option<&'a Path>,
    /// The image is written onto that mounted filesystem itself: it cannot
    /// be frozen meanwhile.
    pub images_on_it: bool,
}

/// Holds SIGINT, SIGTERM and SIGHUP on this thread until dropped: a frozen
/// filesystem must be thawed and a snapshot removed before bmr ends. A
/// signal that came meanwhile acts when they are let through again.
fn hold_signals() -> Result<Guard<impl FnMut()>> {
    use nix::sys::signal::{SigSet, Signal};
    let signals = SigSet::from_iter([Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP]);
    signals.thread_block()?;
    Ok(scopeguard(move || {
        let _ = signals.thread_unblock();
    }))
}

/// Images one volume as consistently as `consistency` asks, or (None) as
/// the volume allows: from an LVM snapshot, else frozen, else read while
/// mounted with the files changed meanwhile logged. Returns the image and
/// a sentence saying how it was read. `make` writes the image from the
/// options it is given (their device is a snapshot's when one is taken).
pub fn image_volume(
    v: &Volume,
    consistency: Option<Consistency>,
    opts: CreateOptions,
    make: &mut dyn FnMut(&CreateOptions) -> Result<Created>,
) -> Result<(Created, String)> {
    let id = v.id;
    // The volume and, when its name is not the device's, the device.
    let dev = v.device.display().to_string();
    let who = if id == dev {
        dev
    } else {
        format!("{id} ({dev})")
    };
    // Why no snapshot was taken, where one would have been the default.
    let mut no_snapshot = None;
    let try_snapshot = match consistency {
        Some(Consistency::Snapshot) => true,
        // Images written onto the volume itself would fill the snapshot's
        // copy-on-write space with their own bytes.
        None => v.mounted.is_some() && !v.images_on_it,
        Some(_) => false,
    };
    if try_snapshot {
        let lv = snapshot::lv_of(v.device);
        match (lv, consistency) {
            (Ok(Some(lv)), _) => {
                let held = hold_signals()?;
                match Snapshot::create(&lv) {
                    Ok(snap) => {
                        let r = from_snapshot(snap, opts, make);
                        drop(held);
                        return r;
                    }
                    Err(e) if consistency.is_none() => {
                        eprintln!("warning: {id}: no LVM snapshot of {}: {e:#}", lv.label());
                        no_snapshot = Some(format!("the LVM snapshot of {} failed", lv.label()));
                    }
                    Err(e) => {
                        return Err(e.context(format!("{who}: --consistency snapshot failed")))
                    }
                }
            }
            (Ok(None), Some(Consistency::Snapshot)) if v.mounted.is_some() => bail!(
                "{who} is not an LVM logical volume, so bmr cannot snapshot it (a btrfs snapshot \
                 is a subvolume, not a device to image; a device-mapper snapshot of a plain \
                 partition would miss the writes to the partition): use --consistency freeze"
            ),
            (Ok(None), _) => {}
            (Err(e), None) => {
                eprintln!("warning: {id}: {e:#}");
                no_snapshot = Some("no LVM snapshot".to_string());
            }
            (Err(e), _) => return Err(e.context(format!("{who}: --consistency snapshot failed"))),
        }
    }
    let because = no_snapshot.map(|w| format!(" ({w})")).unwrap_or_default();
    let Some(dir) = v.mounted else {
        return Ok((make(&opts)?, "not mounted".to_string()));
    };
    let freeze = match consistency {
        Some(Consistency::None) => false,
        _ if v.images_on_it => {
            if consistency == Some(Consistency::Freeze) {
                bail!("{id} is mounted at {} and the images go onto it: it cannot be frozen while bmr writes there; choose another --to", dir.display());
            }
            false
        }
        _ => match output_on(dir) {
            Some(what) if consistency == Some(Consistency::Freeze) => bail!(
                "{id} is mounted at {} and bmr's {what} is a file on it: bmr would wait on it \
                 frozen; send the {what} elsewhere or use --consistency none",
                dir.display()
            ),
            Some(what) => {
                eprintln!(
                    "warning: {id} is not frozen: bmr's {what} goes to a file on it ({})",
                    dir.display()
                );
                false
            }
            None => true,
        },
    };
    let watched = |opts: CreateOptions| CreateOptions {
        watch: Some(dir.to_path_buf()),
        ..opts
    };
    if !freeze {
        let c = make(&watched(opts))?;
        let how = format!("read while mounted, not frozen{because}: {} files changed meanwhile, listed in the image", c.exceptions.len());
        return Ok((c, how));
    }
    let f = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    let _held = hold_signals()?;
    match crate::sys::freeze_fs(f.as_fd()) {
        // Not every filesystem can freeze (vfat: an ESP). Unless freezing
        // was asked for, it is read mounted, watched.
        Err(e) if consistency.is_none() && e.raw_os_error() == Some(nix::libc::EOPNOTSUPP) => {
            eprintln!(
                "warning: {id} ({}) cannot be frozen ({e}); reading it while mounted",
                dir.display()
            );
            let c = make(&watched(opts))?;
            let how = format!("read while mounted, its filesystem cannot freeze{because}: {} files changed meanwhile, listed in the image", c.exceptions.len());
            Ok((c, how))
        }
        Err(e) => Err(e).with_context(|| {
            format!(
                "freezing {} (use --consistency none to image it unfrozen)",
                dir.display()
            )
        }),
        Ok(()) => {
            let start = Instant::now();
            let result = make(&opts);
            let thawed = crate::sys::thaw_fs(f.as_fd());
            let frozen = start.elapsed().as_secs_f64();
            thawed.with_context(|| {
                format!(
                    "thawing {}: run fsfreeze -u {}",
                    dir.display(),
                    dir.display()
                )
            })?;
            Ok((result?, format!("frozen {frozen:.1} s while read{because}")))
        }
    }
}

/// Images the snapshot in place of its origin (the same filesystem, UUID
/// and label: the image names the origin's volume) and removes it.
fn from_snapshot(
    snap: Snapshot,
    opts: CreateOptions,
    make: &mut dyn FnMut(&CreateOptions) -> Result<Created>,
) -> Result<(Created, String)> {
    let label = snap.label();
    let start = Instant::now();
    let o = CreateOptions {
        device: snap.device.clone(),
        watch: None,
        ..opts
    };
    let result = make(&o);
    let held = start.elapsed().as_secs_f64();
    // An overflowed snapshot reads as I/O errors or, worse, as what it held
    // before: either way its image is refused.
    let used = snap.check();
    let (c, used) = match (result, used) {
        (Ok(c), Err(e)) => {
            // Already written out: an image that looks whole must not stay.
            // Only a file this run wrote is deleted, never a tape device.
            let path = c.path.display();
            let removed = c.is_file && std::fs::remove_file(&c.path).is_ok();
            return Err(if removed {
                e.context(format!("the image read from it, {path}, was removed"))
            } else {
                e.context(format!("the image read from it, {path}, must not be used"))
            });
        }
        (Err(_), Err(e)) => return Err(e),
        (Err(e), Ok(_)) => {
            return Err(e.context(format!("reading the LVM snapshot {label} (it is removed)")))
        }
        (Ok(c), Ok(used)) => (c, used),
    };
    let size = crate::report::size(snap.size);
    let removed = match snap.remove() {
        Ok(()) => "removed".to_string(),
        Err(e) => {
            eprintln!("warning: {e:#}");
            format!("NOT removed: lvremove {label}")
        }
    };
    Ok((
        c,
        format!("from LVM snapshot {label}, {held:.1} s, {used:.0}% of its {size} filled by writes meanwhile ({removed})"),
    ))
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
            chunk_size: None,
            name: Some(name.clone()),
            watch: None,
        };
        // For an HTTP repository or a tape the images are staged in $TMPDIR.
        let staging = if remote || tape.is_some() {
            std::env::temp_dir()
        } else {
            o.to.clone()
        };
        let vol = Volume {
            id: &id,
            device: &dev,
            mounted: mounted.as_deref(),
            images_on_it: mounted.as_deref().is_some_and(|d| same_fs(d, &staging)),
        };
        let (created, how) = image_volume(&vol, o.consistency, opts, &mut |c| make(&mut tape, c))?;
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
