//! The import side of OCI layouts: walking indexes to the image manifests they name, checking
//! every JSON blob, then importing layers under a [`Staging`] that undoes them on failure.

use super::*;

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

/// A layer blob an import wants: where it is in the source and what it must be.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WantedBlob<'a> {
    /// Its name in the source (`blobs/sha256/<hex>`).
    pub member: &'a str,
    /// What to call it in messages (its digest).
    pub blob: &'a str,
    pub size: Option<u64>,
    pub digest: Option<&'a str>,
    pub diff_id: Option<&'a str>,
}

/// A layer imported by [`Staging::fetch`], not yet recorded in the staging.
pub(crate) struct FetchedLayer {
    pub info: LayerInfo,
    created: bool,
    blob: Option<LayerBlob>,
    /// What its tar import reported (sanitised entries, clamped times), naming the blob.
    warnings: Vec<String>,
}

impl FetchedLayer {
    /// Say how the store rebuilds the compressed blob this layer came from, for a layer imported
    /// from a tar the import saw uncompressed (a partial pull's).
    pub(crate) fn rebuilt_as(mut self, blob: LayerBlob) -> Self {
        self.blob.get_or_insert(blob);
        self
    }
}

/// The original bytes of a blob: the copy made while importing it when that copy is whole
/// (so a remote source is not read twice), else the source again.
struct Original<'a> {
    src: &'a dyn Source,
    member: &'a str,
    teed: &'a Path,
    size: u64,
}

impl Original<'_> {
    fn open(&self) -> Result<Option<source::Opened>> {
        if let Ok(f) = fs::File::open(self.teed) {
            if f.metadata().is_ok_and(|m| m.len() == self.size) {
                return Ok(Some((Box::new(f), self.size)));
            }
        }
        self.src.open(self.member)
    }
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
///
/// The import holds a lease for its whole life and pins every layer it uses, whether it created
/// the layer or found it in the store, so that neither another import's undo nor `delete` removes
/// a layer it is about to record. Dropping the staging ends the lease and its pins: after
/// `commit` the images' tags protect their layers instead.
pub(crate) struct Staging<'s> {
    store: &'s Store,
    pub dir: PathBuf,
    lease: crate::lease::Lease,
    created: Vec<LayerInfo>,
    pub layers: HashMap<String, LayerInfo>,
    pub blobs: Vec<LayerBlob>,
    known_blobs: HashSet<String>,
    /// The warnings of the layers this import read, by layer: each image reports its layers'.
    warnings: HashMap<crate::digest::Blake3, Vec<String>>,
}

impl<'s> Staging<'s> {
    pub fn new(store: &'s Store) -> Result<Self> {
        let name = crate::owner::owned_tmp_name("oci");
        let lease = store.lease(&*store.conn()?, &format!("tmp/{name}"))?;
        let dir = store.root().join("tmp").join(name);
        if let Err(e) = fs::create_dir_all(&dir) {
            lease.release(&*store.conn()?);
            return Err(Error::io(format!("creating {}", dir.display()), e));
        }
        Ok(Staging {
            store,
            dir,
            lease,
            created: Vec::new(),
            layers: HashMap::new(),
            blobs: Vec::new(),
            known_blobs: HashSet::new(),
            warnings: HashMap::new(),
        })
    }

    /// Undo: delete the layers this import created, except those another live import has
    /// pinned since (it found them here and will record them), and the staged blobs.
    pub fn abort(self) {
        for info in self.created.iter().rev() {
            // A refusal (pinned by another import, or tagged meanwhile) is the point: keep it.
            let _ = self.store.delete_as(&info.id, self.lease.id);
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
        let want = WantedBlob {
            member,
            blob,
            size: expected_size,
            digest: expected_digest,
            diff_id,
        };
        let fetched = self.fetch(src, &want, progress)?;
        Ok(self.record(member, fetched))
    }

    /// The import part of [`Staging::layer`], shared (`&self`) so that several layers can be
    /// imported at once; [`Staging::record`] then adds each to the staging. A layer it created
    /// and cannot finish (its blob could not be kept) is deleted before the error returns.
    pub fn fetch(
        &self,
        src: &dyn Source,
        want: &WantedBlob<'_>,
        progress: Progress<'_>,
    ) -> Result<FetchedLayer> {
        let WantedBlob {
            member,
            blob,
            size: expected_size,
            digest: expected_digest,
            diff_id,
        } = *want;
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
        // Named by the blob, so that a pull killed part-way leaves a copy the next one can
        // resume from (see `registry::pull`).
        let tee_name = match expected_digest.map(OciDigest::parse) {
            Some(Ok(d)) => d.hex,
            _ => crate::owner::unique_name(),
        };
        let tee_path = self.dir.join(format!("{tee_name}.part"));
        let reader: Box<dyn Read + Send> = if held {
            reader
        } else {
            let out =
                fs::File::create(&tee_path).ctx(|| format!("creating {}", tee_path.display()))?;
            Box::new(TeeFile {
                inner: reader,
                copy: Some(CopyThread::spawn(out).ctx(|| "starting the blob copy".into())?),
                first: true,
            })
        };
        let imported = self
            .store
            .import_tar_pinned(reader, &opts, Some(self.lease.id), progress);
        let imported: Imported = match imported {
            Ok(i) => i,
            Err(e) => {
                let _ = fs::remove_file(&tee_path);
                return Err(name_blob(e, blob));
            }
        };
        let created = !imported.existed;
        let warnings = imported
            .warnings
            .iter()
            .map(|w| format!("layer {blob}: {w}"))
            .collect();
        let info = imported.layer;
        let kept = self.kept_blob(src, member, &info, &tee_path, size);
        let _ = fs::remove_file(&tee_path);
        match kept {
            Ok(blob) => Ok(FetchedLayer {
                info,
                created,
                blob,
                warnings,
            }),
            Err(e) => {
                if created {
                    let _ = self.store.delete_as(&info.id, self.lease.id);
                }
                Err(e)
            }
        }
    }

    /// How the store will get the compressed blob of `info` back, for a blob it does not know
    /// yet: rebuilt by one of our encoders, or kept (staged from the copy made on import).
    fn kept_blob(
        &self,
        src: &dyn Source,
        member: &str,
        info: &LayerInfo,
        tee_path: &Path,
        size: u64,
    ) -> Result<Option<LayerBlob>> {
        let (Some(digest), Some(c)) = (&info.compressed_digest, info.compression.as_deref()) else {
            return Ok(None);
        };
        if self.known_blobs.contains(digest) || layer_blob(&*self.store.conn()?, digest)?.is_some()
        {
            return Ok(None);
        }
        let compression = Compression::parse(Some(c))?;
        let original = Original {
            src,
            member,
            teed: tee_path,
            size,
        };
        let rebuild = match self.reproducible(&original, info, compression)? {
            Some(r) => r,
            None => {
                self.keep(src, member, digest, tee_path, size)?;
                Rebuild::Kept
            }
        };
        Ok(Some(LayerBlob {
            digest: digest.clone(),
            layer: info.id.to_string(),
            compression: compression.name().unwrap_or("none"),
            size,
            rebuild,
        }))
    }

    /// Add a fetched layer to the staging (undone by [`Staging::abort`] if it created it).
    pub fn record(&mut self, member: &str, fetched: FetchedLayer) -> LayerInfo {
        if fetched.created {
            self.created.push(fetched.info.clone());
        }
        if !fetched.warnings.is_empty() {
            let said = self.warnings.entry(fetched.info.id).or_default();
            said.extend(fetched.warnings);
        }
        if let Some(b) = fetched.blob {
            if self.known_blobs.insert(b.digest.clone()) {
                self.blobs.push(b);
            }
        }
        self.layers.insert(member.to_string(), fetched.info.clone());
        fetched.info
    }

    /// Use the layer the store already holds under `key` (a diff_id, or the digest of a blob
    /// it was imported from) for `member`, pinned for this import; `None` if it holds none.
    pub fn held(&mut self, member: &str, key: &str) -> Result<Option<LayerInfo>> {
        let mut conn = self.store.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let info = match crate::meta::find_layer(&tx, key) {
            Ok(info) => info,
            Err(Error::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        crate::meta::pin_layer(&tx, self.lease.id, &info.id)?;
        tx.commit()?;
        self.layers.insert(member.to_string(), info.clone());
        Ok(Some(info))
    }

    /// Which of our encoders, recompressing the stored tar, gives back the blob byte for byte
    /// (compared as it is produced, so a blob from another compressor fails within its first
    /// blocks); `None` when neither does.
    fn reproducible(
        &self,
        original: &Original<'_>,
        info: &LayerInfo,
        compression: Compression,
    ) -> Result<Option<Rebuild>> {
        let mut tries = vec![Rebuild::Tar(compression)];
        if compression == Compression::Gzip {
            tries.insert(0, Rebuild::ParGzip);
        }
        for how in tries {
            let Some((original_bytes, size)) = original.open()? else {
                return Ok(None);
            };
            let mut cmp = CompareWriter {
                expected: original_bytes,
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

    /// Move kept blobs into the store and record blobs, images and tags in one transaction,
    /// consuming the staging; if that fails, undo as [`Staging::abort`] does, so a failed import
    /// leaves no layer behind.
    pub fn commit(self, images: Vec<PendingImage>) -> Result<Vec<ImportedImage>> {
        if let Err(e) = self.commit_inner(&images) {
            self.abort();
            return Err(e);
        }
        let _ = fs::remove_dir_all(&self.dir);
        let mut out = Vec::new();
        for image in images {
            let mut stack = self.store.stack(&image.layers)?;
            stack.image = Some(ImageDigests {
                manifest: image.manifest.0.clone(),
                config: image.config.0.clone(),
                media_type: image.manifest.1.clone(),
            });
            let warnings: Vec<String> = image
                .layers
                .iter()
                .filter_map(|l| self.warnings.get(&l.id))
                .flatten()
                .cloned()
                .collect();
            for name in &image.names {
                out.push(ImportedImage {
                    name: name.clone(),
                    stack: stack.clone(),
                    warnings: warnings.clone(),
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
            let staged = self.dir.join(hex);
            date_now(&staged)?;
            fs::rename(&staged, blob_dir.join(hex)).ctx(|| format!("storing blob {}", b.digest))?;
        }
        crate::cas::sync_dir(&blob_dir)?;
        let mut conn = self.store.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for b in &self.blobs {
            record_layer_blob(&tx, b)?;
        }
        for image in images {
            let stack = self.store.stack(&image.layers)?;
            record_image(&tx, image, &stack.chain_id)?;
            let ids: Vec<_> = stack.layers.iter().map(|l| l.id).collect();
            for name in &image.names {
                meta::oci::put_oci_ref(&tx, name, &image.manifest.0)?;
                crate::meta::put_ref(&tx, name, &stack.chain_id, &ids)?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

impl Drop for Staging<'_> {
    /// End the lease and its pins (a lease left behind would expire with the process anyway).
    fn drop(&mut self) {
        if let Ok(conn) = self.store.conn() {
            self.lease.release(&conn);
        }
    }
}

/// Record how the store gives back the compressed blob `b` of a layer.
pub(crate) fn record_layer_blob(conn: &Connection, b: &LayerBlob) -> Result<()> {
    meta::oci::put_layer_blob(
        conn,
        &meta::oci::LayerBlobRow {
            digest: &b.digest,
            layer: &b.layer,
            compression: b.compression,
            size: b.size,
            rebuild: b.rebuild.name(),
        },
    )
}

pub(crate) fn record_image(conn: &Connection, image: &PendingImage, chain_id: &str) -> Result<()> {
    let descriptor = serde_json::to_vec(&image.descriptor)
        .map_err(|e| Error::Corrupt(format!("encoding a descriptor: {e}")))?;
    let (m, c) = (&image.manifest, &image.config);
    meta::oci::record_image(
        conn,
        (&m.0, &m.1, &m.2),
        (&c.0, &c.1, &c.2),
        chain_id,
        &descriptor,
    )
}

/// Set a staged blob's modification time to now. `gc` deletes a file of `blobs/` that no row
/// names once it is older than [`crate::cas::RETIRE_GRACE`]; the grace must run from the move
/// into `blobs/`, not from when a long import wrote the blob, or a `gc` between the move and the
/// transaction recording it could take it.
fn date_now(path: &Path) -> Result<()> {
    fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(std::time::SystemTime::now()))
        .ctx(|| format!("dating {}", path.display()))
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
    meta::oci::layer_blob(conn, digest)?
        .map(|(c, r)| Rebuild::parse(&r, Compression::parse(Some(&c))?))
        .transpose()
}

/// Copies what is read into a file, unless the stream's first bytes say it is not compressed.
/// Copies what the import reads into a file, on a thread of its own: the import's reader
/// thread, which inflates a gzip layer, is its busiest, and the copy into the page cache (up to
/// a tenth of a second per 100 MB here, more when the host is slow to hand out memory) is taken
/// off it. A copy that fails stops short, and [`Staging::keep`] then copies the blob again.
struct TeeFile<R> {
    inner: R,
    copy: Option<CopyThread>,
    first: bool,
}

/// Bytes gathered before they go to the copying thread.
const COPY_BATCH: usize = 1 << 20;

struct CopyThread {
    tx: Option<crossbeam_channel::Sender<Vec<u8>>>,
    /// Buffers the thread has written, back for refilling (no fresh pages to fault in).
    spare: crossbeam_channel::Receiver<Vec<u8>>,
    pending: Vec<u8>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl CopyThread {
    fn spawn(mut out: fs::File) -> io::Result<Self> {
        let (tx, rx) = crossbeam_channel::bounded::<Vec<u8>>(4);
        let (spare_tx, spare) = crossbeam_channel::bounded::<Vec<u8>>(4);
        let handle = std::thread::Builder::new()
            .name("layerstore-keep".into())
            .spawn(move || {
                let mut flush = crate::cas::EarlyFlush::new(&out);
                for mut buf in rx {
                    if out.write_all(&buf).is_err() {
                        return; // the copy stops short; keeping the blob copies it anew
                    }
                    if let Some(f) = flush.as_mut() {
                        f.written(buf.len() as u64);
                    }
                    buf.clear();
                    let _ = spare_tx.try_send(buf);
                }
            })?;
        Ok(CopyThread {
            tx: Some(tx),
            spare,
            pending: Vec::with_capacity(COPY_BATCH),
            handle: Some(handle),
        })
    }

    /// Queue `bytes`; false once the thread has stopped (a failed write).
    fn push(&mut self, mut bytes: &[u8]) -> bool {
        while !bytes.is_empty() {
            let n = bytes.len().min(COPY_BATCH - self.pending.len());
            self.pending.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.pending.len() == COPY_BATCH && !self.send() {
                return false;
            }
        }
        true
    }

    fn send(&mut self) -> bool {
        let next = self
            .spare
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(COPY_BATCH));
        let full = std::mem::replace(&mut self.pending, next);
        self.tx.as_ref().is_some_and(|tx| tx.send(full).is_ok())
    }
}

impl Drop for CopyThread {
    /// The rest goes out and the thread ends before the import returns.
    fn drop(&mut self) {
        if !self.pending.is_empty() {
            self.send();
        }
        drop(self.tx.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
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
            self.copy = None;
        }
        if let Some(copy) = self.copy.as_mut() {
            if !copy.push(&buf[..n]) {
                self.copy = None;
            }
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

/// Most index, manifest and config blobs one walk over a layout reads, and most bytes of them. An
/// index may list one blob any number of times and nested indexes multiply that, so without a
/// budget a layout of a few kilobytes keeps the walk reading for ever (thirty entries per index,
/// seven deep: 30^7 reads), and one listing a large config many times fills memory with copies.
/// A blob listed again counts again. Real layouts stay far below: an image costs two reads.
pub(crate) const MAX_WALK_BLOBS: usize = 10_000;
pub(crate) const MAX_WALK_BYTES: u64 = 256 << 20;

struct Walk<'a> {
    src: &'a dyn Source,
    platform: Platform,
    explicit_platform: bool,
    found: Vec<Candidate>,
    other_platforms: Vec<String>,
    /// Blobs and bytes read so far, against [`MAX_WALK_BLOBS`] and [`MAX_WALK_BYTES`].
    blobs_read: usize,
    bytes_read: u64,
}

impl Walk<'_> {
    /// [`read_json_blob`], within the walk's budget.
    fn read(&mut self, d: &Descriptor) -> Result<(Vec<u8>, Value)> {
        self.blobs_read += 1;
        self.bytes_read = self.bytes_read.saturating_add(d.size);
        if self.blobs_read > MAX_WALK_BLOBS || self.bytes_read > MAX_WALK_BYTES {
            return Err(invalid(
                &d.digest.to_string(),
                format!(
                    "the layout's indexes reach more than {MAX_WALK_BLOBS} manifest, index and \
                     config blobs or {MAX_WALK_BYTES} bytes of them (a blob listed again counts \
                     again)"
                ),
            ));
        }
        read_json_blob(self.src, d)
    }

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
            let (bytes, value) = self.read(&d)?;
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
        let (config_bytes, config_value) = self.read(&config)?;
        let config_name = config.digest.to_string();
        let diff_ids = diff_ids(&config_name, &config_value)?;
        if diff_ids.len() != layers.len() {
            return Err(invalid(
                &config_name,
                format!(
                    "rootfs.diff_ids lists {}, manifest {blob} has {}",
                    crate::error::count(diff_ids.len(), "layer"),
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

/// The images of the layout `src` an import takes, for `platform` (the host's when `None`): its
/// `oci-layout` and `index.json` read, every index, manifest and config it reaches read and
/// checked, each layer blob's presence and size checked. Nothing is imported.
fn find_images(src: &dyn Source, platform: Option<&str>) -> Result<Vec<Candidate>> {
    let index = read_layout_index(src)?;
    let mut walk = Walk {
        src,
        platform: platform.map_or_else(|| Ok(Platform::host()), Platform::parse)?,
        explicit_platform: platform.is_some(),
        found: Vec::new(),
        other_platforms: Vec::new(),
        blobs_read: 0,
        bytes_read: 0,
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
    check_names(
        "index.json",
        walk.found.iter().filter_map(|c| c.name.as_deref()),
    )?;
    Ok(walk.found)
}

/// [`find_images`] for the fuzz targets: the number of layers of each image found, after
/// checking that every image has as many diff_ids as layers.
pub fn find_image_layers(src: &dyn Source, platform: Option<&str>) -> Result<Vec<usize>> {
    Ok(find_images(src, platform)?
        .iter()
        .map(|c| {
            assert_eq!(c.layers.len(), c.diff_ids.len(), "checked by the walk");
            c.layers.len()
        })
        .collect())
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

/// Refuse, before anything is imported, an image name that cannot become a tag.
pub(crate) fn check_names<'a>(blob: &str, names: impl IntoIterator<Item = &'a str>) -> Result<()> {
    for name in names {
        if let Some(why) = crate::store::bad_tag(name) {
            return Err(Error::InvalidImage {
                blob: blob.to_string(),
                reason: format!("image name {name:?}: {why}"),
            });
        }
    }
    Ok(())
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
        let found = find_images(src, platform)?;
        let mut staging = Staging::new(self)?;
        match self.import_candidates(src, found, &mut staging, progress) {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    #[test]
    fn the_copy_thread_writes_every_byte_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("copy");
        let data: Vec<u8> = (0..3 * COPY_BATCH + 12345)
            .map(|i| (i % 251) as u8)
            .collect();
        let mut copy = CopyThread::spawn(fs::File::create(&path).unwrap()).unwrap();
        for piece in data.chunks(32 * 1024 + 7) {
            assert!(copy.push(piece));
        }
        drop(copy); // the rest goes out, and the thread ends
        assert_eq!(fs::read(&path).unwrap(), data);
    }

    #[test]
    fn a_copy_that_cannot_be_written_stops_short_without_blocking_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("copy");
        fs::write(&path, b"").unwrap();
        let read_only = fs::File::open(&path).unwrap();
        let mut copy = CopyThread::spawn(read_only).unwrap();
        let batch = vec![7u8; COPY_BATCH];
        let stopped = (0..64).any(|_| !copy.push(&batch));
        assert!(stopped, "the reader learns the copy stopped");
        drop(copy);
        assert_eq!(fs::metadata(&path).unwrap().len(), 0);
    }

    #[test]
    fn a_blob_staged_long_ago_is_dated_now_when_it_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let staged = dir.path().join("blob");
        fs::write(&staged, b"layer bytes").unwrap();
        let long_ago = SystemTime::now() - 3 * crate::cas::RETIRE_GRACE;
        fs::File::options()
            .write(true)
            .open(&staged)
            .unwrap()
            .set_modified(long_ago)
            .unwrap();
        date_now(&staged).unwrap();
        let age = SystemTime::now()
            .duration_since(fs::metadata(&staged).unwrap().modified().unwrap())
            .unwrap_or_default();
        assert!(age < Duration::from_secs(60), "still {age:?} old");
        assert_eq!(fs::read(&staged).unwrap(), b"layer bytes");
    }
}
