//! The appliance image boots and comes up healthy on slot A; update media with badly signed
//! bundles is refused without a byte of slot B changing; a broken signed update is installed
//! into slot B, fails its trial boots and falls back to slot A by itself; a good update boots on
//! slot B, comes up healthy and is blessed; a tampered root does not run.
//!
//! This takes about half an hour (build + about ten TCG boots), so it runs only when asked:
//! `FERRY_IMAGE_TEST=1 cargo nextest run -p ferry --test image --no-capture`. It runs
//! `image/boot-test.sh`, which builds the image when `FERRY_IMAGE` does not name one already.

use std::path::Path;
use std::process::Command;

#[test]
fn image_boots_updates_falls_back_and_refuses_a_tampered_root() {
    if std::env::var_os("FERRY_IMAGE_TEST").is_none_or(|v| v != "1") {
        println!("skipped: set FERRY_IMAGE_TEST=1 to build and boot the appliance image (minutes)");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../image/boot-test.sh");
    let status = Command::new("bash")
        .arg(&script)
        .status()
        .expect("run image/boot-test.sh");
    assert!(status.success(), "image/boot-test.sh failed: {status}");
}

/// One member of a POSIX ustar archive.
struct Member {
    name: String,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    data: Vec<u8>,
}

fn octal(field: &[u8]) -> u64 {
    let text = std::str::from_utf8(field).unwrap();
    let digits = text.trim_matches(|c: char| c == '\0' || c == ' ');
    u64::from_str_radix(digits, 8).unwrap_or_else(|e| panic!("octal field {text:?}: {e}"))
}

/// The members of a ustar archive, in archive order; panics on anything else (GNU or pax
/// headers included: an OVA is plain ustar).
fn ustar_members(bytes: &[u8]) -> Vec<Member> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 512 <= bytes.len() {
        let h = &bytes[at..at + 512];
        if h.iter().all(|&b| b == 0) {
            break;
        }
        assert_eq!(
            &h[257..265],
            b"ustar\x0000",
            "member {} is not POSIX ustar",
            out.len()
        );
        assert_eq!(h[156], b'0', "member {} is not a regular file", out.len());
        let sum: u64 = h
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u64::from(b)
                }
            })
            .sum();
        assert_eq!(
            octal(&h[148..156]),
            sum,
            "header checksum of member {}",
            out.len()
        );
        let name_end = h[..100].iter().position(|&b| b == 0).unwrap_or(100);
        let size = octal(&h[124..136]) as usize;
        out.push(Member {
            name: String::from_utf8(h[..name_end].to_vec()).unwrap(),
            mode: octal(&h[100..108]) as u32,
            uid: octal(&h[108..116]),
            gid: octal(&h[116..124]),
            mtime: octal(&h[136..148]),
            data: bytes[at + 512..at + 512 + size].to_vec(),
        });
        at += 512 + size.div_ceil(512) * 512;
    }
    out
}

fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn qemu_img_info(path: &Path) -> serde_json::Value {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(path)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "qemu-img info {}: {out:?}",
        path.display()
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `make_ova` from image/lib.sh, as build.sh calls it.
fn make_ova(vmdk: &Path, out: &Path, epoch: &str) -> std::process::Output {
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../image/lib.sh");
    Command::new("bash")
        .arg("-c")
        .arg(r#". "$1" && make_ova "$2" "$3" 1.2.3~rc1 "1.2.3~rc1 (g1234567) <&>""#)
        .arg("make_ova")
        .arg(&lib)
        .arg(vmdk)
        .arg(out)
        .env("SOURCE_DATE_EPOCH", epoch)
        .output()
        .expect("bash")
}

const OVF: &str = "http://schemas.dmtf.org/ovf/envelope/1";
const RASD: &str =
    "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData";
const VMW: &str = "http://www.vmware.com/schema/ovf";

type Node<'a, 'i> = roxmltree::Node<'a, 'i>;

/// The OVF child element `name` of `n`.
fn child<'a, 'i>(n: Node<'a, 'i>, name: &str) -> Node<'a, 'i> {
    n.children()
        .find(|c| c.has_tag_name((OVF, name)))
        .unwrap_or_else(|| panic!("no {name} in {:?}", n.tag_name().name()))
}

/// The `ovf:` attribute `name` of `n`.
fn attr(n: Node<'_, '_>, name: &str) -> Option<String> {
    n.attribute((OVF, name)).map(str::to_string)
}

/// The text of an `Item`'s `rasd:` element `name`.
fn rasd(item: Node<'_, '_>, name: &str) -> Option<String> {
    item.children()
        .find(|c| c.has_tag_name((RASD, name)))
        .and_then(|c| c.text())
        .map(str::to_string)
}

/// The OVA for VMware, built from a small disk the way build.sh builds it from the image: a
/// ustar archive with the descriptor, the manifest and the streamOptimized VMDK in this order,
/// fixed owners and times; the manifest's digests are the members'; the descriptor parses and
/// describes the disk file (its size), its capacity, an empty cache disk, EFI, 2 vCPUs, 8 GiB,
/// vmxnet3 and the version; the VMDK inside (its CID pinned as build.sh pins it) holds the
/// disk's bytes. Two builds are identical;
/// a disk that is not a streamOptimized VMDK is refused and leaves no OVA.
#[test]
fn ova_for_vmware_from_a_small_disk() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 24 MiB: 3 MiB of data at the start, 1 MiB at 20 MiB, zeros between.
    let raw = d.join("disk.raw");
    let mut bytes: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    bytes.resize(20 << 20, 0);
    bytes.extend((0..1u32 << 20).map(|i| (i % 251) as u8));
    bytes.resize(24 << 20, 0);
    std::fs::write(&raw, &bytes).unwrap();
    let vmdk = d.join("ferry.vmdk");
    let st = Command::new("qemu-img")
        .args([
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
        ])
        .arg(&raw)
        .arg(&vmdk)
        .status()
        .unwrap();
    assert!(st.success());

    // build.sh pins the content id qemu-img chose at random, which it writes without zero
    // padding (a shorter or longer CID= line moves the rest of the descriptor).
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../image/lib.sh");
    for cid in ["abc", "0123abcd"] {
        let out = Command::new("bash")
            .arg("-c")
            .arg(r#". "$1" && pin_vmdk_cid "$2" "$3""#)
            .arg("pin")
            .arg(&lib)
            .arg(&vmdk)
            .arg(cid)
            .output()
            .unwrap();
        assert!(out.status.success(), "pin_vmdk_cid {cid}: {out:?}");
    }
    let head = std::fs::read(&vmdk).unwrap()[..4096].to_vec();
    let descriptor = String::from_utf8_lossy(&head);
    assert!(
        descriptor.contains("\nCID=0123abcd\nparentCID=ffffffff\n"),
        "{descriptor}"
    );

    let ova = d.join("ferry.ova");
    let out = make_ova(&vmdk, &ova, "1700000000");
    assert!(out.status.success(), "make_ova: {out:?}");
    let archive = std::fs::read(&ova).unwrap();
    let members = ustar_members(&archive);
    let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        ["ferry.ovf", "ferry.mf", "ferry.vmdk"],
        "member order"
    );
    for m in &members {
        assert_eq!(
            (m.uid, m.gid, m.mode & 0o7777, m.mtime),
            (0, 0, 0o644, 1_700_000_000),
            "{}",
            m.name
        );
    }
    let (ovf, mf, disk) = (&members[0], &members[1], &members[2]);
    assert_eq!(
        disk.data,
        std::fs::read(&vmdk).unwrap(),
        "the VMDK inside is not the VMDK"
    );

    // The manifest: one line per other member, its SHA-256.
    let manifest = String::from_utf8(mf.data.clone()).unwrap();
    let lines: Vec<&str> = manifest.lines().collect();
    assert_eq!(
        lines,
        [
            format!("SHA256(ferry.ovf)= {}", sha256_hex(&ovf.data)),
            format!("SHA256(ferry.vmdk)= {}", sha256_hex(&disk.data)),
        ]
    );

    // The descriptor.
    let text = String::from_utf8(ovf.data.clone()).unwrap();
    let doc = roxmltree::Document::parse(&text).expect("ferry.ovf is not well-formed XML");
    let env = doc.root_element();
    assert!(env.has_tag_name((OVF, "Envelope")));
    // OVF 1.0: References, the sections, then the content.
    let top: Vec<&str> = env
        .children()
        .filter(|c| c.is_element())
        .map(|c| c.tag_name().name())
        .collect();
    assert_eq!(
        top,
        [
            "References",
            "DiskSection",
            "NetworkSection",
            "VirtualSystem"
        ]
    );
    let files: Vec<_> = child(env, "References")
        .children()
        .filter(|c| c.is_element())
        .collect();
    assert_eq!(files.len(), 1);
    assert_eq!(attr(files[0], "href").as_deref(), Some("ferry.vmdk"));
    assert_eq!(
        attr(files[0], "size"),
        Some(disk.data.len().to_string()),
        "File ovf:size"
    );
    let file_id = attr(files[0], "id").unwrap();

    let info = qemu_img_info(&vmdk);
    let disks: Vec<_> = child(env, "DiskSection")
        .children()
        .filter(|c| c.has_tag_name((OVF, "Disk")))
        .collect();
    assert_eq!(disks.len(), 2);
    let system = disks[0];
    assert_eq!(attr(system, "fileRef"), Some(file_id));
    assert_eq!(
        attr(system, "capacity"),
        Some(info["virtual-size"].to_string())
    );
    assert_eq!(info["virtual-size"], 24 << 20);
    assert_eq!(
        attr(system, "capacityAllocationUnits").as_deref(),
        Some("byte")
    );
    assert_eq!(
        attr(system, "format").as_deref(),
        Some("http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized")
    );
    let cache = disks[1];
    assert_eq!(
        attr(cache, "fileRef"),
        None,
        "the cache disk is created empty, from no file"
    );
    assert_eq!(attr(cache, "capacity").as_deref(), Some("128"));
    assert_eq!(
        attr(cache, "capacityAllocationUnits").as_deref(),
        Some("byte * 2^30")
    );

    let vs = child(env, "VirtualSystem");
    let product = child(vs, "ProductSection");
    assert_eq!(child(product, "Version").text(), Some("1.2.3~rc1"));
    assert_eq!(
        child(product, "FullVersion").text(),
        Some("1.2.3~rc1 (g1234567) <&>")
    );
    let hw = child(vs, "VirtualHardwareSection");
    let items: Vec<_> = hw
        .children()
        .filter(|c| c.has_tag_name((OVF, "Item")))
        .collect();
    for item in &items {
        // The CIM schema's sequence is alphabetical: VMware's importer checks it.
        let order: Vec<&str> = item
            .children()
            .filter(|c| c.is_element())
            .map(|c| c.tag_name().name())
            .collect();
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(order, sorted, "RASD elements out of schema order");
    }
    let of_type = |t: &str| {
        items
            .iter()
            .copied()
            .filter(|i| rasd(*i, "ResourceType").as_deref() == Some(t))
            .collect::<Vec<_>>()
    };
    let cpu = of_type("3");
    assert_eq!(rasd(cpu[0], "VirtualQuantity").as_deref(), Some("2"));
    let mem = of_type("4");
    assert_eq!(rasd(mem[0], "VirtualQuantity").as_deref(), Some("8192"));
    assert_eq!(
        rasd(mem[0], "AllocationUnits").as_deref(),
        Some("byte * 2^20")
    );
    let controllers = of_type("6");
    assert_eq!(controllers.len(), 2);
    let hard_disks = of_type("17");
    assert_eq!(hard_disks.len(), 2);
    for (hd, disk_id) in hard_disks.iter().zip(["system", "cache"]) {
        assert_eq!(
            rasd(*hd, "HostResource"),
            Some(format!("ovf:/disk/{disk_id}"))
        );
        let parent = rasd(*hd, "Parent").unwrap();
        assert!(
            controllers
                .iter()
                .any(|c| rasd(*c, "InstanceID") == Some(parent.clone())
                    && rasd(*c, "ResourceSubType").as_deref() == Some("VirtualSCSI")),
            "disk {disk_id} is not on a PVSCSI controller"
        );
    }
    assert_ne!(
        rasd(hard_disks[0], "Parent"),
        rasd(hard_disks[1], "Parent"),
        "the cache disk has its own controller"
    );
    let nics = of_type("10");
    assert_eq!(nics.len(), 1);
    assert_eq!(rasd(nics[0], "ResourceSubType").as_deref(), Some("VmxNet3"));
    assert_eq!(rasd(nics[0], "Connection").as_deref(), Some("VM Network"));
    let firmware = hw
        .children()
        .find(|c| c.has_tag_name((VMW, "Config")) && c.attribute((VMW, "key")) == Some("firmware"))
        .expect("no vmw:Config firmware");
    assert_eq!(firmware.attribute((VMW, "value")), Some("efi"));
    let mut ids: Vec<String> = items
        .iter()
        .map(|i| rasd(*i, "InstanceID").unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), items.len(), "InstanceIDs are not unique");

    // The VMDK inside, as a hypervisor reads it: streamOptimized, the disk's bytes.
    let inside = d.join("inside.vmdk");
    std::fs::write(&inside, &disk.data).unwrap();
    let info = qemu_img_info(&inside);
    assert_eq!(info["format"], "vmdk");
    assert_eq!(
        info["format-specific"]["data"]["create-type"],
        "streamOptimized"
    );
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "vmdk"])
        .arg(&raw)
        .arg(&inside)
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "the VMDK inside does not hold the disk: {cmp:?}"
    );

    // Reproducible: another build, the VMDK's own time changed, gives the same bytes.
    let st = Command::new("touch")
        .args(["-d", "2001-01-01"])
        .arg(&vmdk)
        .status()
        .unwrap();
    assert!(st.success());
    let again = d.join("again.ova");
    assert!(make_ova(&vmdk, &again, "1700000000").status.success());
    assert!(
        std::fs::read(&again).unwrap() == archive,
        "two builds of the OVA differ"
    );

    // Not a streamOptimized VMDK: refused, no OVA left behind.
    let bad = d.join("bad.ova");
    let out = make_ova(&raw, &bad, "1700000000");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is raw (-), not a streamOptimized VMDK"),
        "{out:?}"
    );
    assert!(!bad.exists());
}
