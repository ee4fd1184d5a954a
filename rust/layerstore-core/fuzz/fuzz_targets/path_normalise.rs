//! Path normalisation from arbitrary bytes: tar member names (`normalize_name`, what every entry
//! path of a layer goes through), names inside an image archive (`normalise_source_name`) and
//! symlink targets resolved inside one (`resolve_dots`).
//!
//! Invariants: a normal name is relative, has no empty, `.` or `..` component and no NUL; its
//! depth is its number of components; normalising it again changes nothing; a name is refused
//! exactly when it has a NUL (member names) or a `..` component; the archive-name normaliser
//! agrees with the member-name one on every UTF-8 name; resolving `..` never climbs above the
//! root and gives a normal name.
#![no_main]

use layerstore_core::fuzzing::{normalise_source_name, normalize_name, resolve_dots, BadName};
use libfuzzer_sys::fuzz_target;

fn components(p: &[u8]) -> impl Iterator<Item = &[u8]> {
    p.split(|&b| b == b'/')
}

/// Relative, no empty / `.` / `..` component, no NUL (the empty path is the root).
fn assert_normal(p: &[u8]) {
    if p.is_empty() {
        return;
    }
    assert!(!p.contains(&0), "no NUL in {p:?}");
    assert!(!p.starts_with(b"/"), "relative: {p:?}");
    for c in components(p) {
        assert!(!matches!(c, b"" | b"." | b".."), "component {c:?} in {p:?}");
    }
}

fuzz_target!(|raw: &[u8]| {
    let has_parent = components(raw).any(|c| c == b"..");
    let member = normalize_name(raw);
    match &member {
        Ok((p, depth)) => {
            assert_normal(p);
            assert_eq!(
                *depth as usize,
                components(p).filter(|c| !c.is_empty()).count()
            );
            assert_eq!(
                normalize_name(p).as_ref(),
                Ok(&(p.clone(), *depth)),
                "idempotent"
            );
            assert!(!has_parent);
        }
        Err(BadName::Nul) => assert!(raw.contains(&0)),
        Err(BadName::Escapes) => assert!(has_parent && !raw.contains(&0)),
    }

    let utf8 = std::str::from_utf8(raw).is_ok();
    let source = normalise_source_name(raw);
    if let Some(s) = &source {
        assert_normal_or_nul(s.as_bytes());
        assert_eq!(
            normalise_source_name(s.as_bytes()).as_ref(),
            Some(s),
            "idempotent"
        );
    }
    if utf8 && !raw.contains(&0) {
        assert_eq!(
            source.as_deref().map(str::as_bytes),
            member.as_ref().ok().map(|(p, _)| &p[..]),
            "archive names and member names normalise alike"
        );
    }

    if let Some(r) = resolve_dots(raw) {
        assert_normal_or_nul(r.as_bytes());
        assert_eq!(resolve_dots(r.as_bytes()).as_ref(), Some(&r), "idempotent");
        // Resolving is lexical: the result has at most as many components as the input.
        let depth = |p: &[u8]| components(p).filter(|c| !matches!(*c, b"" | b".")).count();
        assert!(depth(r.as_bytes()) <= depth(raw));
    }
});

/// As [`assert_normal`], but a NUL inside a component is allowed (archive names are looked up,
/// never created, so they may hold one).
fn assert_normal_or_nul(p: &[u8]) {
    if p.is_empty() {
        return;
    }
    assert!(!p.starts_with(b"/"), "relative: {p:?}");
    for c in components(p) {
        assert!(!matches!(c, b"" | b"." | b".."), "component {c:?} in {p:?}");
    }
}
