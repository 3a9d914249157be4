//! `ferry console`: the appliance's local text console (tty1, serial). It talks only to the
//! local configuration server's API (`/v1/system/...`), never to files: the first-boot wizard
//! (password, network with confirmation, host name, time, proxy, registration), the dashboard,
//! diagnostics and maintenance. It locks after idle time; the password is checked, counted and
//! audited by the server. Everything fits 80x24 and reads without colour.

mod fields;
mod form;
mod views;

use anyhow::Context;
use clap::Args;
use crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind};
use ferry_api::{
    Dashboard, Diagnostics, LoggedIn, Login, Maintenance, MaintenanceAction, NetworkState,
    PendingNetwork, Registered, Registration, SetPassword, Settings, SetupStatus, SupportBundle,
    UpdateSlot,
};
use ferry_config_server::client::{Client, ClientError, Method};
use fields::{
    change_password_form, host_form, list, login_form, network_config, network_form, password_form,
    register_form,
};
use form::Form;
use serde::{de::DeserializeOwned, Serialize};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct ConsoleArgs {
    /// The local configuration server.
    #[arg(long, default_value = "https://127.0.0.1:8443")]
    server: String,
    /// The console's identity (ca-cert.pem, client-cert.pem, client-key.pem).
    #[arg(long, default_value = "/var/lib/ferry/config-server/admin")]
    cert_dir: PathBuf,
    /// Lock the console after this many seconds without a key.
    #[arg(long, default_value_t = 300)]
    idle_lock_secs: u64,
    /// Draw frames with + - | (serial terminals without line-drawing characters).
    #[arg(long)]
    ascii: bool,
}

/// Where the console is. Wizard screens carry `wizard: true` and move on to the next step.
enum Screen {
    /// The server cannot be reached; retried every few seconds.
    Offline,
    SetPassword(Form),
    Login(Form),
    Network {
        form: Form,
        wizard: bool,
    },
    Confirm {
        pending: PendingNetwork,
        wizard: bool,
    },
    Host {
        form: Form,
        wizard: bool,
    },
    Register {
        form: Form,
        wizard: bool,
    },
    Menu(usize),
    Dashboard(Option<Dashboard>),
    Diagnostics(Vec<String>),
    Maintenance {
        sel: usize,
        confirm: Option<Form>,
    },
    ChangePassword(Form),
}

pub const MENU: &[&str] = &[
    "Dashboard",
    "Network",
    "Host name, time, proxy",
    "Registration",
    "Diagnostics",
    "Maintenance",
    "Change the password",
    "Lock the console",
];

pub const MAINTENANCE: &[&str] = &[
    "Restart services",
    "Reboot",
    "Shut down",
    "Factory reset",
    "Boot update slot A next",
    "Boot update slot B next",
];

struct Console {
    client: Client,
    rt: tokio::runtime::Runtime,
    screen: Screen,
    /// One line under the screen: the last answer, error or hint.
    message: String,
    hostname: String,
    last_key: Instant,
    idle: Duration,
    /// Refresh timer for screens that show live state.
    refreshed: Instant,
    /// Set when the console should end (only when stdin is gone).
    quit: bool,
    terminal: Option<ratatui::DefaultTerminal>,
    ascii: bool,
}

fn describe(e: &ClientError) -> String {
    match e {
        ClientError::Api { message, .. } => message.clone(),
        e => format!("the configuration server cannot be reached: {e}"),
    }
}

impl Console {
    fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        m: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<R, ClientError> {
        self.rt.block_on(self.client.call(m, path, body))
    }

    fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R, ClientError> {
        self.call::<(), R>(Method::GET, path, None)
    }

    /// Where to start (or restart after the server came back).
    fn start(&mut self) {
        match self.get::<SetupStatus>("/v1/system/setup") {
            Ok(s) => {
                self.hostname = s.settings.hostname.clone();
                if !s.password_set {
                    self.message = "Welcome. First, choose the administrator password.".into();
                    self.screen = Screen::SetPassword(password_form());
                } else {
                    self.message = String::new();
                    self.screen = Screen::Login(login_form());
                }
            }
            Err(e) => {
                self.message = describe(&e);
                self.screen = Screen::Offline;
            }
        }
    }

    /// After a login or a wizard step: the next wizard step, or the menu.
    fn next_step(&mut self) {
        let s = match self.get::<SetupStatus>("/v1/system/setup") {
            Ok(s) => s,
            Err(e) => {
                self.message = describe(&e);
                self.screen = Screen::Menu(0);
                return;
            }
        };
        self.hostname = s.settings.hostname.clone();
        self.screen = if s.wizard_done {
            Screen::Menu(0)
        } else {
            let before = std::mem::take(&mut self.message);
            self.message =
                format!("{before} Setup 2/4: network. Enter applies, Esc skips this step.")
                    .trim_start()
                    .to_string();
            Screen::Network {
                form: network_form(s.network.as_ref()),
                wizard: true,
            }
        };
    }

    fn lock(&mut self) {
        if !matches!(self.screen, Screen::SetPassword(_) | Screen::Login(_)) {
            self.screen = Screen::Login(login_form());
            self.message = "Locked. Enter the administrator password.".into();
        }
    }

    fn key(&mut self, k: KeyEvent) {
        let screen = std::mem::replace(&mut self.screen, Screen::Offline);
        self.screen = match screen {
            Screen::Offline => {
                self.start();
                return;
            }
            Screen::SetPassword(mut f) => match k.code {
                KeyCode::Enter => {
                    if f.value(0) != f.value(1) {
                        self.message = "The two passwords differ; type them again.".into();
                        Screen::SetPassword(password_form())
                    } else {
                        let body = SetPassword {
                            password: f.fields[0].value.clone(),
                            current: None,
                        };
                        match self.call::<_, ()>(Method::PUT, "/v1/system/password", Some(&body)) {
                            Ok(()) => {
                                self.message = "Password set.".into();
                                self.next_step();
                                return;
                            }
                            Err(e) => {
                                self.message = describe(&e);
                                Screen::SetPassword(password_form())
                            }
                        }
                    }
                }
                _ => {
                    f.key(k);
                    Screen::SetPassword(f)
                }
            },
            Screen::Login(mut f) => match k.code {
                KeyCode::Enter => {
                    let body = Login {
                        password: f.fields[0].value.clone(),
                    };
                    match self.call::<_, LoggedIn>(Method::POST, "/v1/system/login", Some(&body)) {
                        Ok(l) => {
                            self.message = if l.failed_before > 0 {
                                format!(
                                    "Unlocked. {} wrong password(s) were tried before.",
                                    l.failed_before
                                )
                            } else {
                                "Unlocked.".into()
                            };
                            self.next_step();
                            return;
                        }
                        Err(e) => {
                            self.message = describe(&e);
                            Screen::Login(login_form())
                        }
                    }
                }
                _ => {
                    f.key(k);
                    Screen::Login(f)
                }
            },
            Screen::Network { mut form, wizard } => match k.code {
                KeyCode::Enter => return self.apply_network(form, wizard),
                KeyCode::Esc if wizard => self.host_step(true),
                KeyCode::Esc => Screen::Menu(1),
                _ => {
                    form.key(k);
                    Screen::Network { form, wizard }
                }
            },
            Screen::Confirm { pending, wizard } => match k.code {
                KeyCode::Enter => {
                    match self.call::<(), NetworkState>(
                        Method::POST,
                        "/v1/system/network/confirm",
                        None,
                    ) {
                        Ok(_) => {
                            self.message = "Network configuration kept.".into();
                            if wizard {
                                self.host_step(true)
                            } else {
                                Screen::Menu(1)
                            }
                        }
                        Err(e) => {
                            self.message = describe(&e);
                            Screen::Network {
                                form: network_form(Some(&pending.config)),
                                wizard,
                            }
                        }
                    }
                }
                KeyCode::Esc => {
                    let r = self.call::<(), NetworkState>(
                        Method::POST,
                        "/v1/system/network/revert",
                        None,
                    );
                    self.message = match r {
                        Ok(s) => s.last_rollback.unwrap_or_default(),
                        Err(e) => describe(&e),
                    };
                    Screen::Network {
                        form: network_form(Some(&pending.config)),
                        wizard,
                    }
                }
                _ => Screen::Confirm { pending, wizard },
            },
            Screen::Host { mut form, wizard } => match k.code {
                KeyCode::Enter => {
                    let s = Settings {
                        hostname: form.value(0).to_string(),
                        ntp: list(form.value(1)),
                        proxy: form.value(2).to_string(),
                    };
                    match self.call::<_, Settings>(Method::PUT, "/v1/system/settings", Some(&s)) {
                        Ok(s) => {
                            self.hostname = s.hostname;
                            self.message = "Host name, time servers and proxy saved.".into();
                            if wizard {
                                self.message.push_str(
                                    " Setup 4/4: registration (empty key: register later).",
                                );
                                Screen::Register {
                                    form: register_form(),
                                    wizard,
                                }
                            } else {
                                Screen::Menu(2)
                            }
                        }
                        Err(e) => {
                            self.message = describe(&e);
                            Screen::Host { form, wizard }
                        }
                    }
                }
                KeyCode::Esc if !wizard => Screen::Menu(2),
                _ => {
                    form.key(k);
                    Screen::Host { form, wizard }
                }
            },
            Screen::Register { mut form, wizard } => match k.code {
                KeyCode::Enter if form.value(1).is_empty() && wizard => self.finish_wizard(),
                KeyCode::Enter => {
                    let r = Registration {
                        provider: form.value(0).to_string(),
                        key: form.value(1).to_string(),
                        ca_sha256: form.value(2).to_string(),
                    };
                    self.message = "Registering...".into();
                    match self.call::<_, Registered>(
                        Method::POST,
                        "/v1/system/registration",
                        Some(&r),
                    ) {
                        Ok(r) => {
                            let done = format!("Registered with {} as {}.", r.provider, r.name);
                            let next = if wizard {
                                self.finish_wizard()
                            } else {
                                Screen::Menu(3)
                            };
                            self.message = format!("{done} {}", self.message);
                            next
                        }
                        Err(e) => {
                            self.message = describe(&e);
                            Screen::Register { form, wizard }
                        }
                    }
                }
                KeyCode::Esc if wizard => self.finish_wizard(),
                KeyCode::Esc => Screen::Menu(3),
                _ => {
                    form.key(k);
                    Screen::Register { form, wizard }
                }
            },
            Screen::Menu(sel) => match k.code {
                KeyCode::Up => Screen::Menu((sel + MENU.len() - 1) % MENU.len()),
                KeyCode::Down | KeyCode::Tab => Screen::Menu((sel + 1) % MENU.len()),
                KeyCode::Char(c @ '1'..='8') => self.open(c as usize - '1' as usize),
                KeyCode::Enter => self.open(sel),
                _ => Screen::Menu(sel),
            },
            Screen::Dashboard(d) => match k.code {
                KeyCode::Esc => Screen::Menu(0),
                KeyCode::Char('r') => self.dashboard(),
                _ => Screen::Dashboard(d),
            },
            Screen::Diagnostics(lines) => match k.code {
                KeyCode::Esc => Screen::Menu(4),
                KeyCode::Char('c') => self.diagnostics(),
                KeyCode::Char('l') => self.logs(),
                KeyCode::Char('b') => {
                    match self.call::<(), SupportBundle>(
                        Method::POST,
                        "/v1/system/support-bundle",
                        None,
                    ) {
                        Ok(b) => {
                            self.message = format!(
                                "Support bundle written: {} ({} bytes, {} secrets removed)",
                                b.path, b.bytes, b.redacted
                            )
                        }
                        Err(e) => self.message = describe(&e),
                    }
                    Screen::Diagnostics(lines)
                }
                _ => Screen::Diagnostics(lines),
            },
            Screen::Maintenance { sel, confirm } => self.maintenance_key(k, sel, confirm),
            Screen::ChangePassword(mut f) => match k.code {
                KeyCode::Esc => Screen::Menu(6),
                KeyCode::Enter if f.value(1) != f.value(2) => {
                    self.message = "The two new passwords differ; type them again.".into();
                    Screen::ChangePassword(change_password_form())
                }
                KeyCode::Enter => {
                    let body = SetPassword {
                        password: f.fields[1].value.clone(),
                        current: Some(f.fields[0].value.clone()),
                    };
                    match self.call::<_, ()>(Method::PUT, "/v1/system/password", Some(&body)) {
                        Ok(()) => {
                            self.message = "Password changed.".into();
                            Screen::Menu(6)
                        }
                        Err(e) => {
                            self.message = describe(&e);
                            Screen::ChangePassword(change_password_form())
                        }
                    }
                }
                _ => {
                    f.key(k);
                    Screen::ChangePassword(f)
                }
            },
        };
    }

    fn host_step(&mut self, wizard: bool) -> Screen {
        let s = self
            .get::<SetupStatus>("/v1/system/setup")
            .map(|s| s.settings)
            .unwrap_or_default();
        if wizard {
            self.message = "Setup 3/4: host name, time servers (NTP), HTTP proxy.".into();
        }
        Screen::Host {
            form: host_form(&s),
            wizard,
        }
    }

    fn finish_wizard(&mut self) -> Screen {
        match self.call::<(), ()>(Method::POST, "/v1/system/setup/done", None) {
            Ok(()) => self.message = "Setup complete.".into(),
            Err(e) => self.message = describe(&e),
        }
        Screen::Menu(0)
    }

    fn apply_network(&mut self, form: Form, wizard: bool) {
        let built = network_config(&form);
        let cfg = match built {
            Ok(c) => c,
            Err(m) => {
                self.message = m;
                self.screen = Screen::Network { form, wizard };
                return;
            }
        };
        self.message = "Applying and checking the gateway...".into();
        self.screen = Screen::Network { form, wizard };
        self.draw_now();
        match self.call::<_, PendingNetwork>(Method::PUT, "/v1/system/network", Some(&cfg)) {
            Ok(p) => {
                self.message = String::new();
                self.screen = Screen::Confirm { pending: p, wizard };
            }
            Err(e) => self.message = format!("Refused: {}", describe(&e)),
        }
    }

    fn open(&mut self, item: usize) -> Screen {
        self.message = String::new();
        match item {
            0 => self.dashboard(),
            1 => {
                let cfg = self
                    .get::<NetworkState>("/v1/system/network")
                    .ok()
                    .and_then(|s| s.confirmed);
                Screen::Network {
                    form: network_form(cfg.as_ref()),
                    wizard: false,
                }
            }
            2 => self.host_step(false),
            3 => Screen::Register {
                form: register_form(),
                wizard: false,
            },
            4 => self.diagnostics(),
            5 => Screen::Maintenance {
                sel: 0,
                confirm: None,
            },
            6 => Screen::ChangePassword(change_password_form()),
            _ => {
                self.message = "Locked. Enter the administrator password.".into();
                Screen::Login(login_form())
            }
        }
    }

    fn dashboard(&mut self) -> Screen {
        self.refreshed = Instant::now();
        match self.get::<Dashboard>("/v1/system/dashboard") {
            Ok(d) => Screen::Dashboard(Some(d)),
            Err(e) => {
                self.message = describe(&e);
                Screen::Dashboard(None)
            }
        }
    }

    fn diagnostics(&mut self) -> Screen {
        self.message = "c: check again  l: recent logs  b: support bundle  Esc: back".into();
        match self.call::<(), Diagnostics>(Method::POST, "/v1/system/diagnostics", None) {
            Ok(d) => Screen::Diagnostics(views::checks(&d)),
            Err(e) => {
                self.message = describe(&e);
                Screen::Diagnostics(Vec::new())
            }
        }
    }

    fn logs(&mut self) -> Screen {
        match self.get::<ferry_api::Logs>("/v1/system/logs") {
            Ok(l) => {
                let mut lines = vec!["Recent logs (newest last):".to_string()];
                let skip = l.lines.len().saturating_sub(views::BODY_LINES - 1);
                lines.extend(l.lines.into_iter().skip(skip));
                Screen::Diagnostics(lines)
            }
            Err(e) => {
                self.message = describe(&e);
                Screen::Diagnostics(Vec::new())
            }
        }
    }

    fn maintenance_key(&mut self, k: KeyEvent, sel: usize, confirm: Option<Form>) -> Screen {
        let n = MAINTENANCE.len();
        if let Some(mut f) = confirm {
            return match k.code {
                KeyCode::Esc => {
                    self.message = "Cancelled.".into();
                    Screen::Maintenance { sel, confirm: None }
                }
                KeyCode::Enter => {
                    let expected = if sel == 3 { "factory-reset" } else { "yes" };
                    if f.value(0) != expected {
                        self.message = format!("Not confirmed: type {expected} to go ahead.");
                        return Screen::Maintenance { sel, confirm: None };
                    }
                    self.run_maintenance(sel);
                    Screen::Maintenance { sel, confirm: None }
                }
                _ => {
                    f.key(k);
                    Screen::Maintenance {
                        sel,
                        confirm: Some(f),
                    }
                }
            };
        }
        match k.code {
            KeyCode::Up => Screen::Maintenance {
                sel: (sel + n - 1) % n,
                confirm: None,
            },
            KeyCode::Down | KeyCode::Tab => Screen::Maintenance {
                sel: (sel + 1) % n,
                confirm: None,
            },
            KeyCode::Esc => Screen::Menu(5),
            KeyCode::Enter => {
                let what = if sel == 3 {
                    "Type factory-reset and Enter: this erases the configuration and cache"
                } else {
                    "Type yes and Enter to go ahead, Esc to cancel"
                };
                self.message = format!("{}? {what}.", MAINTENANCE[sel]);
                Screen::Maintenance {
                    sel,
                    confirm: Some(Form::new(&[("Confirm", "")])),
                }
            }
            _ => Screen::Maintenance { sel, confirm: None },
        }
    }

    fn run_maintenance(&mut self, sel: usize) {
        let r = match sel {
            0..=3 => {
                let action = [
                    MaintenanceAction::RestartServices,
                    MaintenanceAction::Reboot,
                    MaintenanceAction::Shutdown,
                    MaintenanceAction::FactoryReset,
                ][sel];
                let body = Maintenance {
                    action,
                    confirm: (sel == 3).then(|| "factory-reset".to_string()),
                };
                self.call::<_, ferry_api::ActionDone>(
                    Method::POST,
                    "/v1/system/maintenance",
                    Some(&body),
                )
            }
            _ => {
                let body = UpdateSlot {
                    slot: if sel == 4 { "a" } else { "b" }.into(),
                };
                self.call(Method::PUT, "/v1/system/update-slot", Some(&body))
            }
        };
        self.message = match r {
            Ok(d) => format!("Done: {}. {}", MAINTENANCE[sel], d.output.trim()),
            Err(e) => format!("Failed: {}", describe(&e)),
        };
    }

    /// Time-driven changes: the idle lock, the confirmation countdown, live screens.
    fn tick(&mut self) {
        if self.last_key.elapsed() >= self.idle && !matches!(self.screen, Screen::Offline) {
            self.lock();
        }
        let every = match self.screen {
            Screen::Confirm { .. } => Duration::from_secs(1),
            Screen::Dashboard(_) => Duration::from_secs(5),
            Screen::Offline => Duration::from_secs(3),
            _ => return,
        };
        if self.refreshed.elapsed() < every {
            return;
        }
        self.refreshed = Instant::now();
        match &self.screen {
            Screen::Confirm { pending, wizard } => {
                if let Ok(s) = self.get::<NetworkState>("/v1/system/network") {
                    if s.pending.as_ref().map(|p| p.id) != Some(pending.id) {
                        let form = network_form(Some(&pending.config));
                        let wizard = *wizard;
                        self.message = s
                            .last_rollback
                            .unwrap_or_else(|| "The change is no longer pending.".into());
                        self.screen = Screen::Network { form, wizard };
                    }
                }
            }
            Screen::Dashboard(_) => self.screen = self.dashboard(),
            Screen::Offline => self.start(),
            _ => {}
        }
    }

    fn draw_now(&mut self) {
        let mut t = self.terminal.take();
        if let Some(t) = &mut t {
            // Best effort: a console whose terminal fails has nobody to show an error to.
            let _ = t.draw(|f| views::draw(f, self));
        }
        self.terminal = t;
    }
}

pub fn run(a: ConsoleArgs) -> anyhow::Result<()> {
    let client = Client::from_cert_dir(&a.server, &a.cert_dir).with_context(|| {
        format!(
            "the console's identity in {} (and server {})",
            a.cert_dir.display(),
            a.server
        )
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut c = Console {
        client,
        rt,
        screen: Screen::Offline,
        message: String::new(),
        hostname: String::new(),
        last_key: Instant::now(),
        idle: Duration::from_secs(a.idle_lock_secs.max(1)),
        refreshed: Instant::now(),
        quit: false,
        terminal: None,
        ascii: a.ascii,
    };
    c.terminal = Some(ratatui::try_init().context("setting up the terminal")?);
    c.start();
    let r = event_loop(&mut c);
    ratatui::restore();
    r
}

fn event_loop(c: &mut Console) -> anyhow::Result<()> {
    while !c.quit {
        c.draw_now();
        if event::poll(Duration::from_millis(200))? {
            match event::read() {
                Ok(Event::Key(k)) if k.kind != KeyEventKind::Release => {
                    c.last_key = Instant::now();
                    c.key(k);
                }
                Ok(_) => {}
                // The terminal went away (serial line hung up): let the getty restart us.
                Err(_) => c.quit = true,
            }
        }
        c.tick();
    }
    Ok(())
}
