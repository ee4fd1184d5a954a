//! Bindings of registry pull, push, login and logout: conversions, GIL release, nothing else.

use std::path::PathBuf;

use layerstore_core as core;
use layerstore_core::registry::{ClientOptions, Credentials, PullOptions, PushOptions};
use pyo3::prelude::*;

use crate::errors::CoreResultExt;
use crate::stack::Stack;
use crate::{Interrupts, Store};

fn client_options(
    auth: Option<(String, String)>,
    tls_verify: bool,
    ca_file: Option<PathBuf>,
) -> ClientOptions {
    ClientOptions {
        tls_verify,
        ca_file,
        credentials: auth.map(|(username, password)| Credentials { username, password }),
        ..ClientOptions::default()
    }
}

#[pymethods]
impl Store {
    /// Pull the image `ref` from its registry into the store and tag it with the canonical
    /// reference (`docker.io/library/debian:12` for `debian:12`); returns it.
    #[pyo3(signature = (reference, /, *, platform=None, auth=None, tls_verify=true, ca_file=None, progress=None))]
    #[allow(clippy::too_many_arguments)]
    fn pull(
        &self,
        py: Python<'_>,
        reference: String,
        platform: Option<String>,
        auth: Option<(String, String)>,
        tls_verify: bool,
        ca_file: Option<PathBuf>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Stack> {
        let opts = PullOptions {
            platform,
            client: client_options(auth, tls_verify, ca_file),
            ..PullOptions::default()
        };
        let interrupts = Interrupts::new(progress);
        let store = self.inner.clone();
        let result =
            py.detach(|| core::registry::pull(&store, &reference, &opts, &|n| interrupts.check(n)));
        let pulled = interrupts.finish(result)?;
        Ok(Stack::new(self.inner.clone(), pulled.image.stack))
    }

    /// Push `image` to the registry as `ref`; returns the manifest digest.
    #[pyo3(
        signature = (image, reference, /, *, compression=Some("gzip".to_string()), auth=None, tls_verify=true, ca_file=None, progress=None),
        text_signature = "(self, image, reference, /, *, compression='gzip', auth=None, tls_verify=True, ca_file=None, progress=None)"
    )]
    /// Push `image` to the registry reference `ref`; returns the manifest digest.
    #[allow(clippy::too_many_arguments)]
    fn push(
        &self,
        py: Python<'_>,
        image: &Bound<'_, Stack>,
        reference: String,
        compression: Option<String>,
        auth: Option<(String, String)>,
        tls_verify: bool,
        ca_file: Option<PathBuf>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<String> {
        let mut opts = PushOptions {
            compression: None,
            client: client_options(auth, tls_verify, ca_file),
            ..PushOptions::default()
        };
        if let Some(c) = &compression {
            opts.set_compression(c).py()?;
        }
        let interrupts = Interrupts::new(progress);
        let store = self.inner.clone();
        let stack = &image.get().inner;
        let result = py.detach(|| {
            core::registry::push(&store, stack, &reference, &opts, &|n| interrupts.check(n))
        });
        Ok(interrupts.finish(result)?.manifest_digest)
    }
}

/// Check credentials against `registry` (`host[:port]`) and record them in the auth file
/// podman and docker read; returns that file's path.
#[pyfunction]
#[pyo3(signature = (registry, username, password, /, *, tls_verify=true, ca_file=None))]
pub(crate) fn registry_login(
    py: Python<'_>,
    registry: String,
    username: String,
    password: String,
    tls_verify: bool,
    ca_file: Option<PathBuf>,
) -> PyResult<std::ffi::OsString> {
    let creds = Credentials { username, password };
    let opts = client_options(None, tls_verify, ca_file);
    py.detach(|| core::registry::login(&registry, &creds, &opts))
        .py()
        .map(PathBuf::into_os_string)
}

/// Forget the credentials of `registry` in every auth file; returns whether there were any.
#[pyfunction]
pub(crate) fn registry_logout(registry: &str) -> PyResult<bool> {
    core::registry::logout(registry).py()
}
