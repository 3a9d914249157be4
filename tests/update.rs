//! `ferry update apply` refuses a bundle with a bad signature, and one signed by another key,
//! before it writes anything: the inactive slot's bytes and the boot entries stay as they were,
//! and the operator reads why. The slots are files behind a stand-in for udev's `/dev/disk`
//! links; a bundle with a good signature, given the same stand-ins, does reach slot B (so the
//! refusals are what kept it unchanged). The boots (update media, A/B switch, fallback) are in the
//! image suite: `image/boot-test.sh`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const RUNNING: &str = "0123456789abcdef0123456789abcdeffedcba9876543210fedcba9876543210";
const UPDATE: &str = "aaaaaaaaaaaaaaaabbbbbbbbbbbbbbbbccccccccccccccccdddddddddddddddd";

fn ferry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output()
        .expect("run ferry")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Slots A and B as files, `/dev/disk` links to them, a command line naming slot A, an ESP.
struct Appliance {
    dir: tempfile::TempDir,
}

impl Appliance {
    fn new() -> Appliance {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for sub in [
            "dev/disk/by-partlabel",
            "dev/disk/by-partuuid",
            "esp/EFI/Linux",
        ] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        for (name, len, byte) in [
            ("root-a", 2 << 20, 0xa1u8),
            ("verity-a", 64 << 10, 0xa2),
            ("root-b", 2 << 20, 0xb1),
            ("verity-b", 64 << 10, 0xb2),
        ] {
            std::fs::write(d.join(name), vec![byte; len]).unwrap();
            std::os::unix::fs::symlink(
                d.join(name),
                d.join(format!("dev/disk/by-partlabel/ferry-{name}")),
            )
            .unwrap();
        }
        let data_uuid = format!(
            "{}-{}-{}-{}-{}",
            &RUNNING[0..8],
            &RUNNING[8..12],
            &RUNNING[12..16],
            &RUNNING[16..20],
            &RUNNING[20..32]
        );
        std::os::unix::fs::symlink(
            d.join("root-a"),
            d.join(format!("dev/disk/by-partuuid/{data_uuid}")),
        )
        .unwrap();
        std::fs::write(
            d.join("cmdline"),
            format!("root=/dev/mapper/root roothash={RUNNING} ro\n"),
        )
        .unwrap();
        std::fs::write(d.join("esp/EFI/Linux/ferry_00000-a.efi"), b"slot A's UKI").unwrap();
        Appliance { dir }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Everything `apply` may write: both slots and the ESP's entries (names and bytes).
    fn state(&self) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for name in ["root-a", "verity-a", "root-b", "verity-b"] {
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
        out
    }

    fn apply(&self, bundle: &Path, key: &Path) -> Output {
        ferry(&[
            "update",
            "apply",
            s(bundle),
            "--key",
            s(key),
            "--cmdline",
            s(&self.path("cmdline")),
            "--dev-disk",
            s(&self.path("dev/disk")),
            "--esp",
            s(&self.path("esp")),
        ])
    }
}

/// A key pair and a bundle signed with it: (private, public, bundle).
fn signed_bundle(dir: &Path, tag: &str) -> (PathBuf, PathBuf, PathBuf) {
    let (sk, pk) = (
        dir.join(format!("{tag}.pk8")),
        dir.join(format!("{tag}.pub")),
    );
    let out = ferry(&["update", "keygen", "--private", s(&sk), "--public", s(&pk)]);
    assert!(out.status.success(), "keygen: {out:?}");
    let parts = dir.join(format!("{tag}-parts"));
    std::fs::create_dir_all(&parts).unwrap();
    for (name, len) in [("root", 1usize << 20), ("verity", 8192), ("uki", 4096)] {
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8 ^ 0x5a).collect();
        std::fs::write(parts.join(name), bytes).unwrap();
    }
    let bundle = dir.join(format!("{tag}.bundle"));
    let out = ferry(&[
        "update",
        "sign",
        "--private",
        s(&sk),
        "--version",
        "2.0",
        "--roothash",
        UPDATE,
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
    (sk, pk, bundle)
}

const REFUSAL: &str =
    "bad signature: this bundle was not signed by the provider key built into this image";

#[test]
fn bad_signatures_are_refused_before_anything_is_written() {
    let work = tempfile::tempdir().unwrap();
    let (_, provider_pub, bundle) = signed_bundle(work.path(), "provider");
    let (_, _, foreign) = signed_bundle(work.path(), "other");
    let appliance = Appliance::new();
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
        let out = appliance.apply(b, &provider_pub);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: accepted: {out:?}");
        assert!(
            stderr.contains(&format!("refusing {}: {REFUSAL}", b.display())),
            "{what}: the operator is not told why: {stderr}"
        );
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("installing"),
            "{what}: it went on to install"
        );
        assert!(
            appliance.state() == before,
            "{what}: a slot or the ESP changed"
        );
    }

    // The control: the provider's own bundle, same stand-ins, does get written to slot B (the
    // stand-ins are files, not partitions, so it stops at the partition UUIDs afterwards).
    let out = appliance.apply(&bundle, &provider_pub);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("running slot a, installing version 2.0 into slot b"),
        "control: {out:?}"
    );
    let root_b = std::fs::read(appliance.path("root-b")).unwrap();
    assert_eq!(
        &root_b[..1 << 20],
        std::fs::read(work.path().join("provider-parts/root"))
            .unwrap()
            .as_slice(),
        "control: a good bundle should have reached slot B"
    );
    assert_eq!(
        std::fs::read(appliance.path("root-a")).unwrap(),
        before[0].1,
        "control: the running slot was written"
    );
}
