//! A TCP proxy the test controls, standing in for the WAN link between process server and
//! master target: `cut` drops every connection at once and refuses new ones for a while;
//! `limit` makes the link slow (each direction of each connection at most that rate);
//! `carried` counts the bytes it carried from the target to its clients.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub port: u16,
    generation: watch::Sender<u64>,
    down: Arc<AtomicBool>,
    pub accepted: Arc<AtomicU64>,
    /// Bytes carried from the target to the clients, over all connections.
    pub carried: Arc<AtomicU64>,
    /// Bytes per second each direction of a connection may carry (0: no limit).
    rate: Arc<AtomicU64>,
    _task: tokio::task::JoinHandle<()>,
}

/// Copy `r` to `w` until either ends, at most `rate` bytes a second (0: as fast as they go),
/// adding what was copied to `count`.
async fn pump(
    mut r: impl AsyncRead + Unpin,
    mut w: impl AsyncWrite + Unpin,
    rate: &AtomicU64,
    count: Option<&AtomicU64>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
        if let Some(c) = count {
            c.fetch_add(n as u64, Ordering::SeqCst);
        }
        let bps = rate.load(Ordering::SeqCst);
        if bps > 0 {
            tokio::time::sleep(Duration::from_secs_f64(n as f64 / bps as f64)).await;
        }
    }
}

impl Proxy {
    /// Listen on a free loopback port and forward to `target`.
    pub async fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = watch::channel(0u64);
        let down = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let rate = Arc::new(AtomicU64::new(0));
        let carried = Arc::new(AtomicU64::new(0));
        let (d, a, r, k) = (
            down.clone(),
            accepted.clone(),
            rate.clone(),
            carried.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if d.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                a.fetch_add(1, Ordering::SeqCst);
                let mut rx = rx.clone();
                rx.borrow_and_update();
                let (target, rate, carried) = (target.clone(), r.clone(), k.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    tokio::select! {
                        _ = pump(&mut cr, &mut sw, &rate, None) => {}
                        _ = pump(&mut sr, &mut cw, &rate, Some(&carried)) => {}
                        _ = rx.changed() => {}
                    }
                });
            }
        });
        Proxy {
            port,
            generation: tx,
            down,
            accepted,
            carried,
            rate,
            _task: task,
        }
    }

    /// Carry at most `bytes_per_sec` each way on each connection from now on (0: no limit).
    pub fn limit(&self, bytes_per_sec: u64) {
        self.rate.store(bytes_per_sec, Ordering::SeqCst);
    }

    /// Drop every open connection and refuse new ones for `down_for`.
    pub async fn cut(&self, down_for: Duration) {
        self.down.store(true, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
        tokio::time::sleep(down_for).await;
        self.down.store(false, Ordering::SeqCst);
    }
}
