//! Paths inside an image, in the one form every index uses.
//!
//! Invariants: a normalised path is relative to the image root, `/`-separated, with no empty or
//! `.` components (`..` is kept: only the resolver, which follows symlinks, may interpret it);
//! the root is the empty path. Paths are bytes: names need not be UTF-8.

/// Split a normalised or user path into components (empty and `.` dropped; `..` kept).
pub fn components(path: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    path.split(|&b| b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
}

/// `dir/name` (just `name` in the root).
pub fn child_path(dir: &[u8], name: &[u8]) -> Vec<u8> {
    if dir.is_empty() {
        name.to_vec()
    } else {
        [dir, b"/", name].concat()
    }
}

/// A path's directory and last component (the root's children have an empty directory).
pub fn split_parent(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

/// The normalised form of `raw` when it is one already but for a leading slash (the common
/// case, with no copy); `None` when it needs [`normalise`].
pub fn as_normal(raw: &[u8]) -> Option<&[u8]> {
    let trimmed = raw.strip_prefix(b"/").unwrap_or(raw);
    is_clean(trimmed).then_some(trimmed)
}

/// A user's path (absolute or not, with any number of slashes and `.`) in normalised form; one
/// copy when the input is already in that form.
pub fn normalise(raw: &[u8]) -> Vec<u8> {
    if let Some(normal) = as_normal(raw) {
        return normal.to_vec();
    }
    let mut out = Vec::with_capacity(raw.len());
    for c in components(raw) {
        if !out.is_empty() {
            out.push(b'/');
        }
        out.extend_from_slice(c);
    }
    out
}

/// [`normalise`], and whether the path ends with a slash (so it must name a directory; never
/// for the root).
pub fn normalise_query(raw: &[u8]) -> (Vec<u8>, bool) {
    let p = normalise(raw);
    let must_be_dir = raw.ends_with(b"/") && !p.is_empty();
    (p, must_be_dir)
}

/// Whether every `/`-separated component is non-empty and not `.` (one pass over the bytes).
fn is_clean(path: &[u8]) -> bool {
    let mut start = 0;
    for (i, b) in path.iter().copied().enumerate().chain([(path.len(), b'/')]) {
        if b == b'/' {
            let comp = &path[start..i];
            if comp.is_empty() || comp == b"." {
                return false;
            }
            start = i + 1;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_paths_normalise_to_the_index_form() {
        for (raw, want) in [
            (&b"/etc/passwd"[..], &b"etc/passwd"[..]),
            (b"etc//./passwd/", b"etc/passwd"),
            (b"/", b""),
            (b"", b""),
            (b"./a/../b", b"a/../b"),
        ] {
            assert_eq!(normalise(raw), want, "{:?}", String::from_utf8_lossy(raw));
        }
        assert_eq!(normalise_query(b"/etc/"), (b"etc".to_vec(), true));
        assert_eq!(normalise_query(b"/"), (Vec::new(), false));
    }

    #[test]
    fn parents_and_children() {
        assert_eq!(split_parent(b"a/b/c"), (&b"a/b"[..], &b"c"[..]));
        assert_eq!(split_parent(b"c"), (&b""[..], &b"c"[..]));
        assert_eq!(child_path(b"", b"c"), b"c");
        assert_eq!(child_path(b"a", b"c"), b"a/c");
    }
}
