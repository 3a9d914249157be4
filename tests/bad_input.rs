//! Bad input: malformed NBD traffic against the process server gets an NBD error or a closed
//! connection, never a crash, while another disk keeps replicating; a chunk altered on the
//! master target's disk is caught by verify and never served as data.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;
use support::*;

const MIB: u64 = 1 << 20;

fn raw(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Fixed-newstyle handshake by hand up to transmission on `export` (no structured replies).
fn negotiate(port: u16, export: &str) -> TcpStream {
    let mut s = raw(port);
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap(); // fixed newstyle + no zeroes
    let mut opt = Vec::new();
    opt.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
    opt.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
    opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
    opt.extend_from_slice(export.as_bytes());
    s.write_all(&opt).unwrap();
    let mut info = [0u8; 10];
    s.read_exact(&mut info).unwrap();
    s
}

fn request(cmd: u16, offset: u64, len: u32) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&cmd.to_be_bytes());
    r.extend_from_slice(&7u64.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r
}

/// The simple reply's error code, or None when the server closed the connection.
fn reply_error(s: &mut TcpStream) -> Option<u32> {
    let mut rep = [0u8; 16];
    s.read_exact(&mut rep).ok()?;
    Some(u32::from_be_bytes(rep[4..8].try_into().unwrap()))
}

fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn malformed_nbd_traffic_is_refused_and_other_disks_keep_replicating() {
    let site = Site::start("good", 16 * MIB, &[], |lab| {
        lab.nbd_tls = false;
        lab.disks.push(("victim".into(), 16 * MIB));
    });
    let port = site.lab.nbd_port;

    // Handshake garbage: the server closes.
    let mut s = raw(port);
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.write_all(b"NOT-IHAVEOPT-MAGIC-AT-ALL").unwrap();
    assert!(closed(&mut s), "bad option magic left the connection open");

    // Unknown option: NBD_REP_ERR_UNSUP, and the connection stays usable.
    let mut s = raw(port);
    s.read_exact(&mut greet).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
    opt.extend_from_slice(&999u32.to_be_bytes());
    opt.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&opt).unwrap();
    let mut rep = [0u8; 20];
    s.read_exact(&mut rep).unwrap();
    assert_eq!(
        u32::from_be_bytes(rep[12..16].try_into().unwrap()),
        (1 << 31) | 1
    );

    // Offsets past the end: an error reply, nothing journaled.
    let mut s = negotiate(port, "victim");
    s.write_all(&request(1, 16 * MIB - 10, 4096)).unwrap();
    s.write_all(&[0xAB; 4096]).unwrap();
    assert!(matches!(reply_error(&mut s), Some(e) if e != 0));
    s.write_all(&request(0, 16 * MIB, 512)).unwrap();
    assert!(matches!(reply_error(&mut s), Some(e) if e != 0));
    // Unknown command: EINVAL.
    s.write_all(&request(99, 0, 0)).unwrap();
    assert_eq!(reply_error(&mut s), Some(22));
    // Oversized length: the connection is closed rather than the payload buffered.
    s.write_all(&request(1, 0, u32::MAX)).unwrap();
    assert!(reply_error(&mut s).is_none_or(|e| e != 0));
    // Bad request magic: closed.
    let mut s = negotiate(port, "victim");
    s.write_all(&[0xde, 0xad, 0xbe, 0xef]).unwrap();
    s.write_all(&[0; 24]).unwrap();
    assert!(closed(&mut s));
    // A client that vanishes mid-request.
    let mut s = negotiate(port, "victim");
    s.write_all(&request(1, 0, 65536)).unwrap();
    s.write_all(&[1; 100]).unwrap();
    drop(s);

    // The victim disk journaled nothing of all that; the good disk still replicates.
    let victim = site.lab.status("victim").unwrap();
    assert_eq!(
        victim.journal_last_seq, 0,
        "bad traffic reached the journal: {victim:?}"
    );
    site.qemu_io(&[
        "write -P 0x42 1M 2M".into(),
        "write -P 0x43 5000 3000".into(),
    ]);
    let seq = site.caught_up();
    site.assert_point_equals_guest(seq);
}

#[test]
fn a_damaged_chunk_is_caught_by_verify_and_never_served() {
    let site = Site::start("tamper", 8 * MIB, &[], |_| {});
    site.qemu_io(&["write -P 0x61 0 4M".into(), "write -P 0x62 4M 64k".into()]);
    let seq = site.caught_up();
    let ok = site.lab.ferry(&["verify"]).unwrap();
    assert!(ok.status.success());

    // Damage one chunk in place (the recovery site's disk rots or is tampered with).
    let (victim, blob) = stored_chunks(&site.lab).swap_remove(0);
    damage_chunk(&site.lab, &victim, blob.len() as u64 / 2, 0x01);
    let name = victim.to_hex();

    let bad = site.lab.ferry(&["verify", "--json"]).unwrap();
    assert!(!bad.status.success(), "verify passed over a damaged chunk");
    let report: serde_json::Value = serde_json::from_slice(&bad.stdout).unwrap();
    let entry = report["bad"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"] == name.as_str())
        .unwrap_or_else(|| panic!("damaged chunk {name} not reported: {report}"));
    assert!(
        !entry["points"].as_array().unwrap().is_empty(),
        "no points named: {entry}"
    );

    // Instant access of the point refuses the damaged block instead of serving it.
    let (mut serve, port) = serve_point(&site, seq);
    let out = site.dir.path().join("read-back.raw");
    let convert = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(format!("nbd://127.0.0.1:{port}/tamper"))
        .arg(&out)
        .output()
        .unwrap();
    let _ = serve.kill();
    let _ = serve.wait();
    assert!(
        !convert.status.success(),
        "a damaged point was read back without error"
    );
    // And the export command refuses it too.
    let export = site
        .lab
        .ferry(&[
            "export",
            "--disk",
            "tamper",
            "--point",
            &seq.to_string(),
            "--output",
            out.to_str().unwrap(),
        ])
        .unwrap();
    assert!(
        !export.status.success(),
        "export of a damaged point succeeded"
    );
}

/// A command whose reader went away (`ferry hw probe | head -c0`) ends like a Unix tool, by
/// SIGPIPE, and does not panic on the broken pipe.
#[test]
fn a_command_whose_reader_went_away_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let mut child = std::process::Command::new(exe())
        .args(["hw", "probe", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Close the read end before the probe has anything to print.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.signal(), Some(13), "{:?} {stderr}", out.status);
}
