//! The one place core errors become Python exceptions.
//!
//! Exception classes live in `layerstore._errors` (Python), because they inherit from two bases
//! (`InvalidLayerError` is also a `ValueError`); we look them up there. I/O errors become the
//! built-in `FileNotFoundError`/`PermissionError`/`FileExistsError`/`OSError` by their kind.

use std::io;

use layerstore_core::{Error, ErrorKind};
use std::os::unix::ffi::OsStringExt;

use pyo3::exceptions::{
    PyFileExistsError, PyFileNotFoundError, PyIsADirectoryError, PyKeyboardInterrupt,
    PyNotADirectoryError, PyOSError, PyPermissionError, PyValueError,
};
use pyo3::prelude::*;

use crate::pyobjects::{
    AMBIGUOUS_ERROR, CONFLICT_ERROR, INTEGRITY_ERROR, INVALID_LAYER_ERROR, LAYERSTORE_ERROR,
    NOT_FOUND_ERROR, STACK_DEPTH_ERROR,
};

/// An OS error class by errno (as `OSError(errno, …)` itself picks the subclass).
fn os_error(errno: i32, args: impl pyo3::PyErrArguments + 'static) -> PyErr {
    match errno {
        2 => PyFileNotFoundError::new_err(args),
        1 | 13 => PyPermissionError::new_err(args),
        17 => PyFileExistsError::new_err(args),
        20 => PyNotADirectoryError::new_err(args),
        21 => PyIsADirectoryError::new_err(args),
        _ => PyOSError::new_err(args),
    }
}

pub fn to_py(err: Error) -> PyErr {
    if let Error::Path { problem, path } = &err {
        // (errno, strerror, filename), as the OS error of a real path would have them.
        let mut shown = Vec::with_capacity(path.len() + 1);
        shown.push(b'/');
        shown.extend_from_slice(path);
        let filename = std::ffi::OsString::from_vec(shown);
        return match problem.errno() {
            Some(errno) => os_error(errno, (errno, problem.text(), filename)),
            None => PyOSError::new_err(err.to_string()),
        };
    }
    if let Some(io) = err.io_error() {
        let msg = err.to_string();
        if let Some(errno) = io.raw_os_error() {
            // An OS error keeps its errno (e.g. ELOOP from symlink resolution). Python prints
            // the errno itself (`[Errno 2] …`), so Rust's ` (os error 2)` suffix goes.
            let msg = msg.replace(&format!(" (os error {errno})"), "");
            return os_error(errno, (errno, msg));
        }
        return match io.kind() {
            io::ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
            io::ErrorKind::PermissionDenied => PyPermissionError::new_err(msg),
            io::ErrorKind::AlreadyExists => PyFileExistsError::new_err(msg),
            _ => PyOSError::new_err(msg),
        };
    }
    let class = match err.kind() {
        ErrorKind::InvalidLayer => &INVALID_LAYER_ERROR,
        ErrorKind::Integrity => &INTEGRITY_ERROR,
        ErrorKind::NotFound => &NOT_FOUND_ERROR,
        ErrorKind::Ambiguous => &AMBIGUOUS_ERROR,
        ErrorKind::StackDepth => &STACK_DEPTH_ERROR,
        ErrorKind::Conflict => &CONFLICT_ERROR,
        ErrorKind::Cancelled => return PyKeyboardInterrupt::new_err("cancelled"),
        ErrorKind::InvalidArgument => return PyValueError::new_err(err.to_string()),
        ErrorKind::PermissionDenied | ErrorKind::ReadOnly => {
            return PyPermissionError::new_err(err.to_string())
        }
        ErrorKind::Network => return PyOSError::new_err(err.to_string()),
        _ => &LAYERSTORE_ERROR,
    };
    let msg = err.to_string();
    Python::attach(|py| match class.get(py) {
        Ok(cls) => PyErr::from_type(cls.clone().cast_into().expect("an exception class"), msg),
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
