//! The appliance certificate authority as the configuration server uses it: the CA files are
//! ferry-pki's (one PKI directory per appliance, the one the replication link uses too); this
//! module issues client certificates that name a principal.
//!
//! A client certificate's subject carries the principal for humans and other tools
//! (CN = name, OU = role, O = tenant or `provider`), but the server does not trust the subject:
//! it records each certificate it issues by SHA-256 and authorizes by that record. So a
//! certificate is revoked by marking its record (`crate::identities`), and nothing depends on
//! parsing X.509.

use ferry_api::Principal;
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use ring::rand::SecureRandom;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(transparent)]
    Pki(#[from] ferry_pki::PkiError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: not a PEM certificate")]
    Pem(PathBuf),
    #[error("the certificate signing request was refused: {0}")]
    Csr(rcgen::Error),
    #[error("issuing a certificate failed: {0}")]
    Issue(#[from] rcgen::Error),
    #[error("no randomness from the system")]
    Random,
}

/// Client certificates live a year; enrollment again replaces one.
const CLIENT_CERT_DAYS: i64 = 365;

pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
    ca_sha256: String,
    server_tls: Arc<rustls::ServerConfig>,
    /// How long appliances' certificates live, when not [`CLIENT_CERT_DAYS`] (tests).
    appliance_validity: Option<time::Duration>,
}

/// Hex SHA-256 of a DER certificate: how certificates are recorded and pinned.
pub fn fingerprint(der: &[u8]) -> String {
    ferry_pki::sha256_hex(der)
}

/// The fingerprint of the first certificate in a PEM text.
pub fn pem_fingerprint(pem: &str) -> Option<String> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .ok()
        .map(|d| fingerprint(&d))
}

/// When the first certificate in a PEM text starts and stops being valid (Unix seconds).
pub fn pem_validity(pem: &str) -> Option<(u64, u64)> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let v = cert.validity();
    Some((
        u64::try_from(v.not_before.timestamp()).ok()?,
        u64::try_from(v.not_after.timestamp()).ok()?,
    ))
}

pub struct Issued {
    pub certificate_pem: String,
    pub private_key_pem: Option<String>,
    pub sha256: String,
    pub issued_unix: u64,
    pub expires_unix: u64,
}

impl Authority {
    /// Open the PKI in `dir`, creating it (with `server_names` on the server certificate) when
    /// there is none. Returns whether it was created.
    pub fn open_or_create(
        dir: &Path,
        server_names: &[String],
    ) -> Result<(Authority, bool), CaError> {
        let ca_path = dir.join("ca-cert.pem");
        let created = !ca_path.exists();
        if created {
            ferry_pki::init(dir, server_names)?;
        }
        let ca_pem = std::fs::read_to_string(&ca_path).map_err(|source| CaError::Io {
            path: ca_path.clone(),
            source,
        })?;
        let der =
            CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(|_| CaError::Pem(ca_path))?;
        Ok((
            Authority {
                issuer: ferry_pki::ca_issuer(dir)?,
                ca_sha256: fingerprint(&der),
                ca_pem,
                server_tls: ferry_pki::server_config_client_optional(dir)?,
                appliance_validity: None,
            },
            created,
        ))
    }

    /// Issue appliances' certificates (enrollment and renewal) for `v` rather than a year:
    /// for tests of the roles' own renewal.
    pub fn set_appliance_validity(&mut self, v: std::time::Duration) {
        self.appliance_validity = Some(time::Duration::seconds(
            i64::try_from(v.as_secs()).unwrap_or(i64::MAX).max(1),
        ));
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    pub fn ca_sha256(&self) -> &str {
        &self.ca_sha256
    }

    pub fn server_tls(&self) -> Arc<rustls::ServerConfig> {
        self.server_tls.clone()
    }

    /// Issue a client certificate for `p`. With a CSR, only its (signature-checked) public key
    /// is used: everything else in the certificate is decided here, so a request cannot ask
    /// for a CA certificate, another name or a longer life.
    pub fn issue(&self, p: &Principal, csr_pem: Option<&str>) -> Result<Issued, CaError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, p.name.as_str());
        dn.push(DnType::OrganizationalUnitName, p.role.as_str());
        dn.push(
            DnType::OrganizationName,
            p.tenant.as_deref().unwrap_or("provider"),
        );
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let mut serial = [0u8; 16];
        ring::rand::SystemRandom::new()
            .fill(&mut serial)
            .map_err(|_| CaError::Random)?;
        serial[0] &= 0x7f; // a positive INTEGER
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let now = time::OffsetDateTime::now_utc();
        let validity = match (p.appliance, self.appliance_validity) {
            (Some(_), Some(v)) => v,
            _ => time::Duration::days(CLIENT_CERT_DAYS),
        };
        // A little slack for clocks that run behind ours (a tenth of a short life at most, so
        // that the share of the life left, which roles renew by, stays meaningful).
        params.not_before = now - std::cmp::min(validity / 10_i32, time::Duration::minutes(5));
        params.not_after = now + validity;

        let (cert, key_pem) = match csr_pem {
            Some(pem) => {
                let csr = CertificateSigningRequestParams::from_pem(pem).map_err(CaError::Csr)?;
                (params.signed_by(&csr.public_key, &self.issuer)?, None)
            }
            None => {
                let key = KeyPair::generate()?;
                (
                    params.signed_by(&key, &self.issuer)?,
                    Some(key.serialize_pem()),
                )
            }
        };
        Ok(Issued {
            sha256: fingerprint(cert.der()),
            certificate_pem: cert.pem(),
            private_key_pem: key_pem,
            issued_unix: u64::try_from(now.unix_timestamp()).unwrap_or(0),
            expires_unix: u64::try_from(params.not_after.unix_timestamp()).unwrap_or(0),
        })
    }
}

/// For the enrolling side: a new key and a certificate request carrying it, so that the key
/// never leaves the machine it was made on. Returns (key PEM, CSR PEM).
pub fn key_and_csr(name: &str) -> Result<(String, String), CaError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    let csr = params.serialize_request(&key)?.pem()?;
    Ok((key.serialize_pem(), csr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_api::Role;

    #[test]
    fn issues_from_csr_and_without() {
        let d = tempfile::tempdir().unwrap();
        let (ca, created) = Authority::open_or_create(d.path(), &[]).unwrap();
        assert!(created);
        let (_, created) = Authority::open_or_create(d.path(), &[]).unwrap();
        assert!(!created);
        let p = Principal {
            name: "ps1".into(),
            role: Role::Operator,
            tenant: Some("acme".into()),
            appliance: None,
        };
        let a = ca.issue(&p, None).unwrap();
        assert!(a.private_key_pem.is_some());
        let (_, csr) = key_and_csr("ps1").unwrap();
        let b = ca.issue(&p, Some(&csr)).unwrap();
        assert!(b.private_key_pem.is_none());
        assert_ne!(a.sha256, b.sha256);
        let (from, until) = pem_validity(&b.certificate_pem).unwrap();
        assert_eq!(until, b.expires_unix);
        assert_eq!(until - from, 365 * 86400 + 300);
        // Appliances' certificates can be made short-lived (tests of their renewal).
        let mut ca = ca;
        ca.set_appliance_validity(std::time::Duration::from_secs(20));
        let mt = Principal {
            appliance: Some(ferry_api::ApplianceRole::MasterTarget),
            ..p.clone()
        };
        let (from, until) = pem_validity(&ca.issue(&mt, None).unwrap().certificate_pem).unwrap();
        assert_eq!(until - from, 22);
        let (from, until) = pem_validity(&ca.issue(&p, None).unwrap().certificate_pem).unwrap();
        assert_eq!(until - from, 365 * 86400 + 300);
        assert!(matches!(
            ca.issue(&p, Some("not a csr")),
            Err(CaError::Csr(_))
        ));
    }
}
