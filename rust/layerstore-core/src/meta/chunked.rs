//! The zstd:chunked tables: the descriptor annotations of the zstd:chunked blobs the store can
//! rebuild, and a sha256 → chunk index for chunks that left or arrived in such blobs.
//!
//! Invariants: the tables are created on first use (`CREATE TABLE IF NOT EXISTS`), so a store
//! that never saw a zstd:chunked blob has none. An index row is a hint, never a proof: it names
//! a BLAKE3 the store computed itself for bytes whose sha256 it also computed, and a reader still
//! finds the chunk through `chunks` (which `gc` keeps honest) and checks what it rebuilds.
//! Rows whose chunk or blob is gone are left behind: a lookup that finds no chunk finds nothing.

use std::collections::{BTreeMap, HashMap};

use rusqlite::{params, Connection, OptionalExtension};

use crate::digest::Blake3;
use crate::error::{Error, Result};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS zstd_chunked_blobs (
    digest TEXT PRIMARY KEY,
    annotations TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS chunk_sha256 (
    sha256 BLOB PRIMARY KEY,
    chunk BLOB NOT NULL
) WITHOUT ROWID;
";

fn ensure(conn: &Connection) -> Result<()> {
    conn.execute_batch(SCHEMA)?;
    Ok(())
}

/// Whether the tables exist (a read-only store that never saw one has none).
fn exist(conn: &Connection) -> Result<bool> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'chunk_sha256'",
            [],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

/// Record the annotations of zstd:chunked blob `digest`.
pub fn put_annotations(
    conn: &Connection,
    digest: &str,
    annotations: &BTreeMap<String, String>,
) -> Result<()> {
    ensure(conn)?;
    let json = serde_json::to_string(annotations).expect("a map of strings serialises");
    conn.execute(
        "INSERT OR REPLACE INTO zstd_chunked_blobs (digest, annotations) VALUES (?1, ?2)",
        params![digest, json],
    )?;
    Ok(())
}

/// The annotations recorded for zstd:chunked blob `digest`.
pub fn annotations(conn: &Connection, digest: &str) -> Result<Option<BTreeMap<String, String>>> {
    if !exist(conn)? {
        return Ok(None);
    }
    let json: Option<String> = conn
        .query_row(
            "SELECT annotations FROM zstd_chunked_blobs WHERE digest = ?1",
            [digest],
            |r| r.get(0),
        )
        .optional()?;
    json.map(|j| {
        serde_json::from_str(&j)
            .map_err(|e| Error::Corrupt(format!("annotations of {digest}: {e}")))
    })
    .transpose()
}

/// Index chunks by sha256: (sha256, the BLAKE3 the store names the chunk by).
pub fn put_sha256(conn: &Connection, chunks: &[([u8; 32], Blake3)]) -> Result<()> {
    if chunks.is_empty() {
        return Ok(());
    }
    ensure(conn)?;
    let mut stmt =
        conn.prepare_cached("INSERT OR IGNORE INTO chunk_sha256 (sha256, chunk) VALUES (?1, ?2)")?;
    for (sha, b3) in chunks {
        stmt.execute(params![&sha[..], &b3.0[..]])?;
    }
    Ok(())
}

/// The BLAKE3 names indexed for these sha256 digests (those the index has).
pub fn by_sha256<'a>(
    conn: &Connection,
    shas: impl IntoIterator<Item = &'a [u8; 32]>,
) -> Result<HashMap<[u8; 32], Blake3>> {
    let mut out = HashMap::new();
    if !exist(conn)? {
        return Ok(out);
    }
    let mut stmt = conn.prepare_cached("SELECT chunk FROM chunk_sha256 WHERE sha256 = ?1")?;
    for sha in shas {
        let found: Option<Vec<u8>> = stmt.query_row([&sha[..]], |r| r.get(0)).optional()?;
        if let Some(b) = found {
            let b: [u8; 32] = b
                .try_into()
                .map_err(|_| Error::Corrupt("chunk_sha256: a BLAKE3 of the wrong length".into()))?;
            out.insert(*sha, Blake3(b));
        }
    }
    Ok(out)
}

/// A blob of `layer` the store rebuilds with `rebuild` (the zstd:chunked writer's name).
pub fn layer_blob(conn: &Connection, layer: &str, rebuild: &str) -> Result<Option<String>> {
    Ok(conn
        .query_row(
            "SELECT digest FROM oci_layer_blobs WHERE layer = ?1 AND rebuild = ?2
             ORDER BY digest LIMIT 1",
            params![layer, rebuild],
            |r| r.get(0),
        )
        .optional()?)
}
