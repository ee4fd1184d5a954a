//! Writing a stack's union view to a new directory (`materialize`), and the safe filesystem
//! primitives it shares with [`crate::apply`].
//!
//! Invariants:
//! - Nothing is ever written, chmod-ed, chown-ed or deleted outside the target. Every path is
//!   resolved relative to an open directory handle: directories with `openat2` and
//!   `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`, names with the `*at` call on
//!   their parent's handle and no-follow flags (`O_NOFOLLOW`, `AT_SYMLINK_NOFOLLOW`, `O_EXCL`). A
//!   name handed to these primitives is one component: never empty, `.`, `..`, or containing `/`
//!   or NUL. No path string is checked and then used; a symlink planted during the run makes the
//!   operation fail (`ELOOP`/`ENOTDIR`), never follow.
//! - `materialize` writes into a private directory (mode 0700) beside `dest` and renames it into
//!   place with `RENAME_NOREPLACE` only when every entry and every piece of metadata is written:
//!   a failure removes the private tree, a kill leaves at most a hidden
//!   `.NAME.layerstore-tmp-*` directory beside `dest`, never a half tree at `dest`.
//! - Metadata order per inode: content, owner, mode (after chown, which clears setuid bits), every
//!   xattr (after the last write, which would clear `security.capability`), then times.
//!   Directories get theirs last, deepest first, so adding their children does not disturb them.
//! - Hardlinked paths of the view (the same inode entry) become one inode with several names.
//! - Privileges: as root, numeric owners are set and device nodes created. Otherwise files belong
//!   to the caller and char/block devices are skipped with a warning (fifos are still created).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rayon::prelude::*;
use rustix::fs::{
    self as rfs, AtFlags, FileType, Mode, OFlags, RenameFlags, ResolveFlags, Timespec, Timestamps,
    XattrFlags,
};
use rustix::io::Errno;

use crate::cas::{ChunkLoc, PackReader};
use crate::digest::Blake3;
use crate::error::{Error, IoContext, Result};
use crate::fsio;
use crate::gather::Gather;
use crate::layer::{ChunkRef, Entry, Kind};
use crate::meta;
use crate::owner::owner_tag;
use crate::stack::Stack;
use crate::store::{Conn, Progress, Store};
use crate::union::{Name, Node, ViewEntry};

/// Options of [`Store::materialize`] and [`Store::apply`].
#[derive(Clone, Debug, Default)]
pub struct WriteOptions {
    /// Threads writing in parallel; `None` uses one per core. The pool is the call's own.
    pub max_threads: Option<usize>,
    /// Write the view's `trusted.overlay.opaque` xattrs (a layer snapshot for kernel overlayfs,
    /// [`crate::mount`]), which are otherwise skipped with a warning. Stored layers never carry
    /// them as instructions: the snapshot writer strips every overlay xattr an entry carries
    /// and adds only its own opaque markers.
    pub overlay_opaque: bool,
}

/// What a materialize or apply did.
#[derive(Clone, Debug, Default)]
pub struct WriteReport {
    /// Paths created or updated (directories included, the root not).
    pub entries: u64,
    /// Bytes of file content written.
    pub bytes: u64,
    /// Paths removed by whiteouts, opaque markers, or beneath a replaced directory (apply only).
    pub removed: u64,
    /// Existing paths an entry of the layer took the place of (apply only).
    pub replaced: u64,
    /// What was skipped, and why (e.g. a device node without root).
    pub warnings: Vec<String>,
}

/// Leaves of one directory written by one task at most (big directories are split).
const LEAVES_PER_TASK: usize = 64;
/// A file at least this big is written by every thread at once, in pieces of about
/// [`PIECE_BYTES`] at their offsets: one big file (a model, a database) would otherwise keep
/// one thread busy while the others have nothing left to do.
const SPLIT_FILE_BYTES: u64 = 16 << 20;
const PIECE_BYTES: u64 = 4 << 20;
/// Content one task writes at most (a larger file is a task alone): big files at the end of a
/// tree otherwise leave one thread writing several of them while the other has nothing left.
const BYTES_PER_TASK: u64 = 2 << 20;
/// Progress is reported (and Ctrl-C checked) at least this often, in bytes and in entries.
const REPORT_BYTES: u64 = 8 << 20;
const REPORT_ENTRIES: u64 = 1024;

pub(crate) fn errno_io(e: Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.raw_os_error())
}

pub(crate) fn show(path: &[u8]) -> String {
    format!("/{}", String::from_utf8_lossy(path))
}

/// Join a directory path and a name (both relative, normalised).
pub(crate) fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(dir.len() + 1 + name.len());
    p.extend_from_slice(dir);
    if !dir.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// A name must be one plain component: anything else could address outside its directory.
pub(crate) fn check_name(name: &[u8], path: &[u8]) -> Result<()> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(Error::InvalidLayer(format!(
            "unsafe path component {:?} in {}",
            String::from_utf8_lossy(name),
            show(path)
        )));
    }
    Ok(())
}

/// Who runs the write: root sets owners and creates devices.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Privileges {
    pub root: bool,
    /// Every inode written is new, in a new directory (materialize): one owned by the caller
    /// needs no chown. `apply` writes into existing (maybe setgid) directories: always chown.
    pub fresh: bool,
    euid: u32,
    egid: u32,
    /// The process umask (read once; all bits when unknown, so nothing is assumed).
    umask: u32,
}

impl Privileges {
    pub fn current() -> Self {
        let euid = rustix::process::geteuid().as_raw();
        Privileges {
            root: euid == 0,
            fresh: false,
            euid,
            egid: rustix::process::getegid().as_raw(),
            umask: read_umask().unwrap_or(0o777),
        }
    }

    /// The mode to create a file with, and whether that already is its final mode (no special
    /// bits, none masked by the umask): then no chmod is needed.
    fn create_mode(&self, e: &Entry) -> (u32, bool) {
        let plain = e.mode & 0o7000 == 0 && e.mode & self.umask == 0;
        if plain {
            (e.mode & 0o777, true)
        } else {
            (0o600, false)
        }
    }

    /// The owner to set, if one must be set: as root, unless the inode is known to have it
    /// already (created by this run in a directory of this run, so not setgid: it belongs to
    /// the caller).
    fn owner(&self, e: &Entry, path: &[u8]) -> Result<Option<(rfs::Uid, rfs::Gid)>> {
        if !self.root {
            return Ok(None);
        }
        let bad = || {
            Error::InvalidLayer(format!(
                "owner {}:{} of {} is not a valid id",
                e.uid,
                e.gid,
                show(path)
            ))
        };
        let uid = u32::try_from(e.uid)
            .ok()
            .filter(|&u| u != u32::MAX)
            .ok_or_else(bad)?;
        let gid = u32::try_from(e.gid)
            .ok()
            .filter(|&g| g != u32::MAX)
            .ok_or_else(bad)?;
        if self.fresh && (uid, gid) == (self.euid, self.egid) {
            return Ok(None);
        }
        Ok(Some((rfs::Uid::from_raw(uid), rfs::Gid::from_raw(gid))))
    }
}

/// The `Umask:` line of `/proc/self/status` (Linux ≥ 4.7): reading it does not change it,
/// unlike `umask(2)`, which would race with other threads creating files.
fn read_umask() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Umask:"))?;
    u32::from_str_radix(line.trim(), 8).ok()
}

fn timestamps(e: &Entry) -> Timestamps {
    let t = Timespec {
        tv_sec: e.mtime_ns.div_euclid(1_000_000_000),
        tv_nsec: e.mtime_ns.rem_euclid(1_000_000_000),
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// The directory `rel` (relative, normalised; empty for `root` itself) beneath `root`, opened for
/// reading and metadata changes, following no symlink and never leaving `root`. A path longer
/// than the kernel takes in one call (`PATH_MAX`) is opened a stretch of components at a time,
/// each beneath the directory the last one opened, so views deeper than `PATH_MAX` materialize.
pub(crate) fn open_dir(root: BorrowedFd<'_>, rel: &[u8]) -> rustix::io::Result<OwnedFd> {
    if rel.len() < PATH_MAX {
        return open_beneath(root, if rel.is_empty() { b"." } else { rel });
    }
    let mut dir: Option<OwnedFd> = None;
    let mut rest = rel;
    while !rest.is_empty() {
        // The longest run of whole components that fits; a single component longer than that
        // is refused by the kernel (ENAMETOOLONG) like any over-long name.
        let cut = if rest.len() < PATH_MAX {
            rest.len()
        } else {
            rest[..PATH_MAX]
                .iter()
                .rposition(|&b| b == b'/')
                .filter(|&i| i > 0)
                .unwrap_or(PATH_MAX)
        };
        let at = dir.as_ref().map_or(root, AsFd::as_fd);
        dir = Some(open_beneath(at, &rest[..cut])?);
        rest = rest.get(cut + 1..).unwrap_or_default();
    }
    dir.map_or_else(|| open_beneath(root, b"."), Ok)
}

/// Linux's `PATH_MAX`: the longest path (with its NUL) one system call takes.
const PATH_MAX: usize = 4096;

/// `openat2` of the directory `path` beneath `dir`, no symlink followed, no way out of `dir`.
fn open_beneath(dir: BorrowedFd<'_>, path: &[u8]) -> rustix::io::Result<OwnedFd> {
    let mut tries = 0;
    loop {
        let r = rfs::openat2(
            dir,
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        );
        // A scoped lookup fails with EAGAIN when a rename or mount anywhere on the system raced
        // with it: the kernel asks for a retry.
        match r {
            Err(Errno::AGAIN) if tries < 16 => tries += 1,
            other => return other,
        }
    }
}

/// Open the child directory `name` of `dir` without following a symlink.
pub(crate) fn open_child_dir(dir: BorrowedFd<'_>, name: &[u8]) -> rustix::io::Result<OwnedFd> {
    rfs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// `/proc/self/fd/<dir>/<name>`: the entry `name` of the very directory `dir` holds (the magic
/// link jumps to that directory, whatever its path), for calls that have no `*at` form
/// (`lsetxattr`, `chmod` of an `O_PATH` handle). `name` is one component and is not followed.
fn proc_path(dir: BorrowedFd<'_>, name: Option<&[u8]>) -> Vec<u8> {
    let mut p = format!("/proc/self/fd/{}", dir.as_raw_fd()).into_bytes();
    if let Some(n) = name {
        p.push(b'/');
        p.extend_from_slice(n);
    }
    p
}

/// Shared state of one write: privileges, warnings, progress and Ctrl-C.
pub(crate) struct Ctx<'a> {
    pub store: &'a Store,
    pub privs: Privileges,
    pub warnings: Mutex<Vec<String>>,
    pub progress: Progress<'a>,
    /// Write `trusted.overlay.opaque` (see [`WriteOptions::overlay_opaque`]).
    pub overlay_opaque: bool,
    bytes: AtomicU64,
    entries: AtomicU64,
    removed: AtomicU64,
    replaced: AtomicU64,
    reported: Mutex<(u64, u64)>,
}

impl<'a> Ctx<'a> {
    pub fn new(store: &'a Store, progress: Progress<'a>) -> Self {
        Ctx {
            store,
            privs: Privileges::current(),
            warnings: Mutex::new(Vec::new()),
            progress,
            overlay_opaque: false,
            bytes: AtomicU64::new(0),
            entries: AtomicU64::new(0),
            removed: AtomicU64::new(0),
            replaced: AtomicU64::new(0),
            reported: Mutex::new((0, 0)),
        }
    }

    pub fn warn(&self, w: String) {
        if let Ok(mut v) = self.warnings.lock() {
            v.push(w);
        }
    }

    pub fn removed(&self, n: u64) {
        self.removed.fetch_add(n, Ordering::Relaxed);
    }

    /// One existing path replaced by an entry; `removed` paths went with it (1 for a file, more
    /// for a directory tree): the path itself counts as replaced, the rest as removed.
    pub fn replaced(&self, removed: u64) {
        self.replaced.fetch_add(1, Ordering::Relaxed);
        self.removed
            .fetch_add(removed.saturating_sub(1), Ordering::Relaxed);
    }

    /// Count work done; report progress (which may cancel) every few MiB or entries.
    pub fn done(&self, entries: u64, bytes: u64) -> Result<()> {
        let e = self.entries.fetch_add(entries, Ordering::Relaxed) + entries;
        let b = self.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let due = {
            let mut last = self
                .reported
                .lock()
                .map_err(|_| Error::Conflict("progress state poisoned".into()))?;
            let due = b >= last.0 + REPORT_BYTES || e >= last.1 + REPORT_ENTRIES;
            if due {
                *last = (b, e);
            }
            due
        };
        if due {
            (self.progress)(b)?;
        }
        Ok(())
    }

    /// The counts. The last progress report cannot cancel any more: the work is done.
    pub fn report(self) -> Result<WriteReport> {
        let bytes = self.bytes.load(Ordering::Relaxed);
        let _ = (self.progress)(bytes);
        Ok(WriteReport {
            entries: self.entries.load(Ordering::Relaxed),
            bytes,
            removed: self.removed.load(Ordering::Relaxed),
            replaced: self.replaced.load(Ordering::Relaxed),
            warnings: self
                .warnings
                .into_inner()
                .map_err(|_| Error::Conflict("warning list poisoned".into()))?,
        })
    }
}

/// Reads file content from the packs (one per thread: it keeps the last decoded block). Chunk
/// locations are looked up inside one read transaction, held until [`Content::end`], so a run
/// of files costs one database lock, not one per chunk; [`Content::prefetch`] looks up a run's
/// chunks in batches.
pub(crate) struct Content<'s> {
    store: &'s Store,
    conn: Option<Conn<'s>>,
    in_tx: bool,
    reader: PackReader,
    /// Locations fetched ahead, valid until the transaction ends.
    known: HashMap<Blake3, ChunkLoc>,
}

impl<'s> Content<'s> {
    pub fn new(store: &'s Store) -> Result<Self> {
        Ok(Content {
            store,
            conn: None,
            in_tx: false,
            reader: store.cached_reader()?,
            known: HashMap::new(),
        })
    }

    /// The connection, inside the read transaction (begun if need be).
    fn tx(&mut self) -> Result<&Conn<'s>> {
        if self.conn.is_none() {
            self.conn = Some(self.store.conn()?);
        }
        let conn = self.conn.as_ref().expect("set above");
        if !self.in_tx {
            meta::begin_read(conn)?;
            self.in_tx = true;
        }
        Ok(conn)
    }

    /// Look up the locations of every chunk of `entries` at once (a per-chunk query costs about
    /// a tenth of a materialize's own CPU).
    pub fn prefetch<'e>(&mut self, entries: impl IntoIterator<Item = &'e Entry>) -> Result<()> {
        let chunks = entries
            .into_iter()
            .filter(|e| e.kind == Kind::File)
            .flat_map(|e| &e.chunks);
        self.prefetch_chunks(chunks)
    }

    fn prefetch_chunks<'e>(
        &mut self,
        chunks: impl IntoIterator<Item = &'e ChunkRef>,
    ) -> Result<()> {
        let digests: Vec<&Blake3> = chunks.into_iter().map(|c| &c.digest).collect();
        if digests.is_empty() {
            return Ok(());
        }
        let found = meta::chunk_locs(self.tx()?, digests)?;
        self.known.extend(found);
        Ok(())
    }

    fn loc(&mut self, digest: &Blake3) -> Result<ChunkLoc> {
        if let Some(loc) = self.known.get(digest) {
            return Ok(loc.clone());
        }
        let found = meta::chunk_loc(self.tx()?, digest)?;
        found.ok_or_else(|| self.store.missing_chunk(digest))
    }

    /// End the read transaction (the next lookup starts another).
    pub fn end(&mut self) -> Result<()> {
        self.known.clear();
        let was = std::mem::replace(&mut self.in_tx, false);
        match (was, &self.conn) {
            (true, Some(conn)) => meta::end_read(conn),
            _ => Ok(()),
        }
    }

    /// Write `e`'s content to `f`; returns the bytes written (checked against `e.size`).
    fn write(&mut self, e: &Entry, f: &mut File, path: &[u8]) -> Result<u64> {
        if e.chunks.is_empty() && e.size == 0 {
            return Ok(0);
        }
        // Split only on a pool of our own (materialize's): outside one, rayon would start its
        // global pool, which a forked child could not use.
        let pooled = rayon::current_thread_index().is_some() && rayon::current_num_threads() > 1;
        if e.size >= SPLIT_FILE_BYTES && !e.sparse && pooled {
            return self.write_split(e, f, path);
        }
        let mut out = Gather::new(f);
        let written = self.push_chunks(&e.chunks, &mut out, path)?;
        out.finish().ctx(|| format!("writing {}", show(path)))?;
        if written != e.size {
            return Err(Error::Corrupt(format!(
                "{}: content is {written} bytes, the entry says {}",
                show(path),
                e.size
            )));
        }
        Ok(written)
    }

    /// Queue the bytes of `chunks` on `out`, straight from their decoded blocks (each chunk
    /// checked); returns how many.
    fn push_chunks<W: std::io::Write>(
        &mut self,
        chunks: &[ChunkRef],
        out: &mut Gather<'_, W>,
        path: &[u8],
    ) -> Result<u64> {
        let mut n = 0u64;
        for c in chunks {
            let loc = self.loc(&c.digest)?;
            let (block, range) = self.reader.chunk(&loc)?;
            if range.len() != c.len as usize {
                return Err(Error::Corrupt(format!(
                    "{}: chunk {} is {} bytes, the entry says {}",
                    show(path),
                    c.digest,
                    range.len(),
                    c.len
                )));
            }
            n += range.len() as u64;
            out.shared(block, range)
                .ctx(|| format!("writing {}", show(path)))?;
        }
        Ok(n)
    }

    /// Write a big file's pieces on every thread at once, each at its offset.
    fn write_split(&self, e: &Entry, f: &File, path: &[u8]) -> Result<u64> {
        // (first chunk, its offset in the file, end chunk) of each piece.
        let mut pieces = Vec::new();
        let (mut first, mut start, mut at) = (0usize, 0u64, 0u64);
        for (k, c) in e.chunks.iter().enumerate() {
            if at - start >= PIECE_BYTES {
                pieces.push((first, start, k));
                (first, start) = (k, at);
            }
            at += u64::from(c.len);
        }
        pieces.push((first, start, e.chunks.len()));
        if at != e.size {
            return Err(Error::Corrupt(format!(
                "{}: chunks add up to {at} bytes, the entry says {}",
                show(path),
                e.size
            )));
        }
        let store = self.store;
        pieces
            .par_iter()
            .with_max_len(1)
            .map_init(
                || Content::new(store),
                |content, &(first, start, end)| {
                    let content = content
                        .as_mut()
                        .map_err(|e| Error::Corrupt(e.to_string()))?;
                    let chunks = &e.chunks[first..end];
                    content.prefetch_chunks(chunks)?;
                    let mut out = Gather::new(WriteAt { file: f, at: start });
                    content.push_chunks(chunks, &mut out, path)?;
                    out.finish().ctx(|| format!("writing {}", show(path)))?;
                    content.end()?;
                    Ok(())
                },
            )
            .collect::<Result<()>>()?;
        Ok(at)
    }
}

/// Writes to a file from an offset on (positioned writes: several threads fill one file).
struct WriteAt<'f> {
    file: &'f File,
    at: u64,
}

impl std::io::Write for WriteAt<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_vectored(&[std::io::IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        let n = rustix::io::pwritev(self.file, bufs, self.at)?;
        self.at += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Content<'_> {
    fn drop(&mut self) {
        // An unfinished read transaction: ending it cannot lose anything.
        let _ = self.end();
    }
}

fn io_err(what: &str, path: &[u8], e: Errno) -> Error {
    Error::io(format!("{what} {}", show(path)), errno_io(e))
}

/// Owner, mode, xattrs and times of an inode opened for reading or writing (a file or directory).
/// `replace_xattrs`: remove the xattrs `e` does not have (a directory merged by `apply`).
pub(crate) fn set_meta_fd(
    fd: BorrowedFd<'_>,
    e: &Entry,
    path: &[u8],
    ctx: &Ctx<'_>,
    replace_xattrs: bool,
    mode_is_set: bool,
) -> Result<()> {
    if let Some((u, g)) = ctx.privs.owner(e, path)? {
        rfs::fchown(fd, Some(u), Some(g)).map_err(|x| io_err("chown", path, x))?;
    }
    // (chown clears setuid/setgid bits, but a mode already set has none.)
    if !mode_is_set {
        rfs::fchmod(fd, Mode::from_raw_mode(e.mode & 0o7777))
            .map_err(|x| io_err("chmod", path, x))?;
    }
    if replace_xattrs {
        let list =
            xattr_list(|b| rfs::flistxattr(fd, b)).map_err(|x| io_err("listxattr", path, x))?;
        for name in list.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            if !e.xattrs.contains_key(name) {
                match rfs::fremovexattr(fd, name) {
                    Ok(()) | Err(Errno::NODATA) => {}
                    Err(x) => return Err(io_err("removexattr", path, x)),
                }
            }
        }
    }
    for (k, v) in &e.xattrs {
        if skip_overlay_xattr(ctx, k, path) {
            continue;
        }
        if let Err(x) = rfs::fsetxattr(fd, k.as_slice(), v, XattrFlags::empty()) {
            xattr_failed(ctx, k, path, x, false)?;
        }
    }
    rfs::futimens(fd, &timestamps(e)).map_err(|x| io_err("set times of", path, x))
}

fn xattr_list(
    fetch: impl Fn(&mut [u8]) -> rustix::io::Result<usize>,
) -> rustix::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    loop {
        match fetch(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(Errno::RANGE) => buf.resize(buf.len() * 4, 0),
            Err(Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        }
    }
}

/// An overlayfs control xattr of an entry is not written (with a warning naming it): written
/// as is, an overlay mount over the tree would take it as an instruction (an opaque directory,
/// a redirect) instead of the data it is in the layer.
fn skip_overlay_xattr(ctx: &Ctx<'_>, name: &[u8], path: &[u8]) -> bool {
    if !crate::changeset::is_overlay_xattr(name)
        || (ctx.overlay_opaque && name == crate::changeset::OVERLAY_OPAQUE_XATTR)
    {
        return false;
    }
    ctx.warn(format!(
        "{}: xattr {:?} not written (overlayfs would read it as an instruction)",
        show(path),
        String::from_utf8_lossy(name)
    ));
    true
}

/// An xattr the kernel will not take is a warning, as GNU tar makes it: a value it deems
/// malformed (`EINVAL`, e.g. a `security.capability` of the wrong size), a namespace the
/// filesystem lacks (`ENOTSUP`), `trusted.*`/`security.*` without root, `user.*` on a symlink
/// (Linux allows none). Any other failure is an error.
fn xattr_failed(ctx: &Ctx<'_>, name: &[u8], path: &[u8], e: Errno, symlink: bool) -> Result<()> {
    let denied = matches!(e, Errno::PERM | Errno::ACCESS);
    let refused = matches!(e, Errno::INVAL | Errno::NOTSUP)
        || (denied && (!ctx.privs.root || (symlink && name.starts_with(b"user."))));
    if refused {
        ctx.warn(format!(
            "{}: xattr {:?} not set: {e}",
            show(path),
            String::from_utf8_lossy(name)
        ));
        return Ok(());
    }
    Err(io_err(
        &format!("setting xattr {:?} of", String::from_utf8_lossy(name)),
        path,
        e,
    ))
}

/// Owner, mode, xattrs and times of the non-regular, non-directory inode `name` in `dir`
/// (symlink, device, fifo), addressed through `dir` without following it.
fn set_meta_at(
    dir: BorrowedFd<'_>,
    name: &[u8],
    e: &Entry,
    path: &[u8],
    ctx: &Ctx<'_>,
) -> Result<()> {
    if let Some((u, g)) = ctx.privs.owner(e, path)? {
        rfs::chownat(dir, name, Some(u), Some(g), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|x| io_err("chown", path, x))?;
    }
    if e.kind != Kind::Symlink {
        // No `fchmodat(AT_SYMLINK_NOFOLLOW)` here: chmod the inode an O_PATH handle holds, after
        // checking it is the kind just created (a swapped-in symlink is never followed).
        let h = rfs::openat(
            dir,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|x| io_err("open", path, x))?;
        let st = rfs::fstat(&h).map_err(|x| io_err("stat", path, x))?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
            return Err(Error::Conflict(format!(
                "{} was replaced by a symlink while being written",
                show(path)
            )));
        }
        rfs::chmod(
            proc_path(h.as_fd(), None),
            Mode::from_raw_mode(e.mode & 0o7777),
        )
        .map_err(|x| io_err("chmod", path, x))?;
    }
    if !e.xattrs.is_empty() {
        let p = proc_path(dir, Some(name));
        for (k, v) in &e.xattrs {
            if skip_overlay_xattr(ctx, k, path) {
                continue;
            }
            if let Err(x) = rfs::lsetxattr(p.as_slice(), k.as_slice(), v, XattrFlags::empty()) {
                xattr_failed(ctx, k, path, x, e.kind == Kind::Symlink)?;
            }
        }
    }
    rfs::utimensat(dir, name, &timestamps(e), AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|x| io_err("set times of", path, x))
}

/// Create the non-directory `e` as `name` in `dir` (which must not have it), with its metadata.
/// Returns the content bytes written, or `None` when the entry was skipped (with a warning).
pub(crate) fn create_leaf(
    dir: BorrowedFd<'_>,
    name: &[u8],
    e: &Entry,
    path: &[u8],
    ctx: &Ctx<'_>,
    content: &mut Content<'_>,
) -> Result<Option<u64>> {
    check_name(name, path)?;
    match e.kind {
        Kind::File => {
            let (mode, mode_is_set) = ctx.privs.create_mode(e);
            let fd = rfs::openat(
                dir,
                name,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(mode),
            )
            .map_err(|x| io_err("create", path, x))?;
            let mut f = File::from(fd);
            let n = content.write(e, &mut f, path)?;
            set_meta_fd(f.as_fd(), e, path, ctx, false, mode_is_set)?;
            Ok(Some(n))
        }
        Kind::Symlink => {
            if e.link.is_empty() || e.link.contains(&0) {
                ctx.warn(format!(
                    "{}: symlink with an empty target skipped",
                    show(path)
                ));
                return Ok(None);
            }
            rfs::symlinkat(e.link.as_slice(), dir, name).map_err(|x| io_err("symlink", path, x))?;
            set_meta_at(dir, name, e, path, ctx)?;
            Ok(Some(0))
        }
        Kind::Char | Kind::Block | Kind::Fifo => {
            let ft = match e.kind {
                Kind::Char => FileType::CharacterDevice,
                Kind::Block => FileType::BlockDevice,
                _ => FileType::Fifo,
            };
            if ft != FileType::Fifo && !ctx.privs.root {
                ctx.warn(format!(
                    "{}: {} device {}:{} skipped (creating devices needs root)",
                    show(path),
                    e.kind.name(),
                    e.devmajor,
                    e.devminor
                ));
                return Ok(None);
            }
            let dev = rfs::makedev(e.devmajor, e.devminor);
            rfs::mknodat(dir, name, ft, Mode::from_raw_mode(0o600), dev)
                .map_err(|x| io_err("mknod", path, x))?;
            set_meta_at(dir, name, e, path, ctx)?;
            Ok(Some(0))
        }
        Kind::Dir | Kind::Hardlink | Kind::Whiteout | Kind::Opaque => Err(Error::InvalidLayer(
            format!("{}: a {} is not a leaf", show(path), e.kind.name()),
        )),
        Kind::Other(t) => {
            ctx.warn(format!(
                "{}: entry of unknown type {:?} skipped",
                show(path),
                char::from(t)
            ));
            Ok(None)
        }
    }
}

/// Remove `name` from `dir` whatever it is (a directory with everything below it), following
/// no symlink. Returns how many paths went; a missing name is no error.
pub(crate) fn remove_entry(dir: BorrowedFd<'_>, name: &[u8], path: &[u8]) -> Result<u64> {
    match rfs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) => return Ok(1),
        Err(Errno::NOENT) => return Ok(0),
        Err(Errno::ISDIR) => {}
        Err(x) => return Err(io_err("unlink", path, x)),
    }
    let sub = match open_child_dir(dir, name) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(0),
        Err(x) => return Err(io_err("open", path, x)),
    };
    // Its children go first; a read-only directory must let us remove them.
    let _ = rfs::fchmod(&sub, Mode::from_raw_mode(0o700));
    let n = clear_dir(sub.as_fd(), None, path)?;
    match rfs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(n + 1),
        Err(x) => Err(io_err("rmdir", path, x)),
    }
}

/// Remove every child of the directory `dir` (at `path`) except `keep`.
pub(crate) fn clear_dir(dir: BorrowedFd<'_>, keep: Option<&[u8]>, path: &[u8]) -> Result<u64> {
    let mut names = Vec::new();
    let mut it = rfs::Dir::read_from(dir).map_err(|x| io_err("read directory", path, x))?;
    while let Some(ent) = it.read() {
        let ent = ent.map_err(|x| io_err("read directory", path, x))?;
        let n = ent.file_name().to_bytes();
        if n != b"." && n != b".." && Some(n) != keep {
            names.push(n.to_vec());
        }
    }
    let mut removed = 0;
    for n in names {
        removed += remove_entry(dir, &n, &join(path, &n))?;
    }
    Ok(removed)
}

/// One directory of the view, with its children split into subdirectories and leaves.
struct DirPlan {
    rel: Vec<u8>,
    depth: usize,
    meta: Arc<ViewEntry>,
    subdirs: Vec<Name>,
    leaves: Vec<(Name, Arc<ViewEntry>)>,
}

/// A further name of an inode created elsewhere in the view.
struct LinkPlan {
    from: (usize, Name),
    to: (usize, Name),
}

/// The view as directories and the hardlinks between its leaves.
struct Plan {
    dirs: Vec<DirPlan>,
    links: Vec<LinkPlan>,
    /// Indices into `dirs` by depth (the root alone at 0).
    levels: Vec<Vec<usize>>,
}

fn plan(stack: &Stack) -> Result<Plan> {
    let root = match stack.index.lookup(b"") {
        Some(Node::Dir(d)) => d,
        _ => return Err(Error::Corrupt("the view has no root directory".into())),
    };
    let mut dirs = Vec::new();
    let mut todo = vec![(Vec::new(), 0usize, root)];
    while let Some((rel, depth, node)) = todo.pop() {
        let mut subdirs = Vec::new();
        let mut leaves = Vec::new();
        for (name, child) in node.sorted() {
            check_name(name, &join(&rel, name))?;
            match child {
                Node::Dir(d) => {
                    subdirs.push(name.clone());
                    todo.push((join(&rel, name), depth + 1, d.clone()));
                }
                Node::Leaf(v) => leaves.push((name.clone(), v.clone())),
            }
        }
        dirs.push(DirPlan {
            rel,
            depth,
            meta: node.meta.clone(),
            subdirs,
            leaves,
        });
    }
    // Hardlinks: every path showing the same inode entry after the first links to the first.
    let mut first: HashMap<*const Entry, (usize, Name)> = HashMap::new();
    let mut links = Vec::new();
    for (i, d) in dirs.iter_mut().enumerate() {
        let mut kept = Vec::with_capacity(d.leaves.len());
        for (name, v) in std::mem::take(&mut d.leaves) {
            let key: *const Entry = v.meta();
            if let Some(from) = first.get(&key) {
                links.push(LinkPlan {
                    from: from.clone(),
                    to: (i, name),
                });
            } else {
                first.insert(key, (i, name.clone()));
                kept.push((name, v));
            }
        }
        d.leaves = kept;
    }
    let max_depth = dirs.iter().map(|d| d.depth).max().unwrap_or(0);
    let mut levels = vec![Vec::new(); max_depth + 1];
    for (i, d) in dirs.iter().enumerate() {
        levels[d.depth].push(i);
    }
    Ok(Plan {
        dirs,
        links,
        levels,
    })
}

impl Store {
    /// Write the union view of `stack` to the new directory `dest` (which must not exist). It is
    /// built in `.NAME.layerstore-tmp-<pid>-<start>-<unique>` beside `dest` and renamed into
    /// place; such a directory that a killed run left is removed by the next materialize to the
    /// same `dest` once its owner process is gone.
    pub fn materialize(
        &self,
        stack: &Stack,
        dest: &Path,
        opts: &WriteOptions,
        progress: Progress<'_>,
    ) -> Result<WriteReport> {
        let name = dest
            .file_name()
            .map(|n| n.as_bytes().to_vec())
            .filter(|n| n != b"." && n != b"..")
            .ok_or_else(|| {
                Error::InvalidArgument(format!("{}: not a directory name", dest.display()))
            })?;
        let parent_path = dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let parent = rfs::open(
            parent_path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno_io)
        .ctx(|| format!("opening {}", parent_path.display()))?;
        let exists = || {
            // "DEST: File exists" (EEXIST keeps FileExistsError in Python), said once.
            Error::io(dest.display().to_string(), errno_io(Errno::EXIST))
        };
        match rfs::statat(&parent, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(_) => return Err(exists()),
            Err(Errno::NOENT) => {}
            Err(x) => return Err(io_err("stat", dest.as_os_str().as_bytes(), x)),
        }
        let prefix = fsio::tmp_prefix(&name);
        for name in fsio::abandoned(parent.as_fd(), &prefix) {
            // Best effort: what cannot be removed stays; the new tree does not depend on it.
            let _ = remove_entry(parent.as_fd(), &name, &name);
        }
        let tmp = [&prefix[..], owner_tag().as_bytes()].concat();
        rfs::mkdirat(&parent, tmp.as_slice(), Mode::from_raw_mode(0o700))
            .map_err(errno_io)
            .ctx(|| format!("creating a directory beside {}", dest.display()))?;
        let result = (|| {
            let root = open_child_dir(parent.as_fd(), &tmp)
                .map_err(errno_io)
                .ctx(|| format!("opening a directory beside {}", dest.display()))?;
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(opts.max_threads.unwrap_or(0))
                .thread_name(|i| format!("layerstore-write-{i}"))
                .build()
                .map_err(|e| Error::io("starting the writers", std::io::Error::other(e)))?;
            let mut ctx = Ctx::new(self, progress);
            ctx.overlay_opaque = opts.overlay_opaque;
            // A setgid parent passes its group and bit on: clear the bit, and chown everything
            // unless the group is the caller's.
            rfs::fchmod(&root, Mode::from_raw_mode(0o700)).map_err(|x| io_err("chmod", &tmp, x))?;
            let st = rfs::fstat(&root).map_err(|x| io_err("stat", &tmp, x))?;
            ctx.privs.fresh = (st.st_uid, st.st_gid) == (ctx.privs.euid, ctx.privs.egid);
            pool.install(|| write_view(stack, root.as_fd(), &ctx))?;
            match rfs::renameat_with(
                &parent,
                tmp.as_slice(),
                &parent,
                name.as_slice(),
                RenameFlags::NOREPLACE,
            ) {
                Ok(()) => {}
                Err(Errno::EXIST) => return Err(exists()),
                Err(x) => {
                    return Err(Error::io(
                        format!("renaming into {}", dest.display()),
                        errno_io(x),
                    ))
                }
            }
            ctx.report()
        })();
        if result.is_err() {
            // Only root could add entries to it meanwhile (it is 0700): pass again while it
            // does, up to a bound, then leave it.
            for _ in 0..100 {
                if remove_entry(parent.as_fd(), &tmp, &tmp).is_ok() {
                    break;
                }
            }
        }
        result
    }
}

/// One unit of parallel work: `(directory, start, end)` items, run in order. `start == end`
/// stands for "create the directory's subdirectories".
type Task = Vec<(usize, usize, usize)>;

/// The work of directories `which` in the order a tar lists them (directories depth-first,
/// children by name): creating their subdirectories, their leaves, or both, cut into tasks of
/// at most [`LEAVES_PER_TASK`] entries or [`BYTES_PER_TASK`] of content. Neighbouring small
/// files share pack blocks (content is stored in tar order), and one task decodes a block once
/// for all of them, where a task per directory would decode it again for each directory.
fn tar_order_tasks(dirs: &[DirPlan], which: &[usize], subdirs: bool, leaves: bool) -> Vec<Task> {
    let mut order = which.to_vec();
    order.sort_by(|&a, &b| {
        let comps = |i: usize| dirs[i].rel.split(|&c| c == b'/').collect::<Vec<_>>();
        comps(a).cmp(&comps(b))
    });
    let mut tasks = Vec::new();
    let (mut cur, mut weight, mut bytes): (Task, usize, u64) = (Vec::new(), 0, 0);
    for i in order {
        let d = &dirs[i];
        if subdirs && !d.subdirs.is_empty() {
            cur.push((i, 0, 0));
            weight += d.subdirs.len();
            if weight >= LEAVES_PER_TASK {
                tasks.push(std::mem::take(&mut cur));
                weight = 0;
            }
        }
        if !leaves {
            continue;
        }
        let mut start = 0;
        for (k, (_, v)) in d.leaves.iter().enumerate() {
            weight += 1;
            bytes += v.meta().size;
            if weight >= LEAVES_PER_TASK || bytes >= BYTES_PER_TASK {
                cur.push((i, start, k + 1));
                start = k + 1;
                tasks.push(std::mem::take(&mut cur));
                (weight, bytes) = (0, 0);
            }
        }
        if start < d.leaves.len() {
            cur.push((i, start, d.leaves.len()));
        }
    }
    if !cur.is_empty() {
        tasks.push(cur);
    }
    tasks
}

fn write_view(stack: &Stack, root: BorrowedFd<'_>, ctx: &Ctx<'_>) -> Result<()> {
    let Plan {
        dirs,
        links,
        levels,
    } = plan(stack)?;
    // Directories top-down, one level at a time (0700 until their metadata is set); then every
    // leaf, in tar order across the whole tree, so that files sharing a pack block are written
    // one after another (a level at a time, one 1 MiB block would be decoded once per level).
    let every_dir: Vec<usize> = (0..dirs.len()).collect();
    let phases = levels
        .iter()
        .map(|level| tar_order_tasks(&dirs, level, true, false))
        .chain([tar_order_tasks(&dirs, &every_dir, false, true)]);
    for tasks in phases {
        tasks
            .par_iter()
            // Every task its own job, so an idle thread can take any one that is left.
            .with_max_len(1)
            .map_init(
                || Content::new(ctx.store),
                |content, task| {
                    let content = content
                        .as_mut()
                        .map_err(|e| Error::Corrupt(e.to_string()))?;
                    let (mut n, mut bytes) = (0, 0);
                    content.prefetch(task.iter().flat_map(|&(i, start, end)| {
                        dirs[i].leaves[start..end].iter().map(|(_, v)| v.meta())
                    }))?;
                    for &(i, start, end) in task {
                        let d = &dirs[i];
                        let fd = open_dir(root, &d.rel).map_err(|x| io_err("open", &d.rel, x))?;
                        if start == end {
                            for s in &d.subdirs {
                                rfs::mkdirat(&fd, &s[..], Mode::from_raw_mode(0o700))
                                    .map_err(|x| io_err("mkdir", &join(&d.rel, s), x))?;
                            }
                            n += d.subdirs.len() as u64;
                            continue;
                        }
                        for (name, v) in &d.leaves[start..end] {
                            let path = join(&d.rel, name);
                            if let Some(b) =
                                create_leaf(fd.as_fd(), name, v.meta(), &path, ctx, content)?
                            {
                                n += 1;
                                bytes += b;
                            }
                        }
                    }
                    content.end()?;
                    ctx.done(n, bytes)
                },
            )
            .collect::<Result<()>>()?;
    }
    // Further names of hardlinked inodes.
    links
        .par_iter()
        .map(|l| {
            let (fd_dir, fname) = (&dirs[l.from.0], &l.from.1);
            let (td_dir, tname) = (&dirs[l.to.0], &l.to.1);
            let to_path = join(&td_dir.rel, tname);
            let from_fd =
                open_dir(root, &fd_dir.rel).map_err(|x| io_err("open", &fd_dir.rel, x))?;
            let to_fd = open_dir(root, &td_dir.rel).map_err(|x| io_err("open", &td_dir.rel, x))?;
            match rfs::linkat(&from_fd, &fname[..], &to_fd, &tname[..], AtFlags::empty()) {
                Ok(()) => ctx.done(1, 0),
                // The first name was skipped (e.g. a device without root): so is this one.
                Err(Errno::NOENT) => Ok(()),
                Err(x) => Err(io_err("link", &to_path, x)),
            }
        })
        .collect::<Result<()>>()?;
    // Directory metadata last, deepest first (the root, at level 0, last of all).
    for level in levels.iter().rev() {
        level
            .par_iter()
            .map(|&i| {
                let d = &dirs[i];
                let fd = open_dir(root, &d.rel).map_err(|x| io_err("open", &d.rel, x))?;
                set_meta_fd(fd.as_fd(), &d.meta.entry, &d.rel, ctx, false, false)
            })
            .collect::<Result<()>>()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(rel: &str, subdirs: usize, leaves: usize) -> DirPlan {
        let entry = |name: String, kind| {
            Arc::new(ViewEntry {
                entry: Arc::new(Entry::new(name.into_bytes(), kind, b'0', 0o644)),
                target: None,
                layer: Some(0),
            })
        };
        DirPlan {
            rel: rel.as_bytes().to_vec(),
            depth: rel.split('/').filter(|c| !c.is_empty()).count(),
            meta: entry(rel.to_owned(), Kind::Dir),
            subdirs: (0..subdirs)
                .map(|i| Name::from(format!("d{i}").as_bytes()))
                .collect(),
            leaves: (0..leaves)
                .map(|i| {
                    (
                        Name::from(format!("f{i}").as_bytes()),
                        entry(format!("f{i}"), Kind::File),
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn a_level_of_many_subdirectories_is_cut_into_tasks() {
        // One directory with more subdirectories than a task takes, then small ones.
        let dirs = vec![dir("usr", 150, 0), dir("etc", 10, 0), dir("var", 10, 0)];
        let tasks = tar_order_tasks(&dirs, &[0, 1, 2], true, false);
        assert!(tasks.len() >= 2, "{tasks:?}");
        // Every directory's subdirectories are made exactly once, in tar order (etc < usr < var).
        let made: Vec<usize> = tasks
            .iter()
            .flatten()
            .map(|&(i, s, e)| {
                assert_eq!(s, e, "only subdirectories in this phase");
                i
            })
            .collect();
        assert_eq!(made, vec![1, 0, 2]);
    }

    #[test]
    fn big_files_are_cut_into_tasks_of_their_own() {
        let mut d = dir("usr/lib", 0, 10);
        for (k, (_, v)) in d.leaves.iter_mut().enumerate() {
            let mut e = (*v.entry).clone();
            e.size = if k >= 6 { 3 << 20 } else { 1000 };
            *v = Arc::new(ViewEntry {
                entry: Arc::new(e),
                target: None,
                layer: Some(0),
            });
        }
        let tasks = tar_order_tasks(&[d], &[0], false, true);
        // The six small files and the first big one, then each big file alone.
        assert_eq!(
            tasks,
            vec![
                vec![(0, 0, 7)],
                vec![(0, 7, 8)],
                vec![(0, 8, 9)],
                vec![(0, 9, 10)]
            ]
        );
    }

    #[test]
    fn leaves_are_cut_into_tasks_in_tar_order_and_each_written_once() {
        let dirs = vec![dir("", 2, 5), dir("a", 0, 200), dir("b", 0, 3)];
        let tasks = tar_order_tasks(&dirs, &[0, 1, 2], false, true);
        assert!(tasks.len() >= 3, "{tasks:?}");
        assert!(tasks.iter().all(|t| {
            let n: usize = t.iter().map(|&(_, s, e)| e - s).sum();
            n <= LEAVES_PER_TASK
        }));
        let mut seen: Vec<(usize, usize)> = Vec::new();
        for &(i, s, e) in tasks.iter().flatten() {
            seen.extend((s..e).map(|k| (i, k)));
        }
        let expected: Vec<(usize, usize)> = [(0, 5), (1, 200), (2, 3)]
            .iter()
            .flat_map(|&(i, n)| (0..n).map(move |k| (i, k)))
            .collect();
        assert_eq!(seen, expected);
    }
}
