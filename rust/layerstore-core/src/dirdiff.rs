//! The changeset from an image to a directory on disk, found by a parallel walk with a stat fast
//! path: what a build step changed, without importing the whole tree.
//!
//! Invariants:
//! - The walk is [`crate::fsio`]'s (parallel, same metadata, xattrs, skipped sockets). An entry
//!   is unchanged when kind, mode, owner, mtime (ns), xattrs, size and symlink target or device
//!   numbers all match the image's; only then is its content assumed equal. With
//!   `compare_content`, same-looking regular files are also hashed (BLAKE3) and compared with the
//!   image's digest. Nothing else reads file content.
//! - The changes follow [`crate::diff`]'s rules (whiteouts for what is gone, an opaque marker for
//!   a directory none of whose entries survived, hard-link groups emitted whole, archive order),
//!   and are written with the canonical tar writer, then imported like any tar: applying them over
//!   the image gives the directory's view. The directory's root itself is not compared.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use crate::changeset::{marker_member, member_path, Change, What};
use crate::diff::archive_order;
use crate::digest::Blake3;
use crate::error::{Error, IoContext, Result};
use crate::fsio::{self, DirOptions, Kind as FsKind, Node as FsNode, TarWriter};
use crate::layer::{Entry, Kind};
use crate::stack::Stack;
use crate::store::{ImportOptions, Imported, Progress, Store};
use crate::tarwrite;
use crate::union::{child_path, DirNode, Node};

/// Options of a directory comparison.
#[derive(Clone, Debug, Default)]
pub struct DirDiffOptions {
    pub dir: DirOptions,
    /// Hash regular files whose metadata matches, instead of trusting size and mtime.
    pub compare_content: bool,
    /// Clamp the emitted entries' mtimes to at most this (a `SOURCE_DATE_EPOCH`, in ns).
    pub clamp_mtime_ns: Option<i64>,
}

/// One change found: an entry is a walk node (its index: metadata and content are on disk).
pub type DirChange = Change<usize>;

/// The change that makes walk node `i` what it is on disk.
fn node_change(nodes: &[FsNode], i: usize) -> DirChange {
    Change {
        path: nodes[i].rel.clone(),
        what: What::Entry(i),
    }
}

fn marker_change(path: Vec<u8>, what: What<usize>) -> DirChange {
    Change { path, what }
}

/// The walk node of an entry change.
fn node_of(c: &DirChange) -> Option<usize> {
    match c.what {
        What::Entry(i) | What::Link { meta: i, .. } => Some(i),
        What::Whiteout | What::Opaque => None,
    }
}

/// The changes from an image to a directory.
pub struct DirDiff {
    root: PathBuf,
    nodes: Vec<FsNode>,
    pub changes: Vec<DirChange>,
    pub warnings: Vec<String>,
}

fn base_name(rel: &[u8]) -> &[u8] {
    rel.rsplit(|&b| b == b'/').next().unwrap_or(rel)
}

/// Metadata equal (content not looked at).
fn same_meta(n: &FsNode, e: &Entry) -> bool {
    let kind_ok = match (&n.kind, e.kind) {
        (FsKind::Dir, Kind::Dir) | (FsKind::File, Kind::File) | (FsKind::Fifo, Kind::Fifo) => true,
        (FsKind::Symlink(t), Kind::Symlink) => *t == e.link,
        (FsKind::Char(ma, mi), Kind::Char) | (FsKind::Block(ma, mi), Kind::Block) => {
            (*ma, *mi) == (e.devmajor, e.devminor)
        }
        _ => false,
    };
    kind_ok
        && n.mode == e.mode
        && u64::from(n.uid) == e.uid
        && u64::from(n.gid) == e.gid
        && n.mtime * 1_000_000_000 + i64::from(n.mtime_nsec) == e.mtime_ns
        && n.size == e.size
        && n.xattrs.len() == e.xattrs.len()
        && n.xattrs
            .iter()
            .all(|(k, v)| e.xattrs.get(k).is_some_and(|w| w == v))
}

fn hash_file(path: &Path) -> Result<Blake3> {
    let mut f = std::fs::File::open(path).ctx(|| format!("reading {}", path.display()))?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .ctx(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().into())
}

struct Walker<'a> {
    root: &'a Path,
    nodes: &'a [FsNode],
    opts: &'a DirDiffOptions,
    /// Directories (relative paths) that may differ below; the others are compared alone.
    descend: &'a (dyn Fn(&[u8]) -> bool + Sync),
    out: Vec<DirChange>,
}

impl Walker<'_> {
    fn unchanged(&self, node: &FsNode, view: &Node) -> Result<bool> {
        let meta = view.view().meta();
        if !same_meta(node, meta) {
            return Ok(false);
        }
        if self.opts.compare_content && matches!(node.kind, FsKind::File) {
            let digest = hash_file(&fsio::abs_path(self.root, &node.rel))?;
            return Ok(meta.digest == Some(digest));
        }
        Ok(true)
    }

    fn full(&mut self, i: usize) {
        self.out.push(node_change(self.nodes, i));
        for &c in &self.nodes[i].children {
            self.full(c);
        }
    }

    fn dir(&mut self, path: &[u8], a: &DirNode, b: usize) -> Result<()> {
        let nodes = self.nodes;
        let names: HashMap<&[u8], usize> = nodes[b]
            .children
            .iter()
            .map(|&c| (base_name(&nodes[c].rel), c))
            .collect();
        let mut kept = false;
        let mut gone = false;
        for (name, an) in a.children.iter() {
            match names.get(&name[..]) {
                None => gone = true,
                Some(&c) => {
                    let both_dirs =
                        matches!(an, Node::Dir(_)) && matches!(nodes[c].kind, FsKind::Dir);
                    kept |= both_dirs
                        || (matches!(an, Node::Leaf(_)) && self.unchanged(&nodes[c], an)?);
                }
            }
        }
        if gone && !kept {
            self.out.push(marker_change(path.to_vec(), What::Opaque));
            for &c in &nodes[b].children {
                self.full(c);
            }
            return Ok(());
        }
        for name in a.children.keys() {
            if !names.contains_key(&name[..]) {
                self.out
                    .push(marker_change(child_path(path, name), What::Whiteout));
            }
        }
        for &c in &nodes[b].children {
            let name = base_name(&nodes[c].rel);
            let is_dir = matches!(nodes[c].kind, FsKind::Dir);
            match (a.children.get(name), is_dir) {
                (None, _) | (Some(Node::Leaf(_)), true) => self.full(c),
                (Some(an @ Node::Dir(sub)), true) => {
                    if !same_meta(&nodes[c], an.view().meta()) {
                        self.out.push(node_change(nodes, c));
                    }
                    if (self.descend)(&nodes[c].rel) {
                        let sub = sub.clone();
                        self.dir(&nodes[c].rel, &sub, c)?;
                    }
                }
                (Some(Node::Dir(_)), false) => self.out.push(node_change(nodes, c)),
                (Some(an @ Node::Leaf(_)), false) => {
                    if !self.unchanged(&nodes[c], an)? {
                        self.out.push(node_change(nodes, c));
                    }
                }
            }
        }
        Ok(())
    }
}

impl DirDiff {
    /// Compare `root` (the new state) with `base` (the old).
    pub fn compare(base: &Stack, root: &Path, opts: &DirDiffOptions) -> Result<DirDiff> {
        Self::compare_where(base, root, opts, &|_| true)
    }

    /// [`DirDiff::compare`] where only the directories `descend` accepts can differ below
    /// themselves (a writable mount's, whose upper directory says which): the walk lists those
    /// and compares the others' own metadata only, so its cost follows what changed.
    pub fn compare_where(
        base: &Stack,
        root: &Path,
        opts: &DirDiffOptions,
        descend: &(dyn Fn(&[u8]) -> bool + Sync),
    ) -> Result<DirDiff> {
        let md = std::fs::metadata(root).ctx(|| format!("stat {}", root.display()))?;
        if !md.is_dir() {
            return Err(Error::InvalidLayer(format!(
                "{} is not a directory",
                root.display()
            )));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(opts.dir.max_threads.unwrap_or(0))
            .thread_name(|i| format!("layerstore-diff-{i}"))
            .build()
            .map_err(|e| Error::io("starting the directory walk", io::Error::other(e)))?;
        let mut warnings = Vec::new();
        let nodes =
            pool.install(|| fsio::scan_tree_where(root, &opts.dir, &mut warnings, descend))?;
        let mut walker = Walker {
            root,
            nodes: &nodes,
            opts,
            descend,
            out: Vec::new(),
        };
        walker.dir(b"", base.index.root(), 0)?;
        let mut changes = walker.out;
        keep_link_groups(&nodes, &mut changes);
        let key = |c: &DirChange| match node_of(c) {
            Some(i) => nodes[i].rel.clone(),
            None => member_path(c),
        };
        let mut keyed: Vec<(Vec<u8>, DirChange)> =
            changes.into_iter().map(|c| (key(&c), c)).collect();
        keyed.sort_by(|x, y| archive_order(&x.0, &y.0));
        Ok(DirDiff {
            root: root.to_path_buf(),
            nodes,
            changes: keyed.into_iter().map(|(_, c)| c).collect(),
            warnings,
        })
    }

    /// (kind, path) of each change: "entry", "link", "whiteout" or "opaque".
    pub fn listing(&self) -> Vec<(&'static str, Vec<u8>)> {
        let mut first: HashSet<(u64, u64)> = HashSet::new();
        self.changes
            .iter()
            .map(|c| match (node_of(c), &c.what) {
                (Some(i), _) => {
                    let n = &self.nodes[i];
                    let linked = n.nlink > 1
                        && !matches!(n.kind, FsKind::Dir)
                        && !first.insert((n.dev, n.ino));
                    (if linked { "link" } else { "entry" }, n.rel.clone())
                }
                (None, What::Whiteout) => ("whiteout", c.path.clone()),
                (None, _) => ("opaque", c.path.clone()),
            })
            .collect()
    }

    /// Clamp the mtimes of the entries to emit to at most `max_ns`.
    pub fn clamp_mtimes(&mut self, max_ns: i64) {
        for c in &self.changes {
            if let Some(i) = node_of(c) {
                let n = &mut self.nodes[i];
                if n.mtime * 1_000_000_000 + i64::from(n.mtime_nsec) > max_ns {
                    n.mtime = max_ns.div_euclid(1_000_000_000);
                    n.mtime_nsec = max_ns.rem_euclid(1_000_000_000) as u32;
                }
            }
        }
    }

    /// The changes as a canonical tar.
    pub fn write_tar<W: Write>(&self, out: W) -> Result<()> {
        let mut tw = TarWriter { out, written: 0 };
        let mut buf = vec![0u8; fsio::COPY_BUF];
        let mut first: HashMap<(u64, u64), usize> = HashMap::new();
        for c in &self.changes {
            match node_of(c) {
                Some(i) => {
                    let n = &self.nodes[i];
                    let mut link_to = None;
                    if n.nlink > 1 && !matches!(n.kind, FsKind::Dir) {
                        match first.get(&(n.dev, n.ino)) {
                            Some(&f) => link_to = Some(self.nodes[f].rel.as_slice()),
                            None => {
                                first.insert((n.dev, n.ino), i);
                            }
                        }
                    }
                    fsio::write_member(&mut tw, &self.root, n, link_to, &mut buf)?;
                }
                None => {
                    let path = member_path(c);
                    tw.put(&tarwrite::header(&marker_member(&path))?)?;
                }
            }
        }
        let tail = tarwrite::trailer(tw.written);
        tw.put(&tail)?;
        tw.out.flush().ctx(|| "writing tar stream".to_string())
    }
}

/// Every member of a hard-link group one of whose members changed is emitted.
fn keep_link_groups(nodes: &[FsNode], changes: &mut Vec<DirChange>) {
    let is_linked = |n: &FsNode| n.nlink > 1 && !matches!(n.kind, FsKind::Dir);
    let emitted: HashSet<usize> = changes.iter().filter_map(node_of).collect();
    let touched: HashSet<(u64, u64)> = emitted
        .iter()
        .map(|&i| &nodes[i])
        .filter(|n| is_linked(n))
        .map(|n| (n.dev, n.ino))
        .collect();
    if touched.is_empty() {
        return;
    }
    for (i, n) in nodes.iter().enumerate().skip(1) {
        if is_linked(n) && touched.contains(&(n.dev, n.ino)) && !emitted.contains(&i) {
            changes.push(node_change(nodes, i));
        }
    }
}

impl Store {
    /// Store the changes from `base` to the directory `root` as a layer.
    pub fn diff_dir(
        &self,
        base: &Stack,
        root: &Path,
        opts: &DirDiffOptions,
        progress: Progress<'_>,
    ) -> Result<Imported> {
        let diff = DirDiff::compare(base, root, opts)?;
        self.import_dir_diff(diff, opts, progress)
    }

    /// Store a directory comparison's changes as a layer.
    pub fn import_dir_diff(
        &self,
        mut diff: DirDiff,
        opts: &DirDiffOptions,
        progress: Progress<'_>,
    ) -> Result<Imported> {
        if let Some(max) = opts.clamp_mtime_ns {
            diff.clamp_mtimes(max);
        }
        let (reader, writer) = io::pipe().ctx(|| "creating a pipe".into())?;
        let producer: JoinHandle<Result<DirDiff>> = std::thread::spawn(move || {
            diff.write_tar(io::BufWriter::with_capacity(1 << 20, writer))?;
            Ok(diff)
        });
        let imported = self.import_tar(Box::new(reader), &ImportOptions::default(), progress);
        let produced = producer.join().map_err(|_| Error::Panicked {
            what: "changeset writer",
        })?;
        let diff = produced?;
        let mut imported = imported?;
        imported.warnings.extend(diff.warnings);
        Ok(imported)
    }
}
