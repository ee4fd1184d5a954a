//! The mount tables: which images are mounted where, and the layers (and layer snapshots) each
//! mount uses.
//!
//! Invariants: a `mounts` row exists from just before its mount is made until just after it is
//! undone (a crash in between leaves a row whose target is not mounted, which
//! [`crate::mount`]'s reaper removes); every layer a row's mount shows has a `mount_layers` row,
//! so `delete_layer` refuses it and `gc` keeps its snapshot.

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::digest::Blake3;
use crate::error::Result;

/// A mount as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountRow {
    pub id: String,
    pub target: String,
    pub backend: String,
    pub writable: bool,
    /// Lives while its owner process holds the mount's lock file (else: until unmounted).
    pub owned: bool,
    pub created: i64,
    /// Bottom first.
    pub layers: Vec<Blake3>,
}

/// One layer of a mount to record: the layer and, for the overlay backend, its snapshot.
pub struct MountLayer<'a> {
    pub layer: &'a Blake3,
    pub snapshot: Option<&'a str>,
}

/// Record a mount about to be made.
pub fn insert_mount(
    conn: &mut Connection,
    row: &MountRow,
    layers: &[MountLayer<'_>],
) -> Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute(
        "INSERT INTO mounts (id, target, backend, writable, owned, created)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            row.id,
            row.target,
            row.backend,
            row.writable,
            row.owned,
            row.created
        ],
    )?;
    {
        let mut put = tx.prepare_cached(
            "INSERT INTO mount_layers (mount, pos, layer, snapshot) VALUES (?1, ?2, ?3, ?4)",
        )?;
        for (pos, l) in layers.iter().enumerate() {
            put.execute(params![row.id, pos as i64, l.layer.to_string(), l.snapshot])?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// Forget a mount (after it was undone).
pub fn delete_mount(conn: &mut Connection, id: &str) -> Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute("DELETE FROM mount_layers WHERE mount = ?1", [id])?;
    tx.execute("DELETE FROM mounts WHERE id = ?1", [id])?;
    tx.commit()?;
    Ok(())
}

/// Mark a mount as living until it is unmounted, whoever made it.
pub fn disown_mount(conn: &Connection, id: &str) -> Result<()> {
    conn.execute("UPDATE mounts SET owned = 0 WHERE id = ?1", [id])?;
    Ok(())
}

/// Every recorded mount, oldest first.
pub fn mounts(conn: &Connection) -> Result<Vec<MountRow>> {
    let mut stmt = conn.prepare(
        "SELECT id, target, backend, writable, owned, created FROM mounts ORDER BY created, id",
    )?;
    let mut rows = stmt
        .query_map([], |r| {
            Ok(MountRow {
                id: r.get(0)?,
                target: r.get(1)?,
                backend: r.get(2)?,
                writable: r.get(3)?,
                owned: r.get(4)?,
                created: r.get(5)?,
                layers: Vec::new(),
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut layers =
        conn.prepare_cached("SELECT layer FROM mount_layers WHERE mount = ?1 ORDER BY pos")?;
    for row in &mut rows {
        let ids = layers
            .query_map([&row.id], |r| r.get::<_, String>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        row.layers = ids
            .iter()
            .map(|s| Blake3::parse(s))
            .collect::<Result<Vec<Blake3>>>()?;
    }
    Ok(rows)
}

/// Where a layer is mounted, if any mount uses it.
pub fn mounted_at(conn: &Connection, layer: &str) -> Result<Option<String>> {
    Ok(conn
        .query_row(
            "SELECT m.target FROM mount_layers l JOIN mounts m ON m.id = l.mount
             WHERE l.layer = ?1 LIMIT 1",
            [layer],
            |r| r.get(0),
        )
        .optional()?)
}

/// The snapshot directories recorded mounts use.
pub fn snapshots_in_use(conn: &Connection) -> Result<Vec<String>> {
    let mut stmt =
        conn.prepare("SELECT DISTINCT snapshot FROM mount_layers WHERE snapshot IS NOT NULL")?;
    let rows = stmt
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<Vec<String>>>()?;
    Ok(rows)
}
