//! The recovery medium: a small FAT filesystem labelled BMR-STATE holding the
//! manifest, custom drivers and the catalog. Written with the `fatfs` crate so
//! no mtools or kernel vfat driver is needed, read the same way.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::manifest::Manifest;

pub const LABEL: &str = "BMR-STATE";
pub const MANIFEST_PATH: &str = "bmr/manifest.toml";
/// A 3.5" HD floppy: the default, so the medium fits the smallest carrier.
pub const FLOPPY_BYTES: u64 = 1_474_560;
/// What a freshly formatted floppy image can hold, less room for directories.
const FLOPPY_PAYLOAD: u64 = 1_400_000;

/// Files to put on the medium, by path relative to its root.
#[derive(Default)]
pub struct Content {
    pub files: Vec<(String, Vec<u8>)>,
}

impl Content {
    pub fn add(&mut self, path: impl Into<String>, data: Vec<u8>) {
        self.files.push((path.into(), data));
    }

    /// Bytes the files take once rounded up to 4 KiB clusters.
    fn footprint(&self) -> u64 {
        self.files
            .iter()
            .map(|(_, d)| (d.len() as u64).div_ceil(4096) * 4096)
            .sum()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// A new image file of this many bytes.
    Image { bytes: u64, grown: bool },
    /// Files replaced inside an existing FAT filesystem (a USB stick partition).
    Device,
}

/// A read-only view for `fatfs`, which wants Write even to read: any attempt
/// to write fails, so inspecting a medium can never change it.
pub struct ReadOnly(File);

impl Read for ReadOnly {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}
impl Seek for ReadOnly {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.0.seek(pos)
    }
}
impl Write for ReadOnly {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the medium is opened read-only",
        ))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub fn open_fat_readonly(path: &Path) -> Result<fatfs::FileSystem<ReadOnly>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    fatfs::FileSystem::new(ReadOnly(file), fatfs::FsOptions::new())
        .with_context(|| format!("{} holds no FAT filesystem", path.display()))
}

/// Whether `path` starts with a FAT boot sector (cheap check before `fatfs`).
pub fn looks_like_fat(path: &Path) -> bool {
    let mut sector = [0u8; 512];
    let Ok(mut f) = File::open(path) else {
        return false;
    };
    if f.read_exact(&mut sector).is_err() || sector[510..512] != [0x55, 0xAA] {
        return false;
    }
    open_fat_readonly(path).is_ok()
}

/// Reads one file from a medium.
pub fn read_file(medium: &Path, path: &str) -> Result<Vec<u8>> {
    let fs = open_fat_readonly(medium)?;
    let mut file = fs.root_dir().open_file(path).with_context(|| {
        format!(
            "{} has no {path}: is it a bmr recovery medium?",
            medium.display()
        )
    })?;
    let mut data = Vec::new();
    file.read_to_end(&mut data)
        .with_context(|| format!("reading {path} from {}", medium.display()))?;
    Ok(data)
}

/// Every file on a medium, by path, to rewrite it with one file changed.
pub fn read_all(medium: &Path) -> Result<Content> {
    fn walk<T: fatfs::ReadWriteSeek>(
        dir: &fatfs::Dir<'_, T>,
        prefix: &str,
        out: &mut Content,
    ) -> Result<()> {
        for entry in dir.iter() {
            let entry = entry?;
            let name = entry.file_name();
            if name == "." || name == ".." {
                continue;
            }
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}/{name}")
            };
            if entry.is_dir() {
                walk(&entry.to_dir(), &path, out)?;
            } else {
                let mut data = Vec::new();
                entry
                    .to_file()
                    .read_to_end(&mut data)
                    .with_context(|| format!("reading {path}"))?;
                out.add(path, data);
            }
        }
        Ok(())
    }
    let fs = open_fat_readonly(medium)?;
    let mut content = Content::default();
    walk(&fs.root_dir(), "", &mut content)?;
    Ok(content)
}

/// Volume label of a FAT medium, trailing blanks removed.
pub fn label(medium: &Path) -> Result<String> {
    Ok(open_fat_readonly(medium)?
        .volume_label()
        .trim_end()
        .to_string())
}

/// Loads a manifest from a medium (image or device) or from a plain TOML file.
pub fn load_manifest(path: &Path) -> Result<Manifest> {
    let text = if looks_like_fat(path) {
        read_file(path, MANIFEST_PATH)?
    } else {
        fs::read(path).with_context(|| format!("reading {}", path.display()))?
    };
    let text = String::from_utf8(text).map_err(|_| {
        anyhow::anyhow!(
            "{}: the manifest is not UTF-8 text; the medium is damaged",
            path.display()
        )
    })?;
    Manifest::from_toml(&text)
        .with_context(|| format!("loading the manifest from {}", path.display()))
}

/// Writes `content` to `dest`: a new image file (replacing an earlier medium
/// image) or, for a block device, into its existing FAT filesystem.
pub fn write(dest: &Path, content: &Content) -> Result<Written> {
    match fs::metadata(dest) {
        Ok(meta) if meta.file_type().is_block_device() => {
            write_into_device(dest, content)?;
            Ok(Written::Device)
        }
        Ok(meta) if meta.is_file() => {
            if !looks_like_fat(dest) || label(dest).ok().as_deref() != Some(LABEL) {
                bail!(
                    "{} exists and is not a bmr recovery medium (no FAT filesystem labelled {LABEL}); \
                     refusing to overwrite it: remove it or choose another path",
                    dest.display()
                );
            }
            write_image(dest, content)
        }
        Ok(_) => bail!("{} is neither a file nor a block device", dest.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => write_image(dest, content),
        Err(e) => Err(e).with_context(|| format!("checking {}", dest.display())),
    }
}

fn image_size(content: &Content) -> u64 {
    let need = content.footprint();
    if need <= FLOPPY_PAYLOAD {
        FLOPPY_BYTES
    } else {
        // Room for directories and FAT overhead, rounded to whole MiB.
        (need + need / 4 + (1 << 20)).div_ceil(1 << 20) << 20
    }
}

fn format_options(bytes: u64, content: &Content) -> fatfs::FormatVolumeOptions {
    let mut label = [b' '; 11];
    label[..LABEL.len()].copy_from_slice(LABEL.as_bytes());
    // The volume serial is the filesystem's UUID to blkid: derive it from the
    // content so two different media are told apart.
    let mut hasher = blake3::Hasher::new();
    for (path, data) in &content.files {
        hasher.update(path.as_bytes()).update(data);
    }
    let id = hasher.finalize();
    let b = id.as_bytes();
    let serial = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let opts = fatfs::FormatVolumeOptions::new()
        .volume_label(label)
        .volume_id(serial);
    if bytes == FLOPPY_BYTES {
        // The geometry of a real 1.44 MB diskette, so a floppy drive reads it.
        opts.fat_type(fatfs::FatType::Fat12)
            .total_sectors(2880)
            .bytes_per_cluster(512)
            .sectors_per_track(18)
            .heads(2)
            .media(0xF0)
            .max_root_dir_entries(224)
    } else {
        opts
    }
}

fn write_image(dest: &Path, content: &Content) -> Result<Written> {
    let bytes = image_size(content);
    let tmp = temp_path(dest);
    let result = (|| {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .with_context(|| {
                format!(
                    "cannot create the recovery medium next to {}: choose a writable place",
                    dest.display()
                )
            })?;
        file.set_len(bytes)
            .with_context(|| format!("sizing {}", tmp.display()))?;
        let mut file = file;
        fatfs::format_volume(&mut file, format_options(bytes, content))
            .context("formatting the medium")?;
        file.seek(SeekFrom::Start(0))?;
        let fs = fatfs::FileSystem::new(file, fatfs::FsOptions::new())
            .context("opening the new medium")?;
        put_files(&fs, content)?;
        fs.unmount().context("closing the medium")?;
        File::open(&tmp)?.sync_all()?;
        verify(&tmp, content)?;
        fs::rename(&tmp, dest)
            .with_context(|| format!("moving the medium into place at {}", dest.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    Ok(Written::Image {
        bytes,
        grown: bytes > FLOPPY_BYTES,
    })
}

fn temp_path(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.bmr-tmp"))
}

fn write_into_device(dest: &Path, content: &Content) -> Result<()> {
    if crate::probe::mounts::is_mounted(dest)? {
        bail!(
            "{} is mounted; unmount it first so bmr does not write under the kernel's feet",
            dest.display()
        );
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dest)
        .with_context(|| format!("opening {} for writing", dest.display()))?;
    let fs = fatfs::FileSystem::new(file, fatfs::FsOptions::new()).with_context(|| {
        format!("{} holds no FAT filesystem; format it first (mkfs.vfat -n {LABEL}) or give an image path", dest.display())
    })?;
    let stats = fs.stats()?;
    let free = u64::from(stats.free_clusters()) * u64::from(stats.cluster_size());
    let old = dir_bytes(&fs.root_dir(), "bmr").unwrap_or(0);
    if content.footprint() > free + old {
        bail!(
            "{} has {} bytes free but the medium needs {}",
            dest.display(),
            free + old,
            content.footprint()
        );
    }
    remove_tree(&fs.root_dir(), "bmr")?;
    put_files(&fs, content)?;
    fs.unmount().context("closing the medium")?;
    File::open(dest)?.sync_all()?;
    verify(dest, content)
}

fn dir_bytes<T: fatfs::ReadWriteSeek>(root: &fatfs::Dir<'_, T>, path: &str) -> Option<u64> {
    let dir = root.open_dir(path).ok()?;
    let mut total = 0;
    for entry in dir.iter().flatten() {
        let name = entry.file_name();
        if name == "." || name == ".." {
            continue;
        }
        total += if entry.is_dir() {
            dir_bytes(root, &format!("{path}/{name}"))?
        } else {
            entry.len().div_ceil(512) * 512
        };
    }
    Some(total)
}

fn remove_tree<T: fatfs::ReadWriteSeek>(root: &fatfs::Dir<'_, T>, path: &str) -> Result<()> {
    let Ok(dir) = root.open_dir(path) else {
        return Ok(());
    };
    let names: Vec<(String, bool)> = dir
        .iter()
        .flatten()
        .map(|e| (e.file_name(), e.is_dir()))
        .collect();
    for (name, is_dir) in names {
        if name == "." || name == ".." {
            continue;
        }
        let child = format!("{path}/{name}");
        if is_dir {
            remove_tree(root, &child)?;
        } else {
            root.remove(&child)
                .with_context(|| format!("removing old {child}"))?;
        }
    }
    root.remove(path)
        .with_context(|| format!("removing old {path}"))
}

fn put_files<T: fatfs::ReadWriteSeek>(fs: &fatfs::FileSystem<T>, content: &Content) -> Result<()> {
    let root = fs.root_dir();
    for (path, data) in &content.files {
        let mut dir = String::new();
        for part in path
            .split('/')
            .collect::<Vec<_>>()
            .iter()
            .rev()
            .skip(1)
            .rev()
        {
            if !dir.is_empty() {
                dir.push('/');
            }
            dir.push_str(part);
            if root.open_dir(&dir).is_err() {
                root.create_dir(&dir)
                    .with_context(|| format!("creating {dir} on the medium"))?;
            }
        }
        let mut file = root
            .create_file(path)
            .with_context(|| format!("creating {path} on the medium"))?;
        file.truncate()?;
        file.write_all(data)
            .with_context(|| format!("writing {path} to the medium (is it full?)"))?;
        file.flush()?;
    }
    Ok(())
}

/// Reads every file back: a medium is only trusted once it reads back right.
fn verify(medium: &Path, content: &Content) -> Result<()> {
    for (path, data) in &content.files {
        let back = read_file(medium, path)?;
        if &back != data {
            bail!(
                "{path} read back from {} differs from what was written; the medium is bad",
                medium.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content(sizes: &[usize]) -> Content {
        let mut c = Content::default();
        for (i, &n) in sizes.iter().enumerate() {
            c.add(
                format!("bmr/drivers/6.1.0-26-amd64/mod{i}.ko"),
                (0..n).map(|b| (b * 7 + i) as u8).collect(),
            );
        }
        c.add(MANIFEST_PATH, b"[manifest]\nversion = 1\n".to_vec());
        c
    }

    #[test]
    fn floppy_image_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("medium.img");
        let c = content(&[100_000, 3]);
        assert_eq!(
            write(&img, &c).unwrap(),
            Written::Image {
                bytes: FLOPPY_BYTES,
                grown: false
            }
        );
        assert_eq!(fs::metadata(&img).unwrap().len(), FLOPPY_BYTES);
        assert_eq!(label(&img).unwrap(), LABEL);
        for (path, data) in &c.files {
            assert_eq!(&read_file(&img, path).unwrap(), data);
        }
        assert!(!temp_path(&img).exists());
    }

    #[test]
    fn grows_beyond_a_floppy_when_needed() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("medium.img");
        let c = content(&[900_000, 900_000]);
        let Written::Image { bytes, grown } = write(&img, &c).unwrap() else {
            panic!("not an image")
        };
        assert!(
            grown && bytes > FLOPPY_BYTES && bytes % (1 << 20) == 0,
            "{bytes}"
        );
        assert_eq!(
            read_file(&img, "bmr/drivers/6.1.0-26-amd64/mod1.ko").unwrap(),
            c.files[1].1
        );
    }

    #[test]
    fn rewriting_replaces_an_old_medium_but_not_a_stranger() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("medium.img");
        write(&img, &content(&[10])).unwrap();
        write(&img, &content(&[20])).unwrap();
        assert_eq!(
            read_file(&img, "bmr/drivers/6.1.0-26-amd64/mod0.ko")
                .unwrap()
                .len(),
            20
        );

        let other = dir.path().join("precious.txt");
        fs::write(&other, b"not yours").unwrap();
        let err = write(&other, &content(&[1])).unwrap_err().to_string();
        assert!(err.contains("not a bmr recovery medium"), "{err}");
        assert_eq!(fs::read(&other).unwrap(), b"not yours");
    }

    #[test]
    fn read_only_place_is_a_clear_error() {
        let err = write(Path::new("/proc/bmr-medium.img"), &content(&[1])).unwrap_err();
        assert!(
            format!("{err:#}").contains("choose a writable place"),
            "{err:#}"
        );
    }

    #[test]
    fn reading_a_missing_file_says_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("medium.img");
        write(&img, &content(&[1])).unwrap();
        let err = format!("{:#}", read_file(&img, "bmr/nothing").unwrap_err());
        assert!(
            err.contains("bmr/nothing") && err.contains("recovery medium"),
            "{err}"
        );
    }
}
