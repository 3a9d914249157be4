//! `ferry update` on a stand-in appliance: slots A and B are files behind a stand-in for udev's
//! `/dev/disk` links, the GPT is a real GPT in a disk image file (sfdisk changes its partition
//! UUIDs as on the appliance), sysfs and the running root's os-release are stand-ins too.
//!
//! - bundles with a bad signature, or signed by another key, are refused before anything is
//!   written: both slots, the GPT, the boot entries and the install record stay as they were;
//!   the provider's own bundle then goes all the way (slot B, GPT UUIDs, boot entry, record) and
//!   `ferry update status` shows it;
//! - versions compare as systemd-boot compares them: an older version is refused by `apply`
//!   (naming both versions) and by update media, the running version is not installed again,
//!   an unknown running version refuses; `--allow-downgrade` installs deliberately and sets the
//!   running slot's entry aside so that the downgrade boots next;
//! - update media installs a newer bundle, records it, and leaves it alone at the next boot.
//!
//! The boots themselves (media at boot, A/B switch, fallback, blessing) are in the image suite:
//! `image/boot-test.sh`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const RUNNING: &str = "0123456789abcdef0123456789abcdeffedcba9876543210fedcba9876543210";
const UPDATE: &str = "aaaaaaaaaaaaaaaabbbbbbbbbbbbbbbbccccccccccccccccdddddddddddddddd";
const OTHER: &str = "eeeeeeeeeeeeeeeeffffffffffffffff11111111111111112222222222222222";
const THIRD: &str = "3333333333333333444444444444444455555555555555556666666666666666";

fn ferry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output()
        .expect("run ferry")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The partition UUIDs of a root hash, as systemd derives them: (data, hash).
fn uuids(roothash: &str) -> (String, String) {
    ferry_update::slots::partition_uuids(roothash).expect("a root hash of 64 hex digits")
}

/// A minimal PE file whose `.osrel` section is an os-release with IMAGE_VERSION: what
/// systemd-boot reads an entry's version from.
fn uki(version: &str) -> Vec<u8> {
    let osrel = format!("NAME=\"Ferry\"\nIMAGE_ID=ferry\nIMAGE_VERSION={version}\n");
    let mut f = vec![0u8; 64 + 24 + 40];
    f[..2].copy_from_slice(b"MZ");
    f[60..64].copy_from_slice(&64u32.to_le_bytes());
    f[64..68].copy_from_slice(b"PE\0\0");
    f[70..72].copy_from_slice(&1u16.to_le_bytes());
    let h = 64 + 24;
    f[h..h + 8].copy_from_slice(b".osrel\0\0");
    f[h + 8..h + 12].copy_from_slice(&(osrel.len() as u32).to_le_bytes());
    f[h + 16..h + 20].copy_from_slice(&512u32.to_le_bytes());
    f[h + 20..h + 24].copy_from_slice(&512u32.to_le_bytes());
    f.resize(512, 0);
    f.extend_from_slice(osrel.as_bytes());
    f.resize(1024 + 4096, 0x90);
    f
}

/// Slots A and B as files, `/dev/disk` links to them, a GPT disk image whose partitions they
/// stand for (sysfs stand-in: root-a is partition 2 of vda, ...), a command line naming slot A,
/// the running root's os-release, an ESP, the install record's place.
struct Appliance {
    dir: tempfile::TempDir,
}

const PARTS: [(&str, u32); 4] = [
    ("root-a", 2),
    ("verity-a", 3),
    ("root-b", 4),
    ("verity-b", 5),
];

impl Appliance {
    fn new(running_version: &str) -> Appliance {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for sub in [
            "dev/disk/by-partlabel",
            "dev/disk/by-partuuid",
            "sys/class/block",
            "sys/devices/vda",
            "esp/EFI/Linux",
            "var",
        ] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        for ((name, n), byte) in PARTS.iter().zip([0xa1u8, 0xa2, 0xb1, 0xb2]) {
            let len = if name.starts_with("root") {
                2 << 20
            } else {
                64 << 10
            };
            std::fs::write(d.join(name), vec![byte; len]).unwrap();
            std::os::unix::fs::symlink(
                d.join(name),
                d.join(format!("dev/disk/by-partlabel/ferry-{name}")),
            )
            .unwrap();
            let sys = d.join("sys/devices/vda").join(name);
            std::fs::create_dir(&sys).unwrap();
            std::fs::write(sys.join("partition"), format!("{n}\n")).unwrap();
            std::os::unix::fs::symlink(&sys, d.join("sys/class/block").join(name)).unwrap();
        }
        let (data, hash) = uuids(RUNNING);
        std::os::unix::fs::symlink(
            d.join("root-a"),
            d.join(format!("dev/disk/by-partuuid/{data}")),
        )
        .unwrap();
        // The boot disk: a real GPT (sfdisk works on image files as on disks).
        let vda = d.join("dev/vda");
        std::fs::File::create(&vda)
            .unwrap()
            .set_len(32 << 20)
            .unwrap();
        let table = format!(
            "label: gpt\n\
             size=4MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=ferry-esp\n\
             size=4MiB, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name=ferry-root-a, uuid={data}\n\
             size=1MiB, type=2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5, name=ferry-verity-a, uuid={hash}\n\
             size=4MiB, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name=ferry-root-b\n\
             size=1MiB, type=2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5, name=ferry-verity-b\n"
        );
        let mut sfdisk = Command::new("sfdisk")
            .args(["--quiet", "--no-reread", "--no-tell-kernel"])
            .arg(&vda)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("sfdisk (Debian package fdisk; scripts/install-deps.sh installs it)");
        use std::io::Write;
        sfdisk
            .stdin
            .take()
            .unwrap()
            .write_all(table.as_bytes())
            .unwrap();
        assert!(sfdisk.wait().unwrap().success(), "sfdisk made no GPT");
        std::fs::write(
            d.join("cmdline"),
            format!("root=/dev/mapper/root roothash={RUNNING} ro\n"),
        )
        .unwrap();
        std::fs::write(
            d.join("os-release"),
            format!("NAME=\"Ferry\"\nIMAGE_ID=ferry\nIMAGE_VERSION={running_version}\n"),
        )
        .unwrap();
        std::fs::write(
            d.join("esp/EFI/Linux/ferry_00000-a.efi"),
            uki(running_version),
        )
        .unwrap();
        Appliance { dir }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Everything `ferry update` may write: both slots, the GPT disk, the ESP's entries (names
    /// and bytes) and the install record.
    fn state(&self) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for name in ["root-a", "verity-a", "root-b", "verity-b", "dev/vda"] {
            out.push((name.to_string(), std::fs::read(self.path(name)).unwrap()));
        }
        let mut entries: Vec<_> = std::fs::read_dir(self.path("esp/EFI/Linux"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for e in entries {
            out.push((e.display().to_string(), std::fs::read(&e).unwrap()));
        }
        out.push((
            "installed".into(),
            std::fs::read(self.path("var/installed")).unwrap_or_default(),
        ));
        out
    }

    fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.path("esp/EFI/Linux"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    /// `ferry update CMD ARGS...` against this appliance's stand-ins.
    fn update(&self, cmd: &str, args: &[&str]) -> Output {
        let mut all = vec!["update", cmd];
        all.extend_from_slice(args);
        let (cmdline, dev_disk, sys, osrel, esp, installed) = (
            self.path("cmdline"),
            self.path("dev/disk"),
            self.path("sys/class/block"),
            self.path("os-release"),
            self.path("esp"),
            self.path("var/installed"),
        );
        all.extend_from_slice(&[
            "--cmdline",
            s(&cmdline),
            "--dev-disk",
            s(&dev_disk),
            "--sys-block",
            s(&sys),
            "--os-release",
            s(&osrel),
            "--esp",
            s(&esp),
            "--installed",
            s(&installed),
        ]);
        ferry(&all)
    }

    fn apply(&self, bundle: &Path, key: &Path, extra: &[&str]) -> Output {
        let mut args = vec![s(bundle), "--key", s(key)];
        args.extend_from_slice(extra);
        self.update("apply", &args)
    }

    fn update_from_media(&self, iso: &Path, key: &Path) -> Output {
        self.update("from-media", &["--media", s(iso), "--key", s(key)])
    }

    /// The partition UUIDs in the GPT (sfdisk's view), by partition number.
    fn gpt_uuid(&self, n: u32) -> String {
        let out = Command::new("sfdisk")
            .arg("--json")
            .arg(self.path("dev/vda"))
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let node = format!("{}{n}", self.path("dev/vda").display());
        v["partitiontable"]["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["node"] == node.as_str())
            .unwrap()["uuid"]
            .as_str()
            .unwrap()
            .to_ascii_lowercase()
    }
}

/// The provider: a key pair, and bundles signed with it.
struct Provider {
    dir: PathBuf,
    tag: String,
    sk: PathBuf,
    pk: PathBuf,
}

impl Provider {
    fn new(dir: &Path, tag: &str) -> Provider {
        let (sk, pk) = (
            dir.join(format!("{tag}.pk8")),
            dir.join(format!("{tag}.pub")),
        );
        let out = ferry(&["update", "keygen", "--private", s(&sk), "--public", s(&pk)]);
        assert!(out.status.success(), "keygen: {out:?}");
        Provider {
            dir: dir.to_path_buf(),
            tag: tag.into(),
            sk,
            pk,
        }
    }

    /// A bundle of `version` whose root hash is `roothash`; the parts are in
    /// `DIR/TAG-VERSION-parts/`.
    fn bundle(&self, version: &str, roothash: &str) -> PathBuf {
        let parts = self.dir.join(format!("{}-{version}-parts", self.tag));
        std::fs::create_dir_all(&parts).unwrap();
        let seed = version.len() as u8 ^ roothash.as_bytes()[0];
        for (name, len) in [("root", 1usize << 20), ("verity", 8192)] {
            let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8 ^ seed).collect();
            std::fs::write(parts.join(name), bytes).unwrap();
        }
        std::fs::write(parts.join("uki"), uki(version)).unwrap();
        let bundle = self.dir.join(format!("{}-{version}.bundle", self.tag));
        let out = ferry(&[
            "update",
            "sign",
            "--private",
            s(&self.sk),
            "--version",
            version,
            "--roothash",
            roothash,
            "--root",
            s(&parts.join("root")),
            "--verity",
            s(&parts.join("verity")),
            "--uki",
            s(&parts.join("uki")),
            "--out",
            s(&bundle),
        ]);
        assert!(out.status.success(), "sign: {out:?}");
        bundle
    }

    fn part(&self, version: &str, name: &str) -> Vec<u8> {
        std::fs::read(
            self.dir
                .join(format!("{}-{version}-parts", self.tag))
                .join(name),
        )
        .unwrap()
    }
}

/// Update media made as `image/lib.sh`'s `make_update_iso` makes them (xorriso, Rock Ridge and
/// Joliet), with `files` in the root directory.
fn iso(path: &Path, files: &[(&str, &Path)]) {
    let mut cmd = std::process::Command::new("xorriso");
    cmd.args(["-as", "mkisofs", "-quiet", "-o"])
        .arg(path)
        .args(["-V", "FERRY_UPDATE", "-R", "-J", "-graft-points"]);
    for (name, file) in files {
        cmd.arg(format!("{name}={}", file.display()));
    }
    let out = cmd
        .output()
        .expect("xorriso (scripts/install-deps.sh installs it)");
    assert!(
        out.status.success(),
        "xorriso: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const REFUSAL: &str =
    "bad signature: this bundle was not signed by the provider key built into this image";

#[test]
fn bad_signatures_are_refused_and_a_good_bundle_is_installed_recorded_and_shown() {
    let work = tempfile::tempdir().unwrap();
    let provider = Provider::new(work.path(), "provider");
    let bundle = provider.bundle("2.1", UPDATE);
    let foreign = Provider::new(work.path(), "other").bundle("2.1", UPDATE);
    let appliance = Appliance::new("2.0");
    let before = appliance.state();

    // One byte of the signature flipped.
    let mut bytes = std::fs::read(&bundle).unwrap();
    let m = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
    bytes[12 + m + 7] ^= 0x01;
    let tampered = work.path().join("tampered.bundle");
    std::fs::write(&tampered, &bytes).unwrap();

    for (what, b) in [
        ("damaged signature", &tampered),
        ("another signer", &foreign),
    ] {
        let out = appliance.apply(b, &provider.pk, &[]);
        let (stdout, stderr) = text(&out);
        assert!(!out.status.success(), "{what}: accepted: {out:?}");
        assert!(
            stderr.contains(&format!("refusing {}: {REFUSAL}", b.display())),
            "{what}: the operator is not told why: {stderr}"
        );
        assert!(
            !stdout.contains("installing"),
            "{what}: it went on to install"
        );
        assert!(
            appliance.state() == before,
            "{what}: a slot, the GPT, the ESP or the record changed"
        );
    }

    // The provider's own bundle goes all the way.
    let out = appliance.apply(&bundle, &provider.pk, &[]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "control: {stdout}{stderr}");
    assert!(
        stdout.contains("running slot a (version 2.0), installing version 2.1 into slot b"),
        "control: {stdout}"
    );
    let root_b = std::fs::read(appliance.path("root-b")).unwrap();
    assert_eq!(&root_b[..1 << 20], provider.part("2.1", "root").as_slice());
    assert_eq!(
        &std::fs::read(appliance.path("verity-b")).unwrap()[..8192],
        provider.part("2.1", "verity").as_slice()
    );
    assert_eq!(
        std::fs::read(appliance.path("root-a")).unwrap(),
        before[0].1,
        "the running slot was written"
    );
    let (data, hash) = uuids(UPDATE);
    assert_eq!(appliance.gpt_uuid(4), data, "slot B's root partition UUID");
    assert_eq!(
        appliance.gpt_uuid(5),
        hash,
        "slot B's verity partition UUID"
    );
    assert_eq!(
        appliance.gpt_uuid(2),
        uuids(RUNNING).0,
        "slot A's partition UUID changed"
    );
    assert_eq!(
        appliance.entries(),
        ["ferry_00000-a.efi", "ferry_00001-b+2.efi"]
    );
    assert_eq!(
        std::fs::read(appliance.path("esp/EFI/Linux/ferry_00001-b+2.efi")).unwrap(),
        provider.part("2.1", "uki")
    );
    // Recorded as from-media records: root hash, version, slot, time, source.
    let record = std::fs::read_to_string(appliance.path("var/installed")).unwrap();
    let fields: Vec<&str> = record.trim_end().splitn(5, ' ').collect();
    assert_eq!(record.lines().count(), 1, "{record}");
    assert_eq!(&fields[..3], [UPDATE, "2.1", "b"], "{record}");
    assert_eq!(fields[4], format!("apply {}", bundle.display()));

    let out = appliance.update("status", &[]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "status: {stderr}");
    for line in [
        format!("running: slot a, version 2.0, root hash {RUNNING}, boot blessed"),
        "slot a: version 2.0, boot entry ferry_00000-a.efi: blessed (running)".into(),
        "slot b: version 2.1, boot entry ferry_00001-b+2.efi: not booted yet (2 tries)".into(),
    ] {
        assert!(stdout.contains(&line), "status lacks {line:?}:\n{stdout}");
    }
    assert!(
        stdout.contains("last install: version 2.1 into slot b at 20")
            && stdout.contains(&format!(", from apply {}", bundle.display())),
        "status: {stdout}"
    );
    let out = appliance.update("status", &["--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["slot"], "a");
    assert_eq!(v["blessed"], true);
    assert_eq!(v["slots"][1]["version"], "2.1");
    assert_eq!(v["slots"][1]["entry"], "ferry_00001-b+2.efi");
    assert_eq!(v["last_install"]["roothash"], UPDATE);

    // The same bundle on media attached later (the slot waits for its reboot): not again.
    let after = appliance.state();
    let media = work.path().join("media.iso");
    iso(&media, &[("FERRY.BUN", &bundle)]);
    let out = appliance.update_from_media(&media, &provider.pk);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("version 2.1 (root hash ")
            && stdout.contains("was installed before; not installing it again"),
        "{stdout}"
    );
    assert!(
        appliance.state() == after,
        "media reinstalled an applied bundle"
    );
    // And apply says so too, writing nothing.
    let out = appliance.apply(&bundle, &provider.pk, &[]);
    assert!(out.status.success());
    assert!(text(&out)
        .0
        .contains("was installed on this appliance before"));
    assert!(appliance.state() == after);
}

#[test]
fn versions_compare_as_numbers_and_downgrades_need_the_operators_word() {
    let work = tempfile::tempdir().unwrap();
    let provider = Provider::new(work.path(), "provider");
    // As text "2.9" sorts after "2.10"; as versions (systemd-boot's order) it is older.
    let older = provider.bundle("2.9", UPDATE);
    let same = provider.bundle("2.10", OTHER);
    let appliance = Appliance::new("2.10");
    let before = appliance.state();

    for extra in [&[][..], &["--dry-run"][..]] {
        let out = appliance.apply(&older, &provider.pk, extra);
        let (stdout, stderr) = text(&out);
        assert!(!out.status.success(), "a downgrade was accepted: {stdout}");
        assert!(
            stderr.contains(&format!(
                "refusing {}: version 2.9 is older than the running version 2.10 (slot a); nothing was written (--allow-downgrade installs it deliberately)",
                older.display()
            )),
            "{stderr}"
        );
        assert!(appliance.state() == before, "a refused downgrade wrote");
    }
    let out = appliance.apply(&same, &provider.pk, &["--allow-downgrade"]);
    assert!(out.status.success());
    assert!(
        text(&out).0.contains(
            "version 2.10 is the running version (slot a; this bundle is another build of it"
        ),
        "{out:?}"
    );
    assert!(
        appliance.state() == before,
        "the running version was installed"
    );

    // Update media never downgrades, and says why on the console.
    let media = work.path().join("media.iso");
    iso(&media, &[("OLD.BUN", &older), ("SAME.BUN", &same)]);
    let out = appliance.update_from_media(&media, &provider.pk);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains(&format!(
            "FERRY-UPDATE refused OLD.BUN ({}@",
            media.display()
        )) && stdout.contains(
            "version 2.9 is older than the running version 2.10 (slot a); update media never downgrade; nothing was written"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("SAME.BUN") && stdout.contains("version 2.10 is the running version"),
        "{stdout}"
    );
    assert!(appliance.state() == before, "media wrote");

    // A running version nobody can read: newer or older cannot be told, so no.
    std::fs::write(appliance.path("os-release"), "NAME=Ferry\n").unwrap();
    let out = appliance.apply(&older, &provider.pk, &[]);
    assert!(!out.status.success());
    assert!(
        text(&out)
            .1
            .contains("the running version is unknown (no IMAGE_VERSION in"),
        "{out:?}"
    );
    assert!(appliance.state() == before);
    std::fs::write(appliance.path("os-release"), "IMAGE_VERSION=\"2.10\"\n").unwrap();

    // The operator's word: installed, and slot A's entry set aside so that 2.9 boots next.
    let out = appliance.apply(&older, &provider.pk, &["--allow-downgrade"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("installing version 2.9 into slot b (a downgrade, as asked)"),
        "{stdout}"
    );
    assert!(
        stdout
            .contains("slot a's boot entry ferry_00000-a.efi is set aside as ferry_00000-a+0.efi"),
        "{stdout}"
    );
    assert_eq!(
        appliance.entries(),
        ["ferry_00000-a+0.efi", "ferry_00001-b+2.efi"]
    );
    assert_eq!(
        &std::fs::read(appliance.path("root-b")).unwrap()[..1 << 20],
        provider.part("2.9", "root").as_slice()
    );
    let out = appliance.update("status", &[]);
    let stdout = text(&out).0;
    assert!(
        stdout.contains("boot not blessed")
            && stdout.contains("slot a: version 2.10, boot entry ferry_00000-a+0.efi: set aside for a deliberate downgrade")
            && stdout.contains("slot b: version 2.9, boot entry ferry_00001-b+2.efi"),
        "{stdout}"
    );
}

#[test]
fn update_media_installs_a_newer_bundle_once() {
    let work = tempfile::tempdir().unwrap();
    let provider = Provider::new(work.path(), "provider");
    let newer = provider.bundle("2026.12.01.000000", THIRD);
    let appliance = Appliance::new("2026.11.30.235959");
    let media = work.path().join("media.iso");
    iso(&media, &[("README.TXT", &provider.pk), ("NEW.BUN", &newer)]);
    let out = appliance.update_from_media(&media, &provider.pk);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("FERRY-SLOT slot=a version=2026.11.30.235959 roothash=")
            && stdout.contains("FERRY-UPDATE installed version 2026.12.01.000000 into slot b"),
        "{stdout}"
    );
    assert_eq!(
        appliance.entries(),
        ["ferry_00000-a.efi", "ferry_00001-b+2.efi"]
    );
    assert_eq!(appliance.gpt_uuid(4), uuids(THIRD).0);
    let record = std::fs::read_to_string(appliance.path("var/installed")).unwrap();
    assert!(
        record.starts_with(&format!("{THIRD} 2026.12.01.000000 b "))
            && record.contains(&format!("media NEW.BUN ({}@", media.display())),
        "{record}"
    );
    // The next boot with the media still attached: left alone.
    let after = appliance.state();
    let out = appliance.update_from_media(&media, &provider.pk);
    assert!(text(&out).0.contains("not installing it again"), "{out:?}");
    assert!(appliance.state() == after);
}
