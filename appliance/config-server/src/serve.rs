//! The listener: TLS in front of HTTP/1.1 in front of the router. The TLS layer verifies a
//! client certificate when one is presented and hands its fingerprint to the router (the
//! [`ConnInfo`] of every request); the gate decides what a request without one may do.
//!
//! Everything from the network is bounded: connections (a semaphore), the TLS handshake and
//! the request header (timeouts), the body (the router's limit).

use crate::app::{App, ConnInfo, Shared};
use crate::ca::{fingerprint, Authority, CaError};
use crate::store::{trees, Store, StoreError};
use ferry_api::{Principal, Role};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tower::ServiceExt;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServerError {
    let what = what.into();
    move |source| ServerError::Io { what, source }
}

pub struct Config {
    /// The state directory: `pki/` (the CA), `db/` (sled), `admin/` (the first
    /// provider-admin's certificate), `listening` (the bound address).
    pub state: PathBuf,
    pub listen: SocketAddr,
    /// Extra names or addresses for the server certificate (at creation only).
    pub server_names: Vec<String>,
    /// The appliance's own settings: hooks, timeouts, the cache and recovery site.
    pub system: crate::system::SystemConfig,
    /// The recovery site when this server runs beside it (its paths); none: the tenants'
    /// master targets and process servers run the jobs' site steps, ordered over the API.
    pub site: Option<ferry_failover::Site>,
    /// How long a role may take to fetch a step order (and be silent while it runs one).
    pub order_timeout: Duration,
    /// An appliance silent for this long is unreachable (an alert).
    pub unreachable_after: Duration,
    /// Refusals a client may get per window before it is answered `429` (`crate::refusals`).
    pub refusals: crate::refusals::Limits,
    /// How long appliances' certificates live (default a year); shorter only for tests of
    /// their renewal.
    pub appliance_cert_validity: Option<Duration>,
}

/// Concurrent connections; more are closed at once rather than queued without bound.
const MAX_CONNECTIONS: usize = 256;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Server {
    listener: TcpListener,
    app: Shared,
    unreachable_after: Duration,
    pub local_addr: SocketAddr,
}

impl Server {
    /// Open (or create) the state and the CA, and bind the listener.
    pub async fn bind(cfg: &Config) -> Result<Server, ServerError> {
        std::fs::create_dir_all(&cfg.state)
            .map_err(io(format!("creating {}", cfg.state.display())))?;
        let (mut ca, _) = Authority::open_or_create(&cfg.state.join("pki"), &cfg.server_names)?;
        if let Some(v) = cfg.appliance_cert_validity {
            ca.set_appliance_validity(v);
        }
        let store = Store::open(&cfg.state.join("db"))?;
        bootstrap_admin(&store, &ca, &cfg.state.join("admin")).await?;
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(io(format!("binding {}", cfg.listen)))?;
        let local_addr = listener
            .local_addr()
            .map_err(io("reading the bound address"))?;
        // Tools and tests find the address here, which matters with port 0.
        let tmp = cfg.state.join("listening.tmp");
        std::fs::write(&tmp, local_addr.to_string()).map_err(io("writing the address file"))?;
        std::fs::rename(&tmp, cfg.state.join("listening"))
            .map_err(io("writing the address file"))?;
        let app = Arc::new(App {
            store,
            ca,
            write: tokio::sync::Mutex::new(()),
            system: crate::system::SystemState::new(cfg.system.clone()),
            state_dir: cfg.state.clone(),
            jobs: crate::jobs::Runtime::new(cfg.site.clone(), cfg.order_timeout),
            refusals: crate::refusals::Refusals::new(cfg.refusals),
        });
        // A network change left pending by a stopped server still rolls back on time.
        crate::network::resume(&app).await;
        // Jobs a crash interrupted resume (or end, saying why) before any request is served.
        crate::jobs::resume(&app).await?;
        Ok(Server {
            listener,
            app,
            unreachable_after: cfg.unreachable_after,
            local_addr,
        })
    }

    /// Serve until SIGINT or SIGTERM.
    pub async fn run(self) -> Result<(), ServerError> {
        let router = crate::routes::router(self.app.clone());
        let acceptor = tokio_rustls::TlsAcceptor::from(self.app.ca.server_tls());
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(io("installing the SIGTERM handler"))?;
        tokio::spawn(crate::alerts::watch(
            self.app.clone(),
            self.unreachable_after,
        ));
        tokio::spawn(sweep_refusals(self.app.clone()));
        tracing::info!(addr = %self.local_addr, "configuration server listening");
        loop {
            let (tcp, peer) = tokio::select! {
                r = self.listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: wait rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "too many connections; closing this one");
                continue;
            };
            let (acceptor, router) = (acceptor.clone(), router.clone());
            tokio::spawn(async move {
                let _slot = slot;
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::info!(%peer, error = %e, "TLS handshake refused");
                        return;
                    }
                    Err(_) => return,
                };
                let info = ConnInfo {
                    peer,
                    cert_sha256: tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| fingerprint(c)),
                };
                let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                    req.extensions_mut().insert(info.clone());
                    router.clone().oneshot(req)
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(tls), svc);
                if let Err(e) = conn.await {
                    tracing::debug!(%peer, error = %e, "connection ended");
                }
            });
        }
        tracing::info!("configuration server stopping");
        self.app.store.flush().await?;
        Ok(())
    }
}

/// Every window, forget the refused clients whose windows ended, auditing the summaries of
/// those that were answered `429` (a client that stopped would otherwise never get one).
async fn sweep_refusals(app: Shared) {
    let every = app.refusals.limits().window.max(Duration::from_secs(1));
    loop {
        tokio::time::sleep(every).await;
        let ended = app.refusals.sweep(std::time::Instant::now());
        if let Err(e) = crate::app::audit_summaries(&app, ended).await {
            tracing::error!(error = %e.message, "cannot audit the refused clients' summaries");
        }
    }
}

/// On a new state directory, issue the first provider-admin certificate into `dir` (in the
/// layout `ferry ctl --cert-dir` reads). Whoever can read the state directory can read the CA
/// key anyway, so this adds no exposure; every other identity enrolls with a token.
async fn bootstrap_admin(store: &Store, ca: &Authority, dir: &Path) -> Result<(), ServerError> {
    if dir.join("client-cert.pem").exists() || store.any_with_prefix(trees::CERTS, "")? {
        return Ok(());
    }
    let admin = Principal {
        name: "admin".into(),
        role: Role::ProviderAdmin,
        tenant: None,
        appliance: None,
    };
    let issued = ca.issue(&admin, None)?;
    crate::identities::record(store, &issued, &admin, None)?;
    store.flush().await?;
    write_identity(
        dir,
        ca.ca_pem(),
        &issued.certificate_pem,
        issued.private_key_pem.as_deref().unwrap_or_default(),
    )
    .map_err(io(format!("writing {}", dir.display())))?;
    tracing::info!(dir = %dir.display(), "issued the first provider-admin certificate");
    Ok(())
}

/// Write a certificate directory: `ca-cert.pem`, `client-cert.pem`, `client-key.pem` (0600).
pub fn write_identity(dir: &Path, ca: &str, cert: &str, key: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    for (name, text, mode) in [
        ("client-key.pem", key, 0o600),
        ("ca-cert.pem", ca, 0o644),
        ("client-cert.pem", cert, 0o644),
    ] {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(dir.join(name))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    Ok(())
}
