//! Canonical tar headers: what every tar this crate writes (directory imports, diffs, squashes,
//! container commits) looks like, so one tree always gives the same bytes.
//!
//! Invariants of [`header`]'s output for one member:
//! - A ustar header with octal numeric fields only (never base-256); the checksum as 7 octal
//!   digits + NUL; devmajor/devminor `0` unless a device; uname/gname as given (empty for trees
//!   read from disk).
//! - When something does not fit ustar (a path that cannot be split into prefix/name, a link
//!   target over 100 bytes, a uname/gname over 32 bytes, uid/gid > 0o7777777, size > 8 GiB − 1,
//!   an mtime that is negative, too large or has nanoseconds, any xattr), a PAX `x` header
//!   precedes the member. Its records are sorted by key; the value that did not fit is replaced
//!   in the ustar header by its first bytes (names) or 0 (numbers). `mtime` is `secs[.fraction]`
//!   with trailing zeros of the fraction stripped; xattrs are `SCHILY.xattr.<name>` with raw value
//!   bytes.
//! - Directories are named with a trailing `/`. Data follows the header, padded to 512 bytes
//!   ([`padding`]); an archive ends with [`trailer`]: two zero blocks, then zeros up to a multiple
//!   of 10240 bytes, as GNU tar does.

use tar::{EntryType, Header};

use crate::error::{Error, Result};

pub const BLOCK: u64 = 512;
pub const RECORD: u64 = 10240;
/// Largest value of an 8-byte octal field (7 digits + NUL): uid, gid, devmajor, devminor.
const MAX_OCTAL_8: u64 = 0o7777777;
/// Largest value of a 12-byte octal field (11 digits + NUL): size, mtime.
const MAX_OCTAL_12: u64 = 0o77777777777;

/// What a member is (and the fields that only some kinds have).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberKind<'a> {
    File {
        size: u64,
    },
    Dir,
    Symlink(&'a [u8]),
    /// A hard link naming an earlier member of the same archive.
    Hardlink(&'a [u8]),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

/// One archive member's metadata.
#[derive(Clone, Debug)]
pub struct Member<'a> {
    /// Relative path, no trailing slash (added for directories).
    pub path: &'a [u8],
    pub kind: MemberKind<'a>,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub uname: &'a [u8],
    pub gname: &'a [u8],
    pub mtime_ns: i64,
    pub xattrs: Vec<(&'a [u8], &'a [u8])>,
}

/// Zero bytes that pad `written` bytes of data to a whole block.
pub fn padding(written: u64) -> &'static [u8] {
    const ZEROS: [u8; BLOCK as usize] = [0; BLOCK as usize];
    &ZEROS[..((BLOCK - written % BLOCK) % BLOCK) as usize]
}

/// The end of an archive of `written` bytes: two zero blocks, then zeros to a whole record.
pub fn trailer(written: u64) -> Vec<u8> {
    let end = written + 2 * BLOCK;
    vec![0u8; (end + (RECORD - end % RECORD) % RECORD - written) as usize]
}

/// The header bytes of `m` (a PAX header first when needed); its data, if any, follows.
pub fn header(m: &Member<'_>) -> Result<Vec<u8>> {
    let (etype, link, size, devs) = match m.kind {
        MemberKind::File { size } => (EntryType::Regular, None, size, (0, 0)),
        MemberKind::Dir => (EntryType::Directory, None, 0, (0, 0)),
        MemberKind::Symlink(t) => (EntryType::Symlink, Some(t), 0, (0, 0)),
        MemberKind::Hardlink(t) => (EntryType::Link, Some(t), 0, (0, 0)),
        MemberKind::Char(ma, mi) => (EntryType::Char, None, 0, (ma, mi)),
        MemberKind::Block(ma, mi) => (EntryType::Block, None, 0, (ma, mi)),
        MemberKind::Fifo => (EntryType::Fifo, None, 0, (0, 0)),
    };
    let mut name = m.path.to_vec();
    if m.kind == MemberKind::Dir {
        name.push(b'/');
    }
    let mut pax: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut h = Header::new_ustar();
    let u = h.as_ustar_mut().expect("a ustar header");
    if !split_ustar_path(&name, &mut u.prefix, &mut u.name) {
        put_field(&mut u.name, &name);
        pax.push((b"path".to_vec(), name.clone()));
    }
    let mut long = |key: &str, field: &mut [u8], value: &[u8]| {
        put_field(field, value);
        if value.len() > field.len() {
            pax.push((key.as_bytes().to_vec(), value.to_vec()));
        }
    };
    if let Some(link) = link {
        long("linkpath", &mut u.linkname, link);
    }
    long("uname", &mut u.uname, m.uname);
    long("gname", &mut u.gname, m.gname);
    if u64::from(devs.0.max(devs.1)) > MAX_OCTAL_8 {
        let path = String::from_utf8_lossy(m.path);
        return Err(Error::InvalidLayer(format!(
            "device numbers of {path} do not fit a tar header"
        )));
    }
    u.set_device_major(devs.0);
    u.set_device_minor(devs.1);
    let mut fit = |key: &str, value: u64, max: u64| {
        if value <= max {
            return value;
        }
        pax.push((key.as_bytes().to_vec(), value.to_string().into_bytes()));
        0
    };
    h.set_uid(fit("uid", m.uid, MAX_OCTAL_8));
    h.set_gid(fit("gid", m.gid, MAX_OCTAL_8));
    h.set_size(fit("size", size, MAX_OCTAL_12));
    let (secs, nsec) = (
        m.mtime_ns.div_euclid(1_000_000_000),
        m.mtime_ns.rem_euclid(1_000_000_000) as u32,
    );
    let secs_fit = u64::try_from(secs).is_ok_and(|s| s <= MAX_OCTAL_12);
    if !secs_fit || nsec != 0 {
        pax.push((b"mtime".to_vec(), format_mtime(secs, nsec).into_bytes()));
    }
    h.set_mtime(if secs_fit { secs as u64 } else { 0 });
    h.set_mode(m.mode & 0o7777);
    h.set_entry_type(etype);
    h.set_cksum();

    for (key, value) in &m.xattrs {
        pax.push(([b"SCHILY.xattr.".as_slice(), key].concat(), value.to_vec()));
    }
    let mut out = Vec::with_capacity(BLOCK as usize * if pax.is_empty() { 1 } else { 3 });
    if !pax.is_empty() {
        pax.sort();
        pax_header(&mut out, &name, &pax);
    }
    out.extend_from_slice(h.as_bytes());
    Ok(out)
}

/// Copy `value` into a fixed field, truncated; the rest stays NUL.
fn put_field(field: &mut [u8], value: &[u8]) {
    let n = value.len().min(field.len());
    field[..n].copy_from_slice(&value[..n]);
}

/// Split a path over ustar's prefix (155) and name (100) fields at a '/', preferring the longest
/// name. Returns false when no split fits (the name part must not be empty).
fn split_ustar_path(path: &[u8], prefix: &mut [u8; 155], name: &mut [u8; 100]) -> bool {
    if path.len() <= name.len() {
        put_field(name, path);
        return true;
    }
    let first = path.len().saturating_sub(name.len() + 1);
    let body = path.strip_suffix(b"/").unwrap_or(path); // never split at a directory's own slash
    let Some(at) = (first..body.len()).find(|&i| body[i] == b'/') else {
        return false;
    };
    if at > prefix.len() || at == 0 {
        return false;
    }
    put_field(prefix, &path[..at]);
    put_field(name, &path[at + 1..]);
    true
}

/// `secs[.fraction]`, the fraction's trailing zeros stripped; negative times count down from 0,
/// so (-2 s, 5e8 ns) is "-1.5".
fn format_mtime(secs: i64, nsec: u32) -> String {
    let (sign, whole, frac) = if secs < 0 && nsec > 0 {
        ("-", (secs + 1).unsigned_abs(), 1_000_000_000 - nsec)
    } else {
        (if secs < 0 { "-" } else { "" }, secs.unsigned_abs(), nsec)
    };
    if frac == 0 {
        return format!("{sign}{whole}");
    }
    let digits = format!("{frac:09}");
    format!("{sign}{whole}.{}", digits.trim_end_matches('0'))
}

/// One PAX record: "<len> <key>=<value>\n", where len counts the whole record, itself included.
fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    while body + len.to_string().len() != len {
        len = body + len.to_string().len(); // grows at most twice, at a digit rollover
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// A PAX `x` member (header, records, padding) for the member named `name`.
fn pax_header(out: &mut Vec<u8>, name: &[u8], records: &[(Vec<u8>, Vec<u8>)]) {
    let mut data = Vec::new();
    for (key, value) in records {
        pax_record(&mut data, key, value);
    }
    let trimmed = name.strip_suffix(b"/").unwrap_or(name);
    let base = trimmed.rsplit(|&b| b == b'/').next().unwrap_or(trimmed);
    let mut h = Header::new_ustar();
    let u = h.as_ustar_mut().expect("a ustar header");
    put_field(&mut u.name, &[b"PaxHeaders/".as_slice(), base].concat());
    u.set_device_major(0);
    u.set_device_minor(0);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(data.len() as u64);
    h.set_entry_type(EntryType::XHeader);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(&data);
    out.extend_from_slice(padding(data.len() as u64));
}

#[cfg(test)]
mod tests {
    //! Internals; whole archives are checked against the tar crate and GNU tar in `tests/fsio.rs`.
    use super::*;

    #[test]
    fn pax_record_lengths_count_themselves() {
        // Covers the digit rollovers at 9→10 and 99→100 and 999→1000.
        for n in 0..1100 {
            let mut rec = Vec::new();
            pax_record(&mut rec, b"path", &vec![b'x'; n]);
            let sp = rec.iter().position(|&b| b == b' ').unwrap();
            let len: usize = std::str::from_utf8(&rec[..sp]).unwrap().parse().unwrap();
            assert_eq!(len, rec.len(), "value length {n}");
        }
        let mut rec = Vec::new();
        pax_record(&mut rec, b"k", b"");
        assert_eq!(rec, b"5 k=\n");
    }

    #[test]
    fn mtime_text() {
        let cases = [
            (5, 0, "5"),
            (5, 500_000_000, "5.5"),
            (0, 1, "0.000000001"),
            (-2, 500_000_000, "-1.5"),
            (-1, 999_999_999, "-0.000000001"),
            (-3, 0, "-3"),
        ];
        for (secs, nsec, text) in cases {
            assert_eq!(format_mtime(secs, nsec), text);
        }
    }

    #[test]
    fn trailer_and_padding_sizes() {
        assert_eq!(padding(0).len(), 0);
        assert_eq!(padding(1).len(), 511);
        assert_eq!(padding(512).len(), 0);
        assert_eq!(trailer(0).len(), 10240);
        assert_eq!(trailer(512).len(), 10240 - 512);
        assert_eq!(trailer(9216).len(), 1024); // exactly fills the record
        assert_eq!(trailer(9728).len(), 512 + 10240); // two zero blocks do not fit: one more record
    }

    #[test]
    fn ustar_path_split() {
        let split = |path: &[u8]| {
            let (mut prefix, mut name) = ([0u8; 155], [0u8; 100]);
            let ok = split_ustar_path(path, &mut prefix, &mut name);
            let strip = |f: &[u8]| {
                f.iter()
                    .take_while(|&&b| b != 0)
                    .copied()
                    .collect::<Vec<u8>>()
            };
            ok.then(|| (strip(&prefix), strip(&name)))
        };
        let (a99, a100) = ("a".repeat(99), "a".repeat(100));
        assert_eq!(
            split(a100.as_bytes()),
            Some((vec![], a100.clone().into_bytes()))
        );
        assert_eq!(split(format!("{a100}x").as_bytes()), None); // no '/' at all
                                                                // The longest name that fits wins: "p/q/<99>" splits at the second '/'.
        let (p, n) = split(format!("p/q/{a99}").as_bytes()).unwrap();
        assert_eq!((p, n), (b"p/q".to_vec(), a99.clone().into_bytes()));
        // A directory's own trailing slash is never the split point.
        assert_eq!(split(format!("p/{a99}x/").as_bytes()), None);
        let (p, n) = split(format!("p/{a99}/").as_bytes()).unwrap();
        assert_eq!((p, n), (b"p".to_vec(), format!("{a99}/").into_bytes()));
        assert_eq!(split(format!("{}/{a99}", "b".repeat(156)).as_bytes()), None);
    }
}
