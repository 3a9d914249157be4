//! `ferry update`: apply a signed update bundle to the inactive root slot (from a file, or from
//! update media attached to the appliance), and the provider-side tools that make bundles (key
//! generation, signing). The logic lives in the `ferry-update` crate.

use anyhow::Context;
use clap::{Args, Subcommand};
use ferry_update::{
    bundle, entries, media, offer, slots, BundleSource, InstalledRecord, Running, Verdict,
    VerifiedBundle,
};
use std::path::{Path, PathBuf};

/// Where the image keeps the provider's update-signing public key (32 raw bytes, hex-encoded).
const BUILT_IN_KEY: &str = "/usr/lib/ferry/update-key.pub";
/// Where the ESP is mounted (fstab): boot entries are written there, and systemd-bless-boot
/// finds it there.
const ESP: &str = "/efi";
/// Bundles installed on this appliance (see [`InstalledRecord`]).
const INSTALLED: &str = "/var/lib/ferry-update/installed";

#[derive(Args)]
pub struct UpdateArgs {
    #[command(subcommand)]
    cmd: UpdateCmd,
}

#[derive(Subcommand)]
enum UpdateCmd {
    /// Verify a bundle and write it to the inactive slot; it boots next, with a few tries.
    /// A version older than the running one is refused unless --allow-downgrade; the running
    /// version, or a bundle installed before, is not installed again.
    Apply {
        bundle: PathBuf,
        /// The provider's public key (hex); the image's built-in key by default.
        #[arg(long, default_value = BUILT_IN_KEY)]
        key: PathBuf,
        /// Only verify the bundle and show where it would go.
        #[arg(long)]
        dry_run: bool,
        /// Install a version older than the running one (a deliberate rollback): it boots next,
        /// and the running slot boots again if it fails its tries.
        #[arg(long)]
        allow_downgrade: bool,
        #[arg(long, default_value = INSTALLED)]
        installed: PathBuf,
        #[command(flatten)]
        target: Target,
    },
    /// At boot (ferry-update.service): say which slot runs, then look for update media (an
    /// ISO 9660 CD/DVD or stick) carrying a signed bundle not installed before; verify it,
    /// install it into the inactive slot and reboot into it.
    FromMedia {
        #[arg(long, default_value = BUILT_IN_KEY)]
        key: PathBuf,
        /// Reboot (systemctl reboot) after installing.
        #[arg(long)]
        reboot: bool,
        /// Write the slot line here too (for the health report).
        #[arg(long)]
        status_file: Option<PathBuf>,
        /// Look only at these devices or image files instead of every disk.
        #[arg(long)]
        media: Vec<PathBuf>,
        #[arg(long, default_value = INSTALLED)]
        installed: PathBuf,
        #[command(flatten)]
        target: Target,
    },
    /// Which slot is running and whether its boot is blessed, the version in each slot, and
    /// the last install.
    Status {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = INSTALLED)]
        installed: PathBuf,
        #[command(flatten)]
        target: Target,
    },
    /// Verify a bundle's signature and digests without writing anything.
    Verify {
        bundle: PathBuf,
        #[arg(long, default_value = BUILT_IN_KEY)]
        key: PathBuf,
    },
    /// Provider side: make an Ed25519 signing key pair (PKCS#8 private key, hex public key).
    Keygen {
        #[arg(long)]
        private: PathBuf,
        #[arg(long)]
        public: PathBuf,
    },
    /// Provider side: sign an image build's root, verity and UKI into a bundle.
    Sign {
        #[arg(long)]
        private: PathBuf,
        #[arg(long)]
        version: String,
        #[arg(long)]
        roothash: String,
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        verity: PathBuf,
        #[arg(long)]
        uki: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

/// Where the slots and the boot entries are; the defaults are the running appliance's.
#[derive(Args)]
struct Target {
    /// The running kernel's command line (its roothash= names the running slot).
    #[arg(long, default_value = "/proc/cmdline", hide = true)]
    cmdline: PathBuf,
    /// udev's /dev/disk (by-partlabel/, by-partuuid/); its parent is /dev.
    #[arg(long, default_value = "/dev/disk", hide = true)]
    dev_disk: PathBuf,
    /// sysfs's block devices (partition numbers, the disk of a partition, media candidates).
    #[arg(long, default_value = "/sys/class/block", hide = true)]
    sys_block: PathBuf,
    /// The running root's os-release (IMAGE_VERSION is the running version).
    #[arg(long, default_value = "/usr/lib/os-release", hide = true)]
    os_release: PathBuf,
    /// The mounted ESP.
    #[arg(long, default_value = ESP, hide = true)]
    esp: PathBuf,
    /// Boots the new slot gets before the old one boots again.
    #[arg(long, default_value_t = slots::DEFAULT_TRIES)]
    tries: u32,
}

impl Target {
    fn layout(&self) -> anyhow::Result<slots::SlotLayout> {
        let cmdline = std::fs::read_to_string(&self.cmdline)
            .with_context(|| format!("reading {}", self.cmdline.display()))?;
        Ok(slots::SlotLayout::discover(
            &cmdline,
            &self.dev_disk,
            &self.sys_block,
        )?)
    }

    /// The running image's `IMAGE_VERSION`, if its os-release says.
    fn running_version(&self) -> Option<String> {
        let text = std::fs::read_to_string(&self.os_release).ok()?;
        entries::os_release_value(&text, "IMAGE_VERSION").filter(|v| !v.is_empty())
    }

    fn running(&self, layout: &slots::SlotLayout) -> Running {
        Running {
            roothash: layout.active_roothash.clone(),
            version: self.running_version(),
        }
    }
}

fn status_line(layout: &slots::SlotLayout, target: &Target) -> String {
    format!(
        "slot={} version={} roothash={}",
        layout.active.letter(),
        target.running_version().as_deref().unwrap_or("unknown"),
        layout.active_roothash
    )
}

fn public_key(path: &Path) -> anyhow::Result<Vec<u8>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the update key {}", path.display()))?;
    Ok(bundle::public_key_from_hex(&text)?)
}

fn verify(path: &Path, key: &Path) -> anyhow::Result<VerifiedBundle> {
    VerifiedBundle::open(path, &public_key(key)?)
        .with_context(|| format!("refusing {}", path.display()))
}

/// What happened to one bundle found on update media.
enum MediaOutcome {
    Refused,
    NotNeeded,
    Installed,
}

/// Decide about and maybe install one bundle on media. Every refusal is said on the console.
fn media_bundle(
    found: &media::MediaFile,
    key: &[u8],
    layout: &slots::SlotLayout,
    running: &Running,
    record: &InstalledRecord,
    target: &Target,
) -> anyhow::Result<MediaOutcome> {
    let src: &BundleSource = &found.source;
    let label = format!("{} ({})", found.name, src);
    // The signature first: it costs one small read, and nothing unsigned is even described.
    let manifest = match bundle::read_signed_manifest(src, key) {
        Ok(m) => m,
        Err(e) => {
            println!("FERRY-UPDATE refused {label}: {e}; nothing was written");
            return Ok(MediaOutcome::Refused);
        }
    };
    let v = &manifest.version;
    let active = layout.active.letter();
    match offer::judge(v, &manifest.roothash, running, record)
        .with_context(|| format!("reading {}", record.path.display()))?
    {
        Verdict::Newer => {}
        Verdict::Running => {
            println!(
                "FERRY-UPDATE {label}: version {v} is the running one (slot {active}); nothing to do, the media can be detached"
            );
            return Ok(MediaOutcome::NotNeeded);
        }
        Verdict::InstalledBefore(_) => {
            println!(
                "FERRY-UPDATE {label}: version {v} (root hash {}) was installed before; not installing it again (it runs, or it failed and slot {active} runs again); the media can be detached",
                manifest.roothash
            );
            return Ok(MediaOutcome::NotNeeded);
        }
        Verdict::SameVersion => {
            println!(
                "FERRY-UPDATE {label}: version {v} is the running version (slot {active}; this bundle is another build of it, root hash {}); not installed: a fix carries a higher version; the media can be detached",
                manifest.roothash
            );
            return Ok(MediaOutcome::NotNeeded);
        }
        Verdict::Older { running } => {
            println!(
                "FERRY-UPDATE refused {label}: version {v} is older than the running version {running} (slot {active}); update media never downgrade; nothing was written"
            );
            return Ok(MediaOutcome::Refused);
        }
        Verdict::UnknownRunningVersion => {
            println!(
                "FERRY-UPDATE refused {label}: the running version is unknown (no IMAGE_VERSION in {}), so version {v} could be a downgrade; nothing was written",
                target.os_release.display()
            );
            return Ok(MediaOutcome::Refused);
        }
    }
    let started = std::time::Instant::now();
    println!("FERRY-UPDATE {label}: version {v}, signed by the provider key; checking every part");
    let verified = match VerifiedBundle::open_source(src, key) {
        Ok(b) => b,
        Err(e) => {
            println!("FERRY-UPDATE refused {label}: {e}; nothing was written");
            return Ok(MediaOutcome::Refused);
        }
    };
    let slot = layout.inactive().letter();
    println!("FERRY-UPDATE installing version {v} into slot {slot}");
    let entry = slots::install(&verified, layout, &target.esp, target.tries)
        .with_context(|| format!("installing version {v} into slot {slot}"))?;
    record
        .add(&manifest.roothash, v, slot, &format!("media {label}"))
        .with_context(|| format!("recording the install in {}", record.path.display()))?;
    println!(
        "FERRY-UPDATE installed version {v} into slot {slot} in {:.0} s: boot entry {} ({} tries, then slot {} again)",
        started.elapsed().as_secs_f64(),
        entry.display(),
        target.tries,
        layout.active.letter()
    );
    Ok(MediaOutcome::Installed)
}

fn from_media(
    key: &Path,
    reboot: bool,
    status_file: Option<&Path>,
    media_paths: &[PathBuf],
    installed: &Path,
    target: &Target,
) -> anyhow::Result<()> {
    let layout = target.layout()?;
    let running = target.running(&layout);
    let line = status_line(&layout, target);
    println!("FERRY-SLOT {line}");
    if let Some(path) = status_file {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, format!("{line}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
        // Read by the health report, which runs as another user.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))?;
    }
    let key = public_key(key)?;
    let record = InstalledRecord {
        path: installed.to_path_buf(),
    };
    let devices = if media_paths.is_empty() {
        let esp = std::fs::canonicalize(target.dev_disk.join("by-partlabel/ferry-esp"))
            .context("finding the ESP")?;
        let (boot_disk, _) = slots::disk_and_number(&esp, &layout.sys_block, &layout.dev)?;
        media::candidate_devices(&layout.sys_block, &[boot_disk])?
    } else {
        media_paths.to_vec()
    };
    for dev in &devices {
        let found = match media::bundles_on(dev) {
            Ok(f) => f,
            // No medium in the drive, a disk that is not update media: not our business.
            Err(media::MediaError::NotIso) => continue,
            Err(media::MediaError::Io(e)) if media_paths.is_empty() => {
                tracing::debug!(device = %dev.display(), error = %e, "not readable as media");
                continue;
            }
            Err(e) => {
                println!("FERRY-UPDATE {}: {e}", dev.display());
                continue;
            }
        };
        if found.is_empty() {
            println!(
                "FERRY-UPDATE {}: an ISO 9660 medium without update bundles",
                dev.display()
            );
        }
        for f in &found {
            if let MediaOutcome::Installed =
                media_bundle(f, &key, &layout, &running, &record, target)?
            {
                if reboot {
                    println!(
                        "FERRY-UPDATE rebooting into slot {}",
                        layout.inactive().letter()
                    );
                    let st = std::process::Command::new("systemctl")
                        .args(["--no-block", "reboot"])
                        .status()
                        .context("running systemctl reboot")?;
                    anyhow::ensure!(st.success(), "systemctl reboot: {st}");
                }
                // One install per boot: the new slot has to prove itself first.
                return Ok(());
            }
        }
    }
    Ok(())
}

/// `ferry update apply`: the signature, then whether the bundle is wanted (running, installed
/// before, the same or an older version), then every part's digest; only then the slot.
fn apply(
    path: &Path,
    key: &Path,
    dry_run: bool,
    allow_downgrade: bool,
    installed: &Path,
    t: &Target,
) -> anyhow::Result<()> {
    let refusing = || format!("refusing {}", path.display());
    let key = public_key(key)?;
    let src = BundleSource::file(path).with_context(refusing)?;
    let manifest = bundle::read_signed_manifest(&src, &key).with_context(refusing)?;
    let layout = t.layout()?;
    let running = t.running(&layout);
    let record = InstalledRecord {
        path: installed.to_path_buf(),
    };
    let v = &manifest.version;
    let active = layout.active.letter();
    let running_version = running.version.as_deref().unwrap_or("unknown");
    let verdict = offer::judge(v, &manifest.roothash, &running, &record)
        .with_context(|| format!("reading {}", record.path.display()))?;
    let downgrade = match verdict {
        Verdict::Newer => false,
        Verdict::Running => {
            println!("version {v} is the running image (slot {active}, root hash {}); nothing to do", manifest.roothash);
            return Ok(());
        }
        Verdict::InstalledBefore(i) => {
            println!(
                "version {v} (root hash {}) was installed on this appliance before{}; not installing it again (it waits in slot {}, or it ran and slot {active} runs again); nothing was written",
                manifest.roothash,
                i.at.map(|at| format!(" ({})", when(at))).unwrap_or_default(),
                layout.inactive().letter(),
            );
            return Ok(());
        }
        Verdict::SameVersion => {
            println!(
                "version {v} is the running version (slot {active}; this bundle is another build of it, root hash {}); nothing to do: a fix carries a higher version",
                manifest.roothash
            );
            return Ok(());
        }
        Verdict::Older { running } if !allow_downgrade => anyhow::bail!(
            "refusing {}: version {v} is older than the running version {running} (slot {active}); nothing was written (--allow-downgrade installs it deliberately)",
            path.display()
        ),
        Verdict::UnknownRunningVersion if !allow_downgrade => anyhow::bail!(
            "refusing {}: the running version is unknown (no IMAGE_VERSION in {}), so version {v} could be a downgrade; nothing was written (--allow-downgrade installs it anyway)",
            path.display(),
            t.os_release.display()
        ),
        Verdict::Older { .. } | Verdict::UnknownRunningVersion => true,
    };
    // Every part's digest before anything is written.
    let b = VerifiedBundle::open_source(&src, &key).with_context(refusing)?;
    let target = layout.inactive();
    println!(
        "running slot {active} (version {running_version}), installing version {v} into slot {}{}",
        target.letter(),
        if downgrade {
            " (a downgrade, as asked)"
        } else {
            ""
        }
    );
    if dry_run {
        println!("dry run: nothing was written");
        return Ok(());
    }
    let entry = slots::install(&b, &layout, &t.esp, t.tries)?;
    record
        .add(
            &manifest.roothash,
            v,
            target.letter(),
            &format!("apply {}", path.display()),
        )
        .with_context(|| format!("recording the install in {}", record.path.display()))?;
    if downgrade {
        // An older version sorts after the running one: set the running slot's entry aside, or
        // systemd-boot would never choose the downgrade.
        let renamed = slots::set_aside(&t.esp, layout.active).with_context(|| {
            format!("version {v} is in slot {}, but setting slot {active}'s boot entry aside failed: slot {active} keeps booting", target.letter())
        })?;
        for (from, to) in renamed {
            println!("slot {active}'s boot entry {from} is set aside as {to}: it boots again only if version {v} fails its tries");
        }
    }
    println!(
        "installed; boot entry {} is tried next ({} tries, then slot {} again)",
        entry.display(),
        t.tries,
        layout.active.letter()
    );
    Ok(())
}

/// A recorded time, in UTC.
fn when(unix: u64) -> String {
    i64::try_from(unix)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("@{unix}"))
}

#[derive(serde::Serialize)]
struct SlotStatus {
    slot: char,
    running: bool,
    /// From the slot's UKI (`.osrel` `IMAGE_VERSION`), what systemd-boot sorts by.
    version: Option<String>,
    entry: Option<String>,
    state: Option<String>,
}

#[derive(serde::Serialize)]
struct LastInstall {
    version: String,
    roothash: String,
    slot: Option<char>,
    at: Option<String>,
    source: Option<String>,
}

#[derive(serde::Serialize)]
struct StatusReport {
    slot: char,
    version: Option<String>,
    roothash: String,
    /// The running slot's boot entry has no boot counter (left by systemd-bless-boot, or the
    /// factory entry).
    blessed: Option<bool>,
    slots: Vec<SlotStatus>,
    last_install: Option<LastInstall>,
}

/// `ferry update status`: the slots as the boot loader sees them (entries and their UKIs on the
/// ESP), the running one, and the last install this appliance recorded.
fn status(t: &Target, installed: &Path, json: bool) -> anyhow::Result<()> {
    let layout = t.layout()?;
    let dir = t.esp.join("EFI/Linux");
    let found = entries::list(&dir).with_context(|| format!("reading {}", dir.display()))?;
    let mut slots_out = Vec::new();
    for slot in [slots::Slot::A, slots::Slot::B] {
        // Normally one entry per slot; the newest generation if an interrupted install left two.
        let e = found
            .iter()
            .filter(|e| e.slot == slot.letter())
            .max_by_key(|e| e.generation);
        let version = e.and_then(|e| {
            entries::uki_os_release(&dir.join(&e.file))
                .ok()
                .flatten()
                .and_then(|osrel| entries::os_release_value(&osrel, "IMAGE_VERSION"))
        });
        slots_out.push(SlotStatus {
            slot: slot.letter(),
            running: slot == layout.active,
            version,
            entry: e.map(|e| e.file.clone()),
            state: e.map(|e| e.state()),
        });
    }
    let blessed = found
        .iter()
        .filter(|e| e.slot == layout.active.letter())
        .max_by_key(|e| e.generation)
        .map(|e| e.counter == entries::Counter::Blessed);
    let record = InstalledRecord {
        path: installed.to_path_buf(),
    };
    let last = record
        .last()
        .with_context(|| format!("reading {}", installed.display()))?
        .map(|i| LastInstall {
            version: i.version,
            roothash: i.roothash,
            slot: i.slot,
            at: i.at.map(when),
            source: i.source,
        });
    let report = StatusReport {
        slot: layout.active.letter(),
        version: t.running_version(),
        roothash: layout.active_roothash.clone(),
        blessed,
        slots: slots_out,
        last_install: last,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let unknown = "unknown";
    println!(
        "running: slot {}, version {}, root hash {}, boot {}",
        report.slot,
        report.version.as_deref().unwrap_or(unknown),
        report.roothash,
        match report.blessed {
            Some(true) => "blessed",
            Some(false) => "not blessed (on trial, or set aside)",
            None => "unknown (no boot entry of the running slot on the ESP)",
        }
    );
    for s in &report.slots {
        match (&s.entry, &s.state) {
            (Some(entry), Some(state)) => println!(
                "slot {}: version {}, boot entry {entry}: {state}{}",
                s.slot,
                s.version.as_deref().unwrap_or(unknown),
                if s.running { " (running)" } else { "" }
            ),
            _ => println!(
                "slot {}: no boot entry (empty, or its install did not finish){}",
                s.slot,
                if s.running { " (running)" } else { "" }
            ),
        }
    }
    match &report.last_install {
        Some(i) => println!(
            "last install: version {} into slot {} at {}, from {}",
            i.version,
            i.slot
                .map_or_else(|| unknown.to_string(), |c| c.to_string()),
            i.at.as_deref().unwrap_or(unknown),
            i.source.as_deref().unwrap_or(unknown)
        ),
        None => println!("last install: none recorded ({})", installed.display()),
    }
    Ok(())
}

pub fn run(a: UpdateArgs) -> anyhow::Result<()> {
    match a.cmd {
        UpdateCmd::Verify { bundle, key } => {
            let b = verify(&bundle, &key)?;
            println!(
                "{}: signed by the provider key, version {}, root hash {}",
                bundle.display(),
                b.manifest.version,
                b.manifest.roothash
            );
        }
        UpdateCmd::Status {
            json,
            installed,
            target,
        } => status(&target, &installed, json)?,
        UpdateCmd::FromMedia {
            key,
            reboot,
            status_file,
            media,
            installed,
            target,
        } => from_media(
            &key,
            reboot,
            status_file.as_deref(),
            &media,
            &installed,
            &target,
        )?,
        UpdateCmd::Apply {
            bundle,
            key,
            dry_run,
            allow_downgrade,
            installed,
            target,
        } => apply(&bundle, &key, dry_run, allow_downgrade, &installed, &target)?,
        UpdateCmd::Keygen { private, public } => {
            let (sk, pk) = bundle::generate_key()?;
            std::fs::write(&private, sk)
                .with_context(|| format!("writing {}", private.display()))?;
            std::fs::write(&public, bundle::public_key_to_hex(&pk))
                .with_context(|| format!("writing {}", public.display()))?;
        }
        UpdateCmd::Sign {
            private,
            version,
            roothash,
            root,
            verity,
            uki,
            out,
        } => {
            let sk = std::fs::read(&private)
                .with_context(|| format!("reading {}", private.display()))?;
            let parts = [
                ("root", root.as_path()),
                ("verity", verity.as_path()),
                ("uki", uki.as_path()),
            ];
            let m = bundle::sign_bundle(&version, &roothash, &parts, &sk, &out)?;
            println!(
                "{}: version {}, root hash {}",
                out.display(),
                m.version,
                m.roothash
            );
        }
    }
    Ok(())
}
