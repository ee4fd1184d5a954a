//! Compression detection and decoding over arbitrary bytes, reading at most `MAX_OUT` bytes of
//! output (a small input may legitimately inflate to far more: that is the decompressed-size
//! limit's job, not the decoder's).
//!
//! Invariants: no panic, no hang, memory bounded (zstd's window is capped at
//! `ZSTD_WINDOW_LOG_MAX`); detection agrees with the decoder's choice; a stream detected as
//! uncompressed comes out exactly as it went in; decoding is deterministic.
#![no_main]

use std::io::Read;

use layerstore_core::fuzzing::{decoder, detect_bytes, Compression};
use libfuzzer_sys::fuzz_target;

const MAX_OUT: u64 = 4 << 20;

/// Decode `data`, returning the detected kind and the output up to [`MAX_OUT`], or the error's
/// text.
fn decode(data: &[u8]) -> (Compression, Result<Vec<u8>, String>) {
    let (kind, r) = match decoder(data) {
        Ok(d) => d,
        Err(e) => return (detect_bytes(data), Err(e.to_string())),
    };
    let mut out = Vec::new();
    let res = r
        .take(MAX_OUT)
        .read_to_end(&mut out)
        .map_err(|e| e.to_string());
    (kind, res.map(|_| out))
}

fuzz_target!(|data: &[u8]| {
    let (kind, out) = decode(data);
    assert_eq!(kind, detect_bytes(data), "decoder and detection agree");
    if kind == Compression::None {
        assert_eq!(
            out.as_deref(),
            Ok(data),
            "plain bytes pass through unchanged"
        );
    }
    if let Ok(out) = &out {
        assert!(out.len() as u64 <= MAX_OUT);
    }
    assert_eq!(decode(data), (kind, out), "decoding is deterministic");
});
