//! Appliance updates: a signed bundle is checked completely before one byte is written, then
//! written to the inactive root slot, and booted once with a boot counter so that a slot that
//! does not come up healthy falls back to the old one by itself.
//!
//! - [`bundle`]: the bundle format (manifest + Ed25519 signature + parts), signing and
//!   verification with `ring`. No I/O policy: it reads what it is given.
//! - [`media`]: update media (an ISO 9660 CD/DVD image or stick), read in user space, and
//!   the bundles on it.
//! - [`slots`]: which slot is running (from the kernel command line's `roothash=`), where the
//!   inactive one lives (GPT partition labels), and the installation steps.
//! - [`entries`]: the boot entries on the ESP (boot counters, the UKIs' versions).
//! - [`offer`]: whether an offered bundle is an update, the running image, a downgrade, or
//!   installed before; [`version`] compares versions as systemd-boot does.
//! - [`record`]: the record of installs on this appliance.
//!
//! The bundle format is described byte by byte in [`bundle`]'s module documentation.

pub mod bundle;
pub mod entries;
pub mod media;
pub mod offer;
pub mod record;
pub mod slots;
pub mod version;

pub use bundle::{sign_bundle, BundleError, BundleSource, Manifest, Part, VerifiedBundle};
pub use media::{MediaError, MediaFile};
pub use offer::{Running, Verdict};
pub use record::{Install, InstalledRecord};
pub use slots::{InstallError, Slot, SlotLayout, DEFAULT_TRIES};
