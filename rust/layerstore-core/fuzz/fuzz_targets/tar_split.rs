//! The tar splitter over arbitrary bytes, with small limits so that every limit is reachable.
//!
//! Invariants checked, beyond "no panic, no hang, bounded memory":
//! - a split that succeeds rebuilds its input byte for byte from the raw segments and the
//!   payloads, in the order of its ops (the contract of `TarSplit`);
//! - the split does not depend on how much of each payload the sink reads (the splitter drains
//!   what is left), so a sink reading everything and one reading nothing agree exactly;
//! - every entry path is normal (relative, no empty, `.` or `..` component), and the limits hold.
#![no_main]

use std::io::Read;

use layerstore_core::fuzzing::{normalize_name, Entry, EntrySink, Limits, Op, Splitter};
use libfuzzer_sys::fuzz_target;

const LIMITS: Limits = Limits {
    max_bytes: 1 << 20,
    max_entries: 64,
    max_record: 16 << 10,
    max_path_depth: 16,
    max_trailing: 16 << 10,
};

/// Keeps every payload, read to its end (`None` for an entry without data), and whether one
/// came out shorter than its entry's size (the stream ended: the split must then fail).
#[derive(Default)]
struct Keep(Vec<Option<Vec<u8>>>, bool);

impl EntrySink for Keep {
    fn entry(
        &mut self,
        entry: &mut Entry,
        payload: Option<&mut dyn Read>,
    ) -> layerstore_core::Result<()> {
        let data = match payload {
            Some(r) => {
                let mut buf = Vec::new();
                r.read_to_end(&mut buf)?;
                assert!(
                    buf.len() as u64 <= entry.size,
                    "a payload is at most its size"
                );
                self.1 |= (buf.len() as u64) < entry.size;
                Some(buf)
            }
            None => None,
        };
        self.0.push(data);
        Ok(())
    }
}

/// Reads no payload at all.
struct Ignore;

impl EntrySink for Ignore {
    fn entry(&mut self, _: &mut Entry, _: Option<&mut dyn Read>) -> layerstore_core::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut keep = Keep::default();
    let full = Splitter::new(data, LIMITS, &mut keep).run();
    let mut ignore = Ignore;
    let lazy = Splitter::new(data, LIMITS, &mut ignore).run();

    let (out, lazy) = match (full, lazy) {
        (Ok(out), Ok(lazy)) => (out, lazy),
        (Err(a), Err(b)) => {
            assert_eq!(a.to_string(), b.to_string(), "same error either way");
            return;
        }
        (a, b) => panic!(
            "a sink reading payloads and one reading none disagree: {:?} vs {:?}",
            a.map(|_| ()),
            b.map(|_| ())
        ),
    };
    assert_eq!(
        out.split, lazy.split,
        "the split ignores what the sink read"
    );
    assert_eq!(out.entries, lazy.entries);
    assert_eq!(out.warnings, lazy.warnings);

    // Rebuild the input from the recipe.
    let split = &out.split;
    let mut rebuilt = Vec::with_capacity(data.len());
    let mut raw = &split.raw[..];
    for op in &split.ops {
        match *op {
            Op::Raw(n) => {
                let n = usize::try_from(n).expect("raw length fits");
                assert!(n <= raw.len(), "an op takes more raw bytes than there are");
                rebuilt.extend_from_slice(&raw[..n]);
                raw = &raw[n..];
            }
            Op::Payload(i) => {
                let payload = keep.0[i as usize]
                    .as_ref()
                    .expect("a payload op names an entry with data");
                assert!(!payload.is_empty(), "an empty payload has no op");
                rebuilt.extend_from_slice(payload);
            }
        }
    }
    assert!(raw.is_empty(), "every raw byte is used");
    assert!(rebuilt == data, "the split rebuilds its input exactly");

    // The entries.
    assert_eq!(out.entries.len(), keep.0.len());
    assert!(out.entries.len() as u64 <= LIMITS.max_entries);
    for e in &out.entries {
        let (normal, depth) = normalize_name(&e.path).expect("an entry path is normal");
        assert_eq!(normal, e.path, "an entry path is already normal");
        assert!(depth <= LIMITS.max_path_depth);
    }
});
