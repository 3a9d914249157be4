//! A small client for the API, used by `ferry ctl` and the tests: a deadline on every request,
//! typed bodies in and out. The connection an answer came on is kept for the next request
//! (HTTP/1.1 keep-alive), so a command that makes many requests does one TLS handshake.

use ferry_api::ErrorBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::Request;
pub use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::{de::DeserializeOwned, Serialize};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad server URL {0:?}: expected https://HOST:PORT")]
    Url(String),
    #[error(transparent)]
    Pki(#[from] ferry_pki::PkiError),
    #[error("the CA certificate is not PEM")]
    CaPem,
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot reach {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("HTTP: {0}")]
    Http(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The server answered with an error.
    #[error("{message} ({status}, {code})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("the server's answer does not decode: {0}")]
    Decode(serde_json::Error),
}

/// Per request: connect, handshake, send, read the whole answer.
const DEADLINE: Duration = Duration::from_secs(30);
/// Larger answers are refused: the biggest (a tenant's status with 10,000 disks, about 3 MB)
/// is far below this.
const ANSWER_LIMIT: usize = 16 << 20;
/// A kept connection idle for longer is not used again: the server closes a connection that
/// sends no request header for 10 s (`serve::HEADER_TIMEOUT`), and a request sent just as it
/// closes would fail.
const IDLE_REUSE: Duration = Duration::from_secs(2);

/// An open HTTP/1.1 connection; its task ends when it is dropped.
struct Conn {
    send: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    task: tokio::task::JoinHandle<()>,
    idle_since: std::time::Instant,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Clones share the kept connection; requests that overlap open their own.
#[derive(Clone)]
pub struct Client {
    addr: String,
    server_name: ServerName<'static>,
    tls: tokio_rustls::TlsConnector,
    kept: Arc<std::sync::Mutex<Option<Conn>>>,
}

impl Client {
    /// `url` is `https://HOST:PORT`; `tls` decides which CA is trusted and which certificate,
    /// if any, is presented.
    pub fn new(url: &str, tls: Arc<rustls::ClientConfig>) -> Result<Client, ClientError> {
        let bad = || ClientError::Url(url.to_string());
        let rest = url.strip_prefix("https://").ok_or_else(bad)?;
        let hostport = rest.trim_end_matches('/');
        let (host, port) = hostport.rsplit_once(':').ok_or_else(bad)?;
        port.parse::<u16>().map_err(|_| bad())?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(host.to_string()).map_err(|_| bad())?;
        Ok(Client {
            addr: hostport.to_string(),
            server_name,
            tls: tokio_rustls::TlsConnector::from(tls),
            kept: Default::default(),
        })
    }

    /// With the identity in a certificate directory (`ca-cert.pem`, `client-cert.pem`,
    /// `client-key.pem`).
    pub fn from_cert_dir(url: &str, dir: &Path) -> Result<Client, ClientError> {
        Self::new(url, ferry_pki::client_config(dir)?)
    }

    /// Trusting `ca_pem` but presenting no certificate: for enrollment.
    pub fn anonymous(url: &str, ca_pem: &str) -> Result<Client, ClientError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(c.map_err(|_| ClientError::CaPem)?)?;
        }
        if roots.is_empty() {
            return Err(ClientError::CaPem);
        }
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Self::new(url, Arc::new(cfg))
    }

    /// Trusting only the CA whose certificate (DER) has this SHA-256, which the server sends
    /// along: enrollment with nothing but the server's address and a token (which carries
    /// the hash), as `kubeadm join` does with its discovery hash.
    pub fn pinned(url: &str, ca_sha256: &str) -> Result<Client, ClientError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::new(PinnedCa {
            sha256: ca_sha256.trim().to_ascii_lowercase(),
            provider: provider.clone(),
        });
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous() // not dangerous: PinnedCa verifies the chain, against a pinned root
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Self::new(url, Arc::new(cfg))
    }

    /// Any request; the status and the raw answer, whatever the status.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        tokio::time::timeout(DEADLINE, self.raw_inner(method, path, body))
            .await
            .map_err(|_| ClientError::Timeout(DEADLINE))?
    }

    async fn connect(&self) -> Result<Conn, ClientError> {
        let connect = |source| ClientError::Connect {
            addr: self.addr.clone(),
            source,
        };
        let tcp = tokio::net::TcpStream::connect(&self.addr)
            .await
            .map_err(connect)?;
        let tls = self
            .tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(connect)?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn {
            send,
            task,
            idle_since: std::time::Instant::now(),
        })
    }

    async fn send_new(
        &self,
        req: Request<Full<Bytes>>,
    ) -> Result<(Conn, hyper::Response<hyper::body::Incoming>), ClientError> {
        let mut c = self.connect().await?;
        let resp = c
            .send
            .send_request(req)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        Ok((c, resp))
    }

    /// The kept connection if it is still usable, else none (and it is closed).
    fn take_kept(&self) -> Option<Conn> {
        let c = self.kept.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        (!c.send.is_closed() && c.idle_since.elapsed() < IDLE_REUSE).then_some(c)
    }

    async fn raw_inner(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.addr);
        let bytes = match body {
            Some((ct, b)) => {
                req = req.header(hyper::header::CONTENT_TYPE, ct);
                b
            }
            None => Vec::new(),
        };
        let req = req
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let kept = match self.take_kept() {
            Some(mut c) => c.send.ready().await.is_ok().then_some(c),
            None => None,
        };
        let (mut conn, resp) = match kept {
            Some(mut c) => match c.send.try_send_request(req).await {
                Ok(resp) => (c, resp),
                // The server closed the kept connection before the request went out: it is
                // sent on a new one. A request that went out is not sent again (it may have
                // changed something).
                Err(mut e) => match e.take_message() {
                    Some(req) => self.send_new(req).await?,
                    None => return Err(ClientError::Http(e.into_error().to_string())),
                },
            },
            None => self.send_new(req).await?,
        };
        let status = resp.status();
        let body = Limited::new(resp.into_body(), ANSWER_LIMIT)
            .collect()
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?
            .to_bytes();
        conn.idle_since = std::time::Instant::now();
        *self.kept.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn);
        Ok((status, body))
    }

    /// A JSON request with a typed answer; an error status becomes [`ClientError::Api`].
    pub async fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<R, ClientError> {
        let body = body
            .map(|b| serde_json::to_vec(b).map(|v| ("application/json", v)))
            .transpose()
            .map_err(ClientError::Decode)?;
        let (status, bytes) = self.raw(method, path, body).await?;
        if !status.is_success() {
            let e: ErrorBody = serde_json::from_slice(&bytes).unwrap_or_else(|_| ErrorBody {
                code: "unknown".into(),
                message: String::from_utf8_lossy(&bytes).into_owned(),
            });
            return Err(ClientError::Api {
                status: status.as_u16(),
                code: e.code,
                message: e.message,
            });
        }
        // A 204 has no body; `()` and `Option` decode from `null`.
        let bytes = if bytes.is_empty() {
            Bytes::from_static(b"null")
        } else {
            bytes
        };
        serde_json::from_slice(&bytes).map_err(ClientError::Decode)
    }

    pub async fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R, ClientError> {
        self.call::<(), R>(Method::GET, path, None).await
    }
}

/// Accepts a server whose chain carries the CA with the pinned hash and whose certificate that
/// CA signed for the name we connected to; everything but the choice of root is rustls' own
/// verification.
#[derive(Debug)]
struct PinnedCa {
    sha256: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| crate::ca::fingerprint(c) == self.sha256)
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "the server's CA is not the one with SHA-256 {}: not sending the token",
                    self.sha256
                ))
            })?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?
            .verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
