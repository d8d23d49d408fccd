//! A directory repository: images in `images/`, chunk payloads in `chunks/`
//! by id, so identical chunks of several volumes and machines are stored
//! once (seed 002: one image serves many machines).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::format::hex;

/// Where the chunks of repository images (`X` records) live.
pub trait ChunkStore: Sync {
    fn has(&self, id: &[u8; 32]) -> bool;
    /// Stores a payload; false when it was there already.
    fn put(&self, id: &[u8; 32], flags: u8, payload: &[u8]) -> Result<bool>;
    fn get(&self, id: &[u8; 32]) -> Result<(u8, Vec<u8>)>;
}

pub struct DirStore {
    root: PathBuf,
}

impl DirStore {
    /// Opens (and with `create`, makes) a repository at `root`.
    pub fn open(root: &Path, create: bool) -> Result<DirStore> {
        if create {
            fs::create_dir_all(root.join("chunks"))
                .with_context(|| format!("creating repository {}", root.display()))?;
            fs::create_dir_all(root.join("images"))?;
        } else if !root.join("chunks").is_dir() {
            bail!(
                "{} is not a bmr repository (no chunks/ directory)",
                root.display()
            );
        }
        Ok(DirStore {
            root: root.to_path_buf(),
        })
    }

    /// Is `dir` a repository (has chunks/ and images/)?
    pub fn is_repo(dir: &Path) -> bool {
        dir.join("chunks").is_dir() && dir.join("images").is_dir()
    }

    /// The repository an image file in `<repo>/images/` belongs to.
    pub fn of_image(image: &Path) -> Option<DirStore> {
        let repo = image.parent()?.parent()?;
        Self::is_repo(repo).then(|| DirStore {
            root: repo.to_path_buf(),
        })
    }

    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    fn path(&self, id: &[u8; 32]) -> PathBuf {
        let h = hex(id);
        self.root.join("chunks").join(&h[..2]).join(h)
    }
}

impl ChunkStore for DirStore {
    fn has(&self, id: &[u8; 32]) -> bool {
        self.path(id).is_file()
    }

    /// Stores a chunk's payload (first byte: its flags). Written to a temp
    /// name and renamed, so a chunk file is whole or absent.
    fn put(&self, id: &[u8; 32], flags: u8, payload: &[u8]) -> Result<bool> {
        let path = self.path(id);
        if path.is_file() {
            return Ok(false);
        }
        let dir = path.parent().unwrap_or(&self.root);
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // A temp name of its own: two threads sealing the same chunk at once
        // must not share one (the second rename would find it gone).
        let mut f = tempfile::Builder::new()
            .prefix(".chunk")
            .tempfile_in(dir)
            .with_context(|| format!("writing a chunk in {}", dir.display()))?;
        f.write_all(&[flags])?;
        f.write_all(payload)?;
        // As a plain create would have made it, not the temp file's 0600.
        f.as_file()
            .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
        f.as_file().sync_data()?;
        // Same id, same bytes: whichever rename lands last is as good.
        f.persist(&path)
            .map_err(|e| e.error)
            .with_context(|| format!("storing {}", path.display()))?;
        Ok(true)
    }

    fn get(&self, id: &[u8; 32]) -> Result<(u8, Vec<u8>)> {
        let path = self.path(id);
        let mut data = fs::read(&path).with_context(|| {
            format!(
                "chunk {} is missing from the repository {}",
                hex(id),
                self.root.display()
            )
        })?;
        if data.is_empty() {
            bail!("chunk file {} is empty: damaged repository", path.display());
        }
        let flags = data.remove(0);
        Ok((flags, data))
    }
}

/// A repository on disk or on an HTTP server.
pub enum Store {
    Dir(DirStore),
    Http(super::http::HttpStore),
}

impl Store {
    fn inner(&self) -> &dyn ChunkStore {
        match self {
            Store::Dir(d) => d,
            Store::Http(h) => h,
        }
    }
}

impl ChunkStore for Store {
    fn has(&self, id: &[u8; 32]) -> bool {
        self.inner().has(id)
    }
    fn put(&self, id: &[u8; 32], flags: u8, payload: &[u8]) -> Result<bool> {
        self.inner().put(id, flags, payload)
    }
    fn get(&self, id: &[u8; 32]) -> Result<(u8, Vec<u8>)> {
        self.inner().get(id)
    }
}
