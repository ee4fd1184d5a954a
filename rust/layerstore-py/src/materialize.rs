//! Bindings of materialize and apply: conversions and GIL release only.

use std::path::PathBuf;

use layerstore_core as core;
use layerstore_core::materialize::{WriteOptions, WriteReport};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::CoreResultExt;
use crate::{emit_warnings, layer_id, stack, Interrupts};

fn report<'py>(py: Python<'py>, r: &WriteReport) -> PyResult<Bound<'py, PyDict>> {
    emit_warnings(py, &r.warnings)?;
    let d = PyDict::new(py);
    d.set_item("entries", r.entries)?;
    d.set_item("bytes", r.bytes)?;
    d.set_item("removed", r.removed)?;
    d.set_item("replaced", r.replaced)?;
    d.set_item("skipped", r.warnings.len())?;
    Ok(d)
}

#[pymethods]
impl crate::Store {
    /// Write the union view of `image` to the new directory `dest` (FileExistsError if it
    /// exists), through a private directory beside it renamed into place when complete.
    /// Returns counts: entries, bytes, removed, replaced, skipped.
    #[pyo3(signature = (image, dest, /, *, max_threads=None, progress=None))]
    fn materialize<'py>(
        &self,
        py: Python<'py>,
        image: &Bound<'_, stack::Stack>,
        dest: PathBuf,
        max_threads: Option<i128>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let opts = WriteOptions {
            max_threads: crate::args::opt_int("max_threads", max_threads, 1)?,
            ..WriteOptions::default()
        };
        let interrupts = Interrupts::new(progress);
        let store = self.inner.clone();
        let stack: &core::stack::Stack = &image.get().inner;
        let result = py.detach(|| store.materialize(stack, &dest, &opts, &|n| interrupts.check(n)));
        let r = interrupts.finish(result)?;
        report(py, &r)
    }

    /// Apply the changeset `layer` onto the existing directory `dest`: its whiteouts and opaque
    /// markers remove what they hide, then its entries are written.
    /// Returns counts: entries, bytes, removed, replaced, skipped.
    #[pyo3(signature = (layer, dest, /, *, progress=None))]
    fn apply<'py>(
        &self,
        py: Python<'py>,
        layer: &Bound<'_, PyAny>,
        dest: PathBuf,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let info = self.inner.layer(&layer_id(layer)?).py()?;
        let interrupts = Interrupts::new(progress);
        let store = self.inner.clone();
        let result = py.detach(|| store.apply(&info, &dest, &|n| interrupts.check(n)));
        let r = interrupts.finish(result)?;
        report(py, &r)
    }
}
