//! The OCI tables: raw manifests and configs, images, their refs, and compressed layer blobs.
//!
//! Invariants: `oci_blobs` holds manifests and configs byte for byte under the digest of those
//! bytes; an `oci_images` row ties a manifest to the ChainID of the stack it describes; a ref
//! names the image an import tagged; an `oci_layer_blobs` row says how the store rebuilds a
//! compressed blob of a layer (`kept` bytes under `blobs/`, or recompression).

use rusqlite::{params, Connection, OptionalExtension};

use crate::error::{Error, Result};
use crate::layer::ImageDigests;

fn digests_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ImageDigests> {
    Ok(ImageDigests {
        manifest: r.get(0)?,
        config: r.get(1)?,
        media_type: r.get(2)?,
    })
}

/// The image an import tagged `name` with, if the tag still names a stack of that ChainID.
pub fn image_for_ref(
    conn: &Connection,
    name: &str,
    chain_id: &str,
) -> Result<Option<ImageDigests>> {
    Ok(conn
        .query_row(
            "SELECT i.manifest, i.config, b.media_type FROM oci_refs r
             JOIN oci_images i ON i.manifest = r.manifest JOIN oci_blobs b ON b.digest = i.manifest
             WHERE r.name = ?1 AND i.chain_id = ?2",
            [name, chain_id],
            digests_row,
        )
        .optional()?)
}

/// The image recorded for a ChainID when every image recorded for it has one config (the
/// latest manifest of it: they differ only in how layers are compressed); None when images of
/// different configs share the layers (a config-only build over an image): a bare stack of
/// those layers is none of them.
pub fn sole_image(conn: &Connection, chain_id: &str) -> Result<Option<ImageDigests>> {
    Ok(conn
        .query_row(
            "SELECT i.manifest, i.config, b.media_type FROM oci_images i
             JOIN oci_blobs b ON b.digest = i.manifest
             WHERE i.chain_id = ?1
               AND (SELECT COUNT(DISTINCT config) FROM oci_images WHERE chain_id = ?1) = 1
             ORDER BY i.id DESC LIMIT 1",
            [chain_id],
            digests_row,
        )
        .optional()?)
}

/// A recorded manifest or config: (media type, bytes).
pub fn blob(conn: &Connection, digest: &str) -> Result<(String, Vec<u8>)> {
    conn.query_row(
        "SELECT media_type, data FROM oci_blobs WHERE digest = ?1",
        [digest],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .optional()?
    .ok_or_else(|| Error::Corrupt(format!("recorded blob {digest} is missing")))
}

/// The index entry (descriptor JSON) recorded with a manifest.
pub fn descriptor(conn: &Connection, manifest: &str) -> Result<Option<Vec<u8>>> {
    Ok(conn
        .query_row(
            "SELECT descriptor FROM oci_images WHERE manifest = ?1",
            [manifest],
            |r| r.get(0),
        )
        .optional()?)
}

/// A compressed blob of `layer` in `compression`: (digest, rebuild), preferring one rebuilt by
/// recompression (no bytes kept) over a kept one.
pub fn preferred_layer_blob(
    conn: &Connection,
    layer: &str,
    compression: &str,
) -> Result<Option<(String, String)>> {
    Ok(conn
        .query_row(
            "SELECT digest, rebuild FROM oci_layer_blobs WHERE layer = ?1 AND compression = ?2
             ORDER BY rebuild = 'kept', digest LIMIT 1",
            params![layer, compression],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?)
}

/// How a compressed layer blob is known: (compression, rebuild).
pub fn layer_blob(conn: &Connection, digest: &str) -> Result<Option<(String, String)>> {
    Ok(conn
        .prepare_cached("SELECT compression, rebuild FROM oci_layer_blobs WHERE digest = ?1")?
        .query_row([digest], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?)
}

/// The recorded size of a compressed layer blob.
pub fn layer_blob_size(conn: &Connection, digest: &str) -> Result<Option<u64>> {
    Ok(conn
        .query_row(
            "SELECT size FROM oci_layer_blobs WHERE digest = ?1",
            [digest],
            |r| r.get::<_, u64>(0),
        )
        .optional()?)
}

/// A compressed blob known for a layer: one it was imported from, or one an export or pull
/// recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownBlob {
    /// `sha256:<hex>` of the compressed bytes.
    pub digest: String,
    /// `gzip`, `zstd`, ...
    pub compression: String,
    /// Its size in bytes, where recorded (blobs a layer was only imported from have none).
    pub size: Option<u64>,
    /// `imported` (the layer came from it), `kept` (its bytes are kept beside the store) or
    /// how an export rebuilds it (`stream`, `pgzip`).
    pub origin: String,
}

/// Every compressed blob known for `layer`, by digest, each once (an export record wins over
/// the import record of the same digest: it knows the size).
pub fn known_blobs(conn: &Connection, layer: &str) -> Result<Vec<KnownBlob>> {
    let mut stmt = conn.prepare_cached(
        "SELECT digest, compression, size, rebuild FROM oci_layer_blobs WHERE layer = ?1
         UNION ALL
         SELECT digest, compression, NULL, 'imported' FROM blob_digests
           WHERE layer = ?1 AND digest NOT IN (SELECT digest FROM oci_layer_blobs)
         UNION ALL
         SELECT compressed_digest, compression, NULL, 'imported' FROM layers
           WHERE id = ?1 AND compressed_digest IS NOT NULL
             AND compressed_digest NOT IN (SELECT digest FROM oci_layer_blobs)
             AND compressed_digest NOT IN (SELECT digest FROM blob_digests)
         ORDER BY 1",
    )?;
    let rows = stmt.query_map([layer], |r| {
        Ok(KnownBlob {
            digest: r.get(0)?,
            compression: r.get(1)?,
            size: r.get(2)?,
            origin: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// A compressed layer blob, as an image import records it.
pub struct LayerBlobRow<'a> {
    pub digest: &'a str,
    pub layer: &'a str,
    pub compression: &'a str,
    pub size: u64,
    pub rebuild: &'a str,
}

/// Record (or replace) a compressed layer blob.
pub fn put_layer_blob(conn: &Connection, b: &LayerBlobRow<'_>) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO oci_layer_blobs (digest, layer, compression, size, rebuild)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![b.digest, b.layer, b.compression, b.size, b.rebuild])?;
    Ok(())
}

/// Point ref `name` at the image of `manifest`.
pub fn put_oci_ref(conn: &Connection, name: &str, manifest: &str) -> Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO oci_refs (name, manifest) VALUES (?1, ?2)",
        params![name, manifest],
    )?;
    Ok(())
}

/// (digest, media type, bytes) of a manifest or config.
pub type RawBlob<'a> = (&'a str, &'a str, &'a [u8]);

/// Record an image: its manifest and config bytes, and its row (replacing an older row of the
/// same manifest).
pub fn record_image(
    conn: &Connection,
    manifest: RawBlob<'_>,
    config: RawBlob<'_>,
    chain_id: &str,
    descriptor: &[u8],
) -> Result<()> {
    let mut put = conn.prepare_cached(
        "INSERT OR IGNORE INTO oci_blobs (digest, media_type, data) VALUES (?1, ?2, ?3)",
    )?;
    put.execute(params![manifest.0, manifest.1, manifest.2])?;
    put.execute(params![config.0, config.1, config.2])?;
    conn.execute("DELETE FROM oci_images WHERE manifest = ?1", [manifest.0])?;
    conn.execute(
        "INSERT INTO oci_images (manifest, config, chain_id, descriptor, created)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![manifest.0, config.0, chain_id, descriptor, super::now()],
    )?;
    Ok(())
}

/// Forget compressed blobs whose layer is gone.
pub fn forget_orphan_layer_blobs(conn: &Connection) -> Result<()> {
    conn.execute(
        "DELETE FROM oci_layer_blobs WHERE layer NOT IN (SELECT id FROM layers)",
        [],
    )?;
    Ok(())
}

/// Every kept layer blob: (digest, size).
pub fn kept_layer_blobs(conn: &Connection) -> Result<Vec<(String, u64)>> {
    let mut stmt =
        conn.prepare("SELECT digest, size FROM oci_layer_blobs WHERE rebuild = 'kept'")?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}
