//! Certificates and TLS configurations for Ferry's links.
//!
//! Two links use TLS: QEMU → process server (NBD with `OPT_STARTTLS`, QEMU's `tls-creds-x509`)
//! and process server → master target (replication, mutual TLS). One PKI directory serves both and
//! uses QEMU's own file names, so QEMU can be pointed at it with `tls-creds-x509,dir=...`:
//!
//! | file | what |
//! | --- | --- |
//! | `ca-cert.pem` | the site CA every peer trusts |
//! | `ca-key.pem` | the CA's key (kept only where certificates are issued) |
//! | `server-cert.pem`, `server-key.pem` | server identity (NBD server, master target) |
//! | `client-cert.pem`, `client-key.pem` | client identity (QEMU, process server) |
//!
//! Keys are ECDSA P-256; rustls uses the ring provider throughout.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no usable PEM item ({what})")]
    Pem { path: PathBuf, what: &'static str },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(String),
    #[error("{0} already exists; refusing to overwrite a PKI")]
    Exists(PathBuf),
}

/// The names a server certificate is always valid for, besides the ones asked for.
const LOCAL_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Create a new CA and a server and a client certificate in `dir`.
/// `server_names` are extra DNS names or IP addresses for the server certificate.
pub fn init(dir: &Path, server_names: &[String]) -> Result<(), PkiError> {
    let ca_path = dir.join("ca-cert.pem");
    if ca_path.exists() {
        return Err(PkiError::Exists(ca_path));
    }
    fs::create_dir_all(dir).map_err(|e| io(dir, e))?;

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name = name("Ferry site CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let mut names: Vec<String> = LOCAL_NAMES.iter().map(|s| s.to_string()).collect();
    names.extend(server_names.iter().cloned());
    let server_key = KeyPair::generate()?;
    let mut server_params = CertificateParams::new(names)?;
    server_params.distinguished_name = name("Ferry server");
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server_params.signed_by(&server_key, &issuer)?;

    let client_key = KeyPair::generate()?;
    let mut client_params = CertificateParams::new(vec!["ferry-client".to_string()])?;
    client_params.distinguished_name = name("Ferry client");
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = client_params.signed_by(&client_key, &issuer)?;

    write(dir, "ca-key.pem", &issuer.key().serialize_pem(), true)?;
    write(dir, "server-cert.pem", &server_cert.pem(), false)?;
    write(dir, "server-key.pem", &server_key.serialize_pem(), true)?;
    write(dir, "client-cert.pem", &client_cert.pem(), false)?;
    write(dir, "client-key.pem", &client_key.serialize_pem(), true)?;
    // Written last: its presence means the PKI is complete.
    write(dir, "ca-cert.pem", &ca_cert.pem(), false)?;
    Ok(())
}

/// Issue a certificate from the CA kept in `dir` (its `ca-cert.pem` and `ca-key.pem`): with
/// `server`, a server certificate valid for `names` and the local names; otherwise a client
/// certificate named `names[0]`. Returns the certificate and its new key, PEM.
pub fn issue(dir: &Path, names: &[String], server: bool) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let cert = data_params(names, server)?.signed_by(&key, &ca_issuer(dir)?)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Like [`issue`], for the key of a certificate signing request: the role made its key and
/// keeps it, so the issuer never holds it. The request's signature is checked (it proves the
/// requester holds the key); its names and usages are ignored, ours are used. Returns the
/// certificate and the SHA-256 (hex) of the public key it certifies.
pub fn issue_for_request(
    dir: &Path,
    names: &[String],
    server: bool,
    csr_pem: &str,
) -> Result<(String, String), PkiError> {
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)?;
    let cert = data_params(names, server)?.signed_by(&csr.public_key, &ca_issuer(dir)?)?;
    Ok((cert.pem(), public_key_sha256(csr_pem)?))
}

/// SHA-256 (hex) of the public key a certificate signing request is for.
pub fn public_key_sha256(csr_pem: &str) -> Result<String, PkiError> {
    use rcgen::PublicKeyData;
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)?;
    Ok(sha256_hex(csr.public_key.der_bytes()))
}

/// A role's own data-link key at `path` (made on first use, readable by its owner only) and a
/// certificate signing request for it, PEM.
pub fn own_key_request(path: &Path) -> Result<(KeyPair, String), PkiError> {
    let key = match fs::read_to_string(path) {
        Ok(pem) => KeyPair::from_pem(&pem).map_err(|_| PkiError::Pem {
            path: path.to_path_buf(),
            what: "private key",
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = KeyPair::generate()?;
            let dir = path.parent().unwrap_or(Path::new("."));
            fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
            let file = path
                .file_name()
                .and_then(|f| f.to_str())
                .unwrap_or("data-key.pem");
            write(dir, file, &key.serialize_pem(), true)?;
            key
        }
        Err(e) => return Err(io(path, e)),
    };
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = name("ferry data link");
    let csr = params.serialize_request(&key)?.pem()?;
    Ok((key, csr))
}

/// Names and usages of a data-link certificate: a server's (the local names and `names`) or
/// a client's (`names[0]` as its name).
fn data_params(names: &[String], server: bool) -> Result<CertificateParams, PkiError> {
    if server {
        let mut all: Vec<String> = LOCAL_NAMES.iter().map(|s| s.to_string()).collect();
        all.extend(
            names
                .iter()
                .filter(|n| !LOCAL_NAMES.contains(&n.as_str()))
                .cloned(),
        );
        let mut params = CertificateParams::new(all)?;
        params.distinguished_name = name("Ferry server");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        Ok(params)
    } else {
        let cn = names.first().map(String::as_str).unwrap_or("ferry-client");
        let mut params = CertificateParams::new(vec![cn.to_string()])?;
        params.distinguished_name = name(cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        Ok(params)
    }
}

/// Write a PKI directory in the layout above from PEM texts (a role configured by the
/// configuration server): `files` are (file name, text) pairs; key files are written 0600 and
/// `ca-cert.pem`, which marks the directory complete, last.
pub fn write_files(dir: &Path, files: &[(&str, &str)]) -> Result<(), PkiError> {
    fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let mut ca = None;
    for (file, text) in files {
        if *file == "ca-cert.pem" {
            ca = Some(*text);
            continue;
        }
        write(dir, file, text, file.ends_with("-key.pem"))?;
    }
    if let Some(ca) = ca {
        write(dir, "ca-cert.pem", ca, false)?;
    }
    Ok(())
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, "Ferry");
    dn
}

fn io(path: &Path, source: std::io::Error) -> PkiError {
    PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write(dir: &Path, file: &str, text: &str, secret: bool) -> Result<(), PkiError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(file);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&path)
        .map_err(|e| io(&path, e))?;
    f.write_all(text.as_bytes()).map_err(|e| io(&path, e))?;
    f.sync_all().map_err(|e| io(&path, e))
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let v: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|_| PkiError::Pem {
            path: path.into(),
            what: "certificate",
        })?
        .collect::<Result<_, _>>()
        .map_err(|_| PkiError::Pem {
            path: path.into(),
            what: "certificate",
        })?;
    if v.is_empty() {
        return Err(PkiError::Pem {
            path: path.into(),
            what: "certificate",
        });
    }
    Ok(v)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_file(path).map_err(|_| PkiError::Pem {
        path: path.into(),
        what: "private key",
    })
}

fn roots(dir: &Path) -> Result<rustls::RootCertStore, PkiError> {
    let mut store = rustls::RootCertStore::empty();
    for c in certs(&dir.join("ca-cert.pem"))? {
        store.add(c)?;
    }
    Ok(store)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server side. With `require_client_cert`, only clients holding a certificate from the site CA
/// may connect (the replication link); without it, any client may (NBD from QEMU).
pub fn server_config(
    dir: &Path,
    require_client_cert: bool,
) -> Result<Arc<rustls::ServerConfig>, PkiError> {
    let auth = if require_client_cert {
        ClientAuth::Required
    } else {
        ClientAuth::None
    };
    server_config_with(dir, auth, &[])
}

/// The replication link's server side: like [`server_config`] with client certificates
/// required, and refusing the certificates whose SHA-256 (DER, hex) is in `revoked` although
/// the site CA signed them (the configuration server lists those of revoked process servers).
pub fn server_config_refusing(
    dir: &Path,
    revoked: &[String],
) -> Result<Arc<rustls::ServerConfig>, PkiError> {
    server_config_with(dir, ClientAuth::Required, revoked)
}

/// Server side that verifies a client certificate when one is presented but also admits clients
/// without one. For servers that must answer such clients themselves (the configuration
/// server's enrollment, and its refusals, which it audits): the caller checks for a certificate.
/// The server also sends the CA certificate, for clients that pin it by hash.
pub fn server_config_client_optional(dir: &Path) -> Result<Arc<rustls::ServerConfig>, PkiError> {
    server_config_with(dir, ClientAuth::Optional, &[])
}

enum ClientAuth {
    None,
    Optional,
    Required,
}

fn server_config_with(
    dir: &Path,
    auth: ClientAuth,
    revoked: &[String],
) -> Result<Arc<rustls::ServerConfig>, PkiError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let builder = match auth {
        ClientAuth::None => builder.with_no_client_auth(),
        ClientAuth::Optional | ClientAuth::Required => {
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(dir)?),
                provider(),
            );
            let v = if matches!(auth, ClientAuth::Optional) {
                v.allow_unauthenticated()
            } else {
                v
            };
            let verifier = v.build().map_err(|e| PkiError::Verifier(e.to_string()))?;
            if revoked.is_empty() {
                builder.with_client_cert_verifier(verifier)
            } else {
                builder.with_client_cert_verifier(Arc::new(Refusing {
                    inner: verifier,
                    revoked: revoked.iter().map(|h| h.to_ascii_lowercase()).collect(),
                }))
            }
        }
    };
    let mut chain = certs(&dir.join("server-cert.pem"))?;
    if matches!(auth, ClientAuth::Optional) {
        // The CA goes with the chain: a client that enrolls holds only a hash of the CA (from
        // its token) and checks the CA it is sent against it before trusting it.
        chain.extend(certs(&dir.join("ca-cert.pem"))?);
    }
    let cfg = builder.with_single_cert(chain, key(&dir.join("server-key.pem"))?)?;
    Ok(Arc::new(cfg))
}

/// A client verifier that refuses listed certificates after the CA's verifier accepted them.
#[derive(Debug)]
struct Refusing {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    revoked: std::collections::BTreeSet<String>,
}

impl rustls::server::danger::ClientCertVerifier for Refusing {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if self.revoked.contains(&sha256_hex(end_entity)) {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked,
            ));
        }
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Hex SHA-256 of `der`: how certificates and keys are named and pinned.
pub fn sha256_hex(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The CA of `dir` as an issuer, for a service that signs certificates (the configuration
/// server's enrollment). Needs `ca-key.pem`, which only such a service keeps.
pub fn ca_issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let cert_path = dir.join("ca-cert.pem");
    let key_path = dir.join("ca-key.pem");
    let cert = fs::read_to_string(&cert_path).map_err(|e| io(&cert_path, e))?;
    let key = fs::read_to_string(&key_path).map_err(|e| io(&key_path, e))?;
    let key = KeyPair::from_pem(&key).map_err(|_| PkiError::Pem {
        path: key_path,
        what: "CA private key",
    })?;
    Issuer::from_ca_cert_pem(&cert, key).map_err(|_| PkiError::Pem {
        path: cert_path,
        what: "CA certificate",
    })
}

/// Client side: trusts the site CA and presents the client certificate.
pub fn client_config(dir: &Path) -> Result<Arc<rustls::ClientConfig>, PkiError> {
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(dir)?)
        .with_client_auth_cert(
            certs(&dir.join("client-cert.pem"))?,
            key(&dir.join("client-key.pem"))?,
        )?;
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_then_load_and_refuse_overwrite() {
        let d = tempfile::tempdir().unwrap();
        init(d.path(), &["ferry.example".into()]).unwrap();
        server_config(d.path(), true).unwrap();
        server_config(d.path(), false).unwrap();
        client_config(d.path()).unwrap();
        server_config_client_optional(d.path()).unwrap();
        ca_issuer(d.path()).unwrap();
        assert!(matches!(init(d.path(), &[]), Err(PkiError::Exists(_))));
    }

    #[test]
    fn missing_files_are_named() {
        let d = tempfile::tempdir().unwrap();
        let e = client_config(d.path()).unwrap_err().to_string();
        assert!(e.contains("ca-cert.pem"), "{e}");
    }
}
