//! The QEMU scenarios of `qemu-tests/scenarios/*.toml`: boot the real rescue
//! ISO (or its kernel and initramfs directly) under TCG with virtual disks,
//! a recovery medium in the floppy drive and a real SCSI tape, and check the
//! serial console for the lines each scenario expects and rejects.
//! `make test` runs the scenarios marked `make_test`; `make qemu-test` all
//! (BMR_QEMU_ALL=1). BMR_QEMU_ONLY=name runs one. Serial logs are kept in
//! target/qemu-tests/.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::qemu::*;
use common::*;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Scenario {
    about: String,
    #[serde(default)]
    make_test: bool,
    firmware: Vec<String>,
    /// iso (as a CD) | usb (the ISO as a USB stick) | kernel (direct boot of the
    /// ISO's kernel and initramfs, with `append`)
    boot: String,
    #[serde(default)]
    append: String,
    /// none | st | foreign-st
    medium: String,
    /// Where the medium is: floppy (default) or usb (a stick on xHCI).
    #[serde(default)]
    medium_on: Option<String>,
    #[serde(default)]
    tape: bool,
    /// Interfaces of the system disks: virtio, sata, nvme, scsi.
    disks: Vec<String>,
    timeout: u64,
    expect: Vec<String>,
    #[serde(default)]
    reject: Vec<String>,
    /// Blank disks (300 MiB) after the system disks, on these interfaces.
    #[serde(default)]
    blank: Vec<String>,
    /// The blank disks must still be all zeros afterwards.
    #[serde(default)]
    blank_untouched: bool,
    /// The tape's LUN is made read-only (a write-protected cartridge).
    #[serde(default)]
    tape_readonly: bool,
    /// Size of the virtual tape in MB.
    #[serde(default = "default_tape_mb")]
    tape_mb: u64,
    /// Typed on the console once `expect` is through, each followed by its own expectations.
    #[serde(default)]
    steps: Vec<Step>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Step {
    send: String,
    expect: Vec<String>,
}

fn default_tape_mb() -> u64 {
    64
}

struct Fixtures {
    _dir: tempfile::TempDir,
    kernel: DebianKernel,
    foreign: String,
    iso: PathBuf,
    initrd: PathBuf,
    system: PathBuf,
    medium_st: PathBuf,
    medium_foreign: PathBuf,
}

/// A kernel release of the same length that is not this one: the module's
/// .modinfo can be patched in place.
fn foreign_release(kver: &str) -> String {
    let abi: String = kver
        .split('-')
        .nth(1)
        .unwrap_or("0")
        .chars()
        .filter(|c| c.is_ascii_digit())
        .collect();
    let other = if abi.chars().all(|c| c == '9') {
        "8"
    } else {
        "9"
    }
    .repeat(abi.len());
    kver.replacen(&format!("-{abi}-"), &format!("-{other}-"), 1)
}

/// Copies st and what it needs into a module tree for `foreign`, with the
/// vermagic rewritten: a medium saved on a machine running another kernel.
fn foreign_tree(kernel: &DebianKernel, foreign: &str, modules_root: &Path) {
    let dest = modules_root.join(foreign);
    let dep = fs::read_to_string(kernel.modules.join("modules.dep")).unwrap();
    let wanted = ["/st.ko", "/scsi_mod.ko", "/scsi_common.ko"];
    let mut lines = String::new();
    for line in dep.lines() {
        let rel = line.split(':').next().unwrap();
        if !wanted.iter().any(|w| rel.ends_with(w)) {
            continue;
        }
        lines.push_str(line);
        lines.push('\n');
        let data = fs::read(kernel.modules.join(rel)).unwrap();
        let needle = format!("vermagic={}", kernel.version);
        let at = data
            .windows(needle.len())
            .position(|w| w == needle.as_bytes())
            .unwrap_or_else(|| panic!("no {needle} in {rel}"));
        let mut patched = data.clone();
        patched[at..at + needle.len()].copy_from_slice(format!("vermagic={foreign}").as_bytes());
        fs::create_dir_all(dest.join(rel).parent().unwrap()).unwrap();
        fs::write(dest.join(rel), patched).unwrap();
    }
    fs::write(dest.join("modules.dep"), lines).unwrap();
}

fn fixtures() -> Fixtures {
    let kernel = DebianKernel::find().expect("scripts/fetch-debian-kernel unpacks Debian's kernel");
    let dir = tempfile::tempdir_in(repo().join("target")).unwrap();
    let d = dir.path();
    let iso = d.join("bmr-rescue.iso");
    let initrd = d.join("initrd.img");
    let t = Instant::now();
    mkrescue(&kernel, &initrd, Some(&iso));
    eprintln!("mkrescue: {:.1} s", t.elapsed().as_secs_f64());

    let foreign = foreign_release(&kernel.version);
    let medium_st = d.join("medium-st.img");
    let medium_foreign = d.join("medium-foreign.img");
    let system = {
        let _turn = serial();
        let sys = test_system("gpt", d);
        let mods = sys.root.dir.join("lib/modules");
        fs::create_dir_all(&mods).unwrap();
        std::os::unix::fs::symlink(&kernel.modules, mods.join(&kernel.version)).unwrap();
        foreign_tree(&kernel, &foreign, &mods);
        for (medium, kver) in [(&medium_st, &kernel.version), (&medium_foreign, &foreign)] {
            ok(bmr()
                .args([
                    "save",
                    "--catalog",
                    "none",
                    "--driver",
                    "st",
                    "--kernel",
                    kver,
                ])
                .arg("--medium")
                .arg(medium)
                .arg("--system-root")
                .arg(&sys.root.dir)
                .args(["--disk", &sys.disk.dev])
                .output()
                .unwrap());
        }
        fs::remove_dir_all(&mods).unwrap();
        sys.image.clone()
    };
    Fixtures {
        _dir: dir,
        kernel,
        foreign,
        iso,
        initrd,
        system,
        medium_st,
        medium_foreign,
    }
}

fn interface(name: &str) -> Interface {
    match name {
        "virtio" => Interface::Virtio,
        "sata" => Interface::Sata,
        "nvme" => Interface::Nvme,
        "scsi" => Interface::Scsi,
        "usb" => Interface::Usb,
        other => panic!("unknown disk interface {other}"),
    }
}

/// The rescue shell's prompt (initramfs/rootfs/etc/profile).
const PROMPT: &str = "bmr-rescue# ";

fn wait_until(vm: &Qemu, deadline: Duration, done: impl Fn(&str) -> bool) -> bool {
    while vm.elapsed() < deadline && vm.exited().is_none() {
        if done(&vm.log()) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    done(&vm.log())
}

/// Runs one scenario on one firmware; Err describes what went wrong.
fn run(name: &str, s: &Scenario, fw: &str, f: &Fixtures) -> Result<String, String> {
    let dir = tempfile::tempdir_in(repo().join("target")).unwrap();
    let tgt = s.tape.then(|| Tgt::start(dir.path(), s.tape_mb));
    if let (Some(t), true) = (&tgt, s.tape_readonly) {
        let out = t.tgtadm(&[
            "--lld",
            "iscsi",
            "--op",
            "update",
            "--mode",
            "logicalunit",
            "--tid",
            "1",
            "--lun",
            "1",
            "--params",
            "readonly=1",
        ]);
        assert!(
            out.status.success(),
            "tgtadm readonly: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut cfg = QemuConfig::new().memory_mb(1024).firmware(match fw {
        "bios" => Firmware::Bios,
        "uefi" => Firmware::Uefi,
        other => panic!("unknown firmware {other}"),
    });
    for (i, iface) in s.disks.iter().enumerate() {
        cfg = cfg.disk(
            Disk::new(&f.system, interface(iface))
                .serial(&format!("bmr-sys-{i}"))
                .snapshot(),
        );
    }
    for (i, iface) in s.blank.iter().enumerate() {
        let img = dir.path().join(format!("blank{i}.img"));
        fs::File::create(&img).unwrap().set_len(300 << 20).unwrap();
        cfg = cfg.disk(Disk::new(&img, interface(iface)).serial(&format!("bmr-blank-{i}")));
    }
    cfg = match s.boot.as_str() {
        "iso" => {
            assert!(
                s.append.is_empty(),
                "{name}: append needs boot = \"kernel\""
            );
            cfg.cdrom(&f.iso)
        }
        // The ISO written raw to a USB stick (`dd`), booted from it.
        "usb" => {
            assert!(
                s.append.is_empty(),
                "{name}: append needs boot = \"kernel\""
            );
            cfg.disk(
                Disk::new(&f.iso, Interface::Usb)
                    .serial("bmr-rescue-stick")
                    .bootindex(0)
                    .snapshot(),
            )
        }
        "kernel" => cfg.kernel(
            &f.kernel.vmlinuz,
            Some(&f.initrd),
            &format!("console=ttyS0,115200 {}", s.append),
        ),
        other => panic!("{name}: unknown boot {other}"),
    };
    let medium = match s.medium.as_str() {
        "none" => None,
        "st" => Some(&f.medium_st),
        "foreign-st" => Some(&f.medium_foreign),
        other => panic!("{name}: unknown medium {other}"),
    };
    if let Some(m) = medium {
        cfg = match s.medium_on.as_deref().unwrap_or("floppy") {
            "floppy" => cfg.floppy(m),
            // Never written: the fixture serves every scenario.
            "usb" => cfg.disk(Disk::new(m, Interface::Usb).serial("bmr-stick").snapshot()),
            other => panic!("{name}: unknown medium_on {other}"),
        };
    }
    if let Some(t) = &tgt {
        cfg = cfg.tape(t);
    }
    let vm = Qemu::start(dir.path(), &cfg);
    let deadline = Duration::from_secs(s.timeout);
    let mut ready = None;
    let mut result = Ok(());
    let stages = std::iter::once((None, &s.expect)).chain(
        s.steps
            .iter()
            .map(|st| (Some(st.send.as_str()), &st.expect)),
    );
    // Where the last stage's markers ended: the shell's prompt that follows
    // them must be out before a command is sent, or it would count as the
    // command's own (a command "finished" at once, and failed).
    let mut seen = 0;
    'stages: for (send, expect) in stages {
        if let Some(text) = send {
            let settle = deadline.min(vm.elapsed() + Duration::from_secs(30));
            wait_until(&vm, settle, |log| {
                log.get(seen..).is_some_and(|rest| rest.contains(PROMPT))
            });
            let prompts = vm.log().matches(PROMPT).count();
            vm.send(&format!("{text}\n"));
            // A command that fails shows the next prompt without its marker:
            // stop there instead of waiting out the timeout.
            let done = wait_until(&vm, deadline, |log| {
                expect.iter().all(|e| log.contains(e.as_str()))
                    || log.matches(PROMPT).count() > prompts
            });
            let log = vm.log();
            if let Some(missing) = expect.iter().find(|e| !log.contains(e.as_str())) {
                result = Err(format!(
                    "\"{text}\" {} without printing \"{missing}\"; console:\n{}",
                    if done {
                        "finished"
                    } else {
                        "did not finish in time"
                    },
                    log.lines()
                        .rev()
                        .take(40)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect::<Vec<_>>()
                        .join("\n")
                ));
                break 'stages;
            }
        }
        for want in expect {
            let want = want
                .replace("{kernel}", &f.kernel.version)
                .replace("{foreign_kernel}", &f.foreign);
            let left = deadline.saturating_sub(vm.elapsed());
            match vm.wait_for(&want, left) {
                Ok(t) => {
                    if want.contains("rescue system ready") {
                        ready = Some(t);
                    }
                    if let Some(at) = vm.log().rfind(want.as_str()) {
                        seen = seen.max(at + want.len());
                    }
                }
                Err(e) => {
                    result = Err(format!("expected \"{want}\": {e}"));
                    break 'stages;
                }
            }
        }
    }
    // Give anything unwanted that would follow a moment to show.
    std::thread::sleep(Duration::from_secs(3));
    let log = vm.log();
    let total = vm.elapsed();
    drop(vm);
    drop(tgt);
    let keep = repo().join("target/qemu-tests");
    fs::create_dir_all(&keep).unwrap();
    fs::write(keep.join(format!("{name}-{fw}.log")), &log).unwrap();
    result?;
    if s.blank_untouched {
        for i in 0..s.blank.len() {
            let img = dir.path().join(format!("blank{i}.img"));
            let data = fs::read(&img).unwrap();
            if let Some(at) = data.iter().position(|&b| b != 0) {
                return Err(format!(
                    "blank disk {i} was written (first non-zero byte at {at})"
                ));
            }
        }
    }
    for bad in &s.reject {
        if let Some(line) = log.lines().find(|l| l.contains(bad.as_str())) {
            return Err(format!("rejected \"{bad}\" seen: {line}"));
        }
    }
    Ok(format!(
        "{name} ({fw}): ready after {}, {:.0} s in all",
        ready.map_or("-".to_string(), |t| format!("{:.0} s", t.as_secs_f64())),
        total.as_secs_f64()
    ))
}

fn scenarios() -> Vec<(String, Scenario)> {
    let dir = repo().join("qemu-tests/scenarios");
    let mut out: Vec<(String, Scenario)> = fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "toml"))
        .map(|e| {
            let name = e.path().file_stem().unwrap().to_string_lossy().into_owned();
            let text = fs::read_to_string(e.path()).unwrap();
            let s: Scenario =
                toml::from_str(&text).unwrap_or_else(|err| panic!("{}: {err}", e.path().display()));
            (name, s)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn scenario_files_are_well_formed() {
    let all = scenarios();
    assert!(all.len() >= 4);
    for (name, s) in &all {
        assert!(!s.about.is_empty() && !s.expect.is_empty(), "{name}");
        for fw in &s.firmware {
            assert!(fw == "bios" || fw == "uefi", "{name}: {fw}");
        }
        s.disks.iter().chain(&s.blank).for_each(|d| {
            interface(d);
        });
        for st in &s.steps {
            // The console echoes what is typed: a marker must come from the output.
            for e in &st.expect {
                assert!(
                    !st.send.contains(e.as_str()),
                    "{name}: \"{e}\" is in its own command"
                );
            }
        }
    }
}

#[test]
fn qemu_scenarios() {
    require_root();
    if let Some(missing) = vm_tools_missing() {
        panic!("QEMU scenarios need {missing}: scripts/setup-deps installs them");
    }
    let all_of_them = std::env::var_os("BMR_QEMU_ALL").is_some();
    let only = std::env::var("BMR_QEMU_ONLY").ok();
    let chosen: Vec<(String, Scenario)> = scenarios()
        .into_iter()
        .filter(|(n, s)| match &only {
            Some(o) => n == o,
            None => all_of_them || s.make_test,
        })
        .collect();
    assert!(!chosen.is_empty(), "no scenario chosen");
    let f = fixtures();
    let mut passed = Vec::new();
    let mut failed = Vec::new();
    for (name, s) in &chosen {
        for fw in &s.firmware {
            match run(name, s, fw, &f) {
                Ok(line) => {
                    eprintln!("ok   {line}");
                    passed.push(line);
                }
                Err(e) => {
                    eprintln!("FAIL {name} ({fw}): {e}");
                    failed.push(format!("{name} ({fw}): {e}"));
                }
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} QEMU runs failed (logs in target/qemu-tests/):\n{}",
        failed.len(),
        failed.len() + passed.len(),
        failed.join("\n\n")
    );
}

#[test]
fn foreign_release_keeps_the_length() {
    assert_eq!(foreign_release("6.1.0-56-amd64"), "6.1.0-99-amd64");
    assert_eq!(foreign_release("6.1.0-99-amd64"), "6.1.0-88-amd64");
}
