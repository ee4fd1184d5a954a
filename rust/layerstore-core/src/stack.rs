//! Stacks: an ordered list of layers (bottom first) with its union index and OCI ChainID.
//!
//! Invariants: a [`Stack`] is immutable; `push` returns a new one sharing the parent's index.
//! Depth never exceeds the store's limit. Content is read lazily, chunk by chunk, from the packs.

use std::sync::Arc;

use sha2::Digest as _;

use crate::cas::{ChunkLoc, PackReader};
use crate::error::{Error, Result};
use crate::layer::{Entry, Kind, LayerInfo};
use crate::union::{components, Index};

/// A layer's entries, shared between every stack that uses the layer.
pub type LayerEntries = Arc<Vec<Arc<Entry>>>;

#[derive(Clone, Debug)]
pub struct Stack {
    pub layers: Vec<LayerInfo>,
    pub index: Index,
    pub chain_id: String,
    /// The OCI manifest and config this stack was imported from (`oci`), if any.
    pub image: Option<crate::layer::ImageDigests>,
    entries: Vec<LayerEntries>,
}

/// What one layer does to a path, for `provenance`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Touch {
    Entry,
    Whiteout,
    Opaque,
}

impl Touch {
    pub fn name(&self) -> &'static str {
        match self {
            Touch::Entry => "entry",
            Touch::Whiteout => "whiteout",
            Touch::Opaque => "opaque",
        }
    }
}

/// OCI ChainID of the next layer: `sha256(parent + " " + diff_id)`, or the diff_id at the bottom.
pub fn next_chain_id(parent: Option<&str>, diff_id: &str) -> String {
    match parent {
        None => diff_id.to_string(),
        Some(p) => crate::digest::sha256_string(&sha2::Sha256::digest(format!("{p} {diff_id}"))),
    }
}

impl Stack {
    pub fn empty() -> Self {
        Stack {
            layers: Vec::new(),
            index: Index::default(),
            chain_id: String::new(),
            image: None,
            entries: Vec::new(),
        }
    }

    pub fn depth(&self) -> usize {
        self.layers.len()
    }

    /// Each layer's entries (bottom first), as stacked: what `analysis` reads.
    pub fn layer_entries(&self) -> &[LayerEntries] {
        &self.entries
    }

    /// This stack with `layer` (whose entries are `entries`) on top.
    pub fn push(&self, layer: LayerInfo, entries: LayerEntries, max_depth: usize) -> Result<Stack> {
        let mut next = self.clone();
        next.push_mut(layer, entries, max_depth)?;
        Ok(next)
    }

    /// `push` in place (no copy of index nodes nothing else shares). On error, unchanged.
    pub fn push_mut(
        &mut self,
        layer: LayerInfo,
        entries: LayerEntries,
        max_depth: usize,
    ) -> Result<()> {
        if self.layers.len() + 1 > max_depth {
            return Err(Error::StackDepth {
                depth: self.layers.len() + 1,
                limit: max_depth,
            });
        }
        self.index.apply_mut(self.layers.len() as u32, &entries)?;
        let parent = (!self.layers.is_empty()).then_some(self.chain_id.as_str());
        self.chain_id = next_chain_id(parent, &layer.diff_id);
        self.image = None; // another image now
        self.layers.push(layer);
        self.entries.push(entries);
        Ok(())
    }

    /// Every layer that has `path` or hides it, bottom first.
    pub fn provenance(&self, path: &[u8]) -> Vec<(usize, Touch)> {
        let target: Vec<&[u8]> = components(path).collect();
        let mut out = Vec::new();
        for (i, entries) in self.entries.iter().enumerate() {
            let mut touch = None;
            for e in entries.iter() {
                let comps: Vec<&[u8]> = components(&e.path).collect();
                let Some((name, dir)) = comps.split_last() else {
                    continue;
                };
                let t = match e.kind {
                    // `.wh.NAME` hides NAME and everything under it.
                    Kind::Whiteout => {
                        let hidden = crate::changeset::hidden_name(name);
                        let covers = target.len() > dir.len()
                            && target[..dir.len()] == *dir
                            && target[dir.len()] == hidden;
                        covers.then_some(Touch::Whiteout)
                    }
                    // An opaque marker hides every lower path under its directory.
                    Kind::Opaque => (target.len() > dir.len() && target[..dir.len()] == *dir)
                        .then_some(Touch::Opaque),
                    _ => (comps == target).then_some(Touch::Entry),
                };
                // An entry outranks a marker: report what the layer provides.
                match (touch, t) {
                    (_, Some(Touch::Entry)) => touch = Some(Touch::Entry),
                    (None, Some(t)) => touch = Some(t),
                    _ => {}
                }
            }
            if let Some(t) = touch {
                out.push((i, t));
            }
        }
        out
    }
}

/// Where one chunk of a file is: in a pack, or in memory (written by a container).
pub enum Piece {
    Stored(ChunkLoc),
    Fresh(Arc<[u8]>),
}

/// Reads a regular file's content at any offset, chunk by chunk.
pub struct ContentReader {
    chunks: Vec<Piece>,
    /// Offset of each chunk within the file.
    starts: Vec<u64>,
    size: u64,
    reader: PackReader,
    /// The last stored chunk read (checked), and which one it is: reads that fall in one chunk
    /// in turn (a FUSE read-ahead window, small reads of a mapped file) check it once.
    buf: Vec<u8>,
    held: Option<usize>,
}

impl ContentReader {
    pub fn new(chunks: Vec<ChunkLoc>, reader: PackReader) -> Self {
        Self::with_pieces(chunks.into_iter().map(Piece::Stored).collect(), reader)
    }

    pub fn with_pieces(chunks: Vec<Piece>, reader: PackReader) -> Self {
        let mut starts = Vec::with_capacity(chunks.len());
        let mut at = 0u64;
        for c in &chunks {
            starts.push(at);
            at += match c {
                Piece::Stored(loc) => u64::from(loc.len),
                Piece::Fresh(b) => b.len() as u64,
            };
        }
        ContentReader {
            chunks,
            starts,
            size: at,
            reader,
            buf: Vec::new(),
            held: None,
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Fill `out` from `offset`; returns the bytes read (0 at or past the end).
    pub fn read_at(&mut self, offset: u64, out: &mut [u8]) -> Result<usize> {
        let mut done = 0;
        while done < out.len() {
            let pos = offset + done as u64;
            if pos >= self.size {
                break;
            }
            let i = self.starts.partition_point(|&s| s <= pos) - 1;
            let bytes: &[u8] = match &self.chunks[i] {
                Piece::Stored(loc) => {
                    if self.held != Some(i) {
                        self.held = None;
                        self.reader.read(loc, &mut self.buf)?;
                        self.held = Some(i);
                    }
                    &self.buf
                }
                Piece::Fresh(b) => b,
            };
            let within = (pos - self.starts[i]) as usize;
            let n = (bytes.len() - within).min(out.len() - done);
            out[done..done + n].copy_from_slice(&bytes[within..within + n]);
            done += n;
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_id_follows_the_oci_definition() {
        let a = "sha256:aaaa";
        let b = "sha256:bbbb";
        assert_eq!(next_chain_id(None, a), a);
        let expect =
            crate::digest::sha256_string(&sha2::Sha256::digest(b"sha256:aaaa sha256:bbbb"));
        assert_eq!(next_chain_id(Some(a), b), expect);
    }
}
