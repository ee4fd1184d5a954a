//! Bindings of OCI image layouts and docker archives: conversions, GIL release, nothing else.

use std::path::PathBuf;
use std::sync::Arc;

use layerstore_core as core;
use layerstore_core::compress::Compression;
use layerstore_core::oci::docker::DockerExportOptions;
use layerstore_core::oci::{ImportedImage, OciExportOptions};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::CoreResultExt;
use crate::stack::Stack;
use crate::{Interrupts, Store};

fn images_by_name<'py>(
    py: Python<'py>,
    store: &Arc<core::Store>,
    images: Vec<ImportedImage>,
) -> PyResult<Bound<'py, PyDict>> {
    // An import's images may share layers: each layer's warnings are said once.
    let mut said = std::collections::HashSet::new();
    let warnings: Vec<String> = images
        .iter()
        .flat_map(|i| &i.warnings)
        .filter(|w| said.insert(*w))
        .cloned()
        .collect();
    let d = PyDict::new(py);
    for image in images {
        d.set_item(image.name, Stack::new(store.clone(), image.stack))?;
    }
    crate::emit_warnings(py, &warnings)?;
    Ok(d)
}

/// `None` keeps an imported image's blobs (new ones are gzipped); else gzip, zstd or none.
fn compression(name: Option<&str>) -> PyResult<Option<Compression>> {
    name.map(|n| Compression::parse(Some(n))).transpose().py()
}

#[pymethods]
impl Store {
    /// The manifest or config `digest` recorded for an image (`image.digest`,
    /// `image.config_digest`), byte for byte: (media type, data).
    fn oci_blob<'py>(
        &self,
        py: Python<'py>,
        digest: &str,
    ) -> PyResult<(String, Bound<'py, pyo3::types::PyBytes>)> {
        let (media_type, data) = self.inner.oci_blob(digest).py()?;
        Ok((media_type, pyo3::types::PyBytes::new(py, &data)))
    }

    /// Import every image of an OCI image layout; returns them by ref name (an image without
    /// one by its manifest digest).
    #[pyo3(signature = (src, /, *, platform=None, progress=None))]
    fn import_oci<'py>(
        &self,
        py: Python<'py>,
        src: PathBuf,
        platform: Option<String>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let interrupts = Interrupts::new(progress);
        let store = self.inner.clone();
        let result =
            py.detach(|| store.import_oci(&src, platform.as_deref(), &|n| interrupts.check(n)));
        let images = interrupts.finish(self.inner.locate(result))?;
        images_by_name(py, &self.inner, images)
    }

    /// Write `image` into the OCI image layout `dest` (created, or added to); returns the
    /// manifest digest.
    #[pyo3(signature = (image, dest, /, *, tag=None, compression=None, progress=None))]
    fn export_oci(
        &self,
        py: Python<'_>,
        image: &Bound<'_, Stack>,
        dest: PathBuf,
        tag: Option<String>,
        compression: Option<String>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<String> {
        let opts = OciExportOptions {
            tag,
            compression: self::compression(compression.as_deref())?,
        };
        let interrupts = Interrupts::new(progress);
        let store = self.inner.clone();
        let stack = &image.get().inner;
        let result = py.detach(|| store.export_oci(stack, &dest, &opts, &|n| interrupts.check(n)));
        Ok(interrupts.finish(result)?.digests.manifest)
    }

    /// Record `config` (OCI image config JSON) as the image of `image`, over its layers as
    /// uncompressed blobs (no layer is read), tagged `tag` when given; returns the image.
    #[pyo3(signature = (image, config, /, *, tag=None))]
    fn write_image(
        &self,
        py: Python<'_>,
        image: &Bound<'_, Stack>,
        config: Vec<u8>,
        tag: Option<&str>,
    ) -> PyResult<Stack> {
        image.get().image_only("write an image config for")?;
        let store = self.inner.clone();
        let stack = image.get().inner.clone();
        let inner = py.detach(|| store.write_image(&stack, config, tag)).py()?;
        Ok(Stack::new(self.inner.clone(), inner))
    }

    /// Build `dockerfile` (relative to `context` unless absolute) as `layerstore.build` does.
    #[pyo3(signature = (context, dockerfile=None, **kwargs))]
    fn build<'py>(
        slf: &Bound<'py, Self>,
        context: &Bound<'py, PyAny>,
        dockerfile: Option<Py<PyAny>>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let dockerfile = match dockerfile {
            Some(d) => d,
            None => "Dockerfile".into_pyobject(py)?.into_any().unbind(),
        };
        crate::pyobjects::BUILD
            .get(py)?
            .call((slf, context, dockerfile), kwargs)
    }

    /// Import every image of a `docker save` archive (classic or OCI-embedding); returns them by
    /// tag.
    #[pyo3(signature = (src, /, *, progress=None))]
    fn import_docker_archive<'py>(
        &self,
        py: Python<'py>,
        src: PathBuf,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let interrupts = Interrupts::new(progress);
        let store = self.inner.clone();
        let result = py.detach(|| store.import_docker_archive(&src, &|n| interrupts.check(n)));
        let images = interrupts.finish(self.inner.locate(result))?;
        images_by_name(py, &self.inner, images)
    }

    /// Write `image` as a `docker save` archive (`format="oci"`, the default, embeds an OCI
    /// layout; `"classic"` has a directory per layer); returns the embedded manifest's digest.
    #[pyo3(signature = (image, dest, /, *, tag=None, format="oci", progress=None))]
    fn export_docker_archive(
        &self,
        py: Python<'_>,
        image: &Bound<'_, Stack>,
        dest: PathBuf,
        tag: Option<String>,
        format: &str,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<String> {
        let classic = match format {
            "oci" => false,
            "classic" => true,
            other => {
                return Err(PyValueError::new_err(format!(
                    "unknown docker archive format {other:?} (expected \"oci\" or \"classic\")"
                )))
            }
        };
        let opts = DockerExportOptions { tag, classic };
        let interrupts = Interrupts::new(progress);
        let store = self.inner.clone();
        let stack = &image.get().inner;
        let result = py
            .detach(|| store.export_docker_archive(stack, &dest, &opts, &|n| interrupts.check(n)));
        Ok(interrupts.finish(result)?.digests.manifest)
    }
}

#[pymethods]
impl Stack {
    /// Digest of the image manifest this stack was imported from or last exported as, or None.
    #[getter]
    fn digest(&self) -> PyResult<Option<String>> {
        Ok(self
            .store
            .image_digests(&self.inner)
            .py()?
            .map(|d| d.manifest))
    }

    /// Digest of the image config recorded with that manifest, or None.
    #[getter]
    fn config_digest(&self) -> PyResult<Option<String>> {
        Ok(self
            .store
            .image_digests(&self.inner)
            .py()?
            .map(|d| d.config))
    }
}
