//! The zstd:chunked writer against an independent reader: the `zstd-chunked` crate (from the
//! containers project) parses the footer, TOC and tar-split we write, and rebuilds from them and
//! our frames exactly the layer's tar; plain zstd decoding gives the same tar.

use std::io::Cursor;
use std::path::Path;

use layerstore_core::oci::zstd_chunked as ours;
use layerstore_core::store::{no_progress, ImportOptions, StoreOptions};
use layerstore_core::tar::Limits;
use layerstore_core::Store;
use sha2::Digest as _;

fn open(dir: &Path) -> Store {
    Store::open(dir, StoreOptions::default(), Limits::default()).unwrap()
}

fn layer_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let big: Vec<u8> = (0..2_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let files: [(&str, &[u8]); 4] = [
        ("etc/os-release", b"ID=test\n"),
        ("usr/lib/big.bin", &big),
        ("usr/share/empty", b""),
        ("usr/share/text", &[b'a'; 70_000]),
    ];
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, data).unwrap();
    }
    b.into_inner().unwrap()
}

#[test]
fn the_zstd_chunked_crate_reads_our_blob_back_to_the_exact_tar() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let tar = layer_tar();
    let info = store
        .import_tar(
            Box::new(Cursor::new(tar.clone())),
            &ImportOptions::default(),
            &no_progress,
        )
        .unwrap()
        .layer;
    let mut blob = Vec::new();
    let written = ours::write_layer(&store, &info, &mut blob, &no_progress).unwrap();
    assert_eq!(
        written.digest,
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&blob)))
    );
    assert_eq!(zstd::stream::decode_all(&blob[..]).unwrap(), tar);

    let refs = zstd_chunked::MetadataReferences::from_footer(&blob[blob.len() - 72..])
        .expect("a footer the crate recognises");
    let (m, t) = (&refs.manifest.range, &refs.tarsplit.range);
    let slice = |r: &std::ops::Range<u64>| &blob[r.start as usize..r.end as usize];
    let stream =
        zstd_chunked::Stream::new_from_frames(slice(m), slice(t)).expect("a TOC the crate parses");
    assert!(stream.references().count() >= 3);
    let mut rebuilt = Vec::new();
    stream
        .write_to(&mut rebuilt, |r| {
            let data = zstd::stream::decode_all(slice(&r.range))?;
            assert_eq!(data.len() as u64, r.size);
            assert_eq!(
                r.digest,
                format!("sha256:{}", hex::encode(sha2::Sha256::digest(&data)))
            );
            Ok(data)
        })
        .unwrap();
    assert_eq!(rebuilt, tar, "the crate rebuilds the layer's tar");
    // Same layer, same blob.
    let mut again = Vec::new();
    ours::write_layer(&store, &info, &mut again, &no_progress).unwrap();
    assert_eq!(again, blob);
}
