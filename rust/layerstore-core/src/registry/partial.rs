//! Partial pulls of zstd:chunked layers: fetch the TOC and tar-split with range requests, take
//! every chunk the store already has from the store, fetch only the missing frames (merged
//! multi-range requests), rebuild the tar and import it through the ordinary layer import.
//!
//! Invariants:
//! - Nothing the registry says is trusted. The TOC must match the descriptor's manifest
//!   checksum (the manifest itself is digest-checked), the tar-split the digest the TOC or the
//!   descriptor gives; both are size-bounded and checked ([`zstd_chunked::parse_toc`]). Every
//!   fetched frame is decompressed with a bound and checked against its TOC sha256 before it is
//!   used; every stored chunk is checked against its BLAKE3 as it is read and against the TOC's
//!   size. The rebuilt tar goes through [`Staging::fetch`], which checks the diff_id before the
//!   layer becomes visible, and any failure leaves nothing (the staging undoes the layer, the
//!   spool of fetched frames lives in the staging directory).
//! - A partial pull is never worse than a plain one: when the registry answers a range request
//!   with the whole blob (`200`), when the descriptor carries no manifest checksum, or when most
//!   of the blob would be fetched anyway ([`FALLBACK_SHARE`]), the caller pulls the blob plainly.
//!   A TOC and tar-split that disagree (a name the TOC lacks, a size it contradicts) are a typed
//!   error ([`Error::InvalidImage`]), as is any malformed metadata.
//! - Ranges: frames closer than [`GAP`] bytes are fetched as one range (the gap's bytes are
//!   cheaper than a range's overhead), no range grows past [`MAX_RANGE`], and a request asks for
//!   at most [`MAX_RANGES`] ranges. A `206` with one range or with `multipart/byteranges` is
//!   read; each part is matched by its `Content-Range`, never by position.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde_json::Value;
use sha2::{Digest as _, Sha256};
use ureq::http::Method;

use super::client::Client;
use crate::cas::{ChunkLoc, PackReader};
use crate::digest::Blake3;
use crate::error::{Error, IoContext, Result};
use crate::oci::source::{Opened, Source};
use crate::oci::zstd_chunked::{self, Limits, Positions, SplitItem, Toc, TocChunk};
use crate::oci::{Descriptor, FetchedLayer, LayerBlob, Rebuild, Staging, WantedBlob};
use crate::store::{Progress, Store};

/// Frames closer than this are fetched in one range. Small, since a bridged gap is paid in
/// bytes while an extra range costs only a part header and rides in a request with up to
/// [`MAX_RANGES`] others.
pub const GAP: u64 = 4 << 10;
/// Largest merged range (one range is read whole into memory to be checked).
pub const MAX_RANGE: u64 = 8 << 20;
/// Most ranges in one request (keeps the `Range` header well under servers' header limits).
pub const MAX_RANGES: usize = 128;
/// When more than this share of the blob's bytes would be fetched, pull it plainly.
pub const FALLBACK_SHARE: f64 = 0.85;
/// Range requests in flight at once.
const JOBS: usize = 4;

/// What a partial pull did (or why it did not happen).
pub(crate) enum Partial {
    /// The layer, imported (boxed: the other variant is empty).
    Done(Box<FetchedLayer>),
    /// Pull the blob plainly instead (the module head says when).
    Fallback,
}

/// Counters of one partial pull, for the caller's report.
#[derive(Debug, Default)]
pub struct PartialStats {
    pub chunks_reused: AtomicU64,
    pub chunks_fetched: AtomicU64,
    pub bytes_fetched: AtomicU64,
}

/// Pull layer `d` (diff_id `diff_id`) partially if it is a zstd:chunked layer whose metadata
/// checks out and whose missing chunks are a minority of it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn pull_layer(
    store: &Store,
    staging: &Staging<'_>,
    client: &Client,
    d: &Descriptor,
    annotations: Option<&Value>,
    diff_id: &str,
    stats: &PartialStats,
    progress: Progress<'_>,
) -> Result<Partial> {
    let blob = d.digest.to_string();
    let limits = Limits::default();
    let Some(pos) = zstd_chunked::positions_from_annotations(annotations, &blob, d.size)? else {
        return Ok(Partial::Fallback);
    };
    let Some(toc_digest) = pos.toc_digest.clone() else {
        return Ok(Partial::Fallback);
    };
    let path = client.repo_path(&format!("blobs/{blob}"));
    let Some((toc_z, split_z)) = fetch_metadata(client, &path, &pos, &limits, stats)? else {
        return Ok(Partial::Fallback);
    };
    check_digest(&format!("zstd:chunked TOC of {blob}"), &toc_digest, &toc_z)?;
    let toc = zstd_chunked::parse_toc(&blob, &toc_z, pos.toc, &limits)?;
    if let Some(expected) = toc
        .tar_split_digest
        .as_ref()
        .or(pos.tar_split_digest.as_ref())
    {
        check_digest(
            &format!("zstd:chunked tar-split of {blob}"),
            expected,
            &split_z,
        )?;
    }
    let items = zstd_chunked::parse_tar_split(&blob, &split_z, pos.tar_split, &limits)?;
    let plan = Plan::new(store, &blob, &toc, items)?;
    let missing: u64 = plan.remote.iter().map(|c| c.end - c.offset).sum();
    if missing as f64 > FALLBACK_SHARE * d.size as f64 {
        return Ok(Partial::Fallback);
    }
    stats
        .chunks_reused
        .fetch_add(plan.reused as u64, Ordering::Relaxed);
    let spool_path = staging
        .dir
        .join(format!("{}.frames", crate::owner::unique_name()));
    let result = (|| {
        let spool = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&spool_path)
            .ctx(|| format!("creating {}", spool_path.display()))?;
        let fresh = match fetch_frames(client, &path, &plan, &spool, &limits, stats)? {
            Some(f) => f,
            None => return Ok(Partial::Fallback),
        };
        let source = Rebuilt {
            parts: Mutex::new(Some(RebuiltReader::new(store, &plan, spool)?)),
            size: plan.tar_size,
        };
        let member = "rebuilt.tar";
        let want = WantedBlob {
            member,
            blob: &blob,
            size: Some(plan.tar_size),
            digest: None,
            diff_id: Some(diff_id),
        };
        let fetched = staging.fetch(&source, &want, progress)?;
        let conn = store.conn()?;
        crate::meta::chunked::put_sha256(&conn, &fresh)?;
        if toc.ours && same_chunks(store, &fetched, &toc)? {
            // The store can write this very blob again: say so, so that the image re-pushes
            // and re-exports digest-exact without a copy of the blob.
            let annotations = annotations
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                        .collect()
                })
                .unwrap_or_default();
            crate::meta::chunked::put_annotations(&conn, &blob, &annotations)?;
            let info = fetched.info.clone();
            return Ok(Partial::Done(Box::new(fetched.rebuilt_as(LayerBlob {
                digest: blob.clone(),
                layer: info.id.to_string(),
                compression: "zstd",
                size: d.size,
                rebuild: Rebuild::ZstdChunked,
            }))));
        }
        Ok(Partial::Done(Box::new(fetched)))
    })();
    let _ = std::fs::remove_file(&spool_path);
    result
}

fn check_digest(what: &str, expected: &str, bytes: &[u8]) -> Result<()> {
    let found = crate::digest::sha256_string(&Sha256::digest(bytes));
    if found != expected {
        return Err(Error::DigestMismatch {
            what: what.to_string(),
            expected: expected.to_string(),
            found,
        });
    }
    Ok(())
}

/// Whether the store cut the imported layer into the TOC's chunks (so its writer, with the
/// same parameters, gives the same blob).
fn same_chunks(store: &Store, fetched: &FetchedLayer, toc: &Toc) -> Result<bool> {
    let (entries, _) = store.load(&fetched.info.id)?;
    let mut seen = 0usize;
    for e in &entries {
        if e.chunks.is_empty() {
            continue;
        }
        let name = String::from_utf8_lossy(&e.path);
        let Some(list) = toc.files.get(name.as_ref()) else {
            return Ok(false);
        };
        let ours = e.chunks.iter().map(|c| u64::from(c.len));
        if !ours.eq(list.iter().map(|c| c.size)) {
            return Ok(false);
        }
        seen += 1;
    }
    Ok(seen == toc.files.len())
}

/// Where each piece of the tar comes from.
#[derive(Debug)]
enum Part {
    Raw(Vec<u8>),
    /// A chunk the store holds: (its location, its length as the TOC says).
    Stored(ChunkLoc, u64),
    /// A fetched frame: index into [`Plan::remote`].
    Remote(usize),
}

/// A frame to fetch, its place in the spool, and what it must decompress to.
#[derive(Debug, Clone)]
struct RemoteFrame {
    offset: u64,
    end: u64,
    size: u64,
    sha256: [u8; 32],
    spool: u64,
}

#[derive(Debug)]
struct Plan {
    parts: Vec<Part>,
    remote: Vec<RemoteFrame>,
    reused: usize,
    tar_size: u64,
}

impl Plan {
    /// Walk the tar-split, matching each file to its TOC chunks, and find the chunks the store
    /// has (by the TOC's BLAKE3, else through the sha256 index).
    fn new(store: &Store, blob: &str, toc: &Toc, items: Vec<SplitItem>) -> Result<Plan> {
        let disagree = |reason: String| Error::InvalidImage {
            blob: blob.to_string(),
            reason: format!("zstd:chunked: the TOC and the tar-split disagree: {reason}"),
        };
        let mut files: Vec<&[TocChunk]> = Vec::new();
        for item in &items {
            if let SplitItem::File { name, size } = item {
                let chunks = toc
                    .files
                    .get(name)
                    .ok_or_else(|| disagree(format!("the TOC has no file {name:?}")))?;
                let total: u64 = chunks.iter().map(|c| c.size).sum();
                if total != *size {
                    return Err(disagree(format!(
                        "{name:?} is {size} bytes in the tar-split, {total} in the TOC"
                    )));
                }
                files.push(chunks);
            }
        }
        let conn = store.conn()?;
        let by_b3: Vec<Blake3> = files
            .iter()
            .flat_map(|cs| cs.iter().filter_map(|c| c.blake3))
            .collect();
        let by_sha = crate::meta::chunked::by_sha256(
            &conn,
            files
                .iter()
                .flat_map(|cs| cs.iter().filter(|c| c.blake3.is_none()).map(|c| &c.sha256)),
        )?;
        let locs = crate::meta::chunk_locs(&conn, by_b3.iter().chain(by_sha.values()))?;
        drop(conn);
        let mut plan = Plan {
            parts: Vec::with_capacity(items.len()),
            remote: Vec::new(),
            reused: 0,
            tar_size: 0,
        };
        let mut fetched: HashMap<[u8; 32], usize> = HashMap::new();
        let mut spool = 0u64;
        let mut files = files.into_iter();
        for item in items {
            match item {
                SplitItem::Raw(bytes) => {
                    plan.tar_size += bytes.len() as u64;
                    plan.parts.push(Part::Raw(bytes));
                }
                SplitItem::File { size, .. } => {
                    plan.tar_size += size;
                    for c in files.next().expect("one list per file") {
                        let held = c
                            .blake3
                            .or_else(|| by_sha.get(&c.sha256).copied())
                            .and_then(|b| locs.get(&b));
                        if let Some(loc) = held {
                            plan.reused += 1;
                            plan.parts.push(Part::Stored(loc.clone(), c.size));
                            continue;
                        }
                        // A chunk that occurs twice is fetched once.
                        let i = *fetched.entry(c.sha256).or_insert_with(|| {
                            plan.remote.push(RemoteFrame {
                                offset: c.offset,
                                end: c.end,
                                size: c.size,
                                sha256: c.sha256,
                                spool,
                            });
                            spool += c.end - c.offset;
                            plan.remote.len() - 1
                        });
                        plan.parts.push(Part::Remote(i));
                    }
                }
            }
        }
        Ok(plan)
    }
}

/// A byte range of the blob (inclusive start, exclusive end).
type Range = (u64, u64);

/// Merge sorted frames into ranges: gaps under [`GAP`] bridged, no range over [`MAX_RANGE`]
/// (unless one frame is). Returns the ranges and, for each, the frames it covers.
fn merge(frames: &[RemoteFrame]) -> Vec<(Range, Vec<usize>)> {
    let mut order: Vec<usize> = (0..frames.len()).collect();
    order.sort_by_key(|&i| frames[i].offset);
    let mut out: Vec<(Range, Vec<usize>)> = Vec::new();
    for i in order {
        let f = &frames[i];
        if let Some(((start, end), members)) = out.last_mut() {
            if f.offset >= *end && f.offset - *end <= GAP && f.end - *start <= MAX_RANGE {
                *end = f.end;
                members.push(i);
                continue;
            }
            if f.offset < *end {
                // Overlapping frames (a lying TOC) are fetched on their own.
                out.push(((f.offset, f.end), vec![i]));
                continue;
            }
        }
        out.push(((f.offset, f.end), vec![i]));
    }
    out
}

/// Fetch the TOC and the tar-split (one request); `None` when the registry ignores `Range`.
fn fetch_metadata(
    client: &Client,
    path: &str,
    pos: &Positions,
    limits: &Limits,
    stats: &PartialStats,
) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
    if pos.toc.len > limits.toc || pos.tar_split.len > limits.tar_split {
        return Err(Error::InvalidImage {
            blob: path.to_string(),
            reason: "zstd:chunked metadata over the size limit".into(),
        });
    }
    let ranges = [
        (pos.toc.offset, pos.toc.end()),
        (pos.tar_split.offset, pos.tar_split.end()),
    ];
    let (lo, hi) = (ranges[0].0.min(ranges[1].0), ranges[0].1.max(ranges[1].1));
    // Adjacent as our writer puts them: one range; else two.
    let asked: Vec<Range> = if hi - lo <= pos.toc.len + pos.tar_split.len + GAP {
        vec![(lo, hi)]
    } else {
        ranges.to_vec()
    };
    let mut got: Vec<(Range, Vec<u8>)> = Vec::new();
    let complete = get_ranges(client, path, &asked, stats, &mut |r, data| {
        got.push((r, data));
        Ok(())
    })?;
    if !complete {
        return Ok(None);
    }
    let slice = |(s, e): Range| -> Result<Vec<u8>> {
        for ((rs, re), data) in &got {
            if *rs <= s && e <= *re {
                return Ok(data[(s - rs) as usize..(e - rs) as usize].to_vec());
            }
        }
        Err(Error::Registry {
            url: super::client::redact(path),
            reason: "a range the registry did not send".into(),
        })
    };
    Ok(Some((slice(ranges[0])?, slice(ranges[1])?)))
}

/// Fetch every remote frame of `plan`, check it, and write it to its place in `spool`. Returns
/// (sha256, BLAKE3) of each frame's content, or `None` when the registry ignores `Range`.
fn fetch_frames(
    client: &Client,
    path: &str,
    plan: &Plan,
    spool: &File,
    limits: &Limits,
    stats: &PartialStats,
) -> Result<Option<Vec<zstd_chunked::ChunkDigests>>> {
    let merged = merge(&plan.remote);
    let requests: Vec<&[(Range, Vec<usize>)]> = merged.chunks(MAX_RANGES).collect();
    let fresh = Mutex::new(Vec::with_capacity(plan.remote.len()));
    let whole = std::sync::atomic::AtomicBool::new(false);
    let results = super::bounded_map(&requests, JOBS, |group| {
        let ranges: Vec<Range> = group.iter().map(|(r, _)| *r).collect();
        let members: HashMap<Range, &Vec<usize>> = group.iter().map(|(r, m)| (*r, m)).collect();
        let complete = get_ranges(client, path, &ranges, stats, &mut |r, data| {
            let frames = members.get(&r).ok_or_else(|| Error::Registry {
                url: super::client::redact(path),
                reason: format!("a range not asked for: {}-{}", r.0, r.1),
            })?;
            for &i in *frames {
                let f = &plan.remote[i];
                let bytes = &data[(f.offset - r.0) as usize..(f.end - r.0) as usize];
                let content = zstd_chunked::decompress_bounded(bytes, limits.chunk, Some(f.size))
                    .map_err(|e| Error::DigestMismatch {
                    what: format!("frame at {} of {path}: {e}", f.offset),
                    expected: crate::digest::sha256_string(&f.sha256),
                    found: "undecodable".into(),
                })?;
                let sha: [u8; 32] = Sha256::digest(&content).into();
                if sha != f.sha256 {
                    return Err(Error::DigestMismatch {
                        what: format!("chunk at {} of {}", f.offset, super::client::redact(path)),
                        expected: crate::digest::sha256_string(&f.sha256),
                        found: crate::digest::sha256_string(&sha),
                    });
                }
                spool
                    .write_at(bytes, f.spool)
                    .ctx(|| "spooling fetched frames".into())?;
                stats.chunks_fetched.fetch_add(1, Ordering::Relaxed);
                fresh
                    .lock()
                    .expect("not poisoned")
                    .push((sha, Blake3::of(&content)));
            }
            Ok(())
        })?;
        if !complete {
            whole.store(true, Ordering::SeqCst);
        }
        Ok(())
    });
    for r in results.into_iter().flatten() {
        r?;
    }
    if whole.load(Ordering::SeqCst) {
        return Ok(None);
    }
    Ok(Some(fresh.into_inner().expect("not poisoned")))
}

/// GET `ranges` of the blob at `path` in one request, handing each range's bytes to `each`.
/// Returns false when the registry answered with the whole blob (no range support).
fn get_ranges(
    client: &Client,
    path: &str,
    ranges: &[Range],
    stats: &PartialStats,
    each: &mut dyn FnMut(Range, Vec<u8>) -> Result<()>,
) -> Result<bool> {
    if ranges.is_empty() {
        return Ok(true);
    }
    let spec: Vec<String> = ranges
        .iter()
        .map(|(s, e)| format!("{s}-{}", e - 1))
        .collect();
    let header = format!("bytes={}", spec.join(","));
    let a = client.request(Method::GET, path, &[("Range", &header)], None)?;
    match a.status {
        206 => {}
        200 => return Ok(false),
        _ => return Err(a.unexpected("fetching ranges of a blob")),
    }
    let content_type = a.header("content-type").unwrap_or_default();
    let url = super::client::redact(&a.url);
    let fail = |reason: String| Error::Registry {
        url: url.clone(),
        reason,
    };
    let asked: HashSet<Range> = ranges.iter().copied().collect();
    let mut seen = HashSet::new();
    let mut take = |r: Range, data: Vec<u8>| -> Result<()> {
        if !asked.contains(&r) {
            return Err(fail(format!("a range not asked for: {}-{}", r.0, r.1)));
        }
        stats
            .bytes_fetched
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        seen.insert(r);
        each(r, data)
    };
    if let Some(boundary) = multipart_boundary(&content_type) {
        let mut body = BufReader::new(a.into_reader());
        read_multipart(&mut body, &boundary, &mut take).map_err(|e| match e {
            Error::Io { source, .. } => fail(format!("reading ranges: {source}")),
            e => e,
        })?;
    } else {
        let r = a
            .header("content-range")
            .and_then(|v| parse_content_range(&v))
            .ok_or_else(|| fail("a 206 without a usable Content-Range".into()))?;
        let data = read_exact_len(a.into_reader(), r.1 - r.0)
            .map_err(|e| fail(format!("reading a range: {e}")))?;
        take(r, data)?;
    }
    if seen.len() != asked.len() {
        return Err(fail(format!(
            "asked for {} ranges, got {}",
            asked.len(),
            seen.len()
        )));
    }
    Ok(true)
}

fn read_exact_len(r: impl Read, len: u64) -> io::Result<Vec<u8>> {
    let mut data = Vec::with_capacity(usize::try_from(len.min(MAX_RANGE)).unwrap_or(0));
    r.take(len).read_to_end(&mut data)?;
    if data.len() as u64 != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the body ended early",
        ));
    }
    Ok(data)
}

/// `bytes START-END/TOTAL` as a half-open range.
fn parse_content_range(v: &str) -> Option<Range> {
    let span = v.trim().strip_prefix("bytes ")?.split('/').next()?;
    let (s, e) = span.split_once('-')?;
    let (s, e) = (s.trim().parse::<u64>().ok()?, e.trim().parse::<u64>().ok()?);
    (e >= s).then_some((s, e + 1))
}

fn multipart_boundary(content_type: &str) -> Option<String> {
    let (mime, params) = content_type.split_once(';')?;
    if !mime.trim().eq_ignore_ascii_case("multipart/byteranges") {
        return None;
    }
    params.split(';').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"').to_string())
    })
}

/// Read a `multipart/byteranges` body, handing each part to `each`.
fn read_multipart(
    body: &mut dyn BufRead,
    boundary: &str,
    each: &mut dyn FnMut(Range, Vec<u8>) -> Result<()>,
) -> Result<()> {
    let delimiter = format!("--{boundary}");
    let end = format!("--{boundary}--");
    let io_err = |e: io::Error| Error::io("reading a multipart body", e);
    let mut line = String::new();
    loop {
        // Up to the next delimiter (CRLFs between parts are skipped).
        loop {
            line.clear();
            if body.read_line(&mut line).map_err(io_err)? == 0 {
                return Err(io_err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "no closing delimiter",
                )));
            }
            if line.len() > 4096 {
                return Err(io_err(io::Error::other("a multipart line too long")));
            }
            let l = line.trim_end();
            if l == end {
                return Ok(());
            }
            if l == delimiter {
                break;
            }
        }
        let mut range = None;
        loop {
            line.clear();
            body.read_line(&mut line).map_err(io_err)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.trim().eq_ignore_ascii_case("content-range") {
                    range = parse_content_range(v);
                }
            }
        }
        let r = range
            .ok_or_else(|| io_err(io::Error::other("a multipart part without Content-Range")))?;
        if r.1 - r.0 > MAX_RANGE.max(2 * zstd_chunked::Limits::default().chunk) {
            return Err(io_err(io::Error::other("a multipart part too large")));
        }
        let data = read_exact_len(&mut *body, r.1 - r.0).map_err(io_err)?;
        each(r, data)?;
    }
}

/// The rebuilt tar as a one-member source.
struct Rebuilt {
    parts: Mutex<Option<RebuiltReader>>,
    size: u64,
}

impl Source for Rebuilt {
    fn open(&self, _name: &str) -> Result<Option<Opened>> {
        let reader = self.parts.lock().expect("not poisoned").take();
        Ok(reader.map(|r| (Box::new(r) as Box<dyn Read + Send>, self.size)))
    }

    fn describe(&self) -> String {
        "a zstd:chunked layer rebuilt from its chunks".into()
    }
}

/// Reads the tar back: raw bytes from the tar-split, stored chunks (checked against their
/// BLAKE3), fetched frames from the spool (decompressed again).
struct RebuiltReader {
    parts: std::vec::IntoIter<PartOwned>,
    packs: PackReader,
    spool: File,
    current: Vec<u8>,
    at: usize,
}

/// A part with what it needs to be read without the plan.
enum PartOwned {
    Raw(Vec<u8>),
    Stored(ChunkLoc, u64),
    Remote(RemoteFrame),
}

impl RebuiltReader {
    fn new(store: &Store, plan: &Plan, spool: File) -> Result<Self> {
        let parts: Vec<PartOwned> = plan
            .parts
            .iter()
            .map(|p| match p {
                Part::Raw(b) => PartOwned::Raw(b.clone()),
                Part::Stored(loc, n) => PartOwned::Stored(loc.clone(), *n),
                Part::Remote(i) => PartOwned::Remote(plan.remote[*i].clone()),
            })
            .collect();
        Ok(RebuiltReader {
            parts: parts.into_iter(),
            packs: store.cached_reader()?,
            spool,
            current: Vec::new(),
            at: 0,
        })
    }

    fn next_part(&mut self) -> io::Result<bool> {
        let Some(p) = self.parts.next() else {
            return Ok(false);
        };
        self.at = 0;
        match p {
            PartOwned::Raw(b) => self.current = b,
            PartOwned::Stored(loc, n) => {
                self.packs
                    .read(&loc, &mut self.current)
                    .map_err(io::Error::other)?;
                if self.current.len() as u64 != n {
                    return Err(io::Error::other(Error::DigestMismatch {
                        what: format!("length of stored chunk {}", loc.digest),
                        expected: n.to_string(),
                        found: self.current.len().to_string(),
                    }));
                }
            }
            PartOwned::Remote(f) => {
                let mut frame = vec![0u8; usize::try_from(f.end - f.offset).unwrap_or(0)];
                self.spool.read_exact_at(&mut frame, f.spool)?;
                self.current = zstd_chunked::decompress_bounded(&frame, f.size, Some(f.size))?;
            }
        }
        Ok(true)
    }
}

impl Read for RebuiltReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at >= self.current.len() {
            if !self.next_part()? {
                return Ok(0);
            }
        }
        let n = buf.len().min(self.current.len() - self.at);
        buf[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(offset: u64, end: u64) -> RemoteFrame {
        RemoteFrame {
            offset,
            end,
            size: 1,
            sha256: [0; 32],
            spool: 0,
        }
    }

    #[test]
    fn close_frames_merge_and_far_ones_do_not() {
        let frames = [
            frame(100, 200),
            frame(0, 50),
            frame(200 + GAP + 1, 300 + GAP),
        ];
        let m = merge(&frames);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0], ((0, 200), vec![1, 0]));
        assert_eq!(m[1].1, vec![2]);
    }

    #[test]
    fn content_ranges_and_boundaries_parse() {
        assert_eq!(parse_content_range("bytes 0-9/100"), Some((0, 10)));
        assert_eq!(parse_content_range("bytes 9-0/100"), None);
        assert_eq!(
            multipart_boundary("multipart/byteranges; boundary=abc").as_deref(),
            Some("abc")
        );
        assert_eq!(multipart_boundary("application/octet-stream"), None);
    }

    #[test]
    fn multipart_bodies_give_every_part_by_its_range() {
        let body = b"--b\r\nContent-Type: x\r\nContent-Range: bytes 0-2/10\r\n\r\nabc\r\n--b\r\nContent-Range: bytes 5-6/10\r\n\r\nfg\r\n--b--\r\n";
        let mut got = Vec::new();
        read_multipart(&mut &body[..], "b", &mut |r, d| {
            got.push((r, d));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            got,
            vec![((0, 3), b"abc".to_vec()), ((5, 7), b"fg".to_vec())]
        );
        let cut = &body[..40];
        assert!(read_multipart(&mut &cut[..], "b", &mut |_, _| Ok(())).is_err());
    }
}
