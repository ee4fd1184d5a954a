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
//!   import (`STORE/blobs/sha256/<hex>`, written from the very bytes the layer import checked)
//!   or from recompressing the stored tar with the encoder the import proved gives the same
//!   bytes ([`Rebuild`]). Every blob whose digest is known is hashed again as it is written and
//!   compared; a new blob is named by the digest of what was written.
//! - What the store synthesises (a manifest or config for an image made in the store) is
//!   deterministic: serde_json's sorted keys, fixed timestamps (the epoch), no host names.
//! - `index.json` of an existing layout is replaced atomically (temporary file, then rename).

pub mod docker;
mod export;
mod layout;
pub mod pgzip;
pub mod source;
pub mod zstd_chunked;

pub(crate) use export::{merged_index, synth_manifest, OCI_LAYOUT_FILE};
pub(crate) use export::{BlobPlan, ImageDocs, ImagePlan};
#[doc(hidden)] // for `crate::fuzzing`
pub use layout::find_image_layers;
pub(crate) use layout::{
    check_names, diff_ids, layer_blob, read_small, record_image, record_layer_blob, FetchedLayer,
    HashWriter, LayerBlob, PendingImage, Staging, WantedBlob, MAX_WALK_BLOBS, MAX_WALK_BYTES,
};

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use rusqlite::{Connection, TransactionBehavior};
use serde_json::{json, Value};
use sha2::Digest as _;

use crate::compress::Compression;
use crate::digest::{OciAlgorithm, OciDigest};
use crate::error::{Error, IoContext, Result};
use crate::layer::LayerInfo;
use crate::meta;
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
pub(crate) const DOCKER_REFERENCE_TYPE: &str = "vnd.docker.reference.type";

/// Largest manifest, config or index accepted (they are held in memory and in the database).
pub const MAX_JSON_BLOB: u64 = 8 << 20;
/// Deepest nesting of indexes followed.
const MAX_INDEX_DEPTH: usize = 8;
/// An RFC 3339 UTC timestamp (`2026-12-07T22:52:38Z`) of seconds since the Unix epoch, as OCI
/// configs write `created` (proleptic Gregorian calendar, days counted from 0000-03-01).
pub fn rfc3339(secs: i64) -> String {
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let shifted = days + 719_468; // days from 0000-03-01 to 1970-01-01
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

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

pub use crate::layer::ImageDigests;

/// One image of an import: the name it was tagged with, and its stack.
#[derive(Debug)]
pub struct ImportedImage {
    pub name: String,
    pub stack: Stack,
    /// What importing its layers' tars reported (as [`crate::store::Imported::warnings`],
    /// each naming its layer blob); a layer the store already held was not read, and says
    /// nothing.
    pub warnings: Vec<String>,
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

    pub(crate) fn matches(&self, p: &Value) -> bool {
        let field = |k: &str| p.get(k).and_then(Value::as_str);
        let arch = field("architecture").map(normalise_arch);
        field("os") == Some(self.os.as_str())
            && arch == Some(self.architecture.as_str())
            && self
                .variant
                .as_deref()
                .is_none_or(|v| field("variant") == Some(v))
    }

    pub(crate) fn describe(p: &Value) -> String {
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

pub(crate) fn annotation<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
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

/// Check bytes read for `d` against its size and digest (`what` names the blob in the error).
pub(crate) fn check_blob(d: &Descriptor, bytes: &[u8], what: &str) -> Result<()> {
    let name = d.digest.to_string();
    if bytes.len() as u64 != d.size {
        return Err(Error::SizeMismatch {
            blob: name,
            expected: d.size,
            found: bytes.len() as u64,
        });
    }
    let found = digest_of(d.digest.algorithm, bytes);
    if found != name {
        return Err(Error::DigestMismatch {
            what: format!("{what} {name}"),
            expected: name,
            found,
        });
    }
    Ok(())
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
    check_blob(d, &bytes, "blob")?;
    let v = parse_json(&d.digest.to_string(), &bytes)?;
    Ok((bytes, v))
}

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
    /// Write the stored layer as a zstd:chunked blob ([`zstd_chunked`]).
    ZstdChunked,
}

impl Rebuild {
    fn name(&self) -> &'static str {
        match self {
            Rebuild::Tar(_) => "stream",
            Rebuild::ParGzip => "pgzip",
            Rebuild::Kept => "kept",
            Rebuild::ZstdChunked => zstd_chunked::REBUILD,
        }
    }

    fn parse(name: &str, c: Compression) -> Result<Self> {
        match name {
            "stream" => Ok(Rebuild::Tar(c)),
            "pgzip" => Ok(Rebuild::ParGzip),
            "kept" => Ok(Rebuild::Kept),
            zstd_chunked::REBUILD => Ok(Rebuild::ZstdChunked),
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
            Rebuild::ZstdChunked => {
                zstd_chunked::write_layer(self, info, out, progress).map(|_| ())
            }
            Rebuild::Kept => Err(Error::InvalidArgument(
                "a kept blob is copied, not rebuilt".into(),
            )),
        }
    }
}

impl Store {
    /// `gc`'s part for images: forget compressed blobs whose layer is gone, and delete kept blob
    /// files no record names once they are older than [`crate::cas::RETIRE_GRACE`] (an import
    /// moves its blobs in just before the commit that records them). Returns the bytes freed.
    pub(crate) fn gc_image_blobs(&self) -> Result<u64> {
        let conn = self.conn()?;
        meta::oci::forget_orphan_layer_blobs(&conn)?;
        let dir = self.root().join("blobs").join("sha256");
        let Ok(entries) = fs::read_dir(&dir) else {
            return Ok(0);
        };
        let kept: HashSet<String> = meta::oci::kept_layer_blobs(&conn)?
            .into_iter()
            .map(|(d, _)| d.trim_start_matches("sha256:").to_string())
            .collect();
        let mut freed = 0;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(meta) = e.metadata() else { continue };
            let old = meta
                .modified()
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= crate::cas::RETIRE_GRACE);
            if meta.is_file() && !kept.contains(&name) && old && fs::remove_file(e.path()).is_ok() {
                freed += meta.len();
            }
        }
        Ok(freed)
    }

    /// `fsck`'s part for images: every kept blob is present with its recorded size.
    pub(crate) fn fsck_image_blobs(&self, problems: &mut Vec<String>) -> Result<()> {
        let rows = meta::oci::kept_layer_blobs(&*self.conn()?)?;
        for (digest, size) in rows {
            let path = self
                .root()
                .join("blobs")
                .join("sha256")
                .join(digest.trim_start_matches("sha256:"));
            match fs::metadata(&path) {
                Ok(m) if m.len() == size => {}
                Ok(m) => problems.push(format!(
                    "kept blob {digest} is {} bytes, {size} recorded",
                    m.len()
                )),
                Err(e) => problems.push(format!("kept blob {digest}: {e}")),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates_match_the_calendar() {
        for (secs, text) in [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (1_796_786_745, "2026-12-09T03:25:45Z"),
            (-86_400, "1969-12-31T00:00:00Z"),
            (4_102_444_799, "2099-12-31T23:59:59Z"),
            (253_402_300_799, "9999-12-31T23:59:59Z"),
        ] {
            assert_eq!(rfc3339(secs), text);
        }
    }

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
}
