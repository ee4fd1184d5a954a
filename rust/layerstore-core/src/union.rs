//! The union view of a stack: a persistent directory trie answering every lookup top-down.
//!
//! Invariants: a stack's [`Index`] is its parent's plus one layer's changes, built by path
//! copying — only the directories a layer touches are copied, everything else is shared
//! (persistent `imbl` hash-map children, `Arc` nodes), so a push costs O(that layer) and many images over one
//! base share its memory. Markers are applied before the layer's own entries, so the result does
//! not depend on tar order and a layer's entries always survive its own whiteouts. Whiteout and
//! opaque markers and AUFS metadata names are never part of the view.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};

use imbl::shared_ptr::DefaultSharedPtr;
use imbl::GenericHashMap;

use crate::changeset;
pub use crate::changeset::is_aufs_meta;
use crate::error::{Error, Result};
use crate::frozen::FrozenMap;
use crate::layer::{Entry, Kind};
pub use crate::paths::{child_path, components, split_parent};

/// A path component.
pub type Name = Arc<[u8]>;

/// A directory's children: a persistent hash map (one hash and one compare per lookup; sorted
/// only when listed), seeded per map so crafted names cannot force collisions.
pub type Children = GenericHashMap<Name, Node, foldhash::fast::RandomState, DefaultSharedPtr>;

/// What a path resolves to.
#[derive(Clone, Debug)]
pub struct ViewEntry {
    /// The entry that provides the path (for a hardlink: the link itself).
    pub entry: Arc<Entry>,
    /// For a hardlink: the regular file whose inode it shares (metadata and content).
    pub target: Option<Arc<Entry>>,
    /// Index of the providing layer (bottom = 0); `None` for an implicit directory.
    pub layer: Option<u32>,
}

impl ViewEntry {
    /// The metadata and content the view shows (a hardlink shows its target's).
    pub fn meta(&self) -> &Entry {
        self.target.as_deref().unwrap_or(&self.entry)
    }

    pub fn is_implicit(&self) -> bool {
        self.layer.is_none()
    }
}

#[derive(Clone, Debug)]
pub enum Node {
    Leaf(Arc<ViewEntry>),
    Dir(Arc<DirNode>),
}

impl Node {
    pub fn view(&self) -> &Arc<ViewEntry> {
        match self {
            Node::Leaf(v) => v,
            Node::Dir(d) => &d.meta,
        }
    }
}

impl Node {
    /// The same subtree with every entry credited to `layer` (a rename in a container moves
    /// lower entries into its writable layer). Copies the subtree.
    pub fn relabeled(&self, layer: u32) -> Node {
        let relabel = |v: &Arc<ViewEntry>| {
            Arc::new(ViewEntry {
                entry: v.entry.clone(),
                target: v.target.clone(),
                layer: Some(layer),
            })
        };
        match self {
            Node::Leaf(v) => Node::Leaf(relabel(v)),
            Node::Dir(d) => {
                let children = d
                    .children
                    .iter()
                    .map(|(k, c)| (k.clone(), c.relabeled(layer)))
                    .collect();
                Node::Dir(Arc::new(DirNode::new(relabel(&d.meta), children)))
            }
        }
    }
}

static DIR_NODES: AtomicI64 = AtomicI64::new(0);

/// Live directory nodes in this process (a debug counter for structural-sharing tests).
pub fn live_dir_nodes() -> i64 {
    DIR_NODES.load(Ordering::Relaxed)
}

#[derive(Debug)]
pub struct DirNode {
    pub meta: Arc<ViewEntry>,
    pub children: Children,
}

impl DirNode {
    fn new(meta: Arc<ViewEntry>, children: Children) -> Self {
        DIR_NODES.fetch_add(1, Ordering::Relaxed);
        DirNode { meta, children }
    }

    fn implicit() -> Arc<Self> {
        Arc::new(DirNode::new(implicit_dir(), Children::default()))
    }
}

impl DirNode {
    /// Children in name order (what listings and walks show).
    pub fn sorted(&self) -> Vec<(&Name, &Node)> {
        let mut v: Vec<(&Name, &Node)> = self.children.iter().collect();
        v.sort_unstable_by(|a, b| a.0.cmp(b.0));
        v
    }
}

impl Clone for DirNode {
    fn clone(&self) -> Self {
        DirNode::new(self.meta.clone(), self.children.clone())
    }
}

impl Drop for DirNode {
    fn drop(&mut self) {
        DIR_NODES.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A directory no layer declares: 0755, root-owned, mtime 0.
fn implicit_dir() -> Arc<ViewEntry> {
    static IMPLICIT: OnceLock<Arc<ViewEntry>> = OnceLock::new();
    IMPLICIT
        .get_or_init(|| {
            Arc::new(ViewEntry {
                entry: Arc::new(Entry::new(Vec::new(), Kind::Dir, b'5', 0o755)),
                target: None,
                layer: None,
            })
        })
        .clone()
}

/// The most symlinks one lookup follows (Linux's limit), after which it fails with ELOOP.
pub const MAX_SYMLINKS: usize = 40;

/// A merged path → entry view.
#[derive(Clone, Debug)]
pub struct Index {
    root: Arc<DirNode>,
    /// Every path of the view below the root → what it shows: one hash lookup answers a stat
    /// whose path has no symlink on the way. Kept in step with the trie by every edit.
    flat: Flat,
    /// A lookup-only copy of `flat` ([`FrozenMap`]), built once an index has served enough
    /// lookups to pay for it (a persistent map's lookup walks several nodes; this one probes
    /// once). Every edit drops it; clones share it.
    frozen: Arc<Frozen>,
}

/// Lookups an index serves from its persistent map before it builds its frozen copy.
const FREEZE_AFTER: usize = 64;

/// A lookup-only copy of a flat map (one probe per lookup).
/// (`None` for a view past the map's limits, which then keeps probing its persistent map.)
fn freeze(flat: &Flat) -> Option<FrozenMap<Arc<ViewEntry>>> {
    FrozenMap::new(flat.len(), flat.iter().map(|(k, v)| (&k[..], v.clone())))
}

/// The lazily built read-only copy of an index's flat map.
#[derive(Debug, Default)]
struct Frozen {
    served: std::sync::atomic::AtomicUsize,
    map: OnceLock<Option<FrozenMap<Arc<ViewEntry>>>>,
}

/// Full normalised path → view entry (persistent, shared between stacks like the trie).
pub type Flat = GenericHashMap<Name, Arc<ViewEntry>, foldhash::fast::RandomState, DefaultSharedPtr>;

impl Default for Index {
    fn default() -> Self {
        Index {
            root: DirNode::implicit(),
            flat: Flat::default(),
            frozen: Arc::default(),
        }
    }
}

/// Drop the entries a later entry of the same tar replaced by a non-directory at one of their
/// ancestors, as extraction does: a directory `y`, then `y/c.txt`, then a regular file `y`
/// leave `y` a file and no `y/c.txt` (the same as across two layers).
fn drop_replaced(order: &mut Vec<(usize, &Arc<Entry>)>) {
    let non_dirs: HashMap<&[u8], usize> = order
        .iter()
        .filter(|(_, e)| e.kind != Kind::Dir)
        .map(|&(pos, e)| (e.path.as_slice(), pos))
        .collect();
    if non_dirs.is_empty() {
        return;
    }
    order.retain(|&(pos, e)| {
        let path = e.path.as_slice();
        !path
            .iter()
            .enumerate()
            .filter(|&(_, &b)| b == b'/')
            .any(|(i, _)| non_dirs.get(&path[..i]).is_some_and(|&at| at > pos))
    });
}

/// A layer's entries by path: every (tar position, entry) of the path, in tar order.
type ByPath<'a> = HashMap<&'a [u8], Vec<(usize, &'a Arc<Entry>)>, foldhash::fast::RandomState>;

/// What `lookup_view` finds: the resolved path (`None`: the input itself) and its entry.
pub type Found = (Option<Vec<u8>>, Arc<ViewEntry>);

/// The outcome of resolving a path.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// The path after symlinks were followed (normalised, relative to the root); `None` when
    /// no symlink was followed, so it is the normalised input.
    pub path: Option<Vec<u8>>,
    pub node: Node,
}

impl Index {
    /// The flat map's entry for `path`, from the frozen plain copy once it is built. The copy
    /// is built once an index has served [`FREEZE_AFTER`] lookups: on another core while this
    /// one goes on probing the persistent map (a batch of stats never waits for it), or inline
    /// after about an eighth of its size in lookups on a single core (amortised: at most eight
    /// probes' worth per lookup served).
    fn flat_get(&self, path: &[u8]) -> Option<&Arc<ViewEntry>> {
        match self.frozen.map.get() {
            Some(Some(map)) => return map.get(path),
            Some(None) => return self.flat.get(path),
            None => {}
        }
        let served = self.frozen.served.fetch_add(1, Ordering::Relaxed);
        if crate::cores() > 1 {
            if served == FREEZE_AFTER {
                let (flat, frozen) = (self.flat.clone(), self.frozen.clone());
                crate::pool::shared().spawn(move || {
                    frozen.map.get_or_init(|| freeze(&flat));
                });
            }
        } else if served > FREEZE_AFTER + self.flat.len() / 8 {
            if let Some(map) = self.frozen.map.get_or_init(|| freeze(&self.flat)) {
                return map.get(path);
            }
        }
        self.flat.get(path)
    }

    /// Forget the frozen copy (before any edit).
    fn thaw(&mut self) {
        if self.frozen.map.get().is_some() || Arc::strong_count(&self.frozen) > 1 {
            self.frozen = Arc::default();
        }
    }

    /// What a normalised path shows (for `stat`): one hash lookup when no symlink or `..` is on
    /// the way, the full resolver otherwise. The path is `None` when it is the input itself.
    pub fn lookup_view(&self, path: &[u8], follow_last: bool) -> Result<Option<Found>> {
        if path.is_empty() {
            return Ok(Some((None, self.root.meta.clone())));
        }
        // Keys are normalised entry paths (never `..`), reached through directories only.
        if let Some(v) = self.flat_get(path) {
            if !(follow_last && v.meta().kind == Kind::Symlink) {
                return Ok(Some((None, v.clone())));
            }
        }
        Ok(self
            .resolve(path, follow_last)?
            .map(|r| (r.path, r.node.view().clone())))
    }

    /// Look a normalised path up without following symlinks.
    pub fn lookup(&self, path: &[u8]) -> Option<Node> {
        let mut node = Node::Dir(self.root.clone());
        for comp in components(path) {
            let Node::Dir(dir) = &node else { return None };
            node = dir.children.get(comp)?.clone();
        }
        Some(node)
    }

    /// Resolve a path inside the image root: absolute symlink targets start at the root, `..`
    /// stops at the root, intermediate symlinks are always followed and the last one only when
    /// `follow_last`. `Ok(None)` when nothing is there (or a non-directory is in the way).
    pub fn resolve(&self, path: &[u8], follow_last: bool) -> Result<Option<Resolved>> {
        // Fast path: no symlink on the way (the common case) needs no allocation but the result.
        let mut node: Option<&Node> = None;
        let mut dir: &Arc<DirNode> = &self.root;
        let mut comps = components(path).peekable();
        let mut plain = true;
        while let Some(c) = comps.next() {
            if c == b".." {
                plain = false;
                break;
            }
            let Some(child) = dir.children.get(c) else {
                return Ok(None);
            };
            match child {
                Node::Dir(d) => dir = d,
                Node::Leaf(v) => {
                    let last = comps.peek().is_none();
                    if v.meta().kind == Kind::Symlink && (!last || follow_last) {
                        plain = false;
                        break;
                    }
                    if !last {
                        return Ok(None);
                    }
                }
            }
            node = Some(child);
        }
        if plain {
            let node = node
                .cloned()
                .unwrap_or_else(|| Node::Dir(self.root.clone()));
            return Ok(Some(Resolved { path: None, node }));
        }
        self.resolve_slow(path, follow_last)
    }

    fn resolve_slow(&self, path: &[u8], follow_last: bool) -> Result<Option<Resolved>> {
        let mut pending: Vec<Vec<u8>> = components(path).rev().map(<[u8]>::to_vec).collect();
        let mut chain: Vec<(Vec<u8>, Arc<DirNode>)> = vec![(Vec::new(), self.root.clone())];
        let mut followed = 0;
        while let Some(comp) = pending.pop() {
            if comp == b".." {
                if chain.len() > 1 {
                    chain.pop();
                }
                continue;
            }
            let dir = chain.last().expect("root stays").1.clone();
            let Some(child) = dir.children.get(&comp[..]) else {
                return Ok(None);
            };
            match child {
                Node::Dir(d) => {
                    let d = d.clone();
                    chain.push((comp, d));
                }
                Node::Leaf(v) => {
                    let is_last = pending.is_empty();
                    if v.meta().kind == Kind::Symlink && (!is_last || follow_last) {
                        followed += 1;
                        if followed > MAX_SYMLINKS {
                            return Err(Error::io(
                                format!(
                                    "too many levels of symbolic links: {}",
                                    String::from_utf8_lossy(path)
                                ),
                                std::io::Error::from_raw_os_error(
                                    rustix::io::Errno::LOOP.raw_os_error(),
                                ),
                            ));
                        }
                        let target = &v.meta().link;
                        if target.is_empty() {
                            return Ok(None); // as the kernel: an empty target names nothing
                        }
                        if target.first() == Some(&b'/') {
                            chain.truncate(1);
                        }
                        pending.extend(components(target).rev().map(<[u8]>::to_vec));
                        continue;
                    }
                    if !is_last {
                        return Ok(None);
                    }
                    let mut full = join(chain.iter().skip(1).map(|(n, _)| &n[..]));
                    if !full.is_empty() {
                        full.push(b'/');
                    }
                    full.extend_from_slice(&comp);
                    return Ok(Some(Resolved {
                        path: Some(full),
                        node: child.clone(),
                    }));
                }
            }
        }
        let (_, dir) = chain.last().expect("root stays");
        Ok(Some(Resolved {
            path: Some(join(chain.iter().skip(1).map(|(n, _)| &n[..]))),
            node: Node::Dir(dir.clone()),
        }))
    }

    /// This index with one more layer on top. `entries` are the layer's entries in tar order.
    pub fn apply(&self, layer: u32, entries: &[Arc<Entry>]) -> Result<Index> {
        let mut next = self.clone();
        next.apply_mut(layer, entries)?;
        Ok(next)
    }

    /// `apply` in place: when nothing else shares this index, nodes are edited rather than
    /// copied (building a stack from scratch). On error the index is unchanged.
    pub fn apply_mut(&mut self, layer: u32, entries: &[Arc<Entry>]) -> Result<()> {
        // Every entry of a path, in tar order (the last one is the view's); markers and AUFS
        // metadata are not entries of the view.
        let mut by_path = ByPath::default();
        let mut markers = Vec::new();
        for (pos, e) in entries.iter().enumerate() {
            match e.kind {
                Kind::Whiteout | Kind::Opaque => markers.push(e),
                Kind::Other(_) => {}
                _ if is_aufs_meta(&e.path) => {}
                _ => by_path.entry(&e.path).or_default().push((pos, e)),
            }
        }
        let mut order: Vec<(usize, &Arc<Entry>)> =
            by_path.values().filter_map(|v| v.last().copied()).collect();
        order.sort_by(|a, b| a.1.path.cmp(&b.1.path));
        drop_replaced(&mut order);
        // Hardlinks resolve against the view below, so before any edit (and an error here
        // leaves the index as it was).
        let mut views = Vec::with_capacity(order.len());
        for &(pos, e) in &order {
            let target = match e.kind {
                Kind::Hardlink => Some(self.link_target(pos, e, &by_path)?),
                _ => None,
            };
            views.push(Arc::new(ViewEntry {
                entry: e.clone(),
                target,
                layer: Some(layer),
            }));
        }
        self.thaw();
        let Index { root, flat, .. } = self;
        for e in markers {
            let (dir, name) = split_parent(&e.path);
            if e.kind == Kind::Opaque {
                clear_children(root, flat, dir);
                continue;
            }
            let mut target = dir.to_vec();
            if !target.is_empty() {
                target.push(b'/');
            }
            target.extend_from_slice(changeset::hidden_name(name));
            remove(root, flat, &target);
        }
        for ((_, e), view) in order.into_iter().zip(views) {
            insert(root, flat, &e.path, view);
        }
        Ok(())
    }

    /// The inode a hardlink shares — a regular file, or a symlink, device or fifo (GNU tar
    /// archives hardlinked symlinks that way). As extraction would: the last entry of the target
    /// path written *before* the link in the same tar, else the path in the view below; a later
    /// replacement of the target does not change what the link holds.
    fn link_target(
        &self,
        link_pos: usize,
        link: &Entry,
        by_path: &ByPath<'_>,
    ) -> Result<Arc<Entry>> {
        let (mut pos, mut path): (usize, &[u8]) = (link_pos, &link.link);
        for _ in 0..MAX_SYMLINKS {
            let earlier = by_path
                .get(path)
                .and_then(|v| v.iter().rev().find(|(p, _)| *p < pos));
            match earlier {
                Some((p, e)) if e.kind == Kind::Hardlink => (pos, path) = (*p, &e.link),
                Some((_, e)) if e.kind != Kind::Dir => return Ok((*e).clone()),
                Some(_) => break,
                None => {
                    if let Some(Node::Leaf(v)) = self.lookup(path) {
                        return Ok(v.target.clone().unwrap_or_else(|| v.entry.clone()));
                    }
                    break;
                }
            }
        }
        Err(Error::InvalidLayer(format!(
            "hardlink {:?} points at {:?}, which is neither earlier in its layer nor below (or is a directory)",
            String::from_utf8_lossy(&link.path),
            String::from_utf8_lossy(&link.link)
        )))
    }

    /// Whether the flat map holds exactly the trie's paths with the same entries (for tests).
    pub fn flat_is_consistent(&self) -> bool {
        let mut seen = 0usize;
        let mut ok = true;
        self.walk(b"", |path, node| {
            if path.is_empty() {
                return;
            }
            seen += 1;
            ok &= self
                .flat
                .get(path)
                .is_some_and(|v| Arc::ptr_eq(v, node.view()));
        });
        ok && seen == self.flat.len()
    }

    /// The root directory.
    pub fn root(&self) -> &Arc<DirNode> {
        &self.root
    }

    /// Bytes of file content the view shows, each inode once (a hardlink adds nothing): what
    /// writing the view out writes, the total of a materialize's progress.
    pub fn content_bytes(&self) -> u64 {
        self.flat
            .values()
            .filter(|v| v.target.is_none() && v.entry.kind == Kind::File)
            .map(|v| v.entry.size)
            .sum()
    }

    /// Every path of the view (unordered) with what it shows.
    pub fn paths(&self) -> impl Iterator<Item = (&Name, &Arc<ViewEntry>)> {
        self.flat.iter()
    }

    /// Put `view` at `path` (an edit of a writable view): over a directory, a directory keeps
    /// the children and takes the new attributes; anything else replaces what was there.
    /// Missing parents become implicit directories.
    pub fn put(&mut self, path: &[u8], view: Arc<ViewEntry>) {
        self.thaw();
        insert(&mut self.root, &mut self.flat, path, view);
    }

    /// Remove `path` and everything below it (nothing happens when it is absent).
    pub fn remove_path(&mut self, path: &[u8]) {
        self.thaw();
        remove(&mut self.root, &mut self.flat, path);
    }

    /// Put a whole subtree at `path` (whose parent must be a directory), replacing what was
    /// there: how a rename moves a directory.
    pub fn graft(&mut self, path: &[u8], node: Node) {
        self.thaw();
        self.remove_path(path);
        let (parent, name) = split_parent(path);
        let comps: Vec<&[u8]> = components(parent).collect();
        let mut added: Vec<(Name, Arc<ViewEntry>)> = Vec::new();
        let mut at = path.to_vec();
        walk_node(&mut at, &node, &mut |p, n| {
            added.push((Name::from(p), n.view().clone()));
        });
        if let Some(dir) = dir_mut(&mut self.root, &comps) {
            Arc::make_mut(dir).children.insert(Name::from(name), node);
            for (p, v) in added {
                self.flat.insert(p, v);
            }
        }
    }

    /// Every path of the view under `dir` (pre-order, sorted), with its node.
    pub fn walk(&self, start: &[u8], mut visit: impl FnMut(&[u8], &Node)) {
        let Some(node) = self.lookup(start) else {
            return;
        };
        let mut path = start.to_vec();
        walk_node(&mut path, &node, &mut visit);
    }
}

fn walk_node(path: &mut Vec<u8>, node: &Node, visit: &mut impl FnMut(&[u8], &Node)) {
    visit(path, node);
    if let Node::Dir(d) = node {
        for (name, child) in d.sorted() {
            let len = path.len();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(name);
            walk_node(path, child, visit);
            path.truncate(len);
        }
    }
}

fn join<'a>(parts: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        if !out.is_empty() {
            out.push(b'/');
        }
        out.extend_from_slice(p);
    }
    out
}

/// The directory at `comps`, copied on the way down, if every component is a directory.
fn dir_mut<'a>(dir: &'a mut Arc<DirNode>, comps: &[&[u8]]) -> Option<&'a mut Arc<DirNode>> {
    let Some((first, rest)) = comps.split_first() else {
        return Some(dir);
    };
    if !matches!(dir.children.get(*first), Some(Node::Dir(_))) {
        return None;
    }
    match Arc::make_mut(dir).children.get_mut(*first) {
        Some(Node::Dir(sub)) => dir_mut(sub, rest),
        _ => None,
    }
}

/// Does every component of `comps` name a directory (so an edit there changes something)?
fn dir_exists(dir: &DirNode, comps: &[&[u8]]) -> bool {
    match comps.split_first() {
        None => true,
        Some((first, rest)) => match dir.children.get(*first) {
            Some(Node::Dir(sub)) => dir_exists(sub, rest),
            _ => false,
        },
    }
}

/// Drop every path below `node` (at `path`) from the flat map.
fn forget_below(flat: &mut Flat, node: &Node, path: &[u8]) {
    let Node::Dir(d) = node else { return };
    let mut prefix = path.to_vec();
    for (name, child) in d.children.iter() {
        prefix.truncate(path.len());
        if !prefix.is_empty() {
            prefix.push(b'/');
        }
        prefix.extend_from_slice(name);
        flat.remove(&prefix[..]);
        forget_below(flat, child, &prefix.clone());
    }
}

/// The node at a normalised path, through directories only.
fn node_at<'a>(root: &'a DirNode, path: &[u8]) -> Option<&'a Node> {
    let mut dir = root;
    let mut found: Option<&Node> = None;
    for c in components(path) {
        if let Some(prev) = found {
            let Node::Dir(d) = prev else { return None };
            dir = d;
        }
        found = Some(dir.children.get(c)?);
    }
    found
}

fn remove(root: &mut Arc<DirNode>, flat: &mut Flat, path: &[u8]) {
    let (parent, name) = split_parent(path);
    let comps: Vec<&[u8]> = components(parent).collect();
    let present = match node_at(root, path) {
        Some(node) => {
            forget_below(flat, node, path);
            flat.remove(path);
            true
        }
        None => false,
    };
    if present {
        if let Some(dir) = dir_mut(root, &comps) {
            Arc::make_mut(dir).children.remove(name);
        }
    }
}

fn clear_children(root: &mut Arc<DirNode>, flat: &mut Flat, path: &[u8]) {
    let comps: Vec<&[u8]> = components(path).collect();
    if !dir_exists(root, &comps) {
        return;
    }
    let here = Node::Dir(dir_at(root, &comps));
    forget_below(flat, &here, path);
    if let Some(dir) = dir_mut(root, &comps) {
        if !dir.children.is_empty() {
            Arc::make_mut(dir).children = Children::default();
        }
    }
}

/// The directory at `comps` (which must all be directories).
fn dir_at(root: &Arc<DirNode>, comps: &[&[u8]]) -> Arc<DirNode> {
    let mut d = root.clone();
    for c in comps {
        let next = match d.children.get(*c) {
            Some(Node::Dir(sub)) => sub.clone(),
            _ => unreachable!("checked by dir_exists"),
        };
        d = next;
    }
    d
}

/// Put `view` at `path`, creating implicit parents (which replace a lower non-directory).
fn insert(root: &mut Arc<DirNode>, flat: &mut Flat, path: &[u8], view: Arc<ViewEntry>) {
    let comps: Vec<&[u8]> = components(path).collect();
    let is_dir = view.entry.kind == Kind::Dir;
    let Some((name, parents)) = comps.split_last() else {
        // The root itself: a directory entry replaces its attributes.
        if is_dir {
            Arc::make_mut(root).meta = view;
        }
        return;
    };
    let mut dir = root;
    let mut at: Vec<u8> = Vec::with_capacity(path.len());
    for c in parents {
        if !at.is_empty() {
            at.push(b'/');
        }
        at.extend_from_slice(c);
        let d = Arc::make_mut(dir);
        if !matches!(d.children.get(*c), Some(Node::Dir(_))) {
            let implicit = DirNode::implicit();
            flat.insert(Name::from(&at[..]), implicit.meta.clone());
            d.children.insert(Name::from(*c), Node::Dir(implicit));
        }
        dir = match d.children.get_mut(*c) {
            Some(Node::Dir(sub)) => sub,
            _ => unreachable!("a directory was just ensured"),
        };
    }
    let d = Arc::make_mut(dir);
    let existing = d.children.get(*name);
    // Anything but a directory over a directory hides what was below the path.
    if let (false, Some(old)) | (true, Some(old @ Node::Leaf(_))) = (is_dir, existing) {
        forget_below(flat, old, path);
    }
    let node = match (is_dir, existing) {
        // Directory over directory merges: the upper attributes, the union of children.
        (true, Some(Node::Dir(lower))) => {
            Node::Dir(Arc::new(DirNode::new(view.clone(), lower.children.clone())))
        }
        (true, _) => Node::Dir(Arc::new(DirNode::new(view.clone(), Children::default()))),
        (false, _) => Node::Leaf(view.clone()),
    };
    flat.insert(Name::from(path), view);
    d.children.insert(Name::from(*name), node);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(path: &str, kind: Kind) -> Arc<Entry> {
        let mut x = (*implicit_dir().entry).clone();
        x.path = path.as_bytes().to_vec();
        x.kind = kind;
        x.mode = 0o644;
        Arc::new(x)
    }

    fn names(ix: &Index, dir: &str) -> Vec<String> {
        match ix.lookup(dir.as_bytes()) {
            Some(Node::Dir(d)) => d
                .sorted()
                .into_iter()
                .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
                .collect(),
            _ => vec![],
        }
    }

    #[test]
    fn frozen_lookups_follow_every_edit() {
        let files: Vec<Arc<Entry>> = (0..100).map(|i| e(&format!("f{i}"), Kind::File)).collect();
        let mut ix = Index::default().apply(0, &files).unwrap();
        let mode = |ix: &Index, p: &str| {
            ix.lookup_view(p.as_bytes(), false)
                .unwrap()
                .map(|(_, v)| v.meta().mode)
        };
        for _ in 0..1000 {
            assert_eq!(mode(&ix, "f7"), Some(0o644));
        }
        // (Built on another core when there is one: give it a moment.)
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while ix.frozen.map.get().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(
            ix.frozen.map.get().is_some(),
            "the frozen copy was never built"
        );
        assert_eq!(mode(&ix, "f7"), Some(0o644));
        let shared = ix.clone();
        let mut changed = (*e("f7", Kind::File)).clone();
        changed.mode = 0o600;
        ix.put(
            b"f7",
            Arc::new(ViewEntry {
                entry: Arc::new(changed),
                target: None,
                layer: Some(1),
            }),
        );
        ix.remove_path(b"f8");
        assert_eq!(mode(&ix, "f7"), Some(0o600));
        assert_eq!(mode(&ix, "f8"), None);
        // The clone made before the edit still answers from its own (shared) frozen copy.
        assert_eq!(mode(&shared, "f7"), Some(0o644));
        assert_eq!(mode(&shared, "f8"), Some(0o644));
        for _ in 0..1000 {
            assert_eq!(mode(&ix, "f7"), Some(0o600));
        }
        assert!(ix.flat_is_consistent());
    }

    #[test]
    fn whiteouts_opaques_and_replacement() {
        let base = Index::default()
            .apply(
                0,
                &[
                    e("a", Kind::Dir),
                    e("a/x", Kind::File),
                    e("a/y", Kind::File),
                    e("b", Kind::Dir),
                    e("b/z", Kind::File),
                ],
            )
            .unwrap();
        // Marker after the entry in tar order: the layer's own a/new survives its opaque marker.
        let up = base
            .apply(
                1,
                &[
                    e("a/new", Kind::File),
                    e("a/.wh..wh..opq", Kind::Opaque),
                    e(".wh.b", Kind::Whiteout),
                    e("c/d", Kind::File),
                ],
            )
            .unwrap();
        assert_eq!(names(&up, "a"), ["new"]);
        assert_eq!(names(&up, ""), ["a", "c"]);
        assert!(up.lookup(b"c").unwrap().view().is_implicit());
        assert_eq!(
            names(&base, "a"),
            ["x", "y"],
            "the parent index is unchanged"
        );
        let replaced = up.apply(2, &[e("a", Kind::File)]).unwrap();
        assert!(matches!(replaced.lookup(b"a"), Some(Node::Leaf(_))));
        let again = replaced.apply(3, &[e("a", Kind::Dir)]).unwrap();
        assert_eq!(
            names(&again, "a"),
            Vec::<String>::new(),
            "a file stopped the merge"
        );
    }

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let mut link = (*e("l", Kind::Symlink)).clone();
        link.link = b"../../a/x".to_vec();
        let mut abs = (*e("d/abs", Kind::Symlink)).clone();
        abs.link = b"/a".to_vec();
        let mut loop_ = (*e("loop", Kind::Symlink)).clone();
        loop_.link = b"loop".to_vec();
        let ix = Index::default()
            .apply(
                0,
                &[
                    e("a/x", Kind::File),
                    Arc::new(link),
                    Arc::new(abs),
                    Arc::new(loop_),
                ],
            )
            .unwrap();
        assert_eq!(
            ix.resolve(b"l", true).unwrap().unwrap().path.unwrap(),
            b"a/x"
        );
        assert_eq!(
            ix.resolve(b"d/abs/x", true).unwrap().unwrap().path.unwrap(),
            b"a/x"
        );
        // No symlink followed: the normalised input is the path.
        assert_eq!(ix.resolve(b"l", false).unwrap().unwrap().path, None);
        assert!(matches!(
            ix.resolve(b"a/x", true).unwrap().unwrap().node,
            Node::Leaf(_)
        ));
        assert!(ix.resolve(b"loop", true).is_err());
        assert!(ix.resolve(b"a/x/y", true).unwrap().is_none());
    }

    #[test]
    fn flat_map_follows_random_edits() {
        let mut seed = 0x1234_5678_u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let names = ["a", "b", "c"];
        let mut ix = Index::default();
        for layer in 0..60 {
            let mut entries = Vec::new();
            for _ in 0..8 {
                let depth = 1 + next(3) as usize;
                let path: Vec<&str> = (0..depth).map(|_| names[next(3) as usize]).collect();
                let path = path.join("/");
                let entry = match next(6) {
                    0 => {
                        let (dir, name) = path
                            .rsplit_once('/')
                            .map_or(("", path.as_str()), |(d, n)| (d, n));
                        let wh = if dir.is_empty() {
                            format!(".wh.{name}")
                        } else {
                            format!("{dir}/.wh.{name}")
                        };
                        e(&wh, Kind::Whiteout)
                    }
                    1 => e(&format!("{path}/.wh..wh..opq"), Kind::Opaque),
                    2 | 3 => e(&path, Kind::Dir),
                    4 => e(&path, Kind::Symlink),
                    _ => e(&path, Kind::File),
                };
                entries.push(entry);
            }
            ix = ix.apply(layer, &entries).unwrap();
            assert!(ix.flat_is_consistent(), "layer {layer}: {entries:?}");
        }
    }

    #[test]
    fn push_copies_only_touched_directories() {
        let mut base_entries = vec![];
        for i in 0..50 {
            base_entries.push(e(&format!("d{i}"), Kind::Dir));
            for j in 0..20 {
                base_entries.push(e(&format!("d{i}/f{j}"), Kind::File));
            }
        }
        let base = Index::default().apply(0, &base_entries).unwrap();
        let before = live_dir_nodes();
        let stacks: Vec<Index> = (0..100)
            .map(|i| {
                base.apply(1, &[e(&format!("d7/new{i}"), Kind::File)])
                    .unwrap()
            })
            .collect();
        let grown = live_dir_nodes() - before;
        // Other tests run in parallel threads and move the global counter a little: allow slack.
        assert!(
            grown <= 2 * 100 + 50,
            "grew by {grown} nodes for 100 one-file layers"
        );
        drop(stacks);
    }
}
