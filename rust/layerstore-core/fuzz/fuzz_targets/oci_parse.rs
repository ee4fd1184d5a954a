//! OCI image index, manifest and config parsing: the walk an import makes over a layout
//! (`oci-layout`, `index.json`, nested indexes, manifests, configs) before importing anything.
//!
//! The input is up to [`MAX_DOCS`] documents separated by NUL bytes (which JSON text never
//! holds): the first is `index.json`, each other one a blob. A fuzzer cannot forge a sha256, so a
//! document names the others by placeholder, filled in before it is stored: `@Dn@` becomes the
//! digest of document `n` and `@Sn@` its size (`n` in 1..=9, later documents only); `@DL@` and
//! `@SL@` name a small layer blob that is always present. Everything else is as in a real layout.
//!
//! Invariants: no panic, no hang, bounded memory; every image found has as many diff_ids as
//! layers (asserted by `find_image_layers`); the walk is deterministic. With
//! `LAYERSTORE_FUZZ_DEBUG` set, each walk's result is printed (to check what a seed reaches).
#![no_main]

use std::collections::HashMap;
use std::io::Cursor;

use layerstore_core::fuzzing::{find_image_layers, Opened, Platform, Source};
use libfuzzer_sys::fuzz_target;
use sha2::Digest as _;

const MAX_DOCS: usize = 8;

struct Layout(HashMap<String, Vec<u8>>);

impl Source for Layout {
    fn open(&self, name: &str) -> layerstore_core::Result<Option<Opened>> {
        Ok(self.0.get(name).map(|b| {
            let len = b.len() as u64;
            (Box::new(Cursor::new(b.clone())) as Box<_>, len)
        }))
    }

    fn describe(&self) -> String {
        "fuzz layout".into()
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

fn replace(doc: &[u8], token: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(doc.len());
    let mut rest = doc;
    while let Some(i) = rest.windows(token.len()).position(|w| w == token) {
        out.extend_from_slice(&rest[..i]);
        out.extend_from_slice(with);
        rest = &rest[i + token.len()..];
    }
    out.extend_from_slice(rest);
    out
}

fn layout(data: &[u8]) -> Layout {
    let mut files = HashMap::new();
    files.insert(
        "oci-layout".to_string(),
        br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
    );
    // An empty tar: two zero blocks.
    let layer = vec![0u8; 1024];
    let layer_digest = format!("sha256:{}", sha256_hex(&layer));
    files.insert(
        format!("blobs/sha256/{}", sha256_hex(&layer)),
        layer.clone(),
    );

    let docs: Vec<&[u8]> = data.split(|&b| b == 0).take(MAX_DOCS).collect();
    let mut named: Vec<(String, usize)> = vec![(String::new(), 0); docs.len()];
    for k in (0..docs.len()).rev() {
        let mut doc = replace(docs[k], b"@DL@", layer_digest.as_bytes());
        doc = replace(&doc, b"@SL@", layer.len().to_string().as_bytes());
        for (j, (digest, size)) in named.iter().enumerate().skip(k + 1) {
            doc = replace(&doc, format!("@D{j}@").as_bytes(), digest.as_bytes());
            doc = replace(
                &doc,
                format!("@S{j}@").as_bytes(),
                size.to_string().as_bytes(),
            );
        }
        let hex = sha256_hex(&doc);
        named[k] = (format!("sha256:{hex}"), doc.len());
        let name = if k == 0 {
            "index.json".to_string()
        } else {
            format!("blobs/sha256/{hex}")
        };
        files.insert(name, doc);
    }
    Layout(files)
}

fuzz_target!(|data: &[u8]| {
    let layout = layout(data);
    for platform in [None, Some("linux/arm64/v8")] {
        let found = find_image_layers(&layout, platform).map_err(|e| e.to_string());
        if std::env::var_os("LAYERSTORE_FUZZ_DEBUG").is_some() {
            eprintln!("{platform:?}: {found:?}");
        }
        let again = find_image_layers(&layout, platform).map_err(|e| e.to_string());
        assert_eq!(found, again, "the walk is deterministic");
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(p) = Platform::parse(text) {
            assert_eq!(Platform::parse(&p.to_string()).ok(), Some(p));
        }
    }
});
