//! The `ferry` program's library half: argument helpers and the lab that the demo and the
//! end-to-end tests use to run the roles as real processes next to a real qemu-storage-daemon.

pub mod lab;

use anyhow::{bail, Context};
use std::path::Path;

/// Parse a size such as `64M`, `20G`, `4096`, `512K` (binary units).
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        Some('T' | 't') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let n: u64 = num.parse().with_context(|| {
        format!("bad size {s:?}: expected a number with an optional K, M, G or T")
    })?;
    match n.checked_mul(mult) {
        Some(v) if v > 0 => Ok(v),
        _ => bail!("bad size {s:?}: must be above zero and below 16 EiB"),
    }
}

/// Read a tenant key file (64 hex digits).
pub fn load_key(path: &Path) -> anyhow::Result<ferry_chunk::TenantKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the tenant key {}", path.display()))?;
    ferry_chunk::TenantKey::from_hex(&text)
        .with_context(|| format!("tenant key {} is not valid", path.display()))
}

/// Write a new tenant key file, readable only by its owner; refuses to overwrite one.
pub fn write_new_key(path: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create the key file {}", path.display()))?;
    writeln!(f, "{}", ferry_chunk::TenantKey::generate_hex())?;
    f.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1t").unwrap(), 1 << 40);
        assert!(parse_size("0").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
