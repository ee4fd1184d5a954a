//! A read-only FUSE file system serving a stack's union view straight from the store.
//!
//! Invariants:
//! - The mount shows exactly the view of [`Stack::index`]: names, kinds, modes (setuid bits
//!   included), owners, times, sizes, symlink targets, device numbers, every xattr and the
//!   content, read through the checked [`crate::stack::ContentReader`] (a damaged chunk answers
//!   `EIO`, never a wrong byte). Nothing is written: the mount is `ro` with
//!   `default_permissions` (the kernel checks modes), and every request that would change the
//!   tree answers `EROFS`. It is `nodev,nosuid`: an image's device nodes and setuid programs
//!   take no effect through it (an overlay stacked on top applies its own mount's flags).
//! - Inode numbers are stable for the life of the mount: root 1, any other path numbered when
//!   the kernel first learns it (lookup or listing), hardlinked paths (one inode entry of the
//!   view) one number with `st_nlink` = the view's paths to it (counted once, at mount);
//!   directories report 2 + subdirectories, as ext4 does. The table keeps every number it gave
//!   (`forget` is ignored): the index it points into already holds every path of the view, so
//!   the table adds a small constant per path the kernel has seen, and in return a number never
//!   changes or gets reused (no generation bookkeeping, and `find`, `du` and overlayfs see the
//!   same inode each time).
//! - Scale: nothing is per layer (the index is merged), a lookup is one hash probe in its
//!   directory, a directory listing is sorted once per `opendir`.
//! - Threads: fuser's event loops, `FuseOptions::threads` of them, all reading the mount's
//!   `/dev/fuse` descriptor (the kernel hands each request to one of them), so slow requests
//!   (reads, opens of big files) proceed in parallel with no pool of ours (and never rayon's
//!   global pool). An open file keeps its own reader, so sequential reads do not re-open it;
//!   the kernel's read-ahead is raised to 1 MiB and requests may be as large.
//! - Lifetime: [`FuseMount::mount`] returns once the kernel has sent INIT; dropping the
//!   [`FuseMount`] unmounts (lazily, if files are still open) and joins the threads. With
//!   `auto_unmount`, `fusermount3` mounts and stays as a watchdog that unmounts when the serving
//!   process dies, so a killed server leaves no hung mount point (the `fusermount` submodule
//!   says how that is made reliable). Without it, root mounts with `mount(2)` directly.

mod fusermount;
mod inodes;
mod serve;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use fuser::{BackgroundSession, Config, MountOption, Session, SessionACL};

use crate::error::{Error, Result};
use crate::stack::Stack;
use crate::store::Store;
use fusermount::{Watchdog, FUSERMOUNT};
use serve::{ReadErrors, ViewFs, READ_AHEAD};

/// The device every FUSE mount talks through.
const DEV_FUSE: &str = "/dev/fuse";

/// Options of a FUSE mount.
#[derive(Clone, Debug)]
pub struct FuseOptions {
    /// Threads serving requests (0 = one per core, at least 2).
    pub threads: usize,
    /// The `fsname` shown in /proc/self/mountinfo (the mount's source), e.g. "layerstore".
    pub fsname: String,
    /// Ask fusermount3 to unmount when the serving process dies (its `auto_unmount`, what
    /// fuser's AutoUnmount asks for).
    pub auto_unmount: bool,
    /// Let other users (and the kernel overlayfs stacked on top) access the mount (allow_other).
    pub allow_other: bool,
}

impl Default for FuseOptions {
    fn default() -> Self {
        FuseOptions {
            threads: 0,
            fsname: "layerstore".into(),
            auto_unmount: true,
            allow_other: true,
        }
    }
}

impl FuseOptions {
    fn thread_count(&self) -> usize {
        match self.threads {
            0 => crate::cores().max(2),
            n => n,
        }
    }

    /// Who may use the mount. `auto_unmount` needs `allow_other` (fusermount3 checks the dead
    /// mount as root); without `allow_other` fuser then turns away all but root and the owner.
    fn acl(&self) -> SessionACL {
        match (self.allow_other, self.auto_unmount) {
            (true, _) => SessionACL::All,
            (false, true) => SessionACL::RootAndOwner,
            (false, false) => SessionACL::Owner,
        }
    }

    /// The mount options, as fuser takes them and as `fusermount3 -o` spells them.
    fn mount_options(&self) -> Vec<(MountOption, String)> {
        vec![
            (
                MountOption::FSName(self.fsname.clone()),
                format!("fsname={}", self.fsname),
            ),
            (
                MountOption::Subtype("layerstore".into()),
                "subtype=layerstore".into(),
            ),
            (MountOption::RO, "ro".into()),
            (MountOption::NoDev, "nodev".into()),
            (MountOption::NoSuid, "nosuid".into()),
            (
                MountOption::DefaultPermissions,
                "default_permissions".into(),
            ),
        ]
    }

    /// `fusermount3 -o`'s argument (without `auto_unmount`, which the helper module adds).
    fn helper_options(&self) -> String {
        let mut options: Vec<String> = self.mount_options().into_iter().map(|o| o.1).collect();
        if self.allow_other {
            options.push("allow_other".into());
        }
        options.join(",")
    }

    /// fuser's configuration: the mount options (for a mount it makes), who may use the
    /// mount, the event loops (all on one descriptor: see `fusermount` for why).
    fn config(&self) -> Config {
        let mut config = Config::default();
        config.mount_options = self.mount_options().into_iter().map(|o| o.0).collect();
        config.acl = self.acl();
        config.n_threads = Some(self.thread_count());
        config.clone_fd = false;
        config
    }

    fn check(&self) -> Result<()> {
        let bad = |c: char| c == ',' || c.is_whitespace() || c.is_control() || c == '\\';
        if self.fsname.is_empty() || self.fsname.contains(bad) {
            return Err(Error::InvalidArgument(format!(
                "FUSE fsname {:?}: give a non-empty name without commas, spaces or backslashes",
                self.fsname
            )));
        }
        Ok(())
    }
}

/// What reads of a mount failed with (a reader sees only `EIO`; the owner learns why here).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServedErrors {
    /// Reads and opens that failed.
    pub count: u64,
    /// The last failure: the file and the error (e.g. the damaged chunk).
    pub last: Option<String>,
}

/// A serving session and the watchdog that unmounts it should this process die.
struct Serving {
    session: BackgroundSession,
    watchdog: Option<Watchdog>,
}

impl Serving {
    /// Wait for the event loops to end (the mount is gone), then let the watchdog go.
    fn join(self) -> std::io::Result<()> {
        let ended = self.session.join();
        if let Some(watchdog) = self.watchdog {
            watchdog.dismiss();
        }
        ended
    }
}

/// A live FUSE mount serving a stack; dropping it unmounts (and joins the serving threads).
pub struct FuseMount {
    serving: Option<Serving>,
    mountpoint: PathBuf,
    errors: Arc<ReadErrors>,
}

impl std::fmt::Debug for FuseMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuseMount")
            .field("mountpoint", &self.mountpoint)
            .field("mounted", &self.serving.is_some())
            .finish()
    }
}

impl FuseMount {
    /// Mount `stack` (read-only) at `mountpoint` (an existing empty directory) and serve it from
    /// background threads until unmounted. Returns once the mount is visible (the kernel has
    /// sent INIT), so a caller can stat it immediately.
    pub fn mount(
        store: Arc<Store>,
        stack: Stack,
        mountpoint: &Path,
        opts: &FuseOptions,
    ) -> Result<FuseMount> {
        opts.check()?;
        check_prerequisites(opts)?;
        check_mountpoint(mountpoint)?;
        // The path unmount will name, whatever the caller's working directory is then.
        let mountpoint = std::fs::canonicalize(mountpoint)
            .map_err(|e| Error::io(format!("FUSE mount point {}", mountpoint.display()), e))?;
        let errors = Arc::new(ReadErrors::default());
        let fs = ViewFs::new(store, stack, errors.clone());
        let serving = serve(fs, &mountpoint, opts)?;
        raise_read_ahead(&mountpoint);
        Ok(FuseMount {
            serving: Some(serving),
            mountpoint,
            errors,
        })
    }

    /// Where the stack is mounted (the canonical path).
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Reads that failed so far, and the last one's reason.
    pub fn errors(&self) -> ServedErrors {
        let last = self
            .errors
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        ServedErrors {
            count: self.errors.count.load(Ordering::Relaxed),
            last: last.clone(),
        }
    }

    /// Unmount and wait for the server to end. When files are still open in the mount it is
    /// detached instead (`umount -l`): the mount point is free at once, and the server goes on
    /// serving those files on its own threads until the last one is closed.
    pub fn unmount(mut self) -> Result<()> {
        self.stop()
    }

    /// Block until the mount is gone (unmounted from outside, e.g. `fusermount3 -u` /
    /// `umount`), for a daemon that serves a CLI mount.
    pub fn wait(mut self) -> Result<()> {
        let Some(serving) = self.serving.take() else {
            return Ok(());
        };
        // The event loops end when the kernel disconnects the unmounted file system.
        serving.join().map_err(|e| self.serving_error(e))
    }

    fn stop(&mut self) -> Result<()> {
        let Some(serving) = self.serving.take() else {
            return Ok(());
        };
        // Ended already: unmounted from outside (the path may hold another mount by now).
        if serving.session.guard.is_finished() {
            return serving.join().map_err(|e| self.serving_error(e));
        }
        match unmount(&self.mountpoint) {
            Ok(Unmounted::Gone | Unmounted::NotMounted) => {
                serving.join().map_err(|e| self.serving_error(e))
            }
            Ok(Unmounted::Detached) => {
                let thread = std::thread::Builder::new().name("layerstore-fuse-detached".into());
                // Serves the files still open; its result has no one to go to.
                let spawned = thread.spawn(move || drop(serving.join()));
                spawned.map(drop).map_err(|e| self.serving_error(e))
            }
            Err(e) => {
                self.serving = Some(serving);
                Err(e)
            }
        }
    }

    fn serving_error(&self, e: std::io::Error) -> Error {
        Error::io(
            format!("serving the FUSE mount at {}", self.mountpoint.display()),
            e,
        )
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        // Nothing to report to: a caller who wants the error calls `unmount`. A mount that
        // could not be unmounted is left to its threads, and its watchdog to this process's end.
        if self.stop().is_err() {
            if let Some(Serving { session, watchdog }) = self.serving.take() {
                std::mem::forget(session);
                if let Some(watchdog) = watchdog {
                    watchdog.keep();
                }
            }
        }
    }
}

/// Mount `fs` at `mountpoint` and start serving it: through `fusermount3` with a watchdog
/// for `auto_unmount`, else with fuser's own mount (`mount(2)` as root).
fn serve(fs: ViewFs, mountpoint: &Path, opts: &FuseOptions) -> Result<Serving> {
    let config = opts.config();
    let mounting = |e| Error::io(format!("mounting FUSE at {}", mountpoint.display()), e);
    // Both wait for the kernel's INIT before they return.
    let (session, watchdog) = if opts.auto_unmount {
        let (device, watchdog) = fusermount::mount(mountpoint, &opts.helper_options())?;
        match Session::from_fd(fs, device, config.acl, config) {
            Ok(session) => (session, Some(watchdog)),
            Err(e) => {
                // The device is closed: the helper finds the mount dead and unmounts it.
                watchdog.dismiss();
                return Err(mounting(e));
            }
        }
    } else {
        (
            Session::new(fs, mountpoint, &config).map_err(mounting)?,
            None,
        )
    };
    match session.spawn() {
        Ok(session) => Ok(Serving { session, watchdog }),
        Err(e) => {
            if let Some(watchdog) = watchdog {
                watchdog.dismiss();
            }
            Err(mounting(e))
        }
    }
}

/// How a mount went away.
enum Unmounted {
    /// Unmounted: the server ends now.
    Gone,
    /// Not a mount point any more: unmounted from outside just now.
    NotMounted,
    /// Busy, so detached: the server ends when the last open file is closed.
    Detached,
}

/// Unmount the FUSE mount at `mountpoint`: `umount2` as root, else `fusermount3 -u`, lazily
/// when it is busy. (Not fuser's unmount: a live mount has to be unmounted here, its watchdog
/// only ever unmounts a dead one.)
fn unmount(mountpoint: &Path) -> Result<Unmounted> {
    use rustix::mount::UnmountFlags;
    let what = || format!("unmounting the FUSE mount at {}", mountpoint.display());
    match rustix::mount::unmount(mountpoint, UnmountFlags::empty()) {
        Ok(()) => return Ok(Unmounted::Gone),
        Err(rustix::io::Errno::BUSY) => {
            rustix::mount::unmount(mountpoint, UnmountFlags::DETACH)
                .map_err(|e| Error::io(what(), e.into()))?;
            return Ok(Unmounted::Detached);
        }
        Err(rustix::io::Errno::INVAL) => return Ok(Unmounted::NotMounted),
        Err(rustix::io::Errno::PERM) => {}
        Err(e) => return Err(Error::io(what(), e.into())),
    }
    // Not root: the setuid helper unmounts what this user mounted.
    if helper_unmount(mountpoint, false) {
        Ok(Unmounted::Gone)
    } else if helper_unmount(mountpoint, true) {
        Ok(Unmounted::Detached)
    } else {
        Err(Error::io(what(), rustix::io::Errno::PERM.into()))
    }
}

/// `fusermount3 -u` (`lazy`: `-z`) of a FUSE mount this user made, for a process that may not
/// unmount (not root). True when it is unmounted.
pub(crate) fn helper_unmount(mountpoint: &Path, lazy: bool) -> bool {
    let out = std::process::Command::new(FUSERMOUNT)
        .args(if lazy {
            ["-u", "-z", "-q"].as_slice()
        } else {
            ["-u", "-q"].as_slice()
        })
        .arg("--")
        .arg(mountpoint)
        .stdin(std::process::Stdio::null())
        .output();
    out.is_ok_and(|o| o.status.success())
}

/// An error saying what a FUSE mount needs and is missing (`ENOENT`).
fn missing(what: String) -> Error {
    Error::io(what, std::io::Error::from(std::io::ErrorKind::NotFound))
}

/// `/dev/fuse`, and for `auto_unmount` the `fusermount3` helper, are there.
fn check_prerequisites(opts: &FuseOptions) -> Result<()> {
    if !Path::new(DEV_FUSE).exists() {
        return Err(missing(format!(
            "FUSE mount: {DEV_FUSE} is missing \
             (load the fuse kernel module, or give the container the device)"
        )));
    }
    if opts.auto_unmount && !on_path(FUSERMOUNT) {
        return Err(missing(format!(
            "FUSE mount with auto_unmount: the {FUSERMOUNT} helper is not on PATH \
             (install Debian's fuse3 package)"
        )));
    }
    Ok(())
}

/// Whether `name` is a file in a directory of `PATH`.
fn on_path(name: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|dir| dir.join(name).is_file())
}

/// The mount point is an existing, empty directory.
fn check_mountpoint(mountpoint: &Path) -> Result<()> {
    let what = || format!("FUSE mount point {}", mountpoint.display());
    let mut listing = std::fs::read_dir(mountpoint).map_err(|e| Error::io(what(), e))?;
    if listing.next().is_some() {
        return Err(Error::InvalidArgument(format!("{} is not empty", what())));
    }
    Ok(())
}

/// Raise the mount's read-ahead to [`READ_AHEAD`] (best effort: it needs root). The kernel
/// offers FUSE its default read-ahead (128 KiB) at INIT, which can only lower it; the mount's
/// own backing device (`/sys/class/bdi/0:N`, made for this mount and gone with it) takes more.
fn raise_read_ahead(mountpoint: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(mountpoint) else {
        return;
    };
    let dev = meta.dev();
    let (major, minor) = (rustix::fs::major(dev), rustix::fs::minor(dev));
    let knob = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    let _ = std::fs::write(knob, (READ_AHEAD >> 10).to_string());
}
