//! Leases: what an import in flight holds so that `gc` leaves its files and chunks alone.
//!
//! Invariants: a lease is a database row (in [`crate::meta`]) *and* an exclusive `flock` on its
//! own lock file under `leases/`, taken before the row exists and held by the importing
//! process until it ends. Whether a lease is live is asked of the kernel — the lock is held
//! exactly while its owner's descriptor is open, so it is dropped when the owner dies, however
//! it dies, and it works across PID namespaces (a container sharing the store), where process
//! ids are not comparable. The owner removes its lock file once its row is gone; if it could not
//! delete the row (a full disk), it leaves the file, unlocked once it closes it, so the next `gc`
//! judges the lease dead. A lease without a lock file (written by an older build) is judged by
//! its process id and start time. `gc` removes lock files no one holds.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{flock, FlockOperation};

use crate::error::{IoContext, Result};
use crate::meta::{self, LeaseRow};

/// The directory of lock files, under the store root.
pub(crate) const LEASES_DIR: &str = "leases";

/// A held lease: its row id, and the locked file that proves its owner is alive.
pub(crate) struct Lease {
    pub id: i64,
    lock: File,
    path: PathBuf,
    /// The row is gone: the lock file can go too.
    released: AtomicBool,
}

impl Lease {
    /// The row was deleted (by the transaction that committed the import).
    pub fn released(&self) {
        self.released.store(true, Ordering::Relaxed);
    }

    /// Delete the row now (an import that failed). If that fails too (a full disk), the lock
    /// file stays, unlocked once this lease is dropped: the next `gc` finds it unlocked, judges
    /// the lease dead and deletes the row — a release is never lost.
    pub fn release(&self, conn: &rusqlite::Connection) {
        if meta::release_lease(conn, self.id).is_ok() {
            self.released();
        }
    }
}

impl Drop for Lease {
    /// Remove the lock file of a released lease while still holding the lock (then close it,
    /// releasing the lock). An unreleased lease leaves its file for `gc` (see [`Lease::release`]).
    fn drop(&mut self) {
        if self.released.load(Ordering::Relaxed) && same_file(&self.lock, &self.path) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

impl Lease {
    /// Take a lease covering `name` (a pack file, or a `tmp/` directory).
    pub fn acquire(root: &Path, conn: &rusqlite::Connection, name: &str) -> Result<Lease> {
        let dir = root.join(LEASES_DIR);
        fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        let path = lock_path(root, name);
        let lock = loop {
            let lock = File::options()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .ctx(|| format!("creating lease lock {}", path.display()))?;
            flock(&lock, FlockOperation::NonBlockingLockExclusive)
                .map_err(io::Error::from)
                .ctx(|| format!("locking {}", path.display()))?;
            // `sweep` may have unlinked the file between our open and our lock: then the lock
            // guards nothing anyone can find, so take it again on a fresh file.
            if same_file(&lock, &path) {
                break lock;
            }
        };
        let id = meta::acquire_lease(conn, name)?;
        Ok(Lease {
            id,
            lock,
            path,
            released: AtomicBool::new(false),
        })
    }
}

fn same_file(f: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (f.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

fn lock_path(root: &Path, name: &str) -> PathBuf {
    root.join(LEASES_DIR)
        .join(format!("{}.lock", name.replace('/', "_")))
}

/// Whether the owner of lease `row` is still running.
pub(crate) fn alive(root: &Path, row: &LeaseRow) -> bool {
    match File::open(lock_path(root, &row.name)) {
        // Locking succeeds only once no process holds the lock (ours is released on close).
        Ok(f) => flock(&f, FlockOperation::NonBlockingLockShared).is_err(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            crate::owner::process_start_time(row.pid) == Some(row.start_time)
        }
        // Unreadable: never judge a lease dead without proof.
        Err(_) => true,
    }
}

/// Remove the lock files of leases that are over: any not named in `live` that no process holds.
/// Returns how many went.
pub(crate) fn sweep(root: &Path, live: &[String]) -> u64 {
    let Ok(entries) = fs::read_dir(root.join(LEASES_DIR)) else {
        return 0;
    };
    let live: std::collections::HashSet<PathBuf> =
        live.iter().map(|n| lock_path(root, n)).collect();
    let mut removed = 0;
    for e in entries.flatten() {
        let path = e.path();
        if live.contains(&path) {
            continue;
        }
        // Hold the lock while unlinking, so no owner can be holding it at that moment.
        let Ok(f) = File::open(&path) else { continue };
        if flock(&f, FlockOperation::NonBlockingLockExclusive).is_ok()
            && fs::remove_file(&path).is_ok()
        {
            removed += 1;
        }
    }
    removed
}
