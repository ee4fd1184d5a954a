//! Integration tests of OCI layouts and docker archives in the core alone: export → import →
//! export keeps every digest for each compression, and a corrupt blob changes nothing.

use std::io::Cursor;
use std::path::Path;

use layerstore_core::compress::Compression;
use layerstore_core::oci::docker::DockerExportOptions;
use layerstore_core::oci::OciExportOptions;
use layerstore_core::stack::Stack;
use layerstore_core::store::{no_progress, ImportOptions, StoreOptions};
use layerstore_core::tar::Limits;
use layerstore_core::{ErrorKind, Store};

fn open(dir: &Path) -> Store {
    Store::open(dir, StoreOptions::default(), Limits::default()).unwrap()
}

fn layer_tar(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// A two-layer image made in `store`; the second layer deletes a file of the first.
fn image(store: &Store) -> Stack {
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let layers = [
        layer_tar(&[
            ("etc/os-release", b"ID=test\n"),
            ("big.bin", &big),
            ("gone", b"x"),
        ]),
        layer_tar(&[("etc/motd", b"hello\n"), (".wh.gone", b"")]),
    ]
    .iter()
    .map(|t| {
        store
            .import_tar(
                Box::new(Cursor::new(t.clone())),
                &ImportOptions::default(),
                &no_progress,
            )
            .unwrap()
            .layer
    })
    .collect::<Vec<_>>();
    store.stack(&layers).unwrap()
}

fn diff_ids(s: &Stack) -> Vec<String> {
    s.layers.iter().map(|l| l.diff_id.clone()).collect()
}

#[test]
fn layouts_round_trip_digest_for_digest() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("a"));
    let made = image(&store);
    for (i, c) in [Compression::Gzip, Compression::Zstd, Compression::None]
        .into_iter()
        .enumerate()
    {
        let out = dir.path().join(format!("layout{i}"));
        let opts = OciExportOptions {
            tag: Some("v1".into()),
            compression: Some(c),
        };
        let first = store.export_oci(&made, &out, &opts, &no_progress).unwrap();
        let other = open(&dir.path().join(format!("b{i}")));
        let images = other.import_oci(&out, None, &no_progress).unwrap();
        assert_eq!(images.len(), 1);
        assert_eq!(images[0].name, "v1");
        let back = &images[0].stack;
        assert_eq!(diff_ids(back), diff_ids(&made));
        assert_eq!(back.image.as_ref().unwrap(), &first.digests);
        // Our own blobs are rebuilt by recompression: nothing is kept beside the chunks.
        assert!(
            !other.root().join("blobs/sha256").exists()
                || other
                    .root()
                    .join("blobs/sha256")
                    .read_dir()
                    .unwrap()
                    .next()
                    .is_none()
        );
        let again = dir.path().join(format!("again{i}"));
        let second = other
            .export_oci(back, &again, &OciExportOptions::default(), &no_progress)
            .unwrap();
        assert_eq!(second.digests, first.digests);
        assert_eq!(second.layers, first.layers);
    }
}

#[test]
fn a_corrupt_blob_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("a"));
    let made = image(&store);
    let out = dir.path().join("layout");
    let opts = OciExportOptions {
        tag: Some("v1".into()),
        compression: Some(Compression::Gzip),
    };
    let exported = store.export_oci(&made, &out, &opts, &no_progress).unwrap();
    // Flip a byte in the middle of the top layer's gzip stream (its size stays right).
    let (top, _, _) = exported.layers.last().unwrap();
    let path = out
        .join("blobs/sha256")
        .join(top.trim_start_matches("sha256:"));
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&path, bytes).unwrap();
    let other = open(&dir.path().join("b"));
    let err = other.import_oci(&out, None, &no_progress).unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::Integrity | ErrorKind::InvalidLayer),
        "{err}"
    );
    assert!(err.to_string().contains(top.as_str()), "{err}");
    assert!(other.layers().unwrap().is_empty());
    assert!(other.tags().unwrap().is_empty());
}

#[test]
fn docker_archives_round_trip_in_both_formats() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("a"));
    let made = image(&store);
    for classic in [false, true] {
        let archive = dir.path().join(format!("image-{classic}.tar"));
        let opts = DockerExportOptions {
            tag: Some("example.com/app:v1".into()),
            classic,
        };
        let exported = store
            .export_docker_archive(&made, &archive, &opts, &no_progress)
            .unwrap();
        let other = open(&dir.path().join(format!("b-{classic}")));
        let images = other.import_docker_archive(&archive, &no_progress).unwrap();
        assert_eq!(images.len(), 1);
        assert_eq!(images[0].name, "example.com/app:v1");
        assert_eq!(diff_ids(&images[0].stack), diff_ids(&made));
        let digests = images[0].stack.image.as_ref().unwrap();
        assert_eq!(digests.config, exported.digests.config);
        if !classic {
            assert_eq!(digests.manifest, exported.digests.manifest);
        }
    }
}
