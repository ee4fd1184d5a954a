//! Directory tree → canonical tar stream (what `import_dir` imports).
//!
//! Invariants of [`write_dir_tar`]'s output, which is a pure function of the tree's contents and
//! metadata (same tree ⇒ same bytes, whatever the thread count or `readdir` order):
//! - The root itself is not emitted. Members are relative paths (`etc/`, `etc/passwd`) in raw bytes,
//!   directories with a trailing `/`. Order is depth-first pre-order with each directory's children
//!   sorted by name bytes (GNU tar's `--sort=name`), so `a/`, `a/b`, `a.b`: a parent always precedes
//!   its children.
//! - Every member has a ustar header with octal numeric fields only (never base-256): mode is
//!   `st_mode & 0o7777`, uname/gname empty, devmajor/devminor `0` unless a device, checksum as 7
//!   octal digits + NUL.
//! - When something does not fit ustar (a path that cannot be split into prefix/name, a link target
//!   over 100 bytes, uid/gid > 0o7777777, size > 8 GiB − 1, an mtime that is negative, too large or
//!   has nanoseconds, any xattr), a PAX `x` header precedes the member. Its records are sorted by
//!   key; the value that did not fit is replaced in the ustar header by its first 100 bytes
//!   (names) or 0 (numbers). `mtime` is `secs[.fraction]` with trailing zeros of the fraction
//!   stripped; xattrs are `SCHILY.xattr.<name>` with raw value bytes.
//! - Hardlinks (same `(dev, ino)`, `nlink > 1`, any non-directory): the first path in output order
//!   carries the content, later ones are typeflag `1` naming it. Sockets are skipped with a warning.
//! - Data is padded to 512 bytes; the archive ends with two zero blocks and is zero-padded to a
//!   multiple of 10240 bytes, as GNU tar does.
//!
//! Metadata is gathered first (in parallel, one directory level at a time, so no recursion can
//! overflow a stack); file contents are then streamed one file at a time through a fixed buffer.

use std::collections::hash_map::{Entry as MapEntry, HashMap};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use tar::{EntryType, Header};

use crate::error::{Error, IoContext, Result};

const BLOCK: u64 = 512;
const RECORD: u64 = 10240;
/// Largest value of an 8-byte octal field (7 digits + NUL): uid, gid, devmajor, devminor.
const MAX_OCTAL_8: u64 = 0o7777777;
/// Largest value of a 12-byte octal field (11 digits + NUL): size, mtime.
const MAX_OCTAL_12: u64 = 0o77777777777;
const COPY_BUF: usize = 256 * 1024;

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
enum Kind {
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
struct Node {
    /// Path relative to the root, no trailing slash; empty for the root.
    rel: Vec<u8>,
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    mtime_nsec: u32,
    size: u64,
    dev: u64,
    ino: u64,
    nlink: u64,
    /// Sorted by name.
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Indices of the children in the node arena, sorted by name.
    children: Vec<usize>,
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
    tw.put(&[0u8; 2 * BLOCK as usize])?;
    let tail = (RECORD - tw.written % RECORD) % RECORD;
    tw.put(&vec![0u8; tail as usize])?;
    tw.out.flush().ctx(|| "writing tar stream".to_string())?;
    Ok(count)
}

fn abs_path(root: &Path, rel: &[u8]) -> PathBuf {
    if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(OsStr::from_bytes(rel))
    }
}

/// Breadth-first, one level at a time: all directories of a level are listed in parallel and
/// their children stat'ed in parallel; results are appended in a fixed order, so node indices,
/// children lists and warnings do not depend on scheduling.
fn scan_tree(root: &Path, opts: &DirOptions, warnings: &mut Vec<String>) -> Result<Vec<Node>> {
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
                    if matches!(node.kind, Kind::Dir) {
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
struct TarWriter<W> {
    out: W,
    written: u64,
}

impl<W: Write> TarWriter<W> {
    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.out
            .write_all(bytes)
            .ctx(|| "writing tar stream".to_string())?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad_block(&mut self) -> Result<()> {
        let n = (BLOCK - self.written % BLOCK) % BLOCK;
        self.put(&[0u8; BLOCK as usize][..n as usize])
    }
}

/// Copy `value` into a fixed field, truncated; the rest stays NUL.
fn put_field(field: &mut [u8], value: &[u8]) {
    let n = value.len().min(field.len());
    field[..n].copy_from_slice(&value[..n]);
}

/// Split a path over ustar's prefix (155) and name (100) fields at a '/', preferring the longest
/// name. Returns false when no split fits (the name part must not be empty).
fn split_ustar_path(path: &[u8], prefix: &mut [u8; 155], name: &mut [u8; 100]) -> bool {
    if path.len() <= name.len() {
        put_field(name, path);
        return true;
    }
    let first = path.len().saturating_sub(name.len() + 1);
    let body = path.strip_suffix(b"/").unwrap_or(path); // never split at a directory's own slash
    let Some(at) = (first..body.len()).find(|&i| body[i] == b'/') else {
        return false;
    };
    if at > prefix.len() || at == 0 {
        return false;
    }
    put_field(prefix, &path[..at]);
    put_field(name, &path[at + 1..]);
    true
}

/// `secs[.fraction]`, the fraction's trailing zeros stripped; negative times count down from 0,
/// so (-2 s, 5e8 ns) is "-1.5".
fn format_mtime(secs: i64, nsec: u32) -> String {
    let (sign, whole, frac) = if secs < 0 && nsec > 0 {
        ("-", (secs + 1).unsigned_abs(), 1_000_000_000 - nsec)
    } else {
        (if secs < 0 { "-" } else { "" }, secs.unsigned_abs(), nsec)
    };
    if frac == 0 {
        return format!("{sign}{whole}");
    }
    let digits = format!("{frac:09}");
    format!("{sign}{whole}.{}", digits.trim_end_matches('0'))
}

/// One PAX record: "<len> <key>=<value>\n", where len counts the whole record, itself included.
fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    while body + len.to_string().len() != len {
        len = body + len.to_string().len(); // grows at most twice, at a digit rollover
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

fn write_member<W: Write>(
    tw: &mut TarWriter<W>,
    root: &Path,
    node: &Node,
    link_to: Option<&[u8]>,
    buf: &mut [u8],
) -> Result<()> {
    let (etype, link, size, devs) = match (&node.kind, link_to) {
        (_, Some(target)) => (EntryType::Link, Some(target), 0, (0, 0)),
        (Kind::Dir, None) => (EntryType::Directory, None, 0, (0, 0)),
        (Kind::File, None) => (EntryType::Regular, None, node.size, (0, 0)),
        (Kind::Symlink(t), None) => (EntryType::Symlink, Some(t.as_slice()), 0, (0, 0)),
        (Kind::Char(ma, mi), None) => (EntryType::Char, None, 0, (*ma, *mi)),
        (Kind::Block(ma, mi), None) => (EntryType::Block, None, 0, (*ma, *mi)),
        (Kind::Fifo, None) => (EntryType::Fifo, None, 0, (0, 0)),
    };
    let mut name = node.rel.clone();
    if matches!(node.kind, Kind::Dir) {
        name.push(b'/');
    }
    let mut pax: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut h = Header::new_ustar();
    let u = h.as_ustar_mut().expect("a ustar header");
    if !split_ustar_path(&name, &mut u.prefix, &mut u.name) {
        put_field(&mut u.name, &name);
        pax.push((b"path".to_vec(), name.clone()));
    }
    if let Some(link) = link {
        put_field(&mut u.linkname, link);
        if link.len() > u.linkname.len() {
            pax.push((b"linkpath".to_vec(), link.to_vec()));
        }
    }
    if u64::from(devs.0.max(devs.1)) > MAX_OCTAL_8 {
        let path = String::from_utf8_lossy(&node.rel);
        return Err(Error::InvalidLayer(format!(
            "device numbers of {path} do not fit a tar header"
        )));
    }
    u.set_device_major(devs.0);
    u.set_device_minor(devs.1);
    let mut fit = |key: &str, value: u64, max: u64| {
        if value <= max {
            return value;
        }
        pax.push((key.as_bytes().to_vec(), value.to_string().into_bytes()));
        0
    };
    h.set_uid(fit("uid", node.uid.into(), MAX_OCTAL_8));
    h.set_gid(fit("gid", node.gid.into(), MAX_OCTAL_8));
    h.set_size(fit("size", size, MAX_OCTAL_12));
    let secs_fit = u64::try_from(node.mtime).is_ok_and(|s| s <= MAX_OCTAL_12);
    if !secs_fit || node.mtime_nsec != 0 {
        pax.push((
            b"mtime".to_vec(),
            format_mtime(node.mtime, node.mtime_nsec).into_bytes(),
        ));
    }
    h.set_mtime(if secs_fit { node.mtime as u64 } else { 0 });
    h.set_mode(node.mode);
    h.set_entry_type(etype);
    h.set_cksum();

    for (key, value) in &node.xattrs {
        pax.push(([b"SCHILY.xattr.".as_slice(), key].concat(), value.clone()));
    }
    if !pax.is_empty() {
        pax.sort();
        write_pax(tw, &name, &pax)?;
    }
    tw.put(h.as_bytes())?;
    if etype == EntryType::Regular {
        copy_file(tw, root, node, buf)?;
    }
    Ok(())
}

fn write_pax<W: Write>(
    tw: &mut TarWriter<W>,
    name: &[u8],
    records: &[(Vec<u8>, Vec<u8>)],
) -> Result<()> {
    let mut data = Vec::new();
    for (key, value) in records {
        pax_record(&mut data, key, value);
    }
    let trimmed = name.strip_suffix(b"/").unwrap_or(name);
    let base = trimmed.rsplit(|&b| b == b'/').next().unwrap_or(trimmed);
    let mut h = Header::new_ustar();
    let u = h.as_ustar_mut().expect("a ustar header");
    put_field(&mut u.name, &[b"PaxHeaders/".as_slice(), base].concat());
    u.set_device_major(0);
    u.set_device_minor(0);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(data.len() as u64);
    h.set_entry_type(EntryType::XHeader);
    h.set_cksum();
    tw.put(h.as_bytes())?;
    tw.put(&data)?;
    tw.pad_block()
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

#[cfg(test)]
mod tests {
    //! Internals; the whole-tree tests (determinism, every entry kind, tar crate and GNU tar as
    //! oracles) are in `tests/fsio.rs`.
    use super::*;

    #[test]
    fn pax_record_lengths_count_themselves() {
        // Covers the digit rollovers at 9→10 and 99→100 and 999→1000.
        for n in 0..1100 {
            let mut rec = Vec::new();
            pax_record(&mut rec, b"path", &vec![b'x'; n]);
            let sp = rec.iter().position(|&b| b == b' ').unwrap();
            let len: usize = std::str::from_utf8(&rec[..sp]).unwrap().parse().unwrap();
            assert_eq!(len, rec.len(), "value length {n}");
        }
        let mut rec = Vec::new();
        pax_record(&mut rec, b"k", b"");
        assert_eq!(rec, b"5 k=\n");
    }

    #[test]
    fn mtime_text() {
        let cases = [
            (5, 0, "5"),
            (5, 500_000_000, "5.5"),
            (0, 1, "0.000000001"),
            (-2, 500_000_000, "-1.5"),
            (-1, 999_999_999, "-0.000000001"),
            (-3, 0, "-3"),
        ];
        for (secs, nsec, text) in cases {
            assert_eq!(format_mtime(secs, nsec), text);
        }
    }

    #[test]
    fn ustar_path_split() {
        let split = |path: &[u8]| {
            let (mut prefix, mut name) = ([0u8; 155], [0u8; 100]);
            let ok = split_ustar_path(path, &mut prefix, &mut name);
            let strip = |f: &[u8]| {
                f.iter()
                    .take_while(|&&b| b != 0)
                    .copied()
                    .collect::<Vec<u8>>()
            };
            ok.then(|| (strip(&prefix), strip(&name)))
        };
        let (a99, a100) = ("a".repeat(99), "a".repeat(100));
        assert_eq!(
            split(a100.as_bytes()),
            Some((vec![], a100.clone().into_bytes()))
        );
        assert_eq!(split(format!("{a100}x").as_bytes()), None); // no '/' at all
                                                                // The longest name that fits wins: "p/q/<99>" splits at the second '/'.
        let (p, n) = split(format!("p/q/{a99}").as_bytes()).unwrap();
        assert_eq!((p, n), (b"p/q".to_vec(), a99.clone().into_bytes()));
        // A directory's own trailing slash is never the split point.
        assert_eq!(split(format!("p/{a99}x/").as_bytes()), None);
        let (p, n) = split(format!("p/{a99}/").as_bytes()).unwrap();
        assert_eq!((p, n), (b"p".to_vec(), format!("{a99}/").into_bytes()));
        assert_eq!(split(format!("{}/{a99}", "b".repeat(156)).as_bytes()), None);
    }

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
