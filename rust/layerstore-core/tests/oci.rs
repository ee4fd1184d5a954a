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
use sha2::Digest as _;

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

/// A layer made in `store` from `files`.
fn layer(store: &Store, files: &[(&str, &[u8])]) -> layerstore_core::layer::LayerInfo {
    let tar = layer_tar(files);
    store
        .import_tar(
            Box::new(Cursor::new(tar)),
            &ImportOptions::default(),
            &no_progress,
        )
        .unwrap()
        .layer
}

/// Export `layers` as an uncompressed layout at `out`; returns the layer blob paths.
fn uncompressed_layout(
    store: &Store,
    layers: &[layerstore_core::layer::LayerInfo],
    out: &Path,
) -> Vec<std::path::PathBuf> {
    let opts = OciExportOptions {
        tag: Some("v1".into()),
        compression: Some(Compression::None),
    };
    let image = store.stack(layers).unwrap();
    let exported = store.export_oci(&image, out, &opts, &no_progress).unwrap();
    exported
        .layers
        .iter()
        .map(|(d, _, _)| {
            out.join("blobs/sha256")
                .join(d.trim_start_matches("sha256:"))
        })
        .collect()
}

/// Runs `then` the `nth` time a layer import starts (the import reports progress 0 when it
/// reads its first block; every layer before it has committed by then).
fn on_layer_start(
    nth: usize,
    then: impl Fn() + Sync,
) -> impl Fn(u64) -> layerstore_core::Result<()> + Sync {
    let starts = std::sync::atomic::AtomicUsize::new(0);
    move |done| {
        if done == 0 && starts.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == nth {
            then();
        }
        Ok(())
    }
}

/// Two imports of images sharing layer L, through two handles on one store (as two processes
/// would): A creates L, B finds it and goes on, A fails on its next blob and undoes what it
/// created while B is still importing, then B commits. L must survive A's undo.
#[test]
fn an_aborted_import_keeps_a_layer_another_import_uses() {
    let dir = tempfile::tempdir().unwrap();
    let src = open(&dir.path().join("src"));
    let big: Vec<u8> = (0..2_000_000u32).map(|i| (i * 13 % 241) as u8).collect();
    let shared = layer(
        &src,
        &[("etc/shared", b"both images\n"), ("shared.bin", &big)],
    );
    let broken = layer(&src, &[("a.bin", &big[..1_000_000])]);
    let good = layer(&src, &[("b.txt", b"only in B\n")]);
    let layout_a = dir.path().join("a");
    let layout_b = dir.path().join("b");
    let blobs_a = uncompressed_layout(&src, &[shared.clone(), broken], &layout_a);
    uncompressed_layout(&src, &[shared.clone(), good], &layout_b);
    let mut bytes = std::fs::read(&blobs_a[1]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55; // inside a.bin's data: the size stays right, the diff_id does not
    std::fs::write(&blobs_a[1], bytes).unwrap();

    let root = dir.path().join("store");
    let (a, b) = (open(&root), open(&root));
    let (a_made_l, a_made_l_rx) = crossbeam_channel::bounded::<()>(1);
    let (b_has_l, b_has_l_rx) = crossbeam_channel::bounded::<()>(1);
    let (a_failed, a_failed_rx) = crossbeam_channel::bounded::<()>(1);
    let wait = |rx: &crossbeam_channel::Receiver<()>| {
        rx.recv_timeout(std::time::Duration::from_secs(60)).unwrap();
    };
    let imported_b = std::thread::scope(|s| {
        let b_thread = s.spawn(|| {
            wait(&a_made_l_rx);
            // B's second layer starts: it has imported L (found, since A made it) and holds it.
            let progress = on_layer_start(2, || {
                b_has_l.send(()).unwrap();
                wait(&a_failed_rx);
            });
            b.import_oci(&layout_b, None, &progress)
        });
        // A's second (corrupt) layer starts: A has created L.
        let progress = on_layer_start(2, || {
            a_made_l.send(()).unwrap();
            wait(&b_has_l_rx);
        });
        let err = a.import_oci(&layout_a, None, &progress).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Integrity, "{err}");
        // B is still importing: gc leaves what it uses alone (checked once B has committed).
        a.gc().unwrap();
        a_failed.send(()).unwrap();
        b_thread.join().unwrap()
    });

    let images = imported_b.expect("B imports although A undid its import meanwhile");
    let stack = &images[0].stack;
    assert_eq!(stack.layers[0].id, shared.id);
    assert!(
        a.layer(&shared.id.to_string()).is_ok(),
        "L survived A's undo"
    );
    let stack = a.get("v1").unwrap();
    for l in &stack.layers {
        let mut out = Vec::new();
        let exported = a
            .export_tar(&l.id, &mut out, Compression::None, &no_progress)
            .unwrap();
        assert_eq!(exported.digest, l.diff_id);
        let sha = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&out)));
        assert_eq!(sha, l.diff_id);
    }
    let report = a.fsck(false).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    // With both imports over, nothing pins L any more: it goes once its tag does.
    a.untag("v1").unwrap();
    a.delete(&shared.id).unwrap();
}

/// A layer an import found in the store is deleted before that import commits it: the import
/// stores it again (its commit checks and pins in one transaction), and the image is whole.
#[test]
fn a_layer_deleted_under_an_import_is_imported_again() {
    let dir = tempfile::tempdir().unwrap();
    let src = open(&dir.path().join("src"));
    let shared = layer(&src, &[("etc/shared", b"deleted meanwhile\n")]);
    let top = layer(&src, &[("top.txt", b"top\n")]);
    let layout = dir.path().join("layout");
    uncompressed_layout(&src, &[shared.clone(), top], &layout);
    let root = dir.path().join("store");
    let (a, b) = (open(&root), open(&root));
    let tar = layer_tar(&[("etc/shared", b"deleted meanwhile\n")]);
    let imported = a
        .import_tar(
            Box::new(Cursor::new(tar)),
            &ImportOptions::default(),
            &no_progress,
        )
        .unwrap();
    assert_eq!(imported.layer.id, shared.id);
    let progress = on_layer_start(1, || a.delete(&shared.id).unwrap());
    let images = b.import_oci(&layout, None, &progress).unwrap();
    assert_eq!(images[0].stack.layers[0].id, shared.id);
    assert!(a.layer(&shared.id.to_string()).is_ok());
    let report = a.fsck(false).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}
