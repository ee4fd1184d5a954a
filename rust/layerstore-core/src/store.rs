//! The store: ties the splitter, chunker, packs and metadata together.
//!
//! Invariants: an import either commits whole (pack synced, then one metadata transaction
//! inserting chunks, layer and its chunk set) or leaves nothing visible; its lease keeps `gc`
//! from sweeping chunks it deduplicated against. Layer identity is computed by the store from
//! the bytes it read, never taken from the caller.
//!
//! Threads of an import: a reader (source → decompressor → 1 MiB blocks), a hasher (sha256 and
//! BLAKE3 of the uncompressed stream, the most expensive per-byte work), and the caller's thread
//! (split → chunk → BLAKE3 → dedup), which compresses new blocks on the rayon pool.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::Receiver;
use rusqlite::{Connection, TransactionBehavior};
use sha2::Digest as _;

use crate::cas::{self, PackReader, PackWriter};
use crate::chunk::{ChunkParams, Chunker};
use crate::compress::{self, Compression, Encoder};
use crate::digest::{self, Blake3, OciDigest, StreamDigests, StreamHasher};
use crate::error::{Error, IoContext, Result};
use crate::fsio;
use crate::gather::Gather;
use crate::layer::{self, ChunkRef, Entry, LayerInfo};
use crate::meta;
use crate::stack::{ContentReader, LayerEntries, Piece, Stack};
use crate::tar::{EntrySink, Limits, Op, SplitOutput, Splitter, TarSplit};

/// Settings fixed when a store is created.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// zstd level for chunk blocks; 0 stores them uncompressed.
    pub compression_level: i32,
    pub chunk: ChunkParams,
    /// Maximum layers in one stack.
    pub max_depth: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            compression_level: 3,
            chunk: ChunkParams::default(),
            max_depth: 127,
        }
    }
}

/// Per-import options.
#[derive(Default)]
pub struct ImportOptions {
    pub expected_diff_id: Option<String>,
    pub expected_digest: Option<String>,
    pub limits: Option<Limits>,
}

/// Called with the number of uncompressed bytes read so far; an error cancels the operation.
pub type Progress<'a> = &'a (dyn Fn(u64) -> Result<()> + Sync);

pub fn no_progress(_: u64) -> Result<()> {
    Ok(())
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

#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub layers: u64,
    pub chunks: u64,
    pub packs: u64,
    pub logical_bytes: u64,
    pub content_bytes: u64,
    pub stored_bytes: u64,
    pub metadata_bytes: u64,
    pub disk_bytes: u64,
    pub dedup_ratio: f64,
}

#[derive(Debug, Default, Clone)]
pub struct GcReport {
    pub chunks_removed: u64,
    pub packs_removed: u64,
    pub packs_rewritten: u64,
    pub bytes_reclaimed: u64,
    /// Live imports held leases, so no chunk was swept this time.
    pub deferred: bool,
}

/// A chunk `fsck` found damaged, and who uses it.
#[derive(Debug, Clone)]
pub struct DamagedChunk {
    pub chunk: String,
    pub pack: String,
    pub reason: String,
    /// (layer id, absolute path) of every file whose content needs it.
    pub used_by: Vec<(String, String)>,
}

/// What `fsck --repair` changed.
#[derive(Debug, Clone, Default)]
pub struct Repaired {
    /// Damaged chunks taken out of use (an import of their content stores them again).
    pub chunks_retired: u64,
    /// Layers now marked broken.
    pub layers_broken: Vec<String>,
}

#[derive(Debug, Default, Clone)]
pub struct FsckReport {
    pub chunks_checked: u64,
    pub layers_checked: u64,
    pub problems: Vec<String>,
    pub damaged: Vec<DamagedChunk>,
    /// Layers marked broken (by this or an earlier repair).
    pub broken: Vec<String>,
    /// Set when repair was asked and there was something to repair.
    pub repaired: Option<Repaired>,
    /// Files nothing points at (left by an interrupted import; `gc` removes them).
    pub garbage: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Exported {
    /// Digest of the bytes written (equals the diff_id when uncompressed).
    pub digest: String,
    pub size: u64,
}

/// Packs below this size are merged by `gc` once there are [`SMALL_PACKS_TO_MERGE`] of them.
const SMALL_PACK: u64 = 16 << 20;
const SMALL_PACKS_TO_MERGE: usize = 8;

pub struct Store {
    root: PathBuf,
    options: StoreOptions,
    limits: Limits,
    /// Idle database connections, and the process that opened them: SQLite connections must
    /// not cross a `fork()`, so a child leaks its parent's and opens its own.
    pool: Mutex<(u32, Vec<Connection>)>,
    /// Decoded entries of layers some live stack uses, shared between stacks.
    entry_cache: Mutex<HashMap<Blake3, Weak<Vec<Arc<Entry>>>>>,
    /// Decoded blocks shared by the readers of file contents (a directory of small files
    /// lies in a few blocks: reading it file by file decodes each block once).
    blocks: Arc<cas::BlockCache>,
}

/// Decoded bytes a store keeps for its content readers.
const BLOCK_CACHE_BYTES: usize = 32 << 20;

impl Drop for Store {
    fn drop(&mut self) {
        // A store a forked child inherited still holds its parent's connections: closing them
        // here could disturb the parent's locks, so they are leaked instead.
        if let Ok(pool) = self.pool.get_mut() {
            if pool.0 != std::process::id() {
                std::mem::forget(std::mem::take(&mut pool.1));
            }
        }
    }
}

/// A pooled connection, returned on drop.
pub(crate) struct Conn<'a> {
    store: &'a Store,
    conn: Option<Connection>,
}

impl std::ops::Deref for Conn<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn.as_ref().expect("present until drop")
    }
}

impl std::ops::DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut Connection {
        self.conn.as_mut().expect("present until drop")
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        if let (Some(c), Ok(mut pool)) = (self.conn.take(), self.store.pool.lock()) {
            if pool.0 == std::process::id() {
                pool.1.push(c);
            } else {
                std::mem::forget(c);
            }
        }
    }
}

pub(crate) fn crash_point(name: &str) {
    // Deterministic crash injection for the durability tests.
    if std::env::var("LAYERSTORE_CRASH_AT").is_ok_and(|v| v == name) {
        std::process::abort();
    }
}

impl Store {
    /// Open the store at `root`, creating it with `options` if it does not exist. The options
    /// of an existing store are the ones it was created with.
    pub fn open(root: &Path, options: StoreOptions, limits: Limits) -> Result<Self> {
        options.chunk.validate()?;
        fs::create_dir_all(root.join("packs"))
            .ctx(|| format!("creating store {}", root.display()))?;
        fs::create_dir_all(root.join("tmp"))
            .ctx(|| format!("creating store {}", root.display()))?;
        let mut conn = meta::open(&root.join("meta.db"))?;
        let defaults = vec![
            ("compression_level", options.compression_level.to_string()),
            ("chunk_min", options.chunk.min.to_string()),
            ("chunk_avg", options.chunk.avg.to_string()),
            ("chunk_max", options.chunk.max.to_string()),
            ("chunker", "fastcdc-2020-level1".to_string()),
            ("max_depth", options.max_depth.to_string()),
        ];
        let settings = meta::init(&mut conn, &defaults)?;
        let get = |k: &str| -> Result<String> {
            settings
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
                .ok_or_else(|| Error::Corrupt(format!("store setting {k} missing")))
        };
        let num = |k: &str| -> Result<u64> {
            get(k)?
                .parse()
                .map_err(|_| Error::Corrupt(format!("store setting {k} is not a number")))
        };
        let options = StoreOptions {
            compression_level: num("compression_level")? as i32,
            chunk: ChunkParams {
                min: num("chunk_min")? as u32,
                avg: num("chunk_avg")? as u32,
                max: num("chunk_max")? as u32,
            },
            max_depth: num("max_depth")? as usize,
        };
        Ok(Store {
            root: root.to_path_buf(),
            options,
            limits,
            pool: Mutex::new((std::process::id(), vec![conn])),
            entry_cache: Mutex::new(HashMap::new()),
            blocks: Arc::new(cas::BlockCache::new(BLOCK_CACHE_BYTES)),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn options(&self) -> &StoreOptions {
        &self.options
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub(crate) fn conn(&self) -> Result<Conn<'_>> {
        let pooled = {
            let mut pool = self
                .pool
                .lock()
                .map_err(|_| Error::Conflict("connection pool poisoned".into()))?;
            let pid = std::process::id();
            if pool.0 != pid {
                // Forked: the parent's connections are not ours to use (nor to close).
                std::mem::forget(std::mem::take(&mut pool.1));
                pool.0 = pid;
            }
            pool.1.pop()
        };
        let conn = match pooled {
            Some(c) => c,
            None => meta::open(&self.root.join("meta.db"))?,
        };
        Ok(Conn {
            store: self,
            conn: Some(conn),
        })
    }

    /// Whether the owner of a recorded lease still runs (asked of its lock file).
    fn lease_alive(&self, row: &meta::LeaseRow) -> bool {
        crate::lease::alive(&self.root, row)
    }

    /// Take a lease covering `name` (a pack file, or a `tmp/` directory).
    pub(crate) fn lease(&self, conn: &Connection, name: &str) -> Result<crate::lease::Lease> {
        crate::lease::Lease::acquire(&self.root, conn, name)
    }

    pub(crate) fn packs_dir(&self) -> PathBuf {
        self.root.join("packs")
    }

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

        let pack_name = format!("{}.pack", unique_name());
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
        if result.is_err() {
            let _ = meta::release_lease(&conn, lease.id);
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
        let split = Splitter::new(input, limits, &mut sink).run();
        // Stop the reader (it may be blocked sending) before looking at its result.
        let reader_out = reader
            .join()
            .map_err(|_| Error::Corrupt("reader thread panicked".into()))?;
        let SplitOutput {
            split,
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
        let (row, chunk_set) = layer_row(info.clone(), &entries, &split)?;
        let finishing = Instant::now();
        let pack = writer.finish(crash_point)?;
        let pack_finish = finishing.elapsed();
        let committing = Instant::now();

        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let existed = insert_layer_and_pack(&tx, pack_name, pack.as_ref(), &row, &chunk_set)?;
        if let (Some(c), Some(name)) = (&compressed, compression.name()) {
            meta::insert_blob_digest(&tx, &c.sha256, &info.id, name)?;
        }
        if let Some(pin) = pin {
            meta::pin_layer(&tx, pin, &info.id)?;
        }
        meta::release_lease(&tx, lease)?;
        crash_point("before-commit");
        tx.commit()?;
        crash_point("after-commit");
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
        let produced = producer
            .join()
            .map_err(|_| Error::Corrupt("directory walker panicked".into()))?;
        // The walker's error explains an import failure (a broken pipe) better than the import's.
        let walk_warnings = produced?;
        let mut imported = imported?;
        imported.warnings.extend(walk_warnings);
        Ok(imported)
    }

    /// Record the build step that made a layer (its OCI history `created_by`).
    pub fn set_created_by(&self, id: &Blake3, created_by: &str) -> Result<()> {
        meta::set_created_by(&*self.conn()?, id, created_by)
    }

    /// The build step recorded for a layer, if any.
    pub fn created_by(&self, id: &Blake3) -> Result<Option<String>> {
        meta::created_by(&*self.conn()?, id)
    }

    pub fn layers(&self) -> Result<Vec<LayerInfo>> {
        meta::list_layers(&*self.conn()?)
    }

    pub fn layer(&self, key: &str) -> Result<LayerInfo> {
        meta::find_layer(&*self.conn()?, key)
    }

    /// Delete a layer that no recorded stack uses and no image import in flight has pinned.
    pub fn delete(&self, id: &Blake3) -> Result<()> {
        meta::delete_layer(&mut *self.conn()?, id, None, &|l| self.lease_alive(l))
    }

    /// [`Store::delete`] on behalf of the import holding `lease`: its own pins do not count.
    pub(crate) fn delete_as(&self, id: &Blake3, lease: i64) -> Result<()> {
        meta::delete_layer(&mut *self.conn()?, id, Some(lease), &|l| {
            self.lease_alive(l)
        })
    }

    /// The layer's entries and reconstruction recipe.
    pub fn load(&self, id: &Blake3) -> Result<(Vec<Entry>, TarSplit)> {
        let (entries, split) = meta::layer_blobs(&*self.conn()?, id)?;
        Ok((decode_blob(&entries)?, decode_blob(&split)?))
    }

    /// A layer's entries, decoded once and shared while any stack holds them.
    pub fn layer_entries(&self, id: &Blake3) -> Result<LayerEntries> {
        self.refuse_broken(id)?;
        let cached = self
            .entry_cache
            .lock()
            .ok()
            .and_then(|c| c.get(id).and_then(Weak::upgrade));
        if let Some(e) = cached {
            return Ok(e);
        }
        let entries: LayerEntries = Arc::new(self.entries(id)?.into_iter().map(Arc::new).collect());
        if let Ok(mut cache) = self.entry_cache.lock() {
            cache.retain(|_, w| w.strong_count() > 0);
            cache.insert(*id, Arc::downgrade(&entries));
        }
        Ok(entries)
    }

    /// A stack of `layers`, bottom first.
    pub fn stack(&self, layers: &[LayerInfo]) -> Result<Stack> {
        if layers.len() > self.options.max_depth {
            return Err(Error::StackDepth {
                depth: layers.len(),
                limit: self.options.max_depth,
            });
        }
        let mut stack = Stack::empty();
        for layer in layers {
            stack.push_mut(
                layer.clone(),
                self.layer_entries(&layer.id)?,
                self.options.max_depth,
            )?;
        }
        Ok(stack)
    }

    /// `base` with `layer` on top (sharing `base`'s index).
    pub fn push(&self, base: &Stack, layer: &LayerInfo) -> Result<Stack> {
        base.push(
            layer.clone(),
            self.layer_entries(&layer.id)?,
            self.options.max_depth,
        )
    }

    /// A reader of a regular file's content.
    pub fn content(&self, entry: &Entry) -> Result<ContentReader> {
        self.content_with(entry, None)
    }

    /// A reader of a regular file's content, whose chunks may also be in `fresh` (a
    /// container's uncommitted writes).
    pub fn content_with(
        &self,
        entry: &Entry,
        fresh: Option<&crate::emit::FreshChunks>,
    ) -> Result<ContentReader> {
        let stored = entry
            .chunks
            .iter()
            .map(|c| &c.digest)
            .filter(|d| fresh.is_none_or(|f| !f.contains_key(d)));
        let locs = meta::chunk_locs(&*self.conn()?, stored)?;
        let pieces = entry
            .chunks
            .iter()
            .map(|c| {
                if let Some(b) = fresh.and_then(|f| f.get(&c.digest)) {
                    return Ok(Piece::Fresh(b.clone()));
                }
                locs.get(&c.digest)
                    .cloned()
                    .map(Piece::Stored)
                    .ok_or_else(|| self.missing_chunk(&c.digest))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ContentReader::with_pieces(pieces, self.cached_reader()?))
    }

    /// The bytes of one stored chunk.
    pub fn chunk(&self, digest: &Blake3) -> Result<Arc<[u8]>> {
        let loc =
            meta::chunk_loc(&*self.conn()?, digest)?.ok_or_else(|| self.missing_chunk(digest))?;
        let mut buf = Vec::new();
        self.cached_reader()?.read(&loc, &mut buf)?;
        Ok(Arc::from(buf))
    }

    /// A chunk reader sharing this store's decoded blocks.
    pub(crate) fn cached_reader(&self) -> Result<PackReader> {
        PackReader::with_cache(&self.packs_dir(), self.blocks.clone())
    }

    /// Point tag `name` at `stack` (recording the stack, so its layers cannot be deleted).
    pub fn tag(&self, stack: &Stack, name: &str) -> Result<()> {
        if let Some(why) = bad_tag(name) {
            return Err(Error::InvalidArgument(format!(
                "invalid tag {name:?}: {why}"
            )));
        }
        let ids: Vec<Blake3> = stack.layers.iter().map(|l| l.id).collect();
        meta::set_ref(&mut *self.conn()?, name, &stack.chain_id, &ids)
    }

    /// The stack tagged `name`.
    pub fn get(&self, name: &str) -> Result<Stack> {
        let ids = meta::get_ref(&*self.conn()?, name)?;
        let layers = ids
            .iter()
            .map(|id| self.layer(id))
            .collect::<Result<Vec<_>>>()?;
        let mut stack = self.stack(&layers)?;
        stack.image = self.image_for_ref(name, &stack.chain_id)?;
        Ok(stack)
    }

    pub fn tags(&self) -> Result<Vec<String>> {
        meta::list_refs(&*self.conn()?)
    }

    pub fn untag(&self, name: &str) -> Result<()> {
        meta::delete_ref(&mut *self.conn()?, name)
    }

    pub fn entries(&self, id: &Blake3) -> Result<Vec<Entry>> {
        let (entries, _) = meta::layer_blobs(&*self.conn()?, id)?;
        decode_blob(&entries)
    }

    /// Write the layer's tar to `out`, compressed as asked. Every chunk is verified on read, and
    /// the tar written is hashed (on a thread of its own) and checked against the layer's `id`
    /// and `diff_id` before this returns: a damaged store never yields a valid-looking export.
    pub fn export_tar(
        &self,
        id: &Blake3,
        out: &mut dyn Write,
        compression: Compression,
        progress: Progress<'_>,
    ) -> Result<Exported> {
        let info = meta::find_layer(&*self.conn()?, &id.to_string())?;
        self.refuse_broken(id)?;
        let (entries, split) = self.load(id)?;
        let plan = self.chunk_plan(id, &entries, &split)?;
        let mut chunks = cas::OrderedChunks::new(&self.packs_dir(), plan);
        let mut counted = HashingWriter {
            inner: out,
            sha: (compression != Compression::None).then(sha2::Sha256::new),
            len: 0,
        };
        let enc = Encoder::new(compression, &mut counted).ctx(|| "starting the encoder".into())?;
        // Raw segments and chunk slices go out as they are, gathered into vectored writes; the
        // hasher sees the same pieces, shared rather than copied.
        let mut out = Gather::new(enc);
        let hasher = StreamHasher::spawn(false);
        let raw = Arc::new(split.raw);
        let mut raw_pos = 0usize;
        let mut done = 0u64;
        for op in &split.ops {
            match *op {
                Op::Raw(n) => {
                    let range = raw_pos..raw_pos + n as usize;
                    if range.end > raw.len() {
                        return Err(Error::Corrupt(format!(
                            "layer {id}: raw segment out of range"
                        )));
                    }
                    hasher.update(SharedSlice(raw.clone(), range.clone()));
                    out.shared(raw.clone(), range.clone())
                        .ctx(|| "writing the export".into())?;
                    raw_pos = range.end;
                    done += n;
                }
                Op::Payload(i) => {
                    let entry = &entries[i as usize];
                    for _ in &entry.chunks {
                        let (block, range) = chunks
                            .next_chunk()
                            .ok_or_else(|| {
                                Error::Corrupt(format!(
                                    "layer {id}: fewer chunks than entries need"
                                ))
                            })?
                            .map_err(|e| e.in_entry(id, &entry.path))?;
                        done += range.len() as u64;
                        hasher.update(SharedSlice(block.clone(), range.clone()));
                        out.shared(block, range)
                            .ctx(|| "writing the export".into())?;
                    }
                    progress(done)?;
                }
            }
        }
        let enc = out.finish().ctx(|| "writing the export".into())?;
        enc.finish().ctx(|| "finishing the export".into())?;
        progress(done)?;
        let written = hasher.finish();
        if written.blake3 != info.id || written.sha256 != info.diff_id || done != info.size {
            return Err(Error::DigestMismatch {
                what: format!("the tar rebuilt from layer {id} ({done} bytes)"),
                expected: info.diff_id,
                found: written.sha256,
            });
        }
        let digest = match counted.sha.take() {
            Some(sha) => digest::sha256_string(&sha.finalize()),
            None => written.sha256,
        };
        Ok(Exported {
            digest,
            size: counted.len,
        })
    }

    /// `e`, met reading content for `path` of a layer being written, said to be about the
    /// layers that hold the damaged chunk (looked up only on this error path).
    pub(crate) fn name_damage(&self, e: Error, path: &[u8]) -> Error {
        let users = match &e {
            Error::DamagedChunk { chunk, .. } => Blake3::parse(chunk)
                .and_then(|d| meta::layers_using_chunk(&*self.conn()?, &d))
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        if users.is_empty() {
            return e.in_entry(&"the layer being written", path);
        }
        e.in_entry(&users.join(", "), path)
    }

    /// The error for a chunk a file needs but the store does not hold: a layer that uses it
    /// was marked broken by `fsck --repair` (the usual reason), or the store is damaged.
    pub(crate) fn missing_chunk(&self, digest: &Blake3) -> Error {
        let broken = self.conn().and_then(|conn| {
            for layer in meta::layers_using_chunk(&conn, digest)? {
                let chunks = meta::broken_chunks(&conn, &Blake3::parse(&layer)?)?;
                if chunks > 0 {
                    return Ok(Some(Error::BrokenLayer { layer, chunks }));
                }
            }
            Ok(None)
        });
        match broken {
            Ok(Some(e)) => e,
            _ => Error::Corrupt(format!("chunk {digest} is missing")),
        }
    }

    /// Refuse to read a layer that `fsck --repair` marked broken.
    pub(crate) fn refuse_broken(&self, id: &Blake3) -> Result<()> {
        match meta::broken_chunks(&*self.conn()?, id)? {
            0 => Ok(()),
            chunks => Err(Error::BrokenLayer {
                layer: id.to_string(),
                chunks,
            }),
        }
    }

    /// Where every payload chunk of a layer lives, in export order.
    fn chunk_plan(
        &self,
        id: &Blake3,
        entries: &[Entry],
        split: &TarSplit,
    ) -> Result<Vec<cas::ChunkLoc>> {
        let wanted = entries
            .iter()
            .flat_map(|e| e.chunks.iter().map(|c| &c.digest));
        let locs = meta::chunk_locs(&*self.conn()?, wanted)?;
        let mut plan = Vec::new();
        for op in &split.ops {
            if let Op::Payload(i) = *op {
                let entry = entries.get(i as usize).ok_or_else(|| {
                    Error::Corrupt(format!("layer {id}: payload of missing entry {i}"))
                })?;
                for c in &entry.chunks {
                    plan.push(locs.get(&c.digest).cloned().ok_or_else(|| {
                        Error::Corrupt(format!("layer {id}: chunk {} is missing", c.digest))
                    })?);
                }
            }
        }
        Ok(plan)
    }

    /// Export to a path atomically (a temporary file renamed into place).
    pub fn export_tar_to_path(
        &self,
        id: &Blake3,
        dest: &Path,
        compression: Compression,
        progress: Progress<'_>,
    ) -> Result<Exported> {
        fsio::write_atomically(dest, |w| self.export_tar(id, w, compression, progress))
    }

    pub fn stats(&self) -> Result<Stats> {
        let conn = self.conn()?;
        let one = |sql: &str| -> Result<u64> {
            Ok(conn
                .query_row(sql, [], |r| r.get::<_, Option<i64>>(0))?
                .unwrap_or(0) as u64)
        };
        let mut s = Stats {
            layers: one("SELECT count(*) FROM layers")?,
            chunks: one("SELECT count(*) FROM chunks")?,
            packs: one("SELECT count(*) FROM packs")?,
            logical_bytes: one("SELECT sum(size) FROM layers")?,
            content_bytes: one("SELECT sum(len) FROM chunks")?,
            stored_bytes: one("SELECT sum(block_len) FROM (SELECT DISTINCT pack, block_offset, block_len FROM chunks)")?,
            metadata_bytes: one("SELECT sum(length(entries) + length(split)) FROM layers")?,
            disk_bytes: dir_size(&self.root)?,
            dedup_ratio: 0.0,
        };
        let stored = s.stored_bytes + s.metadata_bytes;
        s.dedup_ratio = if stored == 0 {
            1.0
        } else {
            s.logical_bytes as f64 / stored as f64
        };
        Ok(s)
    }

    /// Remove what nothing references: unreferenced chunks, packs without live chunks, and
    /// files left by interrupted imports (packs, and `tmp/` scratch of dead processes); rewrite
    /// packs that are mostly garbage.
    pub fn gc(&self) -> Result<GcReport> {
        let mut conn = self.conn()?;
        let mut report = GcReport::default();
        // Packs replaced or emptied are retired, not deleted (readers may hold their old
        // locations); interrupted imports' packs, which no reader can know, are deleted.
        let mut retire: Vec<String> = Vec::new();
        let mut unlink: Vec<PathBuf> = Vec::new();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let live = meta::live_leases(&tx, &|l| self.lease_alive(l))?;
        if live.is_empty() {
            report.chunks_removed = meta::delete_unreferenced_chunks(&tx)?;
            let header = cas::PACK_MAGIC.len() as u64;
            let mut rewrite: Vec<(String, u64)> = Vec::new();
            let mut small: Vec<(String, u64)> = Vec::new();
            for (name, size) in meta::packs(&tx)? {
                let live_bytes = self.live_pack_bytes(&tx, &name)?;
                if live_bytes == 0 {
                    tx.execute("DELETE FROM packs WHERE name = ?1", [&name])?;
                    retire.push(name);
                    report.packs_removed += 1;
                    report.bytes_reclaimed += size;
                } else if (live_bytes + header) * 2 < size {
                    rewrite.push((name, size));
                } else if size < SMALL_PACK {
                    small.push((name, size));
                } else {
                    self.trim_pack_tail(&name, size, &mut report);
                }
            }
            // Every import writes its own pack: merge small ones so their number stays low.
            if small.len() >= SMALL_PACKS_TO_MERGE {
                rewrite.append(&mut small);
            }
            for (name, size) in small {
                self.trim_pack_tail(&name, size, &mut report);
            }
            if !rewrite.is_empty() {
                let names: Vec<&str> = rewrite.iter().map(|(n, _)| n.as_str()).collect();
                let new_size = self.rewrite_packs(&tx, &names)?;
                let old_size: u64 = rewrite.iter().map(|(_, s)| s).sum();
                retire.extend(rewrite.iter().map(|(n, _)| n.clone()));
                report.packs_rewritten += rewrite.len() as u64;
                report.bytes_reclaimed += old_size.saturating_sub(new_size);
            }
        } else {
            report.deferred = true;
        }
        // Pack files that no row names and no live import owns: interrupted imports.
        let known: HashSet<String> = meta::packs(&tx)?.into_iter().map(|(n, _)| n).collect();
        for entry in fs::read_dir(self.packs_dir()).ctx(|| "listing packs".into())? {
            let entry = entry.ctx(|| "listing packs".into())?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_file = entry.file_type().is_ok_and(|t| t.is_file());
            if is_file && !known.contains(&name) && !live.contains(&name) && !retire.contains(&name)
            {
                report.bytes_reclaimed += entry.metadata().map(|m| m.len()).unwrap_or(0);
                unlink.push(entry.path());
            }
        }
        tx.commit()?;
        for path in unlink {
            let _ = fs::remove_file(path);
        }
        crate::lease::sweep(&self.root, &live);
        let retired = self.packs_dir().join(cas::RETIRED_DIR);
        if !retire.is_empty() {
            fs::create_dir_all(&retired).ctx(|| format!("creating {}", retired.display()))?;
            for name in &retire {
                let to = retired.join(name);
                if fs::rename(self.packs_dir().join(name), &to).is_ok() {
                    // The grace period runs from now: a rename keeps the file's old mtime.
                    let _ = fs::File::options()
                        .write(true)
                        .open(&to)
                        .and_then(|f| f.set_modified(std::time::SystemTime::now()));
                }
            }
        }
        // Their bytes were counted when they were retired.
        expire_retired(&retired);
        report.bytes_reclaimed += self.gc_image_blobs()?;
        report.bytes_reclaimed += sweep_tmp(&self.root.join("tmp"));
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?;
        Ok(report)
    }

    /// Cut bytes past a pack's committed length (never read; left by nothing we know of, but
    /// reclaimed all the same).
    fn trim_pack_tail(&self, name: &str, size: u64, report: &mut GcReport) {
        let path = self.packs_dir().join(name);
        if let Ok(m) = fs::metadata(&path) {
            if m.len() > size {
                if let Ok(f) = fs::OpenOptions::new().write(true).open(&path) {
                    if f.set_len(size).and_then(|()| f.sync_all()).is_ok() {
                        report.bytes_reclaimed += m.len() - size;
                    }
                }
            }
        }
    }

    /// Copy the live blocks of `names` into one fresh pack and repoint their chunks, inside `tx`.
    /// On failure the new file is removed and `tx` (rolled back by the caller) changes nothing.
    /// Stored bytes of `pack` that live chunks account for: whole blocks, but a block mostly
    /// dead only for its live share (gc regroups those chunks when it rewrites the pack).
    fn live_pack_bytes(&self, tx: &Connection, pack: &str) -> Result<u64> {
        let blocks = meta::live_blocks(tx, pack)?;
        let file = cas::open_pack(&self.packs_dir(), pack).ok();
        Ok(blocks
            .iter()
            .map(|b| b.live_stored(file.as_ref().and_then(|f| b.decoded_len(f))))
            .sum())
    }

    fn rewrite_packs(&self, tx: &Connection, names: &[&str]) -> Result<u64> {
        let new_name = format!("{}.pack", unique_name());
        let new_path = self.packs_dir().join(&new_name);
        let result = self.copy_live_blocks(tx, names, &new_name, &new_path);
        if result.is_err() {
            let _ = fs::remove_file(&new_path);
        }
        result
    }

    fn copy_live_blocks(
        &self,
        tx: &Connection,
        names: &[&str],
        new_name: &str,
        new_path: &Path,
    ) -> Result<u64> {
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(new_path)
            .ctx(|| format!("creating {}", new_path.display()))?;
        out.write_all(cas::PACK_MAGIC)
            .ctx(|| "writing pack".into())?;
        // The row exists before chunks point at it (foreign key); its size is set at the end.
        meta::insert_pack(tx, new_name, 0)?;
        let mut offset = cas::PACK_MAGIC.len() as u64;
        let mut buf = Vec::new();
        let mut update = tx.prepare(
            "UPDATE chunks SET pack = ?1, block_offset = ?2 WHERE pack = ?3 AND block_offset = ?4",
        )?;
        let mut regroup = cas::Regrouper::new(self.options.compression_level);
        let append = |out: &mut fs::File,
                      offset: &mut u64,
                      (codec, bytes, chunks): cas::RegroupedBlock|
         -> Result<()> {
            out.write_all(&bytes).ctx(|| "writing pack".into())?;
            let moved: Vec<cas::ChunkLoc> = chunks
                .into_iter()
                .map(|(digest, inner_offset, len)| cas::ChunkLoc {
                    digest,
                    pack: new_name.to_owned(),
                    block_offset: *offset,
                    block_len: bytes.len() as u64,
                    codec,
                    inner_offset,
                    len,
                })
                .collect();
            meta::move_chunks(tx, &moved)?;
            *offset += bytes.len() as u64;
            Ok(())
        };
        for name in names {
            let src = cas::open_pack(&self.packs_dir(), name)?;
            for block in meta::live_blocks(tx, name)? {
                if block.is_sparse(block.decoded_len(&src)) {
                    // Mostly dead: keep only its live chunks, in new blocks.
                    let decoded = block.decode(&src, name)?;
                    for loc in meta::block_chunks(tx, name, block.offset)? {
                        if let Some(full) = regroup.add(&decoded, &loc)? {
                            append(&mut out, &mut offset, full)?;
                        }
                    }
                    continue;
                }
                buf.resize(block.len as usize, 0);
                std::os::unix::fs::FileExt::read_exact_at(&src, &mut buf, block.offset)
                    .ctx(|| format!("reading pack {name}"))?;
                out.write_all(&buf).ctx(|| "writing pack".into())?;
                update.execute(rusqlite::params![new_name, offset, name, block.offset])?;
                offset += block.len;
            }
        }
        if let Some(last) = regroup.take()? {
            append(&mut out, &mut offset, last)?;
        }
        for name in names {
            tx.execute("DELETE FROM packs WHERE name = ?1", [name])?;
        }
        out.sync_all().ctx(|| "syncing pack".into())?;
        cas::sync_dir(&self.packs_dir())?;
        tx.execute(
            "UPDATE packs SET size = ?1 WHERE name = ?2",
            rusqlite::params![offset, new_name],
        )?;
        Ok(offset)
    }

    /// Re-hash every chunk and check every reference; report each problem found, and for each
    /// damaged chunk the layers and files that use it. With `repair`, damaged chunks are taken
    /// out of use and the layers using them marked broken (refused by every read until an
    /// import stores their content again).
    pub fn fsck(&self, repair: bool) -> Result<FsckReport> {
        let conn = self.conn()?;
        let mut report = FsckReport::default();
        let packs = meta::packs(&conn)?;
        for (name, size) in &packs {
            match fs::metadata(self.packs_dir().join(name)) {
                Ok(m) if m.len() >= *size => {}
                Ok(m) => report.problems.push(format!(
                    "pack {name} is {} bytes, {size} committed",
                    m.len()
                )),
                Err(e) => report.problems.push(format!("pack {name}: {e}")),
            }
        }
        let known: HashSet<&str> = packs.iter().map(|(n, _)| n.as_str()).collect();
        if let Ok(dir) = fs::read_dir(self.packs_dir()) {
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let is_file = e.file_type().is_ok_and(|t| t.is_file());
                if is_file && !known.contains(name.as_str()) {
                    report.garbage.push(format!("packs/{name}"));
                }
            }
        }
        let mut reader = PackReader::new(&self.packs_dir())?;
        let mut buf = Vec::new();
        let mut present = HashSet::new();
        let mut damaged: HashMap<Blake3, usize> = HashMap::new();
        for loc in meta::all_chunk_locs(&conn)? {
            report.chunks_checked += 1;
            if let Err(e) = reader.read(&loc, &mut buf) {
                damaged.insert(loc.digest, report.damaged.len());
                report.damaged.push(DamagedChunk {
                    chunk: loc.digest.to_string(),
                    pack: loc.pack.clone(),
                    reason: match e {
                        Error::DamagedChunk { reason, .. } => reason,
                        other => other.to_string(),
                    },
                    used_by: Vec::new(),
                });
            }
            present.insert(loc.digest);
        }
        let broken: HashMap<String, u64> = meta::broken_layers(&conn)?.into_iter().collect();
        for info in meta::list_layers(&conn)? {
            report.layers_checked += 1;
            let id = info.id;
            if let Some(n) = broken.get(&id.to_string()) {
                report.broken.push(id.to_string());
                report.problems.push(format!(
                    "layer {id} is broken: {n} damaged chunks were taken out of use; import it again to heal it"
                ));
            }
            let (entries, split) = match self.load(&id) {
                Ok(v) => v,
                Err(e) => {
                    report.problems.push(format!("layer {id}: {e}"));
                    continue;
                }
            };
            let mut referenced: Vec<Blake3> = Vec::new();
            let mut payload = 0u64;
            for e in &entries {
                let mut sum = 0u64;
                for c in &e.chunks {
                    if let Some(&i) = damaged.get(&c.digest) {
                        let user = (id.to_string(), crate::error::path_text(&e.path));
                        if !report.damaged[i].used_by.contains(&user) {
                            report.damaged[i].used_by.push(user);
                        }
                    } else if !present.contains(&c.digest) && !broken.contains_key(&id.to_string())
                    {
                        report.problems.push(format!(
                            "layer {id}: entry {:?} needs missing chunk {}",
                            String::from_utf8_lossy(&e.path),
                            c.digest
                        ));
                    }
                    referenced.push(c.digest);
                    sum += u64::from(c.len);
                }
                if !e.chunks.is_empty() && sum != e.size {
                    report.problems.push(format!(
                        "layer {id}: entry {:?} has {sum} bytes of chunks for size {}",
                        String::from_utf8_lossy(&e.path),
                        e.size
                    ));
                }
            }
            let raw: u64 = split
                .ops
                .iter()
                .map(|op| match op {
                    Op::Raw(n) => *n,
                    Op::Payload(i) => {
                        payload += entries.get(*i as usize).map_or(0, |e| e.size);
                        0
                    }
                })
                .sum();
            if raw != split.raw.len() as u64 {
                report.problems.push(format!(
                    "layer {id}: raw segments cover {raw} of {} bytes",
                    split.raw.len()
                ));
            }
            if raw + payload != info.size {
                report.problems.push(format!(
                    "layer {id}: rebuilds {} bytes, recorded size {}",
                    raw + payload,
                    info.size
                ));
            }
            referenced.sort_unstable();
            referenced.dedup();
            let mut recorded = meta::layer_chunk_set(&conn, &id)?;
            recorded.sort_unstable();
            if recorded != referenced {
                report.problems.push(format!(
                    "layer {id}: chunk references out of date ({} recorded, {} used)",
                    recorded.len(),
                    referenced.len()
                ));
            }
        }
        for d in &report.damaged {
            let users: Vec<String> = d.used_by.iter().map(|(l, p)| format!("{l} {p}")).collect();
            report.problems.push(format!(
                "chunk {} (pack {}) is damaged: {}; used by {}",
                d.chunk,
                d.pack,
                d.reason,
                if users.is_empty() {
                    "no layer".to_string()
                } else {
                    users.join(", ")
                }
            ));
        }
        self.fsck_image_blobs(&mut report.problems)?;
        drop(conn);
        if repair && !report.damaged.is_empty() {
            report.repaired = Some(self.retire_damaged(&report.damaged)?);
        }
        Ok(report)
    }

    /// `fsck --repair`'s change, in one transaction: the damaged chunks out of use, the layers
    /// using them marked broken.
    fn retire_damaged(&self, damaged: &[DamagedChunk]) -> Result<Repaired> {
        let chunks = damaged
            .iter()
            .map(|d| Blake3::parse(&d.chunk))
            .collect::<Result<Vec<_>>>()?;
        let mut per_layer: std::collections::BTreeMap<String, u64> = Default::default();
        for d in damaged {
            let layers: HashSet<&String> = d.used_by.iter().map(|(l, _)| l).collect();
            for l in layers {
                *per_layer.entry(l.clone()).or_default() += 1;
            }
        }
        let layers: Vec<(String, u64)> = per_layer.into_iter().collect();
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        meta::retire_damaged(&tx, &chunks, &layers)?;
        tx.commit()?;
        Ok(Repaired {
            chunks_retired: chunks.len() as u64,
            layers_broken: layers.into_iter().map(|(l, _)| l).collect(),
        })
    }

    /// Layers `fsck --repair` marked broken, with how many of their chunks were damaged.
    pub fn broken_layers(&self) -> Result<Vec<(String, u64)>> {
        meta::broken_layers(&*self.conn()?)
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
                let exists = meta::chunk_exists(conn, &d)?;
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

/// A range of a shared buffer, as the stream hasher takes it.
struct SharedSlice(Arc<Vec<u8>>, std::ops::Range<usize>);

impl AsRef<[u8]> for SharedSlice {
    fn as_ref(&self) -> &[u8] {
        &self.0[self.1.clone()]
    }
}

struct HashingWriter<'w> {
    inner: &'w mut dyn Write,
    sha: Option<sha2::Sha256>,
    len: u64,
}

impl Write for HashingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(s) = self.sha.as_mut() {
            s.update(&buf[..n]);
        }
        self.len += n as u64;
        Ok(n)
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let n = self.inner.write_vectored(bufs)?;
        if let Some(s) = self.sha.as_mut() {
            let mut left = n;
            for b in bufs {
                let take = left.min(b.len());
                s.update(&b[..take]);
                left -= take;
                if left == 0 {
                    break;
                }
            }
        }
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A layer's database row and the set of chunks its entries name.
pub(crate) fn layer_row(
    info: LayerInfo,
    entries: &[Entry],
    split: &TarSplit,
) -> Result<(meta::LayerRow, Vec<Blake3>)> {
    layer_row_with(info, entries, encode_blob(split)?)
}

/// [`layer_row`] with the split already encoded (by [`encode_blob`]).
pub(crate) fn layer_row_with(
    info: LayerInfo,
    entries: &[Entry],
    split: Vec<u8>,
) -> Result<(meta::LayerRow, Vec<Blake3>)> {
    let mut chunk_set: Vec<Blake3> = entries
        .iter()
        .flat_map(|e| e.chunks.iter().map(|c| c.digest))
        .collect();
    chunk_set.sort_unstable();
    chunk_set.dedup();
    let row = meta::LayerRow {
        info,
        entries: encode_blob(&entries)?,
        split,
    };
    Ok((row, chunk_set))
}

/// In the caller's transaction: the pack a layer's import wrote (if any) and the layer itself,
/// unless a layer with its id exists (returns whether it did).
pub(crate) fn insert_layer_and_pack(
    tx: &Connection,
    pack_name: &str,
    pack: Option<&(Vec<cas::ChunkLoc>, u64)>,
    row: &meta::LayerRow,
    chunk_set: &[Blake3],
) -> Result<bool> {
    if let Some((locs, size)) = pack {
        meta::insert_pack(tx, pack_name, *size)?;
        meta::insert_chunks(tx, locs)?;
        // Chunks `fsck --repair` took out of use may be among them.
        meta::heal_broken(tx)?;
    }
    let existed = meta::layer_exists(tx, &row.info.id)?;
    if !existed {
        meta::insert_layer(tx, row, chunk_set)?;
    }
    Ok(existed)
}

pub(crate) fn encode_blob<T: serde::Serialize>(value: &T) -> Result<Vec<u8>> {
    let bytes = postcard::to_stdvec(value)
        .map_err(|e| Error::Corrupt(format!("encoding metadata: {e}")))?;
    let mut enc =
        zstd::stream::Encoder::new(Vec::new(), 3).ctx(|| "compressing metadata".into())?;
    enc.include_checksum(true)
        .ctx(|| "compressing metadata".into())?;
    enc.write_all(&bytes)
        .ctx(|| "compressing metadata".into())?;
    enc.finish().ctx(|| "compressing metadata".into())
}

fn decode_blob<T: serde::de::DeserializeOwned>(blob: &[u8]) -> Result<T> {
    let bytes = zstd::stream::decode_all(blob)
        .map_err(|e| Error::Corrupt(format!("layer metadata: {e}")))?;
    postcard::from_bytes(&bytes).map_err(|e| Error::Corrupt(format!("layer metadata: {e}")))
}

pub(crate) fn unique_name() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut h = blake3::Hasher::new();
    h.update(&nanos.to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    h.update(&format!("{:?}", std::thread::current().id()).into_bytes());
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    h.update(
        &COUNTER
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .to_le_bytes(),
    );
    h.finalize().to_hex()[..24].to_string()
}

/// The kinds of scratch entries image imports and exports make under `tmp/`.
const TMP_KINDS: [&str; 2] = ["oci", "docker"];

/// A fresh name for scratch space under `tmp/` that says who owns it,
/// `<kind>-<pid>-<start time>-<unique>`: `gc` removes what a dead process left there and never
/// what a live one uses.
pub(crate) fn owned_tmp_name(kind: &str) -> String {
    format!("{kind}-{}", owner_tag())
}

/// Why `name` cannot be a tag, if it cannot: tags are non-empty and contain no whitespace or
/// control characters.
pub(crate) fn bad_tag(name: &str) -> Option<&'static str> {
    (name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()))
        .then_some("tags are non-empty and contain no whitespace or control characters")
}

/// `<pid>-<start time>-<unique>`: a fresh name part that says which process made it.
pub(crate) fn owner_tag() -> String {
    let pid = std::process::id();
    let start = meta::process_start_time(pid).unwrap_or(0);
    format!("{pid}-{start}-{}", unique_name())
}

/// Whether an [`owner_tag`] names a process that is gone; `false` for text that is not one
/// (a name without an owner is never judged abandoned).
pub(crate) fn owner_gone(tag: &str) -> bool {
    tag_owner(tag).is_some_and(|(pid, start)| meta::process_start_time(pid) != Some(start))
}

/// The owner (pid, start time) an [`owner_tag`] records; `None` for any other text.
fn tag_owner(tag: &str) -> Option<(u32, u64)> {
    let mut parts = tag.splitn(3, '-');
    let pid = parts.next()?.parse().ok()?;
    let start = parts.next()?.parse().ok()?;
    parts.next().filter(|unique| !unique.is_empty())?;
    Some((pid, start))
}

/// Whether the `tmp/` entry `name` belongs to a process that is gone. A name that records no
/// owner (left by an older build, or by hand) is never judged abandoned.
fn tmp_abandoned(name: &str) -> bool {
    name.split_once('-')
        .is_some_and(|(kind, tag)| TMP_KINDS.contains(&kind) && owner_gone(tag))
}

/// Remove the scratch entries of `tmp/` whose owner is dead; returns the bytes freed.
fn sweep_tmp(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut freed = 0;
    for e in entries.flatten() {
        if !tmp_abandoned(&e.file_name().to_string_lossy()) {
            continue;
        }
        let path = e.path();
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        let size = if is_dir {
            dir_size(&path).unwrap_or(0)
        } else {
            e.metadata().map_or(0, |m| m.len())
        };
        let removed = if is_dir {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        if removed.is_ok() {
            freed += size;
        }
    }
    freed
}

/// Delete retired packs older than the grace period.
fn expire_retired(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let Ok(meta) = e.metadata() else { continue };
        let old = meta
            .modified()
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= cas::RETIRE_GRACE);
        if old {
            let _ = fs::remove_file(e.path());
        }
    }
}

fn dir_size(root: &Path) -> Result<u64> {
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).ctx(|| format!("listing {}", dir.display()))? {
            let e = e.ctx(|| format!("listing {}", dir.display()))?;
            let m = e
                .metadata()
                .ctx(|| format!("stat {}", e.path().display()))?;
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.len();
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tmp_names_record_their_owner() {
        let name = owned_tmp_name("oci");
        let tag = name.strip_prefix("oci-").unwrap();
        assert_eq!(tag_owner(tag).map(|o| o.0), Some(std::process::id()));
        assert!(!tmp_abandoned(&name) && !owner_gone(tag));
        assert_eq!(tag_owner("12-34-ab.tar"), Some((12, 34)));
        assert!(
            tmp_abandoned("docker-12-34-ab.tar"),
            "no process 12 started at tick 34"
        );
        for other in ["0123abcd", "12-34-", "x-34-ab"] {
            assert_eq!(tag_owner(other), None, "{other}");
            assert!(!owner_gone(other), "{other}");
        }
        assert!(!tmp_abandoned("pack-12-34-ab"), "not a scratch kind");
    }
}
