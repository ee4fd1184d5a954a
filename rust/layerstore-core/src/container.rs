//! A container: a writable layer over a stack, with copy-on-write at chunk level.
//!
//! Invariants:
//! - The stack is never modified: the container edits its own copy of the union index (a
//!   persistent trie, so the copy costs nothing until an edit, and an edit copies only the
//!   directories on its path). Containers over one stack are isolated from each other.
//! - A regular file is its chunk list. A write at an offset re-cuts (FastCDC) only from the
//!   start of the first chunk it touches until a cut point meets an old chunk boundary past the
//!   written range, then reuses the old chunks: bytes hashed are bounded by the write plus about
//!   two maximum chunks, whatever the file size. New chunks stay in memory
//!   ([`FreshChunks`]) until a commit stores those the committed layer uses.
//! - Metadata edits (chmod, chown, utime, xattrs) keep the chunk list: they hash nothing.
//! - A file whose content the container changed has no whole-file digest until it is committed
//!   (`digest` is `None`): computing it would read the whole file.
//! - Edits on a hard-linked path apply to that path only (the link is broken, as overlayfs does
//!   on copy-up); `link` creates a new link sharing the current content.
//! - `commit` emits the changeset from the stack's view to the container's (see
//!   [`crate::diff`]): explicit whiteouts, an opaque marker where a directory was deleted and
//!   recreated, a renamed directory as a whiteout plus its full subtree.

use std::io;
use std::sync::{Arc, RwLock};

use rustix::io::Errno;

use crate::cas::FreshChunks;
use crate::chunk::ChunkParams;
use crate::diff::diff_indices;
use crate::digest::Blake3;
use crate::error::{Error, Result};
use crate::layer::{ChunkRef, Entry, Kind};
use crate::stack::Stack;
use crate::store::{Imported, Progress, Store};
use crate::union::{child_path, components, Index, Node, ViewEntry};

/// What [`Container::chunk_bytes`] reads stored chunks with.
pub type ChunkSource<'a> = &'a dyn Fn(&Blake3) -> Result<Arc<[u8]>>;

pub struct Container {
    base: Stack,
    index: Index,
    fresh: Arc<RwLock<FreshChunks>>,
    params: ChunkParams,
    /// The writable layer's position in the view (the stack's depth).
    layer: u32,
    hashed: u64,
}

fn os_error(errno: Errno, path: &[u8]) -> Error {
    Error::io(
        format!("/{}", String::from_utf8_lossy(path)),
        io::Error::from(errno),
    )
}

fn now_ns() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// A new entry of `kind` created now by root.
fn new_entry(path: &[u8], kind: Kind, mode: u32) -> Entry {
    let typeflag = match kind {
        Kind::Dir => b'5',
        Kind::Symlink => b'2',
        Kind::Hardlink => b'1',
        _ => b'0',
    };
    let mut e = Entry::new(path.to_vec(), kind, typeflag, mode);
    e.mtime_ns = now_ns();
    e.digest = (kind == Kind::File).then(|| Blake3::of(&[]));
    e
}

impl Container {
    pub fn new(base: &Stack, params: ChunkParams) -> Self {
        Container {
            index: base.index.clone(),
            base: base.clone(),
            fresh: Arc::default(),
            params,
            layer: base.depth() as u32,
            hashed: 0,
        }
    }

    /// The stack the container started from.
    pub fn base(&self) -> &Stack {
        &self.base
    }

    /// The current view (a snapshot: later edits do not show in it).
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Chunks written and not yet committed (shared with snapshots, which may read them).
    pub fn fresh(&self) -> Arc<RwLock<FreshChunks>> {
        self.fresh.clone()
    }

    /// Bytes hashed by writes so far (the copy-on-write cost).
    pub fn hashed_bytes(&self) -> u64 {
        self.hashed
    }

    fn view(&self, entry: Entry, target: Option<Arc<Entry>>) -> Arc<ViewEntry> {
        Arc::new(ViewEntry {
            entry: Arc::new(entry),
            target,
            layer: Some(self.layer),
        })
    }

    /// Split `path` into its directory (resolved through symlinks, which must be a directory)
    /// and last name; returns the resolved full path.
    fn place(&self, path: &[u8]) -> Result<Vec<u8>> {
        let comps: Vec<&[u8]> = components(path).collect();
        let Some((name, parents)) = comps.split_last() else {
            return Err(os_error(Errno::BUSY, path)); // the root itself
        };
        if *name == b".." {
            return Err(os_error(Errno::INVAL, path));
        }
        let parent = parents.join(&b'/');
        let resolved = self
            .index
            .resolve(&parent, true)?
            .ok_or_else(|| self.missing(path))?;
        if !matches!(resolved.node, Node::Dir(_)) {
            return Err(os_error(Errno::NOTDIR, path));
        }
        let dir = resolved.path.unwrap_or(parent);
        Ok(child_path(&dir, name))
    }

    /// Why `path` cannot be reached: ENOTDIR when a non-directory is on the way, as the kernel
    /// says, else ENOENT.
    fn missing(&self, path: &[u8]) -> Error {
        let comps: Vec<&[u8]> = components(path).collect();
        for i in 1..comps.len() {
            match self.index.resolve(&comps[..i].join(&b'/'), true) {
                Ok(Some(r)) if matches!(r.node, Node::Dir(_)) => {}
                Ok(Some(_)) => return os_error(Errno::NOTDIR, path),
                Ok(None) => break,
                Err(e) => return e,
            }
        }
        os_error(Errno::NOENT, path)
    }

    /// The path and node `path` names (the last symlink followed when `follow`).
    fn existing(&self, path: &[u8], follow: bool) -> Result<(Vec<u8>, Node)> {
        let r = self
            .index
            .resolve(path, follow)?
            .ok_or_else(|| self.missing(path))?;
        let full = match r.path {
            Some(p) => p,
            None => components(path).collect::<Vec<_>>().join(&b'/'),
        };
        Ok((full, r.node))
    }

    fn file(&self, path: &[u8]) -> Result<(Vec<u8>, Arc<ViewEntry>)> {
        match self.existing(path, true)? {
            (_, Node::Dir(_)) => Err(os_error(Errno::ISDIR, path)),
            (full, Node::Leaf(v)) if v.meta().kind == Kind::File => Ok((full, v)),
            _ => Err(os_error(Errno::INVAL, path)),
        }
    }

    /// Change an existing path's metadata (following a final symlink when `follow`).
    fn edit(&mut self, path: &[u8], follow: bool, f: impl FnOnce(&mut Entry)) -> Result<()> {
        let (full, node) = self.existing(path, follow)?;
        if full.is_empty() {
            return Err(os_error(Errno::BUSY, path));
        }
        let v = node.view();
        let mut e = v.meta().clone();
        if v.entry.kind == Kind::Hardlink {
            e.path.clone_from(&full);
        }
        f(&mut e);
        let view = self.view(e, None);
        self.index.put(&full, view);
        Ok(())
    }

    pub fn mkdir(&mut self, path: &[u8], mode: u32, parents: bool, exist_ok: bool) -> Result<()> {
        if parents {
            let comps: Vec<&[u8]> = components(path).collect();
            for i in 1..comps.len() {
                let sub = comps[..i].join(&b'/');
                match self.index.resolve(&sub, true)? {
                    Some(r) if matches!(r.node, Node::Dir(_)) => {}
                    Some(_) => return Err(os_error(Errno::NOTDIR, &sub)),
                    None => self.mkdir(&sub, 0o755, false, false)?,
                }
            }
        }
        let full = self.place(path)?;
        if let Some(node) = self.index.lookup(&full) {
            let is_dir = matches!(node, Node::Dir(_));
            return if exist_ok && is_dir {
                Ok(())
            } else {
                Err(os_error(Errno::EXIST, path))
            };
        }
        let view = self.view(new_entry(&full, Kind::Dir, mode & 0o7777), None);
        self.index.put(&full, view);
        Ok(())
    }

    pub fn remove(&mut self, path: &[u8], recursive: bool) -> Result<()> {
        let full = self.place(path)?;
        let node = self.index.lookup(&full).ok_or_else(|| self.missing(path))?;
        if let Node::Dir(d) = &node {
            if !recursive && !d.children.is_empty() {
                return Err(os_error(Errno::NOTEMPTY, path));
            }
        }
        self.index.remove_path(&full);
        Ok(())
    }

    pub fn rename(&mut self, src: &[u8], dst: &[u8]) -> Result<()> {
        // Both parents resolve before the source is looked up, as rename(2) does.
        let from = self.place(src)?;
        let to = self.place(dst)?;
        let node = self
            .index
            .lookup(&from)
            .ok_or_else(|| os_error(Errno::NOENT, src))?;
        if from == to {
            return Ok(());
        }
        let is_dir = matches!(node, Node::Dir(_));
        if is_dir && to.starts_with(&from) && to.get(from.len()) == Some(&b'/') {
            return Err(os_error(Errno::INVAL, dst));
        }
        match (is_dir, self.index.lookup(&to)) {
            (true, Some(Node::Leaf(_))) => return Err(os_error(Errno::NOTDIR, dst)),
            (false, Some(Node::Dir(_))) => return Err(os_error(Errno::ISDIR, dst)),
            (true, Some(Node::Dir(d))) if !d.children.is_empty() => {
                return Err(os_error(Errno::NOTEMPTY, dst))
            }
            _ => {}
        }
        let moved = node.relabeled(self.layer);
        self.index.remove_path(&from);
        self.index.graft(&to, moved);
        Ok(())
    }

    pub fn symlink(&mut self, target: &[u8], path: &[u8]) -> Result<()> {
        let full = self.place(path)?;
        if self.index.lookup(&full).is_some() {
            return Err(os_error(Errno::EXIST, path));
        }
        let mut e = new_entry(&full, Kind::Symlink, 0o777);
        e.link = target.to_vec();
        let view = self.view(e, None);
        self.index.put(&full, view);
        Ok(())
    }

    /// A hard link at `dst` to what `src` names (not following a final symlink, as link(2)).
    pub fn link(&mut self, src: &[u8], dst: &[u8]) -> Result<()> {
        let (from, node) = self.existing(src, false)?;
        let Node::Leaf(v) = node else {
            return Err(os_error(Errno::PERM, src));
        };
        let to = self.place(dst)?;
        if self.index.lookup(&to).is_some() {
            return Err(os_error(Errno::EXIST, dst));
        }
        let shared = v.target.clone().unwrap_or_else(|| v.entry.clone());
        let mut e = (*shared).clone();
        e.path.clone_from(&to);
        e.kind = Kind::Hardlink;
        e.typeflag = b'1';
        e.link = from;
        let view = self.view(e, Some(shared));
        self.index.put(&to, view);
        Ok(())
    }

    pub fn chmod(&mut self, path: &[u8], mode: u32, follow: bool) -> Result<()> {
        self.edit(path, follow, |e| e.mode = mode & 0o7777)
    }

    pub fn chown(&mut self, path: &[u8], uid: u64, gid: u64, follow: bool) -> Result<()> {
        self.edit(path, follow, |e| {
            e.uid = uid;
            e.gid = gid;
        })
    }

    /// Set the modification time (now when `None`).
    pub fn utime(&mut self, path: &[u8], mtime_ns: Option<i64>, follow: bool) -> Result<()> {
        let t = mtime_ns.unwrap_or_else(now_ns);
        self.edit(path, follow, |e| e.mtime_ns = t)
    }

    pub fn setxattr(&mut self, path: &[u8], name: &[u8], value: &[u8]) -> Result<()> {
        self.edit(path, true, |e| {
            e.xattrs.insert(name.to_vec(), value.to_vec());
        })
    }

    pub fn removexattr(&mut self, path: &[u8], name: &[u8]) -> Result<()> {
        let (_, node) = self.existing(path, true)?;
        if !node.view().meta().xattrs.contains_key(name) {
            return Err(os_error(Errno::NODATA, path));
        }
        self.edit(path, true, |e| {
            e.xattrs.remove(name);
        })
    }

    /// Create `path` as an empty regular file if it does not exist (following a final symlink
    /// to an existing file otherwise); returns where the file is.
    fn create(&mut self, path: &[u8], mode: u32) -> Result<Vec<u8>> {
        match self.index.resolve(path, true)? {
            Some(_) => Ok(self.file(path)?.0),
            None => {
                let full = self.place(path)?;
                if self.index.lookup(&full).is_some() {
                    // A dangling symlink: we do not create through it.
                    return Err(os_error(Errno::NOENT, path));
                }
                let view = self.view(new_entry(&full, Kind::File, mode), None);
                self.index.put(&full, view);
                Ok(full)
            }
        }
    }

    /// Write `data` at `offset` (creating the file, mode 0644, when `create`); returns the new
    /// size. `read` fetches a stored chunk's bytes.
    pub fn write_at(
        &mut self,
        path: &[u8],
        offset: u64,
        data: &[u8],
        create: bool,
        read: ChunkSource<'_>,
    ) -> Result<u64> {
        let full = if create {
            self.create(path, 0o644)?
        } else {
            self.file(path)?.0
        };
        let old = self.file(&full)?.1.meta().clone();
        if data.is_empty() && offset <= old.size {
            return Ok(old.size); // nothing changes (not even the mtime)
        }
        let end = offset + data.len() as u64;
        let new_len = old.size.max(end);
        self.rewrite(&full, old, Patch { offset, data }, new_len, read)
    }

    /// Cut or extend (with zeros) the file to `size` bytes.
    pub fn truncate(&mut self, path: &[u8], size: u64, read: ChunkSource<'_>) -> Result<()> {
        let (full, v) = self.file(path)?;
        let old = v.meta().clone();
        if old.size == size {
            return Ok(());
        }
        self.rewrite(
            &full,
            old,
            Patch {
                offset: size,
                data: &[],
            },
            size,
            read,
        )?;
        Ok(())
    }

    /// Replace the whole content of `path` (created if missing).
    pub fn write_bytes(&mut self, path: &[u8], data: &[u8], read: ChunkSource<'_>) -> Result<()> {
        let full = self.create(path, 0o644)?;
        let old = self.file(&full)?.1.meta().clone();
        let mut empty = old;
        empty.chunks.clear();
        empty.size = 0;
        self.rewrite(
            &full,
            empty,
            Patch { offset: 0, data },
            data.len() as u64,
            read,
        )?;
        Ok(())
    }

    fn rewrite(
        &mut self,
        full: &[u8],
        mut entry: Entry,
        patch: Patch<'_>,
        new_len: u64,
        read: ChunkSource<'_>,
    ) -> Result<u64> {
        let fresh = self.fresh.clone();
        let source = |d: &Blake3| -> Result<Arc<[u8]>> {
            if let Some(b) = fresh.read().ok().and_then(|m| m.get(d).cloned()) {
                return Ok(b);
            }
            read(d)
        };
        let mut made: Vec<(Blake3, Arc<[u8]>)> = Vec::new();
        let chunks = recut(
            &entry.chunks,
            entry.size,
            &patch,
            new_len,
            self.params,
            &source,
            &mut made,
        )?;
        self.hashed += made.iter().map(|(_, b)| b.len() as u64).sum::<u64>();
        if let Ok(mut m) = self.fresh.write() {
            for (d, b) in made {
                m.entry(d).or_insert(b);
            }
        }
        entry.digest = match chunks.as_slice() {
            [] => Some(Blake3::of(&[])),
            [one] => Some(one.digest),
            _ => None,
        };
        entry.chunks = chunks;
        entry.size = new_len;
        entry.mtime_ns = now_ns();
        entry.path = full.to_vec();
        if entry.kind == Kind::Hardlink {
            entry.kind = Kind::File;
            entry.typeflag = b'0';
            entry.link.clear();
        }
        let view = self.view(entry, None);
        self.index.put(full, view);
        Ok(new_len)
    }

    /// Store the changes as a new layer.
    pub fn commit(&self, store: &Store, progress: Progress<'_>) -> Result<Imported> {
        let changes = diff_indices(&self.base.index, &self.index);
        let fresh = self
            .fresh
            .read()
            .map_err(|_| Error::Conflict("container state poisoned".into()))?;
        store.emit(&changes, &fresh, None, progress)
    }
}

/// Bytes written at an offset.
struct Patch<'a> {
    offset: u64,
    data: &'a [u8],
}

/// The chunk list of a file after `patch` (and resizing to `new_len`), re-cutting only what
/// changed; new chunks are pushed to `made`.
fn recut(
    old: &[ChunkRef],
    old_len: u64,
    patch: &Patch<'_>,
    new_len: u64,
    params: ChunkParams,
    source: &dyn Fn(&Blake3) -> Result<Arc<[u8]>>,
    made: &mut Vec<(Blake3, Arc<[u8]>)>,
) -> Result<Vec<ChunkRef>> {
    let mut starts = Vec::with_capacity(old.len() + 1);
    let mut at = 0u64;
    for c in old {
        starts.push(at);
        at += u64::from(c.len);
    }
    let (w0, w1) = (patch.offset, patch.offset + patch.data.len() as u64);
    // The first byte that may differ; a size change also re-cuts the last chunk (cut by EOF).
    let mut first = w0.min(new_len);
    if new_len != old_len {
        first = first.min(starts.last().copied().unwrap_or(0)).min(old_len);
    }
    let i0 = match starts.partition_point(|&s| s <= first) {
        0 => 0,
        n => n - 1,
    };
    let start = starts.get(i0).copied().unwrap_or(0).min(first);
    let mut out: Vec<ChunkRef> = old[..i0.min(old.len())].to_vec();
    // Bytes of the new content from `pos`, up to `max` of them.
    let mut cache: Option<(usize, Arc<[u8]>)> = None;
    let mut old_byte_range = |from: u64, to: u64, buf: &mut Vec<u8>| -> Result<()> {
        let mut p = from;
        while p < to {
            let i = starts.partition_point(|&s| s <= p) - 1;
            let bytes = match &cache {
                Some((ci, b)) if *ci == i => b.clone(),
                _ => {
                    let b = source(&old[i].digest)?;
                    cache = Some((i, b.clone()));
                    b
                }
            };
            let within = (p - starts[i]) as usize;
            let n = ((to - p) as usize).min(bytes.len() - within);
            buf.extend_from_slice(&bytes[within..within + n]);
            p += n as u64;
        }
        Ok(())
    };
    let max = u64::from(params.max);
    let mut buf = Vec::with_capacity(params.max as usize);
    let mut pos = start;
    while pos < new_len {
        // Resynchronised: from an old boundary past the patch, the old chunks are the answer.
        if pos >= w1 && new_len == old_len {
            if let Ok(j) = starts.binary_search(&pos) {
                out.extend_from_slice(&old[j..]);
                return Ok(out);
            }
        }
        let end = (pos + max).min(new_len);
        buf.clear();
        let mut p = pos;
        while p < end {
            if p >= w0 && p < w1 {
                let to = end.min(w1);
                buf.extend_from_slice(&patch.data[(p - w0) as usize..(to - w0) as usize]);
                p = to;
            } else if p < old_len {
                let to = end.min(old_len).min(if p < w0 { w0 } else { end });
                old_byte_range(p, to, &mut buf)?;
                p = to;
            } else {
                let to = end.min(if p < w0 { w0 } else { end });
                buf.resize(buf.len() + (to - p) as usize, 0);
                p = to;
            }
        }
        let n = params.cut(&buf);
        let chunk = &buf[..n];
        let digest = Blake3::of(chunk);
        made.push((digest, Arc::from(chunk)));
        out.push(ChunkRef {
            digest,
            len: n as u32,
        });
        pos += n as u64;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn params() -> ChunkParams {
        ChunkParams::default()
    }

    /// Chunk `data` from scratch into a store map; return its chunk list.
    fn chunked(data: &[u8], store: &mut HashMap<Blake3, Arc<[u8]>>) -> Vec<ChunkRef> {
        params()
            .split(data)
            .into_iter()
            .map(|c| {
                let d = Blake3::of(c);
                store.insert(d, Arc::from(c));
                ChunkRef {
                    digest: d,
                    len: c.len() as u32,
                }
            })
            .collect()
    }

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// A patch re-cut incrementally gives the chunk list of chunking the result from scratch,
    /// and hashes only a bounded number of bytes.
    fn check(base: Vec<u8>, offset: usize, data: &[u8], new_len: usize) {
        let mut store = HashMap::new();
        let old = chunked(&base, &mut store);
        let mut expect = base.clone();
        expect.resize(expect.len().max(offset + data.len()), 0);
        expect[offset..offset + data.len()].copy_from_slice(data);
        expect.resize(new_len, 0);
        let want = chunked(&expect, &mut HashMap::new());
        let source = |d: &Blake3| Ok(store[d].clone());
        let mut made = Vec::new();
        let patch = Patch {
            offset: offset as u64,
            data,
        };
        let got = recut(
            &old,
            base.len() as u64,
            &patch,
            new_len as u64,
            params(),
            &source,
            &mut made,
        )
        .unwrap();
        assert_eq!(
            got,
            want,
            "offset {offset} len {} new_len {new_len}",
            data.len()
        );
        let hashed: usize = made.iter().map(|(_, b)| b.len()).sum();
        if new_len == base.len() {
            assert!(
                hashed <= data.len() + 2 * params().max as usize,
                "hashed {hashed} bytes for a {}-byte write",
                data.len()
            );
        }
    }

    #[test]
    fn recut_matches_chunking_from_scratch() {
        let base = pseudo_random(3 << 20, 7);
        for (offset, len) in [(0, 1), (1_000_000, 1), (2_500_000, 70_000), (3 << 20, 0)] {
            let data = pseudo_random(len, offset as u64 + 3);
            check(
                base.clone(),
                offset.min(base.len() - len.max(1)),
                &data,
                base.len(),
            );
        }
        // Appending, writing past the end (a zero-filled gap), truncating, growing.
        let n = base.len();
        check(base.clone(), n, b"tail", n + 4);
        check(base.clone(), n + 5000, b"after a gap", n + 5011);
        check(base.clone(), 1000, &[], 1000);
        check(base.clone(), n + 10, &[], n + 10);
        check(Vec::new(), 0, &pseudo_random(600_000, 9), 600_000);
    }

    #[test]
    fn recut_of_zeros_is_bounded() {
        let zeros = vec![0u8; 4 << 20];
        check(zeros.clone(), 2_000_001, b"x", zeros.len());
        check(zeros.clone(), 0, b"y", zeros.len());
        check(zeros.clone(), zeros.len() - 1, b"z", zeros.len());
    }
}
