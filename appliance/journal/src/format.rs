//! Byte layout of segment headers and records (see the crate docs and docs/formats.md).

use crate::OwnedOp;

/// Segment header magic: the bytes `F J S G`.
pub const SEG_MAGIC: [u8; 4] = *b"FJSG";
/// Current format version.
pub const VERSION: u16 = 1;
/// Length of the segment header in bytes.
pub const SEG_HEADER_LEN: usize = 32;
/// Record magic: the bytes `F J R C` read as a little-endian u32.
pub const REC_MAGIC: u32 = u32::from_le_bytes(*b"FJRC");
/// Length of the fixed record header (before the data).
pub const REC_HEADER_LEN: usize = 32;
/// Length of the trailing crc32c.
pub const REC_TRAILER_LEN: usize = 4;
/// Largest data payload of one write record (64 MiB).
pub const MAX_WRITE_LEN: u64 = 64 << 20;

pub const KIND_WRITE: u8 = 1;
pub const KIND_ZERO: u8 = 2;
pub const KIND_TRIM: u8 = 3;

/// Total on-disk size of a record carrying `data_len` bytes of data.
pub fn record_len(data_len: usize) -> usize {
    REC_HEADER_LEN + data_len + REC_TRAILER_LEN
}

/// Encodes a segment header.
pub fn encode_seg_header(first_seq: u64, disk_size: u64) -> [u8; SEG_HEADER_LEN] {
    let mut h = [0u8; SEG_HEADER_LEN];
    h[0..4].copy_from_slice(&SEG_MAGIC);
    h[4..6].copy_from_slice(&VERSION.to_le_bytes());
    h[6..8].copy_from_slice(&(SEG_HEADER_LEN as u16).to_le_bytes());
    h[8..16].copy_from_slice(&first_seq.to_le_bytes());
    h[16..24].copy_from_slice(&disk_size.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Decoded segment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegHeader {
    pub first_seq: u64,
    pub disk_size: u64,
}

/// Decodes and verifies a segment header.
pub fn decode_seg_header(b: &[u8]) -> Result<SegHeader, &'static str> {
    if b.len() < SEG_HEADER_LEN {
        return Err("short segment header");
    }
    if b[0..4] != SEG_MAGIC {
        return Err("bad segment magic");
    }
    if crc32c::crc32c(&b[0..28]) != le32(&b[28..32]) {
        return Err("bad segment header crc");
    }
    if le16(&b[4..6]) != VERSION {
        return Err("unsupported segment version");
    }
    if le16(&b[6..8]) as usize != SEG_HEADER_LEN {
        return Err("bad segment header length");
    }
    Ok(SegHeader {
        first_seq: le64(&b[8..16]),
        disk_size: le64(&b[16..24]),
    })
}

/// A borrowed operation ready to be encoded.
pub struct EncOp<'a> {
    pub kind: u8,
    pub offset: u64,
    pub len: u64,
    pub data: &'a [u8],
}

/// Appends one encoded record to `buf`.
pub fn encode_record(buf: &mut Vec<u8>, seq: u64, op: &EncOp<'_>) {
    let start = buf.len();
    buf.reserve(record_len(op.data.len()));
    buf.extend_from_slice(&REC_MAGIC.to_le_bytes());
    buf.push(op.kind);
    buf.push(0); // flags
    buf.extend_from_slice(&[0, 0]); // reserved
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(&op.offset.to_le_bytes());
    buf.extend_from_slice(&op.len.to_le_bytes());
    buf.extend_from_slice(op.data);
    let crc = crc32c::crc32c(&buf[start..]);
    buf.extend_from_slice(&crc.to_le_bytes());
}

/// Decoded fixed record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecHeader {
    pub kind: u8,
    pub seq: u64,
    pub offset: u64,
    pub len: u64,
}

impl RecHeader {
    /// Number of data bytes that follow the header.
    pub fn data_len(&self) -> usize {
        if self.kind == KIND_WRITE {
            self.len as usize
        } else {
            0
        }
    }

    /// Total on-disk size of the record.
    pub fn total_len(&self) -> usize {
        record_len(self.data_len())
    }
}

/// Decodes the fixed header (no crc check yet; lengths are bounded).
pub fn decode_rec_header(b: &[u8]) -> Result<RecHeader, &'static str> {
    if b.len() < REC_HEADER_LEN {
        return Err("short record header");
    }
    if le32(&b[0..4]) != REC_MAGIC {
        return Err("bad record magic");
    }
    let kind = b[4];
    if !(KIND_WRITE..=KIND_TRIM).contains(&kind) {
        return Err("unknown record type");
    }
    if b[5] != 0 || b[6] != 0 || b[7] != 0 {
        return Err("unknown record flags");
    }
    let h = RecHeader {
        kind,
        seq: le64(&b[8..16]),
        offset: le64(&b[16..24]),
        len: le64(&b[24..32]),
    };
    if kind == KIND_WRITE && h.len > MAX_WRITE_LEN {
        return Err("record data length too large");
    }
    if h.offset.checked_add(h.len).is_none() {
        return Err("record extent overflows");
    }
    Ok(h)
}

/// Decodes and verifies a complete record at the start of `b`.
pub fn decode_record(b: &[u8]) -> Result<(RecHeader, &[u8]), &'static str> {
    let h = decode_rec_header(b)?;
    let total = h.total_len();
    if b.len() < total {
        return Err("short record");
    }
    let body = total - REC_TRAILER_LEN;
    if crc32c::crc32c(&b[..body]) != le32(&b[body..total]) {
        return Err("bad record crc");
    }
    Ok((h, &b[REC_HEADER_LEN..body]))
}

/// Converts a verified record into an owned operation.
pub fn to_owned_op(h: &RecHeader, data: &[u8]) -> OwnedOp {
    match h.kind {
        KIND_WRITE => OwnedOp::Write {
            offset: h.offset,
            data: data.to_vec(),
        },
        KIND_ZERO => OwnedOp::Zero {
            offset: h.offset,
            len: h.len,
        },
        _ => OwnedOp::Trim {
            offset: h.offset,
            len: h.len,
        },
    }
}

pub fn le16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}

pub fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

pub fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seg_header_roundtrip_and_corruption() {
        let h = encode_seg_header(42, 1 << 30);
        let d = decode_seg_header(&h).unwrap();
        assert_eq!(d.first_seq, 42);
        assert_eq!(d.disk_size, 1 << 30);
        for i in 0..SEG_HEADER_LEN {
            let mut bad = h;
            bad[i] ^= 0x10;
            assert!(decode_seg_header(&bad).is_err(), "byte {i}");
        }
    }

    #[test]
    fn record_roundtrip_and_corruption() {
        let mut buf = Vec::new();
        let data = vec![7u8; 100];
        let op = EncOp {
            kind: KIND_WRITE,
            offset: 4096,
            len: 100,
            data: &data,
        };
        encode_record(&mut buf, 9, &op);
        encode_record(
            &mut buf,
            10,
            &EncOp {
                kind: KIND_ZERO,
                offset: 0,
                len: 1 << 20,
                data: &[],
            },
        );
        assert_eq!(buf.len(), record_len(100) + record_len(0));
        let (h, d) = decode_record(&buf).unwrap();
        assert_eq!((h.kind, h.seq, h.offset, h.len), (KIND_WRITE, 9, 4096, 100));
        assert_eq!(d, &data[..]);
        let (h2, d2) = decode_record(&buf[h.total_len()..]).unwrap();
        assert_eq!((h2.kind, h2.seq, h2.len), (KIND_ZERO, 10, 1 << 20));
        assert!(d2.is_empty());
        let first = h.total_len();
        for i in 0..first {
            let mut bad = buf.clone();
            bad[i] ^= 1;
            assert!(decode_record(&bad[..first]).is_err(), "byte {i}");
        }
        assert!(decode_record(&buf[..first - 1]).is_err());
    }
}
