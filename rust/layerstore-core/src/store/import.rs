//! Import: a tar (plain, gzip or zstd) or a directory into the store.
//!
//! Invariants: an import either commits whole (pack synced, then one metadata transaction
//! inserting chunks, layer and its chunk set) or leaves nothing visible; its lease keeps `gc`
//! from sweeping chunks it deduplicated against. Layer identity is computed from the bytes
//! read, never taken from the caller.
//!
//! Threads of an import: a reader (source → decompressor → 1 MiB blocks), a hasher (sha256 and
//! BLAKE3 of the uncompressed stream, the most expensive per-byte work), and the caller's thread
//! (split → chunk → BLAKE3 → dedup), which hands new blocks to the pack writer's compressors.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read};
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::Receiver;
use rusqlite::{Connection, TransactionBehavior};

use super::{Progress, Store};
use crate::cas::PackWriter;
use crate::chunk::Chunker;
use crate::compress::{self, Compression};
use crate::digest::{self, Blake3, OciDigest, StreamDigests, StreamHasher};
use crate::error::{Error, IoContext, Result};
use crate::fsio;
use crate::layer::{self, ChunkRef, Entry, LayerInfo};
use crate::meta;
use crate::tar::{EntrySink, Limits, SplitOutput, Splitter};

/// Per-import options.
#[derive(Default)]
pub struct ImportOptions {
    pub expected_diff_id: Option<String>,
    pub expected_digest: Option<String>,
    pub limits: Option<Limits>,
}

/// What an import produced.
#[derive(Debug)]
pub struct Imported {
    pub layer: LayerInfo,
    /// True when the layer was already in the store.
    pub existed: bool,
    pub new_chunks: u64,
    pub new_bytes: u64,
    pub warnings: Vec<String>,
    /// Seconds per stage (threads overlap, so stages add up to more than `total`).
    pub timings: Vec<(&'static str, f64)>,
}

impl Store {
    /// Import a tar (plain, gzip or zstd) from `src`.
    pub fn import_tar(
        &self,
        src: Box<dyn Read + Send>,
        opts: &ImportOptions,
        progress: Progress<'_>,
    ) -> Result<Imported> {
        self.import_tar_pinned(src, opts, None, progress)
    }

    /// [`Store::import_tar`], pinning the layer (new or existing) for the import holding lease
    /// `pin` in the transaction that commits it, so no moment exists where another process
    /// could delete it before the pin is in place.
    pub(crate) fn import_tar_pinned(
        &self,
        src: Box<dyn Read + Send>,
        opts: &ImportOptions,
        pin: Option<i64>,
        progress: Progress<'_>,
    ) -> Result<Imported> {
        let expected_diff_id = opts
            .expected_diff_id
            .as_deref()
            .map(OciDigest::parse)
            .transpose()?;
        let expected_digest = opts
            .expected_digest
            .as_deref()
            .map(OciDigest::parse)
            .transpose()?;
        let want_sha512 = [&expected_diff_id, &expected_digest].iter().any(|d| {
            d.as_ref()
                .is_some_and(|d| d.algorithm == digest::OciAlgorithm::Sha512)
        });
        let limits = opts.limits.unwrap_or(self.limits);

        let pack_name = format!("{}.pack", crate::owner::unique_name());
        let mut conn = self.conn()?;
        let lease = self.lease(&conn, &pack_name)?;
        let result = self.import_leased(
            src,
            &mut conn,
            &pack_name,
            (lease.id, pin),
            limits,
            want_sha512,
            progress,
            |d, c| {
                if let Some(e) = &expected_diff_id {
                    digest::check_expected("diff_id", e, d)?;
                }
                if let Some(e) = &expected_digest {
                    digest::check_expected("blob digest", e, c.unwrap_or(d))?;
                }
                Ok(())
            },
        );
        match &result {
            Ok(_) => lease.released(), // by the transaction that committed the layer
            Err(_) => lease.release(&conn),
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn import_leased(
        &self,
        src: Box<dyn Read + Send>,
        conn: &mut Connection,
        pack_name: &str,
        (lease, pin): (i64, Option<i64>),
        limits: Limits,
        want_sha512: bool,
        progress: Progress<'_>,
        check: impl FnOnce(&StreamDigests, Option<&StreamDigests>) -> Result<()>,
    ) -> Result<Imported> {
        let (spare, spares) = crossbeam_channel::bounded::<Vec<u8>>(8);
        let (blocks, reader) = spawn_reader(src, want_sha512, spares);
        let mut sink = ImportSink {
            chunker: Chunker::new(self.options.chunk),
            conn,
            known: HashSet::new(),
            writer: PackWriter::new(
                &self.packs_dir(),
                pack_name.to_string(),
                self.options.compression_level,
            ),
            new_chunks: 0,
            new_bytes: 0,
            busy: Default::default(),
            lookups: Default::default(),
        };
        let started = Instant::now();
        let waited = std::cell::Cell::new(std::time::Duration::ZERO);
        let input = ChannelReader {
            waited: &waited,
            rx: blocks,
            spare,
            cur: Arc::default(),
            pos: 0,
            total: 0,
            reported: 0,
            progress,
        };
        let split = Splitter::new(input, limits, &mut sink)
            .pack_raw()
            .and_then(Splitter::run);
        // Stop the reader (it may be blocked sending) before looking at its result.
        let reader_out = reader.join().map_err(|_| Error::Panicked {
            what: "reader thread",
        })?;
        let SplitOutput {
            split: _,
            packed,
            entries,
            warnings,
        } = split?;
        let ReaderOut {
            compression,
            compressed,
            uncompressed,
            busy_seconds: reader_busy,
        } = reader_out?;
        check(&uncompressed, compressed.as_ref())?;
        progress(uncompressed.len)?;

        let ImportSink {
            writer,
            new_chunks,
            new_bytes,
            conn,
            busy,
            lookups,
            ..
        } = sink;
        let parsed = started.elapsed();
        let info = LayerInfo {
            id: uncompressed.blake3,
            diff_id: uncompressed.sha256.clone(),
            tree_id: layer::tree_id(&entries),
            size: uncompressed.len,
            entry_count: entries.len() as u64,
            compressed_digest: compressed.as_ref().map(|c| c.sha256.clone()),
            compression: compression.name().map(str::to_string),
            created_unix: meta::now(),
        };
        let packed =
            packed.ok_or_else(|| Error::Corrupt("the import's recipe was not packed".into()))?;
        let (row, chunk_set) = meta::layer_row_with(info.clone(), &entries, packed)?;
        let finishing = Instant::now();
        let pack = writer.finish(crate::crash_point)?;
        let pack_finish = finishing.elapsed();
        let committing = Instant::now();

        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let existed = meta::insert_layer_and_pack(&tx, pack_name, pack.as_ref(), &row, &chunk_set)?;
        if let (Some(c), Some(name)) = (&compressed, compression.name()) {
            meta::insert_blob_digest(&tx, &c.sha256, &info.id, name)?;
        }
        if let Some(pin) = pin {
            meta::pin_layer(&tx, pin, &info.id)?;
        }
        meta::release_lease(&tx, lease)?;
        crate::crash_point("before-commit");
        tx.commit()?;
        crate::crash_point("after-commit");
        let secs = |d: std::time::Duration| d.as_secs_f64();
        let timings = vec![
            ("total", secs(started.elapsed())),
            ("read+decompress", reader_busy),
            ("hash-stream", uncompressed.busy_seconds),
            (
                "split+chunk+hash",
                secs(parsed.saturating_sub(waited.get())),
            ),
            ("payload", secs(busy)),
            ("dedup-lookup", secs(lookups)),
            ("wait-input", secs(waited.get())),
            ("pack-finish", secs(pack_finish)),
            ("commit", secs(committing.elapsed())),
        ];
        // An existing layer keeps its record, but the caller learns about the blob it gave us.
        let layer = if existed {
            LayerInfo {
                compressed_digest: info.compressed_digest,
                compression: info.compression,
                ..meta::find_layer(conn, &info.id.to_string())?
            }
        } else {
            info
        };
        Ok(Imported {
            layer,
            existed,
            new_chunks,
            new_bytes,
            warnings,
            timings,
        })
    }

    /// Import a directory tree as one layer (a canonical tar made on the fly).
    pub fn import_dir(
        &self,
        path: &Path,
        dir_opts: &fsio::DirOptions,
        opts: &ImportOptions,
        progress: Progress<'_>,
    ) -> Result<Imported> {
        let meta = fs::metadata(path).ctx(|| format!("reading {}", path.display()))?;
        if !meta.is_dir() {
            return Err(Error::InvalidLayer(format!(
                "{} is not a directory",
                path.display()
            )));
        }
        let (reader, writer) = io::pipe().ctx(|| "creating a pipe".into())?;
        let root = path.to_path_buf();
        let dir_opts = dir_opts.clone();
        let producer: JoinHandle<Result<Vec<String>>> = std::thread::spawn(move || {
            let mut warnings = Vec::new();
            let out = io::BufWriter::with_capacity(1 << 20, writer);
            fsio::write_dir_tar(&root, &dir_opts, out, &mut warnings)?;
            Ok(warnings)
        });
        let imported = self.import_tar(Box::new(reader), opts, progress);
        let produced = producer.join().map_err(|_| Error::Panicked {
            what: "directory walker",
        })?;
        // The walker's error explains an import failure (a broken pipe) better than the import's.
        let walk_warnings = produced?;
        let mut imported = imported?;
        imported.warnings.extend(walk_warnings);
        Ok(imported)
    }
}

/// Receives entries from the splitter: chunks payloads, hashes them, stores new chunks.
struct ImportSink<'c> {
    chunker: Chunker,
    conn: &'c mut Connection,
    known: HashSet<Blake3>,
    writer: PackWriter,
    new_chunks: u64,
    new_bytes: u64,
    /// Time in payload handling (chunk, hash, dedup, hand-off) and in dedup lookups alone.
    busy: std::time::Duration,
    lookups: std::time::Duration,
}

impl EntrySink for ImportSink<'_> {
    fn entry(&mut self, entry: &mut Entry, payload: Option<&mut dyn Read>) -> Result<()> {
        let Some(payload) = payload else {
            if entry.kind == crate::layer::Kind::File {
                // An empty file still has a content identity.
                entry.digest = Some(Blake3::of(&[]));
            }
            return Ok(());
        };
        let started = Instant::now();
        let size = entry.size;
        let mut file_hash: Option<blake3::Hasher> = None;
        let mut first: Option<Blake3> = None;
        let Self {
            chunker,
            conn,
            known,
            writer,
            new_chunks,
            new_bytes,
            lookups,
            ..
        } = self;
        chunker.run(payload, |chunk| {
            let d = Blake3::of(chunk);
            match (&mut file_hash, first) {
                (Some(h), _) => {
                    h.update(chunk);
                }
                (None, None) if (chunk.len() as u64) < size => {
                    // More chunks follow: this file's digest needs its own pass.
                    let mut h = blake3::Hasher::new();
                    h.update(chunk);
                    file_hash = Some(h);
                }
                _ => {}
            }
            first.get_or_insert(d);
            entry.chunks.push(ChunkRef {
                digest: d,
                len: chunk.len() as u32,
            });
            if !known.contains(&d) {
                known.insert(d);
                let asked = Instant::now();
                let exists = meta::chunk_reusable(conn, &d)?;
                *lookups += asked.elapsed();
                if !exists {
                    writer.add(d, chunk)?;
                    *new_chunks += 1;
                    *new_bytes += chunk.len() as u64;
                }
            }
            Ok(())
        })?;
        // A single-chunk file's BLAKE3 is its chunk's digest.
        entry.digest = match file_hash {
            Some(h) => Some(h.finalize().into()),
            None => first,
        };
        self.busy += started.elapsed();
        Ok(())
    }
}

struct ReaderOut {
    compression: Compression,
    compressed: Option<StreamDigests>,
    uncompressed: StreamDigests,
    busy_seconds: f64,
}

type Block = io::Result<Arc<Vec<u8>>>;

/// A block of the input stream as the stream hasher sees it (shared with the parser).
struct SharedBlock(Arc<Vec<u8>>);

impl AsRef<[u8]> for SharedBlock {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

const READ_BLOCK: usize = 1 << 20;

/// Reads and decompresses `src` on its own thread, feeding the stream hasher and the parser.
fn spawn_reader(
    src: Box<dyn Read + Send>,
    want_sha512: bool,
    spares: Receiver<Vec<u8>>,
) -> (Receiver<Block>, JoinHandle<Result<ReaderOut>>) {
    let (tx, rx) = crossbeam_channel::bounded::<Block>(8);
    let handle = std::thread::Builder::new()
        .name("layerstore-read".into())
        .spawn(move || -> Result<ReaderOut> {
            let mut src = src;
            let mut head = [0u8; 4];
            let mut got = 0;
            while got < head.len() {
                match src.read(&mut head[got..]) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let _ = tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                        return Err(Error::from(e));
                    }
                }
            }
            if let Some(name) = compress::unsupported(&head[..got]) {
                let refused = || {
                    Error::InvalidLayer(format!(
                        "{name}-compressed input is not supported (decompress it first)"
                    ))
                };
                let _ = tx.send(Err(io::Error::other(refused())));
                return Err(refused());
            }
            let probe = compress::detect_bytes(&head[..got]);
            let chained = io::Cursor::new(head[..got].to_vec()).chain(src);
            let compressed_hasher =
                (probe != Compression::None).then(|| StreamHasher::spawn(want_sha512));
            let tee = TeeReader {
                inner: chained,
                hasher: compressed_hasher.as_ref(),
            };
            let (compression, mut decoded) = compress::decoder(tee)?;
            let hasher = StreamHasher::spawn(want_sha512);
            let mut busy = std::time::Duration::ZERO;
            loop {
                // A block the parser is done with when there is one (no fresh pages to fault in).
                let mut block = spares.try_recv().unwrap_or_default();
                block.resize(READ_BLOCK, 0);
                let mut filled = 0;
                let mut failed = None;
                let reading = Instant::now();
                while filled < block.len() {
                    match decoded.read(&mut block[filled..]) {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                busy += reading.elapsed();
                if filled > 0 {
                    block.truncate(filled);
                    let block = Arc::new(block);
                    hasher.update(SharedBlock(block.clone()));
                    if tx.send(Ok(block)).is_err() {
                        break; // the parser stopped (an error); it reports why
                    }
                }
                if let Some(e) = failed {
                    let _ = tx.send(Err(decode_error(e, compression)));
                    break;
                }
                if filled < READ_BLOCK {
                    break;
                }
            }
            drop(tx);
            drop(decoded);
            Ok(ReaderOut {
                compression,
                compressed: compressed_hasher.map(StreamHasher::finish),
                uncompressed: hasher.finish(),
                busy_seconds: busy.as_secs_f64(),
            })
        })
        .expect("spawn reader thread");
    (rx, handle)
}

/// Turn a decoder failure into a clear message; source read errors pass through unchanged.
fn decode_error(e: io::Error, compression: Compression) -> io::Error {
    if e.get_ref().is_some_and(|i| i.is::<SourceError>())
        || e.get_ref().is_some_and(|i| i.is::<Error>())
    {
        return e;
    }
    match compression.name() {
        Some(name) => io::Error::other(Error::InvalidLayer(format!("corrupt {name} stream: {e}"))),
        None => e,
    }
}

#[derive(Debug)]
struct SourceError(io::Error);
impl std::fmt::Display for SourceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "reading the source: {}", self.0)
    }
}
impl std::error::Error for SourceError {}

/// Hashes the raw (compressed) bytes as the decoder pulls them.
struct TeeReader<'h, R> {
    inner: R,
    hasher: Option<&'h StreamHasher>,
}

impl<R: Read> Read for TeeReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf).map_err(|e| {
            if e.get_ref().is_some_and(|i| i.is::<Error>()) {
                e
            } else {
                io::Error::new(e.kind(), SourceError(e))
            }
        })?;
        if let (Some(h), true) = (self.hasher, n > 0) {
            h.update(Arc::from(&buf[..n]));
        }
        Ok(n)
    }
}

/// The parser's view of the reader thread's blocks, reporting progress as it goes.
struct ChannelReader<'p> {
    waited: &'p std::cell::Cell<std::time::Duration>,
    rx: Receiver<Block>,
    /// Blocks read, back to the reader thread to fill again (once the hasher is done too).
    spare: crossbeam_channel::Sender<Vec<u8>>,
    cur: Arc<Vec<u8>>,
    pos: usize,
    total: u64,
    reported: u64,
    progress: Progress<'p>,
}

impl Read for ChannelReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.cur.len() {
            let waiting = Instant::now();
            let got = self.rx.recv();
            self.waited.set(self.waited.get() + waiting.elapsed());
            match got {
                Ok(Ok(block)) => {
                    let done = std::mem::replace(&mut self.cur, block);
                    if let Ok(done) = Arc::try_unwrap(done) {
                        let _ = self.spare.try_send(done);
                    }
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
            if self.total - self.reported >= 8 * READ_BLOCK as u64 || self.reported == 0 {
                self.reported = self.total.max(1);
                (self.progress)(self.total).map_err(io::Error::other)?;
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        self.total += n as u64;
        Ok(n)
    }
}
