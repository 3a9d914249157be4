//! Update media: an ISO 9660 image (a CD/DVD the provider attaches to the appliance's VM, or the
//! same image written to a USB stick) that carries signed bundles as files in its root directory.
//!
//! The media is read in user space, as raw bytes from the block device: nothing is mounted, so the
//! kernel's file system code never parses media that anyone could have made. Only what this
//! module needs of ISO 9660 (ECMA-119) is read:
//!
//! ```text
//! sector 16, 17, ...   volume descriptors (2048 bytes each): type (1 = primary, 255 = end),
//!                      "CD001", version 1
//! primary +128         logical block size (u16 LE, normally 2048)
//! primary +156         the root directory's record (34 bytes)
//! directory record     +0 length, +2 extent LBA (u32 LE), +10 data length (u32 LE),
//!                      +25 flags (0x02 directory, 0x80 more extents follow), +32 name length,
//!                      +33 name ("NAME.EXT;1")
//! ```
//!
//! A file is a bundle candidate when its first eight bytes are the bundle magic, whatever its
//! name (ISO 9660 level 1 names are 8.3 upper case, Rock Ridge and Joliet rename freely). A file
//! is one extent of at most 4 GiB; multi-extent files are not read. Every number from the media
//! is bounded before use: a damaged or hostile image gives an error, never a panic or a huge read.

use crate::bundle::{BundleSource, MAGIC};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

const SECTOR: u64 = 2048;
/// Volume descriptors looked at before giving up on finding the primary one.
const MAX_DESCRIPTORS: u64 = 32;
/// The root directory is read whole; a bundle medium's root has a handful of entries.
const MAX_ROOT_DIR: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("not an ISO 9660 medium")]
    NotIso,
    #[error("damaged ISO 9660 medium: {0}")]
    Damaged(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A bundle candidate on a medium: a root directory file that starts with the bundle magic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MediaFile {
    /// The file's ISO 9660 name without the `;1` version.
    pub name: String,
    pub source: BundleSource,
}

fn damaged(what: impl Into<String>) -> MediaError {
    MediaError::Damaged(what.into())
}

fn read_at(f: &mut File, at: u64, buf: &mut [u8]) -> io::Result<()> {
    f.seek(SeekFrom::Start(at))?;
    f.read_exact(buf)
}

/// The bundle candidates in the root directory of the ISO 9660 medium at `path` (a block device
/// or an image file). `Err(NotIso)` when the medium is something else.
pub fn bundles_on(path: &Path) -> Result<Vec<MediaFile>, MediaError> {
    let mut f = File::open(path)?;
    let size = f.seek(SeekFrom::End(0))?;
    let mut vd = [0u8; SECTOR as usize];
    let mut primary = None;
    for i in 16..16 + MAX_DESCRIPTORS {
        if (i + 1) * SECTOR > size {
            break;
        }
        read_at(&mut f, i * SECTOR, &mut vd)?;
        if &vd[1..6] != b"CD001" {
            break;
        }
        match vd[0] {
            1 => {
                primary = Some(vd);
                break;
            }
            255 => break,
            _ => {}
        }
    }
    let pvd = primary.ok_or(MediaError::NotIso)?;
    let block = u64::from(u16::from_le_bytes([pvd[128], pvd[129]]));
    if !matches!(block, 512 | 1024 | 2048) {
        return Err(damaged(format!("logical block size {block}")));
    }
    let root = &pvd[156..190];
    let root_lba = u64::from(u32::from_le_bytes([root[2], root[3], root[4], root[5]]));
    let root_len = u64::from(u32::from_le_bytes([root[10], root[11], root[12], root[13]]));
    if root_len == 0 || root_len > MAX_ROOT_DIR {
        return Err(damaged(format!("root directory of {root_len} bytes")));
    }
    let root_at = root_lba
        .checked_mul(block)
        .filter(|at| at.saturating_add(root_len) <= size)
        .ok_or_else(|| damaged("root directory beyond the end of the medium"))?;
    let mut dir = vec![0u8; root_len as usize];
    read_at(&mut f, root_at, &mut dir)?;

    let mut found = Vec::new();
    let mut pos = 0usize;
    while pos < dir.len() {
        let len = dir[pos] as usize;
        if len == 0 {
            // Records do not cross a block boundary: the rest of this block is padding.
            pos = (pos / block as usize + 1) * block as usize;
            continue;
        }
        if len < 34 || pos + len > dir.len() {
            return Err(damaged(format!("directory record of {len} bytes at {pos}")));
        }
        let r = &dir[pos..pos + len];
        pos += len;
        let flags = r[25];
        let name_len = r[32] as usize;
        if 33 + name_len > r.len() {
            return Err(damaged("directory record name beyond the record"));
        }
        let name = &r[33..33 + name_len];
        // Directories, the "." and ".." entries, and files split over several extents.
        if flags & 0x82 != 0 || name == [0] || name == [1] {
            continue;
        }
        let lba = u64::from(u32::from_le_bytes([r[2], r[3], r[4], r[5]]));
        let data_len = u64::from(u32::from_le_bytes([r[10], r[11], r[12], r[13]]));
        let Some(at) = lba.checked_mul(block) else {
            continue;
        };
        if data_len < MAGIC.len() as u64 || at.saturating_add(data_len) > size {
            continue;
        }
        let mut magic = [0u8; 8];
        read_at(&mut f, at, &mut magic)?;
        if &magic != MAGIC {
            continue;
        }
        let text = String::from_utf8_lossy(name);
        let name = text.split(';').next().unwrap_or_default().to_string();
        found.push(MediaFile {
            name,
            source: BundleSource {
                path: path.to_path_buf(),
                offset: at,
                len: data_len,
            },
        });
    }
    Ok(found)
}

/// Whole block devices that may hold update media: every disk in `sys_block`
/// (`/sys/class/block`) except partitions, RAM, loop and device-mapper devices and the disks
/// named in `except` (the boot disk). CD/DVD drives (`sr*`) come first.
pub fn candidate_devices(sys_block: &Path, except: &[PathBuf]) -> io::Result<Vec<PathBuf>> {
    let mut names: Vec<String> = std::fs::read_dir(sys_block)?
        .filter_map(|e| e.ok())
        .filter(|e| !e.path().join("partition").exists())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| {
            !["loop", "ram", "dm-", "zram", "md"]
                .iter()
                .any(|p| n.starts_with(p))
        })
        .collect();
    names.sort_by_key(|n| (!n.starts_with("sr"), n.clone()));
    Ok(names
        .into_iter()
        .map(|n| PathBuf::from("/dev").join(n))
        .filter(|d| !except.contains(d))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(lba: u32, len: u32, flags: u8, name: &[u8]) -> Vec<u8> {
        let mut r = vec![0u8; 33 + name.len() + (1 - name.len() % 2)];
        r[0] = r.len() as u8;
        r[2..6].copy_from_slice(&lba.to_le_bytes());
        r[6..10].copy_from_slice(&lba.to_be_bytes());
        r[10..14].copy_from_slice(&len.to_le_bytes());
        r[14..18].copy_from_slice(&len.to_be_bytes());
        r[25] = flags;
        r[32] = name.len() as u8;
        r[33..33 + name.len()].copy_from_slice(name);
        r
    }

    /// An ISO 9660 image: PVD at 16, terminator at 17, root directory at 18, files from 19.
    fn iso(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut img = vec![0u8; 19 * SECTOR as usize];
        let mut dir = record(18, SECTOR as u32, 0x02, &[0]);
        dir.extend(record(18, SECTOR as u32, 0x02, &[1]));
        let mut lba = 19u32;
        let mut data = Vec::new();
        for (name, bytes) in files {
            dir.extend(record(
                lba,
                bytes.len() as u32,
                0,
                format!("{name};1").as_bytes(),
            ));
            let mut b = bytes.to_vec();
            b.resize(bytes.len().div_ceil(SECTOR as usize) * SECTOR as usize, 0);
            lba += (b.len() / SECTOR as usize) as u32;
            data.extend(b);
        }
        let pvd = 16 * SECTOR as usize;
        img[pvd] = 1;
        img[pvd + 1..pvd + 6].copy_from_slice(b"CD001");
        img[pvd + 6] = 1;
        img[pvd + 128..pvd + 130].copy_from_slice(&2048u16.to_le_bytes());
        img[pvd + 156..pvd + 190].copy_from_slice(&record(18, SECTOR as u32, 0x02, &[0]));
        let term = 17 * SECTOR as usize;
        img[term] = 255;
        img[term + 1..term + 6].copy_from_slice(b"CD001");
        dir.resize(SECTOR as usize, 0);
        img[18 * SECTOR as usize..].copy_from_slice(&dir);
        img.extend(data);
        img
    }

    #[test]
    fn finds_bundles_by_their_magic_not_their_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("media.iso");
        let bundle = [MAGIC.as_slice(), &[7u8; 5000]].concat();
        let img = iso(&[("README.TXT", b"read me"), ("FERRY_U.BUN", &bundle)]);
        std::fs::write(&path, &img).unwrap();
        let found = bundles_on(&path).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].name, "FERRY_U.BUN");
        let s = &found[0].source;
        assert_eq!(s.len, bundle.len() as u64);
        let at = s.offset as usize;
        assert_eq!(&img[at..at + bundle.len()], bundle.as_slice());
    }

    #[test]
    fn other_media_and_damage_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        std::fs::write(&path, vec![0u8; 100_000]).unwrap();
        assert!(matches!(bundles_on(&path), Err(MediaError::NotIso)));
        std::fs::write(&path, b"short").unwrap();
        assert!(matches!(bundles_on(&path), Err(MediaError::NotIso)));
        // Every single-byte change to the descriptors and the directory: no panic.
        let good = iso(&[("B.BUN", &[MAGIC.as_slice(), &[1u8; 100]].concat())]);
        for at in (16 * 2048..16 * 2048 + 200).chain(18 * 2048..18 * 2048 + 120) {
            for v in [0u8, 1, 0x7f, 0xff] {
                let mut bad = good.clone();
                bad[at] = v;
                std::fs::write(&path, &bad).unwrap();
                let _ = bundles_on(&path);
            }
        }
    }

    #[test]
    fn candidates_skip_partitions_and_the_boot_disk() {
        let dir = tempfile::tempdir().unwrap();
        for d in ["vda", "vda1", "sr0", "nvme0n1", "loop0", "dm-0"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        std::fs::write(dir.path().join("vda1/partition"), "1\n").unwrap();
        let got = candidate_devices(dir.path(), &[PathBuf::from("/dev/vda")]).unwrap();
        assert_eq!(
            got,
            vec![PathBuf::from("/dev/sr0"), PathBuf::from("/dev/nvme0n1")]
        );
    }
}
