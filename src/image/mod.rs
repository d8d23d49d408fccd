//! Volume images (seed 004): used blocks only, metadata first, each chunk
//! identified by its BLAKE3 hash, zstd-compressed, optionally encrypted, and
//! incremental against a parent. The format is in docs/image-format.md.

pub mod aligned;
pub mod backup;
pub mod chunker;
pub mod cli;
pub mod codec;
pub mod create;
pub mod crypto;
pub mod files;
pub mod format;
pub mod http;
pub mod mount;
pub mod on_tape;
pub mod progress;
pub mod read;
pub mod restore;
pub mod snapshot;
pub mod store;
pub mod stream;
pub mod tape;
pub mod used;
pub mod window;
