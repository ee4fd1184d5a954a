//! Changesets: the change types, the whiteout vocabulary, and the mapping between changes and
//! tar member paths.
//!
//! Invariants: this is the only module that spells a marker name. A whiteout `.wh.NAME` hides
//! `NAME` (and everything under it) in lower layers; an opaque marker `.wh..wh..opq` in a
//! directory hides every lower child of that directory; other names starting `.wh..wh.` are AUFS
//! metadata (`.wh..wh.plnk`…), which is neither a marker nor part of any view, but is kept for
//! export. A change's `path` is the path it is *about* (the hidden path, the opaque directory);
//! [`member_path`] gives the tar member that carries it, and [`marker_of`] reads it back.

use std::sync::Arc;

use crate::layer::Entry;
use crate::paths::{child_path, components, split_parent};
use crate::tarwrite::{Member, MemberKind};

/// `.wh.NAME` hides `NAME`.
const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// `.wh..wh..opq` hides every lower child of its directory.
const OPAQUE: &[u8] = b".wh..wh..opq";
/// AUFS metadata names: not markers, not part of the view.
const AUFS_META_PREFIX: &[u8] = b".wh..wh.";

/// What a path component means as a marker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Marker<'a> {
    /// `.wh.NAME`: hides `NAME` (which may be empty, `.` or `..`: invalid input, for the caller
    /// to refuse).
    Whiteout(&'a [u8]),
    /// `.wh..wh..opq`.
    Opaque,
    /// Not a marker (AUFS metadata included).
    No,
}

/// What the last component `name` of a member path means.
pub fn marker_of(name: &[u8]) -> Marker<'_> {
    if name == OPAQUE {
        Marker::Opaque
    } else if name.starts_with(AUFS_META_PREFIX) {
        Marker::No
    } else if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
        Marker::Whiteout(hidden)
    } else {
        Marker::No
    }
}

/// The name a whiteout member `name` hides (`name` itself when it is not a whiteout).
pub fn hidden_name(name: &[u8]) -> &[u8] {
    match marker_of(name) {
        Marker::Whiteout(hidden) => hidden,
        _ => name,
    }
}

/// AUFS metadata (`.wh..wh.plnk`, `.wh..wh.aufs`…) and everything under it is not part of the
/// view.
pub fn is_aufs_meta(path: &[u8]) -> bool {
    components(path).any(|c| c.starts_with(AUFS_META_PREFIX) && c != OPAQUE)
}

/// The xattr that makes a directory of an overlayfs layer opaque (its value: `y`).
pub const OVERLAY_OPAQUE_XATTR: &[u8] = b"trusted.overlay.opaque";

/// Whether an xattr is one overlayfs reads as an instruction (`trusted.overlay.*`, and
/// `user.overlay.*` for unprivileged mounts). In a layer it is plain data (DESIGN section 3,
/// rule 7): never written to disk as is, or an overlay mount over the result would obey it.
pub fn is_overlay_xattr(name: &[u8]) -> bool {
    name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.")
}

/// The member path of a whiteout hiding `path`.
pub fn whiteout_member(path: &[u8]) -> Vec<u8> {
    let (dir, name) = split_parent(path);
    child_path(dir, &[WHITEOUT_PREFIX, name].concat())
}

/// The member path of the opaque marker of directory `dir`.
pub fn opaque_member(dir: &[u8]) -> Vec<u8> {
    child_path(dir, OPAQUE)
}

/// One member of a changeset. `E` is where an entry's metadata and content come from: a stored
/// entry (the default), or a node of a directory walk.
#[derive(Clone, Debug)]
pub struct Change<E = Arc<Entry>> {
    /// The path the change is about (for a whiteout: the hidden path; for an opaque marker: its
    /// directory), normalised.
    pub path: Vec<u8>,
    pub what: What<E>,
}

#[derive(Clone, Debug)]
pub enum What<E = Arc<Entry>> {
    /// `path` becomes this entry (metadata and, for a regular file, its content).
    Entry(E),
    /// `path` becomes a hard link to `target`, an earlier member; `meta` is the shared inode.
    Link { target: Vec<u8>, meta: E },
    /// A whiteout: hides `path` below.
    Whiteout,
    /// An opaque marker in directory `path`: hides its lower children.
    Opaque,
}

/// The tar member path of a change.
pub fn member_path<E>(change: &Change<E>) -> Vec<u8> {
    match change.what {
        What::Whiteout => whiteout_member(&change.path),
        What::Opaque => opaque_member(&change.path),
        // The root directory's own entry is "./" (an empty name would read as "/").
        _ if change.path.is_empty() => b".".to_vec(),
        _ => change.path.clone(),
    }
}

/// Clamp every entry's mtime to at most `max_ns` (a `SOURCE_DATE_EPOCH`), for reproducible
/// layers; markers are already at 0.
pub fn clamp_mtimes(changes: &mut [Change], max_ns: i64) {
    for c in changes {
        let e = match &mut c.what {
            What::Entry(e) | What::Link { meta: e, .. } => e,
            What::Whiteout | What::Opaque => continue,
        };
        if e.mtime_ns > max_ns {
            Arc::make_mut(e).mtime_ns = max_ns;
        }
    }
}

/// A marker member: an empty regular file, root-owned, mode 0644, mtime 0.
pub fn marker_member(path: &[u8]) -> Member<'_> {
    Member {
        path,
        kind: MemberKind::File { size: 0 },
        mode: 0o644,
        uid: 0,
        gid: 0,
        uname: b"",
        gname: b"",
        mtime_ns: 0,
        xattrs: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_names_read_back_as_what_wrote_them() {
        assert_eq!(
            marker_of(&whiteout_member(b"a/b")[2..]),
            Marker::Whiteout(b"b")
        );
        assert_eq!(whiteout_member(b"a/b"), b"a/.wh.b");
        assert_eq!(opaque_member(b"a"), b"a/.wh..wh..opq");
        assert_eq!(opaque_member(b""), b".wh..wh..opq");
        assert_eq!(marker_of(b".wh..wh..opq"), Marker::Opaque);
        assert_eq!(marker_of(b".wh..wh.plnk"), Marker::No);
        assert_eq!(marker_of(b".wh."), Marker::Whiteout(b""));
        assert_eq!(marker_of(b"wh.x"), Marker::No);
        assert_eq!(hidden_name(b".wh.x"), b"x");
        assert!(is_aufs_meta(b"a/.wh..wh.plnk/x") && !is_aufs_meta(b"a/.wh..wh..opq"));
    }

    #[test]
    fn a_change_maps_to_its_member_path() {
        let c = |path: &[u8], what: What<()>| {
            member_path(&Change {
                path: path.to_vec(),
                what,
            })
        };
        assert_eq!(c(b"etc/x", What::Whiteout), b"etc/.wh.x");
        assert_eq!(c(b"etc", What::Opaque), b"etc/.wh..wh..opq");
        assert_eq!(c(b"", What::Entry(())), b".");
        assert_eq!(c(b"etc", What::Entry(())), b"etc");
    }
}
