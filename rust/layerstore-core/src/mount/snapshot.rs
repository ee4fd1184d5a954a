//! Layer snapshots: each layer written once as a directory in overlayfs's own form, shared by
//! every image and mount that uses it.
//!
//! Invariants:
//! - A snapshot shows, stacked by the kernel over the snapshots below it, exactly what the union
//!   index shows: whiteouts become 0:0 character devices (or make a directory the layer also
//!   provides opaque), opaque markers become `trusted.overlay.opaque=y`, overlay xattrs an entry
//!   carries are dropped (data, not instructions).
//! - What the layer's tar leaves implicit is made explicit with the metadata the view shows
//!   there — the root, parent directories without an entry of their own, a hardlink to a file
//!   of a lower layer (a copy). Those depend on the layers below, so they are part of the
//!   snapshot's name: `<layer id>-<digest of the derived entries>`. Two stacks share a
//!   snapshot exactly when it would be the same tree.
//! - A snapshot directory is complete or absent: written by `materialize` (safe, parallel) in a
//!   private directory and renamed into place. An existing one is never rewritten.
//! - `snapshots/.lock`: mounts hold it shared while they pick and mount snapshots; `gc` holds
//!   it exclusively while it removes unused ones, so it never removes one a mount is about to use.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{flock, FlockOperation};

use crate::changeset::{self, Marker, OVERLAY_OPAQUE_XATTR};
use crate::digest::Blake3;
use crate::error::{Error, IoContext, Result};
use crate::layer::{Entry, Kind, LayerInfo};
use crate::materialize::WriteOptions;
use crate::paths::{child_path, split_parent};
use crate::stack::{LayerEntries, Stack};
use crate::store::{no_progress, Store};
use crate::union::{Index, Node};

/// The directory of snapshots, under the store root.
pub(crate) const SNAPSHOTS_DIR: &str = "snapshots";
const LOCK: &str = ".lock";

/// One layer's snapshot: its name under `snapshots/` and the entries it is written from.
pub(crate) struct Planned {
    pub name: String,
    pub layer: LayerInfo,
    entries: Vec<Arc<Entry>>,
}

/// The lock that keeps `gc` from removing snapshots while a mount picks them.
pub(crate) fn lock(root: &Path, exclusive: bool) -> Result<File> {
    let dir = root.join(SNAPSHOTS_DIR);
    fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
    let path = dir.join(LOCK);
    let f = File::options()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .ctx(|| format!("opening {}", path.display()))?;
    let op = if exclusive {
        FlockOperation::LockExclusive
    } else {
        FlockOperation::LockShared
    };
    flock(&f, op)
        .map_err(std::io::Error::from)
        .ctx(|| format!("locking {}", path.display()))?;
    Ok(f)
}

/// The snapshots a stack's layers need, bottom first.
pub(crate) fn plan(stack: &Stack) -> Result<Vec<Planned>> {
    let mut index = Index::default();
    let mut out = Vec::with_capacity(stack.layers.len());
    for (k, (layer, entries)) in stack.layers.iter().zip(stack.layer_entries()).enumerate() {
        index.apply_mut(k as u32, entries)?;
        let entries = overlay_entries(entries, &index);
        let name = format!("{}-{}", layer.id.hex(), derived_digest(&entries.derived));
        out.push(Planned {
            name,
            layer: layer.clone(),
            entries: entries.all,
        });
    }
    Ok(out)
}

/// A layer's entries in overlay form, and which of them came from the view.
struct OverlayEntries {
    all: Vec<Arc<Entry>>,
    derived: Vec<Arc<Entry>>,
}

/// What the view at this layer shows at `path` (the layer's own entries included).
fn view_entry(at: &Index, path: &[u8]) -> Option<Entry> {
    at.lookup(path).map(|n| n.view().meta().clone())
}

fn without_overlay_xattrs(e: &Arc<Entry>) -> Arc<Entry> {
    if !e.xattrs.keys().any(|k| changeset::is_overlay_xattr(k)) {
        return e.clone();
    }
    let mut e = Entry::clone(e);
    e.xattrs.retain(|k, _| !changeset::is_overlay_xattr(k));
    Arc::new(e)
}

fn whiteout_device(path: Vec<u8>) -> Entry {
    Entry::new(path, Kind::Char, b'3', 0)
}

/// A directory entry with the metadata the view shows at `path`.
fn view_dir(at: &Index, path: &[u8], opaque: bool) -> Entry {
    let mut e = view_entry(at, path)
        .filter(|e| e.kind == Kind::Dir)
        .unwrap_or_else(|| Entry::new(Vec::new(), Kind::Dir, b'5', 0o755));
    e.path = path.to_vec();
    e.xattrs.retain(|k, _| !changeset::is_overlay_xattr(k));
    if opaque {
        e.xattrs
            .insert(OVERLAY_OPAQUE_XATTR.to_vec(), b"y".to_vec());
    }
    e
}

fn overlay_entries(entries: &LayerEntries, at: &Index) -> OverlayEntries {
    let mut opaque: HashSet<Vec<u8>> = HashSet::new();
    let mut devices: Vec<Vec<u8>> = Vec::new();
    let mut own_dirs: HashSet<&[u8]> = HashSet::new();
    let mut own: HashMap<&[u8], Kind> = HashMap::new();
    for e in entries.iter() {
        match e.kind {
            Kind::Opaque => {
                opaque.insert(split_parent(&e.path).0.to_vec());
            }
            Kind::Whiteout => {
                let (dir, name) = split_parent(&e.path);
                if let Marker::Whiteout(hidden) = changeset::marker_of(name) {
                    let hidden = child_path(dir, hidden);
                    match at.lookup(&hidden) {
                        // The layer provides nothing there: a whiteout device.
                        None => devices.push(hidden),
                        // It provides a directory there: that directory hides all below.
                        Some(Node::Dir(_)) => {
                            opaque.insert(hidden);
                        }
                        Some(Node::Leaf(_)) => {}
                    }
                }
            }
            Kind::Other(_) => {}
            _ if changeset::is_aufs_meta(&e.path) => {}
            kind => {
                own.insert(&e.path, kind);
                if kind == Kind::Dir {
                    own_dirs.insert(&e.path);
                }
            }
        }
    }
    let mut derived: BTreeMap<Vec<u8>, Entry> = BTreeMap::new();
    // The root, directories the layer leaves implicit, and the opaque ones, from the view.
    derived.insert(Vec::new(), view_dir(at, b"", opaque.contains(&b""[..])));
    let mut parents: Vec<&[u8]> = own.keys().copied().collect();
    parents.extend(devices.iter().map(Vec::as_slice));
    parents.extend(opaque.iter().map(Vec::as_slice));
    for p in parents {
        let mut dir = split_parent(p).0;
        while !dir.is_empty() && !own_dirs.contains(dir) && !derived.contains_key(dir) {
            derived.insert(dir.to_vec(), view_dir(at, dir, opaque.contains(dir)));
            dir = split_parent(dir).0;
        }
    }
    for d in &opaque {
        derived.insert(d.clone(), view_dir(at, d, true));
    }
    let mut all: Vec<Arc<Entry>> = Vec::with_capacity(entries.len() + derived.len());
    let mut derived_list: Vec<Arc<Entry>> = Vec::new();
    for e in entries.iter() {
        let keep = !matches!(e.kind, Kind::Whiteout | Kind::Opaque | Kind::Other(_))
            && !changeset::is_aufs_meta(&e.path)
            && !derived.contains_key(&e.path);
        if !keep {
            continue;
        }
        if e.kind == Kind::Hardlink && !own.contains_key(e.link.as_slice()) {
            // A link to a lower layer's file: this layer holds its own copy.
            if let Some(mut copy) = view_entry(at, &e.path) {
                copy.path = e.path.clone();
                let copy = Arc::new(copy);
                derived_list.push(copy.clone());
                all.push(copy);
            }
            continue;
        }
        all.push(without_overlay_xattrs(e));
    }
    for path in devices {
        all.push(Arc::new(whiteout_device(path)));
    }
    for (_, e) in derived {
        let e = Arc::new(e);
        derived_list.push(e.clone());
        all.push(e);
    }
    OverlayEntries {
        all,
        derived: derived_list,
    }
}

/// A short digest of the entries a snapshot took from the view (its name's second part).
fn derived_digest(derived: &[Arc<Entry>]) -> String {
    let mut h = blake3::Hasher::new();
    for e in derived {
        let encoded = postcard::to_allocvec(&**e).unwrap_or_default();
        h.update(&(encoded.len() as u64).to_le_bytes());
        h.update(&encoded);
    }
    Blake3::from(h.finalize()).hex()[..16].to_string()
}

/// Write the planned snapshots that do not exist yet (the caller holds [`lock`]). Returns their
/// directories, bottom first.
pub(crate) fn ensure(store: &Store, planned: &[Planned]) -> Result<Vec<PathBuf>> {
    let dir = store.root().join(SNAPSHOTS_DIR);
    let mut out = Vec::with_capacity(planned.len());
    for p in planned {
        let dest = dir.join(&p.name);
        if !dest.is_dir() {
            write(store, p, &dest)?;
        }
        out.push(dest);
    }
    Ok(out)
}

fn write(store: &Store, p: &Planned, dest: &Path) -> Result<()> {
    let mut stack = Stack::empty();
    // A snapshot is one layer of an overlay: the entries are its own, in overlay form.
    stack.push_mut(p.layer.clone(), Arc::new(p.entries.clone()), 1)?;
    let opts = WriteOptions {
        overlay_opaque: true,
        ..WriteOptions::default()
    };
    match store.materialize(&stack, dest, &opts, &no_progress) {
        Ok(_) => Ok(()),
        // Another process wrote it first: the same tree.
        Err(Error::Io { source, .. })
            if source.kind() == std::io::ErrorKind::AlreadyExists && dest.is_dir() =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Remove the snapshots not in `keep` (the caller holds [`lock`] exclusively). Returns the
/// number removed and the bytes they held.
pub(crate) fn prune(root: &Path, keep: &HashSet<String>) -> (u64, u64) {
    let dir = root.join(SNAPSHOTS_DIR);
    let Ok(list) = fs::read_dir(&dir) else {
        return (0, 0);
    };
    let (mut removed, mut bytes) = (0, 0);
    for e in list.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name != LOCK && e.file_type().is_ok_and(|t| t.is_dir()) {
            // A materialize a killed process left (its private directory).
            let tag = name.split_once(".layerstore-tmp-").map(|(_, t)| t);
            if tag.is_some_and(crate::owner::owner_gone) {
                let _ = fs::remove_dir_all(e.path());
            }
            continue;
        }
        if name.starts_with('.') || keep.contains(&name) {
            continue;
        }
        bytes += tree_bytes(&e.path());
        if fs::remove_dir_all(e.path()).is_ok() {
            removed += 1;
        }
    }
    (removed, bytes)
}

fn tree_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(md) = fs::symlink_metadata(path) else {
        return 0;
    };
    let own = md.blocks() * 512;
    if !md.is_dir() {
        return own;
    }
    own + fs::read_dir(path)
        .map(|l| l.flatten().map(|e| tree_bytes(&e.path())).sum::<u64>())
        .unwrap_or(0)
}

/// The layer id a snapshot name starts with.
pub(crate) fn layer_of(name: &str) -> &str {
    name.split('-').next().unwrap_or(name)
}
