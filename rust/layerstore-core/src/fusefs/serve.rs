//! The FUSE requests of a mounted view, answered from the union index and the store.
//!
//! Invariants: every answer is the view's (`Stack::index`), never a file of the host; reads go
//! through a checked [`ContentReader`], so a damaged chunk answers `EIO` and never a wrong byte;
//! every request that would change the tree answers `EROFS`. Handlers run on several event-loop
//! threads at once: the inode table is behind a read-write lock (written only when the kernel
//! learns a path), each open file has its own reader behind its own lock.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType,
    Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
    WriteFlags,
};

use super::inodes::{kind_of, Inode, Inodes, LinkCounts};
use crate::error::{path_text, Error};
use crate::layer::{Entry, Kind};
use crate::stack::{ContentReader, Stack};
use crate::store::Store;
use crate::union::{Name, Node};

/// How long the kernel may keep names and attributes: the view never changes while mounted.
const TTL: Duration = Duration::from_secs(3600);
/// Read-ahead and largest request asked of the kernel (INIT can only lower the read-ahead the
/// kernel offers; `FuseMount` raises the mount's own to this afterwards).
pub(super) const READ_AHEAD: u32 = 1 << 20;
/// `st_blksize`: the I/O size `stat` suggests (about one chunk).
const BLKSIZE: u32 = 64 << 10;
/// The block size `statfs` reports.
const FS_BSIZE: u32 = 4096;
/// The ID `stat` shows for an owner that does not fit 32 bits (the kernel's overflow ID).
const OVERFLOW_ID: u32 = 65534;
/// Longest name `statfs` reports.
const NAME_MAX: u32 = 255;

/// Lock, whatever a panicking holder left: every structure here is consistent between calls.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Open handles of one kind, by number.
struct Handles<T> {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Arc<T>>>,
}

impl<T> Default for Handles<T> {
    fn default() -> Self {
        Handles {
            next: AtomicU64::new(1),
            open: Mutex::default(),
        }
    }
}

impl<T> Handles<T> {
    fn insert(&self, value: T) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.open).insert(fh, Arc::new(value));
        fh
    }

    fn get(&self, fh: FileHandle) -> Option<Arc<T>> {
        lock(&self.open).get(&fh.0).cloned()
    }

    fn remove(&self, fh: FileHandle) {
        lock(&self.open).remove(&fh.0);
    }
}

/// An open regular file: its checked reader, kept between reads (no re-open per request), and
/// its entry's path for error messages.
struct OpenFile {
    reader: Mutex<ContentReader>,
    path: Vec<u8>,
}

/// An open directory: its children in name order, listed once at `opendir`, so offsets stay
/// valid however the listing is cut into requests.
type Listing = Vec<(Name, Node)>;

/// The errors reads answered with (a damaged chunk reaches a reader only as `EIO`).
#[derive(Debug, Default)]
pub(super) struct ReadErrors {
    pub(super) count: AtomicU64,
    pub(super) last: Mutex<Option<String>>,
}

/// The whole view's size, for `statfs`.
#[derive(Clone, Copy, Debug)]
struct Totals {
    paths: u64,
    bytes: u64,
}

impl Totals {
    fn of(stack: &Stack) -> Self {
        let mut totals = Totals { paths: 1, bytes: 0 };
        for (_, v) in stack.index.paths() {
            totals.paths += 1;
            if v.target.is_none() && v.entry.kind == Kind::File {
                totals.bytes = totals.bytes.saturating_add(v.entry.size);
            }
        }
        totals
    }
}

/// A stack's view as a FUSE file system.
pub(super) struct ViewFs {
    store: Arc<Store>,
    inodes: RwLock<Inodes>,
    files: Handles<OpenFile>,
    dirs: Handles<Listing>,
    totals: Totals,
    errors: Arc<ReadErrors>,
    /// Keeps every entry the inode table points into alive.
    _stack: Stack,
}

impl ViewFs {
    /// The view of `stack`; counts its hardlinks (one pass over the view).
    pub(super) fn new(store: Arc<Store>, stack: Stack, errors: Arc<ReadErrors>) -> Self {
        let links = LinkCounts::of(&stack.index);
        ViewFs {
            store,
            inodes: RwLock::new(Inodes::new(stack.index.root().clone(), links)),
            files: Handles::default(),
            dirs: Handles::default(),
            totals: Totals::of(&stack),
            errors,
            _stack: stack,
        }
    }

    fn inode(&self, ino: INodeNo) -> Result<Inode, Errno> {
        let inodes = self.inodes.read().unwrap_or_else(PoisonError::into_inner);
        inodes.get(ino.0).cloned().ok_or(Errno::ENOENT)
    }

    /// The number of `name` (found in directory `parent` as `node`), numbering it if new.
    fn intern(&self, parent: u64, name: &Name, node: &Node) -> u64 {
        let known = self.inodes.read().map(|t| t.known(parent, name));
        if let Ok(Some(ino)) = known {
            return ino;
        }
        let mut inodes = self.inodes.write().unwrap_or_else(PoisonError::into_inner);
        match inodes.known(parent, name) {
            Some(ino) => ino,
            None => inodes.add(parent, name.clone(), node),
        }
    }

    /// `name` in directory `parent`: its number and inode, `None` when the view has no such path.
    fn child(&self, parent: INodeNo, name: &[u8]) -> Result<Option<(u64, Inode)>, Errno> {
        let dir = self.inode(parent)?;
        let Node::Dir(d) = &dir.node else {
            return Err(Errno::ENOTDIR);
        };
        let Some((name, node)) = d.children.get_key_value(name) else {
            return Ok(None);
        };
        let ino = self.intern(parent.0, name, node);
        Ok(Some((ino, self.inode(INodeNo(ino))?)))
    }

    /// What a failed read tells the reader (`EIO` for damage), kept for the mount's owner.
    fn read_failed(&self, path: &[u8], e: &Error) -> Errno {
        self.errors.count.fetch_add(1, Ordering::Relaxed);
        *lock(&self.errors.last) = Some(format!("{}: {e}", path_text(path)));
        errno_of(e)
    }

    fn open_file(&self, ino: INodeNo, flags: OpenFlags) -> Result<u64, Errno> {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return Err(Errno::EROFS);
        }
        let inode = self.inode(ino)?;
        let entry = inode.node.view().meta();
        match entry.kind {
            Kind::File => {}
            Kind::Dir => return Err(Errno::EISDIR),
            _ => return Err(Errno::EINVAL),
        }
        let reader = (self.store.content(entry)).map_err(|e| self.read_failed(&entry.path, &e))?;
        Ok(self.files.insert(OpenFile {
            reader: Mutex::new(reader),
            path: entry.path.clone(),
        }))
    }

    fn read_file(&self, fh: FileHandle, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let file = self.files.get(fh).ok_or(Errno::EBADF)?;
        let mut reader = lock(&file.reader);
        let len = reader.size().saturating_sub(offset).min(u64::from(size));
        let mut buf = vec![0; usize::try_from(len).map_err(|_| Errno::EINVAL)?];
        let n = (reader.read_at(offset, &mut buf)).map_err(|e| self.read_failed(&file.path, &e))?;
        buf.truncate(n);
        Ok(buf)
    }

    fn open_dir(&self, ino: INodeNo) -> Result<u64, Errno> {
        let inode = self.inode(ino)?;
        let Node::Dir(d) = &inode.node else {
            return Err(Errno::ENOTDIR);
        };
        let listing: Listing = (d.sorted().into_iter())
            .map(|(name, node)| (name.clone(), node.clone()))
            .collect();
        Ok(self.dirs.insert(listing))
    }

    /// Entry `i` of directory `ino`'s listing: `.`, `..`, then its children in name order.
    fn nth_entry(&self, ino: u64, parent: u64, listing: &Listing, i: usize) -> Option<(u64, Name)> {
        match i {
            0 => Some((ino, Name::from(&b"."[..]))),
            1 => Some((parent, Name::from(&b".."[..]))),
            _ => {
                let (name, node) = listing.get(i - 2)?;
                Some((self.intern(ino, name, node), name.clone()))
            }
        }
    }

    /// Hand the entries of open directory `fh` from position `offset` on to `emit`, with their
    /// inodes, until it says the reply is full. An entry's offset is its position + 1: where
    /// the listing resumes after it.
    fn list(
        &self,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut emit: impl FnMut(DirEntry, &Inode) -> bool,
    ) -> Result<(), Errno> {
        let listing = self.dirs.get(fh).ok_or(Errno::EBADF)?;
        let parent = self.inode(ino)?.parent;
        let mut i = usize::try_from(offset).unwrap_or(usize::MAX);
        while let Some((child, name)) = self.nth_entry(ino.0, parent, &listing, i) {
            i += 1;
            let inode = self.inode(INodeNo(child))?;
            let entry = DirEntry {
                ino: child,
                next: i as u64,
                name,
            };
            if emit(entry, &inode) {
                break;
            }
        }
        Ok(())
    }

    fn xattr(&self, ino: INodeNo, name: &OsStr) -> Result<Vec<u8>, Errno> {
        let inode = self.inode(ino)?;
        let xattrs = &inode.node.view().meta().xattrs;
        xattrs.get(name.as_bytes()).cloned().ok_or(Errno::NO_XATTR)
    }

    fn xattr_names(&self, ino: INodeNo) -> Result<Vec<u8>, Errno> {
        let inode = self.inode(ino)?;
        let mut names = Vec::new();
        for name in inode.node.view().meta().xattrs.keys() {
            names.extend_from_slice(name);
            names.push(0);
        }
        Ok(names)
    }
}

/// One entry of a directory listing.
struct DirEntry {
    ino: u64,
    /// The offset a listing resumes at after this entry.
    next: u64,
    name: Name,
}

/// The errno of a core error: its own, or `EIO` (damage, and anything without one).
fn errno_of(e: &Error) -> Errno {
    (e.io_error().and_then(std::io::Error::raw_os_error)).map_or(Errno::EIO, Errno::from_i32)
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Char => FileType::CharDevice,
        Kind::Block => FileType::BlockDevice,
        Kind::Fifo => FileType::NamedPipe,
        // A view shows regular files, and a hardlink as its target (never a marker).
        _ => FileType::RegularFile,
    }
}

/// A time of the view (nanoseconds since the epoch, maybe before it).
fn time_of(ns: i64) -> SystemTime {
    let d = Duration::from_nanos(ns.unsigned_abs());
    if ns >= 0 {
        UNIX_EPOCH + d
    } else {
        UNIX_EPOCH - d
    }
}

/// A 32-bit owner ID (an ID that does not fit, or `(uid_t)-1`, shows as the overflow ID).
fn id_of(id: u64) -> u32 {
    u32::try_from(id)
        .ok()
        .filter(|&id| id != u32::MAX)
        .unwrap_or(OVERFLOW_ID)
}

/// `st_size`: content bytes for a file, the target's length for a symlink (as Linux file
/// systems report it), 0 otherwise.
fn size_of(e: &Entry) -> u64 {
    match e.kind {
        Kind::File => e.size,
        Kind::Symlink => e.link.len() as u64,
        _ => 0,
    }
}

/// A device number as the 32-bit form the FUSE protocol and `mknod(2)` carry (the bits a
/// materialized device gets too).
fn rdev_of(e: &Entry) -> u32 {
    match e.kind {
        Kind::Char | Kind::Block => (e.rdev() & u64::from(u32::MAX)) as u32,
        _ => 0,
    }
}

fn attr_of(ino: u64, inode: &Inode) -> FileAttr {
    let e = inode.node.view().meta();
    let time = time_of(e.mtime_ns);
    let size = size_of(e);
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: if e.kind == Kind::File {
            size.div_ceil(512)
        } else {
            0
        },
        atime: time,
        mtime: time,
        ctime: time,
        crtime: time,
        kind: file_type(e.kind),
        perm: (e.mode & 0o7777) as u16,
        nlink: inode.nlink,
        uid: id_of(e.uid),
        gid: id_of(e.gid),
        rdev: rdev_of(e),
        blksize: BLKSIZE,
        flags: 0,
    }
}

/// A lookup answer for a name the view does not have: inode 0 with a timeout makes the kernel
/// keep the miss (a negative dentry) instead of asking again.
fn negative_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: BLKSIZE,
        flags: 0,
    }
}

/// Reply to an extended-attribute request with `data`, or its size when `size` is 0 (the
/// size probe), or `ERANGE` when it does not fit.
fn reply_xattr(reply: ReplyXattr, size: u32, data: Result<Vec<u8>, Errno>) {
    match data {
        Err(e) => reply.error(e),
        Ok(data) => match u32::try_from(data.len()) {
            Err(_) => reply.error(Errno::E2BIG),
            Ok(len) if size == 0 => reply.size(len),
            Ok(len) if len > size => reply.error(Errno::ERANGE),
            Ok(_) => reply.data(&data),
        },
    }
}

/// The capabilities worth having for an immutable tree, where the kernel has them: directory
/// listings with attributes, cached symlink targets, lookups in one directory in parallel.
const WANTED: InitFlags = InitFlags::FUSE_DO_READDIRPLUS
    .union(InitFlags::FUSE_READDIRPLUS_AUTO)
    .union(InitFlags::FUSE_CACHE_SYMLINKS)
    .union(InitFlags::FUSE_PARALLEL_DIROPS)
    .union(InitFlags::FUSE_ASYNC_READ);

impl Filesystem for ViewFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(most) = config.set_max_readahead(READ_AHEAD) {
            let _ = config.set_max_readahead(most);
        }
        // Reads come in requests of up to max(max_write, read-ahead) bytes (FUSE_MAX_PAGES).
        if let Err(most) = config.set_max_write(READ_AHEAD) {
            let _ = config.set_max_write(most);
        }
        let _ = config.add_capabilities(WANTED & config.capabilities());
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.child(parent, name.as_bytes()) {
            Ok(Some((ino, inode))) => reply.entry(&TTL, &attr_of(ino, &inode), Generation(0)),
            Ok(None) => reply.entry(&TTL, &negative_attr(), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    // `forget` keeps its default (nothing): the table keeps every number (see the module head).

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.inode(ino) {
            Ok(inode) => reply.attr(&TTL, &attr_of(ino.0, &inode)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.inode(ino) {
            Ok(inode) if kind_of(&inode.node) == Kind::Symlink => {
                reply.data(&inode.node.view().meta().link);
            }
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.open_file(ino, flags) {
            // The content never changes: keep the page cache across opens.
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.read_file(fh, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.files.remove(fh);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.open_dir(ino) {
            // The listing never changes: the kernel may cache it, across opens too.
            Ok(fh) => reply.opened(
                FileHandle(fh),
                FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let listed = self.list(ino, fh, offset, |e, inode| {
            let kind = file_type(kind_of(&inode.node));
            reply.add(INodeNo(e.ino), e.next, kind, OsStr::from_bytes(&e.name))
        });
        match listed {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let listed = self.list(ino, fh, offset, |e, inode| {
            let attr = attr_of(e.ino, inode);
            let name = OsStr::from_bytes(&e.name);
            reply.add(INodeNo(e.ino), e.next, name, &TTL, &attr, Generation(0))
        });
        match listed {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs.remove(fh);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let Totals { paths, bytes } = self.totals;
        let blocks = bytes.div_ceil(u64::from(FS_BSIZE));
        reply.statfs(blocks, 0, 0, paths, 0, FS_BSIZE, NAME_MAX, FS_BSIZE);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        reply_xattr(reply, size, self.xattr(ino, name));
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        reply_xattr(reply, size, self.xattr_names(ino));
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        // Only asked without `default_permissions`; the modes are the kernel's to check.
        match self.inode(ino) {
            Ok(_) if mask.contains(AccessFlags::W_OK) => reply.error(Errno::EROFS),
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    // Every request that would change the tree: EROFS (the `ro` mount stops most in the kernel).

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EROFS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }
}
