//! Directory tree → canonical tar stream (what `import_dir` imports).
//!
//! Invariants of [`write_dir_tar`]'s output, which is a pure function of the tree's contents and
//! metadata (same tree ⇒ same bytes, whatever the thread count or `readdir` order):
//! - The root itself is not emitted. Members are relative paths (`etc/`, `etc/passwd`) in raw bytes,
//!   directories with a trailing `/`. Order is depth-first pre-order with each directory's children
//!   sorted by name bytes (GNU tar's `--sort=name`), so `a/`, `a/b`, `a.b`: a parent always precedes
//!   its children.
//! - Every member is written by [`crate::tarwrite`] (ustar, octal fields, PAX only where ustar
//!   cannot hold a value or for xattrs): mode is `st_mode & 0o7777`, uname/gname empty.
//! - Hardlinks (same `(dev, ino)`, `nlink > 1`, any non-directory): the first path in output order
//!   carries the content, later ones are typeflag `1` naming it. Sockets are skipped with a warning.
//!
//! Metadata is gathered first (in parallel, one directory level at a time, so no recursion can
//! overflow a stack); file contents are then streamed one file at a time through a fixed buffer.

use std::collections::hash_map::{Entry as MapEntry, HashMap};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

use crate::error::{Error, IoContext, Result};
use crate::tarwrite::{self, Member, MemberKind};

pub(crate) const COPY_BUF: usize = 256 * 1024;

/// Options for [`write_dir_tar`].
#[derive(Debug, Clone, Default)]
pub struct DirOptions {
    /// xattr names to leave out (exact names, e.g. "security.selinux"). Default: none, every
    /// xattr is kept.
    pub exclude_xattrs: Vec<Vec<u8>>,
    /// Threads for the parallel walk; `None` uses one per core. The walk runs on a pool of its
    /// own that ends with the call, so a process that forks later inherits no idle pool.
    pub max_threads: Option<usize>,
}

#[derive(Default)]
pub(crate) enum Kind {
    #[default]
    Dir,
    File,
    Symlink(Vec<u8>),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

/// Everything needed to write one member, gathered by the walk.
#[derive(Default)]
pub(crate) struct Node {
    /// Path relative to the root, no trailing slash; empty for the root.
    pub(crate) rel: Vec<u8>,
    pub(crate) kind: Kind,
    pub(crate) mode: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) mtime: i64,
    pub(crate) mtime_nsec: u32,
    pub(crate) size: u64,
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    pub(crate) nlink: u64,
    /// Sorted by name.
    pub(crate) xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Indices of the children in the node arena, sorted by name.
    pub(crate) children: Vec<usize>,
}

/// One directory child: its node (`None` if skipped) and the warnings it raised.
struct Scanned {
    node: Option<Box<Node>>,
    warnings: Vec<String>,
}

/// Write `root` as a tar to `out`. Returns the number of entries written (PAX headers not
/// counted). Warnings (e.g. a socket skipped) are pushed to `warnings`.
///
/// `root` itself may be a symlink to a directory; nothing below it is followed.
pub fn write_dir_tar<W: Write>(
    root: &Path,
    opts: &DirOptions,
    out: W,
    warnings: &mut Vec<String>,
) -> Result<u64> {
    let md = fs::metadata(root).ctx(|| format!("stat {}", root.display()))?;
    if !md.is_dir() {
        return Err(Error::InvalidLayer(format!(
            "{} is not a directory",
            root.display()
        )));
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.max_threads.unwrap_or(0))
        .thread_name(|i| format!("layerstore-walk-{i}"))
        .build()
        .map_err(|e| Error::io("starting the directory walk", std::io::Error::other(e)))?;
    let nodes = pool.install(|| scan_tree(root, opts, warnings))?;

    let mut tw = TarWriter { out, written: 0 };
    let mut buf = vec![0u8; COPY_BUF];
    let mut first_link: HashMap<(u64, u64), usize> = HashMap::new();
    let mut count = 0u64;
    // Explicit stack instead of recursion: depth-first pre-order, children in name order.
    let mut stack: Vec<usize> = nodes[0].children.iter().rev().copied().collect();
    while let Some(i) = stack.pop() {
        let node = &nodes[i];
        let mut link_to = None;
        if node.nlink > 1 && !matches!(node.kind, Kind::Dir) {
            match first_link.entry((node.dev, node.ino)) {
                MapEntry::Occupied(e) => link_to = Some(nodes[*e.get()].rel.as_slice()),
                MapEntry::Vacant(e) => {
                    e.insert(i);
                }
            }
        }
        write_member(&mut tw, root, node, link_to, &mut buf)?;
        count += 1;
        stack.extend(node.children.iter().rev());
    }
    tw.put(&tarwrite::trailer(tw.written))?;
    tw.out.flush().ctx(|| "writing tar stream".to_string())?;
    Ok(count)
}

/// Write `dest` through `write`, atomically: into a temporary file beside it, renamed into place
/// only when `write` succeeds (removed otherwise), so `dest` is never seen half-written. The
/// temporary file is `.NAME.layerstore-tmp-<owner tag>`; one that a killed writer left is removed
/// by the next write to the same `dest` once its owner process is gone. A `dest`
/// that exists and is not a regular file (`/dev/null`, a FIFO, a terminal) is written into
/// directly: renaming over it would replace the device.
pub fn write_atomically<T>(
    dest: &Path,
    write: impl FnOnce(&mut dyn Write) -> Result<T>,
) -> Result<T> {
    if fs::metadata(dest).is_ok_and(|md| !md.is_file() && !md.is_dir()) {
        let f = fs::OpenOptions::new()
            .write(true)
            .open(dest)
            .ctx(|| format!("opening {}", dest.display()))?;
        let mut w = io::BufWriter::with_capacity(1 << 20, f);
        let out = write(&mut w)?;
        w.into_inner()
            .map_err(|e| Error::io("flushing the output", e.into_error()))?;
        return Ok(out);
    }
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = dest.file_name().ok_or_else(|| {
        Error::InvalidArgument(format!("destination '{}' names no file", dest.display()))
    })?;
    // Errors name `dest` as the caller gave it, never the temporary file beside it.
    if fs::metadata(dest).is_ok_and(|md| md.is_dir()) {
        return Err(Error::io(
            dest.display().to_string(),
            io::Error::from_raw_os_error(rustix::io::Errno::ISDIR.raw_os_error()),
        ));
    }
    let prefix = tmp_prefix(name.as_bytes());
    remove_abandoned_files(dir, &prefix);
    let mut tmp_name = prefix;
    tmp_name.extend_from_slice(crate::owner::owner_tag().as_bytes());
    let tmp = dir.join(OsStr::from_bytes(&tmp_name));
    let result = (|| {
        let f = File::create(&tmp).ctx(|| format!("writing {}", dest.display()))?;
        let mut w = io::BufWriter::with_capacity(1 << 20, f);
        let out = write(&mut w)?;
        w.into_inner()
            .map_err(|e| Error::io("flushing the output", e.into_error()))?;
        fs::rename(&tmp, dest).ctx(|| format!("renaming into {}", dest.display()))?;
        Ok(out)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The start of the name of what is written beside `NAME` before it is renamed into place:
/// `.NAME.layerstore-tmp-`, followed by the writer's owner tag.
pub(crate) fn tmp_prefix(name: &[u8]) -> Vec<u8> {
    [b".", name, b".layerstore-tmp-"].concat()
}

/// Entries of `parent` named `prefix` + the owner tag of a process that is gone: what a write
/// beside the same destination (an export, a materialize) left when it was killed.
pub(crate) fn abandoned(parent: BorrowedFd<'_>, prefix: &[u8]) -> Vec<Vec<u8>> {
    let Ok(dir) = rustix::fs::Dir::read_from(parent) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_bytes();
            let tag = name.strip_prefix(prefix)?;
            std::str::from_utf8(tag)
                .is_ok_and(crate::owner::owner_gone)
                .then(|| name.to_vec())
        })
        .collect()
}

/// Unlink the files [`abandoned`] finds in `dir` (best effort; a directory of that name, which a
/// materialize left, is not a file and stays for the next materialize to remove).
fn remove_abandoned_files(dir: &Path, prefix: &[u8]) {
    let Ok(parent) = rustix::fs::open(dir, OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
    else {
        return;
    };
    for name in abandoned(parent.as_fd(), prefix) {
        let _ = rustix::fs::unlinkat(&parent, name.as_slice(), rustix::fs::AtFlags::empty());
    }
}

pub(crate) fn abs_path(root: &Path, rel: &[u8]) -> PathBuf {
    if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(OsStr::from_bytes(rel))
    }
}

/// Breadth-first, one level at a time: all directories of a level are listed in parallel and
/// their children stat'ed in parallel; results are appended in a fixed order, so node indices,
/// children lists and warnings do not depend on scheduling.
pub(crate) fn scan_tree(
    root: &Path,
    opts: &DirOptions,
    warnings: &mut Vec<String>,
) -> Result<Vec<Node>> {
    scan_tree_where(root, opts, warnings, &|_| true)
}

/// [`scan_tree`] descending only into the directories (relative paths) `descend` accepts: the
/// others are listed as nodes without children.
pub(crate) fn scan_tree_where(
    root: &Path,
    opts: &DirOptions,
    warnings: &mut Vec<String>,
    descend: &(dyn Fn(&[u8]) -> bool + Sync),
) -> Result<Vec<Node>> {
    let mut nodes = vec![Node::default()]; // the root, never emitted
    let mut level = vec![0usize];
    while !level.is_empty() {
        let listed: Vec<Vec<Scanned>> = level
            .par_iter()
            .map(|&i| scan_dir(root, &nodes[i].rel, opts))
            .collect::<Result<_>>()?;
        let mut next = Vec::new();
        for (&parent, children) in level.iter().zip(listed) {
            for child in children {
                warnings.extend(child.warnings);
                if let Some(node) = child.node {
                    let id = nodes.len();
                    if matches!(node.kind, Kind::Dir) && descend(&node.rel) {
                        next.push(id);
                    }
                    nodes.push(*node);
                    nodes[parent].children.push(id);
                }
            }
        }
        level = next;
    }
    Ok(nodes)
}

fn scan_dir(root: &Path, rel: &[u8], opts: &DirOptions) -> Result<Vec<Scanned>> {
    let dir = abs_path(root, rel);
    let ctx = || format!("reading directory {}", dir.display());
    let mut names = Vec::new();
    for entry in fs::read_dir(&dir).ctx(ctx)? {
        names.push(entry.ctx(ctx)?.file_name().into_vec());
    }
    names.sort_unstable();
    names
        .into_par_iter()
        .map(|name| {
            let mut child = Vec::with_capacity(rel.len() + 1 + name.len());
            if !rel.is_empty() {
                child.extend_from_slice(rel);
                child.push(b'/');
            }
            child.extend_from_slice(&name);
            scan_entry(root, child, opts)
        })
        .collect()
}

fn scan_entry(root: &Path, rel: Vec<u8>, opts: &DirOptions) -> Result<Scanned> {
    let path = abs_path(root, &rel);
    let md = fs::symlink_metadata(&path).ctx(|| format!("lstat {}", path.display()))?;
    let ft = md.file_type();
    let dev = (rustix::fs::major(md.rdev()), rustix::fs::minor(md.rdev()));
    let kind = if ft.is_dir() {
        Kind::Dir
    } else if ft.is_file() {
        Kind::File
    } else if ft.is_symlink() {
        let target = fs::read_link(&path).ctx(|| format!("readlink {}", path.display()))?;
        Kind::Symlink(target.into_os_string().into_vec())
    } else if ft.is_char_device() {
        Kind::Char(dev.0, dev.1)
    } else if ft.is_block_device() {
        Kind::Block(dev.0, dev.1)
    } else if ft.is_fifo() {
        Kind::Fifo
    } else {
        let what = if ft.is_socket() {
            "socket"
        } else {
            "file of unknown type"
        };
        let warnings = vec![format!("skipped {what} {}", path.display())];
        return Ok(Scanned {
            node: None,
            warnings,
        });
    };
    let mut warnings = Vec::new();
    let xattrs = read_xattrs(&path, opts, &mut warnings)?;
    let node = Node {
        size: if matches!(kind, Kind::File) {
            md.size()
        } else {
            0
        },
        rel,
        kind,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime: md.mtime(),
        // The kernel guarantees 0..1e9.
        mtime_nsec: md.mtime_nsec() as u32,
        dev: md.dev(),
        ino: md.ino(),
        nlink: md.nlink(),
        xattrs,
        children: Vec::new(),
    };
    Ok(Scanned {
        node: Some(Box::new(node)),
        warnings,
    })
}

fn read_xattrs(
    path: &Path,
    opts: &DirOptions,
    warnings: &mut Vec<String>,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let err = |what: &str, e: Errno| Error::io(format!("{what} {}", path.display()), e.into());
    let list = match sized_read(
        || rustix::fs::llistxattr_query(path),
        |b| rustix::fs::llistxattr(path, b),
    ) {
        Ok(list) => list,
        // A filesystem without xattr support simply has none.
        Err(Errno::NOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(err("listing xattrs of", e)),
    };
    let mut out = Vec::new();
    for name in list.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        if opts.exclude_xattrs.iter().any(|x| x == name) {
            continue;
        }
        if name.contains(&b'=') {
            // A PAX key ends at the first '=': such a name cannot be represented.
            let shown = String::from_utf8_lossy(name);
            warnings.push(format!(
                "skipped xattr {shown:?} of {}: name contains '='",
                path.display()
            ));
            continue;
        }
        match sized_read(
            || rustix::fs::lgetxattr_query(path, name),
            |b| rustix::fs::lgetxattr(path, name, b),
        ) {
            Ok(value) => out.push((name.to_vec(), value)),
            Err(Errno::NODATA) => {} // removed since it was listed
            Err(e) => return Err(err("reading xattrs of", e)),
        }
    }
    out.sort();
    Ok(out)
}

/// Query a length, then fetch; retry if the value grew in between (`ERANGE`).
fn sized_read(
    query: impl Fn() -> rustix::io::Result<usize>,
    fetch: impl Fn(&mut [u8]) -> rustix::io::Result<usize>,
) -> rustix::io::Result<Vec<u8>> {
    loop {
        let len = query()?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; len];
        match fetch(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(Errno::RANGE) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The output, counting bytes for padding.
pub(crate) struct TarWriter<W> {
    pub(crate) out: W,
    pub(crate) written: u64,
}

impl<W: Write> TarWriter<W> {
    pub(crate) fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.out
            .write_all(bytes)
            .ctx(|| "writing tar stream".to_string())?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad_block(&mut self) -> Result<()> {
        self.put(tarwrite::padding(self.written))
    }
}

pub(crate) fn write_member<W: Write>(
    tw: &mut TarWriter<W>,
    root: &Path,
    node: &Node,
    link_to: Option<&[u8]>,
    buf: &mut [u8],
) -> Result<()> {
    let kind = match (&node.kind, link_to) {
        (_, Some(target)) => MemberKind::Hardlink(target),
        (Kind::Dir, None) => MemberKind::Dir,
        (Kind::File, None) => MemberKind::File { size: node.size },
        (Kind::Symlink(t), None) => MemberKind::Symlink(t),
        (Kind::Char(ma, mi), None) => MemberKind::Char(*ma, *mi),
        (Kind::Block(ma, mi), None) => MemberKind::Block(*ma, *mi),
        (Kind::Fifo, None) => MemberKind::Fifo,
    };
    let member = Member {
        path: &node.rel,
        kind,
        mode: node.mode,
        uid: node.uid.into(),
        gid: node.gid.into(),
        uname: b"",
        gname: b"",
        mtime_ns: node.mtime * 1_000_000_000 + i64::from(node.mtime_nsec),
        xattrs: node
            .xattrs
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
            .collect(),
    };
    tw.put(&tarwrite::header(&member)?)?;
    if let MemberKind::File { .. } = kind {
        copy_file(tw, root, node, buf)?;
    }
    Ok(())
}

/// Stream exactly `node.size` bytes of the file the walk saw; a file replaced, shrunk or grown
/// since is a conflict rather than a silently inconsistent archive.
fn copy_file<W: Write>(
    tw: &mut TarWriter<W>,
    root: &Path,
    node: &Node,
    buf: &mut [u8],
) -> Result<()> {
    let path = abs_path(root, &node.rel);
    let ctx = || format!("reading {}", path.display());
    let changed = || Error::Conflict(format!("{} changed while being archived", path.display()));
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY;
    let fd = rustix::fs::open(&path, flags, Mode::empty())
        .map_err(io::Error::from)
        .ctx(ctx)?;
    let mut file = File::from(fd);
    let md = file.metadata().ctx(ctx)?;
    if (md.dev(), md.ino()) != (node.dev, node.ino) {
        return Err(changed());
    }
    let mut left = node.size;
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        match file.read(&mut buf[..want]) {
            Ok(0) => return Err(changed()),
            Ok(n) => {
                tw.put(&buf[..n])?;
                left -= n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(ctx(), e)),
        }
    }
    if file.read(&mut buf[..1]).ctx(ctx)? != 0 {
        return Err(changed());
    }
    tw.pad_block()
}

/// Bytes of the regular files under `root`.
pub(crate) fn dir_size(root: &Path) -> Result<u64> {
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).ctx(|| format!("listing {}", dir.display()))? {
            let e = e.ctx(|| format!("listing {}", dir.display()))?;
            let m = e
                .metadata()
                .ctx(|| format!("stat {}", e.path().display()))?;
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.len();
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    //! Internals; the whole-tree tests (determinism, every entry kind, tar crate and GNU tar as
    //! oracles) are in `tests/fsio.rs`.
    use super::*;

    #[test]
    fn root_must_be_a_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("f");
        fs::write(&file, b"").unwrap();
        let opts = DirOptions::default();
        let err = write_dir_tar(&file, &opts, Vec::new(), &mut Vec::new()).unwrap_err();
        assert!(matches!(err, Error::InvalidLayer(_)), "{err}");
        let missing = tmp.path().join("missing");
        let err = write_dir_tar(&missing, &opts, Vec::new(), &mut Vec::new()).unwrap_err();
        assert!(
            matches!(err, Error::Io { .. }) && err.to_string().contains("missing"),
            "{err}"
        );
    }
}
