//! Checking the store: every chunk re-hashed, every reference followed; repair of damage.
//!
//! Invariants: `fsck` changes nothing unless asked to repair; a repair takes damaged chunks out
//! of use and marks the layers that use them broken in one transaction, and an import that
//! stores those chunks again heals the layers.

use std::collections::{HashMap, HashSet};
use std::fs;

use rusqlite::TransactionBehavior;

use super::Store;
use crate::cas::PackReader;
use crate::digest::Blake3;
use crate::error::{Error, Result};
use crate::meta;
use crate::tar::Op;

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

impl Store {
    /// Re-hash every chunk and check every reference; report each problem found, and for each
    /// damaged chunk the layers and files that use it. With `repair`, damaged chunks are taken
    /// out of use and the layers using them marked broken (refused by every read until an
    /// import stores their content again).
    pub fn fsck(&self, repair: bool) -> Result<FsckReport> {
        if repair {
            self.check_writable("repair it")?;
        }
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
