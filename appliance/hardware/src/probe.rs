//! The probe: what this machine is (CPU features, NICs, block devices, hypervisor), read from
//! sysfs, procfs, DMI and ethtool under a root directory. Nothing here writes or fails: what
//! cannot be read is reported as unknown.

use crate::ethtool::{Channels, Ring, OFFLOADS};
use crate::host::{bracketed, parse_cpu_list, Host};
use crate::profile::Profiles;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cpu {
    pub model: String,
    /// Online logical CPUs.
    pub cpus: u32,
    pub aes: bool,
    pub vaes: bool,
    pub sha_ni: bool,
    pub avx2: bool,
    pub avx512f: bool,
    /// Whether the CPU says it runs under a hypervisor (the cpuinfo `hypervisor` flag).
    pub hypervisor_flag: bool,
    /// `cpuid` (live machine) or `cpuinfo` (recorded tree).
    pub source: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hypervisor {
    /// The profile name: bare-metal, kvm, vmware, hyper-v, xen, unknown.
    pub name: String,
    pub description: String,
    pub sys_vendor: Option<String>,
    pub product_name: Option<String>,
    /// How it was recognised.
    pub evidence: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Nic {
    pub name: String,
    pub ifindex: Option<u32>,
    pub driver: Option<String>,
    /// Backed by a device (PCI, virtio, vmbus) rather than a software interface (lo, veth, bridge).
    pub physical: bool,
    pub speed_mbps: Option<u64>,
    pub mtu: Option<u32>,
    pub operstate: Option<String>,
    pub rx_queues: u32,
    pub tx_queues: u32,
    pub numa_node: Option<u32>,
    pub ring: Option<Ring>,
    pub channels: Option<Channels>,
    pub offloads: BTreeMap<String, bool>,
    /// MSI/MSI-X interrupt numbers of the device.
    pub irqs: Vec<u32>,
    pub profile: String,
    pub profile_matched: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Disk {
    pub name: String,
    pub driver: Option<String>,
    pub vendor: Option<String>,
    pub model: Option<String>,
    pub nvme: bool,
    pub size_bytes: Option<u64>,
    pub rotational: Option<bool>,
    pub scheduler: Option<String>,
    pub schedulers: Vec<String>,
    pub nr_requests: Option<u32>,
    pub write_cache: Option<String>,
    pub discard_max_bytes: Option<u64>,
    pub trim: bool,
    pub logical_block_size: Option<u32>,
    /// What tells this disk from one that later takes its name ([`disk_identity`]).
    pub identity: Option<String>,
    pub profile: String,
    pub profile_matched: bool,
    /// The profile's advice: the cache on this disk should use O_DIRECT, aligned I/O.
    pub direct_io: bool,
}

/// Everything the probe found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub root: String,
    pub live: bool,
    pub cpu: Cpu,
    pub memory_bytes: Option<u64>,
    pub hypervisor: Hypervisor,
    pub nics: Vec<Nic>,
    pub disks: Vec<Disk>,
    /// Plain-language findings: unknown hardware, unsuitable drivers, advice.
    pub notes: Vec<String>,
}

/// Block devices that are never a cache disk (and never tuned).
const IGNORED_DISKS: [&str; 6] = ["loop", "ram", "zram", "sr", "fd", "nbd"];

pub fn probe(host: &Host, profiles: &Profiles) -> Report {
    let cpu = cpu(host);
    let nics: Vec<Nic> = host
        .list("sys/class/net")
        .into_iter()
        .map(|n| nic(host, profiles, &n))
        .collect();
    let disks: Vec<Disk> = host
        .list("sys/block")
        .into_iter()
        .filter(|d| !IGNORED_DISKS.iter().any(|p| d.starts_with(p)))
        .map(|d| disk(host, profiles, &d))
        .collect();
    let hypervisor = hypervisor(host, profiles, &cpu, &nics, &disks);
    let memory_bytes = host.read("proc/meminfo").and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    let mut notes = Vec::new();
    notes_for(profiles, &cpu, &hypervisor, &nics, &disks, &mut notes);
    Report {
        root: host.root.display().to_string(),
        live: host.live,
        cpu,
        memory_bytes,
        hypervisor,
        nics,
        disks,
        notes,
    }
}

fn cpu(host: &Host) -> Cpu {
    let info = host.read("proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim().to_string())
        })
    };
    let flags: Vec<String> = field("flags")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let has = |f: &str| flags.iter().any(|x| x == f);
    let processors = info.lines().filter(|l| l.starts_with("processor")).count() as u32;
    let online = host
        .read("sys/devices/system/cpu/online")
        .map(|s| parse_cpu_list(&s).len() as u32)
        .filter(|n| *n > 0);
    let mut c = Cpu {
        model: field("model name").unwrap_or_else(|| "unknown".into()),
        cpus: online.unwrap_or(processors.max(1)),
        aes: has("aes"),
        vaes: has("vaes"),
        sha_ni: has("sha_ni"),
        avx2: has("avx2"),
        avx512f: has("avx512f"),
        hypervisor_flag: has("hypervisor"),
        source: "cpuinfo".into(),
    };
    if host.live {
        live_cpuid(&mut c);
    }
    c
}

/// On the live machine, ask the CPU itself (what the process can use, not what the kernel says).
#[cfg(target_arch = "x86_64")]
fn live_cpuid(c: &mut Cpu) {
    c.aes = std::arch::is_x86_feature_detected!("aes");
    c.vaes = std::arch::is_x86_feature_detected!("vaes");
    c.sha_ni = std::arch::is_x86_feature_detected!("sha");
    c.avx2 = std::arch::is_x86_feature_detected!("avx2");
    c.avx512f = std::arch::is_x86_feature_detected!("avx512f");
    if let Ok(n) = std::thread::available_parallelism() {
        c.cpus = c.cpus.max(n.get() as u32);
    }
    c.source = "cpuid".into();
}

#[cfg(not(target_arch = "x86_64"))]
fn live_cpuid(_: &mut Cpu) {}

fn nic(host: &Host, profiles: &Profiles, name: &str) -> Nic {
    let base = format!("sys/class/net/{name}");
    let physical = host.exists(&format!("{base}/device"));
    let driver = host
        .link_name(&format!("{base}/device/driver"))
        .or_else(|| host.ethtool.driver(name).ok());
    let queues = host.list(&format!("{base}/queues"));
    let count = |p: &str| queues.iter().filter(|q| q.starts_with(p)).count() as u32;
    let speed = host
        .read(&format!("{base}/speed"))
        .and_then(|s| s.trim().parse::<i64>().ok())
        .filter(|s| *s > 0)
        .map(|s| s as u64);
    let numa_node = host
        .read(&format!("{base}/device/numa_node"))
        .and_then(|s| s.trim().parse::<i64>().ok())
        .filter(|n| *n >= 0)
        .map(|n| n as u32);
    let mut irqs: Vec<u32> = host
        .list(&format!("{base}/device/msi_irqs"))
        .iter()
        .filter_map(|i| i.parse().ok())
        .collect();
    irqs.sort_unstable();
    let mut offloads = BTreeMap::new();
    for o in OFFLOADS {
        if let Ok(v) = host.ethtool.offload(name, o) {
            offloads.insert(o.to_string(), v);
        }
    }
    let (p, matched) = profiles.nic_for(driver.as_deref());
    Nic {
        name: name.to_string(),
        ifindex: host.read_num(&format!("{base}/ifindex")),
        physical,
        speed_mbps: speed,
        mtu: host.read_num(&format!("{base}/mtu")),
        operstate: host.read(&format!("{base}/operstate")),
        rx_queues: count("rx-"),
        tx_queues: count("tx-"),
        numa_node,
        ring: host.ethtool.ring(name).ok(),
        channels: host.ethtool.channels(name).ok(),
        offloads,
        irqs,
        profile: p.name.clone(),
        profile_matched: matched,
        driver,
    }
}

fn disk(host: &Host, profiles: &Profiles, name: &str) -> Disk {
    let base = format!("sys/block/{name}");
    let q = |a: &str| format!("{base}/queue/{a}");
    // NVMe namespaces hang off the controller, whose parent PCI device has the driver link.
    let driver = host
        .link_name(&format!("{base}/device/driver"))
        .or_else(|| host.link_name(&format!("{base}/device/device/driver")));
    let trimmed = |a: &str| {
        host.read(&format!("{base}/device/{a}"))
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let vendor = trimmed("vendor");
    let sched = host.read(&q("scheduler"));
    let discard: Option<u64> = host.read_num(&q("discard_max_bytes"));
    let (p, matched) = profiles.disk_for(driver.as_deref(), vendor.as_deref());
    Disk {
        name: name.to_string(),
        nvme: name.starts_with("nvme") || driver.as_deref() == Some("nvme"),
        vendor,
        model: trimmed("model"),
        size_bytes: host
            .read_num::<u64>(&format!("{base}/size"))
            .map(|s| s * 512),
        rotational: host.read_num::<u8>(&q("rotational")).map(|r| r != 0),
        scheduler: sched.as_deref().map(bracketed),
        schedulers: sched
            .as_deref()
            .map(|s| {
                s.split_whitespace()
                    .map(|w| w.trim_matches(|c| c == '[' || c == ']').to_string())
                    .collect()
            })
            .unwrap_or_default(),
        nr_requests: host.read_num(&q("nr_requests")),
        write_cache: host.read(&q("write_cache")),
        trim: discard.is_some_and(|d| d > 0),
        discard_max_bytes: discard,
        logical_block_size: host.read_num(&q("logical_block_size")),
        identity: disk_identity(host, name),
        profile: p.name.clone(),
        profile_matched: matched,
        direct_io: p.direct_io,
        driver,
    }
}

/// The profile's advice for a cache directory on the live machine: the disk holding it, and
/// whether its profile says the cache should use O_DIRECT (see `hardware/profiles/disks.toml`).
/// None when the directory's disk cannot be told (a tmpfs, an overlay, a device-mapper stack).
pub fn cache_direct_io(dir: &std::path::Path, profiles: &Profiles) -> Option<(String, bool)> {
    let host = Host::new(std::path::Path::new("/"));
    // A cache directory not created yet will live on its nearest existing ancestor's disk.
    let existing = dir.ancestors().find(|d| d.exists())?;
    let name = crate::tune::disk_of_dir(&host, existing)?;
    if !host.exists(&format!("sys/block/{name}")) {
        return None;
    }
    let d = disk(&host, profiles, &name);
    Some((name, d.direct_io && d.profile_matched))
}

/// What tells a disk from another that later takes its kernel name: a world-wide name or serial
/// number where the device has one (NVMe namespace `wwid`, SCSI `device/wwid`, virtio-blk
/// `serial`, NVMe controller `device/serial`), else its model and size. None when the disk is
/// gone (no size).
pub fn disk_identity(host: &Host, name: &str) -> Option<String> {
    let base = format!("sys/block/{name}");
    let sectors: u64 = host.read_num(&format!("{base}/size"))?;
    let attr = |a: &str| {
        host.read(&format!("{base}/{a}"))
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    for (label, a) in [
        ("wwid", "wwid"),
        ("wwid", "device/wwid"),
        ("serial", "serial"),
        ("serial", "device/serial"),
    ] {
        if let Some(v) = attr(a) {
            return Some(format!("{label} {v}"));
        }
    }
    Some(format!(
        "model {}, {sectors} sectors",
        attr("device/model").as_deref().unwrap_or("unknown")
    ))
}

/// The platform: a hypervisor profile whose DMI rule matches (every list it gives — vendors,
/// products — must match, and its CPU hypervisor flag where it names one); else, on a VM or
/// without DMI, a hypervisor betrayed by its paravirtual drivers; else `unknown` (a VM) or
/// `bare-metal-unverified` (a DMI maker no profile names, no hypervisor flag: conservative).
fn hypervisor(
    host: &Host,
    profiles: &Profiles,
    cpu: &Cpu,
    nics: &[Nic],
    disks: &[Disk],
) -> Hypervisor {
    let dmi = |f: &str| {
        host.read(&format!("sys/class/dmi/id/{f}"))
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let vendor = dmi("sys_vendor");
    let product = dmi("product_name");
    let make = |name: &str, evidence: String| {
        let p = profiles.hypervisor_named(name);
        Hypervisor {
            name: name.to_string(),
            description: p.map(|p| p.description.clone()).unwrap_or_default(),
            sys_vendor: vendor.clone(),
            product_name: product.clone(),
            evidence,
        }
    };
    // A list a profile leaves empty places no condition; one it gives must match.
    let dmi_matches = |field: &Option<String>, want: &[String]| {
        want.is_empty()
            || field
                .as_deref()
                .is_some_and(|v| want.iter().any(|x| v.contains(x.as_str())))
    };
    for h in &profiles.hypervisor {
        let has_rule = !h.dmi_vendors.is_empty() || !h.dmi_products.is_empty();
        if has_rule
            && dmi_matches(&vendor, &h.dmi_vendors)
            && dmi_matches(&product, &h.dmi_products)
            && !matches!(h.hypervisor_flag, Some(f) if f != cpu.hypervisor_flag)
        {
            return make(
                &h.name,
                format!(
                    "DMI sys_vendor {:?}, product_name {:?}",
                    vendor.as_deref().unwrap_or(""),
                    product.as_deref().unwrap_or("")
                ),
            );
        }
    }
    let drivers: Vec<&str> = nics
        .iter()
        .filter_map(|n| n.driver.as_deref())
        .chain(disks.iter().filter_map(|d| d.driver.as_deref()))
        .collect();
    if cpu.hypervisor_flag || (vendor.is_none() && product.is_none()) {
        for h in &profiles.hypervisor {
            if let Some(d) = h
                .device_drivers
                .iter()
                .find(|d| drivers.contains(&d.as_str()))
            {
                return make(
                    &h.name,
                    format!("no matching DMI; paravirtual device driver {d}"),
                );
            }
        }
    }
    if cpu.hypervisor_flag {
        return make(
            "unknown",
            "the CPU reports a hypervisor; no DMI or device says which".into(),
        );
    }
    if vendor.is_some() || product.is_some() {
        return make(
            "bare-metal-unverified",
            format!(
                "DMI sys_vendor {:?}, product_name {:?}: a maker no profile names, and no \
                 hypervisor flag (probably bare metal, unverified)",
                vendor.as_deref().unwrap_or(""),
                product.as_deref().unwrap_or("")
            ),
        );
    }
    make(
        "unknown",
        "no DMI, no hypervisor flag, no telling devices".into(),
    )
}

fn notes_for(
    profiles: &Profiles,
    cpu: &Cpu,
    hv: &Hypervisor,
    nics: &[Nic],
    disks: &[Disk],
    notes: &mut Vec<String>,
) {
    if !cpu.aes {
        notes.push(
            "the CPU has no AES-NI: AES-256-GCM runs in software, expect far lower throughput"
                .into(),
        );
    }
    match hv.name.as_str() {
        "unknown" => notes.push(format!(
            "hypervisor not recognised ({}): conservative defaults",
            hv.evidence
        )),
        "bare-metal-unverified" => notes.push(format!(
            "platform not verified ({}): conservative defaults, no interrupt pinning",
            hv.evidence
        )),
        _ => {}
    }
    let hp = profiles.hypervisor_named(&hv.name);
    for n in nics.iter().filter(|n| n.physical) {
        match (&n.driver, n.profile_matched) {
            (None, _) => notes.push(format!("{}: driver unknown: never tuned", n.name)),
            (Some(d), false) => notes.push(format!(
                "{}: no profile for driver {d}: conservative defaults (left as it is)",
                n.name
            )),
            (Some(d), true) => {
                if let Some(hp) = hp {
                    if !hp.recommended_nic_drivers.is_empty()
                        && !hp.recommended_nic_drivers.contains(d)
                    {
                        notes.push(format!(
                            "{}: driver {d} on {}; recommended: {}",
                            n.name,
                            hv.name,
                            hp.recommended_nic_drivers.join(", ")
                        ));
                    }
                }
            }
        }
        if let Some(p) = profiles
            .nic
            .iter()
            .find(|p| n.profile_matched && p.name == n.profile)
        {
            for t in &p.notes {
                notes.push(format!("{}: {t}", n.name));
            }
        }
    }
    for d in disks {
        if d.driver.is_none() && d.vendor.is_none() {
            notes.push(format!("{}: disk not identified: never tuned", d.name));
        } else if !d.profile_matched {
            notes.push(format!(
                "{}: no profile for driver {}: conservative defaults (left as it is)",
                d.name,
                d.driver.as_deref().unwrap_or("?")
            ));
        }
        if d.direct_io {
            notes.push(format!(
                "{}: a cache here should use O_DIRECT with {}-byte aligned I/O",
                d.name,
                d.logical_block_size.unwrap_or(512)
            ));
        }
    }
    if let Some(hp) = hp {
        for t in &hp.notes {
            notes.push(format!("{}: {t}", hv.name));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A recorded machine with only DMI and the CPU flags.
    fn platform(vendor: &str, product: &str, hypervisor_flag: bool) -> Hypervisor {
        let d = tempfile::tempdir().unwrap();
        let dmi = d.path().join("sys/class/dmi/id");
        std::fs::create_dir_all(&dmi).unwrap();
        std::fs::write(dmi.join("sys_vendor"), format!("{vendor}\n")).unwrap();
        std::fs::write(dmi.join("product_name"), format!("{product}\n")).unwrap();
        std::fs::create_dir_all(d.path().join("proc")).unwrap();
        let flags = if hypervisor_flag {
            "fpu sse2 aes hypervisor"
        } else {
            "fpu sse2 aes"
        };
        std::fs::write(
            d.path().join("proc/cpuinfo"),
            format!("processor\t: 0\nflags\t\t: {flags}\n"),
        )
        .unwrap();
        probe(&Host::new(d.path()), &Profiles::builtin().unwrap()).hypervisor
    }

    #[test]
    fn a_surface_laptop_is_not_hyper_v() {
        let h = platform("Microsoft Corporation", "Surface Pro 7", false);
        assert_eq!(h.name, "bare-metal-unverified", "{h:?}");
        assert!(h.evidence.contains("Microsoft Corporation"), "{h:?}");
        let p = Profiles::builtin().unwrap();
        assert!(!p.hypervisor_named(&h.name).unwrap().irq_affinity);
        // The same maker's VM product is Hyper-V.
        let h = platform("Microsoft Corporation", "Virtual Machine", true);
        assert_eq!(h.name, "hyper-v", "{h:?}");
        // A Surface under a hypervisor Ferry cannot name is an unknown VM, not Hyper-V.
        assert_eq!(
            platform("Microsoft Corporation", "Surface Pro 7", true).name,
            "unknown"
        );
    }

    #[test]
    fn dmi_rules_need_vendor_and_product() {
        for (vendor, product, flag, want) in [
            ("QEMU", "Standard PC (Q35 + ICH9, 2009)", true, "kvm"),
            ("Red Hat", "KVM", true, "kvm"),
            // A QEMU product name under another maker's DMI proves nothing.
            (
                "Frobozz",
                "Standard PC (Q35 + ICH9, 2009)",
                false,
                "bare-metal-unverified",
            ),
            ("VMware, Inc.", "VMware7,1", true, "vmware"),
            ("Xen", "HVM domU", true, "xen"),
            ("Dell Inc.", "PowerEdge R750", false, "bare-metal"),
            // A server maker's DMI with the hypervisor flag: a VM copying it, not bare metal.
            ("Dell Inc.", "PowerEdge R750", true, "unknown"),
            (
                "Frobozz Magic Computer Co.",
                "FZ-9000",
                false,
                "bare-metal-unverified",
            ),
        ] {
            let h = platform(vendor, product, flag);
            assert_eq!(h.name, want, "{vendor} / {product} / flag {flag}: {h:?}");
        }
    }
}
