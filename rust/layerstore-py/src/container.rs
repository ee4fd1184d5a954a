//! Bindings of containers: a writable layer over a stack. Conversions only; the Python wrapper
//! (`layerstore._container`) adds the read API (through snapshots) and file objects.

use std::sync::{Arc, Mutex};

use layerstore_core as core;
use layerstore_core::container::Container as CoreContainer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::errors::CoreResultExt;
use crate::stack::{PathOrBytes, Stack};
use crate::{Layer, Store};

/// The raw writable layer behind `layerstore.Container`.
#[pyclass(frozen, module = "layerstore._core")]
pub struct RawContainer {
    store: Arc<core::Store>,
    /// `None` once the container is closed.
    inner: Mutex<Option<CoreContainer>>,
}

impl RawContainer {
    fn with<T>(
        &self,
        f: impl FnOnce(&mut CoreContainer, &core::Store) -> core::Result<T>,
    ) -> PyResult<T> {
        let mut guard = self
            .inner
            .lock()
            .map_err(|_| PyValueError::new_err("container state poisoned"))?;
        let c = guard
            .as_mut()
            .ok_or_else(|| PyValueError::new_err("I/O operation on a closed container"))?;
        self.store.locate(f(c, &self.store)).py()
    }
}

fn read_chunk(
    store: &core::Store,
) -> impl Fn(&core::digest::Blake3) -> core::Result<Arc<[u8]>> + '_ {
    move |d| store.chunk(d)
}

#[pymethods]
impl RawContainer {
    /// Write `data` at `offset` of `path` (created when `create`); returns the new size.
    #[pyo3(signature = (path, offset, data, /, create=false))]
    fn write_at(
        &self,
        py: Python<'_>,
        path: PathOrBytes,
        offset: u64,
        data: &[u8],
        create: bool,
    ) -> PyResult<u64> {
        py.detach(|| self.with(|c, s| c.write_at(&path.0, offset, data, create, &read_chunk(s))))
    }

    /// Write `data` at `offset` of file `path` (created if missing; `truncate` cuts it to end
    /// there). Copies a lower file up chunk by chunk.
    fn write_bytes(&self, py: Python<'_>, path: PathOrBytes, data: &[u8]) -> PyResult<()> {
        py.detach(|| self.with(|c, s| c.write_bytes(&path.0, data, &read_chunk(s))))
    }

    /// Cut or extend file `path` to `size` bytes.
    fn truncate(&self, py: Python<'_>, path: PathOrBytes, size: u64) -> PyResult<()> {
        py.detach(|| self.with(|c, s| c.truncate(&path.0, size, &read_chunk(s))))
    }

    /// Create directory `path` (`parents`: and its missing parents; `exist_ok`: an existing
    /// directory is fine).
    #[pyo3(signature = (path, /, mode=0o755, *, parents=false, exist_ok=false))]
    fn mkdir(&self, path: PathOrBytes, mode: u32, parents: bool, exist_ok: bool) -> PyResult<()> {
        self.with(|c, _| c.mkdir(&path.0, mode, parents, exist_ok))
    }

    /// Remove `path` (a directory only with `recursive`); a lower path gets a whiteout.
    #[pyo3(signature = (path, /, *, recursive=false))]
    fn remove(&self, path: PathOrBytes, recursive: bool) -> PyResult<()> {
        self.with(|c, _| c.remove(&path.0, recursive))
    }

    /// Rename `src` to `dst` (a directory moves with its subtree).
    fn rename(&self, src: PathOrBytes, dst: PathOrBytes) -> PyResult<()> {
        self.with(|c, _| c.rename(&src.0, &dst.0))
    }

    /// Create a symlink at `path` pointing at `target` (kept verbatim).
    fn symlink(&self, target: &Bound<'_, PyAny>, path: PathOrBytes) -> PyResult<()> {
        let target: Vec<u8> = match target.cast::<PyBytes>() {
            Ok(b) => b.as_bytes().to_vec(),
            Err(_) => {
                use std::os::unix::ffi::OsStringExt;
                target
                    .extract::<std::path::PathBuf>()?
                    .into_os_string()
                    .into_vec()
            }
        };
        self.with(|c, _| c.symlink(&target, &path.0))
    }

    /// Make `path` a hard link to `target`.
    fn link(&self, src: PathOrBytes, dst: PathOrBytes) -> PyResult<()> {
        self.with(|c, _| c.link(&src.0, &dst.0))
    }

    /// Set the permission bits of `path` (metadata only: no content is copied).
    #[pyo3(signature = (path, mode, /, *, follow_symlinks=true))]
    fn chmod(&self, path: PathOrBytes, mode: u32, follow_symlinks: bool) -> PyResult<()> {
        self.with(|c, _| c.chmod(&path.0, mode, follow_symlinks))
    }

    /// Set the owner and group of `path` (metadata only).
    #[pyo3(signature = (path, uid, gid, /, *, follow_symlinks=true))]
    fn chown(&self, path: PathOrBytes, uid: u64, gid: u64, follow_symlinks: bool) -> PyResult<()> {
        self.with(|c, _| c.chown(&path.0, uid, gid, follow_symlinks))
    }

    /// Set the modification time in nanoseconds (now when None).
    #[pyo3(signature = (path, /, mtime_ns=None, *, follow_symlinks=true))]
    fn utime(
        &self,
        path: PathOrBytes,
        mtime_ns: Option<i64>,
        follow_symlinks: bool,
    ) -> PyResult<()> {
        self.with(|c, _| c.utime(&path.0, mtime_ns, follow_symlinks))
    }

    /// Set extended attribute `name` of `path` to `value`.
    fn setxattr(&self, path: PathOrBytes, name: &str, value: &[u8]) -> PyResult<()> {
        self.with(|c, _| c.setxattr(&path.0, name.as_bytes(), value))
    }

    /// Remove extended attribute `name` of `path`.
    fn removexattr(&self, path: PathOrBytes, name: &str) -> PyResult<()> {
        self.with(|c, _| c.removexattr(&path.0, name.as_bytes()))
    }

    /// Bytes hashed by writes so far (the copy-on-write cost).
    #[getter]
    fn hashed_bytes(&self) -> PyResult<u64> {
        self.with(|c, _| Ok(c.hashed_bytes()))
    }

    /// A read-only snapshot of the current view.
    fn view(&self) -> PyResult<Stack> {
        self.with(|c, _| {
            let mut base = c.base().clone();
            base.index = c.index().clone();
            base.image = None; // not the image it started from: no manifest digest
            Ok((base, c.fresh()))
        })
        .map(|(inner, fresh)| {
            let mut stack = Stack::new(self.store.clone(), inner);
            stack.fresh = Some(fresh);
            stack
        })
    }

    /// Store the changes as a new layer; `created_by` records the build step that made it.
    #[pyo3(signature = (*, created_by=None, progress=None))]
    fn commit(
        &self,
        py: Python<'_>,
        created_by: Option<String>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Layer> {
        let store = Store {
            inner: self.store.clone(),
        };
        store.commit_layer(py, created_by, progress, |progress| {
            let guard = self
                .inner
                .lock()
                .map_err(|_| core::Error::Conflict("container state poisoned".into()))?;
            let c = guard
                .as_ref()
                .ok_or_else(|| core::Error::InvalidArgument("the container is closed".into()))?;
            c.commit(&self.store, progress)
        })
    }

    /// Drop the writable layer (uncommitted changes are discarded).
    fn close(&self) -> PyResult<()> {
        if let Ok(mut g) = self.inner.lock() {
            *g = None;
        }
        Ok(())
    }

    /// Whether the container was committed or discarded.
    #[getter]
    fn closed(&self) -> bool {
        self.inner.lock().map(|g| g.is_none()).unwrap_or(true)
    }
}

#[pymethods]
impl Stack {
    /// A writable container over this image (see `layerstore.Container`).
    fn container<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.image_only("start a container on")?;
        let raw = RawContainer {
            store: self.store.clone(),
            inner: Mutex::new(Some(CoreContainer::new(
                &self.inner,
                self.store.options().chunk,
            ))),
        };
        crate::pyobjects::CONTAINER
            .get(py)?
            .call1((Bound::new(py, raw)?,))
    }
}
