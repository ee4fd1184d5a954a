//! Inputs the fuzz targets (`fuzz/`) or their review found to break the core, each kept as a
//! test so `cargo test` checks them without a fuzzer. A test states what the input is and what
//! the core must do with it; the targets' own invariants (a split rebuilds its input, …) are
//! checked here too where they apply.

use std::io::Read;

use layerstore_core::fuzzing::{Entry, EntrySink, Limits, Op, SplitOutput, Splitter};
use layerstore_core::Error;

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
/// profile checks overflow), i.e. a crash of the importing process. It is out of range.
#[test]
fn a_pax_mtime_beyond_any_range_is_refused_without_a_panic() {
    for mtime in [
        "9".repeat(35),
        format!("-{}.5", "9".repeat(35)),
        "9".repeat(60),
    ] {
        let err = split(&pax_tar(&[("mtime", mtime.as_bytes())])).err();
        let err = err.unwrap_or_else(|| panic!("mtime {mtime} accepted"));
        assert!(matches!(err, Error::InvalidTar { .. }), "{err}");
        assert!(err.to_string().contains("mtime out of range"), "{err}");
    }
    // In range, with nanoseconds: kept.
    let out = split(&pax_tar(&[("mtime", b"1600000000.5")])).unwrap();
    assert_eq!(out.entries[0].mtime_ns, 1_600_000_000_500_000_000);
}
