//! The byte formats of packs: record header, idx entry, and the checks recovery makes.
//! Described in `docs/formats.md` §4, "Chunks: packs".

use ferry_chunk::ChunkId;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Record header: magic, id, blob length, blob CRC, header CRC.
pub(crate) const HEADER_LEN: usize = 48;
/// Idx entry: id, offset, length, type, reserved, entry CRC.
pub(crate) const ENTRY_LEN: usize = 56;
pub(crate) const RECORD_MAGIC: [u8; 4] = *b"FPR1";
pub(crate) const SYNCED_MAGIC: [u8; 4] = *b"FPS1";
pub(crate) const ENTRY_RECORD: u8 = 1;
pub(crate) const ENTRY_TOMBSTONE: u8 = 2;

pub(crate) fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}

pub(crate) fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

pub(crate) fn encode_header(id: &ChunkId, blob: &[u8]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&RECORD_MAGIC);
    h[4..36].copy_from_slice(&id.0);
    h[36..40].copy_from_slice(&(blob.len() as u32).to_le_bytes());
    h[40..44].copy_from_slice(&crc32c::crc32c(blob).to_le_bytes());
    let crc = crc32c::crc32c(&h[..44]);
    h[44..48].copy_from_slice(&crc.to_le_bytes());
    h
}

/// A whole record: header ‖ blob.
pub(crate) fn record(id: &ChunkId, blob: &[u8]) -> Vec<u8> {
    let mut rec = Vec::with_capacity(HEADER_LEN + blob.len());
    rec.extend_from_slice(&encode_header(id, blob));
    rec.extend_from_slice(blob);
    rec
}

/// (id, blob length, blob CRC) of a header whose magic and CRC hold.
pub(crate) fn decode_header(h: &[u8]) -> Option<(ChunkId, u32, u32)> {
    if h.len() < HEADER_LEN || h[0..4] != RECORD_MAGIC || crc32c::crc32c(&h[..44]) != le32(&h[44..])
    {
        return None;
    }
    let id = ChunkId(h[4..36].try_into().expect("32 bytes"));
    Some((id, le32(&h[36..]), le32(&h[40..])))
}

pub(crate) fn encode_entry(kind: u8, id: &ChunkId, offset: u64, len: u32) -> [u8; ENTRY_LEN] {
    let mut e = [0u8; ENTRY_LEN];
    e[0..32].copy_from_slice(&id.0);
    e[32..40].copy_from_slice(&offset.to_le_bytes());
    e[40..44].copy_from_slice(&len.to_le_bytes());
    e[44] = kind;
    let crc = crc32c::crc32c(&e[..52]);
    e[52..56].copy_from_slice(&crc.to_le_bytes());
    e
}

/// (type, id, record offset, blob length) of an entry whose CRC and type hold.
pub(crate) fn decode_entry(e: &[u8]) -> Option<(u8, ChunkId, u64, u32)> {
    if crc32c::crc32c(&e[..52]) != le32(&e[52..])
        || !matches!(e[44], ENTRY_RECORD | ENTRY_TOMBSTONE)
    {
        return None;
    }
    let id = ChunkId(e[0..32].try_into().expect("32 bytes"));
    Some((e[44], id, le64(&e[32..]), le32(&e[40..])))
}

/// Read what can be read of `len` bytes at `offset` (short at the end of the file).
pub(crate) fn read_upto(f: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        match f.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(got);
    Ok(buf)
}

/// The whole record at `offset` of `pack` if it is intact: (id, blob length).
pub(crate) fn check_record(pack: &File, offset: u64) -> io::Result<Option<(ChunkId, u32)>> {
    let h = read_upto(pack, offset, HEADER_LEN)?;
    let Some((id, len, crc)) = decode_header(&h) else {
        return Ok(None);
    };
    let blob = read_upto(pack, offset + HEADER_LEN as u64, len as usize)?;
    if blob.len() != len as usize || crc32c::crc32c(&blob) != crc {
        return Ok(None);
    }
    Ok(Some((id, len)))
}
