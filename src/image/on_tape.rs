//! Images on a tape (`tape:/dev/nst0`): a set is written in one pass, the
//! directory first, then one tape file per image; an image is restored by
//! spacing to its tape file and reading it once, front to back.

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::create::{create_into, CreateOptions, Created};
use super::restore::Restored;
use super::tape::{self, DirEntry, Directory, SetWriter, St};

/// What `--to`/`--from` named: the drive and an optional image name.
pub fn spec(s: &Path) -> Option<(std::path::PathBuf, Option<String>)> {
    tape::parse_spec(&s.to_string_lossy())
}

/// A set being written: the directory names every image before the first
/// byte of the first one, so `names` is the whole set, in order.
pub struct Writer {
    set: Option<SetWriter<St>>,
    drive: String,
}

impl Writer {
    pub fn start(drive: &Path, record_kib: u32, names: &[(String, String)]) -> Result<Writer> {
        let dir = Directory {
            format: tape::FORMAT,
            created: time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            host: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            record_size: record_kib.saturating_mul(1024),
            files: names
                .iter()
                .enumerate()
                .map(|(i, (name, volume))| DirEntry {
                    file: i as u32 + 1,
                    name: name.clone(),
                    volume: volume.clone(),
                })
                .collect(),
        };
        let st = St::open(drive, true)?;
        Ok(Writer {
            set: Some(SetWriter::create(st, dir)?),
            drive: drive.display().to_string(),
        })
    }

    /// Images the next volume of the set onto its tape file.
    pub fn image(&mut self, o: &CreateOptions) -> Result<Created> {
        if o.parent.is_some() {
            bail!("an incremental image cannot go to tape: a tape is read once, front to back, and the parent would have to be read alongside; write a full image");
        }
        let set = self.set.as_mut().context("the tape set is finished")?;
        let mut file = set.next_file()?;
        let c = create_into(o, Some(&mut file))?;
        file.finish()?;
        Ok(c)
    }

    /// Rewinds; the drive is free for the next command.
    pub fn finish(mut self) -> Result<()> {
        if let Some(set) = self.set.take() {
            set.finish()
                .with_context(|| format!("finishing the tape in {}", self.drive))?;
        }
        Ok(())
    }
}

/// The directory of the tape in `drive`.
pub fn list(drive: &Path) -> Result<Directory> {
    let mut st = St::open(drive, false)?;
    tape::read_directory(&mut st)
}

pub fn directory_text(drive: &Path, d: &Directory) -> String {
    let mut out = format!(
        "tape {}: bmr set written {} on {}, {} KiB records\n",
        drive.display(),
        d.created,
        d.host,
        d.record_size / 1024
    );
    for f in &d.files {
        out.push_str(&format!("tape file {}: {}", f.file, f.name));
        if !f.volume.is_empty() && f.volume != f.name {
            out.push_str(&format!(" (volume {})", f.volume));
        }
        out.push('\n');
    }
    out
}

/// Which tape file holds `name` (or the only image when no name is given).
pub fn find(d: &Directory, name: Option<&str>, drive: &Path) -> Result<DirEntry> {
    let names = || {
        d.files
            .iter()
            .map(|f| f.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match name {
        Some(n) => d
            .files
            .iter()
            .find(|f| f.name == n || f.volume == n || f.file.to_string() == n)
            .cloned()
            .with_context(|| {
                format!(
                    "no image \"{n}\" on the tape in {} (it holds: {})",
                    drive.display(),
                    names()
                )
            }),
        None if d.files.len() == 1 => Ok(d.files[0].clone()),
        None => bail!(
            "the tape in {} holds {} images ({}); name one: tape:{}#NAME",
            drive.display(),
            d.files.len(),
            names(),
            drive.display()
        ),
    }
}

/// Restores one image of the tape onto `target`, reading it once.
pub fn restore(
    drive: &Path,
    name: Option<&str>,
    target: &Path,
    secret: Option<&[u8]>,
    grow: bool,
) -> Result<Restored> {
    let mut st = St::open(drive, false)?;
    let dir = tape::read_directory(&mut st)?;
    let entry = find(&dir, name, drive)?;
    let what = format!(
        "tape {} file {} ({})",
        drive.display(),
        entry.file,
        entry.name
    );
    let reader = tape::open_file(&mut st, dir.record_size, entry.file)?;
    super::stream::restore_stream(reader, &what, target, secret, grow)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> Directory {
        Directory {
            format: 1,
            created: "2026-11-22T00:00:00Z".into(),
            host: "h".into(),
            record_size: 262144,
            files: vec![
                DirEntry {
                    file: 1,
                    name: "root".into(),
                    volume: "root".into(),
                },
                DirEntry {
                    file: 2,
                    name: "h-data-1".into(),
                    volume: "data".into(),
                },
            ],
        }
    }

    #[test]
    fn images_are_found_by_name_volume_or_number() {
        let d = dir();
        let drive = Path::new("/dev/nst0");
        assert_eq!(find(&d, Some("root"), drive).unwrap().file, 1);
        assert_eq!(find(&d, Some("data"), drive).unwrap().file, 2);
        assert_eq!(find(&d, Some("2"), drive).unwrap().name, "h-data-1");
        let e = find(&d, Some("swap"), drive).unwrap_err().to_string();
        assert!(e.contains("root, h-data-1"), "{e}");
        let e = find(&d, None, drive).unwrap_err().to_string();
        assert!(e.contains("tape:/dev/nst0#NAME"), "{e}");
        let text = directory_text(drive, &d);
        assert!(
            text.contains("tape file 2: h-data-1 (volume data)"),
            "{text}"
        );
    }
}
