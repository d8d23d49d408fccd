//! A repository on a plain HTTP(S) server that stores what is PUT and lists
//! directories as JSON (nginx: WebDAV PUT + `autoindex_format json`). Before
//! uploading, bmr lists which chunks the server has and sends only the others
//! (seed 003). TLS is verified against the system's CA store; credentials in
//! the URL are never printed.

use std::collections::HashSet;
use std::io::Read;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use super::format::hex;
use super::store::ChunkStore;

pub fn is_url(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://")
}

/// The URL with any `user:password@` replaced, for messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(scheme), Some(at)) if at > scheme && !url[scheme + 3..at].contains('/') => {
            format!("{}***@{}", &url[..scheme + 3], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(15))
        .timeout_read(Duration::from_secs(120))
        .build()
}

fn status_error(url: &str, e: ureq::Error) -> anyhow::Error {
    match e {
        ureq::Error::Status(code, r) => {
            anyhow!("{} answered {code} {}", redact(url), r.status_text())
        }
        // Not `{t}`: its Display repeats the URL, credentials included.
        ureq::Error::Transport(t) => {
            // The cause (e.g. rustls's "invalid peer certificate: UnknownIssuer")
            // is what tells the operator to fix trust, not the network.
            let mut causes = Vec::new();
            let mut next = std::error::Error::source(&t);
            while let Some(c) = next {
                causes.push(redact(&c.to_string()));
                next = c.source();
            }
            let tls = causes.iter().any(|c| c.contains("certificate"));
            anyhow!(
                "cannot reach {}: {}{}{}{}",
                redact(url),
                t.kind(),
                t.message().map(|m| format!(": {m}")).unwrap_or_default(),
                causes.iter().map(|c| format!(": {c}")).collect::<String>(),
                if tls {
                    " (the server's TLS certificate is not trusted: add its CA to the system's store, or name a PEM file of trusted CAs in SSL_CERT_FILE)"
                } else {
                    ""
                }
            )
        }
    }
}

pub struct HttpStore {
    base: String,
    agent: ureq::Agent,
    /// Chunk ids the server is known to have.
    known: Mutex<HashSet<String>>,
    pub uploaded: std::sync::atomic::AtomicU64,
}

#[derive(serde::Deserialize)]
struct Listing {
    name: String,
    #[serde(rename = "type")]
    kind: String,
}

impl HttpStore {
    /// `base` is the repository URL (the one holding `chunks/` and `images/`).
    pub fn open(base: &str, list: bool) -> Result<HttpStore> {
        let base = base.trim_end_matches('/').to_string();
        let store = HttpStore {
            base,
            agent: agent(),
            known: Mutex::new(HashSet::new()),
            uploaded: 0.into(),
        };
        if list {
            let names = store.list("chunks/")?;
            let mut known = HashSet::new();
            for dir in names.iter().filter(|l| l.kind == "directory") {
                for f in store
                    .list(&format!("chunks/{}/", dir.name))?
                    .into_iter()
                    .filter(|l| l.kind == "file")
                {
                    known.insert(f.name);
                }
            }
            *store.known.lock().map_err(|_| anyhow!("poisoned"))? = known;
        }
        Ok(store)
    }

    /// The repository an image URL (`…/images/name.bmri`) belongs to.
    pub fn of_image(url: &str) -> Result<HttpStore> {
        let base = url
            .rsplit_once("/images/")
            .map(|(b, _)| b)
            .ok_or_else(|| anyhow!("{} is not …/images/NAME in a repository", redact(url)))?;
        HttpStore::open(base, false)
    }

    fn list(&self, dir: &str) -> Result<Vec<Listing>> {
        let url = format!("{}/{dir}", self.base);
        match self.agent.get(&url).call() {
            Ok(r) => r.into_json().with_context(|| {
                format!(
                    "{} did not list as JSON (nginx: autoindex on; autoindex_format json)",
                    redact(&url)
                )
            }),
            Err(ureq::Error::Status(404, _)) => Ok(Vec::new()),
            Err(e) => Err(status_error(&url, e)),
        }
    }

    fn chunk_url(&self, id: &[u8; 32]) -> String {
        let h = hex(id);
        format!("{}/chunks/{}/{h}", self.base, &h[..2])
    }

    /// Uploads a small file (a manifest copy) to `<name>` in the repository.
    pub fn put_file(&self, name: &str, data: &[u8]) -> Result<()> {
        let url = format!("{}/{name}", self.base);
        self.agent
            .put(&url)
            .send_bytes(data)
            .map_err(|e| status_error(&url, e))?;
        Ok(())
    }

    /// Uploads a finished image file to `images/<name>`.
    pub fn put_image(&self, name: &str, file: &Path) -> Result<String> {
        let url = format!("{}/images/{name}", self.base);
        let f = std::fs::File::open(file)?;
        self.agent
            .put(&url)
            .send(f)
            .map_err(|e| status_error(&url, e))?;
        Ok(url)
    }

    /// An image's header, read from the front of the download, which is
    /// then dropped: enough to check a key before anything is written.
    pub fn header(url: &str) -> Result<crate::image::format::Header> {
        let r = agent().get(url).call().map_err(|e| status_error(url, e))?;
        let mut reader = std::io::BufReader::new(r.into_reader());
        let (h, _) = crate::image::format::read_header(&mut reader)
            .with_context(|| format!("reading the header of {}", redact(url)))?;
        Ok(h)
    }

    /// Downloads a file (an image) into `to`.
    pub fn fetch(url: &str, to: &Path) -> Result<()> {
        let r = agent().get(url).call().map_err(|e| status_error(url, e))?;
        let mut out = std::fs::File::create(to)?;
        std::io::copy(&mut r.into_reader(), &mut out)
            .with_context(|| format!("downloading {}", redact(url)))?;
        Ok(())
    }
}

impl ChunkStore for HttpStore {
    fn has(&self, id: &[u8; 32]) -> bool {
        self.known
            .lock()
            .map(|k| k.contains(&hex(id)))
            .unwrap_or(false)
    }

    fn put(&self, id: &[u8; 32], flags: u8, payload: &[u8]) -> Result<bool> {
        if self.has(id) {
            return Ok(false);
        }
        let url = self.chunk_url(id);
        let mut body = Vec::with_capacity(payload.len() + 1);
        body.push(flags);
        body.extend_from_slice(payload);
        self.agent
            .put(&url)
            .send_bytes(&body)
            .map_err(|e| status_error(&url, e))?;
        if let Ok(mut k) = self.known.lock() {
            k.insert(hex(id));
        }
        self.uploaded
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(true)
    }

    fn get(&self, id: &[u8; 32]) -> Result<(u8, Vec<u8>)> {
        let url = self.chunk_url(id);
        let r = self
            .agent
            .get(&url)
            .call()
            .map_err(|e| status_error(&url, e))?;
        let mut data = Vec::new();
        r.into_reader()
            .take(128 << 20)
            .read_to_end(&mut data)
            .with_context(|| format!("downloading {}", redact(&url)))?;
        if data.is_empty() {
            bail!("{} is empty: damaged repository", redact(&url));
        }
        let flags = data.remove(0);
        Ok((flags, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_shown() {
        assert_eq!(
            redact("https://bob:s3cret@backup.example/repo"),
            "https://***@backup.example/repo"
        );
        assert_eq!(redact("http://host/a@b"), "http://host/a@b");
        assert_eq!(redact("http://host/repo"), "http://host/repo");
    }
}
