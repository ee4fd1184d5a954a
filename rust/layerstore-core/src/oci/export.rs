//! The export side of OCI layouts: re-emitting a recorded image verbatim, or synthesising a
//! deterministic manifest and config, and writing blobs and `index.json` atomically.

use super::*;

impl Store {
    /// The image an import tagged `name` with, if the tag still names a stack of that ChainID.
    pub(crate) fn image_for_ref(&self, name: &str, chain_id: &str) -> Result<Option<ImageDigests>> {
        meta::oci::image_for_ref(&*self.conn()?, name, chain_id)
    }

    /// The manifest and config recorded for `stack`: its own (a tag's), else the one recorded
    /// for its ChainID when all images of those layers have one config.
    pub fn image_digests(&self, stack: &Stack) -> Result<Option<ImageDigests>> {
        if let Some(d) = &stack.image {
            return Ok(Some(d.clone()));
        }
        if stack.layers.is_empty() {
            return Ok(None);
        }
        meta::oci::sole_image(&*self.conn()?, &stack.chain_id)
    }

    /// A manifest or config the store recorded for an image, byte for byte: (media type, data).
    pub fn oci_blob(&self, digest: &str) -> Result<(String, Vec<u8>)> {
        meta::oci::blob(&*self.conn()?, digest)
    }

    fn recorded_descriptor(&self, manifest: &str) -> Result<Option<Value>> {
        let raw = meta::oci::descriptor(&*self.conn()?, manifest)?;
        Ok(raw.and_then(|r| serde_json::from_slice(&r).ok()))
    }

    /// Write `stack` as an image into the OCI layout at `dest` (created, or added to).
    pub fn export_oci(
        &self,
        stack: &Stack,
        dest: &Path,
        opts: &OciExportOptions,
        progress: Progress<'_>,
    ) -> Result<ExportedImage> {
        // A layout this export creates is removed again if it fails (one it adds to keeps what
        // it had: blobs are written under temporary names and renamed once verified).
        let fresh = fs::symlink_metadata(dest).is_err();
        let result = self.write_layout(stack, dest, opts, progress);
        if result.is_err() && fresh {
            let _ = fs::remove_dir_all(dest);
        }
        result
    }

    fn write_layout(
        &self,
        stack: &Stack,
        dest: &Path,
        opts: &OciExportOptions,
        progress: Progress<'_>,
    ) -> Result<ExportedImage> {
        let plan = self.plan_image(stack, opts.compression)?;
        let blobs = dest.join("blobs").join("sha256");
        fs::create_dir_all(&blobs).ctx(|| format!("creating {}", blobs.display()))?;
        let layout = dest.join("oci-layout");
        if layout.exists() {
            let bytes = fs::read(&layout).ctx(|| format!("reading {}", layout.display()))?;
            parse_json("oci-layout", &bytes)?;
        } else {
            write_atomic(&layout, OCI_LAYOUT_FILE)?;
        }
        let descs = self.write_layer_blobs(&blobs, plan.blobs, progress)?;
        let docs = plan.head.finish(&descs, opts.tag.as_deref())?;
        write_blob(&blobs, &docs.config)?;
        write_blob(&blobs, &docs.manifest)?;
        update_index(dest, &docs.entry, opts.tag.as_deref())?;
        let pending = docs.pending(&stack.layers);
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        record_image(&tx, &pending, &stack.chain_id)?;
        tx.commit()?;
        Ok(docs.exported(descs))
    }

    /// Record `config` (an OCI image config, as JSON bytes) as the image of `stack`, under a
    /// manifest over its layers as uncompressed tar blobs (each blob's digest is the layer's
    /// `diff_id`): no layer is read. With `tag`, the tag names that image. The config's
    /// `rootfs.diff_ids` must be the stack's. Returns the stack with its new manifest.
    pub fn write_image(&self, stack: &Stack, config: Vec<u8>, tag: Option<&str>) -> Result<Stack> {
        self.check_writable("record an image")?;
        if stack.layers.is_empty() {
            return Err(Error::InvalidArgument(
                "an image needs at least one layer".into(),
            ));
        }
        let doc = parse_json("config", &config)?;
        let diff_ids: Option<Vec<&str>> = doc
            .pointer("/rootfs/diff_ids")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_str).collect());
        let ours: Vec<&str> = stack.layers.iter().map(|l| l.diff_id.as_str()).collect();
        if diff_ids.as_ref() != Some(&ours) {
            return Err(Error::InvalidArgument(
                "the config's rootfs.diff_ids are not the image's layers".into(),
            ));
        }
        let blobs: Vec<(String, u64, String)> = stack
            .layers
            .iter()
            .map(|l| (l.diff_id.clone(), l.size, LAYER_TAR.to_string()))
            .collect();
        let head = ImageHead {
            config,
            manifest: None,
            descriptor: None,
        };
        let docs = head.finish(&blobs, tag)?;
        let pending = docs.pending(&stack.layers);
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        record_image(&tx, &pending, &stack.chain_id)?;
        if let Some(tag) = tag {
            let ids: Vec<crate::digest::Blake3> = stack.layers.iter().map(|l| l.id).collect();
            meta::put_ref(&tx, tag, &stack.chain_id, &ids)?;
            meta::oci::put_oci_ref(&tx, tag, &docs.digests.manifest)?;
        }
        tx.commit()?;
        let mut out = stack.clone();
        out.image = Some(docs.digests);
        Ok(out)
    }

    /// What exporting `stack` writes, decided before any blob is: the recorded manifest when it
    /// can be re-emitted as is (no compression asked, or the one it uses), else a synthesised one
    /// over blobs compressed as asked (gzip by default).
    pub(crate) fn plan_image(
        &self,
        stack: &Stack,
        compression: Option<Compression>,
    ) -> Result<ImagePlan> {
        if stack.layers.is_empty() {
            return Err(Error::InvalidArgument(
                "an image needs at least one layer".into(),
            ));
        }
        let recorded = self.image_digests(stack)?;
        if let Some(r) = &recorded {
            if let Some((manifest, media_type, blobs)) =
                self.verbatim_plan(stack, r, compression)?
            {
                return Ok(ImagePlan {
                    head: ImageHead {
                        config: self.oci_blob(&r.config)?.1,
                        manifest: Some((manifest, media_type)),
                        descriptor: self.recorded_descriptor(&r.manifest)?,
                    },
                    blobs,
                });
            }
        }
        let config = match &recorded {
            Some(r) => self.oci_blob(&r.config)?.1,
            None => {
                let steps = stack
                    .layers
                    .iter()
                    .map(|l| self.created_by(&l.id))
                    .collect::<Result<Vec<_>>>()?;
                synth_config(stack, &steps)
            }
        };
        let c = compression.unwrap_or(Compression::Gzip);
        Ok(ImagePlan {
            head: ImageHead {
                config,
                manifest: None,
                descriptor: None,
            },
            blobs: self.fresh_plan(stack, c)?,
        })
    }

    /// The recorded manifest and how to rebuild each of its layer blobs, when it can be
    /// re-emitted as is (no compression asked, or the one it already uses).
    fn verbatim_plan(
        &self,
        stack: &Stack,
        recorded: &ImageDigests,
        want: Option<Compression>,
    ) -> Result<Option<Verbatim>> {
        let (media_type, manifest) = self.oci_blob(&recorded.manifest)?;
        let m = parse_json(&recorded.manifest, &manifest)?;
        let layers = m
            .get("layers")
            .and_then(Value::as_array)
            .ok_or_else(|| {
                Error::Corrupt(format!(
                    "recorded manifest {} has no layers",
                    recorded.manifest
                ))
            })?
            .iter()
            .map(|l| descriptor(l, &recorded.manifest))
            .collect::<Result<Vec<_>>>()?;
        if layers.len() != stack.layers.len() {
            return Ok(None);
        }
        let mut plan = Vec::new();
        let conn = self.conn()?;
        for (d, info) in layers.iter().zip(&stack.layers) {
            let mt = d.media_type.clone().unwrap_or_default();
            let c = layer_compression(&mt)
                .ok_or_else(|| Error::Corrupt(format!("recorded layer type {mt:?}")))?;
            if want.is_some_and(|w| w != c) {
                return Ok(None);
            }
            let digest = d.digest.to_string();
            let how = if c == Compression::None {
                Rebuild::Tar(Compression::None)
            } else {
                match layer_blob(&conn, &digest)? {
                    Some(how) => how,
                    None => return Ok(None),
                }
            };
            plan.push(BlobPlan {
                info: info.clone(),
                digest: Some(digest),
                media_type: mt,
                how,
            });
        }
        Ok(Some((manifest, media_type, plan)))
    }

    /// New blobs for every layer, compressed with `c` (reusing a blob the store holds in that
    /// compression, so a layer keeps its digest from image to image).
    fn fresh_plan(&self, stack: &Stack, c: Compression) -> Result<Vec<BlobPlan>> {
        let conn = self.conn()?;
        let mut plan = Vec::new();
        for info in &stack.layers {
            let (digest, how) = if c == Compression::None {
                (Some(info.diff_id.clone()), Rebuild::Tar(c))
            } else {
                // Prefer a blob rebuilt by recompression (no bytes kept), then any other.
                let known = meta::oci::preferred_layer_blob(
                    &conn,
                    &info.id.to_string(),
                    c.name().unwrap_or_default(),
                )?;
                match known {
                    Some((d, how)) => (Some(d), Rebuild::parse(&how, c)?),
                    None if c == Compression::Gzip => (None, Rebuild::ParGzip),
                    None => (None, Rebuild::Tar(c)),
                }
            };
            plan.push(BlobPlan {
                info: info.clone(),
                digest,
                media_type: layer_media_type(c).to_string(),
                how,
            });
        }
        Ok(plan)
    }

    /// Write the layer blobs (in parallel: each compresses on its own core); returns their
    /// (digest, size, media type), bottom first.
    fn write_layer_blobs(
        &self,
        blobs: &Path,
        plan: Vec<BlobPlan>,
        progress: Progress<'_>,
    ) -> Result<Vec<(String, u64, String)>> {
        crate::pool::install(|| {
            plan.into_par_iter()
                .map(|p| {
                    let (digest, size) = self.write_layer_blob(blobs, &p, progress)?;
                    Ok((digest, size, p.media_type))
                })
                .collect()
        })
    }

    fn write_layer_blob(
        &self,
        blobs: &Path,
        p: &BlobPlan,
        progress: Progress<'_>,
    ) -> Result<(String, u64)> {
        if let Some(d) = &p.digest {
            let hex = OciDigest::parse(d)?.hex;
            if let Ok(m) = fs::metadata(blobs.join(&hex)) {
                // Already in the layout (written by an earlier export): content-addressed.
                if m.is_file() && self.blob_size_ok(d, m.len(), &p.info) {
                    return Ok((d.clone(), m.len()));
                }
            }
        }
        let tmp = blobs.join(format!(".tmp-{}", crate::owner::unique_name()));
        let result = (|| -> Result<(String, u64)> {
            let f = fs::File::create(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
            let mut w = io::BufWriter::with_capacity(1 << 20, f);
            let (digest, size) = self.write_planned_blob(p, &mut w, progress)?;
            w.into_inner()
                .map_err(|e| Error::io("writing a blob", e.into_error()))?;
            let hex = digest.trim_start_matches("sha256:");
            fs::rename(&tmp, blobs.join(hex)).ctx(|| format!("writing blob {digest}"))?;
            Ok((digest, size))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Write the layer blob `p` plans into `out`: copied from the bytes kept at import, or
    /// rebuilt from the stored tar. Returns the digest and size of what was written, checked
    /// against the planned digest when there is one.
    pub(crate) fn write_planned_blob(
        &self,
        p: &BlobPlan,
        out: &mut dyn Write,
        progress: Progress<'_>,
    ) -> Result<(String, u64)> {
        let mut w = HashWriter::new(out);
        match p.how {
            Rebuild::Kept => {
                let d = OciDigest::parse(p.digest.as_deref().unwrap_or_default())?;
                let path = self.root().join("blobs").join("sha256").join(&d.hex);
                let mut f = fs::File::open(&path).ctx(|| format!("opening kept blob {d}"))?;
                io::copy(&mut f, &mut w).ctx(|| format!("copying kept blob {d}"))?;
            }
            how => self.rebuild_layer(&p.info, how, &mut w, progress)?,
        }
        let (_, digest, size) = w.finish();
        if let Some(expected) = &p.digest {
            if *expected != digest {
                return Err(Error::DigestMismatch {
                    what: format!("rebuilt layer blob of {}", p.info.diff_id),
                    expected: expected.clone(),
                    found: digest,
                });
            }
        }
        Ok((digest, size))
    }

    fn blob_size_ok(&self, digest: &str, size: u64, info: &LayerInfo) -> bool {
        if *digest == info.diff_id {
            return size == info.size;
        }
        self.conn()
            .ok()
            .and_then(|c| meta::oci::layer_blob_size(&c, digest).ok().flatten())
            .is_some_and(|s| s == size)
    }
}

/// A recorded manifest to re-emit as is: its bytes, media type, and how to rebuild its layers.
type Verbatim = (Vec<u8>, String, Vec<BlobPlan>);

pub(crate) struct BlobPlan {
    pub info: LayerInfo,
    /// The digest the blob must have, when known in advance.
    pub digest: Option<String>,
    pub media_type: String,
    pub how: Rebuild,
}

/// The `oci-layout` file of a layout this store creates.
pub(crate) const OCI_LAYOUT_FILE: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// An image export as planned: its JSON part and how each layer blob is made, bottom first.
pub(crate) struct ImagePlan {
    pub head: ImageHead,
    pub blobs: Vec<BlobPlan>,
}

/// The JSON part of a planned export.
pub(crate) struct ImageHead {
    pub config: Vec<u8>,
    /// The recorded manifest and its media type, re-emitted as is; `None`: one is synthesised
    /// over the blobs written.
    pub manifest: Option<(Vec<u8>, String)>,
    /// The recorded index entry, kept (annotations and all) with its digest and size updated.
    pub descriptor: Option<Value>,
}

/// An exported image's JSON documents and its entry in `index.json`.
pub(crate) struct ImageDocs {
    pub config: Vec<u8>,
    pub manifest: Vec<u8>,
    pub digests: ImageDigests,
    pub entry: Value,
}

impl ImageDocs {
    /// The record of the image these documents describe, over `layers`.
    pub(crate) fn pending(&self, layers: &[LayerInfo]) -> PendingImage {
        PendingImage {
            names: Vec::new(),
            descriptor: self.entry.clone(),
            manifest: (
                self.digests.manifest.clone(),
                self.digests.media_type.clone(),
                self.manifest.clone(),
            ),
            config: (
                self.digests.config.clone(),
                OCI_CONFIG.to_string(),
                self.config.clone(),
            ),
            layers: layers.to_vec(),
        }
    }
}

impl ImageHead {
    /// The documents, given the layer blobs written: (digest, size, media type), bottom first.
    pub fn finish(self, layers: &[(String, u64, String)], tag: Option<&str>) -> Result<ImageDocs> {
        let (manifest, media_type) = self.manifest.unwrap_or_else(|| {
            (
                synth_manifest(&self.config, layers),
                OCI_MANIFEST.to_string(),
            )
        });
        let digests = ImageDigests {
            manifest: sha256_digest(&manifest),
            config: sha256_digest(&self.config),
            media_type,
        };
        let mut entry = self.descriptor.unwrap_or_else(|| json!({}));
        let obj = entry
            .as_object_mut()
            .ok_or_else(|| Error::Corrupt("descriptor".into()))?;
        obj.insert("mediaType".into(), json!(digests.media_type));
        obj.insert("digest".into(), json!(digests.manifest));
        obj.insert("size".into(), json!(manifest.len()));
        if let Some(tag) = tag {
            let ann = obj
                .entry("annotations")
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .ok_or_else(|| Error::Corrupt("annotations".into()))?;
            ann.insert(REF_NAME.into(), json!(tag));
            ann.remove(CONTAINERD_NAME);
        }
        Ok(ImageDocs {
            config: self.config,
            manifest,
            digests,
            entry,
        })
    }
}

impl ImageDocs {
    pub fn exported(&self, layers: Vec<(String, u64, String)>) -> ExportedImage {
        ExportedImage {
            digests: self.digests.clone(),
            manifest_size: self.manifest.len() as u64,
            layers,
            config_size: self.config.len() as u64,
        }
    }
}

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// A minimal valid image config for a stack made in the store: the host's platform, the layers'
/// diff_ids, one history entry per layer (its recorded build step, if any) dated when the layer
/// was stored, and the image dated by its newest layer: stored facts, so exporting the same stack
/// twice gives the same digests.
fn synth_config(stack: &Stack, steps: &[Option<String>]) -> Vec<u8> {
    let host = Platform::host();
    let history: Vec<Value> = stack
        .layers
        .iter()
        .zip(steps)
        .map(|(l, step)| {
            let by = step
                .clone()
                .unwrap_or_else(|| format!("layerstore: layer {}", l.id));
            json!({"created": rfc3339(l.created_unix), "created_by": by})
        })
        .collect();
    let newest = stack
        .layers
        .iter()
        .map(|l| l.created_unix)
        .max()
        .unwrap_or(0);
    let config = json!({
        "created": rfc3339(newest),
        "architecture": host.architecture,
        "os": host.os,
        "config": {},
        "rootfs": {
            "type": "layers",
            "diff_ids": stack.layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
        },
        "history": history,
    });
    serde_json::to_vec(&config).expect("a JSON value serialises")
}

pub(crate) fn synth_manifest(config: &[u8], layers: &[(String, u64, String)]) -> Vec<u8> {
    let config_digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(config)));
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config.len()},
        "layers": layers
            .iter()
            .map(|(d, s, mt)| json!({"mediaType": mt, "digest": d, "size": s}))
            .collect::<Vec<_>>(),
    });
    serde_json::to_vec(&manifest).expect("a JSON value serialises")
}

/// Write a small blob under its digest (if not already there); returns the digest.
fn write_blob(blobs: &Path, bytes: &[u8]) -> Result<String> {
    let hex = hex::encode(sha2::Sha256::digest(bytes));
    let path = blobs.join(&hex);
    if !fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() == bytes.len() as u64) {
        write_atomic(&path, bytes)?;
    }
    Ok(format!("sha256:{hex}"))
}

/// Write a file through a temporary file and a rename, so readers see the old or the new one.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".tmp-{}", crate::owner::unique_name()));
    let result = (|| {
        let mut f = fs::File::create(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .ctx(|| format!("writing {}", tmp.display()))?;
        f.sync_all().ctx(|| format!("syncing {}", tmp.display()))?;
        fs::rename(&tmp, path).ctx(|| format!("writing {}", path.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Add `entry` to the layout's `index.json` (see [`merged_index`]), atomically.
fn update_index(dest: &Path, entry: &Value, tag: Option<&str>) -> Result<()> {
    let path = dest.join("index.json");
    let existing = match fs::read(&path) {
        Ok(bytes) => Some(bytes),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    };
    write_atomic(&path, &merged_index(existing.as_deref(), entry, tag)?)
}

/// `existing` (an `index.json`, or none yet) with `entry` added, replacing an entry with the
/// same name, or the same manifest without a name.
pub(crate) fn merged_index(
    existing: Option<&[u8]>,
    entry: &Value,
    tag: Option<&str>,
) -> Result<Vec<u8>> {
    let mut index = match existing {
        Some(bytes) => parse_json("index.json", bytes)?,
        None => json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}),
    };
    let manifests = index
        .as_object_mut()
        .expect("parse_json checked")
        .entry("manifests")
        .or_insert_with(|| json!([]))
        .as_array_mut()
        .ok_or_else(|| invalid("index.json", "\"manifests\" is not an array"))?;
    let name = tag
        .map(String::from)
        .or_else(|| annotation(entry, REF_NAME).map(String::from));
    manifests.retain(|m| match &name {
        Some(n) => annotation(m, REF_NAME) != Some(n.as_str()),
        None => !(m.get("digest") == entry.get("digest") && annotation(m, REF_NAME).is_none()),
    });
    manifests.push(entry.clone());
    Ok(serde_json::to_vec(&index).expect("a JSON value serialises"))
}

/// An `ImageDigests` from a (manifest, config, media type) row.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthesised_json_is_deterministic() {
        let layers = vec![("sha256:aa".to_string(), 3, LAYER_GZIP.to_string())];
        assert_eq!(
            synth_manifest(b"{}", &layers),
            synth_manifest(b"{}", &layers)
        );
    }
}
