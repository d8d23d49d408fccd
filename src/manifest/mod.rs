//! The saved system state: what `bmr save` writes to the recovery medium and
//! every later step (plan, apply, recover) reads. TOML on the medium, the same
//! field names in `--json` output.
//!
//! Unknown fields are rejected everywhere so that a typo in a hand-edited
//! manifest is an error, not a silently ignored setting.

mod seal;
mod validate;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use seal::{seal, ChecksumError};
pub use validate::{validate, ValidationError};

/// The manifest format this build writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub manifest: Header,
    pub system: System,
    #[serde(default)]
    pub disks: Vec<Disk>,
    #[serde(default)]
    pub partitions: Vec<Partition>,
    #[serde(default)]
    pub volumes: Vec<Volume>,
    #[serde(default)]
    pub commands: Vec<Command>,
    #[serde(default)]
    pub drivers: Vec<Driver>,
    pub hardware: Hardware,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalog: Option<Catalog>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub version: u32,
    /// RFC 3339, UTC.
    pub created: String,
    /// `bmr <version>` that wrote it.
    pub tool: String,
    /// `blake3:<hex>` over the content; see `seal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    Bios,
    Uefi,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct System {
    pub hostname: String,
    /// PRETTY_NAME from os-release.
    pub os: String,
    /// ID from os-release (debian, fedora, ...): tells recovery which tools to expect.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub os_id: String,
    pub kernel: String,
    pub firmware: Firmware,
    /// grub, systemd-boot, or unknown.
    pub bootloader: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TableType {
    Gpt,
    Mbr,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    /// Stable name inside this manifest (disk0, disk1, ...).
    pub id: String,
    /// Kernel name at save time; a hint only, names change between boots.
    pub device: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub serial: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub wwn: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub by_path: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub by_id: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub transport: String,
    pub size_bytes: u64,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    #[serde(default)]
    pub rotational: bool,
    #[serde(default)]
    pub removable: bool,
    pub table: TableType,
    /// GPT disk GUID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guid: Option<Uuid>,
    /// MBR disk signature, `0x` and 8 hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MbrKind {
    Primary,
    Extended,
    Logical,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partition {
    pub disk: String,
    /// Number as the kernel names it (sda1 is 1; MBR logicals start at 5).
    pub number: u32,
    pub start_bytes: u64,
    pub size_bytes: u64,
    /// GPT partition type GUID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub type_guid: Option<Uuid>,
    /// GPT unique partition GUID (PARTUUID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guid: Option<Uuid>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// GPT attribute bits, `0x` and 16 hex digits (bit 63 does not fit a TOML integer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attributes: Option<String>,
    /// MBR system id, `0x` and 2 hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mbr_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mbr_kind: Option<MbrKind>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bootable: bool,
    /// The volume this partition holds, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
}

impl Partition {
    pub fn end_bytes(&self) -> u64 {
        self.start_bytes.saturating_add(self.size_bytes)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Esp,
    Boot,
    System,
    Data,
    Swap,
}

impl Role {
    /// Boot-critical volumes: placed and restored first, never dropped.
    pub fn is_critical(self) -> bool {
        matches!(self, Role::Esp | Role::Boot | Role::System)
    }

    /// Restore priority: ESP, boot, system, data, swap.
    pub fn rank(self) -> u8 {
        match self {
            Role::Esp => 0,
            Role::Boot => 1,
            Role::System => 2,
            Role::Data => 3,
            Role::Swap => 4,
        }
    }
}

impl std::fmt::Display for Firmware {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
        })
    }
}

impl std::fmt::Display for TableType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            TableType::Gpt => "gpt",
            TableType::Mbr => "mbr",
            TableType::None => "no table",
        })
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            Role::Esp => "esp",
            Role::Boot => "boot",
            Role::System => "system",
            Role::Data => "data",
            Role::Swap => "swap",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    pub id: String,
    /// As blkid names it: ext4, vfat, ntfs, swap, xfs, ...
    pub filesystem: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uuid: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub label: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mountpoint: String,
    pub role: Role,
    pub size_bytes: u64,
    /// Absent when neither the mounted filesystem nor its own counters could tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_bytes: Option<u64>,
    /// The smallest size a restore may give this volume.
    pub min_size_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u32>,
    /// Image name in the backup source, filled in by `bmr backup`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    Abort,
    Continue,
    Shell,
}

/// A program recovery runs, as the `[COMMANDS]` section of seed 000's asr.sif.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Command {
    pub sequence: u32,
    /// 1: from the rescue medium, 2: after the reboot into the restored disk.
    pub phase: u8,
    #[serde(default)]
    pub critical: bool,
    pub timeout_secs: u64,
    pub program: String,
    #[serde(default)]
    pub args: Vec<String>,
    pub on_error: OnError,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Driver {
    pub module: String,
    /// Path on the medium, e.g. `bmr/drivers/6.1.0-26-amd64/st.ko.xz`.
    pub file: String,
    pub purpose: String,
    pub kernel: String,
    pub vermagic: String,
    /// Modules this one needs loaded first (names, all listed in `drivers` too).
    #[serde(default)]
    pub depends: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hardware {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cpu: String,
    #[serde(default)]
    pub cpus: u32,
    #[serde(default)]
    pub memory_bytes: u64,
    #[serde(default)]
    pub storage: Vec<Controller>,
    #[serde(default)]
    pub nics: Vec<Nic>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Controller {
    /// PCI address (0000:00:1f.2), or the sysfs name for non-PCI controllers.
    pub address: String,
    /// `vendor:device` PCI ids in hex.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pci_id: String,
    /// PCI class, `0x` and 6 hex digits.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub class: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub driver: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nic {
    pub name: String,
    pub mac: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub driver: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub address: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CatalogMode {
    None,
    Boot,
    Full,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    /// Path on the medium.
    pub file: String,
    pub mode: CatalogMode,
    pub entries: u64,
    /// `blake3:<hex>` of the compressed file, so a damaged catalog is noticed.
    pub checksum: String,
}

/// Why a manifest could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("the manifest is not valid TOML for this bmr version: {0}")]
    Syntax(#[from] toml::de::Error),
    #[error(
        "the manifest has format version {found}, but this bmr reads up to version {FORMAT_VERSION}; use a newer bmr"
    )]
    Version { found: u32 },
    #[error(transparent)]
    Checksum(#[from] ChecksumError),
    #[error("the manifest is inconsistent:\n{}", list(.0))]
    Invalid(Vec<ValidationError>),
}

fn list(errors: &[ValidationError]) -> String {
    errors
        .iter()
        .map(|e| format!("  - {e}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Manifest {
    /// Parses, checks the checksum and validates: what every reader of a
    /// medium must do before trusting a single field.
    pub fn from_toml(text: &str) -> Result<Manifest, LoadError> {
        // Read the version first so a newer format gets a version error, not
        // a confusing unknown-field error.
        #[derive(Deserialize)]
        struct Peek {
            manifest: PeekHeader,
        }
        #[derive(Deserialize)]
        struct PeekHeader {
            version: u32,
        }
        if let Ok(peek) = toml::from_str::<Peek>(text) {
            if peek.manifest.version > FORMAT_VERSION {
                return Err(LoadError::Version {
                    found: peek.manifest.version,
                });
            }
        }
        let manifest: Manifest = toml::from_str(text)?;
        seal::verify(&manifest)?;
        let errors = validate(&manifest);
        if !errors.is_empty() {
            return Err(LoadError::Invalid(errors));
        }
        Ok(manifest)
    }

    /// Seals and serialises. The caller validates first; a manifest that does
    /// not validate should not be written.
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        let mut sealed = self.clone();
        seal(&mut sealed);
        toml::to_string_pretty(&sealed)
    }

    pub fn volume(&self, id: &str) -> Option<&Volume> {
        self.volumes.iter().find(|v| v.id == id)
    }

    pub fn disk(&self, id: &str) -> Option<&Disk> {
        self.disks.iter().find(|d| d.id == id)
    }

    /// The partition that holds a volume.
    pub fn partition_of(&self, volume: &str) -> Option<&Partition> {
        self.partitions
            .iter()
            .find(|p| p.volume.as_deref() == Some(volume))
    }
}

#[cfg(test)]
pub(crate) mod tests;
