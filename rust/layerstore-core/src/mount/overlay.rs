//! Kernel overlayfs mounts through the new mount API, and what `/proc/self/mountinfo` says of
//! them.
//!
//! Invariants: lower layers are passed one `fsconfig(lowerdir+)` call each (kernel 6.8 and
//! later), never as one long option string (`mount(2)` with several KB of options silently
//! mounted only some layers on these machines); after mounting, the layer count the kernel
//! reports is checked against what was asked, and a mount that differs is undone. A mount is
//! recognised by its source (`layerstore:<mount id>`), never by its target path alone.

use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::CWD;
use rustix::mount::{
    fsconfig_create, fsconfig_set_string, fsmount, fsopen, move_mount, unmount, FsMountFlags,
    FsOpenFlags, MountAttrFlags, MoveMountFlags, UnmountFlags,
};

use crate::error::{Error, Result};

/// The most lower layers the kernel stacks (measured: the 501st is refused).
pub const KERNEL_MAX_LOWERS: usize = 500;

/// What to mount.
pub(crate) struct OverlaySpec<'a> {
    /// Lower directories, bottom first.
    pub lowers: &'a [PathBuf],
    /// Upper and work directory of a writable mount.
    pub upper: Option<(&'a Path, &'a Path)>,
    /// The mount's source as mountinfo shows it.
    pub source: &'a str,
}

/// The kernel's own messages about a failed configuration (read from the context fd).
fn kernel_log(fs: &OwnedFd) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    while let Ok(n) = rustix::io::read(fs, &mut buf) {
        if n == 0 {
            break;
        }
        out.push(String::from_utf8_lossy(&buf[..n]).trim().to_string());
    }
    out.join("; ")
}

fn mount_error(what: &str, fs: Option<&OwnedFd>, e: rustix::io::Errno) -> Error {
    let log = fs.map(kernel_log).filter(|l| !l.is_empty());
    let hint = match e {
        rustix::io::Errno::PERM => " (mounting an overlay needs root: CAP_SYS_ADMIN)",
        rustix::io::Errno::NOSYS | rustix::io::Errno::NODEV => {
            " (needs overlayfs and the new mount API, Linux 6.8 or later)"
        }
        _ => "",
    };
    let context = match log {
        Some(log) => format!("{what}{hint}: {log}"),
        None => format!("{what}{hint}"),
    };
    Error::io(context, io::Error::from_raw_os_error(e.raw_os_error()))
}

/// Mount `spec` at `target`; on return the mount is visible there with every layer.
pub(crate) fn mount(spec: &OverlaySpec<'_>, target: &Path) -> Result<()> {
    if spec.lowers.len() > KERNEL_MAX_LOWERS {
        return Err(Error::InvalidArgument(format!(
            "{} layers: the kernel's overlayfs stacks at most {KERNEL_MAX_LOWERS} (use the fuse backend)",
            spec.lowers.len()
        )));
    }
    let fs = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)
        .map_err(|e| mount_error("opening an overlayfs context", None, e))?;
    let set = |key: &str, value: &str| {
        fsconfig_set_string(fs.as_fd(), key, value)
            .map_err(|e| mount_error(&format!("overlayfs option {key}={value}"), Some(&fs), e))
    };
    set("source", spec.source)?;
    // The topmost lower first.
    for lower in spec.lowers.iter().rev() {
        set("lowerdir+", &path_str(lower)?)?;
    }
    if let Some((upper, work)) = spec.upper {
        set("upperdir", &path_str(upper)?)?;
        set("workdir", &path_str(work)?)?;
        // Plain copy-ups only: a renamed lower directory is copied (EXDEV to the caller), and
        // a chmod copies data too, so the upper directory is an ordinary changeset.
        set("redirect_dir", "off")?;
        set("metacopy", "off")?;
        set("index", "off")?;
    }
    fsconfig_create(fs.as_fd()).map_err(|e| mount_error("creating the overlay", Some(&fs), e))?;
    let attrs = if spec.upper.is_some() {
        MountAttrFlags::empty()
    } else {
        MountAttrFlags::MOUNT_ATTR_RDONLY
    };
    let mnt = fsmount(fs.as_fd(), FsMountFlags::FSMOUNT_CLOEXEC, attrs)
        .map_err(|e| mount_error("mounting the overlay", Some(&fs), e))?;
    move_mount(
        mnt.as_fd(),
        "",
        CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(|e| {
        mount_error(
            &format!("attaching the overlay at {}", target.display()),
            None,
            e,
        )
    })?;
    let shown = find(target, spec.source)?.map(|m| m.lowers);
    if shown != Some(spec.lowers.len()) {
        let _ = detach(target);
        return Err(Error::Conflict(format!(
            "the kernel mounted {} of {} at {}",
            shown.unwrap_or(0),
            crate::error::count(spec.lowers.len(), "layer"),
            target.display()
        )));
    }
    Ok(())
}

fn path_str(p: &Path) -> Result<String> {
    p.to_str()
        .map(str::to_string)
        .ok_or_else(|| Error::InvalidArgument(format!("{}: not a UTF-8 path", p.display())))
}

/// Unmount `target` lazily (it goes once nothing uses it). Without the privilege to unmount
/// (not root), a FUSE mount of this user's goes through `fusermount3 -u -z`, as it came.
pub(crate) fn detach(target: &Path) -> Result<()> {
    let err = match unmount(target, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW) {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    if err == rustix::io::Errno::PERM && crate::fusefs::helper_unmount(target, true) {
        return Ok(());
    }
    Err(Error::io(
        format!("unmounting {}", target.display()),
        io::Error::from_raw_os_error(err.raw_os_error()),
    ))
}

/// A mount as `/proc/self/mountinfo` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Shown {
    pub target: PathBuf,
    pub fstype: String,
    pub source: String,
    /// `lowerdir+=` options (overlay).
    pub lowers: usize,
}

/// `\040`-style escapes of mountinfo fields undone.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_line(line: &str) -> Option<Shown> {
    let (head, tail) = line.split_once(" - ")?;
    let target = head.split(' ').nth(4)?;
    let mut tail = tail.split(' ');
    let fstype = tail.next()?.to_string();
    let source = unescape(tail.next()?);
    let options = tail.next().unwrap_or("");
    Some(Shown {
        target: PathBuf::from(unescape(target)),
        fstype,
        source,
        lowers: options.matches("lowerdir+=").count(),
    })
}

/// Every mount of this mount namespace.
pub(crate) fn mounts() -> Result<Vec<Shown>> {
    let text = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("reading /proc/self/mountinfo", e))?;
    Ok(text.lines().filter_map(parse_line).collect())
}

/// The topmost mount at `target` whose source is `source`.
pub(crate) fn find(target: &Path, source: &str) -> Result<Option<Shown>> {
    Ok(mounts()?
        .into_iter()
        .rev()
        .find(|m| m.target == target && m.source == source))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse() {
        let line = "245 27 0:40 / /tmp/a\\040b ro,relatime - overlay layerstore:x ro,lowerdir+=/s/1,lowerdir+=/s/0";
        let m = parse_line(line).unwrap();
        assert_eq!(m.target, PathBuf::from("/tmp/a b"));
        assert_eq!(m.fstype, "overlay");
        assert_eq!(m.source, "layerstore:x");
        assert_eq!(m.lowers, 2);
        assert!(parse_line("garbage").is_none());
    }
}
