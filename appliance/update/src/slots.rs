//! The two root slots and how an update is installed into the inactive one.
//!
//! A slot is a pair of GPT partitions, labelled `ferry-root-X` and `ferry-verity-X` (X = a or b).
//! The running slot is the one whose partition UUIDs are the halves of the `roothash=` on the
//! kernel command line (that is how systemd-veritysetup-generator found it). Installing:
//!
//! 1. the bundle is verified ([`crate::VerifiedBundle`]) before this module sees it;
//! 2. the inactive slot's partitions receive the root and verity parts (size-checked first);
//! 3. their partition UUIDs become the halves of the new root hash (`sfdisk --part-uuid`);
//! 4. the UKI goes to the ESP (mounted on `/efi`) as `EFI/Linux/ferry_<generation>-<slot>+N.efi`
//!    (written under a temporary name, synced, then renamed): a newer generation than the
//!    running one, so systemd-boot picks it next, with N tries ([`DEFAULT_TRIES`]). When
//!    `boot-complete.target` is reached (ferry-health.service passed), systemd-bless-boot drops
//!    the counter; an unhealthy trial boot reboots (ferry-update-fallback.service), and when the
//!    tries run out systemd-boot sorts the entry last and boots the old slot again. The old
//!    slot's entry is never touched.
//!
//! `/var` and the cache are different partitions and disks: an update cannot reach them.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Boots an updated slot gets to come up healthy before systemd-boot goes back to the old slot.
/// Two: one failed boot may be a power cut, two in a row are the update.
pub const DEFAULT_TRIES: u32 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn letter(self) -> char {
        match self {
            Slot::A => 'a',
            Slot::B => 'b',
        }
    }
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }
    pub fn root_label(self) -> String {
        format!("ferry-root-{}", self.letter())
    }
    pub fn verity_label(self) -> String {
        format!("ferry-verity-{}", self.letter())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("no roothash= on the kernel command line: not booted from a Ferry slot")]
    NoRootHash,
    #[error("cannot tell the running slot: no slot's partition UUIDs match roothash={0}")]
    UnknownSlot(String),
    #[error("the update's root hash equals the running slot's: this image is already running")]
    SameImage,
    #[error("part {name} ({size} bytes) does not fit partition {label} ({capacity} bytes)")]
    TooLarge {
        name: String,
        size: u64,
        label: String,
        capacity: u64,
    },
    #[error("{what}: {detail}")]
    Step { what: String, detail: String },
    #[error(transparent)]
    Bundle(#[from] crate::BundleError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

fn step(what: impl Into<String>, detail: impl ToString) -> InstallError {
    InstallError::Step {
        what: what.into(),
        detail: detail.to_string(),
    }
}

/// The root hash on a kernel command line.
pub fn roothash_from_cmdline(cmdline: &str) -> Option<String> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("roothash="))
        .map(|h| h.to_ascii_lowercase())
}

/// The partition UUIDs systemd derives from a root hash: (data, hash).
pub fn partition_uuids(roothash: &str) -> Option<(String, String)> {
    if roothash.len() < 64 || !roothash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let u = |h: &str| {
        format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    };
    let h = roothash.to_ascii_lowercase();
    Some((u(&h[..32]), u(&h[32..64])))
}

/// Where things are on the running appliance (paths are parameters so tests can fake /dev).
#[derive(Clone, Debug)]
pub struct SlotLayout {
    /// `/dev/disk/by-partlabel`
    pub by_partlabel: PathBuf,
    /// `/dev/disk/by-partuuid`
    pub by_partuuid: PathBuf,
    /// `/dev`: where a partition's whole disk is found by name.
    pub dev: PathBuf,
    /// `/sys/class/block`: a partition's number and its disk.
    pub sys_block: PathBuf,
    pub active: Slot,
    pub active_roothash: String,
}

impl SlotLayout {
    /// `dev_disk` is udev's `/dev/disk` (its parent is taken as `/dev`), `sys_block` is
    /// `/sys/class/block`.
    pub fn discover(
        cmdline: &str,
        dev_disk: &Path,
        sys_block: &Path,
    ) -> Result<SlotLayout, InstallError> {
        let roothash = roothash_from_cmdline(cmdline).ok_or(InstallError::NoRootHash)?;
        let (data_uuid, _) = partition_uuids(&roothash)
            .ok_or_else(|| InstallError::UnknownSlot(roothash.clone()))?;
        let by_partlabel = dev_disk.join("by-partlabel");
        let by_partuuid = dev_disk.join("by-partuuid");
        let running = std::fs::canonicalize(by_partuuid.join(&data_uuid))
            .map_err(|_| InstallError::UnknownSlot(roothash.clone()))?;
        for slot in [Slot::A, Slot::B] {
            if std::fs::canonicalize(by_partlabel.join(slot.root_label())).ok()
                == Some(running.clone())
            {
                return Ok(SlotLayout {
                    by_partlabel,
                    by_partuuid,
                    dev: dev_disk
                        .parent()
                        .map_or_else(|| PathBuf::from("/dev"), Path::to_path_buf),
                    sys_block: sys_block.to_path_buf(),
                    active: slot,
                    active_roothash: roothash,
                });
            }
        }
        Err(InstallError::UnknownSlot(roothash))
    }

    pub fn inactive(&self) -> Slot {
        self.active.other()
    }

    fn device(&self, label: &str) -> Result<PathBuf, InstallError> {
        std::fs::canonicalize(self.by_partlabel.join(label))
            .map_err(|e| step(format!("finding partition {label}"), e))
    }
}

/// Size in bytes of a block device (or a regular file, for tests).
fn capacity(dev: &Path) -> Result<u64, InstallError> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::open(dev)?;
    Ok(f.seek(SeekFrom::End(0))?)
}

/// Partition number and whole-disk device of a partition device, from sysfs (`sys_block`, i.e.
/// `/sys/class/block`: `NAME/partition` is the number, and NAME's real directory sits in its
/// disk's) and `dev` (`/dev`).
pub fn disk_and_number(
    part: &Path,
    sys_block: &Path,
    dev: &Path,
) -> Result<(PathBuf, u32), InstallError> {
    let name = part
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| step("partition name", part.display()))?;
    let sys = sys_block.join(name);
    let number: u32 = std::fs::read_to_string(sys.join("partition"))
        .map_err(|e| step(format!("{name} is not a partition"), e))?
        .trim()
        .parse()
        .map_err(|e| step(format!("partition number of {name}"), e))?;
    let parent = std::fs::canonicalize(&sys)?
        .parent()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .map(|n| dev.join(n))
        .ok_or_else(|| step("disk of", part.display()))?;
    Ok((parent, number))
}

fn run(what: &str, cmd: &mut Command) -> Result<(), InstallError> {
    let out = cmd.output().map_err(|e| step(what, e))?;
    if !out.status.success() {
        return Err(step(what, String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

/// The generation of the newest `ferry_NNNNN-X*.efi` entry on the ESP listing `names`.
pub fn newest_generation<'a>(names: impl IntoIterator<Item = &'a str>) -> u32 {
    names
        .into_iter()
        .filter_map(|n| n.strip_prefix("ferry_"))
        .filter_map(|n| n.get(..5)?.parse::<u32>().ok())
        .max()
        .unwrap_or(0)
}

/// Install a verified bundle into the inactive slot. `esp` is the mounted ESP (`/efi`).
/// Returns the boot entry's path on the ESP.
pub fn install(
    bundle: &crate::VerifiedBundle,
    layout: &SlotLayout,
    esp: &Path,
    tries: u32,
) -> Result<PathBuf, InstallError> {
    let m = &bundle.manifest;
    if m.roothash == layout.active_roothash {
        return Err(InstallError::SameImage);
    }
    let slot = layout.inactive();
    let root_dev = layout.device(&slot.root_label())?;
    let verity_dev = layout.device(&slot.verity_label())?;
    let entries = esp.join("EFI/Linux");
    // Every check before the first write.
    if !entries.is_dir() {
        return Err(step(
            "finding the boot entries",
            format!("no {}", entries.display()),
        ));
    }
    for (name, dev, label) in [
        ("root", &root_dev, slot.root_label()),
        ("verity", &verity_dev, slot.verity_label()),
    ] {
        let size = m.part(name).map(|p| p.size).unwrap_or(0);
        let cap = capacity(dev)?;
        if size > cap {
            return Err(InstallError::TooLarge {
                name: name.into(),
                size,
                label,
                capacity: cap,
            });
        }
    }
    // First make the slot unbootable: its old entries go before its partitions change.
    let mut names = Vec::new();
    for e in std::fs::read_dir(&entries)? {
        if let Ok(n) = e?.file_name().into_string() {
            names.push(n);
        }
    }
    for old in names
        .iter()
        .filter(|n| n.starts_with("ferry_") && n.contains(&format!("-{}", slot.letter())))
    {
        std::fs::remove_file(entries.join(old))
            .map_err(|e| step(format!("removing the slot's old boot entry {old}"), e))?;
    }
    for (name, dev) in [("root", &root_dev), ("verity", &verity_dev)] {
        let mut f = std::fs::OpenOptions::new().write(true).open(dev)?;
        bundle.copy_part(name, &mut f)?;
        f.sync_all()?;
    }
    let (data_uuid, hash_uuid) =
        partition_uuids(&m.roothash).ok_or_else(|| step("root hash", &m.roothash))?;
    for (dev, uuid) in [(&root_dev, &data_uuid), (&verity_dev, &hash_uuid)] {
        let (disk, n) = disk_and_number(dev, &layout.sys_block, &layout.dev)?;
        // The running system keeps its partitions; only the UUIDs in the GPT change, which the
        // next boot reads. The busy boot disk's table cannot be re-read now, and need not be.
        run(
            "setting the slot's partition UUID",
            Command::new("sfdisk")
                .args(["--no-reread", "--no-tell-kernel", "--part-uuid"])
                .arg(&disk)
                .arg(n.to_string())
                .arg(uuid),
        )?;
    }
    // The UKI: a new generation, with a boot counter.
    let generation = newest_generation(names.iter().map(String::as_str)) + 1;
    let entry = format!("ferry_{generation:05}-{}+{tries}.efi", slot.letter());
    let tmp = entries.join(format!(".{entry}.new"));
    let written = (|| -> Result<(), InstallError> {
        let mut f = std::fs::File::create(&tmp)?;
        bundle.copy_part("uki", &mut f)?;
        f.sync_all()?;
        std::fs::rename(&tmp, entries.join(&entry))?;
        std::fs::File::open(&entries)?.sync_all()?;
        Ok(())
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    Ok(PathBuf::from(format!("/EFI/Linux/{entry}")))
}

/// Make a deliberate downgrade boot: systemd-boot chooses the entry with the highest version, so
/// an older slot's entry would never be chosen while the running slot's entry is there. The
/// running slot's entries get a spent boot counter (`ferry_<generation>-<slot>+0.efi`), which
/// systemd-boot sorts after every entry with tries left but still boots when nothing else is
/// left: the downgrade is tried first, and when its tries are spent too the higher version (the
/// slot that ran) wins again. Run after the downgrade's entry is in place. Returns the renames.
pub fn set_aside(esp: &Path, slot: Slot) -> Result<Vec<(String, String)>, InstallError> {
    let dir = esp.join("EFI/Linux");
    let mut renamed = Vec::new();
    for e in crate::entries::list(&dir)?
        .into_iter()
        .filter(|e| e.slot == slot.letter())
    {
        let spent = e.spent();
        if spent != e.file {
            std::fs::rename(dir.join(&e.file), dir.join(&spent))
                .map_err(|err| step(format!("setting aside boot entry {}", e.file), err))?;
            renamed.push((e.file, spent));
        }
    }
    std::fs::File::open(&dir)?.sync_all()?;
    Ok(renamed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "0123456789abcdef0123456789abcdeffedcba9876543210fedcba9876543210";

    #[test]
    fn roothash_and_uuids() {
        let cmdline = format!("root=/dev/mapper/root roothash={H} ro");
        assert_eq!(roothash_from_cmdline(&cmdline).as_deref(), Some(H));
        let (d, h) = partition_uuids(H).unwrap();
        assert_eq!(d, "01234567-89ab-cdef-0123-456789abcdef");
        assert_eq!(h, "fedcba98-7654-3210-fedc-ba9876543210");
        assert!(partition_uuids("xyz").is_none());
        assert!(roothash_from_cmdline("ro quiet").is_none());
    }

    #[test]
    fn discovers_the_running_slot_from_fake_udev_links() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path();
        for d in ["by-partlabel", "by-partuuid"] {
            std::fs::create_dir(dev.join(d)).unwrap();
        }
        for p in ["vda2", "vda3", "vda4", "vda5"] {
            std::fs::write(dev.join(p), b"").unwrap();
        }
        let link =
            |to: &str, at: &str| std::os::unix::fs::symlink(dev.join(to), dev.join(at)).unwrap();
        link("vda2", "by-partlabel/ferry-root-a");
        link("vda4", "by-partlabel/ferry-root-b");
        let (data, _) = partition_uuids(H).unwrap();
        link("vda4", &format!("by-partuuid/{data}"));
        let l = SlotLayout::discover(&format!("roothash={H}"), dev, &dev.join("sys")).unwrap();
        assert_eq!(l.active, Slot::B);
        assert_eq!(l.inactive(), Slot::A);
        assert!(matches!(
            SlotLayout::discover("quiet", dev, dev),
            Err(InstallError::NoRootHash)
        ));
    }

    #[test]
    fn generations_count_up() {
        assert_eq!(newest_generation(["BOOTX64.EFI"]), 0);
        assert_eq!(
            newest_generation(["ferry_00000-a.efi", "ferry_00003-b+2-1.efi"]),
            3
        );
    }
}
