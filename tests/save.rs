//! `bmr save` and `bmr probe` on real disk images attached to loop devices:
//! the manifest must record exactly what the images hold.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::Value;

/// `sfdisk --json` of a device: the partition table as an independent tool reads it.
fn sfdisk(dev: &str) -> Value {
    serde_json::from_str(&stdout(Command::new("sfdisk").args(["--json", dev]))).unwrap()
}

fn manifest_json(medium: &Path) -> Value {
    serde_json::from_str(&stdout(
        bmr().args(["manifest", "show", "--json"]).arg(medium),
    ))
    .unwrap()
}

fn volume<'a>(m: &'a Value, id: &str) -> &'a Value {
    m["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"] == id)
        .unwrap_or_else(|| panic!("no volume {id} in {m:#}"))
}

fn within(a: u64, b: u64, tolerance: u64) -> bool {
    a.abs_diff(b) <= tolerance
}

/// Partitions in the manifest equal those sfdisk reads, field by field.
fn assert_partitions_match(m: &Value, dev: &str, gpt: bool) {
    let table = sfdisk(dev);
    let sf = table["partitiontable"]["partitions"].as_array().unwrap();
    let parts = m["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), sf.len(), "partition count: {m:#}");
    for (p, s) in parts.iter().zip(sf) {
        let node = s["node"].as_str().unwrap();
        let number: u64 = node.rsplit('p').next().unwrap().parse().unwrap();
        assert_eq!(p["number"], number, "{node}");
        assert_eq!(
            p["start_bytes"],
            s["start"].as_u64().unwrap() * 512,
            "{node} start"
        );
        assert_eq!(
            p["size_bytes"],
            s["size"].as_u64().unwrap() * 512,
            "{node} size"
        );
        if gpt {
            assert_eq!(
                p["type_guid"].as_str().unwrap().to_uppercase(),
                s["type"].as_str().unwrap().to_uppercase(),
                "{node} type"
            );
            assert_eq!(
                p["guid"].as_str().unwrap().to_uppercase(),
                s["uuid"].as_str().unwrap().to_uppercase(),
                "{node} guid"
            );
            assert_eq!(
                p["name"].as_str().unwrap_or(""),
                s["name"].as_str().unwrap_or(""),
                "{node} name"
            );
        } else {
            assert_eq!(
                p["mbr_type"].as_str().unwrap(),
                format!("0x{:0>2}", s["type"].as_str().unwrap()),
                "{node} type"
            );
            assert_eq!(
                p["bootable"].as_bool().unwrap_or(false),
                s["bootable"].as_bool().unwrap_or(false),
                "{node} boot flag"
            );
        }
    }
}

/// Volumes carry the identity blkid reads from each partition.
fn assert_volumes_match_blkid(m: &Value, disk: &LoopDisk) {
    for p in m["partitions"].as_array().unwrap() {
        let Some(vol) = p["volume"].as_str() else {
            continue;
        };
        let v = volume(m, vol);
        let b = blkid(&disk.part(p["number"].as_u64().unwrap() as u32));
        assert_eq!(v["filesystem"], b["TYPE"].as_str(), "{vol} type");
        assert_eq!(v["uuid"], b["UUID"].as_str(), "{vol} uuid");
        assert_eq!(
            v["label"].as_str().unwrap_or(""),
            b.get("LABEL").map(String::as_str).unwrap_or(""),
            "{vol} label"
        );
        assert_eq!(v["size_bytes"], p["size_bytes"], "{vol} size");
    }
}

/// Copies the real st module and what it needs from Debian's kernel package
/// into the system root, as if that kernel were installed there.
fn install_debian_modules(root: &Path) -> Option<String> {
    let kver = sh(&format!("{}/scripts/fetch-debian-kernel", repo().display()))
        .trim()
        .to_string();
    let src = repo().join("target/debian-kernel/lib/modules").join(&kver);
    let dst = root.join("lib/modules").join(&kver);
    let dep = fs::read_to_string(src.join("modules.dep")).ok()?;
    let st = dep.lines().find(|l| l.contains("/st.ko"))?;
    for rel in st.replace(':', " ").split_whitespace() {
        fs::create_dir_all(dst.join(rel).parent().unwrap()).unwrap();
        fs::copy(src.join(rel), dst.join(rel)).unwrap();
    }
    for f in ["modules.dep", "modules.builtin"] {
        fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    Some(kver)
}

#[test]
fn gpt_disk_with_esp_root_swap_and_ntfs() {
    require_root();
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let sys = test_system("gpt", tmp.path());
    let (disk, root) = (&sys.disk, &sys.root);
    let kver = install_debian_modules(&root.dir)
        .expect("Debian kernel modules (scripts/fetch-debian-kernel)");
    let medium = tmp.path().join("medium.img");

    let out = stdout(
        bmr()
            .args(["save", "--medium"])
            .arg(&medium)
            .arg("--system-root")
            .arg(&root.dir)
            .args(["--disk", &disk.dev, "--driver", "st", "--kernel", &kver]),
    );
    assert!(out.contains("1.44 MB floppy image"), "{out}");
    assert_eq!(fs::metadata(&medium).unwrap().len(), 1_474_560);
    assert_eq!(blkid(medium.to_str().unwrap())["LABEL"], "BMR-STATE");
    sh(&format!("fsck.fat -n {} >/dev/null", medium.display()));

    let m = manifest_json(&medium);
    // System facts from the system root.
    assert_eq!(m["system"]["hostname"], "testhost-gpt");
    assert_eq!(m["system"]["os"], "Debian GNU/Linux 12 (bookworm)");
    assert_eq!(m["system"]["bootloader"], "grub");
    assert_eq!(
        m["system"]["firmware"], "uefi",
        "a non-running system with an ESP boots by UEFI"
    );
    assert_eq!(m["system"]["kernel"], kver.as_str());

    // Disk identity and table.
    let d = &m["disks"][0];
    let table = sfdisk(&disk.dev);
    assert_eq!(d["device"], disk.dev.as_str());
    assert_eq!(d["size_bytes"], 256u64 << 20);
    assert_eq!(d["table"], "gpt");
    assert_eq!(
        d["guid"].as_str().unwrap().to_uppercase(),
        table["partitiontable"]["id"].as_str().unwrap()
    );
    assert_eq!(d["logical_sector_size"], 512);
    assert_partitions_match(&m, &disk.dev, true);
    assert_eq!(
        m["partitions"][3]["attributes"], "0x0000000000000001",
        "RequiredPartition attribute bit"
    );
    assert_volumes_match_blkid(&m, disk);

    // Roles and mountpoints from the live mount and the system's fstab.
    let roles: Vec<(&str, &str, &str)> = m["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["id"].as_str().unwrap(),
                v["role"].as_str().unwrap(),
                v["mountpoint"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        roles,
        [
            ("esp", "esp", "/boot/efi"),
            ("root", "system", "/"),
            ("swap", "swap", ""),
            ("srv-data", "data", "/srv/data")
        ]
    );

    // Used bytes: mounted root from statvfs, the rest from on-disk counters,
    // each compared with df on the real mount.
    let root_used = volume(&m, "root")["used_bytes"].as_u64().unwrap();
    assert!(
        within(root_used, df_used(&root.dir), 1 << 20),
        "root {root_used} vs df {}",
        df_used(&root.dir)
    );
    let ntfs_used = volume(&m, "srv-data")["used_bytes"].as_u64().unwrap();
    let ntfs_df = df_used(&Mounted::ntfs3g(&disk.part(4), &tmp.path().join("ntfs")).dir);
    assert!(
        within(ntfs_used, ntfs_df, 64 << 10),
        "ntfs {ntfs_used} vs df {ntfs_df}"
    );
    assert!(
        ntfs_used > 6 << 20,
        "the 6 MiB archive is counted: {ntfs_used}"
    );
    let esp_used = volume(&m, "esp")["used_bytes"].as_u64().unwrap();
    assert!(
        ((1 << 20)..(2 << 20)).contains(&esp_used),
        "esp holds the 1 MiB loader: {esp_used}"
    );
    for v in m["volumes"].as_array().unwrap() {
        let (min, size) = (
            v["min_size_bytes"].as_u64().unwrap(),
            v["size_bytes"].as_u64().unwrap(),
        );
        assert!(
            min <= size && min >= v["used_bytes"].as_u64().unwrap_or(0),
            "{v}"
        );
    }
    assert_eq!(
        volume(&m, "esp")["min_size_bytes"],
        volume(&m, "esp")["size_bytes"],
        "an ESP keeps its size"
    );

    // The tape driver and its dependencies, in load order, byte-identical on the medium.
    let drivers: Vec<&str> = m["drivers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["module"].as_str().unwrap())
        .collect();
    assert_eq!(drivers.last(), Some(&"st"), "{drivers:?}");
    assert!(drivers.contains(&"scsi_mod"), "{drivers:?}");
    for d in m["drivers"].as_array().unwrap() {
        assert!(
            d["vermagic"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{kver} ")),
            "{d}"
        );
        let on_medium = Command::new("mtype")
            .args(["-i"])
            .arg(&medium)
            .arg(format!("::{}", d["file"].as_str().unwrap()))
            .output()
            .unwrap()
            .stdout;
        let name = Path::new(d["file"].as_str().unwrap())
            .file_name()
            .unwrap()
            .to_owned();
        let source = fs::read(
            sh(&format!(
                "find {} -name {}",
                root.dir.join("lib/modules").display(),
                name.to_string_lossy()
            ))
            .trim(),
        )
        .unwrap();
        assert!(on_medium == source, "{} differs on the medium", d["file"]);
    }

    // The catalog names the boot files and fstab with their hashes.
    let cat = Command::new("mtype")
        .arg("-i")
        .arg(&medium)
        .arg("::bmr/catalog.tsv.zst")
        .output()
        .unwrap()
        .stdout;
    let tsv = String::from_utf8(zstd_decode(&cat)).unwrap();
    let kernel_line = tsv
        .lines()
        .find(|l| l.starts_with("/boot/vmlinuz-6.1.0-test-amd64\t"))
        .expect("kernel in catalog");
    let kernel = fs::read(root.dir.join("boot/vmlinuz-6.1.0-test-amd64")).unwrap();
    assert_eq!(
        kernel_line,
        format!(
            "/boot/vmlinuz-6.1.0-test-amd64\t{}\t{}",
            kernel.len(),
            blake3::hash(&kernel).to_hex()
        )
    );
    assert!(tsv.lines().any(|l| l.starts_with("/etc/fstab\t")));
    assert_eq!(
        m["catalog"]["entries"].as_u64().unwrap(),
        tsv.lines().count() as u64
    );

    // The same probe, read-only, as `bmr probe --json`.
    let probe: Value = serde_json::from_str(&stdout(
        bmr().args(["probe", "--json", "--disk", &disk.dev]),
    ))
    .unwrap();
    assert_eq!(probe["disks"][0]["partitions"].as_array().unwrap().len(), 4);
    assert_eq!(
        probe["disks"][0]["partitions"][3]["filesystem"]["filesystem"],
        "ntfs"
    );
}

fn zstd_decode(data: &[u8]) -> Vec<u8> {
    let mut child = Command::new("zstd")
        .args(["-d", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(data).unwrap();
    child.wait_with_output().unwrap().stdout
}

#[test]
fn mbr_disk_with_fat32_and_a_logical_partition() {
    require_root();
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let sys = test_system("mbr", tmp.path());
    let disk = &sys.disk;
    let medium = tmp.path().join("medium.img");
    sys.save(&medium);

    let m = manifest_json(&medium);
    assert_eq!(m["disks"][0]["table"], "mbr");
    assert_eq!(m["disks"][0]["signature"], "0x1234abcd");
    assert_eq!(m["system"]["firmware"], "bios");
    assert!(m.get("catalog").is_none());
    assert_partitions_match(&m, &disk.dev, false);
    let kinds: Vec<(u64, &str)> = m["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["number"].as_u64().unwrap(),
                p["mbr_kind"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            (1, "primary"),
            (2, "primary"),
            (3, "extended"),
            (5, "logical")
        ]
    );
    assert!(
        m["partitions"][2].get("volume").is_none(),
        "an extended partition holds no volume"
    );
    assert_volumes_match_blkid(&m, disk);

    let roles: Vec<(&str, &str, &str, &str)> = m["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["id"].as_str().unwrap(),
                v["role"].as_str().unwrap(),
                v["filesystem"].as_str().unwrap(),
                v["mountpoint"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        roles,
        [
            ("root", "system", "ext4", "/"),
            ("srv-fat", "data", "vfat", "/srv/fat"),
            ("srv-logical", "data", "ext4", "/srv/logical")
        ]
    );

    // FAT32 used space against fsck.fat's cluster count.
    let fsck = stdout(Command::new("fsck.fat").args(["-n", "-v", &disk.part(2)]));
    let clusters: Vec<u64> = fsck
        .lines()
        .find(|l| l.contains(" files, "))
        .and_then(|l| l.split(',').nth(1))
        .map(|s| {
            s.trim()
                .trim_end_matches(" clusters")
                .split('/')
                .map(|n| n.trim().parse().unwrap())
                .collect()
        })
        .unwrap_or_else(|| panic!("no cluster count in {fsck}"));
    let fat_used = volume(&m, "srv-fat")["used_bytes"].as_u64().unwrap();
    assert_eq!(fat_used, clusters[0] * 512, "{fsck}");
    assert!(fat_used >= 2 << 20, "the 2 MiB payload counts");

    // The unmounted logical ext4 from its superblock, against df once mounted.
    let logical_used = volume(&m, "srv-logical")["used_bytes"].as_u64().unwrap();
    let mounted = Mounted::new(&disk.part(5), &tmp.path().join("logical"), &["-o", "ro"]);
    assert!(
        within(logical_used, df_used(&mounted.dir), 256 << 10),
        "logical {logical_used} vs df {}",
        df_used(&mounted.dir)
    );
}

#[test]
fn medium_on_an_existing_fat_partition_keeps_other_files() {
    require_root();
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let sys = test_system("mbr", tmp.path());
    let (disk, root) = (&sys.disk, &sys.root);

    // A USB stick with one FAT partition that already holds the admin's notes.
    let stick_img = tmp.path().join("stick.img");
    sh(&format!(
        "truncate -s 64M {0} && echo 'start=2048, type=c' | sfdisk -q {0}",
        stick_img.display()
    ));
    let stick = LoopDisk::attach(&stick_img);
    let part = stick.part(1);
    sh(&format!("mkfs.vfat -n BMR-STATE {part} >/dev/null && echo 'call Bob' > {0}/notes.txt && mcopy -i {part} {0}/notes.txt ::notes.txt", tmp.path().display()));

    for round in 0..2 {
        let out = stdout(
            bmr()
                .args(["save", "--medium", &part, "--system-root"])
                .arg(&root.dir)
                .args(["--disk", &disk.dev]),
        );
        assert!(
            out.contains("files replaced in its FAT filesystem"),
            "round {round}: {out}"
        );
        let m = manifest_json(Path::new(&part));
        assert_eq!(m["system"]["hostname"], "testhost-mbr");
    }
    assert_eq!(
        stdout(Command::new("mtype").args(["-i", &part, "::notes.txt"])),
        "call Bob\n"
    );
    let listing = stdout(Command::new("mdir").args(["-b", "-/", "-i", &part, "::"]));
    assert_eq!(
        listing
            .lines()
            .filter(|l| l.ends_with("manifest.toml"))
            .count(),
        1,
        "{listing}"
    );
    sh(&format!("fsck.fat -n {part} >/dev/null"));

    // A partition without FAT is not formatted behind the admin's back.
    sh(&format!(
        "dd if=/dev/zero of={part} bs=64k count=16 status=none"
    ));
    let out = bmr()
        .args(["save", "--medium", &part, "--system-root"])
        .arg(&root.dir)
        .args(["--disk", &disk.dev])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("holds no FAT filesystem")
            && err.contains("mkfs.vfat"),
        "{err}"
    );
}
