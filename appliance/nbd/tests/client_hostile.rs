//! The NBD client against our own server (structured replies, block status, split reads,
//! pipelining, STARTTLS) and against hostile fake servers over `tokio::io::duplex`: every
//! malformed reply must end in a typed `ClientError` within the timeout, never a hang or panic.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_nbd::client::{Client, ClientError, ClientOptions, Extent};
use ferry_nbd::proto::*;
use ferry_nbd::{Export, MemExport, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

const MIB: usize = 1 << 20;
const LIMIT: Duration = Duration::from_secs(60);
const SHORT: Duration = Duration::from_millis(300);

fn config(mem: Arc<MemExport>, tls: Option<tokio_rustls::TlsAcceptor>) -> Arc<ServerConfig> {
    let mut exports: HashMap<String, Arc<dyn Export>> = HashMap::new();
    exports.insert("m".into(), mem);
    Arc::new(ServerConfig {
        require_tls: tls.is_some(),
        exports,
        tls,
    })
}

fn ours(mem: Arc<MemExport>) -> DuplexStream {
    let (a, b) = tokio::io::duplex(4 * MIB);
    tokio::spawn(ferry_nbd::serve_connection(a, config(mem, None)));
    b
}

#[tokio::test]
async fn structured_reads_block_status_and_pipelining_with_our_server() {
    tokio::time::timeout(LIMIT, async {
        let mem = Arc::new(MemExport::new(80 * MIB));
        let opts = ClientOptions::new("m").meta_context(BASE_ALLOCATION);
        let mut c = Client::handshake_with(ours(mem.clone()), opts)
            .await
            .unwrap();
        assert!(c.structured());
        assert_eq!(c.meta_context_id(BASE_ALLOCATION), Some(BASE_ALLOCATION_ID));
        assert_eq!(c.meta_context_id("qemu:dirty-bitmap:x"), None);
        assert_eq!(c.max_request(), MAX_PAYLOAD);

        // A write and a read larger than one request: both are split.
        let data: Vec<u8> = (0..40 * MIB).map(|i| (i % 251) as u8 + 1).collect();
        c.write(8 * MIB as u64, &data, false).await.unwrap();
        let back = c.read(0, 80 * MIB as u32).await.unwrap();
        assert!(back[..8 * MIB].iter().all(|&b| b == 0));
        assert!(back[8 * MIB..48 * MIB] == data[..]);
        assert!(back[48 * MIB..].iter().all(|&b| b == 0));

        let ext = c.block_status_all(BASE_ALLOCATION_ID).await.unwrap();
        let z = STATE_HOLE | STATE_ZERO;
        let m = MIB as u64;
        assert_eq!(
            ext,
            vec![
                Extent {
                    offset: 0,
                    len: 8 * m,
                    flags: z
                },
                Extent {
                    offset: 8 * m,
                    len: 40 * m,
                    flags: 0
                },
                Extent {
                    offset: 48 * m,
                    len: 32 * m,
                    flags: z
                },
            ]
        );
        // One request: extents stay inside it.
        let e = c
            .block_status(4 * m, 8 * MIB as u32, BASE_ALLOCATION_ID)
            .await
            .unwrap();
        assert_eq!(e.iter().map(|e| e.len).sum::<u64>(), 8 * m);
        assert!(matches!(
            c.block_status(0, 4096, 99).await,
            Err(ClientError::Usage(_))
        ));

        // Pipelined writes: at most `depth` in flight, every one completed once.
        let mut done = Vec::new();
        for i in 0..64u64 {
            done.extend(
                c.write_pipelined(i * 65536, &[i as u8 + 1; 65536], false, 8)
                    .await
                    .unwrap(),
            );
            assert!(c.in_flight() <= 8);
        }
        done.extend(c.drain().await.unwrap());
        assert_eq!(done.len(), 64);
        let mut cookies: Vec<u64> = done.iter().map(|d| d.cookie).collect();
        cookies.dedup();
        assert_eq!(cookies.len(), 64);
        c.submit_flush().await.unwrap();
        c.complete().await.unwrap();
        // A server error on a pipelined write is that request's error; the connection goes on.
        c.submit_write(80 * m - 1, &[1, 2], false).await.unwrap();
        assert!(matches!(c.complete().await, Err(ClientError::Errno(_))));
        assert!(matches!(c.complete().await, Err(ClientError::Usage(_))));
        // A one-at-a-time call completes what is still in flight first.
        c.submit_write(0, &[9; 512], true).await.unwrap();
        assert_eq!(c.read(0, 512).await.unwrap(), vec![9; 512]);
        assert_eq!(c.read(63 * 65536, 1).await.unwrap(), vec![64]);
        c.disconnect().await.unwrap();
        assert_eq!(mem.contents()[65536], 2);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn simple_replies_when_not_structured() {
    let mem = Arc::new(MemExport::new(MIB));
    let opts = ClientOptions {
        structured: false,
        meta_contexts: vec![BASE_ALLOCATION.into()],
        ..ClientOptions::new("m")
    };
    let mut c = Client::handshake_with(ours(mem), opts).await.unwrap();
    assert!(!c.structured());
    assert_eq!(c.meta_context_id(BASE_ALLOCATION), None);
    c.write(10, b"abc", true).await.unwrap();
    assert_eq!(c.read(9, 5).await.unwrap(), b"\0abc\0");
    assert!(matches!(
        c.block_status(0, 10, BASE_ALLOCATION_ID).await,
        Err(ClientError::Usage(_))
    ));
}

#[tokio::test]
async fn unknown_export_is_refused() {
    let mem = Arc::new(MemExport::new(MIB));
    let r = Client::handshake_with(ours(mem), ClientOptions::new("nope")).await;
    assert!(matches!(
        r,
        Err(ClientError::Refused { option: OPT_GO, .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// TLS against our server.

#[tokio::test]
async fn starttls_with_our_server() {
    use rcgen::{CertificateParams, KeyPair};
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let acceptor =
        ferry_nbd::tls::acceptor_from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes())
            .unwrap();
    let mem = Arc::new(MemExport::new(MIB));
    let (a, b) = tokio::io::duplex(MIB);
    tokio::spawn(ferry_nbd::serve_connection(
        a,
        config(mem.clone(), Some(acceptor)),
    ));

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let opts = ClientOptions::new("m").meta_context(BASE_ALLOCATION);
    let mut c = tokio::time::timeout(LIMIT, Client::handshake_tls(b, Arc::new(tls), name, opts))
        .await
        .unwrap()
        .unwrap();
    c.write(4096, &[5; 4096], true).await.unwrap();
    assert_eq!(c.read(4096, 4096).await.unwrap(), vec![5; 4096]);
    let e = c.block_status(0, 8192, BASE_ALLOCATION_ID).await.unwrap();
    assert_eq!(
        e[1],
        Extent {
            offset: 4096,
            len: 4096,
            flags: 0
        }
    );
    c.disconnect().await.unwrap();
    assert_eq!(mem.contents()[4096], 5);

    // Without TLS the server refuses GO.
    let (a, b) = tokio::io::duplex(MIB);
    let acceptor2 = {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["x".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        ferry_nbd::tls::acceptor_from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes())
            .unwrap()
    };
    tokio::spawn(ferry_nbd::serve_connection(a, config(mem, Some(acceptor2))));
    let r = Client::handshake_with(b, ClientOptions::new("m")).await;
    assert!(matches!(r, Err(ClientError::Refused { .. })), "{r:?}");
}

// ---------------------------------------------------------------------------------------------
// Hostile servers.

const SIZE: u64 = MIB as u64;
const CTX: u32 = 7;

struct Req {
    _kind: u16,
    cookie: u64,
    offset: u64,
    len: u32,
}

/// Fake server side: a fixed-newstyle handshake that accepts structured replies and
/// `base:allocation` (id [`CTX`]), then hands over.
async fn fake_handshake(s: &mut DuplexStream) {
    s.write_u64(NBDMAGIC).await.unwrap();
    s.write_u64(IHAVEOPT).await.unwrap();
    s.write_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
        .await
        .unwrap();
    let _cflags = s.read_u32().await.unwrap();
    loop {
        assert_eq!(s.read_u64().await.unwrap(), IHAVEOPT);
        let opt = s.read_u32().await.unwrap();
        let len = s.read_u32().await.unwrap();
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await.unwrap();
        match opt {
            OPT_STRUCTURED_REPLY => opt_reply(s, opt, REP_ACK, vec![]).await,
            OPT_SET_META_CONTEXT => {
                let mut p = CTX.to_be_bytes().to_vec();
                p.extend_from_slice(BASE_ALLOCATION.as_bytes());
                opt_reply(s, opt, REP_META_CONTEXT, p).await;
                opt_reply(s, opt, REP_ACK, vec![]).await;
            }
            OPT_GO => {
                let mut p = INFO_EXPORT.to_be_bytes().to_vec();
                p.extend_from_slice(&SIZE.to_be_bytes());
                p.extend_from_slice(&(FLAG_HAS_FLAGS | FLAG_SEND_FLUSH).to_be_bytes());
                opt_reply(s, opt, REP_INFO, p).await;
                opt_reply(s, opt, REP_ACK, vec![]).await;
                return;
            }
            _ => opt_reply(s, opt, REP_ERR_UNSUP, vec![]).await,
        }
    }
}

async fn opt_reply(s: &mut DuplexStream, opt: u32, kind: u32, payload: Vec<u8>) {
    let mut b = Vec::new();
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(&payload);
    s.write_all(&b).await.unwrap()
}

async fn read_req(s: &mut DuplexStream) -> Req {
    assert_eq!(s.read_u32().await.unwrap(), REQUEST_MAGIC);
    let _flags = s.read_u16().await.unwrap();
    let kind = s.read_u16().await.unwrap();
    let cookie = s.read_u64().await.unwrap();
    let offset = s.read_u64().await.unwrap();
    let len = s.read_u32().await.unwrap();
    if kind == CMD_WRITE {
        let mut d = vec![0u8; len as usize];
        s.read_exact(&mut d).await.unwrap();
    }
    Req {
        _kind: kind,
        cookie,
        offset,
        len,
    }
}

fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b
}

fn data_chunk(flags: u16, cookie: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    chunk(
        flags,
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        &[&offset.to_be_bytes()[..], data].concat(),
    )
}

fn hole_chunk(flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let p = [&offset.to_be_bytes()[..], &len.to_be_bytes()].concat();
    chunk(flags, REPLY_TYPE_OFFSET_HOLE, cookie, &p)
}

fn status_chunk(cookie: u64, ctx: u32, ext: &[(u32, u32)]) -> Vec<u8> {
    let mut p = ctx.to_be_bytes().to_vec();
    for (l, f) in ext {
        p.extend_from_slice(&l.to_be_bytes());
        p.extend_from_slice(&f.to_be_bytes());
    }
    chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, cookie, &p)
}

/// Run a client against a fake server whose transmission phase is `script`; `op` drives the
/// client. Returns the client's result and how long it took.
async fn against<F, Fut, T>(script: F, op: impl AsyncOp<T>) -> (Result<T, ClientError>, Duration)
where
    F: FnOnce(DuplexStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (mut a, b) = tokio::io::duplex(MIB);
    let server = tokio::spawn(async move {
        fake_handshake(&mut a).await;
        script(a).await;
    });
    let opts = ClientOptions::new("e")
        .meta_context(BASE_ALLOCATION)
        .timeout(SHORT);
    let start = Instant::now();
    let r = tokio::time::timeout(LIMIT, async {
        let mut c = Client::handshake_with(b, opts).await?;
        op.run(&mut c).await
    })
    .await
    .expect("client hung");
    let took = start.elapsed();
    server.abort();
    (r, took)
}

type Fake = Client<DuplexStream>;

trait AsyncOp<T> {
    fn run(self, c: &mut Fake) -> impl Future<Output = Result<T, ClientError>>;
}

struct Read(u64, u32);
impl AsyncOp<Vec<u8>> for Read {
    async fn run(self, c: &mut Fake) -> Result<Vec<u8>, ClientError> {
        c.read(self.0, self.1).await
    }
}

struct Status(u64, u32);
impl AsyncOp<Vec<Extent>> for Status {
    async fn run(self, c: &mut Fake) -> Result<Vec<Extent>, ClientError> {
        c.block_status(self.0, self.1, CTX).await
    }
}

struct Flush;
impl AsyncOp<()> for Flush {
    async fn run(self, c: &mut Fake) -> Result<(), ClientError> {
        c.flush().await
    }
}

/// Answer one request with `reply(req)` and then keep the connection open.
fn answer(
    reply: fn(&Req) -> Vec<u8>,
) -> impl FnOnce(DuplexStream) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> {
    move |mut s| {
        Box::pin(async move {
            let r = read_req(&mut s).await;
            let _ = s.write_all(&reply(&r)).await;
            // Hold the connection open (a hang is the client's timeout to catch).
            let mut sink = [0u8; 64];
            while let Ok(n) = s.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        })
    }
}

fn protocol<T: std::fmt::Debug>(r: &Result<T, ClientError>) -> bool {
    matches!(r, Err(ClientError::Protocol(_)))
}

#[tokio::test]
async fn well_formed_sparse_read_out_of_order() {
    let (r, _) = against(
        answer(|q| {
            let mut b = data_chunk(0, q.cookie, q.offset + 100, &[7; 50]);
            b.extend(hole_chunk(0, q.cookie, q.offset + 150, 50));
            b.extend(data_chunk(REPLY_FLAG_DONE, q.cookie, q.offset, &[1; 100]));
            b
        }),
        Read(1000, 200),
    )
    .await;
    let v = r.unwrap();
    assert_eq!(v[..100], [1; 100]);
    assert_eq!(v[100..150], [7; 50]);
    assert_eq!(v[150..], [0; 50]);
}

#[tokio::test]
async fn oversized_reply_length() {
    let (r, took) = against(
        answer(|q| {
            let mut b = data_chunk(REPLY_FLAG_DONE, q.cookie, q.offset, &[]);
            b[16..20].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
            b
        }),
        Read(0, 4096),
    )
    .await;
    assert!(protocol(&r), "{r:?}");
    assert!(took < SHORT);
    // The same for an error chunk and a block status chunk.
    let (r, _) = against(
        answer(|q| {
            let mut b = chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, q.cookie, &[]);
            b[16..20].copy_from_slice(&0x7fff_ffffu32.to_be_bytes());
            b
        }),
        Flush,
    )
    .await;
    assert!(protocol(&r), "{r:?}");
    let (r, _) = against(
        answer(|q| {
            let mut b = chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, q.cookie, &[]);
            b[16..20].copy_from_slice(&0x4000_0004u32.to_be_bytes());
            b
        }),
        Status(0, 4096),
    )
    .await;
    assert!(protocol(&r), "{r:?}");
}

#[tokio::test]
async fn more_data_than_requested() {
    let (r, _) = against(
        answer(|q| {
            data_chunk(
                REPLY_FLAG_DONE,
                q.cookie,
                q.offset,
                &vec![1; q.len as usize + 1],
            )
        }),
        Read(0, 4096),
    )
    .await;
    assert!(protocol(&r), "{r:?}");
}

#[tokio::test]
async fn data_outside_the_request() {
    for shift in [-1i64, 1, 4096, -(1 << 40)] {
        let script = match shift {
            -1 => answer(|q| data_chunk(REPLY_FLAG_DONE, q.cookie, q.offset - 1, &[1; 4096])),
            1 => answer(|q| data_chunk(REPLY_FLAG_DONE, q.cookie, q.offset + 1, &[1; 4096])),
            4096 => answer(|q| hole_chunk(REPLY_FLAG_DONE, q.cookie, q.offset + 4096, 1)),
            _ => answer(|q| hole_chunk(REPLY_FLAG_DONE, q.cookie, u64::MAX, u32::MAX)),
        };
        let (r, _) = against(script, Read(8192, 4096)).await;
        assert!(protocol(&r), "{shift}: {r:?}");
    }
}

#[tokio::test]
async fn overlapping_and_incomplete_reads() {
    let (r, _) = against(
        answer(|q| {
            let mut b = data_chunk(0, q.cookie, q.offset, &[1; 100]);
            b.extend(hole_chunk(REPLY_FLAG_DONE, q.cookie, q.offset + 50, 150));
            b
        }),
        Read(0, 200),
    )
    .await;
    assert!(protocol(&r), "{r:?}");
    let (r, _) = against(
        answer(|q| data_chunk(REPLY_FLAG_DONE, q.cookie, q.offset, &[1; 100])),
        Read(0, 200),
    )
    .await;
    assert!(protocol(&r), "{r:?}");
}

#[tokio::test]
async fn error_chunk_is_the_requests_error() {
    let (r, _) = against(
        answer(|q| {
            let mut p = EIO.to_be_bytes().to_vec();
            p.extend_from_slice(&4u16.to_be_bytes());
            p.extend_from_slice(b"oops");
            let mut b = hole_chunk(0, q.cookie, q.offset, 10);
            b.extend(chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, q.cookie, &p));
            b
        }),
        Read(0, 4096),
    )
    .await;
    assert!(matches!(r, Err(ClientError::Errno(EIO))), "{r:?}");
    // A message longer than the chunk is malformed.
    let (r, _) = against(
        answer(|q| {
            let mut p = EIO.to_be_bytes().to_vec();
            p.extend_from_slice(&400u16.to_be_bytes());
            chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, q.cookie, &p)
        }),
        Flush,
    )
    .await;
    assert!(protocol(&r), "{r:?}");
}

#[tokio::test]
async fn block_status_checks() {
    // Well formed: the last extent may run past the request and is clipped.
    let (r, _) = against(
        answer(|q| status_chunk(q.cookie, CTX, &[(4096, 3), (1 << 19, 0)])),
        Status(0, 8192),
    )
    .await;
    assert_eq!(
        r.unwrap(),
        vec![
            Extent {
                offset: 0,
                len: 4096,
                flags: 3
            },
            Extent {
                offset: 4096,
                len: 4096,
                flags: 0
            }
        ]
    );
    let bad: [fn(&Req) -> Vec<u8>; 6] = [
        // Past the end of the export.
        |q| status_chunk(q.cookie, CTX, &[(SIZE as u32 + 4096, 0)]),
        // An extent that starts past the requested range.
        |q| status_chunk(q.cookie, CTX, &[(q.len, 0), (4096, 1)]),
        // Zero-length extent.
        |q| status_chunk(q.cookie, CTX, &[(0, 0), (4096, 1)]),
        // A context that was never negotiated.
        |q| status_chunk(q.cookie, 99, &[(4096, 0)]),
        // No extent at all.
        |q| status_chunk(q.cookie, CTX, &[]),
        // Not a multiple of 8 after the context id.
        |q| {
            let mut b = status_chunk(q.cookie, CTX, &[(4096, 0)]);
            b.push(0);
            b[16..20].copy_from_slice(&13u32.to_be_bytes());
            b
        },
    ];
    for (i, f) in bad.into_iter().enumerate() {
        let (r, _) = against(answer(f), Status(0, 8192)).await;
        assert!(protocol(&r), "case {i}: {r:?}");
    }
    // DONE without a chunk for the context.
    let (r, _) = against(
        answer(|q| chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, q.cookie, &[])),
        Status(0, 8192),
    )
    .await;
    assert!(protocol(&r), "{r:?}");
}

#[tokio::test]
async fn unknown_reply_type() {
    let (r, _) = against(
        answer(|q| chunk(REPLY_FLAG_DONE, 77, q.cookie, &[0; 8])),
        Read(0, 8),
    )
    .await;
    assert!(protocol(&r), "{r:?}");
    // A chunk type meant for another command.
    let (r, _) = against(
        answer(|q| data_chunk(REPLY_FLAG_DONE, q.cookie, 0, &[0; 8])),
        Flush,
    )
    .await;
    assert!(protocol(&r), "{r:?}");
}

#[tokio::test]
async fn wrong_cookie() {
    let (r, _) = against(
        answer(|q| data_chunk(REPLY_FLAG_DONE, q.cookie + 1, q.offset, &[1; 8])),
        Read(0, 8),
    )
    .await;
    assert!(matches!(r, Err(ClientError::UnexpectedCookie(_))), "{r:?}");
    let (r, _) = against(
        answer(|q| {
            let mut b = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
            b.extend_from_slice(&0u32.to_be_bytes());
            b.extend_from_slice(&(q.cookie ^ 0xff).to_be_bytes());
            b
        }),
        Flush,
    )
    .await;
    assert!(matches!(r, Err(ClientError::UnexpectedCookie(_))), "{r:?}");
}

#[tokio::test]
async fn bad_magic() {
    let (r, _) = against(
        answer(|_| vec![0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        Flush,
    )
    .await;
    assert!(
        matches!(r, Err(ClientError::BadMagic(0xdead_beef))),
        "{r:?}"
    );
}

#[tokio::test]
async fn server_closes_mid_reply() {
    let (r, _) = against(
        |mut s: DuplexStream| async move {
            let q = read_req(&mut s).await;
            let b = data_chunk(
                REPLY_FLAG_DONE,
                q.cookie,
                q.offset,
                &vec![1; q.len as usize],
            );
            s.write_all(&b[..b.len() / 2]).await.unwrap();
            drop(s);
        },
        Read(0, 65536),
    )
    .await;
    assert!(matches!(r, Err(ClientError::Closed)), "{r:?}");
}

#[tokio::test]
async fn server_never_answers() {
    let (r, took) = against(
        |mut s: DuplexStream| async move {
            let _q = read_req(&mut s).await;
            tokio::time::sleep(LIMIT).await;
        },
        Flush,
    )
    .await;
    assert!(matches!(r, Err(ClientError::Timeout(_))), "{r:?}");
    assert!(took >= SHORT && took < SHORT * 4, "{took:?}");
}

#[tokio::test]
async fn stalls_mid_chunk_and_then_broken() {
    let (a, b) = tokio::io::duplex(MIB);
    let server = tokio::spawn(async move {
        let mut a = a;
        fake_handshake(&mut a).await;
        let q = read_req(&mut a).await;
        let b = data_chunk(REPLY_FLAG_DONE, q.cookie, q.offset, &[1; 4096]);
        a.write_all(&b[..100]).await.unwrap();
        tokio::time::sleep(LIMIT).await;
    });
    let opts = ClientOptions::new("e").timeout(SHORT);
    let mut c = Client::handshake_with(b, opts).await.unwrap();
    let r = c.read(0, 4096).await;
    assert!(matches!(r, Err(ClientError::Timeout(_))), "{r:?}");
    // The stream is out of step now: later calls refuse at once.
    assert!(matches!(c.flush().await, Err(ClientError::Broken)));
    server.abort();
}

#[tokio::test]
async fn hostile_handshakes() {
    async fn hs(
        script: impl Future<Output = ()> + Send + 'static,
        b: DuplexStream,
    ) -> Result<Fake, ClientError> {
        let t = tokio::spawn(script);
        let r = tokio::time::timeout(
            LIMIT,
            Client::handshake_with(b, ClientOptions::new("e").timeout(SHORT)),
        )
        .await
        .expect("client hung");
        t.abort();
        r
    }
    // Not NBD.
    let (mut a, b) = tokio::io::duplex(4096);
    a.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
    let r = hs(async move { tokio::time::sleep(LIMIT).await }, b).await;
    drop(a);
    assert!(matches!(r, Err(ClientError::NotNbd)), "{r:?}");
    // Silent server: the handshake times out.
    let (a, b) = tokio::io::duplex(4096);
    let r = hs(
        async move {
            let _a = a;
            tokio::time::sleep(LIMIT).await
        },
        b,
    )
    .await;
    assert!(matches!(r, Err(ClientError::Timeout(_))), "{r:?}");
    // Option reply of 4 GiB.
    let (mut a, b) = tokio::io::duplex(4096);
    let r = hs(
        async move {
            a.write_u64(NBDMAGIC).await.unwrap();
            a.write_u64(IHAVEOPT).await.unwrap();
            a.write_u16(FLAG_FIXED_NEWSTYLE).await.unwrap();
            let _ = a.read_u32().await;
            let mut opt = [0u8; 16];
            a.read_exact(&mut opt).await.unwrap();
            a.write_u64(OPT_REPLY_MAGIC).await.unwrap();
            a.write_u32(OPT_STRUCTURED_REPLY).await.unwrap();
            a.write_u32(REP_ACK).await.unwrap();
            a.write_u32(u32::MAX).await.unwrap();
            tokio::time::sleep(LIMIT).await
        },
        b,
    )
    .await;
    assert!(protocol(&r), "{r:?}");
    // Endless INFO replies to GO: bounded.
    let (mut a, b) = tokio::io::duplex(1 << 16);
    let r = hs(
        async move {
            a.write_u64(NBDMAGIC).await.unwrap();
            a.write_u64(IHAVEOPT).await.unwrap();
            a.write_u16(FLAG_FIXED_NEWSTYLE).await.unwrap();
            let _ = a.read_u32().await;
            let mut opt = [0u8; 16];
            a.read_exact(&mut opt).await.unwrap();
            for _ in 0..2000 {
                a.write_u64(OPT_REPLY_MAGIC).await.unwrap();
                a.write_u32(OPT_STRUCTURED_REPLY).await.unwrap();
                a.write_u32(REP_ERR_UNSUP).await.unwrap();
                a.write_u32(0).await.unwrap();
                let mut go = [0u8; 16];
                if a.read_exact(&mut go).await.is_err() {
                    return;
                }
                let len = u32::from_be_bytes(go[12..16].try_into().unwrap());
                let mut d = vec![0u8; len as usize];
                a.read_exact(&mut d).await.unwrap();
                for _ in 0..2000 {
                    a.write_u64(OPT_REPLY_MAGIC).await.unwrap();
                    a.write_u32(OPT_GO).await.unwrap();
                    a.write_u32(REP_INFO).await.unwrap();
                    a.write_u32(2).await.unwrap();
                    if a.write_u16(99).await.is_err() {
                        return;
                    }
                }
            }
        },
        b,
    )
    .await;
    assert!(protocol(&r), "{r:?}");
}
