//! Tests of the manifest types, the checksum and the consistency checks, and
//! `sample()`, a realistic manifest the other modules' tests reuse.

use proptest::prelude::*;
use uuid::uuid;

use super::*;

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;

/// A realistic, valid manifest of a small UEFI Debian server with a GPT system
/// disk and an MBR data disk (primary, extended and logical partitions).
///
/// Index map, for tests that mutate it:
/// - disks: `[0]` disk0 (GPT, 20 GiB), `[1]` disk1 (MBR, 4 GiB)
/// - partitions: `[0]` disk0 #1 esp, `[1]` disk0 #2 root, `[2]` disk0 #3 swap,
///   `[3]` disk0 #4 data, `[4]` disk1 #1 home, `[5]` disk1 #2 extended,
///   `[6]` disk1 #5 archive
/// - volumes: `[0]` esp, `[1]` root, `[2]` swap, `[3]` data, `[4]` home, `[5]` archive
pub(crate) fn sample() -> Manifest {
    let gpt = |number: u32,
               start: u64,
               size: u64,
               type_guid: Uuid,
               guid: Uuid,
               name: &str,
               volume: &str| Partition {
        disk: "disk0".into(),
        number,
        start_bytes: start,
        size_bytes: size,
        type_guid: Some(type_guid),
        guid: Some(guid),
        name: name.into(),
        attributes: None,
        mbr_type: None,
        mbr_kind: None,
        bootable: false,
        volume: Some(volume.into()),
    };
    let mbr = |number: u32,
               start: u64,
               size: u64,
               mbr_type: &str,
               kind: MbrKind,
               volume: Option<&str>| Partition {
        disk: "disk1".into(),
        number,
        start_bytes: start,
        size_bytes: size,
        type_guid: None,
        guid: None,
        name: String::new(),
        attributes: None,
        mbr_type: Some(mbr_type.into()),
        mbr_kind: Some(kind),
        bootable: false,
        volume: volume.map(Into::into),
    };
    #[allow(clippy::too_many_arguments)]
    fn volume(
        id: &str,
        filesystem: &str,
        uuid: &str,
        mountpoint: &str,
        role: Role,
        size: u64,
        used: Option<u64>,
        min: u64,
    ) -> Volume {
        Volume {
            id: id.into(),
            filesystem: filesystem.into(),
            uuid: uuid.into(),
            label: id.into(),
            mountpoint: mountpoint.into(),
            role,
            size_bytes: size,
            used_bytes: used,
            min_size_bytes: min,
            block_size: Some(4096),
            image: None,
        }
    }

    let mut esp = gpt(
        1,
        MIB,
        512 * MIB,
        uuid!("C12A7328-F81F-11D2-BA4B-00A0C93EC93B"),
        uuid!("5c1e9a3e-2f0b-4a59-9d55-0d6a0e5b1f01"),
        "EFI System Partition",
        "esp",
    );
    esp.attributes = Some("0x0000000000000000".into());
    let linux_fs = uuid!("0FC63DAF-8483-4772-8E79-3D69D8477DE4");

    Manifest {
        manifest: Header {
            version: FORMAT_VERSION,
            created: "2024-10-05T12:34:56Z".into(),
            tool: "bmr 0.1.0".into(),
            checksum: None,
        },
        system: System {
            hostname: "web1".into(),
            os: "Debian GNU/Linux 12 (bookworm)".into(),
            os_id: "debian".into(),
            kernel: "6.1.0-26-amd64".into(),
            firmware: Firmware::Uefi,
            bootloader: "grub".into(),
        },
        disks: vec![
            Disk {
                id: "disk0".into(),
                device: "sda".into(),
                model: "Samsung SSD 870 EVO 250GB".into(),
                serial: "S6PENL0T123456A".into(),
                wwn: "0x5002538f4123abcd".into(),
                by_path: "pci-0000:00:17.0-ata-1".into(),
                by_id: vec![
                    "ata-Samsung_SSD_870_EVO_250GB_S6PENL0T123456A".into(),
                    "wwn-0x5002538f4123abcd".into(),
                ],
                transport: "sata".into(),
                size_bytes: 20 * GIB,
                logical_sector_size: 512,
                physical_sector_size: 4096,
                rotational: false,
                removable: false,
                table: TableType::Gpt,
                guid: Some(uuid!("8d3f2a61-7c4e-4b1a-9f0e-2b6c1d5e7a90")),
                signature: None,
            },
            Disk {
                id: "disk1".into(),
                device: "sdb".into(),
                model: "WDC WD5000AAKX-00ERMA0".into(),
                serial: "WD-WCC2EUA12345".into(),
                wwn: String::new(),
                by_path: "pci-0000:00:17.0-ata-2".into(),
                by_id: vec!["ata-WDC_WD5000AAKX-00ERMA0_WD-WCC2EUA12345".into()],
                transport: "sata".into(),
                size_bytes: 4 * GIB,
                logical_sector_size: 512,
                physical_sector_size: 512,
                rotational: true,
                removable: false,
                table: TableType::Mbr,
                guid: None,
                signature: Some("0x1234abcd".into()),
            },
        ],
        partitions: vec![
            esp,
            gpt(
                2,
                513 * MIB,
                8 * GIB,
                linux_fs,
                uuid!("0b7d6c15-93a4-4e8f-a1c2-6f5e4d3c2b02"),
                "root",
                "root",
            ),
            gpt(
                3,
                513 * MIB + 8 * GIB,
                GIB,
                uuid!("0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"),
                uuid!("e4a1c2d3-5b6f-4708-9a1b-2c3d4e5f6a03"),
                "swap",
                "swap",
            ),
            gpt(
                4,
                513 * MIB + 9 * GIB,
                10 * GIB,
                uuid!("EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"),
                uuid!("7f8e9d0c-1b2a-4938-8776-655443322104"),
                "data",
                "data",
            ),
            mbr(1, MIB, 2047 * MIB, "0x83", MbrKind::Primary, Some("home")),
            mbr(2, 2 * GIB, 2 * GIB, "0x05", MbrKind::Extended, None),
            mbr(
                5,
                2 * GIB + MIB,
                2047 * MIB,
                "0x0c",
                MbrKind::Logical,
                Some("archive"),
            ),
        ],
        volumes: vec![
            volume(
                "esp",
                "vfat",
                "ABCD-1234",
                "/boot/efi",
                Role::Esp,
                512 * MIB,
                Some(6 * MIB),
                64 * MIB,
            ),
            volume(
                "root",
                "ext4",
                "2f6c1b7e-4d3a-4e5b-8c9d-0a1b2c3d4e5f",
                "/",
                Role::System,
                8 * GIB,
                Some(3 * GIB),
                3 * GIB + 512 * MIB,
            ),
            volume(
                "swap",
                "swap",
                "9a8b7c6d-5e4f-4a3b-2c1d-0e9f8a7b6c5d",
                "",
                Role::Swap,
                GIB,
                None,
                GIB,
            ),
            volume(
                "data",
                "ntfs",
                "4E2F1A3B5C6D7E8F",
                "/srv/data",
                Role::Data,
                10 * GIB,
                Some(4 * GIB),
                4 * GIB + 512 * MIB,
            ),
            volume(
                "home",
                "ext4",
                "1c2d3e4f-5a6b-4c7d-8e9f-a0b1c2d3e4f5",
                "/home",
                Role::Data,
                2047 * MIB,
                Some(GIB),
                GIB + 512 * MIB,
            ),
            volume(
                "archive",
                "vfat",
                "5E6F-7A8B",
                "/srv/archive",
                Role::Data,
                2047 * MIB,
                Some(100 * MIB),
                128 * MIB,
            ),
        ],
        commands: vec![Command {
            sequence: 1,
            phase: 2,
            critical: false,
            timeout_secs: 300,
            program: "/usr/sbin/update-initramfs".into(),
            args: vec!["-u".into(), "-k".into(), "all".into()],
            on_error: OnError::Continue,
            description: "rebuild the initramfs for the restored disks".into(),
        }],
        drivers: vec![Driver {
            module: "st".into(),
            file: "bmr/drivers/6.1.0-26-amd64/st.ko.xz".into(),
            purpose: "SCSI tape".into(),
            kernel: "6.1.0-26-amd64".into(),
            vermagic: "6.1.0-26-amd64 SMP preempt mod_unload modversions ".into(),
            depends: vec![],
        }],
        hardware: Hardware {
            cpu: "Intel(R) Xeon(R) E-2224 CPU @ 3.40GHz".into(),
            cpus: 4,
            memory_bytes: 16 * GIB,
            storage: vec![Controller {
                address: "0000:00:17.0".into(),
                pci_id: "8086:a352".into(),
                class: "0x010601".into(),
                driver: "ahci".into(),
            }],
            nics: vec![Nic {
                name: "eno1".into(),
                mac: "3c:ec:ef:12:34:56".into(),
                driver: "e1000e".into(),
                address: "0000:00:1f.6".into(),
            }],
        },
        catalog: Some(Catalog {
            file: "bmr/catalog.zst".into(),
            mode: CatalogMode::Boot,
            entries: 48_213,
            checksum: "blake3:6f1ed002ab5595859014ebf0951522d9a1b2c3d4e5f60718293a4b5c6d7e8f90"
                .into(),
        }),
    }
}

fn render(errors: &[ValidationError]) -> String {
    if errors.is_empty() {
        return "  (no errors)".into();
    }
    errors
        .iter()
        .map(|e| format!("  - {e}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The validation errors of `sample()` after `f` changed it.
fn errors_for(f: impl FnOnce(&mut Manifest)) -> Vec<ValidationError> {
    let mut m = sample();
    f(&mut m);
    validate(&m)
}

#[track_caller]
fn assert_error(errors: &[ValidationError], field: &str, needle: &str) {
    assert!(
        errors
            .iter()
            .any(|e| e.field == field && e.problem.contains(needle)),
        "expected an error at `{field}` mentioning {needle:?}, got:\n{}",
        render(errors)
    );
}

/// The sealed TOML of `m`.
fn text_of(m: &Manifest) -> String {
    m.to_toml().expect("the sample serialises to TOML")
}

/// `text` without the `checksum` line of the `[manifest]` table.
fn without_manifest_checksum(text: &str) -> String {
    let mut section = "";
    let mut out = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            section = t;
        }
        if section == "[manifest]" && t.starts_with("checksum") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// `text` with `line` inserted after the line that is exactly `after`.
fn insert_after(text: &str, after: &str, line: &str) -> String {
    let mut out = String::new();
    let mut found = false;
    for l in text.lines() {
        out.push_str(l);
        out.push('\n');
        if !found && l.trim() == after {
            out.push_str(line);
            out.push('\n');
            found = true;
        }
    }
    assert!(found, "no line {after:?} in:\n{text}");
    out
}

#[test]
fn sample_is_valid() {
    let errors = validate(&sample());
    assert!(
        errors.is_empty(),
        "sample() does not validate:\n{}",
        render(&errors)
    );
}

#[test]
fn sample_is_internally_consistent() {
    let m = sample();
    for p in &m.partitions {
        let disk = m.disk(&p.disk).expect("partition on a known disk");
        let sector = u64::from(disk.logical_sector_size);
        assert_eq!(p.start_bytes % sector, 0, "partition {} start", p.number);
        assert_eq!(p.size_bytes % sector, 0, "partition {} size", p.number);
        assert!(
            p.end_bytes() <= disk.size_bytes,
            "partition {} end",
            p.number
        );
        if let Some(v) = &p.volume {
            let v = m.volume(v).expect("volume exists");
            assert!(v.size_bytes <= p.size_bytes, "volume {} fits", v.id);
            assert!(
                v.used_bytes.unwrap_or(0) <= v.min_size_bytes,
                "volume {} min",
                v.id
            );
            assert!(v.min_size_bytes <= v.size_bytes, "volume {} min/size", v.id);
        }
    }
    assert_eq!(m.partition_of("root").map(|p| p.number), Some(2));
    assert_eq!(
        m.partition_of("archive")
            .map(|p| (p.disk.as_str(), p.number)),
        Some(("disk1", 5))
    );
    let roles: Vec<Role> = m.volumes.iter().map(|v| v.role).collect();
    assert_eq!(
        roles,
        [
            Role::Esp,
            Role::System,
            Role::Swap,
            Role::Data,
            Role::Data,
            Role::Data
        ]
    );
}

// ---------------------------------------------------------------------------
// Round trip and field names
// ---------------------------------------------------------------------------

#[test]
fn toml_round_trip_adds_only_the_checksum() {
    let m = sample();
    let text = text_of(&m);
    let back = Manifest::from_toml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));

    let mut sealed = m.clone();
    seal(&mut sealed);
    assert_eq!(back, sealed);
    let checksum = back.manifest.checksum.clone().expect("checksum set");
    assert!(
        checksum.starts_with("blake3:") && checksum.len() == "blake3:".len() + 64,
        "{checksum}"
    );

    let mut unsealed = back;
    unsealed.manifest.checksum = None;
    assert_eq!(unsealed, m);

    // Sealing is idempotent: a sealed manifest written again keeps its checksum.
    assert_eq!(text_of(&sealed), text);
}

#[test]
fn toml_text_has_expected_keys() {
    let text = text_of(&sample());
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    for expected in [
        "[manifest]",
        "version = 1",
        "[system]",
        "hostname = \"web1\"",
        "os_id = \"debian\"",
        "kernel = \"6.1.0-26-amd64\"",
        "firmware = \"uefi\"",
        "bootloader = \"grub\"",
        "[[disks]]",
        "id = \"disk0\"",
        "table = \"gpt\"",
        "table = \"mbr\"",
        "size_bytes = 21474836480",
        "logical_sector_size = 512",
        "physical_sector_size = 4096",
        "signature = \"0x1234abcd\"",
        "[[partitions]]",
        "type_guid = \"c12a7328-f81f-11d2-ba4b-00a0c93ec93b\"",
        "mbr_kind = \"extended\"",
        "mbr_kind = \"logical\"",
        "mbr_type = \"0x0c\"",
        "volume = \"esp\"",
        "[[volumes]]",
        "role = \"esp\"",
        "role = \"system\"",
        "mountpoint = \"/boot/efi\"",
        "min_size_bytes = 3758096384",
        "[[commands]]",
        "on_error = \"continue\"",
        "[[drivers]]",
        "file = \"bmr/drivers/6.1.0-26-amd64/st.ko.xz\"",
        "[hardware]",
        "[[hardware.storage]]",
        "[[hardware.nics]]",
        "[catalog]",
        "mode = \"boot\"",
    ] {
        assert!(
            lines.contains(&expected),
            "no line {expected:?} in:\n{text}"
        );
    }
    assert!(
        lines.iter().any(|l| l.starts_with("checksum = \"blake3:")),
        "no checksum in:\n{text}"
    );
    // Absent options are left out, not written as empty values.
    assert!(!lines.iter().any(|l| l.starts_with("image")), "{text}");
    assert!(!lines.iter().any(|l| l.starts_with("bootable")), "{text}");
}

/// Differences in table keys (recursively) between the TOML and JSON forms.
fn key_differences(path: &str, t: &toml::Value, j: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value as J;
    use toml::Value as T;
    match (t, j) {
        (T::Table(tt), J::Object(jo)) => {
            let tk: std::collections::BTreeSet<&str> = tt.keys().map(String::as_str).collect();
            let jk: std::collections::BTreeSet<&str> = jo.keys().map(String::as_str).collect();
            if tk != jk {
                out.push(format!(
                    "{path}: TOML keys {:?}, JSON keys {:?}",
                    tk.difference(&jk).collect::<Vec<_>>(),
                    jk.difference(&tk).collect::<Vec<_>>()
                ));
            }
            for (k, tv) in tt {
                if let Some(jv) = jo.get(k) {
                    let sub = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    key_differences(&sub, tv, jv, out);
                }
            }
        }
        (T::Array(ta), J::Array(ja)) => {
            if ta.len() != ja.len() {
                out.push(format!(
                    "{path}: {} TOML entries, {} JSON entries",
                    ta.len(),
                    ja.len()
                ));
            }
            for (i, (tv, jv)) in ta.iter().zip(ja).enumerate() {
                key_differences(&format!("{path}[{i}]"), tv, jv, out);
            }
        }
        (T::String(_), J::String(_))
        | (T::Integer(_), J::Number(_))
        | (T::Boolean(_), J::Bool(_)) => {}
        (t, j) => out.push(format!("{path}: TOML {} but JSON {j}", t.type_str())),
    }
}

#[test]
fn json_uses_the_toml_field_names() {
    let mut m = sample();
    // Set the fields sample() leaves at their defaults, so every name is compared.
    m.volumes[1].image = Some("root.img.zst".into());
    m.partitions[4].bootable = true;
    m.drivers[0].depends = vec!["scsi_mod".into()];
    m.drivers.push(Driver {
        module: "scsi_mod".into(),
        file: "bmr/drivers/6.1.0-26-amd64/scsi_mod.ko.xz".into(),
        purpose: "SCSI core".into(),
        kernel: "6.1.0-26-amd64".into(),
        vermagic: "6.1.0-26-amd64 SMP preempt mod_unload modversions ".into(),
        depends: vec![],
    });
    assert!(validate(&m).is_empty(), "{}", render(&validate(&m)));

    let text = text_of(&m);
    let back = Manifest::from_toml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let t: toml::Value = toml::from_str(&text).expect("TOML parses as a value");
    let j = serde_json::to_value(&back).expect("JSON");
    let mut diffs = Vec::new();
    key_differences("", &t, &j, &mut diffs);
    assert!(
        diffs.is_empty(),
        "TOML and JSON differ:\n{}",
        diffs.join("\n")
    );
    // And the JSON reads back as the same manifest.
    let from_json: Manifest = serde_json::from_value(j).expect("JSON reads back");
    assert_eq!(from_json, back);
}

// ---------------------------------------------------------------------------
// Checksum
// ---------------------------------------------------------------------------

#[test]
fn edited_value_is_refused_with_a_checksum_mismatch() {
    let text = text_of(&sample());
    let edited = text.replacen("size_bytes = 21474836480", "size_bytes = 32212254720", 1);
    assert_ne!(edited, text, "the disk size line was not found");
    match Manifest::from_toml(&edited) {
        Err(e @ LoadError::Checksum(ChecksumError::Mismatch { .. })) => {
            if let LoadError::Checksum(ChecksumError::Mismatch { recorded, computed }) = &e {
                assert_ne!(recorded, computed);
                assert!(
                    text.contains(recorded.as_str()),
                    "recorded is the one in the file"
                );
            }
            assert!(e.to_string().contains("checksum does not match"), "{e}");
        }
        other => panic!("expected a checksum mismatch, got {other:?}"),
    }
}

#[test]
fn removed_checksum_is_refused_as_missing() {
    let text = without_manifest_checksum(&text_of(&sample()));
    assert!(
        text.contains("[catalog]") && text.contains("checksum = \"blake3:"),
        "only the manifest checksum goes"
    );
    match Manifest::from_toml(&text) {
        Err(LoadError::Checksum(ChecksumError::Missing)) => {}
        other => panic!("expected a missing checksum, got {other:?}"),
    }
    // An unsealed manifest (toml::to_string, not to_toml) is the same case.
    let unsealed = toml::to_string(&sample()).expect("serialises");
    assert!(matches!(
        Manifest::from_toml(&unsealed),
        Err(LoadError::Checksum(ChecksumError::Missing))
    ));
}

#[test]
fn reformatting_and_comments_keep_the_checksum() {
    let m = sample();
    let text = text_of(&m);
    let mut edited = String::from("# bmr manifest, checked by hand on 2024-10-06\n\n");
    for line in text.lines() {
        if line.trim().is_empty() {
            edited.push_str("\n\n");
        } else {
            edited.push_str(&format!("\t  {line}   # looked fine\n"));
        }
    }
    let back = Manifest::from_toml(&edited).unwrap_or_else(|e| panic!("{e}\n{edited}"));
    let mut sealed = m;
    seal(&mut sealed);
    assert_eq!(back, sealed);
}

/// Byte offsets of the first and last character of every value in `text`
/// (inside the quotes for strings), each with its line for messages.
fn value_positions(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let body = line.trim_end();
        let value_at = match body.find(" = ") {
            Some(n) if !body.starts_with('[') => n + 3,
            // An entry of a multi-line array.
            None if body.starts_with(' ') => body.len() - body.trim_start().len(),
            _ => {
                offset += line.len();
                continue;
            }
        };
        let value = body[value_at..].trim_end_matches(',');
        let (first, last) = if value.len() > 2 && value.starts_with('"') {
            (value_at + 1, value_at + value.len() - 2)
        } else {
            (value_at, value_at + value.len() - 1)
        };
        out.push((offset + first, body));
        if last != first {
            out.push((offset + last, body));
        }
        offset += line.len();
    }
    out
}

#[test]
fn one_changed_character_in_any_value_is_refused() {
    let text = text_of(&sample());
    let positions = value_positions(&text);
    assert!(
        positions.len() > 200,
        "only {} positions found in:\n{text}",
        positions.len()
    );
    let mut accepted = Vec::new();
    for (i, line) in positions {
        let mut bytes = text.clone().into_bytes();
        bytes[i] ^= 1;
        let Ok(changed) = String::from_utf8(bytes) else {
            continue;
        };
        if Manifest::from_toml(&changed).is_ok() {
            let was = char::from(text.as_bytes()[i]);
            accepted.push(format!(
                "byte {i} ({was:?} -> {:?}) in {line:?}",
                char::from(text.as_bytes()[i] ^ 1)
            ));
        }
    }
    assert!(
        accepted.is_empty(),
        "accepted after a one-character change:\n{}",
        accepted.join("\n")
    );
}

#[test]
fn meaning_preserving_edits_are_accepted() {
    // The checksum covers values, not spelling: a UUID in upper case, or a
    // line with a default value commented out, is the same manifest.
    let m = sample();
    let text = text_of(&m);
    let upper = text.replacen(
        "type_guid = \"c12a7328-f81f-11d2-ba4b-00a0c93ec93b\"",
        "type_guid = \"C12A7328-F81F-11D2-BA4B-00A0C93EC93B\"",
        1,
    );
    let commented = text.replacen("critical = false", "#ritical = false", 1);
    for edited in [upper, commented] {
        assert_ne!(edited, text);
        let back = Manifest::from_toml(&edited).unwrap_or_else(|e| panic!("{e}\n{edited}"));
        assert_eq!(
            back.manifest.checksum,
            Manifest::from_toml(&text)
                .ok()
                .and_then(|m| m.manifest.checksum)
        );
    }
}

// ---------------------------------------------------------------------------
// Unknown fields and versions
// ---------------------------------------------------------------------------

#[test]
fn unknown_field_is_refused_by_name() {
    let text = insert_after(&text_of(&sample()), "[system]", "colour = \"red\"");
    match Manifest::from_toml(&text) {
        Err(e @ LoadError::Syntax(_)) => assert!(e.to_string().contains("colour"), "{e}"),
        other => panic!("expected an unknown-field error, got {other:?}"),
    }
}

#[test]
fn unknown_field_in_an_array_entry_is_refused_by_name() {
    let text = insert_after(&text_of(&sample()), "[[volumes]]", "compression = \"zstd\"");
    let e = Manifest::from_toml(&text).expect_err("unknown field accepted");
    assert!(matches!(e, LoadError::Syntax(_)), "{e:?}");
    assert!(e.to_string().contains("compression"), "{e}");
}

#[test]
fn newer_format_version_is_refused_as_such() {
    let text = text_of(&sample());
    let edited = text.replacen("version = 1\n", "version = 99\n", 1);
    assert_ne!(edited, text);
    match Manifest::from_toml(&edited) {
        Err(e @ LoadError::Version { found: 99 }) => {
            assert!(e.to_string().contains("99"), "{e}");
        }
        other => panic!("expected a version error, got {other:?}"),
    }
    // Even when the newer format also has fields this build does not know.
    let newer = insert_after(&edited, "[system]", "timezone = \"Europe/Berlin\"");
    assert!(matches!(
        Manifest::from_toml(&newer),
        Err(LoadError::Version { found: 99 })
    ));
}

#[test]
fn invalid_but_sealed_manifest_is_refused_as_invalid() {
    let mut m = sample();
    m.system.hostname.clear();
    let text = text_of(&m);
    match Manifest::from_toml(&text) {
        Err(LoadError::Invalid(errors)) => assert_error(&errors, "system.hostname", "empty"),
        other => panic!("expected a validation error, got {other:?}"),
    }
}

#[test]
fn all_problems_are_reported_at_once() {
    let errors = errors_for(|m| {
        m.system.hostname.clear();
        m.disks[1].signature = None;
        m.volumes[1].min_size_bytes = GIB;
        m.commands[0].timeout_secs = 0;
    });
    assert_error(&errors, "system.hostname", "empty");
    assert_error(&errors, "disks[1].signature", "signature");
    assert_error(&errors, "volumes[1].min_size_bytes", "1073741824");
    assert_error(&errors, "commands[0].timeout_secs", "is 0");
    assert_eq!(errors.len(), 4, "{}", render(&errors));
}

// ---------------------------------------------------------------------------
// One test per rule of validate.rs
// ---------------------------------------------------------------------------

mod rules {
    use super::*;

    /// `rule!(name, field, needle, |m| change)`: `change` applied to `sample()`
    /// gives an error at `field` whose problem contains `needle`.
    macro_rules! rule {
        ($name:ident, $field:expr, $needle:expr, |$m:ident| $change:block) => {
            #[test]
            fn $name() {
                let errors = errors_for(|$m: &mut Manifest| $change);
                assert_error(&errors, $field, $needle);
            }
        };
    }

    // [manifest] and [system]
    rule!(
        version_zero,
        "manifest.version",
        "0 is not a version",
        |m| { m.manifest.version = 0 }
    );
    rule!(
        version_too_new,
        "manifest.version",
        "2 is not a version",
        |m| { m.manifest.version = FORMAT_VERSION + 1 }
    );
    rule!(empty_hostname, "system.hostname", "is empty", |m| {
        m.system.hostname.clear()
    });

    // [[disks]]
    rule!(empty_disk_id, "disks[0].id", "is empty", |m| {
        m.disks[0].id.clear()
    });
    rule!(
        duplicate_disk_id,
        "disks[1].id",
        "\"disk0\" is used by another disk",
        |m| { m.disks[1].id = "disk0".into() }
    );
    rule!(
        bad_logical_sector_size,
        "disks[0].logical_sector_size",
        "1000",
        |m| { m.disks[0].logical_sector_size = 1000 }
    );
    rule!(
        bad_physical_sector_size,
        "disks[1].physical_sector_size",
        "131072",
        |m| { m.disks[1].physical_sector_size = 131_072 }
    );
    rule!(
        physical_smaller_than_logical,
        "disks[0].physical_sector_size",
        "512 is smaller than logical_sector_size 4096",
        |m| {
            m.disks[0].logical_sector_size = 4096;
            m.disks[0].physical_sector_size = 512;
        }
    );
    rule!(disk_size_zero, "disks[1].size_bytes", "is 0", |m| {
        m.disks[1].size_bytes = 0
    });
    rule!(
        gpt_disk_without_guid,
        "disks[0].guid",
        "GPT disk needs its disk GUID",
        |m| { m.disks[0].guid = None }
    );
    rule!(
        mbr_disk_without_signature,
        "disks[1].signature",
        "MBR disk needs its disk signature",
        |m| { m.disks[1].signature = None }
    );
    rule!(
        mbr_bad_signature,
        "disks[1].signature",
        "\"1234abcd\"",
        |m| { m.disks[1].signature = Some("1234abcd".into()) }
    );
    rule!(
        mbr_signature_too_long,
        "disks[1].signature",
        "\"0x1234abcde\"",
        |m| { m.disks[1].signature = Some("0x1234abcde".into()) }
    );

    // [[partitions]]
    rule!(
        dangling_partition_disk,
        "partitions[6].disk",
        "\"disk9\" names no disk",
        |m| { m.partitions[6].disk = "disk9".into() }
    );
    rule!(
        partition_number_zero,
        "partitions[0].number",
        "start at 1",
        |m| { m.partitions[0].number = 0 }
    );
    rule!(
        duplicate_partition_number,
        "partitions[2].number",
        "2 is used twice on disk0",
        |m| { m.partitions[2].number = 2 }
    );
    rule!(
        partition_size_zero,
        "partitions[3].size_bytes",
        "is 0",
        |m| { m.partitions[3].size_bytes = 0 }
    );
    rule!(
        unaligned_partition_start,
        "partitions[1].start_bytes",
        "537919588",
        |m| { m.partitions[1].start_bytes += 100 }
    );
    rule!(
        unaligned_partition_size,
        "partitions[3].size_bytes",
        "10737418000",
        |m| { m.partitions[3].size_bytes -= 240 }
    );
    rule!(
        partition_past_disk_end,
        "partitions[3].size_bytes",
        "disk0 is usable only up to byte",
        |m| { m.partitions[3].size_bytes = 20 * GIB }
    );
    rule!(
        partition_at_byte_zero,
        "partitions[4].start_bytes",
        "0 lies inside the partition table area of disk1",
        |m| { m.partitions[4].start_bytes = 0 }
    );
    rule!(
        gpt_partition_without_type_guid,
        "partitions[0].type_guid",
        "needs its type GUID",
        |m| { m.partitions[0].type_guid = None }
    );
    rule!(
        gpt_partition_with_mbr_fields,
        "partitions[0].mbr_type",
        "disk0 is a GPT disk",
        |m| { m.partitions[0].mbr_type = Some("0xef".into()) }
    );
    rule!(
        gpt_partition_with_mbr_kind,
        "partitions[1].mbr_type",
        "disk0 is a GPT disk",
        |m| { m.partitions[1].mbr_kind = Some(MbrKind::Primary) }
    );
    rule!(
        gpt_bad_attributes,
        "partitions[0].attributes",
        "\"0x1\"",
        |m| { m.partitions[0].attributes = Some("0x1".into()) }
    );
    rule!(
        mbr_partition_without_type,
        "partitions[4].mbr_type",
        "needs its type",
        |m| { m.partitions[4].mbr_type = None }
    );
    rule!(
        mbr_partition_bad_type,
        "partitions[4].mbr_type",
        "\"83\"",
        |m| { m.partitions[4].mbr_type = Some("83".into()) }
    );
    rule!(
        mbr_logical_numbered_below_5,
        "partitions[6].number",
        "5 and up logical",
        |m| { m.partitions[6].number = 3 }
    );
    rule!(
        mbr_primary_numbered_above_4,
        "partitions[4].number",
        "5 and up logical",
        |m| { m.partitions[4].number = 6 }
    );
    rule!(
        mbr_partition_with_gpt_fields,
        "partitions[4].type_guid",
        "disk1 is an MBR disk",
        |m| { m.partitions[4].guid = Some(uuid!("11111111-2222-4333-8444-555555555555")) }
    );
    rule!(
        partition_on_disk_without_table,
        "partitions[4].disk",
        "disk1 has no partition table",
        |m| { m.disks[1].table = TableType::None }
    );
    rule!(
        dangling_partition_volume,
        "partitions[1].volume",
        "\"rooot\" names no volume",
        |m| { m.partitions[1].volume = Some("rooot".into()) }
    );
    rule!(
        volume_held_twice,
        "partitions[6].volume",
        "\"home\" is already held by partitions[4]",
        |m| { m.partitions[6].volume = Some("home".into()) }
    );
    rule!(
        extended_partition_holds_volume,
        "partitions[5].volume",
        "extended partition",
        |m| {
            m.partitions[4].volume = None;
            m.partitions[5].volume = Some("home".into());
        }
    );
    rule!(
        overlapping_partitions,
        "partitions[2].start_bytes",
        "partition 3 on disk0 overlaps partition 2",
        |m| { m.partitions[2].start_bytes -= MIB }
    );
    rule!(
        primary_overlaps_extended,
        "partitions[5].start_bytes",
        "partition 2 on disk1 overlaps partition 1",
        |m| { m.partitions[5].start_bytes -= MIB }
    );
    rule!(
        logical_outside_extended,
        "partitions[6].start_bytes",
        "logical partition 5 lies outside",
        |m| { m.partitions[5].size_bytes = GIB }
    );
    rule!(
        logical_before_extended_outside_it,
        "partitions[5].start_bytes",
        "logical partition 5 lies outside",
        |m| {
            // The logical listed before its extended partition: the error still
            // names the logical one.
            m.partitions.swap(5, 6);
            m.partitions[6].size_bytes = GIB;
        }
    );
    rule!(
        overlapping_logicals,
        "partitions[7].start_bytes",
        "partition 6 on disk1 overlaps partition 5",
        |m| {
            let mut second = m.partitions[6].clone();
            second.number = 6;
            second.start_bytes += GIB;
            second.volume = None;
            m.partitions.push(second);
        }
    );

    // [[volumes]]
    rule!(empty_volume_id, "volumes[5].id", "is empty", |m| {
        m.volumes[5].id.clear()
    });
    rule!(
        duplicate_volume_id,
        "volumes[5].id",
        "\"home\" is used by another volume",
        |m| { m.volumes[5].id = "home".into() }
    );
    rule!(
        no_system_volume,
        "volumes",
        "no volume has role \"system\"",
        |m| { m.volumes[1].role = Role::Data }
    );
    rule!(
        two_system_volumes,
        "volumes",
        "2 volumes have role \"system\"",
        |m| { m.volumes[4].role = Role::System }
    );
    rule!(
        two_boot_volumes,
        "volumes",
        "more than one volume has role \"boot\"",
        |m| {
            m.volumes[4].role = Role::Boot;
            m.volumes[5].role = Role::Boot;
        }
    );
    rule!(
        swap_role_without_swap_filesystem,
        "volumes[2].filesystem",
        "not \"ext4\"",
        |m| { m.volumes[2].filesystem = "ext4".into() }
    );
    rule!(
        used_more_than_size,
        "volumes[1].used_bytes",
        "9663676416 is more than size_bytes 8589934592",
        |m| { m.volumes[1].used_bytes = Some(9 * GIB) }
    );
    rule!(
        min_less_than_used,
        "volumes[1].min_size_bytes",
        "2147483648 is less than used_bytes 3221225472",
        |m| { m.volumes[1].min_size_bytes = 2 * GIB }
    );
    rule!(
        min_more_than_size,
        "volumes[2].min_size_bytes",
        "2147483648 is more than size_bytes 1073741824",
        |m| { m.volumes[2].min_size_bytes = 2 * GIB }
    );
    rule!(
        volume_without_partition,
        "volumes[3].id",
        "no partition holds volume \"data\"",
        |m| { m.partitions[3].volume = None }
    );
    rule!(
        volume_larger_than_partition,
        "volumes[3].size_bytes",
        "11811160064 is larger than its partition",
        |m| { m.volumes[3].size_bytes = 11 * GIB }
    );

    // [[commands]]
    rule!(
        command_phase_3,
        "commands[0].phase",
        "3 is not a phase",
        |m| { m.commands[0].phase = 3 }
    );
    rule!(
        command_phase_0,
        "commands[0].phase",
        "0 is not a phase",
        |m| { m.commands[0].phase = 0 }
    );
    rule!(
        duplicate_command_sequence,
        "commands[1].sequence",
        "1 is used twice in phase 2",
        |m| {
            let mut again = m.commands[0].clone();
            again.program = "/usr/sbin/grub-install".into();
            m.commands.push(again);
        }
    );
    rule!(
        empty_command_program,
        "commands[0].program",
        "is empty",
        |m| { m.commands[0].program = " ".into() }
    );
    rule!(
        command_timeout_zero,
        "commands[0].timeout_secs",
        "is 0",
        |m| { m.commands[0].timeout_secs = 0 }
    );

    // [[drivers]]
    rule!(
        duplicate_driver,
        "drivers[1].module",
        "\"st\" is listed twice for kernel 6.1.0-26-amd64",
        |m| {
            let again = m.drivers[0].clone();
            m.drivers.push(again);
        }
    );
    rule!(
        driver_file_outside_bmr_drivers,
        "drivers[0].file",
        "\"/lib/modules/6.1.0-26-amd64/st.ko.xz\"",
        |m| { m.drivers[0].file = "/lib/modules/6.1.0-26-amd64/st.ko.xz".into() }
    );
    rule!(
        driver_file_escaping_bmr_drivers,
        "drivers[0].file",
        "\"bmr/drivers/../../etc/shadow\"",
        |m| { m.drivers[0].file = "bmr/drivers/../../etc/shadow".into() }
    );
    rule!(
        driver_depends_on_unknown_module,
        "drivers[0].depends",
        "\"scsi_mod\" is not among the drivers",
        |m| { m.drivers[0].depends = vec!["scsi_mod".into()] }
    );
    rule!(
        driver_depends_on_other_kernel_module,
        "drivers[0].depends",
        "\"scsi_mod\"",
        |m| {
            let mut other = m.drivers[0].clone();
            other.module = "scsi_mod".into();
            other.kernel = "6.1.0-25-amd64".into();
            other.file = "bmr/drivers/6.1.0-25-amd64/scsi_mod.ko.xz".into();
            m.drivers.push(other);
            m.drivers[0].depends = vec!["scsi_mod".into()];
        }
    );
}

// ---------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any one-byte change anywhere (values, keys, punctuation, any bit) is
    /// refused, or it did not change what the manifest says.
    #[test]
    fn any_byte_flip_is_refused_or_meaningless(at in any::<prop::sample::Index>(), bit in 0..8u8) {
        let original = sample();
        let text = text_of(&original);
        let i = at.index(text.len());
        let mut bytes = text.clone().into_bytes();
        bytes[i] ^= 1 << bit;
        if let Ok(changed) = String::from_utf8(bytes) {
            if let Ok(back) = Manifest::from_toml(&changed) {
                let mut sealed = original;
                seal(&mut sealed);
                prop_assert_eq!(back, sealed, "changed byte {} of:\n{}", i, changed);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn partition_order_does_not_matter(parts in Just(sample().partitions).prop_shuffle()) {
        let mut m = sample();
        m.partitions = parts;
        let errors = validate(&m);
        prop_assert!(errors.is_empty(), "{}", render(&errors));
        let text = m.to_toml().expect("serialises");
        let back = Manifest::from_toml(&text);
        prop_assert!(back.is_ok(), "{:?}", back.err());
    }

    #[test]
    fn seal_verify_round_trip(
        hostname in any::<String>(),
        (min, used) in (0..=8 * GIB).prop_flat_map(|min| (Just(min), proptest::option::of(0..=min))),
    ) {
        let mut m = sample();
        m.system.hostname = hostname.clone();
        m.volumes[1].min_size_bytes = min;
        m.volumes[1].used_bytes = used;
        seal(&mut m);
        prop_assert!(seal::verify(&m).is_ok());

        // A changed value is noticed.
        let mut changed = m.clone();
        changed.system.hostname.push('x');
        let verdict = seal::verify(&changed);
        prop_assert!(matches!(verdict, Err(ChecksumError::Mismatch { .. })), "{:?}", verdict);

        if !hostname.is_empty() {
            let text = m.to_toml().expect("serialises");
            match Manifest::from_toml(&text) {
                Ok(back) => prop_assert_eq!(back, m),
                Err(e) => prop_assert!(false, "{}\n{}", e, text),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Gaps: partition layouts a restore cannot write, which validate.rs does not
// refuse yet. Run with `cargo test manifest -- --ignored`.
// ---------------------------------------------------------------------------

mod gaps {
    use super::*;

    #[track_caller]
    fn assert_error_in(errors: &[ValidationError], prefix: &str) {
        assert!(
            errors.iter().any(|e| e.field.starts_with(prefix)),
            "expected an error in `{prefix}`, got:\n{}",
            render(errors)
        );
    }

    #[test]
    fn logical_partition_without_extended() {
        let errors = errors_for(|m| {
            m.partitions.remove(5);
        });
        assert_error_in(&errors, "partitions[5].");
    }

    #[test]
    fn gpt_partition_over_the_primary_header() {
        let errors = errors_for(|m| {
            m.partitions[0].start_bytes = 4096;
            m.partitions[0].size_bytes = MIB - 4096 + 512 * MIB;
        });
        assert_error_in(&errors, "partitions[0].");
    }

    #[test]
    fn gpt_partition_over_the_backup_header() {
        let errors = errors_for(|m| {
            let data = &mut m.partitions[3];
            data.size_bytes = 20 * GIB - data.start_bytes;
        });
        assert_error_in(&errors, "partitions[3].");
    }

    #[test]
    fn mbr_partition_past_two_tib() {
        let errors = errors_for(|m| {
            m.disks[1].size_bytes = 4096 * GIB;
            m.partitions[5].size_bytes = 4094 * GIB;
            m.partitions[6].size_bytes = 3 * 1024 * GIB;
            m.volumes[5].size_bytes = 3 * 1024 * GIB;
        });
        assert_error_in(&errors, "partitions[");
    }
}
