//! Image analysis: where every byte of an image comes from and which bytes are waste, computed
//! from the layers' entry lists alone (no tar and no file content is read).
//!
//! Invariants. A *copy* is a regular-file entry with content (size > 0) that a layer ships. Every
//! copy ends in exactly one fate: *live* (the final view shows it) or *dead*, and a dead copy was
//! ended by exactly one event: a later entry at its path with the same content
//! ([`WasteKind::MetadataOnly`] when its metadata differs, [`WasteKind::Duplicate`] when nothing
//! differs), a later entry with other content or kind at its path or at an ancestor
//! ([`WasteKind::Shadowed`]), or a whiteout / opaque marker ([`WasteKind::Deleted`]). Of the live
//! copies, all but the first (bottom layer first, then path order) of each content digest are
//! [`WasteKind::Duplicate`]; of the rest, the chunks a file shares with an earlier such file are
//! [`WasteKind::NearDuplicate`]. The five kinds are therefore disjoint: no byte is counted twice,
//! and their sum never exceeds the bytes shipped. Hardlinks carry no content in a tar, so they are
//! never copies.
//!
//! dive's figures are computed as dive defines them, beside ours: per layer, the leaves of the
//! layer's own tree (opaque markers dropped, a whiteout standing for the path it hides, sized as
//! the whole lower directory it removes, 0 otherwise); per path, the smallest size seen and the
//! sum of all sizes; efficiency = Σ smallest / Σ all (1 when nothing was seen); wasted bytes =
//! Σ all sizes of the paths seen more than once; user wasted percent = wasted bytes / the summed
//! entry sizes of every layer but the first. Two deliberate differences: the lower tree a
//! whiteout is sized against honours opaque markers, and a whiteout of a path the lower layers
//! do not have counts 0 rather than aborting the rest of the layer.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde::Serialize;

use crate::changeset::{self, Marker};
use crate::digest::Blake3;
use crate::layer::{Entry, Kind, LayerInfo};
use crate::paths::split_parent;
use crate::stack::Stack;

/// What the store knows of a layer beyond its entries (history and blob records).
#[derive(Clone, Debug, Default)]
pub struct LayerMeta {
    /// The `created_by` of the layer's history entry.
    pub created_by: Option<String>,
    /// The size of the compressed blob it was imported from, when recorded.
    pub compressed_size: Option<u64>,
}

/// The five kinds of waste, disjoint by construction (see the module head).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WasteKind {
    MetadataOnly,
    Shadowed,
    Deleted,
    Duplicate,
    NearDuplicate,
}

impl WasteKind {
    pub const ALL: [WasteKind; 5] = [
        WasteKind::MetadataOnly,
        WasteKind::Shadowed,
        WasteKind::Deleted,
        WasteKind::Duplicate,
        WasteKind::NearDuplicate,
    ];

    pub fn name(self) -> &'static str {
        match self {
            WasteKind::MetadataOnly => "metadata_only",
            WasteKind::Shadowed => "shadowed",
            WasteKind::Deleted => "deleted",
            WasteKind::Duplicate => "duplicate",
            WasteKind::NearDuplicate => "near_duplicate",
        }
    }
}

/// One wasted copy (or, for near-duplicates, the shared part of one file).
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WasteItem {
    pub kind: WasteKind,
    /// The path of the wasted copy, absolute in the image.
    pub path: String,
    /// The layer that shipped the wasted bytes, then the layer that made them waste.
    pub layers: Vec<usize>,
    pub bytes: u64,
    /// The other path involved (the copy kept, the file sharing chunks), if any.
    pub other_path: Option<String>,
    /// Why these bytes are waste, in words.
    pub reason: String,
}

/// Waste of one kind, summed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct WasteTotal {
    pub count: u64,
    pub bytes: u64,
}

/// One layer: what it does to the view below it.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LayerReport {
    /// dive's fields: index, id, digestId, sizeBytes (Σ entry sizes), command.
    pub index: usize,
    pub id: String,
    pub digest_id: String,
    pub size_bytes: u64,
    pub command: String,
    pub created_by: Option<String>,
    /// The uncompressed tar's size and, where known, the compressed blob's.
    pub tar_bytes: u64,
    pub compressed_bytes: Option<u64>,
    pub entries: u64,
    pub files_added: u64,
    pub bytes_added: u64,
    pub files_modified: u64,
    pub bytes_modified: u64,
    /// Non-directory paths of lower layers this layer's markers removed, and their content bytes.
    pub files_deleted: u64,
    pub bytes_deleted: u64,
    /// Regular files re-shipped with the same content and other metadata (mode, owner, xattrs…).
    pub metadata_only: u64,
    pub metadata_only_bytes: u64,
    pub whiteouts: u64,
    pub opaques: u64,
    /// Bytes this layer ships that are waste (of any kind), attributed to the shipping layer.
    pub wasted_bytes: u64,
    /// Waste this layer causes: copies below that it re-ships, replaces or deletes, and the
    /// duplicate or near-duplicate content it ships itself.
    pub caused_waste_bytes: u64,
}

/// dive's per-path record of a path seen in more than one layer.
#[derive(Clone, Debug, Serialize)]
pub struct FileReference {
    pub count: u64,
    #[serde(rename = "sizeBytes")]
    pub size_bytes: u64,
    pub file: String,
}

/// Image-wide figures: dive's fields (sizeBytes, inefficientBytes, efficiencyScore,
/// fileReference) and ours.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageReport {
    pub size_bytes: u64,
    pub inefficient_bytes: u64,
    pub efficiency_score: f64,
    pub file_reference: Vec<FileReference>,
    pub user_size_bytes: u64,
    pub user_wasted_percent: f64,
    pub layers: usize,
    pub tar_bytes: u64,
    pub compressed_bytes: Option<u64>,
    /// Content bytes of every copy shipped, and of the files the final view shows.
    pub shipped_bytes: u64,
    pub live_bytes: u64,
    pub live_files: u64,
    /// Our waste, all five kinds, and our score: 1 − wasted / shipped.
    pub wasted_bytes: u64,
    pub efficiency: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct WasteReport {
    pub totals: BTreeMap<&'static str, WasteTotal>,
    pub items: Vec<WasteItem>,
}

/// The analysis of one image.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Analysis {
    pub image: ImageReport,
    pub layer: Vec<LayerReport>,
    pub waste: WasteReport,
    /// Every non-directory path of the final view with its history ([`files`]), when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files: Option<Vec<FileRow>>,
}

/// One layer's touch of a path: an entry at it, or a marker hiding it (or an ancestor).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Touch {
    pub layer: usize,
    pub touch: &'static str,
}

/// A non-directory path the image shows, the layer providing it and every layer that touched it.
#[derive(Clone, Debug, Serialize)]
pub struct FileRow {
    pub path: String,
    pub kind: &'static str,
    pub size: u64,
    pub layer: usize,
    /// Bottom first: `entry` (the layer has the path), `whiteout` (a whiteout of the path or an
    /// ancestor), `opaque` (an opaque marker in an ancestor).
    pub history: Vec<Touch>,
}

/// The provenance of every non-directory path `stack` shows (sorted by path): the same answer
/// as [`Stack::provenance`] for each, in one pass over the entries instead of one per path.
pub fn files(stack: &Stack) -> Vec<FileRow> {
    let mut at: HashMap<&[u8], Vec<usize>> = HashMap::new();
    let mut whiteouts: HashMap<Vec<u8>, Vec<usize>> = HashMap::new();
    let mut opaques: HashMap<&[u8], Vec<usize>> = HashMap::new();
    for (k, entries) in stack.layer_entries().iter().enumerate() {
        for e in entries.iter() {
            let (dir, name) = split_parent(&e.path);
            match e.kind {
                Kind::Whiteout => {
                    if let Marker::Whiteout(hidden) = changeset::marker_of(name) {
                        let v = whiteouts
                            .entry(crate::paths::child_path(dir, hidden))
                            .or_default();
                        v.push(k);
                    }
                }
                Kind::Opaque => opaques.entry(dir).or_default().push(k),
                Kind::Other(_) => {}
                _ => at.entry(&e.path).or_default().push(k),
            }
        }
    }
    let mut rows: Vec<FileRow> = Vec::new();
    for (path, view) in stack.index.paths() {
        let meta = view.meta();
        let Some(layer) = view.layer else { continue };
        if meta.kind == Kind::Dir {
            continue;
        }
        let mut history: Vec<Touch> = Vec::new();
        let mut add = |layers: Option<&Vec<usize>>, touch: &'static str| {
            for &layer in layers.into_iter().flatten() {
                history.push(Touch { layer, touch });
            }
        };
        add(at.get(&path[..]), "entry");
        add(whiteouts.get(&path[..]), "whiteout");
        add(opaques.get(&b""[..]), "opaque");
        for (i, &b) in path.iter().enumerate() {
            if b == b'/' {
                add(whiteouts.get(&path[..i]), "whiteout");
                add(opaques.get(&path[..i]), "opaque");
            }
        }
        history.sort();
        history.dedup();
        rows.push(FileRow {
            path: show(path),
            kind: meta.kind.name(),
            size: if meta.kind == Kind::File {
                meta.size
            } else {
                0
            },
            layer: layer as usize,
            history,
        });
    }
    rows.sort_by(|a, b| a.path.cmp(&b.path));
    rows
}

impl Analysis {
    /// The JSON form (what `layerstore analyze --json` prints).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("plain data serialises")
    }
}

/// How a copy ended.
#[derive(Clone, Debug)]
enum Fate {
    Live,
    /// Re-shipped by layer `by` with the same content; `what` lists the metadata that changed
    /// (empty: nothing changed).
    Reshipped {
        by: usize,
        what: String,
    },
    Shadowed {
        by: usize,
        why: &'static str,
    },
    Deleted {
        by: usize,
        marker: Vec<u8>,
    },
}

struct Copy {
    layer: usize,
    entry: Arc<Entry>,
    fate: Fate,
}

/// What the view shows at a path while the layers are stacked.
struct Slot {
    entry: Arc<Entry>,
    copy: Option<usize>,
}

fn show(path: &[u8]) -> String {
    let mut s = String::with_capacity(path.len() + 1);
    s.push('/');
    s.push_str(&String::from_utf8_lossy(path));
    s
}

/// Every key of `view` at `path` or below it (the whole view when `path` is the root).
fn subtree(view: &BTreeMap<Vec<u8>, Slot>, path: &[u8], with_self: bool) -> Vec<Vec<u8>> {
    if path.is_empty() {
        return view.keys().cloned().collect();
    }
    let mut out = Vec::new();
    if with_self && view.contains_key(path) {
        out.push(path.to_vec());
    }
    let mut prefix = path.to_vec();
    prefix.push(b'/');
    out.extend(
        view.range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.clone()),
    );
    out
}

/// The metadata two entries with the same content differ in, in words.
fn metadata_change(old: &Entry, new: &Entry) -> String {
    let mut what = Vec::new();
    if old.mode != new.mode {
        what.push(format!("mode {:o}→{:o}", old.mode, new.mode));
    }
    if (old.uid, old.gid) != (new.uid, new.gid)
        || (&old.uname, &old.gname) != (&new.uname, &new.gname)
    {
        what.push(format!(
            "owner {}:{}→{}:{}",
            old.uid, old.gid, new.uid, new.gid
        ));
    }
    if old.xattrs != new.xattrs {
        let cap = |e: &Entry| e.xattrs.get(&b"security.capability"[..]).cloned();
        if cap(old) != cap(new) {
            what.push("capabilities".to_string());
        }
        let other = |e: &Entry| -> Vec<(Vec<u8>, Vec<u8>)> {
            e.xattrs
                .iter()
                .filter(|(k, _)| k.as_slice() != b"security.capability")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        if other(old) != other(new) {
            what.push("xattrs".to_string());
        }
    }
    if old.mtime_ns != new.mtime_ns {
        what.push("mtime".to_string());
    }
    what.join(", ")
}

/// dive's per-path accumulator.
#[derive(Default)]
struct DivePath {
    count: u64,
    cumulative: u64,
    min: u64,
}

/// Analyse `stack`; `meta[i]` is what the store knows of layer `i` (missing: nothing).
pub fn analyze(stack: &Stack, meta: &[LayerMeta]) -> Analysis {
    let mut view: BTreeMap<Vec<u8>, Slot> = BTreeMap::new();
    let mut copies: Vec<Copy> = Vec::new();
    let mut reports: Vec<LayerReport> = Vec::new();
    let mut dive: HashMap<Vec<u8>, DivePath> = HashMap::new();
    let mut dive_sizes: Vec<u64> = Vec::new();

    for (k, (info, entries)) in stack.layers.iter().zip(stack.layer_entries()).enumerate() {
        let m = meta.get(k).cloned().unwrap_or_default();
        let mut r = layer_head(k, info, &m);
        r.entries = entries.len() as u64;
        r.size_bytes = entries.iter().map(|e| e.size).sum();
        dive_sizes.push(r.size_bytes);

        // The last entry of each path wins (an earlier duplicate in the same tar is shadowed).
        let mut last: HashMap<&[u8], usize> = HashMap::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            if matches!(e.kind, Kind::Other(_)) || changeset::is_aufs_meta(&e.path) {
                continue;
            }
            if let Some(prev) = last.insert(&e.path, i) {
                let p = &entries[prev];
                if p.kind == Kind::File && p.size > 0 {
                    copies.push(Copy {
                        layer: k,
                        entry: p.clone(),
                        fate: Fate::Shadowed {
                            by: k,
                            why: "listed again later in the same tar",
                        },
                    });
                }
            }
        }
        let mut mine: Vec<&Arc<Entry>> = last.values().map(|&i| &entries[i]).collect();
        mine.sort_by(|a, b| a.path.cmp(&b.path));

        dive_layer(&mine, &view, &mut dive);

        // Markers first (as the union does): they act on the lower layers only.
        for e in mine
            .iter()
            .filter(|e| matches!(e.kind, Kind::Whiteout | Kind::Opaque))
        {
            let (dir, name) = split_parent(&e.path);
            let (target, with_self) = match (e.kind, changeset::marker_of(name)) {
                (Kind::Whiteout, Marker::Whiteout(hidden)) => {
                    r.whiteouts += 1;
                    (crate::paths::child_path(dir, hidden), true)
                }
                _ => {
                    r.opaques += 1;
                    (dir.to_vec(), false)
                }
            };
            for key in subtree(&view, &target, with_self) {
                let slot = view.remove(&key).expect("listed from the view");
                if slot.entry.kind != Kind::Dir {
                    r.files_deleted += 1;
                    if slot.entry.kind == Kind::File {
                        r.bytes_deleted += slot.entry.size;
                    }
                }
                if let Some(c) = slot.copy {
                    copies[c].fate = Fate::Deleted {
                        by: k,
                        marker: e.path.clone(),
                    };
                }
            }
        }

        for e in mine
            .iter()
            .filter(|e| !matches!(e.kind, Kind::Whiteout | Kind::Opaque))
        {
            apply_entry(k, e, &mut view, &mut copies, &mut r);
        }
        reports.push(r);
    }

    let mut analysis = Analysis {
        layer: reports,
        ..Analysis::default()
    };
    finish_waste(&mut analysis, &copies);
    finish_dive(&mut analysis, dive, &dive_sizes);
    analysis
}

fn layer_head(k: usize, info: &LayerInfo, m: &LayerMeta) -> LayerReport {
    LayerReport {
        index: k,
        id: info.id.to_string(),
        digest_id: info.diff_id.clone(),
        command: m.created_by.clone().unwrap_or_default(),
        created_by: m.created_by.clone(),
        tar_bytes: info.size,
        compressed_bytes: m.compressed_size,
        ..LayerReport::default()
    }
}

/// One non-marker entry of layer `k` over the view below it.
fn apply_entry(
    k: usize,
    e: &Arc<Entry>,
    view: &mut BTreeMap<Vec<u8>, Slot>,
    copies: &mut Vec<Copy>,
    r: &mut LayerReport,
) {
    if e.path.is_empty() {
        return; // the root directory's attributes
    }
    // A non-directory at an ancestor is replaced by an (implicit) directory.
    for (i, &b) in e.path.iter().enumerate() {
        if b != b'/' {
            continue;
        }
        let ancestor = &e.path[..i];
        if view
            .get(ancestor)
            .is_some_and(|s| s.entry.kind != Kind::Dir)
        {
            let slot = view.remove(ancestor).expect("just seen");
            if let Some(c) = slot.copy {
                copies[c].fate = Fate::Shadowed {
                    by: k,
                    why: "a later layer put a directory at its path",
                };
            }
        }
    }
    let old = view.get(&e.path[..]).map(|s| (s.entry.clone(), s.copy));
    let is_dir = e.kind == Kind::Dir;
    // Anything but a directory over a directory hides what was below the path.
    if let Some((o, _)) = &old {
        if !(is_dir && o.kind == Kind::Dir) {
            for key in subtree(view, &e.path, false) {
                let slot = view.remove(&key).expect("listed from the view");
                if let Some(c) = slot.copy {
                    copies[c].fate = Fate::Shadowed {
                        by: k,
                        why: "a later layer replaced its directory",
                    };
                }
            }
        }
    }
    let is_copy = e.kind == Kind::File && e.size > 0;
    match &old {
        None if !is_dir => {
            r.files_added += 1;
            r.bytes_added += e.size;
        }
        None => {}
        Some((o, _)) if is_dir && o.kind == Kind::Dir => {}
        Some((o, copy)) => {
            let same_content = o.kind == Kind::File && e.kind == Kind::File && o.digest == e.digest;
            if same_content {
                let what = metadata_change(o, e);
                if !what.is_empty() {
                    r.metadata_only += 1;
                    r.metadata_only_bytes += e.size;
                }
                if let Some(c) = copy {
                    copies[*c].fate = Fate::Reshipped { by: k, what };
                }
            } else {
                r.files_modified += 1;
                r.bytes_modified += e.size;
                if let Some(c) = copy {
                    copies[*c].fate = Fate::Shadowed {
                        by: k,
                        why: "a later layer replaced it with other content",
                    };
                }
            }
        }
    }
    let copy = is_copy.then(|| {
        copies.push(Copy {
            layer: k,
            entry: e.clone(),
            fate: Fate::Live,
        });
        copies.len() - 1
    });
    view.insert(
        e.path.clone(),
        Slot {
            entry: e.clone(),
            copy,
        },
    );
}

/// dive's visit of one layer's leaves, against the view of the layers below it.
fn dive_layer(
    mine: &[&Arc<Entry>],
    below: &BTreeMap<Vec<u8>, Slot>,
    dive: &mut HashMap<Vec<u8>, DivePath>,
) {
    // dive never adds an opaque marker to its tree, so it makes no parent a non-leaf.
    let nodes: Vec<&Arc<Entry>> = mine
        .iter()
        .copied()
        .filter(|e| e.kind != Kind::Opaque && !e.path.is_empty())
        .collect();
    let mut parents: HashSet<&[u8]> = HashSet::new();
    for e in &nodes {
        for (i, &b) in e.path.iter().enumerate() {
            if b == b'/' {
                parents.insert(&e.path[..i]);
            }
        }
    }
    for e in nodes {
        if parents.contains(&e.path[..]) {
            continue;
        }
        let (path, size) = if e.kind == Kind::Whiteout {
            let (dir, name) = split_parent(&e.path);
            let Marker::Whiteout(hidden) = changeset::marker_of(name) else {
                continue;
            };
            let target = crate::paths::child_path(dir, hidden);
            let size = match below.get(&target) {
                Some(s) if s.entry.kind == Kind::Dir => subtree(below, &target, true)
                    .iter()
                    .map(|key| below[key].entry.size)
                    .sum(),
                _ => 0,
            };
            (target, size)
        } else {
            (e.path.clone(), e.size)
        };
        let d = dive.entry(path).or_default();
        if d.count == 0 || size < d.min {
            d.min = size;
        }
        d.count += 1;
        d.cumulative += size;
    }
}

fn finish_dive(a: &mut Analysis, dive: HashMap<Vec<u8>, DivePath>, sizes: &[u64]) {
    let (mut min, mut all, mut wasted) = (0u64, 0u64, 0u64);
    let mut refs = Vec::new();
    for (path, d) in dive {
        min += d.min;
        all += d.cumulative;
        if d.count >= 2 {
            wasted += d.cumulative;
            refs.push(FileReference {
                count: d.count,
                size_bytes: d.cumulative,
                file: show(&path),
            });
        }
    }
    refs.sort_by(|a, b| (a.size_bytes, &a.file).cmp(&(b.size_bytes, &b.file)));
    let im = &mut a.image;
    im.efficiency_score = if all == 0 {
        1.0
    } else {
        min as f64 / all as f64
    };
    im.inefficient_bytes = wasted;
    im.file_reference = refs;
    im.size_bytes = sizes.iter().sum();
    im.user_size_bytes = sizes.iter().skip(1).sum();
    im.user_wasted_percent = if im.user_size_bytes == 0 {
        0.0
    } else {
        wasted as f64 / im.user_size_bytes as f64
    };
}

fn finish_waste(a: &mut Analysis, copies: &[Copy]) {
    let mut items: Vec<WasteItem> = Vec::new();
    let item =
        |kind, c: &Copy, by: Option<usize>, bytes, other: Option<String>, reason| WasteItem {
            kind,
            path: show(&c.entry.path),
            layers: std::iter::once(c.layer).chain(by).collect(),
            bytes,
            other_path: other,
            reason,
        };
    // Dead copies: each ended by exactly one event.
    for c in copies {
        let size = c.entry.size;
        match &c.fate {
            Fate::Live => {}
            Fate::Reshipped { by, what } if what.is_empty() => items.push(item(
                WasteKind::Duplicate,
                c,
                Some(*by),
                size,
                None,
                format!("layer {by} ships the same file again, content and metadata unchanged: the copy in layer {} is never seen", c.layer),
            )),
            Fate::Reshipped { by, what } => items.push(item(
                WasteKind::MetadataOnly,
                c,
                Some(*by),
                size,
                None,
                format!("layer {by} changes only its metadata ({what}), but a layer tar can only ship whole files, so the same {size} bytes are shipped again"),
            )),
            Fate::Shadowed { by, why } => items.push(item(
                WasteKind::Shadowed,
                c,
                Some(*by),
                size,
                None,
                format!("{why} (layer {by}): these bytes are shipped but never seen"),
            )),
            Fate::Deleted { by, marker } => items.push(item(
                WasteKind::Deleted,
                c,
                Some(*by),
                size,
                Some(show(marker)),
                format!("deleted by layer {by} ({}): shipped, then hidden; deleting in a later layer never makes an image smaller", show(marker)),
            )),
        }
    }
    // Live copies whose content an earlier live copy already has.
    let mut first: HashMap<Blake3, usize> = HashMap::new();
    let mut kept: Vec<usize> = Vec::new();
    for (i, c) in copies.iter().enumerate() {
        if !matches!(c.fate, Fate::Live) {
            continue;
        }
        let Some(d) = c.entry.digest else {
            kept.push(i);
            continue;
        };
        match first.get(&d) {
            Some(&j) => {
                let o = &copies[j];
                let where_ = if o.layer == c.layer {
                    "in the same layer".to_string()
                } else {
                    format!("in layer {}", o.layer)
                };
                items.push(WasteItem {
                    kind: WasteKind::Duplicate,
                    path: show(&c.entry.path),
                    layers: vec![c.layer, o.layer],
                    bytes: c.entry.size,
                    other_path: Some(show(&o.entry.path)),
                    reason: format!(
                        "identical content is already shipped at {} {where_}: a hardlink or a single copy would do",
                        show(&o.entry.path)
                    ),
                });
            }
            None => {
                first.insert(d, i);
                kept.push(i);
            }
        }
    }
    // Chunks a kept file shares with an earlier kept file.
    let mut owner: HashMap<Blake3, usize> = HashMap::new();
    for &i in &kept {
        let c = &copies[i];
        let mut shared: HashMap<usize, u64> = HashMap::new();
        for ch in &c.entry.chunks {
            match owner.get(&ch.digest) {
                Some(&j) if j != i => *shared.entry(j).or_default() += u64::from(ch.len),
                Some(_) => {}
                None => {
                    owner.insert(ch.digest, i);
                }
            }
        }
        let bytes: u64 = shared.values().sum();
        if bytes == 0 {
            continue;
        }
        let (&j, _) = shared
            .iter()
            .max_by_key(|(j, b)| (**b, std::cmp::Reverse(**j)))
            .expect("non-empty");
        let o = &copies[j];
        items.push(WasteItem {
            kind: WasteKind::NearDuplicate,
            path: show(&c.entry.path),
            layers: vec![c.layer, o.layer],
            bytes,
            other_path: Some(show(&o.entry.path)),
            reason: format!(
                "{bytes} of its {} bytes are chunks {} {} already has: a chunk-level store keeps them once, a registry ships them again",
                c.entry.size,
                if shared.len() > 1 { "that other files such as" } else { "that" },
                show(&o.entry.path)
            ),
        });
    }

    let mut totals: BTreeMap<&'static str, WasteTotal> = WasteKind::ALL
        .iter()
        .map(|k| (k.name(), WasteTotal::default()))
        .collect();
    for it in &items {
        let t = totals.get_mut(it.kind.name()).expect("every kind");
        t.count += 1;
        t.bytes += it.bytes;
        if let Some(r) = a.layer.get_mut(it.layers[0]) {
            r.wasted_bytes += it.bytes;
        }
        // A dead copy's waste is caused by the layer that ended it; a live duplicate's or
        // near-duplicate's by the layer that ships it.
        let dead = it.other_path.is_none() || it.kind == WasteKind::Deleted;
        let cause = if dead { it.layers[1] } else { it.layers[0] };
        if let Some(r) = a.layer.get_mut(cause) {
            r.caused_waste_bytes += it.bytes;
        }
    }
    items.sort_by(|x, y| y.bytes.cmp(&x.bytes).then_with(|| x.path.cmp(&y.path)));

    let im = &mut a.image;
    im.layers = a.layer.len();
    im.tar_bytes = a.layer.iter().map(|l| l.tar_bytes).sum();
    im.compressed_bytes = a.layer.iter().map(|l| l.compressed_bytes).sum();
    im.shipped_bytes = copies.iter().map(|c| c.entry.size).sum();
    let live: Vec<&Copy> = copies
        .iter()
        .filter(|c| matches!(c.fate, Fate::Live))
        .collect();
    im.live_files = live.len() as u64;
    im.live_bytes = live.iter().map(|c| c.entry.size).sum();
    im.wasted_bytes = totals.values().map(|t| t.bytes).sum();
    im.efficiency = if im.shipped_bytes == 0 {
        1.0
    } else {
        1.0 - im.wasted_bytes as f64 / im.shipped_bytes as f64
    };
    a.waste = WasteReport { totals, items };
}

/// What two images share, and what updating from one to the other costs to pull.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Comparison {
    /// Indices in `b` of the layers `a` has too, and their tar bytes.
    pub shared_layers: Vec<usize>,
    pub shared_layer_bytes: u64,
    /// Distinct chunks of `b` (count, bytes), and those `a` has too.
    pub b_chunks: u64,
    pub b_chunk_bytes: u64,
    pub shared_chunks: u64,
    pub shared_chunk_bytes: u64,
    /// The cost of pulling `b` with `a` present, three ways.
    pub update: UpdateCost,
}

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateCost {
    /// Layers of `b` that `a` lacks: count, tar bytes, compressed bytes where all are known.
    pub layers: u64,
    pub layer_bytes: u64,
    pub layer_compressed_bytes: Option<u64>,
    /// Distinct file contents of `b` that no file of `a` has: count, bytes.
    pub files: u64,
    pub file_bytes: u64,
    /// Distinct chunks of `b` that `a` lacks: count, bytes.
    pub chunks: u64,
    pub chunk_bytes: u64,
}

impl Comparison {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("plain data serialises")
    }
}

fn files_of(s: &Stack) -> impl Iterator<Item = &Arc<Entry>> {
    s.layer_entries()
        .iter()
        .flat_map(|l| l.iter())
        .filter(|e| e.kind == Kind::File && e.size > 0)
}

/// Compare two images by their indices: `b_compressed[i]` is layer `i` of `b`'s compressed size.
pub fn compare(a: &Stack, b: &Stack, b_compressed: &[Option<u64>]) -> Comparison {
    let a_layers: HashSet<Blake3> = a.layers.iter().map(|l| l.id).collect();
    let a_files: HashSet<Blake3> = files_of(a).filter_map(|e| e.digest).collect();
    let a_chunks: HashSet<Blake3> = files_of(a)
        .flat_map(|e| e.chunks.iter().map(|c| c.digest))
        .collect();
    let mut out = Comparison::default();
    let mut compressed = Some(0u64);
    for (i, l) in b.layers.iter().enumerate() {
        if a_layers.contains(&l.id) {
            out.shared_layers.push(i);
            out.shared_layer_bytes += l.size;
        } else {
            out.update.layers += 1;
            out.update.layer_bytes += l.size;
            compressed = compressed
                .zip(b_compressed.get(i).copied().flatten())
                .map(|(x, y)| x + y);
        }
    }
    out.update.layer_compressed_bytes = compressed;
    let mut seen_files: HashSet<Blake3> = HashSet::new();
    let mut seen_chunks: HashSet<Blake3> = HashSet::new();
    for e in files_of(b) {
        if let Some(d) = e.digest {
            if seen_files.insert(d) && !a_files.contains(&d) {
                out.update.files += 1;
                out.update.file_bytes += e.size;
            }
        }
        for c in &e.chunks {
            if seen_chunks.insert(c.digest) {
                out.b_chunks += 1;
                out.b_chunk_bytes += u64::from(c.len);
                if a_chunks.contains(&c.digest) {
                    out.shared_chunks += 1;
                    out.shared_chunk_bytes += u64::from(c.len);
                } else {
                    out.update.chunks += 1;
                    out.update.chunk_bytes += u64::from(c.len);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, content: &str, mode: u32) -> Arc<Entry> {
        let mut e = Entry::new(path.as_bytes().to_vec(), Kind::File, b'0', mode);
        e.size = content.len() as u64;
        e.digest = Some(Blake3(*blake3::hash(content.as_bytes()).as_bytes()));
        Arc::new(e)
    }

    fn node(path: &str, kind: Kind) -> Arc<Entry> {
        Arc::new(Entry::new(path.as_bytes().to_vec(), kind, b'5', 0o755))
    }

    fn stack(layers: Vec<Vec<Arc<Entry>>>) -> Stack {
        let mut s = Stack::empty();
        for (i, entries) in layers.into_iter().enumerate() {
            let id = Blake3(*blake3::hash(&[i as u8]).as_bytes());
            let info = LayerInfo {
                id,
                diff_id: format!("sha256:{i}"),
                tree_id: id,
                size: 10240,
                entry_count: entries.len() as u64,
                compressed_digest: None,
                compression: None,
                created_unix: 0,
            };
            s.push_mut(info, Arc::new(entries), 127).unwrap();
        }
        s
    }

    fn total(a: &Analysis, kind: WasteKind) -> u64 {
        a.waste.totals[kind.name()].bytes
    }

    #[test]
    fn a_chmod_only_layer_is_metadata_waste_and_dive_counts_both_copies() {
        let s = stack(vec![
            vec![file("a", "0123456789", 0o644)],
            vec![file("a", "0123456789", 0o755)],
        ]);
        let a = analyze(&s, &[]);
        assert_eq!(total(&a, WasteKind::MetadataOnly), 10);
        assert_eq!(a.image.wasted_bytes, 10);
        assert_eq!(a.layer[1].metadata_only, 1);
        assert_eq!(a.layer[0].wasted_bytes, 10);
        assert!(a.waste.items[0].reason.contains("mode 644→755"));
        // dive: /a seen twice, 10 + 10, smallest 10.
        assert_eq!(a.image.inefficient_bytes, 20);
        assert!((a.image.efficiency_score - 0.5).abs() < 1e-12);
        assert!((a.image.efficiency - 0.5).abs() < 1e-12);
    }

    #[test]
    fn the_kinds_never_overlap() {
        let s = stack(vec![
            vec![
                node("d", Kind::Dir),
                file("d/x", "xxxx", 0o644),
                file("keep", "same", 0o644),
                file("gone", "bye!", 0o644),
            ],
            vec![
                node(".wh.d", Kind::Whiteout),
                file("keep", "other", 0o644),
                file("copy", "same", 0o644),
                file("gone", "bye!", 0o644),
            ],
        ]);
        let a = analyze(&s, &[]);
        assert_eq!(total(&a, WasteKind::Deleted), 4); // d/x
        assert_eq!(total(&a, WasteKind::Shadowed), 4); // keep v1
        assert_eq!(total(&a, WasteKind::Duplicate), 4); // gone shipped again unchanged
        assert_eq!(a.layer[1].files_deleted, 1);
        assert_eq!(a.layer[1].files_modified, 1);
        // "copy" equals the dead first "keep", not a live file: not a duplicate.
        assert_eq!(a.waste.items.len(), 3);
        // dive: the whiteout of directory d is sized as d's lower subtree (4 bytes).
        let d = a.image.file_reference.iter().find(|r| r.file == "/d");
        assert!(d.is_none(), "d was not a leaf in layer 0");
        assert!(a.image.shipped_bytes >= a.image.wasted_bytes);
    }

    #[test]
    fn file_histories_equal_the_stacks_provenance() {
        let s = stack(vec![
            vec![
                node("d", Kind::Dir),
                file("d/a", "1", 0o644),
                file("d/b", "2", 0o644),
            ],
            vec![
                node("d/.wh..wh..opq", Kind::Opaque),
                file("d/a", "3", 0o644),
            ],
            vec![node(".wh.d", Kind::Whiteout), file("e/f", "4", 0o644)],
            vec![file("d/b", "5", 0o600), file("e/f", "4", 0o755)],
        ]);
        let rows = files(&s);
        assert_eq!(
            rows.iter().map(|r| r.path.as_str()).collect::<Vec<_>>(),
            ["/d/b", "/e/f"]
        );
        for r in &rows {
            let want: Vec<Touch> = s
                .provenance(&r.path.as_bytes()[1..])
                .into_iter()
                .map(|(layer, t)| Touch {
                    layer,
                    touch: t.name(),
                })
                .collect();
            assert_eq!(r.history, want, "{}", r.path);
        }
        assert_eq!(rows[0].layer, 3);
        assert_eq!(rows[0].history.len(), 4);
    }
}
