//! The store: one handle over the packs ([`crate::cas`]), the metadata ([`crate::meta`]) and the
//! caches readers share; the facade through which every operation is reached.
//!
//! Invariants: the store holds no SQL and no format logic of its own. What it owns is shared
//! state — the database connections (per process: a forked child opens its own), the decoded
//! entry lists of the layers live stacks use, and the decoded blocks content readers share —
//! and the rule that every read of stored content goes through one checked reader (each chunk
//! verified against its BLAKE3; a layer `fsck --repair` marked broken is refused). Import,
//! export, garbage collection and checking live in the submodules below.

mod export;
mod fsck;
mod gc;
mod import;
mod space;

pub use export::Exported;
pub use fsck::{DamagedChunk, FsckReport, Repaired};
pub use gc::GcReport;
pub use import::{ImportOptions, Imported};

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use rusqlite::Connection;

use crate::cas::{self, PackReader};
use crate::chunk::ChunkParams;
use crate::digest::Blake3;
use crate::error::{Error, IoContext, Result};
use crate::fsio;
use crate::layer::{self, Entry, LayerInfo};
use crate::meta;
use crate::stack::{ContentReader, LayerEntries, Piece, Stack};
use crate::tar::{Limits, TarSplit};

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

/// Called with the number of uncompressed bytes read so far; an error cancels the operation.
pub type Progress<'a> = &'a (dyn Fn(u64) -> Result<()> + Sync);

pub fn no_progress(_: u64) -> Result<()> {
    Ok(())
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

pub struct Store {
    root: PathBuf,
    options: StoreOptions,
    limits: Limits,
    /// Idle database connections, and the process that opened them: SQLite connections must
    /// not cross a `fork()`, so a child leaks its parent's and opens its own.
    pool: Mutex<(u32, Vec<Connection>)>,
    /// Opened read-only: writes are refused before they start.
    readonly: bool,
    /// Decoded entries of layers some live stack uses, shared between stacks.
    entry_cache: Mutex<HashMap<Blake3, Weak<Vec<Arc<Entry>>>>>,
    /// Decoded blocks shared by the readers of file contents (a directory of small files
    /// lies in a few blocks: reading it file by file decodes each block once).
    blocks: Arc<cas::BlockCache>,
}

/// Whether this process can write the store's directory and database (`access(2)`, which also
/// says `EROFS` for a read-only file system, even to root).
fn writable(root: &Path) -> bool {
    use rustix::fs::{access, Access};
    access(root, Access::WRITE_OK).is_ok() && access(root.join("meta.db"), Access::WRITE_OK).is_ok()
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

impl Store {
    /// Open the store at `root`, creating it with `options` if it does not exist. The options
    /// of an existing store are the ones it was created with.
    /// Open the store at `root`, creating it with `options` if it does not exist. The options
    /// of an existing store are the ones it was created with. An existing store whose files
    /// this process cannot write (a read-only file system, or permissions) opens read-only.
    pub fn open(root: &Path, options: StoreOptions, limits: Limits) -> Result<Self> {
        if root.join("meta.db").exists() && !writable(root) {
            return Self::open_readonly(root, limits);
        }
        Self::open_writable(root, options, limits)
    }

    /// Open the existing store at `root` for reading only: every read works (layers, stacks,
    /// content, exports and materialize elsewhere, `fsck` without repair); every write is refused
    /// with [`Error::ReadOnly`]. A store on a read-only file system is read as it is on disk.
    pub fn open_readonly(root: &Path, limits: Limits) -> Result<Self> {
        let db = root.join("meta.db");
        if !db.exists() {
            return Err(Error::NotFound(format!("no store at {}", root.display())));
        }
        // Readers of a live store share its write-ahead log; where nothing can be written, the
        // store is read as immutable.
        let conn = match meta::open_readonly(&db, false)
            .and_then(|c| meta::read_settings(&c).map(|s| (c, s)))
        {
            Ok(found) => found,
            Err(_) => {
                let c = meta::open_readonly(&db, true)?;
                let s = meta::read_settings(&c)?;
                (c, s)
            }
        };
        Self::with_connection(root, conn, limits, true)
    }

    fn open_writable(root: &Path, options: StoreOptions, limits: Limits) -> Result<Self> {
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
        let store = Self::with_connection(root, (conn, settings), limits, false)?;
        store.make_reserve();
        Ok(store)
    }

    /// The store over an open database and the settings read from it.
    fn with_connection(
        root: &Path,
        (conn, settings): (Connection, Vec<(String, String)>),
        limits: Limits,
        readonly: bool,
    ) -> Result<Self> {
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
            readonly,
            pool: Mutex::new((std::process::id(), vec![conn])),
            entry_cache: Mutex::new(HashMap::new()),
            blocks: Arc::new(cas::BlockCache::new(BLOCK_CACHE_BYTES)),
        })
    }

    /// Whether the store was opened read-only.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// Refuse `action` (a write) on a read-only store, before anything is touched.
    pub(crate) fn check_writable(&self, action: &'static str) -> Result<()> {
        if self.readonly {
            return Err(Error::ReadOnly {
                store: self.root.display().to_string(),
                action,
            });
        }
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `r`, its error said to concern this store where it does not say which file it is about
    /// ([`Error::in_store`]): callers at the API's edge pass results through here.
    pub fn locate<T>(&self, r: Result<T>) -> Result<T> {
        r.map_err(|e| e.in_store(&self.root))
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
            None if self.readonly => meta::open_readonly(&self.root.join("meta.db"), false)
                .or_else(|_| meta::open_readonly(&self.root.join("meta.db"), true))?,
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

    /// Take a lease covering `name` (a pack file, or a `tmp/` directory): every write that adds
    /// to the store starts here, so a read-only store refuses it here.
    pub(crate) fn lease(&self, conn: &Connection, name: &str) -> Result<crate::lease::Lease> {
        self.check_writable("add to it")?;
        crate::lease::Lease::acquire(&self.root, conn, name)
    }

    pub(crate) fn packs_dir(&self) -> PathBuf {
        self.root.join("packs")
    }

    /// Record the build step that made a layer (its OCI history `created_by`).
    pub fn set_created_by(&self, id: &Blake3, created_by: &str) -> Result<()> {
        self.check_writable("record a build step")?;
        meta::set_created_by(&*self.conn()?, id, created_by)
    }

    /// The build step recorded for a layer, if any.
    pub fn created_by(&self, id: &Blake3) -> Result<Option<String>> {
        meta::created_by(&*self.conn()?, id)
    }

    /// The size of the compressed blob a layer was imported from, when an image import
    /// recorded it.
    pub fn compressed_size(&self, layer: &LayerInfo) -> Result<Option<u64>> {
        match &layer.compressed_digest {
            Some(d) => meta::oci::layer_blob_size(&*self.conn()?, d),
            None => Ok(None),
        }
    }

    /// What `analysis` needs of each of `stack`'s layers beyond its entries.
    pub fn layer_meta(&self, stack: &Stack) -> Result<Vec<crate::analysis::LayerMeta>> {
        stack
            .layers
            .iter()
            .map(|l| {
                Ok(crate::analysis::LayerMeta {
                    created_by: self.created_by(&l.id)?,
                    compressed_size: self.compressed_size(l)?,
                })
            })
            .collect()
    }

    pub fn layers(&self) -> Result<Vec<LayerInfo>> {
        meta::list_layers(&*self.conn()?)
    }

    pub fn layer(&self, key: &str) -> Result<LayerInfo> {
        meta::find_layer(&*self.conn()?, key)
    }

    /// Every compressed blob known for a layer (imported from, exported, pulled or pushed).
    pub fn known_blobs(&self, id: &Blake3) -> Result<Vec<meta::oci::KnownBlob>> {
        meta::oci::known_blobs(&*self.conn()?, &id.to_string())
    }

    /// Delete a layer that no recorded stack uses and no image import in flight has pinned.
    pub fn delete(&self, id: &Blake3) -> Result<()> {
        self.check_writable("delete a layer")?;
        // Freeing space starts here: it works on a full disk too (see space.rs).
        self.with_room(|| {
            // A mount whose owner died must not keep its layers from deletion.
            self.reap_mounts()?;
            meta::delete_layer(&mut *self.conn()?, id, None, &|l| self.lease_alive(l))
        })
        .1
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
        Ok((layer::decode_blob(&entries)?, layer::decode_blob(&split)?))
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
        let blob = meta::layer_entries_blob(&*self.conn()?, id)?;
        let layer::SharedEntries(entries) = layer::decode_blob(&blob)?;
        drop(blob);
        // A GNU sparse file imported before they were refused: its stored content is its sparse
        // map and data regions, so no view may show it (its export stays byte-exact).
        if let Some(e) = entries.iter().find(|e| e.sparse) {
            return Err(Error::InvalidLayer(format!(
                "layer {id}: {} is a GNU sparse file, stored unexpanded by an older layerstore; \
                 it cannot be stacked (re-archive it without --sparse and import it again)",
                crate::error::path_text(&e.path)
            )));
        }
        let entries: LayerEntries = Arc::new(entries);
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
            stack
                .push_mut(
                    layer.clone(),
                    self.layer_entries(&layer.id)?,
                    self.options.max_depth,
                )
                .map_err(|e| match e {
                    // Name the layer whose entry cannot be stacked.
                    Error::InvalidLayer(why) => {
                        Error::InvalidLayer(format!("layer {}: {why}", layer.id))
                    }
                    e => e,
                })?;
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
        fresh: Option<&cas::FreshChunks>,
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
        self.check_writable("tag an image")?;
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
        self.check_writable("remove a tag")?;
        // Freeing space starts here: it works on a full disk too (see space.rs).
        self.with_room(|| meta::delete_ref(&mut *self.conn()?, name))
            .1
    }

    pub fn entries(&self, id: &Blake3) -> Result<Vec<Entry>> {
        layer::decode_blob(&meta::layer_entries_blob(&*self.conn()?, id)?)
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

    pub fn stats(&self) -> Result<Stats> {
        let t = meta::totals(&mut *self.conn()?)?;
        let mut s = Stats {
            layers: t.layers,
            chunks: t.chunks,
            packs: t.packs,
            logical_bytes: t.logical_bytes,
            content_bytes: t.content_bytes,
            stored_bytes: t.stored_bytes,
            metadata_bytes: t.metadata_bytes,
            disk_bytes: fsio::dir_size(&self.root)?,
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
}

/// Why `name` cannot be a tag, if it cannot: tags are non-empty and contain no whitespace or
/// control characters.
pub(crate) fn bad_tag(name: &str) -> Option<&'static str> {
    (name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()))
        .then_some("tags are non-empty and contain no whitespace or control characters")
}
