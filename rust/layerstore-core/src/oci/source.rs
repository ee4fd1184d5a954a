//! Where the files of an image come from: a directory (an OCI image layout) or a tar archive
//! (`docker save` output), both seen as a map from relative names to byte streams.
//!
//! Invariants: names are normalised (relative, `/`-separated, no `.` or empty components) and a
//! name with `..` is never looked up. A tar is indexed once (member name → offset and size of
//! its data) and members are then read in place, never extracted; symbolic and hard links
//! between members (classic `docker save` links repeated layers) are resolved inside the
//! archive, at most [`MAX_LINKS`] deep. Only regular members can be opened.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

/// How many links one lookup follows before giving up (a loop in a hostile archive).
const MAX_LINKS: usize = 16;

/// A named file of the image: its reader and its length.
pub type Opened = (Box<dyn Read + Send>, u64);

/// The files of an image layout or archive.
pub trait Source: Sync {
    /// Open `name` (relative, `/`-separated); `Ok(None)` when there is no such regular file.
    fn open(&self, name: &str) -> Result<Option<Opened>>;
    /// Whether `name` exists as a regular file.
    fn exists(&self, name: &str) -> Result<bool> {
        Ok(self.open(name)?.is_some())
    }
    /// What to call this source in messages.
    fn describe(&self) -> String;
}

/// `a/./b//c` → `a/b/c`; `None` when a component is `..` (never looked up).
pub fn normalise(name: &[u8]) -> Option<String> {
    let mut parts: Vec<&[u8]> = Vec::new();
    for c in name.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return None,
            c => parts.push(c),
        }
    }
    String::from_utf8(parts.join(&b'/')).ok()
}

/// An OCI image layout on disk.
pub struct DirSource {
    root: PathBuf,
}

impl DirSource {
    pub fn new(root: &Path) -> Self {
        DirSource {
            root: root.to_path_buf(),
        }
    }
}

impl Source for DirSource {
    fn open(&self, name: &str) -> Result<Option<Opened>> {
        let Some(name) = normalise(name.as_bytes()) else {
            return Ok(None);
        };
        let path = self.root.join(&name);
        match File::open(&path) {
            Ok(f) => {
                let meta = f.metadata().ctx(|| format!("stat {}", path.display()))?;
                if !meta.is_file() {
                    return Ok(None);
                }
                Ok(Some((Box::new(f), meta.len())))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("opening {}", path.display()), e)),
        }
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }
}

#[derive(Clone, Debug)]
enum Member {
    Data {
        offset: u64,
        size: u64,
    },
    /// A symbolic link: target relative to the member's directory.
    Symlink(Vec<u8>),
    /// A hard link: target relative to the archive root.
    Hardlink(Vec<u8>),
    Other,
}

/// An uncompressed tar archive read in place.
pub struct TarSource {
    path: PathBuf,
    members: HashMap<String, Member>,
}

impl TarSource {
    /// Index the members of the tar at `path` (one pass over its headers).
    pub fn index(path: &Path) -> Result<Self> {
        let file = File::open(path).ctx(|| format!("opening {}", path.display()))?;
        let mut archive = tar::Archive::new(io::BufReader::with_capacity(1 << 16, file));
        let mut members = HashMap::new();
        let bad = |e: io::Error| Error::InvalidImage {
            blob: path.display().to_string(),
            reason: format!("not a readable tar archive: {e}"),
        };
        for entry in archive.entries().map_err(bad)? {
            let entry = entry.map_err(bad)?;
            let Some(name) = normalise(&entry.path_bytes()) else {
                continue;
            };
            let header = entry.header();
            let member = match header.entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => Member::Data {
                    offset: entry.raw_file_position(),
                    size: entry.size(),
                },
                tar::EntryType::Symlink => {
                    Member::Symlink(entry.link_name_bytes().unwrap_or_default().into_owned())
                }
                tar::EntryType::Link => {
                    Member::Hardlink(entry.link_name_bytes().unwrap_or_default().into_owned())
                }
                _ => Member::Other,
            };
            members.insert(name, member);
        }
        Ok(TarSource {
            path: path.to_path_buf(),
            members,
        })
    }

    /// Follow links from `name` to a data member.
    fn resolve(&self, name: &str) -> Option<(u64, u64)> {
        let mut name = normalise(name.as_bytes())?;
        for _ in 0..MAX_LINKS {
            match self.members.get(&name)? {
                Member::Data { offset, size } => return Some((*offset, *size)),
                Member::Hardlink(target) => name = normalise(target)?,
                Member::Symlink(target) => {
                    if target.starts_with(b"/") {
                        return None;
                    }
                    let dir = name.rsplit_once('/').map_or("", |(d, _)| d);
                    let mut joined = dir.as_bytes().to_vec();
                    joined.push(b'/');
                    joined.extend_from_slice(target);
                    name = resolve_dots(&joined)?;
                }
                Member::Other => return None,
            }
        }
        None
    }
}

/// Normalise a path that may contain `..` (a symlink target joined to its directory); `None`
/// when it climbs above the archive root.
pub fn resolve_dots(path: &[u8]) -> Option<String> {
    let mut parts: Vec<&[u8]> = Vec::new();
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    String::from_utf8(parts.join(&b'/')).ok()
}

impl Source for TarSource {
    fn open(&self, name: &str) -> Result<Option<Opened>> {
        let Some((offset, size)) = self.resolve(name) else {
            return Ok(None);
        };
        let mut f = File::open(&self.path).ctx(|| format!("opening {}", self.path.display()))?;
        f.seek(SeekFrom::Start(offset))
            .ctx(|| format!("reading {}", self.path.display()))?;
        Ok(Some((Box::new(f.take(size)), size)))
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// A directory's path as bytes, for messages that must not lose non-UTF-8 names.
pub fn display(path: &Path) -> String {
    String::from_utf8_lossy(path.as_os_str().as_bytes()).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalise_drops_dots_and_refuses_parents() {
        assert_eq!(normalise(b"./a//b/./c").as_deref(), Some("a/b/c"));
        assert_eq!(normalise(b"a/../b"), None);
        assert_eq!(resolve_dots(b"a/b/../c").as_deref(), Some("a/c"));
        assert_eq!(resolve_dots(b"a/../../c"), None);
    }

    #[test]
    fn tar_links_resolve_inside_the_archive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tar");
        let mut b = tar::Builder::new(File::create(&path).unwrap());
        let mut h = tar::Header::new_ustar();
        h.set_size(5);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "one/layer.tar", &b"hello"[..])
            .unwrap();
        let mut l = tar::Header::new_ustar();
        l.set_entry_type(tar::EntryType::Symlink);
        l.set_size(0);
        l.set_cksum();
        b.append_link(&mut l, "two/layer.tar", "../one/layer.tar")
            .unwrap();
        let mut loop_a = tar::Header::new_ustar();
        loop_a.set_entry_type(tar::EntryType::Symlink);
        loop_a.set_size(0);
        loop_a.set_cksum();
        b.append_link(&mut loop_a, "loop", "loop").unwrap();
        b.finish().unwrap();
        drop(b);
        let src = TarSource::index(&path).unwrap();
        let (mut r, n) = src.open("two/layer.tar").unwrap().unwrap();
        let mut s = String::new();
        r.read_to_string(&mut s).unwrap();
        assert_eq!((s.as_str(), n), ("hello", 5));
        assert!(src.open("loop").unwrap().is_none());
        assert!(src.open("missing").unwrap().is_none());
    }
}
