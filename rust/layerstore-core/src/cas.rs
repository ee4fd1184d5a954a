//! Chunk storage: append-only pack files of compressed blocks.
//!
//! Invariants: a pack file is written by exactly one writer (its name is fresh and created with
//! `O_EXCL`), only appended to, and fsynced before any metadata that points into it commits.
//! Bytes past the last committed block (a torn tail) are never read and are reclaimed by `gc`.
//! Small chunks are grouped into blocks of about [`BLOCK_TARGET`] bytes compressed as one zstd
//! frame, which compresses a rootfs of small files nearly as well as a whole-stream compressor;
//! a block that does not shrink is stored raw. The pack knows nothing of names or references:
//! locations live in the metadata database.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::digest::Blake3;
use crate::error::{Error, IoContext, Result};

/// Blocks are cut at about this many uncompressed bytes.
pub const BLOCK_TARGET: usize = 1024 * 1024;
/// Pack file header: magic and format version.
pub const PACK_MAGIC: &[u8; 8] = b"LSPACK01";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Codec {
    Raw = 0,
    Zstd = 1,
}

impl Codec {
    pub fn from_u8(v: u8) -> Result<Self> {
        match v {
            0 => Ok(Codec::Raw),
            1 => Ok(Codec::Zstd),
            _ => Err(Error::Corrupt(format!("unknown block codec {v}"))),
        }
    }
}

/// Where one chunk lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkLoc {
    pub digest: Blake3,
    pub pack: String,
    /// Offset and stored length of the block holding the chunk.
    pub block_offset: u64,
    pub block_len: u64,
    pub codec: Codec,
    /// Offset of the chunk inside the uncompressed block, and its length.
    pub inner_offset: u32,
    pub len: u32,
}

/// A block being filled.
#[derive(Default)]
struct OpenBlock {
    data: Vec<u8>,
    chunks: Vec<(Blake3, u32, u32)>,
}

impl OpenBlock {
    fn with_capacity() -> Self {
        OpenBlock {
            data: Vec::with_capacity(BLOCK_TARGET),
            chunks: Vec::new(),
        }
    }
}

/// What the background writer hands back.
struct Written {
    file: Option<File>,
    locs: Vec<ChunkLoc>,
    offset: u64,
}

/// A block after compression, on its way to the file.
struct Encoded {
    chunks: Vec<(Blake3, u32, u32)>,
    codec: Codec,
    bytes: Vec<u8>,
}

/// Appends chunks to one fresh pack file. Blocks are filled on the caller's thread, compressed
/// by one thread per core as they come, and appended by a writer thread in the order they finish
/// (a block's place in the pack does not matter: its offset is recorded). Chunking, compression
/// and writing overlap; bounded channels keep memory bounded.
pub struct PackWriter {
    dir: PathBuf,
    name: String,
    open: OpenBlock,
    tx: Option<crossbeam_channel::Sender<OpenBlock>>,
    worker: Option<std::thread::JoinHandle<Result<Written>>>,
    /// Block buffers the compressors and the writer are done with, to fill again (a fresh
    /// 1 MiB buffer per block grew by doubling and faulted in new pages every time).
    spares: crossbeam_channel::Receiver<Vec<u8>>,
}

/// Blocks queued between the stages (each about [`BLOCK_TARGET`] bytes).
const QUEUE_BLOCKS: usize = 16;

impl PackWriter {
    /// `level` 0 stores blocks raw.
    pub fn new(dir: &Path, name: String, level: i32) -> Self {
        let (tx, rx) = crossbeam_channel::bounded::<OpenBlock>(QUEUE_BLOCKS);
        let (etx, erx) = crossbeam_channel::bounded::<Result<Encoded>>(QUEUE_BLOCKS);
        let (spare, spares) = crossbeam_channel::bounded::<Vec<u8>>(QUEUE_BLOCKS);
        let cores = crate::cores();
        for _ in 0..cores {
            let (rx, etx, spare) = (rx.clone(), etx.clone(), spare.clone());
            std::thread::Builder::new()
                .name("layerstore-zstd".into())
                .spawn(move || {
                    for block in rx {
                        let encoded =
                            encode_block(block.data, level).map(|(codec, bytes, done)| {
                                if let Some(done) = done {
                                    let _ = spare.try_send(done);
                                }
                                Encoded {
                                    chunks: block.chunks,
                                    codec,
                                    bytes,
                                }
                            });
                        if etx.send(encoded).is_err() {
                            break; // the writer failed; it reports why
                        }
                    }
                })
                .expect("spawn compressor");
        }
        drop(etx);
        let path = dir.join(&name);
        let pack = name.clone();
        let worker = std::thread::Builder::new()
            .name("layerstore-pack".into())
            .spawn(move || write_blocks(&path, &pack, &erx, &spare))
            .expect("spawn pack writer");
        PackWriter {
            dir: dir.to_path_buf(),
            name,
            open: OpenBlock::with_capacity(),
            tx: Some(tx),
            worker: Some(worker),
            spares,
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(&self.name)
    }

    /// Add a chunk (the caller has already made sure it is new).
    pub fn add(&mut self, digest: Blake3, data: &[u8]) -> Result<()> {
        if !self.open.data.is_empty() && self.open.data.len() + data.len() > BLOCK_TARGET {
            self.seal()?;
        }
        let inner = self.open.data.len() as u32;
        self.open.data.extend_from_slice(data);
        self.open.chunks.push((digest, inner, data.len() as u32));
        if self.open.data.len() >= BLOCK_TARGET {
            self.seal()?;
        }
        Ok(())
    }

    fn seal(&mut self) -> Result<()> {
        let fresh = match self.spares.try_recv() {
            Ok(mut data) => {
                data.clear();
                OpenBlock {
                    data,
                    chunks: Vec::new(),
                }
            }
            Err(_) => OpenBlock::with_capacity(),
        };
        let block = std::mem::replace(&mut self.open, fresh);
        if block.chunks.is_empty() {
            return Ok(());
        }
        let sent = self.tx.as_ref().is_some_and(|tx| tx.send(block).is_ok());
        if !sent {
            // The writer stopped early: its error says why.
            return Err(self
                .join()
                .err()
                .unwrap_or_else(|| Error::Corrupt("pack writer stopped".into())));
        }
        Ok(())
    }

    fn join(&mut self) -> Result<Written> {
        drop(self.tx.take());
        match self.worker.take() {
            Some(w) => w.join().map_err(|_| Error::Panicked {
                what: "pack writer",
            })?,
            None => Err(Error::Corrupt("pack writer already finished".into())),
        }
    }

    /// Write everything out and fsync the pack (and its directory). Returns the locations and
    /// the committed length of the pack, or `None` when no chunk was added (no file exists).
    pub fn finish(mut self, crash: impl Fn(&str)) -> Result<Option<(Vec<ChunkLoc>, u64)>> {
        self.seal()?;
        let written = self.join()?;
        let Some(file) = written.file else {
            return Ok(None);
        };
        crash("after-pack-write");
        file.sync_all()
            .ctx(|| format!("syncing pack {}", self.dir.join(&self.name).display()))?;
        sync_dir(&self.dir)?;
        crash("after-sync");
        self.name.clear(); // committed: Drop must not remove it
        Ok(Some((written.locs, written.offset)))
    }
}

impl Drop for PackWriter {
    fn drop(&mut self) {
        // Not finished (an error or a cancel): the pack is garbage; nothing points into it.
        if self.worker.is_some() {
            let _ = self.join();
        }
        if !self.name.is_empty() {
            let _ = std::fs::remove_file(self.path());
        }
    }
}

/// Bytes appended to a file between two background flushes of its data (see [`EarlyFlush`]).
const FLUSH_EVERY: u64 = 32 << 20;

/// Flushes a file's data to disk in the background while it is still being written (a pack, a
/// layer blob kept as it came), so the `fsync` of the commit point finds little left to write (on
/// a rootfs import, 0.1 s of a 0.7 s import was that one fsync). Durability still rests on the
/// final `sync_all` alone.
pub(crate) struct EarlyFlush {
    tx: crossbeam_channel::Sender<()>,
    worker: std::thread::JoinHandle<()>,
    unflushed: u64,
}

impl EarlyFlush {
    pub(crate) fn new(file: &File) -> Option<Self> {
        let file = file.try_clone().ok()?;
        let (tx, rx) = crossbeam_channel::bounded::<()>(1);
        let worker = std::thread::Builder::new()
            .name("layerstore-flush".into())
            .spawn(move || {
                for () in rx {
                    // Best effort: a failure here shows again in the final sync, which counts.
                    let _ = file.sync_data();
                }
            })
            .ok()?;
        Some(EarlyFlush {
            tx,
            worker,
            unflushed: 0,
        })
    }

    pub(crate) fn written(&mut self, n: u64) {
        self.unflushed += n;
        // A flush still running takes the next batch with it: never wait for it.
        if self.unflushed >= FLUSH_EVERY && self.tx.try_send(()).is_ok() {
            self.unflushed = 0;
        }
    }

    fn finish(self) {
        drop(self.tx);
        let _ = self.worker.join();
    }
}

/// The writing end of [`PackWriter`]: appends encoded blocks as they arrive.
fn write_blocks(
    path: &Path,
    name: &str,
    rx: &crossbeam_channel::Receiver<Result<Encoded>>,
    spare: &crossbeam_channel::Sender<Vec<u8>>,
) -> Result<Written> {
    let mut w = Written {
        file: None,
        locs: Vec::new(),
        offset: 0,
    };
    let mut flush: Option<EarlyFlush> = None;
    let result = (|| {
        for encoded in rx {
            let Encoded {
                chunks,
                codec,
                bytes,
            } = encoded?;
            if w.file.is_none() {
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .ctx(|| format!("creating pack {}", path.display()))?;
                f.write_all(PACK_MAGIC)
                    .ctx(|| format!("writing pack {}", path.display()))?;
                w.offset = PACK_MAGIC.len() as u64;
                flush = EarlyFlush::new(&f);
                w.file = Some(f);
            }
            let file = w.file.as_mut().expect("opened above");
            file.write_all(&bytes)
                .ctx(|| format!("writing pack {}", path.display()))?;
            if let Some(flush) = flush.as_mut() {
                flush.written(bytes.len() as u64);
            }
            for (digest, inner_offset, len) in chunks {
                w.locs.push(ChunkLoc {
                    digest,
                    pack: name.to_string(),
                    block_offset: w.offset,
                    block_len: bytes.len() as u64,
                    codec,
                    inner_offset,
                    len,
                });
            }
            w.offset += bytes.len() as u64;
            if codec == Codec::Raw {
                let _ = spare.try_send(bytes); // the filler takes it back
            }
        }
        Ok(())
    })();
    if let Some(flush) = flush {
        flush.finish();
    }
    result.map(|()| w)
}

thread_local! {
    /// One compression context per thread and level: creating one per block costs ~2% of an import.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
}

/// Compress a block, or keep it as it is (moved, not copied) when that is smaller or asked for.
/// Also returns the input buffer when the result does not own it, for reuse.
fn encode_block(data: Vec<u8>, level: i32) -> Result<(Codec, Vec<u8>, Option<Vec<u8>>)> {
    if level > 0 {
        let z = COMPRESSOR.with(|cell| -> Result<Vec<u8>> {
            let mut slot = cell.borrow_mut();
            if slot.as_ref().is_none_or(|(l, _)| *l != level) {
                let c =
                    zstd::bulk::Compressor::new(level).ctx(|| "creating a compressor".into())?;
                *slot = Some((level, c));
            }
            let (_, c) = slot.as_mut().expect("set above");
            c.compress(&data).ctx(|| "compressing a block".into())
        })?;
        if z.len() < data.len() {
            return Ok((Codec::Zstd, z, Some(data)));
        }
    }
    Ok((Codec::Raw, data, None))
}

/// A block as `gc` sees it: where it lies, how it is stored, and how many decoded bytes of live
/// chunks it still holds.
#[derive(Clone, Copy, Debug)]
pub struct LiveBlock {
    pub offset: u64,
    pub len: u64,
    pub codec: Codec,
    pub live: u64,
}

impl LiveBlock {
    /// Its decoded size: a zstd frame records it in its header, a raw block is its own size.
    /// `None` when the header cannot be read or records no size.
    pub fn decoded_len(&self, pack: &File) -> Option<u64> {
        use std::os::unix::fs::FileExt;
        match self.codec {
            Codec::Raw => Some(self.len),
            Codec::Zstd => {
                let mut header = [0u8; 18]; // the longest zstd frame header
                let n = (self.len as usize).min(header.len());
                pack.read_exact_at(&mut header[..n], self.offset).ok()?;
                zstd::zstd_safe::get_frame_content_size(&header[..n])
                    .ok()
                    .flatten()
            }
        }
    }

    /// Whether most of it is dead: `gc` then re-encodes its live chunks into new blocks
    /// instead of copying it whole (a 1 MiB block keeping one small chunk alive).
    pub fn is_sparse(&self, decoded: Option<u64>) -> bool {
        decoded.is_some_and(|d| self.live * 2 < d)
    }

    /// Stored bytes its live chunks account for (its length scaled by their share).
    pub fn live_stored(&self, decoded: Option<u64>) -> u64 {
        match decoded {
            Some(d) if self.live < d => self.len * self.live / d.max(1),
            _ => self.len,
        }
    }

    /// Decode it (every chunk in it is then checked against its digest by [`Regrouper::add`]).
    pub fn decode(&self, pack: &File, name: &str) -> Result<Vec<u8>> {
        let loc = ChunkLoc {
            digest: Blake3([0; 32]),
            pack: name.to_owned(),
            block_offset: self.offset,
            block_len: self.len,
            codec: self.codec,
            inner_offset: 0,
            len: 0,
        };
        let mut dctx = zstd::bulk::Decompressor::new().ctx(|| "creating a decompressor".into())?;
        read_block(pack, &loc, &mut dctx, &mut Vec::new(), Vec::new())
    }
}

/// Live chunks of sparse blocks, regrouped into new blocks of about [`BLOCK_TARGET`] bytes.
pub struct Regrouper {
    level: i32,
    open: OpenBlock,
}

/// A regrouped block ready to append: its stored bytes and codec, and each chunk's
/// (digest, inner offset, length).
pub type RegroupedBlock = (Codec, Vec<u8>, Vec<(Blake3, u32, u32)>);

impl Regrouper {
    pub fn new(level: i32) -> Self {
        Regrouper {
            level,
            open: OpenBlock::default(),
        }
    }

    /// Add the chunk `loc` of the decoded `block` (checked against its digest); returns a block
    /// to append once one is full.
    pub fn add(&mut self, block: &[u8], loc: &ChunkLoc) -> Result<Option<RegroupedBlock>> {
        check_chunk(block, loc)?;
        let start = loc.inner_offset as usize;
        let data = &block[start..start + loc.len as usize];
        let full = if !self.open.data.is_empty() && self.open.data.len() + data.len() > BLOCK_TARGET
        {
            self.take()?
        } else {
            None
        };
        let inner = self.open.data.len() as u32;
        self.open.data.extend_from_slice(data);
        self.open.chunks.push((loc.digest, inner, loc.len));
        Ok(full)
    }

    /// The last, partly filled block.
    pub fn take(&mut self) -> Result<Option<RegroupedBlock>> {
        let block = std::mem::take(&mut self.open);
        if block.chunks.is_empty() {
            return Ok(None);
        }
        let (codec, bytes, _) = encode_block(block.data, self.level)?;
        Ok(Some((codec, bytes, block.chunks)))
    }
}

/// Where `gc` moves packs it replaced or emptied, for [`RETIRE_GRACE`] before deleting them: a
/// reader in another process that looked a chunk's location up before the compaction still
/// finds its bytes there.
pub const RETIRED_DIR: &str = "retired";

/// How long a retired pack is kept (longer than any read that started before its retirement).
pub const RETIRE_GRACE: std::time::Duration = std::time::Duration::from_secs(600);

/// Open a pack by name: in `dir`, else among the retired packs.
pub fn open_pack(dir: &Path, name: &str) -> Result<File> {
    let path = dir.join(name);
    match File::open(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let retired = dir.join(RETIRED_DIR).join(name);
            File::open(&retired).ctx(|| format!("opening pack {}", path.display()))
        }
        other => other.ctx(|| format!("opening pack {}", path.display())),
    }
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx(|| format!("syncing directory {}", dir.display()))
}

/// Decoded blocks shared by a store's readers, least recently used first out, bounded in bytes.
/// A block never changes once written (packs are append-only and never reuse a name), so an
/// entry never goes stale; a pack `gc` removes just stops being asked for.
#[derive(Debug)]
pub struct BlockCache {
    budget: usize,
    inner: std::sync::Mutex<CachedBlocks>,
}

#[derive(Debug, Default)]
struct CachedBlocks {
    bytes: usize,
    blocks: hashlink::LinkedHashMap<(String, u64), Arc<Vec<u8>>>,
    /// Buffers of evicted blocks no reader held any more, for the next decodes: a fresh 1 MiB
    /// allocation per block is returned to the kernel when freed, and faulted in again page by
    /// page (zeroing those pages was a tenth of a materialize's CPU in one profile).
    spare: Vec<Vec<u8>>,
}

/// Evicted buffers kept for reuse (one per core and a few more is plenty).
const SPARE_BUFFERS: usize = 8;

impl BlockCache {
    /// A cache holding at most `budget` decoded bytes.
    pub fn new(budget: usize) -> Self {
        BlockCache {
            budget,
            inner: std::sync::Mutex::default(),
        }
    }

    fn get(&self, pack: &str, offset: u64) -> Option<Arc<Vec<u8>>> {
        let mut inner = self.inner.lock().ok()?;
        inner.blocks.to_back(&(pack.to_owned(), offset)).cloned()
    }

    fn put(&self, pack: &str, offset: u64, data: &Arc<Vec<u8>>) {
        if data.len() > self.budget / 4 {
            return; // one block must not flush the rest
        }
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if let Some(old) = inner.blocks.insert((pack.to_owned(), offset), data.clone()) {
            inner.bytes -= old.len();
        }
        inner.bytes += data.len();
        while inner.bytes > self.budget {
            match inner.blocks.pop_front() {
                Some((_, evicted)) => {
                    inner.bytes -= evicted.len();
                    if let Ok(buf) = Arc::try_unwrap(evicted) {
                        if inner.spare.len() < SPARE_BUFFERS {
                            inner.spare.push(buf);
                        }
                    }
                }
                None => break,
            }
        }
    }

    /// A buffer to decode the next block into (empty if none is spare).
    fn spare(&self) -> Vec<u8> {
        let spare = self.inner.lock().ok().and_then(|mut i| i.spare.pop());
        spare.unwrap_or_default()
    }

    /// Decoded bytes held.
    pub fn bytes(&self) -> usize {
        self.inner.lock().map(|i| i.bytes).unwrap_or(0)
    }
}

/// Reads chunks back, verifying each against its digest. Keeps pack files open and the last
/// decoded block, since consecutive chunks of a layer usually share a block, and may share
/// decoded blocks with other readers through a [`BlockCache`].
pub struct PackReader {
    dctx: zstd::bulk::Decompressor<'static>,
    dir: PathBuf,
    files: HashMap<String, File>,
    cache: Option<(String, u64, Arc<Vec<u8>>)>,
    shared: Option<Arc<BlockCache>>,
    scratch: Vec<u8>,
    /// The buffer of the last block, once nothing else held it: the next one is decoded there.
    spare: Option<Vec<u8>>,
}

impl PackReader {
    pub fn new(dir: &Path) -> Result<Self> {
        Ok(PackReader {
            dctx: zstd::bulk::Decompressor::new().ctx(|| "creating a decompressor".into())?,
            dir: dir.to_path_buf(),
            files: HashMap::new(),
            cache: None,
            shared: None,
            scratch: Vec::new(),
            spare: None,
        })
    }

    /// A reader that looks blocks up in `cache` and leaves the ones it decodes there.
    pub fn with_cache(dir: &Path, cache: Arc<BlockCache>) -> Result<Self> {
        let mut reader = Self::new(dir)?;
        reader.shared = Some(cache);
        Ok(reader)
    }

    fn block(&mut self, loc: &ChunkLoc) -> Result<Arc<Vec<u8>>> {
        if let Some((pack, off, data)) = &self.cache {
            if *pack == loc.pack && *off == loc.block_offset {
                return Ok(data.clone());
            }
        }
        let cached = (self.shared.as_ref()).and_then(|c| c.get(&loc.pack, loc.block_offset));
        let data = match cached {
            Some(data) => data,
            None => {
                if !self.files.contains_key(&loc.pack) {
                    let f = open_pack_of(&self.dir, loc)?;
                    self.files.insert(loc.pack.clone(), f);
                }
                let f = self.files.get(&loc.pack).expect("inserted above");
                let out = match (self.spare.take(), &self.shared) {
                    (Some(buf), _) => buf,
                    (None, Some(shared)) => shared.spare(),
                    (None, None) => Vec::new(),
                };
                let data = Arc::new(read_block(f, loc, &mut self.dctx, &mut self.scratch, out)?);
                if let Some(shared) = &self.shared {
                    shared.put(&loc.pack, loc.block_offset, &data);
                }
                data
            }
        };
        let last = self
            .cache
            .replace((loc.pack.clone(), loc.block_offset, data.clone()));
        if let Some(buf) = last.and_then(|(_, _, old)| Arc::try_unwrap(old).ok()) {
            self.spare = Some(buf);
        }
        Ok(data)
    }

    /// One chunk, checked against its BLAKE3, as a range of its decoded block.
    pub fn chunk(&mut self, loc: &ChunkLoc) -> Result<ChunkSlice> {
        let block = self.block(loc)?;
        check_chunk(&block, loc)?;
        let start = loc.inner_offset as usize;
        Ok((block, start..start + loc.len as usize))
    }

    /// Read one chunk into `out`, checked against its BLAKE3.
    pub fn read(&mut self, loc: &ChunkLoc, out: &mut Vec<u8>) -> Result<()> {
        let (block, range) = self.chunk(loc)?;
        out.clear();
        out.extend_from_slice(&block[range]);
        Ok(())
    }
}

/// Chunks held in memory (a container's writes not yet stored), by digest.
pub type FreshChunks = HashMap<Blake3, Arc<[u8]>>;

/// A chunk as a range of its decoded block.
pub type ChunkSlice = (Arc<Vec<u8>>, std::ops::Range<usize>);

/// Blocks read ahead of the consumer (each at most `max(BLOCK_TARGET, chunk_max)` decoded, so
/// about 16 MiB in flight: plenty to keep one worker per core busy).
const READ_AHEAD_BLOCKS: usize = 16;

/// A run's decoded block, and the first of its chunks that failed its check, if one did (by
/// index into the plan, so the error surfaces at that chunk, not at the run's first).
type BlockResult = Result<(Arc<Vec<u8>>, Option<(usize, Error)>)>;

/// What the read-ahead workers share: the chunks in order, cut into runs that share a block.
struct ReadPlan {
    dir: PathBuf,
    locs: Vec<ChunkLoc>,
    /// For each run of consecutive chunks in one block: the index of its first chunk.
    starts: Vec<usize>,
    /// The runs whose block the reader must fetch (the others reuse a block it holds, see
    /// [`RECENT_BLOCKS`]).
    fetch: Vec<usize>,
    /// The reader is gone: its queued runs are dropped, not decoded.
    cancelled: std::sync::atomic::AtomicBool,
}

/// Decoded blocks a reader keeps after their run ends: a layer's chunks come in import order,
/// but a file stored before (a duplicate, a hardlink's twin) interrupts a block's runs, and
/// decoding a 1 MiB block again for the rest of it would cost more than the whole read.
const RECENT_BLOCKS: usize = 8;

/// Which blocks a sequence of runs needs, most recent first, as the reader keeps them.
#[derive(Default)]
struct Recent<T> {
    blocks: std::collections::VecDeque<(usize, T)>,
}

impl<T> Recent<T> {
    /// Make `run`'s block the most recent; returns what it held for an earlier run of the same
    /// block (`same` compares two runs' blocks), and what fell out.
    fn touch(
        &mut self,
        run: usize,
        same: impl Fn(usize) -> bool,
        fresh: impl FnOnce() -> T,
    ) -> (bool, Option<T>) {
        let found = self.blocks.iter().position(|(r, _)| same(*r));
        let (hit, value) = match found.and_then(|i| self.blocks.remove(i)) {
            Some((_, v)) => (true, v),
            None => (false, fresh()),
        };
        self.blocks.push_front((run, value));
        let evicted = (self.blocks.len() > RECENT_BLOCKS)
            .then(|| self.blocks.pop_back())
            .flatten()
            .map(|(_, v)| v);
        (hit, evicted)
    }

    fn front(&self) -> Option<&T> {
        self.blocks.front().map(|(_, v)| v)
    }
}

impl ReadPlan {
    fn same_block(&self, a: usize, b: usize) -> bool {
        let (x, y) = (&self.locs[self.starts[a]], &self.locs[self.starts[b]]);
        x.block_offset == y.block_offset && x.pack == y.pack
    }

    fn run(&self, run: usize) -> &[ChunkLoc] {
        let end = self.starts.get(run + 1).copied().unwrap_or(self.locs.len());
        &self.locs[self.starts[run]..end]
    }
}

/// One read-ahead job: a run of a plan to decode, where to send its block, and where to find
/// buffers to decode into.
struct Job {
    plan: Arc<ReadPlan>,
    run: usize,
    reply: crossbeam_channel::Sender<BlockResult>,
    spares: crossbeam_channel::Receiver<Vec<u8>>,
}

/// The read-ahead workers: one per core, started once and shared by every reader in the
/// process (their allocator heaps and decompression contexts stay warm between reads), and
/// started again in a forked child ([`crate::pool::PerProcess`]).
fn read_ahead_pool() -> crossbeam_channel::Sender<Job> {
    static POOL: crate::pool::PerProcess<crossbeam_channel::Sender<Job>> =
        crate::pool::PerProcess::new();
    POOL.get(|| {
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let cores = crate::cores();
        for _ in 0..cores {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name("layerstore-read-ahead".into())
                .spawn(move || read_ahead(&rx))
                .expect("spawn read-ahead");
        }
        tx
    })
}

/// Reads a sequence of chunks in order. The pool's workers read, decode and verify the blocks
/// ahead of the consumer, each taking the next block as soon as it is free (no window
/// barrier); the consumer takes them back in order. At most [`READ_AHEAD_BLOCKS`] blocks are in
/// flight, so memory stays bounded.
pub struct OrderedChunks {
    plan: Arc<ReadPlan>,
    next: usize,
    run: usize,
    /// The blocks of the last runs, most recent (the current one) first.
    recent: Recent<Option<Arc<Vec<u8>>>>,
    /// Replies of the dispatched runs, oldest first.
    queued: std::collections::VecDeque<crossbeam_channel::Receiver<BlockResult>>,
    dispatched: usize,
    /// Blocks the consumer is done with, back to the workers to decode into.
    spare: crossbeam_channel::Sender<Vec<u8>>,
    spares: crossbeam_channel::Receiver<Vec<u8>>,
    /// The current run reuses a block fetched for another run: its chunks are checked here, as
    /// they are taken (the workers checked only the chunks of the run that fetched it).
    check_here: bool,
    /// A chunk of the current run that failed the workers' check.
    bad: Option<(usize, Error)>,
}

impl Drop for OrderedChunks {
    fn drop(&mut self) {
        self.plan
            .cancelled
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl OrderedChunks {
    pub fn new(dir: &Path, locs: Vec<ChunkLoc>) -> Self {
        let mut starts = Vec::new();
        for (i, l) in locs.iter().enumerate() {
            let same =
                i > 0 && locs[i - 1].pack == l.pack && locs[i - 1].block_offset == l.block_offset;
            if !same {
                starts.push(i);
            }
        }
        let mut plan = ReadPlan {
            dir: dir.to_path_buf(),
            locs,
            starts,
            fetch: Vec::new(),
            cancelled: false.into(),
        };
        let mut recent = Recent::<()>::default();
        for run in 0..plan.starts.len() {
            if !recent.touch(run, |r| plan.same_block(r, run), || ()).0 {
                plan.fetch.push(run);
            }
        }
        let plan = Arc::new(plan);
        let (spare, spares) = crossbeam_channel::bounded::<Vec<u8>>(READ_AHEAD_BLOCKS);
        let mut chunks = OrderedChunks {
            plan,
            next: 0,
            run: 0,
            recent: Recent::default(),
            queued: std::collections::VecDeque::with_capacity(READ_AHEAD_BLOCKS),
            dispatched: 0,
            spare,
            spares,
            check_here: false,
            bad: None,
        };
        for _ in 0..READ_AHEAD_BLOCKS {
            chunks.dispatch();
        }
        chunks
    }

    /// Queue the next undispatched run to fetch, if any.
    fn dispatch(&mut self) {
        if let Some(&run) = self.plan.fetch.get(self.dispatched) {
            let (tx, rx) = crossbeam_channel::bounded(1);
            // The pool lives as long as the process (its workers never stop taking jobs).
            let _ = read_ahead_pool().send(Job {
                plan: self.plan.clone(),
                run,
                reply: tx,
                spares: self.spares.clone(),
            });
            self.queued.push_back(rx);
            self.dispatched += 1;
        }
    }

    /// The next chunk's bytes, or `None` after the last one.
    pub fn next_chunk(&mut self) -> Option<Result<ChunkSlice>> {
        let plan = self.plan.clone();
        let loc = plan.locs.get(self.next)?;
        let range = loc.inner_offset as usize..(loc.inner_offset + loc.len) as usize;
        if plan.starts.get(self.run) == Some(&self.next) {
            let run = self.run;
            self.run += 1;
            let (hit, evicted) = self.recent.touch(run, |r| plan.same_block(r, run), || None);
            // A block no run will reuse, unless a caller still holds a chunk of it, is decoded
            // into again (refilling memory already mapped costs far less than faulting in
            // fresh pages).
            if let Some(done) = evicted.flatten().and_then(|b| Arc::try_unwrap(b).ok()) {
                let _ = self.spare.try_send(done);
            }
            self.check_here = hit;
            if !hit {
                let Some(reply) = self.queued.pop_front() else {
                    return Some(Err(Error::Corrupt("read-ahead lost a block".into())));
                };
                self.dispatch();
                let (block, bad) = match reply.recv() {
                    Ok(Ok(decoded)) => decoded,
                    Ok(Err(e)) => return Some(Err(e)),
                    Err(_) => return Some(Err(Error::Corrupt("read-ahead stopped early".into()))),
                };
                self.bad = bad;
                if let Some(front) = self.recent.blocks.front_mut() {
                    front.1 = Some(block);
                }
            }
        }
        let index = self.next;
        self.next += 1;
        if self.bad.as_ref().is_some_and(|(i, _)| *i == index) {
            return self.bad.take().map(|(_, e)| Err(e));
        }
        let block = match self.recent.front().cloned().flatten() {
            Some(block) => block,
            None => return Some(Err(Error::Corrupt("read-ahead lost a block".into()))),
        };
        if self.check_here {
            if let Err(e) = check_chunk(&block, loc) {
                return Some(Err(e));
            }
        }
        Some(Ok((block, range)))
    }
}

/// A read-ahead worker of the pool: decodes and verifies runs as they come.
fn read_ahead(jobs: &crossbeam_channel::Receiver<Job>) {
    let mut dctx: Option<zstd::bulk::Decompressor<'static>> = None;
    let mut scratch = Vec::new();
    // Pack files open for the plan of the last job.
    let mut files: Option<(Arc<ReadPlan>, HashMap<String, File>)> = None;
    for job in jobs {
        if job
            .plan
            .cancelled
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            continue;
        }
        if !files
            .as_ref()
            .is_some_and(|(p, _)| Arc::ptr_eq(p, &job.plan))
        {
            files = Some((job.plan.clone(), HashMap::new()));
        }
        let open = &mut files.as_mut().expect("set above").1;
        // A panic must not cost the pool a worker, nor leave a reader waiting.
        let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            decode_run(&job, open, &mut dctx, &mut scratch)
        }))
        .unwrap_or_else(|_| {
            Err(Error::Panicked {
                what: "read-ahead worker",
            })
        });
        let _ = job.reply.send(decoded); // the consumer may have stopped early
    }
}

/// Read, decode and verify the block of one run.
fn decode_run(
    job: &Job,
    files: &mut HashMap<String, File>,
    dctx: &mut Option<zstd::bulk::Decompressor<'static>>,
    scratch: &mut Vec<u8>,
) -> BlockResult {
    let chunks = job.plan.run(job.run);
    let loc = &chunks[0];
    if !files.contains_key(&loc.pack) {
        files.insert(loc.pack.clone(), open_pack_of(&job.plan.dir, loc)?);
    }
    if dctx.is_none() {
        *dctx = Some(zstd::bulk::Decompressor::new().ctx(|| "creating a decompressor".into())?);
    }
    let dctx = dctx.as_mut().expect("set above");
    let out = job.spares.try_recv().unwrap_or_default();
    let data = read_block(&files[&loc.pack], loc, dctx, scratch, out)?;
    let first = job.plan.starts[job.run];
    let bad = (chunks.iter().enumerate())
        .find_map(|(i, l)| check_chunk(&data, l).err().map(|e| (first + i, e)));
    Ok((Arc::new(data), bad))
}

/// Read one block from `file` and decode it (with a reused decompression context; `scratch`
/// holds the compressed bytes between calls, so it is allocated once per reader).
fn read_block(
    file: &File,
    loc: &ChunkLoc,
    dctx: &mut zstd::bulk::Decompressor<'static>,
    scratch: &mut Vec<u8>,
    mut out: Vec<u8>,
) -> Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let corrupt = |e: &dyn std::fmt::Display| {
        damaged(
            loc,
            format!(
                "its block at offset {} is unreadable: {e}",
                loc.block_offset
            ),
        )
    };
    let len = loc.block_len as usize;
    out.clear();
    let raw = match loc.codec {
        Codec::Raw => {
            out.resize(len, 0);
            file.read_exact_at(&mut out, loc.block_offset)
                .map_err(|e| corrupt(&e))?;
            return Ok(out);
        }
        Codec::Zstd => {
            scratch.resize(len, 0);
            &mut scratch[..len]
        }
    };
    file.read_exact_at(raw, loc.block_offset)
        .map_err(|e| corrupt(&e))?;
    // The frame header records the decoded size: allocate exactly that, not the ceiling (a
    // 32 MiB allocation per block is an mmap and munmap each time).
    let capacity = match zstd::zstd_safe::get_frame_content_size(raw) {
        Ok(Some(n)) if n <= BLOCK_DECODED_MAX as u64 => n as usize,
        _ => BLOCK_DECODED_MAX,
    };
    out.reserve(capacity);
    dctx.decompress_to_buffer(raw, &mut out)
        .map_err(|e| corrupt(&e))?;
    Ok(out)
}

/// Largest decoded block we accept (a block holds chunks of at most 16 MiB, FastCDC's ceiling).
const BLOCK_DECODED_MAX: usize = 32 << 20;

/// Check that `loc`'s chunk lies inside `block` and matches its digest.
fn check_chunk(block: &[u8], loc: &ChunkLoc) -> Result<()> {
    let start = loc.inner_offset as usize;
    let data = block
        .get(start..start + loc.len as usize)
        .ok_or_else(|| damaged(loc, "it lies outside its block".into()))?;
    if Blake3::of(data) != loc.digest {
        return Err(damaged(loc, "its bytes do not match its digest".into()));
    }
    Ok(())
}

fn damaged(loc: &ChunkLoc, reason: String) -> Error {
    Error::DamagedChunk {
        chunk: loc.digest.to_string(),
        pack: loc.pack.clone(),
        reason,
    }
}

/// Open the pack holding `loc` for reading it: the pack is committed, so its absence is damage.
fn open_pack_of(dir: &Path, loc: &ChunkLoc) -> Result<File> {
    open_pack(dir, &loc.pack).map_err(|e| match e.io_error() {
        Some(io) if io.kind() == std::io::ErrorKind::NotFound => {
            damaged(loc, "its pack file is missing".into())
        }
        _ => e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunks with their digests, as written.
    type Chunks = Vec<(Blake3, Vec<u8>)>;

    /// Write `data` as chunks of a new pack `name` at `level`; returns each chunk with its
    /// digest, their locations (in block order, not `data` order) and the pack's length.
    fn write_pack(
        dir: &Path,
        name: &str,
        level: i32,
        data: impl IntoIterator<Item = Vec<u8>>,
    ) -> (Chunks, Vec<ChunkLoc>, u64) {
        let mut w = PackWriter::new(dir, name.into(), level);
        let chunks: Chunks = data.into_iter().map(|d| (Blake3::of(&d), d)).collect();
        for (d, data) in &chunks {
            w.add(*d, data).unwrap();
        }
        let (locs, len) = w.finish(|_| {}).unwrap().unwrap();
        (chunks, locs, len)
    }

    #[test]
    fn block_cache_keeps_the_most_recently_used_within_its_budget() {
        let cache = BlockCache::new(4000);
        let block = |n: u8| Arc::new(vec![n; 1000]);
        for i in 0..4u8 {
            cache.put("p", u64::from(i), &block(i));
        }
        assert_eq!(cache.bytes(), 4000);
        assert!(cache.get("p", 0).is_some()); // now the most recent
        cache.put("p", 4, &block(4)); // evicts block 1, the least recently used
        assert_eq!(cache.bytes(), 4000);
        assert!(cache.get("p", 1).is_none());
        assert_eq!(cache.get("p", 0).unwrap()[0], 0);
        assert_eq!(cache.get("p", 4).unwrap()[0], 4);
        assert!(cache.get("q", 4).is_none(), "keyed by pack and offset");
        cache.put("p", 9, &Arc::new(vec![9; 1001])); // over a quarter of the budget: not kept
        assert!(cache.get("p", 9).is_none());
        assert_eq!(cache.bytes(), 4000);
    }

    #[test]
    fn block_cache_hands_out_the_buffers_it_evicts_once_no_one_holds_them() {
        let cache = BlockCache::new(4000);
        let held = Arc::new(vec![0u8; 1000]);
        cache.put("p", 0, &held);
        for i in 1..4u8 {
            cache.put("p", u64::from(i), &Arc::new(vec![i; 1000]));
        }
        assert_eq!(cache.spare().capacity(), 0, "nothing evicted yet");
        cache.put("p", 4, &Arc::new(vec![4u8; 1000])); // evicts 0, still held here
        assert_eq!(cache.spare().capacity(), 0, "a held block is not reused");
        cache.put("p", 5, &Arc::new(vec![5u8; 1000])); // evicts 1, held by no one
        assert!(cache.spare().capacity() >= 1000);
        assert_eq!(cache.spare().capacity(), 0, "handed out once");
        assert_eq!(held[..], [0u8; 1000][..]);
    }

    #[test]
    fn readers_sharing_a_cache_decode_a_block_once() {
        let dir = tempfile::tempdir().unwrap();
        let (chunks, locs, _) =
            write_pack(dir.path(), "p1.pack", 3, (0..4u8).map(|i| vec![i; 5000]));
        let data: Vec<&Vec<u8>> = chunks.iter().map(|(_, d)| d).collect();
        let cache = Arc::new(BlockCache::new(1 << 20));
        let mut buf = Vec::new();
        PackReader::with_cache(dir.path(), cache.clone())
            .unwrap()
            .read(&locs[0], &mut buf)
            .unwrap();
        assert_eq!(cache.bytes(), 20_000, "the whole decoded block is kept");
        // With the pack gone, a second reader can only be answered from the cache.
        std::fs::remove_file(dir.path().join("p1.pack")).unwrap();
        let mut second = PackReader::with_cache(dir.path(), cache).unwrap();
        for (loc, d) in locs.iter().zip(&data) {
            second.read(loc, &mut buf).unwrap();
            assert_eq!(&buf, *d);
        }
    }

    #[test]
    fn buffers_of_evicted_blocks_are_decoded_into_again_without_mixing_contents() {
        let dir = tempfile::tempdir().unwrap();
        // About 40 blocks, each chunk a distinct pattern.
        let data = (0..160u32).map(|i| (0..300_000u32).map(|j| (j * 7 + i * 13) as u8).collect());
        let (chunks, locs, _) = write_pack(dir.path(), "p.pack", 1, data);
        let by_digest: HashMap<Blake3, &ChunkLoc> = locs.iter().map(|l| (l.digest, l)).collect();
        let cache = Arc::new(BlockCache::new(4 * BLOCK_TARGET));
        let mut readers = [
            PackReader::with_cache(dir.path(), cache.clone()).unwrap(),
            PackReader::with_cache(dir.path(), cache.clone()).unwrap(),
        ];
        let mut held = Vec::new();
        for (k, (d, want)) in chunks.iter().enumerate() {
            let (block, range) = readers[k % 2].chunk(by_digest[d]).unwrap();
            assert_eq!(&block[range.clone()], &want[..], "chunk {k}");
            // A slice still held elsewhere (as by a pending write) keeps its block intact.
            if k % 17 == 0 {
                held.push((block, range, k));
            }
        }
        for (block, range, k) in held {
            assert_eq!(&block[range], &chunks[k].1[..], "held chunk {k}");
        }
    }

    #[test]
    fn write_then_read_back_small_and_large_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let data = (0..300u32).map(|i| (0..(i * 997 % 70_000)).map(|j| (j * i) as u8).collect());
        let (chunks, locs, len) = write_pack(dir.path(), "p1.pack", 3, data);
        assert_eq!(locs.len(), 300);
        assert_eq!(
            std::fs::metadata(dir.path().join("p1.pack")).unwrap().len(),
            len
        );
        // Blocks land in the order they finish compressing: look each chunk up by digest.
        let by_digest: HashMap<Blake3, &ChunkLoc> = locs.iter().map(|l| (l.digest, l)).collect();
        let mut r = PackReader::new(dir.path()).unwrap();
        let mut buf = Vec::new();
        for (d, data) in &chunks {
            r.read(by_digest[d], &mut buf).unwrap();
            assert_eq!(&buf, data);
        }
    }

    #[test]
    fn ordered_chunks_come_back_in_the_asked_order() {
        let dir = tempfile::tempdir().unwrap();
        let data = (0..400u32).map(|i| {
            (0..(20_000 + i * 131 % 50_000))
                .map(|j| (j ^ i) as u8)
                .collect()
        });
        let (chunks, locs, _) = write_pack(dir.path(), "p.pack", 1, data);
        let by_digest: HashMap<Blake3, &ChunkLoc> = locs.iter().map(|l| (l.digest, l)).collect();
        // Far more blocks than are read ahead, out of pack order, with repeats.
        let order: Vec<usize> = (0..1200).map(|k| (k * 7919) % 400).collect();
        let plan = order
            .iter()
            .map(|&k| by_digest[&chunks[k].0].clone())
            .collect();
        let mut reader = OrderedChunks::new(dir.path(), plan);
        for &k in &order {
            let (block, range) = reader.next_chunk().unwrap().unwrap();
            assert_eq!(&block[range], &chunks[k].1[..]);
        }
        assert!(reader.next_chunk().is_none());
        // A consumer that stops early just drops the reader.
        let plan = order
            .iter()
            .map(|&k| by_digest[&chunks[k].0].clone())
            .collect();
        let mut reader = OrderedChunks::new(dir.path(), plan);
        reader.next_chunk().unwrap().unwrap();
        drop(reader);
    }

    #[test]
    fn a_block_interrupted_by_another_is_fetched_once() {
        let dir = tempfile::tempdir().unwrap();
        let (chunks, locs, _) =
            write_pack(dir.path(), "p.pack", 1, (0..40u8).map(|i| vec![i; 100_000]));
        let by_digest: HashMap<Blake3, &ChunkLoc> = locs.iter().map(|l| (l.digest, l)).collect();
        let block_of = |k: usize| by_digest[&chunks[k].0].block_offset;
        assert_ne!(block_of(0), block_of(39));
        // Block A's chunks, one of block B's (a duplicate file), the rest of A's, then B's.
        let order: Vec<usize> = [0, 1, 2, 39, 3, 4, 5, 38, 37].into();
        assert!(order[..3]
            .iter()
            .chain(&order[4..7])
            .all(|&k| block_of(k) == block_of(0)));
        assert!(order[7..].iter().all(|&k| block_of(k) == block_of(39)));
        let plan = order
            .iter()
            .map(|&k| by_digest[&chunks[k].0].clone())
            .collect();
        let mut reader = OrderedChunks::new(dir.path(), plan);
        assert_eq!(reader.plan.starts.len(), 4, "four runs");
        assert_eq!(
            reader.plan.fetch,
            vec![0, 1],
            "two blocks, each fetched once"
        );
        for &k in &order {
            let (block, range) = reader.next_chunk().unwrap().unwrap();
            assert_eq!(&block[range], &chunks[k].1[..]);
        }
        assert!(reader.next_chunk().is_none());
    }

    #[test]
    fn unfinished_writer_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut w = PackWriter::new(dir.path(), "p.pack".into(), 1);
            for i in 0..40u8 {
                w.add(Blake3::of(&[i]), &vec![i; 100_000]).unwrap();
            }
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn corrupt_block_is_an_integrity_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PackWriter::new(dir.path(), "p.pack".into(), 0);
        let data = vec![7u8; 1000];
        w.add(Blake3::of(&data), &data).unwrap();
        let (locs, _) = w.finish(|_| {}).unwrap().unwrap();
        let path = dir.path().join("p.pack");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[20] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let err = PackReader::new(dir.path())
            .unwrap()
            .read(&locs[0], &mut Vec::new())
            .unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Integrity);
    }
}
