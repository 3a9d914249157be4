//! Ferry's hardware layer: know the machine, tune it reversibly, and say what it can carry.
//!
//! An appliance lands on whatever the site has — a server with 10/25 GbE NICs and NVMe drives,
//! or a VM on ESXi, KVM or Hyper-V — and an untuned NIC or cache gives away throughput and RPO.
//! This crate holds four small pieces, each usable alone:
//!
//! - [`probe`]: read CPU features, NICs, block devices and the hypervisor from sysfs, procfs, DMI
//!   and ethtool under a root directory (`/`, or a recorded tree for tests and support cases);
//! - [`profile`]: the data files under `hardware/profiles/` that map drivers and hypervisors to
//!   settings, with a do-nothing `default` for anything unknown;
//! - [`tune`]: plan, apply (recording every previous value in a state file) and revert;
//! - [`bench`] and [`sizing`]: measure this box and turn the figures into an ASR-style
//!   deployment plan (churn per day, protected disks, RPO at a WAN bandwidth);
//! - [`wan`]: the WAN link to a peer (RTT, upstream TCP throughput, bandwidth-delay product)
//!   over plain TCP, and the small responder the peer runs.
//!
//! [`host::Host`] is the only way any of them touches the machine.

pub mod bench;
pub mod ethtool;
pub mod host;
pub mod probe;
pub mod profile;
pub mod sizing;
pub mod tune;
pub mod wan;

pub use host::Host;
pub use probe::{probe, Report};
pub use profile::Profiles;
