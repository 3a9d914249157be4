//! The NIC settings sysfs does not show: driver name, ring sizes, channels (RSS queues) and the
//! main offloads, read and written through the `SIOCETHTOOL` ioctl on the live machine, or from a
//! recorded JSON file when the probe reads a fixture tree (`<root>/ferry-fixture/ethtool/IF.json`).
//!
//! The ioctl's legacy per-feature commands (`ETHTOOL_GGRO`, ...) are used for offloads: each is
//! one `u32` in and out, which keeps this file small and needs no string sets.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;

/// Ring sizes (descriptors) and their hardware maxima.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ring {
    pub rx: u32,
    pub tx: u32,
    pub rx_max: u32,
    pub tx_max: u32,
}

/// Queue pairs ("channels") and their maxima.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Channels {
    pub rx: u32,
    pub tx: u32,
    pub combined: u32,
    pub max_rx: u32,
    pub max_tx: u32,
    pub max_combined: u32,
}

/// The offloads Ferry looks at, by their `ethtool -k` short names.
pub const OFFLOADS: [&str; 6] = ["rx-checksum", "tx-checksum", "sg", "tso", "gso", "gro"];

/// One adjustable NIC setting, as recorded in the tuning state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Knob {
    RingRx,
    RingTx,
    ChannelsCombined,
    ChannelsRx,
    ChannelsTx,
    Offload(String),
}

impl std::fmt::Display for Knob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Knob::RingRx => f.write_str("ring rx"),
            Knob::RingTx => f.write_str("ring tx"),
            Knob::ChannelsCombined => f.write_str("channels combined"),
            Knob::ChannelsRx => f.write_str("channels rx"),
            Knob::ChannelsTx => f.write_str("channels tx"),
            Knob::Offload(o) => write!(f, "offload {o}"),
        }
    }
}

/// What a fixture records for one interface (the same shape the live backend reports).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Recorded {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring: Option<Ring>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<Channels>,
    #[serde(default)]
    pub offloads: BTreeMap<String, bool>,
}

/// Where ethtool answers come from.
#[derive(Debug, Clone)]
pub enum Ethtool {
    /// The running kernel (SIOCETHTOOL on an AF_INET datagram socket of this network namespace).
    Live,
    /// Recorded JSON files in this directory, one per interface; writes update them.
    Recorded(PathBuf),
}

fn unsupported(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!("the device has no {what}"),
    )
}

impl Ethtool {
    fn load(&self, dir: &std::path::Path, iface: &str) -> io::Result<Recorded> {
        match std::fs::read(dir.join(format!("{iface}.json"))) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Recorded::default()),
            Err(e) => Err(e),
        }
    }

    fn store(&self, dir: &std::path::Path, iface: &str, r: &Recorded) -> io::Result<()> {
        let text = serde_json::to_vec_pretty(r).map_err(io::Error::other)?;
        std::fs::write(dir.join(format!("{iface}.json")), text)
    }

    /// The kernel driver's name (`ethtool -i`).
    pub fn driver(&self, iface: &str) -> io::Result<String> {
        match self {
            Ethtool::Live => live::driver(iface),
            Ethtool::Recorded(d) => self
                .load(d, iface)?
                .driver
                .ok_or_else(|| unsupported("recorded driver")),
        }
    }

    pub fn ring(&self, iface: &str) -> io::Result<Ring> {
        match self {
            Ethtool::Live => live::ring(iface),
            Ethtool::Recorded(d) => self
                .load(d, iface)?
                .ring
                .ok_or_else(|| unsupported("ring parameters")),
        }
    }

    pub fn channels(&self, iface: &str) -> io::Result<Channels> {
        match self {
            Ethtool::Live => live::channels(iface),
            Ethtool::Recorded(d) => self
                .load(d, iface)?
                .channels
                .ok_or_else(|| unsupported("channel settings")),
        }
    }

    pub fn offload(&self, iface: &str, name: &str) -> io::Result<bool> {
        match self {
            Ethtool::Live => live::offload(iface, name),
            Ethtool::Recorded(d) => self
                .load(d, iface)?
                .offloads
                .get(name)
                .copied()
                .ok_or_else(|| unsupported(&format!("{name} offload"))),
        }
    }

    /// The current value of one knob, as a number (offloads: 0 or 1).
    pub fn get(&self, iface: &str, knob: &Knob) -> io::Result<u32> {
        Ok(match knob {
            Knob::RingRx => self.ring(iface)?.rx,
            Knob::RingTx => self.ring(iface)?.tx,
            Knob::ChannelsCombined => self.channels(iface)?.combined,
            Knob::ChannelsRx => self.channels(iface)?.rx,
            Knob::ChannelsTx => self.channels(iface)?.tx,
            Knob::Offload(o) => u32::from(self.offload(iface, o)?),
        })
    }

    /// Set one knob; the others keep their current values.
    pub fn set(&self, iface: &str, knob: &Knob, value: u32) -> io::Result<()> {
        match self {
            Ethtool::Live => live::set(iface, knob, value),
            Ethtool::Recorded(d) => {
                let mut r = self.load(d, iface)?;
                match knob {
                    Knob::RingRx | Knob::RingTx => {
                        let ring = r.ring.as_mut().ok_or_else(|| unsupported("ring"))?;
                        let (v, max) = if *knob == Knob::RingRx {
                            (&mut ring.rx, ring.rx_max)
                        } else {
                            (&mut ring.tx, ring.tx_max)
                        };
                        if value == 0 || value > max {
                            return Err(io::Error::from_raw_os_error(libc::EINVAL));
                        }
                        *v = value;
                    }
                    Knob::ChannelsCombined | Knob::ChannelsRx | Knob::ChannelsTx => {
                        let c = r.channels.as_mut().ok_or_else(|| unsupported("channels"))?;
                        let (v, max) = match knob {
                            Knob::ChannelsCombined => (&mut c.combined, c.max_combined),
                            Knob::ChannelsRx => (&mut c.rx, c.max_rx),
                            _ => (&mut c.tx, c.max_tx),
                        };
                        if value > max {
                            return Err(io::Error::from_raw_os_error(libc::EINVAL));
                        }
                        *v = value;
                    }
                    Knob::Offload(o) => {
                        let slot = r
                            .offloads
                            .get_mut(o)
                            .ok_or_else(|| unsupported(&format!("{o} offload")))?;
                        *slot = value != 0;
                    }
                }
                self.store(d, iface, &r)
            }
        }
    }
}

mod live {
    use super::{Channels, Knob, Ring};
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const GDRVINFO: u32 = 0x03;
    const GRINGPARAM: u32 = 0x10;
    const SRINGPARAM: u32 = 0x11;
    const GCHANNELS: u32 = 0x3c;
    const SCHANNELS: u32 = 0x3d;

    /// (get, set) command pairs of the legacy per-offload ioctls (linux/ethtool.h).
    fn offload_cmds(name: &str) -> io::Result<(u32, u32)> {
        Ok(match name {
            "rx-checksum" => (0x14, 0x15),
            "tx-checksum" => (0x16, 0x17),
            "sg" => (0x18, 0x19),
            "tso" => (0x1e, 0x1f),
            "gso" => (0x23, 0x24),
            "gro" => (0x2b, 0x2c),
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("unknown offload {name}"),
                ))
            }
        })
    }

    /// `struct ifreq` with the `ifr_data` member of its union (40 bytes on 64-bit Linux).
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut libc::c_void,
        _pad: [u8; 16],
    }

    /// Run one SIOCETHTOOL command; `buf` is the command's struct as u32 words, word 0 = cmd.
    fn ioctl(iface: &str, buf: &mut [u32]) -> io::Result<()> {
        let name = iface.as_bytes();
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad interface name {iface:?}"),
            ));
        }
        // SAFETY: socket(2) with constant arguments; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own; OwnedFd closes it once.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: buf.as_mut_ptr().cast(),
            _pad: [0; 16],
        };
        req.name[..name.len()].copy_from_slice(name);
        // SAFETY: req is a valid ifreq whose data points to `buf`, which is sized for the
        // command in buf[0] by every caller below and outlives the call.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL as _, &mut req) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn driver(iface: &str) -> io::Result<String> {
        // struct ethtool_drvinfo is 196 bytes = 49 words; driver[32] starts at byte 4.
        let mut buf = [0u32; 49];
        buf[0] = GDRVINFO;
        ioctl(iface, &mut buf)?;
        let bytes: Vec<u8> = buf[1..9].iter().flat_map(|w| w.to_ne_bytes()).collect();
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        let name = String::from_utf8_lossy(&bytes[..end]).into_owned();
        if name.is_empty() {
            return Err(io::Error::new(io::ErrorKind::NotFound, "empty driver name"));
        }
        Ok(name)
    }

    fn ring_raw(iface: &str) -> io::Result<[u32; 9]> {
        let mut b = [0u32; 9];
        b[0] = GRINGPARAM;
        ioctl(iface, &mut b)?;
        Ok(b)
    }

    pub fn ring(iface: &str) -> io::Result<Ring> {
        // cmd, rx_max, rx_mini_max, rx_jumbo_max, tx_max, rx, rx_mini, rx_jumbo, tx
        let b = ring_raw(iface)?;
        Ok(Ring {
            rx: b[5],
            tx: b[8],
            rx_max: b[1],
            tx_max: b[4],
        })
    }

    fn channels_raw(iface: &str) -> io::Result<[u32; 9]> {
        let mut b = [0u32; 9];
        b[0] = GCHANNELS;
        ioctl(iface, &mut b)?;
        Ok(b)
    }

    pub fn channels(iface: &str) -> io::Result<Channels> {
        // cmd, max_rx, max_tx, max_other, max_combined, rx, tx, other, combined
        let b = channels_raw(iface)?;
        Ok(Channels {
            max_rx: b[1],
            max_tx: b[2],
            max_combined: b[4],
            rx: b[5],
            tx: b[6],
            combined: b[8],
        })
    }

    pub fn offload(iface: &str, name: &str) -> io::Result<bool> {
        let (get, _) = offload_cmds(name)?;
        let mut b = [get, 0];
        ioctl(iface, &mut b)?;
        Ok(b[1] != 0)
    }

    pub fn set(iface: &str, knob: &Knob, value: u32) -> io::Result<()> {
        match knob {
            Knob::RingRx | Knob::RingTx => {
                let mut b = ring_raw(iface)?;
                b[0] = SRINGPARAM;
                b[if *knob == Knob::RingRx { 5 } else { 8 }] = value;
                ioctl(iface, &mut b)
            }
            Knob::ChannelsCombined | Knob::ChannelsRx | Knob::ChannelsTx => {
                let mut b = channels_raw(iface)?;
                b[0] = SCHANNELS;
                let i = match knob {
                    Knob::ChannelsCombined => 8,
                    Knob::ChannelsRx => 5,
                    _ => 6,
                };
                b[i] = value;
                ioctl(iface, &mut b)
            }
            Knob::Offload(o) => {
                let (_, set) = offload_cmds(o)?;
                let mut b = [set, u32::from(value != 0)];
                ioctl(iface, &mut b)
            }
        }
    }
}
