//! Pull: a manifest (through an index to one platform), its config, then each layer blob
//! streamed from the socket into the store's one layer import, several at once.
//!
//! Invariants:
//! - Manifest and config are read with a size bound and their digests recomputed (a pinned
//!   `@digest` must match the manifest's bytes); they are stored raw, exactly as `import_oci`
//!   stores them, so the image re-exports and re-pushes digest-exact.
//! - Layer blobs go through [`Staging::fetch`], the import path OCI layouts use: size, blob
//!   digest and diff_id are checked in the import's single pass, and a mismatch rejects the
//!   layer; any failure aborts the staging (layers it created deleted, nothing tagged).
//! - A layer whose blob the store can give back byte for byte (a known blob digest, or an
//!   uncompressed layer whose diff_id it holds) is not downloaded; the layer it holds must have
//!   the diff_id the config names.
//! - A dropped body resumes with `Range` from the byte it stopped at, a bounded number of times.
//!   A pull killed part-way leaves its copy of each compressed blob in its staging directory
//!   (`tmp/oci-<owner>/<hex>.part`, swept by `gc` once the owner is gone); the next pull of that
//!   blob takes the copy over (a rename: one taker), imports its bytes from disk and fetches
//!   only the rest with `Range`. The digest check covers the adopted bytes as any others.

use std::fs;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};
use ureq::http::Method;

use super::client::{Client, ClientOptions};
use super::reference::Reference;
use crate::compress::Compression;
use crate::digest::OciDigest;
use crate::error::{Error, ErrorKind, Result};
use crate::layer::LayerInfo;
use crate::oci::source::{Opened, Source};
use crate::oci::{
    self, blob_path, check_names, descriptor, diff_ids, digest_of, layer_blob, layer_compression,
    parse_json, Descriptor, FetchedLayer, HashWriter, ImportedImage, PendingImage, Platform,
    Staging, WantedBlob, DOCKER_CONFIG, DOCKER_LIST, DOCKER_MANIFEST, OCI_CONFIG, OCI_INDEX,
    OCI_MANIFEST,
};
use crate::store::{Progress, Store};

/// Manifest media types asked for, most wanted first.
const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";
/// Indexes followed inside one another before giving up.
const MAX_INDEX_DEPTH: usize = 4;
/// Times one blob body is resumed after its connection dropped.
const MAX_RESUMES: u32 = 5;

/// How to pull.
#[derive(Clone, Debug)]
pub struct PullOptions {
    /// `os/arch[/variant]` chosen from an index; `None`: the host's.
    pub platform: Option<String>,
    pub client: ClientOptions,
    /// Layers downloaded at once.
    pub jobs: usize,
    /// Largest manifest, index or config accepted, in bytes.
    pub max_json: u64,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            platform: None,
            client: ClientOptions::default(),
            jobs: 4,
            max_json: 4 << 20,
        }
    }
}

/// What a pull did.
#[derive(Debug)]
pub struct Pulled {
    /// The image, tagged with `name` (the canonical reference).
    pub image: ImportedImage,
    pub manifest_digest: String,
    /// Layer blobs downloaded (the others were in the store already).
    pub blobs_fetched: usize,
}

/// Pull `reference` into `store` and tag it with the canonical reference.
pub fn pull(
    store: &Store,
    reference: &str,
    opts: &PullOptions,
    progress: Progress<'_>,
) -> Result<Pulled> {
    let r = Reference::parse(reference)?;
    let name = r.to_string();
    check_names("the reference", [name.as_str()])?;
    let client = Arc::new(Client::connect(
        &r.registry,
        r.api_host(),
        &r.repository,
        &opts.client,
        false,
    )?);
    let platform = opts
        .platform
        .as_deref()
        .map_or_else(|| Ok(Platform::host()), Platform::parse)?;
    let image = resolve(&client, &r, &platform, opts)?;
    let mut staging = Staging::new(store)?;
    let result = (|| {
        let (layers, fetched) = layers(store, &client, &image, &mut staging, opts, progress)?;
        Ok((
            PendingImage {
                names: vec![name.clone()],
                descriptor: image.descriptor.clone(),
                manifest: (
                    image.manifest_digest.clone(),
                    image.media_type.clone(),
                    image.manifest.clone(),
                ),
                config: (
                    image.config.digest.to_string(),
                    image.config_type.clone(),
                    image.config_bytes.clone(),
                ),
                layers,
            },
            fetched,
        ))
    })();
    match result {
        Ok((pending, fetched)) => {
            let mut images = staging.commit(vec![pending])?;
            Ok(Pulled {
                image: images
                    .pop()
                    .ok_or_else(|| Error::Corrupt("no image".into()))?,
                manifest_digest: image.manifest_digest,
                blobs_fetched: fetched,
            })
        }
        Err(e) => {
            staging.abort();
            Err(e)
        }
    }
}

/// An image manifest and its config, checked, before any layer is fetched.
struct Resolved {
    manifest: Vec<u8>,
    manifest_digest: String,
    media_type: String,
    /// The index entry that led to the manifest, or a descriptor of it.
    descriptor: Value,
    config: Descriptor,
    config_type: String,
    config_bytes: Vec<u8>,
    layers: Vec<Descriptor>,
    /// Each layer descriptor's annotations (zstd:chunked positions live there).
    layer_annotations: Vec<Option<Value>>,
    diff_ids: Vec<String>,
}

/// Fetch `GET /v2/<repo>/manifests/<reference>`, checking size (and a pinned digest).
fn fetch_manifest(
    client: &Client,
    reference: &str,
    expected: Option<&str>,
    opts: &PullOptions,
) -> Result<(Vec<u8>, String, String)> {
    let path = client.repo_path(&format!("manifests/{reference}"));
    let a = client.request(Method::GET, &path, &[("Accept", ACCEPT)], None)?;
    match a.status {
        200 => {}
        404 => {
            return Err(Error::NotFound(format!(
                "image {}/{}:{reference} ({})",
                client.registry(),
                client.repository(),
                a.reason()
            )))
        }
        _ => return Err(a.unexpected("fetching a manifest")),
    }
    let content_type = a
        .header("content-type")
        .map(|t| t.split(';').next().unwrap_or("").trim().to_string());
    let bytes = a.read_limited(opts.max_json, &format!("manifest {reference}"))?;
    let algorithm = match expected {
        Some(d) => OciDigest::parse(d)?.algorithm,
        None => crate::digest::OciAlgorithm::Sha256,
    };
    let digest = digest_of(algorithm, &bytes);
    if let Some(e) = expected {
        if digest != e {
            return Err(Error::DigestMismatch {
                what: format!("manifest {reference}"),
                expected: e.to_string(),
                found: digest,
            });
        }
    }
    let v = parse_json(&digest, &bytes)?;
    let media_type = v
        .get("mediaType")
        .and_then(Value::as_str)
        .map(String::from)
        .or(content_type)
        .unwrap_or_default();
    Ok((bytes, media_type, digest))
}

/// Follow the reference through indexes to one image manifest, then fetch its config.
fn resolve(
    client: &Client,
    r: &Reference,
    platform: &Platform,
    opts: &PullOptions,
) -> Result<Resolved> {
    let (mut bytes, mut media_type, mut digest) =
        fetch_manifest(client, r.manifest_ref(), r.digest.as_deref(), opts)?;
    let mut entry: Option<Value> = None;
    for _ in 0..=MAX_INDEX_DEPTH {
        let v = parse_json(&digest, &bytes)?;
        let is_index = matches!(media_type.as_str(), OCI_INDEX | DOCKER_LIST)
            || (v.get("manifests").is_some() && v.get("layers").is_none());
        if !is_index {
            return manifest_and_config(client, bytes, media_type, digest, entry, &v, opts);
        }
        let chosen = choose(&v, &digest, platform, r)?;
        let d = descriptor(&chosen, &digest)?;
        let child = d.digest.to_string();
        (bytes, media_type, digest) = fetch_manifest(client, &child, Some(&child), opts)?;
        if bytes.len() as u64 != d.size {
            return Err(Error::SizeMismatch {
                blob: child,
                expected: d.size,
                found: bytes.len() as u64,
            });
        }
        if let Some(mt) = &d.media_type {
            media_type = mt.clone();
        }
        entry = Some(chosen);
    }
    Err(Error::InvalidImage {
        blob: digest,
        reason: "indexes nested too deep".into(),
    })
}

/// The entry of index `v` for `platform`; a clear `NotFound` naming the platforms offered.
fn choose(v: &Value, blob: &str, platform: &Platform, r: &Reference) -> Result<Value> {
    let entries = v
        .get("manifests")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::InvalidImage {
            blob: blob.to_string(),
            reason: "no \"manifests\" array".into(),
        })?;
    let mut offered = Vec::new();
    for e in entries {
        if e.get("artifactType").is_some()
            || oci::annotation(e, oci::DOCKER_REFERENCE_TYPE).is_some()
        {
            continue; // attestations, signatures
        }
        match e.get("platform") {
            Some(p) if platform.matches(p) => return Ok(e.clone()),
            Some(p) => offered.push(Platform::describe(p)),
            None => return Ok(e.clone()), // an index that does not name platforms
        }
    }
    Err(Error::NotFound(format!(
        "no image for platform {platform} in {r} (it offers {})",
        if offered.is_empty() {
            "none".to_string()
        } else {
            offered.join(", ")
        }
    )))
}

fn manifest_and_config(
    client: &Client,
    manifest: Vec<u8>,
    media_type: String,
    digest: String,
    entry: Option<Value>,
    m: &Value,
    opts: &PullOptions,
) -> Result<Resolved> {
    let media_type = match media_type.as_str() {
        OCI_MANIFEST | DOCKER_MANIFEST => media_type,
        "" => OCI_MANIFEST.to_string(),
        other => {
            return Err(Error::InvalidImage {
                blob: digest,
                reason: format!("manifest type {other:?} is not an image manifest"),
            })
        }
    };
    let invalid = |reason: &str| Error::InvalidImage {
        blob: digest.clone(),
        reason: reason.to_string(),
    };
    let config = descriptor(
        m.get("config")
            .ok_or_else(|| invalid("manifest has no config"))?,
        &digest,
    )?;
    let config_type = config.media_type.clone().unwrap_or_default();
    if config_type != OCI_CONFIG && config_type != DOCKER_CONFIG {
        return Err(invalid(&format!(
            "config type {config_type:?} is not an image config (an artifact?)"
        )));
    }
    let raw_layers = m
        .get("layers")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("manifest has no \"layers\" array"))?;
    let layers = raw_layers
        .iter()
        .map(|l| descriptor(l, &digest))
        .collect::<Result<Vec<_>>>()?;
    let layer_annotations = raw_layers
        .iter()
        .map(|l| l.get("annotations").cloned())
        .collect();
    for l in &layers {
        let mt = l.media_type.as_deref().unwrap_or("");
        if layer_compression(mt).is_none() {
            return Err(invalid(&format!(
                "layer {} has unknown media type {mt:?}",
                l.digest
            )));
        }
    }
    let config_bytes = fetch_small_blob(client, &config, opts)?;
    let config_name = config.digest.to_string();
    let ids = diff_ids(&config_name, &parse_json(&config_name, &config_bytes)?)?;
    if ids.len() != layers.len() {
        return Err(invalid(&format!(
            "config {config_name} lists {} diff_ids for {} layers",
            ids.len(),
            layers.len()
        )));
    }
    let descriptor = entry.unwrap_or_else(
        || json!({"mediaType": media_type, "digest": digest, "size": manifest.len()}),
    );
    Ok(Resolved {
        manifest,
        manifest_digest: digest,
        media_type,
        descriptor,
        config,
        config_type,
        config_bytes,
        layers,
        layer_annotations,
        diff_ids: ids,
    })
}

/// A config blob, size and digest checked.
fn fetch_small_blob(client: &Client, d: &Descriptor, opts: &PullOptions) -> Result<Vec<u8>> {
    let name = d.digest.to_string();
    if d.size > opts.max_json {
        return Err(Error::InvalidImage {
            blob: name,
            reason: format!("{} bytes is over the {}-byte limit", d.size, opts.max_json),
        });
    }
    let a = client.request(
        Method::GET,
        &client.repo_path(&format!("blobs/{name}")),
        &[],
        None,
    )?;
    match a.status {
        200 => {}
        404 => return Err(Error::MissingBlob { blob: name }),
        _ => return Err(a.unexpected("fetching a config")),
    }
    let bytes = a.read_limited(opts.max_json, &name)?;
    crate::oci::check_blob(d, &bytes, "config")?;
    Ok(bytes)
}

/// The image's layers, bottom first: the held ones pinned, the others fetched `opts.jobs` at a
/// time. Returns them and how many blobs were downloaded.
fn layers(
    store: &Store,
    client: &Arc<Client>,
    image: &Resolved,
    staging: &mut Staging<'_>,
    opts: &PullOptions,
    progress: Progress<'_>,
) -> Result<(Vec<LayerInfo>, usize)> {
    let mut wanted: Vec<Wanted<'_>> = Vec::new();
    for ((d, diff_id), ann) in image
        .layers
        .iter()
        .zip(&image.diff_ids)
        .zip(&image.layer_annotations)
    {
        let member = blob_path(&d.digest);
        let blob = d.digest.to_string();
        if staging.layers.contains_key(&member) || wanted.iter().any(|w| w.0 == member) {
            continue; // the same blob twice in one image
        }
        if let Some(info) = held(store, staging, &member, &blob, d, diff_id)? {
            if info.diff_id != *diff_id {
                return Err(Error::DigestMismatch {
                    what: format!("diff_id of layer blob {blob} (as the store holds it)"),
                    expected: diff_id.clone(),
                    found: info.diff_id,
                });
            }
            continue;
        }
        wanted.push((member, blob, d, diff_id.as_str(), ann.as_ref()));
    }
    let source = RegistrySource {
        client: client.clone(),
        tmp: store.root().join("tmp"),
        own: staging.dir.clone(),
    };
    let fetched = fetch_all(store, staging, &source, &wanted, opts.jobs, progress);
    let mut first_error = None;
    for (w, result) in wanted.iter().zip(fetched) {
        match result {
            Some(Ok(f)) => {
                staging.record(&w.0, f);
            }
            Some(Err(e)) => {
                first_error.get_or_insert(e);
            }
            None => {}
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let infos = image
        .layers
        .iter()
        .map(|d| {
            staging
                .layers
                .get(&blob_path(&d.digest))
                .cloned()
                .ok_or_else(|| Error::Corrupt(format!("layer {} was not imported", d.digest)))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((infos, wanted.len()))
}

/// The layer the store holds for blob `d`, pinned, when the store can give the blob back
/// byte for byte (so a re-push or re-export stays digest-exact).
fn held(
    store: &Store,
    staging: &mut Staging<'_>,
    member: &str,
    blob: &str,
    d: &Descriptor,
    diff_id: &str,
) -> Result<Option<LayerInfo>> {
    let mt = d.media_type.as_deref().unwrap_or("");
    if layer_compression(mt) == Some(Compression::None) {
        if blob != diff_id {
            return Err(Error::DigestMismatch {
                what: format!("uncompressed layer blob {blob}"),
                expected: diff_id.to_string(),
                found: blob.to_string(),
            });
        }
        return staging.held(member, diff_id);
    }
    if layer_blob(&*store.conn()?, blob)?.is_some() {
        return staging.held(member, blob);
    }
    Ok(None)
}

/// Fetch `wanted` with up to `jobs` threads; a result per entry (`None`: not started, because
/// another failed first).
fn fetch_all(
    store: &Store,
    staging: &Staging<'_>,
    source: &RegistrySource,
    wanted: &[Wanted<'_>],
    jobs: usize,
    progress: Progress<'_>,
) -> Vec<Option<Result<FetchedLayer>>> {
    let total = AtomicU64::new(0);
    let stats = super::partial::PartialStats::default();
    super::bounded_map(wanted, jobs, |(member, blob, d, diff_id, annotations)| {
        let want = WantedBlob {
            member,
            blob,
            size: Some(d.size),
            digest: Some(blob),
            diff_id: Some(diff_id),
        };
        // Each import reports its own count; the caller sees the sum over layers.
        let last = AtomicU64::new(0);
        let report = |n: u64| {
            let before = last.swap(n, Ordering::SeqCst);
            let sum = total.fetch_add(n.saturating_sub(before), Ordering::SeqCst) + n - before;
            progress(sum)
        };
        let zstd = d.media_type.as_deref().and_then(layer_compression) == Some(Compression::Zstd);
        if zstd && annotations.is_some() {
            // Its errors are not passed through `blame_blob`, whose remedy re-downloads the
            // whole blob to hash it.
            let partial = super::partial::pull_layer(
                store,
                staging,
                &source.client,
                d,
                *annotations,
                diff_id,
                &stats,
                &report,
            )?;
            if let super::partial::Partial::Done(f) = partial {
                return Ok(*f);
            }
        }
        staging
            .fetch(source, &want, &report)
            .map_err(|e| blame_blob(source, blob, e))
    })
}

/// A layer blob to download: its member name, digest, descriptor, diff_id and annotations.
type Wanted<'a> = (String, String, &'a Descriptor, &'a str, Option<&'a Value>);

/// A blob that fails as a layer (bad gzip, bad tar) may simply not be the blob the manifest
/// names: the import stops at the first bad byte, before the digest is known. Hash the blob
/// once more as the registry sends it, and report a digest mismatch as what it is.
fn blame_blob(source: &RegistrySource, blob: &str, e: Error) -> Error {
    if e.kind() != ErrorKind::InvalidLayer {
        return e;
    }
    let Ok(Some((mut reader, _))) = source.open(&blob_path(&match OciDigest::parse(blob) {
        Ok(d) => d,
        Err(_) => return e,
    })) else {
        return e;
    };
    let mut w = HashWriter::new(io::sink());
    if io::copy(&mut reader, &mut w).is_err() {
        return e;
    }
    let (_, found, _) = w.finish();
    if found.starts_with("sha256:") && blob.starts_with("sha256:") && found != blob {
        return Error::DigestMismatch {
            what: format!("layer blob {blob} as the registry sent it"),
            expected: blob.to_string(),
            found,
        };
    }
    e
}

/// The registry's blobs seen as an image source (`blobs/<alg>/<hex>` → a streamed GET).
struct RegistrySource {
    client: Arc<Client>,
    /// The store's `tmp/`, where a pull killed part-way left its copy of a blob.
    tmp: PathBuf,
    /// This pull's staging directory.
    own: PathBuf,
}

impl RegistrySource {
    /// Take over the copy of blob `hex` that a pull killed part-way left (in the staging
    /// directory of a process that is gone): moved into this pull's staging directory, so that
    /// no other pull takes it too. Its bytes are checked like any others, by the import.
    fn adopt(&self, hex: &str) -> Option<(fs::File, u64)> {
        for e in fs::read_dir(&self.tmp).ok()?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(owner) = name.strip_prefix("oci-") else {
                continue;
            };
            if !crate::owner::owner_gone(owner) {
                continue;
            }
            let partial = e.path().join(format!("{hex}.part"));
            let adopted = self.own.join(format!("{hex}.adopted"));
            if fs::rename(&partial, &adopted).is_err() {
                continue;
            }
            let f = fs::File::open(&adopted).ok()?;
            let len = f.metadata().ok()?.len();
            return (len > 0).then_some((f, len));
        }
        None
    }

    /// The rest of a blob from byte `have` on, if the registry serves ranges: the reader and
    /// the blob's whole size.
    fn rest(&self, path: &str, have: u64) -> Result<Option<(ResumingBody, u64)>> {
        let range = format!("bytes={have}-");
        let a = self
            .client
            .request(Method::GET, path, &[("Range", &range)], None)?;
        let total = a
            .header("content-range")
            .filter(|_| a.status == 206)
            .and_then(|r| {
                let (span, total) = r.trim().strip_prefix("bytes ")?.split_once('/')?;
                (span.split_once('-')?.0 == have.to_string()).then_some(())?;
                total.parse::<u64>().ok()
            });
        let Some(total) = total.filter(|&t| t > have) else {
            return Ok(None);
        };
        Ok(Some((
            ResumingBody {
                client: self.client.clone(),
                path: path.to_string(),
                offset: have,
                size: total,
                body: Some(a.into_reader()),
                resumes: 0,
            },
            total,
        )))
    }
}

impl Source for RegistrySource {
    fn open(&self, name: &str) -> Result<Option<Opened>> {
        let Some((alg, hex)) = name.strip_prefix("blobs/").and_then(|r| r.split_once('/')) else {
            return Ok(None);
        };
        let path = self.client.repo_path(&format!("blobs/{alg}:{hex}"));
        if let Some((file, have)) = self.adopt(hex) {
            if let Some((rest, total)) = self.rest(&path, have)? {
                return Ok(Some((Box::new(file.take(have).chain(rest)), total)));
            }
        }
        let a = self.client.request(Method::GET, &path, &[], None)?;
        match a.status {
            200 => {}
            404 => return Ok(None),
            _ => return Err(a.unexpected("fetching a blob")),
        }
        let size = a.content_length().ok_or_else(|| Error::Registry {
            url: super::client::redact(&a.url),
            reason: "a blob came without Content-Length".into(),
        })?;
        Ok(Some((
            Box::new(ResumingBody {
                client: self.client.clone(),
                path,
                offset: 0,
                size,
                body: Some(a.into_reader()),
                resumes: 0,
            }),
            size,
        )))
    }

    fn describe(&self) -> String {
        format!("{}/{}", self.client.registry(), self.client.repository())
    }
}

/// A blob body that, when its connection drops, asks for the rest with `Range`.
struct ResumingBody {
    client: Arc<Client>,
    path: String,
    offset: u64,
    size: u64,
    body: Option<ureq::BodyReader<'static>>,
    resumes: u32,
}

impl ResumingBody {
    fn resume(&mut self, why: &str) -> io::Result<()> {
        self.body = None;
        let fail = |reason: String| {
            io::Error::other(Error::Network {
                url: self.client.url(&self.path),
                reason,
            })
        };
        if self.resumes >= MAX_RESUMES {
            return Err(fail(format!("{why} (after {MAX_RESUMES} resumes)")));
        }
        self.resumes += 1;
        let range = format!("bytes={}-", self.offset);
        let a = self
            .client
            .request(Method::GET, &self.path, &[("Range", &range)], None)
            .map_err(io::Error::other)?;
        let want = format!("bytes {}-", self.offset);
        let resumed = a.status == 206
            && a.header("content-range")
                .is_some_and(|r| r.trim().starts_with(&want));
        if !resumed {
            return Err(fail(format!("{why}; the registry cannot resume it")));
        }
        self.body = Some(a.into_reader());
        Ok(())
    }
}

impl Read for ResumingBody {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.offset >= self.size || buf.is_empty() {
                return Ok(0);
            }
            let Some(body) = self.body.as_mut() else {
                self.resume("the connection dropped")?;
                continue;
            };
            let max = buf.len().min((self.size - self.offset) as usize);
            match body.read(&mut buf[..max]) {
                Ok(0) => self.resume("the body ended early")?,
                Ok(n) => {
                    self.offset += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => self.resume(&e.to_string())?,
            }
        }
    }
}
