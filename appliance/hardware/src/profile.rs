//! Profiles: data files (TOML, `hardware/profiles/*.toml`) that say what Ferry wants from a NIC
//! driver, a cache disk, a hypervisor and the TCP stack. The files in the repository are built
//! into the program; `--profiles DIR` reads another directory instead (for a site's overrides).
//!
//! Every category has a profile named `default` that changes nothing: hardware no profile names
//! gets conservative defaults and a report that says so, never an error.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The profile files shipped with Ferry (`hardware/profiles/`), built into the binary.
pub const BUILTIN: [(&str, &str); 4] = [
    (
        "nics.toml",
        include_str!("../../../hardware/profiles/nics.toml"),
    ),
    (
        "disks.toml",
        include_str!("../../../hardware/profiles/disks.toml"),
    ),
    (
        "hypervisors.toml",
        include_str!("../../../hardware/profiles/hypervisors.toml"),
    ),
    (
        "tcp.toml",
        include_str!("../../../hardware/profiles/tcp.toml"),
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("reading profiles in {0}: {1}")]
    Io(String, std::io::Error),
    #[error("profile file {0}: {1}")]
    Parse(String, toml::de::Error),
    #[error("profiles: {0}")]
    Invalid(String),
}

/// What Ferry wants from NICs run by some drivers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicProfile {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Kernel driver names (`ethtool -i`, or the `device/driver` link in sysfs).
    #[serde(default)]
    pub drivers: Vec<String>,
    /// Ring size (descriptors) for rx and tx, capped at the device's maximum.
    #[serde(default)]
    pub ring: Option<u32>,
    /// RSS queue pairs: 0 = one per CPU of the NIC's NUMA node, N = that many (capped).
    #[serde(default)]
    pub rss_queues: Option<u32>,
    /// Offloads by `ethtool -k` short name (tso, gso, gro, sg, tx-checksum, rx-checksum).
    #[serde(default)]
    pub offloads: BTreeMap<String, bool>,
    /// Spread the NIC's MSI-X interrupts over the CPUs of its NUMA node.
    #[serde(default)]
    pub irq_affinity: bool,
    /// The largest MTU `ferry hw tune --mtu` may set on this driver (no `--mtu`: MTU untouched).
    #[serde(default)]
    pub max_mtu: Option<u32>,
    #[serde(default)]
    pub notes: Vec<String>,
}

/// What Ferry wants from a disk used as the cache (journal) device.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskProfile {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Driver names (`device/driver` or, for NVMe namespaces, `device/device/driver`).
    #[serde(default)]
    pub drivers: Vec<String>,
    /// Substrings of `device/vendor` (SCSI disks: "VMware", "Msft").
    #[serde(default)]
    pub vendors: Vec<String>,
    /// I/O schedulers in order of preference; the first the kernel offers is used.
    #[serde(default)]
    pub schedulers: Vec<String>,
    #[serde(default)]
    pub nr_requests: Option<u32>,
    /// The cache should use O_DIRECT with I/O aligned to the logical block size (reported).
    #[serde(default)]
    pub direct_io: bool,
    #[serde(default)]
    pub notes: Vec<String>,
}

/// A hypervisor (or bare metal), recognised from DMI or, without DMI, from its devices.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HypervisorProfile {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Substrings of DMI `sys_vendor`. A DMI match needs every list given here to match: one of
    /// the vendors and one of the products (a maker's name alone does not say VM: Microsoft
    /// makes Surface laptops as well as Hyper-V).
    #[serde(default)]
    pub dmi_vendors: Vec<String>,
    /// Substrings of DMI `product_name`.
    #[serde(default)]
    pub dmi_products: Vec<String>,
    /// When given, the CPU's hypervisor flag must be this for a DMI match (bare metal: false,
    /// since a VM's DMI may copy a server maker's).
    #[serde(default)]
    pub hypervisor_flag: Option<bool>,
    /// Paravirtual drivers that betray this hypervisor when DMI is missing.
    #[serde(default)]
    pub device_drivers: Vec<String>,
    /// NIC and disk drivers the appliance should be given on this hypervisor.
    #[serde(default)]
    pub recommended_nic_drivers: Vec<String>,
    #[serde(default)]
    pub recommended_disk_drivers: Vec<String>,
    /// Whether pinning NIC interrupts to CPUs helps here (vCPUs float on most hosts).
    #[serde(default)]
    pub irq_affinity: bool,
    #[serde(default)]
    pub notes: Vec<String>,
}

/// TCP settings for long fat WAN links.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpProfile {
    /// Congestion control algorithms in order of preference (first one the kernel offers).
    pub congestion_control: Vec<String>,
    /// Socket buffer maxima are 2 x bandwidth-delay product, clamped to these bounds.
    pub buffer_floor_bytes: u64,
    pub buffer_cap_bytes: u64,
    /// The WAN assumed when `ferry hw tune` is not told (--wan-mbps, --wan-rtt-ms).
    pub default_wan_mbps: u64,
    pub default_rtt_ms: u64,
    /// Fixed sysctls (dotted names under /proc/sys) and their values.
    #[serde(default)]
    pub sysctls: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    nic: Vec<NicProfile>,
    #[serde(default)]
    disk: Vec<DiskProfile>,
    #[serde(default)]
    hypervisor: Vec<HypervisorProfile>,
    #[serde(default)]
    tcp: Option<TcpProfile>,
}

/// All profiles, merged from the files of one directory.
#[derive(Debug, Clone, Serialize)]
pub struct Profiles {
    pub nic: Vec<NicProfile>,
    pub disk: Vec<DiskProfile>,
    pub hypervisor: Vec<HypervisorProfile>,
    pub tcp: TcpProfile,
}

impl Profiles {
    /// The profiles built into the program.
    pub fn builtin() -> Result<Profiles, ProfileError> {
        Self::from_texts(BUILTIN.iter().map(|(n, t)| (n.to_string(), t.to_string())))
    }

    /// Every `*.toml` file of `dir`.
    pub fn load_dir(dir: &Path) -> Result<Profiles, ProfileError> {
        let show = dir.display().to_string();
        let rd = std::fs::read_dir(dir).map_err(|e| ProfileError::Io(show.clone(), e))?;
        let mut files = Vec::new();
        for e in rd {
            let p = e.map_err(|e| ProfileError::Io(show.clone(), e))?.path();
            if p.extension().is_some_and(|x| x == "toml") {
                let t = std::fs::read_to_string(&p)
                    .map_err(|e| ProfileError::Io(p.display().to_string(), e))?;
                files.push((p.display().to_string(), t));
            }
        }
        files.sort();
        Self::from_texts(files)
    }

    fn from_texts(
        files: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Profiles, ProfileError> {
        let mut all = File::default();
        for (name, text) in files {
            let f: File =
                toml::from_str(&text).map_err(|e| ProfileError::Parse(name.clone(), e))?;
            all.nic.extend(f.nic);
            all.disk.extend(f.disk);
            all.hypervisor.extend(f.hypervisor);
            if let Some(t) = f.tcp {
                if all.tcp.is_some() {
                    return Err(ProfileError::Invalid(format!(
                        "{name}: a second [tcp] table"
                    )));
                }
                all.tcp = Some(t);
            }
        }
        let p = Profiles {
            tcp: all
                .tcp
                .ok_or_else(|| ProfileError::Invalid("no [tcp] table".into()))?,
            nic: all.nic,
            disk: all.disk,
            hypervisor: all.hypervisor,
        };
        for (kind, has) in [
            ("nic", p.nic.iter().any(|n| n.name == "default")),
            ("disk", p.disk.iter().any(|n| n.name == "default")),
            (
                "hypervisor",
                p.hypervisor.iter().any(|n| n.name == "unknown"),
            ),
        ] {
            if !has {
                return Err(ProfileError::Invalid(format!(
                    "no fallback {kind} profile (`default`, hypervisor `unknown`)"
                )));
            }
        }
        if p.tcp.buffer_floor_bytes > p.tcp.buffer_cap_bytes {
            return Err(ProfileError::Invalid("tcp buffer floor above cap".into()));
        }
        Ok(p)
    }

    /// The profile for a NIC driver, and whether it was a real match (not the default).
    pub fn nic_for(&self, driver: Option<&str>) -> (&NicProfile, bool) {
        if let Some(d) = driver {
            if let Some(p) = self.nic.iter().find(|p| p.drivers.iter().any(|x| x == d)) {
                return (p, true);
            }
        }
        (self.nic_named("default"), false)
    }

    fn nic_named(&self, name: &str) -> &NicProfile {
        self.nic
            .iter()
            .find(|p| p.name == name)
            .unwrap_or(&self.nic[0])
    }

    /// The profile for a disk by driver or vendor, and whether it was a real match.
    pub fn disk_for(&self, driver: Option<&str>, vendor: Option<&str>) -> (&DiskProfile, bool) {
        let hit = self.disk.iter().find(|p| {
            driver.is_some_and(|d| p.drivers.iter().any(|x| x == d))
                || vendor.is_some_and(|v| p.vendors.iter().any(|x| v.contains(x.as_str())))
        });
        match hit {
            Some(p) => (p, true),
            None => (
                self.disk
                    .iter()
                    .find(|p| p.name == "default")
                    .unwrap_or(&self.disk[0]),
                false,
            ),
        }
    }

    pub fn hypervisor_named(&self, name: &str) -> Option<&HypervisorProfile> {
        self.hypervisor.iter().find(|h| h.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_profiles_parse_and_cover_the_named_drivers() {
        let p = Profiles::builtin().unwrap();
        for d in [
            "ixgbe",
            "i40e",
            "ice",
            "mlx5_core",
            "bnxt_en",
            "virtio_net",
            "vmxnet3",
        ] {
            assert!(p.nic_for(Some(d)).1, "no NIC profile for {d}");
        }
        assert!(!p.nic_for(Some("frobnicator")).1);
        assert_eq!(p.nic_for(None).0.name, "default");
        assert!(p.disk_for(Some("nvme"), None).1);
        assert!(p.disk_for(Some("sd"), Some("VMware  ")).1);
        for h in ["bare-metal", "kvm", "vmware", "hyper-v", "unknown"] {
            assert!(p.hypervisor_named(h).is_some(), "no hypervisor profile {h}");
        }
    }

    #[test]
    fn a_profile_set_without_fallbacks_is_refused() {
        let r = Profiles::from_texts([(
            "x.toml".to_string(),
            "[tcp]\ncongestion_control=[]\nbuffer_floor_bytes=1\nbuffer_cap_bytes=2\n\
             default_wan_mbps=1\ndefault_rtt_ms=1\n"
                .to_string(),
        )]);
        assert!(matches!(r, Err(ProfileError::Invalid(_))));
    }
}
