//! The inode table of a FUSE mount: which number the kernel knows each path of the view by.
//!
//! Invariants: the root is inode 1; any other inode is numbered when the kernel first learns its
//! path (a lookup or a directory listing) and keeps that number for the life of the mount, so
//! one path always has one number. The paths that show one inode entry of the view (a hardlink
//! group: `ViewEntry::meta` is the same `Entry`) share one number, whichever the kernel learns
//! first. Numbers are never reused, so the generation is always 0.

use std::collections::HashMap;
use std::sync::Arc;

use crate::layer::Kind;
use crate::union::{DirNode, Index, Name, Node, ViewEntry};

/// `HashMap` with the crate's seeded hasher (names come from untrusted layers).
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// The number of the root directory (FUSE's `FUSE_ROOT_ID`).
const ROOT: u64 = 1;

/// What the kernel knows by one inode number.
#[derive(Clone, Debug)]
pub(super) struct Inode {
    /// The first path's node (for a hardlink group, every path shows the same metadata).
    pub(super) node: Node,
    /// The directory holding it (a directory's `..`; the root is its own parent).
    pub(super) parent: u64,
    /// `st_nlink`: 2 + subdirectories for a directory, the paths sharing it for anything else.
    pub(super) nlink: u32,
}

/// An inode entry's identity within one view: the address of the `Entry` its paths show
/// (stable, since the mount keeps the stack and so every entry alive).
fn inode_key(view: &ViewEntry) -> usize {
    std::ptr::from_ref(view.meta()) as usize
}

/// How many paths show each inode entry that a hardlink shares (entries no hardlink names are
/// on one path and not counted). One pass over the whole view, at mount.
#[derive(Debug, Default)]
pub(super) struct LinkCounts(Map<usize, u32>);

impl LinkCounts {
    pub(super) fn of(index: &Index) -> Self {
        let mut counts: Map<usize, u32> = index
            .paths()
            .filter_map(|(_, v)| v.target.as_deref())
            .map(|target| (std::ptr::from_ref(target) as usize, 0))
            .collect();
        if !counts.is_empty() {
            for (_, v) in index.paths() {
                if let Some(n) = counts.get_mut(&inode_key(v)) {
                    *n = n.saturating_add(1);
                }
            }
        }
        LinkCounts(counts)
    }

    /// The paths sharing `view`'s inode, when it is shared.
    fn shared(&self, view: &ViewEntry) -> Option<(usize, u32)> {
        let key = inode_key(view);
        self.0.get(&key).map(|&n| (key, n))
    }
}

/// `st_nlink` of a directory: `.`, its name in its parent, and each subdirectory's `..` (what
/// ext4 and tmpfs report, so a materialized tree shows the same).
fn dir_nlink(dir: &DirNode) -> u32 {
    let subdirs = dir
        .children
        .values()
        .filter(|c| matches!(c, Node::Dir(_)))
        .count();
    u32::try_from(subdirs.saturating_add(2)).unwrap_or(u32::MAX)
}

/// Every inode the kernel has learned, by number.
#[derive(Debug)]
pub(super) struct Inodes {
    /// Inode `n` is `nodes[n - 1]`.
    nodes: Vec<Inode>,
    /// (parent, name) → number: a path's number.
    by_name: Map<(u64, Name), u64>,
    /// Inode entry of a hardlink group → number.
    by_entry: Map<usize, u64>,
    links: LinkCounts,
}

impl Inodes {
    pub(super) fn new(root: Arc<DirNode>, links: LinkCounts) -> Self {
        let nlink = dir_nlink(&root);
        Inodes {
            nodes: vec![Inode {
                node: Node::Dir(root),
                parent: ROOT,
                nlink,
            }],
            by_name: Map::default(),
            by_entry: Map::default(),
            links,
        }
    }

    pub(super) fn get(&self, ino: u64) -> Option<&Inode> {
        let at = usize::try_from(ino.checked_sub(1)?).ok()?;
        self.nodes.get(at)
    }

    /// The number of `name` in directory `parent`, if the kernel has learned it.
    pub(super) fn known(&self, parent: u64, name: &Name) -> Option<u64> {
        self.by_name.get(&(parent, name.clone())).copied()
    }

    /// Number `node`, found as `name` in directory `parent` (the caller checked it is not
    /// known): a path of a hardlink group another path of which is known gets that number.
    pub(super) fn add(&mut self, parent: u64, name: Name, node: &Node) -> u64 {
        let shared = match node {
            Node::Leaf(v) => self.links.shared(v),
            Node::Dir(_) => None,
        };
        let ino = match shared.and_then(|(key, _)| self.by_entry.get(&key)) {
            Some(&ino) => ino,
            None => {
                let nlink = match (node, shared) {
                    (Node::Dir(d), _) => dir_nlink(d),
                    (Node::Leaf(_), Some((_, n))) => n,
                    (Node::Leaf(_), None) => 1,
                };
                self.nodes.push(Inode {
                    node: node.clone(),
                    parent,
                    nlink,
                });
                let ino = self.nodes.len() as u64;
                if let Some((key, _)) = shared {
                    self.by_entry.insert(key, ino);
                }
                ino
            }
        };
        self.by_name.insert((parent, name), ino);
        ino
    }
}

/// The kind of what `node` shows (a hardlink shows its target's).
pub(super) fn kind_of(node: &Node) -> Kind {
    node.view().meta().kind
}
