//! Digest strings (OCI `algorithm:hex` and the store's `blake3:hex`) from arbitrary text.
//!
//! Invariants: no panic; a digest that parses prints back as a string that parses to the same
//! digest; an OCI digest prints back exactly as given (only the canonical lowercase form is
//! accepted), with as many hex digits as its algorithm calls for.
#![no_main]

use layerstore_core::fuzzing::{Blake3, OciDigest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    if let Ok(d) = OciDigest::parse(&s) {
        let printed = d.to_string();
        assert_eq!(printed, s, "an OCI digest prints as given");
        assert_eq!(OciDigest::parse(&printed).ok(), Some(d.clone()));
        let hex_len = printed.split_once(':').map(|(_, h)| h.len());
        assert!(matches!(hex_len, Some(64 | 128)));
        assert!(d
            .hex
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
    }
    if let Ok(b) = Blake3::parse(&s) {
        let printed = b.to_string();
        assert_eq!(printed.len(), "blake3:".len() + 64);
        assert_eq!(Blake3::parse(&printed).ok(), Some(b));
        assert_eq!(Blake3::parse(&b.hex()).ok(), Some(b), "bare hex parses too");
        let _ = format!("{b:?}");
    }
});
