//! The screens driven by keys the way an operator would press them, and
//! drawn into ratatui's `TestBackend` at 80x24 and 120x40; the drawings are
//! insta snapshots (src/tui/snapshots), reviewed by eye when they change.

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::backend::TestBackend;
use ratatui::Terminal;

use super::app::*;
use super::view;
use crate::manifest::tests::sample;
use crate::plan::{Action, ExistingPartition, Sizing, TargetDisk};
use crate::recover::events::{Choice, Event, Trouble};

const GIB: u64 = 1 << 30;

fn disk(name: &str, gib: u64, model: &str, protected: Option<&str>) -> TargetDisk {
    TargetDisk {
        device: format!("/dev/{name}"),
        name: name.into(),
        size_bytes: gib * GIB,
        logical_sector_size: 512,
        physical_sector_size: 512,
        model: model.into(),
        serial: format!("SN-{name}"),
        protected: protected.map(Into::into),
        ..TargetDisk::default()
    }
}

fn start_info() -> StartInfo {
    StartInfo {
        booted: "bmr 0.1.0 on kernel 6.1.0-28-amd64, ready after 21 s".into(),
        modules: 196,
        from_medium: vec!["st".into()],
        medium: Some("/dev/fd0: machine web1, saved 2024-10-05T12:34:56Z".into()),
        candidates: Vec::new(),
        source: Ok("file:LABEL=BMR-BACKUP:/repo (repository at /run/bmr/source/repo)".into()),
        warnings: Vec::new(),
    }
}

/// web1 (a 20 GiB GPT disk and a 4 GiB MBR disk) and three disks here:
/// two that may be written and the recovery medium's.
fn app() -> App {
    let mut a = App::new(start_info(), false, false);
    let mut vda = disk("vda", 32, "QEMU HARDDISK", None);
    vda.existing = vec![ExistingPartition {
        number: 1,
        start_bytes: 1 << 20,
        size_bytes: 10 * GIB,
        filesystem: "ext4".into(),
        uuid: "0b6e1a2c-old".into(),
    }];
    let targets = vec![
        vda,
        disk("vdb", 40, "QEMU HARDDISK", None),
        disk("sdc", 1, "USB FLOPPY", Some("holds the recovery medium")),
    ];
    let transport = [
        ("/dev/vda", "virtio"),
        ("/dev/vdb", "virtio"),
        ("/dev/sdc", "usb"),
    ]
    .iter()
    .map(|(d, t)| (d.to_string(), t.to_string()))
    .collect();
    a.set_machine(
        Machine {
            manifest: sample(),
            targets,
            transport,
        },
        Vec::new(),
    );
    a
}

fn press(a: &mut App, code: KeyCode) -> Effect {
    a.on_key(KeyEvent::new(code, KeyModifiers::NONE))
}

fn typed(a: &mut App, text: &str) {
    for c in text.chars() {
        assert_eq!(press(a, KeyCode::Char(c)), Effect::Nothing);
    }
}

/// The plan screen's cursor moved onto volume `id` with the arrow keys,
/// as an operator would; its row.
fn select(a: &mut App, id: &str) -> usize {
    let at = a
        .plan
        .as_ref()
        .expect("plan")
        .volumes
        .iter()
        .position(|v| v.id == id)
        .expect("volume");
    while a.cursor < at {
        press(a, KeyCode::Down);
    }
    while a.cursor > at {
        press(a, KeyCode::Up);
    }
    at
}

fn render(a: &App, w: u16, h: u16) -> String {
    let mut t = Terminal::new(TestBackend::new(w, h)).expect("test terminal");
    t.draw(|f| view::draw(f, a)).expect("draw");
    let buf = t.backend().buffer();
    let mut out = String::new();
    for y in 0..h {
        let line: String = (0..w)
            .map(|x| buf[(x, y)].symbol().to_string())
            .collect::<String>();
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Both sizes the issue asks for, under one name each.
fn snap(name: &str, a: &App) {
    insta::assert_snapshot!(format!("{name}_80x24"), render(a, 80, 24));
    insta::assert_snapshot!(format!("{name}_120x40"), render(a, 120, 40));
}

fn to_plan(a: &mut App) {
    assert_eq!(press(a, KeyCode::Enter), Effect::Nothing);
    assert_eq!(a.screen, Screen::Disks);
    assert_eq!(press(a, KeyCode::Enter), Effect::Nothing);
    assert_eq!(a.screen, Screen::Plan, "{:?}", a.message);
}

fn running(a: &mut App) {
    to_plan(a);
    press(a, KeyCode::Enter);
    let names = a.doomed().join(" ");
    typed(a, &names);
    assert_eq!(press(a, KeyCode::Enter), Effect::Begin);
    a.on_event(Event::Steps(vec![
        "write partition tables and filesystems".into(),
        "restore esp onto /dev/vdb1".into(),
        "restore root onto /dev/vdb2".into(),
        "install the phase-two environment".into(),
    ]));
    a.on_event(Event::Step { index: 0 });
    a.on_event(Event::StepDone {
        index: 0,
        seconds: 3.2,
        result: "/dev/vdb".into(),
    });
    a.on_event(Event::Step { index: 1 });
    a.on_event(Event::Progress {
        what: "restoring esp".into(),
        done: 512 << 20,
        total: 512 << 20,
        seconds: 2.0,
    });
    a.on_event(Event::StepDone {
        index: 1,
        seconds: 2.1,
        result: "onto /dev/vdb1".into(),
    });
    a.on_event(Event::Step { index: 2 });
    a.on_event(Event::Progress {
        what: "restoring root".into(),
        done: 3 * GIB,
        total: 8 * GIB,
        seconds: 30.0,
    });
    for i in 0..30 {
        a.log(format!("log line {i}"));
    }
}

#[test]
fn the_plan_on_screen_is_the_planners() {
    let a = app();
    let p = a.plan.as_ref().expect("sample plans onto the disks here");
    let direct = crate::plan::plan(
        &a.machine.as_ref().expect("machine").manifest,
        &a.machine.as_ref().expect("machine").targets,
        &[],
        crate::plan::Policy::default(),
    )
    .expect("plan");
    assert_eq!(p, &direct);
    assert!(!a.doomed().contains(&"/dev/sdc".to_string()));
}

#[test]
fn changing_the_mapping_replans_and_never_offers_a_protected_disk() {
    let mut a = app();
    press(&mut a, KeyCode::Enter);
    assert_eq!(a.screen, Screen::Disks);
    let first = a.target_of("disk0").expect("disk0 mapped");
    let mut seen = vec![first.clone()];
    for _ in 0..4 {
        press(&mut a, KeyCode::Right);
        let now = a.target_of("disk0").expect("disk0 mapped");
        assert_ne!(now, "/dev/sdc", "the medium's disk is protected");
        seen.push(now);
    }
    assert!(seen.contains(&"/dev/vda".to_string()) && seen.contains(&"/dev/vdb".to_string()));
    // Mapped by hand onto the other disk: the plan follows.
    while a.target_of("disk0").as_deref() == Some(first.as_str()) {
        press(&mut a, KeyCode::Right);
    }
    let p = a.plan.as_ref().expect("plan");
    let d0 = p.disks.iter().find(|d| d.saved == "disk0").expect("disk0");
    assert_ne!(d0.target, first);
    assert!(a.map.iter().any(|(s, t)| s == "disk0" && *t == d0.target));
    // `a` gives the choice back to bmr.
    press(&mut a, KeyCode::Char('a'));
    assert!(a.map.is_empty());
    assert_eq!(a.target_of("disk0"), Some(first));
}

#[test]
fn resizing_stays_within_the_planners_bounds() {
    let mut a = app();
    to_plan(&mut a);
    let root = select(&mut a, "root");
    let size_of = |a: &App| a.plan.as_ref().expect("plan").volumes[root].size_bytes;
    let before = size_of(&a);
    press(&mut a, KeyCode::Char('-'));
    let smaller = size_of(&a);
    assert!(smaller < before, "{:?}", a.message);
    assert!(a.adjust.sizes.iter().any(|(v, _)| v == "root"));
    // Down to the minimum and not below it.
    for _ in 0..2000 {
        press(&mut a, KeyCode::Char('-'));
    }
    let min = a.plan.as_ref().expect("plan").volumes[root].min_size_bytes;
    assert!(size_of(&a) >= min);
    assert!(
        matches!(a.message, Some((Tone::Error, ref m)) if m.contains("smallest")),
        "{:?}",
        a.message
    );
    // Up to the largest the disk allows, without dropping anything.
    for _ in 0..2000 {
        press(&mut a, KeyCode::Char('+'));
    }
    assert!(
        matches!(a.message, Some((Tone::Error, ref m)) if m.contains("largest")),
        "{:?}",
        a.message
    );
    let p = a.plan.as_ref().expect("plan");
    assert!(p.dropped.is_empty(), "{:?}", p.dropped);
    assert!(size_of(&a) > before);
}

#[test]
fn data_can_be_excluded_but_not_what_boots() {
    let mut a = app();
    to_plan(&mut a);
    // The cursor on root: refused.
    select(&mut a, "root");
    press(&mut a, KeyCode::Char('x'));
    assert!(a.adjust.exclude.is_empty());
    assert!(matches!(a.message, Some((Tone::Error, ref m)) if m.contains("cannot be excluded")));
    // On data: excluded, and the plan says so.
    select(&mut a, "data");
    press(&mut a, KeyCode::Char('x'));
    let p = a.plan.as_ref().expect("plan");
    let data = p.volumes.iter().find(|v| v.id == "data").expect("data");
    assert_eq!(data.action, Action::Drop);
    assert!(p.dropped.iter().any(|d| d.id == "data"));
    // x again brings it back.
    press(&mut a, KeyCode::Char('x'));
    let p = a.plan.as_ref().expect("plan");
    assert_ne!(
        p.volumes
            .iter()
            .find(|v| v.id == "data")
            .expect("data")
            .action,
        Action::Drop
    );
}

#[test]
fn the_sizing_policy_cycles_and_replans() {
    let mut a = app();
    to_plan(&mut a);
    let mut seen = vec![a.policy.sizing];
    for _ in 0..3 {
        press(&mut a, KeyCode::Char('p'));
        assert_eq!(
            a.plan.as_ref().expect("plan").policy.sizing,
            a.policy.sizing
        );
        seen.push(a.policy.sizing);
    }
    assert_eq!(seen.first(), seen.last());
    assert!(seen.contains(&Sizing::Keep) && seen.contains(&Sizing::GrowLast));
}

#[test]
fn only_the_exact_disk_names_start_the_recovery() {
    let mut a = app();
    to_plan(&mut a);
    press(&mut a, KeyCode::Enter);
    assert_eq!(a.screen, Screen::Confirm);
    let doomed = a.doomed();
    assert!(!doomed.is_empty());
    for wrong in ["y", "yes", "", "/dev/sdc", "vda vdb sdc"] {
        typed(&mut a, wrong);
        assert_eq!(press(&mut a, KeyCode::Enter), Effect::Nothing, "{wrong}");
        assert_eq!(a.screen, Screen::Confirm);
        assert!(matches!(a.message, Some((Tone::Error, _))));
    }
    // Only part of the list is not enough either, when there are several.
    if doomed.len() > 1 {
        typed(&mut a, &doomed[0]);
        assert_eq!(press(&mut a, KeyCode::Enter), Effect::Nothing);
    }
    let names: Vec<&str> = doomed
        .iter()
        .map(|d| d.trim_start_matches("/dev/"))
        .collect();
    typed(&mut a, &names.join(" "));
    assert_eq!(press(&mut a, KeyCode::Enter), Effect::Begin);
    assert_eq!(a.screen, Screen::Progress);
    assert!(confirms(
        "/dev/vda,vdb",
        &["/dev/vdb".into(), "/dev/vda".into()]
    ));
    assert!(!confirms("vda", &["/dev/vdb".into(), "/dev/vda".into()]));
    assert!(!confirms("vda", &[]));
}

#[test]
fn escape_goes_back_without_side_effects_until_confirmed() {
    let mut a = app();
    to_plan(&mut a);
    press(&mut a, KeyCode::Enter);
    typed(&mut a, "vd");
    assert_eq!(press(&mut a, KeyCode::Esc), Effect::Nothing);
    assert_eq!(a.screen, Screen::Plan);
    assert_eq!(press(&mut a, KeyCode::Esc), Effect::Nothing);
    assert_eq!(a.screen, Screen::Disks);
    assert_eq!(press(&mut a, KeyCode::Esc), Effect::Nothing);
    assert_eq!(a.screen, Screen::Start);
    // The typed text did not survive the way back.
    to_plan(&mut a);
    press(&mut a, KeyCode::Enter);
    assert!(a.input.is_empty());
    // Once running, keys do nothing.
    let names = a.doomed().join(" ");
    typed(&mut a, &names);
    assert_eq!(press(&mut a, KeyCode::Enter), Effect::Begin);
    assert_eq!(press(&mut a, KeyCode::Esc), Effect::Nothing);
    assert_eq!(a.screen, Screen::Progress);
}

#[test]
fn an_encrypted_backup_asks_for_its_key_before_the_confirmation() {
    let mut a = app();
    a.key = KeyNeed::Ask;
    to_plan(&mut a);
    press(&mut a, KeyCode::Enter);
    assert_eq!(a.screen, Screen::Key);
    typed(&mut a, "hunter2");
    assert_eq!(
        press(&mut a, KeyCode::Enter),
        Effect::CheckKey("hunter2".into())
    );
    a.key_checked(Err("the key does not open image root".into()));
    assert_eq!(a.screen, Screen::Key);
    assert!(matches!(a.message, Some((Tone::Error, ref m)) if m.contains("wrong key")));
    snap("key_wrong", &a);
    typed(&mut a, "right");
    press(&mut a, KeyCode::Enter);
    a.key_checked(Ok(()));
    assert_eq!(a.screen, Screen::Confirm);
    // Back from the confirmation goes to the key, not past it.
    press(&mut a, KeyCode::Esc);
    assert_eq!(a.screen, Screen::Key);
}

#[test]
fn trouble_offers_only_what_applies() {
    let mut a = app();
    running(&mut a);
    a.on_event(Event::Trouble(Trouble {
        step: "restore root onto /dev/vdb2".into(),
        error: "restoring volume root onto /dev/vdb2: chunk 812 at offset 3.1 GiB does not match its checksum".into(),
        critical: true,
        abort: true,
    }));
    assert_eq!(a.screen, Screen::Trouble);
    assert_eq!(press(&mut a, KeyCode::Char('s')), Effect::Nothing);
    assert_eq!(a.screen, Screen::Trouble);
    assert_eq!(press(&mut a, KeyCode::Char('h')), Effect::Shell);
    snap("trouble", &a);
    assert_eq!(
        press(&mut a, KeyCode::Char('r')),
        Effect::Answer(Choice::Retry)
    );
    assert_eq!(a.screen, Screen::Progress);
    // Not critical: skip is offered; locked: no shell.
    a.lock = true;
    a.on_event(Event::Trouble(Trouble {
        step: "run command 3".into(),
        error: "exit status 2".into(),
        critical: false,
        abort: true,
    }));
    assert_eq!(press(&mut a, KeyCode::Char('h')), Effect::Nothing);
    assert_eq!(
        press(&mut a, KeyCode::Char('s')),
        Effect::Answer(Choice::Skip)
    );
}

#[test]
fn start_without_a_medium_offers_devices_and_a_path() {
    let mut info = start_info();
    info.medium = None;
    info.candidates = vec!["/dev/sdb1".into(), "/dev/fd0".into()];
    info.source = Err("none given (bmr.source=)".into());
    info.warnings = vec!["no recovery medium found (a FAT filesystem labelled BMR-STATE); looked at: /dev/sr0 (iso9660 \"BMR-RESCUE\")".into()];
    let mut a = App::new(info, false, false);
    snap("start_no_medium", &a);
    press(&mut a, KeyCode::Down);
    assert_eq!(
        press(&mut a, KeyCode::Enter),
        Effect::LoadMedium("/dev/fd0".into())
    );
    press(&mut a, KeyCode::Char('m'));
    typed(&mut a, "/mnt/usb/floppy.img");
    assert_eq!(
        press(&mut a, KeyCode::Enter),
        Effect::LoadMedium("/mnt/usb/floppy.img".into())
    );
    press(&mut a, KeyCode::Char('s'));
    typed(&mut a, "tape:/dev/nst0");
    snap("start_typing_source", &a);
    assert_eq!(
        press(&mut a, KeyCode::Enter),
        Effect::OpenSource("tape:/dev/nst0".into())
    );
}

#[test]
fn no_source_no_way_on() {
    let mut a = app();
    a.start.source =
        Err("file:LABEL=BMR-BACKUP:/repo: no filesystem with LABEL=BMR-BACKUP is attached".into());
    press(&mut a, KeyCode::Enter);
    assert_eq!(a.screen, Screen::Start);
    assert!(matches!(a.message, Some((Tone::Error, ref m)) if m.contains("press s")));
    snap("start_source_unreachable", &a);
}

#[test]
fn locked_consoles_offer_no_shell() {
    let mut a = app();
    a.lock = true;
    assert_eq!(press(&mut a, KeyCode::Char('h')), Effect::Nothing);
    assert!(!render(&a, 80, 24).contains("h shell"));
    a.lock = false;
    assert_eq!(press(&mut a, KeyCode::Char('h')), Effect::Shell);
}

#[test]
fn monochrome_uses_no_colour() {
    let mut a = app();
    a.message = Some((Tone::Error, "x".into()));
    for colour in [false, true] {
        a.colour = colour;
        let mut t = Terminal::new(TestBackend::new(80, 24)).expect("terminal");
        t.draw(|f| view::draw(f, &a)).expect("draw");
        let buf = t.backend().buffer();
        let coloured = buf
            .content()
            .iter()
            .any(|c| c.fg != ratatui::style::Color::Reset || c.bg != ratatui::style::Color::Reset);
        assert_eq!(coloured, colour);
    }
}

#[test]
fn screens() {
    let mut a = app();
    snap("start", &a);
    press(&mut a, KeyCode::Enter);
    snap("disks", &a);
    press(&mut a, KeyCode::Enter);
    snap("plan", &a);
    // An impossible mapping: both saved disks onto the smallest disk here.
    let mut tight = app();
    let small = disk("vdc", 2, "QEMU HARDDISK", None);
    if let Some(m) = tight.machine.as_mut() {
        m.targets = vec![small];
    }
    tight.replan();
    press(&mut tight, KeyCode::Enter);
    assert!(tight.plan.is_err());
    press(&mut tight, KeyCode::Enter);
    assert_eq!(tight.screen, Screen::Disks, "no plan, no way on");
    snap("disks_no_plan", &tight);
    press(&mut a, KeyCode::Enter);
    typed(&mut a, "sdc");
    press(&mut a, KeyCode::Enter);
    snap("confirm_wrong", &a);
    let mut r = app();
    running(&mut r);
    snap("progress", &r);
    r.on_event(Event::StepDone {
        index: 2,
        seconds: 61.0,
        result: "onto /dev/vdb2".into(),
    });
    r.on_event(Event::Finished(Ok(vec![
        "Restored now: esp, root".into(),
        "Restored after the reboot (phase two): data, home, archive".into(),
        "Took 66 s.".into(),
    ])));
    assert_eq!(r.screen, Screen::Done);
    snap("done", &r);
    let mut f = app();
    running(&mut f);
    f.on_event(Event::Finished(Err(
        "restoring volume root onto /dev/vdb2: the tape drive reports no medium".into(),
    )));
    snap("done_failed", &f);
}

#[test]
fn phase_two_shows_its_commands_and_its_report() {
    let mut a = app();
    a.watch_phase_two();
    assert_eq!(a.screen, Screen::Progress);
    a.on_event(Event::Steps(vec![
        "[0] restore data".into(),
        "[10] a third-party restore program".into(),
        "verify the catalog".into(),
        "adapt to this hardware".into(),
        "put the system's boot loader back".into(),
    ]));
    a.on_event(Event::Step { index: 0 });
    a.on_event(Event::StepDone {
        index: 0,
        seconds: 12.0,
        result: "succeeded".into(),
    });
    a.on_event(Event::Step { index: 1 });
    a.on_event(Event::StepFailed {
        index: 1,
        result: "exited with status 3".into(),
    });
    a.log("[10] /opt/vendor/restore --all".into());
    a.log("[10] vendor: cannot reach the license server".into());
    // on_error = shell: the shell, then the command runs again; nothing else.
    a.on_event(Event::Trouble(Trouble {
        step: "[10] a third-party restore program".into(),
        error: "/opt/vendor/restore exited with status 3; its on_error is shell: look around, then it runs once more".into(),
        critical: false,
        abort: false,
    }));
    snap("phase_two_shell", &a);
    assert_eq!(press(&mut a, KeyCode::Char('a')), Effect::Nothing);
    assert_eq!(press(&mut a, KeyCode::Char('s')), Effect::Nothing);
    assert_eq!(press(&mut a, KeyCode::Char('h')), Effect::Shell);
    assert_eq!(
        press(&mut a, KeyCode::Char('r')),
        Effect::Answer(Choice::Retry)
    );
    a.on_event(Event::StepDone {
        index: 1,
        seconds: 3.0,
        result: "succeeded".into(),
    });
    for i in 2..5 {
        a.on_event(Event::Step { index: i });
        a.on_event(Event::StepDone {
            index: i,
            seconds: 1.0,
            result: "done".into(),
        });
    }
    a.on_event(Event::Finished(Ok(vec![
        "Status: ok; the report is in /var/log/bmr-recovery.json on the restored system.".into(),
        "Volumes: root (restore-image), data (restore-image)".into(),
        "Hardware differences:".into(),
        "  disk0 was on virtio, now on nvme".into(),
        "Adapted: initramfs rebuilt with update-initramfs for nvme".into(),
        "Took 41 s in phase one, 112 s in phase two.".into(),
        "Press Enter to boot the restored system.".into(),
    ])));
    snap("phase_two_done", &a);
    assert_eq!(press(&mut a, KeyCode::Enter), Effect::Reboot);
}

#[test]
fn excluding_the_last_volume_of_a_disk_says_the_disk_is_still_written() {
    let mut a = app();
    to_plan(&mut a);
    for id in ["home", "archive"] {
        select(&mut a, id);
        press(&mut a, KeyCode::Char('x'));
    }
    assert!(
        matches!(a.message, Some((Tone::Info, ref m)) if m.contains("still gets a new, empty partition table")),
        "{:?}",
        a.message
    );
}
