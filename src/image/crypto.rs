//! Encryption of image chunks: a passphrase or key file -> Argon2id -> a
//! master key, from which the AEAD key, the chunk-id key and a key check are
//! derived. Each chunk is sealed with XChaCha20-Poly1305, its id bound in as
//! associated data, so a chunk cannot be swapped for another unnoticed.

use anyhow::{anyhow, bail, Result};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};

const NONCE: usize = 24;

/// What the header records so the same key can be derived again and checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    pub aead: String,
    pub kdf: String,
    pub m_cost_kib: u32,
    pub t_cost: u32,
    pub p_cost: u32,
    /// Hex.
    pub salt: String,
    /// Hex of a keyed hash only the right key reproduces.
    pub key_check: String,
}

pub struct Key {
    aead: XChaCha20Poly1305,
    id_key: [u8; 32],
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>> {
    if s.len() % 2 != 0 {
        bail!("odd-length hex");
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| anyhow!("bad hex: {e}")))
        .collect()
}

fn derive(secret: &[u8], salt: &[u8], m: u32, t: u32, p: u32) -> Result<[u8; 32]> {
    let params =
        argon2::Params::new(m, t, p, Some(32)).map_err(|e| anyhow!("Argon2 parameters: {e}"))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut master = [0u8; 32];
    argon
        .hash_password_into(secret, salt, &mut master)
        .map_err(|e| anyhow!("Argon2id: {e}"))?;
    Ok(master)
}

fn key_check(master: &[u8; 32]) -> String {
    hex(blake3::keyed_hash(
        &blake3::derive_key("bmr 2026 image key check", master),
        b"bmr",
    )
    .as_bytes())
}

fn from_master(master: &[u8; 32]) -> Key {
    let enc = blake3::derive_key("bmr 2026 image chunk encryption", master);
    Key {
        aead: XChaCha20Poly1305::new((&enc).into()),
        id_key: blake3::derive_key("bmr 2026 image chunk id", master),
    }
}

/// A new key for a new image: fresh salt, Argon2id at 64 MiB and 3 passes.
pub fn create(secret: &[u8]) -> Result<(Key, Params)> {
    let mut salt = [0u8; 16];
    getrandom::getrandom(&mut salt).map_err(|e| anyhow!("no randomness for the salt: {e}"))?;
    let (m, t, p) = (64 * 1024, 3, 2);
    let master = derive(secret, &salt, m, t, p)?;
    let params = Params {
        aead: "xchacha20poly1305".into(),
        kdf: "argon2id".into(),
        m_cost_kib: m,
        t_cost: t,
        p_cost: p,
        salt: hex(&salt),
        key_check: key_check(&master),
    };
    Ok((from_master(&master), params))
}

/// The key of an existing image, refused at once when it is the wrong one.
pub fn open(secret: &[u8], params: &Params) -> Result<Key> {
    if params.kdf != "argon2id" || params.aead != "xchacha20poly1305" {
        bail!(
            "the image is encrypted with {}/{}, which this bmr does not know",
            params.kdf,
            params.aead
        );
    }
    if params.m_cost_kib > 4 * 1024 * 1024 || params.t_cost > 64 {
        bail!("the image asks for implausible key-derivation costs; the header is damaged");
    }
    let master = derive(
        secret,
        &unhex(&params.salt)?,
        params.m_cost_kib,
        params.t_cost,
        params.p_cost,
    )?;
    if key_check(&master) != params.key_check {
        bail!("wrong passphrase or key file for this image (the key check does not match); nothing was written");
    }
    Ok(from_master(&master))
}

impl Key {
    /// Chunk ids of encrypted images are keyed, so they reveal nothing about
    /// the plaintext to whoever holds the image.
    pub fn chunk_id(&self, data: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.id_key, data).as_bytes()
    }

    pub fn seal(&self, id: &[u8; 32], plain: &[u8]) -> Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE];
        getrandom::getrandom(&mut nonce).map_err(|e| anyhow!("no randomness for a nonce: {e}"))?;
        let sealed = self
            .aead
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: id,
                },
            )
            .map_err(|_| anyhow!("encryption failed"))?;
        let mut out = Vec::with_capacity(NONCE + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    pub fn open(&self, id: &[u8; 32], stored: &[u8]) -> Result<Vec<u8>> {
        if stored.len() < NONCE + 16 {
            bail!("encrypted chunk too short");
        }
        let (nonce, sealed) = stored.split_at(NONCE);
        self.aead
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: id,
                },
            )
            .map_err(|_| anyhow!("chunk fails authentication: damaged or tampered with"))
    }
}

/// Reads the secret: a key file's bytes, or a passphrase from an environment variable.
pub fn secret(
    key_file: Option<&std::path::Path>,
    passphrase_env: Option<&str>,
) -> Result<Option<Vec<u8>>> {
    match (key_file, passphrase_env) {
        (Some(f), _) => {
            Ok(Some(std::fs::read(f).map_err(|e| {
                anyhow!("reading key file {}: {e}", f.display())
            })?))
        }
        (None, Some(var)) => {
            let v = std::env::var(var)
                .map_err(|_| anyhow!("environment variable {var} holds no passphrase"))?;
            if v.is_empty() {
                bail!("the passphrase in {var} is empty");
            }
            Ok(Some(v.into_bytes()))
        }
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn right_key_opens_wrong_key_is_refused() {
        let (k, params) = create(b"correct horse").unwrap();
        let id = k.chunk_id(b"data");
        let sealed = k.seal(&id, b"data").unwrap();
        let again = open(b"correct horse", &params).unwrap();
        assert_eq!(again.open(&id, &sealed).unwrap(), b"data");
        assert_eq!(again.chunk_id(b"data"), id);
        let err = open(b"wrong horse", &params).err().unwrap().to_string();
        assert!(err.contains("wrong passphrase"), "{err}");
    }

    #[test]
    fn tampering_and_swapping_are_detected() {
        let (k, _) = create(b"k").unwrap();
        let id = k.chunk_id(b"one");
        let mut sealed = k.seal(&id, b"one").unwrap();
        let other = k.chunk_id(b"two");
        assert!(k.open(&other, &sealed).is_err(), "bound to its id");
        sealed[30] ^= 1;
        assert!(k.open(&id, &sealed).is_err());
    }
}
