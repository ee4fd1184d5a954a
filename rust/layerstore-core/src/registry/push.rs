//! Push: the image as OCI export plans it ([`Store::plan_image`]), its blobs uploaded
//! (several at once), then the manifest.
//!
//! Invariants:
//! - The bytes pushed are the bytes an OCI export of the same image writes: a recorded manifest
//!   is re-emitted as is over the blobs it names (kept ones copied, the others rebuilt by the
//!   encoder the import proved reproduces them), else a deterministic manifest over
//!   deterministically compressed blobs; every blob is hashed as it is sent and checked against
//!   its planned digest before the upload is committed.
//! - A blob whose digest is known is first asked for (`HEAD`); one the registry has is not sent,
//!   and one the store pulled from another repository of the same registry is mounted from there
//!   (`POST …?mount=&from=`; a registry that declines opens an upload instead, which is used).
//!   A blob up to one chunk goes up in one `PUT`, a larger one in `PATCH`es with
//!   `Content-Range` (sent on a thread of their own while the next chunk is compressed); the
//!   upload is committed only with the digest of what was sent.
//! - The manifest goes last, after every blob it names is in the registry; the image is then
//!   recorded as pushed (manifest, config, and the digests of blobs compressed for the push, so
//!   a re-push knows them without compressing again).

use std::collections::HashMap;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use rusqlite::TransactionBehavior;
use ureq::http::Method;

use super::client::{Client, ClientOptions};
use super::reference::Reference;
use crate::compress::Compression;
use crate::error::{Error, ErrorKind, Result};
use crate::oci::{
    record_image, record_layer_blob, zstd_chunked, BlobPlan, ImageDocs, LayerBlob, Rebuild,
};
use crate::stack::Stack;
use crate::store::{Progress, Store};

/// How to push.
#[derive(Clone, Debug)]
pub struct PushOptions {
    /// `None` keeps an imported image's blobs (new layers are gzipped); else recompress all.
    pub compression: Option<Compression>,
    pub client: ClientOptions,
    /// Blobs uploaded at once.
    pub jobs: usize,
    /// Blobs larger than this go up in `PATCH`es of this size.
    pub chunk_size: usize,
    /// Push zstd:chunked layers ([`zstd_chunked`]; `compression` is then zstd).
    pub zstd_chunked: bool,
}

impl PushOptions {
    /// Set the compression from its name: `gzip`, `zstd`, `zstd:chunked` or `none`.
    pub fn set_compression(&mut self, name: &str) -> Result<()> {
        self.zstd_chunked = name == "zstd:chunked";
        let name = if self.zstd_chunked { "zstd" } else { name };
        self.compression = Some(Compression::parse(Some(name))?);
        Ok(())
    }
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions {
            compression: None,
            client: ClientOptions::default(),
            jobs: 4,
            chunk_size: 8 << 20,
            zstd_chunked: false,
        }
    }
}

/// What a push did.
#[derive(Clone, Debug)]
pub struct Pushed {
    pub manifest_digest: String,
    /// Layer and config blobs sent (the others the registry had, or mounted).
    pub blobs_uploaded: u64,
    /// Layer blobs mounted from another repository of the registry.
    pub blobs_mounted: u64,
    /// Blob bytes sent (not counting the manifest).
    pub bytes_uploaded: u64,
}

/// Push `stack` to `reference` (its tag, or its digest when it has no tag).
pub fn push(
    store: &Store,
    stack: &Stack,
    reference: &str,
    opts: &PushOptions,
    progress: Progress<'_>,
) -> Result<Pushed> {
    let r = Reference::parse(reference)?;
    let mut plan = store.plan_image(stack, opts.compression)?;
    let annotate = opts.zstd_chunked && zstd_chunked::plan(store, &mut plan)?;
    let client = Client::connect(&r.registry, r.api_host(), &r.repository, &opts.client, true)?;
    let counters = Counters::default();
    let mounts = mount_sources(store, &r)?;
    let ctx = LayerUploads {
        store,
        client: &client,
        chunk: opts.chunk_size,
        counters: &counters,
        mounts: &mounts,
        progress,
        chunked: Mutex::default(),
    };
    let descs = upload_layers(&ctx, &plan.blobs, opts.jobs)?;
    let chunked = ctx.chunked.into_inner().expect("not poisoned");
    let mut docs = plan.head.finish(&descs, None)?;
    if annotate {
        let by_digest = chunked
            .iter()
            .map(|(d, w)| (d.clone(), w.annotations.clone()))
            .collect();
        docs = zstd_chunked::annotate(docs, &by_digest)?;
    }
    upload_bytes(&client, &docs.config, &docs.digests.config, &counters)?;
    if let Some(pinned) = &r.digest {
        if *pinned != docs.digests.manifest {
            return Err(Error::InvalidArgument(format!(
                "{reference} names digest {pinned}, but the image's manifest is {}",
                docs.digests.manifest
            )));
        }
    }
    let target = r.tag.as_deref().unwrap_or(&docs.digests.manifest);
    let a = client.request(
        Method::PUT,
        &client.repo_path(&format!("manifests/{target}")),
        &[("Content-Type", docs.digests.media_type.as_str())],
        Some(&docs.manifest),
    )?;
    if a.status != 201 && a.status != 200 {
        return Err(a.unexpected("putting the manifest"));
    }
    if let Some(d) = a.header("docker-content-digest") {
        if d != docs.digests.manifest {
            return Err(Error::DigestMismatch {
                what: "manifest as the registry stored it".into(),
                expected: docs.digests.manifest.clone(),
                found: d,
            });
        }
    }
    record(store, stack, &plan.blobs, &descs, &docs, &chunked)?;
    Ok(Pushed {
        manifest_digest: docs.digests.manifest,
        blobs_uploaded: counters.blobs.load(Ordering::SeqCst),
        blobs_mounted: counters.mounted.load(Ordering::SeqCst),
        bytes_uploaded: counters.bytes.load(Ordering::SeqCst),
    })
}

#[derive(Default)]
struct Counters {
    blobs: AtomicU64,
    mounted: AtomicU64,
    bytes: AtomicU64,
}

/// For each layer id, a repository of the target's registry that the store pulled it from
/// (an image the store holds tagged `registry/repository:…`): the registry likely still holds
/// its blob there, to be mounted instead of uploaded.
fn mount_sources(store: &Store, target: &Reference) -> Result<HashMap<String, String>> {
    let mut sources = HashMap::new();
    let conn = store.conn()?;
    for tag in crate::meta::list_refs(&conn)? {
        let Ok(r) = Reference::parse(&tag) else {
            continue;
        };
        if r.registry != target.registry || r.repository == target.repository {
            continue;
        }
        for layer in crate::meta::get_ref(&conn, &tag)? {
            sources.entry(layer).or_insert_with(|| r.repository.clone());
        }
    }
    Ok(sources)
}

/// What every layer upload of one push shares.
struct LayerUploads<'a> {
    store: &'a Store,
    client: &'a Client,
    chunk: usize,
    counters: &'a Counters,
    mounts: &'a HashMap<String, String>,
    progress: Progress<'a>,
    /// The zstd:chunked blobs of this push, by digest: annotations (and, for those written,
    /// their chunks' digests).
    chunked: Mutex<HashMap<String, zstd_chunked::Written>>,
}

/// Record the pushed image, and how to rebuild the blobs compressed for this push.
fn record(
    store: &Store,
    stack: &Stack,
    plans: &[BlobPlan],
    descs: &[(String, u64, String)],
    docs: &ImageDocs,
    chunked: &HashMap<String, zstd_chunked::Written>,
) -> Result<()> {
    let pending = docs.pending(&stack.layers);
    let mut conn = store.conn()?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    for (p, (digest, size, _)) in plans.iter().zip(descs) {
        let compression = match p.how {
            Rebuild::ParGzip => Compression::Gzip,
            Rebuild::Tar(c @ (Compression::Gzip | Compression::Zstd)) => c,
            Rebuild::ZstdChunked => {
                if let Some(w) = chunked.get(digest) {
                    crate::meta::chunked::put_annotations(&tx, digest, &w.annotations)?;
                    crate::meta::chunked::put_sha256(&tx, &w.chunk_digests)?;
                }
                Compression::Zstd
            }
            _ => continue,
        };
        if p.digest.is_none() {
            record_layer_blob(
                &tx,
                &LayerBlob {
                    digest: digest.clone(),
                    layer: p.info.id.to_string(),
                    compression: compression.name().unwrap_or("none"),
                    size: *size,
                    rebuild: p.how,
                },
            )?;
        }
    }
    record_image(&tx, &pending, &stack.chain_id)?;
    tx.commit()?;
    Ok(())
}

/// Upload the layer blobs `jobs` at a time; (digest, size, media type) bottom first.
fn upload_layers(
    ctx: &LayerUploads<'_>,
    plans: &[BlobPlan],
    jobs: usize,
) -> Result<Vec<(String, u64, String)>> {
    let results = super::bounded_map(plans, jobs, |p| upload_layer(ctx, p));
    let mut out = Vec::with_capacity(plans.len());
    let mut first_error = None;
    for (p, r) in plans.iter().zip(results) {
        match r {
            Some(Ok((digest, size))) => out.push((digest, size, p.media_type.clone())),
            Some(Err(e)) => {
                first_error.get_or_insert(e);
            }
            None => {}
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// The size of blob `digest` in the registry, if it has it.
fn remote_size(client: &Client, digest: &str) -> Result<Option<u64>> {
    let a = client.request(
        Method::HEAD,
        &client.repo_path(&format!("blobs/{digest}")),
        &[],
        None,
    )?;
    match a.status {
        200 => Ok(Some(a.content_length().unwrap_or(0))),
        404 => Ok(None),
        _ => Err(a.unexpected("asking for a blob")),
    }
}

fn upload_layer(ctx: &LayerUploads<'_>, p: &BlobPlan) -> Result<(String, u64)> {
    let LayerUploads {
        store,
        client,
        chunk,
        counters,
        progress,
        ..
    } = *ctx;
    let mut session = None;
    if let Some(d) = &p.digest {
        if p.how == Rebuild::ZstdChunked {
            // The manifest needs the blob's annotations, recorded when it was first written.
            let annotations = zstd_chunked::recorded_annotations(store, d)?
                .ok_or_else(|| Error::Corrupt(format!("annotations of {d} are missing")))?;
            ctx.chunked.lock().expect("not poisoned").insert(
                d.clone(),
                zstd_chunked::Written {
                    digest: d.clone(),
                    size: 0,
                    annotations,
                    chunk_digests: Vec::new(),
                },
            );
        }
        if let Some(size) = remote_size(client, d)? {
            return Ok((d.clone(), size));
        }
        if let Some(from) = ctx.mounts.get(&p.info.id.to_string()) {
            // A token scoped to this repository alone may not cover `from`: upload instead.
            match Session::mount(client, counters, d, from) {
                Ok(None) => {
                    counters.mounted.fetch_add(1, Ordering::SeqCst);
                    let size = remote_size(client, d)?.unwrap_or(0);
                    return Ok((d.clone(), size));
                }
                Ok(Some(s)) => session = Some(s),
                Err(e) if e.kind() == ErrorKind::PermissionDenied => {}
                Err(e) => return Err(e),
            }
        }
    }
    let session = match session {
        Some(s) => s,
        None => Session::start(client, counters)?,
    };
    // The blob is compressed on this thread while the previous chunk travels on another.
    let (digest, size) = std::thread::scope(|s| {
        let (tx, rx) = crossbeam_channel::bounded::<Vec<u8>>(2);
        let sender = s.spawn(move || -> Result<Session<'_>> {
            let mut session = session;
            for data in rx {
                session.patch(&data)?;
            }
            Ok(session)
        });
        let mut chunks = Chunks {
            tx: Some(tx),
            buf: Vec::new(),
            chunk,
        };
        let written = if p.how == Rebuild::ZstdChunked {
            write_chunked(ctx, p, &mut chunks)
        } else {
            store.write_planned_blob(p, &mut chunks, progress)
        };
        let last = std::mem::take(&mut chunks.buf);
        drop(chunks);
        // A failed PATCH explains a failed write best.
        let session = sender
            .join()
            .map_err(|_| Error::Corrupt("the upload thread panicked".into()))??;
        let (digest, size) = written?;
        session.finish(&digest, &last)?;
        Ok::<_, Error>((digest, size))
    })?;
    counters.blobs.fetch_add(1, Ordering::SeqCst);
    Ok((digest, size))
}

/// Write layer blob `p` as zstd:chunked, keeping what the manifest and the record need.
fn write_chunked(
    ctx: &LayerUploads<'_>,
    p: &BlobPlan,
    out: &mut dyn Write,
) -> Result<(String, u64)> {
    let w = zstd_chunked::write_layer(ctx.store, &p.info, out, ctx.progress)?;
    if let Some(expected) = &p.digest {
        if *expected != w.digest {
            return Err(Error::DigestMismatch {
                what: format!("rebuilt zstd:chunked blob of {}", p.info.diff_id),
                expected: expected.clone(),
                found: w.digest,
            });
        }
    }
    let out = (w.digest.clone(), w.size);
    let mut known = ctx.chunked.lock().expect("not poisoned");
    known.insert(w.digest.clone(), w);
    Ok(out)
}

/// A small blob (the config): asked for, then sent in one request if missing.
fn upload_bytes(client: &Client, bytes: &[u8], digest: &str, counters: &Counters) -> Result<()> {
    if remote_size(client, digest)?.is_some() {
        return Ok(());
    }
    Session::start(client, counters)?.finish(digest, bytes)?;
    counters.blobs.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

/// Cuts what is written into chunks of `chunk` bytes for the upload thread, keeping back the
/// last (at most `chunk` bytes), which goes with the committing `PUT`: a blob of one chunk or
/// less is sent in that one request.
struct Chunks {
    tx: Option<crossbeam_channel::Sender<Vec<u8>>>,
    buf: Vec<u8>,
    chunk: usize,
}

impl Write for Chunks {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        while self.buf.len() > self.chunk {
            let rest = self.buf.split_off(self.chunk);
            let full = std::mem::replace(&mut self.buf, rest);
            let sent = self.tx.as_ref().is_some_and(|tx| tx.send(full).is_ok());
            if !sent {
                return Err(io::Error::other("the upload stopped"));
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A blob upload session: `PATCH`es chunks with `Content-Range`, and commits with a `PUT`
/// carrying the digest (and the last bytes).
struct Session<'c> {
    client: &'c Client,
    location: String,
    offset: u64,
    counters: &'c Counters,
}

impl<'c> Session<'c> {
    fn start(client: &'c Client, counters: &'c Counters) -> Result<Self> {
        let a = client.request(
            Method::POST,
            &client.repo_path("blobs/uploads/"),
            &[],
            Some(&[]),
        )?;
        Self::started(client, counters, a)
    }

    /// Ask the registry to mount blob `digest` from repository `from`: `None` when it did, else
    /// the upload session it opened instead (as the distribution spec says it may).
    fn mount(
        client: &'c Client,
        counters: &'c Counters,
        digest: &str,
        from: &str,
    ) -> Result<Option<Self>> {
        let path = client.repo_path(&format!("blobs/uploads/?mount={digest}&from={from}"));
        let a = client.request(Method::POST, &path, &[], Some(&[]))?;
        if a.status == 201 {
            return Ok(None);
        }
        Self::started(client, counters, a).map(Some)
    }

    fn started(
        client: &'c Client,
        counters: &'c Counters,
        a: super::client::Answer,
    ) -> Result<Self> {
        if a.status != 202 {
            return Err(a.unexpected("starting an upload"));
        }
        let location = a
            .header("location")
            .ok_or_else(|| a.unexpected("starting an upload (no Location)"))?;
        Ok(Session {
            client,
            location: client.url(&location),
            offset: 0,
            counters,
        })
    }

    /// Send `data` as the next chunk.
    fn patch(&mut self, data: &[u8]) -> Result<()> {
        let end = self.offset + data.len() as u64;
        let range = format!("{}-{}", self.offset, end - 1);
        let a = self.client.request(
            Method::PATCH,
            &self.location,
            &[
                ("Content-Type", "application/octet-stream"),
                ("Content-Range", &range),
            ],
            Some(data),
        )?;
        if a.status != 202 {
            return Err(a.unexpected("uploading a chunk"));
        }
        if let Some(l) = a.header("location") {
            self.location = self.client.url(&l);
        }
        self.counters
            .bytes
            .fetch_add(data.len() as u64, Ordering::SeqCst);
        self.offset = end;
        Ok(())
    }

    /// Commit the upload as `digest`, `last` (possibly empty) being its final bytes.
    fn finish(self, digest: &str, last: &[u8]) -> Result<()> {
        let sep = if self.location.contains('?') {
            '&'
        } else {
            '?'
        };
        let url = format!("{}{sep}digest={digest}", self.location);
        let a = self.client.request(
            Method::PUT,
            &url,
            &[("Content-Type", "application/octet-stream")],
            Some(last),
        )?;
        if a.status != 201 {
            return Err(a.unexpected("committing an upload"));
        }
        self.counters
            .bytes
            .fetch_add(last.len() as u64, Ordering::SeqCst);
        Ok(())
    }
}
