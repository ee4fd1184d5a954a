//! OCI image layouts in and out: images become stacks (with their manifest and config kept as
//! raw bytes), stacks become images that umoci and skopeo accept.
//!
//! Invariants:
//! - Nothing is trusted that the store did not check: every manifest, config and index blob is
//!   read with a size bound, its length compared with its descriptor's `size` and its digest
//!   recomputed; every layer blob's digest and diff_id are checked by the layer import in its one
//!   pass over the bytes.
//! - An import is all or nothing for the caller: every JSON blob is read, parsed and checked, and
//!   every layer blob's presence and size, before the first layer is imported; a later failure
//!   deletes the layers this import created, and blobs, records and tags are written only once
//!   every layer is in.
//! - Export reproduces what was imported digest for digest: manifests and configs are re-emitted
//!   from their stored bytes, and a compressed layer blob either comes from the bytes kept at
//!   import (`STORE/blobs/sha256/<hex>`) or from recompressing the stored tar, which the import
//!   proved gives the very same bytes. Every blob written is hashed again and compared.
//! - What the store synthesises (a manifest or config for an image made in the store) is
//!   deterministic: serde_json's sorted keys, fixed timestamps (the epoch), no host names.
//! - `index.json` of an existing layout is replaced atomically (temporary file, then rename).

pub mod docker;
pub mod pgzip;
pub mod source;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde_json::{json, Value};
use sha2::Digest as _;

use crate::compress::Compression;
use crate::digest::{OciAlgorithm, OciDigest};
use crate::error::{Error, IoContext, Result};
use crate::layer::LayerInfo;
use crate::stack::Stack;
use crate::store::{ImportOptions, Imported, Progress, Store};
use source::{DirSource, Source};

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// The annotation naming an image in a layout (`v1` or `example.com/app:v1`).
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// containerd's (and `docker save`'s) full image name, preferred over [`REF_NAME`] when present.
pub const CONTAINERD_NAME: &str = "io.containerd.image.name";
/// Docker's marker of attestation manifests inside an image index.
const DOCKER_REFERENCE_TYPE: &str = "vnd.docker.reference.type";

/// Largest manifest, config or index accepted (they are held in memory and in the database).
pub const MAX_JSON_BLOB: u64 = 8 << 20;
/// Deepest nesting of indexes followed.
const MAX_INDEX_DEPTH: usize = 8;
/// Timestamp of everything the store synthesises, so equal inputs give equal digests.
const EPOCH: &str = "1970-01-01T00:00:00Z";

/// What a layer media type says about the blob's compression; `None` for a type that is not a
/// layer we know.
pub fn layer_compression(media_type: &str) -> Option<Compression> {
    Some(match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Compression::None,
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Compression::Gzip,
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
        | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Compression::Zstd,
        _ => return None,
    })
}

fn layer_media_type(c: Compression) -> &'static str {
    match c {
        Compression::None => LAYER_TAR,
        Compression::Gzip => LAYER_GZIP,
        Compression::Zstd => LAYER_ZSTD,
    }
}

/// The manifest and config digests of an image the store imported or exported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageDigests {
    pub manifest: String,
    pub config: String,
    pub media_type: String,
}

/// One image of an import: the name it was tagged with, and its stack.
#[derive(Debug)]
pub struct ImportedImage {
    pub name: String,
    pub stack: Stack,
}

/// What an export wrote.
#[derive(Clone, Debug)]
pub struct ExportedImage {
    pub digests: ImageDigests,
    /// Size of the manifest blob.
    pub manifest_size: u64,
    /// The layer blobs, bottom first: (digest, size, media type).
    pub layers: Vec<(String, u64, String)>,
    pub config_size: u64,
}

#[derive(Clone, Debug, Default)]
pub struct OciExportOptions {
    /// Written as the index entry's `org.opencontainers.image.ref.name`.
    pub tag: Option<String>,
    /// `None`: an imported image keeps its blobs (and digests); a new one is gzipped.
    pub compression: Option<Compression>,
}

/// `os/architecture[/variant]`, compared as the OCI image index's `platform` object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    pub fn parse(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] | [os, arch, _] if !os.is_empty() && !arch.is_empty() => Ok(Platform {
                os: os.to_string(),
                architecture: normalise_arch(arch).to_string(),
                variant: parts.get(2).map(|v| v.to_string()),
            }),
            _ => Err(Error::InvalidArgument(format!(
                "invalid platform {s:?} (expected os/architecture[/variant], e.g. linux/amd64)"
            ))),
        }
    }

    /// The platform this process runs on, in OCI's names.
    pub fn host() -> Self {
        Platform {
            os: std::env::consts::OS.to_string(),
            architecture: normalise_arch(std::env::consts::ARCH).to_string(),
            variant: None,
        }
    }

    fn matches(&self, p: &Value) -> bool {
        let field = |k: &str| p.get(k).and_then(Value::as_str);
        let arch = field("architecture").map(normalise_arch);
        field("os") == Some(self.os.as_str())
            && arch == Some(self.architecture.as_str())
            && self
                .variant
                .as_deref()
                .is_none_or(|v| field("variant") == Some(v))
    }

    fn describe(p: &Value) -> String {
        let field = |k: &str| p.get(k).and_then(Value::as_str).unwrap_or("?");
        match p.get("variant").and_then(Value::as_str) {
            Some(v) => format!("{}/{}/{v}", field("os"), field("architecture")),
            None => format!("{}/{}", field("os"), field("architecture")),
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

fn normalise_arch(a: &str) -> &str {
    match a {
        "x86_64" | "x86-64" => "amd64",
        "aarch64" => "arm64",
        "i386" | "i686" | "x86" => "386",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        other => other,
    }
}

/// A content descriptor as found in an index or manifest.
#[derive(Clone, Debug)]
pub(crate) struct Descriptor {
    pub media_type: Option<String>,
    pub digest: OciDigest,
    pub size: u64,
}

fn invalid(blob: &str, reason: impl Into<String>) -> Error {
    Error::InvalidImage {
        blob: blob.to_string(),
        reason: reason.into(),
    }
}

pub(crate) fn parse_json(blob: &str, bytes: &[u8]) -> Result<Value> {
    let v: Value =
        serde_json::from_slice(bytes).map_err(|e| invalid(blob, format!("malformed JSON: {e}")))?;
    if !v.is_object() {
        return Err(invalid(blob, "not a JSON object"));
    }
    Ok(v)
}

pub(crate) fn descriptor(v: &Value, blob: &str) -> Result<Descriptor> {
    let digest = v
        .get("digest")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(blob, "a descriptor has no digest"))?;
    let digest = OciDigest::parse(digest).map_err(|_| {
        invalid(
            blob,
            format!("a descriptor has an invalid digest {digest:?}"),
        )
    })?;
    let size = v
        .get("size")
        .and_then(Value::as_u64)
        .ok_or_else(|| invalid(blob, format!("descriptor {digest} has no valid size")))?;
    Ok(Descriptor {
        media_type: v.get("mediaType").and_then(Value::as_str).map(String::from),
        digest,
        size,
    })
}

fn annotation<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get("annotations")?.get(key)?.as_str()
}

pub(crate) fn blob_path(d: &OciDigest) -> String {
    let alg = match d.algorithm {
        OciAlgorithm::Sha256 => "sha256",
        OciAlgorithm::Sha512 => "sha512",
    };
    format!("blobs/{alg}/{}", d.hex)
}

/// The digest of `bytes` in `algorithm`.
pub(crate) fn digest_of(algorithm: OciAlgorithm, bytes: &[u8]) -> String {
    match algorithm {
        OciAlgorithm::Sha256 => format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes))),
        OciAlgorithm::Sha512 => format!("sha512:{}", hex::encode(sha2::Sha512::digest(bytes))),
    }
}

/// Read a small (JSON) blob named by `d`, checking its size and digest.
pub(crate) fn read_json_blob(src: &dyn Source, d: &Descriptor) -> Result<(Vec<u8>, Value)> {
    let name = d.digest.to_string();
    if d.size > MAX_JSON_BLOB {
        return Err(invalid(
            &name,
            format!("{} bytes is over the {MAX_JSON_BLOB}-byte limit", d.size),
        ));
    }
    let (mut r, _) = src
        .open(&blob_path(&d.digest))?
        .ok_or_else(|| Error::MissingBlob { blob: name.clone() })?;
    let mut bytes = Vec::new();
    r.by_ref()
        .take(MAX_JSON_BLOB + 1)
        .read_to_end(&mut bytes)
        .ctx(|| format!("reading blob {name}"))?;
    if bytes.len() as u64 != d.size {
        return Err(Error::SizeMismatch {
            blob: name,
            expected: d.size,
            found: bytes.len() as u64,
        });
    }
    let found = digest_of(d.digest.algorithm, &bytes);
    if found != name {
        return Err(Error::DigestMismatch {
            what: format!("blob {name}"),
            expected: name,
            found,
        });
    }
    let v = parse_json(&d.digest.to_string(), &bytes)?;
    Ok((bytes, v))
}

/// An image manifest found in a layout, before anything is imported.
struct Candidate {
    name: Option<String>,
    /// The index entry that led to it (re-emitted on export).
    descriptor: Value,
    manifest: (Descriptor, Vec<u8>, String),
    config: (Descriptor, Vec<u8>, String),
    layers: Vec<Descriptor>,
    diff_ids: Vec<String>,
}

/// A compressed layer blob as the store keeps it.
#[derive(Clone, Debug)]
pub(crate) struct LayerBlob {
    pub digest: String,
    pub layer: String,
    pub compression: &'static str,
    pub size: u64,
    /// How export gets the bytes back (see [`Rebuild`]).
    pub rebuild: Rebuild,
}

/// An image ready to be recorded once its layers are in.
pub(crate) struct PendingImage {
    pub names: Vec<String>,
    pub descriptor: Value,
    pub manifest: (String, String, Vec<u8>),
    pub config: (String, String, Vec<u8>),
    pub layers: Vec<LayerInfo>,
}

/// The state of one import: what to undo if it fails.
pub(crate) struct Staging<'s> {
    store: &'s Store,
    pub dir: PathBuf,
    created: Vec<LayerInfo>,
    pub layers: HashMap<String, LayerInfo>,
    pub blobs: Vec<LayerBlob>,
    known_blobs: HashSet<String>,
}

impl<'s> Staging<'s> {
    pub fn new(store: &'s Store) -> Result<Self> {
        let dir = store
            .root()
            .join("tmp")
            .join(format!("oci-{}", crate::store::unique_name()));
        fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        Ok(Staging {
            store,
            dir,
            created: Vec::new(),
            layers: HashMap::new(),
            blobs: Vec::new(),
            known_blobs: HashSet::new(),
        })
    }

    /// Undo: delete the layers this import created and the staged blobs.
    pub fn abort(self) {
        for info in self.created.iter().rev() {
            let _ = self.store.delete(&info.id);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }

    /// Import the layer blob `member` of `src` (unless this import already did), checking its
    /// size, digest and diff_id; keep its compressed bytes when recompressing cannot rebuild them.
    #[allow(clippy::too_many_arguments)]
    pub fn layer(
        &mut self,
        src: &dyn Source,
        member: &str,
        blob: &str,
        expected_size: Option<u64>,
        expected_digest: Option<&str>,
        diff_id: Option<&str>,
        progress: Progress<'_>,
    ) -> Result<LayerInfo> {
        if let Some(info) = self.layers.get(member) {
            return Ok(info.clone());
        }
        let (reader, size) = src.open(member)?.ok_or_else(|| Error::MissingBlob {
            blob: blob.to_string(),
        })?;
        if let Some(expected) = expected_size.filter(|&e| e != size) {
            return Err(Error::SizeMismatch {
                blob: blob.to_string(),
                expected,
                found: size,
            });
        }
        let opts = ImportOptions {
            expected_diff_id: diff_id.map(String::from),
            expected_digest: expected_digest.map(String::from),
            limits: None,
        };
        // A compressed blob the store does not hold yet is copied as the import reads it, so
        // the kept bytes are exactly the ones whose digest the import checked.
        let held = match expected_digest {
            Some(d) => {
                self.known_blobs.contains(d) || layer_blob(&*self.store.conn()?, d)?.is_some()
            }
            None => false,
        };
        let tee_path = self
            .dir
            .join(format!("{}.part", crate::store::unique_name()));
        let reader: Box<dyn Read + Send> = if held {
            reader
        } else {
            let out =
                fs::File::create(&tee_path).ctx(|| format!("creating {}", tee_path.display()))?;
            Box::new(TeeFile {
                inner: reader,
                out: Some(out),
                first: true,
            })
        };
        let imported = self.store.import_tar(reader, &opts, progress);
        let imported: Imported = match imported {
            Ok(i) => i,
            Err(e) => {
                let _ = fs::remove_file(&tee_path);
                return Err(name_blob(e, blob));
            }
        };
        if !imported.existed {
            self.created.push(imported.layer.clone());
        }
        let info = imported.layer;
        if let (Some(digest), Some(c)) = (&info.compressed_digest, info.compression.as_deref()) {
            let known = self.known_blobs.contains(digest)
                || layer_blob(&*self.store.conn()?, digest)?.is_some();
            if !known {
                let compression = Compression::parse(Some(c))?;
                let rebuild = match self.reproducible(src, member, &info, compression)? {
                    Some(r) => r,
                    None => {
                        self.keep(src, member, digest, &tee_path, size)?;
                        Rebuild::Kept
                    }
                };
                self.blobs.push(LayerBlob {
                    digest: digest.clone(),
                    layer: info.id.to_string(),
                    compression: compression.name().unwrap_or("none"),
                    size,
                    rebuild,
                });
                self.known_blobs.insert(digest.clone());
            }
        }
        let _ = fs::remove_file(&tee_path);
        self.layers.insert(member.to_string(), info.clone());
        Ok(info)
    }

    /// Which of our encoders, recompressing the stored tar, gives back the blob byte for byte
    /// (compared as it is produced, so a blob from another compressor fails within its first
    /// blocks); `None` when neither does.
    fn reproducible(
        &self,
        src: &dyn Source,
        member: &str,
        info: &LayerInfo,
        compression: Compression,
    ) -> Result<Option<Rebuild>> {
        let mut tries = vec![Rebuild::Tar(compression)];
        if compression == Compression::Gzip {
            tries.insert(0, Rebuild::ParGzip);
        }
        for how in tries {
            let Some((original, size)) = src.open(member)? else {
                return Ok(None);
            };
            let mut cmp = CompareWriter {
                expected: original,
                buf: Vec::new(),
                matched: 0,
            };
            let same = self
                .store
                .rebuild_layer(info, how, &mut cmp, &crate::store::no_progress)
                .is_ok();
            if same && cmp.matched == size && cmp.at_end() {
                return Ok(Some(how));
            }
        }
        Ok(None)
    }

    /// Put the blob into the staging directory: the copy made while importing it when there is
    /// one, else a new copy, hashed again on the way.
    fn keep(
        &self,
        src: &dyn Source,
        member: &str,
        digest: &str,
        teed: &Path,
        size: u64,
    ) -> Result<()> {
        let d = OciDigest::parse(digest)?;
        let path = self.dir.join(&d.hex);
        if fs::metadata(teed).is_ok_and(|m| m.len() == size) {
            let f = fs::File::open(teed).ctx(|| format!("opening {}", teed.display()))?;
            f.sync_all().ctx(|| "syncing a blob".into())?;
            return fs::rename(teed, &path).ctx(|| format!("staging blob {digest}"));
        }
        let (mut r, _) = src.open(member)?.ok_or_else(|| Error::MissingBlob {
            blob: digest.to_string(),
        })?;
        let f = fs::File::create(&path).ctx(|| format!("creating {}", path.display()))?;
        let mut w = HashWriter::new(io::BufWriter::with_capacity(1 << 20, f));
        io::copy(&mut r, &mut w).ctx(|| format!("copying blob {digest}"))?;
        let (inner, found, _) = w.finish();
        let f = inner
            .into_inner()
            .map_err(|e| Error::io("writing a blob", e.into_error()))?;
        f.sync_all().ctx(|| "syncing a blob".into())?;
        if found != digest {
            return Err(Error::DigestMismatch {
                what: format!("blob {digest}"),
                expected: digest.to_string(),
                found,
            });
        }
        Ok(())
    }

    /// Move kept blobs into the store, record blobs, images and tags; consumes the staging.
    pub fn commit(self, images: Vec<PendingImage>) -> Result<Vec<ImportedImage>> {
        let result = self.commit_inner(&images);
        let _ = fs::remove_dir_all(&self.dir);
        let mut out = Vec::new();
        result?;
        for image in images {
            let mut stack = self.store.stack(&image.layers)?;
            stack.image = Some(ImageDigests {
                manifest: image.manifest.0.clone(),
                config: image.config.0.clone(),
                media_type: image.manifest.1.clone(),
            });
            for name in &image.names {
                out.push(ImportedImage {
                    name: name.clone(),
                    stack: stack.clone(),
                });
            }
        }
        Ok(out)
    }

    fn commit_inner(&self, images: &[PendingImage]) -> Result<()> {
        let blob_dir = self.store.root().join("blobs").join("sha256");
        fs::create_dir_all(&blob_dir).ctx(|| format!("creating {}", blob_dir.display()))?;
        for b in self.blobs.iter().filter(|b| b.rebuild == Rebuild::Kept) {
            let hex = b.digest.trim_start_matches("sha256:");
            let hex = hex.trim_start_matches("sha512:");
            fs::rename(self.dir.join(hex), blob_dir.join(hex))
                .ctx(|| format!("storing blob {}", b.digest))?;
        }
        crate::cas::sync_dir(&blob_dir)?;
        let mut conn = self.store.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for b in &self.blobs {
            tx.execute(
                "INSERT OR REPLACE INTO oci_layer_blobs (digest, layer, compression, size, rebuild) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![b.digest, b.layer, b.compression, b.size, b.rebuild.name()],
            )?;
        }
        for image in images {
            let chain = self.store.stack(&image.layers)?.chain_id;
            record_image(&tx, image, &chain)?;
            for name in &image.names {
                tx.execute(
                    "INSERT OR REPLACE INTO oci_refs (name, manifest) VALUES (?1, ?2)",
                    params![name, image.manifest.0],
                )?;
            }
        }
        tx.commit()?;
        drop(conn);
        for image in images {
            if image.names.is_empty() {
                continue;
            }
            let stack = self.store.stack(&image.layers)?;
            for name in &image.names {
                self.store.tag(&stack, name)?;
            }
        }
        Ok(())
    }
}

fn record_image(conn: &Connection, image: &PendingImage, chain_id: &str) -> Result<()> {
    let mut put = conn.prepare_cached(
        "INSERT OR IGNORE INTO oci_blobs (digest, media_type, data) VALUES (?1, ?2, ?3)",
    )?;
    put.execute(params![
        image.manifest.0,
        image.manifest.1,
        image.manifest.2
    ])?;
    put.execute(params![image.config.0, image.config.1, image.config.2])?;
    let descriptor = serde_json::to_vec(&image.descriptor)
        .map_err(|e| Error::Corrupt(format!("encoding a descriptor: {e}")))?;
    conn.execute(
        "DELETE FROM oci_images WHERE manifest = ?1",
        [&image.manifest.0],
    )?;
    conn.execute(
        "INSERT INTO oci_images (manifest, config, chain_id, descriptor, created) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![image.manifest.0, image.config.0, chain_id, descriptor, crate::meta::now()],
    )?;
    Ok(())
}

/// Name the blob in a digest mismatch reported by the layer import.
fn name_blob(e: Error, blob: &str) -> Error {
    match e {
        Error::DigestMismatch {
            what,
            expected,
            found,
        } => Error::DigestMismatch {
            what: format!("{what} of layer blob {blob}"),
            expected,
            found,
        },
        Error::InvalidTar {
            reason,
            entry,
            offset,
        } => Error::InvalidTar {
            reason: format!("layer blob {blob}: {reason}"),
            entry,
            offset,
        },
        Error::InvalidLayer(reason) => Error::InvalidLayer(format!("layer blob {blob}: {reason}")),
        other => other,
    }
}

/// How the store rebuilds the compressed layer blob `digest`, if it knows the blob.
pub(crate) fn layer_blob(conn: &Connection, digest: &str) -> Result<Option<Rebuild>> {
    let row: Option<(String, String)> = conn
        .prepare_cached("SELECT compression, rebuild FROM oci_layer_blobs WHERE digest = ?1")?
        .query_row([digest], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    row.map(|(c, r)| Rebuild::parse(&r, Compression::parse(Some(&c))?))
        .transpose()
}

/// Copies what is read into a file, unless the stream's first bytes say it is not compressed.
struct TeeFile<R> {
    inner: R,
    out: Option<fs::File>,
    first: bool,
}

impl<R: Read> Read for TeeFile<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 {
            return Ok(0);
        }
        if std::mem::take(&mut self.first)
            && n >= 4
            && crate::compress::detect_bytes(&buf[..n]) == Compression::None
        {
            self.out = None;
        }
        if let Some(out) = self.out.as_mut() {
            out.write_all(&buf[..n])?;
        }
        Ok(n)
    }
}

/// Compares what is written with a reader's bytes; fails at the first difference.
struct CompareWriter {
    expected: Box<dyn Read + Send>,
    buf: Vec<u8>,
    matched: u64,
}

impl CompareWriter {
    fn at_end(&mut self) -> bool {
        let mut one = [0u8; 1];
        matches!(self.expected.read(&mut one), Ok(0))
    }
}

impl Write for CompareWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.resize(data.len(), 0);
        self.expected.read_exact(&mut self.buf)?;
        if self.buf[..] != *data {
            return Err(io::Error::other("differs from the original blob"));
        }
        self.matched += data.len() as u64;
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A writer that hashes (sha256) and counts what passes through.
pub(crate) struct HashWriter<W> {
    inner: W,
    sha: sha2::Sha256,
    len: u64,
}

impl<W: Write> HashWriter<W> {
    pub fn new(inner: W) -> Self {
        HashWriter {
            inner,
            sha: sha2::Sha256::new(),
            len: 0,
        }
    }
    pub fn finish(self) -> (W, String, u64) {
        let d = format!("sha256:{}", hex::encode(self.sha.finalize()));
        (self.inner, d, self.len)
    }
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sha.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The name an index entry gives its image.
fn entry_name(v: &Value) -> Option<String> {
    annotation(v, CONTAINERD_NAME)
        .or_else(|| annotation(v, REF_NAME))
        .filter(|s| !s.is_empty())
        .map(String::from)
}

struct Walk<'a> {
    src: &'a dyn Source,
    platform: Platform,
    explicit_platform: bool,
    found: Vec<Candidate>,
    other_platforms: Vec<String>,
}

impl Walk<'_> {
    fn index(
        &mut self,
        blob: &str,
        index: &Value,
        name: Option<String>,
        depth: usize,
    ) -> Result<()> {
        if depth > MAX_INDEX_DEPTH {
            return Err(invalid(blob, "indexes nested too deep"));
        }
        let entries = index
            .get("manifests")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid(blob, "no \"manifests\" array"))?;
        for entry in entries {
            let d = descriptor(entry, blob)?;
            if entry.get("artifactType").is_some()
                || annotation(entry, DOCKER_REFERENCE_TYPE).is_some()
            {
                continue; // signatures, attestations, referrers
            }
            if let Some(p) = entry.get("platform") {
                // Only an index that names platforms is filtered, and by the host's unless asked.
                if (depth > 0 || self.explicit_platform) && !self.platform.matches(p) {
                    self.other_platforms.push(Platform::describe(p));
                    continue;
                }
            }
            let name = entry_name(entry).or_else(|| name.clone());
            let known = matches!(
                d.media_type.as_deref(),
                Some(OCI_INDEX | DOCKER_LIST | OCI_MANIFEST | DOCKER_MANIFEST) | None
            );
            if !known {
                continue; // artifact manifests and other things that are no image
            }
            let (bytes, value) = read_json_blob(self.src, &d)?;
            let media_type = d
                .media_type
                .clone()
                .or_else(|| {
                    value
                        .get("mediaType")
                        .and_then(Value::as_str)
                        .map(String::from)
                })
                .unwrap_or_default();
            match media_type.as_str() {
                OCI_INDEX | DOCKER_LIST => {
                    self.index(&d.digest.to_string(), &value, name, depth + 1)?;
                }
                OCI_MANIFEST | DOCKER_MANIFEST => {
                    if let Some(c) = self.manifest(entry, &d, bytes, &value, media_type, name)? {
                        self.found.push(c);
                    }
                }
                _ if value.get("manifests").is_some() => {
                    self.index(&d.digest.to_string(), &value, name, depth + 1)?;
                }
                _ if value.get("layers").is_some() => {
                    let mt = OCI_MANIFEST.to_string();
                    if let Some(c) = self.manifest(entry, &d, bytes, &value, mt, name)? {
                        self.found.push(c);
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn manifest(
        &mut self,
        entry: &Value,
        d: &Descriptor,
        bytes: Vec<u8>,
        m: &Value,
        media_type: String,
        name: Option<String>,
    ) -> Result<Option<Candidate>> {
        let blob = d.digest.to_string();
        if m.get("artifactType").is_some() {
            return Ok(None);
        }
        let config = m
            .get("config")
            .ok_or_else(|| invalid(&blob, "manifest has no config"))?;
        let config = descriptor(config, &blob)?;
        let config_type = config.media_type.clone().unwrap_or_default();
        if config_type != OCI_CONFIG && config_type != DOCKER_CONFIG {
            return Ok(None); // an artifact (signature, SBOM, …) dressed as a manifest
        }
        let layers = m
            .get("layers")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid(&blob, "manifest has no \"layers\" array"))?
            .iter()
            .map(|l| descriptor(l, &blob))
            .collect::<Result<Vec<_>>>()?;
        for l in &layers {
            let mt = l.media_type.as_deref().unwrap_or("");
            if layer_compression(mt).is_none() {
                return Err(invalid(
                    &l.digest.to_string(),
                    format!("unknown layer media type {mt:?} (in manifest {blob})"),
                ));
            }
            // Presence and size before anything is imported; the digest is checked on import.
            match self.src.open(&blob_path(&l.digest))? {
                None => {
                    return Err(Error::MissingBlob {
                        blob: l.digest.to_string(),
                    })
                }
                Some((_, size)) if size != l.size => {
                    return Err(Error::SizeMismatch {
                        blob: l.digest.to_string(),
                        expected: l.size,
                        found: size,
                    })
                }
                Some(_) => {}
            }
        }
        let (config_bytes, config_value) = read_json_blob(self.src, &config)?;
        let config_name = config.digest.to_string();
        let diff_ids = diff_ids(&config_name, &config_value)?;
        if diff_ids.len() != layers.len() {
            return Err(invalid(
                &config_name,
                format!(
                    "rootfs.diff_ids lists {} layers, manifest {blob} has {}",
                    diff_ids.len(),
                    layers.len()
                ),
            ));
        }
        if self.explicit_platform && entry.get("platform").is_none() {
            let mut p = serde_json::Map::new();
            for k in ["os", "architecture", "variant"] {
                if let Some(v) = config_value.get(k) {
                    p.insert(k.to_string(), v.clone());
                }
            }
            let p = Value::Object(p);
            if !self.platform.matches(&p) {
                self.other_platforms.push(Platform::describe(&p));
                return Ok(None);
            }
        }
        Ok(Some(Candidate {
            name,
            descriptor: entry.clone(),
            manifest: (d.clone(), bytes, media_type),
            config: (config, config_bytes, config_type),
            layers,
            diff_ids,
        }))
    }
}

pub(crate) fn diff_ids(blob: &str, config: &Value) -> Result<Vec<String>> {
    let ids = config
        .get("rootfs")
        .and_then(|r| r.get("diff_ids"))
        .and_then(Value::as_array)
        .ok_or_else(|| invalid(blob, "config has no rootfs.diff_ids"))?;
    ids.iter()
        .map(|v| {
            let s = v
                .as_str()
                .ok_or_else(|| invalid(blob, "a diff_id is not a string"))?;
            OciDigest::parse(s).map_err(|_| invalid(blob, format!("invalid diff_id {s:?}")))?;
            Ok(s.to_string())
        })
        .collect()
}

/// Read `index.json` and `oci-layout` of a layout.
fn read_layout_index(src: &dyn Source) -> Result<Value> {
    let layout = read_small(src, "oci-layout")?;
    let layout = parse_json("oci-layout", &layout)?;
    if layout
        .get("imageLayoutVersion")
        .and_then(Value::as_str)
        .is_none()
    {
        return Err(invalid("oci-layout", "no imageLayoutVersion"));
    }
    let index = read_small(src, "index.json")?;
    parse_json("index.json", &index)
}

pub(crate) fn read_small(src: &dyn Source, name: &str) -> Result<Vec<u8>> {
    let (r, _) = src.open(name)?.ok_or_else(|| Error::MissingBlob {
        blob: format!("{name} (in {})", src.describe()),
    })?;
    let mut bytes = Vec::new();
    r.take(MAX_JSON_BLOB + 1)
        .read_to_end(&mut bytes)
        .ctx(|| format!("reading {name}"))?;
    if bytes.len() as u64 > MAX_JSON_BLOB {
        return Err(invalid(name, "too large"));
    }
    Ok(bytes)
}

impl Store {
    /// Import every image of the OCI image layout at `path` (see the module documentation);
    /// returns them by the name each was tagged with.
    pub fn import_oci(
        &self,
        path: &Path,
        platform: Option<&str>,
        progress: Progress<'_>,
    ) -> Result<Vec<ImportedImage>> {
        let meta = fs::metadata(path).ctx(|| format!("reading {}", path.display()))?;
        if !meta.is_dir() {
            return Err(Error::InvalidArgument(format!(
                "{} is not a directory (an OCI image layout)",
                path.display()
            )));
        }
        self.import_layout(&DirSource::new(path), platform, progress)
    }

    pub(crate) fn import_layout(
        &self,
        src: &dyn Source,
        platform: Option<&str>,
        progress: Progress<'_>,
    ) -> Result<Vec<ImportedImage>> {
        let index = read_layout_index(src)?;
        let mut walk = Walk {
            src,
            platform: platform.map_or_else(|| Ok(Platform::host()), Platform::parse)?,
            explicit_platform: platform.is_some(),
            found: Vec::new(),
            other_platforms: Vec::new(),
        };
        walk.index("index.json", &index, None, 0)?;
        if walk.found.is_empty() && !walk.other_platforms.is_empty() {
            return Err(Error::NotFound(format!(
                "no image for platform {} in {} (it has {})",
                walk.platform,
                src.describe(),
                walk.other_platforms.join(", ")
            )));
        }
        let mut staging = Staging::new(self)?;
        match self.import_candidates(src, walk.found, &mut staging, progress) {
            Ok(pending) => staging.commit(pending),
            Err(e) => {
                staging.abort();
                Err(e)
            }
        }
    }

    fn import_candidates(
        &self,
        src: &dyn Source,
        found: Vec<Candidate>,
        staging: &mut Staging<'_>,
        progress: Progress<'_>,
    ) -> Result<Vec<PendingImage>> {
        let mut pending = Vec::new();
        let mut names: HashSet<String> = HashSet::new();
        for c in found {
            let mut layers = Vec::with_capacity(c.layers.len());
            for (d, diff_id) in c.layers.iter().zip(&c.diff_ids) {
                let blob = d.digest.to_string();
                let info = staging.layer(
                    src,
                    &blob_path(&d.digest),
                    &blob,
                    Some(d.size),
                    Some(&blob),
                    Some(diff_id),
                    progress,
                )?;
                layers.push(info);
            }
            // The first image of a name wins; one without a name is known by its digest.
            let name = c
                .name
                .filter(|n| !names.contains(n))
                .unwrap_or_else(|| c.manifest.0.digest.to_string());
            names.insert(name.clone());
            pending.push(PendingImage {
                names: vec![name],
                descriptor: c.descriptor,
                manifest: (c.manifest.0.digest.to_string(), c.manifest.2, c.manifest.1),
                config: (c.config.0.digest.to_string(), c.config.2, c.config.1),
                layers,
            });
        }
        Ok(pending)
    }

    /// The image an import tagged `name` with, if the tag still names a stack of that ChainID.
    pub(crate) fn image_for_ref(&self, name: &str, chain_id: &str) -> Result<Option<ImageDigests>> {
        let conn = self.conn()?;
        Ok(conn
            .query_row(
                "SELECT i.manifest, i.config, b.media_type FROM oci_refs r
                 JOIN oci_images i ON i.manifest = r.manifest JOIN oci_blobs b ON b.digest = i.manifest
                 WHERE r.name = ?1 AND i.chain_id = ?2",
                [name, chain_id],
                |r| {
                    Ok(ImageDigests {
                        manifest: r.get(0)?,
                        config: r.get(1)?,
                        media_type: r.get(2)?,
                    })
                },
            )
            .optional()?)
    }

    /// The manifest and config recorded for `stack` (its own, else the latest for its ChainID).
    pub fn image_digests(&self, stack: &Stack) -> Result<Option<ImageDigests>> {
        if let Some(d) = &stack.image {
            return Ok(Some(d.clone()));
        }
        if stack.layers.is_empty() {
            return Ok(None);
        }
        let conn = self.conn()?;
        Ok(conn
            .query_row(
                "SELECT i.manifest, i.config, b.media_type FROM oci_images i JOIN oci_blobs b ON b.digest = i.manifest
                 WHERE i.chain_id = ?1 ORDER BY i.id DESC LIMIT 1",
                [&stack.chain_id],
                |r| {
                    Ok(ImageDigests {
                        manifest: r.get(0)?,
                        config: r.get(1)?,
                        media_type: r.get(2)?,
                    })
                },
            )
            .optional()?)
    }

    fn oci_blob(&self, digest: &str) -> Result<(String, Vec<u8>)> {
        self.conn()?
            .query_row(
                "SELECT media_type, data FROM oci_blobs WHERE digest = ?1",
                [digest],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?
            .ok_or_else(|| Error::Corrupt(format!("recorded blob {digest} is missing")))
    }

    fn recorded_descriptor(&self, manifest: &str) -> Result<Option<Value>> {
        let raw: Option<Vec<u8>> = self
            .conn()?
            .query_row(
                "SELECT descriptor FROM oci_images WHERE manifest = ?1",
                [manifest],
                |r| r.get(0),
            )
            .optional()?;
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
        self.write_layout(stack, dest, opts, true, progress)
    }

    /// `export_oci` without recording the result (a layout staged for another format).
    pub(crate) fn write_layout_unrecorded(
        &self,
        stack: &Stack,
        dest: &Path,
        opts: &OciExportOptions,
        progress: Progress<'_>,
    ) -> Result<ExportedImage> {
        self.write_layout(stack, dest, opts, false, progress)
    }

    fn write_layout(
        &self,
        stack: &Stack,
        dest: &Path,
        opts: &OciExportOptions,
        record: bool,
        progress: Progress<'_>,
    ) -> Result<ExportedImage> {
        if stack.layers.is_empty() {
            return Err(Error::InvalidArgument(
                "an image needs at least one layer".into(),
            ));
        }
        let blobs = dest.join("blobs").join("sha256");
        fs::create_dir_all(&blobs).ctx(|| format!("creating {}", blobs.display()))?;
        let layout = dest.join("oci-layout");
        if layout.exists() {
            let bytes = fs::read(&layout).ctx(|| format!("reading {}", layout.display()))?;
            parse_json("oci-layout", &bytes)?;
        } else {
            write_atomic(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        let recorded = self.image_digests(stack)?;
        let verbatim = match &recorded {
            Some(r) => self.verbatim_plan(stack, r, opts.compression)?,
            None => None,
        };
        let (manifest, manifest_type, config, layer_descs, descriptor) = match (verbatim, &recorded)
        {
            (Some((manifest, mt, plan)), Some(r)) => {
                let config = self.oci_blob(&r.config)?.1;
                let descs = self.write_layer_blobs(&blobs, plan, progress)?;
                let descriptor = self.recorded_descriptor(&r.manifest)?;
                (manifest, mt, config, descs, descriptor)
            }
            _ => {
                let config = match &recorded {
                    Some(r) => self.oci_blob(&r.config)?.1,
                    None => synth_config(stack),
                };
                let c = opts.compression.unwrap_or(Compression::Gzip);
                let plan = self.fresh_plan(stack, c)?;
                let descs = self.write_layer_blobs(&blobs, plan, progress)?;
                let manifest = synth_manifest(&config, &descs);
                (manifest, OCI_MANIFEST.to_string(), config, descs, None)
            }
        };
        let config_digest = write_blob(&blobs, &config)?;
        let manifest_digest = write_blob(&blobs, &manifest)?;
        let mut entry = descriptor.unwrap_or_else(|| json!({}));
        let obj = entry
            .as_object_mut()
            .ok_or_else(|| Error::Corrupt("descriptor".into()))?;
        obj.insert("mediaType".into(), json!(manifest_type));
        obj.insert("digest".into(), json!(manifest_digest));
        obj.insert("size".into(), json!(manifest.len()));
        if let Some(tag) = &opts.tag {
            let ann = obj
                .entry("annotations")
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .ok_or_else(|| Error::Corrupt("annotations".into()))?;
            ann.insert(REF_NAME.into(), json!(tag));
            ann.remove(CONTAINERD_NAME);
        }
        update_index(dest, &entry, opts.tag.as_deref())?;
        let digests = ImageDigests {
            manifest: manifest_digest.clone(),
            config: config_digest.clone(),
            media_type: manifest_type.clone(),
        };
        let pending = PendingImage {
            names: Vec::new(),
            descriptor: entry,
            manifest: (manifest_digest, manifest_type, manifest.clone()),
            config: (config_digest, OCI_CONFIG.to_string(), config.clone()),
            layers: stack.layers.clone(),
        };
        if record {
            let mut conn = self.conn()?;
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            record_image(&tx, &pending, &stack.chain_id)?;
            tx.commit()?;
        }
        Ok(ExportedImage {
            digests,
            manifest_size: manifest.len() as u64,
            layers: layer_descs,
            config_size: config.len() as u64,
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
                let known: Option<(String, String)> = conn
                    .query_row(
                        "SELECT digest, rebuild FROM oci_layer_blobs WHERE layer = ?1 AND compression = ?2
                         ORDER BY rebuild = 'kept', digest LIMIT 1",
                        params![info.id.to_string(), c.name()],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
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
        plan.into_par_iter()
            .map(|p| {
                let (digest, size) = self.write_layer_blob(blobs, &p, progress)?;
                Ok((digest, size, p.media_type))
            })
            .collect()
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
        let tmp = blobs.join(format!(".tmp-{}", crate::store::unique_name()));
        let result = (|| -> Result<(String, u64)> {
            let f = fs::File::create(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
            let mut w = HashWriter::new(io::BufWriter::with_capacity(1 << 20, f));
            match p.how {
                Rebuild::Kept => {
                    let d = OciDigest::parse(p.digest.as_deref().unwrap_or_default())?;
                    let path = self.root().join("blobs").join("sha256").join(&d.hex);
                    let mut f = fs::File::open(&path).ctx(|| format!("opening kept blob {d}"))?;
                    io::copy(&mut f, &mut w).ctx(|| format!("copying kept blob {d}"))?;
                }
                how => self.rebuild_layer(&p.info, how, &mut w, progress)?,
            }
            let (inner, digest, size) = w.finish();
            inner
                .into_inner()
                .map_err(|e| Error::io("writing a blob", e.into_error()))?;
            if let Some(expected) = &p.digest {
                if *expected != digest {
                    return Err(Error::DigestMismatch {
                        what: format!("rebuilt layer blob of {}", p.info.diff_id),
                        expected: expected.clone(),
                        found: digest,
                    });
                }
            }
            let hex = digest.trim_start_matches("sha256:");
            fs::rename(&tmp, blobs.join(hex)).ctx(|| format!("writing blob {digest}"))?;
            Ok((digest, size))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn blob_size_ok(&self, digest: &str, size: u64, info: &LayerInfo) -> bool {
        if *digest == info.diff_id {
            return size == info.size;
        }
        self.conn()
            .ok()
            .and_then(|c| {
                c.query_row(
                    "SELECT size FROM oci_layer_blobs WHERE digest = ?1",
                    [digest],
                    |r| r.get::<_, u64>(0),
                )
                .ok()
            })
            .is_some_and(|s| s == size)
    }
}

/// A recorded manifest to re-emit as is: its bytes, media type, and how to rebuild its layers.
type Verbatim = (Vec<u8>, String, Vec<BlobPlan>);

/// How a compressed layer blob is produced again from the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rebuild {
    /// Export the stored tar through the store's stream encoder for this compression
    /// (`export_tar`'s: flate2 level 6, or zstd level 3 with a checksum).
    Tar(Compression),
    /// Export the stored tar through the block-parallel gzip encoder ([`pgzip`]).
    ParGzip,
    /// Copy the bytes kept at import (`STORE/blobs/sha256/<hex>`).
    Kept,
}

impl Rebuild {
    fn name(&self) -> &'static str {
        match self {
            Rebuild::Tar(_) => "stream",
            Rebuild::ParGzip => "pgzip",
            Rebuild::Kept => "kept",
        }
    }

    fn parse(name: &str, c: Compression) -> Result<Self> {
        match name {
            "stream" => Ok(Rebuild::Tar(c)),
            "pgzip" => Ok(Rebuild::ParGzip),
            "kept" => Ok(Rebuild::Kept),
            other => Err(Error::Corrupt(format!("unknown blob rebuild {other:?}"))),
        }
    }
}

impl Store {
    /// Write layer `info`'s blob as `how` makes it (not for [`Rebuild::Kept`]).
    fn rebuild_layer(
        &self,
        info: &LayerInfo,
        how: Rebuild,
        out: &mut dyn Write,
        progress: Progress<'_>,
    ) -> Result<()> {
        match how {
            Rebuild::Tar(c) => self.export_tar(&info.id, out, c, progress).map(|_| ()),
            Rebuild::ParGzip => {
                let mut gz = pgzip::ParGzWriter::new(out);
                self.export_tar(&info.id, &mut gz, Compression::None, progress)?;
                gz.finish().ctx(|| "finishing the gzip stream".into())?;
                Ok(())
            }
            Rebuild::Kept => Err(Error::InvalidArgument(
                "a kept blob is copied, not rebuilt".into(),
            )),
        }
    }
}

struct BlobPlan {
    info: LayerInfo,
    /// The digest the blob must have, when known in advance.
    digest: Option<String>,
    media_type: String,
    how: Rebuild,
}

/// A minimal valid image config for a stack made in the store: the host's platform, the layers'
/// diff_ids, one history entry per layer, fixed timestamps.
fn synth_config(stack: &Stack) -> Vec<u8> {
    let host = Platform::host();
    let history: Vec<Value> = stack
        .layers
        .iter()
        .map(|l| json!({"created": EPOCH, "created_by": format!("layerstore: layer {}", l.id)}))
        .collect();
    let config = json!({
        "created": EPOCH,
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

fn synth_manifest(config: &[u8], layers: &[(String, u64, String)]) -> Vec<u8> {
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
    let tmp = dir.join(format!(".tmp-{}", crate::store::unique_name()));
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

/// Add `entry` to the layout's `index.json` (replacing an entry with the same name, or the same
/// manifest without a name), atomically.
fn update_index(dest: &Path, entry: &Value, tag: Option<&str>) -> Result<()> {
    let path = dest.join("index.json");
    let mut index = match fs::read(&path) {
        Ok(bytes) => parse_json("index.json", &bytes)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []})
        }
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
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
    let bytes = serde_json::to_vec(&index).expect("a JSON value serialises");
    write_atomic(&path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_parse_and_match() {
        let p = Platform::parse("linux/x86_64").unwrap();
        assert_eq!(p.architecture, "amd64");
        assert!(p.matches(&json!({"os": "linux", "architecture": "amd64"})));
        assert!(!p.matches(&json!({"os": "linux", "architecture": "arm64"})));
        let v = Platform::parse("linux/arm/v7").unwrap();
        assert!(v.matches(&json!({"os": "linux", "architecture": "arm", "variant": "v7"})));
        assert!(!v.matches(&json!({"os": "linux", "architecture": "arm", "variant": "v6"})));
        assert!(Platform::parse("linux").is_err());
    }

    #[test]
    fn layer_media_types() {
        assert_eq!(layer_compression(LAYER_GZIP), Some(Compression::Gzip));
        assert_eq!(
            layer_compression("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Some(Compression::Gzip)
        );
        assert_eq!(layer_compression(LAYER_ZSTD), Some(Compression::Zstd));
        assert_eq!(layer_compression(LAYER_TAR), Some(Compression::None));
        assert_eq!(layer_compression("application/octet-stream"), None);
    }

    #[test]
    fn synthesised_json_is_deterministic() {
        let layers = vec![("sha256:aa".to_string(), 3, LAYER_GZIP.to_string())];
        assert_eq!(
            synth_manifest(b"{}", &layers),
            synth_manifest(b"{}", &layers)
        );
    }
}
