//! `bmr backup`: every volume of a saved system imaged into a repository,
//! boot and system first, mounted ones frozen, names recorded on the medium.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::*;

#[test]
fn backup_images_every_volume_and_records_them_on_the_medium() {
    require_root();
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let sys = test_system("gpt", tmp.path());
    let root = &sys.root;
    let medium = tmp.path().join("medium.img");
    sys.save(&medium);

    // The images cannot go onto the filesystem that has to be frozen.
    let inside = root.dir.join("repo");
    let out = bmr()
        .args(["backup", "--consistency", "freeze", "--medium"])
        .arg(&medium)
        .arg("--to")
        .arg(&inside)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("cannot be frozen"),
        "{err}"
    );
    fs::remove_dir_all(&inside).unwrap();

    let repo = tmp.path().join("repo");
    let out = stdout(
        bmr()
            .args(["backup", "--medium"])
            .arg(&medium)
            .arg("--to")
            .arg(&repo),
    );
    let order: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split(':').next())
        .filter(|v| ["esp", "root", "srv-data", "swap"].contains(v))
        .collect();
    assert_eq!(
        order,
        ["esp", "root", "srv-data", "swap"],
        "boot and system volumes first: {out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("root:") && l.contains("frozen")),
        "the mounted root was frozen while read: {out}"
    );

    let m: serde_json::Value = serde_json::from_str(&stdout(
        bmr().args(["manifest", "show", "--json"]).arg(&medium),
    ))
    .unwrap();
    for v in m["volumes"].as_array().unwrap() {
        let image = repo.join(
            v["image"]
                .as_str()
                .unwrap_or_else(|| panic!("no image recorded for {v}")),
        );
        run(bmr().args(["image", "verify"]).arg(&image));
        let info: serde_json::Value =
            serde_json::from_str(&stdout(bmr().args(["image", "info", "--json"]).arg(&image)))
                .unwrap();
        assert_eq!(info["volume"]["uuid"], v["uuid"]);
    }
    assert!(repo.join("testhost-gpt.manifest.toml").is_file());
    run(bmr()
        .args(["manifest", "check"])
        .arg(repo.join("testhost-gpt.manifest.toml")));

    // The system image restores to a filesystem holding the same files.
    let root_image = repo.join(m["volumes"][1]["image"].as_str().unwrap());
    let target = tmp.path().join("restored.img");
    fs::File::create(&target)
        .unwrap()
        .set_len(160 << 20)
        .unwrap();
    run(bmr()
        .args(["image", "restore", "--from"])
        .arg(&root_image)
        .arg("--device")
        .arg(&target));
    sh(&format!("e2fsck -fn {} >/dev/null", target.display()));
    let back = tmp.path().join("back");
    fs::create_dir_all(&back).unwrap();
    run(Command::new("mount")
        .args(["-o", "ro,loop"])
        .arg(&target)
        .arg(&back));
    let _m = Mounted { dir: back.clone() };
    let same = |p: &str| fs::read(root.dir.join(p)).unwrap() == fs::read(back.join(p)).unwrap();
    assert!(
        same("usr/lib/bmr-test/payload")
            && same("etc/fstab")
            && same("boot/vmlinuz-6.1.0-test-amd64")
    );
    assert!(!Path::new(&back.join("repo")).exists());
}
