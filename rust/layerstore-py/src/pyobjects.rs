//! The Python objects the bindings call, looked up once per interpreter (not imported on every
//! call).

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

/// One Python object, found by module and attribute on first use.
pub struct Cached {
    module: &'static str,
    attr: &'static str,
    cell: PyOnceLock<Py<PyAny>>,
}

impl Cached {
    const fn new(module: &'static str, attr: &'static str) -> Self {
        Cached {
            module,
            attr,
            cell: PyOnceLock::new(),
        }
    }

    /// The object, imported the first time.
    pub fn get<'py>(&self, py: Python<'py>) -> PyResult<&Bound<'py, PyAny>> {
        self.cell.import(py, self.module, self.attr)
    }
}

const ERRORS: &str = "layerstore._errors";
pub static LAYERSTORE_ERROR: Cached = Cached::new(ERRORS, "LayerstoreError");
pub static INVALID_LAYER_ERROR: Cached = Cached::new(ERRORS, "InvalidLayerError");
pub static INTEGRITY_ERROR: Cached = Cached::new(ERRORS, "IntegrityError");
pub static NOT_FOUND_ERROR: Cached = Cached::new(ERRORS, "NotFoundError");
pub static AMBIGUOUS_ERROR: Cached = Cached::new(ERRORS, "AmbiguousError");
pub static STACK_DEPTH_ERROR: Cached = Cached::new(ERRORS, "StackDepthError");
pub static CONFLICT_ERROR: Cached = Cached::new(ERRORS, "ConflictError");
pub static LAYERSTORE_WARNING: Cached = Cached::new(ERRORS, "LayerstoreWarning");

const STACKIO: &str = "layerstore._stackio";
pub static STACK_WALK: Cached = Cached::new(STACKIO, "walk");
pub static OPEN_FILE: Cached = Cached::new(STACKIO, "open_file");
pub static STACK_PATH: Cached = Cached::new(STACKIO, "StackPath");

pub static CONTAINER: Cached = Cached::new("layerstore._container", "Container");

pub static BUILD: Cached = Cached::new("layerstore._build", "build");
pub static RUN: Cached = Cached::new("layerstore._run", "run");
