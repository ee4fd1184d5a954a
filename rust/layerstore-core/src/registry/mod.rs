//! Images in and out of OCI distribution registries (the distribution spec 1.1 as
//! docker-registry 2.8 speaks it), straight into and out of the store.
//!
//! Invariants: the registry is never trusted — every manifest, config and layer blob is
//! size-bounded or size-checked and digest-checked before the store records it, through the same
//! import and export paths OCI layouts use ([`crate::oci`]); a pull is all or nothing (nothing
//! stored or tagged unless every layer is in); secrets go only to the registry they belong to and
//! never into a message ([`client`], [`auth`]). Parts: [`reference`] parses image names, [`auth`]
//! finds credentials, [`client`] speaks HTTP, [`pull`] and [`push`] move images.

pub mod auth;
pub mod client;
pub mod partial;
pub mod pull;
pub mod push;
pub mod reference;

pub use auth::Credentials;
pub use client::ClientOptions;
pub use pull::{pull, PullOptions, Pulled};
pub use push::{push, PushOptions, Pushed};
pub use reference::Reference;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::error::Result;

/// The outcome of one item of [`bounded_map`]: `None` when it was not started because another
/// had failed.
type Outcome<R> = Option<Result<R>>;

/// `f` over `items` on up to `jobs` threads (the caller's among them), in order; after the first
/// failure no further item starts.
pub(crate) fn bounded_map<T: Sync, R: Send>(
    items: &[T],
    jobs: usize,
    f: impl Fn(&T) -> Result<R> + Sync,
) -> Vec<Outcome<R>> {
    let results: Vec<Mutex<Outcome<R>>> = items.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let worker = || loop {
        let i = next.fetch_add(1, Ordering::SeqCst);
        if i >= items.len() || failed.load(Ordering::SeqCst) {
            return;
        }
        let r = f(&items[i]);
        if r.is_err() {
            failed.store(true, Ordering::SeqCst);
        }
        *results[i].lock().expect("not poisoned") = Some(r);
    };
    let threads = jobs.clamp(1, items.len().max(1));
    std::thread::scope(|s| {
        for _ in 1..threads {
            s.spawn(worker);
        }
        worker();
    });
    results
        .into_iter()
        .map(|m| m.into_inner().expect("not poisoned"))
        .collect()
}

/// Check `credentials` against `registry` (`host[:port]`), then record them in the auth file
/// [`auth::login_file`] names; returns that file.
pub fn login(registry: &str, credentials: &Credentials, opts: &ClientOptions) -> Result<PathBuf> {
    let r = Reference::parse(&format!("{registry}/login-check"))?;
    let mut opts = opts.clone();
    opts.credentials = Some(credentials.clone());
    client::Client::connect(&r.registry, r.api_host(), "", &opts, false)?;
    auth::store(&r.registry, credentials)
}

/// Forget the credentials of `registry` in every auth file; returns whether there were any.
pub fn logout(registry: &str) -> Result<bool> {
    auth::remove(registry)
}
