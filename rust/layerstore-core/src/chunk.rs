//! Content-defined chunking of regular-file content (FastCDC, 2020 variant, normalisation level 1).
//!
//! Invariants: the cut points depend only on the bytes of one file and on [`ChunkParams`], which are
//! fixed when a store is created and recorded in it; changing them (or the pinned `fastcdc`
//! version) is a store-format change, caught by the golden vectors in `tests/golden/`.
//! The streaming driver reuses one buffer for every file, so chunking allocates nothing per chunk.

use std::io::Read;

use fastcdc::v2020;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Chunk-size parameters (bytes). Defaults follow casync's: 16 KiB / 64 KiB / 256 KiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl Default for ChunkParams {
    fn default() -> Self {
        ChunkParams {
            min: 16 * 1024,
            avg: 64 * 1024,
            max: 256 * 1024,
        }
    }
}

impl ChunkParams {
    pub fn validate(&self) -> Result<()> {
        let ok = (v2020::MINIMUM_MIN..=v2020::MINIMUM_MAX).contains(&self.min)
            && (v2020::AVERAGE_MIN..=v2020::AVERAGE_MAX).contains(&self.avg)
            && (v2020::MAXIMUM_MIN..=v2020::MAXIMUM_MAX).contains(&self.max)
            && self.min <= self.avg
            && self.avg <= self.max;
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidLayer(format!(
                "invalid chunk parameters {self:?}"
            )))
        }
    }

    /// The masks FastCDC 2020 derives from the average size (normalisation level 1).
    fn masks(&self) -> (u64, u64) {
        let bits = v2020::logarithm2(self.avg) as usize;
        (v2020::MASKS[bits + 1], v2020::MASKS[bits - 1])
    }

    /// Length of the first chunk of `data`, where `data` holds at least `max` bytes or is the
    /// end of the stream.
    pub fn cut(&self, data: &[u8]) -> usize {
        let (mask_s, mask_l) = self.masks();
        let (_, n) = v2020::cut(
            data,
            self.min as usize,
            self.avg as usize,
            self.max as usize,
            mask_s,
            mask_l,
            mask_s << 1,
            mask_l << 1,
        );
        n
    }

    /// Cut points of an in-memory buffer (used by tests and by in-memory writers).
    pub fn split<'a>(&self, mut data: &'a [u8]) -> Vec<&'a [u8]> {
        let mut out = Vec::new();
        while !data.is_empty() {
            let n = self.cut(data);
            let (head, tail) = data.split_at(n);
            out.push(head);
            data = tail;
        }
        out
    }
}

/// Streams chunks out of a reader with one reusable buffer of twice the maximum chunk size.
pub struct Chunker {
    params: ChunkParams,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Chunker {
    pub fn new(params: ChunkParams) -> Self {
        Chunker {
            params,
            buf: vec![0; 2 * params.max as usize],
            start: 0,
            end: 0,
        }
    }

    pub fn params(&self) -> ChunkParams {
        self.params
    }

    /// Feed exactly the whole content of `src` (until EOF) and call `on_chunk` for every chunk.
    pub fn run<R: Read>(
        &mut self,
        mut src: R,
        mut on_chunk: impl FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        self.start = 0;
        self.end = 0;
        let max = self.params.max as usize;
        let mut eof = false;
        loop {
            if !eof && self.end - self.start < max {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
                while self.end < self.buf.len() {
                    let n = src.read(&mut self.buf[self.end..])?;
                    if n == 0 {
                        eof = true;
                        break;
                    }
                    self.end += n;
                }
            }
            if self.start == self.end {
                return Ok(());
            }
            let n = self.params.cut(&self.buf[self.start..self.end]);
            on_chunk(&self.buf[self.start..self.start + n])?;
            self.start += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize, mut seed: u64) -> Vec<u8> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    }

    #[test]
    fn streaming_equals_in_memory_whatever_the_read_sizes() {
        let p = ChunkParams::default();
        let data = noise(3 * 1024 * 1024 + 17, 7);
        let expect: Vec<usize> = p.split(&data).iter().map(|c| c.len()).collect();
        assert!(expect.len() > 10);
        // A reader that returns odd-sized pieces.
        struct Odd<'a>(&'a [u8], usize);
        impl Read for Odd<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                self.1 = self.1 % 9973 + 1;
                let n = self.1.min(buf.len()).min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut got = Vec::new();
        Chunker::new(p)
            .run(Odd(&data, 1), |c| {
                got.push(c.len());
                Ok(())
            })
            .unwrap();
        assert_eq!(got, expect);
        assert!(got.iter().all(|&n| n <= p.max as usize));
    }

    #[test]
    fn driver_agrees_with_the_fastcdc_crate_iterator() {
        let p = ChunkParams::default();
        let data = noise(2 * 1024 * 1024, 99);
        let ours: Vec<usize> = p.split(&data).iter().map(|c| c.len()).collect();
        let theirs: Vec<usize> = v2020::FastCDC::new(&data, p.min, p.avg, p.max)
            .map(|c| c.length)
            .collect();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn empty_input_gives_no_chunk() {
        let mut n = 0;
        Chunker::new(ChunkParams::default())
            .run(&b""[..], |_| {
                n += 1;
                Ok(())
            })
            .unwrap();
        assert_eq!(n, 0);
    }
}
