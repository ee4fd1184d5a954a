//! Python bindings of layerstore: conversions, the one error mapping, GIL release. No logic.
//!
//! Calls that read or write layer data release the GIL (`py.detach`); they re-attach only to
//! check for signals (Ctrl-C) and to report progress, about every 8 MiB. Small calls (lookups of
//! metadata) keep the GIL: releasing it costs more than they do.

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use layerstore_core as core;
use layerstore_core::compress::Compression;
use layerstore_core::digest::Blake3;
use layerstore_core::layer::{Entry as CoreEntry, LayerInfo};
use layerstore_core::store::{ImportOptions, Imported};
use layerstore_core::tar::Limits as CoreLimits;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

mod analysis;
mod args;
mod changes;
mod container;
mod errors;
mod materialize;
mod mount;
mod oci;
mod pyobjects;
mod registry;
mod stack;

/// Layer data moves through many short-lived 128 KiB–1 MiB buffers across threads; glibc maps and
/// unmaps each of them (page faults, TLB shootdowns), mimalloc keeps and reuses them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use errors::{to_py, CoreResultExt};

/// Limits enforced while importing (bytes unless said otherwise).
#[pyclass(frozen, get_all, from_py_object, module = "layerstore._core")]
#[derive(Clone)]
struct Limits {
    /// Largest decompressed tar, in bytes.
    max_bytes: u64,
    /// Most entries in one tar (extension headers not counted).
    max_entries: u64,
    /// Largest PAX record set or GNU long name/link block, in bytes.
    max_record: u64,
    /// Most components in one path.
    max_path_depth: u32,
    /// Most bytes after the end-of-archive marker.
    max_trailing: u64,
}

#[pymethods]
impl Limits {
    /// Limits enforced while a tar streams in (sizes in bytes); every argument has a safe default.
    #[new]
    #[pyo3(signature = (*, max_bytes=None, max_entries=None, max_record=None, max_path_depth=None, max_trailing=None))]
    fn new(
        max_bytes: Option<i128>,
        max_entries: Option<i128>,
        max_record: Option<i128>,
        max_path_depth: Option<i128>,
        max_trailing: Option<i128>,
    ) -> PyResult<Self> {
        let d = CoreLimits::default();
        Ok(Limits {
            max_bytes: args::opt_int("max_bytes", max_bytes, 0)?.unwrap_or(d.max_bytes),
            max_entries: args::opt_int("max_entries", max_entries, 0)?.unwrap_or(d.max_entries),
            max_record: args::opt_int("max_record", max_record, 0)?.unwrap_or(d.max_record),
            max_path_depth: args::opt_int("max_path_depth", max_path_depth, 0)?
                .unwrap_or(d.max_path_depth),
            max_trailing: args::opt_int("max_trailing", max_trailing, 0)?.unwrap_or(d.max_trailing),
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "Limits(max_bytes={}, max_entries={}, max_record={}, max_path_depth={}, max_trailing={})",
            self.max_bytes, self.max_entries, self.max_record, self.max_path_depth, self.max_trailing
        )
    }
}

impl Limits {
    fn core(&self) -> CoreLimits {
        CoreLimits {
            max_bytes: self.max_bytes,
            max_entries: self.max_entries,
            max_record: self.max_record,
            max_path_depth: self.max_path_depth,
            max_trailing: self.max_trailing,
        }
    }
}

/// A content-addressed store of layers.
#[pyclass(frozen, module = "layerstore._core")]
pub(crate) struct Store {
    pub(crate) inner: Arc<core::Store>,
}

/// One stored layer (a changeset).
#[pyclass(frozen, module = "layerstore._core")]
pub(crate) struct Layer {
    store: Arc<core::Store>,
    info: LayerInfo,
    /// Per-stage seconds of the import that returned this object (None otherwise).
    timings: Option<Vec<(&'static str, f64)>>,
}

/// One entry of a layer's changeset.
#[pyclass(frozen, module = "layerstore._core")]
struct Entry {
    e: CoreEntry,
}

fn os_str(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

/// Where an import reads from.
enum Source {
    Path(PathBuf),
    Bytes(Vec<u8>),
    File(Py<PyAny>),
}

fn source(obj: &Bound<'_, PyAny>) -> PyResult<Source> {
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(Source::Bytes(b.as_bytes().to_vec()));
    }
    if obj.hasattr("read")? {
        return Ok(Source::File(obj.clone().unbind()));
    }
    if let Ok(p) = obj.extract::<PathBuf>() {
        return Ok(Source::Path(p));
    }
    if let Ok(v) = obj.extract::<Vec<u8>>() {
        return Ok(Source::Bytes(v));
    }
    Err(pyo3::exceptions::PyTypeError::new_err(
        "expected a path, bytes, or a binary file object",
    ))
}

impl Source {
    fn open(self) -> PyResult<Box<dyn Read + Send>> {
        Ok(match self {
            Source::Path(p) => Box::new(std::fs::File::open(&p).map_err(|e| io_to_py(e, &p))?),
            Source::Bytes(b) => Box::new(io::Cursor::new(b)),
            Source::File(f) => Box::new(PyReader(f)),
        })
    }
}

/// An I/O error on the caller's path, through the one mapping (which keeps the errno).
fn io_to_py(e: io::Error, p: &std::path::Path) -> PyErr {
    to_py(core::Error::io(p.display().to_string(), e))
}

/// A Python binary file object as a Rust reader (re-attaches for each read).
struct PyReader(Py<PyAny>);

impl Read for PyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Python::attach(|py| {
            let data = self
                .0
                .bind(py)
                .call_method1("read", (buf.len(),))
                .map_err(io::Error::other)?;
            let data = data
                .cast::<PyBytes>()
                .map_err(|_| io::Error::other("the file object must be opened in binary mode"))?;
            let bytes = data.as_bytes();
            let n = bytes.len().min(buf.len());
            buf[..n].copy_from_slice(&bytes[..n]);
            Ok(n)
        })
    }
}

/// A Python binary file object as a Rust writer.
struct PyWriter(Py<PyAny>);

impl Write for PyWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Python::attach(|py| {
            let n = self
                .0
                .bind(py)
                .call_method1("write", (PyBytes::new(py, buf),))
                .map_err(io::Error::other)?;
            Ok(n.extract::<Option<usize>>()
                .ok()
                .flatten()
                .unwrap_or(buf.len()))
        })
    }
    fn flush(&mut self) -> io::Result<()> {
        Python::attach(|py| {
            self.0
                .bind(py)
                .call_method0("flush")
                .map(|_| ())
                .map_err(io::Error::other)
        })
    }
}

/// Progress and Ctrl-C from inside a detached call: the first Python error is kept and re-raised.
pub(crate) struct Interrupts {
    callback: Option<Py<PyAny>>,
    error: Mutex<Option<PyErr>>,
}

impl Interrupts {
    pub(crate) fn new(callback: Option<Py<PyAny>>) -> Self {
        Interrupts {
            callback,
            error: Mutex::new(None),
        }
    }

    pub(crate) fn check(&self, done: u64) -> core::Result<()> {
        Python::attach(|py| {
            let res = py.check_signals().and_then(|()| match &self.callback {
                Some(cb) => cb.call1(py, (done,)).map(|_| ()),
                None => Ok(()),
            });
            res.map_err(|e| {
                if let Ok(mut slot) = self.error.lock() {
                    slot.get_or_insert(e);
                }
                core::Error::Cancelled
            })
        })
    }

    /// Re-raise the Python error that cancelled the call, if any.
    pub(crate) fn finish<T>(self, result: core::Result<T>) -> PyResult<T> {
        match result {
            Err(core::Error::Cancelled) => match self.error.into_inner().ok().flatten() {
                Some(e) => Err(e),
                None => Err(to_py(core::Error::Cancelled)),
            },
            other => other.py(),
        }
    }
}

fn emit_warnings(py: Python<'_>, warnings: &[String]) -> PyResult<()> {
    if warnings.is_empty() {
        return Ok(());
    }
    let category = pyobjects::LAYERSTORE_WARNING.get(py)?;
    for w in warnings {
        PyErr::warn(
            py,
            category,
            &std::ffi::CString::new(w.replace('\0', "\\0"))?,
            2,
        )?;
    }
    Ok(())
}

pub(crate) fn layer_id(layer: &Bound<'_, PyAny>) -> PyResult<String> {
    if let Ok(l) = layer.cast::<Layer>() {
        return Ok(l.get().info.id.to_string());
    }
    layer.extract::<String>()
}

#[pymethods]
impl Store {
    /// Open the store at `path`, creating it with these settings if it does not exist (an existing
    /// store keeps the settings it was created with).
    #[new]
    #[allow(clippy::too_many_arguments)] // mirrors the Python keyword arguments
    #[pyo3(signature = (path, *, compression_level=3, chunk_min=None, chunk_avg=None, chunk_max=None, max_depth=127, limits=None, readonly=false))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        compression_level: i32,
        chunk_min: Option<i128>,
        chunk_avg: Option<i128>,
        chunk_max: Option<i128>,
        max_depth: i128,
        limits: Option<Limits>,
        readonly: bool,
    ) -> PyResult<Self> {
        let d = core::chunk::ChunkParams::default();
        let options = core::store::StoreOptions {
            compression_level,
            chunk: core::chunk::ChunkParams {
                min: args::opt_int("chunk_min", chunk_min, 1)?.unwrap_or(d.min),
                avg: args::opt_int("chunk_avg", chunk_avg, 1)?.unwrap_or(d.avg),
                max: args::opt_int("chunk_max", chunk_max, 1)?.unwrap_or(d.max),
            },
            max_depth: args::int("max_depth", max_depth, 1)?,
        };
        let limits = limits.map(|l| l.core()).unwrap_or_default();
        let inner = py
            .detach(|| match readonly {
                true => core::Store::open_readonly(&path, limits),
                false => core::Store::open(&path, options, limits),
            })
            .py()?;
        Ok(Store {
            inner: Arc::new(inner),
        })
    }

    /// Whether the store is open read-only (asked for, or because its files cannot be written):
    /// reads work, writes raise `PermissionError`.
    #[getter]
    fn readonly(&self) -> bool {
        self.inner.readonly()
    }

    /// The store's directory.
    #[getter]
    fn path(&self) -> std::ffi::OsString {
        self.inner.root().as_os_str().to_os_string()
    }

    /// The settings fixed at creation.
    #[getter]
    fn settings<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let o = self.inner.options();
        let d = PyDict::new(py);
        d.set_item("compression_level", o.compression_level)?;
        d.set_item("chunk_min", o.chunk.min)?;
        d.set_item("chunk_avg", o.chunk.avg)?;
        d.set_item("chunk_max", o.chunk.max)?;
        d.set_item("max_depth", o.max_depth)?;
        d.set_item("format_version", core::meta::FORMAT_VERSION)?;
        Ok(d)
    }

    /// Import a tar (a path, bytes or a binary file; plain, gzip or zstd, detected) as a layer.
    /// `expected_diff_id`/`expected_digest`: a mismatch rejects it and stores nothing.
    #[pyo3(signature = (src, /, *, expected_diff_id=None, expected_digest=None, limits=None, progress=None))]
    fn import_tar(
        &self,
        py: Python<'_>,
        src: &Bound<'_, PyAny>,
        expected_diff_id: Option<String>,
        expected_digest: Option<String>,
        limits: Option<Limits>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Layer> {
        let reader = source(src)?.open()?;
        let opts = ImportOptions {
            expected_diff_id,
            expected_digest,
            limits: limits.map(|l| l.core()),
        };
        let interrupts = Interrupts::new(progress);
        let store = self.inner.clone();
        let result = py.detach(|| store.import_tar(reader, &opts, &|n| interrupts.check(n)));
        self.finish_import(py, interrupts.finish(self.inner.locate(result))?)
    }

    /// Import a directory tree as one layer (all metadata and xattrs; a canonical tar made on the
    /// fly).
    #[allow(clippy::too_many_arguments)] // mirrors the Python keyword arguments
    #[pyo3(signature = (path, /, *, exclude_xattrs=Vec::new(), expected_diff_id=None, limits=None, progress=None, max_threads=None))]
    fn import_dir(
        &self,
        py: Python<'_>,
        path: PathBuf,
        exclude_xattrs: Vec<String>,
        expected_diff_id: Option<String>,
        limits: Option<Limits>,
        progress: Option<Py<PyAny>>,
        max_threads: Option<i128>,
    ) -> PyResult<Layer> {
        let dir_opts = core::fsio::DirOptions {
            exclude_xattrs: exclude_xattrs.into_iter().map(String::into_bytes).collect(),
            max_threads: args::opt_int("max_threads", max_threads, 1)?,
        };
        let opts = ImportOptions {
            expected_diff_id,
            expected_digest: None,
            limits: limits.map(|l| l.core()),
        };
        let interrupts = Interrupts::new(progress);
        let store = self.inner.clone();
        let result =
            py.detach(|| store.import_dir(&path, &dir_opts, &opts, &|n| interrupts.check(n)));
        self.finish_import(py, interrupts.finish(self.inner.locate(result))?)
    }

    /// Write a layer as a tar; returns the digest of the bytes written.
    #[pyo3(signature = (layer, dest, /, *, compression=None, progress=None))]
    fn export_tar(
        &self,
        py: Python<'_>,
        layer: &Bound<'_, PyAny>,
        dest: &Bound<'_, PyAny>,
        compression: Option<String>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<String> {
        let info = self.inner.layer(&layer_id(layer)?).py()?;
        let compression = Compression::parse(compression.as_deref()).py()?;
        let interrupts = Interrupts::new(progress);
        let store = self.inner.clone();
        let result = if dest.hasattr("write")? {
            let mut w = io::BufWriter::with_capacity(1 << 20, PyWriter(dest.clone().unbind()));
            py.detach(|| {
                let r = store.export_tar(&info.id, &mut w, compression, &|n| interrupts.check(n));
                r.and_then(|e| w.flush().map(|()| e).map_err(core::Error::from))
            })
        } else {
            let path: PathBuf = dest.extract()?;
            py.detach(|| {
                store.export_tar_to_path(&info.id, &path, compression, &|n| interrupts.check(n))
            })
        };
        Ok(interrupts.finish(result)?.digest)
    }

    /// Every layer in the store.
    fn layers(&self) -> PyResult<Vec<Layer>> {
        let infos = self.inner.layers().py()?;
        Ok(infos
            .into_iter()
            .map(|info| Layer {
                store: self.inner.clone(),
                info,
                timings: None,
            })
            .collect())
    }

    /// Look a layer up by id, diff_id, blob digest or a unique hex prefix.
    fn layer(&self, key: &Bound<'_, PyAny>) -> PyResult<Layer> {
        let info = self.inner.layer(&layer_id(key)?).py()?;
        Ok(Layer {
            store: self.inner.clone(),
            info,
            timings: None,
        })
    }

    /// Delete a layer no tag or recorded stack uses (its chunks go at the next `gc`).
    fn delete(&self, layer: &Bound<'_, PyAny>) -> PyResult<()> {
        let info = self.inner.layer(&layer_id(layer)?).py()?;
        self.inner.locate(self.inner.delete(&info.id)).py()
    }

    /// Logical and stored bytes, chunks, packs and the dedup ratio.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = py.detach(|| self.inner.stats()).py()?;
        let d = PyDict::new(py);
        d.set_item("layers", s.layers)?;
        d.set_item("chunks", s.chunks)?;
        d.set_item("packs", s.packs)?;
        d.set_item("logical_bytes", s.logical_bytes)?;
        d.set_item("content_bytes", s.content_bytes)?;
        d.set_item("stored_bytes", s.stored_bytes)?;
        d.set_item("metadata_bytes", s.metadata_bytes)?;
        d.set_item("disk_bytes", s.disk_bytes)?;
        d.set_item("dedup_ratio", s.dedup_ratio)?;
        Ok(d)
    }

    /// Remove what nothing references (chunks, packs, leftovers of interrupted imports) and compact
    /// packs that are mostly garbage. Safe while other processes import.
    fn gc<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let r = py.detach(|| self.inner.locate(self.inner.gc())).py()?;
        let d = PyDict::new(py);
        d.set_item("chunks_removed", r.chunks_removed)?;
        d.set_item("packs_removed", r.packs_removed)?;
        d.set_item("packs_rewritten", r.packs_rewritten)?;
        d.set_item("bytes_reclaimed", r.bytes_reclaimed)?;
        d.set_item("deferred", r.deferred)?;
        d.set_item("mounts_reaped", r.mounts_reaped)?;
        d.set_item("snapshots_removed", r.snapshots_removed)?;
        d.set_item("packs_not_rewritten", r.packs_not_rewritten)?;
        Ok(d)
    }

    /// Re-hash every chunk and check every reference; with `repair`, take damaged chunks out of
    /// use and mark the layers using them broken (see `broken_layers`).
    #[pyo3(signature = (*, repair = false))]
    fn fsck<'py>(&self, py: Python<'py>, repair: bool) -> PyResult<Bound<'py, PyDict>> {
        let r = py
            .detach(|| self.inner.locate(self.inner.fsck(repair)))
            .py()?;
        let d = PyDict::new(py);
        d.set_item("ok", r.problems.is_empty())?;
        d.set_item("problems", r.problems)?;
        d.set_item("garbage", r.garbage)?;
        d.set_item("chunks_checked", r.chunks_checked)?;
        d.set_item("layers_checked", r.layers_checked)?;
        let damaged = PyList::empty(py);
        for c in r.damaged {
            let item = PyDict::new(py);
            item.set_item("chunk", c.chunk)?;
            item.set_item("pack", c.pack)?;
            item.set_item("reason", c.reason)?;
            item.set_item("used_by", c.used_by)?;
            damaged.append(item)?;
        }
        d.set_item("damaged", damaged)?;
        d.set_item("broken", r.broken)?;
        let repaired = match r.repaired {
            Some(rep) => {
                let item = PyDict::new(py);
                item.set_item("chunks_retired", rep.chunks_retired)?;
                item.set_item("layers_broken", rep.layers_broken)?;
                Some(item)
            }
            None => None,
        };
        d.set_item("repaired", repaired)?;
        Ok(d)
    }

    /// Layers `fsck(repair=True)` marked broken: {layer id: damaged chunks}. Every read of them
    /// fails until their content is imported again.
    fn broken_layers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (layer, chunks) in self.inner.broken_layers().py()? {
            d.set_item(layer, chunks)?;
        }
        Ok(d)
    }

    /// A stack of `layers` (bottom first): an image read through its union view.
    fn stack(&self, py: Python<'_>, layers: Vec<Bound<'_, PyAny>>) -> PyResult<stack::Stack> {
        let infos = layers
            .iter()
            .map(|l| self.inner.layer(&layer_id(l)?).py())
            .collect::<PyResult<Vec<_>>>()?;
        let store = self.inner.clone();
        let inner = py.detach(|| store.stack(&infos)).py()?;
        Ok(stack::Stack::new(self.inner.clone(), inner))
    }

    /// Point tag `name` at `image` (its layers cannot be deleted while tagged).
    fn tag(&self, image: &Bound<'_, stack::Stack>, name: &str) -> PyResult<()> {
        image.get().image_only("tag")?;
        let inner = &self.inner;
        inner.locate(inner.tag(&image.get().inner, name)).py()
    }

    /// The image tagged `name`.
    fn get(&self, py: Python<'_>, name: &str) -> PyResult<stack::Stack> {
        let store = self.inner.clone();
        let inner = py.detach(|| store.get(name)).py()?;
        Ok(stack::Stack::new(self.inner.clone(), inner))
    }

    /// Every tagged image, by tag.
    fn images<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for name in self.inner.tags().py()? {
            let image = self.get(py, &name)?;
            d.set_item(name, image)?;
        }
        Ok(d)
    }

    /// Remove tag `name` (the layers it kept stay until deleted).
    fn untag(&self, name: &str) -> PyResult<()> {
        self.inner.locate(self.inner.untag(name)).py()
    }

    fn __repr__(&self) -> String {
        format!("Store({:?})", self.inner.root())
    }
}

impl Store {
    /// Run `commit` (a container's or a mount's) without the GIL, with Ctrl-C and `progress`
    /// checked, record `created_by` on the layer it stored, and hand that layer back.
    pub(crate) fn commit_layer(
        &self,
        py: Python<'_>,
        created_by: Option<String>,
        progress: Option<Py<PyAny>>,
        commit: impl FnOnce(core::store::Progress<'_>) -> core::Result<Imported> + Send,
    ) -> PyResult<Layer> {
        let interrupts = Interrupts::new(progress);
        let store = self.inner.clone();
        let result = py.detach(|| {
            let imported = commit(&|n| interrupts.check(n))?;
            if let Some(text) = &created_by {
                store.set_created_by(&imported.layer.id, text)?;
            }
            Ok(imported)
        });
        let imported = interrupts.finish(result)?;
        self.finish_import(py, imported)
    }

    pub(crate) fn finish_import(&self, py: Python<'_>, imported: Imported) -> PyResult<Layer> {
        emit_warnings(py, &imported.warnings)?;
        Ok(Layer {
            store: self.inner.clone(),
            info: imported.layer,
            timings: Some(imported.timings),
        })
    }
}

impl Layer {
    pub(crate) fn new(store: Arc<core::Store>, info: LayerInfo) -> Self {
        Layer {
            store,
            info,
            timings: None,
        }
    }
}

#[pymethods]
impl Layer {
    /// The build step recorded for this layer (a container commit's `created_by`), if any.
    #[getter]
    fn created_by(&self) -> PyResult<Option<String>> {
        self.store.created_by(&self.info.id).py()
    }

    /// `blake3:` digest of the uncompressed tar.
    #[getter]
    fn id(&self) -> String {
        self.info.id.to_string()
    }
    /// `sha256:` digest of the uncompressed tar (the OCI DiffID).
    #[getter]
    fn diff_id(&self) -> &str {
        &self.info.diff_id
    }
    /// `blake3:` digest of the canonical entry list.
    #[getter]
    fn tree_id(&self) -> String {
        self.info.tree_id.to_string()
    }
    /// Size of the uncompressed tar in bytes.
    #[getter]
    fn size(&self) -> u64 {
        self.info.size
    }
    /// Number of entries in the layer's tar (extension headers not counted).
    #[getter]
    fn entry_count(&self) -> u64 {
        self.info.entry_count
    }
    /// sha256 digest of the compressed blob it was imported from, if any.
    #[getter]
    fn compressed_digest(&self) -> Option<&str> {
        self.info.compressed_digest.as_deref()
    }
    /// The compression of the blob the layer was imported from (`"gzip"`, `"zstd"`), if any.
    #[getter]
    fn compression(&self) -> Option<&str> {
        self.info.compression.as_deref()
    }
    /// When the layer entered the store (Unix seconds).
    #[getter]
    fn created(&self) -> i64 {
        self.info.created_unix
    }
    /// Seconds per stage of the import that returned this object, or None.
    #[getter]
    fn import_timings<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(t) = &self.timings else {
            return Ok(None);
        };
        let d = PyDict::new(py);
        for (k, v) in t {
            d.set_item(*k, *v)?;
        }
        Ok(Some(d))
    }

    /// Every compressed blob known for this layer, each a dict with `digest`, `compression`,
    /// `size` (None where only the import recorded it) and `origin`: `"imported"` (the layer
    /// was imported from it), `"kept"` (an image import kept its bytes), or how the store
    /// rebuilds it for an image that uses it (`"stream"`, `"pgzip"`).
    fn blobs<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let blobs = py.detach(|| self.store.known_blobs(&self.info.id)).py()?;
        blobs
            .into_iter()
            .map(|b| {
                let d = PyDict::new(py);
                d.set_item("digest", b.digest)?;
                d.set_item("compression", b.compression)?;
                d.set_item("size", b.size)?;
                d.set_item("origin", b.origin)?;
                Ok(d)
            })
            .collect()
    }

    /// The changeset: every entry in tar order, whiteouts and opaque markers included.
    fn entries(&self, py: Python<'_>) -> PyResult<Vec<Entry>> {
        let entries = py.detach(|| self.store.entries(&self.info.id)).py()?;
        Ok(entries.into_iter().map(|e| Entry { e }).collect())
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .cast::<Layer>()
            .is_ok_and(|o| o.get().info.id == self.info.id)
    }

    fn __hash__(&self) -> u64 {
        u64::from_le_bytes(self.info.id.0[..8].try_into().expect("8 bytes"))
    }

    fn __repr__(&self) -> String {
        format!(
            "Layer(id={:?}, diff_id={:?}, size={}, entries={})",
            self.info.id.to_string(),
            self.info.diff_id,
            self.info.size,
            self.info.entry_count
        )
    }
}

#[pymethods]
impl Entry {
    /// Absolute path within the layer (`/etc/passwd`); `/` for the root.
    #[getter]
    fn path(&self) -> std::ffi::OsString {
        let mut p = Vec::with_capacity(self.e.path.len() + 1);
        p.push(b'/');
        p.extend_from_slice(&self.e.path);
        os_str(&p).to_os_string()
    }
    /// `file`, `dir`, `symlink`, `hardlink`, `char`, `block`, `fifo`, `whiteout`, `opaque`, `other`.
    #[getter]
    fn kind(&self) -> &'static str {
        self.e.kind.name()
    }
    /// The tar typeflag as read (one character).
    #[getter]
    fn typeflag(&self) -> String {
        (self.e.typeflag as char).to_string()
    }
    /// Permission bits, including setuid, setgid and sticky.
    #[getter]
    fn mode(&self) -> u32 {
        self.e.mode
    }
    /// Owner user id.
    #[getter]
    fn uid(&self) -> u64 {
        self.e.uid
    }
    /// Owner group id.
    #[getter]
    fn gid(&self) -> u64 {
        self.e.gid
    }
    /// Owner user name recorded in the tar.
    #[getter]
    fn uname(&self) -> std::ffi::OsString {
        os_str(&self.e.uname).to_os_string()
    }
    /// Owner group name recorded in the tar.
    #[getter]
    fn gname(&self) -> std::ffi::OsString {
        os_str(&self.e.gname).to_os_string()
    }
    /// Content size in bytes (0 for anything but a regular file).
    #[getter]
    fn size(&self) -> u64 {
        self.e.size
    }
    /// Modification time in nanoseconds since the epoch.
    #[getter]
    fn mtime_ns(&self) -> i64 {
        self.e.mtime_ns
    }
    /// Symlink target as archived, or the hardlink's target path (absolute).
    #[getter]
    fn linkname(&self) -> Option<std::ffi::OsString> {
        match self.e.kind {
            core::layer::Kind::Hardlink => {
                let mut p = vec![b'/'];
                p.extend_from_slice(&self.e.link);
                Some(os_str(&p).to_os_string())
            }
            _ if self.e.link.is_empty() => None,
            _ => Some(os_str(&self.e.link).to_os_string()),
        }
    }
    /// Device major number (character and block devices).
    #[getter]
    fn devmajor(&self) -> u32 {
        self.e.devmajor
    }
    /// Device minor number (character and block devices).
    #[getter]
    fn devminor(&self) -> u32 {
        self.e.devminor
    }
    /// Device number as `os.makedev(devmajor, devminor)`.
    #[getter]
    fn rdev(&self) -> u64 {
        self.e.rdev()
    }
    /// Extended attributes, name to value.
    #[getter]
    fn xattrs<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in &self.e.xattrs {
            d.set_item(os_str(k), PyBytes::new(py, v))?;
        }
        Ok(d)
    }
    /// `blake3:` digest of the content (entries with data), else None.
    #[getter]
    fn digest(&self) -> Option<String> {
        self.e.digest.map(|d: Blake3| d.to_string())
    }
    /// Number of content chunks the file is stored as.
    #[getter]
    fn chunk_count(&self) -> usize {
        self.e.chunks.len()
    }
    /// Whether the tar stored the file sparse.
    #[getter]
    fn sparse(&self) -> bool {
        self.e.sparse
    }
    fn __repr__(&self) -> String {
        format!(
            "Entry({:?}, kind={:?}, size={})",
            String::from_utf8_lossy(&self.e.path),
            self.e.kind.name(),
            self.e.size
        )
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Store>()?;
    m.add_class::<Layer>()?;
    m.add_class::<Entry>()?;
    m.add_class::<Limits>()?;
    m.add_class::<stack::Stack>()?;
    m.add_class::<stack::Stat>()?;
    m.add_class::<stack::ContentFile>()?;
    m.add_class::<container::RawContainer>()?;
    m.add_class::<mount::Mount>()?;
    m.add_function(wrap_pyfunction!(registry::registry_login, m)?)?;
    m.add_function(wrap_pyfunction!(registry::registry_logout, m)?)?;
    m.add("FORMAT_VERSION", core::meta::FORMAT_VERSION)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
