//! Bindings of image analysis: the core's report, handed to Python as plain data (parsed from
//! its JSON form by the `json` module), with the GIL released while it is computed.

use layerstore_core as core;
use pyo3::prelude::*;

use crate::errors::CoreResultExt;
use crate::stack::Stack;
use crate::Store;

fn from_json(py: Python<'_>, text: &str) -> PyResult<Py<PyAny>> {
    Ok(py.import("json")?.call_method1("loads", (text,))?.unbind())
}

#[pymethods]
impl Store {
    /// Where every byte of `image` comes from and which bytes are waste, from the indices only
    /// (no tar or file content is read). With `files`, also every file the image shows with
    /// the layers that touched it. See `layerstore.Analysis` for the shape.
    #[pyo3(signature = (image, /, *, files = false))]
    fn analyze(
        &self,
        py: Python<'_>,
        image: &Bound<'_, Stack>,
        files: bool,
    ) -> PyResult<Py<PyAny>> {
        let image = image.get();
        image.image_only("analyze")?;
        let store = self.inner.clone();
        let stack = image.inner.clone();
        let text = py
            .detach(|| -> core::Result<String> {
                let meta = store.layer_meta(&stack)?;
                let mut analysis = core::analysis::analyze(&stack, &meta);
                if files {
                    analysis.files = Some(core::analysis::files(&stack));
                }
                Ok(analysis.to_json())
            })
            .py()?;
        from_json(py, &text)
    }

    /// What images `a` and `b` share (by layer and by chunk) and what pulling `b` costs with `a`
    /// present (as whole layers, whole files, chunks). See `layerstore.Comparison`.
    fn compare(
        &self,
        py: Python<'_>,
        a: &Bound<'_, Stack>,
        b: &Bound<'_, Stack>,
    ) -> PyResult<Py<PyAny>> {
        a.get().image_only("compare")?;
        b.get().image_only("compare")?;
        let store = self.inner.clone();
        let (a, b) = (a.get().inner.clone(), b.get().inner.clone());
        let text = py
            .detach(|| -> core::Result<String> {
                let compressed = b
                    .layers
                    .iter()
                    .map(|l| store.compressed_size(l))
                    .collect::<core::Result<Vec<_>>>()?;
                Ok(core::analysis::compare(&a, &b, &compressed).to_json())
            })
            .py()?;
        from_json(py, &text)
    }
}
