//! `docker save` archives: the classic format (`manifest.json`, `repositories`, a directory per
//! layer holding `layer.tar`) and the newer one, which embeds an OCI image layout beside the
//! same `manifest.json`.
//!
//! Invariants: an archive is read in place (a compressed one is first decompressed into the
//! store's `tmp/`), with the same checks and all-or-nothing behaviour as an OCI layout import:
//! configs and layer presence are checked before the first layer is imported, each layer's
//! diff_id is verified in its import pass, and a config stored under its digest (`<hex>.json`,
//! `blobs/sha256/<hex>`) must hash to that digest. A classic image gets a manifest synthesised
//! from what was imported (uncompressed layers keep `digest == diff_id`), so it has an
//! `image.digest` like any other. Export writes a deterministic tar (sorted names, mtime 0,
//! root-owned) through a temporary file renamed into place.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha2::Digest as _;

use super::source::{Source, TarSource};
use super::{
    check_names, diff_ids, layer_media_type, merged_index, parse_json, read_small, synth_manifest,
    ExportedImage, ImportedImage, LayerInfo, PendingImage, Staging, MAX_WALK_BLOBS, MAX_WALK_BYTES,
    OCI_CONFIG, OCI_LAYOUT_FILE, OCI_MANIFEST, REF_NAME,
};
use crate::compress::{self, Compression};
use crate::error::{Error, IoContext, Result};
use crate::stack::Stack;
use crate::store::{Progress, Store};

/// Options of [`Store::export_docker_archive`].
#[derive(Clone, Debug, Default)]
pub struct DockerExportOptions {
    /// `name:tag` recorded in `manifest.json`'s `RepoTags` and in `repositories`.
    pub tag: Option<String>,
    /// Write the classic layout (a directory per layer) instead of the OCI-embedding one.
    pub classic: bool,
}

/// One image of a classic `manifest.json`, checked but not yet imported.
struct ClassicItem {
    tags: Vec<String>,
    config: Vec<u8>,
    config_digest: String,
    diff_ids: Vec<String>,
    layers: Vec<String>,
}

fn invalid(blob: &str, reason: impl Into<String>) -> Error {
    Error::InvalidImage {
        blob: blob.to_string(),
        reason: reason.into(),
    }
}

/// `repo:tag` → (`repo`, `tag`), with `latest` when there is no tag.
fn split_tag(name: &str) -> (String, String) {
    match name.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') && !repo.is_empty() => {
            (repo.to_string(), tag.to_string())
        }
        _ => (name.to_string(), "latest".to_string()),
    }
}

impl Store {
    /// Import every image of a `docker save` archive (plain, gzip or zstd compressed).
    pub fn import_docker_archive(
        &self,
        path: &Path,
        progress: Progress<'_>,
    ) -> Result<Vec<ImportedImage>> {
        let mut head = [0u8; 4];
        let mut f = File::open(path).ctx(|| format!("opening {}", path.display()))?;
        let n = f
            .read(&mut head)
            .ctx(|| format!("reading {}", path.display()))?;
        let kind = compress::detect_bytes(&head[..n]);
        let scratch: Option<PathBuf> = if kind == Compression::None {
            None
        } else {
            let tmp = self
                .root()
                .join("tmp")
                .join(format!("{}.tar", crate::owner::owned_tmp_name("docker")));
            let result = (|| -> Result<()> {
                let src = File::open(path).ctx(|| format!("opening {}", path.display()))?;
                let (_, mut decoded) = compress::decoder(src).ctx(|| "decompressing".into())?;
                let mut out = File::create(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
                io::copy(&mut decoded, &mut out)
                    .ctx(|| format!("decompressing {}", path.display()))?;
                Ok(())
            })();
            if let Err(e) = result {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
            Some(tmp)
        };
        let result = (|| {
            let src = TarSource::index(scratch.as_deref().unwrap_or(path))?;
            if src.exists("oci-layout")? && src.exists("index.json")? {
                self.import_layout(&src, None, progress)
            } else {
                self.import_classic(&src, progress)
            }
        })();
        if let Some(tmp) = scratch {
            let _ = fs::remove_file(tmp);
        }
        result
    }

    fn import_classic(
        &self,
        src: &TarSource,
        progress: Progress<'_>,
    ) -> Result<Vec<ImportedImage>> {
        let bytes = read_small(src, "manifest.json")?;
        let doc: Value = serde_json::from_slice(&bytes)
            .map_err(|e| invalid("manifest.json", format!("malformed JSON: {e}")))?;
        let entries = doc
            .as_array()
            .ok_or_else(|| invalid("manifest.json", "not a JSON array"))?;
        // The walk's budget (see MAX_WALK_BLOBS): entries may name one large config many times.
        let mut items = Vec::new();
        let mut config_bytes = 0u64;
        for e in entries {
            let item = self.classic_item(src, e)?;
            config_bytes += item.config.len() as u64;
            if items.len() >= MAX_WALK_BLOBS || config_bytes > MAX_WALK_BYTES {
                return Err(invalid(
                    "manifest.json",
                    format!(
                        "more than {MAX_WALK_BLOBS} images or {MAX_WALK_BYTES} bytes of \
                         configs (a config named again counts again)"
                    ),
                ));
            }
            items.push(item);
        }
        check_names(
            "manifest.json",
            items.iter().flat_map(|i| i.tags.iter().map(String::as_str)),
        )?;
        let mut staging = Staging::new(self)?;
        let result = (|| -> Result<Vec<PendingImage>> {
            let mut pending = Vec::new();
            for item in items {
                let mut layers = Vec::new();
                let mut descs = Vec::new();
                for (member, diff_id) in item.layers.iter().zip(&item.diff_ids) {
                    let info =
                        staging.layer(src, member, member, None, None, Some(diff_id), progress)?;
                    let size = src.open(member)?.map_or(0, |(_, s)| s);
                    let c = Compression::parse(info.compression.as_deref())?;
                    let digest = info
                        .compressed_digest
                        .clone()
                        .unwrap_or_else(|| info.diff_id.clone());
                    descs.push((digest, size, layer_media_type(c).to_string()));
                    layers.push(info);
                }
                let manifest = synth_manifest(&item.config, &descs);
                let manifest_digest =
                    format!("sha256:{}", hex::encode(sha2::Sha256::digest(&manifest)));
                let mut descriptor = json!({
                    "mediaType": OCI_MANIFEST,
                    "digest": manifest_digest,
                    "size": manifest.len(),
                });
                if let Some(t) = item.tags.first() {
                    descriptor["annotations"] = json!({ REF_NAME: t });
                }
                let names = if item.tags.is_empty() {
                    vec![manifest_digest.clone()]
                } else {
                    item.tags
                };
                pending.push(PendingImage {
                    names,
                    descriptor,
                    manifest: (manifest_digest, OCI_MANIFEST.to_string(), manifest),
                    config: (item.config_digest, OCI_CONFIG.to_string(), item.config),
                    layers,
                });
            }
            Ok(pending)
        })();
        match result {
            Ok(pending) => staging.commit(pending),
            Err(e) => {
                staging.abort();
                Err(e)
            }
        }
    }

    fn classic_item(&self, src: &TarSource, e: &Value) -> Result<ClassicItem> {
        let config_name = e
            .get("Config")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("manifest.json", "an entry has no Config"))?;
        let config = read_small(src, config_name)?;
        let config_digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&config)));
        // `<hex>.json` (classic) or `blobs/sha256/<hex>` (newer): the name is a claim to check.
        let stem = config_name
            .rsplit('/')
            .next()
            .unwrap_or(config_name)
            .trim_end_matches(".json");
        if stem.len() == 64 && stem.bytes().all(|b| b.is_ascii_hexdigit()) {
            let claimed = format!("sha256:{stem}");
            if claimed != config_digest {
                return Err(Error::DigestMismatch {
                    what: format!("config {config_name}"),
                    expected: claimed,
                    found: config_digest,
                });
            }
        }
        let value = parse_json(config_name, &config)?;
        let diff_ids = diff_ids(config_name, &value)?;
        let layers: Vec<String> = e
            .get("Layers")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid("manifest.json", "an entry has no Layers"))?
            .iter()
            .map(|l| {
                l.as_str()
                    .map(String::from)
                    .ok_or_else(|| invalid("manifest.json", "a layer path is not a string"))
            })
            .collect::<Result<_>>()?;
        if layers.len() != diff_ids.len() {
            return Err(invalid(
                config_name,
                format!(
                    "rootfs.diff_ids lists {}, manifest.json has {}",
                    crate::error::count(diff_ids.len(), "layer"),
                    layers.len()
                ),
            ));
        }
        for l in &layers {
            if !src.exists(l)? {
                return Err(Error::MissingBlob { blob: l.clone() });
            }
        }
        let tags = e
            .get("RepoTags")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        Ok(ClassicItem {
            tags,
            config,
            config_digest,
            diff_ids,
            layers,
        })
    }

    /// Write `stack` as a `docker save` archive at `dest` (uncompressed layers, as docker does).
    /// Each layer's tar streams from the store straight into the archive: an uncompressed blob's
    /// digest is the layer's diff_id and its size the layer's, both known before it is written.
    pub fn export_docker_archive(
        &self,
        stack: &Stack,
        dest: &Path,
        opts: &DockerExportOptions,
        progress: Progress<'_>,
    ) -> Result<ExportedImage> {
        let plan = self.plan_image(stack, Some(Compression::None))?;
        let layers: Vec<(String, u64, String)> = plan
            .blobs
            .iter()
            .map(|b| match &b.digest {
                Some(d) if *d == b.info.diff_id => {
                    Ok((d.clone(), b.info.size, b.media_type.clone()))
                }
                other => Err(Error::Corrupt(format!(
                    "uncompressed blob of layer {} planned as {other:?}, not its diff_id",
                    b.info.diff_id
                ))),
            })
            .collect::<Result<_>>()?;
        let tars: Vec<LayerInfo> = plan.blobs.iter().map(|b| b.info.clone()).collect();
        let docs = plan.head.finish(&layers, opts.tag.as_deref())?;
        let hex = |d: &str| d.trim_start_matches("sha256:").to_string();
        let config_hex = hex(&docs.digests.config);
        let layer_hex: Vec<String> = layers.iter().map(|(d, _, _)| hex(d)).collect();
        let repo_tags: Vec<String> = opts
            .tag
            .iter()
            .map(|t| {
                let (r, t) = split_tag(t);
                format!("{r}:{t}")
            })
            .collect();
        let blob = |hex: &str| format!("blobs/sha256/{hex}");
        let (config_member, layer_members): (String, Vec<String>) = if opts.classic {
            (
                format!("{config_hex}.json"),
                layer_hex.iter().map(|h| format!("{h}/layer.tar")).collect(),
            )
        } else {
            (
                blob(&config_hex),
                layer_hex.iter().map(|h| blob(h)).collect(),
            )
        };
        let manifest = json!([{
            "Config": config_member,
            "RepoTags": repo_tags,
            "Layers": layer_members,
        }]);
        let mut repositories = serde_json::Map::new();
        if let (Some(tag), Some(top)) = (&opts.tag, layer_hex.last()) {
            let (r, t) = split_tag(tag);
            repositories.insert(r, json!({ t: top }));
        }
        // Members: (name in the archive, where the bytes come from).
        let mut members: Vec<(String, Member<'_>)> = Vec::new();
        members.push((config_member, Member::Bytes(docs.config.clone())));
        if opts.classic {
            for (i, h) in layer_hex.iter().enumerate() {
                members.push((format!("{h}/"), Member::Dir));
                members.push((format!("{h}/VERSION"), Member::Bytes(b"1.0".to_vec())));
                let mut json = json!({"id": h});
                if i > 0 {
                    json["parent"] = json!(layer_hex[i - 1]);
                }
                members.push((
                    format!("{h}/json"),
                    Member::Bytes(json.to_string().into_bytes()),
                ));
            }
        } else {
            members.push(("blobs/".into(), Member::Dir));
            members.push(("blobs/sha256/".into(), Member::Dir));
            members.push((
                blob(&hex(&docs.digests.manifest)),
                Member::Bytes(docs.manifest.clone()),
            ));
            members.push((
                "index.json".into(),
                Member::Bytes(merged_index(None, &docs.entry, opts.tag.as_deref())?),
            ));
            members.push(("oci-layout".into(), Member::Bytes(OCI_LAYOUT_FILE.to_vec())));
        }
        for (name, info) in layer_members.into_iter().zip(&tars) {
            members.push((name, Member::Layer(info)));
        }
        members.push((
            "manifest.json".into(),
            Member::Bytes(serde_json::to_vec(&manifest).expect("JSON serialises")),
        ));
        members.push((
            "repositories".into(),
            Member::Bytes(
                serde_json::to_vec(&Value::Object(repositories)).expect("JSON serialises"),
            ),
        ));
        // Sorted by name; a layer twice in the stack is one member.
        members.sort_by(|a, b| a.0.cmp(&b.0));
        members.dedup_by(|a, b| a.0 == b.0);
        crate::fsio::write_atomically(dest, |out| {
            write_tar(out, &members, &mut |info, out| {
                Ok(self
                    .export_tar(&info.id, out, Compression::None, progress)?
                    .size)
            })
        })?;
        Ok(docs.exported(layers))
    }
}

/// Where an archive member's bytes come from.
enum Member<'a> {
    Dir,
    Bytes(Vec<u8>),
    /// A layer's uncompressed tar, `size` bytes, streamed from the store.
    Layer(&'a LayerInfo),
}

/// Writes a layer's tar to the archive; returns the bytes it wrote.
type LayerWriter<'w> = dyn FnMut(&LayerInfo, &mut dyn Write) -> Result<u64> + 'w;

fn header(name: &str, size: u64, dir: bool) -> Result<tar::Header> {
    let mut h = tar::Header::new_ustar();
    h.set_path(name)
        .map_err(|e| Error::InvalidArgument(format!("archive member {name:?}: {e}")))?;
    h.set_size(size);
    h.set_mode(if dir { 0o755 } else { 0o644 });
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(if dir {
        tar::EntryType::Directory
    } else {
        tar::EntryType::Regular
    });
    h.set_cksum();
    Ok(h)
}

fn write_tar(
    out: &mut dyn Write,
    members: &[(String, Member<'_>)],
    layer: &mut LayerWriter<'_>,
) -> Result<()> {
    let zeros = [0u8; 1024];
    for (name, m) in members {
        let size = match m {
            Member::Dir => 0,
            Member::Bytes(b) => b.len() as u64,
            Member::Layer(info) => info.size,
        };
        let h = header(name, size, matches!(m, Member::Dir))?;
        out.write_all(h.as_bytes())
            .ctx(|| "writing the archive".into())?;
        match m {
            Member::Dir => {}
            Member::Bytes(b) => out.write_all(b).ctx(|| "writing the archive".into())?,
            Member::Layer(info) => {
                let written = layer(info, out)?;
                if written != size {
                    return Err(Error::Corrupt(format!(
                        "layer {}: wrote {written} bytes into the archive, its size is {size}",
                        info.diff_id
                    )));
                }
            }
        }
        let pad = (512 - size % 512) % 512;
        out.write_all(&zeros[..pad as usize])
            .ctx(|| "writing the archive".into())?;
    }
    out.write_all(&zeros).ctx(|| "writing the archive".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_split_into_repository_and_tag() {
        assert_eq!(split_tag("app:v1"), ("app".into(), "v1".into()));
        assert_eq!(
            split_tag("localhost:5000/app"),
            ("localhost:5000/app".into(), "latest".into())
        );
        assert_eq!(
            split_tag("example.com/app:v1"),
            ("example.com/app".into(), "v1".into())
        );
    }
}
