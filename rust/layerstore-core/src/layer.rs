//! Layers: the parsed changeset of one tar (its entries) and its identity.
//!
//! Invariants: `id` is the BLAKE3 and `diff_id` the sha256 of the same uncompressed tar bytes;
//! `tree_id` is the BLAKE3 of the canonical entry list ([`tree_id`]), equal for two tars that
//! encode the same entries differently (order, header format). Entry paths are normalised:
//! relative, `/`-separated, no `.`/`..`, the root being the empty path.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Blake3;
use crate::error::{Error, IoContext, Result};

/// What an entry is. Whiteouts and opaque markers are kinds of their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Hardlink,
    Char,
    Block,
    Fifo,
    /// `.wh.NAME`: hides `NAME` in lower layers.
    Whiteout,
    /// `.wh..wh..opq`: hides every lower child of its directory.
    Opaque,
    /// Archive metadata (GNU `V` label, `M` continuation, `D` dumpdir): kept for export, never
    /// part of a view. (Unknown typeflags are regular files, as POSIX reads them.)
    Other(u8),
}

impl Kind {
    pub fn name(&self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Dir => "dir",
            Kind::Symlink => "symlink",
            Kind::Hardlink => "hardlink",
            Kind::Char => "char",
            Kind::Block => "block",
            Kind::Fifo => "fifo",
            Kind::Whiteout => "whiteout",
            Kind::Opaque => "opaque",
            Kind::Other(_) => "other",
        }
    }
}

/// A reference to one stored chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub digest: Blake3,
    pub len: u32,
}

/// One entry of a layer, with every piece of metadata the tar carried.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    #[serde(with = "serde_bytes")]
    pub path: Vec<u8>,
    pub kind: Kind,
    /// The typeflag as archived (after the pre-POSIX trailing-slash rule).
    pub typeflag: u8,
    /// Permission bits including setuid/setgid/sticky.
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    #[serde(with = "serde_bytes")]
    pub uname: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub gname: Vec<u8>,
    pub mtime_ns: i64,
    /// Content size in bytes (0 for entries without data).
    pub size: u64,
    /// Symlink target as archived, or the normalised hardlink target.
    #[serde(with = "serde_bytes")]
    pub link: Vec<u8>,
    pub devmajor: u32,
    pub devminor: u32,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    pub chunks: Vec<ChunkRef>,
    /// BLAKE3 of the content (entries with data only).
    pub digest: Option<Blake3>,
    pub sparse: bool,
}

impl Entry {
    /// An entry with no data and default metadata: root-owned, mtime 0, no xattrs (what the
    /// view shows for an implicit directory; a base for entries made in the store).
    pub fn new(path: Vec<u8>, kind: Kind, typeflag: u8, mode: u32) -> Entry {
        Entry {
            path,
            kind,
            typeflag,
            mode,
            uid: 0,
            gid: 0,
            uname: Vec::new(),
            gname: Vec::new(),
            mtime_ns: 0,
            size: 0,
            link: Vec::new(),
            devmajor: 0,
            devminor: 0,
            xattrs: BTreeMap::new(),
            chunks: Vec::new(),
            digest: None,
            sparse: false,
        }
    }

    /// The device number as Linux's `makedev(devmajor, devminor)` (what `os.makedev` returns).
    pub fn rdev(&self) -> u64 {
        let (ma, mi) = (u64::from(self.devmajor), u64::from(self.devminor));
        ((ma & 0xffff_f000) << 32) | ((ma & 0xfff) << 8) | ((mi & 0xffff_ff00) << 12) | (mi & 0xff)
    }
}

/// A stored layer's identity and summary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerInfo {
    pub id: Blake3,
    pub diff_id: String,
    pub tree_id: Blake3,
    pub size: u64,
    pub entry_count: u64,
    /// Digest of the compressed stream it was imported from, if it was compressed.
    pub compressed_digest: Option<String>,
    pub compression: Option<String>,
    pub created_unix: i64,
}

/// BLAKE3 of the canonical entry list: entries sorted by path (stable, so duplicates keep their
/// order), each encoded field by field with explicit lengths.
pub fn tree_id(entries: &[Entry]) -> Blake3 {
    let mut order: Vec<&Entry> = entries.iter().collect();
    order.sort_by(|a, b| a.path.cmp(&b.path));
    let mut h = blake3::Hasher::new();
    h.update(b"layerstore-tree-v1\0");
    let bytes = |h: &mut blake3::Hasher, b: &[u8]| {
        h.update(&(b.len() as u64).to_le_bytes());
        h.update(b);
    };
    for e in order {
        bytes(&mut h, &e.path);
        bytes(&mut h, e.kind.name().as_bytes());
        h.update(&[e.typeflag]);
        h.update(&e.mode.to_le_bytes());
        h.update(&e.uid.to_le_bytes());
        h.update(&e.gid.to_le_bytes());
        bytes(&mut h, &e.uname);
        bytes(&mut h, &e.gname);
        h.update(&e.mtime_ns.to_le_bytes());
        h.update(&e.size.to_le_bytes());
        bytes(&mut h, &e.link);
        h.update(&e.devmajor.to_le_bytes());
        h.update(&e.devminor.to_le_bytes());
        h.update(&(e.xattrs.len() as u64).to_le_bytes());
        for (k, v) in &e.xattrs {
            bytes(&mut h, k);
            bytes(&mut h, v);
        }
        h.update(e.digest.map_or([0u8; 32], |d| d.0).as_slice());
    }
    h.finalize().into()
}

/// The manifest and config digests of an image the store imported or exported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageDigests {
    pub manifest: String,
    pub config: String,
    pub media_type: String,
}

/// The stored form of a layer's entry list or recipe: postcard, then zstd with a checksum.
/// The postcard bytes stream into the compressor (never held whole: for a layer of a million
/// entries they are hundreds of MiB).
pub(crate) fn encode_blob<T: serde::Serialize>(value: &T) -> Result<Vec<u8>> {
    let enc = blob_encoder().ctx(|| "compressing metadata".into())?;
    // postcard writes field by field: buffered, the compressor sees large writes.
    let buffered = postcard::to_io(value, std::io::BufWriter::with_capacity(1 << 16, enc))
        .map_err(|e| Error::Corrupt(format!("encoding metadata: {e}")))?;
    let enc = buffered
        .into_inner()
        .map_err(|e| Error::io("compressing metadata", e.into_error()))?;
    enc.finish().ctx(|| "compressing metadata".into())
}

/// The compressor of stored blobs ([`encode_blob`]): zstd level 3 with a checksum.
pub(crate) fn blob_encoder() -> std::io::Result<zstd::stream::write::Encoder<'static, Vec<u8>>> {
    let mut enc = zstd::stream::Encoder::new(Vec::new(), 3)?;
    enc.include_checksum(true)?;
    Ok(enc)
}

/// A stored entry list decoded straight into shared entries: each entry is decoded into its own
/// allocation, never into a `Vec<Entry>` first (which a stack of a million entries would hold
/// beside the shared copies: some 240 MiB more at its peak).
pub(crate) struct SharedEntries(pub Vec<std::sync::Arc<Entry>>);

impl<'de> Deserialize<'de> for SharedEntries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Seq;
        impl<'de> serde::de::Visitor<'de> for Seq {
            type Value = SharedEntries;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a sequence of entries")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<SharedEntries, A::Error> {
                // The count comes from the blob: reserve no more than a sane amount up front.
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
                while let Some(e) = seq.next_element::<Entry>()? {
                    out.push(std::sync::Arc::new(e));
                }
                Ok(SharedEntries(out))
            }
        }
        d.deserialize_seq(Seq)
    }
}

pub(crate) fn decode_blob<T: serde::de::DeserializeOwned>(blob: &[u8]) -> Result<T> {
    let bytes = zstd::stream::decode_all(blob)
        .map_err(|e| Error::Corrupt(format!("layer metadata: {e}")))?;
    postcard::from_bytes(&bytes).map_err(|e| Error::Corrupt(format!("layer metadata: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries decoded straight into shared allocations are the entries decoded as a list.
    #[test]
    fn shared_entries_decode_as_the_list_does() {
        let entries: Vec<Entry> = (0..1000u32)
            .map(|i| {
                let mut e = Entry::new(
                    format!("d{}/f{i}", i % 9).into_bytes(),
                    Kind::File,
                    b'0',
                    0o644,
                );
                e.size = u64::from(i);
                e.xattrs
                    .insert(b"user.i".to_vec(), i.to_le_bytes().to_vec());
                e
            })
            .collect();
        let blob = encode_blob(&entries).unwrap();
        let SharedEntries(shared) = decode_blob(&blob).unwrap();
        let plain: Vec<Entry> = decode_blob(&blob).unwrap();
        assert_eq!(plain, entries);
        assert!(shared.iter().map(|e| &**e).eq(entries.iter()));
    }

    /// Byte strings are encoded as slices (`serde_bytes`); stores written when they were plain
    /// sequences of u8 must still decode. Postcard writes both as a length and the bytes, and a
    /// struct as its fields in order, so the old encoding is that of a tuple of plain vectors.
    #[test]
    fn byte_strings_keep_the_stored_encoding() {
        let mut e = Entry::new(b"usr/bin/\xffx".to_vec(), Kind::Symlink, b'2', 0o777);
        e.uname = b"root".to_vec();
        e.gname = b"wheel".to_vec();
        e.link = vec![b'a'; 300];
        e.xattrs.insert(b"user.k".to_vec(), vec![0, 1, 2]);
        let plain = |b: &[u8]| b.to_vec();
        let head = (
            plain(&e.path),
            e.kind,
            e.typeflag,
            e.mode,
            e.uid,
            e.gid,
            plain(&e.uname),
            plain(&e.gname),
        );
        let tail = (
            e.mtime_ns,
            e.size,
            plain(&e.link),
            e.devmajor,
            e.devminor,
            e.xattrs.clone(),
            e.chunks.clone(),
            e.digest,
            e.sparse,
        );
        let old = postcard::to_stdvec(&(head, tail)).unwrap();
        assert_eq!(postcard::to_stdvec(&e).unwrap(), old);
        assert_eq!(postcard::from_bytes::<Entry>(&old).unwrap(), e);
    }
}
