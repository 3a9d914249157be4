//! Issued certificates: what the configuration server records for each client certificate it
//! issued (the [`Principal`] it stands for, when, and whether it was revoked), revocation and
//! renewal (`docs/api.md`, "Revocation and renewal").
//!
//! A certificate opens the API only while its record says it is not revoked; a revoked
//! certificate is refused on its next request, whatever its expiry. Renewal trades a valid
//! certificate for a fresh one for the same principal, without a token; the old one is revoked
//! as soon as the new one is first used (so a client that lost the answer keeps working).

use crate::security::Principal;
use crate::validate::{self, Invalid};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One client certificate the configuration server issued (`GET /v1/certificates`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct IssuedCertificate {
    /// SHA-256 of the certificate's DER, hex: how it is recorded and named.
    #[serde(default)]
    pub sha256: String,
    /// Who it stands for.
    #[serde(flatten)]
    pub principal: Principal,
    /// When it was issued and until when it is valid (absent: issued by a version that did not
    /// record it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_unix: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_unix: Option<u64>,
    /// The certificate this one was renewed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewed_from: Option<String>,
    /// Set while the certificate it was renewed from is still valid: that one is revoked when
    /// this one is first used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<Revocation>,
}

impl IssuedCertificate {
    /// Whether it still opens the API (expiry is checked by TLS).
    pub fn valid(&self) -> bool {
        self.revoked.is_none()
    }
}

/// When and why a certificate was revoked, and by whom.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Revocation {
    pub at_unix: u64,
    /// The principal that revoked it (or `renewal` when a renewed certificate replaced it).
    pub by: String,
    pub reason: String,
}

/// `POST /v1/certificates/revoke`: one certificate by its SHA-256 (or a unique prefix of at
/// least 8 hex digits), or every valid certificate of an identity by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The identity's name: every valid certificate it holds (its renewals included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// With `name`: the identity's tenant. Defaults to the caller's own tenant; a provider
    /// admin names it for a tenant's identity (none: a provider-scope identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Why, for the audit log and the refusal the holder sees.
    #[serde(default)]
    pub reason: String,
}

/// Shortest SHA-256 prefix a revocation takes: short enough to type, long enough not to
/// collide by accident (and a collision is refused, not guessed).
pub const SHA256_PREFIX_MIN: usize = 8;

impl RevokeRequest {
    pub fn validate(&self) -> Result<(), Invalid> {
        match (&self.sha256, &self.name) {
            (Some(h), None) => {
                if h.len() < SHA256_PREFIX_MIN
                    || h.len() > 64
                    || !h.bytes().all(|b| b.is_ascii_hexdigit())
                {
                    return Err(Invalid::new(
                        "sha256",
                        format!(
                            "must be {SHA256_PREFIX_MIN} to 64 hex digits of the certificate's SHA-256"
                        ),
                    ));
                }
            }
            (None, Some(n)) => validate::name("name", n)?,
            _ => {
                return Err(Invalid::new(
                    "sha256",
                    "give either sha256 (one certificate) or name (an identity's certificates)",
                ))
            }
        }
        if let Some(t) = &self.tenant {
            if self.name.is_none() {
                return Err(Invalid::new("tenant", "goes with name, not with sha256"));
            }
            validate::name("tenant", t)?;
        }
        validate::text("reason", &self.reason)
    }
}

/// `POST /v1/self/renew`: a fresh certificate for the caller's own principal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// A PKCS#10 request for the new key, so that it never leaves the holder. Without one, the
    /// server makes the key and returns it once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csr_pem: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Role;

    #[test]
    fn old_records_decode_and_requests_validate() {
        // What versions before revocation stored: the principal alone.
        let old = r#"{"name":"alice","role":"viewer","tenant":"acme"}"#;
        let c: IssuedCertificate = serde_json::from_str(old).unwrap();
        assert_eq!(c.principal.role, Role::Viewer);
        assert!(c.valid() && c.issued_unix.is_none());

        let ok = RevokeRequest {
            sha256: Some("0123abcd".into()),
            ..Default::default()
        };
        ok.validate().unwrap();
        for bad in [
            RevokeRequest::default(),
            RevokeRequest {
                sha256: Some("0123abc".into()),
                ..Default::default()
            },
            RevokeRequest {
                sha256: Some("0123abcd".into()),
                name: Some("alice".into()),
                ..Default::default()
            },
            RevokeRequest {
                sha256: Some("0123abcd".into()),
                tenant: Some("acme".into()),
                ..Default::default()
            },
            RevokeRequest {
                name: Some("Alice".into()),
                ..Default::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
