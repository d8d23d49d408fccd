//! The manifest's own checksum. It covers the content (the typed values, as
//! canonical JSON), not the bytes: re-indenting or adding a comment does not
//! break it, but any changed value, from bit rot or a careless edit, does.

use super::Manifest;

const PREFIX: &str = "blake3:";

#[derive(Debug, thiserror::Error)]
pub enum ChecksumError {
    #[error(
        "the manifest has no checksum ([manifest] checksum): it was not written by `bmr save`, \
         or the line was removed; if you built it by hand, run `bmr manifest seal FILE`"
    )]
    Missing,
    #[error(
        "the manifest checksum does not match its content (recorded {recorded}, computed {computed}): \
         the medium is damaged or the manifest was edited; write a new medium with `bmr save`, \
         or if you edited it on purpose, run `bmr manifest seal FILE`"
    )]
    Mismatch { recorded: String, computed: String },
}

fn content_hash(manifest: &Manifest) -> String {
    let mut unsealed = manifest.clone();
    unsealed.manifest.checksum = None;
    // Serialising plain structs with no maps or floats cannot fail, and the
    // field order is the declaration order: the encoding is canonical.
    let json = serde_json::to_vec(&unsealed).unwrap_or_default();
    format!("{PREFIX}{}", blake3::hash(&json).to_hex())
}

/// Records the checksum of the current content.
pub fn seal(manifest: &mut Manifest) {
    manifest.manifest.checksum = Some(content_hash(manifest));
}

pub(super) fn verify(manifest: &Manifest) -> Result<(), ChecksumError> {
    let recorded = manifest
        .manifest
        .checksum
        .as_deref()
        .ok_or(ChecksumError::Missing)?;
    let computed = content_hash(manifest);
    if recorded != computed {
        return Err(ChecksumError::Mismatch {
            recorded: recorded.to_string(),
            computed,
        });
    }
    Ok(())
}
