//! Hardware profiles end to end: `ferry hw probe` on recorded machines (tests/fixtures/hardware)
//! and on this machine; `ferry hw tune` on a copy of a recorded machine (apply, then revert to
//! the exact bytes) and on veth interfaces inside a network namespace this test creates (and
//! always deletes); `ferry bench` and `ferry plan` with short stages.

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferry"))
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/hardware")
        .join(name)
}

fn ok(out: Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn ferry(args: &[&str]) -> String {
    ok(
        Command::new(exe()).args(args).output().unwrap(),
        &args.join(" "),
    )
}

fn probe_json(root: &Path) -> Value {
    let out = ferry(&["hw", "probe", "--json", "--root", root.to_str().unwrap()]);
    serde_json::from_str(&out).unwrap()
}

fn find<'a>(v: &'a Value, list: &str, name: &str) -> &'a Value {
    v["report"][list]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == name)
        .unwrap_or_else(|| panic!("no {list} entry {name} in {v:#}"))
}

fn changes(v: &Value) -> Vec<String> {
    v["plan"]["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            format!(
                "{}: {} -> {}",
                c["what"].as_str().unwrap(),
                c["before"],
                c["after"]
            )
        })
        .collect()
}

#[test]
fn probe_bare_metal_with_intel_and_mellanox_nics_and_nvme() {
    let v = probe_json(&fixture("baremetal-intel-mlx5-nvme"));
    let r = &v["report"];
    assert_eq!(r["hypervisor"]["name"], "bare-metal");
    assert_eq!(r["cpu"]["cpus"], 8);
    for f in ["aes", "vaes", "sha_ni", "avx2", "avx512f"] {
        assert_eq!(r["cpu"][f], true, "{f}");
    }
    let eno1 = find(&v, "nics", "eno1");
    assert_eq!(eno1["driver"], "ixgbe");
    assert_eq!(eno1["profile"], "intel-ixgbe");
    assert_eq!(eno1["speed_mbps"], 10000);
    assert_eq!(eno1["numa_node"], 0);
    assert_eq!(eno1["rx_queues"], 4);
    assert_eq!(eno1["ring"]["rx_max"], 4096);
    assert_eq!(eno1["irqs"], serde_json::json!([40, 41, 42, 43]));
    let mlx = find(&v, "nics", "ens1f0np0");
    assert_eq!(mlx["driver"], "mlx5_core");
    assert_eq!(mlx["speed_mbps"], 25000);
    assert_eq!(mlx["numa_node"], 1);
    assert_eq!(mlx["offloads"]["tso"], false);
    let nvme = find(&v, "disks", "nvme0n1");
    assert_eq!(nvme["driver"], "nvme");
    assert_eq!(nvme["nvme"], true);
    assert_eq!(nvme["scheduler"], "mq-deadline");
    assert_eq!(nvme["trim"], true);
    assert_eq!(nvme["rotational"], false);
    assert_eq!(nvme["write_cache"], "write through");
    assert_eq!(nvme["direct_io"], true);
    assert_eq!(nvme["identity"], "wwid eui.0025385b21b0c5a1");
    let c = changes(&v);
    for want in [
        "eno1 ring rx: \"512\" -> \"4096\"",
        "eno1 offload gro: \"0\" -> \"1\"",
        "ens1f0np0 ring rx: \"1024\" -> \"8192\"",
        "ens1f0np0 channels combined: \"2\" -> \"4\"",
        "ens1f0np0 offload tso: \"0\" -> \"1\"",
        // Interrupts spread over each NIC's own NUMA node.
        "eno1 irq 43: \"0-7\" -> \"3\"",
        "ens1f0np0 irq 60: \"0-7\" -> \"4\"",
        "nvme0n1 scheduler: \"mq-deadline\" -> \"none\"",
        "nvme0n1 nr_requests: \"255\" -> \"1023\"",
        "sysctl net.ipv4.tcp_congestion_control: \"cubic\" -> \"bbr\"",
    ] {
        assert!(c.iter().any(|x| x == want), "missing {want} in {c:#?}");
    }
    // Never lo, and no MTU change without --mtu.
    assert!(
        !c.iter().any(|x| x.starts_with("lo ") || x.contains(" mtu")),
        "{c:#?}"
    );
}

#[test]
fn probe_esxi_vm_with_vmxnet3() {
    let v = probe_json(&fixture("esxi-vmxnet3"));
    assert_eq!(v["report"]["hypervisor"]["name"], "vmware");
    let n = find(&v, "nics", "ens192");
    assert_eq!(n["driver"], "vmxnet3");
    assert_eq!(n["profile"], "vmxnet3");
    let d = find(&v, "disks", "sda");
    assert_eq!(d["vendor"], "VMware");
    assert_eq!(d["profile"], "vmware-virtual-disk");
    assert_eq!(d["nvme"], false);
    let c = changes(&v);
    assert!(
        c.contains(&"ens192 ring tx: \"512\" -> \"4096\"".to_string()),
        "{c:#?}"
    );
    // vCPUs float: no interrupt pinning on ESXi.
    assert!(!c.iter().any(|x| x.contains(" irq ")), "{c:#?}");
}

#[test]
fn probe_kvm_guest_with_virtio() {
    let v = probe_json(&fixture("kvm-virtio"));
    assert_eq!(v["report"]["hypervisor"]["name"], "kvm");
    assert_eq!(v["report"]["cpu"]["vaes"], false);
    assert_eq!(find(&v, "nics", "eth0")["driver"], "virtio_net");
    assert_eq!(find(&v, "nics", "eth0")["speed_mbps"], Value::Null);
    let d = find(&v, "disks", "vda");
    assert_eq!(d["driver"], "virtio_blk");
    assert_eq!(d["rotational"], true);
    let c = changes(&v);
    assert!(
        c.contains(&"eth0 channels combined: \"1\" -> \"2\"".to_string()),
        "{c:#?}"
    );
    assert!(
        c.contains(&"vda scheduler: \"mq-deadline\" -> \"none\"".to_string()),
        "{c:#?}"
    );
}

#[test]
fn unknown_hardware_gets_conservative_defaults_and_a_clear_report() {
    let root = fixture("unknown-hardware");
    let v = probe_json(&root);
    let r = &v["report"];
    assert_eq!(r["cpu"]["aes"], false);
    // A DMI maker no profile names, no hypervisor flag: not taken for a known server.
    assert_eq!(r["hypervisor"]["name"], "bare-metal-unverified");
    assert_eq!(find(&v, "nics", "enp3s0")["profile_matched"], false);
    assert_eq!(find(&v, "nics", "enp4s0")["driver"], Value::Null);
    let notes: Vec<&str> = r["notes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    for want in [
        "no AES-NI",
        "enp3s0: no profile for driver frob_eth: conservative defaults",
        "enp4s0: driver unknown: never tuned",
        "fzd0: no profile for driver frobstor",
        "fzd1: disk not identified: never tuned",
        "platform not verified",
    ] {
        assert!(
            notes.iter().any(|n| n.contains(want)),
            "no note {want:?} in {notes:#?}"
        );
    }
    // Only the hardware-independent TCP settings would change.
    let c = changes(&v);
    assert!(!c.is_empty());
    assert!(c.iter().all(|x| x.starts_with("sysctl ")), "{c:#?}");
    // The text report works too, and tuning a copy changes no device it cannot place.
    let text = ferry(&["hw", "probe", "--root", root.to_str().unwrap()]);
    assert!(text.contains("default (no match)"), "{text}");
    let tmp = copy_tree(&root);
    let before = snapshot(tmp.path());
    let state = tmp.path().join("state.json");
    let out = ferry(&[
        "hw",
        "tune",
        "--root",
        tmp.path().to_str().unwrap(),
        "--state-file",
        state.to_str().unwrap(),
        "--mtu",
        "9000",
        "--disk",
        "fzd0",
        "--disk",
        "fzd1",
        "--disk",
        "nosuch",
    ]);
    assert!(
        out.contains("skipped: enp3s0: no profile for driver frob_eth"),
        "{out}"
    );
    assert!(out.contains("skipped: enp4s0: cannot identify"), "{out}");
    assert!(
        out.contains("skipped: fzd1: cannot identify the disk"),
        "{out}"
    );
    assert!(out.contains("skipped: nosuch: no such disk"), "{out}");
    let after = snapshot(tmp.path());
    let changed: Vec<&String> = after
        .keys()
        .filter(|k| before.get(*k) != after.get(*k))
        .collect();
    assert!(
        changed
            .iter()
            .all(|k| k.starts_with("proc/sys/net/") || k.as_str() == "state.json"),
        "{changed:?}"
    );
}

#[test]
fn probe_this_machine() {
    let v = probe_json(Path::new("/"));
    let r = &v["report"];
    assert_eq!(r["live"], true);
    assert_eq!(r["cpu"]["source"], "cpuid");
    assert!(r["cpu"]["cpus"].as_u64().unwrap() >= 1);
    assert!(r["hypervisor"]["name"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    // What sysfs shows, the probe shows.
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let probed: Vec<String> = r["nics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(probed, names);
    for n in r["nics"].as_array().unwrap() {
        let mtu: u64 = std::fs::read_to_string(format!(
            "/sys/class/net/{}/mtu",
            n["name"].as_str().unwrap()
        ))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
        assert_eq!(n["mtu"], mtu);
    }
    let text = ferry(&["hw", "probe"]);
    assert!(
        text.contains("AES-NI") && text.contains("PLATFORM"),
        "{text}"
    );
}

/// A copy of a fixture tree (symlinks kept) in a fresh temporary directory.
fn copy_tree(src: &Path) -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("ferry-hw-")
        .tempdir()
        .unwrap();
    let st = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", src.display()))
        .arg(d.path())
        .status()
        .unwrap();
    assert!(st.success());
    d
}

/// Every regular file's bytes (JSON files by value: the recorded ethtool files are rewritten)
/// and every symlink's target, by relative path.
fn snapshot(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let md = std::fs::symlink_metadata(&p).unwrap();
            if md.file_type().is_symlink() {
                out.insert(
                    rel,
                    format!("-> {}", std::fs::read_link(&p).unwrap().display()),
                );
            } else if md.is_dir() {
                walk(root, &p, out);
            } else {
                let b = std::fs::read(&p).unwrap();
                let text = if rel.ends_with(".json") {
                    serde_json::from_slice::<Value>(&b).unwrap().to_string()
                } else {
                    String::from_utf8_lossy(&b).into_owned()
                };
                out.insert(rel, text);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

#[test]
fn tune_a_recorded_machine_then_revert_to_the_exact_bytes() {
    let tmp = copy_tree(&fixture("baremetal-intel-mlx5-nvme"));
    let root = tmp.path().to_str().unwrap().to_string();
    let state_dir = tempfile::tempdir().unwrap();
    let state = state_dir.path().join("hw-tune.json");
    let state_s = state.to_str().unwrap();
    let original = snapshot(tmp.path());
    let args = [
        "hw",
        "tune",
        "--root",
        &root,
        "--state-file",
        state_s,
        "--disk",
        "nvme0n1",
        "--mtu",
        "9000",
    ];

    let dry = ferry(&[&args[..], &["--dry-run"]].concat());
    assert!(
        dry.contains("would change: eno1 mtu: 1500 -> 9000"),
        "{dry}"
    );
    assert_eq!(
        snapshot(tmp.path()),
        original,
        "--dry-run changed something"
    );
    assert!(!state.exists());

    let out = ferry(&args);
    assert!(out.contains("changed: eno1 mtu: 1500 -> 9000"), "{out}");
    assert_scheduler_first(&out, "changed");
    let read = |p: &str| std::fs::read_to_string(tmp.path().join(p)).unwrap();
    assert_eq!(read("sys/class/net/eno1/mtu"), "9000\n");
    assert_eq!(read("sys/class/net/ens1f0np0/mtu"), "9000\n");
    assert_eq!(
        read("sys/block/nvme0n1/queue/scheduler"),
        "[none] mq-deadline kyber bfq \n"
    );
    assert_eq!(read("sys/block/nvme0n1/queue/nr_requests"), "1023\n");
    assert_eq!(read("proc/irq/61/smp_affinity_list"), "5\n");
    assert_eq!(read("proc/sys/net/ipv4/tcp_congestion_control"), "bbr\n");
    let v = probe_json(tmp.path());
    assert_eq!(find(&v, "nics", "eno1")["ring"]["rx"], 4096);
    assert_eq!(find(&v, "nics", "ens1f0np0")["offloads"]["tso"], true);
    // Tuned: a second run finds nothing left to do.
    assert!(ferry(&[&args[..], &["--dry-run"]].concat()).contains("nothing to change"));
    let recorded: Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert!(
        recorded["changes"].as_array().unwrap().len() >= 20,
        "{recorded:#}"
    );

    let out = ferry(&[
        "hw",
        "tune",
        "--root",
        &root,
        "--state-file",
        state_s,
        "--revert",
    ]);
    assert!(out.contains("reverted: eno1 mtu: 9000 -> 1500"), "{out}");
    // The recorded tree resets nr_requests on a scheduler switch, as the kernel does: only
    // this order gets the original bytes back.
    assert_scheduler_first(&out, "reverted");
    assert_eq!(
        snapshot(tmp.path()),
        original,
        "--revert did not restore every byte"
    );
    assert!(!state.exists(), "state file kept after a full revert");
    // Reverting again is harmless.
    assert!(ferry(&[
        "hw",
        "tune",
        "--root",
        &root,
        "--state-file",
        state_s,
        "--revert"
    ])
    .contains("nothing reverted"));
}

/// The disk's scheduler was written before its nr_requests (a scheduler switch resets it).
fn assert_scheduler_first(out: &str, verb: &str) {
    let at = |what: &str| {
        out.lines()
            .position(|l| l.starts_with(&format!("{verb}: nvme0n1 {what}:")))
            .unwrap_or_else(|| panic!("no {verb} line for nvme0n1 {what} in {out}"))
    };
    assert!(at("scheduler") < at("nr_requests"), "{out}");
}

#[test]
fn a_surface_like_machine_is_not_hyper_v_and_gets_no_interrupt_pinning() {
    let tmp = copy_tree(&fixture("baremetal-intel-mlx5-nvme"));
    let dmi = tmp.path().join("sys/class/dmi/id");
    std::fs::write(dmi.join("sys_vendor"), "Microsoft Corporation\n").unwrap();
    std::fs::write(dmi.join("product_name"), "Surface Laptop Studio\n").unwrap();
    let v = probe_json(tmp.path());
    assert_eq!(v["report"]["hypervisor"]["name"], "bare-metal-unverified");
    let c = changes(&v);
    assert!(!c.iter().any(|x| x.contains(" irq ")), "{c:#?}");
    // The NICs' own profiles still apply (rings), only the platform-dependent pinning is off.
    assert!(c.iter().any(|x| x.starts_with("eno1 ring rx")), "{c:#?}");
    let skipped = v["plan"]["skipped"].to_string();
    assert!(
        skipped.contains("not pinned on bare-metal-unverified"),
        "{skipped}"
    );
}

#[test]
fn revert_keeps_what_it_cannot_place_and_sets_aside_another_boots_record() {
    let tmp = copy_tree(&fixture("baremetal-intel-mlx5-nvme"));
    let root = tmp.path().to_str().unwrap().to_string();
    let boot_id = tmp.path().join("proc/sys/kernel/random/boot_id");
    std::fs::create_dir_all(boot_id.parent().unwrap()).unwrap();
    std::fs::write(&boot_id, "3d7c6a52-0c1e-4a8e-9f65-0a4c1b2d3e4f\n").unwrap();
    let state_dir = tempfile::tempdir().unwrap();
    let state = state_dir.path().join("hw-tune.json");
    let state_s = state.to_str().unwrap();
    let tune = |extra: &[&str]| {
        let base = [
            "hw",
            "tune",
            "--root",
            &root,
            "--state-file",
            state_s,
            "--disk",
            "nvme0n1",
        ];
        ferry(&[&base[..], extra].concat())
    };
    let nr =
        || std::fs::read_to_string(tmp.path().join("sys/block/nvme0n1/queue/nr_requests")).unwrap();
    let wwid = tmp.path().join("sys/block/nvme0n1/wwid");

    // Another disk took the name: its changes are not reverted, and stay recorded.
    tune(&[]);
    assert_eq!(nr(), "1023\n");
    std::fs::write(&wwid, "eui.00000000000000ff\n").unwrap();
    let out = tune(&["--revert"]);
    assert!(
        out.contains("failed: nvme0n1 scheduler: nvme0n1 is now another disk"),
        "{out}"
    );
    assert!(
        out.contains(&format!("kept in {state_s}: 2 change(s)")),
        "{out}"
    );
    assert!(out.contains("reverted: eno1 ring rx: 4096 -> 512"), "{out}");
    assert_eq!(nr(), "1023\n");
    let left: Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(left["changes"].as_array().unwrap().len(), 2, "{left:#}");
    std::fs::write(&wwid, "eui.0025385b21b0c5a1\n").unwrap();
    let out = tune(&["--revert"]);
    assert!(
        out.contains("reverted: nvme0n1 nr_requests: 1023 -> 255"),
        "{out}"
    );
    assert!(!state.exists(), "{out}");

    // A record from before a crash and reboot describes nothing now: set aside, not reverted.
    tune(&[]);
    std::fs::write(&boot_id, "8e1f0b9a-7d6c-4b5a-8e2f-1c3d5e7f9a0b\n").unwrap();
    let out = tune(&["--revert"]);
    assert!(
        out.contains(&format!("set aside: {state_s} is from another boot")),
        "{out}"
    );
    assert!(out.contains("nothing reverted"), "{out}");
    assert_eq!(nr(), "1023\n", "a stale record was reverted");
    assert!(!state.exists());
    assert!(state_dir.path().join("hw-tune.json.previous-boot").exists());
}

/// A network namespace this test created; deleted however the test ends.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(args: &[&str]) -> String {
    ok(
        Command::new("ip").args(args).output().unwrap(),
        &format!("ip {}", args.join(" ")),
    )
}

fn in_ns(ns: &str, args: &[&str]) -> String {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(exe()).args(args);
    ok(
        c.output().unwrap(),
        &format!("(in {ns}) ferry {}", args.join(" ")),
    )
}

fn ns_cat(ns: &str, path: &str) -> String {
    ip(&["netns", "exec", ns, "cat", path]).trim().to_string()
}

fn mtu(ns: &str, dev: &str) -> u32 {
    let out = ip(&["-n", ns, "-o", "link", "show", dev]);
    let i = out.find(" mtu ").expect("mtu in ip link output");
    out[i + 5..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn ns_nic(ns: &str, dev: &str) -> Value {
    let v: Value = serde_json::from_str(&in_ns(ns, &["hw", "probe", "--json"])).unwrap();
    find(&v, "nics", dev).clone()
}

#[test]
fn tune_veth_in_a_namespace_then_revert() {
    let ns = Netns(format!("ferry-hw-test-{}", std::process::id()));
    let _ = Command::new("ip").args(["netns", "del", &ns.0]).output();
    ip(&["netns", "add", &ns.0]);
    ip(&[
        "-n", &ns.0, "link", "add", "fhw0", "type", "veth", "peer", "name", "fhw1",
    ]);
    ip(&["-n", &ns.0, "link", "set", "fhw0", "up"]);
    ip(&["-n", &ns.0, "link", "set", "fhw1", "up"]);
    let host_rmem = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_rmem").unwrap();
    let rmem0 = ns_cat(&ns.0, "/proc/sys/net/ipv4/tcp_rmem");
    let before = ns_nic(&ns.0, "fhw0");
    assert_eq!(before["driver"], "veth");
    assert_eq!(before["physical"], false);
    assert_eq!(mtu(&ns.0, "fhw0"), 1500);

    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let state_s = state.to_str().unwrap();
    let args = [
        "hw",
        "tune",
        "--state-file",
        state_s,
        "--interface",
        "fhw0",
        "--mtu",
        "9000",
        "--wan-mbps",
        "10000",
        "--wan-rtt-ms",
        "100",
    ];
    // No --interface: a veth is not a physical NIC, so nothing on it is touched.
    let out = in_ns(
        &ns.0,
        &[
            "hw",
            "tune",
            "--dry-run",
            "--no-tcp",
            "--state-file",
            state_s,
        ],
    );
    assert!(out.contains("nothing to change"), "{out}");

    let out = in_ns(&ns.0, &[&args[..], &["--dry-run"]].concat());
    assert!(
        out.contains("would change: fhw0 mtu: 1500 -> 9000"),
        "{out}"
    );
    assert!(
        out.contains("would change: sysctl net.ipv4.tcp_rmem"),
        "{out}"
    );
    assert!(out.contains("skipped: fhw0 ring: not changed"), "{out}");
    assert_eq!(mtu(&ns.0, "fhw0"), 1500);
    assert_eq!(ns_cat(&ns.0, "/proc/sys/net/ipv4/tcp_rmem"), rmem0);
    assert_eq!(ns_nic(&ns.0, "fhw0")["offloads"], before["offloads"]);
    assert!(!state.exists(), "--dry-run wrote a state file");

    let out = in_ns(&ns.0, &args);
    assert!(out.contains("changed: fhw0 mtu: 1500 -> 9000"), "{out}");
    assert_eq!(mtu(&ns.0, "fhw0"), 9000);
    assert_eq!(mtu(&ns.0, "fhw1"), 1500, "the peer was not named");
    let tuned = ns_nic(&ns.0, "fhw0");
    assert_eq!(tuned["offloads"]["gro"], true, "{tuned:#}");
    if before["offloads"]["gro"] == false {
        assert!(out.contains("changed: fhw0 offload gro: 0 -> 1"), "{out}");
    }
    // 2 x BDP of 10 Gbit/s x 100 ms = 250 MB.
    let rmem = ns_cat(&ns.0, "/proc/sys/net/ipv4/tcp_rmem");
    assert!(rmem.ends_with("250000000"), "{rmem}");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_rmem").unwrap(),
        host_rmem,
        "host touched"
    );
    assert!(state.exists());

    let out = in_ns(&ns.0, &["hw", "tune", "--revert", "--state-file", state_s]);
    assert!(out.contains("reverted: fhw0 mtu: 9000 -> 1500"), "{out}");
    assert_eq!(mtu(&ns.0, "fhw0"), 1500);
    assert_eq!(ns_cat(&ns.0, "/proc/sys/net/ipv4/tcp_rmem"), rmem0);
    let after = ns_nic(&ns.0, "fhw0");
    assert_eq!(after["offloads"], before["offloads"]);
    assert_eq!(after["channels"], before["channels"]);
    assert!(!state.exists());
}

#[test]
fn bench_and_plan_print_figures_and_sizing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let figs = dir.path().join("bench.json");
    let out = ferry(&[
        "bench",
        "--dir",
        d,
        "--seconds",
        "0.05",
        "--cache-mib",
        "8",
        "--out",
        figs.to_str().unwrap(),
    ]);
    assert!(out.contains("reduction pipeline, one core"), "{out}");
    assert!(
        out.contains("reduction pipeline with lz4, one core"),
        "{out}"
    );
    let f: Value = serde_json::from_slice(&std::fs::read(&figs).unwrap()).unwrap();
    assert!(f["pipeline_mbps_one_core"].as_f64().unwrap() > 1.0);
    assert!(f["cache_write_mbps"].as_f64().unwrap() > 1.0);
    let out = ferry(&[
        "plan",
        "--bench",
        figs.to_str().unwrap(),
        "--wan-mbps",
        "100",
        "--rate",
        "5",
        "--rate",
        "50",
    ]);
    assert!(
        out.contains("protected disks") && out.contains("churn per day"),
        "{out}"
    );
    let v: Value = serde_json::from_str(&ferry(&[
        "plan",
        "--bench",
        figs.to_str().unwrap(),
        "--wan-mbps",
        "100",
        "--rate",
        "5",
        "--rate",
        "50",
        "--json",
    ]))
    .unwrap();
    let s = &v["sizing"];
    // 100 Mbit/s carries at most 11.25 MB/s of reduced data.
    assert_eq!(s["bottleneck"], "WAN bandwidth");
    let rpo5 = s["rpo"][0]["rpo_s"].as_f64().unwrap();
    assert!(rpo5 > 1.0 && rpo5 < 3.0, "{s:#}");
    assert!(s["protected_disks"].as_u64().is_some());
    // Sized for LZ4: its own measured pipeline rate and reduction ratio (LZ4 keeps more bytes
    // of the mixed data than zstd does).
    let lz4 = &f["lz4"];
    assert!(
        lz4["pipeline_mbps_one_core"].as_f64().unwrap() > 1.0,
        "{f:#}"
    );
    let (zr, lr) = (
        f["reduction_ratio"].as_f64().unwrap(),
        lz4["reduction_ratio"].as_f64().unwrap(),
    );
    assert!(lr > zr && lr < 1.0, "lz4 {lr} vs zstd {zr}");
    let v: Value = serde_json::from_str(&ferry(&[
        "plan",
        "--bench",
        figs.to_str().unwrap(),
        "--wan-mbps",
        "0",
        "--compression",
        "lz4",
        "--json",
    ]))
    .unwrap();
    assert_eq!(v["sizing"]["reduction_ratio"].as_f64().unwrap(), lr);
    let want = lz4["pipeline_mbps_all_cores"].as_f64().unwrap() * 0.7;
    let got = v["sizing"]["reduce_capacity_mbs"].as_f64().unwrap();
    assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    // Figures saved before LZ4 was measured are refused for it, with the reason.
    let mut old = f.clone();
    old.as_object_mut().unwrap().remove("lz4");
    let old_path = dir.path().join("old.json");
    std::fs::write(&old_path, old.to_string()).unwrap();
    let refused = Command::new(exe())
        .args([
            "plan",
            "--bench",
            old_path.to_str().unwrap(),
            "--compression",
            "lz4",
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let e = String::from_utf8_lossy(&refused.stderr);
    assert!(
        e.contains("no LZ4 measurement") && e.contains("ferry bench"),
        "{e}"
    );
    // Bad input is an error, not a panic.
    let bad = Command::new(exe())
        .args(["plan", "--bench", "/nonexistent/x.json"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

/// Two namespaces joined by a veth pair, and the `ferry bench --serve` responder in one of them;
/// the responder is killed and both namespaces deleted however the test ends.
struct WanLab {
    server: Option<std::process::Child>,
    _a: Netns,
    _b: Netns,
}

impl Drop for WanLab {
    fn drop(&mut self) {
        if let Some(mut c) = self.server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn ns_run(ns: &str, args: &[&str]) -> String {
    let mut all = vec!["netns", "exec", ns];
    all.extend_from_slice(args);
    ip(&all)
}

#[test]
fn bench_measures_a_shaped_wan_link_and_plan_sizes_from_it() {
    use std::io::BufRead;
    let started = std::time::Instant::now();
    let pid = std::process::id();
    let (a, b) = (format!("ferry-wan-a-{pid}"), format!("ferry-wan-b-{pid}"));
    // The guard deletes both namespaces (and kills the responder) however the test ends.
    let mut lab = WanLab {
        server: None,
        _a: Netns(a.clone()),
        _b: Netns(b.clone()),
    };
    for n in [&a, &b] {
        let _ = Command::new("ip").args(["netns", "del", n]).output();
        ip(&["netns", "add", n]);
    }
    ip(&[
        "-n", &a, "link", "add", "fwan0", "type", "veth", "peer", "name", "fwan1", "netns", &b,
    ]);
    ip(&["-n", &a, "addr", "add", "10.77.0.1/30", "dev", "fwan0"]);
    ip(&["-n", &b, "addr", "add", "10.77.0.2/30", "dev", "fwan1"]);
    for (ns, dev) in [(&a, "fwan0"), (&b, "fwan1"), (&a, "lo"), (&b, "lo")] {
        ip(&["-n", ns, "link", "set", dev, "up"]);
    }
    // 50 Mbit/s upstream (A -> B); the way back is unshaped.
    ns_run(
        &a,
        &[
            "tc", "qdisc", "add", "dev", "fwan0", "root", "tbf", "rate", "50mbit", "burst",
            "32kbit", "latency", "400ms",
        ],
    );
    let mut server = Command::new("ip")
        .args(["netns", "exec", &b])
        .arg(exe())
        .args(["bench", "--serve", "10.77.0.2:7447", "--serve-secs", "25"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = server.stdout.take().unwrap();
    lab.server = Some(server);
    let mut lines = std::io::BufReader::new(stdout).lines();
    let first = lines.next().expect("responder output").unwrap();
    assert!(
        first.contains("serving WAN measurements on 10.77.0.2:7447"),
        "{first}"
    );

    let dir = tempfile::tempdir().unwrap();
    let figs = dir.path().join("bench.json");
    let out = in_ns(
        &a,
        &[
            "bench",
            "--peer",
            "10.77.0.2:7447",
            "--wan-secs",
            "3",
            "--dir",
            dir.path().to_str().unwrap(),
            "--seconds",
            "0.05",
            "--cache-mib",
            "8",
            "--out",
            figs.to_str().unwrap(),
            "--json",
        ],
    );
    let f: Value = serde_json::from_str(&out).unwrap();
    let w = &f["wan"];
    let mbps = w["upstream_mbps"].as_f64().unwrap();
    let (p50, p99) = (
        w["rtt_p50_ms"].as_f64().unwrap(),
        w["rtt_p99_ms"].as_f64().unwrap(),
    );
    eprintln!(
        "WAN to 10.77.0.2 through tbf 50mbit: {mbps:.2} Mbit/s, RTT p50 {p50:.3} ms, p99 {p99:.3} ms, BDP {} bytes, {} bytes in {:.2} s",
        w["bdp_bytes"], w["upstream_bytes"], w["upstream_secs"].as_f64().unwrap()
    );
    assert!((40.0..=60.0).contains(&mbps), "{w:#}");
    assert!(p50 > 0.0 && p50 <= p99, "{w:#}");
    assert_eq!(w["pings"], 50);
    assert!(w["upstream_secs"].as_f64().unwrap() >= 3.0, "{w:#}");
    assert!(w["bdp_bytes"].as_u64().unwrap() > 0, "{w:#}");
    let written: Value = serde_json::from_slice(&std::fs::read(&figs).unwrap()).unwrap();
    assert_eq!(written["wan"], *w);

    // The responder served that one client and says so.
    let served = lines.next().expect("session line").unwrap();
    assert!(served.contains("51 pings"), "{served}");

    // Sizing from the file: the measured link, not the 1000 Mbit/s default, bounds a high churn.
    let v: Value = serde_json::from_str(&ferry(&[
        "plan",
        "--bench",
        figs.to_str().unwrap(),
        "--disk-churn-gb",
        "500",
        "--rate",
        "100",
        "--json",
    ]))
    .unwrap();
    let s = &v["sizing"];
    assert_eq!(s["bottleneck"], "WAN bandwidth", "{s:#}");
    let inputs: BTreeMap<String, String> =
        serde_json::from_value::<Vec<(String, String)>>(s["inputs"].clone())
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(inputs["wan_mbps_from"], "measured", "{inputs:?}");
    assert_eq!(inputs["wan_mbps"].parse::<f64>().unwrap(), mbps);
    assert_eq!(inputs["rtt_ms"].parse::<f64>().unwrap(), p50);
    // 50 Mbit/s carries about 5.6 MB/s of reduced data: far below what 500 GB/day disks need.
    assert!(s["wan_capacity_mbs"].as_f64().unwrap() < 20.0, "{s:#}");
    assert_eq!(s["protected_disks"], 0, "{s:#}");
    assert!(s["rpo"][0]["rpo_s"].is_null(), "{s:#}");
    let text = ferry(&[
        "plan",
        "--bench",
        figs.to_str().unwrap(),
        "--disk-churn-gb",
        "500",
    ]);
    assert!(
        text.contains("WAN upstream TCP throughput") && text.contains("(measured)"),
        "{text}"
    );
    assert!(text.contains("bound: WAN bandwidth"), "{text}");
    // A flag still overrides the measurement.
    let v: Value = serde_json::from_str(&ferry(&[
        "plan",
        "--bench",
        figs.to_str().unwrap(),
        "--wan-mbps",
        "0",
        "--json",
    ]))
    .unwrap();
    assert_ne!(v["sizing"]["bottleneck"], "WAN bandwidth");
    drop(lab);
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
}
