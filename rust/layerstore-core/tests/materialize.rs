//! Integration tests of materialize and apply on tars from the Rust `tar` crate: the view on
//! disk, whiteouts and opaque markers applied, and symlinks planted in the target never followed.
//! (The Python suite adds the overlayfs oracle, every metadata field, and races.)

use std::fs;
use std::io::Cursor;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::Path;

use layerstore_core::layer::LayerInfo;
use layerstore_core::materialize::WriteOptions;
use layerstore_core::store::{no_progress, ImportOptions, StoreOptions};
use layerstore_core::tar::Limits;
use layerstore_core::{ErrorKind, Store};

enum E<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8]),
    Link(&'a str, &'a str),
    Hard(&'a str, &'a str),
}

fn tar_of(entries: &[E<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_600_000_000);
        let (path, kind, data, link): (&str, _, &[u8], _) = match *e {
            E::Dir(p) => (p, tar::EntryType::Directory, b"", None),
            E::File(p, d) => (p, tar::EntryType::Regular, d, None),
            E::Link(p, t) => (p, tar::EntryType::Symlink, b"", Some(t)),
            E::Hard(p, t) => (p, tar::EntryType::Link, b"", Some(t)),
        };
        h.set_entry_type(kind);
        h.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_size(data.len() as u64);
        if let Some(t) = link {
            h.set_link_name(t).unwrap();
        }
        h.set_path(path).unwrap();
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

fn import(store: &Store, entries: &[E<'_>]) -> LayerInfo {
    store
        .import_tar(
            Box::new(Cursor::new(tar_of(entries))),
            &ImportOptions::default(),
            &no_progress,
        )
        .unwrap()
        .layer
}

fn open(dir: &Path) -> Store {
    Store::open(
        &dir.join("store"),
        StoreOptions::default(),
        Limits::default(),
    )
    .unwrap()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn materialize_writes_the_view_and_refuses_an_existing_dest() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let base = import(
        &store,
        &[
            E::Dir("etc/"),
            E::File("etc/a", b"a"),
            E::File("etc/gone", b"x"),
            E::Hard("etc/a2", "etc/a"),
            E::Link("lnk", "etc/a"),
        ],
    );
    let upper = import(
        &store,
        &[E::File("etc/.wh.gone", b""), E::File("new/b", b"bb")],
    );
    let stack = store.stack(&[base, upper]).unwrap();
    let dest = tmp.path().join("out");
    let opts = WriteOptions::default();
    let report = store
        .materialize(&stack, &dest, &opts, &no_progress)
        .unwrap();
    assert_eq!(names(&dest), ["etc", "lnk", "new"]);
    assert_eq!(names(&dest.join("etc")), ["a", "a2"]);
    assert_eq!(fs::read(dest.join("new/b")).unwrap(), b"bb");
    assert_eq!(
        fs::metadata(dest.join("etc/a")).unwrap().ino(),
        fs::metadata(dest.join("etc/a2")).unwrap().ino()
    );
    assert_eq!(
        fs::read_link(dest.join("lnk")).unwrap().to_str(),
        Some("etc/a")
    );
    assert_eq!((report.entries, report.bytes), (6, 3));
    let again = store.materialize(&stack, &dest, &opts, &no_progress);
    let err = again.unwrap_err();
    assert_eq!(
        err.io_error().map(std::io::Error::kind),
        Some(std::io::ErrorKind::AlreadyExists)
    );
    // Nothing beside the destination but the store.
    assert_eq!(names(tmp.path()), ["out", "store"]);
}

#[test]
fn apply_processes_markers_and_never_follows_symlinks() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let victim = tmp.path().join("victim");
    fs::create_dir(&victim).unwrap();
    fs::write(victim.join("keep"), b"victim").unwrap();
    let dest = tmp.path().join("dest");
    fs::create_dir_all(dest.join("opq")).unwrap();
    fs::write(dest.join("opq/old"), b"old").unwrap();
    fs::write(dest.join("gone"), b"gone").unwrap();
    symlink(&victim, dest.join("evil")).unwrap();
    let layer = import(
        &store,
        &[
            E::File("opq/new", b"n"),
            E::File("opq/.wh..wh..opq", b""),
            E::File(".wh.gone", b""),
            E::File("evil/keep", b"pwned"),
            E::File("evil/.wh.keep", b""),
        ],
    );
    let report = store.apply(&layer, &dest, &no_progress).unwrap();
    assert_eq!(names(&dest), ["evil", "opq"]);
    assert_eq!(names(&dest.join("opq")), ["new"]);
    assert!(fs::symlink_metadata(dest.join("evil")).unwrap().is_dir());
    assert_eq!(fs::read(dest.join("evil/keep")).unwrap(), b"pwned");
    assert_eq!(fs::read(victim.join("keep")).unwrap(), b"victim");
    assert_eq!(names(&victim), ["keep"]);
    // opq/old (opaque marker) and gone (whiteout) removed; the symlink evil replaced by a
    // directory.
    assert_eq!((report.removed, report.replaced), (2, 1), "{report:?}");
}

#[test]
fn apply_rejects_a_hardlink_to_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let dest = tmp.path().join("dest");
    fs::create_dir(&dest).unwrap();
    let layer = import(&store, &[E::Hard("h", "missing/target")]);
    let err = store.apply(&layer, &dest, &no_progress).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidLayer, "{err}");
    assert!(names(&dest).is_empty(), "{:?}", names(&dest));
}
