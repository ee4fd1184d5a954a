//! Bindings of diff and squash. Conversions only.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

use layerstore_core as core;
use layerstore_core::changeset::{Change, What};
use layerstore_core::dirdiff::{DirDiff, DirDiffOptions};
use layerstore_core::store::ImportOptions;
use pyo3::prelude::*;

use crate::errors::CoreResultExt;
use crate::stack::Stack;
use crate::{Interrupts, Layer, Store};

/// One side of a diff: an image, or a directory imported for the comparison.
enum Side {
    Stack(core::stack::Stack),
    Dir(PathBuf),
}

impl<'py> FromPyObject<'_, 'py> for Side {
    type Error = PyErr;
    fn extract(obj: Borrowed<'_, 'py, PyAny>) -> PyResult<Self> {
        if let Ok(s) = obj.cast::<Stack>() {
            s.get().image_only("diff")?;
            return Ok(Side::Stack(s.get().inner.clone()));
        }
        Ok(Side::Dir(obj.extract::<PathBuf>()?))
    }
}

/// A directory as a one-layer stack; the layer is dropped again if the import created it.
fn resolve_side(
    store: &core::Store,
    side: Side,
) -> core::Result<(core::stack::Stack, Option<core::digest::Blake3>)> {
    match side {
        Side::Stack(s) => Ok((s, None)),
        Side::Dir(path) => {
            let imported = store.import_dir(
                &path,
                &core::fsio::DirOptions::default(),
                &ImportOptions::default(),
                &core::store::no_progress,
            )?;
            let stack = store.stack(std::slice::from_ref(&imported.layer))?;
            let temporary = (!imported.existed).then_some(imported.layer.id);
            Ok((stack, temporary))
        }
    }
}

fn both_sides(
    store: &core::Store,
    a: Side,
    b: Side,
    f: impl FnOnce(&core::stack::Stack, &core::stack::Stack) -> core::Result<Vec<Change>>,
) -> core::Result<Vec<Change>> {
    let (sa, ta) = resolve_side(store, a)?;
    let result = resolve_side(store, b).and_then(|(sb, tb)| {
        let r = f(&sa, &sb);
        if let Some(id) = tb {
            let _ = store.delete(&id);
        }
        r
    });
    if let Some(id) = ta {
        let _ = store.delete(&id);
    }
    result
}

fn change_name(c: &Change) -> &'static str {
    match c.what {
        What::Entry(_) => "entry",
        What::Link { .. } => "link",
        What::Whiteout => "whiteout",
        What::Opaque => "opaque",
    }
}

fn named(changes: &[Change]) -> Vec<(&'static str, Vec<u8>)> {
    changes
        .iter()
        .map(|c| (change_name(c), c.path.clone()))
        .collect()
}

fn listing(changes: Vec<(&'static str, Vec<u8>)>) -> Vec<(&'static str, OsString)> {
    changes
        .into_iter()
        .map(|(name, path)| {
            let mut p = Vec::with_capacity(path.len() + 1);
            p.push(b'/');
            p.extend_from_slice(&path);
            (name, OsString::from_vec(p))
        })
        .collect()
}

fn dir_opts(compare_content: bool, max_threads: Option<usize>) -> DirDiffOptions {
    DirDiffOptions {
        dir: core::fsio::DirOptions {
            exclude_xattrs: Vec::new(),
            max_threads,
        },
        compare_content,
        clamp_mtime_ns: None,
    }
}

/// A `SOURCE_DATE_EPOCH` (seconds) as the largest mtime in nanoseconds.
fn clamp_ns(source_date_epoch: Option<i64>) -> PyResult<Option<i64>> {
    source_date_epoch
        .map(|s| {
            s.checked_mul(1_000_000_000).ok_or_else(|| {
                pyo3::exceptions::PyValueError::new_err("source_date_epoch is out of range")
            })
        })
        .transpose()
}

/// A squash range as indices (`stop` defaults to the depth): a negative bound is a `ValueError`.
fn range(start: i128, stop: Option<i128>, depth: usize) -> PyResult<(usize, usize)> {
    let start = crate::args::int("start", start, 0)?;
    let stop = crate::args::opt_int("stop", stop, 0)?.unwrap_or(depth);
    Ok((start, stop))
}

#[pymethods]
impl Store {
    /// The changeset taking `a` to `b` (each an image or a directory), stored as a layer.
    /// Image → directory walks the directory with a stat fast path (`compare_content` hashes
    /// same-looking files too); other directory sides are imported for the comparison.
    #[allow(clippy::too_many_arguments)] // mirrors the Python keyword arguments
    #[pyo3(signature = (a, b, /, *, compare_content=false, source_date_epoch=None, max_threads=None, progress=None))]
    fn diff(
        &self,
        py: Python<'_>,
        a: Side,
        b: Side,
        compare_content: bool,
        source_date_epoch: Option<i64>,
        max_threads: Option<i128>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Layer> {
        let clamp = clamp_ns(source_date_epoch)?;
        let max_threads = crate::args::opt_int("max_threads", max_threads, 1)?;
        let interrupts = Interrupts::new(progress);
        let store = self.inner.clone();
        let result = py.detach(|| match (a, b) {
            (Side::Stack(base), Side::Dir(dir)) => {
                let mut opts = dir_opts(compare_content, max_threads);
                opts.clamp_mtime_ns = clamp;
                store.diff_dir(&base, &dir, &opts, &|n| interrupts.check(n))
            }
            (a, b) => {
                let mut out = None;
                both_sides(&store, a, b, |sa, sb| {
                    out = Some(store.diff(sa, sb, clamp, &|n| interrupts.check(n))?);
                    Ok(Vec::new())
                })?;
                Ok(out.expect("set by the diff"))
            }
        });
        self.finish_import(py, interrupts.finish(result)?)
    }

    /// The changes taking `a` to `b` without storing anything: (kind, path) pairs in archive
    /// order, kind being "entry", "link", "whiteout" or "opaque".
    #[pyo3(signature = (a, b, /, *, compare_content=false, max_threads=None))]
    fn changes(
        &self,
        py: Python<'_>,
        a: Side,
        b: Side,
        compare_content: bool,
        max_threads: Option<i128>,
    ) -> PyResult<Vec<(&'static str, OsString)>> {
        let max_threads = crate::args::opt_int("max_threads", max_threads, 1)?;
        let store = self.inner.clone();
        let listed = py
            .detach(|| match (a, b) {
                (Side::Stack(base), Side::Dir(dir)) => {
                    let opts = dir_opts(compare_content, max_threads);
                    Ok(DirDiff::compare(&base, &dir, &opts)?.listing())
                }
                (a, b) => both_sides(&store, a, b, |sa, sb| {
                    Ok(core::diff::diff_indices(&sa.index, &sb.index))
                })
                .map(|changes| named(&changes)),
            })
            .py()?;
        Ok(listing(listed))
    }

    /// Layers `start..stop` of `image` as one layer with the same view; the tar is also
    /// written to `dest` when given.
    #[allow(clippy::too_many_arguments)] // mirrors the Python keyword arguments
    #[pyo3(signature = (image, /, start=0, stop=None, *, dest=None, source_date_epoch=None, progress=None))]
    fn squash(
        &self,
        py: Python<'_>,
        image: &Bound<'_, Stack>,
        start: i128,
        stop: Option<i128>,
        dest: Option<PathBuf>,
        source_date_epoch: Option<i64>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Layer> {
        let clamp = clamp_ns(source_date_epoch)?;
        image.get().image_only("squash")?;
        let stack = image.get().inner.clone();
        let (start, stop) = range(start, stop, stack.depth())?;
        let interrupts = Interrupts::new(progress);
        let store = self.inner.clone();
        let result = py.detach(|| match &dest {
            None => store.squash(&stack, start, stop, clamp, None, &|n| interrupts.check(n)),
            Some(path) => core::fsio::write_atomically(path, |out| {
                store.squash(&stack, start, stop, clamp, Some(out), &|n| {
                    interrupts.check(n)
                })
            }),
        });
        self.finish_import(py, interrupts.finish(result)?)
    }

    /// The changes a squash of `start..stop` would store, as `changes` lists them.
    #[pyo3(signature = (image, /, start=0, stop=None))]
    fn squash_changes(
        &self,
        py: Python<'_>,
        image: &Bound<'_, Stack>,
        start: i128,
        stop: Option<i128>,
    ) -> PyResult<Vec<(&'static str, OsString)>> {
        image.get().image_only("squash")?;
        let stack = image.get().inner.clone();
        let (start, stop) = range(start, stop, stack.depth())?;
        let store = self.inner.clone();
        let changes = py
            .detach(|| store.squash_changes(&stack, start, stop))
            .py()?;
        Ok(listing(named(&changes)))
    }
}

#[pymethods]
impl Stack {
    /// This image with layers `start..stop` squashed into one; the new layer's `created_by`
    /// joins the range's recorded build steps with " && ".
    #[pyo3(signature = (start=0, stop=None, *, source_date_epoch=None, progress=None))]
    fn squash(
        &self,
        py: Python<'_>,
        start: i128,
        stop: Option<i128>,
        source_date_epoch: Option<i64>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Stack> {
        let clamp = clamp_ns(source_date_epoch)?;
        self.image_only("squash")?;
        let (start, stop) = range(start, stop, self.inner.depth())?;
        let interrupts = Interrupts::new(progress);
        let store = self.store.clone();
        let result = py.detach(|| {
            let flat = store.squash(&self.inner, start, stop, clamp, None, &|n| {
                interrupts.check(n)
            })?;
            // The squashed layer's history: the build steps of the range, in order.
            let mut steps = Vec::new();
            for layer in self.inner.layers.get(start..stop).unwrap_or_default() {
                steps.extend(store.created_by(&layer.id)?);
            }
            if !steps.is_empty() {
                store.set_created_by(&flat.layer.id, &steps.join(" && "))?;
            }
            let mut layers = self.inner.layers[..start].to_vec();
            layers.push(flat.layer);
            layers.extend_from_slice(&self.inner.layers[stop..]);
            store.stack(&layers)
        });
        Ok(Stack::new(self.store.clone(), interrupts.finish(result)?))
    }
}
