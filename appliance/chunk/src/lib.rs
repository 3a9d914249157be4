//! Chunks: how one block of plaintext becomes a named, compressed, encrypted blob and back.
//!
//! A block is named by a keyed BLAKE3 hash of its plaintext ([`TenantKey::chunk_id`]), so equal
//! blocks dedupe across disks and time, while the storage (which sees only names and ciphertext)
//! cannot test a guess of a block's content without the tenant's key.
//!
//! A sealed blob is `header || ciphertext || tag` (see `docs/formats.md`, "Chunk blob"): zstd
//! (or LZ4, or nothing, as the policy's [`Compression`] says) is applied first and kept only when
//! it makes the block smaller; AES-256-GCM (ring) then encrypts
//! with a random 96-bit nonce. The associated data is the header plus a caller-chosen context:
//! for stored chunks that context is the chunk's own name, so a blob stored under another name
//! fails authentication. Position binding (disk, block index) lives in the authenticated block
//! map (map pages are named by a keyed hash that covers disk, level and index), because one stored
//! chunk serves every position that holds the same plaintext.
//!
//! This crate has no I/O policy: it transforms bytes.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use std::cell::RefCell;
use std::fmt;
use std::str::FromStr;

/// The default block size of a protected disk's block map (64 KiB).
pub const DEFAULT_BLOCK_SIZE: u32 = 64 * 1024;
/// The largest plaintext a blob may carry; anything bigger is refused before allocation.
pub const MAX_PLAINTEXT: usize = 16 * 1024 * 1024;

const BLOB_MAGIC: [u8; 4] = *b"FCB1";
const BLOB_VERSION: u8 = 1;
const FLAG_ZSTD: u8 = 1;
/// The payload is an LZ4 block (no frame; its plaintext length is the header's).
const FLAG_LZ4: u8 = 2;
/// magic(4) version(1) flags(1) reserved(2) plaintext_len(4) nonce(12)
pub const BLOB_HEADER_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// The shortest blob there can be: a header and a tag around an empty payload.
pub const MIN_BLOB_LEN: usize = BLOB_HEADER_LEN + TAG_LEN;
const ZSTD_LEVEL: i32 = 1;

/// How a chunk's plaintext is compressed before it is encrypted (a replication policy's choice).
/// Whatever is chosen, a block is stored compressed only when that makes it smaller, any blob
/// opens the same way, and a chunk's name does not depend on it (dedup is unaffected).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Compression {
    /// Stored plain: data known not to compress, or a process server short of CPU.
    Off,
    /// zstd level 1: the default, the best ratio for the WAN at this speed.
    #[default]
    Zstd,
    /// LZ4 (the reference C library's default mode): about 1.7 times zstd level 1's speed
    /// (1.5 times the whole pipeline's, per core) for 10 to 40% more bytes on the wire (text
    /// loses most); for a fast link and a busy process server.
    Lz4,
}

impl Compression {
    pub const ALL: [Compression; 3] = [Compression::Zstd, Compression::Lz4, Compression::Off];

    /// The word policies, disk specs and status use.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Off => "off",
            Compression::Zstd => "zstd",
            Compression::Lz4 => "lz4",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Compression::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| format!("unknown compression {s:?}: say zstd, lz4 or off"))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkError {
    #[error("blob is too short ({0} bytes)")]
    Truncated(usize),
    #[error("blob has a bad magic number or unsupported version")]
    BadHeader,
    #[error("blob declares {0} bytes of plaintext, more than the limit")]
    TooLarge(usize),
    #[error("blob failed authentication (corrupted, truncated, or stored under another name)")]
    Authentication,
    #[error("blob's compressed payload is corrupt")]
    Decompress,
    #[error("chunk content does not match its name {0}")]
    NameMismatch(ChunkId),
    #[error("bad key material: {0}")]
    BadKey(&'static str),
}

/// The name of a chunk: keyed BLAKE3 of its plaintext.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    pub const ZERO: ChunkId = ChunkId([0; 32]);
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 32]
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", &self.to_hex()[..16])
    }
}

impl FromStr for ChunkId {
    type Err = ChunkError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let v = hex::decode(s).map_err(|_| ChunkError::BadKey("chunk id is not hex"))?;
        let a: [u8; 32] = v
            .try_into()
            .map_err(|_| ChunkError::BadKey("chunk id is not 32 bytes"))?;
        Ok(ChunkId(a))
    }
}

/// A tenant's key material, derived from one 32-byte secret.
pub struct TenantKey {
    hash_key: [u8; 32],
    map_key: [u8; 32],
    aead: LessSafeKey,
}

impl TenantKey {
    /// Derive the hashing and encryption keys from the tenant secret (BLAKE3 derive_key, which is
    /// a KDF with domain separation by context string).
    pub fn from_secret(secret: &[u8; 32]) -> Self {
        let hash_key = blake3::derive_key("ferry 2026 chunk-name key v1", secret);
        let map_key = blake3::derive_key("ferry 2026 map-page key v1", secret);
        let enc_key = blake3::derive_key("ferry 2026 chunk aes-256-gcm key v1", secret);
        let unbound = UnboundKey::new(&AES_256_GCM, &enc_key).expect("32-byte AES-256 key");
        TenantKey {
            hash_key,
            map_key,
            aead: LessSafeKey::new(unbound),
        }
    }

    /// Parse a secret written as 64 hex digits (the key file format), surrounding space ignored.
    pub fn from_hex(text: &str) -> Result<Self, ChunkError> {
        let v = hex::decode(text.trim()).map_err(|_| ChunkError::BadKey("key is not hex"))?;
        let a: [u8; 32] = v
            .try_into()
            .map_err(|_| ChunkError::BadKey("key must be 32 bytes (64 hex digits)"))?;
        Ok(Self::from_secret(&a))
    }

    /// A fresh random secret, as 64 hex digits.
    pub fn generate_hex() -> String {
        let mut s = [0u8; 32];
        SystemRandom::new()
            .fill(&mut s)
            .expect("system random source");
        hex::encode(s)
    }

    /// The name of a block of plaintext.
    pub fn chunk_id(&self, plaintext: &[u8]) -> ChunkId {
        ChunkId(*blake3::keyed_hash(&self.hash_key, plaintext).as_bytes())
    }

    /// The name of a block-map page: binds the page's bytes to its disk, tree level and index.
    pub fn map_page_id(&self, disk: &str, level: u8, index: u64, bytes: &[u8]) -> ChunkId {
        let mut h = blake3::Hasher::new_keyed(&self.map_key);
        h.update(&(disk.len() as u32).to_le_bytes());
        h.update(disk.as_bytes());
        h.update(&[level]);
        h.update(&index.to_le_bytes());
        h.update(bytes);
        ChunkId(*h.finalize().as_bytes())
    }

    /// A keyed MAC over arbitrary bytes (for small authenticated records such as checkpoint roots).
    pub fn mac(&self, context: &str, bytes: &[u8]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.map_key);
        h.update(context.as_bytes());
        h.update(&[0]);
        h.update(bytes);
        *h.finalize().as_bytes()
    }

    /// Seal a stored chunk: the associated data is its name.
    pub fn seal_chunk(&self, id: &ChunkId, plaintext: &[u8]) -> Vec<u8> {
        self.seal(plaintext, &id.0)
    }

    /// [`TenantKey::seal_chunk`] with the policy's compressor (see [`Compression`]). Every blob
    /// opens the same way; a chunk's name does not depend on it.
    pub fn seal_chunk_as(&self, id: &ChunkId, plaintext: &[u8], compress: Compression) -> Vec<u8> {
        self.seal_with(plaintext, &id.0, compress)
    }

    /// Open a stored chunk and check that its plaintext matches its name.
    pub fn open_chunk(&self, id: &ChunkId, blob: &[u8]) -> Result<Vec<u8>, ChunkError> {
        let plain = self.open(blob, &id.0)?;
        if self.chunk_id(&plain) != *id {
            return Err(ChunkError::NameMismatch(*id));
        }
        Ok(plain)
    }

    /// Authenticate a chunk blob received under the name `id` without opening it all the way:
    /// the header is checked, the AEAD tag (which binds the header and `id`) is verified, and
    /// the declared plaintext length is checked against the payload (its length when stored
    /// plain, the zstd frame's content size for zstd, the decompressed length for an LZ4 block,
    /// which carries no size of its own). Returns the plaintext length.
    ///
    /// This is what the master target does with every chunk it receives: only a holder of the
    /// tenant key can make a blob that passes, and the name is bound to it. What it leaves out
    /// (decompressing and hashing the plaintext to compare it with the name, as
    /// [`TenantKey::open_chunk`] does) would guard only against the sending process server's
    /// own bugs, costs more than the rest of receiving a chunk, and is done anyway on every read
    /// and by verify.
    pub fn authenticate_chunk(&self, id: &ChunkId, blob: &[u8]) -> Result<usize, ChunkError> {
        let header = parse_header(blob)?;
        let aad = aad_bytes(&blob[..BLOB_HEADER_LEN], &id.0);
        let nonce =
            Nonce::try_assume_unique_for_key(&blob[12..24]).map_err(|_| ChunkError::BadHeader)?;
        let mut body = blob[BLOB_HEADER_LEN..].to_vec();
        let payload = self
            .aead
            .open_in_place(nonce, Aad::from(&aad), &mut body)
            .map_err(|_| ChunkError::Authentication)?;
        if header.flags & FLAG_ZSTD != 0 {
            match zstd::zstd_safe::get_frame_content_size(payload) {
                Ok(Some(n)) if n == header.plaintext_len as u64 => {}
                _ => return Err(ChunkError::Decompress),
            }
        } else if header.flags & FLAG_LZ4 != 0 {
            lz4_decompress(payload, header.plaintext_len)?;
        } else if payload.len() != header.plaintext_len {
            return Err(ChunkError::Authentication);
        }
        Ok(header.plaintext_len)
    }

    /// Compress (when it helps) and encrypt `plaintext`, authenticating `context` with it.
    ///
    /// The blob is built in one buffer: header, then zstd straight into the space after it (with
    /// this thread's reused compression context: a fresh one per block costs as much as
    /// compressing a small block), then AES-GCM in place. Only a block zstd does not shrink is
    /// copied.
    pub fn seal(&self, plaintext: &[u8], context: &[u8]) -> Vec<u8> {
        self.seal_with(plaintext, context, Compression::Zstd)
    }

    fn seal_with(&self, plaintext: &[u8], context: &[u8], compress: Compression) -> Vec<u8> {
        assert!(
            plaintext.len() <= MAX_PLAINTEXT,
            "plaintext over MAX_PLAINTEXT"
        );
        let nonce = next_nonce();
        let bound = match compress {
            Compression::Zstd => zstd::zstd_safe::compress_bound(plaintext.len()),
            Compression::Lz4 => lz4::block::compress_bound(plaintext.len()).unwrap_or(0),
            Compression::Off => 0,
        };
        let mut out = Vec::with_capacity(BLOB_HEADER_LEN + bound.max(plaintext.len()) + TAG_LEN);
        out.extend_from_slice(&BLOB_MAGIC);
        out.push(BLOB_VERSION);
        out.push(0); // flags, set below
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(plaintext.len() as u32).to_le_bytes());
        out.extend_from_slice(&nonce);
        let (compressed, flag) = match compress {
            Compression::Zstd => (compress_after(plaintext, &mut out), FLAG_ZSTD),
            Compression::Lz4 => (lz4_compress_after(plaintext, &mut out, bound), FLAG_LZ4),
            Compression::Off => (None, 0),
        };
        if compressed.is_some_and(|n| n < plaintext.len()) {
            out[5] = flag;
        } else {
            out.truncate(BLOB_HEADER_LEN);
            out.extend_from_slice(plaintext);
        }
        let aad = aad_bytes(&out[..BLOB_HEADER_LEN], context);
        let tag = self
            .aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad),
                &mut out[BLOB_HEADER_LEN..],
            )
            .expect("AES-GCM seal of a bounded buffer");
        out.extend_from_slice(tag.as_ref());
        out
    }

    /// Decrypt and decompress a blob made by [`TenantKey::seal`] with the same `context`.
    pub fn open(&self, blob: &[u8], context: &[u8]) -> Result<Vec<u8>, ChunkError> {
        let header = parse_header(blob)?;
        let aad = aad_bytes(&blob[..BLOB_HEADER_LEN], context);
        let mut body = blob[BLOB_HEADER_LEN..].to_vec();
        let nonce =
            Nonce::try_assume_unique_for_key(&blob[12..24]).map_err(|_| ChunkError::BadHeader)?;
        let plain = self
            .aead
            .open_in_place(nonce, Aad::from(&aad), &mut body)
            .map_err(|_| ChunkError::Authentication)?;
        let out = if header.flags & FLAG_ZSTD != 0 {
            let v = decompress(plain, header.plaintext_len)?;
            if v.len() != header.plaintext_len {
                return Err(ChunkError::Decompress);
            }
            v
        } else if header.flags & FLAG_LZ4 != 0 {
            lz4_decompress(plain, header.plaintext_len)?
        } else {
            if plain.len() != header.plaintext_len {
                return Err(ChunkError::Authentication);
            }
            plain.to_vec()
        };
        Ok(out)
    }
}

struct Header {
    flags: u8,
    plaintext_len: usize,
}

fn parse_header(blob: &[u8]) -> Result<Header, ChunkError> {
    if blob.len() < MIN_BLOB_LEN {
        return Err(ChunkError::Truncated(blob.len()));
    }
    if blob[0..4] != BLOB_MAGIC
        || blob[4] != BLOB_VERSION
        || ![0, FLAG_ZSTD, FLAG_LZ4].contains(&blob[5])
    {
        return Err(ChunkError::BadHeader);
    }
    let plaintext_len = u32::from_le_bytes(blob[8..12].try_into().expect("4 bytes")) as usize;
    if plaintext_len > MAX_PLAINTEXT {
        return Err(ChunkError::TooLarge(plaintext_len));
    }
    Ok(Header {
        flags: blob[5],
        plaintext_len,
    })
}

/// Bytes of system randomness read at a time for nonces: 341 nonces per `getrandom` call.
const NONCE_POOL: usize = 341 * NONCE_LEN;

/// A thread's buffered supply of random nonce bytes.
struct NoncePool {
    buf: [u8; NONCE_POOL],
    /// Bytes of `buf` already handed out (or never filled): `NONCE_POOL` means empty.
    used: usize,
}

thread_local! {
    /// This thread's nonce supply: filled from the system random source (ring's
    /// `SystemRandom`, i.e. `getrandom`) a few KiB at a time instead of one system call per
    /// blob. Each byte is handed out once and zeroed as it is taken, so no nonce is ever reused
    /// and none stays in memory after use. Fork safety: a forked child would inherit the
    /// unused bytes and could hand out the parent's next nonces; Ferry never forks without
    /// exec (child processes are started with `Command`, i.e. fork+exec or posix_spawn), so
    /// every process begins with empty pools.
    static NONCES: RefCell<NoncePool> = const {
        RefCell::new(NoncePool { buf: [0; NONCE_POOL], used: NONCE_POOL })
    };
}

/// A fresh random 96-bit nonce from this thread's pool.
fn next_nonce() -> [u8; NONCE_LEN] {
    NONCES.with(|p| {
        let mut p = p.borrow_mut();
        if p.used + NONCE_LEN > NONCE_POOL {
            SystemRandom::new()
                .fill(&mut p.buf)
                .expect("system random source");
            p.used = 0;
        }
        let at = p.used;
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&p.buf[at..at + NONCE_LEN]);
        p.buf[at..at + NONCE_LEN].fill(0);
        p.used = at + NONCE_LEN;
        nonce
    })
}

thread_local! {
    /// This thread's zstd compression context (created on first use, reused for every block).
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
}

/// zstd-compress `plaintext` into `out` after its current contents (whose capacity must hold the
/// compress bound); the compressed length, or None when zstd failed (the caller stores it plain).
fn compress_after(plaintext: &[u8], out: &mut Vec<u8>) -> Option<usize> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
        }
        let comp = c.as_mut()?;
        let start = out.len();
        let mut cur = std::io::Cursor::new(&mut *out);
        cur.set_position(start as u64);
        match comp.compress_to_buffer(plaintext, &mut cur) {
            Ok(n) => Some(n),
            Err(_) => {
                out.truncate(start);
                None
            }
        }
    })
}

/// zstd-decompress a payload that declares `len` bytes of plaintext (with this thread's reused
/// decompression context); more than `len` bytes is an error.
fn decompress(payload: &[u8], len: usize) -> Result<Vec<u8>, ChunkError> {
    thread_local! {
        static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
    }
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = zstd::bulk::Decompressor::new().ok();
        }
        let dec = d.as_mut().ok_or(ChunkError::Decompress)?;
        let mut out = Vec::with_capacity(len);
        dec.decompress_to_buffer(payload, &mut out)
            .map_err(|_| ChunkError::Decompress)?;
        Ok(out)
    })
}

/// LZ4-compress `plaintext` into `out` after its current contents (`bound` bytes of room are
/// made there); the compressed length, or None when LZ4 failed (the caller stores it plain).
fn lz4_compress_after(plaintext: &[u8], out: &mut Vec<u8>, bound: usize) -> Option<usize> {
    let start = out.len();
    out.resize(start + bound, 0);
    match lz4::block::compress_to_buffer(plaintext, None, false, &mut out[start..]) {
        Ok(n) => {
            out.truncate(start + n);
            Some(n)
        }
        Err(_) => {
            out.truncate(start);
            None
        }
    }
}

/// LZ4-decompress a block that must give exactly `len` bytes (an LZ4 block has no size of its
/// own: the header's plaintext length is it, and anything else is corrupt).
fn lz4_decompress(payload: &[u8], len: usize) -> Result<Vec<u8>, ChunkError> {
    let mut out = vec![0u8; len];
    match lz4::block::decompress_to_buffer(payload, Some(len as i32), &mut out) {
        Ok(n) if n == len => Ok(out),
        _ => Err(ChunkError::Decompress),
    }
}

fn aad_bytes(header: &[u8], context: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(header.len() + 4 + context.len());
    a.extend_from_slice(header);
    a.extend_from_slice(&(context.len() as u32).to_le_bytes());
    a.extend_from_slice(context);
    a
}

/// True when every byte is zero (such blocks become holes, never chunks).
pub fn is_zero(data: &[u8]) -> bool {
    let words = data.chunks_exact(8);
    let tail = words.remainder();
    tail.iter().all(|&b| b == 0)
        && words
            .into_iter()
            .all(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes")) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> TenantKey {
        TenantKey::from_secret(&[7u8; 32])
    }

    #[test]
    fn round_trip_compressible_and_random() {
        let k = key();
        let text = b"ferry ".repeat(10_000);
        let mut random = vec![0u8; 65536];
        SystemRandom::new().fill(&mut random).unwrap();
        for plain in [&text[..], &random[..], b"", b"x"] {
            let id = k.chunk_id(plain);
            let blob = k.seal_chunk(&id, plain);
            assert_eq!(k.open_chunk(&id, &blob).unwrap(), plain);
        }
        // compression kept only when it helps
        assert!(k.seal(&text, b"").len() < text.len() / 10);
        assert!(k.seal(&random, b"").len() <= random.len() + BLOB_HEADER_LEN + TAG_LEN);
    }

    #[test]
    fn a_chunk_sealed_without_compression_is_stored_whole_and_opens() {
        let k = key();
        let text = b"ferry ".repeat(10_000);
        let id = k.chunk_id(&text);
        let blob = k.seal_chunk_as(&id, &text, Compression::Off);
        assert_eq!(blob.len(), BLOB_HEADER_LEN + text.len() + TAG_LEN);
        assert_eq!(blob[5], 0);
        assert_eq!(k.open_chunk(&id, &blob).unwrap(), text);
        assert!(k.seal_chunk_as(&id, &text, Compression::Zstd).len() < text.len() / 10);
    }

    /// A blob whose payload and header are chosen by the test, sealed with the right key and
    /// name: what a buggy (not a forging) process server could send.
    fn seal_raw(k: &TenantKey, id: &ChunkId, flags: u8, declared: u32, payload: &[u8]) -> Vec<u8> {
        let nonce = next_nonce();
        let mut out = Vec::new();
        out.extend_from_slice(&BLOB_MAGIC);
        out.extend_from_slice(&[BLOB_VERSION, flags, 0, 0]);
        out.extend_from_slice(&declared.to_le_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(payload);
        let aad = aad_bytes(&out[..BLOB_HEADER_LEN], &id.0);
        let tag = k
            .aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad),
                &mut out[BLOB_HEADER_LEN..],
            )
            .unwrap();
        out.extend_from_slice(tag.as_ref());
        out
    }

    #[test]
    fn lz4_chunks_round_trip_and_their_length_is_checked() {
        let k = key();
        let text = b"ferry lz4 ".repeat(6_000);
        let mut random = vec![0u8; 65536];
        SystemRandom::new().fill(&mut random).unwrap();
        let id = k.chunk_id(&text);
        let blob = k.seal_chunk_as(&id, &text, Compression::Lz4);
        assert_eq!(blob[5], FLAG_LZ4);
        assert!(
            blob.len() < text.len() / 10,
            "lz4 blob {} bytes",
            blob.len()
        );
        assert_eq!(k.open_chunk(&id, &blob).unwrap(), text);
        assert_eq!(k.authenticate_chunk(&id, &blob), Ok(text.len()));
        // Not smaller: stored plain.
        let rid = k.chunk_id(&random);
        let rblob = k.seal_chunk_as(&rid, &random, Compression::Lz4);
        assert_eq!(rblob[5], 0);
        assert_eq!(k.open_chunk(&rid, &rblob).unwrap(), random);
        // Flips anywhere are caught.
        for i in [5, 9, BLOB_HEADER_LEN + 3, blob.len() - 1] {
            let mut bad = blob.clone();
            bad[i] ^= 0x10;
            assert!(k.authenticate_chunk(&id, &bad).is_err(), "flip at {i}");
            assert!(k.open_chunk(&id, &bad).is_err(), "flip at {i}");
        }
        // An LZ4 block that decodes to another length than its header declares, or does not
        // decode, is refused on receipt (the header's length is the block's only size).
        let payload = lz4::block::compress(&text, None, false).unwrap();
        for declared in [text.len() as u32 - 1, text.len() as u32 + 1] {
            let bad = seal_raw(&k, &id, FLAG_LZ4, declared, &payload);
            assert_eq!(k.authenticate_chunk(&id, &bad), Err(ChunkError::Decompress));
            assert!(k.open_chunk(&id, &bad).is_err());
        }
        let garbage = seal_raw(&k, &id, FLAG_LZ4, 100, &[0xff; 40]);
        assert_eq!(
            k.authenticate_chunk(&id, &garbage),
            Err(ChunkError::Decompress)
        );
        // Unknown flags (both compressors, or a future one) are a bad header.
        for flags in [FLAG_ZSTD | FLAG_LZ4, 4] {
            let odd = seal_raw(&k, &id, flags, text.len() as u32, &payload);
            assert_eq!(k.authenticate_chunk(&id, &odd), Err(ChunkError::BadHeader));
        }
        // The policy words.
        for c in Compression::ALL {
            assert_eq!(c.as_str().parse::<Compression>(), Ok(c));
        }
        assert!("gzip"
            .parse::<Compression>()
            .unwrap_err()
            .contains("zstd, lz4 or off"));
    }

    #[test]
    fn tampering_is_detected() {
        let k = key();
        let plain = b"marker FERRY-SECRET data".repeat(100);
        let id = k.chunk_id(&plain);
        let blob = k.seal_chunk(&id, &plain);
        for i in [0, 5, 9, 13, BLOB_HEADER_LEN, blob.len() - 1] {
            let mut bad = blob.clone();
            bad[i] ^= 0x40;
            assert!(k.open_chunk(&id, &bad).is_err(), "flip at {i} not caught");
            assert!(
                k.authenticate_chunk(&id, &bad).is_err(),
                "flip at {i} authenticated"
            );
        }
        // What the master target checks on receipt: the tag, binding header and name.
        assert_eq!(k.authenticate_chunk(&id, &blob), Ok(plain.len()));
        let raw = k.seal_chunk_as(&id, &plain, Compression::Off);
        assert_eq!(k.authenticate_chunk(&id, &raw), Ok(plain.len()));
        assert_eq!(
            k.authenticate_chunk(&id, &blob[..10]),
            Err(ChunkError::Truncated(10))
        );
        assert_eq!(
            k.authenticate_chunk(&k.chunk_id(b"other"), &blob),
            Err(ChunkError::Authentication)
        );
        assert_eq!(
            TenantKey::from_secret(&[8u8; 32]).authenticate_chunk(&id, &blob),
            Err(ChunkError::Authentication),
            "another tenant's key"
        );
        assert_eq!(
            k.open_chunk(&id, &blob[..10]),
            Err(ChunkError::Truncated(10))
        );
        // A valid blob stored under another name is rejected.
        let other = k.chunk_id(b"other");
        assert_eq!(k.open_chunk(&other, &blob), Err(ChunkError::Authentication));
        // No plaintext in the blob.
        assert!(!blob.windows(12).any(|w| w == b"FERRY-SECRET"));
    }

    #[test]
    fn names_depend_on_key_and_position_binding_on_map() {
        let a = key();
        let b = TenantKey::from_secret(&[8u8; 32]);
        assert_ne!(a.chunk_id(b"x"), b.chunk_id(b"x"));
        assert_ne!(
            a.map_page_id("d1", 0, 1, b"p"),
            a.map_page_id("d1", 0, 2, b"p")
        );
        assert_ne!(
            a.map_page_id("d1", 0, 1, b"p"),
            a.map_page_id("d2", 0, 1, b"p")
        );
    }

    #[test]
    fn nonces_are_fresh_across_pool_refills() {
        let k = key();
        let plain = b"same plaintext every time".repeat(50);
        let id = k.chunk_id(&plain);
        let mut seen = std::collections::HashSet::new();
        // Several refills of the pool, on two threads (each has its own pool).
        let other: Vec<[u8; NONCE_LEN]> = std::thread::spawn(|| {
            (0..2 * NONCE_POOL / NONCE_LEN)
                .map(|_| next_nonce())
                .collect()
        })
        .join()
        .unwrap();
        for n in other {
            assert!(seen.insert(n), "nonce repeated");
        }
        let mut last = None;
        for _ in 0..3 * NONCE_POOL / NONCE_LEN + 7 {
            let blob = k.seal_chunk(&id, &plain);
            let nonce: [u8; NONCE_LEN] = blob[12..24].try_into().unwrap();
            assert_ne!(Some(nonce), last, "consecutive nonces are equal");
            assert!(seen.insert(nonce), "nonce repeated");
            assert_ne!(nonce, [0; NONCE_LEN]);
            last = Some(nonce);
            assert_eq!(k.open_chunk(&id, &blob).unwrap(), plain);
        }
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 65536]));
        assert!(is_zero(&[0u8; 13]));
        let mut v = vec![0u8; 65537];
        v[65536] = 1;
        assert!(!is_zero(&v));
        v[65536] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
    }

    #[test]
    fn hex_ids_and_keys() {
        let k = key();
        let id = k.chunk_id(b"abc");
        assert_eq!(id.to_hex().parse::<ChunkId>().unwrap(), id);
        assert!(TenantKey::from_hex("zz").is_err());
        assert!(TenantKey::from_hex(&TenantKey::generate_hex()).is_ok());
    }
}
