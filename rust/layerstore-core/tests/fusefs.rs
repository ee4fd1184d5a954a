//! The FUSE view of a stack, mounted for real (root, `/dev/fuse` and Debian's `fuse3` are
//! required: a missing one fails the test, saying which): the mount walked with `std::fs` must
//! equal the stack's own view and `materialize` of it (every field, xattr and byte, hardlinks as
//! one inode), writes must fail with `EROFS`, listings must resume at their offsets, damage must
//! read as `EIO`, a thousand layers must mount, and a killed server must leave no mount behind.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Cursor, Read};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirEntryExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use layerstore_core::fusefs::{FuseMount, FuseOptions};
use layerstore_core::layer::{Kind, LayerInfo};
use layerstore_core::materialize::WriteOptions;
use layerstore_core::stack::Stack;
use layerstore_core::store::{no_progress, ImportOptions, StoreOptions};
use layerstore_core::tar::Limits;
use layerstore_core::tarwrite::{header, padding, trailer, Member, MemberKind};
use layerstore_core::union::Node;
use layerstore_core::{ErrorKind, Store};
use sha2::{Digest, Sha256};

// ------------------------------------------------------------------------------------------------
// Prerequisites, stores and layers
// ------------------------------------------------------------------------------------------------

/// Fail (never skip) where a FUSE mount cannot work, saying what is missing.
fn require_fuse() {
    assert!(
        rustix::process::geteuid().is_root(),
        "the FUSE tests mount file systems and need root"
    );
    assert!(
        Path::new("/dev/fuse").exists(),
        "the FUSE tests need /dev/fuse (the fuse kernel module)"
    );
    let path = std::env::var_os("PATH").unwrap_or_default();
    assert!(
        std::env::split_paths(&path).any(|d| d.join("fusermount3").is_file()),
        "the FUSE tests need fusermount3: apt-get install fuse3"
    );
}

fn open_store(dir: &Path, options: StoreOptions) -> Arc<Store> {
    let store = Store::open(&dir.join("store"), options, Limits::default()).unwrap();
    Arc::new(store)
}

/// One member of a fixture layer.
struct M {
    path: String,
    kind: K,
    mode: u32,
    owner: (u64, u64),
    mtime_ns: i64,
    xattrs: Vec<(&'static str, Vec<u8>)>,
}

enum K {
    Dir,
    File(Vec<u8>),
    Symlink(&'static str),
    Hardlink(&'static str),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

fn m(path: impl Into<String>, kind: K) -> M {
    let mode = match kind {
        K::Dir => 0o755,
        K::Symlink(_) => 0o777,
        _ => 0o644,
    };
    M {
        path: path.into(),
        kind,
        mode,
        owner: (0, 0),
        mtime_ns: 1_600_000_000_123_456_789,
        xattrs: Vec::new(),
    }
}

impl M {
    fn mode(mut self, mode: u32) -> M {
        self.mode = mode;
        self
    }

    fn owner(mut self, uid: u64, gid: u64) -> M {
        self.owner = (uid, gid);
        self
    }

    fn mtime_ns(mut self, ns: i64) -> M {
        self.mtime_ns = ns;
        self
    }

    fn xattr(mut self, name: &'static str, value: &[u8]) -> M {
        self.xattrs.push((name, value.to_vec()));
        self
    }
}

fn dir(path: impl Into<String>) -> M {
    m(path, K::Dir)
}

fn file(path: impl Into<String>, data: &[u8]) -> M {
    m(path, K::File(data.to_vec()))
}

/// A tar of `members`, in order, with the crate's canonical headers.
fn tar_of(members: &[M]) -> Vec<u8> {
    let mut out = Vec::new();
    for x in members {
        let data: &[u8] = match &x.kind {
            K::File(d) => d,
            _ => b"",
        };
        let kind = match &x.kind {
            K::Dir => MemberKind::Dir,
            K::File(d) => MemberKind::File {
                size: d.len() as u64,
            },
            K::Symlink(t) => MemberKind::Symlink(t.as_bytes()),
            K::Hardlink(t) => MemberKind::Hardlink(t.as_bytes()),
            K::Char(ma, mi) => MemberKind::Char(*ma, *mi),
            K::Block(ma, mi) => MemberKind::Block(*ma, *mi),
            K::Fifo => MemberKind::Fifo,
        };
        let member = Member {
            path: x.path.as_bytes(),
            kind,
            mode: x.mode,
            uid: x.owner.0,
            gid: x.owner.1,
            uname: b"",
            gname: b"",
            mtime_ns: x.mtime_ns,
            xattrs: (x.xattrs.iter())
                .map(|(k, v)| (k.as_bytes(), v.as_slice()))
                .collect(),
        };
        out.extend(header(&member).unwrap());
        out.extend_from_slice(data);
        out.extend_from_slice(padding(data.len() as u64));
    }
    let end = trailer(out.len() as u64);
    out.extend(end);
    out
}

fn import(store: &Store, members: &[M]) -> LayerInfo {
    let tar = Box::new(Cursor::new(tar_of(members)));
    let opts = ImportOptions::default();
    store.import_tar(tar, &opts, &no_progress).unwrap().layer
}

/// `len` bytes that do not compress and cut into many chunks (xorshift).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

const BIG_LEN: usize = 3 << 20;

/// Two layers with every kind of entry and the markers between them.
fn fixture(store: &Store) -> Stack {
    let base = import(
        store,
        &[
            dir("etc").xattr("user.dir", b"on a directory"),
            file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
                .xattr("user.comment", b"the password file")
                .xattr("user.binary", b"\0\x01\xffend\n"),
            m("etc/passwd2", K::Hardlink("etc/passwd")),
            file("etc/gone", b"whited out above"),
            dir("opq"),
            file("opq/old", b"hidden by the opaque marker"),
            dir("bin"),
            file("bin/su", b"#!/bin/false\n").mode(0o4755),
            file("bin/wall", b"#!/bin/false\n").mode(0o2755).owner(0, 5),
            dir("tmp").mode(0o1777),
            dir("home/u").mode(0o700).owner(1000, 1000),
            file("home/u/notes", b"mine").mode(0o600).owner(1000, 1000),
            m("lnk", K::Symlink("etc/passwd")),
            m("abs", K::Symlink("/etc/passwd")),
            m("dangling", K::Symlink("no/such/file")),
            dir("dev"),
            m("dev/null", K::Char(1, 3)).mode(0o666),
            m("dev/sda", K::Block(8, 0)).mode(0o660).owner(0, 6),
            m("dev/pts9", K::Char(136, 300)).mode(0o620),
            m("run/fifo", K::Fifo).mode(0o600),
            dir("share"),
            file("share/a", b"the first a"),
            m("share/b", K::Hardlink("share/a")),
            m("share/c", K::Hardlink("share/a")),
            file("data/big", &noise(7, BIG_LEN)),
            file("data/old-time", b"1969").mtime_ns(-1_500_000_000),
            file("data/empty", b""),
        ],
    );
    let upper = import(
        store,
        &[
            file("etc/.wh.gone", b""),
            file("opq/.wh..wh..opq", b""),
            file("opq/new", b"new"),
            // Replaces share/a: share/b and share/c keep the first a's inode between them.
            file("share/a", b"a new a"),
            file("data/new", b"fresh").mtime_ns(1_700_000_000_000_000_001),
            m("data/new2", K::Hardlink("data/new")),
            dir("data/sub"),
        ],
    );
    store.stack(&[base, upper]).unwrap()
}

// ------------------------------------------------------------------------------------------------
// Describing trees: the mount, a materialized copy, and the view itself
// ------------------------------------------------------------------------------------------------

/// What a walk shows of one path (the inode number apart: see `groups`).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Info {
    kind: &'static str,
    /// `st_mode`: file type and permission bits, setuid/setgid/sticky included.
    mode: u32,
    uid: u32,
    gid: u32,
    /// Files and symlinks only (a directory's size is its file system's business).
    size: Option<u64>,
    mtime: (i64, i64),
    rdev: u64,
    nlink: u64,
    link: Option<Vec<u8>>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    sha256: Option<Vec<u8>>,
}

/// Path (relative, `/`-separated, the root empty) → what it shows, and the inode numbers.
#[derive(Debug, Default)]
struct Tree {
    infos: BTreeMap<Vec<u8>, Info>,
    inos: BTreeMap<Vec<u8>, u64>,
}

fn kind_name(ft: std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "dir"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_file() {
        "file"
    } else if ft.is_char_device() {
        "char"
    } else if ft.is_block_device() {
        "block"
    } else if ft.is_fifo() {
        "fifo"
    } else {
        "other"
    }
}

fn xattrs_of(path: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut names = vec![0u8; 64 << 10];
    let n = rustix::fs::llistxattr(path, &mut names[..]).unwrap();
    let mut out = BTreeMap::new();
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let mut value = vec![0u8; 64 << 10];
        let len = rustix::fs::lgetxattr(path, name, &mut value[..]).unwrap();
        value.truncate(len);
        out.insert(name.to_vec(), value);
    }
    out
}

fn join(rel: &[u8], name: &[u8]) -> Vec<u8> {
    if rel.is_empty() {
        name.to_vec()
    } else {
        [rel, b"/", name].concat()
    }
}

/// Walk `root` (symlinks not followed) with `std::fs`.
fn disk_tree(root: &Path) -> Tree {
    let mut tree = Tree::default();
    let mut todo = vec![Vec::new()];
    while let Some(rel) = todo.pop() {
        let path = root.join(OsStr::from_bytes(&rel));
        let st = std::fs::symlink_metadata(&path).unwrap();
        let kind = kind_name(st.file_type());
        let info = Info {
            kind,
            mode: st.mode(),
            uid: st.uid(),
            gid: st.gid(),
            size: matches!(kind, "file" | "symlink").then_some(st.size()),
            mtime: (st.mtime(), st.mtime_nsec()),
            rdev: st.rdev(),
            nlink: st.nlink(),
            link: (kind == "symlink").then(|| {
                std::fs::read_link(&path)
                    .unwrap()
                    .into_os_string()
                    .into_vec()
            }),
            xattrs: xattrs_of(&path),
            sha256: (kind == "file")
                .then(|| Sha256::digest(std::fs::read(&path).unwrap()).to_vec()),
        };
        if kind == "dir" {
            for e in std::fs::read_dir(&path).unwrap() {
                todo.push(join(&rel, e.unwrap().file_name().as_bytes()));
            }
        }
        tree.inos.insert(rel.clone(), st.ino());
        tree.infos.insert(rel, info);
    }
    tree
}

/// The stack's own view, walked in its index (an inode's "number": its entry's address).
fn view_tree(store: &Store, stack: &Stack) -> Tree {
    let mut paths = Vec::new();
    stack
        .index
        .walk(b"", |p, node| paths.push((p.to_vec(), node.clone())));
    let mut links: BTreeMap<usize, u64> = BTreeMap::new();
    for (_, node) in &paths {
        if let Node::Leaf(v) = node {
            *links
                .entry(std::ptr::from_ref(v.meta()) as usize)
                .or_default() += 1;
        }
    }
    let mut tree = Tree::default();
    for (rel, node) in paths {
        let e = node.view().meta();
        let (kind, ifmt) = match e.kind {
            Kind::Dir => ("dir", 0o040000),
            Kind::Symlink => ("symlink", 0o120000),
            Kind::Char => ("char", 0o020000),
            Kind::Block => ("block", 0o060000),
            Kind::Fifo => ("fifo", 0o010000),
            _ => ("file", 0o100000),
        };
        let key = std::ptr::from_ref(e) as usize;
        let nlink = match &node {
            Node::Dir(d) => {
                2 + d
                    .children
                    .values()
                    .filter(|c| matches!(c, Node::Dir(_)))
                    .count() as u64
            }
            Node::Leaf(_) => links[&key],
        };
        let sha256 = (kind == "file").then(|| {
            let mut reader = store.content(e).unwrap();
            let mut data = vec![0u8; e.size as usize];
            assert_eq!(reader.read_at(0, &mut data).unwrap(), data.len());
            Sha256::digest(&data).to_vec()
        });
        let info = Info {
            kind,
            mode: ifmt | (e.mode & 0o7777),
            uid: e.uid as u32,
            gid: e.gid as u32,
            size: match kind {
                "file" => Some(e.size),
                "symlink" => Some(e.link.len() as u64),
                _ => None,
            },
            mtime: (
                e.mtime_ns.div_euclid(1_000_000_000),
                e.mtime_ns.rem_euclid(1_000_000_000),
            ),
            rdev: if matches!(kind, "char" | "block") {
                e.rdev()
            } else {
                0
            },
            nlink,
            link: (kind == "symlink").then(|| e.link.clone()),
            xattrs: e.xattrs.clone().into_iter().collect(),
            sha256,
        };
        tree.inos
            .insert(rel.clone(), if kind == "dir" { 0 } else { key as u64 });
        tree.infos.insert(rel, info);
    }
    tree
}

/// Paths that share an inode, in groups of two or more (directories never do).
fn groups(tree: &Tree) -> std::collections::BTreeSet<Vec<String>> {
    let mut by: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for (path, ino) in &tree.inos {
        if tree.infos[path].kind != "dir" {
            let path = String::from_utf8_lossy(path).into_owned();
            by.entry(*ino).or_default().push(path);
        }
    }
    by.into_values().filter(|g| g.len() > 1).collect()
}

fn assert_same_tree(expected: &Tree, got: &Tree, what: &str) {
    let show = |p: &[u8]| format!("/{}", String::from_utf8_lossy(p));
    let paths = |t: &Tree| t.infos.keys().map(|p| show(p)).collect::<Vec<_>>();
    assert_eq!(paths(expected), paths(got), "{what}: the paths differ");
    for (path, info) in &expected.infos {
        assert_eq!(info, &got.infos[path], "{what}: {} differs", show(path));
    }
    assert_eq!(
        groups(expected),
        groups(got),
        "{what}: hardlink groups differ"
    );
}

// ------------------------------------------------------------------------------------------------
// Mount helpers
// ------------------------------------------------------------------------------------------------

fn mount(store: &Arc<Store>, stack: Stack, at: &Path) -> FuseMount {
    std::fs::create_dir_all(at).unwrap();
    FuseMount::mount(store.clone(), stack, at, &FuseOptions::default()).unwrap()
}

/// The mount entries at `at` in this process's /proc/self/mountinfo (fields 5, 6, 9, 10, 11).
fn mounts_at(at: &Path) -> Vec<Vec<String>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let at = at.to_str().unwrap();
    info.lines()
        .map(|l| l.split(' ').map(str::to_owned).collect::<Vec<_>>())
        .filter(|f| f.get(4).is_some_and(|p| p == at))
        .map(|f| {
            let sep = f.iter().position(|x| x == "-").unwrap();
            vec![
                f[5].clone(),
                f[sep + 1].clone(),
                f[sep + 2].clone(),
                f[sep + 3].clone(),
            ]
        })
        .collect()
}

fn errno(e: &std::io::Error) -> Option<i32> {
    e.raw_os_error()
}

const EROFS: i32 = 30;
const EIO: i32 = 5;
const ERANGE: i32 = 34;

// ------------------------------------------------------------------------------------------------
// Tests
// ------------------------------------------------------------------------------------------------

#[test]
fn the_mount_shows_the_view_exactly_as_materialize_writes_it() {
    require_fuse();
    let tmp = tempfile::tempdir().unwrap();
    let store = open_store(tmp.path(), StoreOptions::default());
    let stack = fixture(&store);
    let out = tmp.path().join("out");
    store
        .materialize(&stack, &out, &WriteOptions::default(), &no_progress)
        .unwrap();
    let mnt = tmp.path().join("mnt");
    let fuse = mount(&store, stack.clone(), &mnt);

    let view = view_tree(&store, &stack);
    let mounted = disk_tree(&mnt);
    let written = disk_tree(&out);
    assert_same_tree(&view, &mounted, "view vs mount");
    assert_same_tree(&written, &mounted, "materialized vs mount");

    // What the view is made of, spelled out.
    let info = |p: &str| &mounted.infos[p.as_bytes()];
    assert!(!mounted.infos.contains_key(&b"etc/gone"[..]));
    assert!(!mounted.infos.contains_key(&b"opq/old"[..]));
    assert_eq!(info("opq/new").kind, "file");
    assert_eq!(info("bin/su").mode, 0o104755);
    assert_eq!(info("bin/wall").mode, 0o102755);
    assert_eq!(info("tmp").mode, 0o41777);
    assert_eq!(
        (info("home/u/notes").uid, info("home/u/notes").gid),
        (1000, 1000)
    );
    assert_eq!(info("dev/pts9").rdev, rustix::fs::makedev(136, 300));
    assert_eq!(info("dev/sda").kind, "block");
    assert_eq!(info("run/fifo").kind, "fifo");
    assert_eq!(info("etc/passwd").nlink, 2);
    assert_eq!(info("share/a").nlink, 1);
    assert_eq!(info("share/b").nlink, 2);
    assert_eq!(info("data/old-time").mtime, (-2, 500_000_000));
    assert_eq!(info("data/big").size, Some(BIG_LEN as u64));
    assert_eq!(info("etc").xattrs[&b"user.dir"[..]], b"on a directory");
    let ino = |p: &str| mounted.inos[p.as_bytes()];
    assert_eq!(ino(""), 1, "the root is inode 1");
    assert_eq!(ino("etc/passwd"), ino("etc/passwd2"));
    assert_eq!(ino("share/b"), ino("share/c"));
    assert_ne!(ino("share/a"), ino("share/b"));
    assert_eq!(ino("data/new"), ino("data/new2"));
    assert_eq!(
        std::fs::read(mnt.join("lnk")).unwrap(),
        b"root:x:0:0::/root:/bin/sh\n"
    );

    // A second walk (from the kernel's caches or not) sees the same numbers, and a listing
    // reports the numbers a lookup gives.
    assert_eq!(disk_tree(&mnt).inos, mounted.inos);
    for e in std::fs::read_dir(mnt.join("etc")).unwrap() {
        let e = e.unwrap();
        assert_eq!(e.ino(), std::fs::symlink_metadata(e.path()).unwrap().ino());
    }
    fuse.unmount().unwrap();
    assert!(mounts_at(&mnt).is_empty());
}

#[test]
fn the_mount_is_read_only_and_says_what_it_is() {
    require_fuse();
    let tmp = tempfile::tempdir().unwrap();
    let store = open_store(tmp.path(), StoreOptions::default());
    let stack = fixture(&store);
    let mnt = tmp.path().join("mnt");
    let fuse = mount(&store, stack, &mnt);
    assert_eq!(fuse.mountpoint(), mnt);

    let refused: Vec<(&str, std::io::Result<()>)> = vec![
        ("create", std::fs::write(mnt.join("new"), b"x")),
        (
            "open for writing",
            std::fs::OpenOptions::new()
                .write(true)
                .open(mnt.join("etc/passwd"))
                .map(drop),
        ),
        ("mkdir", std::fs::create_dir(mnt.join("d"))),
        ("unlink", std::fs::remove_file(mnt.join("etc/passwd"))),
        ("rmdir", std::fs::remove_dir(mnt.join("tmp"))),
        ("rename", std::fs::rename(mnt.join("lnk"), mnt.join("lnk2"))),
        ("symlink", std::os::unix::fs::symlink("x", mnt.join("s"))),
        (
            "link",
            std::fs::hard_link(mnt.join("etc/passwd"), mnt.join("h")),
        ),
        (
            "chmod",
            std::fs::set_permissions(
                mnt.join("etc/passwd"),
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            ),
        ),
        (
            "setxattr",
            rustix::fs::lsetxattr(
                mnt.join("etc/passwd"),
                "user.x",
                b"y",
                rustix::fs::XattrFlags::empty(),
            )
            .map_err(std::io::Error::from),
        ),
        (
            "removexattr",
            rustix::fs::lremovexattr(mnt.join("etc/passwd"), "user.comment")
                .map_err(std::io::Error::from),
        ),
    ];
    for (what, result) in refused {
        let e = result.expect_err(what);
        assert_eq!(errno(&e), Some(EROFS), "{what}: {e}");
    }

    // The xattr size probe, and a buffer too small for the value.
    let passwd = mnt.join("etc/passwd");
    let size = rustix::fs::lgetxattr_query(&passwd, "user.comment").unwrap();
    assert_eq!(size, b"the password file".len());
    let mut small = [0u8; 4];
    let e = rustix::fs::lgetxattr(&passwd, "user.comment", &mut small[..]).unwrap_err();
    assert_eq!(e.raw_os_error(), ERANGE);
    let e = rustix::fs::lgetxattr(&passwd, "user.none", &mut [0u8; 16][..]).unwrap_err();
    assert_eq!(e, rustix::io::Errno::NODATA);
    assert_eq!(
        rustix::fs::llistxattr_query(&passwd).unwrap(),
        "user.binary\0user.comment\0".len()
    );

    // statfs and mountinfo: a read-only FUSE file system named as asked.
    let st = rustix::fs::statfs(&mnt).unwrap();
    assert_eq!(st.f_type, 0x6573_5546, "FUSE_SUPER_MAGIC");
    assert!(st.f_files > 30);
    let info = mounts_at(&mnt);
    assert_eq!(info.len(), 1, "{info:?}");
    let (opts, fstype, source, super_opts) = (&info[0][0], &info[0][1], &info[0][2], &info[0][3]);
    for want in ["ro", "nosuid", "nodev"] {
        assert!(opts.split(',').any(|o| o == want), "{want} missing: {opts}");
    }
    assert_eq!(fstype, "fuse.layerstore");
    assert_eq!(source, "layerstore");
    assert!(super_opts.contains("default_permissions") && super_opts.contains("allow_other"));
    // The mount's own read-ahead, raised from the kernel's 128 KiB.
    let dev = std::fs::metadata(&mnt).unwrap().dev();
    let (major, minor) = (rustix::fs::major(dev), rustix::fs::minor(dev));
    let knob = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    assert_eq!(std::fs::read_to_string(knob).unwrap().trim(), "1024");
    fuse.unmount().unwrap();
}

/// `getdents64` on the mount: (name, offset after it) of every entry, from `start` on.
fn listing_from(dir: &Path, start: Option<u64>) -> Vec<(Vec<u8>, u64)> {
    let fd = rustix::fs::open(
        dir,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY,
        rustix::fs::Mode::empty(),
    )
    .unwrap();
    if let Some(at) = start {
        rustix::fs::seek(&fd, rustix::fs::SeekFrom::Start(at)).unwrap();
    }
    // A small buffer: several getdents64 calls, so several FUSE readdir requests.
    let mut buf = Vec::with_capacity(512);
    let mut raw = rustix::fs::RawDir::new(&fd, buf.spare_capacity_mut());
    let mut out = Vec::new();
    while let Some(e) = raw.next() {
        let e = e.unwrap();
        out.push((e.file_name().to_bytes().to_vec(), e.next_entry_cookie()));
    }
    out
}

#[test]
fn directory_listings_resume_at_their_offsets() {
    require_fuse();
    let tmp = tempfile::tempdir().unwrap();
    let store = open_store(tmp.path(), StoreOptions::default());
    let names: Vec<String> = (0..300)
        .map(|i| format!("entry-with-a-longish-name-{i:04}"))
        .collect();
    let members: Vec<M> = names.iter().map(|n| file(format!("d/{n}"), b"x")).collect();
    let layer = import(&store, &members);
    let mnt = tmp.path().join("mnt");
    let fuse = mount(&store, store.stack(&[layer]).unwrap(), &mnt);
    let dir = mnt.join("d");

    let all = listing_from(&dir, None);
    let mut expected: Vec<Vec<u8>> = vec![b".".to_vec(), b"..".to_vec()];
    expected.extend(names.iter().map(|n| n.as_bytes().to_vec()));
    assert_eq!(
        all.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
        expected,
        "name order, . and .. first"
    );
    let offsets: Vec<u64> = all.iter().map(|(_, o)| *o).collect();
    assert_eq!(
        offsets,
        (1..=all.len() as u64).collect::<Vec<_>>(),
        "offset = position + 1"
    );
    // Seeking to an entry's offset (telldir/seekdir) resumes right after it.
    for k in [0, 1, 2, 150, 300, 301] {
        let rest = listing_from(&dir, Some(all[k].1));
        assert_eq!(rest, all[k + 1..], "resumed after entry {k}");
    }
    fuse.unmount().unwrap();
}

#[test]
fn two_threads_read_at_once() {
    require_fuse();
    let tmp = tempfile::tempdir().unwrap();
    let store = open_store(tmp.path(), StoreOptions::default());
    let (one, two) = (noise(11, 5 << 20), noise(12, 5 << 20));
    let layer = import(&store, &[file("one", &one), file("two", &two)]);
    let mnt = tmp.path().join("mnt");
    let fuse = mount(&store, store.stack(&[layer]).unwrap(), &mnt);
    let readers: Vec<_> = [("one", one), ("two", two), ("one", noise(11, 5 << 20))]
        .into_iter()
        .map(|(name, want)| {
            let path = mnt.join(name);
            std::thread::spawn(move || {
                // Odd-sized reads at unaligned offsets, then the whole file.
                let mut f = std::fs::File::open(&path).unwrap();
                let mut got = Vec::new();
                let mut buf = vec![0u8; 77_777];
                loop {
                    let n = f.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                assert!(got == want, "{name}: content differs");
                assert!(std::fs::read(&path).unwrap() == want);
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }
    assert_eq!(fuse.errors().count, 0);
    fuse.unmount().unwrap();
}

#[test]
fn a_thousand_layers_mount() {
    require_fuse();
    const LAYERS: usize = 1000;
    let tmp = tempfile::tempdir().unwrap();
    // The default limit is 127 layers; a store made for deep stacks says so at creation.
    let options = StoreOptions {
        max_depth: LAYERS,
        ..StoreOptions::default()
    };
    let store = open_store(tmp.path(), options);
    let started = Instant::now();
    let layers: Vec<LayerInfo> = (0..LAYERS)
        .map(|i| {
            let top = format!("layer {i:04}\n");
            let mut members = vec![
                file(format!("layers/{i:04}"), top.as_bytes()),
                file("top", top.as_bytes()),
            ];
            if i % 10 == 9 {
                // Every tenth layer whites out the file of the layer below it.
                members.push(file(format!("layers/.wh.{:04}", i - 1), b""));
            }
            import(&store, &members)
        })
        .collect();
    eprintln!("{LAYERS} layers imported in {:?}", started.elapsed());
    let stack = store.stack(&layers).unwrap();
    assert_eq!(stack.depth(), LAYERS);
    let mnt = tmp.path().join("mnt");
    let started = Instant::now();
    let fuse = mount(&store, stack, &mnt);
    eprintln!("{LAYERS} layers mounted in {:?}", started.elapsed());
    assert_eq!(std::fs::read(mnt.join("top")).unwrap(), b"layer 0999\n");
    assert_eq!(
        std::fs::read(mnt.join("layers/0000")).unwrap(),
        b"layer 0000\n"
    );
    assert!(!mnt.join("layers/0998").exists());
    let listed = std::fs::read_dir(mnt.join("layers")).unwrap().count();
    assert_eq!(listed, LAYERS - LAYERS / 10);
    fuse.unmount().unwrap();
}

#[test]
fn a_damaged_chunk_reads_as_eio() {
    require_fuse();
    let tmp = tempfile::tempdir().unwrap();
    let store = open_store(tmp.path(), StoreOptions::default());
    let packs = || -> std::collections::BTreeSet<PathBuf> {
        (std::fs::read_dir(tmp.path().join("store/packs")).unwrap())
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect()
    };
    let base = import(&store, &[file("intact", b"intact")]);
    let before = packs();
    let big = noise(3, 4 << 20);
    let damaged = import(&store, &[file("big", &big)]);
    let new: Vec<PathBuf> = packs().difference(&before).cloned().collect();
    assert_eq!(new.len(), 1, "one pack for the big layer: {new:?}");
    let mut bytes = std::fs::read(&new[0]).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(&new[0], &bytes).unwrap();

    let stack = store.stack(&[base, damaged]).unwrap();
    let mnt = tmp.path().join("mnt");
    let fuse = mount(&store, stack, &mnt);
    assert_eq!(std::fs::read(mnt.join("intact")).unwrap(), b"intact");
    let e = std::fs::read(mnt.join("big")).expect_err("a damaged chunk must not read");
    assert_eq!(errno(&e), Some(EIO), "{e}");
    // No read hands out bytes past the damage: whatever reads, it equals the original.
    let mut f = std::fs::File::open(mnt.join("big")).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => {
                assert_eq!(errno(&e), Some(EIO));
                break;
            }
        }
    }
    assert!(got.len() < big.len() && got[..] == big[..got.len()]);
    let errors = fuse.errors();
    assert!(errors.count >= 1);
    let last = errors.last.unwrap();
    assert!(last.contains("/big") && last.contains("damaged"), "{last}");
    fuse.unmount().unwrap();
}

#[test]
fn wait_returns_when_the_mount_is_unmounted_from_outside() {
    require_fuse();
    let tmp = tempfile::tempdir().unwrap();
    let store = open_store(tmp.path(), StoreOptions::default());
    let layer = import(&store, &[file("f", b"f")]);
    let mnt = tmp.path().join("mnt");
    let fuse = mount(&store, store.stack(&[layer]).unwrap(), &mnt);
    let waiter = std::thread::spawn(move || fuse.wait());
    let out = Command::new("fusermount3")
        .arg("-u")
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !waiter.is_finished() {
        assert!(
            Instant::now() < deadline,
            "wait() still blocks after the unmount"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    waiter.join().unwrap().unwrap();
    assert!(mounts_at(&mnt).is_empty());
}

#[test]
fn unmounting_a_busy_mount_detaches_it_and_open_files_still_read() {
    require_fuse();
    let tmp = tempfile::tempdir().unwrap();
    let store = open_store(tmp.path(), StoreOptions::default());
    let data = noise(5, 1 << 20);
    let layer = import(&store, &[file("f", &data)]);
    let mnt = tmp.path().join("mnt");
    let fuse = mount(&store, store.stack(&[layer]).unwrap(), &mnt);
    let mut open = std::fs::File::open(mnt.join("f")).unwrap();
    fuse.unmount().unwrap();
    assert!(mounts_at(&mnt).is_empty(), "detached from the tree at once");
    assert_eq!(std::fs::read_dir(&mnt).unwrap().count(), 0);
    let mut got = Vec::new();
    open.read_to_end(&mut got).unwrap();
    assert!(got == data, "a file open before the unmount still reads");
}

#[test]
fn without_auto_unmount_root_mounts_directly() {
    require_fuse();
    let tmp = tempfile::tempdir().unwrap();
    let store = open_store(tmp.path(), StoreOptions::default());
    let layer = import(&store, &[file("f", b"direct")]);
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let opts = FuseOptions {
        threads: 1,
        fsname: "direct-test".into(),
        auto_unmount: false,
        allow_other: false,
    };
    let fuse =
        FuseMount::mount(store.clone(), store.stack(&[layer]).unwrap(), &mnt, &opts).unwrap();
    assert_eq!(std::fs::read(mnt.join("f")).unwrap(), b"direct");
    let info = mounts_at(&mnt);
    assert_eq!(info[0][2], "direct-test");
    assert!(!info[0][3].contains("allow_other"), "{info:?}");
    let e = std::fs::write(mnt.join("g"), b"x").unwrap_err();
    assert_eq!(errno(&e), Some(EROFS));
    drop(fuse); // dropping unmounts
    assert!(mounts_at(&mnt).is_empty());
    let bad = FuseOptions {
        fsname: "a,b".into(),
        ..FuseOptions::default()
    };
    let stack = store.stack(&[]).unwrap();
    let e = FuseMount::mount(store.clone(), stack, &mnt, &bad).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
}

#[test]
fn an_overlay_stacks_on_the_mount_and_copies_up_from_it() {
    require_fuse();
    let tmp = tempfile::tempdir().unwrap();
    let store = open_store(tmp.path(), StoreOptions::default());
    let big = noise(9, 2 << 20);
    let layer = import(
        &store,
        &[
            file("etc/conf", b"lower\n")
                .mode(0o640)
                .owner(1000, 50)
                .xattr("user.tag", b"kept"),
            file("big", &big),
            m("lnk", K::Symlink("etc/conf")),
        ],
    );
    let lower = tmp.path().join("lower");
    let fuse = mount(&store, store.stack(&[layer]).unwrap(), &lower);
    let [upper, work, merged] = ["upper", "work", "merged"].map(|d| tmp.path().join(d));
    for d in [&upper, &work, &merged] {
        std::fs::create_dir(d).unwrap();
    }
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    let options = std::ffi::CString::new(options).unwrap();
    let flags = rustix::mount::MountFlags::empty();
    rustix::mount::mount("overlay", &merged, "overlay", flags, options.as_c_str()).unwrap();
    let unmount_overlay = || rustix::mount::unmount(&merged, rustix::mount::UnmountFlags::empty());

    assert_eq!(std::fs::read(merged.join("lnk")).unwrap(), b"lower\n");
    assert!(std::fs::read(merged.join("big")).unwrap() == big);
    // A write copies the file up from the FUSE lower: content, owner, mode and xattrs.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(merged.join("etc/conf"))
        .unwrap();
    std::io::Write::write_all(&mut f, b"upper\n").unwrap();
    drop(f);
    assert_eq!(
        std::fs::read(upper.join("etc/conf")).unwrap(),
        b"lower\nupper\n"
    );
    let st = std::fs::metadata(upper.join("etc/conf")).unwrap();
    assert_eq!((st.mode() & 0o7777, st.uid(), st.gid()), (0o640, 1000, 50));
    assert_eq!(
        xattrs_of(&upper.join("etc/conf"))[&b"user.tag"[..]],
        b"kept"
    );
    assert_eq!(
        std::fs::read(lower.join("etc/conf")).unwrap(),
        b"lower\n",
        "the lower is untouched"
    );
    unmount_overlay().unwrap();
    fuse.unmount().unwrap();
}

#[test]
fn a_mount_point_must_be_an_empty_directory() {
    require_fuse();
    let tmp = tempfile::tempdir().unwrap();
    let store = open_store(tmp.path(), StoreOptions::default());
    let stack = store.stack(&[import(&store, &[file("f", b"f")])]).unwrap();
    let opts = FuseOptions::default();
    let busy = tmp.path().join("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("x"), b"x").unwrap();
    let e = FuseMount::mount(store.clone(), stack.clone(), &busy, &opts).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    let e = FuseMount::mount(store.clone(), stack, &tmp.path().join("none"), &opts).unwrap_err();
    assert_eq!(
        e.io_error().map(std::io::Error::kind),
        Some(std::io::ErrorKind::NotFound),
        "{e}"
    );
}

/// Set in the child process of `a_killed_server_leaves_no_mount_behind`: where to mount.
const CHILD_ENV: &str = "LAYERSTORE_FUSE_TEST_CHILD";

/// Not a test on its own: the server `a_killed_server_leaves_no_mount_behind` starts (this
/// test binary again, running only this function) and kills. Without the variable it does
/// nothing.
#[test]
fn helper_serve_until_killed() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let store = open_store(&dir, StoreOptions::default());
    let stack = store
        .stack(&[import(&store, &[file("served", b"by the child")])])
        .unwrap();
    let _fuse = mount(&store, stack, &dir.join("mnt"));
    println!("MOUNTED");
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// A child process, killed (SIGKILL) and reaped however the test ends.
struct Child(std::process::Child);

impl Child {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
    }
}

#[test]
fn a_killed_server_leaves_no_mount_behind() {
    require_fuse();
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    let mut child = Child(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "helper_serve_until_killed",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, tmp.path())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = BufReader::new(child.0.stdout.take().unwrap());
    // libtest writes "test NAME ... " before the test's own output, on the same line.
    let mounted = stdout
        .lines()
        .map_while(Result::ok)
        .any(|l| l.ends_with("MOUNTED"));
    assert!(mounted, "the child never mounted");
    assert_eq!(mounts_at(&mnt).len(), 1);
    assert_eq!(std::fs::read(mnt.join("served")).unwrap(), b"by the child");

    child.kill(); // SIGKILL: no destructor runs in the server
    let deadline = Instant::now() + Duration::from_secs(10);
    while !mounts_at(&mnt).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the mount outlived its killed server: {:?}",
            mounts_at(&mnt)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The mount point is a plain, usable directory again (not ENOTCONN).
    assert_eq!(std::fs::read_dir(&mnt).unwrap().count(), 0);
}
