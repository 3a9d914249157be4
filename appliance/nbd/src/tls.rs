//! TLS for NBD (`NBD_OPT_STARTTLS`).
//!
//! Why: replication traffic carries customer disk contents, and QEMU speaks NBD over TLS with
//! x509 credentials (`tls-creds-x509`). NBD does not start in TLS; the client asks for it with
//! STARTTLS during the handshake, the server acknowledges in plaintext, and from then on the
//! whole connection, including the rest of the handshake, runs inside TLS.
//!
//! How: the handshake module decides *when* to upgrade; this module performs the upgrade with
//! the configured [`TlsAcceptor`] and offers helpers to build an acceptor from PEM or DER
//! material with the `ring` provider named explicitly (so that another crate enabling a
//! different rustls provider cannot make construction ambiguous at run time).

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::error::NbdError;

/// Why a TLS acceptor could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("bad PEM: {0}")]
    Pem(#[from] rustls::pki_types::pem::Error),
    #[error("no certificate in the PEM chain")]
    NoCertificate,
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Build an acceptor (no client authentication) from a DER certificate chain and key.
pub fn acceptor_from_der(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<TlsAcceptor, TlsSetupError> {
    if chain.is_empty() {
        return Err(TlsSetupError::NoCertificate);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Build an acceptor from a PEM certificate chain (leaf first) and a PEM private key.
pub fn acceptor_from_pem(chain_pem: &[u8], key_pem: &[u8]) -> Result<TlsAcceptor, TlsSetupError> {
    let chain = CertificateDer::pem_slice_iter(chain_pem).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key_pem)?;
    acceptor_from_der(chain, key)
}

/// Run the server side of the TLS handshake after STARTTLS was acknowledged.
pub(crate) async fn upgrade<S>(acceptor: &TlsAcceptor, stream: S) -> Result<TlsStream<S>, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    Ok(acceptor.accept(stream).await?)
}
