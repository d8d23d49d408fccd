//! Drawing the screens: a title line, the screen's body, a message line and
//! a help line with the screen's keys. Reads `App`, changes nothing.

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Table, Wrap};
use ratatui::Frame;

use super::app::{App, KeyNeed, Screen, Status, Tone, Typing};
use crate::plan::Action;
use crate::report::size;

/// Styles for a colour terminal, or bold/reverse only on a monochrome one.
struct Look {
    colour: bool,
}

impl Look {
    fn title(&self) -> Style {
        if self.colour {
            Style::new()
                .fg(Color::White)
                .bg(Color::Blue)
                .add_modifier(Modifier::BOLD)
        } else {
            Style::new().add_modifier(Modifier::REVERSED)
        }
    }
    fn selected(&self) -> Style {
        Style::new().add_modifier(Modifier::REVERSED)
    }
    fn bad(&self) -> Style {
        if self.colour {
            Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)
        } else {
            Style::new().add_modifier(Modifier::BOLD)
        }
    }
    fn good(&self) -> Style {
        if self.colour {
            Style::new().fg(Color::Green)
        } else {
            Style::new()
        }
    }
    fn dim(&self) -> Style {
        if self.colour {
            Style::new().fg(Color::DarkGray)
        } else {
            Style::new()
        }
    }
    fn head(&self) -> Style {
        Style::new().add_modifier(Modifier::BOLD)
    }
}

const SCREENS: [(Screen, &str); 8] = [
    (Screen::Start, "Start"),
    (Screen::Disks, "Disks"),
    (Screen::Plan, "Plan"),
    (Screen::Key, "Key"),
    (Screen::Confirm, "Confirm"),
    (Screen::Progress, "Progress"),
    (Screen::Trouble, "Trouble"),
    (Screen::Done, "Done"),
];

fn screen_name(s: Screen) -> &'static str {
    SCREENS.iter().find(|(x, _)| *x == s).map_or("", |(_, n)| n)
}

pub fn draw(f: &mut Frame, app: &App) {
    let look = Look { colour: app.colour };
    let width = f.area().width.max(1) as usize;
    // A long error wraps rather than losing its end (what to do).
    let msg_lines = app
        .message
        .as_ref()
        .map_or(1, |(_, m)| m.chars().count().div_ceil(width).clamp(1, 3));
    let [top, body, msg, help] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(1),
        Constraint::Length(msg_lines as u16),
        Constraint::Length(1),
    ])
    .areas(f.area());
    let machine = app
        .machine
        .as_ref()
        .map(|m| {
            format!(
                " · {} saved {}",
                m.manifest.system.hostname, m.manifest.manifest.created
            )
        })
        .unwrap_or_default();
    f.render_widget(
        Paragraph::new(format!(
            " bmr recovery{} · {}{machine}",
            if app.phase == 2 { " phase two" } else { "" },
            screen_name(app.screen)
        ))
        .style(look.title()),
        top,
    );
    match app.screen {
        Screen::Start => start(f, app, &look, body),
        Screen::Disks => disks(f, app, &look, body),
        Screen::Plan => plan(f, app, &look, body),
        Screen::Key => key(f, app, &look, body),
        Screen::Confirm => confirm(f, app, &look, body),
        Screen::Progress => progress(f, app, &look, body),
        Screen::Trouble => trouble(f, app, &look, body),
        Screen::Done => done(f, app, &look, body),
    }
    if let Some((tone, text)) = &app.message {
        let style = match tone {
            Tone::Error => look.bad(),
            Tone::Info => look.good(),
        };
        f.render_widget(
            Paragraph::new(text.as_str())
                .style(style)
                .wrap(Wrap { trim: false }),
            msg,
        );
    }
    f.render_widget(Paragraph::new(help_line(app)).style(look.dim()), help);
}

fn help_line(app: &App) -> String {
    let shell = if app.lock { "" } else { " · h shell" };
    match app.screen {
        Screen::Start if app.typing.is_some() => "type, Enter to use it · Esc cancel".into(),
        Screen::Start if app.machine.is_none() => {
            format!("↑↓ choose · Enter read it · m type device/path/URL · s source{shell}")
        }
        Screen::Start => format!("Enter next · s backup source{shell}"),
        Screen::Disks => {
            "↑↓ saved disk · ←→ its target · a automatic · Enter next · Esc back".into()
        }
        Screen::Plan => {
            "↑↓ volume · +/- size · x exclude · p spare space · Enter next · Esc back".into()
        }
        Screen::Key => "type the passphrase · Enter check it · Esc back".into(),
        Screen::Confirm => "type the disk names · Enter proceed · Esc back".into(),
        Screen::Progress => "working; nothing to press (Ctrl-L redraws)".into(),
        Screen::Trouble => match &app.trouble {
            Some(t) if !t.abort => format!("r run it again{shell}"),
            Some(t) if !t.critical => format!("r retry · s skip{shell} · a abort"),
            _ => format!("r retry{shell} · a abort"),
        },
        Screen::Done => format!("Enter reboot{shell}"),
    }
}

fn start(f: &mut Frame, app: &App, look: &Look, area: Rect) {
    let s = &app.start;
    let mut lines = vec![
        Line::from(vec![
            Span::styled("Booted:   ", look.head()),
            Span::raw(&s.booted),
        ]),
        Line::from(vec![
            Span::styled("Drivers:  ", look.head()),
            Span::raw(format!(
                "{} modules loaded; from the recovery medium: {}",
                s.modules,
                if s.from_medium.is_empty() {
                    "none".to_string()
                } else {
                    s.from_medium.join(", ")
                }
            )),
        ]),
    ];
    lines.push(match &s.medium {
        Some(m) => Line::from(vec![Span::styled("Medium:   ", look.head()), Span::raw(m)]),
        None => Line::from(vec![
            Span::styled("Medium:   ", look.head()),
            Span::styled("not found", look.bad()),
        ]),
    });
    lines.push(match &s.source {
        Ok(d) => Line::from(vec![
            Span::styled("Source:   ", look.head()),
            Span::styled(d.as_str(), look.good()),
        ]),
        Err(e) => Line::from(vec![
            Span::styled("Source:   ", look.head()),
            Span::styled(format!("not reachable: {e}"), look.bad()),
        ]),
    });
    if app.machine.is_none() && app.typing.is_none() {
        lines.push(Line::raw(""));
        if s.candidates.is_empty() {
            lines.push(Line::raw(
                "No device here looks like a recovery medium: press m to type a device or image path.",
            ));
        } else {
            lines.push(Line::styled("Read the recovery medium from:", look.head()));
            for (i, c) in s.candidates.iter().enumerate() {
                let style = if i == app.cursor {
                    look.selected()
                } else {
                    Style::new()
                };
                lines.push(Line::styled(format!("  {c}"), style));
            }
        }
    }
    if let Some(t) = app.typing {
        lines.push(Line::raw(""));
        let what = match t {
            Typing::Medium => "Recovery medium (device, LABEL=, image file or http(s):// URL): ",
            Typing::Source => {
                "Backup source (tape:/dev/nst0, file:DIR, file:LABEL=X:/DIR, http(s)://…): "
            }
        };
        lines.push(Line::styled(what, look.head()));
        lines.push(Line::raw(format!("> {}_", app.input)));
    }
    if !s.warnings.is_empty() {
        lines.push(Line::raw(""));
        lines.push(Line::styled(
            format!("Warnings ({}):", s.warnings.len()),
            look.bad(),
        ));
        for w in &s.warnings {
            lines.push(Line::raw(format!("  {w}")));
        }
    }
    f.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }), area);
}

fn disks(f: &mut Frame, app: &App, look: &Look, area: Rect) {
    let Some(m) = &app.machine else { return };
    let [saved_area, found_area, why_area] = Layout::vertical([
        Constraint::Length(m.manifest.disks.len() as u16 + 3),
        Constraint::Length(m.targets.len() as u16 + 3),
        Constraint::Min(1),
    ])
    .areas(area);
    let rows: Vec<Row> = m
        .manifest
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let target = app.target_of(&d.id).unwrap_or_else(|| "-".into());
            let chosen = app.map.iter().any(|(s, _)| s == &d.id);
            let row = disk_row(
                &d.id,
                &d.model,
                d.size_bytes,
                d.logical_sector_size,
                &d.transport,
                format!("{target}{}", if chosen { " (yours)" } else { "" }),
            );
            if i == app.cursor {
                row.style(look.selected())
            } else {
                row
            }
        })
        .collect();
    f.render_widget(
        disk_table(rows, 6, ["saved", "goes to"], "Saved disks", look),
        saved_area,
    );
    let rows: Vec<Row> = m
        .targets
        .iter()
        .map(|t| {
            let role = match &t.protected {
                Some(why) => format!("protected: {why}"),
                None => {
                    let from: Vec<String> = m
                        .manifest
                        .disks
                        .iter()
                        .filter(|d| app.target_of(&d.id).as_deref() == Some(t.device.as_str()))
                        .map(|d| d.id.clone())
                        .collect();
                    if from.is_empty() {
                        "not used".into()
                    } else {
                        format!("gets {}", from.join(", "))
                    }
                }
            };
            let row = disk_row(
                &t.device,
                &t.model,
                t.size_bytes,
                t.logical_sector_size,
                m.transport.get(&t.device).map_or("", String::as_str),
                role,
            );
            if t.protected.is_some() {
                row.style(look.dim())
            } else {
                row
            }
        })
        .collect();
    f.render_widget(
        disk_table(rows, 12, ["found", "use"], "Disks found here", look),
        found_area,
    );
    let mut why: Vec<Line> = Vec::new();
    match &app.plan {
        Ok(p) => {
            for d in &p.disks {
                why.push(Line::raw(mapping_line(app, d)));
            }
            for w in &p.warnings {
                why.push(Line::styled(format!("warning: {w}"), look.bad()));
            }
        }
        Err(e) => why.push(Line::styled(format!("no plan: {e}"), look.bad())),
    }
    // The selected saved disk's identity, to tell it apart from the disks here.
    if let Some(d) = m.manifest.disks.get(app.cursor) {
        let mut id = vec![d.model.clone()];
        for (what, v) in [("serial", &d.serial), ("WWN", &d.wwn), ("path", &d.by_path)] {
            if !v.is_empty() {
                id.push(format!("{what} {v}"));
            }
        }
        id.retain(|s| !s.is_empty());
        if !id.is_empty() {
            why.push(Line::raw(format!("{} was: {}", d.id, id.join(", "))));
        }
    }
    for t in m.targets.iter().filter(|t| t.protected.is_some()) {
        why.push(Line::styled(
            format!(
                "{} is never written: {}",
                t.device,
                t.protected.as_deref().unwrap_or_default()
            ),
            look.dim(),
        ));
    }
    f.render_widget(Paragraph::new(why).wrap(Wrap { trim: false }), why_area);
}

/// Saved and found disks are listed alike, so they can be compared.
fn disk_row<'a>(
    name: &str,
    model: &str,
    bytes: u64,
    sector: u32,
    ctrl: &str,
    last: String,
) -> Row<'a> {
    Row::new(vec![
        Cell::from(name.to_string()),
        Cell::from(truncate(model, 16)),
        Cell::from(size(bytes)),
        Cell::from(sector.to_string()),
        Cell::from(ctrl.to_string()),
        Cell::from(last),
    ])
}

fn disk_table<'a>(
    rows: Vec<Row<'a>>,
    first: u16,
    [head, tail]: [&'a str; 2],
    title: &'a str,
    look: &Look,
) -> Table<'a> {
    Table::new(
        rows,
        [
            Constraint::Length(first),
            Constraint::Length(16),
            Constraint::Length(10),
            Constraint::Length(5),
            Constraint::Length(7),
            Constraint::Min(10),
        ],
    )
    .header(Row::new([head, "model", "size", "sect", "ctrl", tail]).style(look.head()))
    .block(Block::new().borders(Borders::TOP).title(title))
}

fn plan(f: &mut Frame, app: &App, look: &Look, area: Rect) {
    let p = match &app.plan {
        Ok(p) => p,
        Err(e) => {
            f.render_widget(
                Paragraph::new(format!("no plan: {e}"))
                    .style(look.bad())
                    .wrap(Wrap { trim: false }),
                area,
            );
            return;
        }
    };
    let [table_area, why_area] = Layout::vertical([
        Constraint::Length(p.volumes.len() as u16 + 2),
        Constraint::Min(1),
    ])
    .areas(area);
    let rows: Vec<Row> = p
        .volumes
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let resized = app.adjust.sizes.iter().any(|(id, _)| id == &v.id);
            let row = Row::new(vec![
                Cell::from(v.id.clone()),
                Cell::from(format!("{:?}", v.role).to_lowercase()),
                Cell::from(size(v.saved_size_bytes)),
                Cell::from(v.used_bytes.map(size).unwrap_or_else(|| "?".into())),
                Cell::from(if v.target_device.is_empty() {
                    "-".to_string()
                } else {
                    v.target_device.clone()
                }),
                Cell::from(if v.action == Action::Drop {
                    "-".to_string()
                } else {
                    format!("{}{}", size(v.size_bytes), if resized { "*" } else { "" })
                }),
                Cell::from(v.action.to_string()),
            ]);
            if i == app.cursor {
                row.style(look.selected())
            } else if v.action == Action::Drop {
                row.style(look.bad())
            } else {
                row
            }
        })
        .collect();
    f.render_widget(
        Table::new(
            rows,
            [
                Constraint::Length(8),
                Constraint::Length(7),
                Constraint::Length(10),
                Constraint::Length(10),
                Constraint::Length(11),
                Constraint::Length(11),
                Constraint::Min(8),
            ],
        )
        .header(
            Row::new([
                "volume", "role", "saved", "used", "onto", "new size", "action",
            ])
            .style(look.head()),
        )
        .block(Block::new().borders(Borders::BOTTOM)),
        table_area,
    );
    let mut why = Vec::new();
    if let Some(v) = p.volumes.get(app.cursor) {
        why.push(Line::from(vec![
            Span::styled(format!("{}: ", v.id), look.head()),
            Span::raw(v.reason.clone()),
        ]));
    }
    why.push(Line::raw(format!(
        "Spare space: {}",
        super::app::sizing_name(p.policy.sizing)
    )));
    for t in &p.targets {
        why.push(Line::raw(format!("{}: {}", t.device, t.reason)));
    }
    for w in &p.warnings {
        why.push(Line::styled(format!("warning: {w}"), look.bad()));
    }
    f.render_widget(Paragraph::new(why).wrap(Wrap { trim: false }), why_area);
}

fn key(f: &mut Frame, app: &App, look: &Look, area: Rect) {
    let lines = vec![
        Line::raw("The backup images are encrypted. Type the passphrase they were made with."),
        Line::raw("It is checked against the images before anything is written."),
        Line::raw(""),
        Line::from(vec![
            Span::styled("Passphrase: ", look.head()),
            Span::raw(format!("{}_", "*".repeat(app.input.chars().count()))),
        ]),
    ];
    f.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }), area);
}

fn confirm(f: &mut Frame, app: &App, look: &Look, area: Rect) {
    let Ok(p) = &app.plan else { return };
    let mut lines = vec![Line::styled(
        "Everything on these disks will be destroyed:",
        look.bad(),
    )];
    let found = app.machine.as_ref().map(|m| &m.targets);
    for t in &p.targets {
        let now = found
            .and_then(|ts| ts.iter().find(|x| x.device == t.device))
            .map(|x| {
                if x.existing.is_empty() {
                    "no filesystems found on it".to_string()
                } else {
                    format!(
                        "holds now: {}",
                        x.existing
                            .iter()
                            .map(|e| format!("{} {}", e.filesystem, size(e.size_bytes)))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
            })
            .unwrap_or_default();
        lines.push(Line::raw(format!(
            "  {} ({}), gets {}; {now}",
            t.device,
            size(t.size_bytes),
            t.saved.join(", ")
        )));
    }
    lines.push(Line::raw(""));
    lines.push(Line::raw("Then:"));
    for v in &p.volumes {
        let what = match v.action {
            Action::RestoreImage => format!("restore {} onto {}", v.id, v.target_device),
            Action::RestoreFiles => format!("copy {}'s files onto {}", v.id, v.target_device),
            Action::Create => format!("create {} on {}", v.id, v.target_device),
            Action::Skip => format!("keep {} on {} as it is", v.id, v.target_device),
            Action::Drop => format!("leave {} out", v.id),
        };
        // apply makes swap and every filesystem; phase two fills the data volumes.
        let when = if v.role.is_critical() || v.action == Action::Create {
            "now"
        } else {
            "after the reboot"
        };
        lines.push(Line::raw(format!("  {what} ({when})")));
    }
    let names: Vec<String> = app
        .doomed()
        .iter()
        .map(|d| d.trim_start_matches("/dev/").to_string())
        .collect();
    lines.push(Line::raw(""));
    lines.push(Line::from(vec![
        Span::styled("To proceed, type ", look.head()),
        Span::styled(names.join(" "), look.bad()),
        Span::styled(" and press Enter:", look.head()),
    ]));
    lines.push(Line::raw(format!("> {}_", app.input)));
    if app.key == KeyNeed::Accepted {
        lines.push(Line::styled("The key was accepted.", look.good()));
    }
    f.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }), area);
}

fn mark(s: Status) -> &'static str {
    match s {
        Status::Waiting => "[ ]",
        Status::Running => "[>]",
        Status::Done => "[x]",
        Status::Skipped => "[-]",
        Status::Failed => "[!]",
    }
}

fn steps_lines<'a>(app: &'a App, look: &Look) -> Vec<Line<'a>> {
    app.run
        .steps
        .iter()
        .map(|s| {
            let text = match s.status {
                Status::Done => format!("{} {} ({:.0} s)", mark(s.status), s.name, s.seconds),
                _ => format!("{} {}", mark(s.status), s.name),
            };
            let style = match s.status {
                Status::Running => look.head(),
                Status::Failed => look.bad(),
                _ => Style::new(),
            };
            Line::styled(text, style)
        })
        .collect()
}

fn progress(f: &mut Frame, app: &App, look: &Look, area: Rect) {
    let bars = app.run.bars.len().min(3) as u16;
    let [steps_area, bars_area, log_area] = Layout::vertical([
        Constraint::Length(app.run.steps.len().max(1) as u16),
        Constraint::Length(bars),
        Constraint::Min(3),
    ])
    .areas(area);
    f.render_widget(Paragraph::new(steps_lines(app, look)), steps_area);
    // The newest bars: a finished volume's bar gives way to the next.
    let shown: Vec<Line> = app
        .run
        .bars
        .iter()
        .rev()
        .take(3)
        .rev()
        .map(|b| Line::raw(bar_text(b, bars_area.width as usize)))
        .collect();
    f.render_widget(Paragraph::new(shown), bars_area);
    log_pane(f, app, look, log_area);
}

/// `what [#####.....]  42% 3 GiB of 8 GiB, 102 MiB/s, ETA 50 s`: text,
/// so it reads the same in monochrome and on a serial console.
fn bar_text(b: &super::app::Bar, width: usize) -> String {
    let ratio = if b.total == 0 {
        1.0
    } else {
        (b.done as f64 / b.total as f64).clamp(0.0, 1.0)
    };
    let eta = b
        .eta()
        .map(|e| format!(", ETA {e:.0} s"))
        .unwrap_or_default();
    let numbers = format!(
        "{:>3}% {} of {}, {}/s{eta}",
        (ratio * 100.0) as u32,
        size(b.done),
        size(b.total),
        size(b.rate() as u64)
    );
    let what = format!("{:<20}", truncate(&b.what, 24));
    let room = width.saturating_sub(what.chars().count() + numbers.chars().count() + 4);
    let cells = room.clamp(0, 30);
    let full = (ratio * cells as f64).round() as usize;
    format!(
        "{what} [{}{}] {numbers}",
        "#".repeat(full),
        ".".repeat(cells - full)
    )
}

fn log_pane(f: &mut Frame, app: &App, look: &Look, area: Rect) {
    let inner = area.height.saturating_sub(1) as usize;
    let lines: Vec<Line> = app
        .run
        .log
        .iter()
        .skip(app.run.log.len().saturating_sub(inner))
        .map(|l| Line::raw(truncate(l, area.width as usize)))
        .collect();
    f.render_widget(
        Paragraph::new(lines).block(
            Block::new()
                .borders(Borders::TOP)
                .title("Log")
                .border_style(look.dim()),
        ),
        area,
    );
}

fn trouble(f: &mut Frame, app: &App, look: &Look, area: Rect) {
    let Some(t) = &app.trouble else { return };
    let [what_area, log_area] =
        Layout::vertical([Constraint::Min(6), Constraint::Length(8)]).areas(area);
    let mut lines = vec![
        Line::styled(format!("This step failed: {}", t.step), look.bad()),
        Line::raw(""),
        Line::raw(t.error.clone()),
        Line::raw(""),
        Line::styled("What now:", look.head()),
        Line::raw(if t.abort {
            "  r  retry the step (after fixing the cause, e.g. from a shell)"
        } else {
            "  r  run it again now"
        }),
    ];
    if !t.abort {
        if !app.lock {
            lines.push(Line::raw("  h  open a shell; leave it to come back here"));
        }
        f.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }), what_area);
        log_pane(f, app, look, log_area);
        return;
    }
    if t.critical {
        lines.push(Line::raw(
            "     (skip is not offered: the machine cannot boot without this step)",
        ));
    } else {
        lines.push(Line::raw("  s  skip it and go on"));
    }
    if !app.lock {
        lines.push(Line::raw("  h  open a shell; leave it to come back here"));
    }
    lines.push(Line::raw(
        "  a  abort the recovery (what was written stays; starting again is safe)",
    ));
    f.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }), what_area);
    log_pane(f, app, look, log_area);
}

fn done(f: &mut Frame, app: &App, look: &Look, area: Rect) {
    let mut lines = Vec::new();
    match &app.run.finished {
        Some(Ok(summary)) => {
            let what = if app.phase == 2 {
                "Phase two finished: the recovery is complete."
            } else {
                "Phase one finished."
            };
            lines.push(Line::styled(what, look.good()));
            for s in summary {
                lines.push(Line::raw(s.clone()));
            }
        }
        Some(Err(e)) => {
            lines.push(Line::styled("The recovery stopped.", look.bad()));
            lines.push(Line::raw(e.clone()));
        }
        None => {}
    }
    lines.push(Line::raw(""));
    lines.extend(steps_lines(app, look));
    if let Ok(p) = &app.plan {
        lines.push(Line::raw(""));
        for d in &p.disks {
            lines.push(Line::raw(mapping_line(app, d)));
        }
        if !p.warnings.is_empty() {
            lines.push(Line::raw(""));
            for w in &p.warnings {
                lines.push(Line::styled(format!("warning: {w}"), look.bad()));
            }
        }
    }
    f.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }), area);
}

/// The planner says "mapped by --map"; here the operator chose it.
fn mapping_line(app: &App, d: &crate::plan::DiskMapping) -> String {
    if app.phase == 2 {
        return format!("saved {} is now {}", d.saved, d.target);
    }
    let why = if app.map.iter().any(|(s, _)| *s == d.saved) {
        "chosen by you"
    } else {
        d.reason.as_str()
    };
    format!("{} -> {}: {why}", d.saved, d.target)
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}
