//! Mounting through `fusermount3` with `auto_unmount`: the helper mounts, hands the
//! `/dev/fuse` descriptor back over a socket, then stays as a watchdog that unmounts once the
//! socket closes and the mount's server is gone.
//!
//! Invariants: this process holds its end of the socket and the device descriptor only, the
//! device at a higher number than the socket. An exiting process closes its descriptors in
//! ascending order and the kernel releases them last-closed first (task_work is LIFO since
//! Linux 5.10), so a killed server's device goes first — the connection is aborted — and only
//! then does the helper see the socket close, find the mount dead (`ENOTCONN`) and unmount it.
//! The other order races: the helper's check would meet a live connection whose server is dead,
//! and keep the mount. (fuser's own helper mount holds the device below the socket, and never
//! reaps the helper; hence this module.) The helper is reaped once it has gone.

use std::io::{IoSliceMut, Read};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};

use crate::error::{Error, Result};

/// The helper, from Debian's `fuse3` package.
pub(super) const FUSERMOUNT: &str = "fusermount3";
/// How the helper learns which descriptor is its socket.
const COMMFD_ENV: &str = "_FUSE_COMMFD";

/// A `fusermount3` waiting to unmount the mount should its server die.
#[derive(Debug)]
pub(super) struct Watchdog {
    socket: UnixStream,
    helper: Child,
}

impl Watchdog {
    /// Let the helper go (after the mount is gone, it exits without unmounting anything) and
    /// reap it.
    pub(super) fn dismiss(self) {
        let Watchdog { socket, mut helper } = self;
        drop(socket);
        let _ = helper.wait();
    }

    /// Keep the helper watching until this process ends (its mount could not be unmounted).
    pub(super) fn keep(self) {
        std::mem::forget(self);
    }
}

/// Mount with `fusermount3 -o OPTIONS,auto_unmount`: the `/dev/fuse` descriptor of the new
/// mount, and the helper now watching it.
pub(super) fn mount(mountpoint: &Path, options: &str) -> Result<(OwnedFd, Watchdog)> {
    let what = || {
        format!(
            "mounting FUSE at {} with {FUSERMOUNT}",
            mountpoint.display()
        )
    };
    let (ours, theirs) = UnixStream::pair().map_err(|e| Error::io(what(), e))?;
    // The helper's end must survive exec: a plain dup has no close-on-exec flag. (Another
    // program started meanwhile may inherit it too; only our end's closing matters.)
    let inherited = rustix::io::dup(&theirs).map_err(|e| Error::io(what(), e.into()))?;
    let helper = Command::new(FUSERMOUNT)
        .arg("-o")
        .arg(format!("{options},auto_unmount"))
        .arg("--")
        .arg(mountpoint)
        .env(COMMFD_ENV, inherited.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // Its own process group: a Ctrl-C meant for this program does not reach the watchdog.
        .process_group(0)
        .spawn();
    drop((inherited, theirs));
    let mut helper = helper.map_err(|e| Error::io(what(), e))?;
    let device = match receive_device(&ours) {
        Ok(device) => device,
        Err(e) => return Err(Error::io(what(), helper_failure(&mut helper, e))),
    };
    let device = above(device, &ours).map_err(|e| Error::io(what(), e))?;
    // Its stderr is no longer needed: after a successful mount it only ever reports failures
    // we learn of otherwise.
    drop(helper.stderr.take());
    Ok((
        device,
        Watchdog {
            socket: ours,
            helper,
        },
    ))
}

/// The descriptor the helper sends (one byte of data, the descriptor as `SCM_RIGHTS`).
fn receive_device(socket: &UnixStream) -> std::io::Result<OwnedFd> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    let received = loop {
        let iov = &mut [IoSliceMut::new(&mut byte)];
        match recvmsg(socket, iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
            Err(rustix::io::Errno::INTR) => continue,
            other => break other?,
        }
    };
    if received.bytes == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let device = control.drain().find_map(|message| match message {
        RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
        _ => None,
    });
    device.ok_or_else(|| std::io::Error::other("no descriptor came with the helper's message"))
}

/// Why the helper failed: what it wrote to stderr (it has exited), else `e`.
fn helper_failure(helper: &mut Child, e: std::io::Error) -> std::io::Error {
    let mut said = String::new();
    if let Some(mut stderr) = helper.stderr.take() {
        let _ = stderr.read_to_string(&mut said);
    }
    let _ = helper.wait();
    match said.trim() {
        "" => e,
        said => std::io::Error::other(said.to_owned()),
    }
}

/// `device`, renumbered above `socket` if it is below (see the module's invariants).
fn above(device: OwnedFd, socket: &UnixStream) -> std::io::Result<OwnedFd> {
    let floor = socket.as_fd().as_raw_fd();
    if device.as_raw_fd() > floor {
        return Ok(device);
    }
    Ok(rustix::io::fcntl_dupfd_cloexec(&device, floor + 1)?)
}
