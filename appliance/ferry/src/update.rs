//! `ferry update`: apply a signed update bundle to the inactive root slot, and the provider-side
//! tools that make bundles (key generation, signing). The logic lives in the `ferry-update` crate.

use anyhow::Context;
use clap::{Args, Subcommand};
use ferry_update::{bundle, slots, VerifiedBundle};
use std::path::{Path, PathBuf};

/// Where the image keeps the provider's update-signing public key (32 raw bytes, hex-encoded).
const BUILT_IN_KEY: &str = "/usr/lib/ferry/update-key.pub";

#[derive(Args)]
pub struct UpdateArgs {
    #[command(subcommand)]
    cmd: UpdateCmd,
}

#[derive(Subcommand)]
enum UpdateCmd {
    /// Verify a bundle and write it to the inactive slot; it boots next, with three tries.
    Apply {
        bundle: PathBuf,
        /// The provider's public key (hex); the image's built-in key by default.
        #[arg(long, default_value = BUILT_IN_KEY)]
        key: PathBuf,
        /// Only verify the bundle and show where it would go.
        #[arg(long)]
        dry_run: bool,
    },
    /// Verify a bundle's signature and digests without writing anything.
    Verify {
        bundle: PathBuf,
        #[arg(long, default_value = BUILT_IN_KEY)]
        key: PathBuf,
    },
    /// Provider side: make an Ed25519 signing key pair (PKCS#8 private key, hex public key).
    Keygen {
        #[arg(long)]
        private: PathBuf,
        #[arg(long)]
        public: PathBuf,
    },
    /// Provider side: sign an image build's root, verity and UKI into a bundle.
    Sign {
        #[arg(long)]
        private: PathBuf,
        #[arg(long)]
        version: String,
        #[arg(long)]
        roothash: String,
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        verity: PathBuf,
        #[arg(long)]
        uki: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

fn public_key(path: &Path) -> anyhow::Result<Vec<u8>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the update key {}", path.display()))?;
    Ok(bundle::public_key_from_hex(&text)?)
}

fn verify(path: &Path, key: &Path) -> anyhow::Result<VerifiedBundle> {
    VerifiedBundle::open(path, &public_key(key)?)
        .with_context(|| format!("refusing {}", path.display()))
}

pub fn run(a: UpdateArgs) -> anyhow::Result<()> {
    match a.cmd {
        UpdateCmd::Verify { bundle, key } => {
            let b = verify(&bundle, &key)?;
            println!(
                "{}: signed by the provider key, version {}, root hash {}",
                bundle.display(),
                b.manifest.version,
                b.manifest.roothash
            );
        }
        UpdateCmd::Apply {
            bundle,
            key,
            dry_run,
        } => {
            // The signature and every digest are checked before anything else happens.
            let b = verify(&bundle, &key)?;
            let cmdline = std::fs::read_to_string("/proc/cmdline")?;
            let layout = slots::SlotLayout::discover(&cmdline, Path::new("/dev/disk"))?;
            let target = layout.inactive();
            println!(
                "running slot {}, installing version {} into slot {}",
                layout.active.letter(),
                b.manifest.version,
                target.letter()
            );
            if dry_run {
                return Ok(());
            }
            let esp = std::fs::canonicalize("/dev/disk/by-partlabel/ferry-esp")
                .context("finding the ESP")?;
            let entry = slots::install(&b, &layout, &esp)?;
            println!(
                "installed; boot entry {} is tried next (3 tries, then slot {} again)",
                entry.display(),
                layout.active.letter()
            );
        }
        UpdateCmd::Keygen { private, public } => {
            let (sk, pk) = bundle::generate_key()?;
            std::fs::write(&private, sk)
                .with_context(|| format!("writing {}", private.display()))?;
            std::fs::write(&public, bundle::public_key_to_hex(&pk))
                .with_context(|| format!("writing {}", public.display()))?;
        }
        UpdateCmd::Sign {
            private,
            version,
            roothash,
            root,
            verity,
            uki,
            out,
        } => {
            let sk = std::fs::read(&private)
                .with_context(|| format!("reading {}", private.display()))?;
            let parts = [
                ("root", root.as_path()),
                ("verity", verity.as_path()),
                ("uki", uki.as_path()),
            ];
            let m = bundle::sign_bundle(&version, &roothash, &parts, &sk, &out)?;
            println!(
                "{}: version {}, root hash {}",
                out.display(),
                m.version,
                m.roothash
            );
        }
    }
    Ok(())
}
