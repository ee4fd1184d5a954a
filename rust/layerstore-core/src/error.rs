//! The one error type of the core.
//!
//! Every failure is a structured variant; callers match on [`ErrorKind`], never on message text.
//! Bindings map kinds to their own exception types in exactly one place.

use std::io;

/// What went wrong, for matching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The input is not a valid layer (bad tar, bad whiteout, escaping path, limit exceeded).
    InvalidLayer,
    /// A digest or size did not match, or a stored object is corrupt.
    Integrity,
    /// A named object (layer, tag, chunk) does not exist.
    NotFound,
    /// A stack would exceed the configured depth.
    StackDepth,
    /// A lock, reference or concurrent change prevented the operation.
    Conflict,
    /// An argument is malformed (a tag name, a compression name, chunk parameters).
    InvalidArgument,
    /// The caller cancelled the operation (e.g. Ctrl-C).
    Cancelled,
    /// A registry refused the credentials, or access to a repository (HTTP 401/403).
    PermissionDenied,
    /// A registry could not be reached, or answered what the protocol does not allow.
    Network,
    /// An operating-system I/O error.
    Io,
    /// The metadata database failed.
    Database,
    /// A short name or prefix matches more than one object.
    Ambiguous,
    /// A bug: a worker thread panicked.
    Internal,
    /// A write to a store opened read-only (or whose files cannot be written).
    ReadOnly,
}

/// What is wrong with a path looked up in an image, as the OS would say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PathProblem {
    /// `ENOENT`.
    NotFound,
    /// `ENOTDIR`: a directory was needed.
    NotADirectory,
    /// `EISDIR`: a file was needed.
    IsADirectory,
    /// `EINVAL`: e.g. `readlink` of something that is not a symlink.
    InvalidArgument,
    /// Content was asked of a device, fifo or socket.
    NotARegularFile,
}

impl PathProblem {
    /// The errno, where the OS has one for it.
    pub fn errno(self) -> Option<i32> {
        match self {
            PathProblem::NotFound => Some(2),
            PathProblem::NotADirectory => Some(20),
            PathProblem::IsADirectory => Some(21),
            PathProblem::InvalidArgument => Some(22),
            PathProblem::NotARegularFile => None,
        }
    }

    /// The words for it (`strerror`'s, where there is an errno).
    pub fn text(self) -> &'static str {
        match self {
            PathProblem::NotFound => "No such file or directory",
            PathProblem::NotADirectory => "Not a directory",
            PathProblem::IsADirectory => "Is a directory",
            PathProblem::InvalidArgument => "Invalid argument",
            PathProblem::NotARegularFile => "not a regular file",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A path of an image that does not suit the operation (kind `Io`: bindings raise the OS
    /// error class for its errno, with the path as the file name).
    #[error("{}: {}", problem.text(), path_text(path))]
    Path { problem: PathProblem, path: Vec<u8> },
    #[error("invalid layer: {reason} (entry {entry}, byte offset {offset})")]
    InvalidTar {
        reason: String,
        entry: u64,
        offset: u64,
    },
    #[error("invalid layer: {0}")]
    InvalidLayer(String),
    #[error(
        "limit exceeded: {what} is {found}, limit {limit} (entry {entry}, byte offset {offset})"
    )]
    LimitExceeded {
        what: &'static str,
        found: u64,
        limit: u64,
        entry: u64,
        offset: u64,
    },
    #[error("digest mismatch for {what}: expected {expected}, found {found}")]
    DigestMismatch {
        what: String,
        expected: String,
        found: String,
    },
    #[error("invalid image: {blob}: {reason}")]
    InvalidImage { blob: String, reason: String },
    #[error("blob {blob} is missing")]
    MissingBlob { blob: String },
    #[error("size mismatch for blob {blob}: expected {expected} bytes, found {found}")]
    SizeMismatch {
        blob: String,
        expected: u64,
        found: u64,
    },
    #[error("corrupt object: {0}")]
    Corrupt(String),
    /// A stored chunk failed its check (bytes changed, block undecodable, pack short or gone).
    #[error("chunk {chunk} (pack {pack}) is damaged: {reason}")]
    DamagedChunk {
        chunk: String,
        pack: String,
        reason: String,
    },
    /// Reading a file of a layer failed; says which layer and file.
    #[error("layer {layer}, {path}: {source}")]
    InEntry {
        layer: String,
        path: String,
        source: Box<Error>,
    },
    /// `fsck --repair` took damaged chunks out of use; the layer is refused until its content
    /// is imported again.
    #[error(
        "layer {layer} is broken: {chunks} of its chunks were damaged and taken out of use by fsck --repair; import the layer again to heal it"
    )]
    BrokenLayer { layer: String, chunks: u64 },
    #[error("not found: {0}")]
    NotFound(String),
    #[error("stack depth {depth} exceeds the limit of {limit} layers")]
    StackDepth { depth: usize, limit: usize },
    #[error("conflict: {0}")]
    Conflict(String),
    /// Image imports in flight (other than the caller's) have pinned the layer.
    #[error("conflict: layer {layer} is in use by {imports} image import(s) in progress")]
    LayerPinned { layer: String, imports: usize },
    #[error("{0}")]
    InvalidArgument(String),
    /// The registry refused access (HTTP 401 or 403); never names the credentials.
    #[error("registry {registry} denied access to repository {repository} (HTTP {status})")]
    RegistryDenied {
        registry: String,
        repository: String,
        status: u16,
    },
    /// A registry could not be reached after retries (`url` has no query string).
    #[error("{url}: {reason}")]
    Network { url: String, reason: String },
    /// A registry answered what the distribution protocol does not allow here.
    #[error("registry error at {url}: {reason}")]
    Registry { url: String, reason: String },
    #[error("cancelled")]
    Cancelled,
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error("metadata database: {0}")]
    Database(rusqlite::Error),
    #[error("{what} {prefix:?} is ambiguous: it matches {}; give more characters", candidates.join(", "))]
    Ambiguous {
        what: &'static str,
        prefix: String,
        candidates: Vec<String>,
    },
    #[error(
        "store {store} is read-only (opened so, or its files cannot be written): cannot {action}"
    )]
    ReadOnly { store: String, action: &'static str },
    #[error("internal error: the {what} panicked (a bug in layerstore: please report it)")]
    Panicked { what: &'static str },
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidTar { .. }
            | Error::InvalidLayer(_)
            | Error::LimitExceeded { .. }
            | Error::InvalidImage { .. } => ErrorKind::InvalidLayer,
            Error::DigestMismatch { .. }
            | Error::Corrupt(_)
            | Error::DamagedChunk { .. }
            | Error::BrokenLayer { .. }
            | Error::MissingBlob { .. }
            | Error::SizeMismatch { .. } => ErrorKind::Integrity,
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::StackDepth { .. } => ErrorKind::StackDepth,
            Error::Conflict(_) | Error::LayerPinned { .. } => ErrorKind::Conflict,
            Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Error::RegistryDenied { .. } => ErrorKind::PermissionDenied,
            Error::Network { .. } | Error::Registry { .. } => ErrorKind::Network,
            Error::Cancelled => ErrorKind::Cancelled,
            Error::Io { .. } | Error::Path { .. } => ErrorKind::Io,
            Error::Database(_) => ErrorKind::Database,
            Error::Ambiguous { .. } => ErrorKind::Ambiguous,
            Error::Panicked { .. } => ErrorKind::Internal,
            Error::ReadOnly { .. } => ErrorKind::ReadOnly,
            Error::InEntry { source, .. } => source.kind(),
        }
    }

    /// The underlying I/O error, if this is one (bindings map it by `io::ErrorKind`).
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            Error::Io { source, .. } => Some(source),
            Error::InEntry { source, .. } => source.io_error(),
            _ => None,
        }
    }

    /// This error, said to have happened reading `path` of `layer` (once: an error that already
    /// names its entry keeps that name).
    pub fn in_entry(self, layer: &dyn std::fmt::Display, path: &[u8]) -> Self {
        if matches!(self, Error::InEntry { .. } | Error::Cancelled) {
            return self;
        }
        Error::InEntry {
            layer: layer.to_string(),
            path: path_text(path),
            source: Box::new(self),
        }
    }

    /// `problem` with `path` (normalised, relative to the image root).
    pub fn path(problem: PathProblem, path: &[u8]) -> Self {
        Error::Path {
            problem,
            path: path.to_vec(),
        }
    }

    /// This error, said to concern the store at `root` where its message does not say which
    /// file it is about: an OS failure of the metadata database names `root/meta.db`.
    pub fn in_store(self, root: &std::path::Path) -> Self {
        match self {
            Error::Io { context, source } if context.starts_with(DATABASE) => Error::Io {
                context: format!(
                    "{DATABASE} {}{}",
                    root.join("meta.db").display(),
                    &context[DATABASE.len()..]
                ),
                source,
            },
            Error::InEntry {
                layer,
                path,
                source,
            } => Error::InEntry {
                layer,
                path,
                source: Box::new(source.in_store(root)),
            },
            other => other,
        }
    }

    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<rusqlite::Error> for Error {
    /// A database failure that is an operating-system condition (a full disk, an I/O error,
    /// a file that cannot be opened) is that I/O error, so callers see the `OSError` they expect.
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode;
        let errno = match &e {
            rusqlite::Error::SqliteFailure(f, _) => match f.code {
                ErrorCode::DiskFull => Some(28),         // ENOSPC
                ErrorCode::SystemIoFailure => Some(5),   // EIO
                ErrorCode::PermissionDenied => Some(13), // EACCES
                _ => None,
            },
            _ => None,
        };
        match errno {
            // The database's file is named where the store is known ([`Error::in_store`]).
            Some(n) => Error::io(format!("{DATABASE}: {e}"), io::Error::from_raw_os_error(n)),
            None => Error::Database(e),
        }
    }
}

impl From<io::Error> for Error {
    fn from(source: io::Error) -> Self {
        // A reader adapter may smuggle a core error through `io::Error` (e.g. a cancelled read).
        if source.get_ref().is_some_and(|e| e.is::<Error>()) {
            let inner = source.into_inner().expect("checked above");
            return *inner.downcast::<Error>().expect("checked above");
        }
        Error::Io {
            context: "I/O".into(),
            source,
        }
    }
}

/// How an OS failure of the metadata database begins (see [`Error::in_store`]).
const DATABASE: &str = "metadata database";

/// An entry path as users see it: absolute, lossily decoded.
pub(crate) fn path_text(path: &[u8]) -> String {
    format!("/{}", String::from_utf8_lossy(path).trim_start_matches('/'))
}

/// `n` and a noun, in the plural unless `n` is one: "1 layer", "3 layers".
pub(crate) fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attach a context string to an I/O result.
pub trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| {
            if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
                Error::from(e)
            } else {
                Error::io(context(), e)
            }
        })
    }
}
