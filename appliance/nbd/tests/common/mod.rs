//! Shared helpers for the integration tests: server start-up, bounded subprocesses, and a
//! tiny hand-written NBD client for protocol-level tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use ferry_nbd::proto::*;
use ferry_nbd::{Export, MemExport, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const STEP: Duration = Duration::from_secs(60);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "ferry_nbd=info".into()),
        )
        .with_test_writer()
        .try_init();
}

pub fn config_with(exports: Vec<(&str, Arc<dyn Export>)>) -> Arc<ServerConfig> {
    let exports: HashMap<String, Arc<dyn Export>> = exports
        .into_iter()
        .map(|(n, e)| (n.to_string(), e))
        .collect();
    Arc::new(ServerConfig {
        exports,
        tls: None,
        require_tls: false,
    })
}

pub fn mem_config(name: &str, size: usize) -> (Arc<MemExport>, Arc<ServerConfig>) {
    let mem = Arc::new(MemExport::new(size));
    let cfg = config_with(vec![(name, mem.clone() as Arc<dyn Export>)]);
    (mem, cfg)
}

/// A server on an ephemeral 127.0.0.1 port; the accept loop stops when the guard drops.
pub struct Server {
    pub port: u16,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn start_server(config: Arc<ServerConfig>) -> Server {
    init_tracing();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(ferry_nbd::serve_tcp(listener, config));
    Server { port, task }
}

/// Run a program with a time limit; the child is killed if the limit passes.
pub async fn run(program: &str, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    let out = tokio::time::timeout(STEP, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} timed out"))
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    out
}

/// Run a program that must succeed; returns stdout.
pub async fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    stdout
}

/// Run qemu-io commands against an NBD URL; every command must succeed.
pub async fn qemu_io(url: &str, cmds: &[&str]) -> String {
    let mut args: Vec<&str> = vec!["-f", "raw", url];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let out = run("qemu-io", &args).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let all = format!("{stdout}{stderr}");
    assert!(
        out.status.success() && !all.contains("failed") && !all.contains("error"),
        "qemu-io {cmds:?} failed: {}\n{all}",
        out.status
    );
    all
}

/// A deterministic, non-trivial byte pattern.
pub fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Minimal raw client.

pub struct OptReply {
    pub opt: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

pub async fn connect(port: u16) -> TcpStream {
    tokio::time::timeout(STEP, TcpStream::connect(("127.0.0.1", port)))
        .await
        .unwrap()
        .unwrap()
}

/// Read the greeting and send client flags (fixed newstyle + no zeroes).
pub async fn greet(s: &mut TcpStream) {
    assert_eq!(s.read_u64().await.unwrap(), NBDMAGIC);
    assert_eq!(s.read_u64().await.unwrap(), IHAVEOPT);
    let flags = s.read_u16().await.unwrap();
    assert_eq!(flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    s.write_u32(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .await
        .unwrap();
}

pub async fn send_opt(s: &mut TcpStream, opt: u32, data: &[u8]) {
    let mut b = Vec::new();
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).await.unwrap();
}

pub async fn read_opt_reply(s: &mut TcpStream) -> OptReply {
    tokio::time::timeout(STEP, async {
        assert_eq!(s.read_u64().await.unwrap(), OPT_REPLY_MAGIC);
        let opt = s.read_u32().await.unwrap();
        let kind = s.read_u32().await.unwrap();
        let len = s.read_u32().await.unwrap();
        assert!(len < 1 << 20);
        let mut data = vec![0; len as usize];
        s.read_exact(&mut data).await.unwrap();
        OptReply { opt, kind, data }
    })
    .await
    .expect("option reply timed out")
}

/// Read replies to one option until ACK or an error reply; returns all of them.
pub async fn read_opt_replies(s: &mut TcpStream) -> Vec<OptReply> {
    let mut v = Vec::new();
    loop {
        let r = read_opt_reply(s).await;
        let last = r.kind == REP_ACK || r.kind & (1 << 31) != 0;
        v.push(r);
        if last {
            return v;
        }
    }
}

pub fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

pub fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// Connect and enter transmission with OPT_GO; returns (stream, size, flags).
pub async fn connect_go(port: u16, name: &str) -> (TcpStream, u64, u16) {
    let mut s = connect(port).await;
    greet(&mut s).await;
    send_opt(&mut s, OPT_GO, &go_data(name, &[])).await;
    let replies = read_opt_replies(&mut s).await;
    let last = replies.last().unwrap();
    assert_eq!(last.kind, REP_ACK, "GO refused: {:#x}", last.kind);
    let info = replies
        .iter()
        .find(|r| r.kind == REP_INFO && r.data[..2] == [0, 0])
        .expect("no NBD_INFO_EXPORT");
    let size = u64::from_be_bytes(info.data[2..10].try_into().unwrap());
    let flags = u16::from_be_bytes(info.data[10..12].try_into().unwrap());
    (s, size, flags)
}

pub async fn send_req(
    s: &mut TcpStream,
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    len: u32,
) {
    let mut b = Vec::new();
    b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    s.write_all(&b).await.unwrap();
}

/// Read a simple reply header: (error, cookie).
pub async fn read_simple(s: &mut TcpStream) -> (u32, u64) {
    tokio::time::timeout(STEP, async {
        assert_eq!(s.read_u32().await.unwrap(), SIMPLE_REPLY_MAGIC);
        let err = s.read_u32().await.unwrap();
        let cookie = s.read_u64().await.unwrap();
        (err, cookie)
    })
    .await
    .expect("reply timed out")
}

/// True if the server closed the connection (EOF or reset) within the time limit.
pub async fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) | Err(_) => false,
    }
}
