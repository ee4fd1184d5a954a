//! Output gathered from pieces that already sit in memory (raw tar segments, slices of decoded
//! blocks) and written with vectored writes, so an export copies no byte in user space.
//!
//! Invariants: pieces are written in the order they were pushed, each exactly once; a decoded
//! block is held (by its `Arc`) only until the write that carries its slice.

use std::io::{self, IoSlice, Write};
use std::ops::Range;
use std::sync::Arc;

/// About this many bytes are gathered before one write: as large as the 1 MiB buffers the
/// writers hand out, so a `BufWriter` of that capacity passes them straight to the file.
const GATHER_BYTES: usize = 1 << 20;
/// Linux takes at most 1024 slices per `writev` (`IOV_MAX`).
const GATHER_PIECES: usize = 1024;

enum Piece<'a> {
    Borrowed(&'a [u8]),
    Shared(Arc<Vec<u8>>, Range<usize>),
}

impl Piece<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Piece::Borrowed(b) => b,
            Piece::Shared(block, range) => &block[range.clone()],
        }
    }
}

pub struct Gather<'a, W: Write> {
    out: W,
    pieces: Vec<Piece<'a>>,
    len: usize,
}

impl<'a, W: Write> Gather<'a, W> {
    pub fn new(out: W) -> Self {
        Gather {
            out,
            pieces: Vec::with_capacity(GATHER_PIECES),
            len: 0,
        }
    }

    /// Queue bytes that outlive the gatherer.
    pub fn borrowed(&mut self, bytes: &'a [u8]) -> io::Result<()> {
        self.push(Piece::Borrowed(bytes))
    }

    /// Queue a slice of a shared block (kept alive until it is written).
    pub fn shared(&mut self, block: Arc<Vec<u8>>, range: Range<usize>) -> io::Result<()> {
        self.push(Piece::Shared(block, range))
    }

    fn push(&mut self, piece: Piece<'a>) -> io::Result<()> {
        let n = piece.bytes().len();
        if n == 0 {
            return Ok(());
        }
        self.pieces.push(piece);
        self.len += n;
        if self.len >= GATHER_BYTES || self.pieces.len() == GATHER_PIECES {
            self.write_out()?;
        }
        Ok(())
    }

    /// Write every queued piece (a writer may take fewer bytes than offered: loop until done).
    fn write_out(&mut self) -> io::Result<()> {
        let mut slices: Vec<IoSlice<'_>> = self
            .pieces
            .iter()
            .map(|p| IoSlice::new(p.bytes()))
            .collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            match self.out.write_vectored(rest) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut rest, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.pieces.clear();
        self.len = 0;
        Ok(())
    }

    /// Write what is still queued and give the writer back.
    pub fn finish(mut self) -> io::Result<W> {
        self.write_out()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes at most `max` bytes per call, one slice at a time, so every piece is split.
    struct Trickle {
        out: Vec<u8>,
        max: usize,
        calls: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.calls += 1;
            let n = buf.len().min(self.max);
            self.out.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn pieces_come_out_whole_and_in_order_through_short_writes() {
        let raw = b"header".to_vec();
        let block = Arc::new(
            (0..=255u8)
                .cycle()
                .take(3 * GATHER_BYTES)
                .collect::<Vec<u8>>(),
        );
        let mut g = Gather::new(Trickle {
            out: Vec::new(),
            max: 4093,
            calls: 0,
        });
        let mut expected = Vec::new();
        for i in 0..5 {
            g.borrowed(&raw).unwrap();
            expected.extend_from_slice(&raw);
            let range = i * 100_000..i * 100_000 + 700_001;
            g.shared(block.clone(), range.clone()).unwrap();
            expected.extend_from_slice(&block[range]);
            g.borrowed(&[]).unwrap();
        }
        let t = g.finish().unwrap();
        assert_eq!(t.out, expected);
        assert!(t.calls > expected.len() / 4093);
    }

    #[test]
    fn many_small_pieces_are_written_in_batches_of_at_most_iov_max() {
        struct Count(Vec<usize>, Vec<u8>);
        impl Write for Count {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.1.extend_from_slice(buf);
                Ok(buf.len())
            }
            fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
                self.0.push(bufs.len());
                let mut n = 0;
                for b in bufs {
                    self.1.extend_from_slice(b);
                    n += b.len();
                }
                Ok(n)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let bytes: Vec<[u8; 3]> = (0..3000u32).map(|i| [i as u8, (i >> 8) as u8, 7]).collect();
        let mut g = Gather::new(Count(Vec::new(), Vec::new()));
        for b in &bytes {
            g.borrowed(b).unwrap();
        }
        let c = g.finish().unwrap();
        assert_eq!(c.1, bytes.concat());
        assert_eq!(c.0, vec![1024, 1024, 952]);
    }
}
