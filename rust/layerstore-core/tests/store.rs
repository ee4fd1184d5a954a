//! Integration tests of the core store: byte-exact round trips of tars written by the Rust `tar`
//! crate, dedup, and the golden chunk vectors that pin the store format.

use std::io::{Cursor, Read};
use std::path::Path;

use layerstore_core::chunk::{ChunkParams, Chunker};
use layerstore_core::compress::Compression;
use layerstore_core::digest::Blake3;
use layerstore_core::store::{no_progress, ImportOptions, StoreOptions};
use layerstore_core::tar::Limits;
use layerstore_core::{ErrorKind, Store};
use sha2::Digest as _;

fn noise(n: usize, mut seed: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect()
}

fn open(dir: &Path) -> Store {
    Store::open(
        &dir.join("store"),
        StoreOptions::default(),
        Limits::default(),
    )
    .unwrap()
}

fn import(
    store: &Store,
    bytes: &[u8],
) -> layerstore_core::Result<layerstore_core::store::Imported> {
    store.import_tar(
        Box::new(Cursor::new(bytes.to_vec())),
        &ImportOptions::default(),
        &no_progress,
    )
}

fn export(store: &Store, id: &Blake3) -> Vec<u8> {
    let mut out = Vec::new();
    store
        .export_tar(id, &mut out, Compression::None, &no_progress)
        .unwrap();
    out
}

/// A tar from the `tar` crate's builder (1024-byte end blocks, no record padding).
fn rust_tar(big: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, kind: tar::EntryType, data: &[u8], link: Option<&str>| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o4755
        });
        h.set_uid(1000);
        h.set_gid(1000);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        if let Some(l) = link {
            b.append_link(&mut h, path, l).unwrap();
        } else {
            b.append_data(&mut h, path, data).unwrap();
        }
    };
    add("etc/", tar::EntryType::Directory, b"", None);
    add("etc/empty", tar::EntryType::Regular, b"", None);
    add("etc/big.bin", tar::EntryType::Regular, big, None);
    add(
        &format!("deep/{}/name", "x".repeat(150)),
        tar::EntryType::Regular,
        b"long",
        None,
    );
    add("etc/link", tar::EntryType::Symlink, b"", Some("big.bin"));
    add("etc/hard", tar::EntryType::Link, b"", Some("etc/big.bin"));
    add(
        "etc/empty",
        tar::EntryType::Regular,
        b"duplicate wins",
        None,
    );
    add("etc/.wh.gone", tar::EntryType::Regular, b"", None);
    add("etc/.wh..wh..opq", tar::EntryType::Regular, b"", None);
    b.into_inner().unwrap()
}

#[test]
fn rust_tar_crate_round_trips_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let big = noise(700_000, 3);
    let input = rust_tar(&big);
    let imported = import(&store, &input).unwrap();
    let info = imported.layer;
    assert_eq!(
        info.diff_id,
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&input)))
    );
    assert_eq!(info.id, Blake3::of(&input));
    assert_eq!(info.size, input.len() as u64);
    assert_eq!(export(&store, &info.id), input);

    let entries = store.entries(&info.id).unwrap();
    let kinds: Vec<(&[u8], &str)> = entries
        .iter()
        .map(|e| (&e.path[..], e.kind.name()))
        .collect();
    assert_eq!(kinds[0], (&b"etc"[..], "dir"));
    assert_eq!(kinds[5], (&b"etc/hard"[..], "hardlink"));
    assert_eq!(kinds[7], (&b"etc/.wh.gone"[..], "whiteout"));
    assert_eq!(kinds[8], (&b"etc/.wh..wh..opq"[..], "opaque"));
    let bigentry = &entries[2];
    assert!(
        bigentry.chunks.len() > 1,
        "a 700 kB file spans several chunks"
    );
    assert_eq!(bigentry.digest, Some(Blake3::of(&big)));
    assert_eq!(bigentry.mode, 0o4755);
    assert_eq!(entries[3].path.len(), "deep/".len() + 150 + "/name".len());
    assert_eq!(entries[6].size, 14);
    assert!(store.fsck(false).unwrap().problems.is_empty());
}

#[test]
fn same_tar_compressed_stores_nothing_new() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let input = rust_tar(&noise(500_000, 9));
    let first = import(&store, &input).unwrap();
    assert!(first.new_chunks > 0);
    let gz = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut e, &input).unwrap();
        e.finish().unwrap()
    };
    let zst = zstd::encode_all(&input[..], 3).unwrap();
    for blob in [&gz, &zst, &input] {
        let again = import(&store, blob).unwrap();
        assert!(again.existed);
        assert_eq!(again.new_chunks, 0);
        assert_eq!(again.layer.id, first.layer.id);
    }
    assert_eq!(store.stats().unwrap().layers, 1);
    // The blob digest finds the layer.
    let gz_digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&gz)));
    assert_eq!(store.layer(&gz_digest).unwrap().id, first.layer.id);
}

#[test]
fn truncated_tar_is_rejected_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let input = rust_tar(&noise(300_000, 5));
    for cut in [100, 512, 2000, input.len() - 1024] {
        let err = import(&store, &input[..cut]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidLayer, "cut at {cut}: {err}");
        assert!(err.to_string().contains("offset"), "{err}");
    }
    assert_eq!(store.stats().unwrap().chunks, 0);
    assert_eq!(
        std::fs::read_dir(dir.path().join("store/packs"))
            .unwrap()
            .count(),
        0
    );
}

/// Golden vectors: cut points and digests of the default chunker on fixed data. A change here is
/// a store-format change (new format version, in a commit of its own).
#[test]
fn golden_chunk_boundaries() {
    let data = noise(4 << 20, 0x5eed);
    let mut got = String::new();
    Chunker::new(ChunkParams::default())
        .run(Cursor::new(&data).take(u64::MAX), |c| {
            got.push_str(&format!("{} {}\n", c.len(), Blake3::of(c).hex()));
            Ok(())
        })
        .unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/fastcdc-16k-64k-256k.txt");
    if std::env::var_os("LAYERSTORE_BLESS").is_some() {
        std::fs::write(&path, &got).unwrap();
    }
    let want = std::fs::read_to_string(&path).expect("golden file (LAYERSTORE_BLESS=1 writes it)");
    assert_eq!(
        got, want,
        "chunk boundaries changed: that is a store format change"
    );
}

/// Pin `id` under a lease row claiming to be this process with `start_time`; returns the lease.
fn pin_as(store: &Store, start_time: u64, id: &Blake3) -> i64 {
    let conn = layerstore_core::meta::open(&store.root().join("meta.db")).unwrap();
    conn.execute(
        "INSERT INTO leases (pid, start_time, pack, created) VALUES (?1, ?2, 'tmp/oci-test', 0)",
        rusqlite::params![std::process::id(), start_time],
    )
    .unwrap();
    let lease = conn.last_insert_rowid();
    layerstore_core::meta::pin_layer(&conn, lease, id).unwrap();
    lease
}

#[test]
fn a_live_pin_blocks_delete_and_a_stale_one_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let id = import(&store, &rust_tar(&noise(10_000, 7)))
        .unwrap()
        .layer
        .id;
    let me = layerstore_core::owner::process_start_time(std::process::id()).unwrap();

    // Our pid with another start time: the process that pinned it is gone and the pid reused.
    pin_as(&store, me + 1, &id);
    let live = pin_as(&store, me, &id);
    let err = store.delete(&id).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    assert!(
        matches!(err, layerstore_core::Error::LayerPinned { imports: 1, .. }),
        "{err}"
    );

    let conn = layerstore_core::meta::open(&store.root().join("meta.db")).unwrap();
    layerstore_core::meta::release_lease(&conn, live).unwrap();
    store.delete(&id).unwrap();
    let pins: i64 = conn
        .query_row("SELECT count(*) FROM pins", [], |r| r.get(0))
        .unwrap();
    assert_eq!(pins, 0, "the stale pin went with the layer");
    assert_eq!(store.layers().unwrap().len(), 0);
}

#[test]
fn gc_removes_the_scratch_of_dead_processes_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let tmp = store.root().join("tmp");
    let pid = std::process::id();
    let me = layerstore_core::owner::process_start_time(pid).unwrap();
    // Our pid with another start time stands for a killed process whose pid was reused.
    let dead_dir = tmp.join(format!("oci-{pid}-{}-0123abcd", me + 1));
    let dead_file = tmp.join(format!("docker-{pid}-{}-4567ef.tar", me + 1));
    let live_dir = tmp.join(format!("oci-{pid}-{me}-89abcdef"));
    let unowned = tmp.join("oci-0123456789abcdef01234567");
    for d in [&dead_dir, &live_dir, &unowned] {
        std::fs::create_dir(d).unwrap();
        std::fs::write(d.join("blob.part"), b"staged bytes").unwrap();
    }
    std::fs::write(&dead_file, b"a decompressed archive").unwrap();
    let report = store.gc().unwrap();
    assert!(!dead_dir.exists() && !dead_file.exists());
    assert!(
        live_dir.join("blob.part").exists(),
        "a live import's staging stays"
    );
    assert!(
        unowned.exists(),
        "a name that records no owner is left alone"
    );
    assert!(report.bytes_reclaimed >= 34);
}

/// A version-1 store (one `layer_chunks` row per layer and chunk) opens as version 2 with the
/// same chunk sets, which gc and fsck then rely on.
#[test]
fn a_version_1_store_is_migrated_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let (kept, dropped) = {
        let store = open(dir.path());
        let kept = import(&store, &rust_tar(&noise(300_000, 1)))
            .unwrap()
            .layer
            .id;
        let dropped = import(&store, &rust_tar(&noise(300_000, 2)))
            .unwrap()
            .layer
            .id;
        (kept, dropped)
    };
    // Rewrite the chunk sets the way version 1 kept them.
    let db = rusqlite::Connection::open(dir.path().join("store/meta.db")).unwrap();
    db.execute_batch(
        "CREATE TABLE layer_chunks (layer TEXT NOT NULL REFERENCES layers(id), digest BLOB NOT NULL,
             PRIMARY KEY (layer, digest)) WITHOUT ROWID;
         CREATE INDEX layer_chunks_by_digest ON layer_chunks(digest);",
    )
    .unwrap();
    let chunk_sets = |db: &rusqlite::Connection| -> Vec<(String, Vec<u8>)> {
        db.prepare("SELECT layer, digests FROM layer_chunk_sets ORDER BY layer")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let sets = chunk_sets(&db);
    assert_eq!(sets.len(), 2);
    for (layer, digests) in &sets {
        for d in digests.chunks(32) {
            db.execute(
                "INSERT INTO layer_chunks (layer, digest) VALUES (?1, ?2)",
                rusqlite::params![layer, d],
            )
            .unwrap();
        }
    }
    db.execute_batch(
        "DROP TABLE layer_chunk_sets;
         UPDATE settings SET value = '1' WHERE key = 'format_version';",
    )
    .unwrap();
    drop(db);

    let store = open(dir.path());
    let db = rusqlite::Connection::open(dir.path().join("store/meta.db")).unwrap();
    let version: String = db
        .query_row(
            "SELECT value FROM settings WHERE key = 'format_version'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(version, "2");
    let old_table: i64 = db
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE name LIKE 'layer_chunks%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(old_table, 0, "the version-1 table and its index are gone");
    assert_eq!(chunk_sets(&db), sets);
    assert!(store.fsck(false).unwrap().problems.is_empty());
    // gc keeps exactly what the migrated sets name.
    assert_eq!(store.gc().unwrap().chunks_removed, 0);
    let set_of = |id: &Blake3| -> std::collections::HashSet<Vec<u8>> {
        let (_, digests) = sets.iter().find(|(l, _)| *l == id.to_string()).unwrap();
        digests.chunks(32).map(<[u8]>::to_vec).collect()
    };
    let only_dropped = set_of(&dropped).difference(&set_of(&kept)).count();
    assert!(only_dropped > 0);
    store.delete(&dropped).unwrap();
    assert_eq!(store.gc().unwrap().chunks_removed as usize, only_dropped);
    assert_eq!(export(&store, &kept), rust_tar(&noise(300_000, 1)));
    assert!(store.fsck(false).unwrap().problems.is_empty());
}
