//! Drawing: a header line, the screen's box, two message lines and a key line, 80x24. Nothing
//! depends on colour: the focus is a `>` and reversed text, results say OK or FAIL in words.

use super::{Console, Screen, MAINTENANCE, MENU};
use ferry_api::{Dashboard, Diagnostics};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::symbols::border;
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Wrap};
use ratatui::Frame;

/// Lines inside the screen's box at 80x24.
pub const BODY_LINES: usize = 18;

fn gib(b: u64) -> String {
    format!("{:.1} GiB", b as f64 / f64::from(1u32 << 30))
}

fn rate(b: Option<f64>) -> String {
    match b {
        Some(b) if b >= 1e6 => format!("{:.1} MB/s", b / 1e6),
        Some(b) => format!("{:.0} kB/s", b / 1e3),
        None => "-".into(),
    }
}

pub fn dashboard(d: &Dashboard) -> Vec<String> {
    let mut out = vec![format!(
        "{:<30} {:<16} {:>9} {:>12}",
        "Protected disk", "State", "RPO", "Throughput"
    )];
    if d.disks.is_empty() {
        out.push("  (no protected machines yet)".into());
    }
    let shown = d.disks.len().min(8);
    for s in &d.disks[..shown] {
        let name = format!("{}/{}/{}", s.tenant, s.machine, s.disk);
        out.push(format!(
            "{:<30} {:<16} {:>9} {:>12}",
            name.chars().take(30).collect::<String>(),
            s.state,
            s.rpo_seconds.map_or("-".into(), |r| format!("{r:.0} s")),
            rate(s.throughput_bytes_per_sec)
        ));
    }
    if d.disks.len() > shown {
        out.push(format!("  ... and {} more disks", d.disks.len() - shown));
    }
    out.push(String::new());
    out.push(match &d.cache {
        Some(c) => format!(
            "Cache: {} of {} used ({}%) on {}",
            gib(c.used_bytes),
            gib(c.total_bytes),
            (c.used_bytes * 100).checked_div(c.total_bytes).unwrap_or(0),
            c.path
        ),
        None => "Cache: not configured".into(),
    });
    out.push(match &d.recovery_site {
        Some(c) => format!(
            "Recovery site {}: {}",
            c.target,
            if c.ok { "REACHABLE" } else { "UNREACHABLE" }
        ),
        None => "Recovery site: not configured".into(),
    });
    out.push(format!("Alerts: {} active", d.alerts.len()));
    let room = BODY_LINES.saturating_sub(out.len());
    let skip = d.alerts.len().saturating_sub(room);
    for a in &d.alerts[skip..] {
        out.push(format!(" ! {:?} {}: {}", a.severity, a.subject, a.message));
    }
    out
}

pub fn checks(d: &Diagnostics) -> Vec<String> {
    let mut out = Vec::new();
    for c in &d.checks {
        out.push(format!(
            "[{}] {} ({})",
            if c.ok { " OK " } else { "FAIL" },
            c.name,
            c.target
        ));
        out.push(format!("       {}", c.detail));
    }
    out
}

fn body(c: &Console) -> (String, Vec<Line<'static>>, &'static str) {
    let plain = |v: Vec<String>| v.into_iter().map(Line::from).collect::<Vec<_>>();
    match &c.screen {
        Screen::Offline => (
            "Not connected".into(),
            plain(vec![
                "The configuration server cannot be reached.".into(),
                "Retrying every 3 seconds.".into(),
            ]),
            "any key: retry now",
        ),
        Screen::SetPassword(f) => {
            let mut l = plain(vec![
                "Setup 1/4: the administrator password protects this console.".into(),
                String::new(),
            ]);
            l.extend(f.lines());
            ("First-boot setup".into(), l, "Up/Down: field  Enter: save")
        }
        Screen::Login(f) => {
            let mut l = plain(vec!["This console is locked.".into(), String::new()]);
            l.extend(f.lines());
            ("Locked".into(), l, "Enter: unlock")
        }
        Screen::Network { form, wizard } => {
            let title = if *wizard {
                "Setup 2/4: network"
            } else {
                "Network"
            };
            let mut l = form.lines();
            l.push(Line::from(""));
            l.push(Line::from(
                "Applied at once; kept only when you confirm it afterwards.",
            ));
            let keys = if *wizard {
                "Up/Down: field  Enter: apply  Esc: skip"
            } else {
                "Up/Down: field  Enter: apply  Esc: back"
            };
            (title.into(), l, keys)
        }
        Screen::Confirm { pending, .. } => {
            let left = pending
                .deadline_unix
                .saturating_sub(ferry_config_server::app::now_unix());
            let cfg = &pending.config;
            let mut v = vec![format!(
                "Applied to {}{}{}",
                cfg.interface,
                cfg.vlan.map(|v| format!(" VLAN {v}")).unwrap_or_default(),
                cfg.mtu.map(|m| format!(" MTU {m}")).unwrap_or_default()
            )];
            if let Some(a) = &cfg.ipv4 {
                v.push(format!(
                    "  IPv4 {a} via {}",
                    cfg.gateway4.as_deref().unwrap_or("-")
                ));
            }
            if let Some(a) = &cfg.ipv6 {
                v.push(format!(
                    "  IPv6 {a} via {}",
                    cfg.gateway6.as_deref().unwrap_or("-")
                ));
            }
            v.push("Checks:".into());
            v.extend(pending.checks.iter().map(|c| format!("  OK  {c}")));
            v.push(String::new());
            v.push("Keep this network configuration?".into());
            v.push(format!("Rolled back automatically in {left} s."));
            (
                "Confirm the network change".into(),
                plain(v),
                "Enter: keep it  Esc: revert now",
            )
        }
        Screen::Host { form, wizard } => (
            if *wizard {
                "Setup 3/4: host".into()
            } else {
                "Host name, time, proxy".into()
            },
            form.lines(),
            if *wizard {
                "Up/Down: field  Enter: save and go on"
            } else {
                "Up/Down: field  Enter: save  Esc: back"
            },
        ),
        Screen::Register { form, wizard } => {
            let mut l = plain(vec![
                "Register this appliance with your service provider, using the".into(),
                "registration key and CA fingerprint the provider gave you.".into(),
                String::new(),
            ]);
            l.extend(form.lines());
            (
                if *wizard {
                    "Setup 4/4: registration".into()
                } else {
                    "Registration".into()
                },
                l,
                if *wizard {
                    "Enter: register (empty key: later)  Esc: later"
                } else {
                    "Up/Down: field  Enter: register  Esc: back"
                },
            )
        }
        Screen::Menu(sel) => {
            let l = MENU
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let text = format!("{} {}  {m}", if i == *sel { ">" } else { " " }, i + 1);
                    if i == *sel {
                        Line::styled(text, Style::default().add_modifier(Modifier::REVERSED))
                    } else {
                        Line::from(text)
                    }
                })
                .collect();
            ("Main menu".into(), l, "Up/Down or 1-8: choose  Enter: open")
        }
        Screen::Dashboard(d) => (
            "Dashboard".into(),
            plain(d.as_ref().map(dashboard).unwrap_or_default()),
            "r: refresh  Esc: back (refreshes every 5 s)",
        ),
        Screen::Diagnostics(lines) => (
            "Diagnostics".into(),
            plain(lines.clone()),
            "c: check again  l: logs  b: support bundle  Esc: back",
        ),
        Screen::ChangePassword(f) => (
            "Change the password".into(),
            f.lines(),
            "Up/Down: field  Enter: change  Esc: back",
        ),
        Screen::Maintenance { sel, confirm } => {
            let mut l: Vec<Line<'static>> = MAINTENANCE
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let text = format!("{} {m}", if i == *sel { ">" } else { " " });
                    if i == *sel {
                        Line::styled(text, Style::default().add_modifier(Modifier::REVERSED))
                    } else {
                        Line::from(text)
                    }
                })
                .collect();
            if let Some(f) = confirm {
                l.push(Line::from(""));
                l.extend(f.lines());
            }
            (
                "Maintenance".into(),
                l,
                "Up/Down: choose  Enter: run (asks first)  Esc: back",
            )
        }
    }
}

pub fn draw(f: &mut Frame, c: &Console) {
    let [head, main, msg, keys] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(3),
        Constraint::Length(2),
        Constraint::Length(1),
    ])
    .areas(f.area());
    let (title, lines, help) = body(c);
    let host = if c.hostname.is_empty() {
        "(no host name)".to_string()
    } else {
        c.hostname.clone()
    };
    f.render_widget(
        Paragraph::new(format!(" Ferry appliance console  |  {host}"))
            .style(Style::default().add_modifier(Modifier::REVERSED)),
        head,
    );
    let mut block = Block::bordered().title(format!(" {title} "));
    if c.ascii {
        block = block.border_set(border::Set {
            top_left: "+",
            top_right: "+",
            bottom_left: "+",
            bottom_right: "+",
            vertical_left: "|",
            vertical_right: "|",
            horizontal_top: "-",
            horizontal_bottom: "-",
        });
    }
    f.render_widget(Paragraph::new(lines).block(block), main);
    f.render_widget(
        Paragraph::new(c.message.clone()).wrap(Wrap { trim: true }),
        msg,
    );
    f.render_widget(
        Paragraph::new(format!(" {help}")).style(Style::default().add_modifier(Modifier::BOLD)),
        keys,
    );
}
