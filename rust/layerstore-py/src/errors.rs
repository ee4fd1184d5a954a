//! The one place core errors become Python exceptions.
//!
//! Exception classes live in `layerstore._errors` (Python), because they inherit from two bases
//! (`InvalidLayerError` is also a `ValueError`); we look them up there. I/O errors become the
//! built-in `FileNotFoundError`/`PermissionError`/`FileExistsError`/`OSError` by their kind.

use std::io;

use layerstore_core::{Error, ErrorKind};
use pyo3::exceptions::{
    PyFileExistsError, PyFileNotFoundError, PyKeyboardInterrupt, PyOSError, PyPermissionError,
    PyValueError,
};
use pyo3::prelude::*;

fn class<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
    py.import("layerstore._errors")?.getattr(name)
}

pub fn to_py(err: Error) -> PyErr {
    if let Some(io) = err.io_error() {
        let msg = err.to_string();
        if let Some(errno) = io.raw_os_error() {
            // An OS error keeps its errno (e.g. ELOOP from symlink resolution). Python prints
            // the errno itself (`[Errno 2] …`), so Rust's ` (os error 2)` suffix goes.
            let msg = msg.replace(&format!(" (os error {errno})"), "");
            let args = (errno, msg);
            return match io.kind() {
                io::ErrorKind::NotFound => PyFileNotFoundError::new_err(args),
                io::ErrorKind::PermissionDenied => PyPermissionError::new_err(args),
                io::ErrorKind::AlreadyExists => PyFileExistsError::new_err(args),
                _ => PyOSError::new_err(args),
            };
        }
        return match io.kind() {
            io::ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
            io::ErrorKind::PermissionDenied => PyPermissionError::new_err(msg),
            io::ErrorKind::AlreadyExists => PyFileExistsError::new_err(msg),
            _ => PyOSError::new_err(msg),
        };
    }
    let name = match err.kind() {
        ErrorKind::InvalidLayer => "InvalidLayerError",
        ErrorKind::Integrity => "IntegrityError",
        ErrorKind::NotFound => "NotFoundError",
        ErrorKind::StackDepth => "StackDepthError",
        ErrorKind::Conflict => "ConflictError",
        ErrorKind::Cancelled => return PyKeyboardInterrupt::new_err("cancelled"),
        ErrorKind::InvalidArgument => return PyValueError::new_err(err.to_string()),
        _ => "LayerstoreError",
    };
    let msg = err.to_string();
    Python::attach(|py| match class(py, name) {
        Ok(cls) => PyErr::from_type(cls.cast_into().expect("an exception class"), msg),
        Err(e) => e,
    })
}

pub trait CoreResultExt<T> {
    fn py(self) -> PyResult<T>;
}

impl<T> CoreResultExt<T> for layerstore_core::Result<T> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}
