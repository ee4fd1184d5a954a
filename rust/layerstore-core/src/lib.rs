//! layerstore core: a content-addressed store of container-image layers.
//!
//! Data flows one way: bytes in (tar, directory) → [`tar`] splitter → [`chunk`]er + BLAKE3 →
//! [`cas`] (pack files) + [`layer`] entries → [`meta`] (SQLite) → bytes out. [`store`] ties the
//! pieces together; every other module owns exactly one concept and knows nothing of Python.
#![forbid(unsafe_code)]

pub mod analysis;
pub mod apply;
pub mod cas;
pub mod changeset;
pub mod chunk;
pub mod compress;
pub mod container;
pub mod diff;
pub mod digest;
pub mod dirdiff;
pub mod emit;
pub mod error;
pub mod frozen;
pub mod fsio;
pub mod fusefs;
pub mod gather;
pub mod layer;
mod lease;
pub mod materialize;
pub mod meta;
pub mod oci;
pub mod owner;
pub mod paths;
mod pool;
pub mod registry;
pub mod squash;
pub mod stack;
pub mod store;
pub mod tar;
pub mod tarwrite;
pub mod union;

pub use error::{Error, ErrorKind, PathProblem, Result};

/// What the `cargo fuzz` targets in `rust/layerstore-core/fuzz/` call, and nothing else may:
/// the parsers that take untrusted bytes, re-exported in this one place so the targets keep
/// building when the modules above become `pub(crate)`. Not part of the API; no stability.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::compress::{decoder, detect_bytes, Compression, ZSTD_WINDOW_LOG_MAX};
    pub use crate::digest::{Blake3, OciDigest};
    pub use crate::layer::{Entry, Kind};
    pub use crate::oci::find_image_layers;
    pub use crate::oci::source::{
        normalise as normalise_source_name, resolve_dots, Opened, Source,
    };
    pub use crate::oci::Platform;
    pub use crate::tar::{
        normalize_name, BadName, EntrySink, Limits, Op, SplitOutput, Splitter, TarSplit,
    };
}
pub use store::Store;

/// The cores this process may use (1 when unknown), looked up once.
pub(crate) fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Deterministic crash injection for the durability tests (`LAYERSTORE_CRASH_AT`).
pub(crate) fn crash_point(name: &str) {
    // Deterministic crash injection for the durability tests.
    if std::env::var("LAYERSTORE_CRASH_AT").is_ok_and(|v| v == name) {
        std::process::abort();
    }
}
