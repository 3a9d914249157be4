//! The boot entries on the ESP (`EFI/Linux/`): what their names say, and what version each UKI
//! carries.
//!
//! An entry is `ferry_<generation>-<slot>[+<left>[-<done>]].efi`: the counter is systemd-boot's
//! boot counting (Boot Loader Specification). No counter: the entry is blessed (it booted
//! healthy, or it is the factory entry). `+2`: installed, not booted yet. `+1-1`: booted once,
//! not (yet) blessed. `+0-2`: its tries are spent; systemd-boot sorts it last.
//!
//! A UKI is a PE file; its `.osrel` section is the os-release of the root it boots, and
//! systemd-boot takes the entry's version from that section's `IMAGE_VERSION`.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// Boot counting state of an entry, from its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// No counter: blessed.
    Blessed,
    /// `+left[-done]`: on trial; with `left == 0` its tries are spent.
    Trial { left: u32, done: u32 },
}

/// One `ferry_*` entry's name, taken apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryName {
    pub file: String,
    pub generation: u32,
    /// `a` or `b`.
    pub slot: char,
    pub counter: Counter,
}

impl EntryName {
    pub fn parse(file: &str) -> Option<EntryName> {
        let stem = file.strip_prefix("ferry_")?.strip_suffix(".efi")?;
        let generation = stem.get(..5)?.parse().ok()?;
        let rest = stem.get(5..)?.strip_prefix('-')?;
        let mut chars = rest.chars();
        let slot = chars.next().filter(|c| matches!(c, 'a' | 'b'))?;
        let tail = chars.as_str();
        let counter = if tail.is_empty() {
            Counter::Blessed
        } else {
            let c = tail.strip_prefix('+')?;
            let (left, done) = match c.split_once('-') {
                Some((l, d)) => (l.parse().ok()?, d.parse().ok()?),
                None => (c.parse().ok()?, 0),
            };
            Counter::Trial { left, done }
        };
        Some(EntryName {
            file: file.to_string(),
            generation,
            slot,
            counter,
        })
    }

    /// The same entry with its tries spent (`+0`): systemd-boot sorts it after every entry with
    /// tries left, yet still boots it when nothing else is left.
    pub fn spent(&self) -> String {
        format!("ferry_{:05}-{}+0.efi", self.generation, self.slot)
    }

    /// What the counter means, in words.
    pub fn state(&self) -> String {
        match self.counter {
            Counter::Blessed => "blessed".into(),
            Counter::Trial { left: 0, done: 0 } => {
                "set aside for a deliberate downgrade: booted only when nothing else is left".into()
            }
            Counter::Trial { left: 0, done } => {
                format!("tries spent ({done} failed boots): booted only when nothing else is left")
            }
            Counter::Trial { left, done: 0 } => format!("not booted yet ({left} tries)"),
            Counter::Trial { left, done } => {
                format!("on trial, not blessed ({done} boots so far, {left} tries left)")
            }
        }
    }
}

/// The `ferry_*` entries in an ESP's `EFI/Linux` directory (unparsable names are left out).
pub fn list(entries_dir: &Path) -> std::io::Result<Vec<EntryName>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(entries_dir)? {
        if let Some(name) = e?.file_name().to_str().and_then(EntryName::parse) {
            out.push(name);
        }
    }
    out.sort_by(|a, b| a.file.cmp(&b.file));
    Ok(out)
}

/// Sections read from a UKI: enough for a UKI's handful, bounded for a damaged file.
const MAX_SECTIONS: u16 = 96;
/// An os-release is a few hundred bytes.
const MAX_OSREL: u32 = 64 * 1024;

/// The `.osrel` section of a UKI (PE/COFF), as text; `None` when the file is no PE file or has no
/// such section. Every offset is bounded by the file; a damaged file is `None`, never a panic.
pub fn uki_os_release(path: &Path) -> std::io::Result<Option<String>> {
    let mut f = std::fs::File::open(path)?;
    let len = f.seek(SeekFrom::End(0))?;
    let mut read = |at: u64, n: usize| -> std::io::Result<Option<Vec<u8>>> {
        match at.checked_add(n as u64) {
            Some(end) if end <= len => {}
            _ => return Ok(None),
        }
        let mut buf = vec![0u8; n];
        f.seek(SeekFrom::Start(at))?;
        f.read_exact(&mut buf)?;
        Ok(Some(buf))
    };
    let Some(dos) = read(0, 64)? else {
        return Ok(None);
    };
    if &dos[..2] != b"MZ" {
        return Ok(None);
    }
    let pe = u64::from(u32::from_le_bytes([dos[60], dos[61], dos[62], dos[63]]));
    // PE signature (4) + COFF header (20).
    let Some(coff) = read(pe, 24)? else {
        return Ok(None);
    };
    if &coff[..4] != b"PE\0\0" {
        return Ok(None);
    }
    let sections = u16::from_le_bytes([coff[6], coff[7]]).min(MAX_SECTIONS);
    let optional = u64::from(u16::from_le_bytes([coff[20], coff[21]]));
    let table = pe + 24 + optional;
    let Some(headers) = read(table, 40 * usize::from(sections))? else {
        return Ok(None);
    };
    for h in headers.chunks_exact(40) {
        if &h[..8] != b".osrel\0\0" {
            continue;
        }
        let word = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        // VirtualSize is the section's own length; SizeOfRawData is padded to the alignment.
        let (virtual_size, raw_size, raw_at) = (word(8), word(16), word(20));
        let size = if virtual_size == 0 {
            raw_size
        } else {
            virtual_size.min(raw_size)
        };
        if size > MAX_OSREL {
            return Ok(None);
        }
        let Some(bytes) = read(u64::from(raw_at), size as usize)? else {
            return Ok(None);
        };
        let text = String::from_utf8_lossy(&bytes);
        return Ok(Some(text.trim_end_matches('\0').to_string()));
    }
    Ok(None)
}

/// The value of `KEY=` in os-release text (quotes removed).
pub fn os_release_value(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let v = l.strip_prefix(key)?.strip_prefix('=')?;
        Some(v.trim().trim_matches('"').trim_matches('\'').to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names() {
        let e = EntryName::parse("ferry_00000-a.efi").unwrap();
        assert_eq!(
            (e.generation, e.slot, e.counter),
            (0, 'a', Counter::Blessed)
        );
        let e = EntryName::parse("ferry_00002-b+1-1.efi").unwrap();
        assert_eq!(e.counter, Counter::Trial { left: 1, done: 1 });
        assert_eq!(e.spent(), "ferry_00002-b+0.efi");
        assert!(e.state().starts_with("on trial"));
        let e = EntryName::parse("ferry_00001-b+2.efi").unwrap();
        assert_eq!(e.counter, Counter::Trial { left: 2, done: 0 });
        let e = EntryName::parse("ferry_00001-b+0-2.efi").unwrap();
        assert!(e.state().starts_with("tries spent"));
        for bad in [
            "BOOTX64.EFI",
            "ferry_1-a.efi",
            "ferry_00001-c.efi",
            "ferry_00001-a+x.efi",
            "ferry_00001-a.efi.new",
            ".ferry_00001-a+2.efi.new",
        ] {
            assert!(EntryName::parse(bad).is_none(), "{bad}");
        }
    }

    /// A minimal PE file: DOS header, PE signature, COFF header, no optional header, sections.
    fn pe(sections: &[(&[u8; 8], &[u8])]) -> Vec<u8> {
        let pe_at = 64usize;
        let table = pe_at + 24;
        let data_at = table + 40 * sections.len();
        let mut f = vec![0u8; data_at];
        f[..2].copy_from_slice(b"MZ");
        f[60..64].copy_from_slice(&(pe_at as u32).to_le_bytes());
        f[pe_at..pe_at + 4].copy_from_slice(b"PE\0\0");
        f[pe_at + 6..pe_at + 8].copy_from_slice(&(sections.len() as u16).to_le_bytes());
        for (i, (name, body)) in sections.iter().enumerate() {
            let h = table + 40 * i;
            let at = f.len();
            let padded = body.len().div_ceil(512) * 512;
            f[h..h + 8].copy_from_slice(*name);
            f[h + 8..h + 12].copy_from_slice(&(body.len() as u32).to_le_bytes());
            f[h + 16..h + 20].copy_from_slice(&(padded as u32).to_le_bytes());
            f[h + 20..h + 24].copy_from_slice(&(at as u32).to_le_bytes());
            f.extend_from_slice(body);
            f.resize(at + padded, 0);
        }
        f
    }

    #[test]
    fn reads_a_ukis_os_release() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ferry.efi");
        let osrel = b"NAME=\"Ferry\"\nIMAGE_VERSION=2026.11.30.1\nVERSION_ID=x\n";
        std::fs::write(
            &path,
            pe(&[(b".text\0\0\0", b"code"), (b".osrel\0\0", osrel)]),
        )
        .unwrap();
        let text = uki_os_release(&path).unwrap().unwrap();
        assert_eq!(
            os_release_value(&text, "IMAGE_VERSION").as_deref(),
            Some("2026.11.30.1")
        );
        assert_eq!(os_release_value(&text, "NAME").as_deref(), Some("Ferry"));
        assert_eq!(os_release_value(&text, "IMAGE"), None);

        // Not a PE file, no .osrel, cut short: None, no panic.
        std::fs::write(&path, b"slot A's UKI").unwrap();
        assert_eq!(uki_os_release(&path).unwrap(), None);
        std::fs::write(&path, pe(&[(b".text\0\0\0", b"code")])).unwrap();
        assert_eq!(uki_os_release(&path).unwrap(), None);
        let full = pe(&[(b".osrel\0\0", osrel)]);
        for cut in [10, 70, 100, 130, 128 + osrel.len() - 1] {
            std::fs::write(&path, &full[..cut]).unwrap();
            assert_eq!(uki_os_release(&path).unwrap(), None, "cut at {cut}");
        }
    }
}
