//! The configuration server's API model: every request and response body, shared by the server,
//! the `ferry ctl` client and the console, so that all of them speak one typed language.
//!
//! This crate does no I/O. It also holds the validation rules ([`Object::validate`],
//! [`validate::name`]) and the permission rules ([`Principal::may`]) so that every front end
//! refuses the same bad input and the same forbidden action in the same words.
//!
//! Names are the identifiers: a tenant, a site or a machine is addressed by its name, which is a
//! DNS-label-like string (see [`validate::name`]). Objects below a tenant live under
//! `/v1/tenants/{tenant}/...` so that the tenant of every object is visible in its path.
//! Times are Unix seconds (`*_unix`).

pub mod identities;
pub mod inventory;
pub mod jobs;
pub mod orders;
pub mod plan;
pub mod policy;
pub mod records;
pub mod roles;
pub mod security;
pub mod system;
pub mod validate;

pub use identities::*;
pub use inventory::*;
pub use jobs::*;
pub use orders::*;
pub use plan::*;
pub use policy::*;
pub use records::*;
pub use roles::*;
pub use security::*;
pub use system::{
    ActionDone, AddressMode, CacheUse, Check, Cidr, Dashboard, Diagnostics, DiskStatus, LoggedIn,
    Login, Logs, Maintenance, MaintenanceAction, NetworkConfig, NetworkPlan, NetworkState,
    PendingNetwork, Registered, Registration, SetPassword, Settings, SetupStatus, SupportBundle,
    UpdateSlot,
};
pub use validate::Invalid;

use schemars::JsonSchema;
use serde::{de::DeserializeOwned, Serialize};

/// A named configuration object kept by the configuration server.
pub trait Object:
    Serialize + DeserializeOwned + JsonSchema + Clone + Send + Sync + 'static
{
    /// The kind's name in errors, audit entries and URLs (plural), e.g. `machines`.
    const KIND: &'static str;
    /// The object's own name (the last path segment of its URL).
    fn name(&self) -> &str;
    /// Check every field; the server stores only objects that pass.
    fn validate(&self) -> Result<(), Invalid>;
}
