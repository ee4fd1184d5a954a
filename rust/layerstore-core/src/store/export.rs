//! Export: a layer's tar rebuilt from its recipe and chunks, byte for byte.
//!
//! Invariants: every chunk is checked against its BLAKE3 as it is read, and the tar written is
//! hashed as it goes out and checked against the layer's `id` and `diff_id` before the export
//! reports success; the digest it reports is computed from the bytes written.

use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;

use sha2::Digest as _;

use super::{Progress, Store};
use crate::cas;
use crate::compress::{Compression, Encoder};
use crate::digest::{self, Blake3, StreamHasher};
use crate::error::{Error, IoContext, Result};
use crate::fsio;
use crate::gather::Gather;
use crate::layer::Entry;
use crate::meta;
use crate::tar::{Op, StoredSplit};

#[derive(Debug, Clone)]
pub struct Exported {
    /// Digest of the bytes written (equals the diff_id when uncompressed).
    pub digest: String,
    pub size: u64,
}

impl Store {
    /// Write the layer's tar to `out`, compressed as asked. Every chunk is verified on read, and
    /// the tar written is hashed (on a thread of its own) and checked against the layer's `id`
    /// and `diff_id` before this returns: a damaged store never yields a valid-looking export.
    pub fn export_tar(
        &self,
        id: &Blake3,
        out: &mut dyn Write,
        compression: Compression,
        progress: Progress<'_>,
    ) -> Result<Exported> {
        let info = meta::find_layer(&*self.conn()?, &id.to_string())?;
        self.refuse_broken(id)?;
        let (entries, split) = meta::layer_blobs(&*self.conn()?, id)?;
        let entries: Vec<Entry> = crate::layer::decode_blob(&entries)?;
        // The recipe's raw bytes stream from its blob as they go out (never held whole).
        let mut split = StoredSplit::open(&split)?;
        let plan = self.chunk_plan(id, &entries, &split.ops)?;
        let mut chunks = cas::OrderedChunks::new(&self.packs_dir(), plan);
        let mut counted = HashingWriter {
            inner: out,
            sha: (compression != Compression::None).then(sha2::Sha256::new),
            len: 0,
        };
        let enc = Encoder::new(compression, &mut counted).ctx(|| "starting the encoder".into())?;
        // Raw segments and chunk slices go out as they are, gathered into vectored writes; the
        // hasher sees the same pieces, shared rather than copied.
        let mut out = Gather::new(enc);
        let hasher = StreamHasher::spawn(false);
        let mut done = 0u64;
        for op in &split.ops {
            match *op {
                Op::Raw(n) => {
                    split
                        .raw
                        .take(n, |block, range| {
                            hasher.update(SharedSlice(block.clone(), range.clone()));
                            out.shared(block, range).ctx(|| "writing the export".into())
                        })
                        .map_err(|e| match e {
                            Error::Corrupt(why) => Error::Corrupt(format!("layer {id}: {why}")),
                            e => e,
                        })?;
                    done += n;
                }
                Op::Payload(i) => {
                    let entry = &entries[i as usize];
                    for _ in &entry.chunks {
                        let (block, range) = chunks
                            .next_chunk()
                            .ok_or_else(|| {
                                Error::Corrupt(format!(
                                    "layer {id}: fewer chunks than entries need"
                                ))
                            })?
                            .map_err(|e| e.in_entry(id, &entry.path))?;
                        done += range.len() as u64;
                        hasher.update(SharedSlice(block.clone(), range.clone()));
                        out.shared(block, range)
                            .ctx(|| "writing the export".into())?;
                    }
                    progress(done)?;
                }
            }
        }
        let enc = out.finish().ctx(|| "writing the export".into())?;
        enc.finish().ctx(|| "finishing the export".into())?;
        progress(done)?;
        let written = hasher.finish();
        if written.blake3 != info.id || written.sha256 != info.diff_id || done != info.size {
            return Err(Error::DigestMismatch {
                what: format!("the tar rebuilt from layer {id} ({done} bytes)"),
                expected: info.diff_id,
                found: written.sha256,
            });
        }
        let digest = match counted.sha.take() {
            Some(sha) => digest::sha256_string(&sha.finalize()),
            None => written.sha256,
        };
        Ok(Exported {
            digest,
            size: counted.len,
        })
    }

    /// Where every payload chunk of a layer lives, in export order.
    fn chunk_plan(&self, id: &Blake3, entries: &[Entry], ops: &[Op]) -> Result<Vec<cas::ChunkLoc>> {
        let wanted = entries
            .iter()
            .flat_map(|e| e.chunks.iter().map(|c| &c.digest));
        let locs = meta::chunk_locs(&*self.conn()?, wanted)?;
        let mut plan = Vec::new();
        for op in ops {
            if let Op::Payload(i) = *op {
                let entry = entries.get(i as usize).ok_or_else(|| {
                    Error::Corrupt(format!("layer {id}: payload of missing entry {i}"))
                })?;
                for c in &entry.chunks {
                    plan.push(locs.get(&c.digest).cloned().ok_or_else(|| {
                        Error::Corrupt(format!("layer {id}: chunk {} is missing", c.digest))
                    })?);
                }
            }
        }
        Ok(plan)
    }

    /// Export to a path atomically (a temporary file renamed into place).
    pub fn export_tar_to_path(
        &self,
        id: &Blake3,
        dest: &Path,
        compression: Compression,
        progress: Progress<'_>,
    ) -> Result<Exported> {
        fsio::write_atomically(dest, |w| self.export_tar(id, w, compression, progress))
    }
}

/// A range of a shared buffer, as the stream hasher takes it.
struct SharedSlice(Arc<Vec<u8>>, std::ops::Range<usize>);

impl AsRef<[u8]> for SharedSlice {
    fn as_ref(&self) -> &[u8] {
        &self.0[self.1.clone()]
    }
}

struct HashingWriter<'w> {
    inner: &'w mut dyn Write,
    sha: Option<sha2::Sha256>,
    len: u64,
}

impl Write for HashingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(s) = self.sha.as_mut() {
            s.update(&buf[..n]);
        }
        self.len += n as u64;
        Ok(n)
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let n = self.inner.write_vectored(bufs)?;
        if let Some(s) = self.sha.as_mut() {
            let mut left = n;
            for b in bufs {
                let take = left.min(b.len());
                s.update(&b[..take]);
                left -= take;
                if left == 0 {
                    break;
                }
            }
        }
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
