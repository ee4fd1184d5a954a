//! Streaming tar splitter: the exact-reconstruction half of a layer (tar-split style).
//!
//! A tar stream is cut into *raw* segments — every 512-byte header exactly as read, PAX `x`/`g`
//! records, GNU `L`/`K` blocks, padding (even non-zero), the
//! end-of-archive blocks and every byte after them — and *payload* segments: the data of each
//! entry that carries data, exactly its effective size (a PAX `size` wins over the header field).
//! Only payloads go to the chunker. Writing the raw bytes and the payloads back in order
//! reproduces the input byte for byte; that is the contract [`TarSplit`] keeps.
//!
//! Parsing of header fields uses the `tar` crate's accessors (octal, base-256); the framing
//! (which block is what, how much data follows) is ours, since the crate hides raw bytes.
//! Header-only typeflags (`1`–`6`) never carry data, whatever their size field says (as Go's
//! archive/tar and Python's tarfile read them). GNU sparse files, in each of their encodings, are
//! refused: what they archive is a map and the data regions, not the file's content.

use std::collections::BTreeMap;
use std::io::{self, Read};

use serde::{Deserialize, Serialize};

use crate::changeset::{hidden_name, marker_of, Marker};
use crate::error::{Error, Result};
use crate::layer::{Entry, Kind};

pub const BLOCK: usize = 512;

/// Limits enforced while streaming. All sizes in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Decompressed tar size.
    pub max_bytes: u64,
    /// Number of entries (not counting PAX/GNU extension headers).
    pub max_entries: u64,
    /// One PAX record set or GNU long name/link block.
    pub max_record: u64,
    /// Components of one path.
    pub max_path_depth: u32,
    /// Bytes after the end-of-archive marker.
    pub max_trailing: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 64 << 30,
            max_entries: 4_000_000,
            max_record: 1 << 20,
            max_path_depth: 1024,
            max_trailing: 1 << 20,
        }
    }
}

/// One step of the reconstruction recipe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// The next `n` bytes of [`TarSplit::raw`].
    Raw(u64),
    /// The content of entry `i` (its chunks, in order).
    Payload(u32),
}

/// The recipe that rebuilds a tar byte for byte from raw bytes and entry payloads.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TarSplit {
    #[serde(with = "serde_bytes")]
    pub raw: Vec<u8>,
    pub ops: Vec<Op>,
}

impl TarSplit {
    /// Note `n` more raw bytes in the recipe (the bytes themselves go to `raw` or a [`Packed`]).
    fn note_raw(&mut self, n: usize) {
        if let Some(Op::Raw(m)) = self.ops.last_mut() {
            *m += n as u64;
        } else {
            self.ops.push(Op::Raw(n as u64));
        }
    }
}

/// The raw bytes of a split kept compressed as they stream in, so that an import's memory does
/// not hold every header and padding block of the tar (about 1 KiB per small file). At the end
/// they become the stored blob of the recipe ([`Packed::finish`]), the same `TarSplit` bytes
/// that [`crate::layer::encode_blob`] would have written.
struct Packed {
    raw: zstd::stream::write::Encoder<'static, Vec<u8>>,
    len: u64,
}

/// zstd level for the raw bytes in flight (headers and padding: fast is small enough).
const PACKED_LEVEL: i32 = 1;

impl Packed {
    fn new() -> Result<Self> {
        let raw = zstd::stream::write::Encoder::new(Vec::new(), PACKED_LEVEL)
            .map_err(|e| Error::io("compressing the tar's headers", e))?;
        Ok(Packed { raw, len: 0 })
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        use std::io::Write as _;
        self.raw
            .write_all(bytes)
            .map_err(|e| Error::io("compressing the tar's headers", e))?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// The stored blob of `TarSplit { raw, ops }`: zstd of its postcard encoding, which is the
    /// raw bytes as a byte string (a varint length, then the bytes) followed by the ops.
    fn finish(self, ops: &[Op]) -> Result<Vec<u8>> {
        use std::io::Write as _;
        let ctx = |e| Error::io("encoding the tar's recipe", e);
        let compressed = self.raw.finish().map_err(ctx)?;
        let mut out = crate::layer::blob_encoder().map_err(ctx)?;
        let head = postcard::to_stdvec(&self.len)
            .map_err(|e| Error::Corrupt(format!("encoding metadata: {e}")))?;
        out.write_all(&head).map_err(ctx)?;
        let mut raw = zstd::stream::read::Decoder::new(compressed.as_slice()).map_err(ctx)?;
        io::copy(&mut raw, &mut out).map_err(ctx)?;
        let ops = postcard::to_stdvec(ops)
            .map_err(|e| Error::Corrupt(format!("encoding metadata: {e}")))?;
        out.write_all(&ops).map_err(ctx)?;
        out.finish().map_err(ctx)
    }
}

/// A stored recipe read without holding its raw bytes: its ops, then the raw bytes streamed
/// from the blob in order ([`RawStream::take`]). An export of a layer of a million small files
/// would otherwise hold the whole recipe twice (decompressed, then decoded).
pub struct StoredSplit<'b> {
    pub ops: Vec<Op>,
    pub raw: RawStream<'b>,
}

impl<'b> StoredSplit<'b> {
    /// Open the blob [`crate::layer::encode_blob`] (or [`Splitter::pack_raw`]) stored: one pass
    /// skips the raw bytes to decode the ops behind them, the stream then rereads them.
    pub fn open(blob: &'b [u8]) -> Result<Self> {
        let mut skip = RawStream::new(blob)?;
        io::copy(&mut (&mut skip.dec).take(skip.left), &mut io::sink()).map_err(corrupt)?;
        let mut rest = Vec::new();
        skip.dec.read_to_end(&mut rest).map_err(corrupt)?;
        let ops: Vec<Op> = postcard::from_bytes(&rest)
            .map_err(|e| Error::Corrupt(format!("layer metadata: {e}")))?;
        Ok(StoredSplit {
            ops,
            raw: RawStream::new(blob)?,
        })
    }
}

/// The raw bytes of a stored recipe, decompressed a block at a time.
pub struct RawStream<'b> {
    dec: zstd::stream::read::Decoder<'static, io::BufReader<&'b [u8]>>,
    /// Raw bytes not yet decompressed.
    left: u64,
    block: std::sync::Arc<Vec<u8>>,
    pos: usize,
}

fn corrupt(e: io::Error) -> Error {
    Error::Corrupt(format!("layer metadata: {e}"))
}

/// Raw bytes decompressed at a time.
const RAW_BLOCK: u64 = 1 << 20;

impl<'b> RawStream<'b> {
    fn new(blob: &'b [u8]) -> Result<Self> {
        let mut dec = zstd::stream::read::Decoder::new(blob).map_err(corrupt)?;
        // postcard's varint (LEB128) of the raw length.
        let mut left = 0u64;
        for shift in (0..64).step_by(7) {
            let mut b = [0u8; 1];
            dec.read_exact(&mut b).map_err(corrupt)?;
            left |= u64::from(b[0] & 0x7f) << shift;
            if b[0] & 0x80 == 0 {
                break;
            }
        }
        Ok(RawStream {
            dec,
            left,
            block: std::sync::Arc::new(Vec::new()),
            pos: 0,
        })
    }

    /// Hand the next `n` raw bytes to `f`, as ranges of shared blocks (one or more).
    pub fn take(
        &mut self,
        mut n: u64,
        mut f: impl FnMut(std::sync::Arc<Vec<u8>>, std::ops::Range<usize>) -> Result<()>,
    ) -> Result<()> {
        while n > 0 {
            if self.pos == self.block.len() {
                let want = self.left.min(RAW_BLOCK);
                if want == 0 {
                    return Err(Error::Corrupt("raw segment out of range".into()));
                }
                let mut block = vec![0u8; want as usize];
                self.dec.read_exact(&mut block).map_err(corrupt)?;
                self.left -= want;
                self.block = std::sync::Arc::new(block);
                self.pos = 0;
            }
            let k = (self.block.len() - self.pos).min(usize::try_from(n).unwrap_or(usize::MAX));
            f(self.block.clone(), self.pos..self.pos + k)?;
            self.pos += k;
            n -= k as u64;
        }
        Ok(())
    }
}

/// Receives entries as the splitter finds them.
pub trait EntrySink {
    /// `payload` yields exactly `entry.size` bytes when present; the sink should read it to the
    /// end (the splitter drains whatever is left) and may fill `entry.chunks`/`entry.digest`.
    fn entry(&mut self, entry: &mut Entry, payload: Option<&mut dyn Read>) -> Result<()>;
}

/// Reader wrapper that counts bytes and enforces the decompressed-size limit.
struct Counted<R> {
    inner: R,
    pos: u64,
    limit: u64,
}

impl<R> Counted<R> {
    /// Count `n` bytes the source skipped.
    fn advance(&mut self, n: u64) -> io::Result<()> {
        self.pos += n;
        self.check_limit()
    }

    fn check_limit(&self) -> io::Result<()> {
        if self.pos > self.limit {
            return Err(io::Error::other(Error::LimitExceeded {
                what: "decompressed size",
                found: self.pos,
                limit: self.limit,
                entry: 0,
                offset: self.pos,
            }));
        }
        Ok(())
    }
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos += n as u64;
        self.check_limit()?;
        Ok(n)
    }
}

/// Extension state that applies to the next entry.
#[derive(Default)]
struct Pending {
    pax: BTreeMap<Vec<u8>, Vec<u8>>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
}

/// Passes over `n` payload bytes of the source without producing them, when the source can
/// (its payloads are placeholders, as the header-only tars `emit` splits); returns whether it
/// did.
pub type SkipPayload<'a> = &'a dyn Fn(u64) -> bool;

/// Splits a tar stream into raw segments and entries (delivered to `sink`).
pub struct Splitter<'a, R: Read> {
    src: Counted<R>,
    limits: Limits,
    sink: &'a mut dyn EntrySink,
    skip: Option<SkipPayload<'a>>,
    split: TarSplit,
    /// Where the raw bytes go when kept compressed ([`Splitter::pack_raw`]).
    packed: Option<Packed>,
    entries: Vec<Entry>,
    warnings: Vec<String>,
    global_pax: BTreeMap<Vec<u8>, Vec<u8>>,
    header_offset: u64,
    /// Paths this layer made symlinks so far (not replaced since): an entry beneath one would
    /// be written through the link on extraction, so it is refused.
    own_symlinks: std::collections::HashSet<Vec<u8>>,
}

/// What [`Splitter::run`] produced.
pub struct SplitOutput {
    /// The recipe; its `raw` is empty when the splitter packed it ([`SplitOutput::packed`]).
    pub split: TarSplit,
    /// With [`Splitter::pack_raw`]: the recipe's stored blob, ready for the database.
    pub packed: Option<Vec<u8>>,
    pub entries: Vec<Entry>,
    pub warnings: Vec<String>,
}

impl<'a, R: Read> Splitter<'a, R> {
    pub fn new(src: R, limits: Limits, sink: &'a mut dyn EntrySink) -> Self {
        Splitter {
            src: Counted {
                inner: src,
                pos: 0,
                limit: limits.max_bytes,
            },
            limits,
            sink,
            skip: None,
            split: TarSplit::default(),
            packed: None,
            entries: Vec::new(),
            warnings: Vec::new(),
            global_pax: BTreeMap::new(),
            header_offset: 0,
            own_symlinks: std::collections::HashSet::new(),
        }
    }

    /// Keep the raw bytes compressed as they come (an import, which stores them and needs them
    /// no more): [`SplitOutput::packed`] holds the stored recipe and `split.raw` stays empty.
    pub fn pack_raw(mut self) -> Result<Self> {
        self.packed = Some(Packed::new()?);
        Ok(self)
    }

    fn push_raw(&mut self, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        match self.packed.as_mut() {
            Some(p) => p.write(bytes)?,
            None => self.split.raw.extend_from_slice(bytes),
        }
        self.split.note_raw(bytes.len());
        Ok(())
    }

    /// Payloads the sink leaves unread are skipped by `skip` instead of read and dropped.
    pub fn skip_payloads_with(mut self, skip: SkipPayload<'a>) -> Self {
        self.skip = Some(skip);
        self
    }

    fn invalid(&self, reason: impl Into<String>) -> Error {
        Error::InvalidTar {
            reason: reason.into(),
            entry: self.entries.len() as u64,
            offset: self.header_offset,
        }
    }

    /// An error located where the decompressed stream stopped making sense.
    fn at_stream_pos(&self, reason: String) -> Error {
        Error::InvalidTar {
            reason: format!("{reason} (decompressed byte {})", self.src.pos),
            entry: self.entries.len() as u64,
            offset: self.header_offset,
        }
    }

    fn limit(&self, what: &'static str, found: u64, limit: u64) -> Error {
        Error::LimitExceeded {
            what,
            found,
            limit,
            entry: self.entries.len() as u64,
            offset: self.header_offset,
        }
    }

    /// Fill `buf` completely; `Ok(false)` on a clean EOF before the first byte.
    fn read_block(&mut self, buf: &mut [u8]) -> Result<bool> {
        let mut got = 0;
        while got < buf.len() {
            let n = match self.src.read(&mut buf[got..]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.read_error(e)),
            };
            if n == 0 {
                if got == 0 {
                    return Ok(false);
                }
                return Err(self.invalid(format!(
                    "truncated: stream ends {got} bytes into a {}-byte block",
                    buf.len()
                )));
            }
            got += n;
        }
        Ok(true)
    }

    fn read_error(&self, e: io::Error) -> Error {
        let err = Error::from(e);
        match err {
            Error::LimitExceeded {
                what, found, limit, ..
            } => self.limit(what, found, limit),
            Error::Io { source, .. } if is_decode_error(&source) => {
                self.at_stream_pos(format!("corrupt compressed stream: {source}"))
            }
            Error::InvalidLayer(reason) => self.at_stream_pos(reason),
            other => other,
        }
    }

    /// Read `size` bytes of an extension record plus padding, all raw.
    fn read_record(&mut self, size: u64) -> Result<Vec<u8>> {
        if size > self.limits.max_record {
            return Err(self.limit("extension record size", size, self.limits.max_record));
        }
        let padded = padded(size) as usize;
        let mut data = vec![0u8; padded];
        if !self.read_block(&mut data)? {
            return Err(self.invalid("truncated: extension record missing"));
        }
        self.push_raw(&data)?;
        data.truncate(size as usize);
        Ok(data)
    }

    pub fn run(mut self) -> Result<SplitOutput> {
        let mut pending = Pending::default();
        let mut block = [0u8; BLOCK];
        loop {
            self.header_offset = self.src.pos;
            if !self.read_block(&mut block)? {
                return Err(self.invalid("truncated: no end-of-archive marker"));
            }
            if block.iter().all(|&b| b == 0) {
                self.push_raw(&block)?;
                self.finish_trailer()?;
                break;
            }
            self.check_checksum(&block)?;
            self.push_raw(&block)?;
            let header = tar::Header::from_byte_slice(&block);
            let typeflag = block[156];
            let size = self.unsigned_field(&block, Field::SIZE, "size")?;
            match typeflag {
                b'x' => {
                    let data = self.read_record(size)?;
                    parse_pax(&data, &mut pending.pax).map_err(|r| self.invalid(r))?;
                }
                b'g' => {
                    let data = self.read_record(size)?;
                    let mut global = std::mem::take(&mut self.global_pax);
                    parse_pax(&data, &mut global).map_err(|r| self.invalid(r))?;
                    self.global_pax = global;
                }
                b'L' => pending.long_name = Some(until_nul(&self.read_record(size)?).to_vec()),
                b'K' => pending.long_link = Some(until_nul(&self.read_record(size)?).to_vec()),
                _ => {
                    let pending_now = std::mem::take(&mut pending);
                    self.entry(header, &block, pending_now)?;
                }
            }
        }
        check_hardlinks(&self.entries).map_err(|(i, reason)| Error::InvalidTar {
            reason,
            entry: i as u64,
            offset: 0,
        })?;
        let packed = match self.packed.take() {
            Some(p) => Some(p.finish(&self.split.ops)?),
            None => None,
        };
        Ok(SplitOutput {
            split: self.split,
            packed,
            entries: self.entries,
            warnings: self.warnings,
        })
    }

    fn unsigned_field(
        &self,
        block: &[u8; BLOCK],
        range: std::ops::Range<usize>,
        name: &str,
    ) -> Result<u64> {
        numeric_field(&block[range])
            .and_then(|v| u64::try_from(v).ok())
            .ok_or_else(|| self.invalid(format!("bad {name} field")))
    }

    fn check_checksum(&self, block: &[u8; BLOCK]) -> Result<()> {
        let field = &block[148..156];
        let text = std::str::from_utf8(field)
            .ok()
            .map(|s| s.trim_matches(|c: char| c == ' ' || c == '\0'))
            .filter(|s| !s.is_empty())
            .and_then(|s| u32::from_str_radix(s, 8).ok())
            .ok_or_else(|| self.invalid("not a tar header (unreadable checksum field)"))?;
        let (mut unsigned, mut signed) = (0u32, 0i32);
        for (i, &b) in block.iter().enumerate() {
            let b = if (148..156).contains(&i) { b' ' } else { b };
            unsigned += u32::from(b);
            signed += i32::from(b as i8);
        }
        if text != unsigned && i64::from(text) != i64::from(signed) {
            return Err(self.invalid(format!(
                "bad header checksum: stored {text:o}, computed {unsigned:o}"
            )));
        }
        Ok(())
    }

    fn finish_trailer(&mut self) -> Result<()> {
        let mut rest = Vec::new();
        let limit = self.limits.max_trailing;
        let mut buf = [0u8; 64 * 1024];
        loop {
            let n = match self.src.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.read_error(e)),
            };
            if n == 0 {
                break;
            }
            rest.extend_from_slice(&buf[..n]);
            if rest.len() as u64 > limit {
                return Err(self.limit("bytes after end-of-archive", rest.len() as u64, limit));
            }
        }
        self.push_raw(&rest)?;
        Ok(())
    }

    fn entry(&mut self, header: &tar::Header, block: &[u8; BLOCK], p: Pending) -> Result<()> {
        if self.entries.len() as u64 >= self.limits.max_entries {
            return Err(self.limit(
                "entry count",
                self.entries.len() as u64 + 1,
                self.limits.max_entries,
            ));
        }
        let mut typeflag = block[156];
        let mut pax = self.global_pax.clone();
        pax.extend(p.pax);

        let raw_path: Vec<u8> = match pax.get(&b"path"[..]) {
            Some(v) => v.clone(),
            None => p
                .long_name
                .unwrap_or_else(|| header.path_bytes().into_owned()),
        };
        if typeflag == b'\0' && raw_path.ends_with(b"/") {
            typeflag = b'5'; // pre-POSIX directory
        }
        let raw_link: Vec<u8> = match pax.get(&b"linkpath"[..]) {
            Some(v) => v.clone(),
            None => p.long_link.unwrap_or_else(|| {
                header
                    .link_name_bytes()
                    .map(|c| c.into_owned())
                    .unwrap_or_default()
            }),
        };
        let path = self.normalize(&raw_path)?;

        let pax_num = |key: &[u8]| -> Result<Option<u64>> {
            pax.get(key)
                .map(|v| {
                    std::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.parse::<u64>().ok())
                        .ok_or_else(|| {
                            self.invalid(format!("bad PAX {} record", String::from_utf8_lossy(key)))
                        })
                })
                .transpose()
        };
        let header_size = self.unsigned_field(block, Field::SIZE, "size")?;
        let data_size = pax_num(b"size")?.unwrap_or(header_size);
        let mode = self.unsigned_field(block, Field::MODE, "mode")? as u32 & 0o7777;
        let uid = match pax_num(b"uid")? {
            Some(v) => v,
            None => self.unsigned_field(block, Field::UID, "uid")?,
        };
        let gid = match pax_num(b"gid")? {
            Some(v) => v,
            None => self.unsigned_field(block, Field::GID, "gid")?,
        };
        let mtime_ns = match pax.get(&b"mtime"[..]) {
            Some(v) => parse_pax_time(v).ok_or_else(|| self.invalid("bad PAX mtime record"))?,
            None => {
                let secs = numeric_field(&block[Field::MTIME])
                    .ok_or_else(|| self.invalid("bad mtime field"))?;
                secs * 1_000_000_000
            }
        };
        let mtime_ns = match i64::try_from(mtime_ns) {
            Ok(ns) => ns,
            // Beyond 1677-09-21..2262-04-11 (i64 nanoseconds): clamped, and said. The exported
            // tar still carries the original (its headers are kept byte for byte).
            Err(_) => {
                let clamped = if mtime_ns < 0 {
                    MIN_MTIME_NS
                } else {
                    MAX_MTIME_NS
                };
                self.warnings.push(format!(
                    "{}: mtime {} s is beyond what the store keeps; clamped to {} s (export keeps \
                     the original)",
                    String::from_utf8_lossy(&path),
                    mtime_ns / 1_000_000_000,
                    clamped / 1_000_000_000
                ));
                clamped
            }
        };
        let uname = pax.get(&b"uname"[..]).cloned().unwrap_or_else(|| {
            header
                .username_bytes()
                .map(<[u8]>::to_vec)
                .unwrap_or_default()
        });
        let gname = pax.get(&b"gname"[..]).cloned().unwrap_or_else(|| {
            header
                .groupname_bytes()
                .map(<[u8]>::to_vec)
                .unwrap_or_default()
        });
        let mut xattrs = BTreeMap::new();
        for (k, v) in &pax {
            if let Some(name) = k.strip_prefix(b"SCHILY.xattr.") {
                xattrs.insert(name.to_vec(), v.clone());
            }
        }

        let has_data = !matches!(typeflag, b'1' | b'2' | b'3' | b'4' | b'5' | b'6');
        // GNU sparse files hold a map of data regions and only those regions: their archived
        // bytes are not their content. Until the view can expand them, they are refused rather
        // than shown wrong (issue 14: never a silently wrong file).
        if let Some(format) = sparse_format(typeflag, &pax) {
            let shown = pax.get(&b"GNU.sparse.name"[..]).map_or(&path, |n| n);
            return Err(self.invalid(format!(
                "{}: a GNU sparse file ({format}), which layerstore does not expand: refused \
                 rather than stored with its sparse map and data regions as its content \
                 (archive it without --sparse)",
                String::from_utf8_lossy(shown)
            )));
        }
        let name = path.rsplit(|&b| b == b'/').next().unwrap_or(&[]);
        // A marker is a leaf: nothing can live beneath a whiteout or an opaque marker (AUFS
        // metadata directories such as `.wh..wh.plnk/` do hold entries).
        let mut parents = path.split(|&b| b == b'/').rev().skip(1);
        if parents.any(|c| marker_of(c) != Marker::No) {
            return Err(self.invalid(format!(
                "entry beneath a whiteout or opaque marker: {:?}",
                String::from_utf8_lossy(&raw_path)
            )));
        }
        let marker = marker_of(name);
        let kind = match typeflag {
            _ if marker == Marker::Opaque => Kind::Opaque,
            _ if matches!(marker, Marker::Whiteout(_)) => {
                let target = hidden_name(name);
                if target.is_empty() || target == b"." || target == b".." {
                    return Err(self.invalid(format!(
                        "invalid whiteout {:?}",
                        String::from_utf8_lossy(&raw_path)
                    )));
                }
                Kind::Whiteout
            }
            b'0' | b'\0' | b'7' | b'S' => Kind::File,
            b'1' => Kind::Hardlink,
            b'2' => Kind::Symlink,
            b'3' => Kind::Char,
            b'4' => Kind::Block,
            b'5' => Kind::Dir,
            b'6' => Kind::Fifo,
            // GNU's volume label, multi-volume continuation and incremental dumpdir describe
            // the archive, not a file: kept for export, never part of a view.
            b'V' | b'M' | b'D' => Kind::Other(typeflag),
            // POSIX: "other values … shall be read as regular files".
            _ => Kind::File,
        };
        if path.is_empty() && !matches!(kind, Kind::Dir) {
            return Err(self.invalid("an entry other than a directory names the root"));
        }
        self.refuse_beneath_own_symlink(&path, kind)?;
        let link = match kind {
            Kind::Hardlink => {
                let target = self.normalize(&raw_link)?;
                if target.is_empty() {
                    return Err(self.invalid("hardlink to the root"));
                }
                target
            }
            _ => raw_link,
        };
        let (devmajor, devminor) = if matches!(kind, Kind::Char | Kind::Block) {
            let major = header
                .device_major()
                .map_err(|e| self.invalid(format!("bad devmajor: {e}")))?;
            let minor = header
                .device_minor()
                .map_err(|e| self.invalid(format!("bad devminor: {e}")))?;
            (major.unwrap_or(0), minor.unwrap_or(0))
        } else {
            (0, 0)
        };

        let mut entry = Entry {
            path,
            kind,
            typeflag,
            mode,
            uid,
            gid,
            uname,
            gname,
            mtime_ns,
            size: if has_data { data_size } else { 0 },
            link,
            devmajor,
            devminor,
            xattrs,
            chunks: Vec::new(),
            digest: None,
            // Stores written before sparse files were refused may hold some (see
            // `Store::layer_entries`, which refuses to stack them).
            sparse: false,
        };
        let index = self.entries.len() as u32;
        if has_data && data_size > 0 {
            self.split.ops.push(Op::Payload(index));
            let mut take = (&mut self.src).take(data_size);
            let res = self.sink.entry(&mut entry, Some(&mut take));
            let untouched = res.is_ok() && take.limit() == data_size;
            let (res, missing) = if untouched && self.skip.is_some_and(|skip| skip(data_size)) {
                (self.src.advance(data_size).map_err(Error::from), 0)
            } else {
                let res =
                    res.and_then(|()| io::copy(&mut take, &mut io::sink()).map_err(Error::from));
                (res.map(drop), take.limit())
            };
            res.map_err(|e| self.read_error_from(e))?;
            if missing > 0 {
                return Err(
                    self.invalid(format!("truncated: entry data ends {missing} bytes early"))
                );
            }
            let pad = (padded(data_size) - data_size) as usize;
            let mut padding = [0u8; BLOCK];
            if pad > 0 && !self.read_block(&mut padding[..pad])? {
                return Err(self.invalid("truncated: entry padding missing"));
            }
            self.push_raw(&padding[..pad])?;
        } else {
            self.sink.entry(&mut entry, None)?;
        }
        self.entries.push(entry);
        Ok(())
    }

    /// Refuse an entry beneath a symlink this layer created (`escape -> /x`, then `escape/p`):
    /// extracting it would write wherever the link points. Then note what `path` now is.
    /// Markers write nothing, so they are not refused.
    fn refuse_beneath_own_symlink(&mut self, path: &[u8], kind: Kind) -> Result<()> {
        let writes = !matches!(kind, Kind::Whiteout | Kind::Opaque | Kind::Other(_));
        if writes && !self.own_symlinks.is_empty() {
            let above = path
                .iter()
                .enumerate()
                .filter(|&(_, &b)| b == b'/')
                .map(|(i, _)| &path[..i])
                .find(|p| self.own_symlinks.contains(*p));
            if let Some(link) = above {
                return Err(self.invalid(format!(
                    "{:?} lies beneath {:?}, a symlink this layer created: extracting it would \
                     write through the link",
                    String::from_utf8_lossy(path),
                    String::from_utf8_lossy(link)
                )));
            }
        }
        match kind {
            Kind::Symlink => {
                self.own_symlinks.insert(path.to_vec());
            }
            Kind::Whiteout | Kind::Opaque | Kind::Other(_) => {}
            _ => {
                self.own_symlinks.remove(path);
            }
        }
        Ok(())
    }

    fn read_error_from(&self, e: Error) -> Error {
        match e {
            Error::Io { source, .. } => self.read_error(source),
            Error::LimitExceeded {
                what, found, limit, ..
            } => self.limit(what, found, limit),
            Error::InvalidLayer(reason) => self.at_stream_pos(reason),
            other => other,
        }
    }

    /// Normalise a member name ([`normalize_name`]), noting a removed leading `/` and enforcing
    /// the depth limit.
    fn normalize(&mut self, raw: &[u8]) -> Result<Vec<u8>> {
        let (out, depth) = match normalize_name(raw) {
            Ok(normalized) => normalized,
            Err(BadName::Nul) => return Err(self.invalid("path contains a NUL byte")),
            Err(BadName::Escapes) => {
                return Err(self.invalid(format!(
                    "path escapes the layer: {:?}",
                    String::from_utf8_lossy(raw)
                )))
            }
        };
        if raw.first() == Some(&b'/') {
            self.warnings.push(format!(
                "{}: leading '/' removed from member name",
                String::from_utf8_lossy(raw)
            ));
        }
        if depth > self.limits.max_path_depth {
            return Err(self.limit(
                "path depth",
                u64::from(depth),
                u64::from(self.limits.max_path_depth),
            ));
        }
        Ok(out)
    }
}

/// Why a member name has no normal form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadName {
    /// A NUL byte (no file system can hold it).
    Nul,
    /// A `..` component: the name could address something outside the layer.
    Escapes,
}

/// A member name's normal form and its depth (number of components): relative, `/`-separated,
/// no empty or `.` components, the root being the empty name. A name with a `..` component is
/// refused rather than resolved, so a normal name never climbs. Applying it to its own output
/// gives that output again.
/// Hard links that can be judged within their layer: one to a directory the layer put at its
/// target before it, or one to itself with nothing before it there (a link to a lower layer's
/// file is judged when the layer is stacked). Returns the index of the first bad link and why.
fn check_hardlinks(entries: &[Entry]) -> std::result::Result<(), (usize, String)> {
    use std::collections::{HashMap, HashSet};
    let targets: HashSet<&[u8]> = entries
        .iter()
        .filter(|e| e.kind == Kind::Hardlink)
        .map(|e| e.link.as_slice())
        .collect();
    if targets.is_empty() {
        return Ok(());
    }
    let mut before: HashMap<&[u8], Kind> = HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        if e.kind == Kind::Hardlink {
            let show = |p: &[u8]| String::from_utf8_lossy(p).into_owned();
            match before.get(e.link.as_slice()) {
                Some(Kind::Dir) => {
                    return Err((
                        i,
                        format!(
                            "hardlink {:?} points at the directory {:?}",
                            show(&e.path),
                            show(&e.link)
                        ),
                    ))
                }
                None if e.link == e.path => {
                    return Err((i, format!("hardlink {:?} points at itself", show(&e.path))))
                }
                _ => {}
            }
        }
        if targets.contains(e.path.as_slice()) {
            before.insert(&e.path, e.kind);
        }
    }
    Ok(())
}

pub fn normalize_name(raw: &[u8]) -> std::result::Result<(Vec<u8>, u32), BadName> {
    if raw.contains(&0) {
        return Err(BadName::Nul);
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut depth = 0u32;
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => return Err(BadName::Escapes),
            c => {
                depth = depth.saturating_add(1);
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    Ok((out, depth))
}

fn is_decode_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput | io::ErrorKind::UnexpectedEof
    ) || e.to_string().contains("corrupt")
}

/// Byte ranges of the numeric header fields.
struct Field;

impl Field {
    const MODE: std::ops::Range<usize> = 100..108;
    const UID: std::ops::Range<usize> = 108..116;
    const GID: std::ops::Range<usize> = 116..124;
    const SIZE: std::ops::Range<usize> = 124..136;
    const MTIME: std::ops::Range<usize> = 136..148;
}

/// A numeric header field: octal text (spaces/NULs around it, empty meaning 0, as GNU tar and
/// Python read it) or GNU base-256, positive (`0x80`) or negative (`0xff`, two's complement).
pub fn numeric_field(field: &[u8]) -> Option<i128> {
    match field.first() {
        Some(&b) if b & 0x80 != 0 => {
            if field.len() > 12 {
                return None;
            }
            let negative = b & 0x40 != 0;
            let mut v: i128 = if negative { -1 } else { 0 };
            for (i, &byte) in field.iter().enumerate() {
                let byte = if i == 0 && !negative {
                    byte & 0x7f
                } else {
                    byte
                };
                v = (v << 8) | i128::from(byte);
            }
            Some(v)
        }
        _ => {
            let text = field
                .iter()
                .position(|&c| c == 0)
                .map_or(field, |i| &field[..i]);
            let text = std::str::from_utf8(text).ok()?.trim_matches(' ');
            if text.is_empty() {
                return Some(0);
            }
            u64::from_str_radix(text, 8).ok().map(i128::from)
        }
    }
}

pub fn padded(n: u64) -> u64 {
    n.div_ceil(BLOCK as u64) * BLOCK as u64
}

fn until_nul(b: &[u8]) -> &[u8] {
    b.iter().position(|&c| c == 0).map_or(b, |i| &b[..i])
}

/// Parse PAX records (`"<len> <key>=<value>\n"`), honouring each record's length prefix: values
/// may contain newlines and NULs (binary xattrs), so splitting on `\n` would be wrong.
fn parse_pax(
    mut data: &[u8],
    into: &mut BTreeMap<Vec<u8>, Vec<u8>>,
) -> std::result::Result<(), String> {
    // Producers pad the record block with NULs.
    while let Some((&first, _)) = data.split_first() {
        if first == 0 {
            break;
        }
        let space = data
            .iter()
            .position(|&b| b == b' ')
            .ok_or("malformed PAX record: no length")?;
        let len: usize = std::str::from_utf8(&data[..space])
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse().ok())
            .ok_or("malformed PAX record: bad length")?;
        if len <= space + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err(format!("malformed PAX record: length {len} does not fit"));
        }
        let body = &data[space + 1..len - 1];
        let eq = body
            .iter()
            .position(|&b| b == b'=')
            .ok_or("malformed PAX record: no '='")?;
        let (key, value) = (&body[..eq], &body[eq + 1..]);
        if key.is_empty() {
            return Err("malformed PAX record: empty key".into());
        }
        into.insert(key.to_vec(), value.to_vec());
        data = &data[len..];
    }
    Ok(())
}

/// Parse a PAX time (`123`, `123.456`, `-1.5`) into nanoseconds; `None` when it is no number.
/// A number beyond i128 nanoseconds saturates (the caller refuses anything beyond i64 as out of
/// range): the arithmetic must not overflow on a hostile record.
/// The latest and earliest mtimes an entry keeps: whole seconds within i64 nanoseconds.
const MAX_MTIME_NS: i64 = i64::MAX / 1_000_000_000 * 1_000_000_000;
const MIN_MTIME_NS: i64 = i64::MIN / 1_000_000_000 * 1_000_000_000;

/// Which GNU sparse encoding an entry uses, if any: old GNU (typeflag `S`, its map in the header
/// and extension blocks), PAX 0.0 (`GNU.sparse.offset`/`numbytes` records), PAX 0.1
/// (`GNU.sparse.map`) or PAX 1.0 (`GNU.sparse.major`/`minor`, its map at the start of the data).
fn sparse_format(typeflag: u8, pax: &BTreeMap<Vec<u8>, Vec<u8>>) -> Option<String> {
    if typeflag == b'S' {
        return Some("old GNU format".into());
    }
    let get = |k: &str| {
        pax.get(k.as_bytes())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    if let Some(major) = get("GNU.sparse.major") {
        let minor = get("GNU.sparse.minor").unwrap_or_default();
        return Some(format!("PAX {major}.{minor}"));
    }
    if pax.contains_key(&b"GNU.sparse.map"[..]) {
        return Some("PAX 0.1".into());
    }
    pax.keys()
        .any(|k| k.starts_with(b"GNU.sparse."))
        .then(|| "PAX 0.0".into())
}

fn parse_pax_time(v: &[u8]) -> Option<i128> {
    let s = std::str::from_utf8(v).ok()?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    if secs.is_empty()
        || !secs.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    // Only digits, so parsing fails only by overflowing.
    let secs: i128 = secs.parse().unwrap_or(i128::MAX);
    let mut ns: i128 = 0;
    for (i, d) in frac.bytes().take(9).enumerate() {
        ns += i128::from(d - b'0') * 10i128.pow(8 - i as u32);
    }
    let total = secs
        .checked_mul(1_000_000_000)
        .and_then(|t| t.checked_add(ns))
        .unwrap_or(i128::MAX);
    Some(if neg { -total } else { total })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `raw` is encoded as one slice (`serde_bytes`), byte for byte what the plain `Vec<u8>`
    /// encoding wrote, so existing stores decode unchanged.
    #[test]
    fn split_keeps_the_stored_encoding() {
        let split = TarSplit {
            raw: (0..2000u32).map(|i| (i * 7) as u8).collect(),
            ops: vec![Op::Raw(1500), Op::Payload(3), Op::Raw(500)],
        };
        let old = postcard::to_stdvec(&(split.raw.clone(), split.ops.clone())).unwrap();
        assert_eq!(postcard::to_stdvec(&split).unwrap(), old);
        assert_eq!(postcard::from_bytes::<TarSplit>(&old).unwrap(), split);
    }

    /// An import keeps the raw bytes compressed as they stream in ([`Splitter::pack_raw`]); the
    /// blob it stores decodes to exactly the recipe an unpacked split holds.
    #[test]
    fn a_packed_split_stores_the_same_recipe() {
        struct Drain;
        impl EntrySink for Drain {
            fn entry(&mut self, _: &mut Entry, payload: Option<&mut dyn Read>) -> Result<()> {
                if let Some(p) = payload {
                    io::copy(p, &mut io::sink())?;
                }
                Ok(())
            }
        }
        let mut builder = ::tar::Builder::new(Vec::new());
        for i in 0..300u32 {
            let data = vec![i as u8; (i as usize * 37) % 1500];
            let mut h = ::tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            builder
                .append_data(&mut h, format!("d{}/f{i}", i % 7), data.as_slice())
                .unwrap();
        }
        let tar = builder.into_inner().unwrap();
        let plain = Splitter::new(tar.as_slice(), Limits::default(), &mut Drain)
            .run()
            .unwrap();
        let packed = Splitter::new(tar.as_slice(), Limits::default(), &mut Drain)
            .pack_raw()
            .unwrap()
            .run()
            .unwrap();
        assert!(plain.packed.is_none() && packed.split.raw.is_empty());
        assert_eq!(packed.split.ops, plain.split.ops);
        let stored: TarSplit = crate::layer::decode_blob(&packed.packed.unwrap()).unwrap();
        assert_eq!(stored, plain.split);
    }

    /// A stored recipe read as a stream gives the same ops and raw bytes as decoding it whole,
    /// whatever the segment sizes (segments cross the stream's 1 MiB blocks here).
    #[test]
    fn a_stored_split_streams_its_raw_bytes_in_order() {
        let split = TarSplit {
            raw: (0..3_000_000u32).map(|i| (i % 251) as u8).collect(),
            ops: vec![
                Op::Raw(700_000),
                Op::Payload(0),
                Op::Raw(1_500_000),
                Op::Raw(1),
                Op::Payload(1),
                Op::Raw(799_999),
            ],
        };
        let blob = crate::layer::encode_blob(&split).unwrap();
        let mut stored = StoredSplit::open(&blob).unwrap();
        assert_eq!(stored.ops, split.ops);
        let mut raw = Vec::new();
        for op in &stored.ops {
            if let Op::Raw(n) = *op {
                stored
                    .raw
                    .take(n, |b, r| {
                        raw.extend_from_slice(&b[r]);
                        Ok(())
                    })
                    .unwrap();
            }
        }
        assert_eq!(raw, split.raw);
        assert!(
            stored.raw.take(1, |_, _| Ok(())).is_err(),
            "no byte past the end"
        );
    }

    #[test]
    fn pax_records_follow_their_length_not_newlines() {
        let mut m = BTreeMap::new();
        let value = b"a\nb\0c";
        let rec = |k: &str, v: &[u8]| {
            let body_len = k.len() + v.len() + 3; // ' ', '=', '\n'
            let mut n = body_len + 1;
            while n.to_string().len() + body_len != n {
                n += 1;
            }
            let mut r = format!("{n} {k}=").into_bytes();
            r.extend_from_slice(v);
            r.push(b'\n');
            r
        };
        let mut data = rec("SCHILY.xattr.user.bin", value);
        data.extend(rec("path", b"x/y"));
        data.extend([0u8; 20]);
        parse_pax(&data, &mut m).unwrap();
        assert_eq!(m[&b"SCHILY.xattr.user.bin"[..]], value);
        assert_eq!(m[&b"path"[..]], b"x/y");
        assert!(parse_pax(b"99 path=x\n", &mut m).is_err());
        assert!(parse_pax(b"7 pathx\n", &mut m).is_err());
    }

    #[test]
    fn numeric_fields() {
        assert_eq!(numeric_field(b"0000644\0"), Some(0o644));
        assert_eq!(numeric_field(b"  644 \0"), Some(0o644));
        assert_eq!(numeric_field(b"\0\0\0\0"), Some(0));
        assert_eq!(numeric_field(b"        "), Some(0));
        assert_eq!(numeric_field(b"12x"), None);
        let mut big = [0u8; 12];
        big[0] = 0x80;
        big[11] = 0x01;
        big[10] = 0x02;
        assert_eq!(numeric_field(&big), Some(0x0201));
        let minus_one = [0xffu8; 12];
        assert_eq!(numeric_field(&minus_one), Some(-1));
        let mut minus_300 = [0xffu8; 12];
        minus_300[10] = 0xfe;
        minus_300[11] = 0xd4;
        assert_eq!(numeric_field(&minus_300), Some(-300));
    }

    #[test]
    fn pax_time() {
        assert_eq!(parse_pax_time(b"1"), Some(1_000_000_000));
        assert_eq!(parse_pax_time(b"1.5"), Some(1_500_000_000));
        assert_eq!(parse_pax_time(b"-1.000000001"), Some(-1_000_000_001));
        assert_eq!(parse_pax_time(b"1.1234567891"), Some(1_123_456_789));
        assert_eq!(parse_pax_time(b"x"), None);
        // Found reviewing the parsers for the fuzz targets (reproduced with `tar_split`): 30 or
        // more digits overflowed i128 nanoseconds, a panic.
        assert_eq!(parse_pax_time(&[b'9'; 35]), Some(i128::MAX));
        assert_eq!(parse_pax_time(&[b'9'; 60]), Some(i128::MAX));
        let neg = [&b"-"[..], &[b'9'; 35][..], b".5"].concat();
        assert_eq!(parse_pax_time(&neg), Some(-i128::MAX));
    }
}
