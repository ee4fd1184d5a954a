//! Room to free room: a store keeps a small reserve file so that the operations that free space
//! (`delete`, `gc`, `untag`) still run on a full disk.
//!
//! Invariants: each of those operations writes a little to the database (a few pages of the
//! write-ahead log) before anything is freed; on a full disk that first write fails. So when
//! one fails for want of space (`ENOSPC`), the reserve is released and the operation tried once
//! more; `gc` makes the reserve again once it has freed space. The reserve is made whole
//! (allocated, never sparse) under `tmp/` and renamed into place, so it is either absent or
//! complete; a half-made one left by a killed process is scratch that `gc` sweeps.

use std::fs;
use std::io::Write;
use std::path::Path;

use super::Store;
use crate::error::{Error, Result};

/// The reserve file, in the store's root.
pub(crate) const RESERVE: &str = "reserve";
/// Its size: the write-ahead log of a delete, and of gc's first transaction (which deletes the
/// rows of unreferenced chunks, about 60 to a 4 KiB page) on a store of some 100,000 chunks.
pub(crate) const RESERVE_BYTES: u64 = 2 << 20;
/// Below this much free space, `gc` unlinks the packs it empties at once rather than retiring
/// them for the grace period (a reader of a deleted layer may then fail; space comes first).
pub(crate) const LOW_SPACE_BYTES: u64 = 64 << 20;

/// Whether `e` is the OS saying the disk is full.
pub(crate) fn is_disk_full(e: &Error) -> bool {
    e.io_error()
        .and_then(std::io::Error::raw_os_error)
        .is_some_and(|n| n == rustix::io::Errno::NOSPC.raw_os_error())
}

/// Bytes available to this process on the file system holding `dir`.
pub(crate) fn available(dir: &Path) -> Option<u64> {
    let s = rustix::fs::statvfs(dir).ok()?;
    Some(s.f_bavail.saturating_mul(s.f_frsize))
}

impl Store {
    /// Run `op`; if it fails for want of space, release the reserve and run it once more.
    /// Returns whether the reserve was used, with the result.
    pub(crate) fn with_room<T>(&self, op: impl Fn() -> Result<T>) -> (bool, Result<T>) {
        match op() {
            Err(e) if is_disk_full(&e) && self.release_reserve() => (true, op()),
            r => (false, r),
        }
    }

    /// Delete the reserve; whether there was one.
    fn release_reserve(&self) -> bool {
        fs::remove_file(self.root.join(RESERVE)).is_ok()
    }

    /// Make the reserve if it is missing or short, as room allows (best effort: a store on a
    /// disk too full for it works without one, and gc tries again).
    pub(crate) fn make_reserve(&self) {
        let path = self.root.join(RESERVE);
        if fs::metadata(&path).is_ok_and(|m| m.len() >= RESERVE_BYTES) {
            return;
        }
        let tmp = self
            .root
            .join("tmp")
            .join(crate::owner::owned_tmp_name(RESERVE));
        let made = fs::File::create_new(&tmp).and_then(|mut f| {
            // Allocated, not sparse: a sparse file would free nothing when deleted.
            let len = RESERVE_BYTES as usize;
            if rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, len as u64)
                .is_err()
            {
                f.write_all(&vec![0u8; len])?;
            }
            f.sync_all()?;
            fs::rename(&tmp, &path)
        });
        if made.is_err() {
            let _ = fs::remove_file(&tmp);
        }
    }
}
