//! Changesets → stored layers, without re-chunking: how diffs, squashes and container commits
//! become layers.
//!
//! Invariants: the layer a [`Change`] list becomes is exactly the layer `import_tar` would make
//! of the canonical tar ([`crate::tarwrite`]) of those changes — the headers are run through the
//! same [`Splitter`] (with zeros standing in for payloads, so parsing costs no content read), and
//! each regular file keeps the chunk list its source entry already has, which is the list
//! chunking its bytes again would give (chunking is per file and deterministic). Content is read
//! once, to hash the tar (`id`, `diff_id`) and optionally to write it out at the same time.
//! Chunks a container wrote that the store lacks go into a new pack, made visible in the same
//! transaction as the layer, under a lease.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::Instant;

use rusqlite::TransactionBehavior;

use crate::cas::{self, FreshChunks, PackWriter};
use crate::changeset::{marker_member, member_path, Change, What};
use crate::digest::{Blake3, StreamHasher};
use crate::error::{Error, IoContext, Result};
use crate::layer::{self, Entry, Kind, LayerInfo};
use crate::meta;
use crate::store::{Imported, Progress, Store};
use crate::tar::{EntrySink, Op, SplitOutput, Splitter, StoredSplit};
use crate::tarwrite::{self, Member, MemberKind};

fn entry_member<'a>(path: &'a [u8], e: &'a Entry, kind: MemberKind<'a>) -> Member<'a> {
    Member {
        path,
        kind,
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        uname: &e.uname,
        gname: &e.gname,
        mtime_ns: e.mtime_ns,
        xattrs: e
            .xattrs
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
            .collect(),
    }
}

/// The header bytes of one change and the size of the data that follows it.
fn change_header(change: &Change) -> Result<(Vec<u8>, u64)> {
    let path = member_path(change);
    let (member, size) = match &change.what {
        What::Whiteout | What::Opaque => (marker_member(&path), 0),
        What::Link { target, meta } => (entry_member(&path, meta, MemberKind::Hardlink(target)), 0),
        What::Entry(e) => {
            let kind = match e.kind {
                Kind::File => MemberKind::File { size: e.size },
                Kind::Dir => MemberKind::Dir,
                Kind::Symlink => MemberKind::Symlink(&e.link),
                Kind::Char => MemberKind::Char(e.devmajor, e.devminor),
                Kind::Block => MemberKind::Block(e.devmajor, e.devminor),
                Kind::Fifo => MemberKind::Fifo,
                other => {
                    return Err(Error::InvalidArgument(format!(
                        "{}: a {} entry cannot be part of a changeset",
                        String::from_utf8_lossy(&path),
                        other.name()
                    )))
                }
            };
            let size = if e.kind == Kind::File { e.size } else { 0 };
            (entry_member(&path, e, kind), size)
        }
    };
    Ok((tarwrite::header(&member)?, size))
}

/// The tar of the changes with zeros for payloads: enough for the splitter.
struct HeaderStream<'c> {
    changes: std::slice::Iter<'c, Change>,
    /// Bytes of the current header, then how many zeros follow.
    head: Vec<u8>,
    head_pos: usize,
    /// Zeros (a payload and its padding) before the next header; the splitter may skip them.
    zeros: &'c std::cell::Cell<u64>,
    written: u64,
    done: bool,
    error: Option<Error>,
}

impl Read for HeaderStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.head_pos < self.head.len() {
                let n = (self.head.len() - self.head_pos).min(buf.len());
                buf[..n].copy_from_slice(&self.head[self.head_pos..self.head_pos + n]);
                self.head_pos += n;
                self.written += n as u64;
                return Ok(n);
            }
            let zeros = self.zeros.get();
            if zeros > 0 {
                let n = usize::try_from(zeros).unwrap_or(usize::MAX).min(buf.len());
                buf[..n].fill(0);
                self.zeros.set(zeros - n as u64);
                return Ok(n);
            }
            if self.done {
                return Ok(0);
            }
            match self.changes.next() {
                Some(c) => match change_header(c) {
                    Ok((head, size)) => {
                        self.head = head;
                        // Counted as written now: the splitter reads or skips them all.
                        let zeros = size + tarwrite::padding(size).len() as u64;
                        self.zeros.set(zeros);
                        self.written += zeros;
                    }
                    Err(e) => {
                        self.error = Some(e);
                        return Err(io::Error::other("changeset header failed"));
                    }
                },
                None => {
                    self.head = tarwrite::trailer(self.written);
                    self.done = true;
                }
            }
            self.head_pos = 0;
        }
    }
}

/// Gives each parsed entry the chunks of the change it came from.
struct AttachChunks<'c> {
    changes: std::slice::Iter<'c, Change>,
}

impl EntrySink for AttachChunks<'_> {
    fn entry(&mut self, entry: &mut Entry, _payload: Option<&mut dyn Read>) -> Result<()> {
        let change = self
            .changes
            .next()
            .ok_or_else(|| Error::Corrupt("changeset: more entries than changes".into()))?;
        if entry.kind == Kind::File {
            let What::Entry(source) = &change.what else {
                entry.digest = Some(Blake3::of(&[]));
                return Ok(());
            };
            entry.chunks.clone_from(&source.chunks);
            // A container-written file has no whole-file digest yet: the render computes it.
            entry.digest = match source.chunks.len() {
                0 => Some(Blake3::of(&[])),
                _ => source.digest,
            };
        }
        Ok(())
    }
}

/// Where the emitted tar's bytes go besides the hasher.
pub type Tee<'a> = Option<&'a mut dyn Write>;

impl Store {
    /// Store `changes` (in archive order) as a layer; `fresh` supplies chunks the store does not
    /// have yet; the tar is also written to `tee` when given.
    pub fn emit(
        &self,
        changes: &[Change],
        fresh: &FreshChunks,
        tee: Tee<'_>,
        progress: Progress<'_>,
    ) -> Result<Imported> {
        let started = Instant::now();
        let pack_name = format!("{}.pack", crate::owner::unique_name());
        let mut conn = self.conn()?;
        let lease = self.lease(&conn, &pack_name)?;
        let result = (|| {
            let mut writer = PackWriter::new(
                &self.packs_dir(),
                pack_name.clone(),
                self.options().compression_level,
            );
            // Payloads come in change order: plan them first, so the stored chunks are read
            // and decoded (on the other cores) while the headers are being split.
            let payloads = changes.iter().filter_map(|c| match &c.what {
                What::Entry(e) if e.kind == Kind::File => Some(&e.chunks),
                _ => None,
            });
            let locs = meta::chunk_locs(&conn, payloads.clone().flatten().map(|c| &c.digest))?;
            let (mut new_chunks, mut new_bytes) = (0u64, 0u64);
            let mut plan = Vec::new();
            let mut stored = Vec::new();
            let mut seen = std::collections::HashSet::new();
            for c in payloads.flatten() {
                match locs.get(&c.digest) {
                    Some(loc) => {
                        stored.push(loc.clone());
                        plan.push(Source::Stored);
                    }
                    None => {
                        let data = fresh
                            .get(&c.digest)
                            .ok_or_else(|| self.missing_chunk(&c.digest))?;
                        if seen.insert(c.digest) {
                            writer.add(c.digest, data)?;
                            new_chunks += 1;
                            new_bytes += data.len() as u64;
                        }
                        plan.push(Source::Fresh(data.clone()));
                    }
                }
            }
            let chunks = cas::OrderedChunks::new(&self.packs_dir(), stored);
            let planned = started.elapsed();

            let mut sink = AttachChunks {
                changes: changes.iter(),
            };
            let zeros = std::cell::Cell::new(0);
            let mut stream = HeaderStream {
                changes: changes.iter(),
                head: Vec::new(),
                head_pos: 0,
                zeros: &zeros,
                written: 0,
                done: false,
                error: None,
            };
            // Payloads are zeros: skip them rather than make and read them.
            let skip = |n: u64| match zeros.get().checked_sub(n) {
                Some(left) => {
                    zeros.set(left);
                    true
                }
                None => false,
            };
            // The recipe's raw bytes are kept compressed as they come (see Splitter::pack_raw).
            let parsed = Splitter::new(&mut stream, self.limits(), &mut sink)
                .skip_payloads_with(&skip)
                .pack_raw()
                .and_then(Splitter::run);
            if let Some(e) = stream.error.take() {
                return Err(e);
            }
            let SplitOutput {
                packed,
                mut entries,
                warnings,
                ..
            } = parsed?;
            let split_blob = packed
                .ok_or_else(|| Error::Corrupt("the changeset's recipe was not packed".into()))?;
            if entries.len() != changes.len() {
                return Err(Error::Corrupt(format!(
                    "changeset of {} changes parsed as {} entries",
                    changes.len(),
                    entries.len()
                )));
            }
            let split_done = started.elapsed() - planned;
            let rendering = Instant::now();
            // The tar renders from the stored recipe, its raw bytes streamed back out of it.
            let mut split = StoredSplit::open(&split_blob)?;
            let digests = self.render(&mut split, &mut entries, plan, chunks, tee, progress)?;
            let render_time = rendering.elapsed();
            let info = LayerInfo {
                id: digests.blake3,
                diff_id: digests.sha256.clone(),
                tree_id: layer::tree_id(&entries),
                size: digests.len,
                entry_count: entries.len() as u64,
                compressed_digest: None,
                compression: None,
                created_unix: meta::now(),
            };
            let (row, chunk_set) = meta::layer_row_with(info.clone(), &entries, split_blob)?;
            let pack = writer.finish(crate::crash_point)?;
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let existed =
                meta::insert_layer_and_pack(&tx, &pack_name, pack.as_ref(), &row, &chunk_set)?;
            meta::release_lease(&tx, lease.id)?;
            crate::crash_point("before-commit");
            tx.commit()?;
            crate::crash_point("after-commit");
            let layer = if existed {
                meta::find_layer(&conn, &info.id.to_string())?
            } else {
                info
            };
            let secs = |d: std::time::Duration| d.as_secs_f64();
            Ok(Imported {
                layer,
                existed,
                new_chunks,
                new_bytes,
                warnings,
                timings: vec![
                    ("total", secs(started.elapsed())),
                    ("plan", secs(planned)),
                    ("split", secs(split_done)),
                    ("render+hash", secs(render_time)),
                ],
            })
        })();
        match &result {
            Ok(_) => lease.released(), // by the transaction that committed the layer
            Err(_) => lease.release(&conn),
        }
        result
    }

    /// Rebuild the tar of `split` (chunks from `plan`, in payload order, the stored ones read
    /// by `chunks`) into the stream hasher and `tee`; returns its digests.
    fn render(
        &self,
        split: &mut StoredSplit<'_>,
        entries: &mut [Entry],
        plan: Vec<Source>,
        mut chunks: cas::OrderedChunks,
        mut tee: Tee<'_>,
        progress: Progress<'_>,
    ) -> Result<crate::digest::StreamDigests> {
        const BATCH: usize = 1 << 20;
        let hasher = StreamHasher::spawn(false);
        let mut batch: Vec<u8> = Vec::with_capacity(BATCH);
        let mut done = 0u64;
        // Bytes are gathered once into a batch, which is written to `tee` and then moved to
        // the hasher: one copy of the tar in all.
        let mut flush = |batch: &mut Vec<u8>| -> Result<()> {
            if let Some(out) = tee.as_deref_mut() {
                out.write_all(batch).ctx(|| "writing the layer".into())?;
            }
            let next = hasher.spare().unwrap_or_else(|| Vec::with_capacity(BATCH));
            hasher.update_owned(std::mem::replace(batch, next));
            Ok(())
        };
        let mut emit = |bytes: &[u8], batch: &mut Vec<u8>| -> Result<()> {
            batch.extend_from_slice(bytes);
            if batch.len() >= BATCH {
                flush(batch)?;
            }
            Ok(())
        };
        let mut sources = plan.into_iter();
        for op in &split.ops {
            match *op {
                Op::Raw(n) => {
                    split
                        .raw
                        .take(n, |block, range| emit(&block[range], &mut batch))?;
                    done += n;
                }
                Op::Payload(i) => {
                    let entry = &mut entries[i as usize];
                    let mut file_hash = entry.digest.is_none().then(blake3::Hasher::new);
                    for _ in 0..entry.chunks.len() {
                        match sources.next() {
                            Some(Source::Fresh(data)) => {
                                done += data.len() as u64;
                                emit(&data, &mut batch)?;
                                if let Some(h) = file_hash.as_mut() {
                                    h.update(&data);
                                }
                            }
                            Some(Source::Stored) => {
                                let (block, range) = chunks
                                    .next_chunk()
                                    .ok_or_else(|| {
                                        Error::Corrupt(
                                            "changeset: fewer chunks than planned".into(),
                                        )
                                    })?
                                    .map_err(|e| self.name_damage(e, &entry.path))?;
                                done += range.len() as u64;
                                if let Some(h) = file_hash.as_mut() {
                                    h.update(&block[range.clone()]);
                                }
                                emit(&block[range], &mut batch)?;
                            }
                            None => {
                                return Err(Error::Corrupt(
                                    "changeset: fewer chunks than entries need".into(),
                                ))
                            }
                        }
                    }
                    if let Some(h) = file_hash {
                        entry.digest = Some(h.finalize().into());
                    }
                    progress(done)?;
                }
            }
        }
        if !batch.is_empty() {
            flush(&mut batch)?;
        }
        if let Some(out) = tee {
            out.flush().ctx(|| "writing the layer".into())?;
        }
        Ok(hasher.finish())
    }
}

/// Where one payload chunk comes from.
enum Source {
    /// The next of the stored chunks (read ahead in order).
    Stored,
    Fresh(Arc<[u8]>),
}
