//! Applying a changeset (one layer) onto an existing directory, as containerd's applier does.
//!
//! Invariants:
//! - The result equals the union view of "the directory, then this layer" (DESIGN section 3):
//!   every whiteout and opaque marker is processed before any of the layer's own entries, so
//!   the layer's entries survive its own markers whatever the tar order, and an opaque marker
//!   removes only what was there before. Duplicate paths: the last one wins. Entries are written
//!   parents first (sorted by path); an implicit parent is created as the view shows it (0755,
//!   0:0, mtime 0) and replaces a non-directory, a symlink included (never followed).
//! - A hardlink resolves as in the union index: to the last earlier entry of its target path in
//!   the same layer, else to the path already in the directory. A link to a lower path is taken
//!   (linked into a private staging directory inside the target) before any marker runs, so a
//!   whiteout of its target in the same layer cannot take its inode away. A link to a same-layer
//!   entry that a later duplicate replaces gets a copy of that entry (a separate inode).
//! - Safety is [`crate::materialize`]'s: every path resolved beneath the target's handle with no
//!   symlink followed, every change made with a `*at` call on the parent's handle, nothing
//!   outside the target ever written or removed. A directory whose children change keeps its
//!   times (restored at the end) unless the layer sets them.
//! - Not atomic: a failure leaves the directory partly updated (as any in-place extraction),
//!   though never anything outside it, and removes the staging directory.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};
use rustix::io::Errno;

use crate::error::{Error, IoContext, Result};
use crate::layer::{Entry, Kind, LayerInfo};
use crate::materialize::{
    check_name, clear_dir, create_leaf, errno_io, join, open_child_dir, open_dir, remove_entry,
    set_meta_fd, show, Content, Ctx, WriteReport,
};
use crate::owner::unique_name;
use crate::store::{Progress, Store};
use crate::union::{components, is_aufs_meta, MAX_SYMLINKS};

/// Where a hardlink's inode comes from.
enum LinkSource {
    /// The final entry of this path in the layer (linked once every entry is written).
    Layer(Vec<u8>),
    /// A path already in the directory (taken into staging slot `n` before any change).
    Lower(Vec<u8>, usize),
    /// An earlier entry of the layer that a later duplicate replaces: written as a copy.
    Copy(Arc<Entry>),
}

fn split_parent(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

/// A directory no layer declares, as the view shows it.
fn implicit_dir() -> Entry {
    Entry::new(Vec::new(), Kind::Dir, b'5', 0o755)
}

fn is_dir(st: &rfs::Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::Directory
}

fn io_err(what: &str, path: &[u8], e: Errno) -> Error {
    Error::io(format!("{what} {}", show(path)), errno_io(e))
}

struct Applier<'a> {
    root: OwnedFd,
    ctx: &'a Ctx<'a>,
    content: Content<'a>,
    /// Times of every directory whose children changed, as they were before the first change.
    times: HashMap<Vec<u8>, Timestamps>,
    /// Directories created as implicit parents.
    implicit: Vec<Vec<u8>>,
    /// Directories the layer declares, with their entries (metadata set at the end).
    declared: Vec<(Vec<u8>, Arc<Entry>)>,
    staging: Option<Vec<u8>>,
    /// The last parent directory opened, reused by its next children.
    last: Option<(Vec<u8>, OwnedFd)>,
}

impl Store {
    /// Apply `layer` onto the existing directory `dest`: process its whiteouts and opaque
    /// markers, then write its entries. Single-threaded; see the module invariants.
    pub fn apply(
        &self,
        layer: &LayerInfo,
        dest: &Path,
        progress: Progress<'_>,
    ) -> Result<WriteReport> {
        let entries = self.layer_entries(&layer.id)?;
        let root = rfs::open(
            dest,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno_io)
        .ctx(|| format!("opening {}", dest.display()))?;
        let ctx = Ctx::new(self, progress);
        let mut a = Applier {
            root,
            ctx: &ctx,
            content: Content::new(self)?,
            times: HashMap::new(),
            implicit: Vec::new(),
            declared: Vec::new(),
            staging: None,
            last: None,
        };
        let result = a.run(&entries);
        if let Some(s) = a.staging.take() {
            let cleaned = remove_entry(a.root.as_fd(), &s, &s);
            if result.is_ok() {
                cleaned?;
            }
        }
        result?;
        a.finish_dirs()?;
        drop(a);
        ctx.report()
    }
}

impl Applier<'_> {
    fn run(&mut self, entries: &[Arc<Entry>]) -> Result<()> {
        // As the union index does: the last entry of each path, markers apart, AUFS metadata out.
        let mut by_path: HashMap<&[u8], Vec<(usize, &Arc<Entry>)>> = HashMap::new();
        let mut markers = Vec::new();
        for (pos, e) in entries.iter().enumerate() {
            for c in components(&e.path) {
                check_name(c, &e.path)?;
            }
            match e.kind {
                Kind::Whiteout | Kind::Opaque => markers.push(e),
                _ if is_aufs_meta(&e.path) => {}
                _ => by_path.entry(&e.path[..]).or_default().push((pos, e)),
            }
        }
        let mut order: Vec<(usize, &Arc<Entry>)> =
            by_path.values().filter_map(|v| v.last().copied()).collect();
        order.sort_by(|a, b| a.1.path.cmp(&b.1.path));

        // Hardlinks resolve before any change; lower targets are taken into staging now.
        let mut links: HashMap<usize, LinkSource> = HashMap::new();
        for &(pos, e) in &order {
            if e.kind == Kind::Hardlink {
                let src = self.link_source(pos, e, &by_path)?;
                links.insert(pos, src);
            }
        }
        for src in links.values() {
            if let LinkSource::Lower(path, slot) = src {
                self.stage(path, *slot)?;
            }
        }

        for e in markers {
            let (dir, name) = split_parent(&e.path);
            let Some(fd) = self.existing_dir(dir)? else {
                continue;
            };
            self.touch(dir, fd.as_fd())?;
            let removed = if e.kind == Kind::Opaque {
                let keep = if dir.is_empty() {
                    self.staging.as_deref()
                } else {
                    None
                };
                clear_dir(fd.as_fd(), keep, dir)?
            } else {
                let target = crate::changeset::hidden_name(name);
                check_name(target, &e.path)?;
                remove_entry(fd.as_fd(), target, &join(dir, target))?
            };
            self.ctx.removed(removed);
            self.ctx.done(0, 0)?;
        }

        let mut pending_links = Vec::new();
        for &(pos, e) in &order {
            if e.path.is_empty() {
                // The root itself: only a directory can name it (the importer checks).
                if e.kind == Kind::Dir {
                    self.declared.push((Vec::new(), e.clone()));
                }
                continue;
            }
            let (dir, name) = split_parent(&e.path);
            let parent = self.parent(dir)?;
            let existing = match rfs::statat(parent.as_fd(), name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => Some(st),
                Err(Errno::NOENT) => None,
                Err(x) => return Err(io_err("stat", &e.path, x)),
            };
            let keep_dir = e.kind == Kind::Dir && existing.as_ref().is_some_and(is_dir);
            if existing.is_some() && !keep_dir {
                let n = remove_entry(parent.as_fd(), name, &e.path)?;
                self.ctx.replaced(n);
            }
            match e.kind {
                Kind::Dir => {
                    if !keep_dir {
                        rfs::mkdirat(parent.as_fd(), name, Mode::from_raw_mode(0o700))
                            .map_err(|x| io_err("mkdir", &e.path, x))?;
                    }
                    self.declared.push((e.path.clone(), e.clone()));
                    self.ctx.done(1, 0)?;
                }
                Kind::Hardlink => match links.remove(&pos) {
                    Some(LinkSource::Copy(t)) => {
                        let written = create_leaf(
                            parent.as_fd(),
                            name,
                            &t,
                            &e.path,
                            self.ctx,
                            &mut self.content,
                        )?;
                        self.ctx.done(1, written.unwrap_or(0))?;
                    }
                    Some(src) => pending_links.push((e.path.clone(), src)),
                    None => unreachable!("every hardlink was resolved"),
                },
                _ => {
                    let written = create_leaf(
                        parent.as_fd(),
                        name,
                        e,
                        &e.path,
                        self.ctx,
                        &mut self.content,
                    )?;
                    self.ctx
                        .done(u64::from(written.is_some()), written.unwrap_or(0))?;
                }
            }
        }

        for (path, src) in pending_links {
            let (dir, name) = split_parent(&path);
            let to = self.parent(dir)?;
            let (from, from_name): (OwnedFd, Vec<u8>) = match &src {
                LinkSource::Layer(target) => {
                    let (tdir, tname) = split_parent(target);
                    match self.existing_dir(tdir)? {
                        Some(fd) => (fd, tname.to_vec()),
                        None => {
                            return Err(Error::InvalidLayer(format!(
                                "hardlink {}: its target {} is gone",
                                show(&path),
                                show(target)
                            )))
                        }
                    }
                }
                LinkSource::Lower(_, slot) => {
                    let staging = self.staging.clone().expect("staged links have a directory");
                    let fd = open_dir(self.root.as_fd(), &staging)
                        .map_err(|x| io_err("open", &staging, x))?;
                    (fd, slot.to_string().into_bytes())
                }
                LinkSource::Copy(_) => unreachable!("copies were written"),
            };
            match rfs::linkat(&from, from_name.as_slice(), &to, name, AtFlags::empty()) {
                Ok(()) => self.ctx.done(1, 0)?,
                // Its target was skipped (a device without root, an unknown type): so is it.
                Err(Errno::NOENT) => self.ctx.warn(format!(
                    "{}: hardlink to a skipped entry skipped",
                    show(&path)
                )),
                Err(x) => return Err(io_err("link", &path, x)),
            }
        }
        Ok(())
    }

    /// Follow a hardlink as the union index does (see the module invariants).
    fn link_source(
        &mut self,
        link_pos: usize,
        link: &Entry,
        by_path: &HashMap<&[u8], Vec<(usize, &Arc<Entry>)>>,
    ) -> Result<LinkSource> {
        let (mut pos, mut path): (usize, &[u8]) = (link_pos, &link.link);
        for _ in 0..MAX_SYMLINKS {
            let all = by_path.get(path);
            let earlier = all.and_then(|v| v.iter().rev().find(|(p, _)| *p < pos));
            match earlier {
                Some((p, e)) if e.kind == Kind::Hardlink => (pos, path) = (*p, &e.link),
                Some((p, e)) if e.kind != Kind::Dir => {
                    let is_final = all.and_then(|v| v.last()).is_some_and(|(q, _)| q == p);
                    return Ok(if is_final {
                        LinkSource::Layer(path.to_vec())
                    } else {
                        LinkSource::Copy((*e).clone())
                    });
                }
                Some(_) => break,
                None => {
                    for c in components(path) {
                        check_name(c, &link.path)?;
                    }
                    let slot = self.next_slot();
                    return Ok(LinkSource::Lower(path.to_vec(), slot));
                }
            }
        }
        Err(Error::InvalidLayer(format!(
            "hardlink {} points at {}, which is neither earlier in its layer nor below (or is a directory)",
            show(&link.path),
            show(&link.link)
        )))
    }

    fn next_slot(&mut self) -> usize {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Link the lower inode at `path` into the staging directory as `slot`.
    fn stage(&mut self, path: &[u8], slot: usize) -> Result<()> {
        let staging = match &self.staging {
            Some(s) => s.clone(),
            None => {
                let name = format!(".layerstore-apply-{}", unique_name()).into_bytes();
                self.touch(b"", self.root.try_clone().ctx(|| "dup".into())?.as_fd())?;
                rfs::mkdirat(&self.root, name.as_slice(), Mode::from_raw_mode(0o700))
                    .map_err(|x| io_err("mkdir", &name, x))?;
                self.staging = Some(name.clone());
                name
            }
        };
        let missing = || {
            Error::InvalidLayer(format!(
                "hardlink to {}, which is neither earlier in its layer nor in the directory (or is a directory)",
                show(path)
            ))
        };
        let (dir, name) = split_parent(path);
        let Some(from) = self.existing_dir(dir)? else {
            return Err(missing());
        };
        let to = open_dir(self.root.as_fd(), &staging).map_err(|x| io_err("open", &staging, x))?;
        match rfs::linkat(
            &from,
            name,
            &to,
            slot.to_string().as_str(),
            AtFlags::empty(),
        ) {
            Ok(()) => Ok(()),
            Err(Errno::NOENT | Errno::PERM | Errno::ISDIR) => Err(missing()),
            Err(x) => Err(io_err("link", path, x)),
        }
    }

    /// Record a directory's times before its first change.
    fn touch(&mut self, rel: &[u8], fd: BorrowedFd<'_>) -> Result<()> {
        if !self.times.contains_key(rel) {
            let st = rfs::fstat(fd).map_err(|x| io_err("stat", rel, x))?;
            let ts = Timestamps {
                last_access: Timespec {
                    tv_sec: st.st_atime,
                    tv_nsec: st.st_atime_nsec as _,
                },
                last_modification: Timespec {
                    tv_sec: st.st_mtime,
                    tv_nsec: st.st_mtime_nsec as _,
                },
            };
            self.times.insert(rel.to_vec(), ts);
        }
        Ok(())
    }

    /// The existing directory `rel`, or `None` if a path component is missing or not a
    /// directory (a symlink included: the view has nothing beneath it).
    fn existing_dir(&self, rel: &[u8]) -> Result<Option<OwnedFd>> {
        match open_dir(self.root.as_fd(), rel) {
            Ok(fd) => Ok(Some(fd)),
            Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => Ok(None),
            Err(x) => Err(io_err("open", rel, x)),
        }
    }

    /// The directory `rel` for writing a child into: created (implicit) where missing, replacing
    /// whatever non-directory is in the way; its times recorded before any change.
    fn parent(&mut self, rel: &[u8]) -> Result<OwnedFd> {
        if let Some((p, fd)) = &self.last {
            if p == rel {
                return fd.try_clone().ctx(|| "dup".into());
            }
        }
        let fd = match self.existing_dir(rel)? {
            Some(fd) => fd,
            None => self.make_dirs(rel)?,
        };
        self.touch(rel, fd.as_fd())?;
        self.last = Some((rel.to_vec(), fd.try_clone().ctx(|| "dup".into())?));
        Ok(fd)
    }

    fn make_dirs(&mut self, rel: &[u8]) -> Result<OwnedFd> {
        let mut fd = open_dir(self.root.as_fd(), b"").map_err(|x| io_err("open", b"", x))?;
        let mut at: Vec<u8> = Vec::new();
        for comp in components(rel) {
            let child = join(&at, comp);
            check_name(comp, &child)?;
            let next = match open_child_dir(fd.as_fd(), comp) {
                Ok(c) => c,
                Err(e @ (Errno::NOENT | Errno::NOTDIR | Errno::LOOP)) => {
                    self.touch(&at, fd.as_fd())?;
                    if e != Errno::NOENT {
                        let n = remove_entry(fd.as_fd(), comp, &child)?;
                        self.ctx.replaced(n);
                    }
                    rfs::mkdirat(fd.as_fd(), comp, Mode::from_raw_mode(0o700))
                        .map_err(|x| io_err("mkdir", &child, x))?;
                    self.implicit.push(child.clone());
                    self.ctx.done(1, 0)?;
                    open_child_dir(fd.as_fd(), comp).map_err(|x| io_err("open", &child, x))?
                }
                Err(x) => return Err(io_err("open", &child, x)),
            };
            fd = next;
            at = child;
        }
        Ok(fd)
    }

    /// Metadata of the directories the layer declares or implies, deepest first; the times of
    /// every other directory whose children changed, as they were.
    fn finish_dirs(&mut self) -> Result<()> {
        self.last = None;
        let implicit = Arc::new(implicit_dir());
        let mut dirs: Vec<(Vec<u8>, Arc<Entry>, bool)> = self
            .implicit
            .drain(..)
            .map(|p| (p, implicit.clone(), false))
            .collect();
        dirs.extend(self.declared.drain(..).map(|(p, e)| (p, e, true)));
        let set: std::collections::HashSet<Vec<u8>> = dirs.iter().map(|d| d.0.clone()).collect();
        dirs.sort_by_key(|d| std::cmp::Reverse(components(&d.0).count()));
        for (rel, e, declared) in &dirs {
            let fd = open_dir(self.root.as_fd(), rel).map_err(|x| io_err("open", rel, x))?;
            set_meta_fd(fd.as_fd(), e, rel, self.ctx, *declared, false)?;
        }
        for (rel, ts) in &self.times {
            if set.contains(rel) {
                continue;
            }
            match open_dir(self.root.as_fd(), rel) {
                Ok(fd) => rfs::futimens(&fd, ts).map_err(|x| io_err("set times of", rel, x))?,
                // Replaced or removed since (e.g. by a later entry): nothing to restore.
                Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => {}
                Err(x) => return Err(io_err("open", rel, x)),
            }
        }
        Ok(())
    }
}
