//! `bmr plan` and `bmr apply` on loop devices: tables, types, GUIDs, UUIDs and
//! labels end up as planned; interrupted runs continue; bad input stops
//! before anything is written.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use serde_json::Value;

/// A recovery medium saved from a freshly built test system disk.
struct Saved {
    tmp: tempfile::TempDir,
    medium: PathBuf,
    source: PathBuf,
}

fn saved(kind: &str) -> Saved {
    let tmp = tempfile::tempdir().unwrap();
    let medium = tmp.path().join("medium.img");
    let source = {
        let sys = test_system(kind, tmp.path());
        sys.save(&medium);
        sys.image.clone()
    };
    Saved {
        tmp,
        medium,
        source,
    }
}

fn blank(dir: &Path, name: &str, mib: u64) -> (PathBuf, LoopDisk) {
    let img = dir.join(name);
    let f = fs::File::create(&img).unwrap();
    f.set_len(mib << 20).unwrap();
    let disk = LoopDisk::attach(&img);
    (img, disk)
}

fn sfdisk(dev: &Path) -> Value {
    serde_json::from_str(&stdout(Command::new("sfdisk").arg("--json").arg(dev))).unwrap()
}

fn parts(table: &Value) -> Vec<Value> {
    table["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let mut p = p.clone();
            p.as_object_mut().unwrap().remove("node");
            p
        })
        .collect()
}

fn apply(s: &Saved, disk: &LoopDisk, extra: &[&str]) -> Output {
    bmr()
        .args(["apply", "--yes", "--medium"])
        .arg(&s.medium)
        .args(["--disk", &disk.dev, "--journal"])
        .arg(s.tmp.path().join("journal.json"))
        .args(extra)
        .output()
        .unwrap()
}

fn plan_json(s: &Saved, disk: &LoopDisk) -> Value {
    serde_json::from_str(&stdout(
        bmr()
            .args(["plan", "--json", "--medium"])
            .arg(&s.medium)
            .args(["--disk", &disk.dev]),
    ))
    .unwrap()
}

fn volume<'a>(plan: &'a Value, id: &str) -> &'a Value {
    plan["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"] == id)
        .unwrap()
}

#[test]
fn same_size_disk_gets_the_saved_layout() {
    require_root();
    let _turn = serial();
    let s = saved("gpt");
    let (_img, disk) = blank(s.tmp.path(), "target.img", 256);
    let plan = plan_json(&s, &disk);
    assert_eq!(volume(&plan, "root")["action"], "restore-image");
    assert_eq!(volume(&plan, "swap")["action"], "create");
    ok(apply(&s, &disk, &[]));

    let want = sfdisk(&s.source);
    let got = sfdisk(Path::new(&disk.dev));
    assert_eq!(
        got["partitiontable"]["id"], want["partitiontable"]["id"],
        "disk GUID kept"
    );
    assert_eq!(
        parts(&got),
        parts(&want),
        "starts, sizes, types, GUIDs, names and attributes as saved"
    );
    // swap was made anew with its identity; image volumes are wiped, waiting for their images.
    let swap = blkid(&disk.part(3));
    assert_eq!(
        (
            swap["TYPE"].as_str(),
            swap["UUID"].as_str(),
            swap["LABEL"].as_str()
        ),
        ("swap", "33333333-0000-4000-8000-000000000003", "swap")
    );
    for n in [1, 2, 4] {
        assert!(
            !blkid(&disk.part(n)).contains_key("TYPE"),
            "partition {n} must hold no stale filesystem"
        );
    }
}

#[test]
fn smaller_disk_recreates_the_system_for_a_file_copy_and_drops_what_does_not_fit() {
    require_root();
    let _turn = serial();
    let s = saved("gpt");
    let (_img, disk) = blank(s.tmp.path(), "small.img", 160);
    let plan = plan_json(&s, &disk);
    let root = volume(&plan, "root");
    assert_eq!(root["action"], "restore-files", "{root}");
    assert!(root["reason"]
        .as_str()
        .unwrap()
        .contains("smaller than the filesystem"));
    assert!(root["size_bytes"].as_u64().unwrap() >= root["min_size_bytes"].as_u64().unwrap());
    let dropped: Vec<&str> = plan["dropped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        dropped,
        ["swap", "srv-data"],
        "swap and data dropped, lowest priority first: {plan:#}"
    );
    assert!(plan["dropped"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("not enough room"));

    ok(apply(&s, &disk, &[]));
    let table = sfdisk(Path::new(&disk.dev));
    assert_eq!(parts(&table).len(), 2, "ESP and root only");
    let b = blkid(&disk.part(2));
    assert_eq!(
        (b["TYPE"].as_str(), b["UUID"].as_str(), b["LABEL"].as_str()),
        ("ext4", "22222222-0000-4000-8000-000000000002", "root")
    );
    sh(&format!("e2fsck -fn {} >/dev/null", disk.part(2)));
}

#[test]
fn mbr_with_a_logical_partition_onto_a_larger_disk() {
    require_root();
    let _turn = serial();
    let s = saved("mbr");
    let (_img, disk) = blank(s.tmp.path(), "big.img", 256);
    ok(apply(&s, &disk, &[]));
    let t = sfdisk(Path::new(&disk.dev));
    assert_eq!(t["partitiontable"]["label"], "dos");
    assert_eq!(t["partitiontable"]["id"], "0x1234abcd");
    let p = parts(&t);
    let summary: Vec<(String, bool)> = p
        .iter()
        .map(|p| {
            (
                p["type"].as_str().unwrap().to_string(),
                p["bootable"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("83".into(), true),
            ("c".into(), false),
            ("5".into(), false),
            ("83".into(), false)
        ]
    );
    let nodes: Vec<String> = t["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["node"].as_str().unwrap().to_string())
        .collect();
    assert!(
        nodes[3].ends_with("p5"),
        "the logical partition keeps number 5: {nodes:?}"
    );
    // Proportional growth: every volume larger than saved, the logical inside the extended.
    let saved_t = sfdisk(&s.source);
    let before = parts(&saved_t);
    for i in [0, 1, 3] {
        assert!(
            p[i]["size"].as_u64().unwrap() > before[i]["size"].as_u64().unwrap(),
            "partition {i} grew: {p:?}"
        );
    }
    let (ext, log) = (&p[2], &p[3]);
    assert!(log["start"].as_u64().unwrap() > ext["start"].as_u64().unwrap());
    assert!(
        log["start"].as_u64().unwrap() + log["size"].as_u64().unwrap()
            <= ext["start"].as_u64().unwrap() + ext["size"].as_u64().unwrap()
    );
}

#[test]
fn an_interrupted_apply_continues_where_it_stopped() {
    require_root();
    let _turn = serial();
    let s = saved("gpt");
    let (_img, disk) = blank(s.tmp.path(), "small.img", 160);
    for stop in [format!("table:{}", disk.dev), "mkfs:root".to_string()] {
        let out = bmr()
            .env("BMR_FAILPOINT", &stop)
            .args(["apply", "--yes", "--medium"])
            .arg(&s.medium)
            .args(["--disk", &disk.dev, "--journal"])
            .arg(s.tmp.path().join("journal.json"))
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(75),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let journal: Value =
            serde_json::from_slice(&fs::read(s.tmp.path().join("journal.json")).unwrap()).unwrap();
        assert_eq!(journal["state"], "running");
        assert_eq!(
            journal["steps"].as_array().unwrap().last().unwrap(),
            stop.as_str()
        );

        let text = ok(apply(&s, &disk, &[]));
        assert!(text.contains("continuing an interrupted run"), "{text}");
        assert!(
            text.contains(&format!("{stop}: done in an earlier run")),
            "{text}"
        );
        let b = blkid(&disk.part(2));
        assert_eq!(b["UUID"], "22222222-0000-4000-8000-000000000002");
        let journal: Value =
            serde_json::from_slice(&fs::read(s.tmp.path().join("journal.json")).unwrap()).unwrap();
        assert_eq!(journal["state"], "done");
        // Start the next round from a blank disk.
        sh(&format!(
            "dd if=/dev/zero of={} bs=1M count=2 status=none",
            disk.dev
        ));
    }
}

#[test]
fn bad_input_stops_before_writing() {
    require_root();
    let _turn = serial();
    let s = saved("gpt");
    let (img, disk) = blank(s.tmp.path(), "target.img", 256);
    sh(&format!(
        "printf 'precious' | dd of={} bs=1 seek=1048576 conv=notrunc status=none",
        disk.dev
    ));
    let before = file_hash(&img);

    let out = bmr()
        .args(["apply", "--medium"])
        .arg(&s.medium)
        .args(["--disk", &disk.dev])
        .output()
        .unwrap();
    assert!(ok(out).contains("add --yes"));
    let err = refused(apply(&s, &disk, &["--map", "disk7=/dev/vdz"]));
    assert!(
        err.contains("--map names disk7") && err.contains("disk0"),
        "{err}"
    );
    let err = refused(apply(
        &s,
        &disk,
        &["--map", &format!("disk0={}", "/dev/bmr-none")],
    ));
    assert!(
        err.contains("/dev/bmr-none is not among the disks found"),
        "{err}"
    );
    let err = refused(apply(&s, &disk, &["--policy", "biggest"]));
    assert!(
        err.contains("proportional") && err.contains("grow-last"),
        "{err}"
    );
    assert_eq!(file_hash(&img), before, "nothing written");

    // A mounted target is in use: never chosen, and refused when named.
    let (_busy_img, busy) = {
        let img = s.tmp.path().join("busy.img");
        make_disk("mbr", &img);
        let d = LoopDisk::attach(&img);
        (img, d)
    };
    let mounted = Mounted::new(&busy.part(1), &s.tmp.path().join("busy"), &[]);
    let err = refused(apply(&s, &busy, &["--map", &format!("disk0={}", busy.dev)]));
    assert!(
        err.contains("protected (in use:") && err.contains("mounted at"),
        "{err}"
    );
    drop(mounted);

    // A USB stick with the rescue ISO written to it is the system the
    // operator booted: never a target, even when named.
    let stick_img = s.tmp.path().join("stick.img");
    let iso_dir = s.tmp.path().join("iso");
    fs::create_dir_all(&iso_dir).unwrap();
    fs::write(iso_dir.join("hello"), b"rescue").unwrap();
    run(Command::new("xorriso")
        .args(["-as", "mkisofs", "-quiet", "-V", "BMR-RESCUE", "-o"])
        .arg(&stick_img)
        .arg(&iso_dir));
    let stick_size = fs::metadata(&stick_img).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&stick_img)
        .unwrap()
        .set_len(stick_size.max(300 << 20))
        .unwrap();
    let stick = LoopDisk::attach(&stick_img);
    let before_stick = file_hash(&stick_img);
    let err = refused(apply(
        &s,
        &stick,
        &["--map", &format!("disk0={}", stick.dev)],
    ));
    assert!(err.contains("bmr rescue system"), "{err}");
    drop(stick);
    assert_eq!(
        file_hash(&stick_img),
        before_stick,
        "rescue stick untouched"
    );

    // The plan is made, then the disk behind the name changes before apply.
    let plan_file = s.tmp.path().join("plan.json");
    fs::write(
        &plan_file,
        stdout(
            bmr()
                .args(["plan", "--json", "--medium"])
                .arg(&s.medium)
                .args(["--disk", &disk.dev]),
        ),
    )
    .unwrap();
    sh(&format!(
        "losetup -c {} && truncate -s 128M {} && losetup -c {}",
        disk.dev,
        img.display(),
        disk.dev
    ));
    let before = file_hash(&img);
    let err = refused(apply(&s, &disk, &["--plan", plan_file.to_str().unwrap()]));
    assert!(
        err.contains("preflight failed, nothing was written")
            && err.contains("plan was made for 256 MiB"),
        "{err}"
    );
    assert_eq!(file_hash(&img), before, "nothing written");
}

#[test]
fn onto_a_4k_sector_disk() {
    require_root();
    let _turn = serial();
    let s = saved("gpt");
    let img = s.tmp.path().join("4kn.img");
    fs::File::create(&img).unwrap().set_len(512 << 20).unwrap();
    let dev = stdout(
        Command::new("losetup")
            .args(["-f", "--show", "--sector-size", "4096"])
            .arg(&img),
    )
    .trim()
    .to_string();
    let disk = LoopDisk { dev };
    let plan = plan_json(&s, &disk);
    let esp = volume(&plan, "esp");
    assert_eq!(
        esp["action"], "restore-files",
        "a 512-byte-sector FAT cannot live on 4096-byte sectors: {esp}"
    );
    assert!(esp["reason"]
        .as_str()
        .unwrap()
        .contains("4096-byte sectors"));
    ok(apply(&s, &disk, &[]));
    let t = sfdisk(Path::new(&disk.dev));
    assert_eq!(t["partitiontable"]["sectorsize"], 4096);
    for p in parts(&t) {
        assert_eq!(
            p["start"].as_u64().unwrap() * 4096 % (1 << 20),
            0,
            "1 MiB aligned in 4 KiB sectors: {p}"
        );
    }
    let b = blkid(&disk.part(1));
    assert_eq!(
        (b["TYPE"].as_str(), b["UUID"].as_str(), b["LABEL"].as_str()),
        ("vfat", "0E5F-0001", "ESP")
    );
    sh(&format!("fsck.fat -n {} >/dev/null", disk.part(1)));
}

#[test]
fn a_failed_step_erases_the_half_written_table_unless_asked_to_keep_it() {
    require_root();
    let _turn = serial();
    let s = saved("gpt");
    let (_img, disk) = blank(s.tmp.path(), "small.img", 160);
    // A mke2fs that fails, first in PATH.
    let bin = s.tmp.path().join("bin");
    fs::create_dir_all(&bin).unwrap();
    let fake = bin.join("mke2fs");
    fs::write(
        &fake,
        "#!/bin/sh\necho 'mke2fs: simulated failure' >&2\nexit 1\n",
    )
    .unwrap();
    sh(&format!("chmod +x {}", fake.display()));
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());

    let run_failing = |extra: &[&str]| {
        bmr()
            .env("PATH", &path)
            .args(["apply", "--yes", "--medium"])
            .arg(&s.medium)
            .args(["--disk", &disk.dev, "--journal"])
            .arg(s.tmp.path().join("j.json"))
            .args(extra)
            .output()
            .unwrap()
    };
    let err = refused(run_failing(&[]));
    assert!(
        err.contains("simulated failure") && err.contains("were erased"),
        "{err}"
    );
    let out = Command::new("sfdisk")
        .args(["--json", &disk.dev])
        .output()
        .unwrap();
    assert!(
        !out.status.success() || String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "no table is left: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    let err = refused(run_failing(&["--keep-on-error"]));
    assert!(err.contains("--keep-on-error"), "{err}");
    assert_eq!(
        parts(&sfdisk(Path::new(&disk.dev))).len(),
        2,
        "the table is kept for inspection"
    );
}
