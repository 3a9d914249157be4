//! Protocol-level tests with a hand-written client over raw TCP: malformed and hostile input,
//! structured replies and block status. After each abuse a well-behaved client must still work.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use ferry_nbd::proto::*;
use ferry_nbd::{Export, MemExport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMIT: Duration = Duration::from_secs(60);
const SIZE: usize = 1 << 20;

/// A well-behaved client still gets service: write then read back.
async fn still_works(port: u16) {
    let (mut s, size, _) = connect_go(port, "disk").await;
    assert_eq!(size, SIZE as u64);
    send_req(&mut s, 0, CMD_WRITE, 1, 4096, 4).await;
    s.write_all(b"ok!!").await.unwrap();
    assert_eq!(read_simple(&mut s).await, (0, 1));
    send_req(&mut s, 0, CMD_READ, 2, 4096, 4).await;
    assert_eq!(read_simple(&mut s).await, (0, 2));
    let mut b = [0u8; 4];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"ok!!");
    send_req(&mut s, 0, CMD_DISC, 3, 0, 0).await;
    assert!(closed_by_server(&mut s).await);
}

fn setup() -> (Arc<MemExport>, Arc<ferry_nbd::ServerConfig>) {
    let mem = Arc::new(MemExport::new(SIZE));
    let ro = Arc::new(MemExport::new(SIZE).with_read_only(true));
    let cfg = config_with(vec![
        ("disk", mem.clone() as Arc<dyn Export>),
        ("ro", ro as Arc<dyn Export>),
    ]);
    (mem, cfg)
}

#[tokio::test]
async fn handshake_abuse() {
    tokio::time::timeout(LIMIT, async {
        let (_mem, cfg) = setup();
        let srv = start_server(cfg).await;

        // Garbage instead of the option magic: closed.
        let mut s = connect(srv.port).await;
        greet(&mut s).await;
        s.write_all(&[0xde; 16]).await.unwrap();
        assert!(closed_by_server(&mut s).await);

        // Client flags without fixed newstyle: closed.
        let mut s = connect(srv.port).await;
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).await.unwrap();
        s.write_u32(0).await.unwrap();
        assert!(closed_by_server(&mut s).await);

        // Unknown option, oversized option, malformed GO, unknown export, LIST, STARTTLS
        // without TLS, meta context before structured replies: all answered, connection lives.
        let mut s = connect(srv.port).await;
        greet(&mut s).await;
        send_opt(&mut s, 0x4242, b"whatever").await;
        let r = read_opt_reply(&mut s).await;
        assert_eq!((r.opt, r.kind), (0x4242, REP_ERR_UNSUP));
        send_opt(&mut s, OPT_INFO, &vec![0u8; 100 * 1024]).await;
        assert_eq!(read_opt_reply(&mut s).await.kind, REP_ERR_TOO_BIG);
        let mut bad_go = go_data("disk", &[]);
        bad_go[3] = 200; // name length beyond the data
        send_opt(&mut s, OPT_GO, &bad_go).await;
        assert_eq!(read_opt_reply(&mut s).await.kind, REP_ERR_INVALID);
        send_opt(&mut s, OPT_GO, &go_data("nope", &[])).await;
        assert_eq!(read_opt_reply(&mut s).await.kind, REP_ERR_UNKNOWN);
        send_opt(&mut s, OPT_LIST, &[]).await;
        let names: Vec<String> = read_opt_replies(&mut s)
            .await
            .into_iter()
            .filter(|r| r.kind == REP_SERVER)
            .map(|r| String::from_utf8(r.data[4..].to_vec()).unwrap())
            .collect();
        assert_eq!(names, vec!["disk", "ro"]);
        send_opt(&mut s, OPT_STARTTLS, &[]).await;
        assert_eq!(read_opt_reply(&mut s).await.kind, REP_ERR_UNSUP);
        send_opt(
            &mut s,
            OPT_SET_META_CONTEXT,
            &meta_data("disk", &[BASE_ALLOCATION]),
        )
        .await;
        assert_eq!(read_opt_reply(&mut s).await.kind, REP_ERR_INVALID);
        let mut bad_meta = meta_data("disk", &[BASE_ALLOCATION]);
        bad_meta[11] = 0xff; // query count far beyond the data
        send_opt(&mut s, OPT_LIST_META_CONTEXT, &bad_meta).await;
        assert_eq!(read_opt_reply(&mut s).await.kind, REP_ERR_INVALID);
        send_opt(&mut s, OPT_INFO, &go_data("disk", &[INFO_BLOCK_SIZE])).await;
        let replies = read_opt_replies(&mut s).await;
        let bs = replies
            .iter()
            .find(|r| r.kind == REP_INFO && r.data[..2] == [0, 3])
            .unwrap();
        assert_eq!(&bs.data[2..], &[0, 0, 0, 1, 0, 0, 16, 0, 2, 0, 0, 0]);
        send_opt(&mut s, OPT_ABORT, &[]).await;
        assert_eq!(read_opt_reply(&mut s).await.kind, REP_ACK);
        assert!(closed_by_server(&mut s).await);

        // EXPORT_NAME with an unknown name: no error reply exists, so the server closes.
        let mut s = connect(srv.port).await;
        greet(&mut s).await;
        send_opt(&mut s, OPT_EXPORT_NAME, b"nope").await;
        assert!(closed_by_server(&mut s).await);

        // EXPORT_NAME with a known name: size + flags, no zero padding (NO_ZEROES).
        let mut s = connect(srv.port).await;
        greet(&mut s).await;
        send_opt(&mut s, OPT_EXPORT_NAME, b"ro").await;
        assert_eq!(s.read_u64().await.unwrap(), SIZE as u64);
        let flags = s.read_u16().await.unwrap();
        assert_ne!(flags & FLAG_READ_ONLY, 0);
        send_req(&mut s, 0, CMD_WRITE, 9, 0, 3).await;
        s.write_all(b"abc").await.unwrap();
        assert_eq!(read_simple(&mut s).await, (EPERM, 9));

        // A huge option length followed by a hang-up: nothing is allocated, the task ends.
        let mut s = connect(srv.port).await;
        greet(&mut s).await;
        let mut b = Vec::new();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&OPT_GO.to_be_bytes());
        b.extend_from_slice(&u32::MAX.to_be_bytes());
        s.write_all(&b).await.unwrap();
        s.write_all(&[0u8; 4096]).await.unwrap();
        drop(s);

        still_works(srv.port).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn transmission_abuse() {
    tokio::time::timeout(LIMIT, async {
        let (mem, cfg) = setup();
        let srv = start_server(cfg).await;
        let (mut s, _, flags) = connect_go(srv.port, "disk").await;
        let want = FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_TRIM
            | FLAG_SEND_WRITE_ZEROES;
        assert_eq!(
            flags, want,
            "no CAN_MULTI_CONN, no READ_ONLY, no DF without structured replies"
        );

        // Reads out of range, oversized, zero-length, overflowing: EINVAL, no data follows.
        for (cookie, off, len) in [
            (1, SIZE as u64, 1),
            (2, SIZE as u64 - 1, 2),
            (3, 0, MAX_PAYLOAD + 1),
            (4, 0, 0),
            (5, u64::MAX, 4096),
        ] {
            send_req(&mut s, 0, CMD_READ, cookie, off, len).await;
            assert_eq!(read_simple(&mut s).await, (EINVAL, cookie));
        }
        // Write past the end: ENOSPC, and the payload is consumed (next request parses fine).
        send_req(&mut s, 0, CMD_WRITE, 6, SIZE as u64 - 2, 4).await;
        s.write_all(&[9, 9, 9, 9]).await.unwrap();
        assert_eq!(read_simple(&mut s).await, (ENOSPC, 6));
        send_req(&mut s, 0, CMD_WRITE_ZEROES, 7, SIZE as u64, 1).await;
        assert_eq!(read_simple(&mut s).await, (ENOSPC, 7));
        send_req(&mut s, 0, CMD_TRIM, 8, SIZE as u64, 1).await;
        assert_eq!(read_simple(&mut s).await, (EINVAL, 8));
        // Unknown command and unknown flags.
        send_req(&mut s, 0, 99, 10, 0, 0).await;
        assert_eq!(read_simple(&mut s).await, (EINVAL, 10));
        send_req(&mut s, 1 << 9, CMD_FLUSH, 11, 0, 0).await;
        assert_eq!(read_simple(&mut s).await, (EINVAL, 11));
        // Block status without a negotiated meta context.
        send_req(&mut s, 0, CMD_BLOCK_STATUS, 12, 0, 4096).await;
        assert_eq!(read_simple(&mut s).await, (EINVAL, 12));
        // Pipelined requests are answered in order; writes applied in order.
        for i in 0..50u64 {
            send_req(
                &mut s,
                if i % 7 == 0 { CMD_FLAG_FUA } else { 0 },
                CMD_WRITE,
                100 + i,
                0,
                1,
            )
            .await;
            s.write_all(&[i as u8]).await.unwrap();
        }
        send_req(&mut s, 0, CMD_FLUSH, 200, 0, 0).await;
        for i in 0..50u64 {
            assert_eq!(read_simple(&mut s).await, (0, 100 + i));
        }
        assert_eq!(read_simple(&mut s).await, (0, 200));
        assert_eq!(mem.contents()[0], 49);
        assert_eq!(mem.contents()[SIZE - 2..], [0, 0]);

        // A write longer than the maximum cannot be skipped safely: the server closes.
        send_req(&mut s, 0, CMD_WRITE, 13, 0, MAX_PAYLOAD + 1).await;
        assert!(closed_by_server(&mut s).await);

        // Bad request magic: closed.
        let (mut s, _, _) = connect_go(srv.port, "disk").await;
        s.write_all(&[0x55; 28]).await.unwrap();
        assert!(closed_by_server(&mut s).await);

        // Client vanishes halfway through a write payload: nothing is applied.
        let before = mem.write_count();
        let (mut s, _, _) = connect_go(srv.port, "disk").await;
        send_req(&mut s, 0, CMD_WRITE, 14, 0, 1 << 20).await;
        s.write_all(&[0xee; 1000]).await.unwrap();
        drop(s);
        // And halfway through a request header.
        let (mut s, _, _) = connect_go(srv.port, "disk").await;
        s.write_all(&REQUEST_MAGIC.to_be_bytes()).await.unwrap();
        drop(s);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(mem.write_count(), before);
        assert_ne!(mem.contents()[1], 0xee);

        still_works(srv.port).await;
    })
    .await
    .expect("test timed out");
}

/// Read one structured reply chunk: (flags, type, cookie, payload).
async fn read_chunk(s: &mut tokio::net::TcpStream) -> (u16, u16, u64, Vec<u8>) {
    assert_eq!(s.read_u32().await.unwrap(), STRUCTURED_REPLY_MAGIC);
    let flags = s.read_u16().await.unwrap();
    let kind = s.read_u16().await.unwrap();
    let cookie = s.read_u64().await.unwrap();
    let len = s.read_u32().await.unwrap();
    let mut data = vec![0; len as usize];
    s.read_exact(&mut data).await.unwrap();
    (flags, kind, cookie, data)
}

#[tokio::test]
async fn structured_replies_and_block_status() {
    tokio::time::timeout(LIMIT, async {
        let (mem, cfg) = setup();
        mem.write(8192, vec![7; 4096], false).await.unwrap();
        let srv = start_server(cfg).await;
        let mut s = connect(srv.port).await;
        greet(&mut s).await;
        send_opt(&mut s, OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(read_opt_reply(&mut s).await.kind, REP_ACK);
        send_opt(&mut s, OPT_LIST_META_CONTEXT, &meta_data("disk", &[])).await;
        let r = read_opt_replies(&mut s).await;
        assert_eq!(r[0].kind, REP_META_CONTEXT);
        assert_eq!(&r[0].data[4..], BASE_ALLOCATION.as_bytes());
        send_opt(
            &mut s,
            OPT_SET_META_CONTEXT,
            &meta_data("disk", &["qemu:dirty-bitmap:x", BASE_ALLOCATION]),
        )
        .await;
        let r = read_opt_replies(&mut s).await;
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].kind, REP_META_CONTEXT);
        let ctx = u32::from_be_bytes(r[0].data[..4].try_into().unwrap());
        send_opt(&mut s, OPT_GO, &go_data("disk", &[])).await;
        let r = read_opt_replies(&mut s).await;
        assert_eq!(r.last().unwrap().kind, REP_ACK);
        let flags = u16::from_be_bytes(r[0].data[10..12].try_into().unwrap());
        assert_ne!(flags & FLAG_SEND_DF, 0);

        // Data read: one OFFSET_DATA chunk with DONE.
        send_req(&mut s, CMD_FLAG_DF, CMD_READ, 1, 8192, 4096).await;
        let (f, t, c, d) = read_chunk(&mut s).await;
        assert_eq!((f, t, c), (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 1));
        assert_eq!(u64::from_be_bytes(d[..8].try_into().unwrap()), 8192);
        assert!(d[8..].iter().all(|&b| b == 7) && d.len() == 8 + 4096);
        // Zero read: an OFFSET_HOLE chunk.
        send_req(&mut s, 0, CMD_READ, 2, 0, 4096).await;
        let (f, t, c, d) = read_chunk(&mut s).await;
        assert_eq!((f, t, c), (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, 2));
        assert_eq!(d, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0]);
        // Error read: an ERROR chunk.
        send_req(&mut s, 0, CMD_READ, 3, SIZE as u64, 1).await;
        let (f, t, c, d) = read_chunk(&mut s).await;
        assert_eq!((f, t, c), (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 3));
        assert_eq!(u32::from_be_bytes(d[..4].try_into().unwrap()), EINVAL);
        // Block status: hole, data, hole.
        send_req(&mut s, 0, CMD_BLOCK_STATUS, 4, 0, 65536).await;
        let (f, t, c, d) = read_chunk(&mut s).await;
        assert_eq!((f, t, c), (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 4));
        let words: Vec<u32> = d
            .chunks(4)
            .map(|w| u32::from_be_bytes(w.try_into().unwrap()))
            .collect();
        assert_eq!(words, vec![ctx, 8192, 3, 4096, 0, 65536 - 12288, 3]);
        send_req(&mut s, CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 5, 0, 65536).await;
        let (_, _, _, d) = read_chunk(&mut s).await;
        assert_eq!(d.len(), 12);
        // Non-read commands still get simple replies.
        send_req(&mut s, 0, CMD_FLUSH, 6, 0, 0).await;
        assert_eq!(read_simple(&mut s).await, (0, 6));
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn serve_connection_outcomes() {
    tokio::time::timeout(LIMIT, async {
        let (_mem, cfg) = setup();
        // A client that hangs up mid-handshake: Ok (quiet).
        let (client, server) = tokio::io::duplex(1024);
        let task = tokio::spawn(ferry_nbd::serve_connection(server, cfg.clone()));
        drop(client);
        assert!(task.await.unwrap().is_ok());
        // A client sending garbage: an InvalidData error.
        let (mut client, server) = tokio::io::duplex(1024);
        let task = tokio::spawn(ferry_nbd::serve_connection(server, cfg.clone()));
        let mut hello = [0u8; 18];
        client.read_exact(&mut hello).await.unwrap();
        client.write_u32(FLAG_C_FIXED_NEWSTYLE).await.unwrap();
        client.write_all(&[1u8; 16]).await.unwrap();
        let err = task.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    })
    .await
    .expect("test timed out");
}
