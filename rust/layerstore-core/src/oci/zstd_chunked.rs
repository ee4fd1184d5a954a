//! The zstd:chunked layer format (containers/storage `pkg/chunked`): written from a stored
//! layer, and its metadata (footer, TOC, tar-split) read back for partial pulls.
//!
//! A blob is a run of zstd frames that decompress, concatenated, to exactly the layer's tar, then
//! three skippable frames: the TOC (zstd-compressed JSON), the tar-split (zstd-compressed JSON
//! lines) and a 64-byte footer locating both. The layer descriptor repeats the positions and
//! checksums as `io.github.containers.zstd-chunked.*` annotations.
//!
//! Our choices inside the format, and their invariants:
//! - Frames are cut at the store's own FastCDC chunk boundaries: every chunk of file content is
//!   one frame (so it can be fetched alone), and each run of raw tar bytes (headers, padding,
//!   end blocks) is one frame. The TOC lists every chunk with its sha256 (as the format requires)
//!   and its BLAKE3 in an extra field, [`BLAKE3_FIELD`], that other readers ignore.
//! - The tar-split is generated from the raw segments and payload order the store keeps
//!   ([`crate::tar::TarSplit`]): type-2 lines carry raw bytes, type-1 lines name entries (with
//!   the size and the crc64-ISO of the content, as tar-split writes them).
//! - The blob is deterministic: the same layer gives the same bytes (fixed zstd level and
//!   parameters, frames compressed independently, JSON with sorted keys), so the store rebuilds
//!   it on demand instead of keeping a second copy; the push checks the rebuilt digest.
//! - Reading: every number in a footer, annotation, TOC or tar-split is untrusted. Sizes are
//!   bounded ([`Limits`]), positions must lie inside the blob, chunk lists must tile their file
//!   exactly, and a violation is a typed [`Error::InvalidImage`]; nothing here touches the store.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Write};

use base64::Engine as _;
use rayon::prelude::*;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sha2::{Digest as _, Sha256};

use crate::compress::Compression;
use crate::digest::Blake3;
use crate::error::{Error, Result};
use crate::layer::{Entry, Kind, LayerInfo};
use crate::store::{Progress, Store};
use crate::tar::{Op, TarSplit};

/// Annotation: digest of the compressed TOC.
pub const MANIFEST_CHECKSUM: &str = "io.github.containers.zstd-chunked.manifest-checksum";
/// Annotation: `offset:compressed:uncompressed:type` of the TOC.
pub const MANIFEST_POSITION: &str = "io.github.containers.zstd-chunked.manifest-position";
/// Annotation: digest of the compressed tar-split.
pub const TARSPLIT_CHECKSUM: &str = "io.github.containers.zstd-chunked.tarsplit-checksum";
/// Annotation: `offset:compressed:uncompressed` of the tar-split.
pub const TARSPLIT_POSITION: &str = "io.github.containers.zstd-chunked.tarsplit-position";
/// The TOC field holding a chunk's BLAKE3 (`blake3:<hex>`): ours, ignored by other readers.
pub const BLAKE3_FIELD: &str = "layerstore.chunkBlake3";
/// The TOC field naming the writer, so a reader knows the blob can be rebuilt from the store.
pub const WRITER_FIELD: &str = "layerstore.writer";
/// This writer's name and format version: a change to the bytes written is a new version.
pub const WRITER: &str = "layerstore-zstd-chunked-1";

/// How `oci_layer_blobs` names a blob this writer rebuilds.
pub const REBUILD: &str = "zstd-chunked-1";

/// zstd level of content and raw frames (zstd 1.5's level 9: close to gzip -6 in size on
/// rootfs layers even with one frame per chunk, at a speed a push can afford).
const FRAME_LEVEL: i32 = 9;
/// zstd level of the TOC and tar-split.
const META_LEVEL: i32 = 9;
/// Magic of the skippable frames we write (any of 0x184D2A50..=0x184D2A5F is one).
const SKIPPABLE_MAGIC: u32 = 0x184D_2A50;
/// The footer's last field: "GNUlInUx" read as a little-endian u64.
const FOOTER_MAGIC: u64 = 0x7855_6e49_6c55_4e47;
/// Length of the footer frame (8-byte skippable header and 64 bytes).
pub const FOOTER_LEN: u64 = 72;
/// The TOC's `manifest type`: 1 is the TOC (the only one there is).
const MANIFEST_TYPE_TOC: u64 = 1;
/// Bytes of frame input compressed in one parallel batch.
const BATCH_BYTES: usize = 8 << 20;

/// Where the TOC and tar-split of a blob lie, and their checksums when the descriptor has them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Positions {
    pub toc: Span,
    pub toc_digest: Option<String>,
    pub tar_split: Span,
    pub tar_split_digest: Option<String>,
}

/// A compressed region of a blob and the length of what it decompresses to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub offset: u64,
    pub len: u64,
    pub uncompressed: u64,
}

impl Span {
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}

/// A zstd:chunked blob as written: its digest, size and descriptor annotations.
#[derive(Clone, Debug)]
pub struct Written {
    pub digest: String,
    pub size: u64,
    pub annotations: BTreeMap<String, String>,
    /// (sha256, BLAKE3) of every content chunk, for the store's sha256 index.
    pub chunk_digests: Vec<ChunkDigests>,
}

/// A chunk's sha256 (as the TOC names it) and BLAKE3 (as the store names it).
pub type ChunkDigests = ([u8; 32], Blake3);

/// One piece of the tar, in order: a run of raw bytes or one content chunk.
#[derive(Clone, Copy, Debug)]
enum Piece {
    Raw(u64),
    Chunk { entry: u32, index: u32, len: u32 },
}

/// Where a piece's frame went: (blob offset, compressed length, sha256 of its input).
type Placed = (u64, u64, [u8; 32]);

/// Cuts the tar written into it into frames at the pieces' boundaries, compresses them (in
/// parallel batches, each frame on its own, so the result does not depend on batching) and
/// writes them to `out`.
pub struct Framer<'w> {
    out: &'w mut dyn Write,
    pieces: Vec<Piece>,
    next: usize,
    buf: Vec<u8>,
    batch: Vec<(usize, Vec<u8>)>,
    batch_bytes: usize,
    offset: u64,
    placed: Vec<Placed>,
    /// crc64-ISO of each entry's content, as tar-split records it.
    crcs: HashMap<u32, u64>,
    /// sha256 of each entry's content, as the TOC records it.
    file_sha: HashMap<u32, Sha256>,
}

impl<'w> Framer<'w> {
    /// A framer for a layer with these `entries` and `split`, writing to `out`.
    pub fn new(out: &'w mut dyn Write, entries: &[Entry], split: &TarSplit) -> Result<Self> {
        let mut pieces = Vec::new();
        for op in &split.ops {
            match *op {
                Op::Raw(n) => pieces.push(Piece::Raw(n)),
                Op::Payload(i) => {
                    let e = entries.get(i as usize).ok_or_else(|| {
                        Error::Corrupt(format!("tar-split names missing entry {i}"))
                    })?;
                    for (j, c) in e.chunks.iter().enumerate() {
                        pieces.push(Piece::Chunk {
                            entry: i,
                            index: u32::try_from(j).unwrap_or(u32::MAX),
                            len: c.len,
                        });
                    }
                }
            }
        }
        Ok(Framer {
            out,
            pieces,
            next: 0,
            buf: Vec::new(),
            batch: Vec::new(),
            batch_bytes: 0,
            offset: 0,
            placed: Vec::new(),
            crcs: HashMap::new(),
            file_sha: HashMap::new(),
        })
    }

    fn piece_len(&self, i: usize) -> usize {
        match self.pieces[i] {
            Piece::Raw(n) => usize::try_from(n).unwrap_or(usize::MAX),
            Piece::Chunk { len, .. } => len as usize,
        }
    }

    fn flush_batch(&mut self) -> io::Result<()> {
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        let frames: Vec<io::Result<(Vec<u8>, [u8; 32])>> = crate::pool::install(|| {
            batch
                .par_iter()
                .map_init(
                    || zstd::bulk::Compressor::new(FRAME_LEVEL),
                    |c, (_, data)| {
                        let c = c.as_mut().map_err(|e| io::Error::other(e.to_string()))?;
                        Ok((c.compress(data)?, Sha256::digest(data).into()))
                    },
                )
                .collect()
        });
        for ((i, data), frame) in batch.iter().zip(frames) {
            let (frame, sha) = frame?;
            if let Piece::Chunk { entry, .. } = self.pieces[*i] {
                let crc = self.crcs.entry(entry).or_insert(0);
                *crc = crc64_update(*crc, data);
                self.file_sha.entry(entry).or_default().update(data);
            }
            self.out.write_all(&frame)?;
            self.placed.push((self.offset, frame.len() as u64, sha));
            self.offset += frame.len() as u64;
        }
        Ok(())
    }

    /// Write the metadata frames and the footer; the tar must have been written whole.
    pub fn finish(mut self, entries: &[Entry], split: &TarSplit) -> Result<Written0> {
        if self.next != self.pieces.len() || !self.buf.is_empty() {
            return Err(Error::Corrupt(format!(
                "zstd:chunked: the tar ended at piece {} of {} ({} bytes left over)",
                self.next,
                self.pieces.len(),
                self.buf.len()
            )));
        }
        self.flush_batch()
            .map_err(|e| Error::io("writing a blob", e))?;
        let ts_json = tar_split_json(entries, split, &self.crcs);
        let ts_z = compress_meta(&ts_json)?;
        // The tar-split's digest goes into the TOC, so the manifest checksum covers it.
        let ts_digest = crate::digest::sha256_string(&Sha256::digest(&ts_z));
        let mut toc = self.toc(entries);
        toc.as_object_mut()
            .expect("an object")
            .insert("tarSplitDigest".into(), json!(ts_digest));
        let toc_json = serde_json::to_vec(&toc).expect("a JSON value serialises");
        let toc_z = compress_meta(&toc_json)?;
        let w = |e| Error::io("writing a blob", e);
        let toc_span = Span {
            offset: self.offset + 8,
            len: toc_z.len() as u64,
            uncompressed: toc_json.len() as u64,
        };
        write_skippable(self.out, &toc_z).map_err(w)?;
        let ts_span = Span {
            offset: toc_span.end() + 8,
            len: ts_z.len() as u64,
            uncompressed: ts_json.len() as u64,
        };
        write_skippable(self.out, &ts_z).map_err(w)?;
        let mut footer = Vec::with_capacity(64);
        for v in [
            toc_span.offset,
            toc_span.len,
            toc_span.uncompressed,
            MANIFEST_TYPE_TOC,
            ts_span.offset,
            ts_span.len,
            ts_span.uncompressed,
            FOOTER_MAGIC,
        ] {
            footer.extend_from_slice(&v.to_le_bytes());
        }
        write_skippable(self.out, &footer).map_err(w)?;
        let mut annotations = BTreeMap::new();
        annotations.insert(
            MANIFEST_CHECKSUM.to_string(),
            crate::digest::sha256_string(&Sha256::digest(&toc_z)),
        );
        annotations.insert(
            MANIFEST_POSITION.to_string(),
            format!(
                "{}:{}:{}:{MANIFEST_TYPE_TOC}",
                toc_span.offset, toc_span.len, toc_span.uncompressed
            ),
        );
        annotations.insert(TARSPLIT_CHECKSUM.to_string(), ts_digest);
        annotations.insert(
            TARSPLIT_POSITION.to_string(),
            format!(
                "{}:{}:{}",
                ts_span.offset, ts_span.len, ts_span.uncompressed
            ),
        );
        let chunk_digests = self
            .pieces
            .iter()
            .zip(&self.placed)
            .filter_map(|(p, (_, _, sha))| match *p {
                Piece::Chunk { entry, index, .. } => {
                    let c = entries[entry as usize].chunks[index as usize];
                    Some((*sha, c.digest))
                }
                Piece::Raw(_) => None,
            })
            .collect();
        Ok(Written0 {
            annotations,
            chunk_digests,
        })
    }

    /// The TOC: one entry per tar entry (in tar order), plus a `chunk` entry per content chunk
    /// after the first.
    fn toc(&self, entries: &[Entry]) -> Value {
        let mut frames: HashMap<u32, Vec<FrameOf>> = HashMap::new();
        for (p, (off, len, sha)) in self.pieces.iter().zip(&self.placed) {
            if let Piece::Chunk {
                entry,
                index,
                len: n,
            } = *p
            {
                let list = frames.entry(entry).or_default();
                let at = list.last().map_or(0, |l| l.2 + u64::from(l.3));
                let b3 = entries[entry as usize].chunks[index as usize].digest;
                list.push((*off, off + len, at, n, *sha, b3));
            }
        }
        let mut out = Vec::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            let Some(t) = toc_type(e.kind) else { continue };
            let name = String::from_utf8_lossy(&e.path).into_owned();
            let mut m = Map::new();
            m.insert("type".into(), json!(t));
            m.insert("name".into(), json!(name));
            if !e.link.is_empty() {
                m.insert(
                    "linkName".into(),
                    json!(String::from_utf8_lossy(&e.link).into_owned()),
                );
            }
            omit_zero(&mut m, "mode", u64::from(e.mode));
            omit_zero(&mut m, "uid", e.uid);
            omit_zero(&mut m, "gid", e.gid);
            omit_zero(&mut m, "devMajor", u64::from(e.devmajor));
            omit_zero(&mut m, "devMinor", u64::from(e.devminor));
            m.insert("modtime".into(), json!(rfc3339_nanos(e.mtime_ns)));
            if !e.uname.is_empty() {
                m.insert(
                    "userName".into(),
                    json!(String::from_utf8_lossy(&e.uname).into_owned()),
                );
            }
            if !e.gname.is_empty() {
                m.insert(
                    "groupName".into(),
                    json!(String::from_utf8_lossy(&e.gname).into_owned()),
                );
            }
            if !e.xattrs.is_empty() {
                let x: Map<String, Value> = e
                    .xattrs
                    .iter()
                    .map(|(k, v)| {
                        (
                            String::from_utf8_lossy(k).into_owned(),
                            json!(base64::engine::general_purpose::STANDARD.encode(v)),
                        )
                    })
                    .collect();
                m.insert("xattrs".into(), Value::Object(x));
            }
            let chunks = frames.remove(&u32::try_from(i).unwrap_or(u32::MAX));
            if t == "reg" {
                omit_zero(&mut m, "size", e.size);
            }
            let Some(chunks) = chunks.filter(|c| !c.is_empty()) else {
                out.push(Value::Object(m));
                continue;
            };
            if let Some(sha) = self.file_sha.get(&u32::try_from(i).unwrap_or(u32::MAX)) {
                let d = sha.clone().finalize();
                m.insert("digest".into(), json!(crate::digest::sha256_string(&d)));
            }
            let first = chunks[0];
            let last = chunks[chunks.len() - 1];
            m.insert("offset".into(), json!(first.0));
            m.insert("endOffset".into(), json!(last.1));
            m.insert("chunkSize".into(), json!(first.3));
            m.insert(
                "chunkDigest".into(),
                json!(crate::digest::sha256_string(&first.4)),
            );
            m.insert(BLAKE3_FIELD.into(), json!(first.5.to_string()));
            out.push(Value::Object(m));
            for c in &chunks[1..] {
                out.push(json!({
                    "type": "chunk",
                    "name": name,
                    "offset": c.0,
                    "endOffset": c.1,
                    "chunkOffset": c.2,
                    "chunkSize": c.3,
                    "chunkDigest": crate::digest::sha256_string(&c.4),
                    BLAKE3_FIELD: c.5.to_string(),
                }));
            }
        }
        json!({"version": 1, "entries": out, WRITER_FIELD: WRITER})
    }
}

/// A content frame of an entry: (offset, end, chunk offset, len, sha256, BLAKE3).
type FrameOf = (u64, u64, u64, u32, [u8; 32], Blake3);

/// What [`Framer::finish`] knows; the caller adds the blob's digest and size.
pub struct Written0 {
    pub annotations: BTreeMap<String, String>,
    pub chunk_digests: Vec<ChunkDigests>,
}

impl Write for Framer<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        let mut start = 0;
        while self.next < self.pieces.len() {
            let n = self.piece_len(self.next);
            if self.buf.len() - start < n {
                break;
            }
            let piece = self.buf[start..start + n].to_vec();
            start += n;
            self.batch_bytes += n;
            self.batch.push((self.next, piece));
            self.next += 1;
            if self.batch_bytes >= BATCH_BYTES {
                self.flush_batch()?;
            }
        }
        self.buf.drain(..start);
        if self.next == self.pieces.len() && !self.buf.is_empty() {
            return Err(io::Error::other(
                "zstd:chunked: the tar is longer than its recipe",
            ));
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The TOC type of an entry kind (`None`: not listed, as archive-only metadata).
fn toc_type(kind: Kind) -> Option<&'static str> {
    Some(match kind {
        // Whiteouts and opaque markers are the empty regular files the tar holds.
        Kind::File | Kind::Whiteout | Kind::Opaque => "reg",
        Kind::Dir => "dir",
        Kind::Symlink => "symlink",
        Kind::Hardlink => "hardlink",
        Kind::Char => "char",
        Kind::Block => "block",
        Kind::Fifo => "fifo",
        Kind::Other(_) => return None,
    })
}

fn omit_zero(m: &mut Map<String, Value>, key: &str, v: u64) {
    if v != 0 {
        m.insert(key.into(), json!(v));
    }
}

/// RFC 3339 with nanoseconds when there are any (as Go marshals a `time.Time`).
fn rfc3339_nanos(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let frac = ns.rem_euclid(1_000_000_000);
    let s = crate::oci::rfc3339(secs);
    if frac == 0 {
        return s;
    }
    let digits = format!("{frac:09}");
    format!(
        "{}.{}Z",
        s.trim_end_matches('Z'),
        digits.trim_end_matches('0')
    )
}

/// The tar-split JSON lines: raw segments as type 2, and a type-1 line per entry (with size and
/// crc64 for entries with content), each entry's line after the raw bytes holding its header.
fn tar_split_json(entries: &[Entry], split: &TarSplit, crcs: &HashMap<u32, u64>) -> Vec<u8> {
    let b64 = &base64::engine::general_purpose::STANDARD;
    let mut out = Vec::new();
    let mut position = 0u64;
    let mut raw_pos = 0usize;
    let mut listed = 0usize; // entries before this one have their line
    let mut line = |out: &mut Vec<u8>, body: String| {
        out.extend_from_slice(body.as_bytes());
        out.extend_from_slice(format!(",\"position\":{position}}}\n").as_bytes());
        position += 1;
    };
    let name = |e: &Entry| {
        serde_json::to_string(&String::from_utf8_lossy(&e.path)).expect("a string serialises")
    };
    for op in &split.ops {
        match *op {
            Op::Raw(n) => {
                let end = (raw_pos + usize::try_from(n).unwrap_or(0)).min(split.raw.len());
                let payload = b64.encode(&split.raw[raw_pos..end]);
                raw_pos = end;
                line(&mut out, format!("{{\"type\":2,\"payload\":\"{payload}\""));
            }
            Op::Payload(i) => {
                let i = i as usize;
                // Entries without content between the last one listed and this one.
                for e in entries.iter().take(i).skip(listed) {
                    line(
                        &mut out,
                        format!("{{\"type\":1,\"name\":{},\"payload\":null", name(e)),
                    );
                }
                let e = &entries[i];
                let crc = crcs.get(&u32::try_from(i).unwrap_or(u32::MAX)).copied();
                let payload = match (e.size, crc) {
                    (0, _) | (_, None) => "null".to_string(),
                    (_, Some(c)) => format!("\"{}\"", b64.encode(c.to_be_bytes())),
                };
                line(
                    &mut out,
                    format!(
                        "{{\"type\":1,\"name\":{},\"size\":{},\"payload\":{payload}",
                        name(e),
                        e.size
                    ),
                );
                listed = i + 1;
            }
        }
    }
    for e in entries.iter().skip(listed) {
        line(
            &mut out,
            format!("{{\"type\":1,\"name\":{},\"payload\":null", name(e)),
        );
    }
    out
}

fn compress_meta(data: &[u8]) -> Result<Vec<u8>> {
    zstd::bulk::compress(data, META_LEVEL).map_err(|e| Error::io("compressing metadata", e))
}

fn write_skippable(out: &mut dyn Write, data: &[u8]) -> io::Result<()> {
    let len = u32::try_from(data.len())
        .map_err(|_| io::Error::other("zstd:chunked metadata over 4 GiB"))?;
    out.write_all(&SKIPPABLE_MAGIC.to_le_bytes())?;
    out.write_all(&len.to_le_bytes())?;
    out.write_all(data)
}

/// crc64 with the ISO polynomial, as Go's `hash/crc64` computes it (tar-split's file checksum).
fn crc64_update(crc: u64, data: &[u8]) -> u64 {
    const TABLE: [u64; 256] = {
        let mut t = [0u64; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u64;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 == 1 {
                    (c >> 1) ^ 0xD800_0000_0000_0000
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut c = !crc;
    for &b in data {
        c = TABLE[((c ^ u64::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// Make `plan` one of zstd:chunked blobs: kept as is when it already re-emits a recorded
/// manifest over such blobs, else a synthesised manifest over blobs this writer makes (reusing a
/// digest the store recorded for a layer, so a re-push finds the registry has it). Returns
/// whether the manifest is synthesised (and so takes the blobs' annotations).
pub(crate) fn plan(store: &Store, plan: &mut super::ImagePlan) -> Result<bool> {
    if plan.head.manifest.is_some()
        && plan
            .blobs
            .iter()
            .all(|b| b.how == super::Rebuild::ZstdChunked)
    {
        return Ok(false);
    }
    plan.head.manifest = None;
    plan.head.descriptor = None;
    let conn = store.conn()?;
    for b in &mut plan.blobs {
        b.how = super::Rebuild::ZstdChunked;
        b.media_type = super::LAYER_ZSTD.to_string();
        b.digest = crate::meta::chunked::layer_blob(&conn, &b.info.id.to_string(), REBUILD)?
            .filter(|d| crate::meta::chunked::annotations(&conn, d).is_ok_and(|a| a.is_some()));
    }
    Ok(true)
}

/// The recorded annotations of a zstd:chunked blob the store rebuilds.
pub(crate) fn recorded_annotations(
    store: &Store,
    digest: &str,
) -> Result<Option<BTreeMap<String, String>>> {
    crate::meta::chunked::annotations(&*store.conn()?, digest)
}

/// `docs` with each layer's annotations (by blob digest) added to its synthesised manifest.
pub(crate) fn annotate(
    mut docs: super::ImageDocs,
    annotations: &HashMap<String, BTreeMap<String, String>>,
) -> Result<super::ImageDocs> {
    let mut m = super::parse_json("manifest", &docs.manifest)?;
    if let Some(layers) = m.get_mut("layers").and_then(Value::as_array_mut) {
        for l in layers {
            let Some(d) = l.get("digest").and_then(Value::as_str) else {
                continue;
            };
            if let Some(a) = annotations.get(d) {
                l.as_object_mut()
                    .expect("a layer descriptor is an object")
                    .insert("annotations".into(), json!(a));
            }
        }
    }
    docs.manifest = serde_json::to_vec(&m).expect("a JSON value serialises");
    docs.digests.manifest = crate::digest::sha256_string(&Sha256::digest(&docs.manifest));
    if let Some(e) = docs.entry.as_object_mut() {
        e.insert("digest".into(), json!(docs.digests.manifest));
        e.insert("size".into(), json!(docs.manifest.len()));
    }
    Ok(docs)
}

// ---------------------------------------------------------------------------------------------
// Reading

/// Bounds on a blob's metadata, which come from the registry and are not trusted.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest compressed or uncompressed TOC.
    pub toc: u64,
    /// Largest compressed or uncompressed tar-split.
    pub tar_split: u64,
    /// Largest uncompressed chunk (one frame, decompressed in memory).
    pub chunk: u64,
    /// Most TOC entries.
    pub entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            toc: 128 << 20,
            tar_split: 512 << 20,
            chunk: 16 << 20,
            entries: 4 << 20,
        }
    }
}

fn bad(blob: &str, reason: impl Into<String>) -> Error {
    Error::InvalidImage {
        blob: blob.to_string(),
        reason: format!("zstd:chunked: {}", reason.into()),
    }
}

/// The positions an OCI layer descriptor's annotations give; `None` when it has none (not a
/// zstd:chunked layer), an error when they are malformed or outside a blob of `size` bytes.
pub fn positions_from_annotations(
    annotations: Option<&Value>,
    blob: &str,
    size: u64,
) -> Result<Option<Positions>> {
    let get = |k: &str| annotations.and_then(|a| a.get(k)).and_then(Value::as_str);
    let (Some(toc), Some(ts)) = (get(MANIFEST_POSITION), get(TARSPLIT_POSITION)) else {
        return Ok(None);
    };
    let nums = |s: &str| -> Result<Vec<u64>> {
        s.split(':')
            .map(|n| {
                n.parse::<u64>()
                    .map_err(|_| bad(blob, format!("bad position {s:?}")))
            })
            .collect()
    };
    let t = nums(toc)?;
    let s = nums(ts)?;
    let (&[to, tl, tu, kind], &[so, sl, su]) = (t.as_slice(), s.as_slice()) else {
        return Err(bad(blob, "positions have the wrong number of fields"));
    };
    if kind != MANIFEST_TYPE_TOC {
        return Err(bad(blob, format!("manifest type {kind} is not a TOC")));
    }
    let p = Positions {
        toc: Span {
            offset: to,
            len: tl,
            uncompressed: tu,
        },
        toc_digest: get(MANIFEST_CHECKSUM).map(String::from),
        tar_split: Span {
            offset: so,
            len: sl,
            uncompressed: su,
        },
        tar_split_digest: get(TARSPLIT_CHECKSUM).map(String::from),
    };
    for span in [p.toc, p.tar_split] {
        if span.offset.checked_add(span.len).is_none_or(|e| e > size) {
            return Err(bad(blob, "metadata lies outside the blob"));
        }
    }
    Ok(Some(p))
}

/// One chunk of a file as the TOC describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TocChunk {
    /// Its frame in the blob.
    pub offset: u64,
    pub end: u64,
    /// Uncompressed length.
    pub size: u64,
    pub sha256: [u8; 32],
    pub blake3: Option<Blake3>,
}

/// A TOC reduced to what a partial pull needs: each regular file's chunks, by name.
#[derive(Debug, Default)]
pub struct Toc {
    pub files: HashMap<String, Vec<TocChunk>>,
    /// The tar-split's digest, when the TOC names it.
    pub tar_split_digest: Option<String>,
    /// Whether this store's writer made the blob (so it can rebuild it).
    pub ours: bool,
}

#[derive(Deserialize)]
struct RawToc {
    version: u64,
    #[serde(default)]
    entries: Vec<RawEntry>,
    #[serde(rename = "tarSplitDigest", default)]
    tar_split_digest: Option<String>,
    #[serde(rename = "layerstore.writer", default)]
    writer: Option<String>,
}

#[derive(Deserialize)]
struct RawEntry {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    digest: Option<String>,
    #[serde(default)]
    offset: u64,
    #[serde(rename = "endOffset", default)]
    end_offset: u64,
    #[serde(rename = "chunkSize", default)]
    chunk_size: u64,
    #[serde(rename = "chunkOffset", default)]
    chunk_offset: u64,
    #[serde(rename = "chunkDigest", default)]
    chunk_digest: Option<String>,
    #[serde(rename = "chunkType", default)]
    chunk_type: Option<String>,
    #[serde(rename = "layerstore.chunkBlake3", default)]
    blake3: Option<String>,
}

fn sha256_bytes(blob: &str, s: &str) -> Result<[u8; 32]> {
    let hex = s
        .strip_prefix("sha256:")
        .ok_or_else(|| bad(blob, format!("digest {s:?} is not sha256")))?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex, &mut out).map_err(|_| bad(blob, format!("bad digest {s:?}")))?;
    Ok(out)
}

/// Decompress one zstd frame of at most `limit` bytes (exactly `expected` when given).
pub fn decompress_bounded(data: &[u8], limit: u64, expected: Option<u64>) -> io::Result<Vec<u8>> {
    let cap = usize::try_from(limit).unwrap_or(usize::MAX);
    let mut d = zstd::bulk::Decompressor::new()?;
    d.window_log_max(crate::compress::ZSTD_WINDOW_LOG_MAX)?;
    let out = d.decompress(data, cap)?;
    if expected.is_some_and(|e| e != out.len() as u64) {
        return Err(io::Error::other(format!(
            "decompressed to {} bytes, expected {}",
            out.len(),
            expected.unwrap_or(0)
        )));
    }
    Ok(out)
}

/// Parse and check a compressed TOC (whose digest the caller has checked). `data_end`: where the
/// blob's frames end (no chunk may lie beyond).
pub fn parse_toc(blob: &str, compressed: &[u8], span: Span, limits: &Limits) -> Result<Toc> {
    if span.uncompressed > limits.toc || compressed.len() as u64 > limits.toc {
        return Err(bad(blob, "TOC over the size limit"));
    }
    let json = decompress_bounded(compressed, limits.toc, Some(span.uncompressed))
        .map_err(|e| bad(blob, format!("TOC: {e}")))?;
    let raw: RawToc = serde_json::from_slice(&json).map_err(|e| bad(blob, format!("TOC: {e}")))?;
    if raw.version != 1 {
        return Err(bad(blob, format!("TOC version {}", raw.version)));
    }
    if raw.entries.len() > limits.entries {
        return Err(bad(blob, "TOC has too many entries"));
    }
    let data_end = span.offset.saturating_sub(8);
    let mut toc = Toc {
        tar_split_digest: raw.tar_split_digest,
        ours: raw.writer.as_deref() == Some(WRITER),
        ..Toc::default()
    };
    // Each file's expected size and where its chunk list has reached.
    let mut sizes: HashMap<String, u64> = HashMap::new();
    let mut ends: HashMap<String, u64> = HashMap::new();
    let mut current: Option<String> = None;
    for e in raw.entries {
        let is_chunk = e.kind == "chunk";
        if !is_chunk && e.kind != "reg" {
            current = None;
            continue;
        }
        if !is_chunk {
            if e.size == 0 {
                current = None;
                continue;
            }
            if toc.files.contains_key(&e.name) {
                return Err(bad(blob, format!("TOC lists {:?} twice", e.name)));
            }
            sizes.insert(e.name.clone(), e.size);
            toc.files.insert(e.name.clone(), Vec::new());
            current = Some(e.name.clone());
        } else if current.as_deref() != Some(e.name.as_str()) {
            return Err(bad(blob, format!("chunk of {:?} out of place", e.name)));
        }
        if e.chunk_type.as_deref().is_some_and(|t| t != "data") {
            return Err(bad(blob, "chunk types other than data are not supported"));
        }
        let list = toc.files.get_mut(&e.name).expect("inserted above");
        let have: u64 = list.iter().map(|c| c.size).sum();
        let file_size = sizes[&e.name];
        if e.chunk_offset != have {
            return Err(bad(blob, format!("chunks of {:?} do not tile it", e.name)));
        }
        let size = if e.chunk_size == 0 && !is_chunk {
            file_size // one frame for the whole file
        } else {
            e.chunk_size
        };
        let digest = match (&e.chunk_digest, &e.digest) {
            (Some(d), _) => d.clone(),
            (None, Some(d)) if size == file_size => d.clone(),
            _ => return Err(bad(blob, format!("a chunk of {:?} has no digest", e.name))),
        };
        if size == 0 || size > limits.chunk || have + size > file_size {
            return Err(bad(
                blob,
                format!("a chunk of {:?} is out of bounds", e.name),
            ));
        }
        let blake3 = match &e.blake3 {
            Some(b) => Some(Blake3::parse(b).map_err(|_| bad(blob, "bad BLAKE3 field"))?),
            None => None,
        };
        // A file entry's `endOffset` is where its last frame ends; each chunk's frame ends
        // where the next chunk's begins (or at its own `endOffset`, when it has one).
        let file_end = *ends.entry(e.name.clone()).or_insert(e.end_offset);
        if let Some(prev) = list.last_mut() {
            prev.end = prev.end.min(e.offset);
        }
        let end = if is_chunk && e.end_offset != 0 {
            e.end_offset
        } else {
            file_end
        };
        list.push(TocChunk {
            offset: e.offset,
            end,
            size,
            sha256: sha256_bytes(blob, &digest)?,
            blake3,
        });
    }
    for (name, list) in &toc.files {
        let have: u64 = list.iter().map(|c| c.size).sum();
        if have != sizes[name] {
            return Err(bad(blob, format!("chunks of {name:?} do not cover it")));
        }
        if list.iter().any(|c| c.end <= c.offset || c.end > data_end) {
            return Err(bad(blob, format!("a frame of {name:?} is out of bounds")));
        }
    }
    Ok(toc)
}

/// One line of a tar-split: raw bytes, or a file's content (by name and size).
#[derive(Debug, PartialEq, Eq)]
pub enum SplitItem {
    Raw(Vec<u8>),
    File { name: String, size: u64 },
}

#[derive(Deserialize)]
struct RawSplit {
    #[serde(rename = "type")]
    kind: u8,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    payload: Option<String>,
}

/// Parse a compressed tar-split into the items that rebuild the tar (type-1 lines without
/// content are dropped).
pub fn parse_tar_split(
    blob: &str,
    compressed: &[u8],
    span: Span,
    limits: &Limits,
) -> Result<Vec<SplitItem>> {
    if span.uncompressed > limits.tar_split || compressed.len() as u64 > limits.tar_split {
        return Err(bad(blob, "tar-split over the size limit"));
    }
    let json = decompress_bounded(compressed, limits.tar_split, Some(span.uncompressed))
        .map_err(|e| bad(blob, format!("tar-split: {e}")))?;
    let b64 = &base64::engine::general_purpose::STANDARD;
    let mut items = Vec::new();
    for line in json.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let r: RawSplit =
            serde_json::from_slice(line).map_err(|e| bad(blob, format!("tar-split: {e}")))?;
        match r.kind {
            1 if r.size > 0 => items.push(SplitItem::File {
                name: r
                    .name
                    .ok_or_else(|| bad(blob, "tar-split file without a name"))?,
                size: r.size,
            }),
            1 => {}
            2 => {
                let raw = b64
                    .decode(r.payload.unwrap_or_default())
                    .map_err(|_| bad(blob, "tar-split payload is not base64"))?;
                items.push(SplitItem::Raw(raw));
            }
            k => return Err(bad(blob, format!("tar-split line of type {k}"))),
        }
    }
    Ok(items)
}

/// The positions a blob's footer gives (`suffix`: its last [`FOOTER_LEN`] bytes or more).
pub fn positions_from_footer(blob: &str, suffix: &[u8], size: u64) -> Result<Positions> {
    let n = suffix.len();
    if (n as u64) < FOOTER_LEN {
        return Err(bad(blob, "no footer"));
    }
    let f = &suffix[n - FOOTER_LEN as usize..];
    let u = |i: usize| u64::from_le_bytes(f[8 + 8 * i..16 + 8 * i].try_into().expect("8 bytes"));
    let magic = u32::from_le_bytes(f[..4].try_into().expect("4 bytes"));
    if magic & 0xffff_fff0 != SKIPPABLE_MAGIC || u(7) != FOOTER_MAGIC || u(3) != MANIFEST_TYPE_TOC {
        return Err(bad(blob, "not a zstd:chunked footer"));
    }
    let p = Positions {
        toc: Span {
            offset: u(0),
            len: u(1),
            uncompressed: u(2),
        },
        toc_digest: None,
        tar_split: Span {
            offset: u(4),
            len: u(5),
            uncompressed: u(6),
        },
        tar_split_digest: None,
    };
    for span in [p.toc, p.tar_split] {
        if span.offset.checked_add(span.len).is_none_or(|e| e > size) {
            return Err(bad(blob, "metadata lies outside the blob"));
        }
    }
    Ok(p)
}

/// Write layer `info` of `store` as a zstd:chunked blob into `out`: the tar comes from the
/// store's one export path (every chunk checked, the diff_id checked at the end).
pub fn write_layer(
    store: &Store,
    info: &LayerInfo,
    out: &mut dyn Write,
    progress: Progress<'_>,
) -> Result<Written> {
    let (entries, split) = store.load(&info.id)?;
    let mut hashed = super::HashWriter::new(out);
    let mut framer = Framer::new(&mut hashed, &entries, &split)?;
    store.export_tar(&info.id, &mut framer, Compression::None, progress)?;
    let w = framer.finish(&entries, &split)?;
    let (_, digest, size) = hashed.finish();
    Ok(Written {
        digest,
        size,
        annotations: w.annotations,
        chunk_digests: w.chunk_digests,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc64_iso_matches_go() {
        // Go: crc64.Checksum([]byte("hello"), crc64.MakeTable(crc64.ISO)) == 0x3c3eeee2d8100000
        assert_eq!(crc64_update(0, b"hello"), 0x3c3e_eee2_d810_0000);
        assert_eq!(
            crc64_update(crc64_update(0, b"hel"), b"lo"),
            0x3c3e_eee2_d810_0000
        );
        assert_eq!(crc64_update(0, b""), 0);
    }

    #[test]
    fn nanosecond_times_are_trimmed_as_go_writes_them() {
        assert_eq!(rfc3339_nanos(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_nanos(1_500_000_000), "1970-01-01T00:00:01.5Z");
    }

    #[test]
    fn positions_outside_the_blob_are_refused() {
        let a = json!({MANIFEST_POSITION: "10:20:30:1", TARSPLIT_POSITION: "40:5:6"});
        assert!(positions_from_annotations(Some(&a), "b", 45)
            .unwrap()
            .is_some());
        assert!(positions_from_annotations(Some(&a), "b", 44).is_err());
        let a = json!({MANIFEST_POSITION: "10:20:30:2", TARSPLIT_POSITION: "40:5:6"});
        assert!(positions_from_annotations(Some(&a), "b", 99).is_err());
        assert!(positions_from_annotations(None, "b", 99).unwrap().is_none());
    }
}
