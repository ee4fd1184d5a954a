//! Bindings of mounts: conversions and GIL release only.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use layerstore_core as core;
use layerstore_core::meta::mounts::MountRow;
use layerstore_core::mount::{Backend, Mount as CoreMount, MountOptions};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::errors::CoreResultExt;
use crate::{stack, Interrupts, Layer, Store};

fn row_dict<'py>(py: Python<'py>, r: &MountRow) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("id", &r.id)?;
    d.set_item("target", &r.target)?;
    d.set_item("backend", &r.backend)?;
    d.set_item("writable", r.writable)?;
    d.set_item("owned", r.owned)?;
    d.set_item("created", r.created)?;
    let layers: Vec<String> = r.layers.iter().map(|l| l.to_string()).collect();
    d.set_item("layers", PyList::new(py, layers)?)?;
    Ok(d)
}

/// A live mount of an image (`Store.mount`): a context manager that unmounts on exit.
#[pyclass(frozen, module = "layerstore._core")]
pub struct Mount {
    store: Arc<core::Store>,
    path: String,
    backend: String,
    writable: bool,
    image: Py<stack::Stack>,
    /// `None` once unmounted, disowned or waited for.
    inner: Mutex<Option<CoreMount>>,
}

impl Mount {
    fn take(&self) -> PyResult<CoreMount> {
        self.inner
            .lock()
            .map_err(|_| PyValueError::new_err("mount state poisoned"))?
            .take()
            .ok_or_else(|| PyValueError::new_err(format!("{} is not mounted", self.path)))
    }
}

#[pymethods]
impl Mount {
    /// Where the image is mounted.
    #[getter]
    fn path(&self) -> &str {
        &self.path
    }

    /// `overlay` or `fuse`.
    #[getter]
    fn backend(&self) -> &str {
        &self.backend
    }

    /// Whether writes through the mount are allowed (and can be committed).
    #[getter]
    fn writable(&self) -> bool {
        self.writable
    }

    /// The image mounted.
    #[getter]
    fn image(&self, py: Python<'_>) -> Py<stack::Stack> {
        self.image.clone_ref(py)
    }

    /// Whether the mount is still in place (not unmounted, disowned or waited for).
    #[getter]
    fn mounted(&self) -> PyResult<bool> {
        Ok(self
            .inner
            .lock()
            .map_err(|_| PyValueError::new_err("mount state poisoned"))?
            .is_some())
    }

    /// Store what was changed through this writable mount as a new layer (the image and the
    /// mount are unchanged). Its cost follows what changed; it equals `store.diff(image, path)`.
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
                .map_err(|_| core::Error::Conflict("mount state poisoned".into()))?;
            let m = guard.as_ref().ok_or_else(|| {
                core::Error::InvalidArgument(format!("{} is not mounted", self.path))
            })?;
            m.commit(progress)
        })
    }

    /// Unmount (a writable mount's uncommitted changes are discarded).
    fn unmount(&self, py: Python<'_>) -> PyResult<()> {
        let m = self.take()?;
        py.detach(|| m.unmount()).py()
    }

    /// Let an overlay mount outlive this process (until `Store.unmount(path)`); returns its
    /// record.
    fn disown<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let m = self.take()?;
        let row = py.detach(|| m.disown()).py()?;
        row_dict(py, &row)
    }

    /// Serve a FUSE mount until it is unmounted from outside (`umount`), then clean up.
    fn wait(&self, py: Python<'_>) -> PyResult<()> {
        let m = self.take()?;
        py.detach(|| m.wait()).py()
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        let m = self
            .inner
            .lock()
            .map_err(|_| PyValueError::new_err("mount state poisoned"))?
            .take();
        if let Some(m) = m {
            py.detach(|| m.unmount()).py()?;
        }
        Ok(false)
    }

    fn __repr__(&self) -> String {
        let mode = if self.writable { "rw" } else { "ro" };
        format!("Mount({:?}, {}, {mode})", self.path, self.backend)
    }
}

#[pymethods]
impl Store {
    /// Mount `image` at the empty directory `target`: `backend` is `overlay` (kernel overlayfs
    /// over layer snapshots shared by all mounts; root), `fuse` (served from the store, nothing
    /// extracted) or `auto` (overlay as root, else fuse). A writable mount keeps its changes in
    /// an upper directory of the store until `Mount.commit()`.
    #[pyo3(signature = (image, target, /, *, writable=false, backend="auto"))]
    fn mount(
        &self,
        py: Python<'_>,
        image: &Bound<'_, stack::Stack>,
        target: PathBuf,
        writable: bool,
        backend: &str,
    ) -> PyResult<Mount> {
        image.get().image_only("mount")?;
        let opts = MountOptions {
            writable,
            backend: Backend::parse(backend).py()?,
        };
        let store = self.inner.clone();
        let stack = image.get().inner.clone();
        let m = py.detach(|| store.mount(&stack, &target, &opts)).py()?;
        Ok(Mount {
            store: self.inner.clone(),
            path: m.path().to_string_lossy().into_owned(),
            backend: m.backend().to_string(),
            writable: m.writable(),
            image: image.clone().unbind(),
            inner: Mutex::new(Some(m)),
        })
    }

    /// The live mounts of this store (what dead processes left is cleaned up first).
    fn mounts<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let store = self.inner.clone();
        let rows = py.detach(|| store.mounts()).py()?;
        rows.iter().map(|r| row_dict(py, r)).collect()
    }

    /// Unmount the mount of this store at `target` (made by any process); with `commit`,
    /// store its changes as a layer first and return it.
    #[pyo3(signature = (target, /, *, commit=false, created_by=None, progress=None))]
    fn unmount(
        &self,
        py: Python<'_>,
        target: PathBuf,
        commit: bool,
        created_by: Option<String>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Option<Layer>> {
        let interrupts = Interrupts::new(progress);
        let store = self.inner.clone();
        let result = py.detach(|| {
            let (_, imported) = store.unmount_path(&target, commit, &|n| interrupts.check(n))?;
            if let (Some(i), Some(text)) = (&imported, &created_by) {
                store.set_created_by(&i.layer.id, text)?;
            }
            Ok(imported)
        });
        match interrupts.finish(result)? {
            Some(imported) => Ok(Some(self.finish_import(py, imported)?)),
            None => Ok(None),
        }
    }
}

#[pymethods]
impl stack::Stack {
    /// Run `argv` in a container of this image, as `layerstore.run(store, image, argv, ...)`.
    #[pyo3(signature = (argv=None, **kwargs))]
    fn run<'py>(
        slf: &Bound<'py, Self>,
        argv: Option<&Bound<'py, PyAny>>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let store = Bound::new(
            slf.py(),
            Store {
                inner: slf.get().store.clone(),
            },
        )?;
        crate::pyobjects::RUN
            .get(slf.py())?
            .call((store, slf, argv), kwargs)
    }
}
