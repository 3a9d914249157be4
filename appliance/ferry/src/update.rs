//! `ferry update`: apply a signed update bundle to the inactive root slot (from a file, or from
//! update media attached to the appliance), and the provider-side tools that make bundles (key
//! generation, signing). The logic lives in the `ferry-update` crate.

use anyhow::Context;
use clap::{Args, Subcommand};
use ferry_update::{bundle, media, slots, BundleSource, InstalledRecord, VerifiedBundle};
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
    Apply {
        bundle: PathBuf,
        /// The provider's public key (hex); the image's built-in key by default.
        #[arg(long, default_value = BUILT_IN_KEY)]
        key: PathBuf,
        /// Only verify the bundle and show where it would go.
        #[arg(long)]
        dry_run: bool,
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
    /// Which slot is running, its version and root hash.
    Status {
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
    /// udev's /dev/disk (by-partlabel/, by-partuuid/).
    #[arg(long, default_value = "/dev/disk", hide = true)]
    dev_disk: PathBuf,
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
        Ok(slots::SlotLayout::discover(&cmdline, &self.dev_disk)?)
    }
}

fn image_version() -> String {
    std::fs::read_to_string("/usr/lib/os-release")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("IMAGE_VERSION="))
                .map(|v| v.trim_matches('"').to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn status_line(layout: &slots::SlotLayout) -> String {
    format!(
        "slot={} version={} roothash={}",
        layout.active.letter(),
        image_version(),
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
    if manifest.roothash == layout.active_roothash {
        println!(
            "FERRY-UPDATE {label}: version {v} is the running one (slot {}); nothing to do, the media can be detached",
            layout.active.letter()
        );
        return Ok(MediaOutcome::NotNeeded);
    }
    if record.contains(&manifest.roothash)? {
        println!(
            "FERRY-UPDATE {label}: version {v} (root hash {}) was installed before; not installing it again (it runs, or it failed and slot {} runs again); the media can be detached",
            manifest.roothash,
            layout.active.letter()
        );
        return Ok(MediaOutcome::NotNeeded);
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
        .add(&manifest.roothash, v)
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
    let line = status_line(&layout);
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
        let (boot_disk, _) = slots::disk_and_number(&esp)?;
        media::candidate_devices(Path::new("/sys/class/block"), &[boot_disk])?
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
            if let MediaOutcome::Installed = media_bundle(f, &key, &layout, &record, target)? {
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
        UpdateCmd::Status { target } => {
            println!("{}", status_line(&target.layout()?));
        }
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
            target: t,
        } => {
            // The signature and every digest are checked before anything else happens.
            let b = verify(&bundle, &key)?;
            let layout = t.layout()?;
            let target = layout.inactive();
            println!(
                "running slot {}, installing version {} into slot {}",
                layout.active.letter(),
                b.manifest.version,
                target.letter()
            );
            if dry_run {
                return Ok(());
            }
            let entry = slots::install(&b, &layout, &t.esp, t.tries)?;
            println!(
                "installed; boot entry {} is tried next ({} tries, then slot {} again)",
                entry.display(),
                t.tries,
                layout.active.letter()
            );
        }
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
