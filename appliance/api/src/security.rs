//! Identities, roles, the permission rules, and enrollment.
//!
//! An identity is a certificate issued by the appliance CA. The server records, per certificate,
//! the [`Principal`] it stands for; the permission rules below are pure functions of that
//! principal, the action and the tenant the action touches.

use crate::inventory::ApplianceRole;
use crate::validate::{self, Invalid};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Reads everything in its scope, changes nothing.
    Viewer,
    /// Runs test and real failovers (jobs); may not change configuration or policy.
    Operator,
    /// Manages the configuration of one tenant.
    TenantAdmin,
    /// The service provider: every tenant, tenants themselves, enrollment of anything.
    ProviderAdmin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::TenantAdmin => "tenant-admin",
            Role::ProviderAdmin => "provider-admin",
        }
    }
}

/// Who a client certificate stands for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Principal {
    /// The identity's name (the certificate's common name).
    pub name: String,
    pub role: Role,
    /// The one tenant the identity belongs to; none means provider scope (every tenant).
    pub tenant: Option<String>,
    /// Set when the identity is an appliance rather than a person.
    #[serde(default)]
    pub appliance: Option<ApplianceRole>,
}

/// What a request wants to do; each endpoint names exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Read,
    /// Jobs: test failover, failover, cleanup (later slices).
    Operate,
    /// Change configuration inside a tenant: sites, machines, disks, policies, plans.
    Configure,
    /// Create, change or delete tenants.
    ManageTenants,
    ReadAudit,
    /// Issue an enrollment token for a principal with this role.
    Enroll(Role),
    /// List the identities and certificates the server issued (in the caller's scope).
    ListIdentities,
    /// Revoke a certificate of an identity with this role.
    Revoke(Role),
    /// Report what an appliance observes (disk state, RPO).
    Report,
    /// Manage the appliance itself: its network, password, maintenance (the local console).
    System,
    /// Set commands the appliance itself runs (a plan's hooks and start commands): they run
    /// with the configuration server's rights on a host every tenant shares.
    SetCommands,
}

/// Why a principal may not do something, in words for the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{who} belongs to tenant {own}, not to tenant {target}")]
    OtherTenant {
        who: String,
        own: String,
        target: String,
    },
    #[error("{who} is a {role}, which may not {what}")]
    Role {
        who: String,
        role: &'static str,
        what: &'static str,
    },
}

impl Principal {
    /// The rule every endpoint applies before touching state. `tenant` is the tenant the action
    /// touches, if it touches exactly one; listings across tenants pass none and filter.
    pub fn may(&self, action: Action, tenant: Option<&str>) -> Result<(), Refusal> {
        if let (Some(own), Some(target)) = (self.tenant.as_deref(), tenant) {
            if own != target {
                return Err(Refusal::OtherTenant {
                    who: self.name.clone(),
                    own: own.into(),
                    target: target.into(),
                });
            }
        }
        let (allowed, what) = match action {
            Action::Read => (true, "read"),
            Action::Operate => (self.role >= Role::Operator, "run jobs"),
            Action::Configure => (self.role >= Role::TenantAdmin, "change configuration"),
            Action::ManageTenants => (self.role == Role::ProviderAdmin, "manage tenants"),
            Action::ReadAudit => (self.role >= Role::TenantAdmin, "read the audit log"),
            Action::SetCommands => (
                self.role == Role::ProviderAdmin,
                "set commands the appliance runs (plan hooks and start commands)",
            ),
            // Observations come from the appliances that make them, never from people (a
            // provider admin may correct one).
            Action::Report => (
                self.appliance.is_some() || self.role == Role::ProviderAdmin,
                "report disk state (appliances only)",
            ),
            Action::System => (
                self.role == Role::ProviderAdmin && self.appliance.is_none(),
                "manage the appliance itself (network, maintenance)",
            ),
            // Nobody hands out more than they hold; a tenant's admin enrolls only inside it.
            Action::Enroll(r) => (
                self.manages(r, tenant),
                "issue an enrollment token for that role",
            ),
            // Who may issue an identity may take it back, and nobody else.
            Action::Revoke(r) => (self.manages(r, tenant), "revoke a certificate of that role"),
            Action::ListIdentities => (
                self.role >= Role::TenantAdmin,
                "list identities and their certificates",
            ),
        };
        if allowed {
            Ok(())
        } else {
            Err(Refusal::Role {
                who: self.name.clone(),
                role: self.role.as_str(),
                what,
            })
        }
    }

    /// Whether the principal administers identities of role `r` in `tenant` (none: provider
    /// scope): an administrator, up to its own role, inside its own tenant.
    fn manages(&self, r: Role, tenant: Option<&str>) -> bool {
        self.role >= Role::TenantAdmin
            && r <= self.role
            && (tenant.is_some() || self.tenant.is_none())
    }

    /// Whether the principal may see objects of `tenant` at all (used to filter listings).
    pub fn sees(&self, tenant: &str) -> bool {
        self.tenant.as_deref().is_none_or(|t| t == tenant)
    }
}

/// Longest life of an enrollment token: a week. Tokens are for bootstrapping, not credentials.
pub const TOKEN_TTL_MAX: u64 = 7 * 86_400;

/// An administrator asks for a one-time enrollment token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// The name the enrolled identity will have.
    pub name: String,
    pub role: Role,
    pub tenant: Option<String>,
    #[serde(default)]
    pub appliance: Option<ApplianceRole>,
    pub ttl_secs: u64,
}

impl CreateToken {
    pub fn validate(&self) -> Result<(), Invalid> {
        validate::name("name", &self.name)?;
        if let Some(t) = &self.tenant {
            validate::name("tenant", t)?;
        }
        match (self.role, &self.tenant) {
            (Role::ProviderAdmin, Some(_)) => Err(Invalid::new(
                "tenant",
                "a provider-admin belongs to no tenant",
            )),
            (Role::TenantAdmin, None) => {
                Err(Invalid::new("tenant", "a tenant-admin needs a tenant"))
            }
            _ => validate::range("ttl_secs", self.ttl_secs, 1, TOKEN_TTL_MAX),
        }
    }
}

/// The token, shown once. `token` is `ID.SECRET`; the server keeps only a hash of the secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TokenCreated {
    pub id: String,
    pub token: String,
    pub expires_unix: u64,
    /// The CA the enrolling party should trust, and its SHA-256 (DER, hex) to check it by.
    pub ca_cert_pem: String,
    pub ca_sha256: String,
}

/// Sent once by the enrolling party, without a client certificate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub token: String,
    /// A PKCS#10 request, so that the private key never leaves the enrolling party. Without
    /// one, the server generates the key and returns it (once).
    #[serde(default)]
    pub csr_pem: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Enrolled {
    pub principal: Principal,
    pub certificate_pem: String,
    pub private_key_pem: Option<String>,
    pub ca_cert_pem: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(role: Role, tenant: Option<&str>) -> Principal {
        Principal {
            name: "x".into(),
            role,
            tenant: tenant.map(Into::into),
            appliance: None,
        }
    }

    #[test]
    fn roles_and_tenants() {
        let viewer = p(Role::Viewer, Some("acme"));
        viewer.may(Action::Read, Some("acme")).unwrap();
        assert!(viewer.may(Action::Configure, Some("acme")).is_err());
        assert!(matches!(
            viewer.may(Action::Read, Some("globex")),
            Err(Refusal::OtherTenant { .. })
        ));
        let op = p(Role::Operator, Some("acme"));
        op.may(Action::Operate, Some("acme")).unwrap();
        assert!(op.may(Action::Configure, Some("acme")).is_err());
        assert!(p(Role::TenantAdmin, Some("acme"))
            .may(Action::SetCommands, Some("acme"))
            .is_err());
        p(Role::ProviderAdmin, None)
            .may(Action::SetCommands, Some("acme"))
            .unwrap();
        let ta = p(Role::TenantAdmin, Some("acme"));
        ta.may(Action::Configure, Some("acme")).unwrap();
        assert!(ta.may(Action::ManageTenants, None).is_err());
        ta.may(Action::Enroll(Role::Viewer), Some("acme")).unwrap();
        assert!(ta.may(Action::Enroll(Role::ProviderAdmin), None).is_err());
        assert!(ta.may(Action::Enroll(Role::Viewer), None).is_err());
        ta.may(Action::Revoke(Role::Operator), Some("acme"))
            .unwrap();
        assert!(ta
            .may(Action::Revoke(Role::Operator), Some("globex"))
            .is_err());
        assert!(ta.may(Action::Revoke(Role::Viewer), None).is_err());
        assert!(op.may(Action::Revoke(Role::Viewer), Some("acme")).is_err());
        assert!(viewer.may(Action::ListIdentities, Some("acme")).is_err());
        assert!(op.may(Action::Report, Some("acme")).is_err());
        let ps = Principal {
            appliance: Some(ApplianceRole::ProcessServer),
            ..op.clone()
        };
        ps.may(Action::Report, Some("acme")).unwrap();
        assert!(ps.may(Action::Report, Some("globex")).is_err());
        let pa = p(Role::ProviderAdmin, None);
        pa.may(Action::ManageTenants, None).unwrap();
        pa.may(Action::Configure, Some("globex")).unwrap();
        assert!(pa.sees("anything") && ta.sees("acme") && !ta.sees("globex"));
    }

    #[test]
    fn token_requests() {
        let mut t = CreateToken {
            name: "ps1".into(),
            role: Role::Operator,
            tenant: Some("acme".into()),
            appliance: Some(ApplianceRole::ProcessServer),
            ttl_secs: 600,
        };
        t.validate().unwrap();
        t.ttl_secs = 0;
        assert_eq!(t.validate().unwrap_err().field, "ttl_secs");
        t.ttl_secs = 60;
        t.role = Role::ProviderAdmin;
        assert_eq!(t.validate().unwrap_err().field, "tenant");
    }
}
