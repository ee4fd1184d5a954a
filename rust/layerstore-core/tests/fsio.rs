//! `fsio::write_dir_tar` on a real tree: determinism, every entry kind, and two independent
//! readers as oracles (the `tar` crate for structure, GNU tar for extraction semantics).

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use layerstore_core::fsio::{write_dir_tar, DirOptions};
use rustix::fs::{makedev, mknodat, FileType, Mode, XattrFlags, CWD};
use tar::EntryType;

fn set_mtime(path: &Path, t: SystemTime) {
    let f = File::options().append(true).open(path).unwrap();
    f.set_times(fs::FileTimes::new().set_modified(t)).unwrap();
}

fn big_byte(i: usize) -> u8 {
    (i * 7 % 251) as u8
}

/// What the environment allowed: (user xattrs, device nodes, chown).
struct Caps {
    xattr: bool,
    device: bool,
    chown: bool,
}

fn build(r: &Path) -> Caps {
    fs::write(r.join("empty"), b"").unwrap();
    fs::write(
        r.join("big.bin"),
        (0..300 * 1024).map(big_byte).collect::<Vec<u8>>(),
    )
    .unwrap();
    set_mtime(
        &r.join("big.bin"),
        UNIX_EPOCH + Duration::new(1_600_000_000, 123_456_000),
    );
    fs::write(r.join("old"), b"x").unwrap();
    set_mtime(&r.join("old"), UNIX_EPOCH - Duration::from_millis(1500));
    fs::create_dir_all(r.join("dir/sub")).unwrap();
    fs::write(r.join("dir/sub/nested.txt"), b"hello").unwrap();
    symlink("../big.bin", r.join("dir/link")).unwrap();
    // In output order "dir/hard2" comes first, so it carries the content.
    fs::write(r.join("hard1"), b"shared").unwrap();
    fs::hard_link(r.join("hard1"), r.join("dir/hard2")).unwrap();
    mknodat(
        CWD,
        r.join("fifo"),
        FileType::Fifo,
        Mode::from_raw_mode(0o640),
        0,
    )
    .unwrap();
    fs::write(r.join("l".repeat(120)), b"long").unwrap();
    let mut long_raw = b"\xff".repeat(110);
    long_raw.extend_from_slice(b"raw");
    fs::write(r.join(OsStr::from_bytes(&long_raw)), b"raw").unwrap();
    let a = "a".repeat(90);
    fs::create_dir_all(r.join("deep").join(&a)).unwrap();
    fs::write(r.join("deep").join(&a).join(&a), b"split").unwrap();
    symlink("t".repeat(150), r.join("longlink")).unwrap();
    fs::write(r.join(OsStr::from_bytes(b"caf\xe9")), b"latin1").unwrap();
    fs::write(r.join("suid"), b"#!").unwrap();
    fs::set_permissions(r.join("suid"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::create_dir(r.join("tmp")).unwrap();
    fs::set_permissions(r.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    drop(std::os::unix::net::UnixListener::bind(r.join("sock")).unwrap());
    let flags = XattrFlags::empty();
    let xattr = match rustix::fs::lsetxattr(r.join("empty"), "user.test", b"v\0al=ue\n", flags) {
        Ok(()) => true,
        Err(rustix::io::Errno::NOTSUP) => {
            eprintln!("fsio test: user xattrs unsupported here (ENOTSUP), xattr checks skipped");
            false
        }
        Err(e) => panic!("setxattr: {e}"),
    };
    let mode = Mode::from_raw_mode(0o666);
    let device = mknodat(
        CWD,
        r.join("null"),
        FileType::CharacterDevice,
        mode,
        makedev(1, 3),
    );
    let chown = std::os::unix::fs::lchown(r.join("big.bin"), Some(3_000_000), Some(7)).is_ok();
    if device.is_err() || !chown {
        eprintln!("fsio test: not privileged, device and large-uid checks skipped");
    }
    Caps {
        xattr,
        device: device.is_ok(),
        chown,
    }
}

struct Member {
    kind: EntryType,
    data: Vec<u8>,
    link: Option<Vec<u8>>,
    mode: u32,
    mtime: u64,
    uid: u64,
    dev: (u32, u32),
    pax: BTreeMap<String, Vec<u8>>,
}

/// A strict PAX reader: the tar crate's splits records at '\n', which xattr values may contain.
fn parse_pax(mut d: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let mut recs = Vec::new();
    while !d.is_empty() {
        let sp = d.iter().position(|&b| b == b' ').unwrap();
        let len: usize = std::str::from_utf8(&d[..sp]).unwrap().parse().unwrap();
        let (rec, rest) = d.split_at(len);
        assert_eq!(rec[len - 1], b'\n');
        let kv = &rec[sp + 1..len - 1];
        let eq = kv.iter().position(|&b| b == b'=').unwrap();
        recs.push((
            String::from_utf8(kv[..eq].to_vec()).unwrap(),
            kv[eq + 1..].to_vec(),
        ));
        d = rest;
    }
    assert!(
        recs.windows(2).all(|w| w[0].0 < w[1].0),
        "PAX keys not sorted"
    );
    recs.into_iter().collect()
}

/// Members as the tar crate reads them (it applies PAX path/linkpath/size/uid), each with the
/// records of the PAX header before it (taken from a raw pass).
fn parse(bytes: &[u8]) -> Vec<(Vec<u8>, Member)> {
    let (mut paxes, mut pending) = (Vec::new(), BTreeMap::new());
    for e in tar::Archive::new(bytes).entries().unwrap().raw(true) {
        let mut e = e.unwrap();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        if e.header().entry_type() == EntryType::XHeader {
            pending = parse_pax(&data);
        } else {
            paxes.push(std::mem::take(&mut pending));
        }
    }
    let mut ar = tar::Archive::new(bytes);
    let entries = ar.entries().unwrap().zip(paxes).map(|(e, pax)| {
        let mut e = e.unwrap();
        let h = e.header();
        let dev = (
            h.device_major().unwrap().unwrap(),
            h.device_minor().unwrap().unwrap(),
        );
        let (kind, mode, mtime, uid) = (
            h.entry_type(),
            h.mode().unwrap(),
            h.mtime().unwrap(),
            h.uid().unwrap(),
        );
        let name = e.path_bytes().to_vec();
        let link = e.link_name_bytes().map(|l| l.to_vec());
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        (
            name,
            Member {
                kind,
                data,
                link,
                mode,
                mtime,
                uid,
                dev,
                pax,
            },
        )
    });
    entries.collect()
}

#[test]
fn fsio_tree_is_archived_deterministically_and_completely() {
    let tmp = tempfile::tempdir().unwrap();
    let caps = build(tmp.path());
    let (mut out, mut warnings) = (Vec::new(), Vec::new());
    let opts = DirOptions::default();
    let n = write_dir_tar(tmp.path(), &opts, &mut out, &mut warnings).unwrap();
    let mut again = Vec::new();
    write_dir_tar(tmp.path(), &opts, &mut again, &mut Vec::new()).unwrap();
    assert!(out == again, "two runs differ");
    assert_eq!(out.len() % 10240, 0);
    assert!(
        warnings.len() == 1 && warnings[0].contains("socket"),
        "{warnings:?}"
    );

    let members = parse(&out);
    assert_eq!(members.len() as u64, n);
    let a = "a".repeat(90);
    let mut long_raw = b"\xff".repeat(110);
    long_raw.extend_from_slice(b"raw");
    let mut expect: Vec<Vec<u8>> = vec![b"big.bin".to_vec(), b"caf\xe9".to_vec()];
    let dirs = [
        "deep/".to_string(),
        format!("deep/{a}/"),
        format!("deep/{a}/{a}"),
        "dir/".into(),
    ];
    expect.extend(dirs.map(String::into_bytes));
    let names = [
        "dir/hard2",
        "dir/link",
        "dir/sub/",
        "dir/sub/nested.txt",
        "empty",
        "fifo",
        "hard1",
    ];
    expect.extend(names.map(|s| s.as_bytes().to_vec()));
    expect.extend([b"l".repeat(120), b"longlink".to_vec()]);
    if caps.device {
        expect.push(b"null".to_vec());
    }
    expect.extend([&b"old"[..], b"suid", b"tmp/"].map(<[u8]>::to_vec));
    expect.push(long_raw.clone()); // 0xff sorts last
    assert_eq!(
        members.iter().map(|m| m.0.clone()).collect::<Vec<_>>(),
        expect
    );

    let m: HashMap<Vec<u8>, Member> = members.into_iter().collect();
    let get = |k: &str| &m[k.as_bytes()];
    let big = get("big.bin");
    assert_eq!(
        (big.kind, big.data.len(), big.mtime),
        (EntryType::Regular, 300 * 1024, 1_600_000_000)
    );
    assert!(big.data.iter().enumerate().all(|(i, &b)| b == big_byte(i)));
    assert_eq!(big.pax["mtime"], b"1600000000.123456");
    if caps.chown {
        assert_eq!(
            (big.uid, &big.pax["uid"][..], big.pax.get("gid")),
            (3_000_000, &b"3000000"[..], None)
        );
    }
    assert_eq!(
        (get("old").mtime, &get("old").pax["mtime"][..]),
        (0, &b"-1.5"[..])
    );
    let hard2 = get("dir/hard2");
    assert_eq!(
        (hard2.kind, &hard2.data[..]),
        (EntryType::Regular, &b"shared"[..])
    );
    let hard1 = get("hard1");
    assert_eq!(
        (hard1.kind, hard1.link.as_deref()),
        (EntryType::Link, Some(&b"dir/hard2"[..]))
    );
    assert_eq!(get("dir/link").link.as_deref(), Some(&b"../big.bin"[..]));
    let t150 = "t".repeat(150).into_bytes();
    assert_eq!(
        (
            &get("longlink").pax["linkpath"],
            get("longlink").link.as_ref()
        ),
        (&t150, Some(&t150))
    );
    assert_eq!(get(&"l".repeat(120)).pax["path"], b"l".repeat(120));
    assert_eq!(
        (&m[&long_raw].pax["path"], &m[&long_raw].data[..]),
        (&long_raw, &b"raw"[..])
    );
    let split = get(&format!("deep/{a}/{a}"));
    assert!(
        !split.pax.contains_key("path"),
        "a splittable path needs no PAX"
    );
    assert_eq!(split.data, b"split");
    assert_eq!(m[&b"caf\xe9"[..]].data, b"latin1");
    assert_eq!(
        (get("fifo").kind, get("fifo").mode),
        (EntryType::Fifo, 0o640)
    );
    assert_eq!(
        (get("suid").mode, get("tmp/").mode, get("tmp/").kind),
        (0o4755, 0o1777, EntryType::Directory)
    );
    assert_eq!(
        (get("empty").data.len(), &get("dir/sub/nested.txt").data[..]),
        (0, &b"hello"[..])
    );
    if caps.device {
        assert_eq!(
            (get("null").kind, get("null").dev),
            (EntryType::Char, (1, 3))
        );
    }
    if caps.xattr {
        assert_eq!(get("empty").pax["SCHILY.xattr.user.test"], b"v\0al=ue\n");
        let opts = DirOptions {
            exclude_xattrs: vec![b"user.test".to_vec()],
            max_threads: Some(1),
        };
        let mut out = Vec::new();
        write_dir_tar(tmp.path(), &opts, &mut out, &mut Vec::new()).unwrap();
        assert!(parse(&out)
            .iter()
            .all(|(_, m)| !m.pax.keys().any(|k| k.starts_with("SCHILY"))));
    }
    gnu_tar_check(&out, n, caps.device && caps.chown);
}

/// GNU tar lists every member; as root, extracting and re-archiving gives the same bytes (so
/// names, modes, owners, times with nanoseconds, links, devices and xattrs all survived).
fn gnu_tar_check(archive: &[u8], n: u64, privileged: bool) {
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("t.tar");
    fs::write(&file, archive).unwrap();
    let Ok(list) = Command::new("tar").arg("-tvf").arg(&file).output() else {
        return eprintln!("fsio test: GNU tar not found, oracle check skipped");
    };
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    assert_eq!(
        list.stdout
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .count() as u64,
        n
    );
    if !privileged {
        return eprintln!("fsio test: not privileged, GNU tar extraction check skipped");
    }
    let dest = work.path().join("x");
    fs::create_dir(&dest).unwrap();
    let mut cmd = Command::new("tar");
    cmd.args([
        "--xattrs",
        "--xattrs-include=*",
        "--warning=no-timestamp",
        "-xpf",
    ]);
    assert!(cmd
        .arg(&file)
        .arg("-C")
        .arg(&dest)
        .status()
        .unwrap()
        .success());
    let mut again = Vec::new();
    write_dir_tar(&dest, &DirOptions::default(), &mut again, &mut Vec::new()).unwrap();
    assert!(
        again == archive,
        "GNU tar extraction does not re-archive to the same bytes"
    );
}
