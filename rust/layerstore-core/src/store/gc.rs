//! Garbage collection: what nothing references goes, packs mostly garbage are rewritten.
//!
//! Invariants: nothing a live lease covers is collected; packs emptied or replaced are retired
//! (kept for a grace period counted from their retirement) rather than deleted, since a reader
//! may have looked their chunks up before the change.

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, TransactionBehavior};

use super::{space, Store};
use crate::cas;
use crate::error::{IoContext, Result};
use crate::meta;

#[derive(Debug, Default, Clone)]
pub struct GcReport {
    pub chunks_removed: u64,
    pub packs_removed: u64,
    pub packs_rewritten: u64,
    pub bytes_reclaimed: u64,
    /// Some unreferenced chunks were kept because imports in flight may have deduplicated
    /// against them (a later gc, once those imports end, collects them).
    pub deferred: bool,
    /// Mounts whose owner died (or that were unmounted from outside) cleaned up.
    pub mounts_reaped: u64,
    /// Layer snapshots (overlay mounts) of deleted layers removed.
    pub snapshots_removed: u64,
    /// Packs worth rewriting that were left as they were: the disk had no room for the new
    /// pack (a later gc, with room, rewrites them).
    pub packs_not_rewritten: u64,
}

/// Packs below this size are merged by `gc` once there are [`SMALL_PACKS_TO_MERGE`] of them.
const SMALL_PACK: u64 = 16 << 20;
const SMALL_PACKS_TO_MERGE: usize = 8;

/// What gc's first transaction found: the packs it emptied and the files it may delete.
struct Swept {
    /// Packs whose rows are gone (no live chunk left): retired, or unlinked when space is short.
    emptied: Vec<String>,
    /// Pack files no row names and no live import owns (interrupted imports).
    orphans: Vec<PathBuf>,
    /// The packs and directories live leases cover.
    live: Vec<String>,
    chunks_removed: u64,
    deferred: bool,
    bytes: u64,
}

impl Store {
    /// Remove what nothing references: unreferenced chunks, packs without live chunks, and
    /// files left by interrupted imports (packs, and `tmp/` scratch of dead processes); rewrite
    /// packs that are mostly garbage.
    ///
    /// What frees space without taking any comes first, in a transaction of its own: the rows
    /// of unreferenced chunks and emptied packs, then the emptied and orphaned pack files (and
    /// pack tails). Rewriting packs, which writes a new pack before it can delete the old ones,
    /// comes after; if the disk has no room for it, the report says how many packs were left
    /// as they were (`packs_not_rewritten`). On a full disk the store's reserve file is given
    /// up for the first transaction (see [`super::space`]) and made again at the end.
    pub fn gc(&self) -> Result<GcReport> {
        self.check_writable("collect garbage")?;
        let mut report = GcReport::default();
        let (used_reserve, swept) = self.with_room(|| self.gc_sweep());
        let swept = swept?;
        report.chunks_removed = swept.chunks_removed;
        report.deferred = swept.deferred;
        report.packs_removed = swept.emptied.len() as u64;
        report.bytes_reclaimed = swept.bytes;
        for path in &swept.orphans {
            let _ = fs::remove_file(path);
        }
        // Short of space, packs that hold no live chunk go at once: only a reader of a deleted
        // layer could still want them.
        let short = used_reserve
            || space::available(&self.packs_dir()).is_some_and(|a| a < space::LOW_SPACE_BYTES);
        if short {
            for name in &swept.emptied {
                let _ = fs::remove_file(self.packs_dir().join(name));
            }
        } else {
            self.retire(&swept.emptied)?;
        }
        crate::lease::sweep(&self.root, &swept.live);
        match self.gc_compact(&mut report) {
            Err(e) if space::is_disk_full(&e) => {}
            other => other?,
        }
        let retired = self.packs_dir().join(cas::RETIRED_DIR);
        // Their bytes were counted when they were retired.
        expire_retired(&retired);
        report.bytes_reclaimed += self.gc_image_blobs()?;
        report.bytes_reclaimed += sweep_tmp(&self.root.join("tmp"));
        report.mounts_reaped = self.reap_mounts()?.mounts;
        let (snapshots, bytes) = self.gc_snapshots()?;
        report.snapshots_removed = snapshots;
        report.bytes_reclaimed += bytes;
        match meta::checkpoint(&*self.conn()?) {
            // The log is folded into the database later, when there is room.
            Err(e) if space::is_disk_full(&e) => {}
            other => other?,
        }
        self.make_reserve();
        Ok(report)
    }

    /// gc's first transaction: forget unreferenced chunks and the packs left without a live
    /// chunk, and find the pack files of interrupted imports. Writes nothing but rows.
    fn gc_sweep(&self) -> Result<Swept> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let leases = meta::live_leases(&tx, &|l| self.lease_alive(l))?;
        let live: Vec<String> = leases.iter().map(|l| l.name.clone()).collect();
        // Imports in flight protect exactly the unreferenced chunks they may have deduplicated
        // against (see meta::sweep_unreferenced_chunks); everything else is collected.
        let oldest_live = leases.iter().map(|l| l.seq).min();
        let (removed, kept) = meta::sweep_unreferenced_chunks(&tx, oldest_live)?;
        let mut swept = Swept {
            emptied: Vec::new(),
            orphans: Vec::new(),
            live,
            chunks_removed: removed,
            deferred: kept > 0,
            bytes: 0,
        };
        for (name, size) in meta::packs(&tx)? {
            if self.live_pack_bytes(&tx, &name)? == 0 {
                meta::delete_pack(&tx, &name)?;
                swept.emptied.push(name);
                swept.bytes += size;
            }
        }
        let known: HashSet<String> = meta::packs(&tx)?.into_iter().map(|(n, _)| n).collect();
        let listing = || format!("listing {}", self.packs_dir().display());
        for entry in fs::read_dir(self.packs_dir()).ctx(listing)? {
            let entry = entry.ctx(listing)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_file = entry.file_type().is_ok_and(|t| t.is_file());
            if is_file
                && !known.contains(&name)
                && !swept.live.contains(&name)
                && !swept.emptied.contains(&name)
            {
                swept.bytes += entry.metadata().map(|m| m.len()).unwrap_or(0);
                swept.orphans.push(entry.path());
            }
        }
        tx.commit()?;
        Ok(swept)
    }

    /// gc's second transaction: rewrite packs that are mostly garbage, merge small ones, trim
    /// tails. A rewrite the disk has no room for leaves its packs as they were, counted in
    /// `packs_not_rewritten`.
    fn gc_compact(&self, report: &mut GcReport) -> Result<()> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let header = cas::PACK_MAGIC.len() as u64;
        let mut rewrite: Vec<(String, u64)> = Vec::new();
        let mut small: Vec<(String, u64)> = Vec::new();
        for (name, size) in meta::packs(&tx)? {
            let live_bytes = self.live_pack_bytes(&tx, &name)?;
            if live_bytes > 0 && (live_bytes + header) * 2 < size {
                rewrite.push((name, size));
            } else if size < SMALL_PACK {
                small.push((name, size));
            } else {
                self.trim_pack_tail(&name, size, report);
            }
        }
        // Every import writes its own pack: merge small ones so their number stays low.
        if small.len() >= SMALL_PACKS_TO_MERGE {
            rewrite.append(&mut small);
        }
        for (name, size) in small {
            self.trim_pack_tail(&name, size, report);
        }
        if rewrite.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = rewrite.iter().map(|(n, _)| n.as_str()).collect();
        let new_size = match self.rewrite_packs(tx, &names) {
            Err(e) if space::is_disk_full(&e) => {
                report.packs_not_rewritten += rewrite.len() as u64;
                return Err(e);
            }
            other => other?,
        };
        let old_size: u64 = rewrite.iter().map(|(_, s)| s).sum();
        let replaced: Vec<String> = rewrite.into_iter().map(|(n, _)| n).collect();
        report.packs_rewritten += replaced.len() as u64;
        report.bytes_reclaimed += old_size.saturating_sub(new_size);
        self.retire(&replaced)
    }

    /// Move packs no row names any more into `packs/retired/`, where they wait the grace
    /// period counted from now (readers may hold their old locations).
    fn retire(&self, names: &[String]) -> Result<()> {
        if names.is_empty() {
            return Ok(());
        }
        let retired = self.packs_dir().join(cas::RETIRED_DIR);
        fs::create_dir_all(&retired).ctx(|| format!("creating {}", retired.display()))?;
        for name in names {
            let to = retired.join(name);
            if fs::rename(self.packs_dir().join(name), &to).is_ok() {
                // The grace period runs from now: a rename keeps the file's old mtime.
                let _ = fs::File::options()
                    .write(true)
                    .open(&to)
                    .and_then(|f| f.set_modified(std::time::SystemTime::now()));
            }
        }
        Ok(())
    }

    /// Cut bytes past a pack's committed length (never read; left by nothing we know of, but
    /// reclaimed all the same).
    fn trim_pack_tail(&self, name: &str, size: u64, report: &mut GcReport) {
        let path = self.packs_dir().join(name);
        if let Ok(m) = fs::metadata(&path) {
            if m.len() > size {
                if let Ok(f) = fs::OpenOptions::new().write(true).open(&path) {
                    if f.set_len(size).and_then(|()| f.sync_all()).is_ok() {
                        report.bytes_reclaimed += m.len() - size;
                    }
                }
            }
        }
    }

    /// Stored bytes of `pack` that live chunks account for: whole blocks, but a block mostly
    /// dead only for its live share (gc regroups those chunks when it rewrites the pack).
    fn live_pack_bytes(&self, tx: &Connection, pack: &str) -> Result<u64> {
        let blocks = meta::live_blocks(tx, pack)?;
        let file = cas::open_pack(&self.packs_dir(), pack).ok();
        Ok(blocks
            .iter()
            .map(|b| b.live_stored(file.as_ref().and_then(|f| b.decoded_len(f))))
            .sum())
    }

    /// Copy the live blocks of `names` into one fresh pack, repoint their chunks and commit `tx`.
    /// On failure the new file is removed and `tx` is rolled back: nothing changed.
    fn rewrite_packs(&self, tx: rusqlite::Transaction<'_>, names: &[&str]) -> Result<u64> {
        let new_name = format!("{}.pack", crate::owner::unique_name());
        let new_path = self.packs_dir().join(&new_name);
        let result = self
            .copy_live_blocks(&tx, names, &new_name, &new_path)
            .and_then(|size| Ok(tx.commit().map(|()| size)?));
        if result.is_err() {
            let _ = fs::remove_file(&new_path);
        }
        result
    }

    fn copy_live_blocks(
        &self,
        tx: &Connection,
        names: &[&str],
        new_name: &str,
        new_path: &Path,
    ) -> Result<u64> {
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(new_path)
            .ctx(|| format!("creating {}", new_path.display()))?;
        let writing = || format!("writing {}", new_path.display());
        out.write_all(cas::PACK_MAGIC).ctx(writing)?;
        // The row exists before chunks point at it (foreign key); its size is set at the end.
        meta::insert_pack(tx, new_name, 0)?;
        let mut offset = cas::PACK_MAGIC.len() as u64;
        let mut buf = Vec::new();
        let mut regroup = cas::Regrouper::new(self.options.compression_level);
        let append = |out: &mut fs::File,
                      offset: &mut u64,
                      (codec, bytes, chunks): cas::RegroupedBlock|
         -> Result<()> {
            out.write_all(&bytes).ctx(writing)?;
            let moved: Vec<cas::ChunkLoc> = chunks
                .into_iter()
                .map(|(digest, inner_offset, len)| cas::ChunkLoc {
                    digest,
                    pack: new_name.to_owned(),
                    block_offset: *offset,
                    block_len: bytes.len() as u64,
                    codec,
                    inner_offset,
                    len,
                })
                .collect();
            meta::move_chunks(tx, &moved)?;
            *offset += bytes.len() as u64;
            Ok(())
        };
        for name in names {
            let src = cas::open_pack(&self.packs_dir(), name)?;
            for block in meta::live_blocks(tx, name)? {
                if block.is_sparse(block.decoded_len(&src)) {
                    // Mostly dead: keep only its live chunks, in new blocks.
                    let decoded = block.decode(&src, name)?;
                    for loc in meta::block_chunks(tx, name, block.offset)? {
                        if let Some(full) = regroup.add(&decoded, &loc)? {
                            append(&mut out, &mut offset, full)?;
                        }
                    }
                    continue;
                }
                buf.resize(block.len as usize, 0);
                std::os::unix::fs::FileExt::read_exact_at(&src, &mut buf, block.offset)
                    .ctx(|| format!("reading {}", self.packs_dir().join(name).display()))?;
                out.write_all(&buf).ctx(writing)?;
                meta::move_block(tx, (name, block.offset), (new_name, offset))?;
                offset += block.len;
            }
        }
        if let Some(last) = regroup.take()? {
            append(&mut out, &mut offset, last)?;
        }
        for name in names {
            meta::delete_pack(tx, name)?;
        }
        out.sync_all()
            .ctx(|| format!("syncing {}", new_path.display()))?;
        cas::sync_dir(&self.packs_dir())?;
        meta::set_pack_size(tx, new_name, offset)?;
        Ok(offset)
    }
}

/// Delete retired packs older than the grace period.
fn expire_retired(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let Ok(meta) = e.metadata() else { continue };
        let old = meta
            .modified()
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= cas::RETIRE_GRACE);
        if old {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// The kinds of scratch entries image imports and exports make under `tmp/`.
const TMP_KINDS: [&str; 3] = ["oci", "docker", space::RESERVE];

/// Whether the `tmp/` entry `name` belongs to a process that is gone. A name that records no
/// owner (left by an older build, or by hand) is never judged abandoned.
fn tmp_abandoned(name: &str) -> bool {
    name.split_once('-')
        .is_some_and(|(kind, tag)| TMP_KINDS.contains(&kind) && crate::owner::owner_gone(tag))
}

/// Remove the scratch entries of `tmp/` whose owner is dead; returns the bytes freed.
fn sweep_tmp(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut freed = 0;
    for e in entries.flatten() {
        if !tmp_abandoned(&e.file_name().to_string_lossy()) {
            continue;
        }
        let path = e.path();
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        let size = if is_dir {
            crate::fsio::dir_size(&path).unwrap_or(0)
        } else {
            e.metadata().map_or(0, |m| m.len())
        };
        let removed = if is_dir {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        if removed.is_ok() {
            freed += size;
        }
    }
    freed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_of_dead_owners_is_abandoned() {
        let name = crate::owner::owned_tmp_name("oci");
        assert!(!tmp_abandoned(&name), "this process is alive");
        assert!(
            tmp_abandoned("docker-12-34-ab.tar"),
            "no process 12 started at tick 34"
        );
        assert!(!tmp_abandoned("pack-12-34-ab"), "not a scratch kind");
        assert!(!tmp_abandoned("oci-0123abcd"), "records no owner");
    }
}
