//! The changeset between two union views, computed from their indices alone (no content read:
//! regular files compare by size and BLAKE3 digest).
//!
//! Invariants of [`diff_indices`]`(a, b)`: applying the changes over `a` gives exactly `b`'s
//! view (`view(a + diff) == view(b)`), and the changeset is minimal and deterministic:
//! - Subtrees the two indices share (the same `Arc`, as a stack and a container over it do) are
//!   skipped without being walked; unchanged entries are left out; a metadata-only change is
//!   one entry without content change; a path only in `a` is an explicit whiteout.
//! - A directory whose every lower child is gone or replaced in `b`, at least one gone (deleted
//!   and recreated), gets an opaque marker and its full `b` content instead of one whiteout per
//!   child.
//! - Hard-link groups of `b` survive: when one member changes, every member is emitted, the first
//!   in archive order as the inode (a regular file, or a symlink, device or fifo) and the others
//!   as links to it; a link whose group has one member left becomes a plain entry.
//! - Implicit directories of `b` are not emitted where their children imply them and they
//!   replace nothing.
//! - Changes come in archive order: depth-first, siblings sorted by member name bytes.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::Arc;

use crate::changeset::{member_path, Change, What};
use crate::layer::{Entry, Kind};
use crate::union::{child_path, DirNode, Index, Node, ViewEntry};

/// Same view-visible metadata and content (uname/gname are tar decoration, not compared).
pub fn same_meta(x: &Entry, y: &Entry) -> bool {
    x.kind == y.kind
        && x.mode == y.mode
        && x.uid == y.uid
        && x.gid == y.gid
        && x.mtime_ns == y.mtime_ns
        && x.size == y.size
        && x.link == y.link
        && x.devmajor == y.devmajor
        && x.devminor == y.devminor
        && x.xattrs == y.xattrs
        && match (x.digest, y.digest) {
            (Some(a), Some(b)) => a == b,
            // A container-written file has no digest yet: its chunk list is its identity.
            _ => x.chunks == y.chunks,
        }
}

/// Two leaves show the same thing (and are links, or not, alike).
fn same_leaf(x: &ViewEntry, y: &ViewEntry) -> bool {
    let link = |v: &ViewEntry| (v.entry.kind == Kind::Hardlink).then(|| v.entry.link.clone());
    link(x) == link(y) && same_meta(x.meta(), y.meta())
}

struct Differ {
    out: Vec<Change>,
}

impl Differ {
    fn leaf(&mut self, path: Vec<u8>, view: &Arc<ViewEntry>) {
        // The shared meta (not a copy): the link-group pass matches peers by pointer.
        self.out.push(Change {
            path,
            what: What::Entry(view_meta(view)),
        });
    }

    /// Emit `node` and everything below it.
    fn full(&mut self, path: Vec<u8>, node: &Node, replaces: bool) {
        match node {
            Node::Leaf(v) => self.leaf(path, v),
            Node::Dir(d) => {
                // An implicit directory comes back implicitly through its children; an empty
                // one, or one that replaces something, must be declared.
                if !d.meta.is_implicit() || replaces || d.children.is_empty() {
                    self.out.push(Change {
                        path: path.clone(),
                        what: What::Entry(d.meta.entry.clone()),
                    });
                }
                for (name, child) in d.children.iter() {
                    self.full(child_path(&path, name), child, false);
                }
            }
        }
    }

    fn dir(&mut self, path: &[u8], a: &DirNode, b: &DirNode) {
        let kept = |name: &[u8], an: &Node| match (an, b.children.get(name)) {
            (_, None) => false,
            (Node::Dir(_), Some(Node::Dir(_))) => true,
            (Node::Leaf(x), Some(Node::Leaf(y))) => Arc::ptr_eq(x, y) || same_leaf(x, y),
            _ => false,
        };
        let gone = a.children.keys().any(|name| !b.children.contains_key(name));
        let opaque = gone && !a.children.iter().any(|(name, an)| kept(name, an));
        if opaque {
            self.out.push(Change {
                path: path.to_vec(),
                what: What::Opaque,
            });
            for (name, bn) in b.children.iter() {
                self.full(child_path(path, name), bn, false);
            }
            return;
        }
        for name in a.children.keys() {
            if !b.children.contains_key(name) {
                self.out.push(Change {
                    path: child_path(path, name),
                    what: What::Whiteout,
                });
            }
        }
        for (name, bn) in b.children.iter() {
            let p = child_path(path, name);
            match (a.children.get(name), bn) {
                (None, _) => self.full(p, bn, false),
                (Some(Node::Dir(x)), Node::Dir(y)) => {
                    if Arc::ptr_eq(x, y) {
                        continue;
                    }
                    if !same_meta(&x.meta.entry, &y.meta.entry) {
                        self.out.push(Change {
                            path: p.clone(),
                            what: What::Entry(y.meta.entry.clone()),
                        });
                    }
                    self.dir(&p, x, y);
                }
                (Some(Node::Leaf(_)), Node::Dir(_)) => self.full(p, bn, true),
                (Some(Node::Dir(_)), Node::Leaf(y)) => self.leaf(p, y),
                (Some(Node::Leaf(x)), Node::Leaf(y)) => {
                    if !(Arc::ptr_eq(x, y) || same_leaf(x, y)) {
                        self.leaf(p, y);
                    }
                }
            }
        }
    }
}

/// The entry a view shows, shared with its link-group peers (a link's target, else itself).
fn view_meta(view: &ViewEntry) -> Arc<Entry> {
    view.target.clone().unwrap_or_else(|| view.entry.clone())
}

/// Component-wise order of member paths: depth-first pre-order with siblings by name bytes.
pub(crate) fn archive_order(a: &[u8], b: &[u8]) -> Ordering {
    a.split(|&c| c == b'/').cmp(b.split(|&c| c == b'/'))
}

/// The changes taking `a`'s view to `b`'s, in archive order.
pub fn diff_indices(a: &Index, b: &Index) -> Vec<Change> {
    let mut d = Differ { out: Vec::new() };
    let (ra, rb) = (a.root(), b.root());
    if !Arc::ptr_eq(ra, rb) {
        if !same_meta(&ra.meta.entry, &rb.meta.entry) && !rb.meta.is_implicit() {
            d.out.push(Change {
                path: Vec::new(),
                what: What::Entry(rb.meta.entry.clone()),
            });
        }
        d.dir(b"", ra, rb);
    }
    let mut out = d.out;
    keep_link_groups(b, &mut out);
    // The root's own entry sorts first.
    let key = |c: &Change| match c.what {
        What::Entry(_) if c.path.is_empty() => Vec::new(),
        _ => member_path(c),
    };
    let mut keyed: Vec<(Vec<u8>, Change)> = out.into_iter().map(|c| (key(&c), c)).collect();
    keyed.sort_by(|x, y| archive_order(&x.0, &y.0));
    keyed.into_iter().map(|(_, c)| c).collect()
}

/// Re-emit whole hard-link groups of `b` that the changes touch (see the module invariants).
fn keep_link_groups(b: &Index, out: &mut Vec<Change>) {
    // Groups exist only where some path of the view is a link.
    let heads: HashMap<*const Entry, ()> = b
        .paths()
        .filter_map(|(_, v)| v.target.as_ref().map(|t| (Arc::as_ptr(t), ())))
        .collect();
    // A group's inode is a regular file, or a symlink, device or fifo (GNU tar archives
    // hardlinked symlinks as links): every kind a link can share, never a directory.
    let key = |c: &Change| match &c.what {
        What::Entry(e) if e.kind != Kind::Dir => Some(Arc::as_ptr(e)),
        _ => None,
    };
    let touched: Vec<*const Entry> = out
        .iter()
        .filter_map(key)
        .filter(|k| heads.contains_key(k))
        .collect();
    if touched.is_empty() {
        // A changed single link (its peers gone) is already a plain file entry.
        return;
    }
    let mut groups: HashMap<*const Entry, Vec<Vec<u8>>> =
        touched.iter().map(|k| (*k, Vec::new())).collect();
    let mut metas: HashMap<*const Entry, Arc<Entry>> = HashMap::new();
    for (path, v) in b.paths() {
        let m = view_meta(v);
        if v.meta().kind == Kind::Dir {
            continue;
        }
        if let Some(members) = groups.get_mut(&Arc::as_ptr(&m)) {
            members.push(path.to_vec());
            metas.insert(Arc::as_ptr(&m), m);
        }
    }
    out.retain(|c| !key(c).is_some_and(|k| groups.contains_key(&k)));
    for (k, mut members) in groups {
        members.sort_by(|x, y| archive_order(x, y));
        let meta = metas[&k].clone();
        let first = members[0].clone();
        out.push(Change {
            path: first.clone(),
            what: What::Entry(meta.clone()),
        });
        for p in members.into_iter().skip(1) {
            out.push(Change {
                path: p,
                what: What::Link {
                    target: first.clone(),
                    meta: meta.clone(),
                },
            });
        }
    }
}
