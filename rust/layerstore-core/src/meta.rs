//! Metadata: an SQLite database (WAL, `BEGIN IMMEDIATE`, `busy_timeout`) holding chunk
//! locations, layers, references between them, and import leases.
//!
//! Invariants: a row only ever points at pack bytes that were fsynced before the transaction
//! inserting it committed (`synchronous=FULL`). A layer's chunk set (`layer_chunk_sets`) is written
//! in the same transaction as the layer. `gc` deletes a chunk only when no layer references it
//! and no live import holds a lease. `delete_layer` refuses a layer a stack uses or a live
//! image import has pinned (`pins`, rows tied to a lease: a dead process's pins count for
//! nothing). Blob names know nothing of layers: this module owns references and garbage
//! collection, the pack files only bytes.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

pub mod chunked;
pub mod mounts;
pub mod oci;

use crate::cas::{ChunkLoc, Codec, LiveBlock};
use crate::digest::Blake3;
use crate::error::{Error, Result};
use crate::layer::{Entry, LayerInfo};
use crate::tar::TarSplit;

/// Version of the on-disk format (docs/format.md). Bump on any incompatible change.
pub const FORMAT_VERSION: u32 = 2;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS packs (
    name TEXT PRIMARY KEY,
    size INTEGER NOT NULL              -- committed length; bytes beyond are a torn tail
);
CREATE TABLE IF NOT EXISTS chunks (
    digest BLOB PRIMARY KEY,
    pack TEXT NOT NULL REFERENCES packs(name),
    block_offset INTEGER NOT NULL,
    block_len INTEGER NOT NULL,
    codec INTEGER NOT NULL,
    inner_offset INTEGER NOT NULL,
    len INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_by_pack ON chunks(pack);
CREATE TABLE IF NOT EXISTS layers (
    id TEXT PRIMARY KEY,               -- blake3:<hex> of the uncompressed tar
    diff_id TEXT NOT NULL UNIQUE,      -- sha256:<hex> of the same bytes
    tree_id TEXT NOT NULL,
    size INTEGER NOT NULL,
    entry_count INTEGER NOT NULL,
    compressed_digest TEXT,
    compression TEXT,
    created INTEGER NOT NULL,
    entries BLOB NOT NULL,             -- zstd(postcard(Vec<Entry>))
    split BLOB NOT NULL                -- zstd(postcard(TarSplit))
);
CREATE TABLE IF NOT EXISTS layer_chunk_sets (
    layer TEXT PRIMARY KEY REFERENCES layers(id),
    digests BLOB NOT NULL              -- the distinct chunks its entries name: sorted 32-byte digests
);
CREATE TABLE IF NOT EXISTS blob_digests (
    digest TEXT PRIMARY KEY,           -- a compressed blob this layer was imported from
    layer TEXT NOT NULL REFERENCES layers(id),
    compression TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS stacks (
    id INTEGER PRIMARY KEY,
    chain_id TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS stack_layers (
    stack INTEGER NOT NULL REFERENCES stacks(id),
    position INTEGER NOT NULL,
    layer TEXT NOT NULL REFERENCES layers(id),
    PRIMARY KEY (stack, position)
);
CREATE INDEX IF NOT EXISTS stack_layers_by_layer ON stack_layers(layer);
CREATE TABLE IF NOT EXISTS refs (
    name TEXT PRIMARY KEY,
    stack INTEGER NOT NULL REFERENCES stacks(id)
);
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY,
    pid INTEGER NOT NULL,
    start_time INTEGER NOT NULL,       -- the process's start time, so a reused pid is not alive
    pack TEXT NOT NULL,                -- a tar import's pack file, or an image import's tmp/ directory
    created INTEGER NOT NULL,
    seq INTEGER NOT NULL DEFAULT 0     -- settings.lease_seq when taken: orders leases by age
);
-- Layers an image import in flight uses (created or found), kept from `delete` until it ends.
CREATE TABLE IF NOT EXISTS pins (
    layer TEXT NOT NULL,               -- layers.id
    lease INTEGER NOT NULL,            -- leases.id of the import; a pin lives as long as its lease
    PRIMARY KEY (layer, lease)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pins_by_lease ON pins(lease);
-- OCI images (oci.rs): raw manifests and configs, images, compressed layer blobs.
CREATE TABLE IF NOT EXISTS oci_blobs (
    digest TEXT PRIMARY KEY,           -- sha256:<hex> of data
    media_type TEXT NOT NULL,
    data BLOB NOT NULL                 -- the manifest or config, byte for byte
);
CREATE TABLE IF NOT EXISTS oci_images (
    id INTEGER PRIMARY KEY,            -- larger = more recent
    manifest TEXT NOT NULL UNIQUE,     -- oci_blobs.digest
    config TEXT NOT NULL,              -- oci_blobs.digest
    chain_id TEXT NOT NULL,            -- the stack it describes
    descriptor BLOB NOT NULL,          -- its index entry (JSON)
    created INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS oci_images_by_chain ON oci_images(chain_id);
CREATE TABLE IF NOT EXISTS oci_layer_blobs (
    digest TEXT PRIMARY KEY,           -- sha256:<hex> of a compressed layer blob
    layer TEXT NOT NULL,               -- layers.id
    compression TEXT NOT NULL,         -- 'gzip' | 'zstd'
    size INTEGER NOT NULL,
    rebuild TEXT NOT NULL              -- 'kept': bytes in blobs/sha256/<hex>; 'stream' | 'pgzip': recompressing rebuilds them
);
CREATE INDEX IF NOT EXISTS oci_layer_blobs_by_layer ON oci_layer_blobs(layer);
CREATE TABLE IF NOT EXISTS oci_refs (
    name TEXT PRIMARY KEY,             -- a refs.name an image import tagged
    manifest TEXT NOT NULL             -- oci_images.manifest it was imported from
);
-- Unreferenced chunks `gc` could not delete because imports were in flight (one might have
-- deduplicated against them): deleted by a later `gc` once every live lease's seq is above
-- `after_lease`; an import never deduplicates against one (it stores its own copy).
CREATE TABLE IF NOT EXISTS doomed_chunks (
    digest BLOB PRIMARY KEY,
    after_lease INTEGER NOT NULL       -- settings.lease_seq when it was found unreferenced
) WITHOUT ROWID;
-- Layers `fsck --repair` found using damaged chunks (taken out of use): refused by every read
-- until an import stores those chunks again.
CREATE TABLE IF NOT EXISTS broken_layers (
    layer TEXT PRIMARY KEY,            -- layers.id
    chunks INTEGER NOT NULL            -- how many of its chunks were damaged
);
CREATE TABLE IF NOT EXISTS layer_history (
    layer TEXT PRIMARY KEY REFERENCES layers(id),
    created_by TEXT NOT NULL           -- the build step that made the layer (\"RUN ...\")
);
-- Mounts (meta/mounts.rs): live kernel or FUSE mounts of images, and the layers each uses.
CREATE TABLE IF NOT EXISTS mounts (
    id TEXT PRIMARY KEY,               -- the mount's directory under mounts/
    target TEXT NOT NULL,              -- where it is mounted (absolute)
    backend TEXT NOT NULL,             -- overlay | fuse
    writable INTEGER NOT NULL,
    owned INTEGER NOT NULL,            -- 1: lives while its owner holds mounts/ID.lock; 0: until umount
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS mount_layers (
    mount TEXT NOT NULL,               -- mounts.id
    pos INTEGER NOT NULL,              -- 0 = bottom
    layer TEXT NOT NULL,               -- layers.id
    snapshot TEXT,                     -- its snapshots/ directory (overlay backend)
    PRIMARY KEY (mount, pos)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS mount_layers_by_layer ON mount_layers(layer);
";

/// How long a connection waits for another process's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(60);

/// Switch to WAL. On a database another process is creating or switching at the same moment,
/// SQLite answers `SQLITE_BUSY` at once, without calling the busy handler: retry within the
/// busy timeout, as a lock wait would.
fn enable_wal(conn: &Connection) -> Result<()> {
    let started = std::time::Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && started.elapsed() < BUSY_TIMEOUT =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            other => return Ok(other?),
        }
    }
}

/// Open (creating if needed) the database at `path` with the pragmas the store relies on.
pub fn open(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    enable_wal(&conn)?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

/// Version 1 kept a layer's chunk set as one `layer_chunks` row per (layer, chunk) (110 bytes
/// each with its index); version 2 keeps it as one sorted blob per layer (32 bytes a chunk).
/// Rewritten in the opening transaction, so a store is either wholly version 1 or wholly 2.
fn migrate_from_v1(tx: &Connection) -> Result<()> {
    let mut sets: Vec<(String, Vec<u8>)> = Vec::new();
    {
        let mut stmt =
            tx.prepare("SELECT layer, digest FROM layer_chunks ORDER BY layer, digest")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let (layer, digest): (String, Vec<u8>) = (row.get(0)?, row.get(1)?);
            if digest.len() != 32 {
                return Err(Error::Corrupt("bad digest in layer_chunks".into()));
            }
            match sets.last_mut() {
                Some((last, blob)) if *last == layer => blob.extend_from_slice(&digest),
                _ => sets.push((layer, digest)),
            }
        }
    }
    for (layer, blob) in &sets {
        tx.execute(
            "INSERT INTO layer_chunk_sets (layer, digests) VALUES (?1, ?2)",
            params![layer, blob],
        )?;
    }
    tx.execute_batch(
        "DROP TABLE layer_chunks;
         UPDATE settings SET value = '2' WHERE key = 'format_version';",
    )?;
    Ok(())
}

/// Open the database at `path` for reading only. `immutable`: the files cannot change while
/// open (a read-only file system): SQLite then needs no shared-memory file, and ignores a
/// write-ahead log (whose commits a checkpoint has not yet folded in are not seen).
pub fn open_readonly(path: &Path, immutable: bool) -> Result<Connection> {
    // A URI, so that `mode` and `immutable` apply; the path's own `%`, `?` and `#` are escaped.
    let mut uri = String::from("file:");
    for c in path.to_string_lossy().chars() {
        match c {
            '%' => uri.push_str("%25"),
            '?' => uri.push_str("%3f"),
            '#' => uri.push_str("%23"),
            c => uri.push(c),
        }
    }
    uri.push_str(if immutable {
        "?mode=ro&immutable=1"
    } else {
        "?mode=ro"
    });
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
        | rusqlite::OpenFlags::SQLITE_OPEN_URI
        | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(&uri, flags)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(conn)
}

/// The settings of an existing store, checking its format version (nothing is written).
pub fn read_settings(conn: &Connection) -> Result<Vec<(String, String)>> {
    let mut stmt = conn.prepare("SELECT key, value FROM settings")?;
    let settings = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<Vec<(String, String)>>>()?;
    match settings.iter().find(|(k, _)| k == "format_version") {
        Some((_, v)) if *v == FORMAT_VERSION.to_string() => Ok(settings),
        Some((_, v)) => Err(Error::Conflict(format!(
            "store format version {v} cannot be read without upgrading it, and the store is read-only"
        ))),
        None => Err(Error::Corrupt("store settings have no format version".into())),
    }
}

/// Create the schema and settings on first use; check the format version afterwards.
pub fn init(conn: &mut Connection, defaults: &[(&str, String)]) -> Result<Vec<(String, String)>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch(SCHEMA)?;
    // Stores made before leases were ordered: their leases (seq 0) count as the oldest.
    let has_seq = tx
        .prepare("SELECT 1 FROM pragma_table_info('leases') WHERE name = 'seq'")?
        .exists([])?;
    if !has_seq {
        tx.execute_batch("ALTER TABLE leases ADD COLUMN seq INTEGER NOT NULL DEFAULT 0")?;
    }
    let version: Option<String> = tx
        .query_row(
            "SELECT value FROM settings WHERE key = 'format_version'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    match version {
        None => {
            tx.execute(
                "INSERT INTO settings (key, value) VALUES ('format_version', ?1)",
                [FORMAT_VERSION.to_string()],
            )?;
            for (k, v) in defaults {
                tx.execute(
                    "INSERT INTO settings (key, value) VALUES (?1, ?2)",
                    params![k, v],
                )?;
            }
        }
        Some(v) if v == FORMAT_VERSION.to_string() => {}
        Some(v) if v == "1" => migrate_from_v1(&tx)?,
        Some(v) => {
            return Err(Error::Conflict(format!(
            "store format version {v} is not supported (this build reads version {FORMAT_VERSION})"
        )))
        }
    }
    let mut stmt = tx.prepare("SELECT key, value FROM settings")?;
    let settings = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    drop(stmt);
    tx.commit()?;
    Ok(settings)
}

pub fn chunk_exists(conn: &Connection, digest: &Blake3) -> Result<bool> {
    let mut stmt = conn.prepare_cached("SELECT 1 FROM chunks WHERE digest = ?1")?;
    Ok(stmt.exists([&digest.0[..]])?)
}

/// Whether an import may deduplicate against the stored chunk `digest`: it exists and `gc` has
/// not doomed it (a doomed chunk may go while the import runs, so the import stores its own).
pub fn chunk_reusable(conn: &Connection, digest: &Blake3) -> Result<bool> {
    let mut stmt = conn.prepare_cached(
        "SELECT 1 FROM chunks WHERE digest = ?1
         AND NOT EXISTS (SELECT 1 FROM doomed_chunks WHERE digest = ?1)",
    )?;
    Ok(stmt.exists([&digest.0[..]])?)
}

type LocRow = (Vec<u8>, String, u64, u64, u8, u32, u32);

fn loc_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<LocRow> {
    LocRow::try_from(r)
}

fn make_loc(row: LocRow) -> Result<ChunkLoc> {
    let (digest, pack, block_offset, block_len, codec, inner_offset, len) = row;
    let digest: [u8; 32] = digest
        .try_into()
        .map_err(|_| Error::Corrupt("chunk digest of the wrong length".into()))?;
    Ok(ChunkLoc {
        digest: Blake3(digest),
        pack,
        block_offset,
        block_len,
        codec: Codec::from_u8(codec)?,
        inner_offset,
        len,
    })
}

const LOC_COLUMNS: &str = "digest, pack, block_offset, block_len, codec, inner_offset, len";

pub fn chunk_loc(conn: &Connection, digest: &Blake3) -> Result<Option<ChunkLoc>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {LOC_COLUMNS} FROM chunks WHERE digest = ?1"
    ))?;
    stmt.query_row([&digest.0[..]], loc_from_row)
        .optional()?
        .map(make_loc)
        .transpose()
}

/// Where each of `digests` lives (those stored; the others are absent from the map). Looked up
/// in batches, an order of magnitude faster than one query per chunk.
pub fn chunk_locs<'a>(
    conn: &Connection,
    digests: impl IntoIterator<Item = &'a Blake3>,
) -> Result<HashMap<Blake3, ChunkLoc>> {
    const BATCH: usize = 512;
    let mut wanted: Vec<&Blake3> = digests.into_iter().collect();
    wanted.sort_unstable();
    wanted.dedup();
    let mut locs = HashMap::with_capacity(wanted.len());
    for batch in wanted.chunks(BATCH) {
        let marks = vec!["?"; batch.len()].join(",");
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {LOC_COLUMNS} FROM chunks WHERE digest IN ({marks})"
        ))?;
        let keys = batch.iter().map(|d| &d.0[..]);
        for row in stmt.query_map(rusqlite::params_from_iter(keys), loc_from_row)? {
            let loc = make_loc(row?)?;
            locs.insert(loc.digest, loc);
        }
    }
    Ok(locs)
}

pub fn all_chunk_locs(conn: &Connection) -> Result<Vec<ChunkLoc>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {LOC_COLUMNS} FROM chunks ORDER BY pack, block_offset"
    ))?;
    let rows = stmt
        .query_map([], loc_from_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter().map(make_loc).collect()
}

/// The blocks of `pack` holding live chunks, in pack order, with their live bytes.
pub fn live_blocks(conn: &Connection, pack: &str) -> Result<Vec<LiveBlock>> {
    let mut stmt = conn.prepare_cached(
        "SELECT block_offset, block_len, codec, sum(len) FROM chunks WHERE pack = ?1 \
         GROUP BY block_offset ORDER BY block_offset",
    )?;
    let rows = stmt
        .query_map([pack], |r| <(u64, u64, u8, u64)>::try_from(r))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter()
        .map(|(offset, len, codec, live)| {
            Ok(LiveBlock {
                offset,
                len,
                codec: Codec::from_u8(codec)?,
                live,
            })
        })
        .collect()
}

/// The chunks stored in one block.
pub fn block_chunks(conn: &Connection, pack: &str, block_offset: u64) -> Result<Vec<ChunkLoc>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {LOC_COLUMNS} FROM chunks WHERE pack = ?1 AND block_offset = ?2 \
         ORDER BY inner_offset"
    ))?;
    let rows = stmt
        .query_map(params![pack, block_offset], loc_from_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter().map(make_loc).collect()
}

/// Point the chunks of a block `gc` rewrote at their new place.
pub fn move_chunks(conn: &Connection, locs: &[ChunkLoc]) -> Result<()> {
    write_locs(
        conn,
        "UPDATE chunks SET pack = ?2, block_offset = ?3, block_len = ?4, codec = ?5, \
         inner_offset = ?6, len = ?7 WHERE digest = ?1",
        locs,
    )
}

pub fn insert_chunks(conn: &Connection, locs: &[ChunkLoc]) -> Result<()> {
    write_locs(
        conn,
        &format!(
            "INSERT OR IGNORE INTO chunks ({LOC_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
        ),
        locs,
    )
}

/// Run `sql` once per location, with its columns as parameters in [`LOC_COLUMNS`] order.
fn write_locs(conn: &Connection, sql: &str, locs: &[ChunkLoc]) -> Result<()> {
    let mut stmt = conn.prepare_cached(sql)?;
    for l in locs {
        stmt.execute(params![
            &l.digest.0[..],
            l.pack,
            l.block_offset,
            l.block_len,
            l.codec as u8,
            l.inner_offset,
            l.len
        ])?;
    }
    Ok(())
}

/// A layer row as stored.
pub struct LayerRow {
    pub info: LayerInfo,
    pub entries: Vec<u8>,
    pub split: Vec<u8>,
}

const LAYER_COLUMNS: &str =
    "id, diff_id, tree_id, size, entry_count, compressed_digest, compression, created";

fn info_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<InfoRow> {
    InfoRow::try_from(r)
}

type InfoRow = (
    String,
    String,
    String,
    u64,
    u64,
    Option<String>,
    Option<String>,
    i64,
);

fn make_info(row: InfoRow) -> Result<LayerInfo> {
    let (id, diff_id, tree_id, size, entry_count, compressed_digest, compression, created) = row;
    Ok(LayerInfo {
        id: Blake3::parse(&id).map_err(|_| Error::Corrupt(format!("bad layer id {id:?}")))?,
        diff_id,
        tree_id: Blake3::parse(&tree_id)
            .map_err(|_| Error::Corrupt(format!("bad tree id {tree_id:?}")))?,
        size,
        entry_count,
        compressed_digest,
        compression,
        created_unix: created,
    })
}

pub fn layer_exists(conn: &Connection, id: &Blake3) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM layers WHERE id = ?1")?
        .exists([id.to_string()])?)
}

pub fn insert_layer(conn: &Connection, row: &LayerRow, chunk_set: &[Blake3]) -> Result<()> {
    let i = &row.info;
    conn.execute(
        &format!("INSERT INTO layers ({LAYER_COLUMNS}, entries, split) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"),
        params![
            i.id.to_string(),
            i.diff_id,
            i.tree_id.to_string(),
            i.size,
            i.entry_count,
            i.compressed_digest,
            i.compression,
            i.created_unix,
            row.entries,
            row.split
        ],
    )?;
    let digests: Vec<u8> = chunk_set.iter().flat_map(|d| d.0).collect();
    conn.execute(
        "INSERT OR IGNORE INTO layer_chunk_sets (layer, digests) VALUES (?1, ?2)",
        params![i.id.to_string(), digests],
    )?;
    Ok(())
}

pub fn insert_blob_digest(
    conn: &Connection,
    digest: &str,
    layer: &Blake3,
    compression: &str,
) -> Result<()> {
    conn.execute(
        "INSERT OR IGNORE INTO blob_digests (digest, layer, compression) VALUES (?1, ?2, ?3)",
        params![digest, layer.to_string(), compression],
    )?;
    Ok(())
}

/// Find a layer by `blake3:` id, `sha256:` diff_id, or the digest of a compressed blob it was
/// imported from. A unique hex prefix of the id or diff_id also works.
pub fn find_layer(conn: &Connection, key: &str) -> Result<LayerInfo> {
    let sql = format!(
        "SELECT {LAYER_COLUMNS} FROM layers WHERE id = ?1 OR diff_id = ?1
         UNION SELECT {cols} FROM layers JOIN blob_digests b ON b.layer = layers.id WHERE b.digest = ?1",
        cols = LAYER_COLUMNS.split(", ").map(|c| format!("layers.{c}")).collect::<Vec<_>>().join(", ")
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    if let Some(row) = stmt.query_row([key], info_from_row).optional()? {
        let mut info = make_info(row)?;
        // Found through a blob it was imported from: describe that blob.
        let blob: Option<String> = conn
            .prepare_cached("SELECT compression FROM blob_digests WHERE digest = ?1")?
            .query_row([key], |r| r.get(0))
            .optional()?;
        if let Some(compression) = blob {
            info.compressed_digest = Some(key.to_string());
            info.compression = Some(compression);
        }
        return Ok(info);
    }
    let hex_prefix = key.rsplit(':').next().unwrap_or(key);
    if hex_prefix.len() >= 6 && hex_prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {LAYER_COLUMNS} FROM layers WHERE substr(id, 8, ?2) = ?1 OR substr(diff_id, 8, ?2) = ?1 ORDER BY id LIMIT 6"
        ))?;
        let rows = stmt
            .query_map(params![hex_prefix, hex_prefix.len()], info_from_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        if rows.len() == 1 {
            return make_info(rows.into_iter().next().expect("one row"));
        }
        if rows.len() > 1 {
            let mut candidates: Vec<String> = rows.into_iter().map(|r| r.0).collect();
            if candidates.len() > 5 {
                candidates.truncate(5);
                candidates.push("…".into());
            }
            return Err(Error::Ambiguous {
                what: "layer prefix",
                prefix: key.to_string(),
                candidates,
            });
        }
    }
    Err(Error::NotFound(format!("no layer {key:?}")))
}

/// A layer by its exact `blake3:` id (one indexed query; for ids the store itself recorded).
pub fn layer_by_id(conn: &Connection, id: &str) -> Result<LayerInfo> {
    let mut stmt =
        conn.prepare_cached(&format!("SELECT {LAYER_COLUMNS} FROM layers WHERE id = ?1"))?;
    match stmt.query_row([id], info_from_row).optional()? {
        Some(row) => make_info(row),
        None => Err(Error::NotFound(format!("no layer {id:?}"))),
    }
}

pub fn list_layers(conn: &Connection) -> Result<Vec<LayerInfo>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {LAYER_COLUMNS} FROM layers ORDER BY created, id"
    ))?;
    let rows = stmt
        .query_map([], info_from_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter().map(make_info).collect()
}

pub fn layer_blobs(conn: &Connection, id: &Blake3) -> Result<(Vec<u8>, Vec<u8>)> {
    conn.query_row(
        "SELECT entries, split FROM layers WHERE id = ?1",
        [id.to_string()],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .optional()?
    .ok_or_else(|| Error::NotFound(format!("no layer {id}")))
}

/// A layer's entry list blob alone (a stack needs no recipe).
pub fn layer_entries_blob(conn: &Connection, id: &Blake3) -> Result<Vec<u8>> {
    conn.query_row(
        "SELECT entries FROM layers WHERE id = ?1",
        [id.to_string()],
        |r| r.get(0),
    )
    .optional()?
    .ok_or_else(|| Error::NotFound(format!("no layer {id}")))
}

pub fn layer_chunk_set(conn: &Connection, id: &Blake3) -> Result<Vec<Blake3>> {
    let blob: Option<Vec<u8>> = conn
        .query_row(
            "SELECT digests FROM layer_chunk_sets WHERE layer = ?1",
            [id.to_string()],
            |r| r.get(0),
        )
        .optional()?;
    decode_chunk_set(&blob.unwrap_or_default())
}

fn decode_chunk_set(blob: &[u8]) -> Result<Vec<Blake3>> {
    if !blob.len().is_multiple_of(32) {
        return Err(Error::Corrupt(
            "chunk set of a length not a multiple of 32".into(),
        ));
    }
    Ok(blob
        .chunks_exact(32)
        .map(|d| Blake3(d.try_into().expect("32 bytes")))
        .collect())
}

/// How many damaged chunks make layer `id` broken (0: it is not).
pub fn broken_chunks(conn: &Connection, id: &Blake3) -> Result<u64> {
    let mut stmt = conn.prepare_cached("SELECT chunks FROM broken_layers WHERE layer = ?1")?;
    let n: Option<i64> = stmt.query_row([id.to_string()], |r| r.get(0)).optional()?;
    Ok(n.unwrap_or(0) as u64)
}

/// Every broken layer with its count of damaged chunks.
pub fn broken_layers(conn: &Connection) -> Result<Vec<(String, u64)>> {
    let mut stmt = conn.prepare("SELECT layer, chunks FROM broken_layers ORDER BY layer")?;
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

/// In `tx`: take `chunks` out of use (their rows go, so the next import of their content
/// stores them again) and mark each of `layers` broken with its count of damaged chunks.
pub fn retire_damaged(tx: &Connection, chunks: &[Blake3], layers: &[(String, u64)]) -> Result<()> {
    let mut delete = tx.prepare_cached("DELETE FROM chunks WHERE digest = ?1")?;
    for c in chunks {
        delete.execute([&c.0[..]])?;
    }
    let mut mark = tx.prepare_cached(
        "INSERT INTO broken_layers (layer, chunks) VALUES (?1, ?2)
         ON CONFLICT (layer) DO UPDATE SET chunks = chunks + excluded.chunks",
    )?;
    for (layer, n) in layers {
        mark.execute(params![layer, *n as i64])?;
    }
    Ok(())
}

/// In `tx`: clear the mark of every broken layer whose chunks are all stored again (or that is
/// gone); returns the layers healed.
pub fn heal_broken(tx: &Connection) -> Result<Vec<String>> {
    let broken = broken_layers(tx)?;
    let mut healed = Vec::new();
    for (layer, _) in broken {
        let whole = match Blake3::parse(&layer) {
            Ok(id) => all_chunks_stored(tx, &id)?,
            Err(_) => true,
        };
        if whole {
            tx.execute("DELETE FROM broken_layers WHERE layer = ?1", [&layer])?;
            healed.push(layer);
        }
    }
    Ok(healed)
}

/// The layers whose content uses chunk `digest` (a scan: for error messages only).
pub fn layers_using_chunk(conn: &Connection, digest: &Blake3) -> Result<Vec<String>> {
    let mut stmt = conn.prepare("SELECT layer, digests FROM layer_chunk_sets ORDER BY layer")?;
    let mut rows = stmt.query([])?;
    let mut users = Vec::new();
    while let Some(row) = rows.next()? {
        let set = decode_chunk_set(row.get_ref(1)?.as_blob().map_err(rusqlite::Error::from)?)?;
        if set.binary_search(digest).is_ok() {
            users.push(row.get(0)?);
        }
    }
    Ok(users)
}

fn all_chunks_stored(conn: &Connection, id: &Blake3) -> Result<bool> {
    for c in layer_chunk_set(conn, id)? {
        if !chunk_exists(conn, &c)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Every chunk some layer names (what `gc` must keep).
pub fn referenced_chunks(conn: &Connection) -> Result<std::collections::HashSet<Blake3>> {
    let mut stmt = conn.prepare("SELECT digests FROM layer_chunk_sets")?;
    let mut rows = stmt.query([])?;
    let mut all = std::collections::HashSet::new();
    while let Some(row) = rows.next()? {
        let blob = row.get_ref(0)?.as_blob().map_err(rusqlite::Error::from)?;
        all.extend(decode_chunk_set(blob)?);
    }
    Ok(all)
}

/// `gc`'s sweep of the chunk rows no layer names, in the caller's transaction. With no import
/// in flight (`oldest_live`, the smallest `seq` of the live leases, is `None`) every one goes.
/// Otherwise one goes only if an earlier sweep doomed it before every live lease began (no live import can have deduplicated against
/// it: imports skip doomed chunks); the others are doomed now, to go in a later sweep.
/// Returns (deleted, kept).
pub fn sweep_unreferenced_chunks(
    conn: &Connection,
    oldest_live: Option<i64>,
) -> Result<(u64, u64)> {
    let keep = referenced_chunks(conn)?;
    let mut doomed: HashMap<Vec<u8>, i64> = HashMap::new();
    {
        let mut stmt = conn.prepare("SELECT digest, after_lease FROM doomed_chunks")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            doomed.insert(row.get(0)?, row.get(1)?);
        }
    }
    let mut dead: Vec<Vec<u8>> = Vec::new();
    {
        let mut stmt = conn.prepare("SELECT digest FROM chunks")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let digest = row.get_ref(0)?.as_blob().map_err(rusqlite::Error::from)?;
            let known = <[u8; 32]>::try_from(digest).is_ok_and(|d| keep.contains(&Blake3(d)));
            if !known {
                dead.push(digest.to_vec());
            }
        }
    }
    // Doomed chunks a layer took up again are safe.
    let mut undoom = conn.prepare_cached("DELETE FROM doomed_chunks WHERE digest = ?1")?;
    for digest in doomed.keys() {
        let referenced =
            <[u8; 32]>::try_from(digest.as_slice()).is_ok_and(|d| keep.contains(&Blake3(d)));
        if referenced {
            undoom.execute([digest])?;
        }
    }
    let newest = lease_seq(conn)?;
    let mut delete = conn.prepare_cached("DELETE FROM chunks WHERE digest = ?1")?;
    let mut doom = conn.prepare_cached(
        "INSERT OR IGNORE INTO doomed_chunks (digest, after_lease) VALUES (?1, ?2)",
    )?;
    let (mut deleted, mut kept) = (0, 0);
    for digest in &dead {
        let goes = match (oldest_live, doomed.get(digest)) {
            (None, _) => true,
            (Some(oldest), Some(&after)) => after < oldest,
            (Some(_), None) => false,
        };
        if goes {
            delete.execute([digest])?;
            undoom.execute([digest])?;
            deleted += 1;
        } else {
            doom.execute(params![digest, newest])?;
            kept += 1;
        }
    }
    Ok((deleted, kept))
}

/// Delete a layer unless a stack or tag uses it, or a live import other than `owner` (the
/// caller's own lease, whose pins do not count) has pinned it. Its chunks stay until `gc`.
pub fn delete_layer(
    conn: &mut Connection,
    id: &Blake3,
    owner: Option<i64>,
    alive: Alive<'_>,
) -> Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let key = id.to_string();
    let users: i64 = tx.query_row(
        "SELECT count(*) FROM stack_layers WHERE layer = ?1",
        [&key],
        |r| r.get(0),
    )?;
    if users > 0 {
        return Err(Error::Conflict(format!(
            "layer {id} is used by {users} stack(s); untag or delete them first"
        )));
    }
    if let Some(target) = mounts::mounted_at(&tx, &key)? {
        return Err(Error::Conflict(format!(
            "layer {id} is mounted at {target}; unmount it first"
        )));
    }
    let imports = live_pins(&tx, &key, owner, alive)?;
    if imports > 0 {
        return Err(Error::LayerPinned {
            layer: key,
            imports,
        });
    }
    // What is left are the owner's pins and those of dead processes.
    tx.execute("DELETE FROM pins WHERE layer = ?1", [&key])?;
    tx.execute("DELETE FROM layer_chunk_sets WHERE layer = ?1", [&key])?;
    tx.execute("DELETE FROM blob_digests WHERE layer = ?1", [&key])?;
    tx.execute("DELETE FROM layer_history WHERE layer = ?1", [&key])?;
    if tx.execute("DELETE FROM layers WHERE id = ?1", [&key])? == 0 {
        return Err(Error::NotFound(format!("no layer {id}")));
    }
    tx.commit()?;
    Ok(())
}

/// Record (or replace) what made a layer.
pub fn set_created_by(conn: &Connection, id: &Blake3, created_by: &str) -> Result<()> {
    conn.execute(
        "INSERT INTO layer_history (layer, created_by) VALUES (?1, ?2)
         ON CONFLICT(layer) DO UPDATE SET created_by = excluded.created_by",
        params![id.to_string(), created_by],
    )?;
    Ok(())
}

pub fn created_by(conn: &Connection, id: &Blake3) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT created_by FROM layer_history WHERE layer = ?1")?
        .query_row([id.to_string()], |r| r.get(0))
        .optional()?)
}

/// Begin a read transaction: the lookups until [`end_read`] see one snapshot.
pub fn begin_read(conn: &Connection) -> Result<()> {
    conn.execute_batch("BEGIN DEFERRED")?;
    Ok(())
}

/// End the read transaction [`begin_read`] began.
pub fn end_read(conn: &Connection) -> Result<()> {
    conn.execute_batch("COMMIT")?;
    Ok(())
}

/// Totals over the whole store, read in one snapshot.
#[derive(Debug, Default, Clone)]
pub struct Totals {
    pub layers: u64,
    pub chunks: u64,
    pub packs: u64,
    /// Uncompressed tar bytes of every layer.
    pub logical_bytes: u64,
    /// Bytes of every distinct chunk.
    pub content_bytes: u64,
    /// Stored bytes of the blocks holding live chunks.
    pub stored_bytes: u64,
    /// Encoded entry lists and tar recipes.
    pub metadata_bytes: u64,
}

pub fn totals(conn: &mut Connection) -> Result<Totals> {
    let tx = conn.transaction()?;
    let one = |sql: &str| -> Result<u64> {
        Ok(tx
            .query_row(sql, [], |r| r.get::<_, Option<i64>>(0))?
            .unwrap_or(0) as u64)
    };
    let totals = Totals {
        layers: one("SELECT count(*) FROM layers")?,
        chunks: one("SELECT count(*) FROM chunks")?,
        packs: one("SELECT count(*) FROM packs")?,
        logical_bytes: one("SELECT sum(size) FROM layers")?,
        content_bytes: one("SELECT sum(len) FROM chunks")?,
        stored_bytes: one(
            "SELECT sum(block_len) FROM (SELECT DISTINCT pack, block_offset, block_len FROM chunks)",
        )?,
        metadata_bytes: one("SELECT sum(length(entries) + length(split)) FROM layers")?,
    };
    tx.commit()?;
    Ok(totals)
}

/// Forget a pack (its chunks must have gone or moved).
pub fn delete_pack(conn: &Connection, name: &str) -> Result<()> {
    conn.execute("DELETE FROM packs WHERE name = ?1", [name])?;
    Ok(())
}

/// Record a pack's committed length.
pub fn set_pack_size(conn: &Connection, name: &str, size: u64) -> Result<()> {
    conn.execute(
        "UPDATE packs SET size = ?1 WHERE name = ?2",
        params![size, name],
    )?;
    Ok(())
}

/// Point the chunks of the block at `from` (pack, offset) at its copy at `to`.
pub fn move_block(conn: &Connection, from: (&str, u64), to: (&str, u64)) -> Result<()> {
    conn.prepare_cached(
        "UPDATE chunks SET pack = ?1, block_offset = ?2 WHERE pack = ?3 AND block_offset = ?4",
    )?
    .execute(params![to.0, to.1, from.0, from.1])?;
    Ok(())
}

/// Fold the write-ahead log back into the database file and truncate it.
pub fn checkpoint(conn: &Connection) -> Result<()> {
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?;
    Ok(())
}

pub fn insert_pack(conn: &Connection, name: &str, size: u64) -> Result<()> {
    conn.execute(
        "INSERT INTO packs (name, size) VALUES (?1, ?2)",
        params![name, size],
    )?;
    Ok(())
}

pub fn packs(conn: &Connection) -> Result<Vec<(String, u64)>> {
    let mut stmt = conn.prepare("SELECT name, size FROM packs ORDER BY name")?;
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

/// Record a lease on `pack` for this process (its pid and start time, so a reused pid differs).
pub fn acquire_lease(conn: &Connection, pack: &str) -> Result<i64> {
    let pid = std::process::id();
    let start = crate::owner::process_start_time(pid).unwrap_or(0);
    let tx = conn.unchecked_transaction()?;
    let seq = next_lease_seq(&tx)?;
    tx.execute(
        "INSERT INTO leases (pid, start_time, pack, created, seq) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![pid, start, pack, now(), seq],
    )?;
    let id = tx.last_insert_rowid();
    tx.commit()?;
    Ok(id)
}

/// The next value of the store's lease counter (never reused, unlike row ids).
fn next_lease_seq(tx: &Connection) -> Result<i64> {
    let bumped: Option<i64> = tx
        .query_row(
            "UPDATE settings SET value = CAST(value AS INTEGER) + 1 WHERE key = 'lease_seq'
             RETURNING CAST(value AS INTEGER)",
            [],
            |r| r.get(0),
        )
        .optional()?;
    match bumped {
        Some(seq) => Ok(seq),
        None => {
            tx.execute(
                "INSERT INTO settings (key, value) VALUES ('lease_seq', '1')",
                [],
            )?;
            Ok(1)
        }
    }
}

/// The lease counter's current value (0 before any lease).
fn lease_seq(conn: &Connection) -> Result<i64> {
    let v: Option<String> = conn
        .query_row(
            "SELECT value FROM settings WHERE key = 'lease_seq'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    Ok(v.and_then(|v| v.parse().ok()).unwrap_or(0))
}

/// End a lease and drop the pins it holds.
pub fn release_lease(conn: &Connection, id: i64) -> Result<()> {
    conn.execute("DELETE FROM pins WHERE lease = ?1", [id])?;
    conn.execute("DELETE FROM leases WHERE id = ?1", [id])?;
    Ok(())
}

/// A lease as recorded: who took it, and what it covers.
#[derive(Clone, Debug)]
pub struct LeaseRow {
    pub id: i64,
    pub pid: u32,
    pub start_time: u64,
    /// The pack file or `tmp/` directory the lease covers (it also names its lock file).
    pub name: String,
    /// Its place in the order leases were taken (0: taken by a build before the order).
    pub seq: i64,
}

fn lease_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<LeaseRow> {
    Ok(LeaseRow {
        id: r.get(0)?,
        pid: r.get(1)?,
        start_time: r.get(2)?,
        name: r.get(3)?,
        seq: r.get(4)?,
    })
}

/// Whether the owner of a lease still runs: asked by the caller (see `lease::alive`).
pub type Alive<'a> = &'a dyn Fn(&LeaseRow) -> bool;

/// Pin layer `id` for the import holding `lease`, in the caller's transaction. The caller
/// checks in that same transaction that the layer exists, so a concurrent `delete` either ran
/// before (and the layer is imported again) or sees the pin.
pub fn pin_layer(conn: &Connection, lease: i64, id: &Blake3) -> Result<()> {
    conn.prepare_cached("INSERT OR IGNORE INTO pins (layer, lease) VALUES (?1, ?2)")?
        .execute(params![id.to_string(), lease])?;
    Ok(())
}

/// How many live leases other than `owner` pin the layer `key`.
fn live_pins(conn: &Connection, key: &str, owner: Option<i64>, alive: Alive<'_>) -> Result<usize> {
    let mut stmt = conn.prepare_cached(
        "SELECT leases.id, leases.pid, leases.start_time, leases.pack, leases.seq FROM pins
         JOIN leases ON leases.id = pins.lease WHERE pins.layer = ?1",
    )?;
    let holders = stmt
        .query_map([key], lease_from_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(holders
        .into_iter()
        .filter(|l| Some(l.id) != owner && alive(l))
        .count())
}

/// Drop leases whose owner is gone (and their pins); return the live ones.
pub fn live_leases(conn: &Connection, alive: Alive<'_>) -> Result<Vec<LeaseRow>> {
    let mut stmt = conn.prepare("SELECT id, pid, start_time, pack, seq FROM leases")?;
    let rows = stmt
        .query_map([], lease_from_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut live = Vec::new();
    for row in rows {
        if alive(&row) {
            live.push(row);
        } else {
            release_lease(conn, row.id)?;
        }
    }
    conn.execute(
        "DELETE FROM pins WHERE lease NOT IN (SELECT id FROM leases)",
        [],
    )?;
    Ok(live)
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Record a stack (reusing an identical one) and point `name` at it, in one transaction.
pub fn set_ref(conn: &mut Connection, name: &str, chain_id: &str, layers: &[Blake3]) -> Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    put_ref(&tx, name, chain_id, layers)?;
    tx.commit()?;
    Ok(())
}

/// [`set_ref`] inside a transaction the caller holds (and commits).
pub fn put_ref(tx: &Connection, name: &str, chain_id: &str, layers: &[Blake3]) -> Result<()> {
    let existing: Option<i64> = tx
        .query_row(
            "SELECT id FROM stacks WHERE chain_id = ?1",
            [chain_id],
            |r| r.get(0),
        )
        .optional()?;
    let stack = match existing {
        Some(id) => id,
        None => {
            tx.execute("INSERT INTO stacks (chain_id) VALUES (?1)", [chain_id])?;
            let id = tx.last_insert_rowid();
            let mut stmt = tx
                .prepare("INSERT INTO stack_layers (stack, position, layer) VALUES (?1, ?2, ?3)")?;
            for (pos, layer) in layers.iter().enumerate() {
                stmt.execute(params![id, pos as i64, layer.to_string()])
                    .map_err(|e| match e {
                        rusqlite::Error::SqliteFailure(f, _)
                            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
                        {
                            Error::NotFound(format!("layer {layer} is not in the store"))
                        }
                        other => Error::Database(other),
                    })?;
            }
            id
        }
    };
    let old: Option<i64> = tx
        .query_row("SELECT stack FROM refs WHERE name = ?1", [name], |r| {
            r.get(0)
        })
        .optional()?;
    tx.execute(
        "INSERT OR REPLACE INTO refs (name, stack) VALUES (?1, ?2)",
        params![name, stack],
    )?;
    if let Some(old) = old.filter(|&o| o != stack) {
        drop_stack_if_unused(tx, old)?;
    }
    Ok(())
}

fn drop_stack_if_unused(conn: &Connection, stack: i64) -> Result<()> {
    let users: i64 =
        conn.query_row("SELECT count(*) FROM refs WHERE stack = ?1", [stack], |r| {
            r.get(0)
        })?;
    if users == 0 {
        conn.execute("DELETE FROM stack_layers WHERE stack = ?1", [stack])?;
        conn.execute("DELETE FROM stacks WHERE id = ?1", [stack])?;
    }
    Ok(())
}

/// The layer ids (bottom first) of the stack `name` points at.
pub fn get_ref(conn: &Connection, name: &str) -> Result<Vec<String>> {
    let stack: i64 = conn
        .query_row("SELECT stack FROM refs WHERE name = ?1", [name], |r| {
            r.get(0)
        })
        .optional()?
        .ok_or_else(|| Error::NotFound(format!("no image tagged {name:?}")))?;
    let mut stmt =
        conn.prepare_cached("SELECT layer FROM stack_layers WHERE stack = ?1 ORDER BY position")?;
    let rows = stmt
        .query_map([stack], |r| r.get(0))?
        .collect::<rusqlite::Result<Vec<String>>>()?;
    Ok(rows)
}

pub fn list_refs(conn: &Connection) -> Result<Vec<String>> {
    let mut stmt = conn.prepare("SELECT name FROM refs ORDER BY name")?;
    let rows = stmt
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<Vec<String>>>()?;
    Ok(rows)
}

pub fn delete_ref(conn: &mut Connection, name: &str) -> Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let stack: i64 = tx
        .query_row("SELECT stack FROM refs WHERE name = ?1", [name], |r| {
            r.get(0)
        })
        .optional()?
        .ok_or_else(|| Error::NotFound(format!("no image tagged {name:?}")))?;
    tx.execute("DELETE FROM refs WHERE name = ?1", [name])?;
    drop_stack_if_unused(&tx, stack)?;
    tx.commit()?;
    Ok(())
}

/// A layer's database row and the set of chunks its entries name.
pub fn layer_row(
    info: LayerInfo,
    entries: &[Entry],
    split: &TarSplit,
) -> Result<(LayerRow, Vec<Blake3>)> {
    layer_row_with(info, entries, crate::layer::encode_blob(split)?)
}

/// [`layer_row`] with the split already encoded (by [`encode_blob`]).
pub fn layer_row_with(
    info: LayerInfo,
    entries: &[Entry],
    split: Vec<u8>,
) -> Result<(LayerRow, Vec<Blake3>)> {
    let mut chunk_set: Vec<Blake3> = entries
        .iter()
        .flat_map(|e| e.chunks.iter().map(|c| c.digest))
        .collect();
    chunk_set.sort_unstable();
    chunk_set.dedup();
    let row = LayerRow {
        info,
        entries: crate::layer::encode_blob(&entries)?,
        split,
    };
    Ok((row, chunk_set))
}

/// In the caller's transaction: the pack a layer's import wrote (if any) and the layer itself,
/// unless a layer with its id exists (returns whether it did).
pub fn insert_layer_and_pack(
    tx: &Connection,
    pack_name: &str,
    pack: Option<&(Vec<ChunkLoc>, u64)>,
    row: &LayerRow,
    chunk_set: &[Blake3],
) -> Result<bool> {
    if let Some((locs, size)) = pack {
        insert_pack(tx, pack_name, *size)?;
        insert_chunks(tx, locs)?;
        // Chunks `fsck --repair` took out of use may be among them.
        heal_broken(tx)?;
    }
    let existed = layer_exists(tx, &row.info.id)?;
    if !existed {
        insert_layer(tx, row, chunk_set)?;
    }
    Ok(existed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_layer(conn: &Connection, hex: &str) {
        let digest = Blake3::parse(&format!("blake3:{hex}")).unwrap();
        let row = LayerRow {
            info: LayerInfo {
                id: digest,
                diff_id: format!("sha256:{hex}"),
                tree_id: digest,
                size: 0,
                entry_count: 0,
                compressed_digest: None,
                compression: None,
                created_unix: 0,
            },
            entries: Vec::new(),
            split: Vec::new(),
        };
        insert_layer(conn, &row, &[]).unwrap();
    }

    #[test]
    fn an_ambiguous_prefix_names_its_candidates() {
        let dir = std::env::temp_dir().join(format!("ls-meta-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut conn = open(&dir.join("meta.db")).unwrap();
        init(&mut conn, &[]).unwrap();
        let a = format!("abcdef01{}", "0".repeat(56));
        let b = format!("abcdef02{}", "0".repeat(56));
        fake_layer(&conn, &a);
        fake_layer(&conn, &b);
        let err = find_layer(&conn, "abcdef").unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Ambiguous);
        let text = err.to_string();
        assert!(text.contains(&a) && text.contains(&b), "{text}");
        assert_eq!(
            find_layer(&conn, "abcdef01").unwrap().diff_id,
            format!("sha256:{a}")
        );
        assert_eq!(
            find_layer(&conn, "abcdef03").unwrap_err().kind(),
            crate::ErrorKind::NotFound
        );
        drop(conn);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
