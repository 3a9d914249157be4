//! The update bundle, version 1. All integers little-endian.
//!
//! ```text
//! offset      size  field
//! 0           8     magic "FERRYUP1"
//! 8           4     manifest length M (at most 64 KiB)
//! 12          M     manifest: UTF-8 JSON {"version", "roothash", "parts": [{"name","size","sha256"}]}
//! 12+M        64    Ed25519 signature over DOMAIN || manifest
//! 76+M        ...   the parts' bytes, concatenated in manifest order, nothing after the last
//! ```
//!
//! The signature covers the manifest, and the manifest pins every part by size and SHA-256, so
//! a verified manifest plus matching parts is a verified bundle. [`VerifiedBundle::open`] checks
//! the signature first (a bad signature costs nothing but reading the header), then hashes every
//! part; only a bundle that passes both is ever returned, and only a returned bundle can be
//! installed.

use ring::digest::{Context, SHA256};
use ring::signature::{Ed25519KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"FERRYUP1";
/// Signed bytes are prefixed with this, so a Ferry update signature means nothing elsewhere.
pub const DOMAIN: &[u8] = b"ferry-update-v1\0";
pub const MAX_MANIFEST: u32 = 64 * 1024;
pub const SIGNATURE_LEN: usize = 64;
/// The parts every bundle carries, in this order.
pub const PART_NAMES: [&str; 3] = ["root", "verity", "uki"];

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("not a Ferry update bundle (bad magic)")]
    Magic,
    #[error("manifest length {0} is above the limit")]
    ManifestTooLarge(u32),
    #[error("the manifest is not valid: {0}")]
    Manifest(String),
    #[error("bad signature: this bundle was not signed by the provider key built into this image")]
    Signature,
    #[error("part {name}: {problem}")]
    Part { name: String, problem: String },
    #[error("{0} bytes follow the last part")]
    Trailing(u64),
    #[error("bad key: {0}")]
    Key(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Part {
    pub name: String,
    pub size: u64,
    /// Lowercase hex SHA-256 of the part's bytes.
    pub sha256: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    /// The image version (`IMAGE_VERSION` in os-release).
    pub version: String,
    /// The dm-verity root hash of `root` (hex): it names the slot's partitions and is on the
    /// UKI's command line.
    pub roothash: String,
    pub parts: Vec<Part>,
}

impl Manifest {
    fn check(&self) -> Result<(), BundleError> {
        let bad = |m: String| Err(BundleError::Manifest(m));
        let names: Vec<&str> = self.parts.iter().map(|p| p.name.as_str()).collect();
        if names != PART_NAMES {
            return bad(format!("parts are {names:?}, expected {PART_NAMES:?}"));
        }
        if self.roothash.len() != 64 || hex::decode(&self.roothash).is_err() {
            return bad(format!("roothash {:?} is not 64 hex digits", self.roothash));
        }
        if self.version.is_empty()
            || self.version.len() > 64
            || !self
                .version
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-_~".contains(c))
        {
            return bad(format!(
                "version {:?} is not a plain version string",
                self.version
            ));
        }
        for p in &self.parts {
            if p.sha256.len() != 64 || hex::decode(&p.sha256).is_err() {
                return bad(format!("part {}: sha256 is not 64 hex digits", p.name));
            }
        }
        Ok(())
    }

    pub fn part(&self, name: &str) -> Option<&Part> {
        self.parts.iter().find(|p| p.name == name)
    }
}

/// A bundle whose signature and every part's digest were checked.
#[derive(Debug)]
pub struct VerifiedBundle {
    pub path: PathBuf,
    pub manifest: Manifest,
    /// Where each part starts in the file, in manifest order.
    offsets: Vec<u64>,
}

/// Where a bundle's bytes are: a whole file, or a stretch of a device (a file on update media,
/// found by [`crate::media`]). Bytes after `len` (a device's sector padding) are not the bundle's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BundleSource {
    pub path: PathBuf,
    pub offset: u64,
    pub len: u64,
}

impl BundleSource {
    /// A whole regular file.
    pub fn file(path: &Path) -> io::Result<BundleSource> {
        Ok(BundleSource {
            path: path.to_path_buf(),
            offset: 0,
            len: std::fs::metadata(path)?.len(),
        })
    }
}

impl std::fmt::Display for BundleSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.offset == 0 {
            write!(f, "{}", self.path.display())
        } else {
            write!(f, "{}@{}", self.path.display(), self.offset)
        }
    }
}

/// Read the header of a bundle and check its signature; nothing of the parts is read.
/// Returns the manifest (checked for form) and the manifest's length.
fn signed_manifest(
    f: &mut File,
    src: &BundleSource,
    public_key: &[u8],
) -> Result<(Manifest, u32), BundleError> {
    f.seek(SeekFrom::Start(src.offset))?;
    let mut head = [0u8; 12];
    f.read_exact(&mut head)?;
    if &head[..8] != MAGIC {
        return Err(BundleError::Magic);
    }
    let len = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    if len > MAX_MANIFEST {
        return Err(BundleError::ManifestTooLarge(len));
    }
    let mut manifest_bytes = vec![0u8; len as usize];
    f.read_exact(&mut manifest_bytes)?;
    let mut sig = [0u8; SIGNATURE_LEN];
    f.read_exact(&mut sig)?;
    let mut signed = DOMAIN.to_vec();
    signed.extend_from_slice(&manifest_bytes);
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(&signed, &sig)
        .map_err(|_| BundleError::Signature)?;
    let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| BundleError::Manifest(e.to_string()))?;
    manifest.check()?;
    Ok((manifest, len))
}

/// The manifest of a bundle whose signature is good, without hashing the parts: enough to decide
/// that a bundle is not needed (already running, already installed), never enough to install it.
pub fn read_signed_manifest(
    src: &BundleSource,
    public_key: &[u8],
) -> Result<Manifest, BundleError> {
    let mut f = File::open(&src.path)?;
    Ok(signed_manifest(&mut f, src, public_key)?.0)
}

impl VerifiedBundle {
    /// Read and check a bundle file against the provider's Ed25519 public key (32 bytes).
    pub fn open(path: &Path, public_key: &[u8]) -> Result<VerifiedBundle, BundleError> {
        VerifiedBundle::open_source(&BundleSource::file(path)?, public_key)
    }

    /// Read and check a bundle anywhere (a file, or a stretch of a device).
    pub fn open_source(
        src: &BundleSource,
        public_key: &[u8],
    ) -> Result<VerifiedBundle, BundleError> {
        let mut f = File::open(&src.path)?;
        let (manifest, len) = signed_manifest(&mut f, src, public_key)?;
        let header = 12 + u64::from(len) + SIGNATURE_LEN as u64;
        let total = manifest
            .parts
            .iter()
            .try_fold(header, |acc, p| acc.checked_add(p.size))
            .ok_or_else(|| BundleError::Manifest("part sizes overflow".into()))?;
        if total > src.len {
            return Err(BundleError::Part {
                name: "bundle".into(),
                problem: format!("the parts need {total} bytes, the bundle has {}", src.len),
            });
        }
        if total < src.len {
            return Err(BundleError::Trailing(src.len - total));
        }
        let mut offset = src.offset + header;
        let mut offsets = Vec::new();
        let mut buf = vec![0u8; 1 << 20];
        for part in &manifest.parts {
            offsets.push(offset);
            let mut ctx = Context::new(&SHA256);
            let mut left = part.size;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                f.read_exact(&mut buf[..n]).map_err(|e| BundleError::Part {
                    name: part.name.clone(),
                    problem: format!("shorter than its size {}: {e}", part.size),
                })?;
                ctx.update(&buf[..n]);
                left -= n as u64;
            }
            if hex::encode(ctx.finish()) != part.sha256 {
                return Err(BundleError::Part {
                    name: part.name.clone(),
                    problem: "SHA-256 does not match the signed manifest".into(),
                });
            }
            offset += part.size;
        }
        Ok(VerifiedBundle {
            path: src.path.clone(),
            manifest,
            offsets,
        })
    }

    /// Copy one part's bytes to `out`, checking its digest again on the way: the file could have
    /// changed since [`VerifiedBundle::open`]. `out` must be thrown away on error.
    pub fn copy_part(&self, name: &str, out: &mut dyn Write) -> Result<u64, BundleError> {
        let i = self
            .manifest
            .parts
            .iter()
            .position(|p| p.name == name)
            .ok_or_else(|| BundleError::Manifest(format!("no part {name}")))?;
        let part = &self.manifest.parts[i];
        let mut f = File::open(&self.path)?;
        f.seek(SeekFrom::Start(self.offsets[i]))?;
        let mut ctx = Context::new(&SHA256);
        let mut buf = vec![0u8; 1 << 20];
        let mut left = part.size;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            f.read_exact(&mut buf[..n])?;
            ctx.update(&buf[..n]);
            out.write_all(&buf[..n])?;
            left -= n as u64;
        }
        if hex::encode(ctx.finish()) != part.sha256 {
            return Err(BundleError::Part {
                name: name.into(),
                problem: "changed after verification".into(),
            });
        }
        Ok(part.size)
    }
}

/// Write a bundle: `parts` are (name, file) in [`PART_NAMES`] order; `pkcs8` is the provider's
/// Ed25519 private key (PKCS#8 v2 DER, as `ring` generates it).
pub fn sign_bundle(
    version: &str,
    roothash: &str,
    parts: &[(&str, &Path)],
    pkcs8: &[u8],
    out: &Path,
) -> Result<Manifest, BundleError> {
    let key = Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|e| BundleError::Key(e.to_string()))?;
    let mut manifest = Manifest {
        version: version.into(),
        roothash: roothash.to_ascii_lowercase(),
        parts: Vec::new(),
    };
    for (name, path) in parts {
        let mut f = File::open(path)?;
        let mut ctx = Context::new(&SHA256);
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            ctx.update(&buf[..n]);
            size += n as u64;
        }
        manifest.parts.push(Part {
            name: (*name).into(),
            size,
            sha256: hex::encode(ctx.finish()),
        });
    }
    manifest.check()?;
    let manifest_bytes =
        serde_json::to_vec(&manifest).map_err(|e| BundleError::Manifest(e.to_string()))?;
    let mut signed = DOMAIN.to_vec();
    signed.extend_from_slice(&manifest_bytes);
    let sig = key.sign(&signed);
    let mut w = io::BufWriter::new(File::create(out)?);
    w.write_all(MAGIC)?;
    w.write_all(&(manifest_bytes.len() as u32).to_le_bytes())?;
    w.write_all(&manifest_bytes)?;
    w.write_all(sig.as_ref())?;
    for (_, path) in parts {
        io::copy(&mut File::open(path)?, &mut w)?;
    }
    w.flush()?;
    Ok(manifest)
}

/// The provider's public key as the image stores it: 64 hex digits (one line).
pub fn public_key_from_hex(text: &str) -> Result<Vec<u8>, BundleError> {
    let key = hex::decode(text.trim()).map_err(|e| BundleError::Key(e.to_string()))?;
    if key.len() != 32 {
        return Err(BundleError::Key(format!(
            "an Ed25519 public key is 32 bytes, found {}",
            key.len()
        )));
    }
    Ok(key)
}

pub fn public_key_to_hex(key: &[u8]) -> String {
    format!("{}\n", hex::encode(key))
}

/// A new provider key pair: (PKCS#8 private key, 32-byte public key).
pub fn generate_key() -> Result<(Vec<u8>, Vec<u8>), BundleError> {
    use ring::signature::KeyPair;
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 =
        Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| BundleError::Key(e.to_string()))?;
    let pair =
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|e| BundleError::Key(e.to_string()))?;
    Ok((pkcs8.as_ref().to_vec(), pair.public_key().as_ref().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    fn fixture(dir: &Path) -> (Vec<u8>, Vec<u8>, PathBuf) {
        let (sk, pk) = generate_key().unwrap();
        for (name, len) in [("root", 300_000usize), ("verity", 4096), ("uki", 1000)] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + name.len()) as u8).collect();
            std::fs::write(dir.join(name), bytes).unwrap();
        }
        let out = dir.join("bundle");
        let parts: Vec<(&str, PathBuf)> = PART_NAMES.iter().map(|n| (*n, dir.join(n))).collect();
        let parts: Vec<(&str, &Path)> = parts.iter().map(|(n, p)| (*n, p.as_path())).collect();
        sign_bundle("1.2.3", HASH, &parts, &sk, &out).unwrap();
        (sk, pk, out)
    }

    #[test]
    fn a_signed_bundle_verifies_and_copies_its_parts() {
        let dir = tempfile::tempdir().unwrap();
        let (_, pk, out) = fixture(dir.path());
        let b = VerifiedBundle::open(&out, &pk).unwrap();
        assert_eq!(b.manifest.version, "1.2.3");
        let mut root = Vec::new();
        b.copy_part("root", &mut root).unwrap();
        assert_eq!(root, std::fs::read(dir.path().join("root")).unwrap());
    }

    #[test]
    fn another_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_, _, out) = fixture(dir.path());
        let (_, other) = generate_key().unwrap();
        assert!(matches!(
            VerifiedBundle::open(&out, &other),
            Err(BundleError::Signature)
        ));
    }

    #[test]
    fn any_flipped_byte_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_, pk, out) = fixture(dir.path());
        let good = std::fs::read(&out).unwrap();
        // In the manifest, in the signature, in each part.
        for at in [
            20,
            good.len() - 1 - 1000 - 4096 - 300_000 + 10,
            good.len() - 500,
            12 + 3,
        ] {
            let mut bad = good.clone();
            bad[at] ^= 0x01;
            std::fs::write(&out, &bad).unwrap();
            assert!(
                VerifiedBundle::open(&out, &pk).is_err(),
                "flip at {at} accepted"
            );
        }
    }

    #[test]
    fn truncation_and_trailing_bytes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_, pk, out) = fixture(dir.path());
        let good = std::fs::read(&out).unwrap();
        std::fs::write(&out, &good[..good.len() - 1]).unwrap();
        assert!(VerifiedBundle::open(&out, &pk).is_err());
        let mut long = good.clone();
        long.push(0);
        std::fs::write(&out, &long).unwrap();
        assert!(matches!(
            VerifiedBundle::open(&out, &pk),
            Err(BundleError::Trailing(1))
        ));
        std::fs::write(&out, b"not a bundle at all").unwrap();
        assert!(VerifiedBundle::open(&out, &pk).is_err());
    }
}
