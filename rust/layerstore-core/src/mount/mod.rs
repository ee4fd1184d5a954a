//! Mounts of images: a kernel overlayfs over shared layer snapshots, or a FUSE view served
//! straight from the store, read-only or with a writable upper directory whose changes commit
//! as a layer.
//!
//! Invariants:
//! - A mount is recorded (meta `mounts`, with every layer it shows) before it is made and
//!   forgotten after it is undone, so a mounted layer cannot be deleted and `gc` keeps the
//!   snapshots it uses. Each mount has a directory `mounts/<id>/` (`upper/`, `work/`, and
//!   `lower/` where a FUSE view is the lower of a writable overlay) and a lock file
//!   `mounts/<id>.lock` its owner process holds while the mount lives.
//! - An owned mount lives while its owner holds the lock; a disowned one (a CLI mount) until it
//!   is unmounted. Whatever a killed owner left — a mount, an upper directory, a row — the
//!   reaper (`gc`, and every `mount`) finds and removes: stale mounts are lazily unmounted.
//! - Every mount shows exactly the stack's union view. A commit reads the mount through the
//!   directory comparison ([`crate::dirdiff`]), walking only directories present in the upper
//!   directory: its cost follows what changed, and its result equals `diff(image, mount)`.

pub mod overlay;
pub(crate) mod snapshot;

use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{flock, FlockOperation};

use crate::dirdiff::{DirDiff, DirDiffOptions};
use crate::error::{Error, IoContext, Result};
use crate::fusefs::{FuseMount, FuseOptions};
use crate::meta::mounts::{MountLayer, MountRow};
use crate::meta::{self};
use crate::stack::Stack;
use crate::store::{Imported, Progress, Store};

/// The directory of mount directories and lock files, under the store root.
pub(crate) const MOUNTS_DIR: &str = "mounts";

/// How a mount is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Kernel overlayfs over per-layer snapshot directories (root).
    Overlay,
    /// A FUSE file system serving the union index and the packs (root, or access to /dev/fuse).
    Fuse,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Overlay => "overlay",
            Backend::Fuse => "fuse",
        }
    }

    /// `overlay`, `fuse`, or `auto`: overlay as root, else FUSE where `/dev/fuse` is usable.
    pub fn parse(name: &str) -> Result<Backend> {
        match name {
            "overlay" => Ok(Backend::Overlay),
            "fuse" => Ok(Backend::Fuse),
            "auto" if is_root() => Ok(Backend::Overlay),
            "auto" => Ok(Backend::Fuse),
            other => Err(Error::InvalidArgument(format!(
                "unknown mount backend {other:?} (overlay, fuse or auto)"
            ))),
        }
    }
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Options of [`Store::mount`].
#[derive(Clone, Debug)]
pub struct MountOptions {
    pub writable: bool,
    pub backend: Backend,
}

/// A live mount made by this process. Dropping it unmounts (unless it was disowned).
pub struct Mount {
    store: Arc<Store>,
    row: MountRow,
    base: Stack,
    dir: PathBuf,
    /// The owner lock (held while this mount is owned).
    lock: Option<File>,
    fuse: Option<FuseMount>,
    mounted: bool,
}

impl Mount {
    pub fn path(&self) -> &Path {
        Path::new(&self.row.target)
    }

    pub fn id(&self) -> &str {
        &self.row.id
    }

    pub fn backend(&self) -> &str {
        &self.row.backend
    }

    pub fn writable(&self) -> bool {
        self.row.writable
    }

    /// The image mounted.
    pub fn image(&self) -> &Stack {
        &self.base
    }

    /// Store what was changed through a writable mount as a layer (the image is unchanged).
    pub fn commit(&self, progress: Progress<'_>) -> Result<Imported> {
        if !self.mounted {
            return Err(Error::InvalidArgument("the mount is unmounted".into()));
        }
        commit(&self.store, &self.row, &self.base, &self.dir, progress)
    }

    /// Unmount, remove the upper directory and forget the mount.
    pub fn unmount(mut self) -> Result<()> {
        self.undo()
    }

    fn undo(&mut self) -> Result<()> {
        if !self.mounted {
            return Ok(());
        }
        self.mounted = false;
        let target = PathBuf::from(&self.row.target);
        let result = match self.fuse.take() {
            Some(fuse) if !self.row.writable => fuse.unmount(),
            Some(fuse) => overlay::detach(&target).and(fuse.unmount()),
            None => overlay::detach(&target),
        };
        self.store.forget_mount(&self.row.id);
        result
    }

    /// Let the mount outlive this process: it stays until `unmount_path` (overlay only; a FUSE
    /// view needs its serving process, see [`Mount::wait`]).
    pub fn disown(mut self) -> Result<MountRow> {
        if self.fuse.is_some() {
            return Err(Error::InvalidArgument(
                "a FUSE mount lives in its serving process: wait() in it instead".into(),
            ));
        }
        meta::mounts::disown_mount(&*self.store.conn()?, &self.row.id)?;
        self.mounted = false;
        self.lock = None;
        Ok(self.row.clone())
    }

    /// Serve until the mount is unmounted from outside (`umount`), then clean up.
    pub fn wait(mut self) -> Result<()> {
        if let Some(fuse) = self.fuse.take() {
            let target = PathBuf::from(&self.row.target);
            let r = fuse.wait();
            if self.row.writable {
                let _ = overlay::detach(&target);
            }
            self.mounted = false;
            self.store.forget_mount(&self.row.id);
            return r;
        }
        Err(Error::InvalidArgument(
            "only a FUSE mount is served by a process".into(),
        ))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = self.undo();
    }
}

/// Store the changes of a writable mount (upper directory under `dir`) over `base`.
fn commit(
    store: &Store,
    row: &MountRow,
    base: &Stack,
    dir: &Path,
    progress: Progress<'_>,
) -> Result<Imported> {
    if !row.writable {
        return Err(Error::InvalidArgument(format!(
            "{} is mounted read-only: nothing to commit",
            row.target
        )));
    }
    let upper_dirs = upper_dirs(&dir.join("upper"))?;
    let descend = |rel: &[u8]| upper_dirs.contains(rel);
    let opts = DirDiffOptions::default();
    let diff = DirDiff::compare_where(base, Path::new(&row.target), &opts, &descend)?;
    store.import_dir_diff(diff, &opts, progress)
}

/// The directories of an upper directory, as relative paths (the root is the empty path).
fn upper_dirs(upper: &Path) -> Result<HashSet<Vec<u8>>> {
    use std::os::unix::ffi::OsStrExt;
    let mut out = HashSet::new();
    let mut todo = vec![Vec::<u8>::new()];
    while let Some(rel) = todo.pop() {
        let abs = crate::fsio::abs_path(upper, &rel);
        for e in fs::read_dir(&abs).ctx(|| format!("listing {}", abs.display()))? {
            let e = e.ctx(|| format!("listing {}", abs.display()))?;
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(crate::paths::child_path(&rel, e.file_name().as_bytes()));
            }
        }
        out.insert(rel);
    }
    Ok(out)
}

/// Whether the owner of a mount still holds its lock.
fn owner_alive(root: &Path, id: &str) -> bool {
    match File::open(lock_path(root, id)) {
        Ok(f) => flock(&f, FlockOperation::NonBlockingLockShared).is_err(),
        Err(e) => e.kind() != io::ErrorKind::NotFound,
    }
}

fn lock_path(root: &Path, id: &str) -> PathBuf {
    root.join(MOUNTS_DIR).join(format!("{id}.lock"))
}

fn source(id: &str) -> String {
    format!("layerstore:{id}")
}

fn fuse_source(id: &str) -> String {
    format!("layerstore:{id}:lower")
}

/// What [`Store::reap_mounts`] did.
#[derive(Clone, Debug, Default)]
pub struct Reaped {
    /// Mounts whose owner was gone or whose target was no longer mounted.
    pub mounts: u64,
    /// Of those, mounts that were still attached and were lazily unmounted.
    pub unmounted: u64,
}

impl Store {
    /// Mount `stack` at `target` (an existing empty directory).
    pub fn mount(
        self: &Arc<Self>,
        stack: &Stack,
        target: &Path,
        opts: &MountOptions,
    ) -> Result<Mount> {
        self.check_writable("mount an image")?;
        if opts.backend == Backend::Overlay && !is_root() {
            return Err(Error::io(
                "the overlay backend needs root (CAP_SYS_ADMIN); try backend=\"fuse\"",
                io::Error::from_raw_os_error(rustix::io::Errno::PERM.raw_os_error()),
            ));
        }
        if opts.writable && !is_root() {
            return Err(Error::io(
                "a writable mount (a kernel overlay over the image) needs root (CAP_SYS_ADMIN)",
                io::Error::from_raw_os_error(rustix::io::Errno::PERM.raw_os_error()),
            ));
        }
        let target = fs::canonicalize(target).ctx(|| format!("{}", target.display()))?;
        check_target(&target)?;
        self.reap_mounts()?;
        let id = crate::owner::unique_name();
        let mounts = self.root().join(MOUNTS_DIR);
        let dir = mounts.join(&id);
        fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        let lock = File::options()
            .write(true)
            .create_new(true)
            .open(lock_path(self.root(), &id))
            .ctx(|| format!("creating the lock of mount {id}"))?;
        flock(&lock, FlockOperation::NonBlockingLockExclusive)
            .map_err(io::Error::from)
            .ctx(|| format!("locking mount {id}"))?;
        let row = MountRow {
            id: id.clone(),
            target: target.to_string_lossy().into_owned(),
            backend: opts.backend.name().to_string(),
            writable: opts.writable,
            owned: true,
            created: meta::now(),
            layers: stack.layers.iter().map(|l| l.id).collect(),
        };
        let mut mount = Mount {
            store: self.clone(),
            row,
            base: stack.clone(),
            dir,
            lock: Some(lock),
            fuse: None,
            mounted: false,
        };
        match self.make_mount(&mut mount, opts) {
            Ok(()) => {
                mount.mounted = true;
                Ok(mount)
            }
            Err(e) => {
                self.forget_mount(&id);
                Err(e)
            }
        }
    }

    fn make_mount(self: &Arc<Self>, m: &mut Mount, opts: &MountOptions) -> Result<()> {
        let target = PathBuf::from(&m.row.target);
        let (upper, work) = (m.dir.join("upper"), m.dir.join("work"));
        if opts.writable {
            for d in [&upper, &work] {
                fs::create_dir(d).ctx(|| format!("creating {}", d.display()))?;
            }
            set_root_meta(&upper, &m.base)?;
        }
        let upper_spec = opts.writable.then_some((upper.as_path(), work.as_path()));
        match opts.backend {
            Backend::Overlay => {
                let _guard = snapshot::lock(self.root(), false)?;
                let planned = snapshot::plan(&m.base)?;
                let layers: Vec<MountLayer<'_>> = planned
                    .iter()
                    .map(|p| MountLayer {
                        layer: &p.layer.id,
                        snapshot: Some(&p.name),
                    })
                    .collect();
                meta::mounts::insert_mount(&mut *self.conn()?, &m.row, &layers)?;
                let mut lowers = snapshot::ensure(self, &planned)?;
                // Without an upper directory the kernel wants two lowers at least.
                let least = if opts.writable { 1 } else { 2 };
                while lowers.len() < least {
                    lowers.insert(0, self.empty_lower()?);
                }
                let spec = overlay::OverlaySpec {
                    lowers: &lowers,
                    upper: upper_spec,
                    source: &source(&m.row.id),
                };
                overlay::mount(&spec, &target)
            }
            Backend::Fuse => {
                let layers: Vec<MountLayer<'_>> = m
                    .base
                    .layers
                    .iter()
                    .map(|l| MountLayer {
                        layer: &l.id,
                        snapshot: None,
                    })
                    .collect();
                meta::mounts::insert_mount(&mut *self.conn()?, &m.row, &layers)?;
                let at = if opts.writable {
                    let lower = m.dir.join("lower");
                    fs::create_dir(&lower).ctx(|| format!("creating {}", lower.display()))?;
                    lower
                } else {
                    target.clone()
                };
                let fuse_opts = FuseOptions {
                    fsname: if opts.writable {
                        fuse_source(&m.row.id)
                    } else {
                        source(&m.row.id)
                    },
                    // Other users (and root) may enter a mount root makes; a user's own mount
                    // is theirs alone (fusermount3 allows others only where fuse.conf says
                    // `user_allow_other`).
                    allow_other: rustix::process::geteuid().is_root(),
                    ..FuseOptions::default()
                };
                let fuse = FuseMount::mount(self.clone(), m.base.clone(), &at, &fuse_opts)?;
                if opts.writable {
                    let lowers = [at];
                    let spec = overlay::OverlaySpec {
                        lowers: &lowers,
                        upper: upper_spec,
                        source: &source(&m.row.id),
                    };
                    if let Err(e) = overlay::mount(&spec, &target) {
                        let _ = fuse.unmount();
                        return Err(e);
                    }
                }
                m.fuse = Some(fuse);
                Ok(())
            }
        }
    }

    /// An empty directory: the lower of an image without layers.
    fn empty_lower(&self) -> Result<PathBuf> {
        let p = self.root().join(snapshot::SNAPSHOTS_DIR).join("empty");
        fs::create_dir_all(&p).ctx(|| format!("creating {}", p.display()))?;
        Ok(p)
    }

    /// Forget a mount of this process (after it was undone or failed).
    fn forget_mount(&self, id: &str) {
        let dir = self.root().join(MOUNTS_DIR).join(id);
        let _ = remove_tree(&dir);
        if let Ok(mut conn) = self.conn() {
            let _ = meta::mounts::delete_mount(&mut conn, id);
        }
        let _ = fs::remove_file(lock_path(self.root(), id));
    }

    /// Live mounts of this store (stale ones are cleaned up first).
    pub fn mounts(&self) -> Result<Vec<MountRow>> {
        self.reap_mounts()?;
        meta::mounts::mounts(&*self.conn()?)
    }

    /// Remove what dead owners left: mounts whose owner is gone are lazily unmounted, and every
    /// mount no longer attached loses its row and its directory.
    pub fn reap_mounts(&self) -> Result<Reaped> {
        let rows = meta::mounts::mounts(&*self.conn()?)?;
        let mut reaped = Reaped::default();
        if rows.is_empty() {
            return Ok(reaped);
        }
        let shown = overlay::mounts()?;
        for row in rows {
            let owned_alive = row.owned && owner_alive(self.root(), &row.id);
            if owned_alive {
                continue;
            }
            let target = PathBuf::from(&row.target);
            let attached = |src: &str| shown.iter().any(|m| m.target == target && m.source == src);
            let lower = self.root().join(MOUNTS_DIR).join(&row.id).join("lower");
            let lower_attached = shown
                .iter()
                .any(|m| m.target == lower && m.source == fuse_source(&row.id));
            if !row.owned && attached(&source(&row.id)) {
                continue; // a CLI mount, still there
            }
            if attached(&source(&row.id)) {
                let _ = overlay::detach(&target);
                reaped.unmounted += 1;
            }
            if lower_attached {
                let _ = overlay::detach(&lower);
            }
            self.forget_mount(&row.id);
            reaped.mounts += 1;
        }
        Ok(reaped)
    }

    /// Unmount what is mounted at `target` (a mount of this store, by any process), optionally
    /// committing its changes first. Returns the mount and the committed layer.
    pub fn unmount_path(
        &self,
        target: &Path,
        commit_changes: bool,
        progress: Progress<'_>,
    ) -> Result<(MountRow, Option<Imported>)> {
        let target = fs::canonicalize(target).ctx(|| format!("{}", target.display()))?;
        let rows = meta::mounts::mounts(&*self.conn()?)?;
        let row = rows
            .into_iter()
            .rev()
            .find(|r| Path::new(&r.target) == target)
            .ok_or_else(|| {
                Error::NotFound(format!("no mount of this store at {}", target.display()))
            })?;
        let committed = if commit_changes {
            let infos = row
                .layers
                .iter()
                .map(|id| self.layer(&id.to_string()))
                .collect::<Result<Vec<_>>>()?;
            let base = self.stack(&infos)?;
            let dir = self.root().join(MOUNTS_DIR).join(&row.id);
            Some(commit(self, &row, &base, &dir, progress)?)
        } else {
            None
        };
        overlay::detach(&target)?;
        let lower = self.root().join(MOUNTS_DIR).join(&row.id).join("lower");
        if row.backend == "fuse" && row.writable {
            let _ = overlay::detach(&lower);
        }
        // A FUSE mount's serving process forgets it as it ends; an overlay is forgotten here.
        if row.backend == "overlay" {
            self.forget_mount(&row.id);
        }
        Ok((row, committed))
    }

    /// Snapshots: keep those live mounts use and those of layers still stored; remove the rest.
    /// Returns (snapshots removed, bytes freed).
    pub(crate) fn gc_snapshots(&self) -> Result<(u64, u64)> {
        if !self.root().join(snapshot::SNAPSHOTS_DIR).is_dir() {
            return Ok((0, 0));
        }
        let _guard = snapshot::lock(self.root(), true)?;
        let conn = self.conn()?;
        let mut keep: HashSet<String> =
            meta::mounts::snapshots_in_use(&conn)?.into_iter().collect();
        keep.insert("empty".into());
        let stored: HashSet<String> = meta::list_layers(&conn)?
            .into_iter()
            .map(|l| l.id.hex())
            .collect();
        let dir = self.root().join(snapshot::SNAPSHOTS_DIR);
        if let Ok(list) = fs::read_dir(&dir) {
            for e in list.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if stored.contains(snapshot::layer_of(&name)) {
                    keep.insert(name);
                }
            }
        }
        Ok(snapshot::prune(self.root(), &keep))
    }
}

/// The target must be an empty directory that nothing is mounted on yet by us.
fn check_target(target: &Path) -> Result<()> {
    let mut list = fs::read_dir(target).ctx(|| format!("{}", target.display()))?;
    if list.next().is_some() {
        return Err(Error::InvalidArgument(format!(
            "{}: not an empty directory",
            target.display()
        )));
    }
    Ok(())
}

/// Give a fresh upper directory's root the metadata the image's root shows (the overlay shows
/// the upper root's own).
fn set_root_meta(upper: &Path, base: &Stack) -> Result<()> {
    use rustix::fs::{chmod, chownat, utimensat, AtFlags, Mode, Timespec, Timestamps, CWD};
    let meta = base.index.root().meta.meta();
    let err = |what: &str| {
        let upper = upper.display().to_string();
        let what = what.to_string();
        move |e: rustix::io::Errno| Error::io(format!("{what} {upper}"), io::Error::from(e))
    };
    chownat(
        CWD,
        upper,
        Some(rustix::fs::Uid::from_raw(meta.uid as u32)),
        Some(rustix::fs::Gid::from_raw(meta.gid as u32)),
        AtFlags::empty(),
    )
    .map_err(err("chown"))?;
    chmod(upper, Mode::from_raw_mode(meta.mode & 0o7777)).map_err(err("chmod"))?;
    let t = Timespec {
        tv_sec: meta.mtime_ns.div_euclid(1_000_000_000),
        tv_nsec: meta.mtime_ns.rem_euclid(1_000_000_000),
    };
    utimensat(
        CWD,
        upper,
        &Timestamps {
            last_access: t,
            last_modification: t,
        },
        AtFlags::empty(),
    )
    .map_err(err("setting times of"))
}

/// Remove a directory tree, unmounting nothing (a mount inside makes this fail, harmlessly).
fn remove_tree(dir: &Path) -> io::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}
