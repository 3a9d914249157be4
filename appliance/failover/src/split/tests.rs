//! The split resync against a real master target (TLS, its resync server): reconnection, refusals, the bandwidth limit, the idle keepalive.

use super::*;
use ferry_master_target::resync::{live_path, serve, Hello};
use ferry_nbd::{MemExport, ServerConfig};
use std::collections::HashMap;
use std::sync::atomic::Ordering;

const SIZE: u64 = 100 * BLOCK + 4096;

fn key() -> Arc<TenantKey> {
    Arc::new(TenantKey::from_secret(&[7; 32]))
}

/// An NBD client of an in-memory original disk holding `data`.
async fn original(data: Vec<u8>) -> (Client<tokio::io::DuplexStream>, Arc<MemExport>) {
    let export = Arc::new(MemExport::from_vec(data));
    let mut exports: HashMap<String, Arc<dyn ferry_nbd::Export>> = HashMap::new();
    exports.insert("orig".into(), export.clone());
    let cfg = Arc::new(ServerConfig {
        exports,
        tls: None,
        require_tls: false,
    });
    let (a, b) = tokio::io::duplex(1 << 20);
    tokio::spawn(async move { ferry_nbd::serve_connection(b, cfg).await });
    (Client::handshake(a, "orig").await.unwrap(), export)
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..SIZE).map(|i| (i % 251) as u8 ^ seed).collect()
}

/// The master target's side of a resync of tenant acme's disk d0 (plan dr, machine web)
/// below `work`, served on `rd`/`wr` as it would be after the hello; `idle` without a
/// request ends it.
fn master_target<R, W>(
    mut rd: R,
    mut wr: W,
    work: &Path,
    idle: Duration,
) -> tokio::task::JoinHandle<std::result::Result<(), String>>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let w = work.to_path_buf();
    tokio::spawn(async move {
        let live = live_path(&w, "acme", "dr", "web", "d0");
        let h = Hello {
            tenant: "acme".into(),
            plan: "dr".into(),
            machine: "web".into(),
            disk: "d0".into(),
            disk_size: std::fs::metadata(live).unwrap().len(),
            block_size: BLOCK as u32,
        };
        serve(&mut rd, &mut wr, h, Some((&w, Some("acme"))), key(), idle)
            .await
            .map_err(|e| format!("{e:#}"))
    })
}

#[tokio::test]
async fn only_the_blocks_whose_names_differ_come_and_the_original_ends_equal() {
    let dir = tempfile::tempdir().unwrap();
    let path = live_path(dir.path(), "acme", "dr", "web", "d0");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    // The live disk: the original with three blocks changed (one of them now zeros, and
    // the short last block).
    let mut live = pattern(0);
    live[(3 * BLOCK) as usize..(4 * BLOCK) as usize].fill(0xaa);
    live[(50 * BLOCK) as usize..(51 * BLOCK) as usize].fill(0);
    let n = live.len();
    live[n - 10] ^= 1;
    std::fs::write(&path, &live).unwrap();
    let (mut c, export) = original(pattern(0)).await;
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    let (srd, swr) = tokio::io::split(theirs);
    let master = master_target(srd, swr, dir.path(), ferry_master_target::IDLE_TIMEOUT);
    let (mut rd, mut wr) = tokio::io::split(ours);
    match answer(&mut rd).await.unwrap() {
        Msg::ResyncWelcome { disk_size, .. } => assert_eq!(disk_size, SIZE),
        other => panic!("{other:?}"),
    }
    let mut seen = 0;
    let r = compare_and_fetch(
        &mut rd,
        &mut wr,
        &mut c,
        &key(),
        Retry::default().keepalive,
        &mut Resume::default(),
        &mut |_| seen += 1,
    )
    .await
    .unwrap();
    drop((rd, wr));
    master.await.unwrap().unwrap();
    assert_eq!(r.blocks_compared, SIZE.div_ceil(BLOCK));
    assert_eq!(r.blocks_sent, 3);
    assert_eq!(r.bytes_sent, 2 * BLOCK + 4096);
    // After each batch, and after each block written.
    assert_eq!(seen, SIZE.div_ceil(BLOCK).div_ceil(BATCH) + 3);
    assert!(export.contents() == live);
}

/// How a resync over a limited connection went: its outcome, the seconds it took, the
/// master target's end, how often progress was told, and whether the original ends equal.
struct Limited {
    r: Result<ResyncReport>,
    took: f64,
    master: std::result::Result<(), String>,
    seen: u64,
    equal: bool,
}

/// `n` bytes that do not compress (a xorshift stream).
fn noise(n: u64) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Resync `orig` from `live` over loopback TCP limited by the machine's throttle at `mbit`
/// (both ways, as [`connect`] makes it), from a master target that takes the connection
/// for gone after `idle` without a request; this side keeps it alive after `keepalive`.
async fn limited(
    orig: Vec<u8>,
    live: Vec<u8>,
    mbit: u32,
    idle: Duration,
    keepalive: Duration,
) -> Limited {
    use ferry_process_server::throttle::{Schedule, Throttle, Throttled};
    let dir = tempfile::tempdir().unwrap();
    let path = live_path(dir.path(), "acme", "dr", "web", "d0");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, &live).unwrap();
    let (mut c, export) = original(orig).await;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ours = tokio::net::TcpStream::connect(l.local_addr().unwrap())
        .await
        .unwrap();
    let (theirs, _) = l.accept().await.unwrap();
    let (srd, swr) = tokio::io::split(theirs);
    let master = master_target(srd, swr, dir.path(), idle);
    let t = Throttle::new(
        "web",
        Schedule {
            default_mbit: Some(mbit),
            windows: Vec::new(),
        },
    );
    let ours = Throttled::both_ways(ours, Some(t));
    let (mut rd, mut wr) = tokio::io::split(ours);
    match answer(&mut rd).await.unwrap() {
        Msg::ResyncWelcome { disk_size, .. } => assert_eq!(disk_size, live.len() as u64),
        other => panic!("{other:?}"),
    }
    let began = std::time::Instant::now();
    let mut seen = 0;
    let r = compare_and_fetch(
        &mut rd,
        &mut wr,
        &mut c,
        &key(),
        keepalive,
        &mut Resume::default(),
        &mut |_| seen += 1,
    )
    .await;
    let took = began.elapsed().as_secs_f64();
    drop((rd, wr));
    Limited {
        r,
        took,
        master: master.await.unwrap(),
        seen,
        equal: export.contents() == live,
    }
}

/// Over a connection limited by the machine's throttle (both ways, as [`connect`] makes
/// it), the blocks come no faster than the limit, and the original still ends equal.
#[tokio::test]
async fn a_limited_resync_fetches_at_the_limit_and_the_original_ends_equal() {
    // Every block differs: 6.5 MB that do not compress much come, at 40 Mbit/s (5 MB/s).
    let idle = ferry_master_target::IDLE_TIMEOUT;
    let l = limited(
        pattern(0),
        noise(SIZE),
        40,
        idle,
        Retry::default().keepalive,
    )
    .await;
    let (r, took) = (l.r.unwrap(), l.took);
    l.master.unwrap();
    assert_eq!(r.bytes_sent, SIZE);
    // 6.5 MB at 5 MB/s, less the bucket's burst (0.1 s).
    assert!(took >= 1.2, "{} bytes came in {took:.2} s", r.bytes_sent);
    assert_eq!(l.seen, SIZE.div_ceil(BLOCK).div_ceil(BATCH) + r.blocks_sent);
    assert!(l.equal);
}

/// At a low limit, the blocks the master target has written into the connection take
/// long to come through, and it hears nothing meanwhile: it would take the connection for
/// idle (120 s) and close it, but this side asks for something whenever it sent nothing
/// for a while (30 s), so a slow but healthy resync is not cut. (Here both are shorter.)
#[tokio::test]
async fn a_slow_resync_is_not_taken_for_idle_by_the_master_target() {
    // Eight batches: the first differs whole (4 MiB), the seventh in one block. At
    // 8 Mbit/s the first batch's blocks take 4 s to come through; the master target has
    // answered all it was asked (the names of the batches after, which are equal) and
    // hears nothing until they came and the seventh batch's block is asked for.
    let blocks = 8 * BATCH;
    // (The stream a byte on, so that the first batch differs from the live disk's.)
    let orig = noise(blocks * BLOCK + 1)[1..].to_vec();
    let mut live = orig.clone();
    live[..(BATCH * BLOCK) as usize].copy_from_slice(&noise(BATCH * BLOCK));
    live[(6 * BATCH * BLOCK) as usize] ^= 1;
    let idle = Duration::from_millis(300);
    let l = limited(
        orig.clone(),
        live.clone(),
        8,
        idle,
        Duration::from_millis(100),
    )
    .await;
    let r = l.r.unwrap();
    l.master.unwrap();
    assert_eq!(r.blocks_sent, BATCH + 1);
    assert!(l.equal);
    // Asking nothing meanwhile, the same resync is cut.
    let l = limited(orig, live, 8, idle, Duration::from_secs(30)).await;
    let e = l.master.unwrap_err();
    assert!(e.contains("idle for"), "{e}");
    assert!(matches!(l.r, Err(FailoverError::Lost(_))), "{:?}", l.r);
}

/// Resync an original of [`SIZE`] bytes against a peer that answers with `answers` (after
/// the welcome); the error it ends with.
async fn against(answers: Vec<Msg>) -> String {
    let (mut c, _) = original(pattern(0)).await;
    let (ours, theirs) = tokio::io::duplex(1 << 22);
    let peer = tokio::spawn(async move {
        let (mut rd, mut wr) = tokio::io::split(theirs);
        for a in answers {
            // One answer per request, whatever was asked.
            if read_msg(&mut rd).await.is_err() {
                return;
            }
            wr.write_all(&a.encode()).await.unwrap();
        }
        // Then it goes away after the next request.
        let _ = read_msg(&mut rd).await;
    });
    let (mut rd, mut wr) = tokio::io::split(ours);
    let e = compare_and_fetch(
        &mut rd,
        &mut wr,
        &mut c,
        &key(),
        Retry::default().keepalive,
        &mut Resume::default(),
        &mut |_| {},
    )
    .await
    .unwrap_err()
    .to_string();
    drop((rd, wr));
    let _ = peer.await;
    e
}

#[tokio::test]
async fn answers_that_do_not_fit_are_errors_that_say_so() {
    let k = key();
    let names = |n: usize| vec![ferry_chunk::ChunkId([1; 32]); n];
    // Both batches' names (the next batch's are asked for before this one's blocks), then `m`.
    let batches_then = |m: Msg| {
        vec![
            Msg::Ids {
                first: 0,
                ids: names(64),
            },
            Msg::Ids {
                first: 64,
                ids: names(37),
            },
            m,
        ]
    };
    let data = vec![5u8; BLOCK as usize];
    let id = k.chunk_id(&data);
    let other = k.chunk_id(&[6u8; BLOCK as usize]);
    let cases: Vec<(Vec<Msg>, &str)> = vec![
        (
            vec![Msg::Ids {
                first: 0,
                ids: names(3),
            }],
            "3 names from block 0 for 64",
        ),
        (
            vec![Msg::Ids {
                first: 9,
                ids: names(64),
            }],
            "from block 9",
        ),
        (vec![Msg::Have { present: vec![] }], "for block names"),
        (
            batches_then(Msg::Block {
                index: 5,
                body: BlockBody::Zero,
            }),
            "for block 0",
        ),
        (
            batches_then(Msg::Block {
                index: 0,
                body: BlockBody::Chunk {
                    id: other,
                    blob: Some(k.seal_chunk(&id, &data)),
                },
            }),
            "does not open as its name",
        ),
        (
            batches_then(Msg::Block {
                index: 0,
                body: BlockBody::Chunk { id, blob: None },
            }),
            "by reference",
        ),
        (
            batches_then(Msg::Block {
                index: 0,
                body: BlockBody::Chunk {
                    id: k.chunk_id(&data[..100]),
                    blob: Some(k.seal_chunk(&k.chunk_id(&data[..100]), &data[..100])),
                },
            }),
            "is 100 bytes",
        ),
        (vec![], "closed the resync connection"),
    ];
    for (answers, want) in cases {
        let e = against(answers).await;
        assert!(e.contains(want), "{want:?}: {e}");
    }
}

/// The real master target (mutual TLS with the site CA in `pki`, its repository, its
/// resync answers) keeping live disks below `dir`/work, on a loopback port: its address.
async fn real_master_target(pki: &Path, dir: &Path) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let listen = listener.local_addr().unwrap();
    let repo =
        ferry_repository::Repository::open(&dir.join("repo"), TenantKey::from_secret(&[7; 32]))
            .unwrap();
    let cfg = ferry_master_target::Config {
        listen,
        tls: ferry_pki::server_config(pki, true).unwrap(),
        repo: Arc::new(repo),
        key: key(),
        retention: None,
        work: Some(dir.join("work")),
        tenant: Some("acme".into()),
    };
    let task = tokio::spawn(async move {
        let _ = ferry_master_target::serve(listener, cfg).await;
    });
    (listen.to_string(), task)
}

/// The protected site's role, with the TLS identity `tls`, reaching the master target at
/// `addr`.
fn protected(
    tls: Arc<tokio_rustls::rustls::ClientConfig>,
    addr: String,
    dir: &Path,
    retry: Retry,
) -> Protected {
    Protected {
        link: ferry_process_server::Link {
            addr,
            server_name: tokio_rustls::rustls::pki_types::ServerName::try_from("localhost")
                .unwrap(),
            tls,
            throttles: HashMap::new(),
        },
        key: key(),
        work: dir.join("resync"),
        retry,
    }
}

fn web_d0() -> LiveDisk {
    LiveDisk {
        tenant: "acme".into(),
        plan: "dr".into(),
        machine: "web".into(),
        disk: "d0".into(),
    }
}

/// Blocks of the disks [`disks`] makes (64 MiB), and how many of them differ.
const BIG: u64 = 1024;
const DIFFER: u64 = BIG / 4;

/// The original disk (a raw image) and the live disk below `dir`/work: equal but for every
/// fourth block, which holds data that does not compress at the recovery site.
fn disks(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let original: Vec<u8> = (0..BIG * BLOCK).map(|i| (i % 251) as u8).collect();
    let mut live = original.clone();
    let changed = noise(DIFFER * BLOCK);
    for (i, b) in (0..BIG).step_by(4).enumerate() {
        let (at, from) = ((b * BLOCK) as usize, i * BLOCK as usize);
        live[at..at + BLOCK as usize].copy_from_slice(&changed[from..from + BLOCK as usize]);
    }
    let live_at = live_path(&dir.join("work"), "acme", "dr", "web", "d0");
    std::fs::create_dir_all(live_at.parent().unwrap()).unwrap();
    std::fs::write(&live_at, &live).unwrap();
    let orig_at = dir.join("original.raw");
    std::fs::write(&orig_at, &original).unwrap();
    (orig_at, live_at)
}

/// What a resync told its progress: the report, and what it was doing besides.
type Told = tokio::sync::mpsc::UnboundedReceiver<(ResyncReport, Option<String>)>;

/// Run the resync of [`web_d0`] into `original` off the runtime.
fn start(
    p: Protected,
    live: LiveDisk,
    original: &Path,
) -> (tokio::task::JoinHandle<Result<ResyncReport>>, Told) {
    start_source(p, live, original.display().to_string())
}

/// [`start`] into the original disk given as its inventory `source` says it.
fn start_source(
    p: Protected,
    live: LiveDisk,
    original: String,
) -> (tokio::task::JoinHandle<Result<ResyncReport>>, Told) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let run = tokio::task::spawn_blocking(move || {
        run(&p, &live, &original, &mut |r, now| {
            let _ = tx.send((*r, now.map(str::to_string)));
        })
    });
    (run, rx)
}

/// Everything told until the resync ended.
fn all_told(mut rx: Told) -> Vec<(ResyncReport, Option<String>)> {
    let mut out = Vec::new();
    while let Ok(t) = rx.try_recv() {
        out.push(t);
    }
    out
}

/// The connection to the master target is cut in the middle of the resync (by a TCP proxy
/// between the sites, which refuses connections for a second): the resync connects again
/// by itself, goes on from where it was, and the original ends equal to the live disk.
#[tokio::test]
async fn a_cut_connection_is_opened_again_and_the_resync_goes_on_from_where_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    ferry_pki::init(&pki, &[]).unwrap();
    let (original, live) = disks(dir.path());
    let (addr, mt) = real_master_target(&pki, dir.path()).await;
    let proxy = crate::proxy::Proxy::start(addr).await;
    // 16 MiB of blocks that differ come at 8 MiB/s: the cut falls in the middle.
    proxy.limit(8 << 20);
    let retry = Retry {
        budget: Duration::from_secs(20),
        first_wait: Duration::from_millis(100),
        longest_wait: Duration::from_secs(1),
        // Often enough that the master target answers requests for no names meanwhile.
        keepalive: Duration::from_millis(20),
    };
    let tls = ferry_pki::client_config(&pki).unwrap();
    let to = format!("127.0.0.1:{}", proxy.port);
    let (run, mut rx) = start(protected(tls, to, dir.path(), retry), web_d0(), &original);
    let cut_at = 10 << 20;
    let seen = tokio::time::timeout(Duration::from_secs(60), async {
        let mut seen = Vec::new();
        loop {
            let t = rx.recv().await.expect("the resync ended before the cut");
            let at = t.0.bytes_sent;
            seen.push(t);
            if at >= cut_at {
                return seen;
            }
        }
    })
    .await
    .unwrap();
    proxy.cut(Duration::from_secs(1)).await;
    let carried_before = proxy.carried.load(Ordering::SeqCst);
    let r = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let carried_after = proxy.carried.load(Ordering::SeqCst) - carried_before;
    mt.abort();
    let told: Vec<_> = seen.into_iter().chain(all_told(rx)).collect();
    assert!(
        std::fs::read(&original).unwrap() == std::fs::read(&live).unwrap(),
        "the original differs from the live disk"
    );
    // Each block that differed was written once, and the whole disk was compared.
    assert_eq!(r.bytes_sent, DIFFER * BLOCK, "{r:?}");
    assert_eq!(r.blocks_compared, BIG, "{r:?}");
    assert!(r.reconnects >= 1, "{r:?}");
    assert!(proxy.accepted.load(Ordering::SeqCst) >= 2);
    let notes: Vec<&String> = told.iter().filter_map(|(_, n)| n.as_ref()).collect();
    assert!(
        notes
            .first()
            .is_some_and(|n| n.starts_with("reconnecting (attempt 1) after: ")),
        "{notes:?}"
    );
    // Not a resync from the start: the names asked again after the reconnection are at
    // most those of the batches in flight at the cut, not those of the ~640 blocks
    // settled before it.
    let first_run = told.iter().find(|(_, n)| n.is_some()).unwrap().0;
    assert!(first_run.bytes_sent >= cut_at, "{first_run:?} {notes:?}");
    let asked_again = r.hash_bytes / 32 - BIG;
    assert!(
        asked_again <= (AHEAD + 1) * BATCH && asked_again < 4 * first_run.blocks_sent,
        "names of {asked_again} blocks asked again after {first_run:?}"
    );
    // What came after the reconnection is about what remained: the blocks not written
    // before the cut (sealed, TLS), and the names.
    let remained = r.bytes_sent - first_run.bytes_sent;
    eprintln!(
        "cut after {} of {} bytes written; {carried_after} bytes came after it for the \
         {remained} that remained; names of {asked_again} blocks asked again; {} attempts \
         to reconnect",
        first_run.bytes_sent, r.bytes_sent, r.reconnects
    );
    assert!(
        carried_after >= remained && carried_after <= remained + remained / 50 + 64 * 1024,
        "{carried_after} bytes came after the cut for {remained}"
    );
}

/// A master target out of reach for longer than the retry budget: the resync tries again
/// (saying so) and then fails, saying it gave up and why.
#[tokio::test]
async fn a_master_target_out_of_reach_past_the_budget_fails_the_resync_saying_so() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    ferry_pki::init(&pki, &[]).unwrap();
    let (original, _) = disks(dir.path());
    // A port nothing listens on.
    let gone = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let to = gone.local_addr().unwrap().to_string();
    drop(gone);
    let retry = Retry {
        budget: Duration::from_millis(1500),
        first_wait: Duration::from_millis(100),
        longest_wait: Duration::from_millis(400),
        keepalive: Duration::from_secs(30),
    };
    let tls = ferry_pki::client_config(&pki).unwrap();
    let began = Instant::now();
    let (run, rx) = start(protected(tls, to, dir.path(), retry), web_d0(), &original);
    let e = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err()
        .to_string();
    let took = began.elapsed();
    let notes: Vec<String> = all_told(rx).into_iter().filter_map(|(_, n)| n).collect();
    assert!(
        e.starts_with("gave up on the master target") && e.contains("cannot connect"),
        "{e}"
    );
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(10),
        "{took:?}"
    );
    // 100, 200, 400, 400, 400 ms and the budget's end.
    assert!(notes.len() >= 4, "{notes:?}");
    assert!(
        notes[2].starts_with("reconnecting (attempt 3) after: master target")
            && notes[2].contains("cannot connect"),
        "{notes:?}"
    );
}

/// What another connection would not change fails the resync at once, without trying
/// again: a master target whose certificate this role does not trust, one that does not
/// trust this role's, one that has no such live disk.
#[tokio::test]
async fn refusals_fail_the_resync_at_once_without_reconnecting() {
    use tokio_rustls::rustls;
    let dir = tempfile::tempdir().unwrap();
    let (pki, other) = (dir.path().join("pki"), dir.path().join("other"));
    ferry_pki::init(&pki, &[]).unwrap();
    ferry_pki::init(&other, &[]).unwrap();
    let (original, _) = disks(dir.path());
    let (addr, mt) = real_master_target(&pki, dir.path()).await;
    // Trusts the master target, but holds a certificate of another site's CA.
    let stranger = {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(pki.join("ca-cert.pem")).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let chain = CertificateDer::pem_file_iter(other.join("client-cert.pem"))
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
        let key = PrivateKeyDer::from_pem_file(other.join("client-key.pem")).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap()
    };
    let no_such_disk = LiveDisk {
        machine: "db".into(),
        ..web_d0()
    };
    let cases = [
        (
            ferry_pki::client_config(&other).unwrap(),
            web_d0(),
            "TLS handshake: TLS: invalid peer certificate",
        ),
        (Arc::new(stranger), web_d0(), "TLS: received fatal alert"),
        (
            ferry_pki::client_config(&pki).unwrap(),
            no_such_disk,
            "no live disk d0 of machine db",
        ),
    ];
    let retry = Retry {
        budget: Duration::from_secs(20),
        first_wait: Duration::from_secs(5),
        ..Retry::default()
    };
    for (tls, live, want) in cases {
        let began = Instant::now();
        let p = protected(tls, addr.clone(), dir.path(), retry.clone());
        let (run, rx) = start(p, live, &original);
        let e = tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .unwrap()
            .unwrap()
            .unwrap_err();
        let notes: Vec<String> = all_told(rx).into_iter().filter_map(|(_, n)| n).collect();
        assert!(matches!(e, FailoverError::Refused(_)), "{want}: {e:?}");
        let e = e.to_string();
        assert!(e.contains(want), "{want}: {e}");
        assert!(notes.is_empty(), "{want}: {notes:?}");
        assert!(began.elapsed() < Duration::from_secs(5), "{want}: {e}");
    }
    mt.abort();
}

/// The resync's exports on the host whose QMP connection is `qmp`.
fn resync_exports(qmp: &mut ferry_qemu::Qmp) -> Vec<String> {
    ferry_qemu::fleece::export_ids(qmp)
        .unwrap()
        .into_iter()
        .filter(|e| e.starts_with("ferry-resync."))
        .collect()
}

/// An original disk given by its host (`qmp=...,node=...,nbd=...`, here a
/// qemu-storage-daemon that owns the image): the resync writes it through a writable export
/// of the disk's node that it adds on the host's NBD server. One that fails midway (the master
/// target out of reach past the budget) leaves no export there, nor its note; one left by a
/// process that died is removed at the role's next start; and a resync run again ends with the
/// original equal to the live disk, having written only what still differed.
#[tokio::test]
async fn a_resync_through_the_host_removes_its_export_even_when_it_fails_midway() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    ferry_pki::init(&pki, &[]).unwrap();
    let (original, live) = disks(dir.path());
    let h = dir.path().join("host");
    std::fs::create_dir_all(&h).unwrap();
    let mut host = ferry_qemu::StorageDaemon::start(&original, "raw", &h).unwrap();
    let source = format!(
        "qmp={},node=disk0,nbd={}",
        h.join(ferry_qemu::MGMT_QMP_SOCKET).display(),
        h.join("nbd.sock").display()
    );
    let (addr, mt) = real_master_target(&pki, dir.path()).await;
    let proxy = crate::proxy::Proxy::start(addr).await;
    // 16 MiB of blocks that differ come at 8 MiB/s: the failure falls in the middle.
    proxy.limit(8 << 20);
    let retry = Retry {
        budget: Duration::from_secs(1),
        first_wait: Duration::from_millis(100),
        longest_wait: Duration::from_millis(300),
        keepalive: Duration::from_secs(30),
    };
    let tls = ferry_pki::client_config(&pki).unwrap();
    let to = format!("127.0.0.1:{}", proxy.port);
    let p = protected(tls.clone(), to.clone(), dir.path(), retry);
    let (run, mut rx) = start_source(p, web_d0(), source.clone());
    tokio::time::timeout(Duration::from_secs(60), async {
        while rx
            .recv()
            .await
            .expect("the resync ended early")
            .0
            .bytes_sent
            < 4 << 20
        {}
    })
    .await
    .unwrap();
    let id = export_id(&web_d0());
    let note = dir.path().join("resync/acme/dr/web.d0").join(HOST_EXPORT);
    assert_eq!(resync_exports(&mut host.qmp), std::slice::from_ref(&id));
    assert!(note.exists());
    proxy.cut(Duration::from_secs(3)).await;
    let e = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("gave up on the master target"), "{e}");
    assert!(resync_exports(&mut host.qmp).is_empty());
    assert!(!note.exists());
    // Midway indeed: the original is neither as it was nor the live disk yet.
    let written = std::fs::read(&original).unwrap();
    assert!(written != std::fs::read(&live).unwrap());

    // A process that died in the middle left its export and its note: the role's next start
    // removes the export.
    ferry_qemu::fleece::add_export(&mut host.qmp, &h.join("nbd.sock"), "disk0", &id, true).unwrap();
    let body = serde_json::json!({"qmp": h.join(ferry_qemu::MGMT_QMP_SOCKET), "id": id});
    std::fs::write(&note, body.to_string()).unwrap();
    remove_leftover_exports(&dir.path().join("resync"));
    assert!(resync_exports(&mut host.qmp).is_empty());
    assert!(!note.exists());

    // Run again: only what still differs is written, and no export is left.
    proxy.limit(0);
    let p = protected(tls, to, dir.path(), Retry::default());
    let (run, _rx) = start_source(p, web_d0(), source);
    let r = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    mt.abort();
    assert!(resync_exports(&mut host.qmp).is_empty());
    host.stop();
    assert!(
        std::fs::read(&original).unwrap() == std::fs::read(&live).unwrap(),
        "the original differs from the live disk"
    );
    assert_eq!(r.blocks_compared, BIG, "{r:?}");
    assert!(
        r.bytes_sent > 0 && r.bytes_sent < DIFFER * BLOCK - (2 << 20),
        "{r:?}"
    );
    eprintln!(
        "through the host: {} of {} bytes written again after the failure",
        r.bytes_sent,
        DIFFER * BLOCK
    );
}
