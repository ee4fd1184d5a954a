//! Compression of layer streams: detection by magic bytes on input, encoders on output.
//!
//! Invariants: gzip input may have several members (all are read, as `gunzip` does); zstd input
//! is decoded with a bounded window (2^27 bytes), so a hostile frame cannot demand unbounded
//! memory. Anything else is passed through as a plain tar.

use std::io::{self, BufRead, BufReader, Read, Write};

use crate::error::Result;

/// Largest zstd window a layer may use (128 MiB, zstd's own default limit, written down here).
pub const ZSTD_WINDOW_LOG_MAX: u32 = 27;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    pub fn parse(name: Option<&str>) -> Result<Self> {
        match name {
            None | Some("none") | Some("") => Ok(Compression::None),
            Some("gzip") | Some("gz") => Ok(Compression::Gzip),
            Some("zstd") | Some("zst") => Ok(Compression::Zstd),
            Some(other) => Err(crate::Error::InvalidArgument(format!(
                "unknown compression {other:?} (expected gzip, zstd or none)"
            ))),
        }
    }

    pub fn name(&self) -> Option<&'static str> {
        match self {
            Compression::None => None,
            Compression::Gzip => Some("gzip"),
            Compression::Zstd => Some("zstd"),
        }
    }
}

/// Say what a stream is from its first bytes.
pub fn detect_bytes(head: &[u8]) -> Compression {
    if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) || is_skippable_frame(head) {
        // A zstd stream may open with skippable frames (zstd:chunked puts its metadata in
        // them); the decoder steps over them.
        Compression::Zstd
    } else {
        Compression::None
    }
}

/// A zstd skippable frame's magic: 0x184D2A50 to 0x184D2A5F, little-endian.
fn is_skippable_frame(head: &[u8]) -> bool {
    matches!(head, [b0, 0x2a, 0x4d, 0x18, ..] if b0 & 0xf0 == 0x50)
}

/// A compression we recognise but do not decode ("xz", "bzip2"), from the first 4 bytes: so that
/// such a layer is refused by name rather than as a broken tar. (A plain tar whose first member
/// name starts with `BZh1`…`BZh9` or `\xfd7zX` would be refused too; no real layer does.)
pub fn unsupported(head: &[u8]) -> Option<&'static str> {
    match head {
        [0xfd, b'7', b'z', b'X', ..] => Some("xz"),
        [b'B', b'Z', b'h', b'1'..=b'9', ..] => Some("bzip2"),
        _ => None,
    }
}

/// Peek at the first bytes and say what the stream is.
pub fn detect<R: BufRead>(r: &mut R) -> io::Result<Compression> {
    Ok(detect_bytes(r.fill_buf()?))
}

/// Wrap `src` in the decoder its magic bytes call for.
pub fn decoder<'a, R: Read + Send + 'a>(
    src: R,
) -> io::Result<(Compression, Box<dyn Read + Send + 'a>)> {
    let mut buf = BufReader::with_capacity(256 * 1024, src);
    let kind = detect(&mut buf)?;
    let reader: Box<dyn Read + Send> = match kind {
        Compression::None => Box::new(buf),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buf)),
        Compression::Zstd => {
            let mut d = zstd::stream::read::Decoder::with_buffer(buf)?;
            d.window_log_max(ZSTD_WINDOW_LOG_MAX)?;
            Box::new(d)
        }
    };
    Ok((kind, reader))
}

/// An encoder that finishes its stream on [`Encoder::finish`].
pub enum Encoder<W: Write> {
    Plain(W),
    Gzip(flate2::write::GzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> Encoder<W> {
    pub fn new(kind: Compression, out: W) -> io::Result<Self> {
        Ok(match kind {
            Compression::None => Encoder::Plain(out),
            Compression::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(
                out,
                flate2::Compression::default(),
            )),
            Compression::Zstd => {
                let mut e = zstd::stream::write::Encoder::new(out, 3)?;
                e.include_checksum(true)?;
                // Two cores: a worker compresses while we produce.
                let _ = e.multithread(1);
                Encoder::Zstd(e)
            }
        })
    }

    pub fn finish(self) -> io::Result<W> {
        match self {
            Encoder::Plain(w) => Ok(w),
            Encoder::Gzip(e) => e.finish(),
            Encoder::Zstd(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Plain(w) => w.write(buf),
            Encoder::Gzip(e) => e.write(buf),
            Encoder::Zstd(e) => e.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Encoder::Plain(w) => w.write_vectored(bufs),
            Encoder::Gzip(e) => e.write_vectored(bufs),
            Encoder::Zstd(e) => e.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Plain(w) => w.flush(),
            Encoder::Gzip(e) => e.flush(),
            Encoder::Zstd(e) => e.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_member_gzip_is_read_whole() {
        let mut out = Vec::new();
        for part in [&b"hello "[..], b"world"] {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(part).unwrap();
            out.extend(e.finish().unwrap());
        }
        let (kind, mut r) = decoder(&out[..]).unwrap();
        assert_eq!(kind, Compression::Gzip);
        let mut s = String::new();
        r.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello world");
    }

    /// About 2.5 MiB that compress like a layer: text-like runs and incompressible stretches.
    fn layer_like_bytes() -> Vec<u8> {
        let mut x: u64 = 0x5eed;
        let mut out = Vec::with_capacity(5 << 19);
        while out.len() < 5 << 19 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if x >> 62 == 0 {
                out.extend((0..4096).map(|i| (x >> (i % 57)) as u8));
            } else {
                let word =
                    ["usr", "lib", "share", "doc", "bin", "etc", "\n"][(x >> 40) as usize % 7];
                out.extend_from_slice(word.as_bytes());
                out.push(b'/');
            }
        }
        out
    }

    fn sha256_of(bytes: &[u8]) -> String {
        use sha2::Digest as _;
        crate::digest::sha256_string(&sha2::Sha256::digest(bytes))
    }

    /// What our encoders write is part of the store's records: an imported blob recorded as
    /// rebuilt (`stream`, `pgzip`) is exported again by running the same encoder, and must come out
    /// byte for byte. These digests pin that output, on every CPU (zlib-rs and zstd pick SIMD code
    /// at run time) and across dependency updates; a change here breaks such stores.
    #[test]
    fn golden_compressed_output() {
        let data = layer_like_bytes();
        let encode = |kind: Compression| {
            let mut e = Encoder::new(kind, Vec::new()).unwrap();
            e.write_all(&data).unwrap();
            sha256_of(&e.finish().unwrap())
        };
        let mut p = crate::oci::pgzip::ParGzWriter::new(Vec::new());
        p.write_all(&data).unwrap();
        let pgzip = sha256_of(&p.finish().unwrap());
        let got = [encode(Compression::Gzip), encode(Compression::Zstd), pgzip];
        let want = [
            "sha256:bb8f42392ad4a4bc18d1d79fd6c4509140e382710cf42bf6cf07a0b64cab7251",
            "sha256:b2c844019f3ffc88aa31fcd028d0576261bd31a76f5256cd3073a17153bce7dc",
            "sha256:e02596c28b6680820f9a39a0ef68e62f3cf567ed3c70ee0aed548cc3df4e5bf6",
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn zstd_and_plain_detected() {
        let z = zstd::encode_all(&b"abc"[..], 1).unwrap();
        assert_eq!(decoder(&z[..]).unwrap().0, Compression::Zstd);
        assert_eq!(decoder(&b"abc"[..]).unwrap().0, Compression::None);
    }

    #[test]
    fn xz_and_bzip2_named_not_decoded() {
        assert_eq!(unsupported(b"\xfd7zXZ\x00\x00"), Some("xz"));
        assert_eq!(unsupported(b"BZh91AY&SY"), Some("bzip2"));
        // A tar whose first member is named "BZh" or "BZhx" is still a tar.
        assert_eq!(unsupported(b"BZh\x00"), None);
        assert_eq!(unsupported(b"BZhx"), None);
        assert_eq!(unsupported(b"etc/"), None);
    }
}
