//! Inputs the fuzz targets (`fuzz/`) or their review found to break the core, each kept as a
//! test so `cargo test` checks them without a fuzzer. A test states what the input is and what
//! the core must do with it; the targets' own invariants (a split rebuilds its input, …) are
//! checked here too where they apply.

use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::time::{Duration, Instant};

use layerstore_core::fuzzing::{
    find_image_layers, Entry, EntrySink, Limits, Op, Opened, Source, SplitOutput, Splitter,
};
use layerstore_core::Error;
use sha2::Digest as _;

/// Keeps every payload (`None` for an entry without data).
#[derive(Default)]
struct Keep(Vec<Option<Vec<u8>>>);

impl EntrySink for Keep {
    fn entry(
        &mut self,
        _: &mut Entry,
        payload: Option<&mut dyn Read>,
    ) -> layerstore_core::Result<()> {
        let data = match payload {
            Some(r) => {
                let mut buf = Vec::new();
                r.read_to_end(&mut buf)?;
                Some(buf)
            }
            None => None,
        };
        self.0.push(data);
        Ok(())
    }
}

/// Split `tar`, and when that succeeds check that the split rebuilds it exactly.
fn split(tar: &[u8]) -> layerstore_core::Result<SplitOutput> {
    let mut keep = Keep::default();
    let out = Splitter::new(tar, Limits::default(), &mut keep).run()?;
    let mut rebuilt = Vec::new();
    let mut raw = &out.split.raw[..];
    for op in &out.split.ops {
        match *op {
            Op::Raw(n) => {
                let (now, rest) = raw.split_at(n as usize);
                rebuilt.extend_from_slice(now);
                raw = rest;
            }
            Op::Payload(i) => rebuilt.extend_from_slice(keep.0[i as usize].as_ref().unwrap()),
        }
    }
    assert!(rebuilt == tar, "the split rebuilds its input");
    Ok(out)
}

/// A one-file tar whose file has the PAX records `pax`.
fn pax_tar(pax: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions(pax.iter().copied()).unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_size(1);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, "a", &b"x"[..]).unwrap();
    b.into_inner().unwrap()
}

/// A PAX mtime of 30 or more digits overflowed the nanosecond arithmetic: a panic (the release
/// profile checks overflow), i.e. a crash of the importing process. Beyond what i64 nanoseconds
/// hold (2262), an mtime is now clamped with a warning naming the entry.
#[test]
fn a_pax_mtime_beyond_any_range_is_clamped_without_a_panic() {
    let latest = i64::MAX / 1_000_000_000 * 1_000_000_000;
    let earliest = i64::MIN / 1_000_000_000 * 1_000_000_000;
    for (mtime, want) in [
        ("9".repeat(35), latest),
        (format!("-{}.5", "9".repeat(35)), earliest),
        ("9".repeat(60), latest),
        ("10000000000".to_string(), latest), // the year 2286
    ] {
        let out = split(&pax_tar(&[("mtime", mtime.as_bytes())]))
            .unwrap_or_else(|e| panic!("mtime {mtime} refused: {e}"));
        assert_eq!(out.entries[0].mtime_ns, want, "{mtime}");
        assert!(
            out.warnings
                .iter()
                .any(|w| w.starts_with("a: mtime") && w.contains("clamped")),
            "{:?}",
            out.warnings
        );
    }
    // In range, with nanoseconds: kept, nothing said.
    let out = split(&pax_tar(&[("mtime", b"1600000000.5")])).unwrap();
    assert_eq!(out.entries[0].mtime_ns, 1_600_000_000_500_000_000);
    assert!(out.warnings.is_empty());
}

/// An OCI layout in memory: file name → bytes.
struct Layout(HashMap<String, Vec<u8>>);

impl Source for Layout {
    fn open(&self, name: &str) -> layerstore_core::Result<Option<Opened>> {
        Ok(self.0.get(name).map(|b| {
            let len = b.len() as u64;
            (Box::new(Cursor::new(b.clone())) as Box<_>, len)
        }))
    }

    fn describe(&self) -> String {
        "a layout in memory".into()
    }
}

/// Indexes seven deep, each listing the next thirty times: a 20 KB layout whose walk read 30^7
/// blobs, i.e. never finished (a `timeout` of `oci_parse`). The walk now stops at its budget.
#[test]
fn a_layout_whose_indexes_fan_out_is_refused_quickly() {
    let mut files = HashMap::new();
    files.insert(
        "oci-layout".to_string(),
        br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
    );
    let mut next = br#"{"schemaVersion":2,"manifests":[]}"#.to_vec();
    for depth in (0..7).rev() {
        let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&next)));
        let entry = format!(
            r#"{{"mediaType":"application/vnd.oci.image.index.v1+json","digest":"{digest}","size":{}}}"#,
            next.len()
        );
        files.insert(format!("blobs/{}", digest.replace(':', "/")), next);
        next = format!(
            r#"{{"schemaVersion":2,"manifests":[{}]}}"#,
            vec![entry; 30].join(",")
        )
        .into_bytes();
        if depth == 0 {
            files.insert("index.json".to_string(), next.clone());
        }
    }
    let started = Instant::now();
    let err = find_image_layers(&Layout(files), None).unwrap_err();
    assert!(matches!(err, Error::InvalidImage { .. }), "{err}");
    assert!(err.to_string().contains("blobs"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30));
}

/// A `docker save` manifest naming one config over and over: every entry kept its own copy of
/// the config, so a small archive naming a large config many times filled memory. Found
/// reviewing the import beside `oci_parse`'s finding; the same budget now applies.
#[test]
fn a_docker_archive_naming_one_config_many_times_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = br#"{"rootfs":{"type":"layers","diff_ids":[]}}"#;
    let entry = r#"{"Config":"config.json","RepoTags":[],"Layers":[]}"#;
    let manifest = format!("[{}]", vec![entry; 10_001].join(","));
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in [
        ("config.json", &config[..]),
        ("manifest.json", manifest.as_bytes()),
    ] {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data).unwrap();
    }
    let archive = dir.path().join("archive.tar");
    std::fs::write(&archive, b.into_inner().unwrap()).unwrap();
    let store = layerstore_core::Store::open(
        &dir.path().join("store"),
        Default::default(),
        Limits::default(),
    )
    .unwrap();
    let err = store
        .import_docker_archive(&archive, &|_| Ok(()))
        .unwrap_err();
    assert!(matches!(err, Error::InvalidImage { .. }), "{err}");
    assert!(err.to_string().contains("10000 images"), "{err}");
}
