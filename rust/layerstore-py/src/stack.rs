//! Bindings of stacks: the read API over a union index. Conversions only.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use layerstore_core as core;
use layerstore_core::cas::FreshChunks;
use layerstore_core::layer::Kind;
use layerstore_core::paths;
use layerstore_core::union::{Node, ViewEntry};
use layerstore_core::PathProblem;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::errors::CoreResultExt;
use crate::Layer;

/// A path argument (str, bytes or os.PathLike) normalised to the index's form
/// ([`paths::normalise`]).
fn norm(path: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    with_raw(path, paths::normalise)
}

/// `norm`, and whether the path ends with a slash (so it must name a directory).
fn norm_query(path: &Bound<'_, PyAny>) -> PyResult<(Vec<u8>, bool)> {
    with_raw(path, paths::normalise_query)
}

fn is_str_or_bytes(arg: &Bound<'_, PyAny>) -> bool {
    arg.cast::<pyo3::types::PyString>().is_ok() || arg.cast::<PyBytes>().is_ok()
}

/// Apply `f` to a path argument's bytes: a str's UTF-8 (no copy, the common case), bytes, or
/// an os.PathLike's file-system encoding.
fn with_raw<T>(path: &Bound<'_, PyAny>, f: impl FnOnce(&[u8]) -> T) -> PyResult<T> {
    if let Ok(s) = path.cast::<pyo3::types::PyString>() {
        if let Ok(text) = s.to_str() {
            return Ok(f(text.as_bytes()));
        }
    }
    if let Ok(b) = path.cast::<PyBytes>() {
        return Ok(f(b.as_bytes()));
    }
    Ok(f(path.extract::<PathBuf>()?.as_os_str().as_bytes()))
}

/// A normalised path as users see it: absolute.
fn display(path: &[u8]) -> OsString {
    let mut p = Vec::with_capacity(path.len() + 1);
    p.push(b'/');
    p.extend_from_slice(path);
    OsString::from_vec(p)
}

/// What is wrong with `path`, as the OS error the core describes.
fn path_error(problem: PathProblem, path: &[u8]) -> PyErr {
    crate::errors::to_py(core::Error::path(problem, path))
}

fn not_found(path: &[u8]) -> PyErr {
    path_error(PathProblem::NotFound, path)
}

/// The state of one path in a stack's view.
#[pyclass(frozen, module = "layerstore._core")]
pub struct Stat {
    path: StatPath,
    view: Arc<ViewEntry>,
}

/// Where a stat's (normalised) path comes from.
enum StatPath {
    Normalised(Vec<u8>),
    /// The caller's argument, already in normalised form (`stat_many`'s common case: nothing
    /// copied until `.path` is asked for).
    Given(Py<PyAny>),
}

impl Stat {
    fn path_bytes(&self, py: Python<'_>) -> Vec<u8> {
        match &self.path {
            StatPath::Normalised(p) => p.clone(),
            StatPath::Given(arg) => norm(arg.bind(py)).unwrap_or_default(),
        }
    }
}

fn type_bits(kind: Kind) -> u32 {
    match kind {
        Kind::Dir => 0o040000,
        Kind::Symlink => 0o120000,
        Kind::Char => 0o020000,
        Kind::Block => 0o060000,
        Kind::Fifo => 0o010000,
        _ => 0o100000,
    }
}

#[pymethods]
impl Stat {
    /// The path looked up (absolute).
    #[getter]
    fn path(&self, py: Python<'_>) -> OsString {
        display(&self.path_bytes(py))
    }
    /// `file`, `dir`, `symlink`, `char`, `block`, `fifo` (a hardlink shows as its target, a file).
    #[getter]
    fn kind(&self) -> &'static str {
        self.view.meta().kind.name()
    }
    /// Permission bits, including setuid, setgid and sticky.
    #[getter]
    fn mode(&self) -> u32 {
        self.view.meta().mode
    }
    /// `os.stat`-style mode: file type bits and permission bits.
    #[getter]
    fn st_mode(&self) -> u32 {
        type_bits(self.view.meta().kind) | self.view.meta().mode
    }
    /// Owner user id.
    #[getter]
    fn uid(&self) -> u64 {
        self.view.meta().uid
    }
    /// Owner group id.
    #[getter]
    fn gid(&self) -> u64 {
        self.view.meta().gid
    }
    /// Owner user name recorded in the tar.
    #[getter]
    fn uname(&self) -> OsString {
        OsString::from_vec(self.view.meta().uname.clone())
    }
    /// Owner group name recorded in the tar.
    #[getter]
    fn gname(&self) -> OsString {
        OsString::from_vec(self.view.meta().gname.clone())
    }
    /// Content size in bytes (0 for anything but a regular file).
    #[getter]
    fn size(&self) -> u64 {
        let m = self.view.meta();
        match m.kind {
            Kind::Symlink => m.link.len() as u64,
            _ => m.size,
        }
    }
    /// Modification time in nanoseconds since the epoch.
    #[getter]
    fn mtime_ns(&self) -> i64 {
        self.view.meta().mtime_ns
    }
    /// The symlink target, or None.
    #[getter]
    fn linkname(&self) -> Option<OsString> {
        let m = self.view.meta();
        (m.kind == Kind::Symlink).then(|| OsString::from_vec(m.link.clone()))
    }
    /// Device major number.
    #[getter]
    fn devmajor(&self) -> u32 {
        self.view.meta().devmajor
    }
    /// Device minor number.
    #[getter]
    fn devminor(&self) -> u32 {
        self.view.meta().devminor
    }
    /// The device number (`os.makedev(devmajor, devminor)`).
    #[getter]
    fn rdev(&self) -> u64 {
        self.view.meta().rdev()
    }
    /// Extended attributes, name to value.
    #[getter]
    fn xattrs<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in &self.view.meta().xattrs {
            d.set_item(std::ffi::OsStr::from_bytes(k), PyBytes::new(py, v))?;
        }
        Ok(d)
    }
    /// Index of the layer that provides the path (bottom = 0); None for an implicit directory.
    #[getter]
    fn layer(&self) -> Option<u32> {
        self.view.layer
    }
    /// Whether no layer declares this directory (a parent only implied by a deeper path).
    #[getter]
    fn implicit(&self) -> bool {
        self.view.is_implicit()
    }
    /// `blake3:` digest of a regular file's content, else None.
    #[getter]
    fn digest(&self) -> Option<String> {
        let m = self.view.meta();
        (m.kind == Kind::File)
            .then(|| m.digest.map(|d| d.to_string()))
            .flatten()
    }
    /// For a hardlink: the path whose content it shares.
    #[getter]
    fn hardlink(&self) -> Option<OsString> {
        self.view.target.as_ref().map(|t| display(&t.path))
    }
    /// Whether this is a directory.
    fn is_dir(&self) -> bool {
        self.view.meta().kind == Kind::Dir
    }
    /// Whether this is a regular file.
    fn is_file(&self) -> bool {
        self.view.meta().kind == Kind::File
    }
    /// Whether this is a symbolic link.
    fn is_symlink(&self) -> bool {
        self.view.meta().kind == Kind::Symlink
    }
    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "Stat({:?}, kind={:?}, mode=0o{:o}, size={})",
            String::from_utf8_lossy(&display(&self.path_bytes(py)).into_vec()),
            self.kind(),
            self.mode(),
            self.size()
        )
    }
}

/// An image: an immutable stack of layers, read through its union view.
#[pyclass(frozen, module = "layerstore._core")]
pub struct Stack {
    pub store: Arc<core::Store>,
    pub inner: core::stack::Stack,
    /// A container's uncommitted chunks, when this is a snapshot of a container's view.
    pub fresh: Option<Arc<RwLock<FreshChunks>>>,
}

/// The outcome of a stat-like lookup.
enum Lookup {
    Found(Stat),
    Missing,
    /// A trailing slash asked for a directory and something else is there.
    NotDir,
}

impl Stack {
    pub fn new(store: Arc<core::Store>, inner: core::stack::Stack) -> Self {
        Stack {
            store,
            inner,
            fresh: None,
        }
    }

    /// Refuse what only an image can do when this is a container's view (its layers are the
    /// image's; its changes are in no layer until committed).
    pub fn image_only(&self, what: &str) -> PyResult<()> {
        match self.fresh {
            Some(_) => Err(pyo3::exceptions::PyValueError::new_err(format!(
                "cannot {what} a container's view: commit the container and push the layer"
            ))),
            None => Ok(()),
        }
    }

    /// A reader of a regular file's content (a container's fresh chunks included).
    fn content(&self, meta: &core::layer::Entry) -> core::Result<core::stack::ContentReader> {
        match &self.fresh {
            Some(fresh) => {
                let fresh = fresh
                    .read()
                    .map_err(|_| core::Error::Conflict("container state poisoned".into()))?;
                self.store.content_with(meta, Some(&fresh))
            }
            None => self.store.content(meta),
        }
    }

    fn stat_each(&self, paths: &Bound<'_, PyAny>, follow: bool) -> PyResult<Vec<Option<Stat>>> {
        let mut out = Vec::new();
        let index = &self.inner.index;
        for path in paths.try_iter()? {
            let path = path?;
            // Most arguments are already normalised: look them up as they are, and keep the
            // argument itself as the result's path.
            let fast = with_raw(&path, |raw| {
                paths::as_normal(raw).map(|normal| index.lookup_view(normal, follow))
            })?;
            let stat = match fast {
                Some(found) => found.py()?.map(|(resolved, view)| Stat {
                    path: match resolved {
                        Some(p) => StatPath::Normalised(p),
                        // (str and bytes cannot change; an os.PathLike could.)
                        None if is_str_or_bytes(&path) => StatPath::Given(path.unbind()),
                        None => StatPath::Normalised(norm(&path).unwrap_or_default()),
                    },
                    view,
                }),
                None => match self.lookup_query(&path, follow)? {
                    Lookup::Found(stat) => Some(stat),
                    Lookup::Missing | Lookup::NotDir => None,
                },
            };
            out.push(stat);
        }
        Ok(out)
    }

    /// `stat` semantics: a trailing slash (`must_be_dir`) follows a final symlink, as the kernel
    /// does, and requires a directory.
    fn lookup(&self, p: &[u8], follow: bool, must_be_dir: bool) -> PyResult<Lookup> {
        let found = self
            .inner
            .index
            .lookup_view(p, follow || must_be_dir)
            .py()?;
        let Some((path, view)) = found else {
            return Ok(Lookup::Missing);
        };
        if must_be_dir && view.meta().kind != Kind::Dir {
            return Ok(Lookup::NotDir);
        }
        Ok(Lookup::Found(Stat {
            path: StatPath::Normalised(path.unwrap_or_else(|| p.to_vec())),
            view,
        }))
    }

    /// [`Self::lookup`] of a path argument, normalised.
    fn lookup_query(&self, path: &Bound<'_, PyAny>, follow: bool) -> PyResult<Lookup> {
        let (p, must_be_dir) = norm_query(path)?;
        self.lookup(&p, follow, must_be_dir)
    }

    fn resolve(&self, path: &[u8], follow: bool) -> PyResult<Option<core::union::Resolved>> {
        self.inner.index.resolve(path, follow).py()
    }

    fn found(&self, path: &[u8], follow: bool) -> PyResult<core::union::Resolved> {
        self.resolve(path, follow)?.ok_or_else(|| not_found(path))
    }

    fn file_entry(&self, path: &[u8]) -> PyResult<Arc<ViewEntry>> {
        let r = self.found(path, true)?;
        match r.node {
            Node::Dir(_) => Err(path_error(PathProblem::IsADirectory, path)),
            Node::Leaf(v) if v.meta().kind == Kind::File => Ok(v),
            Node::Leaf(_) => Err(path_error(PathProblem::NotARegularFile, path)),
        }
    }
}

#[pymethods]
impl Stack {
    /// The layers, bottom first.
    #[getter]
    fn layers(&self) -> Vec<Layer> {
        self.inner
            .layers
            .iter()
            .map(|info| Layer::new(self.store.clone(), info.clone()))
            .collect()
    }

    /// The OCI ChainID of the stack.
    #[getter]
    fn chain_id(&self) -> &str {
        &self.inner.chain_id
    }

    fn __len__(&self) -> usize {
        self.inner.depth()
    }

    /// Bytes of file content the view shows, each hardlinked file once: what `materialize`
    /// writes (from the index; nothing is read).
    fn content_bytes(&self) -> u64 {
        self.inner.index.content_bytes()
    }

    /// A new stack with `layer` on top (this one is unchanged).
    fn push(&self, py: Python<'_>, layer: &Bound<'_, PyAny>) -> PyResult<Stack> {
        self.image_only("push onto")?;
        let info = self.store.layer(&crate::layer_id(layer)?).py()?;
        let store = self.store.clone();
        let inner = py.detach(|| store.push(&self.inner, &info)).py()?;
        Ok(Stack::new(self.store.clone(), inner))
    }

    /// The entry at `path` (symlinks followed unless `follow_symlinks=False`); `FileNotFoundError`
    /// if absent.
    #[pyo3(signature = (path, /, *, follow_symlinks=true))]
    fn stat(&self, path: &Bound<'_, PyAny>, follow_symlinks: bool) -> PyResult<Stat> {
        let (p, must_be_dir) = norm_query(path)?;
        match self.lookup(&p, follow_symlinks, must_be_dir)? {
            Lookup::Found(stat) => Ok(stat),
            Lookup::Missing => Err(not_found(&p)),
            Lookup::NotDir => Err(path_error(PathProblem::NotADirectory, &p)),
        }
    }

    /// Stat many paths in one call; a missing path gives None.
    #[pyo3(signature = (paths, /, *, follow_symlinks=true))]
    fn stat_many<'py>(
        &self,
        py: Python<'py>,
        paths: &Bound<'py, PyAny>,
        follow_symlinks: bool,
    ) -> PyResult<Bound<'py, pyo3::types::PyList>> {
        // Thousands of new objects would trigger the cyclic GC again and again while none of
        // them can be garbage yet: pause it for the batch (restored whatever happens).
        let gc = py.import("gc")?;
        let was_enabled = gc.call_method0("isenabled")?.is_truthy()?;
        if was_enabled {
            gc.call_method0("disable")?;
        }
        let result = self
            .stat_each(paths, follow_symlinks)
            .and_then(|stats| pyo3::types::PyList::new(py, stats));
        if was_enabled {
            gc.call_method0("enable")?;
        }
        result
    }

    /// Whether `path` exists in the view (symlinks followed).
    #[pyo3(signature = (path, /, *, follow_symlinks=true))]
    fn exists(&self, path: &Bound<'_, PyAny>, follow_symlinks: bool) -> PyResult<bool> {
        let (p, must_be_dir) = norm_query(path)?;
        // As os.path.exists: a symlink loop means "does not exist", not an error.
        Ok(matches!(
            self.lookup(&p, follow_symlinks, must_be_dir),
            Ok(Lookup::Found(_))
        ))
    }

    /// Names in a directory, sorted.
    #[pyo3(signature = (path=None))]
    fn listdir(&self, path: Option<PathOrBytes>) -> PyResult<Vec<OsString>> {
        let p = path.map(|p| p.0).unwrap_or_default();
        match self.found(&p, true)?.node {
            Node::Dir(d) => Ok(d
                .sorted()
                .into_iter()
                .map(|(k, _)| OsString::from_vec(k.to_vec()))
                .collect()),
            Node::Leaf(_) => Err(path_error(PathProblem::NotADirectory, &p)),
        }
    }

    /// Like `os.walk` (top-down, sorted; a symlink to a directory is listed among the
    /// directories but not entered): yields (dirpath, dirnames, filenames); prune by editing
    /// dirnames in place.
    #[pyo3(signature = (top=None))]
    fn walk<'py>(
        slf: &Bound<'py, Self>,
        top: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let walk = crate::pyobjects::STACK_WALK.get(slf.py())?;
        match top {
            Some(t) => walk.call1((slf, t)),
            None => walk.call1((slf, "/")),
        }
    }

    /// One directory's children as (name, is a directory after following symlinks, is a
    /// symlink), sorted: what `walk` needs, in one call.
    fn _scandir(&self, path: &Bound<'_, PyAny>) -> PyResult<Vec<(OsString, bool, bool)>> {
        let p = norm(path)?;
        let Node::Dir(d) = self.found(&p, true)?.node else {
            return Err(path_error(PathProblem::NotADirectory, &p));
        };
        let mut out = Vec::with_capacity(d.children.len());
        for (name, child) in d.sorted() {
            let (is_dir, is_link) = match child {
                Node::Dir(_) => (true, false),
                Node::Leaf(v) if v.meta().kind == Kind::Symlink => {
                    let mut full = p.clone();
                    if !full.is_empty() {
                        full.push(b'/');
                    }
                    full.extend_from_slice(name);
                    let target = self.inner.index.resolve(&full, true).ok().flatten();
                    (target.is_some_and(|r| matches!(r.node, Node::Dir(_))), true)
                }
                Node::Leaf(_) => (false, false),
            };
            out.push((OsString::from_vec(name.to_vec()), is_dir, is_link));
        }
        Ok(out)
    }

    /// The target of symlink `path`.
    fn readlink(&self, path: &Bound<'_, PyAny>) -> PyResult<OsString> {
        let p = norm(path)?;
        let r = self.found(&p, false)?;
        let m = r.node.view().meta();
        if m.kind != Kind::Symlink {
            return Err(path_error(PathProblem::InvalidArgument, &p));
        }
        Ok(OsString::from_vec(m.link.clone()))
    }

    /// The whole content of regular file `path` (each chunk verified).
    fn read_bytes<'py>(
        &self,
        py: Python<'py>,
        path: &Bound<'_, PyAny>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let p = norm(path)?;
        let view = self.file_entry(&p)?;
        let data = py
            .detach(|| -> core::Result<Vec<u8>> {
                let mut reader = self.content(view.meta())?;
                let mut buf = vec![0u8; reader.size() as usize];
                let n = reader.read_at(0, &mut buf)?;
                buf.truncate(n);
                Ok(buf)
            })
            .py()?;
        Ok(PyBytes::new(py, &data))
    }

    /// A seekable binary file object reading the file's chunks lazily.
    fn open<'py>(&self, py: Python<'py>, path: &Bound<'_, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let raw = Bound::new(py, self._open_raw(path)?)?;
        crate::pyobjects::OPEN_FILE.get(py)?.call1((raw,))
    }

    /// A pathlib-like read-only view of `p`.
    #[pyo3(signature = (p=None))]
    fn path<'py>(
        slf: &Bound<'py, Self>,
        p: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let class = crate::pyobjects::STACK_PATH.get(slf.py())?;
        match p {
            Some(p) => class.call1((slf, p)),
            None => class.call1((slf, "/")),
        }
    }

    /// A raw reader of a regular file (wrapped by `open()` in a buffered file object).
    fn _open_raw(&self, path: &Bound<'_, PyAny>) -> PyResult<ContentFile> {
        let p = norm(path)?;
        let view = self.file_entry(&p)?;
        let reader = self.content(view.meta()).py()?;
        Ok(ContentFile {
            name: display(&p),
            reader: Mutex::new(reader),
        })
    }

    /// Every layer that has `path` or hides it: (layer index, "entry" | "whiteout" | "opaque").
    fn provenance(&self, path: &Bound<'_, PyAny>) -> PyResult<Vec<(usize, &'static str)>> {
        let p = norm(path)?;
        Ok(self
            .inner
            .provenance(&p)
            .into_iter()
            .map(|(i, t)| (i, t.name()))
            .collect())
    }

    /// Live union-index directory nodes in this process (to observe structural sharing).
    #[staticmethod]
    fn index_nodes() -> i64 {
        core::union::live_dir_nodes()
    }

    fn __repr__(&self) -> String {
        format!(
            "Stack(layers={}, chain_id={:?})",
            self.inner.depth(),
            self.inner.chain_id
        )
    }
}

/// A path given as str, bytes or os.PathLike.
pub struct PathOrBytes(pub Vec<u8>);

impl<'py> FromPyObject<'_, 'py> for PathOrBytes {
    type Error = PyErr;
    fn extract(obj: Borrowed<'_, 'py, PyAny>) -> PyResult<Self> {
        norm(&obj).map(PathOrBytes)
    }
}

/// The raw, positional reader behind `Stack.open()`.
#[pyclass(frozen, module = "layerstore._core")]
pub struct ContentFile {
    name: OsString,
    reader: Mutex<core::stack::ContentReader>,
}

#[pymethods]
impl ContentFile {
    /// The file name (last path component).
    #[getter]
    fn name(&self) -> OsString {
        self.name.clone()
    }
    /// Size of the file in bytes.
    #[getter]
    fn size(&self) -> u64 {
        self.reader.lock().map(|r| r.size()).unwrap_or(0)
    }
    /// Read up to `n` bytes at `offset` (fewer at the end of the file).
    fn pread<'py>(&self, py: Python<'py>, n: usize, offset: u64) -> PyResult<Bound<'py, PyBytes>> {
        let data = py
            .detach(|| -> core::Result<Vec<u8>> {
                let mut r = self
                    .reader
                    .lock()
                    .map_err(|_| core::Error::Conflict("reader poisoned".into()))?;
                let want = n.min(r.size().saturating_sub(offset) as usize);
                let mut buf = vec![0u8; want];
                let got = r.read_at(offset, &mut buf)?;
                buf.truncate(got);
                Ok(buf)
            })
            .py()?;
        Ok(PyBytes::new(py, &data))
    }
}
