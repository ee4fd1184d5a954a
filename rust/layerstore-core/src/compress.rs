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
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
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

    #[test]
    fn zstd_and_plain_detected() {
        let z = zstd::encode_all(&b"abc"[..], 1).unwrap();
        assert_eq!(decoder(&z[..]).unwrap().0, Compression::Zstd);
        assert_eq!(decoder(&b"abc"[..]).unwrap().0, Compression::None);
    }
}
