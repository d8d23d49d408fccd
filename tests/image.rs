//! Volume images on real filesystems made by the real tools: round trips,
//! file-level restore, incremental chains, repository dedup, encryption and
//! every kind of damage.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

fn file(dir: &Path, name: &str, mib: u64) -> PathBuf {
    let p = dir.join(name);
    fs::File::create(&p).unwrap().set_len(mib << 20).unwrap();
    p
}

/// Mounts a filesystem image through a loop device (kernel ext4) or ntfs-3g.
fn mount_img(img: &Path, dir: &Path, ntfs: bool, ro: bool) -> Mounted {
    fs::create_dir_all(dir).unwrap();
    if ntfs {
        run(Command::new("ntfs-3g")
            .args(if ro { vec!["-o", "ro"] } else { vec![] })
            .arg(img)
            .arg(dir));
    } else {
        run(Command::new("mount")
            .args(["-o", if ro { "ro,loop" } else { "loop" }])
            .arg(img)
            .arg(dir));
    }
    Mounted {
        dir: dir.to_path_buf(),
    }
}

/// Everything a file-level comparison should see: names, types, modes,
/// owners, times, sizes, link counts and targets, xattrs, content hashes.
fn tree(dir: &Path) -> String {
    sh(&format!(
        "cd {} && find . -path ./lost+found -prune -o -printf '%p %y %m %U %G %T@ %s %n %l\\n' | awk '$2==\"d\"{{$7=\"-\"}}1' | sort && \
         find . -path ./lost+found -prune -o -type f -print0 | sort -z | xargs -0 -r md5sum && \
         (getfattr -R -d -m - . 2>/dev/null | grep -v '^#' | sort || true)",
        dir.display()
    ))
}

/// Compares two trees, naming only the lines that differ.
fn assert_same_tree(got: &str, want: &str, what: &str) {
    let g: std::collections::BTreeSet<&str> = got.lines().collect();
    let w: std::collections::BTreeSet<&str> = want.lines().collect();
    let missing: Vec<&&str> = w.difference(&g).take(10).collect();
    let extra: Vec<&&str> = g.difference(&w).take(10).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what}: missing {missing:#?}\nunexpected {extra:#?}"
    );
}

fn ext4_volume(dir: &Path, mib: u64) -> PathBuf {
    let img = file(dir, "vol.img", mib);
    run(Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-L",
            "tvol",
            "-U",
            "66666666-0000-4000-8000-000000000006",
        ])
        .arg(&img));
    let m = mount_img(&img, &dir.join("fill"), false, false);
    sh(&format!(
        "cd {0} && head -c 20M /dev/urandom > random && seq 1 1000000 > counting && mkdir -p d/e && \
         for i in $(seq 1 200); do echo $i > d/e/file$i; done && ln counting hardlink && ln -s d/e/file7 symlink && \
         truncate -s 50M sparse && echo hole-end >> sparse && mknod char c 1 3 && mkfifo fifo && \
         chown 1234:5678 random && chmod 0640 random && touch -d 2001-02-03 counting && setfattr -n user.bmr -v kept random",
        m.dir.display()
    ));
    drop(m);
    img
}

/// `bmr image create --device VOL --to IMG`, which must succeed; its output.
fn create_image(vol: &Path, img: &Path) -> String {
    ok(bmr_out(
        &["image", "create", "--device"],
        &[vol, Path::new("--to"), img],
    ))
}

fn bmr_out(args: &[&str], extra: &[&Path]) -> Output {
    bmr().args(args).args(extra).output().unwrap()
}

#[test]
fn ext4_round_trip_same_size_and_larger_then_file_level_onto_smaller() {
    require_root();
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let vol = ext4_volume(tmp.path(), 128);
    let want = tree(&mount_img(&vol, &tmp.path().join("orig"), false, true).dir);
    let img = tmp.path().join("vol.bmri");
    let out = create_image(&vol, &img);
    assert!(out.contains("used"), "{out}");
    let info: serde_json::Value =
        serde_json::from_str(&ok(bmr_out(&["image", "info", "--json"], &[&img]))).unwrap();
    assert_eq!(
        info["volume"]["uuid"],
        "66666666-0000-4000-8000-000000000006"
    );
    assert!(info["chunks"]["metadata"].as_u64().unwrap() > 0, "{info}");
    assert_eq!(
        (info["format"].as_u64(), info["chunk_size"].as_u64()),
        (Some(1), Some(4 << 20)),
        "a full image file: format 1 (older bmr read it), 4 MiB chunks: {info}"
    );
    assert!(
        info["stored_bytes"].as_u64().unwrap() < 40 << 20,
        "used blocks only, compressed: {info}"
    );
    ok(bmr_out(&["image", "verify"], &[&img]));

    for (name, mib) in [("same.img", 128), ("larger.img", 192)] {
        let target = file(tmp.path(), name, mib);
        let out = ok(bmr_out(
            &["image", "restore", "--from"],
            &[&img, Path::new("--device"), &target],
        ));
        sh(&format!("e2fsck -fn {} >/dev/null", target.display()));
        if mib > 128 {
            assert!(out.contains("grown with resize2fs"), "{out}");
            let blocks = sh(&format!(
                "dumpe2fs -h {} 2>/dev/null | awk -F: '/^Block count/{{print $2}}'",
                target.display()
            ));
            let bsize = sh(&format!(
                "dumpe2fs -h {} 2>/dev/null | awk -F: '/^Block size/{{print $2}}'",
                target.display()
            ));
            assert_eq!(
                blocks.trim().parse::<u64>().unwrap() * bsize.trim().parse::<u64>().unwrap(),
                192 << 20,
                "filesystem fills the partition"
            );
        }
        let got = tree(&mount_img(&target, &tmp.path().join(format!("m-{name}")), false, true).dir);
        assert_same_tree(
            &got,
            &want,
            &format!("{name}: every file, its metadata and content"),
        );
    }

    let small = file(tmp.path(), "small.img", 96);
    let err = refused(bmr_out(
        &["image", "restore", "--from"],
        &[&img, Path::new("--device"), &small],
    ));
    assert!(
        err.contains("smaller than the filesystem") && err.contains("--files"),
        "{err}"
    );
    ok(bmr_out(
        &["image", "restore", "--files", "--from"],
        &[&img, Path::new("--device"), &small],
    ));
    sh(&format!("e2fsck -fn {} >/dev/null", small.display()));
    let b = blkid(small.to_str().unwrap());
    assert_eq!(
        (b["UUID"].as_str(), b["LABEL"].as_str()),
        ("66666666-0000-4000-8000-000000000006", "tvol")
    );
    let got = tree(&mount_img(&small, &tmp.path().join("m-small"), false, true).dir);
    assert_same_tree(
        &got,
        &want,
        "file-level restore keeps owners, modes, times, xattrs, links, nodes, holes",
    );
}

#[test]
fn fat32_and_ntfs_round_trips() {
    require_root();
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    // FAT32: no vfat driver on every kernel we test on, so mtools reads it.
    let fat = file(tmp.path(), "fat.img", 96);
    sh(&format!(
        "mkfs.vfat -F 32 -n FATVOL -i 0F0F0F0F {0} >/dev/null && head -c 7M /dev/urandom > {1}/r && seq 1 100000 > {1}/s && \
         mmd -i {0} ::dir && mcopy -i {0} {1}/r ::dir/r && mcopy -i {0} {1}/s ::s",
        fat.display(),
        tmp.path().display()
    ));
    let img = tmp.path().join("fat.bmri");
    create_image(&fat, &img);
    let target = file(tmp.path(), "fat-big.img", 160);
    ok(bmr_out(
        &["image", "restore", "--from"],
        &[&img, Path::new("--device"), &target],
    ));
    sh(&format!("fsck.fat -n {} >/dev/null", target.display()));
    assert_eq!(
        sh(&format!("mtype -i {} ::dir/r | md5sum", target.display())),
        sh(&format!("md5sum < {}/r", tmp.path().display()))
    );
    assert_eq!(
        sh(&format!("mtype -i {} ::s | md5sum", target.display())),
        sh(&format!("md5sum < {}/s", tmp.path().display()))
    );
    assert_eq!(blkid(target.to_str().unwrap())["UUID"], "0F0F-0F0F");

    // NTFS through ntfs-3g.
    let ntfs = file(tmp.path(), "ntfs.img", 96);
    run(Command::new("mkntfs")
        .args(["-Q", "-q", "-F", "-L", "NTVOL"])
        .arg(&ntfs));
    {
        let m = mount_img(&ntfs, &tmp.path().join("nfill"), true, false);
        sh(&format!(
            "head -c 9M /dev/urandom > {0}/big && mkdir {0}/sub && echo hello > {0}/sub/hi",
            m.dir.display()
        ));
    }
    let want = tree(&mount_img(&ntfs, &tmp.path().join("norig"), true, true).dir);
    let img = tmp.path().join("ntfs.bmri");
    create_image(&ntfs, &img);
    let target = file(tmp.path(), "ntfs-big.img", 128);
    let out = ok(bmr_out(
        &["image", "restore", "--from"],
        &[&img, Path::new("--device"), &target],
    ));
    assert!(out.contains("grown with ntfsresize"), "{out}");
    let got = tree(&mount_img(&target, &tmp.path().join("nrest"), true, true).dir);
    assert_same_tree(&got, &want, "ntfs");
}

#[test]
fn incremental_chain_of_three_and_repository_dedup() {
    require_root();
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let vol = ext4_volume(tmp.path(), 128);
    let imgs: Vec<PathBuf> = (1..=3)
        .map(|i| tmp.path().join(format!("v{i}.bmri")))
        .collect();
    create_image(&vol, &imgs[0]);
    for i in 1..3 {
        {
            let m = mount_img(&vol, &tmp.path().join(format!("c{i}")), false, false);
            sh(&format!(
                "head -c 3M /dev/urandom > {0}/new{i} && rm {0}/d/e/file{i}",
                m.dir.display()
            ));
        }
        let out = ok(bmr_out(
            &["image", "create", "--device"],
            &[
                &vol,
                Path::new("--to"),
                &imgs[i],
                Path::new("--parent"),
                &imgs[i - 1],
            ],
        ));
        assert!(out.contains("from the parent"), "{out}");
        let info: serde_json::Value =
            serde_json::from_str(&ok(bmr_out(&["image", "info", "--json"], &[&imgs[i]]))).unwrap();
        let c = &info["chunks"];
        let all: u64 = ["metadata", "data", "zero", "parent", "repository"]
            .iter()
            .map(|k| c[k].as_u64().unwrap())
            .sum();
        assert!(
            c["parent"].as_u64().unwrap() * 2 > all,
            "most chunks are the parent's: {info}"
        );
        assert_eq!(info["chunk_size"], 4 << 20, "cut like its parent: {info}");
        assert_eq!(info["format"], 2, "it may hold piecewise deltas: {info}");
        let child = fs::metadata(&imgs[i]).unwrap().len();
        assert!(
            child < 10 << 20,
            "only the ~3 MiB change is stored, not {child}"
        );
        assert_eq!(info["chain_length"], i as u64 + 1);
    }
    // An incremental image is cut like its parent, or refused.
    let odd = tmp.path().join("odd.bmri");
    let err = refused(bmr_out(
        &["image", "create", "--chunk-kib", "1024", "--device"],
        &[
            &vol,
            Path::new("--to"),
            &odd,
            Path::new("--parent"),
            &imgs[2],
        ],
    ));
    assert!(
        err.contains("4096 KiB chunks") && err.contains("leave out --chunk-kib"),
        "{err}"
    );
    assert!(!odd.exists());

    let want = tree(&mount_img(&vol, &tmp.path().join("final"), false, true).dir);
    let target = file(tmp.path(), "t.img", 128);
    ok(bmr_out(&["image", "verify"], &[&imgs[2]]));
    ok(bmr_out(
        &["image", "restore", "--from"],
        &[&imgs[2], Path::new("--device"), &target],
    ));
    assert_same_tree(
        &tree(&mount_img(&target, &tmp.path().join("rest"), false, true).dir),
        &want,
        "chain of three",
    );

    // A missing parent is found before anything is written.
    fs::rename(&imgs[0], tmp.path().join("moved.bmri")).unwrap();
    let target2 = file(tmp.path(), "t2.img", 128);
    let before = file_hash(&target2);
    let err = refused(bmr_out(
        &["image", "restore", "--from"],
        &[&imgs[2], Path::new("--device"), &target2],
    ));
    assert!(
        err.contains("cannot be opened") && err.contains("v1.bmri"),
        "{err}"
    );
    assert_eq!(file_hash(&target2), before);

    // Two similar volumes share their chunks in a repository.
    let repo = tmp.path().join("repo");
    fs::create_dir(&repo).unwrap();
    let copy = tmp.path().join("copy.img");
    fs::copy(&vol, &copy).unwrap();
    ok(bmr_out(
        &["image", "create", "--name", "first", "--device"],
        &[&vol, Path::new("--to"), &repo],
    ));
    let out = ok(bmr_out(
        &["image", "create", "--name", "second", "--device"],
        &[&copy, Path::new("--to"), &repo],
    ));
    assert!(!out.contains(" 0 already in the repository"), "{out}");
    let chunks = sh(&format!("find {}/chunks -type f | wc -l", repo.display()))
        .trim()
        .parse::<u64>()
        .unwrap();
    let info: serde_json::Value = serde_json::from_str(&ok(bmr_out(
        &["image", "info", "--json"],
        &[&repo.join("images/second.bmri")],
    )))
    .unwrap();
    assert!(
        chunks <= info["chunks"]["repository"].as_u64().unwrap(),
        "second volume added no chunk: {chunks} {info}"
    );
    assert_eq!(
        info["chunk_size"],
        1 << 20,
        "a repository cuts finer: {info}"
    );
    let target3 = file(tmp.path(), "t3.img", 128);
    ok(bmr_out(
        &["image", "restore", "--from"],
        &[
            &repo.join("images/second.bmri"),
            Path::new("--device"),
            &target3,
        ],
    ));
    sh(&format!("e2fsck -fn {} >/dev/null", target3.display()));
}

/// How many blocks in use on the ext4 volume `a` differ in `b`.
fn used_blocks_differing(a: &Path, b: &Path) -> u64 {
    sh(&format!(
        r#"python3 - {0} {1} <<'PY'
import re, subprocess, sys
out = subprocess.run(["dumpe2fs", sys.argv[1]], capture_output=True, text=True).stdout
bs = int(re.search(r"Block size:\s+(\d+)", out).group(1))
n = int(re.search(r"Block count:\s+(\d+)", out).group(1))
free = bytearray(n)
for m in re.finditer(r"^\s+Free blocks: (.*)$", out, re.M):
    for r in filter(None, (x.strip() for x in m.group(1).split(","))):
        lo, _, hi = r.partition("-")
        free[int(lo):int(hi or lo) + 1] = b"\1" * (int(hi or lo) + 1 - int(lo))
differ = 0
with open(sys.argv[1], "rb") as x, open(sys.argv[2], "rb") as y:
    for i in range(n):
        p, q = x.read(bs), y.read(bs)
        differ += not free[i] and p != q
print(differ)
PY"#,
        a.display(),
        b.display()
    ))
    .trim()
    .parse()
    .unwrap()
}

#[test]
fn a_restore_onto_a_device_full_of_old_data_brings_back_every_used_block() {
    require_root();
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let vol = ext4_volume(tmp.path(), 128);
    let img = tmp.path().join("v.bmri");
    create_image(&vol, &img);
    let info: serde_json::Value =
        serde_json::from_str(&ok(bmr_out(&["image", "info", "--json"], &[&img]))).unwrap();
    assert!(
        info["chunks"]["zero"].as_u64().unwrap() > 0,
        "the journal's chunks are in use and all zeros: {info}"
    );
    let target = tmp.path().join("t.img");
    sh(&format!(
        "head -c 128M /dev/zero | tr '\\0' '\\252' > {}",
        target.display()
    ));
    {
        let disk = LoopDisk::attach(&target);
        ok(bmr_out(
            &["image", "restore", "--no-grow", "--from"],
            &[&img, Path::new("--device"), Path::new(&disk.dev)],
        ));
    }
    // The all-zero chunks were zeroed, not skipped.
    assert_eq!(
        used_blocks_differing(&vol, &target),
        0,
        "used blocks that differ"
    );
    sh(&format!("e2fsck -fn {} >/dev/null", target.display()));
}

#[test]
fn damage_and_wrong_keys_are_caught() {
    require_root();
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let vol = ext4_volume(tmp.path(), 64);
    let img = tmp.path().join("enc.bmri");
    let create = |env: &str| {
        bmr()
            .env("BMR_PASS", env)
            .args([
                "image",
                "create",
                "--passphrase-env",
                "BMR_PASS",
                "--device",
            ])
            .arg(&vol)
            .arg("--to")
            .arg(&img)
            .output()
            .unwrap()
    };
    ok(create("sesame"));
    assert!(
        !fs::read(&img).unwrap().windows(8).any(|w| w == b"hardlink"),
        "directory names do not appear in the clear"
    );
    let target = file(tmp.path(), "t.img", 64);
    let before = file_hash(&target);
    let restore = |pass: &str, from: &Path| {
        bmr()
            .env("BMR_PASS", pass)
            .args(["image", "restore", "--passphrase-env", "BMR_PASS", "--from"])
            .arg(from)
            .arg("--device")
            .arg(&target)
            .output()
            .unwrap()
    };
    let err = refused(restore("open up", &img));
    assert!(err.contains("wrong passphrase"), "{err}");
    assert_eq!(file_hash(&target), before, "a wrong key writes nothing");
    let err = refused(bmr_out(
        &["image", "restore", "--from"],
        &[&img, Path::new("--device"), &target],
    ));
    assert!(err.contains("is encrypted"), "{err}");
    ok(restore("sesame", &img));
    sh(&format!("e2fsck -fn {} >/dev/null", target.display()));

    // One flipped byte inside a stored chunk.
    let plain = tmp.path().join("plain.bmri");
    create_image(&vol, &plain);
    let mut bytes = fs::read(&plain).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    let bad = tmp.path().join("bad.bmri");
    fs::write(&bad, &bytes).unwrap();
    let err = refused(bmr_out(&["image", "verify"], &[&bad]));
    assert!(
        err.contains("first bad chunk: volume offset") || err.contains("damaged"),
        "{err}"
    );
    let err = refused(bmr_out(
        &["image", "restore", "--from"],
        &[&bad, Path::new("--device"), &target],
    ));
    assert!(
        err.contains("cannot be mounted half-restored") || err.contains("damaged"),
        "{err}"
    );
    assert!(
        !blkid_has_type(&target),
        "a restore that found damage leaves no mountable filesystem"
    );

    // Truncated.
    let short = tmp.path().join("short.bmri");
    fs::write(&short, &bytes[..bytes.len() / 3]).unwrap();
    let err = refused(bmr_out(&["image", "info"], &[&short]));
    assert!(
        err.contains("truncated") || err.contains("no trailer"),
        "{err}"
    );
}

fn blkid_has_type(p: &Path) -> bool {
    Command::new("blkid")
        .args(["-p", "-o", "export"])
        .arg(p)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("TYPE="))
        .unwrap_or(false)
}

#[test]
fn mount_ls_and_extract_without_unpacking() {
    require_root();
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let vol = ext4_volume(tmp.path(), 64);
    let want = tree(&mount_img(&vol, &tmp.path().join("orig"), false, true).dir);
    let img = tmp.path().join("v.bmri");
    create_image(&vol, &img);
    let loops_before = sh("losetup -a | wc -l");

    let listing = ok(bmr_out(&["image", "ls"], &[&img]));
    assert!(
        listing
            .lines()
            .any(|l| l.ends_with(" /d/e/file7") && l.starts_with("-rw-r--r--")),
        "{listing}"
    );
    assert!(
        listing
            .lines()
            .any(|l| l.contains(" 20971520 ") && l.ends_with(" /random")),
        "{listing}"
    );

    let out = tmp.path().join("out");
    ok(bmr_out(
        &["image", "extract"],
        &[
            &img,
            Path::new("/random"),
            Path::new("/d"),
            Path::new("--to"),
            &out,
        ],
    ));
    assert_eq!(
        fs::read(out.join("random")).unwrap(),
        fs::read(
            mount_img(&vol, &tmp.path().join("o2"), false, true)
                .dir
                .join("random")
        )
        .unwrap()
    );
    assert_eq!(fs::read_dir(out.join("d/e")).unwrap().count(), 200);
    assert_eq!(
        sh(&format!(
            "stat -c '%u:%g %a' {}",
            out.join("random").display()
        ))
        .trim(),
        "1234:5678 640",
        "owner and mode kept"
    );

    // mount: served until SIGTERM, then everything is undone.
    let dir = tmp.path().join("mnt");
    let mut child = bmr()
        .args(["image", "mount"])
        .arg(&img)
        .arg(&dir)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !dir.join("counting").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the image did not mount"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_same_tree(&tree(&dir), &want, "mounted image");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
    assert!(!dir.join("counting").exists(), "unmounted after SIGTERM");
    assert_eq!(
        sh("losetup -a | wc -l"),
        loops_before,
        "its loop device is detached"
    );
}

#[test]
fn a_mounted_target_is_refused() {
    require_root();
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let vol = ext4_volume(tmp.path(), 64);
    let img = tmp.path().join("v.bmri");
    create_image(&vol, &img);
    let disk = LoopDisk::attach(&vol);
    let m = Mounted::new(&disk.dev, &tmp.path().join("busy"), &[]);
    let err = refused(bmr_out(
        &["image", "restore", "--from"],
        &[&img, Path::new("--device"), Path::new(&disk.dev)],
    ));
    assert!(
        err.contains("is mounted at") && err.contains("nothing was written"),
        "{err}"
    );
    let err = refused(bmr_out(
        &["image", "restore", "--files", "--from"],
        &[&img, Path::new("--device"), Path::new(&disk.dev)],
    ));
    assert!(err.contains("is mounted at"), "{err}");
    assert!(
        m.dir.join("counting").exists(),
        "the live filesystem is untouched"
    );
}

#[test]
fn files_written_during_a_live_read_are_logged() {
    require_root();
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let vol = ext4_volume(tmp.path(), 64);
    let disk = LoopDisk::attach(&vol);
    let m = Mounted::new(&disk.dev, &tmp.path().join("live"), &[]);
    // A writer busy for the whole read, stopped by PID afterwards.
    let mut writer = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "while :; do date > {0}/busy.log; sync {0}/busy.log; done",
            m.dir.display()
        ))
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let img = tmp.path().join("live.bmri");
    let out = bmr_out(
        &[
            "image",
            "create",
            "--consistency",
            "none",
            "--device",
            &disk.dev,
            "--to",
        ],
        &[&img],
    );
    // Unless asked otherwise, a mounted filesystem that cannot be
    // snapshotted (no LVM here) is frozen while it is read.
    let frozen = tmp.path().join("frozen.bmri");
    let by_default = bmr_out(
        &["image", "create", "--device", &disk.dev, "--to"],
        &[&frozen],
    );
    let _ = writer.kill();
    let _ = writer.wait();
    let said = ok(out);
    assert!(said.contains("read while mounted, not frozen"), "{said}");
    let said = ok(by_default);
    assert!(
        said.contains("frozen") && said.contains("s while read"),
        "{said}"
    );
    let info: serde_json::Value =
        serde_json::from_str(&ok(bmr_out(&["image", "info", "--json"], &[&frozen]))).unwrap();
    assert_eq!(
        info["exceptions"].as_array().map(Vec::len),
        Some(0),
        "{info}"
    );

    // bmr's error output going to a file on the volume: freezing it would
    // hang bmr on its own message, so it is read unfrozen, or refused when
    // freezing is asked for.
    let log = m.dir.join("bmr.log");
    let with_log = |extra: &[&str], to: &Path| {
        bmr()
            .args(["image", "create", "--device", &disk.dev, "--to"])
            .arg(to)
            .args(extra)
            .stderr(fs::File::create(&log).unwrap())
            .output()
            .unwrap()
    };
    let said = ok(with_log(&[], &tmp.path().join("logged.bmri")));
    let err = fs::read_to_string(&log).unwrap();
    assert!(
        err.contains("is not frozen: bmr's error output goes to a file on it"),
        "{err}"
    );
    assert!(said.contains("read while mounted, not frozen"), "{said}");
    let out = with_log(
        &["--consistency", "freeze"],
        &tmp.path().join("refused.bmri"),
    );
    let err = fs::read_to_string(&log).unwrap();
    assert!(
        !out.status.success() && err.contains("would wait on it frozen"),
        "{err}"
    );
    let info: serde_json::Value =
        serde_json::from_str(&ok(bmr_out(&["image", "info", "--json"], &[&img]))).unwrap();
    let changed: Vec<&str> = info["exceptions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(changed.contains(&"/busy.log"), "{changed:?}");
    assert!(
        !changed.contains(&"/counting"),
        "untouched files are not listed: {changed:?}"
    );
}
